"""``je.optimizers.from_optax``: elementwise Optax transformations applied row-sparsely.

The expected values are Optax itself, applied by hand: each step, gather the touched rows of the
table and of every table-shaped state leaf (touched rows and their summed gradients come from
``numpy_reference.row_gradients``), call ``tx.update`` on them, scatter them back; scalar leaves
(step counts) advance once per step. Untouched rows and their state must not change at all.
Transformations whose update of a row depends on other rows are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest

import jaxembed as je

from_optax = je.optimizers.from_optax

CASES = {
    "rmsprop": lambda: optax.rmsprop(0.01),
    "adam": lambda: optax.adam(0.05),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "clip_then_adam": lambda: optax.chain(optax.clip(0.5), optax.adam(0.05)),
    "adamw": lambda: optax.adamw(0.05, weight_decay=0.1),
    "adam_with_schedule": lambda: optax.adam(optax.linear_schedule(0.1, 0.01, 3)),
    "adagrad": lambda: optax.adagrad(0.1),
}
STEPS = 3
RTOL, ATOL = 1e-5, 1e-6


def _is_row_leaf(leaf, table):
    return np.shape(leaf) == np.shape(table)


def _gather(tree, rows, table):
    """The ``rows`` of every table-shaped leaf; other leaves (scalars) as they are."""
    return jax.tree.map(lambda x: x[rows] if _is_row_leaf(x, table) else x, tree)


def _scatter(tree, part, rows, table):
    """Writes ``part`` back into the ``rows`` of the table-shaped leaves of ``tree``."""
    return jax.tree.map(
        lambda full, p: full.at[rows].set(p) if _is_row_leaf(full, table) else p, tree, part
    )


def optax_by_hand(tx, table, steps):
    """Optax applied to the gathered touched rows; ``steps``: ``[(g [V, D], touched [V])]``.

    Returns the ``(table, state)`` after each step (the state at index 0 is ``tx.init``).
    """
    w = jnp.asarray(table, jnp.float32)
    state = tx.init(w)
    history = [(w, state)]
    for g, touched in steps:
        rows = np.nonzero(touched)[0]
        updates, sub = tx.update(
            jnp.asarray(g[rows], jnp.float32), _gather(state, rows, w), w[rows]
        )
        state = _scatter(state, sub, rows, w)
        w = w.at[rows].set(optax.apply_updates(w[rows], updates))
        history.append((w, state))
    return history


def assert_trees_close(got, want, where):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), where
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(g),
            np.asarray(w),
            rtol=RTOL,
            atol=ATOL,
            err_msg=f"{where} {jax.tree_util.keystr(path)}",
        )


class GroupedRun:
    """Every CASE in ONE jitted Embedding: one table per case (TableConfig.optimizer), each with
    its own copy of the compact scenario's weighted sparse feature and its own gradients."""

    def __init__(self, seed=0):
        self.txs = {case: make() for case, make in CASES.items()}
        self.tables = {
            case: je.TableConfig(16, 4, combiner="mean", name=case, optimizer=from_optax(tx))
            for case, tx in self.txs.items()
        }
        self.fc = {case: je.FeatureConfig(t) for case, t in self.tables.items()}
        emb = je.Embedding(self.fc)
        state = emb.init(jax.random.key(seed))
        self.history = [jax.tree.map(np.asarray, (state.tables, state.slots))]
        self.row_grads = []  # per step: {case: (g, touched)}
        apply = jax.jit(emb.apply_gradients)
        rng = np.random.default_rng(seed + 1)
        for inputs, weights in ref.compact_batches(STEPS, seed=seed):
            inputs = {case: inputs["hist"] for case in self.fc}
            weights = {case: weights["hist"] for case in self.fc}
            grads = ref.random_grads(rng, inputs, self.fc)
            state = apply(state, emb.preprocess(inputs, weights), grads)
            self.history.append(jax.tree.map(np.asarray, (state.tables, state.slots)))
            per_table = ref.row_gradients(inputs, weights, grads, self.fc)
            self.row_grads.append({case: per_table[t] for case, t in self.tables.items()})
        self.compilations = apply._cache_size()


@pytest.fixture(scope="module")
def grouped_run():
    return GroupedRun()


def test_grouped_run_is_one_compilation(grouped_run):
    assert grouped_run.compilations == 1


@pytest.mark.parametrize("case", list(CASES))
def test_from_optax_equals_optax_on_the_gathered_touched_rows(case, grouped_run):
    tx = grouped_run.txs[case]
    tables0, _ = grouped_run.history[0]
    steps = [row_grads[case] for row_grads in grouped_run.row_grads]
    want = optax_by_hand(tx, tables0[case], steps)
    for step, ((tables, slots), (w, state)) in enumerate(
        zip(grouped_run.history, want, strict=True)
    ):
        where = f"{case} after {step} steps"
        np.testing.assert_allclose(tables[case], w, rtol=RTOL, atol=ATOL, err_msg=where)
        assert_trees_close(slots[case], state, where)


