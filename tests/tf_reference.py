"""TensorFlow reference for the lookup tests: jaxembed structures -> TF objects -> TF's lookup.

Every expected value in the lookup tests (apart from TF's own published goldens) is computed here,
by ``tf.tpu.experimental.embedding.serving_embedding_lookup`` run eagerly on the TF twins of the
jaxembed inputs, weights, tables and feature configs.

TensorFlow is imported lazily, so importing this module (e.g. from conftest.py) does not need it.

Nested structures are walked the way ``tf.nest`` walks them: dicts in sorted key order, lists and
tuples in order, everything else (including ``None``) is a leaf; paths are the keys joined with
``/`` (``"0"``, ``"user"``, ``"ctx/item"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _tf():
    """TensorFlow, or a skip of the calling test where it is not installed."""
    import pytest

    return pytest.importorskip("tensorflow")


class LazyTF:
    """A TensorFlow module (``tf``, ``tf.tpu.experimental.embedding``) resolved on first
    attribute use, so a test file imports without TF and only the tests that use TF skip."""

    def __init__(self, path: tuple[str, ...] = ()):
        self._path = path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # pytest's collection probes objects for private names
            raise AttributeError(name)
        obj = _tf()
        for part in self._path:
            obj = getattr(obj, part)
        return getattr(obj, name)


tf = LazyTF()
tf_embedding = LazyTF(("tpu", "experimental", "embedding"))


# --------------------------------------------------------------------------------------------
# Nested structures (tf.nest conventions, no TF needed)
# --------------------------------------------------------------------------------------------


def map_structure(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Applies ``fn`` to every leaf (``None`` included), keeping dicts, lists and tuples."""
    if isinstance(tree, Mapping):
        return type(tree)((k, map_structure(fn, v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_structure(fn, v) for v in tree)
    return fn(tree)


def flatten_with_paths(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` in ``tf.nest`` order (sorted dict keys); a lone leaf has path ``""``."""
    if isinstance(tree, Mapping):
        items = [(str(k), tree[k]) for k in sorted(tree)]
    elif isinstance(tree, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(tree)]
    else:
        return [(prefix, tree)]
    out = []
    for key, child in items:
        out.extend(flatten_with_paths(child, f"{prefix}/{key}" if prefix else key))
    return out


def assert_same_containers(got: Any, want: Any, path: str = "") -> None:
    """Asserts both structures have the same container types and keys (leaves not compared)."""
    where = path or "<top>"
    if isinstance(want, Mapping):
        assert isinstance(got, Mapping), f"{where}: expected a mapping, got {type(got).__name__}"
        assert set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same_containers(got[k], want[k], f"{path}/{k}" if path else str(k))
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_containers(g, w, f"{path}/{i}" if path else str(i))
    else:
        assert not isinstance(got, (Mapping, list, tuple)), f"{where}: expected a leaf"


# --------------------------------------------------------------------------------------------
# jaxembed -> TF conversion
# --------------------------------------------------------------------------------------------


class TFConverter:
    """Converts jaxembed configs and tables to TF, sharing TF TableConfigs like the je ones share.

    One converter per test case: a je TableConfig always maps to the same TF TableConfig, so
    features sharing a je table share the TF table too (TF keys tables by object identity).
    """

    def __init__(self) -> None:
        self._tables: dict[int, tuple[Any, Any]] = {}  # id(je table) -> (je table, tf table)

    def table(self, je_table: Any) -> Any:
        key = id(je_table)
        if key not in self._tables:
            tf = _tf()
            tf_table = tf.tpu.experimental.embedding.TableConfig(
                vocabulary_size=je_table.vocabulary_size,
                dim=je_table.dim,
                combiner=je_table.combiner,
                # TF warns about unnamed tables; the name plays no part in the lookup.
                name=je_table.name or f"unnamed_{len(self._tables)}",
            )
            self._tables[key] = (je_table, tf_table)  # keep je_table alive so ids stay unique
        return self._tables[key][1]

    def feature(self, je_feature: Any) -> Any:
        tf = _tf()
        shape = je_feature.output_shape
        return tf.tpu.experimental.embedding.FeatureConfig(
            table=self.table(je_feature.table),
            max_sequence_length=je_feature.max_sequence_length,
            validate_weights_and_indices=je_feature.validate_weights_and_indices,
            output_shape=None if shape is None else list(shape),
            name=je_feature.name,
        )

    def feature_config(self, nested: Any) -> Any:
        return map_structure(self.feature, nested)

    def tables(self, je_tables: Mapping[Any, Any]) -> dict[Any, Any]:
        """``{tf TableConfig: tf.Variable}`` (Variables: TF's sparse sequence path reads them)."""
        tf = _tf()
        return {
            self.table(t): tf.Variable(np.asarray(v, dtype=np.float32))
            for t, v in je_tables.items()
        }


def to_tf_leaf(x: Any, dtype: Any = np.int64) -> Any:
    """One je input/weight leaf -> tf.SparseTensor / tf.RaggedTensor / tf.Tensor (None stays).

    The values are cast to ``dtype`` (int64 for ids, float32 for weights; ``None`` keeps their
    dtype, to check TF's own dtype errors). Anything that is not a je.Sparse, je.Ragged or array
    is passed through unchanged (to check TF rejects it too).
    """
    import jax

    import jaxembed as je

    tf = _tf()
    if x is None:
        return None

    def vals(v):
        v = np.asarray(v)
        return tf.constant(v if dtype is None else v.astype(dtype))

    if isinstance(x, je.Sparse):
        rank = len(x.dense_shape)
        return tf.SparseTensor(
            indices=tf.constant(np.asarray(x.indices, dtype=np.int64).reshape(-1, rank)),
            values=vals(x.values),
            dense_shape=tf.constant(np.asarray(x.dense_shape, dtype=np.int64)),
        )
    if isinstance(x, je.Ragged):
        return tf.RaggedTensor.from_row_splits(
            vals(x.values), tf.constant(np.asarray(x.row_splits, dtype=np.int64))
        )
    if isinstance(x, (np.ndarray, jax.Array)):
        return vals(x)
    return x


def to_tf_inputs(inputs: Any, dtype: Any = np.int64) -> Any:
    return map_structure(lambda x: to_tf_leaf(x, dtype), inputs)


def to_tf_weights(weights: Any, dtype: Any = np.float32) -> Any:
    if weights is None:
        return None
    return map_structure(lambda w: to_tf_leaf(w, dtype), weights)


def tf_lookup(inputs: Any, weights: Any, tables: Mapping[Any, Any], feature_config: Any) -> Any:
    """Runs TF's ``serving_embedding_lookup`` eagerly on the TF twins; numpy, inputs' structure."""
    tf = _tf()
    conv = TFConverter()
    tf_fc = conv.feature_config(feature_config)
    tf_tables = conv.tables(tables)
    out = tf.tpu.experimental.embedding.serving_embedding_lookup(
        to_tf_inputs(inputs), to_tf_weights(weights), tf_tables, tf_fc
    )
    return tf.nest.map_structure(lambda t: t.numpy(), out)


def tf_lookup_raw(inputs: Any, weights: Any, tables: Mapping[Any, Any], feature_config: Any):
    """Like :func:`tf_lookup` but takes inputs/weights already in TF form (for error tests)."""
    tf = _tf()
    conv = TFConverter()
    return tf.tpu.experimental.embedding.serving_embedding_lookup(
        inputs, weights, conv.tables(tables), conv.feature_config(feature_config)
    )


# --------------------------------------------------------------------------------------------
# The comparator (tf_semantics.md section 4.4)
# --------------------------------------------------------------------------------------------

# Weighted sparse rows with at least this many entries are summed by Eigen in a vectorised order
# that cannot be reproduced bit-for-bit; they are compared with a tolerance.
LONG_ROW = 16
LONG_ROW_ATOL = 1e-5  # times sum_j |w_j e_j| (divided by the combiner's denominator)
SQRTN_RTOL = 1e-6  # TF computes sum(pow(w, 2)), which differs from w*w in the last bit


def left_to_right_weighted(
    rows: np.ndarray, ids: np.ndarray, w: np.ndarray, table: np.ndarray, combiner: str, n: int
) -> np.ndarray:
    """jaxembed's weighted sparse lookup in float32: each row's ``w * e`` products added left
    to right from 0 (entries in input order within a row), divided by ``sum(w)`` (mean) or
    ``sqrt(sum(w * w))`` (sqrtn), summed the same way; 0 where the divisor is 0."""
    order = np.argsort(rows, kind="stable")
    rows, ids, w = rows[order], ids[order], np.asarray(w, np.float32)[order]
    acc = np.zeros((n, table.shape[1]), np.float32)
    np.add.at(acc, rows, table[ids] * w[:, None])  # in index order, one at a time
    if combiner == "sum":
        return acc
    divisor = np.zeros(n, np.float32)
    np.add.at(divisor, rows, w if combiner == "mean" else w * w)
    divisor = divisor if combiner == "mean" else np.sqrt(divisor)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(divisor[:, None] == 0, np.float32(0), acc / divisor[:, None])


def assert_matches_tf(
    got: Any, want: Any, inputs: Any, weights: Any, tables: Mapping[Any, Any], feature_config: Any
) -> None:
    """Compares jaxembed's output ``got`` with TF's ``want`` leaf by leaf, per section 4.4.

    Bit-exact for dense, ragged, unweighted sparse and sequence outputs, and for weighted sparse
    ``sum``/``mean`` rows with fewer than 16 entries; weighted sparse outputs also equal
    ``left_to_right_weighted`` bit for bit (every row); weighted sparse ``sqrtn`` gets rtol 1e-6;
    weighted sparse rows with >= 16 entries get atol 1e-5 * sum_j |w_j e_j| (per element, scaled
    by the combiner's denominator). For ``validate_weights_and_indices=False`` (rank 2), TF drops
    trailing empty rows: TF's rows are compared with our first rows and our extra rows must be 0.
    """
    assert_same_containers(got, want)
    flat_fc = dict(flatten_with_paths(feature_config))
    flat_in = flatten_with_paths(inputs)
    if weights is None:
        flat_w = [None] * len(flat_in)
    else:
        flat_w = [w for _, w in flatten_with_paths(weights)]
    flat_got = [g for _, g in flatten_with_paths(got)]
    flat_want = [w for _, w in flatten_with_paths(want)]
    assert len(flat_got) == len(flat_in) == len(flat_want)
    for (path, inp), w, g, t in zip(flat_in, flat_w, flat_got, flat_want, strict=True):
        feature = flat_fc[path]
        table = np.asarray(tables[feature.table], dtype=np.float32)
        assert_leaf_matches_tf(path, np.asarray(g), np.asarray(t), inp, w, feature, table)


def assert_leaf_matches_tf(
    path: str, got: np.ndarray, want: np.ndarray, inp: Any, weight: Any, feature: Any, table: Any
) -> None:
    import jaxembed as je

    where = f"feature {path!r}"
    assert got.dtype == np.float32, f"{where}: dtype {got.dtype}, expected float32"
    if not isinstance(inp, je.Sparse):  # dense and ragged: always bit-exact
        assert got.shape == want.shape, f"{where}: shape {got.shape} != TF's {want.shape}"
        np.testing.assert_array_equal(got, want, err_msg=where)
        return

    shape = tuple(inp.dense_shape)
    rank = len(shape)
    sequence = feature.output_shape is None and feature.max_sequence_length > 0 and rank == 2
    if sequence:
        assert got.shape == want.shape, f"{where}: shape {got.shape} != TF's {want.shape}"
        np.testing.assert_array_equal(got, want, err_msg=where)
        return

    dim = table.shape[1]
    n_rows = int(np.prod(shape[:-1]))
    assert got.shape == shape[:-1] + (dim,), f"{where}: shape {got.shape}, dense_shape {shape}"
    got = got.reshape(n_rows, dim)
    unsafe = not feature.validate_weights_and_indices and rank <= 2
    if unsafe:
        # TF's embedding_lookup_sparse returns max(row) + 1 rows (pitfall P3); ours keeps all.
        tf_rows = want.shape[0]
        assert want.shape[1:] == (dim,) and tf_rows <= n_rows, want.shape
        np.testing.assert_array_equal(
            got[tf_rows:], 0, err_msg=f"{where}: rows TF drops must be zero"
        )
        got = got[:tf_rows]
    else:
        assert want.shape == shape[:-1] + (dim,), want.shape
        want = want.reshape(n_rows, dim)
        tf_rows = n_rows
    if weight is None:
        np.testing.assert_array_equal(got, want, err_msg=where)
        return

    # Weighted sparse: the rows TF reduces, after its pruning (safe path only).
    combiner = feature.table.combiner
    ids = np.asarray(inp.values).astype(np.int64)
    w = np.asarray(weight.values).astype(np.float32)
    idx = np.asarray(inp.indices).reshape(-1, rank)
    rows = np.ravel_multi_index(tuple(idx[:, :-1].T), shape[:-1]) if idx.size else idx[:, 0]
    keep = np.ones(ids.shape, bool)
    if not unsafe:
        keep &= ids >= 0
        if combiner != "sum":
            keep &= w > 0
    rows, ids, w32 = rows[keep], ids[keep], w[keep]
    ours = left_to_right_weighted(rows, ids, w32, table, combiner, n_rows)[:tf_rows]
    np.testing.assert_array_equal(got, ours, err_msg=f"{where}: not the left-to-right sums")
    w = w32.astype(np.float64)
    counts = np.bincount(rows, minlength=n_rows)[:tf_rows]
    abs_terms = np.zeros((n_rows, dim))
    np.add.at(abs_terms, rows, np.abs(w[:, None] * table[ids].astype(np.float64)))
    if combiner == "mean":
        denom = np.abs(np.bincount(rows, weights=w, minlength=n_rows))
    elif combiner == "sqrtn":
        denom = np.sqrt(np.bincount(rows, weights=w * w, minlength=n_rows))
    else:
        denom = np.ones(n_rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        atol = np.where(denom[:, None] > 0, LONG_ROW_ATOL * abs_terms / denom[:, None], 0.0)
    atol = np.where((counts >= LONG_ROW)[:, None], atol[:tf_rows], 0.0)
    rtol = SQRTN_RTOL if combiner == "sqrtn" else 0.0
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bad = err > atol + rtol * np.abs(want.astype(np.float64))
    if bad.any():
        r = int(np.nonzero(bad.any(axis=1))[0][0])
        raise AssertionError(
            f"{where} (weighted sparse, {combiner}): {int(bad.any(axis=1).sum())} row(s) differ "
            f"from TF beyond tolerance; first is row {r} with {int(counts[r])} entries:\n"
            f"  got  {got[r].tolist()}\n  want {want[r].tolist()}\n  atol {atol[r].tolist()}"
        )
