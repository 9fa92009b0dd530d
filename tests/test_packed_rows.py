"""Tables stored several rows to a row (``sharding.rows_per_row``), as TPU meshes store them.

A TPU lays out a ``[rows, 64]`` array column-major, so a step that reads rows would copy every
table into row-major order and back; stored ``[rows / 2, 128]`` it is row-major. These tests
force the packed storage on CPU (``JAXEMBED_PACK_ROWS=always``) and check it against the plain
one: the same lookups and updates bit for bit on every layout and optimizer, kernels on and off,
one device and eight; the stored arrays hold each row where ``_kernels._windows`` says; the
checkpoint (logical rows) is the same either way and restores across the two; and the compiled
step still updates every table in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_in_place_update as in_place

import jaxembed as je
from jaxembed import _kernels
from jaxembed.sharding import PACK_ROWS_ENV, rows_per_row

STRATEGIES = ("row", "table", "column", "replicated")
VOCAB_A, VOCAB_B, DIM, BATCH = 101, 37, 16, 16


def _mesh(devices: int) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("x",))


@pytest.fixture
def packed(monkeypatch):
    """A function building an Embedding with packing forced on (True) or off (False)."""

    def build(pack: bool, *args, **kwargs) -> je.Embedding:
        monkeypatch.setenv(PACK_ROWS_ENV, "always" if pack else "never")
        return je.Embedding(*args, **kwargs)

    return build


def test_rows_per_row_packs_widths_that_divide_128_on_tpu_only(monkeypatch):
    mesh = _mesh(1)
    monkeypatch.delenv(PACK_ROWS_ENV, raising=False)
    assert [rows_per_row(mesh, w) for w in (1, 16, 64, 128)] == [1, 1, 1, 1]  # CPU: as is
    monkeypatch.setenv(PACK_ROWS_ENV, "always")
    got = {w: rows_per_row(mesh, w) for w in (1, 2, 8, 16, 32, 64, 48, 100, 128, 200, 256)}
    assert got == {1: 128, 2: 64, 8: 16, 16: 8, 32: 4, 64: 2} | dict.fromkeys(
        (48, 100, 128, 200, 256), 1
    )
    monkeypatch.setenv(PACK_ROWS_ENV, "never")
    assert rows_per_row(mesh, 64) == 1
    monkeypatch.setenv(PACK_ROWS_ENV, "yes")
    with pytest.raises(ValueError, match="JAXEMBED_PACK_ROWS='yes'.*'tpu'.*'always'.*'never'"):
        rows_per_row(mesh, 64)


def _features() -> dict:
    a = je.TableConfig(VOCAB_A, DIM, combiner="mean", name="a")
    b = je.TableConfig(VOCAB_B, DIM, combiner="sum", name="b")
    return {"f": je.FeatureConfig(a), "g": je.FeatureConfig(b), "h": je.FeatureConfig(a)}


OPTIMIZERS = {
    "adagrad": lambda: je.optimizers.Adagrad(0.1),
    "rowwise_adagrad": lambda: je.optimizers.RowWiseAdagrad(0.1),
    "partial_rowwise_adam": lambda: je.optimizers.PartialRowWiseAdam(0.01),
    "adam_not_lazy": lambda: je.optimizers.Adam(0.01, lazy_adam=False),
    "ftrl": lambda: je.optimizers.FTRL(0.1),
    "sgd": lambda: je.optimizers.SGD(0.1),
}


def _train(emb: je.Embedding, kernels: bool, steps: int = 3):
    """Three jitted steps on random ragged batches: (activations, logical tables, slots)."""
    rng = np.random.default_rng(0)

    def step(state, batch, g):
        acts = emb.lookup(state, batch)
        grads = jax.grad(lambda a: sum(jnp.sum(jnp.sin(a[k]) * g[k]) for k in a))(acts)
        return emb.apply_gradients(state, batch, grads), acts

    acts = []
    with _kernels.use_kernels(kernels):
        state = emb.init(jax.random.key(1))
        step = jax.jit(step, donate_argnums=0)
        for _ in range(steps):
            inputs = {}
            for feature, vocab in (("f", VOCAB_A), ("g", VOCAB_B), ("h", VOCAB_A)):
                lengths = rng.integers(0, 6, BATCH)
                ids = rng.integers(0, vocab, lengths.sum())
                inputs[feature] = je.Ragged.from_row_lengths(ids, lengths)
            g = {k: rng.normal(size=(BATCH, DIM)).astype(np.float32) for k in inputs}
            state, out = step(state, emb.preprocess(inputs), g)
            acts.append(jax.tree.map(np.asarray, out))
        tables, slots = emb.logical_arrays(state)
    return acts, jax.tree.map(np.asarray, tables), jax.tree.map(np.asarray, slots)


# Every optimizer on row-sharded tables; an elementwise and a row-wise one (whose [rows] slot
# the column layout keeps whole on every device) on the others; the one optimizer that updates
# every row (non-lazy Adam) on one device; the CPU kernels and the pure-JAX path.
CASES = (
    [(8, "row", opt, kernels) for opt in sorted(OPTIMIZERS) for kernels in (True, False)]
    + [
        (8, strategy, opt, kernels)
        for strategy in STRATEGIES[1:]
        for opt in ("adagrad", "rowwise_adagrad")
        for kernels in (True, False)
    ]
    + [
        (1, strategy, opt, kernels)
        for strategy in ("row", "column")
        for opt in ("rowwise_adagrad", "adam_not_lazy")
        for kernels in (True, False)
    ]
)


@pytest.mark.parametrize(
    ("devices", "strategy", "optimizer", "kernels"),
    CASES,
    ids=[f"{d}-{s}-{o}-{'kernels' if k else 'pure_jax'}" for d, s, o, k in CASES],
)
def test_packed_storage_trains_bit_for_bit_as_rows(packed, devices, strategy, optimizer, kernels):
    def run(pack: bool):
        opt = OPTIMIZERS[optimizer]()
        sharding = dict.fromkeys("ab", strategy)
        emb = packed(pack, _features(), opt, _mesh(devices), sharding)
        return emb, _train(emb, kernels)

    plain_emb, plain = run(False)
    packed_emb, got = run(True)
    layout = packed_emb.plan.layout("a")
    width = layout.shard_shape[1]
    assert layout.pack == 128 // width > 1 and plain_emb.plan.layout("a").pack == 1
    columns = layout.num_shards * width if strategy == "column" else width  # of the array
    assert layout.physical_shape == (layout.num_rows // layout.pack, columns * layout.pack)
    for want, have in zip(jax.tree.leaves(plain), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(have, want)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("devices", [1, 8])
def test_each_row_is_stored_where_the_windows_say(packed, devices, strategy):
    """``to_physical`` puts local row ``i`` of a device at stored row ``i // p``, columns
    ``(i % p) * width`` onward, and ``to_logical`` takes it back."""
    emb = packed(True, _features(), je.optimizers.SGD(0.1), _mesh(devices), {"a": strategy})
    layout = emb.plan.layout("a")
    rng = np.random.default_rng(1)
    logical = {t.name: rng.normal(size=(t.vocabulary_size, t.dim)) for t in layout.tables}
    logical = {k: jnp.asarray(v, jnp.float32) for k, v in logical.items()}
    stored = np.asarray(jax.jit(layout.to_physical)(logical))
    assert stored.shape == layout.physical_shape
    (rows, width), p, t = layout.shard_shape, layout.pack, layout.num_shards
    split = 1 if strategy == "column" else 0
    for shard, block in enumerate(np.split(stored, t, axis=split)):
        local = np.stack(
            [block[i // p, (i % p) * width : (i % p + 1) * width] for i in range(rows)]
        )
        windows = np.asarray(_kernels._take(jnp.asarray(block), jnp.arange(rows), p))
        np.testing.assert_array_equal(windows, local)
        if strategy == "column":  # every row's columns [shard * width, ...) of the table
            want = np.pad(np.asarray(logical["a"]), ((0, rows - VOCAB_A), (0, t * width - DIM)))
            np.testing.assert_array_equal(local, want[:, shard * width : (shard + 1) * width])
    for t_ in layout.tables:
        back = jax.jit(lambda s, n=t_.name: layout.to_logical(s, n))(jnp.asarray(stored))
        np.testing.assert_array_equal(np.asarray(back), np.asarray(logical[t_.name]))


@pytest.mark.parametrize("pack_first", [True, False], ids=["packed_to_rows", "rows_to_packed"])
def test_a_checkpoint_restores_across_packed_and_plain_storage(packed, tmp_path, pack_first):
    """Checkpoints hold logical rows: a state trained packed (a TPU's) restores onto plain
    storage (a CPU's) bit for bit, and back."""
    opt = je.optimizers.RowWiseAdagrad(0.1)  # a [rows] slot beside the table
    source = packed(pack_first, _features(), opt, _mesh(8), {"a": "row", "b": "column"})
    state = source.init(jax.random.key(3))
    batch_rng = np.random.default_rng(4)
    lengths = batch_rng.integers(1, 4, BATCH)
    inputs = {
        f: je.Ragged.from_row_lengths(batch_rng.integers(0, v, lengths.sum()), lengths)
        for f, v in (("f", VOCAB_A), ("g", VOCAB_B), ("h", VOCAB_A))
    }
    grads = {f: np.ones((BATCH, DIM), np.float32) for f in inputs}
    state = source.apply_gradients(state, source.preprocess(inputs), grads)
    je.checkpoint.save(tmp_path / "ckpt", source, state, step=1)
    target = packed(not pack_first, _features(), opt, _mesh(2), {"a": "table", "b": "row"})
    restored = je.checkpoint.restore(tmp_path / "ckpt", target)
    for want, got in zip(
        jax.tree.leaves(source.logical_arrays(state)),
        jax.tree.leaves(target.logical_arrays(restored)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "pure_jax"])
@pytest.mark.parametrize("strategy", [None, *STRATEGIES])
def test_packed_tables_are_updated_in_place(monkeypatch, strategy, kernels):
    """The compiled step of ``test_in_place_update`` (a linear head, the hardest case) copies
    no packed table, and returns the activations and tables it should."""
    monkeypatch.setenv(PACK_ROWS_ENV, "always")
    in_place._check_step("linear", strategy, kernels)