@pytest.mark.parametrize("case", list(CASES))
def test_untouched_rows_and_their_state_are_unchanged(case, grouped_run):
    (tables0, slots0), (tables, slots) = grouped_run.history[0], grouped_run.history[-1]
    touched = np.zeros(16, bool)
    for row_grads in grouped_run.row_grads:
        touched |= row_grads[case][1]
    untouched = ~touched
    assert untouched.tolist() == [i in ref.COMPACT_UNTOUCHED for i in range(16)]
    np.testing.assert_array_equal(tables[case][untouched], tables0[case][untouched])
    assert np.all(tables[case][touched] != tables0[case][touched])
    leaves0 = jax.tree.leaves(slots0[case])
    for before, after in zip(leaves0, jax.tree.leaves(slots[case]), strict=True):
        if _is_row_leaf(before, tables0[case]):
            np.testing.assert_array_equal(after[untouched], before[untouched])
        else:  # a scalar (count) advances once per apply_gradients call
            assert np.ndim(after) == 0
            if np.issubdtype(np.asarray(after).dtype, np.integer):
                assert int(after) == int(before) + STEPS


def test_mixed_scenario_with_global_from_optax_adam():
    """Every input kind, duplicates across features sharing a table, one global optax.adam."""
    tx = optax.adam(0.05)
    fc = ref.scenario_feature_config()
    emb = je.Embedding(fc, from_optax(tx))
    state = emb.init(jax.random.key(0))
    tables0 = {t: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
    apply = jax.jit(emb.apply_gradients)
    rng = np.random.default_rng(0)
    steps = {t: [] for t in tables0}
    for inputs, weights in ref.scenario_batches(STEPS, seed=1):
        grads = ref.random_grads(rng, inputs, fc)
        state = apply(state, emb.preprocess(inputs, weights), grads)
        for t, g_touched in ref.row_gradients(inputs, weights, grads, fc).items():
            steps[t].append(g_touched)
    for table, w0 in tables0.items():
        w, opt_state = optax_by_hand(tx, w0, steps[table])[-1]
        np.testing.assert_allclose(
            state.tables[table.name], w, rtol=RTOL, atol=ATOL, err_msg=table.name
        )
        assert_trees_close(state.slots[table.name], opt_state, table.name)
        never = [
            table.name in ref.SCENARIO_UNTOUCHED and i in ref.SCENARIO_UNTOUCHED[table.name]
            for i in range(table.vocabulary_size)
        ]
        np.testing.assert_array_equal(np.asarray(state.tables[table.name])[never], w0[never])


def test_slot_variables_expose_table_shaped_optax_leaves():
    table = je.TableConfig(6, 3, name="t")
    emb = je.Embedding({"f": je.FeatureConfig(table)}, from_optax(optax.adam(0.1)))
    slots = emb.slot_variables(emb.init(jax.random.key(0)))[table]
    assert len(slots) == 2  # mu and nu; the scalar count is not a slot variable
    for name, value in slots.items():
        assert isinstance(name, str)
        assert value.shape == (6, 3)
        np.testing.assert_array_equal(value, np.zeros((6, 3)))


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)),
        lambda: optax.lamb(0.01),
        lambda: optax.adafactor(0.01),  # clips by block RMS, scales by parameter RMS
    ],
    ids=["clip_by_global_norm_sgd", "clip_by_global_norm_adam", "lamb", "adafactor"],
)
def test_non_elementwise_transformations_are_refused(make):
    with pytest.raises(ValueError, match="elementwise"):
        from_optax(make())


def test_factored_state_is_refused_at_init():
    """adafactor without its non-elementwise options passes the elementwise probe, but on a
    table big enough to be factored (both dims >= 128) its state is per row / per column."""
    tx = optax.adafactor(0.01, clipping_threshold=None, multiply_by_parameter_scale=False)
    table = je.TableConfig(256, 128, name="big")
    emb = je.Embedding({"f": je.FeatureConfig(table)}, from_optax(tx))
    with pytest.raises(ValueError, match=r"\(256, 128\)") as info:
        emb.init(jax.random.key(0))
    assert "factored" in str(info.value) or "shape" in str(info.value)


def test_from_optax_rejects_non_optax_objects():
    with pytest.raises(ValueError, match="GradientTransformation"):
        from_optax("adam")
    with pytest.raises(ValueError, match="GradientTransformation"):
        from_optax(je.optimizers.SGD(0.1))
