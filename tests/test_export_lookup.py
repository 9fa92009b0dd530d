"""The serving lookup's TF ops (export/_lookup.py) against TF's own serving_embedding_lookup.

Every combiner, weighted and unweighted, rows from empty to 50 ids: bit for bit, eagerly and in
a ``tf.function`` with a dynamic batch (as a SavedModel serves it), and equal to jaxembed's
lookup too.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from jaxembed.export._lookup import ragged_lookup  # noqa: E402

import jaxembed as je  # noqa: E402

TF_EMB = tf.tpu.experimental.embedding


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
def test_serving_lookup_is_tfs_lookup_bit_for_bit(combiner, weighted):
    rng = np.random.default_rng(["sum", "mean", "sqrtn"].index(combiner) + 3 * weighted)
    vocab, dim = 300, 16
    table = rng.normal(size=(vocab, dim)).astype(np.float32)
    lengths = rng.integers(0, 51, size=40)
    lengths[::7] = 0
    ids = rng.integers(0, vocab, size=int(lengths.sum()))
    weights = rng.uniform(-0.5, 3.0, size=ids.size).astype(np.float32) if weighted else None

    config = je.TableConfig(vocab, dim, combiner=combiner, name="t")
    feature = je.FeatureConfig(config)
    tf_config = TF_EMB.TableConfig(vocab, dim, combiner=combiner, name="t")
    tf_feature = TF_EMB.FeatureConfig(tf_config)
    variable = tf.Variable(table)
    ragged = tf.RaggedTensor.from_row_lengths(ids, lengths)
    tf_weights = None if weights is None else tf.RaggedTensor.from_row_lengths(weights, lengths)

    want = TF_EMB.serving_embedding_lookup(
        {"f": ragged}, {"f": tf_weights}, {tf_config: variable}, {"f": tf_feature}
    )["f"].numpy()
    served = tf.function(
        lambda values, row_lengths, w: ragged_lookup(
            variable,
            tf.RaggedTensor.from_row_lengths(values, row_lengths),
            None if w is None else tf.RaggedTensor.from_row_lengths(w, row_lengths),
            feature,
            "f",
        )
    )
    eager = ragged_lookup(variable, ragged, tf_weights, feature, "f").numpy()
    traced = served(
        tf.constant(ids), tf.constant(lengths), None if weights is None else tf.constant(weights)
    ).numpy()
    np.testing.assert_array_equal(eager, want)
    np.testing.assert_array_equal(traced, want)

    je_ids = {"f": je.Ragged.from_row_lengths(ids, lengths)}
    je_w = None if weights is None else {"f": je.Ragged.from_row_lengths(weights, lengths)}
    got = je.embedding_lookup(je_ids, je_w, {config: table}, {"f": feature})["f"]
    np.testing.assert_array_equal(np.asarray(got), want)
