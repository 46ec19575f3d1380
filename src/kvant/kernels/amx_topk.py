"""Exact k-NN candidates from AMX bf16 tile products (``FlatIndex``'s first pass on large batches).

The rows, centred on μ, are converted to bf16 one 32-row strip at a time, multiplied by all queries (bf16, packed
once) on the AMX tiles (:func:`kvant.kernels.amx_assign._strip_products`) and screened while the strip's products
are in cache. Scores are d̃ = ‖v‖² + ‖w‖² − 2g (l2; v = x − μ, w = q − μ, μ the queries' coordinate-wise median) or
−g (inner products; v = x − μ, w = q, μ the caller's centre of the rows: every row's score of a query moves by the
same q·μ, so ranks and gaps are those of −x·q).

**The bound.** With ṽ = v + e and w̃ = w + f the bf16 operands, ṽ·w̃ − v·w = e·w + ṽ·f, and the tiles' float32
accumulation adds at most γ‖ṽ‖‖w̃‖ (:func:`kvant.kernels.amx_assign.gamma`), so a row of the strip s scores within

    M_s = 2(E_s‖w‖ + V_s‖f‖ + γV_s‖w̃‖) + 2⁻²⁰(N_s + ‖w‖)² + tiny terms        (l2; half the first term for −g)

of its exact score, E_s, V_s, N_s the strip's largest ‖e‖, ‖ṽ‖ (bounded by ‖v‖ + ‖e‖) and ‖v‖, measured while
converting it. The 2⁻²⁰ term covers float32 rounding of the centring x − μ, q − μ, of ‖v‖², ‖w‖² and of d̃'s three
terms (together at most ~5·2⁻²⁴(N + ‖w‖)²); the tiny terms cover AMX's flushing of subnormal inputs and products
(:data:`kvant.kernels.amx_assign._TINY_COORD`, ``_TINY_OP``).

**The screen needs no certificate afterwards.** Per query it keeps the k smallest *upper* bounds d̃ + M_s (their
k-th is U, which only falls) and a buffer of every row whose *lower* bound d̃ − M_s is at most U when the row is seen.
A row left out has a lower bound above U at that time, so above the final U, which bounds the exact score of k other
rows: it is not among the exact k nearest. At the end the buffer's rows with a lower bound at most the final U are
the candidates; the caller scores them exactly. Only a buffer that stays full after dropping the rows above U (more
than its capacity of rows within the bound's width of the k-th: near-duplicates, or data whose distances the bf16
bound cannot separate) fails its query, which the caller then answers another way. (Until 2026-12-05 the pass kept
the 8k + 32 best approximate scores and certified a gap of 2M after the fact: sorted insertions into lists that long
cost more than the products below ~300k rows, and the bound, a maximum over all rows, was wider.)
"""

from __future__ import annotations

import numba
import numpy as np

from . import amx_assign as _amx
from .topk import _insert

_JIT = dict(cache=True, nogil=True, fastmath=False)
AVAILABLE = _amx.AVAILABLE
STRIP = _amx._STRIP  # rows per conversion and tile product
TILE_CONFIG = _amx.TILE_CONFIG
_PAD = 2.0**-22  # relative padding of the float32 bounds (float32 rounding of each is at most 2⁻²⁴ relative)


@numba.njit(inline="always", **_JIT)
def _convert_strip(x, s, cnt, mu, a16, vsq, one, stat):
    """Rows s .. s + cnt − 1 into bf16 (a16) and their ‖v‖² (vsq); stat gets the strip's max ‖e‖, ‖ṽ‖, ‖v‖."""
    f = np.float32(1.0)
    stat[:] = 0.0
    for r in range(cnt):
        acc, err = _amx._convert_row(x, s + r, f, mu, a16, r, one)
        vn = np.sqrt(acc)
        e = np.sqrt(err)
        vsq[r] = np.float32(acc)
        stat[0] = max(stat[0], e)
        stat[1] = max(stat[1], vn + e)
        stat[2] = max(stat[2], vn)
    for r in range(cnt, STRIP):  # the last partial strip: zero rows (their products are never read)
        a16[r, :] = 0


@numba.njit(inline="always", **_JIT)
def margin_of(stat, wn, fn, wt, gam, dim_tiny, op_tiny, ip):
    """M for rows with maxima ``stat`` (‖e‖, ‖ṽ‖, ‖v‖) and a query with ‖w‖, ‖f‖, ‖w̃‖ (module docstring)."""
    e = stat[0] + dim_tiny
    v = stat[1] + dim_tiny
    prod = e * wn + v * (fn + dim_tiny) + gam * v * wt
    if not ip:
        prod *= 2.0
    m = prod + 2.0**-20 * (stat[2] + wn) ** 2 + op_tiny
    return m * (1.0 + 2.0**-40)  # (float64 rounding of this sum)


