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

Control flow compiles its bodies the same way (loop-invariant constants fold inside them): ``scan``
(and ``fori_loop`` with a static trip count) and ``while`` (``fori_loop`` with a dynamic one)
become ``tf.while_loop``, ``cond``/``switch`` on a run-time index ``tf.switch_case`` (a known index
inlines its branch). PRNG keys (``key<fry>`` values, e.g. the constant key in the jaxpr of a Flax
``nn.RNN``) are folded by JAX at export; a key computed from the model's inputs (e.g.
``random.fold_in(key, ids)``) is its uint32 key data in TF, and the ``random_*`` primitives on it
run JAX's own threefry implementation, traced to a jaxpr and translated (other ops on such keys,
e.g. indexing the result of a split, are refused). ``sort`` (any number of operands and keys,
stable), ``scatter*``, ``conv_general_dilated`` and the total-order comparisons of ``searchsorted``
have rules of their own. ``UnsupportedPrimitiveError`` names the primitive, the model's line and a
workaround.

Semantics follow XLA's where TF differs: integer division truncates (x / 0 == -1, x % 0 == x),
gather and dynamic_slice clamp their start indices, FILL_OR_DROP gathers are masked with the fill
value, FILL_OR_DROP scatters drop the updates of out-of-bounds windows, sort orders floats as
lax.sort does (-0.0 == 0.0, NaNs last). Transcendental functions, rsqrt and 1 / x (which TF's graph
optimizer turns into Reciprocal) may differ from XLA in the last bits; so may float32 matmuls and
sums (summation order) and anything XLA fuses into FMAs. Float-to-int conversion of NaN or
out-of-range values and argmax/argmin over NaNs follow TF.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.extend.core as jex
import numpy as np
from jax._src import source_info_util  # user_frames: the model's line in errors

from ._tf import tf

__all__ = ["TFModel", "UnsupportedPrimitiveError"]

_MAX_CONST_SIZE = 1024  # constants with more elements become tf.Variables
_BATCH = "batch"
_DimExpr = type(jax.export.symbolic_shape(_BATCH)[0])


class UnsupportedPrimitiveError(ValueError):
    """A primitive of the model's jaxpr (or one of its configurations) has no TF translation.

    The message names the primitive, the model's line that produced it (``source``, from the
    equation's ``source_info``; frames inside JAX, Flax and jaxembed are skipped) and a
    workaround.
    """

    def __init__(self, primitive: str, reason: str = "", source: str = ""):
        self.primitive = primitive
        self.source = source
        detail = f" ({reason})" if reason else ""
        where = f" at {source}" if source else " (in the model's jaxpr)"
        super().__init__(
            f"jaxembed.export cannot translate the JAX primitive {primitive!r}{detail}{where} to "
            f"TensorFlow ops. Workaround: {_workaround(primitive, reason)} Supported primitives: "
            f"{', '.join(_supported_primitives())}."
        )


def _supported_primitives() -> list[str]:
    return sorted([*_RULES, *_CONTROL_FLOW, *_CALL_PRIMITIVES, *_RANDOM_PRIMITIVES])


_GENERIC_WORKAROUND = (
    "compute it in the input pipeline (as a feature the model reads), rewrite the model with "
    "supported operations, or export without the model (model=None) and apply a TF callable to "
    "the served activations."
)
_WORKAROUNDS = {
    "fft": "compute the transform in the input pipeline, or write it as a matmul with a constant "
    "DFT matrix (for a fixed length, jnp.fft.fft(x) == x @ dft), or export without the model "
    "(model=None) and apply a TF callable to the served activations.",
    "cholesky": "factorize outside the model (it usually depends on params only) and pass the "
    "factor as a param, or export without the model (model=None) and apply a TF callable.",
    "random_": "draw randomness outside the served model (serve with deterministic=True / "
    "without an rng); keys that are constants are folded at export time.",
    "conv_general_dilated": "use a convolution without input (lhs) dilation or batch groups, or "
    "export without the model (model=None) and apply a TF callable to the served activations.",
}


def _workaround(primitive: str, reason: str) -> str:
    if "PRNG key" in reason:
        return _WORKAROUNDS["random_"]
    for prefix, text in _WORKAROUNDS.items():
        if primitive.startswith(prefix):
            return text
    return _GENERIC_WORKAROUND


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    """Source folders whose frames are not the user's: jaxembed, this package, Flax."""
    import jaxembed  # noqa: PLC0415

    dirs = [os.path.dirname(__file__), os.path.dirname(jaxembed.__file__ or "")]
    try:
        import flax  # noqa: PLC0415

        dirs.append(os.path.dirname(flax.__file__ or ""))
    except ImportError:
        pass
    return tuple(d + os.sep for d in dirs if d)


