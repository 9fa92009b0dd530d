"""Row-sparse embedding optimizers with the equations of TF's TPU embedding optimizers.

``SGD``, ``Adagrad``, ``AdagradMomentum``, ``Adam`` and ``FTRL`` take the arguments of their
``tf.tpu.experimental.embedding`` namesakes (names, order, defaults, validation) and apply the
equations of TF's TPU embedding engine (tf_semantics §3.4) to the rows a batch touches:

* the gradient ``g`` of a row is the sum over the global batch (duplicates accumulated first);
* ``g`` is clipped to ``clipvalue`` (§3.5), the optimizer's rule updates the row and its slots;
* decoupled weight decay is then taken from the row's **pre-update** value,
  ``w <- w_new - wd * w_old`` with ``wd = weight_decay_factor`` (times the learning rate when
  ``multiply_weight_decay_factor_by_learning_rate``), as in TF's ``weight_decay_optimizers.py``;
* finally the row is clamped to ``[clip_weight_min, clip_weight_max]``.

Rows a batch does not touch do not change; ``Adam(lazy_adam=False)`` is the one exception and
updates every row (untouched rows see ``g = 0``). ``learning_rate`` is a float, a schedule (a
callable of one argument, e.g. an optax schedule) called with the 0-based number of previous
``apply_gradients`` calls, or, as TF accepts, a zero-argument callable (``lambda: lr``) called
on the host each time a step runs (``learning_rate_of``).

``from_optax(tx)`` turns an elementwise Optax transformation into a row-sparse optimizer.

Slots have TF's names and initial values (``accumulators``, ``momenta``, ``velocities``,
``linears``), so checkpoints convert both ways.

Arguments common to the TF optimizers (TF's meaning): ``use_gradient_accumulation`` (jaxembed
always sums a row's gradients over the global batch first; False is accepted, and like TF it
forbids ``clipvalue``), ``clip_weight_min``/``clip_weight_max``, ``weight_decay_factor``,
``multiply_weight_decay_factor_by_learning_rate``, ``clipvalue`` (``c`` or ``(min, max)`` with
None for an open side), ``slot_variable_creation_fn`` (``(table, slot_names, initializers) ->
{slot name: array}``) and ``low_dimensional_packing_status`` (a TPU layout hint; no effect).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxembed import _kernels
from jaxembed._kernel_abi import FLAGS, KINDS

LearningRate = float | Callable[[jax.Array], jax.Array] | Callable[[], Any]
Slots = Any  # a pytree: {slot name: array} for TF optimizers, the optax state for from_optax


def takes_step(learning_rate: Callable) -> bool:
    """Whether a callable learning rate is a schedule of the step count (``fn(count)``, as optax
    schedules are) rather than TF's zero-argument callable (``fn()``).

    A callable that can be called with no argument (every parameter optional) is a zero-argument
    callable; one that needs exactly one positional argument is a schedule. A callable without
    an inspectable signature counts as a schedule.

    Raises:
        ValueError: If it needs more than one argument.

    Example:
        >>> import optax
        >>> takes_step(optax.linear_schedule(0.1, 0.01, 100)), takes_step(lambda: 0.1)
        (True, False)
    """
    try:
        signature = inspect.signature(learning_rate)
    except (TypeError, ValueError):
        return True
    for args in ((), (0,)):
        try:
            signature.bind(*args)
            return bool(args)
        except TypeError:
            continue
    raise ValueError(
        f"A callable `learning_rate` must take no argument (TF's style, e.g. lambda: 0.1) or "
        f"one, the 0-based step count (an optax schedule); {learning_rate!r} takes "
        f"{signature}."
    )


def _host_value(learning_rate: Callable[[], Any]) -> np.ndarray:
    """A zero-argument learning rate's current value, as a float32 scalar (host side)."""
    value = np.asarray(learning_rate(), np.float32)
    if value.shape != ():
        raise ValueError(
            f"The zero-argument `learning_rate` {learning_rate!r} returned shape {value.shape}; "
            "it must return one number."
        )
    return value


def learning_rate_of(learning_rate: LearningRate, step: Any) -> jax.Array:
    """The float32 learning rate of a step: ``learning_rate`` itself if a number, a schedule
    called with ``step`` (the 0-based count of previous ``apply_gradients`` calls; traced
    inside ``jit``), or a zero-argument callable called on the host **each time the step
    runs**, through ``jax.pure_callback``.

    So ``SGD(learning_rate=lambda: current_lr[0])`` behaves as in TF, where the callable is
    evaluated at every ``apply_gradients``: inside a ``jax.jit`` step too, it is not frozen at
    trace time. It must return one number (not a traced value), be cheap and have no side
    effects: it may be called once per table and device per step. A float or a schedule of
    the step needs no host call (the fastest, and what multi-host runs should use).
    """
    if not callable(learning_rate):
        return jnp.asarray(learning_rate, jnp.float32)
    fn: Any = learning_rate  # a schedule or a zero-argument callable: told apart at run time
    if takes_step(fn):
        return jnp.asarray(fn(step), jnp.float32)
    return jax.pure_callback(lambda: _host_value(fn), jax.ShapeDtypeStruct((), jnp.float32))


def learning_rate_value(learning_rate: LearningRate, step: int = 0) -> float:
    """The learning rate of step ``step`` as a Python float, on the host (e.g. to write it into
    a TF optimizer): a number as is, a schedule called with ``step``, a zero-argument callable
    called now."""
    if not callable(learning_rate):
        return float(learning_rate)
    fn: Any = learning_rate
    return float(fn(step)) if takes_step(fn) else float(_host_value(fn))


def _flags(**on: bool) -> int:
    """The CPU kernel's rule flags (``_kernel_abi.FLAGS``) that are on."""
    return sum(FLAGS[name] for name, value in on.items() if value)


def _real(x: Any) -> TypeGuard[float]:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return _real(x) and math.isfinite(x)


def _require(ok: bool, owner: str, arg: str, value: Any, valid: str) -> None:
    """Raises ``ValueError`` naming the argument, its value and the valid range unless ``ok``."""
    if not ok:
        raise ValueError(f"{owner}: `{arg}` must be {valid}, got {value!r}.")


def _require_bool(owner: str, arg: str, value: Any, optional: bool = False) -> None:
    ok = isinstance(value, bool) or (optional and value is None)
    _require(ok, owner, arg, value, "a bool (True or False)" + (" or None" if optional else ""))


def _require_positive(owner: str, arg: str, value: Any, message: str | None = None) -> None:
    """``value`` must be a finite float > 0 (``message``: TF's own wording, if it has one)."""
    if not (_finite(value) and value > 0):
        if message is not None:
            raise ValueError(f"{owner}: {message} Received: {value!r}.")
        _require(False, owner, arg, value, "a finite float > 0")


