"""Kernels for Lloyd iterations: centroid sums, incremental updates, Hamerly bounds, k-means++ steps.

All serial or with a fixed, thread-count-determined split so that the same seed and thread count give
bit-identical results. Sums are accumulated in float64.
"""

from __future__ import annotations

import numba
import numpy as np

from .distance import exact_scaled_sq_dist_into, exact_sq_dist_into, row_sq_dist64
from .row_lanes import BLOCK_TILES, LANES, tile_sq_dists, transpose_tiles

_JIT = dict(cache=True, nogil=True, fastmath=False)

UNIT_WEIGHTS = np.empty(0, np.float64)  # the ``w`` argument meaning "every row weighs 1"


@numba.njit(**_JIT)
def cluster_sums(x, labels, k, n_parts, w):
    """Per-cluster float64 weighted sums of rows and total weights, from ``n_parts`` fixed row ranges
    reduced in order. ``w`` holds one weight per row; an empty ``w`` means every weight is 1 (the totals
    are then the row counts, as float64).

    Serial: it runs once per fit (or per mini-batch) between BLAS-heavy passes, and a parallel region here
    made the two thread pools fight (65 ms instead of 2 ms per call on the 2-core reference machine)."""
    n, d = x.shape
    unit = w.shape[0] == 0
    part_sums = np.zeros((n_parts, k, d), np.float64)
    part_counts = np.zeros((n_parts, k), np.float64)
    for p in range(n_parts):
        lo = p * n // n_parts
        hi = (p + 1) * n // n_parts
        for i in range(lo, hi):
            c = labels[i]
            wi = 1.0 if unit else np.float64(w[i])
            part_counts[p, c] += wi
            for t in range(d):
                part_sums[p, c, t] += wi * x[i, t]
    sums = np.zeros((k, d), np.float64)
    counts = np.zeros(k, np.float64)
    for p in range(n_parts):
        sums += part_sums[p]
        counts += part_counts[p]
    return sums, counts


@numba.njit(**_JIT)
def move_rows(x, rows, old, new, sums, counts, w):
    """Move each listed row's (weighted) contribution from cluster ``old[r]`` to ``new[r]``, in listed
    order; an empty ``w`` means unit weights, as in :func:`cluster_sums`."""
    d = x.shape[1]
    unit = w.shape[0] == 0
    for r in range(rows.shape[0]):
        i = rows[r]
        a = old[r]
        b = new[r]
        wi = 1.0 if unit else np.float64(w[i])
        counts[a] -= wi
        counts[b] += wi
        for t in range(d):
            v = wi * np.float64(x[i, t])
            sums[a, t] -= v
            sums[b, t] += v


@numba.njit(**_JIT)
def _reseed_candidate(x, row, labels, rows_in, taken_rows, taken, means):
    """Whether ``row`` may seed an empty cluster: its cluster keeps a row, it is not its cluster's mean rounded to
    float32 (the centre: seeding there would copy it, and the next E-step would empty the new cluster again — with
    fewer distinct rows than K every step re-seeded, so none could end by the tolerance: 200k rows of 500 distinct
    values at K = 600 ran all 15 iterations, 0.8× FAISS's time), and it is no copy of a row already taken."""
    if rows_in[labels[row]] <= 1:
        return False
    j = labels[row]
    centre = True
    for t in range(x.shape[1]):
        if x[row, t] != np.float32(means[j, t]):
            centre = False
            break
    if centre:
        return False
    for q in range(taken):
        same = True
        for t in range(x.shape[1]):
            if x[row, t] != x[taken_rows[q], t]:
                same = False
                break
        if same:
            return False
    return True


@numba.njit(**_JIT)
def _reseed_move(x, row, dst, labels, dist, lower, sums, counts, w, rows_in):
    one = np.empty(1, np.int64)
    src_a = np.empty(1, np.int64)
    dst_a = np.empty(1, np.int64)
    src = labels[row]
    one[0], src_a[0], dst_a[0] = row, src, dst
    move_rows(x, one, src_a, dst_a, sums, counts, w)
    rows_in[src] -= 1
    rows_in[dst] += 1
    labels[row] = dst
    dist[row] = 0.0
    if lower.shape[0] > 0:
        lower[row] = 0.0


