"""Checkpoints with orbax: tables and slots in logical row order, configs as metadata.

A checkpoint step directory holds two orbax items, plus ``extra`` (any pytree, e.g. optax
state) and ``model`` (a ``DenseModel``'s params) when they are saved:

* ``embedding``: ``{"tables": {name: [V, dim]}, "slots": {name: slots}, "step": int}``, every
  table-shaped array in **logical row order**, so a checkpoint written on 8 devices restores onto
  1, 2 or 64 (the physical layout of a mesh is rebuilt on restore). Saved and restored split
  over the table's devices (``Embedding.logical_arrays``): no device or host holds a whole
  sharded table, and each process writes and reads its own part;
* ``config``: JSON describing the tables (name, vocabulary_size, dim, combiner, optimizer class
  and hyperparameters) and the features, enough to rebuild the configs without the training code;
  with a ``DenseModel``, also its import path (``"package.module:attribute"``), its JSON kwargs
  and the structure, shapes and dtypes of its params (``"model"``);
* ``model``: the ``DenseModel``'s params, so ``jaxembed export`` serves the whole model from the
  checkpoint alone (``restore_model``; ``DenseModel.resolve`` imports the named module, which
  runs its code as any import does: nothing is pickled).

Orbax writes each step to a temporary directory and renames it when complete, so an interrupted
save never looks like a finished step. Nothing is pickled.

Failure modes (each one an error naming the step, table, path or holder, and the fix):

* **One writer per directory.** A manager's first ``save`` takes the directory's lock file
  (``.jaxembed-writer.lock``: pid, host, start time; created atomically) and holds it until
  ``close()``, the end of its ``with`` block, garbage collection or interpreter exit. A second
  writer (another process, or another manager or ``save`` in this process) gets
  ``CheckpointLockedError`` naming the holder. A lock whose holder died on this host is taken
  over with a ``RuntimeWarning``. Readers (``restore``, ``read_config``, ``latest_step``) take no
  lock. In a multi-process JAX job only process 0 takes the lock, for the whole job.
* **Checksums.** Every saved array (each table, each slot, the step, each leaf of ``extra``
  and of a ``DenseModel``'s params) gets a checksum in the step's ``config`` JSON
  (``"checksums"``): a position-weighted sum of hashed bit patterns, computed with ``jnp`` under
  ``jit`` on the sharded arrays (nothing gathered to one host; small arrays held by this process
  with numpy, bit for bit the same) and independent of the device count (``checksums``).
  ``restore`` and ``restore_model`` verify them; a mismatch, or files that are missing,
  truncated or cannot be decoded, raise ``CheckpointCorruptedError`` naming the step and the
  table (or file). With ``step=None`` the error also names the newest older step that restores
  intact; nothing falls back silently.
* **Steps.** A step is a non-negative integer; a step that exists is never overwritten
  (``StepExistsError``); a state that does not fit the ``Embedding`` is refused before anything
  is written.
* **Deletion.** ``max_to_keep`` (a positive int, or None to keep all) only ever deletes step
  directories jaxembed wrote (their ``config`` says ``jaxembed/...``), by an atomic rename into
  ``.jaxembed-deleted/`` first, so a kill mid-deletion never leaves a half-deleted step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import json
import os
import re
import shutil
import socket
import sys
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock file alone keeps writers apart
    fcntl = None  # type: ignore[assignment]

from jaxembed import _nest, vocabulary
from jaxembed._checksums import CHECKSUM_ALGORITHM, checksums
from jaxembed.configs import FeatureConfig, QuantizationConfig, TableConfig
from jaxembed.dense_model import DenseModel as DenseModel  # public here: je.checkpoint.DenseModel
from jaxembed.dense_model import check_model, params_from_structure, plain_params
from jaxembed.dense_model import model_summary as model_summary  # je.checkpoint.model_summary
from jaxembed.embedding import Embedding, EmbeddingState

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointLockedError",
    "CheckpointManager",
    "CheckpointWriteError",
    "DenseModel",
    "StepExistsError",
    "config_metadata",
    "feature_config_from",
    "latest_step",
    "model_summary",
    "optimizer_config",
    "read_config",
    "restore",
    "restore_model",
    "save",
]

_ITEMS = ("embedding", "config", "extra", "model")
_LOCK_FILE = ".jaxembed-writer.lock"
_TRASH_DIR = ".jaxembed-deleted"


class CheckpointError(Exception):
    """Base class of the errors this module raises about a checkpoint directory or step."""


class CheckpointLockedError(CheckpointError, OSError):
    """Another writer owns the checkpoint directory; the message names it and the fix."""


class StepExistsError(CheckpointError, ValueError):
    """The step already exists in the directory; steps are never overwritten."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a step failed (e.g. disk full); nothing was committed for that step."""


class CheckpointCorruptedError(CheckpointError, ValueError):
    """A step is damaged: a checksum differs, or a file is missing, truncated or undecodable.

    Attributes:
        directory: the checkpoint directory.
        step: the damaged step.
        damaged: what is damaged, e.g. ``["table 'a'", "slot 'accumulators' of table 'b'"]``.
    """

    def __init__(self, message: str, *, directory: str, step: int, damaged: Sequence[str]):
        super().__init__(message)
        self.directory = directory
        self.step = step
        self.damaged = list(damaged)


# -- argument and state validation --


