"""Training on random cases against the float64 numpy reference of the optimizer equations.

``test_lookup_differential.make_case`` builds random nested structures of sparse and ragged
features (weighted or not, sequence features, ``output_shape``, tables shared by features, ids
outside the table); ``test_lookup_training_path`` checks their lookups. Here each case trains
for three jitted steps with random activation gradients and a random optimizer (every TF TPU
optimizer and both row-wise ones, with gradient clipping, weight clipping and weight decay at
random), on one device or on an 8-device mesh with each table placed at random (row, table,
column or replicated; the batch padded to a bucket, with gradients on the padded examples that
must change nothing), with the fused kernels on (even seeds) or off. After every step the
tables and slots must equal ``numpy_reference.ReferenceTrainer`` to float32 rounding.

Cases outside ``TPUEmbedding``'s rules are left out, as in ``test_lookup_training_path``; every
block of seeds must still run at least ``MIN_RUN`` cases.
"""

from __future__ import annotations

import jax
import numpy as np
import numpy_reference as ref
import pytest
from test_lookup_differential import make_case
from test_lookup_training_path import _trainable, random_embedding
from test_optimizers import TOLERANCES
from tf_reference import flatten_with_paths

import jaxembed as je
from jaxembed import _kernels

jeo = je.optimizers
BLOCK, BLOCKS, MIN_RUN, STEPS = 24, 3, 4, 3
ROW_WISE_TOLERANCE = (1e-4, 1e-5)  # test_rowwise_optimizers.py's


def _optimizer(rng: np.random.Generator) -> jeo.Optimizer:
    lr = float(rng.choice([0.05, 0.1, 0.3]))
    tf_options: dict = {"clipvalue": [None, None, 0.5, (-0.2, 0.4)][rng.integers(4)]}
    if rng.random() < 0.3:
        tf_options.update(clip_weight_min=-0.6, clip_weight_max=0.7)
    if rng.random() < 0.3:
        tf_options.update(
            weight_decay_factor=0.01,
            multiply_weight_decay_factor_by_learning_rate=bool(rng.integers(2)),
        )
    flag = lambda: bool(rng.integers(2))  # noqa: E731
    pick = lambda *values: float(rng.choice(values))  # noqa: E731
    kind = rng.integers(7)
    if kind == 0:
        return jeo.SGD(lr, **tf_options)
    if kind == 1:
        return jeo.Adagrad(lr, initial_accumulator_value=pick(0.1, 1.0), **tf_options)
    if kind == 2:
        return jeo.AdagradMomentum(
            lr,
            momentum=0.9,
            use_nesterov=flag(),
            exponent=pick(2.0, 3.0),
            epsilon=0.1,
            beta2=pick(1.0, 0.9),
            **tf_options,
        )
    if kind == 3:
        return jeo.Adam(lr, lazy_adam=flag(), sum_inside_sqrt=flag(), **tf_options)
    if kind == 4:
        return jeo.FTRL(
            lr,
            learning_rate_power=pick(-0.5, -0.25),
            l1_regularization_strength=pick(0.0, 0.05),
            l2_regularization_strength=pick(0.0, 0.1),
            beta=pick(0.0, 0.1),
            multiply_linear_by_learning_rate=flag(),
            **tf_options,
        )
    if kind == 5:
        return jeo.RowWiseAdagrad(lr)
    return jeo.PartialRowWiseAdam(lr)


def _train_and_compare(seed: int, devices: int, kernels: bool) -> bool:
    """Whether the case ran (False: outside the training path's rules)."""
    case = make_case(seed)
    if not _trainable(case):
        return False
    rng = np.random.default_rng(10_000 + seed)
    optimizer = _optimizer(rng)
    try:
        one = je.Embedding(case.feature_config, optimizer)
        emb = random_embedding(case, devices, rng, optimizer)
    except ValueError as err:  # as TF's: unnamed tables are named table_<i>, and may clash
        if "unique name" not in str(err):
            raise
        return False
    tables = {n: np.asarray(case.tables[t]) for t, n in emb.table_names.items()}
    try:  # the examples each output has without padding
        batch = one.preprocess(case.inputs, case.weights)
        examples = {
            p: np.shape(a)[0]
            for p, a in flatten_with_paths(one.lookup(one.state_from_logical(tables), batch))
        }
        batch = emb.preprocess(
            case.inputs, case.weights, batch_size="bucket" if devices > 1 else None
        )
    except ValueError as err:
        if "cannot be padded" not in str(err):
            raise
        return False
    trainer = ref.ReferenceTrainer(
        case.feature_config, optimizer, {t: case.tables[t] for t in emb.table_names}
    )
    state = emb.state_from_logical(tables)
    rtol, atol = TOLERANCES.get(type(optimizer).__name__, ROW_WISE_TOLERANCE)
    with _kernels.use_kernels(kernels):
        lookup, apply = jax.jit(emb.lookup), jax.jit(emb.apply_gradients)
        for step in range(STEPS):
            acts = lookup(state, batch)
            grads = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), acts)
            state = apply(state, batch, grads)
            real = [g[: examples[p]] for p, g in flatten_with_paths(grads)]
            trainer.apply(
                case.inputs, case.weights, jax.tree.unflatten(jax.tree.structure(grads), real)
            )
            where = f"seed {seed}, {optimizer}, {devices} device(s), kernels {kernels}"
            slots = emb.slot_variables(state)
            for table, got in emb.embedding_tables(state).items():
                at = f"{where}, table {table.name!r} after step {step}"
                np.testing.assert_allclose(
                    got, trainer.tables[table], rtol=rtol, atol=atol, err_msg=at
                )
                assert set(slots[table]) == set(trainer.slots[table]), at
                for name, value in slots[table].items():
                    np.testing.assert_allclose(
                        value, trainer.slots[table][name], rtol=rtol, atol=atol, err_msg=at
                    )
    return True


@pytest.mark.filterwarnings("ignore:max_sequence_length")
@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("block", range(BLOCKS))
def test_training_equals_the_numpy_reference(block, devices):
    seeds = range(block * BLOCK, (block + 1) * BLOCK)
    ran = sum(_train_and_compare(seed, devices, kernels=seed % 2 == 0) for seed in seeds)
    assert ran >= MIN_RUN, f"only {ran} of seeds {seeds.start}.. ran"
