"""First non-finite row of a float32 block, without the (n, d) boolean mask ``np.isfinite`` allocates.

A float32 is NaN or ±inf exactly when its exponent bits are all ones, so the test is an integer mask and
compare that LLVM vectorises; rows are scanned in order and the scan stops at the first bad one.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def first_nonfinite_row(bits):
    """Index of the first row of ``bits`` (a float32 (n, d) block viewed as int32) holding NaN or inf; -1 if none."""
    n, d = bits.shape
    exp = np.int32(0x7F800000)
    for i in range(n):
        bad = 0
        for j in range(d):
            bad |= (bits[i, j] & exp) == exp
        if bad:
            return i
    return -1
