"""TF's own serving-lookup tests, ported, plus the edge-case matrix of tf_semantics.md section 4.6.

The 16 tests of ``tensorflow/python/tpu/tpu_embedding_for_serving_test.py`` (section 7.1) run on
the same fixture (``serving`` in conftest.py). Each compares against TF's published golden
outputs (section 7.1, the only hard-coded numbers in the lookup tests) and against TF itself, run
on the same inputs in the same process.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

# TensorFlow is resolved on first use: the tests that need no TF run without it.
from tf_reference import (
    assert_matches_tf,
    tf,
    tf_lookup,
    tf_lookup_raw,
    to_tf_inputs,
    to_tf_weights,
)

import jaxembed as je

# Golden outputs published in tf_semantics.md section 7.1 (observed with TF 2.21).
GOLDEN_SPARSE = (
    [[0, 1, 2, 3], [4, 6, 8, 10], [4, 6, 8, 10], [4, 5, 6, 7]],
    [[4, 6, 8, 10], [4, 5, 6, 7], [0, 1, 2, 3], [4, 6, 8, 10]],
    [[6, 7], [2, 3], [6, 7], [2, 3]],
)
GOLDEN_WEIGHTED = (
    [[0, 0, 0, 0], [4, 5, 6, 7], [4, 5, 6, 7], [4, 5, 6, 7]],
    [[4, 5, 6, 7], [4, 5, 6, 7], [0, 0, 0, 0], [4, 5, 6, 7]],
    [[6, 7], [3.3333333, 4.3333335], [6, 7], [3.3333333, 4.3333335]],
)
GOLDEN_FRIENDS_SEQ2 = [[[6, 7], [0, 0]], [[0, 1], [2, 3]], [[6, 7], [0, 0]], [[0, 1], [2, 3]]]
GOLDEN_FRIENDS_SHAPE_2_2 = [[[6, 7], [2, 3]], [[6, 7], [2, 3]]]
GOLDEN_FRIENDS_SHAPE_2_4 = [
    [[6, 7], [0, 0], [0, 1], [2, 3]],
    [[6, 7], [0, 0], [0, 1], [2, 3]],
]


def _lookup_and_check(inputs, weights, tables, feature_config, golden=None):
    """Runs jaxembed and TF; checks jaxembed against TF (section 4.4 rule) and the golden."""
    got = je.embedding_lookup(inputs, weights, tables, feature_config)
    want = tf_lookup(inputs, weights, tables, feature_config)
    assert_matches_tf(got, want, inputs, weights, tables, feature_config)
    if golden is not None:  # a tuple, one golden per output (all fixture structures are tuples)
        assert isinstance(got, tuple) and len(got) == len(golden)
        for g, gold in zip(got, golden, strict=True):
            g, gold = np.asarray(g), np.asarray(gold, np.float32)
            assert g.shape == gold.shape
            np.testing.assert_allclose(g, gold, rtol=1e-6, atol=0)
    return got


# --------------------------------------------------------------------------------------------
# The 16 tests of tpu_embedding_for_serving_test.py
# --------------------------------------------------------------------------------------------


def test_cpu_dense_lookup(serving):
    features = serving.dense()
    got = _lookup_and_check(features, None, serving.tables, serving.feature_config)
    assert isinstance(got, tuple) and len(got) == 3
    for out, ids, config in zip(got, features, serving.feature_config, strict=True):
        table = serving.tables[config.table]
        np.testing.assert_array_equal(np.asarray(out), table[ids])
    assert [np.asarray(o).shape for o in got] == [(6, 4), (6, 4), (8, 2)]


def test_cpu_dense_lookup_with_weights(serving):
    features, weights = serving.dense(), serving.dense(weights=True)
    with pytest.raises(ValueError, match="Weight specified for .*, but input is dense"):
        je.embedding_lookup(features, weights, serving.tables, serving.feature_config)
    with pytest.raises(ValueError, match="Weight specified for .*, but input is dense"):
        tf_lookup(features, weights, serving.tables, serving.feature_config)


def test_cpu_sparse_lookup(serving):
    _lookup_and_check(
        serving.sparse(), None, serving.tables, serving.feature_config, golden=GOLDEN_SPARSE
    )


def test_cpu_sparse_lookup_with_weights(serving):
    _lookup_and_check(
        serving.sparse(),
        serving.sparse(weights=True),
        serving.tables,
        serving.feature_config,
        golden=GOLDEN_WEIGHTED,
    )


def test_cpu_sparse_lookup_with_non_sparse_weights(serving):
    features, weights = serving.sparse(), serving.dense(weights=True)
    match = "but it does not match type of the input which is"
    with pytest.raises(ValueError, match=match):
        je.embedding_lookup(features, weights, serving.tables, serving.feature_config)
    with pytest.raises(ValueError, match=match):
        tf_lookup(features, weights, serving.tables, serving.feature_config)


def test_cpu_ragged_lookup_with_weights(serving):
    _lookup_and_check(
        serving.ragged(),
        serving.ragged(weights=True),
        serving.tables,
        serving.feature_config,
        golden=GOLDEN_WEIGHTED,
    )


def test_cpu_partial_structure_for_features(serving):
    features = serving.sparse()[:2]
    got = _lookup_and_check(
        features, None, serving.tables, serving.feature_config, golden=GOLDEN_SPARSE[:2]
    )
    assert isinstance(got, tuple) and len(got) == 2


def test_cpu_invalid_structure_for_features(serving):
    # One input more than there are feature configs.
    features = serving.sparse() + serving.sparse()[:1]
    with pytest.raises(ValueError, match="Inputs are not a subset of feature_config"):
        je.embedding_lookup(features, None, serving.tables, serving.feature_config)
    with pytest.raises(ValueError, match="Inputs are not a subset of feature_config"):
        tf_lookup(features, None, serving.tables, serving.feature_config)


def test_cpu_invalid_structure_for_weights(serving):
    features = serving.sparse()
    weights = serving.dense(weights=True)[:2]
    with pytest.raises(ValueError):
        je.embedding_lookup(features, weights, serving.tables, serving.feature_config)
    with pytest.raises(ValueError):
        tf_lookup(features, weights, serving.tables, serving.feature_config)


def _friends_only(serving, **kwargs):
    return (je.FeatureConfig(serving.table_user, name="friends", **kwargs),)


def test_cpu_sequence_lookup_sparse(serving):
    fc = _friends_only(serving, max_sequence_length=2)
    got = _lookup_and_check(
        serving.sparse()[2:3], None, serving.tables, fc, golden=(GOLDEN_FRIENDS_SEQ2,)
    )
    assert np.asarray(got[0]).shape == (4, 2, 2)


def test_cpu_sequence_lookup_ragged(serving):
    fc = _friends_only(serving, max_sequence_length=2)
    got = _lookup_and_check(
        serving.ragged()[2:3], None, serving.tables, fc, golden=(GOLDEN_FRIENDS_SEQ2,)
    )
    assert np.asarray(got[0]).shape == (4, 2, 2)


def test_cpu_high_dimensional_lookup_ragged(serving):
    fc = _friends_only(serving, output_shape=[2, 2])
    got = _lookup_and_check(
        serving.ragged()[2:3], None, serving.tables, fc, golden=(GOLDEN_FRIENDS_SHAPE_2_2,)
    )
    assert np.asarray(got[0]).shape == (2, 2, 2)


def test_cpu_high_dimensional_sequence_lookup_ragged(serving):
    fc = _friends_only(serving, output_shape=[2, 4])
    got = _lookup_and_check(
        serving.ragged()[2:3], None, serving.tables, fc, golden=(GOLDEN_FRIENDS_SHAPE_2_4,)
    )
    assert np.asarray(got[0]).shape == (2, 4, 2)


def test_cpu_high_dimensional_invalid_lookup_ragged(serving):
    fc = _friends_only(serving, output_shape=[3])
    match = "Output shape set in the FeatureConfig should be the factor"
    with pytest.raises(ValueError, match=match):
        je.embedding_lookup(serving.ragged()[2:3], None, serving.tables, fc)
    with pytest.raises(ValueError, match=match):
        tf_lookup(serving.ragged()[2:3], None, serving.tables, fc)


def _config_state(table: je.TableConfig, feature: je.FeatureConfig) -> tuple:
    return (
        table.vocabulary_size,
        table.dim,
        table.initializer,
        table.optimizer,
        table.combiner,
        table.name,
        feature.table,
        feature.max_sequence_length,
        feature.validate_weights_and_indices,
        feature.output_shape,
        feature.name,
    )


def test_cpu_no_optimizer(serving):
    # TF's test checks TPUEmbeddingForServing creates no slots for optimizer=None. Our intent:
    # lookups never write an optimizer (or a name) into configs built with optimizer=None.
    table = je.TableConfig(8, 4, optimizer=None, combiner="sum")
    fc = (je.FeatureConfig(table, name="watched", max_sequence_length=2),)
    before = _config_state(table, fc[0])
    tables = {table: serving.tables[serving.table_video]}
    _lookup_and_check(serving.sparse()[:1], None, tables, fc)
    _lookup_and_check(serving.ragged()[:1], None, tables, fc)
    assert table.optimizer is None and table.name is None
    assert _config_state(table, fc[0]) == before


def test_cpu_multiple_creation(serving):
    # Two feature-config structures sharing the same TableConfig both work, independently.
    fc_one = _friends_only(serving, max_sequence_length=2)
    fc_two = _friends_only(serving, max_sequence_length=2)
    assert fc_one[0].table is fc_two[0].table
    before = _config_state(serving.table_user, fc_one[0])
    one = _lookup_and_check(serving.sparse()[2:3], None, serving.tables, fc_one)
    two = _lookup_and_check(serving.sparse()[2:3], None, serving.tables, fc_two)
    np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(two[0]))
    assert _config_state(serving.table_user, fc_one[0]) == before


# --------------------------------------------------------------------------------------------
# Edge-case matrix, tf_semantics.md section 4.6 (compared with TF, not with hard-coded values)
# --------------------------------------------------------------------------------------------

EDGE_TABLE = np.arange(32, dtype=np.float32).reshape(8, 4)
EDGE_IDS = ([1, 2], [], [3], [])  # rows 1 and 3 empty; row 3 is a trailing empty row
EDGE_WEIGHTS = {
    "none": None,
    "positive": ([2.0, 0.5], [], [3.0], []),
    "nonpositive": ([2.0, -1.0], [], [0.0], []),
}


def _edge_inputs(kind: str, rows) -> je.Sparse | je.Ragged:
    values = [v for row in rows for v in row]
    if kind == "ragged":
        return je.Ragged.from_row_lengths(values, [len(r) for r in rows])
    indices = [[i, j] for i, row in enumerate(rows) for j in range(len(row))]
    return je.Sparse(np.asarray(indices, np.int64).reshape(-1, 2), values, [len(rows), 2])


def _edge_case(kind, combiner, weights_name, ids=EDGE_IDS):
    table = je.TableConfig(8, 4, combiner=combiner, name="edge")
    fc = {"f": je.FeatureConfig(table, validate_weights_and_indices=kind != "sparse_unsafe")}
    src = "ragged" if kind == "ragged" else "sparse"
    inputs = {"f": _edge_inputs(src, [np.asarray(r, np.int32) for r in ids])}
    w = EDGE_WEIGHTS[weights_name]
    weights = (
        None if w is None else {"f": _edge_inputs(src, [np.asarray(r, np.float32) for r in w])}
    )
    return inputs, weights, {table: EDGE_TABLE}, fc


@pytest.mark.parametrize(
    "kind, combiner, weights_name",
    list(
        itertools.product(
            ["sparse_safe", "sparse_unsafe", "ragged"],
            ["sum", "mean", "sqrtn"],
            ["none", "positive", "nonpositive"],
        )
    ),
)
def test_edge_case_matrix(kind, combiner, weights_name):
    inputs, weights, tables, fc = _edge_case(kind, combiner, weights_name)
    got = je.embedding_lookup(inputs, weights, tables, fc)
    want = tf_lookup(inputs, weights, tables, fc)
    if kind == "sparse_unsafe":
        # Pitfall P3: TF drops the trailing empty row; our documented fix keeps all 4 rows.
        assert want["f"].shape == (3, 4)
    assert np.asarray(got["f"]).shape == (4, 4)
    assert_matches_tf(got, want, inputs, weights, tables, fc)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_edge_case_negative_id_is_pruned_by_safe_sparse(combiner):
    # Row 0 holds ids [1, -1]; row 2 holds only -1 and so becomes empty (zero).
    ids = ([1, -1], [], [-1], [])
    inputs, weights, tables, fc = _edge_case("sparse_safe", combiner, "none", ids=ids)
    got = je.embedding_lookup(inputs, weights, tables, fc)
    want = tf_lookup(inputs, weights, tables, fc)
    assert_matches_tf(got, want, inputs, weights, tables, fc)


@pytest.mark.parametrize("kind", ["sparse_unsafe", "ragged"])
def test_edge_case_negative_id_raises(kind):
    ids = ([1, -1], [], [3], [])
    inputs, weights, tables, fc = _edge_case(kind, "sum", "none", ids=ids)
    with pytest.raises(ValueError, match=r"-1"):
        je.embedding_lookup(inputs, weights, tables, fc)
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf_lookup_raw(to_tf_inputs(inputs), to_tf_weights(weights), tables, fc)


@pytest.mark.parametrize("kind", ["sparse_safe", "sparse_unsafe", "ragged"])
def test_edge_case_id_out_of_range_raises(kind):
    ids = ([1, 8], [], [3], [])
    inputs, weights, tables, fc = _edge_case(kind, "sum", "none", ids=ids)
    with pytest.raises(ValueError, match=r"\b8\b"):
        je.embedding_lookup(inputs, weights, tables, fc)
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf_lookup_raw(to_tf_inputs(inputs), to_tf_weights(weights), tables, fc)
