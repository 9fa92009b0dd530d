"""FBGEMM's row-wise optimizers: ``RowWiseAdagrad`` and ``PartialRowWiseAdam``.

* Arguments, defaults (design.md section 3.1), validation, slot names and ``[V]`` row slots.
* Training against ``numpy_reference.apply_fbgemm_optimizer`` (FBGEMM's equations, float64, row
  by row): several jitted steps with duplicate ids within and across examples, weights, the three
  combiners and every input kind, tables and slots compared after every step, untouched rows
  bit-identical; with the CPU kernels on and off.
* Sharded on the 8-device mesh (conftest) with every strategy (``row``, ``table``, ``column``
  with padded blocks, ``replicated``) and on a ``(2, 4)`` mesh with replicas: equal to the
  reference and to one device (column blocks sum the row statistic across blocks).
* Checkpoints: saved on 8 devices, restored onto 1 and 2 (bit for bit), training continues.
* Export: TF has no such optimizer, so ``to_tf`` gives the tables without an optimizer and TF
  checkpoints carry the tables only (``load_tf_checkpoint`` starts fresh slots).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest

import jaxembed as je
from jaxembed import _kernels

jeo = je.optimizers
RTOL, ATOL = 1e-4, 1e-5  # float32 against float64 (Adam's tolerance in test_optimizers.py)

VARIANTS = {
    "rw_adagrad": jeo.RowWiseAdagrad(0.1),
    "rw_adagrad_init": jeo.RowWiseAdagrad(0.05, initial_accumulator_value=0.1, epsilon=1e-6),
    "rw_adagrad_l2": jeo.RowWiseAdagrad(0.1, weight_decay=0.05, weight_decay_mode="l2"),
    "rw_adagrad_decoupled": jeo.RowWiseAdagrad(
        0.1, weight_decay=0.05, weight_decay_mode="decoupled"
    ),
    "rw_adagrad_schedule": jeo.RowWiseAdagrad(optax.exponential_decay(0.2, 1, 0.5)),
    "pr_adam": jeo.PartialRowWiseAdam(0.05),
    "pr_adam_betas": jeo.PartialRowWiseAdam(0.02, beta_1=0.5, beta_2=0.9, epsilon=1e-6),
    "pr_adam_wd": jeo.PartialRowWiseAdam(0.05, weight_decay=0.1),
}


# ---------------------------------------------------------------------------------------------
# Arguments


def test_pinned_signatures_and_defaults():
    def params(cls):
        return {n: p.default for n, p in inspect.signature(cls).parameters.items() if n != "self"}

    assert list(params(jeo.RowWiseAdagrad))[:3] == [
        "learning_rate",
        "initial_accumulator_value",
        "epsilon",
    ]
    assert params(jeo.RowWiseAdagrad)["initial_accumulator_value"] == 0.0
    assert params(jeo.RowWiseAdagrad)["epsilon"] == 1e-8
    assert list(params(jeo.PartialRowWiseAdam))[:4] == [
        "learning_rate",
        "beta_1",
        "beta_2",
        "epsilon",
    ]
    p = params(jeo.PartialRowWiseAdam)
    assert (p["beta_1"], p["beta_2"], p["epsilon"]) == (0.9, 0.999, 1e-8)
    assert jeo.RowWiseAdagrad(0.1) == jeo.RowWiseAdagrad(learning_rate=0.1)
    assert hash(jeo.PartialRowWiseAdam(0.1)) == hash(jeo.PartialRowWiseAdam(0.1))


def test_slots_are_named_like_tf_and_row_slots_are_one_float_per_row():
    table = jnp.zeros((10, 4))
    acc = jeo.RowWiseAdagrad(0.1, initial_accumulator_value=0.25).init_slots(table)
    assert list(acc) == ["accumulators"]
    assert acc["accumulators"].shape == (10,) and acc["accumulators"].dtype == jnp.float32
    np.testing.assert_array_equal(acc["accumulators"], 0.25)
    adam = jeo.PartialRowWiseAdam(0.1).init_slots(table)
    assert list(adam) == ["momenta", "velocities"]
    assert adam["momenta"].shape == (10, 4) and adam["velocities"].shape == (10,)
    assert not np.asarray(adam["momenta"]).any() and not np.asarray(adam["velocities"]).any()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: jeo.RowWiseAdagrad("0.1"), "learning_rate"),
        (lambda: jeo.RowWiseAdagrad(float("nan")), "learning_rate"),
        (lambda: jeo.RowWiseAdagrad(0.1, initial_accumulator_value=-1.0), "initial_accumulator"),
        (lambda: jeo.RowWiseAdagrad(0.1, epsilon=-1e-8), "epsilon"),
        (lambda: jeo.RowWiseAdagrad(0.1, epsilon=0.0), "both 0"),
        (lambda: jeo.RowWiseAdagrad(0.1, weight_decay=-0.1), "weight_decay"),
        (lambda: jeo.RowWiseAdagrad(0.1, weight_decay_mode="l1"), "weight_decay_mode"),
        (lambda: jeo.PartialRowWiseAdam(-0.1), "learning_rate"),
        (lambda: jeo.PartialRowWiseAdam(0.1, beta_1=1.0), "beta_1"),
        (lambda: jeo.PartialRowWiseAdam(0.1, beta_2=-0.5), "beta_2"),
        (lambda: jeo.PartialRowWiseAdam(0.1, epsilon=0.0), "epsilon"),
        (lambda: jeo.PartialRowWiseAdam(0.1, weight_decay=float("inf")), "weight_decay"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_accumulator_starting_at_zero_with_epsilon_is_accepted():
    jeo.RowWiseAdagrad(0.1, epsilon=0.0, initial_accumulator_value=0.1)


# ---------------------------------------------------------------------------------------------
# Training on one device against the numpy reference of FBGEMM's equations


def _np_state(emb, state):
    tables = {t: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
    slots = {
        t: {k: np.asarray(v) for k, v in s.items()} for t, s in emb.slot_variables(state).items()
    }
    return tables, slots


def _assert_close(got, want, what, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


def assert_matches(emb, state, trainer, where):
    tables, slots = _np_state(emb, state)
    for table, got in tables.items():
        opt = trainer.optimizers[table]
        _assert_close(got, trainer.tables[table], f"table {table.name!r} ({opt}) {where}")
        assert list(slots[table]) == list(ref.slot_names(opt))
        for slot, value in slots[table].items():
            want = trainer.slots[table][slot]
            assert value.shape == want.shape, (slot, value.shape, want.shape)
            _assert_close(value, want, f"slot {slot!r} of {table.name!r} ({opt}) {where}")


def _run_variants(batches, seed=0):
    """Every variant on its own table (compact scenario), one jitted Embedding; returns the
    numpy history and the per-step inputs."""
    tables = {
        case: je.TableConfig(16, 4, combiner="mean", name=case, optimizer=opt)
        for case, opt in VARIANTS.items()
    }
    fc = {case: je.FeatureConfig(t) for case, t in tables.items()}
    emb = je.Embedding(fc)
    state = emb.init(jax.random.key(seed))
    history, steps = [_np_state(emb, state)], []
    apply = jax.jit(emb.apply_gradients)
    rng = np.random.default_rng(seed + 1)
    for inputs, weights in batches:
        inputs = {case: inputs["hist"] for case in tables}
        weights = {case: weights["hist"] for case in tables}
        grads = ref.random_grads(rng, inputs, fc, scale=3.0)
        state = apply(state, emb.preprocess(inputs, weights), grads)
        history.append(_np_state(emb, state))
        steps.append((inputs, weights, grads))
    return tables, fc, history, steps, apply._cache_size()


@functools.cache
def _variant_runs():
    batches = ref.compact_batches(4, seed=3)
    out = {}
    for kernels in (True, False):
        with _kernels.use_kernels(kernels):
            out[kernels] = _run_variants(batches)
    return out


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "pure_jax"])
@pytest.mark.parametrize("case", list(VARIANTS))
def test_matches_fbgemm_reference_step_by_step(case, kernels):
    tables, fc, history, steps, compilations = _variant_runs()[kernels]
    assert compilations == 1
    table = tables[case]
    t0, s0 = history[0]
    trainer = ref.ReferenceTrainer({case: fc[case]}, table.optimizer, {table: t0[table]})
    for step, (inputs, weights, grads) in enumerate(steps, 1):
        trainer.apply({case: inputs[case]}, {case: weights[case]}, {case: grads[case]})
        tables_np, slots_np = history[step]
        _assert_close(tables_np[table], trainer.tables[table], f"{case} table, step {step}")
        for slot, value in slots_np[table].items():
            want = trainer.slots[table][slot]
            assert value.shape == want.shape
            _assert_close(value, want, f"{case} slot {slot}, step {step}")
    untouched = ~trainer.ever_touched[table]
    assert untouched[ref.COMPACT_UNTOUCHED].all() and untouched.sum() < 16
    t1, s1 = history[-1]
    np.testing.assert_array_equal(t1[table][untouched], t0[table][untouched])
    for slot in s1[table]:
        np.testing.assert_array_equal(s1[table][slot][untouched], s0[table][slot][untouched])
    # The optimizer moved the touched rows.
    assert not np.allclose(t1[table][~untouched], t0[table][~untouched])


def test_kernels_on_and_off_agree():
    runs = _variant_runs()
    for (t_on, s_on), (t_off, s_off) in zip(runs[True][2], runs[False][2], strict=True):
        off = {t.name: t for t in t_off}  # TableConfigs compare by identity: match by name
        for table in t_on:
            other = off[table.name]
            _assert_close(t_on[table], t_off[other], table.name, rtol=1e-6, atol=1e-7)
            for slot in s_on[table]:
                _assert_close(s_on[table][slot], s_off[other][slot], slot, rtol=1e-6, atol=1e-7)


def test_weight_decay_modes_differ():
    """Sensitivity: the three weight decay modes give three different tables."""
    _, _, history, _, _ = _variant_runs()[True]
    tables, _ = history[-1]
    by_name = {t.name: v for t, v in tables.items()}
    for a, b in [
        ("rw_adagrad", "rw_adagrad_l2"),
        ("rw_adagrad", "rw_adagrad_decoupled"),
        ("rw_adagrad_l2", "rw_adagrad_decoupled"),
    ]:
        assert not np.allclose(by_name[a], by_name[b]), (a, b)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "pure_jax"])
def test_mixed_inputs_and_combiners_match_reference(kernels):
    """Every input kind, the three combiners, duplicates within and across features, one table
    per optimizer (and Adagrad on the third, as a control)."""
    fc = ref.scenario_feature_config(
        users_optimizer=jeo.RowWiseAdagrad(0.2, initial_accumulator_value=0.01),
        items_optimizer=jeo.PartialRowWiseAdam(0.05),
    )
    with _kernels.use_kernels(kernels):
        emb = je.Embedding(fc, jeo.Adagrad(0.1))
        state = emb.init(jax.random.key(1))
        tables, _ = _np_state(emb, state)
        trainer = ref.ReferenceTrainer(fc, jeo.Adagrad(0.1), tables)
        apply = jax.jit(emb.apply_gradients)
        rng = np.random.default_rng(5)
        for step, (inputs, weights) in enumerate(ref.scenario_batches(3, seed=2), 1):
            grads = ref.random_grads(rng, inputs, fc)
            state = apply(state, emb.preprocess(inputs, weights), grads)
            trainer.apply(inputs, weights, grads)
            assert_matches(emb, state, trainer, f"after step {step}")


# ---------------------------------------------------------------------------------------------
# The fused CPU kernels (csrc/cpu_kernels.cc, RowWiseRule) against the pure-JAX rule

KERNEL_CASES = {
    "rw_adagrad": jeo.RowWiseAdagrad(0.1, initial_accumulator_value=0.01),
    "rw_adagrad_l2": jeo.RowWiseAdagrad(0.1, weight_decay=0.3, weight_decay_mode="l2"),
    "rw_adagrad_decoupled": jeo.RowWiseAdagrad(
        optax.linear_schedule(0.2, 0.05, 3), weight_decay=0.3, weight_decay_mode="decoupled"
    ),
    "pr_adam": jeo.PartialRowWiseAdam(0.05),
    "pr_adam_wd": jeo.PartialRowWiseAdam(0.05, beta_1=0.8, beta_2=0.95, weight_decay=0.2),
}


def _pure(fn, *args):
    with _kernels.use_kernels(False):
        return jax.tree.map(np.asarray, fn(*args))


def _kernel_case(opt, seed=5):
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.normal(size=(60, 8)), jnp.float32)
    slots = {
        name: jnp.asarray(
            np.abs(rng.normal(size=(60,) if name in opt.row_slots else (60, 8))) + 0.1,
            jnp.float32,
        )
        for name in opt.slot_names
    }
    ids = np.concatenate([rng.choice(60, 25, replace=False), [60, 60, 60]]).astype(np.int32)
    grads = jnp.asarray(rng.normal(size=(len(ids), 8)), jnp.float32)
    return table, slots, ids, grads


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_matches_pure_jax_rule(name):
    opt = KERNEL_CASES[name]
    assert _kernels.enabled(), _kernels.status()
    assert opt.kernel_rule() is not None
    table, slots, ids, grads = _kernel_case(opt)

    def steps(table, slots):  # three steps: the schedule and Adam's bias corrections move
        for step in range(3):
            table, slots = jeo.apply_rows(opt, table, slots, ids, grads * (step + 1), step)
        return table, slots

    fn = jax.jit(steps)
    assert "jaxembed_apply_rows" in fn.lower(table, slots).as_text()
    got, want = jax.tree.map(np.asarray, fn(table, slots)), _pure(fn, table, slots)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        # The row's sum of squares is sequential in C++, a tree in XLA: equal to rounding.
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6, err_msg=name)
    untouched = np.setdiff1d(np.arange(60), ids)
    np.testing.assert_array_equal(got[0][untouched], np.asarray(table)[untouched])
    for slot, value in got[1].items():
        np.testing.assert_array_equal(value[untouched], np.asarray(slots[slot])[untouched])
    assert not np.array_equal(got[0][ids[:25]], np.asarray(table)[ids[:25]])


@pytest.mark.parametrize("name", ["rw_adagrad_l2", "pr_adam_wd"])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_slot_update_equals_update_with_row_gradients(name, weighted):
    opt = KERNEL_CASES[name]
    table, slots, ids, _ = _kernel_case(opt, seed=6)
    rng = np.random.default_rng(7)
    head = rng.integers(-1, len(ids) + 2, size=(11, 9)).astype(np.int32)
    blocks = rng.integers(-1, len(ids) + 2, size=(11, 1, 8)).astype(np.int32)
    hw = rng.normal(size=(11, 9)).astype(np.float32) if weighted else None
    bw = rng.normal(size=(11, 1, 8)).astype(np.float32) if weighted else None
    cot = jnp.asarray(rng.normal(size=(11, 8)), jnp.float32)
    fused = jax.jit(lambda t, s: _kernels.apply_slots(opt, t, s, ids, cot, head, hw, blocks, bw, 2))
    assert "jaxembed_apply_slots" in fused.lower(table, slots).as_text()
    grads = _kernels.slot_grads(cot, head, hw, blocks, bw, len(ids))
    unfused = jax.jit(lambda t, s: jeo.apply_rows(opt, t, s, ids, grads, 2))
    got = jax.tree.map(np.asarray, fused(table, slots))
    for want in (jax.tree.map(np.asarray, unfused(table, slots)), _pure(fused, table, slots)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "pure_jax"])
@pytest.mark.parametrize("cls", [jeo.RowWiseAdagrad, jeo.PartialRowWiseAdam])
def test_zero_argument_learning_rate_equals_the_float(cls, kernels):
    """TF's style of learning rate (``lambda: lr``, called when the step runs) gives the same
    update as the number itself, on the kernel (with Adam's extra scalars) and pure paths."""
    current = [0.05]
    table, slots, ids, grads = _kernel_case(cls(0.05))
    with _kernels.use_kernels(kernels):
        fixed = jax.jit(lambda t, s, k: jeo.apply_rows(cls(0.05), t, s, ids, grads, k))
        host = jax.jit(lambda t, s, k: jeo.apply_rows(cls(lambda: current[0]), t, s, ids, grads, k))
        want = jax.tree.map(np.asarray, fixed(table, slots, 1))
        got = jax.tree.map(np.asarray, host(table, slots, 1))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
        current[0] = 0.0  # read again when the step runs: no movement at all
        frozen = jax.tree.map(np.asarray, host(table, slots, 1))
    np.testing.assert_array_equal(frozen[0], np.asarray(table))


def _train_step(emb):
    def step(state, batch, g):
        acts = emb.lookup(state, batch)
        loss, grads = jax.value_and_grad(
            lambda a: sum(jnp.sum(jax.nn.softplus(a[f] * g[f])) for f in g)
        )(acts)
        return emb.apply_gradients(state, batch, grads), loss

    return jax.jit(step, donate_argnums=0)


@pytest.mark.parametrize("opt", [jeo.RowWiseAdagrad(0.1), jeo.PartialRowWiseAdam(0.1)])
def test_train_step_updates_table_and_row_slots_in_place(opt):
    """On CPU the step runs the fused kernel; no op copies the [V, D] table or a [V] slot."""
    vocab = 50_000
    table = je.TableConfig(vocab, 16, combiner="sum", name="t")
    emb = je.Embedding({"f": je.FeatureConfig(table)}, opt)
    state = emb.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = emb.preprocess({"f": je.Ragged.from_row_lengths(rng.integers(0, vocab, 60), [3] * 20)})
    g = {"f": jnp.ones((20, 16))}
    hlo = _train_step(emb).lower(state, batch, g).compile().as_text()
    assert "jaxembed_apply_slots" in hlo
    for shape in (f"f32[{vocab},16]", f"f32[{vocab}]"):
        opcodes = [
            m.group(2)
            for m in re.finditer(r"= (\(?[^ ]*\)?) ([\w-]+)\(", hlo)
            if shape in m.group(1)
        ]
        assert opcodes, shape
        assert set(opcodes) <= {"parameter", "custom-call", "get-tuple-element", "tuple"}, (
            shape,
            opcodes,
        )


def test_pure_path_is_what_other_platforms_lower():
    table = je.TableConfig(100, 8, combiner="mean", name="t")
    emb = je.Embedding({"f": je.FeatureConfig(table)}, jeo.PartialRowWiseAdam(0.1))
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess({"f": je.Ragged.from_row_lengths([1, 5, 7], [2, 1])})
    traced = _train_step(emb).trace(state, batch, {"f": jnp.ones((2, 8))})
    assert "jaxembed_apply" in traced.lower(lowering_platforms=("cpu",)).as_text()
    for platform in ("tpu", "cuda"):
        assert "jaxembed_" not in traced.lower(lowering_platforms=(platform,)).as_text(), platform


# ---------------------------------------------------------------------------------------------
# Sharded: every strategy on 8 devices, and a (2, 4) mesh with replicas

N = 8
BATCH = 16


def _sharded_features(optimizers):
    """Tables of dims 3, 4 and 8 (3 over 8 devices: 1-column blocks, 5 of them padding); "d"
    has "a"'s dim and optimizer, so table-wise sharding stacks them (and their [V] slots)."""
    a = je.TableConfig(37, 3, combiner="mean", name="a", optimizer=optimizers[0])
    b = je.TableConfig(29, 4, combiner="sum", name="b", optimizer=optimizers[1])
    c = je.TableConfig(20, 8, combiner="sqrtn", name="c", optimizer=optimizers[0])
    d = je.TableConfig(11, 3, combiner="sum", name="d", optimizer=optimizers[0])
    return {
        "a": je.FeatureConfig(a),
        "a_seq": je.FeatureConfig(a, max_sequence_length=3),
        "b": je.FeatureConfig(b),
        "c": je.FeatureConfig(c),
        "d": je.FeatureConfig(d),
    }


def _sharded_batch(rng):
    lengths = rng.integers(0, 6, BATCH)
    lengths[0] = 5
    n = int(lengths.sum())
    rows = np.repeat(np.arange(BATCH), lengths)
    cols = np.concatenate([np.arange(k) for k in lengths])
    a_ids = rng.integers(0, 12, n)  # few distinct ids: duplicates within and across devices
    a_ids[:3] = 4
    inputs = {
        "a": je.Ragged.from_row_lengths(a_ids, lengths),
        "a_seq": je.Sparse(np.stack([rows, cols], 1), rng.integers(0, 37, n), [BATCH, 6]),
        "b": je.Sparse(np.stack([rows, cols], 1), rng.integers(0, 29, n), [BATCH, 6]),
        "c": je.Ragged.from_row_lengths(rng.integers(0, 20, n), lengths),
        "d": rng.integers(0, 11, BATCH),
    }
    weights = {
        "a": None,
        "a_seq": None,
        "b": je.Sparse(
            np.stack([rows, cols], 1), rng.uniform(0.2, 2.0, n).astype(np.float32), [BATCH, 6]
        ),
        "c": je.Ragged.from_row_lengths(rng.uniform(0.2, 2.0, n).astype(np.float32), lengths),
        "d": None,
    }
    return inputs, weights


OPTIMIZER_PAIRS = {
    "adagrad_adam": (jeo.RowWiseAdagrad(0.1), jeo.PartialRowWiseAdam(0.05, weight_decay=0.01)),
    "adam_adagrad_l2": (
        jeo.PartialRowWiseAdam(0.05),
        jeo.RowWiseAdagrad(
            0.1, initial_accumulator_value=0.1, weight_decay_mode="l2", weight_decay=0.02
        ),
    ),
}

# (mesh shape, axis names, table_axes, strategy per table)
MESHES = {
    "row": ((N,), ("x",), None, "row"),
    "table": ((N,), ("x",), None, "table"),
    "column": ((N,), ("x",), None, "column"),
    "replicated": ((N,), ("x",), None, "replicated"),
    "2d_column_model": ((2, 4), ("data", "model"), ("model",), "column"),
    "2d_row_model": ((2, 4), ("data", "model"), ("model",), "row"),
    "2d_mixed": (
        (2, 4),
        ("data", "model"),
        None,
        {"a": "column", "b": "table", "c": "row", "d": "replicated"},
    ),
}


def _make_mesh(shape, axes):
    return jax.sharding.Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), axes)


