"""The register-blocked assignment kernel (kernels.direct_assign) against the NumPy reference and the BLAS path."""

import numba
import numpy as np
import pytest

from kvant.bench import reference as ref
from kvant.cluster import assign as cluster_assign
from kvant.cluster.assign import assign_top2
from kvant.kernels import direct_assign, row_lanes
from kvant.kernels.assign import top2_from_ip
from kvant.kernels.direct_assign import coord_operands, direct_top2, padded_centroids
from kvant.kernels.distance import sq_norms

# rows not a multiple of the kernel's 6 or 8, D = 1 and odd D, K on both sides of every 16- and 64-column step, and
# beyond 1,024 (direct_assign.MAX_K where the BLAS lacks AVX-512)
SHAPES = [(0, 3, 1), (1, 1, 1), (5, 1, 3), (7, 2, 16), (9, 7, 17), (13, 5, 33), (47, 13, 48), (50, 33, 49),
          (61, 130, 64), (300, 9, 10), (23, 4, 100), (19, 5, 129), (11, 3, 260), (29, 6, 1030)]


# the two centre operands: centres in the vector lanes (any K) and coordinates in the lanes (K <= 28)
OPERANDS = {"centres": padded_centroids, "coords": coord_operands}


def _operands(kind, k):
    if kind == "coords" and not (k <= direct_assign.COORD_MAX_BLOCK or 17 <= k <= 2 * direct_assign.COORD_MAX_BLOCK):
        pytest.skip("coordinates in the lanes take K = 1-14 and 17-28")
    return OPERANDS[kind]


def _run(x, c, xn=None, row_scale=None, operands=padded_centroids):
    n = x.shape[0]
    out = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.float32)
    ct, cn = operands(c, sq_norms(c))
    direct_top2(x, ct, cn, sq_norms(x) if xn is None else xn, *out, row_scale)
    return out


