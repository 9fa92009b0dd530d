"""Structures: ``preprocess`` and ``apply_gradients`` check them as TF's ``TPUEmbedding`` does.

TF's ``TPUEmbedding.enqueue`` calls ``nest.assert_same_structure(self._feature_config, features)``
(and the same for ``weights``), and ``apply_gradients`` calls it for the gradients
(tensorflow/python/tpu/tpu_embedding_v2.py, 2.21). So every feature is required (no subsets:
those are ``serving_embedding_lookup``'s), and container types count: ``TypeError`` for a list
where the config holds a tuple (TF's ``test_pass_non_tensor_to_apply_gradients``), ``ValueError``
for missing or extra features (TF's ``test_enqueue_incorrect_structure_for_features_and_weights``).
A non-tensor gradient leaf is a ``ValueError`` "found non-tensor type".

Enqueue and apply_gradients need a TPU, so the oracle is the call they make,
``tf.nest.assert_same_structure(feature_config, x)``, run on the same structures.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

import jaxembed as je

tf = pytest.importorskip("tensorflow")

DIM = 2
TABLE = je.TableConfig(6, DIM, initializer=jax.nn.initializers.constant(0.5), name="t")
F = je.FeatureConfig(TABLE)
FC = {"a": F, "b": (F, F), "c": {"x": F}}


def _ids():
    return np.array([1, 2])


def _like(structure, leaf):
    """``structure`` with every FeatureConfig replaced by ``leaf()``."""
    return jax.tree.map(
        lambda _: leaf(), structure, is_leaf=lambda x: isinstance(x, je.FeatureConfig)
    )


FULL = _like(FC, _ids)
CASES = {
    # name: a function of a full structure (of ids, weights or gradients) -> a candidate
    "full": lambda s: s,
    "ordered_dict": lambda s: collections.OrderedDict(sorted(s.items())),
    "missing_feature": lambda s: {"a": s["a"], "b": s["b"]},
    "missing_nested_feature": lambda s: {**s, "c": {}},
    "short_tuple": lambda s: {**s, "b": s["b"][:1]},
    "extra_feature": lambda s: {**s, "d": s["a"]},
    "list_for_tuple": lambda s: {**s, "b": list(s["b"])},
    "leaf_for_tuple": lambda s: {**s, "b": s["a"]},
    "list_for_dict": lambda s: [s["a"], s["b"], s["c"]],
    "list_for_tuple_and_short": lambda s: {**s, "b": [s["b"][0]]},
}


def _tf_error(candidate):
    """What TF's ``nest.assert_same_structure(feature_config, candidate)`` raises (or None)."""
    try:
        tf.nest.assert_same_structure(FC, candidate)
    except (TypeError, ValueError) as err:
        return type(err)
    return None


def _check(call, expected, missing=None):
    if expected is None:
        call()
        return
    with pytest.raises(expected) as info:
        call()
    message = str(info.value)
    assert message.startswith("The two structures don't have the same nested structure.")
    if missing:
        assert repr(missing) in message


MISSING = {"missing_feature": "c/x", "missing_nested_feature": "c/x", "short_tuple": "b/1"}


@pytest.mark.parametrize("name", list(CASES))
def test_preprocess_inputs_structure_as_tf_enqueue(name):
    candidate = CASES[name](FULL)
    emb = je.Embedding(FC, je.optimizers.SGD(0.1))
    _check(lambda: emb.preprocess(candidate), _tf_error(candidate), MISSING.get(name))


@pytest.mark.parametrize("name", list(CASES))
def test_preprocess_weights_structure_as_tf_enqueue(name):
    """Weights: the structure of feature_config, None for unweighted (here: all) features."""
    candidate = CASES[name](_like(FC, lambda: None))
    emb = je.Embedding(FC, je.optimizers.SGD(0.1))
    _check(lambda: emb.preprocess(FULL, candidate), _tf_error(candidate), MISSING.get(name))


@pytest.mark.parametrize("name", list(CASES))
def test_apply_gradients_structure_as_tf(name):
    candidate = CASES[name](_like(FC, lambda: np.ones((2, DIM), np.float32)))
    emb = je.Embedding(FC, je.optimizers.SGD(0.1))
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess(FULL)
    expected = _tf_error(candidate)
    _check(lambda: emb.apply_gradients(state, batch, candidate), expected, MISSING.get(name))
    if expected is not None:  # at trace time under jit too
        with pytest.raises(expected):
            jax.jit(emb.apply_gradients)(state, batch, candidate)


def _tf_fixture_embedding():
    """TF's fixture shape: a tuple of three features (watched, favorited, friends)."""
    video = je.TableConfig(8, 4, name="video", combiner="sum")
    user = je.TableConfig(16, 2, name="user")
    fc = (je.FeatureConfig(video), je.FeatureConfig(video), je.FeatureConfig(user))
    emb = je.Embedding(fc, je.optimizers.SGD(0.1))
    ids = (np.array([0, 1]), np.array([1, 0]), np.array([3, 2]))
    return emb, emb.init(jax.random.key(0)), emb.preprocess(ids)


def test_pass_non_tensor_to_apply_gradients():
    """TF's ``test_pass_non_tensor_to_apply_gradients``: ``(1, 2, 3)`` -> ValueError 'found
    non-tensor type'; ``[1, 2, 3]`` for a tuple config -> TypeError 'The two structures don't
    have the same nested structure.'"""
    emb, state, batch = _tf_fixture_embedding()
    with pytest.raises(ValueError, match="found non-tensor type: <class 'int'> at path 0"):
        emb.apply_gradients(state, batch, (1, 2, 3))
    with pytest.raises(TypeError, match="The two structures don't have the same nested structure."):
        emb.apply_gradients(state, batch, [1, 2, 3])
    with pytest.raises(TypeError):
        tf.nest.assert_same_structure(emb.feature_config, [1, 2, 3])


def test_enqueue_incorrect_structure_for_features_and_weights():
    """TF's ``test_enqueue_incorrect_structure_for_features_and_weights``: one feature of three
    (or one weight of three) is a ValueError, raised by nest.assert_same_structure."""
    emb, _, _ = _tf_fixture_embedding()
    ids = (np.array([0, 1]), np.array([1, 0]), np.array([3, 2]))
    with pytest.raises(ValueError, match=r"missing features \['1', '2'\]"):
        emb.preprocess(ids[:1])
    with pytest.raises(ValueError, match=r"weights: .*number of elements 3, this has 1"):
        emb.preprocess(ids, (None,))


def test_subsets_remain_fine_for_embedding_lookup():
    """``je.embedding_lookup`` keeps TF's serving semantics: inputs may be a subset."""
    subset = {"a": _ids(), "c": {"x": _ids()}}
    out = je.embedding_lookup(subset, None, {TABLE: np.ones((6, DIM), np.float32)}, FC)
    assert sorted(out) == ["a", "c"]
