"""``embedding_lookup``: TF's ``serving_embedding_lookup`` in JAX, bit for bit.

The lookup is split in two:

* ``plan_feature`` (host, numpy) validates one feature's ids and weights and turns them into a
  ``LookupPlan``: the ids to gather, the weight of each, and where each gathered row goes in the
  output. All of TF's input-kind rules (pruning, sequence positions, ``output_shape``) live here.
  ``plan_training_feature`` (``Embedding.preprocess``) applies ``TPUEmbedding``'s rules to dense
  ids instead (a trailing dimension of 1 dropped), and ``check_structure`` its structure checks.
* ``apply_plan`` (device, jax) gathers the rows and sums them in exactly the order TF's CPU kernels
  do (tf_semantics §4.4), so ragged and unweighted sparse results are bit-identical to TF's.

Summation order. Every combined output row is ``head`` entries summed left to right, then ``T``
blocks of 8, each summed left to right and added to the running total. For ragged inputs and for
weighted sparse inputs (``segment_sum``) the head is the whole row. For unweighted sparse inputs
(``sparse_segment_sum``) the head has ``n mod 8`` entries (8 if that is 0, 9 if it is 1). Slots
past the end of a row point at an all-zero row, and adding ``0.0`` changes nothing.

Long rows. Head and blocks are ``[R, H]`` and ``[R, T, 8]`` arrays, so one long row would pad
every row to its length. They hold at most ``row_slot_cap`` entries per row (64; more only when
most rows are longer, up to twice the mean row length); a row's entries past the cap continue
its sum as ``M`` *overflow* blocks (``M`` of the order of the ids, not of ``R`` x the longest
row): block ``m`` (one entry for sequential rows, 8 for block-ordered ones) is summed left to
right and added to the running total of row ``overflow_rows[m]``, blocks in order, after the
head and the blocks. These are TF's additions in TF's order, so results stay bit-identical.

Simulated quantization. A table with a ``QuantizationConfig`` has the rows a lookup reads
clipped and quantized (``simulate_quantization``) before they are placed or combined: only the
gathered rows, never the whole table, and the ids outside the table (padding, "no entry") still
read zero rows. The gradient passes through unchanged (straight-through).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import _distinct, _kernels, _nest
from jaxembed.configs import FeatureConfig, QuantizationConfig, TableConfig
from jaxembed.inputs import Ragged, Sparse, is_traced
from jaxembed.vocabulary import map_input

_BLOCK = 8
_SLOT_FIELDS = ("positions", "blocks", "overflow")  # LookupPlan fields holding slots


@dataclasses.dataclass(frozen=True)
class LookupPlan:
    """One feature's lookup as arrays with static shapes (a pytree; ``mode``/``shape`` static).

    Shapes: N = rows gathered, R = output rows, H = head slots, T = tail blocks, L = positions,
    M = overflow blocks of ``w`` slots (1, or 8 in block order).

    Attributes:
        mode: ``"gather"`` (dense: one row per id), ``"combine"`` (one combined row per example)
            or ``"sequence"`` (``L`` positions per example).
        shape: output shape without the trailing ``dim``.
        ids: ``[N]`` row ids to gather, all in ``[0, vocabulary_size)`` (or ``vocabulary_size``
            as padding, which gathers a zero row).
        positions: which gathered row goes where: gather ``shape``; sequence ``[R, L]``; combine
            ``[R, H]`` head slots. ``N`` means "no entry" (a zero row).
        weights: combine ``[R, H]`` weight of each head slot, or None (all 1).
        blocks: combine ``[R, T, 8]`` tail slots, same encoding.
        block_weights: combine ``[R, T, 8]`` or None.
        scale: combine ``[R]`` factor applied after summing, or None.
        divisor: combine ``[R]`` divisor applied after ``scale`` (0 gives a zero row), or None.
        overflow: combine ``[M, w]`` slots of the entries past ``row_slot_cap``, same encoding;
            None when there are none (a planned host plan always has it, possibly ``[0, w]``).
        overflow_weights: combine ``[M, w]`` or None (all 1).
        overflow_rows: combine ``[M]`` output row of each overflow block, sorted (``R``: none).
        uses: the slots (head and blocks, or positions) grouped by the row they hold
            (``_kernels.Uses``, ``transpose_plan``), for the pure-JAX gradient; or None.
        overflow_uses: the same of the overflow blocks, or None.
    """

    mode: str
    shape: tuple[int, ...]
    ids: Any
    positions: Any
    weights: Any = None
    blocks: Any = None
    block_weights: Any = None
    scale: Any = None
    divisor: Any = None
    overflow: Any = None
    overflow_weights: Any = None
    overflow_rows: Any = None
    uses: Any = None
    overflow_uses: Any = None

    @property
    def has_overflow(self) -> bool:
        """Whether the plan has overflow blocks (static: decided by their shape)."""
        return self.overflow is not None and self.overflow.shape[0] > 0


jax.tree_util.register_dataclass(
    LookupPlan,
    data_fields=[
        "ids",
        "positions",
        "weights",
        "blocks",
        "block_weights",
        "scale",
        "divisor",
        "overflow",
        "overflow_weights",
        "overflow_rows",
        "uses",
        "overflow_uses",
    ],
    meta_fields=["mode", "shape"],
)


# ---------------------------------------------------------------------------------------------
# Host side: validation and planning.


def _name(path: str, feature: FeatureConfig) -> str:
    where = repr(path) if path else "(the single input)"
    return f"feature {where}" + (f" (name {feature.name!r})" if feature.name else "")


def _concrete(path: str, feature: FeatureConfig, kind: str, *arrays: Any) -> None:
    if any(is_traced(a) for a in arrays):
        raise ValueError(
            f"{kind} input of {_name(path, feature)} is traced, but sparse and ragged inputs must "
            "be concrete (numpy) arrays because their layout is planned on the host. Inside "
            "jax.jit, close over the inputs and trace only the tables, or use "
            "je.Embedding.preprocess and Embedding.lookup."
        )


_INT32_MAX = int(np.iinfo(np.int32).max)


def _check_ids(path: str, feature: FeatureConfig, ids: np.ndarray, hint: str = "") -> np.ndarray:
    """Host ids checked against ``[0, vocabulary_size)`` under ``feature.out_of_range``:
    ``"error"`` raises, ``"clamp"`` clamps, ``"zero"`` marks them ``-1`` (dropped by
    ``_drop_marked``)."""
    if not np.issubdtype(ids.dtype, np.integer) or ids.dtype == np.bool_:
        raise TypeError(
            f"Ids of {_name(path, feature)} must be integers (int32 or int64), got dtype "
            f"{ids.dtype}. Cast them, e.g. ids.astype(np.int64); raw ids (strings, or int64 "
            "that are not row numbers) need FeatureConfig(vocabulary=je.Hashing(...) or "
            "je.Vocabulary(...))."
        )
    vocab = feature.table.vocabulary_size
    bad = (ids < 0) | (ids >= vocab)
    policy = feature.out_of_range
    if bad.any() and policy == "error":
        first = int(ids[np.nonzero(bad)][0])
        fix = hint if first < 0 else "Map unknown ids to a valid row (e.g. an OOV row) first."
        raise ValueError(
            f"Id {first} of {_name(path, feature)} is out of range [0, {vocab}) for table "
            f"{feature.table.name or '(unnamed)'!r} with vocabulary_size={vocab}. {fix} Or set "
            "FeatureConfig(out_of_range='zero' or 'clamp') to read zeros or the nearest row."
        )
    dtype = np.int32 if vocab <= _INT32_MAX else np.int64
    if policy == "clamp":
        return np.clip(ids, 0, vocab - 1).astype(dtype)
    if policy == "zero":
        return np.where(bad, -1, ids).astype(dtype)
    return ids.astype(dtype)


def _drop_marked(plan: LookupPlan) -> LookupPlan:
    """``plan`` without its ids marked ``-1`` (``out_of_range="zero"``): their slots become
    "no entry", so they read a zero row (still counted by the combiner) and get no gradient."""
    ids = np.asarray(plan.ids)
    keep = ids >= 0
    if keep.all():
        return plan
    # Old slot i -> new slot; "no entry" (old len(ids)) and dropped ids -> new len(ids[keep]).
    new = np.full(ids.shape[0] + 1, int(keep.sum()), np.int32)
    new[np.nonzero(keep)[0]] = np.arange(int(keep.sum()), dtype=np.int32)
    changes = {f: new[getattr(plan, f)] for f in _SLOT_FIELDS if getattr(plan, f) is not None}
    return dataclasses.replace(plan, ids=ids[keep], **changes)


def _traced_ids(path: str, feature: FeatureConfig, ids: jax.Array) -> jax.Array:
    """Traced dense ids under ``feature.out_of_range``: ``"error"`` checks them when the program
    runs (a host callback raises naming the feature and the id), ``"clamp"`` clamps; ids left
    outside the table read a zero row."""
    vocab = feature.table.vocabulary_size
    if feature.out_of_range == "clamp":
        return jnp.clip(ids, 0, vocab - 1)
    if feature.out_of_range == "error":
        bad = (ids < 0) | (ids >= vocab)
        first = jnp.where(bad.any(), ids.reshape(-1)[jnp.argmax(bad.reshape(-1))], 0)
        jax.debug.callback(functools.partial(_raise_traced, path, feature), bad.any(), first)
    return ids


def _raise_traced(path: str, feature: FeatureConfig, bad: Any, first: Any) -> None:
    if bool(bad):
        vocab = feature.table.vocabulary_size
        raise ValueError(
            f"Id {int(first)} of {_name(path, feature)} is out of range [0, {vocab}) (checked "
            "inside jax.jit). Map unknown ids to a valid row first, or set "
            "FeatureConfig(out_of_range='zero' or 'clamp'). With jax_enable_x64 off, JAX itself "
            "wraps int64 ids >= 2**31 to int32 before jaxembed sees them: pass concrete ids."
        )


def _weights(path: str, feature: FeatureConfig, w: np.ndarray) -> np.ndarray:
    if not np.issubdtype(w.dtype, np.floating):
        raise TypeError(
            f"Weights of {_name(path, feature)} must be floating point, got dtype {w.dtype}. "
            "Cast them, e.g. weights.astype(np.float32)."
        )
    return w.astype(np.float32)


_NEGATIVE_RAISES = (
    "Negative ids are only pruned for Sparse inputs with validate_weights_and_indices=True "
    "(and not for sequence features); remove them or use such an input."
)


MIN_ROW_SLOTS = 64  # entries per row a plan always holds in its head and blocks
ROW_SLOTS_PER_MEAN = 2  # at most this many times the mean row length, if more
LONG_ROW_SHARE = 8  # and no more than the length that all but 1 row in this many fit in


def row_slot_cap(counts: np.ndarray) -> int:
    """Entries per row a combined plan holds in its head and blocks (rows of ``counts``
    entries); the rest of a row overflows.

    ``MIN_ROW_SLOTS``, or if more, the smaller of ``ROW_SLOTS_PER_MEAN`` times the mean row
    length and the length that all but ``len(counts) // LONG_ROW_SHARE`` rows fit in, then
    ``slot_bucket``-ed. So the ``R`` rows take at most about ``max(64 R, 4 ids)`` slots, and a
    few outliers do not widen every row.

    Example:
        >>> row_slot_cap(np.full(256, 20)), row_slot_cap(np.r_[np.full(255, 20), 20000])
        (64, 64)
        >>> row_slot_cap(np.r_[np.full(192, 20), np.full(64, 300)])
        256
    """
    counts = np.asarray(counts)
    if counts.size == 0:
        return MIN_ROW_SLOTS
    mean = -(-int(counts.sum()) // counts.size)
    k = counts.size - 1 - counts.size // LONG_ROW_SHARE
    fits = int(np.partition(counts, k)[k])
    return slot_bucket(max(MIN_ROW_SLOTS, min(ROW_SLOTS_PER_MEAN * mean, fits)))


class _Slots(NamedTuple):
    """Where a combined plan's entries go (indices into the entries; ``n`` = no entry)."""

    positions: np.ndarray  # [R, H] head slots
    blocks: np.ndarray  # [R, T, 8] tail blocks
    overflow: np.ndarray  # [M, w] overflow blocks: w = 8 in block order, else 1
    overflow_rows: np.ndarray  # [M] the row of each overflow block (sorted)


