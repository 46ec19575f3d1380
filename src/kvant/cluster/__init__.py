"""Clustering: :class:`Clusterer` and its algorithms (one module per family)."""

from .clusterer import ALGORITHMS, METRICS, Clusterer, available_algorithms, available_metrics

__all__ = ["Clusterer", "available_algorithms", "available_metrics", "ALGORITHMS", "METRICS"]
