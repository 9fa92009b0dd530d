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


def check_ids(path: str, ids: tf.Tensor, vocabulary_size: int) -> tf.Tensor:
    """``ids`` after run-time checks that name the feature and the valid range."""
    message = f"feature {path}: ids must be in [0, {vocabulary_size}), the table vocabulary"
    checks = [
        tf.debugging.assert_non_negative(ids, message=message),
        tf.debugging.assert_less(ids, tf.constant(vocabulary_size, ids.dtype), message=message),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(ids)


def _reduce(table, ragged: tf.RaggedTensor, weights: tf.RaggedTensor | None, combiner: str):
    """TF's ``_ragged_embedding_lookup_with_reduce``: the same ops in the same order.

    Without weights TF multiplies every row by a weight of 1 and sums the ones; both are exact,
    so the rows are summed as gathered and the denominators are the row lengths: the same bits,
    one pass over the gathered rows fewer.
    """
    if weights is None:
        rows = tf.reduce_sum(tf.nn.embedding_lookup(table, ragged), axis=1)
        if combiner == "sum":
            return rows
        count = tf.cast(ragged.row_lengths(), table.dtype)[:, None]
        return tf.math.divide_no_nan(rows, count if combiner == "mean" else tf.sqrt(count))
    weights = tf.expand_dims(weights, axis=2)
    rows = tf.reduce_sum(tf.nn.embedding_lookup(table, ragged) * weights, axis=1)
    if combiner == "mean":
        return tf.math.divide_no_nan(rows, tf.reduce_sum(weights, axis=1))
    if combiner == "sqrtn":
        return tf.math.divide_no_nan(rows, tf.sqrt(tf.reduce_sum(weights * weights, axis=1)))
    return rows


def _sequence(table, ragged: tf.RaggedTensor, length: int, dim: int) -> tf.Tensor:
    """Left-aligned rows, truncated or zero-padded to ``[batch, length, dim]``."""
    return tf.nn.embedding_lookup(table, ragged).to_tensor(shape=[None, length, dim])


def ragged_lookup(
    table,
    ragged: tf.RaggedTensor,
    weights: tf.RaggedTensor | None,
    feature: FeatureConfig,
    path: str,
) -> tf.Tensor:
    """One feature's activations from a ``[batch, None]`` ragged tensor of ids."""
    dim, combiner = feature.table.dim, feature.table.combiner
    if feature.output_shape is None:
        if feature.max_sequence_length > 0:
            return _sequence(table, ragged, feature.max_sequence_length, dim)
        return _reduce(table, ragged, weights, combiner)
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
        return tf.reshape(_reduce(table, ragged, weights, combiner), shape)

    def sequence():
        rows = tf.nn.embedding_lookup(table, ragged).to_tensor(
            shape=tf.stack([batch, per_row, tf.constant(dim, tf.int64)])
        )
        return tf.reshape(rows, shape)

    return tf.cond(tf.equal(per_row, 1), combined, sequence)
