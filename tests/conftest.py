"""Shared fixtures.

``serving`` is the fixture of TF's ``tpu_embedding_for_serving_test.py`` (tf_semantics.md section
7): tables ``video`` (V=8, dim=4, sum) and ``user`` (V=16, dim=2, mean), both initialised with
``arange(32)`` row-major, and the features ``watched``, ``favorited`` (video) and ``friends``
(user) with one batch of 4 examples.

TensorFlow is never imported here; tests that need it call ``pytest.importorskip``.

JAX sees 8 simulated CPU devices (set before JAX starts), so sharded tests run on a real mesh;
everything else uses the default device as usual.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jaxembed as je  # noqa: E402


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