class Optimizer:
    """Base class of the row-sparse optimizers: the shared TF options and the update order.

    Subclasses are frozen dataclasses declaring TF's arguments; they set ``slot_names`` and
    implement ``_initial_values``, ``_slot_rule`` and ``_weight_rule`` (the elementwise
    equations: the new slots, then the new weights from the new slots).

    Example:
        >>> import jax.numpy as jnp, jaxembed as je
        >>> opt = je.optimizers.SGD(learning_rate=0.5)
        >>> isinstance(opt, je.optimizers.Optimizer), opt.slot_names
        (True, ())
        >>> w, slots = opt.apply(jnp.ones(2), opt.init_slots(jnp.ones(2)), jnp.ones(2), 0)
        >>> w.tolist()
        [0.5, 0.5]
    """

    slot_names: ClassVar[tuple[str, ...]] = ()
    lazy: ClassVar[bool] = True  # False: every row is updated (non-lazy Adam)
    # Whether ``apply`` is ``new_slots`` then ``new_rows`` (every rule here; not Optax's).
    splits_update: ClassVar[bool] = True
    # Whether tf.tpu.experimental.embedding has an optimizer of this class name taking
    # ``hyperparameters()`` as arguments (export.tf_optimizer builds it).
    has_tf_twin: ClassVar[bool] = True

    # TF's common arguments: fields of every subclass (declared here for the type checker).
    if TYPE_CHECKING:
        learning_rate: LearningRate
        use_gradient_accumulation: bool
        low_dimensional_packing_status: bool
        clipvalue: Any
        clip_weight_min: float | None
        clip_weight_max: float | None
        weight_decay_factor: float | None
        multiply_weight_decay_factor_by_learning_rate: bool | None

    # -- validation shared by all TF optimizers (tf_semantics §3.1, §3.5) --
    def _validate_common(self) -> None:
        """TF's checks of the common arguments, plus range checks TF leaves out.

        TF accepts any learning rate, clip range and decay factor and fails (or trains to NaN)
        later; these are checked here: a float learning rate must be finite and >= 0 (a
        callable schedule is called at every step and not checked), clip bounds must not be
        NaN or inverted, ``clipvalue`` as a scalar must be >= 0, ``weight_decay_factor`` must
        be finite and >= 0, and the flags must be bools.
        """
        name = type(self).__name__
        lr = self.learning_rate
        if not (_real(lr) or callable(lr)):
            raise ValueError(
                f"{name}: `learning_rate` must be a float, a callable schedule of the step (e.g. "
                f"optax.exponential_decay(...)) or a zero-argument callable (lambda: 0.1), got "
                f"{lr!r}."
            )
        if callable(lr):
            try:
                takes_step(lr)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        if _real(lr):
            _require(_finite(lr) and lr >= 0, name, "learning_rate", lr, "a finite float >= 0")
        for arg in ("use_gradient_accumulation", "low_dimensional_packing_status"):
            if not isinstance(getattr(self, arg), bool):
                raise ValueError(f"{name}: `{arg}` must be a bool, got {getattr(self, arg)!r}.")
        _require_bool(
            name,
            "multiply_weight_decay_factor_by_learning_rate",
            self.multiply_weight_decay_factor_by_learning_rate,
            optional=True,
        )
        clip = self.clipvalue
        if clip is not None:
            if isinstance(clip, tuple):
                if len(clip) != 2 or not all(c is None or _real(c) for c in clip):
                    raise ValueError(
                        f"{name}: `clipvalue` as a tuple must be (min, max) with floats or None, "
                        f"got {clip!r}."
                    )
                lo, hi = clip
                _require(
                    not any(c is not None and math.isnan(c) for c in clip)
                    and (lo is None or hi is None or lo <= hi),
                    name,
                    "clipvalue",
                    clip,
                    "a gradient range (min, max) with min <= max, no NaN (None: open side)",
                )
            elif not _real(clip):
                raise ValueError(
                    f"{name}: `clipvalue` must be a float c (clip to [-c, c]) or a tuple "
                    f"(min, max) with None for an open side, got {clip!r}."
                )
            else:
                _require(
                    not math.isnan(clip) and clip >= 0,
                    name,
                    "clipvalue",
                    clip,
                    "a float c >= 0 (clip to [-c, c]); for another range pass (min, max)",
                )
            if not self.use_gradient_accumulation:
                raise ValueError(
                    f"{name}: When `use_gradient_accumulation` is False, gradient clipping cannot "
                    "be used: set use_gradient_accumulation=True or clipvalue=None."
                )
        for arg in ("clip_weight_min", "clip_weight_max", "weight_decay_factor"):
            value = getattr(self, arg)
            if value is not None and not _real(value):
                raise ValueError(f"{name}: `{arg}` must be a float or None, got {value!r}.")
        for arg in ("clip_weight_min", "clip_weight_max"):
            value = getattr(self, arg)
            _require(value is None or not math.isnan(value), name, arg, value, "a float or None")
        low, high = self.clip_weight_min, self.clip_weight_max
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"{name}: `clip_weight_min` ({low!r}) must be <= `clip_weight_max` ({high!r}); "
                "swap them, or pass None for an open side."
            )
        decay = self.weight_decay_factor
        _require(
            decay is None or (_finite(decay) and decay >= 0),
            name,
            "weight_decay_factor",
            decay,
            "a finite float >= 0 or None",
        )
        fn = getattr(self, "slot_variable_creation_fn", None)
        if fn is not None and not callable(fn):
            raise ValueError(
                f"{name}: `slot_variable_creation_fn` must be a callable "
                f"(table, slot_names, slot_initializers) -> {{slot name: array}}, got {fn!r}."
            )

    @property
    def clip_gradient_min(self) -> float | None:
        clip = self.clipvalue
        return clip[0] if isinstance(clip, tuple) else (None if clip is None else -1.0 * clip)

    @property
    def clip_gradient_max(self) -> float | None:
        clip = self.clipvalue
        return clip[1] if isinstance(clip, tuple) else clip

    # -- the update --
    def learning_rate_at(self, step: jax.Array) -> jax.Array:
        """The learning rate for ``step`` (0-based count of previous ``apply_gradients`` calls);
        a zero-argument callable is called on the host when the step runs
        (``learning_rate_of``)."""
        return learning_rate_of(self.learning_rate, step)

    def learning_rate_value(self, step: int = 0) -> float:
        """The learning rate of ``step`` as a Python float, computed on the host now
        (``learning_rate_value``); e.g. for a TF twin of this optimizer."""
        return learning_rate_value(self.learning_rate, step)

    def _initial_values(self) -> dict[str, float]:
        return {}

    def init_slots(self, table: jax.Array) -> Slots:
        """The slots of ``table`` at their TF initial values (or from slot_variable_creation_fn)."""
        values = self._initial_values()
        fn = getattr(self, "slot_variable_creation_fn", None)
        if fn is None:
            return {k: jnp.full(table.shape, v, table.dtype) for k, v in values.items()}
        inits = [jax.nn.initializers.constant(values[k]) for k in self.slot_names]
        slots = dict(fn(table, list(self.slot_names), inits))
        if set(slots) != set(self.slot_names):
            raise ValueError(
                f"{type(self).__name__}: slot_variable_creation_fn returned slots "
                f"{sorted(slots)}, expected {list(self.slot_names)}."
            )
        for k, v in slots.items():
            if tuple(jnp.shape(v)) != tuple(table.shape):
                raise ValueError(
                    f"{type(self).__name__}: slot {k!r} from slot_variable_creation_fn has shape "
                    f"{tuple(jnp.shape(v))}, expected the table's shape {tuple(table.shape)}."
                )
        return {k: jnp.asarray(slots[k], table.dtype) for k in self.slot_names}

    def _slot_rule(self, w, slots, g, lr) -> Slots:
        """The new slots of rows ``w`` from their ``slots`` and clipped gradients ``g``."""
        return {}

    def _weight_rule(self, w, slots, g, lr) -> jax.Array:
        """The new rows (before weight decay and clipping) from their **new** ``slots``."""
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """The optimizer's arguments by name (its dataclass fields), as its constructor takes
        them; what checkpoints record and ``export.tf_optimizer`` passes to TF.

        Example:
            >>> import jaxembed as je
            >>> je.optimizers.SGD(0.5).hyperparameters()["learning_rate"]
            0.5
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    # The CPU kernel's kind of this rule (``_kernel_abi.KINDS``); None: no kernel.
    _kernel_kind: ClassVar[int | None] = None

    def _kernel_constants(self) -> tuple[list[float], int]:
        """The rule's own constants for the CPU kernel, and its flags."""
        return [], 0

    def kernel_rule(self) -> tuple[int, int, list[float]] | None:
        """``(kind, flags, constants)``: this optimizer for the CPU kernel (see
        ``csrc/cpu_kernels.cc``), constants rounded to float32 as ``apply`` rounds them."""
        if self._kernel_kind is None:
            return None
        lo, hi = self.clip_gradient_min, self.clip_gradient_max
        on = {
            "CLIP_GRAD_MIN": lo is not None,
            "CLIP_GRAD_MAX": hi is not None,
            "WEIGHT_DECAY": bool(self.weight_decay_factor),
            "DECAY_TIMES_LR": bool(
                self.weight_decay_factor and self.multiply_weight_decay_factor_by_learning_rate
            ),
            "CLIP_WEIGHT_MIN": self.clip_weight_min is not None,
            "CLIP_WEIGHT_MAX": self.clip_weight_max is not None,
        }
        flags = _flags(**on)
        constants, own_flags = self._kernel_constants()
        common = [lo, hi, self.weight_decay_factor, self.clip_weight_min, self.clip_weight_max]
        return self._kernel_kind, flags | own_flags, [c or 0.0 for c in common] + constants

    def step_scalars(self, step: jax.Array) -> jax.Array:
        """What the rule takes from the step count, computed once per step: the learning rate
        (a row-wise optimizer adds its own, e.g. Adam's bias corrections). The CPU kernel takes
        the same scalars."""
        return self.learning_rate_at(step)

    def apply(self, w: jax.Array, slots: Slots, g: jax.Array, step: jax.Array):
        """Updates rows ``w`` (``[U, dim]``) and their ``slots`` with summed gradients ``g``:
        ``new_slots``, then ``new_rows`` from them.

        Example:
            >>> import jax.numpy as jnp, jaxembed as je
            >>> opt = je.optimizers.Adagrad(0.5)
            >>> w, slots = opt.apply(jnp.ones((1, 2)), {"accumulators": jnp.zeros((1, 2))},
            ...                      jnp.full((1, 2), 2.0), jnp.int32(0))
            >>> w.tolist(), slots["accumulators"].tolist()
            ([[0.5, 0.5]], [[4.0, 4.0]])
        """
        scalars = self.step_scalars(step)
        new_slots = self.new_slots(w, slots, g, scalars)
        return self.new_rows(w, new_slots, g, scalars), new_slots

    def _clipped(self, g: jax.Array) -> jax.Array:
        if self.clipvalue is None:
            return g
        return jnp.clip(g, self.clip_gradient_min, self.clip_gradient_max)

    def new_slots(self, w: jax.Array, slots: Slots, g: jax.Array, scalars: jax.Array) -> Slots:
        """The first half of ``apply``: the new slots of rows ``w`` (``scalars``:
        ``step_scalars(step)``)."""
        return self._slot_rule(w, slots, self._clipped(g), scalars)

    def new_rows(self, w: jax.Array, new_slots: Slots, g: jax.Array, scalars: jax.Array):
        """The second half of ``apply``: the new rows ``w`` from their **new** slots (so the
        update can write the slots, then read them back, as ``_kernels`` does)."""
        lr = scalars
        new_w = self._weight_rule(w, new_slots, self._clipped(g), lr)
        if self.weight_decay_factor:
            decay: Any = self.weight_decay_factor
            if self.multiply_weight_decay_factor_by_learning_rate:
                decay = decay * lr
            new_w = new_w - decay * w
        if self.clip_weight_min is not None or self.clip_weight_max is not None:
            new_w = jnp.clip(new_w, self.clip_weight_min, self.clip_weight_max)
        return new_w.astype(w.dtype)

    def column_blocks(self, axes: tuple[str, ...], dim: int) -> Optimizer:
        """This optimizer for one column block of rows split over mesh ``axes`` (column-wise
        sharding, inside ``shard_map``). Elementwise rules split with the columns: ``self``."""
        del axes, dim
        return self


