"""One process of the multi-process test: 2 CPU devices, gloo collectives, half the batch.

Usage: python worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz [1d|2d]
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jax.experimental import multihost_utils  # noqa: E402

import jaxembed as je  # noqa: E402
from jaxembed.batch import slice_examples  # noqa: E402
from multiprocess.scenario import (  # noqa: E402
    NUM_STEPS,
    SHARDING,
    SHARDING_2D,
    batch_for,
    feature_config,
    optimizer,
    train_step,
)


def main() -> None:
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    # Read when JAX creates its CPU client (first use), so setting it here is early enough.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)
    assert jax.process_count() == nproc and jax.device_count() == 2 * nproc, jax.devices()
    fc = feature_config()
    if len(sys.argv) > 5 and sys.argv[5] == "2d":  # ("data", "model"): one mesh row per process
        mesh = jax.make_mesh((nproc, 2), ("data", "model"))
        emb = je.Embedding(fc, optimizer(), mesh=mesh, sharding=SHARDING_2D, table_axes=("model",))
    else:
        mesh = jax.make_mesh((jax.device_count(),), ("x",))
        emb = je.Embedding(fc, optimizer(), mesh=mesh, sharding=SHARDING)
    state = emb.init(jax.random.key(0))

    step = train_step(emb)

    first_acts = None
    for i in range(NUM_STEPS):
        inputs, weights = batch_for(i)
        size = inputs["dense"].shape[0]
        lo, hi = pid * size // nproc, (pid + 1) * size // nproc  # this process's examples
        local_inputs = {k: slice_examples(v, lo, hi) for k, v in inputs.items()}
        local_weights = {k: slice_examples(v, lo, hi) for k, v in weights.items()}
        state, acts = step(state, emb.preprocess(local_inputs, local_weights))
        if first_acts is None:
            first_acts = {
                k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
                for k, v in acts.items()
            }
    tables = {t.name: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
    slots = {
        f"{t.name}/{k}": np.asarray(v)
        for t, named in emb.slot_variables(state).items()
        for k, v in named.items()
    }
    # What a checkpoint holds is split as the table is: each process writes and reads only its
    # rows (big: 64 rows over 4 devices, or over the 2 of "model").
    logical, _ = emb.logical_arrays(state)
    rows = 64 // emb.plan.layout("big").num_shards
    assert not logical["big"].is_fully_addressable
    assert {s.data.shape for s in logical["big"].addressable_shards} == {(rows, 4)}
    je.checkpoint.save(out + ".ckpt", emb, state, step=NUM_STEPS)  # every process takes part
    restored = je.checkpoint.restore(out + ".ckpt", emb)  # and restores onto the same mesh
    for t, v in emb.embedding_tables(restored).items():
        np.testing.assert_array_equal(np.asarray(v), tables[t.name])
    if pid == 0:
        np.savez(
            out,
            **{f"act/{k}": v for k, v in first_acts.items()},
            **{f"table/{k}": v for k, v in tables.items()},
            **{f"slot/{k}": v for k, v in slots.items()},
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
