"""``Embedding``: tables, optimizer slots, host preprocessing, lookup and row-sparse training.

The object holds only configuration; all state lives in an ``EmbeddingState`` pytree and every
method that touches arrays is a pure function of its arguments, so ``lookup`` and
``apply_gradients`` run inside the user's own ``jax.jit`` step beside an Optax update of the
dense model.

One path for every placement. The tables live on a mesh (a one-device mesh without ``mesh=``),
each physical array with the ``Layout`` the plan gave it (``layouts.py``). ``preprocess``
(``batch.py``, host) splits the batch over the mesh's devices and routes each device's ids;
``lookup`` runs one ``shard_map`` in which each layout brings the requested rows (in place when
nothing travels) and each device combines its own examples exactly as ``embedding_lookup`` does;
``apply_gradients`` runs one ``shard_map`` in which each layout sums ``coeff * dL/dact`` per
requested row (the transpose of the combination), takes the sums to the rows' owners and runs
the table's optimizer once per touched row (TF's TPU gradient). On CPU the row traffic runs in
the kernels of ``_kernels.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxembed import _nest
from jaxembed import batch as _batch
from jaxembed.batch import Batch
from jaxembed.configs import FeatureConfig, TableConfig
from jaxembed.layouts import Layout
from jaxembed.lookup import combine_rows, feature_paths, slot_cotangents
from jaxembed.optimizers import Optimizer
from jaxembed.sharding import ShardingPlan, plan_sharding


class EmbeddingState(NamedTuple):
    """Training state: one physical array per layout, its optimizer slots, the step count.

    The fields mean the same on any mesh; ``emb.embedding_tables(state)`` and
    ``emb.logical_slots(state)`` give logical row order.

    Attributes:
        tables: ``{array name: physical array}``: the array name is the table's name, or for
            table-wise tables stacked together the name of their group; the array is laid out
            as ``emb.plan.layout(name)`` says (the logical ``[vocabulary_size, dim]`` table
            itself for a row-wise or replicated table on one device) and sharded on the mesh.
        slots: ``{array name: slots}``: ``{slot name: array}`` for TF optimizers, the Optax
            state for ``from_optax``, ``{}`` without an optimizer; table-shaped leaves are laid
            out like the array.
        step: int32 scalar, the number of ``apply_gradients`` calls so far.
    """

    tables: dict[str, Any]  # jax.Array, or jax.ShapeDtypeStruct from abstract_state
    slots: dict[str, Any]
    step: Any


def _one_device_mesh() -> jax.sharding.Mesh:
    """The trivial mesh: this process's default device."""
    return jax.sharding.Mesh(
        np.asarray(jax.local_devices()[:1]), ("devices",), (jax.sharding.AxisType.Auto,)
    )


