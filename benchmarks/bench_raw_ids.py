"""Host throughput of the raw-id mapping: jaxembed vs TF's own ops, on the same ids, same run.

Ids: ``--n`` (1M) raw ids drawn Zipf(1.05)-like from ``--distinct`` (2M) values, as

* ``string``: ``"user-<n>"`` text (numpy ``U`` array; ``bytes`` array for the ``S`` case);
* ``int64``: 64-bit ids spread over the whole int64 range (negative ones included).

Mappings, each against TF's op on the same ids:

* ``hashing``: ``je.Hashing(num_bins)`` vs ``tf.strings.to_hash_bucket_fast`` (int64 through
  ``tf.strings.as_string``);
* ``vocabulary``: ``je.Vocabulary(keys, num_oov_buckets)`` (``--keys`` keys: the most frequent
  values, so ~90% of ids hit) vs ``tf.lookup.StaticVocabularyTable``.

TF is timed twice: ``tf_op`` on an eager tensor built beforehand (the op alone), and
``tf_from_numpy`` from the same numpy array jaxembed starts from (what a host pipeline pays).
Each case checks that both give the same rows. Ratios are TF seconds / jaxembed seconds
(> 1: jaxembed faster). Interleaved rounds, each call after a short untimed sleep (``--settle``:
TF's thread pool spins after its ops and would otherwise share the CPUs with the next call),
median seconds. jaxembed's mapping uses the process's CPUs (here as many as TF's intra-op pool).
Prints one JSON object.

Run: ``python benchmarks/bench_raw_ids.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from bench_w import interleaved  # noqa: E402

import jaxembed as je  # noqa: E402


def zipf_ids(rng: np.random.Generator, n: int, distinct: int) -> np.ndarray:
    """``n`` draws of value ranks in ``[0, distinct)``, Zipf(1.05)-like (inverse CDF)."""
    ranks = np.arange(1, distinct + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-1.05)
    return np.searchsorted(cdf / cdf[-1], rng.random(n)).astype(np.int64)


def cases(kind: str, ranks: np.ndarray, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(1)
    if kind == "int64":
        values = rng.integers(-(2**63), 2**63 - 1, size=args.distinct, dtype=np.int64)
    else:
        values = np.char.add("user-", np.arange(args.distinct).astype(np.str_))
    ids = values[ranks]
    if kind == "bytes":
        ids = np.char.encode(ids, "utf-8")
    keys = values[: args.keys]
    tensor = tf.constant(ids)
    hashing = je.Hashing(args.num_bins, key_dtype="int64" if kind == "int64" else "string")
    vocabulary = je.Vocabulary(keys.tolist(), args.oov)
    tf_table = tf.lookup.StaticVocabularyTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(keys), tf.range(len(keys), dtype=tf.int64)),
        args.oov,
    )

    def tf_hash(x):
        text = tf.strings.as_string(x) if kind == "int64" else x
        return tf.strings.to_hash_bucket_fast(text, args.num_bins).numpy()

    out = {
        "hashing": {
            "jaxembed": lambda: hashing.lookup(ids),
            "tf_op": lambda: tf_hash(tensor),
            "tf_from_numpy": lambda: tf_hash(tf.constant(ids)),
        },
        "vocabulary": {
            "jaxembed": lambda: vocabulary.lookup(ids),
            "tf_op": lambda: tf_table.lookup(tensor).numpy(),
            "tf_from_numpy": lambda: tf_table.lookup(tf.constant(ids)).numpy(),
        },
    }
    for name, fns in out.items():
        rows = [np.asarray(fn()) for fn in fns.values()]
        for other in rows[1:]:
            if not np.array_equal(rows[0], other):
                raise AssertionError(f"{kind} {name}: jaxembed and TF chose different rows")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--distinct", type=int, default=2_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--num-bins", type=int, default=1_000_003)
    parser.add_argument("--oov", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--settle", type=float, default=0.05, help="seconds of sleep before a call")
    args = parser.parse_args()
    ranks = zipf_ids(np.random.default_rng(0), args.n, args.distinct)
    result: dict = {
        "ids": args.n,
        "vocabulary_keys": args.keys,
        "cpus": len(os.sched_getaffinity(0)),
    }
    for kind in ("string", "bytes", "int64"):
        for name, fns in cases(kind, ranks, args).items():
            times = interleaved(fns, args.repeats, warmup=1, settle=args.settle)
            med = {k: statistics.median(v) for k, v in times.items()}
            result[f"{kind}/{name}"] = {
                "seconds": {k: round(v, 4) for k, v in med.items()},
                "ratio_vs_tf_op": round(med["tf_op"] / med["jaxembed"], 2),
                "ratio_vs_tf_from_numpy": round(med["tf_from_numpy"] / med["jaxembed"], 2),
            }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
