"""The rows-in-lanes top-2 kernel (kernels.row_lanes) against the NumPy reference, bit for bit against the direct
kernel it stands in for, and inside the compiled small-input Lloyd loop."""

import numba
import numpy as np
import pytest

from kvant.bench import reference as ref
from kvant.kernels import row_lanes
from kvant.kernels.direct_assign import direct_top2, padded_centroids
from kvant.kernels.distance import sq_norms

# rows on both sides of the 16-row tile, D = 1 and odd D, K across the pass sizes (1-8 centres, 9-16 in two passes...)
SHAPES = [(0, 3, 1), (1, 1, 1), (5, 1, 3), (15, 2, 8), (16, 7, 9), (17, 5, 16), (33, 13, 17), (47, 130, 24),
          (300, 9, 10), (23, 4, 33), (64, 64, 64), (19, 3, 100)]


def _run(x, c, xn=None):
    return row_lanes.top2(x, c, sq_norms(x) if xn is None else xn, sq_norms(c))


def _direct(x, c, xn=None):
    n = x.shape[0]
    out = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.float32)
    ct, cn = padded_centroids(c, sq_norms(c))
    direct_top2(x, ct, cn, sq_norms(x) if xn is None else xn, *out)
    return out


def _bits(a):
    return np.asarray(a).view(np.int32 if a.dtype == np.float32 else np.int64)


def test_passes_share_the_centres_evenly():
    for k in range(1, 200):
        g, kp = row_lanes.group_size(k), row_lanes.padded_k(k)
        assert 1 <= g <= row_lanes.MAX_GROUP and kp % g == 0 and k <= kp < k + kp // g  # < one padded centre a pass


@pytest.mark.parametrize("n,d,k", SHAPES)
def test_tile_top2_matches_the_reference_and_the_direct_kernel(n, d, k):
    g = np.random.default_rng(n * 1000 + d * 10 + k)
    x = (g.standard_normal((n, d)) * 10.0 ** g.uniform(-3, 3, (n, 1))).astype(np.float32)  # rows of any size
    c = g.standard_normal((k, d)).astype(np.float32)
    got = _run(x, c)
    rl, r1, r2 = ref.top2_ref(x, c)
    np.testing.assert_array_equal(got[0], rl)
    np.testing.assert_allclose(got[1], r1, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got[2], r2, rtol=1e-4, atol=1e-3)
    for a, b in zip(got, _direct(x, c)):  # the same float32 operations in the same order
        np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("k", [1, 2, 5, 9, 17, 33])
def test_cancellation_and_overflow_are_the_direct_kernels(k):
    # (ties: test_direct_assign's exact-product test runs this kernel too) rows equal to a centre cancel to a clamped
    # +0.0, huge rows overflow float32 to +inf distances, zero rows and subnormal ones
    g = np.random.default_rng(k)
    c = g.standard_normal((k, 6)).astype(np.float32)
    x = np.concatenate([c, c * 1e20, np.zeros((3, 6)), np.full((2, 6), 1e-40), g.standard_normal((40, 6))])
    x = x.astype(np.float32)
    with np.errstate(over="ignore"):
        xn = sq_norms(x)
    for a, b in zip(_run(x, c, xn), _direct(x, c, xn)):
        np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("k,spherical", [(3, False), (10, True), (13, False), (32, False)])
def test_compiled_lloyd_gives_the_same_fit_with_rows_in_lanes(monkeypatch, k, spherical):
    from kvant.cluster import lloyd as lloyd_module

    g = np.random.default_rng(k)
    x = (g.standard_normal((900, 24)) + 3 * g.standard_normal((8, 24))[g.integers(8, size=900)]).astype(np.float32)
    if spherical:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    c0 = lloyd_module.init_centroids(x, k, "k-means++", 1, spherical)
    if not lloyd_module.small_lloyd_applies(*x.shape, k):
        pytest.skip("no register-blocked kernel on this host: no compiled loop")
    # against the direct kernel with centres in the lanes (sums in coordinate order, as here); with coordinates in
    # the lanes (direct_assign.coord_lanes) its sums round differently: the same fit up to float32 rounding
    from kvant.kernels import direct_assign

    monkeypatch.setattr(lloyd_module, "ROW_LANES_COORD_MAX_BYTES", 1 << 40)
    runs = []
    for lanes, coord in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(lloyd_module, "ROW_LANES", lanes)
        monkeypatch.setattr(direct_assign, "coord_lanes", direct_assign.coord_lanes if coord else lambda k: False)
        runs.append(lloyd_module.lloyd(x, c0, 30, 1e-6, spherical, overrelax=1.0))
    a, b, c = runs
    assert a.objective_history == b.objective_history
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(_bits(a.last_d2), _bits(b.last_d2))
    np.testing.assert_allclose(c.objective_history, a.objective_history, rtol=1e-5)
    np.testing.assert_allclose(c.centroids, a.centroids, rtol=1e-4, atol=1e-5)
    assert np.mean(c.labels == a.labels) > 0.99


