"""What a SavedModel or a TF checkpoint holds, as JSON-able data (for ``jaxembed inspect``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ._saved_model import METADATA_FILE
from ._tf import tf


def _spec(spec) -> dict:
    return {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}


def describe_saved_model(path: str | os.PathLike) -> dict:
    """Signatures (inputs and outputs with dtype and shape), variables, and jaxembed's configs."""
    path = Path(path)
    loaded = tf.saved_model.load(str(path))
    signatures = {}
    for key, fn in loaded.signatures.items():
        _, inputs = fn.structured_input_signature
        signatures[key] = {
            "inputs": {name: _spec(s) for name, s in sorted(inputs.items())},
            "outputs": {name: _spec(s) for name, s in sorted(fn.structured_outputs.items())},
        }
    variables = {
        name: shape
        for name, shape in tf.train.list_variables(str(path / "variables" / "variables"))
        if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")
    }
    meta = path / METADATA_FILE
    return {
        "kind": "SavedModel",
        "path": str(path),
        "signatures": signatures,
        "variables": variables,
        "jaxembed": json.loads(meta.read_text()) if meta.exists() else None,
    }


def describe_tf_checkpoint(path: str | os.PathLike) -> dict:
    """The variables (checkpoint keys and shapes) of a TF checkpoint prefix or directory."""
    path = os.fspath(path)
    if Path(path).is_dir():
        path = tf.train.latest_checkpoint(path) or path
    return {
        "kind": "TF checkpoint",
        "path": path,
        "variables": {
            name: shape
            for name, shape in tf.train.list_variables(path)
            if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")
        },
    }
