"""A checkpoint that carries the dense model: ``DenseModel`` saved, validated and restored."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import dense_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed as je
from jaxembed import checkpoint as ck


def _emb(mesh=None):
    users = je.TableConfig(16, 4, name="users")
    items = je.TableConfig(12, 3, combiner="mean", name="items")
    features = {
        "user": je.FeatureConfig(users),
        "history": je.FeatureConfig(items, max_sequence_length=3),
    }
    sharding = {"users": "row"} if mesh is not None else None
    return je.Embedding(features, je.optimizers.Adagrad(0.1), mesh=mesh, sharding=sharding)


def _acts(emb, state, batch=4):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 4, batch)
    inputs = {
        "user": rng.integers(0, 16, batch),
        "history": je.Ragged.from_row_lengths(rng.integers(0, 12, lengths.sum()), lengths),
    }
    return emb.lookup(state, emb.preprocess(inputs))


@pytest.fixture(scope="module")
def setup():
    emb = _emb()
    state = emb.init(jax.random.key(0))
    return emb, state, _acts(emb, state)


def _tower_params(acts, hidden=(8, 4), outputs=2):
    return dense_models.Tower(hidden=hidden, outputs=outputs).init(jax.random.key(1), acts)


def _assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _step_dirs(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []


# -- round trips --


def test_flax_module_with_kwargs_round_trips(tmp_path, setup):
    emb, state, acts = setup
    params = _tower_params(acts)
    model = ck.DenseModel(dense_models.Tower, params, kwargs={"hidden": (8, 4), "outputs": 2})
    assert model.apply == "dense_models:Tower"
    assert model.kwargs == {"hidden": [8, 4], "outputs": 2}  # as JSON reads it back
    assert "parameters>" in repr(model) and "Array" not in repr(model)
    opt_state = {"mu": jnp.ones(3)}
    with ck.CheckpointManager(tmp_path, emb, async_save=True) as manager:
        manager.save(1, state, extra={"opt": opt_state}, model=model)
        manager.wait_until_finished()
        restored = manager.restore_model()
        state2, extra = manager.restore(extra={"opt": opt_state})  # the other items as before
    assert isinstance(restored, ck.DenseModel)
    assert (restored.apply, restored.kwargs) == (model.apply, model.kwargs)
    _assert_trees_equal(restored.params, params)
    _assert_trees_equal(extra, {"opt": opt_state})
    want = dense_models.Tower(hidden=(8, 4), outputs=2).apply(params, acts)
    got = restored.resolve()(restored.params, acts)
    _assert_trees_equal(got, want)
    np.testing.assert_array_equal(np.asarray(state2.tables["users"]), state.tables["users"])

    config = ck.read_config(tmp_path)
    assert config["model"]["apply"] == "dense_models:Tower"
    kernel = config["model"]["params"]["dict"]["params"]["dict"]["Dense_0"]["dict"]["kernel"]
    assert kernel == {"array": {"shape": [13, 8], "dtype": "float32"}}  # 4 + 3 * 3 inputs
    assert any(name.startswith("model/params/") for name in config["checksums"]["arrays"])
    summary = ck.model_summary(config)
    count = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    assert summary == {
        "apply": "dense_models:Tower",
        "kwargs": {"hidden": [8, 4], "outputs": 2},
        "arrays": 6,
        "parameters": count,
    }


def test_function_target_with_kwargs_and_tuple_params(tmp_path, setup):
    emb, state, acts = setup
    rng = np.random.default_rng(1)
    params = (rng.normal(size=(13, 2)).astype(np.float32), np.arange(2, dtype=np.float32))
    model = ck.DenseModel("dense_models:linear", params, kwargs={"scale": 2.0})
    je.checkpoint.save(tmp_path, emb, state, step=3, model=model)
    restored = ck.restore_model(tmp_path, 3)
    assert restored is not None and type(restored.params) is tuple  # containers kept
    _assert_trees_equal(restored.params, params)
    apply = restored.resolve()
    np.testing.assert_allclose(
        np.asarray(apply(restored.params, acts)),
        np.asarray(dense_models.linear(params, acts, scale=2.0)),
        rtol=1e-6,
    )


def test_model_without_params(tmp_path, setup):
    emb, state, acts = setup
    je.checkpoint.save(
        tmp_path, emb, state, step=0, model=ck.DenseModel(dense_models.no_params, {})
    )
    restored = ck.restore_model(tmp_path)
    assert restored is not None and restored.params == {}
    assert restored.resolve()({}, acts).shape == (4,)
    assert ck.model_summary(ck.read_config(tmp_path))["parameters"] == 0


def test_checkpoint_without_a_model_restores_and_has_none(tmp_path, setup):
    emb, state, _ = setup
    je.checkpoint.save(tmp_path, emb, state, step=1)
    assert ck.restore_model(tmp_path) is None
    assert ck.model_summary(ck.read_config(tmp_path)) is None
    je.checkpoint.restore(tmp_path, emb)


def test_restore_onto_another_device_count(tmp_path):
    mesh8 = jax.make_mesh((8,), ("x",))
    emb = _emb(mesh8)
    state = emb.init(jax.random.key(0))
    acts = _acts(emb, state, batch=8)  # divisible by the 8 devices
    params = _tower_params(acts, hidden=(16,))
    replicated = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec())
    by_rows = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec(None, "x"))
    placed = jax.tree.map(lambda x: jax.device_put(x, replicated), params)
    kernel = placed["params"]["Dense_0"]["kernel"]  # [13, 16]: its columns over 8 devices
    placed["params"]["Dense_0"]["kernel"] = jax.device_put(kernel, by_rows)
    with ck.CheckpointManager(tmp_path, emb, async_save=False) as manager:
        manager.save(
            5,
            state,
            model=ck.DenseModel(dense_models.Tower, placed, kwargs={"hidden": [16], "outputs": 2}),
        )
    mesh2 = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("y",))
    on2 = jax.sharding.NamedSharding(mesh2, jax.sharding.PartitionSpec())
    restored = ck.restore_model(tmp_path, sharding=on2)
    assert restored is not None
    _assert_trees_equal(restored.params, params)
    assert all(x.sharding == on2 for x in jax.tree.leaves(restored.params))
    default = ck.restore_model(tmp_path)  # one device
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(default.params))
    per_leaf = jax.tree.map(lambda _: on2, params)
    _assert_trees_equal(ck.restore_model(tmp_path, sharding=per_leaf).params, params)
    prefix = {
        "params": {"Dense_0": on2, "Dense_1": jax.sharding.SingleDeviceSharding(jax.devices()[3])}
    }
    by_layer = ck.restore_model(tmp_path, sharding=prefix).params["params"]
    assert by_layer["Dense_0"]["bias"].sharding == on2
    assert by_layer["Dense_1"]["kernel"].sharding.device_set == {jax.devices()[3]}
    with pytest.raises(ValueError, match=r"pytree of them that is a prefix"):
        ck.restore_model(tmp_path, sharding={"weights": on2})
    host_acts = jax.tree.map(np.asarray, acts)
    got = restored.resolve()(restored.params, host_acts)  # computed on the 2-device mesh
    want = dense_models.Tower(hidden=(16,), outputs=2).apply(params, host_acts)
    np.testing.assert_allclose(np.asarray(got["logit"]), np.asarray(want["logit"]), rtol=1e-5)


# -- validation --


def _in_main(params, acts):
    return acts


_in_main.__module__ = "__main__"


Pair = collections.namedtuple("Pair", ["w", "b"])


@pytest.mark.parametrize(
    "apply,kwargs,params,error,match",
    [
        (lambda p, a: a, None, {}, ValueError, r"lambda.*`def` at the top level of an importable"),
        (_in_main, None, {}, ValueError, r"__main__.*define it in an importable module"),
        ("__main__:predict", None, {}, ValueError, r"__main__.*importable module"),
        ("dense_models.linear", None, {}, ValueError, r"not an import path 'package.module:attr"),
        ("dense_models:linear", {"act": jax.nn.relu}, {}, TypeError, r"kwargs\['act'\].*JSON"),
        ("dense_models:linear", {"scale": float("nan")}, {}, TypeError, r"kwargs\['scale'\].*nan"),
        ("dense_models:linear", {"ids": {1, 2}}, {}, TypeError, r"kwargs\['ids'\] .* set.*JSON"),
        ("dense_models:linear", {"d": {1: 2}}, {}, TypeError, r"kwargs\['d'\] .* key 1"),
        ("dense_models:linear", None, {"w": 1.0}, TypeError, r"params\['w'\] is a float.*asarray"),
        ("dense_models:linear", None, Pair(1, 2), TypeError, r"params is a Pair"),
        ("dense_models:linear", None, {1: np.ones(2)}, TypeError, r"non-string key"),
        (
            "dense_models:linear",
            None,
            {"s": np.array(["a"])},
            TypeError,
            r"params\['s'\] is a ndarray of dtype <U1",
        ),
    ],
    ids=[
        "lambda",
        "function_in_main",
        "path_in_main",
        "no_colon",
        "kwargs_function",
        "kwargs_nan",
        "kwargs_set",
        "kwargs_int_key",
        "params_float",
        "params_namedtuple",
        "params_int_key",
        "params_strings",
    ],
)
def test_invalid_models_are_refused_when_built(apply, kwargs, params, error, match):
    with pytest.raises(error, match=match):
        ck.DenseModel(apply, params, kwargs=kwargs)


def test_a_local_function_or_partial_has_no_import_path():
    def local(params, acts):
        return acts

    with pytest.raises(ValueError, match=r"inside a function.*top level of an importable"):
        ck.DenseModel(local, {})
    import functools

    with pytest.raises(TypeError, match=r"functools.partial.*kwargs="):
        ck.DenseModel(functools.partial(dense_models.linear, scale=2.0), {})


@pytest.mark.parametrize(
    "apply,kwargs,error,match",
    [
        ("dense_models:missing", None, ValueError, r"has no attribute 'missing'"),
        (
            "no_such_module_xyz.model:f",
            None,
            ValueError,
            r"no module 'no_such_module_xyz'.*install",
        ),
        ("dense_models:NOT_CALLABLE", None, TypeError, r"is a int, not a function"),
        ("dense_models:NotAModule", None, TypeError, r"class that is not a flax.linen.Module"),
        ("dense_models:Tower", {"widths": [3]}, TypeError, r"cannot be built with kwargs.*widths"),
    ],
    ids=["missing_attribute", "missing_module", "not_callable", "plain_class", "bad_kwargs"],
)
def test_targets_that_do_not_resolve_are_refused_before_writing(
    tmp_path, setup, apply, kwargs, error, match
):
    emb, state, _ = setup
    model = ck.DenseModel(apply, {}, kwargs=kwargs)  # only the path's form is checked here
    with pytest.raises(error, match=match):
        je.checkpoint.save(tmp_path, emb, state, step=1, model=model)
    with pytest.raises(TypeError, match=r"must be a je.checkpoint.DenseModel"):
        je.checkpoint.save(tmp_path, emb, state, step=1, model=dense_models.linear)  # type: ignore[arg-type]
    assert _step_dirs(tmp_path) == []


# -- damage --


def _random_params(seed):
    """``w`` of random bits (incompressible: stored raw, so a test can find and flip them)."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, (64, 32), dtype=np.uint32).view(np.float32)
    w = np.where(np.isfinite(bits), bits, np.float32(seed))
    return {"w": w, "b": np.zeros(32, np.float32)}


