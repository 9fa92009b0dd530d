"""Lookup errors (tf_semantics.md sections 4.1-4.5) and our documented deviations from TF.

Every error test checks the exception type and that the message names the feature path and the
offending value. Where TF rejects the same input, TF is run too: with the same ``ValueError``
where TF raises one, otherwise with the error TF raises (e.g. ``InvalidArgumentError`` for a bad
id, which we turn into a ``ValueError`` naming the feature).

The feature under test sits at the nested path ``ctx/clicks`` so that the path in a message is
unambiguous.
"""

from __future__ import annotations

import re

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

V, DIM = 8, 4
PATH = "ctx/clicks"
TABLE = je.TableConfig(V, DIM, combiner="sum", name="video")
TABLES = {TABLE: np.arange(V * DIM, dtype=np.float32).reshape(V, DIM)}
RANGE = re.escape(f"[0, {V})")


def tf_id_error() -> type:
    """TF's error for bad ids (resolving it skips the test where TF is absent)."""
    return tf.errors.InvalidArgumentError


def nested(x):
    """Puts a leaf (input, weight or feature config) at PATH."""
    return {"ctx": {"clicks": x}}


def config(**kwargs) -> dict:
    return nested(je.FeatureConfig(TABLE, name="clicks", **kwargs))


# Row-major rows of ids; row 1 is empty.
ROWS = ([1, 2, 2], [], [3])


def sparse(rows=ROWS, dtype=np.int32, width=None) -> je.Sparse:
    indices = [[i, j] for i, row in enumerate(rows) for j in range(len(row))]
    width = width or max(1, max(len(r) for r in rows))
    values = np.asarray([v for row in rows for v in row], dtype)
    return je.Sparse(np.asarray(indices, np.int64).reshape(-1, 2), values, [len(rows), width])


def sparse_rank3(rows=ROWS, dtype=np.int32) -> je.Sparse:
    """The rows laid out as a [1, len(rows), width] rank-3 sparse tensor."""
    s = sparse(rows, dtype)
    indices = np.concatenate([np.zeros((len(s.values), 1), np.int64), s.indices], axis=1)
    return je.Sparse(indices, s.values, [1, *s.dense_shape])


def ragged(rows=ROWS, dtype=np.int32) -> je.Ragged:
    values = np.asarray([v for row in rows for v in row], dtype)
    return je.Ragged.from_row_lengths(values, [len(r) for r in rows])


def je_raises(exc, inputs, weights, fc, *patterns, tables=TABLES) -> str:
    """Asserts jaxembed raises ``exc`` with a message matching every regex in ``patterns``."""
    with pytest.raises(exc) as info:
        je.embedding_lookup(inputs, weights, tables, fc)
    msg = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, msg), f"{pattern!r} not found in message: {msg!r}"
    return msg


def tf_raises(exc, inputs, weights, fc, *, tables=TABLES, input_dtype=np.int64, weight_dtype=None):
    """Asserts TF raises ``exc`` on the TF twins (dtypes kept unless given)."""
    tf_inputs = to_tf_inputs(inputs, input_dtype)
    tf_weights = to_tf_weights(weights, weight_dtype or np.float32)
    with pytest.raises(exc):
        tf_lookup_raw(tf_inputs, tf_weights, tables, fc)


P = re.escape(PATH)


# --------------------------------------------------------------------------------------------
# Section 4.1: structure and weight checks (TF raises the same ValueError)
# --------------------------------------------------------------------------------------------


def test_weights_on_dense_input():
    inputs, weights = nested(np.array([1, 2], np.int32)), nested(np.array([1.0, 2.0], np.float32))
    je_raises(
        ValueError, inputs, weights, config(), f"Weight specified for {P}, but input is dense"
    )
    tf_raises(ValueError, inputs, weights, config())


@pytest.mark.parametrize(
    "inp, weight, names",
    [
        (sparse(), ragged(dtype=np.float32), ("Sparse", "Ragged")),
        (ragged(), sparse(dtype=np.float32), ("Ragged", "Sparse")),
        (sparse(), np.ones(4, np.float32), ("Sparse",)),
        (ragged(), np.ones(4, np.float32), ("Ragged",)),
    ],
    ids=["sparse-ragged", "ragged-sparse", "sparse-dense", "ragged-dense"],
)
def test_weight_kind_differs_from_input_kind(inp, weight, names):
    inputs, weights = nested(inp), nested(weight)
    je_raises(ValueError, inputs, weights, config(), P, "does not match type of the input", *names)
    tf_raises(ValueError, inputs, weights, config())


