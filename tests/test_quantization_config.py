"""``je.QuantizationConfig``: TF's simulated quantization of looked-up rows.

* Validation against TF's own class on a grid of values: where TF rejects, jaxembed rejects with
  the same exception type (and TF's message); where TF accepts but fails when it writes the TPU
  config (``_set_optimization_parameters``), jaxembed rejects up front with the same type;
  jaxembed also rejects limits TF takes but cannot quantize with (documented in the class).
* The level formula (``optimization_parameters.proto``, ``SimulatedQuantization``) against a
  literal float32 numpy transcription, bit for bit, eagerly and under ``jit``.
* Lookups: dense, ragged and sparse inputs, every combiner, with and without weights, equal bit
  for bit to the lookup of a pre-quantized table (quantization is elementwise) and, with TF, to
  TF's ``serving_embedding_lookup`` of that table (TF's summation order); without TF, to a
  float64 numpy reference.
* Straight-through gradients; the ``Embedding`` on one device (CPU kernels on and off) and on an
  8-device mesh with every sharding strategy; cost that follows the rows (no whole-table pass).
* ``TableConfig`` signature and repr, checkpoint metadata round trip, ``to_tf`` and the TF
  ``simulate`` of the serving graph (bit for bit the JAX one).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import numpy_reference as npref
import pytest
from tf_reference import assert_matches_tf, tf_lookup
from tf_reference import tf_embedding as tf_emb

import jaxembed as je
from jaxembed import _kernels
from jaxembed.lookup import simulate_quantization

Q = je.QuantizationConfig


def _tf_proto():
    pytest.importorskip("tensorflow")
    from tensorflow.core.protobuf.tpu import optimization_parameters_pb2

    return optimization_parameters_pb2


def _reference(x, num_buckets, lower, upper) -> np.ndarray:
    """The proto's formula, transcribed literally in float32 numpy (no jaxembed code)."""
    x = np.asarray(x, np.float32)
    lo, hi = np.float32(lower), np.float32(upper)
    quantum = np.float32(hi - lo) / np.float32(num_buckets - 1)
    clipped = np.minimum(np.maximum(x, lo), hi)
    clipped = np.where(np.isnan(x), x, clipped)
    return (np.floor((clipped - lo) / quantum + np.float32(0.5)) * quantum + lo).astype(np.float32)


def _bits_equal(a, b) -> None:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    nan = np.isnan(a)
    np.testing.assert_array_equal(nan, np.isnan(b))
    np.testing.assert_array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32))


CONFIGS = [
    (2, -1.0, 1.0),
    (3, 0.0, 2.0),
    (5, -1.0, 1.0),
    (7, -0.3, 0.7),
    (11, 0.1, 0.9),
    (256, -0.5, 0.5),
    (1000, -1e-3, 1e-3),
    (2**20, -5.5, 3.25),
    (2**31 - 1, -1e4, 1e4),
]


def _values(config: je.QuantizationConfig, n: int = 4096, seed: int = 0) -> np.ndarray:
    """Random values around the range, every level, every half-level and their neighbours, and
    the special values."""
    rng = np.random.default_rng(seed)
    lower, upper, quantum = config.float32_parameters()
    span = float(upper - lower)
    random = rng.uniform(float(lower) - span / 2, float(upper) + span / 2, n).astype(np.float32)
    k = np.arange(-3, min(config.num_buckets, 40) + 3, dtype=np.float32)
    levels = np.concatenate([k * quantum + lower, (k + np.float32(0.5)) * quantum + lower])
    levels = levels.astype(np.float32)
    near = [np.nextafter(levels, np.float32(np.inf)), np.nextafter(levels, np.float32(-np.inf))]
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30, 1e-40], np.float32)
    return np.concatenate([random, levels, *near, special]).astype(np.float32)


# --- validation against TF's class --------------------------------------------------------------

NUM_BUCKETS = [
    0,
    1,
    2,
    3,
    -1,
    1.5,
    2.0,
    2.5,
    np.float32(3),
    np.int64(3),
    np.uint8(4),
    float("nan"),
    float("inf"),
    -float("inf"),
    True,
    False,
    "3",
    None,
    3 + 0j,
    2**31 - 1,
    2**31,
]
LIMITS = [
    (-1.0, 1.0),
    (-1, 1),
    (np.float32(-0.25), np.float64(0.75)),
    (1.0, -1.0),
    (1.0, 1.0),
    (1.0, 1.0 + 1e-12),  # the same float32
    (float("nan"), 1.0),
    (0.0, float("nan")),
    (-float("inf"), 1.0),
    (0.0, float("inf")),
    (-1e39, 1.0),  # -inf as a float32
    ("a", 1.0),
    (None, 1.0),
    (True, 2.0),
    (-3e38, 3e38),  # an infinite float32 range
    (0.0, 1e-44),  # a (denormal) step of 0 or below float32's smallest normal
]


