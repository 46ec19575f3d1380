"""First non-finite row of a float32 block, without the (n, d) boolean mask ``np.isfinite`` allocates.

A float32 is NaN or ±inf exactly when its exponent bits are all ones, so the test is an integer mask and
compare that LLVM vectorises; rows are scanned in order and the scan stops at the first bad one.
:func:`first_nonfinite_row_parallel` splits a large block into row ranges scanned on all threads (one thread
read 1M × 128 float32 at ~6.7 GB/s, ~80 ms: 9% of encoding those rows with PQ16x8).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange


@numba.njit(inline="always", cache=True, nogil=True)
def _row_is_bad(bits, i):
    exp = np.int32(0x7F800000)
    bad = 0
    for j in range(bits.shape[1]):
        bad |= (bits[i, j] & exp) == exp
    return bad != 0


@numba.njit(cache=True, nogil=True)
def first_nonfinite_row(bits):
    """Index of the first row of ``bits`` (a float32 (n, d) block viewed as int32) holding NaN or inf; -1 if none."""
    for i in range(bits.shape[0]):
        if _row_is_bad(bits, i):
            return i
    return -1


@numba.njit(cache=True, nogil=True, parallel=True)
def first_nonfinite_row_parallel(bits, block_rows):
    """:func:`first_nonfinite_row` with ranges of ``block_rows`` rows scanned in parallel; the same answer."""
    n = bits.shape[0]
    nb = (n + block_rows - 1) // block_rows
    first = np.full(nb, -1, np.int64)
    for b in prange(nb):
        for i in range(b * block_rows, min(n, (b + 1) * block_rows)):
            if _row_is_bad(bits, i):
                first[b] = i
                break
    for b in range(nb):
        if first[b] >= 0:
            return first[b]
    return -1
