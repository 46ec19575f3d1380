"""Lloyd's k-means with Hamerly bounds on in-memory float32 rows.

Each iteration is exact Lloyd: every row ends assigned to its nearest centroid (up to float32 rounding,
as in FAISS and scikit-learn; exactly, with K >= ``AMX_MIN_K`` and K·D >= ``AMX_MIN_KD`` on AMX hosts and with
K >= ``I16_E_STEP_MIN_K`` on AVX2 ones: :func:`kvant.cluster.assign.e_step`). Hamerly's bounds make that cheap once
the centroids settle: each row keeps an upper bound on the distance to its centroid and a lower bound on the distance
to every other one (the runner-up distance from the fused top-2 kernel, or the certified lower bound of the AMX or
int16 path). After the centroids move by
``delta``, only rows whose bounds cross are looked at: first their upper bound is made exact (O(D)), and only rows
that still cross are gathered and re-assigned with the GEMM kernel. When more than half the rows cross their bounds
(most over-relaxed steps do: the centres move far), that tightening and gathering cost more than they save, so the
E-step re-assigns every row in contiguous blocks instead (``DENSE_E_STEP``; 7-19% off `auto`'s fit time on the
K = 64 and 256 benchmark cells, identical results). Centroid sums are updated incrementally (float64) for the
rows that changed cluster.

Optional safeguarded over-relaxation (``overrelax`` = β_max > 0): after an iteration that lowered the
objective, the next E-step assigns to centres pushed past the new means along their last move,
c = μ_t + β(μ_t − μ_{t−1}) (re-normalised for spherical), with β growing 0.5, 1.0, … up to β_max over
consecutive successes. If an extrapolated step raises the objective it is rejected: the next E-step goes back
to the last accepted means (a plain Lloyd step from the accepted partition, so the accepted objectives never
rise) and β restarts from 0. Plain Lloyd creeps along slowly-converging directions (overlapping clusters,
spherical k-means in high dimension); the extrapolation covers that ground in fewer iterations and, measured
on this project's grid, reaches lower objectives in the same iteration budget (docs/auto.md). Only a plain
step can end the run by the tolerance, centres of re-seeded clusters are never extrapolated, and the last
E-step (at ``max_iter``) always uses accepted means, so the returned centroids are the means of an accepted
partition and the labels their exact nearest-centre assignment. The objective history records every M-step,
rejected ones included; its minimum is the objective of the partition the returned centres come from.

Optional candidate E-steps (``candidates`` = m > 0, used by ``auto`` when K·D is large): from the third E-step
on, a full dense E-step also records m candidate centres per row (m <= 16: the m smallest among each of 16
column classes' two nearest, :func:`kvant.kernels.assign.candidate_ids_from_ip`; larger m: the exact m nearest),
and the next two E-steps compare each row only with those m (a (rows × m) gathered product instead of a
(rows × K) GEMM). The row's current centre is
always a candidate, so no row's cost rises; a row whose nearest centre left its list keeps a slightly worse one
until the next full E-step. These steps are not exact, so they drop the Hamerly bounds, and the last E-step
(at ``max_iter`` or on convergence) is always a full one: the returned labels stay the exact assignment.

Empty clusters are re-seeded with the rows farthest from their centroids (by upper bound, ties to the
lower row index; copies of a row already taken and rows on their centre are skipped), each taken from a
cluster that keeps at least one row; the row moves to the new cluster, which then starts at that row. A step
that re-seeded does not end the run by the tolerance.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from .._config import get_num_threads, rng
from .._parallel import SPINNING_LAYERS, for_each_block, numba_threading_layer
from ..kernels import direct_assign
from ..kernels.distance import normalise_rows_into, sq_norms64_serial, sq_norms_serial
from ..kernels.lloyd import (
    UNIT_WEIGHTS,
    assign_to_candidates,
    centre_moves,
    cluster_sums,
    exact_dist_to,
    kmeanspp,
    kmeanspp_greedy,
    loosen_bounds,
    m_step,
    move_rows,
    reseed_empty,
    unit_centres,
)
from ..kernels.lloyd_small import extrapolate, lloyd_small, step_decision
from .assign import (
    _DIRECT_MIN_ROWS,
    CERTIFIED_E_STEP_MIN_ROWS,
    block_rows_for,
    direct_e_step_fits,
    e_step,
    zero_norm_error,
)
from .neighbours import NeighbourFinal, NeighbourSteps

# Widen the "row may have changed" test by this relative slack so that float32 rounding in the GEMM
# distances can never let a row keep a stale label.
_BOUND_SLACK = 1e-4

# Small inputs run Lloyd as one compiled loop (small_lloyd_applies, kvant.kernels.lloyd_small), which records the
# objectives of its first HISTORY_CAP M-steps.
SMALL_LLOYD = True
HISTORY_CAP = 1 << 16
# ... on up to SMALL_LLOYD_MAX_WORK row × centre × coordinate products per E-step: twice the one-region limit of a
# lone E-step (assign._ONE_REGION_MAX_WORK, set against Numba's spinning threads slowing the BLAS work that follows),
# since under 8,192 rows nothing but the loop's own regions follows. Whole auto fits, same process, Intel host without
# AMX (2026-12-07; same objectives): digits K = 1,024 21.7 → 16.7 ms l2, 23.6 → 18.1 cos (1.8·2²⁶ products); 8,000 ×
# 64 K = 256 14.7 → 11.7 / 17.0 → 11.6 ms; 8,000 × 16 K = 1,024 43.3 → 29.4 / 45.4 → 32.9 ms (2·2²⁶ each). Beyond
# (2²⁸-2³⁰ on 8,000 × 128 K = 512, 4,000 × 256 K = 1,024, 6,000 × 32 K = 2,048) it read 0.9-1.05x, within noise.
SMALL_LLOYD_MAX_WORK = 1 << 27
# ... whose E-steps put rows in the vector lanes on AVX-512 hosts when K <= ROW_LANES_MAX_K (kvant.kernels.row_lanes;
# the same outputs). Digits (1,797 × 64) E-steps on one thread, Zen 4 host (2026-12-05), direct kernel → rows in
# lanes: K = 4 48 → 13 µs, K = 10 48 → 25, K = 20 97 → 49, K = 32 97 → 72, K = 64 153 → 142. Whole digits fits
# (medians of 6 × 300, same process): K = 10 l2 776 → 726 µs, cos 762 → 724, K = 20 1,489 → 1,252, K = 32 2,360 →
# 2,231; but K = 64 l2 2,955 → 3,270 and cos 2,502 → 2,553, so larger K keep the direct kernel. On AVX2 the 16-lane
# accumulators would take two registers each (sixteen for eight centres: spills): the direct kernel (not measured).
ROW_LANES = direct_assign.AVX512
ROW_LANES_MAX_K = 32
# The transposed copy of the rows it needs is kept small: the compiled loop takes up to 2²⁶ products, so at K = 1 or
# 2 its rows may be a few hundred MB.
ROW_LANES_MAX_BYTES = 32 << 20
# Where the direct kernel puts coordinates in the lanes (direct_assign.coord_lanes: K <= 14, 17-28) its E-steps cost as
# much as rows in the lanes, without the transposed copy (1.8 ms for a 7.9 MB sample: fresh pages): whole fits, same
# process, Zen 4 (2026-12-06), rows in lanes → coordinates in lanes: Fashion-MNIST K = 10 l2 36.9 → 34.0 ms, cos 35.0
# → 32.1; but digits (460 kB) K = 10 0.764 → 0.774 ms, K = 20 1.118 → 1.286. So with coordinate lanes only rows up to
# ROW_LANES_COORD_MAX_BYTES are transposed.
ROW_LANES_COORD_MAX_BYTES = 1 << 20

# When more than this fraction of rows cross their Hamerly bounds, the E-step skips the bound tightening and
# re-assigns every row (see lloyd).
DENSE_E_STEP = 0.5

# E-steps by the centres' neighbour lists where rows have few coordinates (kvant.cluster.neighbours decides where).
NEIGHBOUR_E_STEPS = True

# Candidate E-steps (``candidates`` = m > 0): from the CANDIDATE_FULL_FIRST-th E-step on, each full dense E-step
# also records m candidate centres per row, and the next CANDIDATE_REFRESH - 1 E-steps look only at those.
CANDIDATE_FULL_FIRST = 3
CANDIDATE_REFRESH = 3


@dataclass
class LloydResult:
    centroids: np.ndarray  # (k, d) float32
    labels: np.ndarray  # (n,) int64, nearest centroid of each row for the returned centroids
    objective_history: list[float] = field(default_factory=list)  # (the first HISTORY_CAP on the small path)
    n_iter: int = 0
    n_reseeded: int = 0
    rows_recomputed: int = 0
    n_extrapolated: int = 0  # E-steps on over-relaxed centres
    n_rejected: int = 0  # of which raised the objective (followed by a plain step)
    n_candidate_steps: int = 0  # E-steps restricted to each row's candidate centres
    # The compiled loop's last E-step (all rows, on the returned centroids): each row's two smallest float32 squared
    # distances, from which kernels.assign.certify_top2 makes the labels exact. None from the Python loop.
    last_d1: np.ndarray | None = None
    last_d2: np.ndarray | None = None
    # lloyd(keep_top2=True): the last E-step assigned every row to the returned centroids on a certified backend
    # (kvant.cluster.assign.CertifiedCentres), so the labels are the exact nearest centres already (ties to the smaller
    # id)
    labels_certified: bool = False
    # the E-steps ran on the centres' neighbour lists until the end (kvant.cluster.neighbours): they paid on these rows;
    # neighbour_judged: a probe judged them (False where they did not apply, or on the compiled small loop)
    neighbour_lists: bool = False
    neighbour_judged: bool = False


# k-means++ costs O(m·K·D) sequentially in K; seeding on a uniform subsample of this many rows per centre
# keeps it far below one Lloyd iteration on the training sample while keeping D² seeding's spread.
INIT_ROWS_PER_CENTROID = 8
# k-means++ seeding runs on every thread, one parallel region per step, when each step covers at least
# KPP_PARALLEL_MIN_STEP coordinates (seeding rows × D: below it the region costs more than it saves; 512×64 and 512×32
# took 1.18-1.37× the serial time, 512×128 0.91×) and the whole seeding at least KPP_PARALLEL_MIN_WORK (rows × D × K,
# ~10 ms serial): the first Lloyd passes after the region share the cores with its still-spinning threads, a cost of
# 0.5-2 ms that a short seeding does not repay (whole fits: digits K=256, 29M, 1.04-1.14×; digits K=1024, 118M, even:
# seeding 10.4 → 8.1 ms, E-steps 8.3 → 8.9 ms). Seeding alone on the Intel AMX host, 2 threads (2026-12-04): 0.35× at
# 8,192×128 K=1024, 0.48-0.69× on Fashion-MNIST K=256/1024; whole fits in docs/auto.md.
KPP_PARALLEL_MIN_STEP = 1 << 16
KPP_PARALLEL_MIN_WORK = 1 << 27


def init_centroids(
    x: np.ndarray, k: int, method: str, seed: int | None, spherical: bool = False, weights: np.ndarray | None = None,
    seed_rows: int | None = None, trials: int = 1,
) -> np.ndarray:
    """Initial centroids: ``"k-means++"`` (D² seeding on a subsample of ``seed_rows`` rows, default
    ``INIT_ROWS_PER_CENTROID·k``; greedy, the best of ``trials`` draws per centre, when ``trials`` > 1:
    :func:`kvant.kernels.lloyd.kmeanspp_greedy`) or ``"random"`` (k distinct rows, as FAISS does).

    With ``weights`` (rows of a weighted sample, each standing for ``w`` rows of the data) the random rows
    are drawn with probability ∝ w and k-means++ samples ∝ w·D², so both act as on the data itself.
    """
    n = x.shape[0]
    g = rng(seed)
    if method == "random":
        p = None if weights is None else weights / weights.sum()
        rows = np.sort(g.choice(n, size=k, replace=False, p=p))
    elif method == "k-means++":
        m = min(n, max(k, INIT_ROWS_PER_CENTROID * k if seed_rows is None else int(seed_rows)))
        sub = np.sort(g.choice(n, size=m, replace=False)) if m < n else np.arange(n)
        uniforms = g.random(k) if trials <= 1 else g.random((k, int(trials)))
        w = UNIT_WEIGHTS if weights is None else np.ascontiguousarray(weights[sub], np.float64)
        first = int(g.integers(m)) if weights is None else int(g.choice(m, p=w / w.sum()))
        # the main thread only (a parallel region entered from several threads at once, Dask's workers say, is not
        # safe on every threading layer), and on a layer whose threads spin between regions (numba_threading_layer)
        step = m * x.shape[1] * max(1, int(trials))  # coordinates a step reads (once per greedy draw)
        big = (step >= KPP_PARALLEL_MIN_STEP and step * k >= KPP_PARALLEL_MIN_WORK
               and threading.current_thread() is threading.main_thread() and numba_threading_layer() in SPINNING_LAYERS)
        parts = get_num_threads() if big else 1
        seeding = kmeanspp if trials <= 1 else kmeanspp_greedy
        rows = sub[seeding(np.ascontiguousarray(x[sub], np.float32), k, uniforms, first, w, n_parts=parts)]
    else:  # pragma: no cover - validated by the caller
        raise ValueError(method)
    c = np.ascontiguousarray(x[rows], dtype=np.float32)
    return _normalise(c) if spherical else c


def normalise_rows(block: np.ndarray, start: int = 0, in_place: bool = False) -> np.ndarray:
    """Unit-normalise data rows for spherical k-means; a zero row has no direction and is rejected.

    ``in_place``: overwrite ``block`` (float32, C-contiguous, owned by the caller) instead of writing a new array: a
    fresh array page-faults its way in on this project's VM, and normalising a gathered sample into one took
    about as long as gathering it.

    (Centroids go through :func:`_normalise`, which leaves an all-zero centre as it is instead.)
    """
    x = np.ascontiguousarray(block, dtype=np.float32)
    out = x if in_place and x is block else np.empty_like(x)
    zero = []

    def run(a, b):
        r = normalise_rows_into(x[a:b], out[a:b])
        if r >= 0:
            zero.append(a + r)

    for_each_block(x.shape[0], 16384, run, work=x.size)
    if zero:
        raise zero_norm_error(min(zero) + start)
    return out


def _normalise(c: np.ndarray) -> np.ndarray:
    return unit_centres(np.ascontiguousarray(c, np.float32))


def _centroids_from_sums(sums, counts, old, spherical):
    """Lloyd's M-step means (:func:`kvant.kernels.lloyd.m_step`): old rows for empty clusters."""
    means = np.empty(old.shape, np.float32)
    m_step(np.ascontiguousarray(sums, np.float64), np.ascontiguousarray(counts, np.float64),
           np.ascontiguousarray(old, np.float32), spherical, 0.0, means)
    return means