def _tf_outcome(num_buckets, lower, upper) -> tuple[str, type | None, str]:
    """("ctor" | "proto" | "ok", exception type, message) of TF's class and its proto write."""
    pb = _tf_proto()
    try:
        config = tf_emb.QuantizationConfig(num_buckets, lower, upper)
    except Exception as err:  # noqa: BLE001 - any exception type is part of the comparison
        return "ctor", type(err), str(err)
    try:
        config._set_optimization_parameters(pb.OptimizationParameters())
    except Exception as err:  # noqa: BLE001
        return "proto", type(err), str(err)
    return "ok", None, ""


def _our_outcome(num_buckets, lower, upper) -> tuple[type | None, str]:
    try:
        Q(num_buckets, lower, upper)
    except (ValueError, TypeError) as err:
        return type(err), str(err)
    return None, ""


@pytest.mark.parametrize("num_buckets", NUM_BUCKETS, ids=repr)
def test_num_buckets_accepted_and_rejected_like_tf(num_buckets):
    stage, tf_error, tf_message = _tf_outcome(num_buckets, -1.0, 1.0)
    ours, message = _our_outcome(num_buckets, -1.0, 1.0)
    if stage == "ok":
        assert ours is None, message
        assert Q(num_buckets, -1.0, 1.0).num_buckets == int(num_buckets)
        return
    # TF rejects it, in the constructor or when it writes the TPU config: so do we, up front,
    # with the same exception type; where the constructor rejects with ValueError, TF's message.
    assert ours is tf_error, (stage, tf_error, tf_message, ours, message)
    if stage == "ctor" and tf_error is ValueError:
        assert message == tf_message
    else:
        assert "num_buckets" in message and repr(num_buckets) in message


@pytest.mark.parametrize(("lower", "upper"), LIMITS, ids=repr)
def test_limits_accepted_and_rejected_like_tf_or_documented(lower, upper):
    stage, tf_error, _ = _tf_outcome(5, lower, upper)
    ours, message = _our_outcome(5, lower, upper)
    if stage != "ok":  # TF's proto write fails (non-numbers): same type, up front
        assert stage == "proto" and ours is tf_error, (stage, tf_error, ours, message)
        return
    with np.errstate(over="ignore"):  # limits beyond float32 are part of the grid
        lo, hi = (np.float32(v) for v in (lower, upper))
        garbage = (
            isinstance(lower, bool)
            or isinstance(upper, bool)
            or not (np.isfinite(lo) and np.isfinite(hi))
            or not lo < hi
            or not np.isfinite(np.float32(hi - lo))
            or np.float32(hi - lo) / np.float32(4) < np.finfo(np.float32).tiny
        )
    if not garbage:
        assert ours is None, message
        return
    # TF accepts these but cannot quantize with them (documented in QuantizationConfig).
    assert ours is (TypeError if isinstance(lower, bool) else ValueError), message
    assert "lower" in message or "upper" in message or "step" in message


def test_config_is_frozen_hashable_and_has_tfs_signature_and_repr():
    config = Q(10, -1.0, 1.0)
    assert list(inspect.signature(Q).parameters) == ["num_buckets", "lower", "upper"]
    assert all(
        p.default is inspect.Parameter.empty for p in inspect.signature(Q).parameters.values()
    )
    assert repr(config) == "QuantizationConfig(num_buckets=10, lower=-1.0, upper=1.0)"
    assert repr(config) == repr(tf_emb.QuantizationConfig(10, -1.0, 1.0))
    assert config == Q(10, -1, 1) and hash(config) == hash(Q(10, -1, 1)) and config != Q(9, -1, 1)
    assert Q(num_buckets=10, lower=-1.0, upper=1.0) == config
    with pytest.raises(AttributeError):
        config.num_buckets = 3  # type: ignore[misc]
    assert isinstance(Q(np.int64(3), np.float32(0.5), 1).lower, float)


def test_float32_parameters():
    lower, upper, quantum = Q(11, 0.1, 0.9).float32_parameters()
    assert (lower, upper) == (np.float32(0.1), np.float32(0.9))
    assert quantum == np.float32(np.float32(0.9) - np.float32(0.1)) / np.float32(10)
    assert all(isinstance(v, np.float32) for v in (lower, upper, quantum))


# --- TableConfig ------------------------------------------------------------------------------