@dataclasses.dataclass(frozen=True)
class SGD(Optimizer):
    """Stochastic gradient descent: ``w <- w - lr * g``.

    Example:
        >>> import jaxembed as je
        >>> je.optimizers.SGD(learning_rate=0.1).slot_names
        ()
    """

    learning_rate: LearningRate = 0.01
    use_gradient_accumulation: bool = True
    clip_weight_min: float | None = None
    clip_weight_max: float | None = None
    weight_decay_factor: float | None = None
    multiply_weight_decay_factor_by_learning_rate: bool | None = None
    clipvalue: Any = None
    low_dimensional_packing_status: bool = False

    def __post_init__(self) -> None:
        self._validate_common()

    _kernel_kind: ClassVar[int | None] = KINDS["SGD"]

    def _weight_rule(self, w, slots, g, lr):
        return w - lr * g


@dataclasses.dataclass(frozen=True)
class Adagrad(Optimizer):
    """Adagrad without epsilon: ``a <- a + g^2; w <- w - lr * g / sqrt(a)``.

    Slot ``accumulators`` starts at ``initial_accumulator_value`` (> 0).

    Example:
        >>> import jaxembed as je
        >>> je.optimizers.Adagrad(learning_rate=0.1).slot_names
        ('accumulators',)
    """

    learning_rate: LearningRate = 0.001
    initial_accumulator_value: float = 0.1
    use_gradient_accumulation: bool = True
    clip_weight_min: float | None = None
    clip_weight_max: float | None = None
    weight_decay_factor: float | None = None
    multiply_weight_decay_factor_by_learning_rate: bool | None = None
    slot_variable_creation_fn: Callable | None = None
    clipvalue: Any = None
    low_dimensional_packing_status: bool = False

    slot_names: ClassVar[tuple[str, ...]] = ("accumulators",)

    def __post_init__(self) -> None:
        self._validate_common()
        _require_positive(
            "Adagrad",
            "initial_accumulator_value",
            self.initial_accumulator_value,
            "Argument `initial_accumulator_value` must be a positive float.",
        )

    def _initial_values(self):
        return {"accumulators": self.initial_accumulator_value}

    _kernel_kind: ClassVar[int | None] = KINDS["ADAGRAD"]

    def _slot_rule(self, w, slots, g, lr):
        return {"accumulators": slots["accumulators"] + g * g}

    def _weight_rule(self, w, slots, g, lr):
        return w - lr * g / jnp.sqrt(slots["accumulators"])


