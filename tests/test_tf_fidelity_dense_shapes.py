"""Dense ids: ``Embedding`` follows TF's ``TPUEmbedding``, ``embedding_lookup`` TF's serving lookup.

TF's two classes disagree on dense ids of shape ``[B, 1]`` (tf_semantics.md P2):

* ``TPUEmbedding`` (training) treats every dense id as an example of its own and drops the last
  dimension, which must be 1: ``[B] -> [B, dim]``, ``[B, 1] -> [B, dim]``, ``[B, S, 1] -> [B, S,
  dim]``; a set ``output_shape`` wins; ``max_sequence_length`` adds no axis to dense ids.
  tensorflow/python/tpu/tpu_embedding_v2.py (2.21): ``_get_input_shape_for_tensor`` ("Rank 2 or
  above dense tensor should have last dimension as 1 as the last dimension will always be
  reduced") and ``_get_output_shapes_from_input_shapes`` (``output_shapes.append(
  input_shape[:-1])``); ``dequeue`` returns ``output_shape + [dim]``, ``apply_gradients`` wants
  gradients of that shape (``full_output_shape``).
* ``serving_embedding_lookup`` / ``TPUEmbeddingForServing`` gather: ``ids.shape + [dim]``, so
  ``[B, 1] -> [B, 1, dim]``, and refuse dense ids for sequence features.

TPUEmbedding's enqueue and dequeue need a TPU, but its shape rule is plain Python that runs on
CPU: ``_tpu_output_shapes`` calls TF's own methods on a CPU ``TPUEmbedding``, so the shapes here
are TF's, not a re-statement of them. Values: a TPU dense lookup is a one-id combine (the row
itself), computed with TF's serving lookup on the flattened ids.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxembed as je

tf = pytest.importorskip("tensorflow")
TFE = tf.tpu.experimental.embedding

VOCAB, DIM = 8, 4
TABLE = np.arange(VOCAB * DIM, dtype=np.float32).reshape(VOCAB, DIM)


def _tf_feature(**kwargs):
    table = TFE.TableConfig(VOCAB, DIM, initializer=tf.constant_initializer(TABLE), name="t")
    return TFE.FeatureConfig(table, **kwargs)


def _je_feature(**kwargs):
    table = je.TableConfig(
        VOCAB, DIM, initializer=jax.nn.initializers.constant(0.0), combiner="sum", name="t"
    )
    return je.FeatureConfig(table, **kwargs)


def _tpu_output_shapes(tf_feature_config, features) -> list[tuple[int, ...]]:
    """The activation shapes (without dim) TF's ``TPUEmbedding`` gives ``features``: its own
    ``enqueue`` shape inference (``_get_input_shapes``, then the update of ``_output_shapes`` that
    ``build`` uses), flat in ``tf.nest`` order. Raises what TF raises."""
    embedding = TFE.TPUEmbedding(tf_feature_config, TFE.SGD(0.1))
    shapes = embedding._get_input_shapes(features, per_replica=False, in_tpu_context=True)
    embedding._get_and_update_output_shapes_from_input(shapes)
    return [tuple(s.as_list()) for s in embedding._output_shapes]


def _tpu_values(ids: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """TF's values for dense ids on TPU: every id its own one-id example (the row itself), from
    TF's serving lookup of the flat ids, laid out in ``shape + [dim]``."""
    feature = _tf_feature()
    tables = {feature.table: tf.constant(TABLE)}
    flat = tf.constant(ids.reshape(-1), tf.int64)
    rows = TFE.serving_embedding_lookup(flat, None, tables, feature).numpy()
    return rows.reshape(*shape, DIM)


def _embedding_lookup(feature, ids, grads=None):
    """``Embedding.lookup`` of one dense feature (table = TABLE), and the table after one SGD
    step with ``grads`` if given."""
    emb = je.Embedding({"f": feature}, je.optimizers.SGD(1.0))
    state = emb.state_from_logical({"t": TABLE})
    batch = emb.preprocess({"f": ids})
    acts = emb.lookup(state, batch)["f"]
    if grads is None:
        return np.asarray(acts), None
    state = emb.apply_gradients(state, batch, {"f": grads})
    return np.asarray(acts), np.asarray(state.tables["t"])


