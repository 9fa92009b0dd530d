"""The ``jaxembed`` command line.

* ``jaxembed demo --out DIR`` runs the main job (``jaxembed.demo.run``): train a sharded
  recommender on a click log, checkpoint it, export a SavedModel, serve it from a TensorFlow-only
  process and compare with JAX, plot the training curve.
* ``jaxembed export CKPT_DIR OUT [--step N] [--tables-only] [--quantize Q]`` turns a checkpoint
  into a SavedModel for CPU TF Serving (configs read from the checkpoint): the whole model when
  the step stores a dense model (``je.checkpoint.DenseModel``: its module is imported, which runs
  that module's code), the tables alone otherwise or with ``--tables-only``; ``--quantize``
  stores the serving tables as int8, float16 or bfloat16.
* ``jaxembed inspect PATH`` shows what a checkpoint, a TF checkpoint or a SavedModel holds (for
  a TF Serving base folder of versions ``1/``, ``2/``, ...: the latest version, and the list):
  tables (dtype, shape, bytes), optimizers and slots, features, the dense model, signatures;
  ``--json`` adds the raw variable keys. A checkpoint's dense model is shown by its import
  path, never imported.

TensorFlow is imported only by ``demo``, ``export`` and ``inspect`` of TF files, without its
C++ start-up log lines (``jaxembed._console``: ``TF_CPP_MIN_LOG_LEVEL`` is 3 unless set).
Long phases show progress: live in a terminal, a plain line at least every 5 s in a log.

``jaxembed demo`` checks every option, its optional packages (the ``demo`` extra) and its export
target before it starts, and refuses an ``--out`` that holds a previous demo run unless
``--overwrite`` (which deletes only that run's demo outputs) or ``--resume`` (which continues
its training from the latest checkpoint). ``jaxembed export`` refuses an existing target (a
SavedModel or an empty folder with ``--overwrite`` excepted) before TensorFlow loads.

A user error (a bad option or path, a refused target: ``USER_ERRORS``) prints one line,
``jaxembed <command>: error: <message>``, to stderr and exits with status 2, like argparse's own
usage errors. Ctrl-C exits with status 130 and a closed stdout pipe with 141, both quietly. Any
other exception is a bug and keeps its traceback; ``JAXEMBED_TRACEBACK=1`` shows the traceback
of user errors too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import jaxembed as je
from jaxembed._console import (
    Reporter,
    drop_xla_gc_callback_at_exit,
    import_tensorflow_quietly,
    quiet_tensorflow_logs,
    stderr_held,
)
from jaxembed._serving_dirs import is_saved_model, saved_model_versions

_stderr_held = stderr_held  # the name earlier versions used

#: The exceptions the CLI reports as one line (the library's clear-error types).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    OSError,  # the rest of the environment's errors, e.g. a full disk: no bug of ours
    ModuleNotFoundError,  # an optional package not installed: the message names the extra
)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a process killed by it


@contextlib.contextmanager
def _absl_errors_only() -> Iterator[None]:
    """Keeps absl's WARNING lines (orbax logs them about the very files an error message then
    names) out of the command's stderr; errors still show."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def _import_tensorflow() -> None:
    """Imports TensorFlow (through ``jaxembed.export``) without its start-up log lines, or
    raises ModuleNotFoundError saying how to install it."""
    if importlib.util.find_spec("tensorflow") is None:
        raise ModuleNotFoundError(
            "this command needs TensorFlow, which this Python lacks; install the tf extra: pip "
            "install 'jaxembed[tf]' (or pip install -e '.[tf]' in a clone).",
            name="tensorflow",
        )
    import_tensorflow_quietly()


def _one_line(error: BaseException) -> str:
    """The message of a user error on one line."""
    if isinstance(error, OSError) and error.filename and error.strerror:  # an OS-level error
        return f"{error.filename}: {error.strerror}; check that path and run again."
    text = " ".join(str(error).split())
    return text or type(error).__name__


