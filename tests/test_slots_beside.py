"""Optimizer slots stored beside the rows (``TablePlacement.beside``), as TPU meshes store them.

Where a TPU mesh stores rows side by side or padded in rows of 128 floats
(``sharding.row_storage``), an optimizer's table-shaped slots go into the same stored rows as
the table's rows when that takes no more memory (``sharding.entry_storage``): row ``i``'s entry
is its floats, then each such slot's. A step then reads and writes a row and its slots as one
entry (workload W's 64-wide Adagrad rows: one stored row of 128 floats each, where separately
each array's row would be read and written with its neighbour's).

These tests force the TPU's storage on CPU (``JAXEMBED_PACK_ROWS=always``): which slots go
beside the rows and which do not; the state holds each row and its slots where the entries say
(and no array of their own for them), from ``init``, ``abstract_state`` and after training;
``logical_arrays``, ``slot_variables`` and ``embedding_tables`` give the logical values; a
checkpoint restores across the two storages. That training is the same bit for bit as with
plain storage (every layout, 1 and 8 devices) is ``test_packed_rows``'s
``test_stored_rows_train_bit_for_bit_as_rows``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxembed as je
from jaxembed.sharding import PACK_ROWS_ENV, entry_storage, row_storage

STRATEGIES = ("row", "table", "column", "replicated")
VOCAB_A, VOCAB_B, BATCH = 101, 37, 16
opt = je.optimizers


def _mesh(devices: int) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("x",))


def test_slots_go_beside_the_rows_where_that_takes_no_more_memory(monkeypatch):
    mesh = _mesh(1)
    monkeypatch.setenv(PACK_ROWS_ENV, "always")
    # Adagrad at width 64: a row and its accumulators fill a stored row of 128 (separately,
    # two arrays of [rows / 2, 128]: the same memory).
    assert entry_storage(mesh, 64, opt.Adagrad(0.1)) == (1, 128, ("accumulators",))
    assert entry_storage(mesh, 16, opt.Adagrad(0.1)) == (4, 128, ("accumulators",))
    # 48 + 48 in a stored row of 128: the 128 floats a row its two arrays took anyway.
    assert entry_storage(mesh, 48, opt.Adagrad(0.1)) == (1, 128, ("accumulators",))
    # 100 + 100 in 256 (separately 128 + 128).
    assert entry_storage(mesh, 100, opt.Adagrad(0.1)) == (1, 256, ("accumulators",))
    # Row-wise slots ([rows]) stay apart; PartialRowWiseAdam's momenta go beside.
    assert entry_storage(mesh, 64, opt.PartialRowWiseAdam(0.1)) == (1, 128, ("momenta",))
    assert entry_storage(mesh, 64, opt.RowWiseAdagrad(0.1)) == (2, 128, ())
    # Two slots at width 64: 192 floats would take a stored row of 256 (separately 3 x 64).
    for two in (opt.Adam(0.1), opt.FTRL(0.1), opt.AdagradMomentum(0.1, 0.9)):
        assert entry_storage(mesh, 64, two) == (2, 128, ())
    # At width 40 they fit: 3 x 40 floats in 128, as separately (3 x 40 in 128, three times).
    assert entry_storage(mesh, 40, opt.Adam(0.1)) == (1, 128, ("momenta", "velocities"))
    assert entry_storage(mesh, 32, opt.Adam(0.1)) == (4, 128, ())  # 96 floats: 128 beside
    # No slots, slots updated for every row, Optax state: nothing beside.
    assert entry_storage(mesh, 64, opt.SGD(0.1)) == (2, 128, ())
    assert entry_storage(mesh, 64, opt.Adam(0.1, lazy_adam=False)) == (2, 128, ())
    assert entry_storage(mesh, 64, opt.from_optax(optax.adam(0.1))) == (2, 128, ())
    # Rows stored as they are (a multiple of 128 wide): slots of their own.
    assert entry_storage(mesh, 128, opt.Adagrad(0.1)) == (1, 128, ())
    # CPU and GPU meshes store rows as they are: nothing moves.
    monkeypatch.delenv(PACK_ROWS_ENV)
    assert entry_storage(mesh, 64, opt.Adagrad(0.1)) == (1, 64, ()) == (*row_storage(mesh, 64), ())


def _features(dim: int) -> dict:
    a = je.TableConfig(VOCAB_A, dim, combiner="mean", name="a")
    b = je.TableConfig(VOCAB_B, dim, combiner="sum", name="b")
    return {"f": je.FeatureConfig(a), "g": je.FeatureConfig(b)}


def _inputs(rng: np.random.Generator) -> dict:
    out = {}
    for feature, vocab in (("f", VOCAB_A), ("g", VOCAB_B)):
        lengths = rng.integers(0, 5, BATCH)
        out[feature] = je.Ragged.from_row_lengths(rng.integers(0, vocab, lengths.sum()), lengths)
    return out


def _entries(emb: je.Embedding, state: je.EmbeddingState, name: str) -> list[np.ndarray]:
    """``[rows, (1 + k) * width]``: every device's entries of the array holding ``name``, read
    off the stored array as the layout says (entry ``i`` of a device at stored row ``i // p``,
    columns ``(i % p) * e`` onward), checking that the rest of each stored row is zeros."""
    layout = emb.plan.layout(name)
    stored = np.asarray(state.tables[layout.name])
    assert stored.shape == layout.physical_shape
    (rows, _), p, e = layout.shard_shape, layout.pack, layout.entry_cols
    axis = 1 if layout.strategy == "column" else 0
    out = []
    for block in np.split(stored, layout.num_shards, axis=axis):
        assert not block[:, p * e :].any()
        out.append(np.stack([block[i // p, (i % p) * e : (i % p + 1) * e] for i in range(rows)]))
    return out


# Column blocks of a 48-wide table on 8 devices are 6 floats wide: 12 floats an entry, 10 to a
# stored row, would take more memory than two arrays of 21 blocks a stored row (no slots beside).
STATE_CASES = [
    (devices, strategy, dim)
    for devices in (1, 8)
    for strategy in STRATEGIES
    for dim in (16, 48, 64)
    if (devices, strategy, dim) != (8, "column", 48)
]


@pytest.mark.parametrize(("devices", "strategy", "dim"), STATE_CASES)
def test_the_state_holds_each_row_and_its_accumulators_in_one_entry(
    monkeypatch, devices, strategy, dim
):
    monkeypatch.setenv(PACK_ROWS_ENV, "always")
    adagrad = opt.Adagrad(0.1, initial_accumulator_value=0.25)
    emb = je.Embedding(_features(dim), adagrad, _mesh(devices), dict.fromkeys("ab", strategy))
    layout = emb.plan.layout("a")
    assert layout.beside == ("accumulators",) and not layout.as_rows
    assert "accumulators beside each row" in str(emb.plan)
    state = emb.init(jax.random.key(0))
    abstract = emb.abstract_state()
    assert jax.tree.map(lambda x: (x.shape, x.dtype), (state.tables, state.slots)) == jax.tree.map(
        lambda x: (x.shape, x.dtype), (abstract.tables, abstract.slots)
    )
    assert state.slots[layout.name] == {}  # no array of their own
    rng = np.random.default_rng(1)
    for _ in range(2):
        batch = emb.preprocess(_inputs(rng))
        acts = emb.lookup(state, batch)
        grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), acts)
        state = emb.apply_gradients(state, batch, grads)
    emb.check_state(state)
    tables, slots = emb.logical_arrays(state)
    acc = np.asarray(slots["a"]["accumulators"])
    assert (acc > 0.25).any() and (acc == 0.25).any()  # trained rows and untouched rows
    by_config = {t.name: v for t, v in emb.slot_variables(state).items()}
    np.testing.assert_array_equal(np.asarray(by_config["a"]["accumulators"]), acc)
    rows_by_config = {t.name: v for t, v in emb.embedding_tables(state).items()}
    np.testing.assert_array_equal(np.asarray(rows_by_config["a"]), np.asarray(tables["a"]))
    # The entries, in the layout's row order, hold the logical rows and accumulators.
    entries = _entries(emb, state, "a")
    width = layout.shard_shape[1]
    rows = np.concatenate([e[:, :width] for e in entries], axis=1 if strategy == "column" else 0)
    accs = np.concatenate([e[:, width:] for e in entries], axis=1 if strategy == "column" else 0)

    def physical(logical: dict) -> np.ndarray:  # the layout's order (padding rows: zeros)
        arrays = {t.name: jnp.asarray(logical[t.name]) for t in layout.tables}
        return np.asarray(jax.jit(lambda x: layout._unpack(layout.to_physical(x)))(arrays))

    real = physical({t.name: np.ones((t.vocabulary_size, t.dim)) for t in layout.tables}) == 1
    for got, logical in ((rows, tables), (accs, {k: v["accumulators"] for k, v in slots.items()})):
        np.testing.assert_array_equal(got[real], physical(logical)[real])


@pytest.mark.parametrize("beside_first", [True, False], ids=["beside_to_plain", "plain_to_beside"])
def test_a_checkpoint_restores_across_slots_beside_and_apart(monkeypatch, tmp_path, beside_first):
    """Checkpoints hold logical rows and slots: a state trained with its slots beside its rows
    (a TPU's) restores onto plain storage (a CPU's) bit for bit, and back."""
    adam = opt.PartialRowWiseAdam(0.01)  # momenta beside the rows, velocities ([rows]) apart

    def build(beside: bool, devices: int, sharding: dict) -> je.Embedding:
        monkeypatch.setenv(PACK_ROWS_ENV, "always" if beside else "never")
        return je.Embedding(_features(64), adam, _mesh(devices), sharding)

    source = build(beside_first, 8, {"a": "row", "b": "column"})
    assert bool(source.plan.layout("a").beside) == beside_first
    state = source.init(jax.random.key(3))
    batch = source.preprocess(_inputs(np.random.default_rng(4)))
    grads = jax.tree.map(jnp.ones_like, source.lookup(state, batch))
    state = source.apply_gradients(state, batch, grads)
    je.checkpoint.save(tmp_path / "ckpt", source, state, step=1)
    target = build(not beside_first, 2, {"a": "table", "b": "row"})
    assert bool(target.plan.layout("a").beside) != beside_first
    restored = je.checkpoint.restore(tmp_path / "ckpt", target)
    want, got = source.logical_arrays(state), target.logical_arrays(restored)
    assert np.asarray(want[1]["a"]["momenta"]).any()
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
