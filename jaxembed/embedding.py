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

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxembed import _nest, _reads
from jaxembed import batch as _batch
from jaxembed.batch import Batch
from jaxembed.configs import FeatureConfig, TableConfig
from jaxembed.layouts import Layout
from jaxembed.lookup import (
    check_structure,
    combine_rows,
    feature_paths,
    quantize_source,
    slot_cotangents,
)
from jaxembed.optimizers import Optimizer
from jaxembed.sharding import ShardingPlan, plan_sharding, spread_sharding

NONFINITE_GRADIENTS = ("skip", "raise", "apply")
"""``Embedding(nonfinite_gradients=...)`` policies for gradient rows holding NaN or Inf."""


_GRADIENTS_FIX = (
    "Pass dL/d(activations) as returned by jax.grad with respect to the output of "
    "Embedding.lookup: one array (or None) per feature, nested like feature_config (TF's "
    "TPUEmbedding.apply_gradients checks the same, container types included)."
)


class NonFiniteGradientError(FloatingPointError):
    """Raised (inside a jitted step: carried by ``jax.errors.JaxRuntimeError``) when
    ``apply_gradients`` gets NaN or Inf gradients under ``nonfinite_gradients="raise"``."""


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
            out like the array. On a TPU mesh, the slots the layout stores beside the rows
            (``Layout.beside``) are in the table's array instead; ``emb.slot_variables(state)``
            and ``emb.logical_arrays(state)`` give every slot.
        step: int32 scalar, the number of ``apply_gradients`` calls so far.
        nonfinite: int32 scalar, the number of gradient rows (one example's, or one sequence
            position's, ``dL/d(activation)`` vector) that ``apply_gradients`` dropped so far
            because they held NaN or Inf (``Embedding(nonfinite_gradients="skip")``, the
            default). ``init``, ``abstract_state`` and ``state_from_logical`` set it; None (a
            state built as ``EmbeddingState(tables, slots, step)``) drops such rows uncounted.
            A diagnostic: checkpoints do not store it, so it counts from 0 after a restore.

    Example:
        >>> import jax, jaxembed as je
        >>> table = je.TableConfig(vocabulary_size=10, dim=4, name="items")
        >>> emb = je.Embedding({"items": je.FeatureConfig(table)}, je.optimizers.Adagrad(0.1))
        >>> state = emb.init(jax.random.key(0))
        >>> {name: t.shape for name, t in state.tables.items()}, list(state.slots["items"])
        ({'items': (10, 4)}, ['accumulators'])
        >>> int(state.step), int(state.nonfinite)
        (0, 0)
    """

    tables: dict[str, Any]  # jax.Array, or jax.ShapeDtypeStruct from abstract_state
    slots: dict[str, Any]
    step: Any
    nonfinite: Any = None


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
        nonfinite_gradients: What ``apply_gradients`` does with a gradient row (the
            ``dL/d(activation)`` vector of one example, or of one sequence position) holding
            NaN or Inf. ``"skip"`` (default): the row is dropped, as if its example were not in
            the batch: table rows it touches are updated from the finite rows only, rows only
            it touches do not change (slots included), and ``state.nonfinite`` counts the
            dropped rows over the global batch. ``"raise"``: the step fails with a
            ``NonFiniteGradientError`` naming the features (inside ``jit`` it arrives as a
            ``jax.errors.JaxRuntimeError`` carrying that message; a donated state is then
            lost). ``"apply"``: no check (NaN reaches the rows it touches).

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
        *,
        nonfinite_gradients: str = "skip",
    ):
        if nonfinite_gradients not in NONFINITE_GRADIENTS:
            raise ValueError(
                f"`nonfinite_gradients` must be one of {list(NONFINITE_GRADIENTS)}, got "
                f"{nonfinite_gradients!r}: 'skip' drops gradient rows holding NaN or Inf (and "
                "counts them in state.nonfinite), 'raise' fails the step, 'apply' applies them."
            )
        self.nonfinite_gradients = nonfinite_gradients
        if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(
                f"`mesh` must be a jax.sharding.Mesh or None, got {type(mesh).__name__} "
                f"({mesh!r}); build one with e.g. jax.make_mesh((jax.device_count(),), "
                "('devices',)), or pass None for this process's default device."
            )
        if sharding is not None and not isinstance(sharding, Mapping):
            raise TypeError(
                f"`sharding` must be a mapping {{table name: strategy}} or None, got "
                f"{type(sharding).__name__} ({sharding!r}); e.g. sharding={{'users': 'row'}}."
            )
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
                # TF's exact text (tpu_embedding_base.py / tpu_embedding_v2.py __init__).
                raise ValueError(
                    f"Tables must have a unique name. Multiple tables with name {name} found."
                )
            self.table_names[table] = name
        self.optimizers: dict[str, Optimizer | None] = {}
        for table, name in self.table_names.items():
            opt = table.optimizer if table.optimizer is not None else optimizer
            if opt is not None and not isinstance(opt, Optimizer):
                if isinstance(opt, type) and issubclass(opt, Optimizer):
                    hint = f" Pass an instance, e.g. {opt.__name__}(learning_rate=0.01)."
                elif hasattr(opt, "update") and hasattr(opt, "init"):
                    hint = " Wrap Optax transformations with je.optimizers.from_optax(tx)."
                else:
                    hint = ""
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
        """Tables from their initializers, slots at their initial values, step 0.

        Raises:
            TypeError: If ``key`` is not one PRNG key.
            ValueError: If an initializer returns another shape than ``[vocabulary_size, dim]``,
                a non-float dtype or NaN/Inf, naming the table (``TableConfig.init_table``).
        """
        try:
            keys = jax.random.split(key, len(self.table_configs))
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"Embedding.init expects one PRNG key such as jax.random.key(0), got "
                f"{type(key).__name__} of shape {np.shape(key)} ({err})."
            ) from err
        tables = {
            name: self._initial_table(table, name, k)
            for k, (table, name) in zip(keys, self.table_names.items(), strict=True)
        }
        return self.state_from_logical(tables)

    def _initial_table(self, table: TableConfig, name: str, key: jax.Array) -> jax.Array:
        """``table.init_table(key)`` made where its logical rows live (``logical_sharding``),
        jitted, so that no device builds a whole table it would not hold; an initializer that
        cannot be traced (``init_table`` turns its tracer error into a TypeError) runs eagerly."""
        if isinstance(key, jax.core.Tracer):  # inside jax.jit(emb.init): XLA places it
            return table.init_table(key, name=name)
        sharding = self.logical_sharding(name, (table.vocabulary_size, table.dim))
        try:
            values = _table_initializer(table, name, sharding)(key)
        except TypeError:
            return table.init_table(key, name=name)
        table.check_initial_values(values, name=name)
        return values

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
        nonfinite: Any = 0,
    ) -> EmbeddingState:
        """Builds a state from logical-order arrays, laid out and placed for this ``Embedding``.

        Args:
            tables: ``{table name: [vocabulary_size, dim] array}``.
            slots: ``{table name: slots}`` in logical order (as ``logical_slots`` returns), or
                None for fresh slots at their initial values.
            step: the step count.
            nonfinite: the count of dropped non-finite gradient rows (``EmbeddingState``).

        Raises:
            ValueError: If ``tables`` (or ``slots``) do not name this Embedding's tables, or a
                table is not ``[vocabulary_size, dim]``, naming the table.
        """
        self._check_logical(tables, slots)
        mesh = self.mesh

        def physical_of(layout: Layout, leaves: dict[str, Any]) -> Any:
            """The layout's leaf from its tables' logical leaves, each first split as its table
            is (``logical_sharding``): rows move between devices, none gathers a table."""
            logical = {n: _put(v, self.logical_sharding(n, np.shape(v))) for n, v in leaves.items()}
            rows_only = np.ndim(next(iter(logical.values()))) == 1  # a row-wise slot
            shape = (layout.num_rows,) if rows_only else layout.physical_shape
            return _relayout(layout, None, NamedSharding(mesh, layout.spec(shape)))(logical)

        physical, physical_slots = {}, {}
        for layout in self.plan.layouts:
            names = [t.name for t in layout.tables]
            physical[layout.name] = physical_of(layout, {n: _float32(tables[n]) for n in names})
            if slots is None:
                opt = self.optimizer_of(layout.name)
                physical_slots[layout.name] = _initial_slots(opt, physical, layout, mesh)
                continue

            def combine(*leaves, layout=layout, names=names):
                if np.ndim(leaves[0]) == 0:  # scalar state (e.g. an optax count): shared
                    return leaves[0]
                return physical_of(layout, dict(zip(names, leaves, strict=True)))

            physical_slots[layout.name] = jax.tree.map(combine, *[slots[n] for n in names])

        def place(tree):  # a comprehension (not tree.map) keeps the tables in TF's order
            specs = self._specs(tree)
            return {
                name: jax.tree.map(lambda x, s: _put(x, NamedSharding(mesh, s)), sub, specs[name])
                for name, sub in tree.items()
            }

        for layout in self.plan.layouts:  # slots stored beside the rows move in
            if layout.beside:
                pair = (physical[layout.name], physical_slots[layout.name])
                pair = _laid_out(layout, layout.join, mesh, *pair)
                physical[layout.name], physical_slots[layout.name] = pair
        replicated = NamedSharding(mesh, P())
        return EmbeddingState(
            place(physical),
            place(physical_slots),
            _put(jnp.asarray(step, jnp.int32), replicated),
            _put(jnp.asarray(nonfinite, jnp.int32), replicated),
        )

    def _check_logical(self, tables: Any, slots: Any) -> None:
        """``state_from_logical``'s arguments name this Embedding's tables, each [V, dim]."""
        names = sorted(self.table_names.values())
        for what, given in (("tables", tables), ("slots", slots)):
            if given is None and what == "slots":
                continue
            if not isinstance(given, Mapping) or sorted(given) != names:
                have = sorted(given) if isinstance(given, Mapping) else type(given).__name__
                raise ValueError(
                    f"state_from_logical: `{what}` must map this Embedding's table names {names} "
                    f"to their arrays, got {have}."
                )
        for table, name in self.table_names.items():
            expected = (table.vocabulary_size, table.dim)
            shape = tuple(np.shape(tables[name]))
            if shape != expected:
                raise ValueError(
                    f"state_from_logical: table {name!r} has shape {shape}, expected "
                    f"[vocabulary_size, dim] = {list(expected)}."
                )

    def logical_slots(self, state: EmbeddingState) -> dict[str, Any]:
        """``{table name: slots}`` with every table-shaped slot leaf in logical row order.

        Unlike ``slot_variables`` this keeps the whole slot pytree (e.g. an Optax state's step
        count), so ``state_from_logical`` can rebuild the state on any mesh. The leaves are
        spread over the mesh as ``logical_arrays`` says.
        """
        return self.logical_arrays(state)[1]

    def logical_sharding(self, name: str, shape: Sequence[int]) -> NamedSharding:
        """Where a logical-order array of table ``name`` (``[vocabulary_size, dim]``, a
        ``[vocabulary_size]`` row-wise slot) lives on the mesh: split over the table's shard
        axes as far as ``shape`` allows (``sharding.spread_sharding``), replicated over the
        others, as the table itself is; a replicated table's, over all the axes (each device
        already holds the whole table, so this only divides the writing)."""
        axes = self.plan.layout(name).shard_axes or None
        return spread_sharding(self.mesh, shape, axes)

    def logical_arrays(self, state: EmbeddingState) -> tuple[dict[str, Any], dict[str, Any]]:
        """``({table name: [vocabulary_size, dim]}, {table name: slots})`` in logical row order,
        as a checkpoint stores them, each table-shaped or row-wise leaf split over the devices
        of the table's shard axes (``logical_sharding``): rows move between devices, and no
        device holds more of a table than its layout gives it, give or take the padding
        (``embedding_tables`` gives every device the whole table).
        ``state_from_logical`` takes them back onto any mesh.

        Example:
            >>> import jax, jaxembed as je
            >>> table = je.TableConfig(10, 4, name="items")
            >>> emb = je.Embedding({"items": je.FeatureConfig(table)}, je.optimizers.Adagrad(0.1))
            >>> tables, slots = emb.logical_arrays(emb.init(jax.random.key(0)))
            >>> tables["items"].shape, slots["items"]["accumulators"].shape
            ((10, 4), (10, 4))
        """
        tables, slots = {}, {}
        apart = self._apart(state)
        for table, name in self.table_names.items():
            layout = self.plan.layout(name)

            def logical(leaf, name=name, layout=layout, table=table):
                if not layout.row_aligned(np.shape(leaf)):
                    return leaf
                rows = table.vocabulary_size
                shape = (rows,) if np.ndim(leaf) == 1 else (rows, table.dim)
                # A state placed elsewhere (e.g. built on one device) is laid out first.
                leaf = _put(leaf, NamedSharding(self.mesh, layout.spec(np.shape(leaf))))
                return _relayout(layout, name, self.logical_sharding(name, shape))(leaf)

            table_rows, table_slots = apart[layout.name]
            tables[name] = logical(table_rows)
            slots[name] = jax.tree.map(logical, table_slots)
        return tables, slots

    def _apart(self, state: EmbeddingState) -> dict[str, tuple[jax.Array, Any]]:
        """``{array name: (table, slots)}`` of ``state``, the slots stored beside an array's
        rows as arrays of their own (``Layout.split``), each array split once."""
        out = {}
        for layout in self.plan.layouts:
            pair = state.tables[layout.name], state.slots[layout.name]
            out[layout.name] = (
                _laid_out(layout, layout.split, self.mesh, *pair) if layout.beside else pair
            )
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
                jax.eval_shape(functools.partial(layout.init_slots, opt), tables[layout.name])
                if opt is not None
                else {}
            )
            if layout.beside:
                pair = jax.eval_shape(layout.join, tables[layout.name], slots[layout.name])
                tables[layout.name], slots[layout.name] = pair

        def placed(tree):
            specs = self._specs(tree)

            def struct(x, spec):
                return jax.ShapeDtypeStruct(
                    x.shape, x.dtype, sharding=NamedSharding(self.mesh, spec)
                )

            return {name: jax.tree.map(struct, sub, specs[name]) for name, sub in tree.items()}

        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(self.mesh, P()))
        return EmbeddingState(placed(tables), placed(slots), step, step)

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
        apart = self._apart(state)
        for table, name in self.table_names.items():
            layout = self.plan.layout(name)
            _, slots = apart[layout.name]
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
    def preprocess(
        self, inputs: Any, weights: Any = None, *, batch_size: int | str | None = None
    ) -> Batch:
        """Validates ``inputs`` (and ``weights``) on the host and builds a static-shape ``Batch``.

        TF's ``TPUEmbedding.enqueue`` rules: ``inputs`` (and ``weights``, None leaves for the
        unweighted features) must have the nested structure of ``feature_config``, every
        feature included (``TypeError`` for another container type, ``ValueError`` naming the
        missing paths; ``je.embedding_lookup`` takes a subset). Sparse and ragged inputs follow
        ``embedding_lookup``'s rules and errors; dense ids follow ``TPUEmbedding``
        (``lookup.plan_training_feature``): ``[B]`` and ``[B, 1]`` give ``[B, dim]``
        activations, ``[B, S, 1]`` gives ``[B, S, dim]`` (``embedding_lookup``, like TF's
        ``serving_embedding_lookup``, keeps the 1: ``[B, 1, dim]``), a set ``output_shape``
        reshapes them, a sequence feature accepts them (one id per example, no sequence axis),
        and they take no weights. Dense ``[B, k]`` ids with ``k > 1``, which ``TPUEmbedding``
        refuses, follow ``embedding_lookup`` (``[B, k, dim]``). Out-of-range ids follow each
        feature's ``out_of_range`` policy. Each feature's examples are split evenly over the
        mesh's devices (in a multi-process run, pass this process's slice of the global batch).
        Sizes that vary between batches (distinct ids per table, ids per example) are padded to
        bucketed sizes, so a jitted step compiles once per bucket.

        Args:
            inputs, weights: as for ``embedding_lookup``.
            batch_size: None keeps the batch as given (it must split evenly over the devices).
                An int pads every feature with empty examples to that many (a multiple of the
                device count); ``"bucket"`` pads to the next power of two examples per device,
                so that any batch size runs one of a few compiled programs. The activations then
                have the padded batch; padded examples are all-zero rows and train nothing.
        """
        return _batch.preprocess(
            inputs,
            weights,
            self.feature_config,
            self.plan,
            self.table_names,
            self.mesh,
            batch_size=batch_size,
            owner=self._fingerprint,
        )

    @functools.cached_property
    def _fingerprint(self) -> str:
        """What a ``Batch`` records of the Embedding that built it: its features and plan."""
        features = [
            (path, self.table_names[f.table], f.max_sequence_length, f.output_shape)
            for path, f in self.features.items()
        ]
        text = repr((str(self.plan), features, self.mesh.shape_tuple, self.mesh.axis_names))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _check_batch(self, batch: Batch) -> None:
        if batch.owner != self._fingerprint:
            raise ValueError(
                "This Batch was built by another Embedding (other features, tables, vocabulary "
                f"sizes or mesh; its paths are {list(batch.paths)}). Build it with this "
                "Embedding's preprocess: a Batch's row numbers are only valid for the plan that "
                "made them."
            )

    @functools.cached_property
    def _programs(self) -> dict[tuple[Any, ...], Callable[..., Any]]:
        """The jitted programs of eager calls (``_run``), by kind and batch paths."""
        return {}

    def _run(self, key: tuple[Any, ...], call: Callable[..., Any], args: tuple) -> Any:
        """``call(*args)``: inline inside a trace (the user's ``jit``); otherwise through one
        ``jax.jit`` of ``call`` kept per ``key`` (what ``call`` depends on besides its
        arguments), which compiles once per argument shapes. Op by op, an eager ``shard_map``
        would compile each of its ops again on every call: seconds per call."""
        if _traced(args):
            return call(*args)
        if key not in self._programs:
            self._programs[key] = jax.jit(call)
        return self._programs[key](*args)

    @functools.cached_property
    def _expected_state(self) -> EmbeddingState:
        """``abstract_state()``, computed once: what ``check_state`` compares with."""
        return self.abstract_state()

    def _array_label(self, array: str) -> str:
        """``Table 'users' [1000 x 8, row]`` (or the stacked group and its tables)."""
        layout = self.plan.layout(array)
        tables = ", ".join(f"{t.name!r} [{t.vocabulary_size} x {t.dim}]" for t in layout.tables)
        if len(layout.tables) == 1 and layout.tables[0].name == array:
            return f"Table {tables} ({layout.strategy})"
        return f"Array {array!r} (tables {tables}, {layout.strategy})"

    def check_state(self, state: Any, *, slots: bool = True) -> None:
        """Raises if ``state`` was not built for this Embedding (another optimizer, vocabulary,
        table set, sharding or mesh), naming the table and what differs.

        Shapes, dtypes and structure only, so it runs at trace time on abstract values;
        ``lookup`` checks the tables, ``apply_gradients`` and ``je.checkpoint.save`` the slots
        too (``slots=False`` skips them).

        Raises:
            TypeError: ``state`` is not an ``EmbeddingState``.
            ValueError: naming the table and what differs.
        """
        fix = (
            "build the state with this Embedding (init, abstract_state or state_from_logical) "
            "or restore it with je.checkpoint.restore(directory, emb)"
        )
        if not all(hasattr(state, f) for f in ("tables", "slots", "step")):
            raise TypeError(
                f"`state` must be an EmbeddingState (tables, slots, step), got "
                f"{type(state).__name__}; {fix}."
            )
        expected = self._expected_state
        fields = [("tables", state.tables, expected.tables)]
        if slots:
            fields.append(("slots", state.slots, expected.slots))
        for what, got, want in fields:
            if not isinstance(got, Mapping) or set(got) != set(want):
                have = sorted(got) if isinstance(got, Mapping) else type(got).__name__
                raise ValueError(
                    f"The state's {what} hold arrays {have}, but this Embedding has "
                    f"{sorted(want)} (missing {sorted(set(want) - set(have))}, unexpected "
                    f"{sorted(set(have) - set(want))}): the state was built for another "
                    f"Embedding; {fix}."
                )
        for array, want in expected.tables.items():
            got_shape = tuple(np.shape(state.tables[array]))
            if got_shape != tuple(want.shape):
                raise ValueError(
                    f"{self._array_label(array)}: the state's array has shape {got_shape}, but "
                    f"this Embedding lays it out as {tuple(want.shape)}: the state was built for "
                    f"another Embedding (other vocabulary, dim, sharding or mesh); {fix}."
                )
            got_dtype = getattr(state.tables[array], "dtype", None)
            if got_dtype != want.dtype:
                raise ValueError(
                    f"{self._array_label(array)}: the state's array has dtype {got_dtype}, but "
                    f"this Embedding's is {want.dtype}; {fix}."
                )
            if not slots:
                continue
            got_slots, want_slots = state.slots[array], expected.slots[array]
            structure = str(jax.tree.structure(got_slots)) == str(jax.tree.structure(want_slots))
            same = structure and all(
                tuple(np.shape(g)) == tuple(w.shape)
                for g, w in zip(
                    jax.tree.leaves(got_slots), jax.tree.leaves(want_slots), strict=True
                )
            )
            if not same:
                optimizer = type(self.optimizer_of(array)).__name__
                raise ValueError(
                    f"{self._array_label(array)}: the state's optimizer slots "
                    f"{_slot_summary(got_slots)} are not those of this Embedding's optimizer "
                    f"{optimizer} {_slot_summary(want_slots)}: the state was built for another "
                    f"optimizer or Embedding; {fix} (reinit_slots=True keeps the tables and "
                    "starts fresh slots)."
                )

    # -- device side (pure) --
    def _layout_of_path(self, path: str) -> Layout:
        return self.plan.layout(self.table_names[self.features[path].table])

    def _batch_spec(self) -> P:
        return P(self.plan.batch_axes)

    def lookup(self, state: EmbeddingState, batch: Batch) -> Any:
        """Activations for ``batch``, nested like its inputs (that is, like ``feature_config``).

        Equal to ``embedding_lookup`` on ``embedding_tables(state)``, except for dense ids, whose
        shapes follow TF's ``TPUEmbedding`` (``preprocess``): ``[B, 1]`` ids give ``[B, dim]``
        here and ``[B, 1, dim]`` from ``embedding_lookup`` (TF's ``serving_embedding_lookup``).

        Rows of a table with a ``quantization_config`` are quantized as they are read (only the
        requested rows); ``apply_gradients`` takes the gradient straight through.
        """
        self._check_batch(batch)
        self.check_state(state, slots=False)
        paths = batch.paths

        def body(tables, requests, plans):
            sources = {
                name: self.plan.layout(name).rows(tables[name], req[0])
                for name, req in requests.items()
            }
            quantized: dict[tuple[str, Any], tuple[jax.Array, Any]] = {}

            def source(path: str) -> tuple[jax.Array, Any]:
                # A quantized table's requested rows, quantized once per array and config.
                name = self._layout_of_path(path).name
                config = self.features[path].table.quantization_config
                if config is None:
                    return sources[name]
                if (name, config) not in quantized:
                    rows, ids = sources[name]
                    quantized[name, config] = quantize_source(rows, ids, config)
                return quantized[name, config]

            return [
                combine_rows(rows, _batch.local(plan), ids=ids)
                for path, plan in zip(paths, plans, strict=True)
                for rows, ids in [source(path)]
            ]

        spec = self._batch_spec()
        call = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(self._specs(state.tables), spec, spec),
            out_specs=[spec] * len(paths),
            check_vma=False,
        )
        outs = self._run(("lookup", paths), call, (state.tables, batch.requests, batch.plans))
        _reads.record(state.tables, outs)  # apply_gradients updates the tables after these reads
        return jax.tree_util.tree_unflatten(batch.treedef, outs)

    def _cotangents(self, batch: Batch, grads: Any) -> list[jax.Array]:
        """``grads`` checked as TF's ``TPUEmbedding.apply_gradients`` checks them (structure of
        feature_config, container types included; array leaves or None; the activation
        shapes), one float32 array per path of ``batch``, laid out over the mesh."""
        check_structure(self.feature_config, grads, "gradients", _GRADIENTS_FIX)
        flat = dict(_nest.flatten_with_paths(grads))
        cots = []
        devices = self.mesh.size
        sharding = NamedSharding(self.mesh, self._batch_spec())
        for path, plan in zip(batch.paths, batch.plans, strict=True):
            dim = self.features[path].table.dim
            shape = (plan.shape[0] * devices, *plan.shape[1:], dim)
            g = flat[path]
            if g is not None and not isinstance(g, (np.ndarray, np.generic, jax.Array)):
                raise ValueError(
                    f"found non-tensor type: {type(g)} at path {path}. Pass dL/d(activation) "
                    f"arrays (numpy or JAX) of shape {shape}, or None for a zero gradient."
                )
            if g is None:  # TF: a missing gradient is a zero gradient
                g = jnp.zeros(shape, jnp.float32)
            elif tuple(np.shape(g)) != shape:
                raise ValueError(
                    f"Found gradient of shape {tuple(np.shape(g))} at path {path}. Expected "
                    f"shape {shape}: the shape of the feature's activation from "
                    "Embedding.lookup."
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
        vocabulary size, whatever ``grads`` depend on: the update is ordered after this step's
        ``lookup`` of the same state (a fixed linear head, constant or ``custom_vjp``
        gradients included; see ``jaxembed._reads``). The tables are updated one after
        another, so without the CPU kernels the step holds one table's ``[rows, dim]`` gradient
        rows at a time, not every table's.

        Gradient rows holding NaN or Inf follow ``Embedding(nonfinite_gradients=...)``: by
        default they are dropped (one elementwise pass over ``grads``) and counted in the
        returned state's ``nonfinite``.

        ``grads`` are checked as TF's ``TPUEmbedding.apply_gradients`` checks them: the nested
        structure of ``feature_config`` with the same container types, an array or None (a
        zero gradient) per feature, each of its activation's shape.

        Raises:
            TypeError: If ``grads`` nests another container type than ``feature_config`` (a
                list where it has a tuple), naming the path.
            ValueError: If ``grads`` miss features or hold non-array leaves or wrong shapes,
                naming the path; if ``state`` was built for another optimizer or Embedding
                (checked on shapes and structure, so at trace time under ``jit``), naming the
                table.
            NonFiniteGradientError: Under ``nonfinite_gradients="raise"`` (inside ``jit``
                carried by a ``jax.errors.JaxRuntimeError`` when the step runs).
        """
        missing = [n for n, opt in self.optimizers.items() if opt is None]
        if missing:
            raise ValueError(
                f"Tables {missing} have no optimizer: pass one to Embedding(..., optimizer=...) "
                "or set TableConfig.optimizer."
            )
        self._check_batch(batch)
        self.check_state(state)
        cotangents = self._cotangents(batch, grads)
        guard = self.nonfinite_gradients
        paths = batch.paths

        def body(tables, slots, step, requests, plans, cots, reads):
            parts: dict[str, list] = {name: [] for name in requests}
            for path, plan, cot in zip(paths, plans, cots, strict=True):
                parts[self._layout_of_path(path).name].append(
                    slot_cotangents(_batch.local(plan), cot)
                )
            # The update reads its ids only after this step's lookups (see jaxembed._reads), so
            # XLA updates the tables in place whatever the gradients depend on.
            zero = _reads.zero_after(reads)
            requests = {name: req[0] + zero for name, req in requests.items()}
            dropped = ok = jnp.zeros((), jnp.int32)
            if guard != "apply":  # per feature: its gradient rows holding NaN or Inf
                axes = self.plan.batch_axes
                counts = jax.lax.psum(jnp.stack([_bad_rows(c).sum() for c in cots]), axes)
                if guard == "raise":  # every device raises (no device waits in a collective)
                    check = _raise_if_nonfinite(paths)
                    ok = jax.pure_callback(check, jax.ShapeDtypeStruct((), jnp.int32), counts)
                else:
                    dropped = counts.sum(dtype=jnp.int32)
                    for name in requests:
                        pad = self.plan.layout(name).shard_shape[0]
                        parts[name], requests[name] = _drop_nonfinite(
                            parts[name], requests[name], pad
                        )
            new_tables, new_slots = dict(tables), dict(slots)
            # One table after another: a table's gradient rows are summed once the previous
            # table is updated, so the step holds one table's gradient rows at a time.
            after = jnp.zeros((), jnp.int32)
            for name, req in requests.items():
                optimizer = self.optimizer_of(name)
                assert optimizer is not None
                new_tables[name], new_slots[name] = self.plan.layout(name).apply_gradients(
                    optimizer, tables[name], slots[name], step, req, _after(parts[name], after)
                )
                after = _reads.zero_after([new_tables[name]])
            return new_tables, new_slots, dropped, ok

        reads = _reads.reads_of(state.tables)  # this step's lookups of the tables, if traced
        spec = self._batch_spec()
        table_specs, slot_specs = self._specs(state.tables), self._specs(state.slots)
        call = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(
                table_specs,
                slot_specs,
                P(),
                spec,
                spec,
                [spec] * len(cotangents),
                [spec] * len(reads),
            ),
            out_specs=(table_specs, slot_specs, P(), P()),
            check_vma=False,
        )
        args = (
            state.tables,
            state.slots,
            state.step,
            batch.requests,
            batch.plans,
            cotangents,
            reads,
        )
        key = ("apply_gradients", paths, len(reads))
        if guard == "raise" and not _traced(args):
            tables, slots, dropped, ok = _raising_eagerly(lambda: self._run(key, call, args))
        else:
            tables, slots, dropped, ok = self._run(key, call, args)
        nonfinite = state.nonfinite
        if guard == "skip" and nonfinite is not None:
            nonfinite = nonfinite + dropped
        # "raise": the step depends on the check, so the check is never pruned.
        step = state.step + 1 + ok if guard == "raise" else state.step + 1
        return EmbeddingState(tables, slots, step, nonfinite)


