"""Lloyd's E-steps by neighbour lists (:mod:`kvant.kernels.neighbour_assign`) where rows have few coordinates.

At D = 2-8 and K in the hundreds or thousands, over-relaxed Lloyd steps move some centre far enough every iteration
that most rows cross their Hamerly bounds (1M × 2 rows, K = 1,024: 83% of the rows per E-step, so every E-step was a
full pass over all K centres), while each row's nearest centres are a few of its previous centre's neighbours. This
module keeps each centre's nearest other centres and re-assigns rows by scanning those.

Between rebuilds each listed distance is lowered by how far the centres could have come closer
(:func:`kvant.kernels.neighbour_assign.neighbour_e_step_range`'s ``shrink``), so the scans stay exact but grow longer;
the lists are rebuilt once the scans' extra cost has paid for a rebuild (``REBUILD_PAIRS_PER_K2``).

Whether it pays is measured, not guessed: a probe of ``PROBE_ROWS`` rows counts the centres the scans visit beyond
their prefixes and the rows they leave to the full E-step, and the lists are used while :func:`row_cost` of those
stays below K per row. Fits with a candidate E-step (recording ids) and the last E-step of a fit whose labels stand
as the final assignment keep the full E-step.
"""

from __future__ import annotations

import numpy as np

from .._config import get_num_threads
from .._parallel import for_each_block
from ..kernels.neighbour_assign import (
    centre_neighbours_range,
    grid_cells,
    grid_starts,
    neighbour_e_step_range,
    prefix_coords,
    prefix_length,
)

# Used at D <= MAX_DIM only (elsewhere a scan visits most centres: 500k × 8 rows, K = 256, ~50 of 256).
MAX_DIM = 8
# Each centre's list: its LENGTH nearest other centres (1M × 2 rows, K = 1,024: a scan visits ~5 centres, and no row
# ran off a 32-long list).
LENGTH = 32
# What a scan costs, in row-centre pairs of the full E-step's vectorised products: each centre of the prefix (taken
# without a stopping test, PREFIX_PER_DIM per coordinate), and each centre scanned after it (a stopping test and a
# mispredicted branch each). Measured by benchmarks-style A/B below (Zen 5, 2 threads; kvant.cluster.neighbours
# docstring). The lists are kept while a row's cost times UPKEEP (their rebuilds and refreshes), plus K for every row
# left to the full E-step, stays below K.
PREFIX_PAIRS = 16
TAIL_PAIRS = 40
UPKEEP = 1.5
# Rows of one coordinate: the fused pass's float32 distances ‖x‖² + ‖c‖² − 2x·c cannot tell dense centres apart on a
# line (their gaps shrink as 1/K²), so it re-computes many rows against every centre in float64 (39% of 2M standard
# normal rows at K = 1,000: 1.1 s), and a row-centre pair costs it about FUSED_1D_COST times more (Zen 5, 2M rows,
# fits / predicts, lists against fused: K = 200 88 / 94 and 29 / 50 ms, K = 400 126 / 238 and 33 / 158, K = 600
# 138 / 483 and 30 / 293; but K = 64 87 / 56 ms to fit).
FUSED_1D_COST = 8
PROBE_ROWS = 2048


def row_cost(dim: int, rows: int, tail: int, left: int, k: int) -> float:
    """What ``rows`` scans visiting ``tail`` centres beyond their prefixes cost, ``left`` of them left to the full
    E-step, in row-centre pairs of the full E-step (times UPKEEP for the scans)."""
    scans = rows * prefix_length(dim) * PREFIX_PAIRS + tail * TAIL_PAIRS
    return UPKEEP * scans / (FUSED_1D_COST if dim == 1 else 1) + left * k


