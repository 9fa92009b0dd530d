"""Sharding plan: which layout each table gets on a ``jax.sharding.Mesh``, as plain data.

``plan_sharding`` picks a strategy per table and builds one ``Layout`` (``layouts.py``) per
physical array. Any mesh works: the batch is split over all of its devices (in the mesh's device
order), tables are split over ``table_axes`` (default: all axes) and replicated over the other
axes. One device is the trivial mesh: every layout then has one shard and one replica.

Default strategy: ``"replicated"`` for tables up to 256 KiB or with fewer rows than shards,
``"row"`` otherwise; ``sharding={name: strategy}`` overrides it (``"row"``, ``"table"``,
``"column"``, ``"replicated"``).

Choosing ``table_axes``: tables over all axes (the default) spread the rows over every device:
the most memory for tables, but every lookup's ``all_to_all`` spans the whole mesh. Tables over
the model axis only (``table_axes=("model",)``) keep the ``all_to_all`` inside each row of the
mesh (e.g. one host, or one ICI ring) and replicate the tables over ``"data"``: each table copy
takes ``1/model`` of the memory of one device per copy, and the gradients are all-gathered over
``"data"`` (every replica applies the same update). Pick the smallest set of axes whose devices
hold the tables and their slots.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxembed.configs import TableConfig
from jaxembed.layouts import (
    LAYOUTS,
    STRATEGIES,
    Layout,
    TableLayout,
    TablePlacement,
    ceil_div,
)

REPLICATE_MAX_BYTES = 256 * 1024
LANES = 128  # floats in a row of a TPU tile (8 x 128)
PACK_ROWS_ENV = "JAXEMBED_PACK_ROWS"


def row_storage(mesh: jax.sharding.Mesh, width: int) -> tuple[int, int]:
    """``(pack, stored width)``: how a device stores the rows of ``width`` floats of its part of
    an array (``TablePlacement.pack`` and ``TablePlacement.stored_cols``): ``pack`` rows side by
    side in each stored row of ``stored width`` floats, the rest of it zero padding.

    A TPU tiles 2-D arrays by 8 x 128 floats and by default lays out a ``[rows, width]`` array
    whose width is not a multiple of 128 column-major (so as not to pad each row to 128): a row
    is then scattered over ``width / 8`` tiles, and a train step, which reads and writes rows,
    makes XLA copy the whole table (and its slots) into row-major order and back, or read every
    row across its tiles. Stored 128 floats wide (a multiple of 128 for wider rows) the array is
    row-major, and rows are read and written in place as ``width``-float windows. So on a TPU
    mesh this is ``(128 // width, 128)`` for widths below 128 (no padding where the width
    divides 128: ``(2, 128)`` for 64, ``(2, 128)`` for 48 with 32 floats of padding) and
    ``(1, width rounded up to a multiple of 128)`` for wider rows; elsewhere (CPU, GPU: row-major
    already) ``(1, width)``. The environment variable ``JAXEMBED_PACK_ROWS`` overrides where:
    ``tpu`` (the default), ``always`` (any mesh: the same results, the TPU's storage on CPU) or
    ``never``.

    Example:
        >>> import jax
        >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ("x",))
        >>> row_storage(mesh, 48)  # (1, 48) on CPU, (2, 128) on TPU
        (1, 48)
    """
    where = os.environ.get(PACK_ROWS_ENV, "tpu")
    if where not in ("tpu", "always", "never"):
        raise ValueError(
            f"{PACK_ROWS_ENV}={where!r}: use 'tpu' (the default: store tables 128 floats wide "
            "on TPU meshes), 'always' or 'never'."
        )
    on_tpu = mesh.devices.flat[0].platform == "tpu"
    if where == "never" or (where == "tpu" and not on_tpu) or width % LANES == 0:
        return 1, width
    if width > LANES:
        return 1, ceil_div(width, LANES) * LANES
    return LANES // width, LANES


def entry_storage(
    mesh: jax.sharding.Mesh, width: int, optimizer: Any = None
) -> tuple[int, int, tuple[str, ...]]:
    """``(pack, stored width, slots beside)``: ``row_storage``, with the optimizer's
    table-shaped slots stored beside each row where the rows are stored side by side or padded
    anyway (TPU meshes) and that takes no more memory than separate slot arrays
    (``TablePlacement.beside``): a step then reads and writes each row and its slots as one
    entry. On TPU, rows 64 floats wide with Adagrad's accumulators are one stored row of 128
    floats each, where separately each would be read and written with its neighbour's.

    Example:
        >>> import jax, jaxembed as je
        >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ("x",))
        >>> entry_storage(mesh, 64, je.optimizers.Adagrad(0.1))  # on TPU: 1 in 128, beside
        (1, 64, ())
    """
    pack, stored = row_storage(mesh, width)
    names = _table_slots(optimizer, width)
    if (pack, stored) == (1, width) or not names:  # rows as they are: slots of their own
        return pack, stored, ()
    entry = (1 + len(names)) * width
    entry_pack, entry_stored = row_storage(mesh, entry)
    if entry_pack * stored * (1 + len(names)) < entry_stored * pack:  # more memory beside
        return pack, stored, ()
    return entry_pack, entry_stored, names


def _table_slots(optimizer: Any, width: int) -> tuple[str, ...]:
    """The names of ``optimizer``'s slots shaped like the table (in ``slot_names`` order), where
    its update is TF's rows-then-slots rule on the touched rows (not ``from_optax``, not
    non-lazy Adam)."""
    if optimizer is None or not optimizer.splits_update or not optimizer.lazy:
        return ()
    shape = (8, width)
    try:
        slots = jax.eval_shape(optimizer.init_slots, jax.ShapeDtypeStruct(shape, jnp.float32))
    except Exception:  # noqa: BLE001 - a slot_variable_creation_fn that cannot be traced
        return ()
    if not isinstance(slots, Mapping):
        return ()
    return tuple(n for n in optimizer.slot_names if n in slots and slots[n].shape == shape)


def _round_up(rows: int, pack: int) -> int:
    return ceil_div(rows, pack) * pack


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Placement of every table on a mesh; printable, holds no arrays.

    Attributes:
        mesh_shape: ``((axis name, size), ...)`` of the mesh, in its order.
        table_axes: the axes tables are split over (the others replicate them).
        tables: one ``TablePlacement`` per table, in table order.
        layouts: one ``Layout`` per physical array, in table order.

    Example (8 devices: a large table, two table-wise tables stacked, a tiny table)::

        ShardingPlan(mesh={'x': 8}, table_axes=('x',))
          table       strategy    logical       per device    MiB/device  array
          items       row         1000000x64    125000x64     30.5        items
          ads         table       50000x16      50000x16      3.1         ads_shops (shard 0)
          shops       table       20000x16      50000x16      3.1         ads_shops (shard 1)
          country     replicated  200x8         200x8         0.0         country
    """

    mesh_shape: tuple[tuple[str, int], ...]
    table_axes: tuple[str, ...]
    tables: tuple[TablePlacement, ...]
    layouts: tuple[Layout, ...]

    def __getitem__(self, name: str) -> TablePlacement:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def layout(self, name: str) -> Layout:
        """The layout of a physical array, or of the array holding table ``name``."""
        for layout in self.layouts:
            if layout.name == name or any(t.name == name for t in layout.tables):
                return layout
        raise KeyError(name)

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """The mesh axes the batch is split over: all of them."""
        return tuple(a for a, _ in self.mesh_shape)

    @property
    def axis(self) -> str | tuple[str, ...]:
        """The batch axis of a 1-D mesh (its name), else all axes."""
        axes = self.batch_axes
        return axes[0] if len(axes) == 1 else axes

    @property
    def num_devices(self) -> int:
        return math.prod(n for _, n in self.mesh_shape)

    @property
    def num_shards(self) -> int:
        """Devices a table split over ``table_axes`` spans."""
        sizes = dict(self.mesh_shape)
        return math.prod(sizes[a] for a in self.table_axes)

    @property
    def groups(self) -> dict[str, tuple[TablePlacement, ...]]:
        """``{array name: placements of its tables}``, in table order."""
        return {layout.name: layout.tables for layout in self.layouts}

    def __str__(self) -> str:
        lines = [
            f"ShardingPlan(mesh={dict(self.mesh_shape)}, table_axes={self.table_axes})",
            f"  {'table':<12}{'strategy':<12}{'logical':<14}{'per device':<14}"
            f"{'MiB/device':<12}array",
        ]
        for t in self.tables:
            where = f" (shard {t.shard})" if t.shard is not None else ""
            if t.beside:
                where += f" ({', '.join(t.beside)} beside each row"
                where += f", {t.pack} to a stored row)" if t.pack > 1 else ")"
            elif t.stored_cols != t.cols_per_shard:
                if t.pack > 1:
                    where += f" ({t.pack} rows to a stored row of {t.stored_cols} floats)"
                else:
                    where += f" (rows stored padded to {t.stored_cols} floats)"
            lines.append(
                f"  {t.name:<12}{t.strategy:<12}{f'{t.vocabulary_size}x{t.dim}':<14}"
                f"{f'{t.rows_per_shard}x{t.cols_per_shard}':<14}"
                f"{t.bytes_per_device() / 2**20:<12.1f}{t.group}{where}"
            )
        return "\n".join(lines)


