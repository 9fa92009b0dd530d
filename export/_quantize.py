"""Quantized serving tables: numpy quantization at export, dequantization of gathered rows in TF.

``ExportOptions(quantize=...)`` stores a table in the SavedModel as one of:

============  ======================  ===================  ===============================
scheme        variable                bytes per row        error per element
============  ======================  ===================  ===============================
None          float32 ``[V, dim]``    ``4 * dim``          0
``float16``   float16 ``[V, dim]``    ``2 * dim``          ``<= 2^-11 |x|`` (normal range)
``bfloat16``  bfloat16 ``[V, dim]``   ``2 * dim``          ``<= 2^-8 |x|``
``int8``      uint8 ``[V, dim + 8]``  ``dim + 8``          ``<= scale_r / 2`` (+ rounding)
============  ======================  ===================  ===============================

``int8`` is row-wise asymmetric quantization, FBGEMM's fused 8-bit row-wise layout: per row
``r``, ``bias_r = min(row)``, ``scale_r = (max(row) - min(row)) / 255`` and
``q = round((x - bias_r) / scale_r)`` as uint8 (``q = 0`` when ``scale_r`` is 0, so a constant
row comes back exactly). Each stored row is the ``dim`` codes followed by ``scale_r`` and
``bias_r`` as little-endian float32 (8 bytes), so one gather reads a row with its scale and
bias. The serving graph gathers only the requested rows and dequantizes them,
``x = float32(q) * scale_r + bias_r`` (a multiply, then an add, in float32), never the whole
table. TF's ``bitcast`` reads the scale and bias in the serving host's byte order: every
platform TF Serving runs on (x86-64, aarch64) is little-endian.

Which tables are quantized: a scheme given as a string applies to the tables where it saves
memory, those of at least ``MIN_BYTES`` (1 MiB of float32) and, for ``int8``, of ``dim >= 8``
(below, the 8 bytes of scale and bias make an int8 row more than half of its float32 row); the
others stay float32. A ``{table name: scheme or None}`` mapping applies exactly as written (the
tables it does not name stay float32).

Example:
    >>> import numpy as np
    >>> table = np.array([[0.0, 1.0, 0.5], [2.0, 2.0, 2.0]], np.float32)
    >>> stored = quantize(table, "int8")
    >>> stored.dtype, stored.shape
    (dtype('uint8'), (2, 11))
    >>> served = dequantize(stored, "int8", 3)
    >>> bool(np.abs(served - table).max() <= 0.5 / 255 + 1e-7), served[1].tolist()
    (True, [2.0, 2.0, 2.0])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from ._tf import tf

SCHEMES = ("int8", "float16", "bfloat16")
"""The quantizations of ``ExportOptions.quantize`` (None keeps float32)."""

MIN_BYTES = 1 << 20
"""A table smaller than this in float32 stays float32 unless a mapping names it."""

MIN_INT8_DIM = 8
"""A table narrower than this stays float32 under ``quantize="int8"`` unless a mapping names it."""

_SCALE_BIAS_BYTES = 8  # float32 scale and bias at the end of every int8 row
_DTYPES = {None: "float32", "int8": "uint8", "float16": "float16", "bfloat16": "bfloat16"}
_CHOICES = "None, 'int8', 'float16' or 'bfloat16'"


def check_option(quantize: Any) -> Any:
    """``ExportOptions.quantize`` checked: None, a scheme, or a ``{table name: scheme or None}``
    mapping (returned as a new dict).

    Raises:
        ValueError: an unknown scheme, naming it and the choices.
        TypeError: neither None, a string nor a mapping of strings.
    """
    if quantize is None:
        return None
    if isinstance(quantize, str):
        if quantize not in SCHEMES:
            raise ValueError(
                f"ExportOptions.quantize={quantize!r} is not a quantization; choose {_CHOICES}, "
                "or a {table name: one of those} mapping."
            )
        return quantize
    if not isinstance(quantize, Mapping):
        raise TypeError(
            f"ExportOptions.quantize must be {_CHOICES} or a {{table name: one of those}} "
            f"mapping, got {type(quantize).__name__} {quantize!r}."
        )
    for name, scheme in quantize.items():
        if not isinstance(name, str):
            raise TypeError(
                f"ExportOptions.quantize maps {name!r}: its keys must be table names (str)."
            )
        if scheme is not None and scheme not in SCHEMES:
            raise ValueError(
                f"ExportOptions.quantize maps table {name!r} to {scheme!r}, which is not a "
                f"quantization; choose {_CHOICES}."
            )
    return dict(quantize)


def saves_memory(scheme: str, vocabulary_size: int, dim: int) -> bool:
    """Whether ``scheme`` applies to a table by default (a string ``quantize``): at least
    ``MIN_BYTES`` of float32, and ``dim >= MIN_INT8_DIM`` for int8."""
    if 4 * vocabulary_size * dim < MIN_BYTES:
        return False
    return scheme != "int8" or dim >= MIN_INT8_DIM


def plan(quantize: Any, tables: Mapping[str, tuple[int, int]]) -> dict[str, str | None]:
    """The scheme of every table (None: float32) under ``ExportOptions.quantize``.

    Args:
        quantize: A checked ``ExportOptions.quantize``.
        tables: ``{table name: (vocabulary_size, dim)}``.

    Raises:
        ValueError: the mapping names a table that does not exist, naming the tables.

    Example:
        >>> plan("int8", {"big": (1 << 16, 32), "small": (10, 32), "narrow": (1 << 20, 2)})
        {'big': 'int8', 'small': None, 'narrow': None}
    """
    if isinstance(quantize, Mapping):
        unknown = sorted(set(quantize) - set(tables))
        if unknown:
            raise ValueError(
                f"ExportOptions.quantize names {unknown}, which are not tables of this "
                f"Embedding; its tables are {sorted(tables)}."
            )
        return {name: quantize.get(name) for name in tables}
    if quantize is None:
        return dict.fromkeys(tables)
    return {
        name: quantize if saves_memory(quantize, *shape) else None for name, shape in tables.items()
    }


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one table is stored in the SavedModel.

    Args:
        scheme: None (float32) or one of ``SCHEMES``.
        vocabulary_size: Rows.
        dim: Columns of the served rows.
    """

    scheme: str | None
    vocabulary_size: int
    dim: int

    def __post_init__(self) -> None:
        if self.scheme is not None and self.scheme not in SCHEMES:
            raise ValueError(f"Unknown quantization {self.scheme!r}; choose {_CHOICES}.")

    @property
    def dtype(self) -> str:
        """The variable's dtype: ``float32``, ``uint8``, ``float16`` or ``bfloat16``."""
        return _DTYPES[self.scheme]

    @property
    def shape(self) -> tuple[int, int]:
        """The variable's shape (int8 rows hold 8 more bytes: the scale and the bias)."""
        extra = _SCALE_BIAS_BYTES if self.scheme == "int8" else 0
        return (self.vocabulary_size, self.dim + extra)

    @property
    def nbytes(self) -> int:
        """The variable's size in bytes."""
        return self.shape[0] * self.shape[1] * np.dtype(_numpy_dtype(self.dtype)).itemsize

    @property
    def float32_bytes(self) -> int:
        """The size of the float32 table it replaces."""
        return 4 * self.vocabulary_size * self.dim


