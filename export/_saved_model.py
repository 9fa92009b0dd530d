"""A SavedModel for CPU TF Serving: plain TF ops, tables as variables, checked before publishing.

The module holds one ``tf.Variable`` per table (and per model parameter) and two signatures:

* ``serving_default``: per feature path ``p`` (``/`` written as ``_``), ``p_ids`` (int64, every
  id of the batch, row-major), ``p_lengths`` (int64, ids per example) and, for the features
  listed in ``ExportOptions.weighted``, ``p_weights`` (float32, one per id);
* ``serving_examples``: ``examples``, serialized ``tf.Example``s whose int64 feature ``p`` holds
  an example's ids (and float feature ``p_weights`` its weights).

Both run the lookup of ``_lookup`` (one gather and one segment sum per table) and then, if
given, the model translated by ``_jaxpr``. The export is written to a temporary directory,
reloaded, compared with the JAX outputs on random inputs, and only then renamed into place.

Guarantees (each refusal happens before anything is written):

* the target is replaced only if it holds a SavedModel or is an empty directory, and only with
  ``ExportOptions.overwrite``; the new model is verified first, then swapped in by renames (the
  old one is deleted last, and restored if the swap fails). Checkpoints, the checkpoint being
  exported, folders of other files and regular files are refused;
* two feature paths or model outputs that TF would give one signature key are an error;
* tables or model parameters holding NaN/Inf are refused unless
  ``ExportOptions.allow_non_finite``;
* ``serving_examples`` serves a feature that an example lacks as an empty bag (zeros), as TF's
  parser does; ``ExportOptions.strict_examples`` makes that an error naming the feature.
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
from jaxembed._files import follow_umask
from jaxembed._serving_dirs import saved_model_versions
from jaxembed.checkpoint import config_metadata
from jaxembed.configs import FeatureConfig, TableConfig
from jaxembed.embedding import Embedding, EmbeddingState
from jaxembed.inputs import Ragged
from jaxembed.lookup import embedding_lookup
from jaxembed.vocabulary import Vocabulary

from . import _quantize, _raw_ids
from ._lookup import (
    Check,
    FeatureIds,
    Guard,
    assert_guard,
    check_ids,
    lookup,
    range_guard,
)
from ._simulated_quantization import simulate
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
        allow_non_finite: Export tables and model parameters that hold NaN or Inf (by default
            such a table or parameter is an error naming it and the first bad rows).
        strict_examples: ``serving_examples`` rejects an example that lacks a feature (or holds
            no id for it), with an error naming the feature. By default a missing feature is an
            empty bag (zeros), as TF's parser reads an absent ``VarLen`` feature; TF cannot tell an
            absent feature from an empty one, so strict mode also rejects empty ones.
        quantize: How the tables are stored for serving (``_quantize``): None (float32),
            ``"int8"`` (row-wise asymmetric, FBGEMM's 8-bit row-wise layout: ``dim + 8`` bytes a
            row), ``"float16"`` or ``"bfloat16"`` (``2 * dim`` bytes a row); a string applies to
            the tables where it saves memory (at least 1 MiB of float32, and ``dim >= 8`` for
            int8), a ``{table name: scheme or None}`` mapping exactly to the tables it names.
            Only the gathered rows are dequantized in the serving graph. The verification
            compares the served outputs with JAX on the dequantized tables (what is served),
            and the metadata records each table's dtype, bytes and quantization error.

    Example:
        >>> from jaxembed import export
        >>> export.ExportOptions(version=1, strict_examples=True).strict_examples
        True
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
    allow_non_finite: bool = False
    strict_examples: bool = False
    quantize: Any = None

    def __post_init__(self) -> None:
        for flag in ("overwrite", "verify", "allow_non_finite", "strict_examples"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(
                    f"ExportOptions.{flag} must be True or False, got {getattr(self, flag)!r}."
                )
        object.__setattr__(self, "weighted", tuple(self.weighted))
        object.__setattr__(self, "quantize", _quantize.check_option(self.quantize))
        object.__setattr__(self, "sample_batch_sizes", tuple(self.sample_batch_sizes))
        if self.version is not None and (not isinstance(self.version, int) or self.version < 0):
            raise ValueError(f"`version` must be an int >= 0 or None, got {self.version!r}.")
        if not self.sample_batch_sizes or min(self.sample_batch_sizes) < 1:
            raise ValueError(
                f"`sample_batch_sizes` must be positive ints, got {self.sample_batch_sizes}."
            )


def input_name(path: str, suffix: str) -> str:
    """The signature input name of a feature path: ``"ctx/item", "ids"`` -> ``"ctx_item_ids"``.

    Example:
        >>> from jaxembed import export
        >>> export.input_name("ctx/item", "ids"), export.input_name("user", "lengths")
        ('ctx_item_ids', 'user_lengths')
    """
    return f"{path.replace('/', '_')}_{suffix}" if path else suffix


def output_name(path: str) -> str:
    """The signature output name of a feature or output path (``/`` written as ``_``)."""
    return path.replace("/", "_") if path else "output"


def _check_paths(features: Mapping[str, FeatureConfig], options: ExportOptions) -> None:
    if "" in features:
        raise ValueError(
            "A bare FeatureConfig (feature path '') gives the SavedModel's inputs no name: "
            "export an Embedding built on a dict of it, e.g. "
            "je.Embedding({'item': feature_config}, optimizer), with the same state (tables "
            "are keyed by their names, not by feature paths)."
        )
    for path in features:
        if not set(path) <= _ALLOWED or path.startswith(("_", "-", "/")):
            raise ValueError(
                f"Feature path {path!r} cannot name a SavedModel input: use dict keys made of "
                "letters, digits, '_', '.' and '-' (e.g. {'user_id': FeatureConfig(...)})."
            )
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
    inputs = [(input_name(p, s), f"feature {p!r}") for p in features for s in ("ids", "lengths")]
    inputs += [(input_name(p, "weights"), f"feature {p!r}") for p in options.weighted]
    rule = "TF writes '/' as '_', and input names ignore case"
    _check_unique(inputs, "signature input", rule, fold_case=True)
    keys = [(p, f"feature {p!r}") for p in features]
    keys += [(f"{p}_weights", f"the weights of feature {p!r}") for p in options.weighted]
    rule = "a weighted feature p reads its weights from the key p + '_weights'"
    _check_unique(keys, "tf.Example feature key", rule, fold_case=False)


def _check_unique(
    names: Sequence[tuple[str, str]], kind: str, rule: str, *, fold_case: bool
) -> None:
    """Raises if two origins give one name: ``names`` is ``[(name, origin)]``, the origin a
    description such as ``"feature 'a/b'"``; ``rule`` says why they collide.

    TF writes a path's ``/`` as ``_``, and the placeholders behind signature inputs are unique
    regardless of case (``A_ids`` and ``a_ids`` collide), hence ``fold_case`` for inputs.
    """
    seen: dict[str, tuple[str, str]] = {}
    for name, origin in names:
        first, first_origin = seen.setdefault(name.lower() if fold_case else name, (name, origin))
        if first_origin != origin:
            raise ValueError(
                f"{first_origin[0].upper()}{first_origin[1:]} and {origin} both map to the "
                f"{kind} {first!r} ({rule}), so one would be lost; rename one of them."
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
        self._strict_examples = options.strict_examples
        self.tables = {}
        self.layouts: dict[str, _quantize.Layout] = {}
        self.table_info: dict[str, dict] = {}
        self.served_tables: dict[TableConfig, np.ndarray] = {}  # the dequantized ones
        names = list(emb.table_names.values())
        steps = len(names) + 3
        schemes = _quantize.plan(
            options.quantize,
            {emb.table_names[t]: (t.vocabulary_size, t.dim) for t in emb.table_names},
        )
        for i, (table, array) in enumerate(emb.embedding_tables(state).items()):
            name = emb.table_names[table]
            _report(options, f"table {name} {list(array.shape)}", i, steps)
            values = np.asarray(array)
            if not options.allow_non_finite:
                _check_finite_table(name, values)
            layout = _quantize.Layout(schemes[name], table.vocabulary_size, table.dim)
            stored = _quantize.quantize(values, layout.scheme, name)
            error = 0.0
            if layout.scheme is not None:
                served = _quantize.dequantize(stored, layout.scheme, table.dim)
                self.served_tables[table] = served
                error = _quantize.max_abs_error(values, served)
            self.tables[name] = tf.Variable(stored, name=name, trainable=False)
            self.layouts[name] = layout
            self.table_info[name] = {
                "dtype": layout.dtype,
                "shape": list(layout.shape),
                "bytes": layout.nbytes,
                "float32_bytes": layout.float32_bytes,
                "quantization": layout.scheme,
                "max_abs_error": error,
            }
        # TF's tables for the features with a je.Vocabulary (restored by the SavedModel loader).
        self.vocabularies = {
            path: _raw_ids.vocabulary_table(feature.vocabulary)
            for path, feature in self._features.items()
            if isinstance(feature.vocabulary, Vocabulary)
        }
        self.model = None
        if model is not None:
            from ._jaxpr import TFModel

            if not options.allow_non_finite:
                _check_finite_params(params)
            example = _example_activations(emb)
            self.model = TFModel(model, params, example, name="model")
            structure: Any = self.model.output_structure  # output names checked before saving
            _named_outputs(jax.tree_util.tree_unflatten(structure, range(structure.num_leaves)))
        specs = {}
        for path, feature in self._features.items():
            specs[input_name(path, "ids")] = tf.TensorSpec([None], _raw_ids.id_dtype(feature))
            specs[input_name(path, "lengths")] = tf.TensorSpec([None], tf.int64)
            if path in self._weighted:
                specs[input_name(path, "weights")] = tf.TensorSpec([None], tf.float32)
        specs = {k: tf.TensorSpec(s.shape, s.dtype, name=k) for k, s in specs.items()}
        self.serve = tf.function(self._serve, input_signature=[specs])
        self.serve_examples = tf.function(
            self._serve_examples,
            input_signature=[tf.TensorSpec([None], tf.string, name="examples")],
        )

    def _rows(self, path: str, feature: FeatureConfig, ids: tf.Tensor) -> tuple:
        """A feature's served ids as rows in the table, and the check they must pass (None if
        none): raw ids are mapped as in training (always in range); row ids follow the
        ``out_of_range`` policy (``check_ids``)."""
        if feature.vocabulary is None:
            return check_ids(path, ids, feature)
        table = self.vocabularies.get(path)
        return _raw_ids.to_rows(ids, feature.vocabulary, table), None

    def _gather_rows(self, table: TableConfig, ids: tf.Tensor) -> tf.Tensor:
        """The float32 rows ``[n, dim]`` of ``table`` for ``ids`` (all in range): the one read
        of a table variable in the serving graph (a quantized table's gathered rows are
        dequantized), then the table's simulated quantization (``TableConfig.quantization_config``)
        as in training."""
        name = self._emb.table_names[table]
        rows = _quantize.gather_rows(self.tables[name], ids, self.layouts[name])
        if table.quantization_config is not None:
            rows = simulate(rows, table.quantization_config)
        return rows

    def _outputs(
        self, requested: list[tuple[FeatureIds, tf.Tensor | None]], request: Guard | None
    ) -> dict[str, tf.Tensor]:
        """Activations for every feature, then the model (or the activations) by output name.

        ``requested`` pairs each feature with the check of its ids (``check_ids``'s ``in_range``;
        None: no check), ``request`` guards the rest of the request (lengths, weights, batch
        sizes). All the checks are one ``Assert`` (its message, naming the features, is built
        only when it fails), and everything that reads the lengths, weights or gathered rows runs
        after it, so no op can fail first on a malformed request, with its own message. The
        gathers overlap the checks: they read clamped ids, always in the table.
        """
        ranged = [
            (f.path, check, f.feature.table.vocabulary_size)
            for f, check in requested
            if check is not None
        ]
        checked = assert_guard(Guard.all([range_guard(ranged), request]))
        features = [f for f, _ in requested]
        acts = lookup(features, self._gather_rows, checked=checked)
        nested = _nest.pack_like(self._emb.feature_config, [acts[p] for p in self._features])
        return _named_outputs(nested if self.model is None else self.model(nested))

    def _serve(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        requested = []
        for path, feature in self._features.items():
            ids, check = self._rows(path, feature, inputs[input_name(path, "ids")])
            lengths = inputs[input_name(path, "lengths")]
            weights = inputs.get(input_name(path, "weights"))
            requested.append((FeatureIds(path, feature, ids, lengths, weights), check))
        return self._outputs(requested, _request_guard([f for f, _ in requested]))

    def _serve_examples(self, examples: tf.Tensor) -> dict[str, tf.Tensor]:
        spec = {}
        for path, feature in self._features.items():
            dtype = _raw_ids.id_dtype(feature)
            spec[path] = tf.io.RaggedFeature(dtype, row_splits_dtype=tf.int64)
            if path in self._weighted:
                spec[f"{path}_weights"] = tf.io.RaggedFeature(tf.float32, row_splits_dtype=tf.int64)
        parsed = tf.io.parse_example(examples, spec)
        requested, checks = [], []
        for path, feature in self._features.items():
            ragged, weights = parsed[path], parsed.get(f"{path}_weights")
            if self._strict_examples:
                ragged = _require_feature(path, ragged)
            ids, check = self._rows(path, feature, ragged.flat_values)
            lengths = ragged.row_lengths()
            if weights is not None:
                same = tf.reduce_all(tf.equal(weights.row_lengths(), lengths))
                checks.append((same, f"feature {path}: give one weight per id in every example"))
                weights = weights.flat_values
            requested.append((FeatureIds(path, feature, ids, lengths, weights), check))
        return self._outputs(requested, Guard.of(checks))


def _request_guard(features: Sequence[FeatureIds]) -> Guard:
    """The run-time checks of a ``serving_default`` request, each naming its feature: lengths
    non-negative and adding up to the number of ids, one weight per id, and every feature with
    the same batch size.

    A good request computes them all at once: the sizes that must match are compared as two
    vectors (``got == want``: the sums of the lengths against the numbers of ids, the numbers
    of weights against those of ids, every batch size against the first), and the smallest of
    all lengths against zero. The checks one by one, with their messages, are rebuilt from those
    tensors only when one fails.
    """
    k, weighted = len(features), [i for i, f in enumerate(features) if f.weights is not None]
    n = tf.shape_n([f.ids for f in features], out_type=tf.int64)
    batch = tf.shape_n([f.lengths for f in features], out_type=tf.int64)
    sums = tf.stack([tf.reduce_sum(f.lengths) for f in features])
    counts = (
        tf.shape_n([features[i].weights for i in weighted], out_type=tf.int64) if weighted else []
    )
    got = tf.concat([sums, *counts, *batch[1:]], axis=0)
    want = tf.concat([*n, *[n[i] for i in weighted], *[batch[0]] * (k - 1)], axis=0)
    every_length = (
        tf.concat([f.lengths for f in features], axis=0) if k > 1 else features[0].lengths
    )
    ok = tf.logical_and(
        tf.reduce_all(tf.equal(got, want)),
        tf.reduce_min(every_length) >= 0,
    )

    def checks() -> list[Check]:
        equal = tf.unstack(tf.equal(got, want), num=2 * k - 1 + len(weighted))
        first = k + len(weighted)  # the batch sizes: the first in `want`, the others in `got`
        sizes = tf.concat([want[first : first + 1], got[first:]], axis=0)
        lengths = [every_length] if k == 1 else tf.split(every_length, sizes, num=k)
        out: list[Check] = []
        for i, f in enumerate(features):
            out.append((tf.reduce_all(lengths[i] >= 0), f"feature {f.path}: lengths must be >= 0"))
            add_up = f"feature {f.path}: the lengths must add up to the number of ids"
            out.append((equal[i], add_up))
            if f.weights is not None:
                j = k + weighted.index(i)
                out.append((equal[j], f"feature {f.path}: give one weight per id"))
        if k > 1:
            same = tf.reduce_all(tf.stack(equal[first:]))
            out.append((same, "every feature's _lengths must have the same batch size"))
        return out

    return Guard(ok, checks)


def _non_finite_rows(values: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Indices of the rows of a ``[V, dim]`` table holding NaN or Inf (in chunks of rows, so
    the check needs little memory beyond the table)."""
    if not jax.numpy.issubdtype(values.dtype, jax.numpy.inexact):
        return np.zeros(0, np.int64)
    rows = values.reshape(values.shape[0], -1) if values.ndim else values.reshape(1, 1)
    bad = [
        np.flatnonzero(~np.isfinite(rows[lo : lo + chunk]).all(axis=1)) + lo
        for lo in range(0, rows.shape[0], chunk)
    ]
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


