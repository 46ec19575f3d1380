"""Numba kernels of the kd-tree that answers :class:`kvant.CoverTree` queries in few coordinates.

For points of a handful of coordinates under the Euclidean, Manhattan or Chebyshev metric, a kd-tree with
16-point leaves reaches a query's neighbours through cheap box bounds, where the cover tree computes a distance per
child it expands (docs/covertree.md, "Few coordinates: a kd-tree"). The tree is a query index over the cover tree's
points, rebuilt when they change; answers are exactly the cover tree's (brute force's, ties to the smaller id).

Layout: the points' rows are reordered so that every node's points are one contiguous run ``rows[lo[v]:hi[v]]``
(``slot`` gives each row's point slot); ``left[v]`` is the first of v's two children (the second is
``left[v] + 1``), -1 for a leaf; ``box[v]`` = [lo (D), hi (D)] is the bounding box of v's points and ``minid[v]``
their smallest slot. A leaf whose points all coincide (``same[v]``) may hold any number of them, sorted by slot.
Kernels only: no validation, no policy.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .tree import (
    _NJ,
    _NJ_RAW,
    EUCLIDEAN,
    QUERY_CHUNKS,
    _box_lower,
    _dist,
    _finish,
    _heap_push_res,
    _okd,
    _push_measured,
)

KD_LEAF = 16  # points per leaf (the last split halves a node of at most 2 * KD_LEAF points)
_STACK = 192
_NO_CUT = np.int64(2**63 - 1)  # the query's stack of far children: one per level (depth <= log2(n) + 1 < 64)


@numba.njit(**_NJ)
def _select(rows, slot, a, b, mid, t):  # pragma: no cover - numba
    """Reorder rows a..b-1 (and their slots) so that row mid holds the value of coordinate t it would hold if they
    were sorted by it, with no smaller value after it and no larger one before it (quickselect, median of three)."""
    D = rows.shape[1]
    lo, hi = a, b - 1
    while lo < hi:
        m = (lo + hi) >> 1
        x, y, z = rows[lo, t], rows[m, t], rows[hi, t]
        pv = max(min(x, y), min(max(x, y), z))  # the median of the three
        i, j = lo, hi
        while i <= j:
            while rows[i, t] < pv:
                i += 1
            while rows[j, t] > pv:
                j -= 1
            if i <= j:
                for u in range(D):
                    w = rows[i, u]
                    rows[i, u] = rows[j, u]
                    rows[j, u] = w
                s = slot[i]
                slot[i] = slot[j]
                slot[j] = s
                i += 1
                j -= 1
        if mid <= j:
            hi = j
        elif mid >= i:
            lo = i
        else:
            break


@numba.njit(**_NJ)
def kd_build(rows, slot, leaf):  # pragma: no cover - numba
    """Build the tree over ``rows`` (n, D), reordering them and ``slot`` in place (module docstring's layout).

    Each node of more than ``leaf`` points is split at the median of its widest coordinate; a node whose points all
    coincide stays a leaf of any size, its slots sorted. Returns (lo, hi, left, box, minid, same)."""
    n, D = rows.shape
    cap = 2 * (n // max((leaf + 1) // 2, 1)) + 3
    lo = np.empty(cap, np.int64)
    hi = np.empty(cap, np.int64)
    left = np.full(cap, -1, np.int64)
    box = np.empty((cap, 2 * D))
    same = np.zeros(cap, np.bool_)
    todo = np.empty(cap, np.int64)
    nn = 1
    lo[0] = 0
    hi[0] = n
    nt = 1
    todo[0] = 0
    while nt > 0:
        nt -= 1
        v = todo[nt]
        a = lo[v]
        b = hi[v]
        for t in range(D):
            box[v, t] = np.inf
            box[v, D + t] = -np.inf
        for j in range(a, b):
            for t in range(D):
                x = rows[j, t]
                if x < box[v, t]:
                    box[v, t] = x
                if x > box[v, D + t]:
                    box[v, D + t] = x
        wide = 0.0
        dim = 0
        for t in range(D):
            w = box[v, D + t] - box[v, t]
            if w > wide:
                wide = w
                dim = t
        if wide == 0.0:  # every point coincides: one leaf, slots ascending (a scan can stop at the k-th)
            same[v] = b - a > 1
            slot[a:b] = np.sort(slot[a:b])
            continue
        if b - a <= leaf:
            continue
        mid = (a + b) >> 1
        _select(rows, slot, a, b, mid, dim)
        left[v] = nn
        lo[nn] = a
        hi[nn] = mid
        lo[nn + 1] = mid
        hi[nn + 1] = b
        todo[nt] = nn
        todo[nt + 1] = nn + 1
        nt += 2
        nn += 2
    minid = np.empty(nn, np.int64)
    for v in range(nn - 1, -1, -1):  # children come after their parent
        if left[v] < 0:
            s = slot[lo[v]]
            for j in range(lo[v] + 1, hi[v]):
                s = min(s, slot[j])
            minid[v] = s
        else:
            minid[v] = min(minid[left[v]], minid[left[v] + 1])
    return lo[:nn].copy(), hi[:nn].copy(), left[:nn].copy(), box[:nn].copy(), minid, same[:nn].copy()


@numba.njit(parallel=True, **_NJ)
def kd_knn(rows, slot, lo, hi, left, box, minid, same, params, code, Q, qslot, mode, k, out_d, out_i,
           bad):  # pragma: no cover - numba
    """Exact k-NN of the rows of ``Q`` (plain queries, mode 0; excluding slot ``qslot[i]``, mode 1; only slots below
    ``qslot[i]``, mode 2) by depth-first descent, nearer child first, skipping a node whose box lies farther than the
    current k-th distance (ties kept: they are ordered by slot, as brute force orders them). ``code`` is the metric's
    box-bound code (Euclidean 0, Manhattan 1, Chebyshev 2); distances are the metric's own (``params``)."""
    nq = Q.shape[0]
    nch = min(nq, QUERY_CHUNKS)
    for c in numba.prange(nch):
        _kd_chunk(rows, slot, lo, hi, left, box, minid, same, params, code, Q, qslot, mode, k, out_d, out_i, bad,
                  c * nq // nch, (c + 1) * nq // nch)


@numba.njit(**_NJ)
def kd_knn_serial(rows, slot, lo, hi, left, box, minid, same, params, code, Q, qslot, mode, k, out_d, out_i,
                  bad):  # pragma: no cover - numba
    """:func:`kd_knn` on the calling thread (a query or two: a parallel region costs more than the search)."""
    _kd_chunk(rows, slot, lo, hi, left, box, minid, same, params, code, Q, qslot, mode, k, out_d, out_i, bad,
              0, Q.shape[0])


@numba.njit(**_NJ)
def _kd_chunk(rows, slot, lo, hi, left, box, minid, same, params, code, Q, qslot, mode, k, out_d, out_i, bad, q0,
              q1):  # pragma: no cover - numba
    hd = np.empty(k, np.float64)
    hi_ = np.empty(k, np.int64)
    st_v = np.empty(_STACK, np.int64)
    st_b = np.empty(_STACK, np.float64)
    for qi in range(q0, q1):
        bad[qi] = _kd_one(rows, slot, lo, hi, left, box, minid, same, params, code, Q, qi, qslot, mode, k, out_d,
                          out_i, hd, hi_, st_v, st_b)


@numba.njit(inline="always", **_NJ)
def _root_limit(kth):  # pragma: no cover - numba
    """A bound L on squared sums with s > L => fl(sqrt(s)) > kth (inf where kth² could underflow or overflow)."""
    if kth > 1e-150 and kth < 1e150:
        return kth * kth * (1.0 + 1e-12)
    return np.inf


@numba.njit(**_NJ_RAW)
def _kd_one(rows, slot, lo, hi, left, box, minid, same, params, code, Q, qi, qslot, mode, k, out_d, out_i, hd, hi_,
            st_v, st_b):  # pragma: no cover - numba
    """One query of :func:`kd_knn`; returns True if the metric gave a NaN, inf or negative distance."""
    isbad = False
    size = 0
    lim = qslot[qi] if mode == 2 else -1
    excl = qslot[qi] if mode == 1 else -1
    # No slot at or above ``cut`` can enter the result: a predecessor set's own slot, or, once the k-th distance is
    # 0, the k-th's slot + 1 (every other point has d >= 0 and ties go to the smaller slot).
    cut = lim if mode == 2 else _NO_CUT
    ns = 1
    st_v[0] = 0
    st_b[0] = 0.0
    while ns > 0:
        ns -= 1
        v = st_v[ns]
        lb = st_b[ns]
        while True:
            kth = hd[0] if size == k else np.inf
            if kth == 0.0 and hi_[0] < cut:
                cut = hi_[0] + 1
            if lb > kth or minid[v] >= cut:
                break
            c = left[v]
            if c >= 0:
                # both children's bounds; descend into the nearer, keep the farther for later
                b0 = _box_lower(Q, qi, box, c, code)
                b1 = _box_lower(Q, qi, box, c + 1, code)
                if b1 < b0:
                    st_v[ns] = c
                    st_b[ns] = b0
                    v = c + 1
                    lb = b1
                else:
                    st_v[ns] = c + 1
                    st_b[ns] = b1
                    v = c
                    lb = b0
                ns += 1
                continue
            if same[v]:
                # coinciding points, slots ascending: one distance, then the smallest eligible slots
                d = _dist(Q, qi, rows, lo[v], params)
                if not _okd(d):
                    isbad = True
                    d = np.inf
                for j in range(lo[v], hi[v]):
                    x = slot[j]
                    if x >= cut:
                        break
                    if x == excl:
                        continue
                    if size == k and not (d < hd[0] or (d == hd[0] and x < hi_[0])):
                        break  # later slots are larger: none of them can enter either
                    size = _heap_push_res(hd, hi_, size, k, d, x)
                break
            if code == EUCLIDEAN:
                # squared sums first, in euclidean_dist's order (so the square root of a kept one is its distance to
                # the bit), and the root only for points that can enter: s > kth² (1 + 1e-12) proves sqrt(s) > kth
                # after rounding; not below 1e-150, where kth² would lose to underflow
                lim2 = _root_limit(hd[0]) if size == k else np.inf
                D = Q.shape[1]
                for j in range(lo[v], hi[v]):
                    x = slot[j]
                    if x >= cut or x == excl:
                        continue
                    s = 0.0
                    for t in range(D):
                        z = Q[qi, t] - rows[j, t]
                        s += z * z
                    if s > lim2:
                        continue
                    size, bad_d = _push_measured(hd, hi_, size, k, math.sqrt(s), x)
                    isbad = isbad or bad_d
                    if size == k:
                        lim2 = _root_limit(hd[0])
                break
            for j in range(lo[v], hi[v]):
                x = slot[j]
                if x >= cut or x == excl:
                    continue
                size, bad_d = _push_measured(hd, hi_, size, k, _dist(Q, qi, rows, j, params), x)
                isbad = isbad or bad_d
            break
    _finish(hd, hi_, size, k, out_d, out_i, qi)
    return isbad