@pytest.mark.parametrize(
    "make, kwargs",
    [
        (sparse, {"max_sequence_length": 2}),
        (ragged, {"max_sequence_length": 2}),
        (ragged, {"max_sequence_length": 2, "output_shape": (3,)}),
        (sparse, {"max_sequence_length": 2, "output_shape": (3,)}),
    ],
    ids=["sparse", "ragged", "ragged-output_shape", "sparse-output_shape"],
)
def test_weights_for_sequence_feature(make, kwargs):
    inputs, weights = nested(make()), nested(make(dtype=np.float32))
    fc = config(**kwargs)
    je_raises(ValueError, inputs, weights, fc, f"{P}, but this is a sequence feature")
    tf_raises(ValueError, inputs, weights, fc)


def test_dense_input_for_sequence_feature():
    inputs, fc = nested(np.array([1, 2], np.int32)), config(max_sequence_length=2)
    je_raises(
        ValueError, inputs, None, fc, f"{P} is a sequence feature but a dense tensor was passed"
    )
    tf_raises(ValueError, inputs, None, fc)


def test_inputs_not_a_subset_of_feature_config_tuple():
    fc = tuple(je.FeatureConfig(TABLE) for _ in range(3))
    inputs = tuple(np.array([1], np.int32) for _ in range(4))
    je_raises(ValueError, inputs, None, fc, "Inputs are not a subset of feature_config", "3")
    tf_raises(ValueError, inputs, None, fc)


def test_inputs_not_a_subset_of_feature_config_dict():
    inputs = {"ctx": {"clicks": np.array([1], np.int32), "bogus": np.array([2], np.int32)}}
    je_raises(
        ValueError, inputs, None, config(), "Inputs are not a subset of feature_config", "bogus"
    )
    tf_raises(ValueError, inputs, None, config())


def test_python_list_leaf_is_a_structure_not_an_input():
    # As in tf.nest, a list is a container: its items get the paths ctx/clicks/0, ctx/clicks/1.
    inputs = nested([1, 2])
    je_raises(ValueError, inputs, None, config(), "Inputs are not a subset of feature_config")
    tf_raises(ValueError, inputs, None, config())


@pytest.mark.parametrize("case", ["fewer", "other-keys"])
def test_weights_structure_differs_from_inputs(case):
    if case == "fewer":
        fc = tuple(je.FeatureConfig(TABLE) for _ in range(3))
        inputs = tuple(sparse() for _ in range(3))
        weights = tuple(sparse(dtype=np.float32) for _ in range(2))
    else:
        fc = {"a": je.FeatureConfig(TABLE), "b": je.FeatureConfig(TABLE)}
        inputs = {"a": sparse(), "b": sparse()}
        weights = {"a": sparse(dtype=np.float32), "c": sparse(dtype=np.float32)}
    je_raises(ValueError, inputs, weights, fc, "same nested structure")
    tf_raises(ValueError, inputs, weights, fc)


@pytest.mark.parametrize(
    "leaf, type_name",
    [("abc", "str"), (1.5, "float"), (object(), "object")],
    ids=["str", "float", "object"],
)
def test_unsupported_leaf_type(leaf, type_name):
    je_raises(ValueError, nested(leaf), None, config(), "expected", P, type_name)
    tf_raises(ValueError, nested(leaf), None, config())


# --------------------------------------------------------------------------------------------
# Section 4.5: ragged output_shape
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_shape", [(2,), (4,), (5, 2)], ids=str)
def test_ragged_output_shape_not_a_multiple_of_the_batch(output_shape):
    # The batch is 3: (2,) is smaller, (4,) and (5, 2) are not multiples.
    fc = config(output_shape=output_shape)
    je_raises(ValueError, nested(ragged()), None, fc, "should be the factor", P, r"\b3\b")
    tf_raises(ValueError, nested(ragged()), None, fc)


