"""Layouts: where one physical array of tables lives, and how ids, rows and gradients reach it.

Every table of an ``Embedding`` lives in a *physical array* (the table itself, or several
table-wise tables stacked into one group), and every physical array has one ``Layout``. The
layout is the only code that knows its strategy; ``Embedding``, checkpoints and export ask it:

* **where rows live**: ``shard_shape``, ``physical_shape`` and ``spec`` (the ``PartitionSpec`` of
  the array and of its table-shaped optimizer slots);
* **logical order**: ``to_physical`` and ``to_logical`` map ``[vocabulary_size, dim]`` tables to
  the physical array and back (checkpoints and exports always hold logical order);
* **routing a batch** (host, numpy): ``keys`` names every id in the array's key space,
  ``capacity_needed`` and ``requests`` turn a device's distinct keys into the ``[T, K]`` (or
  ``[1, K]``) request array it sends to the array's ``T`` shards, and where each distinct key's
  row will be among the ``fetched_rows(K)`` rows that come back;
* **fetching** (device, inside ``shard_map``): ``rows`` returns this device's requested rows (or
  the local shard itself plus the ids to read it through, when nothing travels);
* **training** (device): ``apply_gradients`` sums each requested row's gradient over the slots
  that used it, takes the sums to the rows' owners, adds up duplicates across devices and
  replicas, and runs the optimizer once per touched row.

On a TPU mesh a device stores its ``[rows, width]`` part of an array ``pack = 128 // width``
rows to a row, as ``[rows / pack, 128]``, the rest of each stored row zero padding (wider rows:
one to a row, padded to a multiple of 128; ``sharding.row_storage``): XLA lays out other widths
column-major on TPU, and a step that reads rows would copy them into row-major order and back
every time, or read each row across its tiles. Rows are read and written in place as
``width``-float windows (``_kernels.gather_rows``'s ``width``); ``shard_shape`` and
``num_rows`` count rows, ``physical_shape`` is the array as stored. There, the optimizer's
table-shaped slots are stored beside the rows where that takes no more memory
(``TablePlacement.beside``, ``sharding.entry_storage``): each row's *entry* holds its floats,
then each such slot's, and a step reads and writes a row and its slots as one entry. The state
then holds those slots in the table's array; ``join`` and ``split`` convert.

Mesh axes split into the array's *shard axes* (``T`` devices, the product of their sizes) and
its *replica axes* (``R`` copies). Every device of a replica group holds one shard; the ``R``
replica groups hold the same values and apply the same updates (their gradient contributions are
all-gathered, so every replica sums the same numbers in the same order). The batch is split
over every device. One device is the trivial case: ``T = R = 1``, no collective, the lookup
reads the table in place through the batch's distinct ids and the CPU kernels fuse the gradient
sum into the optimizer update.

Strategies:

* ``RowLayout`` (``"row"``): row ``r`` on shard ``r mod T`` at local row ``r div T`` (as TPUs
  place rows), so hot small ids spread over all shards. Physical ``[T * ceil(V / T), D]``.
* ``TableLayout`` (``"table"``): whole tables on one shard each, tables of one dim and optimizer
  stacked at row offsets, every shard padded to the busiest shard's rows. Physical ``[T * S, D]``.
* ``ColumnLayout`` (``"column"``): the dim split into ``T`` blocks of ``ceil(D / T)`` columns
  (the last ones zero-padded): every shard holds every row's block. Physical ``[V, T * B]``.
  Elementwise optimizers split with the columns; a row-wise optimizer (``RowWiseAdagrad``,
  ``PartialRowWiseAdam``) ``psum``s its partial statistic over the shard axes before using it
  (``Optimizer.column_blocks``), so all blocks of a row see the whole row's statistic; its
  ``[V]`` row-wise slots are replicated over the shard axes and updated identically.
* ``ReplicatedLayout`` (``"replicated"``): a row layout over no shard axes: the whole table on
  every device; gradients all-gathered, every device applies the same update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxembed import _kernels, _reads
from jaxembed.optimizers import Optimizer, Slots, apply_rows, apply_slot_gradients

Part = tuple[Any, ...]  # slot cotangents: (cot, head, head_w, blocks, block_w)


@dataclasses.dataclass(frozen=True)
class TablePlacement:
    """Where one table lives: plain data, printed by ``ShardingPlan``.

    Attributes:
        name: the table's name.
        strategy: ``"row"``, ``"table"``, ``"column"`` or ``"replicated"``.
        vocabulary_size, dim: the logical table shape.
        num_shards: ``T``, the devices its array is split over (1 if replicated).
        rows_per_shard: rows of its array on one device.
        cols_per_shard: columns of its array on one device (``dim`` unless column-wise).
        physical_rows: rows of its (global) physical array.
        group: the name of its physical array (the table's own name unless stacked).
        shard: the shard holding a table-wise table (None otherwise).
        offset: the table's first row on that shard (table-wise; 0 otherwise).
        pack: rows its array stores side by side in each of its rows (``rows_per_shard`` is a
            multiple of it): ``128 // width`` on TPU for widths below 128, else 1
            (``sharding.row_storage``).
        stored_cols: floats in each stored row of a device's part of the array, ``pack`` rows
            and zero padding (0, the default, means ``pack * cols_per_shard``: no padding).
        beside: the optimizer's table-shaped slots stored beside each row, in this order: a
            row's *entry* is its ``cols_per_shard`` floats, then each of these slots' (``pack``
            entries to a stored row), so that a step reads and writes a row and its slots as one
            (``sharding.entry_storage``; empty: the slots are arrays of their own).
    """

    name: str
    strategy: str
    vocabulary_size: int
    dim: int
    num_shards: int
    rows_per_shard: int
    cols_per_shard: int
    physical_rows: int
    group: str
    shard: int | None = None
    offset: int = 0
    pack: int = 1
    stored_cols: int = 0
    beside: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.stored_cols:
            object.__setattr__(self, "stored_cols", self.pack * self.entry_cols)
        if self.stored_cols < self.pack * self.entry_cols or self.rows_per_shard % self.pack:
            raise ValueError(
                f"Table {self.name!r}: {self.pack} entries of {self.entry_cols} floats do not "
                f"fit a stored row of {self.stored_cols}, or {self.rows_per_shard} rows are not "
                f"a multiple of {self.pack}; place tables with sharding.plan_sharding."
            )

    @property
    def entry_cols(self) -> int:
        """Floats of a row's entry on one device: its columns and those of the slots beside it."""
        return (1 + len(self.beside)) * self.cols_per_shard

    def bytes_per_device(self, slots: int = 0) -> int:
        """float32 bytes one device holds for the table's array and ``slots`` slot arrays
        (those stored beside the rows included), as stored."""
        arrays = 1 + max(slots - len(self.beside), 0)
        return arrays * self.rows_per_shard // self.pack * self.stored_cols * 4


def _replicated(x: jax.Array) -> jax.Array:
    """``x`` on every device of its mesh (explicit-axis meshes need this before a reshape)."""
    sharding = getattr(jax.typeof(x), "sharding", None)  # arrays and tracers alike
    if (
        isinstance(sharding, jax.sharding.NamedSharding)
        and any(axis is not None for axis in sharding.spec)
        and any(t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types)
    ):
        return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, P()))
    return x


