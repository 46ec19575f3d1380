"""Exact nearest-centroid assignment of row blocks (the E-step): BLAS tiles finished by a Numba top-2 pass."""

from __future__ import annotations

import numpy as np

from .._parallel import for_each_block
from ..kernels.assign import top2_from_ip
from ..kernels.distance import sq_norms_serial
from ..kernels.lloyd import exact_sq_dist_rows


def block_rows_for(dim: int, k: int) -> int:
    """Rows per block so the (rows, K) float32 tile plus the (rows, D) input stay within ~2 MiB (L2/L3)."""
    rows = (2 << 20) // (4 * (k + dim))
    return int(min(8192, max(256, rows)))


def assign_top2(x: np.ndarray, centroids: np.ndarray, c_sqnorms: np.ndarray, labels, d1, d2,
                x_sqnorms: np.ndarray | None = None, n_threads: int | None = None,
                exact_sq: np.ndarray | None = None, rows: np.ndarray | None = None) -> None:
    """Write nearest-centroid labels and the two smallest squared distances of every row of ``x``.

    ``rows`` (int64 indices into ``x``): assign only those rows, in that order (outputs and ``x_sqnorms`` are
    then per listed row). Each block is gathered just before its GEMM, so no ``x[rows]`` copy is made: on
    this project's VM a fresh copy of a few hundred MiB page-faults its way in at ~0.5 GB/s and cost more
    than a third of Lloyd's time at K=1024.

    With ``exact_sq`` (float64, one per row), also write each row's squared distance to its centre
    recomputed term by term in float64 — while the block is still in cache, so the exact inertia costs no
    second pass over the data."""
    dim = x.shape[1]
    n = x.shape[0] if rows is None else rows.shape[0]
    k = centroids.shape[0]
    ct = np.ascontiguousarray(centroids.T)

    def run(s: int, e: int) -> None:
        xb = x[s:e] if rows is None else x[rows[s:e]]
        xn = sq_norms_serial(xb) if x_sqnorms is None else x_sqnorms[s:e]
        top2_from_ip(xb @ ct, c_sqnorms, xn, labels[s:e], d1[s:e], d2[s:e])
        if exact_sq is not None:
            exact_sq[s:e] = exact_sq_dist_rows(xb, centroids, labels[s:e])

    for_each_block(n, block_rows_for(dim, k), run, n_threads)
