"""``Embedding`` with a mesh: 8 simulated CPU devices (conftest), shard_map lookup and update.

* Parity with ``mesh=None``: one feature config covers every input kind (dense ``[B]`` and
  ``[B, k]``, sparse rank 2 and 3, ragged, weighted and not, the three combiners, sparse and
  ragged sequence features), tables shared by several features, duplicate ids within and across
  examples and devices, and a table whose ids sit on a few devices only (and, on one device, on
  a single owner shard). Each table has its own optimizer (``TableConfig.optimizer``), so one
  run per strategy (all ``"row"``, all ``"replicated"``, a mix) checks all seven optimizers:
  activations bit for bit before training, close after each step; tables and slots (logical
  order) close after three jitted ``apply_gradients`` steps.
* Placement: a row-sharded table really is split over the 8 devices, row ``r`` on shard
  ``r mod 8``.
* ``ShardingPlan``: the default rule, printing, overrides and every error.
* A jitted train step (lookup, loss and ``apply_gradients`` in one ``jax.jit``) compiles once
  per bucket.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as npref
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxembed as je

jeo = je.optimizers
N = 8  # devices on the mesh axis
B = 32  # batch size: 4 examples per device
PER = B // N
KEY = jax.random.key(7)
STEPS = 5


@functools.cache
def _mesh() -> jax.sharding.Mesh:
    assert len(jax.devices()) >= N, "conftest should give JAX 8 CPU devices"
    return jax.make_mesh((N,), ("x",))


@contextlib.contextmanager
def compilations():
    """Collects the names of the functions XLA compiles inside the block."""
    names: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            name = str(kwargs.get("fun_name"))
            names.append(name[4:-1] if name.startswith("jit(") else name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# ---------------------------------------------------------------------------------------------
# The parity scenario: seven tables, one per optimizer, each read by two to four features.

# name: (vocabulary_size, dim, combiner, optimizer). 61 and 50 rows leave 3 and 6 physical
# padding rows; "adagrad_momentum" has 9 rows (2 per shard, 7 of them padding); 40 divides
# evenly. Tables share shapes so that the eager reshapes of init/embedding_tables compile
# fewer times.
TABLES = {
    "sgd": (61, 4, "mean", jeo.SGD(0.1)),
    "adagrad": (40, 3, "sqrtn", jeo.Adagrad(0.1)),
    "adagrad_momentum": (9, 2, "sum", jeo.AdagradMomentum(0.1, momentum=0.9, use_nesterov=True)),
    "adam": (50, 2, "mean", jeo.Adam(0.1)),
    "adam_dense": (61, 4, "sqrtn", jeo.Adam(0.05, lazy_adam=False)),
    "ftrl": (40, 3, "sum", jeo.FTRL(0.1)),
    "optax_adam": (61, 4, "mean", jeo.from_optax(optax.adam(0.01))),
}
# Tables and slots after training: float32 gradient sums in a different order (per device,
# then across devices), so not bit for bit.
RTOL, ATOL = 1e-5, 1e-6

STRATEGIES = {
    "row": {name: "row" for name in TABLES},
    "replicated": {name: "replicated" for name in TABLES},
    "mixed": {name: ("row", "replicated")[i % 2] for i, name in enumerate(TABLES)},
    "column": {name: "column" for name in TABLES},  # dims 2, 3, 4 over 8 devices: padded blocks
    # Every strategy at once (tables of one strategy and dim share no optimizer: not stacked).
    "all": {name: ("row", "table", "column", "replicated")[i % 4] for i, name in enumerate(TABLES)},
    # The same on a (2, 4) ("data", "model") mesh, tables over both axes or over "model" only
    # (replicated over "data"): column blocks of dims 2, 3, 4 over 8 and over 4 devices.
    "2d_all": {
        name: ("row", "table", "column", "replicated")[i % 4] for i, name in enumerate(TABLES)
    },
    "2d_model_all": {
        name: ("column", "replicated", "row", "table")[i % 4] for i, name in enumerate(TABLES)
    },
    "2d_model_row": {name: "row" for name in TABLES},
}


@functools.cache
def _mesh_2d() -> jax.sharding.Mesh:
    return jax.make_mesh((2, 4), ("data", "model"))


def _mesh_of(run: str) -> tuple[jax.sharding.Mesh, tuple[str, ...] | None]:
    """The mesh and table_axes of a run."""
    if run.startswith("2d_model"):
        return _mesh_2d(), ("model",)
    if run.startswith("2d"):
        return _mesh_2d(), None
    return _mesh(), None


@functools.cache
def feature_config() -> dict:
    t = {
        name: je.TableConfig(v, d, combiner=c, name=name, optimizer=opt)
        for name, (v, d, c, opt) in TABLES.items()
    }
    F = je.FeatureConfig
    return {
        "dense": (F(t["sgd"]), F(t["adagrad"]), F(t["ftrl"])),  # [B], [B, 3], [B]
        "sparse": {
            "w_mean": F(t["sgd"]),  # weighted rank 2; negative ids and weights <= 0 pruned
            "u_sqrtn": F(t["adagrad"]),  # unweighted rank 2; rows of 9, 12 and 16 entries
            "r3_sum": F(t["adagrad_momentum"]),  # unweighted rank 3
            "r3_w_sqrtn": F(t["adam_dense"]),  # weighted rank 3; a pruned entry
            "w_sum": F(t["ftrl"]),  # weighted, sum: weights <= 0 kept, a negative id pruned
            "u_mean": F(t["optax_adam"]),  # unweighted rank 2
        },
        "ragged": {
            "u_mean_long": F(t["sgd"]),  # a 40-entry row, empty rows
            "w_sum": F(t["adagrad_momentum"]),  # zero and negative weights
            "w_sqrtn": F(t["adam_dense"]),
            "u_mean": F(t["optax_adam"]),
        },
        "seq": {
            "sparse": F(t["adagrad"], max_sequence_length=3),  # columns >= 3 dropped
            "ragged": F(t["adam_dense"], max_sequence_length=4),  # rows up to 7 long
            "ragged2": F(t["optax_adam"], max_sequence_length=2),
        },
        # The only features of table "adam": ids on devices 0, 1 and 7 only; device 0 asks
        # shard 0 for everything (ids are multiples of 8).
        "uneven": {"head": F(t["adam"]), "tail": F(t["adam"])},
    }


def _pool(rng: np.random.Generator, vocab: int, k: int) -> np.ndarray:
    """A small pool of ids (with 0 and vocab - 1): draws from it repeat within and across
    examples and devices."""
    return np.unique(np.r_[0, vocab - 1, rng.choice(vocab, size=k)])


def _sparse(rows: list[list], width: int, lead: tuple[int, ...] | None = None, cols=None):
    """(indices, values, dense_shape) of rows given as lists; ``cols`` (same layout) sets the
    column of each entry, else entries sit at columns 0, 1, ..."""
    lead = lead or (len(rows),)
    idx = [
        [*np.unravel_index(r, lead), cols[r][c] if cols is not None else c]
        for r, row in enumerate(rows)
        for c in range(len(row))
    ]
    idx = np.asarray(idx, np.int64).reshape(-1, len(lead) + 1)
    values = np.asarray([v for row in rows for v in row])
    return idx, values, [*lead, width]


def _ragged(rows: list[list], dtype=np.int64) -> je.Ragged:
    values = np.asarray([v for row in rows for v in row], dtype)
    return je.Ragged.from_row_lengths(values, [len(r) for r in rows])


def _residue_permutation(rng: np.random.Generator, vocab: int) -> np.ndarray:
    """A permutation of [0, vocab) that keeps every id's residue mod 8 (its owner shard)."""
    perm = np.arange(vocab)
    for c in range(N):
        cls = np.arange(c, vocab, N)
        perm[cls] = rng.permutation(cls)
    return perm


