"""The ``jaxembed`` command line.

``jaxembed demo --out DIR`` runs the main job: configs, nested inputs of every kind, and the
lookup, printing what each feature produced and writing it to ``DIR/lookup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

import jaxembed as je


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def demo(out: Path, seed: int) -> dict:
    """A small recommender input: a user id, weighted categories and a watch history."""
    rng = np.random.default_rng(seed)
    users = je.TableConfig(vocabulary_size=100, dim=4, combiner="sum", name="users")
    items = je.TableConfig(vocabulary_size=50, dim=4, combiner="mean", name="items")
    features = {
        "user": je.FeatureConfig(users, name="user_id"),
        "context": {
            "categories": je.FeatureConfig(items, name="categories"),
            "history": je.FeatureConfig(items, max_sequence_length=3, name="history"),
        },
    }
    keys = jax.random.split(jax.random.key(seed))
    tables = {users: users.init_table(keys[0]), items: items.init_table(keys[1])}
    batch = 4
    lengths = np.array([2, 0, 3, 1])
    inputs = {
        "user": rng.integers(0, 100, size=batch),
        "context": {
            "categories": je.Ragged.from_row_lengths(rng.integers(0, 50, lengths.sum()), lengths),
            "history": je.Sparse(
                indices=[[0, 0], [0, 1], [2, 0], [3, 0], [3, 1], [3, 2], [3, 3]],
                values=rng.integers(0, 50, 7),
                dense_shape=[batch, 4],
            ),
        },
    }
    weights = {
        "user": None,
        "context": {
            "categories": je.Ragged.from_row_lengths(
                rng.uniform(0.5, 2.0, lengths.sum()).astype(np.float32), lengths
            ),
            "history": None,
        },
    }
    lookup = jax.jit(lambda t: je.embedding_lookup(inputs, weights, t, features))
    acts = lookup(tables)
    report = {
        "user": np.asarray(acts["user"]).round(4).tolist(),
        "context/categories": np.asarray(acts["context"]["categories"]).round(4).tolist(),
        "context/history": np.asarray(acts["context"]["history"]).round(4).tolist(),
    }
    with np.printoptions(precision=4, suppress=True):
        for path, value in report.items():
            print(f"{path}: shape {np.shape(value)}")
            print(np.asarray(value, np.float32))
    _write_atomic(out / "lookup.json", json.dumps(report, indent=1))
    print(f"wrote {out / 'lookup.json'}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxembed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run the main job end to end")
    p_demo.add_argument("--out", type=Path, default=Path("out"), help="output folder (./out)")
    p_demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.out, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
