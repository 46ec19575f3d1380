"""Clustering kernels against the plain NumPy references on awkward shapes and values."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvant.bench import reference as ref
from kvant.cluster.assign import assign_top2
from kvant.errors import InvalidInput
from kvant.kernels.assign import top2_from_ip
from kvant.kernels.distance import (
    exact_rerank,
    exact_rows,
    exact_topk,
    gather_rows_into,
    mean_and_spread,
    normalise_rows_into,
    sq_l2_block,
    sq_l2_direct,
    sq_norms,
    sq_norms_serial,
)
from kvant.kernels.lloyd import (
    UNIT_WEIGHTS,
    centre_moves,
    cluster_sums,
    exact_dist_to,
    exact_sq_dist_rows,
    exact_sq_dist_rows_scaled,
    kmeanspp,
    kmeanspp_greedy,
    m_step,
    move_rows,
    reseed_empty,
    sq_dist_to_point,
    sq_dist_to_point_unit,
)
from kvant.kernels.topk import merge_sorted_topk, merge_topk, merge_topk_ids, topk_smallest

SHAPES = [(0, 3, 1), (1, 1, 1), (5, 1, 3), (37, 7, 5), (64, 13, 17), (300, 33, 40), (129, 130, 2)]


def _data(n, d, k, seed=0, scale=1.0):
    g = np.random.default_rng(seed)
    return (g.standard_normal((n, d)) * scale).astype(np.float32), (g.standard_normal((k, d)) * scale).astype(
        np.float32
    )


@pytest.mark.parametrize("n,d,k", SHAPES)
def test_sq_l2_and_norms(n, d, k):
    x, c = _data(n, d, k)
    np.testing.assert_allclose(sq_norms(x), (x.astype(np.float64) ** 2).sum(1), rtol=1e-6)
    np.testing.assert_allclose(sq_norms_serial(x), (x.astype(np.float64) ** 2).sum(1), rtol=1e-6)
    want = ref.sq_l2_ref(x, c)
    np.testing.assert_allclose(sq_l2_direct(x, c), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sq_l2_block(x, c, sq_norms(c)), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1e-18, 1e18])
def test_normalise_rows_into_matches_reference(n, d, k, scale):
    x, _ = _data(n, d, k, scale=scale)
    want, zero = ref.normalise_rows_ref(x)
    out = np.empty_like(x)
    assert normalise_rows_into(x, out) == zero == -1
    np.testing.assert_allclose(out, want, rtol=1e-6)
    if n > 2:
        x[2] = 0.0
        x[n - 1] = 0.0
        assert normalise_rows_into(x, out) == ref.normalise_rows_ref(x)[1] == 2


@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1e-18, 1e18, 1e37])  # (1e37: near float32's limit)
def test_gather_rows_into_matches_numpy_and_normalise_rows_into(n, d, k, scale):
    # rows in any order with repeats, plain (x[idx] exactly) and unit (bit for bit normalise_rows_into of x[idx], which
    # the training sample used to be): so fits are unchanged by the one-pass gather
    x, _ = _data(n, d, k, seed=n + d, scale=scale)
    g = np.random.default_rng(n + 7)
    idx = g.integers(0, max(n, 1), size=2 * n + 3) if n else np.empty(0, np.int64)
    out = np.full((idx.size, d), np.nan, np.float32)
    assert gather_rows_into(x, idx, out, False) == -1
    np.testing.assert_array_equal(out, x[idx])
    want = np.empty_like(out)
    assert normalise_rows_into(x[idx], want) == -1
    out[:] = np.nan
    assert gather_rows_into(x, idx, out, True) == -1
    np.testing.assert_array_equal(out, want)
    np.testing.assert_allclose(out, ref.normalise_rows_ref(x[idx])[0], rtol=1e-6)
    if n > 2:
        x[2] = 0.0
        idx[[1, 4]] = 2
        assert gather_rows_into(x, idx, out, True) == 1  # the first position holding a zero row
        assert gather_rows_into(x, idx, out, False) == -1


@pytest.mark.parametrize("n,d,k", SHAPES)
def test_top2_row_scale_equals_scaling_the_products_first(n, d, k):
    # spherical assignment scales each row's products by 1/|x| inside the kernel: bit for bit what scaling
    # g first gives, including rows whose scale is extreme
    x, c = _data(n, d, k, seed=n + 2 * d + k)
    scale = np.random.default_rng(n + k).uniform(0.01, 100.0, n).astype(np.float32)
    if n:
        scale[0] = np.float32(3e-38)
    xn = sq_norms(x)
    out = [(np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.float32)) for _ in range(2)]
    top2_from_ip(x @ c.T, sq_norms(c), xn, *out[0], row_scale=scale)
    top2_from_ip((x @ c.T) * scale[:, None], sq_norms(c), xn, *out[1])
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("path", ["blas", "driver"])
def test_top2_matches_reference(n, d, k, path):
    x, c = _data(n, d, k, seed=n + d + k)
    labels = np.empty(n, np.int64)
    d1 = np.empty(n, np.float32)
    d2 = np.empty(n, np.float32)
    if path == "blas":
        top2_from_ip(x @ c.T, sq_norms(c), sq_norms(x), labels, d1, d2)
    else:
        assign_top2(x, c, sq_norms(c), labels, d1, d2)
    rl, r1, r2 = ref.top2_ref(x, c)
    np.testing.assert_array_equal(labels, rl)
    np.testing.assert_allclose(d1, r1, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(d2, r2, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n,d,k", SHAPES)
def test_assign_top2_rows_matches_reference_on_the_listed_rows(n, d, k):
    # rows= gathers block by block inside the driver; the answer must be that of the listed rows, in list order
    x, c = _data(n, d, k, seed=3 * n + d + k)
    rows = np.random.default_rng(n).permutation(n)[: (2 * n + 2) // 3].astype(np.int64)
    m = rows.size
    labels, d1, d2 = np.empty(m, np.int64), np.empty(m, np.float32), np.empty(m, np.float32)
    exact = np.empty(m, np.float64)
    assign_top2(x, c, sq_norms(c), labels, d1, d2, x_sqnorms=sq_norms(x)[rows], n_threads=2, exact_sq=exact,
                rows=rows)
    rl, r1, r2 = ref.top2_ref(x[rows], c)
    np.testing.assert_array_equal(labels, rl)
    np.testing.assert_allclose(d1, r1, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(d2, r2, rtol=1e-4, atol=1e-3)
    want = ((x[rows].astype(np.float64) - c.astype(np.float64)[labels]) ** 2).sum(axis=1)
    np.testing.assert_allclose(exact, want, rtol=1e-12)


@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1e-18, 1e18])
def test_assign_top2_unit_rows_matches_reference_on_normalised_rows(n, d, k, scale):
    # unit_rows assigns raw rows as if normalised (scaled products, or explicit normalisation for extreme
    # norms, as 1e-18 and 1e18 are); the answer must be the reference's on the normalised rows
    x, c = _data(n, d, k, seed=n + 2 * d + k)
    x *= np.float32(scale)
    x[::3] *= np.float32(7.5)  # rows of different norms in one block
    c = (c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-30)).astype(np.float32)
    labels, d1, d2 = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.float32)
    exact = np.empty(n, np.float64)
    assign_top2(x, c, sq_norms(c), labels, d1, d2, exact_sq=exact, unit_rows=True, n_threads=2)
    xu = (x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)
    rl, r1, r2 = ref.top2_ref(xu, c)
    np.testing.assert_array_equal(labels, rl)
    np.testing.assert_allclose(d1, r1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d2, r2, rtol=1e-4, atol=1e-5)
    want = ((xu.astype(np.float64) - c.astype(np.float64)[rl]) ** 2).sum(axis=1)
    np.testing.assert_allclose(exact, want, rtol=1e-5, atol=1e-6)


def test_assign_top2_unit_rows_names_the_first_zero_row():
    x, c = _data(20000, 5, 3)
    x[[17001, 4321]] = 0.0
    out = [np.empty(20000, t) for t in (np.int64, np.float32, np.float32)]
    with pytest.raises(InvalidInput, match="row 4331 has zero norm"):
        assign_top2(x, c, sq_norms(c), *out, unit_rows=True, row_offset=10, n_threads=2)


def test_exact_sq_dist_rows_scaled():
    x, c = _data(300, 19, 7, scale=1e3)
    labels = np.arange(300, dtype=np.int64) % 7
    scale = 1.0 / np.linalg.norm(x.astype(np.float64), axis=1)
    want = ((x.astype(np.float64) * scale[:, None] - c.astype(np.float64)[labels]) ** 2).sum(axis=1)
    np.testing.assert_allclose(exact_sq_dist_rows_scaled(x, c, labels, scale), want, rtol=1e-12)


def test_top2_ties_go_to_lower_id():
    c = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)  # centres 0 and 2 coincide
    x = np.array([[1.0, 0.0], [0.5, 0.5]], np.float32)
    labels = np.empty(2, np.int64)
    d1 = np.empty(2, np.float32)
    d2 = np.empty(2, np.float32)
    top2_from_ip(x @ c.T, sq_norms(c), sq_norms(x), labels, d1, d2)
    assert labels.tolist() == [0, 0]
    assert d2[0] == pytest.approx(0.0)  # runner-up is the duplicate centre


def test_large_dynamic_range_labels_stay_exact():
    # Rows and centres offset by 1e3 with O(1) spread: the norm expansion must still pick the true nearest.
    g = np.random.default_rng(3)
    c = (1e3 + g.standard_normal((6, 3)) * 3).astype(np.float32)
    x = (1e3 + g.standard_normal((50, 3)) * 3).astype(np.float32)
    labels = np.empty(50, np.int64)
    d1 = np.empty(50, np.float32)
    d2 = np.empty(50, np.float32)
    top2_from_ip(x @ c.T, sq_norms(c), sq_norms(x), labels, d1, d2)
    rl, r1, r2 = ref.top2_ref(x, c)
    clear = (r2 - r1) > 1.0  # rows whose runner-up is not within float32 rounding of the winner
    np.testing.assert_array_equal(labels[clear], rl[clear])
    np.testing.assert_allclose(d1, r1, atol=1.0)


@pytest.mark.parametrize("nq,n,k", [(0, 5, 3), (1, 1, 1), (3, 2, 5), (7, 50, 1), (4, 100, 10), (2, 33, 33)])
def test_topk_matches_reference(nq, n, k):
    g = np.random.default_rng(nq * 100 + n)
    dist = g.integers(0, 5, size=(nq, n)).astype(np.float32)  # many ties
    vals, ids = topk_smallest(dist, k)
    rv, ri = ref.topk_ref(dist, k)
    np.testing.assert_array_equal(ids, ri)
    np.testing.assert_array_equal(vals, rv.astype(np.float32))


@pytest.mark.parametrize("nq,n,d,k", [(0, 5, 3, 2), (1, 1, 1, 1), (3, 2, 4, 5), (7, 50, 13, 1), (4, 100, 17, 10),
                                      (2, 33, 1, 33)])
@pytest.mark.parametrize("scale", [1.0, 1e-20, 1e18])
@pytest.mark.parametrize("ip", [False, True])
def test_exact_topk_matches_reference(nq, n, d, k, scale, ip):
    g = np.random.default_rng(nq * 100 + n)
    x = (g.integers(0, 3, size=(n, d)) * scale).astype(np.float32)  # many exact ties and duplicates
    x[: n // 2] += np.float32(1e4 * scale)  # and a large offset on half the rows
    if ip:
        x[1::3] *= np.float32(-1)  # inner products of both signs
    q = x[g.integers(0, n, nq)] if nq else np.empty((0, d), np.float32)
    out_d, out_i = np.empty((nq, k)), np.empty((nq, k), np.int64)
    exact_topk(q, x, out_d, out_i, ip)
    rd, ri = (ref.exact_ip_topk_ref if ip else ref.exact_l2_topk_ref)(q, x, k)
    np.testing.assert_array_equal(out_i, ri)
    np.testing.assert_array_equal(out_d, rd)


@pytest.mark.parametrize("order", ["near", "reversed", "random"])
@pytest.mark.parametrize("ip", [False, True])
def test_exact_rerank_ranks_like_a_lexsort(order, ip):
    # shortlists re-scored exactly and ranked (score, then row; empty slots last): nearly sorted lists take the
    # insertion sort, reversed ones overflow its budget and take the merge sorts; duplicates tie exactly
    g = np.random.default_rng(7)
    x = g.integers(-3, 4, (300, 5)).astype(np.float32)
    x[100:150] = x[:50]
    q = g.integers(-3, 4, (9, 5)).astype(np.float32)
    rows = np.stack([g.permutation(300)[:60] for _ in range(9)]).astype(np.int64)
    rows[2, 50:] = -1
    exact = np.empty(rows.shape)
    exact_rows(q, x, rows, exact, ip)
    for j in range(9):
        by = np.lexsort((np.where(rows[j] >= 0, rows[j], 1 << 62), exact[j]))
        if order == "near":  # two neighbours swapped every few places
            by[1::7], by[2::7] = by[2::7].copy(), by[1::7].copy()
        rows[j] = rows[j, by[::-1]] if order == "reversed" else rows[j, by] if order == "near" else rows[j]
    want_d = np.empty(rows.shape)
    exact_rows(q, x, rows, want_d, ip)
    key = np.where(rows >= 0, rows, 1 << 62)
    by = np.lexsort((key, want_d), axis=-1)
    got_i, got_d = rows.copy(), np.empty(rows.shape, np.float32)
    exact_rerank(q, x, got_i, got_d, ip)
    np.testing.assert_array_equal(got_i, np.take_along_axis(rows, by, 1))
    np.testing.assert_array_equal(got_d, np.take_along_axis(want_d, by, 1).astype(np.float32))


@pytest.mark.parametrize("parts,keep", [(1, 1), (2, 5), (3, 17), (5, 40)])
def test_merge_sorted_topk_equals_merging_every_entry(parts, keep):
    # sorted per-part lists (ties to the smaller id, empty slots inf / -1 last) merged as sorted runs, against
    # merge_topk_ids inserting every entry: the same lists, ties and padding included
    g = np.random.default_rng(parts * 10 + keep)
    pd = np.full((parts, 6, keep), np.inf, np.float32)
    pi = np.full((parts, 6, keep), -1, np.int64)
    for p in range(parts):
        for j in range(6):
            m = int(g.integers(0, keep + 1))  # some lists not full
            ids = g.choice(1000, m, replace=False) + 1000 * p
            d = g.integers(0, 4, m).astype(np.float32)  # many equal scores
            o = np.lexsort((ids, d))
            pd[p, j, :m], pi[p, j, :m] = d[o], ids[o]
    got_d = np.full((6, keep), np.inf, np.float32)
    got_i = np.full((6, keep), -1, np.int64)
    merge_sorted_topk(pd, pi, got_d, got_i)
    want_d = np.full((6, keep), np.inf, np.float32)
    want_i = np.full((6, keep), -1, np.int64)
    for p in range(parts):
        merge_topk_ids(pd[p], pi[p], want_d, want_i)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_d, want_d)


def test_merge_topk_blocks_equal_one_shot():
    g = np.random.default_rng(1)
    dist = g.standard_normal((6, 257)).astype(np.float32)
    out_d = np.full((6, 9), np.inf, np.float32)
    out_i = np.full((6, 9), -1, np.int64)
    for s in range(0, 257, 50):
        merge_topk(np.ascontiguousarray(dist[:, s : s + 50]), s, out_d, out_i)
    rv, ri = ref.topk_ref(dist, 9)
    np.testing.assert_array_equal(out_i, ri)


def test_merge_topk_with_explicit_ids_skips_negative_ids():
    g = np.random.default_rng(2)
    dist = g.integers(0, 4, size=(5, 40)).astype(np.float32)
    ids = np.tile(np.arange(100, 140, dtype=np.int64), (5, 1))
    ids[:, ::7] = -1  # padding slots must never be selected
    out_d = np.full((5, 6), np.inf, np.float32)
    out_i = np.full((5, 6), -1, np.int64)
    merge_topk_ids(dist, ids, out_d, out_i)
    masked = dist.copy()
    masked[ids < 0] = np.nan  # the reference skips NaN
    rv, ri = ref.topk_ref(masked, 6)
    np.testing.assert_array_equal(out_i, np.where(ri >= 0, ri + 100, -1))
    np.testing.assert_array_equal(out_d, rv.astype(np.float32))


@pytest.mark.parametrize("n,d,k", [(0, 2, 1), (1, 1, 1), (101, 7, 9)])
def test_cluster_sums_and_moves(n, d, k):
    x, _ = _data(n, d, k)
    labels = np.random.default_rng(0).integers(0, k, size=n).astype(np.int64)
    for parts in (1, 2, 3):
        sums, counts = cluster_sums(x, labels, k, parts, UNIT_WEIGHTS)
        rs, rc = ref.cluster_sums_ref(x, labels, k)
        np.testing.assert_allclose(sums, rs, rtol=1e-12, atol=1e-9)
        np.testing.assert_array_equal(counts, rc)
    if n:
        rows = np.arange(0, n, 3)
        new = (labels[rows] + 1) % k
        move_rows(x, rows, labels[rows].copy(), new, sums, counts, UNIT_WEIGHTS)
        labels[rows] = new
        rs, rc = ref.cluster_sums_ref(x, labels, k)
        np.testing.assert_allclose(sums, rs, rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(counts, rc)


@pytest.mark.parametrize("n,d,k", [(0, 3, 1), (1, 1, 1), (40, 5, 3), (37, 130, 4)])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e4])
def test_exact_sq_dist_rows(n, d, k, scale):
    x, c = _data(n, d, k, scale=scale)
    labels = np.arange(n, dtype=np.int64) % k
    want = ((x.astype(np.float64) - c.astype(np.float64)[labels]) ** 2).sum(axis=1)
    np.testing.assert_allclose(exact_sq_dist_rows(x, c, labels), want, rtol=1e-12)


@pytest.mark.parametrize("d", [1, 15, 16, 17, 32, 47, 130])
@pytest.mark.parametrize("layout", ["C", "F", "column slice"])
def test_lane_sums_match_float64_on_awkward_dims_and_strides(d, layout):
    """The 16-lane float64 sums (norms, exact distances, Hamerly's exact_dist_to) against NumPy in float64: every
    remainder of D mod 16, rows of non-unit stride (the scalar path), and a 1e6 dynamic range within rows."""
    g = np.random.default_rng(d)
    base = (g.standard_normal((23, 2 * d)) * np.logspace(-3, 3, 2 * d)).astype(np.float32)
    x = {"C": np.ascontiguousarray(base[:, :d]), "F": np.asfortranarray(base[:, :d]),
         "column slice": base[:, ::2]}[layout]
    c = np.ascontiguousarray(base[:5, d:][:, :d])
    labels = np.arange(23, dtype=np.int64) % 5
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    np.testing.assert_allclose(sq_norms_serial(x), (x64**2).sum(1), rtol=1e-6)
    np.testing.assert_allclose(sq_norms(x), (x64**2).sum(1), rtol=1e-6)
    want = ((x64 - c64[labels]) ** 2).sum(axis=1)
    np.testing.assert_allclose(exact_sq_dist_rows(x, c, labels), want, rtol=1e-12)
    rows = np.arange(0, 23, 2)
    np.testing.assert_allclose(exact_dist_to(x, rows, c, labels), np.sqrt(want[rows]), rtol=1e-6)


def test_assign_top2_exact_sq_is_the_float64_distance_to_the_label():
    x, c = _data(3000, 37, 11, scale=1e3)
    labels = np.empty(3000, np.int64)
    exact = np.empty(3000, np.float64)
    assign_top2(x, c, sq_norms_serial(c), labels, np.empty(3000, np.float32), np.empty(3000, np.float32),
                n_threads=2, exact_sq=exact)
    want = ((x.astype(np.float64) - c.astype(np.float64)[labels]) ** 2).sum(axis=1)
    np.testing.assert_allclose(exact, want, rtol=1e-12)


@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (7, 1, 7), (50, 3, 5), (200, 17, 40), (64, 129, 9)])
def test_kmeanspp_matches_reference(n, d, k):
    # Small integer coordinates make every squared distance exact in float32, so picks must be identical.
    g = np.random.default_rng(n + d + k)
    x = g.integers(-20, 21, size=(n, d)).astype(np.float32)
    x[: n // 4] = x[0]  # duplicated rows: zero weights must never be picked
    for seed in range(3):
        u = np.random.default_rng(seed).random(k)
        first = seed % n
        want = ref.kmeanspp_ref(x, k, u, first)
        for n_parts in (1, 2, 5):  # n=1..200 rows are 1-4 mass blocks: more parts than blocks too
            np.testing.assert_array_equal(kmeanspp(x, k, u, first, UNIT_WEIGHTS, 160, n_parts), want)


@pytest.mark.parametrize("n,d,k,trials", [(1, 1, 1, 2), (7, 1, 7, 3), (50, 3, 5, 3), (200, 17, 40, 5), (64, 129, 9, 4),
                                          (300, 5, 30, 2)])
def test_greedy_kmeanspp_matches_reference(n, d, k, trials):
    # Integer coordinates and weights: every distance and potential is exact, so picks must be identical.
    g = np.random.default_rng(n + d + k)
    x = g.integers(-20, 21, size=(n, d)).astype(np.float32)
    x[: n // 4] = x[0]  # duplicated rows: zero weights must never be picked
    w = g.integers(1, 6, size=n).astype(np.float64)
    for seed in range(3):
        u = np.random.default_rng(seed).random((k, trials))
        first = seed % n
        want = ref.kmeanspp_greedy_ref(x, k, u, first)
        want_w = ref.kmeanspp_greedy_ref(x, k, u, first, w)
        for n_parts in (1, 2, 5):
            np.testing.assert_array_equal(kmeanspp_greedy(x, k, u, first, UNIT_WEIGHTS, n_parts), want)
            np.testing.assert_array_equal(kmeanspp_greedy(x, k, u, first, w, n_parts), want_w)


def test_greedy_kmeanspp_keeps_the_best_draw():
    # Three far groups; the second centre's draws land in the near group and in a far one: the far one leaves the
    # smaller potential and must be kept whatever the draws' order.
    x = np.array([[0, 0], [1, 0], [100, 0], [101, 0], [0, 100], [1, 100]], np.float32)
    d2 = ((x - x[0]) ** 2).sum(1)
    run = np.cumsum(d2) / d2.sum()
    near, far = 0.5 * run[0], 0.5 * (run[1] + run[2])  # draws hitting row 1 and row 3
    for draws in ([near, far], [far, near]):
        u = np.array([[0.0, 0.0], draws])
        assert kmeanspp_greedy(x, 2, u, 0, UNIT_WEIGHTS)[1] != 1


def test_kmeanspp_picks_distinct_far_points():
    # Two tight, far-apart groups: D² seeding must pick one centre in each.
    g = np.random.default_rng(0)
    x = np.concatenate([g.standard_normal((50, 2)) * 0.01, 100 + g.standard_normal((50, 2)) * 0.01]).astype(np.float32)
    for seed in range(5):
        u = np.random.default_rng(seed).random(2)
        rows = kmeanspp(x, 2, u, seed, UNIT_WEIGHTS)
        assert sorted(r >= 50 for r in rows) == [False, True]
    # Fewer distinct points than k: still returns k valid row indices.
    same = np.ones((3, 2), np.float32)
    rows = kmeanspp(same, 3, np.zeros(3), 0, UNIT_WEIGHTS)
    assert rows.min() >= 0 and rows.max() < 3


@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (101, 7, 9), (64, 130, 3)])
def test_weighted_cluster_sums_and_moves(n, d, k):
    x, _ = _data(n, d, k)
    g = np.random.default_rng(3)
    labels = g.integers(0, k, size=n).astype(np.int64)
    w = g.uniform(0.01, 50.0, size=n)
    for parts in (1, 2):
        sums, counts = cluster_sums(x, labels, k, parts, w)
        rs, rc = ref.cluster_sums_ref(x, labels, k, w)
        np.testing.assert_allclose(sums, rs, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(counts, rc, rtol=1e-12)
    rows = np.arange(0, n, 2)
    new = (labels[rows] + 1) % k
    move_rows(x, rows, labels[rows].copy(), new, sums, counts, w)
    labels[rows] = new
    rs, rc = ref.cluster_sums_ref(x, labels, k, w)
    np.testing.assert_allclose(sums, rs, rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(counts, rc, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (50, 3, 5), (200, 17, 40)])
def test_weighted_kmeanspp_matches_reference(n, d, k):
    # Integer coordinates and integer weights: every w·D² is exact, so the picks must be identical.
    g = np.random.default_rng(n + d)
    x = g.integers(-20, 21, size=(n, d)).astype(np.float32)
    w = g.integers(1, 4, size=n).astype(np.float64)
    for seed in range(3):
        u = np.random.default_rng(seed).random(k)
        np.testing.assert_array_equal(kmeanspp(x, k, u, seed % n, w), ref.kmeanspp_ref(x, k, u, seed % n, w))


def test_weighted_kmeanspp_never_picks_a_zero_weight_row():
    # A far row of weight 0 stands for no data: D² alone would pick it for the second centre.
    x = np.array([[0.0], [0.1], [0.2], [1000.0]], np.float32)
    w = np.array([1.0, 1.0, 1.0, 0.0])
    for u in np.linspace(0.0, 0.999, 7):
        assert 3 not in kmeanspp(x, 2, np.array([0.0, u]), 0, w)


@pytest.mark.parametrize("d", [1, 2, 16])
def test_kmeanspp_pruning_matches_reference_on_clustered_data(d):
    # Tight, well-separated clusters make the triangle-inequality skip fire for most rows (forced on here below
    # the dimension where kmeanspp uses it by default); d=1 (collinear
    # points) makes the bound tight, so a skip test that is too eager picks different rows. Integer
    # coordinates below 2^12 keep every squared distance exact in float32, so the picks must be identical.
    g = np.random.default_rng(d)
    centres = g.integers(-30, 31, size=(60, d)) * 10
    x = (centres[g.integers(0, 60, size=3000)] + g.integers(-3, 4, size=(3000, d))).astype(np.float32)
    for seed in range(3):
        u = np.random.default_rng(seed).random(120)
        want = ref.kmeanspp_ref(x, 120, u, seed)
        w = np.random.default_rng(seed).integers(0, 3, size=3000).astype(np.float64)
        w[seed] = 1.0
        want_w = ref.kmeanspp_ref(x, 120, u, seed, w)
        for prune_min_dim in (1, 10**9):  # the skip test forced on, and off
            for n_parts in (1, 2, 3, 47, 1000):  # serial, split over threads (uneven runs of blocks), more parts
                np.testing.assert_array_equal(kmeanspp(x, 120, u, seed, UNIT_WEIGHTS, prune_min_dim, n_parts), want)
                np.testing.assert_array_equal(kmeanspp(x, 120, u, seed, w, prune_min_dim, n_parts), want_w)


@pytest.mark.parametrize("d", [1, 2, 16])
def test_greedy_kmeanspp_pruning_matches_reference_on_clustered_data(d):
    # As for kmeanspp: tight, separated integer clusters make the skip fire for most rows and candidates, d=1 makes
    # the triangle bound tight; every distance and potential is exact, so the picks must equal the reference's
    # whether the skip is forced on or off.
    g = np.random.default_rng(10 + d)
    centres = g.integers(-30, 31, size=(60, d)) * 10
    x = (centres[g.integers(0, 60, size=2000)] + g.integers(-3, 4, size=(2000, d))).astype(np.float32)
    for seed in range(2):
        u = np.random.default_rng(seed).random((90, 4))
        want = ref.kmeanspp_greedy_ref(x, 90, u, seed)
        w = np.random.default_rng(seed).integers(0, 3, size=2000).astype(np.float64)
        w[seed] = 1.0
        want_w = ref.kmeanspp_greedy_ref(x, 90, u, seed, w)
        for prune_min_dim in (1, 10**9):
            for n_parts in (1, 2, 47):
                np.testing.assert_array_equal(kmeanspp_greedy(x, 90, u, seed, UNIT_WEIGHTS, n_parts, prune_min_dim),
                                              want)
                np.testing.assert_array_equal(kmeanspp_greedy(x, 90, u, seed, w, n_parts, prune_min_dim), want_w)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_kmeanspp_matches_reference_on_real_valued_data(scale):
    # Real-valued rows: the kernel's float32 distances and block sums round differently from the float64
    # reference, but far below the gaps a uniform draw lands in, so the picks agree.
    g = np.random.default_rng(7)
    x = ((g.standard_normal((40, 24)) * 5)[g.integers(0, 40, size=2000)] + g.standard_normal((2000, 24)))
    x = (x * scale).astype(np.float32)
    u = g.random(64)
    want = ref.kmeanspp_ref(x, 64, u, 3)
    for prune_min_dim in (1, 10**9):
        np.testing.assert_array_equal(kmeanspp(x, 64, u, 3, UNIT_WEIGHTS, prune_min_dim), want)


@pytest.mark.parametrize("n,d", [(0, 3), (1, 1), (37, 130), (1000, 8)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_sq_dist_to_point(n, d, scale):
    x, c = _data(n, d, 1, scale=scale)
    want = ((x.astype(np.float64) - c[0].astype(np.float64)) ** 2).sum(axis=1)
    np.testing.assert_allclose(sq_dist_to_point(x, c[0]), want, rtol=1e-12)


@pytest.mark.parametrize("n,d", [(0, 3), (1, 1), (37, 130), (1000, 8)])
@pytest.mark.parametrize("scale", [1e-18, 1.0, 1e18])
def test_sq_dist_to_point_unit(n, d, scale):
    x, c = _data(n, d, 1, scale=scale)
    if n > 3:
        x[3] = 0.0  # a zero row has no direction: NaN, reported by the caller
    c = (c[0] / max(np.linalg.norm(c[0]), 1e-30)).astype(np.float32)
    got = sq_dist_to_point_unit(x, c)
    np.testing.assert_allclose(got, ref.sq_dist_to_point_unit_ref(x, c), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_sq_dist_to_point_unit_passes_non_finite_rows_through(bad):
    # the cos coreset pass doubles as the NaN/inf check: a bad entry must never come out as a finite distance
    x, c = _data(6, 4, 1)
    c = (c[0] / np.linalg.norm(c[0])).astype(np.float32)
    x[2, 1] = bad
    x[4] = bad
    got = sq_dist_to_point_unit(x, c)
    assert np.isfinite(got).tolist() == [True, True, False, True, False, True]


@pytest.mark.parametrize("k", [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 64, 255, 1024])
def test_top2_is_bit_identical_to_its_float32_formula_with_ties_and_negative_rounding(k):
    # The kernel's int32 min/max passes must give exactly the float32 formula's argmin (first index on
    # ties), its value and the runner-up (the minimum again when it occurs twice), including the clamp of
    # the negative values that cancellation produces for rows sitting on a centre.
    g = np.random.default_rng(k)
    d = 5
    c = np.round(g.standard_normal((k, d)) * 2).astype(np.float32)  # integer grid: many exact ties
    if k > 3:
        c[k - 1] = c[1]
        c[k // 2] = c[1]
    x = np.round(g.standard_normal((300, d)) * 2).astype(np.float32)
    x[::4] = c[g.integers(0, k, 75)] + np.float32(1e-3)  # near a centre: cancellation can go below 0
    x[1::7] = c[min(1, k - 1)]
    xn, cn = sq_norms(x), sq_norms(c)
    gm = x @ c.T
    v = (xn[:, None] + cn[None, :]) - np.float32(2.0) * gm
    v = np.where(v > 0, v, np.float32(0.0)).astype(np.float32)
    want_label = np.argmin(v, axis=1)
    want_d1 = v[np.arange(300), want_label]
    want_d2 = np.sort(v, axis=1)[:, 1] if k > 1 else np.full(300, np.inf, np.float32)
    labels, d1, d2 = np.empty(300, np.int64), np.empty(300, np.float32), np.empty(300, np.float32)
    padded = np.zeros((300, k + 5), np.float32)
    padded[:, :k] = gm
    # the 16-lane path on contiguous and on padded rows (row stride != K), and the scalar one (strided columns)
    for gg in (gm.copy(), padded[:, :k], np.asfortranarray(gm)):
        top2_from_ip(gg, cn, xn, labels, d1, d2)
        np.testing.assert_array_equal(labels, want_label)
        np.testing.assert_array_equal(d1.view(np.int32), want_d1.view(np.int32))  # +0.0, never -0.0
        np.testing.assert_array_equal(d2, want_d2)


@pytest.mark.parametrize("k", [1, 5, 16, 40])
def test_top2_infinite_distances_still_give_the_first_centre(k):
    # every distance +inf (products of -inf): the first centre wins and the runner-up is +inf too
    g = np.full((3, k), -np.inf, np.float32)
    labels, d1, d2 = np.empty(3, np.int64), np.empty(3, np.float32), np.empty(3, np.float32)
    top2_from_ip(g, np.zeros(k, np.float32), np.zeros(3, np.float32), labels, d1, d2)
    assert labels.tolist() == [0, 0, 0] and np.isinf(d1).all() and np.isinf(d2).all()


def test_top2_nan_products_never_give_a_label_outside_range():
    # a NaN distance (any sign) counts as 0, as the float clamp did; a label must always be < K
    g = np.array([[np.nan, np.nan, np.nan], [np.nan, 1.0, -np.nan]], np.float32)
    labels, d1, d2 = np.empty(2, np.int64), np.empty(2, np.float32), np.empty(2, np.float32)
    top2_from_ip(g, np.zeros(3, np.float32), np.zeros(2, np.float32), labels, d1, d2)
    assert labels.tolist() == [0, 0] and d1.tolist() == [0.0, 0.0]
    # the same in the 16-lane path: NaN of either sign in a lane, and a lone NaN after a positive start
    g = np.full((3, 35), -1.0, np.float32)  # distances 2.0 everywhere
    g[0, 20] = np.nan
    g[1, 3] = -np.nan
    g[1, 17] = np.nan
    g[2, 34] = np.nan  # in the scalar tail
    labels, d1, d2 = np.empty(3, np.int64), np.empty(3, np.float32), np.empty(3, np.float32)
    top2_from_ip(g, np.zeros(35, np.float32), np.zeros(3, np.float32), labels, d1, d2)
    assert labels.tolist() == [20, 3, 34] and d1.tolist() == [0.0, 0.0, 0.0] and d2.tolist() == [2.0, 0.0, 2.0]


def _grid_tile(k, rows, seed):
    """Row and centroid norms, the product tile (one NaN), the reference distances (clamped float32
    ‖x‖² + ‖c‖² − 2x·c, NaN counted as 0, as top2_from_ip does) and the tile inside wider rows, on an integer grid
    (ties everywhere; centroid k-1 duplicates centroid 0)."""
    g = np.random.default_rng(seed)
    c = np.round(g.standard_normal((k, 4)) * 2).astype(np.float32)
    x = np.round(g.standard_normal((rows, 4)) * 2).astype(np.float32)
    if k > 3:
        c[k - 1] = c[0]
    xn, cn = sq_norms(x), sq_norms(c)
    gm = x @ c.T
    gm[7, k // 2] = np.nan
    v = (xn[:, None] + cn[None, :]) - np.float32(2.0) * gm
    v = np.where(v > 0, v, np.float32(0.0))
    v = np.where(np.isnan(v), np.float32(0.0), v)
    padded = np.zeros((rows, k + 3), np.float32)
    padded[:, :k] = gm
    return xn, cn, gm, v, padded


@pytest.mark.parametrize("k,m", [(1, 1), (5, 1), (16, 16), (17, 16), (20, 8), (35, 16), (64, 16), (256, 16),
                                 (1024, 16), (300, 32), (48, 5)])
def test_nearest_ids_are_the_m_smallest_distances_with_ties_to_smaller_ids(k, m):
    # reference: a stable argsort of the clamped float32 distances (NaN counted as 0, as top2_from_ip does)
    from kvant.kernels.assign import nearest_ids_from_ip

    xn, cn, gm, v, padded = _grid_tile(k, 120, k * 7 + m)
    want = np.argsort(v, axis=1, kind="stable")[:, :m]
    cn_strided = np.repeat(cn, 2)[::2]  # same values, stride 8: the scalar path
    # the vector path on contiguous and padded rows, and the scalar one (strided columns or norms)
    for gg, cc in ((gm.copy(), cn), (padded[:, :k], cn), (np.asfortranarray(gm), cn), (gm.copy(), cn_strided)):
        out = np.full((120, m), -1, np.int32)
        nearest_ids_from_ip(gg, cc, xn, out)
        np.testing.assert_array_equal(np.sort(out, axis=1), np.sort(want, axis=1))
        labels, d1, d2 = np.empty(120, np.int64), np.empty(120, np.float32), np.empty(120, np.float32)
        top2_from_ip(gg, cc, xn, labels, d1, d2)
        assert all(labels[i] in out[i] for i in range(120))  # the argmin is always a candidate
    with pytest.raises(ValueError):
        nearest_ids_from_ip(gm, cn, xn, np.empty((120, k + 1), np.int32))


def _lane_candidates_reference(v, m):
    """candidate_ids_from_ip in plain NumPy: per class (column j in j mod 16, the last K mod 16 columns in classes
    0.. in order) the two smallest (distance, id); of those, the m smallest."""
    k = v.shape[1]
    kv = k - k % 16
    cls = np.where(np.arange(k) < kv, np.arange(k) % 16, np.arange(k) - kv)
    out = []
    for row in v:
        pool = []
        for c in range(16):
            cols = np.flatnonzero(cls == c)
            pool += sorted(cols, key=lambda j: (row[j], j))[:2]
        out.append(sorted(sorted(pool, key=lambda j: (row[j], j))[:m]))
    return np.array(out)


@pytest.mark.parametrize("k,m", [(16, 16), (16, 1), (17, 16), (20, 8), (35, 16), (64, 16), (256, 16), (1024, 16),
                                 (300, 5), (48, 16), (5, 3), (64, 7), (1024, 3), (100, 13)])
def test_candidate_ids_are_the_smallest_of_each_lanes_two_nearest(k, m):
    from kvant.kernels.assign import candidate_ids_from_ip, nearest_ids_from_ip

    xn, cn, gm, v, padded = _grid_tile(k, 150, k * 11 + m)
    exact = np.sort(np.argsort(v, axis=1, kind="stable")[:, :m], axis=1)
    want = _lane_candidates_reference(v, m) if k >= 16 else exact  # below 16 columns: the exact m nearest
    for gg in (gm.copy(), padded[:, :k]):
        out = np.full((150, m), -1, np.int32)
        candidate_ids_from_ip(gg, cn, xn, out)
        np.testing.assert_array_equal(np.sort(out, axis=1), want)
        labels, d1, d2 = np.empty(150, np.int64), np.empty(150, np.float32), np.empty(150, np.float32)
        top2_from_ip(gg, cn, xn, labels, d1, d2)
        assert all(labels[i] in out[i] for i in range(150))  # the argmin is always a candidate
        if k >= 16:  # the lane path returns them in ascending (distance, id) order: the argmin first
            np.testing.assert_array_equal(out[:, 0], labels)
            rows = np.arange(150)[:, None]
            keys = v[rows, out].astype(np.float64) * 4096 + out  # ids < 4096: (distance, id) order
            assert np.all(np.diff(keys, axis=1) > 0)
    # strided columns take the exact path
    out = np.full((150, m), -1, np.int32)
    candidate_ids_from_ip(np.asfortranarray(gm), cn, xn, out)
    ref = np.full((150, m), -1, np.int32)
    nearest_ids_from_ip(gm, cn, xn, ref)
    np.testing.assert_array_equal(np.sort(out, axis=1), np.sort(ref, axis=1))
    with pytest.raises(ValueError):
        candidate_ids_from_ip(gm, cn, xn, np.empty((150, min(k, 16) + 1), np.int32))


@pytest.mark.parametrize("d,m", [(1, 1), (7, 3), (16, 4), (33, 5), (128, 16)])
def test_assign_to_candidates_picks_the_nearest_candidate(d, m):
    from kvant.kernels.lloyd import assign_to_candidates

    g = np.random.default_rng(d + m)
    k = max(m, 6)
    x = g.standard_normal((200, d)).astype(np.float32)
    c = g.standard_normal((k, d)).astype(np.float32)
    c[k - 1] = c[0]  # a tie between two candidates: the smaller id wins
    cand = np.stack([g.permutation(k)[:m] for _ in range(200)]).astype(np.int32)
    cand[:5, 0], cand[:5, -1] = k - 1, 0
    labels, d1 = np.full(200, -1, np.int64), np.zeros(200, np.float32)
    xn, cn = sq_norms(x), sq_norms(c)
    assign_to_candidates(x, xn, c, cn, cand, labels, d1, 3, 200)
    assert np.all(labels[:3] == -1)  # rows outside lo..hi untouched
    exact = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    for i in range(3, 200):
        cd = exact[i, cand[i]]
        best = cd.min()
        near = cand[i][cd <= best + 1e-4 * (1 + best)]
        assert labels[i] in near  # the nearest candidate up to float32 rounding
        if np.all(cd[np.isin(cand[i], near)] == best):
            assert labels[i] == near.min()  # exact ties: the smaller id
        assert d1[i] == pytest.approx(exact[i, labels[i]], rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("n,d,step", [(0, 3, 1), (1, 1, 1), (5, 2, 3), (1797, 64, 1), (300, 7, 4)])
@pytest.mark.parametrize("layout", ["c32", "f32", "c64"])
def test_mean_and_spread_matches_reference(n, d, step, layout):
    x = np.random.default_rng(n + d).standard_normal((n, d)) * 3 + 1e3  # an offset, as conditioning looks for
    x = {"c32": x.astype(np.float32), "f32": np.asfortranarray(x.astype(np.float32)), "c64": x}[layout]
    mu, spread, sq, dev, sqs = mean_and_spread(x, step)
    rmu, rspread, rsq, rdev, rsqs = ref.mean_and_spread_ref(x, step)
    np.testing.assert_allclose(mu, rmu, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose([spread, sq], [rspread, rsq], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dev, rdev, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sqs, rsqs, rtol=1e-9, atol=1e-9)


def test_balanced_rows_keeps_the_block_count_and_evens_the_sizes():
    from hypothesis import given
    from hypothesis import strategies as st

    from kvant.cluster.assign import balanced_rows

    @given(st.integers(1, 10**7), st.integers(1, 10**5))
    def check(n, rows):
        r = balanced_rows(n, rows)
        assert 1 <= r <= rows
        assert -(-n // r) == -(-n // rows)  # as many blocks
        last = n - (-(-n // r) - 1) * r
        assert r - last < -(-n // r)  # the last block is short by less than one row per block

    check()


def test_gemm_form_overflow_is_never_distance_zero():
    # (review) ‖q‖² + ‖x‖² − 2q·x with float32 norms at inf is inf − inf = NaN, which became 0: a far row reported
    # as a perfect match. It is +inf now (FlatIndex recomputes such pairs exactly).
    from kvant.kernels import distance as D

    q = np.array([[1e20]], np.float32)
    x = np.array([[1e20], [2e20], [-1e20], [0.5e20]], np.float32)
    got = D.sq_l2_block(q, x, D.sq_norms(x))
    assert not np.any(got[0, 1:] == 0)
    assert np.all(np.isinf(got[0, 1:]))


def test_topk_with_k_zero_is_empty():
    # (review) the row merge indexed the k-th slot of an empty row: heap corruption and an abort
    from kvant.kernels import topk as T

    d, i = T.topk_smallest(np.arange(6, dtype=np.float32).reshape(2, 3), 0)
    assert d.shape == (2, 0) and i.shape == (2, 0)
    out_d, out_i = np.empty((2, 0), np.float32), np.empty((2, 0), np.int64)
    T.merge_topk_ids(np.ones((2, 3), np.float32), np.zeros((2, 3), np.int64), out_d, out_i)


@pytest.mark.parametrize("k,d", [(1, 1), (3, 5), (17, 130), (64, 16)])
@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e6])
def test_m_step_matches_reference(k, d, spherical, scale):
    # empty clusters (keep the old row), a zero-sum cluster (spherical: keeps its old row, normalised), weights of 1e-3
    g = np.random.default_rng(k * d)
    sums = g.standard_normal((k, d)) * scale
    counts = g.uniform(1e-3, 50.0, size=k)
    counts[::3] = 0.0
    if k > 1:
        sums[1] = 0.0
    old = g.standard_normal((k, d)).astype(np.float32)
    x_total = float((sums**2).sum()) * 7.0
    means = np.full((k, d), np.nan, np.float32)
    obj = m_step(sums, counts, old, spherical, x_total, means)
    want, want_obj = ref.m_step_ref(sums, counts, old, spherical, x_total)
    np.testing.assert_allclose(means, want, rtol=2e-7, atol=0)
    if not spherical:  # an empty cluster keeps its old centre exactly
        np.testing.assert_array_equal(means[counts == 0], old[counts == 0])
    elif k > 1 and counts[1] > 0:  # rows that cancel: the old centre's direction, not a zero centre
        np.testing.assert_allclose(means[1], old[1] / np.linalg.norm(old[1].astype(np.float64)), rtol=1e-6)
    assert obj == pytest.approx(want_obj, rel=1e-12, abs=1e-12 * max(1.0, abs(x_total)))


@pytest.mark.parametrize("k,d", [(1, 1), (2, 3), (5, 130), (64, 16)])
def test_centre_moves_matches_reference_and_counts_ties(k, d):
    g = np.random.default_rng(k + d)
    old = g.standard_normal((k, d)).astype(np.float32)
    new = (old + g.standard_normal((k, d)).astype(np.float32) * np.float32(1e-3)).astype(np.float32)
    delta = np.empty(k, np.float32)
    best, arg, second = centre_moves(new, old, delta)
    want, want_best, _, want_second = ref.centre_moves_ref(new, old)
    np.testing.assert_allclose(delta, want, rtol=1e-6)
    assert best == want_best and second == want_second and delta[arg] == best
    if k > 1:  # two equal largest moves: the second largest is that move too
        j = (arg + 1) % k
        old[j], new[j] = old[arg], new[arg]
        best, arg, second = centre_moves(new, old, delta)
        assert second == best
    still = old.copy()
    best, arg, second = centre_moves(still, old, delta)
    assert best == 0.0 and second == 0.0 and not delta.any()
    new[0, 0] = np.nan  # a non-finite centre moved without bound, so Hamerly's bounds cannot survive it
    best, arg, second = centre_moves(new, old, delta)
    assert best == np.inf and arg == 0 and delta[0] == np.inf


def test_reseed_empty_takes_rows_whose_float32_distance_rounded_to_zero():
    # Rows 1e-4 apart at norms ~1e3: float32 E-step distances read 0, yet the rows are distinct and may seed.
    x = (1000.0 + np.array([[0, 0], [1e-4, 0], [0, 1e-4], [1e-4, 1e-4]], np.float64)).astype(np.float32)
    assert np.unique(x, axis=0).shape[0] == 4
    labels = np.zeros(4, np.int64)
    sums, counts = cluster_sums(x, labels, 4, 1, UNIT_WEIGHTS)
    rows_in = np.bincount(labels, minlength=4)
    dist = np.zeros(4, np.float32)
    taken = reseed_empty(x, labels, dist, np.empty(0, np.float32), sums, counts, UNIT_WEIGHTS, rows_in)
    assert taken == 3 and np.all(rows_in == 1) and sorted(labels.tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", range(6))
def test_reseed_empty_matches_reference(seed):
    # Integer distances (many ties), duplicated rows, singleton clusters and more empty clusters than usable rows.
    g = np.random.default_rng(seed)
    n, k, d = 40, 12, 3
    x = g.integers(0, 3, (n, d)).astype(np.float32)
    labels = g.integers(0, 6, n).astype(np.int64)  # clusters 6..11 empty, some of 0..5 maybe too
    dist = g.integers(0, 4, n).astype(np.float32)
    w = g.uniform(0.5, 2.0, n) if seed % 2 else UNIT_WEIGHTS
    sums, counts = cluster_sums(x, labels, k, 1, w)
    rows_in = np.bincount(labels, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts[:, None] > 0, sums / counts[:, None], 0.0)
    want_labels, want_taken = ref.reseed_empty_ref(x, labels, dist, rows_in, means)
    lower = np.ones(n, np.float32)
    out, d_out = labels.copy(), dist.copy()
    taken = reseed_empty(x, out, d_out, lower, sums, counts, w, rows_in)
    assert taken == want_taken
    np.testing.assert_array_equal(out, want_labels)
    np.testing.assert_array_equal(rows_in, np.bincount(want_labels, minlength=k))
    moved = out != labels
    assert np.all(d_out[moved] == 0) and np.all(lower[moved] == 0) and np.all(lower[~moved] == 1)
    rs, rc = ref.cluster_sums_ref(x, out, k, None if w.shape[0] == 0 else w)
    np.testing.assert_allclose(sums, rs, atol=1e-9)
    np.testing.assert_allclose(counts, rc, atol=1e-9)


@pytest.mark.parametrize("unit_rows", [False, True])
@pytest.mark.parametrize("k,d", [(1, 3), (5, 2), (40, 7), (300, 33)])
def test_exact_labels_are_the_float64_nearest_centres(unit_rows, k, d):
    # Small-integer grids put many rows at (near-)equal distances from two centres, where float32's expanded
    # distances pick either; exact_labels must return the float64 nearest (ties to the smaller id) on the direct
    # kernel's fused path, the GEMM path, gathered rows and conditioned (offset) rows alike.
    g = np.random.default_rng(k + d)
    x = (g.integers(0, 5, (4000, d)) * 0.1 + 0.3).astype(np.float32)
    c = (g.integers(0, 5, (k, d)) * 0.1 + 0.3 + g.integers(0, 2, (k, d)) * 0.05).astype(np.float32)
    c[-1] = c[0]  # an exact duplicate centre: its rows tie, the smaller id must win
    xs = x.astype(np.float64)
    if unit_rows:
        xs /= np.linalg.norm(xs, axis=1, keepdims=True)
    dist = ((xs[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    want = dist.argmin(1)
    for kwargs in ({}, {"rows": np.arange(0, 4000, 3)}, {"offset": 1e4}):
        if unit_rows and kwargs:
            continue
        xx, cc, rows, w = x, c, kwargs.get("rows"), want
        shift = scale = None
        if "offset" in kwargs:  # a large common offset: assign_top2 conditions rows and centres first
            from kvant._numerics import conditioning

            xx, cc = x + np.float32(1e4), c + np.float32(1e4)
            shift, scale = conditioning(cc)
            assert shift is not None
            xd, cd = xx.astype(np.float64), cc.astype(np.float64)
            w = ((xd[:, None, :] - cd[None]) ** 2).sum(-1).argmin(1)
        m = len(xx) if rows is None else len(rows)
        labels = np.empty(m, np.int64)
        exact = np.empty(m, np.float64)
        assign_top2(xx, cc, sq_norms_serial(cc), labels, np.empty(m, np.float32), np.empty(m, np.float32),
                    n_threads=2, exact_sq=exact, rows=rows, unit_rows=unit_rows, shift=shift, scale=scale)
        np.testing.assert_array_equal(labels, w if rows is None else w[rows])
        if "offset" not in kwargs:
            got = dist[np.arange(len(x)), want]
            # (unit rows are scaled by 1/‖x‖ from the float32 norm, ~1e-7 from the float64 normalisation here)
            np.testing.assert_allclose(exact, got if rows is None else got[rows], rtol=1e-6 if unit_rows else 1e-12,
                                       atol=1e-15)


def test_certify_top2_keeps_clear_labels_and_recomputes_near_ties():
    from kvant.kernels.assign import certify_top2, label_margins

    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 0.0]], np.float32)
    c = np.array([[0.0, 0.0], [1.0, 0.0]], np.float32)
    labels = np.array([1, 1, 1])  # row 0 wrong but "clear" by its given distances: kept; row 2 a tie: recomputed
    d1 = np.array([0.0, 0.0, 0.25], np.float32)
    d2 = np.array([1.0, 1.0, 0.25], np.float32)
    exact = np.full(3, -1.0)
    failed = certify_top2(x, c, labels, d1, d2, exact, False, (c * c).sum(1), *label_margins(2))
    assert failed == 1
    np.testing.assert_array_equal(labels, [1, 1, 0])
    np.testing.assert_array_equal(exact, [-1.0, -1.0, 0.25])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.integers(2, 70), st.integers(0, 2**31 - 1),
       st.sampled_from([0.0, 1e4]), st.booleans())
def test_exact_labels_hold_on_random_near_ties(n, d, k, seed, offset, gathered):
    # Integer centres up to ±512 (squared norms ~1e7: float32's expanded distances are off by whole units) and rows
    # near the midpoints of random centre pairs (a 1/16 grid: every float64 distance is exact, so ties are real ties
    # and nearness is unambiguous), plus duplicate centres; with offset 1e4 the rows are conditioned first. The
    # labels must be the float64 argmin, ties to the smaller id, on the direct or BLAS path, gathered or not.
    from kvant._numerics import conditioning

    g = np.random.default_rng(seed)
    c = g.integers(-512, 513, (k, d)).astype(np.float64)
    c[g.integers(0, k)] = c[0]  # a duplicate centre (or c[0] itself)
    pair = g.integers(0, k, (n, 2))
    x = (c[pair[:, 0]] + c[pair[:, 1]]) / 2 + g.integers(-1, 2, (n, d)) / 16
    x, c = (x + offset).astype(np.float32), (c + offset).astype(np.float32)
    shift, scale = conditioning(c)
    rows = np.sort(g.choice(n, size=max(1, n // 2), replace=False)) if gathered else None
    m = n if rows is None else rows.size
    labels = np.empty(m, np.int64)
    exact = np.empty(m, np.float64)
    assign_top2(x, c, sq_norms_serial(c), labels, np.empty(m, np.float32), np.empty(m, np.float32), n_threads=2,
                exact_sq=exact, rows=rows, shift=shift, scale=scale)
    xs = x.astype(np.float64) if rows is None else x[rows].astype(np.float64)
    dist = ((xs[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, dist.argmin(1))
    np.testing.assert_array_equal(exact, dist.min(1))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                 st.floats(min_value=2.0**-45, max_value=2.0**45).map(lambda v: float(np.float32(v)))))
def test_scalar_pow2_scale_is_the_array_rule(typical):
    from kvant._numerics import _pow2_scale, _pow2_scales

    with np.errstate(invalid="ignore"):
        want = float(_pow2_scales(np.float64(typical)))
    got = _pow2_scale(typical)
    assert (got is None and want == 1.0) or got == want
    for edge in (2.0**40, 2.0**-40, 2.0**41, 2.0**-41, 2.0**42.5, 0.0, 5e-324, 1e308):  # the bounds and extremes
        assert _pow2_scale(edge) == (None if float(_pow2_scales(np.float64(edge))) == 1.0
                                     else float(_pow2_scales(np.float64(edge))))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                          st.sampled_from([2.0**20, 2.0**-20, 2.0**20.5, 2.0**-20.5, 0.0, 1.0])),
                min_size=0, max_size=12), st.integers(1, 3))
def test_row_magnitude_scales_fast_path_is_the_array_rule(values, dim):
    # the in-range shortcut (min and max of the squared norms) returns what _pow2_scales gives, NaN and inf included
    from kvant._numerics import _pow2_scales, row_magnitude_scales

    rows = np.resize(np.array(values, np.float64), (len(values) // dim, dim)) if len(values) >= dim else \
        np.zeros((0, dim))
    with np.errstate(over="ignore", invalid="ignore"):
        want = _pow2_scales(np.einsum("ij,ij->i", rows, rows))
        got = row_magnitude_scales(rows)
    if np.all(want == 1.0):
        assert got is None
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ip", [False, True])
def test_exact_topk_with_k_zero_writes_nothing(ip):
    # (review) bd[k - 1] read, and the insertion wrote, before a zero-length row: heap corruption, an abort
    q = np.zeros((3, 2), np.float32)
    x = np.full((4, 2), -1, np.float32)
    for _ in range(50):
        out_d, out_i = np.empty((3, 0)), np.empty((3, 0), np.int64)
        exact_topk(q, x, out_d, out_i, ip)
        assert out_d.shape == (3, 0) and out_i.shape == (3, 0)


def test_assign_top2_without_distance_buffers_gives_the_same_labels_and_exact_distances():
    # The final assignment passes d1 = d2 = None (per-block scratch instead of fresh pages for every row).
    from kvant.cluster.assign import assign_top2
    from kvant.kernels.distance import sq_norms_serial

    rng = np.random.default_rng(11)
    x = rng.standard_normal((5000, 24)).astype(np.float32)
    c = rng.standard_normal((7, 24)).astype(np.float32)
    cn = sq_norms_serial(c)
    want_labels, want_exact = np.empty(5000, np.int64), np.empty(5000)
    assign_top2(x, c, cn, want_labels, np.empty(5000, np.float32), np.empty(5000, np.float32), exact_sq=want_exact)
    labels, exact = np.empty(5000, np.int64), np.empty(5000)
    assign_top2(x, c, cn, labels, None, None, exact_sq=exact)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(exact, want_exact)
    with pytest.raises(ValueError, match="d1/d2 may be None only"):
        assign_top2(x, c, cn, labels, None, None, x_sqnorms=sq_norms_serial(x))


@pytest.mark.parametrize("n,d,k", [(5000, 2, 5), (3001, 16, 32), (2000, 7, 24), (100, 16, 1), (2500, 2, 300),
                                   (1500, 9, 100)])
def test_final_assignment_with_rows_in_the_lanes_is_the_direct_kernels(monkeypatch, n, d, k):
    # ROW_LANES_FINAL routes few-coordinate l2 final assignments to row_lanes.tile_top2_exact: the same exact labels
    # and inertia as the direct kernel (K <= 64) or BLAS tiles (larger K); a NaN row is still named (the deferred
    # check)
    import kvant
    from kvant.cluster import assign as assign_module
    from kvant.cluster.clusterer import _assign_all

    rng = np.random.default_rng(n + d + k)
    x = (rng.standard_normal((n, d)) + rng.integers(0, 3, (n, 1))).astype(np.float32)
    c = x[rng.choice(n, k, replace=False)].copy()
    src = kvant.io.as_source(x)
    got = {}
    for on in (True, False):
        monkeypatch.setattr(assign_module, "ROW_LANES_FINAL", on)
        got[on] = _assign_all(src, x, c, False, with_inertia=True)
    np.testing.assert_array_equal(got[True][0], got[False][0])
    assert got[True][1] == got[False][1]
    monkeypatch.setattr(assign_module, "ROW_LANES_FINAL", True)
    x[n // 2, d - 1] = np.nan
    with pytest.raises(InvalidInput, match=rf"first bad row: {n // 2}\)"):
        _assign_all(kvant.io.as_source(x, validate=False), x, c, False, with_inertia=True, check=True)


def test_final_assignment_with_rows_in_the_lanes_still_writes_candidate_ids_and_checks_its_buffers():
    # (a review of the rows-in-lanes routing: nearest= with exact_sq= skipped the candidate ids)
    from kvant.kernels.distance import sq_norms_serial

    rng = np.random.default_rng(12)
    x = rng.standard_normal((100, 4)).astype(np.float32)
    c = rng.standard_normal((8, 4)).astype(np.float32)
    labels, near = np.empty(100, np.int64), np.full((100, 3), -7, np.int32)
    assign_top2(x, c, sq_norms_serial(c), labels, np.empty(100, np.float32), np.empty(100, np.float32),
                exact_sq=np.empty(100), nearest=near)
    assert (near >= 0).all() and (near == labels[:, None]).any(axis=1).all()
    with pytest.raises(ValueError, match="both d1 and d2, or neither"):
        assign_top2(x, c, sq_norms_serial(c), labels, np.empty(100, np.float32), None, exact_sq=np.empty(100))


@pytest.mark.parametrize("n,d,k", [(5000, 2, 300), (3000, 8, 260), (2000, 16, 300)])
def test_e_steps_with_rows_in_the_lanes_match_the_reference(monkeypatch, n, d, k):
    # ROW_LANES_E_STEP: plain and gathered (rows=) E-steps of few-coordinate rows beyond the direct kernel's K take
    # row_lanes.tile_top2_given instead of BLAS tiles or int16 products: nearest centres up to float32 rounding
    from kvant.cluster import assign as assign_module
    from kvant.kernels import direct_assign, row_lanes
    from kvant.kernels.distance import sq_norms_serial

    if not assign_module.lanes_e_step(d):
        pytest.skip("rows in the lanes need AVX-512")
    # (where the BLAS lacks AVX-512 the direct kernel takes these K too: kept to its usual reach here)
    monkeypatch.setattr(direct_assign, "MAX_K", min(direct_assign.MAX_K, 128))
    calls = []
    real = row_lanes.tile_top2_given
    monkeypatch.setattr(row_lanes, "tile_top2_given", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(n + d)
    x = (rng.standard_normal((n, d)) + rng.integers(0, 5, (n, 1))).astype(np.float32)
    c = x[rng.choice(n, k, replace=False)].copy()
    xn, cn = sq_norms_serial(x), sq_norms_serial(c)
    exact = ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    for rows in (None, np.sort(rng.choice(n, n // 3, replace=False))):
        m = n if rows is None else rows.size
        labels, d1, d2 = np.empty(m, np.int64), np.empty(m, np.float32), np.empty(m, np.float32)
        e = exact if rows is None else exact[rows]
        assert assign_module.e_step(x, c, labels, d1, d2, xn if rows is None else xn[rows], rows=rows)
        best = e.min(1)
        slack = 1e-5 * (xn if rows is None else xn[rows]).astype(np.float64) + 1e-5 * cn.max()
        assert (e[np.arange(m), labels] <= best + slack).all()  # the label is nearest up to float32 rounding
        np.testing.assert_allclose(d1, best, rtol=1e-4, atol=1e-3 * float(slack.max()) + 1e-4)
        second = np.sort(e, 1)[:, 1]
        assert (d2 >= d1).all() and np.allclose(d2, second, rtol=1e-4, atol=1e-3)
    assert calls  # the lanes kernel ran
