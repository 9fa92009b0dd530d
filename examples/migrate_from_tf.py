"""Migrating a TF ``tf.tpu.experimental.embedding`` model to jaxembed, and back to TF.

1. TF: the model's ``TableConfig``s / ``FeatureConfig``s and a ``TPUEmbedding`` with
   ``Adagrad(0.1)`` (built on CPU: the variables only), holding "trained" tables and Adagrad
   accumulators, written with ``tf.train.Checkpoint(embedding=...).write(prefix)``.
2. jaxembed: the same configs under jaxembed's names (``je.TableConfig``, ``je.FeatureConfig``,
   ``je.optimizers.Adagrad``, same arguments), ``export.load_tf_checkpoint(prefix, emb)``; the
   tables and slots equal TF's variables, and the lookup equals TF's ``serving_embedding_lookup``
   on a batch with dense, sparse and ragged (sequence) features.
3. A few jitted training steps in JAX: a dot-product click model, its logistic loss, the tables
   updated by jaxembed's row-sparse Adagrad and the two dense parameters by SGD.
4. Back to TF: ``export.save_tf_checkpoint`` restores into TF's ``TPUEmbeddingForServing`` (and
   into ``TPUEmbedding`` to resume training on TPUs), and ``export.save_serving_model`` writes a
   SavedModel for CPU TF Serving.

Each parity check prints its max abs difference; ``main`` returns them.

Run: ``python examples/migrate_from_tf.py [--workdir DIR] [--steps 5]``
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

import jaxembed as je
from jaxembed import export

TFE = tf.tpu.experimental.embedding

USERS, ITEMS, DIM, HISTORY = 1000, 500, 8, 4
LEARNING_RATE = 0.1
BATCH = 32


# -- the model's embedding configs, in TF and in jaxembed --


def tf_feature_config() -> dict[str, Any]:
    """The TF model's features (fresh objects: TF writes the optimizer into its TableConfigs)."""
    users = TFE.TableConfig(vocabulary_size=USERS, dim=DIM, combiner="sum", name="users")
    items = TFE.TableConfig(vocabulary_size=ITEMS, dim=DIM, combiner="mean", name="items")
    return {
        "user": TFE.FeatureConfig(users, name="user"),
        "clicked": TFE.FeatureConfig(items, name="clicked"),
        "history": TFE.FeatureConfig(items, max_sequence_length=HISTORY, name="history"),
    }


def jax_feature_config() -> dict[str, je.FeatureConfig]:
    """The same features in jaxembed: only the module changes."""
    users = je.TableConfig(vocabulary_size=USERS, dim=DIM, combiner="sum", name="users")
    items = je.TableConfig(vocabulary_size=ITEMS, dim=DIM, combiner="mean", name="items")
    return {
        "user": je.FeatureConfig(users, name="user"),
        "clicked": je.FeatureConfig(items, name="clicked"),
        "history": je.FeatureConfig(items, max_sequence_length=HISTORY, name="history"),
    }


# -- data --


def sample_batch(seed: int, batch: int = BATCH) -> dict[str, Any]:
    """One batch as numpy: ``user`` (one id each), ``clicked`` (0-3 ids: sparse),
    ``history`` (0-6 ids: ragged, cut to the sequence length), ``label`` (0/1)."""
    rng = np.random.default_rng(seed)
    clicked_lengths = rng.integers(0, 4, batch)
    history_lengths = rng.integers(0, HISTORY + 3, batch)
    return {
        "user": rng.integers(0, USERS, batch),
        "clicked_ids": rng.integers(0, ITEMS, int(clicked_lengths.sum())),
        "clicked_lengths": clicked_lengths,
        "history_ids": rng.integers(0, ITEMS, int(history_lengths.sum())),
        "history_lengths": history_lengths,
        "label": rng.integers(0, 2, batch).astype(np.float32),
    }


