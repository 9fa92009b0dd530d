"""User errors on the command line: one line ``jaxembed <command>: error: ...``, exit status 2.

The cases the issue names run the real command in a subprocess (stderr must be exactly that one
line, without a traceback or TensorFlow's start-up log); the others call ``cli.main`` in process
to stay quick. The demo cases fail before any training starts.
"""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxembed as je
from jaxembed import cli
from jaxembed.demo import data


def _run(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "jaxembed", *(str(a) for a in args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def _error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The one stderr line of a user error (asserting exit status 2 and nothing else)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"jaxembed {command}: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small jaxembed checkpoint (step 3)."""
    directory = tmp_path_factory.mktemp("ckpt")
    table = je.TableConfig(20, 4, name="items")
    emb = je.Embedding({"items": je.FeatureConfig(table)}, je.optimizers.Adagrad(0.1))
    with je.checkpoint.CheckpointManager(directory, emb, async_save=False) as manager:
        manager.save(3, emb.init(jax.random.key(0)))
    return directory


def _files(directory) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


# -- 1. no traceback for a user error; bugs keep theirs --


def test_unknown_option_is_argparse_usage_error_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_keyboard_interrupt_exits_130_quietly(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect", "anything"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == ""


def test_closed_stdout_pipe_exits_141_quietly(monkeypatch, capsys):
    def reader_gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_dispatch", reader_gone)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect", "anything"])
    assert exit_info.value.code == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad\nvalue"),
        TypeError("bad type"),
        FileNotFoundError("gone"),
        FileExistsError("there"),
        NotADirectoryError("a file"),
        IsADirectoryError("a folder"),
        PermissionError(13, "Permission denied", "/root/x"),
        OSError(28, "No space left on device", "/full/disk"),
    ],
)
def test_each_user_error_type_is_one_line_exit_2(monkeypatch, capsys, error):
    def fails(args):
        raise error

    monkeypatch.setattr(cli, "_dispatch", fails)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect", "anything"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("jaxembed inspect: error: ")