def _first(indices: Sequence[Any], n: int = 5) -> str:
    shown = ", ".join(str(i) for i in indices[:n])
    return shown + (", ..." if len(indices) > n else "")


def _check_finite_table(name: str, values: np.ndarray) -> None:
    bad = _non_finite_rows(values)
    if bad.size:
        raise ValueError(
            f"Table {name!r} holds NaN or Inf in {bad.size} of its {values.shape[0]} rows "
            f"(rows {_first(bad.tolist())}), so the SavedModel would serve them; fix the "
            "training run (e.g. export an earlier checkpoint) or pass "
            "ExportOptions(allow_non_finite=True) to export them anyway."
        )


def _check_finite_params(params: Any) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        value = np.asarray(leaf)
        if not jax.numpy.issubdtype(value.dtype, jax.numpy.inexact):
            continue
        bad = np.argwhere(~np.isfinite(value))
        if bad.size:
            name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            where = [tuple(int(i) for i in index) for index in bad]
            raise ValueError(
                f"Model parameter {name!r} holds {len(where)} NaN or Inf values (at "
                f"{_first(where, 3)}), so the SavedModel would serve them; fix the training run "
                "or pass ExportOptions(allow_non_finite=True) to export them anyway."
            )


def _require_feature(path: str, ragged: tf.RaggedTensor) -> tf.RaggedTensor:
    """``ragged`` after a run-time check that every example holds at least one id of ``path``
    (TF's parser reads an absent feature as an empty one, so both are rejected)."""
    missing = tf.where(tf.equal(ragged.row_lengths(), 0))[:, 0]
    message = (
        f"feature {path}: a tf.Example lacks it (or holds no id of it), and the model was "
        "exported with ExportOptions(strict_examples=True); send at least one id of every "
        "feature in every example. Examples (0-based) without it:"
    )
    check = tf.debugging.Assert(tf.equal(tf.size(missing), 0), [message, missing])
    with tf.control_dependencies([check]):
        return tf.identity(ragged)


