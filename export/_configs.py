"""jaxembed configs -> their ``tf.tpu.experimental.embedding`` twins, and trained tables ->
``tf.Variable``s keyed by those twins."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxembed import _nest
from jaxembed.configs import FeatureConfig, QuantizationConfig, TableConfig
from jaxembed.embedding import Embedding, EmbeddingState
from jaxembed.optimizers import Optimizer

from ._tf import tf

_TF = tf.tpu.experimental.embedding


def tf_optimizer(optimizer: Optimizer | None, step: int = 0) -> Any:
    """The TF optimizer with the same class and arguments, or None.

    A learning-rate schedule becomes its value at ``step`` (TF's learning rate is a float or a
    zero-argument callable); a ``slot_variable_creation_fn`` works on JAX arrays and is dropped.
    Optax optimizers (``from_optax``) and FBGEMM's row-wise optimizers (``RowWiseAdagrad``,
    ``PartialRowWiseAdam``) have no TF twin and give None.

    Example:
        >>> import jaxembed as je
        >>> from jaxembed import export
        >>> tf_adagrad = export.tf_optimizer(je.optimizers.Adagrad(0.1))
        >>> type(tf_adagrad).__name__, tf_adagrad.learning_rate
        ('Adagrad', 0.1)
        >>> print(export.tf_optimizer(je.optimizers.RowWiseAdagrad(0.1)))
        None
    """
    if optimizer is None or not optimizer.has_tf_twin:
        return None
    args = optimizer.hyperparameters()
    if callable(args["learning_rate"]):  # a schedule's value at step, a zero-arg callable's now
        args["learning_rate"] = optimizer.learning_rate_value(step)
    if "slot_variable_creation_fn" in args:
        args["slot_variable_creation_fn"] = None
    return getattr(_TF, type(optimizer).__name__)(**args)


def _tf_initializer(table: TableConfig) -> Any:
    """None for TF's default (the same distribution as ours); else the JAX initializer, seeded."""
    if table.initializer is None:
        return None

    def init(shape, dtype=tf.float32):
        return tf.constant(np.asarray(table.initializer(jax.random.key(0), tuple(shape))), dtype)

    return init


def tf_quantization_config(config: QuantizationConfig | None) -> Any:
    """TF's ``QuantizationConfig`` with the same ``num_buckets``, ``lower`` and ``upper`` (or
    None)."""
    if config is None:
        return None
    return _TF.QuantizationConfig(config.num_buckets, config.lower, config.upper)


def tf_table_configs(emb: Embedding, step: int = 0) -> dict[str, Any]:
    """``{table name: tf TableConfig}`` in ``emb``'s table order, each with its optimizer and
    quantization config."""
    return {
        name: _TF.TableConfig(
            vocabulary_size=table.vocabulary_size,
            dim=table.dim,
            initializer=_tf_initializer(table),
            optimizer=tf_optimizer(emb.optimizers[name], step),
            combiner=table.combiner,
            name=name,
            quantization_config=tf_quantization_config(table.quantization_config),
        )
        for table, name in emb.table_names.items()
    }


def tf_feature_config(emb: Embedding, tf_tables: dict[str, Any]) -> Any:
    """``emb.feature_config`` with every ``FeatureConfig`` replaced by its TF twin."""
    leaves = [
        _TF.FeatureConfig(
            table=tf_tables[emb.table_names[feature.table]],
            max_sequence_length=feature.max_sequence_length,
            validate_weights_and_indices=feature.validate_weights_and_indices,
            output_shape=None if feature.output_shape is None else list(feature.output_shape),
            name=feature.name,
        )
        for _, feature in _nest.flatten_with_paths(emb.feature_config)
        if isinstance(feature, FeatureConfig)
    ]
    return _nest.pack_like(emb.feature_config, leaves)


def logical_arrays(emb: Embedding, state: EmbeddingState) -> dict[str, np.ndarray]:
    """``{table name: [V, dim] host array}`` in logical row order."""
    return {emb.table_names[t]: np.asarray(v) for t, v in emb.embedding_tables(state).items()}


def to_tf(emb: Embedding, state: EmbeddingState) -> tuple[dict[Any, tf.Variable], Any]:
    """The trained tables as ``tf.Variable``s keyed by TF ``TableConfig``s, and TF
    ``FeatureConfig``s in the nested structure of ``emb.feature_config``.

    TF's own ``serving_embedding_lookup`` then runs on them unchanged and gives the same
    activations as ``je.embedding_lookup`` (bit for bit for dense and ragged inputs). Each
    variable is named after its table (``"items:0"``), like ``TPUEmbeddingForServing``'s.
    A table's ``quantization_config`` becomes TF's ``QuantizationConfig`` (used by TF's TPU
    embedding); TF's CPU ``serving_embedding_lookup`` ignores it, so for such tables it returns
    unquantized rows where ``je.embedding_lookup`` quantizes them.

    Example:
        >>> import jax, tensorflow as tf, jaxembed as je
        >>> from jaxembed import export
        >>> table = je.TableConfig(10, 4, combiner="sum", name="items")
        >>> emb = je.Embedding({"items": je.FeatureConfig(table)})
        >>> state = emb.init(jax.random.key(0))
        >>> tf_tables, tf_features = export.to_tf(emb, state)
        >>> ids = {"items": tf.ragged.constant([[1, 2], [3]], dtype=tf.int64)}
        >>> out = tf.tpu.experimental.embedding.serving_embedding_lookup(
        ...     ids, None, tf_tables, tf_features)
        >>> out["items"].shape
        TensorShape([2, 4])
    """
    tables = tf_table_configs(emb, int(state.step))
    arrays = logical_arrays(emb, state)
    variables = {
        config: tf.Variable(arrays[name], name=name, trainable=True)
        for name, config in tables.items()
    }
    return variables, tf_feature_config(emb, tables)
