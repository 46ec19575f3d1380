"""Exact nearest-centroid assignment of row blocks (the E-step), GEMM or direct by shape."""

from __future__ import annotations

import numpy as np

from .._parallel import for_each_block
from ..kernels.assign import top2_direct, top2_from_ip
from ..kernels.distance import sq_norms_serial

# Below this many multiply-adds per row (D·K) a BLAS call costs more than it saves; measured on the
# 2-core reference machine (see docs/auto.md): direct wins for D·K <= ~512.
DIRECT_MAX_DK = 512


def block_rows_for(dim: int, k: int) -> int:
    """Rows per block so the (rows, K) float32 tile plus the (rows, D) input stay within ~2 MiB (L2/L3)."""
    rows = (2 << 20) // (4 * (k + dim))
    return int(min(8192, max(256, rows)))


def assign_top2(x: np.ndarray, centroids: np.ndarray, c_sqnorms: np.ndarray, labels, d1, d2,
                x_sqnorms: np.ndarray | None = None, n_threads: int | None = None) -> None:
    """Write nearest-centroid labels and the two smallest squared distances of every row of ``x``."""
    n, dim = x.shape
    k = centroids.shape[0]
    use_blas = dim * k > DIRECT_MAX_DK
    ct = np.ascontiguousarray(centroids.T) if use_blas else None

    def run(s: int, e: int) -> None:
        xb = x[s:e]
        if use_blas:
            xn = sq_norms_serial(xb) if x_sqnorms is None else x_sqnorms[s:e]
            top2_from_ip(xb @ ct, c_sqnorms, xn, labels[s:e], d1[s:e], d2[s:e])
        else:
            top2_direct(xb, centroids, labels[s:e], d1[s:e], d2[s:e])

    for_each_block(n, block_rows_for(dim, k), run, n_threads)
