"""Table and feature configs with TensorFlow's names, defaults and validation.

``TableConfig``, ``FeatureConfig`` and ``QuantizationConfig`` mirror their
``tf.tpu.experimental.embedding`` twins: same argument names, order, defaults and error
conditions. Unlike TF they are frozen: nothing (no ``Embedding``, no lookup) ever writes a name
or an optimizer into them.

Like TF, configs compare and hash by identity: two features share a table when they hold the same
``TableConfig`` object, and ``{TableConfig: array}`` is how tables are passed around. Tables are
also orderable (by name, then size, then creation order) so that JAX can sort the keys of such a
dict when it flattens it, e.g. under ``jax.jit``. ``QuantizationConfig`` is plain data: equal
(and equally hashed) when its three values are.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed.vocabulary import Hashing, Vocabulary

COMBINERS = ("mean", "sum", "sqrtn")

Initializer = Callable[..., jax.Array]
_creation_counter = itertools.count()


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def default_initializer(dim: int) -> Initializer:
    """TF's default table initializer: truncated normal, stddev ``1/sqrt(dim)``, cut at 2 stddev."""
    return jax.nn.initializers.truncated_normal(stddev=1.0 / math.sqrt(dim), lower=-2.0, upper=2.0)


_INT32_MAX = 2**31 - 1  # the TPU proto's SimulatedQuantization.num_buckets is an int32


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """Simulated quantization of a table's looked-up rows: TF's ``QuantizationConfig``.

    In the forward pass every looked-up row is clipped to ``[lower, upper]`` and rounded to one of
    ``num_buckets`` evenly spaced levels *before* the combiner, as the TPU embedding engine does
    (``optimization_parameters.proto``, ``SimulatedQuantization``), in float32::

        x = clip(x, lower, upper)
        quantum = (upper - lower) / (num_buckets - 1)
        x = floor((x - lower) / quantum + 0.5) * quantum + lower

    ``floor(v + 0.5)`` is the documented rounding (halves round up, towards ``+inf``); ``lower``
    and ``upper`` are taken as float32 (the proto's ``FloatValue``), ``quantum`` is computed in
    float32, the division is a true division and the product is rounded before ``lower`` is
    added (no FMA). The backward pass is unchanged (straight-through: the gradient of a row is
    that of its quantized value, also where the row was clipped). The stored table stays
    float32 and unquantized: checkpoints and ``embedding_tables`` hold the raw rows.

    Validation: TF's only check, ``num_buckets < 2``, raises TF's ``ValueError`` with TF's
    message. jaxembed also rejects at construction what TF accepts here but fails on later (a
    non-int ``num_buckets`` such as ``2.0`` or NaN, more than ``2**31 - 1`` buckets, non-number
    limits: the errors TF raises when it writes the TPU config) and what TF accepts but cannot
    quantize with (NaN or infinite limits, ``lower >= upper`` as float32, a float32 ``quantum``
    that is infinite, zero or denormal; bools as limits). The limits are stored as Python floats
    (TF keeps ints as given, so ``repr`` shows ``-1.0`` where TF's shows ``-1``).

    Unlike TF (identity), two configs with the same values are equal and hash alike.

    Args:
        num_buckets: Number of quantization levels, an int >= 2 (at most ``2**31 - 1``).
        lower: Lower clipping limit (the lowest level), a finite number.
        upper: Upper clipping limit (the highest level), a finite number > ``lower``.

    Raises:
        ValueError: ``num_buckets`` below 2 (TF's message) or above ``2**31 - 1``; NaN or
            infinite limits; ``lower >= upper``; a step that is not a normal finite float32.
        TypeError: ``num_buckets`` not an int; limits not real numbers.

    Example:
        >>> import jaxembed as je
        >>> je.QuantizationConfig(num_buckets=5, lower=-1.0, upper=1.0)
        QuantizationConfig(num_buckets=5, lower=-1.0, upper=1.0)
        >>> table = je.TableConfig(100, 8, quantization_config=je.QuantizationConfig(256, -1, 1))
    """

    num_buckets: int
    lower: float
    upper: float

    def __post_init__(self) -> None:
        n = self.num_buckets
        if isinstance(n, numbers.Real) and n < 2:  # TF's check and message (bools included)
            raise ValueError(f"num_buckets is {n}, must be at least 2 for simulated quantization.")
        if not _is_int(n):
            raise TypeError(
                f"`num_buckets` must be an int >= 2, got {n!r} (type {type(n).__name__}); TF "
                "accepts it here but fails writing the TPU config (an int32 field). Pass e.g. "
                "num_buckets=256."
            )
        if n > _INT32_MAX:
            raise ValueError(
                f"`num_buckets` must be at most 2**31 - 1 (the TPU config's int32), got {n}."
            )
        object.__setattr__(self, "num_buckets", int(n))
        for arg in ("lower", "upper"):
            value = getattr(self, arg)
            if not _is_real(value):
                raise TypeError(
                    f"`{arg}` must be a real number (a float), got {value!r} (type "
                    f"{type(value).__name__})."
                )
            with np.errstate(over="ignore"):  # 1e39 is inf as a float32: rejected below
                as_float32 = np.float32(value)
            if not math.isfinite(float(value)) or not np.isfinite(as_float32):
                raise ValueError(
                    f"`{arg}` must be finite as a float32 (the TPU config stores it as one), got "
                    f"{value!r}; NaN or infinite limits make every quantized value NaN or inf."
                )
            object.__setattr__(self, arg, float(value))
        lower, upper, quantum = self.float32_parameters()
        if not lower < upper:
            raise ValueError(
                f"`lower` must be less than `upper` (as float32), got lower={self.lower!r}, "
                f"upper={self.upper!r}; with lower >= upper there is no range to quantize. "
                "Swap them or widen the range."
            )
        if not np.finfo(np.float32).tiny <= quantum < np.inf:  # no denormal step either
            raise ValueError(
                f"The quantization step (upper - lower) / (num_buckets - 1) = {quantum} in "
                f"float32 must be a positive, finite, normal float32, got lower={self.lower!r}, "
                f"upper={self.upper!r}, num_buckets={self.num_buckets}. Use a narrower range "
                "if it is infinite, a wider range or fewer buckets if it is (near) zero."
            )

    def float32_parameters(self) -> tuple[np.float32, np.float32, np.float32]:
        """``(lower, upper, quantum)`` as the float32 values the quantization uses:
        ``quantum = (upper - lower) / (num_buckets - 1)``, each operation in float32."""
        lower, upper = np.float32(self.lower), np.float32(self.upper)
        with np.errstate(over="ignore"):  # an infinite range is rejected by the caller
            quantum = np.float32(upper - lower) / np.float32(self.num_buckets - 1)
        return lower, upper, np.float32(quantum)

    def quantize(self, values: Any) -> np.ndarray:
        """``values`` quantized (float32, numpy): what the lookup applies to each looked-up row.

        TF's docstring asks users to quantize the stored variable by hand for serving; this is
        that function, bit for bit the lookup's.
        """
        lower, upper, quantum = self.float32_parameters()
        x = np.asarray(values, np.float32)
        clipped = np.where(x < lower, lower, np.where(x > upper, upper, x))
        level = np.floor((clipped - lower) / quantum + np.float32(0.5))
        return (level * quantum + lower).astype(np.float32)

    def __repr__(self) -> str:
        return (
            f"QuantizationConfig(num_buckets={self.num_buckets!r}, lower={self.lower!r}, "
            f"upper={self.upper!r})"
        )


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class TableConfig:
    """One embedding table: ``vocabulary_size`` rows of ``dim`` floats.

    Args:
        vocabulary_size: Number of rows, a Python int >= 1.
        dim: Width of each row, a Python int >= 1.
        initializer: ``jax.nn.initializers``-style ``init(key, shape, dtype)``; None means TF's
            default, a truncated normal with stddev ``1/sqrt(dim)`` cut at 2 stddev.
        optimizer: This table's own optimizer (overrides the ``Embedding``'s global one), or None.
        combiner: How ids of one example are reduced: ``"mean"`` (default), ``"sum"`` or
            ``"sqrtn"``.
        name: Unique table name, used as the checkpoint and export key. None lets ``Embedding``
            name it ``table_{i}`` by first appearance (without writing it here).
        quantization_config: A ``QuantizationConfig``: looked-up rows are clipped and quantized
            before the combiner (training and serving lookups; the stored table is not), with a
            straight-through gradient. None (default): no quantization.

    Raises:
        ValueError: For any argument TF would reject, naming the argument and the value.

    Example:
        >>> import jaxembed as je
        >>> table = je.TableConfig(vocabulary_size=1000, dim=8, combiner="sum", name="items")
        >>> table
        TableConfig(vocabulary_size=1000, dim=8, initializer=None, optimizer=None, combiner='sum', name='items')
    """  # noqa: E501

    vocabulary_size: int
    dim: int
    initializer: Initializer | None = None
    optimizer: Any = None
    combiner: str = "mean"
    name: str | None = None
    quantization_config: QuantizationConfig | None = None
    _order: int = dataclasses.field(default_factory=lambda: next(_creation_counter), init=False)

    def __post_init__(self) -> None:
        for arg in ("vocabulary_size", "dim"):
            value = getattr(self, arg)
            if not _is_int(value) or value < 1:
                raise ValueError(
                    f"`{arg}` must be an int and must be >= 1, got {value!r} "
                    f"(type {type(value).__name__}). Pass a positive Python int, e.g. {arg}=8."
                )
            object.__setattr__(self, arg, int(value))
        if self.initializer is not None and not callable(self.initializer):
            raise ValueError(
                f"`initializer` must be callable as initializer(key, shape, dtype), got "
                f"{self.initializer!r}. Use e.g. jax.nn.initializers.normal(0.01), or None for "
                "TF's default truncated normal."
            )
        if not isinstance(self.combiner, str) or self.combiner not in COMBINERS:
            raise ValueError(
                f"String argument `combiner` must be in {list(COMBINERS)}, got "
                f"{self.combiner!r}. (TF's CustomCombiner is SparseCore-only and not supported.)"
            )
        if self.name is not None and not isinstance(self.name, str):
            raise ValueError(f"`name` must be a str or None, got {self.name!r}.")
        quantization = self.quantization_config
        if quantization is not None and not isinstance(quantization, QuantizationConfig):
            raise ValueError(
                f"`quantization_config` must be a jaxembed.QuantizationConfig or None, got "
                f"{quantization!r} (type {type(quantization).__name__}); build one with "
                "je.QuantizationConfig(num_buckets, lower, upper) (a TF QuantizationConfig has "
                "the same arguments)."
            )

    @property
    def initializer_fn(self) -> Initializer:
        """The initializer to use: the one given, or TF's default for this ``dim``."""
        return self.initializer if self.initializer is not None else default_initializer(self.dim)

    def init_table(
        self, key: jax.Array, dtype: Any = jnp.float32, *, name: str | None = None
    ) -> jax.Array:
        """A freshly initialised ``[vocabulary_size, dim]`` table.

        Args:
            key: The PRNG key given to the initializer.
            dtype: The dtype asked of the initializer.
            name: The table's name in error messages (default: ``self.name``).

        Raises:
            ValueError: If the initializer returns another shape, a non-float dtype or (for
                concrete values, i.e. outside ``jit``) NaN or Inf, naming the table.
            TypeError: If the initializer cannot be called as ``initializer(key, shape,
                dtype)`` or does not return an array.
        """
        label = repr(name or self.name or "(unnamed)")
        expected = (self.vocabulary_size, self.dim)
        init = self.initializer_fn
        try:
            table = init(key, expected, dtype)
        except TypeError as err:
            raise TypeError(
                f"Table {label}: initializer {init!r} failed when called as initializer(key, "
                f"shape={expected}, dtype={jnp.dtype(dtype).name}) ({err}); jaxembed "
                "initializers follow jax.nn.initializers, e.g. jax.nn.initializers.normal(0.01)."
            ) from err
        if not hasattr(table, "shape") or not hasattr(table, "dtype"):
            raise TypeError(
                f"Table {label}: initializer {init!r} returned {type(table).__name__}, expected "
                f"an array of shape [vocabulary_size, dim] = {list(expected)}."
            )
        if tuple(table.shape) != expected:
            raise ValueError(
                f"Table {label}: initializer {init!r} returned shape {list(table.shape)}, "
                f"expected [vocabulary_size, dim] = {list(expected)}; it must use the shape "
                "it is given."
            )
        if not jnp.issubdtype(table.dtype, jnp.floating):
            raise ValueError(
                f"Table {label}: initializer {init!r} returned dtype {table.dtype}, expected a "
                f"float array (it was asked for {jnp.dtype(dtype).name})."
            )
        if not isinstance(table, jax.core.Tracer):
            self.check_initial_values(table, name=name)
        return table

    def check_initial_values(self, table: jax.Array, *, name: str | None = None) -> None:
        """Raises ValueError naming the table if a custom initializer gave NaN or Inf values
        (TF's default initializer never does, so its tables are not read).

        ``init_table`` checks its concrete results; ``Embedding.init`` checks the tables it
        builds split over the devices.

        Example:
            >>> import numpy as np, jaxembed as je
            >>> table = je.TableConfig(2, 2, lambda key, shape, dtype: np.ones(shape), name="t")
            >>> table.check_initial_values(np.ones((2, 2)))
            >>> table.check_initial_values(np.full((2, 2), np.nan))
            Traceback (most recent call last):
            ...
            ValueError: Table 't': initializer ... returned NaN or Inf values; initial rows must be finite.
        """  # noqa: E501
        if self.initializer is not None and not bool(jnp.isfinite(table).all()):
            raise ValueError(
                f"Table {name or self.name or '(unnamed)'!r}: initializer "
                f"{self.initializer_fn!r} returned NaN or Inf values; initial rows must be finite."
            )

    def _sort_key(self) -> tuple:
        return (self.name or "", self.vocabulary_size, self.dim, self._order)

    def __lt__(self, other: TableConfig) -> bool:
        if not isinstance(other, TableConfig):
            return NotImplemented
        return self._sort_key() < other._sort_key()

    def __gt__(self, other: TableConfig) -> bool:
        if not isinstance(other, TableConfig):
            return NotImplemented
        return self._sort_key() > other._sort_key()

    def __repr__(self) -> str:
        # TF always prints quantization_config; it is left out when None, as before it existed.
        quantization = self.quantization_config
        tail = "" if quantization is None else f", quantization_config={quantization!r}"
        return (
            f"TableConfig(vocabulary_size={self.vocabulary_size}, dim={self.dim}, "
            f"initializer={self.initializer!r}, optimizer={self.optimizer!r}, "
            f"combiner={self.combiner!r}, name={self.name!r}{tail})"
        )


