"""The whole Lloyd loop in one compiled call, for inputs whose E-step is one small register-blocked kernel region.

:func:`kvant.cluster.lloyd.lloyd` drives its iterations from Python: an E-step, an M-step and the bookkeeping of
Hamerly's bounds and over-relaxation cost some twenty NumPy and Numba calls, ~0.1 ms per iteration. On a small
input that is most of the fit: digits (1,797 × 64) at K = 10 spent 1.0 of Lloyd's 1.2 ms in that overhead, its
E-steps 0.05 ms each. :func:`lloyd_small` runs the same algorithm — the same M-step, empty-cluster re-seeding,
safeguarded over-relaxation and tolerance, in the same order (see the ``lloyd`` module docstring) — without
leaving compiled code. Every E-step re-assigns every row (the fused kernel of
:func:`kvant.kernels.direct_assign.direct_top2` over row blocks on Numba's threads): at these sizes a full E-step
costs less than tightening and gathering Hamerly's candidates did. The labels, objectives and centres are those
of ``lloyd`` up to float32 rounding of near-tied distances (Hamerly's bounds carry a slack that can keep a row on
a centre a rounding away from another; the tests compare both on random data).

Re-seeding (:func:`kvant.kernels.lloyd.reseed_empty`) is shared with ``lloyd``: the rows farthest from their centres
move to the empty clusters (by exact distances here, by Hamerly's upper bounds there).
"""

from __future__ import annotations

import numba
import numpy as np

from .direct_assign import direct_top2, fill_operands
from .distance import sq_norms_serial
from .lloyd import _to_unit, cluster_sums, m_step, move_rows, reseed_empty
from .row_lanes import LANES, fill_centres, group_size, tile_top2, transpose_tiles
from .row_lanes import padded_k as padded_lanes_k

_JIT = dict(cache=True, nogil=True, fastmath=False)


@numba.njit(**_JIT)
def tolerance_scale(obj, total_w, spherical):
    """What ``tol`` is a fraction of, for an objective ``obj`` over rows of total weight ``total_w``: the objective
    itself for l2 (the MSE callers read); for spherical the smaller of Σ w·cos and the objective Σ w·(1 − cos).
    Σ w·cos alone stopped 4× later than the objective at a mean cosine of 0.2, but far too early near 1: at 0.984
    (SIFT-like rows, K = 512) a step was "little" once it gained under ~3% of 1 − cos, and training ended after 2
    steps, 0.3-0.5% worse in 1 − cos than FAISS (a review). Shared by every loop that stops on ``tol``."""
    if spherical:
        return min(total_w - obj, obj)
    return obj


@numba.njit(**_JIT)
def step_decision(obj, prev_obj, counts, spherical, tol, beta, overrelax, have_prev, reseeded, last):
    """The over-relaxation and stopping decision after an M-step with objective ``obj``, shared by both Lloyd loops:
    returns (rejected, converged, β for the next E-step) — see the ``lloyd`` module docstring.

    The tolerance is relative to :func:`tolerance_scale`: the MSE for l2; for spherical the smaller of Σ w·cos and
    Σ w·(1 − cos). Only a plain step (β = 0: the E-step used the means) may end the run, and not one
    that re-seeded (a jump: see where it lands); an extrapolated step that raised the objective is rejected (the next
    E-step goes back to the last accepted means, β = 0). Otherwise β grows by 0.5 up to ``overrelax`` after a clearly
    improving step with no re-seed, never for the ``last`` E-step, so the returned centres are always means."""
    total_w = 0.0
    for j in range(counts.shape[0]):
        total_w += counts[j]
    scale = tolerance_scale(obj, total_w, spherical)
    little = prev_obj < np.inf and (prev_obj - obj) <= tol * max(abs(scale), 1e-30)
    rejected = beta > 0.0 and obj > prev_obj
    converged = little and beta == 0.0 and reseeded == 0
    if rejected:
        return True, converged, 0.0
    grow = overrelax > 0.0 and have_prev and not little and reseeded == 0 and not last
    return False, converged, min(overrelax, beta + 0.5) if grow else 0.0