@numba.njit(**_JIT)
def reseed_empty(x, labels, dist, lower, sums, counts, w, rows_in):
    """Re-seed the empty clusters (``rows_in`` == 0, in id order) with the rows farthest from their centres: ``dist``
    (a distance or an upper bound on it) in decreasing order, ties to the lower row index. A row moves only from a
    cluster that keeps at least one row; rows on their centre (``dist`` 0) and copies of a row already taken are
    skipped (they would seed identical centres, and the next E-step would empty all but one again). The row's sums
    move to its new cluster, its label changes, ``dist`` and ``lower`` (when not empty) become 0 (a re-check next
    E-step), and ``rows_in`` follows. Returns how many clusters were re-seeded.

    ``dist`` comes from float32 E-steps, which round distances far below the rows' norms to 0: rows a few 1e-7 of
    their norm apart (K close to N, tight clusters) all read 0 and none could seed. When too few rows qualify, a
    second pass ranks the remaining rows by their exact float64 squared distance to their cluster's mean
    (``sums / counts`` as the call found them) and takes those above 0 the same way (1000 distinct rows, K = 1000:
    ~22 clusters were left empty)."""
    k = rows_in.shape[0]
    n_empty = 0
    for j in range(k):
        if rows_in[j] == 0:
            n_empty += 1
    if n_empty == 0:
        return 0
    n, d = x.shape
    empty = np.empty(n_empty, np.int64)
    m = 0
    for j in range(k):
        if rows_in[j] == 0:
            empty[m] = j
            m += 1
    means = np.zeros((k, d), np.float64)  # before any move: the second pass's reference points
    for j in range(k):
        if counts[j] > 0:
            for t in range(d):
                means[j, t] = sums[j, t] / counts[j]
    taken_rows = np.empty(n_empty, np.int64)
    # ranked by dist itself: a row it zeroes when taken is never read again
    taken = _reseed_pass(x, dist, 0, labels, dist, lower, sums, counts, w, rows_in, empty, taken_rows, means)
    if taken < n_empty:
        exact = np.empty(n, np.float64)
        for i in range(n):
            s = 0.0
            for t in range(d):
                v = np.float64(x[i, t]) - means[labels[i], t]  # (a moved row now sits alone: never taken)
                s += v * v
            exact[i] = s
        taken = _reseed_pass(x, exact, taken, labels, dist, lower, sums, counts, w, rows_in, empty, taken_rows, means)
    return taken


@numba.njit(**_JIT)
def _reseed_pass(x, rank, taken, labels, dist, lower, sums, counts, w, rows_in, empty, taken_rows, means):
    """Fill empty clusters ``empty[taken:]`` with the rows of largest positive ``rank`` (ties to the lower row) that
    :func:`_reseed_candidate` allows; returns the new count of clusters filled."""
    order = np.argsort(-rank, kind="mergesort")
    for o in range(order.shape[0]):
        row = order[o]
        if taken == empty.shape[0] or not rank[row] > 0.0:
            break
        if not _reseed_candidate(x, row, labels, rows_in, taken_rows, taken, means):
            continue
        _reseed_move(x, row, empty[taken], labels, dist, lower, sums, counts, w, rows_in)
        taken_rows[taken] = row
        taken += 1
    return taken


@numba.njit(**_JIT)
def m_step(sums, counts, old, spherical, x_total, means):
    """Lloyd's M-step from cluster sums in one pass (a tiny fit's iteration was mostly NumPy call overhead):
    writes each cluster's mean (float32, unit-normalised in float64 when ``spherical``; ``old``'s row for an empty
    cluster, and for a spherical cluster whose sum is zero) into ``means`` and returns the objective from sums alone,
    Σ w‖x‖² − Σ_j ‖S_j‖²/W_j with ``x_total`` = Σ w‖x‖², or Σ_j W_j − Σ_j ‖S_j‖ for spherical (½Σ w‖x − c‖² of unit
    rows). NumPy reference: ``kvant.bench.reference.m_step_ref``."""
    k, d = sums.shape
    total_w = 0.0
    gain = 0.0
    for j in range(k):
        total_w += counts[j]
        if counts[j] > 0:
            sq = 0.0
            for t in range(d):
                sq += sums[j, t] * sums[j, t]
            gain += np.sqrt(sq) if spherical else sq / counts[j]
            for t in range(d):
                means[j, t] = np.float32(sums[j, t] / counts[j])
        if counts[j] <= 0 or (spherical and _all_zero(means, j)):
            # an empty cluster keeps its centre; so does a spherical one whose unit rows cancel exactly: every unit
            # direction scores Σu·c = 0 for it, and a zero centre would be measured as a cosine of ½ (½‖u − 0‖²)
            for t in range(d):
                means[j, t] = old[j, t]
        if spherical:
            _to_unit(means, j)
    return total_w - gain if spherical else x_total - gain


