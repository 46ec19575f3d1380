"""The training sample: a lightweight coreset (default) or uniform rows.

k-means trains on a sample of about ``m`` rows and then assigns every row. A uniform sample estimates the
objective badly when a few rows carry much of it: with heavy-tailed noise the far rows that dominate the
full-data MSE are mostly left out, and the centres never go near them (on the benchmark's Student-t data
full-data methods reached 47-70% lower MSE than FAISS's uniform 256·K sample).

A *lightweight coreset* (Bachem, Lucic & Krause, KDD 2018) fixes that at the cost of one pass over the
rows: each row gets the proposal

    q_i = ½·1/n + ½·d(x_i, μ)² / Σ_j d(x_j, μ)²

(half uniform, half proportional to its squared distance from the data's centre μ), and the weighted
sample is an unbiased estimate of the k-means objective for *every* set of centres. kvant draws it by
Poisson sampling: row i is kept with probability π_i = min(1, s·q_i), with s set so that Σ π_i = m, and
weighs 1/π_i (:func:`coreset_inclusion`, :func:`poisson_sample`; the passes over the rows' distances are Numba
kernels, :mod:`kvant.kernels.sampling`). Rows far out are kept with certainty (weight 1); typical rows weigh
about n/m. Weighted Lloyd then optimises that estimate. On data without such rows q is close to uniform and the
sample behaves like a uniform one.

The pass over every row is what buys this: a coreset drawn from a uniform pre-sample of 4-16·m rows (it would
save most of that pass) lost the gain — heavy-tailed 1M×128, K = 64: MSE 1,324 with every row against
4,314-5,589 with the pre-sample and 5,713 for FAISS's uniform sample (mean of 3 seeds, 2026-12-03).

μ is the mean of a uniform pre-sample of ``CENTRE_ROWS`` rows: any fixed centre keeps the estimate
unbiased (the weights correct for whatever the proposal is); the mean only makes it efficient.

For unit rows (``cos``) the proposal's spread is bounded before the pass: every unit row lies at a distance
between 1 − a and 1 + a from a centre of norm a < 1, and so does the root mean square of all of them, so every
row's q_i·n = ½ + ½·d_i²/mean(d²) lies in [½(1 + 1/r), ½(1 + r)] with r = ((1 + a)/(1 − a))², whatever the rows
are (:func:`unit_proposal_ratio`). When directions spread evenly (a small centre) that is a few per cent from
uniform, and the pass over every row would buy a sample indistinguishable from a uniform one: then a uniform
sample is drawn instead (:data:`NEAR_UNIFORM`). Measured on the benchmark's 1M×128 and 200k×384 `cos` data
(centre norms 0.02-0.03; Zen 4 host, 2026-12-05, 5 seeds each, coreset against uniform): mean cosine within
−0.23% to +0.23% (8 of 12 cells higher with the uniform sample), K=10 fits 0.70-0.77× the time.
"""

from __future__ import annotations

import numpy as np

from .._config import get_num_threads, rng
from .._parallel import for_each_block
from ..errors import InvalidInput
from ..io import check_finite
from ..io.source import check_finite_rows
from ..kernels.distance import gather_rows_into
from ..kernels.lloyd import sq_dist_to_point, sq_dist_to_point_unit
from ..kernels.sampling import poisson_draw, sum_at_least
from .assign import zero_norm_error
from .lloyd import normalise_rows

SAMPLINGS = ("coreset", "uniform")
CENTRE_ROWS = 4096  # uniform rows whose mean is the proposal's centre
# The largest ratio of the unit-row proposal to uniform (unit_proposal_ratio) at which the coreset is drawn as a
# uniform sample; 1.1 holds for centre norms up to 0.0456 (Zipf-like data with centre norms 0.06-0.10, where the
# coreset measured 0.4-0.6% better than uniform in docs/auto.md, keeps the coreset).
NEAR_UNIFORM = 1.1
_SCALE_STEPS = 64  # cap on the steps solving Σ min(1, s·q_i) = m for s (it takes a handful)


def gather_rows(src, read, norm=False, normalised=False):
    """``read()`` (rows gathered from ``src`` into a new array, unit-normalised in place when ``norm``, unless
    ``normalised``: ``read`` did that); when a gathered row is bad (NaN/inf, or zero for cos), scan the source in order
    first, so the error names the data's first bad row rather than the sample's."""
    try:
        rows = read()
        return normalise_rows(rows, in_place=True) if norm and not normalised else rows
    except InvalidInput:
        for start, block in src.chunks():  # raises at the first bad row
            if norm:
                normalise_rows(block, start)
        raise


# Rows per block of gather_array_rows (at least): each thread takes one block of a sample
_GATHER_MIN_ROWS = 1024