def _source_line(eqn: jex.JaxprEqn) -> str:
    """The model's line that produced ``eqn`` as "file:line (function)", or "" if unknown.

    The innermost frame outside JAX (``source_info_util.user_frames``) and outside Flax and
    jaxembed: for a Flax module that is the user's ``__call__`` line, not Flax's layer code.
    """
    try:
        frames = list(source_info_util.user_frames(eqn.source_info.traceback))
    except Exception:  # private JAX API: never let it hide the real error
        return ""
    library = _library_dirs()
    chosen = next((f for f in frames if not f.file_name.startswith(library)), None)
    chosen = chosen or (frames[0] if frames else None)
    if chosen is None:
        return ""
    return f"{chosen.file_name}:{chosen.start_line} ({chosen.function_name})"


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


# Sorting and total-order comparisons.


def _total_order_key(x: tf.Tensor, canonicalize: bool) -> tf.Tensor:
    """An integer tensor ordered like XLA's total order on ``x``.

    Floats: -NaN < -inf < ... < -0.0 < 0.0 < ... < inf < NaN, by flipping the magnitude bits of
    negative numbers' bit patterns. ``canonicalize`` first maps -0.0 to 0.0 and every NaN to the
    positive quiet NaN, as ``lax.sort``'s comparator does (so NaNs sort last and zeros tie).
    """
    if x.dtype == tf.bool or x.dtype in (tf.int8, tf.int16, tf.uint8, tf.uint16):
        return tf.cast(x, tf.int32)
    if x.dtype == tf.uint32:
        return tf.cast(x, tf.int64)
    if x.dtype == tf.uint64:  # flip the sign bit: unsigned order as signed order
        return tf.bitwise.bitwise_xor(tf.bitcast(x, tf.int64), tf.constant(-(2**63), tf.int64))
    if x.dtype.is_integer:
        return x
    if x.dtype in (tf.float16, tf.bfloat16):
        x = tf.cast(x, tf.float32)  # exact, and order-preserving
    if canonicalize:
        x = tf.where(tf.equal(x, 0), tf.zeros_like(x), x)
        x = tf.where(tf.math.is_nan(x), tf.fill(tf.shape(x), tf.constant(np.nan, x.dtype)), x)
    itype = tf.int64 if x.dtype == tf.float64 else tf.int32
    bits = tf.bitcast(x, itype)
    magnitude = tf.constant(np.iinfo(itype.as_numpy_dtype).max, itype)
    return tf.where(bits < 0, tf.bitwise.bitwise_xor(bits, magnitude), bits)


