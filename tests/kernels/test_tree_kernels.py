"""Cover-tree query kernels vs plain NumPy: the SIMD bucket scan, the bucket boxes and their lower bound,
and whole k-NN queries with tiny buckets on awkward shapes (n=1, k=n, duplicates/ties, d=1)."""

from __future__ import annotations

import numba
import numpy as np
import pytest

import kvant
import kvant.tree.cover as cover
from kvant.bench import reference as ref
from kvant.kernels import tree as K

SCAN_METRICS = {"euclidean": K.EUCLIDEAN, "manhattan": K.MANHATTAN, "chebyshev": K.CHEBYSHEV}
NO_SCREEN = (np.zeros((1, 1), np.float32), np.zeros(1), -1.0)  # net_centres_big's residual screen, off


@numba.njit(cache=True)
def _scan(Q, qi, blk, a, m, code, frame, b):
    acc = np.full(max(m, 1) + 3, -1.0, np.float32)
    qb = np.empty(Q.shape[1], np.float32)
    K._scan_block(Q, qi, blk, a, m, code, frame, b, qb, acc)
    return acc


@numba.njit(cache=True)
def _limit(kth, radius, code, d):
    return K._scan_limit(kth, radius, code, d)


@numba.njit(cache=True)
def _dists(Q, qi, X, params):
    out = np.empty(X.shape[0])
    for j in range(X.shape[0]):
        out[j] = K._dist(Q, qi, X, j, params)
    return out


@numba.njit(cache=True)
def _box(Q, qi, box, b, code):
    return K._box_bound(Q, qi, box, b, code)


def _np_dist(name, q, X):
    diff = np.abs(X - q)
    if name == "euclidean":
        return np.sqrt((diff**2).sum(1))
    if name == "manhattan":
        return diff.sum(1)
    return diff.max(1)


def _np_screen(name, q, c, pts16, scale):
    """The bucket screen in plain NumPy: the query relative to the centre c times the bucket's scale, rounded to
    float32, against the points' int16 copies; terms accumulated in dimension order with a float32 rounding after
    every operation."""
    qb = ((q - c) * scale).astype(np.float32)
    pts = pts16.astype(np.float32)
    acc = np.zeros(pts.shape[0], np.float32)
    for t in range(q.shape[0]):
        z = np.abs(qb[t] - pts[:, t])
        acc = acc + z * z if name == "euclidean" else (acc + z if name == "manhattan" else np.maximum(acc, z))
    return acc


@pytest.mark.parametrize("name", list(SCAN_METRICS))
@pytest.mark.parametrize("n,d,a,m", [(1, 1, 0, 1), (5, 1, 1, 4), (37, 3, 5, 29), (40, 8, 0, 40), (23, 13, 7, 0),
                                     (70, 17, 2, 67)])
