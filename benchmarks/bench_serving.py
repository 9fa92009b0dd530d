"""Serving latency: jaxembed's SavedModel against TF's own serving recipe, as TF Serving runs them.

The workload is a recommender's request: six features over four tables, two pairs sharing a
table (``item`` / ``history``, ``categories`` / ``clicked``), combiners sum / mean / sqrtn, one
weighted feature, ragged lengths:

=============  ==========  =====================  ========  ==========
feature        table       rows x dim             combiner  ids/example
=============  ==========  =====================  ========  ==========
user           users       ``--users`` x 32       sum       1
item           items       ``--items`` x 32       mean      1
history        items                              mean      1-40
categories     categories  1000 x 16              mean      1-5, weighted
clicked        categories                         mean      0-8
query          words       50000 x 32             sqrtn     1-10
=============  ==========  =====================  ========  ==========

The two SavedModels take the same inputs (``p_ids``, ``p_lengths`` and ``p_weights`` per
feature ``p``) and return the same activations:

* ``jaxembed``: ``export.save_serving_model`` (and, with ``--quantize``, its int8 / float16
  tables);
* ``tf_recipe``: TF's documented way to serve TPU-trained tables on CPU: a ``tf.Module`` holding
  ``TPUEmbeddingForServing`` (the same tables assigned) whose serving function builds
  ``tf.RaggedTensor``s and calls ``serving_embedding_lookup``.

Each model is loaded into its own TF1 ``Session`` (``tf.compat.v1.saved_model.loader.load``, as
TF Serving runs a SavedModel), with ``--threads`` intra- and inter-op threads, and the calls of
all models are interleaved (one of each per repeat, rotating order); medians are reported. Also
reported: the ops in each serving graph (its nodes and those of every function it calls), the
largest difference between the models' outputs, and a floor: ``floor_gathers_and_sums``, a
SavedModel holding only one gather and one ``UnsortedSegmentSum`` per table (the work of any
lookup that sums with ``UnsortedSegmentSum``, as TF's ragged ``reduce_sum`` does), so
``tf_recipe_over_floor_gathers_and_sums`` is the most such a graph can gain over TF's recipe;
jaxembed's graph sums most rows with the cheaper ``SegmentSum`` instead (``export/_lookup.py``).

Prints one JSON object; ``ratios`` are ``tf_recipe`` seconds / ``jaxembed`` seconds (above 1:
jaxembed is faster).

Ids are uniform over each table, or with ``--zipf 1.05`` Zipf-distributed as in workload W
(hot ids first, so more of the rows a request reads are in cache).

Run: ``python benchmarks/bench_serving.py`` (batches 1 and 256), ``--batches 1,64,256``,
``--quantize int8,float16``, ``--zipf 1.05``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from bench_w import interleaved, zipf_cdf  # noqa: E402

import jaxembed as je  # noqa: E402
from jaxembed import export  # noqa: E402

TF_EMB = tf.tpu.experimental.embedding
#: feature -> (table, ids per example (low, high), weighted)
FEATURES = {
    "user": ("users", (1, 1), False),
    "item": ("items", (1, 1), False),
    "history": ("items", (1, 40), False),
    "categories": ("categories", (1, 5), True),
    "clicked": ("categories", (0, 8), False),
    "query": ("words", (1, 10), False),
}
WEIGHTED = [f for f, (_, _, weighted) in FEATURES.items() if weighted]
FLOOR = "floor_gathers_and_sums"


def table_shapes(args: argparse.Namespace) -> dict[str, tuple[int, int, str]]:
    """table -> (rows, dim, combiner)."""
    return {
        "users": (args.users, 32, "sum"),
        "items": (args.items, 32, "mean"),
        "categories": (1000, 16, "mean"),
        "words": (50_000, 32, "sqrtn"),
    }


def make_embedding(args: argparse.Namespace) -> je.Embedding:
    tables = {
        name: je.TableConfig(rows, dim, combiner=combiner, name=name)
        for name, (rows, dim, combiner) in table_shapes(args).items()
    }
    return je.Embedding(
        {f: je.FeatureConfig(tables[t], name=f) for f, (t, _, _) in FEATURES.items()}
    )


def request(args: argparse.Namespace, batch: int, seed: int) -> dict[str, np.ndarray]:
    """One request of ``batch`` examples: ``serving_default``'s inputs as numpy arrays."""
    rng = np.random.default_rng(seed)
    shapes = table_shapes(args)
    out = {}
    for f, (table, (low, high), weighted) in FEATURES.items():
        lengths = rng.integers(low, high + 1, size=batch).astype(np.int64)
        vocab = shapes[table][0]
        uniform = rng.random(int(lengths.sum()))
        if args.zipf > 0:  # workload W's ids: Zipf over ranks, hot ids first
            ids = np.minimum(np.searchsorted(zipf_cdf(vocab, args.zipf), uniform), vocab - 1)
        else:
            ids = (uniform * vocab).astype(np.int64)
        ids = ids.astype(np.int64)
        out[f"{f}_ids"], out[f"{f}_lengths"] = ids, lengths
        if weighted:
            out[f"{f}_weights"] = rng.uniform(0.25, 2.0, size=ids.size).astype(np.float32)
    return out


