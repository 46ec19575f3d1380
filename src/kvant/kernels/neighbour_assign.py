"""Lloyd's E-step by each row's previous centre's neighbours: for few coordinates and many centres.

Where rows have few coordinates and K is large, a row's nearest centres are a handful of its previous centre's
neighbours, while the full E-step multiplies it with all K (1M × 2 rows, K = 1,024: every training E-step crossed
its Hamerly bounds and cost a full pass). With a the row's previous centre, d_a = ‖x − c_a‖ and the other centres in
ascending order of ‖c_j − c_a‖, the triangle inequality gives ‖x − c_j‖ >= ‖c_j − c_a‖ − d_a, so once
‖c_j − c_a‖ − d_a reaches the second-smallest distance found so far, no centre further down the list can be the
nearest or the runner-up: the scan stops there with the exact top-2 (Elkan's inter-centre bound used the way
Newling and Fleuret's Exponion uses it, with sorted neighbour lists).

The lists hold each centre's ``L`` nearest other centres and the distance of the next one (``reach``): a row whose
scan runs off its list gets the runner-up bound reach − d_a when that still proves its nearest centre, and is
otherwise left to the full E-step (marked -1). Lists built for earlier centres stay usable: ``shrink`` lowers every
listed distance by how far the centres could have come closer since. Where a row has no previous centre (the final
assignment), :func:`grid_cells` gives it the centre nearest its cell of a grid (:func:`grid_starts`) to start from.

Distances are computed term by term in float64 from the float32 rows and centres (more exact than the GEMM's
expanded ones), and the stopping test keeps a relative slack of ``SLACK`` so float64 rounding cannot stop a scan
early. Reference: :func:`neighbour_e_step_numpy`.
"""

from __future__ import annotations

import numba
import numpy as np

_JIT = dict(cache=True, nogil=True, fastmath=False)

# Relative slack on the stopping test (float64 rounding of the distances, ~1e-16 relative, is far below it).
SLACK = 1e-9
# Two sums of the same dim nonnegative terms in different orders differ by at most 2·γ_(dim−1) ≈ 2(dim−1)·2⁻⁵³ of the
# sum, so a runner-up within 1 + TIE_PER_DIM·dim of the best may be ranked first by the fused pass, whose float64
# distances (kernels.distance.row_scaled_sq_dist64: the same terms, added by halves) certify predict's labels; such
# rows are left to it. (An audit, 2026-12-07: 42 of 60,000 rows of a 3-coordinate cos fit had labels_ != predict(X),
# and predict differed with the batch size on mirror-image ties. Matching the lanes' order here instead cost the
# scan 2–4x its time.)
TIE_PER_DIM = 8.0 * 2.0**-53
# Neighbours every scan takes before its first stopping test (neighbour_e_step_range): PREFIX_PER_DIM per coordinate
# (single thread, 262k rows, K = 1,024, settled starts, ms with a prefix of 4 taken one by one / 4·D vectorised: D = 2
# 7.6 / 6.5, D = 4 20.8 / 17.3, D = 8 30.9 / 21.4; 8·D read 10.5 at D = 2, 2·D 24.1 at D = 8).
PREFIX_PER_DIM = 4


def prefix_length(dim):
    return PREFIX_PER_DIM * max(1, int(dim))


@numba.njit(inline="always", **_JIT)
def _sq_dist_scaled(x, i, f, c, j):
    """Σ_t (f·x_it − c_jt)², the row scaled by f in float64 (spherical k-means: f = 1/‖x_i‖)."""
    s = 0.0
    for t in range(x.shape[1]):
        d = f * np.float64(x[i, t]) - np.float64(c[j, t])
        s += d * d
    return s