def test_table_config_takes_it_at_tfs_position():
    ours = list(inspect.signature(je.TableConfig).parameters)
    theirs = list(inspect.signature(tf_emb.TableConfig).parameters)
    assert ours == theirs[: len(ours)] and ours[-1] == "quantization_config"
    config = Q(4, 0.0, 1.0)
    table = je.TableConfig(8, 4, None, None, "sum", "t", config)
    assert table.quantization_config is config
    assert je.TableConfig(8, 4).quantization_config is None
    assert tf_emb.TableConfig(8, 4).quantization_config is None


def test_table_config_repr_matches_tf_with_quantization():
    table = je.TableConfig(2, 4, combiner="sum", name="table", quantization_config=Q(10, -1, 1))
    tf_table = tf_emb.TableConfig(
        2,
        4,
        combiner="sum",
        name="table",
        quantization_config=tf_emb.QuantizationConfig(10, -1.0, 1.0),
    )
    assert repr(table) == repr(tf_table)
    assert "quantization_config" not in repr(je.TableConfig(2, 4))


@pytest.mark.parametrize("bad", [(10, -1.0, 1.0), {"num_buckets": 3}, "int8"], ids=repr)
def test_table_config_rejects_other_quantization_configs(bad):
    with pytest.raises(ValueError, match="quantization_config"):
        je.TableConfig(8, 4, quantization_config=bad)


def test_table_config_rejects_tfs_quantization_config():
    with pytest.raises(ValueError, match="je.QuantizationConfig"):
        je.TableConfig(8, 4, quantization_config=tf_emb.QuantizationConfig(10, -1.0, 1.0))


def test_tables_with_equal_quantization_stay_distinct():
    a = je.TableConfig(8, 4, quantization_config=Q(4, 0, 1))
    b = je.TableConfig(8, 4, quantization_config=Q(4, 0, 1))
    assert a != b and len({a: 1, b: 2}) == 2 and a.quantization_config == b.quantization_config


# --- the formula ------------------------------------------------------------------------------


@pytest.mark.parametrize("args", CONFIGS, ids=str)
def test_levels_match_the_formula_bit_for_bit(args):
    config = Q(*args)
    x = _values(config)
    want = _reference(x, *args)
    _bits_equal(config.quantize(x), want)
    _bits_equal(simulate_quantization(jnp.asarray(x), config), want)
    jitted = jax.jit(simulate_quantization, static_argnums=1)
    _bits_equal(jitted(jnp.asarray(x).reshape(-1, 1), config).reshape(-1), want)
    # Inside a bigger program (fused with what consumes it), still the same bits.
    fused = jax.jit(lambda r: simulate_quantization(r, config) * 2 + 1)(jnp.asarray(x))
    _bits_equal(fused, want * np.float32(2) + np.float32(1))


@pytest.mark.parametrize("args", CONFIGS, ids=str)
def test_levels_are_the_num_buckets_grid(args):
    config = Q(*args)
    lower, upper, quantum = config.float32_parameters()
    x = _values(config)
    x = x[np.isfinite(x)]
    got = config.quantize(x)
    assert np.all(got >= lower) and np.all(got <= upper + quantum / 2)
    levels = np.floor((got - lower) / quantum + np.float32(0.5))
    assert levels.min() >= 0 and levels.max() <= config.num_buckets - 1
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(got[order]) >= 0)  # monotonic
    assert len(np.unique(got)) <= config.num_buckets


def test_documented_examples_and_rounding():
    # tf_semantics 1.3: rows 4, 5, 6, 7 with QuantizationConfig(3, 0, 2) (TPU: clipped to 2).
    config = Q(3, 0, 2)
    _bits_equal(config.quantize([4, 5, 6, 7]), [2, 2, 2, 2])
    # floor(v + 0.5): halves round up (half-to-even would give 0 and 2 for 0.5 and 2.5).
    _bits_equal(Q(5, 0, 4).quantize([0.5, 1.5, 2.5, 3.5, -7, 0.49]), [1, 2, 3, 4, 0, 0])
    # (x + 1) / 2 + 0.5 for x = -1e-7 is 0.99999995 in float32: floor gives level 0.
    _bits_equal(Q(2, -1, 1).quantize([-1e-7, 0.0, 1e-7, -1.0, 1.0]), [-1, 1, 1, -1, 1])
    _bits_equal(Q(3, 0, 2).quantize([np.nan]), [np.nan])


def test_float32_and_other_dtypes():
    config = Q(5, -1, 1)
    x = jnp.asarray([0.3, -0.6, 2.0], jnp.bfloat16)
    got = simulate_quantization(x, config)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(got, np.float32), config.quantize(np.asarray(x, np.float32))
    )


