import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvant
from kvant.errors import DimensionMismatch, EmptyIndex, InvalidInput, PersistError
from kvant.quant import pq as pqmod


def _data(n=3000, dim=16, seed=0, aniso=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    if aniso:
        # strongly unequal variances, then a random rotation: correlated sub-vectors that PQ alone splits badly
        x *= np.geomspace(10.0, 0.05, dim)
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        x = x @ q
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def x():
    return _data()


@pytest.fixture(scope="module")
def pq8(x):
    return kvant.PQ(16, 4, nbits=8, seed=1).fit(x)


@pytest.fixture(scope="module")
def pq4(x):
    return kvant.PQ(16, 4, nbits=4, seed=1).fit(x)


def test_dim_not_divisible_names_valid_m():
    with pytest.raises(InvalidInput, match=r"m must be one of \[1, 2, 3, 4, 6, 8, 12, 24\]"):
        kvant.PQ(24, 5)
    with pytest.raises(InvalidInput):
        kvant.OPQ(24, 7)


@pytest.mark.parametrize("bad", [dict(nbits=6), dict(nbits=True), dict(m=0), dict(dim=-1), dict(seed=-3)])
def test_bad_settings(bad):
    kw = dict(dim=16, m=4, nbits=8, seed=0) | bad
    with pytest.raises(InvalidInput):
        kvant.PQ(**kw)


def test_shapes_and_code_size(x, pq8, pq4):
    assert pq8.codebooks.shape == (4, 256, 4) and pq8.codebooks.dtype == np.float32
    assert pq8.code_size == 4
    assert pq4.codebooks.shape == (4, 16, 4)
    assert pq4.code_size == 2
    c8, c4 = pq8.encode(x), pq4.encode(x)
    assert c8.shape == (len(x), 4) and c8.dtype == np.uint8
    assert c4.shape == (len(x), 2) and c4.dtype == np.uint8
    assert pq8.decode(c8).shape == x.shape


def _nearest_codes(pq, x):
    cb = pq.codebooks.astype(np.float64)
    sub = x.reshape(len(x), pq.m, pq.dsub).astype(np.float64)
    d = ((sub[:, :, None, :] - cb[None]) ** 2).sum(-1)  # (n, m, ksub)
    return d.argmin(-1).astype(np.uint8)


def test_encode_is_nearest_codeword_and_decode_gathers(x, pq8):
    codes = pq8.encode(x[:500])
    assert np.array_equal(codes, _nearest_codes(pq8, x[:500]))
    rec = pq8.decode(codes)
    expect = np.concatenate([pq8.codebooks[j][codes[:, j]] for j in range(4)], axis=1)
    assert np.array_equal(rec, expect)


def test_4bit_packing_two_codes_per_byte_odd_m():
    x = _data(600, 9, seed=3)
    pq = kvant.PQ(9, 3, nbits=4, seed=0).fit(x)
    assert pq.code_size == 2
    codes = pq.encode(x)
    raw = _nearest_codes(pq, x)
    assert np.array_equal(codes[:, 0], raw[:, 0] | (raw[:, 1] << 4))
    assert np.array_equal(codes[:, 1], raw[:, 2])  # padding nibble is zero
    assert np.array_equal(pq.unpacked_codes(codes), raw)
    rec = pq.decode(codes)
    assert np.allclose(rec, np.concatenate([pq.codebooks[j][raw[:, j]] for j in range(3)], axis=1))


@pytest.mark.parametrize("cls", [kvant.PQ, kvant.OPQ])
def test_decode_refuses_a_nonzero_padding_nibble_naming_the_first_bad_row(cls):
    # odd m at 4 bits: the last byte's high nibble is padding, always 0 from encode; anything else is not this
    # codec's bytes (it was silently dropped)
    x = _data(600, 9, seed=3)
    codec = cls(9, 3, nbits=4, seed=0, n_iter=2).fit(x)
    codes = codec.encode(x[:20])
    bad = codes.copy()
    bad[[7, 12], -1] |= 0x50
    with pytest.raises(InvalidInput, match=r"codes row 7: the padding nibble .* is 5, expected 0"):
        codec.decode(bad)
    assert codec.decode(codes).shape == (20, 9)
    assert codec.decode(codes[:0]).shape == (0, 9)
    even = kvant.PQ(16, 4, nbits=4, seed=0, n_iter=2).fit(_data(600, 16))  # even m: no padding, every byte used
    assert even.decode(np.full((3, 2), 0xFF, np.uint8)).shape == (3, 16)


def test_decode_refuses_1d_codes_as_encode_refuses_1d_vectors(x, pq8, pq4):
    for codec in (pq8, pq4):
        with pytest.raises(InvalidInput):
            codec.encode(x[0])
        one = codec.encode(x[:1])
        with pytest.raises(InvalidInput, match=r"codes must have shape \(n, \d\), got \(\d,\); .*reshape"):
            codec.decode(one[0])
        np.testing.assert_array_equal(codec.decode(one[0].reshape(1, -1)), codec.decode(one))


def test_encode_streams_chunks_and_sources(x, pq8, tmp_path, monkeypatch):
    full = pq8.encode(x)
    monkeypatch.setattr(pqmod, "_ENCODE_CHUNK_ROWS", 7)
    assert np.array_equal(pq8.encode(x), full)
    path = tmp_path / "x.npy"
    np.save(path, x.astype(np.float64))
    mm = np.load(path, mmap_mode="r")
    assert np.array_equal(pq8.encode(mm), full)


def test_reconstruction_error_is_mean_squared_row_error(x, pq8):
    rec = pq8.decode(pq8.encode(x))
    expect = float(((x.astype(np.float64) - rec) ** 2).sum(1).mean())
    assert pq8.reconstruction_error(x) == pytest.approx(expect, rel=1e-6)
    # 8 bits per sub-vector beat 4 bits
    assert pq8.reconstruction_error(x) < kvant.PQ(16, 4, nbits=4).fit(x).reconstruction_error(x)


def test_reconstruction_error_compares_float64_in_float64_in_either_byte_order(x, pq8):
    # (an audit: a big-endian float64 array was compared after rounding to float32, unlike a native one)
    wide = x.astype(np.float64) + 0.1234567891234
    native = pq8.reconstruction_error(wide)
    assert pq8.reconstruction_error(wide.astype(">f8")) == native
    assert native != pq8.reconstruction_error(wide.astype(np.float32))


def test_deterministic_for_a_seed(x):
    a = kvant.PQ(16, 4, nbits=4, seed=5).fit(x).codebooks
    b = kvant.PQ(16, 4, nbits=4, seed=5).fit(x).codebooks
    assert np.array_equal(a, b)


def test_training_sample_cap(x):
    pq = kvant.PQ(16, 4, nbits=4)
    assert pq.train_rows == 256 * 16
    assert kvant.PQ(16, 4, nbits=8).train_rows == 65536
    assert kvant.PQ(16, 4, nbits=4, max_train_rows=100).train_rows == 100


def test_errors_leave_codec_usable(x, pq8):
    with pytest.raises(EmptyIndex):
        kvant.PQ(16, 4).encode(x)
    with pytest.raises(EmptyIndex):
        _ = kvant.PQ(16, 4).codebooks
    with pytest.raises(DimensionMismatch):
        pq8.encode(x[:, :8])
    bad = x[:50].copy()
    bad[17, 3] = np.nan
    with pytest.raises(InvalidInput, match="row: 17"):
        pq8.encode(bad)
    with pytest.raises(InvalidInput, match="at least 256"):
        kvant.PQ(16, 4, nbits=8).fit(x[:100])
    with pytest.raises(InvalidInput):
        pq8.decode(np.zeros((3, 5), np.uint8))
    with pytest.raises(InvalidInput):
        pq8.decode(np.zeros((3, 4), np.int32))
    before = pq8.codebooks.copy()
    with pytest.raises(InvalidInput):
        pq8.fit(bad)
    assert np.array_equal(pq8.codebooks, before)


def test_opq_beats_pq_on_anisotropic_data():
    x = _data(4000, 16, seed=2, aniso=True)
    pq = kvant.PQ(16, 4, nbits=4, seed=0).fit(x)
    opq = kvant.OPQ(16, 4, nbits=4, n_iter=8, seed=0).fit(x)
    r = opq.rotation.astype(np.float64)
    assert np.abs(r.T @ r - np.eye(16)).max() < 1e-5
    e_pq, e_opq = pq.reconstruction_error(x), opq.reconstruction_error(x)
    assert e_opq < 0.8 * e_pq, (e_opq, e_pq)
    codes = opq.encode(x[:200])
    assert codes.shape == (200, 2)
    rec = opq.decode(codes)
    assert np.allclose(rec @ opq.rotation, pq4_decode_rotated(opq, codes), atol=1e-4)


@pytest.mark.parametrize(("nbits", "bound"), [(4, 0.0722), (8, 0.0065)])
def test_sparse_rows_train_codebooks_as_good_as_faiss(nbits, bound):
    # TF-IDF-like rows: 90% zeros, unit norm. The bounds, measured on this data: 4 bits, FAISS's ProductQuantizer
    # 0.0704-0.0711 over seeds 0-2 (bound: their mean + 2%), kvant 0.0698-0.0700 (0.0760-0.0779 when k-means++ seeded
    # each subspace from 8 rows per codeword, which held ~10 distinct non-zero sub-vectors); 8 bits, FAISS
    # 0.0100-0.0103, kvant 0.0057 (0.0075-0.0077 before).
    r = np.random.default_rng(0)
    x = ((r.random((20_000, 128)) < 0.1) * r.exponential(1.0, (20_000, 128))).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    for seed in (0, 1):
        err = kvant.PQ(128, 32, nbits, seed=seed).fit(x[:16_000]).reconstruction_error(x[16_000:])
        assert err < bound, (seed, err)


def pq4_decode_rotated(opq, codes):
    raw = opq.unpacked_codes(codes)
    return np.concatenate([opq.codebooks[j][raw[:, j]] for j in range(opq.m)], axis=1)


@pytest.mark.parametrize("cls", ["PQ", "OPQ"])
def test_save_load_roundtrip(tmp_path, x, cls):
    codec = kvant.PQ(16, 4, nbits=4).fit(x) if cls == "PQ" else kvant.OPQ(16, 4, nbits=4, n_iter=2).fit(x)
    path = tmp_path / "codec.kvant"
    codec.save(path)
    back = kvant.load(path)
    assert type(back) is type(codec)
    assert np.array_equal(back.codebooks, codec.codebooks)
    assert np.array_equal(back.encode(x[:100]), codec.encode(x[:100]))
    if cls == "OPQ":
        assert np.array_equal(back.rotation, codec.rotation)
    with pytest.raises(EmptyIndex):
        kvant.PQ(16, 4).save(tmp_path / "unfitted.kvant")


def test_load_rejects_inconsistent_content(tmp_path, x):
    from kvant import persist

    pq = kvant.PQ(16, 4, nbits=4).fit(x)
    meta = pq._meta()
    persist.write(tmp_path / "a", "PQ", meta, {"codebooks": pq.codebooks[:3]})
    with pytest.raises(PersistError, match="shape"):
        kvant.load(tmp_path / "a")
    persist.write(tmp_path / "b", "PQ", dict(meta, m=5), {"codebooks": pq.codebooks})
    with pytest.raises(PersistError):
        kvant.load(tmp_path / "b")
    opq = kvant.OPQ(16, 4, nbits=4, n_iter=1).fit(x)
    arrays = opq._arrays()
    arrays["rotation"] = arrays["rotation"] * 2
    persist.write(tmp_path / "c", "OPQ", opq._meta(), arrays)
    with pytest.raises(PersistError, match="orthogonal"):
        kvant.load(tmp_path / "c")


@pytest.fixture(scope="module")
def saved_codec(tmp_path_factory, x):
    path = tmp_path_factory.mktemp("codec") / "pq.kvant"
    kvant.PQ(16, 4, nbits=4).fit(x).save(path)
    return path


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_or_truncated_file_raises_persist_error(check_corrupted_copy, saved_codec, data):
    check_corrupted_copy(saved_codec, data)


def test_pq_training_is_translation_invariant_with_wide_subvectors():
    # a common offset of 1e4 made the codebooks 7.5% worse when wide sub-vectors were assigned with a GEMM
    # (‖x‖²+‖c‖²−2x·c cancels in float32); training now uses the direct encoder for every width
    base = np.random.default_rng(0).standard_normal((20000, 64)).astype(np.float32)
    errs = [kvant.PQ(64, 2, nbits=4, seed=0).fit(x).reconstruction_error(x) for x in (base, base + np.float32(1e4))]
    assert errs[1] == pytest.approx(errs[0], rel=1e-3)


@pytest.mark.parametrize("cls", [kvant.PQ, kvant.OPQ])
@pytest.mark.parametrize("m", [8, 2])  # 8-d and 32-d sub-vectors
@pytest.mark.parametrize("exp2", [70, -85])
def test_extreme_magnitudes_train_and_encode_like_unscaled_data(cls, m, exp2):
    # Σ(x − c)² over- or underflows float32 at these magnitudes (every row went to codeword 0 and training
    # collapsed); kvant scales by a power of two, which is exact, so the result is the unscaled one, scaled
    base = np.random.default_rng(1).standard_normal((3000, 64)).astype(np.float32)
    kw = dict(n_iter=2) if cls is kvant.OPQ else {}
    ref = cls(64, m, nbits=4, seed=0, **kw).fit(base)
    x = base * np.float32(2.0**exp2)
    got = cls(64, m, nbits=4, seed=0, **kw).fit(x)
    np.testing.assert_array_equal(got.codebooks, ref.codebooks * np.float32(2.0**exp2))
    np.testing.assert_array_equal(got.encode(x), ref.encode(base))
    assert got.reconstruction_error(x) == pytest.approx(ref.reconstruction_error(base) * 4.0**exp2, rel=1e-5)


def test_opq_removes_a_large_common_offset_before_rotating(tmp_path):
    # 1e4 + 0.01·N: rotating the un-centred float32 rows kept only the offset's digits (OPQ was 2.4× worse
    # than plain PQ); with the offset removed first, identity-initialised OPQ is at least as good as PQ
    g = np.random.default_rng(0)
    d = (g.standard_normal((2000, 8)) * 0.01).astype(np.float32)
    x = d + np.float32(1e4)
    e_pq = kvant.PQ(8, 4, nbits=8).fit(x).reconstruction_error(x)
    opq = kvant.OPQ(8, 4, nbits=8).fit(x)
    assert opq.reconstruction_error(x) <= 1.02 * e_pq
    assert np.allclose(opq.mean, x.mean(axis=0), rtol=1e-6)
    assert not kvant.OPQ(8, 4, nbits=8).fit(d).mean.any()  # ordinary data: no offset, as before
    opq.save(tmp_path / "o.kvant")
    back = kvant.load(tmp_path / "o.kvant")
    assert np.array_equal(back.mean, opq.mean) and np.array_equal(back.encode(x[:50]), opq.encode(x[:50]))
    index = kvant.PQIndex(8, 4, opq=True)
    index.train(x)
    index.add(x)
    assert (index.search(x[:20], 1)[1][:, 0] == np.arange(20)).mean() >= 0.9


def test_opq_file_without_a_mean_loads_with_a_zero_mean(tmp_path):
    from kvant import persist

    x = _data(1000, 16, seed=3, aniso=True)
    opq = kvant.OPQ(16, 4, nbits=4, n_iter=2).fit(x)
    arrays = {"codebooks": opq.codebooks, "rotation": opq.rotation}  # as written before the offset fix
    persist.write(tmp_path / "old.kvant", "OPQ", opq._meta(), arrays)
    back = kvant.load(tmp_path / "old.kvant")
    assert not back.mean.any() and np.array_equal(back.encode(x[:50]), opq.encode(x[:50]))


def test_reconstruction_error_of_float64_rows_is_measured_in_float64():
    # 1e4 + 1e-4·N in float64: the float32 rounding of the rows is the whole signal; the error must be measured
    # against the rows given, not their float32 copies (it came out as 0.0)
    x = 1e4 + 1e-4 * np.random.default_rng(0).standard_normal((1000, 8))
    q = kvant.PQ(8, 4, nbits=4).fit(x)
    want = ((x - q.decode(q.encode(x)).astype(np.float64)) ** 2).sum(axis=1).mean()
    assert q.reconstruction_error(x) == pytest.approx(want, rel=1e-9)
    assert want > 1e-8


@pytest.mark.parametrize("nbits", [8, 4])
@pytest.mark.parametrize("scales", [(1.0, 1e-22), (1e19, 1e-9), (1e-30, 1e30)])
def test_subspaces_of_very_different_magnitude_encode_to_their_nearest_codeword(nbits, scales):
    # one power of two for all sub-spaces underflowed the small one's squared differences: every row took
    # codeword 0 there. Each sub-space is now scaled apart (training too).
    rng = np.random.default_rng(0)
    m, dsub, n = len(scales), 4, 600
    col = np.repeat(np.array(scales), dsub)
    x = (rng.standard_normal((n, m * dsub)) * col).astype(np.float32)
    pq = kvant.PQ(dim=m * dsub, m=m, nbits=nbits, seed=0).fit(x)
    books = pq.codebooks_.astype(np.float64)
    assert np.all(np.isfinite(books))
    codes = pq.unpacked_codes(pq.encode(x)).astype(np.int64)
    for j in range(m):
        d = ((x[:, None, j * dsub : (j + 1) * dsub].astype(np.float64) - books[j][None]) ** 2).sum(-1)
        assert np.unique(codes[:, j]).size > (1 << nbits) // 2  # trained and used, not one codeword
        got = d[np.arange(n), codes[:, j]]
        assert np.all(got <= d.min(1) * (1 + 1e-5))  # nearest up to float32 rounding


@pytest.mark.parametrize("cls", [kvant.PQ, kvant.OPQ])
@pytest.mark.parametrize("bulk,outlier", [(1.0, 1e25), (1e-22, 1.0)])
def test_a_few_rows_far_out_leave_the_others_codes_exact(cls, bulk, outlier):
    # the scale brought the *mean* squared norm near 1: 50 rows at 1e25 among 5,000 at 1 pushed the others to
    # 1e-25, their squared differences underflowed and 9,833 of 9,900 codes were wrong (a review); the mirror
    # case (99% at 1e-22, 1% at 1) went unscaled and underflowed the same way (612 wrong)
    rng = np.random.default_rng(0)
    n, dim, m = 5000, 8, 2
    x = (rng.standard_normal((n, dim)) * bulk).astype(np.float32)
    far = rng.choice(n, 50, replace=False)
    x[far] = (rng.standard_normal((50, dim)) * outlier).astype(np.float32)
    q = cls(dim, m, 8, seed=0).fit(x)
    rest = np.setdiff1d(np.arange(n), far)
    z = q._transform(x[rest]).astype(np.float64)  # the space the codebooks live in (OPQ: rotated)
    books = q.codebooks_.astype(np.float64)
    codes = q.unpacked_codes(q.encode(x[rest]))
    d = dim // m
    for j in range(m):
        dist = ((z[:, None, j * d : (j + 1) * d] - books[j][None]) ** 2).sum(-1)
        got = dist[np.arange(rest.size), codes[:, j]]
        assert np.all(got <= dist.min(1) * (1 + 1e-5))
        assert np.unique(codes[:, j]).size > 100  # the bulk was trained on too, not pushed to a few codewords


@pytest.mark.parametrize("cls", [kvant.PQ, kvant.OPQ])
@pytest.mark.parametrize("nbits", [8, 4])
def test_rows_far_outside_the_codebooks_encode_to_their_nearest_codeword(cls, nbits):
    # (review) Codebooks trained at 1e14 are not rescaled, and a row at 2e19 overflowed every float32 squared
    # difference: codeword 0 in every sub-space. Such rows are now encoded in float64, beside ordinary rows.
    rng = np.random.default_rng(0)
    dim, m = 8, 4
    train = (rng.standard_normal((4096, dim)) * 1e14).astype(np.float32)
    q = cls(dim, m, nbits, seed=0).fit(train)
    x = np.vstack([train[:50], (rng.standard_normal((5, dim)) * 1e19).astype(np.float32),
                   np.full((1, dim), 2e19, np.float32), np.full((1, dim), -3e38, np.float32)])
    if cls is kvant.OPQ:  # (a rotated coordinate can reach the row's norm, 3e38·√8: RotationOverflow, documented)
        x[-1] /= np.float32(np.sqrt(dim))
    z = q._transform(x).astype(np.float64)
    books = q.codebooks_.astype(np.float64)
    codes = q.unpacked_codes(q.encode(x))
    d = dim // m
    for j in range(m):
        dist = ((z[:, None, j * d : (j + 1) * d] - books[j][None]) ** 2).sum(-1)
        np.testing.assert_array_equal(codes[:, j], np.argmin(dist, axis=1), err_msg=f"sub-space {j}")



@pytest.mark.parametrize("cls", [kvant.PQ, kvant.OPQ])
def test_rows_far_above_tiny_codebooks_encode_without_warnings(cls):
    # (review) scaling such rows by the codebooks' power of two overflowed float32: NumPy's "overflow in cast"
    # warning leaked out of encode, and the far-row fallback re-encoded the inf copy
    import warnings

    rng = np.random.default_rng(0)
    dim, m = 8, 4
    q = cls(dim, m, 4, seed=0).fit((rng.standard_normal((600, dim)) * 1e-30).astype(np.float32))
    x = np.vstack([(rng.standard_normal((3, dim)) * 1e-30), rng.standard_normal((3, dim)),
                   rng.standard_normal((3, dim)) * 1e20]).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codes = q.unpacked_codes(q.encode(x))
    z = q._transform(x).astype(np.float64)
    books = q.codebooks_.astype(np.float64)
    d = dim // m
    for j in range(m):
        dist = ((z[:, None, j * d : (j + 1) * d] - books[j][None]) ** 2).sum(-1)
        np.testing.assert_array_equal(codes[:, j], np.argmin(dist, axis=1), err_msg=f"sub-space {j}")

def test_far_row_limit_shrinks_with_the_subvector_width():
    # (review) With dsub = 2^17 values per sub-vector, rows at 2^55.9 (under the 2^56 flag) still overflowed every
    # float32 sum: codeword 0. The limit now falls by one power of two per factor 4 of dsub beyond 2^14.
    rng = np.random.default_rng(0)
    dim = 2**17
    signs = np.sign(rng.standard_normal((16, dim))).astype(np.float32)
    q = kvant.PQ(dim, 1, 4, seed=0, max_train_rows=64).fit(np.repeat(signs * np.float32(2.0**40), 4, axis=0))
    books = q.codebooks_[0].astype(np.float64)
    x = (signs[[3, 7, 11]] * np.float32(2.0**55.9)).astype(np.float32)
    want = [int(((row.astype(np.float64) - books) ** 2).sum(1).argmin()) for row in x]
    assert q.unpacked_codes(q.encode(x))[:, 0].tolist() == want
    assert pqmod._far_limit(16) == 2.0**56 and pqmod._far_limit(2**14) == 2.0**56 and pqmod._far_limit(2**17) == 2.0**54


def test_range_scale_moves_the_extremes_into_range_and_only_then():
    rs = pqmod.range_scale
    assert rs(np.array([1e-4, 1.0, 1e20])) is None and rs(np.zeros(3)) is None  # ordinary: no copy at all
    s = rs(np.array([1.0, 1e50]))  # overflow risk: the largest lands at 2^78..2^80
    assert s < 1 and 2.0**77 <= 1e50 * s * s <= 2.0**80
    s = rs(np.array([1e-44, 8.0]))  # underflow risk only: scaled up, the largest at most 2^80
    assert s > 1 and 8.0 * s * s <= 2.0**80 and 1e-44 * s * s > 2.0**-78
    assert rs(np.array([2.0**-100, 2.0**90])) is None  # shrinking would only push the small rows further down


def test_opq_refuses_data_whose_rotation_overflows_and_codes_do_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    a = np.clip(rng.standard_normal(4000), -3, 3) * 1e38
    x = np.stack([a, a + rng.standard_normal(4000) * 1e37, rng.standard_normal(4000), rng.standard_normal(4000)],
                 1).astype(np.float32)
    o = kvant.OPQ(4, 2, 4, n_iter=5, init="eigen", seed=0)
    with pytest.raises(InvalidInput, match="overflow"):  # was: inf codewords, then a bare OverflowError
        o.fit(x)
    with pytest.raises(EmptyIndex):
        o.encode(x[:2])  # still unfitted
    o.fit(x / 4)
    with pytest.raises(InvalidInput, match="row 1 overflows"):
        o.encode(np.vstack([x[:1] / 4, [[3e38, 3e38, 0, 0]]]).astype(np.float32))
    # float32 BLAS rounded a one-row rotation differently from a many-row one: 1 row in 3,000 changed its code
    x = (rng.standard_normal((5000, 64)) * np.linspace(1, 5, 64)).astype(np.float32)
    o = kvant.OPQ(64, 64, 4, n_iter=3, seed=0).fit(x)
    x = (np.random.default_rng(0).standard_normal((20000, 64)) * np.linspace(1, 5, 64)).astype(np.float32)[:3000]
    one = np.concatenate([o.encode(x[i : i + 1]) for i in range(3000)])
    assert np.array_equal(o.encode(x), one)


@pytest.mark.parametrize("cls", [kvant.PQ, kvant.OPQ])
def test_fit_reports_each_training_step_and_is_unchanged_by_it(cls):
    x = np.random.default_rng(3).standard_normal((2000, 16)).astype(np.float32)
    kw = dict(n_iter=3) if cls is kvant.OPQ else {}
    calls = []
    with_bar = cls(16, m=4, nbits=4, seed=0, **kw).fit(x, progress=lambda phase, amount: calls.append((phase, amount)))
    plain = cls(16, m=4, nbits=4, seed=0, **kw).fit(x)
    assert calls == [("train", 1)] * with_bar.train_steps and with_bar.train_steps > 0
    np.testing.assert_array_equal(with_bar.codebooks, plain.codebooks)


def test_pq_index_train_passes_progress_to_the_codec():
    x = np.random.default_rng(4).standard_normal((1000, 8)).astype(np.float32)
    index = kvant.PQIndex(8, m=2, nbits=4)
    calls = []
    index.train(x, progress=lambda phase, amount: calls.append(amount))
    assert len(calls) == index.codec.train_steps


def test_codebooks_are_read_only():
    # the codec caches what it derives from its codewords (the search scale): writing them in place would leave it stale
    x = np.random.default_rng(0).standard_normal((600, 16)).astype(np.float32)
    pq = kvant.PQ(16, 8, nbits=4, seed=0).fit(x)
    with pytest.raises(ValueError, match="read-only"):
        pq.codebooks[...] *= np.float32(2.0**-80)
    with pytest.raises(ValueError, match="read-only"):  # the held array too (a review: searched with stale tables)
        pq.codebooks_[...] = 0.0
    opq = kvant.OPQ(16, 8, nbits=4, n_iter=1, seed=0).fit(x)
    assert not opq.codebooks_.flags.writeable
    assert pq.codebooks.base is not None and np.array_equal(pq.codebooks, pq.codebooks_)


def test_transposed_codebooks_are_kept_per_codebook_array():
    # searches reuse the codebooks in the table kernels' layout; a refit (new codebooks) must not reuse the old ones
    from kvant.kernels import pq as kpq

    g = np.random.default_rng(1)
    pq = kvant.PQ(16, 4, nbits=4, seed=0).fit(g.standard_normal((600, 16)).astype(np.float32))
    first = pq._transposed_books()
    assert pq._transposed_books() is first
    np.testing.assert_array_equal(first, kpq.transposed_codebooks(pq.codebooks))
    pq.fit((g.standard_normal((600, 16)) * 5).astype(np.float32))
    np.testing.assert_array_equal(pq._transposed_books(), kpq.transposed_codebooks(pq.codebooks))
    assert not np.array_equal(pq._transposed_books(), first)


@pytest.mark.parametrize("cls", [kvant.PQ, kvant.OPQ, kvant.PQIndex])
def test_options_after_nbits_are_keyword_only(cls):
    # (a review: PQ(32, 8, 4, 1) meant seed=1 but OPQ(32, 8, 4, 1) meant n_iter=1: positional options differed)
    with pytest.raises(TypeError):
        cls(32, 8, 4, 1) if cls is not kvant.PQIndex else cls(32, 8, 4, "l2", True)
    assert cls(32, 8, 4, seed=1).seed == 1


def test_seeding_is_validated_kept_by_save_and_load_and_has_its_documented_defaults(tmp_path):
    with pytest.raises(InvalidInput, match="unknown seeding"):
        kvant.PQ(8, 2, seeding="kmeans")
    with pytest.raises(InvalidInput, match="unknown seeding"):
        kvant.PQIndex(8, 2, seeding="density")
    x = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    for obj in (kvant.PQ(8, 2, 4, seeding="random").fit(x), kvant.OPQ(8, 2, 4, n_iter=2, seeding="random").fit(x)):
        obj.save(tmp_path / "c.kvant")
        back = kvant.load(tmp_path / "c.kvant")
        assert back.seeding == "random" and np.array_equal(back.encode(x), obj.encode(x))
    index = kvant.PQIndex(8, 2, 4, seeding="random").train(x)
    index.save(tmp_path / "i.kvant")
    assert kvant.load(tmp_path / "i.kvant").codec.seeding == "random"
    assert kvant.PQ(8, 2).seeding == "k-means++" and kvant.OPQ(8, 2).seeding == "k-means++"
    # the index follows the density at 8 bits (higher recall on every set measured), not at 4 (README)
    assert kvant.PQIndex(8, 2).codec.seeding == "random" and kvant.PQIndex(8, 2, 4).codec.seeding == "k-means++"
    assert kvant.PQIndex(8, 2, opq=True).codec.seeding == "random"


def test_split_cells_gives_each_empty_cell_half_of_a_populated_one():
    book = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, 4.0], [9.0, 9.0]], np.float32)
    counts = np.array([10.0, 0.0, 1.0, 0.0])
    pqmod._split_cells(book, counts, np.array([1, 3]), np.random.default_rng(0))
    # only cell 0 has rows to spare (1 row cannot be split): it is split twice, each half near its codeword
    assert counts.sum() == 11 and counts[2] == 1 and (counts[[0, 1, 3]] > 0).all()
    for e in (1, 3):
        assert np.allclose(book[e], [1.0, 2.0], rtol=2e-3) and not np.array_equal(book[e], [1.0, 2.0])