def _total_order(fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]) -> Rule:
    """``lt_to`` / ``le_to`` / ``eq_to``: comparisons in the total order (see above)."""

    def rule(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        return fn(_total_order_key(x, False), _total_order_key(y, False))

    return rule


def _sort(ctx: _Ctx, eqn: jex.JaxprEqn, *operands: tf.Tensor) -> list[tf.Tensor]:
    """lax.sort: a stable lexicographic sort on the first ``num_keys`` operands.

    Each key becomes an integer in lax.sort's order (-0.0 == 0.0, NaNs last); a stable
    ascending argsort is ``top_k`` (which keeps equal elements in index order) of the bitwise
    complement. Several keys sort from the least significant one (radix order); the resulting
    permutation gathers every operand.
    """
    rank, axis = _ndim(eqn), int(eqn.params["dimension"])
    perm = [*(d for d in range(rank) if d != axis), axis]
    moved = [tf.transpose(x, perm) if axis != rank - 1 else x for x in operands]
    n = tf.cast(ctx.dim(eqn.invars[0].aval.shape[axis]), tf.int32)
    batch_dims = rank - 1
    order = None
    for key in reversed(moved[: int(eqn.params["num_keys"])]):
        k = _total_order_key(key, True)
        if order is not None:
            k = tf.gather(k, order, axis=-1, batch_dims=batch_dims)
        idx = tf.math.top_k(tf.bitwise.invert(k), k=n, sorted=True).indices
        order = idx if order is None else tf.gather(order, idx, axis=-1, batch_dims=batch_dims)
    outs = [tf.gather(x, order, axis=-1, batch_dims=batch_dims) for x in moved]
    if axis != rank - 1:
        inv = list(np.argsort(perm))
        outs = [tf.transpose(x, inv) for x in outs]
    return outs


# Scatter.


def _scatter(kind: str) -> Rule:
    """XLA scatter (``x.at[idx].set/add/mul/min/max``) on the flattened operand.

    Every element of ``updates`` gets the linear index of the operand element it updates (the
    window start from the index vector, plus its position in the window). Under FILL_OR_DROP
    (jnp's default) and PROMISE_IN_BOUNDS, a window that does not fit in the operand is
    dropped, as XLA does: its elements point at one extra slot past the end, cut off
    afterwards; CLIP clamps the window start. Then one ``tensor_scatter_nd_*`` (or, for mul,
    ``unsorted_segment_prod``) applies all updates; duplicate indices accumulate.
    """

    def rule(
        ctx: _Ctx, eqn: jex.JaxprEqn, operand: tf.Tensor, indices: tf.Tensor, updates: tf.Tensor
    ) -> tf.Tensor:
        dn = eqn.params["dimension_numbers"]
        op_shape, upd_shape = eqn.invars[0].aval.shape, eqn.invars[2].aval.shape
        rank, uwd = len(op_shape), list(dn.update_window_dims)
        scatter_dims = [d for d in range(len(upd_shape)) if d not in uwd]
        ns, nw = len(scatter_dims), len(uwd)
        if scatter_dims + uwd != list(range(len(upd_shape))):
            updates = tf.transpose(updates, scatter_dims + uwd)  # [scatter..., window...]
        excluded = set(dn.inserted_window_dims) | set(dn.operand_batching_dims)
        window_dims = [d for d in range(rank) if d not in excluded]
        dims = [_dim_tensor(ctx, d) for d in op_shape]
        sizes = {d: _dim_tensor(ctx, upd_shape[u]) for d, u in zip(window_dims, uwd, strict=True)}

        idx = tf.cast(indices, tf.int64)  # [scatter..., index vector]
        starts = {int(d): idx[..., k] for k, d in enumerate(dn.scatter_dims_to_operand_dims)}
        for od, idim in zip(
            dn.operand_batching_dims, dn.scatter_indices_batching_dims, strict=True
        ):
            shape = tf.shape(idx, out_type=tf.int64)[:-1]
            pos = tf.reshape(tf.range(shape[idim]), [-1 if i == idim else 1 for i in range(ns)])
            starts[int(od)] = tf.broadcast_to(pos, shape)
        valid = None
        for d, s in starts.items():
            hi = dims[d] - sizes.get(d, tf.constant(1, tf.int64))
            if _gather_mode(eqn) == "CLIP":
                starts[d] = tf.clip_by_value(s, tf.constant(0, tf.int64), hi)
            else:
                ok = tf.logical_and(s >= 0, s <= hi)
                valid = ok if valid is None else tf.logical_and(valid, ok)

        linear = tf.zeros([], tf.int64)
        stride = tf.constant(1, tf.int64)
        for d in reversed(range(rank)):
            if d in starts:
                linear = (
                    linear + tf.reshape(starts[d], _expand_shape(tf.shape(starts[d]), nw)) * stride
                )
            if d in sizes:
                j = window_dims.index(d)
                offsets = tf.reshape(
                    tf.range(sizes[d]), [-1 if i == ns + j else 1 for i in range(ns + nw)]
                )
                linear = linear + offsets * stride
            stride = stride * dims[d]
        total = stride
        if valid is not None:
            valid = tf.reshape(valid, _expand_shape(tf.shape(valid), nw))
            linear = tf.where(valid, linear, total)
        linear = tf.broadcast_to(linear, tf.shape(updates, out_type=tf.int64))
        flat = tf.reshape(operand, [-1])
        if kind == "mul":
            seg = tf.math.unsorted_segment_prod(
                tf.reshape(updates, [-1]), tf.reshape(linear, [-1]), total + 1
            )
            out = flat * seg[:total]
        else:
            flat = tf.concat([flat, tf.zeros([1], flat.dtype)], 0)
            out = _SCATTER_OPS[kind](flat, linear[..., None], updates)[:total]
        return tf.reshape(out, ctx.shape(op_shape))

    return rule


def _expand_shape(shape: tf.Tensor, n: int) -> tf.Tensor:
    """``shape`` followed by ``n`` ones (for broadcasting against trailing window dims)."""
    return tf.concat([tf.cast(shape, tf.int64), tf.ones([n], tf.int64)], 0)


_SCATTER_OPS = {
    "set": tf.tensor_scatter_nd_update,
    "add": tf.tensor_scatter_nd_add,
    "max": tf.tensor_scatter_nd_max,
    "min": tf.tensor_scatter_nd_min,
}


def _check_scatter(eqn: jex.JaxprEqn) -> str | None:
    if _gather_mode(eqn) not in ("CLIP", "FILL_OR_DROP", "PROMISE_IN_BOUNDS"):
        return f"mode {eqn.params['mode']}"
    if eqn.invars[0].aval.dtype == np.bool_ and eqn.primitive.name != "scatter":
        return "on bool"
    return None


# Convolution.


def _conv(ctx: _Ctx, eqn: jex.JaxprEqn, lhs: tf.Tensor, rhs: tf.Tensor) -> tf.Tensor:
    """conv_general_dilated as tf.nn.conv2d / conv3d (a 1-D conv is a 2-D conv of height 1).

    The operands are transposed to NHWC and HWIO by ``dimension_numbers``; the explicit padding
    of the jaxpr is applied with tf.pad (negative padding by slicing) and the convolution run
    VALID, with the strides, kernel dilation and feature groups of XLA.
    """
    p = eqn.params
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = (list(s) for s in (dn.lhs_spec, dn.rhs_spec, dn.out_spec))
    nsp = len(lhs_spec) - 2
    dtype = _tf_dtype(eqn)
    compute = tf.float32 if lhs.dtype in (tf.float16, tf.bfloat16) else lhs.dtype
    lhs = tf.transpose(tf.cast(lhs, compute), [lhs_spec[0], *lhs_spec[2:], lhs_spec[1]])
    rhs = tf.transpose(tf.cast(rhs, compute), [*rhs_spec[2:], rhs_spec[1], rhs_spec[0]])
    pads = [(int(lo), int(hi)) for lo, hi in p["padding"]]
    if any(lo > 0 or hi > 0 for lo, hi in pads):
        lhs = tf.pad(lhs, [[0, 0], *([max(lo, 0), max(hi, 0)] for lo, hi in pads), [0, 0]])
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        begin = [0, *(max(-lo, 0) for lo, _ in pads), 0]
        cut = tf.constant([0, *(max(-lo, 0) + max(-hi, 0) for lo, hi in pads), 0], tf.int32)
        lhs = tf.slice(lhs, begin, tf.shape(lhs) - cut)
    strides = [int(s) for s in p["window_strides"]]
    dilations = [int(d) for d in (p["rhs_dilation"] or (1,) * nsp)]
    if nsp == 1:
        lhs, rhs = tf.expand_dims(lhs, 1), tf.expand_dims(rhs, 0)
        strides, dilations = [1, *strides], [1, *dilations]
    conv = tf.nn.conv3d if nsp == 3 else tf.nn.conv2d
    out = conv(lhs, rhs, [1, *strides, 1], "VALID", dilations=[1, *dilations, 1])
    if nsp == 1:
        out = tf.squeeze(out, 1)
    perm = [0] * (nsp + 2)  # out is [N, spatial..., C]; out_spec = (batch, feature, spatial...)
    perm[out_spec[0]], perm[out_spec[1]] = 0, nsp + 1
    for i, d in enumerate(out_spec[2:]):
        perm[d] = 1 + i
    if perm != list(range(nsp + 2)):
        out = tf.transpose(out, perm)
    return out if out.dtype == dtype else tf.cast(out, dtype)


def _check_conv(eqn: jex.JaxprEqn) -> str | None:
    p = eqn.params
    nsp = len(p["window_strides"])
    if any(int(d) != 1 for d in (p["lhs_dilation"] or ())):
        return "input (lhs) dilation, i.e. a transposed convolution"
    if int(p["batch_group_count"]) != 1:
        return "batch_group_count > 1"
    if nsp not in (1, 2, 3):
        return f"{nsp} spatial dimensions (1 to 3 are supported)"
    if nsp == 3 and any(int(d) != 1 for d in (p["rhs_dilation"] or ())):
        return "a dilated 3-D convolution"
    if not np.issubdtype(eqn.invars[0].aval.dtype, np.floating):
        return f"on {eqn.invars[0].aval.dtype}"
    return None


# Control flow: rule(ctx, step, inputs) -> outputs, with the step's compiled bodies.


def _keep_shape(new: tf.Tensor, old: tf.Tensor) -> tf.Tensor:
    """A loop variable keeps its static shape across iterations (JAX's carries do)."""
    if not tf.executing_eagerly():
        new.set_shape(old.shape)
    return new


def _static_shape(shape: Sequence[Any]) -> tf.TensorShape:
    """A jaxpr shape as a TF static shape (None for symbolic dimensions)."""
    return tf.TensorShape([None if isinstance(d, _DimExpr) else int(d) for d in shape])


def _scan(ctx: _Ctx, step: _Step, ins: list[tf.Tensor]) -> list[tf.Tensor]:
    """lax.scan (also fori_loop with a static trip count) as one tf.while_loop.

    Always a loop, never unrolled (``unroll`` is ignored): the graph stays the size of one body
    however long the scan (an RNN over a long sequence, a binary search of many levels), and TF
    Serving's CPU executor runs While natively; the per-iteration overhead is small next to the
    body's matmuls. The stacked outputs are TensorArrays written at step t (at length-1-t when
    ``reverse``), so they need no concatenation.
    """
    p = step.eqn.params
    nc, ncarry = int(p["num_consts"]), int(p["num_carry"])
    length = tf.cast(ctx.dim(p["length"]), tf.int32)
    reverse = bool(p["reverse"])
    consts, init, xs = ins[:nc], ins[nc : nc + ncarry], ins[nc + ncarry :]
    (body,) = step.bodies
    arrays = [
        tf.TensorArray(
            tf.as_dtype(v.aval.dtype),
            size=length,
            element_shape=_static_shape(v.aval.shape[1:]),
        )
        for v in step.eqn.outvars[ncarry:]
    ]

    def loop(i: tf.Tensor, carry: list[tf.Tensor], ys: list[Any]) -> tuple[Any, ...]:
        t = length - 1 - i if reverse else i
        outs = _run_body(body, [*consts, *carry, *(tf.gather(x, t) for x in xs)], ctx)
        new_carry = [_keep_shape(o, c) for o, c in zip(outs[:ncarry], carry, strict=True)]
        ys = [a.write(t, y) for a, y in zip(ys, outs[ncarry:], strict=True)]
        return i + 1, new_carry, ys

    _, carry, ys = tf.while_loop(
        lambda i, c, y: i < length,
        loop,
        (tf.constant(0, tf.int32), list(init), arrays),
        maximum_iterations=length,
    )
    return [*carry, *(a.stack() for a in ys)]


def _while(ctx: _Ctx, step: _Step, ins: list[tf.Tensor]) -> list[tf.Tensor]:
    """lax.while_loop (also fori_loop with a dynamic trip count) as tf.while_loop."""
    p = step.eqn.params
    cn, bn = int(p["cond_nconsts"]), int(p["body_nconsts"])
    cond_consts, body_consts, init = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]
    cond_prog, body_prog = step.bodies

    def cond(*carry: tf.Tensor) -> tf.Tensor:
        return _run_body(cond_prog, [*cond_consts, *carry], ctx)[0]

    def body(*carry: tf.Tensor) -> list[tf.Tensor]:
        outs = _run_body(body_prog, [*body_consts, *carry], ctx)
        return [_keep_shape(o, c) for o, c in zip(outs, carry, strict=True)]

    return list(tf.while_loop(cond, body, list(init)))


