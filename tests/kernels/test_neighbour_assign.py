"""Neighbour-list E-steps (kernels.neighbour_assign, cluster.neighbours) against float64 brute force, with fresh and
stale lists, and Lloyd with and without them."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvant
from kvant.cluster import lloyd as lloyd_mod
from kvant.cluster import neighbours
from kvant.cluster.lloyd import lloyd
from kvant.cluster.neighbours import NeighbourSteps
from kvant.kernels.neighbour_assign import (
    TIE_PER_DIM,
    centre_neighbours,
    centre_neighbours_range,
    neighbour_e_step_numpy,
    neighbour_e_step_range,
    prefix_coords,
)

_NO_ROWS = np.empty(0, np.int64)


def _brute_lists(c, L):
    """Each centre's L nearest others by float64 distance (ties to the smaller id), and the next one's distance."""
    d = np.sqrt(((c[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1))
    k = c.shape[0]
    nbr = np.empty((k, L), np.int64)
    nd = np.empty((k, L))
    reach = np.full(k, np.inf)
    for a in range(k):
        others = [j for j in range(k) if j != a]
        order = sorted(others, key=lambda j: (d[a, j], j))
        nbr[a] = order[:L]
        nd[a] = d[a, order[:L]]
        if len(order) > L:
            reach[a] = d[a, order[L]]
    return nbr, nd, reach


def _data(n, d, k, seed, dup=False):
    g = np.random.default_rng(seed)
    c = g.standard_normal((k, d)).astype(np.float32)
    if dup and k > 3:
        c[1] = c[0]  # a duplicated centre: ties
        c[3, 0] = c[2, 0]
    x = (c[g.integers(0, k, n)] + 0.3 * g.standard_normal((n, d))).astype(np.float32)
    m = min(n, k, 3)
    x[:m] = c[:m]  # rows on centres
    return x, c


@pytest.mark.parametrize("k,d,L", [(2, 1, 1), (3, 2, 2), (17, 2, 4), (40, 3, 39), (130, 2, 32), (33, 5, 8)])
def test_centre_neighbours_match_brute_force(k, d, L):
    _, c = _data(10, d, k, seed=k, dup=True)
    nbr, nd, reach = centre_neighbours(c, L)
    bn, bd, br = _brute_lists(c, min(L, k - 1))
    np.testing.assert_allclose(nd, bd, rtol=1e-12)
    np.testing.assert_array_equal(nbr, bn)
    np.testing.assert_allclose(reach, br, rtol=1e-12)


def test_centre_neighbours_hint_ranks_only_close_centres_and_falls_back_when_too_small():
    _, c = _data(10, 2, 200, seed=1)
    k, L = c.shape[0], 16
    full = centre_neighbours(c, L)
    for hint in (np.full(k, np.inf), (full[2] * (1 + 1e-9)) ** 2, np.full(k, 1e-30)):  # exact, tight, too small
        nbr = np.empty((k, L), np.int32)
        nd = np.empty((k, L))
        reach = np.empty(k)
        far = np.empty(k, np.int32)
        centre_neighbours_range(c, nbr, nd, reach, far, hint, 0, k)
        np.testing.assert_array_equal(nbr, full[0])
        np.testing.assert_array_equal(nd, full[1])
        np.testing.assert_array_equal(reach, full[2])
        d_far = np.sqrt(((c[far].astype(np.float64) - c.astype(np.float64)) ** 2).sum(1))
        np.testing.assert_allclose(d_far, reach, rtol=1e-12)


def _check(x, c, rows, lab, d1, d2):
    """Proven rows (label >= 0) hold the exact nearest centre, its squared distance, and a runner-up bound."""
    ref_lab, ref1, ref2 = neighbour_e_step_numpy(x[rows], c)
    ok = lab >= 0
    np.testing.assert_array_equal(lab[ok], ref_lab[ok])
    np.testing.assert_allclose(d1[ok], ref1[ok], rtol=1e-6, atol=1e-30)
    assert np.all(d2[ok] <= ref2[ok] * (1 + 1e-6) + 1e-30)  # a lower bound on the runner-up
    return ok


@pytest.mark.parametrize("n,d,k,L", [(1, 1, 2, 1), (37, 2, 3, 2), (500, 2, 130, 32), (300, 3, 64, 6),
                                     (257, 5, 20, 19), (400, 2, 50, 3)])
@pytest.mark.parametrize("dup", [False, True])
@pytest.mark.parametrize("prefix", [0, 1, 4, 40])
def test_neighbour_e_step_exact_from_any_start(n, d, k, L, dup, prefix):
    x, c = _data(n, d, k, seed=n + k, dup=dup)
    g = np.random.default_rng(7)
    nbr, nd, reach = centre_neighbours(c, L)
    rows = np.arange(n, dtype=np.int64)
    for start in (neighbour_e_step_numpy(x, c)[0], g.integers(0, k, n)):  # settled, and random starts
        lab = np.empty(n, np.int64)
        d1 = np.empty(n, np.float32)
        d2 = np.empty(n, np.float32)
        nbc = prefix_coords(c, nbr, prefix)
        scanned = neighbour_e_step_range(x, _NO_ROWS, c, start.astype(np.int64), nbr, nbc, nd, reach, np.zeros(k),
                                         lab, d1, d2, 0, n)
        ok = _check(x, c, rows, lab, d1, d2)
        assert scanned >= 0
        if L == k - 1:  # a list of every other centre proves every row but near-ties (left to the fused pass)
            _, r1, r2 = neighbour_e_step_numpy(x, c)
            tied = r2 <= r1 * (1 + TIE_PER_DIM * d) * (1 + 1e-12)
            assert ok[~tied].all()
    # settled rows on full lists visit few centres, and rows=: the listed rows only, in order
    sub = g.permutation(n)[: max(1, n // 3)].astype(np.int64)
    lab = np.full(sub.size, -7, np.int64)
    d1 = np.empty(sub.size, np.float32)
    d2 = np.empty(sub.size, np.float32)
    start = neighbour_e_step_numpy(x[sub], c)[0].astype(np.int64)
    neighbour_e_step_range(x, sub, c, start, nbr, prefix_coords(c, nbr, 2), nd, reach, np.zeros(k), lab, d1, d2, 0,
                           sub.size)
    assert not np.any(lab == -7)
    _check(x, c, sub, lab, d1, d2)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(2, 60), d=st.integers(1, 4), moves=st.integers(1, 4),
       scale=st.sampled_from([1e-4, 1e-2, 0.3, 3.0]))
def test_stale_lists_stay_exact_after_centres_move(seed, k, d, moves, scale):
    """NeighbourSteps keeps stale lists with a shrink bound, or rebuilds them: either way every proven row is exact."""
    g = np.random.default_rng(seed)
    x, c = _data(300, d, k, seed=seed % 1000)
    steps = NeighbourSteps(c, length=max(1, k // 3))
    lab = neighbour_e_step_numpy(x, c)[0].astype(np.int64)
    for _ in range(moves):
        c = (c + scale * g.standard_normal(c.shape)).astype(np.float32)
        steps.update(c)
        new = np.empty(x.shape[0], np.int64)
        d1 = np.empty(x.shape[0], np.float32)
        d2 = np.empty(x.shape[0], np.float32)
        left = steps.assign(x, c, None, lab, new, d1, d2)
        np.testing.assert_array_equal(left, np.flatnonzero(new < 0))
        _check(x, c, np.arange(x.shape[0]), new, d1, d2)
        ref = neighbour_e_step_numpy(x, c)[0]
        new[left] = ref[left]
        lab = new


def test_nan_move_rebuilds():
    x, c = _data(50, 2, 10, seed=3)
    steps = NeighbourSteps(c, length=4)
    bad = c.copy()
    bad[0, 0] = np.nan
    steps.update(bad)  # a non-finite move: lists rebuilt from scratch, no stale bound
    assert np.all(steps.shrink == 0)


def _grid_blobs(n, k, seed):
    """2-D rows around K centres on a jittered grid: small neighbourhoods, the case the lists are for."""
    g = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(k)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:k].astype(np.float64)
    centres = grid + 0.2 * g.standard_normal(grid.shape)
    return (centres[g.integers(0, k, n)] + 0.25 * g.standard_normal((n, 2))).astype(np.float32)


def test_lloyd_with_neighbour_steps_matches_full_e_steps(monkeypatch):
    x = _grid_blobs(20_000, 256, seed=0)
    g = np.random.default_rng(1)
    c0 = x[g.choice(x.shape[0], 256, replace=False)]
    calls = []
    real = NeighbourSteps.assign

    def spy(self, *a, **kw):
        out = real(self, *a, **kw)
        calls.append(out.size)
        return out

    monkeypatch.setattr(NeighbourSteps, "assign", spy)
    monkeypatch.setattr(neighbours, "UPKEEP", 0.1)  # (judged worthwhile at this small K)
    monkeypatch.setattr(neighbours, "MIN_K", 128)
    monkeypatch.setattr(lloyd_mod, "NEIGHBOUR_E_STEPS", True)
    on = lloyd(x, c0, 12, 0.0, overrelax=1.0)
    assert calls, "the neighbour E-steps did not run"
    monkeypatch.setattr(lloyd_mod, "NEIGHBOUR_E_STEPS", False)
    off = lloyd(x, c0, 12, 0.0, overrelax=1.0)
    # labels are the exact nearest of the returned centroids (the full E-step's float32 distances may break a near-tie
    # the other way: a row in 10,000)
    ref = neighbour_e_step_numpy(x, on.centroids)[0]
    assert np.mean(on.labels == ref) > 0.9999
    # the same objective: the paths differ only where the full E-step's float32 distances and the lists' float64 ones
    # break a near-tie differently, which over-relaxed steps then carry along
    assert min(on.objective_history) == pytest.approx(min(off.objective_history), rel=5e-3)
    sse = ((x.astype(np.float64) - on.centroids[on.labels]) ** 2).sum()
    assert on.objective_history[-1] == pytest.approx(sse, rel=1e-6) or sse <= on.objective_history[-1]


def test_neighbour_steps_turn_themselves_off_where_scans_are_long(monkeypatch):
    g = np.random.default_rng(0)
    x = g.standard_normal((8192, 8)).astype(np.float32)  # no structure: a scan visits most centres
    c0 = x[:200].copy()
    used = []
    probed = []
    real = NeighbourSteps.assign
    real_probe = NeighbourSteps.probe
    monkeypatch.setattr(NeighbourSteps, "assign", lambda self, *a, **kw: used.append(1) or real(self, *a, **kw))
    monkeypatch.setattr(NeighbourSteps, "probe",
                        lambda self, *a, **kw: probed.append(real_probe(self, *a, **kw)) or probed[-1])
    monkeypatch.setattr(neighbours, "UPKEEP", 0.2)  # (so the probe runs at K = 200, and turns them down)
    monkeypatch.setattr(neighbours, "MIN_K", 128)
    monkeypatch.setattr(lloyd_mod, "NEIGHBOUR_E_STEPS", True)
    res = lloyd(x, c0, 5, 0.0)
    assert probed == [False]
    assert not used
    assert res.n_iter == 5


def test_applies():
    assert NeighbourSteps.applies(100_000, 2, 1024)
    assert not NeighbourSteps.applies(100_000, 64, 1024)
    assert not NeighbourSteps.applies(100_000, 2, 16)
    # min_k: at least the floors, and at least what scans that stop after their prefix cost
    for dim in (1, 2, 3, 8):
        k = neighbours.min_k(dim)
        assert k >= (neighbours.MIN_K_1D if dim == 1 else neighbours.MIN_K)
        assert neighbours.row_cost(dim, 1, 0, 0, k) <= k
    assert neighbours.min_k(8) > neighbours.MIN_K  # (32 prefix centres a row)
    assert not NeighbourSteps.applies(100, 2, 1024)
    # directions in the plane (cos, 2 coordinates) are a circle: the final pass takes the lists from MIN_K_1D, as a
    # line does (a review: predict on 200k such rows at K = 511 took 158 ms against 12 ms on the lists)
    from kvant.cluster.neighbours import NeighbourFinal

    assert neighbours.min_k(2, unit=True) == neighbours.min_k(1) < neighbours.min_k(2)
    assert NeighbourFinal.applies(100_000, 2, 300, unit=True) and not NeighbourFinal.applies(100_000, 2, 300)
    assert not NeighbourFinal.applies(100_000, 3, 300, unit=True)


def test_grid_cells_and_starts_match_numpy():
    from kvant.kernels.neighbour_assign import grid_cells, grid_starts

    g = np.random.default_rng(5)
    c = g.standard_normal((50, 2)).astype(np.float32)
    nbr, nd, reach = centre_neighbours(c, 6)
    side = 7
    pts = (3 * g.standard_normal((side * side, 2))).astype(np.float32)
    starts = np.empty(side * side, np.int64)
    grid_starts(pts, side, c, nbr, prefix_coords(c, nbr, 3), nd, reach, starts)
    np.testing.assert_array_equal(starts, neighbour_e_step_numpy(pts, c)[0])
    # cells: uniform bins mapped through the table, clamped at both ends; NaN rows take bin 0
    lo = np.array([-1.0, -2.0])
    inv = np.array([2.0, 0.5])
    table = np.stack([np.arange(10) % side, (np.arange(10) // 2) % side]).astype(np.int64)
    x = np.array([[-5, -5], [0.1, 0.3], [100, 100], [np.nan, 1.0], [-0.75, 9.9]], np.float32)
    out = np.empty(len(x), np.int64)
    grid_cells(x, lo, inv, table, side, starts, out, 0, len(x))
    expect = []
    for row in x.astype(np.float64):
        cell = 0
        for t in range(2):
            v = (row[t] - lo[t]) * inv[t]
            b = 0 if not v > 0 else min(int(v), 9)
            cell = cell * side + table[t, b]
        expect.append(starts[cell])
    np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_neighbour_final_exact_and_leaves_bad_rows(dim, monkeypatch):
    from kvant.cluster.neighbours import NeighbourFinal

    monkeypatch.setattr(neighbours, "UPKEEP", 0.1)  # (kept at this small K)
    monkeypatch.setattr(neighbours, "MIN_K", 128)
    monkeypatch.setattr(neighbours, "MIN_K_1D", 128)
    g = np.random.default_rng(dim)
    k = 300
    c = (g.standard_normal((k, dim)) * np.where(np.arange(k) < 20, 50.0, 1.0)[:, None]).astype(np.float32)  # far tail
    x = (c[g.integers(0, k, 5000)] + 0.2 * g.standard_normal((5000, dim))).astype(np.float32)
    x[:3] = 1e4  # far outside the grid
    x[7] = c[5]  # on a centre
    x[11, 0] = np.nan
    fin = NeighbourFinal(c)
    lab = np.empty(len(x), np.int64)
    ex = np.empty(len(x))
    left = fin.assign(x, lab, ex)
    assert left is not None and 11 in left
    ok = np.ones(len(x), bool)
    ok[left] = False
    ref_lab, ref1, _ = neighbour_e_step_numpy(x[ok], c)
    np.testing.assert_array_equal(lab[ok], ref_lab)
    np.testing.assert_allclose(ex[ok], ref1, rtol=1e-12)


def _fits_with_and_without_final_lists(monkeypatch, x, metric):
    """Fit K = 700 with the final pass on the neighbour lists (a spy records that it ran), then without them
    (NEIGHBOUR_FINAL off, left off on return): the same centres, labels and inertia. Returns the first fit and the
    spy's list of calls."""
    import kvant
    from kvant.cluster import clusterer
    from kvant.cluster.neighbours import NeighbourFinal

    used = []
    real = NeighbourFinal.assign
    monkeypatch.setattr(NeighbourFinal, "assign", lambda self, *a: used.append(1) or real(self, *a))
    on = kvant.Clusterer(700, metric=metric, seed=0, sample_per_centroid=32).fit(x)
    assert used, "the final pass did not take the lists"
    monkeypatch.setattr(clusterer, "NEIGHBOUR_FINAL", False)
    off = kvant.Clusterer(700, metric=metric, seed=0, sample_per_centroid=32).fit(x)
    np.testing.assert_array_equal(on.cluster_centers_, off.cluster_centers_)
    np.testing.assert_array_equal(on.labels_, off.labels_)
    assert on.inertia_ == pytest.approx(off.inertia_, rel=1e-12)
    return on, used


