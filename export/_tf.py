"""The one place that imports TensorFlow, with an error that says how to install it."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:
    import tensorflow as tf
except ImportError as e:  # pragma: no cover - the tf extra is installed in tests
    raise ImportError(
        "jaxembed.export needs TensorFlow: pip install 'jaxembed[tf]'. (import jaxembed works "
        "without it; only the TF bridge needs it.)"
    ) from e

__all__ = ["tf"]
