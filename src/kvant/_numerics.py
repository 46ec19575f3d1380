"""Float32 conditioning of squared-distance computations (shared by clustering and the flat index).

The fast form ‖x−c‖² = ‖x‖² + ‖c‖² − 2x·c (one GEMM) is exact only up to ~eps·‖x‖²: on data with a large
common offset the three terms cancel, and at extreme magnitudes ‖x‖² over- or underflows float32. Moving
the rows to (x − shift)·scale first keeps every distance (× scale²) and removes both problems.
"""

from __future__ import annotations

import math

import numpy as np

from .kernels.distance import mean_and_spread

# conditioning(): squared norms fed to the GEMM are brought into [2**-40, 2**40] by a power-of-two scale
_SAFE_LOG2_SQNORM = 40
_MAX_LOG2_SQNORM = 100  # and none above 2**100 after scaling, where float32 sums of them would overflow
_CONDITION_ROWS = 1024
# conditioning(): shift when ‖μ‖² > this × the rows' spread. Below it the float32 rounding of the GEMM trick,
# ~eps·‖x‖² per distance, stays under ~1e-5 of the typical distance (Fashion-MNIST pixels: 1.4; digits: 2.2)
# and the per-block subtraction (+40% on Fashion-MNIST K=10) is not worth it.
_OFFSET_RATIO = 16.0


