"""SavedModel export: served by TF alone (no JAX in the process), plain TF ops, checked publish.

The SavedModels are loaded in a subprocess that blocks ``jax``, ``flax`` and ``jaxembed`` imports
(``export/_serve_worker.py``), through the eager signatures and through TF1's session loader,
for two batch sizes, with and without a Flax model, and compared with the JAX outputs computed
here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402
from tensorflow.python.framework import op_def_registry  # noqa: E402

import jaxembed as je  # noqa: E402
from jaxembed import export  # noqa: E402

BATCHES = (3, 8)
WEIGHTED = ("ctx/cats",)


def _features():
    users = je.TableConfig(5000, 16, combiner="sum", name="users")  # 80k floats: not a Const
    items = je.TableConfig(60, 8, combiner="mean", name="items")
    tags = je.TableConfig(30, 4, combiner="sqrtn", name="tags")
    return {
        "user": je.FeatureConfig(users, name="user_id"),
        "ctx": {
            "cats": je.FeatureConfig(items, name="categories"),
            "hist": je.FeatureConfig(items, max_sequence_length=4, name="history"),
        },
        "tags": [je.FeatureConfig(tags, name="tags")],
    }


class Tower(nn.Module):
    """A small ranking tower: pooled history, concatenation, MLP, LayerNorm, two heads."""

    @nn.compact
    def __call__(self, acts):
        hist = acts["ctx"]["hist"].mean(axis=1)
        x = jnp.concatenate([acts["user"], acts["ctx"]["cats"], hist, acts["tags"][0]], -1)
        x = nn.LayerNorm()(nn.relu(nn.Dense(1000)(x)))  # a 36x1000 kernel: a variable
        logit = nn.Dense(1)(nn.gelu(nn.Dense(8)(x)))[:, 0]
        return {"ctr": nn.sigmoid(logit), "logit": logit}


def _random_ragged(rng, batch: int, vocab: int, longest: int, weighted: bool) -> dict:
    lengths = rng.integers(0, longest + 1, size=batch).astype(np.int64)
    ids = rng.integers(0, vocab, size=int(lengths.sum())).astype(np.int64)
    out = {"ids": ids, "lengths": lengths}
    if weighted:
        out["weights"] = rng.uniform(0.2, 3.0, size=ids.size).astype(np.float32)
    return out


def _requests(emb, batch: int, seed: int) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    paths = dict(je.lookup.feature_paths(emb.feature_config))
    return {
        path: _random_ragged(rng, batch, f.table.vocabulary_size, 6, path in WEIGHTED)
        for path, f in paths.items()
    }


def _nest_like(emb, leaves: dict) -> dict:
    return {
        "user": leaves["user"],
        "ctx": {"cats": leaves["ctx/cats"], "hist": leaves["ctx/hist"]},
        "tags": [leaves["tags/0"]],
    }


def _jax_activations(emb, state, request: dict) -> dict:
    ids = {p: je.Ragged.from_row_lengths(r["ids"], r["lengths"]) for p, r in request.items()}
    weights = {
        p: je.Ragged.from_row_lengths(r["weights"], r["lengths"]) if "weights" in r else None
        for p, r in request.items()
    }
    tables = emb.embedding_tables(state)
    return je.embedding_lookup(
        _nest_like(emb, ids), _nest_like(emb, weights), tables, emb.feature_config
    )


def _signature_inputs(request: dict) -> dict[str, np.ndarray]:
    return {f"{p.replace('/', '_')}_{k}": v for p, r in request.items() for k, v in r.items()}


def _examples(request: dict) -> list[bytes]:
    """One serialized tf.Example per row: int64 feature = path, float feature = path_weights."""
    batch = len(next(iter(request.values()))["lengths"])
    starts = {p: np.concatenate([[0], np.cumsum(r["lengths"])]) for p, r in request.items()}
    out = []
    for i in range(batch):
        feature = {}
        for path, r in request.items():
            lo, hi = starts[path][i], starts[path][i + 1]
            feature[path] = tf.train.Feature(int64_list=tf.train.Int64List(value=r["ids"][lo:hi]))
            if "weights" in r:
                values = r["weights"][lo:hi]
                feature[f"{path}_weights"] = tf.train.Feature(
                    float_list=tf.train.FloatList(value=values)
                )
        out.append(
            tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
        )
    return out


@pytest.fixture(scope="module")
def trained():
    """An Embedding trained for two Adagrad steps, and a Flax tower's params."""
    emb = je.Embedding(_features(), je.optimizers.Adagrad(0.5))
    state = emb.init(jax.random.key(0))
    for seed in (1, 2):
        request = _requests(emb, 6, seed)
        ids = {p: je.Ragged.from_row_lengths(r["ids"], r["lengths"]) for p, r in request.items()}
        batch = emb.preprocess(_nest_like(emb, ids))
        acts = emb.lookup(state, batch)
        state = emb.apply_gradients(state, batch, jax.tree.map(jnp.ones_like, acts))
    tower = Tower()
    params = tower.init(jax.random.key(3), _jax_activations(emb, state, _requests(emb, 2, 0)))
    return emb, state, tower.apply, params


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    emb, state, model, params = trained
    base = tmp_path_factory.mktemp("export")
    options = export.ExportOptions(weighted=WEIGHTED)
    return {
        "plain": export.save_serving_model(base / "plain", emb, state, options=options),
        "flax": export.save_serving_model(
            base / "flax", emb, state, model, params, options=options
        ),
    }


