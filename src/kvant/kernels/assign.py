"""Fused assignment: for each row, the nearest centroid and the two smallest squared distances.

``top2_from_ip`` finishes a BLAS inner-product block. A hand-written direct kernel (Σ(x−c)² term by term)
was measured against it on D·K from 16 to 3,000 and lost everywhere, by 1× to 10× (docs/auto.md), so
BLAS is used for every shape. The top-2 distances feed Hamerly bounds in
:mod:`kvant.cluster.lloyd`: the second distance is the lower bound to every other centroid.
Ties go to the smaller centroid id. The kernel is serial and ``nogil``: callers run them on row blocks
from several threads (see :mod:`kvant._parallel`).
"""

from __future__ import annotations

import numba
import numpy as np

_JIT = dict(cache=True, nogil=True, fastmath=False)


@numba.njit(**_JIT)
def top2_from_ip(g, c_sqnorms, x_sqnorms, labels, d1, d2):
    """g (b, K) = x·cᵀ, overwritten as scratch. Writes labels (argmin ‖x−c‖²), d1 (its squared distance)
    and d2 (the runner-up's).

    Distances ‖x‖² + ‖c‖² − 2x·c are clamped at 0, so they are non-negative floats whose int32 bit patterns
    order exactly like the values: the min searches then run on integers, which LLVM vectorises without
    fast-math (2× faster than a float compare loop at K=256 on the reference machine).
    """
    b, K = g.shape
    bits = g.view(np.int32)
    big = np.int32(0x7F800000)  # +inf's bit pattern
    for i in range(b):
        row = g[i]
        brow = bits[i]
        xi = x_sqnorms[i]
        for j in range(K):
            v = xi + c_sqnorms[j] - np.float32(2.0) * row[j]
            row[j] = v if v > 0 else np.float32(0.0)
        best = big
        for j in range(K):
            best = min(best, brow[j])
        arg = 0
        for j in range(K):
            if brow[j] == best:
                arg = j
                break
        second = big
        for j in range(K):
            v = brow[j] if j != arg else big
            second = min(second, v)
        labels[i] = arg
        d1[i] = row[arg]
        d2[i] = np.int32(second).view(np.float32)  # +inf when K == 1