def gather_array_rows(src, x: np.ndarray, idx: np.ndarray, norm: bool = False) -> np.ndarray:
    """Rows ``idx`` of ``x`` (``src``'s rows in RAM as a C-contiguous float32 array, not a memory map), unit-normalised
    when ``norm``, in one pass on every thread (:func:`kvant.kernels.distance.gather_rows_into`); bad rows are named as
    :func:`gather_rows` names them. A 16,384 × 384 sample of a 200k-row array (cos): 4 ms, against 11-13 ms for NumPy's
    gather and an in-place normalisation after it (Zen 4 host, 2026-12-05)."""
    idx = np.ascontiguousarray(idx, np.int64)

    def read() -> np.ndarray:
        out = np.empty((idx.size, x.shape[1]), np.float32)
        zero: list[int] = []

        def run(a: int, b: int) -> None:
            r = gather_rows_into(x, idx[a:b], out[a:b], norm)
            if r >= 0:
                zero.append(a + r)

        for_each_block(idx.size, max(_GATHER_MIN_ROWS, -(-idx.size // max(1, get_num_threads()))), run,
                       work=idx.size * x.shape[1])
        if x is getattr(src, "array", None) and not src.validated:
            check_finite_rows(out, idx, src.name)  # (a row holding NaN/inf stays non-finite when normalised)
        if zero:
            raise zero_norm_error(int(idx[min(zero)]))
        return out

    return gather_rows(src, read, norm, normalised=True)


def sq_distances(blocks, n: int, centre: np.ndarray, name: str = "input", unit: bool = False) -> np.ndarray:
    """‖x_i − centre‖² (float64) of every row, from one pass over ``blocks`` (an iterable of (start, rows));
    with ``unit``, of the unit-normalised row ‖x_i/‖x_i‖ − centre‖², without writing a normalised copy.

    The pass doubles as the check of unvalidated rows: with a finite centre, a row's float64 sums are
    finite exactly when the row is (float32 values cannot overflow them), so a block with a non-finite
    distance is handed to :func:`check_finite` (and, with ``unit``, to the zero-row check), which raise
    naming its first bad row.
    """
    d2 = np.empty(n, np.float64)
    c = np.ascontiguousarray(centre, np.float32)
    kernel = sq_dist_to_point_unit if unit else sq_dist_to_point
    for s, block in blocks:

        def run(a, b, s=s, block=block):
            d2[s + a : s + b] = kernel(block[a:b], c)

        for_each_block(block.shape[0], 16384, run, work=block.size)
        if not np.isfinite(d2[s : s + block.shape[0]]).all():
            check_finite(block, s, name)
            if unit:  # every row is finite, so the first non-finite distance is the first zero row
                r = int(np.flatnonzero(~np.isfinite(d2[s : s + block.shape[0]]))[0])
                normalise_rows(block[r : r + 1], s + r)  # raises naming it (one row normalised, not the block)
    return d2


def unit_proposal_ratio(centre_norm: float) -> float:
    """The largest q_i·n the coreset proposal around a centre of norm ``centre_norm`` can give a unit row (the
    smallest is at least its inverse): ½(1 + ((1 + a)/(1 − a))²); inf from a = 1 on."""
    a = float(centre_norm)
    if not a < 1.0:  # (NaN included)
        return float("inf")
    return 0.5 * (1.0 + ((1.0 + a) / (1.0 - a)) ** 2)


def coreset_inclusion(d2: np.ndarray, m: int) -> tuple[float, float]:
    """(a, b) with π_i = min(1, a + b·d2_i) = min(1, s·q_i) the coreset's inclusion probabilities: q_i = ½·1/n +
    ½·d2_i/Σd2 (uniform, q_i = 1/n, when the squared distances overflow or sum to zero or to a value whose inverse
    overflows) and s chosen so that Σ π_i = m (m < n). Rows with s·q_i >= 1 are certain. ``d2`` is not modified.

    f(s) = Σ min(1, s·q_i) is piecewise linear and increasing. Given the rows already capped at s (c of them,
    the others summing to U), the root if no further row caps is s' = (m − c) / U; s' >= s, so the capped set
    only grows and the loop ends once it stops changing (a few passes, even with heavy tails). The capped rows
    are those with d2_i at or above a threshold, so each pass is one :func:`sum_at_least` over ``d2``.
    """
    n = d2.shape[0]
    _, total = sum_at_least(d2, -np.inf)
    # uniform also when 1/Σd2 overflows (a sum below ~1e-308, which float32 rows cannot give: a nonzero squared
    # difference of float32 values is at least ~1e-90)
    if not (np.isfinite(total) and total > 0.0 and np.isfinite(0.5 / total)):
        return float(m) / n, 0.0
    a0, b0 = 0.5 / n, 0.5 / total
    q_sum = n * a0 + b0 * total  # 1 up to rounding
    s = float(m) / q_sum
    capped_before = -1
    for _ in range(_SCALE_STEPS):
        c, capped_d2 = sum_at_least(d2, (1.0 / s - a0) / b0)  # the rows with s·q_i >= 1
        if c == capped_before:  # the capped set stopped changing: s is the root
            break
        rest = q_sum - (c * a0 + b0 * capped_d2)
        if c >= m or rest <= 0.0:
            break
        s_new = (m - c) / rest
        if s_new <= s:
            break
        s, capped_before = s_new, c
    return s * a0, s * b0


def poisson_sample(d2: np.ndarray, a: float, b: float, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows kept by independent draws with probability π_i = min(1, a + b·d2_i), ascending, and their weights
    1/π_i. The uniforms are a hash of (key, row) with the key drawn from ``seed`` (:mod:`kvant.kernels.sampling`):
    the same rows for the same seed at any thread count."""
    key = rng(seed).integers(0, 2**64, dtype=np.uint64, endpoint=False)
    return poisson_draw(np.ascontiguousarray(d2, np.float64), float(a), float(b), np.uint64(key))


__all__ = ["SAMPLINGS", "CENTRE_ROWS", "NEAR_UNIFORM", "gather_array_rows", "gather_rows", "sq_distances",
           "unit_proposal_ratio", "coreset_inclusion", "poisson_sample"]