def test_random_seeding_follows_the_density_for_higher_recall_on_very_unequal_clusters():
    # Zipf-sized Gaussian clusters of very different widths: k-means++ spends codewords on the tails (lower MSE),
    # random rows with FAISS's split rule follow the density (recall@10 0.325 against 0.258 on two seeds at 25k rows;
    # FAISS IndexPQ 0.317)
    g = np.random.default_rng(123)
    p = 1.0 / np.arange(1, 61) ** 1.5
    lab = g.choice(60, 12_200, p=p / p.sum())
    cen, wid = 4 * g.standard_normal((60, 32)), np.exp(g.uniform(-2, 0.5, 60))
    x = (cen[lab] + wid[lab, None] * g.standard_normal((12_200, 32))).astype(np.float32)
    xb, xq = x[:12_000], x[12_000:]
    flat = kvant.FlatIndex(32)
    flat.add(xb)
    truth = flat.search(xq, 10)[1]
    recall, mse = {}, {}
    for seeding in ("k-means++", "random"):
        index = kvant.PQIndex(32, 8, seeding=seeding).train(xb)
        index.add(xb)
        found = index.search(xq, 10)[1]
        recall[seeding] = np.mean([len(set(a) & set(b)) for a, b in zip(found, truth, strict=True)]) / 10
        mse[seeding] = index.codec.reconstruction_error(xq)
    assert recall["random"] > recall["k-means++"] + 0.02, recall
    assert mse["random"] > mse["k-means++"], mse  # the trade: k-means++ keeps the lower MSE


