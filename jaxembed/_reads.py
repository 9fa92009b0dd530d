"""Orders a table's in-place update after this step's lookups of it, whatever the loss.

Inside a jitted step, ``Embedding.lookup`` reads a table and ``Embedding.apply_gradients``
updates the same (donated) buffer in place. XLA may do that only once every read of the table
is done, and it knows a read is done only through data: when the gradients depend on the
activations (any nonlinear model) the update waits for them. When they do not (a fixed linear
head ``sum(acts * g)``, a constant or ``custom_vjp`` gradient), the read and the write are
unordered, so XLA copies the whole table, twice, on every step. (``optimization_barrier`` does
not order them: XLA drops it before it places copies.)

``record`` remembers, for each traced table, the activations a lookup read out of it;
``reads_of`` gives them back to ``apply_gradients``, which adds ``zero_after(reads)`` (an int32
zero computed from one value of each) to the ids it updates. The update then depends on the
reads, at the cost of one scalar op. Entries hold weak references and go with the traced
table, so nothing outlives its trace, and a table of another trace or an eager array has none.

``zero_after`` orders other work the same way: ``apply_gradients`` updates the tables one after
another (each table's slot indices carry a zero read from the previous table's updated rows),
and the pure-JAX gradient sum starts each table's buffer from zeros computed from its own slot
indices, so XLA does not merge them into one array copied into every buffer.

Example:
    >>> import jax, jax.numpy as jnp
    >>> def step(table, ids):
    ...     rows = table[ids]
    ...     record({"t": table}, [rows])
    ...     ids = ids + zero_after(reads_of({"t": table}))
    ...     return table.at[ids].add(1.0), rows
    >>> out, rows = jax.jit(step, donate_argnums=0)(jnp.zeros((4, 2)), jnp.array([1, 1]))
    >>> out[1].tolist(), rows.tolist()
    ([2.0, 2.0], [[0.0, 0.0], [0.0, 0.0]])
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# id(traced table) -> weak references to it and to the activations read out of it so far. Weak
# both ways: a tracer holds its trace, which holds every tracer of the trace, so a strong
# reference here would keep whole traces alive.
_READS: dict[int, tuple[weakref.ref, list[weakref.ref]]] = {}


def record(tables: Mapping[str, Any], outputs: Sequence[jax.Array]) -> None:
    """Remembers that ``outputs`` were read out of each traced table of ``tables``."""
    for table in tables.values():
        if not isinstance(table, jax.core.Tracer):
            continue  # an eager array: its reads have run before any update is dispatched
        key = id(table)
        entry = _READS.get(key)
        if entry is None or entry[0]() is not table:
            entry = (weakref.ref(table, functools.partial(_forget, key)), [])
            _READS[key] = entry
        entry[1].extend(weakref.ref(out) for out in outputs)


def _forget(key: int, ref: weakref.ref) -> None:
    """Drops the entry of a table that no longer exists (not a newer one under the same id)."""
    reads = _READS.get(key) if _READS is not None else None  # None: interpreter shutdown
    if reads is not None and reads[0] is ref:
        del _READS[key]


def _reads_of(table: Any) -> list[jax.Array]:
    """The recorded reads of ``table`` that belong to its trace (none for an eager array)."""
    if not isinstance(table, jax.core.Tracer):
        return []
    trace, entry = table._trace, _READS.get(id(table))
    if entry is None or entry[0]() is not table:
        return []
    reads = [ref() for ref in entry[1]]
    return [r for r in reads if r is not None and getattr(r, "_trace", None) is trace]


def reads_of(tables: Mapping[str, Any]) -> list[jax.Array]:
    """The activations recorded as read out of any of ``tables`` in their trace."""
    reads = {id(r): r for table in tables.values() for r in _reads_of(table)}
    return list(reads.values())


def zero_after(reads: Sequence[jax.Array]) -> jax.Array:
    """An int32 zero that XLA computes only once every array of ``reads`` is computed.

    From each array's first value: its bits' population count (at most 32) shifted right by 6,
    which is 0 for every value, NaN and Inf included, and which XLA does not fold away.
    """
    zero = jnp.zeros((), jnp.int32)
    for read in reads:
        if read.size:
            bits = jax.lax.bitcast_convert_type(read.reshape(-1)[0].astype(jnp.float32), jnp.int32)
            zero = zero + jax.lax.shift_right_logical(jax.lax.population_count(bits), 6)
    return zero


def zeros_after(reads: Sequence[jax.Array], shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Zeros of ``shape`` computed from ``zero_after(reads)``: an array of their own, which XLA
    neither computes before ``reads`` nor merges with other zeros of the step (merged zeros are
    one array that XLA copies into each of its users' buffers, every copy live at once)."""
    return jnp.broadcast_to(zero_after(reads).astype(dtype), shape)