def _cond(ctx: _Ctx, step: _Step, ins: list[tf.Tensor]) -> list[tf.Tensor]:
    """lax.cond / lax.switch on a run-time index as tf.switch_case (an out-of-range index runs
    the last branch in both). A known index was inlined at compile time."""
    index, operands = ins[0], ins[1:]
    branches = [functools.partial(_run_body, b, operands, ctx) for b in step.bodies]
    if len(branches) == 1:
        return branches[0]()
    out = tf.switch_case(tf.cast(index, tf.int32), branches)
    return list(out) if isinstance(out, list | tuple) else [out]


# Bit shifts and PRNG hashing (for PRNG keys computed at run time).


def _shift(kind: str) -> Rule:
    """XLA shifts: a shift amount outside [0, bits) gives 0 (or the sign for arithmetic)."""

    def rule(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        bits = x.dtype.size * 8
        in_range = y < bits if y.dtype.is_unsigned else tf.logical_and(y >= 0, y < bits)
        y = tf.where(in_range, y, tf.zeros_like(y))
        if kind == "left":
            return tf.where(in_range, tf.bitwise.left_shift(x, y), tf.zeros_like(x))
        # TF's right shift is logical on unsigned and arithmetic on signed types.
        flip = _UNSIGNED_OF if kind == "logical" else _SIGNED_OF
        other = flip.get(x.dtype)
        xs = x if other is None else tf.bitcast(x, other)
        ys = y if other is None else tf.bitcast(y, other)
        out = tf.bitwise.right_shift(xs, ys)
        out = out if other is None else tf.bitcast(out, x.dtype)
        if kind == "logical":
            return tf.where(in_range, out, tf.zeros_like(x))
        sign = tf.bitwise.right_shift(xs, tf.fill(tf.shape(ys), tf.constant(bits - 1, ys.dtype)))
        return tf.where(in_range, out, sign if other is None else tf.bitcast(sign, x.dtype))

    return rule


_UNSIGNED_OF = {tf.int8: tf.uint8, tf.int16: tf.uint16, tf.int32: tf.uint32, tf.int64: tf.uint64}
_SIGNED_OF = {u: s for s, u in _UNSIGNED_OF.items()}


def _bitcast_convert_type(ctx: _Ctx, eqn: jex.JaxprEqn, x: tf.Tensor) -> tf.Tensor:
    return tf.bitcast(x, _tf_dtype(eqn))


def _check_bitcast(eqn: jex.JaxprEqn) -> str | None:
    src, dst = np.dtype(eqn.invars[0].aval.dtype), np.dtype(eqn.outvars[0].aval.dtype)
    return None if src.itemsize == dst.itemsize else f"from {src} to {dst} (different widths)"


def _threefry2x32(
    ctx: _Ctx, eqn: jex.JaxprEqn, k1: tf.Tensor, k2: tf.Tensor, x1: tf.Tensor, x2: tf.Tensor
) -> list[tf.Tensor]:
    """The Threefry-2x32 block cipher (20 rounds; Salmon et al., SC'11), as JAX's PRNG uses it."""

    def rotl(v: tf.Tensor, r: int) -> tf.Tensor:
        return tf.bitwise.bitwise_or(
            tf.bitwise.left_shift(v, tf.constant(r, tf.uint32)),
            tf.bitwise.right_shift(v, tf.constant(32 - r, tf.uint32)),
        )

    shape = ctx.shape(eqn.outvars[0].aval.shape)
    k1, k2, x1, x2 = (tf.broadcast_to(t, shape) for t in (k1, k2, x1, x2))
    ks = [k1, k2, tf.bitwise.bitwise_xor(tf.bitwise.bitwise_xor(k1, k2), np.uint32(0x1BD11BDA))]
    rotations = [(13, 15, 26, 6), (17, 29, 16, 24)]
    a, b = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            a = a + b
            b = tf.bitwise.bitwise_xor(a, rotl(b, r))
        a = a + ks[(i + 1) % 3]
        b = b + ks[(i + 2) % 3] + np.uint32(i + 1)
    return [a, b]


def _iota_2x32_shape(ctx: _Ctx, eqn: jex.JaxprEqn) -> list[tf.Tensor]:
    """A row-major uint64 iota of ``shape`` as its high and low uint32 halves."""
    shape = ctx.shape64(eqn.params["shape"])
    flat = tf.range(tf.reduce_prod(shape))
    hi = tf.cast(tf.bitwise.right_shift(flat, tf.constant(32, tf.int64)), tf.uint32)
    lo = tf.cast(tf.bitwise.bitwise_and(flat, tf.constant(0xFFFFFFFF, tf.int64)), tf.uint32)
    return [tf.reshape(hi, shape), tf.reshape(lo, shape)]


_RANDOM_PRIMITIVES = frozenset(
    {"random_seed", "random_bits", "random_split", "random_fold_in", "random_wrap", "random_unwrap"}
)


def _key_data_struct(aval: Any) -> jax.ShapeDtypeStruct:
    """The abstract value of a key array's data (uint32, the key shape appended)."""
    if not _is_key(aval.dtype):
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype)
    impl = aval.dtype._impl
    return jax.ShapeDtypeStruct((*aval.shape, *impl.key_shape), np.dtype(np.uint32))


