"""The serving lookup's TF ops (export/_lookup.py) against TF's own serving_embedding_lookup.

Every combiner, weighted and unweighted, rows from empty to 50 ids (and up to 600): bit for bit,
eagerly and in a ``tf.function`` with a dynamic batch (as a SavedModel serves it), and equal to
jaxembed's lookup too. Features sharing a table are served by one gather and one segment sum,
and still match TF's per-feature lookup bit for bit. The two-step segment sum is
``unsorted_segment_sum`` to the bit, at every row width and around the rows where TF's
``segment_sum`` stops adding left to right.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from jaxembed.export._lookup import LEFT_TO_RIGHT_ROWS, FeatureIds, _Segments, lookup  # noqa: E402

import jaxembed as je  # noqa: E402
from jaxembed import export  # noqa: E402

TF_EMB = tf.tpu.experimental.embedding


def _served(variable, features, ids, lengths, weights):
    """``lookup`` of numpy requests, eagerly and traced with dynamic shapes."""
    paths = list(features)

    def run(ids, lengths, weights):
        parts = [FeatureIds(p, features[p], ids[p], lengths[p], weights.get(p)) for p in features]
        return lookup(parts, lambda table, i: tf.gather(variable, i))

    specs = (
        {p: tf.TensorSpec([None], tf.int64) for p in paths},
        {p: tf.TensorSpec([None], tf.int64) for p in paths},
        {p: tf.TensorSpec([None], tf.float32) for p in weights},
    )
    args = (
        {p: tf.constant(ids[p]) for p in paths},
        {p: tf.constant(lengths[p]) for p in paths},
        {p: tf.constant(w) for p, w in weights.items()},
    )
    eager = {k: v.numpy() for k, v in run(*args).items()}
    traced = tf.function(run, input_signature=specs)(*args)
    return eager, {k: v.numpy() for k, v in traced.items()}


def _left_to_right(values, lengths):
    """numpy: each example's values added one by one in float32, from 0."""
    out = np.zeros((len(lengths), *values.shape[1:]), np.float32)
    ends = np.cumsum(lengths)
    with np.errstate(invalid="ignore"):  # inf + -inf
        for b, (lo, hi) in enumerate(zip(ends - lengths, ends, strict=True)):
            for v in values[lo:hi]:
                out[b] = out[b] + v
    return out


