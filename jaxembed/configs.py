"""Table and feature configs with TensorFlow's names, defaults and validation.

``TableConfig`` and ``FeatureConfig`` mirror ``tf.tpu.experimental.embedding.TableConfig`` and
``FeatureConfig``: same argument names, order, defaults and error conditions. Unlike TF they are
frozen: nothing (no ``Embedding``, no lookup) ever writes a name or an optimizer into them.

Like TF, configs compare and hash by identity: two features share a table when they hold the same
``TableConfig`` object, and ``{TableConfig: array}`` is how tables are passed around. Tables are
also orderable (by name, then size, then creation order) so that JAX can sort the keys of such a
dict when it flattens it, e.g. under ``jax.jit``.
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

COMBINERS = ("mean", "sum", "sqrtn")

Initializer = Callable[..., jax.Array]
_creation_counter = itertools.count()


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def default_initializer(dim: int) -> Initializer:
    """TF's default table initializer: truncated normal, stddev ``1/sqrt(dim)``, cut at 2 stddev."""
    return jax.nn.initializers.truncated_normal(stddev=1.0 / math.sqrt(dim), lower=-2.0, upper=2.0)


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
        custom = self.initializer is not None  # TF's default never gives NaN or Inf
        if custom and not isinstance(table, jax.core.Tracer) and not jnp.isfinite(table).all():
            raise ValueError(
                f"Table {label}: initializer {init!r} returned NaN or Inf values; initial rows "
                "must be finite."
            )
        return table

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
        return (
            f"TableConfig(vocabulary_size={self.vocabulary_size}, dim={self.dim}, "
            f"initializer={self.initializer!r}, optimizer={self.optimizer!r}, "
            f"combiner={self.combiner!r}, name={self.name!r})"
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
        output_shape: The activation shape without ``dim``; only used for ragged inputs (as in
            TF): ``prod(output_shape) == batch`` reshapes the combined output, ``k * batch``
            gives ``k`` positions per example. Stored as a tuple; ``[]`` counts as set.
        name: Free text, used in messages.
        out_of_range: What an id outside ``[0, vocabulary_size)`` does (jaxembed only; TF's
            CPU lookup raises): ``"error"`` (default) raises naming the feature and the id (on
            the host, or when a jitted lookup of traced dense ids runs); ``"zero"`` reads an
            all-zero row (counted by the combiner like any other id) and trains nothing;
            ``"clamp"`` reads row 0 for negative ids and row ``vocabulary_size - 1`` for ids
            past the end. Ids TF prunes (negative ids of a sparse input with
            ``validate_weights_and_indices``) are pruned first. The exported serving graph
            applies the same policy.

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

    def __repr__(self) -> str:
        policy = "" if self.out_of_range == "error" else f", out_of_range={self.out_of_range!r}"
        return (
            f"FeatureConfig(table={self.table!r}, max_sequence_length={self.max_sequence_length}, "
            f"validate_weights_and_indices={self.validate_weights_and_indices}, "
            f"output_shape={self.output_shape!r}, name={self.name!r}{policy})"
        )
