"""jaxembed.export._jaxpr: control flow, PRNG keys, sort, scatter, conv, searchsorted, errors.

Each model is translated once with a symbolic batch and compared with JAX on two batch sizes,
eagerly and in a tf.function with a None batch dimension (``check`` of test_export_jaxpr).
"""

from __future__ import annotations

import inspect
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jaxembed.export import _jaxpr  # noqa: E402
from test_export_jaxpr import _init, _normal, check  # noqa: E402

import jaxembed as je  # noqa: E402
from jaxembed import export  # noqa: E402

REL = {"rtol": 1e-5, "atol": 1e-6}  # 1e-5 relative: matmul and transcendental rounding
LOOSE = {"rtol": 1e-5, "atol": 1e-5}  # recurrences whose outputs pass through zero


def _seq(b: int) -> np.ndarray:
    return _normal(b, 6, 3)


# --------------------------------------------------------------------------------------------
# Recurrent Flax towers, scan, loops (PRNG keys of Flax's initializers appear as constants).


class Recurrent(nn.Module):
    cell: str
    reverse: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        cell = nn.GRUCell(5) if self.cell == "gru" else nn.LSTMCell(5)
        carry, ys = nn.RNN(cell, return_carry=True, reverse=self.reverse)(x)
        last = carry if self.cell == "gru" else carry[1]
        return {"ys": ys, "last": nn.Dense(2)(last)}


@pytest.mark.parametrize(("cell", "reverse"), [("gru", False), ("lstm", False), ("lstm", True)])
def test_flax_rnn_tower(cell, reverse):
    m = Recurrent(cell, reverse)
    check(m.apply, _init(m, _seq(2)), _seq, tol=LOOSE)


def test_constant_prng_keys_fold():
    """Keys derived from a constant seed are evaluated by JAX at export; their bits are data."""

    def fn(p: Any, x: jax.Array) -> jax.Array:
        k1, k2 = jax.random.split(jax.random.key(42))
        noise = jax.random.normal(k1, (4,)) + jax.random.uniform(jax.random.fold_in(k2, 3), (4,))
        data = jax.random.key_data(k2).astype(jnp.float32).sum() * 0.0
        return x * noise + data

    check(fn, {}, lambda b: _normal(b, 4), tol=REL)


def _scans(p: Any, x: jax.Array) -> dict[str, jax.Array]:
    seq = x.transpose(1, 0, 2)  # [time, batch, 3]

    def step(c: jax.Array, xt: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        c = jnp.tanh(c * 0.9 + xt @ p["w"])
        return c, (c.sum(-1), (xt > 0).astype(jnp.int32))

    c0 = jnp.zeros((x.shape[0], 4))
    last, (sums, signs) = lax.scan(step, c0, seq)
    rlast, rsums = lax.scan(lambda c, xt: (c + xt, c.sum()), jnp.zeros(3), seq.sum(1), reverse=True)
    # A scan over the batch axis: its length is the (symbolic) batch size.
    running, prefix = lax.scan(lambda c, row: (c + row, c * row), jnp.zeros(3), x[:, 0])
    fixed = lax.fori_loop(0, 4, lambda i, c: c * 0.5 + i, x[:, :, 0])  # static: a scan
    return {
        "last": last,
        "sums": sums,
        "signs": signs,
        "rlast": rlast + rsums.sum(),
        "running": running,
        "prefix": prefix,
        "fixed": fixed,
    }


def test_scan_and_static_fori_loop():
    params = {"w": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)}
    check(_scans, params, _seq, tol=LOOSE)


def _loops(p: Any, x: jax.Array) -> dict[str, jax.Array]:
    # Data-dependent trip count: doubles until the sum reaches 100 (differs per batch).
    def cond(c: tuple[jax.Array, jax.Array]) -> jax.Array:
        return jnp.abs(c[0]).sum() < 100.0

    doubled, steps = lax.while_loop(cond, lambda c: (c[0] * 2.0, c[1] + 1), (x, 0))
    n = jnp.clip(x[0, 0] * 3, 0, 5).astype(jnp.int32)  # a trip count read from the input
    dynamic = lax.fori_loop(0, n, lambda i, c: c + jnp.sin(c) * i, x)
    per_row = lax.fori_loop(0, x.shape[0], lambda i, c: c.at[i].multiply(-1.0), x)
    return {"doubled": doubled, "steps": steps, "dynamic": dynamic, "per_row": per_row}


