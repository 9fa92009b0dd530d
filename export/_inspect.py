"""What a SavedModel or a TF checkpoint holds, as JSON-able data (for ``jaxembed inspect``)."""

from __future__ import annotations

import json
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
    """Signatures (inputs and outputs with dtype and shape), variables, and jaxembed's configs.

    Raises:
        ValueError: a file of the SavedModel is damaged (``saved_model.pb``, the variables or
            jaxembed's metadata), naming it.
    """
    path = Path(path)
    fix = "re-export it (jaxembed export CKPT OUT --overwrite) or restore it from a backup"
    try:
        loaded = tf.saved_model.load(str(path))
        variables = {
            name: shape
            for name, shape in tf.train.list_variables(str(path / "variables" / "variables"))
            if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")
        }
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
        "jaxembed": metadata,
    }


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