# ... and from K = MIN_K only (rows of one coordinate aside): below it the lists' upkeep and the partial E-steps of
# Hamerly's bounds left nothing to gain in whole fits (500k rows around 64 blobs, lists / full E-steps, medians of 2:
# K = 256 0.85-1.05× at D = 2, 3, 4, 8; K = 512 1.02-1.26×; K = 1,024 1.46-2.31×; K = 2,048 1.00-2.53×).
# Rows of one coordinate from MIN_K_1D (2M standard-normal rows, fit / predict ms, lists / fused, medians of 3: K = 16
# 82 / 54 and 47 / 21, K = 64 81 / 58 and 38 / 28, K = 128 87 / 73 and 41 / 42, K = 200 97 / 101 and 39 / 55, K = 400
# 139 / 261 and 42 / 133).
MIN_K = 512
MIN_K_1D = 192


def min_k(dim: int, unit: bool = False) -> int:
    """Below this K the lists are not tried: even scans that stop right after their prefix would cost more than the
    full E-step, or K < MIN_K (MIN_K_1D for rows of one coordinate, and for ``unit`` rows of two: directions in the
    plane, a circle, have one degree of freedom too)."""
    line = dim == 1 or (unit and dim == 2)
    return max(int(np.ceil(row_cost(dim, 1, 0, 0, 0))), MIN_K_1D if line else MIN_K)


# When to rebuild the lists, a ski rental: stale lists make scans longer (every listed distance is lowered by the moves
# since they were built), and rebuilding costs about REBUILD_PAIRS_PER_K2 · K² pairs of the full E-step (K distances
# per centre, a selection: 16 ms at K = 4,096 on two threads). So the extra cost of the scans since the last build,
# against the cost per row of the first scans after it, is summed, and the lists are rebuilt once it exceeds that
# price; or at once when a centre may have come closer to another by more than REBUILD_MAX_DRIFT times the median
# nearest-centre distance (most scans would run off their lists). A rebuild every step, as at first (when a move of a
# quarter of that distance), cost 260 of a 665 ms training at 300k × 2 rows, K = 4,096.
REBUILD_PAIRS_PER_K2 = 10
REBUILD_MAX_DRIFT = 2.0
_BLOCK_ROWS = 16384
_BLOCK_CENTRES = 256
_NO_ROWS = np.empty(0, np.int64)


