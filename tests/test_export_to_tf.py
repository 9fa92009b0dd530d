"""``export.to_tf`` and ``export.tf_optimizer``: trained tables and configs as TF objects.

* TF's own ``serving_embedding_lookup`` on ``to_tf``'s output gives bit-identical activations
  to ``je.embedding_lookup`` and ``Embedding.lookup`` after training, over a nested feature config
  (dicts in dicts, lists, tuples; shared tables; sequence features; ragged ``output_shape``
  features; all three combiners) and dense, ragged (weighted and not) and sparse inputs; also
  for a sharded ``Embedding`` (8-device mesh, row / table-wise / replicated tables), whose tables
  come out in logical row order.
* The TF configs mirror ours: table names (``table_{i}`` defaults), sizes, combiners, feature
  fields, nesting, table sharing; each table's TF optimizer has the same class and arguments
  (a schedule becomes its value at ``state.step``; ``from_optax`` gives None); the variables are
  named after their tables and hold the logical tables.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

pytest.importorskip("tensorflow")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import numpy_reference as npref  # noqa: E402
import optax  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_reference as tfref  # noqa: E402
from tensorflow.python.util import nest as tf_nest  # noqa: E402

import jaxembed as je  # noqa: E402
from jaxembed import export  # noqa: E402

jeo = je.optimizers
TFE = tf.tpu.experimental.embedding
B = 16  # batch size; 2 examples per device on the 8-device mesh
KINDS = ("dense", "ragged", "ragged_weighted", "sparse")
TRAIN_STEPS = 3  # weighted ragged batches (one bucket: the jitted step compiles once)


# ---------------------------------------------------------------------------------------------
# The scenario: three tables (two unnamed), eight features nested in dicts, lists and tuples.


@functools.cache
def feature_config(sharded: bool = False) -> dict:
    """The scenario's features; with a mesh, ``output_shape`` is left out (jaxembed does not
    support it on a mesh yet), everything else is the same."""
    items = je.TableConfig(48, 4, combiner="mean", name="items")
    tags = je.TableConfig(24, 2, combiner="sum")  # second in table order: "table_1"
    users = je.TableConfig(32, 8, combiner="sqrtn")  # third: "table_2"
    F = je.FeatureConfig
    return {
        "query": {
            "user": F(users, name="user"),
            "history": [F(items, max_sequence_length=3, name="history"), F(tags, name="q_tags")],
        },
        "cand": (
            F(items, name="cand"),
            F(tags, output_shape=None if sharded else [4, 4], name="cand_tags_2d"),  # reshaped
            F(users, output_shape=None if sharded else [B, 3], name="cand_users_seq"),  # k = 3
        ),
        "ctx": [{"seq": F(users, max_sequence_length=2, name="ctx_seq")}, F(items, name="ctx")],
    }


# tf.nest order: cand/0 (items), cand/1 (tags), cand/2 (users), ctx/0/seq, ctx/1, query/...
TABLE_NAMES = ["items", "table_1", "table_2"]
SHARDING = {"items": "row", "table_1": "replicated", "table_2": "table"}


def _ragged(rng: np.random.Generator, vocab: int) -> je.Ragged:
    lengths = rng.integers(0, 6, B)  # empty rows; rows longer than every max_sequence_length
    return je.Ragged.from_row_lengths(rng.integers(0, vocab, int(lengths.sum())), lengths)


def _sparse(rng: np.random.Generator, vocab: int, width: int = 5) -> je.Sparse:
    """Unweighted rank-2 ids; each row keeps a random subset of its columns (gaps included)."""
    mask = rng.random((B, width)) < 0.45
    rows, cols = np.nonzero(mask)
    return je.Sparse(np.stack([rows, cols], 1), rng.integers(0, vocab, rows.size), [B, width])


def _dense(rng: np.random.Generator, vocab: int, wide: bool) -> np.ndarray:
    return rng.integers(0, vocab, (B, 2) if wide else (B,)).astype(np.int64)


def make_inputs(kind: str, seed: int, sharded: bool = False) -> tuple[Any, Any]:
    """Inputs (and weights) for every feature, of one kind where TF allows it.

    ``dense``: sequence features get ragged ids (TF rejects dense ids there), and so do
    ``output_shape`` features (``Embedding`` applies ``output_shape`` to dense ids as
    ``TPUEmbedding`` does, the serving lookup ignores it); others ``[B]`` or ``[B, 2]`` ids.
    ``ragged_weighted``: every combined feature is weighted (including the ``output_shape``
    sequence-mode feature, whose weights TF ignores); sequence features are not (TF rejects
    weights there).
    """
    rng = np.random.default_rng(seed)
    inputs, weights = [], []
    fc = feature_config(sharded)
    for i, (_, feature) in enumerate(tfref.flatten_with_paths(fc)):
        vocab = feature.table.vocabulary_size
        sequence = feature.max_sequence_length > 0
        weight = None
        if kind == "sparse":
            inp = _sparse(rng, vocab)
        elif kind == "dense" and not sequence and feature.output_shape is None:
            inp = _dense(rng, vocab, wide=i % 2 == 1)
        else:
            inp = _ragged(rng, vocab)
            if kind == "ragged_weighted" and not sequence:
                values = rng.uniform(0.1, 2.0, inp.values.shape).astype(np.float32)
                weight = je.Ragged(values, inp.row_splits)
        inputs.append(inp)
        weights.append(weight)
    packed_weights = tf.nest.pack_sequence_as(fc, weights) if kind == "ragged_weighted" else None
    return tf.nest.pack_sequence_as(fc, inputs), packed_weights


def _mesh() -> jax.sharding.Mesh:
    assert len(jax.devices()) >= 8, "conftest should give JAX 8 CPU devices"
    return jax.make_mesh((8,), ("x",))


def _embedding(sharded: bool) -> je.Embedding:
    optimizer = jeo.Adagrad(0.5, initial_accumulator_value=0.2)
    if not sharded:
        return je.Embedding(feature_config(), optimizer)
    return je.Embedding(feature_config(True), optimizer, mesh=_mesh(), sharding=SHARDING)


@functools.cache
def trained(sharded: bool) -> tuple[je.Embedding, je.EmbeddingState, dict[str, np.ndarray]]:
    """An ``Embedding`` after a few jitted training steps, and its initial tables."""
    emb = _embedding(sharded)
    state = emb.init(jax.random.key(3))
    initial = {emb.table_names[t]: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
    apply = jax.jit(emb.apply_gradients)
    rng = np.random.default_rng(99)
    for step in range(TRAIN_STEPS):
        inputs, weights = make_inputs("ragged_weighted", seed=1000 + step, sharded=sharded)
        grads = npref.random_grads(rng, inputs, emb.feature_config)
        state = apply(state, emb.preprocess(inputs, weights), grads)
    return emb, state, initial


@functools.cache
def jitted_lookup(sharded: bool) -> Any:
    return jax.jit(trained(sharded)[0].lookup)


def _tf_lookup(inputs: Any, weights: Any, tf_tables: Any, tf_fc: Any) -> Any:
    out = TFE.serving_embedding_lookup(
        tfref.to_tf_inputs(inputs), tfref.to_tf_weights(weights), tf_tables, tf_fc
    )
    return tf.nest.map_structure(lambda t: t.numpy(), out)


def _assert_bit_identical(got: Any, want: Any, what: str) -> None:
    tfref.assert_same_containers(got, want)
    flat_got, flat_want = tfref.flatten_with_paths(got), tfref.flatten_with_paths(want)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    for (path, g), (_, w) in zip(flat_got, flat_want, strict=True):
        g = np.asarray(g)
        assert g.dtype == w.dtype == np.float32, f"{what} {path}: {g.dtype} vs {w.dtype}"
        assert g.shape == w.shape, f"{what} {path}: shape {g.shape} vs TF's {w.shape}"
        np.testing.assert_array_equal(g, w, err_msg=f"{what} {path}")


# ---------------------------------------------------------------------------------------------
# TF's lookup on to_tf's output equals jaxembed's lookup, bit for bit


def test_scenario_covers_what_it_claims():
    fc = feature_config()
    features = [f for _, f in tfref.flatten_with_paths(fc)]
    assert {f.table.combiner for f in features} == {"mean", "sum", "sqrtn"}
    assert sum(f.max_sequence_length > 0 for f in features) == 2
    assert sum(f.output_shape is not None for f in features) == 2
    for sharded in (False, True):
        emb, state, initial = trained(sharded)
        assert list(emb.table_names.values()) == TABLE_NAMES
        assert int(state.step) == TRAIN_STEPS
        for table, value in emb.embedding_tables(state).items():
            name = emb.table_names[table]
            assert not np.array_equal(np.asarray(value), initial[name]), name  # it trained
    # The sharded layout really is not the logical one (row r of "items" is on shard r % 8).
    emb, state, _ = trained(True)
    assert emb.plan["items"].strategy == "row"
    items = next(iter(emb.embedding_tables(state).values()))
    assert not np.array_equal(np.asarray(state.tables["items"]), np.asarray(items))


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "mesh8"])
@pytest.mark.parametrize("kind", KINDS)
def test_tf_serving_lookup_on_to_tf_equals_jaxembed(kind, sharded):
    emb, state, _ = trained(sharded)
    tf_tables, tf_fc = export.to_tf(emb, state)
    tables = emb.embedding_tables(state)
    inputs, weights = make_inputs(kind, seed=1, sharded=sharded)
    want = _tf_lookup(inputs, weights, tf_tables, tf_fc)
    got_lookup = jitted_lookup(sharded)(state, emb.preprocess(inputs, weights))
    _assert_bit_identical(got_lookup, want, f"Embedding.lookup ({kind})")
    if not sharded:  # the same function of the logical tables either way
        got_fn = je.embedding_lookup(inputs, weights, tables, emb.feature_config)
        _assert_bit_identical(got_fn, want, f"je.embedding_lookup ({kind})")


def test_weighted_ragged_output_shape_sequence_feature_ignores_weights_like_tf():
    """TF silently ignores weights of a ragged feature in ``output_shape`` sequence mode."""
    emb, state, _ = trained(False)
    tf_tables, tf_fc = export.to_tf(emb, state)
    inputs, weights = make_inputs("ragged_weighted", seed=5)
    assert weights["cand"][2] is not None
    unweighted = {**weights, "cand": (*weights["cand"][:2], None)}
    want = _tf_lookup(inputs, unweighted, tf_tables, tf_fc)["cand"][2]
    assert want.shape == (B, 3, 8)
    np.testing.assert_array_equal(_tf_lookup(inputs, weights, tf_tables, tf_fc)["cand"][2], want)
    got = jitted_lookup(False)(state, emb.preprocess(inputs, weights))["cand"][2]
    np.testing.assert_array_equal(np.asarray(got), want)


def test_sharded_tables_come_out_in_logical_row_order():
    emb = _embedding(sharded=True)
    logical = {
        emb.table_names[t]: np.arange(t.vocabulary_size * t.dim, dtype=np.float32).reshape(
            t.vocabulary_size, t.dim
        )
        for t in emb.table_configs
    }
    state = emb.state_from_logical(logical)
    tf_tables, _ = export.to_tf(emb, state)
    assert [c.name for c in tf_tables] == TABLE_NAMES
    for config, variable in tf_tables.items():
        np.testing.assert_array_equal(variable.numpy(), logical[config.name], err_msg=config.name)
    # The physical row-sharded array is permuted, so this is not a trivial copy.
    assert not np.array_equal(np.asarray(state.tables["items"]), logical["items"])


# ---------------------------------------------------------------------------------------------
# The TF configs, optimizers and variables mirror ours


def test_tf_configs_mirror_ours():
    emb, state, _ = trained(False)
    tf_tables, tf_fc = export.to_tf(emb, state)
    # Tables: TF TableConfigs in our table order, with TF's default names for unnamed tables.
    assert [c.name for c in tf_tables] == TABLE_NAMES == list(emb.table_names.values())
    twins = dict(zip(emb.table_configs, tf_tables, strict=True))
    for table, twin in twins.items():
        assert isinstance(twin, TFE.TableConfig)
        assert (twin.vocabulary_size, twin.dim, twin.combiner) == (
            table.vocabulary_size,
            table.dim,
            table.combiner,
        )
        # TF's default, the same truncated normal as ours (TF fills it in for None).
        assert type(twin.initializer).__name__ == "TruncatedNormal"
        config = twin.initializer.get_config()
        assert (config["mean"], config["stddev"]) == (0.0, 1 / np.sqrt(table.dim))
        assert "initializer=None" in repr(twin)
    assert [t.name for t in emb.table_configs] == ["items", None, None]  # ours stay unnamed
    # Features: same nesting (container types and keys), same fields, shared tables shared.
    tfref.assert_same_containers(tf_fc, emb.feature_config)
    ours = tfref.flatten_with_paths(emb.feature_config)
    theirs = tf_nest.flatten_with_joined_string_paths(tf_fc)  # what TF's lookup uses
    assert [p for p, _ in theirs] == [p for p, _ in ours]
    for (path, feature), (_, twin) in zip(ours, theirs, strict=True):
        assert isinstance(twin, TFE.FeatureConfig), path
        assert twin.table is twins[feature.table], path
        assert twin.name == feature.name, path
        assert twin.max_sequence_length == feature.max_sequence_length, path
        assert twin.validate_weights_and_indices == feature.validate_weights_and_indices, path
        if feature.output_shape is None:
            assert twin.output_shape.rank is None, path
        else:
            assert twin.output_shape.as_list() == list(feature.output_shape), path
    # TF itself gives unnamed tables of the same structure the same names.
    unnamed = {t: TFE.TableConfig(t.vocabulary_size, t.dim, name=t.name) for t in twins}
    fresh = tf.nest.map_structure(lambda f: TFE.FeatureConfig(unnamed[f.table]), emb.feature_config)
    tpu_emb = TFE.TPUEmbeddingForServing(fresh, None)
    assert [c.name for c in tpu_emb.embedding_tables] == TABLE_NAMES


def test_feature_fields_with_edge_values():
    """``output_shape=[]`` stays set (TF: a known-rank shape is truthy); partially unknown
    shapes and ``validate_weights_and_indices=False`` carry over."""
    table = je.TableConfig(10, 3, combiner="sum", name="t")
    fc = {
        "a": je.FeatureConfig(table, output_shape=[]),
        "b": je.FeatureConfig(table, validate_weights_and_indices=False, output_shape=[None, 2]),
    }
    emb = je.Embedding(fc)
    state = emb.init(jax.random.key(0))
    tf_tables, tf_fc = export.to_tf(emb, state)
    assert tf_fc["a"].output_shape.as_list() == [] and bool(tf_fc["a"].output_shape)
    assert tf_fc["b"].output_shape.as_list() == [None, 2]
    assert tf_fc["b"].validate_weights_and_indices is False
    assert tf_fc["a"].validate_weights_and_indices is True
    # A batch of one with output_shape [] is a single [dim] vector, in TF and in jaxembed.
    inputs = {"a": je.Ragged.from_row_lengths([1, 2, 7], [3])}
    want = _tf_lookup(inputs, None, tf_tables, tf_fc)
    assert want["a"].shape == (3,)
    full = {**inputs, "b": je.Sparse(np.array([[0, 0]]), np.array([4]), (1, 2))}  # every feature
    np.testing.assert_array_equal(
        np.asarray(emb.lookup(state, emb.preprocess(full))["a"]), want["a"]
    )


def test_tf_variables_are_named_after_tables_and_hold_logical_tables():
    for sharded in (False, True):
        emb, state, _ = trained(sharded)
        tf_tables, _ = export.to_tf(emb, state)
        for (table, value), (config, variable) in zip(
            emb.embedding_tables(state).items(), tf_tables.items(), strict=True
        ):
            name = emb.table_names[table]
            assert isinstance(variable, tf.Variable)
            assert variable.name == f"{name}:0" == f"{config.name}:0"
            assert variable.dtype == tf.float32 and variable.trainable
            assert variable.shape == (table.vocabulary_size, table.dim)
            np.testing.assert_array_equal(variable.numpy(), np.asarray(value), err_msg=name)
            assert config.optimizer == export.tf_optimizer(emb.optimizers[name])


def _tf_twin_equal(got: Any, want: Any) -> None:
    """Same TF class and the same attributes (values and their Python types)."""
    assert type(got) is type(want), (type(got), type(want))
    typed = {k: (type(v), v) for k, v in vars(got).items()}
    assert typed == {k: (type(v), v) for k, v in vars(want).items()}
    assert got == want


# Each optimizer with non-default values for (nearly) every argument, and its TF twin.
OPTIMIZERS = {
    "sgd": (
        jeo.SGD(0.05, clip_weight_min=-1.5, clip_weight_max=2.5, weight_decay_factor=0.01,
                multiply_weight_decay_factor_by_learning_rate=True, clipvalue=3.0,
                low_dimensional_packing_status=True),
        lambda: TFE.SGD(0.05, clip_weight_min=-1.5, clip_weight_max=2.5, weight_decay_factor=0.01,
                        multiply_weight_decay_factor_by_learning_rate=True, clipvalue=3.0,
                        low_dimensional_packing_status=True),
    ),
    "adagrad": (
        jeo.Adagrad(0.2, initial_accumulator_value=0.5, clipvalue=(-1.0, None),
                    weight_decay_factor=0.02),
        lambda: TFE.Adagrad(0.2, initial_accumulator_value=0.5, clipvalue=(-1.0, None),
                            weight_decay_factor=0.02),
    ),
    "adagrad_momentum": (
        jeo.AdagradMomentum(0.3, momentum=0.9, use_nesterov=True, exponent=3.0, beta2=0.9,
                            epsilon=0.1, clip_weight_max=4.0),
        lambda: TFE.AdagradMomentum(0.3, momentum=0.9, use_nesterov=True, exponent=3.0,
                                    beta2=0.9, epsilon=0.1, clip_weight_max=4.0),
    ),
    "adam": (
        jeo.Adam(0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-5, lazy_adam=False,
                 sum_inside_sqrt=False, clipvalue=(None, 1.0)),
        lambda: TFE.Adam(0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-5, lazy_adam=False,
                         sum_inside_sqrt=False, clipvalue=(None, 1.0)),
    ),
    "ftrl": (
        jeo.FTRL(0.1, learning_rate_power=-0.7, l1_regularization_strength=0.01,
                 l2_regularization_strength=0.02, beta=0.1, initial_accumulator_value=0.3,
                 multiply_linear_by_learning_rate=True, allow_zero_accumulator=True,
                 use_gradient_accumulation=False),
        lambda: TFE.FTRL(0.1, learning_rate_power=-0.7, l1_regularization_strength=0.01,
                         l2_regularization_strength=0.02, beta=0.1,
                         initial_accumulator_value=0.3, multiply_linear_by_learning_rate=True,
                         allow_zero_accumulator=True, use_gradient_accumulation=False),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_tf_optimizer_has_the_same_class_and_arguments(name):
    optimizer, tf_twin = OPTIMIZERS[name]
    _tf_twin_equal(export.tf_optimizer(optimizer), tf_twin())
    _tf_twin_equal(export.tf_optimizer(optimizer, step=7), tf_twin())  # a float ignores step
    # As the global optimizer, and as a table's own optimizer (which overrides the global one).
    a = je.TableConfig(8, 2, name="a")
    b = je.TableConfig(6, 2, name="b", optimizer=optimizer)
    fc = {"a": je.FeatureConfig(a), "b": je.FeatureConfig(b)}
    for emb, want in (
        (je.Embedding(fc, optimizer), {"a": tf_twin(), "b": tf_twin()}),
        (je.Embedding(fc, jeo.SGD(0.5)), {"a": TFE.SGD(0.5), "b": tf_twin()}),
    ):
        tf_tables, tf_fc = export.to_tf(emb, emb.init(jax.random.key(0)))
        got = {c.name: c.optimizer for c in tf_tables}
        assert list(got) == ["a", "b"]
        for table in got:
            _tf_twin_equal(got[table], want[table])
        assert tf_fc["b"].table.optimizer is got["b"]


def test_slot_variable_creation_fn_is_dropped():
    def zeros(table, names, initializers):
        return {n: jax.numpy.zeros_like(table) for n in names}

    got = export.tf_optimizer(jeo.Adagrad(0.1, slot_variable_creation_fn=zeros))
    _tf_twin_equal(got, TFE.Adagrad(0.1))


def test_learning_rate_schedule_becomes_its_value_at_the_step():
    schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
    opt = jeo.Adagrad(schedule, initial_accumulator_value=0.3)
    for step in (0, 2, 5):
        _tf_twin_equal(
            export.tf_optimizer(opt, step=step),
            TFE.Adagrad(float(schedule(step)), initial_accumulator_value=0.3),
        )
    table = je.TableConfig(16, 2, combiner="sum", name="t")
    emb = je.Embedding({"f": je.FeatureConfig(table)}, opt)
    state = emb.state_from_logical({"t": np.zeros((16, 2), np.float32)}, step=3)
    tf_tables, _ = export.to_tf(emb, state)
    (config,) = tf_tables
    assert config.optimizer.learning_rate == float(schedule(3)) != float(schedule(0))
    assert isinstance(config.optimizer.learning_rate, float)


def test_optax_optimizer_has_no_tf_twin():
    opt = jeo.from_optax(optax.adam(0.01))
    assert export.tf_optimizer(opt) is None
    assert export.tf_optimizer(None) is None
    a = je.TableConfig(8, 2, name="a", optimizer=opt)
    b = je.TableConfig(6, 2, name="b")
    emb = je.Embedding({"a": je.FeatureConfig(a), "b": je.FeatureConfig(b)}, jeo.Adam(0.1))
    state = emb.init(jax.random.key(0))
    tf_tables, _ = export.to_tf(emb, state)
    got = {c.name: c.optimizer for c in tf_tables}
    assert got["a"] is None
    _tf_twin_equal(got["b"], TFE.Adam(0.1))
    # Without any optimizer (a lookup-only Embedding) the tables still convert.
    plain = je.Embedding({"b": je.FeatureConfig(b)})
    (config,) = export.to_tf(plain, plain.init(jax.random.key(1)))[0]
    assert config.optimizer is None and config.name == "b"


def test_custom_initializer_twin_gives_the_jax_initializer_seeded_with_key_0():
    """TF builds ``to_tf``'s configs with the JAX initializer (key 0), not a random one."""
    init = jax.nn.initializers.normal(0.5)
    table = je.TableConfig(10, 3, initializer=init, name="t")
    emb = je.Embedding({"f": je.FeatureConfig(table)}, jeo.Adagrad(0.1))
    _, tf_fc = export.to_tf(emb, emb.init(jax.random.key(1)))
    tpu_emb = TFE.TPUEmbeddingForServing(tf_fc, None)
    tpu_emb.build()
    np.testing.assert_array_equal(
        tpu_emb._variables["t"]["parameters"].numpy(), np.asarray(init(jax.random.key(0), (10, 3)))
    )
    assert set(tpu_emb._variables["t"]) == {"parameters", "accumulators"}  # the table's Adagrad
