import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvant
from kvant.bench import reference as ref
from kvant.errors import DimensionMismatch, EmptyIndex, InvalidInput, PersistError
from kvant.index import flat


@pytest.fixture(autouse=True, params=["fused", "blas", "blas-screen", "amx"])
def shortlist_path(request, monkeypatch):
    """Every test here runs on the four shortlist paths: the fused kernel (kernels.direct_topk, here from one
    query up), BLAS distance tiles, BLAS products screened in cache (here in blocks of 64 rows × 7 queries, so
    that every search spans several of each; for unconditioned, unscaled data, the others take the paths above), and
    the AMX bf16 first pass (kernels.amx_topk; hosts with AMX only) from one query up, in blocks of 7 queries, its
    uncertified queries then on the fused kernel."""
    if request.param == "amx" and not flat.amx_topk.AVAILABLE:
        pytest.skip("needs AMX tiles")
    amx = request.param == "amx"
    monkeypatch.setattr(flat, "AMX_MIN_DIM", 1 if amx else 1 << 62)
    monkeypatch.setattr(flat, "AMX_MIN_QUERIES", 1 if amx else 1 << 62)
    monkeypatch.setattr(flat, "AMX_MIN_WORK", 1)
    monkeypatch.setattr(flat, "AMX_MIN_ROWS", 1)
    monkeypatch.setattr(flat, "DIRECT_MIN_QUERIES", 1 if request.param in ("fused", "amx") else 1 << 62)
    screen = request.param == "blas-screen"
    monkeypatch.setattr(flat, "BLAS_SCREEN_MIN_DIM", 1 if screen else 1 << 62)
    monkeypatch.setattr(flat, "SCREEN_MIN_KEEP", 1 if screen else 1 << 62)  # ("blas": the tiles at every k)
    monkeypatch.setattr(flat, "BLAS_SCREEN_MIN_WORK", 1)
    monkeypatch.setattr(flat, "BLAS_SCREEN_ROWS", 64)
    monkeypatch.setattr(flat, "BLAS_SCREEN_QUERIES", 7)
    return request.param


def _brute(x, q, k, metric):
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if metric == "cos":
        x64 = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
        q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
    if metric == "l2":
        d = ((q64[:, None, :] - x64[None]) ** 2).sum(-1)
    else:
        d = -(q64 @ x64.T)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((700, 13)).astype(np.float32), rng.standard_normal((20, 13)).astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_matches_brute_force(data, metric):
    x, q = data
    index = kvant.FlatIndex(13, metric)
    index.add(x)
    d, i = index.search(q, 10)
    bd, bi = _brute(x, q, 10, metric)
    assert np.array_equal(i, bi)
    expect = bd if metric == "l2" else -bd
    assert np.allclose(d, expect, rtol=1e-4, atol=1e-4)
    assert d.dtype == np.float32 and i.dtype == np.int64
    if metric == "l2":
        assert np.all(np.diff(d, axis=1) >= 0)
    else:
        assert np.all(np.diff(d, axis=1) <= 0)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_padding_and_1d_query(data, metric):
    x, q = data
    index = kvant.FlatIndex(13, metric)
    index.add(x[:3], ids=[30, 10, 20])
    d, i = index.search(q[0], 5)
    assert d.shape == (5,) and i.shape == (5,)
    assert sorted(i[:3].tolist()) == [10, 20, 30]
    assert i[3:].tolist() == [-1, -1]
    assert np.all(d[3:] == (np.inf if metric == "l2" else -np.inf))


def test_ids_add_remove_save_load(tmp_path, data):
    x, q = data
    index = kvant.FlatIndex(13)
    index.add(x[:400], ids=np.arange(400) * 3 + 7)
    index.add(x[400:])  # auto ids continue after the largest id so far
    assert len(index) == 700
    assert index.ids[400] == 399 * 3 + 7 + 1
    _, i = index.search(x[:5], 1)
    assert i[:, 0].tolist() == [7, 10, 13, 16, 19]
    assert index.remove([7, 13, 999999]) == 2
    assert len(index) == 698
    d, i = index.search(x[:5], 1)
    assert 7 not in i and 13 not in i and i[1, 0] == 10
    index.save(tmp_path / "f.kvant")
    back = kvant.load(tmp_path / "f.kvant")
    assert isinstance(back, kvant.FlatIndex) and len(back) == 698
    d2, i2 = back.search(q, 7)
    d1, i1 = index.search(q, 7)
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
    mm = kvant.load(tmp_path / "f.kvant", mmap=True)
    assert np.array_equal(mm.search(q, 7)[1], i1)
    mm.add(x[:2], ids=[5000, 5001])  # a memory-mapped index becomes writable on add
    assert len(mm) == 700


