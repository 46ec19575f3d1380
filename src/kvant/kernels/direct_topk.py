"""Fused brute-force shortlist without BLAS: register-blocked products of stored rows with a block of queries, each
distance (or negated inner product) screened against its query's running k-th best as soon as it is formed.

FlatIndex's BLAS path writes every (query block × row block) distance to a tile in memory and then reads it back to
merge the top-k: at 1M × 128 and 1,024 queries the GEMM took 1.2 s and the finishing and merging passes another
0.8 s (2026-12-05, Intel host), because a 16 MiB tile goes through main memory twice. Here the micro-kernels of
:mod:`kvant.kernels.direct_assign` compute R rows × all (padded) queries of x·qᵀ into a scratch block that stays in
L1; each row's distances ‖q‖² + ‖x‖² − 2 q·x (the BLAS path's expression, clamped the same way) are compared with
every query's running threshold in one vectorised pass, and only rows that beat some threshold go to the scalar
insertion (rare once the lists fill). The lists are those of :func:`kvant.kernels.topk.merge_topk` (ascending,
ties to the smaller row); the products are summed in coordinate order with fused multiply-adds instead of BLAS's
order, within the same rounding bound, so callers that certify and re-score (FlatIndex) return identical results.

Rows are split into chunks that run in parallel, each with its own lists; :func:`kvant.kernels.topk.merge_topk_ids`
then merges the chunks' lists, which keeps the tie rule.
"""

from __future__ import annotations

import numba
import numpy as np

from .direct_assign import AVAILABLE, AVX512, MAX_CT_BYTES, _copy_rows, _group_rows, _products
from .distance import sq_norms_into

__all__ = ["AVAILABLE", "MAX_BATCH", "max_queries", "direct_keep", "finish_lists", "keep_from_products"]

_JIT = dict(cache=True, nogil=True, fastmath=False)
_JIT_RAW = dict(_JIT, _nrt=False)
# Queries per block: 256 padded columns is the widest product shape measured (direct_assign.SMALL_MAX_K); fewer when
# the padded qᵀ (D × columns float32) would not fit in half of L2 with room to spare.
_MAX_COLS = 256
# The batch sizes callers should send here. AVX-512 hosts: any (measured to 1,024 queries, 1.6-3.4× BLAS tiles at
# 1M × 128). AVX2 hosts: up to 16 queries, the width where the same micro-kernels beat OpenBLAS in the clustering
# E-steps (direct_assign.MAX_K); wider ones re-read qᵀ from L2 every 2 rows there, which lost to OpenBLAS at K = 64
# in whole fits, and this use of them has not been measured on such a host.
MAX_BATCH = None if AVX512 else 16