def _numpy_dtype(name: str) -> Any:
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def quantize(values: np.ndarray, scheme: str | None, name: str = "table") -> np.ndarray:
    """The stored array of a float32 ``[V, dim]`` table (``values`` itself for None).

    Raises:
        ValueError: ``values`` holds NaN or Inf, or a value float16/bfloat16 cannot hold
            (``|x| > 65504`` for float16), naming the table ``name`` and its first bad rows.
    """
    if scheme is None:
        return values
    values = np.asarray(values, np.float32)
    _check_finite(values, name, scheme)
    if scheme == "int8":
        return _quantize_int8(values, name)
    with np.errstate(over="ignore"):  # an overflow becomes Inf: the error below names it
        stored = values.astype(_numpy_dtype(scheme))
    _check_finite(stored.astype(np.float32), name, scheme, overflow=True)
    return stored


def _check_finite(values: np.ndarray, name: str, scheme: str, overflow: bool = False) -> None:
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if not bad.size:
        return
    rows = ", ".join(str(i) for i in bad[:5]) + (", ..." if bad.size > 5 else "")
    if overflow:
        raise ValueError(
            f"Table {name!r} holds values too large for {scheme} in {bad.size} rows (rows "
            f"{rows}); quantize it as 'bfloat16' or 'int8', or keep it float32 "
            f"(ExportOptions(quantize={{{name!r}: None, ...}}))."
        )
    raise ValueError(
        f"Table {name!r} holds NaN or Inf in {bad.size} rows (rows {rows}), which cannot be "
        f"quantized to {scheme}; fix the table or keep it float32 "
        f"(ExportOptions(quantize={{{name!r}: None, ...}}))."
    )