def test_bad_input_leaves_index_unchanged(data):
    x, q = data
    index = kvant.FlatIndex(13)
    index.add(x[:100])
    before = index.search(q, 5)
    bad = x[100:200].copy()
    bad[42, 0] = np.inf
    with pytest.raises(InvalidInput, match="row: 42"):
        index.add(bad)
    with pytest.raises(DimensionMismatch):
        index.add(x[:, :12])
    with pytest.raises(InvalidInput, match="already in the index"):
        index.add(x[100:102], ids=[5, 1000])
    with pytest.raises(InvalidInput, match="duplicates"):
        index.add(x[100:103], ids=[1000, 1001, 1000])
    with pytest.raises(InvalidInput):
        index.add(x[100:102], ids=[1, 2, 3])
    with pytest.raises(InvalidInput):
        index.add(x[100:102], ids=[-4, 2000])
    with pytest.raises(DimensionMismatch):
        index.search(q[:, :5], 3)
    with pytest.raises(InvalidInput):
        index.search(q, 0)
    with pytest.raises(InvalidInput):
        index.search(np.full(13, np.nan), 3)
    assert len(index) == 100
    after = index.search(q, 5)
    assert np.array_equal(before[1], after[1])
    with pytest.raises(EmptyIndex):
        kvant.FlatIndex(13).search(q, 3)
    with pytest.raises(InvalidInput, match="l2, ip, cos"):
        kvant.FlatIndex(13, "hamming")


def test_corrupt_content(tmp_path, data):
    from kvant import persist

    x, _ = data
    persist.write(tmp_path / "a", "FlatIndex", {"dim": 13, "metric": "l2", "next_id": 5},
                  {"vectors": x[:4], "ids": np.arange(5, dtype=np.int64)})
    with pytest.raises(PersistError):
        kvant.load(tmp_path / "a")
    persist.write(tmp_path / "b", "FlatIndex", {"dim": 13, "metric": "l2", "next_id": 5},
                  {"vectors": x[:2], "ids": np.array([1, 1], np.int64)})
    with pytest.raises(PersistError):
        kvant.load(tmp_path / "b")
    persist.write(tmp_path / "c", "FlatIndex", {"dim": 13, "metric": "cos", "next_id": 2},
                  {"vectors": x[:2] * 3, "ids": np.array([0, 1], np.int64)})
    with pytest.raises(PersistError, match="not unit-normalised"):
        kvant.load(tmp_path / "c")


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e5])
def test_l2_is_exact_under_a_large_common_offset(offset):
    # ‖q‖² + ‖x‖² − 2q·x in float32 gave recall 0.59 and distances off by 46% at offset 1000
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2000, 16)) + offset).astype(np.float32)
    q = x[:40] + np.float32(0.01)
    index = kvant.FlatIndex(16)
    index.add(x)
    d, i = index.search(q, 10)
    true = ((q.astype(np.float64)[:, None] - x.astype(np.float64)[None]) ** 2).sum(-1)
    order = np.argsort(true, axis=1, kind="stable")[:, :10]
    assert np.array_equal(i, order)
    assert np.allclose(d, np.take_along_axis(true, order, 1), rtol=1e-5)


@pytest.mark.parametrize("offset,spread", [(1000.0, 1.0), (100.0, 0.01), (10.0, 0.001)])
@pytest.mark.parametrize("k", [1, 10])
def test_l2_is_exact_for_tight_clusters_far_from_the_origin(offset, spread, k):
    # two clusters at ±offset: their mean is ~0, so no shift applies, and the float32 GEMM form loses every
    # within-cluster digit (recall 0.00 at offset 100, spread 0.01); such queries must take the exact scan
    rng = np.random.default_rng(0)
    c = np.full(32, offset)
    x = np.vstack([c + rng.standard_normal((500, 32)) * spread, -c + rng.standard_normal((500, 32)) * spread])
    x = x.astype(np.float32)
    q = np.repeat(np.vstack([c, -c]), 6, axis=0) + rng.standard_normal((12, 32)) * spread
    q = q.astype(np.float32)
    index = kvant.FlatIndex(32)
    index.add(x)
    d, i = index.search(q, k)
    rd, ri = ref.exact_l2_topk_ref(q, x, k)
    assert np.array_equal(i, ri)
    assert np.allclose(d, rd, rtol=1e-6)