@numba.njit(**_JIT)
def extrapolate(means, prev, beta, spherical):
    """means + β·(means − prev) in float32, unit rows for spherical: the over-relaxed centres."""
    out = np.empty_like(means)
    b = np.float32(beta)
    for j in range(means.shape[0]):
        for t in range(means.shape[1]):
            out[j, t] = means[j, t] + b * (means[j, t] - prev[j, t])
        if spherical:
            _to_unit(out, j)
    return out


@numba.njit(**_JIT)
def _count_rows(labels, k):
    rows_in = np.zeros(k, np.int64)
    for i in range(labels.shape[0]):
        rows_in[labels[i]] += 1
    return rows_in


@numba.njit(**_JIT)
def _clear_empty(rows_in, sums, counts):
    """Zero the sums of clusters with no rows: incremental float updates can leave a ~1e-12 residue behind."""
    for j in range(rows_in.shape[0]):
        if rows_in[j] == 0:
            counts[j] = 0.0
            for t in range(sums.shape[1]):
                sums[j, t] = 0.0


@numba.njit(**_JIT)
def _apply_moves(x, labels, lab_new, sums, counts, w):
    """Move the sums of rows whose label changed (in row order, as ``lloyd`` does) and take the new labels."""
    moved = 0
    for i in range(labels.shape[0]):
        if lab_new[i] != labels[i]:
            moved += 1
    if moved:
        rows = np.empty(moved, np.int64)
        old = np.empty(moved, np.int64)
        new = np.empty(moved, np.int64)
        m = 0
        for i in range(labels.shape[0]):
            if lab_new[i] != labels[i]:
                rows[m], old[m], new[m] = i, labels[i], lab_new[i]
                m += 1
        move_rows(x, rows, old, new, sums, counts, w)
    for i in range(labels.shape[0]):
        labels[i] = lab_new[i]


@numba.njit(**_JIT)
def _same(a, b):
    for j in range(a.shape[0]):
        for t in range(a.shape[1]):
            if a[j, t] != b[j, t]:
                return False
    return True


@numba.njit(**_JIT)
def _fill_centres(c, lanes, cp, cnl, ct, cnp):
    """The E-step's centre operands for centres ``c``: ``cp, cnl`` with rows in the lanes, else ``ct, cnp``."""
    if lanes:
        fill_centres(c, sq_norms_serial(c), cp, cnl)
    else:
        fill_operands(c, sq_norms_serial(c), ct, cnp)


@numba.njit(**_JIT)
def _e_step_block(b, lanes, x, xn, xt, xnp, cp, cnl, g_count, ct, cnp, per_block, labels, d1, d2):
    """Block ``b`` of a full E-step: ``per_block`` tiles of 16 rows with rows in the lanes (``xt, xnp``: the rows as
    tiles and their norms; ``g_count`` centres per pass), else ``per_block`` rows through the direct kernel. The same
    outputs either way. (The ``prange`` over blocks stays in :func:`lloyd_small`: a jitted function may not call a
    ``parallel=True`` one, numba#8578, and one inlined into it did not become a parallel loop.)"""
    n = x.shape[0]
    if lanes:
        nt = xt.shape[0]
        tile_top2(xt, b * per_block, min(nt, (b + 1) * per_block), n, cp, cnl, g_count, xnp, labels, d1, d2)
    else:
        s = b * per_block
        e = min(n, s + per_block)
        direct_top2(x[s:e], ct, cnp, xn[s:e], labels[s:e], d1[s:e], d2[s:e])


