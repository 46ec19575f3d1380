"""Fused assignment: for each row, the nearest centroid and the two smallest squared distances.

``top2_from_ip`` finishes a BLAS inner-product block. A hand-written direct kernel (Σ(x−c)² term by term)
was measured against it on D·K from 16 to 3,000 and lost everywhere, by 1× to 10× (docs/auto.md), so
BLAS is used for every shape. The top-2 distances feed Hamerly bounds in
:mod:`kvant.cluster.lloyd`: the second distance is the lower bound to every other centroid.
Ties go to the smaller centroid id. The kernel is serial and ``nogil``: callers run them on row blocks
from several threads (see :mod:`kvant._parallel`).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_JIT = dict(cache=True, nogil=True, fastmath=False)


@intrinsic
def _f32_bits(typingctx, x):
    """The int32 bit pattern of a float32 (a register bitcast; NumPy's ``view`` has no scalar form in Numba)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@numba.njit(**_JIT)
def top2_from_ip(g, c_sqnorms, x_sqnorms, labels, d1, d2, row_scale=None):
    """g (b, K) = x·cᵀ, overwritten as scratch. Writes labels (argmin ‖x−c‖²), d1 (its squared distance)
    and d2 (the runner-up's). ``row_scale`` (b,) float32, if given, multiplies row i of g first (in float32,
    as ``g *= row_scale[:, None]`` would, without that extra pass over g): spherical k-means assigns raw rows
    this way, with 1/‖x‖ as the scale.

    Distances ‖x‖² + ‖c‖² − 2x·c are clamped at 0 and handled as int32 bit patterns, which order exactly
    like non-negative floats: the clamp is a max with 0 (negative floats, −0.0 included, have negative
    patterns; NaN patterns above +inf's are mapped to 0 as well, so a label is always < K) and every min is
    an integer min, so LLVM vectorises all three passes without fast-math.
    Pass 1 writes the distances and their minimum; pass 2 counts the minimum's occurrences and finds the
    smallest value above it (the runner-up is the minimum again when it occurs twice); pass 3 finds the
    minimum's first index (ties go to the smaller centroid id). An early-exit search for that index was
    scalar and cost half of the kernel at K = 256 (two-pass version: 2× faster at K ≥ 256 on this VM).
    """
    b, K = g.shape
    bits = g.view(np.int32)
    big = np.int32(0x7F800000)  # +inf's bit pattern
    zero = np.int32(0)
    one = np.int32(1)
    kk = np.int32(K)
    two = np.float32(2.0)
    for i in range(b):
        row = g[i]
        brow = bits[i]
        xi = x_sqnorms[i]
        best = big
        if row_scale is not None:  # (a separate loop: the unscaled one stays free of the multiply)
            f = row_scale[i]
            for j in range(K):
                row[j] *= f
        for j in range(K):
            v = max(_f32_bits(xi + c_sqnorms[j] - two * row[j]), zero)
            v = v if v <= big else zero  # NaN (any sign) -> 0, as the float clamp `v if v > 0 else 0` did
            brow[j] = v
            best = min(best, v)
        above = big
        count = zero
        for j in range(K):
            v = brow[j]
            hit = v == best
            above = min(above, big if hit else v)
            count += one if hit else zero
        arg = kk
        for j in range(K):
            arg = min(arg, np.int32(j) if brow[j] == best else kk)
        labels[i] = arg
        d1[i] = row[arg]
        d2[i] = np.int32(best if count > one else above).view(np.float32)  # +inf when K == 1