# --- gradient: straight-through ---------------------------------------------------------------


def test_gradient_is_straight_through():
    config = Q(4, -0.5, 0.5)
    x = jnp.asarray([-3.0, -0.5, -0.2, 0.0, 0.2, 0.37, 0.5, 9.0], jnp.float32)
    np.testing.assert_array_equal(
        jax.grad(lambda v: (simulate_quantization(v, config) * jnp.arange(8.0)).sum())(x),
        np.arange(8.0),
    )
    _, tangent = jax.jvp(lambda v: simulate_quantization(v, config), (x,), (jnp.ones_like(x),))
    np.testing.assert_array_equal(tangent, np.ones(8))


# --- lookups ----------------------------------------------------------------------------------

COMBINERS = ["sum", "mean", "sqrtn"]
VOCAB, DIM = 12, 5
CONFIG = Q(5, -0.75, 0.75)


def _table_values(seed: int = 0) -> np.ndarray:
    """Values well outside the range, on levels, on half-levels and in between."""
    rng = np.random.default_rng(seed)
    table = rng.normal(0.0, 0.8, (VOCAB, DIM)).astype(np.float32)
    lower, _, quantum = CONFIG.float32_parameters()
    table[0] = (np.arange(DIM) + np.float32(0.5)) * quantum + lower  # half-levels
    table[1] = [-5.0, 5.0, 0.75, -0.75, 0.0]
    return table


def _inputs(rng: np.random.Generator, weighted: bool):
    """One feature of each input kind (and a sequence feature), batch 6."""
    batch = 6
    lengths = rng.integers(0, 5, batch)
    lengths[2] = 12  # past a block of 8 in TF's sparse_segment order
    ids = rng.integers(0, VOCAB, int(lengths.sum()))
    ragged = je.Ragged.from_row_lengths(ids, lengths)
    rows = np.repeat(np.arange(batch), lengths)
    cols = np.concatenate([np.arange(n) for n in lengths])
    sparse = je.Sparse(np.stack([rows, cols], 1), ids, [batch, int(lengths.max())])
    inputs = {
        "dense": rng.integers(0, VOCAB, (batch, 3)),
        "ragged": ragged,
        "sparse": sparse,
        "sequence": je.Ragged.from_row_lengths(ids, lengths),
    }
    weights = None
    if weighted:
        w = rng.uniform(0.1, 2.0, ids.shape[0]).astype(np.float32)
        weights = {
            "dense": None,
            "ragged": je.Ragged.from_row_lengths(w, lengths),
            "sparse": je.Sparse(np.stack([rows, cols], 1), w, [batch, int(lengths.max())]),
            "sequence": None,
        }
    return inputs, weights


def _features(combiner: str, config: je.QuantizationConfig | None):
    table = je.TableConfig(VOCAB, DIM, combiner=combiner, name="t", quantization_config=config)
    return table, {
        "dense": je.FeatureConfig(table),
        "ragged": je.FeatureConfig(table),
        "sparse": je.FeatureConfig(table),
        "sequence": je.FeatureConfig(table, max_sequence_length=4),
    }


def _numpy_lookup(inputs, weights, table: np.ndarray, features) -> dict:
    """float64 reference: quantize the gathered rows, then combine (any summation order)."""
    quantized = CONFIG.quantize(table).astype(np.float64)
    out = {}
    for path, inp in inputs.items():
        w = None if weights is None else weights[path]
        feature = features[path]
        if isinstance(inp, np.ndarray):
            out[path] = quantized[inp]
            continue
        batch = inp.nrows if isinstance(inp, je.Ragged) else inp.dense_shape[0]
        length = feature.max_sequence_length
        acc = np.zeros((batch, length, DIM) if length else (batch, DIM))
        for pos, i, coeff in npref.contributions(inp, w, feature):
            acc[pos] += coeff * quantized[i]
        out[path] = acc
    return out