@numba.njit(inline="always", **_JIT)
def _all_zero(c, j):
    for t in range(c.shape[1]):
        if c[j, t] != 0.0:
            return False
    return True


@numba.njit(inline="always", **_JIT)
def _to_unit(c, j):
    """Row j of c divided by its float64 norm (left as it is when all zero): spherical k-means' centre."""
    norm = 0.0
    for t in range(c.shape[1]):
        norm += np.float64(c[j, t]) * np.float64(c[j, t])
    norm = np.sqrt(norm)
    if norm == 0.0:
        norm = 1.0
    for t in range(c.shape[1]):
        c[j, t] = np.float32(np.float64(c[j, t]) / norm)


@numba.njit(**_JIT)
def unit_centres(c):
    """A copy of the float32 centres ``c`` with every non-zero row scaled to unit length (:func:`_to_unit`)."""
    out = c.copy()
    for j in range(out.shape[0]):
        _to_unit(out, j)
    return out


@numba.njit(**_JIT)
def centre_moves(new, old, delta):
    """How far each centre moved, ``delta[j]`` = ‖new_j − old_j‖ (float64 sums, stored as float32), and the
    largest move, the index of a largest one and the second largest (equal to the largest when two tie): what
    Hamerly's bounds need. NumPy reference: ``kvant.bench.reference.centre_moves_ref``."""
    k, d = new.shape
    best = -1.0
    second = -1.0
    arg = 0
    for j in range(k):
        sq = 0.0
        for t in range(d):
            diff = np.float64(new[j, t]) - np.float64(old[j, t])
            sq += diff * diff
        if not sq <= np.inf:  # a NaN move (a centre gone non-finite) counts as unbounded: every bound is dropped
            sq = np.inf
        delta[j] = np.float32(np.sqrt(sq))
        v = np.float64(delta[j])
        if v > best:
            second = best
            best = v
            arg = j
        elif v > second:
            second = v
    if k == 1:
        second = best
    return best, arg, second


@numba.njit(**_JIT)
def loosen_bounds(labels, upper, lower, delta, max_delta, argmax_delta, second_delta, lo, hi):
    """Hamerly: after centroids move by ``delta``, widen bounds of rows [lo, hi). Returns rows to check."""
    out = np.empty(hi - lo, np.int64)
    m = 0
    for i in range(lo, hi):
        a = labels[i]
        upper[i] += delta[a]
        lower[i] -= second_delta if a == argmax_delta else max_delta
        if upper[i] >= lower[i]:
            out[m] = i
            m += 1
    return out[:m]


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def exact_dist_to(x, rows, centroids, labels):
    """sqrt ‖x_i − c_{labels_i}‖² for each listed row, term by term (:func:`row_sq_dist64`; its float64
    rounding, ~1e-15 relative, is far inside the 1e-4 slack the Hamerly bounds already carry)."""
    out = np.empty(rows.shape[0], np.float32)
    for r in range(rows.shape[0]):
        i = rows[r]
        out[r] = np.sqrt(row_sq_dist64(x, i, centroids, labels[i]))
    return out


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def exact_sq_dist_rows(x, centroids, labels):
    """Σ_t (x_i − c_{labels_i})² per row, float64, for the final exact inertia (:func:`row_sq_dist64`: explicit
    16-lane float64 sums; rounding ~1e-15 relative, and the result does not depend on the thread count)."""
    out = np.empty(x.shape[0], np.float64)
    exact_sq_dist_into(x, 0, x.shape[0], centroids, labels, out)
    return out


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def exact_sq_dist_rows_scaled(x, centroids, labels, scale):
    """Σ_t (scale_i·x_i − c_{labels_i})² per row, float64: :func:`exact_sq_dist_rows` of the rows scaled by
    ``scale`` (float64, e.g. 1/‖x_i‖ for spherical k-means without a normalised copy)."""
    out = np.empty(x.shape[0], np.float64)
    exact_scaled_sq_dist_into(x, 0, x.shape[0], centroids, labels, scale, out)
    return out


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"}, _nrt=False)
def _sq_dist_f32(x, i, c):
    # float32 ‖x_i − c‖² with reassociation allowed so LLVM vectorises it: these are sampling weights,
    # where float32 rounding is harmless. kmeanspp's skip margin is derived from this loop's error bound.
    # Compiled without Numba's refcounting: called once per row and centre, its entry and exit otherwise paid
    # atomic increfs and decrefs of both arrays.
    acc = np.float32(0.0)
    for t in range(c.shape[0]):
        diff = x[i, t] - c[t]
        acc += diff * diff
    return acc