def lloyd(
    x: np.ndarray,
    centroids: np.ndarray,
    max_iter: int,
    tol: float,
    spherical: bool = False,
    x_sqnorms: np.ndarray | None = None,
    on_iter=None,
    weights: np.ndarray | None = None,
    overrelax: float = 0.0,
    candidates: int = 0,
    last_e_step: bool = True,
    keep_top2: bool = False,
) -> LloydResult:
    """Run Lloyd iterations from ``centroids`` on rows ``x`` (unit rows when ``spherical``).

    Stops after ``max_iter`` M-steps or when the objective improves by less than ``tol`` (relative).
    The returned labels are the exact nearest centroids for the returned centroids. ``on_iter(objective)``,
    if given, is called after every M-step (progress reporting). ``weights`` (n,) > 0 makes it weighted
    k-means (centres are weighted means, the objective Σ w‖x − c‖²): a row of weight 2 acts as two copies.
    ``overrelax`` > 0 turns on the safeguarded over-relaxation described in the module docstring (its β_max);
    the objective history may then rise at a rejected step (compare runs by its minimum). ``candidates`` > 0
    (and < K) turns on the candidate E-steps described in the module docstring. ``last_e_step=False`` skips the
    E-step after the last M-step (the caller assigns every row to the returned centroids itself, as polish passes do):
    the returned labels are then those of the previous centroids. ``keep_top2`` asks for a last E-step whose labels
    can stand as the final assignment: it re-assigns every row rather than only those whose Hamerly bounds cross, and
    returns its float32 top-2 distances (``last_d1``/``last_d2``, for :func:`kvant.kernels.assign.certify_top2`) when it
    ran on the float32 kernels, or sets ``labels_certified`` when it ran on a certified backend (exact labels already;
    its ``d2`` is only a lower bound).
    """
    n, d = x.shape
    k = centroids.shape[0]
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if x_sqnorms is None:
        xn, xn64 = _row_sq_norms(x)
    else:
        xn, xn64 = x_sqnorms, x_sqnorms
    w = UNIT_WEIGHTS if weights is None else np.ascontiguousarray(weights, np.float64)
    x_total = _weighted_total(xn64, weights)
    m_cand = int(candidates) if 0 < candidates < k else 0
    keep_top2 = keep_top2 and last_e_step
    if SMALL_LLOYD and m_cand == 0 and small_lloyd_applies(n, d, k) and x.dtype == np.float32 and x.flags.c_contiguous:
        return _lloyd_small(x, xn, c, w, max_iter, tol, spherical, on_iter, overrelax, x_total)
    labels = np.empty(n, np.int64)
    d1 = np.empty(n, np.float32)
    d2 = np.empty(n, np.float32)
    # the last E-step over every row, while the centres are still the ones it saw: "float32" (d1/d2 are every row's
    # float32 top-2) or "certified" (exact labels); None after centres moved or a partial / candidate E-step
    full_step = "float32" if e_step(x, c, labels, d1, d2, xn) else "certified"
    upper = np.sqrt(d1)
    lower = np.sqrt(d2)
    sums, counts = cluster_sums(x, labels, k, max(1, get_num_threads()), w)
    result = LloydResult(c, labels)
    prev_obj = np.inf
    block = 65536
    near = np.empty((n, m_cand), np.int32) if m_cand else None  # each row's candidate centres
    cand_left = 0  # candidate E-steps left before the next full one
    labels_exact = True  # the last E-step was a full one (its labels are the exact nearest centres)
    # neighbour-list E-steps (None: the full E-step throughout); they take the E-steps' previous labels as the start
    neigh = None
    use_neigh = NEIGHBOUR_E_STEPS and m_cand == 0 and NeighbourSteps.applies(n, d, k)
    prev_means = None
    beta = 0.0  # extrapolation of the centres the last E-step used (0: plain Lloyd)
    for it in range(max_iter):
        # M-step (with re-seeding of empty clusters).
        # Emptiness by rows, not weight: incremental float updates can leave a ~1e-12 residue behind.
        rows_in = np.bincount(labels, minlength=k)
        if not rows_in.all():
            sums[rows_in == 0] = 0.0
            counts[rows_in == 0] = 0.0
        reseeded = _reseed_empty(x, labels, upper, lower, sums, counts, w, rows_in)
        if reseeded:
            cand_left = 0  # a re-seeded row's new centre is not among its candidates: the next E-step is full
        result.n_reseeded += reseeded
        means = np.empty_like(c)
        obj = m_step(sums, counts, c, spherical, x_total, means)
        result.objective_history.append(obj)
        result.n_iter = it + 1
        if on_iter is not None:
            on_iter(obj)
        rejected, converged, beta = step_decision(obj, prev_obj, counts, spherical, tol, beta, overrelax,
                                                          prev_means is not None, reseeded, it + 1 == max_iter)
        if rejected:
            result.n_rejected += 1
            new_c = prev_means
        else:
            new_c = means
            if beta > 0:
                new_c = extrapolate(means, prev_means, beta, spherical)
                result.n_extrapolated += 1
            prev_means, prev_obj = means, obj
        delta = np.empty(k, np.float32)
        max_delta, argmax_delta, second_delta = centre_moves(new_c, c, delta)
        if reseeded or not np.array_equal(new_c, c):  # (until an E-step over every row below)
            full_step = None
        c = new_c
        if not last_e_step and (converged or it + 1 == max_iter):
            break  # (its labels are the last E-step's, for the previous centroids)
        # E-step with Hamerly bounds: only rows whose bounds cross are looked at.
        if max_delta == 0.0 and beta == 0.0 and not reseeded and labels_exact:
            # (d1/d2, if still every row's top-2, are for these same centres)
            break  # (a re-seed changed labels, and a candidate step's labels are not exact: both need the E-step)
        if cand_left > 0 and not converged and it + 1 < max_iter and max_delta > 0.0:
            # Candidate E-step: each row's nearest among the m centres nearest to it at the last full E-step
            # (its current centre is one of them, so no row's cost rises). Not exact: the bounds are dropped
            # (lower = 0 sends every row through the next full E-step), and the last E-step is always full.
            cand_left -= 1
            labels_exact = False
            result.n_candidate_steps += 1
            lab_new = np.empty(n, np.int64)
            _candidate_e_step(x, xn, c, sq_norms_serial(c), near, lab_new, d1)
            moved = np.flatnonzero(lab_new != labels)
            if moved.size:
                move_rows(x, moved, labels[moved], lab_new[moved], sums, counts, w)
            labels = lab_new
            np.sqrt(d1, out=upper)
            lower[:] = 0.0
            full_step = None
            continue
        lower *= 1.0 - _BOUND_SLACK
        parts = [loosen_bounds(labels, upper, lower, delta, max_delta, argmax_delta, second_delta, s, min(n, s + block))
                 for s in range(0, n, block)]
        cand = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, np.int64)
        last = converged or it + 1 == max_iter
        # (a last E-step whose labels would stand as the final assignment is a full one, unless the final pass takes
        # the lists itself, 1-3 coordinates: kvant.cluster.clusterer then assigns every row again on them)
        full_last = keep_top2 and last and not NeighbourFinal.applies(n, d, k, spherical)
        if use_neigh and not full_last:
            if neigh is None:
                neigh = NeighbourSteps(c)
                use_neigh = neigh.probe(x, c, labels)
            else:
                neigh.update(c)
                use_neigh = neigh.worthwhile()
        steps = neigh if use_neigh and not full_last else None
        if cand.size > DENSE_E_STEP * n or not labels_exact or (keep_top2 and last):
            # Most bounds crossed (typical of over-relaxed steps): tightening them row by row and gathering the
            # survivors costs more than it saves, so re-assign every row with contiguous GEMM blocks. (Always
            # after a candidate step, whose labels need not be the nearest centres.)
            result.rows_recomputed += n
            lab_new = np.empty(n, np.int64)
            # (no candidate ids for an E-step after which the loop ends)
            record = m_cand > 0 and it + 2 >= CANDIDATE_FULL_FIRST and it + 2 < max_iter and not last
            if steps is not None:
                _neighbour_e_step(steps, x, c, xn, None, labels, lab_new, d1, d2)
                full_step = None  # (d1/d2 are not the float32 kernel's, which certify_top2 expects)
            else:
                float32 = e_step(x, c, lab_new, d1, d2, xn, nearest=near if record else None)
                full_step = "float32" if float32 else "certified"
            cand_left = CANDIDATE_REFRESH - 1 if record else 0
            labels_exact = True
            moved = np.flatnonzero(lab_new != labels)
            if moved.size:
                move_rows(x, moved, labels[moved], lab_new[moved], sums, counts, w)
            labels = lab_new
            np.sqrt(d1, out=upper)
            np.sqrt(d2, out=lower)
            cand = cand[:0]
        if cand.size:
            upper[cand] = exact_dist_to(x, cand, c, labels) * np.float32(1.0 + _BOUND_SLACK)
            cand = cand[upper[cand] >= lower[cand]]
        if cand.size:
            full_step = None  # (these rows' labels and distances now come from another E-step)
            result.rows_recomputed += int(cand.size)
            lab_new = np.empty(cand.size, np.int64)
            e1 = np.empty(cand.size, np.float32)
            e2 = np.empty(cand.size, np.float32)
            if steps is not None:
                _neighbour_e_step(steps, x, c, xn, cand, labels[cand], lab_new, e1, e2)
            else:
                e_step(x, c, lab_new, e1, e2, xn[cand], rows=cand)
            old = labels[cand]
            moved = lab_new != old
            if moved.any():
                move_rows(x, cand[moved], old[moved], lab_new[moved], sums, counts, w)
            labels[cand] = lab_new
            upper[cand] = np.sqrt(e1)
            lower[cand] = np.sqrt(e2)
        if converged:  # labels are exact for the current centroids after the E-step above
            break
    result.centroids = c
    result.labels = labels
    result.neighbour_lists = neigh is not None and use_neigh
    result.neighbour_judged = neigh is not None
    if keep_top2 and full_step == "float32":
        result.last_d1, result.last_d2 = d1, d2
    result.labels_certified = keep_top2 and full_step == "certified"
    return result