@pytest.mark.parametrize("n,d", [(0, 3), (1, 1), (15, 1), (16, 5), (17, 37), (300, 64), (33, 2)])
def test_transpose_tiles_matches_the_reference_on_every_layout(n, d):
    # both copies (masked gathers where the host's are fast, the scalar copy elsewhere), padding tiles included: the
    # gathers on C-ordered rows and rows of stride 2 (their layout: unit-stride coordinates), the copy on those and
    # Fortran order
    g = np.random.default_rng(n * 100 + d)
    x = g.standard_normal((n, d)).astype(np.float32)
    strided = np.repeat(x, 2, axis=0)[::2]
    for multiple in (1, 4):
        want = ref.transpose_tiles_ref(x, multiple)
        np.testing.assert_array_equal(row_lanes.transpose_tiles(x, multiple), want)
        for rows, fills in ((x, "both"), (strided, "both"), (np.asfortranarray(x), "copy")):
            for fill in (row_lanes.gather_tiles_into, row_lanes.copy_tiles_into)[(fills == "copy"):]:
                out = np.full(want.shape, np.nan, np.float32)
                fill(rows, out)
                np.testing.assert_array_equal(out, want)


@numba.njit
def _tile_sq_dists(xt, b, x, i, out):
    row_lanes.tile_sq_dists(xt, b, x, i, out)


