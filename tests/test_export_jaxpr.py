"""jaxembed.export._jaxpr: JAX functions translated to plain TF ops, checked against JAX.

Every check runs one TFModel on two batch sizes (the batch dimension is symbolic), eagerly and
inside a tf.function whose input_signature has a None batch dimension.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jaxembed.export import _jaxpr  # noqa: E402

BATCHES = (3, 7)
EXACT = {"rtol": 0.0, "atol": 0.0}
ELEMENTWISE = {"rtol": 1e-6, "atol": 1e-6}
MATMUL = {"rtol": 1e-5, "atol": 1e-5}

Acts = Callable[[int], Any]  # batch size -> activations pytree of numpy arrays


def _specs(example: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: tf.TensorSpec([None, *x.shape[1:]], tf.as_dtype(x.dtype)), example
    )


def _compare(got: Any, want: Any, tol: dict[str, float], exact: tuple[str, ...] = ()) -> None:
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
    want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want)
    assert got_def == want_def
    for (path, g), (_, w) in zip(got_leaves, want_leaves, strict=True):
        name = jax.tree_util.keystr(path)
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        if g.dtype == np.bool_ or np.issubdtype(g.dtype, np.integer) or name.strip("[]'") in exact:
            np.testing.assert_array_equal(g, w, err_msg=name)
        else:
            g64, w64 = g.astype(np.float64), w.astype(np.float64)
            np.testing.assert_allclose(g64, w64, err_msg=name, equal_nan=True, **tol)


def check(
    fn: Callable,
    params: Any,
    acts: Acts,
    tol: dict[str, float] = ELEMENTWISE,
    exact: tuple[str, ...] = (),
    model: _jaxpr.TFModel | None = None,
) -> _jaxpr.TFModel:
    """fn translated once, compared with JAX on every batch size, eagerly and in a tf.function."""
    model = model or _jaxpr.TFModel(fn, params, acts(2))
    serve = tf.function(model.__call__, input_signature=[_specs(acts(1))])
    _assert_stock_tf_ops(serve.get_concrete_function())
    reference = jax.jit(fn)
    for b in BATCHES:
        x = acts(b)
        want = reference(params, x)
        _compare(model(x), want, tol, exact)
        _compare(serve(x), want, tol, exact)
    return model


def _graph_ops(concrete: Any) -> tuple[set[str], int]:
    """The op types of a concrete function (its library included) and the largest Const."""
    graph_def = concrete.graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    largest = 0
    for node in nodes:
        if node.op == "Const":
            largest = max(largest, tf.make_ndarray(node.attr["value"].tensor).size)
    return {node.op for node in nodes}, largest


def _assert_stock_tf_ops(concrete: Any) -> None:
    ops, _ = _graph_ops(concrete)
    special = {op for op in ops if op.startswith(("Xla", "TPU")) or "PyFunc" in op}
    assert not special, special


def _rng(b: int) -> np.random.Generator:
    return np.random.default_rng(100 + b)


def _normal(b: int, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (_rng(b).normal(size=(b, *shape)) * scale).astype(np.float32)


def _ints(b: int, lo: int, hi: int, *shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + b).integers(lo, hi, size=(b, *shape)).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Primitive families.


def _float_inputs(b: int) -> dict[str, np.ndarray]:
    x = _normal(b, 5, scale=2.0)
    h = np.round(x * 2) / np.float32(2)  # half-integers: rounding ties
    h[0] = [0.49999997, -0.5, 2.5, -2.5, -1.4999999]
    return {
        "x": x,
        "p": np.abs(x) + np.float32(0.1),  # positive
        "u": np.tanh(x) * np.float32(0.9),  # in (-1, 1)
        "h": h,
    }


UNARY_EXACT: dict[str, Callable] = {
    "neg": lambda a: -a["x"],
    "abs": lambda a: jnp.abs(a["x"]),
    "sign": lambda a: jnp.sign(a["h"]),
    "floor": lambda a: jnp.floor(a["x"]),
    "ceil": lambda a: jnp.ceil(a["x"]),
    "round_away": lambda a: lax.round(a["h"], lax.RoundingMethod.AWAY_FROM_ZERO),
    "round_even": lambda a: jnp.round(a["h"]),
    "is_finite": lambda a: jnp.isfinite(jnp.log(a["x"])),
    "square": lambda a: jnp.square(a["x"]),
    "cube": lambda a: lax.integer_pow(a["x"], 3),
    "pow0": lambda a: lax.integer_pow(a["x"], 0),
    "copy": lambda a: jnp.array(a["x"], copy=True),
    "stop_gradient": lambda a: lax.stop_gradient(a["x"]),
    "reduce_precision_f32": lambda a: lax.reduce_precision(a["x"], 8, 23),
    "reduce_precision_bf16": lambda a: lax.reduce_precision(a["x"], 8, 7),
}

UNARY_APPROX: dict[str, Callable] = {
    "sqrt": lambda a: jnp.sqrt(a["p"]),
    "rsqrt": lambda a: lax.rsqrt(a["p"]),
    "cbrt": lambda a: jnp.cbrt(a["x"]),
    "exp": lambda a: jnp.exp(a["x"]),
    "exp2": lambda a: jnp.exp2(a["x"]),
    "expm1": lambda a: jnp.expm1(a["x"]),
    "log": lambda a: jnp.log(a["p"]),
    "log1p": lambda a: jnp.log1p(a["p"]),
    "tanh": lambda a: jnp.tanh(a["x"]),
    "logistic": lambda a: jax.nn.sigmoid(a["x"]),
    "sin": lambda a: jnp.sin(a["x"]),
    "cos": lambda a: jnp.cos(a["x"]),
    "tan": lambda a: jnp.tan(a["u"]),
    "asin": lambda a: jnp.arcsin(a["u"]),
    "acos": lambda a: jnp.arccos(a["u"]),
    "atan": lambda a: jnp.arctan(a["x"]),
    "sinh": lambda a: jnp.sinh(a["u"]),
    "cosh": lambda a: jnp.cosh(a["u"]),
    "asinh": lambda a: jnp.arcsinh(a["x"]),
    "acosh": lambda a: jnp.arccosh(a["p"] + 1),
    "atanh": lambda a: jnp.arctanh(a["u"]),
    "erf": lambda a: lax.erf(a["x"]),
    "erfc": lambda a: lax.erfc(a["x"]),
    "erf_inv": lambda a: lax.erf_inv(a["u"]),
    "inverse_square": lambda a: lax.integer_pow(a["p"], -2),  # TF rewrites 1 / x as Reciprocal
    "pow": lambda a: jnp.power(a["p"], a["x"]),
    "pow_scalar": lambda a: a["p"] ** 2.5,
    "atan2": lambda a: jnp.arctan2(a["x"], a["h"]),
}


def _family(fns: dict[str, Callable]) -> Callable:
    return lambda params, a: {name: f(a) for name, f in fns.items()}


def test_unary_elementwise():
    check(_family(UNARY_EXACT), {}, _float_inputs, tol=EXACT)
    check(_family(UNARY_APPROX), {}, _float_inputs, tol={"rtol": 2e-6, "atol": 1e-6})


BINARY_FLOAT: dict[str, Callable] = {
    "add": lambda a: a["x"] + a["h"],
    "sub": lambda a: a["x"] - a["h"],
    "mul": lambda a: a["x"] * a["h"],
    "div": lambda a: a["x"] / a["p"],
    "rem": lambda a: lax.rem(a["x"], a["p"] * jnp.sign(a["h"] + 0.25)),
    "max": lambda a: jnp.maximum(a["x"], a["h"]),
    "min": lambda a: jnp.minimum(a["x"], a["h"]),
    "broadcast_scalar": lambda a: a["x"] * 3.0 - 1,  # XLA fuses this into an FMA
    "broadcast_row": lambda a: a["x"] + jnp.arange(5.0),
}


def test_binary_float():
    exact = tuple(name for name in BINARY_FLOAT if name != "broadcast_scalar")
    check(_family(BINARY_FLOAT), {}, _float_inputs, exact=exact)


def _int_inputs(b: int) -> dict[str, np.ndarray]:
    return {
        "i": _ints(b, -20, 20, 6, seed=1),
        "j": _ints(b, -4, 5, 6, seed=2),  # includes 0: XLA's x / 0 == -1, x % 0 == x
        "f": _normal(b, 6, scale=5.0),
        "a": _ints(b, 0, 2, 6, seed=3).astype(bool),
        "c": _ints(b, 0, 2, 6, seed=4).astype(bool),
    }


INTEGER_AND_LOGIC: dict[str, Callable] = {
    "add": lambda a: a["i"] + a["j"],
    "mul": lambda a: a["i"] * a["j"],
    "div": lambda a: lax.div(a["i"], a["j"]),
    "rem": lambda a: lax.rem(a["i"], a["j"]),
    "floor_divide": lambda a: a["i"] // 3,
    "mod": lambda a: a["i"] % 3,
    "max": lambda a: jnp.maximum(a["i"], a["j"]),
    "min": lambda a: jnp.minimum(a["i"], a["j"]),
    "abs": lambda a: jnp.abs(a["j"]),
    "neg": lambda a: -a["j"],
    "sign": lambda a: jnp.sign(a["j"]),
    "square": lambda a: lax.integer_pow(a["j"], 2),
    "and": lambda a: a["i"] & a["j"],
    "or": lambda a: a["i"] | a["j"],
    "xor": lambda a: a["i"] ^ a["j"],
    "invert": lambda a: ~a["i"],
    "land": lambda a: a["a"] & a["c"],
    "lor": lambda a: a["a"] | a["c"],
    "lxor": lambda a: a["a"] ^ a["c"],
    "lnot": lambda a: ~a["a"],
    "bool_eq": lambda a: a["a"] == a["c"],
    "bool_lt": lambda a: a["a"] < a["c"],
    "bool_max": lambda a: jnp.maximum(a["a"], a["c"]),
    "where": lambda a: jnp.where(a["i"] > a["j"], a["i"], 7),
    "clip": lambda a: jnp.clip(a["i"], -3, 4),
    "to_float": lambda a: a["i"].astype(jnp.float32) / 2,
    "to_int": lambda a: a["f"].astype(jnp.int32),
    "to_bool": lambda a: a["j"].astype(bool),
    "bool_to_float": lambda a: a["a"].astype(jnp.float32),
    "float_to_bool": lambda a: jnp.floor(a["f"]).astype(bool),
}


def test_integer_and_logic_ops():
    model = check(_family(INTEGER_AND_LOGIC), {}, _int_inputs, tol=EXACT)
    # Eager inputs of another integer dtype are cast to the traced one.
    x = {k: v.astype(np.int64) if v.dtype == np.int32 else v for k, v in _int_inputs(4).items()}
    _compare(model(x), _family(INTEGER_AND_LOGIC)({}, _int_inputs(4)), EXACT)


COMPARE_SELECT: dict[str, Callable] = {
    "eq": lambda a: a["x"] == a["h"],
    "ne": lambda a: a["x"] != a["h"],
    "lt": lambda a: a["x"] < a["h"],
    "le": lambda a: a["h"] <= 0.5,
    "gt": lambda a: a["x"] > a["h"],
    "ge": lambda a: a["h"] >= a["x"],
    "where": lambda a: jnp.where(a["x"] > 0, a["x"], a["h"]),
    "where_scalar": lambda a: jnp.where(a["x"] > 0, a["x"], 0.0),
    "select_n3": lambda a: lax.select_n(
        jnp.clip(jnp.round(a["x"]), 0, 2).astype(jnp.int32), a["x"], a["h"], a["p"]
    ),
    "clamp": lambda a: lax.clamp(-0.5, a["x"], 0.75),
    "clip_arrays": lambda a: jnp.clip(a["x"], a["h"] - 1, a["h"] + 1),
    "relu": lambda a: jnp.maximum(a["x"], 0.0),
}


def test_comparisons_and_select():
    check(_family(COMPARE_SELECT), {}, _float_inputs, tol=EXACT)


def _shape_inputs(b: int) -> dict[str, np.ndarray]:
    return {"x": _normal(b, 6), "k": _ints(b, 0, 9, seed=5)}


SHAPES: dict[str, Callable] = {
    "reshape": lambda a: a["x"].reshape(-1, 2, 3),
    "flatten_all": lambda a: a["x"].reshape(-1),
    "transpose": lambda a: a["x"].reshape(-1, 2, 3).transpose(0, 2, 1),
    "swap_batch": lambda a: a["x"].T,
    "broadcast": lambda a: jnp.broadcast_to(a["x"][:, None, :], (a["x"].shape[0], 4, 6)),
    "expand_squeeze": lambda a: jnp.squeeze(jnp.expand_dims(a["x"], 1), 1) + a["x"][:, None, :],
    "concat": lambda a: jnp.concatenate([a["x"], a["x"] * 2], axis=1),
    "concat_batch": lambda a: jnp.concatenate([a["x"], a["x"][:1]], axis=0),
    "slice": lambda a: a["x"][:, 1:5:2],
    "slice_batch": lambda a: a["x"][1:],
    "stride_batch": lambda a: a["x"][::2],
    "flip": lambda a: jnp.flip(a["x"], (0, 1)),
    "pad": lambda a: jnp.pad(a["x"], ((0, 0), (1, 2)), constant_values=3.0),
    "pad_negative": lambda a: lax.pad(a["x"], 0.5, [(1, 0, 0), (-1, 2, 0)]),
    "arange_batch": lambda a: jnp.arange(a["x"].shape[0]) * 2,
    "iota_2d": lambda a: lax.broadcasted_iota(jnp.float32, a["x"].shape, 1) + a["x"],
    "split": lambda a: jnp.split(a["x"], [2], axis=1)[1],
    "stack": lambda a: jnp.stack([a["x"], 2 * a["x"]], axis=1),
    "unstack": lambda a: jnp.unstack(a["x"], axis=1)[2],
    "tile": lambda a: jnp.tile(a["x"], (1, 2)),
    "repeat": lambda a: jnp.repeat(a["x"], 2, axis=1),
    "batch_size_value": lambda a: a["x"] * a["x"].shape[0],
    "dynamic_slice": lambda a: lax.dynamic_slice_in_dim(a["x"], a["k"][0], 3, axis=1),
    "dynamic_update_slice": lambda a: lax.dynamic_update_slice(
        a["x"], jnp.zeros((a["x"].shape[0], 2)), (0, a["k"][-1])
    ),
}


def test_shape_ops():
    check(_family(SHAPES), {}, _shape_inputs, tol=EXACT)


def _reduction_inputs(b: int) -> dict[str, np.ndarray]:
    x = _normal(b, 4, 5)
    x[0, 1, 2] = x[0, 1, 3]  # a tie for argmax/argmin/top_k
    return {"x": x, "i": _ints(b, -5, 6, 4, 5, seed=6)}


REDUCTIONS: dict[str, Callable] = {
    "sum": lambda a: a["x"].sum(axis=2),
    "sum_two_axes": lambda a: a["x"].sum(axis=(1, 2)),
    "sum_batch": lambda a: a["x"].sum(axis=0),
    "mean": lambda a: a["x"].mean(axis=1),
    "mean_batch": lambda a: a["x"].mean(axis=0),
    "max": lambda a: a["x"].max(axis=2),
    "min": lambda a: a["x"].min(axis=(0, 1)),
    "prod": lambda a: (a["x"] * 0.5 + 1).prod(axis=1),
    "int_sum": lambda a: a["i"].sum(axis=2),
    "int_max": lambda a: a["i"].max(axis=1),
    "any": lambda a: (a["x"] > 1).any(axis=2),
    "all": lambda a: (a["x"] > -1).all(axis=2),
    "argmax": lambda a: jnp.argmax(a["x"], axis=2),
    "argmin": lambda a: jnp.argmin(a["x"], axis=1),
    "argmax_int": lambda a: jnp.argmax(a["i"], axis=2),
    "cumsum": lambda a: jnp.cumsum(a["x"], axis=2),
    "cumsum_batch": lambda a: jnp.cumsum(a["i"], axis=0),
    "cumprod": lambda a: jnp.cumprod(a["x"] * 0.5 + 1, axis=1),
    "cummax": lambda a: lax.cummax(a["x"], axis=2),
    "cummin_reverse": lambda a: lax.cummin(a["i"], axis=1, reverse=True),
    "top_k": lambda a: lax.top_k(a["x"], 3),
    "logsumexp": lambda a: jax.nn.logsumexp(a["x"], axis=-1),
    "norm": lambda a: jnp.linalg.norm(a["x"], axis=-1),
}


def test_reductions():
    check(_family(REDUCTIONS), {}, _reduction_inputs, tol=ELEMENTWISE)


def _dot_inputs(b: int) -> dict[str, np.ndarray]:
    return {
        "x": _normal(b, 6),
        "f": _normal(b, 4, 3),
        "q": _ints(b, -100, 100, 6, seed=7).astype(np.int8),
    }


_DOT_PARAMS = {
    "w": np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32),
    "t": np.random.default_rng(2).normal(size=(4, 3, 5)).astype(np.float32),
    "v": np.random.default_rng(3).normal(size=(3,)).astype(np.float32),
    "q": np.random.default_rng(4).integers(-100, 100, size=(6, 2)).astype(np.int8),
}


def _dots(p: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
    x, f = a["x"], a["f"]
    return {
        "matmul": x @ p["w"],
        "batched": jnp.einsum("bfd,bgd->bfg", f, f),
        "matmul_batched": jnp.matmul(f, jnp.swapaxes(f, 1, 2)),
        "outer": jnp.einsum("bi,bj->bij", x, x),
        "over_batch": x.T @ x,
        "two_contracting": jnp.einsum("bij,ijk->bk", f, p["t"]),
        "vector": f @ p["v"],
        "int8_to_int32": lax.dot_general(
            a["q"], p["q"], (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
        ),
        "int8_wraps": lax.dot_general(a["q"], p["q"], (((1,), (0,)), ((), ()))),
        "bf16_to_f32": jnp.matmul(
            x.astype(jnp.bfloat16),
            p["w"].astype(jnp.bfloat16),
            preferred_element_type=jnp.float32,
        ),
    }


def test_dot_general():
    check(_dots, _DOT_PARAMS, _dot_inputs, tol=MATMUL)


def _gather_inputs(b: int) -> dict[str, np.ndarray]:
    rows = _ints(b, 0, 10, seed=8)
    rows[0] = 12  # out of range: fill / clip
    rows[-1] = -3
    return {
        "x": _normal(b, 6),
        "cube": _normal(b, 4, 4),
        "ids": _ints(b, 0, 6, 2, seed=9),
        "rows": rows,
        "in_range": _ints(b, 0, 10, 2, seed=10),
        "perm": ((np.arange(b) * 3 + 1) % b).astype(np.int32),
    }


_TABLE = np.random.default_rng(5).normal(size=(10, 4)).astype(np.float32)
_TRIU = np.triu_indices(4, 1)


def _gathers(p: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
    x, t = a["x"], p["table"]
    b = x.shape[0]
    i, j = jnp.triu_indices(4, k=1)
    return {
        "const_columns": x[:, np.array([5, 0, 3])],
        "const_negative": x[:, jnp.array([5, -1, 3])],
        "take_fill": jnp.take(t, a["rows"], axis=0),
        "take_clip": jnp.take(t, a["rows"], axis=0, mode="clip"),
        "take_const_fill": jnp.take(x, np.array([1, 7, -8]), axis=1, mode="fill"),
        "embedding_2d": t[a["in_range"]],
        "rows_and_window": t[a["in_range"][:, 0], 1:3],
        "take_along_axis": jnp.take_along_axis(x, a["ids"], axis=1),
        "pairs": x[jnp.arange(b), a["ids"][:, 0]],
        "batch_rows": x[a["perm"]],
        "triu_numpy": a["cube"][:, _TRIU[0], _TRIU[1]],
        "triu_jax": a["cube"][:, i, j],
    }


def test_gather_patterns():
    check(_gathers, {"table": _TABLE}, _gather_inputs, tol=EXACT)


# A large closed-over constant inside a nested jit becomes a tf.Variable.
_BIG = np.linspace(-1, 1, 6 * 400, dtype=np.float32).reshape(6, 400)


@jax.jit
def _inner(x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ _BIG) @ _BIG.T


@jax.custom_vjp
def _custom_vjp_fn(x: jax.Array) -> jax.Array:
    return jnp.sin(x) * 2


_custom_vjp_fn.defvjp(lambda x: (_custom_vjp_fn(x), x), lambda x, g: (g * jnp.cos(x) * 2,))


@jax.custom_jvp
def _custom_jvp_fn(x: jax.Array) -> jax.Array:
    return jnp.log1p(jnp.exp(x))


_custom_jvp_fn.defjvp(lambda primals, tangents: (_custom_jvp_fn(*primals), tangents[0]))


def _nested(p: Any, a: dict[str, Any]) -> dict[str, Any]:
    x = a["x"]
    return {
        "jit": _inner(x),
        "jit_in_jit": jax.jit(lambda y: _inner(y) + jax.jit(jnp.sin)(y))(x),
        "relu": jax.nn.relu(x),
        "softplus": jax.nn.softplus(x),
        "custom_jvp": _custom_jvp_fn(x),
        "custom_vjp": _custom_vjp_fn(x),
        "checkpoint": jax.checkpoint(lambda y: jnp.cos(y) * y)(x),
        "folded_sort": x + jnp.sort(jnp.array([3.0, 1.0, 2.0, 0.0, 5.0, 4.0])),
        "passthrough": x,
        "constant": jnp.arange(2000.0),
    }


def test_nested_jaxprs():
    model = check(_nested, {}, lambda b: {"x": _normal(b, 6)}, tol=MATMUL)
    # One variable per distinct large constant, however many jaxprs close over it.
    shapes = sorted(tuple(v.shape) for v in model._const_variables)
    assert shapes == [(6, 400), (400, 6), (2000,)]


# --------------------------------------------------------------------------------------------
# Flax models.


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(16)(x))
        x = nn.gelu(nn.Dense(16)(x), approximate=True)
        x = nn.gelu(nn.Dense(16)(x), approximate=False)
        x = nn.Dropout(0.5, deterministic=True)(x)
        x = nn.tanh(nn.Dense(8)(x)) + nn.softplus(x[:, :8]) + nn.sigmoid(x[:, 8:])
        return nn.Dense(1)(x)


class GeneralAndNorms(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        h = nn.DenseGeneral((3, 4))(x)  # [b, 3, 4]
        h = nn.LayerNorm()(h)
        h = nn.DenseGeneral(5, axis=(-2, -1))(h)
        h = nn.BatchNorm(use_running_average=True)(h)
        h = jnp.exp(-jnp.abs(h)) + jnp.log(jnp.abs(h) + 1) * lax.rsqrt(h * h + 1)
        return {"softmax": nn.softmax(h), "log_softmax": nn.log_softmax(h, axis=-1)}


class DLRM(nn.Module):
    """Bottom MLP, dot interaction of the feature vectors, top MLP."""

    num_sparse: int = 3
    dim: int = 4
    jax_triu: bool = False

    @nn.compact
    def __call__(self, a: dict[str, jax.Array]) -> jax.Array:
        dense = nn.relu(nn.Dense(self.dim)(a["dense"]))  # [b, d]
        x = jnp.concatenate([dense[:, None, :], a["sparse"]], axis=1)  # [b, f, d]
        z = (
            jnp.einsum("bfd,bgd->bfg", x, x)
            if self.jax_triu
            else jnp.matmul(x, x.transpose(0, 2, 1))
        )
        f = self.num_sparse + 1
        i, j = jnp.triu_indices(f, k=1) if self.jax_triu else np.triu_indices(f, k=1)
        h = jnp.concatenate([dense, z[:, i, j]], axis=1)
        h = nn.relu(nn.Dense(8)(h))
        return nn.Dense(1)(h)[:, 0]


class DCNv2(nn.Module):
    layers: int = 3

    @nn.compact
    def __call__(self, a: dict[str, jax.Array]) -> dict[str, jax.Array]:
        x0 = jnp.concatenate([a["dense"], a["sparse"].reshape(a["sparse"].shape[0], -1)], axis=1)
        x = x0
        for _ in range(self.layers):
            x = x0 * nn.Dense(x0.shape[-1])(x) + x
        deep = nn.relu(nn.Dense(8)(x0))
        logit = nn.Dense(1)(jnp.concatenate([x, deep], axis=1))[:, 0]
        return {"ctr": nn.sigmoid(logit), "score": logit * 2 + 1}


class IntegerTower(nn.Module):
    @nn.compact
    def __call__(self, a: dict[str, jax.Array]) -> dict[str, jax.Array]:
        ids = a["ids"]
        valid = ids >= 0
        count = valid.sum(axis=1, keepdims=True)
        h = nn.Dense(4)(a["dense"])
        masked = jnp.where(valid[:, :, None], h[:, None, :] * ids[:, :, None], 0.0)
        pooled = masked.sum(axis=1) / jnp.maximum(count, 1)
        return {
            "pooled": pooled,
            "best": jnp.argmax(pooled, axis=-1),
            "count": count[:, 0],
            "max_id": ids.max(axis=1),
            "mean": pooled.mean(axis=-1),
            "any_valid": valid.any(axis=1),
        }


def _dense(b: int, n: int = 5) -> np.ndarray:
    return _normal(b, n)


def _recsys_inputs(b: int) -> dict[str, np.ndarray]:
    return {"dense": _dense(b), "sparse": _normal(b, 3, 4, scale=0.5)}


def _init(module: nn.Module, example: Any) -> Any:
    """Random variables of the module's shapes (cheaper than running Flax's initializers)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), example)
    rng = np.random.default_rng(7)

    def fill(path: Any, s: jax.ShapeDtypeStruct) -> np.ndarray:
        if jax.tree_util.keystr(path).endswith("['var']"):  # BatchNorm running variance
            return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
        return (rng.normal(size=s.shape) * 0.5).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_flax_mlp():
    m = MLP()
    check(m.apply, _init(m, _dense(2)), _dense, tol=MATMUL)


