"""Differential test: ``je.embedding_lookup`` against TF's ``serving_embedding_lookup``.

Each seed builds one random case (``make_case``): a nested structure of 1-5 features (dicts,
lists and tuples, 1-3 levels; sometimes the inputs cover only part of the feature config), 1-3
tables (shared by several features), and, per feature, a random input kind:

* dense ``[B]`` or ``[B, k]`` (a plain gather);
* sparse rank 2 (safe path; ``validate_weights_and_indices=False``; sequence branch) or rank 3;
* ragged (combined; sequence; ``output_shape`` in both modes).

Rows are mostly short with duplicates and empty rows, sometimes 20-40 entries long so that TF's
summation order matters (tf_semantics.md section 4.4). Weights are random, with zero and negative
weights to exercise the safe path's pruning; negative ids appear only where TF prunes them. TF is
run on the same case in the same process and ``assert_matches_tf`` applies section 4.4's rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

# TensorFlow is resolved on first use: the tests that need no TF run without it.
from tf_reference import (
    assert_matches_tf,
    flatten_with_paths,
    map_structure,
    tf_lookup,
)

import jaxembed as je

N_SEEDS = 240
COMBINERS = ("sum", "mean", "sqrtn")
# Table dims: below TF's 8-float packet, one packet, a packet and a part, two packets (TF sums
# long weighted sparse rows by packet: tests/test_tf_fidelity_weighted_order.py).
DIMS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)
DICT_KEYS = ("user", "item", "ctx", "a", "b", "zeta", "q1", "Query", "x_2", "hist")


@dataclass
class Case:
    feature_config: Any
    inputs: Any
    weights: Any
    tables: dict


# --------------------------------------------------------------------------------------------
# Random pieces
# --------------------------------------------------------------------------------------------


def _row_lengths(rng: np.random.RandomState, n_rows: int, long_rows: bool) -> np.ndarray:
    """Mostly 1-6 entries; some empty rows; some 20-40 entry rows when ``long_rows``."""
    lengths = rng.randint(1, 7, size=n_rows)
    lengths[rng.rand(n_rows) < 0.25] = 0
    if long_rows:
        lengths[rng.rand(n_rows) < 0.4] = rng.randint(20, 41)
    return lengths


def _ids(rng: np.random.RandomState, n: int, vocab: int) -> np.ndarray:
    """Random ids in [0, vocab), often drawn from a few ids so rows hold duplicates."""
    if rng.rand() < 0.4:
        pool = rng.randint(0, vocab, size=rng.randint(1, 4))
        return rng.choice(pool, size=n)
    return rng.randint(0, vocab, size=n)


def _weights(rng: np.random.RandomState, n: int, nonpositive: bool) -> np.ndarray:
    w = rng.uniform(0.1, 2.0, size=n)
    if nonpositive:
        r = rng.rand(n)
        w[r < 0.15] = 0.0
        w[(r >= 0.15) & (r < 0.3)] *= -1.0
    return w.astype(np.float32)


def _int_array(rng: np.random.RandomState, ids: np.ndarray):
    """Ids as int32 or int64 numpy, or as a jax array."""
    r = rng.rand()
    if r < 0.2:
        return jnp.asarray(ids, jnp.int32)
    return ids.astype(np.int64 if r < 0.5 else np.int32)


def _float_weights(rng: np.random.RandomState, w: np.ndarray) -> np.ndarray:
    """float32 weights; sometimes float64 holding the same values (we accept and cast them)."""
    return w.astype(np.float64) if rng.rand() < 0.1 else w


def _factorise(rng: np.random.RandomState, n: int) -> tuple[int, ...]:
    """A random shape with product n: (n,), (a, n // a) or (1, ..)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    r = rng.rand()
    if r < 0.35:
        return (n,)
    if r < 0.45:
        return (1, n)
    a = int(rng.choice(divisors))
    return (a, n // a)


def _columns(rng: np.random.RandomState, n: int, width: int, left_aligned: bool) -> np.ndarray:
    if left_aligned:
        return np.arange(n)
    return np.sort(rng.choice(width, size=n, replace=False))


# --------------------------------------------------------------------------------------------
# One feature: (FeatureConfig, input, weight or None)
# --------------------------------------------------------------------------------------------


def _dense_leaf(rng, table):
    batch = rng.randint(1, 9)
    shape = (batch,) if rng.rand() < 0.5 else (batch, rng.randint(1, 5))
    ids = _ids(rng, int(np.prod(shape)), table.vocabulary_size).reshape(shape)
    output_shape = (batch,) if rng.rand() < 0.15 else None  # ignored for dense inputs
    fc = je.FeatureConfig(
        table,
        validate_weights_and_indices=bool(rng.rand() < 0.7),
        output_shape=output_shape,
        name="dense",
    )
    return fc, _int_array(rng, ids), None


def _sparse_leaf(rng, table):
    vocab = table.vocabulary_size
    mode = rng.choice(["safe", "safe", "unsafe", "sequence", "rank3"])
    long_rows = rng.rand() < 0.3
    if mode == "rank3":
        lead = (rng.randint(1, 4), rng.randint(1, 4))
    else:
        lead = (rng.randint(1, 9),)
    n_rows = int(np.prod(lead))
    max_seq = 0
    if mode == "sequence":
        max_seq = rng.randint(1, 7)
        width = rng.randint(1, 9)  # may be shorter or longer than max_seq
        lengths = np.minimum(_row_lengths(rng, n_rows, False), width)
        left_aligned = rng.rand() < 0.3
    else:
        lengths = _row_lengths(rng, n_rows, long_rows)
        width = int(lengths.max(initial=0)) + rng.randint(0, 3) or 1
        left_aligned = rng.rand() < 0.6
    indices, ids = [], []
    for r, n in enumerate(lengths):
        pos = np.unravel_index(r, lead)
        for c in _columns(rng, int(n), width, left_aligned):
            indices.append([*pos, c])
        ids.append(_ids(rng, int(n), vocab))
    indices = np.asarray(indices, np.int64).reshape(-1, len(lead) + 1)
    ids = np.concatenate(ids).astype(np.int64)
    dense_shape = [*lead, width]

    validate = mode != "unsafe" if mode != "rank3" else bool(rng.rand() < 0.6)
    safe = mode in ("safe", "rank3") and validate
    if safe and rng.rand() < 0.3:  # negative ids are pruned by the safe path
        ids[rng.rand(ids.size) < 0.2] = -rng.randint(1, 4)

    output_shape = None
    if mode == "safe" and rng.rand() < 0.15:
        output_shape = (n_rows,)  # ignored for sparse inputs, and switches off the sequence branch
        if rng.rand() < 0.5:
            max_seq = rng.randint(1, 4)  # ignored (combining branch, with a warning)
    if mode == "rank3" and rng.rand() < 0.2:
        max_seq = rng.randint(1, 4)  # ignored for rank 3

    weight = None
    if max_seq == 0 and rng.rand() < 0.5:
        w = _weights(rng, ids.size, nonpositive=rng.rand() < 0.5)
        weight = je.Sparse(indices, _float_weights(rng, w), dense_shape)
    fc = je.FeatureConfig(
        table,
        max_sequence_length=max_seq,
        validate_weights_and_indices=validate,
        output_shape=output_shape,
        name=f"sparse_{mode}",
    )
    values = ids if rng.rand() < 0.5 else ids.astype(np.int32)
    return fc, je.Sparse(indices, values, dense_shape), weight


def _ragged_leaf(rng, table):
    mode = rng.choice(["combine", "combine", "sequence", "shape_combine", "shape_sequence"])
    batch = rng.randint(1, 9)
    lengths = _row_lengths(rng, batch, long_rows=rng.rand() < 0.3)
    ids = _ids(rng, int(lengths.sum()), table.vocabulary_size)
    max_seq, output_shape = 0, None
    if mode == "sequence":
        max_seq = rng.randint(1, 7)
    elif mode == "shape_combine":
        output_shape = _factorise(rng, batch)
    elif mode == "shape_sequence":
        output_shape = _factorise(rng, batch * rng.randint(2, 5))
    if output_shape is not None:
        if rng.rand() < 0.2:
            max_seq = rng.randint(1, 4)  # output_shape wins
        if rng.rand() < 0.5:
            output_shape = list(output_shape)
    weight = None
    if max_seq == 0 and rng.rand() < 0.6:  # ignored in the shape_sequence mode, as in TF
        w = _weights(rng, ids.size, nonpositive=rng.rand() < 0.3)
        weight = je.Ragged.from_row_lengths(_float_weights(rng, w), lengths)
    fc = je.FeatureConfig(
        table,
        max_sequence_length=max_seq,
        validate_weights_and_indices=bool(rng.rand() < 0.7),
        output_shape=output_shape,
        name=f"ragged_{mode}",
    )
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(
        np.int64 if rng.rand() < 0.5 else np.int32
    )
    if rng.rand() < 0.5:
        inp = je.Ragged(_int_array(rng, ids), splits)
    else:
        inp = je.Ragged.from_row_lengths(ids.astype(np.int32), lengths)
    return fc, inp, weight


# --------------------------------------------------------------------------------------------
# Structures
# --------------------------------------------------------------------------------------------


def _container(rng: np.random.RandomState, children: list) -> Any:
    r = rng.rand()
    if r < 0.45:
        keys = rng.choice(DICT_KEYS, size=len(children), replace=False)
        return {str(k): c for k, c in zip(keys, children, strict=True)}
    return list(children) if r < 0.7 else tuple(children)


def _random_tree(rng: np.random.RandomState, leaves: list[int], depth: int) -> Any:
    """Nests ``leaves`` (ints) into dicts/lists/tuples at most ``depth`` levels deep."""
    if depth == 1 or len(leaves) == 1:
        return _container(rng, leaves)
    n_groups = rng.randint(1, len(leaves) + 1)
    cuts = sorted(rng.choice(np.arange(1, len(leaves)), size=n_groups - 1, replace=False))
    groups = [leaves[a:b] for a, b in zip([0, *cuts], [*cuts, len(leaves)], strict=True)]
    children = [
        g[0] if len(g) == 1 and rng.rand() < 0.6 else _random_tree(rng, g, depth - 1)
        for g in groups
    ]
    return _container(rng, children)


def _prune(tree: Any, keep: set[int]) -> Any:
    """The sub-structure holding only the leaves in ``keep``, with unchanged paths (or None).

    Dict keys can be dropped freely; lists and tuples can only lose a suffix, so a dropped child
    before a kept one is restored whole.
    """
    if isinstance(tree, dict):
        kept = {k: _prune(v, keep) for k, v in tree.items()}
        kept = {k: v for k, v in kept.items() if v is not None}
        return kept or None
    if isinstance(tree, (list, tuple)):
        kept = [_prune(v, keep) for v in tree]
        last = max((i for i, v in enumerate(kept) if v is not None), default=-1)
        if last < 0:
            return None
        kept = [v if v is not None else tree[i] for i, v in enumerate(kept[: last + 1])]
        return type(tree)(kept)
    return tree if tree in keep else None


def make_case(seed: int) -> Case:
    rng = np.random.RandomState(seed)
    table_configs = [
        je.TableConfig(
            vocabulary_size=rng.randint(1, 51),
            dim=int(rng.choice(DIMS)),
            combiner=str(rng.choice(COMBINERS)),
            name=f"table_{i}" if rng.rand() < 0.8 else None,
        )
        for i in range(rng.randint(1, 4))
    ]
    tables = {}
    for t in table_configs:
        values = rng.normal(size=(t.vocabulary_size, t.dim)).astype(np.float32)
        tables[t] = jnp.asarray(values) if rng.rand() < 0.3 else values

    n_leaves = rng.randint(1, 6)
    leaves = []
    for _ in range(n_leaves):
        table = table_configs[rng.randint(len(table_configs))]
        make_leaf = [_dense_leaf, _sparse_leaf, _sparse_leaf, _ragged_leaf][rng.randint(4)]
        leaves.append(make_leaf(rng, table))

    if n_leaves == 1 and rng.rand() < 0.15:
        tree = 0  # a lone feature, not nested at all
    else:
        tree = _random_tree(rng, list(range(n_leaves)), depth=rng.randint(1, 4))
    input_tree = tree
    if n_leaves > 1 and rng.rand() < 0.3:  # partial inputs: a subset of the feature paths
        keep = set(rng.choice(n_leaves, size=rng.randint(1, n_leaves), replace=False).tolist())
        input_tree = _prune(tree, keep)

    feature_config = map_structure(lambda i: leaves[i][0], tree)
    inputs = map_structure(lambda i: leaves[i][1], input_tree)
    weights = map_structure(lambda i: leaves[i][2], input_tree)
    if all(leaves[i][2] is None for i in _leaf_ids(input_tree)) and rng.rand() < 0.5:
        weights = None
    return Case(feature_config, inputs, weights, tables)


def _leaf_ids(tree: Any) -> list[int]:
    out = []
    map_structure(out.append, tree)
    return out


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:max_sequence_length")
@pytest.mark.parametrize("seed", range(N_SEEDS))
def test_matches_tf(seed):
    case = make_case(seed)
    want = tf_lookup(case.inputs, case.weights, case.tables, case.feature_config)
    got = je.embedding_lookup(case.inputs, case.weights, case.tables, case.feature_config)
    assert_matches_tf(got, want, case.inputs, case.weights, case.tables, case.feature_config)


def test_cases_cover_the_space():
    """The seeds reach every input kind and mode the module docstring promises."""
    seen = set()
    for seed in range(N_SEEDS):
        case = make_case(seed)
        flat_fc = dict(flatten_with_paths(case.feature_config))
        flat_w = dict(flatten_with_paths(case.weights)) if case.weights is not None else {}
        for path, inp in flatten_with_paths(case.inputs):
            fc = flat_fc[path]
            kind = type(inp).__name__
            seen.add((kind, fc.name))
            if flat_w.get(path) is not None:
                seen.add((kind, "weighted", fc.table.combiner))
                if (np.asarray(flat_w[path].values) <= 0).any():
                    seen.add((kind, "non-positive weights"))
            if isinstance(inp, je.Sparse) and (np.asarray(inp.values) < 0).any():
                seen.add(("Sparse", "negative ids"))
            if isinstance(inp, je.Sparse | je.Ragged):
                lengths = np.bincount(_rows_of(inp), minlength=1)
                if lengths.max(initial=0) >= 20:
                    seen.add((kind, "long"))
        if len(flatten_with_paths(case.inputs)) < len(flatten_with_paths(case.feature_config)):
            seen.add("partial")
        tables_used = [fc.table for _, fc in flatten_with_paths(case.feature_config)]
        if len({id(t) for t in tables_used}) < len(tables_used):
            seen.add("shared table")
        for _, inp in flatten_with_paths(case.inputs):
            if isinstance(inp, je.Sparse | je.Ragged):
                rows, ids = _rows_of(inp), np.asarray(inp.values)
                if len(set(zip(rows.tolist(), ids.tolist(), strict=True))) < len(ids):
                    seen.add("duplicate ids in a row")
    expected = {
        ("ndarray", "dense"),
        ("Sparse", "sparse_safe"),
        ("Sparse", "sparse_unsafe"),
        ("Sparse", "sparse_sequence"),
        ("Sparse", "sparse_rank3"),
        ("Ragged", "ragged_combine"),
        ("Ragged", "ragged_sequence"),
        ("Ragged", "ragged_shape_combine"),
        ("Ragged", "ragged_shape_sequence"),
        ("Sparse", "long"),
        ("Ragged", "long"),
        ("Sparse", "negative ids"),
        ("Sparse", "non-positive weights"),
        ("Ragged", "non-positive weights"),
        "partial",
        "shared table",
        "duplicate ids in a row",
    }
    expected |= {(k, "weighted", c) for k in ("Sparse", "Ragged") for c in COMBINERS}
    assert expected <= seen, expected - seen


def _rows_of(inp) -> np.ndarray:
    if isinstance(inp, je.Ragged):
        return np.repeat(np.arange(inp.nrows), np.diff(np.asarray(inp.row_splits)))
    idx = np.asarray(inp.indices)
    if idx.shape[0] == 0:
        return np.zeros(0, np.int64)
    return np.ravel_multi_index(tuple(idx[:, :-1].T), inp.dense_shape[:-1])


@pytest.mark.parametrize("combiner", COMBINERS)
def test_empty_batches_and_inputs_without_entries(combiner):
    """Batch 0, and batches whose rows are all empty, for every input kind and mode."""
    table = je.TableConfig(5, 3, combiner=combiner, name="t")
    tables = {table: np.random.RandomState(0).normal(size=(5, 3)).astype(np.float32)}
    no_idx = np.zeros((0, 2), np.int64)
    no_ids = np.zeros(0, np.int32)
    fc = {
        "dense": je.FeatureConfig(table),
        "sparse0": je.FeatureConfig(table),
        "sparse_empty": je.FeatureConfig(table),
        "unsafe_empty": je.FeatureConfig(table, validate_weights_and_indices=False),
        "seq0": je.FeatureConfig(table, max_sequence_length=2),
        "seq_empty": je.FeatureConfig(table, max_sequence_length=2),
        "ragged0": je.FeatureConfig(table),
        "ragged_empty": je.FeatureConfig(table),
        "ragged_seq_empty": je.FeatureConfig(table, max_sequence_length=3),
    }
    inputs = {
        "dense": np.zeros(0, np.int32),
        "sparse0": je.Sparse(no_idx, no_ids, [0, 2]),
        "sparse_empty": je.Sparse(no_idx, no_ids, [3, 2]),
        "unsafe_empty": je.Sparse(no_idx, no_ids, [3, 2]),
        "seq0": je.Sparse(no_idx, no_ids, [0, 4]),
        "seq_empty": je.Sparse(no_idx, no_ids, [2, 4]),
        "ragged0": je.Ragged(no_ids, np.zeros(1, np.int64)),
        "ragged_empty": je.Ragged(no_ids, np.zeros(4, np.int64)),
        "ragged_seq_empty": je.Ragged(no_ids, np.zeros(3, np.int64)),
    }
    want = tf_lookup(inputs, None, tables, fc)
    got = je.embedding_lookup(inputs, None, tables, fc)
    assert_matches_tf(got, want, inputs, None, tables, fc)