@numba.njit(parallel=True, **_JIT)
def lloyd_small(x, xn, c0, w, max_iter, tol, spherical, overrelax, x_total, n_parts, block_rows, history, dist, ct,
                cnp, lanes=False):
    """Lloyd iterations from centres ``c0`` on rows ``x`` (float32, C-contiguous; unit rows when ``spherical``) with
    squared norms ``xn``, row weights ``w`` (empty: unit weights), as :func:`kvant.cluster.lloyd.lloyd` runs them with
    ``candidates`` = 0 (module docstring). ``n_parts``: :func:`cluster_sums`'s split (lloyd passes the thread count);
    ``block_rows``: rows per E-step block; ``ct, cnp``: buffers of the direct kernel's centre operands
    (:func:`kvant.kernels.direct_assign.centre_operands` of ``c0``, refilled in place); ``lanes``: E-steps with rows
    in the vector lanes
    (:func:`kvant.kernels.row_lanes.tile_top2`; bit for bit the direct kernel's with centres in the lanes, and
    within float32 rounding of it with coordinates in the lanes) rather than centres. Writes the objective
    of the first ``len(history)`` M-steps into ``history`` and each row's distance to its centre into ``dist``;
    returns (centres, labels, d1, d2, iterations, re-seeded clusters, extrapolated E-steps, rejected ones, rows
    assigned). The labels are the last
    E-step's: the nearest centres of the returned ones up to float32 rounding, as with ``lloyd``; d1 and d2 its two
    smallest float32 squared distances per row (what :func:`kvant.kernels.assign.certify_top2` needs)."""
    n = x.shape[0]
    k = c0.shape[0]
    labels = np.empty(n, np.int64)
    lab_new = np.empty(n, np.int64)
    d1 = np.empty(n, np.float32)
    d2 = np.empty(n, np.float32)
    no_lower = np.empty(0, np.float32)
    c = c0
    # rows in lanes (row_lanes): the rows transposed once, tiles of them per block
    xt = transpose_tiles(x) if lanes else np.empty((0, 0, LANES), np.float32)
    xnp = np.zeros(xt.shape[0] * LANES, np.float32)
    if lanes:
        xnp[:n] = xn
    cp = np.empty((padded_lanes_k(k) if lanes else 0, x.shape[1]), np.float32)
    cnl = np.empty(cp.shape[0], np.float32)
    g_count = group_size(k)
    per_block = max(1, block_rows // LANES) if lanes else block_rows  # tiles or rows per E-step block
    n_e_blocks = ((xt.shape[0] if lanes else n) + per_block - 1) // per_block
    _fill_centres(c, lanes, cp, cnl, ct, cnp)
    for b in numba.prange(n_e_blocks):
        _e_step_block(b, lanes, x, xn, xt, xnp, cp, cnl, g_count, ct, cnp, per_block, labels, d1, d2)
    assigned = n
    for i in range(n):
        dist[i] = np.sqrt(d1[i])
    sums, counts = cluster_sums(x, labels, k, n_parts, w)
    prev_obj = np.inf
    prev_means = c0
    have_prev = False
    beta = 0.0
    n_iter = 0
    n_reseeded = 0
    n_extrapolated = 0
    n_rejected = 0
    for it in range(max_iter):
        rows_in = _count_rows(labels, k)
        _clear_empty(rows_in, sums, counts)
        reseeded = reseed_empty(x, labels, dist, no_lower, sums, counts, w, rows_in)
        n_reseeded += reseeded
        means = np.empty_like(c)
        obj = m_step(sums, counts, c, spherical, x_total, means)
        if it < history.shape[0]:
            history[it] = obj
        n_iter = it + 1
        rejected, converged, beta = step_decision(obj, prev_obj, counts, spherical, tol, beta, overrelax,
                                                          have_prev, reseeded, it + 1 == max_iter)
        if rejected:
            n_rejected += 1
            new_c = prev_means
        else:
            new_c = means
            if beta > 0.0:
                new_c = extrapolate(means, prev_means, beta, spherical)
                n_extrapolated += 1
            prev_means = means
            prev_obj = obj
            have_prev = True
        unmoved = _same(new_c, c)
        c = new_c
        if unmoved and beta == 0.0 and reseeded == 0:
            break  # the labels are already the nearest centres of c
        _fill_centres(c, lanes, cp, cnl, ct, cnp)
        for b in numba.prange(n_e_blocks):
            _e_step_block(b, lanes, x, xn, xt, xnp, cp, cnl, g_count, ct, cnp, per_block, lab_new, d1, d2)
        assigned += n
        _apply_moves(x, labels, lab_new, sums, counts, w)
        for i in range(n):
            dist[i] = np.sqrt(d1[i])
        if converged:
            break
    return c, labels, d1, d2, n_iter, n_reseeded, n_extrapolated, n_rejected, assigned