def test_l2_duplicates_at_the_kth_are_certified_without_a_full_scan(monkeypatch):
    # 30 copies of each row tie at the k-th distance: 2k+8 rows cannot certify, the 8k+64 pass can; the
    # exact scan of every row (the last resort) made such searches 10x slower
    import kvant.kernels.distance as kdist

    rng = np.random.default_rng(0)
    x = np.repeat(rng.standard_normal((200, 16)).astype(np.float32), 30, axis=0)
    q = x[::300] + np.float32(1e-3)
    index = kvant.FlatIndex(16)
    index.add(x)

    def no_scan(*args):
        raise AssertionError("the full exact scan ran")

    monkeypatch.setattr(kdist, "exact_topk", no_scan)
    d, i = index.search(q, 5)
    rd, ri = ref.exact_l2_topk_ref(q, x, 5)
    assert np.array_equal(i, ri) and np.allclose(d, rd, rtol=1e-6)


def test_id_space_exhaustion_is_invalid_input():
    index = kvant.FlatIndex(2)
    index.add(np.ones((1, 2), np.float32), ids=[2**63 - 1])
    with pytest.raises(InvalidInput, match="no default ids"):
        index.add(np.ones((1, 2), np.float32))
    assert index.ntotal == 1
    index.add(np.full((1, 2), 3.0, np.float32), ids=[5])
    assert index.ntotal == 2
    # (review) the failed add had kept its rows: the next search indexed past the ids (IndexError), a save
    # could not be loaded back
    d, i = index.search(np.full(2, 3.0, np.float32), 2)
    assert i.tolist() == [5, 2**63 - 1] and d.tolist() == [0.0, 8.0]


def test_mmap_load_of_empty_index(tmp_path):
    index = kvant.FlatIndex(4)
    index.save(tmp_path / "e.kvant")
    assert kvant.load(tmp_path / "e.kvant", mmap=True).ntotal == 0


