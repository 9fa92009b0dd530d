"""Small dense models that checkpoints name by import path (``dense_models:Tower``, ...).

``tests/`` is on ``sys.path`` under pytest (no ``__init__.py``), so ``DenseModel`` targets here
import as ``dense_models:<name>``, in this process and in ``jaxembed export``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def flat(acts: Any) -> jax.Array:
    """Every activation of the tree (any feature structure) as one ``[batch, width]`` matrix."""
    return jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(acts)], axis=-1)


class Tower(nn.Module):
    """An MLP over all activations; ``kwargs={"hidden": [...], "outputs": n}`` sizes it."""

    hidden: Sequence[int] = (8,)
    outputs: int = 1

    @nn.compact
    def __call__(self, acts: Any) -> dict:
        x = flat(acts)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        logits = nn.Dense(self.outputs)(x)
        return {"score": jax.nn.sigmoid(logits), "logit": logits[:, 0]}


def linear(params: Any, acts: Any, *, scale: float = 1.0) -> jax.Array:
    """A pure function target: ``scale * (flat(acts) @ w + b)``, with ``params`` a list."""
    w, b = params
    return scale * (flat(acts) @ w + b)


def no_params(params: Any, acts: Any) -> jax.Array:
    """A model without parameters (``params={}``): the activations' row sums."""
    del params
    return flat(acts).sum(axis=-1)


NOT_CALLABLE = 3


class NotAModule:
    """A class that is not a ``flax.linen.Module``."""
