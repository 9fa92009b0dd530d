"""Tests for ``je.TableConfig`` and ``je.FeatureConfig``.

The reference is TF's ``tf.tpu.experimental.embedding`` (tf_semantics.md sections 1, 2 and 7.2):
where TF validates the same argument, the bad value must be rejected by both libraries. jaxembed is
stricter than TF in a few places (bools, non-str names) and differs on purpose in others (frozen,
never mutated, jax initializer convention); those cases are tested against the design contract.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# TensorFlow is resolved on first use: the tests that need no TF run without it.
from tf_reference import tf
from tf_reference import tf_embedding as tf_emb

import jaxembed as je


def _raises_value_error_naming(fn, arg: str, value=None):
    """``fn()`` raises ValueError whose message names ``arg`` (and ``str(value)`` if given)."""
    with pytest.raises(ValueError, match=arg) as info:
        fn()
    if value is not None:
        assert str(value) in str(info.value)


# --- TableConfig: validation -------------------------------------------------------------------

BAD_SIZES = [0, -1, 8.0, "8", None]  # also rejected by TF


@pytest.mark.parametrize("bad", BAD_SIZES, ids=repr)
@pytest.mark.parametrize("arg", ["vocabulary_size", "dim"])
def test_table_rejects_bad_sizes_like_tf(arg, bad):
    kwargs = {"vocabulary_size": 8, "dim": 4, arg: bad}
    with pytest.raises(ValueError):
        tf_emb.TableConfig(**kwargs)
    with pytest.raises(ValueError, match=f"`{arg}`") as info:
        je.TableConfig(**kwargs)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("bad", [True, False], ids=repr)
@pytest.mark.parametrize("arg", ["vocabulary_size", "dim"])
def test_table_rejects_bools(arg, bad):
    # TF accepts True (bool is an int subclass); jaxembed is stricter.
    kwargs = {"vocabulary_size": 8, "dim": 4, arg: bad}
    with pytest.raises(ValueError, match=f"`{arg}`") as info:
        je.TableConfig(**kwargs)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("int_type", [np.int32, np.int64, np.uint8])
def test_table_accepts_numpy_integer_sizes(int_type):
    table = je.TableConfig(int_type(6), int_type(3))
    assert table.vocabulary_size == 6 and table.dim == 3
    weights = table.initializer_fn(jax.random.key(0), (6, 3), jnp.float32)
    assert weights.shape == (6, 3)


@pytest.mark.parametrize("bad", ["max", "MEAN", "", None, 1], ids=repr)
def test_table_rejects_bad_combiner_like_tf(bad):
    with pytest.raises(ValueError):
        tf_emb.TableConfig(8, 4, combiner=bad)
    _raises_value_error_naming(lambda: je.TableConfig(8, 4, combiner=bad), "combiner", bad)


@pytest.mark.parametrize("combiner", ["mean", "sum", "sqrtn"])
def test_table_accepts_tf_combiners(combiner):
    assert je.TableConfig(8, 4, combiner=combiner).combiner == combiner


@pytest.mark.parametrize("bad", [1, "x", 0.5], ids=repr)
def test_table_rejects_non_callable_initializer_like_tf(bad):
    with pytest.raises(ValueError):
        tf_emb.TableConfig(8, 4, initializer=bad)
    _raises_value_error_naming(lambda: je.TableConfig(8, 4, initializer=bad), "initializer")


@pytest.mark.parametrize("bad", [1, b"table"], ids=repr)
def test_table_rejects_non_str_name(bad):
    _raises_value_error_naming(lambda: je.TableConfig(8, 4, name=bad), "name")


def test_table_defaults_match_tf():
    ours, theirs = je.TableConfig(8, 4), tf_emb.TableConfig(8, 4)
    for attr in ("vocabulary_size", "dim", "optimizer", "combiner", "name", "quantization_config"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.initializer is None


# --- TableConfig: identity, immutability, ordering ---------------------------------------------


def test_table_is_frozen():
    table = je.TableConfig(8, 4, name="t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.dim = 2


def test_table_equality_and_hash_by_identity():
    a, b = je.TableConfig(8, 4, name="t"), je.TableConfig(8, 4, name="t")
    assert a == a and a != b
    assert len({a: 1, b: 2}) == 2
    assert {a: 1, b: 2}[b] == 2


def test_tables_are_sortable():
    tables = [je.TableConfig(8, 4, name=n) for n in ("b", None, "a", "a")]
    tables.append(je.TableConfig(3, 2))
    for order in (tables, tables[::-1]):
        ordered = sorted(order)
        assert len(ordered) == len(tables) and {id(t) for t in ordered} == {id(t) for t in tables}
    assert isinstance(tables[0] < tables[1], bool)


def test_table_keyed_dict_is_a_jax_pytree():
    # jax sorts dict keys when flattening; jit must accept {TableConfig: array} arguments.
    tables = [je.TableConfig(8, 4, name="b"), je.TableConfig(8, 4, name="a"), je.TableConfig(8, 4)]
    params = {t: jnp.full((8, 4), float(i)) for i, t in enumerate(tables)}
    doubled = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: 2 * x, p))(params)
    assert set(doubled) == set(params)
    for i, t in enumerate(tables):
        np.testing.assert_array_equal(doubled[t], np.full((8, 4), 2.0 * i))


# --- TableConfig: initializer ------------------------------------------------------------------


def test_user_initializer_is_used_as_given():
    init = jax.nn.initializers.constant(3.0)
    table = je.TableConfig(5, 2, initializer=init)
    assert table.initializer is init and table.initializer_fn is init
    np.testing.assert_array_equal(
        table.initializer_fn(jax.random.key(0), (5, 2), jnp.float32), np.full((5, 2), 3.0)
    )


def _truncated_normal_std_factor(cut: float = 2.0) -> float:
    """Std of a standard normal truncated to [-cut, cut] (about 0.88 for cut=2)."""
    pdf = math.exp(-cut * cut / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(cut / math.sqrt(2))
    return math.sqrt(1 - 2 * cut * pdf / mass)


@pytest.mark.parametrize("dim", [16, 5])
def test_default_initializer_is_tf_truncated_normal(dim):
    vocab = 20000
    table = je.TableConfig(vocab, dim)
    w = np.asarray(table.initializer_fn(jax.random.key(0), (vocab, dim), jnp.float32))
    assert w.shape == (vocab, dim) and w.dtype == np.float32
    stddev = 1 / math.sqrt(dim)
    assert np.abs(w).max() <= 2 * stddev * (1 + 1e-6)
    assert w.std() == pytest.approx(_truncated_normal_std_factor() * stddev, rel=0.02)
    assert abs(w.mean()) < 5 * stddev / math.sqrt(w.size)
    # TF's own default (TruncatedNormal(0, 1/sqrt(dim))) has the same spread and bound.
    tf_w = tf_emb.TableConfig(vocab, dim).initializer((vocab, dim), dtype=tf.float32).numpy()
    assert w.std() == pytest.approx(tf_w.std(), rel=0.02)
    assert np.abs(tf_w).max() <= 2 * stddev * (1 + 1e-6)


def test_default_initializer_depends_only_on_key():
    table = je.TableConfig(64, 8)
    init = table.initializer_fn
    a, b = (init(jax.random.key(1), (64, 8), jnp.float32) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, init(jax.random.key(2), (64, 8), jnp.float32))


# --- FeatureConfig: validation -----------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, "table", 1], ids=repr)
def test_feature_rejects_non_table_like_tf(bad):
    with pytest.raises(ValueError):
        tf_emb.FeatureConfig(bad)
    _raises_value_error_naming(lambda: je.FeatureConfig(bad), "table")


def test_feature_rejects_tf_table_config():
    _raises_value_error_naming(lambda: je.FeatureConfig(tf_emb.TableConfig(8, 4)), "table")


@pytest.mark.parametrize(
    "arg, bad, tf_rejects",
    [
        ("max_sequence_length", 2.0, True),
        ("max_sequence_length", -1, True),
        ("max_sequence_length", "1", True),
        ("max_sequence_length", None, True),
        ("max_sequence_length", True, False),  # TF accepts it, jaxembed is stricter
        ("validate_weights_and_indices", 1, True),
        ("validate_weights_and_indices", 0, True),
        ("validate_weights_and_indices", "True", True),
        ("validate_weights_and_indices", None, True),
        ("output_shape", [-1], True),
        ("output_shape", -1, True),
        ("output_shape", [2, -3], True),
        ("output_shape", [2.5], False),  # TF raises TypeError here
        ("output_shape", ["2"], False),
        ("output_shape", 2.0, False),
        ("name", 1, False),
    ],
    ids=lambda v: repr(v) if not isinstance(v, bool) else None,
)
def test_feature_rejects_bad_arguments(arg, bad, tf_rejects):
    if tf_rejects:
        with pytest.raises(ValueError):
            tf_emb.FeatureConfig(tf_emb.TableConfig(8, 4), **{arg: bad})
    table = je.TableConfig(8, 4)
    _raises_value_error_naming(lambda: je.FeatureConfig(table, **{arg: bad}), arg)


@pytest.mark.parametrize(
    "given, stored",
    [
        (None, None),
        (3, (3,)),
        ([2, 2], (2, 2)),
        ((16, 4), (16, 4)),
        ([], ()),
        ([2, None], (2, None)),
    ],
    ids=repr,
)
def test_feature_output_shape_is_stored_as_tuple_like_tf(given, stored):
    feature = je.FeatureConfig(je.TableConfig(8, 4), output_shape=given)
    assert feature.output_shape == stored
    tf_shape = tf_emb.FeatureConfig(tf_emb.TableConfig(8, 4), output_shape=given).output_shape
    if stored is None:
        assert tf_shape.rank is None
    else:
        assert isinstance(feature.output_shape, tuple)
        assert feature.output_shape == tuple(tf_shape.as_list())


def test_feature_defaults_match_tf():
    ours = je.FeatureConfig(je.TableConfig(8, 4))
    theirs = tf_emb.FeatureConfig(tf_emb.TableConfig(8, 4))
    for attr in ("max_sequence_length", "validate_weights_and_indices", "name"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.output_shape is None


def test_feature_is_frozen_and_compares_by_identity():
    table = je.TableConfig(8, 4)
    a, b = je.FeatureConfig(table, name="f"), je.FeatureConfig(table, name="f")
    assert a.table is table and b.table is table
    assert a == a and a != b and len({a, b}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.max_sequence_length = 3


# --- repr (TF's test_table_config_repr / test_feature_config_repr) -----------------------------


def _tf_repr_in_our_format(obj) -> str:
    text = repr(obj).replace(", quantization_config=None", "")
    return text.replace("TensorShape([16, 4])", "(16, 4)")


def test_table_config_repr():
    table = je.TableConfig(2, 4, combiner="sum", name="table")
    expected = (
        "TableConfig(vocabulary_size=2, dim=4, initializer=None, optimizer=None, "
        "combiner='sum', name='table')"
    )
    assert repr(table) == expected
    assert repr(table) == _tf_repr_in_our_format(
        tf_emb.TableConfig(2, 4, combiner="sum", name="table")
    )


def test_feature_config_repr():
    table = je.TableConfig(2, 4, combiner="sum", name="table")
    feature = je.FeatureConfig(table, output_shape=[16, 4], name="feature")
    expected = (
        f"FeatureConfig(table={table!r}, max_sequence_length=0, "
        "validate_weights_and_indices=True, output_shape=(16, 4), name='feature')"
    )
    assert repr(feature) == expected
    tf_table = tf_emb.TableConfig(2, 4, combiner="sum", name="table")
    tf_feature = tf_emb.FeatureConfig(tf_table, output_shape=[16, 4], name="feature")
    assert repr(feature) == _tf_repr_in_our_format(tf_feature)
    no_shape = je.FeatureConfig(table)
    assert "output_shape=None, name=None)" in repr(no_shape)


# --- configs are never mutated (TF writes names and optimizers into them) ----------------------


def test_lookup_does_not_mutate_configs():
    tables = (je.TableConfig(8, 4, combiner="sum"), je.TableConfig(16, 2))
    features = (
        je.FeatureConfig(tables[0]),
        je.FeatureConfig(tables[1], max_sequence_length=2),
    )
    before = [repr(c) for c in tables + features]
    params = {t: jnp.ones((t.vocabulary_size, t.dim)) for t in tables}
    inputs = (
        je.Sparse([[0, 0], [1, 0], [1, 1]], [1, 2, 3], [2, 2]),
        je.Ragged.from_row_lengths([4, 5, 6], [1, 2]),
    )
    je.embedding_lookup(inputs, None, params, features)
    assert [repr(c) for c in tables + features] == before
    assert all(t.name is None and t.optimizer is None for t in tables)
    assert all(f.name is None for f in features)