# Rows per partial sum of the sampling mass: a k-means++ step re-sums only the blocks whose rows moved,
# and a draw walks the block sums before the rows of one block. (Greedy steps compute a block's distances as
# row_lanes.BLOCK_TILES tiles of 16 rows.)
_KPP_BLOCK = 64
# Below this dimension kmeanspp computes every row's distance: a distance of a few vectors costs less than the
# mispredicted branch of the skip test (digits, D=64: 5.5 ms unpruned, 7.8 ms pruned at K=256; even at D=128).
KPP_PRUNE_MIN_DIM = 160


@numba.njit(**_JIT)
def _block_mass(d2, w, unit, lo, hi):
    s = 0.0
    for i in range(lo, hi):
        s += d2[i] if unit else w[i] * d2[i]
    return s


@numba.njit(**_JIT)
def _draw(d2, w, unit, bmass, target):
    """The first row with positive mass whose running mass sum exceeds ``target``, walking the block sums
    first; if rounding leaves no row above the target, the last row with positive mass (never a zero one)."""
    n = d2.shape[0]
    run = 0.0
    found = False  # a block whose sum crosses the target (its row walk may still fall short by rounding)
    b = 0  # that block, else the last block with positive mass
    for j in range(bmass.shape[0]):
        if bmass[j] > 0.0:
            b = j
            if run + bmass[j] > target:
                found = True
                break
            run += bmass[j]
    last = b * _KPP_BLOCK
    for i in range(b * _KPP_BLOCK, min(n, (b + 1) * _KPP_BLOCK)):
        mass = d2[i] if unit else w[i] * d2[i]
        if mass > 0.0:
            last = i
            run += mass
            if found and run > target:
                return i
    return last


@numba.njit(**_JIT)
def _kpp_update(x, centre, c, d2, near, bmass, skip_at_most, prune, w, unit, b_lo, b_hi):
    """One k-means++ step's update of the mass blocks ``b_lo:b_hi``: each row's D² to the new centre ``c`` (skipped
    where the triangle inequality rules it out, with ``prune``) and the blocks' mass sums where a row changed."""
    n = x.shape[0]
    for b in range(b_lo, b_hi):
        lo = b * _KPP_BLOCK
        hi = min(n, lo + _KPP_BLOCK)
        changed = False
        for i in range(lo, hi):
            if prune and c > 0 and d2[i] <= skip_at_most[near[i]]:
                continue
            v = np.float64(_sq_dist_f32(x, i, centre))
            if v < d2[i]:
                d2[i] = v
                near[i] = c
                changed = True
        if changed:
            bmass[b] = _block_mass(d2, w, unit, lo, hi)


