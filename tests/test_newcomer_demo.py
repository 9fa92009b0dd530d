"""The demo as a newcomer runs it with its output in a log (issue 18): progress at least every
10 s without a terminal, a compiling stage, no undefined metric, no TensorFlow log lines; and
``--resume`` continuing from the latest checkpoint. Small sizes; about two demo runs long."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from jaxembed import cli

pytest.importorskip("tensorflow")
pytest.importorskip("matplotlib")

SIZES = ["--examples", "30000", "--users", "3000", "--items", "2000", "--batch-size", "512"]
NOISE = re.compile(r"^(I0000|W0000|E0000|WARNING: All log messages before absl|WARNING:absl)", re.M)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """``jaxembed demo ... 2>&1 | cat``: each line of the combined output, with its arrival time."""
    out = tmp_path_factory.mktemp("demo")
    command = [sys.executable, "-m", "jaxembed", "demo", "--out", str(out), "--steps", "40"]
    command += ["--eval-every", "20", *SIZES]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    started = time.monotonic()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append((time.monotonic() - started, line.rstrip("\n")))
        assert process.wait(timeout=600) == 0, "\n".join(text for _, text in lines)
    lines.append((time.monotonic() - started, "<exit>"))
    return out, lines


def test_a_logged_demo_prints_a_line_at_least_every_10_seconds(logged_run):
    _, lines = logged_run
    text = "\n".join(line for _, line in lines)
    gaps = [(b - a, line) for (a, _), (b, line) in zip(lines, lines[1:], strict=False)]
    worst, before = max(gaps)
    assert worst <= 10, f"{worst:.1f} s without output before {before!r}:\n{text}"
    assert "\x1b[" not in text  # plain lines: no cursor movement or colour in a log


def test_a_logged_demo_names_its_stages_and_no_undefined_metric(logged_run):
    out, lines = logged_run
    text = "\n".join(line for _, line in lines)
    for stage in (
        "loading TensorFlow and matplotlib ...",
        "generating the synthetic click log (30,000 impressions) ...",
        "compiling the evaluation and training steps (XLA) ...",
        "training ...",
        "exporting the SavedModel ...",
        "serving it from a TensorFlow-only process ...",
    ):
        assert stage in text, text
    assert "compiled in " in text and "; at step 0: test AUC 0." in text
    assert not re.search(r"\bnan\b", text, re.I), text
    log = (out / "demo.log").read_text()
    assert log.startswith("jaxembed demo: writing to") and " ..." not in log  # no progress lines


def test_a_logged_demo_has_no_tensorflow_log_lines(logged_run):
    _, lines = logged_run
    text = "\n".join(line for _, line in lines)
    assert not NOISE.search(text), text


def test_plot_and_metrics_have_test_loss_and_epochs(logged_run):
    out, _ = logged_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert [step for step, _ in metrics["test_loss_curve"]] == [0, 20, 40]
    assert metrics["test_loss_curve"][-1][1] < metrics["test_loss_curve"][0][1]
    assert metrics["epoch_starts"] == []  # 40 steps of 512 stay inside the first epoch
    assert metrics["resumed_from"] is None


def test_resume_continues_from_the_latest_checkpoint(logged_run, capsys):
    out, _ = logged_run
    before = json.loads((out / "metrics.json").read_text())
    argv = ["demo", "--out", str(out), "--steps", "60", "--eval-every", "20", *SIZES]
    assert cli.main([*argv, "--resume"]) == 0
    text = capsys.readouterr().out
    assert "--resume: continuing from step 40 (tables, Adagrad slots, tower and Adam state" in text
    assert "trained steps 41-60" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == 40 and metrics["steps"] == 60
    assert [step for step, _ in metrics["auc_curve"]] == [40, 60]
    # the restored model scores at step 40 what the first run scored at its end
    assert metrics["auc_curve"][0][1] == pytest.approx(before["test_auc"], abs=1e-6)
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 60
    assert metrics["parity_max_abs_diff"] <= 1e-5  # the SavedModel was replaced and checked
    with pytest.raises(SystemExit) as exit_info:  # nothing left to train: refused up front
        cli.main([*argv, "--resume"])
    assert exit_info.value.code == 2
    assert "already at --steps 60; give a larger --steps" in capsys.readouterr().err
