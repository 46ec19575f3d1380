"""Dispatch any accepted input to its :class:`~kvant.io.source.VectorSource`."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInput
from .source import ArraySource, VectorSource


def as_source(x, column: str | None = None, name: str = "input") -> VectorSource:
    """Wrap ``x`` as a :class:`VectorSource`.

    Accepts a VectorSource (returned as is), a 2-D NumPy array or memmap (float32/float64/float16/
    int8/uint8). File formats are added by :mod:`kvant.io` format modules.
    """
    if isinstance(x, VectorSource):
        return x
    if isinstance(x, np.ndarray):
        return ArraySource(x, name=name)
    raise InvalidInput(f"{name}: cannot read vectors from {type(x).__name__}")
