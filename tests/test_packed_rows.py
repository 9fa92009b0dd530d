"""Tables stored 128 floats wide (``sharding.row_storage``), as TPU meshes store them.

A TPU lays out a ``[rows, 64]`` array column-major, so a step that reads rows would copy every
table into row-major order and back; stored ``[rows / 2, 128]`` it is row-major. Widths that do
not divide 128 are stored with zero padding (48: two rows and 32 floats to a stored row of 128;
200: one row in 256). These tests force that storage on CPU (``JAXEMBED_PACK_ROWS=always``) and
check it against the plain one: the same lookups and updates bit for bit on every layout and
optimizer, one device and eight (kernels on and off without padding; the pure-JAX path, which
the CPU kernels leave padded tables to, with it); the stored arrays hold each row where
``_kernels._stored_at`` says and zeros in the padding; the checkpoint (logical rows) is the same
either way and restores across the two; ``gather_rows`` and its gradient read and write the
windows; and the compiled step still updates every table in place.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_in_place_update as in_place

import jaxembed as je
from jaxembed import _kernels
from jaxembed.sharding import PACK_ROWS_ENV, entry_storage, row_storage

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


def test_row_storage_is_128_floats_wide_on_tpu_only(monkeypatch):
    mesh = _mesh(1)
    monkeypatch.delenv(PACK_ROWS_ENV, raising=False)
    widths = (1, 2, 8, 16, 32, 40, 48, 64, 100, 128, 200, 256)
    assert [row_storage(mesh, w) for w in widths] == [(1, w) for w in widths]  # CPU: as is
    monkeypatch.setenv(PACK_ROWS_ENV, "always")
    got = {w: row_storage(mesh, w) for w in widths}
    assert got == {
        1: (128, 128),
        2: (64, 128),
        8: (16, 128),
        16: (8, 128),
        32: (4, 128),
        40: (3, 128),  # 8 floats of padding
        48: (2, 128),  # 32
        64: (2, 128),
        100: (1, 128),  # 28
        128: (1, 128),
        200: (1, 256),  # 56
        256: (1, 256),
    }
    monkeypatch.setenv(PACK_ROWS_ENV, "never")
    assert row_storage(mesh, 48) == (1, 48)
    monkeypatch.setenv(PACK_ROWS_ENV, "yes")
    with pytest.raises(ValueError, match="JAXEMBED_PACK_ROWS='yes'.*'tpu'.*'always'.*'never'"):
        row_storage(mesh, 64)


def _features(dim: int = DIM) -> dict:
    a = je.TableConfig(VOCAB_A, dim, combiner="mean", name="a")
    b = je.TableConfig(VOCAB_B, dim, combiner="sum", name="b")
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
            dim = emb.plan["a"].dim
            g = {k: rng.normal(size=(BATCH, dim)).astype(np.float32) for k in inputs}
            state, out = step(state, emb.preprocess(inputs), g)
            acts.append(jax.tree.map(np.asarray, out))
        tables, slots = emb.logical_arrays(state)
    return acts, jax.tree.map(np.asarray, tables), jax.tree.map(np.asarray, slots)


# Width 16 (packed with no padding): every optimizer on row-sharded tables; an elementwise and a
# row-wise one (whose [rows] slot the column layout keeps whole on every device) on the others;
# the one optimizer that updates every row (non-lazy Adam) on one device. Widths that leave
# padding: 48 (2 rows to a row of 128), 100 (1, padded to 128), 200 (padded to 256), and their
# column blocks on 8 devices (6, 13 and 25 floats: 21, 9 and 5 rows to a row), on the pure-JAX
# path (what a TPU runs; the CPU kernels leave padded tables to it: the next test). Width 16
# with the CPU kernels and with the pure-JAX path.
CASES = [
    (16, d, strategy, opt, kernels)
    for d, strategy, opt in (
        [(8, "row", opt) for opt in sorted(OPTIMIZERS)]
        + [(8, s, o) for s in STRATEGIES[1:] for o in ("adagrad", "rowwise_adagrad")]
        + [(1, s, o) for s in ("row", "column") for o in ("rowwise_adagrad", "adam_not_lazy")]
    )
    for kernels in (True, False)
] + [
    (dim, d, strategy, opt, kernels)
    for dim, d, strategy, opt in (
        [(48, 8, s, o) for s in STRATEGIES for o in ("adagrad", "rowwise_adagrad")]
        + [(48, 1, "row", o) for o in ("partial_rowwise_adam", "adam_not_lazy", "ftrl")]
        + [(dim, d, "row", "rowwise_adagrad") for dim in (100, 200) for d in (1, 8)]
        + [(dim, 8, "column", "adagrad") for dim in (100, 200)]
    )
    for kernels in (False,)
]


@pytest.mark.parametrize(
    ("dim", "devices", "strategy", "optimizer", "kernels"),
    CASES,
    ids=[f"{w}-{d}-{s}-{o}-{'kernels' if k else 'pure_jax'}" for w, d, s, o, k in CASES],
)
def test_stored_rows_train_bit_for_bit_as_rows(packed, dim, devices, strategy, optimizer, kernels):
    def run(pack: bool, kernels: bool):
        opt = OPTIMIZERS[optimizer]()
        sharding = dict.fromkeys("ab", strategy)
        emb = packed(pack, _features(dim), opt, _mesh(devices), sharding)
        return emb, _train(emb, kernels)

    stored_emb, got = run(True, kernels)
    layout = stored_emb.plan.layout("a")
    width = layout.shard_shape[1]
    storage = entry_storage(stored_emb.mesh, width, OPTIMIZERS[optimizer]())
    assert (layout.pack, layout.stored_cols, layout.beside) == storage
    assert layout.stored_cols % 128 == 0 and not layout.as_rows
    blocks = layout.num_shards if strategy == "column" else 1  # of the array
    assert layout.physical_shape == (layout.num_rows // layout.pack, blocks * layout.stored_cols)
    plain_emb, plain = run(False, kernels and not layout.beside)  # beside: the pure update
    assert plain_emb.plan.layout("a").as_rows
    for want, have in zip(jax.tree.leaves(plain), jax.tree.leaves(got), strict=True):
        if "momenta" in layout.beside:
            # Momenta stored beside the rows: XLA may contract b1 * m + (1 - b1) * g into an
            # FMA in one program and not in the other (one float32 rounding apart).
            np.testing.assert_allclose(have, want, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(have, want)


@pytest.mark.parametrize("devices", [1, 8])
def test_the_cpu_kernels_leave_padded_tables_to_the_pure_update(packed, devices):
    """The CPU kernels read and update tables storing whole rows only: with padding (width 48
    in rows of 128) the compiled step calls no gather or update kernel, and trains as plain
    storage with the kernels does, up to float32 rounding (the kernels and XLA's fused code
    round differently)."""
    opt = je.optimizers.RowWiseAdagrad(0.1)
    sharding = dict.fromkeys("ab", "row")
    with _kernels.use_kernels(True):
        stored = packed(True, _features(48), opt, _mesh(devices), sharding)
        plain = packed(False, _features(48), opt, _mesh(devices), sharding)
        ids = np.arange(BATCH)
        batch = stored.preprocess({f: je.Ragged.from_row_lengths(ids, [1] * BATCH) for f in "fgh"})
        grads = {f: np.ones((BATCH, 48), np.float32) for f in "fgh"}
        hlo = (
            jax.jit(stored.apply_gradients)
            .lower(stored.abstract_state(), batch, grads)
            .compile()
            .as_text()
        )
    assert stored.plan.layout("a").stored_cols == 128
    for target in ("jaxembed_gather_rows", "jaxembed_apply_rows", "jaxembed_apply_slots"):
        assert f'custom_call_target="{target}"' not in hlo
    want, have = _train(plain, kernels=True), _train(stored, kernels=True)
    for w, h in zip(jax.tree.leaves(want), jax.tree.leaves(have), strict=True):
        np.testing.assert_allclose(h, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", [DIM, 48])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("devices", [1, 8])
def test_each_row_is_stored_where_the_windows_say(packed, devices, strategy, dim):
    """``to_physical`` puts local row ``i`` of a device at stored row ``i // p``, columns
    ``(i % p) * width`` onward, and ``to_logical`` takes it back."""
    emb = packed(True, _features(dim), je.optimizers.SGD(0.1), _mesh(devices), {"a": strategy})
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
        windows = np.asarray(_kernels._take(jnp.asarray(block), jnp.arange(rows), width))
        np.testing.assert_array_equal(windows, local)
        assert not block[:, p * width :].any()  # zeros after each stored row's p rows
        if strategy == "column":  # every row's columns [shard * width, ...) of the table
            want = np.pad(np.asarray(logical["a"]), ((0, rows - VOCAB_A), (0, t * width - dim)))
            np.testing.assert_array_equal(local, want[:, shard * width : (shard + 1) * width])
    for t_ in layout.tables:
        back = jax.jit(lambda s, n=t_.name: layout.to_logical(s, n))(jnp.asarray(stored))
        np.testing.assert_array_equal(np.asarray(back), np.asarray(logical[t_.name]))


@pytest.mark.parametrize("dim", [DIM, 48])
@pytest.mark.parametrize("pack_first", [True, False], ids=["packed_to_rows", "rows_to_packed"])
def test_a_checkpoint_restores_across_packed_and_plain_storage(packed, tmp_path, pack_first, dim):
    """Checkpoints hold logical rows: a state trained packed (a TPU's) restores onto plain
    storage (a CPU's) bit for bit, and back."""
    opt = je.optimizers.RowWiseAdagrad(0.1)  # a [rows] slot beside the table
    source = packed(pack_first, _features(dim), opt, _mesh(8), {"a": "row", "b": "column"})
    state = source.init(jax.random.key(3))
    batch_rng = np.random.default_rng(4)
    lengths = batch_rng.integers(1, 4, BATCH)
    inputs = {
        f: je.Ragged.from_row_lengths(batch_rng.integers(0, v, lengths.sum()), lengths)
        for f, v in (("f", VOCAB_A), ("g", VOCAB_B), ("h", VOCAB_A))
    }
    grads = {f: np.ones((BATCH, dim), np.float32) for f in inputs}
    state = source.apply_gradients(state, source.preprocess(inputs), grads)
    je.checkpoint.save(tmp_path / "ckpt", source, state, step=1)
    target = packed(not pack_first, _features(dim), opt, _mesh(2), {"a": "table", "b": "row"})
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


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "pure_jax"])
@pytest.mark.parametrize("width", [64, 48, 100])
def test_gather_rows_reads_windows_and_its_gradient_adds_into_them(kernels, width):
    """``gather_rows(table, ids, width)`` on a table storing ``128 // width`` rows to a row of
    128 floats (48: with 32 floats of padding; 100: one row and 28): the rows numpy finds at
    their windows, zeros for ids outside the table, and a gradient that adds each cotangent row
    into its id's window (twice for a repeated id) and leaves the padding at zero."""
    pack, stored_rows = 128 // width, 5
    rng = np.random.default_rng(7)
    table = rng.normal(size=(stored_rows, 128)).astype(np.float32)
    ids = np.array([0, 3, pack * stored_rows - 1, 3, pack * stored_rows, -1], np.int32)
    cot = rng.normal(size=(ids.shape[0], width)).astype(np.float32)

    def window(i: int) -> tuple[int, slice]:
        return i // pack, slice((i % pack) * width, (i % pack + 1) * width)

    inside = (ids >= 0) & (ids < pack * stored_rows)
    want_rows = np.stack(
        [table[window(i)] if ok else np.zeros(width) for i, ok in zip(ids, inside, strict=True)]
    )
    want_grad = np.zeros_like(table)
    for i, ok, c in zip(ids, inside, cot, strict=True):
        if ok:
            want_grad[window(i)] += c
    with _kernels.use_kernels(kernels):
        rows = jax.jit(lambda t: _kernels.gather_rows(t, ids, width))(table)
        grad = jax.jit(jax.grad(lambda t: jnp.sum(_kernels.gather_rows(t, ids, width) * cot)))(
            table
        )
    np.testing.assert_array_equal(np.asarray(rows), want_rows)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-6, atol=1e-6)
    assert not np.asarray(grad)[:, pack * width :].any()


