"""Saves step 1 (small, completes), then a large step 2 that the test kills part-way."""

import sys

import jax
import jax.numpy as jnp

import jaxembed as je


def main(directory: str) -> None:
    table = je.TableConfig(2_000_000, 64, name="big", initializer=jax.nn.initializers.zeros)
    emb = je.Embedding({"f": je.FeatureConfig(table)}, je.optimizers.Adagrad(0.1))
    state = emb.init(jax.random.key(0))
    je.checkpoint.save(directory, emb, state, step=1)
    print("saved 1", flush=True)
    state = state._replace(tables={"big": state.tables["big"] + 1.0})
    state = state._replace(step=jnp.asarray(2, jnp.int32))
    je.checkpoint.save(directory, emb, state, step=2)
    print("saved 2", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
