"""kvant: cluster, compress and search large sets of embedding vectors.

The public API, re-exported; nothing else lives here.
"""

from importlib.metadata import PackageNotFoundError, version

from . import errors, io, tree
from ._config import get_num_threads, set_num_threads
from .cluster import Clusterer, available_algorithms, available_metrics
from .errors import (
    DimensionMismatch,
    EmptyClusterWarning,
    EmptyIndex,
    InvalidInput,
    KvantError,
    KvantWarning,
    PersistError,
)
from .index import FlatIndex, PQIndex
from .io import as_source
from .persist import load
from .quant import OPQ, PQ
from .tree import RBF, CoverTree, Matern52, ResidualCorrelation

try:
    __version__ = version("kvant")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "errors",
    "io",
    "as_source",
    "load",
    "set_num_threads",
    "get_num_threads",
    "KvantError",
    "KvantWarning",
    "EmptyClusterWarning",
    "InvalidInput",
    "DimensionMismatch",
    "EmptyIndex",
    "PersistError",
    # --- cluster names ---
    "Clusterer",
    "available_algorithms",
    "available_metrics",
    # --- quant + index names ---
    "PQ",
    "OPQ",
    "FlatIndex",
    "PQIndex",
    # --- tree names ---
    "tree",
    "CoverTree",
    "ResidualCorrelation",
    "RBF",
    "Matern52",
]