@dataclasses.dataclass(frozen=True)
class AdagradMomentum(Optimizer):
    """Adagrad with momentum, TF's TPU equations (tf_semantics §3.4).

    ``a <- a + g^2`` (or ``beta2 * a + (1 - beta2) * g^2`` when ``beta2 != 1``);
    ``s = g * (a + epsilon)^(-1/exponent)``; ``m <- momentum * m + s``;
    ``w <- w - lr * (momentum * m + s)`` with Nesterov, else ``w <- w - lr * m``.
    Slots ``accumulators`` and ``momenta`` start at 0.

    Example:
        >>> import jaxembed as je
        >>> je.optimizers.AdagradMomentum(0.1, momentum=0.9).slot_names
        ('accumulators', 'momenta')
    """

    learning_rate: LearningRate = 0.001
    momentum: float = 0.0
    use_nesterov: bool = False
    exponent: float = 2
    beta2: float = 1
    epsilon: float = 1e-10
    use_gradient_accumulation: bool = True
    clip_weight_min: float | None = None
    clip_weight_max: float | None = None
    weight_decay_factor: float | None = None
    multiply_weight_decay_factor_by_learning_rate: bool | None = None
    slot_variable_creation_fn: Callable | None = None
    clipvalue: Any = None
    low_dimensional_packing_status: bool = False

    slot_names: ClassVar[tuple[str, ...]] = ("accumulators", "momenta")

    def __post_init__(self) -> None:
        self._validate_common()
        name = "AdagradMomentum"
        if not (_finite(self.epsilon) and self.epsilon > 0):
            raise ValueError(
                f"Adagrad momentum: epsilon must be positive, got epsilon={self.epsilon!r}."
            )
        if not (_finite(self.exponent) and self.exponent > 0):
            raise ValueError(
                f"Adagrad momentum: Precondition exponent must >0, got exponent={self.exponent!r}."
            )
        m = self.momentum
        _require(_real(m) and 0 <= m < 1, name, "momentum", m, "a float in [0, 1)")
        b = self.beta2
        _require(
            _real(b) and 0 <= b <= 1, name, "beta2", b, "a float in [0, 1] (1: plain Adagrad sum)"
        )
        _require_bool(name, "use_nesterov", self.use_nesterov)

    def _initial_values(self):
        return {"accumulators": 0.0, "momenta": 0.0}

    _kernel_kind: ClassVar[int | None] = KINDS["ADAGRAD_MOMENTUM"]

    def _kernel_constants(self):
        flags = _flags(NESTEROV=self.use_nesterov, PLAIN_ACCUMULATOR=self.beta2 == 1)
        return [
            self.beta2,
            1 - self.beta2,
            self.epsilon,
            -1.0 / self.exponent,
            self.momentum,
        ], flags

    def _scaled(self, g, acc):
        return g * jnp.power(acc + self.epsilon, -1.0 / self.exponent)

    def _slot_rule(self, w, slots, g, lr):
        acc = slots["accumulators"]
        if self.beta2 == 1:
            acc = acc + g * g
        else:
            acc = self.beta2 * acc + (1 - self.beta2) * g * g
        mom = self.momentum * slots["momenta"] + self._scaled(g, acc)
        return {"accumulators": acc, "momenta": mom}

    def _weight_rule(self, w, slots, g, lr):
        mom = slots["momenta"]
        if self.use_nesterov:
            return w - lr * (self.momentum * mom + self._scaled(g, slots["accumulators"]))
        return w - lr * mom


@dataclasses.dataclass(frozen=True)
class Adam(Optimizer):
    """Adam without bias correction, lazy by default (TF's TPU equations).

    ``m <- b1 * m + (1 - b1) * g``; ``v <- b2 * v + (1 - b2) * g^2``;
    ``w <- w - lr * m / sqrt(v + eps^2)`` (``sum_inside_sqrt``) or ``lr * m / (sqrt(v) + eps)``.
    ``lazy_adam=True`` updates only touched rows; False updates every row. Slots ``momenta``
    and ``velocities`` start at 0.

    Example:
        >>> import jaxembed as je
        >>> je.optimizers.Adam(0.01).slot_names
        ('momenta', 'velocities')
    """

    learning_rate: LearningRate = 0.001
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-07
    lazy_adam: bool = True
    sum_inside_sqrt: bool = True
    use_gradient_accumulation: bool = True
    clip_weight_min: float | None = None
    clip_weight_max: float | None = None
    weight_decay_factor: float | None = None
    multiply_weight_decay_factor_by_learning_rate: bool | None = None
    slot_variable_creation_fn: Callable | None = None
    clipvalue: Any = None
    low_dimensional_packing_status: bool = False

    slot_names: ClassVar[tuple[str, ...]] = ("momenta", "velocities")

    def __post_init__(self) -> None:
        self._validate_common()
        for arg in ("beta_1", "beta_2"):  # TF's message (printing the right value, unlike TF)
            value = getattr(self, arg)
            if not (_real(value) and 0.0 <= value < 1.0):
                raise ValueError(
                    f"Adam: Argument `{arg}` must be >= 0 and < 1. Received: {value!r}."
                )
        if not (_finite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"Adam: epsilon must be positive; got {self.epsilon!r}.")
        for arg in ("lazy_adam", "sum_inside_sqrt"):
            _require_bool("Adam", arg, getattr(self, arg))
        if not self.lazy_adam and not self.use_gradient_accumulation:
            raise ValueError(
                "Adam: when disabling lazy Adam (lazy_adam=False), gradient accumulation must be "
                "used. Set `use_gradient_accumulation` to True."
            )

    @property
    def lazy(self) -> bool:  # type: ignore[override]
        return self.lazy_adam

    def _initial_values(self):
        return {"momenta": 0.0, "velocities": 0.0}

    _kernel_kind: ClassVar[int | None] = KINDS["ADAM"]

    def _kernel_constants(self):
        constants = [
            self.beta_1,
            1 - self.beta_1,
            self.beta_2,
            1 - self.beta_2,
            self.epsilon,
            self.epsilon**2,
        ]
        return constants, _flags(SUM_INSIDE_SQRT=self.sum_inside_sqrt)

    def _slot_rule(self, w, slots, g, lr):
        m = self.beta_1 * slots["momenta"] + (1 - self.beta_1) * g
        v = self.beta_2 * slots["velocities"] + (1 - self.beta_2) * g * g
        return {"momenta": m, "velocities": v}

    def _weight_rule(self, w, slots, g, lr):
        m, v = slots["momenta"], slots["velocities"]
        if self.sum_inside_sqrt:
            denom = jnp.sqrt(v + self.epsilon**2)
        else:
            denom = jnp.sqrt(v) + self.epsilon
        return w - lr * m / denom