def _sharded_emb(mesh_name, optimizers):
    fc = _sharded_features(optimizers)
    if mesh_name is None:
        return je.Embedding(fc), fc
    shape, axes, table_axes, strategy = MESHES[mesh_name]
    sharding = strategy if isinstance(strategy, dict) else dict.fromkeys("abcd", strategy)
    return je.Embedding(fc, None, _make_mesh(shape, axes), sharding, table_axes), fc


STEPS = 3


def _sharded_steps(seed=0):
    rng = np.random.default_rng(seed)
    fc = _sharded_features((jeo.SGD(0.1), jeo.SGD(0.1)))
    out = []
    for _ in range(STEPS):
        inputs, weights = _sharded_batch(rng)
        out.append((inputs, weights, ref.random_grads(rng, inputs, fc, scale=2.0)))
    return out


def _train(emb, state, steps):
    apply = jax.jit(emb.apply_gradients)
    for inputs, weights, grads in steps:
        state = apply(state, emb.preprocess(inputs, weights), grads)
    return state


def _by_name(tables, slots):
    """``(tables, slots)`` keyed by table name (``TableConfig``s compare by identity)."""
    return {t.name: v for t, v in tables.items()}, {t.name: v for t, v in slots.items()}


@functools.cache
def _one_device_run(pair):
    """``(initial, final, reference)`` states of the sharded scenario on one device, each
    ``(tables, slots)`` keyed by table name."""
    emb, fc = _sharded_emb(None, OPTIMIZER_PAIRS[pair])
    state = emb.init(jax.random.key(3))
    init = _np_state(emb, state)
    steps = _sharded_steps()
    trainer = ref.ReferenceTrainer(fc, None, init[0])
    for inputs, weights, grads in steps:
        trainer.apply(inputs, weights, grads)
    final = _train(emb, state, steps)
    reference = _by_name(trainer.tables, trainer.slots)
    return _by_name(*init), _by_name(*_np_state(emb, final)), reference