def test_while_and_dynamic_fori_loop():
    check(_loops, {}, lambda b: _normal(b, 3, scale=0.5), tol=REL)


def _conds(p: Any, x: jax.Array) -> dict[str, jax.Array]:
    pred = x.sum() > 0  # known only at run time
    index = jnp.argmax(x.sum(0))  # 0..3; switch clamps to the 3 branches
    branches = [lambda y: y * 2.0, lambda y: jnp.sin(y), lambda y: y - y.max()]
    return {
        "cond": lax.cond(pred, lambda y: y + 1.0, lambda y: y * y, x),
        "switch": lax.switch(index, branches, x),
        "known": lax.switch(1, branches, x),  # a constant index: inlined
        "int_out": lax.cond(pred, lambda: jnp.int32(1), lambda: jnp.int32(7)),
    }


def test_cond_and_switch():
    check(_conds, {}, lambda b: _normal(b, 4) + np.float32(b % 2 - 0.5), tol=REL)
    check(_conds, {}, lambda b: -_normal(b, 4) - np.float32(0.3), tol=REL)


# --------------------------------------------------------------------------------------------
# Sorting.


def _sort_inputs(b: int) -> np.ndarray:
    x = np.round(_normal(b, 6) * 2) / np.float32(2)  # many ties
    x[0, :4] = [np.nan, -0.0, 0.0, -np.inf]
    x[-1, 2] = np.inf
    return x


def _sorts(p: Any, x: jax.Array) -> dict[str, jax.Array]:
    ints = (jnp.where(jnp.isfinite(x), x, 3.0) * 2).astype(jnp.int32)  # TF casts NaN differently
    k1, k2, idx = lax.sort((ints % 2, -x, lax.broadcasted_iota(jnp.int32, x.shape, 1)), num_keys=2)
    return {
        "sort": jnp.sort(x, axis=1),
        "sort_desc": -jnp.sort(-x, axis=1),
        "argsort": jnp.argsort(x, axis=1),
        "argsort_desc": jnp.argsort(x, axis=1, descending=True),
        "argsort_neg": jnp.argsort(-x, axis=1),
        "batch_axis": jnp.argsort(x[:, 1], axis=0),
        "ints": jnp.sort(ints, axis=1),
        "two_keys": (k1, k2, idx),
    }


def test_sort_and_argsort():
    check(_sorts, {}, _sort_inputs, exact=("sort", "sort_desc"))


# --------------------------------------------------------------------------------------------
# Scatter.


def _scatters(p: Any, a: dict[str, jax.Array]) -> dict[str, jax.Array]:
    x, i = a["x"], a["i"]  # i in [-2, 7): duplicates, negative (wrapping) and out of bounds
    rows = jnp.arange(x.shape[0])[:, None]
    table = jnp.zeros((5, 2))
    vals = x[:, :2]
    return {
        "add": x.at[rows, i].add(10.0),
        "set": x.at[rows, jnp.arange(3) + 1].set(-x[:, :3]),
        "max": x.at[rows, i].max(0.25),
        "min": x.at[rows, i].min(-0.25),
        "mul": x.at[rows, i].mul(3.0),
        "clip": x.at[rows, i].add(1.0, mode="clip"),
        "windowed": table.at[i[:, 0]].add(vals),  # rows of a [5, 2] table, some dropped
        "vmapped": jax.vmap(lambda r, j: r.at[j].add(1.0))(x, i),  # operand batching dims
        "counts": jnp.zeros(5, jnp.int32).at[i.ravel()].add(1),
        "partial_window": lax.scatter_add(  # windows of 2 at 3 (fits), 4 and -1 (dropped)
            x[0] * x[-1],
            jnp.array([[3], [4], [-1]]),
            jnp.ones((3, 2)),
            lax.ScatterDimensionNumbers((1,), (), (0,)),
            mode=lax.GatherScatterMode.FILL_OR_DROP,
        ),
        "partial_window_clip": lax.scatter_add(
            x[0] * x[-1],
            jnp.array([[3], [4], [-1]]),
            jnp.ones((3, 2)),
            lax.ScatterDimensionNumbers((1,), (), (0,)),
            mode=lax.GatherScatterMode.CLIP,
        ),
    }


