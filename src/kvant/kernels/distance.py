"""Distance blocks: squared L2 and inner products between a block of queries and a block of vectors.

``sq_l2_block`` uses BLAS for ``q @ x.T`` (the FLOP-heavy part; BLAS runs at this machine's sgemm rate) and a
Numba pass to turn inner products into squared distances (``‖q‖² + ‖x‖² − 2 q·x``, clamped at 0). The
expansion loses relative precision when ‖q−x‖ ≪ ‖q‖; callers that need exact small distances use
``sq_l2_direct``, which sums (q−x)² term by term.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._llvm import llvm_fn, splat, sum_lanes
from .topk import ranks_before

_LANES = 16  # floats per 512-bit vector

_JIT = dict(cache=True, nogil=True, fastmath=False)
# Row sums (norms' tails, mean_and_spread, ...): reassociation lets LLVM vectorise the float64 sums (a serial chain
# of adds made the norms cost half of a small-K assignment). Rounding stays ~1e-16 relative.
_JIT_SUM = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"})


def _f32_rows(*arrays) -> bool:
    return all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 2 for a in arrays)


def _sum_sq_codegen(kind: str):
    """Code generator, in float64 over rows of unit stride, of Σ_{t < n} x[i, t]² (``kind`` "norm"; arguments x, i,
    n), of Σ_{t < n} (x[i, t] − c[j, t])² ("diff"; x, i, c, j, n) or of Σ_{t < n} (f·x[i, t] − c[j, t])² ("scaled";
    x, i, f, c, j, n with f a float64; the product f·x is rounded before the difference, as plain float64 code does).

    Each 16 floats are widened to doubles (so a difference is exact) and summed into one 16-lane float64
    accumulator; the last n mod 16 coordinates come in through a masked load (zeros in the other lanes); the lanes
    are reduced by halves at the end. LLVM's own vectoriser kept these loops at 256 bits, several times slower than
    explicit 512-bit lanes (norms and exact distances were 2 of 5 parts of a K = 10 final assignment). The tail is in
    the lanes too, not a scalar loop: under reassociation LLVM vectorised such a loop differently where the function
    was inlined into another, so two callers of the same sum disagreed in the last bit (seen on an AVX2 host)."""

    def codegen(context, builder, signature, values):
        f32, f64 = ir.FloatType(), ir.DoubleType()
        vf, vd = ir.VectorType(f32, _LANES), ir.VectorType(f64, _LANES)
        intp = context.get_value_type(types.intp)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)

        def row(k, r):  # float* to row r of argument k
            a = context.make_array(signature.args[k])(context, builder, values[k])
            stride = cgutils.unpack_tuple(builder, a.strides, 2)[0]
            r = context.cast(builder, values[r], signature.args[r], types.intp)
            return builder.bitcast(builder.gep(builder.bitcast(a.data, i8p), [builder.mul(r, stride)]),
                                   f32.as_pointer())

        n = context.cast(builder, values[-1], signature.args[-1], types.intp)
        lanes = ir.Constant(intp, _LANES)
        n16 = builder.mul(builder.udiv(n, lanes), lanes)
        xrow = row(0, 1)
        crow = None if kind == "norm" else row(2, 3) if kind == "diff" else row(3, 4)
        f = splat(builder, values[2], vd) if kind == "scaled" else None
        acc = cgutils.alloca_once_value(builder, ir.Constant(vd, [0.0] * _LANES))
        fma = llvm_fn(builder.module, f"llvm.fma.v{_LANES}f64", vd, [vd, vd, vd])
        masked_load = llvm_fn(builder.module, f"llvm.masked.load.v{_LANES}f32.p0v{_LANES}f32", vf,
                              [vf.as_pointer(), i32, ir.VectorType(ir.IntType(1), _LANES), vf])

        def add(off, mask=None):
            def load(ptr):
                p = builder.bitcast(builder.gep(ptr, [off]), vf.as_pointer())
                v = (builder.load(p, align=4) if mask is None
                     else builder.call(masked_load, [p, ir.Constant(i32, 4), mask, ir.Constant(vf, [0.0] * _LANES)]))
                return builder.fpext(v, vd)

            if kind == "norm":
                v = load(xrow)
            elif kind == "diff":
                v = builder.fsub(load(xrow), load(crow))
            else:  # the product rounded, then the difference: as x·f − c in plain float64 arithmetic, so the terms
                # equal kernels.neighbour_assign's and its sums differ from these only in order (its near-tie margin)
                v = builder.fsub(builder.fmul(load(xrow), f), load(crow))
            builder.store(builder.call(fma, [v, v, builder.load(acc)]), acc)

        # one accumulator: 1, 2 and 4 ran at the same speed (the widening conversions bound the loop)
        with cgutils.for_range(builder, builder.udiv(n16, lanes)) as loop:
            add(builder.mul(loop.index, lanes))
        rem = builder.sub(n, n16)
        with builder.if_then(builder.icmp_signed(">", rem, ir.Constant(intp, 0)), likely=False):
            lane_ids = ir.Constant(ir.VectorType(intp, _LANES), list(range(_LANES)))
            add(n16, builder.icmp_signed("<", lane_ids, splat(builder, rem, ir.VectorType(intp, _LANES))))
        return sum_lanes(builder, builder.load(acc))

    return codegen


@intrinsic
def _sq_sum_lanes(typingctx, x, i, n):
    return (types.float64(x, i, n), _sum_sq_codegen("norm")) if _f32_rows(x) else None


@intrinsic
def _sq_diff_sum_lanes(typingctx, x, i, c, j, n):
    return (types.float64(x, i, c, j, n), _sum_sq_codegen("diff")) if _f32_rows(x, c) else None


@intrinsic
def _scaled_sq_diff_sum_lanes(typingctx, x, i, f, c, j, n):
    return (types.float64(x, i, types.float64, c, j, n), _sum_sq_codegen("scaled")) if _f32_rows(x, c) else None


@numba.njit(inline="always")
def _row_sqnorm(x, i):
    """Σ_t x[i, t]² in float64: 16-float lanes (:func:`_sum_sq_codegen`) when rows have unit stride."""
    if x.strides[1] == 4:
        return _sq_sum_lanes(x, i, x.shape[1])
    acc = 0.0
    for j in range(x.shape[1]):
        v = np.float64(x[i, j])
        acc += v * v
    return acc


@numba.njit(inline="always")
def row_scaled_sq_dist64(x, i, f, c, j):
    """Σ_t (x[i, t]·f − c[j, t])² in float64: the exact squared distance of the scaled row x_i·f (f = 1/‖x_i‖: the unit
    row of spherical k-means) to centre j; 16-float lanes (:func:`_sum_sq_codegen`: the product rounded, then the
    difference) when both rows have unit stride."""
    if x.strides[1] == 4 and c.strides[1] == 4:
        return _scaled_sq_diff_sum_lanes(x, i, np.float64(f), c, j, x.shape[1])
    acc = 0.0
    for t in range(x.shape[1]):
        v = np.float64(x[i, t]) * f - np.float64(c[j, t])
        acc += v * v
    return acc


@numba.njit(inline="always")
def row_sq_dist64(x, i, c, j):
    """Σ_t (x[i, t] − c[j, t])² with float64 differences and sum (the exact squared distance of float32 rows up to
    float64 rounding): 16-float lanes (:func:`_sum_sq_codegen`) when both rows have unit stride."""
    if x.strides[1] == 4 and c.strides[1] == 4:
        return _sq_diff_sum_lanes(x, i, c, j, x.shape[1])
    acc = 0.0
    for t in range(x.shape[1]):
        diff = np.float64(x[i, t]) - np.float64(c[j, t])
        acc += diff * diff
    return acc


@numba.njit(parallel=True, **_JIT_SUM)
def sq_norms(x):
    """Squared L2 norm of each row, accumulated in float64, returned as float32."""
    out = np.empty(x.shape[0], np.float32)
    for i in prange(x.shape[0]):
        out[i] = _row_sqnorm(x, i)
    return out


@numba.njit(**_JIT_SUM)
def mean_and_spread(x, step):
    """(μ, mean ‖x − μ‖², mean ‖x‖², per-row ‖x − μ‖², per-row ‖x‖²) of rows 0, step, 2·step, ... of x, in float64,
    in two passes without temporaries beyond the per-row values (a NumPy version's float64 copy and difference cost
    1 ms of a 4 ms digits fit)."""
    n, d = x.shape
    mu = np.zeros(d)
    m = 0
    for i in range(0, n, step):
        for j in range(d):
            mu[j] += x[i, j]
        m += 1
    dev = np.zeros(m)
    sqs = np.zeros(m)
    if m == 0:
        return mu, 0.0, 0.0, dev, sqs
    mu /= m
    for r in range(m):
        i = r * step
        a = 0.0
        b = 0.0
        for j in range(d):
            v = np.float64(x[i, j])
            a += (v - mu[j]) * (v - mu[j])
            b += v * v
        dev[r] = a
        sqs[r] = b
    return mu, dev.sum() / m, sqs.sum() / m, dev, sqs


@numba.njit(parallel=True, **_JIT)
def finish_sq_l2(g, q_sqnorms, x_sqnorms):
    """In place: g[i, j] (= q_i·x_j) becomes max(‖q_i‖² + ‖x_j‖² − 2 g[i, j], 0); +inf where that is NaN (float32
    overflow: inf − inf), never 0, which would report a far row as a perfect match. Callers that need exact
    distances recompute such pairs (FlatIndex does)."""
    nq, nb = g.shape
    for i in prange(nq):
        qi = q_sqnorms[i]
        for j in range(nb):
            v = qi + x_sqnorms[j] - np.float32(2.0) * g[i, j]
            g[i, j] = v if v > 0 else (np.float32(0.0) if v == v else np.float32(np.inf))


@numba.njit(inline="always", **_JIT)
def _sq_l2_in_order(q, i, x, j):
    """Σ_t (q[i, t] − x[j, t])² with float64 differences, summed in coordinate order (no reassociation): the one sum
    FlatIndex's exact answers come from, whichever way a query takes."""
    acc = 0.0
    for t in range(q.shape[1]):
        diff = np.float64(q[i, t]) - np.float64(x[j, t])
        acc += diff * diff
    return acc


