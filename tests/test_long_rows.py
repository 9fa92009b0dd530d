"""One long example among short ones: memory follows the total ids, results stay TF's.

A combined plan holds at most ``lookup.row_slot_cap`` entries per row in its head and blocks; a
row's entries past the cap continue its sum as overflow blocks (lookup.py's module docstring).

* TF parity, bit for bit: one very long row among short ones, for ragged inputs (sum, mean,
  sqrtn; weighted and not), unweighted sparse inputs (block order) and weighted sparse inputs
  (TF's tolerance for long weighted sparse rows, and bit-identical to the same lookup without a
  cap), with the CPU kernels on and off, through ``je.embedding_lookup`` and through
  ``Embedding.preprocess`` + ``lookup`` (one device and an 8-device mesh). A random sweep with
  tiny caps, where most rows overflow, must match TF and the uncapped lookup too.
* The ordered row additions the overflow relies on: XLA:CPU's scatter applies duplicate indices
  in index order, and the loop used on other backends gives the same bits.
* Training: ``apply_gradients`` with long rows matches the numpy reference and the uncapped
  batch, for SGD and Adagrad, on one device (the fused update without overflow, the unfused one
  with it) and on an 8-device mesh (row-sharded and replicated tables).
* Memory: the plan arrays stay about ``max(64 R, 4 ids)`` slots; the 20,000-id example costs
  < 100 MB of peak RSS over the same batch without it (fresh subprocesses,
  ``benchmarks/bench_long_row.py``), and 70,000 ids run.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import subprocess
import sys
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from test_lookup_differential import make_case
from tf_reference import assert_matches_tf, flatten_with_paths, tf_lookup

import jaxembed as je
from jaxembed import _kernels, lookup

jeo = je.optimizers
ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB, DIM = 64, 5
ROWS = 32  # divisible by the 8 devices of the mesh
LONG = {5: 3000, 20: 100}  # row -> ids: one very long row, one just past the minimum cap


@contextlib.contextmanager
def caps(minimum: int, per_mean: int = 2, share: int = 8):
    """``row_slot_cap``'s constants set for the block (minimum 2**30: nothing overflows)."""
    saved = lookup.MIN_ROW_SLOTS, lookup.ROW_SLOTS_PER_MEAN, lookup.LONG_ROW_SHARE
    lookup.MIN_ROW_SLOTS, lookup.ROW_SLOTS_PER_MEAN, lookup.LONG_ROW_SHARE = (
        minimum,
        per_mean,
        share,
    )
    try:
        yield
    finally:
        lookup.MIN_ROW_SLOTS, lookup.ROW_SLOTS_PER_MEAN, lookup.LONG_ROW_SHARE = saved


def uncapped():
    return caps(2**30)


@pytest.fixture(params=[True, False], ids=["kernels", "pure_jax"])
def kernels(request):
    with _kernels.use_kernels(request.param):
        yield request.param


def _lengths(rng: np.random.Generator, rows: int = ROWS, long: dict | None = None) -> np.ndarray:
    lengths = rng.integers(0, 7, rows)
    for row, n in (LONG if long is None else long).items():
        lengths[row] = n
    return lengths


def long_input(kind: str, seed: int = 0, rows: int = ROWS, long: dict | None = None):
    """``(ids, weights or None)`` of one feature: short rows and the rows of ``long``."""
    rng = np.random.default_rng(seed)
    lengths = _lengths(rng, rows, long)
    n = int(lengths.sum())
    ids = rng.integers(0, VOCAB, n)
    weights = rng.uniform(0.1, 2.0, n).astype(np.float32)
    weights[rng.random(n) < 0.05] *= -1  # kept by ragged and sum, pruned by sparse mean/sqrtn
    if kind.startswith("ragged"):
        ragged = je.Ragged.from_row_lengths(ids, lengths)
        w = je.Ragged.from_row_lengths(weights, lengths)
        return ragged, (w if kind == "ragged_weighted" else None)
    row = np.repeat(np.arange(rows), lengths)
    col = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    shape = (rows, int(lengths.max()))
    sparse = je.Sparse(np.stack([row, col], 1), ids, shape)
    w = je.Sparse(np.stack([row, col], 1), weights, shape)
    return sparse, (w if kind == "sparse_weighted" else None)


def _table(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(VOCAB, DIM)).astype(np.float32)


def _init(values: np.ndarray):
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.asarray(values, dtype)

    return init


KINDS = ["ragged", "ragged_weighted", "sparse", "sparse_weighted"]
COMBINERS = ["sum", "mean", "sqrtn"]