def test_opq_auto_start_takes_eigenvalue_allocation_on_pca_like_rows_and_the_identity_otherwise():
    # PCA output: variances sorted by coordinate. From the identity the high-variance coordinates share the last
    # sub-spaces and the alternation never spreads them (128-d, m = 16: 1.44x FAISS's MSE); eigenvalue allocation
    # deals them out (0.93x)
    g = np.random.default_rng(1)
    x = (g.standard_normal((12_000, 64)) * np.linspace(0.1, 3, 64)).astype(np.float32)
    kw = dict(n_iter=5, max_train_rows=10_000)
    auto = kvant.OPQ(64, 8, 4, **kw).fit(x[:10_000])
    ident = kvant.OPQ(64, 8, 4, init="identity", **kw).fit(x[:10_000])
    eigen = kvant.OPQ(64, 8, 4, init="eigen", **kw).fit(x[:10_000])
    e_auto, e_ident, e_eigen = (o.reconstruction_error(x[10_000:]) for o in (auto, ident, eigen))
    assert e_auto == e_eigen and e_auto < 0.95 * e_ident, (e_auto, e_ident, e_eigen)  # (101 vs 115)
    # isotropic rows: the two starts tie, and ties keep the identity
    iso = g.standard_normal((6_000, 64)).astype(np.float32)
    a = kvant.OPQ(64, 8, 4, n_iter=2, max_train_rows=6_000).fit(iso)
    i = kvant.OPQ(64, 8, 4, n_iter=2, max_train_rows=6_000, init="identity").fit(iso)
    np.testing.assert_array_equal(a.rotation, i.rotation)
