"""The TF TPU embedding optimizers: arguments, validation, slots and the training maths.

* Arguments, defaults and validation against ``tf.tpu.experimental.embedding`` (TF is imported
  only by the tests that compare with it), and TF's own ``test_grad_clip_*`` and
  ``test_equal_and_hash_function`` (tpu_embedding_v2_utils_test.py).
* Training: several jitted ``Embedding.apply_gradients`` steps against ``numpy_reference``
  (float64), tables *and* slots after every step, at the tolerances of TF's TPU tests
  (tf_semantics.md section 3.4). Variants run on the compact scenario (one weighted sparse
  feature, fixed shapes, so one compilation per case); the mixed scenario (every input kind,
  three combiners, duplicates within/across examples and features, per-table optimizer
  overrides) checks the gradient accumulation under each optimizer. Rows no batch touched stay
  bit-identical (tables and slots), except under ``Adam(lazy_adam=False)``.
* TF's ``test_variable_learning_rate`` and ``slot_variable_creation_fn`` tests, ported.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest

import jaxembed as je

jeo = je.optimizers
OPTIMIZERS = ("SGD", "Adagrad", "AdagradMomentum", "Adam", "FTRL")
WITH_SLOT_FN = ("Adagrad", "AdagradMomentum", "Adam", "FTRL")

# (rtol, atol) per optimizer class: TF's TPU test tolerances, float32 against float64.
TOLERANCES = {
    "SGD": (1e-5, 1e-6),
    "Adagrad": (1e-5, 1e-6),
    "Adam": (1e-4, 1e-5),
    "AdagradMomentum": (1e-3, 1e-5),
    "FTRL": (5e-4, 1e-5),
}


def _tf_embedding():
    tf = pytest.importorskip("tensorflow")
    return tf.tpu.experimental.embedding


def _raises_value_error(fn, match: str | None = None):
    with pytest.raises(ValueError, match=match):
        fn()


# ---------------------------------------------------------------------------------------------
# Arguments, defaults, validation


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_arguments_order_and_defaults_match_tf(name):
    tf_params = list(inspect.signature(getattr(_tf_embedding(), name).__init__).parameters.values())
    je_params = list(inspect.signature(getattr(jeo, name)).parameters.values())
    tf_args = [(p.name, p.default) for p in tf_params[1:]]  # drop self
    je_args = [(p.name, p.default) for p in je_params]
    assert je_args == tf_args


@pytest.mark.parametrize(
    "name, slots",
    [
        ("SGD", {}),
        ("Adagrad", {"accumulators": 0.1}),
        ("AdagradMomentum", {"accumulators": 0.0, "momenta": 0.0}),
        ("Adam", {"momenta": 0.0, "velocities": 0.0}),
        ("FTRL", {"accumulators": 0.1, "linears": 0.0}),
    ],
)
def test_slot_names_and_initial_values(name, slots):
    table = je.TableConfig(5, 3, name="t")
    emb = je.Embedding({"f": je.FeatureConfig(table)}, getattr(jeo, name)(0.1))
    got = emb.slot_variables(emb.init(jax.random.key(0)))[table]
    assert list(got) == list(slots)  # TF's slot order (load/retrieve ops depend on it)
    for slot, value in slots.items():
        np.testing.assert_array_equal(got[slot], np.full((5, 3), value, np.float32))
        assert got[slot].dtype == jnp.float32


def test_initial_accumulator_value_sets_the_accumulators():
    table = je.TableConfig(4, 2, name="t")
    for opt in (
        jeo.Adagrad(0.1, initial_accumulator_value=0.5),
        jeo.FTRL(0.1, -0.5, 0, 0, 0, 0.25),  # positional: TF's argument order
    ):
        emb = je.Embedding({"f": je.FeatureConfig(table)}, opt)
        acc = emb.slot_variables(emb.init(jax.random.key(0)))[table]["accumulators"]
        np.testing.assert_array_equal(acc, np.full((4, 2), opt.initial_accumulator_value))


# (callable building the bad optimizer from a module of optimizers, message regex, TF also raises)
INVALID = {
    "adagrad_accumulator_zero": (
        lambda m: m.Adagrad(0.1, initial_accumulator_value=0.0),
        "initial_accumulator_value",
        True,
    ),
    "adagrad_accumulator_negative": (
        lambda m: m.Adagrad(0.1, initial_accumulator_value=-1.0),
        "initial_accumulator_value",
        True,
    ),
    "ftrl_accumulator_zero": (
        lambda m: m.FTRL(0.1, initial_accumulator_value=0.0),
        "initial_accumulator_value",
        True,
    ),
    "ftrl_accumulator_zero_allow_zero": (
        lambda m: m.FTRL(0.1, initial_accumulator_value=0.0, allow_zero_accumulator=True),
        "initial_accumulator_value",
        True,
    ),
    "adagrad_momentum_epsilon_zero": (
        lambda m: m.AdagradMomentum(0.1, epsilon=0.0),
        "epsilon must be positive",
        True,
    ),
    "adagrad_momentum_epsilon_negative": (
        lambda m: m.AdagradMomentum(0.1, epsilon=-1e-3),
        "epsilon must be positive",
        True,
    ),
    "adagrad_momentum_exponent_zero": (
        lambda m: m.AdagradMomentum(0.1, exponent=0),
        "exponent",
        True,
    ),
    "adagrad_momentum_exponent_negative": (
        lambda m: m.AdagradMomentum(0.1, exponent=-2.0),
        "exponent",
        True,
    ),
    "adam_beta_1_one": (lambda m: m.Adam(0.1, beta_1=1.0), "beta_1", True),
    "adam_beta_1_negative": (lambda m: m.Adam(0.1, beta_1=-0.1), "beta_1", True),
    # TF's message names beta_2 but prints beta_1's value (P15); ours names beta_2.
    "adam_beta_2_one": (lambda m: m.Adam(0.1, beta_2=1.0), "beta_2", True),
    "adam_beta_2_above_one": (lambda m: m.Adam(0.1, beta_2=1.5), "beta_2", True),
    "adam_beta_2_negative": (lambda m: m.Adam(0.1, beta_2=-0.5), "beta_2", True),
    "adam_epsilon_zero": (lambda m: m.Adam(0.1, epsilon=0.0), "epsilon", True),
    "adam_epsilon_negative": (lambda m: m.Adam(0.1, epsilon=-1.0), "epsilon", True),
    "adam_non_lazy_without_accumulation": (
        lambda m: m.Adam(0.1, lazy_adam=False, use_gradient_accumulation=False),
        "accumulation",
        True,
    ),
    # TF raises TypeError for a list ("can't multiply sequence"); we raise ValueError.
    "clipvalue_list": (lambda m: m.SGD(0.1, clipvalue=[-1.0, 1.0]), "clipvalue", False),
    "adagrad_clipvalue_list": (lambda m: m.Adagrad(0.1, clipvalue=[0.5]), "clipvalue", False),
    # TF accepts any learning rate here (it fails later); we check at construction.
    "learning_rate_string": (lambda m: m.SGD("0.1"), "learning_rate", False),
    "learning_rate_none": (lambda m: m.Adam(None), "learning_rate", False),
    "learning_rate_list": (lambda m: m.Adagrad([0.1]), "learning_rate", False),
}
for _name in WITH_SLOT_FN:
    INVALID[f"{_name.lower()}_slot_fn_not_callable"] = (
        lambda m, n=_name: getattr(m, n)(0.1, slot_variable_creation_fn="zeros"),
        "slot_variable_creation_fn",
        True,
    )
for _name in OPTIMIZERS:
    for _clip in (0.0, 1.0, (None, 1.0), (-1.0, 1.0)):
        INVALID[f"{_name.lower()}_clipvalue_{_clip}_without_accumulation"] = (
            lambda m, n=_name, c=_clip: getattr(m, n)(
                0.1, use_gradient_accumulation=False, clipvalue=c
            ),
            "accumulation",
            True,
        )


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_arguments_raise_value_error(case):
    build, match, _ = INVALID[case]
    _raises_value_error(lambda: build(jeo), match)


@pytest.mark.parametrize("case", sorted(k for k, v in INVALID.items() if v[2]))
def test_tf_raises_value_error_for_the_same_arguments(case):
    build, _, _ = INVALID[case]
    _raises_value_error(lambda: build(_tf_embedding()))


ACCEPTED = {
    # TF leaves learning_rate_power, l1/l2, momentum and negative clipvalues unchecked; jaxembed
    # rejects them (tests/test_guards.py). These are accepted by both.
    "lazy_adam_without_accumulation": lambda m: m.Adam(0.1, use_gradient_accumulation=False),
    "adam_zero_betas": lambda m: m.Adam(0.1, beta_1=0.0, beta_2=0.0),
    "integer_learning_rate": lambda m: m.Adagrad(1),
    "sgd_accumulation_off": lambda m: m.SGD(0.1, use_gradient_accumulation=False),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_arguments_tf_accepts_are_accepted(case):
    ACCEPTED[case](jeo)
    ACCEPTED[case](_tf_embedding())


def test_callable_learning_rate_is_accepted():
    assert jeo.SGD(optax.linear_schedule(0.1, 0.0, 10)).learning_rate(0) == pytest.approx(0.1)
    jeo.Adam(lambda step: 0.1 / (1 + step))


# Ported from tpu_embedding_v2_utils_test.py (AdagradMomentum added).
CLIP_OPTIMIZERS = ("SGD", "Adagrad", "AdagradMomentum", "Adam", "FTRL")


@pytest.mark.parametrize("name", CLIP_OPTIMIZERS)
def test_grad_clip_with_accumulation_off(name):
    opt = getattr(jeo, name)
    with pytest.raises(ValueError, match="accumulation"):
        opt(1.0, use_gradient_accumulation=False, clipvalue=0.0)
    with pytest.raises(ValueError, match="accumulation"):
        opt(1.0, use_gradient_accumulation=False, clipvalue=(None, 1.0))


@pytest.mark.parametrize("name", CLIP_OPTIMIZERS)
def test_grad_clip_with_tuple(name):
    opt = getattr(jeo, name)(1.0, clipvalue=(-1.0, 1.0))
    assert opt.clip_gradient_min == -1.0
    assert opt.clip_gradient_max == 1.0


@pytest.mark.parametrize("name", CLIP_OPTIMIZERS)
def test_grad_clip_with_single_value(name):
    opt = getattr(jeo, name)(1.0, clipvalue=1.0)
    assert opt.clip_gradient_min == -1.0
    assert opt.clip_gradient_max == 1.0


@pytest.mark.parametrize("name", CLIP_OPTIMIZERS)
def test_grad_clip_with_tuple_and_none(name):
    opt = getattr(jeo, name)(1.0, clipvalue=(None, 1))
    assert opt.clip_gradient_min is None
    assert opt.clip_gradient_max == 1


@pytest.mark.parametrize("name", CLIP_OPTIMIZERS)
def test_no_grad_clip_by_default(name):
    opt = getattr(jeo, name)(1.0)
    assert opt.clip_gradient_min is None and opt.clip_gradient_max is None


@pytest.mark.parametrize("clipvalue", [1.0, 0.5, (-1.0, 1.0), (None, 1.0), (-2.0, None), None])
@pytest.mark.parametrize("name", CLIP_OPTIMIZERS)
def test_grad_clip_bounds_match_tf(name, clipvalue):
    ours = getattr(jeo, name)(1.0, clipvalue=clipvalue)
    theirs = getattr(_tf_embedding(), name)(1.0, clipvalue=clipvalue)
    assert (ours.clip_gradient_min, ours.clip_gradient_max) == (
        theirs.clip_gradient_min,
        theirs.clip_gradient_max,
    )


@pytest.mark.parametrize("arg, other", [("beta_1", "beta_2"), ("beta_2", "beta_1")])
def test_adam_beta_errors_name_the_right_argument(arg, other):
    with pytest.raises(ValueError) as info:
        jeo.Adam(0.1, **{arg: 1.0})
    assert arg in str(info.value) and other not in str(info.value)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_equal_and_hash_function(name):
    opt = getattr(jeo, name)
    opt1, opt2, opt3 = opt(0.1), opt(0.1), opt(0.2)
    assert opt1 == opt2
    assert hash(opt1) == hash(opt2)
    assert opt1 != opt3
    assert hash(opt1) != hash(opt3)


def test_equality_is_by_class_and_every_argument():
    assert jeo.SGD(0.1) != jeo.Adagrad(0.1)
    assert jeo.Adam(0.1) != jeo.Adam(0.1, lazy_adam=False)
    assert jeo.FTRL(0.1, clipvalue=1.0) == jeo.FTRL(0.1, clipvalue=1.0)
    assert jeo.FTRL(0.1, clipvalue=1.0) != jeo.FTRL(0.1, clipvalue=(None, 1.0))
    assert len({jeo.SGD(0.1), jeo.SGD(0.1), jeo.Adam(0.1), jeo.Adam(0.2)}) == 3


@pytest.mark.parametrize(
    "opt,twin",
    [
        (jeo.SGD(0.1, clipvalue=(-1.0, None)), True),
        (jeo.Adagrad(0.2, initial_accumulator_value=0.5, weight_decay_factor=0.01), True),
        (jeo.AdagradMomentum(0.1, momentum=0.9, use_nesterov=True), True),
        (jeo.Adam(0.1, lazy_adam=False, clip_weight_max=2.0), True),
        (jeo.FTRL(0.1, beta=0.5, multiply_linear_by_learning_rate=True), True),
        (jeo.RowWiseAdagrad(0.1, epsilon=1e-6), False),
        (jeo.PartialRowWiseAdam(0.1, beta_1=0.8), False),
    ],
)
def test_hyperparameters_rebuild_the_optimizer(opt, twin):
    """What checkpoints record and ``export.tf_optimizer`` passes to TF: every argument."""
    assert type(opt)(**opt.hyperparameters()) == opt
    assert opt.has_tf_twin is twin


def test_an_optax_optimizer_has_no_storable_hyperparameters_and_no_tf_twin():
    opt = jeo.from_optax(optax.adam(0.01))
    assert opt.hyperparameters() == {}
    assert not opt.has_tf_twin


# ---------------------------------------------------------------------------------------------
# Training against the numpy reference


def _np_state(emb, state):
    tables = {t: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
    slots = {
        t: {k: np.asarray(v) for k, v in s.items()} for t, s in emb.slot_variables(state).items()
    }
    return tables, slots


def assert_matches_reference(emb, state, trainer, where: str) -> None:
    tables, slots = _np_state(emb, state)
    for table, got in tables.items():
        opt = trainer.optimizers[table]
        rtol, atol = TOLERANCES[type(opt).__name__]
        np.testing.assert_allclose(
            got,
            trainer.tables[table],
            rtol=rtol,
            atol=atol,
            err_msg=f"table {table.name!r} ({opt}) {where}",
        )
        assert set(slots[table]) == set(trainer.slots[table])
        for slot, value in slots[table].items():
            np.testing.assert_allclose(
                value,
                trainer.slots[table][slot],
                rtol=rtol,
                atol=atol,
                err_msg=f"slot {slot!r} of table {table.name!r} ({opt}) {where}",
            )


def train_and_compare(feature_config, optimizer, batches, *, seed=0, grad_scale=1.0):
    """Trains ``je.Embedding`` (jitted) and the reference side by side; compares every step.

    Returns ``(emb, initial numpy state, final state, trainer)``. Checks that rows never touched
    are bit-identical to their initial values (tables and slots) for lazy optimizers.
    """
    emb = je.Embedding(feature_config, optimizer)
    state = emb.init(jax.random.key(seed))
    init_tables, init_slots = _np_state(emb, state)
    trainer = ref.ReferenceTrainer(feature_config, optimizer, init_tables)
    assert_matches_reference(emb, state, trainer, "at init")
    apply = jax.jit(emb.apply_gradients)
    rng = np.random.default_rng(seed + 1)
    for step, (inputs, weights) in enumerate(batches):
        grads = ref.random_grads(rng, inputs, feature_config, grad_scale)
        state = apply(state, emb.preprocess(inputs, weights), grads)
        trainer.apply(inputs, weights, grads)
        assert int(state.step) == step + 1
        assert_matches_reference(emb, state, trainer, f"after step {step}")
    tables, slots = _np_state(emb, state)
    for table, opt in trainer.optimizers.items():
        if not getattr(opt, "lazy_adam", True):
            continue
        untouched = ~trainer.ever_touched[table]
        assert untouched.any()
        np.testing.assert_array_equal(tables[table][untouched], init_tables[table][untouched])
        for slot, value in slots[table].items():
            np.testing.assert_array_equal(value[untouched], init_slots[table][slot][untouched])
    return emb, (init_tables, init_slots), state, trainer


# The configurations of TF's TPU tests (tpu_embedding_base_test.py).
TF_TEST_OPTIMIZERS = {
    "sgd": jeo.SGD(0.1),
    "adagrad": jeo.Adagrad(0.1),
    "adam": jeo.Adam(0.1),
    "ftrl": jeo.FTRL(0.1),
    "adagrad_momentum": jeo.AdagradMomentum(
        0.1, momentum=0.9, use_nesterov=True, exponent=3.0, epsilon=0.1, beta2=0.9
    ),
}

VARIANTS = {
    **{f"tf_{k}": v for k, v in TF_TEST_OPTIMIZERS.items()},
    "tf_defaults_adagrad_momentum": jeo.AdagradMomentum(),  # epsilon 1e-10, beta2 1, exponent 2
    # Adam
    "adam_sum_inside_sqrt": jeo.Adam(0.05, beta_1=0.8, beta_2=0.95, epsilon=1e-3),
    "adam_sum_outside_sqrt": jeo.Adam(
        0.05, beta_1=0.8, beta_2=0.95, epsilon=1e-3, sum_inside_sqrt=False
    ),
    "adam_non_lazy": jeo.Adam(0.05, lazy_adam=False),
    "adam_non_lazy_sum_outside_sqrt": jeo.Adam(
        0.05, 0.7, 0.9, 1e-2, lazy_adam=False, sum_inside_sqrt=False
    ),
    # FTRL: both linear modes, l1/l2/beta, two learning_rate_power values
    **{
        f"ftrl_power{p}_{'mul' if mul else 'plain'}_linear": jeo.FTRL(
            0.2,
            learning_rate_power=p,
            l1_regularization_strength=0.05,
            l2_regularization_strength=0.1,
            beta=0.3,
            initial_accumulator_value=0.2,
            multiply_linear_by_learning_rate=mul,
        )
        for p in (-0.5, -0.7)
        for mul in (False, True)
    },
    "ftrl_strong_l1": jeo.FTRL(0.3, l1_regularization_strength=1.0),
    "ftrl_strong_l1_mul_linear": jeo.FTRL(
        0.3, l1_regularization_strength=1.0, multiply_linear_by_learning_rate=True
    ),
    # AdagradMomentum: nesterov on/off, beta2 == 1 and != 1
    **{
        f"adagrad_momentum_{'nesterov' if nest else 'plain'}_beta2_{b2}": jeo.AdagradMomentum(
            0.1, momentum=0.8, use_nesterov=nest, exponent=2.0, beta2=b2, epsilon=1e-3
        )
        for nest in (False, True)
        for b2 in (1.0, 0.9)
    },
    # Gradient clipping (clipvalue: a scalar c, (None, c), (c, None)), weight clipping
    "sgd_clipvalue": jeo.SGD(0.1, clipvalue=0.5),
    "adagrad_clipvalue_none_max_clip_weight_max": jeo.Adagrad(
        0.5, clipvalue=(None, 0.3), clip_weight_max=0.2
    ),
    "adagrad_momentum_clipvalue_min_none": jeo.AdagradMomentum(
        0.1, momentum=0.9, use_nesterov=True, clipvalue=(-0.25, None)
    ),
    "sgd_clip_weights": jeo.SGD(0.5, clip_weight_min=-0.3, clip_weight_max=0.4),
    "ftrl_clip_weight_min": jeo.FTRL(0.5, clip_weight_min=-0.05),
    # Decoupled weight decay (from the pre-update row), then weight clipping
    "sgd_weight_decay": jeo.SGD(0.1, weight_decay_factor=0.05),
    "sgd_weight_decay_times_lr": jeo.SGD(
        0.1, weight_decay_factor=0.5, multiply_weight_decay_factor_by_learning_rate=True
    ),
    "adam_non_lazy_weight_decay_times_lr": jeo.Adam(
        0.05,
        lazy_adam=False,
        weight_decay_factor=0.5,
        multiply_weight_decay_factor_by_learning_rate=True,
    ),
    "sgd_weight_decay_then_clip_weights": jeo.SGD(
        0.5, weight_decay_factor=0.2, clip_weight_min=-0.3, clip_weight_max=0.3
    ),
    "ftrl_weight_decay_clipvalue_clip_weights": jeo.FTRL(
        0.1, weight_decay_factor=0.05, clip_weight_min=-0.4, clip_weight_max=0.4, clipvalue=0.5
    ),
    # Learning-rate schedules (called with the 0-based step), alone and with the options above
    "sgd_linear_schedule": jeo.SGD(optax.linear_schedule(0.3, 0.05, 3)),
    "sgd_schedule_weight_decay_times_lr": jeo.SGD(
        lambda step: 0.1 * (step + 1),
        weight_decay_factor=0.2,
        multiply_weight_decay_factor_by_learning_rate=True,
    ),
    "adagrad_piecewise_schedule_weight_decay_times_lr": jeo.Adagrad(
        optax.piecewise_constant_schedule(0.1, {1: 3.0, 3: 0.1}),
        weight_decay_factor=0.3,
        multiply_weight_decay_factor_by_learning_rate=True,
    ),
    "adam_exponential_decay_clipvalue_min_none_weight_decay": jeo.Adam(
        optax.exponential_decay(0.1, 1, 0.5), clipvalue=(-0.2, None), weight_decay_factor=0.02
    ),
    "ftrl_linear_schedule": jeo.FTRL(optax.linear_schedule(0.2, 0.02, 4), beta=0.1),
    "ftrl_linear_schedule_mul_linear": jeo.FTRL(
        optax.linear_schedule(0.2, 0.02, 4), multiply_linear_by_learning_rate=True
    ),
    "adagrad_momentum_piecewise_schedule": jeo.AdagradMomentum(
        optax.piecewise_constant_schedule(0.2, {2: 0.25}), momentum=0.9, use_nesterov=True
    ),
}

COMPACT_BATCHES = ref.compact_batches(4, seed=0)


class VariantRun:
    """Every VARIANT trained in ONE jitted Embedding (one compilation for all of them).

    Each variant gets its own table (named after it, with ``TableConfig.optimizer`` set to it;
    no global optimizer) and its own copy of the compact scenario's weighted sparse feature, with
    its own random gradients. ``history[k]`` is the numpy ``(tables, slots)`` after ``k`` steps.
    """

    def __init__(self, batches, seed=0):
        self.tables = {
            case: je.TableConfig(16, 4, combiner="mean", name=case, optimizer=opt)
            for case, opt in VARIANTS.items()
        }
        self.feature_config = {case: je.FeatureConfig(t) for case, t in self.tables.items()}
        emb = je.Embedding(self.feature_config)
        state = emb.init(jax.random.key(seed))
        self.history = [_np_state(emb, state)]
        self.steps = []  # (inputs, weights, grads) of each step, per variant path
        apply = jax.jit(emb.apply_gradients)
        rng = np.random.default_rng(seed + 1)
        for inputs, weights in batches:
            inputs = {case: inputs["hist"] for case in self.tables}
            weights = {case: weights["hist"] for case in self.tables}
            grads = ref.random_grads(rng, inputs, self.feature_config)
            state = apply(state, emb.preprocess(inputs, weights), grads)
            self.history.append(_np_state(emb, state))
            self.steps.append((inputs, weights, grads))
        self.final_step = int(state.step)
        self.compilations = apply._cache_size()

    def reference(self, case, optimizer=None):
        """The numpy reference for one variant (``optimizer`` replaces the variant's)."""
        table = self.tables[case]
        tables, slots = self.history[0]
        opt = optimizer or table.optimizer
        fc = {case: self.feature_config[case]}
        trainer = ref.ReferenceTrainer(fc, opt, {table: tables[table]})
        trainer.optimizers[table] = opt
        trainer.slots[table] = ref.initial_slots(opt, tables[table].shape)
        yield trainer
        for inputs, weights, grads in self.steps:
            pick = {case: inputs[case]}, {case: weights[case]}, {case: grads[case]}
            trainer.apply(*pick)
            yield trainer


@pytest.fixture(scope="module")
def variant_run():
    return VariantRun(COMPACT_BATCHES)


def assert_table_matches(history_entry, trainer, table, where):
    tables, slots = history_entry
    opt = trainer.optimizers[table]
    rtol, atol = TOLERANCES[type(opt).__name__]
    np.testing.assert_allclose(
        tables[table],
        trainer.tables[table],
        rtol=rtol,
        atol=atol,
        err_msg=f"table {table.name!r} ({opt}) {where}",
    )
    assert list(slots[table]) == list(ref.slot_names(opt))
    for slot, value in slots[table].items():
        np.testing.assert_allclose(
            value,
            trainer.slots[table][slot],
            rtol=rtol,
            atol=atol,
            err_msg=f"slot {slot!r} of table {table.name!r} ({opt}) {where}",
        )


def test_variant_run_is_one_compilation(variant_run):
    assert variant_run.final_step == len(COMPACT_BATCHES)
    assert variant_run.compilations == 1


@pytest.mark.parametrize("case", list(VARIANTS))
def test_optimizer_matches_reference(case, variant_run):
    table = variant_run.tables[case]
    for step, trainer in enumerate(variant_run.reference(case)):
        where = "at init" if step == 0 else f"after step {step}"
        assert_table_matches(variant_run.history[step], trainer, table, where)
    if getattr(VARIANTS[case], "lazy_adam", True):
        untouched = ~trainer.ever_touched[table]
        assert untouched.tolist() == [i in ref.COMPACT_UNTOUCHED for i in range(16)]
        (t0, s0), (t1, s1) = variant_run.history[0], variant_run.history[-1]
        np.testing.assert_array_equal(t1[table][untouched], t0[table][untouched])
        for slot in s1[table]:
            np.testing.assert_array_equal(s1[table][slot][untouched], s0[table][slot][untouched])


def test_clipvalue_actually_clips_in_the_compact_scenario(variant_run):
    """Sensitivity: the summed row gradients exceed the clip values used above."""
    case = "sgd_clipvalue"
    inputs, weights, grads = variant_run.steps[0]
    fc = {case: variant_run.feature_config[case]}
    g, touched = ref.row_gradients(
        {case: inputs[case]}, {case: weights[case]}, {case: grads[case]}, fc
    )[variant_run.tables[case]]
    assert np.abs(g[touched]).max() > 0.5


@pytest.mark.parametrize("case", ["adam_non_lazy", "adam_non_lazy_sum_outside_sqrt"])
def test_non_lazy_adam_differs_from_lazy_adam_on_previously_touched_rows(case, variant_run):
    """Sensitivity: rows touched only in earlier steps move under lazy_adam=False."""
    table = variant_run.tables[case]
    *_, trainer = variant_run.reference(case)
    lazy_opt = dataclasses.replace(VARIANTS[case], lazy_adam=True)
    *_, lazy = variant_run.reference(case, lazy_opt)
    inputs, weights, _ = variant_run.steps[-1]
    fc = {case: variant_run.feature_config[case]}
    _, last_touched = ref.row_gradients({case: inputs[case]}, {case: weights[case]}, None, fc)[
        table
    ]
    earlier = trainer.ever_touched[table] & ~last_touched
    assert earlier.any()
    got = variant_run.history[-1][0][table]
    assert np.abs(got[earlier] - lazy.tables[table][earlier]).max() > 1e-3
    never = ~trainer.ever_touched[table]
    first = variant_run.history[0][0][table]
    np.testing.assert_array_equal(got[never], first[never])  # m = v = 0: no move


MIXED_BATCHES = ref.scenario_batches(3, seed=0)

MIXED_CASES = {
    # SGD on the two busiest tables: the plainest check of the per-row gradient of every input
    # kind; Adagrad with gradient and weight clipping on "users" (TableConfig.optimizer).
    "sgd_and_clipped_adagrad": (
        jeo.SGD(0.1),
        jeo.Adagrad(0.2, clipvalue=0.3, clip_weight_min=-0.5),
        None,
    ),
    # TF's test configurations side by side: AdagradMomentum (global, "tags"), FTRL ("users")
    # and Adam ("items") through TableConfig.optimizer overrides.
    "tf_configs_overrides": (
        TF_TEST_OPTIMIZERS["adagrad_momentum"],
        TF_TEST_OPTIMIZERS["ftrl"],
        TF_TEST_OPTIMIZERS["adam"],
    ),
}


@pytest.mark.parametrize("case", list(MIXED_CASES))
def test_mixed_inputs_and_per_table_optimizers_match_reference(case):
    optimizer, users_opt, items_opt = MIXED_CASES[case]
    fc = ref.scenario_feature_config(users_optimizer=users_opt, items_optimizer=items_opt)
    emb, _, state, trainer = train_and_compare(fc, optimizer, MIXED_BATCHES)
    for table in emb.embedding_tables(state):
        want = table.optimizer if table.optimizer is not None else optimizer
        assert list(emb.slot_variables(state)[table]) == list(ref.slot_names(want))
    for name, rows in ref.SCENARIO_UNTOUCHED.items():
        assert not trainer.ever_touched[fc_table(fc, name)][rows].any()


def fc_table(feature_config, name):
    return next(t for t in ref.table_order(feature_config) if t.name == name)


def test_mixed_scenario_touches_the_expected_rows():
    """The reference marks zero-weight ragged entries (sum) touched, pruned sparse ones not."""
    fc = ref.scenario_feature_config()
    inputs, weights = MIXED_BATCHES[0]
    grads = ref.random_grads(np.random.default_rng(0), inputs, fc)
    touched = {t.name: m for t, (_, m) in ref.row_gradients(inputs, weights, grads, fc).items()}
    assert touched["users"][7]  # weight 0 in a ragged sum feature: kept
    assert not touched["items"][12]  # weight <= 0 in a sparse mean feature: pruned
    assert not touched["items"][14] and not touched["users"][8]  # truncated sequences


# ---------------------------------------------------------------------------------------------
# Ported TF tests


def test_variable_learning_rate():
    """tpu_embedding_v2_optimizer_test.py: with gradient 1 each step, row = -cumsum(lr)."""
    num_steps, starting_lr, ending_lr = 10, 1.0, 0.5

    def lr_function(step):
        return jnp.maximum(ending_lr, starting_lr + (ending_lr - starting_lr) * step / num_steps)

    table = je.TableConfig(
        vocabulary_size=2,
        dim=4,
        initializer=jax.nn.initializers.zeros,
        combiner="sum",
        name="table",
    )
    feature_config = {"feature": je.FeatureConfig(table, name="feature")}
    emb = je.Embedding(feature_config, jeo.SGD(learning_rate=lr_function))
    batch = emb.preprocess({"feature": np.array([[0]], np.int32)})

    @jax.jit
    def step(state):
        activations = emb.lookup(state, batch)
        return activations, emb.apply_gradients(
            state, batch, jax.tree.map(jnp.ones_like, activations)
        )

    state = emb.init(jax.random.key(0))
    results = []
    for _ in range(num_steps):
        activations, state = step(state)
        results.append(np.asarray(activations["feature"]))
    learning_rates = [
        starting_lr - (starting_lr - ending_lr) / num_steps * j for j in range(num_steps)
    ]
    cumsum = [sum(learning_rates[0:j]) for j in range(num_steps)]
    # TF's goldens: [1, 1] ids give [1, dim] activations (TPUEmbedding drops the last 1).
    goldens = [[[-cumsum[i]] * table.dim] for i in range(num_steps)]
    np.testing.assert_allclose(np.stack(results), goldens, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.tables["table"])[1], np.zeros(4))


