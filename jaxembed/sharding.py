"""Sharding plan: where each table lives on a ``jax.sharding.Mesh``, as plain data.

Strategies, per table:

* ``"row"`` (default for every table that is not tiny): row ``r`` lives on shard ``r mod N`` at
  local row ``r div N``, as TPUs place rows. Hot ids of frequency-sorted vocabularies (small
  ids) land on different shards. The table is one global array of ``N * ceil(V / N)`` physical
  rows sharded over the mesh axis; shard ``s`` holds logical rows ``s, s + N, s + 2N, ...``.
* ``"table"``: the whole table on one device. Table-wise tables of the same dim and optimizer are
  stacked into one array (a *group*) of ``N * S`` rows sharded over the axis: each device holds
  the tables assigned to it (largest first, onto the least loaded device) at row offsets, padded
  to the busiest device's ``S`` rows.
* ``"replicated"``: the whole table on every device (tiny tables, or a table with fewer rows than
  shards). Lookups are local; gradients are all-gathered and every device applies the same
  update.

Every placement names its ``group``: the physical array that holds it (the table's own name for
row and replicated tables). The batch is data-parallel over the same axis: each device holds
``batch / N`` examples. Checkpoints and ``Embedding.embedding_tables`` always see tables in
logical row order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxembed.configs import TableConfig

STRATEGIES = ("row", "table", "replicated")
REPLICATE_MAX_BYTES = 256 * 1024


@dataclasses.dataclass(frozen=True)
class TablePlacement:
    """Where one table lives.

    Attributes:
        name: table name.
        strategy: ``"row"``, ``"table"`` or ``"replicated"``.
        vocabulary_size, dim: the logical table shape.
        num_shards: number of devices on the mesh axis.
        rows_per_shard: physical rows per device of the table's group (``ceil(V / N)`` for row
            sharding, the busiest device's load for a table-wise group, ``V`` if replicated).
        group: name of the physical array holding the table.
        shard: the device of a table-wise table (None otherwise).
        offset: the table's first row on that device (table-wise; 0 otherwise).
    """

    name: str
    strategy: str
    vocabulary_size: int
    dim: int
    num_shards: int
    rows_per_shard: int
    group: str = ""
    shard: int | None = None
    offset: int = 0

    @property
    def physical_rows(self) -> int:
        """Rows of the group's global (physical) array."""
        if self.strategy == "replicated":
            return self.vocabulary_size
        return self.num_shards * self.rows_per_shard

    def bytes_per_device(self, slots: int = 0) -> int:
        """float32 bytes one device holds for the table (or its group) and ``slots`` slots."""
        return (1 + slots) * self.rows_per_shard * self.dim * 4


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Placement of every table on a 1-D mesh axis; printable, holds no arrays.

    Example (8 devices: a large table, two table-wise tables stacked, a tiny table)::

        ShardingPlan(axis='x', devices=8)
          table       strategy    logical       per device    MiB/device  group
          items       row         1000000x64    125000x64     30.5        items
          ads         table       50000x16      50000x16      3.1         ads_shops (device 0)
          shops       table       20000x16      50000x16      3.1         ads_shops (device 1)
          country     replicated  200x8         200x8         0.0         country
    """

    axis: str
    num_shards: int
    tables: tuple[TablePlacement, ...]

    def __getitem__(self, name: str) -> TablePlacement:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def groups(self) -> dict[str, tuple[TablePlacement, ...]]:
        """``{group name: member placements}``, in table order."""
        out: dict[str, list[TablePlacement]] = {}
        for t in self.tables:
            out.setdefault(t.group, []).append(t)
        return {g: tuple(m) for g, m in out.items()}

    def __str__(self) -> str:
        lines = [
            f"ShardingPlan(axis={self.axis!r}, devices={self.num_shards})",
            f"  {'table':<12}{'strategy':<12}{'logical':<14}{'per device':<14}"
            f"{'MiB/device':<12}group",
        ]
        for t in self.tables:
            where = f" (device {t.shard})" if t.shard is not None else ""
            lines.append(
                f"  {t.name:<12}{t.strategy:<12}{f'{t.vocabulary_size}x{t.dim}':<14}"
                f"{f'{t.rows_per_shard}x{t.dim}':<14}{t.bytes_per_device() / 2**20:<12.1f}"
                f"{t.group}{where}"
            )
        return "\n".join(lines)


def plan_sharding(
    tables: Mapping[TableConfig, str],
    mesh: jax.sharding.Mesh,
    overrides: Mapping[str, str] | None = None,
    replicate_max_bytes: int = REPLICATE_MAX_BYTES,
    optimizers: Mapping[str, Any] | None = None,
) -> ShardingPlan:
    """Chooses a strategy per table: replicated if tiny or shorter than the mesh, else row.

    Args:
        tables: ``{TableConfig: name}`` in table order.
        mesh: a 1-D ``jax.sharding.Mesh`` (its one axis carries both the batch and the rows).
        overrides: ``{table name: "row" | "table" | "replicated"}``.
        replicate_max_bytes: tables up to this size (float32) are replicated by default.
        optimizers: ``{table name: optimizer}``; table-wise tables are stacked only with tables
            of the same dim and an equal optimizer.

    Raises:
        ValueError: a mesh with more than one axis, an unknown table or strategy in
            ``overrides``, or row sharding of a table with fewer rows than devices.
    """
    if len(mesh.axis_names) != 1:
        raise ValueError(
            f"Embedding needs a 1-D mesh (one axis for both the batch and the table rows), got "
            f"axes {mesh.axis_names}. Build one with jax.make_mesh(({mesh.size},), ('x',))."
        )
    overrides = dict(overrides or {})
    optimizers = dict(optimizers or {})
    unknown = set(overrides) - set(tables.values())
    if unknown:
        raise ValueError(
            f"sharding names tables {sorted(unknown)} that do not exist; tables are "
            f"{sorted(tables.values())}."
        )
    n = mesh.size
    placements: dict[str, TablePlacement] = {}
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
                f"row-sharded over. Use sharding={{{name!r}: 'replicated'}} or 'table'."
            )
        if strategy == "table":
            key = (dim, _hashable(optimizers.get(name)))
            stacks.setdefault(key, []).append((name, vocab, dim))
            continue
        rows = -(-vocab // n) if strategy == "row" else vocab
        placements[name] = TablePlacement(name, strategy, vocab, dim, n, rows, group=name)
    for members in stacks.values():
        placements.update(_stack_tables(members, n))
    return ShardingPlan(mesh.axis_names[0], n, tuple(placements[name] for name in tables.values()))


def _hashable(optimizer: Any) -> Any:
    try:
        hash(optimizer)
        return optimizer
    except TypeError:
        return id(optimizer)


def _stack_tables(members: list[tuple[str, int, int]], n: int) -> dict[str, TablePlacement]:
    """Table-wise placement: largest table first onto the least loaded device."""
    load = [0] * n
    where = {}
    for name, vocab, _ in sorted(members, key=lambda m: (-m[1], m[0])):
        shard = min(range(n), key=lambda d: (load[d], d))
        where[name] = (shard, load[shard])
        load[shard] += vocab
    group = "_".join(sorted(name for name, *_ in members))
    rows = max(max(load), 1)
    return {
        name: TablePlacement(name, "table", vocab, dim, n, rows, group, *where[name])
        for name, vocab, dim in members
    }


# ---------------------------------------------------------------------------------------------
# Logical <-> physical row order for row sharding.


def to_physical(tables: Mapping[str, jax.Array], members: Sequence[TablePlacement]) -> jax.Array:
    """Logical ``[V, D]`` tables of one group -> the group's physical array."""
    first = members[0]
    if first.strategy == "replicated":
        return tables[first.name]
    if first.strategy == "row":
        n, s = first.num_shards, first.rows_per_shard
        padded = jnp.pad(tables[first.name], ((0, n * s - first.vocabulary_size), (0, 0)))
        return padded.reshape(s, n, -1).transpose(1, 0, 2).reshape(n * s, -1)
    physical = jnp.zeros((first.physical_rows, first.dim), tables[first.name].dtype)
    for m in members:
        start = m.shard * m.rows_per_shard + m.offset
        physical = physical.at[start : start + m.vocabulary_size].set(tables[m.name])
    return physical


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


