"""Certified assignment against exact float64 nearest centres, with each product backend: AMX bf16 tiles
(kvant.kernels.amx_assign, AMX hosts only) and int16 products (kvant.kernels.i16_assign, AVX2 hosts). A backend the
host lacks skips (the float32 kernels serve there and have their own tests)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import kvant
from kvant.cluster import assign as cluster_assign
from kvant.kernels import amx_assign, i16_assign

needs_amx = pytest.mark.skipif(not amx_assign.AVAILABLE, reason="no AMX on this host")


@pytest.fixture(params=[pytest.param("amx", marks=needs_amx),
                        pytest.param("int16", marks=pytest.mark.skipif(not i16_assign.AVAILABLE, reason="no AVX2"))])
def backend(request):
    return request.param


NO_ROWS = np.empty(0, np.int64)
NO_LOWER = np.empty(0, np.float32)
NO_NEAREST = np.empty((0, 0), np.int32)


def _exact(x, c, unit=False):
    x64 = x.astype(np.float64)
    if unit:
        x64 = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    d = ((x64[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    return d  # (n, K): argmin(1) is the exact label, ties to the smaller id


def _near_ties(g, n, dim, k, offset=0.0):
    """Centres, and rows near the midpoints of centre pairs, nudged towards one of them by 1e-6 to 1e-1 of their
    distance (log-uniform: gaps from far below to far above bf16's error), plus duplicated centres (exact ties)."""
    c = (g.standard_normal((k, dim)) + offset).astype(np.float32)
    if k > 2:
        c[k - 1] = c[0]  # an exact tie: the smaller id must win
    a, b = g.integers(0, k, n), g.integers(0, k, n)
    t = 0.5 + (g.choice([-1.0, 1.0], n) * 10.0 ** g.uniform(-6, -1, n))[:, None]
    x = (c[a] * t + c[b] * (1 - t)).astype(np.float32)
    return x, c


def _assign(backend, x, c, rows, unit, labels, exact, low, near, inner_lower=False, narrow=False):
    """The backend's assign_rows; ``narrow``: with the centre terms of the margin zeroed (their norms and rounding
    residuals) and no accumulation term."""
    if backend == "amx":
        mu, bt, cn, cstat = amx_assign.pack_centres(c)
        if narrow:
            cstat[:2] = 0.0
        return amx_assign.assign_rows(x, rows, c, mu, bt, cn, cstat, 0.0 if narrow else amx_assign.gamma(x.shape[1]),
                                      inner_lower, unit, amx_assign.TILE_CONFIG, labels, exact, low, near)
    mu, ct, colstep, cn, cstat = i16_assign.pack_centres(c)
    if narrow:
        cstat[:] = 0.0
    return i16_assign.assign_rows(x, rows, c, mu, ct, colstep, cn, cstat, inner_lower, unit, labels, exact, low, near)


def _run(backend, x, c, rows=NO_ROWS, unit=False, lower=False, m=0, inner_lower=False):
    n = rows.shape[0] if rows.shape[0] else x.shape[0]
    labels, exact = np.empty(n, np.int64), np.empty(n, np.float64)
    low = np.empty(n, np.float32) if lower else NO_LOWER
    near = np.empty((n, m), np.int32) if m else NO_NEAREST
    fb = _assign(backend, x, c, rows, unit, labels, exact, low, near, inner_lower)
    return labels, exact, low, near, fb


@pytest.mark.parametrize("n,dim,k", [(0, 3, 2), (1, 1, 1), (40, 1, 5), (70, 17, 33), (100, 33, 64), (65, 130, 65),
                                     (200, 64, 200)])
def test_labels_are_the_exact_nearest_centres_on_near_ties(n, dim, k, backend):
    g = np.random.default_rng(n + dim + k)
    x, c = _near_ties(g, n, dim, k)
    d = _exact(x, c)
    labels, exact, *_ = _run(backend, x, c)
    np.testing.assert_array_equal(labels, d.argmin(1) if n else labels)
    np.testing.assert_allclose(exact, d.min(1) if n else exact, rtol=1e-12)


def test_large_offset_wide_range_and_listed_rows(backend):
    g = np.random.default_rng(3)
    x, c = _near_ties(g, 300, 40, 70, offset=1e3)
    x[:, :5] *= 1e3  # a 1e6 range between coordinates
    c[:, :5] *= 1e3
    rows = np.array([299, 0, 17, 17, 150], np.int64)
    d = _exact(x, c)
    labels, exact, *_ = _run(backend, x, c, rows=rows)
    np.testing.assert_array_equal(labels, d.argmin(1)[rows])
    np.testing.assert_allclose(exact, d.min(1)[rows], rtol=1e-12)


def test_unit_rows_and_zero_rows(backend):
    g = np.random.default_rng(4)
    x, c = _near_ties(g, 120, 24, 64)
    c = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
    x[7] = 0.0
    labels, exact, *_ = _run(backend, x, c, unit=True)
    assert labels[7] == -1
    keep = np.arange(120) != 7
    d = _exact(x[keep], c, unit=True)
    np.testing.assert_array_equal(labels[keep], d.argmin(1))
    np.testing.assert_allclose(exact[keep], d.min(1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize("lower", [False, True])
def test_rows_holding_nan_or_inf_are_flagged_and_leave_the_others_exact(unit, lower, backend):
    # kvant.cluster.clusterer._assign_all checks unvalidated rows through these outputs instead of a pass of its own:
    # a row holding NaN/inf must get a non-finite exact distance (or, as a unit row, the zero-row label -1), every
    # other row its exact nearest centre; and labels stay valid centre ids (no stray index into the centres)
    g = np.random.default_rng(9)
    x, c = _near_ties(g, 130, 40, 24, offset=3.0)
    if unit:
        c = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
    bad = {3: np.nan, 40: np.inf, 41: -np.inf, 97: np.nan, 129: np.inf}
    for r, v in bad.items():
        x[r, r % 40] = v
    x[64, :] = np.nan  # a row of nothing else
    bad[64] = np.nan
    labels, exact, low, *_ = _run(backend, x, c, unit=unit, lower=lower)
    flagged = ~np.isfinite(exact) | (labels < 0)
    np.testing.assert_array_equal(np.flatnonzero(flagged), sorted(bad))
    assert ((labels >= -1) & (labels < c.shape[0])).all()
    keep = ~flagged
    d = _exact(x[keep], c, unit=unit)
    np.testing.assert_array_equal(labels[keep], d.argmin(1))
    np.testing.assert_allclose(exact[keep], d.min(1), rtol=1e-9, atol=1e-12)


def test_runner_up_lower_bound_and_candidates_hold_the_label(backend):
    g = np.random.default_rng(5)
    x, c = _near_ties(g, 500, 48, 96)
    d = _exact(x, c)
    labels, exact, low, near, fb = _run(backend, x, c, lower=True, m=5)
    assert fb > 0  # near ties did take the exact path
    runner_up = np.sort(d, axis=1)[:, 1]
    assert np.all(low <= runner_up * (1 + 1e-6))
    assert np.all((near == labels[:, None]).any(axis=1))
    # on well-separated rows the bound is informative, not just 0
    assert np.median(low / runner_up) > 0.9


def test_a_too_narrow_margin_is_caught(backend):
    # the certification is what makes the labels exact: with the centre terms of the margin zeroed (their norms and
    # rounding residuals, the accumulation term), the near ties are mislabelled
    g = np.random.default_rng(6)
    x, c = _near_ties(g, 2000, 64, 64)
    labels, exact = np.empty(2000, np.int64), np.empty(2000)
    _assign(backend, x, c, NO_ROWS, False, labels, exact, NO_LOWER, NO_NEAREST, narrow=True)
    assert (labels != _exact(x, c).argmin(1)).sum() > 0


@pytest.mark.parametrize("metric", ["l2", "cos"])
def test_clusterer_labels_are_exact_with_the_certified_path(metric, backend, tmp_path, monkeypatch):
    monkeypatch.setattr(cluster_assign, "AMX_MIN_KD", 0)  # small data, certified path all the same
    if backend == "int16":
        monkeypatch.setattr(cluster_assign, "AMX_ASSIGN", False)
        monkeypatch.setattr(cluster_assign, "I16_HOST", True)
        monkeypatch.setattr(cluster_assign, "_HALF_RATE_HOST", False)  # (Zen 4 takes int16 from K·D 6,144 only)
    centres = np.eye(cluster_assign.AMX_MIN_K, 20, dtype=np.float32)
    assert cluster_assign.CertifiedCentres(centres, False).backend == backend
    g = np.random.default_rng(7)
    x = (g.standard_normal((6000, 20)) + g.integers(0, 8, 6000)[:, None]).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    c = kvant.Clusterer(k=cluster_assign.AMX_MIN_K, metric=metric, seed=0).fit(np.load(path, mmap_mode="r"))
    d = _exact(x, c.cluster_centers_, unit=metric == "cos")
    np.testing.assert_array_equal(c.labels_, d.argmin(1))
    want = d.min(1).sum() * (0.5 if metric == "cos" else 1.0)
    np.testing.assert_allclose(c.inertia_, want, rtol=1e-9)
    np.testing.assert_array_equal(c.predict(x), c.labels_)


def test_e_step_matches_the_float32_path_where_that_is_unambiguous(backend, monkeypatch):
    monkeypatch.setattr(cluster_assign, "AMX_MIN_KD", 0)
    monkeypatch.setattr(cluster_assign, "AMX_MIN_K", 0)
    if backend == "int16":  # the certified E-step at this small size
        monkeypatch.setattr(cluster_assign, "AMX_ASSIGN", False)
        monkeypatch.setattr(cluster_assign, "I16_HOST", True)
        monkeypatch.setattr(cluster_assign, "I16_E_STEP_MIN_K", 0)
        monkeypatch.setattr(cluster_assign, "_ONE_REGION_MAX_WORK", 0)
    monkeypatch.setattr(cluster_assign, "CERTIFIED_E_STEP_MIN_ROWS", 0)
    g = np.random.default_rng(8)
    x = g.standard_normal((3000, 32)).astype(np.float32)
    c = x[:80].copy()
    cc = cluster_assign.CertifiedCentres(c, spherical=False, e_step=True, rows=3000)
    assert cc.ok and cc.backend == backend  # the certified path is the one under test
    xn = (x.astype(np.float64) ** 2).sum(1).astype(np.float32)
    out = [np.empty(3000, np.int64), np.empty(3000, np.float32), np.empty(3000, np.float32)]
    cluster_assign.e_step(x, c, *out, xn)
    monkeypatch.setattr(cluster_assign, "AMX_ASSIGN", False)
    monkeypatch.setattr(cluster_assign, "I16_ASSIGN", False)
    ref = [np.empty(3000, np.int64), np.empty(3000, np.float32), np.empty(3000, np.float32)]
    cluster_assign.e_step(x, c, *ref, xn)
    d = np.sort(_exact(x, c), axis=1)
    clear = d[:, 1] - d[:, 0] > 1e-3 * d[:, 1]
    np.testing.assert_array_equal(out[0][clear], ref[0][clear])
    np.testing.assert_array_equal(out[0], _exact(x, c).argmin(1))  # and every label is the exact nearest centre
    np.testing.assert_allclose(out[1], d[:, 0], rtol=1e-6, atol=1e-6)
    assert np.all(out[2] <= d[:, 1] * (1 + 1e-6))


def _smallest_amx_centres(g):
    """AMX_MIN_K Gaussian centres of the fewest dimensions AMX serves, and the fewest rows of a certified E-step."""
    dim = -(-cluster_assign.AMX_MIN_KD // cluster_assign.AMX_MIN_K)
    c = g.standard_normal((cluster_assign.AMX_MIN_K, dim)).astype(np.float32)
    return c, cluster_assign.CERTIFIED_E_STEP_MIN_ROWS


@needs_amx
def test_centres_with_far_outliers_scan_inner_centres_in_e_steps(monkeypatch):
    c, rows = _smallest_amx_centres(np.random.default_rng(9))
    dim = c.shape[1]
    cc = cluster_assign.CertifiedCentres(c, spherical=False, e_step=True, rows=rows)
    assert cc.ok and not cc.inner_lower
    c[0] *= 100 * cluster_assign.AMX_MAX_NORM_SPREAD
    cc = cluster_assign.CertifiedCentres(c, spherical=False, e_step=True, rows=rows)
    assert cc.ok and cc.inner_lower  # far centres: E-steps scan the inner centres only
    assert cluster_assign.CertifiedCentres(c, spherical=False).ok  # final assignments handle far centres anyway
    monkeypatch.setattr(cluster_assign, "AMX_E_STEP_INNER", False)
    assert not cluster_assign.CertifiedCentres(c, spherical=False, e_step=True, rows=rows).ok  # the float32 path
    assert not cluster_assign.CertifiedCentres(c[: cluster_assign.AMX_MIN_K - 1], spherical=False).ok
    assert not cluster_assign.CertifiedCentres(c[:, : dim // 2], spherical=False).ok  # K·D below AMX_MIN_KD


@needs_amx
def test_small_e_steps_take_the_float32_kernels(monkeypatch):
    # below CERTIFIED_E_STEP_MIN_ROWS rows an AMX E-step cost 1.2-2.3x the float32 one (docs/auto.md); final
    # assignments of any size stay certified (exact labels)
    g = np.random.default_rng(10)
    c, rows = _smallest_amx_centres(g)
    dim = c.shape[1]
    assert cluster_assign.CertifiedCentres(c, spherical=False, e_step=True, rows=rows).backend == "amx"
    assert not cluster_assign.CertifiedCentres(c, spherical=False, e_step=True, rows=rows - 1).ok
    assert cluster_assign.CertifiedCentres(c, spherical=False).ok
    x = g.standard_normal((1000, dim)).astype(np.float32)
    xn = (x.astype(np.float64) ** 2).sum(1).astype(np.float32)
    out = [np.empty(1000, np.int64), np.empty(1000, np.float32), np.empty(1000, np.float32)]
    cluster_assign.e_step(x, c, *out, xn)
    monkeypatch.setattr(cluster_assign, "AMX_ASSIGN", False)
    ref = [np.empty(1000, np.int64), np.empty(1000, np.float32), np.empty(1000, np.float32)]
    cluster_assign.e_step(x, c, *ref, xn)
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a, b)


def test_per_centre_margins_certify_rows_a_far_centre_would_block(backend):
    # one centre 1e3 away: the quick test (largest centre norm) certifies nothing, the per-centre margins still
    # leave a single candidate for the rows near the bulk, and the labels stay exact
    g = np.random.default_rng(10)
    c = g.standard_normal((40, 24)).astype(np.float32)
    c[39] = 1e3
    x = (c[g.integers(0, 39, 400)] + g.standard_normal((400, 24)) * 0.05).astype(np.float32)
    labels, exact, low, _, multi = _run(backend, x, c, lower=True)
    d = _exact(x, c)
    np.testing.assert_array_equal(labels, d.argmin(1))
    assert multi < 40
    assert np.all(low <= np.sort(d, axis=1)[:, 1] * (1 + 1e-6))


def test_unit_rows_in_a_narrow_cone(backend):
    # every row and centre within ~1e-3 of one direction: the centred rows are tiny, so the rounding of the row's
    # 1/‖x‖ scaling (relative to the unit row, not to the centred one) is what the margin must cover
    g = np.random.default_rng(11)
    axis = g.standard_normal(48)
    axis /= np.linalg.norm(axis)
    spread = 1e-3
    c = axis + spread * g.standard_normal((64, 48))
    c = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
    x, _ = _near_ties(g, 600, 48, 64)
    x = (c[g.integers(0, 64, 600)] * 3.0 + spread * 0.3 * x).astype(np.float32)  # not unit: the kernel scales
    d = _exact(x, c, unit=True)
    labels, exact, *_ = _run(backend, x, c, unit=True)
    np.testing.assert_array_equal(labels, d.argmin(1))
    np.testing.assert_allclose(exact, d.min(1), rtol=1e-9, atol=1e-15)


# final assignment (inner centres), Lloyd's E-step (every centre), E-step with inner_lower (inner centres)
@pytest.mark.parametrize("lower,inner_lower", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("far_share", [0.05, 0.3])
def test_far_centres_and_the_norm_ordered_quick_test_keep_labels_exact(far_share, lower, inner_lower, backend):
    # heavy-tailed centres: a share of them 20-200× further out than the rest, near ties in the bulk and rows near the
    # far centres as well, duplicated centres (exact ties, smaller id wins) among both. In final assignments the
    # triangle inequality rules out the outer centres and the inner ones are visited in norm order: labels and exact
    # distances (and, in E-steps, runner-up bounds) must all stay exact.
    g = np.random.default_rng(12)
    x, c = _near_ties(g, 1500, 40, 96)
    n_far = int(far_share * 96)
    c[1 : n_far + 1] *= g.uniform(20, 200, (n_far, 1)).astype(np.float32)
    c[n_far + 1] = c[1]  # a far duplicate
    x[:300] = (c[g.integers(1, n_far + 2, 300)] * (1 + 1e-4 * g.standard_normal((300, 1)))).astype(np.float32)
    x[300:310] = c[1]  # exactly on the far duplicate pair
    d = _exact(x, c)
    labels, exact, low, _, _ = _run(backend, x, c, lower=lower, inner_lower=inner_lower)
    np.testing.assert_array_equal(labels, d.argmin(1))
    np.testing.assert_allclose(exact, d.min(1), rtol=1e-12)
    if lower:
        assert np.all(low <= np.sort(d, axis=1)[:, 1] * (1 + 1e-6))


@pytest.mark.parametrize("inner_lower", [False, True])
def test_an_outer_centre_as_runner_up_keeps_the_lower_bound_valid(inner_lower, backend):
    # rows at centre A (norm 100) whose runner-up is B (norm 110, same direction) — an *outer* centre for them: the
    # runner-up bound then comes from B's norm gap and must stay below the true distance to B
    g = np.random.default_rng(14)
    dim = 32
    u = g.standard_normal(dim)
    u /= np.linalg.norm(u)
    c = np.zeros((8, dim), np.float32)
    c[:2] = g.standard_normal((2, dim)) * 0.5
    c[2], c[3] = 100 * u, 110 * u
    for j in range(4, 8):  # far out in other directions: at most half the centres stay inner for these rows
        w = g.standard_normal(dim)
        c[j] = 1000 * w / np.linalg.norm(w)
    x = (c[2] + 0.3 * g.standard_normal((200, dim))).astype(np.float32)
    d = _exact(x, c)
    labels, exact, low, _, _ = _run(backend, x, c, lower=True, inner_lower=inner_lower)
    np.testing.assert_array_equal(labels, d.argmin(1))
    np.testing.assert_allclose(exact, d.min(1), rtol=1e-12)
    assert np.all(low <= np.sort(d, axis=1)[:, 1] * (1 + 1e-6))


def test_the_refcount_free_loop_compiles_first_in_a_fresh_process(backend, tmp_path):
    # Functions called from a loop compiled with _nrt=False are compiled under the same flags, and an allocation in
    # them does not compile. Whether that showed depended on what an earlier call had compiled (or a warm cache had
    # kept): a fresh process whose first kvant call was an E-step on the tile path failed. Run exactly that.
    call = {
        "amx": "mu, bt, cn, cstat = amx_assign.pack_centres(c)\n"
               "amx_assign.assign_rows(x, np.empty(0, np.int64), c, mu, bt, cn, cstat, amx_assign.gamma(40), False,\n"
               "                       False, amx_assign.TILE_CONFIG, labels, exact, low, near)\n",
        "int16": "mu, ct, cs, cn, cstat = i16_assign.pack_centres(c)\n"
                 "i16_assign.assign_rows(x, np.empty(0, np.int64), c, mu, ct, cs, cn, cstat, False, False, labels,\n"
                 "                       exact, low, near)\n",
    }[backend]
    code = (
        "import numpy as np\n"
        "from kvant.kernels import amx_assign, i16_assign\n"
        "g = np.random.default_rng(0)\n"
        "x = g.standard_normal((100, 40)).astype(np.float32)\n"
        "c = g.standard_normal((130, 40)).astype(np.float32)\n"
        "n = x.shape[0]\n"
        "labels, exact, low = np.empty(n, np.int64), np.empty(n), np.empty(n, np.float32)\n"
        "near = np.empty((n, 16), np.int32)\n"
        + call +
        "d = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)\n"
        "assert (labels == d.argmin(1)).all()\n"
        "assert all(labels[i] in near[i] for i in range(n))\n"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("lower", [False, True])
@pytest.mark.parametrize("scale_exp", [64, 70, 76])
def test_rows_and_centres_next_to_the_median_below_float32s_normal_range(scale_exp, lower, backend):
    # rows and most centres within 2^-scale_exp of the centres' median (0 here): their squared distances are subnormal
    # or below float32's range, where rounding is absolute (up to 2^-150, or a flush to zero on AMX), not relative
    g = np.random.default_rng(scale_exp)
    dim, k = 8, 40
    c = np.zeros((k, dim), np.float32)
    c[:16] = np.concatenate([np.eye(dim), -np.eye(dim)])  # keep the median at 0 and some centres of norm 1
    tiny = 2.0**-scale_exp
    c[16:] = (g.standard_normal((k - 16, dim)) * tiny).astype(np.float32)
    c[k - 1] = c[16]  # an exact tie: the smaller id wins
    x = (c[g.integers(16, k, 2000)] + g.standard_normal((2000, dim)) * tiny * 0.3).astype(np.float32)
    x[:50] = c[g.integers(16, k, 50)]  # rows on a centre
    d = _exact(x, c)
    labels, exact, low, _, _ = _run(backend, x, c, lower=lower)
    np.testing.assert_array_equal(labels, d.argmin(1))
    np.testing.assert_allclose(exact, d.min(1), rtol=1e-12, atol=0.0)
    if lower:
        assert np.all(low.astype(np.float64) <= np.sort(d, axis=1)[:, 1])


def test_unit_rows_of_extreme_norm(backend):
    # cos: 1/‖x‖ overflows float32 below ‖x‖ ~ 3e-39 (and a zero coordinate times inf was NaN) and is subnormal above
    # ~3e38; such rows are settled by exact distances, the others as usual
    g = np.random.default_rng(15)
    dim, k = 16, 33
    c = g.standard_normal((k, dim))
    c = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
    mags = np.array([1e-44, 1e-40, 1e-38, 1e-25, 1e-3, 1.0, 1e20, 1e30, 1e37, 3e38])
    base = g.standard_normal((mags.size * 20, dim))
    base[:, 0] = 0.0
    x = (base / np.abs(base).max(1, keepdims=True) * np.repeat(mags, 20)[:, None]).astype(np.float32)
    labels, exact, *_ = _run(backend, x, c, unit=True)
    d = _exact(x, c, unit=True)
    np.testing.assert_array_equal(labels, d.argmin(1))
    np.testing.assert_allclose(exact, d.min(1), rtol=1e-9, atol=1e-12)


def test_the_runner_up_bound_is_rounded_down(backend):
    # every centre twice: the runner-up distance equals the best one, and float32 rounding to nearest would put half
    # of the bounds above it
    g = np.random.default_rng(16)
    k, dim, n = 64, 16, 2000
    c = g.standard_normal((k, dim)).astype(np.float32)
    c[32:] = c[:32]
    x = (c[g.integers(0, k, n)] + 0.3 * g.standard_normal((n, dim))).astype(np.float32)
    labels, exact, low, _, _ = _run(backend, x, c, lower=True)
    d = _exact(x, c)
    np.testing.assert_array_equal(labels, d.argmin(1))
    d[np.arange(n), labels] = np.inf
    assert np.all(low.astype(np.float64) <= d.min(1))
