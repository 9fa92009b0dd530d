"""Workload W (design.md §7) end to end: jaxembed against TF and naive JAX, in one run.

W: 8 tables x 1M rows x dim 64, one feature per table, batch 4096, ragged ids per example
uniform in [1, 39] (mean 20), Zipf(1.05) ids (inverse CDF over ranks, hot ids first), combiner
sum, Adagrad (lr 0.1, initial accumulator 0.1, no epsilon). The alternatives of each phase are
timed interleaved (one call of each, in rotating order, per repeat) and reported as medians:

* ``lookup``: jitted ``emb.lookup(state, batch)`` (batch from ``emb.preprocess``);
* ``train``: jitted lookup + the gradient of a stand-in loss ``sum(softplus(acts * g))`` (fixed
  random ``g``; TF and naive JAX use the same loss) + ``emb.apply_gradients`` (state donated);
* ``train_linear``: the ``train`` step with a linear head ``sum(acts * g)`` instead, whose
  activation gradient ``g`` does not depend on the activations (same state and batch);
* ``preprocess``: ``emb.preprocess(inputs)`` on numpy ``je.Ragged`` inputs (host + transfer);
* ``train_prefetched``: a training loop of ``PREFETCHED_STEPS`` ``train`` steps fed by
  ``je.prefetch(emb, ...)`` (each batch preprocessed in a background thread while the previous
  step runs), reported per step;
* ``tf_lookup`` / ``tf_lookup_eager``: TF's ``serving_embedding_lookup`` on ``tf.RaggedTensor``
  inputs in a ``tf.function`` (jit_compile=False) / eagerly, tables from ``export.to_tf``;
* ``tf_adagrad``: TF's CPU train step: that lookup under a ``GradientTape``, the IndexedSlices
  deduplicated (``tf.unique`` + ``unsorted_segment_sum``, as Keras optimizers do) and applied
  with ``ResourceSparseApplyAdagradV2`` per table (``ResourceScatterAdd`` for ``--optimizer sgd``);
* ``naive``: ``jnp.take`` + ``segment_sum``, dense gradient, dense ``optax`` update of whole
  tables, jitted and donated, on ``--naive-features`` tables, scaled to all by ids;
* ``serving``: ``export.save_serving_model`` reloaded vs TF's recipe (a ``tf.Module`` holding
  ``TPUEmbeddingForServing``) saved and reloaded, both ``serving_default`` signatures;
* ``vocab``: the ``train`` step at ``--vocab-small`` and ``--vocab-large`` rows
  (``--vocab-features`` tables, default 2, to bound memory): the same batch on both sizes, and
  a batch drawn over the large vocabulary (which touches more distinct rows).

Prints one JSON object: medians (seconds), ids/s (ids in the batch / median) and the ratios
(see ``ratio_definitions`` in the output).

Run: ``python benchmarks/bench_w.py`` (full W, several minutes, ~12 GB peak), or quickly:
``python benchmarks/bench_w.py -V 100000 -B 1024 --repeats 5 --vocab-large 400000``
(``--only lookup,tf_lookup`` for a subset; options: ``--help``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import tensorflow as tf  # noqa: E402

import jaxembed as je  # noqa: E402
from jaxembed import export  # noqa: E402

TF_EMB = tf.tpu.experimental.embedding
LEARNING_RATE = 0.1
INITIAL_ACCUMULATOR = 0.1
PHASE1 = (
    "lookup",
    "train",
    "train_linear",
    "preprocess",
    "train_prefetched",
    "tf_lookup",
    "tf_lookup_eager",
    "tf_adagrad",
    "naive",
)
SECTIONS = (*PHASE1, "serving", "vocab")

PREFETCHED_STEPS = 8  # per timed call of train_prefetched (the first batch is not overlapped)
Inputs = dict[str, tuple[np.ndarray, np.ndarray]]  # feature -> (ids int64, lengths int64)


# -- data --
def zipf_cdf(vocab: int, exponent: float) -> np.ndarray:
    """CDF over ranks 0..vocab-1 with p(r) proportional to 1 / (r + 1)^exponent."""
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** exponent)
    return cdf / cdf[-1]


class Workload:
    """Per feature: ragged lengths and uniform draws; ids for any vocabulary by inverse CDF."""

    def __init__(self, args: argparse.Namespace, num_features: int, seed: int):
        rng = np.random.default_rng(seed)
        self.lengths, self.uniform = [], []
        for _ in range(num_features):
            lengths = rng.integers(1, args.max_len + 1, size=args.batch).astype(np.int64)
            self.lengths.append(lengths)
            self.uniform.append(rng.random(int(lengths.sum())))
        self.zipf = args.zipf

    def inputs(self, vocab: int, num_features: int | None = None) -> Inputs:
        cdf = zipf_cdf(vocab, self.zipf)
        n = len(self.lengths) if num_features is None else num_features
        out = {}
        for f in range(n):
            ids = np.minimum(np.searchsorted(cdf, self.uniform[f], side="right"), vocab - 1)
            out[f"f{f}"] = (ids.astype(np.int64), self.lengths[f])
        return out


def total_ids(inputs: Inputs) -> int:
    return sum(int(ids.shape[0]) for ids, _ in inputs.values())


def je_inputs(inputs: Inputs) -> dict[str, je.Ragged]:
    return {f: je.Ragged.from_row_lengths(ids, lengths) for f, (ids, lengths) in inputs.items()}


def tf_ragged(inputs: Inputs) -> dict[str, tf.RaggedTensor]:
    return {
        f: tf.RaggedTensor.from_row_lengths(tf.constant(ids), tf.constant(lengths))
        for f, (ids, lengths) in inputs.items()
    }


def fixed_grads(num_features: int, batch: int, dim: int) -> dict[str, np.ndarray]:
    """The ``g`` of the stand-in loss ``sum(softplus(acts * g))``, the same for every framework."""
    rng = np.random.default_rng(1)
    return {
        f"f{f}": rng.standard_normal((batch, dim)).astype(np.float32) * 0.01
        for f in range(num_features)
    }


# -- timing --
def interleaved(
    cases: dict[str, Callable[[], Any]], repeats: int, warmup: int, settle: float = 0.0
) -> dict[str, list[float]]:
    """Seconds per call of each case; one call of each per repeat, in rotating order, each
    after ``settle`` seconds of untimed sleep (TF's thread pool spins for a while after its
    ops; a call timed right after one would share the CPUs with those threads)."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                time.sleep(settle)
                t0 = time.perf_counter()
                cases[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def free() -> None:
    gc.collect()


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


# -- jaxembed --
def make_embedding(num_features: int, vocab: int, dim: int, optimizer: str | None):
    opt = {
        None: None,
        "adagrad": je.optimizers.Adagrad(
            LEARNING_RATE, initial_accumulator_value=INITIAL_ACCUMULATOR
        ),
        "sgd": je.optimizers.SGD(LEARNING_RATE),
    }[optimizer]
    tables = [je.TableConfig(vocab, dim, combiner="sum", name=f"t{f}") for f in range(num_features)]
    return je.Embedding({f"f{f}": je.FeatureConfig(t) for f, t in enumerate(tables)}, opt)


def model_loss(acts: dict, g: dict) -> jax.Array:
    """The stand-in model: ``sum(softplus(acts * g))`` with a fixed random ``g`` per feature.
    Its activation gradient ``g * sigmoid(acts * g)`` depends on the activations, as any model's
    does (TF's step and naive JAX use the same loss)."""
    return sum(jnp.sum(jax.nn.softplus(acts[k] * g[k])) for k in g)


def linear_loss(acts: dict, g: dict) -> jax.Array:
    """A fixed linear head ``sum(acts * g)``: its activation gradient ``g`` is a constant."""
    return sum(jnp.sum(acts[k] * g[k]) for k in g)


def train_step_fn(emb: je.Embedding, loss_fn: Callable = model_loss) -> Callable:
    """Jitted (donated) lookup + loss gradient + apply_gradients; returns the loss too."""

    def step(state, batch, g):
        acts = emb.lookup(state, batch)
        loss, grads = jax.value_and_grad(loss_fn)(acts, g)
        return emb.apply_gradients(state, batch, grads), loss

    return jax.jit(step, donate_argnums=0)


class Stepper:
    """Holds the donated state between calls of a jitted train step."""

    def __init__(self, step: Callable, state: Any, *args: Any):
        self.step, self.state, self.args = step, state, args

    def __call__(self) -> None:
        self.run(self.step)

    def run(self, step: Callable) -> None:
        """One call of ``step`` (the held step or another over the same state and args)."""
        self.state, loss = step(self.state, *self.args)
        jax.block_until_ready((self.state, loss))


# -- TF --
def tf_train_fn(tf_tables: dict, tf_features: dict, optimizer: str, grads: dict) -> Callable:
    """TF's CPU sparse step on the ``to_tf`` variables (and fresh accumulators for Adagrad)."""
    features = list(tf_features)
    variables = [tf_tables[tf_features[f].table] for f in features]
    accumulators = []
    if optimizer == "adagrad":
        accumulators = [
            tf.Variable(tf.fill(tf.shape(v), INITIAL_ACCUMULATOR), trainable=False)
            for v in variables
        ]
    g = {f: tf.constant(grads[f]) for f in features}

    @tf.function(jit_compile=False)
    def step(inputs):
        with tf.GradientTape() as tape:
            acts = TF_EMB.serving_embedding_lookup(inputs, None, tf_tables, tf_features)
            loss = tf.add_n([tf.reduce_sum(tf.nn.softplus(acts[f] * g[f])) for f in features])
        for i, grad in enumerate(tape.gradient(loss, variables)):
            rows, index = tf.unique(grad.indices)
            summed = tf.math.unsorted_segment_sum(grad.values, index, tf.size(rows))
            if optimizer == "adagrad":
                tf.raw_ops.ResourceSparseApplyAdagradV2(
                    var=variables[i].handle,
                    accum=accumulators[i].handle,
                    lr=tf.constant(LEARNING_RATE),
                    epsilon=tf.constant(0.0),
                    grad=summed,
                    indices=rows,
                )
            else:
                tf.raw_ops.ResourceScatterAdd(
                    resource=variables[i].handle, indices=rows, updates=-LEARNING_RATE * summed
                )
        return loss

    step.accumulators = accumulators  # keep them alive with the function
    return step


# -- naive JAX --
def naive_stepper(args: argparse.Namespace, inputs: Inputs, grads: dict) -> Stepper:
    """jnp.take + segment_sum, dense gradient, dense optax update of every whole table."""
    if args.optimizer == "adagrad":
        tx = optax.adagrad(LEARNING_RATE, initial_accumulator_value=INITIAL_ACCUMULATOR, eps=0.0)
    else:
        tx = optax.sgd(LEARNING_RATE)
    features = list(inputs)
    tables = [
        jax.random.normal(jax.random.key(i), (args.vocab, args.dim)) * 0.1
        for i in range(len(features))
    ]
    state = (tables, tx.init(tables))
    ids = [jnp.asarray(inputs[f][0], jnp.int32) for f in features]
    segs = [
        jnp.asarray(np.repeat(np.arange(args.batch), inputs[f][1]), jnp.int32) for f in features
    ]
    g = [jnp.asarray(grads[f]) for f in features]

    def loss_fn(tables, ids, segs):
        total = 0.0
        for table, i, s, gf in zip(tables, ids, segs, g, strict=True):
            act = jax.ops.segment_sum(jnp.take(table, i, axis=0), s, num_segments=args.batch)
            total = total + jnp.sum(jax.nn.softplus(act * gf))
        return total

    def step(state, ids, segs):
        tables, opt_state = state
        loss, dense = jax.value_and_grad(loss_fn)(tables, ids, segs)
        updates, opt_state = tx.update(dense, opt_state, tables)
        return (optax.apply_updates(tables, updates), opt_state), loss

    return Stepper(jax.jit(step, donate_argnums=0), state, ids, segs)


# -- phases --
def phase_main(args, sections: set[str], work: Workload, out: dict) -> None:
    """lookup, train, preprocess, TF lookup and TF train step, naive JAX: interleaved."""
    inputs = work.inputs(args.vocab)
    ids = total_ids(inputs)
    grads = fixed_grads(args.features, args.batch, args.dim)
    emb = make_embedding(args.features, args.vocab, args.dim, args.optimizer)
    state = emb.init(jax.random.key(0))
    raw = je_inputs(inputs)
    batch = emb.preprocess(raw)
    out["distinct_ids_per_table"] = [
        int(np.unique(inputs[f][0]).shape[0]) for f in sorted(inputs, key=lambda f: int(f[1:]))
    ]
    out["capacity_per_table"] = [int(u.shape[-1]) for u in batch.requests.values()]
    cases: dict[str, Callable[[], Any]] = {}
    tf_in = tf_ragged(inputs) if sections & {"tf_lookup", "tf_lookup_eager", "tf_adagrad"} else None
    tf_tables = tf_features = None
    if tf_in is not None:
        tf_tables, tf_features = export.to_tf(emb, state)
        want = jax.jit(emb.lookup)(state, batch)
        got = TF_EMB.serving_embedding_lookup(tf_in, None, tf_tables, tf_features)
        out["lookup_max_abs_diff_vs_tf"] = float(
            max(np.abs(np.asarray(want[f]) - got[f].numpy()).max() for f in want)
        )
        del want, got
    g = {k: jnp.asarray(v) for k, v in grads.items()}
    stepper = Stepper(train_step_fn(emb), state, batch, g)
    del state
    if "lookup" in sections:
        lookup = jax.jit(emb.lookup)
        cases["lookup"] = lambda: jax.block_until_ready(lookup(stepper.state, batch))
    if "train" in sections:
        cases["train"] = stepper
    if "train_linear" in sections:
        linear = train_step_fn(emb, linear_loss)
        cases["train_linear"] = lambda: stepper.run(linear)
    if "preprocess" in sections:
        cases["preprocess"] = lambda: jax.block_until_ready(emb.preprocess(raw))
    if "train_prefetched" in sections:

        def prefetched_loop() -> None:
            for fed in je.prefetch(emb, [raw] * PREFETCHED_STEPS):
                stepper.state, loss = stepper.step(stepper.state, fed, g)
            jax.block_until_ready((stepper.state, loss))

        cases["train_prefetched"] = prefetched_loop
    if "tf_lookup" in sections:
        tf_lookup = tf.function(
            lambda x: TF_EMB.serving_embedding_lookup(x, None, tf_tables, tf_features),
            jit_compile=False,
        )
        cases["tf_lookup"] = lambda: tf_lookup(tf_in)
    if "tf_lookup_eager" in sections:
        cases["tf_lookup_eager"] = lambda: TF_EMB.serving_embedding_lookup(
            tf_in, None, tf_tables, tf_features
        )
    if "tf_adagrad" in sections:
        tf_step = tf_train_fn(tf_tables, tf_features, args.optimizer, grads)
        cases["tf_adagrad"] = lambda: tf_step(tf_in)
    naive_ids = 0
    if "naive" in sections:
        n = min(args.naive_features, args.features)
        naive_inputs = {f"f{f}": inputs[f"f{f}"] for f in range(n)}
        naive_ids = total_ids(naive_inputs)
        cases["naive"] = naive_stepper(args, naive_inputs, grads)
        out["naive_features"] = n
    if not cases:
        return
    times = interleaved(cases, args.repeats, args.warmup)
    for name, per_call in times.items():
        t = np.asarray(per_call) / (PREFETCHED_STEPS if name == "train_prefetched" else 1)
        med = float(np.median(t))
        count = naive_ids if name == "naive" else ids
        out["seconds"][name] = round(med, 6)
        out["seconds_min"][name] = round(float(np.min(t)), 6)
        out["ids_per_s"][name] = round(count / med)
    if "naive" in times:  # scale the measured tables to all features, per id
        scaled = out["seconds"]["naive"] * ids / naive_ids
        out["seconds"]["naive_scaled_to_all_features"] = round(scaled, 6)
    out["peak_rss_gb_after_main"] = peak_rss_gb()


def tf_serving_module(tables: dict[str, np.ndarray], vocab: int, dim: int) -> tf.Module:
    """TF's own recipe: TPUEmbeddingForServing built eagerly, the same tables assigned."""
    configs = {
        f: TF_EMB.TableConfig(
            vocab, dim, initializer=tf.zeros_initializer(), combiner="sum", name=f"t{f[1:]}"
        )
        for f in tables
    }
    feature_config = {f: TF_EMB.FeatureConfig(c, name=f) for f, c in configs.items()}
    specs = {}
    for f in tables:
        for suffix in ("ids", "lengths"):
            specs[f"{f}_{suffix}"] = tf.TensorSpec([None], tf.int64, name=f"{f}_{suffix}")

    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.embedding = TF_EMB.TPUEmbeddingForServing(feature_config, None)
            self.embedding.build()
            for f, config in configs.items():
                self.embedding.embedding_tables[config].assign(tables[f])

        @tf.function(input_signature=[specs])
        def serve(self, inputs):
            ragged = {
                f: tf.RaggedTensor.from_row_lengths(inputs[f"{f}_ids"], inputs[f"{f}_lengths"])
                for f in feature_config
            }
            return TF_EMB.serving_embedding_lookup(
                ragged, None, self.embedding.embedding_tables, feature_config
            )

    return Serving()


def phase_serving(args, work: Workload, out: dict, tmp: str) -> None:
    """jaxembed's SavedModel vs TF's TPUEmbeddingForServing recipe, both saved and reloaded."""
    inputs = work.inputs(args.vocab)
    emb = make_embedding(args.features, args.vocab, args.dim, None)
    state = emb.init(jax.random.key(0))
    t0 = time.perf_counter()
    path = export.save_serving_model(
        f"{tmp}/jaxembed", emb, state, options=export.ExportOptions(verify=False)
    )
    out["export_seconds"] = {"jaxembed_save_serving_model": round(time.perf_counter() - t0, 2)}
    free()
    tables = {f"f{i}": np.asarray(t) for i, t in enumerate(state.tables.values())}
    t0 = time.perf_counter()
    module = tf_serving_module(tables, args.vocab, args.dim)
    tf.saved_model.save(
        module, f"{tmp}/tf", signatures={"serving_default": module.serve.get_concrete_function()}
    )
    out["export_seconds"]["tf_recipe_build_and_save"] = round(time.perf_counter() - t0, 2)
    del module, tables, state, emb
    free()
    served = tf.saved_model.load(path).signatures["serving_default"]
    tf_served = tf.saved_model.load(f"{tmp}/tf").signatures["serving_default"]
    request = {}
    for f, (ids, lengths) in inputs.items():
        request[f"{f}_ids"] = tf.constant(ids)
        request[f"{f}_lengths"] = tf.constant(lengths)
    a, b = served(**request), tf_served(**request)
    out["served_max_abs_diff_vs_tf_served"] = float(
        max(np.abs(a[f].numpy() - b[f].numpy()).max() for f in inputs)
    )
    del a, b
    times = interleaved(
        {"served": lambda: served(**request), "tf_served": lambda: tf_served(**request)},
        args.repeats,
        args.warmup,
    )
    ids = total_ids(inputs)
    for name, t in times.items():
        med = float(np.median(t))
        out["seconds"][name] = round(med, 6)
        out["seconds_min"][name] = round(float(np.min(t)), 6)
        out["ids_per_s"][name] = round(ids / med)
    out["peak_rss_gb_after_serving"] = peak_rss_gb()


def phase_vocab(args, work: Workload, out: dict) -> None:
    """The jaxembed train step at two vocabulary sizes, same batch shape, interleaved.

    ``train_V{small}`` and ``train_V{large}_same_ids`` run the same batch (Zipf over the small
    vocabulary): the same rows touched, only the table size differs. ``train_V{large}`` draws
    its ids by Zipf over the large vocabulary, so its batch touches more distinct rows (the long
    tail); ``distinct_rows`` records how many, and the ratios include the step time per row.
    """
    n = min(args.vocab_features, args.features)
    g = {k: jnp.asarray(v) for k, v in fixed_grads(n, args.batch, args.dim).items()}
    small = work.inputs(args.vocab_small, n)
    runs = {
        f"train_V{args.vocab_small}": (args.vocab_small, small),
        f"train_V{args.vocab_large}_same_ids": (args.vocab_large, small),
        f"train_V{args.vocab_large}": (args.vocab_large, work.inputs(args.vocab_large, n)),
    }
    cases, distinct, ids = {}, {}, {}
    for name, (vocab, inputs) in runs.items():
        emb = make_embedding(n, vocab, args.dim, args.optimizer)
        batch = emb.preprocess(je_inputs(inputs))
        cases[name] = Stepper(train_step_fn(emb), emb.init(jax.random.key(0)), batch, g)
        distinct[name] = sum(int(np.unique(i).shape[0]) for i, _ in inputs.values())
        ids[name] = total_ids(inputs)
    times = interleaved(cases, args.repeats, args.warmup)
    out["vocab_features"] = n
    out["distinct_rows"] = distinct
    for name, t in times.items():
        med = float(np.median(t))
        out["seconds"][name] = round(med, 6)
        out["seconds_min"][name] = round(float(np.min(t)), 6)
        out["ids_per_s"][name] = round(ids[name] / med)
        out.setdefault("us_per_distinct_row", {})[name] = round(med / distinct[name] * 1e6, 4)
    out["peak_rss_gb_after_vocab"] = peak_rss_gb()


def ratios(seconds: dict[str, float], args) -> dict[str, float]:
    s = dict(seconds)
    if "train" in s and "preprocess" in s:  # the host's batch, then the step, no overlap
        s["train_and_preprocess"] = s["train"] + s["preprocess"]

    def ratio(num: str, den: str) -> float | None:
        return round(s[num] / s[den], 3) if num in s and den in s else None

    out = {
        "lookup_vs_tf_lookup": ratio("tf_lookup", "lookup"),
        "lookup_vs_tf_lookup_eager": ratio("tf_lookup_eager", "lookup"),
        "train_vs_tf_adagrad": ratio("tf_adagrad", "train"),
        "train_and_preprocess_vs_tf_adagrad": ratio("tf_adagrad", "train_and_preprocess"),
        "train_prefetched_vs_tf_adagrad": ratio("tf_adagrad", "train_prefetched"),
        "train_prefetched_over_train": ratio("train_prefetched", "train"),
        "train_vs_naive": ratio("naive_scaled_to_all_features", "train"),
        "step_4M_over_100k_same_ids": ratio(
            f"train_V{args.vocab_large}_same_ids", f"train_V{args.vocab_small}"
        ),
        "step_4M_over_100k_own_ids": ratio(
            f"train_V{args.vocab_large}", f"train_V{args.vocab_small}"
        ),
        "train_linear_over_train": ratio("train_linear", "train"),
        "preprocess_vs_step": ratio("preprocess", "train"),
        "served_vs_tf_served": ratio("tf_served", "served"),
    }
    return {k: v for k, v in out.items() if v is not None}


RATIO_DEFINITIONS = {
    "lookup_vs_tf_lookup": "tf_lookup s / lookup s (> 1: jaxembed faster)",
    "lookup_vs_tf_lookup_eager": "tf_lookup_eager s / lookup s (> 1: jaxembed faster)",
    "train_vs_tf_adagrad": "tf_adagrad s / train s (> 1: jaxembed faster)",
    "train_and_preprocess_vs_tf_adagrad": "tf_adagrad s / (train s + preprocess s): the step "
    "with its host preprocess, not overlapped (je.prefetch overlaps them), against TF's step on "
    "ready tf.RaggedTensor inputs (> 1: jaxembed faster)",
    "train_prefetched_vs_tf_adagrad": "tf_adagrad s / train_prefetched s: a training loop's "
    "seconds per step, je.prefetch preprocessing the next batches while the step runs, against "
    "TF's step on ready tf.RaggedTensor inputs (> 1: jaxembed faster)",
    "train_prefetched_over_train": "train_prefetched s / train s (1.0: preprocess entirely "
    "hidden behind the step)",
    "train_vs_naive": "naive_scaled_to_all_features s / train s (> 1: jaxembed faster)",
    "step_4M_over_100k_same_ids": "train s at --vocab-large / at --vocab-small, the same batch "
    "(the same rows touched; ideal 1.0)",
    "step_4M_over_100k_own_ids": "train s at --vocab-large with ids drawn over it (more "
    "distinct rows: see distinct_rows, us_per_distinct_row) / at --vocab-small",
    "train_linear_over_train": "train_linear s / train s (a linear head's step over the "
    "softplus step; 1.0: no cost for gradients that do not depend on the activations)",
    "preprocess_vs_step": "preprocess s / train s (host cost per batch relative to the step)",
    "served_vs_tf_served": "tf_served s / served s (> 1: jaxembed's SavedModel faster)",
    "per_row_4M_over_100k_own_ids": "us_per_distinct_row at --vocab-large (own ids) / at "
    "--vocab-small",
}


def add_workload_args(p: argparse.ArgumentParser, features: int) -> None:
    """W's shape options (features, vocabulary, dim, batch, ids per example, Zipf exponent),
    shared by the benchmarks built on W."""
    p.add_argument("-F", "--features", type=int, default=features, help="features, one table each")
    p.add_argument("-V", "--vocab", type=int, default=1_000_000)
    p.add_argument("-D", "--dim", type=int, default=64)
    p.add_argument("-B", "--batch", type=int, default=4096)
    p.add_argument("-L", "--max-len", type=int, default=39, help="ids per example ~ U[1, L]")
    p.add_argument("--zipf", type=float, default=1.05)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p, features=8)
    p.add_argument("--optimizer", choices=("adagrad", "sgd"), default="adagrad")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each (compiles)")
    p.add_argument("--naive-features", type=int, default=2, help="tables the naive step runs on")
    p.add_argument("--vocab-features", type=int, default=2, help="tables of the vocab phase")
    p.add_argument("--vocab-small", type=int, default=100_000)
    p.add_argument("--vocab-large", type=int, default=4_000_000)
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmpdir", default=None, help="where the SavedModels are written (removed)")
    args = p.parse_args()
    sections = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = sections - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")

    start = time.perf_counter()
    work = Workload(args, args.features, args.seed)
    ids = total_ids(work.inputs(args.vocab))
    out: dict[str, Any] = {
        "benchmark": "workload_w",
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "jax_device": jax.devices()[0].device_kind,
        },
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "tensorflow": tf.__version__,
            "optax": optax.__version__,
        },
        "config": vars(args),
        "ids_per_batch": ids,
        "seconds": {},
        "seconds_min": {},
        "ids_per_s": {},
    }
    if sections & set(PHASE1):
        phase_main(args, sections, work, out)
        free()
    if "serving" in sections:
        tmp = tempfile.mkdtemp(prefix="bench_w_", dir=args.tmpdir)
        try:
            phase_serving(args, work, out, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        free()
    if "vocab" in sections:
        phase_vocab(args, work, out)
        free()
    out["ratios"] = ratios(out["seconds"], args)
    per_row = out.get("us_per_distinct_row", {})
    small, large = f"train_V{args.vocab_small}", f"train_V{args.vocab_large}"
    if small in per_row and large in per_row:
        out["ratios"]["per_row_4M_over_100k_own_ids"] = round(per_row[large] / per_row[small], 3)
    out["ratio_definitions"] = {k: RATIO_DEFINITIONS[k] for k in out["ratios"]}
    out["notes"] = [
        "ids_per_s = ids in the batch (all features) / median seconds; medians of interleaved "
        "runs within each phase (main: lookup/train/preprocess/TF/naive; serving; vocab)",
        f"naive measured on {out.get('naive_features', 0)} of {args.features} tables; "
        "naive_scaled_to_all_features = its seconds x (all ids / its ids)",
        f"vocab phase uses {min(args.vocab_features, args.features)} tables (memory); its "
        "ids_per_s counts those tables' ids",
        "tf_adagrad deduplicates the IndexedSlices (tf.unique + unsorted_segment_sum) before "
        "ResourceSparseApplyAdagradV2, so each touched row is updated once, as in jaxembed",
    ]
    out["wall_seconds"] = round(time.perf_counter() - start, 1)
    out["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