def to_logical(physical: jax.Array, placement: TablePlacement) -> jax.Array:
    """One table's logical ``[V, D]`` rows out of its group's physical array."""
    if placement.strategy == "replicated":
        return physical
    physical = _replicated(physical)
    if placement.strategy == "table":
        start = placement.shard * placement.rows_per_shard + placement.offset
        return physical[start : start + placement.vocabulary_size]
    n, s = placement.num_shards, placement.rows_per_shard
    logical = physical.reshape(n, s, -1).transpose(1, 0, 2).reshape(n * s, -1)
    return logical[: placement.vocabulary_size]


def owner_and_local_row(
    ids: np.ndarray, placement: TablePlacement
) -> tuple[np.ndarray, np.ndarray]:
    """Shard and local row (within the group's shard) of logical ``ids``."""
    if placement.strategy == "table":
        return np.full_like(ids, placement.shard), ids + placement.offset
    return ids % placement.num_shards, ids // placement.num_shards


def split_evenly(batch_size: int, num_shards: int, what: str = "batch") -> Sequence[int]:
    """Example boundaries of the data-parallel slices (``batch_size`` must divide evenly)."""
    if batch_size % num_shards:
        raise ValueError(
            f"The {what} size {batch_size} is not divisible by the {num_shards} devices of the "
            f"mesh; pad or drop examples so that each device gets batch / {num_shards}."
        )
    step = batch_size // num_shards
    return [i * step for i in range(num_shards + 1)]
