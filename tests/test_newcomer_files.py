"""Files jaxembed writes follow the user's umask (issue 18), and the demo's plot and resume
helpers: a serving container that runs as another user must be able to read a SavedModel, a
checkpoint and the demo's outputs, so nothing is left with ``mkstemp``'s 0600 or ``mkdtemp``'s
0700."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxembed as je
from jaxembed._files import follow_umask, umask
from jaxembed.demo import config as demo_config
from jaxembed.demo import data


@contextlib.contextmanager
def _umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _modes(root: Path) -> dict[str, int]:
    """``{relative path: permission bits}`` of ``root`` and everything under it."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        out[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return out


def _assert_umask_modes(root: Path, mask: int, *, root_too: bool = True) -> None:
    for name, mode in _modes(root).items():
        if name == "." and not root_too:  # pytest's tmp_path is 0700
            continue
        path = root / name
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        if path.is_file() and mode & 0o111:  # nothing jaxembed writes is executable
            pytest.fail(f"{name} is executable ({oct(mode)})")
        assert mode == want, f"{name}: {oct(mode)}, want {oct(want)} under umask {oct(mask)}"


def test_umask_is_read_without_changing_it():
    with _umask(0o027):
        assert umask() == 0o027
        assert umask() == 0o027


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_follow_umask_of_mkstemp_and_mkdtemp(tmp_path, mask):
    import tempfile

    with _umask(mask):
        fd, file = tempfile.mkstemp(dir=tmp_path)
        os.close(fd)
        folder = tempfile.mkdtemp(dir=tmp_path)
        follow_umask(file)
        follow_umask(folder)
    assert stat.S_IMODE(os.stat(file).st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~mask


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_model_follows_the_umask(tmp_path, mask):
    pytest.importorskip("tensorflow")
    from jaxembed import export

    table = je.TableConfig(10, 4, name="items")
    emb = je.Embedding({"items": je.FeatureConfig(table)})
    with _umask(mask):
        path = export.save_serving_model(
            tmp_path / "base",
            emb,
            emb.init(jax.random.key(0)),
            options=export.ExportOptions(version=1),
        )
    assert path == str(tmp_path / "base" / "1")
    _assert_umask_modes(tmp_path / "base", mask)


def test_checkpoint_follows_the_umask(tmp_path):
    table = je.TableConfig(10, 4, name="items")
    emb = je.Embedding({"items": je.FeatureConfig(table)}, je.optimizers.Adagrad(0.1))
    with _umask(0o022):
        with je.checkpoint.CheckpointManager(tmp_path / "ckpt", emb, async_save=False) as ckpt:
            ckpt.save(1, emb.init(jax.random.key(0)))
    _assert_umask_modes(tmp_path / "ckpt", 0o022)


def test_demo_files_follow_the_umask(tmp_path):
    pytest.importorskip("matplotlib")
    from jaxembed.demo import run

    history = {
        "step": [1, 2, 3, 4],
        "loss": [0.7, 0.69, 0.68, 0.67],
        "eval_step": [0, 2, 4],
        "auc": [0.5, 0.55, 0.6],
        "test_loss": [0.7, 0.69, 0.685],
    }
    with _umask(0o022):
        run._write_atomic(tmp_path / "metrics.json", b"{}")
        labels = run._plot(tmp_path / "training.png", history, {"users": np.ones(8)}, [2])
    _assert_umask_modes(tmp_path, 0o022, root_too=False)
    assert (tmp_path / "training.png").read_bytes().startswith(b"\x89PNG")
    assert labels == ["train loss (EMA)", "test loss", "epoch boundary", "test AUC"]
    history["resumed_from"] = 2
    labels = run._plot(tmp_path / "training.png", history, {}, [])
    assert "resumed here" in labels and "epoch boundary" not in labels


# -- the demo's resume: the same batches an uninterrupted run sees --


def test_batches_from_a_resumed_step_are_those_of_an_uninterrupted_run():
    from jaxembed.demo import run

    log = data.synthetic(100, users=10, items=10, seed=0)
    full = list(run._batches(log, 16, 20, seed=3))
    resumed = list(run._batches(log, 16, 20, seed=3, start=13))
    assert len(resumed) == 7
    for a, b in zip(full[13:], resumed, strict=True):
        np.testing.assert_array_equal(a.user, b.user)
        np.testing.assert_array_equal(a.label, b.label)
    assert run._epoch_starts(100, 16, 20) == [6, 12, 18]


def _demo_run(out: Path, steps: list[int]) -> None:
    (out / "demo.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "demo.log").write_text("jaxembed demo: writing to out\n")
    for step in steps:
        (out / "checkpoints" / str(step)).mkdir(parents=True)


def test_resume_checks(tmp_path):
    config = demo_config.DemoConfig(out=tmp_path, steps=100, resume=True)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint to resume from"):
        demo_config.check_previous_run(config)
    _demo_run(tmp_path, [50, 100])
    with pytest.raises(ValueError, match="step 100, already at --steps 100; give a larger"):
        demo_config.check_previous_run(config)
    assert (
        demo_config.check_previous_run(demo_config.DemoConfig(out=tmp_path, steps=150, resume=True))
        == []
    )
    with pytest.raises(ValueError, match="give one of them"):
        demo_config.check_previous_run(
            demo_config.DemoConfig(out=tmp_path, steps=150, resume=True, overwrite=True)
        )
    (tmp_path / "saved_model" / "1").mkdir(parents=True)  # not a SavedModel: refused up front
    with pytest.raises(FileExistsError, match="export target .* is not a SavedModel"):
        demo_config.check_previous_run(demo_config.DemoConfig(out=tmp_path, steps=150, resume=True))
    (tmp_path / "demo.log").write_text("my notes\n")
    with pytest.raises(FileExistsError, match="no demo.log from jaxembed demo"):
        demo_config.check_previous_run(demo_config.DemoConfig(out=tmp_path, steps=150, resume=True))


def test_rerun_message_offers_resume(tmp_path):
    _demo_run(tmp_path, [10])
    with pytest.raises(FileExistsError, match="add --resume to continue its training"):
        demo_config.check_previous_run(demo_config.DemoConfig(out=tmp_path))


def test_demo_export_target_that_is_a_file_is_refused_up_front(tmp_path):
    (tmp_path / "saved_model").write_text("")
    with pytest.raises(FileExistsError, match="saved_model is not a folder"):
        demo_config.check_previous_run(demo_config.DemoConfig(out=tmp_path))
