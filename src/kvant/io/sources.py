"""Dispatch any accepted input to its :class:`~kvant.io.source.VectorSource`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InvalidInput
from ._paths import exists, missing
from .source import ArraySource, VectorSource

_FORMATS = ".npy, .fvecs, .bvecs, .ivecs, .parquet/.pq (or a directory of them), .hdf5/.h5"


def as_source(x, column=None, name: str = "input", validate: bool = True) -> VectorSource:
    """Wrap ``x`` as a :class:`VectorSource` (n, dim, dtype, chunks, sample, take, to_array).

    Accepts:

    - a VectorSource (returned as is);
    - a 2-D NumPy array or ``np.memmap`` of float32/float64/float16/int8/uint8;
    - a path (``str`` or ``pathlib.Path``) to a ``.npy`` file (memory-mapped), a TEXMEX
      ``.fvecs``/``.bvecs``/``.ivecs`` file (memory-mapped), a parquet file or a directory of parquet
      files (``column=`` picks the list column or a list of scalar columns), or an ann-benchmarks
      HDF5 file (``column=`` picks the dataset, default ``"train"``).

    ``name`` labels the source in error messages for arrays (default ``"input"``; paths are named by their path).

    Bad input raises :class:`~kvant.errors.InvalidInput` naming the problem. An in-memory array is checked
    for NaN/inf here unless ``validate=False``; then every read checks the rows it returns instead, until
    the caller has checked them all itself and called ``mark_validated()``.

    >>> import numpy as np, kvant
    >>> src = kvant.io.as_source(np.zeros((5, 3), np.float32))
    >>> (src.n, src.dim)
    (5, 3)
    """
    if isinstance(x, VectorSource):
        if column is not None:
            raise InvalidInput("column= cannot be used with an existing VectorSource")
        return x
    if isinstance(x, np.ndarray):
        if column is not None:
            raise InvalidInput("column= only applies to parquet and HDF5 inputs, not to NumPy arrays")
        return ArraySource(x, name=name, validate=validate)
    if isinstance(x, str | os.PathLike):
        if not os.fspath(x):  # Path("") is "." and would read every parquet file below the working directory
            raise InvalidInput("input path is empty")
        return _open_path(Path(os.fspath(x)), column)
    if isinstance(x, list | tuple):
        raise InvalidInput(
            f"{name}: cannot read vectors from a Python {type(x).__name__}; pass a 2-D NumPy array "
            f"(np.asarray(x, dtype=np.float32)) or a file path"
        )
    raise InvalidInput(f"{name}: cannot read vectors from {type(x).__name__} (expected a NumPy array or a path)")


def _open_path(p: Path, column) -> VectorSource:
    from .hdf5 import HDF5_SUFFIXES, Hdf5Source
    from .npy import NpySource
    from .parquet import PARQUET_SUFFIXES, ParquetSource
    from .texmex import TEXMEX_DTYPES, TexmexSource

    if not exists(p):
        raise missing(p, "input file")
    if p.is_dir():
        return ParquetSource(p, column=column)
    suffix = p.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return ParquetSource(p, column=column)
    if suffix in HDF5_SUFFIXES:
        return Hdf5Source(p, column=column)
    if column is not None:
        raise InvalidInput(f"column= only applies to parquet and HDF5 inputs, not to {suffix or 'this'} files")
    if suffix == ".npy":
        return NpySource(p)
    if suffix in TEXMEX_DTYPES:
        return TexmexSource(p)
    raise InvalidInput(f"{p}: unsupported file type {suffix or '(no extension)'!r}; supported: {_FORMATS}")
