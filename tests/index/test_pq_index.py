import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvant
from kvant.errors import DimensionMismatch, EmptyIndex, InvalidInput, PersistError

DIM, M = 16, 4


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((20, DIM)) * 3
    x = centers[rng.integers(0, 20, 2000)] + rng.standard_normal((2000, DIM))
    q = centers[rng.integers(0, 20, 30)] + rng.standard_normal((30, DIM))
    return x.astype(np.float32), q.astype(np.float32)


@pytest.fixture(scope="module")
def built(data):
    x, _ = data
    out = {}
    for nbits in (8, 4):
        for metric in ("l2", "ip", "cos"):
            index = kvant.PQIndex(DIM, M, nbits=nbits, metric=metric)
            index.train(x)
            index.add(x)
            out[nbits, metric] = index
    return out


def _adc_truth(index, x, q, metric):
    """Distances to every stored reconstruction, computed in float64 from decode()."""
    if metric == "cos":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    rec = index.codec.decode(index.codes).astype(np.float64)
    q64 = q.astype(np.float64)
    if metric == "l2":
        return ((q64[:, None, :] - rec[None]) ** 2).sum(-1)
    return -(q64 @ rec.T)


@pytest.mark.parametrize("nbits", [8, 4])
@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_search_returns_exact_adc_topk(built, data, nbits, metric):
    x, q = data
    index = built[nbits, metric]
    d, ids = index.search(q, 10)
    truth = _adc_truth(index, x, q, metric)
    kth = np.sort(truth, axis=1)[:, 9]
    got = np.take_along_axis(truth, ids, 1)  # ids are row numbers here (auto ids 0..n-1)
    sign = 1 if metric == "l2" else -1
    assert np.allclose(sign * d, got, rtol=1e-4, atol=1e-3)  # returned distances are exact ADC distances
    # tie-tolerant: every returned row is within tolerance of the true k-th best
    assert np.all(got <= kth[:, None] + 1e-3 * np.maximum(1, np.abs(kth[:, None])))
    if nbits == 8:
        assert np.mean(got[:, :1] <= np.sort(truth, 1)[:, :1] + 1e-4) == 1.0


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_refine_with_large_r_is_exact(data, metric):
    x, q = data
    index = kvant.PQIndex(DIM, M, nbits=4, metric=metric, refine=500)
    index.train(x)
    index.add(x)
    flat = kvant.FlatIndex(DIM, metric)
    flat.add(x)
    d, i = index.search(q, 5)
    fd, fi = flat.search(q, 5)
    assert np.mean(i == fi) > 0.99
    assert np.allclose(d, fd, rtol=1e-4, atol=1e-3)


def test_recall_is_reasonable_and_refine_helps(built, data):
    x, q = data
    flat = kvant.FlatIndex(DIM)
    flat.add(x)
    _, gt = flat.search(q, 10)

    def recall(ids):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, gt)])

    r8 = recall(built[8, "l2"].search(q, 10)[1])
    refined = kvant.PQIndex(DIM, M, nbits=8, refine=4)
    refined.train(x)
    refined.add(x)
    rr = recall(refined.search(q, 10)[1])
    assert r8 > 0.4 and rr > r8 and rr > 0.85, (r8, rr)


def test_opq_index_and_padding(data):
    x, q = data
    index = kvant.PQIndex(DIM, M, nbits=8, opq=True)
    index.train(x)
    index.add(x[:3], ids=[7, 8, 9])
    d, i = index.search(q[0], 5)
    assert d.shape == (5,) and sorted(i[:3].tolist()) == [7, 8, 9]
    assert i[3:].tolist() == [-1, -1] and np.all(np.isinf(d[3:]))
    ip = kvant.PQIndex(DIM, M, nbits=4, metric="ip")
    ip.train(x)
    ip.add(x[:2])
    d, i = ip.search(q[:2], 4)
    assert np.all(d[:, 2:] == -np.inf) and np.all(i[:, 2:] == -1)
    assert np.all(d[:, 0] >= d[:, 1])


def test_cos_ignores_query_scale(built, data):
    _, q = data
    index = built[8, "cos"]
    assert np.array_equal(index.search(q, 5)[1], index.search(q * 7.5, 5)[1])