def export_checkpoint(
    ckpt_dir: Path,
    out: Path,
    step: int | None = None,
    *,
    version: int | None = None,
    weighted: Sequence[str] = (),
    overwrite: bool = False,
    tables_only: bool = False,
    quantize: str | dict[str, str | None] | None = None,
) -> str:
    """Checkpoint ``step`` (latest if None) -> SavedModel at ``out`` (``out/<version>``).

    The SavedModel serves the whole model (lookup, then the dense model) when the step stores a
    ``DenseModel`` and not ``tables_only``; otherwise the activations, one output per feature.
    The dense model's module is imported (running its code) before TensorFlow is. ``quantize``
    is ``ExportOptions.quantize`` (serving tables stored as int8, float16 or bfloat16).

    Raises:
        FileNotFoundError: no checkpoint (or no such step) at ``ckpt_dir``.
        ValueError: ``out`` overlaps ``ckpt_dir``, a negative step or version, a stored dense
            model that cannot be imported here, or a target that ``save_serving_model`` refuses
            (FileExistsError too).
    """
    _check_export_paths(Path(ckpt_dir), Path(out), step, version, overwrite)
    if importlib.util.find_spec("tensorflow") is None:
        _import_tensorflow()  # raises, saying how to install it, before any work
    config = je.checkpoint.read_config(ckpt_dir, step)
    step = config["step"]
    summary = je.checkpoint.model_summary(config)
    apply_fn, params = None, None
    if summary is None:
        print(
            f"tables-only export: step {step} of {ckpt_dir} stores no dense model, so the "
            "SavedModel serves the activations (one output per feature); to serve the whole "
            "model, save it with the step: manager.save(step, state, "
            "model=je.checkpoint.DenseModel('package.module:predict', params))"
        )
    elif tables_only:
        print(
            f"tables-only export (--tables-only): the dense model {summary['apply']} stored in "
            f"step {step} is left out; the SavedModel serves the activations"
        )
    else:
        apply_fn, params = _load_dense_model(ckpt_dir, step)
    report = Reporter()
    with report.stage("loading TensorFlow"):
        _import_tensorflow()
    from jaxembed import export

    emb = je.Embedding(je.checkpoint.feature_config_from(config))
    with report.stage(f"restoring step {step} of {ckpt_dir}"):
        state = je.checkpoint.restore(ckpt_dir, emb, step, tables_only=True)
    with report.stage("exporting") as stage:

        def progress(description: str, done: int, total: int) -> None:
            stage.update(description=f"exporting: {description}", completed=done, total=total)

        options = export.ExportOptions(
            version=version,
            weighted=tuple(weighted),
            overwrite=overwrite,
            progress=progress,
            quantize=quantize,
        )
        path = export.save_serving_model(
            out, emb, state, apply_fn, params, options=options, source_checkpoint=ckpt_dir
        )
    what = "the tables"
    if apply_fn is not None and summary is not None:
        what = f"the tables and the dense model {summary['apply']}"
    print(f"exported step {step} of {ckpt_dir} ({what}) to {path}")
    return path


def _load_dense_model(ckpt_dir: Path, step: int) -> tuple[Callable, Any]:
    """The stored dense model's apply function (imported) and params; a ValueError if its
    module cannot be imported here."""
    model = je.checkpoint.restore_model(ckpt_dir, step)
    assert model is not None  # the config says one is stored
    try:
        apply_fn = model.resolve()
    except (ImportError, TypeError) as err:
        raise ValueError(
            f"step {step} of {ckpt_dir}: {str(err).rstrip('.')}; or pass --tables-only to "
            "export the tables alone."
        ) from err
    return apply_fn, jax.tree.map(np.asarray, model.params)