def test_clusterer_final_pass_by_lists_matches_fused_pass(monkeypatch):
    import kvant
    from kvant.cluster import clusterer

    x = _grid_blobs(30_000, 700, seed=3)
    on, used = _fits_with_and_without_final_lists(monkeypatch, x, "l2")
    np.testing.assert_array_equal(on.predict(x[:1000]), on.labels_[:1000])
    # predict and score take the lists too from PREDICT_LISTS_ROWS_PER_CENTRE rows per centre
    monkeypatch.setattr(clusterer, "PREDICT_LISTS_ROWS_PER_CENTRE", 1)
    monkeypatch.setattr(clusterer, "NEIGHBOUR_FINAL", True)
    used.clear()
    np.testing.assert_array_equal(on.predict(x), on.labels_)
    assert on.score(x) == pytest.approx(-on.inertia_ / x.shape[0], rel=1e-12)
    assert len(used) >= 2
    # a NaN row is named by the final pass as without the lists
    bad = x.copy()
    bad[12_345, 1] = np.nan
    monkeypatch.setattr(clusterer, "NEIGHBOUR_FINAL", True)
    with pytest.raises(kvant.InvalidInput, match="12345|12,345"):
        kvant.Clusterer(700, metric="l2", seed=0, sample_per_centroid=32).fit(bad)


