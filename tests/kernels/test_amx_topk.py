"""The AMX bf16 first pass of FlatIndex: its error bound holds for every pair, and search stays exact."""

import numpy as np
import pytest

import kvant
from kvant.index import flat as F
from kvant.kernels import amx_topk as A

pytestmark = pytest.mark.skipif(not A.AVAILABLE, reason="needs AMX tiles")


def _screen_all(x, q, ip):
    """Every row's bf16 score per query (a list as long as the data) and the margin."""
    n = x.shape[0]
    mu, bt, qn, cstat = A.queries_operand(q, ip)
    out_d = np.full((q.shape[0], n), np.inf, np.float32)
    out_i = np.full((q.shape[0], n), -1, np.int64)
    a16, g = A.scratch(x.shape[1], bt.shape[1] * 16)
    stats = np.zeros(3)
    thr = np.full(q.shape[0], np.inf, np.float32)
    A.keep_strips(x, 0, n, mu, bt, qn, q.shape[0], ip, A.TILE_CONFIG, out_d, out_i, thr, a16, g, stats)
    return out_d, out_i, A.margin(x.shape[1], cstat, stats, ip), mu


def _exact(x, q, ip):
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if ip:
        return -(q64 @ x64.T)
    return ((q64[:, None, :] - x64[None, :, :]) ** 2).sum(axis=2)


@pytest.mark.parametrize("kind", ["gauss", "offset", "heavy", "dupes", "tiny", "mixed"])
@pytest.mark.parametrize("ip", [False, True])
@pytest.mark.parametrize("dim", [33, 400])
def test_margin_bounds_every_pair(kind, ip, dim):
    rng = np.random.default_rng(hash((kind, ip, dim)) % 2**32)
    n, nq = 203, 37  # a partial last strip; queries not a multiple of 16
    x = rng.standard_normal((n, dim))
    if kind == "offset":
        x += 50.0
    elif kind == "heavy":
        x = rng.standard_t(1.5, (n, dim))
    elif kind == "dupes":
        x[1::2] = x[::2][: n // 2] + 1e-6 * rng.standard_normal((n // 2, dim))
    elif kind == "tiny":
        x *= 1e-30
    elif kind == "mixed":
        x *= np.exp(rng.uniform(-20, 20, (n, 1)))
    x = x.astype(np.float32)
    q = (x[rng.integers(0, n, nq)] + rng.standard_normal((nq, dim)).astype(np.float32) * x.std()).astype(np.float32)
    out_d, out_i, m, mu = _screen_all(x, q, ip)
    assert np.all(out_i >= 0) and np.all(np.sort(out_i, axis=1) == np.arange(n))
    # inner products score the rows centred on mu: -(x - mu).q, the same shift q.mu for every row of a query
    shift = q.astype(np.float64) @ mu.astype(np.float64) if ip else 0.0
    exact = np.take_along_axis(_exact(x, q, ip), out_i, axis=1) + (shift[:, None] if ip else 0.0)
    gap = np.abs(out_d.astype(np.float64) - exact)
    assert np.all(gap <= m[:, None]), float((gap / m[:, None]).max())
    # the bound is not vacuous: within ~20x of the errors seen (it is a worst case over rows and coordinates)
    if kind in ("gauss", "offset"):
        assert np.median(m) < 50 * gap.max() + 1e-30


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_flat_search_on_the_amx_pass_is_exact(metric):
    rng = np.random.default_rng(7)
    dim, n, nq, k = F.BLAS_SCREEN_MIN_DIM + 5, 3000, F.BLAS_SCREEN_MIN_WORK // F.BLAS_SCREEN_MIN_DIM + 3, 10
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x[1000:1040] = x[1000]  # 40 copies of one row: its queries cannot be certified by the shortlist
    q = np.concatenate([x[rng.integers(0, n, nq - 5)], np.repeat(x[1000:1001], 5, axis=0)])
    q = (q + 0.3 * rng.standard_normal(q.shape)).astype(np.float32)
    index = kvant.FlatIndex(dim, metric=metric)
    index.add(x)
    assert index._amx_screen_applies(q, 56, None, None, None)
    d, i = index.search(q, k)
    xs, qs = x.astype(np.float64), q.astype(np.float64)
    if metric == "cos":
        xs /= np.linalg.norm(xs, axis=1, keepdims=True)
        qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    ref = _exact(xs, qs, metric != "l2")
    want = np.lexsort((np.broadcast_to(np.arange(n), ref.shape), ref), axis=1)[:, :k]
    got_exact = np.take_along_axis(ref, i, axis=1)
    want_exact = np.take_along_axis(ref, want, axis=1)
    np.testing.assert_allclose(got_exact, want_exact, rtol=1e-12, atol=1e-9)
    ties = np.isclose(want_exact[:, -1:], want_exact, rtol=1e-12)
    agree = (i == want) | ties
    assert agree.all()
