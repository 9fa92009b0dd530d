"""The order in which TF and jaxembed add long weighted sparse rows.

TF's ``segment_sum`` (weighted sparse lookups) reduces a row of ``n >= 16`` entries in packets of
8 columns with four accumulators: entry ``j < 4 * (n // 4)`` into accumulator ``j mod 4``, the
four added in order, then the last ``n mod 4`` entries; columns outside a full packet, and rows
of fewer than 16 entries, are added left to right (Eigen's ``InnerMostDimPreserver``).
jaxembed adds every row left to right, as TF's ragged lookups do and as the served model does,
so these rows agree with TF to rounding (``tf_reference.assert_matches_tf``'s tolerance).

* ``eigen_row_sum``, a numpy model of TF's order written from the description above, equals
  TF's ``segment_sum`` bit for bit, dims 1 to 64 (and differs from left-to-right sums): the
  documented order (docs/design.md, "Bit-exactness") is TF's;
* jaxembed's weighted sparse lookups equal left-to-right sums bit for bit, with the CPU kernels on
  and off, with overflow (tiny caps) and without, and match TF within its tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_long_rows import caps
from tf_reference import assert_matches_tf, tf_lookup

import jaxembed as je
from jaxembed import _kernels

VOCAB = 40
# Row lengths around the threshold (15, 16, 17, 19) and past it, with empty and short rows.
LENGTHS = np.array([0, 3, 15, 16, 17, 19, 20, 1, 23, 64, 77, 2, 0, 31, 18, 150])


def left_to_right(x: np.ndarray) -> np.ndarray:
    """float32 sum of the ``[n, dim]`` rows ``x``, added in order from 0."""
    acc = np.zeros(x.shape[1], np.float32)
    for row in x:
        acc = acc + row
    return acc


def eigen_row_sum(x: np.ndarray, packet: int = 8) -> np.ndarray:
    """float32 sum of the ``[n, dim]`` rows ``x`` in TF's order (see the module docstring)."""
    n, dim = x.shape
    acc = left_to_right(x)
    full = dim // packet * packet
    if n < 16 or full == 0:
        return acc
    lanes = [np.zeros(full, np.float32) for _ in range(4)]
    whole = n // 4 * 4
    for j in range(whole):
        lanes[j % 4] = lanes[j % 4] + x[j, :full]
    total = ((lanes[0] + lanes[1]) + lanes[2]) + lanes[3]
    for j in range(whole, n):
        total = total + x[j, :full]
    acc[:full] = total
    return acc


def test_tf_segment_sum_adds_long_rows_in_eigens_packet_order():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    not_left_to_right = 0
    for n, dim in [(n, d) for n in (2, 15, 16, 17, 18, 19, 40, 101) for d in (1, 4, 8, 12, 64)]:
        x = (rng.normal(size=(n, dim)) * 10 ** rng.uniform(-3, 3, (n, 1))).astype(np.float32)
        want = tf.math.segment_sum(x, np.zeros(n, np.int32)).numpy()[0]
        np.testing.assert_array_equal(eigen_row_sum(x), want, err_msg=f"n={n} dim={dim}")
        not_left_to_right += not np.array_equal(left_to_right(x), want)
    assert not_left_to_right >= 10  # the cases tell the two orders apart


def _case(dim: int, combiner: str, seed: int = 0):
    """``je.embedding_lookup``'s arguments: one weighted sparse feature of ``LENGTHS`` rows."""
    rng = np.random.default_rng(seed)
    n = int(LENGTHS.sum())
    rows = np.repeat(np.arange(LENGTHS.shape[0]), LENGTHS)
    cols = np.arange(n) - np.repeat(np.cumsum(LENGTHS) - LENGTHS, LENGTHS)
    index, shape = np.stack([rows, cols], 1), (LENGTHS.shape[0], int(LENGTHS.max()))
    ids = rng.integers(0, VOCAB, n)
    # Magnitudes over 6 decades: the order of the additions shows in the bits.
    weights = (rng.uniform(0.1, 2.0, n) * 10 ** rng.uniform(-3, 3, n)).astype(np.float32)
    values = rng.normal(size=(VOCAB, dim)).astype(np.float32)
    table = je.TableConfig(VOCAB, dim, combiner=combiner, name="t")
    inputs = {"f": je.Sparse(index, ids, shape)}
    return (
        inputs,
        {"f": je.Sparse(index, weights, shape)},
        {table: values},
        {"f": je.FeatureConfig(table)},
    )


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "pure_jax"])
@pytest.mark.parametrize("dim", [4, 8, 12, 64])
def test_long_weighted_sparse_rows_are_summed_left_to_right(dim, kernels):
    args = _case(dim, "sum")
    inputs, weights, tables, _ = args
    (values,) = tables.values()
    products = values[inputs["f"].values] * weights["f"].values[:, None]
    rows = inputs["f"].indices[:, 0]
    want = np.stack([left_to_right(products[rows == r]) for r in range(LENGTHS.shape[0])])
    with _kernels.use_kernels(kernels):
        got = np.asarray(je.embedding_lookup(*args)["f"])
        with caps(1, per_mean=1, share=2):  # most rows overflow
            capped = np.asarray(je.embedding_lookup(*args)["f"])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(capped, want)
    assert_matches_tf(je.embedding_lookup(*args), tf_lookup(*args), *args)