def test_cos_final_pass_by_lists_matches_fused_pass(monkeypatch):
    """Spherical k-means on 2-D rows (angles: the fused pass's float32 distances cannot certify dense centres on the
    circle) takes the lists with the rows scaled by 1/‖x‖ in float64: the same labels, inertia and errors."""
    import kvant
    from kvant.cluster import clusterer

    g = np.random.default_rng(4)
    x = (g.standard_normal((40_000, 2)) * g.uniform(0.5, 20.0, (40_000, 1))).astype(np.float32)
    monkeypatch.setattr(clusterer, "PREDICT_LISTS_ROWS_PER_CENTRE", 1)
    on, used = _fits_with_and_without_final_lists(monkeypatch, x, "cos")
    monkeypatch.setattr(clusterer, "NEIGHBOUR_FINAL", True)
    used.clear()
    np.testing.assert_array_equal(on.predict(x), on.labels_)
    assert used
    # below MIN_K too, from MIN_K_1D (the circle is one degree of freedom): exact labels on the lists
    mid = kvant.Clusterer(neighbours.MIN_K_1D + 57, metric="cos", seed=0).fit(x)
    used.clear()
    labels = mid.predict(x)
    assert used
    some = x[:5000].astype(np.float64)
    ref, _, _ = neighbour_e_step_numpy(some / np.linalg.norm(some, axis=1, keepdims=True), mid.cluster_centers_)
    np.testing.assert_array_equal(labels[:5000], ref)
    np.testing.assert_array_equal(mid.labels_[:5000], ref)
    bad = x.copy()
    bad[30_001] = 0.0  # a zero row has no direction
    with pytest.raises(kvant.InvalidInput, match="30001|30,001"):
        on.predict(bad)


