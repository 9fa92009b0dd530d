"""Failure modes of the training API: bad hyperparameters, initializers, states and gradients.

* Hyperparameters: every optimizer validates at construction (NaN, Inf or negative learning
  rates, betas and momentum outside their ranges, epsilon <= 0, negative FTRL regularization,
  a positive ``learning_rate_power``, inverted or NaN clip ranges, negative weight decay, wrong
  types), with TF's messages where TF has them. Cases TF checks too are compared with TF; the
  others document where jaxembed is stricter. Every valid TF default and boundary value still
  constructs, in both.
* Initializers returning another shape, a non-float dtype or NaN raise naming the table.
* A state built for another optimizer or Embedding raises at trace time naming the table.
* Non-finite gradients: ``Embedding(nonfinite_gradients="skip" | "raise" | "apply")``. "skip"
  (default) is compared with a run whose inputs leave the offending examples (or sequence
  positions) out, on one device and on 8-device meshes; the count lands in
  ``state.nonfinite``.
* Other bad arguments of ``Embedding`` (mesh, optimizer class, sharding, key).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxembed as je
from jaxembed.embedding import NonFiniteGradientError

jeo = je.optimizers
OPTIMIZERS = ("SGD", "Adagrad", "AdagradMomentum", "Adam", "FTRL")
NAN, INF = float("nan"), float("inf")


def _tf_embedding():
    tf = pytest.importorskip("tensorflow")
    return tf.tpu.experimental.embedding


# ---------------------------------------------------------------------------------------------
# 1. Hyperparameters

# case -> (builder taking a module of optimizers, regex the message must match, TF also raises)
INVALID: dict = {}
for _name in OPTIMIZERS:
    _low = _name.lower()
    for _label, _lr in (("nan", NAN), ("inf", INF), ("negative", -0.1)):
        INVALID[f"{_low}_learning_rate_{_label}"] = (
            lambda m, n=_name, lr=_lr: getattr(m, n)(lr),
            r"`learning_rate`.*>= 0",
            False,
        )
    # The arguments every optimizer shares: (case, keyword arguments, regex).
    for _case, _kwargs, _match in (
        (
            "clip_weight_min_above_max",
            {"clip_weight_min": 1.0, "clip_weight_max": -1.0},
            r"`clip_weight_min` \(1.0\) must be <= `clip_weight_max` \(-1.0\)",
        ),
        ("clip_weight_max_nan", {"clip_weight_max": NAN}, r"`clip_weight_max`.*nan"),
        ("clipvalue_negative", {"clipvalue": -1.0}, r"`clipvalue`.*>= 0.*-1.0"),
        ("clipvalue_nan", {"clipvalue": NAN}, r"`clipvalue`.*nan"),
        (
            "clipvalue_tuple_inverted",
            {"clipvalue": (1.0, -1.0)},
            r"`clipvalue`.*min <= max.*\(1.0, -1.0\)",
        ),
        (
            "weight_decay_negative",
            {"weight_decay_factor": -0.01},
            r"`weight_decay_factor`.*>= 0.*-0.01",
        ),
        ("weight_decay_nan", {"weight_decay_factor": NAN}, r"`weight_decay_factor`.*nan"),
        (
            "multiply_weight_decay_not_bool",
            {"weight_decay_factor": 0.1, "multiply_weight_decay_factor_by_learning_rate": "yes"},
            "multiply_weight_decay_factor_by_learning_rate",
        ),
    ):
        INVALID[f"{_low}_{_case}"] = (
            lambda m, n=_name, kw=_kwargs: getattr(m, n)(0.1, **kw),
            _match,
            False,
        )
INVALID.update(
    {
        # TF checks these: TF's wording (with the value TF's beta_2 message gets wrong).
        "adam_beta_1_above_one": (
            lambda m: m.Adam(0.1, beta_1=1.5),
            r"^Adam: Argument `beta_1` must be >= 0 and < 1\. Received: 1\.5\.$",
            True,
        ),
        "adam_beta_2_negative": (
            lambda m: m.Adam(0.1, beta_2=-0.1),
            r"^Adam: Argument `beta_2` must be >= 0 and < 1\. Received: -0\.1\.$",
            True,
        ),
        "adagrad_accumulator_negative": (
            lambda m: m.Adagrad(0.1, initial_accumulator_value=-0.1),
            r"^Adagrad: Argument `initial_accumulator_value` must be a positive float\. "
            r"Received: -0\.1\.$",
            True,
        ),
        "ftrl_accumulator_zero": (
            lambda m: m.FTRL(0.1, initial_accumulator_value=0.0),
            r"^FTRL: Argument `initial_accumulator_value` must be a positive float\. "
            r"Received: 0\.0\.$",
            True,
        ),
        "adam_epsilon_negative": (
            lambda m: m.Adam(0.1, epsilon=-1e-7),
            r"^Adam: epsilon must be positive; got -1e-07\.$",
            True,
        ),
        # TF lets these through (NaN passes its comparisons; it checks no range here).
        "adam_epsilon_nan": (lambda m: m.Adam(0.1, epsilon=NAN), "epsilon must be positive", False),
        "adam_epsilon_inf": (lambda m: m.Adam(0.1, epsilon=INF), "epsilon must be positive", False),
        "adam_lazy_adam_not_bool": (lambda m: m.Adam(0.1, lazy_adam="no"), "lazy_adam", False),
        "adagrad_accumulator_nan": (
            lambda m: m.Adagrad(0.1, initial_accumulator_value=NAN),
            "initial_accumulator_value",
            False,
        ),
        "adagrad_accumulator_inf": (
            lambda m: m.Adagrad(0.1, initial_accumulator_value=INF),
            "initial_accumulator_value",
            False,
        ),
        "adagrad_momentum_epsilon_nan": (
            lambda m: m.AdagradMomentum(0.1, epsilon=NAN),
            "epsilon must be positive",
            False,
        ),
        "adagrad_momentum_momentum_negative": (
            lambda m: m.AdagradMomentum(0.1, momentum=-0.5),
            r"`momentum` must be a float in \[0, 1\), got -0\.5",
            False,
        ),
        "adagrad_momentum_momentum_one": (
            lambda m: m.AdagradMomentum(0.1, momentum=1.0),
            r"`momentum` must be a float in \[0, 1\)",
            False,
        ),
        "adagrad_momentum_momentum_nan": (
            lambda m: m.AdagradMomentum(0.1, momentum=NAN),
            "`momentum`",
            False,
        ),
        "adagrad_momentum_beta2_above_one": (
            lambda m: m.AdagradMomentum(0.1, beta2=1.5),
            r"`beta2` must be a float in \[0, 1\]",
            False,
        ),
        "adagrad_momentum_beta2_negative": (
            lambda m: m.AdagradMomentum(0.1, beta2=-0.1),
            "`beta2`",
            False,
        ),
        "adagrad_momentum_exponent_inf": (
            lambda m: m.AdagradMomentum(0.1, exponent=INF),
            "exponent",
            False,
        ),
        "adagrad_momentum_use_nesterov_not_bool": (
            lambda m: m.AdagradMomentum(0.1, use_nesterov=1),
            "use_nesterov",
            False,
        ),
        "ftrl_l1_negative": (
            lambda m: m.FTRL(0.1, l1_regularization_strength=-1.0),
            r"`l1_regularization_strength` needs to be positive or zero.*-1\.0",
            False,
        ),
        "ftrl_l2_negative": (
            lambda m: m.FTRL(0.1, l2_regularization_strength=-1.0),
            r"`l2_regularization_strength` needs to be positive or zero",
            False,
        ),
        "ftrl_l1_nan": (
            lambda m: m.FTRL(0.1, l1_regularization_strength=NAN),
            "l1_regularization_strength",
            False,
        ),
        "ftrl_beta_negative": (lambda m: m.FTRL(0.1, beta=-1.0), r"`beta` needs to be", False),
        "ftrl_learning_rate_power_positive": (
            lambda m: m.FTRL(0.1, learning_rate_power=0.5),
            r"`learning_rate_power` needs to be negative or zero.*0\.5",
            False,
        ),
        "ftrl_learning_rate_power_nan": (
            lambda m: m.FTRL(0.1, learning_rate_power=NAN),
            "learning_rate_power",
            False,
        ),
        "ftrl_learning_rate_zero": (
            lambda m: m.FTRL(0.0),
            r"`learning_rate` must be > 0 \(FTRL divides by it",
            False,
        ),
        "ftrl_multiply_linear_not_bool": (
            lambda m: m.FTRL(0.1, multiply_linear_by_learning_rate=None),
            "multiply_linear_by_learning_rate",
            False,
        ),
    }
)


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_hyperparameter_raises(case):
    build, match, _ = INVALID[case]
    with pytest.raises(ValueError, match=match) as info:
        build(jeo)
    assert "\n" not in str(info.value)  # one line


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_hyperparameter_tf_agreement(case):
    """TF raises ValueError for the cases it checks; it accepts the others (jaxembed is
    stricter there: they would fail later or train to NaN)."""
    build, _, tf_raises = INVALID[case]
    tf_emb = _tf_embedding()
    if tf_raises:
        with pytest.raises(ValueError):
            build(tf_emb)
    else:
        build(tf_emb)


# Valid arguments (TF's defaults, its test configs and the edges of every range): both accept.
VALID = {
    **{f"{n.lower()}_defaults": (lambda m, n=n: getattr(m, n)()) for n in OPTIMIZERS},
    **{
        f"{n.lower()}_learning_rate_zero": (lambda m, n=n: getattr(m, n)(0.0))
        for n in OPTIMIZERS[:4]
    },
    **{
        f"{n.lower()}_schedule": (lambda m, n=n: getattr(m, n)(lambda *step: 0.1))
        for n in OPTIMIZERS
    },
    **{
        f"{n.lower()}_clip_edges": (
            lambda m, n=n: getattr(m, n)(
                0.1,
                clip_weight_min=-INF,
                clip_weight_max=INF,
                clipvalue=0.0,
                weight_decay_factor=0.0,
                multiply_weight_decay_factor_by_learning_rate=True,
            )
        )
        for n in OPTIMIZERS
    },
    "sgd_equal_clip_weights": lambda m: m.SGD(0.1, clip_weight_min=0.5, clip_weight_max=0.5),
    "sgd_clipvalue_tuple_open": lambda m: m.SGD(0.1, clipvalue=(None, 1.0)),
    "sgd_clipvalue_inf": lambda m: m.SGD(0.1, clipvalue=INF),
    "adam_zero_betas": lambda m: m.Adam(0.1, beta_1=0.0, beta_2=0.0),
    "adam_tf_test_config": lambda m: m.Adam(0.1, lazy_adam=False, sum_inside_sqrt=False),
    "adagrad_momentum_tf_test_config": lambda m: m.AdagradMomentum(
        0.1, momentum=0.9, use_nesterov=True, exponent=3.0, epsilon=0.1, beta2=0.9
    ),
    "adagrad_momentum_beta2_zero": lambda m: m.AdagradMomentum(0.1, beta2=0.0),
    "ftrl_zero_power_and_regularization": lambda m: m.FTRL(
        0.1, learning_rate_power=0.0, l1_regularization_strength=0.0, beta=0.0
    ),
    "ftrl_regularized": lambda m: m.FTRL(
        0.1, l1_regularization_strength=0.01, l2_regularization_strength=0.1, beta=0.5
    ),
    "integer_learning_rate": lambda m: m.Adagrad(1),
    "numpy_learning_rate": lambda m: m.SGD(np.float32(0.1)),
}


@pytest.mark.parametrize("case", sorted(VALID))
def test_valid_hyperparameters_construct(case):
    VALID[case](jeo)
    VALID[case](_tf_embedding())


def test_ftrl_learning_rate_zero_allowed_with_linear_times_learning_rate():
    jeo.FTRL(0.0, multiply_linear_by_learning_rate=True)


def test_hyperparameter_message_names_argument_value_and_range():
    with pytest.raises(ValueError) as info:
        jeo.Adam(learning_rate=-0.5)
    assert str(info.value) == "Adam: `learning_rate` must be a finite float >= 0, got -0.5."


@pytest.mark.parametrize(
    "tx",
    [optax.sgd(NAN), optax.adam(INF), optax.adam(1e-3, eps=0.0), optax.rmsprop(1e-3, eps=0.0)],
    ids=["sgd_nan_learning_rate", "adam_inf_learning_rate", "adam_eps_zero", "rmsprop_eps_zero"],
)
def test_from_optax_nonfinite_updates_raise(tx):
    with pytest.raises(ValueError, match="NaN or Inf updates"):
        jeo.from_optax(tx)


@pytest.mark.parametrize("tx", [optax.adam(1e-3), optax.rmsprop(1e-3), optax.sgd(0.0)])
def test_from_optax_valid_transformations_construct(tx):
    jeo.from_optax(tx)


# ---------------------------------------------------------------------------------------------
# 2. Initializers

BAD_INITIALIZERS = {
    "wrong_shape": (
        lambda key, shape, dtype: jnp.zeros((3, 4), dtype),
        ValueError,
        r"Table 'bad'.*returned shape \[3, 4\], expected \[vocabulary_size, dim\] = \[10, 4\]",
    ),
    "transposed": (
        lambda key, shape, dtype: jnp.zeros(shape[::-1], dtype),
        ValueError,
        r"returned shape \[4, 10\]",
    ),
    "integer_dtype": (
        lambda key, shape, dtype: jnp.zeros(shape, jnp.int32),
        ValueError,
        r"Table 'bad'.*dtype int32, expected a float",
    ),
    "nan_values": (
        lambda key, shape, dtype: jnp.full(shape, jnp.nan, dtype),
        ValueError,
        r"Table 'bad'.*NaN or Inf",
    ),
    "tf_style_signature": (
        lambda shape, dtype=None: jnp.zeros(shape),
        TypeError,
        r"Table 'bad'.*initializer\(key, shape=\(10, 4\), dtype=float32\)",
    ),
    "not_an_array": (lambda key, shape, dtype: "zeros", TypeError, r"Table 'bad'.*returned str"),
}


@pytest.mark.parametrize("case", sorted(BAD_INITIALIZERS))
def test_bad_initializer_raises_naming_the_table(case):
    init, error, match = BAD_INITIALIZERS[case]
    table = je.TableConfig(10, 4, init, name="bad")
    with pytest.raises(error, match=match):
        table.init_table(jax.random.key(0))
    emb = je.Embedding({"f": je.FeatureConfig(table)}, jeo.SGD(0.1))
    with pytest.raises(error, match=match):
        emb.init(jax.random.key(0))


def test_bad_initializer_shape_raises_under_jit():
    table = je.TableConfig(10, 4, lambda k, s, d: jnp.zeros((3, 4), d), name="bad")
    emb = je.Embedding({"f": je.FeatureConfig(table)}, jeo.SGD(0.1))
    with pytest.raises(ValueError, match=r"returned shape \[3, 4\]"):
        jax.jit(emb.init)(jax.random.key(0))


def test_unnamed_table_initializer_error_uses_the_embedding_name():
    table = je.TableConfig(10, 4, lambda k, s, d: jnp.zeros((3, 4), d))
    emb = je.Embedding({"f": je.FeatureConfig(table)}, jeo.SGD(0.1))
    with pytest.raises(ValueError, match="Table 'table_0'"):
        emb.init(jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# 3. States built for another optimizer or Embedding


def _single(optimizer, vocab: int = 10, dim: int = 4, name: str = "t", mesh=None, **kw):
    table = je.TableConfig(vocab, dim, combiner="sum", name=name)
    return je.Embedding({"f": je.FeatureConfig(table)}, optimizer, mesh=mesh, **kw)


def _ids_batch(emb, ids=((1,), (2,))):
    return emb.preprocess({"f": np.asarray(ids)})


def _grads(emb, batch, value=1.0):
    acts = jax.eval_shape(emb.lookup, emb.abstract_state(), batch)
    return jax.tree.map(lambda a: jnp.full(a.shape, value, a.dtype), acts)


def _finite(grads):
    return jax.tree.map(lambda g: np.where(np.isfinite(g), g, 0).astype(g.dtype), grads)


def test_state_for_another_optimizer_raises():
    adam, adagrad = _single(jeo.Adam(0.1)), _single(jeo.Adagrad(0.1))
    state = adagrad.init(jax.random.key(0))
    batch = _ids_batch(adam)
    grads = _grads(adam, batch)
    match = (
        r"Table 't' \[10 x 4\].*optimizer slots \[accumulators \(10, 4\)\] are not those of "
        r"this Embedding's optimizer Adam \[momenta \(10, 4\), velocities \(10, 4\)\]"
    )
    with pytest.raises(ValueError, match=match):
        adam.apply_gradients(state, batch, grads)
    with pytest.raises(ValueError, match=match):  # at trace time, under jit
        jax.jit(adam.apply_gradients)(state, batch, grads)
    adam.lookup(state, batch)  # the tables fit: a lookup needs no slots


def test_state_for_from_optax_given_to_tf_optimizer_raises():
    optax_emb, tf_emb = _single(jeo.from_optax(optax.adam(0.1))), _single(jeo.Adam(0.1))
    state = optax_emb.init(jax.random.key(0))
    batch = _ids_batch(tf_emb)
    with pytest.raises(ValueError, match=r"Table 't'.*optimizer Adam"):
        tf_emb.apply_gradients(state, batch, _grads(tf_emb, batch))


def test_state_for_another_vocabulary_raises():
    small, big = _single(jeo.SGD(0.1), vocab=10), _single(jeo.SGD(0.1), vocab=20)
    state = big.init(jax.random.key(0))
    batch = _ids_batch(small)
    match = r"Table 't' \[10 x 4\].*state's array has shape \(20, 4\).*lays it out as \(10, 4\)"
    with pytest.raises(ValueError, match=match):
        small.lookup(state, batch)
    with pytest.raises(ValueError, match=match):
        small.apply_gradients(state, batch, _grads(small, batch))
    with pytest.raises(ValueError, match=match):
        jax.jit(small.lookup)(state, batch)


def test_state_missing_table_raises():
    emb = _single(jeo.SGD(0.1), name="t")
    other = _single(jeo.SGD(0.1), name="u")
    batch = _ids_batch(emb)
    with pytest.raises(ValueError, match=r"missing \['t'\], unexpected \['u'\]"):
        emb.lookup(other.init(jax.random.key(0)), batch)


def test_state_that_is_not_a_state_raises():
    emb = _single(jeo.SGD(0.1))
    batch = _ids_batch(emb)
    with pytest.raises(TypeError, match="must be an EmbeddingState"):
        emb.lookup({"tables": {}}, batch)


def test_state_check_accepts_abstract_values():
    emb = _single(jeo.Adam(0.1))
    batch = _ids_batch(emb)
    out = jax.eval_shape(emb.apply_gradients, emb.abstract_state(), batch, _grads(emb, batch))
    assert out.nonfinite.shape == () and out.nonfinite.dtype == jnp.int32


def test_state_of_unsharded_embedding_on_a_mesh_raises():
    mesh = jax.make_mesh((8,), ("x",))
    sharded = _single(jeo.SGD(0.1), vocab=13, mesh=mesh, sharding={"t": "row"})
    plain = _single(jeo.SGD(0.1), vocab=13)
    batch = sharded.preprocess({"f": np.arange(8)})
    with pytest.raises(ValueError, match=r"Table 't' \[13 x 4\] \(row\).*\(13, 4\).*\(16, 4\)"):
        sharded.lookup(plain.init(jax.random.key(0)), batch)


def test_state_from_logical_rejects_wrong_tables():
    emb = _single(jeo.SGD(0.1))
    with pytest.raises(ValueError, match=r"table 't' has shape \(3, 4\), expected"):
        emb.state_from_logical({"t": np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match=r"names \['t'\]"):
        emb.state_from_logical({"u": np.zeros((10, 4), np.float32)})


# ---------------------------------------------------------------------------------------------
# 4. Non-finite gradients

B = 16  # 2 examples per device on the 8-device meshes
HIST_BAD = {3: NAN, 9: INF}  # combined feature "hist": example -> bad value
SEQ_BAD = (5, 2, -INF)  # sequence feature "seq": example 5, position 2 (its last id)
ITEM_BAD = (12, NAN)  # dense feature "item": example 12
BAD_ROWS = len(HIST_BAD) + 2  # dropped gradient rows per step
PRIVATE_USERS = (30, 31, 32, 33)  # rows only the bad gradient rows touch
PRIVATE_ITEM = 20


def _init(seed):
    def init(key, shape, dtype):
        return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)

    return init


def _guard_config():
    users = je.TableConfig(40, 4, _init(1), combiner="mean", name="users")
    items = je.TableConfig(24, 3, _init(2), combiner="sum", name="items")
    return {
        "hist": je.FeatureConfig(users),
        "seq": je.FeatureConfig(users, max_sequence_length=3),
        "item": je.FeatureConfig(items),
    }


def _guard_inputs(drop_bad: bool = False) -> dict:
    """The batch; ``drop_bad`` leaves out what the bad gradient rows would train: their hist
    examples are empty, the seq example loses its last position, the item example is gone."""
    rng = np.random.default_rng(0)
    hist = [list(rng.integers(0, 12, rng.integers(1, 4))) for _ in range(B)]
    seq = [list(rng.integers(0, 12, rng.integers(1, 4))) for _ in range(B)]
    hist[3], hist[9] = [30, 31, 5], [32]  # row 5 also has finite users
    seq[5] = [6, 7, 33]
    item = rng.integers(0, 16, B)
    item[12] = PRIVATE_ITEM
    if drop_bad:
        for e in HIST_BAD:
            hist[e] = []
        seq[SEQ_BAD[0]] = seq[SEQ_BAD[0]][: SEQ_BAD[1]]
        item = np.delete(item, ITEM_BAD[0])

    def ragged(rows):
        return je.Ragged.from_row_lengths(
            np.asarray([i for r in rows for i in r], np.int64), [len(r) for r in rows]
        )

    return {"hist": ragged(hist), "seq": ragged(seq), "item": item}


def _guard_grads(drop_bad: bool = False) -> dict:
    rng = np.random.default_rng(1)
    grads = {
        "hist": rng.normal(size=(B, 4)).astype(np.float32),
        "seq": rng.normal(size=(B, 3, 4)).astype(np.float32),
        "item": rng.normal(size=(B, 3)).astype(np.float32),
    }
    if drop_bad:
        grads["item"] = np.delete(grads["item"], ITEM_BAD[0], axis=0)
        return grads
    for e, bad in HIST_BAD.items():
        grads["hist"][e, 1] = bad
    e, p, bad = SEQ_BAD
    grads["seq"][e, p, 2] = bad
    grads["item"][ITEM_BAD[0], 0] = ITEM_BAD[1]
    return grads


def _logical(emb, state) -> dict:
    tables = {t.name: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
    slots = {
        f"{t.name}/{k}": np.asarray(v)
        for t, named in emb.slot_variables(state).items()
        for k, v in named.items()
    }
    return {**tables, **slots}


def _train(emb, inputs, grads, steps: int = 2):
    """``steps`` jitted, donated steps on the same batch (the first one twice as a warm-up of the
    count: it must add up)."""
    step = jax.jit(emb.apply_gradients, donate_argnums=0)
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess(inputs)
    for _ in range(steps):
        state = step(state, batch, grads)
    return state


GUARD_OPTIMIZERS = {
    "sgd": jeo.SGD(0.1),
    "adagrad": jeo.Adagrad(0.1),
    "adagrad_momentum": jeo.AdagradMomentum(0.1, momentum=0.9, use_nesterov=True),
    "adam": jeo.Adam(0.1),
    "ftrl": jeo.FTRL(0.1, l1_regularization_strength=0.01),
    "sgd_weight_decay_clip": jeo.SGD(
        0.1, weight_decay_factor=0.1, clip_weight_min=-1.0, clip_weight_max=1.0
    ),
    "optax_adam": jeo.from_optax(optax.adam(0.1)),
}


@pytest.mark.parametrize("name", sorted(GUARD_OPTIMIZERS))
def test_nonfinite_skip_equals_the_finite_only_update(name):
    optimizer = GUARD_OPTIMIZERS[name]
    emb = je.Embedding(_guard_config(), optimizer)
    got = _train(emb, _guard_inputs(), _guard_grads())
    want = _train(emb, _guard_inputs(drop_bad=True), _guard_grads(drop_bad=True))
    assert int(got.nonfinite) == 2 * BAD_ROWS
    assert int(want.nonfinite) == 0
    initial = _logical(emb, emb.init(jax.random.key(0)))
    got, want = _logical(emb, got), _logical(emb, want)
    for key in want:
        assert np.isfinite(got[key]).all(), key
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
        rows = PRIVATE_USERS if key.startswith("users") else (PRIVATE_ITEM,)
        # Rows only bad gradient rows touch: bit-identical to their initial values.
        np.testing.assert_array_equal(got[key][list(rows)], initial[key][list(rows)], key)


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "minus_inf"])
def test_nonfinite_skip_counts_each_row_once(bad):
    emb = _single(jeo.SGD(0.1))
    batch = _ids_batch(emb, ids=((1,), (2,), (3,)))
    grads = {"f": np.ones((3, 4), np.float32)}  # [B, 1] ids: [B, dim] (as TPUEmbedding)
    grads["f"][1, :] = bad  # every element of the row: still one row
    state = emb.apply_gradients(emb.init(jax.random.key(0)), batch, grads)
    assert int(state.nonfinite) == 1
    table = np.asarray(state.tables["t"])
    assert np.isfinite(table).all()
    np.testing.assert_array_equal(table[2], np.asarray(emb.init(jax.random.key(0)).tables["t"])[2])


def test_nonfinite_default_is_skip_and_state_counter_starts_at_zero():
    emb = _single(jeo.SGD(0.1))
    assert emb.nonfinite_gradients == "skip"
    for state in (emb.init(jax.random.key(0)), emb.abstract_state()):
        assert state.nonfinite.shape == () and state.nonfinite.dtype == jnp.int32
    assert int(emb.init(jax.random.key(0)).nonfinite) == 0
    restored = emb.state_from_logical({"t": np.zeros((10, 4), np.float32)}, nonfinite=7)
    assert int(restored.nonfinite) == 7


def test_nonfinite_three_field_state_still_works():
    """``EmbeddingState(tables, slots, step)`` (no counter) trains; skipped rows go uncounted."""
    emb = _single(jeo.Adagrad(0.1))
    full = emb.init(jax.random.key(0))
    state = je.EmbeddingState(full.tables, full.slots, full.step)
    assert state.nonfinite is None
    batch = _ids_batch(emb)
    grads = {"f": np.array([[1.0] * 4, [NAN] * 4], np.float32)}
    new = jax.jit(emb.apply_gradients)(state, batch, grads)
    assert new.nonfinite is None and int(new.step) == 1
    assert np.isfinite(np.asarray(new.tables["t"])).all()


@pytest.mark.parametrize(
    "mesh_shape, table_axes, sharding",
    [
        ((8,), None, {"users": "row", "items": "table"}),
        ((8,), None, {"users": "column", "items": "replicated"}),
        ((2, 4), ("model",), {"users": "row", "items": "row"}),
    ],
    ids=["row_table", "column_replicated", "2d_mesh_replicas"],
)
def test_nonfinite_skip_on_a_mesh_equals_one_device(mesh_shape, table_axes, sharding):
    axes = ("x",) if len(mesh_shape) == 1 else ("data", "model")
    mesh = jax.make_mesh(mesh_shape, axes)
    config = _guard_config()
    optimizer = jeo.Adam(0.1)
    on_mesh = je.Embedding(config, optimizer, mesh=mesh, sharding=sharding, table_axes=table_axes)
    one = je.Embedding(config, optimizer)
    got = _train(on_mesh, _guard_inputs(), _guard_grads())
    want = _train(one, _guard_inputs(drop_bad=True), _guard_grads(drop_bad=True))
    assert int(got.nonfinite) == 2 * BAD_ROWS
    got, want = _logical(on_mesh, got), _logical(one, want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_nonfinite_raise_raises_naming_the_features():
    emb = je.Embedding(_guard_config(), jeo.SGD(0.1), nonfinite_gradients="raise")
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess(_guard_inputs())
    grads = _guard_grads()
    match = r"NaN or Inf for features 'hist' \(2 rows\), 'item' \(1 rows\), 'seq' \(1 rows\)"
    with pytest.raises(NonFiniteGradientError, match=match):
        emb.apply_gradients(state, batch, grads)  # eagerly: a plain Python exception
    with pytest.raises(
        jax.errors.JaxRuntimeError, match=re.compile("NonFiniteGradientError.*" + match, re.S)
    ):
        jax.block_until_ready(jax.jit(emb.apply_gradients)(state, batch, grads))
    finite = _finite(grads)
    new = jax.jit(emb.apply_gradients)(state, batch, finite)  # finite gradients: no error
    assert int(new.step) == 1 and int(new.nonfinite) == 0


_MESH_RAISE_SCRIPT = textwrap.dedent(
    """
    import os, re, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np, jaxembed as je
    import test_guards as g

    mesh = jax.make_mesh((8,), ("x",))
    emb = je.Embedding(g._guard_config(), je.optimizers.Adam(0.1), mesh=mesh,
                       sharding={{"users": "row", "items": "table"}}, nonfinite_gradients="raise")
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess(g._guard_inputs())
    step = jax.jit(emb.apply_gradients)
    finite = g._finite(g._guard_grads())
    assert int(step(state, batch, finite).step) == 1
    try:
        jax.block_until_ready(step(state, batch, g._guard_grads()))
    except jax.errors.JaxRuntimeError as err:
        ok = re.search("NonFiniteGradientError.*'hist' \\\\(2 rows\\\\)", str(err), re.S)
        print("RAISED" if ok else "WRONG MESSAGE: " + str(err)[-300:], flush=True)
    else:
        print("NO ERROR", flush=True)
    os._exit(0)  # the failed program leaves JAX's runtime tokens in error: skip teardown
    """
)


def test_nonfinite_raise_on_a_mesh():
    """On 8 devices every device raises (after the counts are summed), so no device waits in a
    collective. Run in a subprocess: JAX keeps the failed step's runtime error afterwards."""
    script = _MESH_RAISE_SCRIPT.format(tests=os.path.dirname(__file__))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    assert "RAISED" in out.stdout, out.stdout + out.stderr[-3000:]