def test_life_cycle_errors_leave_index_unchanged(data):
    x, q = data
    index = kvant.PQIndex(DIM, M, nbits=4)
    with pytest.raises(EmptyIndex, match="not trained"):
        index.add(x)
    with pytest.raises(EmptyIndex):
        index.search(q, 3)
    with pytest.raises(InvalidInput, match="at least 16"):
        index.train(x[:10])
    index.train(x)
    with pytest.raises(EmptyIndex):
        index.search(q, 3)
    index.add(x[:500], ids=np.arange(500) + 100)
    before = index.search(q, 5)
    bad = x[500:600].copy()
    bad[9, 2] = np.nan
    with pytest.raises(InvalidInput, match="row: 9"):
        index.add(bad)
    with pytest.raises(DimensionMismatch):
        index.add(x[:, :8])
    with pytest.raises(InvalidInput, match="already in the index"):
        index.add(x[:2], ids=[5000, 100])
    with pytest.raises(InvalidInput, match="already holds vectors"):
        index.train(x)
    assert len(index) == 500
    after = index.search(q, 5)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    with pytest.raises(InvalidInput):
        kvant.PQIndex(DIM, 5)
    with pytest.raises(InvalidInput):
        kvant.PQIndex(DIM, M, metric="L2")
    with pytest.raises(InvalidInput):
        kvant.PQIndex(DIM, M, refine=-1)


@pytest.mark.parametrize("nbits,opq,refine", [(8, False, 0), (4, True, 3)])
def test_remove_and_save_load_keep_ids(tmp_path, data, nbits, opq, refine):
    x, q = data
    index = kvant.PQIndex(DIM, M, nbits=nbits, opq=opq, refine=refine, metric="ip")
    index.train(x)
    ids = np.arange(len(x), dtype=np.int64) * 2 + 1
    index.add(x, ids=ids)
    assert index.remove(ids[:1000:2]) == 500
    assert len(index) == 1500
    d, i = index.search(q, 10)
    assert not np.isin(i, ids[:1000:2]).any() and np.isin(i, ids).all()
    index.save(tmp_path / "p.kvant")
    for mmap in (False, True):
        back = kvant.load(tmp_path / "p.kvant", mmap=mmap)
        assert isinstance(back, kvant.PQIndex) and len(back) == 1500
        d2, i2 = back.search(q, 10)
        assert np.array_equal(i, i2) and np.array_equal(d, d2)
    back.add(x[:3])  # new auto ids never collide with kept ones
    assert len(back) == 1503 and back.ids[-3:].tolist() == [ids[-1] + 1, ids[-1] + 2, ids[-1] + 3]
    # an untrained index also round-trips
    kvant.PQIndex(DIM, M).save(tmp_path / "u.kvant")
    assert not kvant.load(tmp_path / "u.kvant").is_trained


def test_inconsistent_saved_content(tmp_path, built):
    from kvant import persist

    index = built[8, "l2"]
    meta = index._meta()
    arrays = {"ids": index.ids, "codes": index.codes[:, :3]}
    arrays.update({f"codec.{k}": v for k, v in index.codec._arrays().items()})
    persist.write(tmp_path / "a", "PQIndex", meta, arrays)
    with pytest.raises(PersistError, match="codes"):
        kvant.load(tmp_path / "a")
    arrays["codes"] = index.codes
    del arrays["codec.codebooks"]
    persist.write(tmp_path / "b", "PQIndex", meta, arrays)
    with pytest.raises(PersistError):
        kvant.load(tmp_path / "b")


def test_a_set_padding_nibble_in_saved_4bit_codes_is_refused(tmp_path):
    """Odd m at 4 bits leaves the last byte's high nibble as padding: a file (valid checksum) with it set was not
    written by the index's codec, which would refuse to decode those codes, so loading refuses it too."""
    from kvant import persist

    x = np.random.default_rng(0).standard_normal((600, 12)).astype(np.float32)
    index = kvant.PQIndex(12, 3, nbits=4)
    index.train(x)
    index.add(x[:100])
    index.save(tmp_path / "ok.kvant")
    kind, meta, arrays = persist.read(tmp_path / "ok.kvant")
    assert np.array_equal(kvant.load(tmp_path / "ok.kvant").codes, index.codes)
    codes = arrays["codes"].copy()
    codes[57, -1] |= 0x30
    persist.write(tmp_path / "bad.kvant", kind, meta, {**arrays, "codes": codes})
    with pytest.raises(PersistError, match="row 57: the padding nibble"):
        kvant.load(tmp_path / "bad.kvant")