@dataclasses.dataclass(frozen=True)
class FTRL(Optimizer):
    """FTRL-proximal with TF's TPU equations, in both ``multiply_linear_by_learning_rate`` modes.

    With ``p = learning_rate_power``: ``a' = a + g^2``, ``dp = a'^(-p) - a^(-p)``;
    default: ``l <- l + g - dp * w / lr``, ``w <- (clip(l, -l1, l1) - l) /
    ((a'^(-p) + beta) / lr + 2 * l2)``; with ``multiply_linear_by_learning_rate``:
    ``l <- l + lr * g - dp * w``,
    ``w <- (clip(l, -lr * l1, lr * l1) - l) / (a'^(-p) + 2 * lr * l2 + beta)``.
    Slots ``accumulators`` (start ``initial_accumulator_value`` > 0) and ``linears`` (0).

    Example:
        >>> import jaxembed as je
        >>> je.optimizers.FTRL(0.1, l1_regularization_strength=0.01).slot_names
        ('accumulators', 'linears')
    """

    learning_rate: LearningRate = 0.001
    learning_rate_power: float = -0.5
    l1_regularization_strength: float = 0.0
    l2_regularization_strength: float = 0.0
    beta: float = 0.0
    initial_accumulator_value: float = 0.1
    use_gradient_accumulation: bool = True
    clip_weight_min: float | None = None
    clip_weight_max: float | None = None
    weight_decay_factor: float | None = None
    multiply_weight_decay_factor_by_learning_rate: bool | None = None
    slot_variable_creation_fn: Callable | None = None
    clipvalue: Any = None
    multiply_linear_by_learning_rate: bool = False
    allow_zero_accumulator: bool = False
    low_dimensional_packing_status: bool = False

    slot_names: ClassVar[tuple[str, ...]] = ("accumulators", "linears")

    def __post_init__(self) -> None:
        self._validate_common()
        name = "FTRL"
        _require_positive(
            name,
            "initial_accumulator_value",
            self.initial_accumulator_value,
            "Argument `initial_accumulator_value` must be a positive float.",
        )
        lr = self.learning_rate
        if _real(lr) and not self.multiply_linear_by_learning_rate:
            # The default update divides by the learning rate: 0 would give NaN linears.
            _require(
                lr > 0,
                name,
                "learning_rate",
                lr,
                "> 0 (FTRL divides by it; use multiply_linear_by_learning_rate=True for 0)",
            )
        power = self.learning_rate_power
        if not (_finite(power) and power <= 0):  # Keras's FTRL check and message
            raise ValueError(
                "FTRL: `learning_rate_power` needs to be negative or zero. Received: "
                f"learning_rate_power={power!r}."
            )
        for arg in ("l1_regularization_strength", "l2_regularization_strength", "beta"):
            value = getattr(self, arg)
            if not (_finite(value) and value >= 0):
                raise ValueError(
                    f"FTRL: `{arg}` needs to be positive or zero. Received: {arg}={value!r}."
                )
        for arg in ("multiply_linear_by_learning_rate", "allow_zero_accumulator"):
            _require_bool(name, arg, getattr(self, arg))

    def _initial_values(self):
        return {"accumulators": self.initial_accumulator_value, "linears": 0.0}

    _kernel_kind: ClassVar[int | None] = KINDS["FTRL"]

    def _kernel_constants(self):
        constants = [
            -self.learning_rate_power,
            self.l1_regularization_strength,
            self.l2_regularization_strength,
            self.beta,
            2 * self.l2_regularization_strength,
        ]
        return constants, _flags(LINEAR_TIMES_LR=self.multiply_linear_by_learning_rate)

    def _pow(self, acc):
        """``acc^-learning_rate_power``; TF's default power -0.5 as a (correctly rounded) square
        root, as the CPU kernel computes it."""
        power = -self.learning_rate_power
        return jnp.sqrt(acc) if power == 0.5 else jnp.power(acc, power)

    def _slot_rule(self, w, slots, g, lr):
        acc, lin = slots["accumulators"], slots["linears"]
        new_acc = acc + g * g
        delta = self._pow(new_acc) - self._pow(acc)
        if self.multiply_linear_by_learning_rate:
            lin = lin + lr * g - delta * w
        else:
            lin = lin + g - delta * w / lr
        return {"accumulators": new_acc, "linears": lin}

    def _weight_rule(self, w, slots, g, lr):
        new_pow = self._pow(slots["accumulators"])
        lin = slots["linears"]
        l1, l2, beta = (
            self.l1_regularization_strength,
            self.l2_regularization_strength,
            self.beta,
        )
        if self.multiply_linear_by_learning_rate:
            return (jnp.clip(lin, -lr * l1, lr * l1) - lin) / (new_pow + 2 * lr * l2 + beta)
        return (jnp.clip(lin, -l1, l1) - lin) / ((new_pow + beta) / lr + 2 * l2)


# ---------------------------------------------------------------------------------------------
# Row-wise optimizers (FBGEMM's equations): one second-moment value per row


_WEIGHT_DECAY_MODES = ("none", "l2", "decoupled")


def _row_sum(x: jax.Array) -> jax.Array:
    """Sum over a row's columns: the whole row (see ``Optimizer.column_blocks``)."""
    return jnp.sum(x, axis=-1)


