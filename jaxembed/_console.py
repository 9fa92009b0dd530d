"""What the command line prints: progress of long phases, and no TensorFlow log noise.

``Reporter.stage(description, total)`` wraps one phase (generating data, compiling, training,
exporting). In a terminal it is a rich progress line (spinner, a bar when the total is known,
elapsed time) that disappears when the phase ends. Anywhere else (a CI log, ``| tee``, a file)
nothing is redrawn: the stage prints one plain line when it starts and, from a background thread,
one every ``interval`` seconds while it runs (done/total, the caller's status, elapsed time and
an estimate of the time left), so a log never goes quiet for longer than ``interval``.

``Reporter.print`` prints the report itself (above a live bar in a terminal) and, when the
reporter has a ``log`` console, records it there too (the demo's ``demo.log``); progress lines
are never recorded.

``import_tensorflow_quietly()`` imports TensorFlow (``jaxembed.export``) without the lines its C++
runtime logs while loading (the oneDNN banner, CUDA stub and ``cuInit`` messages, absl's "before
InitializeLog" warning), which the user cannot act on. ``TF_CPP_MIN_LOG_LEVEL`` is 3 unless the
user sets it (errors too: TF raises the ones that matter as Python exceptions); 0 shows them all.

``drop_xla_gc_callback_at_exit()`` keeps an ``Exception ignored in: <function _xla_gc_callback>``
traceback from ending a run (see its docstring).

Example:
    >>> import io
    >>> from rich.console import Console
    >>> out = io.StringIO()
    >>> report = Reporter(Console(file=out, width=80), interval=60)
    >>> with report.stage("counting", total=3) as stage:
    ...     for _ in range(3):
    ...         stage.update(advance=1, status="fine")
    >>> report.print("counted")
    >>> print(out.getvalue().strip())
    counting ...
    counted
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

__all__ = [
    "Reporter",
    "Stage",
    "drop_xla_gc_callback_at_exit",
    "import_tensorflow_quietly",
    "quiet_tensorflow_logs",
    "stderr_held",
]


def _seconds(s: float) -> str:
    s = int(round(s))
    return f"{s} s" if s < 120 else f"{s // 60} min {s % 60:02d} s"


class Stage:
    """One phase in progress; ``update`` it as work completes (any thread)."""

    def __init__(self, reporter: Reporter, description: str, total: int | None) -> None:
        self._reporter = reporter
        self.description = description
        self.total = total
        self.completed = 0
        self.status = ""
        self.started = time.perf_counter()
        self._first: tuple[int, float] | None = None  # (completed, time) at the first update
        self._task: Any = None

    @property
    def elapsed(self) -> float:
        """Seconds since the stage started."""
        return time.perf_counter() - self.started

    def update(
        self,
        *,
        advance: int = 0,
        completed: int | None = None,
        total: int | None = None,
        status: str | None = None,
        description: str | None = None,
    ) -> None:
        """Records progress; the display follows (live) or the next plain line shows it."""
        if completed is not None:
            self.completed = completed
        self.completed += advance
        if total is not None:
            self.total = total
        if status is not None:
            self.status = status
        if description is not None:
            self.description = description
        if self._first is None:  # e.g. a resumed run's first step: the rate counts from here
            self._first = (self.completed, time.perf_counter())
        self._reporter._refresh(self)

    def line(self) -> str:
        """The plain-log line for the stage as it stands."""
        parts = [self.description]
        if self.total:
            parts.append(f"{self.completed:,}/{self.total:,}")
        if self.status:
            parts.append(self.status)
        timing = f"{_seconds(self.elapsed)} elapsed"
        if self.total and self._first is not None and self._first[0] < self.completed:
            done, since = self.completed - self._first[0], time.perf_counter() - self._first[1]
            left = since / done * max(0, self.total - self.completed)
            timing += f", ~{_seconds(left)} left"
        return f"  {', '.join(parts)} ({timing})"


class Reporter:
    """Prints a command's report and the progress of its stages (see the module docstring).

    Args:
        console: Where the report and progress go (stdout by default). A terminal gets live
            progress lines; anything else gets plain lines, one at least every ``interval`` s.
        log: An optional recording console that keeps a copy of the report (not the progress).
        interval: Seconds between plain progress lines.
        live: Force live (True) or plain (False) progress; None decides by ``console``.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        log: Console | None = None,
        interval: float = 5.0,
        live: bool | None = None,
    ) -> None:
        self.console = console or Console(soft_wrap=True, highlight=False)
        self.log = log
        self.interval = interval
        if live is None:
            live = self.console.is_terminal and not self.console.is_dumb_terminal
        self.live = live
        self._lock = threading.RLock()
        self._last_line = time.perf_counter()
        self._progress: Progress | None = None

    def print(self, text: str = "", **kwargs: Any) -> None:
        """Prints one line (or block) of the report, and records it in ``log``."""
        with self._lock:
            self.console.print(text, **kwargs)
            if self.log is not None:
                self.log.print(text, **kwargs)
            self._last_line = time.perf_counter()

    def _plain(self, text: str) -> None:
        with self._lock:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
            self._last_line = time.perf_counter()

    def _refresh(self, stage: Stage) -> None:
        if self._progress is not None and stage._task is not None:
            self._progress.update(
                stage._task,
                completed=stage.completed,
                total=stage.total,
                description=stage.description,
                status=stage.status,
                count=f"{stage.completed:,}/{stage.total:,}" if stage.total else "",
            )

    @contextlib.contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator[Stage]:
        """A phase of the work; yields a ``Stage`` to ``update``."""
        stage = Stage(self, description, total)
        if self.live:
            columns = (
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                TextColumn("{task.fields[count]}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
            )
            with Progress(*columns, console=self.console, transient=True) as progress:
                self._progress = progress
                stage._task = progress.add_task(description, total=total, status="", count="")
                try:
                    yield stage
                finally:
                    self._progress = None
            return
        self._plain(f"{description} ...")
        done = threading.Event()

        def beat() -> None:
            while not done.wait(min(1.0, self.interval / 4)):
                with self._lock:
                    if time.perf_counter() - self._last_line >= self.interval:
                        self._plain(stage.line())

        thread = threading.Thread(target=beat, name="jaxembed-progress", daemon=True)
        thread.start()
        try:
            yield stage
        finally:
            done.set()
            thread.join()


@contextlib.contextmanager
def stderr_held() -> Iterator[None]:
    """Holds back what is written to file descriptor 2, and replays it only on an exception.

    TensorFlow's C++ runtime logs INFO lines (oneDNN, CUDA stubs) to stderr while its libraries
    load, before any log level setting applies; the CLI keeps them out of its output.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hold back
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.flush()
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _level_set_by_user() -> bool:
    """Whether ``TF_CPP_MIN_LOG_LEVEL`` came from the user's environment (JAX sets it to 1 when
    imported, so ``os.environ`` alone cannot tell): read from the environment the process
    started with where Linux shows it, else any value but JAX's counts as the user's."""
    try:
        with open("/proc/self/environ", "rb") as f:
            return any(e.startswith(b"TF_CPP_MIN_LOG_LEVEL=") for e in f.read().split(b"\0"))
    except OSError:
        return os.environ.get("TF_CPP_MIN_LOG_LEVEL") not in (None, "1")


def quiet_tensorflow_logs() -> None:
    """Sets ``TF_CPP_MIN_LOG_LEVEL=3`` for TensorFlow (not yet loaded) unless the user set it.

    TF's C++ logging reads it once, when TF loads; level 3 drops its ERROR lines too (CUDA's
    ``cuInit`` failure on a machine without GPUs, at TF's first device query), which the user
    cannot act on: TF raises the errors that matter as Python exceptions. ``0`` shows them all.
    """
    if "tensorflow" not in sys.modules and not _level_set_by_user():
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow (through ``jaxembed.export``) without its start-up log lines (see
    ``quiet_tensorflow_logs``; the lines logged while its libraries load are held back)."""
    if "jaxembed.export._tf" in sys.modules:
        return
    quiet_tensorflow_logs()
    with stderr_held():
        import jaxembed.export._tf  # noqa: F401


def _drop_xla_gc_callback() -> None:
    gc.callbacks[:] = [c for c in gc.callbacks if getattr(c, "__name__", "") != "_xla_gc_callback"]


def drop_xla_gc_callback_at_exit() -> None:
    """Unregisters jaxlib's garbage-collection callback when the interpreter starts to exit.

    jaxlib appends ``_xla_gc_callback`` to ``gc.callbacks`` (it frees XLA's garbage on each
    collection). While the interpreter shuts down it clears module globals, jaxlib's ``_jax``
    among them, and a collection that runs after that (triggered by the many objects TensorFlow
    and orbax leave to free) calls the callback on ``None``: Python prints "Exception ignored in:
    <function _xla_gc_callback>" and an AttributeError traceback after the program's last line.
    ``atexit`` handlers run before that teardown, and one registered now (after JAX's import)
    runs before JAX's own; nothing needs XLA's garbage freed at exit.
    """
    global _dropping
    if not _dropping:
        atexit.register(_drop_xla_gc_callback)
        _dropping = True


_dropping = False