def _flip(step_dir: Path, values: np.ndarray) -> None:
    window = values.tobytes()[256:272]  # random floats: stored raw, not compressed
    for path in sorted(p for p in (step_dir / "model").rglob("*") if p.is_file()):
        data = bytearray(path.read_bytes())
        at = data.find(window)
        if at >= 0:
            data[at + 1] ^= 0x10
            path.write_bytes(bytes(data))
            return
    pytest.fail("the array's bytes were not found in the model item's files")


def test_corrupted_params_fail_the_checksum_naming_the_array(tmp_path, setup):
    emb, state, _ = setup
    for step in (1, 2):
        model = ck.DenseModel("dense_models:linear", _random_params(step))
        je.checkpoint.save(tmp_path, emb, state, step=step, model=model)
    _flip(tmp_path / "2", _random_params(2)["w"])
    with pytest.raises(
        ck.CheckpointCorruptedError, match=r"step 2 .*dense model parameter 'w'.*checksum"
    ) as err:
        ck.restore_model(tmp_path, 2)
    assert err.value.damaged == ["dense model parameter 'w'"]
    with pytest.raises(ck.CheckpointCorruptedError, match=r"newest intact step is 1: .*step=1"):
        ck.restore_model(tmp_path)
    _assert_trees_equal(ck.restore_model(tmp_path, 1).params, _random_params(1))
    je.checkpoint.restore(tmp_path, emb, step=2)  # the tables are intact


def test_deleted_params_item_is_named(tmp_path, setup):
    import shutil

    emb, state, _ = setup
    je.checkpoint.save(
        tmp_path, emb, state, step=1, model=ck.DenseModel("dense_models:linear", _random_params(1))
    )
    shutil.rmtree(tmp_path / "1" / "model")
    with pytest.raises(
        ck.CheckpointCorruptedError, match=r"step 1 .*dense model's params cannot be read"
    ):
        ck.restore_model(tmp_path, 1)


def test_config_json_holds_no_pickles(tmp_path, setup):
    emb, state, acts = setup
    model = ck.DenseModel(dense_models.Tower, _tower_params(acts, (4,), 1), kwargs={"hidden": [4]})
    je.checkpoint.save(tmp_path, emb, state, step=1, model=model)
    config = json.loads((tmp_path / "1" / "config" / "metadata").read_text())
    assert config["model"]["apply"] == "dense_models:Tower" and config["model"]["kwargs"] == {
        "hidden": [4]
    }
