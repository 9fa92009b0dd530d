"""Quantized serving tables on MovieLens: memory, accuracy and latency of the served model.

Trains a rating model on MovieLens ``ml-latest-small`` (a 90/10 random split of the ratings):
tables ``users``, ``movies`` and ``genres`` of dim ``--dim`` (32), features ``user``,
``movie`` (one id each, sum) and ``genres`` (the movie's genres, mean), and a Flax tower
(``[u, m, g, u * m]`` -> 64 -> 1, plus the mean rating), Adagrad on the tables and Adam on the
tower, squared error. The trained model is then exported once per ``--quantize`` setting
(``float32`` is the baseline: ``ExportOptions(quantize=None)``) and each SavedModel is loaded
into its own TF1 ``Session`` (as TF Serving runs it), where

* ``table_bytes`` / ``variable_bytes``: bytes of the table variables / of all variables (from
  the SavedModel's variables checkpoint: element count x dtype size);
* ``test_rmse``: RMSE of the served predictions on the test ratings, batch 256;
* ``seconds_batch256``: median latency of one batch of 256 (calls of all models interleaved).

Ratios are against ``float32``. Prints one JSON object.

Run: ``python benchmarks/bench_quantize.py --movielens ../shared/data/movielens-small``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import tensorflow as tf  # noqa: E402
from bench_serving import SessionModel  # noqa: E402
from bench_w import interleaved  # noqa: E402

import jaxembed as je  # noqa: E402
from jaxembed import export  # noqa: E402
from jaxembed.demo.data import Column  # noqa: E402


class Ratings:
    """MovieLens ratings as row numbers: ``user``, ``movie``, ``genres`` (ragged), ``rating``."""

    def __init__(self, folder: Path):
        raw = np.loadtxt(folder / "ratings.csv", delimiter=",", skiprows=1)
        users, self.user = np.unique(raw[:, 0].astype(np.int64), return_inverse=True)
        with open(folder / "movies.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))[1:]
        movie_ids = np.array([int(r[0]) for r in rows], np.int64)
        genres = [r[2].split("|") for r in rows]
        names = sorted({g for gs in genres for g in gs})
        index = {g: i for i, g in enumerate(names)}
        order = np.argsort(movie_ids)
        self.movie = order[np.searchsorted(movie_ids[order], raw[:, 1].astype(np.int64))]
        lengths = np.array([len(gs) for gs in genres], np.int64)
        values = np.array([index[g] for gs in genres for g in gs], np.int64)
        self.genres = Column(values, lengths).take(self.movie)  # one ragged row per rating
        self.rating = raw[:, 2].astype(np.float32)
        self.vocab = {"users": len(users), "movies": len(movie_ids), "genres": len(names)}

    def request(self, rows: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """``{feature: {"ids", "lengths"}}`` of the ratings ``rows``."""
        genres = self.genres.take(rows)
        ones = np.ones(len(rows), np.int64)
        return {
            "user": {"ids": self.user[rows].astype(np.int64), "lengths": ones},
            "movie": {"ids": self.movie[rows].astype(np.int64), "lengths": ones},
            "genres": {"ids": genres.values, "lengths": genres.lengths},
        }


def je_inputs(request: dict[str, dict[str, np.ndarray]]) -> dict[str, je.Ragged]:
    return {f: je.Ragged.from_row_lengths(a["ids"], a["lengths"]) for f, a in request.items()}


class Tower(nn.Module):
    mean: float

    @nn.compact
    def __call__(self, acts: dict) -> jax.Array:
        u, m, g = acts["user"], acts["movie"], acts["genres"]
        x = nn.relu(nn.Dense(64)(jnp.concatenate([u, m, g, u * m], axis=-1)))
        return nn.Dense(1)(x)[:, 0] + self.mean


def make_predict(mean: float) -> Callable:
    def predict(params: Any, acts: dict) -> dict:
        return {"rating": Tower(mean).apply(params, acts)}

    return predict


def train(data: Ratings, rows: np.ndarray, args: argparse.Namespace):
    tables = {
        name: je.TableConfig(
            size, args.dim, combiner="mean" if name == "genres" else "sum", name=name
        )
        for name, size in data.vocab.items()
    }
    features = {"user": tables["users"], "movie": tables["movies"], "genres": tables["genres"]}
    emb = je.Embedding(
        {f: je.FeatureConfig(t, name=f) for f, t in features.items()},
        je.optimizers.Adagrad(args.embedding_lr),
    )
    mean = float(data.rating[rows].mean())
    predict = make_predict(mean)
    state = emb.init(jax.random.key(args.seed))
    first = emb.preprocess(je_inputs(data.request(rows[: args.batch])))
    params = Tower(mean).init(jax.random.key(args.seed + 1), emb.lookup(state, first))
    tx = optax.adam(args.dense_lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(state, params, opt_state, batch, labels):
        def loss_fn(params, acts):
            return jnp.mean((predict(params, acts)["rating"] - labels) ** 2)

        acts = emb.lookup(state, batch)
        loss, (pg, ag) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, acts)
        updates, opt_state = tx.update(pg, opt_state, params)
        return (
            emb.apply_gradients(state, batch, ag),
            optax.apply_updates(params, updates),
            opt_state,
            loss,
        )

    rng = np.random.default_rng(args.seed)
    for _ in range(args.epochs):
        order = rng.permutation(rows)
        for lo in range(0, len(order) - args.batch + 1, args.batch):
            batch_rows = order[lo : lo + args.batch]
            batch = emb.preprocess(je_inputs(data.request(batch_rows)), batch_size="bucket")
            state, params, opt_state, _ = step(
                state, params, opt_state, batch, jnp.asarray(data.rating[batch_rows])
            )
    return emb, state, params, predict


def variable_bytes(path: str) -> tuple[int, int]:
    """(bytes of the embedding variables, bytes of all variables) of a SavedModel: every
    variable outside the translated model (``model/...``) belongs to the tables."""
    reader = tf.train.load_checkpoint(f"{path}/variables/variables")
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    table_bytes = total = 0
    for name, shape in shapes.items():
        if name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH"):
            continue
        size = int(np.prod(shape, dtype=np.int64)) * dtypes[name].size
        total += size
        if not name.startswith("model/"):
            table_bytes += size
    return table_bytes, total


def served_rmse(model: SessionModel, data: Ratings, rows: np.ndarray, batch: int) -> float:
    errors = []
    for lo in range(0, len(rows), batch):
        part = rows[lo : lo + batch]
        out = model(_request(data, part))
        errors.append(out["rating"] - data.rating[part])
    return float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))


def _request(data: Ratings, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {f"{f}_{k}": v for f, arrays in data.request(rows).items() for k, v in arrays.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--movielens", type=Path, default=Path("../shared/data/movielens-small"))
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--embedding-lr", type=float, default=0.1)
    p.add_argument("--dense-lr", type=float, default=2e-3)
    p.add_argument("--quantize", default="float32,int8,float16,bfloat16")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    data = Ratings(args.movielens)
    order = np.random.default_rng(args.seed).permutation(len(data.rating))
    test_rows, train_rows = order[: len(order) // 10], order[len(order) // 10 :]
    emb, state, params, predict = train(data, train_rows, args)
    acts = emb.lookup(state, emb.preprocess(je_inputs(data.request(test_rows))))
    jax_rmse = float(
        np.sqrt(
            np.mean((np.asarray(predict(params, acts)["rating"]) - data.rating[test_rows]) ** 2)
        )
    )
    out: dict[str, Any] = {
        "benchmark": "quantize_movielens",
        "config": {**vars(args), "movielens": str(args.movielens)},
        "vocab": data.vocab,
        "train_ratings": len(train_rows),
        "test_ratings": len(test_rows),
        "jax_test_rmse": round(jax_rmse, 5),
        "models": {},
    }
    tmp = tempfile.mkdtemp(prefix="bench_quantize_")
    try:
        models = {}
        for setting in args.quantize.split(","):
            quantize = None if setting == "float32" else setting
            options = export.ExportOptions(**({"quantize": quantize} if quantize else {}))
            t0 = time.perf_counter()
            path = export.save_serving_model(
                f"{tmp}/{setting}", emb, state, predict, params, options=options
            )
            tables, total = variable_bytes(path)
            models[setting] = SessionModel(path, threads=2)
            out["models"][setting] = {
                "export_seconds": round(time.perf_counter() - t0, 1),
                "table_bytes": tables,
                "variable_bytes": total,
                "test_rmse": round(served_rmse(models[setting], data, test_rows, 256), 5),
            }
        request = _request(data, test_rows[:256])
        cases = {name: (lambda m=m: m(request)) for name, m in models.items()}
        times = interleaved(cases, args.repeats, 10)
        base = out["models"]["float32"]
        for name, t in times.items():
            entry = out["models"][name]
            entry["seconds_batch256"] = round(float(np.median(t)), 7)
            entry["table_bytes_ratio"] = round(entry["table_bytes"] / base["table_bytes"], 4)
            entry["variable_bytes_ratio"] = round(
                entry["variable_bytes"] / base["variable_bytes"], 4
            )
            entry["rmse_minus_float32"] = round(entry["test_rmse"] - base["test_rmse"], 5)
        for name in times:
            entry = out["models"][name]
            entry["latency_ratio"] = round(entry["seconds_batch256"] / base["seconds_batch256"], 3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
