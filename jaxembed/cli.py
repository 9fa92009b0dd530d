"""The ``jaxembed`` command line.

* ``jaxembed demo --out DIR`` runs the main job: configs, nested inputs of every kind, and the
  lookup, printing what each feature produced and writing it to ``DIR/lookup.json``.
* ``jaxembed export CKPT_DIR OUT [--step N]`` turns a checkpoint into a SavedModel for CPU TF
  Serving (configs read from the checkpoint).
* ``jaxembed inspect PATH`` shows what a checkpoint, a TF checkpoint or a SavedModel holds.

TensorFlow is imported only by ``export`` and by ``inspect`` of TF files.
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


def export_checkpoint(
    ckpt_dir: Path,
    out: Path,
    step: int | None = None,
    *,
    version: int | None = None,
    weighted: Sequence[str] = (),
    overwrite: bool = False,
) -> str:
    """Checkpoint ``step`` (latest if None) -> SavedModel at ``out`` (``out/<version>``)."""
    from rich.progress import Progress

    from jaxembed import export  # needs TensorFlow

    config = je.checkpoint.read_config(ckpt_dir, step)
    emb = je.Embedding(je.checkpoint.feature_config_from(config))
    with Progress(transient=False) as progress:
        task = progress.add_task(f"restoring step {config['step']}", total=None)
        state = je.checkpoint.restore(ckpt_dir, emb, config["step"], tables_only=True)

        def report(description: str, done: int, total: int) -> None:
            progress.update(task, description=description, completed=done, total=total)

        options = export.ExportOptions(
            version=version, weighted=tuple(weighted), overwrite=overwrite, progress=report
        )
        path = export.save_serving_model(out, emb, state, options=options)
    print(f"exported step {config['step']} of {ckpt_dir} to {path}")
    return path


def _is_tf_checkpoint(path: Path) -> bool:
    return Path(f"{path}.index").exists() or (path / "checkpoint").is_file()


def describe(path: Path) -> dict:
    """What ``path`` holds: a jaxembed checkpoint, a SavedModel or a TF checkpoint."""
    if (path / "saved_model.pb").exists():
        from jaxembed.export._inspect import describe_saved_model

        return describe_saved_model(path)
    if _is_tf_checkpoint(path):
        from jaxembed.export._inspect import describe_tf_checkpoint

        return describe_tf_checkpoint(path)
    if path.is_dir():
        steps = je.checkpoint.CheckpointManager(path, None, create=False).all_steps()
        if steps:
            config = je.checkpoint.read_config(path)
            return {
                "kind": "jaxembed checkpoint",
                "path": str(path),
                "steps": sorted(steps),
                **config,
            }
    raise FileNotFoundError(
        f"{path} is not a jaxembed checkpoint directory, a SavedModel or a TF checkpoint."
    )


def _print_inspection(info: dict) -> None:
    print(f"{info['kind']}: {info['path']}")
    if info["kind"] == "jaxembed checkpoint":
        print(f"  steps: {info['steps']} (latest {info['step']})")
        print("  tables:")
        for t in info["tables"]:
            opt = t["optimizer"]["class"] if t["optimizer"] else None
            print(
                f"    {t['name']}: [{t['vocabulary_size']}, {t['dim']}] "
                f"combiner={t['combiner']} optimizer={opt}"
            )
        print("  features:")
        for f in info["features"]:
            extra = []
            if f["max_sequence_length"]:
                extra.append(f"max_sequence_length={f['max_sequence_length']}")
            if f["output_shape"] is not None:
                extra.append(f"output_shape={f['output_shape']}")
            print(f"    {f['path']} -> {f['table']} {' '.join(extra)}".rstrip())
        return
    for key, sig in info.get("signatures", {}).items():
        print(f"  signature {key}:")
        for side in ("inputs", "outputs"):
            for name, spec in sig[side].items():
                print(f"    {side[:-1]:6} {name}: {spec['dtype']}{spec['shape']}")
    print("  variables:")
    for name, shape in sorted(info["variables"].items()):
        print(f"    {name}: {shape}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxembed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run the main job end to end")
    p_demo.add_argument("--out", type=Path, default=Path("out"), help="output folder (./out)")
    p_demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p_export = sub.add_parser("export", help="checkpoint -> SavedModel for CPU TF Serving")
    p_export.add_argument("ckpt_dir", type=Path, help="jaxembed checkpoint directory")
    p_export.add_argument("out", type=Path, help="SavedModel directory (base with --version)")
    p_export.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    p_export.add_argument(
        "--version", type=int, default=None, help="write OUT/VERSION/, TF Serving's layout"
    )
    p_export.add_argument(
        "--weighted", default="", help="comma-separated feature paths that take _weights inputs"
    )
    p_export.add_argument("--overwrite", action="store_true", help="replace an existing model")
    p_inspect = sub.add_parser("inspect", help="what a checkpoint or SavedModel holds")
    p_inspect.add_argument("path", type=Path)
    p_inspect.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            demo(args.out, args.seed)
        elif args.command == "export":
            weighted = [p for p in args.weighted.split(",") if p]
            export_checkpoint(
                args.ckpt_dir,
                args.out,
                args.step,
                version=args.version,
                weighted=weighted,
                overwrite=args.overwrite,
            )
        elif args.command == "inspect":
            info = describe(args.path)
            if args.json:
                print(json.dumps(info, indent=1))
            else:
                _print_inspection(info)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        parser.exit(1, f"jaxembed {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
