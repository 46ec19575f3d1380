"""Fused assignment: for each row, the nearest centroid and the two smallest squared distances.

Two paths produce the same answer: ``top2_from_ip`` finishes a BLAS inner-product block (fast for
D·K large enough that sgemm dominates), ``top2_direct`` computes distances term by term (no BLAS call,
better for tiny D or K, and exact for large dynamic range). The top-2 distances feed Hamerly bounds in
:mod:`kvant.cluster.lloyd`: the second distance is the lower bound to every other centroid.
Ties go to the smaller centroid id. Both kernels are serial and ``nogil``: callers run them on row blocks
from several threads (see :mod:`kvant._parallel`).
"""

from __future__ import annotations

import numba
import numpy as np

_JIT = dict(cache=True, nogil=True, fastmath=False)


@numba.njit(**_JIT)
def top2_from_ip(g, c_sqnorms, x_sqnorms, labels, d1, d2):
    """g (b, K) = x·cᵀ. Writes labels (argmin ‖x−c‖²), d1 (its squared distance), d2 (the runner-up)."""
    b, K = g.shape
    for i in range(b):
        best = np.inf
        second = np.inf
        arg = 0
        for j in range(K):
            s = c_sqnorms[j] - np.float32(2.0) * g[i, j]
            if s < best:
                second = best
                best = s
                arg = j
            elif s < second:
                second = s
        labels[i] = arg
        v1 = x_sqnorms[i] + best
        d1[i] = v1 if v1 > 0 else 0.0
        v2 = x_sqnorms[i] + second
        d2[i] = v2 if v2 > 0 else 0.0


@numba.njit(**_JIT)
def top2_direct(x, c, labels, d1, d2):
    """Same contract as :func:`top2_from_ip`, computing Σ(x−c)² directly (float32 terms, float64 sum)."""
    b, d = x.shape
    K = c.shape[0]
    for i in range(b):
        best = np.inf
        second = np.inf
        arg = 0
        for j in range(K):
            acc = 0.0
            for t in range(d):
                diff = np.float64(x[i, t]) - np.float64(c[j, t])
                acc += diff * diff
            if acc < best:
                second = best
                best = acc
                arg = j
            elif acc < second:
                second = acc
        labels[i] = arg
        d1[i] = best
        d2[i] = second