def _scatter_inputs(b: int) -> dict[str, np.ndarray]:
    i = np.random.default_rng(b).integers(-2, 7, size=(b, 3)).astype(np.int32)
    i[0] = [1, 1, 6]  # a duplicate and an out-of-bounds index
    return {"x": _normal(b, 5), "i": i}


def test_scatter_modes_duplicates_and_out_of_bounds():
    check(_scatters, {}, _scatter_inputs, tol=REL)


# --------------------------------------------------------------------------------------------
# Convolution.


class Convs(nn.Module):
    @nn.compact
    def __call__(self, a: dict[str, jax.Array]) -> dict[str, jax.Array]:
        seq, img = a["seq"], a["img"]  # [b, 9, 4], [b, 7, 6, 4]
        return {
            "c1_same": nn.Conv(6, (3,), padding="SAME")(seq),
            "c1_valid_strided": nn.Conv(3, (2,), strides=2, padding="VALID")(seq),
            "c1_dilated_groups": nn.Conv(4, (3,), kernel_dilation=2, feature_group_count=2)(seq),
            "c1_explicit": nn.Conv(2, (4,), padding=[(2, 1)])(seq),
            "c2_same": nn.Conv(5, (3, 3), padding="SAME")(img),
            "c2_valid_strided": nn.Conv(3, (2, 3), strides=(2, 1), padding="VALID")(img),
            "c2_dilated": nn.Conv(2, (2, 2), kernel_dilation=(2, 1), padding="SAME")(img),
            "c2_groups": nn.Conv(8, (3, 3), feature_group_count=4, padding=((1, 0), (0, 2)))(img),
            "c2_depthwise": nn.Conv(4, (3, 3), feature_group_count=4, strides=2)(img),
        }


def _conv_inputs(b: int) -> dict[str, np.ndarray]:
    return {"seq": _normal(b, 9, 4), "img": _normal(b, 7, 6, 4)}


def test_flax_conv_1d_2d():
    m = Convs()
    check(m.apply, _init(m, _conv_inputs(2)), _conv_inputs, tol=REL)


def test_conv_dimension_numbers_and_negative_padding():
    def fn(p: Any, x: jax.Array) -> jax.Array:  # NCHW input, OIHW kernel, NHWC-ish output
        return lax.conv_general_dilated(
            x, p["w"], (1, 2), [(-1, 1), (2, 0)], rhs_dilation=(1, 2),
            dimension_numbers=("NCHW", "OIHW", "NHWC"),
        )  # fmt: skip

    w = np.random.default_rng(1).normal(size=(3, 2, 2, 2)).astype(np.float32)
    check(fn, {"w": w}, lambda b: _normal(b, 2, 6, 7), tol=REL)


# --------------------------------------------------------------------------------------------
# searchsorted and digitize.

EDGES = np.array([-1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 2.0], np.float32)


def _queries(b: int) -> np.ndarray:
    q = np.round(_normal(b, 8) * 2) / np.float32(2)  # hits the edges exactly
    q[0, :4] = [np.nan, -0.0, -np.inf, np.inf]
    return q


