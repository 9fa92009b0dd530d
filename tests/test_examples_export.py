"""The export examples run (reduced sizes): the TF Serving client and the migration from TF.

* ``examples/serving_request.py`` against the demo recommender exported untrained (small
  vocabularies, ``categories`` weighted): the REST body has the signature's input names and
  dtypes and lengths that add up; the local answer is TF Serving's reply, equals calling the
  signature directly and JAX's ``predict``; the base64 ``tf.Example`` body gives the same
  predictions; the CLI prints the body and the reply, locally and through ``--url`` (a stdlib HTTP
  server standing in for TF Serving).
* ``examples/migrate_from_tf.py``: every parity figure is 0 (bit-exact copies and lookups), the
  SavedModel's click probability within 1e-6 of JAX.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import pathlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("tensorflow")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import jaxembed as je  # noqa: E402
from jaxembed import export  # noqa: E402
from jaxembed.demo import data, model  # noqa: E402

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
VOCAB = {"users": 40, "items": 30, "categories": 7}
HISTORY = 4
N = 6


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def client():
    return _load("serving_request")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The demo recommender, untrained, exported as version 1 of a TF Serving base directory."""
    base = tmp_path_factory.mktemp("serving") / "recommender"
    vocabularies = data.synthetic(1, **VOCAB).vocabularies
    feature_config = model.feature_config(vocabularies, dim=8, history_length=HISTORY)
    emb = je.Embedding(feature_config)
    state = emb.init(jax.random.key(0))
    acts = {
        path: jnp.zeros((2, HISTORY, 8) if path == "history" else (2, 8)) for path in feature_config
    }
    params = model.Tower().init(jax.random.key(1), acts)
    path = export.save_serving_model(
        base,
        emb,
        state,
        model.predict,
        params,
        options=export.ExportOptions(weighted=["categories"], version=1, sample_batch_sizes=[3]),
    )
    return {"base": base, "path": path, "emb": emb, "state": state, "params": params}


@pytest.fixture(scope="module")
def signatures(exported):
    return tf.saved_model.load(exported["path"]).signatures


def _call(signature, inputs: dict) -> dict[str, np.ndarray]:
    specs = signature.structured_input_signature[1]
    tensors = {k: tf.constant(inputs[k], specs[k].dtype) for k in specs}
    return {k: v.numpy() for k, v in signature(**tensors).items()}


def test_request_body_matches_the_signature(client, exported, signatures):
    body = client.request_body(exported["base"], N, seed=3)
    assert body["signature_name"] == "serving_default"
    specs = signatures["serving_default"].structured_input_signature[1]
    inputs = body["inputs"]
    assert set(inputs) == set(specs)
    assert "categories_weights" in inputs and "history_weights" not in inputs
    assert json.loads(json.dumps(body)) == body  # plain JSON: lists of ints, floats, strings
    kinds = {tf.float32: float, tf.int64: int, tf.string: str}
    for name, values in inputs.items():
        assert isinstance(values, list), name
        assert all(type(v) is kinds[specs[name].dtype] for v in values), name
    for path in ("user", "item", "categories", "history"):
        lengths, ids = inputs[f"{path}_lengths"], inputs[f"{path}_ids"]
        assert len(lengths) == N and min(lengths) >= 0
        assert sum(lengths) == len(ids)
    assert inputs["user_lengths"] == [1] * N and inputs["item_lengths"] == [1] * N
    assert len(inputs["categories_weights"]) == len(inputs["categories_ids"])
    # Raw ids, as the client has them: the served model maps them to rows.
    log = data.synthetic(N, **VOCAB, history_length=HISTORY, seed=3)
    assert inputs["user_ids"] == log.user.tolist() and inputs["item_ids"] == log.item.tolist()
    assert inputs["categories_ids"] == log.categories.values.tolist()
    assert inputs["history_ids"] == log.history.values.tolist()
    assert max(inputs["history_lengths"]) <= HISTORY
    # the versioned directory reads the same; another seed gives another request
    assert client.request_body(exported["path"], N, seed=3) == body
    assert client.request_body(exported["base"], N, seed=4) != body


def test_answer_locally_is_the_signature_and_jax(client, exported, signatures):
    body = client.request_body(exported["base"], N, seed=3)
    response = client.answer_locally(exported["base"], body)
    assert list(response) == ["outputs"]
    ctr = response["outputs"]  # TF Serving: a single output is not keyed by its name
    assert isinstance(ctr, list) and len(ctr) == N
    assert all(isinstance(p, float) and 0.0 < p < 1.0 for p in ctr)
    direct = _call(signatures["serving_default"], body["inputs"])
    assert set(direct) == {"ctr"}
    np.testing.assert_array_equal(np.asarray(ctr, np.float32), direct["ctr"])

    log = data.synthetic(N, **VOCAB, history_length=HISTORY, seed=3)
    ids, weights = model.inputs(log)
    emb, state = exported["emb"], exported["state"]
    acts = je.embedding_lookup(ids, weights, emb.embedding_tables(state), emb.feature_config)
    want = model.predict(exported["params"], acts)["ctr"]
    np.testing.assert_allclose(ctr, np.asarray(want), rtol=1e-5, atol=1e-6)


