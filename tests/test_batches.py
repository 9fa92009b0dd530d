"""Batches under abuse: another Embedding's Batch, empty batches, any batch size, huge ids.

* A ``Batch`` records the Embedding that built it; another Embedding refuses it by name.
* ``preprocess(batch_size="bucket")`` pads to a power of two examples per device: 40 batch
  sizes compile a handful of programs (counted with the jit cache, not timed), and the padded
  activations equal ``je.embedding_lookup`` on the real examples (the padding is zeros).
* Tables over 2**31 rows work when split over devices (the host routes int64 ids), and are
  refused with the limit stated when one device would hold too many rows.
* The host's threads build the batch one thread builds, raise the first bad feature in order,
  and a forked child gets threads of its own.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed as je
from jaxembed import batch as batch_module
from jaxembed.sharding import MAX_ROWS_PER_DEVICE


def _features(vocab: int = 50):
    table = je.TableConfig(vocab, 4, combiner="mean", name="t")
    other = je.TableConfig(20, 4, combiner="sum", name="u")
    return {
        "ragged": je.FeatureConfig(table),
        "dense": je.FeatureConfig(other),
        "sparse": je.FeatureConfig(table),
        "seq": je.FeatureConfig(other, max_sequence_length=3),
    }


def _inputs(rng: np.random.Generator, batch: int) -> dict:
    lengths = rng.integers(0, 4, batch)
    ids = rng.integers(0, 20, int(lengths.sum()))
    rows = np.repeat(np.arange(batch), lengths)
    cols = np.concatenate([np.arange(n) for n in lengths]) if batch else np.zeros(0, int)
    return {
        "ragged": je.Ragged.from_row_lengths(ids, lengths),
        "dense": rng.integers(0, 20, (batch, 2)),
        "sparse": je.Sparse(np.stack([rows, cols], 1), ids, (batch, 4)),
        "seq": je.Ragged.from_row_lengths(ids, lengths),
    }


def _mesh(devices: int):
    return None if devices == 1 else jax.make_mesh((devices,), ("d",))


def test_batch_from_another_embedding_is_refused():
    emb = je.Embedding(_features(50), je.optimizers.SGD(0.1))
    other = je.Embedding(_features(40), je.optimizers.SGD(0.1))
    state = emb.init(jax.random.key(0))
    batch = other.preprocess(_inputs(np.random.default_rng(0), 4))
    with pytest.raises(ValueError, match="built by another Embedding"):
        emb.lookup(state, batch)
    acts = emb.lookup(state, emb.preprocess(_inputs(np.random.default_rng(0), 4)))
    with pytest.raises(ValueError, match="built by another Embedding"):
        emb.apply_gradients(state, batch, acts)


def test_batch_from_an_identical_embedding_is_accepted():
    emb, twin = (je.Embedding(_features(), je.optimizers.SGD(0.1)) for _ in range(2))
    state = emb.init(jax.random.key(0))
    inputs = _inputs(np.random.default_rng(0), 4)
    np.testing.assert_array_equal(
        emb.lookup(state, twin.preprocess(inputs))["ragged"],
        emb.lookup(state, emb.preprocess(inputs))["ragged"],
    )


@pytest.mark.parametrize("devices", [1, 8])
def test_forty_batch_sizes_compile_few_programs(devices):
    emb = je.Embedding(_features(), je.optimizers.Adagrad(0.1), mesh=_mesh(devices))
    state = emb.init(jax.random.key(0))

    @jax.jit
    def step(state, batch):
        acts = emb.lookup(state, batch)
        grads = jax.tree.map(lambda a: 2 * a + 1, acts)
        return emb.apply_gradients(state, batch, grads), acts

    rng = np.random.default_rng(1)
    for size in range(1, 41):
        inputs = _inputs(rng, size)
        batch = emb.preprocess(inputs, batch_size="bucket")
        tables = emb.embedding_tables(state)
        state, acts = step(state, batch)
        want = je.embedding_lookup(inputs, None, tables, emb.feature_config)
        for path, act in acts.items():
            act = np.asarray(act)
            assert act.shape[0] >= size and act.shape[0] % devices == 0
            np.testing.assert_array_equal(act[:size], want[path], err_msg=f"{path} @ {size}")
            assert not act[size:].any(), f"padding of {path} is not zero"
    # Distinct shapes: examples per device x distinct-id and slot buckets.
    assert step._cache_size() <= 8, step._cache_size()


def test_padding_trains_nothing():
    """Padded examples get gradients (2 * 0 + 1) but touch no row: the padded batch trains
    exactly like the unpadded one."""
    inputs = _inputs(np.random.default_rng(2), 5)
    features = _features()
    results = []
    for batch_size in (None, 16):
        emb = je.Embedding(features, je.optimizers.Adagrad(0.1))
        state = emb.init(jax.random.key(0))
        batch = emb.preprocess(inputs, batch_size=batch_size)
        acts = emb.lookup(state, batch)
        state = emb.apply_gradients(state, batch, jax.tree.map(lambda a: 2 * a + 1, acts))
        results.append(emb.embedding_tables(state))
    for table in results[0]:
        np.testing.assert_array_equal(results[0][table], results[1][table])


@pytest.mark.parametrize("batch_size", [3, 12, "buckets", 2.5])
def test_batch_size_is_validated(batch_size):
    emb = je.Embedding(_features(), je.optimizers.SGD(0.1), mesh=_mesh(8))
    with pytest.raises(ValueError, match="batch_size"):
        emb.preprocess(_inputs(np.random.default_rng(0), 8), batch_size=batch_size)


@pytest.mark.parametrize("devices", [1, 8])
def test_empty_batch(devices):
    emb = je.Embedding(_features(), je.optimizers.Adagrad(0.1), mesh=_mesh(devices))
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess(_inputs(np.random.default_rng(0), 0))
    acts = emb.lookup(state, batch)
    assert {p: a.shape for p, a in acts.items()} == {
        "ragged": (0, 4),
        "dense": (0, 2, 4),
        "sparse": (0, 4),
        "seq": (0, 3, 4),
    }
    new = emb.apply_gradients(state, batch, acts)
    assert int(new.step) == 1
    for table, value in emb.embedding_tables(new).items():
        np.testing.assert_array_equal(value, emb.embedding_tables(state)[table])


def test_vocabulary_over_int32_is_routed_exactly():
    """A 2**33-row table split over 8 devices: ids past 2**31 reach their own row."""
    table = je.TableConfig(2**33, 2, combiner="sum", name="huge")
    emb = je.Embedding({"f": je.FeatureConfig(table)}, je.optimizers.SGD(0.1), mesh=_mesh(8))
    ids = np.array([2**32 + 13, 2**31 + 5, 7, 2**33 - 1, 0, 2**31, 3, 2**32 + 13], np.int64)
    batch = emb.preprocess({"f": ids})
    requests = np.asarray(batch.requests["huge"])  # [device, shard, K] local rows
    layout = emb.plan.layout("huge")
    for device, i in enumerate(ids):
        shard, local = int(i % 8), int(i // 8)
        asked = requests[device, shard]
        assert local in asked, (i, asked)
        assert (requests[device] < layout.shard_shape[0]).sum() == 1  # one real request


def test_vocabulary_over_the_per_device_limit_is_refused():
    table = je.TableConfig(MAX_ROWS_PER_DEVICE + 1, 2, name="huge")
    with pytest.raises(ValueError, match=r"'huge'.*rows on one device.*at least 2 devices"):
        je.Embedding({"f": je.FeatureConfig(table)}, je.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="int32 row numbers"):
        je.embedding_lookup(
            {"f": np.array([1])}, None, {table: jnp.zeros((1, 2))}, {"f": je.FeatureConfig(table)}
        )


def test_int64_ids_past_int32_are_not_aliased():
    table = je.TableConfig(10, 2, name="t")
    emb = je.Embedding({"f": je.FeatureConfig(table)}, je.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match=f"Id {2**32 + 1} of feature 'f' is out of range"):
        emb.preprocess({"f": np.array([2**32 + 1], np.int64)})
    with pytest.raises(ValueError, match=f"Id {2**32 + 1} of feature 'f' is out of range"):
        je.embedding_lookup(
            {"f": np.array([2**32 + 1], np.int64)}, None, {table: np.zeros((10, 2))}, emb.features
        )


def _one_thread(fn, items):
    return [fn(x) for x in items]


@pytest.mark.parametrize("devices", [1, 8])
def test_threads_build_the_batch_one_thread_builds(devices, monkeypatch):
    """``preprocess`` spreads features and arrays over the host's threads; the batch is the
    one a single thread builds, bit for bit (a row-wise table beside a replicated one)."""
    big = je.TableConfig(4096, 4, name="big")
    features = {**_features(), "big": je.FeatureConfig(big), "big2": je.FeatureConfig(big)}
    sharding = {"big": "row"} if devices > 1 else None
    emb = je.Embedding(features, je.optimizers.SGD(0.1), mesh=_mesh(devices), sharding=sharding)
    rng = np.random.default_rng(3)
    inputs = _inputs(rng, 64)
    for name in ("big", "big2"):
        lengths = rng.integers(0, 9, 64)
        inputs[name] = je.Ragged.from_row_lengths(
            rng.integers(0, 4096, int(lengths.sum())), lengths
        )
    threaded = emb.preprocess(inputs)
    if (os.cpu_count() or 1) > 1:
        assert any(t.name.startswith("jaxembed-preprocess") for t in threading.enumerate())
    monkeypatch.setattr(batch_module, "_parallel", _one_thread)
    single = emb.preprocess(inputs)
    assert jax.tree.structure(threaded) == jax.tree.structure(single)
    for got, want in zip(jax.tree.leaves(threaded), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_threads_raise_the_first_bad_feature_in_order():
    """With several bad features, the error names the first in ``tf.nest`` order, as one
    thread would."""
    table = je.TableConfig(10, 2, name="t")
    features = {name: je.FeatureConfig(table) for name in ("a", "b", "c")}
    emb = je.Embedding(features, je.optimizers.SGD(0.1))
    inputs = {"a": np.array([1, 2]), "b": np.array([3, 10]), "c": np.array([-1, 4])}
    for _ in range(5):
        with pytest.raises(ValueError, match="Id 10 of feature 'b' is out of range"):
            emb.preprocess(inputs)


def test_a_forked_child_gets_its_own_threads():
    """Threads do not survive ``fork``: a child that preprocesses after its parent did gets a
    pool of its own instead of waiting forever on the parent's (gone) threads."""
    assert batch_module._parallel(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]  # parent's pool
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JAX warns that a fork of a threaded process may hang
        pid = os.fork()
    if pid == 0:  # the child: numpy only, no JAX
        signal.alarm(60)  # a hang kills the child, and the parent sees it
        ok = batch_module._parallel(lambda x: x + 1, list(range(8))) == list(range(1, 9))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