@pytest.fixture(scope="module")
def saved_index(tmp_path_factory, data):
    x, _ = data
    index = kvant.PQIndex(DIM, M, nbits=4, refine=2)
    index.train(x)
    index.add(x[:300])
    path = tmp_path_factory.mktemp("idx") / "i.kvant"
    index.save(path)
    return path


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_index_file_raises_persist_error(check_corrupted_copy, saved_index, data):
    check_corrupted_copy(saved_index, data)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 6),
    cols=st.sampled_from([DIM - 1, DIM, DIM + 3]),
    nan_at=st.one_of(st.none(), st.integers(0, 5)),
    ids_kind=st.sampled_from(["none", "ok", "dup", "short", "float", "clash"]),
)
def test_bad_adds_never_change_the_index(built, data, rows, cols, nan_at, ids_kind):
    x, q = data
    index = built[4, "l2"]
    n_before = len(index)
    ids_before = index.ids
    block = np.random.default_rng(rows).standard_normal((rows, cols)).astype(np.float32)
    if nan_at is not None and nan_at < rows:
        block[nan_at, 0] = np.nan
    ids = {
        "none": None,
        "ok": np.arange(rows) + 10**9,
        "dup": np.zeros(rows, np.int64) + 10**9,
        "short": np.arange(rows + 1) + 10**9,
        "float": np.arange(rows) + 0.5 + 10**9,
        "clash": np.arange(rows),
    }[ids_kind]
    valid = cols == DIM and (nan_at is None or nan_at >= rows) and (
        ids_kind in ("none", "ok") or (ids_kind == "dup" and rows == 1))
    if valid:
        return  # only bad inputs here: the shared index must stay as built
    with pytest.raises(InvalidInput):
        index.add(block, ids=ids)
    assert len(index) == n_before and np.array_equal(index.ids, ids_before)


def test_untrained_index_loads_with_mmap(tmp_path):
    kvant.PQIndex(8, 2).save(tmp_path / "p.kvant")
    assert not kvant.load(tmp_path / "p.kvant", mmap=True).is_trained


def test_opq_rotation_in_a_plain_pq_file_is_a_persist_error(tmp_path):
    from kvant import persist

    x = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    index = kvant.PQIndex(8, 2, nbits=4, opq=True)
    index.train(x)
    index.add(x)
    index.save(tmp_path / "o.kvant")
    kind, meta, arrays = persist.read(tmp_path / "o.kvant")
    meta["opq"] = False  # a writer bug or a hand edit: the rotation would be silently ignored
    persist.write(tmp_path / "bad.kvant", kind, meta, arrays)
    with pytest.raises(PersistError, match="rotation"):
        kvant.load(tmp_path / "bad.kvant")


def test_max_train_rows_below_codewords_is_rejected_up_front():
    with pytest.raises(InvalidInput, match="max_train_rows"):
        kvant.PQ(16, 4, nbits=4, max_train_rows=5)
    with pytest.raises(InvalidInput, match="max_train_rows"):
        kvant.PQIndex(16, 4, nbits=4, max_train_rows=5)


@pytest.mark.parametrize("scale", [1e-25, 1e19])
@pytest.mark.parametrize("nbits,refine", [(8, 0), (4, 0), (8, 2), (4, 2)])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_search_at_extreme_magnitudes_ranks_like_ordinary_data(data, scale, nbits, refine, metric):
    # Training and encoding scale far-out data by a power of two; search must too, or 1e19-scale tables
    # overflow (stored rows came back as padding) and 1e-25-scale ones underflow (every distance 0).
    x, q = data
    x, q = x[:300] / np.float32(8), q[:5] / np.float32(8)
    ranked = []
    for s in (1.0, scale):
        index = kvant.PQIndex(DIM, M, nbits=nbits, metric=metric, refine=refine)
        index.train(x * np.float32(s))
        index.add(x * np.float32(s))
        d, ids = index.search(q * np.float32(s), 10)
        assert (ids >= 0).all()
        ranked.append((d, ids))
    # a power of two scales every codeword, table and distance exactly: the same codes and the same ranking
    assert np.array_equal(ranked[0][1], ranked[1][1])
    if scale == 1e19:  # the distances are the ordinary ones times scale² (±inf beyond float32's range)
        want = ranked[0][0] * np.float64(scale) ** 2
        big = np.abs(want) > np.finfo(np.float32).max * (1 - 1e-5)
        assert np.isinf(ranked[1][0][big]).all()
        np.testing.assert_allclose(ranked[1][0][~big], want[~big], rtol=1e-5)