@pytest.fixture(scope="module")
def served(trained, exported, tmp_path_factory):
    """Runs every (model, batch) case through the JAX-free worker; returns (expected, got)."""
    from jaxembed.export import _serve_worker

    emb, state, model, params = trained
    cases, expected = {}, {}
    for name, path in exported.items():
        for batch in BATCHES:
            case = f"{name}-{batch}"
            request = _requests(emb, batch, seed=100 + batch)
            cases[case] = {
                "path": path,
                "inputs": _signature_inputs(request),
                "examples": _examples(request),
            }
            acts = _jax_activations(emb, state, request)
            if name == "plain":
                flat = je._nest.flatten_with_paths(acts)
                expected[case] = {p.replace("/", "_"): np.asarray(a) for p, a in flat}
            else:
                expected[case] = {k: np.asarray(v) for k, v in model(params, acts).items()}
    got = _serve_worker.run(cases, str(tmp_path_factory.mktemp("worker")))
    return expected, got


@pytest.mark.parametrize("loader", ["eager", "examples", "session"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", ["plain", "flax"])
def test_served_outputs_match_jax(served, name, batch, loader):
    expected, got = served
    case = f"{name}-{batch}"
    assert sorted(got[case][loader]) == sorted(expected[case])
    for out_name, want in expected[case].items():
        have = got[case][loader][out_name]
        assert have.shape == want.shape, out_name
        if name == "plain":  # the lookup is bit-exact
            np.testing.assert_array_equal(have, want, err_msg=out_name)
        else:  # TF's and XLA's float32 matmuls may round differently
            np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6, err_msg=out_name)


def _all_nodes(path: str):
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(Path(path, "saved_model.pb").read_bytes())
    for meta in proto.meta_graphs:
        functions = {f.signature.name for f in meta.graph_def.library.function}
        yield from ((n, functions) for n in meta.graph_def.node)
        for f in meta.graph_def.library.function:
            yield from ((n, functions) for n in f.node_def)


@pytest.mark.parametrize("name", ["plain", "flax"])
def test_graph_has_only_plain_tf_ops(exported, name):
    ops = set()
    for node, functions in _all_nodes(exported[name]):
        if node.op not in functions:  # calls of the library's own functions
            ops.add(node.op)
    assert "ResourceGather" in ops or "GatherV2" in ops
    bad = sorted(
        op
        for op in ops
        if op.startswith("Xla")
        or "TPU" in op.upper()
        or op in {"PyFunc", "PyFuncStateless", "EagerPyFunc", "XlaCallModule"}
        or op_def_registry.get(op) is None  # not a registered core op: a custom op
    )
    assert not bad, f"ops stock CPU TF Serving may not have: {bad}"


@pytest.mark.parametrize("name", ["plain", "flax"])
def test_no_large_constants(exported, name):
    largest = 0
    for node, _ in _all_nodes(exported[name]):
        if node.op == "Const":
            dims = [d.size for d in node.attr["value"].tensor.tensor_shape.dim]
            largest = max(largest, int(np.prod(dims)) if dims else 1)
    assert largest <= 1024, f"a Const of {largest} elements: tables and params must be variables"
    variables = dict(tf.train.list_variables(str(Path(exported[name], "variables/variables"))))
    shapes = sorted(tuple(s) for s in variables.values())
    assert (5000, 16) in shapes
    if name == "flax":
        assert (36, 1000) in shapes


def test_signatures_have_dynamic_batch_and_documented_names(exported):
    loaded = tf.saved_model.load(exported["plain"])
    _, inputs = loaded.signatures["serving_default"].structured_input_signature
    assert sorted(inputs) == sorted(
        [
            "ctx_cats_ids",
            "ctx_cats_lengths",
            "ctx_cats_weights",
            "ctx_hist_ids",
            "ctx_hist_lengths",
            "tags_0_ids",
            "tags_0_lengths",
            "user_ids",
            "user_lengths",
        ]
    )
    assert all(spec.shape.as_list() == [None] for spec in inputs.values())
    assert inputs["ctx_cats_weights"].dtype == tf.float32
    assert inputs["user_ids"].dtype == tf.int64
    _, ex = loaded.signatures["serving_examples"].structured_input_signature
    assert list(ex) == ["examples"] and ex["examples"].dtype == tf.string
    outputs = loaded.signatures["serving_default"].structured_outputs
    assert outputs["ctx_hist"].shape.as_list() == [None, 4, 8]
    assert outputs["user"].shape.as_list() == [None, 16]


def test_bad_requests_raise_errors_naming_the_feature(exported, trained):
    emb, *_ = trained
    serve = tf.saved_model.load(exported["plain"]).signatures["serving_default"]
    request = _signature_inputs(_requests(emb, 2, 5))
    bad = dict(request, user_ids=np.full_like(request["user_ids"], 5000))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"feature user: .*\[0, 5000\)"):
        serve(**{k: tf.constant(v) for k, v in bad.items()})
    bad = dict(request, tags_0_lengths=request["tags_0_lengths"] + 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="feature tags/0: .*add up"):
        serve(**{k: tf.constant(v) for k, v in bad.items()})