@pytest.mark.parametrize("width", [None, 1, 7, 8, 16, 33])
def test_segment_sums_add_left_to_right_bit_for_bit(width):
    rng = np.random.default_rng(width or 0)
    edge = LEFT_TO_RIGHT_ROWS
    lengths = np.concatenate(
        [[0, 1, edge - 1, edge, edge + 1, 2 * edge + 3, 0], rng.integers(0, 41, 40), [0]]
    )
    n = int(lengths.sum())
    shape = (n,) if width is None else (n, width)
    # Magnitudes over 12 orders, so that any other order of the additions changes bits.
    values = (rng.standard_normal(shape) * np.exp(rng.uniform(-14, 14, shape))).astype(np.float32)
    flat = values.reshape(n, -1)
    flat[3] = -0.0  # an example of one -0.0 row: unsorted_segment_sum gives +0.0
    flat[40], flat[41] = np.inf, -np.inf
    flat[60] = np.nan
    segments = np.repeat(np.arange(len(lengths)), lengths)
    got = _Segments.of(tf.constant(lengths, tf.int64)).sum(tf.constant(values)).numpy()
    want = tf.math.unsorted_segment_sum(values, segments, len(lengths)).numpy()
    assert got.shape == want.shape == (len(lengths), *values.shape[1:])
    assert np.array_equal(got.view(np.int32), want.view(np.int32))
    assert np.array_equal(got, _left_to_right(values, lengths), equal_nan=True)
    # ...where TF's segment_sum alone differs once an example has 16 rows or more.
    alone = tf.math.segment_sum(values, segments).numpy()  # no rows for the trailing empties
    differ = (alone.view(np.int32) != want[: len(alone)].view(np.int32)).reshape(len(alone), -1)
    differs = np.flatnonzero(differ.any(axis=1))
    if width is not None and width >= 8:  # full 8-float packets
        assert differs.size and (lengths[differs] > edge).all(), differs
    for lengths in ([], [0, 0, 0]):
        empty = tf.zeros([0] if width is None else [0, width])
        got = _Segments.of(tf.constant(lengths, tf.int64)).sum(empty).numpy()
        assert np.array_equal(got, np.zeros((len(lengths), *empty.shape[1:]), np.float32))


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
def test_serving_lookup_is_tfs_lookup_bit_for_bit(combiner, weighted):
    rng = np.random.default_rng(["sum", "mean", "sqrtn"].index(combiner) + 3 * weighted)
    vocab, dim = 300, 16
    table = rng.normal(size=(vocab, dim)).astype(np.float32)
    lengths = rng.integers(0, 51, size=40)
    lengths[::7] = 0
    lengths[5] = 600  # long rows are summed in order too
    ids = rng.integers(0, vocab, size=int(lengths.sum()))
    weights = rng.uniform(-0.5, 3.0, size=ids.size).astype(np.float32) if weighted else None

    config = je.TableConfig(vocab, dim, combiner=combiner, name="t")
    feature = je.FeatureConfig(config)
    tf_config = TF_EMB.TableConfig(vocab, dim, combiner=combiner, name="t")
    tf_feature = TF_EMB.FeatureConfig(tf_config)
    variable = tf.Variable(table)
    ragged = tf.RaggedTensor.from_row_lengths(ids, lengths)
    tf_weights = None if weights is None else tf.RaggedTensor.from_row_lengths(weights, lengths)

    want = TF_EMB.serving_embedding_lookup(
        {"f": ragged}, {"f": tf_weights}, {tf_config: variable}, {"f": tf_feature}
    )["f"].numpy()
    eager, traced = _served(
        variable,
        {"f": feature},
        {"f": ids},
        {"f": lengths},
        {} if weights is None else {"f": weights},
    )
    np.testing.assert_array_equal(eager["f"], want)
    np.testing.assert_array_equal(traced["f"], want)

    je_ids = {"f": je.Ragged.from_row_lengths(ids, lengths)}
    je_w = None if weights is None else {"f": je.Ragged.from_row_lengths(weights, lengths)}
    got = je.embedding_lookup(je_ids, je_w, {config: table}, {"f": feature})["f"]
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_features_sharing_a_table_match_tf_bit_for_bit(combiner):
    """Weighted, unweighted and sequence features of one table, fused into one gather and one
    segment sum, equal TF's per-feature lookup bit for bit (and jaxembed's)."""
    rng = np.random.default_rng(11)
    vocab, dim, batch = 500, 8, 30
    table = rng.normal(size=(vocab, dim)).astype(np.float32)
    config = je.TableConfig(vocab, dim, combiner=combiner, name="t")
    tf_config = TF_EMB.TableConfig(vocab, dim, combiner=combiner, name="t")
    features = {
        "a": je.FeatureConfig(config),
        "b": je.FeatureConfig(config),
        "seq": je.FeatureConfig(config, max_sequence_length=5),
        "c": je.FeatureConfig(config),
    }
    tf_features = {
        p: TF_EMB.FeatureConfig(tf_config, max_sequence_length=f.max_sequence_length)
        for p, f in features.items()
    }
    lengths = {p: rng.integers(0, 40, size=batch).astype(np.int64) for p in features}
    lengths["a"][:3] = 0
    ids = {
        p: rng.integers(0, vocab, size=int(n.sum())).astype(np.int64) for p, n in lengths.items()
    }
    weights = {p: rng.uniform(-0.5, 3.0, size=ids[p].size).astype(np.float32) for p in ("a", "c")}
    variable = tf.Variable(table)
    ragged = {p: tf.RaggedTensor.from_row_lengths(ids[p], lengths[p]) for p in features}
    tf_weights = {
        p: tf.RaggedTensor.from_row_lengths(weights[p], lengths[p]) if p in weights else None
        for p in features
    }
    want = TF_EMB.serving_embedding_lookup(ragged, tf_weights, {tf_config: variable}, tf_features)
    eager, traced = _served(variable, features, ids, lengths, weights)
    je_ids = {p: je.Ragged.from_row_lengths(ids[p], lengths[p]) for p in features}
    je_w = {
        p: je.Ragged.from_row_lengths(weights[p], lengths[p]) if p in weights else None
        for p in features
    }
    mine = je.embedding_lookup(je_ids, je_w, {config: table}, features)
    for p in features:
        np.testing.assert_array_equal(eager[p], want[p].numpy(), err_msg=p)
        np.testing.assert_array_equal(traced[p], want[p].numpy(), err_msg=p)
        np.testing.assert_array_equal(np.asarray(mine[p]), want[p].numpy(), err_msg=p)


def _op_counts(concrete) -> collections.Counter:
    graph = concrete.graph.as_graph_def()
    counts = collections.Counter(n.op for n in graph.node)
    for f in graph.library.function:
        counts.update(n.op for n in f.node_def)
    return counts


def _assert_gathers_overlap_the_checks(concrete) -> None:
    """In the function that gathers: no gather waits for the ``Assert`` of the request checks
    (they read clamped ids), and every output does."""
    library = concrete.graph.as_graph_def().library.function
    (body,) = [f for f in library if any(n.op == "ResourceGather" for n in f.node_def)]
    inputs = {n.name: [i.lstrip("^").split(":")[0] for i in n.input] for n in body.node_def}
    ops = {n.name: n.op for n in body.node_def}

    def has_assert_above(name: str) -> bool:
        seen, todo = set(), [name]
        while todo:
            node = todo.pop()
            if node not in seen and node in inputs:
                seen.add(node)
                todo.extend(inputs[node])
        return any(ops[n] == "Assert" for n in seen)

    gathers = [n for n, op in ops.items() if op == "ResourceGather"]
    assert gathers and not any(has_assert_above(g) for g in gathers)
    outputs = [r.split(":")[0] for r in body.ret.values()]
    assert outputs and all(has_assert_above(o) for o in outputs)