def test_examples_body_decodes_to_the_same_predictions(client, exported):
    body = client.examples_body(exported["base"], N, seed=3)
    assert body["signature_name"] == "serving_examples"
    assert list(body["inputs"]) == ["examples"]
    encoded = body["inputs"]["examples"]
    assert len(encoded) == N and all(list(e) == ["b64"] for e in encoded)
    assert json.loads(json.dumps(body)) == body

    columns = client.request_body(exported["base"], N, seed=3)["inputs"]
    first = tf.train.Example.FromString(base64.b64decode(encoded[0]["b64"])).features.feature
    assert list(first["user"].int64_list.value) == columns["user_ids"][:1]
    n_cats = columns["categories_lengths"][0]
    names = [b.decode() for b in first["categories"].bytes_list.value]
    assert names == columns["categories_ids"][:n_cats]
    np.testing.assert_array_equal(
        np.asarray(first["categories_weights"].float_list.value, np.float32),
        np.asarray(columns["categories_weights"][:n_cats], np.float32),
    )

    by_examples = client.answer_locally(exported["base"], body)
    by_columns = client.answer_locally(exported["base"], {"inputs": columns})
    np.testing.assert_allclose(by_examples["outputs"], by_columns["outputs"], rtol=1e-6, atol=0)


def test_answer_locally_rejects_wrong_inputs(client, exported):
    body = client.request_body(exported["base"], 2)
    del body["inputs"]["categories_weights"]
    with pytest.raises(ValueError, match="categories_weights"):
        client.answer_locally(exported["base"], body)


def _json_documents(text: str) -> list:
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        doc, i = decoder.raw_decode(text, i)
        out.append(doc)
    return out


def _run_main(client, argv: list[str]) -> tuple[int, list]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = client.main(argv)
    return rc, _json_documents(stdout.getvalue())


def test_cli_prints_body_and_local_answer(client, exported):
    rc, (body, response) = _run_main(client, [str(exported["base"]), "--examples", "3"])
    assert rc == 0
    assert body == client.request_body(exported["base"], 3, seed=0)
    assert response == client.answer_locally(exported["base"], body)
    rc, (body, response) = _run_main(
        client, [str(exported["path"]), "--examples", "2", "--examples-signature"]
    )
    assert rc == 0 and body["signature_name"] == "serving_examples"
    assert len(response["outputs"]) == 2


class _FakeServing(BaseHTTPRequestHandler):
    """Answers ``POST /v1/models/NAME:predict`` as TF Serving would, from the SavedModel."""

    answer = None  # set per server: body -> reply

    def do_POST(self):  # noqa: N802 (the http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.headers["Content-Type"] == "application/json"
        if not self.path.endswith(":predict"):
            reply, code = {"error": f"no route {self.path}"}, 404
        else:
            reply, code = type(self).answer(body), 200
        data = json.dumps(reply).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_cli_posts_to_url(client, exported):
    handler = type("Handler", (_FakeServing,), {})
    handler.answer = staticmethod(lambda body: client.answer_locally(exported["base"], body))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/models/recommender:predict"
        rc, (body, response) = _run_main(client, [str(exported["base"]), "--url", url])
        assert rc == 0
        assert response == client.answer_locally(exported["base"], body)
        rc, docs = _run_main(client, [str(exported["base"]), "--url", url[: -len(":predict")]])
        assert rc == 1 and len(docs) == 1  # the body, then the server's error on stderr
    finally:
        server.shutdown()
        server.server_close()


def test_migrate_from_tf(tmp_path):
    figures = _load("migrate_from_tf").main(tmp_path, steps=2)
    exact = [
        "load_tables",
        "load_slots",
        "lookup_vs_tf",
        "train_lookup_vs_tf",
        "tf_restore",
        "tf_restore_lookup",
        "tf_restore_tpu_embedding",
    ]
    assert set(figures) == {*exact, "saved_model_vs_jax"}
    for key in exact:
        assert figures[key] == 0.0, key
    assert figures["saved_model_vs_jax"] <= 1e-6
    assert (tmp_path / "serving" / "1" / "saved_model.pb").exists()


def test_answer_locally_names_an_input_of_the_wrong_type(client, exported):
    body = client.request_body(exported["base"], N, seed=3)
    body["inputs"]["user_ids"] = [0.5] * len(body["inputs"]["user_ids"])
    with pytest.raises(TypeError, match=r"Input 'user_ids' of signature 'serving_default'.*int64"):
        client.answer_locally(exported["base"], body)
