"""The kd-tree kernels behind CoverTree's queries in few coordinates (kernels.kdtree) vs plain NumPy: the build's
layout (every node a contiguous run inside its box, children halving it, coinciding points one sorted leaf) and
exact k-NN in the three query modes on awkward data (n = 1, k = n, ties, duplicates, integer grids, d = 1)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvant.bench import reference as ref
from kvant.kernels import kdtree as KD
from kvant.kernels import tree as K

CODES = {"euclidean": K.EUCLIDEAN, "manhattan": K.MANHATTAN, "chebyshev": K.CHEBYSHEV}


def _build(X, slots, leaf=KD.KD_LEAF):
    rows, sl = np.ascontiguousarray(X, dtype=np.float64).copy(), np.asarray(slots, np.int64).copy()
    return (rows, sl, *KD.kd_build(rows, sl, leaf))


def _query(index, metric, Q, qslot, mode, k, serial=False):
    nq = Q.shape[0]
    out_d, out_i, bad = np.empty((nq, k)), np.empty((nq, k), np.int64), np.zeros(nq, np.bool_)
    params = np.array([CODES[metric], 0, 0, 0, 0], float)
    search = KD.kd_knn_serial if serial else KD.kd_knn
    search(*index, params, CODES[metric], np.ascontiguousarray(Q, dtype=np.float64), np.asarray(qslot, np.int64),
           mode, k, out_d, out_i, bad)
    return out_d, out_i, bad


def _reference(metric, X, slots, Q, qslot, mode, k):
    D = ref.tree_pairwise(metric, Q, X)
    allowed = np.ones(D.shape, bool)
    if mode == 1:
        allowed = slots[None, :] != qslot[:, None]
    elif mode == 2:
        allowed = slots[None, :] < qslot[:, None]
    return ref.knn_from_distances(D, slots, k, allowed)


def _data(kind, n, d, rng):
    if kind == "uniform":
        return rng.random((n, d))
    if kind == "grid":  # integer coordinates: many exact ties
        return rng.integers(0, 3, (n, d)).astype(float)
    if kind == "same":  # every point the same
        return np.repeat(rng.standard_normal((1, d)), n, axis=0)
    m = max(1, n // 10)  # clumps of exact copies
    return rng.standard_normal((m, d))[rng.integers(0, m, n)]


def _check_layout(X, slots, index, leaf):
    rows, sl, lo, hi, left, box, minid, same = index
    n, d = X.shape
    # the rows are the input rows reordered, each with its slot
    order = np.argsort(slots)
    back = np.argsort(sl)
    assert np.array_equal(sl[back], slots[order]) and np.array_equal(rows[back], X[order])
    assert lo[0] == 0 and hi[0] == n
    for v in range(lo.shape[0]):
        seg = rows[lo[v] : hi[v]]
        assert hi[v] > lo[v]
        assert np.array_equal(box[v, :d], seg.min(0)) and np.array_equal(box[v, d:], seg.max(0))
        assert minid[v] == sl[lo[v] : hi[v]].min()
        c = left[v]
        if c < 0:  # a leaf: small, or one point repeated with its slots ascending
            assert hi[v] - lo[v] <= leaf or same[v]
            if same[v]:
                assert np.all(seg == seg[0]) and np.all(np.diff(sl[lo[v] : hi[v]]) > 0)
        else:  # two children that halve it
            assert not same[v] and hi[v] - lo[v] > leaf
            assert lo[c] == lo[v] and hi[c] == lo[c + 1] and hi[c + 1] == hi[v]
            assert abs((hi[c] - lo[c]) - (hi[c + 1] - lo[c + 1])) <= 1


@pytest.mark.parametrize("kind", ["uniform", "grid", "same", "copies"])
@pytest.mark.parametrize("n,d", [(1, 1), (2, 3), (17, 1), (300, 2), (700, 5)])
def test_build_layout(kind, n, d):
    rng = np.random.default_rng(n * 7 + d)
    X = _data(kind, n, d, rng)
    slots = np.sort(rng.choice(5 * n + 3, n, replace=False))[rng.permutation(n)]
    for leaf in (1, 4, KD.KD_LEAF):
        _check_layout(X, slots, _build(X, slots, leaf), leaf)


@pytest.mark.parametrize("metric", list(CODES))
@pytest.mark.parametrize("kind", ["uniform", "grid", "same", "copies"])
@pytest.mark.parametrize("n,d", [(1, 1), (3, 2), (40, 1), (500, 3), (900, 6)])
def test_knn_matches_numpy_in_every_mode(metric, kind, n, d):
    rng = np.random.default_rng(n + 31 * d)
    X = _data(kind, n, d, rng)
    slots = np.sort(rng.choice(4 * n + 2, n, replace=False))
    index = _build(X, slots)
    Q = np.vstack([_data(kind, 15, d, rng), X[: min(n, 10)]])
    for k in sorted({1, min(4, n), n}):
        got = _query(index, metric, Q, np.zeros(Q.shape[0], np.int64), 0, k)
        want = _reference(metric, X, slots, Q, np.zeros(Q.shape[0], np.int64), 0, k)
        # bit-identical distances (the tree's own float64 metric), ids ordered as brute force orders ties
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=0)
        assert np.array_equal(got[1], want[1]) and not got[2].any()
        for mode in (1, 2):  # the points themselves: excluding each one, or only slots below it
            got = _query(index, metric, X, slots, mode, k)
            want = _reference(metric, X, slots, X, slots, mode, k)
            np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=0)
            assert np.array_equal(got[1], want[1])


def test_serial_kernel_answers_as_the_parallel_one():
    rng = np.random.default_rng(5)
    X = _data("copies", 2000, 4, rng)
    index = _build(X, np.arange(2000))
    Q = rng.standard_normal((50, 4))
    a = _query(index, "euclidean", Q, np.zeros(50, np.int64), 0, 9)
    b = _query(index, "euclidean", Q, np.zeros(50, np.int64), 0, 9, serial=True)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_many_copies_stop_at_the_kth_smallest_slot():
    # 20,000 copies of one point: a query's leaf is one sorted run, so the answer is the k smallest eligible slots
    X = np.ones((20000, 2))
    X[::1000] = 3.0
    slots = np.arange(20000)
    index = _build(X, slots)
    assert int(np.count_nonzero(index[7])) >= 1  # the copies form one `same` leaf
    got = _query(index, "manhattan", X[:2000], slots[:2000], 2, 3)
    want = _reference("manhattan", X, slots, X[:2000], slots[:2000], 2, 3)
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
    got = _query(index, "euclidean", X[:50], slots[:50], 1, 5)
    assert np.array_equal(got[1], _reference("euclidean", X, slots, X[:50], slots[:50], 1, 5)[1])


def test_box_bounds_stay_below_distances_at_subnormal_scales():
    # squares below float64's normal range round: the box bound is computed like the distance (same operations on
    # smaller operands), so it can never exceed a computed distance and no true neighbour is pruned
    rng = np.random.default_rng(3)
    X = rng.standard_normal((3000, 2)) * 1e-161
    index = _build(X, np.arange(3000))
    Q = rng.standard_normal((200, 2)) * 1e-161
    got = _query(index, "euclidean", Q, np.zeros(200, np.int64), 0, 6)
    params = np.array([K.EUCLIDEAN, 0, 0, 0, 0], float)
    out_d, out_i, bad = np.empty((200, 6)), np.empty((200, 6), np.int64), np.zeros(200, np.bool_)
    K.brute_knn(X, params, Q, np.zeros(200, np.int64), 0, np.arange(3000), 6, out_d, out_i, bad)
    assert np.array_equal(got[1], out_i) and np.array_equal(got[0], out_d)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 120), d=st.integers(1, 4), k=st.integers(1, 8), seed=st.integers(0, 10**6),
       metric=st.sampled_from(list(CODES)), decimals=st.integers(0, 3), mode=st.integers(0, 2))
def test_knn_exact_hypothesis(n, d, k, seed, metric, decimals, mode):
    rng = np.random.default_rng(seed)
    X = np.round(rng.standard_normal((n, d)), decimals)  # rounding makes ties and copies
    slots = rng.permutation(3 * n)[:n]
    k = min(k, n)
    index = _build(X, slots, leaf=int(rng.integers(1, 20)))
    if mode == 0:
        Q, qslot = np.round(rng.standard_normal((12, d)), decimals), np.zeros(12, np.int64)
    else:
        Q, qslot = X, slots
    got = _query(index, metric, Q, qslot, mode, k)
    want = _reference(metric, X, slots, Q, qslot, mode, k)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=0)
    assert np.array_equal(got[1], want[1])
