"""Row primitives: gathers, writes and TF-ordered slot sums, with CPU kernels where they help.

An embedding step is mostly row traffic: gather the touched rows, sum each example's slots,
scatter gradients back onto rows, write updated rows. XLA:CPU does these one 64-float row at a
time, well below memory speed. This module defines them as JAX primitives with two lowerings:

* on CPU, custom calls into ``csrc/cpu_kernels.cc`` (compiled into ``jaxembed/_cpu_kernels*.so``
  when the package is installed): whole-row copies, vectorised sums in TF's order, XLA's
  intra-op thread pool;
* everywhere else (TPU, GPU), and on CPU for dtypes the kernels do not cover, the pure-JAX
  functions below (``_take``, ``_slot_sums_jax``, ...), which give the same bits.

Each primitive is linear in its float operand and has JVP, transpose and batching rules, so
``jit``, ``grad``, ``jvp``/``jacfwd`` and ``vmap`` work on either lowering. The kernels are used
when the library loaded and ``JAXEMBED_CPU_KERNELS`` is not ``0``; ``status()`` says which, and
``use_kernels(False)`` switches them off in a scope (the pure-JAX functions are then called
directly, as on a machine without the library).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxembed import _native, _reads

_TARGETS = ("gather_rows", "scatter_rows", "combine", "combine_grad", "apply_rows", "apply_slots")
_LIBRARY = "_cpu_kernels"
_BLOCK = 8  # slots per tail block (TF's sparse_segment_* kernels)
_UNROLL = 64  # ordered sums up to this many slots are unrolled
_PER_TRIP = 8  # slot columns gathered per trip of the pure lookup's loop


# ---------------------------------------------------------------------------------------------
# Loading the CPU kernels.


@functools.cache
def _load() -> tuple[bool, str]:
    """Loads the library and registers its FFI targets, once per process: (ok, what happened)."""
    path = _native.library_path(_LIBRARY)
    if path is None:
        return False, (
            "the compiled CPU kernels are missing (was a C++ compiler available when jaxembed "
            "was installed?); reinstall with g++ on the PATH to get them"
        )
    try:
        library = ctypes.CDLL(str(path))
        for name in _TARGETS:
            capsule = jax.ffi.pycapsule(getattr(library, f"jaxembed_{name}"))
            jax.ffi.register_ffi_target(f"jaxembed_{name}", capsule, platform="cpu")
    except (OSError, AttributeError, RuntimeError, ValueError) as err:
        return False, f"loading {path.name} failed: {err}"
    return True, f"loaded {path.name}"


_enabled = os.environ.get("JAXEMBED_CPU_KERNELS", "1") != "0"


def enabled() -> bool:
    """Whether lookups and updates traced now use the CPU kernels when they run on CPU."""
    return _enabled and _load()[0]


def status() -> str:
    """One line: whether the CPU kernels are in use, and why (not).

    Public as ``jaxembed.cpu_kernels_status()``.

    Example:
        >>> import jaxembed
        >>> jaxembed.cpu_kernels_status().startswith("CPU kernels")
        True
    """
    if not _enabled:
        return "CPU kernels off (JAXEMBED_CPU_KERNELS=0 or use_kernels(False)): pure JAX"
    ok, why = _load()
    return f"CPU kernels on ({why})" if ok else f"CPU kernels off: {why}; pure JAX"


@contextlib.contextmanager
def use_kernels(on: bool) -> Iterator[None]:
    """Turns the CPU kernels on or off inside the ``with`` block (clears JAX's caches)."""
    global _enabled
    before = _enabled
    _enabled = on
    jax.clear_caches()
    try:
        yield
    finally:
        _enabled = before
        jax.clear_caches()


# ---------------------------------------------------------------------------------------------
# Pure-JAX implementations: the lowering off CPU, and the reference the kernels must equal.


def _as_index(ids: Any) -> jax.Array:
    ids = jnp.asarray(ids)
    return ids if ids.dtype in (jnp.int32, jnp.int64) else ids.astype(jnp.int32)


def _take(table: jax.Array, ids: jax.Array, width: int | None = None) -> jax.Array:
    """``table[ids]``, a zero row for ids outside ``[0, len(table))``.

    ``width``: the rows' width, where ``table`` stores them ``pack = table.shape[1] // width``
    to a row (``[R, stored]`` holds rows ``0 .. pack * R``, the rest of each stored row padding;
    see ``_stored_at``), read as ``width``-float windows of the stored rows. None: the table's
    own rows.
    """
    if width is not None and width != table.shape[1]:
        stored, window = _stored_at(ids, table.shape[0], table.shape[1] // width)
        got = _window(_stored_rows(table, stored), window, width)
        return jnp.where((stored < table.shape[0])[..., None], got, jnp.zeros((), got.dtype))
    rows = table.shape[0]
    if rows == 0:
        return jnp.zeros((*ids.shape, *table.shape[1:]), table.dtype)
    valid = (ids >= 0) & (ids < rows)
    return jnp.take(table, jnp.where(valid, ids, rows), axis=0, mode="fill", fill_value=0)


def _stored_at(ids: jax.Array, stored_rows: int, pack: int) -> tuple[jax.Array, jax.Array]:
    """``(stored row, window)`` of each row of a table that stores ``pack`` rows of ``dim``
    floats in each of its ``stored_rows`` rows: row ``i`` is window ``i mod pack`` (columns
    ``(i mod pack) * dim`` to ``+ dim``) of stored row ``i div pack`` (columns after the last
    window are padding). Ids outside the table point past its last stored row (a gather fills
    them with zeros, a scatter drops them).

    This is how a TPU mesh stores tables (``sharding.row_storage``): XLA lays out a
    ``[rows, 64]`` array on TPU column-major, and a step that reads rows would copy the whole
    table into row-major order and back each time. The rows are read and written as whole
    stored rows: TPUs gather and scatter those natively, where a window at a column computed at
    run time turns into a loop over the ids, one trip per row.
    """
    ids = jnp.asarray(ids)
    inside = (ids >= 0) & (ids < stored_rows * pack)
    safe = jnp.where(inside, ids, stored_rows * pack).astype(jnp.int32)
    return safe // pack, safe % pack


def _stored_rows(table: jax.Array, stored: jax.Array) -> jax.Array:
    """``table[stored]``, any row for a stored row past the table (the caller masks or drops
    it): a gather with no select after it, which a TPU would run as a pass of its own."""
    if table.shape[0] == 0:
        return jnp.zeros((*stored.shape, table.shape[1]), table.dtype)
    return jnp.take(table, stored, axis=0, mode="clip")


def _window(stored: jax.Array, window: jax.Array, width: int) -> jax.Array:
    """Window ``window`` (``width`` floats) of each of the ``stored`` rows, chosen by selects
    (elementwise, where viewing the stored rows as ``pack`` rows each would be a relayout on
    TPU)."""
    out = stored[..., :width]
    for k in range(1, stored.shape[-1] // width):
        out = jnp.where((window == k)[..., None], stored[..., k * width : (k + 1) * width], out)
    return out


def _add_at(cot: jax.Array, ids: jax.Array, num_rows: int) -> jax.Array:
    """``out[ids[i]] += cot[i]`` into ``num_rows`` zero rows; ids outside them are dropped."""
    out = jnp.zeros((num_rows, *cot.shape[ids.ndim :]), cot.dtype)
    valid = (ids >= 0) & (ids < num_rows)
    return out.at[jnp.where(valid, ids, num_rows)].add(cot, mode="drop")


def _set_at(table: jax.Array, ids: jax.Array, rows: jax.Array) -> jax.Array:
    """``table[ids[i]] = rows[i]`` for distinct ids; ids outside the table are dropped. A table
    wider than ``rows`` stores them as windows of its rows (``_take``'s ``width``)."""
    if _windowed(table, rows):
        return _scatter_windows(table, ids, rows, add=False)
    valid = (ids >= 0) & (ids < table.shape[0])
    idx = jnp.where(valid, ids, table.shape[0])
    return table.at[idx].set(rows.astype(table.dtype), mode="drop", unique_indices=True)


def _scatter_windows(table: jax.Array, ids: jax.Array, rows: jax.Array, add: bool):
    """Rows ``ids`` (``[U]``) of a packed ``table`` set to (or ``add``: added to) ``rows``
    (``[U, D]``) in place, as ``D``-float windows of whole stored rows (``_stored_at``); ids
    outside the table are dropped.

    ``add``: each row goes into its window of a stored row holding ``-0.0`` elsewhere (which
    adds nothing to any value, ``-0.0`` included), so ids may repeat. Otherwise ``ids`` are
    distinct and sorted, as the update's requests are (``_set_stored``).
    """
    stored, window = _stored_at(ids, table.shape[0], _pack_of(table, rows))
    rows = rows.astype(table.dtype)
    if add:
        empty = jnp.full((rows.shape[0], table.shape[1]), -0.0, table.dtype)
        at = jnp.arange(rows.shape[0], dtype=jnp.int32)
        return table.at[stored].add(_placed(empty, at, window, rows), mode="drop")
    return _set_stored(table, stored, window, _stored_rows(table, stored), rows)


def _placed(stored: jax.Array, at: jax.Array, window: jax.Array, rows: jax.Array) -> jax.Array:
    """``stored`` rows (``[U, C]``) with ``rows[i]`` in window ``window[i]`` of stored row
    ``at[i]``: a row scatter into the stored rows seen as ``pack`` rows each."""
    n, width = stored.shape[0], rows.shape[-1]
    pack = stored.shape[1] // width
    flat = stored[:, : pack * width].reshape(n * pack, width)
    flat = flat.at[at * pack + window].set(rows, mode="drop")
    return jnp.concatenate([flat.reshape(n, pack * width), stored[:, pack * width :]], axis=1)


def _set_stored(table, stored: jax.Array, window: jax.Array, old: jax.Array, rows: jax.Array):
    """``table`` with the ``stored`` rows (``old``: their values) holding ``rows`` in their
    ``window``s. ``stored`` is sorted, as the ids of sorted distinct ids are: the ids of one
    stored row are neighbours, and the first of them writes the stored row whole, with all of
    their windows."""
    if stored.shape[0] == 0:
        return table
    first = jnp.concatenate([jnp.ones(1, bool), stored[1:] != stored[:-1]])
    leader = jax.lax.cummax(jnp.where(first, jnp.arange(stored.shape[0], dtype=jnp.int32), 0))
    merged = _placed(old, leader, window, rows)
    return table.at[jnp.where(first, stored, table.shape[0])].set(merged, mode="drop")


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _ordered_sum(x: jax.Array, unroll: bool) -> jax.Array:
    """``x.sum(0)`` added strictly in order.

    Its derivative is declared as a plain ``sum`` of the tangents, whose transpose (the
    gradient) is a broadcast of the cotangent to every slice: the transposes XLA would otherwise
    build for the ordered sum cost far more than the sum itself (one padded copy per unrolled
    slice, or a reversed scan).
    """
    if unroll:
        acc = x[0]
        for j in range(1, x.shape[0]):
            acc = acc + x[j]
        return acc
    # Starting from 0 (as TF's segment sums do) keeps at least one loop trip for every row
    # length: XLA inlines a one-trip loop, and 0 + w * e is exact even as an FMA.
    acc, _ = jax.lax.scan(lambda a, v: (a + v, None), jnp.zeros(x.shape[1:], x.dtype), x)
    return acc


@_ordered_sum.defjvp
def _ordered_sum_jvp(unroll: bool, primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    (x,), (dx,) = primals, tangents
    return _ordered_sum(x, unroll), dx.sum(0)


def _sequential_sum(x: jax.Array, axis: int, weights: Any = None) -> jax.Array:
    """Sums ``x`` (times ``weights``, if given) along ``axis`` strictly left to right.

    Unweighted sums are unrolled: XLA keeps the order of float additions. Weighted sums run as a
    ``lax.scan`` over the precomputed products, because in an unrolled chain XLA:CPU fuses each
    ``w * e`` into its add as an FMA, which rounds differently from TF (TF rounds the product to
    float32 first).
    """
    if weights is not None:
        x = x * jnp.asarray(weights, x.dtype)[..., None]
    x = jnp.moveaxis(x, axis, 0)
    if x.shape[0] == 0:
        return jnp.zeros(x.shape[1:], x.dtype)
    return _ordered_sum(x, weights is None and x.shape[0] <= _UNROLL)


def _padded_at(rows: jax.Array, slots: Any) -> jax.Array:
    """``rows[slots]``, an all-zero row for slots outside ``[0, len(rows))``."""
    padded = jnp.concatenate([rows, jnp.zeros((1, rows.shape[1]), rows.dtype)])
    n = rows.shape[0]
    slots = jnp.asarray(slots)
    return padded[jnp.where((slots >= 0) & (slots < n), slots, n)]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _gathered_sum(rows: jax.Array, head: jax.Array, take: bool) -> jax.Array:
    """``rows[head]`` (``[R, H]`` slots, ``0 < H``; a slot outside ``rows`` reads zeros) summed
    along the slots strictly left to right, as the unrolled ``_sequential_sum`` adds them, in a
    loop of ``[R, D]`` gathers and adds, one per slot column: no ``[R, H, D]`` array of gathered
    rows (XLA:CPU runs these gathers several times faster).

    The derivative is that of ``_sequential_sum(rows[head], 1)`` (``take``: ``rows`` is a whole
    table, read through ``_take`` rather than a padded copy): the same transposes, one
    scatter-add of the broadcast cotangent with the slots in row-major order, so gradients keep
    their bits.
    """
    acc = _take(rows, head[:, 0])
    if head.shape[1] == 1:
        return acc
    # 8 slots a trip: XLA fuses their gathers into one pass (the sum is written every 8 slots).
    # Empty slots (zero rows, as padding already reads) fill the last trip: a partial trip
    # would be unrolled after the loop, each of its gathers written out as a [R, D] array.
    fill = -(head.shape[1] - 1) % _PER_TRIP
    head = jnp.pad(head, ((0, 0), (0, fill)), constant_values=-1)

    def body(j, acc):
        return acc + _take(rows, jax.lax.dynamic_index_in_dim(head, j, 1, keepdims=False))

    return jax.lax.fori_loop(1, head.shape[1], body, acc, unroll=_PER_TRIP)


@_gathered_sum.defjvp
def _gathered_sum_jvp(take: bool, primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    (rows, head), (drows, _) = primals, tangents
    gathered = _take(drows, head) if take else _padded_at(drows, head)
    return _gathered_sum(rows, head, take), jnp.moveaxis(gathered, 1, 0).sum(0)


def _slot_sums_jax(
    rows: jax.Array, head: Any, head_w: Any, blocks: Any, block_w: Any, take: bool = False
) -> jax.Array:
    """Per output row: head slots summed in order, then each block of 8 summed and added.

    A slot outside ``[0, len(rows))`` (the plans use ``len(rows)``) reads an all-zero row, and
    adding ``+0.0`` changes nothing. ``take``: ``rows`` is a whole table read through ``_take``
    (no padded copy of it).
    """

    def at(slots):
        return _take(rows, _as_index(slots)) if take else _padded_at(rows, slots)

    head = jnp.asarray(head)
    if head_w is None and head.ndim == 2 and 0 < head.shape[1] <= _UNROLL:
        acc = _gathered_sum(rows, _as_index(head), take)
    else:
        acc = _sequential_sum(at(head), 1, head_w)
    if blocks.shape[1]:
        block_sums = _sequential_sum(at(blocks), 2, block_w)
        acc = _sequential_sum(jnp.concatenate([acc[:, None], block_sums], axis=1), axis=1)
    return acc


def _slot_grads_jax(cot, head, head_w, blocks, block_w, num_rows: int) -> jax.Array:
    """The transpose of ``_slot_sums_jax``: ``grads[slot] += (w *) cot[row]``.

    One ``[R, D]`` scatter-add of the cotangent per slot column, in a loop (column by column,
    head then blocks, so a row's contributions are added slot-major): the cotangent is never
    broadcast to an ``[R, slots, D]`` array, which XLA would write and read back whole (about
    10x slower on CPU, and as many bytes moved as slots x batch x dim). Each trip reads its
    column from ``head`` or ``blocks`` as they are: no ``[slots, R]`` copy of them is made
    (two of them at batch 16,384, 5 MB that took the step's scratch memory over glibc's
    ``mmap`` threshold).
    """
    rows, dim = cot.shape

    def flat(x: Any, dtype: Any) -> jax.Array:  # [R, ...] -> [R, slots of the part]
        x = jnp.asarray(x, dtype)
        return x.reshape(rows, math.prod(x.shape[1:]))

    head, blocks = flat(head, jnp.int32), flat(blocks, jnp.int32)
    out = _reads.zeros_after([head, blocks], (num_rows, dim), cot.dtype)  # one buffer per table
    if head_w is not None:  # weighted (tail slots without weights add nothing, as in the kernel)
        head_w = flat(head_w, cot.dtype)
        block_w = (
            jnp.zeros(blocks.shape, cot.dtype) if block_w is None else flat(block_w, cot.dtype)
        )
    else:
        block_w = None
    out = _add_columns(out, cot, head, head_w)
    return _add_columns(out, cot, blocks, block_w)


def _add_columns(out: jax.Array, cot: jax.Array, slots: jax.Array, weights: Any) -> jax.Array:
    """``out[slots[r, s]] += (weights[r, s] *) cot[r]``, column ``s`` by column, in a loop;
    slots outside ``out`` are skipped."""
    num_rows = out.shape[0]

    def body(s, out):
        column = jax.lax.dynamic_index_in_dim(slots, s, axis=1, keepdims=False)
        column = jnp.where((column >= 0) & (column < num_rows), column, num_rows)
        update = cot
        if weights is not None:
            update = cot * jax.lax.dynamic_index_in_dim(weights, s, axis=1, keepdims=False)[:, None]
        return out.at[column].add(update, mode="drop")

    if slots.shape[1] == 0:
        return out
    return jax.lax.fori_loop(0, slots.shape[1], body, out)


_USE_BLOCKS = 2048  # blocks of further uses summed per trip of use_sums' loop


@dataclasses.dataclass(frozen=True)
class Uses:
    """The slots of a slot-cotangent part grouped by the row they hold (the part transposed,
    built on the host by ``lookup.transpose_slots``): a gradient row is then a sum of cotangent
    rows gathered for it, with no scatter-add per slot.

    Shapes: ``N`` = gradient rows, ``M`` = blocks of further uses; a cotangent row number equal
    to the part's row count (or beyond) means "no use" and reads zeros.

    Attributes:
        first: ``[N]`` the cotangent row of each gradient row's first use.
        first_weights: ``[N]`` its weight, or None (all 1).
        rest: ``[M, 8]`` the cotangent rows of the further uses, 8 to a block, each block
            holding uses of one gradient row.
        rest_weights: ``[M, 8]`` their weights, or None.
        rest_rows: ``[M]`` the gradient row of each block, sorted (``N``: padding).
    """

    first: Any
    first_weights: Any
    rest: Any
    rest_weights: Any
    rest_rows: Any


jax.tree_util.register_dataclass(
    Uses,
    data_fields=["first", "first_weights", "rest", "rest_weights", "rest_rows"],
    meta_fields=[],
)


def use_sums(cot: jax.Array, uses: Uses) -> jax.Array:
    """``[N, D]`` gradient rows: row ``p`` the sum of ``(w *) cot[r]`` over its uses (the first,
    then each block of 8 summed and added). The same sums as ``slot_grads`` on the part's slots,
    in another order (equal to float32 rounding).

    Each use reads its cotangent row once, and each block is added once: on workload W's train
    step 29 MB (row-aware, ``benchmarks/bench_accelerator.py``) where ``slot_grads``'
    scatter-add per slot column, which reads every column's whole cotangent and reads and
    writes a gradient row per slot, empty ones included, moves 135 MB with its zeroed buffer.

    Example:
        >>> import jax.numpy as jnp
        >>> cot = jnp.array([[1.0], [10.0], [100.0]])
        >>> rest = jnp.array([[1, 2, 3, 3, 3, 3, 3, 3]])  # row 0's further uses (3: none)
        >>> uses = Uses(jnp.array([0, 3, 2]), None, rest, None, jnp.array([0]))
        >>> use_sums(cot, uses)[:, 0].tolist()
        [111.0, 0.0, 100.0]
    """
    first, rest = _as_index(uses.first), _as_index(uses.rest)
    grads = _take(cot, first)
    if uses.first_weights is not None:
        grads = grads * jnp.asarray(uses.first_weights, cot.dtype)[:, None]
    if rest.shape[0] == 0:
        return grads
    rows = _as_index(uses.rest_rows)
    weights = None if uses.rest_weights is None else jnp.asarray(uses.rest_weights, cot.dtype)
    # Chunks of blocks in a loop, so the block sums stay small (scratch memory), each chunk's
    # summed column by column: XLA fuses the 8 gathers and their sum into one pass, with no
    # [M, 8, D] array of gathered rows.
    m = rest.shape[0]
    chunk = min(_USE_BLOCKS, m & -m)  # a power of two dividing M

    def body(c, grads):
        def take(x):
            return jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk)

        block, sums = take(rest), None
        for j in range(block.shape[1]):
            part = _take(cot, block[:, j])
            if weights is not None:
                part = part * take(weights)[:, j, None]
            sums = part if sums is None else sums + part
        return grads.at[take(rows)].add(sums, mode="drop", indices_are_sorted=True)

    return jax.lax.fori_loop(0, m // chunk, body, grads)


def gradients_in_kernel(platform: str) -> bool:
    """Whether a step traced now sums the slot gradients of a table in the CPU kernels on
    ``platform`` devices; otherwise the pure-JAX path sums them (``use_sums`` where the batch
    holds its plans' ``Uses``)."""
    return platform == "cpu" and enabled()


# ---------------------------------------------------------------------------------------------
# Kernel calls (CPU), in terms of the FFI targets.


def _ffi(name: str, out: jax.ShapeDtypeStruct, *args: jax.Array, **kw: Any) -> jax.Array:
    return jax.ffi.ffi_call(f"jaxembed_{name}", out, **kw)(*args)


def _gather_kernel(table: jax.Array, ids: jax.Array, width: int | None = None) -> jax.Array:
    table = _unpacked(table, width)  # row-major on CPU: the same memory, a free reshape
    out = jax.ShapeDtypeStruct((*ids.shape, *table.shape[1:]), table.dtype)
    return _ffi("gather_rows", out, table, ids)


def _add_at_kernel(cot: jax.Array, ids: jax.Array, num_rows: int) -> jax.Array:
    row_shape = cot.shape[ids.ndim :]
    flat = cot.reshape(ids.size, -1)
    head = jnp.asarray(ids, jnp.int32).reshape(-1, 1)
    slots = _slot_operands(flat, head, None, jnp.zeros((ids.size, 0, _BLOCK), jnp.int32), None)
    out = jax.ShapeDtypeStruct((num_rows, flat.shape[1]), jnp.float32)
    return _ffi("combine_grad", out, flat, *slots).reshape(num_rows, *row_shape)


def _set_at_kernel(table: jax.Array, ids: jax.Array, rows: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct(table.shape, table.dtype)
    rows = rows.astype(table.dtype)
    return _ffi("scatter_rows", out, table, ids, rows, input_output_aliases={0: 0})


def _slot_sums_kernel(rows, head, head_w, blocks, block_w, weighted: bool) -> jax.Array:
    no_ids = jnp.zeros((0,), jnp.int32)
    return _lookup_kernel(rows, no_ids, head, head_w, blocks, block_w, weighted)


def _lookup_kernel(table, ids, head, head_w, blocks, block_w, weighted: bool) -> jax.Array:
    out = jax.ShapeDtypeStruct((head.shape[0], table.shape[1]), jnp.float32)
    return _ffi("combine", out, table, ids, head, head_w, blocks, block_w)


def _slot_grads_kernel(cot, head, head_w, blocks, block_w, weighted: bool, num_rows: int):
    out = jax.ShapeDtypeStruct((num_rows, cot.shape[1]), jnp.float32)
    return _ffi("combine_grad", out, cot, head, head_w, blocks, block_w)


# ---------------------------------------------------------------------------------------------
# Primitives: abstract evaluation, lowerings, and the AD and batching rules.


def _primitive(
    name: str,
    abstract: Callable[..., jax.core.ShapedArray],
    pure: Callable[..., jax.Array],
    kernel: Callable[..., jax.Array],
    kernel_ok: Callable[..., bool] = lambda *avals, **params: True,
    multiple_results: bool = False,
) -> Primitive:
    """A primitive lowered to ``kernel`` on CPU (where ``kernel_ok(*avals_in)``) and to
    ``pure`` elsewhere; batched by ``vmap`` of ``pure``."""
    prim = Primitive(f"jaxembed_{name}")
    prim.multiple_results = multiple_results
    prim.def_abstract_eval(abstract)

    @functools.cache
    def compiled(**params):
        return jax.jit(functools.partial(prim.bind, **params))

    prim.def_impl(lambda *args, **params: compiled(**params)(*args))
    pure_lowering = mlir.lower_fun(pure, multiple_results=multiple_results)
    kernel_lowering = mlir.lower_fun(kernel, multiple_results=multiple_results)

    def cpu_lowering(ctx, *args, **params):
        use_kernel = _load()[0] and kernel_ok(*ctx.avals_in, **params)
        return (kernel_lowering if use_kernel else pure_lowering)(ctx, *args, **params)

    mlir.register_lowering(prim, pure_lowering)
    mlir.register_lowering(prim, cpu_lowering, platform="cpu")

    def batch(args, dims, **params):
        axes = [d if isinstance(d, int) else None for d in dims]
        out = jax.vmap(functools.partial(pure, **params), in_axes=axes)(*args)
        return out, ([0] * len(out) if multiple_results else 0)

    batching.primitive_batchers[prim] = batch
    return prim


def _f32(aval) -> bool:
    return aval.dtype == jnp.float32 and aval.ndim == 2


def _shaped(shape: tuple, dtype: Any) -> jax.core.ShapedArray:
    return jax.core.ShapedArray(tuple(shape), dtype)


def _gather_abstract(table, ids, width=None):
    row = table.shape[1:] if width is None else (width,)
    return _shaped((*ids.shape, *row), table.dtype)


def _whole_rows(table, ids, width=None) -> bool:
    """Whether ``table`` stores a whole number of rows of ``width`` in each of its rows (no
    padding): what the kernels read and update."""
    return width is None or table.shape[1] % width == 0


def _add_at_abstract(cot, ids, num_rows):
    return _shaped((num_rows, *cot.shape[ids.ndim :]), cot.dtype)


def _set_at_abstract(table, ids, rows):
    return _shaped(table.shape, table.dtype)


def _slot_sums_abstract(rows, head, head_w, blocks, block_w, weighted):
    return _shaped((head.shape[0], rows.shape[1]), rows.dtype)


def _slot_grads_abstract(cot, head, head_w, blocks, block_w, weighted, num_rows):
    return _shaped((num_rows, cot.shape[1]), cot.dtype)


def _lookup_abstract(table, ids, head, head_w, blocks, block_w, weighted):
    return _shaped((head.shape[0], table.shape[1]), table.dtype)


def _pure_lookup(table, ids, head, head_w, blocks, block_w, weighted):
    return _pure_slot_sums(_take(table, ids), head, head_w, blocks, block_w, weighted)


def _pure_slot_sums(rows, head, head_w, blocks, block_w, weighted):
    return _slot_sums_jax(
        rows, head, head_w if weighted else None, blocks, block_w if weighted else None
    )


def _pure_slot_grads(cot, head, head_w, blocks, block_w, weighted, num_rows):
    hw, bw = (head_w, block_w) if weighted else (None, None)
    return _slot_grads_jax(cot, head, hw, blocks, bw, num_rows)


def _first_f32(aval, *rest, **params) -> bool:
    """The kernels sum float32 ``[N, D]`` rows; other dtypes take the pure path."""
    return _f32(aval)


def _first_f32_any_rank(aval, *rest, **params) -> bool:
    return aval.dtype == jnp.float32


gather_p = _primitive("gather_rows", _gather_abstract, _take, _gather_kernel, _whole_rows)
add_at_p = _primitive("add_at", _add_at_abstract, _add_at, _add_at_kernel, _first_f32_any_rank)
set_at_p = _primitive("set_at", _set_at_abstract, _set_at, _set_at_kernel)
slot_sums_p = _primitive(
    "slot_sums", _slot_sums_abstract, _pure_slot_sums, _slot_sums_kernel, _first_f32
)
lookup_p = _primitive("lookup", _lookup_abstract, _pure_lookup, _lookup_kernel, _first_f32)
slot_grads_p = _primitive(
    "slot_grads", _slot_grads_abstract, _pure_slot_grads, _slot_grads_kernel, _first_f32
)


def _linear(prim: Primitive, transpose: Callable[..., jax.Array]) -> None:
    """Rules for a primitive linear in its first operand (the others are indices/weights)."""

    def jvp(primals, tangents, **params):
        out = prim.bind(*primals, **params)
        t = tangents[0]
        if type(t) is ad.Zero:
            return out, ad.Zero(jax.core.get_aval(out).to_tangent_aval())
        return out, prim.bind(t, *primals[1:], **params)

    def transpose_rule(ct, x, *rest, **params):
        if type(ct) is ad.Zero:
            return [None] * (1 + len(rest))
        return [transpose(ct, x.aval, *rest, **params)] + [None] * len(rest)

    ad.primitive_jvps[prim] = jvp
    ad.primitive_transposes[prim] = transpose_rule


def _gather_transpose(ct: jax.Array, table: Any, ids: jax.Array, width: int | None = None):
    """The gradient of ``gather_rows`` w.r.t. its table: each cotangent row added onto its
    id's row (in place as windows where the table stores rows with padding)."""
    if not _whole_rows(table, ids, width):
        return add_rows(jnp.zeros(table.shape, ct.dtype), ids, ct)
    rows = table.shape[0] * (1 if width is None else table.shape[1] // width)
    return add_at_p.bind(ct, ids, num_rows=rows).reshape(table.shape)


_linear(gather_p, _gather_transpose)
_linear(add_at_p, lambda ct, cot, ids, num_rows: gather_p.bind(ct, ids))
_linear(
    slot_sums_p,
    lambda ct, rows, *slots, weighted: slot_grads_p.bind(
        ct, *slots, weighted=weighted, num_rows=rows.shape[0]
    ),
)
_linear(
    lookup_p,
    lambda ct, table, ids, *slots, weighted: add_at_p.bind(
        slot_grads_p.bind(ct, *slots, weighted=weighted, num_rows=ids.shape[0]),
        ids,
        num_rows=table.shape[0],
    ),
)
_linear(
    slot_grads_p,
    lambda ct, cot, *slots, weighted, num_rows: slot_sums_p.bind(ct, *slots, weighted=weighted),
)


# ---------------------------------------------------------------------------------------------
# Public functions.


def gather_rows(table: jax.Array, ids: Any, width: int | None = None) -> jax.Array:
    """``table[ids]`` along axis 0, with a zero row for every id outside ``[0, len(table))``.

    Differentiable in ``table`` (the gradient adds each cotangent row onto its id's row).
    ``width``: the rows' width where ``table`` stores ``pack = table.shape[1] // width`` of them
    in each of its rows (row ``i`` at ``[i // pack, (i % pack) * width:][:width]``, the rest of
    a stored row padding); the result has ``width`` columns.

    Example:
        >>> import jax.numpy as jnp
        >>> gather_rows(jnp.arange(6.0).reshape(3, 2), jnp.array([2, 3, 0])).tolist()
        [[4.0, 5.0], [0.0, 0.0], [0.0, 1.0]]
        >>> gather_rows(jnp.arange(8.0).reshape(2, 4), jnp.array([1]), width=1).tolist()
        [[1.0]]
    """
    ids = _as_index(ids)
    if not enabled():
        return _take(table, ids, width)
    return gather_p.bind(table, ids, width=width)


def scatter_rows(table: jax.Array, ids: Any, rows: jax.Array) -> jax.Array:
    """``table`` with row ``ids[i]`` replaced by ``rows[i]``; ids must be distinct (ids outside
    the table, e.g. padding, are skipped). In place when ``table`` is donated.

    Example:
        >>> import jax.numpy as jnp
        >>> scatter_rows(jnp.zeros((3, 2)), jnp.array([2, 3]), jnp.ones((2, 2))).tolist()
        [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    """
    ids = _as_index(ids)
    return set_at_p.bind(table, ids, rows) if enabled() else _set_at(table, ids, rows)


def add_rows(table: jax.Array, ids: jax.Array, rows: jax.Array) -> jax.Array:
    """``table`` with ``rows[i]`` added to row ``ids[i]`` (ids outside the table dropped); a
    table wider than ``rows`` stores them as windows of its rows (``gather_rows``'s ``width``).

    Example:
        >>> import jax.numpy as jnp
        >>> add_rows(jnp.zeros((2, 4)), jnp.array([3, 0]), jnp.ones((2, 2))).tolist()
        [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    """
    if _windowed(table, rows):
        return _scatter_windows(table, ids, rows, add=True)
    return table.at[ids].add(rows.astype(table.dtype), mode="drop")


def _slot_operands(rows: jax.Array, head, head_w, blocks, block_w) -> list[jax.Array]:
    weighted = head_w is not None
    if weighted and block_w is None:
        block_w = jnp.zeros(jnp.shape(blocks), jnp.float32)
    empty = jnp.zeros((0,), rows.dtype)
    return [
        jnp.asarray(head, jnp.int32),
        jnp.asarray(head_w, rows.dtype) if weighted else empty,
        jnp.asarray(blocks, jnp.int32),
        jnp.asarray(block_w, rows.dtype) if weighted else empty,
    ]


def slot_sums(
    rows: jax.Array, head: Any, head_w: Any, blocks: Any, block_w: Any, ids: Any = None
) -> jax.Array:
    """Per output row: its head slots summed left to right, then each block of 8 slots summed
    and added in turn (TF's CPU order). Slots outside ``[0, len(rows))`` are empty.

    Shapes: ``rows`` ``[N, D]``; ``head`` ``[R, H]``; ``blocks`` ``[R, T, 8]``; ``head_w`` and
    ``block_w`` of the slots' shapes, or None (all 1). Returns ``[R, D]``. Linear in ``rows``.
    With ``ids`` (``[N]``), slot ``p`` reads ``rows[ids[p]]`` instead (an id outside ``rows``
    reads zeros): the same as ``slot_sums(gather_rows(rows, ids), ...)`` without the copy.

    Example:
        >>> import jax.numpy as jnp
        >>> rows = jnp.array([[1.0], [2.0], [4.0]])
        >>> slot_sums(rows, jnp.array([[0, 2], [1, 3]]), None, jnp.zeros((2, 0, 8), int), None)
        Array([[5.],
               [2.]], dtype=float32)
    """
    weighted = head_w is not None
    if ids is not None and jnp.shape(ids)[0] == 0:
        # No ids (e.g. all dropped as out of range): every slot is empty. The kernel reads an
        # empty ids operand as "no indirection", so pass no rows instead.
        rows, ids = rows[:0], None
    if not enabled():
        if ids is None:
            return _slot_sums_jax(rows, head, head_w, blocks, block_w)
        # Slot p reads table row ids[p]: the slots point straight into the table, with no
        # gathered copy of the requested rows (the same values; an empty slot reads zeros).
        ids = _as_index(ids)
        n = ids.shape[0]

        def through(slots):
            slots = jnp.asarray(slots)
            valid = (slots >= 0) & (slots < n)
            return jnp.where(valid, ids[jnp.where(valid, slots, 0)], -1)

        return _slot_sums_jax(rows, through(head), head_w, through(blocks), block_w, take=True)
    slots = _slot_operands(rows, head, head_w, blocks, block_w)
    if ids is None:
        return slot_sums_p.bind(rows, *slots, weighted=weighted)
    return lookup_p.bind(rows, _as_index(ids), *slots, weighted=weighted)


def slot_grads(
    cot: jax.Array,
    head: Any,
    head_w: Any,
    blocks: Any,
    block_w: Any,
    num_rows: int,
    uses: Uses | None = None,
):
    """The transpose of ``slot_sums``: ``[num_rows, D]`` with row ``p`` the sum of ``(w *)
    cot[r]`` over the slots holding ``p``. ``uses``: the same slots grouped by row (``Uses``,
    ``num_rows`` of them), summed by ``use_sums`` instead.

    Example:
        >>> import jax.numpy as jnp
        >>> cot = jnp.array([[1.0], [10.0]])
        >>> slot_grads(cot, jnp.array([[0, 2], [0, 3]]), None, jnp.zeros((2, 0, 8), int), None, 3)
        Array([[11.],
               [ 0.],
               [ 1.]], dtype=float32)
    """
    if uses is not None:
        return use_sums(cot, uses)
    if not enabled():
        return _slot_grads_jax(cot, head, head_w, blocks, block_w, num_rows)
    if cot.shape[0] == 0:  # an empty batch: no kernel call on zero-size operands
        return jnp.zeros((num_rows, cot.shape[1]), cot.dtype)
    slots = _slot_operands(cot, head, head_w, blocks, block_w)
    return slot_grads_p.bind(cot, *slots, weighted=head_w is not None, num_rows=num_rows)


# ---------------------------------------------------------------------------------------------
# Overflow blocks: the entries of long rows past a plan's head and blocks (lookup.row_slot_cap).


def _scatter_in_order(acc: jax.Array, rows: jax.Array, parts: jax.Array) -> jax.Array:
    """``acc[rows[m]] += parts[m]``: XLA:CPU's scatter applies the updates one at a time in
    index order, duplicates included (tests/test_long_rows.py checks it)."""
    if rows.shape[0] == 1:
        # XLA:CPU turns a one-update scatter into a dynamic-update-slice fused with the ops that
        # made ``parts``, where LLVM contracts ``acc + w * e`` into an FMA (TF rounds the product
        # first). A second update, dropped, keeps it a scatter.
        rows = jnp.concatenate([rows, jnp.full((1,), acc.shape[0], rows.dtype)])
        parts = jnp.concatenate([parts, jnp.zeros_like(parts)])
    return acc.at[rows].add(parts, mode="drop")


def _loop_in_order(acc: jax.Array, rows: jax.Array, parts: jax.Array) -> jax.Array:
    """``_scatter_in_order`` as a sequential loop, for backends whose scatter-add may apply
    duplicate indices in any order (GPU atomics)."""
    num_rows = acc.shape[0]

    def body(m, acc):
        valid = (rows[m] >= 0) & (rows[m] < num_rows)
        r = jnp.where(valid, rows[m], 0)
        row = jax.lax.dynamic_index_in_dim(acc, r, keepdims=False)
        new = jnp.where(valid, row + parts[m], row)
        return jax.lax.dynamic_update_index_in_dim(acc, new, r, 0)

    return jax.lax.fori_loop(0, parts.shape[0], body, acc)


def add_rows_in_order(acc: jax.Array, rows: Any, parts: jax.Array) -> jax.Array:
    """``acc[rows[m]] += parts[m]`` for ``m = 0, 1, ...`` in turn (so a row's additions keep
    their order); rows outside ``acc`` are dropped.

    Example:
        >>> import jax.numpy as jnp
        >>> add_rows_in_order(jnp.zeros((2, 1)), jnp.array([1, 1, 2]), jnp.ones((3, 1))).tolist()
        [[0.0], [2.0]]
    """
    return jax.lax.platform_dependent(
        acc, _as_index(rows), parts, cpu=_scatter_in_order, default=_loop_in_order
    )


def overflow_sums(
    acc: jax.Array,
    rows: jax.Array,
    overflow: Any,
    overflow_w: Any,
    overflow_rows: Any,
    ids: Any = None,
) -> jax.Array:
    """``acc`` (``[R, D]`` head and block sums) with each overflow block added in turn: block
    ``m``'s slots ``overflow[m]`` (``[M, w]``, read like ``slot_sums``' slots) times
    ``overflow_w[m]`` (or 1) summed left to right, then added to ``acc[overflow_rows[m]]``.

    Linear in ``rows``; the transpose gives slot ``p`` of block ``m`` ``(w *)
    cot[overflow_rows[m]]``, which ``slot_grads`` computes with the blocks as heads.
    """
    slots = _as_index(overflow)
    if ids is not None:
        slots = jnp.take(_as_index(ids), slots, mode="fill", fill_value=-1)
    entries = gather_rows(rows, slots.reshape(-1)).reshape(*slots.shape, rows.shape[1])
    parts = _sequential_sum(entries, 1, overflow_w)
    # The products are rounded before they are added (TF's order): add_rows_in_order keeps a
    # scatter, which XLA does not fuse with them into FMAs (tests/test_long_rows.py).
    return add_rows_in_order(acc, overflow_rows, parts)


# ---------------------------------------------------------------------------------------------
# Optimizer updates of the touched rows.
#
# ``optimizer`` is a jaxembed optimizer: ``apply(w, slots, g, step)`` gives the new rows and
# slot rows (``new_slots`` then ``new_rows`` where ``splits_update``, with the step's
# ``step_scalars``); ``kernel_rule()`` gives ``(kind, flags, constants)`` for the CPU kernel's
# copy of its equations, or None (then the pure path runs everywhere). Operands: the table, its slot
# arrays in ``slot_names`` order, the step count, the row ids, then the gradients (``grads``
# ``[U, D]``) or the slot cotangents and slots they come from.


_CHUNK = 512  # rows per trip of the pure update loop: its temporaries stay in cache


def _apply_once(optimizer: Any, table, slots, ids, grads, step, scalars=None):
    """Gathers the rows ``ids``, updates them and writes them back.

    Where the optimizer ``splits_update``, the new slot rows are written first, and on CPU
    read back for ``new_rows`` (``_as_written``): every gathered array then feeds one
    computation, which XLA fuses with its gather. (A gather feeding two computations is copied
    out first, and XLA:CPU copies 64-float rows in scalar code: on workload W's Adagrad step,
    17% of the step, for the same bits.) On TPUs and GPUs, reading them back would read each
    row twice from device memory. ``scalars``: ``optimizer.step_scalars(step)``, if computed
    already; ``step`` serves the others (``from_optax``, whose new rows come from its updates).
    """
    if scalars is None:
        scalars = optimizer.step_scalars(step)
    if _windowed(table, grads):
        return _apply_stored(optimizer, table, slots, ids, grads, step, scalars)
    width = grads.shape[-1]
    is_row = functools.partial(_same_shape, table, _pack_of(table, grads))

    def rows_of(tree):
        return jax.tree.map(
            lambda x: _take(x, ids, width if x.ndim == 2 else None) if is_row(x) else x, tree
        )

    def write(tree, new_rows):
        return jax.tree.map(lambda x, r: _set_at(x, ids, r) if is_row(x) else r, tree, new_rows)

    w = _take(table, ids, width)
    if isinstance(optimizer, Beside):
        new_w, new_rows = optimizer.update(w, rows_of(slots), grads, scalars)
        return _set_at(table, ids, new_w), write(slots, new_rows)
    if not optimizer.splits_update:
        new_w, new_rows = optimizer.apply(w, rows_of(slots), grads, step)
        return _set_at(table, ids, new_w), write(slots, new_rows)
    new_slot_rows = optimizer.new_slots(w, rows_of(slots), grads, scalars)
    new_slots = write(slots, new_slot_rows)
    new_w = optimizer.new_rows(w, _as_written(new_slot_rows, new_slots, rows_of), grads, scalars)
    return _set_at(table, ids, new_w), new_slots


def _as_written(rows: Any, written: Any, rows_of: Callable[[Any], Any]) -> Any:
    """New slot ``rows`` as ``new_rows`` reads them, once written (into ``written``), with the
    bits they were written with (not recomputed in ``new_rows``' fusion, where XLA may
    contract them differently): read back from ``written`` on CPU, so that each gathered array
    feeds one computation (see ``_apply_once``); elsewhere ``_kept``."""
    return jax.lax.platform_dependent(
        rows, written, cpu=lambda _, w: rows_of(w), default=lambda r, _: _kept(r)
    )


def _kept(rows: Any) -> Any:
    """New slot ``rows`` as computed, behind an optimization barrier (so ``new_rows`` reads
    them as written, not recomputed in its own fusion): on TPUs and GPUs, where reading them
    back from the slot arrays would be a second read of each row from device memory, and on
    packed tables (``_apply_stored``)."""
    return jax.lax.optimization_barrier(rows)


def _kept_update(optimizer: Any, w, slots, g, scalars) -> tuple[jax.Array, Any]:
    """``(new rows, new slots)`` of rows ``w``: ``new_slots``, kept as computed (``_kept``),
    then ``new_rows`` from them."""
    new_slots = _kept(optimizer.new_slots(w, slots, g, scalars))
    return optimizer.new_rows(w, new_slots, g, scalars), new_slots


def _apply_stored(optimizer: Any, table, slots, ids, grads, step, scalars):
    """``_apply_once`` on a packed table (and its table-shaped slots): each array's stored rows
    holding ``ids`` (sorted, distinct) are gathered once, their windows updated, and the stored
    rows written back whole (``_set_stored``)."""
    width = grads.shape[-1]
    pack = _pack_of(table, grads)
    stored, window = _stored_at(ids, table.shape[0], pack)
    leaves, treedef = jax.tree.flatten(slots)
    per_row = [_same_shape(table, pack, x) for x in leaves]  # else shared by all rows
    # The windowed arrays' stored rows; padding ids read some stored row (its new values are
    # dropped: padding is never written).
    old = [
        _stored_rows(x, stored) if r and x.ndim == 2 else None
        for x, r in zip(leaves, per_row, strict=True)
    ]
    rows = [
        _window(o, window, width) if o is not None else (_take(x, ids) if r else x)
        for x, o, r in zip(leaves, old, per_row, strict=True)
    ]
    old_w = _stored_rows(table, stored)
    w = _window(old_w, window, width)
    if isinstance(optimizer, Beside):
        new_w, new_slots = optimizer.update(w, jax.tree.unflatten(treedef, rows), grads, scalars)
    elif optimizer.splits_update:
        new_w, new_slots = _kept_update(
            optimizer, w, jax.tree.unflatten(treedef, rows), grads, scalars
        )
    else:
        new_w, new_slots = optimizer.apply(w, jax.tree.unflatten(treedef, rows), grads, step)
    written = [
        _set_stored(x, stored, window, o, new)
        if o is not None
        else (_set_at(x, ids, new) if r else new)
        for x, o, r, new in zip(leaves, old, per_row, jax.tree.leaves(new_slots), strict=True)
    ]
    return _set_stored(table, stored, window, old_w, new_w), jax.tree.unflatten(treedef, written)


@jax.custom_batching.custom_vmap
def _live_trips(inside: jax.Array) -> jax.Array:
    """The chunks of ``_CHUNK`` up to the last real id of an ``[U]`` mask of real ids."""
    used = jnp.max(jnp.where(inside, jnp.arange(1, inside.shape[0] + 1, dtype=jnp.int32), 0))
    return (used + _CHUNK - 1) // _CHUNK


@_live_trips.def_vmap
def _live_trips_vmap(axis_size: int, in_batched: list, inside: jax.Array) -> tuple:
    # Under vmap, the most trips any member needs (the chunks up to the last id that is real in
    # any member), not a bound per member: a loop with a batched bound would select every
    # carried table on every trip. Recursing keeps nested vmaps unbatched too.
    return _live_trips(jnp.any(inside, axis=0)), False


def _live_chunks(ids: jax.Array, rows: int) -> jax.Array:
    """The chunks of ``_CHUNK`` ids up to the last one inside ``[0, rows)``: the trips the
    update loop needs (the chunks after it hold only padding, which it would skip anyway).
    Under ``vmap``, the most that any member needs (the others' extra trips are padding)."""
    return _live_trips((ids >= 0) & (ids < rows))


def _apply_generic(optimizer: Any, table, slots, ids, grads, step):
    """``optimizer.apply`` on the touched rows, in place, ``_CHUNK`` rows a trip of a loop
    (padding, ids outside the table, is read as zeros and never written). Each row's update is
    the same as in one pass over all rows; that pass would write four ``[U, D]`` temporaries
    (gathered rows and slots, their new values), several times slower on CPU than a chunk's
    cached ones. The loop stops after the last chunk holding a real id (``_live_chunks``), so
    the padding that rounds request capacities up (``lookup.row_bucket``) costs no trips (on
    workload W, 26,003 distinct rows in a capacity of 28,672: 51 trips of 56).

    Only optimizers whose rows are independent (those with a ``kernel_rule``: TF's equations,
    row by row) are chunked; ``from_optax`` takes the one pass (an Optax count must advance
    once per step, not once per chunk).
    """
    n = ids.shape[0]
    rows = table.shape[0] * _pack_of(table, grads)
    scalars = optimizer.step_scalars(step)  # once, outside the loop (a host callback, maybe)
    if n <= _CHUNK or _rule_of(optimizer) is None:
        return _apply_once(optimizer, table, slots, ids, grads, step, scalars)
    trips = -(-n // _CHUNK)
    pad = trips * _CHUNK - n
    if pad:
        ids = jnp.concatenate([ids, jnp.full((pad,), rows, ids.dtype)])
        grads = jnp.concatenate([grads, jnp.zeros((pad, *grads.shape[1:]), grads.dtype)])

    def body(c, carry):
        start = c * _CHUNK
        part = jax.lax.dynamic_slice_in_dim(ids, start, _CHUNK)
        g = jax.lax.dynamic_slice_in_dim(grads, start, _CHUNK)
        return _apply_once(optimizer, *carry, part, g, step, scalars)

    return jax.lax.fori_loop(0, _live_chunks(ids, rows), body, (table, slots))


@dataclasses.dataclass(frozen=True)
class Beside:
    """``optimizer`` on a table whose table-shaped slots ``names`` are stored beside its rows
    (``layouts.TablePlacement.beside``): a row's *entry* is its ``width`` floats, then each of
    those slots' ``width`` floats. The update reads each row's entry once, the row and those
    slots together, and writes it back whole; the other slots are arrays of their own.

    It takes the place of the optimizer in ``apply_rows`` and ``apply_slots``, with gradients
    as wide as the entries (zeros past the row's ``width``). No CPU kernel runs it.
    """

    optimizer: Any
    names: tuple[str, ...]
    width: int

    lazy: ClassVar[bool] = True
    splits_update: ClassVar[bool] = False

    @property
    def slot_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.optimizer.slot_names if n not in self.names)

    def kernel_rule(self) -> None:
        return None

    def step_scalars(self, step: jax.Array) -> jax.Array:
        return self.optimizer.step_scalars(step)

    def update(self, entries: jax.Array, slots: dict, g: jax.Array, scalars: jax.Array):
        """``(new entries, new other slot rows)`` of rows whose entries are ``entries``, with
        the other slots' rows ``slots`` and gradients ``g`` (as wide as ``entries``; columns
        past the entry, if any, are kept as they are)."""
        w, k = self.width, len(self.names)
        row, g = entries[..., :w], g[..., :w]
        beside = {n: entries[..., (i + 1) * w : (i + 2) * w] for i, n in enumerate(self.names)}
        new_row, new_slots = _kept_update(self.optimizer, row, {**slots, **beside}, g, scalars)
        kept = entries[..., (1 + k) * w :]
        new_entries = jnp.concatenate([new_row, *(new_slots[n] for n in self.names), kept], -1)
        return new_entries, {n: new_slots[n] for n in slots}


def beside(optimizer: Any, names: tuple[str, ...], width: int) -> Any:
    """``optimizer`` for a table with its slots ``names`` stored beside its ``width``-float rows
    (``Beside``); ``optimizer`` itself if ``names`` is empty."""
    return Beside(optimizer, names, width) if names else optimizer


def _rule_of(optimizer: Any) -> Any:
    """The kernel rule of ``optimizer``, or of the one a ``Beside`` holds: whether the update
    may run in chunks of rows (each row's update independent of the others)."""
    inner = optimizer.optimizer if isinstance(optimizer, Beside) else optimizer
    return inner.kernel_rule()


def _same_shape(table: jax.Array, pack: int, leaf: Any) -> bool:
    """Whether a slot leaf has one entry per table row: the table's shape, or ``[V]`` (a
    row-wise statistic; ``V`` rows in a table storing ``pack`` rows per row); anything else
    (e.g. an Optax step count) is shared by all rows."""
    shape = tuple(jnp.shape(leaf))
    return shape == tuple(table.shape) or shape == (table.shape[0] * pack,)


def _pack_of(table: jax.Array, rows: jax.Array) -> int:
    """How many of ``rows``' rows (``[..., D]``) ``table`` stores in each of its rows."""
    return table.shape[1] // rows.shape[-1] if table.ndim == 2 and rows.shape[-1] else 1


def _windowed(table: jax.Array, rows: jax.Array) -> bool:
    """Whether ``table`` stores ``rows``' rows as windows of its rows (it is wider)."""
    return table.ndim == 2 and rows.shape[-1] != table.shape[1]


def _unpacked(x: jax.Array, width: int | None) -> jax.Array:
    """A ``[R, p * width]`` table as ``[p * R, width]``: the same row-major memory (a bitcast on
    CPU and GPU, where the kernels run)."""
    if width is None or width == x.shape[1]:
        return x
    return x.reshape(x.shape[0] * (x.shape[1] // width), width)


def _split(optimizer: Any, operands: tuple) -> tuple[jax.Array, dict, tuple]:
    k = len(optimizer.slot_names)
    table, slot_arrays, rest = operands[0], operands[1 : 1 + k], operands[1 + k :]
    return table, dict(zip(optimizer.slot_names, slot_arrays, strict=True)), rest


def _apply_rows_pure(*operands, optimizer):
    table, slots, (step, ids, grads) = _split(optimizer, operands)
    new_table, new_slots = _apply_generic(optimizer, table, slots, ids, grads, step)
    return _arrays(optimizer, new_table, new_slots)


def _apply_slots_pure(*operands, optimizer, weighted):
    table, slots, (step, ids, cot, head, head_w, blocks, block_w) = _split(optimizer, operands)
    hw, bw = (head_w, block_w) if weighted else (None, None)
    grads = _slot_grads_jax(cot, head, hw, blocks, bw, ids.shape[0])
    new_table, new_slots = _apply_generic(optimizer, table, slots, ids, grads, step)
    return _arrays(optimizer, new_table, new_slots)


def _arrays(optimizer: Any, table: jax.Array, slots: dict) -> list[jax.Array]:
    """The arrays an update rewrites: the table, then its slots in ``slot_names`` order."""
    return [table, *(slots[n] for n in optimizer.slot_names)]


def _unpack(optimizer: Any, arrays: list) -> tuple[jax.Array, dict]:
    return arrays[0], dict(zip(optimizer.slot_names, arrays[1:], strict=True))


def _apply_call(name: str, optimizer, lr, operands: list, table, slots: dict) -> Any:
    """The kernel ``name`` on ``table`` and ``slots``, in place. The kernel takes the rows'
    width from the gradients: a table stored several rows to a row (and its table-shaped
    slots) is the same row-major memory as its rows."""
    kind, flags, constants = optimizer.kernel_rule()
    arrays = _arrays(optimizer, table, slots)
    first = 1 + len(operands)  # lr, operands, then the arrays updated in place
    call = jax.ffi.ffi_call(
        f"jaxembed_{name}",
        [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays],
        input_output_aliases={first + i: i for i in range(len(arrays))},
    )
    return call(
        lr,
        *operands,
        *arrays,
        optimizer=np.int32(kind),
        flags=np.int32(flags),
        hyper=np.asarray(constants, np.float32),
    )


def _apply_rows_kernel(*operands, optimizer):
    table, slots, (step, ids, grads) = _split(optimizer, operands)
    lr = optimizer.step_scalars(step)
    return _apply_call("apply_rows", optimizer, lr, [ids, grads], table, slots)


def _apply_slots_kernel(*operands, optimizer, weighted):
    table, slots, (step, ids, cot, *slot_ops) = _split(optimizer, operands)
    lr = optimizer.step_scalars(step)
    return _apply_call("apply_slots", optimizer, lr, [ids, cot, *slot_ops], table, slots)


def _apply_abstract(*avals, optimizer, **params):
    return list(avals[: 1 + len(optimizer.slot_names)])


def _all_f32(*avals, optimizer, **params) -> bool:
    """float32 ``[V, D]`` table and slots (row-wise slots: float32 ``[V]``), the table storing
    a whole number of the gradients' rows in each of its rows (no padding)."""
    k = len(optimizer.slot_names)
    table, *slots = avals[: 1 + k]
    width = avals[k + 3].shape[-1]  # after the step and the ids: the gradients or cotangents
    row_slots = getattr(optimizer, "row_slots", ())
    return (
        _f32(table)
        and _whole_rows(table, None, width)
        and all(
            a.dtype == jnp.float32 and a.ndim == (1 if name in row_slots else 2)
            for name, a in zip(optimizer.slot_names, slots, strict=True)
        )
    )


apply_rows_p = _primitive(
    "apply_rows", _apply_abstract, _apply_rows_pure, _apply_rows_kernel, _all_f32, True
)
apply_slots_p = _primitive(
    "apply_slots", _apply_abstract, _apply_slots_pure, _apply_slots_kernel, _all_f32, True
)


def _on_kernels(optimizer: Any, slots: Any) -> bool:
    """Whether the kernels can run ``optimizer`` on these slots."""
    rule = optimizer.kernel_rule()
    return (
        enabled()
        and rule is not None
        and isinstance(slots, dict)
        and tuple(slots) == tuple(optimizer.slot_names)
    )


def apply_rows(optimizer: Any, table, slots, ids, grads, step):
    """``optimizer`` on rows ``ids`` (distinct; ids outside the table are padding) of ``table``
    and its ``slots``, with gradients ``grads`` ``[U, D]``: ``(new table, new slots)``.

    On CPU, TF's optimizers run in place in one pass over the rows (the arrays should be donated
    to the enclosing ``jit``); otherwise the rows are gathered, updated and written back.
    """
    ids = _as_index(ids)
    if not _on_kernels(optimizer, slots):
        return _apply_generic(optimizer, table, slots, ids, grads, step)
    out = apply_rows_p.bind(
        *_arrays(optimizer, table, slots), jnp.asarray(step), ids, grads, optimizer=optimizer
    )
    return _unpack(optimizer, out)


def apply_slots(optimizer: Any, table, slots, ids, cot, head, head_w, blocks, block_w, step):
    """``apply_rows`` with ``grads = slot_grads(cot, head, head_w, blocks, block_w, len(ids))``,
    fused on CPU: each row's gradient is summed right before its update, with no ``[U, D]``
    gradient array."""
    ids = _as_index(ids)
    if not _on_kernels(optimizer, slots):
        grads = slot_grads(cot, head, head_w, blocks, block_w, ids.shape[0])
        return _apply_generic(optimizer, table, slots, ids, grads, step)
    slot_ops = _slot_operands(cot, head, head_w, blocks, block_w)
    out = apply_slots_p.bind(
        *_arrays(optimizer, table, slots),
        jnp.asarray(step),
        ids,
        cot,
        *slot_ops,
        optimizer=optimizer,
        weighted=head_w is not None,
    )
    return _unpack(optimizer, out)