def rich_batch(step: int) -> tuple[dict, dict]:
    """``(inputs, weights)`` for ``feature_config()`` (batch 32).

    Step 0 is drawn from a fixed seed. Later steps map every table's ids through a permutation
    that keeps each id's owner shard and scale every weight by a positive factor: other rows
    and values, but the same layout, distinct-id counts and pruning, so every step has the same
    static shapes (one compilation per program)."""
    fixed = np.random.default_rng(1234)  # layout and the step-0 ids and weights
    vary = np.random.default_rng(100 + step)  # this step's permutations and weight factors
    perms = {
        name: _residue_permutation(vary, v) if step else np.arange(v)
        for name, (v, *_) in TABLES.items()
    }
    pools = {name: _pool(fixed, v, 7) for name, (v, *_) in TABLES.items()}

    def pick(table: str, size) -> np.ndarray:
        return perms[table][fixed.choice(pools[table], size=size)]

    def ids(table: str, n: int) -> list[int]:
        return [int(i) for i in pick(table, n)]

    def weights(n: int, low: float, high: float) -> list[float]:
        factor = vary.uniform(0.5, 1.5, n) if step else np.ones(n)
        return [float(w) for w in fixed.uniform(low, high, n) * factor]

    def positive(n: int) -> list[float]:
        return weights(n, 0.25, 2.0)

    # dense
    dense = (
        pick("sgd", B).astype(np.int32),
        pick("adagrad", (B, 3)).astype(np.int64),
        pick("ftrl", B).astype(np.int32),
    )

    # sparse rank 2, weighted, mean (safe path): + a negative id, a zero and a negative weight
    lens = fixed.integers(0, 5, B)
    rows = [ids("sgd", int(n)) for n in lens]
    wrows = [positive(len(r)) for r in rows]
    for r, (i, w) in zip((3, 9, 17, 30), ((-1, 1.0), (5, 0.0), (7, -0.5), (-4, 0.3)), strict=True):
        rows[r].append(i)
        wrows[r].append(w)
    idx, vals, shape = _sparse(rows, 8)
    w_mean = je.Sparse(idx, vals, shape)
    w_mean_w = je.Sparse(idx, np.asarray([w for r in wrows for w in r], np.float32), shape)

    # sparse rank 2, unweighted, sqrtn: rows of 9, 12 and 16 entries (TF's block order)
    lens = fixed.integers(1, 6, B)
    lens[[2, 13, 22]] = (9, 12, 16)
    u_sqrtn = je.Sparse(*_sparse([ids("adagrad", int(n)) for n in lens], 16))

    # sparse rank 3 [B, 2, 3], unweighted, sum
    lens = fixed.integers(0, 4, 2 * B)
    r3_sum = je.Sparse(*_sparse([ids("adagrad_momentum", int(n)) for n in lens], 3, (B, 2)))

    # sparse rank 3 [B, 2, 4], weighted, sqrtn; rank 3 is always safe: a weight < 0 is pruned
    lens = fixed.integers(1, 5, 2 * B)
    rows = [ids("adam_dense", int(n)) for n in lens]
    wrows = [positive(len(r)) for r in rows]
    wrows[11][0] = -1.0
    idx, vals, shape = _sparse(rows, 4, (B, 2))
    r3_w = je.Sparse(idx, vals, shape)
    r3_w_w = je.Sparse(idx, np.asarray([w for r in wrows for w in r], np.float32), shape)

    # sparse rank 2, weighted, sum: weights in [-1, 2) are all kept; a negative id is pruned
    lens = fixed.integers(1, 4, B)
    rows = [ids("ftrl", int(n)) for n in lens]
    wrows = [weights(len(r), -1.0, 2.0) for r in rows]
    wrows[6][0] = 0.0
    rows[20].append(-2)
    wrows[20].append(1.0)
    idx, vals, shape = _sparse(rows, 4)
    w_sum = je.Sparse(idx, vals, shape)
    w_sum_w = je.Sparse(idx, np.asarray([w for r in wrows for w in r], np.float32), shape)

    # sparse rank 2, unweighted, mean
    lens = fixed.integers(1, 4, B)
    u_mean_sp = je.Sparse(*_sparse([ids("optax_adam", int(n)) for n in lens], 3))

    # ragged, unweighted, mean: empty rows and one 40-entry row
    lens = fixed.integers(0, 5, B)
    lens[[0, 27]] = 0
    lens[5] = 40
    u_mean_long = _ragged([ids("sgd", int(n)) for n in lens])

    # ragged, weighted, sum: zero and negative weights
    lens = fixed.integers(1, 4, B)
    rows = [ids("adagrad_momentum", int(n)) for n in lens]
    wrows = [weights(len(r), -1.0, 2.0) for r in rows]
    wrows[1][0] = wrows[26][0] = 0.0
    rg_w_sum, rg_w_sum_w = _ragged(rows), _ragged(wrows, np.float32)

    # ragged, weighted, sqrtn
    lens = fixed.integers(1, 5, B)
    rows = [ids("adam_dense", int(n)) for n in lens]
    rg_w_sqrtn, rg_w_sqrtn_w = _ragged(rows), _ragged([positive(len(r)) for r in rows], np.float32)

    # ragged, unweighted, mean
    lens = fixed.integers(1, 4, B)
    rg_u_mean = _ragged([ids("optax_adam", int(n)) for n in lens])

    # sparse sequence (L = 3) [B, 6]: columns are a sorted random subset, some >= 3
    cols = [
        sorted(fixed.choice(6, size=int(fixed.integers(1, 5)), replace=False)) for _ in range(B)
    ]
    seq_sparse = je.Sparse(*_sparse([ids("adagrad", len(c)) for c in cols], 6, cols=cols))

    # ragged sequences (L = 4 and L = 2), rows longer and shorter than L, empty rows
    lens = fixed.integers(0, 8, B)
    seq_ragged = _ragged([ids("adam_dense", int(n)) for n in lens])
    lens = fixed.integers(0, 4, B)
    seq_ragged2 = _ragged([ids("optax_adam", int(n)) for n in lens])

    # uneven: "head" has ids only in examples 0..7 (devices 0, 1), device 0's all multiples of
    # 8 (owned by shard 0); "tail" only in examples 28..31 (device 7). Devices 2..6 ask table
    # "adam" for nothing.
    multiples = np.arange(0, 50, 8)
    head = [
        [int(perms["adam"][i]) for i in fixed.choice(multiples, size=int(fixed.integers(2, 6)))]
        for _ in range(4)
    ]
    head += [ids("adam", int(fixed.integers(1, 5))) for _ in range(4)]
    head += [[] for _ in range(B - 2 * PER)]
    tail_rows = [[] for _ in range(B - PER)] + [
        ids("adam", int(fixed.integers(1, 4))) for _ in range(4)
    ]
    tail = je.Sparse(*_sparse(tail_rows, 4))

    inputs = {
        "dense": dense,
        "sparse": {
            "w_mean": w_mean,
            "u_sqrtn": u_sqrtn,
            "r3_sum": r3_sum,
            "r3_w_sqrtn": r3_w,
            "w_sum": w_sum,
            "u_mean": u_mean_sp,
        },
        "ragged": {
            "u_mean_long": u_mean_long,
            "w_sum": rg_w_sum,
            "w_sqrtn": rg_w_sqrtn,
            "u_mean": rg_u_mean,
        },
        "seq": {"sparse": seq_sparse, "ragged": seq_ragged, "ragged2": seq_ragged2},
        "uneven": {"head": _ragged(head), "tail": tail},
    }
    weights = {
        "dense": (None, None, None),
        "sparse": {
            "w_mean": w_mean_w,
            "u_sqrtn": None,
            "r3_sum": None,
            "r3_w_sqrtn": r3_w_w,
            "w_sum": w_sum_w,
            "u_mean": None,
        },
        "ragged": {
            "u_mean_long": None,
            "w_sum": rg_w_sum_w,
            "w_sqrtn": rg_w_sqrtn_w,
            "u_mean": None,
        },
        "seq": {"sparse": None, "ragged": None, "ragged2": None},
        "uneven": {"head": None, "tail": None},
    }
    return inputs, weights


