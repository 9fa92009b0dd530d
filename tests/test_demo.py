"""The main job (``jaxembed demo``), at a reduced size: what it trains, writes and checks."""

from __future__ import annotations

import json

import pytest

from jaxembed import cli

pytest.importorskip("tensorflow")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--out", str(out), "--steps", "60", "--eval-every", "20"]
    argv += ["--examples", "30000", "--users", "3000", "--items", "2000", "--batch-size", "512"]
    assert cli.main(argv) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_demo_trains_on_every_device_and_learns(demo):
    _, metrics = demo
    assert metrics["devices"] == 8  # simulated CPU devices: the sharded path ran
    assert metrics["last_loss"] < metrics["first_loss"]
    assert metrics["test_auc"] > 0.55
    assert metrics["oracle_auc"] > metrics["test_auc"]
    assert sum(sum(counts) for counts in metrics["shard_counts"].values()) > 0


def test_demo_serving_parity(demo):
    _, metrics = demo
    assert metrics["parity_examples"] > 0
    assert metrics["parity_max_abs_diff"] <= 1e-5


def test_demo_writes_checkpoint_savedmodel_plot_and_log(demo):
    out, metrics = demo
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 60
    assert (out / "saved_model" / "1" / "saved_model.pb").exists()
    assert metrics["saved_model"] == str(out / "saved_model" / "1")
    png = (out / "training.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    log = (out / "demo.log").read_text()
    assert "parity: max |TF - JAX|" in log and ": OK" in log
    assert "ShardingPlan" in log and str(out / "saved_model") in log
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_demo_checkpoint_exports_the_whole_model_with_the_cli(demo, tmp_path, capsys):
    import numpy as np
    import tensorflow as tf

    from jaxembed.demo import data, model

    out, _ = demo
    argv = ["export", str(out / "checkpoints"), str(tmp_path / "m"), "--weighted", "categories"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "(the tables and the dense model jaxembed.demo.model:predict)" in text
    assert cli.main(["inspect", str(out / "checkpoints")]) == 0
    assert "dense model: jaxembed.demo.model:predict kwargs={}" in capsys.readouterr().out
    # The checkpoint's export serves what the demo's own export (same step, same params) does.
    log = data.synthetic(64, users=3000, items=2000, seed=7)
    request = {k: tf.constant(v) for k, v in model.serving_request(log).items()}
    served = {
        name: tf.saved_model.load(str(path)).signatures["serving_default"](**request)["ctr"]
        for name, path in (("cli", tmp_path / "m"), ("demo", out / "saved_model" / "1"))
    }
    np.testing.assert_allclose(served["cli"].numpy(), served["demo"].numpy(), rtol=0, atol=1e-6)


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--steps", "--batch-size", "--movielens", "--devices", "--out"):
        assert option in text