@pytest.mark.parametrize("metric,magnitude,qmag", [("ip", 1.0, 1.0), ("cos", 1.0, 1.0), ("ip", 1e20, 1.0),
                                                     ("ip", 1e20, 1e-25), ("ip", 1e-20, 1.0), ("ip", 1e20, 1e20),
                                                     ("ip", 1e-20, 1e-20)])
def test_opq_with_an_offset_ranks_inner_products_by_exact_adc(metric, magnitude, qmag):
    # OPQ removes a large common offset before rotating; inner-product tables must add q·offset back
    # (q·x̂ = (qR)·c + q·offset) instead of using the offset-removed query, which ranked wrongly; at extreme
    # magnitudes the share carries the tables' units (the codebooks' scale, times the query's own or the same again)
    g = np.random.default_rng(0)
    x = ((100 + g.standard_normal((400, 8)) * (np.arange(8) + 1) / 8) * magnitude).astype(np.float32)
    q = (3 * g.standard_normal((5, 8)) * qmag).astype(np.float32)
    index = kvant.PQIndex(8, 2, nbits=4, metric=metric, opq=True)
    index.train(x)
    index.add(x)
    assert index.codec.mean.any()  # the offset rule fired
    d, ids = index.search(q, 5)
    xs, qs = (x, q) if metric == "ip" else (x / np.linalg.norm(x, axis=1, keepdims=True),
                                            q / np.linalg.norm(q, axis=1, keepdims=True))
    rec = index.codec.decode(index.codec.encode(xs)).astype(np.float64)
    ref = qs.astype(np.float64) @ rec.T
    got = np.take_along_axis(ref, ids, axis=1)
    tol = 1e-4 * float(np.abs(ref).max())
    with np.errstate(over="ignore"):  # (scores beyond float32 come back as ±inf, documented)
        np.testing.assert_allclose(d, got.astype(np.float32), rtol=1e-4, atol=tol)  # the ADC scores of those ids
    np.testing.assert_allclose(got, -np.sort(-ref, axis=1)[:, :5], rtol=1e-5, atol=tol / 10)  # and the best ones


@pytest.mark.parametrize("nbits", [8, 4])
@pytest.mark.parametrize("scale", [1e18, 1e19, 3e38])
def test_a_query_far_outside_the_data_still_gets_k_rows(data, nbits, scale):
    # its l2 tables overflowed float32 (the scale came from the codebooks alone) and no row was admitted: padding
    x, _ = data
    index = kvant.PQIndex(DIM, M, nbits=nbits)
    index.train(x)
    index.add(x)
    q = np.full((2, DIM), scale, np.float32)
    q[1] *= -1
    d, ids = index.search(q, 5)
    assert np.all(ids >= 0) and np.all(d[:, :-1] <= d[:, 1:])  # beyond float32's range the distances are inf
    truth = _adc_truth(index, x, q, "l2")
    got = np.take_along_axis(truth, ids, 1)
    kth = np.sort(truth, axis=1)[:, 4]
    assert np.all(got <= kth[:, None] * (1 + 1e-6))  # as good as float32 can rank them


@pytest.mark.parametrize("rerank", [0, 4])
def test_one_far_codeword_does_not_blind_the_4bit_shortlist(rerank):
    # 1% of rows shifted by 1e4 in one sub-space: a codeword out there, one table entry 1e4× the others. Every
    # other entry used to round to 0 at the u8 step, and the shortlist was the first rows scanned
    rng = np.random.default_rng(0)
    n, dim, m, k = 8000, 32, 8, 10
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x[rng.choice(n, 80, replace=False), :4] += 1e4
    index = kvant.PQIndex(dim, m, nbits=4, fastscan_rerank=rerank)
    index.train(x)
    index.add(x)
    q = rng.standard_normal((30, dim)).astype(np.float32)
    d, ids = index.search(q, k)
    truth = _adc_truth(index, x, q, "l2")
    kth = np.sort(truth, axis=1)[:, k - 1]
    got = np.take_along_axis(truth, ids, 1)
    np.testing.assert_allclose(d, got, rtol=1e-5)  # exact ADC distances
    if rerank == 0:  # the certified mode: exactly the ADC top-k (up to float32 ties)
        assert np.all(got <= kth[:, None] * (1 + 1e-6))
    else:  # a heuristic, but no longer blind
        assert np.mean(got <= kth[:, None] * (1 + 1e-6)) > 0.95


