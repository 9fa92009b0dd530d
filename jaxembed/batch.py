"""``Batch``: a preprocessed batch, and the host-side preprocessing that builds it.

Host (numpy), per process: the process's examples are split evenly over its devices of the mesh;
each device's slice is validated and planned with TF's rules (``lookup.plan_training_feature``:
``serving_embedding_lookup``'s, with ``TPUEmbedding.enqueue``'s for dense ids). Per
physical array, every device's ids become the array's keys (``Layout.keys``), their distinct
values become the device's request array (``Layout.requests``), and each feature's plan is
re-pointed at the rows those requests will bring back. Sizes that vary from batch to batch
(request capacity, slots per example) are padded to bucketed sizes agreed by every process, so a
jitted step compiles once per bucket and every process traces the same shapes.

The features (planning), the physical arrays (routing, requests) and the features again
(re-pointing) are spread over the host's cores, in a thread pool: numpy's array operations and
the compiled distinct-keys helper release the GIL. The batch and any error are the ones a single
thread gives (the first bad feature in ``tf.nest`` order).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxembed import _kernels, _nest
from jaxembed._distinct import distinct as distinct_keys
from jaxembed.configs import FeatureConfig, TableConfig
from jaxembed.inputs import Ragged, Sparse
from jaxembed.layouts import Layout
from jaxembed.lookup import (
    LookupPlan,
    bucket,
    check_structure,
    flatten_features,
    pad_axis,
    plan_training_feature,
    remap_plan,
    rest_blocks,
    row_bucket,
    slot_bucket,
    transpose_plan,
)
from jaxembed.sharding import ShardingPlan, split_evenly


@dataclasses.dataclass(frozen=True)
class Batch:
    """A preprocessed batch: static-shape arrays, ready for ``lookup``/``apply_gradients``.

    Every array has a leading axis of the mesh's devices (1 on one device), split over all of
    them: device ``d`` holds ``[1, ...]`` of its own examples.

    Attributes:
        requests: ``{array name: [devices, T, K] int32}``: the rows each device requests of each
            of the array's ``T`` shards (local row numbers; column-wise arrays ``[devices, 1,
            K]``, the same ids for every shard), padded with the shard's row count; see
            ``Layout.requests``.
        plans: one ``LookupPlan`` per input leaf, for each device's examples; slots index the
            rows its requests bring back (``Layout.fetched_rows``; that count = no entry).
        paths: the input paths, in the order of ``plans`` (static).
        treedef: the inputs' nested structure (static), to pack the activations.
        owner: a fingerprint of the features and plan of the ``Embedding`` that built it
            (static), so that a ``Batch`` is never used with an ``Embedding`` it does not fit.

    Example:
        >>> import numpy as np, jaxembed as je
        >>> table = je.TableConfig(vocabulary_size=10, dim=4, name="items")
        >>> emb = je.Embedding({"items": je.FeatureConfig(table)}, je.optimizers.SGD(0.1))
        >>> batch = emb.preprocess({"items": np.array([[1], [7]])})
        >>> batch.paths, batch.plans[0].mode
        (('items',), 'gather')
        >>> batch.requests["items"].shape  # one device, one shard, 64 rows (padded)
        (1, 1, 64)
    """

    requests: Mapping[str, jax.Array]
    plans: tuple[LookupPlan, ...]
    paths: tuple[str, ...]
    treedef: Any
    owner: str = ""


jax.tree_util.register_dataclass(
    Batch, data_fields=["requests", "plans"], meta_fields=["paths", "treedef", "owner"]
)

BATCH_SIZES = ("bucket",)
"""``preprocess(batch_size=...)``: an int, or ``"bucket"``: the next power of two examples per
device, at least ``MIN_BUCKET_EXAMPLES`` (8, 16, 32, ...), so that any batch size reuses one of
a few compiled programs."""
MIN_BUCKET_EXAMPLES = 8
MIN_CAPACITY = 64
"""Distinct rows a device requests per shard are padded to ``lookup.row_bucket`` (powers of two
up to 512, quarter steps past it), at least this: small batches share one program, at the cost
of a few padding rows."""
MIN_REST_BLOCKS = 64
"""Where gradients are summed in pure JAX, a plan's blocks of further uses of a row
(``lookup.transpose_plan``) are padded the same way, to at least this many blocks of 8."""


_EVERY_FEATURE = (
    "Embedding.preprocess, like TF's TPUEmbedding.enqueue, takes an input for every feature of "
    "feature_config, in its nested structure; to look up a subset of the features, call "
    "je.embedding_lookup(inputs, weights, emb.embedding_tables(state), feature_config)."
)
_WEIGHTS_FIX = (
    "weights must have the nested structure of feature_config (like TF's TPUEmbedding.enqueue), "
    "with None for the unweighted features."
)


def _examples(path: str, inp: Any) -> int:
    if isinstance(inp, Sparse):
        return inp.dense_shape[0]
    if isinstance(inp, Ragged):
        return inp.nrows
    shape = np.shape(inp)
    if not shape:
        raise ValueError(
            f"Input {path!r} is a scalar; Embedding.preprocess needs a batch dimension (e.g. "
            "ids[None]). je.embedding_lookup accepts any shape."
        )
    return shape[0]


def slice_examples(inp: Any, lo: int, hi: int) -> Any:
    """Examples ``[lo, hi)`` of a dense, ``Sparse`` or ``Ragged`` input (or weights)."""
    if inp is None:
        return None
    if isinstance(inp, Sparse):
        keep = (inp.indices[:, 0] >= lo) & (inp.indices[:, 0] < hi)
        indices = inp.indices[keep] - np.array([lo] + [0] * (len(inp.dense_shape) - 1))
        return Sparse(indices, inp.values[keep], (hi - lo, *inp.dense_shape[1:]))
    if isinstance(inp, Ragged):
        splits = np.asarray(inp.row_splits)
        return Ragged(inp.values[splits[lo] : splits[hi]], splits[lo : hi + 1] - splits[lo])
    return np.asarray(inp)[lo:hi]


def padded_size(path: str, examples: int, batch_size: int | str | None, devices: int) -> int:
    """The number of examples a feature is padded to (``batch_size``; see ``BATCH_SIZES``)."""
    if batch_size is None:
        return examples
    if batch_size == "bucket":
        return devices * bucket(-(-examples // devices), MIN_BUCKET_EXAMPLES)
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool):
        raise ValueError(
            f"batch_size must be None, an int or 'bucket', got {batch_size!r}: None keeps the "
            "batch as given, an int pads every feature to that many examples, 'bucket' pads to "
            "the next power of two per device."
        )
    if batch_size < examples or batch_size % devices:
        raise ValueError(
            f"batch_size={batch_size} cannot hold the {examples} examples of feature {path!r} "
            f"split over {devices} devices: give at least {examples}, a multiple of {devices}."
        )
    return int(batch_size)


def _pad_examples(inp: Any, size: int) -> Any:
    """A ``Sparse`` or ``Ragged`` input (or weights) with empty examples appended up to
    ``size``; dense inputs are padded after planning (``_pad_gather``)."""
    if isinstance(inp, Sparse) and inp.dense_shape[0] < size:
        return Sparse(inp.indices, inp.values, (size, *inp.dense_shape[1:]))
    if isinstance(inp, Ragged) and inp.nrows < size:
        splits = np.asarray(inp.row_splits)
        return Ragged(inp.values, np.concatenate([splits, np.full(size - inp.nrows, splits[-1])]))
    return inp


def _pad_gather(plan: LookupPlan, rows: int) -> LookupPlan:
    """A dense input's plan with ``rows`` examples: the added positions read a zero row."""
    if plan.shape[0] == rows:
        return plan
    shape = (rows, *plan.shape[1:])
    slots = math.prod(shape)  # positions are flat, one per id
    positions = pad_axis(np.asarray(plan.positions), 0, slots, np.asarray(plan.ids).shape[0])
    return dataclasses.replace(plan, shape=shape, positions=positions)


