"""Translate a JAX function into plain TensorFlow ops by interpreting its jaxpr.

``TFModel(fn, params, example_activations)`` traces ``fn(params, activations)`` with
``jax.make_jaxpr``, the leading (batch) dimension of every activation symbolic, and compiles the
jaxpr into a small program: each equation whose inputs are all known constants is evaluated with
JAX right away (constant folding), nested jaxprs (``jit``, ``custom_jvp_call``, ``remat`` ...) are
compiled recursively, and every remaining equation must have a rule in ``_RULES`` (a standard TF
op) or construction fails with ``UnsupportedPrimitiveError``. Calling the module runs the program
on TF tensors, so a ``tf.function`` of it holds only stock TF ops (einsum, gather_nd, where, ...)
that CPU TensorFlow Serving runs: no ``XlaCallModule``, no ``Xla*`` ops. The params are
``tf.Variable``s, as are constants larger than ``_MAX_CONST_SIZE`` elements, so the GraphDef stays
small. Shapes that contain the symbolic batch dimension are evaluated at run time from
``tf.shape`` of the first activation.

Semantics follow XLA's where TF differs: integer division truncates (x / 0 == -1, x % 0 == x),
gather and dynamic_slice clamp their start indices, FILL_OR_DROP gathers are masked with the fill
value. Transcendental functions, rsqrt and 1 / x (which TF's graph optimizer turns into
Reciprocal) may differ from XLA in the last bits; so may float32 matmuls and sums (summation
order) and anything XLA fuses into FMAs. Float-to-int conversion of NaN or out-of-range values
and argmax/argmin over NaNs follow TF.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.extend.core as jex
import numpy as np

from ._tf import tf

__all__ = ["TFModel", "UnsupportedPrimitiveError"]

_MAX_CONST_SIZE = 1024  # constants with more elements become tf.Variables
_BATCH = "batch"
_DimExpr = type(jax.export.symbolic_shape(_BATCH)[0])


class UnsupportedPrimitiveError(ValueError):
    """A primitive of the model's jaxpr (or one of its configurations) has no TF translation."""

    def __init__(self, primitive: str, reason: str = ""):
        self.primitive = primitive
        detail = f" ({reason})" if reason else ""
        super().__init__(
            f"jaxembed.export cannot translate the JAX primitive {primitive!r}{detail} to "
            "TensorFlow ops (in the model's jaxpr). Supported primitives: "
            f"{', '.join(sorted([*_RULES, *_CALL_PRIMITIVES]))}. Rewrite the model with supported "
            "operations, or export without the model (model=None)."
        )


# --------------------------------------------------------------------------------------------
# Run-time context: the batch size and symbolic-shape evaluation.


class _TFDim:
    """An int64 scalar tensor with the arithmetic that ``DimExpr._evaluate`` applies to it."""

    def __init__(self, t: tf.Tensor):
        self.t = t

    @staticmethod
    def _v(x: Any) -> Any:
        return x.t if isinstance(x, _TFDim) else tf.constant(int(x), tf.int64)

    def __add__(self, o: Any) -> _TFDim:
        return _TFDim(self.t + self._v(o))

    __radd__ = __add__

    def __mul__(self, o: Any) -> _TFDim:
        return _TFDim(self.t * self._v(o))

    __rmul__ = __mul__

    def __divmod__(self, o: Any) -> tuple[_TFDim, _TFDim]:
        o = self._v(o)
        return _TFDim(tf.math.floordiv(self.t, o)), _TFDim(tf.math.floormod(self.t, o))

    def __rdivmod__(self, o: Any) -> tuple[_TFDim, _TFDim]:
        o = self._v(o)
        return _TFDim(tf.math.floordiv(o, self.t)), _TFDim(tf.math.floormod(o, self.t))


@dataclass
class _Ctx:
    batch: tf.Tensor  # int64 scalar

    def dim(self, d: Any) -> int | tf.Tensor:
        """A static dimension as an int, a symbolic one as an int64 scalar tensor."""
        if not isinstance(d, _DimExpr):
            return int(d)
        try:
            v = d._evaluate({_BATCH: _TFDim(self.batch)})
        except Exception as e:  # max/min of dimensions, e.g. from x[:10]
            raise ValueError(
                f"jaxembed.export cannot evaluate the symbolic dimension {d} with TF ops; "
                "write the model so that shapes are sums and products of the batch size "
                "(and floor divisions by constants)."
            ) from e
        return v.t if isinstance(v, _TFDim) else int(v)

    def shape(self, dims: Sequence[Any]) -> list[int] | tf.Tensor:
        """A shape as a list of ints when static, else an int64 vector tensor."""
        vals = [self.dim(d) for d in dims]
        if all(isinstance(v, int) for v in vals):
            return vals
        return tf.stack([tf.constant(v, tf.int64) if isinstance(v, int) else v for v in vals])

    def shape64(self, dims: Sequence[Any]) -> tf.Tensor:
        """A shape as an int64 vector tensor (for ops whose index arguments share one dtype)."""
        return tf.cast(self.shape(dims), tf.int64) if dims else tf.zeros([0], tf.int64)


def _is_static(shape: Sequence[Any]) -> bool:
    return not any(isinstance(d, _DimExpr) for d in shape)


def _symbolic_dims(x: Any) -> list[Any]:
    """The symbolic dimensions in a param value (nested tuples and lists)."""
    if isinstance(x, _DimExpr):
        return [x]
    if isinstance(x, list | tuple):
        return [d for y in x for d in _symbolic_dims(y)]
    return []


