"""What a SavedModel or a TF checkpoint holds, as JSON-able data (for ``jaxembed inspect``).

Besides the raw ``variables`` (checkpoint keys and shapes), each description says what a user
asks about: a SavedModel's serving ``tables`` (dtype, shape, bytes), the optimizer each table was
trained with (``optimizers``), its ``dense_model`` (parameters and arrays) and signatures; a TF
checkpoint's ``tables_by_root``, with their optimizer slots.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from google.protobuf.message import Error as ProtobufError

from ._saved_model import METADATA_FILE
from ._tf import tf

# What TensorFlow raises on a damaged or truncated file (a bad protobuf becomes an OSError or
# a ValueError, a missing or corrupt variables file an OpError such as DataLossError).
_READ_ERRORS = (OSError, ValueError, tf.errors.OpError, ProtobufError)


def _unreadable(path: str | os.PathLike, what: str, fix: str, error: BaseException) -> ValueError:
    """One clear error for a file TensorFlow could not read."""
    reason = " ".join(str(error).split())
    if len(reason) > 200:
        reason = reason[:200] + "..."
    return ValueError(f"{path} is not a readable {what} ({type(error).__name__}: {reason}); {fix}.")


def _spec(spec) -> dict:
    return {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}


def describe_saved_model(path: str | os.PathLike) -> dict:
    """Signatures (inputs and outputs with dtype and shape), variables, the serving tables
    (stored dtype, shape and bytes, the float32 bytes they replace, quantization and its largest
    error), and jaxembed's configs.

    Raises:
        ValueError: a file of the SavedModel is damaged (``saved_model.pb``, the variables or
            jaxembed's metadata), naming it.
    """
    path = Path(path)
    fix = "re-export it (jaxembed export CKPT OUT --overwrite) or restore it from a backup"
    try:
        loaded = tf.saved_model.load(str(path))
        prefix = str(path / "variables" / "variables")
        variables = {
            name: shape
            for name, shape in tf.train.list_variables(prefix)
            if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")
        }
        dtypes = tf.train.load_checkpoint(prefix).get_variable_to_dtype_map()
    except _READ_ERRORS as e:
        raise _unreadable(path, "SavedModel", fix, e) from e
    signatures = {}
    for key, fn in loaded.signatures.items():
        _, inputs = fn.structured_input_signature
        signatures[key] = {
            "inputs": {name: _spec(s) for name, s in sorted(inputs.items())},
            "outputs": {name: _spec(s) for name, s in sorted(fn.structured_outputs.items())},
        }
    meta = path / METADATA_FILE
    try:
        metadata = json.loads(meta.read_text()) if meta.exists() else None
    except ValueError as e:  # bad JSON or bad UTF-8
        raise _unreadable(meta, "jaxembed metadata file", fix, e) from e
    tables = _tables(variables, dtypes, metadata)
    return {
        "kind": "SavedModel",
        "path": str(path),
        "signatures": signatures,
        "variables": variables,
        "tables": tables,
        "optimizers": _optimizers(metadata),
        "dense_model": _dense_model(variables, dtypes, metadata),
        "jaxembed": metadata,
    }


def _dense_model(variables: dict, dtypes: dict, metadata: dict | None) -> dict | None:
    """The served dense model's parameters: the variables that are not serving tables (or their
    quantization data), counted; None when the SavedModel serves the activations alone."""
    if metadata is not None and not metadata.get("model"):
        return None
    arrays = {k: v for k, v in variables.items() if not k.startswith("tables/")}
    if metadata is None and not arrays:
        return None
    return {
        "arrays": len(arrays),
        "parameters": sum(math.prod(shape) for shape in arrays.values()),
        "bytes": sum(math.prod(shape) * dtypes[k].size for k, shape in arrays.items()),
    }


def _table_key(name: str) -> str:
    """The checkpoint key of table ``name`` (TF escapes ``.`` as ``..`` and ``/`` as ``.S``)."""
    escaped = name.replace(".", "..").replace("/", ".S")
    return f"tables/{escaped}/.ATTRIBUTES/VARIABLE_VALUE"


def _tables(variables: dict, dtypes: dict, metadata: dict | None) -> dict:
    """Per serving table: the stored dtype, shape and bytes (read from the variables), the
    float32 bytes it replaces, its quantization and the quantization's largest error (from
    jaxembed's metadata; a SavedModel written before quantization existed holds float32)."""
    recorded = (metadata or {}).get("tables") or {}
    names = [t["name"] for t in (metadata or {}).get("config", {}).get("tables", [])]
    out = {}
    for name in names or recorded:
        key = _table_key(name)
        if key not in variables:
            continue
        shape, dtype = variables[key], dtypes[key]
        nbytes = math.prod(shape) * dtype.size
        info = recorded.get(name, {})
        out[name] = {
            "dtype": dtype.name,
            "shape": shape,
            "bytes": nbytes,
            "float32_bytes": info.get("float32_bytes", nbytes if dtype == tf.float32 else None),
            "quantization": info.get("quantization"),
            "max_abs_error": info.get("max_abs_error", 0.0),
        }
    return out


