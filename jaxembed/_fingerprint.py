"""FarmHash ``Fingerprint64`` and vocabulary lookups over numpy arrays, in C++
(``csrc/fingerprint.cc``, compiled with the CPU kernels when jaxembed is installed).

The hash TF's ``tf.strings.to_hash_bucket_fast`` and ``tf.lookup.StaticVocabularyTable`` use:
strings are hashed as their bytes (``str`` as UTF-8), int64 ids as their decimal text
(``tf.strings.as_string``). One call maps a whole array, split over the process's CPUs.

Example:
    >>> import numpy as np
    >>> from jaxembed import _fingerprint
    >>> h = _fingerprint.hash_buckets(np.array(["a", "b"]))
    >>> h.dtype, h.shape
    (dtype('uint64'), (2,))
"""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np

from jaxembed import _native

_LIBRARY = "_farmhash"
_KINDS = {"S": 0, "U": 1, "i": 2}


@functools.cache
def _library() -> ctypes.CDLL:
    lib = _native.load(_LIBRARY, "jaxembed_hash_buckets", "jaxembed_vocab_lookup")
    if lib is not None:
        return lib
    raise RuntimeError(
        "Raw ids need jaxembed's compiled hashing library (jaxembed/_farmhash*.so), which is "
        "built when jaxembed is installed with a C++ compiler on the PATH; reinstall with g++ "
        "available (pip install -e .)."
    )


def _threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def _ptr(a: np.ndarray | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if a is None else a.ctypes.data)


def _keys(keys: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(contiguous keys, kind, width in elements) for the C++ side."""
    if keys.dtype.kind not in _KINDS or keys.dtype.kind == "i" and keys.dtype != np.int64:
        raise TypeError(f"Cannot hash keys of dtype {keys.dtype}: give str, bytes or int64.")
    flat = np.ascontiguousarray(keys).reshape(-1)
    width = keys.dtype.itemsize // 4 if keys.dtype.kind == "U" else keys.dtype.itemsize
    return flat, _KINDS[keys.dtype.kind], width


def _check(flat: np.ndarray, bad: int) -> None:
    if bad >= 0:
        raise ValueError(
            f"Key {flat[bad]!r} has no UTF-8 encoding (a lone surrogate); give such keys as bytes."
        )


def hash_buckets(keys: np.ndarray, num_bins: int = 0) -> np.ndarray:
    """``Fingerprint64(key) mod num_bins`` of every key (``num_bins=0``: the fingerprint), as
    ``uint64`` of ``keys``' shape.

    Args:
        keys: numpy ``S`` (bytes), ``U`` (str, hashed as UTF-8) or int64 (hashed as decimal
            text) array. Fixed-width strings end at their last non-NUL character, as numpy
            reads them.

    Raises:
        ValueError: a ``str`` key holds a lone surrogate, which has no UTF-8 encoding.
        TypeError: another dtype.
    """
    flat, kind, width = _keys(keys)
    out = np.empty(flat.shape, np.uint64)
    bad = _library().jaxembed_hash_buckets(
        kind, _ptr(flat), ctypes.c_int64(flat.size), ctypes.c_int64(width),
        ctypes.c_uint64(num_bins), _threads(), _ptr(out),
    )  # fmt: skip
    _check(flat, bad)
    return out.reshape(keys.shape)


class VocabularyIndex:
    """A hash index of unique keys (``S`` bytes or int64), for ``StaticVocabularyTable``
    lookups: ``lookup(ids, num_oov)`` gives ``keys.index(id)``, else
    ``len(keys) + Fingerprint64(id) mod num_oov``."""

    def __init__(self, keys: np.ndarray):
        lib = _library()
        self.size = keys.size
        self.strings = keys.dtype.kind == "S"
        self.int_keys = None if self.strings else np.ascontiguousarray(keys, np.int64)
        if self.strings:
            lengths = np.char.str_len(keys).astype(np.int64)
            self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            raw = np.ascontiguousarray(keys).view(np.uint8).reshape(keys.size, -1)
            mask = np.arange(raw.shape[1]) < lengths[:, None]
            self.blob = np.ascontiguousarray(raw[mask])
            self.hashes = hash_buckets(keys)
        else:
            self.offsets = self.blob = self.hashes = None  # type: ignore[assignment]
        capacity = 1 << max(4, (2 * keys.size - 1).bit_length())
        self.mask = capacity - 1
        self.slots = np.zeros(2 * capacity, np.uint64)
        lib.jaxembed_vocab_slots(
            _ptr(self.hashes), _ptr(self.int_keys), ctypes.c_int64(self.size),
            ctypes.c_uint64(self.mask), _ptr(self.slots),
        )  # fmt: skip

    def lookup(self, ids: np.ndarray, num_oov: int) -> np.ndarray:
        """The int64 row of every id (``S``/``U`` for string keys, int64 for int keys)."""
        flat, kind, width = _keys(ids)
        out = np.empty(flat.shape, np.int64)
        bad = _library().jaxembed_vocab_lookup(
            kind, _ptr(flat), ctypes.c_int64(flat.size), ctypes.c_int64(width),
            _ptr(self.blob), _ptr(self.offsets), ctypes.c_int64(self.size), _ptr(self.slots),
            ctypes.c_uint64(self.mask), ctypes.c_uint64(num_oov), _threads(), _ptr(out),
        )  # fmt: skip
        _check(flat, bad)
        return out.reshape(ids.shape)