class RowWiseOptimizer(Optimizer):
    """Base class of FBGEMM's row-wise optimizers: some slots hold one float32 value per row.

    Slots named in ``row_slots`` have shape ``[V]`` (one value per table row) and are sharded
    like the table's rows; the others have the table's shape. TF's common options (clipping,
    ``weight_decay_factor``) do not apply; the optimizers take FBGEMM's own arguments instead.

    Example:
        >>> import jax.numpy as jnp, jaxembed as je
        >>> opt = je.optimizers.RowWiseAdagrad(learning_rate=0.5)
        >>> opt.row_slots, opt.init_slots(jnp.zeros((3, 2)))["accumulators"].shape
        (('accumulators',), (3,))
        >>> g = jnp.array([[1.0, 1.0], [0.0, 2.0], [0.0, 0.0]])
        >>> w, slots = opt.apply(jnp.zeros((3, 2)), opt.init_slots(jnp.zeros((3, 2))), g, 0)
        >>> slots["accumulators"].tolist()  # each row's mean of g^2
        [1.0, 2.0, 0.0]
    """

    row_slots: ClassVar[tuple[str, ...]] = ()
    has_tf_twin: ClassVar[bool] = False  # FBGEMM's optimizers: none in TF

    # TF's common options: not arguments of FBGEMM's optimizers.
    use_gradient_accumulation = True
    low_dimensional_packing_status = False
    clipvalue = None
    clip_weight_min = None
    clip_weight_max = None
    weight_decay_factor = None
    multiply_weight_decay_factor_by_learning_rate = None

    def _validate_learning_rate(self) -> None:
        name, lr = type(self).__name__, self.learning_rate
        if not (_real(lr) or callable(lr)):
            raise ValueError(
                f"{name}: `learning_rate` must be a float or a callable schedule (e.g. "
                f"optax.exponential_decay(...)), got {lr!r}."
            )
        if callable(lr):
            try:  # a schedule fn(step) or TF's zero-argument callable; nothing else
                takes_step(lr)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        if _real(lr):
            _require(_finite(lr) and lr >= 0, name, "learning_rate", lr, "a finite float >= 0")

    def init_slots(self, table: jax.Array) -> Slots:
        """The slots at their initial values: ``[V]`` for ``row_slots``, else the table's shape."""
        return {
            k: jnp.full(table.shape[:1] if k in self.row_slots else table.shape, v, table.dtype)
            for k, v in self._initial_values().items()
        }

    def column_blocks(self, axes: tuple[str, ...], dim: int) -> Optimizer:
        """This optimizer for one column block of rows split over mesh ``axes`` (inside
        ``shard_map``): the row statistic is summed over the blocks (``psum``) and divided by
        the logical ``dim``, so every block sees the whole row's statistic."""
        return _ColumnBlocks(self, tuple(axes), dim)

    def _row_kernel(self) -> tuple[int, int, list[float]]:
        """The rule's kind, flags and own constants for the CPU kernel."""
        raise NotImplementedError

    def kernel_rule(self) -> tuple[int, int, list[float]] | None:
        """``(kind, flags, constants)`` for ``csrc/cpu_kernels.cc`` (``RowWiseRule``): TF's five
        common constants (unused, 0) then the rule's own."""
        kind, flags, constants = self._row_kernel()
        return kind, flags, [0.0] * 5 + constants

    def new_slots(
        self,
        w: jax.Array,
        slots: Slots,
        g: jax.Array,
        scalars: jax.Array,
        row_sum: Callable[[jax.Array], jax.Array] = _row_sum,
        dim: int | None = None,
    ) -> Slots:
        """The new slots; on ``[U, B]`` blocks of rows, ``row_sum`` sums ``[U, B]`` over the
        whole logical row (``[U]``) and ``dim`` is the row's logical width (default: ``B``)."""
        return self._row_slot_rule(w, slots, g, scalars, row_sum, dim or w.shape[-1])

    def new_rows(self, w: jax.Array, new_slots: Slots, g: jax.Array, scalars: jax.Array):
        return self._row_weight_rule(w, new_slots, g, scalars).astype(w.dtype)

    def _row_slot_rule(self, w, slots, g, scalars, row_sum, dim) -> Slots:
        raise NotImplementedError

    def _row_weight_rule(self, w, slots, g, scalars) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _ColumnBlocks(Optimizer):
    """A row-wise optimizer on one column block of each row (see ``column_blocks``)."""

    optimizer: RowWiseOptimizer
    axes: tuple[str, ...]
    dim: int

    has_tf_twin: ClassVar[bool] = False

    @property
    def slot_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.optimizer.slot_names

    @property
    def learning_rate(self) -> LearningRate:  # type: ignore[override]
        return self.optimizer.learning_rate

    def kernel_rule(self) -> tuple[int, int, list[float]] | None:
        return None  # the psum runs in JAX

    def init_slots(self, table: jax.Array) -> Slots:
        return self.optimizer.init_slots(table)

    def step_scalars(self, step: jax.Array) -> jax.Array:
        return self.optimizer.step_scalars(step)

    def new_slots(self, w, slots, g, scalars):
        def row_sum(x: jax.Array) -> jax.Array:
            return jax.lax.psum(jnp.sum(x, axis=-1), self.axes)

        return self.optimizer.new_slots(w, slots, g, scalars, row_sum, self.dim)

    def new_rows(self, w, new_slots, g, scalars):
        return self.optimizer.new_rows(w, new_slots, g, scalars)


@dataclasses.dataclass(frozen=True)
class RowWiseAdagrad(RowWiseOptimizer):
    """Row-wise Adagrad: FBGEMM's ``EXACT_ROWWISE_ADAGRAD``, one accumulator per row.

    Per touched row with summed gradient ``g`` (``D`` columns), in float32::

        g2    = sum(g'^2) / D        g' = g + wd * w with weight_decay_mode="l2", else g
        acc   = acc + g2
        mult  = lr / (sqrt(acc) + epsilon)
        corr  = 1 - mult * wd  ("l2") | 1 - lr * wd  ("decoupled") | 1  ("none")
        w     = corr * w - mult * g

    Slot ``accumulators`` has shape ``[V]`` (one float per row, ``1/D`` of Adagrad's memory)
    and starts at ``initial_accumulator_value``. Rows a batch does not touch do not change.
    With column-wise sharding the row's sum of squares is summed over the column blocks.
    TF has no such optimizer: TF exports and TF checkpoints carry the tables only.

    Example:
        >>> import jaxembed as je
        >>> je.optimizers.RowWiseAdagrad(0.1).slot_names
        ('accumulators',)
    """

    learning_rate: LearningRate
    initial_accumulator_value: float = 0.0
    epsilon: float = 1e-8
    weight_decay: float = 0.0
    weight_decay_mode: str = "none"

    slot_names: ClassVar[tuple[str, ...]] = ("accumulators",)
    row_slots: ClassVar[tuple[str, ...]] = ("accumulators",)

    def __post_init__(self) -> None:
        name = "RowWiseAdagrad"
        self._validate_learning_rate()
        acc = self.initial_accumulator_value
        _require(
            _finite(acc) and acc >= 0, name, "initial_accumulator_value", acc, "a finite float >= 0"
        )
        _require(
            _finite(self.epsilon) and self.epsilon >= 0,
            name,
            "epsilon",
            self.epsilon,
            "a finite float >= 0",
        )
        if acc == 0 and self.epsilon == 0:
            raise ValueError(
                f"{name}: `initial_accumulator_value` and `epsilon` are both 0, so a row's first "
                "update divides by zero; make one of them positive."
            )
        wd = self.weight_decay
        _require(_finite(wd) and wd >= 0, name, "weight_decay", wd, "a finite float >= 0")
        _require(
            self.weight_decay_mode in _WEIGHT_DECAY_MODES,
            name,
            "weight_decay_mode",
            self.weight_decay_mode,
            f"one of {_WEIGHT_DECAY_MODES}",
        )

    def _initial_values(self):
        return {"accumulators": self.initial_accumulator_value}

    def _row_kernel(self):
        wd, mode = self.weight_decay, self.weight_decay_mode
        flags = _flags(
            ROW_DECAY_L2=bool(wd) and mode == "l2",
            ROW_DECAY_DECOUPLED=bool(wd) and mode == "decoupled",
        )
        return KINDS["ROWWISE_ADAGRAD"], flags, [self.epsilon, wd]

    def _row_slot_rule(self, w, slots, g, scalars, row_sum, dim):
        wd, mode = self.weight_decay, self.weight_decay_mode
        g_eff = g + wd * w if mode == "l2" and wd else g
        return {"accumulators": slots["accumulators"] + row_sum(g_eff * g_eff) / dim}

    def _row_weight_rule(self, w, slots, g, scalars):
        wd, mode, lr = self.weight_decay, self.weight_decay_mode, scalars
        mult = (lr / (jnp.sqrt(slots["accumulators"]) + self.epsilon))[:, None]
        if mode == "l2" and wd:
            return (1 - mult * wd) * w - mult * g
        if mode == "decoupled" and wd:
            return (1 - lr * wd) * w - mult * g
        return w - mult * g


