"""Quantized serving tables (``ExportOptions(quantize=...)``, export/_quantize.py).

Each scheme (int8, float16, bfloat16, and a per-table mapping) is exported once for a set of
tables that covers the default rule (a big table, a small one, a narrow one), and checked for:
the bytes of the stored variables, served outputs equal to JAX on the dequantized tables and
within the derived error bound of the float32 export (both signatures; weighted, mean, sqrtn,
sequence and ``out_of_range="zero"`` features), a constant row coming back exactly, the
metadata, ``inspect``, and a serving graph that gathers rows and never reads a whole table.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import jax
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from jaxembed.export import _quantize, _saved_model  # noqa: E402
from jaxembed.export._inspect import describe_saved_model  # noqa: E402

import jaxembed as je  # noqa: E402
from jaxembed import export  # noqa: E402

V = 8192  # x 32 float32 = 1 MiB: quantized by default
WEIGHTED = ("item",)
EXPORTS = {
    "float32": None,
    "int8": "int8",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "mapping": {"big": "int8", "small": "float16", "wide": None},
}
CONSTANT_ROW, ZERO_ROW = 5, 6


def _features():
    big = je.TableConfig(V, 32, combiner="mean", name="big")
    wide = je.TableConfig(V, 32, combiner="sqrtn", name="wide")
    small = je.TableConfig(100, 32, combiner="sum", name="small")  # 12.8 kB: stays float32
    narrow = je.TableConfig(70_000, 4, combiner="sum", name="narrow")  # 1.1 MiB, dim 4
    return {
        "item": je.FeatureConfig(big),
        "hist": je.FeatureConfig(big, max_sequence_length=4),
        "clicked": je.FeatureConfig(big, out_of_range="zero"),
        "user": je.FeatureConfig(wide),
        "tag": je.FeatureConfig(small),
        "geo": je.FeatureConfig(narrow),
    }


@pytest.fixture(scope="module")
def trained():
    emb = je.Embedding(_features())
    state = emb.init(jax.random.key(0))
    tables = {emb.table_names[t]: np.array(v) for t, v in emb.embedding_tables(state).items()}
    tables["big"][CONSTANT_ROW] = 0.75
    tables["big"][ZERO_ROW] = 0.0
    tables["wide"] *= 40.0  # a wider range
    return emb, emb.state_from_logical(tables), tables


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    emb, state, _ = trained
    base = tmp_path_factory.mktemp("quantized")
    return {
        name: export.save_serving_model(
            base / name,
            emb,
            state,
            options=export.ExportOptions(weighted=WEIGHTED, quantize=quantize),
        )
        for name, quantize in EXPORTS.items()
    }


def _metadata(path) -> dict:
    return json.loads(Path(path, _saved_model.METADATA_FILE).read_text())


def _served_tables(emb, path) -> dict:
    """The tables the SavedModel serves, dequantized from its variables (numpy)."""
    reader = tf.train.load_checkpoint(str(Path(path, "variables", "variables")))
    out = {}
    for table, name in emb.table_names.items():
        stored = reader.get_tensor(f"tables/{name}/.ATTRIBUTES/VARIABLE_VALUE")
        scheme = _metadata(path)["tables"][name]["quantization"]
        out[table] = _quantize.dequantize(stored, scheme, table.dim)
    return out


def _row_bounds(values: np.ndarray, scheme: str | None) -> np.ndarray:
    """The largest error of each served row, from the scheme alone (not measured)."""
    top = np.abs(values).max(axis=1)
    eps = np.finfo(np.float32).eps
    if scheme == "int8":
        scale = (values.max(axis=1) - values.min(axis=1)) / 255
        return scale / 2 + 4 * eps * top
    if scheme == "float16":
        return 2.0**-11 * top + 2.0**-25
    if scheme == "bfloat16":
        return 2.0**-8 * top
    return np.zeros_like(top)


def _output_bounds(emb, samples, tables, schemes) -> dict[str, np.ndarray]:
    """Per output element: ``Σ_j |w_j| * bound(row_j)`` over the example's ids, divided by the
    combiner's denominator; per position for sequence features."""
    out = {}
    for path, feature in emb.feature_config.items():
        table = feature.table
        bounds = _row_bounds(tables[emb.table_names[table]], schemes[emb.table_names[table]])
        s = samples[path]
        ids, lengths = s["ids"], s["lengths"]
        weights = s.get("weights", np.ones(ids.size, np.float32))
        valid = (ids >= 0) & (ids < table.vocabulary_size)
        per_id = np.where(valid, bounds[np.clip(ids, 0, table.vocabulary_size - 1)], 0.0)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        rows = []
        for b in range(lengths.size):
            lo, hi = starts[b], starts[b + 1]
            if feature.max_sequence_length:
                row = np.zeros(feature.max_sequence_length)
                n = min(hi - lo, feature.max_sequence_length)
                row[:n] = per_id[lo : lo + n]
                rows.append(row)
                continue
            total = float(np.sum(np.abs(weights[lo:hi]) * per_id[lo:hi]))
            if table.combiner == "mean" and hi > lo:
                total /= abs(float(np.sum(weights[lo:hi])))
            elif table.combiner == "sqrtn" and hi > lo:
                total /= float(np.sqrt(np.sum(weights[lo:hi] ** 2)))
            rows.append(total)
        out[path] = np.asarray(rows)[..., None]  # the same for every column
    return out


