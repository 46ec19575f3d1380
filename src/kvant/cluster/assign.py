"""Exact nearest-centroid assignment of row blocks (the E-step): BLAS tiles (or, for K <= 64 on AVX-512 hosts (128 on
AMD Zen 4, 2,048 where the BLAS lacks AVX-512) and K <= 16 on AVX2 ones, a register-blocked kernel) finished by a Numba
top-2 pass; with K >= ``AMX_MIN_K`` on AMX hosts, certified bf16 tile products when K·D >= ``AMX_MIN_KD`` too
(:func:`e_step`, :func:`assign_certified`); on AVX2 hosts without AVX-512 and on AMD Zen 4 (``I16_HOST``), certified
int16 products in final assignments with K >= ``I16_MIN_K`` (on Zen 4 also K·D >= ``I16_HALF_RATE_MIN_KD``, or K >=
``I16_HALF_RATE_MIN_K`` at D >= 16) and in E-steps with K >= ``I16_E_STEP_MIN_K`` (:class:`CertifiedCentres`)."""

from __future__ import annotations

import numpy as np

from .._config import get_num_threads
from .._numerics import condition, conditioning
from .._parallel import for_each_block
from ..errors import InvalidInput
from ..io.source import check_finite
from ..kernels import amx_assign, annulus_assign, direct_assign, i16_assign, row_lanes
from ..kernels._llvm import half_rate_avx512
from ..kernels.assign import (
    CANDIDATE_IDS_MAX,
    candidate_ids_from_ip,
    certify_top2,
    label_margins,
    nearest_ids_from_ip,
    top2_from_ip,
)
from ..kernels.distance import normalise_rows_into, sq_norms64_serial, sq_norms_serial
from ..kernels.lloyd import exact_sq_dist_rows, exact_sq_dist_rows_scaled