def tf_recipe(tables: Mapping[str, np.ndarray], args: argparse.Namespace) -> tf.Module:
    """TF's own recipe: TPUEmbeddingForServing with the same tables, ragged inputs."""
    configs = {
        name: TF_EMB.TableConfig(
            rows, dim, initializer=tf.zeros_initializer(), combiner=combiner, name=name
        )
        for name, (rows, dim, combiner) in table_shapes(args).items()
    }
    feature_config = {
        f: TF_EMB.FeatureConfig(configs[t], name=f) for f, (t, _, _) in FEATURES.items()
    }
    specs = {}
    for f in FEATURES:
        for suffix in ("ids", "lengths"):
            specs[f"{f}_{suffix}"] = tf.TensorSpec([None], tf.int64, name=f"{f}_{suffix}")
    for f in WEIGHTED:
        specs[f"{f}_weights"] = tf.TensorSpec([None], tf.float32, name=f"{f}_weights")

    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.embedding = TF_EMB.TPUEmbeddingForServing(feature_config, None)
            self.embedding.build()
            for name, config in configs.items():
                self.embedding.embedding_tables[config].assign(tables[name])

        @tf.function(input_signature=[specs])
        def serve(self, inputs):
            def ragged(key, f):
                return tf.RaggedTensor.from_row_lengths(inputs[key], inputs[f"{f}_lengths"])

            ids = {f: ragged(f"{f}_ids", f) for f in FEATURES}
            weights = {f: ragged(f"{f}_weights", f) if f in WEIGHTED else None for f in FEATURES}
            return TF_EMB.serving_embedding_lookup(
                ids, weights, self.embedding.embedding_tables, feature_config
            )

    return Serving()