def test_flax_dense_general_layer_norm_batch_norm_softmax():
    m = GeneralAndNorms()
    check(m.apply, _init(m, _dense(2)), _dense, tol=MATMUL)


@pytest.fixture(scope="module")
def dlrm() -> tuple[DLRM, Any, _jaxpr.TFModel]:
    m = DLRM()
    params = _init(m, _recsys_inputs(2))
    return m, params, _jaxpr.TFModel(m.apply, params, _recsys_inputs(2))


def test_flax_dlrm_numpy_triu(dlrm):
    m, params, model = dlrm
    check(m.apply, params, _recsys_inputs, tol=MATMUL, model=model)


def test_flax_dlrm_jax_triu():
    m = DLRM(jax_triu=True)
    check(m.apply, _init(m, _recsys_inputs(2)), _recsys_inputs, tol=MATMUL)


def test_flax_dcn_v2_multi_output():
    m = DCNv2()
    model = check(m.apply, _init(m, _recsys_inputs(2)), _recsys_inputs, tol=MATMUL)
    assert model.output_paths == ["ctr", "score"]


def test_flax_integer_tower():
    m = IntegerTower()

    def inputs(b: int) -> dict[str, np.ndarray]:
        return {"dense": _dense(b, 3), "ids": _ints(b, -1, 9, 4, seed=11)}

    check(m.apply, _init(m, inputs(2)), inputs, tol=MATMUL)