# unit_rows: squared norms outside this range are normalised explicitly before the GEMM (a raw float32
# product of such rows would lose precision to subnormals or overflow)
_SAFE_SQNORM = (1e-30, 1e30)
LANE_CANDIDATES = True  # nearest= records candidate_ids_from_ip's ids (m <= 16), not the exact m nearest
# K <= direct_assign.MAX_K (64 on AVX-512 hosts, 128 on Zen 4, 2,048 where the BLAS lacks AVX-512), K <= 16 on AVX2
# ones (direct_assign.fits): products from the
# register-blocked kernel, not a BLAS GEMM
DIRECT_ASSIGN = True
# A plain direct E-step of at most this many row × centroid × coordinate products runs as one parallel Numba region
# (blocks of >= _DIRECT_MIN_ROWS rows, ~4 per thread): 16-24% off digits' fits at K = 10 and 64, where handing
# blocks to Python threads cost more than the work; at Fashion-MNIST K = 10 (2,560 × 10 × 784 = 20M products per
# E-step) the training phase took 29 against 42 ms with 2^26 as the limit instead of 2^24 (same MSE, medians of 5,
# 2026-12-03). Larger ones keep the Python threads: there Numba's threads, spinning after the region, slowed
# 1M×128 K=64's fit (134M products per E-step) by 13% (same-process A/B, 2026-12-02).
_ONE_REGION_MAX_WORK = 1 << 26
# Final assignments of l2 rows with D <= ROW_LANES_FINAL_MAX_DIM put 16 rows in the vector lanes
# (:func:`kvant.kernels.row_lanes.tile_top2_exact`: the rows gathered into a tile, no horizontal sums) on AVX-512
# hosts, at any K the certified products (int16, AMX) leave them. One thread, 2M rows, ns per row, direct kernel ->
# rows in lanes (Zen 4, 2026-12-06): D = 2 17-39 -> 10-14 (1.5-3.0x), D = 8 17-39 -> 13-19 (1.2-2.3x), D = 16 17-39
# -> 16-26 (1.0-1.7x), D = 32 20-47 -> 26-45 (0.75-1.2x: the gathers cost more than the sums they save); K = 40-64
# 1.07-1.56x. Beyond K = 64 (BLAS tiles before), whole final assignments of 64 MiB of rows on 2 threads: D = 2 K = 96
# -2,048 1.55-3.97x (K = 1,024: 2.94 -> 0.74 s), D = 8 K = 96-512 1.37-1.84x, D = 16 K = 96 1.21x.
ROW_LANES_FINAL = True
ROW_LANES_E_STEP = True
ROW_LANES_FINAL_MAX_DIM = 16
_DIRECT_MIN_ROWS = 64
_NO_ROWS = np.empty(0, np.int64)
_NO_LOWER = np.empty(0, np.float32)
_NO_NEAREST = np.empty((0, 0), np.int32)
_NO_EXACT = np.empty(0, np.float64)
# E-steps and final assignments with K >= AMX_MIN_K and K·D >= AMX_MIN_KD on hosts with AMX run on bf16 tile products
# certified row by row (kernels/amx_assign: exact labels). Whole fits, same-process A/B against the float32 path on
# 2 threads, with the measured-residual margins (2026-12-03, medians of 5-15): the tile path gained at K >= 128 —
# 1M×128 K=128 cos 0.91×, K=256 l2 Zipf 0.77×, K=256 cos heavy-tailed 0.77×, 200k×384 K=128 l2 0.81×,
# Fashion-MNIST K=256 l2 0.75×, digits K=1024 0.90× — was even on digits K=256 (1.07× l2, 0.98× cos, 25 ms fits)
# and lost at every K=64 cell tried (1M×128 l2 1.06×, 200k×384 cos 1.17×, Fashion-MNIST l2 1.03×): there each
# row's conversion, top-2 and exact distance cost more than its products save. (With the earlier worst-case
# margin the threshold had to be K·D >= 2^16: 1M×128 K=256 l2 Zipf lost, 1.36×.) K from 96 since 2026-12-05: whole
# fits, same process, medians of 3 seeds, tile path / float32 path time: K=100 100k×768 cos 0.70×, l2 0.76×; 100k×512
# 0.83× / 0.81×; 200k×256 0.79× / 0.81×; K=96 200k×192 0.81× / 0.85×, 100k×384 0.84× / 0.93×; still even below
# (K=80 60k×1024 0.93× / 0.92×, K=64 100k×768 0.99× / 0.97×, 50k×1536 1.05× / 1.01×). (Labels differ where the
# float32 path's rounding picked a near-tied centre: the tile path's are the exact nearest.)
AMX_ASSIGN = True
AMX_MIN_K = 96
AMX_MIN_KD = 1 << 14
# Centres far out (max ‖c − μ‖ > AMX_MAX_NORM_SPREAD × its median over the centres; the benchmark's heavy-tailed l2
# cells have ratios 39-164, every other cell measured <= 5.3) send most rows past the quick test. Rows that fail it
# then drop the centres the triangle inequality rules out and scan the inner ones (kernels/amx_assign): always in
# final assignments (heavy-tailed 1M×128 K=256 l2: 551 ms against 719 ms with the scan over every centre), and in
# Lloyd's E-steps only when the centres are that far out (AMX_E_STEP_INNER; elsewhere the outer centres' norm-gap
# bound is looser than their per-centre lower ends and Hamerly's bounds recompute more rows: Zipf 1M×128 K=256 fits
# 1.09-1.13×). Whole fits against the float32 E-steps used there before (same process, medians of 3-7, 2026-12-03):
# heavy-tailed 1M×128 K=256 0.92-1.02×, 200k×384 K=256 0.88×, 1M×128 K=1024 0.94×; with the full scan instead, the
# tile path's fits took 1.2-1.4× the float32 path's time. AMX_E_STEP_INNER = False restores the float32 E-steps there.
AMX_MAX_NORM_SPREAD = 8.0
# With centres that far out, plain l2 final assignments on the fused kernel (K = 17-64 on AVX-512) skip the blocks of
# centres a row group cannot reach (kernels/annulus_assign; the kernel turns itself off where that saves too little).
ANNULUS_ASSIGN = True
AMX_E_STEP_INNER = True
# On AVX2 hosts (no AVX-512, no AMX) final assignments run the same certification on exact int16 products
# (kernels/i16_assign) with K >= I16_MIN_K: beyond the K <= 16 of the fused float32 kernel (direct_assign), which beat
# int16 at K = 10 (fits 1.02-1.26×); at K = 20-256 whole fits took 0.79-0.99×, digits (K·D = 2,048-8,192) even.
# Lloyd's E-steps take it from K >= I16_E_STEP_MIN_K unless small (one parallel region, _ONE_REGION_MAX_WORK): fits
# 0.69-0.79× at K = 1024, 0.92-0.94× at 200k×384 and Fashion-MNIST K = 256, even at 1M×128 K = 256; the E-steps
# alone were even at K = 64 (docs/auto.md).
I16_ASSIGN = True
# AVX-512 hosts whose 512-bit FMAs issue as two 256-bit halves (AMD Zen 4, LLVM's "znver4": 16 float32 multiply-adds
# per cycle per core, as many as AVX2's two 256-bit FMA pipes) gain from the int16 products as AVX2 hosts do; same
# thresholds. Whole fits on the Zen 4 host (same process, alternating, medians of 3-5 seeds, 2026-12-05), int16 /
# float32 time: K=1024 1M×128 cos 0.56×, Fashion-MNIST cos 0.71×; K=256 Zipf 1M×128 l2 0.68×, 200k×384 l2 0.72×,
# Fashion-MNIST l2 0.72×; K=64 (final assignment only) 200k×384 Zipf l2 0.89×, 1M×128 l2 0.84× and cos 0.94×,
# Fashion-MNIST 0.99×; digits K=256/1024 even (small E-steps keep float32). K=10 with int16 (I16_MIN_K = 1): 1.12-1.20×,
# so the float32 kernel keeps K <= 16; int16 E-steps from K=48 instead of 128: even or slower (Fashion-MNIST K=64
# 1.09×). Other AVX-512 hosts (full-rate 512-bit FMAs: Intel, AMD Zen 5) keep the float32 kernels: on Zen 5 int16
# (AVX2 products) lost to the fused AVX-512 kernel (whole fits with int16 on every final assignment and E-step from
# K = 128, same process, alternating, medians of 3, 2026-12-06: 1M×128 K=64 1.34× the float32 time, K=256 1.18×,
# K=1,024 0.96×; 200k×384 K=256 1.18×).
_HALF_RATE_HOST = half_rate_avx512()  # (kernels._llvm.HALF_RATE_AVX512)
I16_HOST = i16_assign.AVAILABLE and (not direct_assign.AVX512 or _HALF_RATE_HOST)
# Centres far out (AMX_MAX_NORM_SPREAD) leave most rows to the per-centre scan; on the AVX2 host int16 gained nothing
# there at first (below), but on Zen 4, where the float32 path is slower, it did from K·D >= I16_FAR_MIN_KD:
# heavy-tailed fits, int16 / float32 time (alternating in one process, medians of 3; 2026-12-05): 1M×128 K=1024 0.59×
# (final assignment 1.70 → 0.83 s), K=256 0.76× (0.42 → 0.27 s), K=128 0.83×, K=96 0.90×; 200k×384 K=256 0.65×,
# K=128 0.78×, K=64 0.86×; but 1M×128 K=64 (K·D = 8,192) 1.28× (0.11 → 0.15 s). On the AVX2 (Zen 3) host the "nothing
# gained" above (1M×128 K=256 final assignment 1.03×, 2026-12-03) no longer held on 2026-12-06 (the per-centre scan
# was reworked since): heavy-tailed final assignments 1M×128 K=256 354 vs 465 ms, 200k×384 K=256 184 vs 305 ms, K=64
# 74 vs 100 ms, but 1M×128 K=64 160 vs 154 ms; whole fits (alternating, medians of 3; K=1024 one run) 1M×128 K=256 l2
# 0.80-0.83×, cos 0.97×, K=1024 l2 0.87×, 200k×384 K=64 0.91×, K=256 0.76×. So every int16 host takes the Zen 4 rule.
I16_FAR_CENTRES = True
I16_FAR_MIN_KD = 12288
I16_MIN_K = 17
# On Zen 4 the float32 kernels for few centres (coordinates in the lanes for K <= 28, rows in the lanes for D <= 16,
# both newer than the rule above) beat int16 in final assignments below K·D = I16_HALF_RATE_MIN_KD, unless K >=
# I16_HALF_RATE_MIN_K and D >= 16. _assign_all on Gaussian blobs, 128 MiB of rows, 2 threads, best of 2 × 4
# (2026-12-06), float32 time / int16 time (> 1: int16 faster): D = 16 K = 17-64 0.47-0.82, K = 128 1.08, 256 1.30;
# D = 32 K = 17-64 0.76-0.87, 128 1.21; D = 64 K = 17-64 0.80-0.97, 96 1.30; D = 128 K = 17-32 0.77-0.94, 48 1.02,
# 64 1.14; D = 256 K = 17 0.88, 24 1.01, 32 1.15; D = 384 K = 17 0.99, 20 1.03, 24 1.16; D = 784 K = 17 1.26; D = 4
# and 8 K = 128 0.80, K = 256 0.99 and 1.04; cos alike (D = 64 K = 64 0.89, D = 128 K = 64 1.06, D = 16 K = 128 1.07).
I16_HALF_RATE_MIN_KD = 6144
I16_HALF_RATE_MIN_K = 128
I16_E_STEP_MIN_K = 128
# Certified E-steps (either backend) need at least this many rows: below it the per-call and per-strip costs (packing,
# certification, the exact distances) outweigh the cheaper products. Same-host E-steps alone, Gaussian rows, D = 64-784,
# K = 256 and 1024, against the float32 path: int16 on the AVX2 host (2026-12-04) 1.19-2.10x its time with 1,797-4,096
# rows, 0.94-1.08x with 8,192, 0.83x with 50,000; AMX on the Intel host (2026-12-04) 1.16-2.34x with 2,048-4,096 rows
# (one 0.98x), 0.84-1.21x with 8,192, 0.46-0.94x with 16,384-32,768. At digits' shape (1,797 x 64, K = 1024) an
# int16 E-step took 5.3 ms against 2.8, an AMX one 3.1 against 1.6 ms; docs/auto.md.
CERTIFIED_E_STEP_MIN_ROWS = 8192