def _report(options: ExportOptions, description: str, done: int, total: int) -> None:
    if options.progress is not None:
        options.progress(description, done, total)


def _named_outputs(out: Any) -> dict[str, Any]:
    """Signature outputs of a model's result: one per leaf, named by its path (``/`` -> ``_``),
    ``"output"`` for a single array; two paths with one name are an error naming both."""
    leaves = _nest.flatten_with_paths(out)
    names = [(output_name(p), f"output {p!r}") for p, _ in leaves]
    _check_unique(names, "signature output", "TF writes '/' as '_'", fold_case=False)
    return {output_name(p): v for p, v in leaves}


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
    emb: Embedding,
    batch: int,
    weighted: Sequence[str],
    rng: np.random.Generator,
    min_length: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """Random valid serving inputs: ``{path: {"ids", "lengths"[, "weights"]}}``, at least
    ``min_length`` ids per example and feature."""
    out = {}
    for path, feature in _nest.flatten_with_paths(emb.feature_config):
        longest = max(4, feature.max_sequence_length + 2)
        lengths = rng.integers(min_length, longest, size=batch).astype(np.int64)
        ids = _raw_ids.sample_ids(feature, int(lengths.sum()), rng)
        out[path] = {"ids": ids, "lengths": lengths}
        if path in weighted:
            out[path]["weights"] = rng.uniform(0.25, 2.0, size=ids.size).astype(np.float32)
    return out