class SessionModel:
    """A SavedModel loaded into its own TF1 session, called with numpy inputs."""

    def __init__(self, path: str, threads: int):
        self.graph = tf.Graph()
        config = tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads
        )
        self.session = tf.compat.v1.Session(graph=self.graph, config=config)
        with self.graph.as_default():
            meta = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], path)
        signature = meta.signature_def["serving_default"]
        self.inputs = {k: v.name for k, v in signature.inputs.items()}
        self.outputs = {k: v.name for k, v in signature.outputs.items()}

    def __call__(self, request: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {self.inputs[k]: v for k, v in request.items()}
        return self.session.run(self.outputs, feed)


def serving_ops(path: str) -> int:
    """Ops of ``serving_default``: its graph's nodes plus those of every function it calls."""
    function = tf.saved_model.load(path).signatures["serving_default"]
    graph_def = function.graph.as_graph_def()
    library = {f.signature.name: f for f in graph_def.library.function}
    seen: set[str] = set()

    def called(nodes) -> int:
        total = 0
        for node in nodes:
            total += 1
            for attr in node.attr.values():
                names = [attr.func.name] + [f.name for f in attr.list.func]
                for name in names:
                    if name in library and name not in seen:
                        seen.add(name)
                        total += called(library[name].node_def)
        return total

    return called(graph_def.node)


def gathers_and_sums(tables: Mapping[str, np.ndarray]) -> tf.Module:
    """The floor: per table one gather of its features' ids and one ``UnsortedSegmentSum`` by
    example, nothing else (no checks, combiner denominators or weights); its outputs are per
    table."""
    groups: dict[str, list[str]] = {}
    for f, (table, _, _) in FEATURES.items():
        groups.setdefault(table, []).append(f)
    specs = {
        f"{f}_{suffix}": tf.TensorSpec([None], tf.int64, name=f"{f}_{suffix}")
        for f in FEATURES
        for suffix in ("ids", "lengths")
    }
    specs.update(
        {f"{f}_weights": tf.TensorSpec([None], tf.float32, name=f"{f}_weights") for f in WEIGHTED}
    )

    class Floor(tf.Module):
        def __init__(self):
            super().__init__()
            self.tables = {name: tf.Variable(v) for name, v in tables.items()}

        @tf.function(input_signature=[specs])
        def serve(self, inputs):
            out = {}
            for table, features in groups.items():
                ids = tf.concat([inputs[f"{f}_ids"] for f in features], 0)
                lengths = tf.concat([inputs[f"{f}_lengths"] for f in features], 0)
                ends = tf.cumsum(lengths)[None]
                positions = tf.range(tf.size(ids, out_type=tf.int64))[None]
                segments = tf.raw_ops.UpperBound(sorted_inputs=ends, values=positions)[0]
                rows = tf.gather(self.tables[table], ids)
                out[table] = tf.math.unsorted_segment_sum(rows, segments, tf.size(lengths))
            return out

    return Floor()


def _save(module: tf.Module, path: str) -> str:
    tf.saved_model.save(
        module, path, signatures={"serving_default": module.serve.get_concrete_function()}
    )
    return path


def build_models(args: argparse.Namespace, tmp: str) -> dict[str, str]:
    """Writes every compared SavedModel; returns {name: path}."""
    emb = make_embedding(args)
    state = emb.init(jax.random.key(args.seed))
    paths = {}
    for quantize in [None, *args.quantize]:
        name = "jaxembed" if quantize is None else f"jaxembed_{quantize}"
        extra = {} if quantize is None else {"quantize": quantize}
        options = export.ExportOptions(weighted=WEIGHTED, **extra)
        paths[name] = export.save_serving_model(f"{tmp}/{name}", emb, state, options=options)
    tables = {emb.table_names[t]: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
    paths["tf_recipe"] = _save(tf_recipe(tables, args), f"{tmp}/tf_recipe")
    paths[FLOOR] = _save(gathers_and_sums(tables), f"{tmp}/{FLOOR}")
    return paths


def max_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    return float(max(np.max(np.abs(a[k] - b[k]), initial=0.0) for k in b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,256", help="comma-separated batch sizes")
    p.add_argument("--users", type=int, default=200_000, help="rows of the users table")
    p.add_argument("--items", type=int, default=500_000, help="rows of the items table")
    p.add_argument("--threads", type=int, default=2, help="TF intra- and inter-op threads")
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--quantize", default="", help="also time jaxembed with these, e.g. int8")
    p.add_argument(
        "--zipf", type=float, default=0.0, help="ids ~ Zipf(this) over ranks (W: 1.05); 0: uniform"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.quantize = [q for q in args.quantize.split(",") if q]
    batches = [int(b) for b in args.batches.split(",")]
    start = time.perf_counter()
    out: dict[str, Any] = {
        "benchmark": "serving",
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "versions": {"tensorflow": tf.__version__, "jax": jax.__version__},
        "config": {**vars(args), "features": {f: list(v[1]) for f, v in FEATURES.items()}},
    }
    tmp = tempfile.mkdtemp(prefix="bench_serving_")
    try:
        paths = build_models(args, tmp)
        out["graph_ops"] = {name: serving_ops(path) for name, path in paths.items()}
        models = {name: SessionModel(path, args.threads) for name, path in paths.items()}
        out["seconds"], out["ratios"], out["max_abs_diff_vs_tf_recipe"] = {}, {}, {}
        for batch in batches:
            req = request(args, batch, args.seed + batch)
            results = {name: model(req) for name, model in models.items()}
            for name in models.keys() - {FLOOR}:
                diff = max_diff(results[name], results["tf_recipe"])
                out["max_abs_diff_vs_tf_recipe"][f"{name}_batch{batch}"] = diff
            cases: dict[str, Callable[[], Any]] = {
                name: (lambda m=model, r=req: m(r)) for name, model in models.items()
            }
            times = interleaved(cases, args.repeats, args.warmup)
            medians = {name: float(np.median(t)) for name, t in times.items()}
            out["seconds"][f"batch{batch}"] = {k: round(v, 7) for k, v in medians.items()}
            out["ratios"][f"batch{batch}"] = {
                f"tf_recipe_over_{name}": round(medians["tf_recipe"] / medians[name], 3)
                for name in medians
                if name != "tf_recipe"
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