def _check_symbolic_dims(eqn: jex.JaxprEqn) -> str | None:
    """Whether every symbolic dimension of the equation can be computed with TF ops."""
    dims = _symbolic_dims(list(eqn.params.values()))
    dims += _symbolic_dims([v.aval.shape for v in eqn.outvars if hasattr(v.aval, "shape")])
    probe = _Ctx(batch=tf.constant(2, tf.int64))
    for d in dims:
        try:
            probe.dim(d)
        except ValueError:
            return f"the symbolic dimension {d} cannot be computed with TF ops"
    return None


# --------------------------------------------------------------------------------------------
# Translation rules: rule(ctx, eqn, *inputs) -> tensor (or list of tensors for multiple results).

Rule = Callable[..., Any]


def _tf_dtype(eqn: jex.JaxprEqn, i: int = 0) -> tf.DType:
    return tf.as_dtype(eqn.outvars[i].aval.dtype)


def _ndim(eqn: jex.JaxprEqn, i: int = 0) -> int:
    return len(eqn.invars[i].aval.shape)


def _is_bool(x: tf.Tensor) -> bool:
    return x.dtype == tf.bool


def _is_int(x: tf.Tensor) -> bool:
    return x.dtype.is_integer


def _unary(fn: Callable[[tf.Tensor], tf.Tensor]) -> Rule:
    return lambda ctx, eqn, x: fn(x)


def _binary(fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]) -> Rule:
    return lambda ctx, eqn, x, y: fn(x, y)


def _identity(ctx: _Ctx, eqn: jex.JaxprEqn, *xs: tf.Tensor) -> Any:
    return list(xs) if eqn.primitive.multiple_results else xs[0]


def _bool_or(bool_fn: Callable, int_fn: Callable) -> Rule:
    """Logical op for booleans, bitwise (or arithmetic) op for numbers."""
    return lambda ctx, eqn, *xs: (bool_fn if _is_bool(xs[0]) else int_fn)(*xs)


