"""What a folder holds, as TF Serving sees it: a SavedModel, or a base folder of versions.

TF-free, so the CLI (``jaxembed inspect``) and ``jaxembed.export`` (which refuses to overwrite a
base folder) answer the question the same way.

Example:
    >>> import pathlib, tempfile
    >>> base = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("1", "7", "notes", "²"):
    ...     (base / name).mkdir()
    >>> (base / "1" / "saved_model.pb").touch(); (base / "7" / "saved_model.pbtxt").touch()
    >>> saved_model_versions(base), is_saved_model(base / "1")
    ([1, 7], True)
"""

from __future__ import annotations

from pathlib import Path

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
"""A folder holding one of these is a SavedModel (binary or text protobuf)."""


def is_saved_model(path: Path) -> bool:
    """Whether ``path`` is a SavedModel folder."""
    return any((path / name).is_file() for name in SAVED_MODEL_FILES)


def saved_model_versions(base: Path) -> list[int]:
    """TF Serving's version folders under ``base`` (ASCII integer names holding a SavedModel),
    sorted; empty if ``base`` is not a folder."""
    if not base.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in base.iterdir()
        if p.name.isascii() and p.name.isdigit() and is_saved_model(p)
    )
