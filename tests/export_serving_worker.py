"""Serves exported SavedModels the way TF Serving does, in a process without JAX or jaxembed.

Usage: ``python export_serving_worker.py REQUESTS.npz OUT.npz``. ``REQUESTS.npz`` holds, per
case ``c``: ``c|path`` (the SavedModel), ``c|in|NAME`` (``serving_default`` inputs),
``c|examples`` (serialized ``tf.Example``s, concatenated as uint8) and ``c|offsets`` (where each
one starts and ends); nothing is pickled. For each case the worker writes the outputs of
``serving_default`` and ``serving_examples`` loaded with ``tf.saved_model.load`` (TF2, eager)
and of ``serving_default`` loaded with TF1's ``tf.compat.v1.saved_model.loader.load`` (the
session API TF Serving's C++ loader mirrors), as ``c|eager|OUT``, ``c|examples|OUT`` and
``c|session|OUT``.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

BLOCKED = ("jax", "jaxlib", "flax", "optax", "orbax", "jaxembed")


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"{fullname} is blocked: serving must not need it")
        return None


def _cases(requests) -> dict[str, dict]:
    cases: dict[str, dict] = {}
    for key in requests.files:
        case, kind, *rest = key.split("|")
        entry = cases.setdefault(case, {"inputs": {}})
        if kind == "in":
            entry["inputs"][rest[0]] = requests[key]
        else:
            entry[kind] = requests[key]
    return cases


def _session_outputs(tf, path: str, inputs: dict) -> dict:
    graph = tf.Graph()
    with tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
        signature = meta.signature_def["serving_default"]
        feed = {signature.inputs[k].name: v for k, v in inputs.items()}
        names = sorted(signature.outputs)
        values = sess.run([signature.outputs[k].name for k in names], feed_dict=feed)
    return dict(zip(names, values, strict=True))


def main(requests_path: str, out_path: str) -> None:
    sys.meta_path.insert(0, _Block())  # only here: importing this module blocks nothing
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    requests = np.load(requests_path)
    out = {}
    for case, entry in _cases(requests).items():
        path = str(entry["path"])
        loaded = tf.saved_model.load(path)
        inputs = {k: tf.constant(v) for k, v in entry["inputs"].items()}
        for name, value in loaded.signatures["serving_default"](**inputs).items():
            out[f"{case}|eager|{name}"] = value.numpy()
        data, offsets = entry["examples"].tobytes(), entry["offsets"]
        examples = tf.constant([data[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)])
        for name, value in loaded.signatures["serving_examples"](examples=examples).items():
            out[f"{case}|examples|{name}"] = value.numpy()
        for name, value in _session_outputs(tf, path, entry["inputs"]).items():
            out[f"{case}|session|{name}"] = value
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, f"modules that serving must not need were imported: {leaked}"
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