@numba.njit(**_JIT)
def _kpp_update_lanes(xt, x, row, d2, bmass, w, unit, b_lo, b_hi, buf):
    """:func:`_kpp_update` without pruning, each block's 64 rows in the vector lanes (``xt``: the rows as
    :func:`kvant.kernels.row_lanes.transpose_tiles` tiles in fours, ``buf`` 64 float32 of scratch): the distances to
    the new centre, row ``row`` of ``x``, end in their own lanes instead of a horizontal sum per row. Rows' nearest
    centres are not kept: only the pruned steps read them."""
    n = x.shape[0]
    for b in range(b_lo, b_hi):
        lo = b * _KPP_BLOCK
        hi = min(n, lo + _KPP_BLOCK)
        tile_sq_dists(xt, lo // LANES, x, row, buf)
        changed = False
        for i in range(lo, hi):
            v = np.float64(buf[i - lo])
            if v < d2[i]:
                d2[i] = v
                changed = True
        if changed:
            bmass[b] = _block_mass(d2, w, unit, lo, hi)


@numba.njit(parallel=True, **_JIT)
def kmeanspp(x, k, uniforms, first, w, prune_min_dim=KPP_PRUNE_MIN_DIM, n_parts=1):
    """k-means++ seeding (Arthur & Vassilvitskii): returns k row indices of ``x`` (float32 rows).

    ``first`` is the first centre's row; ``uniforms`` (k,) in [0, 1) drive the D² sampling, so the
    result is a pure function of its inputs. With row weights ``w`` (a weighted sample standing for more
    rows) the next centre is drawn with probability ∝ w·D²; an empty ``w`` means unit weights.

    From ``prune_min_dim`` up, each row keeps its nearest centre so far. A new centre c can only lower D²(x)
    when ‖c − c_near(x)‖² < 4·D²(x) (triangle inequality), so rows failing that test skip the distance
    (53–95% of them on Fashion-MNIST and 384-d synthetic data), at the price of up to K distances between
    centres per step and a compare per row. The test carries a margin of 8× the float32 rounding bound of
    the distance loop, so a skipped row is one whose computed distance could not have been smaller: the
    picks are those of the unpruned algorithm. The mass total is kept per block of rows, re-summed only
    where a row changed.

    ``n_parts`` > 1 splits each step's rows into that many runs of whole blocks, one parallel region per step
    (the caller decides when a step is large enough to pay for it). The blocks' sums are added in order after
    the region, so the picks do not depend on ``n_parts``. The parallel loop is written here rather than in a
    parallel helper this function calls: a cached function calling a parallel one crashed when a second
    signature was loaded from Numba's cache (numba#8578; tests/kernels/test_numba_cache.py).
    """
    n, d = x.shape
    unit = w.shape[0] == 0
    # Set-up by explicit serial loops: in a parallel=True function, np.full / np.zeros / .copy() would each become
    # a parallel region on every call, small seedings included.
    chosen = np.empty(k, np.int64)
    chosen[0] = first
    prune = d >= prune_min_dim
    d2 = np.empty(n, np.float64)
    near = np.empty(n if prune else 0, np.int64)  # each row's nearest centre: only the pruned steps read it
    for i in range(n):
        d2[i] = np.inf
    for i in range(near.shape[0]):
        near[i] = 0
    n_blocks = (n + _KPP_BLOCK - 1) // _KPP_BLOCK
    bmass = np.empty(n_blocks, np.float64)
    for b in range(n_blocks):
        bmass[b] = 0.0
    skip_at_most = np.empty(k, np.float64)
    for j in range(k):
        skip_at_most[j] = 0.0
    centre = np.empty(d, x.dtype)
    shrink = _prune_shrink(d)  # see docs/auto.md
    # unpruned steps compute every row's distance to the new centre, with rows in the vector lanes
    lanes = not prune
    xt = transpose_tiles(x, BLOCK_TILES) if lanes else np.empty((0, d, LANES), np.float32)
    buf = np.empty(_KPP_BLOCK, np.float32)
    parts = max(1, min(n_parts, n_blocks))
    total = 0.0
    for c in range(k):
        if c > 0:
            if total <= 0.0:  # fewer distinct points than k: take the next unused rows deterministically
                chosen[c] = chosen[c - 1] + 1 if chosen[c - 1] + 1 < n else 0
            else:
                chosen[c] = _draw(d2, w, unit, bmass, uniforms[c] * total)
        for t in range(d):  # a contiguous copy: the row loop below vectorises better than on x[r, :]
            centre[t] = x[chosen[c], t]
        for j in range(c if prune else 0):
            skip_at_most[j] = np.float64(_sq_dist_f32(x, chosen[j], centre)) * shrink
        if lanes and parts == 1:
            _kpp_update_lanes(xt, x, chosen[c], d2, bmass, w, unit, 0, n_blocks, buf)
        elif lanes:
            for p in numba.prange(parts):
                part_buf = np.empty(_KPP_BLOCK, np.float32)
                _kpp_update_lanes(xt, x, chosen[c], d2, bmass, w, unit,
                                  p * n_blocks // parts, (p + 1) * n_blocks // parts, part_buf)
        elif parts == 1:
            _kpp_update(x, centre, c, d2, near, bmass, skip_at_most, prune, w, unit, 0, n_blocks)
        else:
            for p in numba.prange(parts):
                _kpp_update(x, centre, c, d2, near, bmass, skip_at_most, prune, w, unit,
                            p * n_blocks // parts, (p + 1) * n_blocks // parts)
        total = 0.0
        for b in range(n_blocks):
            total += bmass[b]
    return chosen


@numba.njit(**_JIT)
def _greedy_block(x, cents, d2, near, skip_at_most, prune, cand_d, w, unit, b, pot):
    """Block ``b`` of a greedy step: every row's distance to each candidate (into ``cand_d``) and the block's share
    of each candidate's potential Σ w·min(D², distance) (into ``pot[:, b]``). With ``prune``, a row whose D² is at
    most ``skip_at_most[t, near[i]]`` cannot get closer to candidate t (triangle inequality, as in
    :func:`kmeanspp`): its distance is not computed, ``cand_d`` records inf and the potential takes D² as is."""
    n = x.shape[0]
    lo = b * _KPP_BLOCK
    hi = min(n, lo + _KPP_BLOCK)
    for t in range(cents.shape[0]):
        s = 0.0
        for i in range(lo, hi):
            if prune and d2[i] <= skip_at_most[t, near[i]]:
                cand_d[t, i] = np.inf
                m = d2[i]
            else:
                v = np.float64(_sq_dist_f32(x, i, cents[t]))
                cand_d[t, i] = v
                m = v if v < d2[i] else d2[i]
            s += m if unit else w[i] * m
        pot[t, b] = s


@numba.njit(**_JIT)
def _greedy_block_lanes(xt, x, cand, d2, cand_d, w, unit, b, pot, buf):
    """:func:`_greedy_block` without pruning, its 64 rows in the vector lanes (``xt``: the rows as
    :func:`kvant.kernels.row_lanes.transpose_tiles` tiles in fours, ``buf`` 64 float32 of scratch): each row's
    distance to a candidate ends in its own lane instead of a horizontal sum per row."""
    n = x.shape[0]
    lo = b * _KPP_BLOCK
    hi = min(n, lo + _KPP_BLOCK)
    for t in range(cand.shape[0]):
        tile_sq_dists(xt, lo // LANES, x, cand[t], buf)
        s = 0.0
        for i in range(lo, hi):
            v = np.float64(buf[i - lo])
            cand_d[t, i] = v
            m = v if v < d2[i] else d2[i]
            s += m if unit else w[i] * m
        pot[t, b] = s


@numba.njit(**_JIT)
def _prune_shrink(d):
    """Factor on ‖c − c'‖² below which D²(x) to c' must stay for c to be unable to lower it: 1/4 by the triangle
    inequality, less (d + 3)·2⁻²⁴ (the relative error bound of :func:`_sq_dist_f32`: d rounded adds, a rounded
    difference squared) with an 8× margin, so a skipped row is one whose computed distance could not be smaller."""
    return 1.0 / (4.0 * (1.0 + 8.0 * (d + 3) * 2.0**-24))


@numba.njit(parallel=True, **_JIT)
def kmeanspp_greedy(x, k, uniforms, first, w, n_parts=1, prune_min_dim=KPP_PRUNE_MIN_DIM):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii's variant, scikit-learn's default): each step draws
    L = ``uniforms.shape[1]`` candidates by w·D² (``uniforms[c, t]`` in [0, 1) as :func:`kmeanspp` uses its
    ``uniforms[c]``) and keeps the one that leaves the smallest potential Σ w·min(D², ‖x − candidate‖²), ties to the
    earlier draw. Returns k row indices of ``x`` (float32 rows); ``first`` is the first centre's row.

    L passes over the rows per centre instead of one: plain k-means++ on rows of clusters with very different
    spreads often spends several centres on one wide cluster and none on a tight far one; the best of L draws
    rarely does (100k×17 rows from 64 blobs of spreads 0.01-30, K = 64: MSE 1,369-1,586 after Lloyd from plain
    seeding, 942 from greedy).

    From ``prune_min_dim`` up, each row keeps its nearest centre so far and skips the candidates that cannot come
    closer (:func:`kmeanspp`'s triangle test, against L·c distances between the candidates and the centres per
    step); the potentials and picks are those of the unpruned algorithm. Below it every distance is computed, with
    16 rows to a vector (:func:`_greedy_block_lanes`; float32 rows only): digits' 682 seeding rows at K = 64
    (6 draws) took 0.77 ms against 1.16 ms row by row (Zen 4, 2026-12-05; whole digits K = 64 fits ~20% faster).
    ``n_parts`` splits each step's blocks over threads; each block's sums are added in order after the region, so
    the picks do not depend on it. NumPy reference: ``kvant.bench.reference.kmeanspp_greedy_ref``."""
    n, d = x.shape
    L = uniforms.shape[1]
    unit = w.shape[0] == 0
    chosen = np.empty(k, np.int64)
    chosen[0] = first
    n_blocks = (n + _KPP_BLOCK - 1) // _KPP_BLOCK
    prune = d >= prune_min_dim
    d2 = np.empty(n, np.float64)
    near = np.empty(n if prune else 0, np.int64)  # each row's nearest centre: only the pruned steps read it
    bmass = np.empty(n_blocks, np.float64)
    cents = np.empty((L, d), x.dtype)
    cand = np.empty(L, np.int64)
    cand_d = np.empty((L, n), np.float64)
    pot = np.empty((L, n_blocks), np.float64)
    shrink = _prune_shrink(d)
    skip_at_most = np.empty((L, k if prune else 1), np.float64)
    # unpruned steps compute every row's distance to each candidate: with rows in the vector lanes
    lanes = not prune
    xt = transpose_tiles(x, BLOCK_TILES) if lanes else np.empty((0, d, LANES), np.float32)
    buf = np.empty(_KPP_BLOCK, np.float32)
    for t in range(d):
        cents[0, t] = x[first, t]
    for i in range(n):
        d2[i] = np.float64(_sq_dist_f32(x, i, cents[0]))
    for i in range(near.shape[0]):
        near[i] = 0
    for b in range(n_blocks):
        bmass[b] = _block_mass(d2, w, unit, b * _KPP_BLOCK, min(n, (b + 1) * _KPP_BLOCK))
    parts = max(1, min(n_parts, n_blocks))
    for c in range(1, k):
        total = 0.0
        for b in range(n_blocks):
            total += bmass[b]
        if total <= 0.0:  # fewer distinct points than k: the next unused rows, as kmeanspp
            chosen[c] = chosen[c - 1] + 1 if chosen[c - 1] + 1 < n else 0
            continue
        for t in range(L):
            cand[t] = _draw(d2, w, unit, bmass, uniforms[c, t] * total)
            for j in range(d):
                cents[t, j] = x[cand[t], j]
            for j in range(c if prune else 0):
                skip_at_most[t, j] = np.float64(_sq_dist_f32(x, chosen[j], cents[t])) * shrink
        if lanes and parts == 1:
            for b in range(n_blocks):
                _greedy_block_lanes(xt, x, cand, d2, cand_d, w, unit, b, pot, buf)
        elif lanes:
            for p in numba.prange(parts):
                part_buf = np.empty(_KPP_BLOCK, np.float32)
                for b in range(p * n_blocks // parts, (p + 1) * n_blocks // parts):
                    _greedy_block_lanes(xt, x, cand, d2, cand_d, w, unit, b, pot, part_buf)
        elif parts == 1:
            for b in range(n_blocks):
                _greedy_block(x, cents, d2, near, skip_at_most, prune, cand_d, w, unit, b, pot)
        else:
            for p in numba.prange(parts):
                for b in range(p * n_blocks // parts, (p + 1) * n_blocks // parts):
                    _greedy_block(x, cents, d2, near, skip_at_most, prune, cand_d, w, unit, b, pot)
        best = 0
        best_pot = np.inf
        for t in range(L):
            s = 0.0
            for b in range(n_blocks):
                s += pot[t, b]
            if s < best_pot:
                best_pot = s
                best = t
        chosen[c] = cand[best]
        for i in range(n):
            if cand_d[best, i] < d2[i]:
                d2[i] = cand_d[best, i]
                if prune:
                    near[i] = c
        for b in range(n_blocks):
            bmass[b] = _block_mass(d2, w, unit, b * _KPP_BLOCK, min(n, (b + 1) * _KPP_BLOCK))
    return chosen


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def sq_dist_to_point(x, c):
    """‖x_i − c‖² per row in float64 (the coreset sampling proposal); one vectorised pass over the rows."""
    n, d = x.shape
    out = np.empty(n, np.float64)
    for i in range(n):
        acc = 0.0
        for t in range(d):
            diff = np.float64(x[i, t]) - np.float64(c[t])
            acc += diff * diff
        out[i] = acc
    return out


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def sq_dist_to_point_unit(x, c):
    """‖x_i/‖x_i‖ − c‖² per row in float64 without normalising a copy: 1 − 2·x_i·c/‖x_i‖ + ‖c‖², from the
    row's Σx² and Σx·c in one vectorised pass (cos sampling proposal). A zero or non-finite row gives a
    non-finite value, which the caller reports."""
    n, d = x.shape
    cc = 0.0
    for t in range(d):
        cc += np.float64(c[t]) * np.float64(c[t])
    out = np.empty(n, np.float64)
    for i in range(n):
        xx = 0.0
        xc = 0.0
        for t in range(d):
            v = np.float64(x[i, t])
            xx += v * v
            xc += v * np.float64(c[t])
        # clamp at 0: the expanded form can round to -1e-16 for a row pointing at c. Written so that NaN (an
        # inf or NaN entry: inf/inf) passes through: max(0.0, nan) would hide the bad row as a distance of 0.
        r = 1.0 - 2.0 * xc / np.sqrt(xx) + cc if xx > 0.0 else np.nan
        out[i] = 0.0 if r < 0.0 else r
    return out


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def assign_to_candidates(x, x_sqnorms, centroids, c_sqnorms, cand, labels, d1, lo, hi):
    """Rows lo..hi-1: the nearest of each row's candidate centroids ``cand[i]`` (ties to the smaller id), with the
    float32 distance ‖x‖² + ‖c‖² − 2x·c clamped at 0 as the GEMM assignment computes it (the dots are
    reassociated so they vectorise, four candidates per pass over the row). The candidate-restricted E-step of
    :func:`kvant.cluster.lloyd.lloyd`."""
    d = x.shape[1]
    m = cand.shape[1]
    two = np.float32(2.0)
    zero = np.float32(0.0)
    for i in range(lo, hi):
        best = np.float32(np.inf)
        arg = -1
        xi = x_sqnorms[i]
        t = 0
        while t < m:
            q = min(4, m - t)
            j0 = cand[i, t]
            j1 = cand[i, t + 1] if q > 1 else j0
            j2 = cand[i, t + 2] if q > 2 else j0
            j3 = cand[i, t + 3] if q > 3 else j0
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for u in range(d):
                xv = x[i, u]
                a0 += xv * centroids[j0, u]
                a1 += xv * centroids[j1, u]
                a2 += xv * centroids[j2, u]
                a3 += xv * centroids[j3, u]
            for r in range(q):
                j = j0 if r == 0 else (j1 if r == 1 else (j2 if r == 2 else j3))
                a = a0 if r == 0 else (a1 if r == 1 else (a2 if r == 2 else a3))
                v = max(xi + c_sqnorms[j] - two * a, zero)
                if arg < 0 or v < best or (v == best and j < arg):
                    best = v
                    arg = j
            t += q
        labels[i] = arg
        d1[i] = best