def _coo(lengths: np.ndarray) -> np.ndarray:
    """``[row, position]`` indices of a ragged batch's ids (a row-major SparseTensor's)."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    positions = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.stack([rows, positions], axis=1)


def jax_inputs(b: dict[str, Any]) -> dict[str, Any]:
    """The batch as jaxembed inputs: dense ``user``, ``je.Sparse`` clicks, ``je.Ragged`` history."""
    width = max(int(b["clicked_lengths"].max()), 1)
    return {
        "user": b["user"],
        "clicked": je.Sparse(_coo(b["clicked_lengths"]), b["clicked_ids"], [len(b["user"]), width]),
        "history": je.Ragged.from_row_lengths(b["history_ids"], b["history_lengths"]),
    }


def tf_inputs(b: dict[str, Any]) -> dict[str, Any]:
    """The same batch as TF tensors: dense, ``tf.SparseTensor`` and ``tf.RaggedTensor``."""
    width = max(int(b["clicked_lengths"].max()), 1)
    return {
        "user": tf.constant(b["user"], tf.int64),
        "clicked": tf.SparseTensor(
            _coo(b["clicked_lengths"]),
            tf.constant(b["clicked_ids"], tf.int64),
            [len(b["user"]), width],
        ),  # fmt: skip
        "history": tf.RaggedTensor.from_row_lengths(
            tf.constant(b["history_ids"], tf.int64), b["history_lengths"]
        ),
    }


def serving_inputs(b: dict[str, Any]) -> dict[str, np.ndarray]:
    """The batch as the SavedModel's ``serving_default`` inputs: ids and lengths per feature."""
    return {
        "user_ids": b["user"].astype(np.int64),
        "user_lengths": np.ones(len(b["user"]), np.int64),
        "clicked_ids": b["clicked_ids"].astype(np.int64),
        "clicked_lengths": b["clicked_lengths"].astype(np.int64),
        "history_ids": b["history_ids"].astype(np.int64),
        "history_lengths": b["history_lengths"].astype(np.int64),
    }


def ragged_inputs(b: dict[str, Any]) -> dict[str, je.Ragged]:
    """Every feature as ``je.Ragged``: what the SavedModel computes (TF's ragged lookup)."""
    return {
        "user": je.Ragged.from_row_lengths(b["user"], np.ones(len(b["user"]), np.int64)),
        "clicked": je.Ragged.from_row_lengths(b["clicked_ids"], b["clicked_lengths"]),
        "history": je.Ragged.from_row_lengths(b["history_ids"], b["history_lengths"]),
    }


# -- the click model trained on top of the tables --


def click_logit(params: dict[str, jax.Array], acts: dict[str, jax.Array]) -> jax.Array:
    """The click logit: user · (clicked items + mean history item), scaled and shifted."""
    interest = acts["clicked"] + acts["history"].mean(axis=1)
    return params["scale"] * (acts["user"] * interest).sum(axis=-1) + params["bias"]


