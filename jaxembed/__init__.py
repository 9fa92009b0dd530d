"""jaxembed: large embedding tables in JAX with TF's ``tf.tpu.experimental.embedding`` semantics.

Public API (see README.md for a tour):

* ``TableConfig``, ``FeatureConfig``, ``QuantizationConfig``: TF's configs, frozen.
* ``Hashing``, ``Vocabulary``: raw ids (strings, any int64) to rows, as TF's ops map them.
* ``Sparse``, ``Ragged``: id inputs (a plain integer array is a dense input).
* ``embedding_lookup``: TF's ``serving_embedding_lookup`` over nested structures.
* ``Embedding``: tables + optimizer slots; ``preprocess``, ``lookup``, ``apply_gradients``.
* ``optimizers``: TF's TPU embedding optimizers, row-sparse; ``optimizers.from_optax``.
* ``checkpoint``: orbax checkpoints in logical row order; restore onto any mesh.
* ``prefetch``: ``emb.preprocess`` in a background thread, overlapping the device step.
* ``cpu_kernels_status``: whether the CPU kernels (compiled at install) are in use, and why.

``import jaxembed`` never imports TensorFlow; the TF bridge lives in ``jaxembed.export``.
"""

from jaxembed import checkpoint as checkpoint
from jaxembed import optimizers as optimizers
from jaxembed._kernels import status as cpu_kernels_status
from jaxembed.batch import Batch as Batch
from jaxembed.configs import FeatureConfig as FeatureConfig
from jaxembed.configs import QuantizationConfig as QuantizationConfig
from jaxembed.configs import TableConfig as TableConfig
from jaxembed.embedding import Embedding as Embedding
from jaxembed.embedding import EmbeddingState as EmbeddingState
from jaxembed.inputs import Ragged as Ragged
from jaxembed.inputs import Sparse as Sparse
from jaxembed.lookup import embedding_lookup as embedding_lookup
from jaxembed.prefetch import prefetch as prefetch
from jaxembed.vocabulary import Hashing as Hashing
from jaxembed.vocabulary import Vocabulary as Vocabulary

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Embedding",
    "EmbeddingState",
    "FeatureConfig",
    "Hashing",
    "QuantizationConfig",
    "Ragged",
    "Sparse",
    "TableConfig",
    "Vocabulary",
    "checkpoint",
    "cpu_kernels_status",
    "embedding_lookup",
    "optimizers",
    "prefetch",
]