def _after(features: list[tuple[Any, ...]], zero: jax.Array) -> list[tuple[Any, ...]]:
    """Each feature's slot-cotangent parts with ``zero`` added to their slot indices (and to
    their ``Uses``' cotangent rows): XLA sums them only once ``zero`` is computed."""

    def later(part: tuple[Any, ...]) -> tuple[Any, ...]:
        cot, head, head_w, blocks, block_w, uses = part
        if uses is not None:
            uses = dataclasses.replace(uses, first=uses.first + zero, rest=uses.rest + zero)
        return cot, head + zero, head_w, blocks, block_w, uses

    return [tuple(later(p) for p in parts) for parts in features]


def _slot_summary(slots: Any) -> str:
    """A slot pytree as ``[momenta (10, 4), velocities (10, 4)]`` for error messages."""

    def name(path: Sequence[Any]) -> str:
        keys = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
        return "/".join(str(k) for k in keys)

    leaves = jax.tree_util.tree_leaves_with_path(slots)
    return "[" + ", ".join(f"{name(p)} {tuple(np.shape(x))}" for p, x in leaves) + "]"


def _bad_rows(cot: jax.Array) -> jax.Array:
    """``cot.shape[:-1]`` bools: the gradient rows (vectors along the last axis) holding NaN or
    Inf."""
    return ~jnp.isfinite(cot).all(axis=-1)


