"""The distinct keys of a batch and each key's index among them: ``np.unique(keys,
return_inverse=True)``, computed in C++ when jaxembed is built with its compiled helpers
(``csrc/distinct.cc``: the keys marked in a bitmap over their range, read back in order; O(n +
range / 64), where ``np.unique`` sorts), else by ``np.unique``. Both give the same arrays.

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
    return _native.load(_LIBRARY, "jaxembed_distinct")


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