@numba.njit(inline="always", **_JIT)
def _score(gr, j, xi, qn, ip):
    """Query j's float32 score of a row with products ``gr`` and ‖v‖² = xi (the vectorised screens spell it out)."""
    return -gr[j] if ip else qn[j] + xi - np.float32(2.0) * gr[j]


@numba.njit(inline="always", **_JIT)
def _upper(d, m):
    """float32 above d + m (float64 operands): padded by more than float32's rounding."""
    return np.float32(d + m + _PAD * (abs(d) + m))


@numba.njit(inline="always", **_JIT)
def _lower(d, m):
    """float32 below d − m (float64 operands): padded by more than float32's rounding."""
    return np.float32(d - m - _PAD * (abs(d) + m))


@numba.njit(inline="always", **_JIT)
def _compact(cand_lo, cand_i, cand_n, j, u):
    """Drop query j's buffered rows whose lower bound exceeds u; returns how many are left."""
    c = 0
    for t in range(cand_n[j]):
        if not cand_lo[j, t] > u:
            cand_lo[j, c] = cand_lo[j, t]
            cand_i[j, c] = cand_i[j, t]
            c += 1
    cand_n[j] = c
    return c


@numba.njit(inline="always", **_JIT)
def _holds(ids, row):
    for t in range(ids.shape[0]):
        if ids[t] == row:
            return True
    return False


@numba.njit(inline="always", **_JIT)
def _screen_strip(g, cnt, s, vsq, qn, nq, ip, m, thr, top_d, top_i, cand_lo, cand_i, cand_n, fail):
    """The strip's rows into each query's k upper bounds and its buffer (module docstring); thr[j] = U_j + M_j (as
    float32, rounded up) is the screen's threshold for the strip's d̃."""
    k = top_d.shape[1]
    cap = cand_lo.shape[1]
    for r in range(cnt):
        gr = g[r]
        xi = vsq[r]
        above = np.int32(0)
        if ip:
            for j in range(nq):
                above += np.int32(-gr[j] > thr[j])
        else:
            for j in range(nq):
                above += np.int32(qn[j] + xi - np.float32(2.0) * gr[j] > thr[j])
        if above == nq:
            continue
        row = s + r
        for j0 in range(0, nq, 16):  # groups of 16 queries none of which the row can enter are skipped
            j1 = min(nq, j0 + 16)
            grp = np.int32(0)
            for j in range(j0, j1):
                grp += np.int32(not _score(gr, j, xi, qn, ip) > thr[j])
            if grp == 0:
                continue
            for j in range(j0, j1):
                d = _score(gr, j, xi, qn, ip)
                if d > thr[j] or fail[j]:
                    continue
                if d != d:  # (cannot happen inside the caller's magnitude gate; answered another way if it does)
                    fail[j] = True
                    thr[j] = -np.inf
                    continue
                dd = np.float64(d)
                if cand_n[j] == cap and _compact(cand_lo, cand_i, cand_n, j, top_d[j, k - 1]) == cap:
                    fail[j] = True  # more rows within the bound's width of the k-th than the buffer holds
                    thr[j] = -np.inf
                    continue
                cand_lo[j, cand_n[j]] = _lower(dd, m[j])
                cand_i[j, cand_n[j]] = row
                cand_n[j] += 1
                hi = _upper(dd, m[j])
                if hi <= top_d[j, k - 1] and not _holds(top_i[j], row):  # (seeded rows are there already)
                    _insert(top_d[j], top_i[j], hi, row)
                    thr[j] = _upper(np.float64(top_d[j, k - 1]), m[j])