# --------------------------------------------------------------------------------------------
# Variables, constants, SavedModel, errors.


def test_params_are_variables_and_constants_stay_small():
    big_const = np.arange(20 * 64, dtype=np.float32).reshape(20, 64) / 1280

    class Wide(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            h = nn.Dense(64, name="wide")(x)  # kernel [1000, 64]
            folded = jnp.ones((64, 64)) * 0.5  # a folded constant of 4096 elements
            return jnp.tanh(h @ folded) @ big_const.T

    m = Wide()
    params = _init(m, np.zeros((2, 1000), np.float32))
    model = check(m.apply, params, lambda b: _normal(b, 1000, scale=0.05), tol=MATMUL)

    assert sorted(model.param_variables) == ["params.wide.bias", "params.wide.kernel"]
    kernel = model.param_variables["params.wide.kernel"]
    assert kernel.name == "model/params.wide.kernel:0"
    np.testing.assert_array_equal(kernel.numpy(), params["params"]["wide"]["kernel"])
    assert not kernel.trainable
    assert sorted(v.shape.num_elements() for v in model._const_variables) == [1280, 4096]

    serve = tf.function(model.__call__, input_signature=[tf.TensorSpec([None, 1000], tf.float32)])
    ops, largest = _graph_ops(serve.get_concrete_function())
    assert largest <= 1024
    assert "ReadVariableOp" in ops


def test_saved_model_round_trip(dlrm, tmp_path):
    m, params, model = dlrm
    specs = _specs(_recsys_inputs(1))

    class Serving(tf.Module):
        def __init__(self, tf_model: _jaxpr.TFModel):
            super().__init__()
            self.tf_model = tf_model

        @tf.function(input_signature=[specs["dense"], specs["sparse"]])
        def serve(self, dense: tf.Tensor, sparse: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"logit": self.tf_model({"dense": dense, "sparse": sparse})}

    module = Serving(model)
    _assert_stock_tf_ops(module.serve.get_concrete_function())
    path = str(tmp_path / "saved")
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    loaded = tf.saved_model.load(path)
    for b in BATCHES:
        x = _recsys_inputs(b)
        want = np.asarray(m.apply(params, x))
        np.testing.assert_allclose(loaded.serve(**x)["logit"].numpy(), want, **MATMUL)
        out = loaded.signatures["serving_default"](**{k: tf.constant(v) for k, v in x.items()})
        np.testing.assert_allclose(out["logit"].numpy(), want, **MATMUL)


def _transposed_conv(p: Any, x: jax.Array) -> jax.Array:
    """A convolution with input (lhs) dilation, i.e. a transposed convolution."""
    kernel = jnp.ones((1, 1, 2))  # OIW; x[:, None] is NCW
    return lax.conv_general_dilated(x[:, None], kernel, (1,), [(1, 1)], lhs_dilation=(2,))


def _window_gather(p: Any, x: jax.Array) -> jax.Array:
    """Two windows of size batch - 1 along the (indexed) batch dimension."""
    dn = lax.GatherDimensionNumbers(
        offset_dims=(1, 2), collapsed_slice_dims=(), start_index_map=(0,)
    )
    idx = jnp.array([[0], [1]], jnp.int32)
    return lax.gather(x, idx, dn, slice_sizes=(x.shape[0] - 1, x.shape[1]), mode="clip")


@pytest.mark.parametrize(
    ("fn", "primitive"),
    [
        (lambda p, x: jnp.fft.fft(x).real, "fft"),
        (_transposed_conv, "conv_general_dilated"),
        (
            lambda p, x: jnp.linalg.cholesky(x[:, :2, None] * x[:, None, :2] + jnp.eye(2)),
            "cholesky",
        ),
        (lambda p, x: lax.pad(x, 0.0, [(0, 0, 0), (0, 0, 1)]), "pad"),
        (_window_gather, "gather"),
        (lambda p, x: x[:10], "gather"),  # shape min(batch, 10)
    ],
)
def test_unsupported_primitive_raises_at_construction(fn, primitive):
    with pytest.raises(_jaxpr.UnsupportedPrimitiveError, match=f"primitive '{primitive}'") as e:
        _jaxpr.TFModel(fn, {}, np.ones((2, 3), np.float32))
    assert e.value.primitive == primitive
    assert "model=None" in str(e.value)


def test_model_must_be_batch_size_generic():
    with pytest.raises(ValueError, match="batch-size generic"):
        _jaxpr.TFModel(lambda p, x: x + jnp.ones((2, 3)), {}, np.ones((2, 3), np.float32))


def test_single_output_structure():
    model = _jaxpr.TFModel(lambda p, x: x * p["s"], {"s": np.float32(2)}, np.ones((2, 3), "f4"))
    assert model.output_paths is None
    assert model.output_structure == jax.tree_util.tree_structure(0)
    np.testing.assert_array_equal(model(np.ones((4, 3), np.float32)).numpy(), np.full((4, 3), 2))
