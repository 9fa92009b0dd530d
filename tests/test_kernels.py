"""The CPU kernels (csrc/cpu_kernels.cc) against the pure-JAX path they stand in for.

The pure-JAX path is what TPUs and GPUs run; the TF differential tests and the numpy optimizer
reference check it (CI runs them once more with ``JAXEMBED_CPU_KERNELS=0``), and here every
kernel is compared with it: lookups bit for bit, optimizer updates to float32 rounding, and the
JVP, transpose and batching rules of the primitives.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxembed as je
from jaxembed import _kernels as k
from jaxembed import optimizers as jeo

KERNELS_OFF = os.environ.get("JAXEMBED_CPU_KERNELS") == "0"
pytestmark = pytest.mark.skipif(KERNELS_OFF, reason="JAXEMBED_CPU_KERNELS=0")


def pure(fn, *args, **kwargs):
    """``fn`` run with the kernels off (the path TPU and GPU take)."""
    with k.use_kernels(False):
        return jax.tree.map(np.asarray, fn(*args, **kwargs))


def slots_case(rng, rows: int, out: int, head: int, tail: int, weighted: bool):
    """Random slots into ``rows`` rows: some empty (``rows``, -1 or past the end), some shared."""
    head_ids = rng.integers(-1, rows + 2, size=(out, head)).astype(np.int32)
    blocks = rng.integers(-1, rows + 2, size=(out, tail, 8)).astype(np.int32)
    hw = bw = None
    if weighted:
        hw = rng.normal(size=(out, head)).astype(np.float32)
        hw[:, ::3] = 0.0
        bw = rng.normal(size=(out, tail, 8)).astype(np.float32)
    return head_ids, hw, blocks, bw


def test_kernels_are_built_and_loaded():
    assert k.enabled(), k.status()
    assert k.status().startswith("CPU kernels on")
    assert je.cpu_kernels_status() == k.status()


@pytest.mark.parametrize("dtype", [np.float32, np.int32, jnp.bfloat16])
@pytest.mark.parametrize("ids_dtype", [np.int32, np.int64])
def test_gather_rows_equals_take(dtype, ids_dtype):
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(50, 3, 2)) * 10, dtype)
    ids = rng.integers(-3, 55, size=(7, 9)).astype(ids_dtype)  # out-of-range ids read zeros
    got = jax.jit(k.gather_rows)(table, ids)
    assert got.shape == (7, 9, 3, 2) and got.dtype == table.dtype
    np.testing.assert_array_equal(np.asarray(got), pure(jax.jit(k.gather_rows), table, ids))
    valid = (ids >= 0) & (ids < 50)
    np.testing.assert_array_equal(np.asarray(got)[~valid], 0)
    np.testing.assert_array_equal(np.asarray(got)[valid], np.asarray(table)[ids[valid]])


def test_scatter_rows_writes_distinct_rows_in_place():
    rng = np.random.default_rng(1)
    table = rng.normal(size=(40, 5)).astype(np.float32)
    ids = np.array([3, 39, 40, 0, 17, 99], np.int32)  # 40 and 99 are padding
    rows = rng.normal(size=(6, 5)).astype(np.float32)
    step = jax.jit(k.scatter_rows, donate_argnums=0)
    got = np.asarray(step(jnp.asarray(table), ids, rows))
    want = table.copy()
    want[[3, 39, 0, 17]] = rows[[0, 1, 3, 4]]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, pure(step, jnp.asarray(table), ids, rows))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("head,tail", [(1, 0), (7, 0), (40, 0), (9, 3), (0, 2)])
def test_slot_sums_are_bit_identical_to_pure_jax(weighted, head, tail):
    rng = np.random.default_rng(head * 10 + tail)
    rows = jnp.asarray(rng.normal(size=(30, 16)), jnp.float32)
    slots = slots_case(rng, 30, 12, head, tail, weighted)
    fn = jax.jit(k.slot_sums)
    np.testing.assert_array_equal(np.asarray(fn(rows, *slots)), pure(fn, rows, *slots))


@pytest.mark.parametrize("weighted", [False, True])
def test_lookup_through_ids_equals_gather_then_sum(weighted):
    rng = np.random.default_rng(2)
    table = jnp.asarray(rng.normal(size=(100, 8)), jnp.float32)
    ids = np.concatenate([rng.choice(100, 20, replace=False), [100, 100, -1]]).astype(np.int32)
    slots = slots_case(rng, len(ids), 9, 10, 2, weighted)

    def via_ids(t):
        return k.slot_sums(t, *slots, ids=ids)

    def via_gather(t):
        return k.slot_sums(k.gather_rows(t, ids), *slots)

    got = np.asarray(jax.jit(via_ids)(table))
    np.testing.assert_array_equal(got, np.asarray(jax.jit(via_gather)(table)))
    np.testing.assert_array_equal(got, pure(jax.jit(via_ids), table))


@pytest.mark.parametrize("weighted", [False, True])
def test_slot_grads_are_the_transpose_of_slot_sums(weighted):
    rng = np.random.default_rng(3)
    slots = slots_case(rng, 25, 14, 12, 2, weighted)
    # Small integers (and weights in halves) sum exactly in any order: the two paths must agree
    # bit for bit; random values agree to rounding.
    exact = jnp.asarray(rng.integers(-4, 5, size=(14, 6)), jnp.float32)
    if weighted:
        slots = (slots[0], np.round(slots[1] * 2) / 2, slots[2], np.round(slots[3] * 2) / 2)
    fn = jax.jit(k.slot_grads, static_argnums=5)
    np.testing.assert_array_equal(np.asarray(fn(exact, *slots, 25)), pure(fn, exact, *slots, 25))
    cot = jnp.asarray(rng.normal(size=(14, 6)), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(fn(cot, *slots, 25)), pure(fn, cot, *slots, 25), rtol=1e-5, atol=1e-6
    )
    # And it is the VJP of slot_sums.
    rows = jnp.zeros((25, 6), jnp.float32)
    _, vjp = jax.vjp(lambda r: k.slot_sums(r, *slots), rows)
    np.testing.assert_allclose(
        np.asarray(vjp(cot)[0]), np.asarray(fn(cot, *slots, 25)), rtol=1e-6, atol=1e-7
    )


def test_autodiff_and_vmap_rules_match_pure_jax():
    rng = np.random.default_rng(4)
    table = jnp.asarray(rng.normal(size=(20, 4)), jnp.float32)
    ids = np.array([5, 1, 19, 20, 7, 5], np.int32)
    slots = slots_case(rng, len(ids), 5, 6, 1, weighted=True)
    weight = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)

    def loss(t):
        out = k.slot_sums(t, *slots, ids=ids) + k.gather_rows(t, ids[:5])
        return jnp.sum(jnp.sin(out) * weight)

    cases = {
        "grad": jax.jit(jax.grad(loss)),
        "jacfwd": jax.jit(jax.jacfwd(lambda t: k.slot_sums(t, *slots, ids=ids))),
        "hessian_vector": jax.jit(lambda t: jax.jvp(jax.grad(loss), (t,), (jnp.ones_like(t),))[1]),
        "vmap": jax.jit(jax.vmap(lambda t: k.slot_sums(t, *slots, ids=ids))),
    }
    for name, fn in cases.items():
        arg = jnp.stack([table, 2 * table]) if name == "vmap" else table
        got = np.asarray(fn(arg))
        np.testing.assert_allclose(got, pure(fn, arg), rtol=1e-6, atol=1e-6, err_msg=name)
    assert np.abs(np.asarray(cases["grad"](table))).sum() > 0


OPTIMIZERS = {
    "sgd": jeo.SGD(0.1),
    "sgd_clip_decay": jeo.SGD(
        0.1, clipvalue=(-0.3, None), weight_decay_factor=0.01, clip_weight_max=0.8
    ),
    "adagrad": jeo.Adagrad(0.1),
    "adagrad_all_options": jeo.Adagrad(
        0.2,
        initial_accumulator_value=0.5,
        clipvalue=0.4,
        weight_decay_factor=0.05,
        multiply_weight_decay_factor_by_learning_rate=True,
        clip_weight_min=-0.9,
        clip_weight_max=0.9,
    ),
    "adagrad_schedule": jeo.Adagrad(optax.exponential_decay(0.3, 1, 0.5)),
    "adagrad_momentum": jeo.AdagradMomentum(0.1, momentum=0.9),
    "adagrad_momentum_nesterov_beta2": jeo.AdagradMomentum(
        0.1, momentum=0.5, use_nesterov=True, beta2=0.9, exponent=3.0
    ),
    "adam": jeo.Adam(0.01),
    "adam_sqrt_outside": jeo.Adam(0.05, beta_1=0.5, sum_inside_sqrt=False, epsilon=1e-3),
    "ftrl": jeo.FTRL(0.1, l1_regularization_strength=0.01, l2_regularization_strength=0.02),
    "ftrl_linear_times_lr": jeo.FTRL(
        0.1,
        learning_rate_power=-0.7,
        l1_regularization_strength=0.05,
        beta=0.3,
        multiply_linear_by_learning_rate=True,
    ),
}


def optimizer_case(opt, seed: int = 5):
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.normal(size=(60, 8)), jnp.float32)
    slots = {
        name: jnp.asarray(np.abs(rng.normal(size=(60, 8))) + 0.1, jnp.float32)
        for name in opt.slot_names
    }
    ids = np.concatenate([rng.choice(60, 25, replace=False), [60, 60, 60]]).astype(np.int32)
    grads = jnp.asarray(rng.normal(size=(len(ids), 8)), jnp.float32)
    return table, slots, ids, grads


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_kernels_match_pure_jax(name):
    opt = OPTIMIZERS[name]
    assert opt.kernel_rule() is not None
    table, slots, ids, grads = optimizer_case(opt)

    def steps(table, slots):  # three steps, so the schedule and the slots matter
        for step in range(3):
            table, slots = jeo.apply_rows(opt, table, slots, ids, grads * (step + 1), step)
        return table, slots

    fn = jax.jit(steps)
    got, want = jax.tree.map(np.asarray, fn(table, slots)), pure(fn, table, slots)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        # pow (AdagradMomentum, FTRL) may differ by an ulp between XLA and the C library, and
        # FTRL's new weight is a difference of nearly equal numbers.
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6, err_msg=name)
    untouched = np.setdiff1d(np.arange(60), ids)
    np.testing.assert_array_equal(got[0][untouched], np.asarray(table)[untouched])
    assert not np.array_equal(got[0][ids[:25]], np.asarray(table)[ids[:25]])


@pytest.mark.parametrize("name", ["adagrad", "adam", "ftrl_linear_times_lr"])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_slot_update_equals_update_with_row_gradients(name, weighted):
    opt = OPTIMIZERS[name]
    table, slots, ids, _ = optimizer_case(opt, seed=6)
    rng = np.random.default_rng(7)
    parts = slots_case(rng, len(ids), 11, 9, 1, weighted)
    cot = jnp.asarray(rng.normal(size=(11, 8)), jnp.float32)
    fused = jax.jit(lambda t, s: k.apply_slots(opt, t, s, ids, cot, *parts, 2))
    grads = k.slot_grads(cot, *parts, num_rows=len(ids))
    unfused = jax.jit(lambda t, s: jeo.apply_rows(opt, t, s, ids, grads, 2))
    got = jax.tree.map(np.asarray, fused(table, slots))
    for want in (jax.tree.map(np.asarray, unfused(table, slots)), pure(fused, table, slots)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6)


def test_from_optax_and_dense_adam_take_the_generic_path():
    assert jeo.from_optax(optax.rmsprop(1e-3)).kernel_rule() is None
    table, slots, ids, grads = optimizer_case(jeo.SGD(0.1))
    opt = jeo.from_optax(optax.sgd(0.5))
    state = opt.init_slots(table)
    new, _ = jax.jit(lambda t, s: jeo.apply_rows(opt, t, s, ids, grads, 0))(table, state)
    valid = ids < 60
    want = np.asarray(table).copy()
    want[ids[valid]] -= 0.5 * np.asarray(grads)[valid]
    np.testing.assert_allclose(np.asarray(new), want, rtol=1e-6)


def _train_step(emb):
    def step(state, batch, g):
        acts = emb.lookup(state, batch)
        loss, grads = jax.value_and_grad(
            lambda a: sum(jnp.sum(jax.nn.softplus(a[f] * g[f])) for f in g)
        )(acts)
        return emb.apply_gradients(state, batch, grads), loss

    return jax.jit(step, donate_argnums=0)


def test_train_step_updates_tables_in_place():
    """No copy, gather or scatter of a whole [V, D] table in the compiled step: its cost follows
    the rows a batch touches."""
    vocab = 50_000
    tables = [je.TableConfig(vocab, 16, combiner="sum", name=f"t{i}") for i in range(2)]
    features = {f"f{i}": je.FeatureConfig(t) for i, t in enumerate(tables)}
    emb = je.Embedding(features, jeo.Adagrad(0.1))
    state = emb.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    inputs = {
        f: je.Ragged.from_row_lengths(rng.integers(0, vocab, 60), np.full(20, 3)) for f in features
    }
    batch = emb.preprocess(inputs)
    g = {f: jnp.ones((20, 16)) for f in features}
    hlo = _train_step(emb).lower(state, batch, g).compile().as_text()
    # Instructions with a table-shaped result, by opcode: only parameters, the in-place update
    # (a custom call returning the table and its slots) and tuple plumbing may produce one.
    table_shape = f"f32[{vocab},16]"
    opcodes = [
        match.group(2)
        for match in re.finditer(r"= (\(?[^ ]*\)?) ([\w-]+)\(", hlo)
        if table_shape in match.group(1)
    ]
    assert opcodes, "the tables should appear in the HLO"
    assert set(opcodes) <= {"parameter", "custom-call", "get-tuple-element", "tuple"}, opcodes
    assert "jaxembed_apply_slots" in hlo and "jaxembed_combine" in hlo


def test_pure_path_is_what_other_platforms_lower():
    """Lowered for TPU and GPU, a training step has no jaxembed custom call: only JAX ops."""
    table = je.TableConfig(100, 8, combiner="mean", name="t")
    emb = je.Embedding({"f": je.FeatureConfig(table)}, jeo.Adam(0.1))
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess({"f": je.Ragged.from_row_lengths([1, 5, 7], [2, 1])})
    g = {"f": jnp.ones((2, 8))}
    traced = _train_step(emb).trace(state, batch, g)
    assert "jaxembed_" in traced.lower(lowering_platforms=("cpu",)).as_text()
    for platform in ("tpu", "cuda"):
        assert "jaxembed_" not in traced.lower(lowering_platforms=(platform,)).as_text(), platform


@pytest.mark.parametrize("take", [False, True])
@pytest.mark.parametrize("head", [1, 3, 8])
def test_pure_head_sum_loop_equals_the_ordered_sum_of_gathered_slots(take, head):
    """The pure-JAX head sum (a loop of ``[R, D]`` gathers, ``_gathered_sum``) against the ordered
    sum of the gathered ``[R, H, D]`` slots it replaces: values and gradients bit for bit, with
    empty slots (-1, past the end) reading zeros."""
    rng = np.random.default_rng(head)
    rows = jnp.asarray(rng.normal(size=(50, 16)).astype(np.float32))
    slots = jnp.asarray(rng.integers(-1, 53, size=(40, head)).astype(np.int32))

    def looped(r):
        return k._gathered_sum(r, slots, take)

    def reference(r):
        return k._sequential_sum(k._take(r, slots) if take else k._padded_at(r, slots), 1)

    cot = jnp.asarray(rng.normal(size=(40, 16)).astype(np.float32))
    for fn in (jax.jit(looped), looped):
        np.testing.assert_array_equal(fn(rows), jax.jit(reference)(rows))
        got = jax.vjp(fn, rows)[1](cot)[0]
        np.testing.assert_array_equal(got, jax.vjp(reference, rows)[1](cot)[0])
    assert np.any(np.asarray(jax.jit(looped)(rows)) != 0)
