"""Fused brute-force shortlist without BLAS: register-blocked products of stored rows with a block of queries, each
distance (or negated inner product) screened against its query's running k-th best as soon as it is formed.

FlatIndex's BLAS path writes every (query block × row block) distance to a tile in memory and then reads it back to
merge the top-k: at 1M × 128 and 1,024 queries the GEMM took 1.2 s and the finishing and merging passes another
0.8 s (2026-12-05, Intel host), because a 16 MiB tile goes through main memory twice. Here the micro-kernels of
:mod:`kvant.kernels.direct_assign` compute R rows × all (padded) queries of x·qᵀ into a scratch block that stays in
L1; each row's distances ‖q‖² + ‖x‖² − 2 q·x (the BLAS path's expression, clamped the same way) are compared with
every query's threshold in one vectorised pass, and only the queries a row may enter are visited (rare once the
lists fill), appending the row to their reservoirs (see :data:`CAPACITY`). The lists returned are those of
:func:`kvant.kernels.topk.merge_topk` (ascending, ties to the smaller row); the products are summed in coordinate
order with fused multiply-adds instead of BLAS's order, within the same rounding bound, so callers that certify and
re-score (FlatIndex) return identical results.

Rows are split into chunks, and queries into blocks, that run in parallel, each (block, chunk) with its own lists;
:func:`kvant.kernels.topk.merge_topk_ids` then merges the chunks' lists, which keeps the tie rule.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._llvm import llvm_fn, splat
from .direct_assign import AVAILABLE, AVX512, MAX_CT_BYTES, _copy_rows, _group_rows, _products, _row_ptr
from .distance import sq_norms_into
from .topk import radix_sort_u64, ranks_before

__all__ = ["AVAILABLE", "CAPACITY", "MAX_BATCH", "capacity", "max_queries", "direct_keep", "finish_lists",
           "keep_from_products"]

_JIT = dict(cache=True, nogil=True, fastmath=False)
_JIT_RAW = dict(_JIT, _nrt=False)
# Queries per block: 256 padded columns is the widest product shape measured (direct_assign.SMALL_MAX_K); fewer when
# the padded qᵀ (D × columns float32) would not fit in half of L2 with room to spare.
_MAX_COLS = 256
# The batch sizes callers should send here. AVX-512 hosts: any (measured to 1,024 queries, 1.6-3.4× BLAS tiles at
# 1M × 128). AVX2 hosts: up to 16 queries, the width where the same micro-kernels beat OpenBLAS in the clustering
# E-steps (direct_assign.MAX_K); wider ones re-read qᵀ from L2 every 2 rows there, which lost to OpenBLAS at K = 64
# in whole fits, and this use of them has not been measured on such a host.
MAX_BATCH = None if AVX512 else 16


def max_queries(dim: int) -> int:
    """The most queries one :func:`direct_keep` call takes for vectors of ``dim`` (a multiple of 16, at least
    16): their padded transpose is read by every row group, so it must stay within :data:`MAX_CT_BYTES`."""
    return max(16, min(_MAX_COLS, (MAX_CT_BYTES // (4 * max(1, dim))) // 16 * 16))


@numba.njit(**_JIT_RAW)
def _condition_rows(x, i0, count, shift, steps, xt):
    """xt[:count] = (x[i0 : i0 + count] − shift)·steps[0]·steps[1]·… in float32, operation for operation as
    :func:`kvant._numerics.condition` computes it (``shift`` empty: no shift)."""
    for r in range(count):
        for t in range(x.shape[1]):
            v = x[i0 + r, t] - shift[t] if shift.shape[0] else x[i0 + r, t]
            for s in range(steps.shape[0]):
                v *= steps[s]
            xt[r, t] = v


@numba.njit(inline="always")
def _ranks_after(d1, i1, d2, i2):
    """(d1, i1) ranks after (d2, i2) in a list: a larger score, or an equal one with a larger row; an empty slot
    (row −1, score +inf) ranks after every kept row (:func:`kvant.kernels.topk.ranks_before`'s order)."""
    return ranks_before(d2, i2, d1, i1)


# Each query's list is a reservoir of CAPACITY·keep slots: rows that beat the query's threshold are appended, and a
# full reservoir is cut back to its keep best by a selection (O(capacity·keep), so O(1) per appended row), whose
# keep-th becomes the threshold. A heap paid O(log keep) dependent, cache-missing steps per row instead: k = 100
# (keep 208) over 20,000 3-d rows, 1,000 queries, the insertions took 42 of the 49 ms of the shortlist (Zen 4,
# 2026-12-06), where FAISS keeps such lists in reservoirs as well. The threshold only tightens at each cut, so
# somewhat more rows are appended than a heap would take.
CAPACITY = 2
assert CAPACITY >= 2  # (capacity() gives a reservoir at least keep + 1 slots: a cut must leave room to append)


@numba.njit(**_JIT)
def capacity(keep, rows=1 << 62):
    """Slots of one query's reservoir for lists of ``keep`` rows over ``rows`` rows (see :data:`CAPACITY`): never
    more than the rows (which then never fill it), and at least one more than ``keep`` (a cut must free a slot).
    k = n over 10M rows would otherwise take 240 MiB per query."""
    return max(keep + 1, min(CAPACITY * keep, rows))


@numba.njit(inline="always")
def _swap(bd, bi, a, b):
    bd[a], bd[b] = bd[b], bd[a]
    bi[a], bi[b] = bi[b], bi[a]


@numba.njit(inline="always")
def _sift_down(hd, hi, size, pos, d, i):
    """Place (d, i) at ``pos`` of the max-heap ``hd[:size]``/``hi[:size]`` (ordered by :func:`_ranks_after`, the
    entry ranking last at the root), whose subtrees below ``pos`` are heaps, and sift it down."""
    while True:
        c = 2 * pos + 1
        if c >= size:
            break
        if c + 1 < size and _ranks_after(hd[c + 1], hi[c + 1], hd[c], hi[c]):
            c += 1
        if not _ranks_after(hd[c], hi[c], d, i):
            break
        hd[pos] = hd[c]
        hi[pos] = hi[c]
        pos = c
    hd[pos] = d
    hi[pos] = i


@numba.njit(**_JIT_RAW)
def _sort(bd, bi):
    """Sort bd/bi in place, ascending by :func:`_ranks_after` (ties to the smaller row, empty slots last): a heap
    sort, O(n log n) whatever the order."""
    n = bd.shape[0]
    for start in range(n // 2 - 1, -1, -1):
        _sift_down(bd, bi, n, start, bd[start], bi[start])
    for end in range(n - 1, 0, -1):
        d, i = bd[end], bi[end]
        bd[end], bi[end] = bd[0], bi[0]
        _sift_down(bd, bi, end, 0, d, i)


@numba.njit(**_JIT_RAW)
def _select(bd, bi, n, kth):
    """Reorder bd[:n]/bi[:n] so that position ``kth`` holds the entry of that rank (:func:`_ranks_after`'s order),
    every entry before it ranking before it and every one after it after: quickselect with a median-of-three pivot
    (entries are distinct: every row appears once), sorting what is left by :func:`_sort` should partitions keep
    coming out lopsided. (Branch-free partitions, in place or into a second buffer, measured slower: 3.5 and 5.4 µs
    per 416 entries against 2.1.)"""
    lo, hi = 0, n - 1
    budget = 64
    while hi > lo:
        budget -= 1
        if budget == 0:
            _sort(bd[lo : hi + 1], bi[lo : hi + 1])
            return
        mid = (lo + hi) // 2
        if _ranks_after(bd[lo], bi[lo], bd[mid], bi[mid]):
            _swap(bd, bi, lo, mid)
        if _ranks_after(bd[lo], bi[lo], bd[hi], bi[hi]):
            _swap(bd, bi, lo, hi)
        if _ranks_after(bd[mid], bi[mid], bd[hi], bi[hi]):
            _swap(bd, bi, mid, hi)
        _swap(bd, bi, mid, hi)  # the median as the pivot, at hi
        pd, pi = bd[hi], bi[hi]
        store = lo
        for t in range(lo, hi):
            if _ranks_after(pd, pi, bd[t], bi[t]):
                _swap(bd, bi, store, t)
                store += 1
        _swap(bd, bi, store, hi)
        if store == kth:
            return
        if kth < store:
            hi = store - 1
        else:
            lo = store + 1


@numba.njit(inline="always")
def _append(buf_d, buf_i, fill, thr, j, d, row, keep):
    """Append (d, row) to query j's reservoir; a full one is cut back to its ``keep`` best, whose last becomes the
    threshold."""
    f = fill[j]
    buf_d[j, f] = d
    buf_i[j, f] = row
    f += 1
    if f == buf_d.shape[1]:
        _select(buf_d[j], buf_i[j], f, keep - 1)
        thr[j] = buf_d[j, keep - 1]
        f = keep
    fill[j] = f


_ROW_LIMIT = 1 << 32  # rows below this fit the low half of a packed key


@numba.njit(inline="always")
def _ordered_bits(bits):
    """The bits (uint64 holding a float32's 32) of a score, no NaN and no −0.0, mapped to an unsigned integer of the
    same order: negative floats flipped whole, positive ones with the sign bit set."""
    return bits ^ (np.uint64(0xFFFFFFFF) if bits >> np.uint64(31) else np.uint64(0x80000000))


@numba.njit(inline="always")
def _float_bits(ordered):
    """The inverse of :func:`_ordered_bits`."""
    return ordered ^ (np.uint64(0x80000000) if ordered >> np.uint64(31) else np.uint64(0xFFFFFFFF))


@numba.njit(**_JIT)
def _packed(bd, bi, f, keys):
    """keys[:f] = each entry of bd[:f]/bi[:f] as one unsigned integer (its score's bits in order, then its row), so
    that integer order is :func:`_ranks_after`'s order; False (keys unwritten) when a row does not fit 32 bits."""
    for p in range(f):
        if bi[p] >= _ROW_LIMIT:
            return False
        bd[p] += np.float32(0.0)  # −0.0 becomes +0.0: equal scores, which rank by row
    bits = bd[:f].view(np.uint32)
    for p in range(f):
        keys[p] = (_ordered_bits(np.uint64(bits[p])) << np.uint64(32)) | np.uint64(bi[p])
    return True


@numba.njit(**_JIT)
def best_packed(bd, bi, f, keep, out_d, out_i, keys, bits):
    """out_d[:m]/out_i[:m] = the m = min(f, keep) best entries of bd[:f]/bi[:f], ascending by :func:`_ranks_after`'s
    order, from packed integer keys (score bits, row) partitioned and sorted (``keys``: f uint64 scratch, ``bits``:
    keep uint32 scratch); returns m, or −1 with nothing written when a row does not fit 32 bits. bd must hold no NaN
    (a NaN's bits rank by its sign); −0.0 is turned into +0.0 in bd. The heap sort by :func:`_ranks_after` after a
    selection took 14 µs per list of 208 from 416 (1,000 queries: a quarter of the shortlist's time, Zen 4,
    2026-12-06)."""
    if not _packed(bd, bi, f, keys):
        return -1
    top = np.partition(keys[:f], keep - 1)[:keep] if f > keep else keys[:f]
    radix_sort_u64(top)
    m = top.shape[0]
    for p in range(m):
        bits[p] = np.uint32(_float_bits(top[p] >> np.uint64(32)))
        out_i[p] = np.int64(top[p] & np.uint64(0xFFFFFFFF))
    scores = bits.view(np.float32)
    for p in range(m):
        out_d[p] = scores[p]
    return m


@numba.njit(**_JIT)
def finish_lists(buf_d, buf_i, fill, out_d, out_i):
    """The lists as :func:`direct_keep` returns them (nq, keep: ascending, ties to the smaller row, padded inf / -1)
    from the reservoirs :func:`keep_from_products` filled (nq, capacity, with ``fill`` entries each), by
    :func:`best_packed` (rows beyond 32 bits: a selection and a heap sort)."""
    keep = out_d.shape[1]
    keys = np.empty(buf_d.shape[1], np.uint64)
    bits = np.empty(keep, np.uint32)
    for j in range(out_d.shape[0]):
        f = best_packed(buf_d[j], buf_i[j], fill[j], keep, out_d[j], out_i[j], keys, bits)
        if f < 0:
            f = fill[j]
            if f > keep:
                _select(buf_d[j], buf_i[j], f, keep - 1)
                f = keep
            _sort(buf_d[j, :f], buf_i[j, :f])
            for p in range(f):
                out_d[j, p] = buf_d[j, p]
                out_i[j, p] = buf_i[j, p]
        for p in range(f, keep):
            out_d[j, p] = np.float32(np.inf)
            out_i[j, p] = -1


_L = 16  # lanes of the AVX-512 screen
inf_f32 = np.float32(np.inf)


@intrinsic
def _hits16(typingctx, g, r, qn, xi, thr, j0, m, ip, hits, count):
    """Of the queries j0 .. j0 + m − 1 (m <= 16), those whose list row ``r`` of the products ``g`` may enter (the
    screen of :func:`_screen_hits_loop`, the same float32 operations), stored as int32 into ``hits`` from ``count``
    on (a compress into a register, vpcompressd, and one 16-lane store: the compress store to memory is microcoded
    on Zen 4 and made the screen 3× slower); returns the new count. ``g`` (rows, ≥ j0 + m) float32 with unit-stride
    rows, ``qn`` and ``thr`` float32 and ``hits`` int32 (16 slots from ``count`` on), contiguous."""
    arrays = (g, qn, thr, hits)
    if not all(isinstance(a, types.Array) for a in arrays) or g.ndim != 2 or g.layout != "C":
        return None  # (the 16-lane loads read a row's columns as consecutive floats)
    if (g.dtype, qn.dtype, thr.dtype, hits.dtype) != (types.float32,) * 3 + (types.int32,) or not all(
            a.ndim == 1 and a.layout == "C" for a in (qn, thr, hits)):
        return None
    sig = types.intp(g, r, qn, xi, thr, j0, m, ip, hits, count)

    def codegen(context, builder, signature, args):
        g_v, r_v, qn_v, xi_v, thr_v, j0_v, m_v, ip_v, hits_v, count_v = args
        f32, i32, i1 = ir.FloatType(), ir.IntType(32), ir.IntType(1)
        vf, vi, vb = ir.VectorType(f32, _L), ir.VectorType(i32, _L), ir.VectorType(i1, _L)
        intp = context.get_value_type(types.intp)
        ag = context.make_array(signature.args[0])(context, builder, g_v)
        j0 = context.cast(builder, j0_v, signature.args[5], types.intp)
        r = context.cast(builder, r_v, signature.args[1], types.intp)
        m = builder.trunc(context.cast(builder, m_v, signature.args[6], types.intp), i32)
        mask = builder.icmp_signed("<", ir.Constant(vi, list(range(_L))), splat(builder, m, vi))
        load = llvm_fn(builder.module, f"llvm.masked.load.v{_L}f32.p0v{_L}f32", vf, [vf.as_pointer(), i32, vb, vf])
        zero = ir.Constant(vf, [0.0] * _L)

        def lanes(ptr):
            return builder.call(load, [builder.bitcast(builder.gep(ptr, [j0]), vf.as_pointer()), ir.Constant(i32, 4),
                                       mask, zero])

        gv = lanes(_row_ptr(builder, ag, 2, r))
        qv = lanes(context.make_array(signature.args[2])(context, builder, qn_v).data)
        tv = lanes(context.make_array(signature.args[4])(context, builder, thr_v).data)
        xi = context.cast(builder, xi_v, signature.args[3], types.float32)
        l2 = builder.fsub(builder.fadd(qv, splat(builder, xi, vf)), builder.fmul(ir.Constant(vf, [2.0] * _L), gv))
        ip = context.cast(builder, ip_v, signature.args[7], types.boolean)
        v = builder.select(ip, builder.fneg(gv), l2)
        enter = builder.or_(builder.fcmp_unordered("<", v, tv),
                            builder.fcmp_ordered("==", tv, ir.Constant(vf, [float("inf")] * _L)))
        enter = builder.and_(enter, mask)
        ids = builder.add(splat(builder, builder.trunc(j0, i32), vi), ir.Constant(vi, list(range(_L))))
        count = context.cast(builder, count_v, signature.args[9], types.intp)
        dst = builder.gep(context.make_array(signature.args[8])(context, builder, hits_v).data, [count])
        compress = llvm_fn(builder.module, f"llvm.experimental.vector.compress.v{_L}i32", vi, [vi, vb, vi])
        builder.store(builder.call(compress, [ids, enter, ir.Constant(vi, ir.Undefined)]),
                      builder.bitcast(dst, vi.as_pointer()), align=4)
        pop = llvm_fn(builder.module, f"llvm.ctpop.i{_L}", ir.IntType(_L), [ir.IntType(_L)])
        return builder.add(count, builder.zext(builder.call(pop, [builder.bitcast(enter, ir.IntType(_L))]), intp))

    return sig, codegen


@numba.njit(inline="always")
def _screen_hits_avx512(g, r, xi, qn, thr, nq, ip, hits):
    count = 0
    for j0 in range(0, nq, _L):
        count = _hits16(g, r, qn, xi, thr, j0, min(_L, nq - j0), ip, hits, count)
    return count


@numba.njit(inline="always")
def _screen_hits_loop(g, r, xi, qn, thr, nq, ip, hits):
    """The queries whose list row ``r`` of the products ``g`` (‖x‖² = ``xi``) may enter, into ``hits``; returns
    their count. A score equal to a threshold cannot enter (rows arrive in ascending order: ties keep the earlier
    row), NaN (float32 overflow) can, and an infinite threshold (a list not yet full) takes everything. First one
    vectorised pass counts them (most rows enter no list once the lists fill), then a branch-free pass lists them."""
    hit = np.int32(0)
    inf = np.float32(np.inf)
    if ip:
        for j in range(nq):
            hit += np.int32(not -g[r, j] >= thr[j] or thr[j] == inf)
    else:
        for j in range(nq):
            v = qn[j] + xi - np.float32(2.0) * g[r, j]
            hit += np.int32(not v >= thr[j] or thr[j] == inf)
    if hit == 0:
        return 0
    count = 0
    for j in range(nq):
        d = -g[r, j] if ip else qn[j] + xi - np.float32(2.0) * g[r, j]
        hits[count] = j
        count += not d >= thr[j] or thr[j] == inf
    return count


# AVX-512: the screen in one pass of 16-lane compares and register compresses. The two passes of the loop made most of
# the shortlist's time where long lists over few rows let most rows into some of 256 queries' lists (20,000 × 3 rows,
# k = 100, 1,000 queries: 4.5 of 14 ms per block of 256 queries, one thread, Zen 4, 2026-12-06).
_screen_hits = _screen_hits_avx512 if AVX512 else _screen_hits_loop


@numba.njit(inline="always")
def _screen_row(g, r, row, xi, qn, nq, ip, buf_d, buf_i, fill, thr, keep, hits):
    """Row ``r`` of the products ``g`` (stored row ``row``, ‖x‖² = ``xi``) into the reservoirs of the ``nq`` queries
    whose threshold (``thr``) it may beat (:func:`_screen_hits`; ``hits``: nq + 16 int32 scratch). On data of many
    duplicates nearly every row tied some query's threshold: equal scores do not pass the screen (100k × 3 rows of
    60 distinct values, 200 queries, k = 100 took 1.3 s in this kernel when they did)."""
    count = _screen_hits(g, r, xi, qn, thr, nq, ip, hits)
    for h in range(count):
        j = hits[h]
        if ip:
            d = -g[r, j]
            if d != d:  # merge_topk's rule: NaN is never selected (defensive: with fused multiply-adds
                continue    # and finite rows the sum cannot meet inf - inf)
        else:
            v = qn[j] + xi - np.float32(2.0) * g[r, j]
            # finish_sq_l2's clamp: never below 0, and +inf (not 0) where inf - inf gave NaN
            d = v if v > 0 else (np.float32(0.0) if v == v else np.float32(np.inf))
        if not d >= thr[j] or thr[j] == inf_f32:  # (the clamp may have moved it)
            _append(buf_d, buf_i, fill, thr, j, d, row, keep)


@numba.njit(**_JIT_RAW)
def keep_from_products(g, i0, x_sqnorms, qn, ip, buf_d, buf_i, fill, thr, keep, hits):
    """:func:`direct_keep`'s screen and insertions for products computed elsewhere (BLAS): ``g`` (rows, nq) holds
    x[i0 + r]·q_j for the rows i0 .. i0 + rows − 1 (``x_sqnorms`` their ‖x‖², read for l2 only). The reservoirs
    ``buf_d``/``buf_i`` (nq, :func:`capacity` (keep)) with ``fill`` entries each (0 at first) and the thresholds
    ``thr`` (nq; +inf at first) are updated in place, block after block; :func:`finish_lists` then writes the lists
    of ``keep``. ``hits``: int32 scratch of nq + 16. Serial and ``nogil``: one call per row block, from Python worker
    threads."""
    nq = g.shape[1]
    for r in range(g.shape[0]):
        _screen_row(g, r, i0 + r, x_sqnorms[r] if not ip else np.float32(0.0), qn, nq, ip, buf_d, buf_i, fill, thr,
                    keep, hits)


@numba.njit(**_JIT_RAW)
def _keep_rows(x, r0, r1, ct, qn, x_sqnorms, nq, ip, shift, steps, buf_d, buf_i, fill, thr, keep, g, xt, xn, hits):
    """Rows r0 .. r1 - 1 of x into the reservoirs of the ``nq`` real queries (columns of ``ct``); ``thr[j]`` is
    query j's threshold (contiguous, so the screen vectorises). With ``steps`` (conditioned l2) each group
    of rows is conditioned into ``xt`` and its norms computed into ``xn`` first. Returns the largest ‖x‖² seen
    (conditioned rows; 0 otherwise)."""
    R = g.shape[0]
    cond = steps.shape[0] > 0 or shift.shape[0] > 0
    x_sq_max = 0.0
    i0 = r0
    while i0 < r1:
        cnt = min(R, r1 - i0)
        if cond:  # as FlatIndex's BLAS path conditions each block, norms included
            _condition_rows(x, i0, cnt, shift, steps, xt)
            sq_norms_into(xt, 0, cnt, xn)
            _products(xt, 0, ct, g)
        elif cnt == R:
            _products(x, i0, ct, g)
        else:  # the last partial group, through the zero-padded scratch
            _copy_rows(x, i0, cnt, xt)
            _products(xt, 0, ct, g)
        for r in range(cnt):
            if cond:
                xi = xn[r]
                x_sq_max = max(x_sq_max, np.float64(xi))
            else:
                xi = x_sqnorms[i0 + r]
            _screen_row(g, r, i0 + r, xi, qn, nq, ip, buf_d, buf_i, fill, thr, keep, hits)
        i0 += cnt
    return x_sq_max


@numba.njit(parallel=True, **_JIT)
def direct_keep(x, cts, qns, nqs, x_sqnorms, ip, out_d, out_i, shift, steps, x_sq_max):
    """Per block b of queries (the first ``nqs[b]`` columns of ``cts[b]``) and per chunk c of x's rows: the
    ``keep = out_d.shape[3]`` smallest scores with their row indices, ascending, ties to the smaller row, into
    ``out_d[c, b]`` / ``out_i[c, b]`` (n_chunks, n_blocks, columns, keep; padded inf / -1). Every (block, chunk) pair is
    one task of the parallel loop: callers split the rows (few queries) or the queries (short chunks of rows for long
    lists, where each chunk's own lists multiply the insertions). The score is ‖q‖² + ‖x‖² − 2 q·x (float32, clamped
    as :func:`kvant.kernels.distance.finish_sq_l2` does) or, with ``ip``, −q·x (NaN never selected, as in
    :func:`kvant.kernels.topk.merge_topk`). ``cts[b] = direct_assign.padded_centroids(block, ‖q‖²)[0]`` (qᵀ, (D, 16·m)
    float32, zero columns after the queries, every block as wide); ``qns[b]`` the block's ‖q‖² and ``x_sqnorms`` the
    rows' ‖x‖² (float32; read for unconditioned l2 only). Chunk c holds rows c·n/n_chunks .. (c+1)·n/n_chunks − 1.

    l2 on conditioned data (:func:`kvant._numerics.condition`): ``shift`` (float32, D; empty for none) and the
    float32 factors ``steps`` its scale is applied in (empty for none) condition each row group as it is read, its
    norms computed the way ``sq_norms`` computes them, and ``x_sq_max[b, c]`` receives chunk c's largest conditioned
    ‖x‖² (for the caller's error bound); the queries must be conditioned already."""
    n, dim = x.shape
    n_chunks, n_blocks, _, keep = out_d.shape
    kp = cts.shape[2]
    R = _group_rows(kp)
    for t in numba.prange(n_blocks * n_chunks):
        b, c = t // n_chunks, t % n_chunks
        nq = nqs[b]
        g = np.empty((R, kp), np.float32)
        xt = np.zeros((R, dim), np.float32)
        xn = np.empty(R, np.float32)
        thr = np.full(nq, np.inf, np.float32)
        fill = np.zeros(nq, np.int64)
        slots = capacity(keep, (c + 1) * n // n_chunks - c * n // n_chunks)
        buf_d = np.empty((nq, slots), np.float32)
        buf_i = np.empty((nq, slots), np.int64)
        x_sq_max[b, c] = _keep_rows(x, c * n // n_chunks, (c + 1) * n // n_chunks, cts[b], qns[b], x_sqnorms, nq, ip,
                                    shift, steps, buf_d, buf_i, fill, thr, keep, g, xt, xn, np.empty(nq + _L, np.int32))
        finish_lists(buf_d, buf_i, fill, out_d[c, b, :nq], out_i[c, b, :nq])