def test_every_row_fit_on_a_line_takes_the_lists_for_its_final_pass():
    """Trained on every row, a fit's last E-step could stand as the final assignment; on rows of one coordinate its
    float32 labels mostly fail certification, so the final pass takes the lists instead: exact labels and inertia."""
    import kvant
    from kvant.cluster.neighbours import NeighbourFinal

    g = np.random.default_rng(9)
    x = g.standard_normal((40_000, 1)).astype(np.float32)
    calls = []
    real = NeighbourFinal.assign
    NeighbourFinal.assign = lambda self, *a: calls.append(1) or real(self, *a)
    try:
        m = kvant.Clusterer(300, seed=0).fit(x)  # (256·K > N: every row trains)
    finally:
        NeighbourFinal.assign = real
    assert m.sample_rows_ == x.shape[0] and calls
    ref, d1, _ = neighbour_e_step_numpy(x, m.cluster_centers_)
    np.testing.assert_array_equal(m.labels_, ref)
    assert m.inertia_ == pytest.approx(d1.sum(), rel=1e-9)


@pytest.mark.filterwarnings("ignore:.*clusters are empty")  # (40 distinct integers, or ±1 directions in 1-D cos)
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31), dim=st.sampled_from([1, 2, 3]), extra=st.integers(0, 60),
       shape=st.sampled_from(["normal", "integers", "clumps"]), metric=st.sampled_from(["l2", "cos"]))
