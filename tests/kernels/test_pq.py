"""kvant.kernels.pq against the plain references in kvant.bench.reference, on awkward shapes."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvant.bench import reference as R
from kvant.kernels import pq as K

TOL = 1e-4


def _rel_err(got, ref):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.size == 0:
        return 0.0
    return float(np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref))))


def _data(seed, n, dim, scale="normal"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    if scale == "wide":  # large dynamic range: columns at 1e-3, 1 and 1e3
        x *= np.array([1e-3, 1.0, 1e3])[np.arange(dim) % 3]
    return np.ascontiguousarray(x, dtype=np.float32)


def _codebooks(seed, m, ksub, dsub, scale="normal"):
    return _data(seed, m * ksub, dsub, scale).reshape(m, ksub, dsub).copy()


SHAPES = [  # (dim, m, ksub)
    (1, 1, 16),  # dsub = 1, m = 1
    (7, 7, 16),  # dsub = 1, odd m
    (12, 3, 256),
    (10, 2, 5),  # ksub not a power of two
    (24, 3, 256),
    (30, 10, 32),  # dsub = 3
    (18, 3, 6),  # ksub not a multiple of 4 or 16 (the fast encoder takes codewords _ENC_CW = 2 or 4 at a time)
    (48, 3, 32),  # dsub = 16 (with 4 and 8 above: the encoder's unrolled widths)
]


@pytest.mark.parametrize("dim,m,ksub", SHAPES)
@pytest.mark.parametrize("scale", ["normal", "wide"])
def test_tables_match_reference(dim, m, ksub, scale):
    cb = _codebooks(1, m, ksub, dim // m, scale)
    for nq in (0, 1, 3):
        q = _data(2 + nq, nq, dim, scale)
        t = K.distance_tables_l2(q, cb)
        assert t.shape == (nq, m, ksub) and t.dtype == np.float32
        assert _rel_err(t, R.pq_distance_tables_l2_ref(q, cb)) <= TOL
        ti = K.ip_tables(q, cb)
        assert ti.shape == (nq, m, ksub) and ti.dtype == np.float32
        assert _rel_err(ti, R.pq_ip_tables_ref(q, cb)) <= TOL


def _tables_in_coordinate_order(q, cb):
    """Σ_d (q_d − c_d)² in float32, one coordinate after the other from d = 0: the order distance_tables_l2 promises
    (NumPy's float32 element-wise operations round as the kernels' scalar and vector ones do)."""
    nq, (m, ksub, dsub) = q.shape[0], cb.shape
    out = np.empty((nq, m, ksub), np.float32)
    for j in range(m):
        diff = q[:, None, j * dsub] - cb[None, j, :, 0]
        acc = diff * diff
        for d in range(1, dsub):
            diff = q[:, None, j * dsub + d] - cb[None, j, :, d]
            acc = acc + diff * diff
        out[:, j] = acc
    return out


@pytest.mark.parametrize("m,ksub,dsub", [(1, 16, 1), (3, 16, 1), (5, 16, 7), (16, 16, 49), (7, 32, 3), (2, 48, 5),
                                         (3, 64, 2), (2, 256, 3), (3, 5, 2)])
@pytest.mark.parametrize("scale", ["normal", "wide"])
@pytest.mark.parametrize("serial", [True, False])
def test_l2_tables_in_lanes_are_the_loops_bits(m, ksub, dsub, scale, serial, monkeypatch):
    # up to TABLE_LANES_MAX_KSUB codewords the sums run in vector registers, four runs of 16 side by side (the last
    # group of an m·ksub/16 not divisible by four repeats a unit); beyond it, or for ksub not a multiple of 16, the
    # loop. Both sum in coordinate order, so every entry has the same bits either way, far from the origin too.
    monkeypatch.setattr(K, "SERIAL_TABLE_WORK", 1 << 62 if serial else 0)
    cb = _codebooks(5, m, ksub, dsub, scale) + np.float32(300.0)
    for nq in (0, 1, 2, 5):
        q = _data(6 + nq, nq, m * dsub, scale) + np.float32(300.0)
        np.testing.assert_array_equal(K.distance_tables_l2(q, cb).view(np.int32),
                                      _tables_in_coordinate_order(q, cb).view(np.int32))
        np.testing.assert_array_equal(K.distance_tables_l2(q, cb, K.transposed_codebooks(cb)),
                                      K.distance_tables_l2(q, cb))


def _ip_tables_in_coordinate_order(q, cb, centre):
    """float64 sums of the exact products in coordinate order, less (``centre``) the median of up to 15 evenly spaced
    entries of each sub-table, rounded once to float32; and per query the sum of those medians (ip_tables_centred's
    definition, computed in NumPy)."""
    nq, (m, ksub, dsub) = q.shape[0], cb.shape
    out = np.empty((nq, m, ksub), np.float32)
    shift = np.zeros(nq)
    q64, cb64 = q.astype(np.float64), cb.astype(np.float64)
    ns = min(ksub, 15)
    for j in range(m):
        acc = q64[:, None, j * dsub] * cb64[None, j, :, 0]
        for d in range(1, dsub):
            acc = acc + q64[:, None, j * dsub + d] * cb64[None, j, :, d]
        mid = np.sort(acc[:, [(i * ksub) // ns for i in range(ns)]], axis=1)[:, ns // 2] if centre else np.zeros(nq)
        out[:, j] = (acc - mid[:, None]).astype(np.float32)
        shift += mid
    return out, shift


@pytest.mark.parametrize("m,ksub,dsub", [(1, 16, 1), (3, 16, 1), (5, 16, 7), (16, 16, 49), (6, 256, 3), (3, 5, 2)])
@pytest.mark.parametrize("scale", ["normal", "wide"])
@pytest.mark.parametrize("serial", [True, False])
def test_ip_tables_are_exact_products_summed_in_coordinate_order(m, ksub, dsub, scale, serial, monkeypatch):
    # the tables' definition to the bit, serial and parallel: float64 sums of exact products in coordinate order,
    # centred on the median of up to 15 evenly spaced entries, rounded once
    monkeypatch.setattr(K, "SERIAL_TABLE_WORK", 1 << 62 if serial else 0)
    cb = _codebooks(7, m, ksub, dsub, scale) + np.float32(40.0)
    for nq in (0, 1, 2, 5):
        q = _data(8 + nq, nq, m * dsub, scale) - np.float32(25.0)
        want, _ = _ip_tables_in_coordinate_order(q, cb, False)
        np.testing.assert_array_equal(K.ip_tables(q, cb).view(np.int32), want.view(np.int32))
        want, want_shift = _ip_tables_in_coordinate_order(q, cb, True)
        got, shift = K.ip_tables_centred(q, cb, K.transposed_codebooks(cb))
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
        np.testing.assert_array_equal(shift, want_shift)


def test_l2_tables_are_direct_not_expanded():
    # Far from the origin with a tiny difference: the ‖q‖²+‖c‖²−2q·c shortcut would cancel catastrophically.
    cb = np.full((1, 2, 4), 1e4, dtype=np.float32)
    cb[0, 1] += np.float32(1.0)
    q = np.full((1, 4), 1e4, dtype=np.float32)
    t = K.distance_tables_l2(q, cb)
    np.testing.assert_array_equal(t[0, 0], [0.0, 4.0])


@pytest.mark.parametrize("dim,m,ksub", SHAPES)
@pytest.mark.parametrize("scale", ["normal", "wide"])
def test_encode_matches_reference(dim, m, ksub, scale):
    cb = _codebooks(3, m, ksub, dim // m, scale)
    for n in (0, 1, 6, 33, 67, 130):  # 32 rows per group, 64 per parallel block: partial groups and blocks
        x = _data(4 + n, n, dim, scale)
        codes = K.pq_encode(x, cb)
        assert codes.shape == (n, m) and codes.dtype == np.uint8
        ref = R.pq_encode_ref(x, cb)
        if n:
            # the chosen codeword is the nearest one up to float32 rounding of near-ties
            t = R.pq_distance_tables_l2_ref(x, cb)
            rows, cols = np.indices(codes.shape)
            got_d = t[rows, cols, codes]
            best = t[rows, cols, ref]
            assert np.all(np.abs(got_d - best) <= TOL * np.maximum(1.0, best))
            assert np.mean(codes == ref) > 0.99


def test_encode_ties_pick_smaller_codeword():
    cb = np.zeros((2, 16, 2), dtype=np.float32)
    cb[0, 5] = cb[0, 9] = [1.0, 1.0]  # duplicate nearest codewords: 5 must win
    cb[0, 0] = [50.0, 50.0]
    cb[1, 3] = cb[1, 2] = [-1.0, 0.0]
    cb[1, 0] = cb[1, 1] = [9.0, 9.0]
    cb[1, 4:] = 9.0
    x = np.array([[1.0, 1.0, -1.0, 0.0]], dtype=np.float32)
    cb[0, 1:5] = cb[0, 6:9] = cb[0, 10:] = 30.0
    np.testing.assert_array_equal(K.pq_encode(x, cb), [[5, 2]])
    # the same with an odd codebook size (the portable encoder) and 40 copies of the row (a full 32-row group)
    cb17 = np.concatenate([cb, np.full((2, 1, 2), 99.0, dtype=np.float32)], axis=1)
    np.testing.assert_array_equal(K.pq_encode(x, cb17), [[5, 2]])
    np.testing.assert_array_equal(K.pq_encode(np.repeat(x, 40, axis=0), cb), np.tile([[5, 2]], (40, 1)))


@numba.njit
def _encode_with_runtime_width(xt, cbf, dsub, ksub, res):
    # the same intrinsic with a width only known at run time: the loop path
    K._enc_lanes(xt, 0, cbf, 0, dsub, ksub, res)


@pytest.mark.parametrize("dsub", [4, 8, 16])
@pytest.mark.parametrize("scale", ["normal", "wide"])
def test_unrolled_and_loop_encoders_are_bit_identical(dsub, scale):
    ksub = 64
    cb = _codebooks(7, 1, ksub, dsub, scale)
    cb[0, 5] = cb[0, 40]  # a tie: the smaller id must win on both paths
    x = _data(8, 32, dsub, scale)
    x[3] = cb[0, 40]
    unrolled = K.pq_encode(x, cb)[:, 0]
    xt = np.ascontiguousarray(x.T).reshape(-1)  # column-major: xt[col * 32 + lane]
    res = np.empty(32, np.int32)
    _encode_with_runtime_width(xt, cb.reshape(-1), dsub, ksub, res)
    np.testing.assert_array_equal(unrolled, res)
    assert unrolled[3] == 5


def _random_tables(seed, nq, m, ksub, scale="normal"):
    rng = np.random.default_rng(seed)
    t = rng.random((nq, m, ksub))
    if scale == "wide":
        t *= 10.0 ** rng.integers(-3, 4, size=(nq, m, 1))
    return np.ascontiguousarray(t, dtype=np.float32)


def _random_codes(seed, n, m, ksub):
    return np.random.default_rng(seed).integers(0, ksub, size=(n, m)).astype(np.uint8)


@pytest.mark.parametrize("m,ksub", [(1, 16), (5, 16), (16, 256), (3, 256)])
def test_adc_distances_match_reference(m, ksub):
    t = _random_tables(5, 3, m, ksub, "wide")
    for n in (0, 1, 40):
        codes = _random_codes(6, n, m, ksub)
        d = K.adc_distances(t, codes)
        assert d.shape == (3, n) and d.dtype == np.float32
        assert _rel_err(d, R.pq_adc_distances_ref(t, codes)) <= TOL


@pytest.mark.parametrize("m,ksub", [(1, 16), (5, 16), (16, 256), (3, 256)])
@pytest.mark.parametrize("scale", ["normal", "wide"])
@pytest.mark.parametrize("nchunks", [1, 3])
def test_adc_search_matches_reference(m, ksub, scale, nchunks):
    # nq = 16 fills one 16-query block exactly (no padding), 17 and 40 span several blocks
    for nq, n, k in [(0, 10, 3), (1, 0, 4), (1, 1, 1), (5, 3, 7), (9, 300, 10), (6, 150, 1), (16, 90, 5),
                     (17, 200, 10), (40, 130, 3)]:
        t = _random_tables(7 + n, nq, m, ksub, scale)
        codes = _random_codes(8 + n, n, m, ksub)
        d, i = K.adc_search(t, codes, k, nchunks=nchunks)
        assert d.shape == (nq, k) and i.shape == (nq, k)
        assert d.dtype == np.float32 and i.dtype == np.int64
        rd, ri = R.pq_adc_search_ref(t, codes, k)
        assert R.pq_topk_agrees(rd, ri, d, i) is None, (nq, n, k)
        # returned distances are exactly the kernel's ADC sums
        if nq and n:
            full = K.adc_distances(t, codes)
            ok = i >= 0
            np.testing.assert_array_equal(d[ok], np.take_along_axis(full, np.where(ok, i, 0), 1)[ok])


@pytest.mark.parametrize("nchunks", [1, 4])
def test_adc_search_ties_broken_by_smaller_idx(nchunks):
    t = _random_tables(9, 6, 4, 16)
    base = _random_codes(10, 5, 4, 16)
    codes = np.ascontiguousarray(np.tile(base, (40, 1)))  # every distance appears 40 times
    d, i = K.adc_search(t, codes, 12, nchunks=nchunks)
    full = K.adc_distances(t, codes)
    for q in range(6):
        order = np.lexsort((np.arange(len(codes)), full[q]))[:12]
        np.testing.assert_array_equal(i[q], order)
        np.testing.assert_array_equal(d[q], full[q, order])


@pytest.mark.parametrize("nq", [3, 6, 20])
@pytest.mark.parametrize("nchunks", [1, 3])
def test_adc_search_long_lists_exact_with_ties(nq, nchunks):
    # k above ADC_RESERVOIR_MIN_K keeps reservoirs cut by selection, in 4-, 8- and 16-query blocks; every distance
    # appears 20 times, so cuts and the k-th fall among ties, which must go to the smaller row
    k = K.ADC_RESERVOIR_MIN_K + 45
    t = _random_tables(13, nq, 4, 16)
    codes = np.ascontiguousarray(np.tile(_random_codes(14, 150, 4, 16), (20, 1)))
    _assert_adc_search_is_the_reference(t, codes, k, nchunks)


def _assert_adc_search_is_the_reference(t, codes, k, nchunks):
    """adc_search's ids and distances are the k smallest full ADC sums per query, ties to the smaller row."""
    d, i = K.adc_search(t, codes, k, nchunks=nchunks)
    full = K.adc_distances(t, codes)
    for q in range(t.shape[0]):
        order = np.lexsort((np.arange(len(codes)), full[q]))[:k]
        np.testing.assert_array_equal(i[q], order)
        np.testing.assert_array_equal(d[q], full[q, order])