def _quantize_int8(values: np.ndarray, name: str) -> np.ndarray:
    """FBGEMM's fused 8-bit row-wise layout: ``dim`` uint8 codes, then float32 scale and bias."""
    tiny = np.finfo(np.float32).tiny
    # TF flushes subnormal float32 to zero in arithmetic, so a subnormal bias or scale would
    # dequantize differently in TF and numpy: they are stored as zero (an error below 1.2e-38).
    low = values.min(axis=1)
    low = np.where(np.abs(low) < tiny, np.float32(0), low)
    scale = ((values.max(axis=1) - low) / np.float32(255)).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(scale))
    if bad.size:
        raise ValueError(
            f"Table {name!r}: rows {bad[:5].tolist()} span more than float32 can scale "
            f"(max - min overflows); keep it float32 (ExportOptions(quantize={{{name!r}: None}}))."
        )
    scale = np.where(scale < tiny, np.float32(0), scale)
    # The nearest of the 256 levels, computed in float64 (clipped against rounding at the ends).
    step = np.where(scale > 0, scale, 1).astype(np.float64)[:, None]
    codes = np.rint((values.astype(np.float64) - low[:, None]) / step)
    codes = np.clip(codes, 0, 255).astype(np.uint8)
    scale_bias = np.stack([scale, low], axis=1).astype("<f4").view(np.uint8)
    return np.concatenate([codes, scale_bias], axis=1)


def dequantize(stored: np.ndarray, scheme: str | None, dim: int) -> np.ndarray:
    """The float32 ``[V, dim]`` table the SavedModel serves from ``stored``: the same float32
    operations as ``gather_rows``, so the same bits."""
    if scheme is None:
        return np.asarray(stored, np.float32)
    if scheme != "int8":
        return np.asarray(stored).astype(np.float32)
    codes = stored[:, :dim].astype(np.float32)
    scale_bias = np.ascontiguousarray(stored[:, dim:]).view("<f4").astype(np.float32)
    return codes * scale_bias[:, :1] + scale_bias[:, 1:]


def max_abs_error(values: np.ndarray, served: np.ndarray, chunk: int = 1 << 16) -> float:
    """The largest ``|served - values|`` of a table (in chunks of rows)."""
    worst = 0.0
    for lo in range(0, values.shape[0], chunk):
        diff = np.abs(served[lo : lo + chunk] - np.asarray(values[lo : lo + chunk], np.float32))
        worst = max(worst, float(diff.max(initial=0.0)))
    return worst


def gather_rows(variable: tf.Variable, ids: tf.Tensor, layout: Layout) -> tf.Tensor:
    """The float32 rows ``[n, dim]`` of a stored table for ``ids``: one gather of the stored
    rows, then their dequantization (only the gathered rows)."""
    rows = tf.gather(variable, ids)
    if layout.scheme is None:
        return rows
    if layout.scheme != "int8":
        return tf.cast(rows, tf.float32)
    dim = layout.dim
    codes = tf.cast(rows[:, :dim], tf.float32)
    scale_bias = tf.bitcast(tf.reshape(rows[:, dim:], [-1, 2, 4]), tf.float32)
    return codes * scale_bias[:, :1] + scale_bias[:, 1:]
