"""Zero-argument callable learning rates, as TF's embedding optimizers take them.

TF: ``learning_rate`` is a float or a zero-argument callable, called at every
``apply_gradients`` (tpu_embedding_v2.py: ``learning_rates=[math_ops.cast(fn(), ...) for fn in
self._dynamic_learning_rates]``; TF's ``test_variable_learning_rate`` changes a variable that
the callable reads between steps and expects each step to use the new value).

jaxembed calls a zero-argument callable on the host each time a step runs (also inside
``jax.jit``, through ``jax.pure_callback``), so the value is not frozen at trace time; a
one-argument callable stays a schedule of the step count (optax).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest

import jaxembed as je

jeo = je.optimizers

# Every optimizer of jaxembed.optimizers that takes a learning_rate (TF's five, and any other,
# e.g. the row-wise ones): the public dataclasses with a ``learning_rate`` field.
OPTIMIZERS = sorted(
    (
        cls
        for name, cls in vars(jeo).items()
        if not name.startswith("_")
        and isinstance(cls, type)
        and issubclass(cls, jeo.Optimizer)
        and dataclasses.is_dataclass(cls)
        and "learning_rate" in {f.name for f in dataclasses.fields(cls)}
    ),
    key=lambda cls: cls.__name__,
)
VOCAB, DIM = 12, 3


def _table() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(VOCAB, DIM)).astype(np.float32)


def _train(optimizer, steps: int = 3, jit: bool = True):
    """Tables and slots after ``steps`` steps on a fixed ragged batch (repeated ids)."""
    table = je.TableConfig(VOCAB, DIM, combiner="mean", name="t")
    emb = je.Embedding({"f": je.FeatureConfig(table)}, optimizer)
    state = emb.state_from_logical({"t": _table()})
    batch = emb.preprocess({"f": je.Ragged.from_row_lengths([1, 4, 4, 0, 7, 1], [3, 2, 1])})
    grads = {"f": np.random.default_rng(1).normal(size=(3, DIM)).astype(np.float32)}
    apply = jax.jit(emb.apply_gradients) if jit else emb.apply_gradients
    for _ in range(steps):
        state = apply(state, batch, grads)
    return jax.tree.map(np.asarray, (state.tables, state.slots))


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_zero_argument_callable_equals_the_constant(cls, jit):
    constant = _train(cls(learning_rate=0.1), jit=jit)
    called = _train(cls(learning_rate=lambda: 0.1), jit=jit)
    jax.tree.map(np.testing.assert_array_equal, called, constant)


def test_tf_takes_zero_argument_callables_too():
    tf = pytest.importorskip("tensorflow")
    for name in ("SGD", "Adagrad", "AdagradMomentum", "Adam", "FTRL"):
        fn = lambda: 0.1  # noqa: E731
        assert getattr(tf.tpu.experimental.embedding, name)(learning_rate=fn).learning_rate is fn
        assert getattr(jeo, name)(learning_rate=fn).learning_rate is fn


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_variable_learning_rate(jit):
    """TF's ``test_variable_learning_rate`` (tpu_embedding_v2_optimizer_test.py) with its
    zero-argument ``lr_function``: the callable reads a counter the loop advances after each
    step; with gradient 1 on row 0 the activations are minus the running sums of the rates,
    ``[1, dim]`` for the ``[1, 1]`` ids (TF's goldens)."""
    num_steps, starting_lr, ending_lr = 10, 1.0, 0.5
    step_counter = [0.0]

    def lr_function():
        return max(ending_lr, starting_lr + (ending_lr - starting_lr) * step_counter[0] / num_steps)

    table = je.TableConfig(1, 4, jax.nn.initializers.zeros, combiner="sum", name="table")
    feature_config = {"feature": je.FeatureConfig(table, name="feature")}
    emb = je.Embedding(feature_config, jeo.SGD(learning_rate=lr_function))
    batch = emb.preprocess({"feature": np.array([[0]], np.int32)})

    def step(state):
        activations = emb.lookup(state, batch)
        grads = jax.grad(lambda acts: acts["feature"].sum())(activations)
        return activations, emb.apply_gradients(state, batch, grads)

    step = jax.jit(step) if jit else step
    state = emb.init(jax.random.key(0))
    results = []
    for _ in range(num_steps):
        activations, state = step(state)
        results.append(np.asarray(activations["feature"]))
        step_counter[0] += 1.0
    learning_rates = [starting_lr - (starting_lr - ending_lr) / num_steps * j for j in range(10)]
    cumsum = [sum(learning_rates[0:j]) for j in range(num_steps)]
    goldens = [[[-cumsum[i]] * table.dim] for i in range(10)]  # TF's, one replica
    np.testing.assert_allclose(np.stack(results), goldens, rtol=1e-6)


def test_schedule_of_the_step_still_gets_the_step():
    schedule = optax.linear_schedule(0.1, 0.0, 4)  # one argument: the 0-based step count
    assert jeo.takes_step(schedule) and not jeo.takes_step(lambda: 0.1)
    got = _train(jeo.SGD(schedule), steps=2)
    want = _table()
    table = je.TableConfig(VOCAB, DIM, combiner="mean", name="t")
    emb = je.Embedding({"f": je.FeatureConfig(table)}, jeo.SGD(1.0))
    state = emb.state_from_logical({"t": want})
    batch = emb.preprocess({"f": je.Ragged.from_row_lengths([1, 4, 4, 0, 7, 1], [3, 2, 1])})
    grads = np.random.default_rng(1).normal(size=(3, DIM)).astype(np.float32)
    for step in range(2):  # SGD(1.0) on lr * grads is SGD(lr) on grads, row by row
        lr = np.float32(schedule(step))
        state = emb.apply_gradients(state, batch, {"f": lr * grads})
    np.testing.assert_allclose(got[0]["t"], np.asarray(state.tables["t"]), rtol=1e-6, atol=1e-7)


def test_learning_rate_value_on_the_host():
    assert jeo.SGD(lambda: 0.25).learning_rate_value(7) == 0.25
    assert jeo.SGD(lambda step: 0.5 * step).learning_rate_value(3) == 1.5
    assert jeo.SGD(0.125).learning_rate_value() == 0.125


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_callable_of_two_arguments_is_refused_at_construction(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: A callable `learning_rate` must take"):
        cls(learning_rate=lambda a, b: 0.1)


def test_callable_returning_an_array_is_an_error_when_the_step_runs():
    with pytest.raises(Exception, match="must return one number"):
        _train(jeo.SGD(lambda: np.ones(2)), steps=1, jit=False)


def test_tf_twins_take_the_callable_value():
    """``export.tf_optimizer`` (used by ``to_tf`` and ``save_tf_checkpoint``) evaluates a
    zero-argument callable on the host, like a schedule at the step."""
    pytest.importorskip("tensorflow")
    from jaxembed.export import tf_optimizer

    assert tf_optimizer(jeo.Adagrad(lambda: 0.25)).learning_rate == 0.25
    assert tf_optimizer(jeo.SGD(lambda step: 0.5 * step), step=3).learning_rate == 1.5
