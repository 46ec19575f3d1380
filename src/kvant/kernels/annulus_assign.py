"""The fused final assignment (:func:`kvant.kernels.direct_assign.direct_top2_exact`) with an annulus bound: centres
far from a row's neighbourhood are never multiplied.

The centres are sorted by their distance ‖c_j − a‖ to an anchor a, the centre nearest their coordinate-wise median
(a centre, so that its distance to every row comes with the products: no extra pass over the rows). For any row x
the triangle inequality gives ‖x − c_j‖ >= ‖c_j − a‖ − ‖x − a‖, so once two centres are known to lie within √U of
x, every centre with ‖c_j − a‖ > ‖x − a‖ + √U is farther than both: it can be neither the nearest centre nor the
runner-up (Hamerly and Drake's annular bound). Per group of R rows the kernel

1. multiplies the rows with the 16 centres nearest the anchor (one register block; the anchor is the first);
2. bounds each row's exact squared distances from its float32 ones d̃ = ‖x‖² + ‖c‖² − 2x·c, which err by at most
   κ(‖x‖ + ‖c‖)² + tiny (:func:`kvant.kernels.assign.label_margins`): ‖x − a‖² <= d̃_a + m and, with d̃₂ the
   second-smallest over the block, U = d̃₂ + m, where m = κ(‖x‖ + c₁₆)² + tiny and c₁₆ is the largest norm in the
   block, so both of the row's two best centres in the block lie within √U;
3. multiplies the group with the next blocks of 16 centres only up to the last centre any of its rows can reach
   (‖c_j − a‖ <= (‖x − a‖ + √U)(1 + 2⁻³⁰): the factor covers the float64 rounding of the centres' distances), and
4. takes the top-2 over the centres multiplied, as the plain kernel does over all of them.

The label's certification (:func:`kvant.kernels.assign.certify_top2`) then holds as it does for the plain kernel: it
proves the approximate best the nearest of the centres multiplied, and every other centre is beaten by two of them.
Rows it cannot prove get float64 distances to every centre, so the labels and exact distances are those of the
plain kernel.

Where the centres lie at similar distances from the anchor (Gaussian blobs, most embeddings) every row reaches every
block and the kernel only adds its bookkeeping, so callers use it where centres are far out (``kvant.cluster.assign``
decides). Heavy-tailed data, where a few dense clusters sit near the anchor and most centres chase the tails, is the
case it is for: there a row needs ~1.05 of 4 blocks at K = 64.
"""

from __future__ import annotations

import numba
import numpy as np

from .assign import _top2_lanes, store_top2
from .direct_assign import (
    _JIT,
    _JIT_RAW,
    _blocks6,
    _copy_rows,
    _ip6x1,
    _ip8x1,
    _ip8x2,
    _padded,
    padded_centroids,
)
from .distance import exact_sq_dist_into, sq_norms_into

BLOCK = 16  # centres per register block
MIN_KP = 32  # at least two blocks: with one there is nothing to skip


@numba.njit(inline="always", **_JIT)
def _first_block(x, i0, ct, g):
    """g[:, :16] = products of the group's rows with the 16 centres nearest the anchor."""
    if g.shape[0] == 8:
        _ip8x1(x, i0, ct, 0, g)
    else:
        _ip6x1(x, i0, ct, 0, g)


@numba.njit(inline="always", **_JIT)
def _more_blocks(x, i0, ct, nb, g):
    """g[:, 16 : 16·(nb + 1)] = products with the next ``nb`` blocks of centres (R = 8 rows: KP <= 48, so nb <= 2)."""
    if g.shape[0] == 8:
        if nb == 1:
            _ip8x1(x, i0, ct, BLOCK, g)
        elif nb == 2:
            _ip8x2(x, i0, ct, BLOCK, g)
    else:
        _blocks6(x, i0, ct, BLOCK, nb, g)


@numba.njit(inline="always", **_JIT)
def _reach(cdist, radius):
    """How many centres (ascending ``cdist``) lie within ``radius`` of the anchor (all of them for a NaN or inf
    radius)."""
    if not radius < cdist[cdist.shape[0] - 1]:
        return cdist.shape[0]
    return np.searchsorted(cdist, radius, side="right")