@pytest.mark.parametrize("n,d", [(1, 1), (5, 2), (64, 3), (65, 64), (130, 17), (200, 128)])
def test_tile_sq_dists_are_float32_squared_distances_within_their_bound(n, d):
    g = np.random.default_rng(n + d)
    x = (g.standard_normal((n, d)) * 10.0 ** g.uniform(-3, 3, (n, 1))).astype(np.float32)
    xt = row_lanes.transpose_tiles(x, row_lanes.BLOCK_TILES)
    assert xt.shape[0] % row_lanes.BLOCK_TILES == 0 and xt.shape[0] * row_lanes.LANES >= n
    block = row_lanes.BLOCK_TILES * row_lanes.LANES
    out = np.empty(block, np.float32)
    x64 = x.astype(np.float64)
    for i in (0, n // 2, n - 1):
        for b in range(0, xt.shape[0], row_lanes.BLOCK_TILES):
            _tile_sq_dists(xt, b, x, i, out)
            lo, hi = b * row_lanes.LANES, min(n, (b + row_lanes.BLOCK_TILES) * row_lanes.LANES)
            want = ((x64[lo:hi] - x64[i]) ** 2).sum(1)
            # a float32 sum of D rounded squared differences: within (D + 3)·2⁻²⁴ of the exact distance
            assert np.all(np.abs(out[: hi - lo] - want) <= (d + 3) * 2.0**-24 * want + 1e-30)
            assert out[: hi - lo][i - lo] == 0.0 if lo <= i < hi else True
            # padding rows (zeros) read as ‖x_i‖²
            np.testing.assert_allclose(out[hi - lo :], (x64[i] ** 2).sum(), rtol=(d + 3) * 2.0**-24)


def test_the_compiled_loop_takes_rows_in_lanes_only_for_few_centres_and_a_small_copy(monkeypatch):
    from kvant.cluster import lloyd as lloyd_module

    x = np.random.default_rng(0).standard_normal((500, 12)).astype(np.float32)
    if not lloyd_module.small_lloyd_applies(*x.shape, 40):
        pytest.skip("no register-blocked kernel on this host: no compiled loop")
    seen = []
    real = lloyd_module.lloyd_small
    monkeypatch.setattr(lloyd_module, "lloyd_small", lambda *a: seen.append(a[-1]) or real(*a))
    monkeypatch.setattr(lloyd_module, "ROW_LANES", True)
    from kvant.kernels.direct_assign import coord_lanes

    # (the limit on the copy is ROW_LANES_COORD_MAX_BYTES where the direct kernel has coordinates in the lanes)
    for k, max_bytes, want in [(10, x.nbytes, True), (32, x.nbytes, True), (33, x.nbytes, False),
                               (10, x.nbytes - 1, False), (32, x.nbytes - 1, False)]:
        name = "ROW_LANES_COORD_MAX_BYTES" if coord_lanes(k) else "ROW_LANES_MAX_BYTES"
        monkeypatch.setattr(lloyd_module, name, max_bytes)
        lloyd_module.lloyd(x, x[:k].copy(), 3, 1e-6)
        assert seen[-1] is want


# the fused final pass: rows on both sides of a tile, D up to the routing limit and past it, K across the passes
EXACT_SHAPES = [(0, 3, 1), (1, 1, 1), (5, 2, 3), (16, 16, 8), (17, 5, 16), (33, 13, 17), (47, 16, 24), (300, 9, 32),
                (23, 40, 10)]


@pytest.mark.parametrize("n,d,k", EXACT_SHAPES)
def test_tile_top2_exact_is_the_direct_kernel_and_the_exact_distances(n, d, k):
    from kvant.kernels.lloyd import exact_sq_dist_rows

    g = np.random.default_rng(n * 7 + d * 3 + k)
    wide = (g.standard_normal((n, d + 3)) * 10.0 ** g.uniform(-3, 3, (n, 1))).astype(np.float32)
    for x in (np.ascontiguousarray(wide[:, :d]), wide[:, :d]):  # rows of unit stride, packed or inside wider rows
        c = g.standard_normal((k, d)).astype(np.float32)
        cp = np.empty((row_lanes.padded_k(k), d), np.float32)
        cnp = np.empty(cp.shape[0], np.float32)
        row_lanes.fill_centres(c, sq_norms(c), cp, cnp)
        out = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n)
        assert row_lanes.tile_top2_exact(x, cp, cnp, row_lanes.group_size(k), c, *out)
        for a, b in zip(out[:3], _direct(np.ascontiguousarray(x), c)):
            np.testing.assert_array_equal(_bits(a), _bits(b))
        np.testing.assert_array_equal(out[3], exact_sq_dist_rows(np.ascontiguousarray(x), c, out[0]))
        want = ((x.astype(np.float64) - c[out[0]].astype(np.float64)) ** 2).sum(1)
        np.testing.assert_allclose(out[3], want, rtol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 3e38])
def test_tile_top2_exact_stops_at_a_row_that_is_not_finite(bad):
    # NaN/inf, or a float32 norm overflow: False, for the caller's path that names the row
    x = np.random.default_rng(1).standard_normal((40, 4)).astype(np.float32)
    x[37, 2] = bad
    c = x[:3].copy()
    cp, cnp = np.empty((row_lanes.padded_k(3), 4), np.float32), np.empty(row_lanes.padded_k(3), np.float32)
    row_lanes.fill_centres(c, sq_norms(c), cp, cnp)
    out = np.empty(40, np.int64), np.empty(40, np.float32), np.empty(40, np.float32), np.empty(40)
    assert not row_lanes.tile_top2_exact(x, cp, cnp, row_lanes.group_size(3), c, *out)


def test_tile_top2_exact_refuses_rows_it_would_misread():
    # Columns of stride > 1 (the gathers read consecutive coordinates) and operands for another D
    x = np.random.default_rng(2).standard_normal((20, 8)).astype(np.float32)
    c = x[:3, :4].copy()
    cp, cnp = np.empty((row_lanes.padded_k(3), 4), np.float32), np.empty(row_lanes.padded_k(3), np.float32)
    row_lanes.fill_centres(c, sq_norms(c), cp, cnp)
    out = np.empty(20, np.int64), np.empty(20, np.float32), np.empty(20, np.float32), np.empty(20)
    with pytest.raises(ValueError, match="unit stride"):
        row_lanes.tile_top2_exact(x[:, ::2], cp, cnp, row_lanes.group_size(3), c, *out)
    with pytest.raises(ValueError, match="do not match"):
        row_lanes.tile_top2_exact(x, cp, cnp, row_lanes.group_size(3), c, *out)