@dataclasses.dataclass(frozen=True)
class Layout:
    """One physical array on the mesh: its tables, shard axes and replica axes.

    Attributes:
        name: the array's name (its key in ``EmbeddingState.tables``).
        tables: placements of the tables it holds, in table order.
        shard_axes: mesh axes the array is split over (``T`` devices in their row-major order).
        replica_axes: mesh axes it is copied over (``R`` copies).
        num_shards: ``T``.
        num_replicas: ``R``.
    """

    name: str
    tables: tuple[TablePlacement, ...]
    shard_axes: tuple[str, ...]
    replica_axes: tuple[str, ...]
    num_shards: int
    num_replicas: int

    strategy: ClassVar[str] = ""

    @property
    def dim(self) -> int:
        return self.tables[0].dim

    @property
    def shard_shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the array's rows on one device (as rows, however stored)."""
        return self.tables[0].rows_per_shard, self.tables[0].cols_per_shard

    @property
    def pack(self) -> int:
        """Rows stored side by side in each row of the array (``TablePlacement.pack``): a
        device's ``[rows, columns]`` are stored as ``[rows / pack, stored_cols]``."""
        return self.tables[0].pack

    @property
    def stored_cols(self) -> int:
        """Floats in each stored row of a device's part (``TablePlacement.stored_cols``)."""
        return self.tables[0].stored_cols

    @property
    def beside(self) -> tuple[str, ...]:
        """The optimizer slots stored beside each row (``TablePlacement.beside``)."""
        return self.tables[0].beside

    @property
    def entry_cols(self) -> int:
        """Floats of a row's entry on one device (``TablePlacement.entry_cols``)."""
        return self.tables[0].entry_cols

    @property
    def as_rows(self) -> bool:
        """Whether a device stores its ``[rows, columns]`` as they are (no packing, no
        padding, no slots beside: everywhere but TPU meshes, and there for widths that are
        multiples of 128 without slots beside them)."""
        return self.stored_cols == self.shard_shape[1]

    @property
    def num_rows(self) -> int:
        """Rows of the array in its row order: the length of a row-wise slot."""
        return self.tables[0].physical_rows

    @property
    def physical_shape(self) -> tuple[int, int]:
        """Shape of the global physical array, as stored."""
        raise NotImplementedError

    _blocks: ClassVar[bool] = False  # whether each device holds a column block of every row

    def _pack(self, *parts: jax.Array) -> jax.Array:
        """The stored array from ``[num_rows, columns]`` rows (``[num_rows]``: as is): each
        device's ``[r, c]`` rows as ``[r / pack, stored_cols]``, zero padded. Each row's entry
        holds ``parts[i]``'s row at its ``i``-th place (the table's, then the slots' beside
        it); places without a part hold zeros."""
        rows = parts[0]
        if self.as_rows or rows.ndim == 1:
            return rows
        (v, c), p = rows.shape, self.pack
        t = self.num_shards if self._blocks else 1  # column blocks side by side
        b, e = c // t, self.entry_cols
        entries = jnp.concatenate([x.reshape(v, t, b) for x in parts], axis=2)
        entries = jnp.pad(entries, ((0, 0), (0, 0), (0, e - len(parts) * b)))
        out = entries.reshape(v // p, p, t, e).swapaxes(1, 2).reshape(v // p, t, p * e)
        out = jnp.pad(out, ((0, 0), (0, 0), (0, self.stored_cols - p * e)))
        return out.reshape(self.physical_shape)

    def _unpack(self, stored: jax.Array, place: int = 0) -> jax.Array:
        """``_pack``'s inverse: the rows at ``place`` of each entry (0: the table's)."""
        if self.as_rows or stored.ndim == 1:
            return stored
        p, b, e = self.pack, self.shard_shape[1], self.entry_cols
        t = self.num_shards if self._blocks else 1
        v = stored.shape[0] * p
        rows = stored.reshape(v // p, t, self.stored_cols)[:, :, : p * e]
        rows = rows.reshape(v // p, t, p, e)[..., place * b : (place + 1) * b]
        return rows.swapaxes(1, 2).reshape(v, t * b)

    def join(self, stored: jax.Array, slots: Slots) -> tuple[jax.Array, Slots]:
        """The array as a state holds it, from the table ``stored`` and its slots as
        ``to_physical`` and ``init_slots`` make them: the slots named in ``beside`` move into
        the table's entries (and out of ``slots``). ``split``'s inverse."""
        if not self.beside:
            return stored, slots
        parts = [self._unpack(x) for x in (stored, *(slots[n] for n in self.beside))]
        rest = {k: v for k, v in slots.items() if k not in self.beside}
        return self._pack(*parts), rest

    def split(self, stored: jax.Array, slots: Slots) -> tuple[jax.Array, Slots]:
        """The table and all its slots, each as ``to_physical`` and ``init_slots`` make them
        (``to_logical`` reads them), from the array and slots a state holds (``join``)."""
        if not self.beside:
            return stored, slots
        parts = {n: self._pack(self._unpack(stored, i + 1)) for i, n in enumerate(self.beside)}
        table = self._pack(self._unpack(stored))
        return table, {**slots, **parts}

    def spec(self, shape: tuple[int, ...]) -> P:
        """``PartitionSpec`` of an array leaf of this layout: the table and its table-shaped slots
        are split like the table, row-wise slots (``[physical rows]``) like the table's rows
        (replicated when the columns are split); anything else (e.g. an Optax step count) is
        replicated."""
        dims: list[Any] = [None] * len(shape)
        split = self._split_dim if tuple(shape) == self.physical_shape else None
        if tuple(shape) == (self.num_rows,) and self._split_dim == 0:
            split = 0
        if split is None or not self.shard_axes:
            # Unsplit: P() for 1-D leaves, which is how jit's outputs come back (P(None) would
            # give a second compilation of a step fed its own output).
            return P(*dims) if len(shape) != 1 else P()
        dims[split] = self.shard_axes[0] if len(self.shard_axes) == 1 else self.shard_axes
        return P(*dims)

    def init_slots(self, optimizer: Optimizer, stored: jax.Array) -> Slots:
        """``optimizer``'s fresh slots for the array ``stored``: made for its rows (a row-wise
        slot has one entry per row), table-shaped ones stored as the array is."""
        rows = self._unpack(stored)
        slots = optimizer.init_slots(rows)
        return jax.tree.map(lambda x: self._pack(x) if x.shape == rows.shape else x, slots)

    def row_aligned(self, shape: tuple[int, ...]) -> bool:
        """Whether an array leaf has one entry per physical row: the table's shape, or
        ``[physical rows]`` (a row-wise optimizer slot). Those leaves follow the layout's row
        order (``to_physical`` / ``to_logical``); other leaves are shared."""
        return tuple(shape) in (self.physical_shape, (self.num_rows,))

    _split_dim: ClassVar[int] = 0  # the dimension split over the shard axes

    def table(self, name: str) -> TablePlacement:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    # -- logical order --
    def to_physical(self, logical: Mapping[str, Any]) -> jax.Array:
        """The physical array from its tables' logical ``[V, D]`` arrays (``{name: array}``),
        or from their ``[V]`` row-wise slots (then ``[physical rows]``)."""
        raise NotImplementedError

    def to_logical(self, physical: jax.Array, name: str) -> jax.Array:
        """Table ``name``'s logical ``[V, D]`` rows out of the physical array (``[V]`` out of a
        ``[physical rows]`` row-wise slot)."""
        raise NotImplementedError

    def shard_loads(self, name: str, ids: np.ndarray) -> np.ndarray:
        """``[T]``: how many of table ``name``'s ``ids`` each shard serves (host, numpy)."""
        keys = self.keys(name, ids)
        return np.full(self.num_shards, keys.shape[0], np.int64)

    # -- host: routing a device's ids --
    def keys(self, name: str, ids: np.ndarray) -> np.ndarray:
        """The array's keys (int64) of table ``name``'s ``ids``; distinct keys are distinct rows."""
        return np.asarray(ids, np.int64)

    def capacity_needed(self, keys: np.ndarray) -> int:
        """Request slots ``K`` one device needs for its distinct ``keys``."""
        raise NotImplementedError

    def requests(self, keys: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        """``(requests, where)`` for a device's sorted distinct ``keys``: the int32 request array
        it sends (padding: ``shard_shape[0]``, which reads a zero row) and, per key, its row among
        the ``fetched_rows(capacity)`` rows that ``rows`` returns."""
        raise NotImplementedError

    def fetched_rows(self, capacity: int) -> int:
        raise NotImplementedError

    # -- device (inside shard_map; per-device arrays) --
    def _all_to_all(self, x: jax.Array) -> jax.Array:
        if self.num_shards == 1:
            return x
        return jax.lax.all_to_all(x, self.shard_axes, 0, 0, tiled=True)

    def rows(self, shard: jax.Array, requests: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """``(rows, ids)``: the rows a device asked for are ``rows[ids]`` (``ids`` None: ``rows``
        themselves, fetched from their owners). With one shard nothing travels and the lookup
        reads the local shard in place through the requested local rows."""
        if self.num_shards == 1 and self.as_rows:
            return shard, requests.reshape(-1)
        if self.num_shards == 1:  # rows stored side by side: read as windows, once each
            return self._read(shard, requests.reshape(-1)), None
        return self._fetch(shard, requests), None

    def _read(self, shard: jax.Array, ids: jax.Array) -> jax.Array:
        """Rows ``ids`` of a device's part (``[..., columns]``; ids past it read zeros): the
        first floats of their entries. (Whole entries are read: a TPU gathers whole stored
        rows natively, and turns a gather of part of each row into a loop over the ids.)"""
        rows = _kernels.gather_rows(shard, ids, self.entry_cols)
        return rows[..., : self.shard_shape[1]] if self.beside else rows

    def _widened(self, x: jax.Array) -> jax.Array:
        """Gradient rows (``[..., columns]``) as wide as the entries, zeros for the slots
        beside the rows (``_kernels.Beside``)."""
        extra = self.entry_cols - x.shape[-1]
        return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, extra),)) if extra else x

    def _fetch(self, shard: jax.Array, requests: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _to_owners(self, requests: jax.Array, grads: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(local rows, gradients)`` each owner receives for its shard."""
        raise NotImplementedError

    def apply_gradients(
        self,
        optimizer: Optimizer,
        shard: jax.Array,
        slots: Slots,
        step: jax.Array,
        requests: jax.Array,
        parts: list[tuple[Part, ...]],
    ) -> tuple[jax.Array, Slots]:
        """The optimizer applied to the shard's touched rows.

        ``parts``: the ``lookup.slot_cotangents`` parts of each feature of the array, pointing
        into the ``fetched_rows`` rows. A row's gradient is the sum over every slot of every
        device and replica that used it.
        """
        flat = [part for feature in parts for part in feature]
        optimizer = _kernels.beside(optimizer, self.beside, self.shard_shape[1])
        if self.num_shards * self.num_replicas == 1:
            # One contributor: the sum fused into the update when there is one part (a feature
            # with overflow blocks has two, which take the unfused path).
            flat = [(self._widened(cot), *rest) for cot, *rest in flat]
            return apply_slot_gradients(optimizer, shard, slots, requests.reshape(-1), flat, step)
        fetched = self.fetched_rows(requests.shape[-1])
        grads = jnp.zeros((fetched, self.dim), shard.dtype)
        for cot, head, head_w, blocks, block_w, uses in flat:  # (no part: zero gradients)
            grads = grads + _kernels.slot_grads(
                cot, head, head_w, blocks, block_w, fetched, uses=uses
            )
        ids, grads = self._to_owners(requests, grads)
        if self.num_replicas > 1:
            ids = jax.lax.all_gather(ids, self.replica_axes, tiled=True)
            grads = jax.lax.all_gather(grads, self.replica_axes, tiled=True)
        distinct, inverse = jnp.unique(
            ids, size=ids.shape[0], fill_value=self.shard_shape[0], return_inverse=True
        )
        # segment_sum, from zeros of this table's own (see jaxembed._reads.zeros_after)
        zeros = _reads.zeros_after([inverse], grads.shape, grads.dtype)
        summed = zeros.at[inverse.reshape(-1)].add(grads, mode="drop")
        return apply_rows(optimizer, shard, slots, distinct, self._widened(summed), step)


class _Owned(Layout):
    """Layouts where each row has one owning shard: ids go to their owner, rows come back."""

    def _locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Owning shard and local row of each key."""
        raise NotImplementedError

    def shard_loads(self, name: str, ids: np.ndarray) -> np.ndarray:
        owner, _ = self._locate(self.keys(name, ids))
        return np.bincount(owner, minlength=self.num_shards)

    @property
    def physical_shape(self) -> tuple[int, int]:
        return self.num_shards * self.shard_shape[0] // self.pack, self.stored_cols

    def capacity_needed(self, keys: np.ndarray) -> int:
        owner, _ = self._locate(keys)
        return int(np.bincount(owner, minlength=self.num_shards).max(initial=0))

    def requests(self, keys: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        owner, row = self._locate(keys)
        req = np.full((self.num_shards, capacity), self.shard_shape[0], np.int32)
        # Grouped by owner, then by row: the keys are sorted, and rows ascend with the keys
        # within an owner, so a stable sort by owner is enough (a radix sort on int16).
        narrow = np.int16 if self.num_shards <= np.iinfo(np.int16).max else np.int64
        order = np.argsort(owner.astype(narrow), kind="stable")
        grouped = owner[order]
        counts = np.bincount(grouped, minlength=self.num_shards)
        slot = np.arange(keys.shape[0]) - (np.cumsum(counts) - counts)[grouped]
        req[grouped, slot] = row[order]
        where = np.empty(keys.shape[0], np.int64)
        where[order] = grouped * capacity + slot
        return req, where

    def fetched_rows(self, capacity: int) -> int:
        return self.num_shards * capacity

    def _fetch(self, shard: jax.Array, requests: jax.Array) -> jax.Array:
        asked = self._all_to_all(requests)  # [T (requester), K] local rows
        rows = self._read(shard, asked)  # padding reads a zero row
        return self._all_to_all(rows).reshape(-1, self.dim)  # [T (owner) * K, D]

    def _to_owners(self, requests: jax.Array, grads: jax.Array) -> tuple[jax.Array, jax.Array]:
        ids = self._all_to_all(requests).reshape(-1)
        grads = self._all_to_all(grads.reshape(*requests.shape, -1))
        return ids, grads.reshape(ids.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class RowLayout(_Owned):
    """Row-wise: row ``r`` on shard ``r mod T`` at local row ``r div T``."""

    strategy: ClassVar[str] = "row"

    def _locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.divmod(keys, self.num_shards)[::-1]

    def to_physical(self, logical: Mapping[str, Any]) -> jax.Array:
        table = jnp.asarray(logical[self.name])
        n, s = self.num_shards, self.shard_shape[0]
        rest = table.shape[1:]  # (D,) for tables, () for row-wise slots
        if table.shape[0] != n * s:
            table = jnp.pad(table, ((0, n * s - table.shape[0]),) + ((0, 0),) * len(rest))
        if n > 1:
            table = table.reshape(s, n, *rest).swapaxes(0, 1).reshape(n * s, *rest)
        return self._pack(table)

    def to_logical(self, physical: jax.Array, name: str) -> jax.Array:
        n, s = self.num_shards, self.shard_shape[0]
        vocab = self.tables[0].vocabulary_size
        if n == 1 and self.as_rows and s == vocab:
            return physical
        rows = self._unpack(_replicated(physical))
        rest = rows.shape[1:]
        if n > 1:
            rows = rows.reshape(n, s, *rest).swapaxes(0, 1).reshape(n * s, *rest)
        return rows[:vocab]


@dataclasses.dataclass(frozen=True)
class ReplicatedLayout(RowLayout):
    """The whole table on every device: a row layout over no shard axes (``T = 1``)."""

    strategy: ClassVar[str] = "replicated"


@dataclasses.dataclass(frozen=True)
class TableLayout(_Owned):
    """Table-wise: each table on one shard, stacked with others of its dim and optimizer."""

    strategy: ClassVar[str] = "table"

    def _start(self, name: str) -> int:
        t = self.table(name)
        assert t.shard is not None
        return t.shard * t.rows_per_shard + t.offset

    def keys(self, name: str, ids: np.ndarray) -> np.ndarray:
        return np.asarray(ids, np.int64) + self._start(name)

    def _locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.divmod(keys, self.shard_shape[0])

    def to_physical(self, logical: Mapping[str, Any]) -> jax.Array:
        first = jnp.asarray(logical[self.tables[0].name])
        rows = jnp.zeros((self.num_rows, *first.shape[1:]), first.dtype)
        for t in self.tables:
            start = self._start(t.name)
            rows = rows.at[start : start + t.vocabulary_size].set(logical[t.name])
        return self._pack(rows)

    def to_logical(self, physical: jax.Array, name: str) -> jax.Array:
        start = self._start(name)
        rows = self._unpack(_replicated(physical))
        return rows[start : start + self.table(name).vocabulary_size]


@dataclasses.dataclass(frozen=True)
class ColumnLayout(Layout):
    """Column-wise: every shard holds a block of ``ceil(D / T)`` columns of every row.

    A device sends its distinct ids to every shard (one ``all_gather``), each shard returns its
    column block of those rows (one ``all_to_all``), and the blocks are put side by side. The
    gradients travel back the same way, split into blocks.
    """

    strategy: ClassVar[str] = "column"

    @property
    def physical_shape(self) -> tuple[int, int]:
        return self.shard_shape[0] // self.pack, self.num_shards * self.stored_cols

    _split_dim: ClassVar[int] = 1
    _blocks: ClassVar[bool] = True

    def capacity_needed(self, keys: np.ndarray) -> int:
        return int(keys.shape[0])

    def requests(self, keys: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        req = np.full((1, capacity), self.shard_shape[0], np.int32)
        req[0, : keys.shape[0]] = keys
        return req, np.arange(keys.shape[0], dtype=np.int64)

    def fetched_rows(self, capacity: int) -> int:
        return capacity

    def to_physical(self, logical: Mapping[str, Any]) -> jax.Array:
        table = jnp.asarray(logical[self.name])
        rows, block = self.shard_shape
        pad = ((0, rows - table.shape[0]),)
        if table.ndim == 1:  # a row-wise slot: every row's value on every shard
            return jnp.pad(table, pad) if rows != table.shape[0] else table
        return self._pack(jnp.pad(table, (*pad, (0, self.num_shards * block - self.dim))))

    def to_logical(self, physical: jax.Array, name: str) -> jax.Array:
        vocab = self.tables[0].vocabulary_size
        if physical.ndim == 1:
            return physical[:vocab]
        if self.physical_shape == (vocab, self.dim):
            return physical
        return self._unpack(_replicated(physical))[:vocab, : self.dim]

    def apply_gradients(
        self,
        optimizer: Optimizer,
        shard: jax.Array,
        slots: Slots,
        step: jax.Array,
        requests: jax.Array,
        parts: list[tuple[Part, ...]],
    ) -> tuple[jax.Array, Slots]:
        """As ``Layout.apply_gradients``, with a row-wise optimizer's statistic summed over the
        column blocks: every shard receives the same distinct rows in the same order, so the
        partial sums line up and all blocks of a row (and the replicated row-wise slots) see
        the whole row's statistic."""
        if self.num_shards > 1:
            optimizer = optimizer.column_blocks(self.shard_axes, self.dim)
        return super().apply_gradients(optimizer, shard, slots, step, requests, parts)

    def _gather_ids(self, requests: jax.Array) -> jax.Array:
        return jax.lax.all_gather(requests.reshape(-1), self.shard_axes, tiled=True)

    def _fetch(self, shard: jax.Array, requests: jax.Array) -> jax.Array:
        capacity, block = requests.shape[-1], self.shard_shape[1]
        asked = self._gather_ids(requests).reshape(self.num_shards, capacity)
        rows = self._read(shard, asked)
        blocks = self._all_to_all(rows)  # [T (block), K, B]
        rows = blocks.transpose(1, 0, 2).reshape(capacity, self.num_shards * block)
        return rows[:, : self.dim]

    def _to_owners(self, requests: jax.Array, grads: jax.Array) -> tuple[jax.Array, jax.Array]:
        block = self.shard_shape[1]
        padded = jnp.pad(grads, ((0, 0), (0, self.num_shards * block - self.dim)))
        split = padded.reshape(grads.shape[0], self.num_shards, block).transpose(1, 0, 2)
        ids = self._gather_ids(requests) if self.num_shards > 1 else requests.reshape(-1)
        return ids, self._all_to_all(split).reshape(-1, block)


LAYOUTS: dict[str, type[Layout]] = {
    cls.strategy: cls for cls in (RowLayout, TableLayout, ColumnLayout, ReplicatedLayout)
}
STRATEGIES = tuple(LAYOUTS)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