def _slots(rows: np.ndarray, num_rows: int, block_order: bool) -> _Slots:
    """Places entries (sorted by row, each row's in summation order) into head and block slots,
    at most ``row_slot_cap`` per row (a block-order head, at most 9, always fits); the entries
    past that go, in order, to overflow blocks."""
    n = rows.shape[0]
    counts = np.bincount(rows, minlength=num_rows)
    cap = row_slot_cap(counts)
    if block_order:
        head = counts % _BLOCK
        head = np.where(head == 0, _BLOCK, np.where(head == 1, _BLOCK + 1, head))
        head = np.minimum(head, counts)
        tail_cap = cap // _BLOCK
    else:
        head, tail_cap = np.minimum(counts, cap), 0
    rest = counts - head  # past the head: whole blocks of 8 in block order
    width = int(head.max(initial=0))
    tail = min(int(rest.max(initial=0)) // _BLOCK, tail_cap)
    overflows = bool((rest > tail_cap * _BLOCK).any())
    positions = np.full((num_rows, width), n, np.int32)
    blocks = np.full((num_rows, tail, _BLOCK), n, np.int32)
    past = np.zeros(0, np.int64)
    if not tail and not overflows:  # every entry in its row's head: in row-major order
        positions[np.arange(width) < counts[:, None]] = np.arange(n, dtype=np.int32)
    else:
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        k = np.arange(n) - starts[rows]  # position of each entry within its row
        in_head = k < head[rows]
        positions[rows[in_head], k[in_head]] = np.nonzero(in_head)[0]
        after = np.nonzero(~in_head)[0]  # the entries past their row's head, in order
        t = k[after] - head[rows[after]]  # position within the row's tail
        if overflows:
            fits = t < tail_cap * _BLOCK
            after, t, past = after[fits], t[fits], after[~fits]
        blocks[rows[after], t // _BLOCK, t % _BLOCK] = after
    overflow = past.astype(np.int32).reshape(-1, _BLOCK if block_order else 1)
    return _Slots(positions, blocks, overflow, rows[overflow[:, 0]].astype(np.int32))


def _sequential_row_sums(rows: np.ndarray, values: np.ndarray, num_rows: int) -> np.ndarray:
    """Per-row float32 sums of ``values`` added strictly left to right (as TF's segment sums)."""
    slots = _slots(rows, num_rows, block_order=False)
    padded = np.concatenate([values.astype(np.float32), np.zeros(1, np.float32)])
    acc = np.zeros(num_rows, np.float32)
    for j in range(slots.positions.shape[1]):
        acc = acc + padded[slots.positions[:, j]]
    return _continue_sums(acc, padded[slots.overflow[:, 0]], slots.overflow_rows)


def _continue_sums(acc: np.ndarray, values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``acc`` with ``values[m]`` added to ``acc[rows[m]]`` (``rows`` sorted) in order of ``m``,
    in float32: a sequential ``cumsum`` per row's run."""
    if rows.size == 0:
        return acc
    starts = np.flatnonzero(np.diff(rows, prepend=-1))  # where each row's run begins
    for lo, hi in zip(starts, np.append(starts[1:], rows.size), strict=True):
        r = rows[lo]
        acc[r] = np.cumsum(np.concatenate([acc[r : r + 1], values[lo:hi]]))[-1]
    return acc


def _combine_plan(
    ids: np.ndarray,
    weights: np.ndarray | None,
    rows: np.ndarray,
    num_rows: int,
    combiner: str,
    shape: tuple[int, ...],
    segment_kernel: bool,
) -> LookupPlan:
    """Plans a combined lookup; ``rows`` (sorted) gives the output row of every id.

    ``segment_kernel`` selects the rules of TF's unweighted ``sparse_segment_*`` kernels (block
    summation order; ``1/n`` factors below 10 entries); otherwise the rules of ``segment_sum``
    and of the ragged reduction (sequential order, true division).
    """
    slots = _slots(rows, num_rows, block_order=segment_kernel)
    head_w = block_w = overflow_w = None
    if weights is not None:
        padded = np.concatenate([weights.astype(np.float32), np.zeros(1, np.float32)])
        head_w, block_w = padded[slots.positions], padded[slots.blocks]
        overflow_w = padded[slots.overflow]
    scale = divisor = None
    if combiner != "sum":
        if weights is None:
            n = np.bincount(rows, minlength=num_rows).astype(np.float32)
            denom = n if combiner == "mean" else np.sqrt(n)
        elif combiner == "mean":
            denom = _sequential_row_sums(rows, weights, num_rows)
        else:
            denom = np.sqrt(_sequential_row_sums(rows, weights * weights, num_rows))
        if segment_kernel:  # sparse_segment_mean/sqrt_n: acc * (1/denom) below 10 entries
            small = n < 10
            with np.errstate(divide="ignore"):
                scale = np.where(small & (n > 0), np.float32(1) / denom, np.float32(1))
            divisor = np.where(small, np.where(n > 0, np.float32(1), np.float32(0)), denom)
            scale, divisor = scale.astype(np.float32), divisor.astype(np.float32)
        else:
            divisor = denom.astype(np.float32)
    return LookupPlan(
        "combine",
        shape,
        ids,
        slots.positions,
        head_w,
        slots.blocks,
        block_w,
        scale,
        divisor,
        slots.overflow,
        overflow_w,
        slots.overflow_rows,
    )


def _sequence_plan(
    ids: np.ndarray, rows: np.ndarray, cols: np.ndarray, num_rows: int, length: int, shape
) -> LookupPlan:
    keep = cols < length
    positions = np.full((num_rows, length), int(keep.sum()), np.int32)
    positions[rows[keep], cols[keep]] = np.arange(int(keep.sum()), dtype=np.int32)
    return LookupPlan("sequence", shape, ids[keep], positions)


def _plan_dense(path, feature, ids) -> LookupPlan:
    if is_traced(ids):
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"Ids of {_name(path, feature)} must be integers, got {ids.dtype}.")
        flat = _traced_ids(path, feature, ids.reshape(-1))
        return LookupPlan("gather", tuple(ids.shape), flat, jnp.arange(flat.shape[0]))
    ids = np.asarray(ids)
    checked = _check_ids(path, feature, ids.reshape(-1), _NEGATIVE_RAISES)
    return LookupPlan("gather", ids.shape, checked, np.arange(checked.shape[0], dtype=np.int32))


def _plan_sparse(path: str, feature: FeatureConfig, sp: Sparse, w: Sparse | None) -> LookupPlan:
    _concrete(path, feature, "Sparse", sp.indices, sp.values)
    shape, idx, ids = sp.dense_shape, sp.indices, sp.values
    _check_ids(path, feature, np.zeros(0, ids.dtype))  # dtype check first
    rank = len(shape)
    if rank < 2:
        raise ValueError(
            f"Sparse input of {_name(path, feature)} has rank {rank} (dense_shape {shape}); "
            "sparse ids need rank >= 2: [batch, ids per example]."
        )
    weights = None
    if w is not None:
        _concrete(path, feature, "Sparse weights", w.indices, w.values)
        if w.dense_shape != shape or not np.array_equal(w.indices, idx):
            raise ValueError(
                f"Sparse weights of {_name(path, feature)} must have the same indices and "
                f"dense_shape as the ids (dense_shape {w.dense_shape} vs {shape})."
            )
        weights = _weights(path, feature, w.values)

    if feature.max_sequence_length > 0 and feature.output_shape is None and rank == 2:
        length = feature.max_sequence_length
        # tf.sparse.slice first drops columns >= L; only the ids left are looked up.
        kept = np.nonzero(idx[:, 1] < length)[0]
        order = kept[np.argsort(idx[kept, 0], kind="stable")]
        checked = _check_ids(path, feature, ids[order], _NEGATIVE_RAISES)
        rows, cols = idx[order, 0], idx[order, 1]
        return _sequence_plan(checked, rows, cols, shape[0], length, (shape[0], length))
    if feature.max_sequence_length > 0:
        warnings.warn(
            f"max_sequence_length={feature.max_sequence_length} of {_name(path, feature)} is "
            f"ignored for a rank-{rank} sparse input or when output_shape is set (as in TF).",
            stacklevel=3,
        )

    combiner = feature.table.combiner
    safe = feature.validate_weights_and_indices or rank > 2
    rows = np.ravel_multi_index(tuple(idx[:, :-1].T), shape[:-1]) if idx.size else idx[:, 0]
    keep = np.ones(ids.shape[0], bool)
    if safe:  # tf.nn.safe_embedding_lookup_sparse: prune ids < 0, and weights <= 0 unless sum
        keep &= ids >= 0
        if weights is not None and combiner != "sum":
            keep &= weights > 0
    order = np.nonzero(keep)[0][np.argsort(rows[keep], kind="stable")]
    hint = "" if safe else "With validate_weights_and_indices=False negative ids are not pruned."
    checked = _check_ids(path, feature, ids[order], hint)
    return _combine_plan(
        checked,
        None if weights is None else weights[order],
        rows[order],
        math.prod(shape[:-1]),
        combiner,
        tuple(shape[:-1]),
        segment_kernel=weights is None,
    )


def _plan_ragged(path: str, feature: FeatureConfig, rg: Ragged, w: Ragged | None) -> LookupPlan:
    _concrete(path, feature, "Ragged", rg.values, rg.row_splits)
    batch = rg.nrows
    lengths = rg.row_lengths()
    rows = np.repeat(np.arange(batch), lengths)
    ids = _check_ids(path, feature, rg.values, _NEGATIVE_RAISES)
    weights = None
    if w is not None:
        _concrete(path, feature, "Ragged weights", w.values, w.row_splits)
        if not np.array_equal(w.row_splits, rg.row_splits):
            raise ValueError(
                f"Ragged weights of {_name(path, feature)} must have the same row_splits as the "
                f"ids, got {np.asarray(w.row_splits).tolist()} vs {rg.row_splits.tolist()}."
            )
        weights = _weights(path, feature, w.values)

    out_shape = feature.output_shape
    if out_shape is not None:
        if any(d is None for d in out_shape):
            raise ValueError(
                f"output_shape {out_shape} of {_name(path, feature)} must be fully defined for "
                "ragged inputs."
            )
        out_shape = tuple(int(d or 0) for d in out_shape)  # fully defined, checked above
        size = math.prod(out_shape)
        if size == batch:
            return _combine_plan(
                ids, weights, rows, batch, feature.table.combiner, out_shape, segment_kernel=False
            )
        if batch > 0 and size > batch and size % batch == 0:
            # TF's ragged sequence mode: weights and the combiner are not used.
            return _sequence_plan(ids, rows, _ragged_cols(rg), batch, size // batch, out_shape)
        raise ValueError(
            f"Output shape set in the FeatureConfig should be the factor of the input data batch "
            f"size. But instead got output shape {out_shape}, input data batch size {batch}, for "
            f"{_name(path, feature)}. Use an output_shape whose product is the batch size "
            "(combined) or a multiple of it (positions per example)."
        )
    if feature.max_sequence_length > 0:
        length = feature.max_sequence_length
        return _sequence_plan(ids, rows, _ragged_cols(rg), batch, length, (batch, length))
    return _combine_plan(
        ids, weights, rows, batch, feature.table.combiner, (batch,), segment_kernel=False
    )


def _ragged_cols(rg: Ragged) -> np.ndarray:
    """Each value's position within its row."""
    lengths = rg.row_lengths()
    return np.arange(int(lengths.sum())) - np.repeat(rg.row_splits[:-1], lengths)


def is_dense_input(x: Any) -> bool:
    """Whether an input leaf is a dense id array (not ``Sparse`` or ``Ragged``)."""
    return isinstance(x, (np.ndarray, np.generic, jax.Array))


def plan_feature(path: str, inp: Any, weight: Any, feature: FeatureConfig) -> LookupPlan:
    """Validates one feature's input (and weights) and plans its lookup, with TF's rules and
    the feature's ``out_of_range`` policy."""
    plan = _plan_feature(path, inp, weight, feature)
    if feature.out_of_range == "zero" and not is_traced(plan.ids):
        return _drop_marked(plan)
    return plan


def tpu_dense_shape(path: str, feature: FeatureConfig, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The activation shape (without ``dim``) ``TPUEmbedding`` gives dense ids of ``shape``.

    TF's ``TPUEmbedding.enqueue`` treats every dense id as an example of its own and takes "the
    input shape excluding the last dimension" for rank >= 2 ids, whose last dimension must be 1
    (tensorflow/python/tpu/tpu_embedding_v2.py, ``_get_input_shape_for_tensor`` and
    ``_get_output_shapes_from_input_shapes``: ``output_shapes.append(input_shape[:-1])``):
    ``[B]`` -> ``[B]``, ``[B, 1]`` -> ``[B]``, ``[B, S, 1]`` -> ``[B, S]``. ``max_sequence_length``
    does not change it (a last dimension of 1 adds no sequence axis). ``output_shape`` (applied
    by ``plan_training_feature``) takes precedence.

    Where TF raises (rank >= 2 with a last dimension other than 1), the shape is kept, one
    output position per id: ``[B, k]`` -> ``[B, k]``, as ``embedding_lookup`` does.
    """
    if not shape:
        raise ValueError(
            f"Only rank 1 and above dense tensor is supported: {_name(path, feature)} is a "
            "scalar. Give it a batch dimension, e.g. ids[None]."
        )
    if len(shape) >= 2 and shape[-1] == 1:
        return tuple(shape[:-1])
    return tuple(shape)


def _training_output_shape(
    path: str, feature: FeatureConfig, ids_shape: tuple[int, ...], shape: tuple[int, ...]
) -> tuple[int, ...]:
    """``shape``, or the feature's ``output_shape`` where ``TPUEmbedding`` takes it.

    TF's ``_check_output_shapes`` (tpu_embedding_v2.py): a set ``output_shape`` of higher rank
    than an incoming rank-1 or rank-2 shape is taken as is (TF checks it in the enqueue op; here
    it must hold as many ids); otherwise it must equal the incoming shape.
    """
    if feature.output_shape is None:
        return shape
    out = tuple(int(d) if d is not None else -1 for d in feature.output_shape)
    higher = len(shape) in (1, 2) and len(out) > len(shape)
    if (out == shape or higher) and math.prod(out) == math.prod(shape) and min(out) >= 0:
        return out
    raise ValueError(
        f"Inconsistent shape founded for input feature {path}, Output shape is set to be "
        f"{feature.output_shape}, But got incoming output shape {shape} (from dense ids of shape "
        f"{list(ids_shape)} of {_name(path, feature)}; TPUEmbedding drops a last dimension of 1). "
        "Give the output_shape of the ids (or, for rank-1 or rank-2 ids, one of higher rank with "
        "one position per id), or drop output_shape."
    )


def plan_training_feature(path: str, inp: Any, weight: Any, feature: FeatureConfig) -> LookupPlan:
    """``plan_feature`` with the dense-input rules of TF's ``TPUEmbedding.enqueue``, for
    ``Embedding.preprocess``.

    Sparse and ragged inputs are planned as ``plan_feature`` plans them. Dense ids follow
    ``TPUEmbedding`` rather than ``serving_embedding_lookup``: a trailing dimension of 1 is
    dropped (``tpu_dense_shape``: ``[B, 1]`` -> ``[B, dim]``, where the serving lookup gives
    ``[B, 1, dim]``), a sequence feature accepts dense ids (its ``max_sequence_length`` does not
    apply to them), a set ``output_shape`` is applied as ``TPUEmbedding`` applies it (it must
    hold one position per id), and weights are refused with TF's TPU message. Dense ids that
    ``TPUEmbedding`` refuses (rank >= 2, last dimension not 1) follow ``plan_feature``, i.e.
    ``embedding_lookup``: a plain gather ``[B, k, dim]``, ``output_shape`` ignored, refused for
    a sequence feature.
    """
    if not is_dense_input(inp):
        return plan_feature(path, inp, weight, feature)
    if weight is not None:
        raise ValueError(
            f"Weight specified for dense input {path}, which is not allowed. Weight will always "
            f"be 1 in this case. Drop the weights of {_name(path, feature)}, or pass its ids as "
            "je.Ragged or je.Sparse to weight them."
        )
    ids_shape = tuple(np.shape(inp))
    shape = tpu_dense_shape(path, feature, ids_shape)
    if len(shape) >= 2 and shape == ids_shape:  # TPUEmbedding refuses: embedding_lookup's rules
        return plan_feature(path, inp, weight, feature)
    plan = _plan_dense(path, feature, inp)
    plan = dataclasses.replace(plan, shape=_training_output_shape(path, feature, ids_shape, shape))
    if feature.out_of_range == "zero" and not is_traced(plan.ids):
        return _drop_marked(plan)
    return plan


def _plan_feature(path: str, inp: Any, weight: Any, feature: FeatureConfig) -> LookupPlan:
    name = _name(path, feature)
    if weight is not None:
        if is_dense_input(inp):
            raise ValueError(f"Weight specified for {path}, but input is dense. ({name})")
        if type(weight) is not type(inp):
            raise ValueError(
                f"Weight for {path} is of type {type(weight).__name__} but it does not match "
                f"type of the input which is {type(inp).__name__}. Give weights of the same kind "
                f"(Sparse or Ragged, same layout) as the ids of {name}."
            )
        if feature.max_sequence_length > 0:
            raise ValueError(
                f"Weight specified for {path}, but this is a sequence feature "
                f"(max_sequence_length={feature.max_sequence_length}). Drop the weights of {name}."
            )
    if is_dense_input(inp):
        if feature.max_sequence_length > 0:
            raise ValueError(
                f"Feature {path} is a sequence feature but a dense tensor was passed. Pass a "
                f"Sparse or Ragged input for {name}."
            )
        return _plan_dense(path, feature, inp)
    if isinstance(inp, Sparse):
        return _plan_sparse(path, feature, inp, weight)
    if isinstance(inp, Ragged):
        return _plan_ragged(path, feature, inp, weight)
    raise ValueError(
        f"Input {path} is type {type(inp).__name__}. An integer array, je.Sparse or je.Ragged "
        f"expected for {name}."
    )


# ---------------------------------------------------------------------------------------------
# Static capacities: plans re-pointed at gathered rows and padded to bucketed sizes.


def bucket(n: int, minimum: int = 1) -> int:
    """Capacity for ``n`` items: the next power of two (at least ``minimum``).

    Padding to a few fixed sizes lets a jitted step reuse its compilation across batches.
    """
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


FINE_ROW_BUCKETS_FROM = 512
"""Past this many distinct rows, ``row_bucket`` steps by quarters of a power of two."""


def row_bucket(n: int, minimum: int = 1) -> int:
    """Capacity for ``n`` distinct rows: the next power of two up to ``FINE_ROW_BUCKETS_FROM``
    (512), then the next quarter step between powers of two (640, 768, 896, 1024, 1280, ...).

    What a step moves grows with the capacity, padding included: the gradient rows it zeroes,
    and on a mesh the rows every device sends and receives in its ``all_to_all``. Quarter steps
    pad by under 25% where powers of two pad by up to 100%, for at most four compiled sizes
    per doubling of the distinct rows.

    >>> [row_bucket(n) for n in (3, 512, 513, 1025, 26003)]
    [4, 512, 640, 1280, 28672]
    """
    n = max(int(n), minimum)
    if n <= FINE_ROW_BUCKETS_FROM:
        return bucket(n)
    step = 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


def slot_bucket(n: int) -> int:
    """Capacity for ``n`` slots per example: powers of two up to 8, then multiples of 8 up to 64.

    Slots are summed per example, so padding costs in proportion: 39 ids take 40 slots, not 64.
    """
    n = max(int(n), 1)
    if n <= 8 or n > 64:
        return bucket(n)
    return -(-n // 8) * 8


def pad_axis(x: np.ndarray | None, axis: int, size: int, fill: float) -> np.ndarray | None:
    """``x`` padded with ``fill`` to ``size`` along ``axis`` (None stays None)."""
    if x is None or x.shape[axis] == size:
        return x
    out = np.full((*x.shape[:axis], size, *x.shape[axis + 1 :]), fill, x.dtype)
    out[(slice(None),) * axis + (slice(0, x.shape[axis]),)] = x
    return out


def remap_plan(
    plan: LookupPlan, index: np.ndarray, capacity: int, head: int, tail: int, overflow: int = 0
) -> LookupPlan:
    """Points a plan's slots at gathered rows: ``plan.ids[i]`` is now row ``index[i]`` of an
    array of ``capacity`` rows (``capacity`` = no entry); pads the head to ``head`` slots, the
    tail to ``tail`` blocks and the overflow to ``overflow`` blocks (0: the overflow fields
    become None)."""
    lookup = np.empty(index.shape[0] + 1, np.int32)
    lookup[:-1], lookup[-1] = index, capacity
    changes: dict[str, Any] = {"ids": None, "positions": np.take(lookup, plan.positions)}
    if plan.mode == "combine":
        changes["positions"] = pad_axis(changes["positions"], 1, head, capacity)
        changes["weights"] = pad_axis(plan.weights, 1, head, 0.0)
        changes["blocks"] = pad_axis(np.take(lookup, plan.blocks), 1, tail, capacity)
        changes["block_weights"] = pad_axis(plan.block_weights, 1, tail, 0.0)
        changes.update(_remap_overflow(plan, lookup, capacity, overflow))
    return dataclasses.replace(plan, **changes)


def _remap_overflow(plan: LookupPlan, lookup: np.ndarray, capacity: int, size: int) -> dict:
    """The overflow fields of ``remap_plan``: re-pointed and padded to ``size`` blocks (padding:
    no entry, weight 0, row ``R``)."""
    have = 0 if plan.overflow is None else plan.overflow.shape[0]
    if have > size:
        raise ValueError(f"Overflow capacity {size} is below the plan's {have} overflow blocks.")
    if size == 0:
        return {"overflow": None, "overflow_weights": None, "overflow_rows": None}
    return {
        "overflow": pad_axis(lookup[plan.overflow], 0, size, capacity),
        "overflow_weights": pad_axis(plan.overflow_weights, 0, size, 0.0),
        "overflow_rows": pad_axis(plan.overflow_rows, 0, size, math.prod(plan.shape)),
    }


def rest_blocks(counts: np.ndarray) -> int:
    """The blocks of 8 that ``Uses`` needs for rows used ``counts`` times (each row's uses
    after its first).

    Example:
        >>> rest_blocks(np.array([0, 1, 2, 9, 10]))
        4
    """
    return int(((np.asarray(counts, np.int64) + 6) // _BLOCK).sum())


def transpose_slots(
    slots: np.ndarray, weights: np.ndarray | None, num_rows: int, blocks: int
) -> _kernels.Uses:
    """The ``Uses`` of a part's slots: ``slots`` ``[R, ...]`` holds, for each of its ``R``
    cotangent rows, the gradient rows it adds to (``num_rows`` or beyond, or below 0: none),
    ``weights`` their weights (or None); ``blocks`` of 8 further uses, at least
    ``rest_blocks`` of the row counts.

    Example:
        >>> uses = transpose_slots(np.array([[0, 2], [0, 3]]), None, num_rows=3, blocks=1)
        >>> uses.first.tolist(), uses.rest.tolist(), uses.rest_rows.tolist()
        ([0, 2, 0], [[1, 2, 2, 2, 2, 2, 2, 2]], [0])
    """
    native = _distinct.transpose(slots, weights, num_rows, blocks)
    used, *arrays = native if native is not None else _transpose(slots, weights, num_rows, blocks)
    if used > blocks:
        raise ValueError(f"Uses need {used} blocks, more than the {blocks} planned.")
    return _kernels.Uses(*arrays)


def _transpose(slots: np.ndarray, weights: np.ndarray | None, num_rows: int, blocks: int):
    """``transpose_slots`` in numpy (without the compiled helper): ``(blocks used, first,
    first_w, rest, rest_w, rest_rows)``, the arrays unfilled when more blocks are used."""
    rows = slots.shape[0]
    flat = slots.reshape(-1)
    width = flat.size // rows if rows else 1
    at = np.flatnonzero((flat >= 0) & (flat < num_rows))
    held = flat[at]
    # A stable radix sort when the rows fit 16 bits: each row's uses in slot order.
    order = np.argsort(held.astype(np.uint16) if num_rows <= 1 << 16 else held, kind="stable")
    at, held = at[order], held[order]
    cot_rows = (at // width).astype(np.int32)
    counts = np.bincount(held, minlength=num_rows)
    per_row = (counts + 6) // _BLOCK  # blocks of each gradient row's further uses
    used = int(per_row.sum())
    if used > blocks:
        return used, None, None, None, None, None
    rank = np.arange(held.size) - (np.cumsum(counts) - counts)[held]  # 0: the row's first use
    lead = np.flatnonzero(rank == 0)
    first = np.full(num_rows, rows, np.int32)
    first[held[lead]] = cot_rows[lead]
    later = np.flatnonzero(rank)
    # Use k > 0 of row p goes to slot k - 1 of p's blocks, which start at block_start[p].
    at_slot = ((np.cumsum(per_row) - per_row) * _BLOCK)[held[later]] + rank[later] - 1
    rest = np.full(blocks * _BLOCK, rows, np.int32)
    rest[at_slot] = cot_rows[later]
    rest_rows = np.full(blocks, num_rows, np.int32)
    rest_rows[:used] = np.repeat(np.arange(num_rows, dtype=np.int32), per_row)
    first_w = rest_w = None
    if weights is not None:
        w = weights.reshape(-1)[at].astype(np.float32)
        first_w = np.zeros(num_rows, np.float32)
        first_w[held[lead]] = w[lead]
        rest_w = np.zeros((blocks, _BLOCK), np.float32)
        rest_w.reshape(-1)[at_slot] = w[later]
    return used, first, first_w, rest.reshape(blocks, _BLOCK), rest_w, rest_rows


def transpose_plan(plan: LookupPlan, num_rows: int, blocks: int) -> LookupPlan:
    """``plan`` (remapped: its slots index ``num_rows`` gathered rows) with the ``Uses`` of
    its slot-cotangent parts (``slot_cotangents``): ``blocks`` blocks of further uses for the
    head and tail slots, and for the overflow at most its slots' count."""
    if plan.mode != "combine":
        slots = np.asarray(plan.positions).reshape(-1, 1)
        return dataclasses.replace(plan, uses=transpose_slots(slots, None, num_rows, blocks))
    tail = (plan.blocks.shape[0], math.prod(plan.blocks.shape[1:]))  # [R, T * 8]
    slots = np.concatenate([plan.positions, plan.blocks.reshape(tail)], axis=1)
    weights = None
    if plan.weights is not None:
        tail_w = plan.block_weights
        if tail_w is None:  # tail slots without weights add nothing (as in slot_grads)
            tail_w = np.zeros(tail, np.float32)
        weights = np.concatenate([plan.weights, tail_w.reshape(tail)], axis=1)
    uses = transpose_slots(slots, weights, num_rows, blocks)
    over = None
    if plan.has_overflow:
        over_slots = np.asarray(plan.overflow)
        over_blocks = min(blocks, over_slots.size)
        over = transpose_slots(over_slots, plan.overflow_weights, num_rows, over_blocks)
    return dataclasses.replace(plan, uses=uses, overflow_uses=over)


# ---------------------------------------------------------------------------------------------
# Device side: gather and sum in TF's order.


def _finish(acc: jax.Array, plan: LookupPlan) -> jax.Array:
    """A combined plan's slot sums ``[R, dim]`` scaled and divided, in the output shape."""
    if plan.scale is not None:
        acc = acc * jnp.asarray(plan.scale, acc.dtype)[:, None]
    if plan.divisor is not None:
        divisor = jnp.asarray(plan.divisor, acc.dtype)[:, None]
        empty = divisor == 0
        # XLA rewrites x / broadcast(d) as x * (1 / d), which rounds differently from TF's true
        # division; dividing by a materialised full-shape divisor keeps it a division.
        safe = jax.lax.optimization_barrier(
            jnp.broadcast_to(jnp.where(empty, 1, divisor), acc.shape)
        )
        acc = jnp.where(empty, jnp.zeros((), acc.dtype), acc / safe)
    return acc.reshape(*plan.shape, acc.shape[-1])


def combine_rows(rows: jax.Array, plan: LookupPlan, ids: Any = None) -> jax.Array:
    """Places or combines ``rows`` (``[N, dim]``, one per ``plan.ids``) per ``plan``.

    With ``ids`` (``[N]``), row ``i`` is ``rows[ids[i]]`` instead: the lookup reads a table
    through the distinct ids of a batch, with no gathered copy on CPU (an id outside the table,
    such as the padding id ``vocabulary_size``, reads zeros).

    Pure and linear in ``rows``: its VJP gives each row ``coeff * dL/dact`` summed over the
    slots that use it, the gradient TF's TPU embedding applies.
    """
    dim = rows.shape[1]
    if plan.mode != "combine":  # slot N (no entry) reads a zero row
        slots = jnp.asarray(plan.positions).reshape(-1)
        if ids is not None:
            ids = jnp.asarray(ids)
            slots = jnp.concatenate([ids, jnp.full((1,), -1, ids.dtype)])[slots]
        return gather_rows(rows, slots).reshape(*plan.shape, dim)
    sums = _kernels.slot_sums(
        rows, plan.positions, plan.weights, plan.blocks, plan.block_weights, ids=ids
    )
    if plan.has_overflow:
        sums = _kernels.overflow_sums(
            sums, rows, plan.overflow, plan.overflow_weights, plan.overflow_rows, ids=ids
        )
    return _finish(sums, plan)


def slot_cotangents(plan: LookupPlan, cot: jax.Array) -> tuple[tuple[Any, ...], ...]:
    """``dL/d(activation)`` of ``plan`` as one or two parts ``(cot, head, head_w, blocks,
    block_w, uses)``: the row gradient of gathered row ``p`` is the sum, over the parts, of
    ``(w *) cot[r]`` over the slots holding ``p`` (``_kernels.slot_grads``; ``uses``: the
    plan's ``Uses`` of the part, or None). Sequence and dense positions
    are slots of their own; a plan's overflow blocks are a second part, each block a head of its
    own with its row's cotangent."""
    dim = cot.shape[-1]
    if plan.mode != "combine":
        head = jnp.asarray(plan.positions).reshape(-1, 1)
        blocks = jnp.zeros((head.shape[0], 0, _BLOCK), jnp.int32)
        return ((cot.reshape(-1, dim), head, None, blocks, None, plan.uses),)
    rows = math.prod(plan.shape)
    # _finish is linear in the sums: its VJP does not depend on their values.
    _, vjp = jax.vjp(lambda acc: _finish(acc, plan), jnp.zeros((rows, dim), cot.dtype))
    (cot_sums,) = vjp(cot)
    main = (cot_sums, plan.positions, plan.weights, plan.blocks, plan.block_weights, plan.uses)
    if not plan.has_overflow:
        return (main,)
    over_rows = jnp.asarray(plan.overflow_rows)
    over_cot = jnp.take(cot_sums, over_rows, axis=0, mode="fill", fill_value=0)
    no_blocks = jnp.zeros((over_rows.shape[0], 0, _BLOCK), jnp.int32)
    over = (over_cot, plan.overflow, plan.overflow_weights, no_blocks, None, plan.overflow_uses)
    return main, over


def gather_rows(table: jax.Array, ids: Any) -> jax.Array:
    """``table[ids]``; an id outside ``[0, vocabulary_size)`` (e.g. the padding id
    ``vocabulary_size``) gives a zero row. A CPU kernel on CPU, ``jnp.take`` elsewhere."""
    return _kernels.gather_rows(table, ids)


def simulate_quantization(rows: jax.Array, config: QuantizationConfig) -> jax.Array:
    """``rows`` clipped to ``[lower, upper]`` and quantized to ``config.num_buckets`` levels.

    The TPU embedding's simulated quantization (``optimization_parameters.proto``,
    ``SimulatedQuantization``), elementwise in float32 (the result in ``rows.dtype``)::

        x = clip(x, lower, upper)
        x = floor((x - lower) / quantum + 0.5) * quantum + lower

    with ``lower``, ``upper`` and ``quantum = (upper - lower) / (num_buckets - 1)`` the float32
    values of ``config.float32_parameters()``: a true division, the product rounded before
    ``lower`` is added. Bit for bit ``config.quantize`` (numpy) and the serving graph's
    ``export._simulated_quantization.simulate`` (TF). NaN stays NaN.

    Its derivative is the identity (straight-through, as on TPU: "the backward pass operations
    are unchanged"), also where ``x`` was clipped.
    """
    return _simulate(rows, config)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _simulate(rows: jax.Array, config: QuantizationConfig) -> jax.Array:
    lower, upper, quantum = (jnp.asarray(v, jnp.float32) for v in config.float32_parameters())
    x = jnp.asarray(rows).astype(jnp.float32)
    clipped = jnp.where(x < lower, lower, jnp.where(x > upper, upper, x))
    # XLA rewrites x / broadcast(q) as x * (1 / q) (then fused with the + 0.5 into an FMA),
    # which rounds differently from the formula and from TF: divide by a materialised
    # full-shape step, as _finish does.
    steps = jax.lax.optimization_barrier(jnp.broadcast_to(quantum, x.shape))
    level = jnp.floor((clipped - lower) / steps + jnp.float32(0.5))
    # XLA:CPU also fuses level * quantum + lower into an FMA (under jit, not op by op): the
    # product is rounded first by adding it and lower to a zero in a two-trip loop.
    terms = jnp.stack([level * quantum, jnp.broadcast_to(lower, x.shape)])
    out, _ = jax.lax.scan(lambda acc, term: (acc + term, None), jnp.zeros_like(x), terms)
    return out.astype(jnp.asarray(rows).dtype)


@_simulate.defjvp
def _simulate_jvp(
    config: QuantizationConfig, primals: tuple, tangents: tuple
) -> tuple[jax.Array, jax.Array]:
    (rows,), (dot,) = primals, tangents
    return _simulate(rows, config), dot


def quantize_source(
    rows: jax.Array, ids: Any, config: QuantizationConfig | None
) -> tuple[jax.Array, Any]:
    """``combine_rows``'s ``(rows, ids)`` with the rows a lookup reads quantized per ``config``.

    With ``ids``, only the rows they name are gathered and quantized (the cost follows the ids,
    not the table), and ids outside the table (the padding id ``vocabulary_size``) keep reading
    a zero row; returns ``(quantized rows, None)``. Without ``ids``, ``rows`` are the fetched
    rows themselves. ``config`` None: ``(rows, ids)`` unchanged.
    """
    if config is None:
        return rows, ids
    if ids is None:
        return simulate_quantization(rows, config), None
    ids = jnp.asarray(ids)
    inside = (ids >= 0) & (ids < rows.shape[0])
    quantized = simulate_quantization(gather_rows(rows, ids), config)
    return jnp.where(inside[:, None], quantized, jnp.zeros((), quantized.dtype)), None


def apply_plan(
    table: jax.Array, plan: LookupPlan, quantization: QuantizationConfig | None = None
) -> jax.Array:
    """Gathers and combines ``table`` rows as ``plan`` says; returns ``plan.shape + (dim,)``.

    With ``quantization`` (the table's ``QuantizationConfig``) the gathered rows are quantized
    before they are combined.

    Compiled once per plan shape: one XLA program instead of one dispatch per operation. An
    empty overflow (``[0, w]``) is dropped first: without long rows, no overflow operands.
    """
    if plan.overflow is not None and not plan.has_overflow:
        plan = dataclasses.replace(plan, overflow=None, overflow_weights=None, overflow_rows=None)
    return _apply_plan(table, plan, quantization)


@functools.partial(jax.jit, static_argnums=2)
def _apply_plan(
    table: jax.Array, plan: LookupPlan, quantization: QuantizationConfig | None
) -> jax.Array:
    rows, ids = quantize_source(table, plan.ids, quantization)
    return combine_rows(rows, plan, ids=ids)


# ---------------------------------------------------------------------------------------------
# Public entry point.


def _table_for(tables: Mapping, path: str, feature: FeatureConfig) -> jax.Array:
    table_config: TableConfig = feature.table
    try:
        table = tables[table_config]
    except KeyError:
        raise ValueError(
            f"No table for {table_config!r} (used by {_name(path, feature)}) in `tables`. "
            "`tables` maps each TableConfig object to its [vocabulary_size, dim] array; "
            "configs are matched by identity, so pass the same TableConfig objects."
        ) from None
    expected = (table_config.vocabulary_size, table_config.dim)
    if table_config.vocabulary_size > _INT32_MAX - 1:
        raise ValueError(
            f"Table {table_config.name or '(unnamed)'!r} has {table_config.vocabulary_size} "
            f"rows; je.embedding_lookup reads one array with int32 row numbers (at most "
            f"{_INT32_MAX - 1} rows). Split larger tables over devices with je.Embedding."
        )
    if tuple(np.shape(table)) != expected:
        raise ValueError(
            f"Table {table_config.name or '(unnamed)'!r} used by {_name(path, feature)} has shape "
            f"{tuple(np.shape(table))}, but its TableConfig needs {expected} "
            "([vocabulary_size, dim])."
        )
    return jnp.asarray(table)


def _same_container(a: Any, b: Any) -> bool:
    """Whether two containers count as the same type for ``tf.nest.assert_same_structure``
    (``check_types=True``): any two mappings (dict, OrderedDict, ...), namedtuples of the same
    name and fields, or else the same type (a list is not a tuple)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return True
    if _nest._is_namedtuple(a) and _nest._is_namedtuple(b):
        return type(a).__name__ == type(b).__name__ and type(a)._fields == type(b)._fields
    return type(a) is type(b)


def structure_difference(
    expected: Any, given: Any, path: str = "", names: tuple[str, str] = ("feature_config", "this")
) -> tuple[type[Exception], str] | None:
    """Where ``given`` first differs from ``expected`` in nesting, in the order of TF's
    ``nest.assert_same_structure`` checks: ``(TypeError, ...)`` for another container type,
    ``(ValueError, ...)`` for a leaf where a container is due (or the reverse), other keys or
    another length; None if they match. ``names`` name the two in the description."""
    ce, cg = _nest._children(expected), _nest._children(given)
    one, other = names
    where = f"at {path!r}" if path else "at the top level"
    if ce is None and cg is None:
        return None
    if ce is None or cg is None:
        want = "a feature" if ce is None else f"a {type(expected).__name__}"
        got = f"a leaf ({type(given).__name__})" if cg is None else f"a {type(given).__name__}"
        return ValueError, f"{where}: {one} has {want}, {other} has {got}"
    if not _same_container(expected, given):
        return TypeError, (
            f"{where}: {one} has a {type(expected).__name__}, {other} has a "
            f"{type(given).__name__}; use the same container type"
        )
    keys_e, keys_g = [k for k, _ in ce], [k for k, _ in cg]
    if keys_e != keys_g:
        what = "keys" if isinstance(expected, Mapping) else "number of elements"
        shown = (keys_e, keys_g) if what == "keys" else (len(keys_e), len(keys_g))
        return ValueError, f"{where}: {one} has {what} {shown[0]}, {other} has {shown[1]}"
    for (key, e), (_, g) in zip(ce, cg, strict=True):
        found = structure_difference(e, g, f"{path}/{key}" if path else key, names)
        if found:
            return found
    return None


def check_structure(feature_config: Any, given: Any, what: str, fix: str) -> None:
    """Raises unless ``given`` has the nested structure of ``feature_config``, as TF's
    ``TPUEmbedding`` checks its ``enqueue`` features and weights and its ``apply_gradients``
    gradients (``nest.assert_same_structure(self._feature_config, ...)``).

    Like ``tf.nest``: ``TypeError`` for another container type (a list where feature_config
    has a tuple), ``ValueError`` for missing or extra features. The message starts with TF's
    ("The two structures don't have the same nested structure."), names ``what``, the first
    place that differs and the feature paths missing or unexpected, and ends with ``fix``.

    Example:
        >>> import jaxembed as je
        >>> fc = {"a": je.FeatureConfig(je.TableConfig(4, 2)), "b": (je.FeatureConfig(
        ...     je.TableConfig(4, 2)),)}
        >>> try:
        ...     check_structure(fc, {"a": 0}, "inputs", "Pass every feature.")
        ... except ValueError as err:
        ...     for part in str(err).splitlines()[1].split("; "):
        ...         print(part)
        inputs: at the top level: feature_config has keys ['a', 'b'], this has ['a']
        missing features ['b/0'].
    """
    found = structure_difference(feature_config, given)
    if found is None:
        return
    error, detail = found
    expected = [p for p, _ in _nest.flatten_with_paths(feature_config)]
    have = [p for p, _ in _nest.flatten_with_paths(given)]
    missing = [p for p in expected if p not in have]
    extra = [p for p in have if p not in expected]
    parts = [f"missing features {missing}"] if missing else []
    parts += [f"unexpected paths {extra}"] if extra else []
    raise error(
        "The two structures don't have the same nested structure.\n"
        f"{what}: {detail}" + (f"; {', '.join(parts)}" if parts else "") + f".\n{fix}"
    )


def flatten_features(
    inputs: Any, weights: Any, feature_config: Any
) -> list[tuple[str, Any, Any, FeatureConfig]]:
    """Pairs every input leaf with its weight and FeatureConfig: ``[(path, input, weight,
    feature)]`` in ``tf.nest`` order, after TF's structure checks (inputs a subset of
    ``feature_config``; weights, if given, of the inputs' structure)."""
    flat_inputs = _nest.flatten_with_paths(inputs)
    if weights is None:
        flat_weights = [None] * len(flat_inputs)
    else:
        found = structure_difference(inputs, weights, names=("inputs", "weights"))
        if found:  # as TF's nest.assert_same_structure(inputs, weights)
            error, mismatch = found
            raise error(
                "The two structures don't have the same nested structure: inputs and weights "
                f"differ {mismatch}. Give weights the structure of inputs (None for unweighted "
                "leaves)."
            )
        flat_weights = [w for _, w in _nest.flatten_with_paths(weights)]
    features = feature_paths(feature_config)
    missing = [p for p, _ in flat_inputs if p not in features]
    if missing:
        raise ValueError(
            f"Inputs are not a subset of feature_config. Inputs keys are "
            f"{sorted(p for p, _ in flat_inputs)}, but feature_config keys are "
            f"{sorted(features)}; {missing} have no FeatureConfig."
        )
    return [  # raw ids become rows here, on the host (features with a vocabulary)
        (
            path,
            map_input(f"feature {path!r}", inp, features[path].vocabulary),
            weight,
            features[path],
        )
        for (path, inp), weight in zip(flat_inputs, flat_weights, strict=True)
    ]


def feature_paths(feature_config: Any) -> dict[str, FeatureConfig]:
    """``{path: FeatureConfig}`` of a nested feature_config, in ``tf.nest`` order."""
    features = dict(_nest.flatten_with_paths(feature_config))
    for path, feature in features.items():
        if not isinstance(feature, FeatureConfig):
            raise ValueError(
                f"feature_config leaf {path!r} is {type(feature).__name__}, expected a "
                "je.FeatureConfig."
            )
    return features


def embedding_lookup(
    inputs: Any, weights: Any, tables: Mapping[TableConfig, Any], feature_config: Any
) -> Any:
    """Looks up embeddings for a nested structure of inputs: TF's ``serving_embedding_lookup``.

    Same signature and semantics as ``tf.tpu.experimental.embedding.serving_embedding_lookup``
    (tf_semantics §4): per input leaf, a dense integer array is a plain gather (output
    ``ids.shape + [dim]``); a ``Sparse`` or ``Ragged`` input is combined per example with its
    table's combiner (output ``[batch, dim]``, or ``dense_shape[:-1] + [dim]`` for higher-rank
    sparse), or, for a sequence feature, laid out as ``[batch, max_sequence_length, dim]``
    (sparse: position = column; ragged: left-aligned). Ragged inputs honour ``output_shape``.
    Sparse inputs with ``validate_weights_and_indices=True`` drop negative ids, and weights
    <= 0 unless the combiner is sum. Results are bit-identical to TF's for dense, ragged and
    unweighted sparse inputs.

    Deliberate differences from TF (all where TF raises or misbehaves): numpy arrays are dense
    inputs; float64 weights are cast to the table dtype; out-of-range ids raise ``ValueError``
    naming the feature, the id and the range; ``validate_weights_and_indices=False`` keeps
    trailing empty rows (TF drops them, P3); ragged ``output_shape`` works under ``jax.jit``
    (TF's fails in ``tf.function``, P6). A table with a ``quantization_config`` has its
    looked-up rows quantized before they are combined, as TF's TPU lookup does (TF's CPU
    ``serving_embedding_lookup`` ignores the config; see ``QuantizationConfig``).

    Dense ids keep their shape here, as in TF's serving lookup (``[B, 1]`` -> ``[B, 1, dim]``);
    ``Embedding.lookup`` follows TF's ``TPUEmbedding`` instead (``[B, 1]`` -> ``[B, dim]``; see
    ``plan_training_feature``).

    ``inputs`` (and ``weights``) are read on the host, so sparse and ragged inputs must be
    concrete arrays; ``tables`` may be traced, so ``jax.jit`` and ``jax.grad`` over the tables
    work. Dense ids may also be traced; traced ids outside ``[0, vocabulary_size)`` give zero
    rows (they cannot be checked on the host).

    Args:
        inputs: Nested structure (dicts, lists, tuples) of integer arrays, ``Sparse`` or
            ``Ragged``; its paths must be a subset of ``feature_config``'s.
        weights: None, or the same structure with float ``Sparse``/``Ragged`` weights (or None
            leaves).
        tables: Mapping ``TableConfig -> [vocabulary_size, dim]`` array.
        feature_config: Nested structure of ``FeatureConfig``.

    Returns:
        The activations, in the nested structure of ``inputs``.

    Raises:
        ValueError: Mismatched structures, bad ids, weights where TF forbids them, and the other
            error cases of TF, each naming the feature path.
        TypeError: Ids or weights of the wrong dtype.

    Example:
        >>> import numpy as np, jaxembed as je
        >>> table = je.TableConfig(vocabulary_size=4, dim=2, combiner="sum")
        >>> features = {"items": je.FeatureConfig(table)}
        >>> tables = {table: np.arange(8, dtype=np.float32).reshape(4, 2)}
        >>> ids = {"items": je.Ragged.from_row_lengths([0, 3, 1], [2, 1])}
        >>> je.embedding_lookup(ids, None, tables, features)["items"].tolist()
        [[6.0, 8.0], [2.0, 3.0]]
    """
    outputs = [
        apply_plan(
            _table_for(tables, path, feature),
            plan_feature(path, inp, weight, feature),
            feature.table.quantization_config,
        )
        for path, inp, weight, feature in flatten_features(inputs, weights, feature_config)
    ]
    return _nest.pack_like(inputs, outputs)
