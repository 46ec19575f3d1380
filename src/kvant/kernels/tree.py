"""Numba kernels for the cover tree (kvant.tree). Kernels only: no validation, no policy, no I/O.

Every kernel measures with the module-global ``_dist(X, i, Y, j, params) -> float``: a switch on
``params[0]`` over the built-in metrics, inlined into the kernels (Numba IR inlining), so one cached
compilation serves every built-in metric. (Passing the metric as a dispatcher argument defeats Numba's
on-disk cache, and a non-inlined switch measured 3-6x slower per call.) For a user metric,
:func:`make_kernels` clones the kernels with ``_dist`` rebound to the user's function (compiled once
per process, not cached).

Tree layout (flat arrays indexed by node = point slot): ``parent`` (int64, -1 for the root and for
slots not in the tree), ``level`` (int32), ``maxdist`` (float64, an upper bound on the distance from
a node to any of its descendants), and for queries a CSR ``child_off``/``child_idx`` derived from
``parent``. A kernel reports a metric that returned NaN, inf or a negative number through ``bad``.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_NJ = dict(cache=True, nogil=True, fastmath=False)
# Hot loops that allocate nothing are compiled without the reference-counting runtime: Numba otherwise
# wraps every (inlined) call that takes arrays -- each distance, each heap push -- in atomic
# incref/decref pairs, measured at 10-20 ns per call, more than an 8-d distance costs.
_NJ_RAW = dict(_NJ, _nrt=False)

# metric codes in params[0]
EUCLIDEAN, MANHATTAN, CHEBYSHEV, ANGULAR, RESIDUAL = 0, 1, 2, 3, 4
RBF_KERNEL, MATERN52_KERNEL = 0, 1
# Matérn 5/2 is exactly 0 in float64 beyond this scaled distance (exp(-800) underflows; the polynomial stays finite)
MATERN_ZERO_BEYOND = 800.0


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"}, _nrt=False)
def _dot_range(X, i, Y, j, a, b):  # pragma: no cover - numba
    # reassoc lets LLVM vectorise the reduction; the result is a deterministic function of the
    # inputs (the same code path is used by the tree and by brute force), so exactness holds.
    # unsigned indices: no negative-index wraparound per element, so LLVM can vectorise the loop
    s = 0.0
    ui = np.uint64(i)
    uj = np.uint64(j)
    for t in range(np.uint64(a), np.uint64(b)):
        s += X[ui, t] * Y[uj, t]
    return s


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"}, _nrt=False)
def _dot32(W, i, j):  # pragma: no cover - numba
    # float32 products and sum in any order (reassoc: SIMD); callers bound the error by gamma_(r+2) |w_i| |w_j|
    s = np.float32(0.0)
    ui = np.uint64(i)
    uj = np.uint64(j)
    for t in range(W.shape[1]):
        s += W[ui, t] * W[uj, t]
    return s


@numba.njit(inline="always", **_NJ)
def euclidean_dist(X, i, Y, j, params):  # pragma: no cover - numba
    s = 0.0
    for t in range(X.shape[1]):
        d = X[i, t] - Y[j, t]
        s += d * d
    return math.sqrt(s)


@numba.njit(inline="always", **_NJ)
def manhattan_dist(X, i, Y, j, params):  # pragma: no cover - numba
    s = 0.0
    for t in range(X.shape[1]):
        s += abs(X[i, t] - Y[j, t])
    return s


@numba.njit(inline="always", **_NJ)
def chebyshev_dist(X, i, Y, j, params):  # pragma: no cover - numba
    s = 0.0
    for t in range(X.shape[1]):
        d = abs(X[i, t] - Y[j, t])
        if d > s:
            s = d
    return s


_ANGULAR_NEAR = 0.9999  # |cos| above it: angles under ~0.014 rad from 0 or π, where arccos is ill-conditioned


@numba.njit(inline="always", **_NJ)
def angular_dist(X, i, Y, j, params):  # pragma: no cover - numba
    """Angle between unit rows (the public layer normalises them): arccos of their dot product, and near 0 or π,
    where arccos loses half the digits (a row and its copy came out up to 2.6e-8 apart, and an angle of 3e-9 rounded
    to 0), 2·asin(‖x ∓ y‖ / 2) from the rows' difference or sum instead."""
    c = _dot_range(X, i, Y, j, 0, X.shape[1])
    if abs(c) > _ANGULAR_NEAR:
        sign = 1.0 if c > 0.0 else -1.0
        s = 0.0
        for t in range(X.shape[1]):
            d = X[i, t] - sign * Y[j, t]
            s += d * d
        h = 2.0 * math.asin(min(1.0, 0.5 * math.sqrt(s)))
        return h if c > 0.0 else math.pi - h
    return math.acos(c)


@numba.njit(inline="always", **_NJ)
def _cov_phi(r2, kern):  # pragma: no cover - numba
    """The unit-variance covariance function of squared scaled distance r2 (RBF or Matern 5/2)."""
    if kern == RBF_KERNEL:
        return math.exp(-0.5 * r2)
    r = math.sqrt(5.0 * r2)
    if r > MATERN_ZERO_BEYOND:  # exp(-r) is 0 there; r * r could overflow, and inf * 0 is NaN
        return 0.0
    return (1.0 + r + r * r / 3.0) * math.exp(-r)


@numba.njit(**_NJ_RAW)
def residual_dist(X, i, Y, j, params):  # pragma: no cover - numba
    """sqrt(1 - |rho|) on rows [x / lengthscale (d), v / sqrt(p) (m), 1 / sqrt(p), original row index];
    params = [code, d, m, variance, kernel]."""
    D = X.shape[1]
    d = int(params[1])
    m = int(params[2])
    if X[i, D - 1] == Y[j, D - 1]:
        return 0.0
    r2 = 0.0
    for t in range(d):
        z = X[i, t] - Y[j, t]
        r2 += z * z
    sisj = X[i, d + m] * Y[j, d + m]  # one product first: keeps d(i, j) == d(j, i) bit for bit
    rho = params[3] * _cov_phi(r2, int(params[4])) * sisj - _dot_range(X, i, Y, j, d, d + m)
    a = 1.0 - abs(rho)
    if a < 0.0:
        a = 0.0
    return math.sqrt(a)


@numba.njit(inline="always", **_NJ)
def _dist(X, i, Y, j, params):  # pragma: no cover - numba
    """The built-in metrics; ``params[0]`` selects one."""
    code = params[0]
    if code == EUCLIDEAN:
        return euclidean_dist(X, i, Y, j, params)
    if code == MANHATTAN:
        return manhattan_dist(X, i, Y, j, params)
    if code == CHEBYSHEV:
        return chebyshev_dist(X, i, Y, j, params)
    if code == ANGULAR:
        return angular_dist(X, i, Y, j, params)
    return residual_dist(X, i, Y, j, params)


@numba.njit(**_NJ)
def radius(base, lev):  # pragma: no cover - numba
    """base ** lev: the covering radius of level ``lev`` (always computed by this one function)."""
    return math.pow(base, lev)


@numba.njit(**_NJ)
def ceil_log(base, x):  # pragma: no cover - numba
    """Smallest integer e with radius(base, e) >= x, for x > 0."""
    e = int(math.ceil(math.log(x) / math.log(base)))
    while radius(base, e) < x:
        e += 1
    while radius(base, e - 1) >= x:
        e -= 1
    return e


@numba.njit(**_NJ)
def _okd(d):  # pragma: no cover - numba
    return d >= 0.0 and d < np.inf


# ----------------------------------------------------------------------------------------------
# construction
# ----------------------------------------------------------------------------------------------


@numba.njit(inline="always")
def _child_level(base, pdist, s0, s1, lvl_p):  # pragma: no cover
    """Level of the centres a group's net creates (one below the group's covering level) and its radius."""
    maxd = 0.0
    for t in range(s0, s1):
        if pdist[t] > maxd:
            maxd = pdist[t]
    lam = lvl_p if maxd == 0.0 else min(lvl_p, ceil_log(base, maxd))
    cl = lam - 1
    return cl, radius(base, cl), maxd == 0.0


@numba.njit(**_NJ_RAW)
def _all_duplicates(perm, s0, s1, asg, cent):  # pragma: no cover
    """Every member of the group coincides with the group's node: all become leaf children of it, at one
    level. (Netting them would peel off one point per level: a chain of height n on repeated points.)
    No member is assigned, so ``adist`` is not needed: relayout reads it only for assigned members."""
    for t in range(s0, s1):
        cent[t] = perm[t]
        asg[t] = -1 - (t - s0)
    return s1 - s0


