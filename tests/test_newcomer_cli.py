"""A newcomer's first hour (issue 18): what the command line prints, and what it refuses early.

* progress: plain lines at least every few seconds when stdout is not a terminal;
* no TensorFlow log noise (oneDNN banner, CUDA ``E0000`` lines) in the CLI's output;
* optional packages checked before any work, with the extra that holds them;
* an export target that exists is refused before TensorFlow loads or the checkpoint restores;
* ``jaxembed inspect`` shows tables, optimizers, signatures and the dense model, not raw keys.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import jax
import pytest
from rich.console import Console

import jaxembed as je
from jaxembed import cli
from jaxembed._console import Reporter

NOISE = re.compile(r"^(I0000|W0000|E0000|WARNING: All log messages before absl)", re.M)


def _run(*args) -> subprocess.CompletedProcess:
    """The command as a user runs it: without the test process's ``TF_CPP_MIN_LOG_LEVEL``."""
    command = [sys.executable, "-m", "jaxembed", *(str(a) for a in args)]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Step 2 of an Adagrad run with a stored dense model."""
    directory = tmp_path_factory.mktemp("ckpt")
    users = je.TableConfig(40, 4, combiner="sum", name="users")
    items = je.TableConfig(30, 3, combiner="mean", name="items")
    emb = je.Embedding(
        {"user": je.FeatureConfig(users), "item": je.FeatureConfig(items)},
        je.optimizers.Adagrad(0.1),
    )
    state = emb.init(jax.random.key(0))
    with je.checkpoint.CheckpointManager(directory, emb, async_save=False) as manager:
        manager.save(2, state)
    return directory, emb, state


# -- progress --


def test_plain_progress_prints_a_line_every_interval_and_none_in_a_quick_stage():
    out = io.StringIO()
    report = Reporter(Console(file=out, width=100), interval=0.2)
    assert not report.live  # a StringIO is no terminal
    with report.stage("quick"):
        pass
    with report.stage("training", total=10) as stage:
        for step in range(1, 4):
            stage.update(completed=step, status=f"loss {1 / step:.2f}")
            time.sleep(0.25)
    lines = out.getvalue().splitlines()
    assert lines[0] == "quick ..." and lines[1] == "training ..."
    beats = lines[2:]
    assert len(beats) >= 2, lines
    assert all(line.startswith("  training, ") and "elapsed" in line for line in beats)
    assert "/10" in beats[-1] and "left)" in beats[-1] and "\x1b" not in out.getvalue()


def test_report_lines_are_logged_and_progress_lines_are_not():
    out = io.StringIO()
    log = Console(file=io.StringIO(), record=True, width=100)
    report = Reporter(Console(file=out, width=100), log=log, interval=0.1)
    with report.stage("waiting"):
        time.sleep(0.3)
        report.print("a result")
    assert "waiting ..." in out.getvalue() and "a result" in out.getvalue()
    assert log.export_text().strip() == "a result"


# -- TensorFlow's log noise --


def test_inspect_of_a_saved_model_prints_no_tensorflow_log_lines(checkpoint, tmp_path):
    pytest.importorskip("tensorflow")
    directory, _, _ = checkpoint
    exported = _run("export", directory, tmp_path / "m")
    assert exported.returncode == 0, exported.stderr
    assert not NOISE.search(exported.stdout + exported.stderr), exported.stderr
    inspected = _run("inspect", tmp_path / "m")
    assert inspected.returncode == 0, inspected.stderr
    assert inspected.stderr == ""
    assert "tables (as served):" in inspected.stdout


# -- optional packages, before any work --


def test_demo_without_matplotlib_fails_before_any_work_naming_the_extra(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from jaxembed import cli\n"
        f"raise SystemExit(cli.main(['demo', '--out', {str(out)!r}]))\n"
    )
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("jaxembed demo: error: jaxembed demo needs matplotlib (to draw")
    assert "pip install 'jaxembed[demo]'" in line and "bash run.sh demo" in line
    assert not out.exists()  # nothing written, nothing trained
    assert time.perf_counter() - started < 60


def test_demo_requirements_check_names_every_missing_package(monkeypatch):
    from jaxembed.demo import config

    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="needs tensorflow .*; matplotlib"):
        config.check_requirements()


# -- export targets, before any work --


def _refuse_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the export did work before checking its target")

    monkeypatch.setattr(je.checkpoint, "restore", forbidden)
    monkeypatch.setattr(cli, "_import_tensorflow", forbidden)


def test_export_into_an_existing_folder_is_refused_up_front(checkpoint, tmp_path, monkeypatch):
    directory, _, _ = checkpoint
    _refuse_work(monkeypatch)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="only a SavedModel or an empty folder may be"):
        cli.export_checkpoint(directory, tmp_path / "model", overwrite=True)
    (tmp_path / "model" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "model" / "notes.txt").unlink()
    with pytest.raises(FileExistsError, match="add --overwrite to replace it"):
        cli.export_checkpoint(directory, tmp_path / "model")
    (tmp_path / "base" / "3").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"base/3 already exists \(an empty folder\)"):
        cli.export_checkpoint(directory, tmp_path / "base", version=3)
    assert (tmp_path / "model" / "saved_model.pb").read_bytes() == b""


def test_export_into_an_existing_folder_is_one_line_exit_2(checkpoint, tmp_path, capsys):
    directory, _, _ = checkpoint
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(directory), str(tmp_path / "m")])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"jaxembed export: error: OUT {tmp_path / 'm'} already exists")


# -- inspect, readable --


def test_inspect_saved_model_shows_tables_optimizer_signatures_not_raw_keys(
    checkpoint, tmp_path, capsys
):
    pytest.importorskip("tensorflow")
    from jaxembed import export

    _, emb, state = checkpoint
    export.save_serving_model(tmp_path / "m", emb, state)  # the training Embedding's optimizer
    assert cli.main(["inspect", str(tmp_path / "m")]) == 0
    text = capsys.readouterr().out
    assert "    users: float32[40, 4] 640 B float32; trained with Adagrad(learning_rate=0.1" in text
    assert "    items: float32[30, 3] 360 B" in text
    assert "    user -> users" in text
    assert "  dense model: none (serves the activations" in text
    assert "  signature serving_default:" in text and "    input  user_ids: int64[None]" in text
    assert ".ATTRIBUTES" not in text and "(raw variable keys: add --json)" in text


def test_inspect_tf_checkpoint_shows_tables_and_slots(checkpoint, tmp_path, capsys):
    pytest.importorskip("tensorflow")
    from jaxembed import export

    _, emb, state = checkpoint
    prefix = export.save_tf_checkpoint(tmp_path / "tf" / "ckpt", emb, state)
    assert cli.main(["inspect", prefix]) == 0
    text = capsys.readouterr().out
    assert "  tables (root object 'embedding'):" in text
    assert "    users: float32[40, 4] 640 B; Adagrad slots: accumulators float32[40, 4]" in text, (
        text
    )
    assert ".ATTRIBUTES" not in text
    assert cli.main(["inspect", prefix, "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    users = info["tables_by_root"]["embedding"]["users"]
    assert users["shape"] == [40, 4] and users["optimizer"] == "Adagrad"
    assert users["slots"] == {"accumulators": {"dtype": "float32", "shape": [40, 4], "bytes": 640}}


def test_inspect_saved_model_with_a_dense_model(tmp_path, capsys):
    pytest.importorskip("tensorflow")
    import jax.numpy as jnp
    import numpy as np

    from jaxembed import export

    table = je.TableConfig(10, 4, name="items")
    emb = je.Embedding({"items": je.FeatureConfig(table)})
    params = {"w": np.ones((4, 2), np.float32), "b": np.zeros(2, np.float32)}

    def model(params, acts):
        return {"ctr": jax.nn.sigmoid(jnp.dot(acts["items"], params["w"]) + params["b"])[:, 0]}

    export.save_serving_model(tmp_path / "m", emb, emb.init(jax.random.key(0)), model, params)
    assert cli.main(["inspect", str(tmp_path / "m")]) == 0
    text = capsys.readouterr().out
    assert "  dense model: 10 parameters in 2 arrays (40 B), as plain TF ops" in text
    assert "    output ctr: float32[None]" in text


# -- a clean end: no _xla_gc_callback traceback after the last line --

_TEARDOWN = """
import atexit, gc, sys
import jax._src.lib as lib


def teardown():  # what interpreter shutdown does to jaxlib's globals, then a collection
    lib._jax = None
    gc.collect()


atexit.register(teardown)
if sys.argv[1] == "fixed":
    from jaxembed._console import drop_xla_gc_callback_at_exit

    drop_xla_gc_callback_at_exit()
"""


@pytest.mark.parametrize("how", ["as jaxlib leaves it", "fixed"])
def test_a_collection_during_shutdown_prints_no_xla_gc_callback_traceback(how):
    result = subprocess.run(
        [sys.executable, "-c", _TEARDOWN, how], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    if how == "fixed":  # what conftest.py and the CLI do
        assert "_xla_gc_callback" not in result.stderr, result.stderr
    else:  # the traceback pytest runs used to end with
        assert "Exception ignored in: <function _xla_gc_callback" in result.stderr
