"""Which stock TF op can sum a served feature's rows: cost and summation order.

A ragged feature's combined row is the sum of its ids' rows left to right (TF's ragged
``reduce_sum``, ``_ragged_embedding_lookup_with_reduce``; tf_semantics §4.5), and jaxembed's
serving graph must give those bits. This times, in a TF1 ``Session`` as TF Serving runs a graph
(``--threads`` intra- and inter-op threads, interleaved calls, medians), the candidates on the
rows of one table's request (by default ``item`` and ``history`` of ``bench_serving.py`` at batch
256: one id, then 1-40 ids per example, dim 32, a 500k-row table), and checks each against a
numpy left-to-right sum:

* ``gather``: the rows only (``ResourceGather``), and ``segment_ids``: the rows' example numbers
  (``RaggedTensorToSparse``, as the serving graph computes them);
* ``segment_sum_then_unsorted`` (what the serving graph runs: ``SegmentSum`` adds each
  example's first 15 rows, ``UnsortedSegmentSum`` the partial sums and the further rows in
  order; jaxembed's ``_Segments``), ``unsorted_segment_sum`` (all rows; what the serving graph
  ran before), ``segment_sum`` (sorted ids),
  ``padded_reduce_sum`` (``RaggedTensor.to_tensor`` then ``reduce_sum(axis=1)``) and
  ``padded_cumsum`` (``cumsum`` along the row, its last column), each including the gather and
  the segment ids;
* three ways to get TF's order out of faster kernels, each adding zero rows (``x + 0.0`` is
  ``x`` for a sum that starts from ``+0.0``): ``segment_sum_zero_interleaved`` (each row followed
  by three zero rows: ``SegmentSum`` reduces a segment of 16 or more rows into four interleaved
  accumulators, Eigen's ``InnerMostDimPreserver``, so every real row lands in the first one),
  ``sparse_segment_sum_zero_blocks`` (each row followed by seven zero rows: ``SparseSegmentSum``
  adds blocks of 8, so every block holds one real row) and ``sparse_dense_matmul``
  (``SparseTensorDenseMatMul`` of the examples' 0/1 rows by the gathered rows, which adds an
  example's rows in order).

Each time includes the session call (``noop``: the same feeds, one ``Identity``); the JSON gives
medians in seconds, ``over_gather`` (a candidate's time minus ``gather``'s) and
``bit_identical_to_left_to_right`` per candidate.

Run: ``python benchmarks/bench_segment_sums.py`` (``--batch``, ``--max-len``, ``--rows``).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from bench_w import interleaved  # noqa: E402
from jaxembed.export._lookup import _Segments  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--max-len", type=int, default=40, help="second feature: 1..max-len ids")
    p.add_argument("--rows", type=int, default=500_000, help="table rows")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def left_to_right(table: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each example's rows summed in order, from a float32 zero (the reference bits)."""
    out = np.zeros((len(lengths), table.shape[1]), np.float32)
    for example, i in zip(np.repeat(np.arange(len(lengths)), lengths), ids, strict=True):
        out[example] = out[example] + table[i]
    return out


def zero_row_sums(rows: tf.Tensor, segments: tf.Tensor, examples: tf.Tensor) -> dict:
    """The candidates that reach TF's order through zero rows (see the module docstring)."""
    n = tf.size(segments, out_type=tf.int64)
    with_zero = tf.concat([rows, tf.zeros([1, rows.shape[1]], rows.dtype)], axis=0)

    def spread(x: tf.Tensor, fill: tf.Tensor | int, k: int) -> tf.Tensor:
        """Each entry of ``x`` followed by ``k - 1`` copies of ``fill``."""
        return tf.reshape(tf.pad(x[:, None], [[0, 0], [0, k - 1]], constant_values=fill), [-1])

    def repeated(k: int) -> tf.Tensor:
        return tf.reshape(tf.tile(segments[:, None], [1, k]), [-1])

    positions = tf.range(n)
    matrix = tf.stack([segments, positions], axis=1)
    return {
        "segment_sum_zero_interleaved": tf.math.segment_sum(
            tf.gather(with_zero, spread(positions, n, 4)), repeated(4)
        ),
        "sparse_segment_sum_zero_blocks": tf.raw_ops.SparseSegmentSumWithNumSegments(
            data=with_zero,
            indices=spread(positions, n, 8),
            segment_ids=repeated(8),
            num_segments=examples,
        ),
        "sparse_dense_matmul": tf.raw_ops.SparseTensorDenseMatMul(
            a_indices=matrix,
            a_values=tf.ones([n], rows.dtype),
            a_shape=tf.stack([tf.cast(examples, tf.int64), n]),
            b=rows,
        ),
    }


def main() -> None:
    args = parse_args()
    tf.compat.v1.disable_eager_execution()
    rng = np.random.default_rng(args.seed)
    b = args.batch
    lengths = np.concatenate([np.ones(b), rng.integers(1, args.max_len + 1, b)]).astype(np.int64)
    ids = rng.integers(0, args.rows, int(lengths.sum())).astype(np.int64)
    values = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        table = tf.Variable(values)
        ids_in = tf.compat.v1.placeholder(tf.int64, [None], name="ids")
        lengths_in = tf.compat.v1.placeholder(tf.int64, [None], name="lengths")
        splits = tf.concat([tf.zeros([1], tf.int64), tf.cumsum(lengths_in)], axis=0)
        rows = tf.gather(table, ids_in)
        indices, _, _ = tf.raw_ops.RaggedTensorToSparse(
            rt_nested_splits=[splits], rt_dense_values=ids_in
        )
        segments = indices[:, 0]
        padded = tf.RaggedTensor.from_row_splits(rows, splits, validate=False).to_tensor()
        fetches = {
            "noop": tf.identity(lengths_in),
            "gather": rows,
            "segment_ids": segments,
            "unsorted_segment_sum": tf.math.unsorted_segment_sum(
                rows, segments, tf.size(lengths_in)
            ),
            "segment_sum_then_unsorted": _Segments.of(lengths_in).sum(rows),
            "segment_sum": tf.math.segment_sum(rows, segments),
            "padded_reduce_sum": tf.reduce_sum(padded, axis=1),
            "padded_cumsum": tf.math.cumsum(padded, axis=1)[:, -1],
            **zero_row_sums(rows, segments, tf.size(lengths_in)),
        }
        config = tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=args.threads, inter_op_parallelism_threads=args.threads
        )
        session = tf.compat.v1.Session(graph=graph, config=config)
        session.run(tf.compat.v1.global_variables_initializer())
    feed = {ids_in: ids, lengths_in: lengths}
    want = left_to_right(values, ids, lengths)
    sums = [k for k in fetches if k not in ("noop", "gather", "segment_ids")]
    exact = {}
    for name in sums:
        got = session.run(fetches[name], feed)
        exact[name] = bool(np.array_equal(got.view(np.int32), want.view(np.int32)))
    calls = {name: (lambda t=t: session.run(t, feed)) for name, t in fetches.items()}
    times = interleaved(calls, args.repeats, 10)
    seconds = {k: float(np.median(v)) for k, v in times.items()}
    print(
        json.dumps(
            {
                "workload": {
                    "examples": 2 * b,
                    "rows_summed": len(ids),
                    "dim": args.dim,
                    "table_rows": args.rows,
                    "threads": args.threads,
                    "tensorflow": tf.__version__,
                },
                "seconds": {k: round(v, 7) for k, v in seconds.items()},
                "over_gather": {k: round(seconds[k] - seconds["gather"], 7) for k in sums},
                "bit_identical_to_left_to_right": exact,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
