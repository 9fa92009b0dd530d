"""Tests for the id inputs ``je.Sparse`` (like tf.SparseTensor) and ``je.Ragged`` (rank-2
tf.RaggedTensor): construction from lists / numpy / jax arrays, pytree behaviour, and the errors
for malformed inputs. Float values are accepted here (they can be weights); rejecting float ids
belongs to the lookup tests.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed as je

ARRAY_KINDS = {"list": lambda x: x, "numpy": np.asarray, "jax": jnp.asarray}


def _seq_pattern(seq) -> str:
    """Regex for a sequence of ints printed as a list, a tuple or a numpy array."""
    return r"[\[(]\s*" + r",?\s*".join(str(int(v)) for v in seq) + r",?\s*[\])]"


# --- Sparse: construction ----------------------------------------------------------------------

INDICES = [[0, 0], [1, 0], [1, 1], [3, 2]]
IDS = [5, 0, 7, 2]
SHAPE = [4, 3]


@pytest.mark.parametrize("kind", ARRAY_KINDS)
def test_sparse_stores_numpy_arrays_and_int_shape(kind):
    to = ARRAY_KINDS[kind]
    s = je.Sparse(to(INDICES), to(IDS), to(SHAPE))
    assert type(s.indices) is np.ndarray and type(s.values) is np.ndarray
    np.testing.assert_array_equal(s.indices, INDICES)
    np.testing.assert_array_equal(s.values, IDS)
    assert s.indices.dtype.kind in "iu" and s.values.dtype.kind in "iu"
    assert s.dense_shape == (4, 3) and isinstance(s.dense_shape, tuple)
    assert all(type(d) is int for d in s.dense_shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_accepts_float_weights(dtype):
    s = je.Sparse(INDICES, np.asarray([0.5, 1.0, 2.0, 0.0], dtype), SHAPE)
    assert s.values.dtype.kind == "f"
    np.testing.assert_array_equal(s.values, [0.5, 1.0, 2.0, 0.0])


@pytest.mark.parametrize(
    "indices, shape",
    [
        (np.zeros((0, 2), np.int64), [3, 2]),
        (np.zeros((0, 2), np.int64), [0, 2]),
        ([[0, 1, 2]], [1, 2, 3]),
    ],
    ids=["empty", "zero_rows", "rank3"],
)
def test_sparse_accepts_empty_and_higher_rank(indices, shape):
    values = np.arange(len(indices), dtype=np.int32)
    s = je.Sparse(indices, values, shape)
    assert s.dense_shape == tuple(shape) and s.indices.shape == (len(values), len(shape))


def test_sparse_pytree_leaves_and_round_trip():
    s = je.Sparse(INDICES, IDS, SHAPE)
    leaves, treedef = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 2
    np.testing.assert_array_equal(leaves[0], INDICES)
    np.testing.assert_array_equal(leaves[1], IDS)
    back = jax.tree_util.tree_map(lambda x: x, s)
    assert isinstance(back, je.Sparse) and back.dense_shape == s.dense_shape
    np.testing.assert_array_equal(back.indices, s.indices)
    np.testing.assert_array_equal(back.values, s.values)
    # dense_shape is static: it is part of the treedef, not a leaf.
    other = je.Sparse(INDICES, IDS, [4, 5])
    assert jax.tree_util.tree_structure(other) != treedef


def test_sparse_unflatten_does_not_validate():
    treedef = jax.tree_util.tree_structure(je.Sparse(INDICES, IDS, SHAPE))
    for leaves in ([None, None], [object(), "not an array"], [np.zeros(3), np.zeros((2, 2))]):
        jax.tree_util.tree_unflatten(treedef, leaves)


def test_sparse_passes_through_jit():
    s = je.Sparse(INDICES, IDS, SHAPE)
    total, rows = jax.jit(lambda s: (s.values.sum(), s.dense_shape[0]))(s)
    assert int(total) == sum(IDS) and rows == SHAPE[0]


# --- Sparse: errors ----------------------------------------------------------------------------

SPARSE_VALUE_ERRORS = [
    # (id, indices, values, dense_shape, regexes the message must match)
    ("indices_1d", [0, 1, 2], [1, 2, 3], [3], ["indices"]),
    ("indices_3d", np.zeros((2, 1, 2), np.int64), [1, 2], [3, 3], ["indices"]),
    ("nnz_mismatch", [[0, 0], [1, 0]], [1], [2, 2], ["indices|values", "2", "1"]),
    ("rank_mismatch", [[0, 0], [1, 0]], [1, 2], [2, 2, 2], ["dense_shape|rank", "3"]),
    ("index_too_big", [[0, 0], [1, 7]], [1, 2], [2, 5], ["7", _seq_pattern([2, 5])]),
    ("row_too_big", [[0, 0], [2, 1]], [1, 2], [2, 5], [_seq_pattern([2, 1]), _seq_pattern([2, 5])]),
    ("negative_index", [[0, 0], [1, -1]], [1, 2], [2, 5], ["-1", _seq_pattern([2, 5])]),
    ("negative_shape", [[0, 0]], [1], [2, -1], ["dense_shape", "-1"]),
    (
        "duplicate",
        [[0, 1], [1, 0], [0, 1]],
        [1, 2, 3],
        [2, 2],
        ["(?i)duplicate", _seq_pattern([0, 1])],
    ),
    ("rank0_shape", np.zeros((1, 0), np.int64), [5], [], ["dense_shape|rank"]),
]


@pytest.mark.parametrize(
    "indices, values, shape, patterns",
    [case[1:] for case in SPARSE_VALUE_ERRORS],
    ids=[case[0] for case in SPARSE_VALUE_ERRORS],
)
def test_sparse_malformed_raises_value_error(indices, values, shape, patterns):
    with pytest.raises(ValueError) as info:
        je.Sparse(indices, values, shape)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


@pytest.mark.parametrize(
    "indices, values, arg",
    [
        (np.asarray([[0.0, 0.0], [1.0, 0.0]]), [1, 2], "indices"),
        ([[0, 0], [1, 0]], np.asarray([True, False]), "values"),
        ([[0, 0], [1, 0]], np.asarray([object(), object()], dtype=object), "values"),
        ([[0, 0], [1, 0]], np.asarray(["a", b"b"], dtype=object), "values"),
    ],
    ids=["float_indices", "bool_values", "object_values", "mixed_raw_ids"],
)
def test_sparse_wrong_dtype_raises_type_error(indices, values, arg):
    with pytest.raises(TypeError, match=arg):
        je.Sparse(indices, values, [2, 2])


# --- Ragged: construction ----------------------------------------------------------------------

VALUES = [3, 1, 4, 1, 5, 9]
ROW_SPLITS = [0, 2, 2, 5, 6]
ROW_LENGTHS = [2, 0, 3, 1]


@pytest.mark.parametrize("kind", ARRAY_KINDS)
def test_ragged_stores_numpy_arrays(kind):
    to = ARRAY_KINDS[kind]
    r = je.Ragged(to(VALUES), to(ROW_SPLITS))
    assert type(r.values) is np.ndarray and type(r.row_splits) is np.ndarray
    np.testing.assert_array_equal(r.values, VALUES)
    np.testing.assert_array_equal(r.row_splits, ROW_SPLITS)
    assert r.nrows == 4 and type(r.nrows) is int
    assert type(r.row_lengths()) is np.ndarray
    np.testing.assert_array_equal(r.row_lengths(), ROW_LENGTHS)


@pytest.mark.parametrize("kind", ARRAY_KINDS)
def test_ragged_from_row_lengths_matches_tf(kind):
    tf = pytest.importorskip("tensorflow")
    to = ARRAY_KINDS[kind]
    r = je.Ragged.from_row_lengths(to(VALUES), to(ROW_LENGTHS))
    expected = tf.RaggedTensor.from_row_lengths(VALUES, ROW_LENGTHS)
    assert isinstance(r, je.Ragged)
    np.testing.assert_array_equal(r.values, expected.values.numpy())
    np.testing.assert_array_equal(r.row_splits, expected.row_splits.numpy())
    assert r.nrows == int(expected.nrows())
    np.testing.assert_array_equal(r.row_lengths(), expected.row_lengths().numpy())


def test_ragged_accepts_float_weights_and_empty():
    r = je.Ragged(np.asarray([0.5, 2.0], np.float32), [0, 0, 2])
    assert r.values.dtype.kind == "f" and r.nrows == 2
    empty = je.Ragged(np.zeros(0, np.int32), [0])
    assert empty.nrows == 0 and empty.row_lengths().shape == (0,)


def test_ragged_pytree_leaves_and_round_trip():
    r = je.Ragged(VALUES, ROW_SPLITS)
    leaves, treedef = jax.tree_util.tree_flatten(r)
    assert len(leaves) == 2
    np.testing.assert_array_equal(leaves[0], VALUES)
    np.testing.assert_array_equal(leaves[1], ROW_SPLITS)
    back = jax.tree_util.tree_map(lambda x: x, r)
    assert isinstance(back, je.Ragged)
    np.testing.assert_array_equal(back.values, r.values)
    np.testing.assert_array_equal(back.row_splits, r.row_splits)
    for leaves in ([None, None], [object(), "not an array"], [np.zeros((2, 2)), np.ones(3)]):
        jax.tree_util.tree_unflatten(treedef, leaves)


def test_ragged_passes_through_jit():
    r = je.Ragged(VALUES, ROW_SPLITS)
    total, last = jax.jit(lambda r: (r.values.sum(), r.row_splits[-1]))(r)
    assert int(total) == sum(VALUES) and int(last) == len(VALUES)


# --- Ragged: errors ----------------------------------------------------------------------------

RAGGED_VALUE_ERRORS = [
    # (id, values, row_splits, regexes the message must match); TF rejects the same splits.
    ("splits_not_from_0", [1, 2, 3], [1, 3], ["row_splits", "1"]),
    ("splits_decreasing", [1, 2, 3, 4], [0, 3, 2, 4], ["row_splits"]),
    ("splits_end_mismatch", [1, 2, 3], [0, 1, 5], ["row_splits|values", "5", "3"]),
]


@pytest.mark.parametrize(
    "values, splits, patterns",
    [case[1:] for case in RAGGED_VALUE_ERRORS],
    ids=[case[0] for case in RAGGED_VALUE_ERRORS],
)
def test_ragged_malformed_splits_raise_value_error(values, splits, patterns):
    tf = pytest.importorskip("tensorflow")
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        tf.RaggedTensor.from_row_splits(values, splits)
    with pytest.raises(ValueError) as info:
        je.Ragged(values, splits)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_ragged_rejects_non_1d_values():
    with pytest.raises(ValueError, match="values") as info:
        je.Ragged([[1, 2], [3, 4]], [0, 1, 2])
    assert re.search(_seq_pattern([2, 2]), str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "values, lengths, patterns",
    [([1, 2, 3], [2, -1, 2], ["length", "-1"]), ([1, 2, 3, 4], [1, 2], ["length", "3", "4"])],
    ids=["negative", "sum_mismatch"],
)
def test_ragged_from_bad_row_lengths_raises_value_error(values, lengths, patterns):
    tf = pytest.importorskip("tensorflow")
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        tf.RaggedTensor.from_row_lengths(values, lengths)
    with pytest.raises(ValueError) as info:
        je.Ragged.from_row_lengths(values, lengths)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


@pytest.mark.parametrize(
    "values, splits, arg",
    [
        ([1, 2, 3], np.asarray([0.0, 1.0, 3.0]), "row_splits"),
        (np.asarray([True, False]), [0, 2], "values"),
        (np.asarray([1, "b"], dtype=object), [0, 2], "values"),
    ],
    ids=["float_splits", "bool_values", "mixed_values"],
)
def test_ragged_wrong_dtype_raises_type_error(values, splits, arg):
    with pytest.raises(TypeError, match=arg):
        je.Ragged(values, splits)


@pytest.mark.parametrize(
    "values",
    [["a", "é"], np.asarray([b"a", b""]), np.asarray(["x", "y"], dtype=object)],
    ids=["str", "bytes", "object"],
)
def test_raw_ids_are_kept_for_a_vocabulary(values):
    """String values are raw ids (mapped by the feature's vocabulary, tests/test_raw_ids.py)."""
    ragged = je.Ragged.from_row_lengths(values, [1, 1])
    sparse = je.Sparse([[0, 0], [1, 0]], values, [2, 1])
    assert ragged.values.tolist() == sparse.values.tolist() == np.asarray(values).tolist()