@numba.njit(**_NJ_RAW)
def _net_seq(data, params, base, perm, pdist, s0, s1, lvl_p, asg, adist, cent):  # pragma: no cover
    """Greedy base**(lam-1)-net of group perm[s0:s1] (single thread). Returns (m, child_level, bad).

    cent[s0:s0+m] receives the centre slots in creation order; asg[t] the local centre index of
    member t (-1 - j if member t *is* centre j); adist[t] its distance to that centre.
    """
    cl, r, dup = _child_level(base, pdist, s0, s1, lvl_p)
    if dup:
        return _all_duplicates(perm, s0, s1, asg, cent), cl, False
    m = 0
    for t in range(s0, s1):
        s = perm[t]
        best = np.inf
        bj = -1
        for j in range(m):
            dd = _dist(data, cent[s0 + j], data, s, params)
            if not _okd(dd):
                return m, cl, True
            if dd < best:
                best = dd
                bj = j
        if bj >= 0 and best <= r:
            asg[t] = bj
            adist[t] = best
            pdist[t] = m  # reuse: number of centres that existed when t was seen
        else:
            cent[s0 + m] = s
            asg[t] = -1 - m
            adist[t] = 0.0
            m += 1
    # back-fill: centres created after a member was seen may be nearer
    for t in range(s0, s1):
        if asg[t] >= 0:
            seen = int(pdist[t])
            s = perm[t]
            for j in range(seen, m):
                dd = _dist(data, cent[s0 + j], data, s, params)
                if not _okd(dd):
                    return m, cl, True
                if dd < adist[t]:
                    adist[t] = dd
                    asg[t] = j
    return m, cl, False


@numba.njit(parallel=True, **_NJ)
def nets_small(data, params, base, perm, pdist, gnode, gstart, gend, level, asg, adist, cent, gm, gcl,
               gbad):  # pragma: no cover
    """One level of the top-down build for many small groups, in parallel over groups."""
    for g in numba.prange(gnode.shape[0]):
        m, cl, bad = _net_seq(data, params, base, perm, pdist, gstart[g], gend[g], level[gnode[g]], asg, adist,
                              cent)
        gm[g] = m
        gcl[g] = cl
        gbad[g] = bad


_CENTRE_BLOCK = 256  # members whose checks against the existing centres run in parallel (net_centres_big)


_COVER_TILE = 16  # members that share each centre's features while they are in cache (_first_cover_tile)
_COVER_TILE_WIDE = 64  # the same with the residual metric's screen (net_centres_big)


@numba.njit(inline="always", **_NJ)
def _residual_beyond(data, i, j, params, w32, nw, gam, xlim):  # pragma: no cover - numba
    """True when the residual distance of rows i and j provably exceeds sqrt(xlim): its x = 1 - |rho| is bounded
    below from float32 products (``w32``, rows' |w| in ``nw``, ``gam`` as in :func:`_screen_row`), the covariance
    term as :func:`residual_dist` computes it but with :func:`exp_nonpos`. False means "compute it exactly"."""
    D = data.shape[1]
    if data[i, D - 1] == data[j, D - 1]:
        return False
    d = int(params[1])
    m = int(params[2])
    r2 = 0.0
    for t in range(d):
        z = data[i, t] - data[j, t]
        r2 += z * z
    kt = params[3] * _cov_phi_screen(r2, int(params[4])) * (data[i, d + m] * data[j, d + m])
    x, e = _screen_x(kt, np.float64(_dot32(w32, i, j)), gam * (nw[i] * nw[j]))
    return x - e > xlim


@numba.njit(**_NJ_RAW)
def _first_cover_tile(data, params, cent, j0, j1, perm, b0, i0, i1, r, cov, cd, bad, w32, nw,
                      gam):  # pragma: no cover
    """For members perm[b0 + i], i in [i0, i1): cov[i] = the first of the centres cent[j0:j1] (checked in order)
    within r, cd[i] its distance, or -1 / inf; a metric failure sets bad[i] and leaves the member uncovered.
    The centres are the outer loop, so each centre's features are read once per tile instead of once per
    member (wide features, e.g. the residual metric's rank-r rows, are otherwise read from the last-level
    cache every time); each member still stops at its first covering centre.

    ``gam`` >= 0 (the residual metric): a pair whose float32 bound (:func:`_residual_beyond`) proves it farther
    than r is skipped without the exact distance, which is computed only for the few others; the same centres
    and parents come out. ``gam`` < 0: every pair is measured exactly."""
    left = i1 - i0
    screen = gam >= 0.0
    xlim = screen_threshold(r * r)  # x above it: sqrt(x) > r after rounding
    for i in range(i0, i1):
        cov[i] = -1
        cd[i] = np.inf
    for j in range(j0, j1):
        if left == 0:
            break
        c = cent[j]
        for i in range(i0, i1):
            if cov[i] >= 0 or bad[i]:
                continue
            if screen and _residual_beyond(data, c, perm[b0 + i], params, w32, nw, gam, xlim):
                continue
            dd = _dist(data, c, data, perm[b0 + i], params)
            if not _okd(dd):
                bad[i] = True
                left -= 1
            elif dd <= r:
                cov[i] = j
                cd[i] = dd
                left -= 1


@numba.njit(**_NJ)
def _block_pairs_row(data, params, perm, b0, unc, nu, r, w32, nw, gam, xlim, h, state, pair_d):  # pragma: no cover
    """Rows h and nu-1-h of state[a, b] for the members unc[a] > unc[b] of the block at b0 (a, b < nu): 1 if
    d(earlier, later) <= r (the distance in pair_d[a, b]), 2 if the metric failed on it, else 0; the residual
    metric's screen as in :func:`_first_cover_tile`. Taking the two rows together gives every h ~nu pairs, so the
    caller's parallel loop over h hands threads equal work. (Serial: net_centres_big runs the loop itself, since a
    cached function calling a parallel one can crash when loaded from Numba's cache -- numba#8578.)"""
    screen = gam >= 0.0
    for side in range(2):
        hh = np.int64(h)  # the parfor index may be unsigned: nu - 1 - h would then be a float
        later = hh if side == 0 else nu - 1 - hh
        if side == 1 and later == hh:  # the middle row of an odd count
            continue
        p_later = perm[b0 + unc[later]]
        for earlier in range(later):
            p_earlier = perm[b0 + unc[earlier]]
            state[later, earlier] = 0
            if screen and _residual_beyond(data, p_earlier, p_later, params, w32, nw, gam, xlim):
                continue
            dd = _dist(data, p_earlier, data, p_later, params)
            if not _okd(dd):
                state[later, earlier] = 2
            elif dd <= r:
                state[later, earlier] = 1
                pair_d[later, earlier] = dd


