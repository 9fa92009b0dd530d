"""What a SavedModel or a TF checkpoint holds, as JSON-able data (for ``jaxembed inspect``)."""

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
    return {
        "kind": "SavedModel",
        "path": str(path),
        "signatures": signatures,
        "variables": variables,
        "tables": _tables(variables, dtypes, metadata),
        "jaxembed": metadata,
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
    except _READ_ERRORS as e:
        fix = "save it again or restore it from a backup"
        raise _unreadable(path, "TF checkpoint", fix, e) from e
    return {"kind": "TF checkpoint", "path": path, "variables": variables}
