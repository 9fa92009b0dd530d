"""Raw ids to rows, exactly as TF's ops map them: ``Hashing`` and ``Vocabulary``.

A feature with ``FeatureConfig(table, vocabulary=...)`` takes raw ids (strings, bytes, or int64 of
any value) and maps them to rows of its table on the host (``Embedding.preprocess``,
``embedding_lookup`` of numpy inputs), bit for bit as TF's built-in ops do; the exported
SavedModel maps them with those very ops, so training and serving choose the same rows:

* ``Hashing(num_bins)``: ``tf.strings.to_hash_bucket_fast(ids, num_bins)``, int64 ids through
  ``tf.strings.as_string``: FarmHash ``Fingerprint64(key) mod num_bins``.
* ``Vocabulary(keys, num_oov_buckets)``: ``tf.lookup.StaticVocabularyTable``: ``keys[i] -> i``,
  any other id ``-> len(keys) + Fingerprint64(id) mod num_oov_buckets``.

Strings are hashed and compared as bytes (``str`` as UTF-8). The mapping is vectorised: one C++
call maps a whole array (``csrc/fingerprint.cc``): FarmHash, and for vocabularies a hash index of
the keys (strings found by fingerprint, then compared byte for byte).

Example:
    >>> import numpy as np
    >>> import jaxembed as je
    >>> vocab = je.Vocabulary(["action", "comedy", "drama"], num_oov_buckets=2)
    >>> vocab.num_rows
    5
    >>> vocab.lookup(np.array(["drama", "action"])).tolist()
    [2, 0]
    >>> int(vocab.lookup(np.array(["western"]))[0]) in (3, 4)
    True
    >>> 0 <= int(je.Hashing(10).lookup(np.array(["user-42"]))[0]) < 10
    True
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jaxembed._fingerprint import VocabularyIndex, hash_buckets
from jaxembed.inputs import Ragged, Sparse, is_traced

KEY_DTYPES = ("string", "int64")
"""Raw id types: ``"string"`` (``str`` / ``bytes``; served as ``tf.string``) or ``"int64"``."""

_INT64 = (-(2**63), 2**63 - 1)


def _check_count(name: str, value: Any, cls: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{cls}: `{name}` must be an int >= 1, got {value!r}.")
    return int(value)


def _check_key_dtype(key_dtype: Any, cls: str) -> None:
    if key_dtype not in KEY_DTYPES:
        raise ValueError(
            f"{cls}: `key_dtype` must be one of {list(KEY_DTYPES)}, got {key_dtype!r}: "
            "'string' for str or bytes ids, 'int64' for integer ids."
        )


def raw_ids(where: str, ids: Any, key_dtype: str) -> np.ndarray:
    """``ids`` as a numpy array the mapping takes: int64, or fixed-width ``S``/``U`` strings.

    Object arrays of ``str`` (or of ``bytes``) become ``U`` (``S``) arrays. ``where`` names the
    feature in errors.

    Raises:
        TypeError: ids of another type than ``key_dtype``, or mixed types in an object array.
    """
    arr = np.asarray(ids)
    if arr.dtype == object:
        kinds = set(map(type, arr.reshape(-1)))
        if kinds <= {str}:
            arr = arr.astype(np.str_)
        elif kinds <= {bytes}:
            lengths = np.fromiter(map(len, arr.reshape(-1)), np.int64, arr.size)
            arr = arr.astype(np.bytes_)
            if arr.size and np.any(np.char.str_len(arr).reshape(-1) != lengths):
                raise ValueError(
                    f"Raw ids of {where} include bytes ending in NUL (b'\\x00'), which numpy's "
                    "fixed-width strings drop; strip them or map such ids yourself."
                )
        elif kinds and all(issubclass(k, numbers.Integral) for k in kinds):
            arr = arr.astype(np.int64)
        else:
            names = sorted(k.__name__ for k in kinds)
            raise TypeError(
                f"Raw ids of {where} mix or use unsupported types {names}: give all str, all "
                "bytes or all int."
            )
    kind = "string" if arr.dtype.kind in "SU" else "int64" if arr.dtype.kind in "iu" else None
    if kind is None or arr.dtype == np.uint64:
        raise TypeError(
            f"Raw ids of {where} have dtype {arr.dtype}; its vocabulary takes {key_dtype} ids "
            "(str/bytes arrays for 'string', int64 for 'int64')."
        )
    if kind != key_dtype:
        raise TypeError(
            f"Raw ids of {where} are {kind} (dtype {arr.dtype}) but its vocabulary's key_dtype "
            f"is {key_dtype!r}: the served model takes {key_dtype} ids, so training must too. "
            f"Convert the ids, or build the vocabulary with key_dtype={kind!r}."
        )
    return arr.astype(np.int64) if kind == "int64" else arr


@dataclasses.dataclass(frozen=True)
class Hashing:
    """Rows by hashing: ``tf.strings.to_hash_bucket_fast(ids, num_bins)``, bit for bit.

    Int64 ids are hashed as their decimal text (``tf.strings.as_string``), as TF does for them.

    Args:
        num_bins: The number of rows (the table's ``vocabulary_size``), >= 1.
        key_dtype: ``"string"`` (default; ``str`` or ``bytes`` ids) or ``"int64"``: the raw id
            type, which the exported SavedModel's inputs take.

    Example:
        >>> import numpy as np
        >>> import jaxembed as je
        >>> rows = je.Hashing(1000, key_dtype="int64").lookup(np.array([7, -1, 2**63 - 1]))
        >>> rows.dtype, bool(((rows >= 0) & (rows < 1000)).all())
        (dtype('int64'), True)
    """

    num_bins: int
    key_dtype: str = "string"

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_bins", _check_count("num_bins", self.num_bins, "Hashing"))
        _check_key_dtype(self.key_dtype, "Hashing")

    @property
    def num_rows(self) -> int:
        """Rows the ids map to: ``num_bins``."""
        return self.num_bins

    def lookup(self, ids: Any, where: str = "the ids") -> np.ndarray:
        """The int64 row of every raw id (same shape)."""
        return hash_buckets(raw_ids(where, ids, self.key_dtype), self.num_bins).view(np.int64)

    def to_json(self) -> dict:
        return {"kind": "hashing", "num_bins": self.num_bins, "key_dtype": self.key_dtype}


@dataclasses.dataclass(frozen=True, eq=False)
class Vocabulary:
    """Rows from a fixed list of keys: ``tf.lookup.StaticVocabularyTable``, bit for bit.

    ``keys[i]`` maps to row ``i``; any other id to ``len(keys) + Fingerprint64(id) mod
    num_oov_buckets`` (int64 ids hashed as decimal text), so the table needs
    ``len(keys) + num_oov_buckets`` rows.

    Args:
        keys: The vocabulary, in row order: all ``str`` (or all ``bytes``: strings, compared as
            UTF-8 bytes), or all ints (int64). Unique, at least one.
        num_oov_buckets: Rows shared by out-of-vocabulary ids, >= 1 (as TF requires).

    Raises:
        ValueError: No keys, duplicate keys, mixed or unsupported key types, ints outside int64,
            keys ending in NUL, or ``num_oov_buckets`` < 1.

    Example:
        >>> import numpy as np
        >>> import jaxembed as je
        >>> vocab = je.Vocabulary([10, 20, 30])
        >>> vocab.key_dtype, vocab.num_rows, vocab.lookup(np.array([30, 10, 99])).tolist()
        ('int64', 4, [2, 0, 3])
    """

    keys: Sequence[Any]
    num_oov_buckets: int = 1

    def __post_init__(self) -> None:
        keys = tuple(self.keys) if isinstance(self.keys, Iterable) else None
        if keys is None or isinstance(self.keys, (str, bytes)):
            raise ValueError(
                f"Vocabulary: `keys` must be a list of str, bytes or int, got {self.keys!r}."
            )
        if not keys:
            raise ValueError(
                "Vocabulary: `keys` is empty. Give at least one key, or hash every id with "
                "je.Hashing(num_bins)."
            )
        object.__setattr__(self, "keys", _normalized_keys(keys))
        oov = _check_count("num_oov_buckets", self.num_oov_buckets, "Vocabulary")
        object.__setattr__(self, "num_oov_buckets", oov)
        _check_unique(self._array)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, num_oov_buckets: int = 1, *, key_dtype: str = "string"
    ) -> Vocabulary:
        """A vocabulary of the lines of a UTF-8 text file, one key per line, in row order (TF's
        ``TextFileInitializer`` of whole lines and line numbers: a line ends at ``\\n`` or
        ``\\r\\n``; a final newline adds no key; an empty line is an error, as in TF).
        ``key_dtype="int64"`` parses each line as an integer.

        Raises:
            ValueError: as ``Vocabulary``, naming the line; or a line that is not an integer.
        """
        _check_key_dtype(key_dtype, "Vocabulary.from_file")
        with open(path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]  # as TF: \r\n
        for i, line in enumerate(lines, 1):
            if not line:
                raise ValueError(
                    f"Vocabulary.from_file({os.fspath(path)!r}): line {i} is empty; TF's "
                    "text-file tables refuse empty lines too. Remove it."
                )
        if key_dtype == "string":
            return cls(lines, num_oov_buckets)
        keys = []
        for i, line in enumerate(lines, 1):
            try:
                if not re.fullmatch(rb"\s*[-+]?[0-9]+\s*", line):
                    raise ValueError(line)
                keys.append(int(line))
            except ValueError:
                raise ValueError(
                    f"Vocabulary.from_file({os.fspath(path)!r}, key_dtype='int64'): line {i} is "
                    f"{line!r}, not an integer. Use key_dtype='string' for text keys."
                ) from None
        return cls(keys, num_oov_buckets)

    @property
    def key_dtype(self) -> str:
        """``"string"`` or ``"int64"``: the raw id type, which the served model takes."""
        return "int64" if self._array.dtype.kind == "i" else "string"

    @property
    def num_rows(self) -> int:
        """Rows the ids map to: ``len(keys) + num_oov_buckets``."""
        return len(self.keys) + self.num_oov_buckets

    def lookup(self, ids: Any, where: str = "the ids") -> np.ndarray:
        """The int64 row of every raw id (same shape)."""
        return self._index.lookup(raw_ids(where, ids, self.key_dtype), self.num_oov_buckets)

    def to_json(self) -> dict:
        keys = (
            list(self.keys)
            if self.key_dtype == "int64"
            else [k.decode("utf-8", "surrogateescape") for k in self.keys]
        )
        return {
            "kind": "vocabulary",
            "keys": keys,
            "num_oov_buckets": self.num_oov_buckets,
            "key_dtype": self.key_dtype,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self.num_oov_buckets == other.num_oov_buckets and self.keys == other.keys

    def __hash__(self) -> int:
        return hash((self.num_oov_buckets, len(self.keys), self._digest))

    def __repr__(self) -> str:
        head = ", ".join(repr(k) for k in self.keys[:3]) + (", ..." if len(self.keys) > 3 else "")
        return (
            f"Vocabulary([{head}] ({len(self.keys)} {self.key_dtype} keys), "
            f"num_oov_buckets={self.num_oov_buckets})"
        )

    # Host-side indexes, built once.

    @functools.cached_property
    def _array(self) -> np.ndarray:
        """The keys as numpy: int64, or ``S`` bytes."""
        if isinstance(self.keys[0], bytes):
            return np.array(self.keys, dtype=np.bytes_)
        return np.array(self.keys, dtype=np.int64)

    @functools.cached_property
    def _index(self) -> VocabularyIndex:
        return VocabularyIndex(self._array)

    @functools.cached_property
    def _digest(self) -> int:
        return int(np.bitwise_xor.reduce(hash_buckets(self._array[:1000])))


def _normalized_keys(keys: tuple) -> tuple:
    """Keys as a tuple of bytes (str encoded as UTF-8) or of ints, checked."""
    kinds = {type(k) for k in keys}
    if kinds <= {str, bytes} and len(kinds) == 1:
        if str in kinds:
            try:
                out = tuple(k.encode("utf-8") for k in keys)
            except UnicodeEncodeError as err:
                raise ValueError(f"Vocabulary: key {err.object!r} has no UTF-8 encoding.") from None
        else:
            out = keys
        bad = next((k for k in out if k.endswith(b"\x00")), None)
        if bad is not None:
            raise ValueError(
                f"Vocabulary: key {bad!r} ends in a NUL byte, which numpy's fixed-width strings "
                "drop; strip it."
            )
        return out
    if all(issubclass(k, numbers.Integral) and not issubclass(k, bool) for k in kinds):
        out = tuple(int(k) for k in keys)
        bad = next((k for k in out if not _INT64[0] <= k <= _INT64[1]), None)
        if bad is not None:
            raise ValueError(
                f"Vocabulary: key {bad} is outside int64; TF's int64 keys cannot hold it."
            )
        return out
    names = sorted(k.__name__ for k in kinds)
    raise ValueError(
        f"Vocabulary: keys mix or use unsupported types {names}: give all str, all bytes or all "
        "int (TF's tables have one key dtype)."
    )


def _check_unique(keys: np.ndarray) -> None:
    order = np.argsort(keys, kind="stable")
    same = keys[order][1:] == keys[order][:-1]
    if same.any():
        i = int(np.argmax(same))
        first, second = int(order[i]), int(order[i + 1])
        raise ValueError(
            f"Vocabulary: key {keys[first]!r} appears twice (positions {first} and {second}); "
            "keys must be unique (TF's table rejects a key mapped to two rows). Drop duplicates, "
            "e.g. with dict.fromkeys(keys)."
        )
    if keys.dtype.kind == "S":  # distinct keys must have distinct fingerprints
        fps = np.sort(hash_buckets(keys))
        if (fps[1:] == fps[:-1]).any():
            raise ValueError(
                "Vocabulary: two keys share a 64-bit fingerprint (a FarmHash collision); "
                "rename one of them."
            )


def map_input(where: str, inp: Any, vocabulary: Hashing | Vocabulary | None) -> Any:
    """A feature's input (dense, ``Sparse`` or ``Ragged``) with its raw ids replaced by int64
    rows; unchanged without a vocabulary. ``where`` names the feature in errors.

    Raises:
        TypeError: traced ids (raw ids are mapped on the host, before ``jit``), or ids of
            another type than the vocabulary's ``key_dtype``.
    """
    if vocabulary is None:
        return inp
    values = inp.values if isinstance(inp, (Sparse, Ragged)) else inp
    if is_traced(values):
        raise TypeError(
            f"Raw ids of {where} are traced: its vocabulary maps raw ids on the host. Map them "
            "before jax.jit, with emb.preprocess(...) (or je.embedding_lookup on numpy inputs)."
        )
    rows = vocabulary.lookup(np.asarray(values), where)
    if isinstance(inp, Sparse):  # the layout was validated when it was built
        return Sparse.tree_unflatten(inp.dense_shape, (inp.indices, rows))
    if isinstance(inp, Ragged):
        return Ragged.tree_unflatten(None, (rows, inp.row_splits))
    return rows


def to_json(vocabulary: Hashing | Vocabulary | None) -> dict | None:
    """A vocabulary as JSON-able data (for checkpoints), or None."""
    return None if vocabulary is None else vocabulary.to_json()


def from_json(data: dict | None) -> Hashing | Vocabulary | None:
    """The inverse of ``to_json``."""
    if data is None:
        return None
    if data["kind"] == "hashing":
        return Hashing(data["num_bins"], key_dtype=data["key_dtype"])
    keys = data["keys"]
    if data["key_dtype"] == "string":
        keys = [k.encode("utf-8", "surrogateescape") for k in keys]
    return Vocabulary(keys, data["num_oov_buckets"])


__all__ = ["KEY_DTYPES", "Hashing", "Vocabulary", "from_json", "map_input", "raw_ids", "to_json"]