@pytest.fixture(params=[True, False], ids=["kernels", "pure_jax"])
def kernels(request):
    with _kernels.use_kernels(request.param):
        yield request.param


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_lookup_quantizes_rows_before_combining(kernels, combiner, weighted):
    rng = np.random.default_rng(COMBINERS.index(combiner) + 3 * weighted)
    inputs, weights = _inputs(rng, weighted)
    values = _table_values()
    table, features = _features(combiner, CONFIG)
    got = je.embedding_lookup(inputs, weights, {table: values}, features)
    # Elementwise: quantize(table)[ids] == quantize(table[ids]), and the same summation order.
    plain, plain_features = _features(combiner, None)
    want = je.embedding_lookup(inputs, weights, {plain: CONFIG.quantize(values)}, plain_features)
    for path in inputs:
        _bits_equal(got[path], want[path])
    reference = _numpy_lookup(inputs, weights, values, features)
    for path in inputs:
        np.testing.assert_allclose(got[path], reference[path], rtol=2e-6, atol=1e-6)
    # And the rows differ from the unquantized lookup (the config is not ignored).
    raw = je.embedding_lookup(inputs, weights, {plain: values}, plain_features)
    assert not np.array_equal(raw["ragged"], got["ragged"])


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_lookup_matches_tf_on_the_quantized_table(combiner, weighted):
    # TF's CPU lookup ignores quantization_config: fed the quantized table, it gives TF's
    # summation order of the quantized rows.
    rng = np.random.default_rng(7 + COMBINERS.index(combiner) + 3 * weighted)
    inputs, weights = _inputs(rng, weighted)
    values = _table_values(1)
    table, features = _features(combiner, CONFIG)
    got = je.embedding_lookup(inputs, weights, {table: values}, features)
    plain, plain_features = _features(combiner, None)
    tables = {plain: CONFIG.quantize(values)}
    want = tf_lookup(inputs, weights, tables, plain_features)
    assert_matches_tf(got, want, inputs, weights, tables, plain_features)


def test_tfs_cpu_lookup_ignores_the_config_where_jaxembed_quantizes():
    # tf_semantics 1.3 [E]: TF's serving_embedding_lookup returns the raw rows.
    tf = pytest.importorskip("tensorflow")
    config = tf_emb.QuantizationConfig(3, 0.0, 2.0)
    tf_table = tf_emb.TableConfig(2, 4, combiner="sum", quantization_config=config)
    variable = tf.Variable(np.array([[0, 0, 0, 0], [4, 5, 6, 7]], np.float32))
    out = tf_emb.serving_embedding_lookup(
        tf.constant([1]), None, {tf_table: variable}, tf_emb.FeatureConfig(tf_table)
    )
    np.testing.assert_array_equal(out.numpy(), [[4, 5, 6, 7]])
    table = je.TableConfig(2, 4, combiner="sum", quantization_config=Q(3, 0.0, 2.0))
    ours = je.embedding_lookup(
        np.array([1]), None, {table: variable.numpy()}, je.FeatureConfig(table)
    )
    np.testing.assert_array_equal(ours, [[2, 2, 2, 2]])


def test_zero_rows_stay_zero():
    # Lower > 0: a quantized zero would be 0.5. Ids outside the table (traced dense ids) and
    # out_of_range="zero" read zero rows, which are not table rows and are not quantized.
    config = Q(3, 0.5, 1.5)
    table = je.TableConfig(4, 2, combiner="sum", quantization_config=config)
    values = np.zeros((4, 2), np.float32)
    dropped = je.FeatureConfig(table, out_of_range="zero")
    traced = jax.jit(lambda ids: je.embedding_lookup(ids, None, {table: values}, dropped))
    want = [[0.5, 0.5], [0.5, 0.5], [0.0, 0.0], [0.0, 0.0]]
    np.testing.assert_array_equal(traced(jnp.asarray([0, 3, 4, -1])), want)
    ids = je.Ragged.from_row_lengths([1, 9], [2])
    np.testing.assert_array_equal(
        je.embedding_lookup(ids, None, {table: values}, dropped), [[0.5, 0.5]]
    )


def test_lookup_gradient_is_straight_through(kernels):
    rng = np.random.default_rng(3)
    inputs, weights = _inputs(rng, weighted=True)
    values = jnp.asarray(_table_values())
    table, features = _features("sqrtn", CONFIG)
    plain, plain_features = _features("sqrtn", None)
    cot = {
        path: jnp.asarray(rng.normal(size=np.shape(out)), jnp.float32)
        for path, out in je.embedding_lookup(
            inputs, weights, {plain: values}, plain_features
        ).items()
    }

    def loss(t, tab, feats):
        out = je.embedding_lookup(inputs, weights, {tab: t}, feats)
        return sum((out[p] * cot[p]).sum() for p in out)

    got = jax.grad(loss)(values, table, features)
    want = jax.grad(loss)(values, plain, plain_features)  # linear: independent of the values
    np.testing.assert_array_equal(got, want)
    assert np.abs(np.asarray(got)[1]).sum() > 0  # row 1 is clipped and still gets its gradient


# --- Embedding: one device and meshes ---------------------------------------------------------