def test_search_accepts_a_query_file(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    np.save(tmp_path / "q.npy", x[:3])
    index = kvant.FlatIndex(4)
    index.add(x)
    d, i = index.search(str(tmp_path / "q.npy"), 1)
    assert i[:, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("scale", [1e-40, 1e-25, 1.0, 1e19])
def test_ip_ranking_is_exact_at_extreme_magnitudes(scale):
    # float32 inner products of 1e19-scale rows overflow (inf − inf = NaN dropped a stored row as padding) and
    # those of 1e-25-scale rows underflow to 0 (every row tied): rows and queries are scaled by powers of two
    g = np.random.default_rng(7)
    x = (g.standard_normal((60, 6)) * scale).astype(np.float32)
    q = (g.standard_normal((5, 6)) * scale).astype(np.float32)
    index = kvant.FlatIndex(6, "ip")
    index.add(x)
    d, ids = index.search(q, 10)
    ref = q.astype(np.float64) @ x.astype(np.float64).T
    np.testing.assert_array_equal(ids, np.argsort(-ref, axis=1, kind="stable")[:, :10])
    if scale == 1.0:
        np.testing.assert_allclose(d, np.take_along_axis(ref, ids, axis=1), rtol=1e-5)


def test_ip_overflowing_products_are_not_dropped():
    index = kvant.FlatIndex(2, "ip")
    index.add(np.array([[4e19, -4e19], [1, 1], [2, 2]], np.float32))
    d, ids = index.search(np.array([1e19, 1e19], np.float32), k=3)
    assert ids.tolist() == [2, 1, 0]  # row 0's true inner product is 0, not a missing row
    assert d[2] == 0.0


@pytest.mark.parametrize("k", [2**33, 10**12, 2**62])
def test_absurd_k_is_invalid_input_not_a_memory_error(k):
    # (review) k=2**31 over 300 rows: the padded arrays' allocation succeeded (overcommit) and filling them got the
    # process killed; results beyond the machine's memory are refused before allocating
    x = np.eye(3, dtype=np.float32)
    flat = kvant.FlatIndex(3)
    flat.add(x)
    pq = kvant.PQIndex(3, 1, nbits=4)
    pq.train(np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32))
    pq.add(x)
    for index in (flat, pq):
        with pytest.raises(InvalidInput, match="cannot be allocated|more than this machine's memory"):
            index.search(x, k)
        d, ids = index.search(x, 5)  # k > ntotal still pads
        assert ids.shape == (3, 5) and (ids[:, 3:] == -1).all() and np.isinf(d[:, 3:]).all()


def test_ip_single_extreme_query_is_scaled_by_its_norm():
    # one query (or identical ones) has no spread: the scale must come from its norm, not the spread
    g = np.random.default_rng(1)
    x = (1e3 * g.standard_normal((50, 8))).astype(np.float32)
    q = (1e36 * g.standard_normal(8)).astype(np.float32)
    index = kvant.FlatIndex(8, "ip")
    index.add(x)
    d, ids = index.search(q, 3)
    ref = x.astype(np.float64) @ q.astype(np.float64)
    assert ids.tolist() == np.argsort(-ref, kind="stable")[:3].tolist()


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_one_huge_query_leaves_the_others_in_its_batch_alone(metric):
    # (review) ip took one power-of-two scale for the whole batch: next to a query of norm 1e25 one of norm 1e-25
    # was scaled to 0 and got ids 0..4 at similarity 0
    import warnings

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    q = rng.standard_normal((2, 16)).astype(np.float32)
    index = kvant.FlatIndex(16, metric)
    index.add(x)
    small = q[:1] * np.float32(1e-25)
    alone_d, alone_i = index.search(small, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning leaks out either
        d, i = index.search(np.vstack([small, q[1:] * np.float32(1e25)]), 5)
    np.testing.assert_array_equal(i[0], alone_i[0])
    np.testing.assert_allclose(d[0], alone_d[0], rtol=1e-6)  # BLAS rounds a 1- and a 2-query product differently


@pytest.mark.parametrize("nq,k", [(1, 1), (5, 3), (300, 10), (40, 200)])
def test_l2_shortlist_paths_agree(shortlist_path, nq, k):
    # the fused kernel and the BLAS tiles sum the products in different orders; after certification and the exact
    # re-score both return brute force's answer: 300 queries span two of the kernel's query blocks at d = 16
    rng = np.random.default_rng(nq + k)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x[1000:1100] = x[:100]  # exact duplicates: ties at the k-th
    q = np.vstack([rng.standard_normal((nq - 1, 16)), x[:1]]).astype(np.float32)
    index = kvant.FlatIndex(16)
    index.add(x)
    assert nq != 300 or nq > kvant.kernels.direct_topk.max_queries(16)
    d, i = index.search(q, k)
    rd, ri = ref.exact_l2_topk_ref(q, x, k)
    assert np.array_equal(i, ri) and np.allclose(d, rd, rtol=1e-6)


def test_shortlist_rescore_and_full_scan_rank_ties_alike():
    # 20 rows at one exact distance from q (each holds the same multiset of float32 differences, permuted): their
    # float64 sums differ by rounding, and NumPy's pairwise sums (the re-score used them until a review) rank them
    # unlike the full exact scan's. Both exits must order them the same way, or a query's tied rows depend on which
    # exit it took
    from kvant.kernels.distance import exact_rows, exact_topk

    rng = np.random.default_rng(0)
    dim = 700
    q = np.full((1, dim), 0.3, np.float32)
    p = (rng.standard_normal(dim) * np.exp(rng.uniform(-6, 0, dim)) * 0.5).astype(np.float32)
    tied = np.stack([q[0] - p[rng.permutation(dim)] for _ in range(20)]).astype(np.float32)
    x = np.vstack([tied, rng.standard_normal((30, dim)).astype(np.float32) + 5])
    sums = np.empty((1, 20))
    exact_rows(q, tied, np.arange(20)[None], sums, False)
    diff = tied.astype(np.float64) - q.astype(np.float64)
    pairwise = np.einsum("kd,kd->k", diff, diff)
    rank = lambda v: np.lexsort((np.arange(20), v))[:10]  # noqa: E731
    assert not np.array_equal(rank(sums[0]), rank(pairwise))  # the construction: the two summations disagree
    full_d = np.empty((1, 10))
    full_i = np.empty((1, 10), np.int64)
    exact_topk(q, x, full_d, full_i, False)
    rows = rng.permutation(x.shape[0])[None].copy()  # every row, shuffled, as a shortlist
    d = np.empty(rows.shape, np.float32)
    flat._rescore_exact(q, x, d, rows)
    assert np.array_equal(rows[:, :10], full_i) and np.array_equal(d[:, :10], full_d.astype(np.float32))


@pytest.mark.parametrize("threads", [2, 64])
def test_fused_lists_within_the_memory_budget(shortlist_path, monkeypatch, threads):
    # a budget below one chunk's lists: one chunk of rows and one block of queries per call, however many threads
    # the split would feed (a review: 22 chunks at 64 threads, 800 MiB on large inputs), the same answers
    monkeypatch.setattr(flat, "_DIRECT_LISTS_BYTES", 1)
    monkeypatch.setattr(flat, "get_num_threads", lambda: threads)
    import numba

    monkeypatch.setattr(numba, "get_num_threads", lambda: threads)
    shapes = []
    real = flat.direct_topk.direct_keep

    def spy(x, cts, *args):
        shapes.append(args[5].shape)  # the lists (chunks, blocks, width, keep)
        return real(x, cts, *args)

    monkeypatch.setattr(flat.direct_topk, "direct_keep", spy)
    rng = np.random.default_rng(3)
    x = np.round(rng.standard_normal((9000, 8)) * 2).astype(np.float32)  # a grid: ties
    q = np.vstack([x[:7], x[100:140]]) + np.float32(0.25)
    index = kvant.FlatIndex(8)
    index.add(x)
    for nq in (7, 47):
        d, i = index.search(q[:nq], 12)
        rd, ri = ref.exact_l2_topk_ref(q[:nq], x, 12)
        assert np.array_equal(i, ri) and np.allclose(d, rd, rtol=1e-6)
    assert shortlist_path != "fused" or (shapes and all(s[0] == 1 and s[1] == 1 for s in shapes))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 300), d=st.integers(1, 40), nq=st.integers(1, 40), k=st.integers(1, 60),
       metric=st.sampled_from(["l2", "ip"]), seed=st.integers(0, 2**16))
