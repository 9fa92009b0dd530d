"""Train on a 2-D ("data", "model") mesh: tables over "model", the tower FSDP over "data".

Eight devices (simulated on CPU) as a (2, 4) mesh. The embedding tables are split over the
"model" axis (``table_axes=("model",)``) with every strategy at once (row, table-wise, column,
replicated) and replicated over "data"; the batch is split over all 8 devices; the Flax tower's
parameters and Adam state are sharded over "data" (FSDP: each kernel's first dimension split in
two, gathered by XLA where used). One ``jax.jit`` step runs the lookup, the tower, Optax Adam on
the tower and jaxembed's Adagrad on the tables. The same steps on one device give the same
tables and losses (float32 rounding), which the script checks and prints.

    python examples/train_2d_mesh.py [--steps 20] [--table-axes model|all]
"""

from __future__ import annotations

import argparse
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxembed as je  # noqa: E402

BATCH = 64
SHARDING = {
    "users": "row",
    "items": "column",
    "ads": "table",
    "shops": "table",
    "genres": "replicated",
}


def feature_config() -> dict:
    users = je.TableConfig(1000, 16, combiner="sum", name="users")
    items = je.TableConfig(500, 12, combiner="mean", name="items")  # 12 columns over 4 shards
    ads = je.TableConfig(300, 8, combiner="sum", name="ads")
    shops = je.TableConfig(200, 8, combiner="sum", name="shops")  # stacked with ads
    genres = je.TableConfig(20, 4, combiner="sqrtn", name="genres")
    F = je.FeatureConfig
    return {
        "user": F(users),
        "items": F(items),
        "history": F(items, max_sequence_length=4),
        "ad": F(ads),
        "shop": F(shops),
        "genres": F(genres),
    }


def batches(steps: int, seed: int = 0):
    """Synthetic clicks: the label depends on the user, the items and the ad."""
    rng = np.random.default_rng(seed)
    user_taste = rng.normal(size=1000)
    item_appeal = rng.normal(size=500)
    for _ in range(steps):
        users = rng.integers(0, 1000, BATCH)
        lengths = rng.integers(1, 6, BATCH)
        items = rng.integers(0, 500, int(lengths.sum()))
        genre_lengths = rng.integers(0, 3, BATCH)
        genres = rng.integers(0, 20, int(genre_lengths.sum()))
        starts = np.cumsum(lengths) - lengths
        appeal = np.add.reduceat(item_appeal[items], starts) / lengths
        p = 1 / (1 + np.exp(-(user_taste[users] + appeal)))
        inputs = {
            "user": users,
            "items": je.Ragged.from_row_lengths(items, lengths),
            "history": je.Ragged.from_row_lengths(items, lengths),
            "ad": rng.integers(0, 300, BATCH),
            "shop": rng.integers(0, 200, BATCH),
            "genres": je.Ragged.from_row_lengths(genres, genre_lengths),
        }
        weights: dict = {name: None for name in inputs}
        weights["genres"] = je.Ragged.from_row_lengths(
            rng.uniform(0.5, 2, genres.shape[0]).astype(np.float32), genre_lengths
        )
        yield inputs, weights, (rng.uniform(size=BATCH) < p).astype(np.float32)


class Tower(nn.Module):
    @nn.compact
    def __call__(self, acts: dict) -> jax.Array:
        history = acts["history"].reshape(acts["user"].shape[0], -1)
        x = jnp.concatenate(
            [acts["user"], acts["items"], history, acts["ad"], acts["shop"], acts["genres"]], -1
        )
        return nn.Dense(1)(nn.relu(nn.Dense(32)(x)))[:, 0]


def fsdp(tree, mesh: jax.sharding.Mesh | None):
    """Shardings that split every leaf's first dimension over "data" where it divides."""

    def spec(leaf):
        if mesh is None:
            return None
        even = np.ndim(leaf) >= 1 and np.shape(leaf)[0] % mesh.shape["data"] == 0
        return NamedSharding(mesh, P("data") if even else P())

    return jax.tree.map(spec, tree)


def train(mesh: jax.sharding.Mesh | None, table_axes, steps: int) -> dict:
    """Trains ``steps`` steps; returns the losses, the tables and the tower's sharding."""
    emb = je.Embedding(
        feature_config(),
        je.optimizers.Adagrad(0.1),
        mesh=mesh,
        sharding=SHARDING,
        table_axes=table_axes if mesh is not None else None,
    )
    state = emb.init(jax.random.key(0))
    tower, tx = Tower(), optax.adam(1e-2)
    probe = emb.preprocess(*next(batches(1))[:2])
    params = tower.init(jax.random.key(1), emb.lookup(state, probe))
    opt_state = tx.init(params)
    if mesh is not None:
        params = jax.device_put(params, fsdp(params, mesh))
        opt_state = jax.device_put(opt_state, fsdp(opt_state, mesh))

    @jax.jit
    def step(state, params, opt_state, batch, labels):
        def loss_fn(params, acts):
            logits = tower.apply(params, acts)
            return optax.sigmoid_binary_cross_entropy(logits, labels).sum()

        acts = emb.lookup(state, batch)
        loss, (g_params, g_acts) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, acts)
        updates, opt_state = tx.update(g_params, opt_state, params)
        params = optax.apply_updates(params, updates)
        if mesh is not None:  # keep the FSDP layout through the step
            params = jax.lax.with_sharding_constraint(params, fsdp(params, mesh))
        return emb.apply_gradients(state, batch, g_acts), params, opt_state, loss

    losses = []
    for inputs, weights, labels in batches(steps):
        batch = emb.preprocess(inputs, weights)
        state, params, opt_state, loss = step(state, params, opt_state, batch, labels)
        losses.append(float(loss) / BATCH)
    tables = {t.name: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
    kernel = params["params"]["Dense_1"]["kernel"]  # the [features, 32] layer
    return {"losses": losses, "tables": tables, "plan": emb.plan, "kernel": kernel}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--table-axes", choices=("model", "all"), default="model")
    args = parser.parse_args(argv)
    axes = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axes, axes))
    table_axes = ("model",) if args.table_axes == "model" else None
    sharded = train(mesh, table_axes, args.steps)
    single = train(None, None, args.steps)
    print(sharded["plan"])
    print("tower kernel", sharded["kernel"].shape, "sharded as", sharded["kernel"].sharding.spec)
    print("loss per example:", " ".join(f"{x:.4f}" for x in sharded["losses"]))
    diff = max(
        float(np.max(np.abs(sharded["tables"][n] - single["tables"][n]))) for n in single["tables"]
    )
    loss_diff = max(abs(a - b) for a, b in zip(sharded["losses"], single["losses"], strict=True))
    print(f"vs one device: max |table diff| = {diff:.2e}, max |loss diff| = {loss_diff:.2e}")
    return {"sharded": sharded, "single": single, "table_diff": diff, "loss_diff": loss_diff}


if __name__ == "__main__":
    main()
