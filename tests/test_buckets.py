"""Static-shape buckets: few distinct shapes (few compilations), little padding."""

import jax
import numpy as np
import numpy_reference as ref
import pytest

import jaxembed as je
from jaxembed import _kernels
from jaxembed.lookup import bucket, row_bucket, slot_bucket


@pytest.mark.parametrize(
    "n, want",
    [(0, 1), (1, 1), (3, 4), (8, 8), (9, 16), (17, 24), (39, 40), (64, 64), (65, 128)],
)
def test_slot_bucket(n, want):
    assert slot_bucket(n) == want
    assert slot_bucket(n) >= max(n, 1)


def test_bucket_is_a_power_of_two():
    assert [bucket(n) for n in (1, 2, 3, 1000, 1025)] == [1, 2, 4, 1024, 2048]


def test_preprocess_pads_rows_to_the_slot_bucket():
    table = je.TableConfig(100, 4, combiner="sum", name="t")
    emb = je.Embedding({"f": je.FeatureConfig(table)})
    lengths = np.array([39, 1, 20])
    ids = np.arange(lengths.sum()) % 100
    batch = emb.preprocess({"f": je.Ragged.from_row_lengths(ids, lengths)})
    (plan,) = batch.plans
    assert plan.positions.shape[-1] == 40  # not 64 (the leading axis: the mesh devices)


def test_row_bucket_pads_under_a_quarter_past_512():
    sizes = set()
    for n in range(1, 20_000):
        b = row_bucket(n)
        assert b >= n
        if n <= 512:
            assert b == bucket(n)
        else:
            assert b < 1.25 * n, (n, b)
        sizes.add(b)
    # Powers of two to 512, then four sizes per doubling: 1024, 2048, ..., 16384 and 20480.
    assert len(sizes) == 10 + 4 * 5 + 1


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("devices", [1, 8])
def test_quarter_step_capacities_train_like_the_reference(devices, kernels):
    """Capacities between powers of two (here 40,960 distinct rows on one device, 640 per
    device and owner on 8) route, look up and update every row as the float64 reference."""
    table = je.TableConfig(200_000, 4, combiner="sum", name="t")
    features = {"f": je.FeatureConfig(table)}
    optimizer = je.optimizers.Adagrad(0.1)
    mesh = jax.make_mesh((devices,), ("x",)) if devices > 1 else None
    emb = je.Embedding(features, optimizer, mesh=mesh)
    rng = np.random.default_rng(7)
    initial = rng.normal(size=(table.vocabulary_size, table.dim)).astype(np.float32)
    trainer = ref.ReferenceTrainer(features, optimizer, {table: initial})
    state = emb.state_from_logical({"t": initial})
    with _kernels.use_kernels(kernels):
        lookup, apply = jax.jit(emb.lookup), jax.jit(emb.apply_gradients)
        for _ in range(2):
            lengths = rng.integers(20, 61, size=1024)
            ids = rng.integers(0, table.vocabulary_size, size=lengths.sum())
            inputs = {"f": je.Ragged.from_row_lengths(ids, lengths)}
            batch = emb.preprocess(inputs)
            (requests,) = jax.tree.leaves(batch.requests)
            capacity = requests.shape[-1]
            assert capacity & (capacity - 1), f"{capacity} is a power of two: no quarter step"
            rows = np.repeat(np.arange(1024), lengths)
            want = np.zeros((1024, table.dim))
            np.add.at(want, rows, trainer.tables[table][ids])
            np.testing.assert_allclose(lookup(state, batch)["f"], want, rtol=1e-5, atol=1e-5)
            grads = {"f": rng.normal(size=(1024, table.dim)).astype(np.float32)}
            state = apply(state, batch, grads)
            trainer.apply(inputs, None, grads)
        (got,) = emb.embedding_tables(state).values()
        np.testing.assert_allclose(got, trainer.tables[table], rtol=1e-6, atol=1e-6)
        slots = emb.slot_variables(state)[table]
        for name, value in slots.items():
            np.testing.assert_allclose(value, trainer.slots[table][name], rtol=1e-6, atol=1e-6)