def test_adc_search_large_n_many_chunks_and_query_blocks():
    t = _random_tables(11, 35, 8, 256)
    codes = _random_codes(12, 9000, 8, 256)
    rd, ri = R.pq_adc_search_ref(t[:3], codes, 10)
    for nchunks in (1, 2, 7, None):
        d, i = K.adc_search(t, codes, 10, nchunks=nchunks)
        assert R.pq_topk_agrees(rd, ri, d[:3], i[:3]) is None
        full = K.adc_distances(t, codes)
        for q in range(35):
            order = np.lexsort((np.arange(len(codes)), full[q]))[:10]
            np.testing.assert_array_equal(i[q], order)


def test_adc_search_takes_float64_tables_and_wide_int_codes():
    # 16 queries fill a block exactly, so nothing is padded: the kernel must still read float32 tables, u8 codes
    t = _random_tables(13, 16, 4, 256)
    codes = _random_codes(14, 300, 4, 256)
    want = K.adc_search(t, codes, 5)
    got = K.adc_search(t.astype(np.float64), codes.astype(np.int64), 5)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@given(
    nq=st.integers(0, 40), n=st.integers(0, 70), m=st.integers(1, 6), k=st.integers(1, 12),
    ksub=st.sampled_from([16, 256]), seed=st.integers(0, 2**16), nchunks=st.integers(1, 4),
)
@settings(max_examples=30, deadline=None)
def test_adc_search_hypothesis(nq, n, m, k, ksub, seed, nchunks):
    t = _random_tables(seed, nq, m, ksub)
    codes = _random_codes(seed + 1, n, m, ksub)
    d, i = K.adc_search(t, codes, k, nchunks=nchunks)
    rd, ri = R.pq_adc_search_ref(t, codes, k)
    assert R.pq_topk_agrees(rd, ri, d, i) is None


def test_topk_comparator_rejects_wrong_ids():
    rd = np.array([[1.0, 2.0, 3.0]])
    ri = np.array([[4, 5, 6]])
    assert R.pq_topk_agrees(rd, ri, rd, ri) is None
    assert R.pq_topk_agrees(rd, ri, rd, np.array([[4, 7, 6]])) is not None  # id 7 at rank 1, not a tie
    assert R.pq_topk_agrees(rd, ri, rd, np.array([[4, 5, 9]])) is None  # tie at the k-th distance
    assert R.pq_topk_agrees(rd, ri, rd + 0.5, ri) is not None
    assert R.pq_topk_agrees(rd, ri, rd, np.array([[4, 5, -1]])) is not None
    assert R.pq_topk_agrees(rd, ri, rd, np.array([[5, 4, 6]])) is not None  # swapped, but 1.0 and 2.0 differ


def test_topk_comparator_accepts_float32_ties_inside_the_list():
    # float64 reference: id 1 at 1000 and id 0 at 1000.00001; the float32 kernel rounds both to 1000 and puts
    # the smaller id first. A tie inside the list, not only at the k-th, must be accepted (it was not).
    t = np.zeros((1, 2, 16), np.float32)
    t[0, 0] = 1000
    t[0, 1, 1], t[0, 1, 2] = 1e-5, 5
    codes = np.array([[0, 1], [0, 0], [0, 2]], np.uint8)
    d, i = K.adc_search(t, codes, 3)
    rd, ri = R.pq_adc_search_ref(t, codes, 3)
    assert ri.tolist() == [[1, 0, 2]] and i.tolist() == [[0, 1, 2]]
    assert R.pq_topk_agrees(rd, ri, d, i) is None


