"""A jitted, donated train step updates every table in place, whatever the loss.

The compiled HLO of ``lookup`` + gradient + ``apply_gradients`` holds no op that copies a table
(or a table shard) for gradients that depend on the activations (softplus), that do not (a
fixed linear head ``sum(acts * g)``, a constant, a ``custom_vjp`` that ignores its residuals)
and that are absent (``None``), with the CPU kernels on and off, on one device and with each
sharding strategy on the 8-device mesh. Each step also returns what it should: activations read
before the update (equal to an eager lookup of the old state) and tables equal to an eager
``apply_gradients``. Without the ordering of ``jaxembed._reads``, XLA copies each table twice
for every case but softplus.
"""

from __future__ import annotations

import gc
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed as je
from jaxembed import _kernels

# Row counts whose shards (997 and 611 rows) match no other buffer of the step.
VOCAB, VOCAB_B, DIM, BATCH = 8 * 997, 8 * 611, 16, 16
STRATEGIES = ("row", "table", "column", "replicated")


@jax.custom_vjp
def _scaled_sum(a: jax.Array) -> jax.Array:
    return jnp.sum(a) * 2.0


def _scaled_sum_fwd(a):
    return _scaled_sum(a), a.shape


def _scaled_sum_bwd(shape, ct):
    return (jnp.full(shape, 2.0) * ct,)  # ignores the activations


_scaled_sum.defvjp(_scaled_sum_fwd, _scaled_sum_bwd)


def _loss_and_grads(kind: str, acts: dict, g: dict) -> tuple[jax.Array, dict | None]:
    if kind == "none":  # no gradient at all: the tables do not move
        loss = sum(jnp.sum(acts[f] * g[f]) for f in g)
        return loss, {f: None for f in g}
    if kind == "constant":  # gradients that do not come from the model
        return sum(jnp.sum(a) for a in acts.values()), dict(g)
    losses = {
        "softplus": lambda a: sum(jnp.sum(jax.nn.softplus(a[f] * g[f])) for f in g),
        "linear": lambda a: sum(jnp.sum(a[f] * g[f]) for f in g),
        "custom_vjp": lambda a: sum(_scaled_sum(a[f]) for f in g),
    }
    return jax.value_and_grad(losses[kind])(acts)


KINDS = ("softplus", "linear", "constant", "custom_vjp", "none")


def _step(emb: je.Embedding, kind: str):
    def step(state, batch, g):
        acts = emb.lookup(state, batch)
        loss, grads = _loss_and_grads(kind, acts, g)
        return emb.apply_gradients(state, batch, grads), acts, loss

    return step


def _embedding(strategy: str | None) -> je.Embedding:
    tables = [
        je.TableConfig(VOCAB, DIM, combiner="sum", name="a"),
        je.TableConfig(VOCAB_B, DIM, combiner="mean", name="b"),
    ]
    features = {"x": je.FeatureConfig(tables[0]), "y": je.FeatureConfig(tables[1])}
    optimizer = je.optimizers.Adagrad(0.1)
    if strategy is None:
        return je.Embedding(features, optimizer)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))
    return je.Embedding(features, optimizer, mesh, dict.fromkeys("ab", strategy))


def _inputs(rng: np.random.Generator) -> tuple[dict, dict]:
    lengths = rng.integers(1, 5, BATCH)
    inputs = {
        "x": je.Ragged.from_row_lengths(rng.integers(0, VOCAB, lengths.sum()), lengths),
        "y": rng.integers(0, VOCAB_B, (BATCH, 1)),
    }
    g = {"x": rng.normal(size=(BATCH, DIM)), "y": rng.normal(size=(BATCH, DIM))}
    return inputs, {f: jnp.asarray(v, jnp.float32) for f, v in g.items()}