@pytest.mark.parametrize("method", ["scan", "scan_unrolled", "compare_all", "sort"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_searchsorted(method, side):
    def fn(p: Any, q: jax.Array) -> dict[str, jax.Array]:
        # The 'sort' method's JAX implementation cannot trace a query of symbolic size
        # (it calls len() on it); per row (vmap over the batch) every shape is static.
        search = lambda e, x: jnp.searchsorted(e, x, side=side, method=method)  # noqa: E731
        out = {"rows": jax.vmap(search, in_axes=(None, 0))(EDGES, q)}
        if method != "sort":
            out["flat"] = search(EDGES, q)
            finite = jnp.where(jnp.isfinite(q), q, 1.0)  # TF casts NaN and inf differently
            out["int"] = search(jnp.arange(0, 9, 2), (finite * 4).astype(jnp.int32))
        return out

    check(fn, {}, _queries)


def test_searchsorted_sort_method_on_a_whole_batch_is_refused_clearly():
    fn = lambda p, q: jnp.searchsorted(EDGES, q, method="sort")  # noqa: E731
    with pytest.raises(ValueError, match="batch-size generic") as e:
        _jaxpr.TFModel(fn, {}, _queries(2))
    assert "method='sort'" in str(e.value) and "jax.vmap" in str(e.value)


@pytest.mark.parametrize("right", [False, True])
def test_digitize(right):
    def fn(p: Any, q: jax.Array) -> dict[str, jax.Array]:
        return {
            "increasing": jnp.digitize(q, EDGES, right=right),
            "decreasing": jnp.digitize(q, EDGES[::-1], right=right),
        }

    check(fn, {}, _queries)


# --------------------------------------------------------------------------------------------
# NaN outputs, end to end, and errors.


def test_nan_in_both_is_equal():
    def fn(p: Any, x: jax.Array) -> jax.Array:
        return jnp.sqrt(x) + jnp.log(x)  # NaN wherever x < 0, in JAX and in TF

    model = check(fn, {}, lambda b: _normal(b, 4))
    out = model(_normal(5, 4)).numpy()
    assert np.isnan(out).any() and not np.isnan(out).all()


class SequenceTower(nn.Module):
    """A GRU over the embedded history, concatenated with the pooled user embedding."""

    @nn.compact
    def __call__(self, acts: dict[str, jax.Array]) -> dict[str, jax.Array]:
        h, _ = nn.RNN(nn.GRUCell(6), return_carry=True)(acts["hist"])  # [b, 5, 4] -> [b, 6]
        x = jnp.concatenate([h, acts["user"]], -1)
        score = nn.Dense(1)(x)[:, 0]
        return {"score": score, "top": jnp.argsort(-h, axis=-1)[:, :2]}


def _small_embedding() -> je.Embedding:
    items = je.TableConfig(30, 4, combiner="mean", name="items")
    users = je.TableConfig(20, 3, combiner="sum", name="users")
    return je.Embedding(
        {
            "hist": je.FeatureConfig(items, max_sequence_length=5, name="history"),
            "user": je.FeatureConfig(users, name="user_id"),
        }
    )


def test_rnn_tower_over_a_sequence_feature_end_to_end(tmp_path):
    emb = _small_embedding()
    state = emb.init(jax.random.key(0))
    tower = SequenceTower()
    example = {"hist": np.zeros((2, 5, 4), np.float32), "user": np.zeros((2, 3), np.float32)}
    params = tower.init(jax.random.key(1), example)
    options = export.ExportOptions(sample_batch_sizes=(1, 4))
    path = export.save_serving_model(
        tmp_path / "m", emb, state, tower.apply, params, options=options
    )
    served = tf.saved_model.load(path).signatures["serving_default"]
    lengths = np.array([3, 0, 7, 1], np.int64)  # 7 > max_sequence_length: truncated
    ids = np.arange(lengths.sum(), dtype=np.int64) % 30
    user_lengths = np.array([1, 2, 1, 0], np.int64)
    user_ids = np.array([3, 4, 19, 0], np.int64)
    got = served(
        hist_ids=tf.constant(ids),
        hist_lengths=tf.constant(lengths),
        user_ids=tf.constant(user_ids),
        user_lengths=tf.constant(user_lengths),
    )
    acts = je.embedding_lookup(
        {
            "hist": je.Ragged.from_row_lengths(ids, lengths),
            "user": je.Ragged.from_row_lengths(user_ids, user_lengths),
        },
        None,
        emb.embedding_tables(state),
        emb.feature_config,
    )
    want = tower.apply(params, acts)
    np.testing.assert_allclose(got["score"].numpy(), np.asarray(want["score"]), **LOOSE)
    np.testing.assert_array_equal(got["top"].numpy(), np.asarray(want["top"]))


def test_model_with_nan_in_both_exports_and_verifies(tmp_path):
    emb = _small_embedding()
    state = emb.init(jax.random.key(0))

    def model(p: Any, acts: dict[str, jax.Array]) -> jax.Array:
        return jnp.log(acts["user"]) * p["s"]  # NaN for negative activations (and -inf at 0)

    path = export.save_serving_model(tmp_path / "m", emb, state, model, {"s": np.float32(2.0)})
    served = tf.saved_model.load(path).signatures["serving_default"]
    out = served(
        hist_ids=tf.constant([1, 2], tf.int64),
        hist_lengths=tf.constant([2, 0], tf.int64),
        user_ids=tf.constant([0, 1, 2], tf.int64),
        user_lengths=tf.constant([1, 2], tf.int64),
    )["output"].numpy()
    assert np.isnan(out).any()


def test_nan_on_one_side_names_nan_and_the_index(tmp_path, monkeypatch):
    from jaxembed.export import _saved_model

    emb = _small_embedding()
    state = emb.init(jax.random.key(0))
    real = _saved_model.jax_outputs

    def one_nan(*args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        out = {k: np.array(v) for k, v in real(*args, **kwargs).items()}
        out["score"][0] = np.nan
        return out

    monkeypatch.setattr(_saved_model, "jax_outputs", one_nan)
    model = lambda p, a: {"score": a["user"].sum(-1)}  # noqa: E731
    with pytest.raises(export.ExportVerificationError, match=r"'score' is NaN at \(0,\) in JAX"):
        export.save_serving_model(tmp_path / "m", emb, state, model, {})
    assert list(tmp_path.iterdir()) == []


def test_unsupported_primitive_names_it_the_source_line_and_a_workaround():
    def fn(p: Any, x: jax.Array) -> jax.Array:
        h = x * 2.0
        return jnp.abs(jnp.fft.fft(h, axis=-1))  # the line the error must name

    line = inspect.getsourcelines(fn)[1] + 2
    with pytest.raises(_jaxpr.UnsupportedPrimitiveError) as e:
        _jaxpr.TFModel(fn, {}, _normal(2, 4))
    message = str(e.value)
    assert e.value.primitive == "fft"
    assert "primitive 'fft'" in message
    assert f"{os.path.basename(__file__)}:{line} (" in message
    assert e.value.source.startswith(f"{__file__}:{line} (")
    assert e.value.source.endswith("fn)")
    assert "input pipeline" in message and "DFT matrix" in message


def test_unsupported_primitive_inside_a_loop_names_the_loop_body_line():
    def fn(p: Any, x: jax.Array) -> jax.Array:
        def body(i: jax.Array, c: jax.Array) -> jax.Array:
            return jnp.linalg.cholesky(c[:, :2, None] * c[:, None, :2] + jnp.eye(2))[:, 0]

        return lax.fori_loop(0, 2, body, x[:, :2])

    line = inspect.getsourcelines(fn)[1] + 2
    with pytest.raises(_jaxpr.UnsupportedPrimitiveError, match="primitive 'cholesky'") as e:
        _jaxpr.TFModel(fn, {}, _normal(2, 4))
    assert e.value.source.startswith(f"{__file__}:{line} (")
    assert e.value.source.endswith(".body)")
    assert "factorize outside the model" in str(e.value)


def test_prng_keys_computed_from_inputs():
    """fold_in of the inputs: the key data is uint32 in TF, hashed with threefry like JAX."""
    key = jax.random.key(7)

    def fn(p: Any, a: dict[str, jax.Array]) -> dict[str, jax.Array]:
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, a["ids"])  # a key per example
        draw = jax.vmap(lambda k: jax.random.uniform(k, (3,)))(keys)
        bits = jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))(keys)
        normal = jax.vmap(lambda k: jax.random.normal(k, (2,)))(keys)
        signed, amount = a["ids"] - 500_000, a["ids"] % 40  # amounts past the width: 0 or sign
        shifts = {
            "left": lax.shift_left(signed, amount),
            "logical": lax.shift_right_logical(signed, amount),
            "arithmetic": lax.shift_right_arithmetic(signed, amount),
            "unsigned": lax.shift_right_arithmetic(signed.astype(jnp.uint32), amount.astype("u4")),
        }
        return {"draw": draw, "bits": bits, "normal": normal, "shifts": shifts}

    def inputs(b: int) -> dict[str, np.ndarray]:
        ids = np.random.default_rng(b).integers(0, 10**6, size=b).astype(np.int32)
        ids[0] = 35  # a negative value shifted by 35
        return {"ids": ids}

    check(fn, {}, inputs, tol=REL)


def test_indexing_a_key_computed_at_run_time_is_refused():
    def fn(p: Any, x: jax.Array) -> jax.Array:
        k1, _ = jax.random.split(jax.random.fold_in(jax.random.key(0), x[0, 0].astype(jnp.int32)))
        return x + jax.random.uniform(k1, (3,))

    with pytest.raises(_jaxpr.UnsupportedPrimitiveError, match="PRNG key") as e:
        _jaxpr.TFModel(fn, {}, _normal(2, 3))
    assert "deterministic=True" in str(e.value)
