"""The demo's recommender: jaxembed features and a DLRM-style Flax tower.

Features (``feature_config``), all over raw ids: ``user`` (one 64-bit id, hashed), ``item``
(one id, by the catalogue's vocabulary), ``categories`` (several weighted names, combined with
``sqrtn``) and ``history`` (the user's recent items, a sequence feature sharing the item table).
The tower pools the history, takes the pairwise dot products of the four embeddings (DLRM's
interaction) and feeds them, with the user and item embeddings, to an MLP that predicts a click
logit.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxembed as je
from jaxembed.demo.data import ClickLog

_PAIRS = np.triu_indices(4, k=1)  # the 6 pairs among user, item, categories, history


def feature_config(
    vocabularies: dict[str, je.Hashing | je.Vocabulary], dim: int = 16, history_length: int = 8
) -> dict:
    """The demo's features over raw ids; ``vocabularies`` maps each id space (``users``,
    ``items``, ``categories``) to rows, and sizes its table."""
    v = vocabularies
    users = je.TableConfig(v["users"].num_rows, dim, combiner="sum", name="users")
    items = je.TableConfig(v["items"].num_rows, dim, combiner="sum", name="items")
    cats = je.TableConfig(v["categories"].num_rows, dim, combiner="sqrtn", name="categories")
    return {
        "user": je.FeatureConfig(users, name="user", vocabulary=v["users"]),
        "item": je.FeatureConfig(items, name="item", vocabulary=v["items"]),
        "categories": je.FeatureConfig(cats, name="categories", vocabulary=v["categories"]),
        "history": je.FeatureConfig(
            items, max_sequence_length=history_length, name="history", vocabulary=v["items"]
        ),
    }


class Tower(nn.Module):
    """DLRM-style tower: pooled history, dot interaction of the embeddings, then an MLP."""

    hidden: tuple[int, ...] = (64, 32)

    @nn.compact
    def __call__(self, acts: dict) -> jax.Array:
        history = acts["history"].mean(axis=1)
        vectors = jnp.stack([acts["user"], acts["item"], acts["categories"], history], axis=1)
        dots = jnp.einsum("bfd,bgd->bfg", vectors, vectors)[:, _PAIRS[0], _PAIRS[1]]
        x = jnp.concatenate([dots, acts["user"], acts["item"]], axis=-1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(1)(x)[:, 0]


def predict(params: Any, acts: dict) -> dict:
    """Serving output: the click probability (a pure function, as ``save_serving_model`` wants)."""
    logits: jax.Array = Tower().apply(params, acts)  # type: ignore[assignment]
    return {"ctr": jax.nn.sigmoid(logits)}


def inputs(log: ClickLog) -> tuple[dict, dict]:
    """``(inputs, weights)`` for ``emb.preprocess`` from a slice of a click log."""
    ids = {
        "user": log.user,
        "item": log.item,
        "categories": je.Ragged.from_row_lengths(log.categories.values, log.categories.lengths),
        "history": je.Ragged.from_row_lengths(log.history.values, log.history.lengths),
    }
    weights = {
        "user": None,
        "item": None,
        "categories": je.Ragged.from_row_lengths(log.categories.weights, log.categories.lengths),
        "history": None,
    }
    return ids, weights


def serving_request(log: ClickLog) -> dict[str, np.ndarray]:
    """``serving_default``'s inputs for a slice of a click log (what a TF Serving client sends)."""
    n = len(log)
    ones = np.ones(n, np.int64)
    return {
        "user_ids": log.user.astype(np.int64),
        "user_lengths": ones,
        "item_ids": log.item.astype(np.int64),
        "item_lengths": ones,
        "categories_ids": np.char.encode(log.categories.values, "utf-8"),  # tf.string
        "categories_lengths": log.categories.lengths,
        "categories_weights": np.asarray(log.categories.weights, np.float32),
        "history_ids": log.history.values,
        "history_lengths": log.history.lengths,
    }


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (rank statistic, ties averaged); 0.5 when one class is absent."""
    labels = np.asarray(labels) > 0.5
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return 0.5
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = np.asarray(scores)[order]
    # average ranks of tied scores
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean binary cross-entropy of predicted click probabilities (clipped away from 0 and 1)."""
    p = np.clip(np.asarray(probabilities, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
