"""Raw ids to rows inside the serving graph, with TF's own ops (no custom ops).

A feature with a vocabulary (``FeatureConfig(vocabulary=...)``) is served raw ids: its
``p_ids`` input (and its ``tf.Example`` feature) is ``tf.string`` or ``tf.int64`` as the
vocabulary's ``key_dtype`` says, and the graph maps them as ``preprocess`` did in training:

* ``je.Hashing``: ``tf.strings.to_hash_bucket_fast`` (int64 ids through ``tf.strings.as_string``);
* ``je.Vocabulary``: a ``tf.lookup.StaticVocabularyTable`` whose keys are stored in the
  SavedModel (a constant initializer, run when TF Serving loads the model).

Example:
    >>> import jaxembed as je
    >>> vocab = je.Vocabulary(["a", "b"], num_oov_buckets=1)
    >>> table = vocabulary_table(vocab)
    >>> to_rows(tf.constant(["b", "a", "z"]), vocab, table).numpy().tolist()
    [1, 0, 2]
"""

from __future__ import annotations

import numpy as np

from jaxembed.configs import FeatureConfig
from jaxembed.vocabulary import Hashing, Vocabulary

from ._tf import tf


def id_dtype(feature: FeatureConfig) -> tf.DType:
    """The dtype a feature's ids are served as: int64 rows, or its raw ids' type."""
    vocabulary = feature.vocabulary
    return tf.string if vocabulary is not None and vocabulary.key_dtype == "string" else tf.int64


def vocabulary_table(vocabulary: Hashing | Vocabulary | None) -> tf.lookup.StaticVocabularyTable:
    """TF's table for a ``je.Vocabulary`` (None for hashing or no vocabulary)."""
    if not isinstance(vocabulary, Vocabulary):
        return None
    keys = list(vocabulary.keys)
    dtype = tf.string if vocabulary.key_dtype == "string" else tf.int64
    initializer = tf.lookup.KeyValueTensorInitializer(
        tf.constant(keys, dtype), tf.range(len(keys), dtype=tf.int64)
    )
    return tf.lookup.StaticVocabularyTable(initializer, vocabulary.num_oov_buckets)


def to_rows(
    ids: tf.Tensor,
    vocabulary: Hashing | Vocabulary | None,
    table: tf.lookup.StaticVocabularyTable | None,
) -> tf.Tensor:
    """int64 rows of raw ``ids`` (unchanged without a vocabulary)."""
    if vocabulary is None:
        return ids
    if isinstance(vocabulary, Hashing):
        text = ids if ids.dtype == tf.string else tf.strings.as_string(ids)
        return tf.strings.to_hash_bucket_fast(text, vocabulary.num_bins)
    assert table is not None, "a je.Vocabulary is served through its vocabulary_table"
    return table.lookup(ids)


def sample_ids(feature: FeatureConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random ids a feature is served: rows, or raw ids (for a ``Vocabulary``, about half
    of them keys and half out of vocabulary; strings as bytes)."""
    vocabulary = feature.vocabulary
    if vocabulary is None:
        return rng.integers(0, feature.table.vocabulary_size, size=n).astype(np.int64)
    raw = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    if isinstance(vocabulary, Vocabulary):
        known = np.asarray(vocabulary.keys, dtype=object)[rng.integers(0, len(vocabulary.keys), n)]
        unknown = raw if vocabulary.key_dtype == "int64" else [b"~%d" % v for v in raw]
        return np.where(rng.random(n) < 0.5, known, np.asarray(unknown, dtype=object)).astype(
            np.bytes_ if vocabulary.key_dtype == "string" else np.int64
        )
    return raw if vocabulary.key_dtype == "int64" else raw.astype(np.bytes_)
