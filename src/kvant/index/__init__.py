"""kvant.index: searchable structures (exact flat, PQ/OPQ with ADC and FastScan)."""

from .flat import FlatIndex
from .pq import PQIndex

__all__ = ["FlatIndex", "PQIndex"]