def test_saved_model_gathers_each_table_once(tmp_path):
    """Seven features over three tables (shared, weighted, sequence, out_of_range zero and
    clamp): three gathers in each signature, none waiting for the request checks, and outputs
    equal to TF's lookup bit for bit."""
    users = je.TableConfig(200, 8, combiner="mean", name="users")
    items = je.TableConfig(300, 4, combiner="sqrtn", name="items")
    tags = je.TableConfig(50, 4, combiner="sum", name="tags")
    features = {
        "user": je.FeatureConfig(users),
        "friends": je.FeatureConfig(users, out_of_range="zero"),
        "item": je.FeatureConfig(items),
        "clicked": je.FeatureConfig(items, out_of_range="clamp"),
        "history": je.FeatureConfig(items, max_sequence_length=3),
        "tag": je.FeatureConfig(tags),
        "tag2": je.FeatureConfig(tags),
    }
    emb = je.Embedding(features)
    state = emb.init(jax.random.key(1))
    options = export.ExportOptions(weighted=("friends", "item"))
    path = export.save_serving_model(tmp_path / "m", emb, state, options=options)
    loaded = tf.saved_model.load(str(path))
    for key in ("serving_default", "serving_examples"):
        counts = _op_counts(loaded.signatures[key])
        assert counts["ResourceGather"] + counts["GatherV2"] == 3, (key, counts)
        _assert_gathers_overlap_the_checks(loaded.signatures[key])

    rng = np.random.default_rng(3)
    batch = 7
    lengths = {p: rng.integers(0, 6, size=batch).astype(np.int64) for p in features}
    ids = {
        p: rng.integers(0, f.table.vocabulary_size, size=int(lengths[p].sum())).astype(np.int64)
        for p, f in features.items()
    }
    weights = {
        p: rng.uniform(0.2, 2.0, size=ids[p].size).astype(np.float32) for p in options.weighted
    }
    request = {f"{p}_ids": tf.constant(v) for p, v in ids.items()}
    request |= {f"{p}_lengths": tf.constant(v) for p, v in lengths.items()}
    request |= {f"{p}_weights": tf.constant(v) for p, v in weights.items()}
    got = loaded.signatures["serving_default"](**request)
    tables = emb.embedding_tables(state)
    tf_tables = {}
    tf_features = {}
    for table, values in tables.items():
        tf_tables[table] = (
            TF_EMB.TableConfig(table.vocabulary_size, table.dim, combiner=table.combiner),
            tf.Variable(np.asarray(values)),
        )
    for p, f in features.items():
        tf_features[p] = TF_EMB.FeatureConfig(
            tf_tables[f.table][0], max_sequence_length=f.max_sequence_length
        )
    want = TF_EMB.serving_embedding_lookup(
        {p: tf.RaggedTensor.from_row_lengths(ids[p], lengths[p]) for p in features},
        {
            p: tf.RaggedTensor.from_row_lengths(weights[p], lengths[p]) if p in weights else None
            for p in features
        },
        dict(tf_tables.values()),
        tf_features,
    )
    for p in features:
        np.testing.assert_array_equal(got[p].numpy(), want[p].numpy(), err_msg=p)


def test_out_of_range_policies_in_a_shared_table(tmp_path):
    """``zero`` reads zero rows (counted by the combiner), ``clamp`` clamps, ``error`` names the
    feature; the three share one table and one gather."""
    table = je.TableConfig(10, 4, combiner="mean", name="t")
    features = {
        "z": je.FeatureConfig(table, out_of_range="zero"),
        "c": je.FeatureConfig(table, out_of_range="clamp"),
        "e": je.FeatureConfig(table),
    }
    emb = je.Embedding(features)
    state = emb.init(jax.random.key(2))
    path = export.save_serving_model(tmp_path / "m", emb, state)
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    values = np.asarray(emb.embedding_tables(state)[table])
    lengths = tf.constant([2, 1], tf.int64)
    out = serve(
        z_ids=tf.constant([3, 12, -4], tf.int64),
        z_lengths=lengths,
        c_ids=tf.constant([3, 12, -4], tf.int64),
        c_lengths=lengths,
        e_ids=tf.constant([1, 2, 3], tf.int64),
        e_lengths=lengths,
    )
    np.testing.assert_array_equal(out["z"].numpy(), np.stack([values[3] / 2, values[0] * 0]))
    np.testing.assert_array_equal(
        out["c"].numpy(), np.stack([(values[3] + values[9]) / 2, values[0]])
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"feature e: .*\[0, 10\)"):
        serve(
            z_ids=tf.constant([1, 2, 3], tf.int64),
            z_lengths=lengths,
            c_ids=tf.constant([1, 2, 3], tf.int64),
            c_lengths=lengths,
            e_ids=tf.constant([1, -2, 3], tf.int64),
            e_lengths=lengths,
        )
