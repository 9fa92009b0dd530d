"""TF checkpoints of the tables and slots, compatible with ``TPUEmbedding(ForServing)``.

TF keys (tf_semantics §5.4), under ``tf.train.Checkpoint(embedding=...)``:
``embedding/<table>/.ATTRIBUTES/VARIABLE_VALUE`` for the parameters and
``embedding/<table>.S<slot>/.ATTRIBUTES/VARIABLE_VALUE`` for each slot (``/`` is escaped as
``.S``, ``.`` as ``..``), every value a ``[vocabulary_size, dim]`` tensor in natural row order,
the same whether TF wrote it on one host or many.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxembed.embedding import Embedding, EmbeddingState
from jaxembed.optimizers import OptaxOptimizer

from ._configs import logical_arrays, tf_feature_config, tf_table_configs
from ._tf import tf

_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def _escape(local_name: str) -> str:
    """A local name as TF's object graph writes it in checkpoint keys."""
    return local_name.replace(".", "..").replace("/", ".S")


def _zeros(shape, dtype=tf.float32):
    return tf.zeros(shape, dtype)


def _tf_embedding(emb: Embedding, step: int) -> Any:
    """TF's ``TPUEmbeddingForServing`` with ``emb``'s tables and optimizers, built (zeros)."""
    tables = tf_table_configs(emb, step)
    for config in tables.values():
        config.initializer = _zeros  # values are assigned next; skip the random fill
    embedding = tf.tpu.experimental.embedding.TPUEmbeddingForServing(
        tf_feature_config(emb, tables), None
    )
    embedding.build()
    return embedding


def _slot_arrays(emb: Embedding, state: EmbeddingState) -> dict[str, dict[str, np.ndarray]]:
    """``{table name: {slot name: [V, dim]}}`` for the TF-twin optimizers (not Optax ones)."""
    out = {}
    for table, slots in emb.slot_variables(state).items():
        name = emb.table_names[table]
        if not isinstance(emb.optimizers[name], OptaxOptimizer):
            out[name] = {k: np.asarray(v) for k, v in slots.items()}
    return out


def save_tf_checkpoint(prefix: str | os.PathLike, emb: Embedding, state: EmbeddingState) -> str:
    """Writes the tables and slots as a TF checkpoint; returns its path (``prefix`` + suffix).

    The checkpoint restores into TF's own objects, e.g.
    ``tf.train.Checkpoint(embedding=TPUEmbeddingForServing(feature_config, optimizer))
    .restore(path)``, or ``TPUEmbedding`` on a TPU, with the slots of SGD, Adagrad,
    AdagradMomentum, Adam and FTRL. Tables trained with an Optax optimizer (``from_optax``) are
    written without slots (TF has no twin for them).

    Raises:
        FileExistsError: a checkpoint (or any file) already exists at ``prefix``: TF would
            overwrite it; nothing is written.

    Example:
        >>> import jax, tempfile, jaxembed as je
        >>> from jaxembed import export
        >>> table = je.TableConfig(10, 4, name="items")
        >>> emb = je.Embedding({"items": je.FeatureConfig(table)}, je.optimizers.Adagrad(0.1))
        >>> state = emb.init(jax.random.key(0))
        >>> path = export.save_tf_checkpoint(tempfile.mkdtemp() + "/ckpt", emb, state)
        >>> sorted(k for k, _ in tf.train.list_variables(path) if k.startswith("embedding/"))
        ['embedding/items.Saccumulators/.ATTRIBUTES/VARIABLE_VALUE', 'embedding/items/.ATTRIBUTES/VARIABLE_VALUE']
    """  # noqa: E501
    taken = sorted(glob.glob(glob.escape(os.fspath(prefix)) + ".index")) + sorted(
        glob.glob(glob.escape(os.fspath(prefix)) + ".data-*")
    )
    if taken:
        raise FileExistsError(
            f"save_tf_checkpoint: {', '.join(taken)} already exist; TF would overwrite them. "
            "Choose a new prefix (e.g. with the step in it), or remove the old checkpoint first."
        )
    embedding = _tf_embedding(emb, int(state.step))
    tables = logical_arrays(emb, state)
    slots = _slot_arrays(emb, state)
    variables = embedding._variables  # {table name: {"parameters" | slot name: tf.Variable}}
    for name, table in tables.items():
        variables[name]["parameters"].assign(table)
        for slot, value in slots.get(name, {}).items():
            variables[name][slot].assign(value)
    return tf.train.Checkpoint(embedding=embedding).write(os.fspath(prefix))