@pytest.mark.parametrize("m", [1, 16])
def test_4bit_search_finds_a_stored_vector_and_its_copies(m):
    # (review) A stored vector searched for itself at k=1 returned row 0 at 4x its distance (m=16), and 4,000 stored
    # copies of a query were all missed: the shortlist's clip was 0 and it held the first rows scanned.
    rng = np.random.default_rng(1)
    dim = 64
    x = rng.standard_normal((6000, dim)).astype(np.float32)
    v = rng.standard_normal((1, dim)).astype(np.float32)
    x = np.vstack([x, np.repeat(v, 4000, 0)])  # rows 6000..9999
    index = kvant.PQIndex(dim, m, nbits=4)
    index.train(x)
    index.add(x)
    q = np.vstack([v, x[[500, 750, 3, 251]]])
    d, ids = index.search(q, 10 if m > 1 else 1)
    truth = _adc_truth(index, x, q, "l2")
    kth = np.sort(truth, axis=1)[:, ids.shape[1] - 1]
    np.testing.assert_allclose(d, np.take_along_axis(truth, ids, 1), rtol=1e-6)
    assert np.all(d <= kth[:, None] * (1 + 1e-6) + 1e-9), (d, kth)
    if m > 1:
        assert set(ids[0]) <= set(range(6000, 10000))


@pytest.mark.parametrize("nbits,refine,opq", [(8, 0, False), (4, 0, False), (8, 4, False), (8, 0, True)])
def test_one_huge_query_leaves_the_others_in_its_batch_alone(data, nbits, refine, opq):
    # (review) One table scale for the whole batch: a query of norm ~1e37 pushed the others' tables to float32
    # subnormals, changing the ids of 30 of 50 ordinary queries and rounding their distances (9.435175 -> 9.4375).
    x, q = data
    index = kvant.PQIndex(DIM, M, nbits=nbits, refine=refine, opq=opq)
    index.train(x)
    index.add(x)
    alone_d, alone_i = index.search(q, 10)
    batch = np.vstack([q, q[:1] * np.float32(1e36)])
    d, i = index.search(batch, 10)
    np.testing.assert_array_equal(i[: len(q)], alone_i)
    np.testing.assert_array_equal(d[: len(q)], alone_d)
    assert (i[-1] >= 0).all()


def test_refine_and_shortlist_lengths_are_capped_at_the_index_size(data):
    # (review) refine=10**5 over 50 vectors allocated 418 MiB and took 2.8 s; 10**11 raised a bare MemoryError;
    # fastscan_rerank=10**12 a bare SystemError from Numba
    x, q = data
    for kwargs in ({"refine": 10**11}, {"nbits": 4, "fastscan_rerank": 10**12}):
        index = kvant.PQIndex(DIM, M, **kwargs)
        index.train(x[:300])
        index.add(x[:50])
        d, i = index.search(q[:2], 10)
        capped = {key: (50 if key == "refine" else 5 if key == "fastscan_rerank" else v) for key, v in kwargs.items()}
        want = kvant.PQIndex(DIM, M, **capped)  # a shortlist of 5·10 rows holds all 50
        want.train(x[:300])
        want.add(x[:50])
        wd, wi = want.search(q[:2], 10)
        np.testing.assert_array_equal(i, wi)


@pytest.mark.parametrize("cls", ["flat", "pq"])
@pytest.mark.parametrize("bad", [-3, 300.5, "300", True, 2**64, None])
def test_load_refuses_a_next_id_that_is_not_a_valid_id(tmp_path, cls, bad):
    # (review) checked only when the index held vectors: later adds got ids -3, -2, -1 (-1 is the padding id);
    # a later review: 300.5 and "300" loaded (int() took them) and 2**64 too
    from kvant import persist

    index = kvant.FlatIndex(4) if cls == "flat" else kvant.PQIndex(4, 2)
    if cls == "pq":
        index.train(np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32))
    index.save(tmp_path / "e.kv")
    kind, meta, arrays = persist.read(tmp_path / "e.kv")
    meta["next_id"] = bad
    persist.write(tmp_path / "bad.kv", kind, meta, arrays)
    with pytest.raises(PersistError, match="next_id"):
        kvant.load(tmp_path / "bad.kv")


