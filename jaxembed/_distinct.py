"""The distinct keys of a batch and each key's index among them: ``np.unique(keys,
return_inverse=True)``, computed in C++ when jaxembed is built with its compiled helpers
(``csrc/distinct.cc``: the keys marked in a bitmap over their range, read back in order; O(n +
range / 64), where ``np.unique`` sorts), else by ``np.unique``. Both give the same arrays.
Beside it, ``transpose``: the counting sort of ``lookup.transpose_slots`` in C++.

Example:
    >>> import numpy as np
    >>> from jaxembed._distinct import distinct
    >>> keys, inverse = distinct(np.array([7, 3, 7, 9]))
    >>> keys.tolist(), inverse.tolist()
    ([3, 7, 9], [1, 0, 1, 2])
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from jaxembed import _native

_LIBRARY = "_distinct_keys"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled helper, or None (jaxembed was installed without a C++ compiler)."""
    return _native.load(_LIBRARY, "jaxembed_distinct", "jaxembed_transpose")


def distinct(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted distinct keys, index of each key among them)`` of int64 ``keys`` (flattened).

    The bitmap is used when the keys are non-negative and span at most ``max(2**22, 256 n)``
    values (a table's rows, for a batch of ``n`` ids); otherwise, and without the compiled
    helper, ``np.unique`` sorts.
    """
    flat = np.ascontiguousarray(keys, np.int64).reshape(-1)
    lib = library()
    if lib is not None and flat.size:
        out, inverse = np.empty_like(flat), np.empty_like(flat)
        count = lib.jaxembed_distinct(
            ctypes.c_void_p(flat.ctypes.data), ctypes.c_int64(flat.size),
            ctypes.c_int64(max(1 << 16, 4 * flat.size)),
            ctypes.c_void_p(out.ctypes.data), ctypes.c_void_p(inverse.ctypes.data),
        )  # fmt: skip
        if count >= 0:
            return out[:count], inverse
    return np.unique(flat, return_inverse=True)


def transpose(
    slots: np.ndarray, weights: np.ndarray | None, num_rows: int, blocks: int
) -> tuple[int, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None, np.ndarray] | None:
    """``lookup.transpose_slots``' arrays in one C++ pass: ``(blocks used, first, first_w,
    rest, rest_w, rest_rows)``, the arrays unwritten past their counts when more blocks are
    used than ``blocks``; None without the compiled helper."""
    lib = library()
    if lib is None:
        return None
    slots = np.ascontiguousarray(slots, np.int32)
    rows = slots.shape[0]
    width = slots.size // rows if rows else 1
    first, rest = np.empty(num_rows, np.int32), np.empty((blocks, 8), np.int32)
    rest_rows = np.empty(blocks, np.int32)
    first_w = rest_w = None
    if weights is not None:
        weights = np.ascontiguousarray(weights, np.float32)
        first_w, rest_w = np.empty(num_rows, np.float32), np.empty((blocks, 8), np.float32)

    def ptr(x: np.ndarray | None) -> ctypes.c_void_p:
        return ctypes.c_void_p(None if x is None else x.ctypes.data)

    used = lib.jaxembed_transpose(
        ptr(slots), ctypes.c_int64(rows), ctypes.c_int64(width), ptr(weights),
        ctypes.c_int64(num_rows), ctypes.c_int64(blocks), ptr(first), ptr(first_w), ptr(rest),
        ptr(rest_w), ptr(rest_rows),
    )  # fmt: skip
    return int(used), first, first_w, rest, rest_w, rest_rows
