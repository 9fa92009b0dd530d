"""The demo's options (``DemoConfig``), their checks, and the demo's own files in ``--out``.

Neither JAX's backends nor TensorFlow are touched here, so ``jaxembed demo`` rejects a bad
option in one line before anything heavy starts. Messages name options the way the command line
spells them (``--batch-size``); options without a flag are named ``DemoConfig.<field>``.

Re-running into an ``--out`` that holds a previous run is refused (its checkpoints would mix
into "latest"), unless ``overwrite`` is set: then the demo deletes only what it writes itself
(``OUTPUTS``), and only where a ``demo.log`` shows that ``jaxembed demo`` wrote that folder; or
unless ``resume`` is set: then training continues from the latest checkpoint there, and the
export, plot and metrics of the previous run are replaced.

``check_requirements`` makes sure the optional packages the demo needs (the ``demo`` extra:
TensorFlow to export and serve, matplotlib to plot) are installed before any work starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import shutil
from pathlib import Path

#: What the demo writes in ``--out`` (``saved_model/1`` is the one version it exports).
OUTPUTS = ("checkpoints", "saved_model/1", "training.png", "metrics.json", "demo.log")
#: The first line of every ``demo.log`` starts with this (it marks a folder as the demo's).
LOG_HEADER = "jaxembed demo"
_MAX_VOCAB = 2**31 - 1  # ids are int32 on the device
_CLI_OPTIONS = {
    "out",
    "steps",
    "batch_size",
    "examples",
    "users",
    "items",
    "dim",
    "eval_every",
    "movielens",
    "seed",
    "overwrite",
    "resume",
}
#: The optional packages the demo needs (all in the ``demo`` extra), and what for.
REQUIREMENTS = {
    "tensorflow": "to export and serve the SavedModel",
    "matplotlib": "to draw training.png",
}
INSTALL_HINT = (
    "install the demo extra: pip install 'jaxembed[demo]' (or pip install -e '.[demo]' in a "
    "clone; bash run.sh demo does it for you)"
)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes and knobs of the demo (the CLI's options); ``check_options`` validates them."""

    out: Path = Path("out")
    steps: int = 800
    batch_size: int = 1024
    examples: int = 400_000
    users: int = 20_000
    items: int = 10_000
    categories: int = 100
    dim: int = 16
    history_length: int = 8
    embedding_learning_rate: float = 0.1
    dense_learning_rate: float = 1e-3
    eval_every: int = 50
    eval_examples: int = 8192
    parity_examples: int = 512
    movielens: Path | None = None
    seed: int = 0
    overwrite: bool = False
    resume: bool = False


def option(field: str) -> str:
    """How messages name a ``DemoConfig`` field: ``--batch-size`` or ``DemoConfig.categories``."""
    return f"--{field.replace('_', '-')}" if field in _CLI_OPTIONS else f"DemoConfig.{field}"


def _check_int(config: DemoConfig, field: str, low: int, high: int | None = None) -> None:
    value = getattr(config, field)
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{option(field)} must be an integer {bound}, got {value!r}.")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{option(field)} {value} is out of range; give an integer {bound}.")


def _check_rate(config: DemoConfig, field: str) -> None:
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{option(field)} must be a positive number, got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{option(field)} {value} is out of range; give a finite number > 0.")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(
            f"--out {out} is an existing file, not a folder; give a folder path (new, or one a "
            "previous jaxembed demo wrote)."
        )
    for parent in out.parents:  # the nearest existing ancestor must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(
                    f"--out {out} lies under {parent}, which is a file; give a folder path."
                )
            break


def check_options(config: DemoConfig) -> None:
    """Validates every option that does not depend on the devices or the data.

    Raises:
        ValueError, TypeError: an option out of range (the message names it and the fix).
        FileExistsError, NotADirectoryError, FileNotFoundError: ``--out`` or ``--movielens``
            name something that cannot be used.
    """
    for field in ("steps", "batch_size", "examples", "categories", "dim", "history_length"):
        _check_int(config, field, 1)
    for field in ("eval_every", "eval_examples", "parity_examples"):
        _check_int(config, field, 1)
    for field in ("users", "items"):
        _check_int(config, field, 1, _MAX_VOCAB)
    _check_int(config, "seed", 0, 2**32 - 1)
    _check_rate(config, "embedding_learning_rate")
    _check_rate(config, "dense_learning_rate")
    _check_out(Path(config.out))
    if config.movielens is not None and not Path(config.movielens).is_dir():
        raise FileNotFoundError(
            f"--movielens {config.movielens} is not a folder; give the MovieLens "
            "ml-latest-small folder that holds ratings.csv and movies.csv."
        )


def check_devices(config: DemoConfig, devices: int) -> None:
    """The global batch and the evaluation batch must split evenly over ``devices``."""
    if config.batch_size % devices:
        example = max(devices, config.batch_size - config.batch_size % devices)
        raise ValueError(
            f"--batch-size {config.batch_size} does not split over the {devices} devices; give "
            f"a multiple of {devices} (e.g. {example}), or fewer --devices."
        )
    if config.eval_examples < devices:
        raise ValueError(
            f"{option('eval_examples')} {config.eval_examples} is fewer than the {devices} "
            f"devices the evaluation batch splits over; give at least {devices}."
        )


