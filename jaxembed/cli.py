"""The ``jaxembed`` command line.

* ``jaxembed demo --out DIR`` runs the main job (``jaxembed.demo.run``): train a sharded
  recommender on a click log, checkpoint it, export a SavedModel, serve it from a TensorFlow-only
  process and compare with JAX, plot the training curve.
* ``jaxembed export CKPT_DIR OUT [--step N]`` turns a checkpoint into a SavedModel for CPU TF
  Serving (configs read from the checkpoint).
* ``jaxembed inspect PATH`` shows what a checkpoint, a TF checkpoint or a SavedModel holds.

TensorFlow is imported only by ``export`` and by ``inspect`` of TF files.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jaxembed as je


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


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxembed.demo.run import DemoConfig

    defaults = DemoConfig()
    add = parser.add_argument
    add("--out", type=Path, default=defaults.out, help="output folder")
    add("--steps", type=int, default=defaults.steps, help="training steps")
    add("--batch-size", type=int, default=defaults.batch_size, help="global batch size")
    add("--examples", type=int, default=defaults.examples, help="synthetic impressions")
    add("--users", type=int, default=defaults.users, help="synthetic user vocabulary")
    add("--items", type=int, default=defaults.items, help="synthetic item vocabulary")
    add("--dim", type=int, default=defaults.dim, help="embedding dim")
    add("--eval-every", type=int, default=defaults.eval_every, help="steps between test AUCs")
    add("--movielens", type=Path, default=None, help="MovieLens ml-latest-small folder")
    add("--devices", type=int, default=8, help="simulated devices on a CPU-only machine")
    add("--seed", type=int, default=defaults.seed, help="random seed")


def _run_demo(args: argparse.Namespace) -> None:
    # Simulate devices on CPU so the sharded path runs; must happen before JAX starts its
    # backends (importing jax does not). GPUs and TPUs are used as they are.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
    from jaxembed.demo.run import DemoConfig, run

    config = DemoConfig(
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        examples=args.examples,
        users=args.users,
        items=args.items,
        dim=args.dim,
        eval_every=args.eval_every,
        movielens=args.movielens,
        seed=args.seed,
    )
    run(config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxembed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser(
        "demo",
        help="the main job: train, checkpoint, export, serve, compare",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _demo_arguments(p_demo)
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
            _run_demo(args)
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