def max_queries(dim: int) -> int:
    """The most queries one :func:`direct_keep` call takes for vectors of ``dim`` (a multiple of 16, at least
    16): their padded transpose is read by every row group, so it must stay within :data:`MAX_CT_BYTES`."""
    return max(16, min(_MAX_COLS, (MAX_CT_BYTES // (4 * max(1, dim))) // 16 * 16))


@numba.njit(**_JIT_RAW)
def _condition_rows(x, i0, count, shift, steps, xt):
    """xt[:count] = (x[i0 : i0 + count] − shift)·steps[0]·steps[1]·… in float32, operation for operation as
    :func:`kvant._numerics.condition` computes it (``shift`` empty: no shift)."""
    for r in range(count):
        for t in range(x.shape[1]):
            v = x[i0 + r, t] - shift[t] if shift.shape[0] else x[i0 + r, t]
            for s in range(steps.shape[0]):
                v *= steps[s]
            xt[r, t] = v


@numba.njit(inline="always")
def _ranks_after(d1, i1, d2, i2):
    """(d1, i1) ranks after (d2, i2) in a list: a larger score, or an equal one with a larger row; an empty slot
    (row −1, score +inf) ranks after every kept row (:func:`kvant.kernels.topk.merge_topk`'s order)."""
    if d1 != d2:
        return d1 > d2
    if i1 == -1 or i2 == -1:
        return i1 == -1 and i2 != -1
    return i1 > i2


@numba.njit(inline="always")
def _sift_down(hd, hi, size, d, i):
    """Place (d, i) at the root of the max-heap ``hd[:size]``/``hi[:size]`` (ordered by :func:`_ranks_after`, the
    entry ranking last at the root) and sift it down."""
    pos = 0
    while True:
        c = 2 * pos + 1
        if c >= size:
            break
        if c + 1 < size and _ranks_after(hd[c + 1], hi[c + 1], hd[c], hi[c]):
            c += 1
        if not _ranks_after(hd[c], hi[c], d, i):
            break
        hd[pos] = hd[c]
        hi[pos] = hi[c]
        pos = c
    hd[pos] = d
    hi[pos] = i


@numba.njit(inline="always")
def _heap_replace(hd, hi, d, i):
    """Keep (d, i) in the list when it ranks before the list's last entry (its root), replacing it: O(log keep) per
    insertion where the sorted lists shifted O(keep) entries (k = 100 over 20,000 3-d rows, 1,000 queries: the
    insertions took 0.28 s of a 0.31 s search, against FAISS's 0.04 s with heaps)."""
    if _ranks_after(hd[0], hi[0], d, i):
        _sift_down(hd, hi, hd.shape[0], d, i)


@numba.njit(**_JIT_RAW)
def _heap_sort(hd, hi):
    """A list kept as a heap (:func:`_heap_replace`) in ascending order, ties to the smaller row, empty slots last."""
    for end in range(hd.shape[0] - 1, 0, -1):
        d, i = hd[end], hi[end]
        hd[end], hi[end] = hd[0], hi[0]
        _sift_down(hd, hi, end, d, i)


@numba.njit(**_JIT_RAW)
def finish_lists(out_d, out_i):
    """Sort the lists :func:`keep_from_products` kept as heaps (nq, keep), as :func:`direct_keep` returns them."""
    for j in range(out_d.shape[0]):
        _heap_sort(out_d[j], out_i[j])


@numba.njit(inline="always")
def _screen_row(g, r, row, xi, qn, nq, ip, out_d, out_i, thr):
    """Row ``r`` of the products ``g`` (stored row ``row``, ‖x‖² = ``xi``) into the lists of the ``nq`` queries whose
    k-th best (``thr``) it may beat: first one vectorised pass over every query, then the scalar insertions."""
    # the screen: every query whose list this row may enter (NaN, from float32 overflow, counts too). A score equal
    # to a full list's last cannot enter (rows arrive in ascending order: ties keep the earlier row), so it is no hit:
    # on data of many duplicates nearly every row tied some query's k-th and took the scalar loop over all queries
    # (100k × 3 rows of 60 distinct values, 200 queries, k = 100: 1.3 s in this kernel)
    hit = np.int32(0)
    inf = np.float32(np.inf)
    if ip:
        for j in range(nq):
            hit += np.int32(not -g[r, j] >= thr[j] or thr[j] == inf)
    else:
        for j in range(nq):
            v = qn[j] + xi - np.float32(2.0) * g[r, j]
            hit += np.int32(not v >= thr[j] or thr[j] == inf)
    if hit == 0:
        return
    for j in range(nq):
        if ip:
            d = -g[r, j]
            if d != d:  # merge_topk's rule: NaN is never selected (defensive: with fused multiply-adds
                continue    # and finite rows the sum cannot meet inf - inf)
        else:
            v = qn[j] + xi - np.float32(2.0) * g[r, j]
            # finish_sq_l2's clamp: never below 0, and +inf (not 0) where inf - inf gave NaN
            d = v if v > 0 else (np.float32(0.0) if v == v else np.float32(np.inf))
        if not d > thr[j]:
            _heap_replace(out_d[j], out_i[j], d, row)  # merge_topk's tie rule
            thr[j] = out_d[j, 0]


@numba.njit(**_JIT_RAW)
def keep_from_products(g, i0, x_sqnorms, qn, ip, out_d, out_i, thr):
    """:func:`direct_keep`'s screen and insertions for products computed elsewhere (BLAS): ``g`` (rows, nq) holds
    x[i0 + r]·q_j for the rows i0 .. i0 + rows − 1 (``x_sqnorms`` their ‖x‖², read for l2 only); the lists
    ``out_d``/``out_i`` (nq, keep; all +inf / −1 at first) and thresholds ``thr`` (nq; each list's last value) are
    updated in place; the lists are kept as heaps until :func:`finish_lists` sorts them, after the chunk's last block.
    Serial and ``nogil``: one call per row block, from Python worker threads."""
    nq = g.shape[1]
    for r in range(g.shape[0]):
        _screen_row(g, r, i0 + r, x_sqnorms[r] if not ip else np.float32(0.0), qn, nq, ip, out_d, out_i, thr)


@numba.njit(**_JIT_RAW)
def _keep_rows(x, r0, r1, ct, qn, x_sqnorms, nq, ip, shift, steps, out_d, out_i, thr, g, xt, xn):
    """Rows r0 .. r1 - 1 of x into the lists of the ``nq`` real queries (columns of ``ct``); ``thr[j]`` mirrors
    query j's last kept value (contiguous, so the screen vectorises). With ``steps`` (conditioned l2) each group
    of rows is conditioned into ``xt`` and its norms computed into ``xn`` first. Returns the largest ‖x‖² seen
    (conditioned rows; 0 otherwise)."""
    R = g.shape[0]
    cond = steps.shape[0] > 0 or shift.shape[0] > 0
    x_sq_max = 0.0
    i0 = r0
    while i0 < r1:
        cnt = min(R, r1 - i0)
        if cond:  # as FlatIndex's BLAS path conditions each block, norms included
            _condition_rows(x, i0, cnt, shift, steps, xt)
            sq_norms_into(xt, 0, cnt, xn)
            _products(xt, 0, ct, g)
        elif cnt == R:
            _products(x, i0, ct, g)
        else:  # the last partial group, through the zero-padded scratch
            _copy_rows(x, i0, cnt, xt)
            _products(xt, 0, ct, g)
        for r in range(cnt):
            if cond:
                xi = xn[r]
                x_sq_max = max(x_sq_max, np.float64(xi))
            else:
                xi = x_sqnorms[i0 + r]
            _screen_row(g, r, i0 + r, xi, qn, nq, ip, out_d, out_i, thr)
        i0 += cnt
    return x_sq_max


@numba.njit(parallel=True, **_JIT)
def direct_keep(x, ct, qn, x_sqnorms, nq, ip, out_d, out_i, shift, steps, x_sq_max):
    """Per query (the first ``nq`` columns of ``ct``) and per chunk c of x's rows: the ``keep = out_d.shape[2]``
    smallest scores with their row indices, ascending, ties to the smaller row, into ``out_d[c]`` / ``out_i[c]``
    (n_chunks, nq, keep; padded inf / -1). The score is ‖q‖² + ‖x‖² − 2 q·x (float32, clamped as
    :func:`kvant.kernels.distance.finish_sq_l2` does) or, with ``ip``, −q·x (NaN never selected, as in
    :func:`kvant.kernels.topk.merge_topk`). ``ct = direct_assign.padded_centroids(queries, ‖q‖²)[0]`` (qᵀ, (D, 16·m)
    float32, zero columns after the queries); ``qn`` the queries' ‖q‖² and ``x_sqnorms`` the rows' ‖x‖² (float32;
    read for unconditioned l2 only). Chunk c holds rows c·n/n_chunks .. (c+1)·n/n_chunks − 1.

    l2 on conditioned data (:func:`kvant._numerics.condition`): ``shift`` (float32, D; empty for none) and the
    float32 factors ``steps`` its scale is applied in (empty for none) condition each row group as it is read, its
    norms computed the way ``sq_norms`` computes them, and ``x_sq_max[c]`` receives chunk c's largest conditioned
    ‖x‖² (for the caller's error bound); the queries must be conditioned already."""
    n, dim = x.shape
    n_chunks, _, keep = out_d.shape
    kp = ct.shape[1]
    R = _group_rows(kp)
    for c in numba.prange(n_chunks):
        g = np.empty((R, kp), np.float32)
        xt = np.zeros((R, dim), np.float32)
        xn = np.empty(R, np.float32)
        thr = np.empty(nq, np.float32)
        od = out_d[c]
        oi = out_i[c]
        for j in range(nq):
            thr[j] = np.float32(np.inf)
            for p in range(keep):
                od[j, p] = np.float32(np.inf)
                oi[j, p] = -1
        x_sq_max[c] = _keep_rows(x, c * n // n_chunks, (c + 1) * n // n_chunks, ct, qn, x_sqnorms, nq, ip, shift,
                                 steps, od, oi, thr, g, xt, xn)
        finish_lists(od[:nq], oi[:nq])  # (kept as heaps while scanning)