# ---- 4-bit ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(0, 4), (1, 1), (31, 3), (33, 16), (100, 7)])
def test_pack_roundtrip_and_layout(n, m):
    codes = _random_codes(13, n, m, 16)
    p = K.pack_codes_4bit(codes)
    assert p.shape == ((n + 31) // 32, (m + 1) // 2, 32) and p.dtype == np.uint8
    np.testing.assert_array_equal(K.unpack_codes_4bit(p, n, m), codes)
    if n:
        r = n - 1
        assert p[r // 32, 0, r % 32] & 15 == codes[r, 0]
        if m > 1:
            assert p[r // 32, 0, r % 32] >> 4 == codes[r, 1]


def test_quantized_luts_within_half_a_step():
    t = _random_tables(14, 4, 7, 16, "wide")
    lut2, scales = K.quantize_luts(t)
    assert lut2.shape == (4, 4, 256) and lut2.dtype == np.uint16
    tp = np.zeros((4, 8, 16))
    tp[:, :7] = t
    mins = tp.min(axis=2)
    byte = np.arange(256)
    for q in range(4):
        for p in range(4):
            exact = tp[q, 2 * p, byte & 15] + tp[q, 2 * p + 1, byte >> 4]
            approx = lut2[q, p] * scales[q] + mins[q, 2 * p] + mins[q, 2 * p + 1]
            assert np.all(np.abs(approx - exact) <= scales[q] * (1 + 1e-6))  # two half-steps
        assert lut2[q].max() <= 2 * 255


@pytest.mark.parametrize("m", [1, 4, 7, 16])
@pytest.mark.parametrize("scale", ["normal", "wide"])
def test_fastscan_exact_mode_matches_reference(m, scale):
    for nq, n, k in [(0, 40, 3), (1, 0, 5), (1, 1, 1), (3, 5, 10), (4, 500, 10), (2, 1000, 1)]:
        t = _random_tables(15 + n, nq, m, 16, scale)
        codes = _random_codes(16 + n, n, m, 16)
        p = K.pack_codes_4bit(codes)
        for nchunks in (1, 3):
            d, i = K.fastscan_search(t, p, n, m, k, 0, nchunks=nchunks)
            assert d.shape == (nq, k) and i.dtype == np.int64 and d.dtype == np.float32
            rd, ri = R.pq_adc_search_ref(t, codes, k)
            assert R.pq_topk_agrees(rd, ri, d, i) is None, (m, nq, n, k, nchunks)
            # and identical to the 8-bit kernel on the unpacked codes
            d8, i8 = K.adc_search(t, codes, k, nchunks=1)
            np.testing.assert_array_equal(d, d8)


@pytest.mark.parametrize("rerank", [1, 4])
def test_fastscan_shortlist_returns_exact_adc_distances(rerank):
    m, n, k = 8, 2000, 10
    t = _random_tables(17, 5, m, 16)
    codes = _random_codes(18, n, m, 16)
    p = K.pack_codes_4bit(codes)
    d, i = K.fastscan_search(t, p, n, m, k, rerank)
    full = K.adc_distances(t, codes)
    assert np.all(i >= 0) and np.all(np.diff(d, axis=1) >= 0)
    np.testing.assert_array_equal(d, np.take_along_axis(full, i, 1))
    # a shortlist is lossy but good: most of the exact top-k is found
    rd, ri = R.pq_adc_search_ref(t, codes, k)
    recall = np.mean([len(set(i[q]) & set(ri[q])) / k for q in range(5)])
    assert recall >= 0.7
    # with a shortlist as long as the data it is exact
    d, i = K.fastscan_search(t, p, n, m, k, n)
    assert R.pq_topk_agrees(rd, ri, d, i) is None


@pytest.mark.parametrize("k", [7, 150])
@pytest.mark.parametrize("nchunks", [None, 1, 3])
def test_fastscan_shortlist_is_the_same_for_every_group_and_tile(nchunks, k):
    # Query groups and code tiles only reorder the work: any group size (dividing nq or not) and any tile
    # (odd, one block, more than all blocks) must give the same ids and distances as one query at a time;
    # k = 150 keeps 450-row shortlists, reservoirs cut many times in every order
    m, n = 6, 3000  # 94 blocks, the last one partial
    t = _random_tables(21, 37, m, 16, "wide")
    codes = _random_codes(22, n, m, 16)
    p = K.pack_codes_4bit(codes)
    want_d, want_i = K.fastscan_search(t, p, n, m, k, 3, nchunks=nchunks, group=1, tile_blocks=10**9)
    full = K.adc_distances(t, codes)
    np.testing.assert_array_equal(want_d, np.take_along_axis(full, want_i, 1))
    for group, tile in [(None, None), (16, None), (5, 1), (37, 3), (64, 7), (2, 200)]:
        d, i = K.fastscan_search(t, p, n, m, k, 3, nchunks=nchunks, group=group, tile_blocks=tile)
        np.testing.assert_array_equal(i, want_i, err_msg=f"group={group} tile={tile}")
        np.testing.assert_array_equal(d, want_d)


@pytest.mark.parametrize("nchunks", [1, 3])
def test_fastscan_long_lists_match_the_reference(nchunks):
    # lists longer than RESERVOIR_MIN_L are reservoirs cut by selection, in exact mode and in shortlist mode; many
    # rows share each quantised sum (16 codes per sub-table, m = 3), so cuts fall among ties
    m, n = 3, 3000
    t = _random_tables(31, 4, m, 16)
    codes = _random_codes(32, n, m, 16)
    p = K.pack_codes_4bit(codes)
    k = 2 * K.RESERVOIR_MIN_L + 7
    d, i = K.fastscan_search(t, p, n, m, k, 0, nchunks=nchunks)
    rd, ri = R.pq_adc_search_ref(t, codes, k)
    assert R.pq_topk_agrees(rd, ri, d, i) is None
    full = K.adc_distances(t, codes)
    for rerank in (1, 3):
        d, i = K.fastscan_search(t, p, n, m, k, rerank, nchunks=nchunks)
        assert np.all(i >= 0)
        np.testing.assert_array_equal(d, np.take_along_axis(full, i, 1))
        assert all(len(set(r)) == k for r in i.tolist())
        order = np.lexsort((i, d), axis=-1)  # ascending exact sums, ties to the smaller row
        np.testing.assert_array_equal(order, np.tile(np.arange(k), (4, 1)))


@pytest.mark.parametrize("k,rerank", [(10, 4), (60, 3), (150, 2)])
@pytest.mark.parametrize("nchunks", [1, 3])
def test_fastscan_shortlist_matches_a_numpy_replay(k, rerank, nchunks):
    # the shortlist is the L = rerank·k rows of smallest (quantised sum, row), the sums from the same u8 tables the
    # scan uses (its clip and quantisation, replayed here in NumPy), re-scored exactly and ranked by (sum, row):
    # sorted arrays (L <= RESERVOIR_MIN_L) and reservoirs alike
    m, n, nq = 5, 4000, 3
    t = _random_tables(35, nq, m, 16)
    codes = _random_codes(36, n, m, 16)
    p = K.pack_codes_4bit(codes)
    flat, mp2 = p.reshape(-1), p.shape[1]
    d, i = K.fastscan_search(t, p, n, m, k, rerank, nchunks=nchunks)
    full = K.adc_distances(t, codes)
    L = rerank * k
    for q in range(nq):
        lut8 = np.empty(2 * mp2 * 16, np.uint8)
        K._quantize_one(t[q], 2 * mp2, lut8, K._shortlist_cap(t[q], flat, n, m, mp2, k)[0])
        qsum = lut8[16 * np.arange(m)[None, :] + codes.astype(np.int64)].astype(np.int64).sum(1)
        short = np.lexsort((np.arange(n), qsum))[:L]
        best = short[np.lexsort((short, full[q, short]))][:k]
        np.testing.assert_array_equal(i[q], best)
        np.testing.assert_array_equal(d[q], full[q, best])


@pytest.mark.parametrize("k,rerank", [(8, 3), (50, 4), (40, 2)])
def test_fastscan_bounds_keep_the_top_k_where_the_clip_sample_is_every_row(k, rerank):
    # n = CAP_SAMPLE·k: the clip's sample is every row, so its U is the exact k-th smallest excess and the bound the
    # scan starts from (_sample_bound) lies a rounding margin above the k-th sum; each query's answer must still be
    # the exact top k of the L rows with the smallest (quantised sum, row), as the NumPy replay finds them
    m = 6
    n = K.CAP_SAMPLE * k
    for seed in range(6):
        t = _random_tables(60 + seed, 4, m, 16)
        if seed % 2:
            t = np.round(t * 8) / 8  # few distinct sums: ties at the bounds
        codes = _random_codes(70 + seed, n, m, 16)
        p = K.pack_codes_4bit(codes)
        flat, mp2 = p.reshape(-1), p.shape[1]
        d, i = K.fastscan_search(t, p, n, m, k, rerank)
        full = K.adc_distances(t, codes)
        for q in range(t.shape[0]):
            lut8 = np.empty(2 * mp2 * 16, np.uint8)
            K._quantize_one(t[q], 2 * mp2, lut8, K._shortlist_cap(t[q], flat, n, m, mp2, k)[0])
            qsum = lut8[16 * np.arange(m)[None, :] + codes.astype(np.int64)].astype(np.int64).sum(1)
            short = np.lexsort((np.arange(n), qsum))[: rerank * k]
            best = short[np.lexsort((short, full[q, short]))][:k]
            np.testing.assert_array_equal(i[q], best)


def _replay_shortlist_answer(t, codes, flat, mp2, k, L):
    """(ids, distances) the shortlist mode must return for one query's table ``t``: the exact top k of the L rows of
    smallest (quantised sum, row), the sums from the scan's clip and quantisation replayed in NumPy; and the sums."""
    n, m = codes.shape
    lut8 = np.empty(2 * mp2 * 16, np.uint8)
    K._quantize_one(t, 2 * mp2, lut8, K._shortlist_cap(t, flat, n, m, mp2, k)[0])
    qsum = lut8[16 * np.arange(m)[None, :] + codes.astype(np.int64)].astype(np.int64).sum(1)
    exact = K.adc_distances(t[None], codes)[0]
    short = np.lexsort((np.arange(n), qsum))[:L]
    best = short[np.lexsort((short, exact[short]))][:k]
    return best, exact[best], qsum, lut8


@pytest.mark.parametrize("k,rerank", [(150, 2), (100, 4)])
def test_fastscan_rescans_a_query_whose_guessed_bound_was_too_low(k, rerank):
    # The scan starts from a guess at its final bound taken from the clip's sampled blocks (_optimistic_bound). Here
    # the sampled blocks hold the only good rows (codes 0-1; every other row codes 2-15), so the sample promises far
    # more good rows than there are, the guess lies below the L-th smallest sum, and the query must be scanned again
    # from the proven bound: the answer is still the replay's. (The guess is checked to have been too low.)
    m, nb = 4, 400
    n = 32 * nb
    g = np.random.default_rng(3)
    t = np.sort(g.random((3, m, 16)), axis=2).astype(np.float32)  # code 0 smallest in every sub-table
    codes = g.integers(2, 16, (n, m)).astype(np.uint8)
    L = rerank * k
    f = -(-K.CAP_SAMPLE * k // 32)  # the clip's blocks (_shortlist_cap), spread evenly
    for i in range(f):
        blk = (i * nb) // f
        codes[32 * blk : 32 * blk + 32] = g.integers(0, 2, (32, m))
    p = K.pack_codes_4bit(codes)
    flat, mp2 = p.reshape(-1), p.shape[1]
    d, i = K.fastscan_search(t, p, n, m, k, rerank, nchunks=1)
    for q in range(t.shape[0]):
        best, dist, qsum, lut8 = _replay_shortlist_answer(t[q], codes, flat, mp2, k, L)
        np.testing.assert_array_equal(i[q], best)
        np.testing.assert_array_equal(d[q], dist)
        clip, u, est_k, est_l = K._shortlist_cap(t[q], flat, n, m, mp2, k, L)
        scale, sumabs = K._quantize_one(t[q], 2 * mp2, np.empty_like(lut8), clip)
        margin = K._shortlist_margin(t[q], m, scale, sumabs)
        guess = K._optimistic_bound(est_k, est_l, scale, m, margin)
        srt = np.sort(qsum)
        assert guess <= min(srt[L - 1], srt[k - 1] + margin) < K._sample_bound(u, scale, m, margin)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 2500), m=st.integers(1, 9), k=st.integers(1, 180), rerank=st.integers(1, 5),
       nchunks=st.sampled_from([1, 2, 3]), ties=st.booleans(), wide=st.booleans(), seed=st.integers(0, 2**16))
def test_fastscan_shortlist_replay_hypothesis(n, m, k, rerank, nchunks, ties, wide, seed):
    # any shape: the answer is the exact top k of the L = rerank·k rows of smallest (quantised sum, row), whatever
    # the bounds prune on the way (sorted arrays and reservoirs, cuts, several chunks, ties, n not a multiple of 32)
    t = _random_tables(seed, 3, m, 16, "wide" if wide else "normal")
    if ties:
        t = np.round(t * 4) / 4
    codes = _random_codes(seed + 1, n, m, 16)
    p = K.pack_codes_4bit(codes)
    flat, mp2 = p.reshape(-1), p.shape[1]
    d, i = K.fastscan_search(t, p, n, m, k, rerank, nchunks=nchunks)
    full = K.adc_distances(t, codes)
    L = min(rerank, -(-n // k)) * k
    for q in range(t.shape[0]):
        lut8 = np.empty(2 * mp2 * 16, np.uint8)
        K._quantize_one(t[q], 2 * mp2, lut8, K._shortlist_cap(t[q], flat, n, m, mp2, k)[0])
        qsum = lut8[16 * np.arange(m)[None, :] + codes.astype(np.int64)].astype(np.int64).sum(1)
        short = np.lexsort((np.arange(n), qsum))[:L]
        best = short[np.lexsort((short, full[q, short]))][:k]
        np.testing.assert_array_equal(i[q, : best.size], best)
        assert np.all(i[q, best.size :] == -1)


@pytest.mark.parametrize("case", ["nan", "overflow"])
@pytest.mark.parametrize("nchunks", [1, 3])
def test_fastscan_bound_prunes_nothing_where_it_cannot_hold(case, nchunks):
    # (review) the pruning bound assumes the k rows of smallest quantised sums sum exactly to finite numbers: a NaN
    # entry quantises low but sums to NaN (ranked last), and sums beyond float32 tie at inf (ranked by row); both
    # lost top-k rows to the bound. The answer must stay the exact top k of the L = rerank·k rows of smallest
    # (quantised sum, row), as the NumPy replay finds them
    g = np.random.default_rng(1)
    n, k, rerank = 2000, 10, 8
    if case == "nan":
        m = 4
        t = g.standard_normal((1, m, 16)).astype(np.float32)
        t[0, 0, 3] = np.nan
    else:
        m = 2
        t = np.empty((1, m, 16), np.float32)
        t[0, 0] = 2e38 + np.arange(16) * 0.5e37
        t[0, 1] = t[0, 0, ::-1]
    codes = g.integers(0, 16, (n, m)).astype(np.uint8)
    p = K.pack_codes_4bit(codes)
    flat, mp2 = p.reshape(-1), p.shape[1]
    with np.errstate(over="ignore", invalid="ignore"):
        d, i = K.fastscan_search(t, p, n, m, k, rerank, nchunks=nchunks)
        full = K.adc_distances(t, codes)
    lut8 = np.empty(2 * mp2 * 16, np.uint8)
    K._quantize_one(t[0], 2 * mp2, lut8, K._shortlist_cap(t[0], flat, n, m, mp2, k)[0])
    qsum = lut8[16 * np.arange(m)[None, :] + codes.astype(np.int64)].astype(np.int64).sum(1)
    short = np.lexsort((np.arange(n), qsum))[: rerank * k]
    best = short[np.lexsort((short, full[0, short]))][:k]
    np.testing.assert_array_equal(i[0], best)


def test_fastscan_long_rescore_ranks_nan_sums_last():
    # a NaN table entry makes some rows' exact sums NaN: the long-list re-score (k > RESCORE_PUSH_MAX_K) then ranks
    # them last, like np.lexsort, ties by row; shortlists hold every row here
    m, n, k = 3, 700, 40
    t = np.round(_random_tables(37, 2, m, 16) * 4) / 4
    t[0, 1, 3] = np.nan
    codes = _random_codes(38, n, m, 16)
    codes[:600, 1] = np.where(codes[:600, 1] == 3, 4, codes[:600, 1])  # (most rows avoid the NaN entry)
    p = K.pack_codes_4bit(codes)
    full = K.adc_distances(t, codes)
    d, i = K.fastscan_search(t, p, n, m, k, n // k + 1)
    for q in range(2):
        want = np.lexsort((np.arange(n), full[q]))[:k]
        np.testing.assert_array_equal(i[q], want)
        np.testing.assert_array_equal(d[q], full[q, want])


def test_fastscan_rescore_by_sort_equals_rescore_by_insertion():
    # shortlists holding every row, re-scored for k = 20 (insertion into the list) and k = 40 (two sorts, above
    # RESCORE_PUSH_MAX_K): the first 20 of the longer answer are the shorter one, ties included
    m, n = 4, 1500
    t = np.round(_random_tables(33, 6, m, 16) * 4) / 4  # few distinct sums: exact ties
    codes = _random_codes(34, n, m, 16)
    p = K.pack_codes_4bit(codes)
    assert 20 <= K.RESCORE_PUSH_MAX_K < 40
    for nchunks in (1, 2):
        d20, i20 = K.fastscan_search(t, p, n, m, 20, n // 20, nchunks=nchunks)
        d40, i40 = K.fastscan_search(t, p, n, m, 40, n // 40 + 1, nchunks=nchunks)
        np.testing.assert_array_equal(i40[:, :20], i20)
        np.testing.assert_array_equal(d40[:, :20], d20)


def test_fastscan_handles_constant_and_tied_tables():
    m, n, k = 4, 70, 5
    t = np.ones((2, m, 16), dtype=np.float32)  # every row ties: ids 0..4
    codes = _random_codes(19, n, m, 16)
    p = K.pack_codes_4bit(codes)
    for rerank in (0, 1, 2):
        d, i = K.fastscan_search(t, p, n, m, k, rerank)
        np.testing.assert_array_equal(i, np.tile(np.arange(k), (2, 1)))
        np.testing.assert_array_equal(d, np.full((2, k), 4.0, np.float32))


@pytest.mark.parametrize("n,dim,m,ksub", [(0, 4, 2, 16), (1, 7, 7, 16), (67, 12, 3, 5), (9000, 24, 3, 256)])
def test_centroid_sums_match_bincount(n, dim, m, ksub):
    rng = np.random.default_rng(n + dim)
    x = _data(9 + n, n, dim, "wide")
    codes = rng.integers(0, ksub, (n, m)).astype(np.uint8)
    sums, counts = K.pq_centroid_sums(x, codes, ksub)
    dsub = dim // m
    assert sums.shape == (m, ksub, dsub) and counts.shape == (m, ksub)
    for j in range(m):
        np.testing.assert_array_equal(counts[j], np.bincount(codes[:, j], minlength=ksub))
        for d in range(dsub):
            ref = np.bincount(codes[:, j], weights=x[:, j * dsub + d].astype(np.float64), minlength=ksub)
            np.testing.assert_allclose(sums[j, :, d], ref, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("n,dim,m,ksub", [(0, 4, 2, 16), (1, 7, 7, 16), (67, 12, 3, 5), (5000, 24, 3, 256)])
def test_code_row_sums_match_a_numpy_reference(n, dim, m, ksub):
    rng = np.random.default_rng(n + dim + 1)
    x = _data(11 + n, n, dim, "wide")
    codes = rng.integers(0, ksub, (n, m)).astype(np.uint8)
    sums = K.pq_code_row_sums(x, codes, ksub)
    assert sums.shape == (m, ksub, dim) and sums.dtype == np.float64
    for j in range(m):
        onehot = np.zeros((n, ksub))
        onehot[np.arange(n), codes[:, j]] = 1.0
        np.testing.assert_allclose(sums[j], onehot.T @ x.astype(np.float64), rtol=1e-12, atol=1e-9)


def test_opq_procrustes_from_code_sums_equals_the_direct_formula():
    from kvant.quant.opq import procrustes

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 12)).astype(np.float32) * np.linspace(0.1, 5, 12).astype(np.float32)
    books = rng.standard_normal((3, 16, 4)).astype(np.float32)
    codes = rng.integers(0, 16, (3000, 3)).astype(np.uint8)
    y = books[np.arange(3), codes].reshape(3000, 12).astype(np.float64)
    u, _, vt = np.linalg.svd(x.astype(np.float64).T @ y)
    r = procrustes(x, codes, books)
    np.testing.assert_allclose(r, u @ vt, atol=1e-10)
    np.testing.assert_allclose(r.T @ r, np.eye(12), atol=1e-12)


@pytest.mark.parametrize("ksub", [5, 6, 16])  # portable encoder (5; 6 with AVX-512) and lanes encoder (16)
def test_encode_accepts_float64_codebooks(ksub):
    x = np.random.default_rng(0).standard_normal((70, 8)).astype(np.float32)
    cb = np.random.default_rng(1).standard_normal((2, ksub, 4))  # float64, as a caller may pass
    np.testing.assert_array_equal(K.pq_encode(x, cb), R.pq_encode_ref(x, cb.astype(np.float32)))


@numba.njit
def _fs_blocks_both(flat, bbytes, lut8, mp2, th):
    one = np.empty((2, 64), np.uint16)
    two = np.empty(64, np.uint16)
    m0 = K._fs_block(one[0], flat, 0, bbytes, lut8, mp2, th)
    m1 = K._fs_block(one[1], flat, bbytes, bbytes, lut8, mp2, th)
    m2 = K._fs_block2(two, flat, 0, bbytes, lut8, mp2, th)
    return one, two, m0, m1, m2


@pytest.mark.parametrize("m", [2, 7, 32])
def test_fastscan_two_block_scan_equals_two_one_block_scans(m):
    # the 64-row scan (one 512-bit shuffle per lookup on AVX-512 hosts) must give the 32-row scan's sums and mask
    codes = _random_codes(40 + m, 64, m, 16)
    p = K.pack_codes_4bit(codes)
    flat = p.reshape(-1)
    mp2 = p.shape[1]
    lut8 = np.random.default_rng(m).integers(0, 256, mp2 * 32).astype(np.uint8)
    want = np.zeros(64, np.int64)
    for j in range(2 * mp2):
        code = codes[:, j].astype(np.int64) if j < m else np.zeros(64, np.int64)
        want += lut8[32 * (j // 2) + 16 * (j & 1) + code]
    for th in (-1, int(np.median(want)), 70000):
        one, two, m0, m1, m2 = _fs_blocks_both(flat, mp2 * 32, lut8, mp2, th)
        np.testing.assert_array_equal(one[:, :32].reshape(-1), want)
        np.testing.assert_array_equal(two, want)
        bits = want <= min(max(th, 0), 65535)
        assert m2 & (2**64 - 1) == m0 | (m1 << 32)
        assert [(m2 >> r) & 1 for r in range(64)] == bits.astype(int).tolist()


def test_ip_tables_hold_under_cancellation():
    # |q| = 1e3 with q·c ≈ 1: a float32 sum of the products lost up to ~5%; float64 sums of exact products do not
    rng = np.random.default_rng(2)
    q = np.array([[1000.0, -1000.0, 3.0, -3.0]], np.float32)
    cb = (np.array([1000.0, 1000.0])[None, None, :] + rng.standard_normal((2, 256, 2)) * 1e-3).astype(np.float32)
    got = K.ip_tables(q, cb).astype(np.float64)
    ref = R.pq_ip_tables_ref(q, cb)
    assert np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref))) <= 1e-6


def test_fastscan_shortlist_clip_is_not_set_by_the_first_rows():
    # (review) The clip was set from the first k rows; when those use a far codeword the cap is huge, every other
    # entry rounds to 0, and the shortlist was the next rerank*k rows scanned: 1 of the exact top 10. The clip now
    # comes from the k-th smallest sum of rows spread over the codes.
    m, n, k = 16, 1024, 10
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (n, m)).astype(np.uint8)
    codes[:, 0] = 0
    codes[:k, 0] = 15
    t = rng.random((3, m, 16)).astype(np.float32)
    t[:, 0, :] = 0
    t[:, 0, 15] = 1000.0
    p = K.pack_codes_4bit(codes)
    want_d, want_i = K.adc_search(t, codes, k)
    plain = t.copy()
    plain[:, 0, 15] = 0.0  # the same tables without the far codeword: the recall the shortlist has anyway
    plain_i = K.adc_search(plain, codes, k)[1]
    for rerank in (1, 4, 16):
        for nchunks in (1, 3):
            d, i = K.fastscan_search(t, p, n, m, k, rerank, nchunks=nchunks)
            recall = np.mean([len(set(i[q]) & set(want_i[q])) / k for q in range(3)])
            base = K.fastscan_search(plain, p, n, m, k, rerank, nchunks=nchunks)[1]
            plain_recall = np.mean([len(set(base[q]) & set(plain_i[q])) / k for q in range(3)])
            assert recall >= plain_recall - 0.05 and recall >= 0.9, (rerank, recall, plain_recall)  # was 0.1
            np.testing.assert_array_equal(d, np.take_along_axis(K.adc_distances(t, codes), i, 1))


@pytest.mark.parametrize("m", [2, 16, 64])
def test_fastscan_shortlist_rows_with_a_clipped_entry_never_tie_with_the_top_k(m):
    # (review) Rows holding a far codeword were clipped to exactly U − Σ min above their minimum: quantised, they tied
    # with the rows at U, came first in the scan and filled the shortlist (30 such rows beside 10 at distance 1:
    # recall 0). The clip now sits far enough above U that their quantised sums exceed every row within U.
    t = np.zeros((1, m, 16), np.float32)
    t[0, 0, 1] = 1e4
    t[0, 1] = np.linspace(0.0, 1.0, 16)
    codes = np.zeros((40, m), np.uint8)
    codes[:30, 0] = 1
    codes[30:, 1] = 15
    d, i = K.fastscan_search(t, K.pack_codes_4bit(codes), 40, m, 10, 2)
    assert sorted(i[0].tolist()) == list(range(30, 40)) and np.all(d == 1.0)


@pytest.mark.parametrize("m", [1, 2, 16])
def test_fastscan_shortlist_finds_stored_copies_of_the_query(m):
    # (review) When a sampled row sat at every sub-table's minimum (the query is a stored code, or many copies of it
    # are), the clip was 0: every entry rounded to 0 and the shortlist was the first rows scanned (none of 4,000
    # copies of the query returned; a stored vector searched for itself returned row 0).
    rng = np.random.default_rng(m)
    n, k = 3000, 10
    t = rng.random((1, m, 16)).astype(np.float32)
    codes = rng.integers(0, 16, (n, m)).astype(np.uint8)
    best = np.argmin(t[0], axis=1).astype(np.uint8)
    codes[(codes == best).all(axis=1), 0] ^= 1  # no other row at the query's best code
    copies = np.arange(1000, n, 5)  # the copies include sampled rows (every 75th) but not the first rows scanned
    codes[copies] = best
    p = K.pack_codes_4bit(codes)
    want_d, want_i = K.adc_search(t, codes, k)
    assert set(want_i[0]) <= set(copies.tolist())
    for rerank in (1, 4):
        for nchunks in (1, 3):
            d, i = K.fastscan_search(t, p, n, m, k, rerank, nchunks=nchunks)
            np.testing.assert_array_equal(d, want_d)  # every returned row is a copy of the query's best code
            np.testing.assert_array_equal(i, want_i)  # and ties keep the smaller rows


@pytest.mark.parametrize("rerank", [1, 2, 4])
def test_fastscan_shortlist_does_not_depend_on_the_chunk_count(rerank):
    # (review) Each chunk of codes re-scored its own shortlist, so the result depended on the chunk count and with it on
    # the batch size (68 of 300 queries changed ids at rerank=1 between single and batched search). The chunks' lists
    # are now merged into the one shortlist a single chunk keeps before re-scoring.
    m, n, k = 8, 20000, 10
    t = _random_tables(31, 40, m, 16, "wide")
    codes = _random_codes(32, n, m, 16)
    p = K.pack_codes_4bit(codes)
    want_d, want_i = K.fastscan_search(t, p, n, m, k, rerank, nchunks=1)
    for nchunks in (2, 3, 7, 64):
        d, i = K.fastscan_search(t, p, n, m, k, rerank, nchunks=nchunks)
        np.testing.assert_array_equal(i, want_i, err_msg=f"nchunks={nchunks}")
        np.testing.assert_array_equal(d, want_d)
    for q in (0, 17, 39):  # one query alone (the default split then differs from the batch's)
        d, i = K.fastscan_search(t[q:q + 1], p, n, m, k, rerank)
        np.testing.assert_array_equal(i[0], want_i[q])


def test_fastscan_small_batches_match_one_query_at_a_time():
    # Batches of up to FASTSCAN_SMALL_BATCH queries split the codes (few queries per thread) or the queries among
    # the threads, and with one chunk re-score inside the scan: every split gives one query's own answer.
    m, n, k = 8, 12000, 10  # 375 blocks: enough for the code split
    t = _random_tables(33, K.FASTSCAN_SMALL_BATCH, m, 16, "wide")
    p = K.pack_codes_4bit(_random_codes(34, n, m, 16))
    want = [K.fastscan_search(t[q:q + 1], p, n, m, k, 4, nchunks=1) for q in range(t.shape[0])]
    before = numba.get_num_threads()
    try:
        top = numba.config.NUMBA_NUM_THREADS
        for threads in sorted({1, min(2, top), top}):
            numba.set_num_threads(threads)
            for nq in (2, 5, 8, 13, K.FASTSCAN_SMALL_BATCH):
                d, i = K.fastscan_search(t[:nq], p, n, m, k, 4)
                for q in range(nq):
                    np.testing.assert_array_equal(i[q], want[q][1][0], err_msg=f"threads={threads} nq={nq}")
                    np.testing.assert_array_equal(d[q], want[q][0][0])
    finally:
        numba.set_num_threads(before)


def test_fastscan_exact_mode_on_huge_tables_with_no_spread():
    # (review) m·max|t| / scale overflowed the int64 slack to a negative bound: no row passed, all -1 / inf
    m, n, k = 8, 40, 5
    codes = np.random.default_rng(0).integers(0, 16, (n, m)).astype(np.uint8)
    p = K.pack_codes_4bit(codes)
    t1 = np.full((1, m, 16), 1e25, np.float32)  # all entries tie
    t2 = (np.random.default_rng(1).random((1, m, 16)) * 1e-3).astype(np.float32)
    t2[0, 0, :] = 1e30  # one constant huge sub-table
    for t in (t1, t2):
        want_d, want_i = K.adc_search(t, codes, k)
        for rerank in (0, 4):
            d, i = K.fastscan_search(t, p, n, m, k, rerank)
            np.testing.assert_array_equal(d, want_d)
            if rerank == 0:
                np.testing.assert_array_equal(i, want_i)
            else:  # the float32 sums of t2 all round to 1e30; the shortlist keeps the rows whose small parts are
                # smallest (closer in exact arithmetic), so the ids among those float32 ties may differ from 0..4
                assert R.pq_topk_agrees(want_d, want_i, d, i) is None


def test_sums_that_overflow_to_inf_are_results_not_padding():
    # (review) finite entries whose float32 sums overflow: rows 0..2 at +inf, ranked before any padding
    t = np.full((1, 2, 16), 2e38, np.float32)
    codes = np.zeros((3, 2), np.uint8)
    p = K.pack_codes_4bit(codes)
    for nchunks in (1, 2):
        d, i = K.adc_search(t, codes, 3, nchunks=nchunks)
        np.testing.assert_array_equal(i, [[0, 1, 2]])
        assert np.all(np.isinf(d))
        d, i = K.adc_search(t, codes, 5, nchunks=nchunks)  # n < k: padding after the real rows
        np.testing.assert_array_equal(i, [[0, 1, 2, -1, -1]])
        for rerank in (0, 1, 4):
            d, i = K.fastscan_search(t, p, 3, 2, 3, rerank, nchunks=nchunks)
            np.testing.assert_array_equal(i, [[0, 1, 2]])
    # mixed: finite rows first, then the overflowing ones, then padding
    t = np.zeros((1, 2, 16), np.float32)
    t[0, :, 1] = 2e38
    codes = np.array([[1, 1], [0, 0], [1, 1], [0, 1]], np.uint8)
    d, i = K.adc_search(t, codes, 6)
    np.testing.assert_array_equal(i, [[1, 3, 0, 2, -1, -1]])
    for rerank in (0, 4):
        d, i = K.fastscan_search(t, K.pack_codes_4bit(codes), 4, 2, 6, rerank)
        np.testing.assert_array_equal(i, [[1, 3, 0, 2, -1, -1]])


@pytest.mark.parametrize("few", [0, 64])
@pytest.mark.parametrize("nchunks", [None, 1, 5])
def test_adc_search_query_by_query_and_block_paths_agree(monkeypatch, few, nchunks):
    # ADC_FEW_QUERIES = 64 sends every nq below through the one-query kernel, 0 sends all through 16-query blocks
    # (whose padding lanes must never take a row): same ids and distances as the reference either way, ties included.
    monkeypatch.setattr(K, "ADC_FEW_QUERIES", few)
    base = _random_codes(21, 700, 6, 256)
    # repeated rows: ties; 1,003 rows, so the one-query kernel's chunks end in rows it sums one at a time
    spread = np.ascontiguousarray(np.vstack([base, base[:303]]))
    # each row three times in a row: ties among neighbours, which the one-query kernel sums side by side
    adjacent = np.ascontiguousarray(np.repeat(base[:334], 3, axis=0)[:1001])
    for codes in (spread, adjacent):
        for nq in (1, 2, 3, 7, 17):
            t = _random_tables(22 + nq, nq, 6, 256)
            for k in (9, 10):  # (k = 10 ends the list inside a run of three ties)
                _assert_adc_search_is_the_reference(t, codes, k, nchunks)


@pytest.mark.parametrize("ksub", [5, 16])  # portable encoder, lanes encoder
def test_encode_flags_the_rows_at_or_above_the_limit(ksub):
    rng = np.random.default_rng(ksub)
    x = rng.standard_normal((300, 12)).astype(np.float32)
    x[[3, 64, 65, 299], [0, 11, 5, 7]] = [2.0**56, -2.0**56, 3e38, np.nextafter(np.float32(2.0**56), 0)]
    cb = rng.standard_normal((3, ksub, 4)).astype(np.float32)
    codes, far = K.pq_encode_flagged(x, cb, 2.0**56)
    np.testing.assert_array_equal(far, (np.abs(x.astype(np.float64)) >= 2.0**56).any(axis=1))
    assert far.sum() == 3
    np.testing.assert_array_equal(codes, K.pq_encode(x, cb))
    assert not K.pq_encode_flagged(x, cb, np.inf)[1].any()


@pytest.mark.parametrize("scale", ["normal", "wide"])
def test_serial_and_parallel_tables_and_rescore_are_bit_identical(scale, monkeypatch):
    # small batches build tables and re-score shortlists on the calling thread; the same operations as the parallel
    # kernels, so the outputs are bit-identical
    cb = _codebooks(1, 6, 16, 5, scale)
    q = _data(3, 11, 30, scale)
    outs = {}
    for name, work, queries in (("serial", 1 << 62, 1 << 30), ("parallel", 0, 0)):
        monkeypatch.setattr(K, "SERIAL_TABLE_WORK", work)
        monkeypatch.setattr(K, "SERIAL_RESCORE_QUERIES", queries)
        t = K.distance_tables_l2(q, cb)
        codes = _random_codes(4, 900, 6, 16)
        outs[name] = (t, K.ip_tables(q, cb), *K.fastscan_search(t, K.pack_codes_4bit(codes), 900, 6, 5, 3, nchunks=3))
    for a, b in zip(outs["serial"], outs["parallel"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert _rel_err(outs["serial"][0], R.pq_distance_tables_l2_ref(q, cb)) <= TOL


@pytest.mark.parametrize("nchunks", [1, 3])
def test_adc_narrow_blocks_equal_16_wide_blocks(monkeypatch, nchunks):
    # batches of 2-8 queries interleave their tables 4 or 8 wide: ids and distances must be those of 16-wide blocks and
    # of the reference, ties included, for row counts that are not multiples of the kernels' four-row steps
    base = _random_codes(31, 403, 5, 256)
    codes = np.ascontiguousarray(np.vstack([base, base[:150]]))  # repeated rows: ties
    for nq in (2, 3, 4, 5, 8, 9):
        t = _random_tables(40 + nq, nq, 5, 256)
        assert K._adc_lanes(nq) == (4 if nq <= 4 else 8 if nq <= 8 else 16)
        d, i = K.adc_search(t, codes, 7, nchunks=nchunks)
        with monkeypatch.context() as mp:
            mp.setattr(K, "_adc_lanes", lambda nq: 16)
            wd, wi = K.adc_search(t, codes, 7, nchunks=nchunks)
        np.testing.assert_array_equal(i, wi)
        np.testing.assert_array_equal(d, wd)
        full = K.adc_distances(t, codes)
        for q in range(nq):
            order = np.lexsort((np.arange(len(codes)), full[q]))[:7]
            np.testing.assert_array_equal(i[q], order)


@pytest.mark.parametrize("k", [1, 7, 10, 64])
def test_shortlist_clip_by_insertion_equals_by_sorting(k, monkeypatch):
    # the compiled clip keeps the k smallest sampled sums by insertion (k <= 64); the plain-Python function with the
    # threshold at 0 sorts them: the same clip, ties and duplicate sums included
    g = np.random.default_rng(k)
    m, n = 7, 3000
    codes = _random_codes(k + 1, n, m, 16)
    codes[::5] = codes[0]  # duplicate rows: tied sums among the samples
    p = K.pack_codes_4bit(codes)
    with_nan = _random_tables(k + 3, 3, m, 16, "wide")
    with_nan[:, 0, 1] = np.nan  # (a review: NaN sums stuck in their insertion slot and set the clip from a wrong sum)
    with_nan[1, 2, 5] = np.inf
    with_nan[1, 3, 5] = -np.inf
    tables = (_random_tables(k + 2, 3, m, 16, "wide"), np.round(g.standard_normal((3, m, 16)) * 3).astype(np.float32),
              with_nan)
    for t in tables:
        want = [K._shortlist_cap(t[q], p.reshape(-1), n, m, p.shape[1], k)[0] for q in range(t.shape[0])]
        with monkeypatch.context() as mp, np.errstate(invalid="ignore"):  # (NaN arithmetic in plain Python)
            mp.setattr(K, "_CAP_SMALL_K", 0)
            mp.setattr(K, "_CAP_PAIRS_FROM_K", 1 << 30)  # (the compiled k <= 64 sums entry by entry too)
            got = [K._shortlist_cap.py_func(t[q], p.reshape(-1), n, m, p.shape[1], k)[0] for q in range(t.shape[0])]
        np.testing.assert_array_equal(got, want)  # (NaN clips compare equal here)


@pytest.mark.parametrize("m", [5, 8])
def test_shortlist_clip_by_byte_pairs_equals_entry_by_entry(m, monkeypatch):
    # long lists sum the sampled rows' excesses one code byte (two entries) at a time; entry by entry gives the same
    # clip up to float64 rounding, odd m (a padding nibble) included
    k, n = 150, 5000
    codes = _random_codes(m, n, m, 16)
    p = K.pack_codes_4bit(codes)
    t = _random_tables(m + 1, 3, m, 16, "wide")
    assert k >= K._CAP_PAIRS_FROM_K
    for q in range(t.shape[0]):
        got = K._shortlist_cap(t[q], p.reshape(-1), n, m, p.shape[1], k)
        with monkeypatch.context() as mp:
            mp.setattr(K, "_CAP_PAIRS_FROM_K", 1 << 30)
            want = K._shortlist_cap.py_func(t[q], p.reshape(-1), n, m, p.shape[1], k)
        np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("rerank", [1, 4])
def test_shortlist_clip_keeps_a_row_whose_excess_hides_beside_a_huge_entry(rerank):
    # (review) the clip was a float32 ADC sum minus Σ min: a sampled row at the minimum of a 1e9 sub-table lost the
    # other sub-table's excess (0.31 under a float32 ulp of 64), the clip fell to the smallest excess, every row
    # tied on its quantised sum and the shortlist returned the first row instead of the true top-1 (row 16)
    v = np.arange(16.0)
    t = np.empty((1, 2, 16), np.float32)
    t[0, 0] = 1e9 + 1e7 * v
    t[0, 1] = v / 16.0
    codes = np.full((64, 2), (3, 0), np.uint8)
    codes[0], codes[16], codes[40] = (1, 0), (0, 5), (0, 15)
    d, i = K.fastscan_search(t, K.pack_codes_4bit(codes), 64, 2, 1, rerank)
    assert int(np.asarray(i).reshape(-1)[0]) == 16


def test_shortlist_meets_its_contract_on_sub_tables_of_wildly_different_scales():
    # (review) per-sub-table scales of 10^±30: 90 shortlist results violated the harness's contract
    from kvant.bench.kernels import shortlist_agrees

    rng = np.random.default_rng(5)
    for _ in range(300):
        m, n, k = int(rng.choice([1, 2, 3, 16])), int(rng.choice([5, 33, 64, 200])), int(rng.choice([1, 3, 10]))
        if k > n:
            continue
        t = ((rng.standard_normal((2, m, 16)) ** 2) * 10.0 ** rng.integers(-30, 30, (2, m, 1))).astype(np.float32)
        codes = rng.integers(0, 16, (n, m)).astype(np.uint8)
        rd, ri = R.pq_adc_search_ref(t, codes, k)
        full = R.pq_adc_distances_ref(t, codes)
        d, i = K.fastscan_search(t, K.pack_codes_4bit(codes), n, m, k, 1)
        assert shortlist_agrees(t, rd, ri, np.asarray(d), np.asarray(i), full, n) is None


def test_encode_far_mask_reads_float32_whatever_the_input_dtype():
    # (review) the mask read x.view(int32): for float64 or int64 rows it tested halves of 8-byte values
    rng = np.random.default_rng(0)
    books = rng.standard_normal((2, 16, 2)).astype(np.float32)
    x = rng.standard_normal((70, 4)) * 4.0
    want_codes, want_far = K.pq_encode_flagged(x.astype(np.float32), books, 5.0)
    for xx in (x, x.astype(np.float32), np.round(x).astype(np.int64)):
        codes, far = K.pq_encode_flagged(xx, books, 5.0)
        np.testing.assert_array_equal(far, (np.abs(xx) >= 5.0).any(axis=1))
    np.testing.assert_array_equal(K.pq_encode_flagged(x, books, 5.0)[0], want_codes)
    np.testing.assert_array_equal(want_far, (np.abs(x.astype(np.float32)) >= 5.0).any(axis=1))


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_centred_ip_tables_plus_shift_are_the_inner_products(offset):
    # a typical entry of each sub-table (the median of 15 evenly spaced ones) moves into the shift: entries + shift
    # sum to the reference inner products, that entry becomes 0 and the others lie around it, and far from the origin
    # they keep the precision ip_tables' rounding loses
    g = np.random.default_rng(4)
    m, ksub, dsub = 8, 256, 4
    cb = (offset + g.standard_normal((m, ksub, dsub))).astype(np.float32)
    q = (offset + g.standard_normal((7, m * dsub))).astype(np.float32)
    t, shift = K.ip_tables_centred(q, cb)
    ref = R.pq_ip_tables_ref(q, cb)  # float64
    assert (t == 0).any(axis=2).all()
    spread = np.ptp(t.astype(np.float64), axis=2)
    assert np.all(np.abs(np.median(t.astype(np.float64), axis=2)) <= 0.25 * spread)
    codes = g.integers(0, ksub, (50, m))
    for i in range(q.shape[0]):
        want = ref[i, np.arange(m), codes].sum(axis=1)  # (50,) rows' inner products
        got = t[i, np.arange(m), codes].astype(np.float64).sum(axis=1) + shift[i]
        # the rows' differences are what ranking needs: exact to float32 rounding of the centred entries
        spread = np.abs(t[i]).max()
        np.testing.assert_allclose(got - got[0], want - want[0], atol=m * spread * 2.0**-22 + 1e-9)


# ---- long top-k lists: reservoirs and merges, never O(k) insertions per entry (a review: PQIndex.search with k =
# 40,000 of 80k rows took 12-50 s, quadratic in k, where the lists over ADC_RESERVOIR_MIN_K are meant to be
# reservoirs) ----------------------------------------------------------------------------------------------------

BIG_K = K.ADC_RESERVOIR_MIN_K + 1


def _topk_of_sums(full, k):
    """Per query the k smallest float32 sums of ``full`` (nq, n), ties to the smaller row, NaN never kept, padded
    inf / -1: the lists every ADC path returns."""
    out_d = np.full((full.shape[0], k), np.inf, np.float32)
    out_i = np.full((full.shape[0], k), -1, np.int64)
    for q in range(full.shape[0]):
        rows = np.flatnonzero(~np.isnan(full[q]))
        order = rows[np.lexsort((rows, full[q, rows]))][:k]
        out_d[q, : order.size], out_i[q, : order.size] = full[q, order], order
    return out_d, out_i


def _awkward_tables(kind, nq, m, seed):
    t = _random_tables(seed, nq, m, 16)
    if kind == "ties":  # few distinct sums: cuts, merges and the k-th fall among ties
        t = np.round(t * 2) / 2
    elif kind == "overflow":  # finite entries whose float32 sums overflow to +inf for some rows: results, not padding
        t[:, :, 5] = 2e38
    elif kind == "inf":  # ±inf entries: -inf and +inf sums, NaN where a row holds both (never kept)
        t[:, 0, 2] = np.inf
        t[:, 1, 3] = -np.inf
    return np.ascontiguousarray(t, dtype=np.float32)


@pytest.mark.parametrize("n,k", [(0, BIG_K), (1, BIG_K), (1, 1), (BIG_K, BIG_K), (BIG_K + 1, BIG_K),
                                 (700, 699), (700, 700), (700, 1000), (997, 2 * BIG_K + 5)])
@pytest.mark.parametrize("kind", ["normal", "ties", "overflow", "inf"])
def test_one_query_long_lists_are_the_reference(n, k, kind):
    # one query (the scan-per-query path) with k around ADC_RESERVOIR_MIN_K: its reservoir (k = n, n < k, one row,
    # ties, ±inf, overflow), cut again and again, then the chunks' lists merged (3 and 7 chunks of unequal length)
    m = 3
    t = _awkward_tables(kind, 1, m, 40 + n)
    codes = _random_codes(41 + n, n, m, 16)
    with np.errstate(over="ignore", invalid="ignore"):
        full = K.adc_distances(t, codes)
    want_d, want_i = _topk_of_sums(full, k)
    for nchunks in (1, 3, 7):
        d, i = K.adc_search(t, codes, k, nchunks=nchunks)
        np.testing.assert_array_equal(i, want_i, err_msg=f"nchunks={nchunks}")
        np.testing.assert_array_equal(d, want_d)


@pytest.mark.parametrize("nq", [2, 5, 17])
@pytest.mark.parametrize("kind", ["normal", "overflow", "inf"])
def test_query_blocks_long_lists_are_the_reference(nq, kind):
    # the multi-query scan's reservoirs (k > ADC_RESERVOIR_MIN_K): rows whose sum overflowed to +inf are results
    # ahead of padding, as on every other path (they were dropped while the threshold was still +inf)
    m, n = 3, 300
    t = _awkward_tables(kind, nq, m, 50 + nq)
    codes = _random_codes(51 + nq, n, m, 16)
    with np.errstate(over="ignore", invalid="ignore"):
        full = K.adc_distances(t, codes)
    for k in (BIG_K, n, n + 7):
        want_d, want_i = _topk_of_sums(full, k)
        for nchunks in (1, 3):
            d, i = K.adc_search(t, codes, k, nchunks=nchunks)
            np.testing.assert_array_equal(i, want_i, err_msg=f"k={k} nchunks={nchunks}")
            np.testing.assert_array_equal(d, want_d)
    t = np.full((nq, 3, 16), 2e38, np.float32)  # the review's case: every sum +inf, three rows
    d, i = K.adc_search(t, np.zeros((3, 3), np.uint8), BIG_K)
    assert (i[:, :3] == [0, 1, 2]).all() and (i[:, 3:] == -1).all() and np.isinf(d).all()


def _chunk_lists(full, k, bounds):
    """Each chunk's (rows bounds[c] .. bounds[c + 1] - 1) own top-k list of ``full``: (nchunks, nq, k)."""
    nq = full.shape[0]
    part_d = np.full((len(bounds) - 1, nq, k), np.inf, np.float32)
    part_i = np.full((len(bounds) - 1, nq, k), -1, np.int64)
    for c in range(len(bounds) - 1):
        d, i = _topk_of_sums(full[:, bounds[c] : bounds[c + 1]], k)
        part_d[c], part_i[c] = d, np.where(i >= 0, i + bounds[c], -1)
    return part_d, part_i


@pytest.mark.parametrize("n,k,bounds", [
    (1, 300, [0, 1]),  # one chunk
    (1, 300, [0, 0, 1, 1]),  # empty chunks: all padding
    (600, 600, [0, 300, 600]),  # k = n
    (600, 599, [0, 1, 598, 600]),  # k = n - 1, chunks of 1, 597 and 2 rows
    (600, 1000, [0, 200, 250, 600]),  # k > n: padding after every row
    (5000, 4999, [0, 1700, 3400, 5000]),  # k near n, long lists
    (5000, 300, [0, 4000, 4100, 5000]),  # k well below every chunk but one
])
@pytest.mark.parametrize("kind", ["normal", "ties", "overflow"])
def test_merge_of_chunk_lists_is_the_reference(n, k, bounds, kind):
    # _merge_parts on long lists and awkward chunks: k near n, k = n, k > n, ties across chunks, +inf sums beside
    # padding, chunks empty or of one row; the answer is the top k of all rows, ties to the smaller row
    t = _awkward_tables(kind, 3, 2, 50 + n)
    codes = _random_codes(51 + n, n, 2, 16)
    with np.errstate(over="ignore"):
        full = K.adc_distances(t, codes)
    part_d, part_i = _chunk_lists(full, k, bounds)
    out_d = np.full((3, k), np.inf, np.float32)
    out_i = np.full((3, k), -1, np.int64)
    K._merge_parts(part_d, part_i, out_d, out_i)
    want_d, want_i = _topk_of_sums(full, k)
    np.testing.assert_array_equal(out_i, want_i)
    np.testing.assert_array_equal(out_d, want_d)


@pytest.mark.parametrize("n,k", [(1, BIG_K), (BIG_K, BIG_K), (700, 700), (700, 1000), (997, 2 * BIG_K + 5),
                                 (3000, 1500)])
@pytest.mark.parametrize("kind", ["normal", "ties", "overflow"])
def test_fastscan_exact_long_lists_are_the_reference(n, k, kind):
    # the exact mode's re-score into a reservoir (k > ADC_RESERVOIR_MIN_K), in 1 and 3 chunks, equals the top k of
    # the exact sums, as the 8-bit kernel returns it on the unpacked codes
    m = 3
    t = _awkward_tables(kind, 2, m, 60 + n)
    codes = _random_codes(61 + n, n, m, 16)
    p = K.pack_codes_4bit(codes)
    with np.errstate(over="ignore"):
        full = K.adc_distances(t, codes)
    want_d, want_i = _topk_of_sums(full, k)
    for nchunks in (1, 3):
        with np.errstate(over="ignore", invalid="ignore"):
            d, i = K.fastscan_search(t, p, n, m, k, 0, nchunks=nchunks)
        np.testing.assert_array_equal(i, want_i, err_msg=f"nchunks={nchunks}")
        np.testing.assert_array_equal(d, want_d)


def _counting_push(monkeypatch):
    """Replace the module's sorted-list insertion by a counting one (for kernels run as plain Python)."""
    calls = []
    push = K._push

    def counted(dd, ii, k, d, i):
        calls.append(k)
        push(dd, ii, k, d, i)

    monkeypatch.setattr(K, "_push", counted)
    monkeypatch.setattr(K, "_offer", K._offer.py_func)
    return calls


@pytest.mark.parametrize("k", [K.ADC_RESERVOIR_MIN_K, BIG_K, 600])
def test_long_lists_take_no_sorted_insertions(k, monkeypatch):
    # Not a timing test: the kernels run as plain Python with the insertion into a sorted list (O(k) per entry)
    # counted. Lists longer than ADC_RESERVOIR_MIN_K must not use it, in the one-query scan, in the merge of the
    # chunks' lists and in FastScan's exact re-score (each did: quadratic in k); shorter lists do. Each still returns
    # what the compiled kernel returns.
    calls = _counting_push(monkeypatch)
    m, n, nchunks = 3, 700, 3
    t = _random_tables(70, 1, m, 16)
    codes = _random_codes(71, n, m, 16)
    big = k > K.ADC_RESERVOIR_MIN_K
    part_d = np.empty((nchunks, 1, k), np.float32)
    part_i = np.empty((nchunks, 1, k), np.int64)
    K._adc_search_few_kernel.py_func(t, codes, k, nchunks, part_d, part_i)
    assert (len(calls) == 0) == big
    want_d, want_i = np.empty_like(part_d), np.empty_like(part_i)
    K._adc_search_few_kernel(t, codes, k, nchunks, want_d, want_i)
    np.testing.assert_array_equal(part_i, want_i)
    np.testing.assert_array_equal(part_d, want_d)

    calls.clear()
    out_d = np.full((1, k), np.inf, np.float32)
    out_i = np.full((1, k), -1, np.int64)
    K._merge_parts.py_func(part_d, part_i, out_d, out_i)
    assert not calls  # (short lists merge as sorted runs too)
    np.testing.assert_array_equal(out_i, K.adc_search(t, codes, k, nchunks=1)[1])

    calls.clear()
    p = K.pack_codes_4bit(codes)
    nblocks, mp2 = p.shape[0], p.shape[1]
    args = (t, p.reshape(-1), nblocks, mp2, n, m, k, nchunks)
    fs_d, fs_i = np.empty_like(part_d), np.empty_like(part_i)
    K._fastscan_exact_kernel.py_func(*args, fs_d, fs_i)
    assert (len(calls) == 0) == big
    want_d, want_i = np.empty_like(part_d), np.empty_like(part_i)
    K._fastscan_exact_kernel(*args, want_d, want_i)
    np.testing.assert_array_equal(fs_i, want_i)
    np.testing.assert_array_equal(fs_d, want_d)


def _insertion_merge(part_d, part_i):
    """The merge of the chunks' lists by insertion into a sorted list, entry by entry (the kernels' rule before
    2026-12, and still theirs for lists holding NaN)."""
    nchunks, nq, k = part_d.shape
    out_d, out_i = part_d[0].copy(), part_i[0].copy()
    for q in range(nq):
        for c in range(1, nchunks):
            for t in range(k):
                d, i = part_d[c, q, t], part_i[c, q, t]
                if i < 0 or not (d < out_d[q, -1] or (d == out_d[q, -1] and (out_i[q, -1] < 0 or i < out_i[q, -1]))):
                    break
                K._push(out_d[q], out_i[q], k, d, i)
    return out_d, out_i


@pytest.mark.parametrize("kind", ["ties", "overflow", "inf", "nan"])
@pytest.mark.parametrize("n,k", [(1, BIG_K), (700, 700), (997, 2 * BIG_K + 5), (3000, 300)])
@pytest.mark.parametrize("nchunks", [1, 3])
def test_long_lists_equal_the_insertion_kernels_bit_for_bit(kind, n, k, nchunks, monkeypatch):
    # the reservoirs and the merge against the sorted-list insertions they replace, which remain the rule: the same
    # kernels run as plain Python with ADC_RESERVOIR_MIN_K above k take the insertions. NaN tables included
    # (FastScan's exact mode falls back to the insertions there, and the merge keeps them for lists holding NaN).
    m = 3
    t = _awkward_tables("inf" if kind == "nan" else kind, 1, m, 80 + n)
    if kind == "nan":
        t[0, 2, 7] = np.nan
    codes = _random_codes(81 + n, n, m, 16)
    p = K.pack_codes_4bit(codes)
    args = (t, p.reshape(-1), p.shape[0], p.shape[1], n, m, k, nchunks)
    few_new = [np.empty((nchunks, 1, k), np.float32), np.empty((nchunks, 1, k), np.int64)]
    fs_new, few_old, fs_old = ([np.empty_like(a) for a in few_new] for _ in range(3))
    with np.errstate(over="ignore", invalid="ignore"):
        K._adc_search_few_kernel(t, codes, k, nchunks, *few_new)
        K._fastscan_exact_kernel(*args, *fs_new)
        monkeypatch.setattr(K, "ADC_RESERVOIR_MIN_K", 10**9)
        K._adc_search_few_kernel.py_func(t, codes, k, nchunks, *few_old)
        K._fastscan_exact_kernel.py_func(*args, *fs_old)
    for a, b in zip(few_new + fs_new, few_old + fs_old, strict=True):
        np.testing.assert_array_equal(a, b)
    for parts in (few_new, fs_new):
        merged = [np.full((1, k), np.inf, np.float32), np.full((1, k), -1, np.int64)]
        K._merge_parts(*parts, *merged)
        for a, b in zip(merged, _insertion_merge(*parts), strict=True):
            np.testing.assert_array_equal(a, b)