def _table_axes(mesh: jax.sharding.Mesh, table_axes: Sequence[str] | None) -> tuple[str, ...]:
    names = tuple(mesh.axis_names)
    if table_axes is None:
        return names
    if isinstance(table_axes, str):
        table_axes = (table_axes,)
    axes = tuple(table_axes)
    unknown = [a for a in axes if a not in names]
    if unknown or len(set(axes)) != len(axes):
        raise ValueError(
            f"table_axes={axes} must name distinct axes of the mesh {names}; e.g. "
            f"table_axes=({names[-1]!r},) shards the tables over {names[-1]!r} and replicates "
            "them over the other axes, table_axes=None over all axes."
        )
    return tuple(a for a in names if a in axes)  # the mesh's order: its devices' order


def plan_sharding(
    tables: Mapping[TableConfig, str],
    mesh: jax.sharding.Mesh,
    overrides: Mapping[str, str] | None = None,
    replicate_max_bytes: int = REPLICATE_MAX_BYTES,
    optimizers: Mapping[str, Any] | None = None,
    table_axes: Sequence[str] | None = None,
) -> ShardingPlan:
    """Chooses a strategy per table and builds the layouts.

    Args:
        tables: ``{TableConfig: name}`` in table order.
        mesh: any ``jax.sharding.Mesh`` (a one-device mesh for a single device).
        overrides: ``{table name: "row" | "table" | "column" | "replicated"}``.
        replicate_max_bytes: tables up to this size (float32) are replicated by default.
        optimizers: ``{table name: optimizer}``; table-wise tables are stacked only with tables
            of the same dim and an equal optimizer.
        table_axes: mesh axes the tables are split over; None for all axes.

    Raises:
        ValueError: an unknown table, strategy or axis, or row sharding of a table with fewer
            rows than shards.
    """
    overrides = dict(overrides or {})
    optimizers = dict(optimizers or {})
    unknown = set(overrides) - set(tables.values())
    if unknown:
        raise ValueError(
            f"sharding names tables {sorted(unknown)} that do not exist; tables are "
            f"{sorted(tables.values())}."
        )
    axes = _table_axes(mesh, table_axes)
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    n = math.prod(sizes[a] for a in axes)
    spread = (axes, tuple(a for a in mesh.axis_names if a not in axes), n, mesh.size // n)
    everywhere = ((), tuple(mesh.axis_names), 1, mesh.size)
    layouts: dict[str, Layout] = {}
    stacks: dict[tuple, list[tuple[str, int, int]]] = {}
    for table, name in tables.items():
        vocab, dim = table.vocabulary_size, table.dim
        strategy = overrides.get(name)
        if strategy is None:
            tiny = vocab * dim * 4 <= replicate_max_bytes
            strategy = "replicated" if tiny or vocab < n else "row"
        if strategy not in STRATEGIES:
            raise ValueError(
                f"Unknown sharding strategy {strategy!r} for table {name!r}; use one of "
                f"{list(STRATEGIES)}."
            )
        if strategy == "row" and vocab < n:
            raise ValueError(
                f"Table {name!r} has {vocab} rows, fewer than the {n} devices it would be "
                f"row-sharded over. Use sharding={{{name!r}: 'replicated'}}, 'column' or 'table'."
            )
        if strategy == "table":
            key = (dim, _hashable(optimizers.get(name)))
            stacks.setdefault(key, []).append((name, vocab, dim))
            continue
        width = ceil_div(dim, n) if strategy == "column" else dim  # on one device
        pack, stored, beside = entry_storage(mesh, width, optimizers.get(name))
        if strategy == "row":
            rows = _round_up(ceil_div(vocab, n), pack)
            shape = (n, rows, dim, n * rows)  # shards, rows and columns per shard, total rows
        else:
            rows = _round_up(vocab, pack)
            shape = (1, rows, dim, rows) if strategy == "replicated" else (n, rows, width, rows)
        placement = TablePlacement(
            name, strategy, vocab, dim, *shape, name, pack=pack, stored_cols=stored, beside=beside
        )
        spread_over = everywhere if strategy == "replicated" else spread
        layouts[name] = LAYOUTS[strategy](name, (placement,), *spread_over)
    for members in stacks.values():
        dim, optimizer = members[0][2], optimizers.get(members[0][0])
        layout = _stack_tables(members, spread, entry_storage(mesh, dim, optimizer))
        layouts.update({t.name: layout for t in layout.tables})
    order = list(tables.values())
    placements = {t.name: t for layout in layouts.values() for t in layout.tables}
    unique = list({id(layouts[name]): layouts[name] for name in order}.values())
    for placed in unique:
        _check_row_limit(placed, axes, n)
    return ShardingPlan(
        tuple(sizes.items()), axes, tuple(placements[name] for name in order), tuple(unique)
    )


MAX_ROWS_PER_DEVICE = 2**31 - 2
"""Rows one device may hold of an array: device-side row numbers are int32, and the padding
row number (the row count) must fit too. Tables may be larger in total when split over
devices: the host routes int64 ids to (device, local row)."""


def _check_row_limit(layout: Layout, axes: tuple[str, ...], devices: int) -> None:
    rows = layout.shard_shape[0]
    if rows > MAX_ROWS_PER_DEVICE:
        names = ", ".join(repr(t.name) for t in layout.tables)
        need = ceil_div(sum(t.vocabulary_size for t in layout.tables), MAX_ROWS_PER_DEVICE)
        raise ValueError(
            f"Table(s) {names} would put {rows} rows on one device ({layout.strategy}-wise over "
            f"{devices} device(s) of axes {axes}), over the limit of {MAX_ROWS_PER_DEVICE} rows "
            f"per device (int32 row numbers). Shard it row-wise over at least {need} devices "
            "(sharding={name: 'row'}, a larger mesh or table_axes)."
        )


def _hashable(optimizer: Any) -> Any:
    try:
        hash(optimizer)
        return optimizer
    except TypeError:
        return id(optimizer)


def _stack_tables(
    members: list[tuple[str, int, int]], spread: tuple, storage: tuple[int, int, tuple[str, ...]]
) -> TableLayout:
    """Table-wise placement: largest table first onto the least loaded shard."""
    n = spread[2]
    load = [0] * n
    where = {}
    for name, vocab, _ in sorted(members, key=lambda m: (-m[1], m[0])):
        shard = min(range(n), key=lambda d: (load[d], d))
        where[name] = (shard, load[shard])
        load[shard] += vocab
    group = "_".join(sorted(name for name, *_ in members))
    pack, stored, beside = storage
    rows = _round_up(max(max(load), 1), pack)
    placements = tuple(
        TablePlacement(
            name,
            "table",
            vocab,
            dim,
            n,
            rows,
            dim,
            n * rows,
            group,
            *where[name],
            pack=pack,
            stored_cols=stored,
            beside=beside,
        )
        for name, vocab, dim in members
    )
    return TableLayout(group, placements, *spread)


def spread_sharding(
    mesh: jax.sharding.Mesh, shape: Sequence[int], axes: Sequence[str] | None = None
) -> NamedSharding:
    """Where a logical-order array (a table's ``[vocabulary_size, dim]``, a ``[vocabulary_size]``
    row-wise slot, a scalar) lives between a checkpoint and its layout: split over ``axes`` (the
    table's shard axes, ``Layout.shard_axes``; None: all of ``mesh``'s axes) as far as its shape
    allows, so that no device holds more of the table than its layout gives it.

    For each dimension, ``axes`` are taken in the mesh's order, skipping any that would not
    divide the dimension evenly (JAX shards only evenly); the dimension split the most ways
    wins (the first on a tie), and the other axes replicate it.

    Example:
        >>> import jax
        >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ("x",))
        >>> spread_sharding(mesh, (10, 4)).spec, spread_sharding(mesh, ()).spec
        (P('x', None), P())
    """
    allowed = mesh.axis_names if axes is None else tuple(axes)
    best, spec = 1, P()
    for dim, size in enumerate(shape):
        split: list[str] = []
        ways = 1
        for axis, n in mesh.shape.items():
            if axis in allowed and size % (ways * n) == 0:
                split.append(axis)
                ways *= n
        if split and (ways > best or spec == P()):
            rest = [None] * (len(shape) - dim - 1)
            best, spec = ways, P(*([None] * dim), tuple(split), *rest)
    return NamedSharding(mesh, spec)


def split_evenly(batch_size: int, num_shards: int, what: str = "batch") -> Sequence[int]:
    """Example boundaries of the data-parallel slices (``batch_size`` must divide evenly)."""
    if batch_size % num_shards:
        raise ValueError(
            f"The {what} size {batch_size} is not divisible by the {num_shards} devices of the "
            f"mesh; pad or drop examples so that each device gets batch / {num_shards}."
        )
    step = batch_size // num_shards
    return [i * step for i in range(num_shards + 1)]
