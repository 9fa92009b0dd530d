"""Checksums of array pytrees, independent of sharding and device count.

Each array's bit patterns (as uint32 words) are hashed with their row-major position and summed
in two 32-bit lanes, so the sum is exact in any order: it is computed where the arrays live
(``jit`` over sharded arrays, nothing gathered) or with numpy for small local arrays, and gives
the same 16-digit hex string on any mesh. ``jaxembed.checkpoint`` stores one per saved leaf and
verifies it at restore.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CHECKSUM_ALGORITHM = "fmix32x2/1"
_CHECKSUM_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def leaf_name(path: Sequence[Any]) -> str:
    """A pytree key path as ``a/b/0`` (dict keys, sequence indices, attribute names)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


_HOST_CHECKSUM_MAX_SIZE = 1 << 22
"""Arrays of up to this many elements that this process holds whole are checksummed with numpy
(nothing to compile); larger ones, and those spread over processes, with jnp under jit."""

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}


def _fmix32(h: Any, xp: Any) -> Any:
    """MurmurHash3's 32-bit finalizer (numpy or jnp): a bijection that spreads every bit."""
    h = h ^ (h >> 16)
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _lanes(words: Any, index: Any, xp: Any) -> list:
    """Two uint32 lanes: ``sum_i fmix(word_i + fmix(i ^ seed))`` mod 2**32.

    ``i`` is the word's row-major position, so the sum does not depend on how the array is
    sharded (integer sums are exact in any order): a checkpoint's checksums are the same on any
    device count, and computing them needs no gather. Each term is a bijection of the word, so
    any change to one element changes both lanes; random damage goes unnoticed with
    probability about 2**-64.
    """
    return [
        xp.sum(_fmix32(words + _fmix32(index ^ xp.uint32(seed), xp), xp), dtype=xp.uint32)
        for seed in _CHECKSUM_SEEDS
    ]


def _checksum(x: jax.Array) -> jax.Array:
    """``_lanes`` of ``x``'s bit patterns with jnp (traced: runs where ``x`` is sharded)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    words = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)
    if words.ndim == 0:  # (8-byte elements got a trailing axis of their 2 words)
        words = words.reshape(1)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.stack(_lanes(words, index, jnp))


@jax.jit
def _checksum_many(leaves: list) -> jax.Array:
    return jnp.stack([_checksum(x) for x in leaves])


def _checksum_host(x: Any) -> np.ndarray:
    """``_checksum`` with numpy, bit for bit the same, for a small array held here."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    words = x.reshape(-1).view(_UNSIGNED[x.dtype.itemsize]).astype(np.uint32)
    index = np.arange(words.size, dtype=np.uint32)
    return np.stack(_lanes(words, index, np))


def _summable(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "shape"):
        return False
    dtype = np.dtype(dtype)
    return dtype.itemsize in (1, 2, 4, 8) and (
        dtype == np.bool_
        or jnp.issubdtype(dtype, jnp.integer)
        or jnp.issubdtype(dtype, jnp.floating)
    )


def _on_host(leaf: Any) -> bool:
    """Whether ``leaf`` is checksummed with numpy: small, and whole in this process."""
    whole = not isinstance(leaf, jax.Array) or leaf.is_fully_addressable
    return whole and int(np.size(leaf)) <= _HOST_CHECKSUM_MAX_SIZE


def _device_key(leaf: Any) -> tuple:
    if isinstance(leaf, jax.Array):
        return tuple(sorted(str(d) for d in leaf.sharding.device_set))
    return ()


def checksums(tree: Any) -> dict[str, dict]:
    """``{leaf path: {"checksum", "shape", "dtype"}}`` for the array leaves of ``tree``.

    Large arrays are summed with ``jnp`` under ``jit`` where they live (sharded arrays stay
    sharded, nothing is gathered to one host; in a multi-process run every process must call
    this, as for any computation on global arrays), small ones with numpy; both give the same
    16-digit hex string, which does not depend on the sharding or the device count.
    """
    sums: dict[str, np.ndarray] = {}
    leaves: dict[str, Any] = {}
    groups: dict[tuple, list[str]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not _summable(leaf):
            continue
        name = leaf_name(path)
        leaves[name] = leaf
        if _on_host(leaf):
            sums[name] = _checksum_host(np.asarray(leaf))
        else:
            groups.setdefault(_device_key(leaf), []).append(name)
    for names in groups.values():
        lanes = _checksum_many([leaves[n] for n in names])
        host = np.asarray(lanes.addressable_data(0))  # replicated: any local copy
        sums.update(zip(names, host, strict=True))
    return {
        name: {
            "checksum": f"{int(sums[name][0]):08x}{int(sums[name][1]):08x}",
            "shape": list(np.shape(leaf)),
            "dtype": str(np.dtype(leaf.dtype)),
        }
        for name, leaf in leaves.items()
    }


__all__ = ["CHECKSUM_ALGORITHM", "checksums", "leaf_name"]