@pytest.mark.parametrize("pair", list(OPTIMIZER_PAIRS))
def test_one_device_matches_reference(pair):
    _, (tables, slots), (ref_tables, ref_slots) = _one_device_run(pair)
    for name, got in tables.items():
        _assert_close(got, ref_tables[name], name)
        for slot, value in slots[name].items():
            assert value.shape == ref_slots[name][slot].shape
            _assert_close(value, ref_slots[name][slot], f"{name}/{slot}")


@pytest.mark.parametrize("pair", list(OPTIMIZER_PAIRS))
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_equals_one_device_and_reference(mesh_name, pair):
    emb, _ = _sharded_emb(mesh_name, OPTIMIZER_PAIRS[pair])
    expected = {"row": "row", "table": "table", "column": "column", "replicated": "replicated"}
    strategy = MESHES[mesh_name][3]
    if isinstance(strategy, str):
        assert {p.strategy for p in emb.plan.layouts} == {expected[strategy]}
    if strategy == "table":  # "a" and "d" stacked into one array, with their [V] slots
        assert any(len(layout.tables) == 2 for layout in emb.plan.layouts)
    state = emb.init(jax.random.key(3))
    # Row-wise slots are laid out like the table's rows: split with row and table sharding,
    # replicated over the column blocks.
    for layout in emb.plan.layouts:
        for name, slot in state.slots[layout.name].items():
            assert slot.ndim in (1, 2), name
            want = layout.spec(slot.shape)
            assert slot.sharding.spec == want, (layout.name, name)
            if slot.ndim == 1 and layout.strategy in ("row", "table") and layout.num_shards > 1:
                assert slot.addressable_shards[0].data.shape[0] < slot.shape[0]
    init, (one_tables, one_slots), (ref_tables, ref_slots) = _one_device_run(pair)
    np_init = _by_name(*_np_state(emb, state))
    for name in np_init[0]:
        np.testing.assert_array_equal(np_init[0][name], init[0][name])
    tables, slots = _by_name(*_np_state(emb, _train(emb, state, _sharded_steps())))
    for name, got in tables.items():
        _assert_close(got, one_tables[name], f"{name} vs one device", 1e-5, 1e-6)
        _assert_close(got, ref_tables[name], f"{name} vs reference")
        for slot, value in slots[name].items():
            _assert_close(value, one_slots[name][slot], f"{name}/{slot}", 1e-5, 1e-6)
            _assert_close(value, ref_slots[name][slot], f"{name}/{slot} vs reference")


