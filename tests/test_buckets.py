"""Static-shape buckets: few distinct shapes (few compilations), little padding."""

import numpy as np
import pytest

import jaxembed as je
from jaxembed.lookup import bucket, slot_bucket


@pytest.mark.parametrize(
    "n, want",
    [(0, 1), (1, 1), (3, 4), (8, 8), (9, 16), (17, 24), (39, 40), (64, 64), (65, 128)],
)
def test_slot_bucket(n, want):
    assert slot_bucket(n) == want
    assert slot_bucket(n) >= max(n, 1)


def test_bucket_is_a_power_of_two():
    assert [bucket(n) for n in (1, 2, 3, 1000, 1025)] == [1, 2, 4, 1024, 2048]


def test_preprocess_pads_rows_to_the_slot_bucket():
    table = je.TableConfig(100, 4, combiner="sum", name="t")
    emb = je.Embedding({"f": je.FeatureConfig(table)})
    lengths = np.array([39, 1, 20])
    ids = np.arange(lengths.sum()) % 100
    batch = emb.preprocess({"f": je.Ragged.from_row_lengths(ids, lengths)})
    (plan,) = batch.plans
    assert plan.positions.shape[-1] == 40  # not 64 (the leading axis: the mesh devices)