def jax_outputs(
    emb: Embedding,
    tables: Mapping[Any, Any],
    samples: Mapping[str, Mapping[str, np.ndarray]],
    model: Callable | None = None,
    params: Any = None,
) -> dict[str, np.ndarray]:
    """What the SavedModel must return for ``samples``, computed with jaxembed (and the model)
    on ``tables`` (``{TableConfig: [V, dim] array}``, as the SavedModel serves them)."""
    paths = [p for p, _ in _nest.flatten_with_paths(emb.feature_config)]

    def ragged(key):
        leaves = [
            Ragged.from_row_lengths(samples[p][key], samples[p]["lengths"])
            if key in samples[p]
            else None
            for p in paths
        ]
        return _nest.pack_like(emb.feature_config, leaves)

    acts = embedding_lookup(ragged("ids"), ragged("weights"), tables, emb.feature_config)
    out = acts if model is None else model(params, acts)
    return {k: np.asarray(v) for k, v in _named_outputs(out).items()}


def serving_request(samples: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``serving_default``'s keyword arguments for ``samples``."""
    return {input_name(p, k): v for p, arrays in samples.items() for k, v in arrays.items()}


def serialized_examples(samples: Mapping[str, Mapping[str, np.ndarray]]) -> list[bytes]:
    """``samples`` as serialized ``tf.Example``s, one per example of the batch: the input of
    the SavedModel's ``serve_examples`` signature.

    ``samples`` maps each feature path to its ragged ids in the ``serving_default`` layout:
    ``{"ids": [N] all examples' ids in order, "lengths": [B] ids per example}``, and
    ``"weights"`` (``[N]``) for a weighted feature. Each example's ids become the feature
    ``path`` (``int64_list``, or ``bytes_list`` for raw string ids), its weights
    ``path + "_weights"``.

    Raises:
        ValueError: a feature lacks ``ids`` or ``lengths``, its lengths do not add up to its
            ids, or the features give different batch sizes.

    Example:
        >>> import numpy as np, tensorflow as tf
        >>> from jaxembed import export
        >>> samples = {"items": {"ids": np.array([3, 1, 4]), "lengths": np.array([2, 1])}}
        >>> first, second = export.serialized_examples(samples)
        >>> tf.train.Example.FromString(second).features.feature["items"].int64_list.value
        [4]
    """
    batches = set()
    for path, arrays in samples.items():
        if "ids" not in arrays or "lengths" not in arrays:
            raise ValueError(
                f"serialized_examples: feature {path!r} has arrays {sorted(arrays)}; give it "
                "'ids' (all examples' ids in order) and 'lengths' (ids per example)."
            )
        if int(np.sum(arrays["lengths"])) != len(arrays["ids"]):
            raise ValueError(
                f"serialized_examples: feature {path!r} has {len(arrays['ids'])} ids but its "
                f"lengths add up to {int(np.sum(arrays['lengths']))}; make them agree."
            )
        batches.add(len(arrays["lengths"]))
    if len(batches) > 1:
        raise ValueError(
            f"serialized_examples: the features give batch sizes {sorted(batches)}; give "
            "every feature one length per example."
        )
    batch = batches.pop() if batches else 0
    splits = {p: np.concatenate([[0], np.cumsum(a["lengths"])]) for p, a in samples.items()}
    out = []
    for i in range(batch):
        feature = {}
        for path, arrays in samples.items():
            lo, hi = splits[path][i], splits[path][i + 1]
            ids = arrays["ids"][lo:hi].tolist()
            if arrays["ids"].dtype.kind == "S":  # raw string ids
                feature[path] = tf.train.Feature(bytes_list=tf.train.BytesList(value=ids))
            else:
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
        if actual.shape != expected.shape:
            raise ExportVerificationError(
                f"{what}: output {name!r} has shape {actual.shape}, JAX's has {expected.shape}; "
                "the SavedModel was not published."
            )
        a, b = _as_float(actual), _as_float(expected)
        close = np.isclose(a, b, rtol=options.rtol, atol=options.atol, equal_nan=True)
        if close.all():
            continue
        nan_differs = np.isnan(a) != np.isnan(b)
        if nan_differs.any():  # NaN in one, a number in the other (NaN vs NaN is equal)
            index = tuple(int(i) for i in np.argwhere(nan_differs)[0])
            sides = [("the SavedModel", a[index]), ("JAX", b[index])]
            (nan_side, _), (other, value) = sides if np.isnan(a[index]) else sides[::-1]
            raise ExportVerificationError(
                f"{what}: output {name!r} is NaN at {index} in {nan_side} but {value} in "
                f"{other}; the SavedModel was not published."
            )
        diff = float(np.max(np.abs(a - b)[~close]))
        raise ExportVerificationError(
            f"{what}: output {name!r} differs from JAX (max abs diff {diff}); the SavedModel "
            "was not published. If a translated model differs only in rounding, raise "
            "ExportOptions.rtol/atol."
        )


def _as_float(x: np.ndarray) -> np.ndarray:
    """``x`` as a float array for comparison (ints and bools exactly, floats unchanged)."""
    return x if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact) else x.astype(np.float64)