def _drop_nonfinite(
    features: list[tuple[Any, ...]], requests: jax.Array, pad: int
) -> tuple[list[tuple[Any, ...]], jax.Array]:
    """One array's slot cotangents with non-finite gradient rows zeroed, and its requests with
    every row that only such gradient rows use set to ``pad`` (so the optimizer skips it).

    ``features``: one tuple of ``(cot, head, head_w, blocks, block_w, uses)`` parts per feature
    (``lookup.slot_cotangents``), whose slots index the device's requested rows
    (``requests.reshape(-1)``; that count = no entry). A non-finite activation row makes
    every part row derived from it non-finite, so the check runs on the part rows. Zeroing is
    one elementwise pass; the requests are rewritten only on devices that saw such a row.
    """
    masked, pieces = [], []
    for parts in features:
        out = []
        for cot, head, head_w, blocks, block_w, uses in parts:
            finite = ~_bad_rows(cot)
            zeroed = jnp.where(finite[:, None], cot, 0)
            out.append((zeroed, head, head_w, blocks, block_w, uses))
            pieces.append((finite, head, blocks))
        masked.append(tuple(out))
    if not pieces:
        return masked, requests

    def unused(req: jax.Array) -> jax.Array:
        # Per requested row, the most any slot holding it says: 2 if a finite gradient row
        # uses it, 1 if only non-finite ones do (drop it), 0 if none. One scatter per slot
        # array as it is (no concatenated or masked copy of the slots in scratch memory).
        rows = req.size
        seen = jnp.zeros(rows + 1, jnp.int8)
        for finite, head, blocks in pieces:
            n = finite.shape[0]
            says = jnp.where(finite, 2, 1).astype(jnp.int8)[:, None]
            for slots in (head, blocks):
                flat = slots.reshape(n, math.prod(slots.shape[1:]))
                seen = seen.at[flat].max(jnp.broadcast_to(says, flat.shape), mode="drop")
        drop = (seen[:rows] == 1).reshape(req.shape)
        return jnp.where(drop, jnp.asarray(pad, req.dtype), req)

    any_bad = jnp.any(jnp.stack([~f.all() for f, _, _ in pieces]))
    return masked, jax.lax.cond(any_bad, unused, lambda req: req, requests)