def test_search_matches_brute_force_hypothesis(shortlist_path, n, d, nq, k, metric, seed):
    # integer grids (exact products in any order: many ties, duplicates) against the float64 brute force, on both
    # shortlist paths; ip scores are exact here too, so ids must match exactly
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, (n, d)).astype(np.float32)
    q = np.vstack([rng.integers(-3, 4, (nq, d)), x[:1]]).astype(np.float32)
    index = kvant.FlatIndex(d, metric)
    index.add(x)
    dist, ids = index.search(q, k)
    bd, bi = _brute(x, q, min(k, n), metric)
    assert np.array_equal(ids[:, : min(k, n)], bi) and np.all(ids[:, n:] == -1)
    expect = bd if metric == "l2" else -bd
    assert np.array_equal(dist[:, : min(k, n)], expect.astype(np.float32))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_long_lists_try_the_short_keep_on_a_probe_first(monkeypatch, ties, metric):
    # k >= SHORT_KEEP_MIN_K: the first SHORT_KEEP_PROBE queries keep k + k/16 + 8 rows; on float data they certify and
    # the rest follow them, on integer coordinates (ties at the k-th) most cannot and the rest go to 2k + 8; the
    # answers are the brute force's either way
    rng = np.random.default_rng(3)
    n, d, nq, k = 3000, 6, 40, 80
    x = (rng.integers(0, 3, (n, d)) if ties else rng.standard_normal((n, d))).astype(np.float32)
    q = (rng.integers(0, 3, (nq, d)) if ties else rng.standard_normal((nq, d))).astype(np.float32)
    index = kvant.FlatIndex(d, metric)
    index.add(x)
    monkeypatch.setattr(flat.amx_topk, "AVAILABLE", False)  # (else the AMX pass answers these first)
    passes = []
    real = flat.FlatIndex._gemm_topk

    def spy(self, qs, keep, *args):
        passes.append((qs.shape[0], keep))
        return real(self, qs, keep, *args)

    monkeypatch.setattr(flat.FlatIndex, "_gemm_topk", spy)
    dist, ids = index.search(q, k)
    short, probe = k + k // 16 + 8, flat.SHORT_KEEP_PROBE
    assert k >= flat.SHORT_KEEP_MIN_K and passes[0] == (probe, short)
    if ties:
        assert passes[1][1] == 2 * k + 8 and passes[1][0] > nq - probe  # the rest skipped the short keep
    else:
        assert passes == [(probe, short), (nq - probe, short)]
    bd, bi = _brute(x, q, k, metric)
    if ties:  # (integer products: exact in float32 too, ids match exactly)
        assert np.array_equal(ids, bi)
    else:
        assert np.array_equal(ids, bi) or np.allclose(dist, bd if metric == "l2" else -bd, rtol=1e-5)
    assert np.allclose(dist, bd if metric == "l2" else -bd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: kvant.FlatIndex(2), lambda: kvant.PQIndex(2, 1, nbits=4)])