def test_fits_on_few_coordinates_give_exact_labels(seed, dim, extra, shape, metric):
    """Whatever path the lists take (training, final pass, predict), the fitted labels are the exact nearest centres
    of the returned ones (float64 brute force; ties to the smaller id) and the inertia their distances' sum."""
    import kvant

    g = np.random.default_rng(seed)
    k = neighbours.min_k(dim) + extra  # (where the lists may apply)
    n = 64 * k  # (predict's rule; and a 48·K-row sample trains outside the compiled small loop, where probes run)
    if shape == "normal":
        x = g.standard_normal((n, dim))
    elif shape == "integers":  # many exact duplicates: ties
        x = g.integers(-20, 20, (n, dim)).astype(float)
    else:
        x = g.standard_normal((40, dim))[g.integers(0, 40, n)] * 5 + 0.01 * g.standard_normal((n, dim))
    x = x.astype(np.float32)
    if metric == "cos":
        x[np.linalg.norm(x, axis=1) == 0] = 1.0  # (cos has no direction for a zero row)
    m = kvant.Clusterer(k, metric=metric, seed=seed % 1000, sample_per_centroid=48).fit(x)
    c = m.cluster_centers_.astype(np.float64)
    xs = x.astype(np.float64)
    if metric == "cos":
        xs = xs / np.linalg.norm(xs, axis=1, keepdims=True)
    total = 0.0
    for s in range(0, n, 2048):
        d = ((xs[s : s + 2048, None, :] - c[None]) ** 2).sum(-1)
        best = d.min(axis=1)
        # the label's distance is the smallest (exactly, or within float64 rounding of a tie)
        np.testing.assert_allclose(d[np.arange(d.shape[0]), m.labels_[s : s + 2048]], best, rtol=1e-12, atol=1e-12)
        total += best.sum()
    total *= 0.5 if metric == "cos" else 1.0
    assert m.inertia_ == pytest.approx(total, rel=1e-9, abs=1e-9)
    np.testing.assert_array_equal(m.predict(x), m.labels_)