@numba.njit(**_JIT)
def screen_strips(x, r0, r1, mu, bt, qn, qstat, nq, ip, gam, cfg, top_d, top_i, cand_lo, cand_i, cand_n, fail, a16,
                  g):
    """Rows r0 .. r1 − 1 of x against the ``nq`` queries packed in ``bt`` (:func:`queries_operand`; ``qn`` their
    ‖w‖², ``qstat`` (3, nq) their ‖w‖, ‖f‖, ‖w̃‖): ``top_d``/``top_i`` (nq, k) the k smallest upper bounds (+inf / −1
    when new), ``cand_lo``/``cand_i`` (nq, cap) and ``cand_n`` (nq,) the buffers, ``fail`` (nq,) the queries whose
    buffer overflowed; ``a16`` (2, STRIP, DP) uint16 (padding columns zero) and ``g`` (STRIP, KP) float32 scratch.
    Serial; one call per chunk of rows, the arrays a thread's own.

    Strips alternate between a16's two halves, the next strip converted before the current one is multiplied: the
    tiles then read a strip whose stores have long completed (back to back ran ~20% slower at D = 768)."""
    if r1 <= r0:
        return
    k = top_d.shape[1]
    dim = x.shape[1]
    dim_tiny = _amx._TINY_COORD * np.sqrt(dim)
    op_tiny = _amx._TINY_OP * (dim + 64)
    vsq = np.empty((2, STRIP), np.float32)
    stat = np.empty((2, 3))
    one = np.empty(1, np.float32)
    m = np.empty(nq)
    thr = np.empty(nq, np.float32)
    _amx._tiles_begin(cfg)
    cur = 0
    s = r0
    cnt = min(STRIP, r1 - s)
    _convert_strip(x, s, cnt, mu, a16[0], vsq[0], one, stat[0])
    while s < r1 and not fail.all():  # (once every query has failed, the caller answers them another way)
        nxt = s + cnt
        ncnt = min(STRIP, r1 - nxt)
        if ncnt > 0:
            _convert_strip(x, nxt, ncnt, mu, a16[1 - cur], vsq[1 - cur], one, stat[1 - cur])
        _amx._strip_products(a16[cur], bt, g)
        for j in range(nq):
            m[j] = margin_of(stat[cur], qstat[0, j], qstat[1, j], qstat[2, j], gam, dim_tiny, op_tiny, ip)
            thr[j] = -np.inf if fail[j] else _upper(np.float64(top_d[j, k - 1]), m[j])
        _screen_strip(g, cnt, s, vsq[cur], qn, nq, ip, m, thr, top_d, top_i, cand_lo, cand_i, cand_n, fail)
        s, cnt, cur = nxt, ncnt, 1 - cur
    _amx._tiles_end()


@numba.njit(**_JIT)
def seed_tops(x, rows, mu, bt, qn, qstat, nq, ip, gam, cfg, top_d, top_i, a16, g):
    """The upper bounds of the stored rows ``rows`` (distinct ids, e.g. spread evenly over the data) into every
    query's k smallest (``top_d``/``top_i``, +inf / −1 when new), before :func:`screen_strips`: its threads then start
    from a k-th bound over the whole data instead of over their first rows, which (a thread whose chunk opened on
    400 copies of one row) filled the buffers with rows no other row had yet ruled out. Same arithmetic and bound."""
    k = top_d.shape[1]
    dim = x.shape[1]
    dim_tiny = _amx._TINY_COORD * np.sqrt(dim)
    op_tiny = _amx._TINY_OP * (dim + 64)
    vsq = np.empty(STRIP, np.float32)
    stat = np.empty(3)
    one = np.empty(1, np.float32)
    xs = np.empty((STRIP, dim), np.float32)
    _amx._tiles_begin(cfg)
    for s in range(0, rows.shape[0], STRIP):
        cnt = min(STRIP, rows.shape[0] - s)
        for r in range(cnt):
            xs[r] = x[rows[s + r]]
        _convert_strip(xs, 0, cnt, mu, a16[0], vsq, one, stat)
        _amx._strip_products(a16[0], bt, g)
        for j in range(nq):
            mj = margin_of(stat, qstat[0, j], qstat[1, j], qstat[2, j], gam, dim_tiny, op_tiny, ip)
            for r in range(cnt):
                d = _score(g[r], j, vsq[r], qn, ip)
                if d != d:
                    continue
                hi = _upper(np.float64(d), mj)
                if hi <= top_d[j, k - 1]:
                    _insert(top_d[j], top_i[j], hi, rows[s + r])
    _amx._tiles_end()


def queries_operand(q: np.ndarray, ip: bool, row_centre: np.ndarray | None = None):
    """(μ, bt, qn, qstat) for :func:`screen_strips`: l2 centres rows and queries on the queries' coordinate-wise
    median; inner products centre the rows only, on ``row_centre`` (the caller's centre of its rows: a centre taken
    from the queries widened the bound where queries sit away from the rows, 17 of 256 queries certified against
    256 of 256), and pack the queries as they are."""
    if ip:
        mu = np.zeros(q.shape[1], np.float32) if row_centre is None else np.asarray(row_centre, np.float32)
        _, bt, cn, cstat = _amx.pack_centres(q, np.zeros(q.shape[1], np.float32))
    else:
        mu, bt, cn, cstat = _amx.pack_centres(q)
    return mu, bt, np.ascontiguousarray(cn[: q.shape[0]]), np.ascontiguousarray(cstat)


def scratch(dim: int, kp: int):
    """(a16, g) scratch for one thread: a16's padding columns must stay zero."""
    dp = -(-dim // _amx._TILE_K) * _amx._TILE_K
    return np.zeros((2, STRIP, dp), np.uint16), np.empty((STRIP, kp), np.float32)


def gamma(dim: int) -> float:
    return _amx.gamma(dim)


__all__ = ["AVAILABLE", "STRIP", "TILE_CONFIG", "gamma", "margin_of", "queries_operand", "scratch", "screen_strips",
           "seed_tops"]