def _key_data(value: Any) -> Any:
    """A known key array as its uint32 key data (other values unchanged)."""
    if value is None or not _is_key(value.dtype):
        return value
    return np.asarray(jax.random.key_data(value))


def _random_jaxpr(eqn: jex.JaxprEqn) -> jex.ClosedJaxpr:
    """A ``random_*`` primitive as a jaxpr on key data, traced from JAX's own implementation
    (threefry2x32, shifts, iotas), so that keys computed at run time hash as in JAX."""
    from jax._src.random import prng  # noqa: PLC0415  (private: the key-data implementations)

    name, p = eqn.primitive.name, eqn.params
    avals = [v.aval for v in eqn.invars]
    impl = avals[0].dtype._impl if _is_key(avals[0].dtype) else p.get("impl")
    ndim = len(avals[0].shape)
    fns: dict[str, Callable[..., Any]] = {
        "random_seed": lambda s: prng.random_seed_impl_base(s, impl=impl),
        "random_bits": lambda k: prng.random_bits_impl_base(
            impl, k, ndim, bit_width=p["bit_width"], shape=p["shape"]
        ),
        "random_split": lambda k: prng.random_split_impl_base(impl, k, ndim, shape=p["shape"]),
        "random_fold_in": lambda k, m: prng.random_fold_in_impl_base(impl, k, m, avals[0].shape),
        "random_wrap": lambda x: x,
        "random_unwrap": lambda x: x,
    }
    return jax.make_jaxpr(fns[name])(*(_key_data_struct(a) for a in avals))


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
    "sort": _sort,
    "lt_to": _total_order(tf.less),
    "le_to": _total_order(tf.less_equal),
    "eq_to": _total_order(tf.equal),
    # contractions and indexing
    "dot_general": _dot_general,
    "gather": _gather,
    "scatter": _scatter("set"),
    "scatter-add": _scatter("add"),
    "scatter_add": _scatter("add"),
    "scatter-mul": _scatter("mul"),
    "scatter_mul": _scatter("mul"),
    "scatter-min": _scatter("min"),
    "scatter_min": _scatter("min"),
    "scatter-max": _scatter("max"),
    "scatter_max": _scatter("max"),
    "conv_general_dilated": _conv,
    # bits (PRNG keys computed at run time)
    "shift_left": _shift("left"),
    "shift_right_logical": _shift("logical"),
    "shift_right_arithmetic": _shift("arithmetic"),
    "bitcast_convert_type": _bitcast_convert_type,
    "threefry2x32": _threefry2x32,
    "iota_2x32_shape": _iota_2x32_shape,
}

