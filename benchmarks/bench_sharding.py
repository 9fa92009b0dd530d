"""Communication of a sharded training step, read from the compiled HLO, and shard balance.

Workload W (design.md §7) on 8 simulated CPU devices: 8 tables x 1M rows x dim 64 (row-sharded
mod 8), batch 4096, ragged ids per example uniform in [1, 39], Zipf(1.05) ids, combiner sum,
Adagrad. Prints one JSON object:

* ``collectives``: the collectives of the compiled train step (lookup + gradient + update) with
  the bytes of their results per device (including the 1/N share a device keeps), summed as
  ``bytes_per_step_per_device``;
* ``minimum_bytes_per_step_per_device``: what any row-sharded algorithm must move: each device
  receives the rows of its distinct ids that live on other shards (forward), sends their
  gradients back to the owners (backward), and sends the ids themselves (int32);
* ``balance``: lookups (and distinct ids) per shard, max/mean, under mod placement (row r on
  shard r mod N) and contiguous placement (row r on shard r div ceil(V/N)).

Run: ``python benchmarks/bench_sharding.py`` (options: ``--help``).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxembed as je  # noqa: E402

_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "s64": 8, "f64": 8, "pred": 1}
_COLLECTIVE = re.compile(
    r"= (.+?) (all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)(-start)?\("
)


def collective_bytes(hlo_text: str) -> list[dict]:
    """Each collective op in compiled HLO text with the byte size of its result (per device)."""
    found = []
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        size = 0
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            size += n * _DTYPE_BYTES.get(dtype, 4)
        found.append({"op": m.group(2), "result": m.group(1), "bytes": size})
    return found


def summarize(ops: list[dict]) -> list[dict]:
    """Collectives grouped by kind and size: count and bytes of each."""
    groups: dict[tuple, int] = {}
    for o in ops:
        key = (o["op"], o["bytes"])
        groups[key] = groups.get(key, 0) + 1
    return [{"op": op, "count": c, "bytes_each": b} for (op, b), c in sorted(groups.items())]


def make_batch(rng, args):
    inputs = {}
    for f in range(args.tables):
        lengths = rng.integers(1, args.max_ids + 1, size=args.batch)
        ids = (rng.zipf(args.zipf, size=lengths.sum()) - 1) % args.vocab
        inputs[f"f{f}"] = je.Ragged.from_row_lengths(ids, lengths)
    return inputs


def balance(inputs, args, n):
    """max/mean of lookups and of distinct ids per shard, mod vs contiguous placement."""
    per_shard = -(-args.vocab // n)
    out = {}
    for name, shard_of in (("mod", lambda r: r % n), ("contiguous", lambda r: r // per_shard)):
        lookups, distinct = np.zeros(n), np.zeros(n)
        for rg in inputs.values():
            ids = np.asarray(rg.values)
            lookups += np.bincount(shard_of(ids), minlength=n)
            distinct += np.bincount(shard_of(np.unique(ids)), minlength=n)
        out[name] = {
            "lookups_max_over_mean": round(float(lookups.max() / lookups.mean()), 3),
            "distinct_ids_max_over_mean": round(float(distinct.max() / distinct.mean()), 3),
        }
    return out


def minimum_bytes(inputs, args, n):
    """Bytes a device must receive (rows) and send (ids, gradients) per step, averaged."""
    total = 0.0
    for rg in inputs.values():
        ids, splits = np.asarray(rg.values), np.asarray(rg.row_splits)
        bounds = np.linspace(0, args.batch, n + 1).astype(int)
        for d in range(n):
            local = np.unique(ids[splits[bounds[d]] : splits[bounds[d + 1]]])
            remote = int((local % n != d).sum())
            total += remote * (2 * args.dim * 4 + 4)  # row in, gradient out, id out
    return total / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--max-ids", type=int, default=39)
    p.add_argument("--zipf", type=float, default=1.05)
    args = p.parse_args()

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("x",))
    tables = [
        je.TableConfig(args.vocab, args.dim, combiner="sum", name=f"t{f}")
        for f in range(args.tables)
    ]
    emb = je.Embedding(
        {f"f{f}": je.FeatureConfig(t) for f, t in enumerate(tables)},
        je.optimizers.Adagrad(0.05),
        mesh=mesh,
    )
    inputs = make_batch(np.random.default_rng(0), args)
    batch = emb.preprocess(inputs)
    state = emb.abstract_state()  # shapes and shardings only: nothing is allocated

    def step(state, batch):
        acts = emb.lookup(state, batch)
        return emb.apply_gradients(state, batch, jax.tree.map(lambda a: a * 0.01, acts))

    hlo = jax.jit(step).lower(state, batch).compile().as_text()
    ops = collective_bytes(hlo)
    moved = sum(o["bytes"] for o in ops)
    minimum = minimum_bytes(inputs, args, n)
    print(
        json.dumps(
            {
                "benchmark": "sharded_train_step_communication",
                "devices": n,
                "config": vars(args),
                "plan": str(emb.plan).splitlines(),
                "collectives": summarize(ops),
                "bytes_per_step_per_device": moved,
                "minimum_bytes_per_step_per_device": round(minimum),
                "moved_over_minimum": round(moved / minimum, 2),
                "balance": balance(inputs, args, n),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
