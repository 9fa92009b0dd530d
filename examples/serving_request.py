"""A TF Serving client for the demo recommender exported by ``jaxembed.export``.

The request holds a few impressions of the synthetic click log (``jaxembed.demo.data``), with raw
ids as a client has them (64-bit user and item ids, category names): the served model maps them
to rows itself, as training did. The log's catalogue sizes are read from the SavedModel's
``assets.extra/jaxembed.json``. Two request bodies are shown:

* ``serving_default`` in TF Serving's columnar REST format: per feature ``p``, ``p_ids`` (every id
  of the batch, example after example), ``p_lengths`` (ids per example) and, for weighted
  features, ``p_weights`` (one per id)::

      {"signature_name": "serving_default",
       "inputs": {"user_ids": [-4898300427212290447, 1753585040578123346],
                  "user_lengths": [1, 1], "categories_ids": ["category-3", ...], ...}}

* ``serving_examples`` (``--examples-signature``): serialized ``tf.Example``s, one per impression,
  base64-encoded the way TF Serving's REST API takes binary strings::

      {"signature_name": "serving_examples", "inputs": {"examples": [{"b64": "Cj4K..."}, ...]}}

  Over gRPC the same serialized Examples go, unencoded, into ``PredictRequest.inputs["examples"]``
  as a ``DT_STRING`` tensor (``tf.make_tensor_proto(serialized)``).

With ``--url`` the body is POSTed to a running TF Serving (stdlib ``urllib``); without it the
request is answered locally: the SavedModel is loaded with ``tf.saved_model.load``, the signature
is called with the body's inputs, and the reply is printed as TF Serving's REST API writes it
(``{"outputs": [...]}`` for a model with a single output such as the demo's ``ctr``,
``{"outputs": {name: [...], ...}}`` for several).

Run::

    python examples/serving_request.py MODEL_DIR [--examples 3] [--seed 0] [--examples-signature]
        [--url http://localhost:8501/v1/models/NAME:predict]

``MODEL_DIR`` is a SavedModel directory or a TF Serving base directory holding numbered versions
(the latest is used). Building the ``serving_default`` body needs no TensorFlow; the
``tf.Example`` body and the local answer do.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxembed.demo import data, model

METADATA_FILE = "assets.extra/jaxembed.json"  # written next to the SavedModel by the export
DEMO_FEATURES = ("user", "item", "categories", "history")


def saved_model_dir(model_dir: str | Path) -> Path:
    """The SavedModel in ``model_dir``, or in its highest numbered version subdirectory."""
    path = Path(model_dir)
    if (path / "saved_model.pb").exists():
        return path
    versions = [d for d in path.glob("*") if d.name.isdigit() and (d / "saved_model.pb").exists()]
    if not versions:
        raise FileNotFoundError(
            f"No SavedModel in {path}: pass the directory holding saved_model.pb, or a base "
            "directory with numbered versions (model/1/saved_model.pb)."
        )
    return max(versions, key=lambda d: int(d.name))


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    """The export's description of the model: tables, features and weighted features."""
    path = saved_model_dir(model_dir) / METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: this SavedModel was not written by jaxembed.export."
        )
    return json.loads(path.read_text())


def _input_name(path: str, suffix: str) -> str:
    """The signature input name of a feature path (as the export names it)."""
    return f"{path.replace('/', '_')}_{suffix}"


