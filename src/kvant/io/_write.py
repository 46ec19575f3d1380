"""Checks shared by the writers (``write_fvecs``/``write_bvecs``/``write_ivecs``, ``write_parquet``): a writer
never changes a value silently, and never writes a file its own reader refuses."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInput


def _first_row(mask: np.ndarray) -> int:
    return int(np.argmax(mask.any(axis=1)))


def values_to_write(x, dtype: np.dtype) -> np.ndarray:
    """``x`` (n, dim) converted to ``dtype``, else InvalidInput: not 2-D, zero rows or columns, not real numbers,
    a finite value that would become inf, an integer the target cannot hold exactly (a float target rounds
    integers beyond its mantissa: float32 stores 16777217 as 16777216), or a value an integer target cannot
    hold exactly. NaN and inf given are written as they are. Non-integer floats are rounded to a float target's
    precision, as any float conversion does."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise InvalidInput(f"expected a 2-D array (n, dim), got shape {arr.shape}")
    n, dim = arr.shape
    if dim == 0:
        raise InvalidInput("cannot write vectors with zero columns")
    if n == 0:
        raise InvalidInput("cannot write zero vectors (the readers reject an empty file)")
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise InvalidInput(f"vectors must be real numbers, got dtype {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        values = arr.astype(dtype, copy=False)
    if dtype.kind == "f" and arr.dtype.kind == "f":
        beyond = np.isfinite(arr) & ~np.isfinite(values)
        if beyond.any():
            raise InvalidInput(f"values out of the {dtype.name} range (they would be written as inf; first at row "
                               f"{_first_row(beyond)})")
    elif dtype.kind == "f":  # integers to floats: each must come back unchanged
        with np.errstate(over="ignore", invalid="ignore"):
            back = values.astype(arr.dtype)
        inexact = ~np.isfinite(values) | (back != arr)
        if inexact.any():
            r = _first_row(inexact)
            v = arr[r][inexact[r]][0]
            raise InvalidInput(f"integer {v} (row {r}) is not exactly representable in {dtype.name}; it would be "
                               f"written rounded (convert the array yourself if that is intended)")
    elif not np.array_equal(values, arr):
        raise InvalidInput(f"values do not fit exactly into {dtype.name}")
    return values