def _div(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    if not _is_int(x):
        return tf.math.divide(x, y)
    # XLA: integer division truncates toward zero and x / 0 is -1 (all bits set).
    zero = tf.equal(y, 0)
    q = tf.truncatediv(x, tf.where(zero, tf.ones_like(y), y))
    return tf.where(zero, tf.bitwise.invert(tf.zeros_like(q)), q)


def _rem(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    if not _is_int(x):
        return tf.truncatemod(x, y)  # C fmod: the sign of the dividend, like XLA
    zero = tf.equal(y, 0)  # XLA: x % 0 == x
    r = tf.truncatemod(x, tf.where(zero, tf.ones_like(y), y))
    return tf.where(zero, x + tf.zeros_like(r), r)


def _pow(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.pow(x, tf.cast(y, x.dtype))


def _integer_pow(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
    """x ** y by repeated squaring (the multiplication order of XLA's expansion)."""
    y = int(eqn.params["y"])
    if y == 0:
        return tf.ones_like(x)
    n, acc, base = abs(y), None, x
    while n:
        if n & 1:
            acc = base if acc is None else acc * base
        n >>= 1
        if n:
            base = base * base
    return tf.math.divide(tf.ones_like(acc), acc) if y < 0 else acc


def _round(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
    if int(eqn.params["rounding_method"]) == 1:  # TO_NEAREST_EVEN
        return tf.round(x)
    # AWAY_FROM_ZERO: trunc(x) plus sign(x) when the fraction (exact in floating point) >= 0.5.
    t = tf.where(x < 0, tf.math.ceil(x), tf.math.floor(x))
    return t + tf.where(tf.abs(x - t) >= 0.5, tf.sign(x), tf.zeros_like(x))


def _cbrt(x: tf.Tensor) -> tf.Tensor:
    return tf.sign(x) * tf.pow(tf.abs(x), tf.constant(1.0 / 3.0, x.dtype))


def _max(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.logical_or(x, y) if _is_bool(x) else tf.maximum(x, y)


def _min(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.logical_and(x, y) if _is_bool(x) else tf.minimum(x, y)


def _compare(fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]) -> Rule:
    def rule(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        if _is_bool(x) and fn not in (tf.equal, tf.not_equal):
            x, y = tf.cast(x, tf.int8), tf.cast(y, tf.int8)
        return fn(x, y)

    return rule


def _not(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
    return tf.logical_not(x) if _is_bool(x) else tf.bitwise.invert(x)


def _convert_element_type(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
    return tf.cast(x, _tf_dtype(eqn))


def _clamp(ctx: _Ctx, eqn: jex.JaxprEqn, lo: tf.Tensor, x: tf.Tensor, hi: tf.Tensor) -> tf.Tensor:
    return tf.minimum(tf.maximum(x, lo), hi)


def _select_n(ctx: _Ctx, eqn: jex.JaxprEqn, pred: tf.Tensor, *cases: tf.Tensor) -> tf.Tensor:
    if _is_bool(pred):
        return tf.where(pred, cases[1], cases[0]) if len(cases) == 2 else cases[0]
    out = cases[0]
    for i, case in enumerate(cases[1:], start=1):
        out = tf.where(tf.equal(pred, i), case, out)
    return out


# Shape ops.


def _reshape(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
    dims = eqn.params.get("dimensions")
    if dims is not None:
        x = tf.transpose(x, list(dims))
    return tf.reshape(x, ctx.shape(eqn.params["new_sizes"]))


def _to_out_shape(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
    return tf.reshape(x, ctx.shape(eqn.outvars[0].aval.shape))


def _broadcast_in_dim(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
    shape, bdims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    for axis in range(len(shape)):
        if axis not in bdims:
            x = tf.expand_dims(x, axis)
    if tuple(eqn.invars[0].aval.shape) == tuple(shape):
        return x
    return tf.broadcast_to(x, ctx.shape(shape))


def _concatenate(ctx: _Ctx, eqn: jex.JaxprEqn, *xs: tf.Tensor) -> tf.Tensor:
    return tf.concat(list(xs), axis=int(eqn.params["dimension"]))


def _slice(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
    strides = eqn.params["strides"] or (1,) * _ndim(eqn)
    return tf.strided_slice(
        x,
        ctx.shape64(eqn.params["start_indices"]),
        ctx.shape64(eqn.params["limit_indices"]),
        ctx.shape64(strides),
    )


def _clamped_starts(
    ctx: _Ctx, operand_shape: Sequence[Any], sizes: Sequence[Any], starts: Sequence[tf.Tensor]
) -> tf.Tensor:
    """XLA clamps dynamic start indices so that the slice fits in the operand."""
    out = []
    for dim, size, start in zip(operand_shape, sizes, starts, strict=True):
        hi = tf.cast(ctx.dim(dim), tf.int64) - tf.cast(ctx.dim(size), tf.int64)
        out.append(tf.clip_by_value(tf.cast(start, tf.int64), tf.constant(0, tf.int64), hi))
    return tf.stack(out) if out else tf.zeros([0], tf.int64)


def _dynamic_slice(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor, *starts: tf.Tensor) -> tf.Tensor:
    sizes = eqn.params["slice_sizes"]
    begin = _clamped_starts(ctx, eqn.invars[0].aval.shape, sizes, starts)
    return tf.slice(x, begin, ctx.shape64(sizes))


def _dynamic_update_slice(
    ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor, update: tf.Tensor, *starts: tf.Tensor
) -> tf.Tensor:
    op_shape, upd_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    begin = _clamped_starts(ctx, op_shape, upd_shape, starts)
    after = ctx.shape64(op_shape) - begin - ctx.shape64(upd_shape)
    paddings = tf.stack([begin, after], axis=1)
    mask = tf.pad(tf.ones_like(update, dtype=tf.bool), paddings)
    return tf.where(mask, tf.pad(update, paddings), x)


def _stack(ctx: _Ctx, eqn: jex.JaxprEqn, *xs: tf.Tensor) -> tf.Tensor:
    return tf.stack(xs, axis=eqn.params["axis"])


def _unstack(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> list[tf.Tensor]:
    return tf.unstack(x, num=len(eqn.outvars), axis=eqn.params["axis"])


def _transpose(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
    return tf.transpose(x, list(eqn.params["permutation"]))


def _rev(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
    return tf.reverse(x, list(eqn.params["dimensions"]))


def _pad(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor, value: tf.Tensor) -> tf.Tensor:
    config = [(int(lo), int(hi)) for lo, hi, _ in eqn.params["padding_config"]]
    x = tf.pad(x, [[max(lo, 0), max(hi, 0)] for lo, hi in config], constant_values=value)
    if all(lo >= 0 and hi >= 0 for lo, hi in config):
        return x
    begin = tf.constant([max(-lo, 0) for lo, _ in config], tf.int64)
    return tf.slice(x, begin, ctx.shape64(eqn.outvars[0].aval.shape))


def _iota(ctx: _Ctx, eqn: jex.JaxprEqn) -> tf.Tensor:
    shape, axis = eqn.params["shape"], int(eqn.params["dimension"])
    r = tf.cast(tf.range(ctx.dim(shape[axis])), _tf_dtype(eqn))
    r = tf.reshape(r, [-1 if i == axis else 1 for i in range(len(shape))])
    return r if len(shape) == 1 else tf.broadcast_to(r, ctx.shape(shape))


def _split(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> list[tf.Tensor]:
    sizes = eqn.params["sizes"]
    axis = int(eqn.params["axis"])
    return tf.split(x, ctx.shape(sizes), axis=axis, num=len(sizes))


def _tile(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
    return tf.tile(x, ctx.shape(eqn.params["reps"]))


def _dim_as_value(ctx: _Ctx, eqn: jex.JaxprEqn) -> tf.Tensor:
    return tf.cast(ctx.dim(eqn.params["dim"]), _tf_dtype(eqn))


# Reductions.


def _reduce(fn: Callable, bool_fn: Callable | None = None) -> Rule:
    """A reduction over ``axes`` with fn(x, axis=...), or bool_fn for booleans."""

    def rule(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
        f = bool_fn if bool_fn is not None and _is_bool(x) else fn
        return f(x, axis=list(eqn.params["axes"]))

    return rule


def _arg_extreme(fn: Callable) -> Rule:
    def rule(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
        (axis,) = eqn.params["axes"]
        if _is_bool(x):
            x = tf.cast(x, tf.int32)
        out = fn(x, axis=int(axis), output_type=tf.int64)
        return tf.cast(out, _tf_dtype(eqn))

    return rule


def _cumulative(fn: Callable) -> Rule:
    def rule(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
        return fn(x, axis=int(eqn.params["axis"]), reverse=bool(eqn.params["reverse"]))

    return rule


def _cum_extreme(op: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]) -> Rule:
    """Running max/min along a static axis by log2(n) shifted elementwise steps."""

    def rule(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
        axis, reverse = int(eqn.params["axis"]), bool(eqn.params["reverse"])
        n, rank = int(eqn.invars[0].aval.shape[axis]), _ndim(eqn)
        if reverse:
            x = tf.reverse(x, [axis])

        def part(t: tf.Tensor, start: int, size: int) -> tf.Tensor:
            begin = [0] * rank
            sizes = [-1] * rank
            begin[axis], sizes[axis] = start, size
            return tf.slice(t, begin, sizes)

        shift = 1
        while shift < n:
            x = tf.concat(
                [part(x, 0, shift), op(part(x, shift, n - shift), part(x, 0, n - shift))], axis
            )
            shift *= 2
        return tf.reverse(x, [axis]) if reverse else x

    return rule


def _top_k(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> list[tf.Tensor]:
    rank = _ndim(eqn)
    axis = int(eqn.params.get("axis", -1)) % rank
    perm = [*(i for i in range(rank) if i != axis), axis]
    if axis != rank - 1:
        x = tf.transpose(x, perm)
    values, indices = tf.math.top_k(x, k=int(eqn.params["k"]), sorted=True)
    indices = tf.cast(indices, _tf_dtype(eqn, 1))
    if axis != rank - 1:
        inv = list(np.argsort(perm))
        values, indices = tf.transpose(values, inv), tf.transpose(indices, inv)
    return [values, indices]


# dot_general and gather.


def _dot_general(ctx: _Ctx, eqn: jex.JaxprEqn, lhs: tf.Tensor, rhs: tf.Tensor) -> tf.Tensor:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    dtype = _tf_dtype(eqn)  # preferred_element_type when given
    compute = _EINSUM_DTYPES.get(dtype, dtype)
    lhs, rhs = tf.cast(lhs, compute), tf.cast(rhs, compute)
    letters = iter(string.ascii_letters)
    ls: list[str | None] = [None] * _ndim(eqn, 0)
    rs: list[str | None] = [None] * _ndim(eqn, 1)
    for i, j in [*zip(lb, rb, strict=True), *zip(lc, rc, strict=True)]:
        ls[i] = rs[j] = next(letters)
    lfree = [i for i in range(len(ls)) if ls[i] is None]
    rfree = [j for j in range(len(rs)) if rs[j] is None]
    for i in lfree:
        ls[i] = next(letters)
    for j in rfree:
        rs[j] = next(letters)
    outs = [ls[i] for i in lb] + [ls[i] for i in lfree] + [rs[j] for j in rfree]
    spec = ",".join("".join(str(c) for c in cs) for cs in (ls, rs)) + "->" + "".join(map(str, outs))
    result = tf.einsum(spec, lhs, rhs)
    return result if compute == dtype else tf.cast(result, dtype)


# Result dtypes that tf.einsum lacks (or that XLA accumulates wider): computed in this dtype and
# cast back (integer results wrap around the same way).
_EINSUM_DTYPES = {
    tf.float16: tf.float32,
    tf.bfloat16: tf.float32,
    tf.int8: tf.int32,
    tf.int16: tf.int32,
    tf.uint8: tf.int32,
    tf.uint16: tf.int32,
    tf.uint32: tf.int64,
    tf.uint64: tf.int64,
}


def _gather_fill_value(eqn: jex.JaxprEqn) -> Any:
    fill, dtype = eqn.params.get("fill_value"), np.dtype(eqn.outvars[0].aval.dtype)
    if fill is not None:
        return np.asarray(fill, dtype)
    if np.issubdtype(dtype, np.inexact):
        return np.asarray(np.nan, dtype)
    if dtype == np.bool_:
        return np.asarray(True)
    info = np.iinfo(dtype)
    return np.asarray(info.min if np.issubdtype(dtype, np.signedinteger) else info.max, dtype)


def _gather_mode(eqn: jex.JaxprEqn) -> str:
    return str(eqn.params["mode"]).rsplit(".", 1)[-1].upper()


def _check_gather(eqn: jex.JaxprEqn) -> str | None:
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    shape = eqn.invars[0].aval.shape
    if _gather_mode(eqn) not in ("CLIP", "FILL_OR_DROP", "PROMISE_IN_BOUNDS"):
        return f"mode {eqn.params['mode']}"
    indexed = set(dn.start_index_map) | set(dn.operand_batching_dims)
    for d in range(len(shape)):
        collapsed = d in dn.collapsed_slice_dims or d in dn.operand_batching_dims
        if collapsed and d not in indexed:
            return f"collapsed operand dimension {d} that is not indexed"
        windowed = d in indexed and not collapsed and not _same_dim(sizes[d], shape[d])
        single = len(eqn.invars[1].aval.shape) == 1 and not dn.operand_batching_dims
        if windowed and isinstance(sizes[d], _DimExpr) and not single:
            return f"a window of symbolic size {sizes[d]} along indexed operand dimension {d}"
    return None


def _same_dim(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def _gather(ctx: _Ctx, eqn: jex.JaxprEqn, operand: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
    """XLA gather as tf.gather_nd on the operand transposed to put the indexed dimensions first.

    Indexed dimensions taken whole are dropped from the index (their start can only be 0);
    indexed dimensions with a narrower window get one index per window position. The result
    of gather_nd (batch dims, window dims, remaining operand dims) is transposed to put the
    operand's dims at ``offset_dims``.
    """
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    shape, rank = eqn.invars[0].aval.shape, _ndim(eqn)
    nb = _ndim(eqn, 1) - 1  # the index vector is the last dimension of the indices
    idx = tf.cast(indices, tf.int64)
    start_map = [int(d) for d in dn.start_index_map]

    # Clamp the start indices (XLA semantics for CLIP and PROMISE_IN_BOUNDS); FILL_OR_DROP masks
    # the out-of-bounds results with the fill value afterwards.
    mask = None
    if start_map:
        upper = tf.stack(
            [_dim_tensor(ctx, shape[d]) - _dim_tensor(ctx, sizes[d]) for d in start_map]
        )
        if _gather_mode(eqn) == "FILL_OR_DROP":
            mask = tf.reduce_all(tf.logical_and(idx >= 0, idx <= upper), axis=-1)
        idx = tf.minimum(tf.maximum(idx, tf.constant(0, tf.int64)), upper)

    if nb == 0 and not dn.operand_batching_dims:  # a single slice: dynamic_slice + reshape
        zero = tf.constant(0, tf.int64)
        begin = tf.stack([idx[start_map.index(d)] if d in start_map else zero for d in range(rank)])
        out = tf.slice(operand, begin, ctx.shape64(sizes))
        out = tf.reshape(out, ctx.shape(eqn.outvars[0].aval.shape))
        return out if mask is None else tf.where(mask, out, tf.constant(_gather_fill_value(eqn)))

    # Batching dimensions are collapsed dimensions indexed by the position in the batch.
    for od, idim in zip(dn.operand_batching_dims, dn.start_indices_batching_dims, strict=True):
        idx_shape = tf.shape(idx, out_type=tf.int64)
        pos = tf.reshape(tf.range(idx_shape[idim]), [-1 if i == idim else 1 for i in range(nb)])
        idx = tf.concat([idx, tf.broadcast_to(pos, idx_shape[:-1])[..., None]], axis=-1)
        start_map.append(int(od))

    collapsed = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    keep = [
        k for k, d in enumerate(start_map) if d in collapsed or not _same_dim(sizes[d], shape[d])
    ]
    if len(keep) != len(start_map):
        idx = tf.gather(idx, keep, axis=-1)
        start_map = [start_map[k] for k in keep]
    windowed = [d for d in start_map if d not in collapsed]
    if windowed:
        widths = [int(sizes[d]) for d in windowed]
        offsets = np.zeros((*widths, len(start_map)), np.int64)
        for j, d in enumerate(windowed):
            steps = np.arange(widths[j]).reshape([-1 if i == j else 1 for i in range(len(widths))])
            offsets[..., start_map.index(d)] += steps
        for _ in widths:
            idx = tf.expand_dims(idx, -2)
        idx = idx + offsets

    # Dimensions that are not indexed start at 0.
    rest = [d for d in range(rank) if d not in start_map]
    if any(not _same_dim(sizes[d], shape[d]) for d in rest):
        window = [sizes[d] if d in rest else shape[d] for d in range(rank)]
        operand = tf.slice(operand, tf.zeros([rank], tf.int64), ctx.shape64(window))
    perm = start_map + rest
    if perm != list(range(rank)):
        operand = tf.transpose(operand, perm)
    out = tf.gather_nd(operand, idx)  # [batch..., windowed..., rest...]

    source = {d: nb + j for j, d in enumerate(windowed + rest)}
    offset_operand_dims = sorted(windowed + rest)
    offset_dims = list(dn.offset_dims)
    out_perm, b = [], 0
    for p in range(nb + len(offset_operand_dims)):
        if p in offset_dims:
            out_perm.append(source[offset_operand_dims[offset_dims.index(p)]])
        else:
            out_perm.append(b)
            b += 1
    if out_perm != list(range(len(out_perm))):
        out = tf.transpose(out, out_perm)
    if mask is not None:
        for p in sorted(offset_dims):
            mask = tf.expand_dims(mask, p)
        out = tf.where(mask, out, tf.constant(_gather_fill_value(eqn)))
    return out


def _dim_tensor(ctx: _Ctx, d: Any) -> tf.Tensor:
    return tf.cast(ctx.dim(d), tf.int64)


def _reduce_precision(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
    if _reduce_precision_target(eqn) is None:
        return x
    return tf.cast(tf.cast(x, tf.bfloat16), x.dtype)


def _reduce_precision_target(eqn: jex.JaxprEqn) -> str | None:
    """None when reduce_precision is the identity, "bfloat16" when it rounds to bfloat16."""
    e, m = int(eqn.params["exponent_bits"]), int(eqn.params["mantissa_bits"])
    info = jax.numpy.finfo(eqn.invars[0].aval.dtype)
    if e >= info.nexp and m >= info.nmant:
        return None
    if (e, m) == (8, 7) and info.nexp == 8:
        return "bfloat16"
    return f"{e} exponent and {m} mantissa bits"


# --------------------------------------------------------------------------------------------
# The tables.

_RULES: dict[str, Rule] = {
    # elementwise arithmetic
    "add": _binary(tf.add),
    "sub": _binary(tf.subtract),
    "mul": _binary(tf.multiply),
    "div": _div,
    "rem": _rem,
    "pow": _pow,
    "integer_pow": _integer_pow,
    "max": _max,
    "min": _min,
    "atan2": _binary(tf.math.atan2),
    "neg": _unary(tf.negative),
    "abs": _unary(tf.abs),
    "sign": _unary(tf.sign),
    "floor": _unary(tf.math.floor),
    "ceil": _unary(tf.math.ceil),
    "round": _round,
    "is_finite": _unary(tf.math.is_finite),
    "square": _unary(tf.square),
    "sqrt": _unary(tf.sqrt),
    "rsqrt": _unary(tf.math.rsqrt),
    "cbrt": _unary(_cbrt),
    "exp": _unary(tf.exp),
    "exp2": _unary(lambda x: tf.pow(tf.constant(2, x.dtype), x)),
    "expm1": _unary(tf.math.expm1),
    "log": _unary(tf.math.log),
    "log1p": _unary(tf.math.log1p),
    "tanh": _unary(tf.tanh),
    "logistic": _unary(tf.sigmoid),
    "sin": _unary(tf.sin),
    "cos": _unary(tf.cos),
    "tan": _unary(tf.tan),
    "asin": _unary(tf.asin),
    "acos": _unary(tf.acos),
    "atan": _unary(tf.atan),
    "sinh": _unary(tf.sinh),
    "cosh": _unary(tf.cosh),
    "asinh": _unary(tf.asinh),
    "acosh": _unary(tf.acosh),
    "atanh": _unary(tf.atanh),
    "erf": _unary(tf.math.erf),
    "erfc": _unary(tf.math.erfc),
    "erf_inv": _unary(tf.math.erfinv),
    "clamp": _clamp,
    "select_n": _select_n,
    "convert_element_type": _convert_element_type,
    # comparisons and logic
    "eq": _compare(tf.equal),
    "ne": _compare(tf.not_equal),
    "lt": _compare(tf.less),
    "le": _compare(tf.less_equal),
    "gt": _compare(tf.greater),
    "ge": _compare(tf.greater_equal),
    "and": _bool_or(tf.logical_and, tf.bitwise.bitwise_and),
    "or": _bool_or(tf.logical_or, tf.bitwise.bitwise_or),
    "xor": _bool_or(tf.math.logical_xor, tf.bitwise.bitwise_xor),
    "not": _not,
    # identities
    "copy": _identity,
    "copy_p": _identity,
    "stop_gradient": _identity,
    "reduce_precision": _reduce_precision,
    "sharding_constraint": _identity,
    "mesh_cast": _identity,
    "reshard": _identity,
    "optimization_barrier": _identity,
    # shapes
    "reshape": _reshape,
    "broadcast_in_dim": _broadcast_in_dim,
    "squeeze": _to_out_shape,
    "expand_dims": _to_out_shape,
    "concatenate": _concatenate,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice,
    "transpose": _transpose,
    "rev": _rev,
    "pad": _pad,
    "iota": _iota,
    "split": _split,
    "stack": _stack,
    "unstack": _unstack,
    "tile": _tile,
    "dim_as_value": _dim_as_value,
    # reductions
    "reduce_sum": _reduce(tf.reduce_sum),
    "reduce_prod": _reduce(tf.reduce_prod),
    "reduce_max": _reduce(tf.reduce_max, tf.reduce_any),
    "reduce_min": _reduce(tf.reduce_min, tf.reduce_all),
    "reduce_and": _reduce(tf.reduce_all),
    "reduce_or": _reduce(tf.reduce_any),
    "argmax": _arg_extreme(tf.math.argmax),
    "argmin": _arg_extreme(tf.math.argmin),
    "cumsum": _cumulative(tf.math.cumsum),
    "cumprod": _cumulative(tf.math.cumprod),
    "cummax": _cum_extreme(tf.maximum),
    "cummin": _cum_extreme(tf.minimum),
    "top_k": _top_k,
    # contractions and indexing
    "dot_general": _dot_general,
    "gather": _gather,
}


def _check_pad(eqn: jex.JaxprEqn) -> str | None:
    if any(int(interior) for _, _, interior in eqn.params["padding_config"]):
        return "interior padding"
    return None


def _check_cum_extreme(eqn: jex.JaxprEqn) -> str | None:
    if isinstance(eqn.invars[0].aval.shape[int(eqn.params["axis"])], _DimExpr):
        return "along the batch dimension"
    return None


def _check_bool_only(eqn: jex.JaxprEqn) -> str | None:
    if eqn.invars[0].aval.dtype != np.bool_:
        return f"on {eqn.invars[0].aval.dtype} (only bool is supported)"
    return None


def _check_reduce_precision(eqn: jex.JaxprEqn) -> str | None:
    target = _reduce_precision_target(eqn)
    return None if target in (None, "bfloat16") else target


_CHECKS: dict[str, Callable[[jex.JaxprEqn], str | None]] = {
    "reduce_precision": _check_reduce_precision,
    "gather": _check_gather,
    "pad": _check_pad,
    "cummax": _check_cum_extreme,
    "cummin": _check_cum_extreme,
    "reduce_and": _check_bool_only,
    "reduce_or": _check_bool_only,
}

# Primitives whose params hold a jaxpr that is called on the equation's inputs.
_CALL_PRIMITIVES = (
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "remat",
    "remat2",
    "checkpoint",
)
_NOT_FOLDABLE = frozenset({"dim_as_value"})


def _sub_jaxpr(eqn: jex.JaxprEqn) -> tuple[jex.Jaxpr, list[Any]]:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if isinstance(j, jex.ClosedJaxpr):
            return j.jaxpr, list(j.consts)
        if isinstance(j, jex.Jaxpr):
            return j, []
    raise UnsupportedPrimitiveError(eqn.primitive.name, "no jaxpr found in its params")


# --------------------------------------------------------------------------------------------
# Compilation: constant folding and validation of a jaxpr into a program of TF steps.


@dataclass
class _ConstRef:
    """A compile-time constant read at run time: a numpy array (small) or a tf.Variable."""

    value: Any


_Ref = jex.Var | _ConstRef


@dataclass
class _Step:
    eqn: jex.JaxprEqn
    inputs: list[_Ref]
    sub: _Program | None = None


@dataclass
class _Program:
    invars: list[jex.Var]
    steps: list[_Step] = field(default_factory=list)
    outputs: list[jex.Var | None] = field(default_factory=list)  # None: constant output
    out_consts: list[np.ndarray | None] = field(default_factory=list)


class _Compiler:
    def __init__(self, make_variable: Callable[[np.ndarray], tf.Variable]):
        self._make_variable = make_variable
        self._handles: dict[tuple[Any, ...], tf.Variable] = {}

    def handle(self, value: np.ndarray) -> Any:
        """The run-time form of a constant: itself if small, else a tf.Variable (one per value)."""
        if value.size <= _MAX_CONST_SIZE:
            return value
        key = (value.shape, value.dtype.str, hashlib.sha256(value.tobytes()).hexdigest())
        var = self._handles.get(key)
        if var is None:
            var = self._handles[key] = self._make_variable(value)
        return var

    def compile(
        self, jaxpr: jex.Jaxpr, consts: Sequence[Any], in_values: Sequence[np.ndarray | None]
    ) -> _Program:
        known: dict[jex.Var, np.ndarray] = {}
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            known[v] = np.asarray(c, dtype=v.aval.dtype)
        for v, c in zip(jaxpr.invars, in_values, strict=True):
            if c is not None:
                known[v] = c

        def value_of(a: Any) -> np.ndarray | None:
            if isinstance(a, jex.Literal):
                return np.asarray(a.val, dtype=a.aval.dtype)
            return known.get(a)

        prog = _Program(invars=list(jaxpr.invars))
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            vals = [value_of(a) for a in eqn.invars]
            sub = None
            if name in _CALL_PRIMITIVES:
                inner, inner_consts = _sub_jaxpr(eqn)
                sub = self.compile(inner, inner_consts, vals)
                for v, c in zip(eqn.outvars, sub.out_consts, strict=True):
                    if c is not None and not isinstance(v, jex.DropVar):
                        known[v] = c
                if not sub.steps and all(c is not None for c in sub.out_consts):
                    continue
            elif all(v is not None for v in vals) and _foldable(eqn):
                for v, c in zip(eqn.outvars, _fold(eqn, vals), strict=True):
                    if not isinstance(v, jex.DropVar):
                        known[v] = c
                continue
            else:
                if name not in _RULES:
                    raise UnsupportedPrimitiveError(name)
                check = _CHECKS.get(name)
                reason = (check(eqn) if check else None) or _check_symbolic_dims(eqn)
                if reason:
                    raise UnsupportedPrimitiveError(name, reason)
            inputs: list[_Ref] = [
                a if val is None else _ConstRef(self.handle(val))
                for a, val in zip(eqn.invars, vals, strict=True)
            ]
            prog.steps.append(_Step(eqn, inputs, sub))
        for a in jaxpr.outvars:
            c = value_of(a)
            prog.outputs.append(a if c is None else None)
            prog.out_consts.append(c)
        return prog


def _foldable(eqn: jex.JaxprEqn) -> bool:
    return (
        eqn.primitive.name not in _NOT_FOLDABLE
        and not eqn.effects
        and all(_is_static(v.aval.shape) for v in eqn.outvars)
        and not _symbolic_dims(list(eqn.params.values()))
    )


def _fold(eqn: jex.JaxprEqn, vals: list[np.ndarray]) -> list[np.ndarray]:
    try:
        out = eqn.primitive.bind(*vals, **eqn.params)
    except Exception as e:
        raise ValueError(
            f"jaxembed.export could not evaluate the constant equation {eqn.primitive.name!r} "
            f"of the model's jaxpr with JAX: {e}"
        ) from e
    outs = out if eqn.primitive.multiple_results else [out]
    return [np.asarray(o, dtype=v.aval.dtype) for o, v in zip(outs, eqn.outvars, strict=True)]


# --------------------------------------------------------------------------------------------
# Execution.


def _read(ref: _Ref, env: dict[jex.Var, tf.Tensor]) -> tf.Tensor:
    if isinstance(ref, _ConstRef):
        return tf.convert_to_tensor(ref.value)
    return env[ref]


def _run(prog: _Program, args: Sequence[tf.Tensor], ctx: _Ctx) -> list[tf.Tensor | None]:
    env: dict[jex.Var, tf.Tensor] = {
        v: a for v, a in zip(prog.invars, args, strict=True) if a is not None
    }
    for step in prog.steps:
        ins = [_read(r, env) for r in step.inputs]
        if step.sub is not None:
            outs = _run(step.sub, ins, ctx)
        else:
            out = _RULES[step.eqn.primitive.name](ctx, step.eqn, *ins)
            outs = list(out) if step.eqn.primitive.multiple_results else [out]
        for v, o in zip(step.eqn.outvars, outs, strict=True):
            if o is not None and not isinstance(v, jex.DropVar):
                env[v] = o
    return [None if v is None else env[v] for v in prog.outputs]


# --------------------------------------------------------------------------------------------
# The module.


def _path_name(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", ".".join(parts)) or "param"
    return name if re.match(r"[A-Za-z0-9.]", name) else f"v{name}"


def _struct(x: Any, batch: Any = None) -> jax.ShapeDtypeStruct:
    """The abstract value of an array (its leading dimension replaced by ``batch`` if given)."""
    shape = tuple(np.shape(x))
    if batch is not None:
        shape = (batch, *shape[1:])
    dtype = x.dtype if hasattr(x, "dtype") else jax.numpy.result_type(x)
    return jax.ShapeDtypeStruct(shape, jax.dtypes.canonicalize_dtype(dtype))


@dataclass
class _Translation:
    """The non-TF state of a TFModel (kept out of tf.Module's attribute tracking)."""

    program: _Program
    out_consts: list[_ConstRef | None]
    act_treedef: Any
    act_dtypes: list[tf.DType]
    output_paths: tuple[str, ...] | None


class TFModel(tf.Module):
    """fn(params, activations) translated to TF ops; params (and large jaxpr constants) are
    tf.Variables.

    ``fn`` is traced once with a symbolic batch dimension, so the module runs on any batch size,
    eagerly or in a ``tf.function`` with ``TensorSpec([None, ...])`` inputs. Unsupported
    primitives raise ``UnsupportedPrimitiveError`` here, at construction.

    Attributes: ``param_variables`` (a dict from the sanitized param path, e.g.
    ``params.Dense_0.kernel``, to its tf.Variable), ``output_structure`` (the pytree structure of
    fn's output) and ``output_paths`` (the "/"-joined keys of a dict output, else None).
    """

    def __init__(self, fn: Callable, params: Any, example_activations: Any, *, name: str = "model"):
        super().__init__(name=name)
        param_leaves, _ = jax.tree_util.tree_flatten_with_path(params)
        act_leaves, act_treedef = jax.tree_util.tree_flatten(example_activations)
        if not act_leaves:
            raise ValueError("example_activations must hold at least one array (with a batch dim)")
        batch_sizes = {np.shape(x)[0] if np.ndim(x) else None for x in act_leaves}
        if len(batch_sizes) != 1 or None in batch_sizes:
            raise ValueError(
                "every leaf of example_activations needs the same leading batch dimension; got "
                f"shapes {[tuple(np.shape(x)) for x in act_leaves]}"
            )

        closed, out_shapes = _trace(fn, params, example_activations)
        self.output_structure = jax.tree_util.tree_structure(out_shapes)
        in_dtypes = [v.aval.dtype for v in closed.jaxpr.invars]

        with self.name_scope:
            self.param_variables: dict[str, tf.Variable] = {}
            param_list = []
            for i, (path, leaf) in enumerate(param_leaves):
                vname = _path_name(path)
                if vname in self.param_variables:
                    vname = f"{vname}_{i}"
                value = np.asarray(leaf, dtype=in_dtypes[i])
                var = tf.Variable(value, trainable=False, name=vname)
                self.param_variables[vname] = var
                param_list.append(var)
            self._param_list: list[tf.Variable] = param_list
            self._const_variables: list[tf.Variable] = []

            def make_variable(value: np.ndarray) -> tf.Variable:
                var = tf.Variable(
                    value, trainable=False, name=f"const_{len(self._const_variables)}"
                )
                self._const_variables.append(var)
                return var

            compiler = _Compiler(make_variable)
            program = compiler.compile(
                closed.jaxpr, closed.consts, [None] * len(closed.jaxpr.invars)
            )
            out_consts = [
                None if c is None else _ConstRef(compiler.handle(c)) for c in program.out_consts
            ]
        self._translation = _Translation(
            program=program,
            out_consts=out_consts,
            act_treedef=act_treedef,
            act_dtypes=[tf.as_dtype(d) for d in in_dtypes[len(param_leaves) :]],
            output_paths=_output_paths(out_shapes),
        )

    @property
    def output_paths(self) -> list[str] | None:
        paths = self._translation.output_paths
        return None if paths is None else list(paths)

    @tf.autograph.experimental.do_not_convert
    def __call__(self, activations: Any) -> Any:
        tr = self._translation
        leaves, treedef = jax.tree_util.tree_flatten(activations)
        if treedef.num_leaves != tr.act_treedef.num_leaves:
            raise ValueError(f"activations must have the structure {tr.act_treedef}, got {treedef}")
        acts = []
        for x, dtype in zip(leaves, tr.act_dtypes, strict=True):
            t = tf.convert_to_tensor(x)
            acts.append(t if t.dtype == dtype else tf.cast(t, dtype))
        ctx = _Ctx(batch=tf.shape(acts[0], out_type=tf.int64)[0])
        params = [tf.convert_to_tensor(v) for v in self._param_list]
        outs = _run(tr.program, params + acts, ctx)
        outs = [_read(c, {}) if o is None else o for o, c in zip(outs, tr.out_consts, strict=True)]
        return jax.tree_util.tree_unflatten(self.output_structure, outs)


def _trace(fn: Callable, params: Any, example_activations: Any) -> tuple[jex.ClosedJaxpr, Any]:
    (batch,) = jax.export.symbolic_shape(_BATCH)
    p_structs = jax.tree_util.tree_map(_struct, params)
    a_structs = jax.tree_util.tree_map(lambda x: _struct(x, batch), example_activations)
    try:
        return jax.make_jaxpr(fn, return_shape=True)(p_structs, a_structs)
    except Exception as e:
        concrete = jax.tree_util.tree_map(_struct, example_activations)
        jax.make_jaxpr(fn)(p_structs, concrete)  # a model bug: raise its own error
        raise ValueError(
            "jaxembed.export traces the model with a symbolic batch dimension, and that failed: "
            f"{e}\nThe model must be batch-size generic: no Python control flow on, and no "
            "hard-coded use of, the batch size (use -1 in reshapes, x.shape[0] in shapes)."
        ) from e


def _output_paths(out_shapes: Any) -> tuple[str, ...] | None:
    if not isinstance(out_shapes, dict):
        return None
    leaves, _ = jax.tree_util.tree_flatten_with_path(out_shapes)
    return tuple("/".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves)
