"""The fused brute-force shortlist (kernels.direct_topk) against a plain NumPy reference: the per-chunk lists of the
``keep`` smallest ‖q‖² + ‖x‖² − 2 q·x, clamped as finish_sq_l2 does, ascending, ties to the smaller row. Integer
data keeps every product exact in float32 whatever the summation order, so the lists must match exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvant.kernels import direct_topk as DT
from kvant.kernels.distance import sq_norms
from kvant.kernels.topk import merge_topk_ids

pytestmark = pytest.mark.skipif(not DT.AVAILABLE, reason="needs AVX2+FMA or AVX-512")


def _reference(x, q, keep, lo, hi, ip=False):
    """Rows lo..hi-1: the keep best (score, row) per query, in float32 as the kernel computes them, padded inf / -1:
    l2 clamped as finish_sq_l2 does, or -q.x with NaN never kept."""
    qn, xn = sq_norms(q), sq_norms(x)
    with np.errstate(over="ignore"):  # (products beyond float32 become inf, as in the kernel)
        g = (q.astype(np.float64) @ x[lo:hi].astype(np.float64).T).astype(np.float32)  # exact for integer data
    with np.errstate(over="ignore", invalid="ignore"):
        v = (qn[:, None] + xn[None, lo:hi]) - np.float32(2.0) * g
    d = np.where(v > 0, v, np.where(np.isnan(v), np.float32(np.inf), np.float32(0.0))).astype(np.float32)
    if ip:
        d = np.where(np.isnan(g), np.float32(np.nan), -g)
    out_d = np.full((q.shape[0], keep), np.inf, np.float32)
    out_i = np.full((q.shape[0], keep), -1, np.int64)
    rows = np.arange(lo, hi)
    for j in range(q.shape[0]):
        order = np.lexsort((rows, d[j]))
        order = order[~np.isnan(d[j, order])][:keep]
        out_d[j, : order.size], out_i[j, : order.size] = d[j, order], rows[order]
    return out_d, out_i


def _operands(q, blocks):
    """The queries split into ``blocks`` blocks of equal padded width, as FlatIndex._direct_topk lays them out."""
    qn = sq_norms(q)
    per_block = -(-q.shape[0] // blocks)
    width = 16 * -(-per_block // 16)
    cts = np.zeros((blocks, q.shape[1], width), np.float32)
    qns = np.zeros((blocks, width), np.float32)
    nqs = np.zeros(blocks, np.int64)
    for b in range(blocks):
        part = q[b * width : (b + 1) * width]
        nqs[b] = part.shape[0]
        cts[b, :, : part.shape[0]] = part.T
        qns[b, : part.shape[0]] = qn[b * width : (b + 1) * width]
    return cts, qns, nqs, width


def _run(x, q, keep, chunks, ip=False, blocks=1):
    """direct_keep's lists per chunk, (chunks, queries, keep), the blocks' lists put back in query order."""
    cts, qns, nqs, width = _operands(q, blocks)
    cd = np.full((chunks, blocks, width, keep), -7.0, np.float32)  # every slot must be written
    ci = np.full((chunks, blocks, width, keep), -7, np.int64)
    DT.direct_keep(x, cts, qns, nqs, sq_norms(x), ip, cd, ci, np.empty(0, np.float32), np.empty(0, np.float32),
                   np.zeros((blocks, chunks)))
    return (np.concatenate([cd[:, b, : nqs[b]] for b in range(blocks)], axis=1),
            np.concatenate([ci[:, b, : nqs[b]] for b in range(blocks)], axis=1))


@pytest.mark.parametrize("n,d,nq,keep,chunks,blocks", [
    (1, 1, 1, 1, 1, 1), (5, 3, 4, 8, 1, 1), (37, 13, 17, 5, 3, 1), (64, 8, 16, 3, 4, 1), (200, 40, 33, 12, 5, 1),
    (300, 7, 48, 300, 2, 1), (513, 20, 80, 28, 8, 1), (513, 3, 80, 100, 1, 3), (700, 5, 37, 64, 2, 2),
    (2000, 2, 33, 150, 1, 2)])
@pytest.mark.parametrize("ip", [False, True])
def test_lists_match_the_numpy_reference(n, d, nq, keep, chunks, blocks, ip):
    # blocks of queries and chunks of rows; long lists over many rows make the reservoirs fill and cut many times
    rng = np.random.default_rng(n + d + nq)
    x = rng.integers(-6, 7, (n, d)).astype(np.float32)  # a small grid: many exact ties
    x[n // 2 :: 7] = x[0]  # duplicates of row 0
    q = np.vstack([rng.integers(-6, 7, (nq - 1, d)), x[:1]]).astype(np.float32)
    cd, ci = _run(x, q, keep, chunks, ip, blocks)
    for c in range(chunks):
        lo, hi = c * n // chunks, (c + 1) * n // chunks
        rd, ri = _reference(x, q, keep, lo, hi, ip)
        assert np.array_equal(cd[c], rd) and np.array_equal(ci[c], ri)
    # the chunks' lists merge into the whole set's
    od = np.full((nq, keep), np.inf, np.float32)
    oi = np.full((nq, keep), -1, np.int64)
    for c in range(chunks):
        merge_topk_ids(cd[c], ci[c], od, oi)
    rd, ri = _reference(x, q, keep, 0, n, ip)
    assert np.array_equal(od, rd) and np.array_equal(oi, ri)


@pytest.mark.parametrize("shift,scale", [(True, None), (False, 2.0**-120), (True, 2.0**130), (True, 0.5)])
def test_conditioned_rows_match_conditioning_first(shift, scale):
    # conditioning inside the kernel ((x - shift) * scale per row group, norms as sq_norms computes them) must give
    # exactly the lists of the unconditioned kernel run on kvant._numerics.condition(x), and each chunk's largest
    # conditioned norm; scales beyond float32's range go in several exact steps
    from kvant._numerics import condition, scale_steps

    rng = np.random.default_rng(5)
    tiny = scale is not None and scale > 1.0  # (such scales are chosen for data near float32's bottom)
    x = ((rng.integers(-5, 6, (203, 9)) + 1000.0) * (2.0**-120 if tiny else 1.0)).astype(np.float32)
    x[50:60] = x[:10]  # duplicates
    sh = x.mean(0).astype(np.float32) if shift else None
    xc = condition(x, sh, scale)
    q = condition(x[rng.integers(0, 203, 21)] * np.float32(1.5), sh, scale)
    cts, qns, nqs, width = _operands(q, 2)
    want_d = np.empty((3, 2, width, 7), np.float32)
    want_i = np.empty((3, 2, width, 7), np.int64)
    DT.direct_keep(xc, cts, qns, nqs, sq_norms(xc), False, want_d, want_i, np.empty(0, np.float32),
                   np.empty(0, np.float32), np.zeros((2, 3)))
    got_d = np.empty_like(want_d)
    got_i = np.empty_like(want_i)
    x_max = np.zeros((2, 3))
    DT.direct_keep(x, cts, qns, nqs, np.full(203, np.nan, np.float32), False, got_d, got_i,
                   np.empty(0, np.float32) if sh is None else sh, np.array(scale_steps(scale), np.float32), x_max)
    for b in range(2):
        real = slice(0, nqs[b])
        assert np.array_equal(got_d[:, b, real], want_d[:, b, real]) and np.array_equal(got_i[:, b, real],
                                                                                      want_i[:, b, real])
    norms = sq_norms(xc)
    assert np.array_equal(x_max, [[norms[c * 203 // 3 : (c + 1) * 203 // 3].max() for c in range(3)]] * 2)


def test_overflowing_rows_rank_last_never_at_zero():
    # ‖x‖² overflows float32: inf − inf is NaN, which must become +inf (a far row), not 0 (a perfect match)
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 4, (40, 6)).astype(np.float32)
    x[5] = 3e38  # with the all-ones query below, q·x overflows to +inf too: inf − inf
    x[9] = -3e38
    q = rng.integers(-3, 4, (6, 6)).astype(np.float32)
    q[0] = 1.0
    cd, ci = _run(x, q, 40, 1)
    rd, ri = _reference(x, q, 40, 0, 40)
    assert np.array_equal(cd[0], rd) and np.array_equal(ci[0], ri)
    assert np.all(cd[0, :, -2:] == np.inf) and set(ci[0, 0, -2:]) == {5, 9}


def test_ip_overflowing_products_keep_their_sign():
    # positive queries: row 5's products sum to +inf (score -inf: first), row 9's to -inf (score +inf: last). Row 13
    # (3e38, -3e38, 0, ...) with 2 in the queries' first two coordinates: the first fused multiply-add overflows to
    # +inf and the second adds the exact -6e38 to it, still +inf (never inf - inf: the product is not rounded
    # first), so it ties with row 5 at -inf and follows it by row
    rng = np.random.default_rng(2)
    x = rng.integers(-3, 4, (40, 6)).astype(np.float32)
    x[5], x[9] = 3e38, -3e38
    x[13] = [3e38, -3e38, 0, 0, 0, 0]
    q = rng.integers(1, 4, (5, 6)).astype(np.float32)
    q[:, :2] = 2.0
    cd, ci = _run(x, q, 40, 2, ip=True)
    od = np.full((5, 40), np.inf, np.float32)
    oi = np.full((5, 40), -1, np.int64)
    for c in range(2):
        merge_topk_ids(cd[c], ci[c], od, oi)
    rows = np.setdiff1d(np.arange(40), [5, 9, 13])
    score = -(q.astype(np.float64) @ x[rows].astype(np.float64).T)  # exact for the integer rows
    for j in range(5):
        order = rows[np.lexsort((rows, score[j]))]
        assert oi[j].tolist() == [5, 13, *order.tolist(), 9]
        assert od[j, 0] == od[j, 1] == -np.inf and od[j, -1] == np.inf
        assert np.array_equal(od[j, 2:-1], np.sort(score[j]).astype(np.float32))


@pytest.mark.parametrize("dim", [1, 128, 784, 4096, 10**6])
def test_query_blocks_fit_the_cache_budget(dim):
    m = DT.max_queries(dim)
    assert m % 16 == 0 and 16 <= m <= 256
    assert m == 16 or dim * m * 4 <= DT.MAX_CT_BYTES


@pytest.mark.parametrize("n,d,nq,keep,block", [(1, 1, 1, 1, 1), (37, 13, 17, 5, 8), (300, 7, 48, 300, 64),
                                               (513, 20, 80, 28, 100)])
@pytest.mark.parametrize("ip", [False, True])
def test_screen_of_given_products_matches_the_numpy_reference(n, d, nq, keep, block, ip):
    # keep_from_products: the same lists from products computed elsewhere (FlatIndex's BLAS blocks), fed block by
    # block with the thresholds carried between blocks; NaN and inf products (float32 overflow) included
    rng = np.random.default_rng(n + nq)
    x = rng.integers(-6, 7, (n, d)).astype(np.float32)
    x[n // 2 :: 7] = x[0]
    if n > 10:
        x[3, 0] = np.float32(3e38)  # products overflow: inf, and inf - inf = NaN in the l2 expression
    q = np.vstack([rng.integers(-6, 7, (nq - 1, d)), x[:1]]).astype(np.float32)
    qn, xn = sq_norms(q), sq_norms(x)
    buf_d = np.full((nq, DT.capacity(keep)), np.nan, np.float32)
    buf_i = np.full((nq, DT.capacity(keep)), -7, np.int64)
    fill = np.zeros(nq, np.int64)
    thr = np.full(nq, np.inf, np.float32)
    hits = np.empty(nq + 16, np.int32)
    qt = np.ascontiguousarray(q.T)
    for s in range(0, n, block):
        with np.errstate(over="ignore", invalid="ignore"):
            g = (x[s : s + block].astype(np.float64) @ qt.astype(np.float64)).astype(np.float32)
        DT.keep_from_products(g, s, xn[s : s + block], qn, ip, buf_d, buf_i, fill, thr, keep, hits)
    od = np.full((nq, keep), -7.0, np.float32)
    oi = np.full((nq, keep), -7, np.int64)
    DT.finish_lists(buf_d, buf_i, fill, od, oi)
    rd, ri = _reference(x, q, keep, 0, n, ip)
    assert np.array_equal(od, rd) and np.array_equal(oi, ri)
    assert np.all(thr >= od[:, -1])  # a threshold never cut a row the list keeps


@pytest.mark.skipif(not DT.AVX512, reason="the 16-lane screen needs AVX-512")
@pytest.mark.parametrize("nq", [1, 15, 16, 17, 50])
@pytest.mark.parametrize("ip", [False, True])
def test_lane_screen_lists_what_the_loop_lists(nq, ip):
    # the AVX-512 screen (compress into a register, one store) against the portable loop, on thresholds of every
    # kind: infinite (lists not yet full), ties with the score (no entry), NaN products (float32 overflow: entry)
    rng = np.random.default_rng(nq)
    g = rng.integers(-4, 5, (3, nq + 5)).astype(np.float32)
    g[1, ::3] = np.nan
    g[2, ::4] = np.inf
    qn = rng.integers(0, 9, nq + 5).astype(np.float32)
    thr = rng.integers(-4, 30, nq).astype(np.float32)
    thr[::5] = np.inf
    for r in range(3):
        xi = np.float32(rng.integers(0, 9))
        if r == 0:  # ties: every other threshold equals its score
            score = -g[0, :nq] if ip else qn[:nq] + xi - 2 * g[0, :nq]
            thr[1::2] = score[1::2]
        want = np.full(nq + 16, -1, np.int32)
        got = np.full(nq + 16, -1, np.int32)
        n_want = DT._screen_hits_loop(g, r, xi, qn, thr, nq, ip, want)
        n_got = DT._screen_hits_avx512(g, r, xi, qn, thr, nq, ip, got)
        assert n_got == n_want and np.array_equal(got[:n_got], want[:n_want])
        assert np.all(np.diff(want[:n_want]) > 0)


def test_lists_sort_alike_with_rows_beyond_32_bits_and_negative_zero():
    # finish_lists sorts packed (score, row) keys; rows of 2^32 and above take the heap sort instead, and -0.0 ties
    # with +0.0 (ranked by row) on both
    rng = np.random.default_rng(4)
    base = rng.integers(-3, 4, (5, 40)).astype(np.float32)
    base[:, ::6] = np.float32(-0.0)
    base[:, 1::6] = np.float32(0.0)
    base[:, 2] = np.inf
    for offset in (0, 1 << 32):
        rows = np.stack([rng.permutation(40) for _ in range(5)]).astype(np.int64) + offset
        fill = np.array([40, 25, 12, 1, 0])
        od = np.empty((5, 12), np.float32)
        oi = np.empty((5, 12), np.int64)
        DT.finish_lists(base.copy(), rows.copy(), fill, od, oi)
        for j in range(5):
            f = fill[j]
            order = np.lexsort((rows[j, :f], base[j, :f] + np.float32(0.0)))[:12]
            m = order.size
            assert np.array_equal(oi[j, :m], rows[j, order]) and np.array_equal(od[j, :m], base[j, order])
            assert np.all(oi[j, m:] == -1) and np.all(od[j, m:] == np.inf)


@pytest.mark.parametrize("keep,cap", [(1, 2), (5, 10), (7, 50)])
def test_selection_puts_the_kth_in_place(keep, cap):
    rng = np.random.default_rng(keep)
    for trial in range(20):
        d = rng.integers(0, 4, cap).astype(np.float32)  # many equal scores: ranked by row
        if trial % 3 == 0:
            d = np.sort(d)[:: (1 if trial % 2 else -1)].copy()  # sorted and reversed input
        i = rng.permutation(1000)[:cap].astype(np.int64)
        order = np.lexsort((i, d))
        bd, bi = d.copy(), i.copy()
        DT._select(bd, bi, cap, keep - 1)
        assert bi[keep - 1] == i[order[keep - 1]] and set(bi[:keep]) == set(i[order[:keep]])


@pytest.mark.parametrize("keep,rows", [(1, 1), (1, 10**9), (10, 5), (10, 15), (10, 100), (1000, 1500)])
def test_reservoir_capacity_bounded_by_the_rows(keep, rows):
    # room to append after a cut (keep + 1), never more than CAPACITY·keep, nor more than the rows when those allow
    c = DT.capacity(keep, rows)
    assert c >= keep + 1 and c <= max(keep + 1, DT.CAPACITY * keep)
    assert c <= max(keep + 1, rows)


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 257, 5000])
def test_radix_sort_u64_sorts_like_numpy(n):
    # best_packed's sort of packed (score bits, row) keys: every byte pattern, shared bytes (skipped passes), duplicates
    from kvant.kernels.topk import radix_sort_u64

    g = np.random.default_rng(n)
    cases = [
        g.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True),  # every byte varies, top bit included
        (g.integers(0x3F000000, 0x3F800000, n).astype(np.uint64) << np.uint64(32))
        | g.permutation(max(n, 1))[:n].astype(np.uint64),
        g.integers(0, 3, n).astype(np.uint64) << np.uint64(56),  # duplicates that differ only in the top byte
        np.full(n, 7, np.uint64),
        np.arange(n, dtype=np.uint64)[::-1].copy(),
    ]
    for x in cases:
        y = x.copy()
        radix_sort_u64(y)
        np.testing.assert_array_equal(y, np.sort(x))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), spread=st.sampled_from(["full", "narrow", "few", "floats"]), seed=st.integers(0, 2**16),
       where=st.floats(0, 1))
def test_select_u64_is_the_sorted_keys_rank(n, spread, seed, where):
    # the radix selection against np.sort: full-width keys, keys sharing their high digits (packed scores of one
    # magnitude), heavy duplicates, and the bits of non-negative float64s (the FastScan clip's sample sums)
    from kvant.kernels.topk import select_u64

    g = np.random.default_rng(seed)
    if spread == "full":
        a = g.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + g.integers(0, 2, n, dtype=np.uint64)
    elif spread == "narrow":
        a = np.uint64(0xABCDE) << np.uint64(40) | g.integers(0, 2**20, n, dtype=np.uint64)
    elif spread == "few":
        a = g.integers(0, 4, n, dtype=np.uint64) << np.uint64(33)
    else:
        a = (g.random(n) * 10.0 ** g.integers(-3, 4)).view(np.uint64)
    r = min(n - 1, int(where * n))
    before = a.copy()
    assert select_u64(a, r) == np.sort(a)[r]
    np.testing.assert_array_equal(a, before)