def _scenario(strategy: str | None = None):
    """Four tables: two quantized ones of one dim that table-wise sharding stacks together with
    an unquantized one, and a quantized table read by two features."""
    a = je.TableConfig(40, 4, combiner="sum", name="a", quantization_config=Q(5, -0.5, 0.5))
    b = je.TableConfig(24, 4, combiner="mean", name="b", quantization_config=Q(9, -1.0, 0.25))
    c = je.TableConfig(16, 4, combiner="sqrtn", name="c")
    d = je.TableConfig(33, 3, combiner="mean", name="d", quantization_config=Q(3, -0.2, 0.6))
    features = {
        "a": je.FeatureConfig(a),
        "b": je.FeatureConfig(b),
        "c": je.FeatureConfig(c),
        "d": je.FeatureConfig(d),
        "d_seq": je.FeatureConfig(d, max_sequence_length=3),
        "d_dense": je.FeatureConfig(d),
    }
    return features


def _scenario_batch(seed: int, batch: int = 16):
    rng = np.random.default_rng(seed)
    vocab = {"a": 40, "b": 24, "c": 16, "d": 33}
    inputs, weights = {}, {}
    for path in ("a", "b", "c", "d", "d_seq"):
        lengths = rng.integers(0, 6, batch)
        ids = rng.integers(0, vocab[path[0]], int(lengths.sum()))
        if path in ("b", "c"):  # sparse, weighted
            rows = np.repeat(np.arange(batch), lengths)
            cols = np.concatenate([np.arange(n) for n in lengths])
            shape = [batch, max(1, int(lengths.max()))]
            inputs[path] = je.Sparse(np.stack([rows, cols], 1), ids, shape)
            w = rng.uniform(0.2, 2.0, ids.shape[0]).astype(np.float32)
            weights[path] = je.Sparse(np.stack([rows, cols], 1), w, shape)
        else:
            inputs[path] = je.Ragged.from_row_lengths(ids, lengths)
            weights[path] = None
    inputs["d_dense"] = rng.integers(0, 33, (batch, 2))
    weights["d_dense"] = None
    return inputs, weights


def _initial_tables(emb: je.Embedding) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {
        name: rng.normal(0, 0.6, (t.vocabulary_size, t.dim)).astype(np.float32)
        for t, name in emb.table_names.items()
    }


def _expected(features, tables, inputs, weights):
    by_name = {f.table.name: f.table for f in features.values()}
    return je.embedding_lookup(
        inputs, weights, {by_name[n]: v for n, v in tables.items()}, features
    )


def _one_device(seed: int):
    """The scenario on one device with SGD(0.5): features, Embedding, logical tables, state and
    (inputs, weights, Batch) of ``_scenario_batch(seed)``."""
    features = _scenario()
    emb = je.Embedding(features, je.optimizers.SGD(0.5))
    tables = _initial_tables(emb)
    state = emb.state_from_logical(tables)
    inputs, weights = _scenario_batch(seed)
    return features, emb, tables, state, (inputs, weights, emb.preprocess(inputs, weights))


def test_embedding_lookup_one_device_equals_embedding_lookup(kernels):
    features, emb, tables, state, (inputs, weights, batch) = _one_device(seed=0)
    got = jax.jit(emb.lookup)(state, batch)
    want = _expected(features, tables, inputs, weights)
    for path in inputs:
        _bits_equal(got[path], want[path])
    # Quantized tables really are quantized; the unquantized one is not.
    q = features["a"].table.quantization_config
    plain_a = je.TableConfig(40, 4, combiner="sum")
    raw = je.embedding_lookup(inputs["a"], None, {plain_a: tables["a"]}, je.FeatureConfig(plain_a))
    assert not np.array_equal(raw, got["a"])
    assert q is not None


# Every strategy in two runs: the three dim-4 tables (two quantized with different configs, one
# not) stacked table-wise, and "d" column-wise; or row-wise and replicated tables side by side.
SHARDINGS = {
    "table+column": {"a": "table", "b": "table", "c": "table", "d": "column"},
    "row+replicated": {"a": "row", "b": "replicated", "c": "row", "d": "replicated"},
}


@functools.cache
def _mesh() -> jax.sharding.Mesh:
    assert len(jax.devices()) >= 8, "conftest should give JAX 8 CPU devices"
    return jax.make_mesh((8,), ("x",))


