"""``Embedding``: tables, optimizer slots, host preprocessing, lookup and row-sparse training.

The object holds only configuration; all state lives in an ``EmbeddingState`` pytree and every
method that touches arrays is a pure function of its arguments, so ``lookup`` and
``apply_gradients`` run inside the user's own ``jax.jit`` step beside an Optax update of the
dense model.

``preprocess`` (host, numpy) validates the inputs with TF's rules and turns them into a ``Batch``
of static-shape arrays: per table, the distinct ids the batch touches (padded to a bucketed
capacity), and per feature a ``LookupPlan`` whose slots index those distinct rows. ``lookup``
sums each example's slots through those ids exactly as ``embedding_lookup`` does.
``apply_gradients`` sums ``coeff * dL/dact`` over every use of a row in the global batch (TF's
TPU gradient) and runs each table's optimizer once per touched row. On CPU both are kernels
(``_kernels.py``) that read and update the touched rows in place; elsewhere they are JAX ops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import _nest
from jaxembed.configs import TableConfig
from jaxembed.lookup import (
    LookupPlan,
    bucket,
    combine_rows,
    feature_paths,
    flatten_features,
    pad_axis,
    plan_feature,
    remap_plan,
    slot_bucket,
    slot_cotangents,
)
from jaxembed.optimizers import Optimizer, apply_slot_gradients
from jaxembed.sharding import ShardingPlan, plan_sharding, to_logical, to_physical


class EmbeddingState(NamedTuple):
    """Training state: tables and slots keyed by table name, and the step count.

    Attributes:
        tables: ``{table name: [vocabulary_size, dim] array}``, logical row order.
        slots: ``{table name: slots}``: ``{slot name: array}`` for TF optimizers, the Optax state
            for ``from_optax``, ``{}`` without an optimizer.
        step: int32 scalar, the number of ``apply_gradients`` calls so far.
    """

    tables: dict[str, jax.Array]
    slots: dict[str, Any]
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class Batch:
    """A preprocessed batch: static-shape arrays, ready for ``lookup``/``apply_gradients``.

    Attributes:
        unique_ids: the rows to fetch. Without a mesh: ``{table name: [C] int32}`` distinct
            ids touched, padded with ``vocabulary_size`` to a bucketed capacity ``C``. With a
            mesh: ``{group: [devices, N, K]}`` local rows each device requests of each owner
            (``[devices, C]`` ids for replicated tables); see ``sharded.py``.
        plans: one ``LookupPlan`` per input leaf; slots index the fetched rows of its table
            (``C`` = no entry); with a mesh, every array has a leading device axis.
        paths: the input paths, in the order of ``plans`` (static).
        treedef: the inputs' nested structure (static), to pack the activations.
    """

    unique_ids: dict[str, jax.Array]
    plans: tuple[LookupPlan, ...]
    paths: tuple[str, ...]
    treedef: Any


jax.tree_util.register_dataclass(
    Batch, data_fields=["unique_ids", "plans"], meta_fields=["paths", "treedef"]
)


def _remap(plan: LookupPlan, index: np.ndarray, capacity: int) -> LookupPlan:
    """``remap_plan`` with the head and tail of this plan rounded up to bucketed sizes."""
    head = tail = 0
    if plan.mode == "combine":
        head = slot_bucket(plan.positions.shape[1])
        tail = bucket(plan.blocks.shape[1]) if plan.blocks.shape[1] else 0
    return remap_plan(plan, index, capacity, head, tail)


class Embedding:
    """Embedding tables for a nested ``feature_config``, trained with row-sparse optimizers.

    Tables are ordered by first appearance in ``feature_config`` (``tf.nest`` order) and named
    ``TableConfig.name`` or ``table_{i}``; configs are never modified. Each table uses its own
    ``TableConfig.optimizer`` if set, else ``optimizer``.

    Args:
        feature_config: Nested structure (dicts, lists, tuples) of ``FeatureConfig``.
        optimizer: Global optimizer from ``jaxembed.optimizers`` (or ``from_optax``); None allows
            lookups only.
        mesh: A 1-D ``jax.sharding.Mesh`` to shard tables (and the batch) over, or None for the
            default device. ``emb.plan`` is then the ``ShardingPlan``.
        sharding: ``{table name: "row" | "replicated"}`` overrides of the plan's choice.

    Example:
        >>> import jax, numpy as np, jaxembed as je
        >>> table = je.TableConfig(vocabulary_size=10, dim=4, combiner="sum", name="items")
        >>> emb = je.Embedding({"items": je.FeatureConfig(table)}, je.optimizers.Adagrad(0.1))
        >>> state = emb.init(jax.random.key(0))
        >>> batch = emb.preprocess({"items": je.Ragged.from_row_lengths([1, 2, 2], [2, 1])})
        >>> acts = emb.lookup(state, batch)
        >>> acts["items"].shape
        (2, 4)
        >>> state = emb.apply_gradients(state, batch, {"items": np.ones((2, 4), np.float32)})
        >>> int(state.step)
        1
    """

    def __init__(
        self,
        feature_config: Any,
        optimizer: Optimizer | None = None,
        mesh: jax.sharding.Mesh | None = None,
        sharding: Mapping[str, str] | None = None,
    ):
        self.feature_config = feature_config
        self.mesh = mesh
        self._features = feature_paths(feature_config)
        if not self._features:
            raise ValueError("feature_config has no FeatureConfig leaves.")
        self.table_configs: tuple[TableConfig, ...] = tuple(
            dict.fromkeys(f.table for f in self._features.values())
        )
        self.table_names: dict[TableConfig, str] = {}
        for i, table in enumerate(self.table_configs):
            name = table.name if table.name is not None else f"table_{i}"
            if name in self.table_names.values():
                raise ValueError(
                    f"Tables must have a unique name. Multiple tables with name {name!r} found. "
                    "Give each TableConfig a distinct name."
                )
            self.table_names[table] = name
        self._configs = {name: table for table, name in self.table_names.items()}
        self.optimizers: dict[str, Optimizer | None] = {}
        for table, name in self.table_names.items():
            opt = table.optimizer if table.optimizer is not None else optimizer
            if opt is not None and not isinstance(opt, Optimizer):
                hint = (
                    " Wrap Optax transformations with je.optimizers.from_optax(tx)."
                    if hasattr(opt, "update") and hasattr(opt, "init")
                    else ""
                )
                raise ValueError(
                    f"{type(opt)} is an unsupported optimizer class (table {name!r}). Please pass "
                    f"an instance of one of the optimizer classes under jaxembed.optimizers.{hint}"
                )
            self.optimizers[name] = opt
        self.plan: ShardingPlan | None = None
        if mesh is not None:
            self.plan = plan_sharding(self.table_names, mesh, sharding, optimizers=self.optimizers)
        elif sharding:
            raise ValueError("`sharding` needs a `mesh`; pass mesh=jax.make_mesh(...).")

    def __repr__(self) -> str:
        tables = ", ".join(
            f"{n}[{t.vocabulary_size}x{t.dim}]:{type(self.optimizers[n]).__name__}"
            for t, n in self.table_names.items()
        )
        return f"Embedding(features={len(self._features)}, tables=({tables}))"

    # -- state --
    def init(self, key: jax.Array) -> EmbeddingState:
        """Tables from their initializers, slots at their initial values, step 0."""
        keys = jax.random.split(key, len(self.table_configs))
        tables = {
            name: table.init_table(k)
            for k, (table, name) in zip(keys, self.table_names.items(), strict=True)
        }
        return self.state_from_logical(tables)

    def state_from_logical(
        self,
        tables: Mapping[str, Any],
        slots: Mapping[str, Any] | None = None,
        step: Any = 0,
    ) -> EmbeddingState:
        """Builds a state from logical-order arrays, laid out and placed for this ``Embedding``.

        Args:
            tables: ``{table name: [vocabulary_size, dim] array}``.
            slots: ``{table name: slots}`` in logical order (as ``logical_slots`` returns), or
                None for fresh slots at their initial values.
            step: the step count.
        """
        tables = {n: jnp.asarray(t, jnp.float32) for n, t in tables.items()}
        if self.plan is not None:  # one physical array per group, whatever the mesh size
            groups = self.plan.groups
            if slots is not None:
                slots = {g: self._physical_slots(m, slots) for g, m in groups.items()}
            tables = {g: to_physical(tables, m) for g, m in groups.items()}
        if slots is None:
            slots = {}
            for name, array in tables.items():
                opt = self._optimizer_of(name)
                slots[name] = opt.init_slots(array) if opt is not None else {}
        # Dict comprehensions (not tree.map) keep the tables in TF's table order.
        slots = {name: jax.tree.map(jnp.asarray, sub) for name, sub in slots.items()}
        state = EmbeddingState(tables, slots, jnp.asarray(step, jnp.int32))
        if self.plan is None:
            return state
        from jaxembed.sharded import partition_specs

        def put(x, spec):  # host value -> global array (works across processes)
            host = np.asarray(x)
            sharding = jax.sharding.NamedSharding(self.mesh, spec)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        def place(tree):
            specs = partition_specs(self, tree)
            return {name: jax.tree.map(put, sub, specs[name]) for name, sub in tree.items()}

        return EmbeddingState(
            place(state.tables), place(state.slots), put(state.step, jax.sharding.PartitionSpec())
        )

    @staticmethod
    def _physical_slots(members, slots: Mapping[str, Any]) -> Any:
        """One group's slot pytree from its members' logical slot pytrees."""
        names = [m.name for m in members]

        def combine(*leaves):
            if np.ndim(leaves[0]) != 2:  # scalar state (e.g. an optax count): shared
                return leaves[0]
            return to_physical(dict(zip(names, leaves, strict=True)), members)

        return jax.tree.map(combine, *[slots[n] for n in names])

    def logical_slots(self, state: EmbeddingState) -> dict[str, Any]:
        """``{table name: slots}`` with every table-shaped slot leaf in logical row order.

        Unlike ``slot_variables`` this keeps the whole slot pytree (e.g. an Optax state's step
        count), so ``state_from_logical`` can rebuild the state on any mesh.
        """
        out = {}
        for name in self.table_names.values():
            array = self._array_of(name)
            shape = np.shape(state.tables[array])

            def logical(leaf, name=name, shape=shape):
                return self._logical(name, leaf) if np.shape(leaf) == shape else leaf

            out[name] = jax.tree.map(logical, state.slots[array])
        return out

    def abstract_state(self) -> EmbeddingState:
        """``init``'s state as ``jax.ShapeDtypeStruct``s with their shardings; allocates nothing.

        Useful to compile a step ahead of time or as a restore target.
        """
        if self.plan is None:
            shapes = {n: (t.vocabulary_size, t.dim) for t, n in self.table_names.items()}
        else:
            shapes = {g: (m[0].physical_rows, m[0].dim) for g, m in self.plan.groups.items()}
        tables, slots = {}, {}
        for name, shape in shapes.items():
            tables[name] = jax.ShapeDtypeStruct(shape, jnp.float32)
            opt = self._optimizer_of(name)
            slots[name] = jax.eval_shape(opt.init_slots, tables[name]) if opt is not None else {}
        state = EmbeddingState(tables, slots, jax.ShapeDtypeStruct((), jnp.int32))
        if self.plan is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, state)
        else:
            from jaxembed.sharded import partition_specs

            def named(spec):
                return jax.sharding.NamedSharding(self.mesh, spec)

            shardings = EmbeddingState(
                jax.tree.map(named, partition_specs(self, tables)),
                jax.tree.map(named, partition_specs(self, slots)),
                named(jax.sharding.PartitionSpec()),
            )
        return jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, shardings
        )

    def _optimizer_of(self, array_name: str) -> Optimizer | None:
        """The optimizer of a state array (a table, or a group of stacked tables)."""
        if self.plan is not None:
            array_name = self.plan.groups[array_name][0].name
        return self.optimizers[array_name]

    def _array_of(self, name: str) -> str:
        """The state key holding table ``name`` (its group's name with a mesh)."""
        return name if self.plan is None else self.plan[name].group

    def embedding_tables(self, state: EmbeddingState) -> dict[TableConfig, jax.Array]:
        """``{TableConfig: [vocabulary_size, dim] array}``, in logical row order."""
        return {
            table: self._logical(name, state.tables[self._array_of(name)])
            for table, name in self.table_names.items()
        }

    def _logical(self, name: str, array: jax.Array) -> jax.Array:
        if self.plan is None:
            return array
        return to_logical(array, self.plan[name])

    def slot_variables(self, state: EmbeddingState) -> dict[TableConfig, dict[str, jax.Array]]:
        """``{TableConfig: {slot name: array}}``; Optax state leaves are named by their path."""
        out = {}
        for table, name in self.table_names.items():
            array = self._array_of(name)
            slots, shape = state.slots[array], np.shape(state.tables[array])
            if isinstance(slots, Mapping) and all(isinstance(k, str) for k in slots):
                named = dict(slots)
            else:
                named = {
                    jax.tree_util.keystr(path): leaf
                    for path, leaf in jax.tree_util.tree_leaves_with_path(slots)
                    if np.shape(leaf) == shape
                }
            out[table] = {k: self._logical(name, v) for k, v in named.items()}
        return out

    # -- host side --
    def preprocess(self, inputs: Any, weights: Any = None) -> Batch:
        """Validates ``inputs`` (and ``weights``) on the host and builds a static-shape ``Batch``.

        Same input rules and errors as ``embedding_lookup`` (out-of-range ids name the feature,
        the id and the range). Sizes that vary between batches (distinct ids per table, ids per
        example) are padded to powers of two, so a jitted step compiles once per bucket.
        """
        if self.plan is not None:
            from jaxembed.sharded import preprocess_sharded

            return preprocess_sharded(self, inputs, weights)
        leaves = flatten_features(inputs, weights, self.feature_config)
        plans = {
            path: plan_feature(path, inp, weight, feature) for path, inp, weight, feature in leaves
        }
        unique_ids, index = {}, {}
        for table, name in self.table_names.items():
            paths = [p for p in plans if self._features[p].table is table]
            ids = [np.asarray(plans[p].ids, np.int64) for p in paths]
            flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
            distinct, inverse = np.unique(flat, return_inverse=True)
            capacity = bucket(distinct.shape[0])
            unique_ids[name] = pad_axis(distinct, 0, capacity, table.vocabulary_size).astype(
                np.int32
            )
            splits = np.cumsum([0] + [i.shape[0] for i in ids])
            for p, lo, hi in zip(paths, splits[:-1], splits[1:], strict=True):
                index[p] = (inverse[lo:hi], capacity)
        skeleton = _nest.pack_like(inputs, [path for path, *_ in leaves])
        ordered_paths, treedef = jax.tree_util.tree_flatten(skeleton)
        batch = Batch(
            unique_ids=unique_ids,
            plans=tuple(_remap(plans[p], *index[p]) for p in ordered_paths),
            paths=tuple(ordered_paths),
            treedef=treedef,
        )
        return jax.device_put(batch)

    # -- device side (pure) --
    def _table_of(self, path: str) -> str:
        return self.table_names[self._features[path].table]

    def lookup(self, state: EmbeddingState, batch: Batch) -> Any:
        """Activations for ``batch``, nested like its inputs; equal to ``embedding_lookup``."""
        if self.plan is not None:
            from jaxembed.sharded import lookup_sharded

            return lookup_sharded(self, state, batch)
        outs = [
            combine_rows(state.tables[name], plan, ids=batch.unique_ids[name])
            for path, plan in zip(batch.paths, batch.plans, strict=True)
            for name in [self._table_of(path)]
        ]
        return jax.tree_util.tree_unflatten(batch.treedef, outs)

    def _cotangents(self, batch: Batch, grads: Any) -> Any:
        flat = dict(_nest.flatten_with_paths(grads))
        if set(flat) != set(batch.paths):
            raise ValueError(
                "Gradients must have the structure of the activations: expected paths "
                f"{sorted(batch.paths)}, got {sorted(flat)}. Pass dL/d(activations) as returned "
                "by jax.grad with respect to the output of Embedding.lookup."
            )
        cots = []
        shards = 1 if self.plan is None else self.plan.num_shards
        for path, plan in zip(batch.paths, batch.plans, strict=True):
            table = self._features[path].table
            shape = (
                (plan.shape[0] * shards, *plan.shape[1:], table.dim) if plan.shape else (table.dim,)
            )
            g = flat[path]
            if g is None:  # TF: a missing gradient is a zero gradient
                cots.append(jnp.zeros(shape, jnp.float32))
                continue
            if tuple(np.shape(g)) != shape:
                raise ValueError(
                    f"Gradient for feature {path!r} has shape {tuple(np.shape(g))}, but its "
                    f"activation has shape {shape}."
                )
            cots.append(jnp.asarray(g, jnp.float32))
        return cots

    def apply_gradients(self, state: EmbeddingState, batch: Batch, grads: Any) -> EmbeddingState:
        """Applies ``grads`` (dL/d activations, nested like them) to the touched rows.

        Per row ``g = sum(coeff * dL/dact)`` over the global batch (sum, not mean; coeff = w,
        w/sum(w) or w/sqrt(sum(w^2)) for sum/mean/sqrtn, 1 for sequence positions and dense
        ids), then each table's optimizer runs once on each touched row.

        Inside a jitted step with the state donated, the tables and slots are updated in place
        (on CPU by one kernel pass over the touched rows), so a step costs the same at any
        vocabulary size. XLA can do that only when the update is known to come after this
        step's ``lookup``, which holds whenever ``grads`` depend on the activations (any
        nonlinear model); with gradients that do not, XLA copies each table first.
        """
        missing = [n for n, opt in self.optimizers.items() if opt is None]
        if missing:
            raise ValueError(
                f"Tables {missing} have no optimizer: pass one to Embedding(..., optimizer=...) "
                "or set TableConfig.optimizer."
            )
        cotangents = self._cotangents(batch, grads)
        if self.plan is not None:
            from jaxembed.sharded import apply_gradients_sharded

            tables, slots = apply_gradients_sharded(self, state, batch, cotangents)
            return EmbeddingState(tables, slots, state.step + 1)
        parts: dict[str, list] = {name: [] for name in batch.unique_ids}
        for path, plan, cot in zip(batch.paths, batch.plans, cotangents, strict=True):
            parts[self._table_of(path)].append(slot_cotangents(plan, cot))
        tables, slots = dict(state.tables), dict(state.slots)
        for name, ids in batch.unique_ids.items():
            tables[name], slots[name] = apply_slot_gradients(
                self.optimizers[name], state.tables[name], state.slots[name], ids, parts[name],
                state.step,
            )  # fmt: skip
        return EmbeddingState(tables, slots, state.step + 1)
