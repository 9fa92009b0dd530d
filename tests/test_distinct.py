"""The host preprocess's distinct keys (``jaxembed._distinct``, C++ bitmap) equal
``np.unique(keys, return_inverse=True)`` exactly, and fall back to it where the bitmap does not
apply (negative keys, a range far wider than the batch) or the helper is not built."""

from __future__ import annotations

import numpy as np
import pytest

from jaxembed import _distinct


def _zipf(rng, n: int, vocab: int) -> np.ndarray:
    return np.minimum(rng.zipf(1.05, n) - 1, vocab - 1)


CASES = {
    "uniform_1M": lambda rng: rng.integers(0, 1_000_000, 82_492),
    "zipf_1M": lambda rng: _zipf(rng, 82_492, 1_000_000),
    "all_equal": lambda rng: np.full(1000, 123_456_789),
    "one_key": lambda rng: np.array([5]),
    "word_edges": lambda rng: np.array([0, 63, 64, 127, 128, 63, 0, 4095, 64, 65]),
    "offset_range": lambda rng: rng.integers(10**12, 10**12 + 5000, 3000),
    "wide_range": lambda rng: rng.integers(0, 2**62, 5000),  # sorts instead
    "negative": lambda rng: rng.integers(-50, 50, 500),  # sorts instead
    "empty": lambda rng: np.zeros(0, np.int64),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
def test_distinct_equals_np_unique(name, compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(_distinct, "library", lambda: None)
    elif _distinct.library() is None:
        pytest.skip("jaxembed was built without a C++ compiler")
    keys = np.asarray(CASES[name](np.random.default_rng(len(name))), np.int64)
    got_keys, got_inverse = _distinct.distinct(keys)
    want_keys, want_inverse = np.unique(keys, return_inverse=True)
    for got, want in ((got_keys, want_keys), (got_inverse, want_inverse)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_keys[got_inverse], keys)


def test_the_compiled_helper_is_built_and_used(monkeypatch):
    """Installed with a compiler (as CI is), the bitmap runs: np.unique is not called."""
    assert _distinct.library() is not None

    def refuse(*args, **kwargs):
        raise AssertionError("np.unique called")

    monkeypatch.setattr(_distinct.np, "unique", refuse)
    keys, inverse = _distinct.distinct(np.array([9, 2, 9, 4], np.int64))
    assert keys.tolist() == [2, 4, 9] and inverse.tolist() == [2, 0, 2, 1]
