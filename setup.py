"""Builds jaxembed's CPU kernels (csrc/cpu_kernels.cc) against the XLA FFI headers of jaxlib,
its FarmHash library for raw ids (csrc/fingerprint.cc) and its distinct-keys helper for the host
preprocess (csrc/distinct.cc).

Everything else about the package is in pyproject.toml. The kernels are optional: without a C++
compiler the package still installs, and jaxembed runs its pure-JAX path on CPU too
(``jaxembed._kernels.status()`` says which).
"""

import importlib.util
import pathlib
import runpy

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def jaxlib_include() -> str:
    """jaxlib's header folder (what ``jax.ffi.include_dir()`` returns), found without importing."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("jaxlib is not installed in the build environment")
    return str(pathlib.Path(next(iter(spec.submodule_search_locations))) / "include")


class OptionalBuildExt(build_ext):
    """Compiles the kernels if it can; warns and carries on without them if it cannot."""

    def build_extension(self, ext: Extension) -> None:
        try:
            ext.include_dirs.append(jaxlib_include())
            super().build_extension(ext)
        except Exception as err:  # no compiler, no headers: the pure-JAX path remains
            self.warn(f"jaxembed: {ext.name} not built ({err}); jaxembed runs without it")


# The optimizer kinds and flags, written once in jaxembed/_kernel_abi.py (read, not imported).
ABI = runpy.run_path(str(pathlib.Path(__file__).parent / "jaxembed" / "_kernel_abi.py"))

kernels = Extension(
    "jaxembed._cpu_kernels",
    sources=["csrc/cpu_kernels.cc"],
    language="c++",
    define_macros=ABI["compile_definitions"](),
    # -ffp-contract=off: products are rounded before they are added, as TF's kernels do.
    extra_compile_args=["-std=c++17", "-O3", "-g0", "-ffp-contract=off", "-fvisibility=hidden"],
    optional=True,
)


def plain_c(name: str, source: str) -> Extension:
    """A library of plain C entry points (called through ctypes; no XLA headers)."""
    return Extension(
        f"jaxembed.{name}",
        sources=[source],
        language="c++",
        extra_compile_args=["-std=c++17", "-O3", "-g0", "-fvisibility=hidden"],
        optional=True,
    )


# FarmHash Fingerprint64 for raw ids; the distinct keys of a batch for the host preprocess
# (without it, numpy sorts).
farmhash = plain_c("_farmhash", "csrc/fingerprint.cc")
distinct_keys = plain_c("_distinct_keys", "csrc/distinct.cc")

setup(ext_modules=[kernels, farmhash, distinct_keys], cmdclass={"build_ext": OptionalBuildExt})
