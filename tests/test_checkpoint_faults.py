"""Checkpoints under faults: one writer per directory, checksums, validated steps and states,
damaged files named, and kill -9 at every stage of a save losing nothing.

The model is ``checkpoint_fault_scenario`` (two tiny tables whose stored bytes the tests can find).
Processes that are killed or race each other run ``checkpoint_crash_worker.py``.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest
from checkpoint_fault_scenario import assert_state_is, embedding, logical, state_for

import jaxembed as je
from jaxembed import _checksums
from jaxembed import checkpoint as ck

WORKER = Path(__file__).parent / "checkpoint_crash_worker.py"
LOCK = ".jaxembed-writer.lock"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.fixture(scope="module")
def emb():
    return embedding()


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent), env.get("PYTHONPATH", "")])
    return env


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file())


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _write_lock(directory: Path, **record) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK
    lock.write_text(json.dumps({"since": "2024-01-01T00:00:00+00:00", "token": "x", **record}))
    return lock


# -- 1. directory ownership --


def test_second_writer_in_one_process_is_refused_naming_the_holder(tmp_path, emb):
    with ck.CheckpointManager(tmp_path, emb, async_save=False) as manager:
        manager.save(1, state_for(emb, 1))
        holder = rf"pid {os.getpid()}\b.*host '{socket.gethostname()}' since \d{{4}}-"
        with pytest.raises(ck.CheckpointLockedError, match=holder + r".*close\(\) it"):
            je.checkpoint.save(tmp_path, emb, state_for(emb, 2), step=2)
        other = ck.CheckpointManager(tmp_path, emb)
        with pytest.raises(ck.CheckpointLockedError, match="another CheckpointManager"):
            other.save(2, state_for(emb, 2))
        other.close()
        # Readers need no lock.
        assert je.checkpoint.latest_step(tmp_path) == 1
        assert je.checkpoint.read_config(tmp_path)["step"] == 1
        assert_state_is(emb, je.checkpoint.restore(tmp_path, emb), 1)
        manager.save(2, state_for(emb, 2))  # the owner goes on saving
    assert ck.CheckpointManager(tmp_path, None).all_steps() == [1, 2]


def test_lock_is_released_on_close_with_exit_and_garbage_collection(tmp_path, emb):
    manager = ck.CheckpointManager(tmp_path, emb, async_save=False)
    assert not (tmp_path / LOCK).exists()  # a manager that has not written holds nothing
    manager.save(1, state_for(emb, 1))
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    manager.close()
    assert not (tmp_path / LOCK).exists()
    with ck.CheckpointManager(tmp_path, emb, async_save=False) as manager:
        manager.save(2, state_for(emb, 2))
    assert not (tmp_path / LOCK).exists()
    manager = ck.CheckpointManager(tmp_path, emb, async_save=False)
    manager.save(3, state_for(emb, 3))
    manager._manager.wait_until_finished()
    del manager
    gc.collect()
    assert not (tmp_path / LOCK).exists()
    je.checkpoint.save(tmp_path, emb, state_for(emb, 4), step=4)  # nobody holds it
    assert not (tmp_path / LOCK).exists()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, emb):
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead, host=socket.gethostname())
    with pytest.warns(RuntimeWarning, match=rf"Taking over .*pid {dead}\b.*no longer running"):
        je.checkpoint.save(tmp_path, emb, state_for(emb, 1), step=1)
    assert not (tmp_path / LOCK).exists()
    assert_state_is(emb, je.checkpoint.restore(tmp_path, emb), 1)


def test_lock_of_a_live_process_or_another_host_is_refused(tmp_path, emb):
    with subprocess.Popen(["sleep", "60"]) as live:
        try:
            _write_lock(tmp_path, pid=live.pid, host=socket.gethostname(), command="train.py")
            with pytest.raises(
                ck.CheckpointLockedError,
                match=rf"owned by another writer, pid {live.pid} \(train.py\) on host "
                r".* since 2024-01-01.*stop that writer or save into another directory",
            ):
                je.checkpoint.save(tmp_path, emb, state_for(emb, 1), step=1)
        finally:
            live.kill()
    lock = _write_lock(tmp_path, pid=_dead_pid(), host="elsewhere")
    with pytest.raises(ck.CheckpointLockedError, match=f"host 'elsewhere'.*delete {lock}"):
        je.checkpoint.save(tmp_path, emb, state_for(emb, 1), step=1)
    assert ck.CheckpointManager(tmp_path, None).all_steps() == []  # nothing was written


def test_concurrent_writer_processes_one_owns_the_directory(tmp_path, emb):
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path), "--race", str(writer)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_worker_env(),
        )
        for writer in (1, 2)
    ]
    try:
        Path(f"{tmp_path}.go").touch()  # both start saving as soon as they are ready
        lines = [p.stdout.readline().strip() for p in procs]  # type: ignore[union-attr]
        assert sorted(line.split(":")[0] for line in lines) == ["refused", "wrote"], lines
        winner = lines.index("wrote")
        loser_line = lines[1 - winner]
        assert f"owned by another writer, pid {procs[winner].pid}" in loser_line
        steps = ck.CheckpointManager(tmp_path, None).all_steps()
        assert steps == [1, 2, 3, 4]
        for step in steps:  # every step is the winner's, bit for bit
            assert_state_is(emb, je.checkpoint.restore(tmp_path, emb, step), step, winner + 1)
    finally:
        for p in procs:
            p.stdin.close()  # type: ignore[union-attr]
            p.wait(timeout=60)
            p.stdout.close()  # type: ignore[union-attr]
    assert [p.returncode for p in procs] == [0, 0]
    assert not (tmp_path / LOCK).exists()  # released at interpreter exit, close() never called


# -- 2. max_to_keep and deletion --


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_max_to_keep_zero_negative_or_not_an_int_is_rejected(tmp_path, emb, value):
    je.checkpoint.save(tmp_path, emb, state_for(emb, 1), step=1)
    match = r"`max_to_keep` must be a positive integer or None \(keep every step\)"
    if value == 0:
        match += r", got 0 \(0 would delete every step"
    with pytest.raises(ValueError, match=match):
        ck.CheckpointManager(tmp_path, emb, max_to_keep=value)
    assert ck.CheckpointManager(tmp_path, None).all_steps() == [1]


def test_max_to_keep_deletes_only_steps_jaxembed_wrote(tmp_path, emb):
    foreign = tmp_path / "0"  # a folder named like a step that jaxembed did not write
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with ck.CheckpointManager(tmp_path, emb, max_to_keep=2, async_save=True) as manager:
        for step in (1, 2, 3, 4):
            manager.save(step, state_for(emb, step))
        manager.wait_until_finished()
        assert manager.all_steps() == [0, 3, 4]
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not (tmp_path / ".jaxembed-deleted").exists()
    for step in (3, 4):
        assert_state_is(emb, je.checkpoint.restore(tmp_path, emb, step), step)


# -- 3. checksums --


def test_checksums_are_recorded_per_array_and_independent_of_device_count(
    tmp_path, emb, monkeypatch
):
    je.checkpoint.save(tmp_path / "one", emb, state_for(emb, 1), step=1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))
    eight = je.Embedding(emb.feature_config, je.optimizers.Adagrad(0.1), mesh=mesh)
    je.checkpoint.save(tmp_path / "eight", eight, state_for(eight, 1), step=1)
    one = je.checkpoint.read_config(tmp_path / "one")["checksums"]
    assert one == je.checkpoint.read_config(tmp_path / "eight")["checksums"]
    assert set(one["arrays"]) == {
        "tables/noisy",
        "tables/packed",
        "slots/noisy/accumulators",
        "slots/packed/accumulators",
        "step",
    }
    # Small local arrays are summed with numpy; large or multi-process ones with jnp under jit
    # where they are sharded. Both give the same sums, and one flipped bit changes them.
    rng = np.random.default_rng(0)
    arrays = {
        "noisy": logical(1)["tables"]["noisy"],
        "bfloat16": rng.standard_normal((16, 4)).astype(jax.numpy.bfloat16),
        "int8": rng.integers(-100, 100, (8, 3)).astype(np.int8),
        "bool": rng.random((8, 5)) > 0.5,
        "scalar": np.int32(7),
    }
    flipped = arrays["noisy"].copy()
    flipped.view(np.uint32)[5, 3] ^= 1
    row_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    on_host = ck.checksums(arrays)
    host_flipped = ck.checksums(flipped)[""]["checksum"]
    monkeypatch.setattr(_checksums, "_HOST_CHECKSUM_MAX_SIZE", -1)
    assert ck.checksums(arrays) == on_host
    sharded = ck.checksums(jax.device_put(arrays["noisy"], row_sharded))[""]["checksum"]
    assert sharded == on_host["noisy"]["checksum"] == one["arrays"]["tables/noisy"]["checksum"]
    assert host_flipped != sharded


def _flip_raw(step_dir: Path, values: np.ndarray) -> Path:
    """Flips one mantissa bit of ``values`` where its bytes sit raw in a stored file."""
    window = values.tobytes()[256:272]
    for path in _files(step_dir):
        data = bytearray(path.read_bytes())
        at = data.find(window)
        if at >= 0:
            data[at + 1] ^= 0x10
            path.write_bytes(bytes(data))
            return path
    pytest.fail("the array's bytes were not found in the checkpoint files")


@pytest.mark.parametrize(
    "array,named",
    [
        (lambda v: v["tables"]["noisy"], "the data of table 'noisy'"),
        (lambda v: v["slots"]["noisy"]["accumulators"], "slot 'accumulators' of table 'noisy'"),
    ],
    ids=["table", "slot"],
)
def test_corrupted_raw_chunk_bytes_fail_the_checksum_naming_step_and_table(
    tmp_path, emb, array, named
):
    je.checkpoint.save(tmp_path, emb, state_for(emb, 1), step=1)
    je.checkpoint.save(tmp_path, emb, state_for(emb, 2), step=2)
    _flip_raw(tmp_path / "2", array(logical(2)))
    with pytest.raises(ck.CheckpointCorruptedError, match=f"step 2 .*{named}.*checksum") as err:
        je.checkpoint.restore(tmp_path, emb, step=2)
    assert err.value.step == 2 and "restore another step" in str(err.value)
    # The latest step: no silent fall-back, the error names the intact step instead.
    with pytest.raises(ck.CheckpointCorruptedError, match=r"newest intact step is 1: .*step=1"):
        je.checkpoint.restore(tmp_path, emb)
    assert_state_is(emb, je.checkpoint.restore(tmp_path, emb, step=1), 1)


def _compressed_frame(step_dir: Path, avoid: list[bytes]) -> tuple[Path, int, int]:
    """The largest zstd frame in the data files that holds none of ``avoid`` (raw arrays)."""
    best: tuple[Path, int, int] | None = None
    for path in _files(step_dir):
        data = path.read_bytes()
        starts = [i for i in range(len(data) - 3) if data[i : i + 4] == ZSTD_MAGIC]
        for a, b in zip(starts, [*starts[1:], len(data)][: len(starts)], strict=True):
            if not any(w in data[a:b] for w in avoid) and (
                best is None or b - a > best[2] - best[1]
            ):
                best = (path, a, b)
    assert best is not None and best[2] - best[1] > 1024, "no compressed chunk found"
    return best


@pytest.mark.parametrize("where", ["frame_header", "compressed_block"])
def test_corrupted_compressed_chunk_fails_to_decode_naming_step_and_table(tmp_path, emb, where):
    je.checkpoint.save(tmp_path, emb, state_for(emb, 3), step=3)
    values = logical(3)
    raw = [values["tables"]["noisy"], values["slots"]["noisy"]["accumulators"]]
    path, start, end = _compressed_frame(tmp_path / "3", [a.tobytes()[256:272] for a in raw])
    data = bytearray(path.read_bytes())
    at = start + 1 if where == "frame_header" else (start + end) // 2
    for i in range(at, at + (1 if where == "frame_header" else 16)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    expected = "table 'packed' cannot be read" if where == "frame_header" else "table 'packed'"
    with pytest.raises(ck.CheckpointCorruptedError, match=f"step 3 .*{expected}") as err:
        je.checkpoint.restore(tmp_path, emb)
    assert "noisy" not in str(err.value)


def test_orbax_read_leftovers_are_dropped_from_the_first_read(tmp_path, emb, monkeypatch):
    """TensorStore's late completions of the reads orbax abandons when one fails can find its
    event loop closed before the failure reaches jaxembed; the filter of those reports is in
    place before any read, and lets every other report through."""
    gc.collect()  # earlier tests' leftovers go to the hooks they were reported under
    seen: list = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    je.checkpoint.save(tmp_path, emb, state_for(emb, 3), step=3)
    assert_state_is(emb, je.checkpoint.restore(tmp_path, emb), 3)
    seen.clear()  # anything collected meanwhile, before the filter was in place

    def report(obj, exc):
        return types.SimpleNamespace(
            object=obj, exc_value=exc, exc_type=type(exc), exc_traceback=None, err_msg=None
        )

    leftover = report(None, RuntimeError("Event loop is closed"))
    other = report(None, RuntimeError("something else"))
    sys.unraisablehook(leftover)
    sys.unraisablehook(other)
    assert seen == [other]


# -- 4. steps --


@pytest.mark.parametrize(
    "step,match",
    [
        (-1, "got -1"),
        (2.7, r"got 2.7 \(float\)"),
        (True, r"got True \(bool\)"),
        ("3", r"got '3' \(str\)"),
        (None, r"got None"),
        (np.float32(1.0), r"got .*float32"),
    ],
    ids=["negative", "float", "bool", "str", "none", "numpy_float"],
)
def test_invalid_steps_are_rejected(tmp_path, emb, step, match):
    state = state_for(emb, 1)
    match = "Checkpoint step must be a non-negative integer, " + match
    with pytest.raises(ValueError, match=match):
        je.checkpoint.save(tmp_path, emb, state, step=step)
    with ck.CheckpointManager(tmp_path, emb) as manager, pytest.raises(ValueError, match=match):
        manager.save(step, state)
    assert not any(tmp_path.iterdir())  # nothing written
    je.checkpoint.save(tmp_path, emb, state, step=np.int64(1))  # numpy and 0-d integer arrays
    je.checkpoint.save(tmp_path, emb, state, step=jax.numpy.asarray(2))
    assert ck.CheckpointManager(tmp_path, None).all_steps() == [1, 2]


def test_saving_an_existing_or_older_step_is_an_error(tmp_path, emb):
    je.checkpoint.save(tmp_path, emb, state_for(emb, 5), step=5)
    with pytest.raises(ck.StepExistsError, match=r"step 5 already exists .*never overwritten"):
        je.checkpoint.save(tmp_path, emb, state_for(emb, 1), step=5)
    with ck.CheckpointManager(tmp_path, emb, async_save=False) as manager:
        with pytest.raises(ck.StepExistsError, match="step 5 already exists"):
            manager.save(5, state_for(emb, 1))
        with pytest.raises(ValueError, match=r"step 3 is older than the latest step 5.*force"):
            manager.save(3, state_for(emb, 3))
        assert manager.save(3, state_for(emb, 3), force=True)
    assert_state_is(emb, je.checkpoint.restore(tmp_path, emb, step=5), 5)  # not overwritten
    assert_state_is(emb, je.checkpoint.restore(tmp_path, emb, step=3), 3)


# -- 5. a state that does not fit the Embedding --


def _other(**change):
    base = {
        "noisy": je.TableConfig(64, 8, name="noisy"),
        "packed": je.TableConfig(256, 16, name="packed"),
    }
    tables = {**base, **change}
    features = {f"f{i}": je.FeatureConfig(t) for i, t in enumerate(tables.values())}
    return je.Embedding(features, je.optimizers.Adagrad(0.1))


def _states(emb):
    good = state_for(emb, 1)
    extra_table = _other(extra=je.TableConfig(4, 2, name="extra"))
    momentum = je.Embedding(emb.feature_config, je.optimizers.AdagradMomentum(0.1))
    return {
        "vocabulary": (
            _other(noisy=je.TableConfig(65, 8, name="noisy")).init(jax.random.key(0)),
            r"Table 'noisy'.*has shape \(65, 8\), but .* as \(64, 8\)",
        ),
        "dim": (
            _other(packed=je.TableConfig(256, 4, name="packed")).init(jax.random.key(0)),
            r"Table 'packed'.*has shape \(256, 4\)",
        ),
        "dtype": (
            good._replace(tables={**good.tables, "noisy": good.tables["noisy"].astype("bfloat16")}),
            r"Table 'noisy'.*dtype bfloat16, but this Embedding's is float32",
        ),
        "missing_table": (
            good._replace(tables={"packed": good.tables["packed"]}),
            r"tables hold arrays \['packed'\].*missing \['noisy'\]",
        ),
        "extra_table": (
            extra_table.init(jax.random.key(0)),
            r"tables hold arrays \['extra', 'noisy', 'packed'\].*unexpected \['extra'\]",
        ),
        "optimizer": (
            momentum.init(jax.random.key(0)),
            r"Table 'noisy'.*optimizer slots \[accumulators .*, momenta .*\] are not "
            r"those of this Embedding's optimizer Adagrad \[accumulators .*\]",
        ),
        "slot_shape": (
            good._replace(slots={**good.slots, "packed": {"accumulators": good.tables["noisy"]}}),
            r"Table 'packed'.*optimizer slots \[accumulators \(64, 8\)\] are not those",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["vocabulary", "dim", "dtype", "missing_table", "extra_table", "optimizer", "slot_shape"],
)
def test_state_not_matching_the_embedding_is_refused_before_writing(tmp_path, emb, case):
    state, match = _states(emb)[case]
    with pytest.raises(ValueError, match=match):
        je.checkpoint.save(tmp_path / "ckpt", emb, state, step=1)
    with (
        ck.CheckpointManager(tmp_path / "m", emb) as manager,
        pytest.raises(ValueError, match=match),
    ):
        manager.save(1, state)
    for directory in (tmp_path / "ckpt", tmp_path / "m"):
        assert not directory.exists() or not any(directory.iterdir())


# -- 6. truncated and deleted files --


def test_truncated_or_deleted_files_name_the_step_and_table_or_file(tmp_path, emb):
    base = tmp_path / "base"
    je.checkpoint.save(base, emb, state_for(emb, 1), step=1)
    outcomes = {}
    for i, path in enumerate(_files(base / "1")):
        rel = path.relative_to(base)
        for mode in ("deleted", "truncated"):
            directory = tmp_path / f"{i}_{mode}"
            shutil.copytree(base, directory)
            target = directory / rel
            if mode == "deleted":
                target.unlink()
            else:
                target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
            try:
                assert_state_is(emb, je.checkpoint.restore(directory, emb, step=1), 1)
                outcomes[f"{rel} {mode}"] = "restored intact"
            except ck.CheckpointCorruptedError as err:
                message = str(err)
                assert "Checkpoint step 1 in" in message, message
                names = ("table 'noisy'", "table 'packed'", "slots of table", str(target))
                assert any(n in message for n in names), message
                outcomes[f"{rel} {mode}"] = "error"
                with pytest.raises(ck.CheckpointCorruptedError, match="there is no older step"):
                    je.checkpoint.restore(directory, emb)  # step=None says so too
            shutil.rmtree(directory)
    errors = [k for k, v in outcomes.items() if v == "error"]
    assert any("config/metadata" in k for k in errors), outcomes
    assert any("ocdbt" in k for k in errors), outcomes


def test_deleted_config_is_named_by_read_config_and_restore(tmp_path, emb):
    je.checkpoint.save(tmp_path, emb, state_for(emb, 1), step=1)
    je.checkpoint.save(tmp_path, emb, state_for(emb, 2), step=2)
    config = tmp_path / "2" / "config" / "metadata"
    config.unlink()
    match = rf"step 2 .*config file {config} cannot be read.*complete steps: \[1, 2\]"
    with pytest.raises(ck.CheckpointCorruptedError, match=match):
        je.checkpoint.read_config(tmp_path)
    with pytest.raises(ck.CheckpointCorruptedError, match=match + r".*newest intact step is 1"):
        je.checkpoint.restore(tmp_path, emb)


# -- 7. kill -9 at every stage of a save --

TIMED = {"timed_0.1s": 0.1, "timed_0.4s": 0.4}
STAGES = [
    "locked",
    "checksummed",
    "tmp_created",
    "arrays_written",
    "items_committed",
    "before_rename",
    "after_rename",
    "deleting",
    "emptying_trash",
    *TIMED,
]
COMMITTED = {"after_rename", "deleting", "emptying_trash"}  # step 3 must exist afterwards


def _run_kill(directory: Path, stage: str) -> tuple[int, str]:
    """Runs the worker that dies at ``stage`` (or is killed after a delay); its status and log."""
    args = [sys.executable, str(WORKER), str(directory), "--kill-at"]
    args.append("none" if stage in TIMED else stage)
    with subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_worker_env()
    ) as proc:
        assert proc.stdout is not None
        log = []
        for line in proc.stdout:
            log.append(line)
            if line.strip() == "saving 3" and stage in TIMED:
                timer = threading.Timer(TIMED[stage], proc.send_signal, [signal.SIGKILL])
                timer.start()
        proc.wait()
    return proc.returncode, "".join(log)


@pytest.fixture(scope="module")
def killed(tmp_path_factory, emb):
    """Every stage's worker, run four at a time: ``{stage: (directory, status, log)}``.

    Each worker starts from a copy of steps 1 and 2 written here (cheaper than in each worker).
    """
    root = tmp_path_factory.mktemp("killed")
    with ck.CheckpointManager(root / "base", emb, async_save=False) as manager:
        for step in (1, 2):
            manager.save(step, state_for(emb, step))
    for stage in STAGES:
        shutil.copytree(root / "base", root / stage)
    with ThreadPoolExecutor(4) as pool:
        runs = {s: pool.submit(_run_kill, root / s, s) for s in STAGES}
        return {s: (root / s, *run.result()) for s, run in runs.items()}


@pytest.mark.parametrize("stage", STAGES)
def test_kill_9_at_each_stage_of_save_loses_nothing(killed, emb, stage):
    directory, status, log = killed[stage]
    if stage not in TIMED:
        assert status == -signal.SIGKILL, log[-3000:]
    else:
        assert status in (0, -signal.SIGKILL), log[-3000:]
    steps = ck.CheckpointManager(directory, None).all_steps()
    assert 2 in steps and set(steps) <= {1, 2, 3}, steps
    if stage in COMMITTED:
        assert 3 in steps
    elif stage not in TIMED:
        assert 3 not in steps
    if 3 not in steps:
        assert 1 in steps  # nothing is deleted before the new step is committed
    for step in steps:  # every committed step restores bit for bit, the latest one included
        assert_state_is(emb, je.checkpoint.restore(directory, emb, step), step)
    assert_state_is(emb, je.checkpoint.restore(directory, emb), max(steps))
    # The next writer takes the directory over and cleans up what the dead one left.
    lock_left = (directory / LOCK).exists()
    with ck.CheckpointManager(directory, emb, max_to_keep=2) as manager:
        if lock_left:
            with pytest.warns(RuntimeWarning, match="Taking over"):
                manager.save(4, state_for(emb, 4))
        else:
            manager.save(4, state_for(emb, 4))
    leftovers = sorted(p.name for p in directory.iterdir())
    assert leftovers == [str(max(steps)), "4"], leftovers
    assert_state_is(emb, je.checkpoint.restore(directory, emb), 4)