def certified_e_step_may_apply(n: int, dim: int, k: int) -> bool:
    """Whether an E-step of ``n`` rows on K centres of dimension ``dim`` may run on a certified backend
    (:class:`CertifiedCentres`; whether it does also depends on the centres). False: the float32 kernels, always."""
    if n < CERTIFIED_E_STEP_MIN_ROWS:
        return False
    if AMX_ASSIGN and amx_assign.AVAILABLE and k >= AMX_MIN_K and k * dim >= AMX_MIN_KD:
        return True
    return I16_ASSIGN and I16_HOST and k >= I16_E_STEP_MIN_K and n * k * dim > _ONE_REGION_MAX_WORK


# The annulus pass was measured up to K = 64 (direct_assign.MAX_K before Zen 4 took the fused kernel to 128)
ANNULUS_MAX_K = 64


def annulus_centres(centroids: np.ndarray, spherical: bool) -> annulus_assign.AnnulusCentres | None:
    """The centres prepared for :func:`assign_top2`'s annulus-bounded final pass, or None where it does not apply:
    ``ANNULUS_ASSIGN`` off, cos, K outside 17-``ANNULUS_MAX_K`` on AVX-512 hosts, l2 data that needs
    conditioning, or centres not far out (max/median distance to the anchor <= ``AMX_MAX_NORM_SPREAD``: there rows
    reach every block). Where it applies, final assignments take it rather than a certified backend: heavy-tailed
    fits (Zen 4, 2026-12-06, same process, medians of 5-7) 1M×128 K=64 0.75× the float32 fused pass's time, 200k×384
    K=64 0.78× the int16 products'."""
    k = centroids.shape[0]
    top = min(ANNULUS_MAX_K, direct_assign.MAX_K)
    if spherical or not (ANNULUS_ASSIGN and direct_assign.AVX512 and 17 <= k <= top):
        return None
    if any(v is not None for v in conditioning(centroids)):  # conditioned rows take the GEMM path
        return None
    annulus = annulus_assign.AnnulusCentres(centroids)
    return annulus if annulus.spread() > AMX_MAX_NORM_SPREAD else None


