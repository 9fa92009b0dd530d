"""The serving lookup in plain TF ops: one gather and one left-to-right segment sum per table.

Every serving input is a ragged row of ids (``ids`` plus per-example ``lengths``), so the
semantics are those of ``je.embedding_lookup`` on ``je.Ragged`` inputs (tf_semantics §4.5):
combined rows for ordinary features, left-aligned ``[batch, max_sequence_length, dim]`` for
sequence features, and ``output_shape`` honoured (also with a dynamic batch, where TF's own
function fails, P6).

The features that share a table are served together (``lookup``): their ids are concatenated
and gathered once (``gather_rows``, which also dequantizes a quantized table), and the combined
features are summed together, the segments being the examples of every feature in turn
(feature ``k``'s example ``b`` is segment ``k * batch + b``). TF's
``_ragged_embedding_lookup_with_reduce`` sums each example left to right (its ragged
``reduce_sum(axis=1)`` is an ``unsorted_segment_sum`` over the flat values in order), and so
does ``_Segments.sum`` with a fraction of ``unsorted_segment_sum``'s cost: ``segment_sum`` adds
each example's first 15 rows (left to right for so few rows), and ``unsorted_segment_sum``
adds that partial sum and the example's further rows in order. Offsetting the segments of a
feature changes no sum. The denominators are TF's: ``div_no_nan`` by the row length (the sum of
weights of one, exact), by ``Σw`` or by ``sqrt(Σ w*w)``, each summed in order the same way. So
the results are bit-identical to TF's ``serving_embedding_lookup`` and to
``je.embedding_lookup``.

Example:
    >>> import jaxembed as je
    >>> table = je.TableConfig(4, 2, combiner="sum", name="t")
    >>> variable = tf.Variable(tf.reshape(tf.range(8, dtype=tf.float32), [4, 2]))
    >>> a = FeatureIds("a", je.FeatureConfig(table), tf.constant([0, 1, 3], tf.int64),
    ...                tf.constant([2, 1], tf.int64))
    >>> b = FeatureIds("b", je.FeatureConfig(table), tf.constant([2], tf.int64),
    ...                tf.constant([0, 1], tf.int64))
    >>> out = lookup([a, b], lambda table, ids: tf.gather(variable, ids))
    >>> out["a"].numpy().tolist(), out["b"].numpy().tolist()
    ([[2.0, 4.0], [6.0, 7.0]], [[0.0, 0.0], [4.0, 5.0]])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from jaxembed.configs import FeatureConfig, TableConfig

from ._tf import tf

RowGather = Callable[[TableConfig, tf.Tensor], tf.Tensor]
"""``gather_rows(table, ids)``: the float32 rows ``[n, dim]`` of ``table`` for ``n`` ids, all in
``[0, vocabulary_size)``. The serving module gathers (and dequantizes) its stored table here."""


@dataclasses.dataclass(frozen=True)
class FeatureIds:
    """One feature's part of a serving request, already checked.

    Args:
        path: The feature path (named in run-time errors).
        feature: Its ``FeatureConfig``.
        ids: int64 ``[n]``, every id of the batch, row-major, after ``check_ids`` and its checks
            (an id ``-1`` of an ``out_of_range="zero"`` feature reads a zero row).
        lengths: int64 ``[batch]``, ids per example (non-negative, adding up to ``n``).
        weights: float32 ``[n]``, one per id, or None (a weight of one each).
    """

    path: str
    feature: FeatureConfig
    ids: tf.Tensor
    lengths: tf.Tensor
    weights: tf.Tensor | None = None


Check = tuple[tf.Tensor, str]
"""A run-time check of a request: a scalar bool that must hold, and the message (naming the
feature) an error shows when it does not."""


@dataclasses.dataclass(frozen=True)
class Guard:
    """Run-time checks of a request, cheap when they hold: ``ok``, one scalar bool (true when
    every check holds), is all a good request computes; ``checks()`` builds the checks one by
    one, each with its message, and runs only when ``ok`` is false (to say which failed)."""

    ok: tf.Tensor
    checks: Callable[[], Sequence[Check]]

    @staticmethod
    def of(checks: Sequence[Check]) -> Guard | None:
        """The guard of checks already built (None if there are none)."""
        if not checks:
            return None
        ok = checks[0][0] if len(checks) == 1 else tf.reduce_all(tf.stack([c for c, _ in checks]))
        return Guard(ok, lambda: checks)

    @staticmethod
    def all(guards: Sequence[Guard | None]) -> Guard | None:
        """One guard for all ``guards`` (None ones ignored): their checks in order."""
        given = [g for g in guards if g is not None]
        if len(given) <= 1:
            return given[0] if given else None
        ok = tf.reduce_all(tf.stack([g.ok for g in given])) if len(given) > 2 else None
        ok = tf.logical_and(given[0].ok, given[1].ok) if ok is None else ok
        return Guard(ok, lambda: [c for g in given for c in g.checks()])


def check_ids(
    path: str, ids: tf.Tensor, feature: FeatureConfig
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """The ids to gather under the feature's ``out_of_range`` policy, as in training, and, for
    ``"error"``, the check they must pass. ``"clamp"`` and ``"error"`` both gather the ids
    clamped into ``[0, vocabulary_size)`` (one op), so a gather can run before any check and
    never fails first; ``"error"`` also returns ``in_range``, whether clamping left each id as it
    was (pass it to ``range_guard``, and its ``assert_guard`` to ``lookup``). ``"zero"`` marks
    the ids outside the table ``-1`` (``lookup`` reads a zero row for them)."""
    vocabulary_size = feature.table.vocabulary_size
    if feature.out_of_range == "zero":
        top = tf.constant(vocabulary_size, ids.dtype)
        return tf.where((ids >= 0) & (ids < top), ids, -tf.ones_like(ids)), None
    low, top = tf.constant(0, ids.dtype), tf.constant(vocabulary_size - 1, ids.dtype)
    clamped = tf.raw_ops.ClipByValue(t=ids, clip_value_min=low, clip_value_max=top)
    return clamped, tf.equal(clamped, ids) if feature.out_of_range == "error" else None


def range_message(path: str, vocabulary_size: int) -> str:
    """The error of a feature with an id outside the table."""
    return f"feature {path}: ids must be in [0, {vocabulary_size}), the table vocabulary"


def range_guard(ranged: Sequence[tuple[str, tf.Tensor, int]]) -> Guard | None:
    """The guard that every id of each ``(path, in_range, vocabulary_size)`` was in
    ``[0, vocabulary_size)`` (``in_range`` from ``check_ids``): one ``All`` checks every feature
    at once."""
    if not ranged:
        return None
    in_range = [check for _, check, _ in ranged]
    flat = _concat(in_range)
    ok = tf.reduce_all(flat)
    # The failure branch takes only `flat` and the sizes (each tensor it takes is an op on every
    # request), and cuts `flat` back into the features.
    sizes = tf.concat(tf.shape_n(in_range, out_type=tf.int64), 0) if len(ranged) > 1 else None

    def checks() -> list[Check]:
        pieces = [flat] if sizes is None else tf.split(flat, sizes, num=len(ranged))
        return [
            (tf.reduce_all(piece), range_message(path, size))
            for piece, (path, _, size) in zip(pieces, ranged, strict=True)
        ]

    return Guard(ok, checks)


def assert_guard(guard: Guard | None) -> list[tf.Operation]:
    """One ``Assert`` that ``guard.ok`` holds (none without a guard). Its message, the messages
    of the failed checks, is built in the false branch of a ``tf.cond``: a good request runs
    only ``ok``, the ``cond``'s switches and the ``Assert`` (each op costs scheduling time on
    every request)."""
    if guard is None:
        return []

    def failed() -> tf.Tensor:
        checks = guard.checks()
        if len(checks) == 1:
            return tf.constant(checks[0][1])
        ok = tf.stack([c for c, _ in checks])
        messages = tf.constant([f"{m}; " for _, m in checks])
        return tf.strings.reduce_join(tf.where(ok, tf.constant(""), messages))

    message = tf.cond(guard.ok, lambda: tf.constant(""), failed)
    return [tf.debugging.Assert(guard.ok, [message])]


def lookup(
    features: Sequence[FeatureIds],
    gather_rows: RowGather,
    *,
    checked: Sequence[tf.Operation] = (),
) -> dict[str, tf.Tensor]:
    """Every feature's activations, by path: one ``gather_rows`` call per table.

    All features must have the same batch (the caller checks it), and their ids are
    ``check_ids``'s: in the table, or ``-1`` (a zero row) for ``out_of_range="zero"``.
    Everything that reads the lengths, the weights or the gathered rows runs after the ops
    ``checked`` (e.g. ``assert_guard``'s): control inputs of those ops, no extra ops. The gathers
    do not wait for them, so they overlap the checks.
    """
    groups: dict[TableConfig, list[FeatureIds]] = {}
    for f in features:
        groups.setdefault(f.feature.table, []).append(f)
    out: dict[str, tf.Tensor] = {}
    for table, group in groups.items():
        out.update(_table_lookup(table, group, gather_rows, checked))
    return {f.path: out[f.path] for f in features}


def _kind(feature: FeatureConfig) -> str:
    """``"shaped"`` (output_shape: decided at run time), ``"sequence"`` or ``"combined"``."""
    if feature.output_shape is not None:
        return "shaped"
    return "sequence" if feature.max_sequence_length > 0 else "combined"


def _concat(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    return tensors[0] if len(tensors) == 1 else tf.concat(tensors, axis=0)


def _split(x: tf.Tensor, sizes: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """``x`` cut along its first axis into pieces of ``sizes`` (one op; the pieces share
    ``x``'s buffer)."""
    return [x] if len(sizes) == 1 else tf.split(x, tf.stack(sizes), num=len(sizes))


def _table_lookup(
    table: TableConfig,
    group: Sequence[FeatureIds],
    gather_rows: RowGather,
    checked: Sequence[tf.Operation],
) -> dict[str, tf.Tensor]:
    """The activations of the features of one table: one gather, one segment sum."""
    # Combined and output_shape features first (their rows are summed), sequence features last.
    pooled = [f for f in group if _kind(f.feature) != "sequence"]
    ordered = pooled + [f for f in group if _kind(f.feature) == "sequence"]
    ids = _concat([f.ids for f in ordered])
    marked = any(f.feature.out_of_range == "zero" for f in ordered)
    rows = _rows(gather_rows, table, ids, marked)
    with tf.control_dependencies(checked):
        return _table_activations(table, pooled, ordered, rows)


def _table_activations(
    table: TableConfig,
    pooled: Sequence[FeatureIds],
    ordered: Sequence[FeatureIds],
    rows: tf.Tensor,
) -> dict[str, tf.Tensor]:
    """``_table_lookup`` after the gather: ``rows`` are those of the ids of ``ordered``."""
    sizes = [tf.size(f.ids, out_type=tf.int64) for f in ordered]
    need_pieces = len(pooled) < len(ordered) or any(_kind(f.feature) == "shaped" for f in pooled)
    pieces = _split(rows, sizes) if need_pieces else []
    out: dict[str, tf.Tensor] = {}
    if pooled:
        pooled_rows = rows
        if len(pooled) < len(ordered):  # the head of `rows` (a slice: no copy)
            head = [tf.add_n(sizes[: len(pooled)]), tf.add_n(sizes[len(pooled) :])]
            pooled_rows = _split(rows, head)[0]
        combined = _combine(pooled_rows, pooled, table.combiner)
        for i, f in enumerate(pooled):
            if _kind(f.feature) == "combined":
                out[f.path] = combined[i]
            else:
                out[f.path] = _shaped(f, combined[i], pieces[i], table.dim)
    for i, f in enumerate(ordered[len(pooled) :], start=len(pooled)):
        shape = [None, f.feature.max_sequence_length, table.dim]
        out[f.path] = _sequence(pieces[i], f.lengths, shape)
    return out


def _rows(gather_rows: RowGather, table: TableConfig, ids: tf.Tensor, marked: bool) -> tf.Tensor:
    """The float32 rows of ``ids``; with ``marked``, an id ``-1`` reads a zero row (a select,
    so the other rows keep their bits)."""
    if not marked:
        return gather_rows(table, ids)
    found = gather_rows(table, tf.maximum(ids, 0))
    return tf.where((ids >= 0)[:, None], found, tf.constant(0.0, found.dtype))


LEFT_TO_RIGHT_ROWS = 15
"""The most rows per segment that TF's CPU ``SegmentSum`` adds left to right, whatever the row
width. From 16 rows on it keeps four partial sums per 8-float packet of columns, added at the
end (``benchmarks/bench_segment_sums.py``); ``UnsortedSegmentSum`` adds any number of rows in
order, at about 8 times ``SegmentSum``'s cost per row."""


@dataclasses.dataclass(frozen=True)
class _Segments:
    """The examples of a ragged batch of ids, for summing per-id values left to right.

    ``sum`` is ``unsorted_segment_sum(values, example_of_each_id, num)`` to the bit, in two
    steps: ``segment_sum`` adds each piece (an example's first ``LEFT_TO_RIGHT_ROWS`` values, then
    each further value alone), left to right, then ``unsorted_segment_sum`` adds each example's
    pieces in order. Piece 0 is empty: its sum is a zero row and its owner 0 (the ``segment_max``
    of no ids), so segment 0 starts ``0 + 0`` (as ``unsorted_segment_sum`` starts it from 0).
    """

    pieces: tf.Tensor
    """int64 ``[n]``: each id's piece, 1, 2, ... (non-decreasing)."""
    owners: tf.Tensor
    """int64 ``[pieces + 1]``: each piece's example."""
    num: tf.Tensor
    """int64 scalar: the number of examples."""

    @staticmethod
    def of(lengths: tf.Tensor) -> _Segments:
        """The segments of a ragged batch with row ``lengths`` (int64, non-negative)."""
        one = tf.constant(1, lengths.dtype)
        # splits, and each id's position in its example minus 1, in one pass over the ids.
        splits, before = tf.raw_ops.RaggedRange(
            starts=-one, limits=lengths - one, deltas=one, Tsplits=lengths.dtype
        )
        indices, _, _ = tf.raw_ops.RaggedTensorToSparse(
            rt_nested_splits=[splits], rt_dense_values=before
        )
        # A piece starts at each example's first id (before = -1, a huge uint64) and at each id
        # past the first LEFT_TO_RIGHT_ROWS (before >= LEFT_TO_RIGHT_ROWS - 1).
        starts = tf.bitcast(before, tf.uint64) >= LEFT_TO_RIGHT_ROWS - 1
        pieces = tf.cumsum(tf.cast(starts, lengths.dtype))
        owners = tf.math.segment_max(indices[:, 0], pieces)
        return _Segments(pieces, owners, tf.size(lengths, out_type=tf.int64))

    def sum(self, values: tf.Tensor) -> tf.Tensor:
        """``[num, ...]``: each example's ``values`` (``[n, ...]``, one per id) added left to
        right."""
        heads = tf.math.segment_sum(values, self.pieces)
        return tf.math.unsorted_segment_sum(heads, self.owners, self.num)


def _combine(rows: tf.Tensor, pooled: Sequence[FeatureIds], combiner: str) -> list[tf.Tensor]:
    """TF's ``_ragged_embedding_lookup_with_reduce`` for the features of one table at once:
    ``[batch, dim]`` per feature, from their gathered ``rows``.

    Without weights TF multiplies every row by a weight of 1 and sums the ones; both are exact,
    so the rows are summed as gathered and the denominators are the row lengths: the same bits,
    one pass over the gathered rows fewer. An unweighted feature sharing a table with a weighted
    one gets weights of one (``x * 1`` is ``x``, and the ones sum exactly).
    """
    lengths = _concat([f.lengths for f in pooled])
    segments = _Segments.of(lengths)
    if all(f.weights is None for f in pooled):
        sums = segments.sum(rows)
        if combiner in ("mean", "sqrtn"):
            count = tf.cast(lengths, rows.dtype)
            denominator = count if combiner == "mean" else tf.sqrt(count)
            sums = tf.math.divide_no_nan(sums, denominator[:, None])
    else:
        weights = _concat(
            [tf.ones_like(f.ids, rows.dtype) if f.weights is None else f.weights for f in pooled]
        )
        sums = segments.sum(rows * weights[:, None])
        if combiner == "mean":
            sums = tf.math.divide_no_nan(sums, segments.sum(weights)[:, None])
        elif combiner == "sqrtn":
            denominator = tf.sqrt(segments.sum(weights * weights))
            sums = tf.math.divide_no_nan(sums, denominator[:, None])
    return [sums] if len(pooled) == 1 else tf.split(sums, len(pooled), axis=0)


def _sequence(rows: tf.Tensor, lengths: tf.Tensor, shape) -> tf.Tensor:
    """Left-aligned rows, truncated or zero-padded to ``shape``, ``[batch, length, dim]`` (a
    copy: the rows keep their bits)."""
    ragged = tf.RaggedTensor.from_row_lengths(rows, lengths, validate=False)
    return ragged.to_tensor(shape=shape)


def _shaped(f: FeatureIds, combined: tf.Tensor, rows: tf.Tensor, dim: int) -> tf.Tensor:
    """An ``output_shape`` feature: the batch decides at run time between combining
    (``prod == batch``) and sequence mode (``prod == k * batch``), as TF's eager path decides it
    from the static batch."""
    output_shape = f.feature.output_shape
    assert output_shape is not None
    shape = [int(d or 0) for d in output_shape] + [dim]  # fully defined (validated)
    total = math.prod(shape[:-1])
    batch = tf.size(f.lengths, out_type=tf.int64)
    message = (
        f"feature {f.path}: output_shape {list(output_shape)} needs a batch that divides {total}"
    )
    total_t = tf.constant(total, tf.int64)
    safe_batch = tf.maximum(batch, 1)
    divides = tf.equal(tf.math.floormod(total_t, safe_batch), 0) & (batch > 0)
    with tf.control_dependencies([tf.debugging.Assert(divides, [message])]):
        per_row = total_t // safe_batch

    def combined_rows():
        return tf.reshape(combined, shape)

    def sequence_rows():
        padded = _sequence(rows, f.lengths, tf.stack([batch, per_row, tf.constant(dim, tf.int64)]))
        return tf.reshape(padded, shape)

    return tf.cond(tf.equal(per_row, 1), combined_rows, sequence_rows)