@dataclasses.dataclass(frozen=True)
class PartialRowWiseAdam(RowWiseOptimizer):
    """Adam with a row-wise second moment: FBGEMM's ``PARTIAL_ROWWISE_ADAM``.

    With ``t`` = this step's 1-based number (previous ``apply_gradients`` calls + 1, FBGEMM's
    ``iter``; global, not per row), per touched row with summed gradient ``g`` (``D`` columns)::

        v = (1 - beta_2) * sum(g^2) / D + beta_2 * v          (one value per row)
        m = beta_1 * m + (1 - beta_1) * g                     (element-wise)
        w = w - lr * (m / (1 - beta_1^t) / (sqrt(v / (1 - beta_2^t)) + epsilon) + wd * w)

    Slots ``momenta`` (the table's shape) and ``velocities`` (``[V]``) start at 0. Rows a batch
    does not touch do not change (lazy, as FBGEMM). With column-wise sharding the row's sum of
    squares is summed over the column blocks. TF has no such optimizer: TF exports and TF
    checkpoints carry the tables only.

    Example:
        >>> import jaxembed as je
        >>> je.optimizers.PartialRowWiseAdam(0.01).slot_names
        ('momenta', 'velocities')
    """

    learning_rate: LearningRate
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-8
    weight_decay: float = 0.0

    slot_names: ClassVar[tuple[str, ...]] = ("momenta", "velocities")
    row_slots: ClassVar[tuple[str, ...]] = ("velocities",)

    def __post_init__(self) -> None:
        name = "PartialRowWiseAdam"
        self._validate_learning_rate()
        for arg in ("beta_1", "beta_2"):
            value = getattr(self, arg)
            _require(_real(value) and 0.0 <= value < 1.0, name, arg, value, "a float in [0, 1)")
        _require(
            _finite(self.epsilon) and self.epsilon > 0,
            name,
            "epsilon",
            self.epsilon,
            "a finite float > 0",
        )
        wd = self.weight_decay
        _require(_finite(wd) and wd >= 0, name, "weight_decay", wd, "a finite float >= 0")

    def _initial_values(self):
        return {"momenta": 0.0, "velocities": 0.0}

    def _bias_corrections(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``1 - beta_1^t`` and ``1 - beta_2^t`` with ``t = step + 1`` (FBGEMM's ``iter``)."""
        t = (jnp.asarray(step) + 1).astype(jnp.float32)
        return (
            1 - jnp.power(jnp.float32(self.beta_1), t),
            1 - jnp.power(jnp.float32(self.beta_2), t),
        )

    def _row_kernel(self):
        b1, b2 = self.beta_1, self.beta_2
        constants = [b1, 1 - b1, b2, 1 - b2, self.epsilon, self.weight_decay]
        return KINDS["PARTIAL_ROWWISE_ADAM"], 0, constants

    def step_scalars(self, step: jax.Array) -> jax.Array:
        """The learning rate and the two bias corrections."""
        return jnp.stack([self.learning_rate_at(step), *self._bias_corrections(step)])

    def _row_slot_rule(self, w, slots, g, scalars, row_sum, dim):
        b1, b2 = self.beta_1, self.beta_2
        v = row_sum(g * g) / dim * (1 - b2) + slots["velocities"] * b2
        m = b1 * slots["momenta"] + (1 - b1) * g
        return {"momenta": m, "velocities": v}

    def _row_weight_rule(self, w, slots, g, scalars):
        lr, bias1, bias2 = scalars[0], scalars[1], scalars[2]
        m_hat = slots["momenta"] / bias1
        update = m_hat / (jnp.sqrt(slots["velocities"] / bias2) + self.epsilon)[:, None]
        if self.weight_decay:
            update = update + self.weight_decay * w
        return w - lr * update


# ---------------------------------------------------------------------------------------------
# Optax


def _rows_of(tree: Any, index: Any) -> Any:
    return jax.tree.map(lambda x: x[index] if np.ndim(x) >= 1 else x, tree)


def _check_elementwise(tx: optax.GradientTransformation) -> None:
    """Refuses transformations whose update of a row depends on other rows."""
    rng = np.random.default_rng(0)
    params = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    grads = [jnp.asarray(10 * rng.normal(size=(6, 3)), jnp.float32) for _ in range(2)]
    grads.insert(0, jnp.zeros((6, 3), jnp.float32))  # a row may first be touched with g = 0
    halves = (np.array([0, 2, 4]), np.array([1, 3, 5]))
    full_state = tx.init(params)
    half_states = [_rows_of(full_state, h) for h in halves]
    for g in grads:
        full, full_state = tx.update(g, full_state, params)
        if not np.isfinite(np.asarray(full)).all():
            raise ValueError(
                "from_optax: this Optax transformation turns finite gradients (or a zero "
                "gradient, which a touched row can get) into NaN or Inf updates; check its "
                "hyperparameters (e.g. a NaN or infinite learning rate, eps=0) and pass finite "
                "values."
            )
        for i, h in enumerate(halves):
            part, half_states[i] = tx.update(g[h], half_states[i], params[h])
            if not np.allclose(np.asarray(part), np.asarray(full)[h], rtol=1e-5, atol=1e-6):
                raise ValueError(
                    "from_optax: this Optax transformation is not elementwise: updating a subset "
                    "of rows gives different results from updating the whole table (e.g. it "
                    "clips by the global norm or normalises over the table). Row-sparse "
                    "training applies it to the touched rows only; use an elementwise chain "
                    "(optax.sgd, adam, rmsprop, adagrad, clip, scale_by_schedule, ...)."
                )


@dataclasses.dataclass(frozen=True)
class OptaxOptimizer(Optimizer):
    """An elementwise Optax transformation applied to the touched rows (see ``from_optax``).

    Example:
        >>> import jax.numpy as jnp, optax, jaxembed as je
        >>> opt = je.optimizers.from_optax(optax.sgd(0.5))
        >>> table = jnp.zeros((4, 2))
        >>> rows = jnp.array([1, 4])  # 4 = the vocabulary size: padding, ignored
        >>> table, _ = je.optimizers.apply_rows(
        ...     opt, table, opt.init_slots(table), rows, jnp.ones((2, 2)), 0
        ... )
        >>> table[:, 0].tolist()
        [0.0, -0.5, 0.0, 0.0]
    """

    tx: optax.GradientTransformation

    has_tf_twin: ClassVar[bool] = False
    splits_update: ClassVar[bool] = False  # the new rows come from optax's updates

    # Not fields: the TF options do not apply (optax has its own).
    learning_rate = 0.0
    clipvalue = None
    weight_decay_factor = None
    clip_weight_min = None
    clip_weight_max = None

    def init_slots(self, table: jax.Array) -> Slots:
        state = self.tx.init(table)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state):
            shape = tuple(np.shape(leaf))
            if shape not in ((), tuple(table.shape)):
                raise ValueError(
                    f"from_optax: state leaf {jax.tree_util.keystr(path)} has shape {shape}; "
                    f"row-sparse updates need state leaves shaped like the table "
                    f"{tuple(table.shape)} or scalars (a factored or whole-table statistic "
                    "cannot be updated row by row)."
                )
        return state

    def hyperparameters(self) -> dict[str, Any]:
        """No storable arguments: ``tx`` is code (a checkpoint checks its slot tree instead)."""
        return {}

    def apply(self, w, slots, g, step):
        del step  # optax keeps its own count
        updates, slots = self.tx.update(g, slots, w)
        return optax.apply_updates(w, updates).astype(w.dtype), slots


def from_optax(tx: optax.GradientTransformation) -> OptaxOptimizer:
    """Applies an elementwise Optax transformation row-sparsely: only touched rows change.

    Each step the touched rows of the table and of every table-shaped state leaf are gathered,
    ``tx.update`` runs on them, and they are written back; scalar state (e.g. a step count) is
    updated once per step. Rows a batch does not touch keep their values and state (so e.g.
    ``optax.adam`` becomes lazy Adam, with optax's bias correction).

    Raises:
        ValueError: If ``tx`` is not elementwise (e.g. ``optax.clip_by_global_norm``), or if it
            turns finite gradients into NaN or Inf updates (e.g. a NaN learning rate).

    Example:
        >>> import optax, jaxembed as je
        >>> opt = je.optimizers.from_optax(optax.rmsprop(1e-3))
        >>> type(opt).__name__
        'OptaxOptimizer'
    """
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise ValueError(f"from_optax expects an optax.GradientTransformation, got {tx!r}.")
    _check_elementwise(tx)
    return OptaxOptimizer(tx)


# ---------------------------------------------------------------------------------------------
# Row-sparse application


def apply_rows(
    optimizer: Optimizer,
    table: jax.Array,
    slots: Slots,
    ids: jax.Array,
    grads: jax.Array,
    step: jax.Array,
) -> tuple[jax.Array, Slots]:
    """Applies ``optimizer`` to the rows ``ids`` of ``table`` (and of its slots).

    Shapes: V = vocabulary size, D = dim, U = touched rows (padded).

    On CPU the TF optimizers run in place, one pass over the touched rows (donate the state to
    the enclosing ``jit``); elsewhere, and for ``from_optax``, the rows are gathered, updated
    and written back.

    Args:
        optimizer: The table's optimizer.
        table: ``[V, D]``.
        slots: The table's slots (table-shaped leaves and scalars).
        ids: ``[U]`` distinct row ids; ``V`` marks padding (ignored).
        grads: ``[U, D]`` accumulated gradient of each row.
        step: Number of previous ``apply_gradients`` calls.

    Returns:
        The new table and slots. Untouched rows are unchanged unless ``optimizer.lazy`` is False.

    Example:
        >>> import jax.numpy as jnp, jaxembed as je
        >>> opt = je.optimizers.Adagrad(0.5, initial_accumulator_value=1.0)
        >>> table = jnp.zeros((4, 2))
        >>> ids = jnp.array([2, 4])  # 4 = the vocabulary size: padding, ignored
        >>> table, slots = je.optimizers.apply_rows(
        ...     opt, table, opt.init_slots(table), ids, jnp.ones((2, 2)), 0
        ... )
        >>> slots["accumulators"][:, 0].tolist()
        [1.0, 1.0, 2.0, 1.0]
    """
    if not optimizer.lazy:  # every row (non-lazy Adam: elementwise, on the array as stored)
        dense = _kernels.add_rows(jnp.zeros_like(table), ids, grads)
        return optimizer.apply(table, slots, dense, step)
    return _kernels.apply_rows(optimizer, table, slots, ids, grads, step)


def apply_slot_gradients(
    optimizer: Optimizer,
    table: jax.Array,
    slots: Slots,
    ids: jax.Array,
    parts: list[tuple[Any, ...]],
    step: jax.Array,
) -> tuple[jax.Array, Slots]:
    """``apply_rows`` with each row's gradient summed from slot cotangents.

    ``parts``: one ``(cot, head, head_w, blocks, block_w)`` per feature of the table (see
    ``lookup.slot_cotangents``), optionally with the slots' ``Uses`` last: row ``i``'s
    gradient is the sum of ``(w *) cot[r]`` over the slots holding ``i``. With one part (no
    ``Uses``), the CPU kernel sums each row's gradient right before updating the row, with no
    ``[U, D]`` gradient array.

    Example:
        >>> import jax.numpy as jnp, jaxembed as je
        >>> opt = je.optimizers.SGD(learning_rate=1.0)
        >>> table = jnp.zeros((3, 2))
        >>> ids = jnp.array([0, 2])  # the touched rows
        >>> cot = jnp.array([[1.0, 1.0], [2.0, 2.0]])  # dL/d(activation) of two examples
        >>> head = jnp.array([[0, 1], [1, 2]])  # example 0 sums rows ids[0], ids[1]; 2 = none
        >>> blocks = jnp.zeros((2, 0, 8), jnp.int32)  # no tail blocks
        >>> part = (cot, head, None, blocks, None)
        >>> table, _ = je.optimizers.apply_slot_gradients(opt, table, {}, ids, [part], 0)
        >>> table[:, 0].tolist()  # row 2 gets both examples' gradients
        [-1.0, 0.0, -3.0]
    """
    uses = [part[5] if len(part) > 5 else None for part in parts]
    if len(parts) == 1 and optimizer.lazy and uses[0] is None:
        cot, head, head_w, blocks, block_w = parts[0][:5]
        return _kernels.apply_slots(
            optimizer, table, slots, ids, cot, head, head_w, blocks, block_w, step
        )
    if not parts:  # (rows as wide as the table's, see apply_rows)
        grads = jnp.zeros((ids.shape[0], table.shape[1]), table.dtype)
        return apply_rows(optimizer, table, slots, ids, grads, step)
    sums = []
    for part, u in zip(parts, uses, strict=True):
        cot, head, head_w, blocks, block_w = part[:5]
        sums.append(_kernels.slot_grads(cot, head, head_w, blocks, block_w, ids.shape[0], u))
    return apply_rows(optimizer, table, slots, ids, functools.reduce(jnp.add, sums), step)


__all__ = [
    "FTRL",
    "SGD",
    "Adagrad",
    "AdagradMomentum",
    "Adam",
    "Optimizer",
    "OptaxOptimizer",
    "PartialRowWiseAdam",
    "RowWiseAdagrad",
    "RowWiseOptimizer",
    "apply_rows",
    "apply_slot_gradients",
    "from_optax",
]