def test_scan_block_matches_numpy_screen(name, n, d, a, m):
    rng = np.random.default_rng(n + d)
    X = rng.standard_normal((n, d)) * rng.uniform(0.1, 100.0, d) + 1e4
    X[n // 2] = X[0]  # a duplicate
    Q = np.vstack([rng.standard_normal((1, d)) + 1e4, X[:1], X[:1] + 1e7])
    code = SCAN_METRICS[name]
    centre = X[a : a + m].mean(0) if m else X[0]
    # a power of two bringing every |x - c| below 1, times the fixed-point units (as bucket_frames makes it)
    scale = 2.0 ** -int(np.frexp(np.abs(X[a : a + m] - centre).max(initial=1.0))[1]) * K.SCREEN_UNITS
    frame = np.vstack([np.full(d + 2, np.nan), np.append(centre, [np.nan, scale])])
    pts16 = np.floor((X[a : a + m] - centre) * scale + 0.5).astype(np.int16)
    assert np.abs(pts16.astype(int)).max(initial=0) <= 32767
    # the bucket-blocked layout: rows a..a+m-1 dimension-major in their own slice, -32768 (a value the blocks
    # never hold) everywhere else, so a read outside the block would show
    blk = np.full(n * d, -32768, np.int16)
    blk[a * d : (a + m) * d] = pts16.T.ravel()
    for qi in range(Q.shape[0]):
        acc = _scan(Q, qi, blk, a, m, code, frame, 1)
        assert np.array_equal(acc[:m], _np_screen(name, Q[qi], centre, pts16, scale))
        assert np.all(acc[m:] == -1.0)  # nothing written past the block


def _screen_case(rng, name, n, d, offset, scale):
    X = offset + rng.standard_normal((n, d)) * scale * rng.uniform(0.01, 1.0, d)
    X[n // 2] = X[0]
    starts, sizes = np.array([0], np.int64), np.array([n], np.int64)
    box = K.bucket_boxes(X, starts, sizes)
    frame = K.bucket_frames(X, starts, sizes, box, SCAN_METRICS[name])
    blk = K.bucket_blocks(X, starts, sizes, frame)
    # queries inside, far outside, exactly on points and a hair away from points far from the centre (there the
    # rounding of the points' fixed-point copies is large next to the distance)
    far = np.argsort(-_np_dist(name, frame[0, :d], X[1:]))[:8] + 1
    Q = np.vstack([offset + rng.standard_normal((3, d)) * scale, offset + 50 * scale * np.ones((1, d)), X[1:3],
                   X[far] + rng.standard_normal((8, d)) * scale * 1e-6])
    return X, Q, frame, blk


@pytest.mark.parametrize("name", list(SCAN_METRICS))
@pytest.mark.parametrize("d", [1, 3, 8, 33])
@pytest.mark.parametrize("offset,scale", [(0.0, 1.0), (1e6, 1e-3), (-3e8, 7.0), (0.0, 1e-20), (5.0, 1e15), (0.0, 1e24),
                                          (0.0, 1e-24), (1e100, 1e90)])
def test_scan_limit_passes_every_point_within_kth(name, d, offset, scale):
    # the screen may only drop points farther than the k-th distance: with kth set to a point's exact float64
    # distance (the tightest case, a tie), that point's float32 value must be within the limit
    rng = np.random.default_rng(d)
    n = 60
    X, Q, frame, blk = _screen_case(rng, name, n, d, offset, scale)
    code = SCAN_METRICS[name]
    params = np.array([code, 0, 0, 0, 0], float)
    pts = X[1:]
    assert np.all(_np_dist(name, frame[0, :d], pts) <= frame[0, d])  # the radius bounds every point
    sc = frame[0, d + 1]
    two = sc / K.SCREEN_UNITS  # a power of two bringing R (and every |x - c|) to [1/2, 1)
    assert 0.5 <= frame[0, d] * two < 1.0 and np.frexp(two)[0] == 0.5
    assert np.abs(blk.astype(int)).max() <= 32767 and blk.dtype == np.int16
    for qi in range(Q.shape[0]):
        v = _scan(Q, qi, blk, 1, n - 1, code, frame, 0)[: n - 1].astype(np.float64)
        exact = _dists(Q, qi, pts, params)
        # the bucket's scale keeps the float32 values in range, so the screen screens at any magnitude
        assert np.all(np.isfinite(v)) and np.all(v[exact > 0] > 0)
        for j in range(n - 1):
            assert v[j] <= _limit(exact[j] * sc, frame[0, d] * sc, code, d)
        assert _limit(np.inf, frame[0, d], code, d) == np.inf


def _one_bucket(X):
    starts, sizes = np.array([0], np.int64), np.array([X.shape[0] + 1], np.int64)
    X = np.vstack([X[:1], X])  # row 0 is the bucket's root, outside the scanned range
    return X, starts, sizes


@pytest.mark.parametrize("name", list(SCAN_METRICS))
def test_scan_limit_worst_case_coordinate_rounding(name):
    # points at -1 and 1: R is just above 1, the scale 2^-1 * 32767 = 16383.5, so the point at 1 is stored as 16384,
    # half a unit off; a query exactly on it (distance 0, the tightest kth) screens at 1/2 unit. Only the
    # limit's rounding term (SCREEN_ROUNDING per coordinate) covers this: the others are ~u R ~ 1e-3 units.
    X, starts, sizes = _one_bucket(np.array([[-1.0], [1.0]]))
    code = SCAN_METRICS[name]
    box = K.bucket_boxes(X, starts, sizes)
    frame = K.bucket_frames(X, starts, sizes, box, code)
    blk = K.bucket_blocks(X, starts, sizes, frame)
    assert frame[0, 2] == 16383.5 and list(blk[1:3]) == [-16383, 16384]  # both half a unit off
    Q = np.array([[1.0]])
    v = float(_scan(Q, 0, blk, 1, 2, code, frame, 0)[1])
    assert v == (0.25 if name == "euclidean" else 0.5)
    assert v <= _limit(0.0, frame[0, 1] * frame[0, 2], code, 1)
    # d = 9, every coordinate half a unit off (x_t = (2 n_t + 1) / 32767 with x_0 = 1, so R stays in [1, 2) and
    # x_t times the scale 16383.5 is n_t + 1/2): the term grows as the norm of the per-coordinate errors
    d = 9
    x = (2.0 * np.array([16383] + [100 + t for t in range(d - 1)]) + 1) / 32767
    X, starts, sizes = _one_bucket(np.vstack([-x, x]))
    frame = K.bucket_frames(X, starts, sizes, K.bucket_boxes(X, starts, sizes), code)
    blk = K.bucket_blocks(X, starts, sizes, frame)
    assert frame[0, d + 1] == 16383.5
    v = float(_scan(x[None], 0, blk, 1, 2, code, frame, 0)[1])
    assert v == {"euclidean": 0.25 * d, "manhattan": 0.5 * d, "chebyshev": 0.5}[name]
    assert v <= _limit(0.0, frame[0, d] * frame[0, d + 1], code, d)


@pytest.mark.parametrize("name", ["euclidean", "manhattan"])
def test_scan_limit_worst_case_float32_sum(name):
    # a first term of 32767 units (squared for Euclidean) and 63 small ones of 3/4 of its float32 ulp each: every
    # addition rounds up by a quarter ulp, so the float32 sum exceeds the exact one by ~16 ulp: the limit's
    # gamma_(D+3) factor must cover it
    d = 64
    first = np.float32(32767.0**2 if name == "euclidean" else 32767.0)
    ulp = float(np.spacing(first))
    z = float(np.float32(np.sqrt(0.75 * ulp))) if name == "euclidean" else 0.75 * ulp
    # a bucket of two points at the origin: R = 0 and the points' copies are exact, so neither the radius nor
    # the rounding term can absorb the sum's error beyond the half unit of the latter
    X, starts, sizes = _one_bucket(np.zeros((2, d)))
    code = SCAN_METRICS[name]
    box = K.bucket_boxes(X, starts, sizes)
    frame = K.bucket_frames(X, starts, sizes, box, code)
    sc = frame[0, d + 1]
    assert frame[0, d] == 0.0 and sc == K.SCREEN_UNITS
    blk = K.bucket_blocks(X, starts, sizes, frame)
    assert not blk.any()
    Q = np.full((1, d), z / sc)
    Q[0, 0] = 1.0
    v = float(_scan(Q, 0, blk, 1, 2, code, frame, 0)[0])
    params = np.array([code, 0, 0, 0, 0], float)
    exact = _dists(Q, 0, X[1:2], params)[0] * sc
    red = exact**2 if name == "euclidean" else exact
    assert v > red + 12 * ulp  # the construction works as described
    assert v <= _limit(exact, frame[0, d], code, d)


@pytest.mark.parametrize("name", list(SCAN_METRICS))
@pytest.mark.parametrize("d", [1, 3, 8])
def test_bucket_boxes_and_box_bound(name, d):
    rng = np.random.default_rng(d)
    X = rng.random((50, d))
    starts = np.array([0, 10, 49], np.int64)
    sizes = np.array([10, 30, 1], np.int64)  # ranges start+1 .. start+size-1 (the bucket root is excluded)
    box = K.bucket_boxes(X, starts, sizes)
    frame = K.bucket_frames(X, starts, sizes, box, SCAN_METRICS[name])
    blk = K.bucket_blocks(X, starts, sizes, frame)
    want = np.zeros(X.size, np.int16)
    for b, (a0, sz) in enumerate(zip(starts + 1, sizes - 1)):
        if sz:
            np.testing.assert_array_equal(frame[b, :d], (box[b, :d] + box[b, d:]) / 2)
            np.testing.assert_allclose(frame[b, d], _np_dist(name, frame[b, :d], X[a0 : a0 + sz]).max(), rtol=1e-11)
        sc = frame[b, d + 1]
        want[a0 * d : (a0 + sz) * d] = np.floor((X[a0 : a0 + sz] - frame[b, :d]) * sc + 0.5).T.ravel()
    assert blk.dtype == np.int16
    np.testing.assert_array_equal(blk, want)
    assert not np.shares_memory(blk, X)
    for b in range(2):
        pts = X[starts[b] + 1 : starts[b] + sizes[b]]
        np.testing.assert_array_equal(box[b, :d], pts.min(0))
        np.testing.assert_array_equal(box[b, d:], pts.max(0))
    assert np.all(np.isinf(box[2]))  # an empty range: an empty box
    Q = np.vstack([rng.random((20, d)) * 3 - 1, X[15:16]])
    code = SCAN_METRICS[name]
    for b in range(2):
        pts = X[starts[b] + 1 : starts[b] + sizes[b]]
        lo, hi = box[b, :d], box[b, d:]
        for qi in range(Q.shape[0]):
            z = np.maximum(np.maximum(lo - Q[qi], Q[qi] - hi), 0.0)
            want = {"euclidean": np.sqrt((z**2).sum()), "manhattan": z.sum(), "chebyshev": z.max()}[name]
            got = _box(Q, qi, box, b, code)
            assert got == pytest.approx(want, rel=1e-12, abs=1e-300)
            assert got <= _np_dist(name, Q[qi], pts).min() * (1 + 1e-12)  # a lower bound


@pytest.fixture
def tiny_buckets(monkeypatch):
    """Buckets of at most 3 points: small trees then have many buckets below internal nodes."""
    monkeypatch.setattr(cover, "_SCAN_LEAF", 3)
    monkeypatch.setattr(cover, "_SCAN_LEAF_MAX", 3)


@pytest.mark.parametrize("name", list(SCAN_METRICS))
@pytest.mark.parametrize("n,d", [(1, 1), (2, 1), (97, 1), (150, 3), (120, 8)])
def test_bucketed_knn_matches_numpy_reference(tiny_buckets, name, n, d):
    rng = np.random.default_rng(n * d)
    X = np.round(rng.standard_normal((n, d)) * 3)  # integer grid: many exact distance ties
    X[: n // 4] = X[n // 4 : 2 * (n // 4)]  # exact duplicates
    Q = np.vstack([np.round(rng.standard_normal((9, d)) * 3), X[: min(n, 3)]])
    tree = kvant.CoverTree(name).fit(X)
    assert tree._leaf == 3
    for k in sorted({1, min(4, n), n}):
        dist, ids = tree.knn(Q, k)
        rd, ri = ref.knn_from_distances(ref.tree_pairwise(name, Q, X), np.arange(n), k)
        np.testing.assert_allclose(dist, rd, rtol=1e-12, atol=0)
        bd, bi = tree.brute_force(Q, k)  # same distance function, ties by smaller id: identical
        assert np.array_equal(ids, bi) and np.array_equal(dist, bd)
    for pred in (True, False):
        if n > 1 or pred:
            sd, si = tree.knn_self(min(3, max(1, n - 1)), predecessors=pred)
            bd, bi = tree.brute_force(None, min(3, max(1, n - 1)), predecessors=pred)
            assert np.array_equal(si, bi) and np.array_equal(sd, bd)


@pytest.mark.parametrize("name", list(SCAN_METRICS))
@pytest.mark.parametrize("offset,scale", [(1e6, 1e-3), (0.0, 1e30), (0.0, 1e-30), (-1e140, 1e130)])
def test_bucket_screen_is_exact_at_extreme_scales(name, offset, scale):
    # large offsets (the screen keeps only the centred coordinates), float32 overflow of a far query's scaled
    # coordinates (inf values must be measured, not dropped) and tiny scales: the results stay identical to brute
    # force
    rng = np.random.default_rng(3)
    X = offset + np.round(rng.standard_normal((300, 5)) * 4) * scale  # a grid: exact ties
    X[:40] = X[40:80]
    Q = np.vstack([offset + rng.standard_normal((12, 5)) * 4 * scale, X[:3]])
    tree = kvant.CoverTree(name).fit(X)
    for k in (1, 7, 60):
        d, i = tree.knn(Q, k)
        bd, bi = tree.brute_force(Q, k)
        assert np.array_equal(i, bi) and np.array_equal(d, bd)


@pytest.mark.parametrize("name", list(SCAN_METRICS))
def test_bucket_frame_whose_centre_overflows(name):
    # points near the top of float64's range (the kernels' own guard: CoverTree rejects values above 1e150): the
    # box's centre (lo + hi) / 2 overflows to inf. Such a bucket gets no fixed-point frame (R = inf, blocks of
    # zeros, never int16 values that wrapped around), and the limit is then infinite: every point is measured.
    X = np.array([[1e308, 1e308], [1.5e308, 1.7e308], [1.2e308, 1.1e308]])
    starts, sizes = np.array([0], np.int64), np.array([3], np.int64)
    code = SCAN_METRICS[name]
    frame = K.bucket_frames(X, starts, sizes, K.bucket_boxes(X, starts, sizes), code)
    assert frame[0, 2] == np.inf and frame[0, 3] == K.SCREEN_UNITS
    assert not K.bucket_blocks(X, starts, sizes, frame).any()
    assert _limit(0.0, frame[0, 2] * frame[0, 3], code, 2) == np.inf


@pytest.mark.parametrize("name", list(SCAN_METRICS))
def test_bucket_frame_of_a_subnormal_bucket_stays_finite(name):
    # a bucket ~2^-1011 wide: the power of two that brings it to [1/2, 1) times 32767 would overflow float64 (a
    # review found inf scales and NaN -> int16 conversions); the scale is capped, the grid coarser, the bound valid
    X = np.array([[-(2.0**-1011), 0.0], [2.0**-1011, 2.0**-1012], [0.0, -(2.0**-1013)]])
    starts, sizes = np.array([0], np.int64), np.array([3], np.int64)
    code = SCAN_METRICS[name]
    frame = K.bucket_frames(X, starts, sizes, K.bucket_boxes(X, starts, sizes), code)
    blk = K.bucket_blocks(X, starts, sizes, frame)
    assert np.all(np.isfinite(frame)) and frame[0, 3] == 2.0**1008 * K.SCREEN_UNITS
    want = np.floor((X[1:] - frame[0, :2]) * frame[0, 3] + 0.5)  # the bucket's two points, rows 1 and 2
    assert np.abs(want).max() <= 32767 and np.array_equal(blk[2:6], want.T.ravel().astype(np.int16))
    params = np.array([code, 0, 0, 0, 0], float)
    for q in (X[1], X[2], np.zeros(2), np.array([3.0 * 2.0**-1011, 0.0])):
        Q = q[None]
        v = _scan(Q, 0, blk, 1, 2, code, frame, 0)[:2].astype(np.float64)
        exact = _dists(Q, 0, X[1:], params)
        # as _knn_one calls it: Euclidean distances this small underflow (computed 0), which the pad covers
        pad = K.UNDERFLOW_PAD if name == "euclidean" else 0.0
        for j in range(2):
            assert v[j] <= _limit((exact[j] + pad) * frame[0, 3], frame[0, 2] * frame[0, 3], code, 2)
    tree = kvant.CoverTree(name).fit(np.vstack([X, X * 0.5, X * 3.0, np.ones((1, 2))]))  # (not all tiny: refused)
    Q = np.vstack([X, np.zeros((1, 2))])
    for k in (1, 4, 9):
        d, i = tree.knn(Q, k)
        bd, bi = tree.brute_force(Q, k)
        assert np.array_equal(i, bi) and np.array_equal(d, bd)


def test_bucketed_knn_after_insert_delete(tiny_buckets):
    rng = np.random.default_rng(5)
    tree = kvant.CoverTree().fit(rng.random((200, 4)))
    tree.insert(rng.random((150, 4)))
    tree.delete(np.arange(0, 350, 3))
    tree.insert(rng.random((40, 4)) * 2)
    tree.check_invariants()
    Q = rng.random((25, 4))
    d, i = tree.knn(Q, 6)
    bd, bi = tree.brute_force(Q, 6)
    assert np.array_equal(i, bi) and np.array_equal(d, bd)


@numba.njit(cache=True)
def _exp_many(y, out):
    for t in range(y.shape[0]):
        out[t] = K.exp_nonpos(y[t])


def test_exp_nonpos_is_within_its_error_bound():
    g = np.random.default_rng(0)
    y = np.concatenate([[0.0, -0.0, -1e-300, -5e-324, -np.log(2) / 2, -np.log(2), -700.0],
                        -g.random(20000) * 50, -g.random(2000) * 700, -np.abs(g.standard_normal(2000)) * 1e-8])
    out = np.empty_like(y)
    _exp_many(y, out)
    rel = np.abs(out - np.exp(y)) / np.exp(y)
    assert rel.max() <= K.EXP_NONPOS_REL_ERR and rel.max() < 1e-13
    below = np.array([-700.5, -745.0, -1e9, -np.inf])
    out = np.empty_like(below)
    _exp_many(below, out)
    assert np.all(out == out[0]) and 0.0 < out[0] <= np.exp(-699.9)  # clamped: exp(-700)


def _x_numpy(F, q, d, rank, kernel):
    """1 - |rho| before the metric's clamp, in plain NumPy float64 (rows are ResidualCorrelation.features)."""
    Zq, Zp = F[q, :d], F[:, :d]
    r2 = ((Zq[:, None, :] - Zp[None, :, :]) ** 2).sum(-1)
    kt = kernel.variance * kernel._phi(r2) * (F[q, d + rank][:, None] * F[:, d + rank][None, :])
    return 1.0 - np.abs(kt - F[q, d : d + rank] @ F[:, d : d + rank].T)


@pytest.mark.parametrize("kernel", [kvant.RBF(0.3, 1.0), kvant.Matern52(0.7, 2.5)])
@pytest.mark.parametrize("nq,n,d,rank", [(1, 1, 1, 1), (3, 17, 2, 5), (9, 300, 3, 40), (5, 64, 8, 64)])
def test_residual_screen_bounds_hold_for_float32_and_float64_products(kernel, nq, n, d, rank):
    # lo <= x <= lo + e2 for every pair, x the metric's 1 - |rho|, from float64 and float32 tile products
    g = np.random.default_rng(nq + n + d)
    X = g.random((n, d)) * 3.0
    rc = kvant.ResidualCorrelation.from_points(X, kernel, n_inducing=rank, seed=0)
    F = rc.features()
    q = g.choice(n, nq)
    W = F[:, d : d + rank]
    nw = np.sqrt((W * W).sum(1)) * (1 + 1e-12)
    u32, u64 = 2.0**-24, 2.0**-53
    gam32 = 1.001 * (rank + 2) * u32 / (1 - (rank + 2) * u32)
    gam64 = 1.001 * rank * u64 / (1 - rank * u64)
    x = _x_numpy(F, q, d, rank, kernel)
    slack = 2 * gam64 * nw[q][:, None] * nw[None, :] + 1e-13  # NumPy's own float64 rounding of x
    arrays = (np.ascontiguousarray(F[:, :d].T), F[:, d + rank].copy(), F[:, -1].copy(), nw, np.arange(n))
    same = F[q, -1][:, None] == F[:, -1][None, :]
    for G, gam in ((W[q] @ W.T, 2 * gam64), (W[q].astype(np.float32) @ W.T.astype(np.float32), gam32 + gam64)):
        lo, e2 = np.empty((nq, n)), np.empty((nq, n))
        K.residual_screen_bounds(np.ascontiguousarray(G), gam, F[q, :d].copy(), F[q, d + rank].copy(),
                                 F[q, -1].copy(), nw[q].copy(), *arrays, 0, kernel.variance, kernel.code,
                                 np.arange(nq), 0, lo, e2)
        assert np.all(lo[same] == 0.0) and np.all(e2[same] == 0.0)  # the same row of X: distance 0
        assert np.all(lo[~same] <= x[~same] + slack[~same])
        assert np.all(x[~same] <= lo[~same] + e2[~same] + slack[~same])
        assert np.all(e2 < np.inf) and np.all(e2 >= 0)
    # the bound is not vacuous, and a bound that ignores float32's rounding (gam64 only) is caught
    if rank >= 40:
        G32 = np.ascontiguousarray(W[q].astype(np.float32) @ W.T.astype(np.float32))
        lo, e2 = np.empty((nq, n)), np.empty((nq, n))
        K.residual_screen_bounds(G32, 0.0, F[q, :d].copy(), F[q, d + rank].copy(), F[q, -1].copy(),
                                 nw[q].copy(), *arrays, 0, kernel.variance, kernel.code, np.arange(nq), 0, lo, e2)
        assert np.any((x < lo - 1e-12) | (x > lo + e2 + 1e-12))


def _small_residual(seed, n, rank):
    """A residual metric on n random 2-d points: (metric, its feature rows, their w block, the w norms)."""
    X = np.random.default_rng(seed).random((n, 2))
    rc = kvant.ResidualCorrelation.from_points(X, kvant.RBF(0.3, 1.0), n_inducing=rank, seed=0)
    F = rc.features()
    W = F[:, 2 : 2 + rank]
    return rc, F, W, np.sqrt((W * W).sum(1))


def test_residual_screen_bounds_exclude_by_mode():
    rc, F, W, nw = _small_residual(4, 40, 10)
    q = np.array([0, 7, 39])
    slots = np.arange(40) * 2  # slots need not equal rows
    args = (np.ascontiguousarray(F[:, :2].T), F[:, 12].copy(), F[:, -1].copy(), nw, slots)
    for mode in (0, 1, 2):
        lo, e2 = np.empty((3, 40)), np.empty((3, 40))
        K.residual_screen_bounds(W[q] @ W.T, 1e-15, F[q, :2].copy(), F[q, 12].copy(), F[q, -1].copy(), nw[q].copy(),
                                 *args, 0, 1.0, K.RBF_KERNEL, slots[q], mode, lo, e2)
        excluded = {0: np.zeros((3, 40), bool), 1: slots[None, :] == slots[q][:, None],
                    2: slots[None, :] >= slots[q][:, None]}[mode]
        assert np.all(lo[excluded] == np.inf) and np.all(lo[~excluded] < np.inf)


@pytest.mark.parametrize("kernel", [kvant.RBF(0.3, 1.0), kvant.Matern52(np.array([0.7, 2.0, 0.1]), 2.5)])
@pytest.mark.parametrize("na,nb", [(1, 1), (5, 0), (7, 33)])
def test_covariance_block_matches_the_numpy_covariance(kernel, na, nb):
    g = np.random.default_rng(na * 10 + nb)
    A, B = g.random((na, 3)) * 4.0, g.random((nb, 3)) * 4.0
    out = np.empty((na, nb))
    K.covariance_block(kernel._scaled(A), kernel._scaled(B), kernel.variance, kernel.code, out)
    np.testing.assert_allclose(out, kernel(A, B), rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("n,d,s0", [(40, 1, 1), (300, 3, 5), (3000, 2, 1), (2500, 8, 17)])
def test_net_centres_big_is_the_sequential_greedy_first_fit(n, d, s0):
    # the parallel blocked selection must pick exactly the centres of the plain loop: a member becomes a centre
    # unless an earlier centre lies within the child radius
    rng = np.random.default_rng(n)
    X = rng.random((n, d))
    X[n // 2] = X[n // 3]  # a duplicate
    params = np.array([K.EUCLIDEAN, 0, 0, 0, 0], float)
    perm = rng.permutation(n).astype(np.int64)
    node = perm[s0 - 1]
    pdist = np.zeros(n)
    pdist[s0:] = np.sqrt(((X[perm[s0:]] - X[node]) ** 2).sum(1))
    lvl_p = K.ceil_log(2.0, pdist.max()) + 1
    asg = np.full(n, 7, np.int64)
    adist = np.full(n, -1.0)
    cent = np.full(n, -5, np.int64)
    m, cl, bad = K.net_centres_big(X, params, 2.0, perm, pdist, s0, n, lvl_p, asg, adist, cent, *NO_SCREEN)
    assert not bad
    r = K.radius(2.0, cl)
    centres, want, want_d = [], [], []
    for t in range(s0, n):
        s = perm[t]
        d_to = [np.sqrt(((X[c] - X[s]) ** 2).sum()) for c in centres]
        first = next((j for j, v in enumerate(d_to) if v <= r), None)
        if first is not None:  # the parent is the first covering centre, at its exact distance
            want.append(first)
            want_d.append(d_to[first])
        else:
            want.append(-1 - len(centres))
            want_d.append(0.0)
            centres.append(s)
    assert m == len(centres) and m > 1
    np.testing.assert_array_equal(cent[s0 : s0 + m], centres)
    np.testing.assert_array_equal(asg[s0:n], want)
    np.testing.assert_allclose(adist[s0:n], want_d, rtol=1e-12, atol=0)
    assert (adist[s0:n] <= r).all()


@numba.njit(cache=True)
def _beyond_many(data, i, j, params, w32, nw, gam, xlim, out):
    for t in range(i.shape[0]):
        out[t] = K._residual_beyond(data, i[t], j[t], params, w32, nw, gam, xlim)


@pytest.mark.parametrize("kernel", [kvant.RBF(0.4, 1.0), kvant.Matern52(0.6, 1.5)])
def test_residual_cover_screen_only_skips_pairs_beyond_the_radius(kernel):
    g = np.random.default_rng(7)
    X = g.random((800, 3))
    rc = kvant.ResidualCorrelation.from_points(X, kernel, n_inducing=96, seed=0)
    tree = kvant.CoverTree(rc)
    w32, nw, gam = tree._cover_screen()
    F, params = rc.features(), rc.params()
    i, j = g.integers(0, 800, 20000), g.integers(0, 800, 20000)
    exact = np.empty(i.size)
    K.pair_dists(F, i, F, j, params, exact)
    for r in (0.3, 0.6, 0.8, 0.95):
        out = np.zeros(i.size, np.bool_)
        _beyond_many(F, i, j, params, w32, nw, gam, r * r * (1 + 2.0**-40) + 1e-300, out)
        assert np.all(exact[out] > r)  # never skips a pair within r
        assert out.mean() > 0.5 * np.mean(exact > r + 0.05)  # and skips most pairs clearly beyond it
    # the bound matters: without it (gam = 0) float32's rounding skips pairs that are within r
    near = np.sort(exact)[np.arange(1, i.size, 37)]
    wrong = 0
    for r in near:
        out = np.zeros(i.size, np.bool_)
        _beyond_many(F, i, j, params, w32, nw, 0.0, r * r, out)
        wrong += np.count_nonzero(exact[out] <= r)
    assert wrong > 0


def test_residual_cover_screen_changes_no_centre_or_parent():
    # the big-group selection with the float32 screen picks the centres and parents of the exact one
    g = np.random.default_rng(8)
    X = g.random((3000, 3))
    rc = kvant.ResidualCorrelation.from_points(X, kvant.RBF(0.3, 1.0), n_inducing=64, seed=0)
    F, params = rc.features(), rc.params()
    screen = kvant.CoverTree(rc)._cover_screen()
    perm = g.permutation(3000).astype(np.int64)
    pdist = np.zeros(3000)
    K.pair_dists(F, np.full(2999, perm[0]), F, perm[1:], params, pdist[1:])
    lvl_p = K.ceil_log(1.3, pdist.max()) + 1
    outs = []
    for scr in (NO_SCREEN, screen):
        asg, adist, cent = np.zeros(3000, np.int64), np.zeros(3000), np.zeros(3000, np.int64)
        m, cl, bad = K.net_centres_big(F, params, 1.3, perm, pdist, 1, 3000, lvl_p, asg, adist, cent, *scr)
        outs.append((m, cl, bad, asg, adist, cent[:m]))
    (m0, cl0, b0, a0, d0, c0), (m1, cl1, b1, a1, d1, c1) = outs
    assert (m0, cl0, b0) == (m1, cl1, b1) and 1 < m0 < 2999
    np.testing.assert_array_equal(c0, c1)
    np.testing.assert_array_equal(a0, a1)
    np.testing.assert_array_equal(d0, d1)


def test_residual_screen_tile_survives_an_infinite_bound():
    # a point whose |w| overflowed (norm inf) gets lower bound -inf and width inf: its upper bound -inf + inf
    # is NaN, which used to enter the k-best heap and make its threshold ~0, so every later point was skipped
    rc, F, W, nw = _small_residual(6, 30, 8)
    nw[0] = np.inf
    q = np.array([5])
    G = np.ascontiguousarray(W[q] @ W.T)
    k, cap = 3, 40
    heap_u, heap_c, heap_n = np.empty((1, k)), np.empty((1, k), np.int64), np.zeros(1, np.int64)
    buf_l, buf_c, buf_n = np.empty((1, cap)), np.zeros((1, cap), np.int64), np.zeros(1, np.int64)
    lost = np.full(1, np.inf)
    K.residual_screen_tile(G, 1e-12, F[q, :2].copy(), F[q, 10].copy(), F[q, -1].copy(), nw[q].copy(),
                           np.ascontiguousarray(F[:, :2].T), F[:, 10].copy(), F[:, -1].copy(), nw, np.arange(30), 0,
                           1.0, rc.kernel.code, np.zeros(1, np.int64), 0, heap_u, heap_c, heap_n, buf_l, buf_c,
                           buf_n, lost, np.empty((3, 30)))
    assert not np.isnan(heap_u).any()
    x = _x_numpy(F, q, 2, 8, rc.kernel)[0]
    x[5] = 0.0
    nearest = np.argsort(x, kind="stable")[:k]
    assert set(nearest) <= set(buf_c[0, : buf_n[0]].tolist())  # every true neighbour is a candidate
    assert 0 in buf_c[0, : buf_n[0]]