def _raise_if_nonfinite(paths: Sequence[str]) -> Any:
    """The host check of ``nonfinite_gradients="raise"``: counts per feature path -> 0."""

    def check(counts: Any) -> np.ndarray:
        counts = np.asarray(counts)
        if counts.any():
            bad = ", ".join(
                f"{p!r} ({int(n)} rows)" for p, n in zip(paths, counts, strict=True) if n
            )
            raise NonFiniteGradientError(
                f"apply_gradients got gradient rows holding NaN or Inf for features {bad}; "
                "fix the loss or model that produced them, or build the Embedding with "
                "nonfinite_gradients='skip' to drop such rows (and count them)."
            )
        return np.zeros((), np.int32)

    return check


def _traced(args: Any) -> bool:
    """Whether any leaf of ``args`` is a tracer (the call is inside a ``jit`` or other trace)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))


def _raising_eagerly(run: Callable[[], Any]) -> Any:
    """``run()`` outside ``jit``, turning a failed host check into NonFiniteGradientError."""
    try:
        return jax.block_until_ready(run())
    except jax.errors.JaxRuntimeError as err:
        marker = f"{NonFiniteGradientError.__name__}: "
        if marker not in str(err):
            raise
        raise NonFiniteGradientError(str(err).rsplit(marker, 1)[1].strip()) from None


@functools.cache
def _relayout(layout: Layout, name: str | None, sharding: NamedSharding) -> Any:
    """``layout.to_physical`` (``name`` None) or ``layout.to_logical(., name)``, jitted, its
    result laid out as ``sharding``. The body runs with the mesh's axes in auto mode, so XLA
    moves rows between devices (``all_to_all``) instead of gathering a whole table on each
    device, as the reshapes of an explicit-axis mesh would."""
    fn = layout.to_physical if name is None else functools.partial(layout.to_logical, name=name)
    return jax.jit(jax.sharding.auto_axes(fn, out_sharding=sharding), out_shardings=sharding)


def _laid_out(layout: Layout, fn: Callable, mesh: jax.sharding.Mesh, *args: Any) -> Any:
    """``fn(*args)`` (``layout.join`` or ``layout.split``), jitted, each array of its result
    laid out as ``layout.spec`` says, the mesh's axes in auto mode (``_relayout``)."""
    shapes = jax.eval_shape(fn, *args)
    out = jax.tree.map(lambda s: NamedSharding(mesh, layout.spec(s.shape)), shapes)
    return jax.jit(jax.sharding.auto_axes(fn, out_sharding=out), out_shardings=out)(*args)