def test_bug_keeps_its_traceback(monkeypatch):
    def buggy(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_dispatch", buggy)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["inspect", "anything"])


def test_jaxembed_traceback_env_shows_user_error_traceback(monkeypatch):
    monkeypatch.setenv("JAXEMBED_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["inspect", "/no/such/path"])


# -- 2. jaxembed demo: every option checked up front --


def test_demo_batch_size_4_does_not_split_over_devices(tmp_path):
    line = _error_line(_run("demo", "--out", tmp_path / "o", "--batch-size", 4), "demo")
    assert "--batch-size 4 does not split over the 8 devices" in line
    assert "multiple of 8" in line
    assert not (tmp_path / "o").exists()  # nothing written


def test_demo_steps_0(tmp_path):
    line = _error_line(_run("demo", "--out", tmp_path / "o", "--steps", 0), "demo")
    assert "--steps 0" in line and ">= 1" in line


def test_demo_devices_0(tmp_path):
    line = _error_line(_run("demo", "--out", tmp_path / "o", "--devices", 0), "demo")
    assert "--devices 0" in line and ">= 1" in line


def test_demo_out_naming_a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    line = _error_line(_run("demo", "--out", path), "demo")
    assert f"--out {path} is an existing file" in line
    assert path.read_text() == "mine"


@pytest.mark.parametrize(
    "option, value",
    [
        ("--steps", -3),
        ("--batch-size", 0),
        ("--examples", 0),
        ("--users", 0),
        ("--items", -1),
        ("--dim", 0),
        ("--eval-every", 0),
        ("--seed", -1),
        ("--devices", -2),
    ],
)
def test_demo_numeric_option_out_of_range(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--out", str(tmp_path / "o"), option, str(value)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert f"jaxembed demo: error: {option} {value} is out of range" in err
    assert not (tmp_path / "o").exists()


def test_demo_movielens_not_a_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--out", str(tmp_path / "o"), "--movielens", str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert "--movielens" in capsys.readouterr().err


def test_demo_out_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--out", str(tmp_path / "f" / "o")])
    assert "which is a file" in capsys.readouterr().err


def test_demo_too_few_examples_for_the_devices_or_the_batch():
    from jaxembed.demo import config as demo_config

    config = demo_config.DemoConfig(examples=50, batch_size=16)
    with pytest.raises(ValueError, match="fewer than the 8 devices.*at least 80 examples"):
        demo_config.check_data(config, 8, train=45, test=5)
    with pytest.raises(ValueError, match="--batch-size 16 is larger than the 9 training"):
        demo_config.check_data(config, 8, train=9, test=8)


def test_demo_config_fields_without_flags_are_checked():
    from jaxembed.demo import config as demo_config

    with pytest.raises(ValueError, match="DemoConfig.history_length 0"):
        demo_config.check_options(demo_config.DemoConfig(history_length=0))
    with pytest.raises(ValueError, match="DemoConfig.dense_learning_rate nan"):
        demo_config.check_options(demo_config.DemoConfig(dense_learning_rate=float("nan")))
    with pytest.raises(TypeError, match="--steps must be an integer"):
        demo_config.check_options(demo_config.DemoConfig(steps=2.5))  # type: ignore[arg-type]


def test_demo_movielens_files_that_do_not_match(tmp_path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,99,4.0,10\n")
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n1,A,Drama\n")
    with pytest.raises(ValueError, match=r"rates movies \[99\] that .*movies.csv does not list"):
        data.movielens(tmp_path)
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,x,4.0,10\n")
    with pytest.raises(ValueError, match="ratings.csv is not a MovieLens CSV file"):
        data.movielens(tmp_path)


# -- 3. re-running the demo into the same --out --


def _previous_run(out):
    """What a finished demo run leaves in ``out``, plus a user's own files."""
    (out / "checkpoints" / "60").mkdir(parents=True)
    (out / "checkpoints" / "60" / "data").write_bytes(b"step 60")
    (out / "saved_model" / "1" / "variables").mkdir(parents=True)
    (out / "saved_model" / "1" / "saved_model.pb").write_bytes(b"pb")
    (out / "training.png").write_bytes(b"png")
    (out / "metrics.json").write_text("{}")
    (out / "demo.log").write_text("jaxembed demo: writing to out\n...\n")
    (out / "notes.txt").write_text("mine")
    (out / "saved_model" / "7").mkdir()
    (out / "saved_model" / "7" / "saved_model.pb").write_bytes(b"my own model")


def test_demo_rerun_into_same_out_is_refused(tmp_path):
    _previous_run(tmp_path)
    before = _files(tmp_path)
    line = _error_line(_run("demo", "--out", tmp_path, "--steps", 1), "demo")
    assert f"--out {tmp_path} already holds a previous demo run" in line
    assert "checkpoints" in line and "give a new --out" in line and "--overwrite" in line
    assert _files(tmp_path) == before


def test_demo_rerun_with_overwrite_deletes_only_the_demo_outputs(tmp_path):
    from jaxembed.demo import config as demo_config

    _previous_run(tmp_path)
    config = demo_config.DemoConfig(out=tmp_path, overwrite=True)
    names = demo_config.check_previous_run(config)
    assert names == ["checkpoints", "saved_model/1", "training.png", "metrics.json", "demo.log"]
    message = demo_config.clear_previous_run(tmp_path, names)
    assert message.startswith("--overwrite: started clean, deleted the previous demo run's")
    assert "other files there are kept" in message
    assert _files(tmp_path) == {
        "notes.txt": b"mine",
        "saved_model/7/saved_model.pb": b"my own model",
    }


def test_demo_overwrite_refuses_outputs_without_a_demo_log(tmp_path):
    from jaxembed.demo import config as demo_config

    (tmp_path / "checkpoints" / "5").mkdir(parents=True)  # someone else's training run
    config = demo_config.DemoConfig(out=tmp_path, overwrite=True)
    with pytest.raises(FileExistsError, match="no demo.log from jaxembed demo"):
        demo_config.check_previous_run(config)
    assert (tmp_path / "checkpoints" / "5").is_dir()


def test_demo_overwrite_never_follows_a_link(tmp_path):
    from jaxembed.demo import config as demo_config

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / "demo.log").write_text("jaxembed demo: writing to out\n")
    (out / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    names = demo_config.check_previous_run(demo_config.DemoConfig(out=out, overwrite=True))
    demo_config.clear_previous_run(out, names)
    assert not (out / "checkpoints").exists() and (elsewhere / "keep").read_text() == "mine"


# -- 4. jaxembed inspect --


def test_inspect_missing_path(tmp_path):
    line = _error_line(_run("inspect", tmp_path / "nope"), "inspect")
    assert "does not exist; give a jaxembed checkpoint directory" in line


def test_inspect_directory_that_is_neither(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    line = _error_line(_run("inspect", tmp_path), "inspect")
    assert "is not a jaxembed checkpoint directory, a SavedModel or a TF checkpoint" in line
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # nothing written there


def test_inspect_corrupt_saved_model_pb(tmp_path):
    pytest.importorskip("tensorflow")
    (tmp_path / "saved_model.pb").write_bytes(b"\x08\x01 not a protobuf" * 20)
    line = _error_line(_run("inspect", tmp_path), "inspect")
    assert f"{tmp_path} is not a readable SavedModel" in line and "re-export it" in line


def test_inspect_one_step_of_a_checkpoint(checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect", str(checkpoint / "3")])
    assert exit_info.value.code == 2
    assert f"one step of the checkpoint directory {checkpoint}" in capsys.readouterr().err


def test_inspect_saved_model_base_directory_describes_the_latest_version(
    checkpoint, tmp_path, capsys
):
    pytest.importorskip("tensorflow")
    base = tmp_path / "models"
    assert cli.main(["export", str(checkpoint), str(base), "--version", "1"]) == 0
    shutil.copytree(base / "1", base / "12")
    capsys.readouterr()
    assert cli.main(["inspect", str(base)]) == 0
    text = capsys.readouterr().out
    assert f"SavedModel: {base / '12'}" in text
    assert "version 12: the latest of versions [1, 12]" in text
    assert "signature serving_default" in text
    assert cli.main(["inspect", str(base), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["version"], info["versions"], info["base"]) == (12, [1, 12], str(base))


# -- 5. jaxembed export --


def test_export_missing_checkpoint(tmp_path):
    line = _error_line(_run("export", tmp_path / "nope", tmp_path / "out"), "export")
    assert f"checkpoint directory {tmp_path / 'nope'} does not exist" in line
    assert not (tmp_path / "out").exists()


def test_export_into_the_checkpoint_itself_is_refused(checkpoint):
    before = _files(checkpoint)
    line = _error_line(_run("export", checkpoint, checkpoint, "--overwrite"), "export")
    assert "overlaps the checkpoint directory" in line
    assert _files(checkpoint) == before


def test_export_overwrite_refuses_a_folder_of_user_files(checkpoint, tmp_path, capsys):
    pytest.importorskip("tensorflow")
    (tmp_path / "report.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(checkpoint), str(tmp_path), "--overwrite"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("jaxembed export: error: ")
    assert str(tmp_path) in err
    assert (tmp_path / "report.txt").read_text() == "mine"


def test_export_negative_step(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(checkpoint), str(tmp_path / "m"), "--step", "-1"])
    assert exit_info.value.code == 2
    assert "--step -1 is negative" in capsys.readouterr().err


# -- 6. prefetch with tuple, list and namedtuple feature configs --

Pair = collections.namedtuple("Pair", ["left", "right"])


@pytest.mark.parametrize(
    "container", [tuple, list, lambda xs: Pair(*xs)], ids=["tuple", "list", "namedtuple"]
)
def test_prefetch_tuple_feature_config(container):
    table = je.TableConfig(10, 4, combiner="sum", name="t")
    emb = je.Embedding(container([je.FeatureConfig(table), je.FeatureConfig(table)]))
    ids = container([np.array([1, 2]), np.array([3, 4])])
    ragged = je.Ragged.from_row_lengths(np.array([1, 2, 3]), np.array([2, 1]))
    weights = je.Ragged.from_row_lengths(np.array([0.5, 1.0, 2.0], np.float32), np.array([2, 1]))
    weighted = (container([ragged, ragged]), container([weights, None]))
    examples = [ids, (ids, None), weighted]
    got = list(je.prefetch(emb, examples))
    want = [emb.preprocess(ids), emb.preprocess(ids), emb.preprocess(*weighted)]
    for g, w in zip(got, want, strict=True):
        assert g.paths == w.paths
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
