"""``jaxembed export`` and ``jaxembed inspect``, and rebuilding configs from a checkpoint."""

from __future__ import annotations

import collections
import importlib
import json
import sys

import dense_models
import jax
import numpy as np
import pytest

import jaxembed as je
from jaxembed import cli

Pair = collections.namedtuple("Pair", ["left", "right"])


def _features():
    users = je.TableConfig(40, 4, combiner="sum", name="users")
    items = je.TableConfig(30, 3, combiner="mean")  # unnamed: "table_0" (first in ctx/cats)
    return {
        "user": je.FeatureConfig(users),
        "ctx": {
            "cats": je.FeatureConfig(items, name="categories"),
            "hist": je.FeatureConfig(items, max_sequence_length=3),
        },
        "list": [je.FeatureConfig(items), (je.FeatureConfig(users),)],
        "pair": Pair(je.FeatureConfig(items), je.FeatureConfig(users, output_shape=[2, 2])),
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Steps 1 and 2 of an Adagrad run (the tables differ between them)."""
    directory = tmp_path_factory.mktemp("ckpt")
    emb = je.Embedding(_features(), je.optimizers.Adagrad(0.1))
    states = {1: emb.init(jax.random.key(1)), 2: emb.init(jax.random.key(2))}
    with je.checkpoint.CheckpointManager(directory, emb, async_save=False) as manager:
        for step, state in states.items():
            manager.save(step, state)
    return directory, emb, states


def _paths(tree):
    return [p for p, _ in je._nest.flatten_with_paths(tree)]


def test_feature_config_from_rebuilds_structure_and_tables(checkpoint):
    directory, emb, _ = checkpoint
    config = je.checkpoint.read_config(directory)
    assert config["step"] == 2
    rebuilt = je.checkpoint.feature_config_from(config)
    assert _paths(rebuilt) == _paths(emb.feature_config)
    assert type(rebuilt["list"]) is list and type(rebuilt["list"][1]) is tuple
    assert rebuilt["pair"]._fields == ("left", "right")
    flat = dict(je._nest.flatten_with_paths(rebuilt))
    for path, feature in je._nest.flatten_with_paths(emb.feature_config):
        got = flat[path]
        assert (got.max_sequence_length, got.output_shape, got.name) == (
            feature.max_sequence_length,
            feature.output_shape,
            feature.name,
        )
        assert (got.table.vocabulary_size, got.table.dim, got.table.combiner) == (
            feature.table.vocabulary_size,
            feature.table.dim,
            feature.table.combiner,
        )
        assert got.table.name == emb.table_names[feature.table]
    assert flat["user"].table is flat["list/1/0"].table  # shared tables stay shared


def test_feature_config_from_old_checkpoints_without_structure(checkpoint):
    directory, emb, _ = checkpoint
    config = je.checkpoint.read_config(directory)
    del config["structure"]
    rebuilt = je.checkpoint.feature_config_from(config)
    assert sorted(_paths(rebuilt)) == sorted(_paths(emb.feature_config))


def test_read_config_missing_step(checkpoint):
    directory, *_ = checkpoint
    with pytest.raises(FileNotFoundError, match=r"step 9.*\[1, 2\]"):
        je.checkpoint.read_config(directory, 9)


# batch 4 (output_shape [2, 2] combines it); every feature gets these ids, ctx/cats the weights
IDS = np.array([3, 1, 0, 2], np.int64)
LENGTHS = np.array([2, 0, 1, 1], np.int64)
WEIGHTS = np.array([0.5, 2.0, 1.0, 3.0], np.float32)


def _request(emb) -> dict[str, np.ndarray]:
    """``serving_default``'s inputs: IDS and LENGTHS per feature, WEIGHTS for ctx/cats."""
    request = {}
    for path in _paths(emb.feature_config):
        name = path.replace("/", "_")
        request[f"{name}_ids"], request[f"{name}_lengths"] = IDS, LENGTHS
    request["ctx_cats_weights"] = WEIGHTS
    return request


def _lookup(emb, state):
    """JAX's activations for ``_request``."""
    ragged = je.Ragged.from_row_lengths(IDS, LENGTHS)
    inputs = jax.tree.map(lambda _: ragged, emb.feature_config)
    weight_tree = jax.tree.map(lambda _: None, emb.feature_config)
    weight_tree["ctx"]["cats"] = je.Ragged.from_row_lengths(WEIGHTS, LENGTHS)
    return je.embedding_lookup(inputs, weight_tree, emb.embedding_tables(state), emb.feature_config)


def _serve(tf, path, request):
    served = tf.saved_model.load(str(path)).signatures["serving_default"]
    got = served(**{k: tf.constant(v) for k, v in request.items()})
    return {k: v.numpy() for k, v in got.items()}


def test_export_command_serves_the_chosen_step(checkpoint, tmp_path, capsys):
    tf = pytest.importorskip("tensorflow")
    directory, emb, states = checkpoint
    out = tmp_path / "serving"
    argv = ["export", str(directory), str(out), "--step", "1", "--version", "7"]
    assert cli.main(argv + ["--weighted", "ctx/cats"]) == 0
    text = capsys.readouterr().out
    assert "exported step 1" in text and "(the tables)" in text
    # no model stored: said so, with how to store one
    assert f"tables-only export: step 1 of {directory} stores no dense model" in text
    assert "model=je.checkpoint.DenseModel('package.module:predict', params)" in text
    got = _serve(tf, out / "7", _request(emb))
    want = _lookup(emb, states[1])
    for path, value in je._nest.flatten_with_paths(want):
        np.testing.assert_array_equal(got[path.replace("/", "_")], np.asarray(value))


def test_export_command_errors(checkpoint, tmp_path, capsys):
    pytest.importorskip("tensorflow")
    directory, *_ = checkpoint
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert exit_info.value.code == 2  # a user error: one line, exit status 2
    assert "jaxembed export: error" in capsys.readouterr().err
    cli.main(["export", str(directory), str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        cli.main(["export", str(directory), str(tmp_path / "out")])
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["export", str(directory), str(tmp_path / "out"), "--overwrite"]) == 0


def test_inspect_checkpoint(checkpoint, capsys):
    directory, *_ = checkpoint
    assert cli.main(["inspect", str(directory)]) == 0
    text = capsys.readouterr().out
    assert "steps: [1, 2]" in text
    assert "users: [40, 4] combiner=sum optimizer=Adagrad" in text
    assert "table_0: [30, 3] combiner=mean optimizer=Adagrad" in text
    assert "ctx/hist -> table_0 max_sequence_length=3" in text
    assert cli.main(["inspect", str(directory), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "jaxembed checkpoint" and info["steps"] == [1, 2]


def test_inspect_saved_model_and_tf_checkpoint(checkpoint, tmp_path, capsys):
    pytest.importorskip("tensorflow")
    from jaxembed import export

    directory, emb, states = checkpoint
    cli.main(["export", str(directory), str(tmp_path / "m")])
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "m"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "SavedModel"
    assert set(info["signatures"]) == {"serving_default", "serving_examples"}
    inputs = info["signatures"]["serving_default"]["inputs"]
    assert inputs["ctx_hist_ids"] == {"dtype": "int64", "shape": [None]}
    outputs = info["signatures"]["serving_default"]["outputs"]
    assert outputs["ctx_hist"] == {"dtype": "float32", "shape": [None, 3, 3]}
    assert info["variables"]["tables/users/.ATTRIBUTES/VARIABLE_VALUE"] == [40, 4]
    assert [t["name"] for t in info["jaxembed"]["config"]["tables"]] == ["table_0", "users"]
    assert cli.main(["inspect", str(tmp_path / "m")]) == 0
    assert "signature serving_examples" in capsys.readouterr().out

    prefix = export.save_tf_checkpoint(tmp_path / "tf" / "ckpt", emb, states[2])
    assert cli.main(["inspect", prefix, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "TF checkpoint"
    assert info["variables"]["embedding/users.Saccumulators/.ATTRIBUTES/VARIABLE_VALUE"] == [40, 4]


# -- a checkpoint that stores the dense model --


def _model_features():
    """As ``_features`` without output_shape (the tower concatenates [batch, ...] activations)."""
    users = je.TableConfig(40, 4, combiner="sum", name="users")
    items = je.TableConfig(30, 3, combiner="mean", name="items")
    return {
        "user": je.FeatureConfig(users),
        "ctx": {
            "cats": je.FeatureConfig(items, name="categories"),
            "hist": je.FeatureConfig(items, max_sequence_length=3),
        },
        "pair": Pair(je.FeatureConfig(items), je.FeatureConfig(users)),
    }


TOWER_KWARGS = {"hidden": [8, 4], "outputs": 2}


@pytest.fixture(scope="module")
def model_checkpoint(tmp_path_factory):
    """Step 1 with a Flax tower stored as ``dense_models:Tower`` (trained-looking params)."""
    directory = tmp_path_factory.mktemp("model_ckpt")
    emb = je.Embedding(_model_features(), je.optimizers.Adagrad(0.1))
    state = emb.init(jax.random.key(3))
    tower = dense_models.Tower(**TOWER_KWARGS)
    params = tower.init(jax.random.key(4), _lookup(emb, state))
    model = je.checkpoint.DenseModel(dense_models.Tower, params, kwargs=TOWER_KWARGS)
    je.checkpoint.save(directory, emb, state, step=1, model=model)
    return directory, emb, state, params


def test_export_command_serves_the_stored_dense_model(model_checkpoint, tmp_path, capsys):
    tf = pytest.importorskip("tensorflow")
    directory, emb, state, params = model_checkpoint
    argv = ["export", str(directory), str(tmp_path / "m"), "--weighted", "ctx/cats"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "tables-only" not in text
    assert "(the tables and the dense model dense_models:Tower)" in text
    got = _serve(tf, tmp_path / "m", _request(emb))
    want = dense_models.Tower(**TOWER_KWARGS).apply(params, _lookup(emb, state))  # in JAX
    assert set(got) == {"score", "logit"} and got["score"].shape == (4, 2)
    for key in ("score", "logit"):
        np.testing.assert_allclose(got[key], np.asarray(want[key]), rtol=1e-5, atol=1e-6)


def test_export_tables_only_skips_the_stored_model(model_checkpoint, tmp_path, capsys):
    tf = pytest.importorskip("tensorflow")
    directory, emb, state, _ = model_checkpoint
    out = tmp_path / "tables"
    assert cli.main(["export", str(directory), str(out), "--tables-only"]) == 0
    text = capsys.readouterr().out
    assert (
        "tables-only export (--tables-only): the dense model dense_models:Tower stored in step 1 "
        "is left out" in text
    )
    assert "(the tables)" in text
    request = {k: v for k, v in _request(emb).items() if k != "ctx_cats_weights"}
    got = _serve(tf, out, request)
    assert set(got) == {p.replace("/", "_") for p in _paths(emb.feature_config)}


def test_export_of_a_model_that_does_not_import_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorflow")
    modules = tmp_path / "modules"
    modules.mkdir()
    source = modules / "gone_models_xyz.py"
    source.write_text("def predict(params, acts):\n    return acts\n")
    monkeypatch.syspath_prepend(str(modules))
    emb = je.Embedding({"user": je.FeatureConfig(je.TableConfig(8, 2, name="users"))})
    params = {"s": np.ones((), np.float32)}
    model = je.checkpoint.DenseModel("gone_models_xyz:predict", params)
    je.checkpoint.save(tmp_path / "ckpt", emb, emb.init(jax.random.key(0)), step=1, model=model)
    source.unlink()  # the package is not installed where the checkpoint is exported
    monkeypatch.delitem(sys.modules, "gone_models_xyz")
    importlib.invalidate_caches()

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxembed export: error: step 1 of ")
    assert "'gone_models_xyz:predict'" in err and "install the package" in err
    assert "--tables-only" in err
    assert not (tmp_path / "out").exists()
    # inspect shows the path without importing it; --tables-only exports without importing it
    assert cli.main(["inspect", str(tmp_path / "ckpt")]) == 0
    text = capsys.readouterr().out
    assert "dense model: gone_models_xyz:predict kwargs={} (1 parameter in 1 array;" in text
    assert cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--tables-only"]) == 0
    assert "gone_models_xyz" not in sys.modules


def test_inspect_shows_the_dense_model_or_none(model_checkpoint, checkpoint, capsys):
    directory, _, _, params = model_checkpoint
    count = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    assert cli.main(["inspect", str(directory)]) == 0
    text = capsys.readouterr().out
    assert (
        f'dense model: dense_models:Tower kwargs={{"hidden": [8, 4], "outputs": 2}} ({count:,} '
        "parameters in 6 arrays; imported only by `jaxembed export`)" in text
    )
    assert cli.main(["inspect", str(directory), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["apply"] == "dense_models:Tower"
    assert info["model"]["kwargs"] == TOWER_KWARGS
    without, *_ = checkpoint
    assert cli.main(["inspect", str(without)]) == 0
    assert "dense model: none (no dense model stored;" in capsys.readouterr().out


def test_inspect_unknown_path(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["inspect", str(tmp_path)])
    assert "is not a jaxembed checkpoint" in capsys.readouterr().err


def test_export_quantized_and_inspect_shows_table_bytes(checkpoint, tmp_path, capsys):
    """``--quantize users=int8`` stores that table as uint8 rows (codes + scale and bias), the
    served activations stay within the row's quantization step of float32's, and ``inspect``
    lists each table's dtype and bytes."""
    tf = pytest.importorskip("tensorflow")
    directory, emb, states = checkpoint
    weighted = ["--weighted", "ctx/cats"]
    assert cli.main(["export", str(directory), str(tmp_path / "f32"), *weighted]) == 0
    args = ["export", str(directory), str(tmp_path / "q"), "--quantize", "users=int8"]
    assert cli.main(args + weighted) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "q"), "--json"]) == 0
    tables = json.loads(capsys.readouterr().out)["tables"]
    assert tables["users"]["dtype"] == "uint8"
    assert tables["users"]["shape"] == [40, 4 + 8]  # dim codes, then float32 scale and bias
    assert tables["users"]["float32_bytes"] == 40 * 4 * 4
    assert tables["table_0"]["dtype"] == "float32"
    assert cli.main(["inspect", str(tmp_path / "q")]) == 0
    text = capsys.readouterr().out
    assert "users: uint8[40, 12] 480 B (float32: 640 B) int8" in text
    request = _request(emb)
    quantized, full = _serve(tf, tmp_path / "q", request), _serve(tf, tmp_path / "f32", request)
    table = np.asarray(emb.embedding_tables(states[max(states)])[_users_table(emb)])
    step = float((table.max(axis=1) - table.min(axis=1)).max()) / 255  # the largest row step
    differs = False
    for name, value in full.items():
        # each looked-up element is off by at most half a step; a bag sums up to 3 of them
        np.testing.assert_allclose(quantized[name], value, rtol=0, atol=3 * step, err_msg=name)
        differs |= not np.array_equal(quantized[name], value)
    assert differs  # the users table is served quantized


def _users_table(emb):
    return next(t for t, name in emb.table_names.items() if name == "users")


def test_export_quantize_option_errors(checkpoint, tmp_path, capsys):
    directory, _, _ = checkpoint
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(directory), str(tmp_path / "q"), "--quantize", "users"])
    assert exit_info.value.code == 2
    assert "quantize" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["export", str(directory), str(tmp_path / "q"), "--quantize", "=int8"])
    assert "TABLE=SCHEME" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
