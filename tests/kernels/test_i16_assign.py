"""The int16 backend's pieces (kvant.kernels.i16_assign) against NumPy: the step and quantisation bounds the
certification relies on, the row conversion, and the vpmaddwd products. (Labels: tests/kernels/test_amx_assign.py,
which runs every certified-assignment test on this backend too.)"""

import warnings

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvant.kernels import i16_assign

pytestmark = pytest.mark.skipif(not i16_assign.AVAILABLE, reason="no AVX2 on this host")


def _quantise(v: np.ndarray, dim: int):
    """NumPy twin of the kernel's rounding: (q, ρ) for float32 vector v."""
    norm = float(np.sqrt((v.astype(np.float64) ** 2).sum()))
    rho = i16_assign.step(norm * (1 + 2.0**-40), dim)
    q = np.rint(v * (np.float32(1.0) / rho)).astype(np.int64)
    return q, rho


@settings(max_examples=200, deadline=None)
@given(dim=st.integers(1, 300), exponent=st.integers(-30, 30), spike=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_step_keeps_q_in_int16_and_the_residual_within_its_bound(dim, exponent, spike, seed):
    g = np.random.default_rng(seed)
    v = (g.standard_normal(dim) * 10.0**exponent).astype(np.float32)
    if spike:  # all the norm in one coordinate: |q_t| reaches ‖q‖
        v[:] = 0
        v[g.integers(dim)] = np.float32(3.0 * 10.0**exponent)
    q, rho = _quantise(v, dim)
    assert np.abs(q).max() <= 32767
    assert float((q * q).sum()) <= i16_assign.QNORM**2  # so |q_x·q_c| <= 2^30 over any subset of coordinates
    e = q.astype(np.float64) * np.float64(rho) - v.astype(np.float64)
    assert np.sqrt((e * e).sum()) <= i16_assign.E_UNIT * rho * np.sqrt(dim)
    # and the step is not wastefully coarse: ‖q‖ within a factor 1.01 of QNORM (away from zero vectors)
    assert float(np.sqrt((q * q).sum())) >= i16_assign.QNORM / 1.01 - 0.51 * np.sqrt(dim)


def test_zero_and_tiny_vectors():
    for v in (np.zeros(7, np.float32), np.full(7, 1e-38, np.float32), np.full(7, 1e-45, np.float32)):
        q, rho = _quantise(v, 7)
        assert np.isfinite(rho) and rho > 0
        assert np.abs(q).max() <= 32767


@numba.njit
def _convert_rows(x, f, mu):
    n, dim = x.shape
    a16 = np.zeros((n, dim + dim % 2), np.int16)
    vbuf = np.empty(dim, np.float32)
    sq = np.empty(n)
    rho = np.empty(n, np.float32)
    for i in range(n):
        sq[i], rho[i] = i16_assign._convert_row(x, i, f, mu, vbuf, a16, i)
    return a16, sq, rho


@pytest.mark.parametrize("dim", [1, 15, 16, 17, 47, 128, 130])
@pytest.mark.parametrize("unit", [False, True])
def test_row_conversion_matches_numpy(dim, unit):
    g = np.random.default_rng(dim)
    x = (g.standard_normal((50, dim)) * 10.0 ** g.uniform(-5, 5, (50, 1))).astype(np.float32)
    mu = g.standard_normal(dim).astype(np.float32)
    f = np.float32(0.37) if unit else np.float32(1.0)
    a16, sq, rho = _convert_rows(x, f, mu)
    v = x * f - mu  # the same float32 operations
    np.testing.assert_allclose(sq, (v.astype(np.float64) ** 2).sum(1), rtol=1e-14)
    for i in range(50):
        q, r = _quantise(v[i], dim)
        assert rho[i] == r
        np.testing.assert_array_equal(a16[i, :dim], q)


@pytest.mark.parametrize("dim,k", [(1, 1), (2, 16), (3, 17), (33, 40), (128, 256), (131, 64)])
def test_products_are_the_scaled_exact_integer_products(dim, k):
    g = np.random.default_rng(dim * 1000 + k)
    c = (g.standard_normal((k, dim)) * 3).astype(np.float32)
    c[0] = 0.0  # a zero centre: step at its floor, q = 0
    if k > 2:
        c[1, :] = 0.0
        c[1, 0] = 5.0  # one coordinate carries the norm: |q| at its largest
    mu, ct, colstep, cn, cstat = i16_assign.pack_centres(c)
    rows = 32
    a16 = np.zeros((rows, 2 * ((dim + 1) // 2)), np.int16)
    for r in range(rows):  # rows as the conversion makes them: ‖q‖ <= QNORM, the kernel's precondition
        v = (g.standard_normal(dim) * 10.0 ** g.uniform(-3, 3)).astype(np.float32)
        if r == 0:
            v[:] = 1.0  # same-sign coordinates: the largest products
        a16[r, :dim] = _quantise(v, dim)[0]
    rowstep = g.uniform(1e-3, 1e3, rows).astype(np.float32)
    g_out = np.empty((rows, 16 * ct.shape[0]), np.float32)
    i16_assign._strip_products(a16, ct, colstep, rowstep, g_out)
    qc = ct.reshape(ct.shape[0], -1, 16, 2).transpose(0, 2, 1, 3).reshape(16 * ct.shape[0], -1)  # back to (KP, 2P)
    p = a16.astype(np.int64) @ qc.astype(np.int64).T  # exact
    assert np.abs(p).max() < 2**31
    want = (p.astype(np.float32) * colstep[None, :]) * rowstep[:, None]  # the kernel's roundings, in its order
    np.testing.assert_array_equal(g_out, want)
    # and the packed centres are the centres: ρ_c q_c − w is the measured residual f (w = c − μ in float32; its
    # rounding is in the margin's 2⁻²⁰ term, as on the AMX path)
    w = (c - mu).astype(np.float64)
    f = qc[:k, :dim].astype(np.float64) * colstep[:k, None].astype(np.float64) - w
    np.testing.assert_allclose(cstat[1], np.sqrt((f**2).sum(1)), rtol=1e-9)
    assert np.all(np.isinf(cn[k:])) and np.all(colstep[k:] == 0)
    # the centres' steps are step()'s, computed for all centres at once
    norms = np.sqrt((w**2).sum(1)) * (1 + 2.0**-40)
    np.testing.assert_array_equal(colstep[:k], [i16_assign.step(float(v), dim) for v in norms])


def test_final_assignments_choose_int16_where_measured(monkeypatch):
    from kvant.cluster import assign as cluster_assign

    monkeypatch.setattr(cluster_assign, "AMX_ASSIGN", False)
    monkeypatch.setattr(cluster_assign, "I16_HOST", True)
    monkeypatch.setattr(cluster_assign, "_HALF_RATE_HOST", False)  # (an AVX2 host: K >= I16_MIN_K; Zen 4 below)
    g = np.random.default_rng(1)
    c = g.standard_normal((cluster_assign.I16_MIN_K, 128)).astype(np.float32)
    cc = cluster_assign.CertifiedCentres(c, spherical=False)
    assert cc.ok and cc.backend == "int16"
    assert not cluster_assign.CertifiedCentres(c, spherical=False, e_step=True, rows=10**6).ok  # K < 128: float32
    big = g.standard_normal((cluster_assign.I16_E_STEP_MIN_K, 128)).astype(np.float32)
    assert cluster_assign.CertifiedCentres(big, spherical=False, e_step=True, rows=10**6).backend == "int16"
    assert not cluster_assign.CertifiedCentres(big, spherical=False, e_step=True, rows=100).ok  # a small E-step
    few = cluster_assign.CERTIFIED_E_STEP_MIN_ROWS - 1  # many products, too few rows for int16's per-strip costs
    assert few * big.size > cluster_assign._ONE_REGION_MAX_WORK
    assert not cluster_assign.CertifiedCentres(big, spherical=False, e_step=True, rows=few).ok
    assert not cluster_assign.CertifiedCentres(c[:-1], spherical=False).ok  # K below I16_MIN_K
    far = c.copy()
    far[0] *= 10 * cluster_assign.AMX_MAX_NORM_SPREAD
    for far_ok in (False, True):  # far-out centres: float32, unless the host takes them (Zen 4) and K·D is large
        monkeypatch.setattr(cluster_assign, "I16_FAR_CENTRES", far_ok)
        assert not cluster_assign.CertifiedCentres(far, spherical=False).ok  # K·D = 17 × 128 < I16_FAR_MIN_KD
        wide = np.repeat(far, -(-cluster_assign.I16_FAR_MIN_KD // far.size), axis=1)  # K·D >= I16_FAR_MIN_KD
        assert cluster_assign.CertifiedCentres(wide, spherical=False).ok == far_ok
        narrow = np.ascontiguousarray(wide[:, : (cluster_assign.I16_FAR_MIN_KD - 1) // len(wide)])  # just below
        assert not cluster_assign.CertifiedCentres(narrow, spherical=False).ok
    monkeypatch.setattr(cluster_assign, "I16_HOST", False)  # e.g. AVX-512 hosts
    assert not cluster_assign.CertifiedCentres(c, spherical=False).ok


def test_centres_beyond_float32s_reach_leave_the_certified_path(monkeypatch):
    # unit rows take any centres; centres of ~3e38 overflow the packed squared norms: the float32 kernels then, no
    # overflow warnings on the way
    from kvant.cluster import assign as cluster_assign

    monkeypatch.setattr(cluster_assign, "AMX_ASSIGN", False)
    monkeypatch.setattr(cluster_assign, "I16_HOST", True)
    monkeypatch.setattr(cluster_assign, "_HALF_RATE_HOST", False)  # K = 20 takes int16 (Zen 4: only from K·D 6,144)
    c = np.eye(20, 8, dtype=np.float32) * np.float32(3e38)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cc = cluster_assign.CertifiedCentres(c, spherical=True)
    assert cc.backend == "int16" and not cc.ok


def test_certified_blocks_give_every_thread_work():
    # blocks of 8192 rows left a 1,797-row E-step (digits, K=1024) on one of two threads
    from kvant.cluster.assign import _certified_block_rows as rows

    assert rows(1797, 2) == 928 and -(-1797 // rows(1797, 2)) == 2
    assert rows(10_000, 2) == 5024 and rows(10**6, 2) == 8192 and rows(10, 2) == 32 and rows(0, 2) == 32
    assert rows(1797, 1) == 1824


def test_unit_rows_get_the_same_exact_distances_on_every_backend(monkeypatch):
    # (2026-12-05) the certified paths scaled unit rows by 1/‖x‖ from the float64 norm, the float32 paths from the norm
    # rounded to float32: a fit's mean_cosine_ (float32 path, its last E-step reused) and score() (int16) differed in
    # the last bit on offset data. Every path now takes the float64 norm.
    import kvant
    from kvant.cluster import assign as cluster_assign
    from kvant.cluster.clusterer import _assign_all
    from kvant.io import as_source

    monkeypatch.setattr(cluster_assign, "AMX_ASSIGN", False)
    monkeypatch.setattr(cluster_assign, "_HALF_RATE_HOST", False)  # K = 50 at D = 8 takes int16 on an I16_HOST
    x = (1e4 + np.random.default_rng(4).standard_normal((3000, 8))).astype(np.float32)
    c = kvant.Clusterer(50, "cos", seed=2).fit(x)
    runs = []
    for host in (False, True):
        monkeypatch.setattr(cluster_assign, "I16_HOST", host)
        assert cluster_assign.CertifiedCentres(c.cluster_centers_, spherical=True).ok == host
        runs.append(_assign_all(as_source(x), x, c.cluster_centers_, True, with_inertia=True))
        assert c.score(x) == c.mean_cosine_
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_zen4_final_assignments_take_int16_only_where_it_was_faster(monkeypatch):
    # (2026-12-06) the float32 kernels for few centres beat int16 below K·D = 6,144 unless K >= 128 at D >= 16
    from kvant.cluster import assign as cluster_assign

    monkeypatch.setattr(cluster_assign, "AMX_ASSIGN", False)
    monkeypatch.setattr(cluster_assign, "I16_HOST", True)
    monkeypatch.setattr(cluster_assign, "_HALF_RATE_HOST", True)
    g = np.random.default_rng(2)

    def backend(k, dim):
        return cluster_assign.CertifiedCentres(g.standard_normal((k, dim)).astype(np.float32), spherical=False).backend

    for k, dim, want in ((17, 128, None), (32, 128, None), (48, 128, "int16"), (64, 128, "int16"), (24, 256, "int16"),
                         (17, 784, "int16"), (64, 64, None), (96, 64, "int16"), (64, 16, None), (128, 16, "int16"),
                         (128, 8, None), (16, 784, None)):
        assert backend(k, dim) == want, (k, dim)
