"""The serving lookup in plain TF ops: TF's ragged CPU path, per feature.

Every serving input is a ragged row of ids (``ids`` plus per-example ``lengths``), so the
semantics are those of ``je.embedding_lookup`` on ``je.Ragged`` inputs (tf_semantics §4.5):
combined rows for ordinary features, left-aligned ``[batch, max_sequence_length, dim]`` for
sequence features, and ``output_shape`` honoured (also with a dynamic batch, where TF's own
function fails, P6). The ops and their order are those of TF's
``_ragged_embedding_lookup_with_reduce``, so results are bit-identical to TF's and to jaxembed's.
"""

from __future__ import annotations

import math

from jaxembed.configs import FeatureConfig

from ._tf import tf


def check_ids(path: str, ids: tf.Tensor, feature: FeatureConfig) -> tf.Tensor:
    """``ids`` under the feature's ``out_of_range`` policy, as in training: ``"error"`` adds
    run-time checks that name the feature and the valid range, ``"clamp"`` clamps, ``"zero"``
    marks them ``-1`` (``ragged_lookup`` reads a zero row for them)."""
    vocabulary_size = feature.table.vocabulary_size
    top = tf.constant(vocabulary_size, ids.dtype)
    if feature.out_of_range == "clamp":
        return tf.clip_by_value(ids, tf.zeros_like(top), top - 1)
    if feature.out_of_range == "zero":
        return tf.where((ids >= 0) & (ids < top), ids, -tf.ones_like(ids))
    message = f"feature {path}: ids must be in [0, {vocabulary_size}), the table vocabulary"
    checks = [
        tf.debugging.assert_non_negative(ids, message=message),
        tf.debugging.assert_less(ids, top, message=message),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(ids)


def _gather(table, ragged: tf.RaggedTensor, zero_marked: bool) -> tf.RaggedTensor:
    """``table`` rows of ``ragged`` ids; with ``zero_marked``, an id ``-1`` reads a zero row."""
    if not zero_marked:
        return tf.nn.embedding_lookup(table, ragged)

    def rows(ids):
        found = tf.gather(table, tf.maximum(ids, 0))
        return found * tf.cast(ids >= 0, table.dtype)[:, None]

    return tf.ragged.map_flat_values(rows, ragged)


def _reduce(
    table,
    ragged: tf.RaggedTensor,
    weights: tf.RaggedTensor | None,
    combiner: str,
    zero_marked: bool = False,
):
    """TF's ``_ragged_embedding_lookup_with_reduce``: the same ops in the same order.

    Without weights TF multiplies every row by a weight of 1 and sums the ones; both are exact,
    so the rows are summed as gathered and the denominators are the row lengths: the same bits,
    one pass over the gathered rows fewer.
    """
    if weights is None:
        rows = tf.reduce_sum(_gather(table, ragged, zero_marked), axis=1)
        if combiner == "sum":
            return rows
        count = tf.cast(ragged.row_lengths(), table.dtype)[:, None]
        return tf.math.divide_no_nan(rows, count if combiner == "mean" else tf.sqrt(count))
    weights = tf.expand_dims(weights, axis=2)
    rows = tf.reduce_sum(_gather(table, ragged, zero_marked) * weights, axis=1)
    if combiner == "mean":
        return tf.math.divide_no_nan(rows, tf.reduce_sum(weights, axis=1))
    if combiner == "sqrtn":
        return tf.math.divide_no_nan(rows, tf.sqrt(tf.reduce_sum(weights * weights, axis=1)))
    return rows


def _sequence(
    table, ragged: tf.RaggedTensor, length: int, dim: int, zero_marked: bool
) -> tf.Tensor:
    """Left-aligned rows, truncated or zero-padded to ``[batch, length, dim]``."""
    return _gather(table, ragged, zero_marked).to_tensor(shape=[None, length, dim])


def ragged_lookup(
    table,
    ragged: tf.RaggedTensor,
    weights: tf.RaggedTensor | None,
    feature: FeatureConfig,
    path: str,
) -> tf.Tensor:
    """One feature's activations from a ``[batch, None]`` ragged tensor of ids."""
    dim, combiner = feature.table.dim, feature.table.combiner
    zero = feature.out_of_range == "zero"
    if feature.output_shape is None:
        if feature.max_sequence_length > 0:
            return _sequence(table, ragged, feature.max_sequence_length, dim, zero)
        return _reduce(table, ragged, weights, combiner, zero)
    # output_shape: the batch decides at run time between combining (prod == batch) and
    # sequence mode (prod == k * batch), as TF's eager path decides it from the static batch.
    shape = [int(d or 0) for d in feature.output_shape] + [dim]  # fully defined (validated)
    total = math.prod(shape[:-1])
    batch = tf.cast(ragged.nrows(), tf.int64)
    check = tf.debugging.assert_equal(
        total % batch,
        tf.constant(0, tf.int64),
        message=(
            f"feature {path}: output_shape {list(feature.output_shape)} needs a batch that "
            f"divides {total}"
        ),
    )
    with tf.control_dependencies([check]):
        per_row = total // batch

    def combined():
        return tf.reshape(_reduce(table, ragged, weights, combiner, zero), shape)

    def sequence():
        rows = _gather(table, ragged, zero).to_tensor(
            shape=tf.stack([batch, per_row, tf.constant(dim, tf.int64)])
        )
        return tf.reshape(rows, shape)

    return tf.cond(tf.equal(per_row, 1), combined, sequence)