def _resolve(path: str | os.PathLike) -> str:
    """A checkpoint prefix from a prefix or a directory (its latest checkpoint)."""
    path = os.fspath(path)
    if Path(path).is_dir():
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"No TF checkpoint in directory {path!r}.")
        return latest
    if not tf.io.gfile.exists(path + ".index"):
        raise FileNotFoundError(
            f"No TF checkpoint at {path!r} (no {path}.index). Pass the prefix that "
            "tf.train.Checkpoint.write/save returned, or the directory holding it."
        )
    return path


def _root(shapes: dict[str, list[int]], names: list[str], path: str) -> str:
    """The object path holding every table (``"embedding/"`` for ``Checkpoint(embedding=...)``)."""
    roots = None
    for name in names:
        suffix = _escape(name) + _SUFFIX
        found = {k[: -len(suffix)] for k in shapes if k.endswith(suffix)}
        found = {r for r in found if r == "" or r.endswith("/")}
        roots = found if roots is None else roots & found
    if not roots:
        stored = sorted(k[: -len(_SUFFIX)] for k in shapes if k.endswith(_SUFFIX))
        raise ValueError(
            f"TF checkpoint {path!r} does not hold the tables {names} under one object. It "
            f"holds the variables {stored}. Table names must match the TF TableConfig names "
            "(SparseCore checkpoints with stacked tables are not supported)."
        )
    if len(roots) > 1:
        raise ValueError(
            f"TF checkpoint {path!r} holds the tables {names} under several objects "
            f"{sorted(roots)}; keep one embedding object per checkpoint."
        )
    return roots.pop()


def load_tf_checkpoint(
    path: str | os.PathLike, emb: Embedding, *, tables_only: bool = False, step: int = 0
) -> EmbeddingState:
    """Reads a TF checkpoint of ``TPUEmbedding``/``TPUEmbeddingForServing`` into a state.

    Args:
        path: the checkpoint prefix (or a directory: its latest checkpoint).
        emb: the ``Embedding`` whose tables (matched by name) and optimizers to fill; its mesh
            places the result.
        tables_only: read the tables only; slots start at their initial values.
        step: the step count of the new state (TF keeps it outside the embedding object).

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: a table or a slot is missing or has the wrong shape, naming it.
    """
    path = _resolve(path)
    reader = tf.train.load_checkpoint(path)
    shapes = reader.get_variable_to_shape_map()
    names = list(emb.table_names.values())
    root = _root(shapes, names, path)

    def read(local: str, shape: tuple[int, int]) -> np.ndarray:
        key = root + _escape(local) + _SUFFIX
        if key not in shapes:
            raise ValueError(
                f"TF checkpoint {path!r} has no variable {local!r} (key {key!r}). Pass "
                "tables_only=True to start fresh slots."
            )
        if tuple(shapes[key]) != shape:
            raise ValueError(
                f"TF checkpoint variable {local!r} has shape {shapes[key]}, the Embedding "
                f"expects {list(shape)}: check vocabulary_size and dim."
            )
        return reader.get_tensor(key)

    tables, slots = {}, {}
    for table, name in emb.table_names.items():
        shape = (table.vocabulary_size, table.dim)
        tables[name] = read(name, shape)
        opt = emb.optimizers[name]
        if tables_only or opt is None or isinstance(opt, OptaxOptimizer):
            continue
        slots[name] = {s: read(f"{name}/{s}", shape) for s in opt.slot_names}
    if slots:  # the tables not read (Optax, or no optimizer) start fresh
        for name in names:
            if name not in slots:
                opt = emb.optimizers[name]
                slots[name] = opt.init_slots(jnp.asarray(tables[name])) if opt else {}
    return emb.state_from_logical(tables, slots or None, step)
