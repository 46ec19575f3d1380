"""kvant.tree: exact k-NN in general metrics with a compressed cover tree."""

from .cover import CoverTree
from .metrics import RBF, Matern52, ResidualCorrelation

__all__ = ["CoverTree", "ResidualCorrelation", "RBF", "Matern52"]