def click_model(params: dict[str, jax.Array], acts: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The served model: P(click) (a pure function of params and activations)."""
    return {"ctr": jax.nn.sigmoid(click_logit(params, acts))}


def loss_fn(params: dict[str, jax.Array], acts: dict[str, jax.Array], label: jax.Array):
    """Mean logistic loss (``optax.sigmoid_binary_cross_entropy``, written out)."""
    logit = click_logit(params, acts)
    return (jnp.maximum(logit, 0) - logit * label + jnp.log1p(jnp.exp(-jnp.abs(logit)))).mean()


# -- helpers --


def _max_diff(a: Any, b: Any) -> float:
    """Max abs difference of two arrays (or two dicts of arrays with the same keys)."""
    if isinstance(a, dict):
        assert set(a) == set(b), (sorted(a), sorted(b))
        return max((_max_diff(a[k], b[k]) for k in a), default=0.0)
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _tf_values(embedding: Any) -> dict[str, dict[str, np.ndarray]]:
    """``{table: {"parameters" | slot: value}}`` of a TF embedding object's variables."""
    return {t: {k: v.numpy() for k, v in d.items()} for t, d in embedding._variables.items()}


def _jax_values(emb: je.Embedding, state: je.EmbeddingState) -> dict[str, dict[str, np.ndarray]]:
    """The same layout for a jaxembed state."""
    out = {}
    for table, value in emb.embedding_tables(state).items():
        out[emb.table_names[table]] = {"parameters": np.asarray(value)}
    for table, slots in emb.slot_variables(state).items():
        out[emb.table_names[table]].update({k: np.asarray(v) for k, v in slots.items()})
    return out


def _report(what: str, diff: float, figures: dict[str, float], key: str) -> None:
    figures[key] = diff
    print(f"  {what}: max abs difference {diff:.3g}")


# -- the migration --


def write_tf_checkpoint(prefix: Path, seed: int = 0) -> tuple[str, Any, dict]:
    """Step 1: TF's ``TPUEmbedding`` with "trained" values, checkpointed as a TF job would."""
    feature_config = tf_feature_config()
    embedding = TFE.TPUEmbedding(feature_config, TFE.Adagrad(learning_rate=LEARNING_RATE))
    embedding.build()  # on CPU (no TPUStrategy): creates the variables and slots
    rng = np.random.default_rng(seed)
    for variables in embedding._variables.values():  # {table: {"parameters" | slot: tf.Variable}}
        for key, variable in variables.items():
            shape = tuple(variable.shape)
            if key == "parameters":
                variable.assign(rng.normal(0.0, 0.3, size=shape).astype(np.float32))
            else:  # Adagrad accumulators: positive
                variable.assign(rng.uniform(0.1, 2.0, size=shape).astype(np.float32))
    path = tf.train.Checkpoint(embedding=embedding).write(str(prefix))
    return path, embedding, feature_config


def main(workdir: str | Path, *, steps: int = 5, seed: int = 0) -> dict[str, float]:
    """Runs the migration in ``workdir``; returns every parity check's max abs difference."""
    workdir = Path(workdir)
    figures: dict[str, float] = {}
    batch = sample_batch(seed + 100)

    print("1. TF: TPUEmbedding (built on CPU) with trained tables and Adagrad accumulators")
    tf_path, tf_emb, tf_config = write_tf_checkpoint(workdir / "tf" / "ckpt", seed)
    for key, shape in tf.train.list_variables(tf_path):
        if key.startswith("embedding/"):
            print(f"  {key} {shape}")

    print("2. jaxembed: the same configs, export.load_tf_checkpoint")
    emb = je.Embedding(jax_feature_config(), je.optimizers.Adagrad(learning_rate=LEARNING_RATE))
    state = export.load_tf_checkpoint(tf_path, emb)
    tf_values, loaded = _tf_values(tf_emb), _jax_values(emb, state)
    _report(
        "tables vs TF variables",
        max(_max_diff(tf_values[t]["parameters"], loaded[t]["parameters"]) for t in tf_values),
        figures,
        "load_tables",
    )
    _report(
        "accumulators vs TF slots",
        max(_max_diff(tf_values[t]["accumulators"], loaded[t]["accumulators"]) for t in tf_values),
        figures,
        "load_slots",
    )
    tf_acts = TFE.serving_embedding_lookup(
        tf_inputs(batch), None, tf_emb.embedding_tables, tf_config
    )
    tf_acts = {k: v.numpy() for k, v in tf_acts.items()}
    acts = je.embedding_lookup(
        jax_inputs(batch), None, emb.embedding_tables(state), emb.feature_config
    )
    _report(
        "je.embedding_lookup vs TF serving_embedding_lookup",
        _max_diff(acts, tf_acts),
        figures,
        "lookup_vs_tf",
    )
    batch_acts = emb.lookup(state, emb.preprocess(jax_inputs(batch)))
    _report(
        "Embedding.lookup vs TF serving_embedding_lookup",
        _max_diff(batch_acts, tf_acts),
        figures,
        "train_lookup_vs_tf",
    )

    print(f"3. JAX: {steps} jitted training steps (tables: Adagrad; scale and bias: SGD)")
    params = {"scale": jnp.float32(1.0), "bias": jnp.float32(0.0)}

    @jax.jit
    def train_step(state, params, prepared, label):
        acts = emb.lookup(state, prepared)
        loss, (act_grads, param_grads) = jax.value_and_grad(
            lambda a, p: loss_fn(p, a, label), argnums=(0, 1)
        )(acts, params)
        state = emb.apply_gradients(state, prepared, act_grads)
        params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, param_grads)
        return state, params, loss

    before = {t: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
    for step in range(steps):
        b = sample_batch(seed + step)
        state, params, loss = train_step(state, params, emb.preprocess(jax_inputs(b)), b["label"])
        print(f"  step {step + 1}: loss {float(loss):.4f}")
    for table, value in emb.embedding_tables(state).items():
        changed = int(np.any(np.asarray(value) != before[table], axis=1).sum())
        print(f"  table {table.name}: {changed} of {table.vocabulary_size} rows updated")

    print("4. Back to TF: export.save_tf_checkpoint -> TPUEmbeddingForServing")
    jax_path = export.save_tf_checkpoint(workdir / "jax" / "ckpt", emb, state)
    serving_config = tf_feature_config()
    serving = TFE.TPUEmbeddingForServing(serving_config, TFE.Adagrad(learning_rate=LEARNING_RATE))
    status = tf.train.Checkpoint(embedding=serving).read(jax_path)
    serving.build()  # the pending restore fills the variables as they are created
    status.assert_consumed()
    restored, trained = _tf_values(serving), _jax_values(emb, state)
    _report(
        "restored TF tables and slots vs JAX", _max_diff(restored, trained), figures, "tf_restore"
    )
    tf_acts = TFE.serving_embedding_lookup(
        tf_inputs(batch), None, serving.embedding_tables, serving_config
    )
    acts = je.embedding_lookup(
        jax_inputs(batch), None, emb.embedding_tables(state), emb.feature_config
    )
    _report(
        "TF serving_embedding_lookup on the restored tables vs jaxembed",
        _max_diff({k: v.numpy() for k, v in tf_acts.items()}, acts),
        figures,
        "tf_restore_lookup",
    )
    legacy = TFE.TPUEmbedding(tf_feature_config(), TFE.Adagrad(learning_rate=LEARNING_RATE))
    status = tf.train.Checkpoint(embedding=legacy).read(jax_path)
    legacy.build()
    status.assert_consumed()
    _report(
        "restored into TPUEmbedding (to resume on TPU)",
        _max_diff(_tf_values(legacy), trained),
        figures,
        "tf_restore_tpu_embedding",
    )

    print("5. export.save_serving_model: a SavedModel for CPU TF Serving")
    model_dir = export.save_serving_model(
        workdir / "serving",
        emb,
        state,
        click_model,
        params,
        options=export.ExportOptions(version=1, overwrite=True),
    )
    print(f"  wrote {model_dir} (reloaded and checked against JAX before publishing)")
    served = tf.saved_model.load(model_dir).signatures["serving_default"]
    got = served(**{k: tf.constant(v) for k, v in serving_inputs(batch).items()})
    want = click_model(
        params,
        je.embedding_lookup(
            ragged_inputs(batch), None, emb.embedding_tables(state), emb.feature_config
        ),
    )
    _report(
        "SavedModel ctr vs JAX",
        _max_diff({k: v.numpy() for k, v in got.items()}, want),
        figures,
        "saved_model_vs_jax",
    )
    return figures


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="where to write (default: a temporary directory)")
    parser.add_argument("--steps", type=int, default=5, help="JAX training steps")
    return parser.parse_args()


if __name__ == "__main__":
    args = _parse_args()
    if args.workdir:
        main(args.workdir, steps=args.steps)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp, steps=args.steps)
