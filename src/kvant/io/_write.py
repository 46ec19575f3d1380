"""Checks shared by the writers (``write_fvecs``/``write_bvecs``/``write_ivecs``, ``write_parquet``): a writer
never changes a value silently, and never writes a file its own reader refuses."""

from __future__ import annotations

import contextlib
import os

import numpy as np

from ..errors import InvalidInput
from ._atomic import replacing


@contextlib.contextmanager
def writing(path):
    """``with writing(path) as fh:`` a binary file that becomes ``path`` only when complete (an existing file there
    survives a failed write: :func:`kvant.io._atomic.replacing`); a path that is not ``str`` / ``os.PathLike`` (an
    int would be a file descriptor) or cannot be written is InvalidInput."""
    if isinstance(path, bool) or not isinstance(path, str | os.PathLike) or not os.fspath(path):
        raise InvalidInput(f"path must be a non-empty str or os.PathLike, got {path!r}")
    if "\0" in os.fsdecode(os.fspath(path)):  # the OS cannot name it (os.stat raised a bare ValueError)
        raise InvalidInput(f"cannot write {path!r}: the path contains a NUL byte")
    if os.path.isdir(path):
        raise InvalidInput(f"cannot write {path}: it is a directory")
    try:
        with replacing(path) as fh:
            yield fh
    except OSError as exc:  # a missing directory, no permission, a full disk
        raise InvalidInput(f"cannot write {path}: {exc}") from exc


def _first_row(mask: np.ndarray) -> int:
    return int(np.argmax(mask.any(axis=1)))


def first_overflow(arr: np.ndarray, cast: np.ndarray) -> int | None:
    """The first row where a finite value of ``arr`` became inf in ``cast`` (``arr`` converted), or None."""
    beyond = np.isfinite(arr) & ~np.isfinite(cast)
    return _first_row(beyond) if beyond.any() else None


def first_underflow(arr: np.ndarray, cast: np.ndarray) -> int | None:
    """The first row that is nonzero in ``arr`` and all zero in ``cast`` (``arr`` converted to a narrower float),
    or None. Such a row is refused only when ``cast`` holds no value of its type's normal range: beside one, each
    such row is below half an ulp of it (2^-150 against 2^-126 in float32), as negligible as rounding makes any
    value's tail. Whole data that small became zero rows silently (a review: data x 1e-300 clustered as one
    point), where data x 1e300 is refused as beyond float32's range."""
    if cast.ndim != 2 or arr.shape != cast.shape or cast.size == 0:
        return None
    zero = ~cast.any(axis=1)  # (one read of the converted rows; the wide ones are read only where zero)
    if not zero.any():
        return None
    rows = np.flatnonzero(zero)
    lost = rows[arr[rows].any(axis=1)]
    if lost.size and not np.abs(cast).max() >= np.finfo(cast.dtype).tiny:
        return int(lost[0])
    return None


def values_to_write(x, dtype: np.dtype) -> np.ndarray:
    """``x`` (n, dim) converted to ``dtype``, else InvalidInput: not 2-D, zero rows or columns, not real numbers,
    a finite value that would become inf, an integer the target cannot hold exactly (a float target rounds
    integers beyond its mantissa: float32 stores 16777217 as 16777216), or a value an integer target cannot
    hold exactly, or NaN/inf (the readers refuse them, naming the row; a review found the writers wrote them).
    Non-integer floats are rounded to a float target's precision, as any float conversion does."""
    if isinstance(x, np.ma.MaskedArray):  # its .data would write the masked placeholders as values
        raise InvalidInput("masked arrays are not supported; fill (x.filled(v)) or drop the masked rows first")
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:  # a ragged list
        raise InvalidInput(f"vectors must be a 2-D array (n, dim): {exc}") from None
    if arr.ndim != 2:
        raise InvalidInput(f"expected a 2-D array (n, dim), got shape {arr.shape}")
    n, dim = arr.shape
    if dim == 0:
        raise InvalidInput("cannot write vectors with zero columns")
    if n == 0:
        raise InvalidInput("cannot write zero vectors (the readers reject an empty file)")
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise InvalidInput(f"vectors must be real numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            raise InvalidInput(f"vectors contain NaN or inf (first at row {_first_row(bad)}); kvant's readers refuse "
                               f"them, so they are not written")
    with np.errstate(over="ignore", invalid="ignore"):
        values = arr.astype(dtype, copy=False)
    if dtype.kind == "f" and arr.dtype.kind == "f":
        row = first_overflow(arr, values)
        if row is not None:
            raise InvalidInput(f"values out of the {dtype.name} range (they would be written as inf; first at row "
                               f"{row})")
        row = first_underflow(arr, values) if values.dtype.itemsize < arr.dtype.itemsize else None
        if row is not None:
            raise InvalidInput(f"row {row}'s nonzero values are all below {dtype.name}'s smallest, so it would be "
                               f"written as a zero row (multiply the data by a constant)")
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
