"""The AMX bf16 first pass of FlatIndex: its error bound holds for every pair, and search stays exact."""

import zlib

import numpy as np
import pytest

import kvant
from kvant.index import flat as F
from kvant.kernels import amx_topk as A

pytestmark = pytest.mark.skipif(not A.AVAILABLE, reason="needs AMX tiles")


def _screen_all(x, q, ip):
    """Every row's lower and upper bound per query (k = n and a buffer of n rows: every row is kept), and the centre."""
    n, nq = x.shape[0], q.shape[0]
    centre = x.mean(axis=0).astype(np.float32) if ip else None
    mu, bt, qn, qstat = A.queries_operand(q, ip, centre)
    top_d = np.full((nq, n), np.inf, np.float32)
    top_i = np.full((nq, n), -1, np.int64)
    lo, ci = np.empty((nq, n), np.float32), np.empty((nq, n), np.int64)
    cn, fail = np.zeros(nq, np.int64), np.zeros(nq, np.bool_)
    a16, g = A.scratch(x.shape[1], bt.shape[1] * 16)
    A.screen_strips(x, 0, n, mu, bt, qn, qstat, nq, ip, A.gamma(x.shape[1]), A.TILE_CONFIG, top_d, top_i, lo, ci, cn,
                    fail, a16, g)
    assert not fail.any() and np.all(cn == n)
    hi = np.empty((nq, n))
    np.put_along_axis(hi, top_i, top_d, axis=1)
    low = np.empty((nq, n))
    np.put_along_axis(low, ci, lo, axis=1)
    return low, hi, mu


def _exact(x, q, ip):
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if ip:
        return -(q64 @ x64.T)
    return ((q64[:, None, :] - x64[None, :, :]) ** 2).sum(axis=2)


@pytest.mark.parametrize("kind", ["gauss", "offset", "heavy", "dupes", "tiny", "mixed"])
@pytest.mark.parametrize("ip", [False, True])
@pytest.mark.parametrize("dim", [33, 400])
def test_margin_bounds_every_pair(kind, ip, dim):
    rng = np.random.default_rng(zlib.crc32(f"{kind}-{ip}-{dim}".encode()))
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
    low, hi, mu = _screen_all(x, q, ip)
    # inner products score the rows centred on mu: -(x - mu).q, the same shift q.mu for every row of a query
    exact = _exact(x, q, ip) + ((q.astype(np.float64) @ mu.astype(np.float64))[:, None] if ip else 0.0)
    assert np.all(low <= exact) and np.all(exact <= hi), (float((low - exact).max()), float((exact - hi).max()))
    # the bound is not vacuous: its width within ~100x of the errors seen (a worst case over the strip's rows)
    if kind in ("gauss", "offset"):
        mid = (low + hi) / 2
        assert np.median(hi - low) < 100 * np.abs(mid - exact).max() + 1e-30


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_flat_search_on_the_amx_pass_is_exact(metric, monkeypatch):
    rng = np.random.default_rng(7)
    dim, n, nq, k = F.BLAS_SCREEN_MIN_DIM + 5, 3000, F.BLAS_SCREEN_MIN_WORK // F.BLAS_SCREEN_MIN_DIM + 3, 10
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x[1000:1400] = x[1000]  # 400 copies of one row: more ties at its queries' k-th than the buffer holds
    src = np.concatenate([rng.integers(0, n, nq - 5), np.full(5, 1000)])
    q = (x[src] + 0.3 * rng.standard_normal((nq, dim))).astype(np.float32)
    index = kvant.FlatIndex(dim, metric=metric)
    index.add(x)
    monkeypatch.setattr(F, "AMX_MIN_ROWS", 1)  # (3,000 rows: below the shipped minimum)
    assert index._amx_screen_applies(q, k, None, None, None)
    cand, sure = index._amx_candidates(q, k)
    copies = (src >= 1000) & (src < 1400)
    # the copies' own queries take the float32 passes (400 ties at the 1st neighbour); a few others whose k-th lies
    # near the copies' distance too, the rest are answered by this pass
    assert not sure[copies].any() and sure[~copies].mean() > 0.95
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


def test_a_batch_whose_queries_all_overflow_is_answered_exactly(monkeypatch):
    # every query sits on 2,000 copies of one row (ties at its k-th): every buffer overflows, the pass stops early and
    # the float32 passes answer, with the smallest ids among the tied copies
    rng = np.random.default_rng(3)
    dim, n, nq, k = 64, 3000, 300, 10
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x[500:2500] = x[500]
    q = (x[500] + 1e-3 * rng.standard_normal((nq, dim))).astype(np.float32)
    index = kvant.FlatIndex(dim)
    index.add(x)
    monkeypatch.setattr(F, "AMX_MIN_ROWS", 1)
    cand, sure = index._amx_candidates(q, k)
    assert not sure.any()
    d, i = index.search(q, k)
    assert np.array_equal(i, np.broadcast_to(np.arange(500, 510), i.shape))
