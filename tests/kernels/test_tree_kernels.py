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


@numba.njit(cache=True)
def _scan(Q, qi, blk, a, m, code):
    acc = np.full(max(m, 1) + 3, -1.0)
    K._scan_block(Q, qi, blk, a, m, code, acc)
    return acc


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


@pytest.mark.parametrize("name", list(SCAN_METRICS))
@pytest.mark.parametrize("n,d,a,m", [(1, 1, 0, 1), (5, 1, 1, 4), (37, 3, 5, 29), (40, 8, 0, 40), (23, 13, 7, 0)])
def test_scan_block_matches_numpy_and_metric(name, n, d, a, m):
    rng = np.random.default_rng(n + d)
    X = rng.standard_normal((n, d)) * rng.uniform(0.1, 100.0, d)
    X[n // 2] = X[0]  # a duplicate
    Q = np.vstack([rng.standard_normal((1, d)), X[:1]])
    code = SCAN_METRICS[name]
    # the bucket-blocked layout: rows a..a+m-1 dimension-major in their own slice, NaN everywhere else so a
    # read outside the block would show
    blk = np.full(n * d, np.nan)
    blk[a * d : (a + m) * d] = X[a : a + m].T.ravel()
    params = np.array([code, 0, 0, 0, 0], float)
    for qi in range(Q.shape[0]):
        acc = _scan(Q, qi, blk, a, m, code)
        got = np.sqrt(acc[:m]) if name == "euclidean" else acc[:m]
        np.testing.assert_allclose(got, _np_dist(name, Q[qi], X[a : a + m]), rtol=1e-12, atol=0)
        # bit-identical to the metric function the tree's other paths and brute force use
        assert np.array_equal(got, _dists(Q, qi, X[a : a + m], params))
        assert np.all(acc[m:] == -1.0)  # nothing written past the block


@pytest.mark.parametrize("name", list(SCAN_METRICS))
@pytest.mark.parametrize("d", [1, 3, 8])
def test_bucket_boxes_and_box_bound(name, d):
    rng = np.random.default_rng(d)
    X = rng.random((50, d))
    starts = np.array([0, 10, 49], np.int64)
    sizes = np.array([10, 30, 1], np.int64)  # ranges start+1 .. start+size-1 (the bucket root is excluded)
    box = K.bucket_boxes(X, starts, sizes)
    blk = K.bucket_blocks(X, starts, sizes)
    want = X.copy().ravel()
    for a0, sz in zip(starts + 1, sizes - 1):
        want[a0 * d : (a0 + sz) * d] = X[a0 : a0 + sz].T.ravel()
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


@pytest.mark.parametrize("kernel", [kvant.RBF(0.3, 1.0), kvant.Matern52(0.7, 2.5)])
@pytest.mark.parametrize("nq,n,d,rank", [(1, 1, 1, 1), (3, 17, 2, 5), (9, 64, 3, 40)])
def test_residual_tile_dists_match_reference(kernel, nq, n, d, rank):
    # the fused scan's per-pair formula, fed a BLAS tile, against the plain NumPy residual distance
    g = np.random.default_rng(nq + n + d)
    X = g.random((n, d)) * 3.0
    rc = kvant.ResidualCorrelation.from_points(X, kernel, n_inducing=rank, seed=0)
    F = rc.features()
    q = g.choice(n, nq)
    j0 = n // 3
    p = np.arange(n)
    Wq, Wp = F[q, d : d + rank], F[:, d : d + rank]
    G = np.ascontiguousarray(Wq @ Wp[j0:].T)
    out = np.empty_like(G)
    K.residual_tile_dists(G, F[q, :d].copy(), F[q, d + rank].copy(), F[q, -1].copy(), F[:, :d].copy(),
                          F[:, d + rank].copy(), F[:, -1].copy(), j0, kernel.variance, kernel.code, out)
    want = ref.residual_correlation_distance(X, rc.v, rc.p_diag, kernel, q, p[j0:])
    np.testing.assert_allclose(out, want, atol=1e-7)
    assert np.all(out[q[:, None] == p[None, j0:]] == 0.0)


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
    m, cl, bad = K.net_centres_big(X, params, 2.0, perm, pdist, s0, n, lvl_p, asg, adist, cent)
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
