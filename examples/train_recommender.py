"""A small recommender: jaxembed tables + a Flax dense tower, trained in one jitted step.

The embedding tables are trained by jaxembed's row-sparse Adagrad (only the rows a batch touches
change); the dense tower's parameters by Optax's Adam. Both updates happen in the same
``jax.jit``-compiled train step.

The data are synthetic clicks: a user id (dense), the item's categories (ragged, weighted) and the
user's recent items (a sequence feature, sparse). The click probability depends on hidden user and
item vectors, so the model has something to learn.

Run: ``python examples/train_recommender.py [--steps 300]``
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxembed as je

NUM_USERS, NUM_ITEMS, NUM_CATEGORIES, HISTORY = 500, 300, 20, 5


class Tower(nn.Module):
    """Dense tower: a user-item dot interaction plus an MLP over all features."""

    @nn.compact
    def __call__(self, acts):
        history = acts["history"].sum(axis=1)  # [B, L, D] -> [B, D]
        dot = (acts["user"] * acts["item"]).sum(axis=-1)
        x = jnp.concatenate([acts["user"], acts["item"], acts["categories"], history], axis=-1)
        x = nn.relu(nn.Dense(32)(x))
        return dot + nn.Dense(1)(x)[:, 0]


def feature_config():
    users = je.TableConfig(NUM_USERS, 8, combiner="sum", name="users")
    items = je.TableConfig(NUM_ITEMS, 8, combiner="sum", name="items")
    categories = je.TableConfig(NUM_CATEGORIES, 8, combiner="mean", name="categories")
    return {
        "user": je.FeatureConfig(users),
        "item": je.FeatureConfig(items),
        "categories": je.FeatureConfig(categories),
        "history": je.FeatureConfig(items, max_sequence_length=HISTORY),  # shares "items"
    }


class ClickData:
    """Deterministic synthetic clicks with a learnable structure."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.user_vec = self.rng.normal(size=(NUM_USERS, 4))
        self.item_vec = self.rng.normal(size=(NUM_ITEMS, 4))
        self.item_categories = [
            self.rng.choice(NUM_CATEGORIES, size=self.rng.integers(1, 4), replace=False)
            for _ in range(NUM_ITEMS)
        ]

    def batch(self, size: int):
        rng = self.rng
        users = rng.integers(0, NUM_USERS, size)
        items = rng.integers(0, NUM_ITEMS, size)
        cats = [self.item_categories[i] for i in items]
        lengths = rng.integers(0, HISTORY + 3, size)  # some histories are truncated to HISTORY
        hist_rows = np.repeat(np.arange(size), lengths)
        hist_cols = np.concatenate([np.arange(n) for n in lengths])
        inputs = {
            "user": users,
            "item": items,
            "categories": je.Ragged.from_row_lengths(np.concatenate(cats), [len(c) for c in cats]),
            "history": je.Sparse(
                np.stack([hist_rows, hist_cols], axis=1),
                rng.integers(0, NUM_ITEMS, lengths.sum()),
                [size, HISTORY + 2],
            ),
        }
        weights = {
            "user": None,
            "item": None,
            "categories": je.Ragged.from_row_lengths(
                rng.uniform(0.5, 1.5, sum(len(c) for c in cats)).astype(np.float32),
                [len(c) for c in cats],
            ),
            "history": None,
        }
        score = (self.user_vec[users] * self.item_vec[items]).sum(axis=1)
        labels = (rng.uniform(size=size) < 1 / (1 + np.exp(-2 * score))).astype(np.float32)
        return inputs, weights, labels


def train(steps: int = 300, batch_size: int = 256, seed: int = 0, log_every: int = 50):
    """Trains the model; returns the list of per-step losses."""
    emb = je.Embedding(feature_config(), je.optimizers.Adagrad(learning_rate=0.5))
    tower = Tower()
    tx = optax.adam(1e-2)
    data = ClickData(seed)

    inputs, weights, _ = data.batch(batch_size)
    emb_state = emb.init(jax.random.key(seed))
    params = tower.init(
        jax.random.key(seed + 1), emb.lookup(emb_state, emb.preprocess(inputs, weights))
    )
    opt_state = tx.init(params)

    @jax.jit
    def train_step(emb_state, params, opt_state, batch, labels):
        def loss_fn(params, acts):
            # Summed over the batch: TF's TPU embedding (and so jaxembed) sums row gradients
            # over the global batch, and Adam on the dense side is scale-invariant.
            logits = tower.apply(params, acts)
            return optax.sigmoid_binary_cross_entropy(logits, labels).sum()

        acts = emb.lookup(emb_state, batch)
        loss, (param_grads, act_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, acts)
        loss = loss / labels.shape[0]
        updates, opt_state = tx.update(param_grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        emb_state = emb.apply_gradients(emb_state, batch, act_grads)
        return emb_state, params, opt_state, loss

    losses = []
    for step in range(steps):
        inputs, weights, labels = data.batch(batch_size)
        batch = emb.preprocess(inputs, weights)
        emb_state, params, opt_state, loss = train_step(
            emb_state, params, opt_state, batch, jnp.asarray(labels)
        )
        losses.append(float(loss))
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1:4d}  loss {np.mean(losses[-log_every:]):.4f}")
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    losses = train(args.steps, args.batch_size, args.seed)
    k = max(1, len(losses) // 10)
    print(f"loss: first {k} steps {np.mean(losses[:k]):.4f} -> last {k} {np.mean(losses[-k:]):.4f}")


if __name__ == "__main__":
    main()