def _neighbour_e_step(steps, x, c, xn, rows, start, labels, d1, d2) -> None:
    """The E-step of the listed rows (all when ``rows`` is None) by ``steps``' neighbour lists from their previous
    centres ``start``, and by the full E-step for the rows those cannot settle."""
    left = steps.assign(x, c, rows, start, labels, d1, d2)
    if left.size:
        where = left if rows is None else rows[left]
        lab = np.empty(left.size, np.int64)
        e1 = np.empty(left.size, np.float32)
        e2 = np.empty(left.size, np.float32)
        e_step(x, c, lab, e1, e2, xn[where], rows=where)
        labels[left] = lab
        d1[left] = e1
        d2[left] = e2


# Lloyd's passes run on Python threads (for_each_block). A parallel Numba region or a multithreaded BLAS call between
# them leaves that pool's threads spinning for milliseconds afterwards on the same two cores: one parallel sq_norms
# and one np.dot (OpenBLAS ddot) per fit doubled the E-steps that followed (2.6 → 4.8 ms at 16k×128, K=64). So the
# row norms and the weighted total stay on the same threads / in NumPy.
def _row_sq_norms(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ‖x‖² as the float64 sum and as that sum rounded to float32 (what the kernels take). The objective
    Σw‖x‖² − Σ‖S_j‖²/W_j is taken from the float64 ones: from the float32 ones it kept their rounding, up to 2⁻²⁴ of
    Σ‖x‖², which on rows far from the origin exceeded the objective (a review: a history of −70.5 where the inertia
    was 40, and Lloyd stopping early on the noise)."""
    out = np.empty(x.shape[0], np.float32)
    out64 = np.empty(x.shape[0], np.float64)

    def run(s: int, e: int) -> None:
        out64[s:e] = sq_norms64_serial(x[s:e])
        with np.errstate(over="ignore"):  # (beyond float32: inf, as the float32 kernel stored it)
            out[s:e] = out64[s:e]

    for_each_block(x.shape[0], 65536, run, work=x.size)
    return out, out64


def _weighted_total(xn: np.ndarray, weights: np.ndarray | None) -> float:
    """Σ w·‖x‖² in float64 (Σ ‖x‖² without weights), without a BLAS call."""
    return float(xn.sum(dtype=np.float64) if weights is None else (weights * xn.astype(np.float64)).sum())


def _candidate_e_step(x, xn, c, cn, near, labels, d1) -> None:
    """Each row's nearest among its candidate centres ``near[i]``, in row blocks over the worker threads."""
    for_each_block(x.shape[0], 8192, lambda s, e: assign_to_candidates(x, xn, c, cn, near, labels, d1, s, e),
                   work=x.size * near.shape[1])


def _reseed_empty(x, labels, upper, lower, sums, counts, w, rows_in) -> int:
    """Re-seed empty clusters with the rows farthest from their centres by ``upper`` (:func:`reseed_empty`)."""
    if rows_in.all():
        return 0
    return int(reseed_empty(x, labels, upper, lower, sums, counts, w, rows_in))


def small_lloyd_applies(n: int, dim: int, k: int) -> bool:
    """Whether :func:`lloyd` runs as one compiled loop (:func:`kvant.kernels.lloyd_small.lloyd_small`): when its
    E-steps are direct-kernel regions (:func:`~kvant.cluster.assign.direct_e_step_fits`) of at most
    ``SMALL_LLOYD_MAX_WORK`` products on float32 rows, and too few rows for the certified E-steps (whose labels the
    compiled loop does not reproduce)."""
    return n < CERTIFIED_E_STEP_MIN_ROWS and n * k * dim <= SMALL_LLOYD_MAX_WORK and direct_e_step_fits(dim, k)


def _row_lanes(k: int, nbytes: int) -> bool:
    """Whether the small Lloyd loop's E-steps put rows in the lanes (ROW_LANES_MAX_K, ROW_LANES_MAX_BYTES and, where
    the direct kernel has coordinates in the lanes, ROW_LANES_COORD_MAX_BYTES)."""
    limit = ROW_LANES_COORD_MAX_BYTES if direct_assign.coord_lanes(k) else ROW_LANES_MAX_BYTES
    return ROW_LANES and k <= ROW_LANES_MAX_K and nbytes <= limit


def _lloyd_small(x, xn, c, w, max_iter, tol, spherical, on_iter, overrelax, x_total) -> LloydResult:
    n, dim = x.shape
    k = c.shape[0]
    threads = max(1, get_num_threads())
    # the rows per block of assign_top2's one-region E-step: the same blocks, the same outputs
    block = max(_DIRECT_MIN_ROWS, min(block_rows_for(dim, k), -(-n // (4 * threads))))
    # the objectives of the first HISTORY_CAP M-steps (a buffer sized by a max_iter of 10**12 was 7 TiB)
    history = np.empty(max(1, min(max_iter, HISTORY_CAP)), np.float64)
    dist = np.empty(n, np.float32)
    cent, labels, d1, d2, n_iter, reseeded, extrapolated, rejected, assigned = lloyd_small(
        x, xn, c, w, int(max_iter), float(tol), bool(spherical), float(overrelax), float(x_total), threads, block,
        history, dist, *direct_assign.centre_operands(c, sq_norms_serial(c)),
        _row_lanes(k, x.nbytes))
    objectives = [float(h) for h in history[: min(n_iter, history.shape[0])]]
    result = LloydResult(cent, labels, objectives, int(n_iter), int(reseeded),
                         int(assigned), int(extrapolated), int(rejected), last_d1=d1, last_d2=d2)
    if on_iter is not None:  # (after the fact: the loop does not leave compiled code)
        for h in result.objective_history:
            on_iter(h)
    return result


def train_centroids(
    x: np.ndarray, k: int, *, n_iter: int = 25, seed: int | None = 0, init: str = "k-means++", tol: float = 1e-4
) -> np.ndarray:
    """Deterministic k-means centroids (k, d) float32 of the rows of ``x`` (float32, C-contiguous).

    The building block other kvant modules (PQ/OPQ codebook training) use; no validation beyond shapes.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if k > x.shape[0]:
        raise ValueError(f"k={k} exceeds the number of training rows {x.shape[0]}")
    c0 = init_centroids(x, k, init, seed)
    return lloyd(x, c0, n_iter, tol, last_e_step=False).centroids  # (the same centroids without the labels' E-step)


__all__ = ["lloyd", "init_centroids", "train_centroids", "normalise_rows", "LloydResult"]