def click_log(model_dir: str | Path, n: int, seed: int = 0) -> tuple[data.ClickLog, dict]:
    """``n`` synthetic impressions whose ids fit the model's tables, and the model's metadata."""
    meta = read_metadata(model_dir)
    tables = {t["name"]: t for t in meta["config"]["tables"]}
    features = {f["path"]: f for f in meta["config"]["features"]}
    missing = [p for p in DEMO_FEATURES if p not in features]
    if missing:
        raise ValueError(
            f"The model has the features {sorted(features)}; this client sends the demo's "
            f"{list(DEMO_FEATURES)} (jaxembed.demo.model.feature_config), lacking {missing}."
        )

    def size(path: str) -> int:
        """The id space's size: a vocabulary's keys, or the users behind a hashing's bins."""
        vocabulary = features[path].get("vocabulary")
        if vocabulary is None:
            return int(tables[features[path]["table"]]["vocabulary_size"])
        if vocabulary["kind"] == "hashing":
            return max(1, vocabulary["num_bins"] // 2)  # the demo hashes into 2x its users
        return len(vocabulary["keys"])

    history_length = int(features["history"]["max_sequence_length"]) or 8
    log = data.synthetic(
        n,
        users=size("user"),
        items=min(size("item"), size("history")),
        categories=size("categories"),
        history_length=history_length,
        seed=seed,
    )
    return log, meta


def _json_list(value: np.ndarray) -> list:
    """A column as JSON: ints, floats, or (string ids) UTF-8 text."""
    if value.dtype.kind == "S":
        return np.char.decode(value, "utf-8").tolist()
    return value.tolist()


def serving_inputs(log: data.ClickLog, meta: dict) -> dict[str, np.ndarray]:
    """``serving_default``'s inputs for ``log``: ids and lengths per feature, weights where the
    model was exported with them."""
    weighted = set(meta["weighted"])
    names = []
    for feature in meta["config"]["features"]:
        path = feature["path"]
        names += [_input_name(path, "ids"), _input_name(path, "lengths")]
        if path in weighted:
            names.append(_input_name(path, "weights"))
    arrays = model.serving_request(log)
    unknown = [name for name in names if name not in arrays]
    if unknown:
        raise ValueError(f"The click log has no column for the signature inputs {unknown}.")
    return {name: arrays[name] for name in names}


def request_body(model_dir: str | Path, n: int, seed: int = 0) -> dict[str, Any]:
    """A columnar ``serving_default`` REST body for ``n`` impressions (lists of ints, floats or
    strings)."""
    log, meta = click_log(model_dir, n, seed)
    inputs = serving_inputs(log, meta)
    return {
        "signature_name": "serving_default",
        "inputs": {name: _json_list(value) for name, value in inputs.items()},
    }


def examples_body(model_dir: str | Path, n: int, seed: int = 0) -> dict[str, Any]:
    """A ``serving_examples`` REST body: the same impressions as ``request_body`` as base64
    serialized ``tf.Example``s (feature ``p`` with the ids: an int64 or bytes list; float
    ``p_weights``)."""
    from jaxembed.export import serialized_examples  # imports TensorFlow

    log, meta = click_log(model_dir, n, seed)
    inputs = serving_inputs(log, meta)
    samples: dict[str, dict[str, np.ndarray]] = {}
    for feature in meta["config"]["features"]:
        path = feature["path"]
        samples[path] = {
            key: inputs[_input_name(path, key)]
            for key in ("ids", "lengths", "weights")
            if _input_name(path, key) in inputs
        }
    encoded = [{"b64": base64.b64encode(s).decode("ascii")} for s in serialized_examples(samples)]
    return {"signature_name": "serving_examples", "inputs": {"examples": encoded}}


def _decode_strings(value: Any) -> Any:
    """REST string values as bytes: ``{"b64": ...}`` decoded, plain strings UTF-8 encoded."""
    if isinstance(value, list):
        return [_decode_strings(v) for v in value]
    if isinstance(value, dict):
        return base64.b64decode(value["b64"])
    return value.encode("utf-8")


def rest_response(outputs: dict[str, Any]) -> dict[str, Any]:
    """Signature outputs as TF Serving's columnar REST reply: the bare list for a single
    output, an object keyed by output name otherwise."""
    columns = {name: np.asarray(value).tolist() for name, value in outputs.items()}
    if len(columns) == 1:
        return {"outputs": next(iter(columns.values()))}
    return {"outputs": columns}


@functools.cache
def _load(path: str) -> Any:
    """The SavedModel at ``path``, loaded once per process (as a server keeps it loaded)."""
    import tensorflow as tf

    return tf.saved_model.load(path)


def answer_locally(model_dir: str | Path, body: dict[str, Any]) -> dict[str, Any]:
    """What TF Serving would reply to the columnar ``body``, computed with the SavedModel."""
    import tensorflow as tf

    loaded = _load(str(saved_model_dir(model_dir).resolve()))
    name = body.get("signature_name", "serving_default")
    if name not in loaded.signatures:
        raise ValueError(f"No signature {name!r}; the model has {sorted(loaded.signatures)}.")
    signature = loaded.signatures[name]
    specs = signature.structured_input_signature[1]
    inputs = body["inputs"]
    if set(inputs) != set(specs):
        raise ValueError(
            f"Signature {name!r} takes the inputs {sorted(specs)}; the request has "
            f"{sorted(inputs)}."
        )
    tensors = {}
    for key, spec in specs.items():
        value = _decode_strings(inputs[key]) if spec.dtype == tf.string else inputs[key]
        try:
            tensors[key] = tf.constant(value, dtype=spec.dtype)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"Input {key!r} of signature {name!r} must be a list of {spec.dtype.name} values "
                f"(got {str(value)[:60]}): {err}"
            ) from None
    return rest_response({k: v.numpy() for k, v in signature(**tensors).items()})


def post(url: str, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """POSTs ``body`` to TF Serving's ``:predict`` URL; returns the JSON reply (``{"error": ...}``
    replies raise ``RuntimeError`` with the server's message)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")
        raise RuntimeError(f"{url} answered HTTP {e.code}: {detail}") from e


def to_json(value: Any, indent: str = "") -> str:
    """JSON with one line per input or output (lists of numbers kept on one line)."""
    inner = indent + "  "
    if isinstance(value, dict) and any(isinstance(v, dict | list) for v in value.values()):
        items = [f"{inner}{json.dumps(k)}: {to_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return "[\n" + ",\n".join(inner + to_json(v, inner) for v in value) + f"\n{indent}]"
    return json.dumps(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="SavedModel directory, or TF Serving's base directory")
    parser.add_argument(
        "--url", help="TF Serving predict URL, e.g. http://localhost:8501/v1/models/NAME:predict"
    )
    parser.add_argument("--examples", type=int, default=3, help="impressions in the request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic click log")
    parser.add_argument(
        "--examples-signature",
        action="store_true",
        help="send serialized tf.Examples to the serving_examples signature",
    )
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error("--examples must be >= 1")

    make = examples_body if args.examples_signature else request_body
    body = make(args.model_dir, args.examples, args.seed)
    print(f"request ({body['signature_name']}):", file=sys.stderr)
    print(to_json(body))
    if args.url:
        print(f"response from {args.url}:", file=sys.stderr)
        try:
            response = post(args.url, body)
        except (RuntimeError, urllib.error.URLError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    else:
        print(f"response (answered locally by {saved_model_dir(args.model_dir)}):", file=sys.stderr)
        response = answer_locally(args.model_dir, body)
    print(to_json(response))
    return 0


if __name__ == "__main__":
    sys.exit(main())
