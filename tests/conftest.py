"""Shared fixtures.

``serving`` is the fixture of TF's ``tpu_embedding_for_serving_test.py`` (tf_semantics.md section
7): tables ``video`` (V=8, dim=4, sum) and ``user`` (V=16, dim=2, mean), both initialised with
``arange(32)`` row-major, and the features ``watched``, ``favorited`` (video) and ``friends``
(user) with one batch of 4 examples.

TensorFlow is never imported here; tests that need it call ``pytest.importorskip``.

JAX sees 8 simulated CPU devices (set before JAX starts), so sharded tests run on a real mesh;
everything else uses the default device as usual.

``pytest --quick`` (``bash run.sh test --quick``) runs ``QUICK``, a subset that touches every
part (configs, inputs, lookup, optimizers, sharding, checkpoints, one export round trip, the
CLI) in a few minutes; the full suite is what CI runs.

The run's processes (the run, or its xdist workers) share JAX's compilation cache in a temporary
folder (``_xla_cache``): many tests compile the same programs, and a repeat loads the compiled
program instead of compiling it again (the suite 872 -> 728 s on 2 workers). The run removes the
folder at the end; subprocesses that tests start do not use it. ``JAXEMBED_TESTS_XLA_CACHE``
names a folder to use instead, which the run leaves in place (``.ci/run`` shares one across its
test steps: the kernels-off step reuses programs the first step compiled).

At exit, JAX's garbage-collection callback is unregistered (``drop_xla_gc_callback_at_exit``): a
collection during interpreter shutdown would otherwise call into a half-torn-down jaxlib and
print an ``Exception ignored in: <function _xla_gc_callback>`` traceback after the results.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402

import jaxembed as je  # noqa: E402
from jaxembed._console import drop_xla_gc_callback_at_exit  # noqa: E402

_CACHE_VAR = "JAXEMBED_TESTS_XLA_CACHE"  # the run's folder, inherited by xdist workers
_OWN_CACHE = _CACHE_VAR not in os.environ  # this process makes it (not a worker, not given)
if _OWN_CACHE:
    os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="jaxembed-tests-xla-cache-")


def _xla_cache() -> None:
    """Points JAX's compilation cache at the run's folder, every program cached."""
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VAR])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


_xla_cache()

#: The test files of ``--quick``, and the slowest tests in them, left out (``QUICK_SKIP``).
QUICK = (
    "test_buckets.py",
    "test_public_api.py",
    "test_batches.py",
    "test_inputs.py",
    "test_configs.py",
    "test_out_of_range.py",
    "test_prefetch.py",
    "test_lookup_errors.py",
    "test_lookup_jit.py",
    "test_embedding.py",
    "test_checkpoint.py",
    "test_cli_export.py",
    "test_newcomer_files.py",
    "test_newcomer_cli.py",
)
QUICK_SKIP = (
    "test_padding_trains_nothing",
    "test_forty_batch_sizes_compile_few_programs",
    "test_empty_batch",
    "test_a_save_killed_part_way_leaves_the_previous_step",
    "test_manager_keeps_last_n_saves_every_k_and_extra_items",
    "test_restore_onto_another_device_count_is_bit_identical[2",
    "test_restore_onto_another_device_count_is_bit_identical[None",
    "test_lookup_after_training_and_preprocess_rejects_a_subset_of_features",
    "test_lookup_equals_embedding_lookup_bit_for_bit[0-eager]",
    "test_out_of_range_zero_trains_only_valid_rows",
    "test_export_command_errors",
    "test_export_quantized_and_inspect_shows_table_bytes",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--quick",
        action="store_true",
        help="run only the quick subset (tests/conftest.py QUICK: a few minutes); CI runs all",
    )


def pytest_configure(config: pytest.Config) -> None:
    # JAX writes a cache entry in place (no temporary file and rename): a worker can read an
    # entry that the other is still writing. JAX then warns and compiles the program itself.
    config.addinivalue_line(
        "filterwarnings", "ignore:Error reading persistent compilation cache entry:UserWarning"
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run removes the cache folder it made (workers leave it to the run)."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ.pop(_CACHE_VAR), ignore_errors=True)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With ``--quick``, the test files not in ``QUICK`` are left out before they are imported."""
    if config.getoption("--quick") and collection_path.suffix == ".py":
        return collection_path.name not in QUICK
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``--quick``, ``QUICK_SKIP`` and the doctests of ``jaxembed/`` and ``export/`` are
    deselected too."""
    if not config.getoption("--quick"):
        return
    keep = [
        item
        for item in items
        if Path(str(item.path)).name in QUICK and not item.name.startswith(QUICK_SKIP)
    ]
    if len(keep) < len(items):
        kept = {id(item) for item in keep}
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
        items[:] = keep


drop_xla_gc_callback_at_exit()  # after JAX's import, so before JAX's own exit handlers


@dataclass
class _Column:
    """One feature's data in TF's fixture: a batch of 4 rows stored as sparse / ragged / dense."""

    indices: list[list[int]]
    values: list[int]
    row_lengths: list[int]
    width: int  # dense_shape[1]


@dataclass
class ServingFixture:
    table_video: je.TableConfig = field(
        default_factory=lambda: je.TableConfig(8, 4, combiner="sum", name="video")
    )
    table_user: je.TableConfig = field(
        default_factory=lambda: je.TableConfig(16, 2, combiner="mean", name="user")
    )
    batch: int = 4
    columns: tuple[_Column, ...] = (
        _Column(
            [[0, 0], [1, 0], [1, 1], [2, 0], [2, 1], [3, 0]], [0, 0, 1, 0, 1, 1], [1, 2, 2, 1], 2
        ),
        _Column(
            [[0, 0], [0, 1], [1, 0], [2, 0], [3, 0], [3, 1]], [0, 1, 1, 0, 0, 1], [2, 1, 1, 2], 2
        ),
        _Column(
            [[0, 0], [1, 0], [1, 1], [1, 2], [2, 0], [3, 0], [3, 1], [3, 2]],
            [3, 0, 1, 2, 3, 0, 1, 2],
            [1, 3, 1, 3],
            3,
        ),
    )

    def __post_init__(self) -> None:
        self.feature_config = (
            je.FeatureConfig(self.table_video, name="watched"),
            je.FeatureConfig(self.table_video, name="favorited"),
            je.FeatureConfig(self.table_user, name="friends"),
        )
        values = np.arange(32, dtype=np.float32)
        self.tables = {
            self.table_video: values.reshape(8, 4),
            self.table_user: values.reshape(16, 2),
        }

    def _vals(self, col: _Column, weights: bool) -> np.ndarray:
        return np.asarray(col.values, np.float32 if weights else np.int32)

    def dense(self, weights: bool = False) -> tuple:
        """The id vectors as 1-D dense inputs (TF's ``_get_dense_tensors``)."""
        return tuple(self._vals(c, weights) for c in self.columns)

    def sparse(self, weights: bool = False) -> tuple:
        """``_get_sparse_tensors``; ``weights=True`` gives the ids as float weights."""
        return tuple(
            je.Sparse(c.indices, self._vals(c, weights), [self.batch, c.width])
            for c in self.columns
        )

    def ragged(self, weights: bool = False) -> tuple:
        return tuple(
            je.Ragged.from_row_lengths(self._vals(c, weights), c.row_lengths) for c in self.columns
        )


@pytest.fixture
def serving() -> ServingFixture:
    return ServingFixture()
