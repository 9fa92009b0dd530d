"""A checkpoint writer in its own process, for the tests that kill it or race it.

Usage:
    checkpoint_crash_worker.py DIR
        saves step 1 (small, completes), then a large step 2 that the test kills part-way;
    checkpoint_crash_worker.py DIR --kill-at STAGE
        saves steps 1 and 2 of ``checkpoint_fault_scenario`` unless DIR has them, prints
        ``saving 3`` and saves step 3 in the background (max_to_keep=2, so step 1 goes once
        step 3 is committed), SIGKILLing itself at STAGE of that save
        (see ``STAGES``; ``none`` kills nothing, so the parent can kill at a time it chooses);
    checkpoint_crash_worker.py DIR --race WRITER
        waits for the file DIR.go, then saves steps 1-4 of writer WRITER's states through one
        manager, prints ``wrote`` (or ``refused: <error>``) and waits for stdin to close; it then
        exits without closing the manager, so only interpreter exit releases the lock.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
from checkpoint_fault_scenario import embedding, state_for
from etils import epath
from orbax.checkpoint._src.path import atomicity, deleter

import jaxembed as je
from jaxembed import checkpoint as ck

STAGES = {
    "locked": "the directory lock is taken, nothing written",
    "checksummed": "checksums computed, nothing written",
    "tmp_created": "the step's temporary directory exists",
    "arrays_written": "the embedding item's arrays and metadata are written",
    "items_committed": "every item is renamed into place inside the temporary step directory",
    "before_rename": "the step's commit file is written, its directory not yet renamed",
    "after_rename": "step 3 is committed, step 1 not yet deleted (max_to_keep=2)",
    "deleting": "step 1 was just moved into the trash (or is half deleted, if deleted in place)",
    "emptying_trash": "close() is half-way through removing the trash directory",
    "none": "nothing (the parent kills at a time of its choosing)",
}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _after(obj, name, when=lambda *a, **k: True):
    """Patches ``obj.name`` to die after it returns, if ``when(*args)`` holds."""
    original = getattr(obj, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        if when(*args, **kwargs):
            _die()
        return out

    setattr(obj, name, wrapper)


def _async_around(cls, name, *, before, after):
    """Patches the coroutine ``cls.name`` to die before or after it runs, as the tests say."""
    original = getattr(cls, name)

    async def wrapper(self, *args, **kwargs):
        if before(self):
            _die()
        out = await original(self, *args, **kwargs)
        if after(self, out):
            _die()
        return out

    setattr(cls, name, wrapper)


def _inject(stage: str) -> None:
    """Makes this process SIGKILL itself at ``stage`` of the step-3 save."""
    never = lambda *a, **k: False  # noqa: E731
    if stage == "locked":
        _after(ck._DirectoryLock, "acquire")
    elif stage == "checksummed":
        _after(ck, "checksums")
    elif stage == "tmp_created":
        _async_around(
            atomicity.AtomicRenameTemporaryPath,
            "create",
            before=never,
            after=lambda self, out: os.path.basename(str(out)).startswith("3."),
        )
    elif stage == "arrays_written":
        cls = type(epath.Path("/"))
        _after(cls, "write_text", lambda path, *a, **k: str(path).endswith("/_METADATA"))
    elif stage == "items_committed":  # the last item is "embedding" (no extra here)
        _async_around(
            atomicity.AtomicRenameTemporaryPath,
            "finalize",
            before=never,
            after=lambda self, out: os.path.basename(str(self.get_final())) == "embedding",
        )
    elif stage == "before_rename":  # the step's commit file is the last write before it
        cls = type(epath.Path("/"))
        _after(
            cls,
            "write_text",
            lambda path, *a, **k: (
                path.name == "commit_success.txt" and path.parent.name.startswith("3.")
            ),
        )
    elif stage == "after_rename":
        _async_around(
            atomicity.AtomicRenameTemporaryPath,
            "finalize",
            before=never,
            after=lambda self, out: os.path.basename(str(self.get_final())) == "3",
        )
    elif stage == "deleting":
        original_delete = deleter.PathDeleter.delete

        def delete(self, path, *, destination=None, overwrite=False):
            if destination is None:  # a delete in place: die half-way through it
                files = sorted(os.path.join(r, f) for r, _, fs in os.walk(str(path)) for f in fs)
                for name in files[: len(files) // 2]:
                    os.remove(name)
                _die()
            original_delete(self, path, destination=destination, overwrite=overwrite)
            _die()

        deleter.PathDeleter.delete = delete  # type: ignore[method-assign]
    elif stage == "emptying_trash":
        original = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if str(path).endswith(ck._TRASH_DIR):
                for root, _, files in os.walk(path):
                    if files:
                        os.remove(os.path.join(root, files[0]))
                        _die()
            return original(path, *args, **kwargs)

        shutil.rmtree = rmtree  # type: ignore[assignment]
    elif stage != "none":
        raise SystemExit(f"unknown stage {stage!r}; one of {sorted(STAGES)}")


def kill_at(directory: str, stage: str) -> None:
    emb = embedding()
    if not os.path.isdir(os.path.join(directory, "2")):  # the tests write steps 1 and 2 for it
        with ck.CheckpointManager(directory, emb, max_to_keep=2, async_save=False) as manager:
            for step in (1, 2):
                manager.save(step, state_for(emb, step))
    state = state_for(emb, 3)
    _inject(stage)
    print("saving 3", flush=True)
    manager = ck.CheckpointManager(directory, emb, max_to_keep=2, async_save=True)
    manager.save(3, state)
    manager.close()
    print("saved 3", flush=True)


def race(directory: str, writer: int) -> None:
    emb = embedding()
    states = {step: state_for(emb, step, writer) for step in range(1, 5)}
    jax.block_until_ready(states)
    go = directory.rstrip("/") + ".go"
    while not os.path.exists(go):
        time.sleep(0.005)
    manager = ck.CheckpointManager(directory, emb, max_to_keep=None, async_save=False)
    try:
        for step, state in states.items():
            manager.save(step, state)
        print("wrote", flush=True)
    except ck.CheckpointLockedError as err:
        print(f"refused: {err}", flush=True)
    sys.stdin.read()  # hold the lock until the parent closes stdin; never close() the manager


def big_step(directory: str) -> None:
    table = je.TableConfig(2_000_000, 64, name="big", initializer=jax.nn.initializers.zeros)
    emb = je.Embedding({"f": je.FeatureConfig(table)}, je.optimizers.Adagrad(0.1))
    state = emb.init(jax.random.key(0))
    je.checkpoint.save(directory, emb, state, step=1)
    print("saved 1", flush=True)
    state = state._replace(tables={"big": state.tables["big"] + 1.0})
    state = state._replace(step=jnp.asarray(2, jnp.int32))
    je.checkpoint.save(directory, emb, state, step=2)
    print("saved 2", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 2:
        big_step(sys.argv[1])
    elif sys.argv[2] == "--kill-at":
        kill_at(sys.argv[1], sys.argv[3])
    elif sys.argv[2] == "--race":
        race(sys.argv[1], int(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
