"""The annulus-bounded fused assignment (kernels.annulus_assign) against the plain fused kernel and float64 brute
force."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvant.cluster import assign as cluster_assign
from kvant.cluster.assign import assign_top2
from kvant.kernels import annulus_assign, direct_assign
from kvant.kernels.annulus_assign import AnnulusCentres, annulus_top2_exact
from kvant.kernels.assign import certify_top2, label_margins
from kvant.kernels.distance import sq_norms


def _far_data(n, d, k, seed, spread=3.0, inner_weight=50.0, noise=1.0):
    """Rows around centres whose distances from the origin span ``spread`` decades (heavy tails): most rows near the
    four inner centres (each ``inner_weight`` times as likely as an outer one), a few near the outer ones."""
    g = np.random.default_rng(seed)
    dirs = g.standard_normal((k, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    c = (dirs * 10.0 ** g.uniform(0.0, spread, (k, 1))).astype(np.float32)
    near = np.argsort(np.linalg.norm(c, axis=1))
    weights = np.where(np.arange(k) < 4, inner_weight, 1.0)
    pick = near[g.choice(k, n, p=weights / weights.sum())]
    x = (c[pick] + noise * g.standard_normal((n, d))).astype(np.float32)
    return x, c


def _brute(x, c):
    """Exact nearest centres (float64, ties to the smaller id) and squared distances."""
    d = ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    lab = d.argmin(axis=1)
    return lab, d[np.arange(len(x)), lab]


def _annulus(x, c):
    n, dim = x.shape
    kappa, tiny = label_margins(dim)
    cc = AnnulusCentres(c)
    lab, d1, d2, ex = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n)
    blocks = annulus_top2_exact(x, cc, lab, d1, d2, ex, kappa, tiny)
    lab = cc.order[lab]
    certify_top2(x, c, lab, d1, d2, ex, False, sq_norms(c), kappa, tiny)
    return lab, ex, blocks, cc


def _plain(x, c):
    n, dim = x.shape
    kappa, tiny = label_margins(dim)
    cn = sq_norms(c)
    ct, cnp = direct_assign.padded_centroids(c, cn)
    lab, d1, d2, ex = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n)
    assert direct_assign.direct_top2_exact(x, ct, cnp, c, lab, d1, d2, ex, False, 0.0, 0.0)
    certify_top2(x, c, lab, d1, d2, ex, False, cn, kappa, tiny)
    return lab, ex


# rows not a multiple of the groups (8 rows up to 48 padded centres, 6 above), D = 1 and odd D, K across 16-steps
@pytest.mark.parametrize("n,d,k", [(1, 1, 17), (7, 3, 17), (29, 16, 32), (50, 17, 33), (61, 5, 48), (100, 130, 49),
                                   (203, 64, 64), (97, 31, 80)])
def test_the_annulus_pass_equals_the_plain_fused_pass_and_brute_force(n, d, k):
    x, c = _far_data(n, d, k, seed=n + d + k)
    lab, ex, blocks, cc = _annulus(x, c)
    plain_lab, plain_ex = _plain(x, c)
    np.testing.assert_array_equal(lab, plain_lab)
    np.testing.assert_array_equal(ex, plain_ex)
    ref_lab, ref_ex = _brute(x, c)
    np.testing.assert_array_equal(lab, ref_lab)
    np.testing.assert_allclose(ex, ref_ex, rtol=1e-12)
    assert 1 <= blocks <= cc.groups(n) * (cc.cn.shape[0] // annulus_assign.BLOCK)


def test_the_annulus_pass_skips_centres_a_row_cannot_reach():
    # the test fails if the bound never prunes: 99% of rows sit by the inner centres, up to 4 decades from the outer
    x, c = _far_data(3000, 24, 64, seed=1, spread=4.0, inner_weight=1500.0, noise=0.1)
    lab, ex, blocks, cc = _annulus(x, c)
    assert blocks < 0.5 * cc.groups(len(x)) * 4
    np.testing.assert_array_equal(lab, _brute(x, c)[0])


def test_the_annulus_pass_keeps_exact_ties_to_the_smaller_id():
    # duplicated centres (the same distance to every row) and rows on integer grids: ties are resolved as brute force
    # does, whatever the order the centres were sorted in
    g = np.random.default_rng(3)
    base = np.round(g.standard_normal((20, 8)) * 4).astype(np.float32)
    base[10:] *= 100
    c = np.concatenate([base, base[::-1]])  # 40 centres, each twice
    x = np.round(g.standard_normal((500, 8)) * 4).astype(np.float32)
    lab, ex, _, _ = _annulus(x, c)
    ref_lab, ref_ex = _brute(x, c)
    np.testing.assert_array_equal(lab, ref_lab)
    np.testing.assert_array_equal(ex, ref_ex)


def test_the_annulus_pass_reports_a_non_finite_row():
    x, c = _far_data(40, 8, 33, seed=5)
    x[17, 3] = np.nan
    cc = AnnulusCentres(c)
    out = np.empty(40, np.int64), np.empty(40, np.float32), np.empty(40, np.float32), np.empty(40)
    assert annulus_top2_exact(x, cc, *out, *label_margins(8)) == -1


def test_annulus_centres_refuse_a_single_block_and_mismatched_rows():
    with pytest.raises(ValueError, match="at least 17"):
        AnnulusCentres(np.zeros((16, 4), np.float32))
    cc = AnnulusCentres(np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32))
    out = np.empty(3, np.int64), np.empty(3, np.float32), np.empty(3, np.float32), np.empty(3)
    with pytest.raises(ValueError, match="columns"):
        annulus_top2_exact(np.zeros((3, 5), np.float32), cc, *out, *label_margins(5))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), d=st.integers(1, 40), k=st.integers(17, 70), spread=st.floats(0.0, 4.0),
       seed=st.integers(0, 2**31 - 1))
def test_the_annulus_pass_is_exact_on_random_geometry(n, d, k, spread, seed):
    x, c = _far_data(n, d, k, seed, spread)
    lab, ex, _, _ = _annulus(x, c)
    ref_lab, ref_ex = _brute(x, c)
    np.testing.assert_array_equal(lab, ref_lab)
    np.testing.assert_allclose(ex, ref_ex, rtol=1e-12, atol=0)


@pytest.mark.skipif(not direct_assign.AVX512, reason="the fused kernel takes K > 16 on AVX-512 hosts only")
def test_assign_top2_takes_the_annulus_pass_for_far_centres_with_the_same_results(monkeypatch):
    x, c = _far_data(5000, 32, 64, seed=7)
    calls = []
    real = annulus_assign.annulus_top2_exact

    def counted(*args):
        calls.append(real(*args))
        return calls[-1]

    monkeypatch.setattr(annulus_assign, "annulus_top2_exact", counted)
    out = {}
    for on in (False, True):
        monkeypatch.setattr(cluster_assign, "ANNULUS_ASSIGN", on)
        n = len(x)
        lab, ex = np.empty(n, np.int64), np.empty(n)
        annulus = cluster_assign.annulus_centres(c, spherical=False)
        assert (annulus is not None) == on
        assign_top2(x, c, sq_norms(c), lab, np.empty(n, np.float32), np.empty(n, np.float32), exact_sq=ex,
                    annulus=annulus)
        out[on] = lab, ex
    assert calls and all(b > 0 for b in calls)
    np.testing.assert_array_equal(out[True][0], out[False][0])
    np.testing.assert_array_equal(out[True][1], out[False][1])


def test_the_annulus_pass_turns_itself_off_where_it_saves_too_little():
    # one centre far out, the others at similar distances from the anchor: every row reaches every block
    g = np.random.default_rng(11)
    c = g.standard_normal((64, 16)).astype(np.float32)
    c[0] *= 1000
    x = g.standard_normal((600, 16)).astype(np.float32)
    cc = AnnulusCentres(c)
    assert cc.spread() > cluster_assign.AMX_MAX_NORM_SPREAD
    out = np.empty(600, np.int64), np.empty(600, np.float32), np.empty(600, np.float32), np.empty(600)
    blocks = annulus_top2_exact(x, cc, *out, *label_margins(16))
    cc.record(600, blocks)
    assert not cc.prune
    far_x, far_c = _far_data(600, 16, 64, seed=2, spread=4.0, inner_weight=1500.0, noise=0.1)
    cc = AnnulusCentres(far_c)
    cc.record(600, annulus_top2_exact(far_x, cc, *out, *label_margins(16)))
    assert cc.prune


@pytest.mark.parametrize("d", [3, 8, 33])
def test_the_annulus_bound_holds_where_it_is_nearly_tight(d):
    # The triangle inequality is tight for a centre in line with the anchor and the row, beyond the row. Row i sits at
    # t·u from the origin, the 16 inner centres (the anchor among them) within 0.001 of it (so the
    # row's two best of them are at ~t, and the bound's radius is ~2t), and its own centre at 1.995·t·u: 0.995·t from
    # the row, nearer than every inner centre, ~0.2% inside the radius. A radius 1% short would skip it.
    g = np.random.default_rng(d)
    inner = g.standard_normal((8, d))
    inner *= g.uniform(0.0002, 0.001, (8, 1)) / np.linalg.norm(inner, axis=1, keepdims=True)
    u = g.standard_normal((24, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x = u * g.uniform(3.0, 8.0, (24, 1))
    outer = 1.995 * x
    c = np.concatenate([inner, -inner, outer, -outer]).astype(np.float32)  # 64 centres
    x = x.astype(np.float32)
    cc = AnnulusCentres(c)
    assert cc.anchor_id < 16 and set(cc.order[:16]) == set(range(16))
    # one row per call: in a group the row that reaches farthest decides for all of them
    lab, ex = (np.concatenate(parts) for parts in zip(*(_annulus(x[i : i + 1], c)[:2] for i in range(len(x)))))
    ref_lab, ref_ex = _brute(x, c)
    assert np.all(ref_lab >= 16)  # every row's nearest centre lies beyond the first block
    np.testing.assert_array_equal(lab, ref_lab)
    np.testing.assert_allclose(ex, ref_ex, rtol=1e-12)


def test_annulus_centres_apply_only_to_far_l2_centres_the_fused_kernel_takes():
    _, far = _far_data(10, 16, 64, seed=4)
    near = np.random.default_rng(4).standard_normal((64, 16)).astype(np.float32)
    assert cluster_assign.annulus_centres(near, spherical=False) is None  # similar distances: nothing to skip
    assert cluster_assign.annulus_centres(far, spherical=True) is None  # unit rows: no annulus pass
    assert cluster_assign.annulus_centres(far[:16], spherical=False) is None  # one block
    assert cluster_assign.annulus_centres(np.tile(far, (2, 1)), spherical=False) is None  # K = 128 > ANNULUS_MAX_K
    assert (cluster_assign.annulus_centres(far, spherical=False) is not None) == direct_assign.AVX512


def test_a_fit_labels_every_row_the_same_with_and_without_the_annulus(monkeypatch):
    import kvant

    x, _ = _far_data(20000, 16, 48, seed=9)
    calls = []
    real = annulus_assign.annulus_top2_exact
    monkeypatch.setattr(annulus_assign, "annulus_top2_exact", lambda *a: calls.append(1) or real(*a))
    fits = {}
    for on in (True, False):
        monkeypatch.setattr(cluster_assign, "ANNULUS_ASSIGN", on)
        model = kvant.Clusterer(k=40, metric="l2", seed=3).fit(x)
        fits[on] = model.labels_, model.inertia_
    assert bool(calls) == direct_assign.AVX512  # the fitted centres are far out: the final pass took the annulus
    np.testing.assert_array_equal(fits[True][0], fits[False][0])
    assert fits[True][1] == fits[False][1]