def _output_shape(value: Any) -> tuple[int | None, ...] | None:
    if value is None:
        return None
    dims = (value,) if _is_int(value) else value
    if not isinstance(dims, Sequence) or isinstance(dims, str):
        raise ValueError(
            f"`output_shape` must be None, an int or a sequence of ints, got {value!r}."
        )
    out = []
    for d in dims:
        if d is not None and (not _is_int(d) or d < 0):
            raise ValueError(
                f"`output_shape` entries must be ints >= 0 (or None), got {d!r} in {value!r}."
            )
        out.append(None if d is None else int(d))
    return tuple(out)


OUT_OF_RANGE = ("error", "zero", "clamp")
"""``FeatureConfig.out_of_range`` policies: raise on the host, drop the id, clamp into range."""


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class FeatureConfig:
    """One input feature, looked up in ``table``.

    Args:
        table: The ``TableConfig`` this feature reads. Features sharing a table object share rows.
        max_sequence_length: 0 for a combined feature (one vector per example). L > 0 makes it a
            sequence feature: no combiner, output ``[batch, L, dim]``, longer sequences truncated
            and shorter ones zero-padded (sparse and ragged inputs only).
        validate_weights_and_indices: For sparse inputs: True prunes negative ids (and weights
            <= 0 unless the combiner is sum), like ``tf.nn.safe_embedding_lookup_sparse``; False
            uses every entry as given and raises on negative ids.
        output_shape: The activation shape without ``dim``; in ``je.embedding_lookup`` only used
            for ragged inputs (as in TF's serving lookup; ``Embedding`` also applies it to dense
            ids, as TF's ``TPUEmbedding`` does): ``prod(output_shape) == batch`` reshapes the
            combined output, ``k * batch`` gives ``k`` positions per example. Stored as a
            tuple; ``[]`` counts as set.
        name: Free text, used in messages.
        out_of_range: What an id outside ``[0, vocabulary_size)`` does (jaxembed only; TF's
            CPU lookup raises): ``"error"`` (default) raises naming the feature and the id (on
            the host, or when a jitted lookup of traced dense ids runs); ``"zero"`` reads an
            all-zero row (counted by the combiner like any other id) and trains nothing;
            ``"clamp"`` reads row 0 for negative ids and row ``vocabulary_size - 1`` for ids
            past the end. Ids TF prunes (negative ids of a sparse input with
            ``validate_weights_and_indices``) are pruned first. The exported serving graph
            applies the same policy.
        vocabulary: ``None`` (ids are row numbers), or a ``je.Hashing`` / ``je.Vocabulary``:
            the feature then takes raw ids (str/bytes, or int64 of any value) and maps them to
            rows exactly as TF's ``to_hash_bucket_fast`` / ``StaticVocabularyTable`` do, in
            ``preprocess`` and inside the exported SavedModel. The table must have
            ``vocabulary.num_rows`` rows (jaxembed only).

    Raises:
        ValueError: For any argument TF would reject, naming the argument and the value.

    Example:
        >>> import jaxembed as je
        >>> table = je.TableConfig(vocabulary_size=100, dim=4, name="items")
        >>> je.FeatureConfig(table, max_sequence_length=5, name="history").max_sequence_length
        5
    """

    table: TableConfig
    max_sequence_length: int = 0
    validate_weights_and_indices: bool = True
    output_shape: tuple[int | None, ...] | None = None
    name: str | None = None
    out_of_range: str = "error"
    vocabulary: Hashing | Vocabulary | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.table, TableConfig):
            raise ValueError(
                f"Argument `table` has invalid type {type(self.table).__name__}; expected a "
                "jaxembed.TableConfig (a TF TableConfig must be converted, e.g. rebuilt with the "
                "same vocabulary_size, dim and combiner)."
            )
        if not _is_int(self.max_sequence_length) or self.max_sequence_length < 0:
            raise ValueError(
                "Argument `max_sequence_length` must be an int and must be >= 0, got "
                f"{self.max_sequence_length!r}."
            )
        object.__setattr__(self, "max_sequence_length", int(self.max_sequence_length))
        if not isinstance(self.validate_weights_and_indices, bool):
            raise ValueError(
                "Argument `validate_weights_and_indices` must be a bool (True or False), got "
                f"{self.validate_weights_and_indices!r}."
            )
        object.__setattr__(self, "output_shape", _output_shape(self.output_shape))
        if self.name is not None and not isinstance(self.name, str):
            raise ValueError(f"`name` must be a str or None, got {self.name!r}.")
        if self.out_of_range not in OUT_OF_RANGE:
            raise ValueError(
                f"Argument `out_of_range` must be one of {list(OUT_OF_RANGE)}, got "
                f"{self.out_of_range!r}."
            )
        _check_vocabulary(self)

    def __repr__(self) -> str:
        policy = "" if self.out_of_range == "error" else f", out_of_range={self.out_of_range!r}"
        if self.vocabulary is not None:
            policy += f", vocabulary={self.vocabulary!r}"
        return (
            f"FeatureConfig(table={self.table!r}, max_sequence_length={self.max_sequence_length}, "
            f"validate_weights_and_indices={self.validate_weights_and_indices}, "
            f"output_shape={self.output_shape!r}, name={self.name!r}{policy})"
        )


