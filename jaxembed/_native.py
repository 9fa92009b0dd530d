"""Where jaxembed's compiled libraries lie: beside this package, as ``setup.py`` builds them
(the CPU kernels, FarmHash, the distinct keys). Each is optional; callers say what its absence
means.

Example:
    >>> from jaxembed import _native
    >>> _native.library_path("_no_such_library") is None
    True
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import pathlib


def library_path(name: str) -> pathlib.Path | None:
    """The built file of the extension ``jaxembed.<name>``, or None if it was not built."""
    here = pathlib.Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{name}{suffix}"
        if path.exists():
            return path
    return None


def load(name: str, *int64_functions: str) -> ctypes.CDLL | None:
    """The library ``jaxembed.<name>`` loaded through ctypes, with ``int64_functions`` declared
    to return int64, or None if it was not built."""
    path = library_path(name)
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    for function in int64_functions:
        getattr(lib, function).restype = ctypes.c_int64
    return lib