def check_data(config: DemoConfig, devices: int, train: int, test: int) -> None:
    """The training split must fill a batch, and the test split one example per device."""
    source = "the MovieLens data" if config.movielens else f"--examples {config.examples}"
    if train < config.batch_size:
        raise ValueError(
            f"--batch-size {config.batch_size} is larger than the {train} training impressions "
            f"of {source}; give a smaller --batch-size or more examples."
        )
    if test < devices:
        raise ValueError(
            f"{source} leaves {test} test impressions (10%), fewer than the {devices} devices "
            f"the evaluation batch splits over; give at least {10 * devices} examples."
        )


def previous_outputs(out: Path) -> list[str]:
    """The demo outputs (``OUTPUTS``) that already exist in ``out``."""
    return [name for name in OUTPUTS if (out / name).exists() or (out / name).is_symlink()]


def _written_by_demo(out: Path) -> bool:
    log = out / "demo.log"
    if not log.is_file():
        return False
    with open(log, encoding="utf-8", errors="replace") as f:
        return f.readline().startswith(LOG_HEADER)


def check_requirements() -> None:
    """Raises before any work if a package the demo needs (``REQUIREMENTS``) is missing.

    Raises:
        ModuleNotFoundError: naming every missing package, what it is for, and how to install it.
    """
    missing = [name for name in REQUIREMENTS if importlib.util.find_spec(name) is None]
    if missing:
        needs = "; ".join(f"{name} ({REQUIREMENTS[name]})" for name in missing)
        raise ModuleNotFoundError(
            f"jaxembed demo needs {needs}, which this Python ({_python()}) lacks; {INSTALL_HINT}.",
            name=missing[0],
        )


def _python() -> str:
    import sys

    return sys.executable


def checkpoint_steps(out: Path) -> list[int]:
    """The step folders in ``out/checkpoints`` (a quick look; the restore checks them)."""
    directory = Path(out) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isascii() and p.name.isdigit())


def _check_targets(out: Path, resume: bool) -> None:
    """The export target ``out/saved_model/1`` must be free, or with ``resume`` a SavedModel
    (the previous run's, replaced at the end): refused here, before any work."""
    from jaxembed._serving_dirs import is_saved_model

    base = out / "saved_model"
    if base.is_symlink() or (base.exists() and not base.is_dir()):
        raise FileExistsError(
            f"--out {out}: {base} is not a folder, so the SavedModel cannot be exported there; "
            "move it away or give a new --out."
        )
    target = base / "1"
    if not (target.exists() or target.is_symlink()):
        return
    if resume and target.is_dir() and not target.is_symlink() and is_saved_model(target):
        return
    raise FileExistsError(
        f"--out {out}: the export target {target} already exists and is not a SavedModel the "
        "demo wrote; move it away or give a new --out."
    )


def check_previous_run(config: DemoConfig) -> list[str]:
    """What a re-run into ``config.out`` would delete (``[]`` for a fresh folder, or to resume).

    Raises:
        FileExistsError: ``out`` holds demo outputs and neither ``overwrite`` nor ``resume`` is
            set, or one is set but no ``demo.log`` shows that the demo wrote them.
        FileNotFoundError: ``resume`` and ``out`` holds no checkpoint to resume from.
        ValueError: ``resume`` and ``overwrite`` together, or the latest checkpoint is already
            at ``--steps`` or beyond.
    """
    out = Path(config.out)
    found = previous_outputs(out)
    if config.resume:
        _check_resume(config, out)
        _check_targets(out, resume=True)
        return []
    if not found:
        _check_targets(out, resume=False)
        return []
    listing = ", ".join(found)
    if not config.overwrite:
        raise FileExistsError(
            f"--out {out} already holds a previous demo run ({listing}); give a new --out, add "
            "--resume to continue its training from the latest checkpoint, or add --overwrite "
            "to delete those demo outputs (and nothing else) and start clean."
        )
    if not _written_by_demo(out):
        raise FileExistsError(
            f"--out {out} holds {listing} but no demo.log from jaxembed demo, so --overwrite "
            "will not delete them; move them away or give a new --out."
        )
    if "saved_model/1" not in found:  # what --overwrite deletes need not be checked
        _check_targets(out, resume=False)
    return found


def clear_previous_run(out: Path, names: list[str]) -> str:
    """Deletes the demo outputs ``names`` in ``out`` (nothing else); returns a line saying so."""
    for name in names:
        path = out / name
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)  # a link is removed, never followed
        else:
            shutil.rmtree(path)
    saved_models = out / "saved_model"
    if saved_models.is_dir() and not saved_models.is_symlink() and not any(saved_models.iterdir()):
        saved_models.rmdir()
    return (
        f"--overwrite: started clean, deleted the previous demo run's {', '.join(names)} in "
        f"{out} (other files there are kept)"
    )


def _check_resume(config: DemoConfig, out: Path) -> None:
    if config.overwrite:
        raise ValueError(
            "--resume continues the run in --out and --overwrite deletes it; give one of them."
        )
    steps = checkpoint_steps(out)
    if not steps:
        raise FileNotFoundError(
            f"--resume: --out {out} holds no checkpoint to resume from (no step folders in "
            f"{out / 'checkpoints'}); run without --resume to start a new run there."
        )
    if not _written_by_demo(out):
        raise FileExistsError(
            f"--resume: --out {out} has checkpoints but no demo.log from jaxembed demo, so it "
            "is not a demo run to continue; give the --out of a demo run."
        )
    if steps[-1] >= config.steps:
        raise ValueError(
            f"--resume: the latest checkpoint in {out / 'checkpoints'} is step {steps[-1]}, "
            f"already at --steps {config.steps}; give a larger --steps (the total to reach)."
        )