def _flat(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


@functools.cache
def scenario() -> tuple[list, list]:
    """The batches of the three steps and the random dL/d(activations) of each step (nested
    like the inputs, shaped like the activations by TF's shape rules)."""
    batches = [rich_batch(step) for step in range(STEPS)]
    rng = np.random.default_rng(500)
    grads = [npref.random_grads(rng, inputs, feature_config()) for inputs, _ in batches]
    return batches, grads


class Run:
    """Trains one ``Embedding`` through the scenario; keeps everything as numpy."""

    def __init__(self, emb: je.Embedding):
        self.emb = emb
        batches, grads = scenario()
        state = emb.init(KEY)
        self.init_tables = {t.name: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
        lookup, apply = jax.jit(emb.lookup), jax.jit(emb.apply_gradients)
        self.acts = []  # before step 0, 1, 2, and after the last step (batch 0 again)
        self.batches = [emb.preprocess(*b) for b in batches]
        with compilations() as compiled:
            for batch, g in zip(self.batches, grads, strict=True):
                self.acts.append(_flat(lookup(state, batch)))
                state = apply(state, batch, g)
            self.acts.append(_flat(lookup(state, self.batches[0])))
        self.compiled = [n for n in compiled if n in ("lookup", "apply_gradients")]
        self.state = state
        self.step = int(state.step)
        self.tables = {t.name: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
        self.slots = {
            t.name: {k: np.asarray(v) for k, v in s.items()}
            for t, s in emb.slot_variables(state).items()
        }


@functools.cache
def reference_run() -> Run:
    return Run(je.Embedding(feature_config()))


@functools.cache
def sharded_run(strategy: str) -> Run:
    mesh, table_axes = _mesh_of(strategy)
    return Run(
        je.Embedding(
            feature_config(), mesh=mesh, sharding=STRATEGIES[strategy], table_axes=table_axes
        )
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_scenario_plan_uses_the_forced_strategies(strategy):
    emb = sharded_run(strategy).emb
    mesh, table_axes = _mesh_of(strategy)
    shards = 4 if table_axes == ("model",) else N
    assert emb.plan.num_devices == N and emb.plan.num_shards == shards
    assert emb.plan.batch_axes == mesh.axis_names
    for name, (vocab, dim, *_) in TABLES.items():
        placement = emb.plan[name]
        assert placement.strategy == STRATEGIES[strategy][name]
        assert (placement.vocabulary_size, placement.dim) == (vocab, dim)
        rows = {"row": math.ceil(vocab / shards), "table": vocab}.get(placement.strategy, vocab)
        cols = math.ceil(dim / shards) if placement.strategy == "column" else dim
        assert (placement.rows_per_shard, placement.cols_per_shard) == (rows, cols)
        # Every device holds exactly its shard of the table: rows (or columns) of its own.
        array = sharded_run(strategy).state.tables[emb.plan.layout(name).name]
        for shard in array.addressable_shards:
            assert shard.data.shape == (rows, cols)


def _ids_per_device(inputs: dict) -> dict[str, list[set[int]]]:
    """``{table: [ids device d looks up, for d in 0..7]}`` (non-negative ids; host side)."""
    leaves = jax.tree.leaves(inputs, is_leaf=lambda x: isinstance(x, (je.Sparse, je.Ragged)))
    features = jax.tree.leaves(feature_config())  # same structure, same order
    out = {name: [set() for _ in range(N)] for name in TABLES}
    for feature, inp in zip(features, leaves, strict=True):
        if isinstance(inp, je.Sparse):
            examples, ids = np.asarray(inp.indices)[:, 0], np.asarray(inp.values)
        elif isinstance(inp, je.Ragged):
            ids = np.asarray(inp.values)
            examples = np.repeat(np.arange(inp.nrows), np.diff(np.asarray(inp.row_splits)))
        else:
            ids = np.asarray(inp).reshape(B, -1)
            examples, ids = np.repeat(np.arange(B), ids.shape[1]), ids.reshape(-1)
        for e, i in zip(examples, ids, strict=True):
            assert i < feature.table.vocabulary_size
            if i >= 0:
                out[feature.table.name][e // PER].add(int(i))
    return out


def test_scenario_covers_duplicates_and_uneven_devices():
    """The batches really have the properties the scenario claims."""
    for step in range(STEPS):
        inputs, _ = rich_batch(step)
        per_device = _ids_per_device(inputs)
        for name, sets in per_device.items():
            # Some id is looked up on several devices (duplicates across devices).
            assert max(sum(i in s for s in sets) for i in set().union(*sets)) >= 2, name
        adam = per_device["adam"]
        assert not any(adam[2:7])  # devices 2..6 look up nothing in table "adam"
        assert adam[0] and all(i % N == 0 for i in adam[0])  # device 0: shard 0's rows only
        assert adam[1] and adam[7]
    # Duplicates within one example (12 draws from a pool of at most 9 ids) and across
    # examples (32 dense ids from the same pool).
    inputs, _ = rich_batch(0)
    u_sqrtn = inputs["sparse"]["u_sqrtn"]
    row13 = np.asarray(u_sqrtn.values)[np.asarray(u_sqrtn.indices)[:, 0] == 13]
    assert len(row13) == 12 and len(np.unique(row13)) < 12
    assert len(np.unique(inputs["dense"][0])) < B


@pytest.mark.parametrize("strategy", [None, *STRATEGIES])
def test_scenario_steps_differ_but_compile_once(strategy):
    run = reference_run() if strategy is None else sharded_run(strategy)
    assert sorted(run.compiled) == ["apply_gradients", "lookup"]
    first, *others = run.batches
    shapes = [np.shape(x) for x in jax.tree.leaves(first)]
    for batch in others:
        assert [np.shape(x) for x in jax.tree.leaves(batch)] == shapes
        assert any(
            not np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(batch), strict=True)
        )
    steps = [rich_batch(s)[0]["ragged"]["u_mean_long"].values for s in range(STEPS)]
    assert not np.array_equal(steps[0], steps[1]) and not np.array_equal(steps[1], steps[2])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_activations_equal_mesh_none_bit_for_bit_before_training(strategy):
    want, got = reference_run().acts[0], sharded_run(strategy).acts[0]
    assert set(got) == set(want)
    for path, value in want.items():
        assert got[path].shape == value.shape, path
        np.testing.assert_array_equal(got[path], value, err_msg=f"{path} ({strategy})")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_activations_close_to_mesh_none_during_training(strategy):
    plain, run = reference_run(), sharded_run(strategy)
    for step in range(1, STEPS + 1):
        for path, value in plain.acts[step].items():
            np.testing.assert_allclose(
                run.acts[step][path],
                value,
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{path} after {step} steps ({strategy})",
            )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_init_tables_equal_mesh_none(strategy):
    plain, run = reference_run(), sharded_run(strategy)
    for name, value in plain.init_tables.items():
        np.testing.assert_array_equal(run.init_tables[name], value, err_msg=name)


@pytest.mark.parametrize("optimizer", TABLES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tables_and_slots_match_mesh_none_after_training(strategy, optimizer):
    plain, run = reference_run(), sharded_run(strategy)
    assert run.step == plain.step == STEPS
    rtol, atol = RTOL, ATOL
    vocab, dim, *_ = TABLES[optimizer]
    assert run.tables[optimizer].shape == (vocab, dim)
    assert not np.array_equal(plain.tables[optimizer], plain.init_tables[optimizer])  # it trained
    np.testing.assert_allclose(
        run.tables[optimizer], plain.tables[optimizer], rtol=rtol, atol=atol, err_msg="table"
    )
    assert set(run.slots[optimizer]) == set(plain.slots[optimizer])
    if optimizer != "sgd":
        assert plain.slots[optimizer]
    for slot, value in plain.slots[optimizer].items():
        assert run.slots[optimizer][slot].shape == (vocab, dim), slot
        np.testing.assert_allclose(
            run.slots[optimizer][slot], value, rtol=rtol, atol=atol, err_msg=f"slot {slot!r}"
        )


# ---------------------------------------------------------------------------------------------
# Placement of a row-sharded table


def test_row_sharded_table_is_really_sharded():
    vocab, dim = 8203, 8  # 262496 bytes: just over the replication threshold
    rows = math.ceil(vocab / N)  # 1026; 8208 physical rows, 5 of them padding
    big = je.TableConfig(vocab, dim, combiner="sum", name="big")
    small = je.TableConfig(12, 2, name="small")
    fc = {"big": je.FeatureConfig(big), "small": je.FeatureConfig(small)}
    mesh = _mesh()
    emb = je.Embedding(fc, jeo.Adagrad(0.1, initial_accumulator_value=0.5), mesh=mesh)
    assert emb.plan["big"].strategy == "row"  # the default rule
    state = emb.init(KEY)
    plain = je.Embedding(fc, jeo.Adagrad(0.1, initial_accumulator_value=0.5))
    plain_state = plain.init(KEY)
    logical = np.asarray(plain.embedding_tables(plain_state)[big])

    for array in (state.tables["big"], state.slots["big"]["accumulators"]):
        sharding = array.sharding
        assert isinstance(sharding, NamedSharding)
        assert sharding.mesh.shape == {"x": N}
        spec = tuple(sharding.spec) + (None,) * (array.ndim - len(sharding.spec))
        assert spec == ("x", None), sharding.spec
        assert sharding.is_equivalent_to(NamedSharding(mesh, P("x", None)), array.ndim)
        assert array.shape == (N * rows, dim)
        shards = array.addressable_shards
        assert len(shards) == N
        assert {s.device for s in shards} == set(mesh.devices.flat)
        for s in shards:
            assert s.data.shape == (rows, dim)  # no device holds the whole table
            assert s.data.shape[0] < vocab

    # Shard s holds logical rows s, s + 8, s + 16, ... (then zero padding rows).
    for s in state.tables["big"].addressable_shards:
        start = s.index[0].start or 0
        assert start % rows == 0
        shard = start // rows
        data = np.asarray(s.data)
        mine = np.arange(shard, vocab, N)
        np.testing.assert_array_equal(data[: len(mine)], logical[mine])
        np.testing.assert_array_equal(data[len(mine) :], 0)
        assert s.device == mesh.devices.flat[shard]

    # Logical views equal the mesh=None init.
    np.testing.assert_array_equal(np.asarray(emb.embedding_tables(state)[big]), logical)
    np.testing.assert_array_equal(
        np.asarray(emb.slot_variables(state)[big]["accumulators"]), np.full((vocab, dim), 0.5)
    )
    # The tiny table is replicated: every device holds all of it.
    assert emb.plan["small"].strategy == "replicated"
    assert state.tables["small"].sharding.is_fully_replicated
    for s in state.tables["small"].addressable_shards:
        assert s.data.shape == (12, 2)
    np.testing.assert_array_equal(
        np.asarray(emb.embedding_tables(state)[small]),
        np.asarray(plain.embedding_tables(plain_state)[small]),
    )


def test_embedding_tables_and_slot_variables_inside_jit():
    """The logical views are pure functions of the state, so they also work under ``jax.jit``
    (e.g. in a jitted export or evaluation step), for row-sharded and replicated tables."""
    big = je.TableConfig(61, 4, name="big")
    small = je.TableConfig(12, 2, name="small")
    fc = {"big": je.FeatureConfig(big), "small": je.FeatureConfig(small)}
    emb = je.Embedding(fc, jeo.Adagrad(0.1), mesh=_mesh(), sharding={"big": "row"})
    state = emb.init(KEY)
    want_tables, want_slots = emb.embedding_tables(state), emb.slot_variables(state)
    got_tables, got_slots = jax.jit(lambda s: (emb.embedding_tables(s), emb.slot_variables(s)))(
        state
    )
    for table in (big, small):
        np.testing.assert_array_equal(np.asarray(got_tables[table]), np.asarray(want_tables[table]))
        np.testing.assert_array_equal(
            np.asarray(got_slots[table]["accumulators"]),
            np.asarray(want_slots[table]["accumulators"]),
        )
    assert got_tables[big].shape == (61, 4)


# ---------------------------------------------------------------------------------------------
# ShardingPlan: default rule, printing, overrides, errors


def _plan_config() -> tuple[dict, dict]:
    tables = {
        "big": je.TableConfig(20_000, 4, name="big"),  # 320000 bytes: row
        "small": je.TableConfig(100, 4, name="small"),  # tiny: replicated
        "edge": je.TableConfig(16_384, 4, name="edge"),  # exactly 256 KiB: replicated
        "over": je.TableConfig(16_385, 4, name="over"),  # 16 bytes more: row
        "few": je.TableConfig(4, 20_000, name="few"),  # big but fewer rows than devices
    }
    return tables, {name: je.FeatureConfig(t) for name, t in tables.items()}


def test_default_plan_replicates_tiny_tables_and_row_shards_big_ones():
    _, fc = _plan_config()
    plan = je.Embedding(fc, mesh=_mesh()).plan
    strategies = {t.name: t.strategy for t in plan.tables}
    assert strategies == {
        "big": "row",
        "small": "replicated",
        "edge": "replicated",
        "over": "row",
        "few": "replicated",
    }
    assert [t.name for t in plan.tables] == ["big", "edge", "few", "over", "small"]  # tf.nest
    assert (plan["big"].rows_per_shard, plan["big"].physical_rows) == (2500, 20_000)
    assert (plan["over"].rows_per_shard, plan["over"].physical_rows) == (2049, 8 * 2049)
    assert (plan["small"].rows_per_shard, plan["small"].physical_rows) == (100, 100)
    assert plan["big"].bytes_per_device() == 2500 * 4 * 4
    assert plan["big"].bytes_per_device(slots=2) == 3 * 2500 * 4 * 4
    with pytest.raises(KeyError):
        plan["nope"]


def test_plan_prints_every_table_and_strategy(capsys):
    _, fc = _plan_config()
    emb = je.Embedding(fc, mesh=_mesh(), sharding={"small": "row"})
    print(emb.plan)
    out = capsys.readouterr().out
    assert re.search(r"ShardingPlan\(.*8", out.splitlines()[0]), out
    lines = out.splitlines()
    for placement in emb.plan.tables:
        line = [ln for ln in lines if re.search(rf"\b{placement.name}\b", ln)]
        assert len(line) == 1, (placement.name, out)
        assert placement.strategy in line[0]
        assert f"{placement.vocabulary_size}x{placement.dim}" in line[0]
        assert f"{placement.rows_per_shard}x{placement.dim}" in line[0]


def test_plan_overrides():
    _, fc = _plan_config()
    emb = je.Embedding(fc, mesh=_mesh(), sharding={"big": "replicated", "small": "row"})
    assert emb.plan["big"].strategy == "replicated"
    assert emb.plan["big"].rows_per_shard == 20_000
    assert emb.plan["small"].strategy == "row"
    assert emb.plan["small"].rows_per_shard == 13  # ceil(100 / 8)
    assert emb.plan["small"].physical_rows == 104
    assert emb.plan["over"].strategy == "row"  # untouched tables keep the default
    assert emb.plan["edge"].strategy == "replicated"
    # A table with exactly as many rows as devices can be row-sharded.
    t = je.TableConfig(8, 2, name="eight")
    emb = je.Embedding({"a": je.FeatureConfig(t)}, mesh=_mesh(), sharding={"eight": "row"})
    assert emb.plan["eight"].rows_per_shard == 1
    # Without a mesh the plan is the one-device plan: one shard, nothing moved.
    one = je.Embedding(fc).plan
    assert one.num_devices == one.num_shards == 1
    assert all(t.rows_per_shard == t.vocabulary_size for t in one.tables)


def _fc_one(vocab: int = 64, dim: int = 4, **feature_kwargs) -> dict:
    table = je.TableConfig(vocab, dim, combiner="sum", name="items")
    return {"items": je.FeatureConfig(table, **feature_kwargs)}


def test_table_axes_must_name_mesh_axes():
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    with pytest.raises(
        ValueError, match=r"table_axes=\('c',\) must name distinct axes.*\('a', 'b'\)"
    ):
        je.Embedding(_fc_one(), mesh=mesh, table_axes=("c",))
    with pytest.raises(ValueError, match=r"distinct axes"):
        je.Embedding(_fc_one(), mesh=mesh, table_axes=("a", "a"))


def test_unknown_table_in_sharding_raises():
    with pytest.raises(ValueError, match=r"\['nope'\] that do not exist.*\['items'\]"):
        je.Embedding(_fc_one(), mesh=_mesh(), sharding={"nope": "row"})


def test_unknown_strategy_raises():
    with pytest.raises(ValueError, match=r"Unknown sharding strategy 'diagonal' for table 'items'"):
        je.Embedding(_fc_one(), mesh=_mesh(), sharding={"items": "diagonal"})


def test_row_strategy_on_table_with_fewer_rows_than_devices_raises():
    with pytest.raises(ValueError, match=r"'items' has 5 rows, fewer than the 8 devices"):
        je.Embedding(_fc_one(vocab=5), mesh=_mesh(), sharding={"items": "row"})
    # The default plan replicates it instead.
    emb = je.Embedding(_fc_one(vocab=5), mesh=_mesh())
    assert emb.plan["items"].strategy == "replicated"


def test_sharding_without_mesh_is_the_one_device_plan():
    emb = je.Embedding(_fc_one(), jeo.SGD(0.1), sharding={"items": "column"})
    assert emb.plan["items"].strategy == "column" and emb.plan["items"].cols_per_shard == 4
    plain = je.Embedding(_fc_one(), jeo.SGD(0.1))
    inputs = {"items": je.Ragged.from_row_lengths(np.arange(12) % 64, [3, 0, 5, 4])}
    got = emb.lookup(emb.init(KEY), emb.preprocess(inputs))["items"]
    want = plain.lookup(plain.init(KEY), plain.preprocess(inputs))["items"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("batch", [12, 4, 20])
def test_batch_not_divisible_by_devices_raises(batch):
    emb = je.Embedding(_fc_one(), jeo.SGD(0.1), mesh=_mesh())
    ids = np.arange(batch) % 64
    with pytest.raises(ValueError, match=rf"size {batch} is not divisible by the 8 devices"):
        emb.preprocess({"items": ids})
    with pytest.raises(ValueError, match=rf"size {batch} is not divisible by the 8 devices"):
        emb.preprocess({"items": je.Ragged.from_row_lengths(ids, np.ones(batch, np.int64))})


def test_output_shape_on_1d_and_2d_meshes_equals_one_device():
    ragged = je.Ragged.from_row_lengths(np.arange(30) % 64, np.arange(16) % 5)
    meshes = [(_mesh(), None), (_mesh_2d(), None), (_mesh_2d(), ("model",))]
    for shape in [(8, 2), (16,), (16, 3), (8, 2, 3)]:  # combined, and 3 positions per example
        plain = je.Embedding(_fc_one(output_shape=shape), jeo.Adagrad(0.1))
        batch = plain.preprocess({"items": ragged})
        want = plain.lookup(plain.init(KEY), batch)["items"]
        grads = {"items": np.random.default_rng(0).normal(size=(*shape, 4)).astype(np.float32)}
        trained = {
            t.name: v
            for t, v in plain.embedding_tables(
                plain.apply_gradients(plain.init(KEY), batch, grads)
            ).items()
        }
        for mesh, table_axes in meshes:
            emb = je.Embedding(
                _fc_one(output_shape=shape), jeo.Adagrad(0.1), mesh=mesh, table_axes=table_axes
            )
            state, batch = emb.init(KEY), emb.preprocess({"items": ragged})
            got = emb.lookup(state, batch)["items"]
            assert got.shape == (*shape, 4)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(shape))
            for table, value in emb.embedding_tables(
                emb.apply_gradients(state, batch, grads)
            ).items():
                np.testing.assert_allclose(
                    np.asarray(value), np.asarray(trained[table.name]), rtol=1e-5, atol=1e-6
                )


def test_output_shape_not_divisible_by_devices_raises():
    emb = je.Embedding(_fc_one(output_shape=(4, 4)), jeo.SGD(0.1), mesh=_mesh())
    ragged = je.Ragged.from_row_lengths(np.arange(16) % 64, np.ones(16, np.int64))
    with pytest.raises(ValueError, match=r"output_shape \(4, 4\) of feature 'items'.*8 devices"):
        emb.preprocess({"items": ragged})


def test_inputs_with_different_batch_sizes_equal_one_device():
    table = je.TableConfig(64, 4, name="items")
    fc = {"a": je.FeatureConfig(table), "b": je.FeatureConfig(table)}
    emb, plain = je.Embedding(fc, mesh=_mesh()), je.Embedding(fc)
    inputs = {"a": np.arange(16), "b": np.arange(8)}
    got = emb.lookup(emb.init(KEY), emb.preprocess(inputs))
    want = plain.lookup(plain.init(KEY), plain.preprocess(inputs))
    for path in inputs:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]))


# ---------------------------------------------------------------------------------------------
# A jitted train step with a mesh: one compilation per bucket


def _train_batch(rng: np.random.Generator, distinct: int, max_len: int, batch: int = 16):
    """Ragged ids of ``batch`` rows (longest ``max_len``) from ``distinct`` ids in [0, 64)."""
    lengths = rng.integers(1, max_len + 1, batch)
    lengths[rng.integers(batch)] = max_len
    pool = rng.choice(64, size=distinct, replace=False)
    ids = np.r_[pool, rng.choice(pool, size=max(0, int(lengths.sum()) - distinct))]
    ids = ids[: int(lengths.sum())]
    rng.shuffle(ids)
    return {
        "items": je.Ragged.from_row_lengths(ids, lengths),
        "cand": rng.choice(pool, size=batch),
    }


def _signature(emb, inputs):
    leaves, treedef = jax.tree_util.tree_flatten(emb.preprocess(inputs))
    return treedef, tuple(np.shape(x) for x in leaves)


def test_jitted_train_step_with_mesh_does_not_recompile_within_a_bucket():
    items = je.TableConfig(64, 4, combiner="mean", name="items")
    tags = je.TableConfig(16, 2, combiner="sum", name="tags")
    fc = {
        "items": je.FeatureConfig(items),
        "cand": je.FeatureConfig(items),
        "tags": je.FeatureConfig(tags),
    }
    opt = jeo.Adagrad(0.1)
    emb = je.Embedding(fc, opt, mesh=_mesh(), sharding={"items": "row", "tags": "replicated"})
    plain = je.Embedding(fc, opt)

    def make_step(emb, traces, name):
        def train_step(state, batch):
            traces.append(1)
            acts = emb.lookup(state, batch)

            def loss_fn(acts):
                x = jnp.concatenate([acts["items"] * acts["cand"], acts["tags"]], axis=-1)
                return jnp.sum((x.sum(-1) - 1.0) ** 2)

            loss, grads = jax.value_and_grad(loss_fn)(acts)
            return emb.apply_gradients(state, batch, grads), loss

        train_step.__name__ = name
        return jax.jit(train_step)

    traces, plain_traces = [], []
    step = make_step(emb, traces, "sharded_train_step")
    plain_step = make_step(plain, plain_traces, "plain_train_step")
    rng = np.random.default_rng(0)

    def with_tags(inputs):
        inputs["tags"] = rng.integers(0, 16, 16)
        return inputs

    # Draw two different batches whose preprocessed shapes are equal (same bucket), with and
    # without the mesh.
    first = with_tags(_train_batch(rng, 20, 5))
    want = _signature(emb, first), _signature(plain, first)
    second = None
    for _ in range(200):
        candidate = with_tags(_train_batch(rng, int(rng.integers(17, 32)), int(rng.integers(5, 9))))
        if (_signature(emb, candidate), _signature(plain, candidate)) == want:
            second = candidate
            break
    assert second is not None, "no second batch in the same bucket"
    assert not np.array_equal(first["items"].values, second["items"].values)

    state, plain_state = emb.init(KEY), plain.init(KEY)
    with compilations() as compiled:
        for inputs in (first, second, first):
            state, loss = step(state, emb.preprocess(inputs))
            plain_state, plain_loss = plain_step(plain_state, plain.preprocess(inputs))
            assert np.isfinite(float(loss))
            np.testing.assert_allclose(float(loss), float(plain_loss), rtol=1e-5)
    assert len(traces) == len(plain_traces) == 1
    assert compiled.count("sharded_train_step") == 1
    assert compiled.count("plain_train_step") == 1
    assert int(state.step) == 3
    for table, value in plain.embedding_tables(plain_state).items():
        np.testing.assert_allclose(
            np.asarray(emb.embedding_tables(state)[table]), np.asarray(value), rtol=1e-5, atol=1e-6
        )
    # The state keeps its sharding through the step (no silent gather onto one device).
    assert state.tables["items"].sharding.is_equivalent_to(NamedSharding(_mesh(), P("x", None)), 2)
    # A batch in a bigger bucket (a much longer row) does compile again.
    with compilations() as compiled:
        state, _ = step(state, emb.preprocess(with_tags(_train_batch(rng, 20, 40))))
    assert len(traces) == 2
    assert compiled.count("sharded_train_step") == 1


@pytest.mark.parametrize("mesh", ["none", "1d", "2d"])
def test_eager_calls_compile_once_and_equal_the_jitted_step(mesh):
    """Outside ``jit``, ``lookup`` and ``apply_gradients`` compile one program each per
    Embedding and batch shapes (op by op, the ``shard_map`` compiled each of its ops again on
    every call: seconds per call): a second batch of the same shapes compiles nothing, and
    every result equals the same calls inside one jitted step."""
    meshes = {"none": None, "1d": _mesh(), "2d": _mesh_2d()}
    fc = _fc_one(output_shape=(16, 3))
    emb = je.Embedding(fc, jeo.Adagrad(0.1), mesh=meshes[mesh])
    rng = np.random.default_rng(3)

    def inputs():
        return {"items": je.Ragged.from_row_lengths(rng.integers(0, 64, 32), [2] * 16)}

    def grads_of(acts):
        return {"items": (acts["items"] * 0.5 + 0.25).astype(np.float32)}

    @jax.jit
    def jitted(state, batch):
        acts = emb.lookup(state, batch)
        return acts, emb.apply_gradients(state, batch, grads_of(acts))

    state = emb.init(KEY)
    raw = [inputs() for _ in range(3)]
    assert len({_signature(emb, r) for r in raw}) == 1  # the same shapes
    batches = [emb.preprocess(r) for r in raw]
    emb.apply_gradients(state, batches[0], grads_of(emb.lookup(state, batches[0])))
    for batch in batches[1:]:
        with compilations() as compiled:
            acts = emb.lookup(state, batch)
            new = emb.apply_gradients(state, batch, grads_of(acts))
        assert compiled == [], compiled
        want_acts, want = jitted(state, batch)
        np.testing.assert_array_equal(np.asarray(acts["items"]), np.asarray(want_acts["items"]))
        for got, expected in zip(jax.tree.leaves(new), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
        before, after = state.tables["items"], new.tables["items"]
        assert not np.array_equal(np.asarray(after), np.asarray(before))
        state = new
    # Another Embedding of the same configs compiles its own programs.
    with compilations() as compiled:
        other = je.Embedding(fc, jeo.Adagrad(0.1), mesh=meshes[mesh])
        other.lookup(state, batches[0])
    assert compiled, "a new Embedding reused another one's programs"


def test_state_sharding_is_the_same_before_and_after_a_step():
    """``init`` places the state exactly as a step returns it, so a jitted step keeps one
    dispatch-cache entry (a different spelling of the same layout, e.g. P('x') vs
    P('x', None), is a cache miss for ``jax.jit``'s fast path)."""
    table = je.TableConfig(64, 4, combiner="sum", name="items")
    tiny = je.TableConfig(12, 2, combiner="sum", name="tiny")
    fc = {"items": je.FeatureConfig(table), "tiny": je.FeatureConfig(tiny)}
    emb = je.Embedding(fc, jeo.Adagrad(0.1), mesh=_mesh(), sharding={"items": "row"})
    state = emb.init(KEY)
    batch = emb.preprocess({"items": np.arange(16) % 64, "tiny": np.arange(16) % 12})
    grads = {"items": np.ones((16, 4), np.float32), "tiny": np.ones((16, 2), np.float32)}
    apply = jax.jit(emb.apply_gradients)
    new = apply(state, batch, grads)
    for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(new), strict=True):
        assert before.sharding.is_equivalent_to(after.sharding, before.ndim)
        assert before.sharding == after.sharding, (before.sharding, after.sharding)
    apply(new, batch, grads)
    assert apply._cache_size() == 1