# --------------------------------------------------------------------------------------------
# Bad ids: we raise ValueError naming feature, id and range where TF raises InvalidArgumentError
# --------------------------------------------------------------------------------------------

ID_CASES = {
    # name: (make input from rows, feature config kwargs)
    "dense": (lambda rows: np.asarray(rows[0], np.int32), {}),
    "dense-2d": (lambda rows: np.asarray([rows[0], [0, 0, 0]], np.int64), {}),
    "sparse-safe": (sparse, {}),
    "sparse-unsafe": (sparse, {"validate_weights_and_indices": False}),
    "sparse-rank3": (sparse_rank3, {}),
    "sparse-sequence": (sparse, {"max_sequence_length": 3}),
    "ragged": (ragged, {}),
    "ragged-sequence": (ragged, {"max_sequence_length": 3}),
    "ragged-output_shape": (ragged, {"output_shape": (3,)}),
    "ragged-output_shape-sequence": (ragged, {"output_shape": (3, 3)}),
}


@pytest.mark.parametrize("case", list(ID_CASES))
def test_id_out_of_range(case):
    make, kwargs = ID_CASES[case]
    inputs, fc = nested(make(([1, 37, 2], [], [3]))), config(**kwargs)
    je_raises(ValueError, inputs, None, fc, P, r"\b37\b", RANGE)
    tf_raises(tf_id_error(), inputs, None, fc)


# Where TF does not prune negative ids (only the safe sparse path does).
NEGATIVE_ID_CASES = [
    "dense",
    "dense-2d",
    "sparse-unsafe",
    "sparse-sequence",
    "ragged",
    "ragged-sequence",
    "ragged-output_shape",
    "ragged-output_shape-sequence",
]


@pytest.mark.parametrize("case", NEGATIVE_ID_CASES)
def test_negative_id_raises(case):
    make, kwargs = ID_CASES[case]
    inputs, fc = nested(make(([1, -3, 2], [], [3]))), config(**kwargs)
    je_raises(ValueError, inputs, None, fc, P, r"-3\b", RANGE)
    tf_raises(tf_id_error(), inputs, None, fc)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize(
    "make, validate",
    [(sparse, True), (sparse_rank3, True), (sparse_rank3, False)],
    ids=["rank2", "rank3", "rank3-validate_false"],
)
def test_negative_sparse_ids_are_pruned_by_the_safe_path(make, validate, combiner):
    # The safe path (validate=True, or any rank > 2) drops negative ids; row 2 becomes empty.
    table = je.TableConfig(V, DIM, combiner=combiner, name="video")
    tables = {table: TABLES[TABLE]}
    fc = nested(je.FeatureConfig(table, validate_weights_and_indices=validate))
    rows = ([1, -3, 2], [], [-1])
    inputs = nested(make(rows))
    weights = nested(make(([0.5, 2.0, 1.5], [], [3.0]), dtype=np.float32))
    for w in (None, weights):
        got = je.embedding_lookup(inputs, w, tables, fc)
        want = tf_lookup(inputs, w, tables, fc)
        assert_matches_tf(got, want, inputs, w, tables, fc)


# --------------------------------------------------------------------------------------------
# Dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda r, d: np.asarray(r[0], d), sparse, ragged], ids=["dense", "sparse", "ragged"]
)
def test_float_ids(make):
    inputs = nested(make(ROWS, np.float32))
    je_raises(TypeError, inputs, None, config(), P, "float32")
    tf_raises((tf_id_error(), ValueError, TypeError), inputs, None, config(), input_dtype=None)


@pytest.mark.parametrize("make", [sparse, ragged], ids=["sparse", "ragged"])
def test_integer_weights(make):
    inputs, weights = nested(make()), nested(make(dtype=np.int32))
    je_raises(TypeError, inputs, weights, config(), P, "int")
    tf_raises((tf_id_error(), ValueError), inputs, weights, config(), weight_dtype=np.int32)


# --------------------------------------------------------------------------------------------
# Weights whose layout differs from the ids' layout (TF ignores sparse weight indices)
# --------------------------------------------------------------------------------------------