@pytest.mark.parametrize("strategy", SHARDINGS)
def test_embedding_on_a_mesh_equals_one_device(strategy):
    features = _scenario()
    one = je.Embedding(features, je.optimizers.SGD(0.5))
    emb = je.Embedding(features, je.optimizers.SGD(0.5), mesh=_mesh(), sharding=SHARDINGS[strategy])
    assert {layout.strategy for layout in emb.plan.layouts} == set(SHARDINGS[strategy].values())
    tables = _initial_tables(emb)
    inputs, weights = _scenario_batch(1, batch=32)
    batch, one_batch = emb.preprocess(inputs, weights), one.preprocess(inputs, weights)
    state, one_state = emb.state_from_logical(tables), one.state_from_logical(tables)
    got = emb.lookup(state, batch)
    want = one.lookup(one_state, one_batch)
    expected = _expected(features, tables, inputs, weights)
    for path in inputs:
        _bits_equal(got[path], want[path])
        _bits_equal(got[path], expected[path])
    # A step with dL/dact = act (the quantized values): tables close (the gradients are summed
    # over devices in another order).
    new = emb.embedding_tables(emb.apply_gradients(state, batch, got))
    one_new = one.embedding_tables(one.apply_gradients(one_state, one_batch, want))
    for table, name in one.table_names.items():
        np.testing.assert_allclose(new[table], one_new[table], rtol=1e-6, atol=1e-6, err_msg=name)


def test_apply_gradients_is_straight_through():
    # One SGD step with dL/dact = act: g_r = sum coeff * quantized activation (numpy, float64).
    features, emb, tables, state, (inputs, weights, batch) = _one_device(seed=2)
    acts = emb.lookup(state, batch)
    new = emb.embedding_tables(emb.apply_gradients(state, batch, acts))
    grads = npref.row_gradients(
        inputs, weights, {p: np.asarray(a) for p, a in acts.items()}, features
    )
    for table, (g, _) in grads.items():
        want = tables[table.name] - 0.5 * g
        np.testing.assert_allclose(new[table], want, rtol=1e-5, atol=1e-6, err_msg=table.name)


# --- cost follows the rows --------------------------------------------------------------------


