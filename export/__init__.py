"""The TensorFlow bridge: trained tables to TF, SavedModels for CPU TF Serving, TF checkpoints.

Needs the ``tf`` extra (``pip install 'jaxembed[tf]'``); ``import jaxembed`` alone never imports
TensorFlow.

* ``to_tf(emb, state)``: ``{tf TableConfig: tf.Variable}`` and TF ``FeatureConfig``s, ready for
  TF's own ``serving_embedding_lookup``.
* ``save_serving_model(export_dir, emb, state, model=None, params=None)``: a SavedModel whose
  serving functions are plain TF ops (no jax2tf, XLA, TPU or Python ops), reloaded and checked
  against JAX before it is published.
* ``save_tf_checkpoint`` / ``load_tf_checkpoint``: tables and slots to and from checkpoints of
  TF's ``TPUEmbedding`` and ``TPUEmbeddingForServing``.
"""

from ._checkpoint import load_tf_checkpoint, save_tf_checkpoint
from ._configs import tf_optimizer, to_tf
from ._jaxpr import TFModel, UnsupportedPrimitiveError
from ._saved_model import (
    ExportOptions,
    ExportVerificationError,
    input_name,
    save_serving_model,
    serialized_examples,
)

__all__ = [
    "ExportOptions",
    "ExportVerificationError",
    "TFModel",
    "UnsupportedPrimitiveError",
    "input_name",
    "load_tf_checkpoint",
    "save_serving_model",
    "save_tf_checkpoint",
    "serialized_examples",
    "tf_optimizer",
    "to_tf",
]
