"""``jaxembed export`` and ``jaxembed inspect``, and rebuilding configs from a checkpoint."""

from __future__ import annotations

import collections
import json

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


def test_export_command_serves_the_chosen_step(checkpoint, tmp_path, capsys):
    tf = pytest.importorskip("tensorflow")
    directory, emb, states = checkpoint
    out = tmp_path / "serving"
    argv = ["export", str(directory), str(out), "--step", "1", "--version", "7"]
    assert cli.main(argv + ["--weighted", "ctx/cats"]) == 0
    assert "exported step 1" in capsys.readouterr().out
    served = tf.saved_model.load(str(out / "7")).signatures["serving_default"]
    lengths = np.array([2, 0, 1, 1], np.int64)  # batch 4: output_shape [2, 2] combines
    ids = np.array([3, 1, 0, 2], np.int64)
    weights = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
    request = {}
    for path in _paths(emb.feature_config):
        name = path.replace("/", "_")
        request[f"{name}_ids"], request[f"{name}_lengths"] = tf.constant(ids), tf.constant(lengths)
    request["ctx_cats_weights"] = tf.constant(weights)
    got = served(**request)
    ragged = je.Ragged.from_row_lengths(ids, lengths)
    inputs = jax.tree.map(lambda _: ragged, emb.feature_config)
    weight_tree = jax.tree.map(lambda _: None, emb.feature_config)
    weight_tree["ctx"]["cats"] = je.Ragged.from_row_lengths(weights, lengths)
    want = je.embedding_lookup(
        inputs, weight_tree, emb.embedding_tables(states[1]), emb.feature_config
    )
    for path, value in je._nest.flatten_with_paths(want):
        np.testing.assert_array_equal(got[path.replace("/", "_")].numpy(), np.asarray(value))


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


def test_inspect_unknown_path(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["inspect", str(tmp_path)])
    assert "is not a jaxembed checkpoint" in capsys.readouterr().err