def test_column_blocks_need_the_whole_row_statistic():
    """Sensitivity: without the sum over column blocks each block would see only its own
    columns' squares; a row-wise update of one block then differs from the whole row's."""
    opt = jeo.RowWiseAdagrad(0.1)
    w = jnp.ones((1, 4))
    g = jnp.asarray([[1.0, 2.0, 3.0, 4.0]])
    whole, _ = opt.apply(w, {"accumulators": jnp.zeros(1)}, g, jnp.int32(0))
    block, _ = opt.apply(w[:, :2], {"accumulators": jnp.zeros(1)}, g[:, :2], jnp.int32(0))
    assert not np.allclose(np.asarray(whole)[:, :2], np.asarray(block))


# ---------------------------------------------------------------------------------------------
# Checkpoints: [V] slots restore onto other device counts


@pytest.mark.parametrize("restored_on", [None, "2d_mixed", "replicated"])
def test_checkpoint_restores_onto_other_device_counts(tmp_path, restored_on):
    pair = OPTIMIZER_PAIRS["adagrad_adam"]
    saver, _ = _sharded_emb("column", pair)
    steps = _sharded_steps()
    state = _train(saver, saver.init(jax.random.key(3)), steps[:2])
    je.checkpoint.save(tmp_path, saver, state, step=2)
    loader, _ = _sharded_emb(restored_on, pair)
    restored = je.checkpoint.restore(tmp_path, loader)
    saved_slots, got_slots = saver.logical_slots(state), loader.logical_slots(restored)
    for name in saved_slots:
        for key, value in saved_slots[name].items():
            assert got_slots[name][key].shape == value.shape
            np.testing.assert_array_equal(np.asarray(got_slots[name][key]), np.asarray(value))
    for (t, a), (_, b) in zip(
        saver.embedding_tables(state).items(),
        loader.embedding_tables(restored).items(),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=t.name)
    assert int(restored.step) == 2
    # Training continues from the restored slots (and step, for Adam's bias correction) as
    # from the saved ones: the same result as three uninterrupted steps.
    tables, slots = _by_name(*_np_state(loader, _train(loader, restored, steps[2:])))
    _, (one_tables, one_slots), (ref_tables, _) = _one_device_run("adagrad_adam")
    for name, got in tables.items():
        _assert_close(got, one_tables[name], name, 1e-5, 1e-6)
        _assert_close(got, ref_tables[name], f"{name} vs reference")
        for slot, value in slots[name].items():
            _assert_close(value, one_slots[name][slot], f"{name}/{slot}", 1e-5, 1e-6)