@numba.njit(parallel=True, **_JIT)
def sq_l2_direct(q, x):
    """Exact squared L2 (Σ (q−x)², float32 terms, float64 accumulation) for every pair: (nq, nb)."""
    nq, nb = q.shape[0], x.shape[0]
    out = np.empty((nq, nb), np.float32)
    for i in prange(nq):
        for j in range(nb):
            out[i, j] = _sq_l2_in_order(q, i, x, j)
    return out


@numba.njit(inline="always", **_JIT)
def _neg_ip_in_order(q, i, x, j):
    """−Σ_t q[i, t]·x[j, t] with float64 products (exact for float32 inputs), summed in coordinate order: FlatIndex's
    exact inner-product score (ascending = most similar first), whichever way a query takes."""
    acc = 0.0
    for t in range(q.shape[1]):
        acc += np.float64(q[i, t]) * np.float64(x[j, t])
    return -acc


@numba.njit(inline="always", **_JIT)
def _exact_score(q, i, x, j, ip):
    return _neg_ip_in_order(q, i, x, j) if ip else _sq_l2_in_order(q, i, x, j)


@numba.njit(parallel=True, **_JIT)
def exact_topk(q, x, out_d, out_i, ip):
    """The k = out_d.shape[1] best rows of ``x`` for each query by an exact float64 score: squared L2 (Σ(q−x)²) or,
    with ``ip``, the negated inner product −Σ q·x; ascending, ties to the smaller row; rows beyond x are padded
    inf / -1. Parallel over queries: this is the fallback for queries whose float32 scores cannot certify their top
    k, so it is meant for few of them.
    """
    nq, d = q.shape
    k = out_d.shape[1]
    if k == 0:  # (bd[k - 1] would read, and the insertion write, before a zero-length row)
        return
    for i in prange(nq):
        bd = out_d[i]
        bi = out_i[i]
        bd[:] = np.inf
        bi[:] = -1
        for j in range(x.shape[0]):
            acc = _exact_score(q, i, x, j, ip)
            if acc < bd[k - 1]:  # rows come in increasing order, so an equal distance keeps the earlier row
                p = k - 1
                while p > 0 and bd[p - 1] > acc:
                    bd[p] = bd[p - 1]
                    bi[p] = bi[p - 1]
                    p -= 1
                bd[p] = acc
                bi[p] = j