@numba.njit(**_JIT_RAW)
def _group(src, base, nr, i0, ct, cn_padded, cdist, cfirst, kappa, tiny, xn, g, labels, d1, d2):
    """Steps 1-4 of the module docstring for rows i0 .. i0 + nr (their products from ``src`` rows base ..); returns
    how many blocks of centres the group multiplied."""
    _first_block(src, base, ct, g)
    nb_all = cn_padded.shape[0] // BLOCK
    need = 1
    for r in range(nr):
        if need == nb_all:
            break
        best, run, arg = _top2_lanes(g, r, cn_padded, xn[i0 + r], np.float32(1.0), BLOCK)
        s2 = np.float64(np.int32(min(run, np.int32(0x7F800000))).view(np.float32))
        x2 = np.float64(xn[i0 + r])
        e = np.sqrt(x2) * (1.0 + 2.0**-20) + cfirst
        m = kappa * e * e + tiny
        xa2 = x2 + np.float64(cn_padded[0]) - 2.0 * np.float64(g[r, 0])  # the anchor's d̃ (more exact in float64)
        radius = (np.sqrt(max(xa2, 0.0) + m) + np.sqrt(s2 + m)) * (1.0 + 2.0**-30)
        need = max(need, (_reach(cdist, radius) + BLOCK - 1) // BLOCK)
    if need > 1:
        _more_blocks(src, base, ct, need - 1, g)
    for r in range(nr):
        best, run, arg = _top2_lanes(g, r, cn_padded, xn[i0 + r], np.float32(1.0), need * BLOCK)
        store_top2(labels, d1, d2, i0 + r, best, run, arg)
    return need


@numba.njit(**_JIT_RAW)
def _annulus_into(x, ct, cn_padded, centroids, cdist, cfirst, kappa, tiny, labels, d1, d2, exact_sq, g, xn, xt):
    n = x.shape[0]
    R = g.shape[0]
    blocks = 0
    for i0 in range(0, n, R):
        i1 = min(n, i0 + R)
        sq_norms_into(x, i0, i1, xn)
        for i in range(i0, i1):
            if not xn[i] < np.inf:  # NaN or inf in the row (or a float32 norm overflow): the caller's path
                return -1
        if i1 - i0 == R:
            blocks += _group(x, i0, R, i0, ct, cn_padded, cdist, cfirst, kappa, tiny, xn, g, labels, d1, d2)
        else:  # the last n mod R rows, through a zero-padded copy
            _copy_rows(x, i0, i1 - i0, xt)
            blocks += _group(xt, 0, i1 - i0, i0, ct, cn_padded, cdist, cfirst, kappa, tiny, xn, g, labels, d1, d2)
        exact_sq_dist_into(x, i0, i1, centroids, labels, exact_sq)
    return blocks


class AnnulusCentres:
    """Centres prepared for :func:`annulus_top2_exact`: sorted by their float64 distance to the anchor (``order``
    maps the sorted ids back), with the padded operand of :func:`kvant.kernels.direct_assign.padded_centroids`.
    Needs at least 17 centres (two blocks)."""

    def __init__(self, centroids: np.ndarray):
        c = np.ascontiguousarray(centroids, np.float32)
        k, dim = c.shape
        if _padded(k) < MIN_KP:
            raise ValueError(f"the annulus kernel needs at least {MIN_KP - BLOCK + 1} centres, not {k}")
        c64 = c.astype(np.float64)
        mid = np.median(c64, axis=0)
        self.anchor_id = int(np.argmin(((c64 - mid) ** 2).sum(axis=1)))
        dist = np.sqrt(((c64 - c64[self.anchor_id]) ** 2).sum(axis=1))
        dist[self.anchor_id] = -1.0  # first in the order, even with duplicates of it
        self.order = np.argsort(dist, kind="stable")
        dist[self.anchor_id] = 0.0
        self.cdist = np.ascontiguousarray(dist[self.order])
        self.centroids = np.ascontiguousarray(c[self.order])
        sq = (c64[self.order] ** 2).sum(axis=1)
        self.ct, self.cn = padded_centroids(self.centroids, sq.astype(np.float32))
        self.cfirst = float(np.sqrt(sq[:BLOCK].max()) * (1.0 + 2.0**-20))  # ≥ every ‖c_j‖ of the first block
        self.prune = True  # False once a call found too little to skip (:meth:`record`)

    @property
    def rows_per_group(self) -> int:
        """Rows per group of the micro-kernels: 8 up to 48 padded centres, 6 above (as the plain pass on AVX-512)."""
        return 8 if self.cn.shape[0] <= 48 else 6

    def groups(self, n: int) -> int:
        """Groups of rows :func:`annulus_top2_exact` takes ``n`` rows in."""
        return -(-n // self.rows_per_group)

    def record(self, n: int, blocks: int) -> None:
        """After a call on ``n`` rows that multiplied ``blocks`` blocks: stop pruning (``prune`` = False) when its
        groups skipped less than half a block on average. Then the bound is not paying for its bookkeeping (one far
        centre among many at similar distances, say): the plain kernel is ~20% faster on such rows."""
        if blocks > self.groups(n) * (self.cn.shape[0] // BLOCK - 0.5):
            self.prune = False

    def spread(self) -> float:
        """max ‖c − a‖ / median ‖c − a‖ (inf when the median is 0)."""
        med = float(np.median(self.cdist))
        return float(self.cdist[-1] / med) if med > 0 else float("inf")


def annulus_top2_exact(x, cc: AnnulusCentres, labels, d1, d2, exact_sq, kappa: float, tiny: float) -> int:
    """:func:`kvant.kernels.direct_assign.direct_top2_exact` for plain l2 rows (no unit rows) with the annulus bound:
    labels (in ``cc``'s sorted order: map them through ``cc.order``), the float32 top-2 over the centres multiplied,
    and each row's float64 squared distance to its label. ``kappa, tiny`` from
    :func:`kvant.kernels.assign.label_margins` (D). Returns how many blocks of 16 centres were multiplied, summed over
    the groups of rows, or −1 as soon as a row's squared norm is not finite (outputs then partly written)."""
    n, dim = x.shape
    if cc.centroids.shape[1] != dim:
        raise ValueError(f"rows have {dim} columns, the centres {cc.centroids.shape[1]}")
    kp, R = cc.cn.shape[0], cc.rows_per_group
    return _annulus_into(np.ascontiguousarray(x, np.float32), cc.ct, cc.cn, cc.centroids, cc.cdist, cc.cfirst,
                         float(kappa), float(tiny), labels, d1, d2, exact_sq, np.zeros((R, kp), np.float32),
                         np.empty(n, np.float32), np.zeros((R if n % R else 0, dim), np.float32))


__all__ = ["AnnulusCentres", "BLOCK", "MIN_KP", "annulus_top2_exact"]