def test_verification_failure_publishes_nothing(trained, tmp_path, monkeypatch):
    from jaxembed.export import _saved_model

    emb, state, *_ = trained
    real = _saved_model.jax_outputs

    def off_by_a_bit(*args, **kwargs):
        return {k: v + 1e-3 for k, v in real(*args, **kwargs).items()}

    monkeypatch.setattr(_saved_model, "jax_outputs", off_by_a_bit)
    with pytest.raises(export.ExportVerificationError, match="differs from JAX"):
        export.save_serving_model(tmp_path / "m", emb, state)
    assert list(tmp_path.iterdir()) == []  # no model, no temporary directory


def test_versioned_layout_and_overwrite(trained, tmp_path):
    emb, state, *_ = trained
    options = export.ExportOptions(version=1, verify=False)
    path = export.save_serving_model(tmp_path, emb, state, options=options)
    assert Path(path) == tmp_path / "1" and (tmp_path / "1" / "saved_model.pb").exists()
    with pytest.raises(FileExistsError, match="overwrite"):
        export.save_serving_model(tmp_path, emb, state, options=options)
    again = export.ExportOptions(version=1, verify=False, overwrite=True)
    export.save_serving_model(tmp_path, emb, state, options=again)
    export.save_serving_model(tmp_path, emb, state, options=export.ExportOptions(version=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_sharded_state_exports_logical_tables(tmp_path):
    mesh = jax.make_mesh((8,), ("x",))
    emb = je.Embedding(_features(), je.optimizers.SGD(0.1), mesh=mesh)
    single = je.Embedding(emb.feature_config, je.optimizers.SGD(0.1))
    state = emb.init(jax.random.key(7))
    options = export.ExportOptions(weighted=WEIGHTED)
    path = export.save_serving_model(tmp_path / "m", emb, state, options=options)  # verified
    served = tf.saved_model.load(path).signatures["serving_default"]
    request = _requests(emb, 4, 9)
    got = served(**{k: tf.constant(v) for k, v in _signature_inputs(request).items()})
    tables = {single.table_names[t]: v for t, v in emb.embedding_tables(state).items()}
    want = _jax_activations(single, single.state_from_logical(tables), request)
    for path, value in je._nest.flatten_with_paths(want):
        np.testing.assert_array_equal(got[path.replace("/", "_")].numpy(), np.asarray(value))


@pytest.mark.parametrize(
    "options, match",
    [
        (export.ExportOptions(weighted=["nope"]), "not a feature path"),
        (export.ExportOptions(weighted=["ctx/hist"]), "sequence feature"),
    ],
)
def test_bad_options_are_rejected(trained, tmp_path, options, match):
    emb, state, *_ = trained
    with pytest.raises(ValueError, match=match):
        export.save_serving_model(tmp_path / "m", emb, state, options=options)


def test_bare_feature_config_is_refused_with_the_dict_that_exports_its_state(tmp_path):
    """A bare FeatureConfig names no input; the error's fix (the same state under a dict of
    it) exports and serves the trained table."""
    table = je.TableConfig(50, 4, combiner="sum", name="t")
    bare = je.Embedding(je.FeatureConfig(table), je.optimizers.Adagrad(0.1))
    state = bare.init(jax.random.key(0))
    batch = bare.preprocess(np.array([1, 2, 3]))
    state = bare.apply_gradients(state, batch, bare.lookup(state, batch))
    with pytest.raises(ValueError, match=r"bare FeatureConfig .*je.Embedding\(\{'item'"):
        export.save_serving_model(tmp_path / "bare", bare, state)
    named = je.Embedding({"item": je.FeatureConfig(table)}, je.optimizers.Adagrad(0.1))
    path = export.save_serving_model(tmp_path / "named", named, state)
    served = tf.saved_model.load(path).signatures["serving_default"]
    got = served(
        item_ids=tf.constant([1, 2, 3], tf.int64), item_lengths=tf.constant([2, 1], tf.int64)
    )
    (trained,) = bare.embedding_tables(state).values()
    want = np.stack([trained[1] + trained[2], trained[3]])
    np.testing.assert_array_equal(got["item"].numpy(), want)


def test_model_with_output_shape_feature_is_rejected(tmp_path):
    table = je.TableConfig(10, 4, name="t")
    emb = je.Embedding({"a": je.FeatureConfig(table, output_shape=[2, 2])})
    state = emb.init(jax.random.key(0))
    with pytest.raises(ValueError, match="output_shape"):
        export.save_serving_model(tmp_path / "m", emb, state, lambda p, a: a["a"], {})


def test_output_shape_feature_without_model(tmp_path):
    """Ragged output_shape works with a dynamic batch (TF's own fails in tf.function, P6)."""
    table = je.TableConfig(10, 4, combiner="sum", name="t")
    emb = je.Embedding({"a": je.FeatureConfig(table, output_shape=[2, 3])})
    state = emb.init(jax.random.key(0))
    path = export.save_serving_model(tmp_path / "m", emb, state)
    served = tf.saved_model.load(path).signatures["serving_default"]
    tables = emb.embedding_tables(state)
    for lengths in ([1, 2, 0, 3, 1, 1], [2, 0, 4], [5, 1]):  # batch 6: combine; 3, 2: sequence
        lengths = np.array(lengths, np.int64)
        ids = np.arange(lengths.sum(), dtype=np.int64) % 10
        got = served(a_ids=tf.constant(ids), a_lengths=tf.constant(lengths))["a"].numpy()
        want = je.embedding_lookup(
            {"a": je.Ragged.from_row_lengths(ids, lengths)}, None, tables, emb.feature_config
        )["a"]
        np.testing.assert_array_equal(got, np.asarray(want))


def _op_counts(concrete) -> dict[str, int]:
    graph = concrete.graph.as_graph_def()
    counts: dict[str, int] = {}
    for node in list(graph.node) + [n for f in graph.library.function for n in f.node_def]:
        counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def test_lookup_is_one_gather_per_table_and_few_ops(exported):
    """Three tables, four features (two share ``items``): three gathers and a small graph in
    both signatures (251 ops for serving_default; the per-feature ragged lookup took 1577)."""
    loaded = tf.saved_model.load(exported["plain"])
    for key in ("serving_default", "serving_examples"):
        counts = _op_counts(loaded.signatures[key])
        assert counts.get("ResourceGather", 0) + counts.get("GatherV2", 0) == 3, (key, counts)
        assert counts.get("UnsortedSegmentSum", 0) <= 4, (key, counts)  # 3 tables + a mean's Σw
        assert sum(counts.values()) < 400, (key, sum(counts.values()))


@pytest.mark.parametrize(
    "samples, message",
    [
        ({"items": {"ids": np.array([1, 2])}}, r"feature 'items' has arrays \['ids'\].*'lengths'"),
        (
            {"items": {"ids": np.array([1, 2]), "lengths": np.array([1, 2])}},
            r"feature 'items' has 2 ids but its lengths add up to 3",
        ),
        (
            {
                "a": {"ids": np.array([1]), "lengths": np.array([1])},
                "b": {"ids": np.array([1]), "lengths": np.array([1, 0])},
            },
            r"batch sizes \[1, 2\]",
        ),
    ],
)
def test_serialized_examples_refuses_samples_out_of_its_layout(samples, message):
    with pytest.raises(ValueError, match=message):
        export.serialized_examples(samples)