def served_tables(emb: Embedding, state: EmbeddingState, module: _ServingModule) -> dict:
    """The tables as the SavedModel serves them: the trained ones, the quantized ones
    dequantized (``{TableConfig: [V, dim] array}``)."""
    tables: dict[TableConfig, Any] = dict(emb.embedding_tables(state))
    tables.update(module.served_tables)
    return tables


def _verify(directory: str, emb, tables, model, params, options: ExportOptions) -> None:
    """Compares the reloaded SavedModel with JAX on ``tables``, the tables it serves.

    A quantized table is compared as served, dequantized: the served lookup equals JAX's on the
    same rows (bit for bit), so the tolerance need not cover the quantization error, and a wrong
    dequantization still fails. The quantization error itself, a property of the tables, is
    measured exactly at export (``max_abs_error`` per table in the metadata).
    """
    loaded = tf.saved_model.load(directory)
    default = loaded.signatures["serving_default"]
    examples = loaded.signatures["serving_examples"]
    rng = np.random.default_rng(options.seed)
    features = dict(_nest.flatten_with_paths(emb.feature_config))
    for batch in _sample_batches(features, options.sample_batch_sizes):
        min_length = 1 if options.strict_examples else 0  # strict: no empty (absent) features
        samples = sample_inputs(emb, batch, options.weighted, rng, min_length)
        want = jax_outputs(emb, tables, samples, model, params)
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
        "quantize": options.quantize,
        "tables": module.table_info,
    }