def test_sparse_weight_indices_differ():
    ids = sparse()
    moved = np.array(ids.indices)
    moved[-1] = [2, 1]  # same number of entries, one in another column
    weights = je.Sparse(moved, np.ones(len(ids.values), np.float32), ids.dense_shape)
    je_raises(ValueError, nested(ids), nested(weights), config(), P)


def test_sparse_weight_count_differs():
    weights = sparse(([1, 2], [], [3]), dtype=np.float32)
    je_raises(ValueError, nested(sparse()), nested(weights), config(), P)


def test_ragged_weight_row_splits_differ():
    weights = ragged(([1, 2], [5], [3]), dtype=np.float32)  # same number of values
    je_raises(ValueError, nested(ragged()), nested(weights), config(), P)
    tf_raises(tf_id_error(), nested(ragged()), nested(weights), config())


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def test_table_missing_from_tables():
    other = je.TableConfig(V, DIM, combiner="sum", name="other_table")
    fc = nested(je.FeatureConfig(other))
    je_raises(ValueError, nested(sparse()), None, fc, "other_table")
    tf_raises(KeyError, nested(sparse()), None, fc)


def _shape_pattern(shape: tuple) -> str:
    inner = r",\s*".join(str(d) for d in shape) + (",?" if len(shape) == 1 else "")
    return r"[\(\[]" + inner + r"[\)\]]"


@pytest.mark.parametrize("bad_shape", [(V, DIM - 1), (V - 1, DIM), (V * DIM,)], ids=str)
def test_table_of_the_wrong_shape(bad_shape):
    tables = {TABLE: np.zeros(bad_shape, np.float32)}
    je_raises(
        ValueError,
        nested(sparse()),
        None,
        config(),
        "video",
        _shape_pattern((V, DIM)),
        _shape_pattern(bad_shape),
        tables=tables,
    )


def test_sparse_rank_1_input():
    inp = je.Sparse([[0], [2]], np.array([1, 2], np.int32), [4])
    je_raises(ValueError, nested(inp), None, config(), P, r"(?i)rank|1-?d|dimension")


# --------------------------------------------------------------------------------------------
# Documented deviations from TF: these work here
# --------------------------------------------------------------------------------------------


def test_numpy_dense_input_is_accepted():
    ids = np.array([[1, 2], [7, 0]], np.int64)
    with pytest.raises(ValueError, match="Tensor, SparseTensor or RaggedTensor expected"):
        tf_lookup_raw(nested(ids), None, TABLES, config())  # TF rejects a raw ndarray
    got = je.embedding_lookup(nested(ids), None, TABLES, config())
    want = tf_lookup(nested(ids), None, TABLES, config())  # TF given tf.constant(ids)
    assert_matches_tf(got, want, nested(ids), None, TABLES, config())


@pytest.mark.parametrize("make", [sparse, ragged], ids=["sparse", "ragged"])
@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_float64_weights_are_accepted_and_cast(make, combiner):
    table = je.TableConfig(V, DIM, combiner=combiner, name="video")
    tables, fc = {table: TABLES[TABLE]}, nested(je.FeatureConfig(table))
    inputs = nested(make())
    w32 = [[0.5, 1.25, 3.0], [], [0.1]]
    weights64 = nested(make(w32, dtype=np.float64))
    with pytest.raises((ValueError, tf_id_error())):
        tf_lookup_raw(to_tf_inputs(inputs), to_tf_weights(weights64, None), tables, fc)
    got = je.embedding_lookup(inputs, weights64, tables, fc)
    want = tf_lookup(inputs, nested(make(w32, dtype=np.float32)), tables, fc)
    assert_matches_tf(got, want, inputs, weights64, tables, fc)


def test_validate_false_keeps_trailing_empty_rows():
    rows = ([1, 2], [], [3], [], [])
    fc = config(validate_weights_and_indices=False)
    inputs = nested(sparse(rows))
    got = np.asarray(je.embedding_lookup(inputs, None, TABLES, fc)["ctx"]["clicks"])
    want = tf_lookup(inputs, None, TABLES, fc)["ctx"]["clicks"]
    assert want.shape == (3, DIM)  # TF: max(row) + 1 rows (pitfall P3)
    assert got.shape == (len(rows), DIM)
    np.testing.assert_array_equal(got[:3], want)
    np.testing.assert_array_equal(got[3:], 0)