@numba.njit(parallel=True, **_NJ)
def net_centres_big(data, params, base, perm, pdist, s0, s1, lvl_p, asg, adist, cent, w32, nw,
                    gam):  # pragma: no cover
    """Centre selection for one big group: greedy first-fit in member order. Returns (m, cl, bad).

    A member becomes a centre unless an earlier centre is within the child radius; otherwise ``asg`` gets
    the first such centre (local index) and ``adist`` its distance, a valid parent (``net_assign_big`` then
    moves members to their nearest centre, except for the residual metric: docs/covertree.md). Members are
    taken in blocks: their checks against the centres that existed before the block are independent and run
    in parallel; each block then checks its still-uncovered members, in order, against the centres it
    created itself. The first covering centre does not depend on how the checks are split, so centres and
    parents are exactly those of the sequential loop.

    ``w32, nw, gam``: the residual metric's screen (:func:`_first_cover_tile`); ``gam`` < 0 turns it off. With it
    on, the parallel checks take tiles of 64 members (each centre's 2 KB of float32 products read once per 64, not
    per 16) and the in-block pass reads the pairs of the uncovered members, measured first in parallel
    (:func:`_block_pairs_row`): at 32k points and rank 512 the build took 1.4-1.8 s against 1.9-2.5 s. For the
    other metrics both lost (1M clustered 8-d points: 3.4-3.8 s against 2.7-3.4 s, same process), so they keep
    tiles of 16 and the member-by-member pass."""
    cl, r, dup = _child_level(base, pdist, s0, s1, lvl_p)
    if dup:
        return _all_duplicates(perm, s0, s1, asg, cent), cl, False
    B = _CENTRE_BLOCK
    wide = gam >= 0.0
    T = _COVER_TILE_WIDE if wide else _COVER_TILE
    cov = np.empty(B, np.int64)
    cd = np.empty(B)
    bad = np.zeros(B, np.bool_)
    unc = np.empty(B, np.int64)  # the block's members no earlier centre covers
    made = np.empty(B, np.int64)  # per such member: its centre's position in cent, or -1 (covered)
    nbb = B if wide else 1
    state = np.zeros((nbb, nbb), np.int8)  # their pairs [later, earlier]: 0 beyond r, 1 within (pair_d), 2 failed
    pair_d = np.empty((nbb, nbb))
    m = 0
    for b0 in range(s0, s1, B):
        nb = min(B, s1 - b0)
        for ti in numba.prange((nb + T - 1) // T):
            _first_cover_tile(data, params, cent, s0, s0 + m, perm, b0, ti * T, min(nb, (ti + 1) * T), r, cov, cd,
                              bad, w32, nw, gam)
        for i in range(nb):
            if bad[i]:
                return m, cl, True
        nu = 0
        if wide:
            for i in range(nb):
                if cov[i] < 0:
                    unc[nu] = i
                    nu += 1
            xlim = screen_threshold(r * r)
            for h in numba.prange((nu + 1) // 2):
                _block_pairs_row(data, params, perm, b0, unc, nu, r, w32, nw, gam, xlim, h, state, pair_d)
        m0 = m
        u = 0
        for i in range(nb):
            t = b0 + i
            if cov[i] < 0:  # not covered by the centres before the block: check this block's, in creation order
                if wide:
                    for b in range(u):
                        if made[b] >= 0:
                            if state[u, b] == 2:  # a failure the sequential loop would have met here
                                return m, cl, True
                            if state[u, b] == 1:
                                cov[i] = made[b]
                                cd[i] = pair_d[u, b]
                                break
                    made[u] = -1 if cov[i] >= 0 else s0 + m
                    u += 1
                else:
                    _first_cover_tile(data, params, cent, s0 + m0, s0 + m, perm, b0, i, i + 1, r, cov, cd, bad, w32,
                                      nw, gam)
                    if bad[i]:
                        return m, cl, True
            j, dd = cov[i], cd[i]
            if j >= 0:
                asg[t] = j - s0
                adist[t] = dd
            else:
                cent[s0 + m] = perm[t]
                asg[t] = -1 - m
                adist[t] = 0.0
                m += 1
    return m, cl, False


@numba.njit(parallel=True, **_NJ)
def net_assign_big(data, params, perm, s0, s1, m, asg, adist, cent, bad):  # pragma: no cover
    """Assign every non-centre member of a big group to its nearest centre, in parallel."""
    for t in numba.prange(s0, s1):
        _assign_one(data, params, perm, s0, t, m, asg, adist, cent, bad)


@numba.njit(**_NJ_RAW)
def _assign_one(data, params, perm, s0, t, m, asg, adist, cent, bad):  # pragma: no cover
    if asg[t] < 0:
        adist[t] = 0.0
        return
    s = perm[t]
    best = np.inf
    bj = 0
    for j in range(m):
        dd = _dist(data, cent[s0 + j], data, s, params)
        if not _okd(dd):
            bad[t - s0] = True
            dd = np.inf
        if dd < best:
            best = dd
            bj = j
    asg[t] = bj
    adist[t] = best


@numba.njit(**_NJ)
def relayout(perm, pdist, asg, adist, gnode, gstart, gend, gm, gcl, cent, parent, level, maxdist,
             pd):  # pragma: no cover
    """Create the centre nodes of this level and lay out the next level's groups.

    Returns (perm2, pdist2, gnode2, gstart2, gend2).
    """
    G = gnode.shape[0]
    n_rest = 0
    n_groups = 0
    counts_all = np.zeros(perm.shape[0], np.int64)  # per centre (indexed s0 + j)
    for g in range(G):
        s0 = gstart[g]
        p = gnode[g]
        for j in range(gm[g]):
            c = cent[s0 + j]
            parent[c] = p
            level[c] = gcl[g]
            maxdist[c] = 0.0
        for t in range(s0, gend[g]):
            if asg[t] >= 0:
                counts_all[s0 + asg[t]] += 1
                n_rest += 1
            else:
                pd[cent[s0 - 1 - asg[t]]] = pdist[t]
        for j in range(gm[g]):
            if counts_all[s0 + j] > 0:
                n_groups += 1
    perm2 = np.empty(n_rest, np.int64)
    pdist2 = np.empty(n_rest, np.float64)
    gnode2 = np.empty(n_groups, np.int64)
    gstart2 = np.empty(n_groups, np.int64)
    gend2 = np.empty(n_groups, np.int64)
    offs = np.empty(perm.shape[0], np.int64)
    pos = 0
    k = 0
    for g in range(G):
        s0 = gstart[g]
        for j in range(gm[g]):
            cnt = counts_all[s0 + j]
            offs[s0 + j] = pos
            if cnt > 0:
                gnode2[k] = cent[s0 + j]
                gstart2[k] = pos
                gend2[k] = pos + cnt
                k += 1
            pos += cnt
    for g in range(G):
        s0 = gstart[g]
        for t in range(s0, gend[g]):
            a = asg[t]
            if a >= 0:
                c = cent[s0 + a]
                q = offs[s0 + a]
                offs[s0 + a] = q + 1
                perm2[q] = perm[t]
                pdist2[q] = adist[t]
                if adist[t] > maxdist[c]:
                    maxdist[c] = adist[t]
    return perm2, pdist2, gnode2, gstart2, gend2


# ----------------------------------------------------------------------------------------------
# traversal for batch insert: where does each new point land?
# ----------------------------------------------------------------------------------------------


@numba.njit(parallel=True, **_NJ)
def land(data, params, base, root, level, child_off, child_idx, newslots, out_land, out_dp, path_node, path_d,
         path_len, bad):  # pragma: no cover
    """Descend from the root: at node p (which covers the point), move to the nearest child c with
    d(c, x) <= base**level(c); land at p when no child covers x. The root covers everything (the caller
    raises its level first). Stops at the first node the point coincides with (distance 0): copies hang off
    that node (the caller places them), not below one another. Records the path (nodes and distances) for the
    maxdist update."""
    for i in numba.prange(newslots.shape[0]):
        _land_one(data, params, base, root, level, child_off, child_idx, newslots, i, out_land, out_dp, path_node,
                  path_d, path_len, bad)


@numba.njit(**_NJ_RAW)
def _land_one(data, params, base, root, level, child_off, child_idx, newslots, i, out_land, out_dp, path_node,
              path_d, path_len, bad):  # pragma: no cover
    s = newslots[i]
    p = root
    dp = _dist(data, p, data, s, params)
    if not _okd(dp):
        bad[i] = True
        path_len[i] = 0
        out_land[i] = p
        out_dp[i] = 0.0
        return
    L = 0
    while True:
        path_node[i, L] = p
        path_d[i, L] = dp
        L += 1
        if dp == 0.0:
            break
        best = np.inf
        bc = -1
        for e in range(child_off[p], child_off[p + 1]):
            c = child_idx[e]
            dd = _dist(data, c, data, s, params)
            if not _okd(dd):
                bad[i] = True
                dd = np.inf
            if dd <= radius(base, level[c]) and dd < best:
                best = dd
                bc = c
        if bc < 0 or bad[i]:
            break
        p = bc
        dp = best
    path_len[i] = L
    out_land[i] = p
    out_dp[i] = dp


@numba.njit(**_NJ)
def apply_paths(maxdist, path_node, path_d, path_len):  # pragma: no cover
    for i in range(path_len.shape[0]):
        for t in range(path_len[i]):
            p = path_node[i, t]
            if path_d[i, t] > maxdist[p]:
                maxdist[p] = path_d[i, t]


@numba.njit(parallel=True, **_NJ)
def dist_to_one(data, params, a, slots, out):  # pragma: no cover
    for i in numba.prange(slots.shape[0]):
        out[i] = _dist(data, a, data, slots[i], params)


# ----------------------------------------------------------------------------------------------
# structure helpers
# ----------------------------------------------------------------------------------------------


@numba.njit(**_NJ)
def build_csr(parent, level, in_tree):  # pragma: no cover
    """CSR children lists from parent pointers (each node's children by ascending subtree minimum slot), plus each
    node's subtree minimum slot and depth."""
    n = parent.shape[0]
    off = np.zeros(n + 1, np.int64)
    for c in range(n):
        if in_tree[c] and parent[c] >= 0:
            off[parent[c] + 1] += 1
    for p in range(n):
        off[p + 1] += off[p]
    fill = off[:-1].copy()
    idx = np.empty(off[n], np.int64)
    for c in range(n):
        if in_tree[c] and parent[c] >= 0:
            idx[fill[parent[c]]] = c
            fill[parent[c]] += 1
    # subtree minimum slot: visit nodes by increasing level (children before parents)
    minid = np.arange(n).astype(np.int64)
    order = np.argsort(level, kind="mergesort")
    for t in range(n):
        c = order[t]
        if in_tree[c] and parent[c] >= 0:
            p = parent[c]
            if minid[c] < minid[p]:
                minid[p] = minid[c]
    # each node's children by ascending subtree minimum: a query can then stop at the first child whose subtree holds
    # only ids it cannot take (predecessor sets: ids >= its own; a k-th distance of 0: ids above the k-th's)
    for p in range(n):
        s, e = off[p], off[p + 1]
        if e - s > 1:
            for j in range(s + 1, e):
                if minid[idx[j]] < minid[idx[j - 1]]:
                    seg = idx[s:e].copy()
                    idx[s:e] = seg[np.argsort(minid[seg], kind="mergesort")]
                    break
    # depth (for path buffers): visit by decreasing level (parents before children)
    depth = np.zeros(n, np.int64)
    height = 0
    for t in range(n - 1, -1, -1):
        c = order[t]
        if in_tree[c] and parent[c] >= 0:
            depth[c] = depth[parent[c]] + 1
            if depth[c] > height:
                height = depth[c]
    return off, idx, minid, height


# ----------------------------------------------------------------------------------------------
# k-NN queries
# ----------------------------------------------------------------------------------------------


@numba.njit(inline="always", **_NJ)
def _less(d1, i1, d2, i2):  # pragma: no cover
    return d1 < d2 or (d1 == d2 and i1 < i2)


@numba.njit(inline="always", **_NJ)
def _heap_push_res(hd, hi, size, k, d, i):  # pragma: no cover
    """Max-heap of the k best (d, id), ordered lexicographically. Returns the new size."""
    if size < k:
        pos = size
        size += 1
    else:
        if not _less(d, i, hd[0], hi[0]):
            return size
        pos = 0
        # sift down from the root replacing the max
        while True:
            l_ = 2 * pos + 1
            if l_ >= size:
                break
            r_ = l_ + 1
            big = l_
            if r_ < size and _less(hd[l_], hi[l_], hd[r_], hi[r_]):
                big = r_
            if _less(d, i, hd[big], hi[big]):
                hd[pos] = hd[big]
                hi[pos] = hi[big]
                pos = big
            else:
                break
        hd[pos] = d
        hi[pos] = i
        return size
    # sift up
    while pos > 0:
        par = (pos - 1) // 2
        if _less(hd[par], hi[par], d, i):
            hd[pos] = hd[par]
            hi[pos] = hi[par]
            pos = par
        else:
            break
    hd[pos] = d
    hi[pos] = i
    return size


@numba.njit(inline="always", **_NJ)
def _push_measured(hd, hi, size, k, d, i):  # pragma: no cover
    """:func:`_heap_push_res` of a measured distance: a NaN, inf or negative one (a bad metric) enters as inf.
    Returns (new size, whether d was bad)."""
    if _okd(d):
        return _heap_push_res(hd, hi, size, k, d, i), False
    return _heap_push_res(hd, hi, size, k, np.inf, i), True


@numba.njit(inline="always", **_NJ)
def _finish(hd, hi, size, k, out_d, out_i, row):  # pragma: no cover
    # sort the heap content ascending by (d, id) (insertion sort: k is small)
    for a in range(1, size):
        d = hd[a]
        i = hi[a]
        b = a - 1
        while b >= 0 and _less(d, i, hd[b], hi[b]):
            hd[b + 1] = hd[b]
            hi[b + 1] = hi[b]
            b -= 1
        hd[b + 1] = d
        hi[b + 1] = i
    for a in range(k):
        if a < size:
            out_d[row, a] = hd[a]
            out_i[row, a] = hi[a]
        else:
            out_d[row, a] = np.inf
            out_i[row, a] = -1


# Unit roundoff of a float32 coordinate taken from float64 arithmetic (2^-24 for the rounding to float32, plus
# room for the float64 subtraction and scaling before it).
_U32 = 2.0**-24 * (1.0 + 2.0**-20)
# The screen's fixed point: a bucket's coordinates relative to its centre, times its scale, lie in (-1, 1); the
# int16 copy stores them times SCREEN_UNITS, rounded to the nearest integer (so |value| <= 32767). Each stored
# value is within SCREEN_ROUNDING of the exact scaled coordinate: 1/2 for the rounding to an integer, plus the
# float64 rounding of the difference and product before it (< 32767 * 2^-52 each) and of the + 1/2.
SCREEN_UNITS = 32767.0
SCREEN_ROUNDING = 0.5 + 1e-9
# A float64 Euclidean distance can fall short of the true one by an absolute amount: each square that lands
# below float64's normal range loses up to 2^-1075, so sqrt(sum) loses up to sqrt(D) 2^-537.5 (~2e-162 sqrt(D)).
# Bounds that mix computed and true distances (the screen, the triangle inequality) add this pad;
# it covers D < 10^20 and is invisible at any ordinary scale.
UNDERFLOW_PAD = 1e-150


@numba.njit(inline="always", **_NJ)
def _scan_block(Q, qi, blk, a, m, code, frame, b, qb, acc):  # pragma: no cover - numba
    """Screening values from query row ``qi`` to the ``m`` points of bucket ``b`` at DFS positions a..a+m-1:
    squared Euclidean (code 0), Manhattan (1) or Chebyshev (2) distance, in float32, between the query and the
    points' int16 fixed-point copies, both taken relative to the bucket's centre ``frame[b, :D]`` and multiplied by
    its scale ``frame[b, D + 1]`` (a power of two times :data:`SCREEN_UNITS`, exact in float64).

    ``blk`` is the bucket-blocked int16 layout of :func:`bucket_blocks`: the bucket's coordinates are one
    contiguous run, dimension-major (``blk[a * D + t * m + j]``), so a scan streams one block of memory (2 bytes
    per coordinate: the scan of a large tree is bound by memory traffic) and runs over points innermost (one SIMD
    lane per point; each integer converts to float32 exactly). These values only screen: :func:`_scan_limit`
    turns the k-th distance into a threshold that every point at or below it provably passes, and the caller
    measures survivors exactly in float64.
    """
    # unsigned indices: Numba then emits no negative-index wraparound, and LLVM issues contiguous SIMD loads
    D = Q.shape[1]
    um = np.uint64(m)
    base = np.uint64(a) * np.uint64(D)
    sc = frame[b, D + 1]
    for t in range(D):
        qb[t] = np.float32((Q[qi, t] - frame[b, t]) * sc)
    for j in range(um):
        acc[j] = np.float32(0.0)
    for t in range(D):
        qt = qb[t]
        off = base + np.uint64(t) * um
        if code == EUCLIDEAN:
            for j in range(um):
                z = qt - np.float32(blk[off + j])
                acc[j] += z * z
        elif code == MANHATTAN:
            for j in range(um):
                acc[j] += abs(qt - np.float32(blk[off + j]))
        else:
            for j in range(um):
                z = abs(qt - np.float32(blk[off + j]))
                if z > acc[j]:
                    acc[j] = z


@numba.njit(inline="always", **_NJ)
def _scan_limit(kth, radius, code, D):  # pragma: no cover - numba
    """A threshold T on :func:`_scan_block`'s value v with  dist(q, x) <= kth  =>  v <= T  for every point x
    of a bucket whose points lie within ``radius`` of its centre c (``kth`` and ``radius`` in the bucket's scaled
    units, i.e. times ``frame[b, D + 1]``).

    The point's stored coordinates are each within e = SCREEN_ROUNDING of the exact scaled ones, which moves its
    distance by at most e * nu (nu = sqrt(D), D or 1 for the three norms); rounding the scaled q - c to float32
    moves each query coordinate by at most u = _U32 of itself, so by at most u |q - c| <= u (kth + radius) in
    norm. Hence the float32 inputs are within kth (1 + u) + u radius + e nu of each other. The float32 differences
    and the sum of D squares (or absolute values) add a relative error of at most gamma_(D+3) =
    (D+3) u / (1 - (D+3) u); the absolute term covers gradual underflow of the squares. The final factor absorbs
    this float64 arithmetic.
    """
    g = (D + 3) * _U32
    if kth == np.inf or g >= 0.5:  # (the second: D in the tens of millions, where the bound says nothing)
        return np.inf
    nu = math.sqrt(D) if code == EUCLIDEAN else (float(D) if code == MANHATTAN else 1.0)
    s = kth * (1.0 + _U32) + _U32 * radius + SCREEN_ROUNDING * nu
    g = g / (1.0 - g)
    if code == EUCLIDEAN:
        s = s * s
    return (s * (1.0 + g) + (D + 1) * 2.0**-148) * (1.0 + 1e-12)


@numba.njit(inline="always", **_NJ)
def _fold(s, z, code):  # pragma: no cover - numba
    """The reduced distance s with one more per-dimension term z = |difference| folded in: a sum of squares
    (Euclidean, code 0), a sum (Manhattan, 1) or a maximum (Chebyshev, 2)."""
    if code == EUCLIDEAN:
        return s + z * z
    if code == MANHATTAN:
        return s + z
    return z if z > s else s


@numba.njit(inline="always", **_NJ)
def _box_bound(Q, qi, box, b, code):  # pragma: no cover - numba
    """Distance from query row qi to the axis-aligned box ``box[b]`` = [lo (D), hi (D)] (a lower bound on
    its distance to any point inside) for Euclidean (0), Manhattan (1) and Chebyshev (2)."""
    D = Q.shape[1]
    s = 0.0
    for t in range(D):
        q = Q[qi, t]
        # branch-free: which side of the box a query lies on is unpredictable (a branch here cost ~15% of the
        # time spent expanding nodes at 1M uniform 8-d points)
        s = _fold(s, max(box[b, t] - q, q - box[b, D + t], 0.0), code)
    return math.sqrt(s) if code == EUCLIDEAN else s


@numba.njit(inline="always", **_NJ)
def _box_lower(Q, qi, box, b, code):  # pragma: no cover - numba
    """:func:`_box_bound` less a relative 1e-10 for the rounding of it and of the distances it is compared with, and
    an absolute 1e-150 for underflow: the lower bound a query prunes a box with (cover-tree buckets, kd-tree nodes)."""
    lb = _box_bound(Q, qi, box, b, code)
    return lb - (1e-10 * lb + 1e-150)


@numba.njit(**_NJ)
def bucket_boxes(rows, starts, sizes):  # pragma: no cover - numba
    """Bounding boxes [lo (D), hi (D)] of DFS ranges starts[b] + 1 .. starts[b] + sizes[b] - 1 of ``rows``
    (the points in DFS order, (n, D))."""
    D = rows.shape[1]
    out = np.empty((max(starts.shape[0], 1), 2 * D))
    for b in range(starts.shape[0]):
        for t in range(D):
            lo = np.inf
            hi = -np.inf
            for j in range(starts[b] + 1, starts[b] + sizes[b]):
                v = rows[j, t]
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
            out[b, t] = lo
            out[b, D + t] = hi
    return out


@numba.njit(**_NJ)
def bucket_frames(rows, starts, sizes, box, code):  # pragma: no cover - numba
    """Per bucket b: its centre (the middle of ``box[b]``, D values), the largest distance R in metric ``code``
    from it to a point of the bucket (DFS positions starts[b] + 1 .. starts[b] + sizes[b] - 1 of ``rows``),
    rounded up by a relative 1e-12 for the rounding of this computation, and the screen's scale: s *
    :data:`SCREEN_UNITS`, with s the power of two that brings max(R, A) into [1/2, 1) (at most 2^1008), where A is the
    largest computed |coordinate - centre| (A <= R but for underflow in R's squares); s = 1 when both are 0. So every
    computed difference times s lies in (-1, 1) and its int16 copy in [-32767, 32767]. A bucket whose extent
    overflows float64 gets R = inf: the screen then passes every point to the exact measurement.
    (n_buckets, D + 2)."""
    D = rows.shape[1]
    out = np.zeros((max(starts.shape[0], 1), D + 2))
    for b in range(starts.shape[0]):
        for t in range(D):
            out[b, t] = 0.5 * (box[b, t] + box[b, D + t])
        r = 0.0
        amax = 0.0
        for j in range(starts[b] + 1, starts[b] + sizes[b]):
            s = 0.0
            for t in range(D):
                z = abs(rows[j, t] - out[b, t])
                amax = max(amax, z)
                s = _fold(s, z, code)
            if code == EUCLIDEAN:
                s = math.sqrt(s)
            if s > r:
                r = s
        out[b, D] = r * (1.0 + 1e-12)
        top = max(out[b, D], amax)
        if not top < np.inf:  # (also NaN: a centre that overflowed)
            out[b, D] = np.inf
            top = 0.0
        # (the exponent is capped so that s * SCREEN_UNITS stays finite: a bucket narrower than ~2^-1008 keeps the
        # scale 2^1008, a coarser grid on which the bound still holds, where an inf scale left NaN in its blocks)
        s = math.ldexp(1.0, min(-math.frexp(top)[1], 1008)) if top > 0.0 else 1.0
        out[b, D + 1] = s * SCREEN_UNITS  # exact: a power of two times a 15-bit integer
    return out


@numba.njit(**_NJ)
def bucket_blocks(rows, starts, sizes, frame):  # pragma: no cover - numba
    """The bucket-blocked int16 copy read by :func:`_scan_block`, flat (n * D): the points of each bucket
    (DFS positions starts[b] + 1 .. starts[b] + sizes[b] - 1 of ``rows``, the points in DFS order) minus the
    bucket's centre ``frame[b, :D]``, times its scale ``frame[b, D + 1]``, rounded to the nearest integer
    (|value| <= 32767: :func:`bucket_frames`), dimension-major in their own slice; zero elsewhere."""
    n, D = rows.shape
    out = np.zeros(n * D, np.int16)
    for b in range(starts.shape[0]):
        a = starts[b] + 1
        m = sizes[b] - 1
        for t in range(D):
            for j in range(m):
                v = (rows[a + j, t] - frame[b, t]) * frame[b, D + 1]
                # |v| <= 32767 by the choice of scale; a bucket that overflowed (R = inf) keeps zeros
                out[a * D + t * m + j] = np.int16(math.floor(v + 0.5)) if frame[b, D] < np.inf else 0
    return out


# make_kernels' clones for user metrics set this False: they have no bucket screen or boxes (scan = -1, no box
# rows), and Numba prunes the branches before inlining, which halves the query kernel's compile, paid on every
# first use because user metrics cannot be cached (10.3 s -> 5.9 s; a callable's first knn ~12 -> ~8 s here)
_SCREENS = True
QUERY_CHUNKS = 64  # knn splits the queries into this many contiguous chunks, shared out statically to the threads


@numba.njit(parallel=True, **_NJ)
def knn(data, cdata, params, Q, qslot, mode, root, child_off, erec, minid, k, slack_rel, slack_abs, ddata, dfs_node,
        leaf, blk, scan, box, frame, out_d, out_i, bad):  # pragma: no cover
    """Exact k-NN by best-first search with the bound d(q, x) >= d(q, p) - maxdist(p).

    Queries are rows of Q. mode 0: plain queries; mode 1: exclude slot qslot[i] itself; mode 2: only
    slots < qslot[i] (Vecchia predecessors). A subtree is skipped when its lower bound, less a safety
    slack for rounding, exceeds the current k-th distance, so ties are resolved exactly as brute force
    does (by smaller id).

    Subtrees of at most ``leaf`` points (buckets) are scanned from ``ddata``, the points' rows in DFS order.
    When ``scan`` is a metric code (0-2), a SIMD screen over ``blk`` (each bucket's points centred on
    ``frame[b, :D]``, scaled to int16 and transposed: :func:`bucket_blocks`, :func:`bucket_frames`) comes first,
    and only points that pass its provable threshold are measured exactly; ``scan = -1`` measures every point.

    Child edge e (CSR order) is described by one row of ``erec``: [d(parent, child), maxdist(child),
    subtree size, DFS start, child slot, subtree minimum slot, bucket box row or -1] (integers stored
    exactly as float64), so a node's children are read from one contiguous block; ``cdata[e]`` is the
    child's feature row. With a scan metric, ``box[b]`` is the bounding box [lo (D), hi (D)] of bucket b's
    points (its root excluded): a second lower bound, next to the ball bound d(q, c) - maxdist(c).

    Queries run in parallel over chunks; each chunk allocates its workspace once (the node queue holds
    every child edge at most once, so it never grows).
    """
    nq = Q.shape[0]
    nch = min(nq, QUERY_CHUNKS)
    for c in numba.prange(nch):
        _knn_chunk(data, cdata, params, Q, qslot, mode, root, child_off, erec, minid, k, slack_rel, slack_abs, ddata,
                   dfs_node, leaf, blk, scan, box, frame, out_d, out_i, bad, c * nq // nch, (c + 1) * nq // nch)


@numba.njit(**_NJ)
def knn_serial(data, cdata, params, Q, qslot, mode, root, child_off, erec, minid, k, slack_rel, slack_abs, ddata,
               dfs_node, leaf, blk, scan, box, frame, out_d, out_i, bad):  # pragma: no cover
    """:func:`knn` on the calling thread: a query or two, where starting a parallel region costs more than the
    search (a single 8-NN query on 32k points: ~40 µs in all)."""
    _knn_chunk(data, cdata, params, Q, qslot, mode, root, child_off, erec, minid, k, slack_rel, slack_abs, ddata,
               dfs_node, leaf, blk, scan, box, frame, out_d, out_i, bad, 0, Q.shape[0])


@numba.njit(**_NJ)
def _knn_chunk(data, cdata, params, Q, qslot, mode, root, child_off, erec, minid, k, slack_rel, slack_abs, ddata,
               dfs_node, leaf, blk, scan, box, frame, out_d, out_i, bad, q0, q1):  # pragma: no cover
    """Queries q0 .. q1 - 1 of :func:`knn`, with one workspace (the node queue holds every child edge at most once,
    so it never grows)."""
    cap = erec.shape[0] + 1
    acc = np.empty(max(leaf, 1), np.float32)
    qb = np.empty(Q.shape[1], np.float32)
    hd = np.empty(k, np.float64)
    hi = np.empty(k, np.int64)
    pq_lb = np.empty(cap, np.float64)
    pq_e = np.empty(cap, np.int64)
    pq_d = np.empty(cap, np.float64)
    for qi in range(q0, q1):
        bad[qi] = _knn_one(data, cdata, params, Q, qi, qslot, mode, root, child_off, erec, minid, k, slack_rel,
                           slack_abs, ddata, dfs_node, leaf, blk, scan, box, frame, out_d, out_i, acc, qb, hd,
                           hi, pq_lb, pq_e, pq_d)


@numba.njit(parallel=True, **_NJ)
def descent_keys(cdata, params, Q, root, child_off, erec, leaf, out):  # pragma: no cover
    """A locality key per query: the DFS start of the subtree reached by walking from the root to the nearest
    child at every node, down to a bucket (or a leaf). Queries sorted by it visit similar subtrees one after
    another, so the buckets one query scans are still in cache for the next (the order changes no answer).
    A NaN distance is never "nearest"; :func:`knn` reports such metrics.
    """
    for qi in numba.prange(Q.shape[0]):
        p = root
        key = 0.0
        while True:
            best = -1
            bd = np.inf
            for e in range(child_off[p], child_off[p + 1]):
                dc = _dist(Q, qi, cdata, e, params)
                if dc < bd:
                    bd = dc
                    best = e
            if best < 0:
                break
            key = erec[best, 3]
            if erec[best, 2] <= leaf:
                break
            p = int(erec[best, 4])
        out[qi] = key


@numba.njit(inline="always", **_NJ)
def _queue_put(pq_lb, pq_e, pq_d, pos, lb, e, d):  # pragma: no cover
    pq_lb[pos] = lb
    pq_e[pos] = e
    pq_d[pos] = d


@numba.njit(inline="always", **_NJ)
def _queue_push(pq_lb, pq_e, pq_d, npq, lb, e, d):  # pragma: no cover
    """Min-heap on the lower bound ``pq_lb`` of (edge, distance) pairs, 4-ary (entry i's children are 4i+1 ..
    4i+4: half the levels of a binary heap, and a pop compares four adjacent bounds per level without branching
    on which is smallest; 2-10% faster queries than the binary heap, 2026-12-05). Returns the new size."""
    pos = npq
    while pos > 0 and pq_lb[(pos - 1) >> 2] > lb:  # sift up: parents with a larger bound move down
        par = (pos - 1) >> 2
        _queue_put(pq_lb, pq_e, pq_d, pos, pq_lb[par], pq_e[par], pq_d[par])
        pos = par
    _queue_put(pq_lb, pq_e, pq_d, pos, lb, e, d)
    return npq + 1


@numba.njit(inline="always", **_NJ)
def _queue_pop(pq_lb, pq_e, pq_d, npq):  # pragma: no cover
    """Remove the smallest lower bound of :func:`_queue_push`'s heap; returns (lb, edge, distance, new size)."""
    top = (pq_lb[0], pq_e[0], pq_d[0])
    npq -= 1
    if npq > 0:
        # sift the last entry down from the root: the smallest of up to four children moves up
        xl, xe, xd = pq_lb[npq], pq_e[npq], pq_d[npq]
        pos = 0
        while 4 * pos + 1 < npq:
            c0 = 4 * pos + 1
            sm = c0
            v = pq_lb[c0]
            for c in range(c0 + 1, min(c0 + 4, npq)):
                w = pq_lb[c]
                sm = c if w < v else sm
                v = min(w, v)
            if v >= xl:
                break
            _queue_put(pq_lb, pq_e, pq_d, pos, v, pq_e[sm], pq_d[sm])
            pos = sm
        _queue_put(pq_lb, pq_e, pq_d, pos, xl, xe, xd)
    return top[0], top[1], top[2], npq


@numba.njit(**_NJ_RAW)
def _knn_one(data, cdata, params, Q, qi, qslot, mode, root, child_off, erec, minid, k, slack_rel, slack_abs, ddata,
             dfs_node, leaf, blk, scan, box, frame, out_d, out_i, acc, qb, hd, hi, pq_lb, pq_e,
             pq_d):  # pragma: no cover
    """One query of :func:`knn` (no allocation: the workspace comes from the caller).

    The queue holds child edges (-1: the root) keyed by their subtree's lower bound. Popping an internal
    node computes its children's distances and queues their subtrees; popping a bucket (a subtree of at
    most ``leaf`` points) scans it. Buckets therefore run nearest-bound-first, after the k-th distance
    has shrunk as far as the closer ones could make it.
    """
    isbad = False
    size = 0
    npq = 0
    lim = qslot[qi] if mode == 2 else -1
    excl = qslot[qi] if mode == 1 else -1
    # no id at or above cut can enter the result: a predecessor set's own id, or once the k-th distance is 0, the
    # k-th's id + 1 (every other point has d >= 0 and ties go to the smaller id). Children come by ascending subtree
    # minimum id (build_csr), so a node's loop stops at the first child whose subtree starts at or above it.
    cut = np.float64(lim) if mode == 2 else np.inf
    d0 = _dist(Q, qi, data, root, params)
    if not _okd(d0):
        _finish(hd, hi, 0, k, out_d, out_i, qi)
        return True
    if (mode != 2 or root < lim) and root != excl:
        size = _heap_push_res(hd, hi, size, k, d0, root)
    if mode != 2 or minid[root] < lim:
        pq_lb[0] = 0.0
        pq_e[0] = -1
        pq_d[0] = d0
        npq = 1
    while npq > 0:
        lb, pe, dp, npq = _queue_pop(pq_lb, pq_e, pq_d, npq)
        kth = hd[0] if size == k else np.inf
        if lb > kth:
            break
        if kth == 0.0 and hi[0] < cut:
            cut = np.float64(hi[0] + 1)
        if pe >= 0 and erec[pe, 5] >= cut:
            continue
        if pe >= 0 and erec[pe, 2] <= leaf:
            # a bucket: its points (after the bucket's root, already counted) are contiguous in DFS order
            a0 = int(erec[pe, 3]) + 1
            nb = int(erec[pe, 2]) - 1
            if _SCREENS and scan >= 0:
                # fixed-point SIMD screen; exact float64 distances only for the points that can enter the result
                bx = int(erec[pe, 6])
                _scan_block(Q, qi, blk, a0, nb, scan, frame, bx, qb, acc)
                D = Q.shape[1]
                sc = frame[bx, D + 1]  # the screen works in the bucket's scaled units
                rs = frame[bx, D] * sc
                # kth and R are computed distances, short of the true ones by up to the pad each (Euclidean):
                # kth + pad covers both in the limit, as its radius term is u R against kth's (1 + u)
                pad = UNDERFLOW_PAD if scan == EUCLIDEAN else 0.0
                lim_r = _scan_limit((kth + pad) * sc, rs, scan, D)
                for j in range(nb):
                    r = acc[j]
                    # inf: float32 overflow, which proves nothing, so the point is measured exactly
                    if r > lim_r and r != np.inf:
                        continue
                    x = dfs_node[a0 + j]
                    if mode == 2 and x >= lim:
                        continue
                    if x == excl:
                        continue
                    size, bad_d = _push_measured(hd, hi, size, k, _dist(Q, qi, ddata, a0 + j, params), x)
                    isbad = isbad or bad_d
                    if size == k:
                        kth = hd[0]
                        lim_r = _scan_limit((kth + pad) * sc, rs, scan, D)
            else:  # (kept apart from the screened loop: one merged loop measured 4-5% slower at 131k uniform)
                for pos in range(a0, a0 + nb):
                    x = dfs_node[pos]
                    if mode == 2 and x >= lim:
                        continue
                    if x == excl:
                        continue
                    size, bad_d = _push_measured(hd, hi, size, k, _dist(Q, qi, ddata, pos, params), x)
                    isbad = isbad or bad_d
            continue
        p = root if pe < 0 else int(erec[pe, 4])
        for e in range(child_off[p], child_off[p + 1]):
            if erec[e, 5] >= cut:
                break
            # |d(q, p) - d(p, c)| <= d(q, c): skip c and its subtree without computing d(q, c)
            pc = erec[e, 0]
            md = erec[e, 1]
            if abs(dp - pc) - md - (slack_rel * (dp + pc + md) + slack_abs) > kth:
                continue
            c = int(erec[e, 4])
            dc = _dist(Q, qi, cdata, e, params)
            if not _okd(dc):
                isbad = True
                dc = np.inf
            if (mode != 2 or c < lim) and c != excl:
                size = _heap_push_res(hd, hi, size, k, dc, c)
                kth = hd[0] if size == k else np.inf
                if kth == 0.0 and hi[0] < cut:
                    cut = np.float64(hi[0] + 1)
            if erec[e, 2] > 1:
                clb = dc - md - (slack_rel * (dc + md) + slack_abs)
                if _SCREENS and clb <= kth and erec[e, 6] >= 0:
                    blb = _box_lower(Q, qi, box, int(erec[e, 6]), scan)
                    if blb > clb:
                        clb = blb
                if clb <= kth:
                    if clb < 0.0:
                        clb = 0.0
                    npq = _queue_push(pq_lb, pq_e, pq_d, npq, clb, e, dc)
    _finish(hd, hi, size, k, out_d, out_i, qi)
    return isbad


@numba.njit(parallel=True, **_NJ)
def brute_knn(data, params, Q, qslot, mode, slots, k, out_d, out_i, bad):  # pragma: no cover
    """Brute force over the given slots with the same distance function and tie rule as :func:`knn`."""
    nq = Q.shape[0]
    nch = min(nq, 64)
    for c in numba.prange(nch):
        hd = np.empty(k, np.float64)
        hi = np.empty(k, np.int64)
        for qi in range(c * nq // nch, (c + 1) * nq // nch):
            bad[qi] = _brute_one(data, params, Q, qi, qslot, mode, slots, k, out_d, out_i, hd, hi)


@numba.njit(**_NJ_RAW)
def _brute_one(data, params, Q, qi, qslot, mode, slots, k, out_d, out_i, hd, hi):  # pragma: no cover
    isbad = False
    size = 0
    for t in range(slots.shape[0]):
        c = slots[t]
        if mode == 1 and c == qslot[qi]:
            continue
        if mode == 2 and c >= qslot[qi]:
            continue
        size, bad_d = _push_measured(hd, hi, size, k, _dist(Q, qi, data, c, params), c)
        isbad = isbad or bad_d
    _finish(hd, hi, size, k, out_d, out_i, qi)
    return isbad


# Residual-correlation scan (the exact BLAS path of CoverTree.knn for this metric)
# ----------------------------------------------------------------------------------------------


@numba.njit(parallel=True, **_NJ)
def covariance_block(A, B, variance, kern, out):  # pragma: no cover - numba
    """out[i, j] = variance * phi(|A_i - B_j|^2) for rows already divided by the lengthscale (the matrix
    K(U, X) behind ResidualCorrelation.from_points; reference: kvant.RBF / kvant.Matern52 called on arrays)."""
    for i in numba.prange(A.shape[0]):
        for j in range(B.shape[0]):
            r2 = 0.0
            for t in range(A.shape[1]):
                z = A[i, t] - B[j, t]
                r2 += z * z
            out[i, j] = variance * _cov_phi(r2, kern)


# Cody-Waite split of ln 2 (fdlibm's): nf * _LN2_HI is exact for |nf| < 2^20
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
# relative error of :func:`exp_nonpos` against the exact exp, with margin: measured 8.8e-15 at most (degree-11
# Taylor remainder on |r| <= ln2/2 is 8.9e-15, Horner rounding a few ulp more)
EXP_NONPOS_REL_ERR = 1e-12


@numba.njit(inline="always", **_NJ)
def exp_nonpos(y):  # pragma: no cover - numba
    """exp(y) for y <= 0 in plain arithmetic, so LLVM vectorises loops over it (Numba here has no vector libm:
    ``math.exp`` is a scalar call, ~10 ns). Relative error <= :data:`EXP_NONPOS_REL_ERR` for y >= -700; below
    -700 it returns exp(-700) ~ 1e-304 (callers bound the difference absolutely)."""
    y = max(y, -700.0)
    nf = math.floor(y * 1.4426950408889634 + 0.5)
    r = (y - nf * _LN2_HI) - nf * _LN2_LO  # |r| <= ln2/2 (+ rounding)
    p = 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p * np.int64((np.int64(nf) + 1023) << 52).view(np.float64)  # times 2^nf, nf in [-1010, 0]


@numba.njit(inline="always", **_NJ)
def _cov_phi_screen(r2, kern):  # pragma: no cover - numba
    """:func:`_cov_phi` with :func:`exp_nonpos` for ``math.exp`` (the same operations otherwise)."""
    if kern == RBF_KERNEL:
        return exp_nonpos(-0.5 * r2)
    r = math.sqrt(5.0 * r2)
    if r > MATERN_ZERO_BEYOND:  # as _cov_phi (exp_nonpos stops at exp(-700), which r * r / 3 would scale up)
        return 0.0
    return (1.0 + r + r * r / 3.0) * exp_nonpos(-r)


@numba.njit(inline="always", **_NJ)
def _screen_x(kt, g, gam_ww):  # pragma: no cover - numba
    """(x, e): x = 1 - |kt - g| from the screen's covariance term ``kt`` and product ``g``, and e bounding
    |x - the metric kernel's x|: ``gam_ww`` (the product's rounding bound), the exp's error and the roundings of rho
    and x."""
    return 1.0 - abs(kt - g), gam_ww + (kt + abs(g)) * EXP_NONPOS_REL_ERR + 1e-14


@numba.njit(inline="always", **_NJ)
def _screen_row(G, a, gam, Zq, Sq, Rq, NWq, ZpT, Sp, Rp, NWp, SLp, c0, variance, kern, qs, mode, lo, e2, r2):
    """Bounds on x = 1 - |rho| for query ``a`` against the points c0 .. c0 + w - 1 (w = G.shape[1]), as the metric
    kernel :func:`residual_dist` computes x before its clamp and sqrt: lo[t] <= x <= lo[t] + e2[t].

    ``G[a, t]`` approximates w_a . w_c (float32 or float64 products) within ``gam * NWq[a] * NWp[c]`` of the
    exact dot product, and the kernel's own float64 dot product is within the same (``gam`` includes both).
    The covariance term is computed as the kernel does it, with :func:`exp_nonpos` for ``math.exp``: the
    rest of the bound covers that exp's error and the roundings of rho and x. The same row of X gives x = 0
    exactly; points the mode excludes (1: the query's own slot, 2: slots at or after it) get lo = +inf. Every
    loop runs over t, so LLVM vectorises it; the indices are unsigned, which spares each access Numba's
    negative-index check (with it the loops stayed scalar: 13 against 7 ns per pair)."""
    w = G.shape[1]
    d = Zq.shape[1]
    for t in range(w):
        r2[t] = 0.0
    for dd in range(d):  # coordinate by coordinate, as residual_dist sums them: the same r2, bit for bit
        zq = Zq[a, dd]
        for t in range(w):
            z = zq - ZpT[dd, np.uint64(c0 + t)]
            r2[t] += z * z
    if kern == RBF_KERNEL:  # one loop per kernel (a constant kern inside): each vectorises
        for t in range(w):
            lo[t] = _cov_phi_screen(r2[t], RBF_KERNEL)
    else:
        for t in range(w):
            lo[t] = _cov_phi_screen(r2[t], MATERN52_KERNEL)
    sq, nq, rq = Sq[a], NWq[a], Rq[a]
    for t in range(w):
        c = np.uint64(c0 + t)
        kt = variance * lo[t] * (sq * Sp[c])
        x, e = _screen_x(kt, np.float64(G[a, t]), gam * (nq * NWp[c]))
        low = x - e
        low = low if low == low else -np.inf  # NaN (overflowed products): always a candidate
        same = Rp[c] == rq
        lo[t] = 0.0 if same else low
        e2[t] = 0.0 if same else 2.0 * e
    if mode == 1:  # the query's own slot
        for t in range(w):
            lo[t] = np.inf if SLp[np.uint64(c0 + t)] == qs else lo[t]
    elif mode == 2:  # slots at or after the query's
        for t in range(w):
            lo[t] = np.inf if SLp[np.uint64(c0 + t)] >= qs else lo[t]


@numba.njit(**_NJ)
def residual_screen_bounds(G, gam, Zq, Sq, Rq, NWq, ZpT, Sp, Rp, NWp, SLp, c0, variance, kern, qslot, mode, lo,
                           e2):  # pragma: no cover - numba
    """lo[a, t], e2[a, t] of :func:`_screen_row` for every query of the tile (the scan's bounds, exposed for tests)."""
    r2 = np.empty(G.shape[1])
    for a in range(G.shape[0]):
        _screen_row(G, a, gam, Zq, Sq, Rq, NWq, ZpT, Sp, Rp, NWp, SLp, c0, variance, kern, qslot[a], mode, lo[a],
                    e2[a], r2)


@numba.njit(inline="always", **_NJ)
def screen_threshold(top):  # pragma: no cover - numba
    """The x beyond which a point is farther than k points whose x are at most ``top``: sqrt (correctly rounded)
    keeps x > max(top, 0)·(1 + 2⁻⁴⁰) strictly above, and x > 0 above the clamped zeros, so no tie is lost."""
    return max(top, 0.0) * (1.0 + 2.0**-40) + 1e-300


@numba.njit(**_NJ_RAW)
def residual_screen_tile(G, gam, Zq, Sq, Rq, NWq, ZpT, Sp, Rp, NWp, SLp, c0, variance, kern, qslot, mode, heap_u,
                         heap_c, heap_n, buf_l, buf_c, buf_n, lost, tmp):  # pragma: no cover - numba
    """Fold one (queries x points) tile into every query's screen: the points are c0 .. c0 + w - 1 of the
    per-point arrays, ``G`` their approximate products with the queries (bounds: :func:`_screen_row`).

    Each query keeps the k smallest upper bounds (max-heap ``heap_u``/``heap_c``); with T their largest, a point
    whose lower bound exceeds ``screen_threshold(T)`` is farther than k others and is skipped. The rest go to the
    candidate buffer, a max-heap of the ``cap`` smallest lower bounds; ``lost[a]`` records the smallest lower
    bound it had to drop. T only falls, so every point at or below the final threshold is in the buffer unless
    ``lost`` is at or below it (the caller then rescans that query). ``tmp``: (3, w) float64 scratch."""
    k = heap_u.shape[1]
    cap = buf_l.shape[1]
    lo, e2, r2 = tmp[0], tmp[1], tmp[2]
    for a in range(G.shape[0]):
        _screen_row(G, a, gam, Zq, Sq, Rq, NWq, ZpT, Sp, Rp, NWp, SLp, c0, variance, kern, qslot[a], mode, lo, e2,
                    r2)
        hu = heap_u[a]
        hc = heap_c[a]
        bl = buf_l[a]
        bc = buf_c[a]
        size = heap_n[a]
        nb = buf_n[a]
        lst = lost[a]
        thr = screen_threshold(hu[0]) if size == k else np.inf
        for t in range(G.shape[1]):
            low = lo[t]
            if low > thr or low == np.inf:  # excluded points have +inf (also while the heap fills)
                continue
            c = c0 + t
            if nb == cap:  # full: the largest of the buffer and this one is dropped
                if not _less(low, c, bl[0], bc[0]):
                    if low < lst:
                        lst = low
                    continue
                if bl[0] < lst:
                    lst = bl[0]
            nb = _heap_push_res(bl, bc, nb, cap, low, c)
            up = low + e2[t]
            if up != up:  # -inf + inf (an infinite bound): no upper bound, and a NaN would poison the heap
                up = np.inf
            if size < k or up < hu[0]:
                size = _heap_push_res(hu, hc, size, k, up, c)
                if size == k:
                    thr = screen_threshold(hu[0])
        heap_n[a] = size
        buf_n[a] = nb
        lost[a] = lst


@numba.njit(parallel=True, **_NJ)
def pair_dists(X, a, Y, b, params, out):  # pragma: no cover
    """out[t] = distance between X row a[t] and Y row b[t]."""
    for t in numba.prange(a.shape[0]):
        out[t] = _dist(X, a[t], Y, b[t], params)


@numba.njit(**_NJ)
def mark_subtrees(parent, order, flag):  # pragma: no cover
    """flag every descendant of a flagged node; ``order`` lists nodes parents-first."""
    for t in range(order.shape[0]):
        c = order[t]
        p = parent[c]
        if p >= 0 and flag[p]:
            flag[c] = True


@numba.njit(**_NJ)
def radii(base, levels):  # pragma: no cover
    out = np.empty(levels.shape[0])
    for t in range(levels.shape[0]):
        out[t] = radius(base, levels[t])
    return out


@numba.njit(**_NJ)
def dfs_order(root, n_in, child_off, child_idx, cap):  # pragma: no cover
    """Pre-order positions: node x's subtree occupies [start[x], end[x]) of ``node``."""
    start = np.zeros(cap, np.int64)
    end = np.zeros(cap, np.int64)
    node = np.empty(n_in, np.int64)
    if n_in == 0:
        return start, end, node
    stack = np.empty(n_in, np.int64)
    it = np.empty(n_in, np.int64)  # next child edge to visit for the node at that stack depth
    top = 0
    stack[0] = root
    it[0] = child_off[root]
    node[0] = root
    start[root] = 0
    pos = 1
    while top >= 0:
        x = stack[top]
        e = it[top]
        if e < child_off[x + 1]:
            it[top] = e + 1
            c = child_idx[e]
            start[c] = pos
            node[pos] = c
            pos += 1
            top += 1
            stack[top] = c
            it[top] = child_off[c]
        else:
            end[x] = pos
            top -= 1
    return start, end, node


# (Not _block_pairs_row: only the residual metric, a built-in one, takes that path, so user metrics' clones of
# net_centres_big call the cached module version instead of compiling a parallel kernel of their own.)
_METRIC_KERNELS = ["_net_seq", "nets_small", "_first_cover_tile", "net_centres_big", "_assign_one",
                   "net_assign_big", "_land_one", "land", "dist_to_one", "_knn_one", "_knn_chunk", "knn", "knn_serial",
                   "descent_keys",
                   "_brute_one", "brute_knn", "pair_dists"]


def make_kernels(user_dist):
    """The metric-dependent kernels re-compiled with ``_dist`` bound to ``user_dist(X, i, Y, j, params)``.

    Returns a namespace with the same attribute names as this module (plus the metric-free kernels).
    """
    import types

    g = dict(globals())
    g["_dist"] = user_dist
    g["_SCREENS"] = False
    ns = types.SimpleNamespace(**{k: v for k, v in globals().items() if not k.startswith("__")})
    for name in _METRIC_KERNELS:
        disp = globals()[name]
        f = disp.py_func
        clone = types.FunctionType(f.__code__, g, f.__name__, f.__defaults__, f.__closure__)
        opts = {k: v for k, v in disp.targetoptions.items() if k not in ("cache", "nopython")}
        jitted = numba.njit(**opts)(clone)
        g[name] = jitted
        setattr(ns, name, jitted)
    return ns