def test_checkpoint_of_other_optimizer_is_refused(tmp_path):
    saver, _ = _sharded_emb(None, OPTIMIZER_PAIRS["adagrad_adam"])
    je.checkpoint.save(tmp_path, saver, saver.init(jax.random.key(0)), step=0)
    loader, _ = _sharded_emb(None, OPTIMIZER_PAIRS["adam_adagrad_l2"])
    with pytest.raises(ValueError, match="optimizer"):
        je.checkpoint.restore(tmp_path, loader)
    restored = je.checkpoint.restore(tmp_path, loader, reinit_slots=True)
    assert restored.slots["a"]["velocities"].shape == (37,)


# ---------------------------------------------------------------------------------------------
# Export: tables only


def test_tf_twin_is_none_and_tf_checkpoints_carry_tables_only(tmp_path):
    pytest.importorskip("tensorflow")
    from jaxembed import export

    opt = jeo.RowWiseAdagrad(0.1)
    assert export.tf_optimizer(opt) is None
    assert export.tf_optimizer(jeo.PartialRowWiseAdam(0.1)) is None
    emb, _ = _sharded_emb(None, OPTIMIZER_PAIRS["adagrad_adam"])
    state = _train(emb, emb.init(jax.random.key(0)), _sharded_steps()[:1])
    variables, _ = export.to_tf(emb, state)
    assert {c.name: c.optimizer for c in variables} == dict.fromkeys("abcd")
    for config, variable in variables.items():
        np.testing.assert_array_equal(
            variable.numpy(), np.asarray(_by_name(*_np_state(emb, state))[0][config.name])
        )
    path = export.save_tf_checkpoint(str(tmp_path / "ckpt"), emb, state)
    back = export.load_tf_checkpoint(path, emb)
    for (t, a), (_, b) in zip(
        emb.embedding_tables(state).items(), emb.embedding_tables(back).items(), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=t.name)
    fresh = emb.init(jax.random.key(0))
    for name, slots in back.slots.items():
        for key, value in slots.items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(fresh.slots[name][key]))


def test_optimizer_config_round_trips_through_the_checkpoint_config():
    from jaxembed.checkpoint import optimizer_config

    cfg = optimizer_config(jeo.RowWiseAdagrad(0.1, weight_decay=0.1, weight_decay_mode="l2"))
    assert cfg["class"] == "RowWiseAdagrad"
    assert jeo.RowWiseAdagrad(**cfg["args"]) == jeo.RowWiseAdagrad(
        0.1, weight_decay=0.1, weight_decay_mode="l2"
    )
    fields = [f.name for f in dataclasses.fields(jeo.PartialRowWiseAdam)]
    assert fields[:4] == ["learning_rate", "beta_1", "beta_2", "epsilon"]