def test_search_refuses_query_dtypes_and_masked_arrays_as_add_does(make):
    idx = make()
    x = np.array([[16777216.0, 0.0], [16777218.0, 0.0]] * 20, np.float32)
    if isinstance(idx, kvant.PQIndex):
        idx.train(x)
    idx.add(x)
    for q in (np.array([[16777217, 0]], np.int64), np.array([[1, 0]], np.int32), np.array([[1, 0]], np.uint64),
              np.array([[True, False]])):
        with pytest.raises(InvalidInput, match="dtype"):
            idx.search(q, 1)
    with pytest.raises(InvalidInput, match="masked"):
        idx.search(np.ma.masked_array([[1.0, 2.0]], mask=[[False, True]]), 1)
    # Python numbers are values, not a dtype: a list of ints searches like the same floats
    for q in ([[3, 4]], [3, 4], ((3.0, 4),)):
        d, i = idx.search(q, 2)
        d2, i2 = idx.search(np.array([[3.0, 4.0]], np.float32), 2)
        np.testing.assert_array_equal(np.atleast_2d(i), i2)
        np.testing.assert_array_equal(np.atleast_2d(d), d2)
    for t in (np.float16, np.float64, np.int8, np.uint8):
        idx.search(np.array([[3, 4]], t), 1)


@pytest.mark.parametrize("metric", ["l2", "cos"])
def test_add_in_many_chunks_is_one_copy_and_all_or_nothing(metric, monkeypatch):
    # add writes the chunks straight into the index's buffer (it made three copies: 40 s for 1M x 768 on the VM);
    # a NaN in a later chunk must still leave the index as it was
    from kvant.io import source

    monkeypatch.setattr(source, "_CHUNK_BYTES", 7 * 4 * 5)  # 7 rows of dim 5 per chunk
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 5)).astype(np.float32)
    one = kvant.FlatIndex(5, metric)
    one.add(x[:60])
    bad = x[60:].copy()
    bad[33, 2] = np.nan  # in the fifth chunk of this add
    before = one.search(x[:9], 4)
    with pytest.raises(InvalidInput, match="bad row: 33"):
        one.add(bad)
    assert one.ntotal == 60
    np.testing.assert_array_equal(one.search(x[:9], 4)[1], before[1])
    one.add(x[60:])
    whole = kvant.FlatIndex(5, metric)
    monkeypatch.setattr(source, "_CHUNK_BYTES", 32 << 20)
    whole.add(x)
    d1, i1 = one.search(x[:9], 6)
    d2, i2 = whole.search(x[:9], 6)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_wide_batches_take_the_blas_screen_and_match_brute_force(shortlist_path, metric, monkeypatch):
    # with the shipped thresholds: D >= 384 and queries × D >= 2^18 go through BLAS blocks screened in cache; smaller
    # batches do not; both answer brute force's ids
    if shortlist_path != "fused":
        pytest.skip("one run, with the shipped thresholds")
    monkeypatch.setattr(flat.amx_topk, "AVAILABLE", False)  # (else the AMX pass answers these first)
    monkeypatch.setattr(flat, "BLAS_SCREEN_MIN_DIM", 384)
    monkeypatch.setattr(flat, "BLAS_SCREEN_MIN_WORK", 1 << 18)
    monkeypatch.setattr(flat, "BLAS_SCREEN_ROWS", 1024)
    monkeypatch.setattr(flat, "BLAS_SCREEN_QUERIES", 1024)
    calls = []
    real = flat.FlatIndex._blas_screen_topk
    monkeypatch.setattr(flat.FlatIndex, "_blas_screen_topk", lambda self, *a: calls.append(1) or real(self, *a))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2500, 384)).astype(np.float32)
    q = rng.standard_normal((700, 384)).astype(np.float32)
    index = kvant.FlatIndex(384, metric)
    index.add(x)
    d, i = index.search(q[:600], 5)  # 600 × 384 < 2^18: the fused kernel
    assert calls == []
    d, i = index.search(q, 5)
    assert calls == [1]
    bd, bi = _brute(x, q, 5, metric)
    assert np.array_equal(i, bi)


