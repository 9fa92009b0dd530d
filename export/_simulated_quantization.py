"""Simulated quantization of looked-up rows in plain TF ops, for the serving graph.

``simulate(rows, config)`` is ``jaxembed.lookup.simulate_quantization`` (and
``QuantizationConfig.quantize``) in TF, bit for bit on float32: the TPU's
``SimulatedQuantization`` formula with float32 ``lower``, ``upper`` and ``quantum``
(``config.float32_parameters()``)::

    x = clip(x, lower, upper)
    x = floor((x - lower) / quantum + 0.5) * quantum + lower

Apply it to the gathered rows before they are combined, and only to rows read from the table:
a zero row read for an id outside the table (``out_of_range="zero"``, padding) stays zero, as in
the JAX lookup.
"""

from __future__ import annotations

from jaxembed.configs import QuantizationConfig

from ._tf import tf


@tf.autograph.experimental.do_not_convert  # plain ops; autograph must not rewrite the config
def simulate(rows: tf.Tensor, config: QuantizationConfig) -> tf.Tensor:
    """``rows`` clipped to ``[lower, upper]`` and quantized to ``num_buckets`` levels.

    Elementwise in float32 (the result in ``rows``' dtype), the same bits as the JAX lookup.
    The division is ``DivNoNan`` (``quantum`` is never 0): TF's graph optimizer rewrites a
    ``RealDiv`` by a constant into a multiplication by its reciprocal, which rounds differently.

    Args:
        rows: Gathered table rows, any shape, a float dtype.
        config: The table's ``jaxembed.QuantizationConfig``.

    Returns:
        The quantized rows, ``rows``' shape and dtype.
    """
    lower, upper, quantum = [tf.constant(v, tf.float32) for v in config.float32_parameters()]
    rows = tf.convert_to_tensor(rows)
    x = tf.cast(rows, tf.float32)
    clipped = tf.where(x < lower, lower, tf.where(x > upper, upper, x))
    level = tf.math.floor(tf.math.divide_no_nan(clipped - lower, quantum) + 0.5)
    return tf.cast(level * quantum + lower, rows.dtype)