@pytest.mark.parametrize("block_rows", [None, 16])
def test_load_refuses_cos_raw_rows_that_are_not_unit(tmp_path, data, monkeypatch, block_rows):
    # add() stores cos rows normalised; a file whose re-ranking rows are not (a hand edit, another writer) would
    # be loaded and re-rank by "similarities" like 3.0
    from kvant import persist
    from kvant.index import pq as pqindex

    if block_rows:  # checked in blocks: the row named is the file's
        monkeypatch.setattr(pqindex, "_CHECK_BLOCK_VALUES", block_rows * DIM)
    x, q = data
    index = kvant.PQIndex(DIM, M, nbits=4, metric="cos", refine=4)
    index.train(x)
    index.add(x[:200], ids=np.arange(200) + 1000)
    index.add(np.zeros((1, DIM), np.float32))  # a zero row stays zero, and is consistent
    index.save(tmp_path / "ok.kv")
    for mmap in (False, True):  # the files add() writes still load
        d, i = kvant.load(tmp_path / "ok.kv", mmap=mmap).search(q, 5)
        want_d, want_i = index.search(q, 5)
        np.testing.assert_array_equal(d, want_d)
        np.testing.assert_array_equal(i, want_i)
    kind, meta, arrays = persist.read(tmp_path / "ok.kv")
    for factor in (3.0, 1 + 1e-5):
        raw = arrays["raw"].copy()
        raw[37] *= np.float32(factor)
        persist.write(tmp_path / "bad.kv", kind, meta, arrays | {"raw": raw})
        for mmap in (False, True):
            with pytest.raises(PersistError, match=r"cos index's raw vector at row 37 \(id 1037\)"):
                kvant.load(tmp_path / "bad.kv", mmap=mmap)
    meta["metric"] = "ip"  # the same rows are fine for ip, which stores them as given
    persist.write(tmp_path / "ip.kv", kind, meta, arrays | {"raw": arrays["raw"] * np.float32(3)})
    assert len(kvant.load(tmp_path / "ip.kv")) == 201


def test_ragged_lists_and_bad_path_types_are_kvant_errors(tmp_path, data):
    x, _ = data
    index = kvant.FlatIndex(2)
    index.add(np.eye(2, dtype=np.float32))
    with pytest.raises(InvalidInput, match="queries"):
        index.search([[1, 2], [1]], 1)
    with pytest.raises(InvalidInput, match="ids"):
        index.add(np.eye(2, dtype=np.float32), ids=[[5], [6, 7]])
    with pytest.raises(InvalidInput, match="ids to remove"):
        index.remove([[1], [2, 3]])
    assert len(index) == 2
    for bad in (None, 3.5):
        with pytest.raises(InvalidInput, match="path must be"):
            index.save(bad)
        with pytest.raises(InvalidInput, match="path must be"):
            kvant.load(bad)
    index.save(str(tmp_path / "b.kv").encode())  # bytes paths are paths
    assert len(kvant.load(tmp_path / "b.kv")) == 2


@pytest.mark.parametrize("refine", [0, 2])
def test_failed_add_at_id_space_exhaustion_stores_nothing(data, refine):
    # (review) the rows were stored before the default ids were found missing: with refine, raw rows and ids
    # went out of step and re-ranking answered with another vector's id
    x, _ = data
    index = kvant.PQIndex(DIM, M, refine=refine)
    index.train(x)
    index.add(x[:2], ids=[0, 2**63 - 1])
    with pytest.raises(InvalidInput, match="no default ids"):
        index.add(x[2:5])
    assert index.ntotal == 2 and index.codes.shape[0] == 2
    index.add(x[5:6], ids=[7])
    d, i = index.search(x[5], 1)
    assert i[0] == 7
    if refine:
        assert d[0] == 0.0


@pytest.mark.parametrize("nbits,rerank", [(8, 4), (4, 0)])
@pytest.mark.parametrize("qscale", [1e-25, 1e-32, 1e25])
def test_ip_query_far_from_the_codebooks_scale_ranks_by_exact_adc(nbits, rerank, qscale):
    # (review) every query took the codebooks' scale: on 1e20 data a 1e-25 query's tables underflowed to 0 and
    # it got the first stored rows
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((600, 8)) * 1e20).astype(np.float32)
    q = (rng.standard_normal((3, 8)) * qscale).astype(np.float32)
    index = kvant.PQIndex(8, 4, nbits=nbits, metric="ip", fastscan_rerank=rerank)
    index.train(x)
    index.add(x)
    d, i = index.search(q, 5)
    truth = _adc_truth(index, x, q, "ip")  # -(q . x^)
    want = np.argsort(truth, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(i, want)
    with np.errstate(over="ignore"):  # similarities beyond float32 come back as inf (documented)
        np.testing.assert_allclose(d, (-np.take_along_axis(truth, want, axis=1)).astype(np.float32), rtol=1e-5)


def test_ip_refine_with_a_tiny_query_equals_flat_search():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((600, 8)) * 1e20).astype(np.float32)
    q = (rng.standard_normal((2, 8)) * 1e-25).astype(np.float32)
    flat = kvant.FlatIndex(8, metric="ip")
    flat.add(x)
    for opq in (False, True):
        index = kvant.PQIndex(8, 4, metric="ip", refine=600, opq=opq)
        index.train(x)
        index.add(x)
        np.testing.assert_array_equal(index.search(q, 5)[1], flat.search(q, 5)[1])


