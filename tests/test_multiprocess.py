"""Two processes x two CPU devices (jax.distributed on localhost, gloo collectives), each feeding
half of the global batch, train exactly like one process with mesh=None, on a 1-D mesh (row,
table-wise and replicated tables) and on a (2, 2) ("data", "model") mesh with the tables over
"model" (row, column and replicated); the checkpoint they write together restores onto one
device."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from multiprocess.scenario import NUM_STEPS, batch_for, feature_config, optimizer, train_step

import jaxembed as je

WORKER = Path(__file__).parent / "multiprocess" / "worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _reference():
    emb = je.Embedding(feature_config(), optimizer())
    state = emb.init(jax.random.key(0))

    step = train_step(emb)

    first = None
    for i in range(NUM_STEPS):
        state, acts = step(state, emb.preprocess(*batch_for(i)))
        first = first or {k: np.asarray(v) for k, v in acts.items()}
    tables = {t.name: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
    slots = {
        f"{t.name}/{k}": np.asarray(v)
        for t, named in emb.slot_variables(state).items()
        for k, v in named.items()
    }
    return first, tables, slots


@pytest.mark.parametrize("mesh", ["1d", "2d"])
def test_two_processes_match_single_process(tmp_path, mesh):
    out = tmp_path / "result.npz"
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(pid), "2", port, str(out), mesh],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process workers timed out")
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]

    got = np.load(out)
    acts, tables, slots = _reference()
    for k, v in acts.items():
        np.testing.assert_array_equal(got[f"act/{k}"], v, err_msg=f"activation {k}")
    for k, v in tables.items():
        np.testing.assert_allclose(got[f"table/{k}"], v, rtol=1e-5, atol=1e-6, err_msg=k)
    for k, v in slots.items():
        np.testing.assert_allclose(got[f"slot/{k}"], v, rtol=1e-5, atol=1e-6, err_msg=k)

    # The checkpoint the two processes wrote restores onto one device, bit for bit.
    single = je.Embedding(feature_config(), optimizer())
    restored = je.checkpoint.restore(str(out) + ".ckpt", single)
    assert int(restored.step) == NUM_STEPS
    for t, v in single.embedding_tables(restored).items():
        np.testing.assert_array_equal(np.asarray(v), got[f"table/{t.name}"], err_msg=t.name)
    for t, named in single.slot_variables(restored).items():
        for k, v in named.items():
            np.testing.assert_array_equal(np.asarray(v), got[f"slot/{t.name}/{k}"])