@pytest.mark.parametrize("metric", ["ip", "cos"])
def test_ip_near_ties_are_ranked_exactly(metric):
    # 20 near-copies of each row (relative perturbations ~1e-5): their float32 inner products with a query differ by
    # about their rounding, so float32 scores alone rank them by rounding noise, and each path (fused kernel, BLAS
    # tiles, BLAS screen) sums in its own order. Certified and re-scored in float64, every path returns the exact order
    rng = np.random.default_rng(7)
    base = rng.standard_normal((60, 48))
    x = (np.repeat(base, 20, axis=0) * (1 + 1e-5 * rng.standard_normal((1200, 48)))).astype(np.float32)
    q = (base[::3] + 0.1 * rng.standard_normal((20, 48))).astype(np.float32)
    index = kvant.FlatIndex(48, metric)
    index.add(x)
    d, i = index.search(q, 15)
    xs, qs = x, q
    if metric == "cos":  # the index's own unit rows and queries (normalised in float32)
        xs = index.reconstruct(index.ids)
        qs = (q / np.linalg.norm(q.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)
    rd, ri = ref.exact_ip_topk_ref(qs, xs, 15)
    assert np.array_equal(i, ri)
    assert np.array_equal(d, (-rd).astype(np.float32))


def test_ip_rows_below_float32_normal_norms_are_certified_on_their_true_norms():
    # (a review) rows ~1e-33: their float32 squared norms are 0, a bound of 0 certified the scaled shortlist; the
    # float32 products of the scaled rows round 2^26·(a − b) away and rank row 0 first, while row 10 is the best
    rows = [[0, 1.0, 0]] + [[2**26, 0.5, -(2**26)]] * 9 + [[2**26, 3.0, -(2**26)]]
    x = (np.array(rows) * 2.0**-110).astype(np.float32)
    index = kvant.FlatIndex(3, "ip")
    index.add(x)
    d, i = index.search(np.ones(3, np.float32), 1)
    assert i[0] == 10
    rng = np.random.default_rng(3)
    base = rng.standard_normal((30, 16))
    x = (np.repeat(base, 10, axis=0) * (1 + 1e-6 * rng.standard_normal((300, 16))) * 1e-30).astype(np.float32)
    q = base[:4].astype(np.float32)
    index = kvant.FlatIndex(16, "ip")
    index.add(x)
    rd, ri = ref.exact_ip_topk_ref(q, x, 5)
    assert np.array_equal(index.search(q, 5)[1], ri)


def test_ip_row_whose_product_overflows_is_found_when_k_nears_n():
    # (a review) an odd row at 3e38 (not among magnitude_scale's sampled rows): its float32 product is inf - inf = NaN,
    # never kept, and a list of "every row" (2k + 8 >= n) was taken as certain without it
    import warnings

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1100, 4)).astype(np.float32)
    x[1] = [3e38, -2.9e38, 0, 0]
    q = np.array([2, 2, 0, 0], np.float32)
    index = kvant.FlatIndex(4, "ip")
    index.add(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no overflow warning leaks out
        for k in (5, 600, 1100):
            d, i = index.search(q, k)
            assert i[0] == 1 and d[0] > 1e37


@pytest.mark.parametrize("per_keep", [0, 1 << 40])
def test_long_lists_over_few_rows_give_the_same_answers_in_any_number_of_chunks(monkeypatch, per_keep):
    # _chunks_per_thread: short chunks of long lists run one chunk per thread (0: always four per thread, 1 << 40:
    # always one); heaps while scanning, duplicates and ties at the k-th included
    rng = np.random.default_rng(9)
    x = rng.integers(0, 6, (3000, 3)).astype(np.float32)
    q = rng.integers(0, 6, (40, 3)).astype(np.float32)
    monkeypatch.setattr(flat, "SHORT_CHUNK_ROWS_PER_KEEP", per_keep)
    for metric in ("l2", "ip"):
        index = kvant.FlatIndex(3, metric=metric)
        index.add(x)
        d, i = index.search(q, 100)
        want_d, want_i = _brute(x, q, 100, metric)
        np.testing.assert_array_equal(i, want_i)
        np.testing.assert_allclose(d, want_d if metric == "l2" else -want_d, rtol=1e-6)


@given(n=st.integers(1, 10**7), nq=st.integers(1, 5000), keep=st.integers(1, 1024),
       max_width=st.sampled_from([16, 64, 256]), threads=st.integers(1, 64))
@settings(max_examples=300, deadline=None)
def test_fused_shortlist_split_covers_every_query_once(n, nq, keep, max_width, threads):
    # blocks of at most max_width queries (a multiple of 16) that cover the batch, no empty block; short chunks of
    # long lists split the queries (one chunk of rows unless there are fewer blocks than threads), long ones the rows
    width, blocks, chunks = flat._direct_split(n, nq, keep, max_width, threads)
    assert width % 16 == 0 and 16 <= width <= max_width
    assert (blocks - 1) * width < nq <= blocks * width
    assert 1 <= chunks <= max(1, n // 64)
    if n >= 64 * threads:
        assert blocks * chunks >= threads or blocks * width < 16 * threads  # every thread has a task
    if flat._chunks_per_thread(n, keep) == 1 and nq > 16:
        assert chunks == 1 or blocks < threads  # the rows split only when the queries cannot
    else:
        assert blocks == -(-nq // max_width)  # as few blocks as the width allows


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_lists_longer_than_the_reservoir_budget_match_brute_force(metric, monkeypatch):
    # k = 700 keeps 1,408 rows per query (2,816 reservoir slots): with the reservoir budget cut to 64 KiB the blocks
    # hold 16 queries; rows in one chunk or several (merged as sorted runs), duplicates at the k-th included
    monkeypatch.setattr(flat, "_RESERVOIR_BYTES", 1 << 16)
    rng = np.random.default_rng(12)
    x = rng.integers(0, 5, (3000, 4)).astype(np.float32)
    q = rng.integers(0, 5, (37, 4)).astype(np.float32)
    index = kvant.FlatIndex(4, metric=metric)
    index.add(x)
    for nq in (3, 37):
        d, i = index.search(q[:nq], 700)
        want_d, want_i = _brute(x, q[:nq], 700, metric)
        np.testing.assert_array_equal(i, want_i)
        np.testing.assert_allclose(d, want_d if metric == "l2" else -want_d, rtol=1e-6)


@pytest.mark.parametrize("keep", [1, 28, 208, 2008, 10008, 1 << 20])
def test_reservoir_width_fits_the_budget(keep):
    width = flat._reservoir_width(keep)
    assert width % 16 == 0 and width >= 16
    assert width == 16 or width * 12 * flat.direct_topk.capacity(keep) <= flat._RESERVOIR_BYTES


def test_reconstruct_returns_rows_in_the_given_order_and_refuses_unknown_ids():
    # (an audit: no ids on an empty index raised "not in the index" while a non-empty one returned (0, dim))
    index = kvant.FlatIndex(3)
    assert index.reconstruct([]).shape == (0, 3)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    index.add(x, ids=[40, 10, 30, 20])
    np.testing.assert_array_equal(index.reconstruct([20, 40, 20]), x[[3, 0, 3]])
    assert index.reconstruct([]).shape == (0, 3)
    with pytest.raises(kvant.InvalidInput, match="not in the index"):
        index.reconstruct([10, 11])
    index.remove([10])
    with pytest.raises(kvant.InvalidInput, match="not in the index"):
        index.reconstruct([10])


@pytest.fixture(scope="module", params=["l2", "ip", "cos"])
def saved_flat(request, tmp_path_factory):
    x = np.random.default_rng(6).standard_normal((200, 7)).astype(np.float32)
    index = kvant.FlatIndex(7, metric=request.param)
    index.add(x, ids=np.arange(200) * 3 + 1)
    path = tmp_path_factory.mktemp("flat") / "f.kvant"
    index.save(path)
    return path


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_or_flipped_flat_files_raise_persist_error(check_corrupted_copy, saved_flat, data):
    check_corrupted_copy(saved_flat, data)