# -- found by an audit (2026-12-07): the lists summed a row's distance in another order than the fused pass -------


def test_predict_by_lists_and_by_the_fused_pass_agree_on_mirror_image_ties():
    # centres in mirror-image pairs (the first two coordinates swapped) and rows on the mirror plane: every row ties
    # two centres in exact arithmetic, and the paths must break each tie alike (44 rows differed)
    rng = np.random.default_rng(0)
    k = 2048
    a = rng.uniform(-1, 1, (k // 2, 3)).astype(np.float32)
    c = kvant.Clusterer(k)
    c.cluster_centers_ = np.vstack([a, a[:, [1, 0, 2]]])
    x = rng.uniform(-1, 1, (64 * k + 10, 3)).astype(np.float32)
    x[:, 1] = x[:, 0]
    whole = c.predict(x)  # >= 64 rows per centre: the neighbour lists
    parts = np.concatenate([c.predict(x[s : s + 1000]) for s in range(0, x.shape[0], 1000)])  # the fused pass
    assert np.array_equal(whole, parts)


@pytest.mark.filterwarnings("ignore:.*clusters are empty")
def test_cos_labels_are_predict_after_a_fit_on_offset_rows():
    # 3-coordinate rows around a large common offset: their directions nearly coincide, so near-ties are everywhere
    # (42 of 60,000 rows had labels_ != predict(X))
    x = (1e6 + np.random.default_rng(5).standard_normal((60000, 3))).astype(np.float32)
    c = kvant.Clusterer(1500, metric="cos", seed=0).fit(x)
    assert np.array_equal(c.predict(x), c.labels_)