def _zeros_slot_fn(table, slot_names, slot_initializers):
    del slot_initializers
    return {slot: jnp.zeros_like(table) for slot in slot_names}


@pytest.mark.parametrize("name", WITH_SLOT_FN)
def test_optimizer_with_slot_creation_fn(name):
    """tpu_embedding_v2_test.py: the function's slots (zeros) replace TF's initial values."""
    video = je.TableConfig(8, 4, combiner="sum", name="video")
    user = je.TableConfig(16, 2, combiner="mean", name="user")
    optimizer = getattr(jeo, name)(0.1, slot_variable_creation_fn=_zeros_slot_fn)
    emb = je.Embedding(
        (je.FeatureConfig(video), je.FeatureConfig(video), je.FeatureConfig(user)), optimizer
    )
    slots = emb.slot_variables(emb.init(jax.random.key(0)))
    assert list(slots[video]) == list(ref.slot_names(optimizer))
    for table in (video, user):
        for value in slots[table].values():
            np.testing.assert_array_equal(value, np.zeros((table.vocabulary_size, table.dim)))


@pytest.mark.parametrize("name", WITH_SLOT_FN)
def test_slot_creation_fn_receives_names_and_tf_initializers(name):
    seen = {}

    def slot_fn(table, slot_names, slot_initializers):
        seen["args"] = (table.shape, list(slot_names))
        return {
            slot: init(jax.random.key(0), table.shape, table.dtype)
            for slot, init in zip(slot_names, slot_initializers, strict=True)
        }

    table = je.TableConfig(6, 3, name="t")
    optimizer = getattr(jeo, name)(0.1, slot_variable_creation_fn=slot_fn)
    emb = je.Embedding({"f": je.FeatureConfig(table)}, optimizer)
    slots = emb.slot_variables(emb.init(jax.random.key(0)))[table]
    assert seen["args"] == ((6, 3), list(ref.slot_names(optimizer)))
    want = ref.initial_slots(getattr(jeo, name)(0.1), (6, 3))
    for slot, value in slots.items():
        np.testing.assert_array_equal(value, want[slot].astype(np.float32))


def test_training_from_slots_made_by_slot_creation_fn():
    """FTRL with accumulators from the function (0.5, not 0.1) trains from those values."""

    def slot_fn(table, slot_names, slot_initializers):
        del slot_initializers
        return {"accumulators": jnp.full_like(table, 0.5), "linears": jnp.zeros_like(table)}

    fc = ref.compact_feature_config()
    optimizer = jeo.FTRL(0.1, slot_variable_creation_fn=slot_fn)
    emb = je.Embedding(fc, optimizer)
    state = emb.init(jax.random.key(0))
    tables, slots = _np_state(emb, state)
    trainer = ref.ReferenceTrainer(fc, optimizer, tables, slots)
    rng = np.random.default_rng(3)
    apply = jax.jit(emb.apply_gradients)
    for inputs, weights in COMPACT_BATCHES[:2]:
        grads = ref.random_grads(rng, inputs, fc)
        state = apply(state, emb.preprocess(inputs, weights), grads)
        trainer.apply(inputs, weights, grads)
    assert_matches_reference(emb, state, trainer, "after 2 steps")
