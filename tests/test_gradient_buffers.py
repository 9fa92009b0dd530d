"""The pure-JAX step (kernels off: what TPUs and GPUs run) sums each table's gradient rows into
a buffer of its own, one table after another, so its scratch memory holds one table's gradient
rows, not every table's.

XLA merged the zeros that start every table's buffer into one array and copied it into each
table's buffer at the start of the step, every buffer live at once: on the 8 W tables the step
took 85 MB of scratch memory (25.7 MB now), which the CPU runtime maps afresh on every step.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed as je
from jaxembed import _kernels

VOCAB, DIM, BATCH, IDS = 50_000, 8, 256, 16


def _compiled_step(tables: int, devices: int) -> tuple[jax.stages.Compiled, int]:
    """The compiled pure train step over ``tables`` tables, row-sharded over ``devices``, and
    the rows of one table's gradient buffer on a device (the rows it fetched)."""
    features = {
        f"f{i}": je.FeatureConfig(je.TableConfig(VOCAB, DIM, combiner="sum", name=f"t{i}"))
        for i in range(tables)
    }
    mesh = jax.make_mesh((devices,), ("x",)) if devices > 1 else None
    emb = je.Embedding(features, je.optimizers.Adagrad(0.1), mesh=mesh)
    rng = np.random.default_rng(0)
    lengths = np.full(BATCH, IDS)
    inputs = {
        f: je.Ragged.from_row_lengths(rng.integers(0, VOCAB, BATCH * IDS), lengths)
        for f in features
    }
    batch = emb.preprocess(inputs)
    capacities = {r.shape[-1] for r in jax.tree.leaves(batch.requests)}
    assert len(capacities) == 1
    state = emb.init(jax.random.key(0))

    def step(state, batch):
        acts = emb.lookup(state, batch)
        grads = jax.grad(lambda a: sum(jnp.sum(jax.nn.softplus(x)) for x in a.values()))(acts)
        return emb.apply_gradients(state, batch, grads)

    with _kernels.use_kernels(False):
        compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    return compiled, devices * capacities.pop()


@pytest.mark.parametrize("devices", [1, 8])
def test_no_table_copies_a_shared_zero_buffer(devices):
    compiled, rows = _compiled_step(4, devices)
    copy = re.compile(rf"= f32\[{rows},{DIM}\]\S* copy\(")
    copies = [line for line in compiled.as_text().splitlines() if copy.search(line)]
    assert not copies, copies


def test_scratch_memory_holds_one_table_of_gradient_rows():
    """(On a mesh each device also fetches as many rows per table for its lookups, so its
    scratch memory grows by more than the gradient rows.)"""
    more = 4
    few, rows = _compiled_step(2, 1)
    many, _ = _compiled_step(2 + more, 1)
    buffer = rows * DIM * 4
    assert buffer >= 4 * BATCH * DIM * 4  # the gradient rows outweigh a table's activations
    growth = many.memory_analysis().temp_size_in_bytes - few.memory_analysis().temp_size_in_bytes
    assert growth < more * buffer / 2, (growth, buffer)


def test_gradient_sum_reads_the_slots_in_place():
    """The loop that sums the gradient rows reads each slot column where it lies in the plan's
    ``[R, slots]`` arrays: no transposed ``[slots, R]`` copy of them in scratch memory (two
    such copies took W's step at batch 16,384 over glibc's 32 MiB ``mmap`` threshold)."""
    compiled, _ = _compiled_step(1, 1)
    text = compiled.as_text()
    assert re.search(rf"s32\[(1,)?{BATCH},{IDS}\]", text)  # the plan's slots, as given
    transposed = re.compile(rf"= s32\[{IDS},{BATCH}\]")
    assert not [line for line in text.splitlines() if transposed.search(line)]