def _row_indexed(hlo: str, shapes: set[tuple[int, ...]]) -> tuple[int, list[str]]:
    """``(count, offenders)``: the float gathers and scatters of ``hlo`` (fused ones included)
    that index a column as well as a row (a window at a run-time column offset, which a TPU
    cannot emit whole), and how many of them read or write whole stored rows: gathers of slices
    as wide as a stored row of ``shapes``, scatters into an array of ``shapes``."""
    widths = {shape[-1] for shape in shapes}
    count, offenders = 0, []
    for line in hlo.splitlines():
        m = re.search(r"= f32\[([\d,]*)\]\S* (gather|scatter)\(", line)
        if not m:
            continue
        key = "start_index_map" if m.group(2) == "gather" else "scatter_dims_to_operand_dims"
        dims = re.search(rf"{key}={{([\d,]*)}}", line)
        if dims is None or dims.group(1) != "0":
            offenders.append(line.strip()[:160])
        if m.group(2) == "scatter":
            count += tuple(int(d) for d in m.group(1).split(",")) in shapes
        else:
            sizes = re.search(r"slice_sizes={([\d,]*)}", line)
            count += bool(sizes) and int(sizes.group(1).split(",")[-1]) in widths
    return count, offenders


@pytest.mark.parametrize("strategy", [None, *STRATEGIES])
@pytest.mark.parametrize("dim", [16, 48])
def test_packed_tables_are_read_and_written_as_whole_stored_rows(monkeypatch, strategy, dim):
    """The pure-JAX step (what a TPU runs) on packed tables reads and writes whole stored rows:
    every gather and scatter of a table or slot shard indexes its rows only, never a column.
    (A TPU turns a gather or scatter of a window at a run-time column into a loop with one trip
    per row: 28,672 trips to fetch W's rows, and five loops of 512 trips in every chunk of the
    update.) The step's results are checked against plain storage in
    ``test_stored_rows_train_bit_for_bit_as_rows``."""
    monkeypatch.setenv(PACK_ROWS_ENV, "always")
    tables = [je.TableConfig(VOCAB_A, dim, name="a"), je.TableConfig(VOCAB_B, dim, name="b")]
    features = {"x": je.FeatureConfig(tables[0]), "y": je.FeatureConfig(tables[1])}
    opt = je.optimizers.Adagrad(0.1)
    if strategy is None:
        emb = je.Embedding(features, opt)
    else:
        emb = je.Embedding(features, opt, _mesh(8), dict.fromkeys("ab", strategy))
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 5, BATCH)
    inputs = {
        "x": je.Ragged.from_row_lengths(rng.integers(0, VOCAB_A, lengths.sum()), lengths),
        "y": rng.integers(0, VOCAB_B, (BATCH, 1)),
    }
    g = {f: jnp.ones((BATCH, dim), jnp.float32) for f in inputs}

    def step(state, batch, g):
        acts = emb.lookup(state, batch)
        grads = jax.grad(lambda a: sum(jnp.sum(a[f] * g[f]) for f in a))(acts)
        return emb.apply_gradients(state, batch, grads)

    with _kernels.use_kernels(False):
        state = emb.init(jax.random.key(1))
        hlo = jax.jit(step, donate_argnums=0).lower(state, emb.preprocess(inputs), g)
        hlo = hlo.compile().as_text()
    shapes = set()
    for leaf in jax.tree.leaves((state.tables, state.slots)):
        if leaf.ndim == 2:
            shapes.update(tuple(s.data.shape) for s in leaf.addressable_shards)
    count, offenders = _row_indexed(hlo, shapes)
    assert count > 0, "no gather or scatter of a stored table found: the check checks nothing"
    assert offenders == [], offenders