def test_nonfinite_apply_keeps_the_unguarded_update():
    emb = je.Embedding(_guard_config(), jeo.SGD(0.1), nonfinite_gradients="apply")
    state = emb.apply_gradients(
        emb.init(jax.random.key(0)), emb.preprocess(_guard_inputs()), _guard_grads()
    )
    assert int(state.nonfinite) == 0  # not counted
    users = np.asarray(emb.embedding_tables(state)[emb.table_configs[0]])
    assert not np.isfinite(users[list(PRIVATE_USERS)]).all()  # NaN reached the rows
    assert not np.isfinite(users[5]).all()  # and the rows shared with finite examples


def test_nonfinite_guard_keeps_jit_donation_and_checkpoints(tmp_path):
    emb = je.Embedding(_guard_config(), jeo.Adagrad(0.1))
    state = _train(emb, _guard_inputs(), _guard_grads(), steps=3)
    assert int(state.nonfinite) == 3 * BAD_ROWS and int(state.step) == 3
    je.checkpoint.save(tmp_path, emb, state, step=3)
    restored = je.checkpoint.restore(tmp_path, emb)
    assert restored.nonfinite.shape == () and restored.nonfinite.dtype == jnp.int32
    for key, value in _logical(emb, state).items():
        np.testing.assert_array_equal(_logical(emb, restored)[key], value, err_msg=key)


