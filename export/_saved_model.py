"""A SavedModel for CPU TF Serving: plain TF ops, tables as variables, checked before publishing.

The module holds one ``tf.Variable`` per table (and per model parameter) and two signatures:

* ``serving_default``: per feature path ``p`` (``/`` written as ``_``), ``p_ids`` (int64, every
  id of the batch, row-major), ``p_lengths`` (int64, ids per example) and, for the features
  listed in ``ExportOptions.weighted``, ``p_weights`` (float32, one per id);
* ``serving_examples``: ``examples``, serialized ``tf.Example``s whose int64 feature ``p`` holds
  an example's ids (and float feature ``p_weights`` its weights).

Both run the ragged lookup of ``_lookup`` and then, if given, the model translated by
``_jaxpr``. The export is written to a temporary directory, reloaded, compared with the JAX
outputs on random inputs, and only then renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxembed import _nest
from jaxembed.checkpoint import config_metadata
from jaxembed.configs import FeatureConfig
from jaxembed.embedding import Embedding, EmbeddingState
from jaxembed.inputs import Ragged
from jaxembed.lookup import embedding_lookup

from ._lookup import check_ids, ragged_lookup
from ._tf import tf

METADATA_FILE = "assets.extra/jaxembed.json"
_ALLOWED = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-/")


class ExportVerificationError(ValueError):
    """The reloaded SavedModel disagrees with the JAX outputs; nothing was published."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """How ``save_serving_model`` writes and checks the SavedModel.

    Args:
        weighted: Feature paths whose serving inputs include ``p_weights`` (not sequence
            features).
        version: Write to ``export_dir/<version>/``, the layout TF Serving watches; None writes
            to ``export_dir`` itself.
        overwrite: Replace an existing model at the target path.
        verify: Reload the model and compare it with JAX before publishing.
        sample_batch_sizes: Batch sizes of the random verification inputs.
        rtol: Relative tolerance of the verification (the lookup itself is bit-exact; a
            translated model's matmuls may differ from XLA's in the last bits).
        atol: Absolute tolerance of the verification.
        seed: Seed of the verification inputs.
        progress: Called as ``progress(description, done, total)`` as tables are converted and
            the model is written and verified (the CLI draws a progress bar with it).
    """

    weighted: Sequence[str] = ()
    version: int | None = None
    overwrite: bool = False
    verify: bool = True
    sample_batch_sizes: Sequence[int] = (1, 5)
    rtol: float = 1e-5
    atol: float = 1e-5
    seed: int = 0
    progress: Callable[[str, int, int], None] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weighted", tuple(self.weighted))
        object.__setattr__(self, "sample_batch_sizes", tuple(self.sample_batch_sizes))
        if self.version is not None and (not isinstance(self.version, int) or self.version < 0):
            raise ValueError(f"`version` must be an int >= 0 or None, got {self.version!r}.")
        if not self.sample_batch_sizes or min(self.sample_batch_sizes) < 1:
            raise ValueError(
                f"`sample_batch_sizes` must be positive ints, got {self.sample_batch_sizes}."
            )


def input_name(path: str, suffix: str) -> str:
    """The signature input name of a feature path: ``"ctx/item", "ids"`` -> ``"ctx_item_ids"``."""
    return f"{path.replace('/', '_')}_{suffix}" if path else suffix


def output_name(path: str) -> str:
    """The signature output name of a feature or output path (``/`` written as ``_``)."""
    return path.replace("/", "_") if path else "output"


def _check_paths(features: Mapping[str, FeatureConfig], options: ExportOptions) -> None:
    for path in features:
        if not path or not set(path) <= _ALLOWED or path.startswith(("_", "-", "/")):
            raise ValueError(
                f"Feature path {path!r} cannot name a SavedModel input: use dict keys made of "
                "letters, digits, '_', '.' and '-' (e.g. {'user_id': FeatureConfig(...)})."
            )
    names = [input_name(p, "ids") for p in features]
    clash = {n for n in names if names.count(n) > 1}
    if clash:
        raise ValueError(f"Feature paths give clashing signature names {sorted(clash)}.")
    for path in options.weighted:
        if path not in features:
            raise ValueError(
                f"ExportOptions.weighted names {path!r}, which is not a feature path; paths "
                f"are {sorted(features)}."
            )
        if features[path].max_sequence_length > 0:
            raise ValueError(
                f"Feature {path!r} is a sequence feature and takes no weights; remove it from "
                "ExportOptions.weighted."
            )


class _ServingModule(tf.Module):
    """Tables, the optional translated model, and the two serving functions."""

    def __init__(
        self,
        emb: Embedding,
        state: EmbeddingState,
        model: Callable | None,
        params: Any,
        options: ExportOptions,
    ):
        super().__init__(name="jaxembed")
        self._emb = emb
        self._features = dict(_nest.flatten_with_paths(emb.feature_config))
        self._weighted = set(options.weighted)
        self.tables = {}
        names = list(emb.table_names.values())
        steps = len(names) + 3
        for i, (table, array) in enumerate(emb.embedding_tables(state).items()):
            name = emb.table_names[table]
            _report(options, f"table {name} {list(array.shape)}", i, steps)
            self.tables[name] = tf.Variable(np.asarray(array), name=name, trainable=False)
        self.model = None
        if model is not None:
            from ._jaxpr import TFModel

            example = _example_activations(emb)
            self.model = TFModel(model, params, example, name="model")
        specs = {}
        for path in self._features:
            specs[input_name(path, "ids")] = tf.TensorSpec([None], tf.int64)
            specs[input_name(path, "lengths")] = tf.TensorSpec([None], tf.int64)
            if path in self._weighted:
                specs[input_name(path, "weights")] = tf.TensorSpec([None], tf.float32)
        specs = {k: tf.TensorSpec(s.shape, s.dtype, name=k) for k, s in specs.items()}
        self.serve = tf.function(self._serve, input_signature=[specs])
        self.serve_examples = tf.function(
            self._serve_examples,
            input_signature=[tf.TensorSpec([None], tf.string, name="examples")],
        )

    def _ragged(self, path: str, ids, lengths, weights):
        table = self._features[path].table
        ids = check_ids(path, ids, table.vocabulary_size)
        n = tf.size(ids, out_type=tf.int64)
        checks = [
            tf.debugging.assert_non_negative(
                lengths, message=f"feature {path}: lengths must be >= 0"
            ),
            tf.debugging.assert_equal(
                tf.reduce_sum(lengths),
                n,
                message=f"feature {path}: the lengths must add up to the number of ids",
            ),
        ]
        if weights is not None:
            checks.append(
                tf.debugging.assert_equal(
                    tf.size(weights, out_type=tf.int64),
                    n,
                    message=f"feature {path}: give one weight per id",
                )
            )
        with tf.control_dependencies(checks):
            ragged = tf.RaggedTensor.from_row_lengths(ids, lengths, validate=False)
            if weights is not None:
                weights = tf.RaggedTensor.from_row_lengths(weights, lengths, validate=False)
        return ragged, weights

    def _outputs(self, rows: dict[str, tuple]) -> dict[str, tf.Tensor]:
        """Activations for every feature, then the model (or the activations) by output name."""
        names = self._emb.table_names
        acts = {}
        for path, (ragged, weights) in rows.items():
            feature = self._features[path]
            table = self.tables[names[feature.table]]
            acts[path] = ragged_lookup(table, ragged, weights, feature, path)
        nested = _nest.pack_like(self._emb.feature_config, [acts[p] for p in self._features])
        return _named_outputs(nested if self.model is None else self.model(nested))

    def _serve(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        rows = {}
        batches = []
        for path in self._features:
            lengths = inputs[input_name(path, "lengths")]
            weights = inputs.get(input_name(path, "weights"))
            rows[path] = self._ragged(path, inputs[input_name(path, "ids")], lengths, weights)
            batches.append(tf.size(lengths, out_type=tf.int64))
        checks = [
            tf.debugging.assert_equal(
                b, batches[0], message="every feature's _lengths must have the same batch size"
            )
            for b in batches[1:]
        ]
        with tf.control_dependencies(checks):
            return self._outputs(rows)

    def _serve_examples(self, examples: tf.Tensor) -> dict[str, tf.Tensor]:
        spec = {}
        for path in self._features:
            spec[path] = tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int64)
            if path in self._weighted:
                spec[f"{path}_weights"] = tf.io.RaggedFeature(tf.float32, row_splits_dtype=tf.int64)
        parsed = tf.io.parse_example(examples, spec)
        rows = {}
        for path in self._features:
            ragged, weights = parsed[path], parsed.get(f"{path}_weights")
            ids = check_ids(path, ragged.flat_values, self._features[path].table.vocabulary_size)
            if weights is not None:
                check = tf.debugging.assert_equal(
                    weights.row_lengths(),
                    ragged.row_lengths(),
                    message=f"feature {path}: give one weight per id in every example",
                )
                with tf.control_dependencies([check]):
                    weights = tf.identity(weights)
            rows[path] = (ragged.with_flat_values(ids), weights)
        return self._outputs(rows)


def _report(options: ExportOptions, description: str, done: int, total: int) -> None:
    if options.progress is not None:
        options.progress(description, done, total)


def _named_outputs(out: Any) -> dict[str, Any]:
    """Signature outputs of a model's result: one per leaf, named by its path (``/`` -> ``_``),
    ``"output"`` for a single array."""
    return {output_name(p): v for p, v in _nest.flatten_with_paths(out)}


def _activation_shape(feature: FeatureConfig, batch: int) -> tuple[int, ...]:
    if feature.output_shape is not None:
        raise ValueError(
            f"Feature {feature.name!r} has output_shape {feature.output_shape}, whose leading "
            "dimension is not the batch; a translated model needs batch-major activations. "
            "Export it without output_shape (reshape inside the model instead)."
        )
    if feature.max_sequence_length > 0:
        return (batch, feature.max_sequence_length, feature.table.dim)
    return (batch, feature.table.dim)


def _example_activations(emb: Embedding) -> Any:
    """The lookup's output structure as ``ShapeDtypeStruct``s (batch 2; it is made symbolic)."""
    leaves = [
        jax.ShapeDtypeStruct(_activation_shape(f, 2), np.float32)
        for _, f in _nest.flatten_with_paths(emb.feature_config)
    ]
    return _nest.pack_like(emb.feature_config, leaves)


