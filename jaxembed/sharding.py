"""Sharding plan: where each table lives on a ``jax.sharding.Mesh``, as plain data.

Two strategies exist today:

* ``"row"`` (default for every table that is not tiny): row ``r`` lives on shard ``r mod N`` at
  local row ``r div N``, as TPUs place rows. Hot ids of frequency-sorted vocabularies (small
  ids) land on different shards. The table is one global array of ``N * ceil(V / N)`` physical
  rows sharded over the mesh axis; shard ``s`` holds logical rows ``s, s + N, s + 2N, ...``.
* ``"replicated"``: the whole table on every device (tiny tables, or a table with fewer rows
  than shards). Lookups are local; gradients are all-gathered and every device applies the same
  update.

The batch is data-parallel over the same axis: each device holds ``batch / N`` examples.
Checkpoints and ``Embedding.embedding_tables`` always see tables in logical row order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxembed.configs import TableConfig

STRATEGIES = ("row", "replicated")
REPLICATE_MAX_BYTES = 256 * 1024


@dataclasses.dataclass(frozen=True)
class TablePlacement:
    """Where one table lives.

    Attributes:
        name: table name.
        strategy: ``"row"`` or ``"replicated"``.
        vocabulary_size, dim: the logical table shape.
        num_shards: number of devices on the mesh axis.
        rows_per_shard: physical rows per device (``ceil(V / N)`` for row sharding, ``V`` for
            replicated tables).
    """

    name: str
    strategy: str
    vocabulary_size: int
    dim: int
    num_shards: int
    rows_per_shard: int

    @property
    def physical_rows(self) -> int:
        """Rows of the global (physical) array."""
        if self.strategy == "row":
            return self.num_shards * self.rows_per_shard
        return self.vocabulary_size

    def bytes_per_device(self, slots: int = 0) -> int:
        """float32 bytes one device holds for the table and ``slots`` same-shaped slots."""
        return (1 + slots) * self.rows_per_shard * self.dim * 4


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Placement of every table on a 1-D mesh axis; printable, holds no arrays.

    Example (8 devices, one large and one tiny table)::

        ShardingPlan(axis='x', devices=8)
          table     strategy    logical       per device    MiB/device
          items     row         1000000x64    125000x64     30.5
          country   replicated  200x8         200x8         0.0
    """

    axis: str
    num_shards: int
    tables: tuple[TablePlacement, ...]

    def __getitem__(self, name: str) -> TablePlacement:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def __str__(self) -> str:
        lines = [
            f"ShardingPlan(axis={self.axis!r}, devices={self.num_shards})",
            f"  {'table':<12}{'strategy':<12}{'logical':<14}{'per device':<14}MiB/device",
        ]
        for t in self.tables:
            lines.append(
                f"  {t.name:<12}{t.strategy:<12}{f'{t.vocabulary_size}x{t.dim}':<14}"
                f"{f'{t.rows_per_shard}x{t.dim}':<14}{t.bytes_per_device() / 2**20:.1f}"
            )
        return "\n".join(lines)


def plan_sharding(
    tables: Mapping[TableConfig, str],
    mesh: jax.sharding.Mesh,
    overrides: Mapping[str, str] | None = None,
    replicate_max_bytes: int = REPLICATE_MAX_BYTES,
) -> ShardingPlan:
    """Chooses a strategy per table: replicated if tiny or shorter than the mesh, else row.

    Args:
        tables: ``{TableConfig: name}`` in table order.
        mesh: a 1-D ``jax.sharding.Mesh`` (its one axis carries both the batch and the rows).
        overrides: ``{table name: "row" | "replicated"}``.
        replicate_max_bytes: tables up to this size (float32) are replicated by default.

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
    unknown = set(overrides) - set(tables.values())
    if unknown:
        raise ValueError(
            f"sharding names tables {sorted(unknown)} that do not exist; tables are "
            f"{sorted(tables.values())}."
        )
    n = mesh.size
    placements = []
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
                f"row-sharded over. Use sharding={{{name!r}: 'replicated'}}."
            )
        rows = -(-vocab // n) if strategy == "row" else vocab
        placements.append(TablePlacement(name, strategy, vocab, dim, n, rows))
    return ShardingPlan(mesh.axis_names[0], n, tuple(placements))


# ---------------------------------------------------------------------------------------------
# Logical <-> physical row order for row sharding.


def to_physical(table: jax.Array, placement: TablePlacement) -> jax.Array:
    """Logical ``[V, D]`` -> physical ``[N * S, D]`` (shard-major, padded with zero rows)."""
    if placement.strategy != "row":
        return table
    n, s = placement.num_shards, placement.rows_per_shard
    padded = jnp.pad(table, ((0, n * s - table.shape[0]), (0, 0)))
    return padded.reshape(s, n, -1).transpose(1, 0, 2).reshape(n * s, -1)


def _replicated(x: jax.Array) -> jax.Array:
    """``x`` on every device of its mesh (explicit-axis meshes need this before a reshape)."""
    sharding = getattr(x, "sharding", None)
    if (
        isinstance(sharding, jax.sharding.NamedSharding)
        and not sharding.is_fully_replicated
        and any(t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types)
    ):
        return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, P()))
    return x


def to_logical(table: jax.Array, placement: TablePlacement) -> jax.Array:
    """Physical ``[N * S, D]`` -> logical ``[V, D]``."""
    if placement.strategy != "row":
        return table
    table = _replicated(table)
    n, s = placement.num_shards, placement.rows_per_shard
    return (
        table.reshape(n, s, -1).transpose(1, 0, 2).reshape(n * s, -1)[: placement.vocabulary_size]
    )


def owner_and_local_row(
    ids: np.ndarray, placement: TablePlacement
) -> tuple[np.ndarray, np.ndarray]:
    """Shard and local row of logical ``ids`` under row-mod sharding."""
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