def scales_unit_rows(xn: np.ndarray) -> bool:
    """True when rows of squared norms ``xn`` are all in the range where a cos assignment scales them by 1/‖x‖
    inside the kernel (``_SAFE_SQNORM``); otherwise it normalises a copy of them first."""
    return bool(xn.min(initial=np.inf) > _SAFE_SQNORM[0] and xn.max(initial=0.0) < _SAFE_SQNORM[1])


def one_region_direct_e_step(n: int, dim: int, k: int) -> bool:
    """Whether a plain E-step of ``n`` rows (Lloyd's, with row norms given) runs the register-blocked kernel in one
    parallel region (:func:`assign_top2`'s small path). Recording candidate centres (``nearest=``) needs the GEMM
    path instead."""
    return n * k * dim <= _ONE_REGION_MAX_WORK and direct_e_step_fits(dim, k)


def direct_e_step_fits(dim: int, k: int) -> bool:
    """Whether the register-blocked kernel takes E-steps of K centres of dimension ``dim`` (its one-region sizes)."""
    return DIRECT_ASSIGN and direct_assign.fits(dim, k, True)


# why a zero row is an error under cos, and what to do (the end of every zero-norm message)
ZERO_NORM_REASON = ("metric='cos' needs non-zero vectors (kvant computes in float32, where values below ~1e-45 in "
                    "magnitude are 0: rescale such rows)")


def zero_norm_error(row: int, what: str | None = None) -> InvalidInput:
    """The error for a zero row under cos, carrying the row (``bad_row``) so that a caller who saw only part of
    the input (kvant.distributed) can name the input's first such row instead. ``what``: the part of the input
    it is the first zero row of (a lazy Dask task's chunk), named as the NaN error names it."""
    head = f"row {row} has zero norm" if what is None else f"{what} has a row of zero norm (first bad row: {row})"
    err = InvalidInput(f"{head}; {ZERO_NORM_REASON}")
    err.bad_row, err.zero_norm = int(row), True
    return err


def block_rows_for(dim: int, k: int) -> int:
    """Rows per block so the (rows, K) float32 tile plus the (rows, D) input stay within ~2 MiB (L2/L3)."""
    rows = (2 << 20) // (4 * (k + dim))
    return int(min(8192, max(256, rows)))