@numba.njit(**_JIT)
def centre_neighbours_range(c, nbr, ndist, reach, far, hint, a0, a1):
    """Rows a0:a1 of :func:`centre_neighbours`' outputs (``nbr`` (K, L) int32, ``ndist`` (K, L) float64, ``reach``
    (K,) float64, ``far`` (K,) int32 the id of the next nearest, -1 when there is none). Ties in distance keep the
    smaller id first. ``hint[a]``: a squared distance within which at least L + 1 other centres lie (inf when not
    known): only those are ranked (a rebuild knows one from the last lists, and ranking all K cost ~5 ns a centre)."""
    k, dim = c.shape
    L = nbr.shape[1]
    c64 = np.empty((dim, k))  # coordinate-major, so the distances to one centre vectorise over the others
    for j in range(k):
        for t in range(dim):
            c64[t, j] = c[j, t]
    dist = np.empty(k)
    pool = np.empty(k, np.int32)
    top = np.empty(L + 1)  # squared, while selecting
    ids = np.empty(L + 1, np.int32)
    for a in range(a0, a1):
        dist[:] = 0.0
        for t in range(dim):
            v = c64[t, a]
            for j in range(k):
                e = c64[t, j] - v
                dist[j] += e * e
        h = hint[a]
        f = 0
        for j in range(k):
            if dist[j] <= h and j != a:
                pool[f] = j
                f += 1
        if f < min(L + 1, k - 1):  # (a hint too small: rank every centre)
            f = 0
            for j in range(k):
                if j != a:
                    pool[f] = j
                    f += 1
        # the L + 1 nearest of the pool by insertion into a sorted list (most distances fail the first comparison)
        m = min(L + 1, f)
        filled = 0
        for q in range(f):
            j = pool[q]
            v = dist[j]
            if filled == m:
                if not v < top[m - 1]:
                    continue
                p = m - 1
            else:
                p = filled
                filled += 1
            while p > 0 and top[p - 1] > v:
                top[p] = top[p - 1]
                ids[p] = ids[p - 1]
                p -= 1
            top[p] = v
            ids[p] = j
        for p in range(L):
            ndist[a, p] = np.sqrt(top[p])
            nbr[a, p] = ids[p]
        if m > L:
            reach[a] = np.sqrt(top[L])
            far[a] = ids[L]
        else:
            reach[a] = np.inf
            far[a] = -1


def centre_neighbours(c: np.ndarray, length: int):
    """Each centre's ``length`` nearest other centres, ascending (``nbr`` (K, L) int32, ``ndist`` (K, L) float64 their
    distances) and ``reach`` (K,) the distance of the next nearest (inf when the list holds every other centre).
    ``length`` is cut to K − 1."""
    k = c.shape[0]
    L = max(0, min(int(length), k - 1))
    nbr = np.empty((k, L), np.int32)
    ndist = np.empty((k, L), np.float64)
    reach = np.empty(k, np.float64)
    far = np.empty(k, np.int32)
    centre_neighbours_range(c, nbr, ndist, reach, far, np.full(k, np.inf), 0, k)
    return nbr, ndist, reach


@numba.njit(**_JIT)
def neighbour_e_step_range(x, rows, c, start, nbr, nbc, ndist, reach, shrink, labels, d1, d2, i0, i1, scale=None):
    """Listed rows i0:i1 (``rows[i]`` indexes ``x``; an empty ``rows`` means row i itself): ``labels[i]`` the nearest
    centre (ties to the smaller id), ``d1[i]``/``d2[i]`` the squared distances to it and to the runner-up (or a lower
    bound on the latter), starting from centre ``start[i]``; -1 in ``labels[i]`` where the list cannot prove the
    nearest (the caller assigns those rows otherwise). Returns how many centres the rows scanned beyond the prefix.

    The lists may be stale (built for earlier centres): ``shrink[a]`` bounds how much closer to centre a any other
    centre can have come since (a's move plus the largest other move), and is taken off every listed distance.

    ``nbc`` (K, D, P) float64: the current coordinates of each list's first P centres, coordinate-major
    (:func:`prefix_coords`): those P are taken without a stopping test, their distances vectorised over the centres.

    ``scale`` (float64, one per listed row): the rows are taken as x·scale[i] (spherical k-means: 1/‖x‖), in float64."""
    L = nbr.shape[1]
    dim = x.shape[1]
    P = nbc.shape[2]
    acc = np.empty(P)
    listed = rows.shape[0] > 0
    total = 0
    grow = (1.0 + SLACK) ** 2
    tie = 1.0 + TIE_PER_DIM * max(dim, 1)
    for i in range(i0, i1):
        r = rows[i] if listed else i
        a = start[i]
        f = 1.0 if scale is None else scale[i]
        bd = _sq_dist_scaled(x, r, f, c, a)  # squared distances from here on; the stopping test squares its side
        da = np.sqrt(bd) + shrink[a]
        best = a
        sd = np.inf
        # the first P neighbours without a stopping test, their distances vectorised over the centres: most rows stop
        # there, and a test per centre cost a mispredicted branch each (1M × 2 rows, K = 1,024: 45 ns a row, 25 with
        # a prefix of four taken one by one)
        acc[:] = 0.0
        for u in range(dim):
            xv = f * np.float64(x[r, u])
            for q in range(P):
                e = xv - nbc[a, u, q]
                acc[q] += e * e
        t = P
        for q in range(P):
            j = nbr[a, q]
            dj = acc[q]
            closer = dj < bd or (dj == bd and j < best)
            sd = bd if closer else min(sd, dj)
            best = j if closer else best
            bd = dj if closer else bd
        while t < L:
            g = ndist[a, t] - da  # every centre from here on is at least g away
            if g > 0.0 and g * g >= sd * grow:
                break
            j = nbr[a, t]
            dj = _sq_dist_scaled(x, r, f, c, j)
            closer = dj < bd or (dj == bd and j < best)
            sd = bd if closer else min(sd, dj)
            best = j if closer else best
            bd = dj if closer else bd
            t += 1
        total += t - P
        if t == L:  # ran off the list: every other centre is at least reach − d_a away
            g = reach[a] - da
            if not (g > 0.0 and g * g > bd * grow):
                labels[i] = -1
                continue
            sd = min(sd, g * g / grow)
        if sd <= bd * tie:
            # a near-tie: the fused pass sums a distance's terms in another order (kernels.distance's lanes), which
            # may rank these two the other way; the row is left to it, so that every path labels it alike
            labels[i] = -1
            continue
        labels[i] = best
        d1[i] = bd
        d2[i] = sd
    return total