class NeighbourSteps:
    """Neighbour lists of the centres ``c`` (K, D) float32, for :meth:`assign`."""

    def __init__(self, c: np.ndarray, length: int = LENGTH):
        self.k, self.dim = c.shape
        self.length = max(1, min(int(length), self.k - 1))
        self.scanned = 0  # centres visited beyond the prefixes, and rows left to the full E-step, over ...
        self.left = 0
        self.rows = 0  # ... this many rows
        self._build(c)

    @staticmethod
    def applies(n: int, dim: int, k: int) -> bool:
        return dim <= MAX_DIM and k >= min_k(dim) and n >= PROBE_ROWS

    def _build(self, c: np.ndarray, hint: np.ndarray | None = None) -> None:
        k, L = self.k, self.length
        self.nbr = np.empty((k, L), np.int32)
        self.ndist = np.empty((k, L), np.float64)
        self.reach = np.empty(k, np.float64)
        self.far = np.empty(k, np.int32)
        self.built = np.array(c, np.float64)
        nbr, ndist, reach, far = self.nbr, self.ndist, self.reach, self.far
        hint = np.full(k, np.inf) if hint is None else hint
        for_each_block(k, _BLOCK_CENTRES, lambda a, b: centre_neighbours_range(c, nbr, ndist, reach, far, hint, a, b),
                       work=k * k * c.shape[1] * 8)
        self.typical = float(np.median(ndist[:, 0])) if L else 0.0
        self.shrink = np.zeros(k, np.float64)
        self.fresh = None  # (tail centres, rows left) per row of the first scans after this build
        self.stale = 0.0  # what the scans since cost beyond that, in pairs of the full E-step
        self.nbc = prefix_coords(c, nbr, prefix_length(c.shape[1]))

    def update(self, c: np.ndarray) -> None:
        """Take the centres ``c`` the next :meth:`assign` uses: bound each list's shrinkage, or rebuild."""
        drift = np.sqrt(((np.asarray(c, np.float64) - self.built) ** 2).sum(1))
        top = float(drift.max()) if drift.size else 0.0
        price = REBUILD_PAIRS_PER_K2 * float(self.k) * self.k
        if not np.isfinite(top) or 2.0 * top > REBUILD_MAX_DRIFT * self.typical or self.stale > price:
            # the L + 1 centres nearest each one before lie within its old reach plus the moves now: rank only those
            # centres (a little more for the rounding of the float64 moves)
            hint = np.where(self.far >= 0, ((self.reach + drift + top) * (1.0 + 1e-9)) ** 2, np.inf)
            self._build(c, hint if np.isfinite(top) else None)
            return
        self.shrink = drift + top
        self.nbc = prefix_coords(c, self.nbr, self.nbc.shape[2])  # (the prefix's distances are to the centres now)

    def worthwhile(self) -> bool:
        """Whether the scans so far visited few enough centres to beat the full E-step."""
        return self.rows == 0 or row_cost(self.dim, self.rows, self.scanned, self.left, self.k) < self.rows * self.k

    def probe(self, x: np.ndarray, c: np.ndarray, labels: np.ndarray) -> bool:
        """Scan ``PROBE_ROWS`` rows spread over ``x`` from their ``labels`` (centres ``c``, after :meth:`update`) and
        judge the lists by them."""
        n = x.shape[0]
        rows = np.linspace(0, n - 1, min(n, PROBE_ROWS)).astype(np.int64)
        out = np.empty(rows.size, np.int64)
        e = np.empty(rows.size, np.float32)
        self.scanned += neighbour_e_step_range(x, rows, c, labels[rows], self.nbr, self.nbc, self.ndist, self.reach,
                                               self.shrink, out, e, e, 0, rows.size)
        self.left += int(np.count_nonzero(out < 0))
        self.rows += rows.size
        return self.worthwhile()

    def assign(self, x: np.ndarray, c: np.ndarray, rows: np.ndarray | None, start: np.ndarray, labels: np.ndarray,
               d1: np.ndarray, d2: np.ndarray, scale: np.ndarray | None = None, first=None) -> np.ndarray:
        """Re-assign the listed rows of ``x`` (all when ``rows`` is None) from their previous centres ``start`` to the
        centres ``c`` (after :meth:`update`): ``labels``, ``d1``, ``d2`` as :func:`kvant.cluster.assign.e_step` writes
        them (float64 distances: the exact top-2). Returns the positions whose scan could not prove the nearest
        centre (their outputs unset): the caller assigns those with the full E-step. ``scale``: as in
        :func:`~kvant.kernels.neighbour_assign.neighbour_e_step_range`; ``first(s, e)``: called on each block of
        positions before its scans (the final pass fills ``start`` there)."""
        n = x.shape[0] if rows is None else rows.shape[0]
        listed = _NO_ROWS if rows is None else rows
        counts = []

        def run(s: int, e: int) -> None:
            if first is not None:
                first(s, e)
            counts.append(neighbour_e_step_range(x, listed, c, start, self.nbr, self.nbc, self.ndist, self.reach,
                                                 self.shrink, labels, d1, d2, s, e, scale))

        for_each_block(n, _BLOCK_ROWS, run, n_threads=get_num_threads(), work=n * x.shape[1] * 8 * 16)
        left = np.flatnonzero(labels < 0)
        tail = sum(counts)
        if n:
            if self.fresh is None:
                self.fresh = (tail / n, left.size / n)
            else:  # (the scans' cost beyond the fresh lists', for update's rebuild rule)
                extra = (tail - self.fresh[0] * n) * TAIL_PAIRS + (left.size - self.fresh[1] * n) * self.k
                self.stale += max(0.0, extra)
        self.scanned += tail
        self.left += left.size
        self.rows += n
        return left


# The final assignment by the lists (NeighbourFinal): at D <= FINAL_MAX_DIM, each row starts from the centre nearest
# its cell of a grid of about FINAL_CELLS_PER_CENTRE cells per centre, cut at quantiles of the centres' coordinates;
# rows find their cell through FINAL_BINS uniform bins per coordinate.
FINAL_MAX_DIM = 3
FINAL_CELLS_PER_CENTRE = 8
FINAL_BINS = 1 << 14