def _global_max(values: list[int]) -> list[int]:
    """Element-wise max over all processes (capacities must agree for static shapes)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(values, np.int64))
    return [int(v) for v in np.max(gathered.reshape(-1, len(values)), axis=0)]


def _local_feature(path: str, inp: Any, feature: FeatureConfig, devices: int) -> FeatureConfig:
    """The feature as one device of ``devices`` sees it: a ragged or dense ``output_shape``
    covers the whole batch, so each device's slice gets ``output_shape[0] / devices`` of it."""
    shape = feature.output_shape
    if shape is None or devices == 1 or isinstance(inp, Sparse):
        return feature
    if not shape or shape[0] is None or shape[0] % devices:
        raise ValueError(
            f"output_shape {shape} of feature {path!r} must have a first dimension divisible by "
            f"the {devices} devices the batch is split over (each device combines its own "
            "examples), e.g. output_shape=(batch, ...) rather than (1, batch, ...)."
        )
    return dataclasses.replace(feature, output_shape=(shape[0] // devices, *shape[1:]))


def _plan_devices(
    path: str,
    inp: Any,
    weight: Any,
    feature: FeatureConfig,
    n: int,
    size: int,
    devices: int,
    mesh_size: int,
) -> list[LookupPlan]:
    """One feature's ``n`` examples padded to ``size``, split evenly over this process's
    ``devices`` and planned: one plan per device."""
    dense = not isinstance(inp, (Sparse, Ragged))  # padded after planning
    if size != n and feature.output_shape is not None and not isinstance(inp, Sparse):
        raise ValueError(
            f"Feature {path!r} has output_shape {feature.output_shape}, which fixes its "
            f"batch of {n} examples; it cannot be padded to batch_size={size}. Pass "
            "batch_size=None, or drop output_shape."
        )
    inp, weight = _pad_examples(inp, size), _pad_examples(weight, size)
    bounds = split_evenly(size, devices, f"{path!r} batch")
    part = _local_feature(path, inp, feature, mesh_size)
    plans = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        local_inp = slice_examples(inp, *((min(lo, n), min(hi, n)) if dense else (lo, hi)))
        plan = plan_training_feature(path, local_inp, slice_examples(weight, lo, hi), part)
        padded = dense and size != n  # (a dense output_shape forbids padding, above)
        plans.append(_pad_gather(plan, hi - lo) if padded else plan)
    return plans


class _Routed(NamedTuple):
    """One device's ids of the features of one physical array, routed through its layout."""

    keys: dict[str, np.ndarray]  # path -> the array's keys of the feature's ids
    distinct: np.ndarray  # the sorted distinct keys
    inverse: np.ndarray  # each key's index in ``distinct`` (features in ``keys`` order)
    needed: int  # ``Layout.capacity_needed`` of ``distinct``
    rest: dict[str, int]  # path -> ``lookup.rest_blocks`` of its keys' counts (if transposed)

    def requests(self, layout: Layout, capacity: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The device's request array and, per feature, each id's row among the fetched
        rows."""
        req, where = layout.requests(self.distinct, capacity)
        return req, {p: where[inv] for p, inv in _per_feature(self.keys, self.inverse)}


def _per_feature(keys: Mapping[str, np.ndarray], inverse: np.ndarray) -> Iterator:
    """``(path, its keys' indices among the distinct keys)`` for each feature of ``keys``,
    whose keys are concatenated in ``inverse``."""
    lo = 0
    for p, k in keys.items():
        yield p, inverse[lo : lo + k.shape[0]]
        lo += k.shape[0]


def _route(
    layout: Layout, plans: Mapping[str, LookupPlan], table_of: Mapping[str, str], transpose: bool
) -> _Routed:
    keys = {
        p: layout.keys(table_of[p], np.asarray(plan.ids, np.int64)) for p, plan in plans.items()
    }
    flat = np.concatenate(list(keys.values())) if keys else np.zeros(0, np.int64)
    distinct, inverse = distinct_keys(flat)
    rest = {  # the blocks of further uses a feature's slots may need
        p: rest_blocks(np.bincount(inv)) if transpose else 0
        for p, inv in _per_feature(keys, inverse)
    }
    return _Routed(keys, distinct, inverse, layout.capacity_needed(distinct), rest)


@functools.cache
def _pool(pid: int) -> ThreadPoolExecutor:
    """The preprocess threads of process ``pid`` (a forked child gets its own: threads do not
    survive a fork)."""
    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="jaxembed-preprocess")


def _parallel(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]``, spread over the host's cores (numpy's array operations and
    the compiled distinct-keys helper release the GIL); the first exception in ``items`` order
    is raised."""
    if len(items) < 2 or (os.cpu_count() or 1) == 1:
        return [fn(x) for x in items]
    return list(_pool(os.getpid()).map(fn, items))


def preprocess(
    inputs: Any,
    weights: Any,
    feature_config: Any,
    plan: ShardingPlan,
    table_names: Mapping[TableConfig, str],
    mesh: jax.sharding.Mesh,
    batch_size: int | str | None = None,
    owner: str = "",
) -> Batch:
    """Builds this process's part of a ``Batch`` and places it on ``mesh``.

    Args:
        inputs, weights: this process's examples (see ``Embedding.preprocess``).
        feature_config: the nested ``FeatureConfig`` structure.
        plan: the sharding plan (its layouts route the ids).
        table_names: ``{TableConfig: table name}``.
        mesh: the mesh the batch is split over (all devices, in its device order).
        batch_size: None, or the examples to pad every feature to (see ``padded_size``).
        owner: the fingerprint of the ``Embedding`` (``Batch.owner``).
    """
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    check_structure(feature_config, inputs, "inputs", _EVERY_FEATURE)
    if weights is not None:
        check_structure(feature_config, weights, "weights", _WEIGHTS_FIX)
    leaves = flatten_features(inputs, weights, feature_config)
    given = [_examples(path, inp) for path, inp, _, _ in leaves]
    sizes = [
        padded_size(p, n, batch_size, len(local)) for (p, *_), n in zip(leaves, given, strict=True)
    ]
    if batch_size is not None:  # padded shapes must agree across processes
        sizes = _global_max(sizes)

    def plan_leaf(item: tuple[Any, int, int]) -> list[LookupPlan]:
        (path, inp, weight, feature), n, size = item
        return _plan_devices(path, inp, weight, feature, n, size, len(local), mesh.size)

    planned = _parallel(plan_leaf, list(zip(leaves, given, sizes, strict=True)))
    per_device = [
        {path: plans[d] for (path, *_), plans in zip(leaves, planned, strict=True)}
        for d in range(len(local))
    ]

    table_of = {path: table_names[feature.table] for path, _, _, feature in leaves}

    # Where the step sums gradients in pure JAX, each plan carries its slots transposed.
    transpose = not _kernels.gradients_in_kernel(local[0].platform)

    def route(layout: Layout) -> list[_Routed]:
        paths = [p for p in table_of if plan.layout(table_of[p]) is layout]
        return [
            _route(layout, {p: plans[p] for p in paths}, table_of, transpose)
            for plans in per_device
        ]

    routed = {  # array name -> per device
        layout.name: per_array
        for layout, per_array in zip(plan.layouts, _parallel(route, plan.layouts), strict=True)
    }
    needed = [r.needed for layout in plan.layouts for r in routed[layout.name]]
    # Slots per example, overflow blocks and blocks of further uses, per feature: the largest
    # over devices (and processes), bucketed.
    leaf_paths = [path for path, *_ in leaves]
    slots = []
    for p in leaf_paths:
        combined = [d[p] for d in per_device if d[p].mode == "combine"]
        slots.append(max((c.positions.shape[1] for c in combined), default=0))
        slots.append(max((c.blocks.shape[1] for c in combined), default=0))
        slots.append(max((c.overflow.shape[0] for c in combined), default=0))
        slots.append(max((r.rest.get(p, 0) for per in routed.values() for r in per), default=0))
    maxima = _global_max([*needed, *slots])
    per_feature = np.reshape(maxima[len(needed) :], (len(leaf_paths), 4))
    heads = {p: slot_bucket(h) for p, h in zip(leaf_paths, per_feature[:, 0], strict=True)}
    tails, overflows = (
        {p: bucket(int(n)) if n else 0 for p, n in zip(leaf_paths, column, strict=True)}
        for column in per_feature[:, 1:3].T
    )
    # Blocks of further uses: quarter steps, as the capacities they follow (one size on W).
    rests = {
        p: row_bucket(int(n), MIN_REST_BLOCKS)
        for p, n in zip(leaf_paths, per_feature[:, 3], strict=True)
    }

    per_layout = np.reshape(maxima[: len(needed)], (len(plan.layouts), len(local)))
    capacities = {
        layout.name: row_bucket(int(most), MIN_CAPACITY)
        for layout, most in zip(plan.layouts, per_layout.max(axis=1, initial=0), strict=True)
    }

    def request(layout: Layout) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
        placed = [r.requests(layout, capacities[layout.name]) for r in routed[layout.name]]
        return np.stack([req for req, _ in placed]), [index for _, index in placed]

    requested = dict(zip(capacities, _parallel(request, plan.layouts), strict=True))
    skeleton = _nest.pack_like(inputs, leaf_paths)
    ordered_paths, treedef = jax.tree_util.tree_flatten(skeleton)

    def remap(p: str) -> LookupPlan:
        layout = plan.layout(table_of[p])
        rows = layout.fetched_rows(capacities[layout.name])
        index = requested[layout.name][1]
        remapped = [
            remap_plan(per_device[d][p], index[d][p], rows, heads[p], tails[p], overflows[p])
            for d in range(len(local))
        ]
        if transpose:
            remapped = [transpose_plan(r, rows, rests[p]) for r in remapped]
        return jax.tree.map(lambda *xs: np.stack(xs), *remapped)

    stacked = _parallel(remap, ordered_paths)
    requests = {name: reqs for name, (reqs, _) in requested.items()}
    batch = Batch(requests, tuple(stacked), tuple(ordered_paths), treedef, owner)
    sharding = NamedSharding(mesh, P(plan.batch_axes))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def local(tree: Any) -> Any:
    """Inside ``shard_map``: a device's ``[1, ...]`` batch arrays without the device axis."""
    return jax.tree.map(lambda x: x[0], tree)


__all__: Sequence[str] = [
    "BATCH_SIZES",
    "Batch",
    "local",
    "padded_size",
    "preprocess",
    "slice_examples",
]
