"""Checkpoints with orbax: tables and slots in logical row order, configs as metadata.

A checkpoint step directory holds two orbax items (three with ``CheckpointManager``'s
``extra``, e.g. the dense model's params and optax state):

* ``embedding``: ``{"tables": {name: [V, dim]}, "slots": {name: slots}, "step": int}``, every
  table-shaped array in **logical row order**, so a checkpoint written on 8 devices restores onto
  1, 2 or 64 (the physical layout of a mesh is rebuilt on restore);
* ``config``: JSON describing the tables (name, vocabulary_size, dim, combiner, optimizer class
  and hyperparameters) and the features, enough to rebuild the configs without the training code.

Orbax writes each step to a temporary directory and renames it when complete, so an interrupted
save never looks like a finished step. Nothing is pickled.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxembed.configs import FeatureConfig, TableConfig
from jaxembed.embedding import Embedding, EmbeddingState
from jaxembed.optimizers import OptaxOptimizer

_ITEMS = ("embedding", "config", "extra")


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    # Callables (schedules, slot creation functions) cannot be stored; their kind is recorded.
    return f"<{type(value).__name__}>"


def optimizer_config(optimizer: Any) -> dict | None:
    """The optimizer's class and hyperparameters as JSON-able data (None without one)."""
    if optimizer is None:
        return None
    if isinstance(optimizer, OptaxOptimizer):
        return {"class": "OptaxOptimizer", "args": {}}  # the slot tree's structure is checked
    args = {f.name: _json_value(getattr(optimizer, f.name)) for f in dataclasses.fields(optimizer)}
    return {"class": type(optimizer).__name__, "args": args}


def config_metadata(emb: Embedding) -> dict:
    """What a checkpoint records about ``emb``'s configs."""
    tables = [
        {
            "name": name,
            "vocabulary_size": table.vocabulary_size,
            "dim": table.dim,
            "combiner": table.combiner,
            "optimizer": optimizer_config(emb.optimizers[name]),
        }
        for table, name in emb.table_names.items()
    ]
    features = [
        {
            "path": path,
            "table": emb.table_names[feature.table],
            "max_sequence_length": feature.max_sequence_length,
            "validate_weights_and_indices": feature.validate_weights_and_indices,
            "output_shape": None if feature.output_shape is None else list(feature.output_shape),
            "name": feature.name,
        }
        for path, feature in emb.features.items()
    ]
    return {
        "format": "jaxembed/1",
        "tables": tables,
        "features": features,
        "structure": _encode_structure(emb.feature_config),
    }


def _encode_structure(tree: Any, path: str = "") -> Any:
    """The nesting of a feature_config as JSON: containers kept, each leaf its feature path."""

    def sub(key: str) -> str:
        return f"{path}/{key}" if path else key

    if isinstance(tree, Mapping):
        return {"dict": {str(k): _encode_structure(v, sub(str(k))) for k, v in tree.items()}}
    if isinstance(tree, tuple) and hasattr(type(tree), "_fields"):
        fields = list(getattr(type(tree), "_fields"))  # noqa: B009
        values = [_encode_structure(v, sub(f)) for f, v in zip(fields, tree, strict=True)]
        return {"namedtuple": fields, "values": values}
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {kind: [_encode_structure(v, sub(str(i))) for i, v in enumerate(tree)]}
    return {"feature": path}


def _decode_structure(node: dict, leaf: Any) -> Any:
    if "feature" in node:
        return leaf(node["feature"])
    if "dict" in node:
        return {k: _decode_structure(v, leaf) for k, v in node["dict"].items()}
    if "namedtuple" in node:
        cls = collections.namedtuple("Features", list(node["namedtuple"]))  # type: ignore[misc]
        return cls(*(_decode_structure(v, leaf) for v in node["values"]))
    kind = "list" if "list" in node else "tuple"
    return (list if kind == "list" else tuple)(_decode_structure(v, leaf) for v in node[kind])


