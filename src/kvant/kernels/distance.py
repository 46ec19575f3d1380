"""Distance blocks: squared L2 and inner products between a block of queries and a block of vectors.

``sq_l2_block`` uses BLAS for ``q @ x.T`` (the FLOP-heavy part; BLAS runs at this machine's sgemm rate) and a
Numba pass to turn inner products into squared distances (``‖q‖² + ‖x‖² − 2 q·x``, clamped at 0). The
expansion loses relative precision when ‖q−x‖ ≪ ‖q‖; callers that need exact small distances use
``sq_l2_direct``, which sums (q−x)² term by term.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

_JIT = dict(cache=True, nogil=True, fastmath=False)
# Row norms: the only float work is one float64 sum per row; reassociation lets LLVM vectorise it (a serial
# chain of adds made the norms cost half of a small-K assignment). Rounding stays ~1e-16 relative.
_JIT_SUM = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"})


@numba.njit(inline="always")
def _row_sqnorm(x, i):
    acc = 0.0
    for j in range(x.shape[1]):
        v = np.float64(x[i, j])
        acc += v * v
    return acc


@numba.njit(parallel=True, **_JIT_SUM)
def sq_norms(x):
    """Squared L2 norm of each row, accumulated in float64, returned as float32."""
    out = np.empty(x.shape[0], np.float32)
    for i in prange(x.shape[0]):
        out[i] = _row_sqnorm(x, i)
    return out


@numba.njit(**_JIT_SUM)
def mean_and_spread(x, step):
    """(μ, mean ‖x − μ‖², mean ‖x‖²) of rows 0, step, 2·step, ... of x, in float64, in two passes without
    temporaries (a NumPy version's float64 copy and difference cost 1 ms of a 4 ms digits fit)."""
    n, d = x.shape
    mu = np.zeros(d)
    m = 0
    for i in range(0, n, step):
        for j in range(d):
            mu[j] += x[i, j]
        m += 1
    if m == 0:
        return mu, 0.0, 0.0
    mu /= m
    spread = 0.0
    sq = 0.0
    for i in range(0, n, step):
        for j in range(d):
            v = np.float64(x[i, j])
            spread += (v - mu[j]) * (v - mu[j])
            sq += v * v
    return mu, spread / m, sq / m


@numba.njit(parallel=True, **_JIT)
def finish_sq_l2(g, q_sqnorms, x_sqnorms):
    """In place: g[i, j] (= q_i·x_j) becomes max(‖q_i‖² + ‖x_j‖² − 2 g[i, j], 0)."""
    nq, nb = g.shape
    for i in prange(nq):
        qi = q_sqnorms[i]
        for j in range(nb):
            v = qi + x_sqnorms[j] - np.float32(2.0) * g[i, j]
            g[i, j] = v if v > 0 else np.float32(0.0)


@numba.njit(parallel=True, **_JIT)
def sq_l2_direct(q, x):
    """Exact squared L2 (Σ (q−x)², float32 terms, float64 accumulation) for every pair: (nq, nb)."""
    nq, d = q.shape
    nb = x.shape[0]
    out = np.empty((nq, nb), np.float32)
    for i in prange(nq):
        for j in range(nb):
            acc = 0.0
            for t in range(d):
                diff = np.float64(q[i, t]) - np.float64(x[j, t])
                acc += diff * diff
            out[i, j] = acc
    return out


@numba.njit(parallel=True, **_JIT)
def exact_l2_topk(q, x, out_d, out_i):
    """The k = out_d.shape[1] nearest rows of ``x`` to each query by exact squared L2 (float64 Σ(q−x)²),
    ascending, ties to the smaller row; rows beyond x are padded inf / -1. Parallel over queries: this is the
    fallback for queries whose GEMM-form distances cannot certify their top k, so it is meant for few of them.
    """
    nq, d = q.shape
    k = out_d.shape[1]
    for i in prange(nq):
        bd = out_d[i]
        bi = out_i[i]
        bd[:] = np.inf
        bi[:] = -1
        for j in range(x.shape[0]):
            acc = 0.0
            for t in range(d):
                diff = np.float64(q[i, t]) - np.float64(x[j, t])
                acc += diff * diff
            if acc < bd[k - 1]:  # rows come in increasing order, so an equal distance keeps the earlier row
                p = k - 1
                while p > 0 and bd[p - 1] > acc:
                    bd[p] = bd[p - 1]
                    bi[p] = bi[p - 1]
                    p -= 1
                bd[p] = acc
                bi[p] = j


def ip_block(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Inner products (nq, nb) via BLAS."""
    return q @ x.T


def sq_l2_block(q: np.ndarray, x: np.ndarray, x_sqnorms: np.ndarray, q_sqnorms: np.ndarray | None = None):
    """Squared L2 distances (nq, nb) via BLAS plus the norm expansion, clamped at 0."""
    g = np.ascontiguousarray(q @ x.T)
    finish_sq_l2(g, sq_norms(q) if q_sqnorms is None else q_sqnorms, x_sqnorms)
    return g


@numba.njit(**_JIT_SUM)
def sq_norms_serial(x):
    """Serial :func:`sq_norms`, for use on a block inside a worker thread."""
    out = np.empty(x.shape[0], np.float32)
    for i in range(x.shape[0]):
        out[i] = _row_sqnorm(x, i)
    return out


@numba.njit(**_JIT_SUM)
def normalise_rows_into(x, out):
    """out[i] = x[i] / ‖x[i]‖ (norm summed in float64, rounded to float32, as :func:`sq_norms`), in one read
    of ``x``. Returns the first row whose norm is 0 (that row is left unwritten), or -1."""
    for i in range(x.shape[0]):
        nrm = np.float32(np.sqrt(_row_sqnorm(x, i)))
        if nrm == 0:
            return i
        for j in range(x.shape[1]):
            out[i, j] = x[i, j] / nrm
    return -1