IDS_4 = np.array([3, 0, 7, 3])
CASES = {
    # name: (ids, FeatureConfig kwargs)
    "rank1": (IDS_4, {}),
    "b_by_1": (IDS_4[:, None], {}),
    "b_by_s_by_1": (np.array([[1, 2, 3], [4, 5, 6]])[..., None], {}),
    "b_by_1_seq": (IDS_4[:, None], {"max_sequence_length": 3}),
    "rank1_seq": (IDS_4, {"max_sequence_length": 2}),
    "b_by_1_output_shape": (IDS_4[:, None], {"output_shape": [2, 2]}),
    "rank1_output_shape": (IDS_4, {"output_shape": [4]}),
    "b_by_s_by_1_output_shape": (np.arange(6).reshape(2, 3, 1), {"output_shape": [2, 3]}),
    "b_by_s_by_1_higher_output_shape": (np.arange(6).reshape(2, 3, 1), {"output_shape": [1, 2, 3]}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_embedding_lookup_shape_and_values_are_tpu_embeddings(name):
    ids, kwargs = CASES[name]
    (tf_shape,) = _tpu_output_shapes({"f": _tf_feature(**kwargs)}, {"f": tf.constant(ids)})
    acts, _ = _embedding_lookup(_je_feature(**kwargs), ids)
    assert acts.shape == (*tf_shape, DIM)
    np.testing.assert_array_equal(acts, _tpu_values(ids, tf_shape))


def test_b_by_1_differs_between_training_and_serving_as_in_tf():
    """``[B, 1]``: ``[B, dim]`` from ``Embedding.lookup`` (TPUEmbedding) but ``[B, 1, dim]`` from
    ``je.embedding_lookup`` (TF's serving lookup and TPUEmbeddingForServing, bit for bit)."""
    ids = IDS_4[:, None]
    feature = _tf_feature()
    serving = TFE.TPUEmbeddingForServing({"f": feature}, None)
    serving.build()
    serving.embedding_tables[feature.table].assign(TABLE)
    tf_serving = serving.embedding_lookup({"f": tf.constant(ids)})["f"].numpy()
    je_feature = _je_feature()
    je_serving = je.embedding_lookup(
        {"f": ids}, None, {je_feature.table: TABLE}, {"f": je_feature}
    )["f"]
    assert tf_serving.shape == (4, 1, DIM)
    np.testing.assert_array_equal(np.asarray(je_serving), tf_serving)
    acts, _ = _embedding_lookup(je_feature, ids)
    np.testing.assert_array_equal(acts, tf_serving[:, 0])


def test_output_shape_is_ignored_by_the_serving_lookup_for_dense_ids():
    """TF's serving lookup ignores ``output_shape`` for dense ids (P5); so does
    ``je.embedding_lookup``, while ``Embedding`` applies it as TPUEmbedding does."""
    ids = IDS_4[:, None]
    feature = _tf_feature(output_shape=[2, 2])
    got = TFE.serving_embedding_lookup(
        {"f": tf.constant(ids)}, None, {feature.table: tf.constant(TABLE)}, {"f": feature}
    )["f"].numpy()
    je_feature = _je_feature(output_shape=(2, 2))
    mine = je.embedding_lookup({"f": ids}, None, {je_feature.table: TABLE}, {"f": je_feature})
    np.testing.assert_array_equal(np.asarray(mine["f"]), got)
    assert got.shape == (4, 1, DIM)
    acts, _ = _embedding_lookup(je_feature, ids)
    assert acts.shape == (2, 2, DIM)


def test_apply_gradients_takes_gradients_of_tpu_embeddings_activation_shape():
    """``TPUEmbedding.apply_gradients`` wants ``output_shape + [dim]``
    (tpu_embedding_v2.py ``full_output_shape``): ``[B, dim]`` for ``[B, 1]`` ids."""
    ids = IDS_4[:, None]
    (tf_shape,) = _tpu_output_shapes({"f": _tf_feature()}, {"f": tf.constant(ids)})
    grads = np.ones((*tf_shape, DIM), np.float32)
    _, table = _embedding_lookup(_je_feature(), ids, grads)
    want = TABLE.copy()
    np.add.at(want, IDS_4, -grads)  # SGD(1.0), gradients summed per row (id 3 twice)
    np.testing.assert_array_equal(table, want)
    with pytest.raises(ValueError, match=r"Found gradient of shape \(4, 1, 4\) at path f"):
        _embedding_lookup(_je_feature(), ids, np.ones((4, 1, DIM), np.float32))


def test_dense_weights_raise_tpu_embeddings_message():
    """TPUEmbedding's enqueue refuses weights for dense ids ("Weight specified for dense input
    ..., which is not allowed"; tpu_embedding_v2.py ``_add_data_for_tensor``)."""
    emb = je.Embedding({"f": _je_feature()}, je.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="Weight specified for dense input f, which is not"):
        emb.preprocess({"f": IDS_4[:, None]}, {"f": np.ones((4, 1), np.float32)})


def test_last_dimension_other_than_one():
    """TF's TPUEmbedding refuses dense ``[B, k]`` ids with ``k > 1``; ``Embedding`` gives them
    what ``embedding_lookup`` and TF's serving lookup give (a plain gather ``[B, k, dim]``,
    ``output_shape`` ignored), and refuses them for a sequence feature, as both TF classes do."""
    ids = np.array([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="should have last dimension as 1"):
        _tpu_output_shapes({"f": _tf_feature()}, {"f": tf.constant(ids)})
    for kwargs in ({}, {"output_shape": [4]}):
        feature = _tf_feature(**kwargs)
        want = TFE.serving_embedding_lookup(
            {"f": tf.constant(ids)}, None, {feature.table: tf.constant(TABLE)}, {"f": feature}
        )["f"].numpy()
        acts, _ = _embedding_lookup(_je_feature(**kwargs), ids)
        np.testing.assert_array_equal(acts, want)
        assert acts.shape == (2, 2, DIM)
    emb = je.Embedding({"f": _je_feature(max_sequence_length=2)})
    with pytest.raises(ValueError, match="sequence feature but a dense tensor"):
        emb.preprocess({"f": ids})


@pytest.mark.parametrize(
    "ids, output_shape",
    [(IDS_4[:, None], [3]), (np.arange(6).reshape(2, 3, 1), [3, 2]), (IDS_4, [2])],
    ids=["rank1_other_size", "same_rank_other_dims", "rank1_input"],
)
def test_output_shape_that_tpu_embedding_refuses(ids, output_shape):
    """TF: "Inconsistent shape founded for input feature" when a set ``output_shape`` of the
    incoming rank differs from the ids' shape (tpu_embedding_v2.py ``_check_output_shapes``)."""
    with pytest.raises(ValueError, match="Inconsistent shape founded for input feature f"):
        _tpu_output_shapes({"f": _tf_feature(output_shape=output_shape)}, {"f": tf.constant(ids)})
    emb = je.Embedding({"f": _je_feature(output_shape=tuple(output_shape))})
    with pytest.raises(ValueError, match="Inconsistent shape founded for input feature f"):
        emb.preprocess({"f": ids})


def test_higher_rank_output_shape_must_hold_the_ids():
    """A higher-rank ``output_shape`` is taken as is by TF's shape check (the enqueue op checks
    the size on TPU); jaxembed checks the size on the host."""
    (tf_shape,) = _tpu_output_shapes(
        {"f": _tf_feature(output_shape=[2, 3])}, {"f": tf.constant(IDS_4)}
    )
    assert tf_shape == (2, 3)
    emb = je.Embedding({"f": _je_feature(output_shape=(2, 3))})
    with pytest.raises(ValueError, match="Inconsistent shape founded for input feature f"):
        emb.preprocess({"f": IDS_4})


def test_dense_b_by_1_on_a_mesh_and_padded():
    """The rule holds on several devices and with ``batch_size`` padding (padded examples are
    zero rows), and a dense ``output_shape`` is split over the devices like a ragged one."""
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 devices")
    mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
    ids = np.arange(8)[:, None] % VOCAB
    emb = je.Embedding({"f": _je_feature()}, je.optimizers.SGD(1.0), mesh=mesh)
    state = emb.state_from_logical({"t": TABLE})
    acts = np.asarray(emb.lookup(state, emb.preprocess({"f": ids}))["f"])
    np.testing.assert_array_equal(acts, TABLE[ids[:, 0]])
    padded = np.asarray(emb.lookup(state, emb.preprocess({"f": ids[:6]}, batch_size=8))["f"])
    assert padded.shape == (8, DIM)
    np.testing.assert_array_equal(padded[:6], TABLE[ids[:6, 0]])
    np.testing.assert_array_equal(padded[6:], 0)
    shaped = je.Embedding({"f": _je_feature(output_shape=(4, 2))}, mesh=mesh)
    out = np.asarray(shaped.lookup(state, shaped.preprocess({"f": ids}))["f"])
    np.testing.assert_array_equal(out, TABLE[ids[:, 0]].reshape(4, 2, DIM))
