"""The AMX path's row conversion (kvant.kernels.amx_assign._convert_row): plain vector code, so it runs on every host,
AMX or not."""

import numba
import numpy as np
import pytest

from kvant.kernels import amx_assign


@numba.njit
def _convert_rows(x, mu):
    n, dim = x.shape
    a16 = np.zeros((1, dim), np.uint16)
    one = np.zeros(1, np.float32)
    out = np.empty((n, 2), np.float64)
    raw = np.empty(n, np.float64)
    n16 = dim - dim % 16
    for i in range(n):
        out[i, 0], out[i, 1] = amx_assign._convert_row(x, i, np.float32(1.0), mu, a16, 0, one)
        raw[i] = amx_assign._convert16(x, i, np.float32(1.0), mu, a16, 0, n16)[1] if n16 else 0.0
    return out, raw


@pytest.mark.parametrize("scale", [1.0, 1e-20, 1e-30, 1e30, "mixed"])
@pytest.mark.parametrize("dim", [16, 47, 128, 384])
def test_row_residual_bound_covers_the_exact_residual(scale, dim):
    # ‖h − v‖² comes from float32 lane sums, inflated by _err_bound: never below the exact sum (subnormal squares
    # included), and within a hair above it
    g = np.random.default_rng(dim)
    x = g.standard_normal((300, dim))
    x = (x * (10.0 ** g.uniform(-30, 30, (300, 1))) if scale == "mixed" else x * scale).astype(np.float32)
    mu = np.zeros(dim, np.float32)
    (got, raw) = _convert_rows(x, mu)
    h = (amx_assign._bf16_bits(x).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    exact = ((h - x.astype(np.float64)) ** 2).sum(1)
    np.testing.assert_allclose(got[:, 0], (x.astype(np.float64) ** 2).sum(1), rtol=1e-12)
    assert np.all(got[:, 1] >= exact)
    # residuals beyond float32's range (values above ~1e22, which conditioning keeps off this path) give +inf: still a
    # bound, and such rows go to the exact per-centre scan
    fits = exact < 1e36
    assert np.all(got[fits, 1] <= exact[fits] * (1 + 1e-4) + dim * 2.0**-125)
    if scale == 1.0 and dim >= 128:  # the bare float32 sums do fall below the exact ones: the bound is needed
        assert np.any(raw < ((h - x.astype(np.float64))[:, : dim - dim % 16] ** 2).sum(1))