@pytest.mark.parametrize("cls", ["flat", "pq8", "pq4"])
def test_zero_similarities_are_positive_zero(cls):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    index = kvant.FlatIndex(8, metric="ip") if cls == "flat" else kvant.PQIndex(8, 4, nbits=int(cls[2]), metric="ip")
    if cls != "flat":
        index.train(x)
    index.add(x)
    d, _ = index.search(np.zeros(8, np.float32), 3)
    assert (d == 0).all() and not np.signbit(d).any()


@pytest.mark.parametrize("metric", ["ip", "cos"])
def test_inner_product_search_far_from_the_origin_ranks_as_float64_exact_adc(metric):
    # Rows 1e4 off the origin: inner-product table entries ~1e8 differ by ~1e3. Rounded to float32 as they were,
    # 17% (ip) and 82% (cos) of queries' top-10 differed from the float64 exact-ADC top-10 (a review); each
    # sub-table is now centred before rounding, its mean added back in float64.
    g = np.random.default_rng(5)
    x = (1e4 + g.standard_normal((30000, 64))).astype(np.float32)
    q = (1e4 + g.standard_normal((200, 64))).astype(np.float32)
    idx = kvant.PQIndex(64, m=8, nbits=8, metric=metric).train(x)
    idx.add(x)
    unit = (lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)) if metric == "cos" else (lambda a: a)
    xh = idx.codec.decode(idx.codec.encode(unit(x))).astype(np.float64)
    sims = unit(q).astype(np.float64) @ xh.T
    want = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    _, got = idx.search(q, 10)
    same = np.mean([set(a) == set(b) for a, b in zip(got, want, strict=True)])
    assert same >= 0.99, same


@pytest.mark.parametrize("kwargs", [{"nbits": 8}, {"nbits": 4, "fastscan_rerank": 0}, {"nbits": 8, "opq": True}])
@pytest.mark.parametrize("metric,magnitude", [("l2", 1e24), ("ip", 1e10), ("ip", 1e24)])
def test_one_far_row_leaves_the_ordinary_rows_ranked(kwargs, metric, magnitude):
    # (review) one row 1e24 times the others: the l2 search scale followed the codewords' mean squared norm, which that
    # row's codeword set, and every ordinary table entry underflowed (distance 0, rows 1, 2, 3 for every query); for
    # inner products the sub-tables were centred at their mean, which its codeword moved far from every other entry
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 8)).astype(np.float32)
    x[0] *= np.float32(magnitude)
    q = x[1:31] + np.float32(0.1) * rng.standard_normal((30, 8)).astype(np.float32)
    index = kvant.PQIndex(8, 2, metric=metric, **kwargs)
    index.train(x)
    index.add(x)
    d, ids = index.search(q, 5)
    truth = _adc_truth(index, x, q, metric)
    kth = np.sort(truth, axis=1)[:, 4]
    got = np.take_along_axis(truth, ids, 1)
    assert np.all(got <= kth[:, None] + 1e-5 * np.abs(kth[:, None])), (ids, np.argsort(truth, 1)[:, :5])
    sign = 1 if metric == "l2" else -1
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(sign * d, got.astype(np.float32), rtol=1e-4)