@numba.njit(**_JIT)
def grid_cells(x, lo, inv, table, side, starts, out, i0, i1, scale=None):
    """out[i] = starts[cell of row i] for rows i0:i1: along coordinate t the row falls in the uniform bin
    ``floor((x_t − lo_t)·inv_t)`` (clamped to the table; NaN rows bin 0), and ``table[t, bin]`` is that bin's cell;
    cells are row-major over the coordinates, ``side`` per coordinate. (A start needs no exact cell: the scan from any
    centre is exact. A binary search over the cells' bounds took 74 ns a row.) ``scale``: as in
    :func:`neighbour_e_step_range`."""
    dim = x.shape[1]
    nbin = table.shape[1]
    for i in range(i0, i1):
        cell = 0
        f = 1.0 if scale is None else scale[i]
        for t in range(dim):
            v = (f * np.float64(x[i, t]) - lo[t]) * inv[t]
            b = 0
            if v >= nbin:
                b = nbin - 1
            elif v > 0.0:
                b = int(v)
            cell = cell * side + table[t, b]
        out[i] = starts[cell]


@numba.njit(**_JIT)
def grid_starts(points, side, c, nbr, nbc, ndist, reach, out):
    """out[i] = the nearest centre of grid point i (row-major cells, ``side`` per coordinate; ties to the smaller id),
    each found by a list scan from its neighbour cell's answer (the previous cell, or the one a row of cells back),
    and by every centre where the scan cannot prove it."""
    n = points.shape[0]
    k = c.shape[0]
    start = np.zeros(1, np.int64)
    lab = np.empty(1, np.int64)
    e1 = np.empty(1)
    e2 = np.empty(1)
    shrink = np.zeros(k)
    rows = np.empty(1, np.int64)
    for i in range(n):
        start[0] = out[i - 1] if i % side else (out[i - side] if i >= side else 0)
        rows[0] = i
        neighbour_e_step_range(points, rows, c, start, nbr, nbc, ndist, reach, shrink, lab, e1, e2, 0, 1)
        if lab[0] < 0:
            best = 0
            bd = np.inf
            for j in range(k):
                d = _sq_dist_scaled(points, i, 1.0, c, j)
                if d < bd:
                    bd = d
                    best = j
            lab[0] = best
        out[i] = lab[0]


def prefix_coords(c, nbr, length):
    """(K, D, P) float64: the coordinates of each list's first P = min(``length``, L) centres, coordinate-major, for
    :func:`neighbour_e_step_range`'s vectorised prefix (refreshed whenever the centres move)."""
    P = min(int(length), nbr.shape[1])
    return np.ascontiguousarray(np.asarray(c, np.float64)[nbr[:, :P]].transpose(0, 2, 1))


def neighbour_e_step_numpy(x, c):
    """Reference: the exact top-2 over all centres by float64 distances (labels, d1, d2)."""
    d = np.sqrt(((x[:, None, :].astype(np.float64) - c[None, :, :].astype(np.float64)) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")
    rows = np.arange(x.shape[0])
    d1 = d[rows, order[:, 0]] ** 2
    d2 = d[rows, order[:, 1]] ** 2 if c.shape[0] > 1 else np.full(x.shape[0], np.inf)
    return order[:, 0], d1, d2