def read_config(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The configs a checkpoint step recorded (latest step if None), without an ``Embedding``.

    The result is ``config_metadata``'s JSON with the ``step`` added.

    Raises:
        FileNotFoundError: no complete checkpoint (or no such step) in ``directory``.
    """
    with CheckpointManager(directory, None, create=False) as manager:
        step = manager._resolve_step(step)
        saved = manager._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
    return {**saved["config"], "step": step}


def feature_config_from(config: dict) -> Any:
    """Rebuilds the nested ``FeatureConfig``s of ``read_config``'s result.

    Tables get their saved name, shape and combiner, TF's default initializer and no optimizer
    (a learning-rate schedule cannot be stored): enough to restore and serve the tables, e.g.
    ``je.checkpoint.restore(dir, je.Embedding(feature_config_from(cfg)), tables_only=True)``.
    """
    tables = {
        t["name"]: TableConfig(
            t["vocabulary_size"], t["dim"], combiner=t["combiner"], name=t["name"]
        )
        for t in config["tables"]
    }
    features = {
        f["path"]: FeatureConfig(
            tables[f["table"]],
            max_sequence_length=f["max_sequence_length"],
            validate_weights_and_indices=f["validate_weights_and_indices"],
            output_shape=f["output_shape"],
            name=f["name"],
        )
        for f in config["features"]
    }
    if "structure" in config:
        return _decode_structure(config["structure"], features.__getitem__)
    return _nest_from_paths(features)


def _nest_from_paths(features: dict[str, Any]) -> Any:
    """Nested dicts from ``/``-joined paths (checkpoints written before ``structure`` existed)."""
    if list(features) == [""]:
        return features[""]
    root: dict = {}
    for path, feature in features.items():
        *parents, last = path.split("/")
        node = root
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = feature
    return root


def _logical_tree(emb: Embedding, state: EmbeddingState) -> dict:
    tables = {emb.table_names[t]: v for t, v in emb.embedding_tables(state).items()}
    return {"tables": tables, "slots": emb.logical_slots(state), "step": state.step}


def _restore_target(emb: Embedding) -> dict:
    """The logical tree ``save`` writes, as shapes placed on one device (a restore target)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def struct(shape, dtype=np.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=device)

    tables, slots = {}, {}
    for table, name in emb.table_names.items():
        tables[name] = struct((table.vocabulary_size, table.dim))
        opt = emb.optimizers[name]
        shapes = jax.eval_shape(opt.init_slots, tables[name]) if opt is not None else {}
        slots[name] = jax.tree.map(lambda x: struct(x.shape, x.dtype), shapes)
    return {"tables": tables, "slots": slots, "step": struct((), np.int32)}


def save(directory: str | os.PathLike, emb: Embedding, state: EmbeddingState, step: int) -> None:
    """Writes ``state`` (logical row order) and ``emb``'s configs as checkpoint ``step``.

    Example:
        >>> import jax, tempfile, jaxembed as je
        >>> table = je.TableConfig(10, 4, name="items")
        >>> emb = je.Embedding({"items": je.FeatureConfig(table)}, je.optimizers.Adagrad(0.1))
        >>> state = emb.init(jax.random.key(0))
        >>> path = tempfile.mkdtemp()
        >>> je.checkpoint.save(path, emb, state, step=1)
        >>> restored = je.checkpoint.restore(path, emb)
        >>> bool((restored.tables["items"] == state.tables["items"]).all())
        True
    """
    with CheckpointManager(directory, emb, max_to_keep=None, async_save=False) as manager:
        manager.save(step, state, force=True)


def _slot_kind(optimizer: dict | None) -> tuple:
    """What decides whether saved slots fit: the optimizer class, and FTRL's linears mode.

    Other hyperparameters (e.g. the learning rate) may change between runs.
    """
    if optimizer is None:
        return (None,)
    mode = optimizer["args"].get("multiply_linear_by_learning_rate")
    return (optimizer["class"], mode)


def _check_config(saved: dict, emb: Embedding, slots_needed: bool) -> None:
    """Raises a ValueError naming the table and both values for any mismatch."""
    mine = {t["name"]: t for t in config_metadata(emb)["tables"]}
    theirs = {t["name"]: t for t in saved["tables"]}
    if set(mine) != set(theirs):
        raise ValueError(
            f"Checkpoint tables {sorted(theirs)} do not match the Embedding's tables "
            f"{sorted(mine)}: table names must be the same."
        )
    for name, t in mine.items():
        for key in ("vocabulary_size", "dim"):
            if t[key] != theirs[name][key]:
                raise ValueError(
                    f"Table {name!r}: checkpoint has {key}={theirs[name][key]}, the Embedding "
                    f"has {key}={t[key]}."
                )
        if slots_needed and _slot_kind(t["optimizer"]) != _slot_kind(theirs[name]["optimizer"]):
            raise ValueError(
                f"Table {name!r}: checkpoint optimizer {theirs[name]['optimizer']} differs from "
                f"the Embedding's {t['optimizer']}. Pass reinit_slots=True to keep the tables "
                "and start fresh slots, or tables_only=True."
            )


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete step in ``directory`` (None if there is none)."""
    with CheckpointManager(directory, None, create=False) as manager:
        return manager.latest_step()


def restore(
    directory: str | os.PathLike,
    emb: Embedding,
    step: int | None = None,
    *,
    tables_only: bool = False,
    reinit_slots: bool = False,
) -> EmbeddingState:
    """Restores checkpoint ``step`` (the latest complete one if None) onto ``emb``'s mesh.

    Args:
        directory: the checkpoint directory given to ``save``.
        emb: the ``Embedding`` to restore into; its mesh and device count may differ from the
            ones that saved.
        step: which step; None for the latest.
        tables_only: restore the tables only (e.g. for serving); slots start fresh (or empty
            without an optimizer).
        reinit_slots: restore the tables and start fresh slots, e.g. after changing optimizer.

    Raises:
        FileNotFoundError: no complete checkpoint in ``directory``.
        ValueError: the checkpoint does not match ``emb`` (table names, shapes, or optimizer
            unless ``tables_only``/``reinit_slots``), naming the table and both values.
    """
    with CheckpointManager(directory, emb, create=False) as manager:
        state, _ = manager.restore(step, tables_only=tables_only, reinit_slots=reinit_slots)
    return state


class CheckpointManager:
    """Checkpoints for a training loop: keep the last N, save every K steps, save asynchronously.

    Each step directory holds the embedding state (logical row order), the configs and, if
    given, an ``extra`` pytree such as the dense model's params and optax state. Asynchronous
    saves return as soon as the arrays are copied off the device; ``wait_until_finished`` (and
    leaving a ``with`` block) waits for the writes.

    Args:
        directory: where step directories are written.
        emb: the ``Embedding`` whose state is saved.
        max_to_keep: how many recent steps to keep (None keeps all).
        save_interval_steps: ``save`` only writes steps that are multiples of this (unless
            ``force``).
        async_save: write in the background.
        create: create ``directory`` if missing.

    Example:
        >>> import jax, tempfile, jaxembed as je
        >>> table = je.TableConfig(10, 4, name="items")
        >>> emb = je.Embedding({"items": je.FeatureConfig(table)}, je.optimizers.SGD(0.1))
        >>> state, params = emb.init(jax.random.key(0)), {"w": jax.numpy.ones(3)}
        >>> with je.checkpoint.CheckpointManager(tempfile.mkdtemp(), emb, max_to_keep=2) as ckpt:
        ...     for step in range(4):
        ...         _ = ckpt.save(step, state, extra=params)
        ...     ckpt.wait_until_finished()
        ...     sorted(ckpt.all_steps())
        [2, 3]
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        emb: Embedding | None,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        create: bool = True,
    ):
        self.directory = os.path.abspath(directory)
        self.emb = emb
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                save_interval_steps=save_interval_steps,
                enable_async_checkpointing=async_save,
                create=create,
            ),
            item_names=_ITEMS,
        )

    def save(self, step: int, state: EmbeddingState, *, extra: Any = None, force: bool = False):
        """Saves ``state`` (and ``extra``) as ``step``; returns whether a save was started."""
        items = {
            "embedding": ocp.args.PyTreeSave(_logical_tree(self._embedding(), state)),
            "config": ocp.args.JsonSave(config_metadata(self._embedding())),
        }
        if extra is not None:
            items["extra"] = ocp.args.PyTreeSave(extra)
        return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(
        self,
        step: int | None = None,
        *,
        extra: Any = None,
        tables_only: bool = False,
        reinit_slots: bool = False,
    ) -> tuple[EmbeddingState, Any]:
        """Restores ``step`` (latest if None) onto the Embedding's mesh.

        ``extra`` is a target pytree (arrays or ``jax.ShapeDtypeStruct``s with shardings) for
        the saved extra item, or None to skip it. Returns ``(state, extra)``. Errors as
        ``restore``.
        """
        manager = self._manager
        step = self._resolve_step(step)
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        fresh = tables_only or reinit_slots
        _check_config(saved["config"], self._embedding(), slots_needed=not fresh)
        target = _restore_target(self._embedding())
        if fresh:  # slots are not read, so their structure may differ from the checkpoint's
            target = {"tables": target["tables"], "step": target["step"]}
        items = {
            "embedding": ocp.args.PyTreeRestore(
                target,
                ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=fresh,
            )
        }
        if extra is not None:
            items["extra"] = ocp.args.PyTreeRestore(
                extra, ocp.checkpoint_utils.construct_restore_args(extra)
            )
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        host = jax.tree.map(np.asarray, restored["embedding"])
        slots = None if fresh else host["slots"]
        state = self._embedding().state_from_logical(host["tables"], slots, host["step"])
        return state, restored["extra"] if extra is not None else None

    def _embedding(self) -> Embedding:
        if self.emb is None:
            raise ValueError(
                "This CheckpointManager was opened without an Embedding (metadata only); pass "
                "the Embedding to save or restore tables."
            )
        return self.emb

    def _resolve_step(self, step: int | None) -> int:
        """``step``, or the latest; FileNotFoundError if it is not a complete step."""
        steps = self._manager.all_steps()
        step = self._manager.latest_step() if step is None else int(step)
        if step is None or step not in steps:
            raise FileNotFoundError(
                f"No complete checkpoint {'' if step is None else f'step {step} '}in "
                f"{self.directory!r} (complete steps: {sorted(steps)})."
            )
        return step

    def latest_step(self) -> int | None:
        """The newest complete step (None if there is none)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete step."""
        return list(self._manager.all_steps())

    def wait_until_finished(self) -> None:
        """Blocks until background saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for background saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
