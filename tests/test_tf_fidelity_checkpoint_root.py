"""TF checkpoints under any root: ``save_tf_checkpoint(root=...)``, ``load_tf_checkpoint`` finds it.

TF programs hang the embedding object under any attribute: ``tf.train.Checkpoint(my_emb=emb)``
writes keys ``my_emb/<table>/.ATTRIBUTES/VARIABLE_VALUE``, a model attribute gives
``model/embedding_api/<table>/...``. These tests write real TF checkpoints with TF's own
``TPUEmbeddingForServing`` and ``TPUEmbedding`` (CPU) and read them back, and restore what
jaxembed writes into TF's objects under the same roots.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxembed as je

tf = pytest.importorskip("tensorflow")
TFE = tf.tpu.experimental.embedding
export = pytest.importorskip("jaxembed.export")

SHAPES = {"video": (8, 4), "user": (16, 2)}


def _values(seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Parameters and Adagrad accumulators per table, distinct per seed."""
    rng = np.random.default_rng(seed)
    return {
        name: {
            "parameters": rng.normal(size=shape).astype(np.float32),
            "accumulators": rng.uniform(0.1, 2, size=shape).astype(np.float32),
        }
        for name, shape in SHAPES.items()
    }


def _tf_embedding(values=None, cls=None):
    """TF's embedding object (TPUEmbeddingForServing by default) with Adagrad slots, built and
    filled with ``values``."""
    tables = {n: TFE.TableConfig(v, d, name=n) for n, (v, d) in SHAPES.items()}
    features = {
        "watched": TFE.FeatureConfig(tables["video"]),
        "friends": TFE.FeatureConfig(tables["user"]),
    }
    embedding = (cls or TFE.TPUEmbeddingForServing)(features, TFE.Adagrad(0.1))
    embedding.build()  # eagerly (TPUEmbedding on CPU too: variables only, no TPU)
    for name, slots in (values or {}).items():
        for slot, value in slots.items():
            embedding._variables[name][slot].assign(value)
    return embedding


def _je_embedding():
    tables = {n: je.TableConfig(v, d, name=n) for n, (v, d) in SHAPES.items()}
    features = {
        "watched": je.FeatureConfig(tables["video"]),
        "friends": je.FeatureConfig(tables["user"]),
    }
    return je.Embedding(features, je.optimizers.Adagrad(0.1))


def _assert_state_holds(emb, state, values):
    slots = emb.slot_variables(state)
    for table, name in emb.table_names.items():
        np.testing.assert_array_equal(
            np.asarray(emb.embedding_tables(state)[table]), values[name]["parameters"]
        )
        np.testing.assert_array_equal(
            np.asarray(slots[table]["accumulators"]), values[name]["accumulators"]
        )


@pytest.mark.parametrize(
    "make_checkpoint, root",
    [
        (lambda emb: tf.train.Checkpoint(my_emb=emb), "my_emb"),
        (lambda emb: tf.train.Checkpoint(embedding=emb), "embedding"),
        (lambda emb: tf.train.Checkpoint(emb), ""),
        (lambda emb: tf.train.Checkpoint(model=_module(embedding_api=emb)), "model/embedding_api"),
        (lambda emb: tf.train.Checkpoint(**{"tpu.emb": emb}), "tpu.emb"),
    ],
    ids=["my_emb", "embedding", "root_object", "nested", "dotted"],
)
@pytest.mark.parametrize("tf_class", ["TPUEmbeddingForServing", "TPUEmbedding"])
def test_load_finds_any_root_of_a_real_tf_checkpoint(tmp_path, make_checkpoint, root, tf_class):
    values = _values(0)
    embedding = _tf_embedding(values, getattr(TFE, tf_class))
    path = make_checkpoint(embedding).write(str(tmp_path / "ckpt"))
    emb = _je_embedding()
    _assert_state_holds(emb, export.load_tf_checkpoint(path, emb), values)
    _assert_state_holds(emb, export.load_tf_checkpoint(path, emb, root=root), values)


def _module(**children):
    module = tf.Module()
    for name, child in children.items():
        setattr(module, name, child)
    return module


def test_several_embedding_objects_list_the_candidates(tmp_path):
    first, second = _values(1), _values(2)
    checkpoint = tf.train.Checkpoint(
        old_emb=_tf_embedding(first), model=_module(emb=_tf_embedding(second))
    )
    path = checkpoint.write(str(tmp_path / "ckpt"))
    emb = _je_embedding()
    with pytest.raises(ValueError, match=r"several objects: 'model/emb', 'old_emb'\. Pass"):
        export.load_tf_checkpoint(path, emb)
    _assert_state_holds(emb, export.load_tf_checkpoint(path, emb, root="old_emb"), first)
    _assert_state_holds(emb, export.load_tf_checkpoint(path, emb, root="model/emb"), second)
    with pytest.raises(ValueError, match=r"under root 'model'.*'model/emb', 'old_emb'"):
        export.load_tf_checkpoint(path, emb, root="model")


@pytest.mark.parametrize("root", ["my_emb", "embedding", "model/embedding_api", ""])
def test_save_under_a_root_restores_into_tf(tmp_path, root):
    emb = _je_embedding()
    values = _values(3)
    tables = {n: v["parameters"] for n, v in values.items()}
    slots = {n: {"accumulators": v["accumulators"]} for n, v in values.items()}
    state = emb.state_from_logical(tables, slots)
    path = export.save_tf_checkpoint(tmp_path / "ckpt", emb, state, root=root)
    embedding = _tf_embedding()
    if not root:
        target = tf.train.Checkpoint(embedding)
    elif "/" in root:
        outer, inner = root.split("/")
        target = tf.train.Checkpoint(**{outer: _module(**{inner: embedding})})
    else:
        target = tf.train.Checkpoint(**{root: embedding})
    # Every saved object found its TF object (only the restoring Checkpoint's own save_counter
    # is new, so assert_existing_objects_matched would fail on it).
    target.restore(path).assert_nontrivial_match()
    saved = {k for k, _ in tf.train.list_variables(path) if k.endswith("VARIABLE_VALUE")}
    assert len(saved) == 2 * len(values)
    for name, slot_values in values.items():
        for slot, value in slot_values.items():
            np.testing.assert_array_equal(embedding._variables[name][slot].numpy(), value)
    _assert_state_holds(emb, export.load_tf_checkpoint(path, emb), values)


def test_default_root_is_embedding(tmp_path):
    emb = _je_embedding()
    path = export.save_tf_checkpoint(tmp_path / "ckpt", emb, emb.init(jax.random.key(0)))
    keys = [k for k, _ in tf.train.list_variables(path) if k.endswith("VARIABLE_VALUE")]
    assert keys and all(k.startswith("embedding/") for k in keys)


@pytest.mark.parametrize("root", ["a//b", "/a", "save_counter", 3])
def test_bad_roots_are_refused_before_any_work(tmp_path, root):
    emb = _je_embedding()
    state = emb.init(jax.random.key(0))
    with pytest.raises((ValueError, TypeError), match="root"):
        export.save_tf_checkpoint(tmp_path / "ckpt", emb, state, root=root)
    assert not list(tmp_path.iterdir())