# Control-flow primitives: rule(ctx, step, inputs), with the step's bodies compiled.
_CONTROL_FLOW: dict[str, Callable[[_Ctx, _Step, list[tf.Tensor]], list[tf.Tensor]]] = {
    "scan": _scan,
    "while": _while,
    "cond": _cond,
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
    "conv_general_dilated": _check_conv,
    "bitcast_convert_type": _check_bitcast,
    **{name: _check_scatter for name in _RULES if name.startswith("scatter")},
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
    sub: _Program | None = None  # a call primitive (or a cond whose branch is known)
    bodies: list[_Program] = field(default_factory=list)  # scan / while / cond


@dataclass
class _Program:
    invars: list[jex.Var]
    steps: list[_Step] = field(default_factory=list)
    outputs: list[jex.Var | None] = field(default_factory=list)  # None: constant output
    out_consts: list[Any] = field(default_factory=list)  # numpy (or JAX key) arrays
    out_refs: list[_ConstRef | None] = field(default_factory=list)  # set for loop bodies


def _is_key(dtype: Any) -> bool:
    """Whether ``dtype`` is a PRNG key type (``key<fry>``), which numpy and TF cannot hold."""
    return jax.dtypes.issubdtype(dtype, jax.dtypes.extended)


def _const(value: Any, aval: Any) -> Any:
    """A known value as numpy, or as a JAX array for key types (folded by JAX, never by TF)."""
    if _is_key(aval.dtype):
        return value
    return np.asarray(value, dtype=aval.dtype)


class _Compiler:
    def __init__(self, make_variable: Callable[[np.ndarray], tf.Variable]):
        self._make_variable = make_variable
        self._handles: dict[tuple[Any, ...], tf.Variable] = {}

    def handle(self, value: Any) -> Any:
        """The run-time form of a constant: itself if small, else a tf.Variable (one per value).

        A PRNG key becomes its uint32 key data, the form key-typed values have in TF.
        """
        if _is_key(value.dtype):
            value = np.asarray(jax.random.key_data(value))
        if value.size <= _MAX_CONST_SIZE:
            return value
        key = (value.shape, value.dtype.str, hashlib.sha256(value.tobytes()).hexdigest())
        var = self._handles.get(key)
        if var is None:
            var = self._handles[key] = self._make_variable(value)
        return var

    def compile(
        self, jaxpr: jex.Jaxpr, consts: Sequence[Any], in_values: Sequence[Any], outer: str = ""
    ) -> _Program:
        """``outer``: the model's line of the equation that holds ``jaxpr`` (for errors in
        library functions such as ``jnp.fft.fft``, whose inner equations have no user frame)."""
        known: dict[jex.Var, Any] = {}
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            known[v] = _const(c, v.aval)
        for v, c in zip(jaxpr.invars, in_values, strict=True):
            if c is not None:
                known[v] = c

        def value_of(a: Any) -> Any:
            if isinstance(a, jex.Literal):
                return _const(a.val, a.aval)
            return known.get(a)

        prog = _Program(invars=list(jaxpr.invars))
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            vals = [value_of(a) for a in eqn.invars]
            where = functools.partial(_where, eqn, outer)  # computed only when needed
            sub, bodies = None, []
            refs = list(eqn.invars)
            if name == "cond" and vals[0] is not None:  # a known branch: inline it like a call
                branches, index = eqn.params["branches"], int(vals[0])
                branch = branches[index if 0 <= index < len(branches) else -1]  # XLA: the last
                sub = self.compile(branch.jaxpr, branch.consts, vals[1:], where())
                vals, refs = vals[1:], refs[1:]
            elif name in _CALL_PRIMITIVES:
                inner, inner_consts = _sub_jaxpr(eqn)
                sub = self.compile(inner, inner_consts, vals, where())
            elif all(v is not None for v in vals) and _foldable(eqn):
                for v, c in zip(eqn.outvars, _fold(eqn, vals), strict=True):
                    if not isinstance(v, jex.DropVar):
                        known[v] = c
                continue
            elif name in _RANDOM_PRIMITIVES:  # a key computed at run time: hash its key data
                closed = _random_jaxpr(eqn)
                keys = [_key_data(v) for v in vals]
                sub = self.compile(closed.jaxpr, closed.consts, keys, where())
            elif name in _CONTROL_FLOW:
                bodies = [self._body(j, c, where()) for j, c in _bodies(eqn, vals)]
            else:
                if name not in _RULES:
                    raise UnsupportedPrimitiveError(name, source=where())
                check = _CHECKS.get(name)
                reason = (
                    _check_keys(eqn) or (check(eqn) if check else None) or _check_symbolic_dims(eqn)
                )
                if reason:
                    raise UnsupportedPrimitiveError(name, reason, where())
            if sub is not None:
                for v, c in zip(eqn.outvars, sub.out_consts, strict=True):
                    if c is not None and not isinstance(v, jex.DropVar):
                        known[v] = _key_array(c, v.aval) if name in _RANDOM_PRIMITIVES else c
                if not sub.steps and all(c is not None for c in sub.out_consts):
                    continue
            inputs: list[_Ref] = [
                a if val is None else _ConstRef(self.handle(val))
                for a, val in zip(refs, vals, strict=True)
            ]
            prog.steps.append(_Step(eqn, inputs, sub, bodies))
        for a in jaxpr.outvars:
            c = value_of(a)
            prog.outputs.append(a if c is None else None)
            prog.out_consts.append(c)
        return prog

    def _body(self, closed: jex.ClosedJaxpr, in_values: list[Any], outer: str) -> _Program:
        """A loop body or branch: every output is read at run time, constants included."""
        prog = self.compile(closed.jaxpr, closed.consts, in_values, outer)
        prog.out_refs = [None if c is None else _ConstRef(self.handle(c)) for c in prog.out_consts]
        return prog


def _where(eqn: jex.JaxprEqn, outer: str) -> str:
    return _source_line(eqn) or outer


def _key_array(data: Any, aval: Any) -> Any:
    """Known key data (the result of a random_* program) as the key array JAX folds with."""
    if not _is_key(aval.dtype) or _is_key(data.dtype):
        return data
    from jax._src.random import prng  # noqa: PLC0415

    return prng.random_wrap(data, impl=aval.dtype._impl)


def _check_keys(eqn: jex.JaxprEqn) -> str | None:
    """PRNG keys are folded by JAX at export; one computed from run-time values is refused."""
    if any(_is_key(v.aval.dtype) for v in [*eqn.invars, *eqn.outvars]):
        return "on a PRNG key that depends on the model's inputs"
    return None


def _bodies(eqn: jex.JaxprEqn, vals: list[Any]) -> list[tuple[jex.ClosedJaxpr, list[Any]]]:
    """The jaxprs of a control-flow equation, each with its known inputs (loop-invariant
    constants stay known inside the body and fold there; carries and slices are run-time)."""
    p = eqn.params
    if eqn.primitive.name == "scan":
        n = int(p["num_consts"])
        return [(p["jaxpr"], vals[:n] + [None] * (len(vals) - n))]
    if eqn.primitive.name == "while":
        cn, bn = int(p["cond_nconsts"]), int(p["body_nconsts"])
        carry = [None] * (len(vals) - cn - bn)
        return [(p["cond_jaxpr"], vals[:cn] + carry), (p["body_jaxpr"], vals[cn : cn + bn] + carry)]
    return [(branch, vals[1:]) for branch in p["branches"]]  # cond


def _foldable(eqn: jex.JaxprEqn) -> bool:
    return (
        eqn.primitive.name not in _NOT_FOLDABLE
        and not eqn.effects
        and all(_is_static(v.aval.shape) for v in eqn.outvars)
        and not _symbolic_dims(list(eqn.params.values()))
    )


def _fold(eqn: jex.JaxprEqn, vals: list[Any]) -> list[Any]:
    try:
        out = eqn.primitive.bind(*vals, **eqn.params)
    except Exception as e:
        raise ValueError(
            f"jaxembed.export could not evaluate the constant equation {eqn.primitive.name!r} "
            f"of the model's jaxpr with JAX (at {_source_line(eqn) or 'an unknown line'}): {e}"
        ) from e
    outs = out if eqn.primitive.multiple_results else [out]
    return [_const(o, v.aval) for o, v in zip(outs, eqn.outvars, strict=True)]


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
        elif step.bodies:
            outs = _CONTROL_FLOW[step.eqn.primitive.name](ctx, step, ins)
        else:
            out = _RULES[step.eqn.primitive.name](ctx, step.eqn, *ins)
            outs = list(out) if step.eqn.primitive.multiple_results else [out]
        for v, o in zip(step.eqn.outvars, outs, strict=True):
            if o is not None and not isinstance(v, jex.DropVar):
                env[v] = o
    return [None if v is None else env[v] for v in prog.outputs]


def _run_body(prog: _Program, args: Sequence[tf.Tensor], ctx: _Ctx) -> list[tf.Tensor]:
    """Runs a loop body or branch; its constant outputs are read as tensors too."""
    outs = _run(prog, args, ctx)
    return [_read(r, {}) if o is None else o for o, r in zip(outs, prog.out_refs, strict=True)]


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

    Example:
        >>> import numpy as np, tensorflow as tf
        >>> from jaxembed import export
        >>> def tower(params, acts):
        ...     return acts["x"] @ params["w"]
        >>> model = export.TFModel(
        ...     tower, {"w": np.ones((3, 2), np.float32)}, {"x": np.ones((4, 3), np.float32)}
        ... )
        >>> model({"x": tf.ones((5, 3))}).shape  # any batch size
        TensorShape([5, 2])
        >>> sorted(model.param_variables)
        ['w']
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
            "hard-coded use of, the batch size (use -1 in reshapes, x.shape[0] in shapes). A "
            "library function that needs concrete sizes (e.g. jnp.searchsorted(..., "
            "method='sort') on a batch-sized query) can run per example under jax.vmap."
        ) from e


def _output_paths(out_shapes: Any) -> tuple[str, ...] | None:
    if not isinstance(out_shapes, dict):
        return None
    leaves, _ = jax.tree_util.tree_flatten_with_path(out_shapes)
    return tuple("/".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves)
