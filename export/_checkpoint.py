"""TF checkpoints of the tables and slots, compatible with ``TPUEmbedding(ForServing)``.

TF keys (tf_semantics §5.4), under ``tf.train.Checkpoint(embedding=...)``:
``embedding/<table>/.ATTRIBUTES/VARIABLE_VALUE`` for the parameters and
``embedding/<table>.S<slot>/.ATTRIBUTES/VARIABLE_VALUE`` for each slot (``/`` is escaped as
``.S``, ``.`` as ``..``), every value a ``[vocabulary_size, dim]`` tensor in natural row order,
the same whether TF wrote it on one host or many.

The first part of a key is the *root*: the object path from the checkpoint to the embedding
object, which is whatever attribute the TF program hung it on (``Checkpoint(my_emb=...)`` gives
``my_emb``, ``Checkpoint(model=model)`` with ``model.embedding_api = emb`` gives
``model/embedding_api``). ``save_tf_checkpoint(..., root=...)`` writes under any root (default
``embedding``); ``load_tf_checkpoint`` finds the one object that holds every table, or takes
``root=``.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxembed.embedding import Embedding, EmbeddingState

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
    """``{table name: {slot name: [V, dim]}}`` for the TF-twin optimizers (not Optax or
    row-wise ones)."""
    out = {}
    for table, slots in emb.slot_variables(state).items():
        name = emb.table_names[table]
        opt = emb.optimizers[name]
        if opt is None or opt.has_tf_twin:  # the others' tables are written without slots
            out[name] = {k: np.asarray(v) for k, v in slots.items()}
    return out


def _root_parts(root: str) -> list[str]:
    """The attribute names of a root path (``"model/emb"`` -> ``["model", "emb"]``; ``""``:
    none, the embedding object is the checkpoint's root)."""
    if not isinstance(root, str):
        raise TypeError(
            f"`root` must be a str, the object path of the embedding object in the checkpoint "
            f"(e.g. 'embedding' or 'model/embedding_api'), got {type(root).__name__} {root!r}."
        )
    parts = root.split("/") if root else []
    if any(not p for p in parts):
        raise ValueError(
            f"`root` {root!r} has an empty name; give attribute names joined by '/', e.g. "
            "'embedding' or 'model/embedding_api' ('' for the embedding object itself)."
        )
    return parts


def _checkpoint_with(root: str, embedding: Any) -> Any:
    """A ``tf.train.Checkpoint`` holding ``embedding`` at the object path ``root``: what TF
    writes for ``tf.train.Checkpoint(<root>=embedding)`` (or an attribute path of nested
    objects, e.g. ``Checkpoint(model=model)`` with ``model.embedding_api = embedding``)."""
    parts = _root_parts(root)
    if not parts:
        return tf.train.Checkpoint(root=embedding)
    node = embedding
    for name in reversed(parts):
        holder = tf.train.Checkpoint()
        try:
            setattr(holder, name, node)
        except AttributeError as err:  # e.g. "save_counter", a property of Checkpoint
            raise ValueError(
                f"`root` {root!r}: {name!r} cannot be an attribute of a tf.train.Checkpoint "
                f"({err}); choose another name."
            ) from None
        node = holder
    return node


def save_tf_checkpoint(
    prefix: str | os.PathLike, emb: Embedding, state: EmbeddingState, *, root: str = "embedding"
) -> str:
    """Writes the tables and slots as a TF checkpoint; returns its path (``prefix`` + suffix).

    The checkpoint restores into TF's own objects, e.g.
    ``tf.train.Checkpoint(embedding=TPUEmbeddingForServing(feature_config, optimizer))
    .restore(path)``, or ``TPUEmbedding`` on a TPU, with the slots of SGD, Adagrad,
    AdagradMomentum, Adam and FTRL. Tables trained with an Optax optimizer (``from_optax``) are
    written without slots (TF has no twin for them).

    Args:
        prefix: where to write (``prefix.index``, ``prefix.data-*``).
        emb, state: the tables and slots to write.
        root: the object path of the embedding object in the checkpoint: the attribute name
            the TF program restores it under (``"my_emb"`` for
            ``tf.train.Checkpoint(my_emb=embedding)``), names joined by ``/`` for a nested
            object (``"model/embedding_api"`` for ``tf.train.Checkpoint(model=model)`` with
            ``model.embedding_api = embedding``), ``""`` for the embedding object itself as
            the checkpoint root. Default ``"embedding"``.

    Raises:
        FileExistsError: a checkpoint (or any file) already exists at ``prefix``: TF would
            overwrite it; nothing is written.
        ValueError: ``root`` is not a usable object path.

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
    _root_parts(root)  # before any work
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
    return _checkpoint_with(root, embedding).write(os.fspath(prefix))


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


def _unescape(prefix: str) -> str:
    """A key prefix (``"model/my..emb/"``) as the object path a user writes (``"model/my.emb"``):
    TF escapes ``.`` as ``..`` and ``/`` as ``.S`` inside a name."""
    names = prefix.rstrip("/").split("/") if prefix else []
    unescaped = (re.sub(r"\.([.S])", lambda m: "." if m.group(1) == "." else "/", n) for n in names)
    return "/".join(unescaped)


def _prefix(root: str) -> str:
    """The key prefix of an object path (``"model/emb"`` -> ``"model/emb/"``; ``""`` -> ``""``)."""
    return "".join(_escape(name) + "/" for name in _root_parts(root))


def _roots_holding(shapes: dict[str, list[int]], name: str) -> set[str]:
    """The key prefixes of the objects that hold a variable named ``name``."""
    suffix = _escape(name) + _SUFFIX
    found = {k[: -len(suffix)] for k in shapes if k.endswith(suffix)}
    return {r for r in found if r == "" or r.endswith("/")}


def _root(shapes: dict[str, list[int]], names: list[str], path: str, root: str | None) -> str:
    """The key prefix of the object holding every table: ``root``'s, or else the only object
    that holds them all (``"embedding/"`` for ``Checkpoint(embedding=...)``)."""
    holders = [_roots_holding(shapes, name) for name in names]
    candidates = set.intersection(*holders) if holders else set()
    shown = sorted(repr(_unescape(r)) for r in candidates)
    if root is not None:
        prefix = _prefix(root)
        if prefix not in candidates:
            missing = [n for n, h in zip(names, holders, strict=True) if prefix not in h]
            where = f"the objects {', '.join(shown)}" if shown else "no single object"
            raise ValueError(
                f"TF checkpoint {path!r} has no tables {missing} under root {root!r}. The "
                f"tables {names} are under {where}: pass one of those as root=, or root=None "
                "to find it."
            )
        return prefix
    if not candidates:
        stored = sorted(k[: -len(_SUFFIX)] for k in shapes if k.endswith(_SUFFIX))
        raise ValueError(
            f"TF checkpoint {path!r} does not hold the tables {names} under one object. It "
            f"holds the variables {stored}. Table names must match the TF TableConfig names "
            "(SparseCore checkpoints with stacked tables are not supported)."
        )
    if len(candidates) > 1:
        raise ValueError(
            f"TF checkpoint {path!r} holds the tables {names} under several objects: "
            f"{', '.join(shown)}. Pass the one to read as root=, e.g. "
            f"load_tf_checkpoint(path, emb, root={shown[0]})."
        )
    return candidates.pop()


def load_tf_checkpoint(
    path: str | os.PathLike,
    emb: Embedding,
    *,
    tables_only: bool = False,
    step: int = 0,
    root: str | None = None,
) -> EmbeddingState:
    """Reads a TF checkpoint of ``TPUEmbedding``/``TPUEmbeddingForServing`` into a state.

    The embedding object may hang under any attribute of the TF program's checkpoint
    (``tf.train.Checkpoint(my_emb=embedding)``, or nested: ``model/embedding_api``): with
    ``root=None`` it is found as the one object that holds every table of ``emb``.

    Args:
        path: the checkpoint prefix (or a directory: its latest checkpoint).
        emb: the ``Embedding`` whose tables (matched by name) and optimizers to fill; its mesh
            places the result.
        tables_only: read the tables only; slots start at their initial values.
        step: the step count of the new state (TF keeps it outside the embedding object).
        root: the object path of the embedding object (``"my_emb"``, ``"model/embedding_api"``,
            ``""`` for the checkpoint's root object), or None to find it.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: a table or a slot is missing or has the wrong shape, naming it; with
            ``root=None``, several objects hold every table (the error lists them: pass one
            as ``root``); with a ``root``, it does not hold them (the error lists the objects
            that do).

    Example:
        >>> import jax, tempfile, jaxembed as je
        >>> from jaxembed import export
        >>> users = je.FeatureConfig(je.TableConfig(6, 2, name="user"))
        >>> emb = je.Embedding({"user": users}, je.optimizers.SGD(0.5))
        >>> trained = emb.init(jax.random.key(1))
        >>> prefix = export.save_tf_checkpoint(f"{tempfile.mkdtemp()}/model", emb, trained)
        >>> state = export.load_tf_checkpoint(prefix, emb, step=10)
        >>> int(state.step), bool((state.tables["user"] == trained.tables["user"]).all())
        (10, True)
    """
    if root is not None:
        _root_parts(root)  # before any work
    path = _resolve(path)
    reader = tf.train.load_checkpoint(path)
    shapes = reader.get_variable_to_shape_map()
    names = list(emb.table_names.values())
    prefix = _root(shapes, names, path, root)

    def read(local: str, shape: tuple[int, int]) -> np.ndarray:
        key = prefix + _escape(local) + _SUFFIX
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
        if tables_only or opt is None or not opt.has_tf_twin:
            continue
        slots[name] = {s: read(f"{name}/{s}", shape) for s in opt.slot_names}
    if slots:  # the tables not read (Optax, row-wise, or no optimizer) start fresh
        for name in names:
            if name not in slots:
                opt = emb.optimizers[name]
                slots[name] = opt.init_slots(jnp.asarray(tables[name])) if opt else {}
    return emb.state_from_logical(tables, slots or None, step)
