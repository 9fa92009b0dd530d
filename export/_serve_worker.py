"""Serves exported SavedModels the way TF Serving does, in a process without JAX or jaxembed.

``run(cases, workdir)`` runs this file as a script (``python _serve_worker.py REQUESTS.npz
OUT.npz``) in a fresh process that blocks ``jax``, ``flax`` and ``jaxembed`` imports. Importing
the module blocks nothing and needs only the standard library.

``REQUESTS.npz`` holds, per case ``c``: ``c|path`` (the SavedModel), ``c|in|NAME`` (the
``serving_default`` inputs) and, optionally, ``c|examples`` with ``c|offsets`` (serialized
``tf.Example``s concatenated as uint8, and where each starts); nothing is pickled. The outputs
are those of ``serving_default`` and ``serving_examples`` loaded with ``tf.saved_model.load``
(TF2, eager) and of ``serving_default`` loaded with TF1's ``tf.compat.v1.saved_model.loader``
(the session API TF Serving's C++ loader mirrors): ``c|eager|OUT``, ``c|examples|OUT`` and
``c|session|OUT``.

Inputs are checked against ``serving_default``'s signature first: one whose dtype differs (e.g.
int32 ids for the int64 ``p_ids``) is an error naming the input, where TF alone would either say
only "input #3 was expected to be a int64 tensor" (eager) or cast it silently (a session feed
truncates float ids). ``run`` raises it as a ``TypeError``.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

BLOCKED = ("jax", "jaxlib", "flax", "optax", "orbax", "jaxembed")
SCRIPT = __file__
REQUEST_ERROR = 3  # exit status of a request the signature does not take (message on stderr)


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


def check_inputs(specs: dict, inputs: dict, name: str = "serving_default") -> None:
    """Raises ``TypeError`` naming the first input whose dtype is not the signature's.

    ``specs`` maps input names to ``tf.TensorSpec``s, e.g. a loaded signature's
    ``structured_input_signature[1]``; ``inputs`` maps input names to numpy arrays. Missing and
    unknown inputs are left to TF, whose errors name them.

    Example:
        >>> import numpy as np, tensorflow as tf
        >>> specs = {"ids": tf.TensorSpec([None], tf.int64)}
        >>> try:
        ...     check_inputs(specs, {"ids": np.array([1], np.int32)})
        ... except TypeError as e:
        ...     print(str(e).split(";")[0])
        serving_default input 'ids' is int32, but the signature takes int64
    """
    import numpy as np

    for key, value in inputs.items():
        spec = specs.get(key)
        if spec is None or not (spec.dtype.is_integer or spec.dtype.is_floating):
            continue
        want = np.dtype(spec.dtype.as_numpy_dtype)
        got = np.asarray(value).dtype
        if got != want:
            raise TypeError(
                f"{name} input {key!r} is {got}, but the signature takes {want}; convert it "
                f'(e.g. numpy.asarray(value, "{want}")).'
            )


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
        try:
            specs = loaded.signatures["serving_default"].structured_input_signature[1]
            check_inputs(specs, entry["inputs"])
        except TypeError as e:
            print(f"request error: case {case}: {e}", file=sys.stderr)
            sys.exit(REQUEST_ERROR)
        inputs = {k: tf.constant(v) for k, v in entry["inputs"].items()}
        for name, value in loaded.signatures["serving_default"](**inputs).items():
            out[f"{case}|eager|{name}"] = value.numpy()
        if "examples" in entry:
            data, offsets = entry["examples"].tobytes(), entry["offsets"]
            pairs = zip(offsets[:-1], offsets[1:], strict=True)
            examples = tf.constant([data[a:b] for a, b in pairs])
            for name, value in loaded.signatures["serving_examples"](examples=examples).items():
                out[f"{case}|examples|{name}"] = value.numpy()
        for name, value in _session_outputs(tf, path, entry["inputs"]).items():
            out[f"{case}|session|{name}"] = value
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, f"modules that serving must not need were imported: {leaked}"
    np.savez(out_path, **out)


def run(cases: dict[str, dict], workdir: str, timeout: float = 600) -> dict[str, dict]:
    """Runs this script in a fresh process on ``cases``; returns its outputs.

    ``cases``: ``{case: {"path": SavedModel dir, "inputs": {name: array}, "examples": [bytes]
    (optional)}}``. Returns ``{case: {"eager" | "examples" | "session": {output: array}}}``.

    Raises:
        TypeError: an input's dtype is not the signature's (the message names the input).
        RuntimeError: the serving process failed otherwise (TF's message included).
    """
    import subprocess

    import numpy as np

    requests = {}
    for case, entry in cases.items():
        requests[f"{case}|path"] = np.array(str(entry["path"]))
        for name, value in entry["inputs"].items():
            requests[f"{case}|in|{name}"] = np.asarray(value)
        if entry.get("examples") is not None:
            serialized = list(entry["examples"])
            requests[f"{case}|examples"] = np.frombuffer(b"".join(serialized), np.uint8)
            requests[f"{case}|offsets"] = np.cumsum([0] + [len(e) for e in serialized])
    request_path = os.path.join(workdir, "requests.npz")
    out_path = os.path.join(workdir, "outputs.npz")
    np.savez(request_path, **requests)  # type: ignore[arg-type]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, SCRIPT, request_path, out_path],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if result.returncode == REQUEST_ERROR:
        lines = [line for line in result.stderr.splitlines() if line.startswith("request error")]
        raise TypeError(lines[-1].removeprefix("request error: ") if lines else result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"the TF-only serving process failed:\n{result.stderr[-4000:]}")
    outputs: dict[str, dict] = {}
    with np.load(out_path) as saved:
        for key in saved.files:
            case, kind, name = key.split("|")
            outputs.setdefault(case, {}).setdefault(kind, {})[name] = saved[key]
    return outputs


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