def _is_integer(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    dtype = getattr(value, "dtype", None)  # a 0-d integer array, e.g. state.step
    return dtype is not None and np.ndim(value) == 0 and np.issubdtype(dtype, np.integer)


def _check_step(step: Any) -> int:
    """``step`` as an int; a ValueError unless it is a non-negative integer."""
    if not _is_integer(step):
        raise ValueError(
            f"Checkpoint step must be a non-negative integer, got {step!r} "
            f"({type(step).__name__}); pass an int such as int(state.step)."
        )
    value = int(step)
    if value < 0:
        raise ValueError(
            f"Checkpoint step must be a non-negative integer, got {value}; steps name the step "
            "directories, so use the training step count (0 or more)."
        )
    return value


def _check_positive(name: str, value: Any, *, none_means: str | None = None) -> None:
    if value is None and none_means is not None:
        return
    if not _is_integer(value) or int(value) < 1:
        allowed = f" or None ({none_means})" if none_means else ""
        zero = name == "max_to_keep" and _is_integer(value) and int(value) == 0
        why = " (0 would delete every step, even the one just saved)" if zero else ""
        raise ValueError(f"`{name}` must be a positive integer{allowed}, got {value!r}{why}.")


def _describe(leaf: Any) -> str:
    return f"shape {tuple(np.shape(leaf))} and dtype {getattr(leaf, 'dtype', type(leaf).__name__)}"


def _check_state(emb: Embedding, state: Any) -> None:
    """Raises a ValueError naming the table and what differs if ``state`` is not ``emb``'s."""
    try:
        emb.check_state(state)
    except TypeError as err:
        raise ValueError(str(err)) from None
    if np.shape(state.step) != () or not _is_integer(state.step):
        raise ValueError(
            f"The state's step must be an integer scalar, got {_describe(state.step)}; save the "
            "state this Embedding built."
        )


def _leaf_label(name: str) -> str:
    """How messages name a checksummed leaf: ``tables/a`` -> ``table 'a'``."""
    kind, _, rest = name.partition("/")
    if kind == "tables":
        return f"table {rest!r}"
    if kind == "slots":
        table, _, slot = rest.partition("/")
        return f"slot {slot!r} of table {table!r}" if slot else f"slots of table {table!r}"
    if kind == "extra":
        return f"extra item {rest!r}"
    if kind == "model":
        return f"dense model parameter {rest!r}"
    return "the step counter" if name == "step" else repr(name)


# -- directory ownership --


def _process_start(pid: int) -> str | None:
    """``pid``'s start time from /proc (Linux), ``"zombie"`` for an exited process, else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # fields 3.. of proc(5)
    return "zombie" if fields[0] in ("Z", "X") else fields[19]


def _pid_alive(pid: int, started: str | None) -> bool:
    """Whether ``pid`` runs on this host and is the process that wrote ``started``."""
    if os.name == "nt":  # signal 0 is CTRL_C_EVENT there: never probe, assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start(pid)
    if now == "zombie":
        return False
    return started is None or now is None or now == started


@contextlib.contextmanager
def _directory_guard(directory: str) -> Iterator[None]:
    """Serializes lock acquisition among the processes of this host (flock on the directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY) if fcntl is not None else -1
    except OSError:
        fd = -1
    if fd < 0:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # best effort: some file systems have no flock
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


_HELD_TOKENS: set[str] = set()  # locks held by live objects of this process


class _DirectoryLock:
    """The lock file that makes one writer own a checkpoint directory."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, _LOCK_FILE)
        self.token: str | None = None

    @property
    def held(self) -> bool:
        return self.token is not None

    def _read(self) -> dict | None:
        """The holder's record; None if there is no lock file; ``{}`` if it is unreadable."""
        try:
            with open(self.path) as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _create(self, token: str) -> bool:
        """Creates the lock file holding this process's record; False if it exists."""
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "started": _process_start(os.getpid()),
            "command": " ".join(sys.argv)[:200],
            "token": token,
        }
        tmp = f"{self.path}.{token}.tmp"
        with open(tmp, "x") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)  # atomic, and the lock appears with its content
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: an exclusive create instead
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            return True
        finally:
            os.unlink(tmp)

    def _holder(self, record: dict) -> str:
        if not record:
            return f"an unknown writer (the lock file {self.path} is unreadable)"
        command = f" ({record['command']})" if record.get("command") else ""
        return (
            f"pid {record.get('pid')}{command} on host {record.get('host')!r} since "
            f"{record.get('since')}"
        )

    def _is_stale(self, record: dict) -> bool:
        """Whether the holder is gone: a dead process of this host (or an unclosed object here)."""
        if not record or record.get("host") != socket.gethostname():
            return False
        pid = record.get("pid")
        if not isinstance(pid, int):
            return False
        if pid == os.getpid():
            return record.get("token") not in _HELD_TOKENS
        return not _pid_alive(pid, record.get("started"))

    def _locked_error(self, record: dict) -> CheckpointLockedError:
        if record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
            return CheckpointLockedError(
                f"Checkpoint directory {self.directory} is owned by another CheckpointManager "
                f"(or save) of this process ({self._holder(record)}); close() it, or leave its "
                "`with` block, before saving here, or save through that manager."
            )
        return CheckpointLockedError(
            f"Checkpoint directory {self.directory} is owned by another writer, "
            f"{self._holder(record)}, and two writers would mix their steps; stop that writer "
            f"or save into another directory (if that process is gone for good, delete "
            f"{self.path})."
        )

    def acquire(self) -> None:
        """Takes the lock; CheckpointLockedError naming the holder if another writer has it."""
        os.makedirs(self.directory, exist_ok=True)
        token = uuid.uuid4().hex
        with _directory_guard(self.directory):
            for _ in range(3):
                if self._create(token):
                    self.token = token
                    _HELD_TOKENS.add(token)
                    return
                record = self._read()
                if record is None:  # released meanwhile
                    continue
                if not self._is_stale(record):
                    raise self._locked_error(record)
                warnings.warn(
                    f"Taking over the checkpoint directory {self.directory} from "
                    f"{self._holder(record)}, which is no longer running (killed or crashed); "
                    "a step it did not finish was never committed.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        raise self._locked_error(self._read() or {})

    def verify(self) -> None:
        """CheckpointLockedError unless the lock file still names this holder."""
        record = self._read()
        if record is None or record.get("token") != self.token:
            raise CheckpointLockedError(
                f"This manager no longer owns checkpoint directory {self.directory}: its lock "
                f"file was removed or replaced (now {self._holder(record or {})}); stop the "
                "other writer, then open a new CheckpointManager."
            )

    def release(self) -> None:
        """Removes the lock file if it is still this holder's (safe to call more than once)."""
        token, self.token = self.token, None
        if token is None:
            return
        _HELD_TOKENS.discard(token)
        record = self._read()
        if record is not None and record.get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _written_by_jaxembed(directory: str, step: int) -> bool:
    """Whether step directory ``step`` holds a jaxembed config (so jaxembed wrote it)."""
    try:
        with open(os.path.join(directory, str(step), "config", "metadata")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and str(config.get("format", "")).startswith("jaxembed/")


def _remove_unfinished(directory: str) -> None:
    """Deletes the temporary step directories of saves that never finished (killed writers).

    Only called while holding the directory lock, so no live writer owns them.
    """
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir() and entry.name.split(".", 1)[-1].startswith("orbax-checkpoint-tmp"):
                shutil.rmtree(entry.path, ignore_errors=True)


@dataclasses.dataclass
class _KeepNewestOwned:
    """Orbax preservation policy: keep the newest ``n`` steps jaxembed wrote, and every other
    step directory (one jaxembed did not write is never deleted)."""

    n: int
    owned: Callable[[int], bool]

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        del context
        own = sorted(c.step for c in checkpoints if self.owned(c.step))
        drop = set(own[: max(0, len(own) - self.n)])
        return [c.step not in drop for c in checkpoints]


def _is_orbax_read_leftover(unraisable: Any) -> bool:
    """Whether an "Exception ignored" report is the noise of a read that orbax abandoned.

    When one array of a restore fails, orbax gives up on its other reads: their coroutines are
    closed when garbage collected (each reporting its wrapped ``GeneratorExit``), and
    TensorStore's late completions find orbax's event loop closed.
    """
    obj, exc = unraisable.object, unraisable.exc_value
    if inspect.iscoroutine(obj):
        return f"{os.sep}orbax{os.sep}" in obj.cr_code.co_filename
    return obj is None and isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _quiet_abandoned_reads() -> None:
    """Installs (once) an unraisable hook that drops only ``_is_orbax_read_leftover`` reports.

    Called before every read of an item, so that when a read fails the one clear error this
    module raises is not followed by pages of orbax internals: at some later garbage
    collection, or at once (TensorStore's completions can find the loop closed before the
    failure reaches this module).
    """
    previous = sys.unraisablehook
    if getattr(previous, "_jaxembed_filter", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_orbax_read_leftover(unraisable):
            previous(unraisable)

    hook._jaxembed_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text.split(" See full TensorStore details")[0]  # then a repr of the whole spec
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    # Callables (schedules, slot creation functions) cannot be stored; their kind is recorded.
    return f"<{type(value).__name__}>"


def optimizer_config(optimizer: Any) -> dict | None:
    """The optimizer's class and hyperparameters as JSON-able data (None without one).

    Example:
        >>> import jaxembed as je
        >>> cfg = je.checkpoint.optimizer_config(je.optimizers.SGD(0.1))
        >>> cfg["class"], cfg["args"]["learning_rate"]
        ('SGD', 0.1)
    """
    if optimizer is None:
        return None
    args = {k: _json_value(v) for k, v in optimizer.hyperparameters().items()}
    return {"class": type(optimizer).__name__, "args": args}


def config_metadata(emb: Embedding) -> dict:
    """What a checkpoint records about ``emb``'s configs.

    Example:
        >>> import jaxembed as je
        >>> table = je.TableConfig(10, 4, name="items")
        >>> meta = je.checkpoint.config_metadata(je.Embedding({"items": je.FeatureConfig(table)}))
        >>> [(t["name"], t["vocabulary_size"], t["dim"]) for t in meta["tables"]]
        [('items', 10, 4)]
    """
    tables = [
        {
            "name": name,
            "vocabulary_size": table.vocabulary_size,
            "dim": table.dim,
            "combiner": table.combiner,
            "optimizer": optimizer_config(emb.optimizers[name]),
            "quantization_config": (
                None
                if table.quantization_config is None
                else dataclasses.asdict(table.quantization_config)
            ),
        }
        for table, name in emb.table_names.items()
    ]
    features = [
        {
            "path": path,
            "table": emb.table_names[feature.table],
            "max_sequence_length": feature.max_sequence_length,
            "validate_weights_and_indices": feature.validate_weights_and_indices,
            "output_shape": None if feature.output_shape is None else list(feature.output_shape),
            "name": feature.name,
            "out_of_range": feature.out_of_range,
            "vocabulary": vocabulary.to_json(feature.vocabulary),
        }
        for path, feature in emb.features.items()
    ]
    return {
        "format": "jaxembed/1",
        "tables": tables,
        "features": features,
        "structure": _encode_structure(emb.feature_config),
    }


def _encode_structure(tree: Any, path: str = "") -> Any:
    """The nesting of a feature_config as JSON: containers kept, each leaf its feature path."""

    def sub(key: str) -> str:
        return f"{path}/{key}" if path else key

    if isinstance(tree, Mapping):
        return {"dict": {str(k): _encode_structure(v, sub(str(k))) for k, v in tree.items()}}
    if isinstance(tree, tuple) and hasattr(type(tree), "_fields"):
        fields = list(getattr(type(tree), "_fields"))  # noqa: B009
        values = [_encode_structure(v, sub(f)) for f, v in zip(fields, tree, strict=True)]
        return {"namedtuple": fields, "values": values}
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {kind: [_encode_structure(v, sub(str(i))) for i, v in enumerate(tree)]}
    return {"feature": path}


def _decode_structure(node: dict, leaf: Any) -> Any:
    return _nest.from_json(node, lambda n: leaf(n["feature"]))


def read_config(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The configs a checkpoint step recorded (latest step if None), without an ``Embedding``.

    The result is ``config_metadata``'s JSON with the ``step`` added (and, for checkpoints
    written since checksums exist, the ``checksums`` of the saved arrays).

    Raises:
        FileNotFoundError: no complete checkpoint (or no such step) in ``directory``.
        CheckpointCorruptedError: the step's config file is missing or damaged.

    Example:
        >>> import jax, tempfile, jaxembed as je
        >>> emb = je.Embedding({"items": je.FeatureConfig(je.TableConfig(10, 4, name="items"))})
        >>> path = tempfile.mkdtemp()
        >>> je.checkpoint.save(path, emb, emb.init(jax.random.key(0)), step=2)
        >>> cfg = je.checkpoint.read_config(path)
        >>> cfg["step"], cfg["tables"][0]["name"], cfg["tables"][0]["combiner"]
        (2, 'items', 'mean')
    """
    with CheckpointManager(directory, None, create=False) as manager:
        step = manager._resolve_step(step)
        config = manager._read_config(step)
    return {**config, "step": step}


def feature_config_from(config: dict) -> Any:
    """Rebuilds the nested ``FeatureConfig``s of ``read_config``'s result.

    Tables get their saved name, shape, combiner and quantization config, TF's default
    initializer and no optimizer (a learning-rate schedule cannot be stored): enough to restore
    and serve the tables.

    Example:
        >>> import jax, tempfile, jaxembed as je
        >>> trained = je.Embedding({"ads": je.FeatureConfig(je.TableConfig(8, 2, name="ads"))})
        >>> path = tempfile.mkdtemp()
        >>> je.checkpoint.save(path, trained, trained.init(jax.random.key(0)), step=1)
        >>> features = je.checkpoint.feature_config_from(je.checkpoint.read_config(path))
        >>> features["ads"].table.vocabulary_size, features["ads"].table.dim
        (8, 2)
        >>> served = je.checkpoint.restore(path, je.Embedding(features), tables_only=True)
        >>> served.tables["ads"].shape
        (8, 2)
    """
    tables = {
        t["name"]: TableConfig(
            t["vocabulary_size"],
            t["dim"],
            combiner=t["combiner"],
            name=t["name"],
            quantization_config=QuantizationConfig(**t["quantization_config"])
            if t.get("quantization_config")
            else None,
        )
        for t in config["tables"]
    }
    features = {
        f["path"]: FeatureConfig(
            tables[f["table"]],
            max_sequence_length=f["max_sequence_length"],
            validate_weights_and_indices=f["validate_weights_and_indices"],
            output_shape=f["output_shape"],
            name=f["name"],
            out_of_range=f.get("out_of_range", "error"),
            vocabulary=vocabulary.from_json(f.get("vocabulary")),
        )
        for f in config["features"]
    }
    if "structure" in config:
        return _decode_structure(config["structure"], features.__getitem__)
    return _nest_from_paths(features)


def _nest_from_paths(features: dict[str, Any]) -> Any:
    """Nested dicts from ``/``-joined paths (checkpoints written before ``structure`` existed)."""
    if list(features) == [""]:
        return features[""]
    root: dict = {}
    for path, feature in features.items():
        *parents, last = path.split("/")
        node = root
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = feature
    return root


def _logical_tree(emb: Embedding, state: EmbeddingState) -> dict:
    """What ``save`` writes: logical row order, each table split over the mesh's devices."""
    tables, slots = emb.logical_arrays(state)
    return {"tables": tables, "slots": slots, "step": state.step}


def _restore_target(emb: Embedding) -> dict:
    """The logical tree ``save`` writes, as shapes split over ``emb``'s mesh as
    ``Embedding.logical_arrays`` splits them: each process reads only its devices' rows."""

    def struct(name: str, shape: tuple, dtype: Any = np.float32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=emb.logical_sharding(name, shape))

    tables, slots = {}, {}
    for table, name in emb.table_names.items():
        tables[name] = struct(name, (table.vocabulary_size, table.dim))
        opt = emb.optimizers[name]
        shapes = jax.eval_shape(opt.init_slots, tables[name]) if opt is not None else {}
        slots[name] = jax.tree.map(lambda x, n=name: struct(n, x.shape, x.dtype), shapes)
    replicated = jax.sharding.NamedSharding(emb.mesh, jax.sharding.PartitionSpec())
    return {
        "tables": tables,
        "slots": slots,
        "step": jax.ShapeDtypeStruct((), np.int32, sharding=replicated),
    }


def save(
    directory: str | os.PathLike,
    emb: Embedding,
    state: EmbeddingState,
    step: int,
    *,
    model: DenseModel | None = None,
) -> None:
    """Writes ``state`` (logical row order) and ``emb``'s configs as checkpoint ``step``.

    With ``model`` (a ``DenseModel``), its import path, kwargs and params are saved too, so
    ``jaxembed export`` serves the whole model (``restore_model`` reads it back). Holds the
    directory's writer lock while it writes (see ``CheckpointManager``).

    Raises:
        ValueError: ``step`` is not a non-negative integer, ``state`` does not fit ``emb``, or
            ``model``'s target does not import here (checked before anything is written).
        TypeError: ``model`` is not a ``DenseModel``, or its target is neither a function nor a
            ``flax.linen.Module`` subclass.
        StepExistsError: ``step`` is already in ``directory`` (steps are never overwritten).
        CheckpointLockedError: another writer owns ``directory``.
        CheckpointWriteError: the write failed; the step was not committed.

    Example:
        >>> import jax, tempfile, jaxembed as je
        >>> table = je.TableConfig(10, 4, name="items")
        >>> emb = je.Embedding({"items": je.FeatureConfig(table)}, je.optimizers.Adagrad(0.1))
        >>> state = emb.init(jax.random.key(0))
        >>> path = tempfile.mkdtemp()
        >>> je.checkpoint.save(path, emb, state, step=1)
        >>> restored = je.checkpoint.restore(path, emb)
        >>> bool((restored.tables["items"] == state.tables["items"]).all())
        True
    """
    with CheckpointManager(directory, emb, max_to_keep=None, async_save=False) as manager:
        manager.save(step, state, model=model, force=True)


def _slot_kind(optimizer: dict | None) -> tuple:
    """What decides whether saved slots fit: the optimizer class, and FTRL's linears mode.

    Other hyperparameters (e.g. the learning rate) may change between runs.
    """
    if optimizer is None:
        return (None,)
    mode = optimizer["args"].get("multiply_linear_by_learning_rate")
    return (optimizer["class"], mode)


def _check_config(saved: dict, emb: Embedding, slots_needed: bool) -> None:
    """Raises a ValueError naming the table and both values for any mismatch."""
    mine = {t["name"]: t for t in config_metadata(emb)["tables"]}
    theirs = {t["name"]: t for t in saved["tables"]}
    if set(mine) != set(theirs):
        raise ValueError(
            f"Checkpoint tables {sorted(theirs)} do not match the Embedding's tables "
            f"{sorted(mine)}: table names must be the same."
        )
    _check_vocabularies(saved, emb)
    for name, t in mine.items():
        for key in ("vocabulary_size", "dim"):
            if t[key] != theirs[name][key]:
                raise ValueError(
                    f"Table {name!r}: checkpoint has {key}={theirs[name][key]}, the Embedding "
                    f"has {key}={t[key]}."
                )
        if slots_needed and _slot_kind(t["optimizer"]) != _slot_kind(theirs[name]["optimizer"]):
            raise ValueError(
                f"Table {name!r}: checkpoint optimizer {theirs[name]['optimizer']} differs from "
                f"the Embedding's {t['optimizer']}. Pass reinit_slots=True to keep the tables "
                "and start fresh slots, or tables_only=True."
            )


def _check_vocabularies(saved: dict, emb: Embedding) -> None:
    """The rows of a table mean the ids its features' vocabularies map to them: a restore must
    keep every feature's vocabulary."""
    theirs = {f["path"]: f.get("vocabulary") for f in saved["features"]}
    for path, feature in emb.features.items():
        mine = vocabulary.to_json(feature.vocabulary)
        if path in theirs and theirs[path] != mine:
            describe = lambda v: "none" if v is None else v["kind"]  # noqa: E731
            raise ValueError(
                f"Feature {path!r}: the checkpoint was trained with vocabulary "
                f"{describe(theirs[path])} ({_vocabulary_summary(theirs[path])}), the Embedding "
                f"has {describe(mine)} ({_vocabulary_summary(mine)}); the table rows would mean "
                "other ids. Build the Embedding from the checkpoint's configs: "
                "je.checkpoint.feature_config_from(je.checkpoint.read_config(directory))."
            )


def _vocabulary_summary(data: dict | None) -> str:
    if data is None:
        return "ids are rows"
    if data["kind"] == "hashing":
        return f"{data['num_bins']} bins, {data['key_dtype']} ids"
    return f"{len(data['keys'])} {data['key_dtype']} keys, {data['num_oov_buckets']} OOV buckets"


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete step in ``directory`` (None if there is none).

    Example:
        >>> import jax, tempfile, jaxembed as je
        >>> emb = je.Embedding({"items": je.FeatureConfig(je.TableConfig(10, 4, name="items"))})
        >>> path = tempfile.mkdtemp()
        >>> print(je.checkpoint.latest_step(path))
        None
        >>> je.checkpoint.save(path, emb, emb.init(jax.random.key(0)), step=7)
        >>> je.checkpoint.latest_step(path)
        7
    """
    with CheckpointManager(directory, None, create=False) as manager:
        return manager.latest_step()


def restore(
    directory: str | os.PathLike,
    emb: Embedding,
    step: int | None = None,
    *,
    tables_only: bool = False,
    reinit_slots: bool = False,
) -> EmbeddingState:
    """Restores checkpoint ``step`` (the latest complete one if None) onto ``emb``'s mesh.

    Args:
        directory: the checkpoint directory given to ``save``.
        emb: the ``Embedding`` to restore into; its mesh and device count may differ from the
            ones that saved.
        step: which step; None for the latest.
        tables_only: restore the tables only (e.g. for serving); slots start fresh (or empty
            without an optimizer).
        reinit_slots: restore the tables and start fresh slots, e.g. after changing optimizer.

    Raises:
        FileNotFoundError: no complete checkpoint in ``directory``.
        ValueError: the checkpoint does not match ``emb`` (table names, shapes, or optimizer
            unless ``tables_only``/``reinit_slots``), naming the table and both values.
        CheckpointCorruptedError: the step is damaged (a checksum differs, or a file is
            missing, truncated or undecodable), naming the step and the table or file; with
            ``step=None`` it also names the newest older step that restores intact.

    Example:
        >>> import jax, tempfile, jaxembed as je
        >>> table = je.TableConfig(10, 4, name="items")
        >>> emb = je.Embedding({"items": je.FeatureConfig(table)}, je.optimizers.Adagrad(0.1))
        >>> path = tempfile.mkdtemp()
        >>> je.checkpoint.save(path, emb, emb.init(jax.random.key(0)), step=3)
        >>> state = je.checkpoint.restore(path, emb)  # the latest step, 3
        >>> state.tables["items"].shape, list(state.slots["items"])
        ((10, 4), ['accumulators'])
        >>> fresh = je.checkpoint.restore(path, emb, tables_only=True)  # slots start fresh
    """
    with CheckpointManager(directory, emb, create=False) as manager:
        state, _ = manager.restore(step, tables_only=tables_only, reinit_slots=reinit_slots)
    return state


def restore_model(
    directory: str | os.PathLike, step: int | None = None, *, sharding: Any = None
) -> DenseModel | None:
    """The ``DenseModel`` saved with checkpoint ``step`` (latest if None), or None.

    Imports nothing: call ``.resolve()`` on the result for the apply function (which imports
    the module named in the checkpoint). See ``CheckpointManager.restore_model``.

    Example:
        >>> import jax, tempfile, jaxembed as je
        >>> table = je.TableConfig(10, 4, name="items")
        >>> emb = je.Embedding({"items": je.FeatureConfig(table)})
        >>> path = tempfile.mkdtemp()
        >>> je.checkpoint.save(path, emb, emb.init(jax.random.key(0)), step=1)
        >>> je.checkpoint.restore_model(path) is None  # saved without a model
        True
    """
    with CheckpointManager(directory, None, create=False) as manager:
        return manager.restore_model(step, sharding=sharding)


class CheckpointManager:
    """Checkpoints for a training loop: keep the last N, save every K steps, save asynchronously.

    Each step directory holds the embedding state (logical row order), the configs and, if
    given, the dense model (a ``DenseModel``: import path, kwargs and params, which
    ``jaxembed export`` serves with the tables) and an ``extra`` pytree such as optax state.
    Asynchronous
    saves return as soon as the arrays are copied off the device; ``wait_until_finished`` (and
    leaving a ``with`` block) waits for the writes.

    Writing takes ownership of ``directory``: the first ``save`` creates its lock file
    (``.jaxembed-writer.lock``: pid, host, start time) and ``close()`` (or leaving the ``with``
    block, garbage collection, interpreter exit) removes it. Meanwhile any other writer fails
    with ``CheckpointLockedError`` naming this one; a lock left by a process of this host that
    died is taken over with a ``RuntimeWarning``. A manager that only restores takes no lock. In
    a multi-process JAX job process 0 holds the lock for every process of the job.

    Args:
        directory: where step directories are written.
        emb: the ``Embedding`` whose state is saved.
        max_to_keep: how many recent steps to keep: a positive int, or None to keep all. Only
            step directories jaxembed wrote are ever deleted (first renamed into
            ``.jaxembed-deleted/``, so a kill mid-deletion never leaves half a step).
        save_interval_steps: ``save`` only writes steps that are multiples of this (unless
            ``force``).
        async_save: write in the background.
        create: create ``directory`` if missing.

    Raises:
        ValueError: ``max_to_keep`` or ``save_interval_steps`` is not a positive integer.

    Example:
        >>> import jax, tempfile, jaxembed as je
        >>> table = je.TableConfig(10, 4, name="items")
        >>> emb = je.Embedding({"items": je.FeatureConfig(table)}, je.optimizers.SGD(0.1))
        >>> state, params = emb.init(jax.random.key(0)), {"w": jax.numpy.ones(3)}
        >>> with je.checkpoint.CheckpointManager(tempfile.mkdtemp(), emb, max_to_keep=2) as ckpt:
        ...     for step in range(4):
        ...         _ = ckpt.save(step, state, extra=params)
        ...     ckpt.wait_until_finished()
        ...     sorted(ckpt.all_steps())
        [2, 3]
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        emb: Embedding | None,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        create: bool = True,
    ):
        _check_positive("max_to_keep", max_to_keep, none_means="keep every step")
        _check_positive("save_interval_steps", save_interval_steps)
        self.directory = os.path.abspath(directory)
        self.emb = emb
        self._written: set[int] = set()  # steps this manager saved (its own, even in flight)
        self._lock: _DirectoryLock | None = None
        self._owned = False
        policy = None
        if max_to_keep is not None:
            owned = _StepOwnership(self.directory, self._written)
            policy = _KeepNewestOwned(int(max_to_keep), owned)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=int(save_interval_steps),
                enable_async_checkpointing=async_save,
                create=create,
                preservation_policy=policy,  # type: ignore[arg-type]
                todelete_subdir=_TRASH_DIR if policy is not None else None,
            ),
            item_names=_ITEMS,
        )

    # -- writing --
    def save(
        self,
        step: int,
        state: EmbeddingState,
        *,
        extra: Any = None,
        model: DenseModel | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` (and ``extra``, and ``model``) as ``step``; returns whether a save
        was started.

        ``model`` is a ``DenseModel``: its import path and kwargs go into the step's config and
        its params into the ``model`` item, so ``jaxembed export`` serves the whole model;
        ``extra`` is any other pytree (e.g. optax state). ``step`` must be new: an existing step
        raises ``StepExistsError``, and a step older than the latest one raises a ValueError
        unless ``force`` (which also ignores ``save_interval_steps``). The state is checked
        against the Embedding, ``model``'s target is imported, and the directory lock taken,
        before anything is written. Checksums of every array go into the step's config. Errors
        as ``save``.
        """
        step = _check_step(step)
        emb = self._embedding()
        _check_state(emb, state)
        if model is not None:
            model = check_model(model)
        self._own_directory()
        self.wait_until_finished()  # the previous save, and its deletions, are complete
        self._empty_trash()
        self._check_new_step(step, force)
        if not force and not self._manager.should_save(step):
            return False
        tree = _logical_tree(emb, state)
        arrays = checksums(tree)
        if extra is not None:
            arrays.update(checksums({"extra": extra}))
        config = {
            **config_metadata(emb),
            "checksums": {"algorithm": CHECKSUM_ALGORITHM, "arrays": arrays},
        }
        items = {
            "embedding": ocp.args.PyTreeSave(tree),
            "config": ocp.args.JsonSave(config),
        }
        if extra is not None:
            items["extra"] = ocp.args.PyTreeSave(extra)
        if model is not None:
            params = plain_params(model.params)
            arrays.update(checksums({"model": params}))
            config["model"] = model.metadata()
            if jax.tree.leaves(params):  # a model without params has nothing to write
                items["model"] = ocp.args.PyTreeSave(params)
        self._written.add(step)
        try:
            return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))
        except Exception as err:
            raise CheckpointWriteError(
                f"Could not write checkpoint step {step} to {self.directory} ({_short(err)}); "
                "the step was not committed: fix the cause (disk space, permissions, the extra "
                "pytree) and save it again."
            ) from err

    def _check_new_step(self, step: int, force: bool) -> None:
        steps = self._manager.all_steps()
        if step in steps:
            raise StepExistsError(
                f"Checkpoint step {step} already exists in {self.directory} and steps are never "
                f"overwritten; save under a new step, or delete "
                f"{os.path.join(self.directory, str(step))} first if it must be replaced."
            )
        latest = self._manager.latest_step()
        if latest is not None and step < latest and not force:
            raise ValueError(
                f"Checkpoint step {step} is older than the latest step {latest} in "
                f"{self.directory} (is this another run's directory?); restore the latest step "
                "and continue from it, use a new directory, or pass force=True to add an older "
                "step."
            )

    def _own_directory(self) -> None:
        """Takes the directory lock (or checks it is still ours); process 0 holds it for a job."""
        if self._lock is None:
            self._lock = _DirectoryLock(self.directory)
            weakref.finalize(self, self._lock.release)  # also runs at interpreter exit
        error: CheckpointLockedError | None = None
        if jax.process_index() == 0:
            try:
                if self._lock.held:
                    self._lock.verify()
                else:
                    self._lock.acquire()
            except CheckpointLockedError as err:
                error = err
        if jax.process_count() > 1:  # every process of the job learns process 0's outcome
            ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
            if not ok and error is None:
                error = CheckpointLockedError(
                    f"Process 0 of this job could not take checkpoint directory "
                    f"{self.directory} (another writer owns it; process 0's error names it); "
                    "stop that writer or save into another directory."
                )
        if error is not None:
            raise error
        if not self._owned:  # now no other writer: clear what dead ones left, see their steps
            if jax.process_index() == 0:
                _remove_unfinished(self.directory)
            self._manager.reload()
            self._owned = True

    def _empty_trash(self) -> None:
        """Removes the step directories ``max_to_keep`` renamed away (process 0, lock held)."""
        trash = os.path.join(self.directory, _TRASH_DIR)
        if jax.process_index() == 0 and os.path.isdir(trash):
            shutil.rmtree(trash, ignore_errors=True)

    # -- reading --
    def restore(
        self,
        step: int | None = None,
        *,
        extra: Any = None,
        tables_only: bool = False,
        reinit_slots: bool = False,
    ) -> tuple[EmbeddingState, Any]:
        """Restores ``step`` (latest if None) onto the Embedding's mesh, verifying checksums.

        ``extra`` is a target pytree (arrays or ``jax.ShapeDtypeStruct``s with shardings) for
        the saved extra item, or None to skip it. Returns ``(state, extra)``. Errors as
        ``restore``.
        """
        requested = None if step is None else _check_step(step)
        resolved = self._resolve_step(requested)
        try:
            return self._restore_step(resolved, extra, tables_only, reinit_slots)
        except CheckpointCorruptedError as err:
            if requested is not None:
                raise
            raise self._with_intact_step(err, extra, tables_only, reinit_slots) from err

    def _restore_step(
        self, step: int, extra: Any, tables_only: bool, reinit_slots: bool
    ) -> tuple[EmbeddingState, Any]:
        emb = self._embedding()
        config = self._read_config(step)
        fresh = tables_only or reinit_slots
        _check_config(config, emb, slots_needed=not fresh)
        target = _restore_target(emb)
        if fresh:  # slots are not read, so their structure may differ from the checkpoint's
            target = {"tables": target["tables"], "step": target["step"]}
        recorded = config.get("checksums", {}).get("arrays", {})
        restored = self._restore_item(step, "embedding", target, partial=fresh)
        self._verify(step, recorded, restored)
        restored_extra = None
        if extra is not None and not os.path.isdir(
            os.path.join(self.directory, str(step), "extra")
        ):
            raise ValueError(
                f"Checkpoint step {step} in {self.directory} has no extra item (it was saved "
                "without `extra`); restore it with extra=None."
            )
        if extra is not None:
            restored_extra = self._restore_item(step, "extra", extra, partial=False)
            self._verify(step, recorded, {"extra": restored_extra})
        slots = None if fresh else restored["slots"]
        state = emb.state_from_logical(restored["tables"], slots, restored["step"])
        return state, restored_extra

    def restore_model(self, step: int | None = None, *, sharding: Any = None) -> DenseModel | None:
        """The ``DenseModel`` saved with ``step`` (latest if None), or None if it has none.

        Reads the import path and kwargs from the step's config and the params from its
        ``model`` item, verifying their checksums; it imports nothing (``DenseModel.resolve``
        does). Needs no Embedding.

        Args:
            step: which step; None for the latest.
            sharding: where to place the params: a ``jax.sharding.Sharding`` for every array
                (e.g. ``NamedSharding(mesh, PartitionSpec())`` to replicate them on a mesh of
                any device count), a pytree of shardings that is a prefix of the params' tree
                (e.g. ``{"params": {"Dense_0": s0, "Dense_1": s1}}``), or None for this
                process's first device.

        Raises:
            FileNotFoundError: no complete checkpoint (or no such step).
            CheckpointCorruptedError: the params' files are missing or damaged, or their data
                does not match the checksums recorded at save, naming the step and the array;
                with ``step=None`` it also names the newest older step whose model restores.
        """
        requested = None if step is None else _check_step(step)
        resolved = self._resolve_step(requested)
        try:
            return self._restore_model_step(resolved, sharding)
        except CheckpointCorruptedError as err:
            if requested is not None:
                raise
            older = sorted((s for s in self._manager.all_steps() if s < err.step), reverse=True)
            hint = "there is no older step" if not older else "no older step's model restores"
            for candidate in older:
                try:
                    self._restore_model_step(candidate, sharding)
                except CheckpointCorruptedError:
                    continue
                hint = f"the newest intact step is {candidate}: restore it with step={candidate}"
                break
            raise CheckpointCorruptedError(
                f"{err} The latest step is damaged and nothing falls back silently: {hint}.",
                directory=err.directory,
                step=err.step,
                damaged=err.damaged,
            ) from err

    def _restore_model_step(self, step: int, sharding: Any) -> DenseModel | None:
        config = self._read_config(step)
        stored = config.get("model")
        if stored is None:
            return None
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def struct(shape: list[int], dtype: str) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(tuple(shape), jax.numpy.dtype(dtype))

        target = params_from_structure(stored["params"], struct)

        def place(where: Any, subtree: Any) -> Any:
            return jax.tree.map(lambda x: x.update(sharding=where), subtree)

        try:  # ``sharding`` is a prefix of the params' tree (one Sharding: all of them)
            target = jax.tree.map(place, sharding, target)
        except (ValueError, TypeError) as err:
            raise ValueError(
                "`sharding` must be a jax.sharding.Sharding or a pytree of them that is a prefix "
                f"of the dense model's params ({jax.tree.structure(target)}): {_short(err)}."
            ) from err
        params = target
        if jax.tree.leaves(target):
            params = self._restore_item(step, "model", target, partial=False)
            recorded = config.get("checksums", {}).get("arrays", {})
            self._verify(step, recorded, {"model": params})
        return DenseModel(stored["apply"], params, kwargs=stored["kwargs"])

    def _read_config(self, step: int) -> dict:
        """Step ``step``'s config JSON; CheckpointCorruptedError naming the file if unreadable."""
        path = os.path.join(self.directory, str(step), "config", "metadata")
        try:
            saved = self._manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            )
            config = saved["config"]
            problem = None
        except Exception as err:
            config, problem = None, err
        if isinstance(config, dict) and str(config.get("format", "")).startswith("jaxembed/"):
            return config
        reason = _short(problem) if problem is not None else "not a jaxembed config"
        error = CheckpointCorruptedError(
            f"Checkpoint step {step} in {self.directory} is damaged (or not a jaxembed step): "
            f"its config file {path} cannot be read ({reason}); restore another step (complete "
            f"steps: {sorted(self._manager.all_steps())}) or save this one again.",
            directory=self.directory,
            step=step,
            damaged=[path],
        )
        raise error from problem

    def _restore_item(self, step: int, item: str, target: Any, *, partial: bool) -> Any:
        """Restores one orbax item of ``step``; CheckpointCorruptedError naming what fails."""
        try:
            return self._read_item(step, item, target, partial)
        except Exception as err:
            raise self._unreadable(step, item, target, err) from err

    def _read_item(self, step: int, item: str, target: Any, partial: bool) -> Any:
        _quiet_abandoned_reads()
        args = ocp.args.PyTreeRestore(
            target, ocp.checkpoint_utils.construct_restore_args(target), partial_restore=partial
        )
        return self._manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]

    def _unreadable(
        self, step: int, item: str, target: Any, err: Exception
    ) -> CheckpointCorruptedError:
        """The error for an item that cannot be read: which tables fail, which file, the fix."""
        if item == "embedding":
            damaged = [
                label for label, part in _parts(target) if not self._readable(step, item, part)
            ] or ["the embedding item"]
            hint = "restore another step, or save this one again from a run that has it"
        elif item == "model":
            damaged = ["the dense model's params"]
            hint = (
                "restore another step, or save this one again (`jaxembed export --tables-only` "
                "still exports its tables)"
            )
        else:
            damaged = ["the extra item"]
            hint = (
                "check that `extra` has the structure that was saved; otherwise its files are "
                "damaged: restore another step"
            )
        found = re.search(re.escape(self.directory) + r"/[^\s\"'\\]+", str(err))
        where = f" ({found.group(0)})" if found else ""
        return CheckpointCorruptedError(
            f"Checkpoint step {step} in {self.directory} is damaged: {', '.join(damaged)} "
            f"cannot be read{where}: {_short(err)}; {hint}.",
            directory=self.directory,
            step=step,
            damaged=damaged,
        )

    def _readable(self, step: int, item: str, part: Any) -> bool:
        try:
            self._read_item(step, item, part, True)
        except Exception:
            return False
        return True

    def _verify(self, step: int, recorded: Mapping[str, dict], tree: Any) -> None:
        """CheckpointCorruptedError naming every restored array whose checksum differs."""
        bad = [
            name
            for name, got in checksums(tree).items()
            if name in recorded
            and got["shape"] == recorded[name]["shape"]  # a cast or reshaped extra target
            and got["dtype"] == recorded[name]["dtype"]
            and got["checksum"] != recorded[name]["checksum"]
        ]
        if bad:
            labels = [_leaf_label(name) for name in bad]
            raise CheckpointCorruptedError(
                f"Checkpoint step {step} in {self.directory} is damaged: the data of "
                f"{', '.join(labels)} does not match the checksum recorded at save (its files "
                "changed after they were written); restore another step, or save this one again "
                "from a run that has it.",
                directory=self.directory,
                step=step,
                damaged=labels,
            )

    def _with_intact_step(
        self, err: CheckpointCorruptedError, extra: Any, tables_only: bool, reinit_slots: bool
    ) -> CheckpointCorruptedError:
        """``err`` (the latest step is damaged) plus the newest older step that restores."""
        older = sorted((s for s in self._manager.all_steps() if s < err.step), reverse=True)
        damaged = []
        hint = "there is no older step" if not older else "no older step restores either"
        for step in older:
            try:
                self._restore_step(step, extra, tables_only, reinit_slots)
            except ValueError:  # damaged, or written with other configs
                damaged.append(step)
                continue
            hint = f"the newest intact step is {step}: restore it with step={step}"
            break
        if damaged:
            hint += f" (steps {damaged} do not restore either)"
        return CheckpointCorruptedError(
            f"{err} The latest step is damaged and nothing falls back silently: {hint}.",
            directory=err.directory,
            step=err.step,
            damaged=err.damaged,
        )

    def _embedding(self) -> Embedding:
        if self.emb is None:
            raise ValueError(
                "This CheckpointManager was opened without an Embedding (metadata only); pass "
                "the Embedding to save or restore tables."
            )
        return self.emb

    def _resolve_step(self, step: int | None) -> int:
        """``step``, or the latest; FileNotFoundError if it is not a complete step."""
        steps = self._manager.all_steps()
        step = self._manager.latest_step() if step is None else _check_step(step)
        if step is None or step not in steps:
            raise FileNotFoundError(
                f"No complete checkpoint {'' if step is None else f'step {step} '}in "
                f"{self.directory!r} (complete steps: {sorted(steps)})."
            )
        return step

    def latest_step(self) -> int | None:
        """The newest complete step (None if there is none)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete step."""
        return list(self._manager.all_steps())

    def wait_until_finished(self) -> None:
        """Blocks until background saves are written; CheckpointWriteError if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            raise CheckpointWriteError(
                f"A background save into {self.directory} failed ({_short(err)}); that step "
                "was not committed: fix the cause (e.g. disk space) and save it again."
            ) from err

    def close(self) -> None:
        """Waits for background saves, releases the manager and the directory lock."""
        try:
            self.wait_until_finished()
        finally:
            try:
                self._manager.close()
            finally:
                if self._lock is not None and self._lock.held:
                    self._empty_trash()
                    self._lock.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class _StepOwnership:
    """Whether jaxembed wrote a step: saved by this manager, or its config says jaxembed."""

    directory: str
    written: set[int]

    def __call__(self, step: int) -> bool:
        return step in self.written or _written_by_jaxembed(self.directory, step)


def _parts(target: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """``(label, partial restore target)`` per table, per table's slots, and the step."""
    parts = [(f"table {n!r}", {"tables": {n: t}}) for n, t in target["tables"].items()]
    for name, slots in target.get("slots", {}).items():
        if jax.tree.leaves(slots):
            parts.append((f"slots of table {name!r}", {"slots": {name: slots}}))
    parts.append(("the step counter", {"step": target["step"]}))
    return parts