# -- the target: what may be replaced --

_SAVED_MODEL_FILES = {"saved_model.pb", "fingerprint.pb"}
_SAVED_MODEL_DIRS = {"variables", "assets", "assets.extra"}  # assets.extra: METADATA_FILE, warmup


def _checkpoint_steps(directory: Path) -> list[int]:
    """The steps of the jaxembed checkpoint in ``directory`` (numbered subdirectories holding
    an ``embedding`` item); empty if it holds none."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    return sorted(int(e.name) for e in entries if e.name.isdigit() and (e / "embedding").is_dir())


def _is_saved_model_entry(entry: Path) -> bool:
    if entry.name in _SAVED_MODEL_FILES:
        return entry.is_file() and not entry.is_symlink()
    if entry.name == "variables":
        return entry.is_dir() and all(n.startswith("variables.") for n in os.listdir(entry))
    return entry.name in _SAVED_MODEL_DIRS and entry.is_dir() and not entry.is_symlink()


def _describe_target(path: Path) -> tuple[str, bool]:
    """What ``path`` (which exists) holds, and whether an overwrite may replace it."""
    if path.is_symlink():
        return f"a symbolic link to {os.readlink(path)}", False
    if not path.is_dir():
        return "a file", False
    entries = sorted(path.iterdir())
    if not entries:
        return "an empty directory", True
    steps = _checkpoint_steps(path)
    if steps:
        return f"a jaxembed checkpoint (steps {_first(steps, 10)})", False
    versions = saved_model_versions(path)
    if versions:
        return f"a TF Serving base directory (versions {_first(versions, 10)})", False
    others = [e.name + ("/" if e.is_dir() else "") for e in entries if not _is_saved_model_entry(e)]
    if not others and (path / "saved_model.pb").is_file():
        return "a SavedModel", True
    what = "files or directories that are not part of a SavedModel"
    prefix = "a SavedModel plus " if (path / "saved_model.pb").is_file() else ""
    return f"{prefix}{len(others)} {what}: {_first(others)}", False


def _check_source(final: Path, source: Path | None) -> None:
    """Refuses a target that is, is inside or contains the checkpoint being exported, or that
    lies inside any jaxembed checkpoint directory."""
    target = final.resolve()
    if source is not None:
        src = source.resolve()
        relation = (
            "is"
            if target == src
            else "is inside"
            if src in target.parents
            else "contains"
            if target in src.parents
            else None
        )
        if relation:
            raise ValueError(
                f"The export target {final} {relation} the checkpoint being exported "
                f"({source}); choose an output directory outside the checkpoint."
            )
    for parent in target.parents:
        steps = _checkpoint_steps(parent)
        if steps:
            raise ValueError(
                f"The export target {final} is inside the jaxembed checkpoint {parent} (steps "
                f"{_first(steps, 10)}); choose an output directory outside the checkpoint."
            )


def _check_target(final: Path, overwrite: bool, source: Path | None) -> None:
    """Raises unless ``final`` is free, or (with ``overwrite``) a SavedModel or an empty directory.

    Nothing is written or deleted here; ``save_serving_model`` calls it before any export work
    and again just before the swap.
    """
    _check_source(final, source)
    for parent in final.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise FileExistsError(
                    f"Cannot export to {final}: {parent} is a file, not a directory; choose an "
                    "output path whose parent is a directory."
                )
            break
    if not (final.exists() or final.is_symlink()):
        return
    what, replaceable = _describe_target(final)
    if not replaceable:
        raise FileExistsError(
            f"Cannot export to {final}: it holds {what}, and only a SavedModel or an empty "
            "directory may be replaced (even with overwrite); choose another output directory."
        )
    if not overwrite:
        raise FileExistsError(
            f"{final} already exists ({what}); pass ExportOptions(overwrite=True) (--overwrite "
            "on the command line) to replace it, or choose a new directory or version."
        )


def _publish(tmp: Path, final: Path, overwrite: bool, source: Path | None) -> None:
    """Renames the verified ``tmp`` to ``final``. A previous SavedModel (or empty directory) is
    renamed aside first and deleted only once the new one is in place; if the swap fails, it is
    renamed back."""
    _check_target(final, overwrite, source)  # again: the target may have changed meanwhile
    if not (final.exists() or final.is_symlink()):
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_serving_model(
    export_dir: str | os.PathLike,
    emb: Embedding,
    state: EmbeddingState,
    model: Callable | None = None,
    params: Any = None,
    *,
    options: ExportOptions | None = None,
    source_checkpoint: str | os.PathLike | None = None,
) -> str:
    """Writes a SavedModel that serves ``emb``'s lookup (and ``model``) with plain TF ops.

    The target is checked before any work: it must not exist, or (with ``options.overwrite``)
    hold a SavedModel or be an empty directory. The model is written to a temporary sibling,
    reloaded and verified, and then swapped in by renames; a replaced SavedModel is deleted only
    after the new one is in place (and is left intact if anything fails). A missing feature in a
    ``serving_examples`` request is an empty bag (zeros) unless ``options.strict_examples``.

    Args:
        export_dir: Where to write (with ``options.version``, the base directory).
        emb: The ``Embedding`` whose features become the signature inputs.
        state: Its trained state (any mesh; tables are written in logical row order).
        model: A pure JAX function ``(params, activations) -> array or dict of arrays``, e.g. a
            Flax ``apply``; ``activations`` has the structure of ``emb.feature_config``. Its
            jaxpr is translated to TF ops. None exports the activations, one output per feature
            path.
        params: The model's parameters (a pytree of arrays), saved as ``tf.Variable``s.
        options: ``ExportOptions`` (weighted features, version, overwrite, verification,
            non-finite values, strict examples).
        source_checkpoint: The jaxembed checkpoint directory ``state`` was restored from, if
            any: a target that is, is inside or contains it is refused (a target inside any
            jaxembed checkpoint directory is refused even without it).

    Returns:
        The directory of the published SavedModel.

    Raises:
        ExportVerificationError: the reloaded model disagrees with JAX (nothing published).
        UnsupportedPrimitiveError: ``model`` uses a JAX primitive with no TF translation.
        FileExistsError: the target exists and ``options.overwrite`` is False, or it holds
            something other than a SavedModel or an empty directory (a checkpoint, other files,
            a regular file), which is never replaced.
        ValueError: the target is inside a jaxembed checkpoint (or is, is inside or contains
            ``source_checkpoint``); two feature paths or outputs map to one signature key; a
            table or model parameter holds NaN/Inf (unless ``options.allow_non_finite``).

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
    final = Path(export_dir)
    if options.version is not None:
        final = final / str(options.version)
    source = None if source_checkpoint is None else Path(source_checkpoint)
    _check_target(final, options.overwrite, source)
    module = _ServingModule(emb, state, model, params, options)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    follow_umask(tmp)  # mkdtemp's 0700 would keep serving processes of other users out
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
            tables = served_tables(emb, state, module)
            _verify(str(tmp), emb, tables, model, params, options)
        _report(options, f"publishing {final}", steps - 1, steps)
        _publish(tmp, final, options.overwrite, source)
        _report(options, f"published {final}", steps, steps)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