def _case(kind: str, combiner: str):
    table = je.TableConfig(VOCAB, DIM, combiner=combiner, name="t", initializer=_init(_table()))
    features = {"f": je.FeatureConfig(table)}
    inp, w = long_input(kind)
    return features, {table: _table()}, {"f": inp}, (None if w is None else {"f": w})


def _assert_bits(got, want, where: str = "") -> None:
    for (path, g), (_, w) in zip(flatten_with_paths(got), flatten_with_paths(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"{where} {path}")


# ---------------------------------------------------------------------------------------------
# Plans: bounded arrays, overflow in order


def test_row_slot_cap_ignores_a_few_long_rows_and_bounds_the_slots():
    assert lookup.row_slot_cap(np.zeros(0, int)) == 64
    assert lookup.row_slot_cap(np.full(256, 39)) == 64  # workload W: no row overflows
    assert lookup.row_slot_cap(np.r_[np.full(255, 20), 70_000]) == 64  # one outlier
    # 1 row in 4 long: the mean bounds the cap (2 x 90 -> 256 slots), not the longest row.
    assert lookup.row_slot_cap(np.r_[np.full(192, 20), np.full(64, 300)]) == 256
    assert lookup.row_slot_cap(np.array([70_000])) == 2**17  # a lone row never overflows


@pytest.mark.parametrize("kind", ["ragged_weighted", "sparse"])
def test_plan_of_70000_id_row_follows_total_ids_not_longest_row(kind):
    rows, long = 256, 70_000
    inp, w = long_input(kind, rows=rows, long={0: long})
    feature = je.FeatureConfig(je.TableConfig(VOCAB, DIM, combiner="mean"))
    tracemalloc.start()
    plan = lookup.plan_feature("f", inp, w, feature)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    total = int(np.asarray(inp.values).shape[0])
    slots = plan.positions.size + plan.blocks.size
    assert slots <= max(64 * rows, 4 * total)
    width = 8 if kind == "sparse" else 1
    assert plan.overflow.shape[1] == width
    assert plan.overflow.size + slots >= total
    assert np.all(plan.overflow_rows == 0)
    assert np.all(np.diff(plan.overflow.reshape(-1)) == 1)  # the row's tail, in order
    assert peak < 128 * total  # bytes (~77 measured); one [R, longest] int32 array is 72 MB


def test_preprocess_pads_overflow_to_a_bucket_and_drops_it_when_there_is_none():
    table = je.TableConfig(VOCAB, DIM, combiner="sum", name="t")
    emb = je.Embedding({"f": je.FeatureConfig(table)})
    inp, _ = long_input("ragged")
    (plan,) = emb.preprocess({"f": inp}).plans
    assert plan.overflow.shape == (1, 4096, 1)  # 3000 - 64 + 100 - 64 blocks, bucketed
    assert plan.positions.shape == (1, ROWS, 64)
    short, _ = long_input("ragged", long={})
    (plan,) = emb.preprocess({"f": short}).plans
    assert plan.overflow is None and plan.overflow_rows is None


# ---------------------------------------------------------------------------------------------
# Ordered additions


def _sequential(acc, rows, parts):
    acc = acc.copy()
    for r, p in zip(rows, parts, strict=True):
        if 0 <= r < acc.shape[0]:
            acc[r] = acc[r] + p
    return acc


def test_xla_cpu_scatter_adds_duplicate_rows_in_index_order_and_loop_agrees():
    rng = np.random.default_rng(0)
    scatter = jax.jit(_kernels.add_rows_in_order)
    loop = jax.jit(_kernels._loop_in_order)
    for r, d, m in [(1, 1, 1), (1, 5, 300), (7, 64, 2000), (29, 5, 2000), (29, 1, 40)] * 3:
        acc = (rng.normal(size=(r, d)) * 10 ** rng.uniform(-3, 3, (r, 1))).astype(np.float32)
        parts = (rng.normal(size=(m, d)) * 10 ** rng.uniform(-3, 3, (m, 1))).astype(np.float32)
        rows = np.sort(rng.integers(0, r + 1, m)).astype(np.int32)  # r: padding, dropped
        want = _sequential(acc, rows, parts)
        if m >= 300:  # the order shows in the bits
            assert not np.array_equal(_sequential(acc, rows[::-1], parts[::-1]), want)
        np.testing.assert_array_equal(np.asarray(scatter(acc, rows, parts)), want)
        np.testing.assert_array_equal(np.asarray(loop(acc, rows, parts)), want)


@pytest.mark.parametrize("kind", ["ragged_weighted", "sparse_weighted"])
def test_a_single_weighted_overflow_entry_keeps_its_product_rounded(kind, kernels):
    # One row one entry past the cap: one overflow block. XLA:CPU would turn its one-update
    # scatter into a dynamic-update-slice and contract acc + w * e into an FMA.
    for seed in range(12):
        inp, w = long_input(kind, seed=seed, long={5: lookup.MIN_ROW_SLOTS + 1})
        table = je.TableConfig(VOCAB, DIM, combiner="sum", name="t")
        features, tables = {"f": je.FeatureConfig(table)}, {table: _table(seed)}
        plan = lookup.plan_feature("f", inp, w, features["f"])
        assert plan.overflow.shape[0] == 1
        args = {"f": inp}, {"f": w}, tables, features
        _assert_bits(je.embedding_lookup(*args), tf_lookup(*args), f"seed {seed}")


# ---------------------------------------------------------------------------------------------
# TF parity


@pytest.mark.parametrize("combiner", COMBINERS)
@pytest.mark.parametrize("kind", KINDS)
def test_long_row_lookup_matches_tf_and_uncapped(kind, combiner, kernels):
    features, tables, inputs, weights = _case(kind, combiner)
    plan = lookup.plan_feature(
        "f", inputs["f"], None if weights is None else weights["f"], features["f"]
    )
    assert plan.has_overflow
    got = je.embedding_lookup(inputs, weights, tables, features)
    want = tf_lookup(inputs, weights, tables, features)
    assert_matches_tf(got, want, inputs, weights, tables, features)
    with uncapped():
        _assert_bits(got, je.embedding_lookup(inputs, weights, tables, features), "uncapped")

    emb = je.Embedding(features, jeo.SGD(0.1))
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess(inputs, weights)
    assert batch.plans[0].overflow is not None
    _assert_bits(jax.jit(emb.lookup)(state, batch), got, "Embedding.lookup")


@pytest.mark.parametrize("kind", KINDS)
def test_long_row_lookup_on_8_device_mesh_equals_one_device(kind):
    features, tables, inputs, weights = _case(kind, "mean")
    emb = je.Embedding(
        features, jeo.SGD(0.1), mesh=jax.make_mesh((8,), ("x",)), sharding={"t": "row"}
    )
    batch = emb.preprocess(inputs, weights)
    got = jax.jit(emb.lookup)(emb.init(jax.random.key(0)), batch)
    _assert_bits(got, je.embedding_lookup(inputs, weights, tables, features), "mesh")


@pytest.mark.filterwarnings("ignore:max_sequence_length")
@pytest.mark.parametrize("seed", range(24))
def test_random_cases_with_tiny_caps_match_tf_and_uncapped(seed):
    case = make_case(seed + 1000)
    args = case.inputs, case.weights, case.tables, case.feature_config
    with _kernels.use_kernels(seed % 2 == 0), caps(1, per_mean=1, share=2):
        got = je.embedding_lookup(*args)
    assert_matches_tf(got, tf_lookup(*args), *args)
    with uncapped():
        _assert_bits(got, je.embedding_lookup(*args), "uncapped")


# ---------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("kind", KINDS)
def test_grad_and_jvp_of_lookup_with_long_row_equal_uncapped(kind, kernels):
    features, tables, inputs, weights = _case(kind, "sqrtn")
    (table,) = tables
    g = np.random.default_rng(0).normal(size=(ROWS, DIM)).astype(np.float32)

    def loss(values):
        return jnp.sum(je.embedding_lookup(inputs, weights, {table: values}, features)["f"] * g)

    tangent = np.broadcast_to(g[:1], (VOCAB, DIM))

    def derivatives():
        return jax.grad(loss)(tables[table]), *jax.jvp(loss, (tables[table],), (tangent,))

    grad, value, slope = derivatives()
    with uncapped():
        want_grad, want_value, want_slope = derivatives()
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(value, want_value)  # the primal: bit for bit
    np.testing.assert_allclose(slope, want_slope, rtol=2e-4)  # tangents sum in another order


def _train_case(seed: int = 3):
    ta = je.TableConfig(VOCAB, DIM, combiner="mean", name="ta", initializer=_init(_table(1)))
    tb = je.TableConfig(VOCAB, DIM, combiner="sqrtn", name="tb", initializer=_init(_table(2)))
    features = {"r": je.FeatureConfig(ta), "s": je.FeatureConfig(tb)}
    r, rw = long_input("ragged_weighted", seed=seed, long={5: 2000, 20: 90})
    s, _ = long_input("sparse", seed=seed + 1, long={13: 1500, 30: 200})
    rng = np.random.default_rng(seed)
    grads = [
        {k: rng.normal(size=(ROWS, DIM)).astype(np.float32) for k in features} for _ in range(2)
    ]
    return features, {"r": r, "s": s}, {"r": rw, "s": None}, grads


def _train(features, inputs, weights, grads, optimizer, mesh=None, sharding=None):
    emb = je.Embedding(features, optimizer, mesh=mesh, sharding=sharding)
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess(inputs, weights)
    step = jax.jit(emb.apply_gradients)
    for g in grads:
        state = step(state, batch, g)
    tables = {t.name: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
    return batch, tables, jax.tree.map(np.asarray, emb.logical_slots(state))


OPTIMIZERS = {"sgd": lambda: jeo.SGD(0.1), "adagrad": lambda: jeo.Adagrad(0.1)}
MESHES = {
    "one_device": {},
    "mesh8_row_and_replicated": {"sharding": {"ta": "row", "tb": "replicated"}},
}


@pytest.mark.parametrize("where", list(MESHES))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_apply_gradients_with_long_rows_matches_reference_and_uncapped(opt, where):
    features, inputs, weights, grads = _train_case()
    kw = dict(MESHES[where])
    if where != "one_device":
        kw["mesh"] = jax.make_mesh((8,), ("x",))
    batch, tables, slots = _train(features, inputs, weights, grads, OPTIMIZERS[opt](), **kw)
    assert all(p.overflow is not None for p in batch.plans)
    with uncapped():
        _, plain_tables, plain_slots = _train(
            features, inputs, weights, grads, OPTIMIZERS[opt](), **kw
        )
    init = {t.name: t.initializer(None, (VOCAB, DIM)) for t in ref.table_order(features)}
    trainer = ref.ReferenceTrainer(
        features,
        OPTIMIZERS[opt](),
        {t: np.asarray(init[t.name]) for t in ref.table_order(features)},
    )
    for g in grads:
        trainer.apply(inputs, weights, g)
    for t in ref.table_order(features):
        np.testing.assert_allclose(tables[t.name], plain_tables[t.name], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(tables[t.name], trainer.tables[t], rtol=1e-4, atol=1e-6)
        assert not np.array_equal(tables[t.name], init[t.name])  # it trained
        for k, v in slots[t.name].items():
            np.testing.assert_allclose(v, plain_slots[t.name][k], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(v, trainer.slots[t][k], rtol=1e-4, atol=1e-6)


def _update_primitives(emb, state, batch, grads) -> str:
    return str(jax.make_jaxpr(emb.apply_gradients)(state, batch, grads))


def test_one_device_update_is_fused_without_overflow_and_unfused_with_it():
    if not _kernels.enabled():
        pytest.skip("the fused update is a CPU kernel")
    features, inputs, weights, grads = _train_case()
    emb = je.Embedding(features, jeo.Adagrad(0.1))
    state = emb.init(jax.random.key(0))
    jaxpr = _update_primitives(emb, state, emb.preprocess(inputs, weights), grads[0])
    assert "jaxembed_apply_rows" in jaxpr and "jaxembed_apply_slots" not in jaxpr
    with uncapped():
        jaxpr = _update_primitives(emb, state, emb.preprocess(inputs, weights), grads[0])
    assert "jaxembed_apply_slots" in jaxpr and "jaxembed_apply_rows" not in jaxpr


# ---------------------------------------------------------------------------------------------
# Memory, in fresh processes


def _bench(long: int, kernels: int) -> dict:
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_long_row.py")]
    argv += [f"--long={long}", f"--kernels={kernels}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(done.stdout)
    assert "error" not in result["base"] and "error" not in result["long"], result
    return result


@pytest.mark.parametrize("kernels", [1, 0], ids=["kernels", "pure_jax"])
def test_20000_id_example_costs_under_100_mb_over_the_batch_without_it(kernels):
    result = _bench(20_000, kernels)
    assert result["long"]["ids"] - result["base"]["ids"] > 19_000
    assert result["growth_mb"]["peak_rss_mb"] < 100, result
    # Host arrays (tracemalloc) and the Batch's device arrays: a few MB, not [R, longest row].
    assert result["growth_mb"]["host_peak_mb"] < 10, result
    assert result["growth_mb"]["batch_mb"] < 5, result


def test_70000_id_example_runs_with_memory_following_the_ids():
    result = _bench(70_000, 1)
    assert result["growth_mb"]["batch_mb"] < 10, result
    assert result["growth_mb"]["peak_rss_mb"] < 250, result