# -- verification --


def _sample_batches(features: Mapping[str, FeatureConfig], sizes: Sequence[int]) -> list[int]:
    """Batch sizes valid for every feature: ``output_shape`` features need divisors of it."""
    totals = [
        math.prod(d or 0 for d in f.output_shape) for f in features.values() if f.output_shape
    ]
    if not totals:
        return list(sizes)
    g = math.gcd(*totals)
    return sorted({math.gcd(g, b) for b in sizes} | {g})


def sample_inputs(
    emb: Embedding, batch: int, weighted: Sequence[str], rng: np.random.Generator
) -> dict[str, dict[str, np.ndarray]]:
    """Random valid serving inputs: ``{path: {"ids", "lengths"[, "weights"]}}``."""
    out = {}
    for path, feature in _nest.flatten_with_paths(emb.feature_config):
        longest = max(4, feature.max_sequence_length + 2)
        lengths = rng.integers(0, longest, size=batch).astype(np.int64)
        ids = rng.integers(0, feature.table.vocabulary_size, size=int(lengths.sum()))
        out[path] = {"ids": ids.astype(np.int64), "lengths": lengths}
        if path in weighted:
            out[path]["weights"] = rng.uniform(0.25, 2.0, size=ids.size).astype(np.float32)
    return out


def jax_outputs(
    emb: Embedding,
    state: EmbeddingState,
    samples: Mapping[str, Mapping[str, np.ndarray]],
    model: Callable | None = None,
    params: Any = None,
) -> dict[str, np.ndarray]:
    """What the SavedModel must return for ``samples``, computed with jaxembed (and the model)."""
    paths = [p for p, _ in _nest.flatten_with_paths(emb.feature_config)]

    def ragged(key):
        leaves = [
            Ragged.from_row_lengths(samples[p][key], samples[p]["lengths"])
            if key in samples[p]
            else None
            for p in paths
        ]
        return _nest.pack_like(emb.feature_config, leaves)

    acts = embedding_lookup(
        ragged("ids"), ragged("weights"), emb.embedding_tables(state), emb.feature_config
    )
    out = acts if model is None else model(params, acts)
    return {k: np.asarray(v) for k, v in _named_outputs(out).items()}