def _table_copies(hlo: str, emb: je.Embedding, state: je.EmbeddingState) -> list[str]:
    """Instructions of ``hlo`` that copy a table or a table's shard (any layout)."""
    shapes = set()
    for table in jax.tree.leaves(state.tables):
        shapes.add(tuple(table.shape))
        for shard in table.addressable_shards:
            shapes.add(tuple(shard.data.shape))
    found = []
    for m in re.finditer(r"= f32\[([\d,]+)\][^ ]* (copy|copy-start)\(", hlo):
        if tuple(int(d) for d in m.group(1).split(",")) in shapes:
            found.append(m.group(0))
    return found


def _check_step(kind: str, strategy: str | None, kernels: bool) -> None:
    emb = _embedding(strategy)
    inputs, g = _inputs(np.random.default_rng(0))
    with _kernels.use_kernels(kernels):
        state = emb.init(jax.random.key(1))
        batch = emb.preprocess(inputs)
        step = jax.jit(_step(emb, kind), donate_argnums=0)
        hlo = step.lower(state, batch, g).compile().as_text()
        assert _table_copies(hlo, emb, state) == []

        # The reference: the lookup and the update as separate calls on an undonated state.
        want_acts = jax.jit(emb.lookup)(state, batch)
        _, want_grads = _loss_and_grads(kind, want_acts, g)
        want_state = jax.jit(emb.apply_gradients)(state, batch, want_grads)
        want_tables = jax.tree.map(np.asarray, emb.embedding_tables(want_state))
        want_acts = jax.tree.map(np.asarray, want_acts)

        new_state, acts, _ = step(state, batch, g)
    for f in want_acts:  # read before the in-place update
        np.testing.assert_array_equal(np.asarray(acts[f]), want_acts[f], err_msg=f)
    got_tables = emb.embedding_tables(new_state)
    for name, want in want_tables.items():
        np.testing.assert_array_equal(np.asarray(got_tables[name]), want, err_msg=name)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "pure_jax"])
@pytest.mark.parametrize("kind", KINDS)
def test_one_device_updates_in_place_for_every_gradient(kind, kernels):
    _check_step(kind, None, kernels)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "pure_jax"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_layout_updates_in_place_under_a_linear_head(strategy, kernels):
    _check_step("linear", strategy, kernels)


@pytest.mark.parametrize("strategy", [None, "row"])
def test_pure_update_in_chunks_is_in_place(monkeypatch, strategy):
    """The pure-JAX update loops over chunks of touched rows (here 4 a trip): in place too."""
    monkeypatch.setattr(_kernels, "_CHUNK", 4)
    _check_step("softplus", strategy, False)


@pytest.mark.parametrize("kind", ["constant", "custom_vjp"])
def test_row_sharding_updates_in_place_for_gradients_that_ignore_the_activations(kind):
    _check_step(kind, "row", True)


def test_two_lookups_of_one_state_are_both_read_before_the_update():
    """Two batches looked up from one state in one step: both see the old tables."""
    emb = _embedding(None)
    rng = np.random.default_rng(2)
    (in1, g), (in2, _) = _inputs(rng), _inputs(rng)
    state = emb.init(jax.random.key(0))
    b1, b2 = emb.preprocess(in1), emb.preprocess(in2)
    want = jax.tree.map(np.asarray, emb.lookup(state, b2))

    def step(state, b1, b2):
        emb.lookup(state, b1)
        second = emb.lookup(state, b2)
        return emb.apply_gradients(state, b1, g), second

    compiled = jax.jit(step, donate_argnums=0).lower(state, b1, b2).compile()
    assert _table_copies(compiled.as_text(), emb, state) == []
    _, second = jax.jit(step, donate_argnums=0)(state, b1, b2)
    for f in want:
        np.testing.assert_array_equal(np.asarray(second[f]), want[f])


def test_reads_do_not_outlive_their_trace():
    """The record of a step's reads goes away with the step's trace."""
    from jaxembed import _reads

    emb = _embedding(None)
    inputs, g = _inputs(np.random.default_rng(3))
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess(inputs)
    jax.jit(_step(emb, "linear"), donate_argnums=0).lower(state, batch, g)
    gc.collect()
    assert _reads._READS == {}