def test_nonfinite_gradients_invalid_value_raises():
    with pytest.raises(ValueError, match=r"`nonfinite_gradients` must be one of"):
        _single(jeo.SGD(0.1), nonfinite_gradients="ignore")


# ---------------------------------------------------------------------------------------------
# 5. Other bad arguments of Embedding


@pytest.mark.parametrize("mesh", ["cpu", [0, 1], 8], ids=["string", "list", "int"])
def test_embedding_mesh_not_a_mesh_raises(mesh):
    with pytest.raises(TypeError, match=r"`mesh` must be a jax.sharding.Mesh or None"):
        _single(jeo.SGD(0.1), mesh=mesh)


def test_embedding_optimizer_class_not_instance_raises():
    with pytest.raises(ValueError, match=r"unsupported optimizer.*Pass an instance, e.g. Adam\("):
        _single(jeo.Adam)


def test_embedding_sharding_not_a_mapping_raises():
    with pytest.raises(TypeError, match=r"`sharding` must be a mapping"):
        _single(jeo.SGD(0.1), sharding=["row"])


@pytest.mark.parametrize("key", [0, None, "seed"], ids=["int", "none", "string"])
def test_init_key_not_a_key_raises(key):
    with pytest.raises(TypeError, match=r"Embedding.init expects one PRNG key"):
        _single(jeo.SGD(0.1)).init(key)


def test_init_accepts_raw_uint32_keys():
    state = _single(jeo.SGD(0.1)).init(jax.random.PRNGKey(0))
    assert state.tables["t"].shape == (10, 4) and math.isfinite(float(state.tables["t"].sum()))