def _put(x: Any, sharding: NamedSharding) -> Any:
    """``x`` (a host value, a local or global array, or a tracer) as a global array laid out as
    ``sharding``; works across processes (every process passes the same value)."""
    if isinstance(x, jax.core.Tracer):  # e.g. jax.jit(emb.init)
        return _constrain(x, sharding)
    if (
        isinstance(x, jax.Array)
        and isinstance(x.sharding, NamedSharding)
        and x.sharding.is_equivalent_to(sharding, x.ndim)
    ):  # already there, e.g. restored in place
        return x
    if jax.process_count() == 1:  # to the devices: no host copy of a device array
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # spread over processes
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    host = np.asarray(x)  # this process holds the whole value
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _float32(x: Any) -> Any:
    """``x`` as float32, staying where it is (a device array) or on the host."""
    return x.astype(jnp.float32) if isinstance(x, jax.Array) else np.asarray(x, np.float32)


def _initial_slots(
    opt: Optimizer | None, physical: dict, layout: Layout, mesh: jax.sharding.Mesh
) -> Any:
    """``opt``'s fresh slots for ``layout``'s array in ``physical``, made where they live
    (``{}`` without an optimizer)."""
    if opt is None:
        return {}
    try:
        initializer = _slot_initializer(opt, layout, mesh)
    except TypeError:  # an optimizer holding something unhashable: built for this call
        initializer = _slot_initializer.__wrapped__(opt, layout, mesh)
    return initializer(physical[layout.name])


@functools.cache
def _table_initializer(table: TableConfig, name: str, sharding: NamedSharding) -> Any:
    """``table.init_table``, jitted to make the table split as ``sharding`` says."""
    return jax.jit(functools.partial(table.init_table, name=name), out_shardings=sharding)


@functools.cache
def _slot_initializer(opt: Optimizer, layout: Layout, mesh: jax.sharding.Mesh) -> Any:
    """``opt.init_slots`` for ``layout``'s array, jitted to make each slot where it lives."""
    init = functools.partial(layout.init_slots, opt)
    shapes = jax.eval_shape(init, jax.ShapeDtypeStruct(layout.physical_shape, jnp.float32))
    if not jax.tree.leaves(shapes):  # no slots (SGD): nothing to make
        return lambda stored: shapes
    out = jax.tree.map(lambda s: NamedSharding(mesh, layout.spec(s.shape)), shapes)
    # auto axes: a table stored several rows to a row is viewed as its rows (a reshape)
    return jax.jit(jax.sharding.auto_axes(init, out_sharding=out), out_shardings=out)
