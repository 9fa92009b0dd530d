"""Id inputs: sparse COO (``Sparse``) and ragged rank-2 (``Ragged``) tensors.

A plain integer array is a dense input. ``Sparse`` and ``Ragged`` carry ids (integer values, or
raw str/bytes ids for features with a vocabulary: ``jaxembed.vocabulary``) or,
in the weights structure, per-id weights (float values) with the same layout. Both are JAX pytrees
whose leaves are the arrays; ``Sparse.dense_shape`` is static. Construction validates the layout
on the host (numpy) and raises a clear error for malformed data; ``jax.tree_util`` rebuilding
skips validation, since it may hold tracers or placeholders.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def is_traced(x: Any) -> bool:
    """True for values only known inside a JAX transformation."""
    return isinstance(x, jax.core.Tracer)


def _as_host(name: str, x: Any, strings: bool = False) -> np.ndarray:
    """``x`` as a numpy array; with ``strings``, object arrays of ``str`` or of ``bytes`` (raw
    ids, for features with a vocabulary) are kept as they are."""
    if is_traced(x):
        return x
    arr = np.asarray(x)
    if arr.dtype == object:
        kinds = set(map(type, arr.reshape(-1)))
        if not (strings and len(kinds) == 1 and kinds <= {str, bytes}):
            kind = "a numeric array, or raw ids (all str or all bytes)" if strings else "numeric"
            raise TypeError(f"{name} must be {kind}, got {x!r}.")
    return arr


def _check_index_dtype(name: str, arr: np.ndarray) -> None:
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}.")


def _check_value_dtype(name: str, arr: np.ndarray) -> None:
    if arr.dtype.kind in "SUO":  # raw ids: checked by the feature's vocabulary
        return
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise TypeError(
            f"{name} must hold integer ids, raw ids (str or bytes, for a feature with a "
            f"vocabulary) or floating weights, got dtype {arr.dtype}."
        )


@jax.tree_util.register_pytree_node_class
class Sparse:
    """A COO sparse tensor of ids or weights, like ``tf.SparseTensor``.

    Shapes: N = number of stored entries, R = rank.

    Args:
        indices: ``[N, R]`` integer positions, unique, each inside ``dense_shape``. Entries of one
            row are used in the order given (canonical row-major order is the usual one).
        values: ``[N]`` integer ids, or float weights when used in the weights structure.
        dense_shape: ``R`` non-negative ints; ``dense_shape[0]`` is the batch size.

    Raises:
        ValueError: Malformed layout (shape mismatch, index outside ``dense_shape``, duplicates).
        TypeError: Non-integer indices, or values that are neither integer nor float.

    Example:
        >>> import jaxembed as je
        >>> ids = je.Sparse(indices=[[0, 0], [0, 1], [2, 0]], values=[3, 7, 1], dense_shape=[3, 2])
        >>> ids.dense_shape
        (3, 2)
    """

    __slots__ = ("indices", "values", "dense_shape")

    def __init__(self, indices: Any, values: Any, dense_shape: Any):
        self.indices = _as_host("Sparse indices", indices)
        self.values = _as_host("Sparse values", values, strings=True)
        try:
            self.dense_shape = tuple(int(d) for d in np.asarray(dense_shape).reshape(-1))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"Sparse dense_shape must be a sequence of ints, got {dense_shape!r}."
            ) from e
        if not (is_traced(self.indices) or is_traced(self.values)):
            self._validate()

    def _validate(self) -> None:
        shape, idx, vals = self.dense_shape, self.indices, self.values
        if len(shape) < 1 or min(shape) < 0:
            raise ValueError(
                f"Sparse dense_shape must have rank >= 1 and no negative sizes, got {shape}."
            )
        if idx.size == 0:
            idx = idx.reshape(0, len(shape)).astype(np.int64)
            self.indices = idx
        _check_index_dtype("Sparse indices", idx)
        _check_value_dtype("Sparse values", vals)
        if idx.ndim != 2 or idx.shape[1] != len(shape):
            raise ValueError(
                f"Sparse indices must have shape [N, {len(shape)}] for dense_shape {shape}, got "
                f"{idx.shape}."
            )
        if vals.ndim != 1 or vals.shape[0] != idx.shape[0]:
            raise ValueError(
                f"Sparse values must have shape [{idx.shape[0]}] (one per index), got {vals.shape}."
            )
        bad = np.nonzero(((idx < 0) | (idx >= np.asarray(shape))).any(axis=1))[0]
        if bad.size:
            raise ValueError(
                f"Sparse index {idx[bad[0]].tolist()} (entry {bad[0]}) is outside dense_shape "
                f"{shape}; every index must satisfy 0 <= index < dense_shape."
            )
        if idx.shape[0] > 1:
            order = np.lexsort(idx.T[::-1])
            s = idx[order]
            dup = np.nonzero((s[1:] == s[:-1]).all(axis=1))[0]
            if dup.size:
                raise ValueError(
                    f"Sparse index {s[dup[0]].tolist()} appears more than once; indices must be "
                    "unique (sum duplicate weights, or give each repeated id its own column)."
                )

    def tree_flatten(self):
        return (self.indices, self.values), self.dense_shape

    @classmethod
    def tree_unflatten(cls, dense_shape, children):
        obj = object.__new__(cls)
        obj.indices, obj.values = children
        obj.dense_shape = dense_shape
        return obj

    def __repr__(self) -> str:
        return (
            f"Sparse(indices={self.indices!r}, values={self.values!r}, "
            f"dense_shape={self.dense_shape})"
        )


@jax.tree_util.register_pytree_node_class
class Ragged:
    """A rank-2 ragged tensor of ids or weights, like ``tf.RaggedTensor``.

    Row ``i`` holds ``values[row_splits[i]:row_splits[i + 1]]``.

    Shapes: N = number of values, B = number of rows.

    Args:
        values: ``[N]`` integer ids, or float weights when used in the weights structure.
        row_splits: ``[B + 1]`` non-decreasing integers, starting at 0 and ending at N.

    Raises:
        ValueError: Malformed layout (values not 1-D, bad row_splits).
        TypeError: Non-integer row_splits, or values that are neither integer nor float.

    Example:
        >>> import jaxembed as je
        >>> ids = je.Ragged.from_row_lengths(values=[3, 7, 1], lengths=[2, 0, 1])
        >>> ids.row_splits.tolist(), ids.nrows
        ([0, 2, 2, 3], 3)
    """

    __slots__ = ("values", "row_splits")

    def __init__(self, values: Any, row_splits: Any):
        self.values = _as_host("Ragged values", values, strings=True)
        self.row_splits = _as_host("Ragged row_splits", row_splits)
        if not (is_traced(self.values) or is_traced(self.row_splits)):
            self._validate()

    @classmethod
    def from_row_lengths(cls, values: Any, lengths: Any) -> Ragged:
        """Builds a ``Ragged`` from per-row lengths (``[B]`` non-negative ints summing to N)."""
        lengths = np.asarray(lengths)
        _check_index_dtype("Ragged row lengths", lengths)
        if lengths.ndim != 1:
            raise ValueError(f"Ragged row lengths must be 1-D, got shape {lengths.shape}.")
        if lengths.size and lengths.min() < 0:
            raise ValueError(
                f"Ragged row lengths must be >= 0, got {int(lengths.min())} at row "
                f"{int(np.argmin(lengths))}."
            )
        n = np.asarray(values).reshape(-1).shape[0] if np.ndim(values) == 1 else None
        if n is not None and int(lengths.sum()) != n:
            raise ValueError(
                f"Ragged row lengths sum to {int(lengths.sum())} but there are {n} values; "
                "they must match."
            )
        return cls(values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    @property
    def nrows(self) -> int:
        """Number of rows (the batch size)."""
        return int(self.row_splits.shape[0]) - 1

    def row_lengths(self) -> np.ndarray:
        """``[B]`` number of values in each row."""
        return np.diff(np.asarray(self.row_splits))

    def _validate(self) -> None:
        vals, splits = self.values, self.row_splits
        _check_value_dtype("Ragged values", vals)
        _check_index_dtype("Ragged row_splits", splits)
        if vals.ndim != 1:
            raise ValueError(
                f"Ragged values must be 1-D (only rank-2 ragged tensors are supported), got "
                f"shape {vals.shape}."
            )
        if splits.ndim != 1 or splits.shape[0] < 1:
            raise ValueError(
                f"Ragged row_splits must be 1-D with at least one entry, got shape {splits.shape}."
            )
        if splits[0] != 0:
            raise ValueError(f"Ragged row_splits must start at 0, got {int(splits[0])}.")
        dec = np.nonzero(np.diff(splits) < 0)[0]
        if dec.size:
            i = int(dec[0])
            raise ValueError(
                f"Ragged row_splits must be non-decreasing, but row_splits[{i}]={int(splits[i])} > "
                f"row_splits[{i + 1}]={int(splits[i + 1])}."
            )
        if splits[-1] != vals.shape[0]:
            raise ValueError(
                f"Ragged row_splits must end at len(values)={vals.shape[0]}, got {int(splits[-1])}."
            )

    def tree_flatten(self):
        return (self.values, self.row_splits), None

    @classmethod
    def tree_unflatten(cls, _, children):
        obj = object.__new__(cls)
        obj.values, obj.row_splits = children
        return obj

    def __repr__(self) -> str:
        return f"Ragged(values={self.values!r}, row_splits={self.row_splits!r})"
