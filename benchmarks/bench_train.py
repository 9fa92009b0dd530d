"""Train-step cost follows the rows touched, not the vocabulary size.

Measures, in one run, a jitted training step (lookup + loss gradient + row-sparse Adagrad) of
``jaxembed.Embedding`` at two vocabulary sizes, and the naive JAX way (``jnp.take`` +
``segment_sum`` forward, a dense gradient and ``optax.adagrad`` over the whole table) at a middle
size. Prints one JSON object; the ratios are the result:

* ``vocab_ratio``: jaxembed step time at ``--vocab-large`` over ``--vocab-small`` (ideal 1.0);
* ``speedup_vs_naive``: naive JAX step time over jaxembed's at ``--vocab-naive``.

Run: ``python benchmarks/bench_train.py`` (options: ``--help``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxembed as je


def make_batches(rng, num_batches, num_features, vocab, batch, max_ids, zipf):
    """Ragged ids per example uniform in [1, max_ids], Zipf-distributed ids (hot ids first)."""
    out = []
    for _ in range(num_batches):
        feats = {}
        for f in range(num_features):
            lengths = rng.integers(1, max_ids + 1, size=batch)
            ids = (rng.zipf(zipf, size=lengths.sum()) - 1) % vocab
            feats[f"f{f}"] = je.Ragged.from_row_lengths(ids, lengths)
        out.append(feats)
    return out


def time_steps(step, state, batches, repeats):
    state = step(state, batches[0])  # compile
    jax.block_until_ready(state)
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        state = step(state, batches[r % len(batches)])
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), state


def jaxembed_step_time(args, vocab, raw_batches):
    tables = [
        je.TableConfig(vocab, args.dim, combiner="sum", name=f"t{f}") for f in range(args.features)
    ]
    feature_config = {f"f{f}": je.FeatureConfig(tables[f]) for f in range(args.features)}
    emb = je.Embedding(feature_config, je.optimizers.Adagrad(0.05))
    state = emb.init(jax.random.key(0))
    batches = [emb.preprocess(b) for b in raw_batches]

    def step(state, batch):
        acts, vjp = jax.vjp(lambda s: emb.lookup(s, batch), state)
        grads = jax.tree.map(lambda a: 2 * a / a.shape[0], acts)  # d/dact of mean(sum(act^2))
        return emb.apply_gradients(state, batch, grads)

    return time_steps(jax.jit(step, donate_argnums=0), state, batches, args.repeats)[0]


def naive_step_time(args, vocab, raw_batches):
    """jnp.take + segment_sum lookup, dense gradient, optax.adagrad over whole tables."""
    tx = optax.adagrad(0.05)
    tables = [
        jax.random.normal(jax.random.key(f), (vocab, args.dim)) * 0.1 for f in range(args.features)
    ]
    state = (tables, tx.init(tables))
    batches = []
    for b in raw_batches:
        batch = []
        for f in range(args.features):
            rg = b[f"f{f}"]
            segments = np.repeat(np.arange(rg.nrows), rg.row_lengths())
            batch.append((jnp.asarray(rg.values, jnp.int32), jnp.asarray(segments, jnp.int32)))
        batches.append(batch)

    def loss(tables, batch):
        total = 0.0
        for table, (ids, seg) in zip(tables, batch, strict=True):
            act = jax.ops.segment_sum(jnp.take(table, ids, axis=0), seg, num_segments=args.batch)
            total = total + jnp.mean(jnp.sum(act**2, axis=1))
        return total

    def step(state, batch):
        tables, opt_state = state
        grads = jax.grad(loss)(tables, batch)
        updates, opt_state = tx.update(grads, opt_state, tables)
        return optax.apply_updates(tables, updates), opt_state

    return time_steps(jax.jit(step, donate_argnums=0), state, batches, args.repeats)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", type=int, default=2, help="features, one table each")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--max-ids", type=int, default=39, help="ids per example ~ U[1, max]")
    p.add_argument("--zipf", type=float, default=1.05)
    p.add_argument("--vocab-small", type=int, default=100_000)
    p.add_argument("--vocab-large", type=int, default=4_000_000)
    p.add_argument("--vocab-naive", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()

    rng = np.random.default_rng(0)
    sizes = sorted({args.vocab_small, args.vocab_naive, args.vocab_large})
    raw = {
        v: make_batches(rng, 3, args.features, v, args.batch, args.max_ids, args.zipf)
        for v in sizes
    }
    results = {v: jaxembed_step_time(args, v, raw[v]) for v in sizes}
    naive = naive_step_time(args, args.vocab_naive, raw[args.vocab_naive])
    ids_per_step = sum(int(b.values.shape[0]) for b in raw[args.vocab_naive][0].values())
    print(
        json.dumps(
            {
                "benchmark": "train_step",
                "machine": f"{platform.machine()} {jax.devices()[0].device_kind}, "
                f"{jax.device_count()} device(s)",
                "config": vars(args),
                "ids_per_step": ids_per_step,
                "jaxembed_step_s": {str(v): round(t, 5) for v, t in results.items()},
                "naive_step_s": {str(args.vocab_naive): round(naive, 5)},
                "jaxembed_ids_per_s": {str(v): round(ids_per_step / t) for v, t in results.items()},
                "vocab_ratio": round(results[args.vocab_large] / results[args.vocab_small], 3),
                "speedup_vs_naive": round(naive / results[args.vocab_naive], 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
