"""Sharded preprocessing, lookup and update: explicit collectives with ``jax.shard_map``.

Layout (see ``sharding.py``): a 1-D mesh axis of N devices carries both the data-parallel batch
(each device holds ``batch / N`` examples) and the table rows (row ``r`` on shard ``r mod N``).

Host (``preprocess_sharded``): each device's slice of the batch is planned like a single-device
batch; per row-sharded table, the distinct ids of the slice are grouped by owning shard into a
``[N, K]`` request array (local row numbers, padded with ``rows_per_shard``), and the plans'
slots point into the ``N * K`` rows those requests will return.

Device, forward (``lookup_sharded``): one ``all_to_all`` sends each owner the rows requested of
it, the owner gathers them from its shard, a second ``all_to_all`` returns them, and every device
combines its own examples locally. Replicated tables are gathered locally.

Device, backward (``apply_gradients_sharded``): the VJP of the local combination gives one
gradient per requested row; one ``all_to_all`` (with the request array) takes the gradients to
the owners, which sum duplicates across requesting devices (``unique`` + ``segment_sum``) and
run the optimizer once per touched row of their shard. Replicated tables all-gather the ids and
gradients and every device applies the same update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxembed import _nest
from jaxembed.inputs import Ragged, Sparse
from jaxembed.lookup import (
    bucket,
    combine_rows,
    flatten_features,
    gather_rows,
    plan_feature,
    remap_plan,
    slot_bucket,
)
from jaxembed.optimizers import apply_rows
from jaxembed.sharding import ShardingPlan, owner_and_local_row, split_evenly


def _examples(path: str, inp: Any) -> int:
    if isinstance(inp, Sparse):
        return inp.dense_shape[0]
    if isinstance(inp, Ragged):
        return inp.nrows
    shape = np.shape(inp)
    if not shape:
        raise ValueError(f"Input {path!r} is a scalar; a sharded batch needs a batch dimension.")
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


def _global_max(values: list[int]) -> list[int]:
    """Element-wise max over all processes (capacities must agree for static shapes)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(values, np.int64))
    return [int(v) for v in np.max(gathered.reshape(-1, len(values)), axis=0)]