def balanced_rows(n: int, rows: int) -> int:
    """Rows per block for ``n`` rows in blocks of at most ``rows``: the same number of blocks, of equal sizes (a last
    block of a few rows would leave one thread with most of a small E-step)."""
    blocks = max(1, -(-n // max(1, rows)))
    return max(1, -(-n // blocks))


def assign_top2(x: np.ndarray, centroids: np.ndarray, c_sqnorms: np.ndarray, labels, d1, d2,
                x_sqnorms: np.ndarray | None = None, n_threads: int | None = None,
                exact_sq: np.ndarray | None = None, rows: np.ndarray | None = None, unit_rows: bool = False,
                row_offset: int = 0, shift: np.ndarray | None = None, scale: float | None = None,
                nearest: np.ndarray | None = None, check: str | None = None, exact_labels: bool = False,
                annulus: annulus_assign.AnnulusCentres | None = None) -> int:
    """Write nearest-centroid labels and the two smallest squared distances of every row of ``x``.

    ``check`` (a source name; plain rows only, no ``rows``): ``x`` has not been checked for NaN/inf yet. Each
    block is checked as it is assigned, while it is in cache (the fused kernel's finite norms prove it for free),
    and :class:`InvalidInput` names the first bad row (``row_offset + i``) as ``VectorSource.validate`` would.

    ``shift``/``scale`` (from :func:`conditioning`, l2 only): each block and the centroids are moved to
    (· − shift)·scale before the GEMM, so data with a large common offset or an extreme magnitude is
    assigned exactly; ``c_sqnorms`` and ``x_sqnorms`` are then ignored and d1/d2 are in scaled units
    (true squared distances × scale²). ``exact_sq`` is always computed on the raw rows.

    ``rows`` (int64 indices into ``x``): assign only those rows, in that order (outputs and ``x_sqnorms`` are
    then per listed row). Each block is gathered just before its GEMM, so no ``x[rows]`` copy is made: on
    this project's VM a fresh copy of a few hundred MiB page-faults its way in at ~0.5 GB/s and cost more
    than a third of Lloyd's time at K=1024.

    ``unit_rows`` (spherical k-means): assign each row as if unit-normalised, without a normalised copy:
    the GEMM runs on the raw rows and its products are scaled by 1/‖x‖ (rows of extreme norm are
    normalised explicitly first). A zero row raises :class:`InvalidInput` naming row ``row_offset + i``
    (the first one). ``x_sqnorms`` is ignored then.

    With ``exact_sq`` (float64, one per row), also write each row's squared distance to its centre
    recomputed term by term in float64 — while the block is still in cache, so the exact inertia costs no
    second pass over the data.

    ``exact_labels`` (implied by ``exact_sq``): make the labels the exact nearest centres of the float32 rows (ties
    to the smaller id) — :func:`kvant.kernels.assign.certify_top2` keeps each label whose two smallest float32
    distances are farther apart than their rounding could move them and recomputes the rest in float64 — and return
    how many rows that recomputed (0 otherwise). ``d1``/``d2`` stay the float32 distances; with ``exact_labels`` they
    may be None (not wanted: each block then uses scratch of its own).

    With ``nearest`` ((n, m) int32; plain rows only: no ``rows``, ``unit_rows`` or conditioning), also write m
    candidate centroid ids per row (any order; the row's label always among them) from the same products: with
    m <= 16 (and ``LANE_CANDIDATES``) those of :func:`candidate_ids_from_ip`, else the exact m nearest
    (:func:`nearest_ids_from_ip`).

    ``annulus`` (:func:`annulus_centres` of the same centroids): with ``exact_sq`` on plain l2 rows, the fused pass
    skips the blocks of centres a row group cannot reach (:mod:`kvant.kernels.annulus_assign`); the same labels and
    ``exact_sq`` (``d2`` is the runner-up among the centres multiplied)."""
    if check is not None and rows is not None:
        raise ValueError("check= needs plain rows (no rows=)")
    if (d1 is None) != (d2 is None):
        raise ValueError("give both d1 and d2, or neither")
    if d1 is None and not (exact_labels or exact_sq is not None):
        raise ValueError("d1/d2 may be None only with exact_labels or exact_sq (the final assignment)")
    if nearest is not None:
        if rows is not None or unit_rows or shift is not None or scale is not None:
            raise ValueError("nearest= needs plain rows (no rows=, unit_rows or conditioning)")
        if nearest.dtype != np.int32 or nearest.ndim != 2 or nearest.shape[0] != x.shape[0] or not (
                1 <= nearest.shape[1] <= centroids.shape[0]):
            raise ValueError(f"nearest= must be an int32 (n, m) array with 1 <= m <= K, got {nearest.dtype} "
                             f"{nearest.shape}")
        pick = (candidate_ids_from_ip if LANE_CANDIDATES and nearest.shape[1] <= CANDIDATE_IDS_MAX
                else nearest_ids_from_ip)
    dim = x.shape[1]
    n = x.shape[0] if rows is None else rows.shape[0]
    k = centroids.shape[0]
    conditioned = shift is not None or scale is not None
    if conditioned:
        cc = condition(centroids, shift, scale)
        c_sqnorms = sq_norms_serial(cc)
    else:
        cc = centroids
    # a small plain E-step (Lloyd's) runs as one parallel Numba region instead of Python threads
    plain = not (unit_rows or conditioned or exact_sq is not None) and x_sqnorms is not None and (
        n_threads is None or n_threads == get_num_threads())
    small = plain and n * k * dim <= _ONE_REGION_MAX_WORK
    direct = DIRECT_ASSIGN and nearest is None and direct_assign.fits(x.shape[1], k, small)
    if direct:
        ct, cn_padded = direct_assign.centre_operands(cc, c_sqnorms)
    else:
        ct = np.ascontiguousarray(cc.T)

    exact_labels = exact_labels or exact_sq is not None
    # the fused pass with rows in the lanes (few coordinates, plain l2 rows; see ROW_LANES_FINAL)
    lanes = (ROW_LANES_FINAL and DIRECT_ASSIGN and direct_assign.AVX512 and exact_sq is not None and nearest is None
             and rows is None and not unit_rows
             and not conditioned and x.flags.c_contiguous and x_sqnorms is None and dim <= ROW_LANES_FINAL_MAX_DIM
             and (annulus is None or not annulus.prune))
    # ... and Lloyd's E-steps of such rows where the products would otherwise be BLAS tiles (K > 64; int16 E-steps
    # are turned away in CertifiedCentres), poor at an inner dimension of 2-16 (ROW_LANES_E_STEP, lanes_e_step). Where
    # the BLAS lacks AVX-512 the direct kernel takes K up to 2,048 first; the two were even there (Zen 5, 2026-12-06,
    # whole fits, direct / lanes: 1M×2 K=128 0.94×, K=1,024 1.04×; 500k×8 K=128-256 1.03-1.04×; 300k×16 K=512 0.97×)
    lanes_e = (lanes_e_step(dim) and not direct and nearest is None and not unit_rows and not conditioned
               and x.strides[1] == 4)
    if lanes or lanes_e:
        g_count = row_lanes.group_size(k)
        cp = np.empty((row_lanes.padded_k(k), dim), np.float32)
        cnp_lanes = np.empty(cp.shape[0], np.float32)
        row_lanes.fill_centres(np.ascontiguousarray(cc, np.float32), np.asarray(c_sqnorms, np.float32), cp, cnp_lanes)
    if exact_labels:
        # (the fused pass of l2 rows on a small coordinate operand sums the row norms in float32; rows in the lanes
        # take float64 norms rounded to float32)
        lane_norms = direct and not lanes and not unit_rows and direct_assign.lane_norm_column(ct) >= 0
        kappa, tiny = label_margins(dim, lane_norms)
        cn_certify = np.ascontiguousarray(c_sqnorms[:k], np.float32)
        recomputed: list[int] = []

    if plain and nearest is None and check is None and not exact_labels and one_region_direct_e_step(n, dim, k):
        threads = max(1, get_num_threads())
        block = max(_DIRECT_MIN_ROWS, min(block_rows_for(dim, k), -(-n // (4 * threads))))
        direct_assign.direct_top2_parallel(np.ascontiguousarray(x), _NO_ROWS if rows is None else rows, ct,
                                           cn_padded, x_sqnorms, labels, d1, d2, block)
        return 0

    zero_rows: list[int] = []
    bad_rows: list[InvalidInput] = []

    # norms, products and exact distances row group by row group, one read of each row (kernels.direct_assign)
    fused = direct and exact_sq is not None and rows is None and not conditioned and x.flags.c_contiguous and (
        unit_rows or x_sqnorms is None)
    if not (fused and not unit_rows and ct.ndim == 2):
        annulus = None

    def run(s: int, e: int) -> None:
        # (d1/d2 None: this block's own scratch, which the allocator recycles, instead of fresh pages for every row)
        if d1 is None:
            d1b, d2b = np.empty(e - s, np.float32), np.empty(e - s, np.float32)
        else:
            d1b, d2b = d1[s:e], d2[s:e]
        if annulus is not None and annulus.prune:
            blocks = annulus_assign.annulus_top2_exact(x[s:e], annulus, labels[s:e], d1b, d2b,
                                                       exact_sq[s:e], kappa, tiny)
            if blocks >= 0:  # (else a row is not finite: the paths below name it)
                annulus.record(e - s, blocks)
                labels[s:e] = annulus.order[labels[s:e]]
                recomputed.append(certify_top2(x[s:e], centroids, labels[s:e], d1b, d2b, exact_sq[s:e],
                                               False, cn_certify, kappa, tiny))
                return
        if lanes and row_lanes.tile_top2_exact(x[s:e], cp, cnp_lanes, g_count, centroids, labels[s:e], d1b, d2b,
                                               exact_sq[s:e]):
            # (every row of the block is finite, as with direct_top2_exact below)
            recomputed.append(certify_top2(x[s:e], centroids, labels[s:e], d1b, d2b, exact_sq[s:e], False,
                                           cn_certify, kappa, tiny))
            return
        if fused and direct_assign.direct_top2_exact(x[s:e], ct, cn_padded, centroids, labels[s:e], d1b,
                                                     d2b, exact_sq[s:e], unit_rows, *_SAFE_SQNORM):
            # (with ``check``: every row of the block is finite, see direct_top2_exact)
            recomputed.append(certify_top2(x[s:e], centroids, labels[s:e], d1b, d2b, exact_sq[s:e], unit_rows,
                                           cn_certify, kappa, tiny))
            return
        xb = x[s:e] if rows is None else x[rows[s:e]]
        if check is not None:
            try:
                check_finite(xb, row_offset + s, check)
            except InvalidInput as err:
                bad_rows.append(err)
                return
        factor = None  # unit_rows: 1/‖x‖ per row
        rows_exact = None  # rows the labels are certified and distances measured on, when not the product rows
        if unit_rows:
            xn64 = sq_norms64_serial(xb)
            with np.errstate(over="ignore"):  # beyond float32: inf, which scales_unit_rows sends to the unit copy
                xn = xn64.astype(np.float32)
            if not scales_unit_rows(xn):
                unit = np.empty_like(xb)
                first = normalise_rows_into(xb, unit)
                if first >= 0:
                    zero_rows.append(s + first)
                    return
                # The products take the float32 unit copy; labels and distances keep the one definition, x scaled
                # by 1/‖x‖ in float64 (a review: certifying the copy itself let one extreme row in a block change the
                # labels of nearly parallel ordinary rows in it). The copy's rounding, u per coordinate, is within
                # the margin's allowance for scaled unit rows (label_margins).
                rows_exact, factor_exact = xb, 1.0 / np.sqrt(xn64)
                xb, xn = unit, sq_norms_serial(unit)
            else:
                factor = 1.0 / np.sqrt(xn64)  # from the float64 norm, as every path scales unit rows
                xn = (xn64 * factor * factor).astype(np.float32)  # ‖x/‖x‖‖² (1 up to rounding)
        elif conditioned:
            raw, xb = xb, condition(xb, shift, scale)
            xn = sq_norms_serial(xb)
        else:
            xn = sq_norms_serial(xb) if x_sqnorms is None else x_sqnorms[s:e]
        scale32 = None if factor is None else factor.astype(np.float32)
        if direct:
            direct_assign.direct_top2(np.ascontiguousarray(xb), ct, cn_padded, xn, labels[s:e], d1b, d2b,
                                      scale32)
        elif lanes_e:
            row_lanes.tile_top2_given(np.ascontiguousarray(xb), cp, cnp_lanes, g_count,
                                      np.ascontiguousarray(xn, np.float32), labels[s:e], d1b, d2b)
        else:
            with np.errstate(over="ignore"):  # rows near float32's limit: their top-2 is made exact by certify_top2
                g = xb @ ct
            if nearest is not None:
                pick(g, c_sqnorms, xn, nearest[s:e])
            top2_from_ip(g, c_sqnorms, xn, labels[s:e], d1b, d2b, scale32)
        if rows_exact is not None:
            xb, factor = rows_exact, factor_exact
        if exact_sq is not None:
            exact_sq[s:e] = (exact_sq_dist_rows(raw if conditioned else xb, centroids, labels[s:e]) if factor is None
                             else exact_sq_dist_rows_scaled(xb, centroids, labels[s:e], factor))
        if exact_labels:
            recomputed.append(certify_top2(raw if conditioned else xb, centroids, labels[s:e], d1b, d2b,
                                           _NO_EXACT if exact_sq is None else exact_sq[s:e], factor is not None,
                                           cn_certify, kappa, tiny))

    for_each_block(n, balanced_rows(n, block_rows_for(dim, k)), run, n_threads, work=n * dim * (k + 1))
    if bad_rows:  # NaN/inf before zero rows, as when the input is validated first
        raise min(bad_rows, key=lambda err: err.bad_row)
    if zero_rows:
        raise zero_norm_error(min(zero_rows) + row_offset)
    return sum(recomputed) if exact_labels else 0


def lanes_e_step(dim: int) -> bool:
    """Whether Lloyd's E-steps on rows of ``dim`` coordinates put rows in the vector lanes (``ROW_LANES_E_STEP``) where
    they would otherwise take BLAS tiles or, on int16 hosts, int16 products: whole fits (Zen 4, 2026-12-06, seeds 0-1,
    int16 / rows in lanes / BLAS E-steps) 1M × 2 K = 1,024 1,027-1,057 / 465 / 1,274-1,285 ms, 500k × 8 K = 256
    121-122 / 80-83 / 97-98 ms, 300k × 16 K = 512 305-307 / 285-290 / 395-406 ms, 200k × 16 K = 128 even."""
    return ROW_LANES_E_STEP and DIRECT_ASSIGN and direct_assign.AVX512 and dim <= ROW_LANES_FINAL_MAX_DIM


def _int16_final(k: int, dim: int) -> bool:
    """Whether a final assignment of K centres of D coordinates takes int16 products on an ``I16_HOST`` host."""
    if k < I16_MIN_K:
        return False
    if not _HALF_RATE_HOST:
        return True
    return k * dim >= I16_HALF_RATE_MIN_KD or (k >= I16_HALF_RATE_MIN_K and dim >= 16)


class CertifiedCentres:
    """Centres prepared for :func:`assign_certified` and certified E-steps: the operands of one product backend — AMX
    bf16 tiles (``backend == "amx"``, :mod:`kvant.kernels.amx_assign`; K >= ``AMX_MIN_K`` and K·D >= ``AMX_MIN_KD``) or,
    on AVX2 hosts without AVX-512 and on AMD Zen 4 (``I16_HOST``), int16 products (``"int16"``,
    :mod:`kvant.kernels.i16_assign`; K >= ``I16_MIN_K``; in E-steps of more than ``_ONE_REGION_MAX_WORK`` products,
    ``rows`` × K × D, K >= ``I16_E_STEP_MIN_K``); E-steps of either backend need ``rows`` >=
    ``CERTIFIED_E_STEP_MIN_ROWS``. ``ok`` is False when neither applies, for l2 data of extreme magnitude
    (``conditioning`` asks for a scale), or, for Lloyd's E-steps (``e_step``) with ``AMX_E_STEP_INNER`` off, centre
    norms spread beyond ``AMX_MAX_NORM_SPREAD`` (with it on, such E-steps scan the inner centres only: ``inner_lower``;
    the int16 backend leaves such centres to the float32 kernels in every assignment)."""

    def __init__(self, centroids: np.ndarray, spherical: bool, e_step: bool = False, rows: int = 0):
        k, dim = centroids.shape
        self.centroids = np.ascontiguousarray(centroids, np.float32)
        self.inner_lower = False
        self.backend = None
        if e_step and rows < CERTIFIED_E_STEP_MIN_ROWS:
            pass  # a small E-step: the float32 kernels
        elif AMX_ASSIGN and amx_assign.AVAILABLE and k >= AMX_MIN_K and k * dim >= AMX_MIN_KD:
            self.backend = "amx"
        elif I16_ASSIGN and I16_HOST:
            big_e_step = k >= I16_E_STEP_MIN_K and rows * k * dim > _ONE_REGION_MAX_WORK and not lanes_e_step(dim)
            if big_e_step if e_step else _int16_final(k, dim):
                self.backend = "int16"
        self.ok = self.backend is not None and (spherical or conditioning(self.centroids)[1] is None)
        if not self.ok:
            return
        with np.errstate(over="ignore", invalid="ignore"):  # centres beyond float32's reach: checked just below
            if self.backend == "amx":
                self.mu, self.bt, self.cn, self.cstat = amx_assign.pack_centres(self.centroids)
                self.gamma = amx_assign.gamma(dim)
            else:
                self.mu, self.ct, self.colstep, self.cn, self.cstat = i16_assign.pack_centres(self.centroids)
        if not (np.isfinite(self.cn[:k]).all() and np.isfinite(self.cstat).all()):
            self.ok = False  # e.g. centres of ~1e19 and up (unit rows take any centres): the float32 kernels
            return
        norms = self.cstat[0]
        far = bool(norms.max() > AMX_MAX_NORM_SPREAD * np.median(norms))
        if far and self.backend == "int16" and not (I16_FAR_CENTRES and k * dim >= I16_FAR_MIN_KD):
            # int16 gained nothing there on AVX2: heavy-tailed 1M×128 K=256 l2 final assignment, 1.03× the float32 path
            self.ok = False
        elif e_step:  # a few centres far out (heavy tails) leave most rows to the per-centre scan
            if AMX_E_STEP_INNER:
                self.inner_lower = far  # ... of the inner centres only
            else:
                self.ok = not far

    def assign_rows(self, x, rows, unit_rows, labels, exact_sq, lower2=_NO_LOWER, nearest=_NO_NEAREST) -> int:
        """The backend's ``assign_rows`` (:func:`kvant.kernels.amx_assign.assign_rows`) on these centres."""
        if self.backend == "amx":
            return amx_assign.assign_rows(x, rows, self.centroids, self.mu, self.bt, self.cn, self.cstat, self.gamma,
                                          self.inner_lower, unit_rows, amx_assign.TILE_CONFIG, labels, exact_sq,
                                          lower2, nearest)
        return i16_assign.assign_rows(x, rows, self.centroids, self.mu, self.ct, self.colstep, self.cn, self.cstat,
                                      self.inner_lower, unit_rows, labels, exact_sq, lower2, nearest)


def _certified_block_rows(n: int, n_threads: int | None = None) -> int:
    """Rows per block of the certified kernels: 8192, or fewer (whole 32-row strips) so that every thread gets a
    block. With 8192 a small E-step ran on one thread: digits K=1024 (1,797 rows) took 6.7 ms per int16 E-step
    against 3.1 ms for the float32 path on two."""
    threads = max(1, n_threads or get_num_threads())
    per_thread = -(-n // threads)
    return max(32, min(8192, -(-per_thread // 32) * 32))


def assign_certified(x: np.ndarray, cc: CertifiedCentres, labels: np.ndarray, exact_sq: np.ndarray,
                     unit_rows: bool = False, row_offset: int = 0, n_threads: int | None = None) -> None:
    """Exact nearest centre of every row of ``x`` and its float64 squared distance (of the unit row when
    ``unit_rows``), from ``cc``'s certified products (bf16 tiles or int16, :class:`CertifiedCentres`); ``cc.ok`` must
    be True.
    A zero row with ``unit_rows`` raises :class:`InvalidInput` naming row ``row_offset + i``."""
    x = np.ascontiguousarray(x, np.float32)

    def run(s: int, e: int) -> None:
        cc.assign_rows(x[s:e], _NO_ROWS, unit_rows, labels[s:e], exact_sq[s:e])

    for_each_block(x.shape[0], _certified_block_rows(x.shape[0], n_threads), run, n_threads,
                   work=x.shape[0] * x.shape[1] * (cc.centroids.shape[0] + 1))
    if unit_rows and x.shape[0]:
        bad = np.flatnonzero(labels[: x.shape[0]] < 0)
        if bad.size:
            raise zero_norm_error(int(bad[0]) + row_offset)


def e_step(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, d1: np.ndarray, d2: np.ndarray,
           x_sqnorms: np.ndarray, rows: np.ndarray | None = None, nearest: np.ndarray | None = None) -> bool:
    """Lloyd's E-step on rows ``x`` (in-memory float32, already conditioned or unit): labels, ``d1`` the squared
    distance to the label, ``d2`` the runner-up's or a lower bound on it (all Hamerly's bounds need); ``rows`` and
    ``nearest`` as in :func:`assign_top2`.

    With K >= ``AMX_MIN_K`` and K·D >= ``AMX_MIN_KD`` on AMX hosts, or K >= ``I16_E_STEP_MIN_K`` on AVX2 hosts (not
    for small E-steps, :class:`CertifiedCentres`), the labels come from certified bf16 tile or int16 products (exact
    nearest centres,
    ``d1`` exact, ``d2`` a lower bound, candidate ids from the approximate distances with the label among them);
    elsewhere from :func:`assign_top2` (nearest up to float32 rounding of the expanded distances).

    Returns True when ``d1``/``d2`` are the float32 top-2 distances (:func:`assign_top2`'s, which
    :func:`kvant.kernels.assign.certify_top2` can make exact), False when they came from a certified backend."""
    n = x.shape[0] if rows is None else rows.shape[0]
    cc = CertifiedCentres(centroids, spherical=False, e_step=True, rows=n)
    if not cc.ok:
        assign_top2(x, centroids, sq_norms_serial(centroids), labels, d1, d2, x_sqnorms=x_sqnorms, rows=rows,
                    nearest=nearest)
        return True
    exact = np.empty(n, np.float64)

    def run(s: int, e: int) -> None:
        xs, listed = (x[s:e], _NO_ROWS) if rows is None else (x, rows[s:e])
        near = _NO_NEAREST if nearest is None else nearest[s:e]
        cc.assign_rows(xs, listed, False, labels[s:e], exact[s:e], d2[s:e], near)

    for_each_block(n, _certified_block_rows(n), run, work=n * x.shape[1] * (centroids.shape[0] + 1))
    with np.errstate(over="ignore"):  # (beyond float32's range: inf, a loose but valid upper bound)
        d1[:] = exact
    return False