def _optimizers(metadata: dict | None) -> dict:
    """Per table, the optimizer it was trained with (class and arguments), as recorded in
    jaxembed's metadata when the exported Embedding had one."""
    tables = (metadata or {}).get("config", {}).get("tables", [])
    return {t["name"]: t["optimizer"] for t in tables if t.get("optimizer")}


def _unescape(name: str) -> str:
    """A checkpoint key's object name as written (TF escapes ``/`` as ``.S``, ``.`` as ``..``)."""
    out, i = [], 0
    while i < len(name):
        if name.startswith("..", i):
            out.append(".")
            i += 2
        elif name.startswith(".S", i):
            out.append("/")
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


_OPTIMIZER_SLOTS = {
    (): "SGD",
    ("accumulators",): "Adagrad",
    ("momenta", "velocities"): "Adam",
    ("accumulators", "linears"): "FTRL",
    ("accumulators", "momenta"): "AdagradMomentum",
}


def _checkpoint_tables(variables: dict, dtypes: dict) -> dict:
    """``{root: {table: {dtype, shape, bytes, slots: {slot: {dtype, shape}}, optimizer}}}`` for
    the keys ``ROOT/NAME/.ATTRIBUTES/VARIABLE_VALUE`` of a TPUEmbedding-style checkpoint, where
    ``NAME`` is a table or ``TABLE/SLOT`` (a slot of a table of the same root)."""
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    roots: dict[str, dict[str, str]] = {}
    for key in variables:
        parts = key.removesuffix(suffix).split("/")
        if key.endswith(suffix) and len(parts) == 2:
            roots.setdefault(parts[0], {})[_unescape(parts[1])] = key
    out: dict[str, dict] = {}
    for root, names in roots.items():
        tables: dict[str, dict] = {}
        slots: dict[str, dict] = {}
        for name, key in names.items():
            shape, dtype = variables[key], dtypes[key]
            info = {"dtype": dtype.name, "shape": shape, "bytes": math.prod(shape) * dtype.size}
            table, _, slot = name.rpartition("/")
            if table in names:
                slots.setdefault(table, {})[slot] = info
            else:
                tables[name] = info
        for name, info in tables.items():
            info["slots"] = slots.get(name, {})
            info["optimizer"] = _OPTIMIZER_SLOTS.get(tuple(sorted(info["slots"])))
        if tables and all(len(t["shape"]) == 2 for t in tables.values()):
            out[root] = tables
    return out


def describe_tf_checkpoint(path: str | os.PathLike) -> dict:
    """The variables (checkpoint keys and shapes) of a TF checkpoint prefix or directory.

    Raises:
        ValueError: the checkpoint's files are damaged or missing, naming the prefix.
    """
    path = os.fspath(path)
    try:
        if Path(path).is_dir():
            path = tf.train.latest_checkpoint(path) or path
        variables = {
            name: shape
            for name, shape in tf.train.list_variables(path)
            if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")
        }
        dtypes = tf.train.load_checkpoint(path).get_variable_to_dtype_map()
    except _READ_ERRORS as e:
        fix = "save it again or restore it from a backup"
        raise _unreadable(path, "TF checkpoint", fix, e) from e
    return {
        "kind": "TF checkpoint",
        "path": path,
        "variables": variables,
        "tables_by_root": _checkpoint_tables(variables, dtypes),
    }