@pytest.mark.parametrize("cls", ["pq", "opq", "index"])
def test_training_rows_beyond_float32_codes_span_are_refused(cls):
    # (review) a row 1e34 times the others: no power of two keeps both its codeword and the ordinary ones' squared
    # differences in float32, and 1,863 of 3,998 ordinary sub-codes were not the nearest codeword
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 8)).astype(np.float32)
    x[0] *= np.float32(1e34)
    obj = {"pq": lambda: kvant.PQ(8, 2), "opq": lambda: kvant.OPQ(8, 2), "index": lambda: kvant.PQIndex(8, 2)}[cls]()
    with pytest.raises(InvalidInput, match="orders of magnitude"):
        obj.train(x) if cls == "index" else obj.fit(x)
    if cls == "index":
        assert not obj.is_trained
    else:
        assert obj.codebooks_ is None
    x[0] /= np.float32(1e34 / 1e24)  # 1e24 is within the span: trained, and its codes are the nearest codewords
    if cls == "index":
        obj.train(x)
        return
    obj.fit(x)
    codes = obj.unpacked_codes(obj.encode(x)) if cls == "pq" else None
    if codes is not None:
        sub = x.astype(np.float64).reshape(len(x), 2, 4)
        dd = ((sub[:, :, None, :] - obj.codebooks_.astype(np.float64)[None]) ** 2).sum(-1)
        mine = np.take_along_axis(dd, codes[:, :, None].astype(np.int64), 2)[..., 0]
        assert np.all(mine <= dd.min(-1) * (1 + 1e-5))


def test_a_few_tiny_rows_beside_ordinary_ones_are_accepted():
    # the span rule compares with the median codeword: codewords near zero beside ordinary ones are fine
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 8)).astype(np.float32)
    x[:40] *= np.float32(1e-35)
    index = kvant.PQIndex(8, 2)
    index.train(x)
    index.add(x)
    d, ids = index.search(x[100:110], 3)
    truth = _adc_truth(index, x, x[100:110], "l2")
    assert np.all(np.take_along_axis(truth, ids, 1) <= np.sort(truth, 1)[:, 2:3] * (1 + 1e-5))


def test_rotation_overflow_names_the_row_of_the_source_not_of_its_chunk():
    # (review) row 69,000 of an input was reported as row 3,464: the row number within its 65,536-row chunk
    rng = np.random.default_rng(0)
    x = rng.standard_normal((70000, 4)).astype(np.float32)
    x[:, 1] = 0.9 * x[:, 0] + 0.1 * x[:, 1]
    opq = kvant.OPQ(4, 2, 4).fit(x[:5000])
    y = x.copy()
    y[69000] = 3.4e38
    with pytest.raises(InvalidInput, match="^row 69000 overflows"):
        opq.encode(y)
    index = kvant.PQIndex(4, 2, nbits=4, opq=True)
    index.train(x[:5000])
    with pytest.raises(InvalidInput, match="^row 69000 overflows"):
        index.add(y)
    assert index.ntotal == 0
    index.add(x[:100])
    with pytest.raises(InvalidInput, match="^query 5 overflows"):
        index.search(np.vstack([x[:5], y[69000:69001]]), 3)


def test_reconstruct_names_its_own_ids_in_errors():
    flat = kvant.FlatIndex(2)
    flat.add(np.eye(2, dtype=np.float32))
    with pytest.raises(InvalidInput, match="ids to reconstruct must be a 1-D array"):
        flat.reconstruct([[0]])


def test_4bit_fastscan_refuses_more_sub_quantizers_than_its_16_bit_sums_take():
    # m = 65,535 gave every table entry a quantised range of 0 and search died on a ZeroDivisionError (a review)
    from kvant.kernels import pq as kpq

    limit = kpq.FASTSCAN_MAX_M
    assert kvant.PQIndex(limit, limit, nbits=4).m == limit
    with pytest.raises(kvant.InvalidInput, match=f"m <= {limit}"):
        kvant.PQIndex(limit + 1, limit + 1, nbits=4)
    assert kvant.PQIndex(limit + 1, limit + 1, nbits=8).m == limit + 1
    with pytest.raises(ValueError, match="at most"):
        kpq.fastscan_search(np.zeros((1, limit + 1, 16), np.float32), np.zeros((1, 1), np.uint8), 1, limit + 1, 1, 4)


def test_a_file_cannot_bring_in_codebooks_training_would_refuse(tmp_path):
    # (review) a crafted file with one codeword 1e34 times the others loaded, though fit refuses such codebooks
    from kvant import persist

    pq = kvant.PQ(8, 2).fit(np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32))
    pq.save(tmp_path / "pq.kv")
    kind, meta, arrays = persist.read(tmp_path / "pq.kv")
    books = np.array(arrays["codebooks"])
    books[1, 3] *= np.float32(1e34)
    persist.write(tmp_path / "bad.kv", kind, meta, dict(arrays, codebooks=books))
    with pytest.raises(PersistError, match="orders of magnitude"):
        kvant.load(tmp_path / "bad.kv")