def _serve_both(path, samples) -> dict[str, dict[str, np.ndarray]]:
    loaded = tf.saved_model.load(str(path))
    request = {k: tf.constant(v) for k, v in _saved_model.serving_request(samples).items()}
    default = loaded.signatures["serving_default"](**request)
    examples = tf.constant(_saved_model.serialized_examples(samples))
    parsed = loaded.signatures["serving_examples"](examples=examples)
    return {
        "serving_default": {k: v.numpy() for k, v in default.items()},
        "serving_examples": {k: v.numpy() for k, v in parsed.items()},
    }


def _samples(emb, batch: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    samples = _saved_model.sample_inputs(emb, batch, WEIGHTED, rng, min_length=0)
    # Out of range: zero rows (the last id stays valid: jaxembed's lookup reads row 0 when
    # every id of a batch is out of range, which the serving graph does not copy).
    samples["clicked"]["ids"][:-1:3] += V
    head = samples["item"]["ids"][:2]
    head[:] = [CONSTANT_ROW, ZERO_ROW][: head.size]
    return samples


@pytest.mark.parametrize("name", [n for n in EXPORTS if n != "float32"])
def test_served_outputs_equal_jax_on_served_tables_and_within_the_bound(trained, exported, name):
    emb, _, tables = trained
    path = exported[name]
    schemes = {n: t["quantization"] for n, t in _metadata(path)["tables"].items()}
    served_tables = _served_tables(emb, path)
    for batch, seed in ((1, 1), (9, 2)):
        samples = _samples(emb, batch, seed)
        want = _saved_model.jax_outputs(emb, served_tables, samples)
        floats = _serve_both(exported["float32"], samples)["serving_default"]
        bounds = _output_bounds(emb, samples, tables, schemes)
        for signature, got in _serve_both(path, samples).items():
            assert sorted(got) == sorted(want), signature
            for out, value in got.items():
                where = f"{name} {signature} {out} batch {batch}"
                np.testing.assert_allclose(value, want[out], rtol=1e-6, atol=1e-6, err_msg=where)
                error = np.abs(value - floats[out])
                slack = 1e-6 * (1 + np.abs(floats[out]))  # float32 rounding of the two sums
                assert np.all(error <= bounds[out] + slack), where
                if schemes[emb.table_names[emb.feature_config[out].table]] is not None:
                    assert error.max() > 0 or batch == 1, where  # really quantized


def test_variable_bytes(trained, exported):
    emb, *_ = trained
    tables = {n: describe_saved_model(p)["tables"] for n, p in exported.items() if n != "mapping"}
    f32 = tables["float32"]["big"]["bytes"]
    assert f32 == V * 32 * 4
    assert tables["int8"]["big"]["bytes"] == V * (32 + 8) <= 0.40 * f32
    assert tables["float16"]["big"]["bytes"] == V * 32 * 2 <= 0.60 * f32
    assert tables["bfloat16"]["big"]["bytes"] == V * 32 * 2 <= 0.60 * f32

    def data_bytes(path):
        return sum(f.stat().st_size for f in Path(path, "variables").glob("variables.data-*"))

    saved = 2 * (V * 32 * 4) - 2 * V * 40  # big and wide, float32 -> int8
    assert data_bytes(exported["int8"]) <= data_bytes(exported["float32"]) - saved + 4096


def test_small_and_narrow_tables_stay_float32_unless_named(exported):
    dtypes = {
        n: {t: info["dtype"] for t, info in _metadata(p)["tables"].items()}
        for n, p in exported.items()
    }
    assert dtypes["float32"] == dict.fromkeys(["big", "wide", "small", "narrow"], "float32")
    assert dtypes["int8"] == {
        "big": "uint8",
        "wide": "uint8",
        "small": "float32",  # < 1 MiB
        "narrow": "float32",  # dim 4: 12 bytes a row in int8 vs 16 in float32
    }
    assert dtypes["float16"] == {
        "big": "float16",
        "wide": "float16",
        "small": "float32",
        "narrow": "float16",  # >= 1 MiB: halved
    }
    assert dtypes["bfloat16"]["narrow"] == "bfloat16"
    # A mapping applies as written: the small table is quantized since it is named.
    assert dtypes["mapping"] == {
        "big": "uint8",
        "wide": "float32",
        "small": "float16",
        "narrow": "float32",
    }


def test_metadata_records_dtype_bytes_and_error(trained, exported):
    _, _, tables = trained
    meta = _metadata(exported["mapping"])
    assert meta["quantize"] == EXPORTS["mapping"]
    big = meta["tables"]["big"]
    assert big["dtype"] == "uint8" and big["quantization"] == "int8"
    assert big["shape"] == [V, 40] and big["bytes"] == V * 40 and big["float32_bytes"] == V * 128
    bound = float(_row_bounds(tables["big"], "int8").max())
    assert 0 < big["max_abs_error"] <= bound
    small = meta["tables"]["small"]
    assert small["dtype"] == "float16" and small["bytes"] == 100 * 32 * 2
    assert 0 < small["max_abs_error"] <= float(_row_bounds(tables["small"], "float16").max())
    assert meta["tables"]["wide"] == {
        "dtype": "float32",
        "shape": [V, 32],
        "bytes": V * 128,
        "float32_bytes": V * 128,
        "quantization": None,
        "max_abs_error": 0.0,
    }
    assert _metadata(exported["float32"])["quantize"] is None


def test_inspect_shows_dtype_and_bytes(exported):
    info = describe_saved_model(exported["int8"])
    assert info["tables"]["big"] == {
        "dtype": "uint8",
        "shape": [V, 40],
        "bytes": V * 40,
        "float32_bytes": V * 128,
        "quantization": "int8",
        "max_abs_error": pytest.approx(
            _metadata(exported["int8"])["tables"]["big"]["max_abs_error"]
        ),
    }
    assert info["tables"]["small"]["dtype"] == "float32"
    assert describe_saved_model(exported["bfloat16"])["tables"]["wide"]["dtype"] == "bfloat16"


def test_constant_row_round_trips_exactly(trained, exported):
    emb, _, tables = trained
    for name in ("int8", "float16", "bfloat16"):
        served = _served_tables(emb, exported[name])
        big = next(t for t in emb.table_names if emb.table_names[t] == "big")
        np.testing.assert_array_equal(served[big][CONSTANT_ROW], np.full(32, 0.75, np.float32))
        np.testing.assert_array_equal(served[big][ZERO_ROW], np.zeros(32, np.float32))
    serve = tf.saved_model.load(exported["int8"]).signatures["serving_default"]
    samples = _samples(emb, 2, 0)
    samples["hist"] = {"ids": np.array([CONSTANT_ROW, ZERO_ROW, 1]), "lengths": np.array([2, 1])}
    request = {k: tf.constant(v) for k, v in _saved_model.serving_request(samples).items()}
    hist = serve(**request)["hist"].numpy()
    np.testing.assert_array_equal(hist[0, 0], np.full(32, 0.75, np.float32))
    np.testing.assert_array_equal(hist[0, 1:], 0.0)
    # Constant rows of every sign and size, and a row of one value plus its float32 neighbour.
    rows = np.array([[-3.5] * 8, [1e30] * 8, [0.0] * 8, [1.0] * 7 + [np.nextafter(1.0, 2)]])
    rows = rows.astype(np.float32)
    back = _quantize.dequantize(_quantize.quantize(rows, "int8"), "int8", 8)
    np.testing.assert_array_equal(back[:3], rows[:3])
    assert np.abs(back[3] - rows[3]).max() <= np.finfo(np.float32).eps


def test_out_of_range_zero_with_int8(trained, exported):
    emb, *_ = trained
    serve = tf.saved_model.load(exported["int8"]).signatures["serving_default"]
    samples = _samples(emb, 3, 4)
    samples["clicked"] = {
        "ids": np.array([-1, 3, V, V + 7, 2], np.int64),
        "lengths": np.array([2, 2, 1], np.int64),
    }
    request = {k: tf.constant(v) for k, v in _saved_model.serving_request(samples).items()}
    got = serve(**request)["clicked"].numpy()
    served = _served_tables(emb, exported["int8"])
    big = served[emb.feature_config["clicked"].table]
    np.testing.assert_array_equal(got[0], big[3] / 2)  # mean: the zero row is counted
    np.testing.assert_array_equal(got[1], np.zeros(32, np.float32))
    np.testing.assert_array_equal(got[2], big[2])
    want = _saved_model.jax_outputs(emb, served, samples)["clicked"]
    np.testing.assert_array_equal(got, want)


def _graph_ops(concrete) -> list:
    graph = concrete.graph.as_graph_def()
    nodes = list(graph.node)
    for f in graph.library.function:
        nodes += list(f.node_def)
    return nodes


@pytest.mark.parametrize("name", list(EXPORTS))
def test_graph_gathers_rows_and_never_reads_a_whole_table(trained, exported, name):
    """Lookup only: the only ops reading a table variable are gathers (one per table), the
    saved signatures hold no ``ReadVariableOp`` (it would read a whole table), and no op outputs
    a static ``[V, ...]`` tensor."""
    emb, state, _ = trained
    loaded = tf.saved_model.load(exported[name])
    for key in ("serving_default", "serving_examples"):
        ops = collections.Counter(n.op for n in _graph_ops(loaded.signatures[key]))
        assert ops["ReadVariableOp"] == 0, (name, key)
        assert ops["ResourceGather"] + ops["GatherV2"] == 4, (name, key, ops)
    options = export.ExportOptions(weighted=WEIGHTED, quantize=EXPORTS[name])
    module = _saved_model._ServingModule(emb, state, None, None, options)
    for fn in (module.serve, module.serve_examples):
        readers = collections.Counter()
        for op in fn.get_concrete_function().graph.get_operations():
            if any(t.dtype == tf.resource for t in op.inputs):
                readers[op.type] += 1
            for out in op.outputs:
                dims = out.shape.as_list() if out.shape.rank else []
                assert not dims or dims[0] not in (V, 70_000), (op.type, op.name, dims)
        assert readers == {"ResourceGather": 4}, readers


def test_int8_with_a_model_is_verified_against_jax_on_served_tables(trained, tmp_path):
    emb, state, _ = trained

    def model(params, acts):
        score = (acts["user"] * params["w"]).sum(-1) + acts["item"].sum(-1)
        return {"score": score + acts["hist"].sum((1, 2)) + acts["geo"].sum(-1)}

    params = {"w": np.linspace(-1, 1, 32).astype(np.float32)}
    options = export.ExportOptions(weighted=WEIGHTED, quantize="int8")
    path = export.save_serving_model(tmp_path / "m", emb, state, model, params, options=options)
    samples = _samples(emb, 5, 8)
    want = _saved_model.jax_outputs(emb, _served_tables(emb, path), samples, model, params)
    for signature, got in _serve_both(path, samples).items():
        np.testing.assert_allclose(
            got["score"], want["score"], rtol=1e-5, atol=1e-5, err_msg=signature
        )


@pytest.mark.parametrize(
    "quantize, error, match",
    [
        ("int4", ValueError, r"quantize='int4' is not a quantization; choose None, 'int8'"),
        ({"big": "fp8"}, ValueError, r"maps table 'big' to 'fp8'.*choose None, 'int8'"),
        (8, TypeError, r"quantize must be None, 'int8', 'float16' or 'bfloat16'.*got int 8"),
        ({3: "int8"}, TypeError, r"keys must be table names"),
    ],
)
def test_bad_quantize_options(quantize, error, match):
    with pytest.raises(error, match=match):
        export.ExportOptions(quantize=quantize)


def test_unknown_table_and_unrepresentable_values_are_errors(trained, tmp_path):
    emb, state, tables = trained
    options = export.ExportOptions(quantize={"bigg": "int8"})
    with pytest.raises(ValueError, match=r"names \['bigg'\].*tables are \['big', 'narrow'"):
        export.save_serving_model(tmp_path / "a", emb, state, options=options)
    huge = dict(tables, small=tables["small"] * 1e6)
    options = export.ExportOptions(quantize={"small": "float16"})
    with pytest.raises(ValueError, match=r"Table 'small' holds values too large for float16"):
        export.save_serving_model(
            tmp_path / "b", emb, emb.state_from_logical(huge), options=options
        )
    assert not any(tmp_path.iterdir())
