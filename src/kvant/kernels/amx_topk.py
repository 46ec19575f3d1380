"""Exact k-NN shortlists from AMX bf16 tile products (``FlatIndex``'s first pass on wide rows and large batches).

The rows, centred on μ (the queries' coordinate-wise median; see :func:`queries_operand` for inner products), are
converted to bf16 one 32-row strip at a time, multiplied by all queries (bf16, packed once) on the
AMX tiles (:func:`kvant.kernels.amx_assign._strip_products`) and screened while the strip's products are in cache
with the fused kernel's screen rule (``kvant.kernels.direct_topk._screen_row``): approximate squared distances
d̃ = ‖v‖² + ‖w‖² − 2g (l2; v = x − μ, w = q − μ) or −g (inner products; v = x − μ, w = q) into per-query lists.

With ṽ = v + e and w̃ = w + f the bf16 operands, ṽ·w̃ − v·w = e·w + ṽ·f, and the tiles' float32 accumulation adds at
most γ‖ṽ‖‖w̃‖ (:func:`kvant.kernels.amx_assign.gamma`), so for every row and query

    |d̃ − d| <= M = 2(E‖w‖ + V‖f‖ + γV‖w̃‖) + 2⁻²⁰(N + ‖w‖)² + tiny terms        (l2; half the first term for −g)

with E, V, N the largest ‖e‖, ‖ṽ‖ and ‖v‖ over the rows (measured while converting, :func:`keep_strips`), the 2⁻²⁰
term covering float32 rounding of ‖v‖², ‖w‖² and d̃'s three terms, and the tiny terms AMX's flushing of subnormal
inputs and products (:data:`kvant.kernels.amx_assign._TINY_COORD`, ``_TINY_OP``). The caller certifies a query's
list as the float32 passes do (its last value more than 2M beyond its k-th) and re-scores it exactly in float64;
any query it cannot certify goes on to the float32 passes, so this pass only ever saves time.
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


@numba.njit(inline="always", **_JIT)
def _convert_strip(x, s, cnt, mu, a16, vsq, one, stats):
    f = np.float32(1.0)
    for r in range(cnt):
        acc, err = _amx._convert_row(x, s + r, f, mu, a16, r, one)
        vn = np.sqrt(acc)
        e = np.sqrt(err)
        vsq[r] = np.float32(acc)
        stats[0] = max(stats[0], e)
        stats[1] = max(stats[1], vn + e)
        stats[2] = max(stats[2], vn)
    for r in range(cnt, STRIP):  # the last partial strip: zero rows (their products are never read)
        a16[r, :] = 0


@numba.njit(inline="always", **_JIT)
def _score(gr, j, xi, qn, ip):
    """Query j's float32 score of a row with products ``gr`` and ‖v‖² = xi: _screen_row's expression and clamp."""
    if ip:
        return -gr[j]
    v = qn[j] + xi - np.float32(2.0) * gr[j]
    return v if v > 0 else (np.float32(0.0) if v == v else np.float32(np.inf))


@numba.njit(inline="always", **_JIT)
def _screen_strip(g, cnt, s, vsq, qn, nq, ip, out_d, out_i, thr):
    """The strip's rows into the lists: a vectorised screen of each row against every query's threshold, then, for a
    row that may enter some list, 16 queries at a time (a group none of whose queries it can enter is skipped).
    Semantics of direct_topk._screen_row: scores not above the threshold (NaN included) are offered to _insert,
    which keeps the tie rule; a NaN score is never kept."""
    keep = out_d.shape[1]
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
        for j0 in range(0, nq, 16):
            j1 = min(nq, j0 + 16)
            grp = np.int32(0)
            for j in range(j0, j1):
                grp += np.int32(not _score(gr, j, xi, qn, ip) > thr[j])
            if grp == 0:
                continue
            for j in range(j0, j1):
                d = _score(gr, j, xi, qn, ip)
                if d == d and not d > thr[j]:
                    _insert(out_d[j], out_i[j], d, s + r)
                    thr[j] = out_d[j, keep - 1]


@numba.njit(**_JIT)
def keep_strips(x, r0, r1, mu, bt, qn, nq, ip, cfg, out_d, out_i, thr, a16, g, stats):
    """Rows r0 .. r1 − 1 of x into the lists ``out_d``/``out_i`` (nq, keep) of the ``nq`` queries packed in ``bt``
    (:func:`kvant.kernels.amx_assign.pack_centres` with μ = ``mu``); ``qn`` the queries' centred ‖w‖² (float32),
    ``thr`` their lists' last values, ``a16`` (2, STRIP, DP) uint16 and ``g`` (STRIP, KP) float32 scratch, a16's
    padding columns zero. ``stats`` (3,) float64 gets the running maxima of ‖e‖, ‖ṽ‖ (bounded as ‖v‖ + ‖e‖) and ‖v‖.
    Serial; call from one thread per chunk of rows.

    Strips alternate between a16's two halves, the next strip converted before the current one is multiplied: the
    tiles read a strip whose stores have long completed (converting and multiplying the same buffer back to back ran
    ~20% slower at D = 768)."""
    if r1 <= r0:
        return
    vsq = np.empty((2, STRIP), np.float32)
    one = np.empty(1, np.float32)
    _amx._tiles_begin(cfg)
    cur = 0
    s = r0
    cnt = min(STRIP, r1 - s)
    _convert_strip(x, s, cnt, mu, a16[0], vsq[0], one, stats)
    while s < r1:
        nxt = s + cnt
        ncnt = min(STRIP, r1 - nxt)
        if ncnt > 0:
            _convert_strip(x, nxt, ncnt, mu, a16[1 - cur], vsq[1 - cur], one, stats)
        _amx._strip_products(a16[cur], bt, g)
        _screen_strip(g, cnt, s, vsq[cur], qn, nq, ip, out_d, out_i, thr)
        s, cnt, cur = nxt, ncnt, 1 - cur
    _amx._tiles_end()


def queries_operand(q: np.ndarray, ip: bool):
    """(μ, bt, qn, cstat) for :func:`keep_strips` and :func:`margin`, μ the queries' coordinate-wise median. l2
    centres rows and queries on it; inner products centre the rows only (the queries packed as they are): (x − μ)·q
    differs from x·q by q·μ, the same for every row of a query, so the ranking and the gaps the certificate compares
    are unchanged, while the error bound, which grows with ‖x − μ‖, shrinks on data far from the origin (Gaussian rows
    offset by 3, cos: no query certified with μ = 0)."""
    mu = np.median(q.astype(np.float64), axis=0).astype(np.float32)
    _, bt, cn, cstat = _amx.pack_centres(q, np.zeros_like(mu) if ip else mu)
    qn = np.ascontiguousarray(cn[: q.shape[0]])
    return mu, bt, qn, cstat


def scratch(dim: int, kp: int):
    """(a16, g) scratch for one thread: a16's padding columns must stay zero."""
    dp = -(-dim // _amx._TILE_K) * _amx._TILE_K
    return np.zeros((2, STRIP, dp), np.uint16), np.empty((STRIP, kp), np.float32)


def margin(dim: int, cstat: np.ndarray, stats: np.ndarray, ip: bool) -> np.ndarray:
    """M per query (module docstring) from the queries' ``cstat`` (‖w‖, ‖f‖, ‖w̃‖) and the rows' maxima ``stats``
    (E, V, N; the maxima over every chunk's)."""
    wn, fn, wt = cstat
    tiny = _amx._TINY_COORD * np.sqrt(dim)
    e, v, n = stats[0] + tiny, stats[1] + tiny, stats[2]
    prod = e * wn + v * (fn + tiny) + _amx.gamma(dim) * v * wt
    m = (prod if ip else 2.0 * prod) + 2.0**-20 * (n + wn) ** 2 + _amx._TINY_OP * (dim + 64)
    return m * (1.0 + 2.0**-40)  # (float64 rounding of this sum)


__all__ = ["AVAILABLE", "STRIP", "TILE_CONFIG", "keep_strips", "margin", "queries_operand", "scratch"]