@pytest.mark.parametrize("kind", OPERANDS)
@pytest.mark.parametrize("n,d,k", SHAPES + [(40, 16, 14), (35, 17, 20), (33, 31, 28), (18, 1, 25)])
def test_direct_top2_matches_reference(n, d, k, kind):
    g = np.random.default_rng(n * 1000 + d * 10 + k)
    x = g.standard_normal((n, d)).astype(np.float32)
    c = g.standard_normal((k, d)).astype(np.float32)
    labels, d1, d2 = _run(x, c, operands=_operands(kind, k))
    rl, r1, r2 = ref.top2_ref(x, c)
    np.testing.assert_array_equal(labels, rl)
    np.testing.assert_allclose(d1, r1, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(d2, r2, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kernel", ["direct", "coords", "row_lanes"])
@pytest.mark.parametrize("k", [1, 2, 5, 8, 9, 14, 15, 16, 17, 26, 28, 31, 32, 33, 47, 48, 49, 63, 64])
def test_direct_top2_is_bit_identical_to_the_blas_path_on_exact_products(k, kernel):
    # Integer-grid data: every product and partial sum is exact in float32 whatever the order of summation, so the
    # kernel must give exactly what top2_from_ip gives from the GEMM: ties to the first index, the runner-up equal
    # to the minimum when it occurs twice, negative cancellation clamped to +0.0. (kernels.row_lanes, the small
    # Lloyd loop's E-step with rows in the lanes, must give the same.)
    g = np.random.default_rng(k)
    d = 11
    c = np.round(g.standard_normal((k, d)) * 2).astype(np.float32)
    if k > 3:
        c[k - 1] = c[1]
        c[k // 2] = c[1]
    x = np.round(g.standard_normal((203, d)) * 2).astype(np.float32)
    x[1::7] = c[min(1, k - 1)]
    xn, cn = sq_norms(x), sq_norms(c)
    want = np.empty(203, np.int64), np.empty(203, np.float32), np.empty(203, np.float32)
    top2_from_ip(x @ c.T, cn, xn, *want)
    if kernel == "row_lanes":
        got = row_lanes.top2(x, c, xn, cn)
    else:
        got = _run(x, c, xn, operands=_operands("coords", k) if kernel == "coords" else padded_centroids)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a).view(np.int32 if a.dtype == np.float32 else np.int64),
                                      np.asarray(b).view(np.int32 if b.dtype == np.float32 else np.int64))


@pytest.mark.parametrize("kind", OPERANDS)
def test_direct_top2_row_scale_equals_the_blas_path(kind):
    g = np.random.default_rng(5)
    x = np.round(g.standard_normal((37, 6)) * 3).astype(np.float32)
    c = np.round(g.standard_normal((20, 6)) * 3).astype(np.float32)
    scale = (g.random(37) + 0.5).astype(np.float32)
    xn, cn = sq_norms(x), sq_norms(c)
    want = np.empty(37, np.int64), np.empty(37, np.float32), np.empty(37, np.float32)
    top2_from_ip(x @ c.T, cn, xn, *want, row_scale=scale)
    for a, b in zip(_run(x, c, xn, scale, OPERANDS[kind]), want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", OPERANDS)
def test_direct_top2_padding_never_wins(kind):
    # one centroid: the runner-up is +inf (the padded columns' +inf norms), never a padded label
    x = np.ones((9, 3), np.float32)
    labels, d1, d2 = _run(x, np.zeros((1, 3), np.float32), operands=OPERANDS[kind])
    assert labels.tolist() == [0] * 9 and d1.tolist() == [3.0] * 9 and np.isinf(d2).all()
    # every real distance +inf (overflow): the first real centre wins the tie with the padding
    big = np.full((2, 4), 3e38, np.float32)
    labels, d1, d2 = _run(np.full((3, 4), -3e38, np.float32), big, xn=np.zeros(3, np.float32),
                          operands=OPERANDS[kind])
    assert labels.tolist() == [0, 0, 0] and np.isinf(d1).all() and np.isinf(d2).all()


def test_direct_top2_large_dynamic_range():
    g = np.random.default_rng(9)
    x = (g.standard_normal((40, 24)) * np.logspace(-3, 3, 24)).astype(np.float32)
    c = x[g.choice(40, 12, replace=False)] + np.float32(1e-3)
    labels, d1, _ = _run(x, c)
    rl, r1, _ = ref.top2_ref(x, c)
    np.testing.assert_array_equal(labels, rl)
    np.testing.assert_allclose(d1, r1, rtol=1e-4, atol=1e-3 * float(np.abs(r1).max()))


@pytest.mark.parametrize("k", [7, 64])
def test_assign_top2_takes_the_same_labels_with_and_without_the_direct_kernel(k, monkeypatch):
    # (the kernel itself works for any K; assign_top2 uses it for K <= 64, see direct_assign.fits)
    g = np.random.default_rng(k)
    x = g.standard_normal((5000, 40)).astype(np.float32)
    c = g.standard_normal((k, 40)).astype(np.float32)
    outs = []
    for direct in (True, False):
        monkeypatch.setattr(cluster_assign, "DIRECT_ASSIGN", direct)
        out = np.empty(5000, np.int64), np.empty(5000, np.float32), np.empty(5000, np.float32)
        assign_top2(x, c, sq_norms(c), *out, n_threads=2)
        outs.append(out)
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", OPERANDS)
@pytest.mark.parametrize("block_rows", [1, 7, 64, 1000])
def test_direct_top2_parallel_equals_the_serial_kernel_on_all_or_listed_rows(block_rows, kind):
    from kvant.kernels.direct_assign import direct_top2_parallel

    g = np.random.default_rng(block_rows)
    x = g.standard_normal((301, 19)).astype(np.float32)
    c = g.standard_normal((23, 19)).astype(np.float32)
    ct, cn = OPERANDS[kind](c, sq_norms(c))
    for rows in (np.empty(0, np.int64), g.integers(0, 301, 150)):
        xs = x if rows.size == 0 else x[rows]
        want = np.empty(len(xs), np.int64), np.empty(len(xs), np.float32), np.empty(len(xs), np.float32)
        direct_top2(xs, ct, cn, sq_norms(xs), *want)
        got = np.empty(len(xs), np.int64), np.empty(len(xs), np.float32), np.empty(len(xs), np.float32)
        direct_top2_parallel(x, rows, ct, cn, sq_norms(xs), *got, block_rows)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", OPERANDS)
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_the_fused_pass_equals_norms_products_and_exact_distances_in_turn(n, d, k, kind):
    # direct_top2_exact: one pass over the rows, bit-identical to the three passes it replaces — except on a small
    # coordinate operand (lane_norm_column >= 0), whose float32 row norms come with the products: there d1/d2 are
    # within their rounding of the three passes', and the labels differ at most where those are that close
    from kvant.kernels.direct_assign import direct_top2_exact, lane_norm_column
    from kvant.kernels.distance import sq_norms_serial
    from kvant.kernels.lloyd import exact_sq_dist_rows

    g = np.random.default_rng(n * 7 + d * 3 + k)
    x = (g.standard_normal((n, d)) * 10.0 ** g.uniform(-3, 3, (n, 1))).astype(np.float32)  # wide range of norms
    c = g.standard_normal((k, d)).astype(np.float32)
    operands = _operands(kind, k)
    ct, cn = operands(c, sq_norms(c))
    want = _run(x, c, xn=sq_norms_serial(x), operands=operands)
    got = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.float32)
    exact = np.empty(n, np.float64)
    assert direct_top2_exact(x, ct, cn, c, *got, exact, False, 0.0, np.inf)
    if lane_norm_column(ct) < 0:
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    else:
        # the norm's γ(ceil(D/16) + 4), the distance's own float32 roundings, of (‖x‖ + max‖c‖)²
        scale = (np.linalg.norm(x.astype(np.float64), axis=1) + np.linalg.norm(c, axis=1).max()) ** 2
        tol = (-(-d // 16) + 8) * 2.0**-23 * scale
        for a, b in zip(got[1:], want[1:], strict=True):  # (d2 = inf for K = 1 on both)
            same = a == b
            assert np.all(same | (np.abs(a - b.astype(np.float64), where=~same, out=np.zeros(n)) < tol + 1e-30))
        close = want[2].astype(np.float64) - want[1] <= 2 * tol
        np.testing.assert_array_equal(got[0][~close], want[0][~close])
        assert np.all((got[0] == want[0]) | close)
    np.testing.assert_array_equal(exact, exact_sq_dist_rows(x, c, got[0]))
    np.testing.assert_allclose(exact, ((x.astype(np.float64) - c[got[0]]) ** 2).sum(1) if n else exact, rtol=1e-12)


@pytest.mark.parametrize("d", [1, 7, 16, 33, 128, 784])
@pytest.mark.parametrize("k", [1, 4, 10, 12])
def test_lane_norms_of_the_fused_pass_are_within_their_bound(d, k):
    # With a zero centre nearest to every row, d1 = max(‖x‖² + 0 − 0, 0) is the float32 lane norm itself
    from kvant.kernels.assign import label_margins
    from kvant.kernels.direct_assign import direct_top2_exact, lane_norm_column

    if not direct_assign.coord_lanes(k):
        pytest.skip("coordinate lanes are an AVX-512 operand")
    g = np.random.default_rng(d * 100 + k)
    x = (g.standard_normal((301, d)) * 10.0 ** g.uniform(-3, 3, (301, 1))).astype(np.float32)
    c = np.zeros((k, d), np.float32)
    c[1:, 0] = 1e9 * np.arange(1, k)  # farther than every row: the zero centre is always nearest
    ct, cn = coord_operands(c, sq_norms(c))
    assert lane_norm_column(ct) == k + k % 2
    got = np.empty(301, np.int64), np.empty(301, np.float32), np.empty(301, np.float32)
    assert direct_top2_exact(x, ct, cn, c, *got, np.empty(301), False, 0.0, np.inf)
    assert np.all(got[0] == 0)
    xn = (x.astype(np.float64) ** 2).sum(axis=1)
    grow = label_margins(d, lane_norms=True)[0] - label_margins(d)[0]  # what κ adds for these norms
    assert np.all(np.abs(got[1] - xn) <= grow * xn)


@pytest.mark.parametrize("kind", OPERANDS)
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_the_fused_pass_on_unit_rows_equals_the_scaled_path(n, d, k, kind):
    from kvant.kernels.direct_assign import direct_top2_exact
    from kvant.kernels.distance import sq_norms64_serial
    from kvant.kernels.lloyd import exact_sq_dist_rows_scaled

    g = np.random.default_rng(n * 5 + d + k)
    x = (g.standard_normal((n, d)) * 10.0 ** g.uniform(-3, 3, (n, 1))).astype(np.float32)
    c = g.standard_normal((k, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    operands = _operands(kind, k)
    ct, cn = operands(c, sq_norms(c))
    xn64 = sq_norms64_serial(x)  # unit rows are scaled by 1/√ of the float64 norm on every path
    factor = 1.0 / np.sqrt(xn64)
    want = _run(x, c, xn=(xn64 * factor * factor).astype(np.float32), row_scale=factor.astype(np.float32),
                operands=operands)
    got = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.float32)
    exact = np.empty(n, np.float64)
    assert direct_top2_exact(x, ct, cn, c, *got, exact, True, 1e-30, 1e30)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(exact, exact_sq_dist_rows_scaled(x, c, want[0], factor))
    if n:
        x[n // 2] = 0.0  # a zero row: not handled here (the caller normalises explicitly and names the row)
        assert not direct_top2_exact(x, ct, cn, c, *got, exact, True, 1e-30, 1e30)


@pytest.mark.parametrize("family,rows", [("avx512", lambda kp: 8 if kp <= 48 else 6),
                                         ("avx2", lambda kp: 6 if kp == 16 else 2)])
@pytest.mark.parametrize("d,k", [(1, 1), (7, 16), (13, 17), (5, 33), (9, 48), (4, 64), (3, 100), (6, 129)])
def test_both_micro_kernel_families_compute_the_products(family, rows, d, k):
    # Only one family serves each host (AVX-512 or AVX2); both compile and run anywhere, so both are checked here
    # against float64 products (each sum is in coordinate order with fused multiply-adds: within float32 rounding).
    from kvant.kernels import direct_assign

    products = getattr(direct_assign, f"_products_{family}")
    g = np.random.default_rng(d * 100 + k)
    c = g.standard_normal((k, d)).astype(np.float32)
    ct, _ = padded_centroids(c, sq_norms(c))
    r = rows(ct.shape[1])
    x = g.standard_normal((r + 3, d)).astype(np.float32)
    out = np.full((r, ct.shape[1]), np.nan, np.float32)
    products(x, 2, ct, out)  # rows 2 .. 2 + r of x
    want = x[2 : 2 + r].astype(np.float64) @ ct.astype(np.float64)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * d)
    if direct_assign.AVX512 == (family == "avx512") and direct_assign.AVAILABLE:
        assert direct_assign._products is products and direct_assign._group_rows(ct.shape[1]) == r


@pytest.mark.parametrize("d", [1, 5, 16, 17, 31, 64, 100, 784])
@pytest.mark.parametrize("k", [1, 2, 3, 7, 10, 13, 14, 17, 19, 22, 25, 28])
def test_coordinate_lane_products_against_float64(d, k):
    # every block size (2-14, one or two blocks), a masked tail of D mod 16 coordinates, a group of rows starting at
    # an offset, non-contiguous-looking values; columns past K must come out 0 (they meet +inf norms in the top-2)
    from kvant.kernels.direct_assign import COORD_GROUP

    g = np.random.default_rng(d * 100 + k)
    c = (g.standard_normal((k, d)) * 10.0 ** g.uniform(-2, 2, (k, 1))).astype(np.float32)
    c3, cn = coord_operands(c, sq_norms(c))
    assert c3.ctypes.data % 64 == 0 and c3.shape == (k + k % 2 if k <= 14 else -(-k // 4) * 4, -(-d // 16), 16)
    np.testing.assert_array_equal(c3.reshape(c3.shape[0], -1)[:k, :d], c)
    assert not c3.reshape(c3.shape[0], -1)[:k, d:].any() and not c3[k:].any()
    assert cn.shape == (-(-k // 16) * 16,) and np.isinf(cn[k:]).all()
    x = g.standard_normal((COORD_GROUP + 5, d)).astype(np.float32)
    out = np.full((COORD_GROUP, cn.shape[0]), np.nan, np.float32)  # every column must be written
    _coord_products(x, 3, c3, out)
    want = x[3 : 3 + COORD_GROUP].astype(np.float64) @ c.T.astype(np.float64)
    scale = np.abs(x[3 : 3 + COORD_GROUP]).astype(np.float64) @ np.abs(c.T).astype(np.float64)
    assert np.all(np.abs(out[:, :k] - want) <= (d // 16 + 6) * 2.0**-24 * scale + 1e-30)
    # written: 16 columns per block from its first centre (two blocks: from rows/2); the rest as they were
    written = 16 if c3.shape[0] <= 14 else c3.shape[0] // 2 + 16
    assert not out[:, k:written].any() and np.isnan(out[:, written:]).all()


@numba.njit
def _coord_products(x, i0, c3, out):
    direct_assign._coord_products(x, i0, c3, out)


def test_centre_operands_take_coordinate_lanes_for_few_centres_on_avx512():
    with pytest.raises(ValueError, match="1-14 or 17-28"):
        coord_operands(np.ones((15, 3), np.float32), np.ones(15, np.float32))
    c = np.ones((10, 8), np.float32)
    for k in (1, 10, 14, 15, 16, 17, 28, 29, 64):
        ops, cn = direct_assign.centre_operands(c[:1].repeat(k, 0), sq_norms(c[:1].repeat(k, 0)))
        assert ops.ndim == (3 if direct_assign.AVX512 and (k <= 14 or 17 <= k <= 28) else 2)
        assert direct_assign.coord_lanes(k) == (ops.ndim == 3)


def test_the_kernels_refuse_centre_operands_they_would_read_or_write_out_of_bounds():
    from kvant.kernels.direct_assign import direct_top2_exact, direct_top2_parallel

    g = np.random.default_rng(3)
    x = g.standard_normal((40, 19)).astype(np.float32)
    xn = sq_norms(x)
    out = np.empty(40, np.int64), np.empty(40, np.float32), np.empty(40, np.float32)
    c3, cn = coord_operands(x[:10], sq_norms(x[:10]))
    ct, cnp = padded_centroids(x[:10], sq_norms(x[:10]))
    bad = [
        (c3[:3], cn),  # an odd centre count (no such block)
        (np.zeros((16, 2, 16), np.float32), cn),  # two blocks of 8 would write past 16 columns
        (np.zeros((20, 2, 16), np.float32), cn),  # two blocks need 32 norms
        (c3[:, :1], cn),  # too few coordinates for D = 19
        (np.zeros((10, 2, 8), np.float32), cn),  # not 16 lanes
        (ct, cnp[:8]),  # norms narrower than the products
        (ct[:5], cnp),  # cᵀ of another D
    ]
    for ops, norms in bad:
        with pytest.raises(ValueError, match="do not match"):
            direct_top2(x, np.ascontiguousarray(ops), norms, xn, *out)
        with pytest.raises(ValueError, match="do not match"):
            direct_top2_exact(x, np.ascontiguousarray(ops), norms, x[:10], *out, np.empty(40), False, 0.0, np.inf)
        with pytest.raises(ValueError, match="do not match"):
            direct_top2_parallel(x, np.empty(0, np.int64), np.ascontiguousarray(ops), norms, xn, *out, 16)


@pytest.mark.parametrize("k", [1, 3, 10, 11, 12])
def test_lane_norms_of_rows_near_float32_max_never_win_the_top_2(k):
    # ‖x‖² in (FLT_MAX/2, FLT_MAX): finite, but 2·‖x‖² overflows. The norm's column of the tile must not turn into a
    # distance (inf − inf = NaN, which the top-2 reads as 0): labels stay real centres, certified or recomputed
    from kvant.kernels.assign import certify_top2, label_margins
    from kvant.kernels.direct_assign import direct_top2_exact

    if not direct_assign.coord_lanes(k):
        pytest.skip("coordinate lanes are an AVX-512 operand")
    c = np.arange(k * 4, dtype=np.float32).reshape(k, 4)
    x = np.full((9, 4), 7.0e18, np.float32)  # ‖x‖² = 1.96e38
    x[1] = 1.0
    x[4] *= -1
    cn = sq_norms(c)
    ct, cnp = coord_operands(c, cn)
    lab, d1, d2, exact = np.empty(9, np.int64), np.empty(9, np.float32), np.empty(9, np.float32), np.empty(9)
    assert direct_top2_exact(x, ct, cnp, c, lab, d1, d2, exact, False, 0.0, np.inf)
    assert np.all((lab >= 0) & (lab < k))
    certify_top2(x, c, lab, d1, d2, exact, False, cn, *label_margins(4, lane_norms=True))
    dist = ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(lab, dist.argmin(axis=1))
    np.testing.assert_allclose(exact, dist.min(axis=1), rtol=1e-12)


@pytest.mark.parametrize("lacks", [False, True])
def test_fits_takes_wider_operands_only_where_the_blas_lacks_avx512(monkeypatch, lacks):
    # where OpenBLAS runs AVX2 kernels on an AVX-512 host (Zen 5) the kernel takes K up to MAX_K = 2,048 and centre
    # operands up to WIDE_CT_BYTES; elsewhere the operand must fit MAX_CT_BYTES (half of L2)
    if not direct_assign.AVX512:
        pytest.skip("the rule is for AVX-512 hosts")
    monkeypatch.setattr(direct_assign, "BLAS_LACKS_AVX512", lacks)
    monkeypatch.setattr(direct_assign, "MAX_K", 2048)
    monkeypatch.setattr(direct_assign, "MAX_CT_BYTES", 512 << 10)
    dim = 128
    assert direct_assign.fits(dim, 1024)  # 512 KiB: within either limit
    assert direct_assign.fits(dim, 2048) is lacks  # 1 MiB
    assert not direct_assign.fits(dim, 2049)  # beyond MAX_K
    assert direct_assign.fits(784, 1328) is lacks and not direct_assign.fits(784, 1344)  # 4 MiB at 784-d


def test_full_rate_avx512_hosts_without_amx_take_the_kernel_to_k_2048():
    # (2026-12-07, an Intel host without AMX: whole fits 0.84-1.00x the BLAS path's time at K = 96-1,024; docs/auto.md)
    if not direct_assign.FULL_RATE_NO_AMX:
        pytest.skip("the rule is for full-rate AVX-512 hosts without AMX")
    assert direct_assign.MAX_K == 2048
    assert direct_assign.fits(64, 1024)  # 256 KiB of centres
    assert not direct_assign.fits(784, 1024) or direct_assign.BLAS_LACKS_AVX512  # 3.1 MiB: beyond half of L2
