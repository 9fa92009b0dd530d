"""Memory of one long example: a batch with one very long row against the same batch without it.

The batch: ``--batch`` ragged rows of U[1, 39] ids (Zipf-free uniform ids over ``--vocab``); the
long case replaces row 0 by ``--long`` ids. Each case runs in a fresh subprocess: one table
(Adagrad), ``Embedding.preprocess``, a jitted lookup + ``apply_gradients`` step, and
``je.embedding_lookup`` on the same inputs. Reported per case:

* ``peak_rss_mb``: the process's peak resident memory (``VmHWM``) after the step;
* ``host_peak_mb``: ``tracemalloc``'s peak during ``preprocess`` and ``plan_feature`` (numpy
  reports its buffers to tracemalloc);
* ``batch_mb``: bytes of the ``Batch``'s device arrays.

``growth_mb`` is the long case minus the base case. Prints one JSON object.

Run: ``python benchmarks/bench_long_row.py`` (20,000 ids) or ``--long 70000``; add
``--kernels 0`` for the pure-JAX path, ``--kind sparse`` for an unweighted sparse input.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _inputs(args: argparse.Namespace, long: int):
    import numpy as np

    import jaxembed as je

    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(1, 40, size=args.batch)
    if long:
        lengths[0] = long
    ids = rng.integers(0, args.vocab, size=int(lengths.sum()))
    weights = rng.random(ids.shape[0]).astype(np.float32) + 0.5
    if args.kind == "sparse":
        rows = np.repeat(np.arange(args.batch), lengths)
        cols = np.arange(rows.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        shape = (args.batch, int(lengths.max()))
        return je.Sparse(np.stack([rows, cols], 1), ids, shape), None
    inp = je.Ragged.from_row_lengths(ids, lengths)
    if args.kind == "weighted":
        return inp, je.Ragged.from_row_lengths(weights, lengths)
    return inp, None


def _case(args: argparse.Namespace, long: int) -> dict:
    """One case, in this (fresh) process."""
    import tracemalloc

    import jax
    import numpy as np

    import jaxembed as je
    from jaxembed.lookup import plan_feature

    table = je.TableConfig(args.vocab, args.dim, combiner=args.combiner, name="t")
    features = {"f": je.FeatureConfig(table)}
    emb = je.Embedding(features, je.optimizers.Adagrad(0.1))
    state = emb.init(jax.random.key(0))
    inp, weight = _inputs(args, long)
    inputs = {"f": inp}
    weights = None if weight is None else {"f": weight}

    tracemalloc.start()
    batch = emb.preprocess(inputs, weights)
    plan_feature("f", inp, weight, features["f"])
    host_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    batch_bytes = sum(x.nbytes for x in jax.tree.leaves(batch))

    @jax.jit
    def step(state, batch):
        acts = emb.lookup(state, batch)
        grads = jax.tree.map(lambda a: 0.01 * a, acts)
        return emb.apply_gradients(state, batch, grads), acts

    state, acts = step(state, batch)
    jax.block_until_ready(state)
    tables = emb.embedding_tables(state)
    out = je.embedding_lookup(inputs, weights, tables, features)
    jax.block_until_ready(out)
    return {
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "host_peak_mb": round(host_peak / 2**20, 2),
        "batch_mb": round(batch_bytes / 2**20, 2),
        "ids": int(np.asarray(inp.values).shape[0]),
        "checksum": float(np.asarray(acts["f"], np.float64).sum()),
    }


def _run(args: argparse.Namespace, long: int) -> dict:
    env = dict(os.environ, JAXEMBED_CPU_KERNELS=str(args.kernels))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = [sys.executable, __file__, "--case", str(long), *_forward(args)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:], "returncode": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _forward(args: argparse.Namespace) -> list[str]:
    return [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("case", "long")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", type=int, default=20000, help="ids in the long row")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=100000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--combiner", default="sum", choices=("sum", "mean", "sqrtn"))
    parser.add_argument("--kind", default="ragged", choices=("ragged", "weighted", "sparse"))
    parser.add_argument("--kernels", type=int, default=1, choices=(0, 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(_case(args, args.case)))
        return
    base, long = _run(args, 0), _run(args, args.long)
    result: dict = {"benchmark": "long_row", "config": vars(args), "base": base, "long": long}
    if "error" not in base and "error" not in long:
        result["growth_mb"] = {
            k: round(long[k] - base[k], 1) for k in ("peak_rss_mb", "host_peak_mb", "batch_mb")
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
