"""kvant.quant: vector codecs (fit / encode / decode / code_size)."""

from .opq import OPQ
from .pq import PQ

__all__ = ["PQ", "OPQ"]
