"""``je.embedding_lookup`` under ``jax.jit`` and ``jax.grad``.

Tables are the traced argument (inputs are concrete numpy pytrees closed over): the jitted
lookup must equal the eager one bit for bit, and gradients w.r.t. the tables must follow the
combiner's coefficients (sum: w; mean: w / sum w; sqrtn: w / sqrt(sum w^2)), summed per row over
the batch. Dense ids may be traced too; traced Sparse/Ragged inputs are rejected with an error
that says concrete values are needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed as je


def _tables(*configs, seed=0):
    rng = np.random.RandomState(seed)
    return {t: rng.normal(size=(t.vocabulary_size, t.dim)).astype(np.float32) for t in configs}


def _sparse(rows, dtype=np.int32, width=None):
    indices = [[i, j] for i, row in enumerate(rows) for j in range(len(row))]
    width = width or max(1, max(len(r) for r in rows))
    values = np.asarray([v for row in rows for v in row], dtype)
    return je.Sparse(np.asarray(indices, np.int64).reshape(-1, 2), values, [len(rows), width])


def _ragged(rows, dtype=np.int32):
    values = np.asarray([v for row in rows for v in row], dtype)
    return je.Ragged.from_row_lengths(values, [len(r) for r in rows])


def _mixed_case():
    """A structure mixing every input kind and mode, with weights where they are allowed."""
    rng = np.random.RandomState(1)
    t_sum = je.TableConfig(20, 4, combiner="sum", name="t_sum")
    t_mean = je.TableConfig(13, 3, combiner="mean", name="t_mean")
    t_sqrtn = je.TableConfig(9, 5, combiner="sqrtn", name="t_sqrtn")
    long_row = rng.randint(0, 20, size=30).tolist()  # long enough for the block order to matter
    rows_a = ([1, 2, 2], [], [5, -1, 7], long_row)
    rows_b = ([3], [0, 12, 12, 4], [], [6])
    rows_c = ([8, 0], [1], [2, 2, 2, 3], [])
    fc = {
        "dense": je.FeatureConfig(t_sum),
        "dense2d": je.FeatureConfig(t_mean),
        "sparse": {
            "sum": je.FeatureConfig(t_sum),
            "mean": je.FeatureConfig(t_mean),
            "unsafe": je.FeatureConfig(t_sqrtn, validate_weights_and_indices=False),
            "seq": je.FeatureConfig(t_sum, max_sequence_length=3),
        },
        "ragged": [
            je.FeatureConfig(t_sum),
            je.FeatureConfig(t_sqrtn),
            je.FeatureConfig(t_mean, max_sequence_length=2),
            je.FeatureConfig(t_sum, output_shape=(2, 2)),
            je.FeatureConfig(t_mean, output_shape=(2, 6)),
        ],
    }
    inputs = {
        "dense": np.array([0, 19, 3], np.int32),
        "dense2d": np.array([[1, 2], [12, 0]], np.int64),
        "sparse": {
            "sum": _sparse(rows_a),
            "mean": _sparse(rows_b),
            "unsafe": _sparse(rows_c),
            "seq": _sparse(([1, 2, 3, 4], [], [5]), width=4),
        },
        "ragged": [
            _ragged([[0, 1], [], long_row[:25]]),
            _ragged(rows_c),
            _ragged(rows_b),
            _ragged(rows_a[:2] + ([4], [])),
            _ragged(rows_c[:2]),
        ],
    }

    def w(rows):
        return [rng.uniform(-0.5, 2.0, size=len(r)).astype(np.float32).tolist() for r in rows]

    weights = {
        "dense": None,
        "dense2d": None,
        "sparse": {
            "sum": _sparse(w(rows_a), np.float32),
            "mean": _sparse(w(rows_b), np.float32),
            "unsafe": None,
            "seq": None,
        },
        "ragged": [
            _ragged(w([[0, 1], [], long_row[:25]]), np.float32),
            _ragged(w(rows_c), np.float32),
            None,
            _ragged(w(rows_a[:2] + ([4], [])), np.float32),
            None,
        ],
    }
    return inputs, weights, _tables(t_sum, t_mean, t_sqrtn), fc


def _assert_trees_equal(got, want):
    got_leaves, got_def = jax.tree_util.tree_flatten(got)
    want_leaves, want_def = jax.tree_util.tree_flatten(want)
    assert got_def == want_def
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("table_kind", ["numpy", "jax"])
def test_jit_over_tables_is_bit_identical_to_eager(table_kind):
    inputs, weights, tables, fc = _mixed_case()
    if table_kind == "jax":
        tables = {t: jnp.asarray(v) for t, v in tables.items()}
    eager = je.embedding_lookup(inputs, weights, tables, fc)
    jitted = jax.jit(lambda t: je.embedding_lookup(inputs, weights, t, fc))(tables)
    _assert_trees_equal(jitted, eager)
    # The outputs are jax arrays, nested like the inputs.
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(eager))
    assert isinstance(eager["ragged"], list) and set(eager["sparse"]) == set(inputs["sparse"])


def test_jit_over_tables_matches_tf():
    pytest.importorskip("tensorflow")
    from tf_reference import assert_matches_tf, tf_lookup

    inputs, weights, tables, fc = _mixed_case()
    jitted = jax.jit(lambda t: je.embedding_lookup(inputs, weights, t, fc))(tables)
    want = tf_lookup(inputs, weights, tables, fc)
    assert_matches_tf(jitted, want, inputs, weights, tables, fc)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def _entry_coefficients(rows, weights, combiner, prune):
    """Per (row, id, coefficient) for the combined lookup; ``prune`` = the sparse safe path."""
    out = []
    for r, (ids, ws) in enumerate(zip(rows, weights, strict=True)):
        kept = [
            (i, w)
            for i, w in zip(ids, ws, strict=True)
            if not prune or (i >= 0 and (combiner == "sum" or w > 0))
        ]
        if combiner == "mean":
            denom = sum(w for _, w in kept)
        elif combiner == "sqrtn":
            denom = np.sqrt(sum(w * w for _, w in kept))
        else:
            denom = 1.0
        for i, w in kept:
            out.append((r, i, w / denom if denom else 0.0))
    return out


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("kind", ["sparse", "ragged"])
def test_grad_wrt_tables_matches_numpy(kind, combiner):
    table = je.TableConfig(10, 3, combiner=combiner, name="t")
    tables = _tables(table, seed=3)
    rng = np.random.RandomState(4)
    rows = ([1, 2, 2, 9], [], [4], rng.randint(0, 10, size=24).tolist(), [0, 1])
    if kind == "sparse":
        rows = (rows[0] + [-1], *rows[1:])  # a pruned id
    weights = [rng.uniform(0.1, 2.0, size=len(r)).astype(np.float32).tolist() for r in rows]
    if combiner == "sum":
        weights[0][1] = -1.5  # kept by sum
    make = _sparse if kind == "sparse" else _ragged
    fc = {"f": je.FeatureConfig(table)}
    inputs, w_tree = {"f": make(rows)}, {"f": make(weights, np.float32)}
    cot = rng.normal(size=(len(rows), table.dim)).astype(np.float32)  # dL/dact

    def loss(t):
        out = je.embedding_lookup(inputs, w_tree, t, fc)
        return jnp.sum(out["f"] * cot)

    grad = jax.jit(jax.grad(loss))(tables)
    assert set(grad) == {table}
    want = np.zeros((table.vocabulary_size, table.dim))
    for r, i, c in _entry_coefficients(rows, weights, combiner, prune=kind == "sparse"):
        want[i] += c * cot[r].astype(np.float64)
    np.testing.assert_allclose(np.asarray(grad[table]), want, rtol=1e-5, atol=1e-6)
    # Rows no id touches get exactly zero.
    touched = {i for row in rows for i in row if i >= 0}
    untouched = [i for i in range(table.vocabulary_size) if i not in touched]
    np.testing.assert_array_equal(np.asarray(grad[table])[untouched], 0)


def test_grad_of_mixed_structure_sum_combiner():
    # Dense gather + sparse sum + ragged sum sharing one table: each row's gradient is the sum
    # over every occurrence of weight * dL/dact.
    table = je.TableConfig(7, 2, combiner="sum", name="shared")
    tables = _tables(table, seed=5)
    rows = ([0, 3, 3], [6], [], [2, 0])
    weights = [[2.0, 0.5, -1.0], [3.0], [], [1.5, 0.25]]
    dense = np.array([[3, 1], [1, 1]], np.int32)
    fc = (je.FeatureConfig(table), je.FeatureConfig(table), je.FeatureConfig(table))
    inputs = (dense, _sparse(rows), _ragged(rows))
    w_tree = (None, _sparse(weights, np.float32), _ragged(weights, np.float32))
    rng = np.random.RandomState(6)
    cots = (
        rng.normal(size=(2, 2, 2)).astype(np.float32),
        rng.normal(size=(4, 2)).astype(np.float32),
        rng.normal(size=(4, 2)).astype(np.float32),
    )

    def loss(t):
        outs = je.embedding_lookup(inputs, w_tree, t, fc)
        return sum(jnp.sum(o * c) for o, c in zip(outs, cots, strict=True))

    grad = np.asarray(jax.grad(loss)(tables)[table])
    want = np.zeros((7, 2))
    for b in range(2):
        for k in range(2):
            want[dense[b, k]] += cots[0][b, k]
    for cot in cots[1:]:
        for r, i, c in _entry_coefficients(rows, weights, "sum", prune=True):
            want[i] += c * cot[r]
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Traced ids
# --------------------------------------------------------------------------------------------


def test_jit_over_dense_ids():
    table = je.TableConfig(11, 3, combiner="mean", name="t")
    tables = _tables(table)
    fc = {"a": je.FeatureConfig(table), "b": [je.FeatureConfig(table)]}
    ids = {"a": np.array([0, 10, 4], np.int32), "b": [np.array([[1, 1], [2, 9]], np.int32)]}
    eager = je.embedding_lookup(ids, None, tables, fc)
    jitted = jax.jit(lambda i: je.embedding_lookup(i, None, tables, fc))(ids)
    _assert_trees_equal(jitted, eager)
    # Both tables and ids traced.
    both = jax.jit(lambda i, t: je.embedding_lookup(i, None, t, fc))(ids, tables)
    _assert_trees_equal(both, eager)


def _concrete_error(fn, *args):
    with pytest.raises((ValueError, TypeError)) as info:
        jax.jit(fn)(*args)
    assert "concrete" in str(info.value).lower(), str(info.value)


def test_traced_sparse_input_is_rejected():
    table = je.TableConfig(8, 2, combiner="sum", name="t")
    tables, fc = _tables(table), {"f": je.FeatureConfig(table)}
    ids = _sparse(([1, 2], [], [3]))

    def lookup(indices, values):
        return je.embedding_lookup(
            {"f": je.Sparse(indices, values, ids.dense_shape)}, None, tables, fc
        )

    _concrete_error(lookup, ids.indices, ids.values)
    # Traced values alone (concrete indices) are rejected too.
    _concrete_error(lambda v: lookup(ids.indices, v), ids.values)


def test_traced_sparse_pytree_input_is_rejected():
    table = je.TableConfig(8, 2, combiner="sum", name="t")
    tables, fc = _tables(table), {"f": je.FeatureConfig(table)}
    ids = {"f": _sparse(([1, 2], [], [3]))}
    _concrete_error(lambda i: je.embedding_lookup(i, None, tables, fc), ids)


def test_traced_ragged_input_is_rejected():
    table = je.TableConfig(8, 2, combiner="sum", name="t")
    tables, fc = _tables(table), {"f": je.FeatureConfig(table)}
    ids = _ragged(([1, 2], [], [3]))

    def lookup(values, row_splits):
        return je.embedding_lookup({"f": je.Ragged(values, row_splits)}, None, tables, fc)

    _concrete_error(lookup, ids.values, ids.row_splits)
    _concrete_error(lambda i: je.embedding_lookup(i, None, tables, fc), {"f": ids})


# --------------------------------------------------------------------------------------------
# Random cases of the differential test, jitted over the tables
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:max_sequence_length")
@pytest.mark.parametrize("seed", range(0, 240, 8))
def test_jit_over_tables_matches_tf_on_random_cases(seed):
    pytest.importorskip("tensorflow")
    from test_lookup_differential import make_case
    from tf_reference import assert_matches_tf, tf_lookup

    case = make_case(seed)
    inputs, weights, fc = case.inputs, case.weights, case.feature_config
    jitted = jax.jit(lambda t: je.embedding_lookup(inputs, weights, t, fc))(case.tables)
    want = tf_lookup(inputs, weights, case.tables, fc)
    assert_matches_tf(jitted, want, inputs, weights, case.tables, fc)


@pytest.mark.parametrize("length", [3, 40, 70])  # unrolled, unrolled to 64 slots, scanned
def test_forward_and_reverse_mode_agree(length):
    """The ordered sums declare their derivative (a plain sum), so jvp and grad both work."""
    table = je.TableConfig(90, 3, combiner="mean", name="t")
    features = {"f": je.FeatureConfig(table)}
    lengths = np.array([length, 1, 0])
    ids = {"f": je.Ragged.from_row_lengths(np.arange(lengths.sum()) % 90, lengths)}
    values = jnp.asarray(np.random.default_rng(0).normal(size=(90, 3)), jnp.float32)

    def loss(tab):
        out = je.embedding_lookup(ids, None, {table: tab}, features)["f"]
        return (out * jnp.arange(1.0, 4.0)).sum()

    forward = jax.jacfwd(loss)(values)
    reverse = jax.grad(loss)(values)
    np.testing.assert_allclose(np.asarray(forward), np.asarray(reverse), rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(reverse).sum()) > 0
