"""``FeatureConfig.out_of_range``: what an id outside ``[0, vocabulary_size)`` does.

``"error"`` raises (on the host, and when a jitted lookup of traced dense ids runs), ``"zero"``
reads an all-zero row that trains nothing, ``"clamp"`` reads the nearest row. The references are
independent: ``"clamp"`` equals the lookup of the clamped ids, and ``"zero"`` equals the lookup
in a table with one extra all-zero row that every bad id is mapped to. The exported SavedModel
applies the same policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed as je

VOCAB, DIM = 6, 3


def _table() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(VOCAB, DIM)).astype(np.float32)


def _inputs(ids: np.ndarray) -> dict:
    """The same ids as a dense, a ragged, a sparse and a sequence input."""
    lengths = [2, 0, 3, len(ids) - 5]
    rows = np.repeat(np.arange(4), lengths)
    cols = np.concatenate([np.arange(n) for n in lengths])
    sparse = je.Sparse(np.stack([rows, cols], 1), ids, (4, max(lengths)))
    return {
        "dense": ids.reshape(-1, 1),
        "ragged": je.Ragged.from_row_lengths(ids, lengths),
        "sparse": sparse,
        "seq": je.Ragged.from_row_lengths(ids, lengths),
    }


def _features(table: je.TableConfig, policy: str) -> dict:
    return {
        "dense": je.FeatureConfig(table, out_of_range=policy),
        "ragged": je.FeatureConfig(table, out_of_range=policy),
        "sparse": je.FeatureConfig(table, validate_weights_and_indices=False, out_of_range=policy),
        "seq": je.FeatureConfig(table, max_sequence_length=4, out_of_range=policy),
    }


IDS = np.array([1, 9, -3, 2, 6, 0, 5, 100, 4], np.int64)
BAD = (IDS < 0) | (IDS >= VOCAB)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_out_of_range_clamp_reads_the_nearest_row(combiner):
    table = je.TableConfig(VOCAB, DIM, combiner=combiner, name="t")
    out = je.embedding_lookup(_inputs(IDS), None, {table: _table()}, _features(table, "clamp"))
    want = je.embedding_lookup(
        _inputs(np.clip(IDS, 0, VOCAB - 1)), None, {table: _table()}, _features(table, "error")
    )
    for path in out:
        np.testing.assert_array_equal(out[path], want[path], err_msg=path)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_out_of_range_zero_reads_a_zero_row(combiner):
    table = je.TableConfig(VOCAB, DIM, combiner=combiner, name="t")
    out = je.embedding_lookup(_inputs(IDS), None, {table: _table()}, _features(table, "zero"))
    padded = je.TableConfig(VOCAB + 1, DIM, combiner=combiner, name="t")  # row VOCAB: zeros
    zeros = np.concatenate([_table(), np.zeros((1, DIM), np.float32)])
    want = je.embedding_lookup(
        _inputs(np.where(BAD, VOCAB, IDS)), None, {padded: zeros}, _features(padded, "error")
    )
    for path in out:
        np.testing.assert_array_equal(out[path], want[path], err_msg=path)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_out_of_range_zero_with_no_id_left_reads_zeros(combiner):
    """Every id of the batch outside the table: zero rows (not row 0), in every input kind."""
    table = je.TableConfig(VOCAB, DIM, combiner=combiner, name="t")
    ids = np.array([VOCAB, -1, VOCAB + 5, 100, -7, VOCAB, 9, -2, 50], np.int64)
    out = je.embedding_lookup(_inputs(ids), None, {table: _table() + 1}, _features(table, "zero"))
    for path, value in out.items():
        np.testing.assert_array_equal(value, np.zeros_like(value), err_msg=path)


def test_out_of_range_error_names_feature_id_and_policies():
    table = je.TableConfig(VOCAB, DIM, name="t")
    with pytest.raises(ValueError, match=r"Id 9 of feature 'dense'.*\[0, 6\).*out_of_range="):
        je.embedding_lookup(_inputs(IDS), None, {table: _table()}, _features(table, "error"))


def test_out_of_range_policy_is_validated():
    table = je.TableConfig(VOCAB, DIM, name="t")
    with pytest.raises(ValueError, match="out_of_range.*'ignore'"):
        je.FeatureConfig(table, out_of_range="ignore")


def test_out_of_range_traced_ids_error_at_run_time():
    table = je.TableConfig(VOCAB, DIM, name="t")
    features = {"f": je.FeatureConfig(table)}

    @jax.jit
    def lookup(t, ids):
        return je.embedding_lookup({"f": ids}, None, {table: t}, features)["f"]

    np.testing.assert_array_equal(lookup(_table(), jnp.array([1, 2])), _table()[[1, 2]])
    with pytest.raises(Exception, match=r"Id 7 of feature 'f' is out of range \[0, 6\)"):
        jax.block_until_ready(lookup(_table(), jnp.array([1, 7])))


@pytest.mark.parametrize("policy", ["zero", "clamp"])
def test_out_of_range_traced_ids_follow_the_policy(policy):
    table = je.TableConfig(VOCAB, DIM, name="t")
    features = {"f": je.FeatureConfig(table, out_of_range=policy)}
    ids = np.array([1, 7, -1, 5])
    out = jax.jit(lambda t, i: je.embedding_lookup({"f": i}, None, {table: t}, features)["f"])(
        _table(), jnp.asarray(ids)
    )
    if policy == "clamp":
        want = _table()[np.clip(ids, 0, VOCAB - 1)]
    else:
        want = np.where((ids >= 0)[:, None] & (ids < VOCAB)[:, None], _table()[ids % VOCAB], 0)
    np.testing.assert_array_equal(out, want)


def test_out_of_range_zero_trains_only_valid_rows():
    """SGD on a batch with bad ids equals SGD on the padded table, whose extra row takes them."""
    table = je.TableConfig(VOCAB, DIM, combiner="mean", name="t")
    padded = je.TableConfig(VOCAB + 1, DIM, combiner="mean", name="t")
    ids = je.Ragged.from_row_lengths(IDS, [2, 0, 3, 4])
    fixed = je.Ragged.from_row_lengths(np.where(BAD, VOCAB, IDS), [2, 0, 3, 4])
    results = []
    for cfg, inp, policy in [(table, ids, "zero"), (padded, fixed, "error")]:
        emb = je.Embedding({"f": je.FeatureConfig(cfg, out_of_range=policy)}, je.optimizers.SGD(1))
        start = np.concatenate([_table(), np.zeros((cfg.vocabulary_size - VOCAB, DIM))])
        state = emb.state_from_logical({"t": start.astype(np.float32)}, {"t": {}})
        batch = emb.preprocess({"f": inp})
        acts = emb.lookup(state, batch)
        grads = {"f": jnp.arange(4 * DIM, dtype=jnp.float32).reshape(4, DIM)}
        state = emb.apply_gradients(state, batch, grads)
        results.append((np.asarray(acts["f"]), np.asarray(emb.embedding_tables(state)[cfg])))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1][:VOCAB])


def test_out_of_range_preprocess_error_on_a_mesh():
    table = je.TableConfig(VOCAB, DIM, name="t")
    mesh = jax.make_mesh((len(jax.devices()),), ("devices",))
    emb = je.Embedding({"f": je.FeatureConfig(table)}, je.optimizers.SGD(1), mesh=mesh)
    ids = np.arange(len(jax.devices()) * 2) % VOCAB
    ids[-1] = VOCAB
    with pytest.raises(ValueError, match=f"Id {VOCAB} of feature 'f'"):
        emb.preprocess({"f": ids})


@pytest.mark.parametrize("policy", ["zero", "clamp", "error"])
def test_out_of_range_policy_in_the_served_model(tmp_path, policy):
    tf = pytest.importorskip("tensorflow")
    from jaxembed import export

    table = je.TableConfig(VOCAB, DIM, combiner="mean", name="t")
    features = {"f": je.FeatureConfig(table, out_of_range=policy)}
    emb = je.Embedding(features)
    state = emb.state_from_logical({"t": _table()}, {"t": {}})
    path = export.save_serving_model(tmp_path / "model", emb, state)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    lengths = np.array([2, 0, 3, 4])
    call = {"f_ids": tf.constant(IDS), "f_lengths": tf.constant(lengths)}
    if policy == "error":
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"feature f: ids must be in"):
            serve(**call)
        return
    want = je.embedding_lookup(
        {"f": je.Ragged.from_row_lengths(IDS, lengths)}, None, {table: _table()}, features
    )["f"]
    np.testing.assert_array_equal(serve(**call)["f"].numpy(), want)