def _floor_sizes(jaxpr) -> list[int]:
    sizes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "floor":
            sizes.append(math.prod(eqn.invars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            sizes.extend(_floor_sizes(sub))
    return sizes


def test_quantization_touches_the_looked_up_rows_only():
    vocab, dim = 100_000, 8
    table = je.TableConfig(vocab, dim, combiner="sum", name="big", quantization_config=Q(9, -1, 1))
    feature = {"f": je.FeatureConfig(table)}
    values = jnp.zeros((vocab, dim), jnp.float32)
    ids = {"f": je.Ragged.from_row_lengths(np.arange(20) * 997, [5, 15])}
    sizes = _floor_sizes(
        jax.make_jaxpr(lambda t: je.embedding_lookup(ids, None, {table: t}, feature))(values).jaxpr
    )
    assert sizes and max(sizes) <= 64 * dim, sizes
    emb = je.Embedding(feature)
    state = emb.abstract_state()
    batch = emb.preprocess(ids)
    sizes = _floor_sizes(jax.make_jaxpr(emb.lookup)(state, batch).jaxpr)
    assert sizes and max(sizes) <= 64 * dim, sizes


# --- checkpoint metadata ----------------------------------------------------------------------


def test_checkpoint_round_trip_keeps_the_config(tmp_path):
    features = _scenario()
    emb = je.Embedding(features, je.optimizers.SGD(0.1))
    state = emb.state_from_logical(_initial_tables(emb))
    je.checkpoint.save(tmp_path, emb, state, step=1)
    config = je.checkpoint.read_config(tmp_path)
    by_name = {t["name"]: t for t in config["tables"]}
    assert by_name["a"]["quantization_config"] == {"num_buckets": 5, "lower": -0.5, "upper": 0.5}
    assert by_name["c"]["quantization_config"] is None
    rebuilt = je.checkpoint.feature_config_from(config)
    for path, feature in features.items():
        assert rebuilt[path].table.quantization_config == feature.table.quantization_config
    restored = je.checkpoint.restore(tmp_path, je.Embedding(rebuilt), tables_only=True)
    inputs, weights = _scenario_batch(3)
    again = je.Embedding(rebuilt)
    got = again.lookup(restored, again.preprocess(inputs, weights))
    want = emb.lookup(state, emb.preprocess(inputs, weights))
    for path in inputs:
        _bits_equal(got[path], want[path])
    # Checkpoints written before quantization_config existed: no key, no quantization.
    for t in config["tables"]:
        del t["quantization_config"]
    assert all(
        f.table.quantization_config is None
        for f in je.checkpoint.feature_config_from(config).values()
    )


# --- TF: to_tf and the serving graph's simulate -----------------------------------------------


def test_to_tf_passes_tfs_quantization_config():
    pb = _tf_proto()
    from jaxembed import export

    features = _scenario()
    emb = je.Embedding(features, je.optimizers.SGD(0.1))
    variables, tf_features = export.to_tf(emb, emb.state_from_logical(_initial_tables(emb)))
    by_name = {config.name: config for config in variables}
    for table, name in emb.table_names.items():
        tf_config = by_name[name].quantization_config
        ours = table.quantization_config
        if ours is None:
            assert tf_config is None
            continue
        assert isinstance(tf_config, tf_emb.QuantizationConfig)
        assert (tf_config.num_buckets, tf_config.lower, tf_config.upper) == (
            ours.num_buckets,
            ours.lower,
            ours.upper,
        )
        params = pb.OptimizationParameters()
        tf_config._set_optimization_parameters(params)
        sq = params.simulated_quantization
        lower, upper, _ = ours.float32_parameters()
        assert sq.enabled and sq.num_buckets == ours.num_buckets
        assert np.float32(sq.clipping_limits.lower.value) == lower
        assert np.float32(sq.clipping_limits.upper.value) == upper
    assert tf_features["a"].table is by_name["a"]


@pytest.mark.parametrize("args", CONFIGS, ids=str)
def test_tf_simulate_is_bit_identical_to_jax(args):
    tf = pytest.importorskip("tensorflow")
    from jaxembed.export._simulated_quantization import simulate

    config = Q(*args)
    x = _values(config, seed=5).reshape(-1, 1) * np.ones((1, 3), np.float32)
    want = np.asarray(jax.jit(simulate_quantization, static_argnums=1)(jnp.asarray(x), config))
    _bits_equal(simulate(tf.constant(x), config).numpy(), want)
    graph = tf.function(lambda rows: simulate(rows, config))
    _bits_equal(graph(tf.constant(x)).numpy(), want)
    spec = tf.TensorSpec([None, 3], tf.float32)
    dynamic = tf.function(lambda rows: simulate(rows, config), input_signature=[spec])
    _bits_equal(dynamic(tf.constant(x)).numpy(), want)
    # Grappler folds a constant input: still the same bits.
    _bits_equal(tf.function(lambda: simulate(tf.constant(x), config))().numpy(), want)
    # In a gather, as the serving graph uses it.
    table = tf.Variable(x)
    ids = tf.constant([3, 0, 7, 3])
    gathered = tf.function(lambda i: simulate(tf.gather(table, i), config))(ids)
    _bits_equal(gathered.numpy(), want[[3, 0, 7, 3]])


@pytest.mark.parametrize("quantize", [None, "float16"])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_saved_model_serves_the_quantized_rows(tmp_path, combiner, quantize):
    """The SavedModel applies the table's simulated quantization as training does: served
    outputs equal ``je.embedding_lookup`` (which quantizes) bit for bit on both signatures, with
    float32 and float16 serving tables, and differ from the unquantized lookup."""
    tf = pytest.importorskip("tensorflow")
    from jaxembed.export._saved_model import jax_outputs, sample_inputs, serving_request

    from jaxembed import export

    values = _table_values()
    table = je.TableConfig(
        VOCAB,
        DIM,
        initializer=lambda key, shape, dtype: jnp.asarray(values, dtype),
        combiner=combiner,
        name="t",
        quantization_config=CONFIG,
    )
    features = {
        "a": je.FeatureConfig(table),
        "b": je.FeatureConfig(table, out_of_range="zero"),
        "s": je.FeatureConfig(table, max_sequence_length=3),
    }
    emb = je.Embedding(features)
    state = emb.init(jax.random.key(0))
    options = export.ExportOptions(weighted=["a"], quantize=quantize and {"t": quantize})
    path = export.save_serving_model(tmp_path / "m", emb, state, options=options)
    served = tf.saved_model.load(path).signatures["serving_default"]
    served_tables = {table: values.astype(jnp.float16).astype(jnp.float32)} if quantize else None
    samples = sample_inputs(emb, 7, ["a"], np.random.default_rng(3), min_length=1)
    samples["b"]["ids"][0] = VOCAB + 3  # out of range: a zero row, not a quantized one
    got = served(**{k: tf.constant(v) for k, v in serving_request(samples).items()})
    want = jax_outputs(emb, served_tables or {table: values}, samples)
    plain = je.TableConfig(VOCAB, DIM, combiner=combiner, name="t")
    unquantized = jax_outputs(
        je.Embedding({k: dataclasses.replace(f, table=plain) for k, f in features.items()}),
        {plain: served_tables[table] if quantize else values},
        samples,
    )
    for name, expected in want.items():
        _bits_equal(got[name].numpy(), expected)
    assert any(not np.array_equal(want[k], unquantized[k]) for k in want)
