"""Host preprocessing off the critical path: ``emb.preprocess`` in a background thread.

While the device runs step ``i``, a thread validates and pads batch ``i + 1`` (numpy releases
the GIL in its heavy loops), so a training loop only waits for preprocessing when it is slower
than the step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from jaxembed import _nest
from jaxembed.batch import Batch
from jaxembed.embedding import Embedding

_DONE = object()


def _is_inputs(x: Any, feature_paths: frozenset[str]) -> bool:
    """Whether ``x`` is structured like inputs: every leaf path is a feature path."""
    return all(path in feature_paths for path, _ in _nest.flatten_with_paths(x))


def _split_example(item: Any, feature_paths: frozenset[str]) -> tuple[Any, Any]:
    """``(inputs, weights)`` of one item of ``prefetch``'s ``examples``.

    An item is an ``(inputs, weights)`` pair when it is a 2-tuple whose first element is
    structured like inputs (its leaf paths are feature paths); anything else is the inputs
    alone. So inputs that are themselves tuples, lists or namedtuples (for a feature_config of
    that structure) may be given bare; an item that fits both readings is read as a pair.
    """
    if isinstance(item, tuple) and len(item) == 2 and _is_inputs(item[0], feature_paths):
        return item[0], item[1]
    return item, None


def prefetch(
    emb: Embedding,
    examples: Iterable[Any],
    buffer_size: int = 2,
    *,
    batch_size: int | str | None = None,
) -> Iterator[Batch]:
    """Yields ``emb.preprocess(...)`` of each item of ``examples``, prepared ahead in a thread.

    Args:
        emb: the ``Embedding`` whose ``preprocess`` builds the batches.
        examples: an iterable of ``inputs`` or ``(inputs, weights)`` pairs; inputs have the
            structure of ``emb``'s feature_config (any nesting of dicts, lists, tuples and
            namedtuples), see ``_split_example``.
        buffer_size: how many batches to prepare ahead (>= 1).
        batch_size: passed to ``emb.preprocess`` (None, an int, or ``"bucket"`` to pad every
            batch to a power of two examples per device).

    Errors raised while preprocessing (e.g. an out-of-range id) are raised by the iterator at
    the batch that caused them. Leaving the loop early stops the thread.

    Example:
        >>> import numpy as np, jaxembed as je
        >>> table = je.TableConfig(10, 4, name="items")
        >>> emb = je.Embedding({"items": je.FeatureConfig(table)})
        >>> data = ({"items": np.array([i, i + 1])} for i in range(3))
        >>> [len(batch.plans) for batch in je.prefetch(emb, data)]
        [1, 1, 1]
    """
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be >= 1, got {buffer_size}.")
    ready: queue.Queue = queue.Queue(maxsize=buffer_size)
    stop = threading.Event()
    feature_paths = frozenset(path for path, _ in _nest.flatten_with_paths(emb.feature_config))

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in examples:
                inputs, weights = _split_example(item, feature_paths)
                if not put(emb.preprocess(inputs, weights, batch_size=batch_size)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put(e)
            return
        put(_DONE)

    thread = threading.Thread(target=work, name="jaxembed-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