def _overlaps(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one folder, or one holds the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _check_export_paths(
    ckpt_dir: Path, out: Path, step: int | None, version: int | None, overwrite: bool = False
) -> None:
    """Up-front checks of ``jaxembed export``'s arguments (before TensorFlow is imported and
    the checkpoint restored): the paths, and a target that exists (refused without
    ``--overwrite``; with it, only a SavedModel or an empty folder may be replaced, which
    ``save_serving_model`` checks again in full)."""
    if not ckpt_dir.exists():
        raise FileNotFoundError(
            f"checkpoint directory {ckpt_dir} does not exist; give the folder a training run "
            "saved into (e.g. out/checkpoints)."
        )
    if not ckpt_dir.is_dir():
        raise NotADirectoryError(
            f"{ckpt_dir} is a file, not a jaxembed checkpoint directory; give the folder a "
            "training run saved into (e.g. out/checkpoints)."
        )
    if _overlaps(ckpt_dir, out):
        raise ValueError(
            f"OUT {out} overlaps the checkpoint directory {ckpt_dir}; export to a folder outside "
            "the checkpoint that does not contain it either."
        )
    for flag, value in (("--step", step), ("--version", version)):
        if value is not None and value < 0:
            raise ValueError(f"{flag} {value} is negative; give an integer >= 0.")
    _check_export_target(out if version is None else out / str(version), overwrite)


def _check_export_target(target: Path, overwrite: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink() or not target.is_dir():
        what, replaceable = "a file or link", False
    elif is_saved_model(target):
        what, replaceable = "a SavedModel", True
    elif not any(target.iterdir()):
        what, replaceable = "an empty folder", True
    else:
        what, replaceable = "a folder that is not a SavedModel", False
    if not replaceable:
        raise FileExistsError(
            f"OUT {target} already exists ({what}), and only a SavedModel or an empty folder may "
            "be replaced (even with --overwrite); give a new OUT (or --version)."
        )
    if not overwrite:
        raise FileExistsError(
            f"OUT {target} already exists ({what}); add --overwrite to replace it (the new model "
            "is verified before the old one goes), or give a new OUT (or --version)."
        )


def _is_tf_checkpoint(path: Path) -> bool:
    return Path(f"{path}.index").exists() or (path / "checkpoint").is_file()


def _describe_saved_model(path: Path) -> dict:
    _import_tensorflow()
    from jaxembed.export._inspect import describe_saved_model

    return describe_saved_model(path)


def _checkpoint_steps(path: Path) -> list[int]:
    """The complete steps of the jaxembed checkpoint directory ``path`` (none if not one)."""
    with je.checkpoint.CheckpointManager(path, None, create=False) as manager:
        return sorted(manager.all_steps())


def describe(path: Path) -> dict:
    """What ``path`` holds: a jaxembed checkpoint, a SavedModel or a TF checkpoint.

    A SavedModel base folder (version folders ``1/``, ``2/``, ... as TF Serving expects) is
    described by its latest version, the one TF Serving serves, with ``versions`` listing all.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is none of those, or a file in it cannot be read.
    """
    path = Path(path)
    if not path.exists() and not _is_tf_checkpoint(path):
        raise FileNotFoundError(
            f"{path} does not exist; give a jaxembed checkpoint directory, a SavedModel "
            "directory (or its base folder of versions) or a TF checkpoint prefix."
        )
    if is_saved_model(path):
        return _describe_saved_model(path)
    versions = saved_model_versions(path)
    if versions:
        info = _describe_saved_model(path / str(versions[-1]))
        return {**info, "base": str(path), "version": versions[-1], "versions": versions}
    if _is_tf_checkpoint(path):
        _import_tensorflow()
        from jaxembed.export._inspect import describe_tf_checkpoint

        return describe_tf_checkpoint(path)
    if path.is_dir():
        steps = _checkpoint_steps(path)
        if steps:
            config = je.checkpoint.read_config(path)
            return {"kind": "jaxembed checkpoint", "path": str(path), "steps": steps, **config}
        if path.name.isdigit() and _checkpoint_steps(path.parent):
            raise ValueError(
                f"{path} is one step of the checkpoint directory {path.parent}; give "
                f"{path.parent} (inspect lists its steps)."
            )
    what = "a folder without checkpoint steps, saved_model.pb or version folders"
    raise ValueError(
        f"{path} is not a jaxembed checkpoint directory, a SavedModel or a TF checkpoint "
        f"({what if path.is_dir() else 'a file'}); give the path of one of those."
    )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _print_inspection(info: dict) -> None:
    print(f"{info['kind']}: {info['path']}")
    if "versions" in info:
        print(
            f"  version {info['version']}: the latest of versions {info['versions']} in "
            f"{info['base']} (the one TF Serving serves)"
        )
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
            print(f"    {_feature_line(f)}")
        model = je.checkpoint.model_summary(info)
        if model is None:
            print(
                "  dense model: none (no dense model stored; `jaxembed export` writes tables only)"
            )
        else:
            size = (
                f"{_count(model['parameters'], 'parameter')} in {_count(model['arrays'], 'array')}"
            )
            print(
                f"  dense model: {model['apply']} kwargs={json.dumps(model['kwargs'])} ({size}; "
                "imported only by `jaxembed export`)"
            )
        return
    if info["kind"] == "SavedModel":
        _print_saved_model(info)
    else:
        _print_tf_checkpoint(info)
    print("  (raw variable keys: add --json)")


def _feature_line(f: dict) -> str:
    """``path -> table`` and the feature's options, from a checkpoint's config JSON."""
    extra = []
    if f.get("max_sequence_length"):
        extra.append(f"max_sequence_length={f['max_sequence_length']}")
    if f.get("output_shape") is not None:
        extra.append(f"output_shape={f['output_shape']}")
    vocabulary = f.get("vocabulary")
    if vocabulary is not None and vocabulary["kind"] == "hashing":
        extra.append(
            f"raw {vocabulary['key_dtype']} ids hashed into {vocabulary['num_bins']:,} rows"
        )
    elif vocabulary is not None:
        extra.append(
            f"raw {vocabulary['key_dtype']} ids: vocabulary of {len(vocabulary['keys']):,} keys "
            f"+ {vocabulary['num_oov_buckets']} OOV"
        )
    return f"{f['path']} -> {f['table']} {' '.join(extra)}".rstrip()


def _size(nbytes: int) -> str:
    """``640 B``, ``1.5 MiB``: bytes for people (exact below 10 KiB)."""
    if nbytes < 10 * 1024:
        return f"{nbytes:,} B"
    exponent = min(int(math.log(nbytes, 1024)), 4)
    return f"{nbytes / 1024**exponent:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[exponent]}"


def _optimizer(opt: dict | None) -> str:
    """``Adagrad(learning_rate=0.1, ...)`` from a checkpoint's optimizer record."""
    if not opt:
        return "none"
    args = ", ".join(f"{k}={v}" for k, v in opt.get("args", {}).items() if v is not None)
    return f"{opt['class']}({args})"


def _print_saved_model(info: dict) -> None:
    tables = info.get("tables") or {}
    if tables:
        print("  tables (as served):")
        for name, t in tables.items():
            saved = ""
            if t["float32_bytes"] and t["float32_bytes"] != t["bytes"]:
                saved = f" (float32: {_size(t['float32_bytes'])})"
            how = t["quantization"] or "float32"
            error = f", max abs error {t['max_abs_error']:.3g}" if t["max_abs_error"] else ""
            optimizer = info.get("optimizers", {}).get(name)
            trained = f"; trained with {_optimizer(optimizer)}" if optimizer else ""
            print(
                f"    {name}: {t['dtype']}{t['shape']} {_size(t['bytes'])}{saved} "
                f"{how}{error}{trained}"
            )
    config = (info.get("jaxembed") or {}).get("config") or {}
    if config.get("features"):
        print("  features:")
        for f in config["features"]:
            print(f"    {_feature_line(f)}")
    model = info.get("dense_model")
    if model is None:
        print("  dense model: none (serves the activations, one output per feature)")
    else:
        print(
            f"  dense model: {_count(model['parameters'], 'parameter')} in "
            f"{_count(model['arrays'], 'array')} ({_size(model['bytes'])}), as plain TF ops"
        )
    for key, sig in info.get("signatures", {}).items():
        print(f"  signature {key}:")
        for side in ("inputs", "outputs"):
            for name, spec in sig[side].items():
                print(f"    {side[:-1]:6} {name}: {spec['dtype']}{spec['shape']}")


def _print_tf_checkpoint(info: dict) -> None:
    roots = info.get("tables_by_root") or {}
    for root, tables in roots.items():
        print(f"  tables (root object {root!r}):")
        for name, t in tables.items():
            slots = ", ".join(f"{s} {v['dtype']}{v['shape']}" for s, v in t["slots"].items())
            optimizer = t["optimizer"] or "unknown optimizer"
            print(
                f"    {name}: {t['dtype']}{t['shape']} {_size(t['bytes'])}; "
                f"{optimizer} slots: {slots or 'none'}"
            )
    others = [k for k in info["variables"] if k.split("/")[0] not in roots]
    if others:
        names = ", ".join(sorted(k.split("/.ATTRIBUTES")[0] for k in others)[:5])
        more = "" if len(others) <= 5 else f", ... ({len(others)} in all)"
        print(f"  other variables: {names}{more}")


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxembed.demo.config import DemoConfig

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
    add(
        "--overwrite",
        action="store_true",
        help="if --out holds a previous demo run, delete that run's outputs (only the files the "
        "demo writes) and start clean; without it such an --out is refused",
    )
    add(
        "--resume",
        action="store_true",
        help="continue the demo run in --out from its latest checkpoint (tables, optimizer "
        "state, tower) up to --steps, with the same options; then export and plot again",
    )


def _run_demo(args: argparse.Namespace) -> None:
    from jaxembed.demo.config import (
        DemoConfig,
        check_options,
        check_previous_run,
        check_requirements,
    )

    if args.devices < 1:
        raise ValueError(f"--devices {args.devices} is out of range; give an integer >= 1.")
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
        overwrite=args.overwrite,
        resume=args.resume,
    )
    check_options(config)  # before JAX starts: a bad option fails fast
    check_requirements()  # and a missing optional package (TensorFlow, matplotlib) too
    check_previous_run(config)
    # Simulate devices on CPU so the sharded path runs; must happen before JAX starts its
    # backends (importing jax does not). GPUs and TPUs are used as they are.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
    from jaxembed.demo.run import run

    run(config)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_tensorflow_logs()  # TF_CPP_MIN_LOG_LEVEL=3 unless the user set it
    drop_xla_gc_callback_at_exit()  # no "Exception ignored in: _xla_gc_callback" after the end
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
    p_export.add_argument(
        "--tables-only",
        action="store_true",
        help="export the tables alone, even if the checkpoint stores a dense model (whose "
        "module is otherwise imported)",
    )
    p_export.add_argument(
        "--quantize",
        default=None,
        help="serving tables stored smaller: int8 (row-wise, FBGEMM's 8-bit layout), float16 or "
        "bfloat16 for every table of at least 1 MiB, or per table: users=int8,tags=float16",
    )
    p_inspect = sub.add_parser("inspect", help="what a checkpoint or SavedModel holds")
    p_inspect.add_argument("path", type=Path)
    p_inspect.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        with _absl_errors_only():
            _dispatch(args)
        sys.stdout.flush()  # a closed pipe fails here, not at exit
    except KeyboardInterrupt:
        parser.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # the reader of stdout went away (e.g. ``| head``): stop quietly
        with contextlib.suppress(OSError, ValueError):  # no flush error at exit either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        parser.exit(EXIT_BROKEN_PIPE)
    except USER_ERRORS as e:
        if os.environ.get("JAXEMBED_TRACEBACK"):
            raise
        parser.exit(EXIT_USER_ERROR, f"jaxembed {args.command}: error: {_one_line(e)}\n")
    return 0


def _quantize_option(text: str | None) -> str | dict[str, str | None] | None:
    """``--quantize``: ``int8`` (every table it pays for) or ``a=int8,b=float16`` (per table,
    ``none`` keeps one float32); the values are checked by ``ExportOptions``."""
    if text is None or "=" not in text:
        return text
    mapping: dict[str, str | None] = {}
    for part in filter(None, text.split(",")):
        table, sep, scheme = part.partition("=")
        if not sep or not table:
            raise ValueError(
                f"--quantize {text!r}: {part!r} is not TABLE=SCHEME; write e.g. "
                "--quantize users=int8,tags=float16 (or one scheme for every table: --quantize "
                "int8)."
            )
        mapping[table] = None if scheme.lower() == "none" else scheme
    return mapping


def _dispatch(args: argparse.Namespace) -> None:
    """Runs the parsed subcommand."""
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
            tables_only=args.tables_only,
            quantize=_quantize_option(args.quantize),
        )
    elif args.command == "inspect":
        info = describe(args.path)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            _print_inspection(info)


if __name__ == "__main__":
    raise SystemExit(main())
