"""The data and model shared by the multi-process workers and the single-process reference."""

import jax
import numpy as np

import jaxembed as je

BATCH = 16
NUM_STEPS = 3
SHARDING = {"big": "row", "mid": "table", "small": "replicated"}  # all three strategies
# On a (2, 2) ("data", "model") mesh, tables over "model": row, column and replicated.
SHARDING_2D = {"big": "row", "mid": "column", "small": "replicated"}


def feature_config():
    big = je.TableConfig(64, 4, combiner="mean", name="big")
    small = je.TableConfig(6, 3, combiner="sum", name="small")
    mid = je.TableConfig(20, 4, combiner="sqrtn", name="mid")
    return {
        "dense": je.FeatureConfig(big),
        "ragged": je.FeatureConfig(big),
        "seq": je.FeatureConfig(big, max_sequence_length=3),
        "small": je.FeatureConfig(small),
        "mid": je.FeatureConfig(mid),
    }


def optimizer():
    return je.optimizers.Adagrad(0.1)


def batch_for(step: int):
    """Deterministic global batch ``step``: the same in every process."""
    rng = np.random.default_rng(step)
    lengths = rng.integers(0, 5, BATCH)
    n = int(lengths.sum())
    rows = np.repeat(np.arange(BATCH), lengths)
    cols = np.concatenate([np.arange(k) for k in lengths])
    inputs = {
        "dense": rng.integers(0, 64, BATCH),
        "ragged": je.Ragged.from_row_lengths(rng.integers(0, 64, n), lengths),
        "seq": je.Sparse(np.stack([rows, cols], 1), rng.integers(0, 64, n), [BATCH, 5]),
        "small": je.Ragged.from_row_lengths(rng.integers(0, 6, n), lengths),
        "mid": je.Sparse(np.stack([rows, cols], 1), rng.integers(0, 20, n), [BATCH, 5]),
    }
    weights = {
        "dense": None,
        "ragged": je.Ragged.from_row_lengths(rng.uniform(0.5, 2, n).astype(np.float32), lengths),
        "seq": None,
        "small": None,
        "mid": None,
    }
    return inputs, weights


def train_step(emb):
    """The jitted step both sides run: lookup, a fixed gradient of the activations, update."""

    @jax.jit
    def step(state, batch):
        acts = emb.lookup(state, batch)
        grads = jax.tree.map(lambda a: 2.0 * a + 0.1, acts)
        return emb.apply_gradients(state, batch, grads), acts

    return step
