"""Vector inputs: one :func:`as_source` for arrays, memmaps, .npy, TEXMEX, parquet and HDF5."""

from .source import ArraySource, VectorSource, check_finite
from .sources import as_source

__all__ = ["as_source", "VectorSource", "ArraySource", "check_finite"]
