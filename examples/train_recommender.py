"""Train a click-through recommender with jaxembed: embedding tables + a Flax tower, one jit step.

The model is the demo's (``jaxembed.demo.model``): four features (``user``, ``item``, the item's
weighted ``categories`` and the user's recent ``history``, which shares the item table) looked
up in jaxembed tables, and a DLRM-style Flax ``Tower`` that predicts a click logit. The tables
are trained by jaxembed's row-sparse Adagrad (only the rows a batch touches change), the tower by
Optax's Adam; both updates happen in the same ``jax.jit``-compiled train step.

Data: the synthetic click log of ``jaxembed.demo.data.synthetic`` (default), or MovieLens
``ml-latest-small`` (a rating of 4 or more is a click). A random 20% of the impressions is held
out; the test AUC and log loss are compared with the trivial model that predicts the training
click rate for everyone.

Run::

    python examples/train_recommender.py                        # synthetic clicks
    python examples/train_recommender.py --movielens ml-latest-small --json
    python examples/train_recommender.py --steps 200 --batch-size 256 --dim 8
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxembed as je
from jaxembed.demo import model
from jaxembed.demo.data import ClickLog, movielens, synthetic

# Defaults, chosen on both data sets (MovieLens and the synthetic log below).
BATCH_SIZE = 512
DIM = 16
EMBEDDING_LR = 0.1  # jaxembed Adagrad on the tables
DENSE_LR = 1e-3  # optax Adam on the tower
HISTORY_LENGTH = 8  # recent items per example (the history feature's max_sequence_length)
EPOCHS = 2.0  # more epochs overfit both data sets (the test loss rises)
SYNTHETIC_SIZE = {"n": 1_000_000, "users": 10_000, "items": 5_000}  # impressions, vocabularies


def batches(log: ClickLog, batch_size: int, rng: np.random.Generator) -> Iterator[ClickLog]:
    """One epoch of ``log`` in a random order, in batches of exactly ``batch_size`` rows.

    The last partial batch is dropped so that every batch has the same shape.
    """
    order = rng.permutation(len(log))
    for start in range(0, len(log) - batch_size + 1, batch_size):
        yield log.take(np.sort(order[start : start + batch_size]))


def make_steps(
    emb: je.Embedding, tower: model.Tower, tx: optax.GradientTransformation
) -> tuple[Callable, Callable]:
    """The jitted train step and prediction step.

    ``train_step(emb_state, params, opt_state, batch, labels)`` returns the updated
    ``(emb_state, params, opt_state)`` and the batch's mean loss; ``predict_step(emb_state,
    params, batch)`` returns click probabilities.
    """

    def loss_fn(params: Any, acts: Any, labels: jax.Array) -> jax.Array:
        logits = tower.apply(params, acts)
        # Summed over the batch, as TF's TPU embedding sums the row gradients over the global
        # batch: a row's gradient does not shrink with the batch size. Adam (the tower) is
        # invariant to the scale of the loss.
        return optax.sigmoid_binary_cross_entropy(logits, labels).sum()

    def train_step(
        emb_state: je.EmbeddingState, params: Any, opt_state: Any, batch: Any, labels: jax.Array
    ) -> tuple[je.EmbeddingState, Any, Any, jax.Array]:
        acts = emb.lookup(emb_state, batch)  # {"user": [B, dim], ..., "history": [B, L, dim]}
        loss, (param_grads, act_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
            params, acts, labels
        )
        updates, opt_state = tx.update(param_grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        emb_state = emb.apply_gradients(emb_state, batch, act_grads)
        return emb_state, params, opt_state, loss / labels.shape[0]

    def predict_step(emb_state: je.EmbeddingState, params: Any, batch: Any) -> jax.Array:
        return jax.nn.sigmoid(tower.apply(params, emb.lookup(emb_state, batch)))

    # Donating the state lets XLA update the tables in place.
    return jax.jit(train_step, donate_argnums=(0, 1, 2)), jax.jit(predict_step)


def predict(
    emb: je.Embedding,
    predict_step: Callable,
    emb_state: je.EmbeddingState,
    params: Any,
    log: ClickLog,
    batch_size: int,
) -> np.ndarray:
    """Click probabilities for every row of ``log``, computed in batches of ``batch_size``.

    The last batch is padded (with copies of row 0) to the full size, so prediction reuses the
    shapes of training.
    """
    n = len(log)
    padded = -(-n // batch_size) * batch_size
    rows = np.concatenate([np.arange(n), np.zeros(padded - n, np.int64)])
    out = []
    for start in range(0, padded, batch_size):
        batch = emb.preprocess(*model.inputs(log.take(rows[start : start + batch_size])))
        out.append(np.asarray(predict_step(emb_state, params, batch)))
    return np.concatenate(out)[:n]


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` (clipped away from 0 and 1)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def train(
    log: ClickLog,
    *,
    dataset: str = "click log",
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    dim: int = DIM,
    embedding_lr: float = EMBEDDING_LR,
    dense_lr: float = DENSE_LR,
    test_fraction: float = 0.2,
    log_every: int = 0,
) -> dict[str, Any]:
    """Trains on a random ``1 - test_fraction`` of ``log`` and evaluates on the rest.

    Args:
        log: the impressions (``jaxembed.demo.data.synthetic`` or ``movielens``).
        dataset: a name for the summary.
        steps: train steps; or ``epochs``: passes over the training split (may be fractional).
            Exactly one of them must be given.
        batch_size: examples per step (the last partial batch of each epoch is dropped).
        seed: seeds the split, the initial weights and the batch order.
        dim: embedding dimension of every table.
        embedding_lr: Adagrad learning rate of the tables.
        dense_lr: Adam learning rate of the tower.
        test_fraction: held-out share of the impressions.
        log_every: print the mean training loss every ``log_every`` steps (0: never).

    Returns:
        ``{"dataset", "train_examples", "test_examples", "steps", "first_loss", "last_loss",
        "test_auc", "test_logloss", "baseline_auc", "baseline_logloss", "oracle_auc",
        "seconds"}``. ``first_loss`` and ``last_loss`` are the mean training losses of the
        first and the last 10% of the steps; the baseline predicts the training click rate for
        every test impression; ``oracle_auc`` is the test AUC of the true click probabilities
        where the log has them (synthetic data: the best any model can do), else None;
        ``seconds`` is the wall time of training and evaluation, compilation included.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("Pass exactly one of `steps` and `epochs`.")
    start_time = time.perf_counter()
    train_log, test_log = log.split(test_fraction, seed)
    steps_per_epoch = len(train_log) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(train_log)} training examples.")
    if steps is None:
        steps = max(1, round(epochs * steps_per_epoch))

    # The tables (jaxembed) and the tower (Flax + Optax).
    emb = je.Embedding(
        model.feature_config(log.vocabularies, dim, HISTORY_LENGTH),
        je.optimizers.Adagrad(learning_rate=embedding_lr),
    )
    tower = model.Tower()
    tx = optax.adam(dense_lr)

    @jax.jit  # one compiled program instead of dozens of eager initializer ops
    def init(key: jax.Array, batch: Any) -> tuple[je.EmbeddingState, Any, Any]:
        emb_key, tower_key = jax.random.split(key)
        emb_state = emb.init(emb_key)
        params = tower.init(tower_key, emb.lookup(emb_state, batch))
        return emb_state, params, tx.init(params)

    example = emb.preprocess(*model.inputs(train_log.take(np.arange(batch_size))))
    emb_state, params, opt_state = init(jax.random.key(seed), example)
    train_step, predict_step = make_steps(emb, tower, tx)

    # The training loop: host preprocessing, then one jitted step per batch.
    rng = np.random.default_rng(seed)
    losses: list[jax.Array] = []
    while len(losses) < steps:
        for batch_log in batches(train_log, batch_size, rng):
            batch = emb.preprocess(*model.inputs(batch_log))  # static, bucketed shapes
            emb_state, params, opt_state, loss = train_step(
                emb_state, params, opt_state, batch, jnp.asarray(batch_log.label)
            )
            losses.append(loss)  # kept on device: no host sync per step
            if log_every and len(losses) % log_every == 0:
                recent = float(np.mean(jax.device_get(losses[-log_every:])))
                print(f"step {len(losses):5d}  train loss {recent:.4f}", flush=True)
            if len(losses) == steps:
                break
    losses_np = np.asarray(jax.device_get(losses), np.float64)
    window = max(1, steps // 10)

    # Held-out evaluation against the constant "training click rate" model.
    probs = predict(emb, predict_step, emb_state, params, test_log, batch_size)
    baseline = np.full(len(test_log), train_log.label.mean())
    truth = test_log.probability
    return {
        "dataset": dataset,
        "train_examples": len(train_log),
        "test_examples": len(test_log),
        "steps": steps,
        "first_loss": float(losses_np[:window].mean()),
        "last_loss": float(losses_np[-window:].mean()),
        "test_auc": model.auc(test_log.label, probs),
        "test_logloss": log_loss(test_log.label, probs),
        "baseline_auc": model.auc(test_log.label, baseline),
        "baseline_logloss": log_loss(test_log.label, baseline),
        "oracle_auc": None if truth is None else model.auc(test_log.label, truth),
        "seconds": time.perf_counter() - start_time,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: parses ``argv``, loads the data, trains, prints and returns the summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--movielens",
        metavar="PATH",
        help="folder of MovieLens ml-latest-small (ratings.csv, movies.csv) instead of the "
        "synthetic clicks",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="train steps")
    length.add_argument("--epochs", type=float, help=f"passes over the training split ({EPOCHS})")
    p.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help=f"examples per step ({BATCH_SIZE})"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--dim", type=int, default=DIM, help=f"embedding dimension ({DIM})")
    p.add_argument(
        "--embedding-lr",
        type=float,
        default=EMBEDDING_LR,
        help=f"learning rate of the tables' Adagrad ({EMBEDDING_LR})",
    )
    p.add_argument(
        "--dense-lr",
        type=float,
        default=DENSE_LR,
        help=f"learning rate of the tower's Adam ({DENSE_LR})",
    )
    p.add_argument("--json", action="store_true", help="print only a JSON summary")
    args = p.parse_args(argv)

    if args.movielens:
        dataset = "movielens"
        log = movielens(args.movielens, history_length=HISTORY_LENGTH)
    else:
        dataset = "synthetic"
        log = synthetic(**SYNTHETIC_SIZE, history_length=HISTORY_LENGTH, seed=args.seed)
    if not args.json:
        print(f"{dataset}: {len(log)} impressions, click rate {log.label.mean():.3f}")
    summary = train(
        log,
        dataset=dataset,
        steps=args.steps,
        epochs=EPOCHS if args.steps is None and args.epochs is None else args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        dim=args.dim,
        embedding_lr=args.embedding_lr,
        dense_lr=args.dense_lr,
        log_every=0 if args.json else 100,
    )
    if args.json:
        print(json.dumps(summary, indent=1))
        return summary
    s = summary
    print(f"trained {s['steps']} steps on {s['train_examples']} examples in {s['seconds']:.1f} s")
    print(f"train loss {s['first_loss']:.4f} (first 10% of steps) -> {s['last_loss']:.4f} (last)")
    print(f"test, {s['test_examples']} examples: model vs predicting the training click rate")
    print(f"  AUC       {s['test_auc']:.4f} vs {s['baseline_auc']:.4f}")
    print(f"  log loss  {s['test_logloss']:.4f} vs {s['baseline_logloss']:.4f}")
    if s["oracle_auc"] is not None:
        print(f"  (the true click probabilities have AUC {s['oracle_auc']:.4f})")
    return summary


if __name__ == "__main__":
    main()