def _check_vocabulary(feature: FeatureConfig) -> None:
    """A feature's vocabulary must be a ``Hashing``/``Vocabulary`` filling its table exactly."""
    vocabulary = feature.vocabulary
    if vocabulary is None:
        return
    what = f"feature {feature.name!r}" if feature.name else "a FeatureConfig"
    if not isinstance(vocabulary, (Hashing, Vocabulary)):
        raise ValueError(
            f"Argument `vocabulary` of {what} must be None, je.Hashing(num_bins) or "
            f"je.Vocabulary(keys), got {type(vocabulary).__name__}."
        )
    table = feature.table
    if vocabulary.num_rows != table.vocabulary_size:
        size = (
            f"num_bins={vocabulary.num_rows}"
            if isinstance(vocabulary, Hashing)
            else f"{len(vocabulary.keys)} keys + {vocabulary.num_oov_buckets} OOV buckets = "
            f"{vocabulary.num_rows}"
        )
        raise ValueError(
            f"The vocabulary of {what} maps ids to {vocabulary.num_rows} rows ({size}), but its "
            f"table {table.name or '(unnamed)'!r} has vocabulary_size={table.vocabulary_size}. "
            f"Make them equal: TableConfig(vocabulary_size={vocabulary.num_rows}, ...)."
        )
