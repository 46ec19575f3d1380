"""Kernels of the coreset draw (:mod:`kvant.cluster.sampling`): sums over a threshold and the Poisson draw.

Both take the rows' squared distances ``d2`` and work in fixed blocks of ``BLOCK`` rows, so every result —
sums included — is the same for any thread count. The draw's uniforms come from a counter-based hash of
(key, row) (SplitMix64's finaliser), not from a sequential generator: the blocks can be drawn in parallel and
the sample still depends only on the key. Before these kernels the proposal, the inclusion solve and NumPy's
``Generator.random`` over 1M rows took ~20 ms of a 0.3 s fit (1M×128, K = 64); now ~2 ms.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

_JIT = dict(cache=True, nogil=True)
BLOCK = 1 << 16  # rows per block of the partial sums and of the draw
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@numba.njit(inline="always", **_JIT)
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always", **_JIT)
def uniform_at(key, i):
    """A uniform double in [0, 1) for row ``i`` under ``key`` (uint64): the top 53 bits of SplitMix64's output."""
    z = _mix(key + (np.uint64(i) + np.uint64(1)) * _GOLDEN)
    return np.float64(z >> np.uint64(11)) * 2.0**-53


# reassociation lets LLVM vectorise a block's sum (branch-free: 10 → 0.5 ms over 1M rows); the order stays fixed by
# the block, not by the thread count
@numba.njit(parallel=True, fastmath={"reassoc"}, **_JIT)
def sum_at_least(d2, threshold):
    """(count, Σ d2_i) over the rows with d2_i >= ``threshold`` (``-inf``: every row), summed per block of
    ``BLOCK`` rows and then over the blocks in order (the same float64 sum for any thread count)."""
    n = d2.shape[0]
    nb = (n + BLOCK - 1) // BLOCK
    counts = np.zeros(nb, np.int64)
    sums = np.zeros(nb, np.float64)
    for b in prange(nb):
        c = 0
        s = 0.0
        for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            v = d2[i]
            kept = v >= threshold
            c += kept
            s += v if kept else 0.0
        counts[b] = c
        sums[b] = s
    total = 0.0
    for b in range(nb):
        total += sums[b]
    return counts.sum(), total


@numba.njit(inline="always", **_JIT)
def _keep(d2, i, a, b, key):
    p = min(1.0, a) if b == 0.0 else min(1.0, a + b * d2[i])  # b = 0 (uniform): an infinite d2 must not give 0·inf
    return uniform_at(key, i) < p, p


@numba.njit(parallel=True, **_JIT)
def poisson_draw(d2, a, b, key):
    """Rows kept by independent draws, row i with probability π_i = min(1, a + b·d2_i) (min(1, a) when b = 0), and
    their weights 1/π_i:
    (rows int64 ascending, weights float64). Row i is kept when :func:`uniform_at` (key, i) < π_i."""
    n = d2.shape[0]
    nb = (n + BLOCK - 1) // BLOCK
    counts = np.zeros(nb + 1, np.int64)
    for blk in prange(nb):
        c = 0
        for i in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            c += _keep(d2, i, a, b, key)[0]
        counts[blk + 1] = c
    for blk in range(nb):
        counts[blk + 1] += counts[blk]
    rows = np.empty(counts[nb], np.int64)
    weights = np.empty(counts[nb], np.float64)
    for blk in prange(nb):
        o = counts[blk]
        for i in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            kept, p = _keep(d2, i, a, b, key)
            if kept:
                rows[o] = i
                weights[o] = 1.0 / p
                o += 1
    return rows, weights


__all__ = ["BLOCK", "poisson_draw", "sum_at_least", "uniform_at"]