def _constrain(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """``x`` laid out as ``sharding`` inside a traced function (the layout shard_map expects)."""
    if all(t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


class Embedding:
    """Embedding tables for a nested ``feature_config``, trained with row-sparse optimizers.

    Tables are ordered by first appearance in ``feature_config`` (``tf.nest`` order) and named
    ``TableConfig.name`` or ``table_{i}``; configs are never modified. Each table uses its own
    ``TableConfig.optimizer`` if set, else ``optimizer``.

    Args:
        feature_config: Nested structure (dicts, lists, tuples) of ``FeatureConfig``.
        optimizer: Global optimizer from ``jaxembed.optimizers`` (or ``from_optax``); None allows
            lookups only.
        mesh: Any ``jax.sharding.Mesh``: the batch is split over all its devices and the tables
            over ``table_axes``. None: this process's default device (a one-device mesh).
        sharding: ``{table name: "row" | "table" | "column" | "replicated"}`` overrides of the
            plan's choice (``emb.plan``).
        table_axes: The mesh axes the tables are split over (None: all); tables are replicated
            over the other axes.

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
        table_axes: Sequence[str] | None = None,
    ):
        self.feature_config = feature_config
        self.features: dict[str, FeatureConfig] = feature_paths(feature_config)
        if not self.features:
            raise ValueError("feature_config has no FeatureConfig leaves.")
        self.table_configs: tuple[TableConfig, ...] = tuple(
            dict.fromkeys(f.table for f in self.features.values())
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
        self.mesh: jax.sharding.Mesh = mesh if mesh is not None else _one_device_mesh()
        self.plan: ShardingPlan = plan_sharding(
            self.table_names, self.mesh, sharding, optimizers=self.optimizers, table_axes=table_axes
        )

    def __repr__(self) -> str:
        tables = ", ".join(
            f"{n}[{t.vocabulary_size}x{t.dim}]:{type(self.optimizers[n]).__name__}"
            for t, n in self.table_names.items()
        )
        return f"Embedding(features={len(self.features)}, tables=({tables}))"

    # -- state --
    def init(self, key: jax.Array) -> EmbeddingState:
        """Tables from their initializers, slots at their initial values, step 0."""
        keys = jax.random.split(key, len(self.table_configs))
        tables = {
            name: table.init_table(k)
            for k, (table, name) in zip(keys, self.table_names.items(), strict=True)
        }
        return self.state_from_logical(tables)

    def optimizer_of(self, array: str) -> Optimizer | None:
        """The optimizer of a physical array (a table, or a group of stacked tables)."""
        return self.optimizers[self.plan.layout(array).tables[0].name]

    def _specs(self, tree: Mapping[str, Any]) -> dict[str, Any]:
        """PartitionSpecs of a ``{array name: pytree}`` of tables or slots, per its layout."""
        specs = {}
        for name, sub in tree.items():
            layout = self.plan.layout(name)
            specs[name] = jax.tree.map(lambda leaf, lay=layout: lay.spec(np.shape(leaf)), sub)
        return specs

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
        physical, physical_slots = {}, {}
        for layout in self.plan.layouts:
            physical[layout.name] = layout.to_physical(tables)
            opt = self.optimizer_of(layout.name)
            if slots is not None:
                physical_slots[layout.name] = _physical_slots(layout, slots)
            else:
                physical_slots[layout.name] = (
                    opt.init_slots(physical[layout.name]) if opt is not None else {}
                )
        physical_slots = {n: jax.tree.map(jnp.asarray, sub) for n, sub in physical_slots.items()}

        def put(x, spec):  # host value -> global array (works across processes)
            sharding = NamedSharding(self.mesh, spec)
            if isinstance(x, jax.core.Tracer):  # e.g. jax.jit(emb.init)
                return _constrain(x, sharding)
            if jax.process_count() == 1:  # device to device, no host copy of the tables
                return jax.device_put(x, sharding)
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        def place(tree):  # a comprehension (not tree.map) keeps the tables in TF's order
            specs = self._specs(tree)
            return {name: jax.tree.map(put, sub, specs[name]) for name, sub in tree.items()}

        return EmbeddingState(
            place(physical), place(physical_slots), put(jnp.asarray(step, jnp.int32), P())
        )

    def logical_slots(self, state: EmbeddingState) -> dict[str, Any]:
        """``{table name: slots}`` with every table-shaped slot leaf in logical row order.

        Unlike ``slot_variables`` this keeps the whole slot pytree (e.g. an Optax state's step
        count), so ``state_from_logical`` can rebuild the state on any mesh.
        """
        out = {}
        for name in self.table_names.values():
            layout = self.plan.layout(name)

            def logical(leaf, name=name, layout=layout):
                if tuple(np.shape(leaf)) != layout.physical_shape:
                    return leaf
                return layout.to_logical(leaf, name)

            out[name] = jax.tree.map(logical, state.slots[layout.name])
        return out

    def abstract_state(self) -> EmbeddingState:
        """``init``'s state as ``jax.ShapeDtypeStruct``s with their shardings; allocates nothing.

        Useful to compile a step ahead of time or as a restore target.
        """
        tables, slots = {}, {}
        for layout in self.plan.layouts:
            tables[layout.name] = jax.ShapeDtypeStruct(layout.physical_shape, jnp.float32)
            opt = self.optimizer_of(layout.name)
            slots[layout.name] = (
                jax.eval_shape(opt.init_slots, tables[layout.name]) if opt is not None else {}
            )

        def placed(tree):
            specs = self._specs(tree)

            def struct(x, spec):
                return jax.ShapeDtypeStruct(
                    x.shape, x.dtype, sharding=NamedSharding(self.mesh, spec)
                )

            return {name: jax.tree.map(struct, sub, specs[name]) for name, sub in tree.items()}

        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(self.mesh, P()))
        return EmbeddingState(placed(tables), placed(slots), step)

    def embedding_tables(self, state: EmbeddingState) -> dict[TableConfig, jax.Array]:
        """``{TableConfig: [vocabulary_size, dim] array}``, in logical row order."""
        out = {}
        for table, name in self.table_names.items():
            layout = self.plan.layout(name)
            out[table] = layout.to_logical(state.tables[layout.name], name)
        return out

    def slot_variables(self, state: EmbeddingState) -> dict[TableConfig, dict[str, jax.Array]]:
        """``{TableConfig: {slot name: array}}``; Optax state leaves are named by their path."""
        out = {}
        for table, name in self.table_names.items():
            layout = self.plan.layout(name)
            slots = state.slots[layout.name]
            if isinstance(slots, Mapping) and all(isinstance(k, str) for k in slots):
                named = dict(slots)
            else:
                named = {
                    jax.tree_util.keystr(path): leaf
                    for path, leaf in jax.tree_util.tree_leaves_with_path(slots)
                    if tuple(np.shape(leaf)) == layout.physical_shape
                }
            out[table] = {k: layout.to_logical(v, name) for k, v in named.items()}
        return out

    # -- host side --
    def preprocess(self, inputs: Any, weights: Any = None) -> Batch:
        """Validates ``inputs`` (and ``weights``) on the host and builds a static-shape ``Batch``.

        Same input rules and errors as ``embedding_lookup`` (out-of-range ids name the feature,
        the id and the range). Each feature's examples are split evenly over the mesh's devices
        (in a multi-process run, pass this process's slice of the global batch). Sizes that
        vary between batches (distinct ids per table, ids per example) are padded to bucketed
        sizes, so a jitted step compiles once per bucket.
        """
        return _batch.preprocess(
            inputs, weights, self.feature_config, self.plan, self.table_names, self.mesh
        )

    # -- device side (pure) --
    def _layout_of_path(self, path: str) -> Layout:
        return self.plan.layout(self.table_names[self.features[path].table])

    def _batch_spec(self) -> P:
        return P(self.plan.batch_axes)

    def lookup(self, state: EmbeddingState, batch: Batch) -> Any:
        """Activations for ``batch``, nested like its inputs; equal to ``embedding_lookup``."""

        def body(tables, requests, plans):
            sources = {
                name: self.plan.layout(name).rows(tables[name], req[0])
                for name, req in requests.items()
            }
            return [
                combine_rows(rows, _batch.local(plan), ids=ids)
                for path, plan in zip(batch.paths, plans, strict=True)
                for rows, ids in [sources[self._layout_of_path(path).name]]
            ]

        spec = self._batch_spec()
        outs = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(self._specs(state.tables), spec, spec),
            out_specs=[spec] * len(batch.paths),
            check_vma=False,
        )(state.tables, batch.requests, batch.plans)
        return jax.tree_util.tree_unflatten(batch.treedef, outs)

    def _cotangents(self, batch: Batch, grads: Any) -> list[jax.Array]:
        flat = dict(_nest.flatten_with_paths(grads))
        if set(flat) != set(batch.paths):
            raise ValueError(
                "Gradients must have the structure of the activations: expected paths "
                f"{sorted(batch.paths)}, got {sorted(flat)}. Pass dL/d(activations) as returned "
                "by jax.grad with respect to the output of Embedding.lookup."
            )
        cots = []
        devices = self.mesh.size
        sharding = NamedSharding(self.mesh, self._batch_spec())
        for path, plan in zip(batch.paths, batch.plans, strict=True):
            dim = self.features[path].table.dim
            shape = (plan.shape[0] * devices, *plan.shape[1:], dim)
            g = flat[path]
            if g is None:  # TF: a missing gradient is a zero gradient
                g = jnp.zeros(shape, jnp.float32)
            elif tuple(np.shape(g)) != shape:
                raise ValueError(
                    f"Gradient for feature {path!r} has shape {tuple(np.shape(g))}, but its "
                    f"activation has shape {shape}."
                )
            cots.append(_constrain(jnp.asarray(g, jnp.float32), sharding))
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

        def body(tables, slots, step, requests, plans, cots):
            parts: dict[str, list] = {name: [] for name in requests}
            for path, plan, cot in zip(batch.paths, plans, cots, strict=True):
                parts[self._layout_of_path(path).name].append(
                    slot_cotangents(_batch.local(plan), cot)
                )
            new_tables, new_slots = dict(tables), dict(slots)
            for name, req in requests.items():
                optimizer = self.optimizer_of(name)
                assert optimizer is not None
                new_tables[name], new_slots[name] = self.plan.layout(name).apply_gradients(
                    optimizer, tables[name], slots[name], step, req[0], parts[name]
                )
            return new_tables, new_slots

        spec = self._batch_spec()
        table_specs, slot_specs = self._specs(state.tables), self._specs(state.slots)
        tables, slots = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(table_specs, slot_specs, P(), spec, spec, [spec] * len(cotangents)),
            out_specs=(table_specs, slot_specs),
            check_vma=False,
        )(state.tables, state.slots, state.step, batch.requests, batch.plans, cotangents)
        return EmbeddingState(tables, slots, state.step + 1)


def _physical_slots(layout: Layout, slots: Mapping[str, Any]) -> Any:
    """One array's slot pytree from its tables' logical slot pytrees."""
    names = [t.name for t in layout.tables]

    def combine(*leaves):
        if np.ndim(leaves[0]) != 2:  # scalar state (e.g. an optax count): shared
            return leaves[0]
        return layout.to_physical(dict(zip(names, leaves, strict=True)))

    return jax.tree.map(combine, *[slots[n] for n in names])