def serving_request(samples: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``serving_default``'s keyword arguments for ``samples``."""
    return {input_name(p, k): v for p, arrays in samples.items() for k, v in arrays.items()}


def serialized_examples(samples: Mapping[str, Mapping[str, np.ndarray]]) -> list[bytes]:
    """``samples`` as serialized ``tf.Example``s, one per example of the batch."""
    first = next(iter(samples.values()))
    batch = len(first["lengths"])
    splits = {p: np.concatenate([[0], np.cumsum(a["lengths"])]) for p, a in samples.items()}
    out = []
    for i in range(batch):
        feature = {}
        for path, arrays in samples.items():
            lo, hi = splits[path][i], splits[path][i + 1]
            ids = arrays["ids"][lo:hi].tolist()
            feature[path] = tf.train.Feature(int64_list=tf.train.Int64List(value=ids))
            if "weights" in arrays:
                w = arrays["weights"][lo:hi].tolist()
                feature[f"{path}_weights"] = tf.train.Feature(
                    float_list=tf.train.FloatList(value=w)
                )
        example = tf.train.Example(features=tf.train.Features(feature=feature))
        out.append(example.SerializeToString())
    return out


def _compare(got: Mapping[str, Any], want: Mapping[str, np.ndarray], what: str, options) -> None:
    if set(got) != set(want):
        raise ExportVerificationError(f"{what}: outputs {sorted(got)}, expected {sorted(want)}.")
    for name, expected in want.items():
        actual = np.asarray(got[name])
        if actual.shape != expected.shape or not np.allclose(
            actual, expected, rtol=options.rtol, atol=options.atol
        ):
            diff = (
                float(np.max(np.abs(actual - expected)))
                if actual.shape == expected.shape and actual.size
                else "n/a"
            )
            raise ExportVerificationError(
                f"{what}: output {name!r} differs from JAX (shape {actual.shape} vs "
                f"{expected.shape}, max abs diff {diff}); the SavedModel was not published. "
                "If a translated model differs only in rounding, raise ExportOptions.rtol/atol."
            )


def _verify(directory: str, emb, state, model, params, options: ExportOptions) -> None:
    loaded = tf.saved_model.load(directory)
    default = loaded.signatures["serving_default"]
    examples = loaded.signatures["serving_examples"]
    rng = np.random.default_rng(options.seed)
    features = dict(_nest.flatten_with_paths(emb.feature_config))
    for batch in _sample_batches(features, options.sample_batch_sizes):
        samples = sample_inputs(emb, batch, options.weighted, rng)
        want = jax_outputs(emb, state, samples, model, params)
        request = {k: tf.constant(v) for k, v in serving_request(samples).items()}
        _compare(default(**request), want, f"serving_default (batch {batch})", options)
        serialized = tf.constant(serialized_examples(samples))
        _compare(examples(examples=serialized), want, f"serving_examples (batch {batch})", options)


# -- writing --


def _metadata(emb: Embedding, module: _ServingModule, options: ExportOptions) -> dict:
    return {
        "format": "jaxembed-savedmodel/1",
        "config": config_metadata(emb),
        "weighted": list(options.weighted),
        "model": module.model is not None,
    }


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Renames ``tmp`` to ``final``; an existing ``final`` is replaced only with ``overwrite``."""
    if final.exists():
        if not overwrite:
            raise FileExistsError(
                f"{final} already exists. Pass ExportOptions(overwrite=True) (--overwrite on the "
                "command line) to replace it, or choose a new version."
            )
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_serving_model(
    export_dir: str | os.PathLike,
    emb: Embedding,
    state: EmbeddingState,
    model: Callable | None = None,
    params: Any = None,
    *,
    options: ExportOptions | None = None,
) -> str:
    """Writes a SavedModel that serves ``emb``'s lookup (and ``model``) with plain TF ops.

    Args:
        export_dir: Where to write (with ``options.version``, the base directory).
        emb: The ``Embedding`` whose features become the signature inputs.
        state: Its trained state (any mesh; tables are written in logical row order).
        model: A pure JAX function ``(params, activations) -> array or dict of arrays``, e.g. a
            Flax ``apply``; ``activations`` has the structure of ``emb.feature_config``. Its
            jaxpr is translated to TF ops. None exports the activations, one output per feature
            path.
        params: The model's parameters (a pytree of arrays), saved as ``tf.Variable``s.
        options: ``ExportOptions`` (weighted features, version, verification).

    Returns:
        The directory of the published SavedModel.

    Raises:
        ExportVerificationError: the reloaded model disagrees with JAX (nothing published).
        UnsupportedPrimitiveError: ``model`` uses a JAX primitive with no TF translation.
        FileExistsError: the target exists and ``options.overwrite`` is False.

    Example:
        >>> import jax, tempfile, jaxembed as je
        >>> from jaxembed import export
        >>> table = je.TableConfig(10, 4, combiner="sum", name="items")
        >>> emb = je.Embedding({"items": je.FeatureConfig(table)})
        >>> state = emb.init(jax.random.key(0))
        >>> path = export.save_serving_model(tempfile.mkdtemp() + "/model", emb, state)
        >>> served = tf.saved_model.load(path).signatures["serving_default"]
        >>> out = served(items_ids=tf.constant([1, 2, 3], tf.int64),
        ...              items_lengths=tf.constant([2, 1], tf.int64))
        >>> out["items"].shape
        TensorShape([2, 4])
    """
    options = options or ExportOptions()
    features = dict(_nest.flatten_with_paths(emb.feature_config))
    _check_paths(features, options)
    if model is None and params is not None:
        raise ValueError("`params` were given without a `model`; pass model=... or drop params.")
    module = _ServingModule(emb, state, model, params, options)
    final = Path(export_dir)
    if options.version is not None:
        final = final / str(options.version)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    steps = len(emb.table_names) + 3
    try:
        _report(options, "writing the SavedModel", steps - 3, steps)
        signatures = {
            "serving_default": module.serve.get_concrete_function(),
            "serving_examples": module.serve_examples.get_concrete_function(),
        }
        tf.saved_model.save(module, str(tmp), signatures=signatures)
        meta = tmp / METADATA_FILE
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(_metadata(emb, module, options), indent=1))
        if options.verify:
            _report(options, "reloading and checking against JAX", steps - 2, steps)
            _verify(str(tmp), emb, state, model, params, options)
        _report(options, f"publishing {final}", steps - 1, steps)
        _publish(tmp, final, options.overwrite)
        _report(options, f"published {final}", steps, steps)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