@numba.njit(parallel=True, **_JIT)
def exact_rows(q, x, rows, out, ip):
    """out[i, j] = the exact score of row rows[i, j] for query i, the one :func:`exact_topk` computes (so a shortlist
    re-scored here and a full scan rank exact ties alike): Σ_t (q[i, t] − x[r, t])² in float64 or, with ``ip``,
    −Σ_t q[i, t]·x[r, t]; +inf where rows[i, j] < 0."""
    for i in prange(q.shape[0]):
        for j in range(rows.shape[1]):
            r = rows[i, j]
            out[i, j] = np.inf if r < 0 else _exact_score(q, i, x, r, ip)


def ip_block(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Inner products (nq, nb) via BLAS."""
    return q @ x.T


def sq_l2_block(q: np.ndarray, x: np.ndarray, x_sqnorms: np.ndarray, q_sqnorms: np.ndarray | None = None):
    """Squared L2 distances (nq, nb) via BLAS plus the norm expansion, clamped at 0."""
    g = np.ascontiguousarray(q @ x.T)
    finish_sq_l2(g, sq_norms(q) if q_sqnorms is None else q_sqnorms, x_sqnorms)
    return g


@numba.njit(**_JIT_SUM)
def sq_norms_serial(x):
    """Serial :func:`sq_norms`, for use on a block inside a worker thread."""
    out = np.empty(x.shape[0], np.float32)
    sq_norms_into(x, 0, x.shape[0], out)
    return out


@numba.njit(**_JIT_SUM)
def sq_norms64_serial(x):
    """‖x[i]‖² of each row as the float64 sums :func:`sq_norms_serial` rounds: what a unit row's factor 1/‖x‖ is
    computed from (every path scales by the same factor, so their exact distances agree to the last bit)."""
    out = np.empty(x.shape[0], np.float64)
    sq_norms_into(x, 0, x.shape[0], out)
    return out


@numba.njit(**_JIT_SUM)
def sq_norms_into(x, start, stop, out):
    """out[i] = ‖x[i]‖² (float64 sum, stored as out's dtype) for rows start..stop: :func:`sq_norms_serial`'s operations,
    for kernels that take a few rows at a time (not inlined, so it keeps these compile flags wherever it is called)."""
    for i in range(start, stop):
        out[i] = _row_sqnorm(x, i)


@numba.njit(**_JIT_SUM)
def exact_scaled_sq_dist_into(x, start, stop, centroids, labels, scale, out):
    """out[i] = Σ_t (scale_i·x_i − c_{labels_i})² in float64 (:func:`row_scaled_sq_dist64`) for rows start..stop (not
    inlined, so it keeps these compile flags wherever it is called)."""
    for i in range(start, stop):
        out[i] = row_scaled_sq_dist64(x, i, scale[i], centroids, labels[i])


@numba.njit(**_JIT_SUM)
def exact_sq_dist_into(x, start, stop, centroids, labels, out):
    """out[i] = Σ_t (x_i − c_{labels_i})² in float64 (:func:`row_sq_dist64`) for rows start..stop (not inlined, so it
    keeps these compile flags wherever it is called)."""
    for i in range(start, stop):
        out[i] = row_sq_dist64(x, i, centroids, labels[i])


_F32_TINY = np.float32(np.finfo(np.float32).tiny)  # smallest normal float32


@numba.njit(**_JIT_SUM)
def _unit_rows_into(x, idx, out, gather):
    """out[t] = x[i] / ‖x[i]‖ with i = idx[t] when ``gather``, else i = t (:func:`normalise_rows_into`,
    :func:`gather_rows_into`). Returns the first t whose row has norm 0 (left unwritten), or -1.

    The row loop is written out here, on row views: from a helper, inlined or not, LLVM's division loop ran
    2.4-2.8x slower (digits 1,797 x 64: 72-85 us for the whole pass against 30)."""
    for t in range(idx.shape[0] if gather else x.shape[0]):
        i = idx[t] if gather else t
        nrm64 = np.sqrt(_row_sqnorm(x, i))
        if nrm64 == 0.0:
            return t
        nrm = np.float32(nrm64)
        xi = x[i]
        oi = out[t]
        if nrm < _F32_TINY or nrm == np.inf:
            for j in range(xi.shape[0]):
                oi[j] = np.float32(np.float64(xi[j]) / nrm64)
        else:
            for j in range(xi.shape[0]):
                oi[j] = xi[j] / nrm
    return -1


_NO_INDEX = np.empty(0, np.int64)


@numba.njit(**_JIT_SUM)
def normalise_rows_into(x, out):
    """out[i] = x[i] / ‖x[i]‖ (norm summed in float64, rounded to float32, as :func:`sq_norms`), in one read
    of ``x``. Returns the first row whose norm is 0 (that row is left unwritten), or -1.

    A norm that float32 cannot hold as a normal number (above ~3.4e38, or below 2⁻¹²⁶ where it would lose bits)
    divides in float64 instead: rounded to float32 it was inf (the row came out all zero, silently) or a
    subnormal a few per cent off (the row was not unit).

    In place (``out`` is ``x``) the divisions run one by one (LLVM's vectorised loop needs rows that do not
    overlap): 6 ms for 16,384 × 384 rows against 2 ms into another array; :func:`gather_rows_into` gathers and
    normalises a sample in one pass instead."""
    return _unit_rows_into(x, _NO_INDEX, out, False)


@numba.njit(**_JIT_SUM)
def gather_rows_into(x, idx, out, unit):
    """out[t] = x[idx[t]], unit-normalised as :func:`normalise_rows_into` does when ``unit``. Returns the first t whose
    row has norm 0 (unit only; that row is left unwritten), or -1."""
    if unit:
        return _unit_rows_into(x, idx, out, True)
    for t in range(idx.shape[0]):
        i = idx[t]
        for j in range(x.shape[1]):
            out[t, j] = x[i, j]
    return -1


# Shifts the insertion sort in :func:`exact_rerank` may make per list entry before it gives the list to a merge sort:
# shortlists arrive in float32 order, which the exact scores seldom reorder by more than a few places
_RERANK_SHIFTS_PER_ROW = 16


@intrinsic
def _prefetch(typingctx, x, r, offset):
    """Hint the cache to fetch byte ``offset`` of row ``r`` of the 2-D array ``x`` (``llvm.prefetch``: no effect on
    any result; an address outside x is harmless, as prefetches never fault)."""

    def codegen(context, builder, signature, args):
        xv, rv, ov = args
        a = context.make_array(signature.args[0])(context, builder, xv)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        at = builder.add(builder.mul(rv, builder.extract_value(a.strides, 0)), ov)
        ptr = builder.gep(builder.bitcast(a.data, i8p), [at])
        fn = llvm_fn(builder.module, "llvm.prefetch.p0", ir.VoidType(), [i8p, i32, i32, i32])
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(x, types.intp, types.intp), codegen


@numba.njit(inline="always", **_JIT)
def _exact_scores_of(q, i, x, r, ip, d):
    """d[j] = :func:`_exact_score` of row r[j] for query i (+inf where r[j] < 0), eight rows at a time: each row's sum
    in coordinate order as there (the same bits), the eight chains independent, so their loads and adds overlap where
    one row at a time waited on each add and on each row's cache miss (long shortlists gather rows from all over
    x: 1,208 rows for each of 1,000 queries took 90 ms one at a time). A chain's adds wait on each other (4 cycles
    apiece): four chains took ~12 ns a row at 32 dims, eight ~7 (Intel, 2026-12-06)."""
    m = r.shape[0]
    dim = q.shape[1]
    row_bytes = dim * x.itemsize
    j = 0
    while j + 8 <= m:
        for c in range(j + 8, min(m, j + 16)):  # the next eight rows, a line at a time: they come from all over x
            for off in range(0, row_bytes, 64):
                _prefetch(x, max(r[c], 0), off)
        r0, r1, r2, r3 = max(r[j], 0), max(r[j + 1], 0), max(r[j + 2], 0), max(r[j + 3], 0)
        r4, r5, r6, r7 = max(r[j + 4], 0), max(r[j + 5], 0), max(r[j + 6], 0), max(r[j + 7], 0)
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
        for t in range(dim):
            qt = np.float64(q[i, t])
            if ip:
                a0 += qt * np.float64(x[r0, t])
                a1 += qt * np.float64(x[r1, t])
                a2 += qt * np.float64(x[r2, t])
                a3 += qt * np.float64(x[r3, t])
                a4 += qt * np.float64(x[r4, t])
                a5 += qt * np.float64(x[r5, t])
                a6 += qt * np.float64(x[r6, t])
                a7 += qt * np.float64(x[r7, t])
            else:
                e0 = qt - np.float64(x[r0, t])
                e1 = qt - np.float64(x[r1, t])
                e2 = qt - np.float64(x[r2, t])
                e3 = qt - np.float64(x[r3, t])
                e4 = qt - np.float64(x[r4, t])
                e5 = qt - np.float64(x[r5, t])
                e6 = qt - np.float64(x[r6, t])
                e7 = qt - np.float64(x[r7, t])
                a0 += e0 * e0
                a1 += e1 * e1
                a2 += e2 * e2
                a3 += e3 * e3
                a4 += e4 * e4
                a5 += e5 * e5
                a6 += e6 * e6
                a7 += e7 * e7
        if ip:
            a0, a1, a2, a3, a4, a5, a6, a7 = -a0, -a1, -a2, -a3, -a4, -a5, -a6, -a7
        d[j] = a0 if r[j] >= 0 else np.inf
        d[j + 1] = a1 if r[j + 1] >= 0 else np.inf
        d[j + 2] = a2 if r[j + 2] >= 0 else np.inf
        d[j + 3] = a3 if r[j + 3] >= 0 else np.inf
        d[j + 4] = a4 if r[j + 4] >= 0 else np.inf
        d[j + 5] = a5 if r[j + 5] >= 0 else np.inf
        d[j + 6] = a6 if r[j + 6] >= 0 else np.inf
        d[j + 7] = a7 if r[j + 7] >= 0 else np.inf
        j += 8
    for t in range(j, m):
        d[t] = np.inf if r[t] < 0 else _exact_score(q, i, x, r[t], ip)


@numba.njit(parallel=True, **_JIT)
def exact_rerank(q, x, rows, out_d, ip):
    """Re-score each query's shortlist ``rows[i]`` (−1: empty) exactly, as :func:`exact_rows` does, and rank it in
    place, ascending, ties to the smaller row, empty slots last; ``out_d[i]`` receives the exact scores rounded to
    float32 (beyond its range: inf). The lists arrive nearly in order (their float32 scores), so each is sorted by
    insertion, O(length) when nothing moves; a list that needs more than ``_RERANK_SHIFTS_PER_ROW`` shifts per entry
    goes to two stable merge sorts instead (by row, then by score). np.lexsort over the whole (queries, keep) array
    took 12 of the 15 ms re-scoring 1,000 lists of 208 rows (Zen 4, 2026-12-06)."""
    m = rows.shape[1]
    for i in prange(q.shape[0]):
        d = np.empty(m)
        r = np.empty(m, np.int64)
        for j in range(m):
            r[j] = rows[i, j]
        _exact_scores_of(q, i, x, r, ip, d)
        shifts = 0
        for j in range(1, m):
            dj, rj = d[j], r[j]
            p = j
            while p > 0 and ranks_before(dj, rj, d[p - 1], r[p - 1]):
                d[p] = d[p - 1]
                r[p] = r[p - 1]
                p -= 1
            d[p] = dj
            r[p] = rj
            shifts += j - p
            if shifts > _RERANK_SHIFTS_PER_ROW * m:
                key = np.where(r >= 0, r, np.iinfo(np.int64).max)
                by_row = np.argsort(key, kind="mergesort")
                order = by_row[np.argsort(d[by_row], kind="mergesort")]
                d = d[order]
                r = r[order]
                break
        for j in range(m):
            out_d[i, j] = np.float32(d[j])
            rows[i, j] = r[j]