def preprocess_sharded(emb, inputs: Any, weights: Any):
    """Host side of a sharded batch (this process's examples, split over its devices)."""
    from jaxembed.embedding import Batch  # circular at import time

    plan: ShardingPlan = emb.plan
    mesh = emb.mesh
    n = plan.num_shards
    local = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    leaves = flatten_features(inputs, weights, emb.feature_config)
    sizes = {_examples(path, inp) for path, inp, *_ in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"All inputs of a sharded batch need the same number of examples, got {sorted(sizes)}."
        )
    bounds = split_evenly(sizes.pop(), len(local), "local batch")
    for _, _, _, feature in leaves:
        if feature.output_shape is not None:
            raise ValueError(
                "FeatureConfig.output_shape is not supported with a mesh yet (it reshapes the "
                "whole batch); use mesh=None or reshape the activations in the model."
            )
    per_device = [
        {
            path: plan_feature(
                path,
                slice_examples(inp, lo, hi),
                slice_examples(weight, lo, hi),
                feature,
            )
            for path, inp, weight, feature in leaves
        }
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    requests, index, capacity = {}, [dict() for _ in local], {}
    sizes_needed = []
    grouped = {}
    for group, members in plan.groups.items():
        first = members[0]
        names = {m.name for m in members}
        paths = [p for p in per_device[0] if emb.table_names[emb._features[p].table] in names]
        grouped[group] = []
        for plans in per_device:
            keys = []  # per path: the physical key of each id (owner * S + local row)
            for p in paths:
                ids = np.asarray(plans[p].ids, np.int64)
                if first.strategy == "replicated":
                    keys.append(ids)
                else:
                    owner, row = owner_and_local_row(
                        ids, plan[emb.table_names[emb._features[p].table]]
                    )
                    keys.append(owner * first.rows_per_shard + row)
            flat = np.concatenate(keys) if keys else np.zeros(0, np.int64)
            distinct, inverse = np.unique(flat, return_inverse=True)
            if first.strategy == "replicated":
                owner = row = None
                need = distinct.shape[0]
            else:
                owner, row = np.divmod(distinct, first.rows_per_shard)
                need = int(np.bincount(owner, minlength=n).max(initial=0))
            grouped[group].append((paths, keys, distinct, inverse, owner, row))
            sizes_needed.append(need)
    heads = [p.positions.shape[1] for d in per_device for p in d.values() if p.mode == "combine"]
    tails = [p.blocks.shape[1] for d in per_device for p in d.values() if p.mode == "combine"]
    maxima = _global_max(sizes_needed + [max(heads, default=0), max(tails, default=0)])
    head = slot_bucket(maxima[-2])
    tail = bucket(maxima[-1]) if maxima[-1] else 0
    it = iter(maxima[:-2])
    for group, per_dev in grouped.items():
        first = plan.groups[group][0]
        cap = bucket(max(next(it) for _ in per_dev))
        reqs = []
        for d, (paths, keys, distinct, inverse, owner, row) in enumerate(per_dev):
            if first.strategy != "replicated":
                req = np.full((n, cap), first.rows_per_shard, np.int32)
                order = np.lexsort((row, owner))  # grouped by owner, then by row
                slot = np.arange(distinct.shape[0]) - np.searchsorted(owner[order], owner[order])
                req[owner[order], slot] = row[order]
                where = np.empty(distinct.shape[0], np.int64)
                where[order] = owner[order] * cap + slot
                capacity[group] = n * cap
            else:
                req = np.full((cap,), first.vocabulary_size, np.int32)
                req[: distinct.shape[0]] = distinct
                where = np.arange(distinct.shape[0])
                capacity[group] = cap
            reqs.append(req)
            splits = np.cumsum([0] + [k.shape[0] for k in keys])
            for p, lo, hi in zip(paths, splits[:-1], splits[1:], strict=True):
                index[d][p] = where[inverse[lo:hi]]
        requests[group] = np.stack(reqs)
    skeleton = _nest.pack_like(inputs, [path for path, *_ in leaves])
    ordered_paths, treedef = jax.tree_util.tree_flatten(skeleton)
    stacked = []
    for p in ordered_paths:
        group = plan[emb.table_names[emb._features[p].table]].group
        remapped = [
            remap_plan(per_device[d][p], index[d][p], capacity[group], head, tail)
            for d in range(len(local))
        ]
        stacked.append(jax.tree.map(lambda *xs: np.stack(xs), *remapped))
    sharding = NamedSharding(mesh, P(plan.axis))
    batch = Batch(
        unique_ids=requests,
        plans=tuple(stacked),
        paths=tuple(ordered_paths),
        treedef=treedef,
    )
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def _local(tree: Any) -> Any:
    return jax.tree.map(lambda x: x[0], tree)


def _fetch_rows(table_shard: jax.Array, requests: jax.Array, axis: str) -> jax.Array:
    """Rows for this device's ``[N, K]`` requests (grouped by owner), as ``[N * K, D]``."""
    asked = jax.lax.all_to_all(requests, axis, 0, 0, tiled=True)  # [N(requester), K]
    rows = gather_rows(table_shard, asked)  # the sentinel rows_per_shard gives zeros
    back = jax.lax.all_to_all(rows, axis, 0, 0, tiled=True)  # [N(owner), K, D]
    return back.reshape(-1, table_shard.shape[1])


def partition_specs(emb, tree: dict[str, Any]) -> dict[str, Any]:
    """PartitionSpecs of a per-group state pytree (tables or slots): leaves shaped like the
    group's physical array are sharded over the mesh axis, the rest replicated."""
    specs = {}
    for group, sub in tree.items():
        first = emb.plan.groups[group][0]
        shape = (first.physical_rows, first.dim)

        def spec(leaf, first=first, shape=shape):
            sharded = first.strategy != "replicated" and tuple(np.shape(leaf)) == shape
            dims = [None] * np.ndim(leaf)
            if sharded:
                dims[0] = emb.plan.axis
            return P(*dims)

        specs[group] = jax.tree.map(spec, sub)
    return specs


def _local_rows(emb, tables, requests) -> dict[str, jax.Array]:
    rows = {}
    for group, req in requests.items():
        if emb.plan.groups[group][0].strategy != "replicated":
            rows[group] = _fetch_rows(tables[group], req[0], emb.plan.axis)
        else:
            rows[group] = gather_rows(tables[group], req[0])
    return rows


def _local_combine(emb, rows, batch_paths, plans) -> list[jax.Array]:
    return [
        combine_rows(rows[emb.plan[emb.table_names[emb._features[path].table]].group], _local(plan))
        for path, plan in zip(batch_paths, plans, strict=True)
    ]


def lookup_sharded(emb, state, batch) -> Any:
    """Activations of a sharded batch (global arrays, batch-sharded)."""
    axis = emb.plan.axis

    def body(tables, requests, plans):
        return _local_combine(emb, _local_rows(emb, tables, requests), batch.paths, plans)

    outs = jax.shard_map(
        body,
        mesh=emb.mesh,
        in_specs=(partition_specs(emb, state.tables), P(axis), P(axis)),
        out_specs=[P(axis)] * len(batch.paths),
        check_vma=False,
    )(state.tables, batch.unique_ids, batch.plans)
    return jax.tree_util.tree_unflatten(batch.treedef, outs)


def _batch_sharded(x: jax.Array, mesh: jax.sharding.Mesh, axis: str) -> jax.Array:
    """``x`` laid out batch-sharded over ``axis`` (the layout the shard_map bodies expect)."""
    sharding = NamedSharding(mesh, P(axis))
    if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def apply_gradients_sharded(emb, state, batch, cotangents: list[jax.Array]):
    """New tables and slots: owners update their rows with the summed gradients."""
    axis = emb.plan.axis

    def body(tables, slots, step, requests, plans, cots):
        capacity = {group: int(np.prod(req.shape[1:])) for group, req in requests.items()}
        zeros = {name: jnp.zeros((c, tables[name].shape[1])) for name, c in capacity.items()}
        # combine_rows is linear in the rows, so its VJP does not depend on their values.
        _, vjp = jax.vjp(lambda r: _local_combine(emb, r, batch.paths, plans), zeros)
        (row_grads,) = vjp(list(cots))
        new_tables, new_slots = dict(tables), dict(slots)
        for name, req in requests.items():  # one physical array (group) at a time
            placement = emb.plan.groups[name][0]
            if placement.strategy != "replicated":
                ids = jax.lax.all_to_all(req[0], axis, 0, 0, tiled=True).reshape(-1)
                grads = row_grads[name].reshape(req.shape[1], req.shape[2], -1)
                grads = jax.lax.all_to_all(grads, axis, 0, 0, tiled=True)
                fill = placement.rows_per_shard
            else:
                ids = jax.lax.all_gather(req[0], axis, tiled=True)
                grads = jax.lax.all_gather(row_grads[name], axis, tiled=True)
                fill = placement.vocabulary_size
            grads = grads.reshape(ids.shape[0], -1)
            distinct, inverse = jnp.unique(
                ids, size=ids.shape[0], fill_value=fill, return_inverse=True
            )
            summed = jax.ops.segment_sum(grads, inverse.reshape(-1), num_segments=ids.shape[0])
            new_tables[name], new_slots[name] = apply_rows(
                emb._optimizer_of(name), tables[name], slots[name], distinct, summed, step
            )
        return new_tables, new_slots

    cotangents = [_batch_sharded(c, emb.mesh, axis) for c in cotangents]
    table_specs, slot_specs = partition_specs(emb, state.tables), partition_specs(emb, state.slots)
    return jax.shard_map(
        body,
        mesh=emb.mesh,
        in_specs=(table_specs, slot_specs, P(), P(axis), P(axis), [P(axis)] * len(cotangents)),
        out_specs=(table_specs, slot_specs),
        check_vma=False,
    )(state.tables, state.slots, state.step, batch.unique_ids, batch.plans, cotangents)
