"""Click logs for the demo: a synthetic one (embedded, seeded) or MovieLens' ml-latest-small.

A ``ClickLog`` holds one row per impression: a user id, an item id, the item's weighted
categories (several per row), the user's recent items (a history sequence) and a 0/1 label, all
as flat numpy arrays (ragged columns as values + per-row lengths), so batches are cut with
vectorised indexing. Ids are raw, as a log holds them: 64-bit user and item ids and category
names; ``ClickLog.vocabularies`` says how each id space maps to table rows (``je.Hashing`` for
users, whose ids are open-ended; ``je.Vocabulary`` of the catalogue for items and categories),
and jaxembed applies it in training and inside the served model alike.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

import jaxembed as je


@dataclasses.dataclass(frozen=True)
class Column:
    """A ragged column: ``values`` (and optional ``weights``) split into rows by ``lengths``."""

    values: np.ndarray
    lengths: np.ndarray
    weights: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> Column:
        """The rows ``rows``, in that order."""
        starts = np.concatenate([[0], np.cumsum(self.lengths)])[rows]
        lengths = self.lengths[rows]
        offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        index = np.repeat(starts, lengths) + offsets
        weights = None if self.weights is None else self.weights[index]
        return Column(self.values[index], lengths, weights)


@dataclasses.dataclass(frozen=True)
class ClickLog:
    """Impressions: ``user``, ``item``, ``categories`` (weighted), ``history`` and ``label``.

    ``vocabularies`` maps each id space (``"users"``, ``"items"``, ``"categories"``) to rows.
    A synthetic log also has the true click ``probability`` of each impression (the best any
    model can predict).
    """

    user: np.ndarray
    item: np.ndarray
    categories: Column
    history: Column
    label: np.ndarray
    vocabularies: dict[str, je.Hashing | je.Vocabulary]
    probability: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.label)

    def take(self, rows: np.ndarray) -> ClickLog:
        """The impressions ``rows``."""
        return ClickLog(
            self.user[rows],
            self.item[rows],
            self.categories.take(rows),
            self.history.take(rows),
            self.label[rows],
            self.vocabularies,
            None if self.probability is None else self.probability[rows],
        )

    def split(self, test_fraction: float, seed: int) -> tuple[ClickLog, ClickLog]:
        """A seeded random (train, test) split."""
        order = np.random.default_rng(seed).permutation(len(self))
        n_test = int(len(self) * test_fraction)
        return self.take(np.sort(order[n_test:])), self.take(np.sort(order[:n_test]))


USER_SALT, ITEM_SALT = 1, 2


def zipf_ids(rng: np.random.Generator, n: int, vocab: int, exponent: float) -> np.ndarray:
    """``n`` ids in ``[0, vocab)`` with ``P(id = r) ∝ 1 / (r + 1) ** exponent``."""
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** exponent)
    return np.searchsorted(cdf, rng.uniform(0, cdf[-1], size=n)).astype(np.int64)


def raw_ids(ranks: np.ndarray, salt: int) -> np.ndarray:
    """Distinct 64-bit ids (any int64, negative ones too) standing for ``ranks``: an odd
    multiplier is a bijection of the 64-bit integers."""
    mixed = (ranks.astype(np.uint64) + np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)
    return mixed.view(np.int64)


def category_names(values: np.ndarray) -> np.ndarray:
    """Category ``k`` as the string ``"category-k"``."""
    return np.char.add("category-", values.astype(np.int64).astype(np.str_))


def synthetic(
    n: int = 200_000,
    *,
    users: int = 100_000,
    items: int = 50_000,
    categories: int = 100,
    history_length: int = 8,
    seed: int = 0,
) -> ClickLog:
    """A synthetic click log whose labels a recommender can learn.

    Users and items are Zipf(1.05)-distributed. Each user and item has a hidden taste vector;
    an item has 1-4 categories with weights; the history holds 0-``history_length`` items the
    user clicked before, drawn near the user's taste. The click probability is the sigmoid of
    an item bias + the categories' mean weighted bias + (user + mean(history))·item.
    """
    rng = np.random.default_rng(seed)
    k = 8
    user_taste = rng.normal(size=(users, k)) / k**0.25  # so that taste dot products have std 1
    item_taste = rng.normal(size=(items, k)) / k**0.25
    item_bias = rng.normal(size=items)
    category_bias = rng.normal(size=categories)
    user = zipf_ids(rng, n, users, 1.05)
    item = zipf_ids(rng, n, items, 1.05)

    cat_lengths = rng.integers(1, 5, size=n)
    cat_values = rng.integers(0, categories, size=int(cat_lengths.sum()))
    cat_weights = rng.uniform(0.2, 1.0, size=cat_values.size).astype(np.float32)
    cats = Column(cat_values.astype(np.int64), cat_lengths.astype(np.int64), cat_weights)

    hist_lengths = rng.integers(0, history_length + 1, size=n)
    # History items: popular items whose taste is close to the user's (best of 4 candidates).
    candidates = zipf_ids(rng, int(hist_lengths.sum()) * 4, items, 1.05).reshape(-1, 4)
    owner = np.repeat(user, hist_lengths)
    scores = np.einsum("nck,nk->nc", item_taste[candidates], user_taste[owner])
    hist_values = candidates[np.arange(len(candidates)), scores.argmax(1)]
    history = Column(hist_values.astype(np.int64), hist_lengths.astype(np.int64))

    rows = np.arange(n)
    hist_sum = np.zeros((n, k))
    np.add.at(hist_sum, np.repeat(rows, hist_lengths), item_taste[hist_values])
    hist_mean = hist_sum / np.maximum(hist_lengths, 1)[:, None]
    cat_term = np.zeros(n)
    np.add.at(cat_term, np.repeat(rows, cat_lengths), category_bias[cat_values] * cat_weights)
    logit = item_bias[item] + cat_term / cat_lengths - 0.3
    logit += np.einsum("nk,nk->n", user_taste[user] + hist_mean, item_taste[item])
    probability = 1 / (1 + np.exp(-logit))
    label = (rng.uniform(size=n) < probability).astype(np.float32)
    # Raw ids, as a log would hold them, and how they map to rows: users hashed (into twice as
    # many bins as users, to keep collisions rare), items and categories by their catalogues.
    cats = Column(category_names(cats.values), cats.lengths, cats.weights)
    history = Column(raw_ids(history.values, ITEM_SALT), history.lengths)
    vocabularies: dict[str, je.Hashing | je.Vocabulary] = {
        "users": je.Hashing(2 * users, key_dtype="int64"),
        "items": je.Vocabulary(raw_ids(np.arange(items), ITEM_SALT).tolist()),
        "categories": je.Vocabulary(category_names(np.arange(categories)).tolist()),
    }
    return ClickLog(
        raw_ids(user, USER_SALT),
        raw_ids(item, ITEM_SALT),
        cats,
        history,
        label,
        vocabularies,
        probability.astype(np.float32),
    )


def _read_csv(path: Path, usecols: tuple[int, ...], dtype) -> np.ndarray:
    try:
        return np.loadtxt(path, delimiter=",", skiprows=1, usecols=usecols, dtype=dtype, ndmin=2)
    except ValueError as e:
        raise ValueError(
            f"{path} is not a MovieLens CSV file ({e}); give ml-latest-small's file."
        ) from e


def movielens(path: str | os.PathLike, *, history_length: int = 8) -> ClickLog:
    """MovieLens ``ml-latest-small`` (``ratings.csv`` and ``movies.csv`` in ``path``) as clicks.

    A rating is an impression of (user, movie); the label is ``rating >= 4``; the categories are
    the movie's genres (weight 1 each); the history is the user's ``history_length`` previously
    rated movies (by timestamp).

    Raises:
        FileNotFoundError: ``path`` lacks ``ratings.csv`` or ``movies.csv``.
        ValueError: a file is not in MovieLens' format, or rates a movie ``movies.csv`` lacks.
    """
    path = Path(path)
    for name in ("ratings.csv", "movies.csv"):
        if not (path / name).exists():
            raise FileNotFoundError(
                f"{path / name} not found: pass the folder of MovieLens ml-latest-small "
                "(https://grouplens.org/datasets/movielens/), which holds ratings.csv and "
                "movies.csv."
            )
    ratings = _read_csv(path / "ratings.csv", (0, 1, 2, 3), np.float64)
    if not len(ratings):
        raise ValueError(f"{path / 'ratings.csv'} holds no ratings; give ml-latest-small's file.")
    raw_user, raw_movie = ratings[:, 0].astype(np.int64), ratings[:, 1].astype(np.int64)
    rating, time = ratings[:, 2], ratings[:, 3]
    movie_ids, genres = _movie_genres(path / "movies.csv")
    genre_names = sorted({g for gs in genres for g in gs})

    users, user = np.unique(raw_user, return_inverse=True)
    item_of_movie = {m: i for i, m in enumerate(movie_ids)}
    unknown = sorted(set(raw_movie.tolist()) - item_of_movie.keys())
    if unknown:
        raise ValueError(
            f"{path / 'ratings.csv'} rates movies {unknown[:5]} that {path / 'movies.csv'} does "
            "not list; give the two files of one MovieLens release."
        )
    item = np.array([item_of_movie[m] for m in raw_movie], np.int64)

    # Order by (user, time) to read each user's previous movies, then restore the file order.
    order = np.lexsort((time, user))
    hist_values, hist_lengths = [], np.zeros(len(order), np.int64)
    last_user, recent = -1, list[int]()
    for row in order:
        if user[row] != last_user:
            last_user, recent = user[row], []
        previous = recent[-history_length:][::-1]  # most recent first
        hist_values.extend(previous)
        hist_lengths[row] = len(previous)
        recent.append(item[row])
    sorted_history = Column(np.array(hist_values, np.int64), hist_lengths[order])
    history = sorted_history.take(np.argsort(order))

    # Raw ids: MovieLens' user and movie ids, genre names. Users are hashed (into a power of two
    # at least twice their number), movies and genres map by their catalogue (movies.csv).
    movies = Column(
        np.array([g for gs in genres for g in gs]),
        np.array([len(gs) for gs in genres], np.int64),
    )
    cats = movies.take(item)
    cats = Column(cats.values, cats.lengths, np.ones(cats.values.size, np.float32))
    history = Column(movie_ids[history.values], history.lengths)
    label = (rating >= 4.0).astype(np.float32)
    vocabularies: dict[str, je.Hashing | je.Vocabulary] = {
        "users": je.Hashing(1 << (2 * len(users) - 1).bit_length(), key_dtype="int64"),
        "items": je.Vocabulary(movie_ids.tolist()),
        "categories": je.Vocabulary(genre_names),
    }
    return ClickLog(raw_user, movie_ids[item], cats, history, label, vocabularies)


def _movie_genres(path: Path) -> tuple[np.ndarray, list[list[str]]]:
    """Movie ids and their genres from ``movies.csv`` (titles may hold quoted commas)."""
    import csv

    ids, genres = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        for row in reader:
            try:
                movie_id, _title, genre_field = row
                ids.append(int(movie_id))
            except ValueError as e:
                raise ValueError(
                    f"{path} line {reader.line_num} is not 'movieId,title,genres' ({e}); give "
                    "ml-latest-small's movies.csv."
                ) from e
            genres.append(genre_field.split("|"))
    return np.array(ids, np.int64), genres