class NeighbourFinal:
    """The final assignment of rows with few coordinates by the centres' neighbour lists: each row's scan starts from
    the centre nearest its grid cell (no previous centre to start from). Labels are the exact nearest centres (ties to
    the smaller id) and the per-row squared distances float64 term by term, as the fused pass gives them; rows the
    lists cannot settle are left to it."""

    def __init__(self, c: np.ndarray, length: int = LENGTH):
        k, dim = c.shape
        self.c = c
        self.steps = NeighbourSteps(c, length)
        # cells between quantiles of the centres' coordinates, so dense regions get more of them (a uniform grid over
        # the bounding box of heavy-tailed centres left most cells empty and the core's rows scanning ~31 centres)
        side = max(1, int(np.ceil((FINAL_CELLS_PER_CENTRE * k) ** (1.0 / dim))))
        c64 = c.astype(np.float64)
        bounds = np.quantile(c64, np.arange(1, side) / side, axis=0).T  # (dim, side - 1), ascending
        lo, hi = c64.min(axis=0), c64.max(axis=0)
        edges = np.concatenate([lo[:, None], bounds, hi[:, None]], axis=1)
        axes = [0.5 * (edges[t, :-1] + edges[t, 1:]) for t in range(dim)]  # each cell's middle
        # rows find their cell through FINAL_BINS uniform bins per coordinate, each mapped to the cell of its middle
        width = (hi - lo) / FINAL_BINS
        width[~(width > 0)] = 1.0  # (every centre on one value of this coordinate)
        mids = lo[:, None] + (np.arange(FINAL_BINS) + 0.5) * width[:, None]
        self.table = np.stack([np.searchsorted(bounds[t], mids[t], side="right") for t in range(dim)]).astype(np.int64)
        self.lo, self.inv, self.side = lo, 1.0 / width, side
        points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, dim).astype(np.float32)
        self.starts = np.empty(points.shape[0], np.int64)
        st = self.steps
        grid_starts(points, side, c, st.nbr, st.nbc, st.ndist, st.reach, self.starts)
        self.judged = False

    @staticmethod
    def applies(n: int, dim: int, k: int, unit: bool = False) -> bool:
        """Whether the final pass tries the lists (``unit``: cos rows). On a circle of directions (cos, 2
        coordinates) the fused pass's float32 labels fail their certificate for most rows once centres are dense:
        200k rows, K = 511, predict 158-172 ms against 12-18 ms on the lists; K = 256 27-31 against 10 ms, K = 128
        8 against 10-11 ms (Zen 5, 2026-12-07, a review's case); so from MIN_K_1D there, as on a line."""
        return 1 <= dim <= FINAL_MAX_DIM and k >= min_k(dim, unit) and n >= PROBE_ROWS

    def assign(self, x: np.ndarray, labels: np.ndarray, exact_sq: np.ndarray,
               scale: np.ndarray | None = None) -> np.ndarray | None:
        """Labels and exact squared distances of the rows of ``x`` (a block; each taken as x·scale[i] in float64 when
        ``scale`` is given: spherical k-means' 1/‖x‖ on unit centres); returns the positions left to the fused pass
        (outputs unset there: NaN, inf or zero rows among them), or None when the lists do not pay (judged on the
        first block's first ``PROBE_ROWS`` rows; the fused pass then takes every block)."""
        if not self.judged:
            self.judged = True
            m = min(x.shape[0], PROBE_ROWS)
            self._scan(x[:m], labels[:m], exact_sq[:m], None if scale is None else scale[:m])
            if not self.steps.worthwhile():
                return None
        return self._scan(x, labels, exact_sq, scale)

    def _scan(self, x, labels, exact_sq, scale):
        start = np.empty(x.shape[0], np.int64)
        return self.steps.assign(x, self.c, None, start, labels, exact_sq, np.empty(x.shape[0]), scale,
                                 first=lambda s, e: grid_cells(x, self.lo, self.inv, self.table, self.side,
                                                               self.starts, start, s, e, scale))
