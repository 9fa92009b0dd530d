"""``je.prefetch``: the same batches as ``emb.preprocess``, prepared in a background thread."""

import threading
import time

import jax
import numpy as np
import pytest

import jaxembed as je


def _emb():
    table = je.TableConfig(50, 4, combiner="sum", name="t")
    return je.Embedding({"f": je.FeatureConfig(table)}, je.optimizers.Adagrad(0.1))


def _examples(n, bad_at=None):
    rng = np.random.default_rng(0)
    for i in range(n):
        lengths = rng.integers(0, 5, 8)
        ids = rng.integers(0, 50, lengths.sum())
        if i == bad_at:
            ids[:] = 50  # out of range
        weights = rng.uniform(0.5, 2, lengths.sum()).astype(np.float32)
        yield (
            {"f": je.Ragged.from_row_lengths(ids, lengths)},
            {"f": je.Ragged.from_row_lengths(weights, lengths)},
        )


def test_prefetch_yields_what_preprocess_builds():
    emb = _emb()
    got = list(je.prefetch(emb, _examples(6), buffer_size=2))
    want = [emb.preprocess(*item) for item in _examples(6)]
    assert len(got) == len(want) == 6
    for g, w in zip(got, want, strict=True):
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prefetch_trains_like_the_plain_loop():
    emb = _emb()

    @jax.jit
    def step(state, batch):
        acts = emb.lookup(state, batch)
        return emb.apply_gradients(state, batch, jax.tree.map(lambda a: a + 0.5, acts))

    plain = prefetched = emb.init(jax.random.key(0))
    for item in _examples(5):
        plain = step(plain, emb.preprocess(*item))
    for batch in je.prefetch(emb, _examples(5)):
        prefetched = step(prefetched, batch)
    np.testing.assert_array_equal(np.asarray(plain.tables["t"]), np.asarray(prefetched.tables["t"]))


def test_prefetch_raises_the_preprocessing_error_at_its_batch():
    emb = _emb()
    seen = 0
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        for _ in je.prefetch(emb, _examples(5, bad_at=3)):
            seen += 1
    assert seen == 3


def test_prefetch_prepares_ahead_and_stops_when_the_loop_ends_early():
    emb = _emb()
    pulled = []

    def counted(n):
        for i, item in enumerate(_examples(n)):
            pulled.append(i)
            yield item

    batches = je.prefetch(emb, counted(100), buffer_size=2)
    next(batches)  # while the consumer holds batch 0, batches 1 and 2 get prepared
    for _ in range(500):
        if len(pulled) >= 3:
            break
        time.sleep(0.01)
    assert len(pulled) >= 3
    assert len(pulled) <= 4  # bounded: buffer_size ahead (+1 in the worker's hand)
    batches.close()  # leaving the loop early
    assert not [t for t in threading.enumerate() if t.name == "jaxembed-prefetch"]


def test_prefetch_rejects_a_bad_buffer_size():
    with pytest.raises(ValueError, match="buffer_size"):
        next(je.prefetch(_emb(), _examples(1), buffer_size=0))


def test_prefetch_pads_batches_to_buckets():
    table = je.TableConfig(10, 4, combiner="sum", name="items")
    emb = je.Embedding({"items": je.FeatureConfig(table)})
    data = [{"items": je.Ragged.from_row_lengths(np.arange(n) % 10, [1] * n)} for n in (3, 5, 9)]
    shapes = [b.plans[0].positions.shape[1] for b in je.prefetch(emb, data, batch_size="bucket")]
    assert shapes == [8, 8, 16]