def _sample_step(n: int) -> int:
    """The stride that looks at ≤ _CONDITION_ROWS evenly spaced rows of n (n // 1024 looked at up to 2,047)."""
    return max(1, -(-n // _CONDITION_ROWS))


def conditioning(rows: np.ndarray) -> tuple[np.ndarray | None, float | None]:
    """(shift, scale) for exact-enough float32 distances ‖x−c‖² = ‖x‖² + ‖c‖² − 2x·c on data like ``rows``.

    The GEMM trick loses the answer when the rows share a large common offset (‖μ‖² ≫ their spread: the
    three terms cancel in float32) and over- or underflows at extreme magnitudes. So the rows are moved to
    (x − shift)·scale first: ``shift`` = their mean when ‖μ‖² exceeds 16× the mean ‖x − μ‖² (else None), and
    ``scale`` a power of two (exact) bringing the median row's squared norm near 1 when it lies outside
    [2**-40, 2**40] (else None), lowered where the largest would exceed 2**100. Distances between shifted rows
    are unchanged; scaled ones by scale². The decision looks at ≤ 1,024 evenly spaced rows, in float64.
    """
    n = rows.shape[0]
    if n == 0:
        return None, None
    if rows.dtype not in (np.float32, np.float64):
        rows = rows[:: _sample_step(n)].astype(np.float64)
        n = rows.shape[0]
    mu, spread, sq, dev, sqs = mean_and_spread(rows, _sample_step(n))
    offset = float(mu @ mu)
    shift = mu.astype(np.float32) if offset > _OFFSET_RATIO * spread else None
    per_row = dev if shift is not None else sqs
    # the typical row is the median one: scaled by the mean, one row of 1e24 among 1,000 of ~5 took the others to
    # ~1e-23, where their squares are float32 subnormals, and training collapsed (~1,250x the MSE, a review)
    lo, top = float(per_row.min()), float(per_row.max())
    # (when every row is in the safe range, so is the median: no scale, without the median's ~15 us)
    in_range = 2.0**-_SAFE_LOG2_SQNORM <= lo and top <= 2.0**_SAFE_LOG2_SQNORM
    scale = None if in_range else _pow2_scale(float(np.median(per_row)))
    # but never so little that the largest squared norm seen leaves float32's range (headroom 2**28 for sums)
    top *= 1.0 if scale is None else scale * scale
    if top > 2.0**_MAX_LOG2_SQNORM:
        scale = math.ldexp(1.0 if scale is None else scale, -math.ceil((math.log2(top) - _MAX_LOG2_SQNORM) / 2))
    return shift, scale


def _pow2_scales(sq: np.ndarray) -> np.ndarray:
    """Per squared norm in ``sq``, a power of two bringing it near 1 when it lies outside [2**-40, 2**40], else 1."""
    with np.errstate(divide="ignore"):
        lg = np.log2(sq)
    return np.where(np.isfinite(lg) & (np.abs(lg) > _SAFE_LOG2_SQNORM), np.exp2(-np.round(lg / 2)), 1.0)


def _pow2_scale(typical: float) -> float | None:
    """A power of two bringing a typical squared norm ``typical`` near 1 when it lies outside [2**-40, 2**40]:
    :func:`_pow2_scales` for one number, in plain floats (NumPy's error-state context cost ~10 µs per fit)."""
    typical = float(typical)
    if not (0.0 < typical < math.inf):  # log2 of 0 is -inf, of NaN NaN: no scale, as _pow2_scales
        return None
    lg = math.log2(typical)
    if abs(lg) <= _SAFE_LOG2_SQNORM:
        return None
    return math.ldexp(1.0, -round(lg / 2))  # round: half to even, as np.round


def magnitude_scale(rows: np.ndarray) -> float | None:
    """A power of two bringing the rows' typical squared *norm* near 1 when it lies outside [2**-40, 2**40]
    (else None), from ≤ 1,024 evenly spaced rows in float64. For inner products, which are not shift
    invariant: :func:`conditioning` takes its scale from the spread once it shifts, and one row (or identical
    rows) has no spread at all."""
    n = rows.shape[0]
    if n == 0:
        return None
    sub = rows[:: _sample_step(n)].astype(np.float64)
    return _pow2_scale(float(np.einsum("ij,ij->", sub, sub)) / sub.shape[0])


def row_magnitude_scales(rows: np.ndarray) -> np.ndarray | None:
    """Per row, a power of two bringing its squared norm near 1 when that lies outside [2**-40, 2**40], else 1
    (float64, one per row); None when every row is within range. For queries ranked by inner products, where any
    positive factor per query keeps its order: one factor for a whole batch (:func:`magnitude_scale`) pushed the
    ordinary queries of a batch that also held a 1e25 one to 0."""
    sq = np.einsum("ij,ij->i", rows, rows, dtype=np.float64)
    safe = 2.0**_SAFE_LOG2_SQNORM
    if sq.size and 1.0 / safe <= sq.min() and sq.max() <= safe:  # every row in range (the common case; NaN is not)
        return None  # (~2 µs, against ~10 µs of _pow2_scales' log2 and where for a one-query search)
    out = _pow2_scales(sq)
    return out if np.any(out != 1.0) else None


def scale_rows(x: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """x[i]·scales[i] as float32 (x itself when ``scales`` is None): powers of two, exact wherever the result
    is a normal float32."""
    if scales is None:
        return x
    return (x.astype(np.float64) * scales[:, None]).astype(np.float32)


def scale_steps(scale: float | None) -> list[float]:
    """The float32 factors a power-of-two ``scale`` is applied in, in order: one beyond float32's range (data near
    its subnormals needs up to ~2**150) goes in steps that are, each exact, the intermediate only growing towards
    the result. Empty for None or 1."""
    steps = []
    while scale is not None and scale != 1.0:
        step = min(max(scale, 2.0**-100), 2.0**100)
        steps.append(step)
        scale = scale / step
    return steps


def condition(x: np.ndarray, shift: np.ndarray | None, scale: float | None) -> np.ndarray:
    """(x − shift)·scale as a new float32 array (x itself when both are None)."""
    if shift is None and scale is None:
        return x
    y = np.subtract(x, shift, dtype=np.float32) if shift is not None else np.array(x, np.float32)
    for step in scale_steps(scale):
        y *= np.float32(step)
    return y


def uncondition(c: np.ndarray, shift: np.ndarray | None, scale: float | None) -> np.ndarray:
    """Centroids found on conditioned rows, back in the data's coordinates (float32)."""
    if shift is None and scale is None:
        return c
    out = c.astype(np.float64)
    if scale is not None:
        out /= scale
    if shift is not None:
        out += shift
    return out.astype(np.float32)
