"""Vector inputs: one :func:`as_source` for arrays, memmaps, .npy, TEXMEX, parquet and HDF5."""

from .hdf5 import Hdf5Source
from .npy import NpySource
from .parquet import ParquetSource, write_parquet
from .source import ArraySource, VectorSource, check_finite
from .sources import as_source
from .texmex import TexmexSource, write_bvecs, write_fvecs, write_ivecs

__all__ = [
    "as_source",
    "VectorSource",
    "ArraySource",
    "NpySource",
    "TexmexSource",
    "ParquetSource",
    "Hdf5Source",
    "check_finite",
    "write_fvecs",
    "write_bvecs",
    "write_ivecs",
    "write_parquet",
]
