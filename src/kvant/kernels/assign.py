"""Fused assignment: for each row, the nearest centroid and the two smallest squared distances.

``top2_from_ip`` finishes a BLAS inner-product block. A hand-written direct kernel (Σ(x−c)² term by term)
was measured against it on D·K from 16 to 3,000 and lost everywhere, by 1× to 10× (docs/auto.md); for
K <= 64 on AVX-512 hosts a register-blocked inner-product kernel (:mod:`.direct_assign`) replaces
the GEMM. The top-2 distances feed Hamerly bounds in :mod:`kvant.cluster.lloyd`: the second distance is the
lower bound to every other centroid. Ties go to the smaller centroid id. The kernel is serial and ``nogil``:
callers run them on row blocks from several threads (see :mod:`kvant._parallel`).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._llvm import llvm_fn, splat
from .distance import _row_sqnorm, row_scaled_sq_dist64, row_sq_dist64

_JIT = dict(cache=True, nogil=True, fastmath=False)


@intrinsic
def _f32_bits(typingctx, x):
    """The int32 bit pattern of a float32 (a register bitcast; NumPy's ``view`` has no scalar form in Numba)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


_LANES = 16  # top2_from_ip's vector width: one 512-bit register on AVX-512, two 256-bit ones on AVX2


def _typed_f32(g, cn, xi) -> bool:
    """The lane intrinsics read float32 rows, float32 norms and a float32 scalar: anything else is a typing error."""
    return (isinstance(g, types.Array) and g.dtype == types.float32 and g.ndim == 2
            and isinstance(cn, types.Array) and cn.dtype == types.float32 and cn.ndim == 1 and xi == types.float32)


@intrinsic
def _top2_lanes(typingctx, g, i, cn, xi, f, kv):
    """Top-2 of row ``i`` of ``g`` over its first ``kv`` columns (a multiple of 16), one pass, 16 lanes.

    Distance j is ``bits(max(xi + cn[j] − 2·(g[i, j]·f), 0))`` with NaN mapped to 0, as
    :func:`top2_from_ip` defines it (same float32 operations in the same order, no contraction). Each lane
    keeps its smallest value, its first index and its second smallest (``m2 = min(m2, max(m1, v))`` counts a
    repeated minimum); the lanes are then reduced. Returns (best, runner-up, first index of best) as int32."""
    if not (_typed_f32(g, cn, xi) and f == types.float32):
        return None
    i32 = types.int32
    sig = types.UniTuple(i32, 3)(g, i, cn, xi, f, kv)

    def codegen(context, builder, signature, args):
        g_v, i_v, cn_v, xi_v, f_v, kv_v = args
        dist, vi, L, intp = _lane_setup(context, builder, signature, g_v, i_v, cn_v, xi_v, f_v)
        it = ir.IntType(32)
        mod = builder.module

        def smin(a, b):
            return builder.select(builder.icmp_signed("<", a, b), a, b)

        def smax(a, b):
            return builder.select(builder.icmp_signed(">", a, b), a, b)

        above = ir.Constant(vi, [0x7F800001] * L)  # above every value (so the first one is always taken)
        m1p = cgutils.alloca_once_value(builder, above)
        m2p = cgutils.alloca_once_value(builder, above)
        ixp = cgutils.alloca_once_value(builder, ir.Constant(vi, [0x7FFFFFFF] * L))
        jp = cgutils.alloca_once_value(builder, ir.Constant(vi, list(range(L))))
        with cgutils.for_range(builder, builder.udiv(kv_v, ir.Constant(intp, L))) as loop:
            v = dist(builder.mul(loop.index, ir.Constant(intp, L)))
            m1 = builder.load(m1p)
            jv = builder.load(jp)
            builder.store(smin(builder.load(m2p), smax(m1, v)), m2p)
            builder.store(builder.select(builder.icmp_signed("<", v, m1), jv, builder.load(ixp)), ixp)
            builder.store(smin(m1, v), m1p)
            builder.store(builder.add(jv, ir.Constant(vi, [L] * L)), jp)
        m1, m2, ix = builder.load(m1p), builder.load(m2p), builder.load(ixp)
        red = llvm_fn(mod, f"llvm.vector.reduce.smin.v{L}i32", it, [vi])
        best = builder.call(red, [m1])
        eq = builder.icmp_signed("==", m1, splat(builder, best, vi))
        arg = builder.call(red, [builder.select(eq, ix, ir.Constant(vi, [0x7FFFFFFF] * L))])
        run = builder.call(red, [smin(m2, builder.select(eq, above, m1))])
        ties = builder.call(llvm_fn(mod, f"llvm.ctpop.i{L}", ir.IntType(L), [ir.IntType(L)]),
                            [builder.bitcast(eq, ir.IntType(L))])
        run = builder.select(builder.icmp_unsigned(">", ties, ir.Constant(ir.IntType(L), 1)), best, run)
        return context.make_tuple(builder, signature.return_type, [best, run, arg])

    return sig, codegen


@numba.njit(inline="always", **_JIT)
def _dist_bits(xi, cn, g):
    """The scalar form of the lanes' distance: bits of xi + cn − 2g (float32, in that order), negative and NaN
    patterns mapped to 0."""
    v = max(_f32_bits(xi + cn - np.float32(2.0) * g), np.int32(0))
    return v if v <= np.int32(0x7F800000) else np.int32(0)


@numba.njit(inline="always", **_JIT)
def store_top2(labels, d1, d2, i, best, run, arg):
    """Row i's outputs from the top-2 distance bit patterns: the label, d1, and d2 capped at +inf (its value when
    K == 1, where the runner-up is still the "above everything" start)."""
    labels[i] = arg
    d1[i] = np.int32(best).view(np.float32)
    d2[i] = np.int32(min(run, np.int32(0x7F800000))).view(np.float32)


@numba.njit(**_JIT)
def top2_from_ip(g, c_sqnorms, x_sqnorms, labels, d1, d2, row_scale=None):
    """g (b, K) = x·cᵀ (read only). Writes labels (argmin ‖x−c‖²), d1 (its squared distance) and d2 (the
    runner-up's). ``row_scale`` (b,) float32, if given, multiplies row i of g first (in float32, as
    ``g *= row_scale[:, None]`` would, without that extra pass over g): spherical k-means assigns raw rows
    this way, with 1/‖x‖ as the scale.

    Distances ‖x‖² + ‖c‖² − 2x·c are clamped at 0 and handled as int32 bit patterns, which order exactly
    like non-negative floats: the clamp is a max with 0 (negative floats, −0.0 included, have negative
    patterns; NaN patterns above +inf's are mapped to 0 as well, so a label is always < K) and every min is
    an integer min. One pass per row: the columns in multiples of 16 go through 16-lane vectors that keep,
    per lane, the minimum, its first index and the runner-up (:func:`_top2_lanes`); the last K mod 16 columns
    are folded in one by one. Ties go to the smaller centroid id; the runner-up is the minimum again when it
    occurs twice. (The previous three-pass version, which also wrote the distances back into g, was
    2.5-3× slower at K = 64..1024.)
    """
    b, K = g.shape
    above = np.int32(0x7F800001)  # above every clamped value: the first column is always taken
    # the vector loads need unit-stride rows and norms; anything else takes the scalar loop
    kv = K - K % _LANES if g.strides[1] == 4 and c_sqnorms.strides[0] == 4 else 0
    for i in range(b):
        xi = x_sqnorms[i]
        f = np.float32(1.0) if row_scale is None else row_scale[i]  # x·1 == x exactly, NaN and inf included
        if kv:
            best, run, arg = _top2_lanes(g, i, c_sqnorms, xi, f, kv)
        else:
            best, run, arg = above, above, np.int32(K)
        for j in range(kv, K):
            v = _dist_bits(xi, c_sqnorms[j], g[i, j] * f)
            if v < best:
                run = best
                best = v
                arg = np.int32(j)
            elif v < run:
                run = v
        store_top2(labels, d1, d2, i, best, run, arg)


@intrinsic
def _lane_min_max(typingctx, g, i, cn, xi, kv):
    """max over 16 lanes of each lane's minimum distance bits over columns 0..kv-1 of row ``i`` (kv a multiple of
    16; distances as in :func:`_top2_lanes` with no row scale): 16 distinct columns lie at or below it, so it
    bounds the 16th smallest distance of the row from above."""
    if not _typed_f32(g, cn, xi):
        return None
    sig = types.int32(g, i, cn, xi, kv)

    def codegen(context, builder, signature, args):
        g_v, i_v, cn_v, xi_v, kv_v = args
        dist, vi, L, intp = _lane_setup(context, builder, signature, g_v, i_v, cn_v, xi_v)
        m1p = cgutils.alloca_once_value(builder, ir.Constant(vi, [0x7F800001] * L))
        with cgutils.for_range(builder, builder.udiv(kv_v, ir.Constant(intp, L))) as loop:
            v = dist(builder.mul(loop.index, ir.Constant(intp, L)))
            m1 = builder.load(m1p)
            builder.store(builder.select(builder.icmp_signed("<", v, m1), v, m1), m1p)
        red = llvm_fn(builder.module, f"llvm.vector.reduce.smax.v{L}i32", ir.IntType(32), [vi])
        return builder.call(red, [builder.load(m1p)])

    return sig, codegen


@intrinsic
def _lane_top2_ids(typingctx, g, i, cn, xi, kv, lv, lj):
    """Each lane's two smallest distances (bits, as :func:`_top2_lanes` computes them, no row scale) and their
    column ids over columns 0..kv-1 of row ``i`` (kv a multiple of 16), in one pass: lane l's smallest goes to
    ``lv[l]``/``lj[l]``, its runner-up to ``lv[16 + l]``/``lj[16 + l]`` (ties keep the smaller column first).
    ``lv``/``lj``: int32 arrays of at least 32."""
    if not (_typed_f32(g, cn, xi) and all(isinstance(a, types.Array) and a.dtype == types.int32 and a.ndim == 1
                                          for a in (lv, lj))):
        return None
    sig = types.void(g, i, cn, xi, kv, lv, lj)

    def codegen(context, builder, signature, args):
        g_v, i_v, cn_v, xi_v, kv_v, lv_v, lj_v = args
        dist, vi, L, intp = _lane_setup(context, builder, signature, g_v, i_v, cn_v, xi_v)
        above = ir.Constant(vi, [0x7F800001] * L)  # above every value
        m1p = cgutils.alloca_once_value(builder, above)
        m2p = cgutils.alloca_once_value(builder, above)
        i1p = cgutils.alloca_once_value(builder, ir.Constant(vi, [0x7FFFFFFF] * L))
        i2p = cgutils.alloca_once_value(builder, ir.Constant(vi, [0x7FFFFFFF] * L))
        jp = cgutils.alloca_once_value(builder, ir.Constant(vi, list(range(L))))
        with cgutils.for_range(builder, builder.udiv(kv_v, ir.Constant(intp, L))) as loop:
            v = dist(builder.mul(loop.index, ir.Constant(intp, L)))
            m1, m2, i1, i2, jv = (builder.load(p) for p in (m1p, m2p, i1p, i2p, jp))
            lt1 = builder.icmp_signed("<", v, m1)  # a new minimum: the old one becomes the runner-up
            lt2 = builder.icmp_signed("<", v, m2)  # (columns arrive in increasing order: ties stay behind)
            builder.store(builder.select(lt1, m1, builder.select(lt2, v, m2)), m2p)
            builder.store(builder.select(lt1, i1, builder.select(lt2, jv, i2)), i2p)
            builder.store(builder.select(lt1, v, m1), m1p)
            builder.store(builder.select(lt1, jv, i1), i1p)
            builder.store(builder.add(jv, ir.Constant(vi, [L] * L)), jp)
        for arr_v, arr_t, lo, hi in ((lv_v, signature.args[5], m1p, m2p), (lj_v, signature.args[6], i1p, i2p)):
            a = context.make_array(arr_t)(context, builder, arr_v)
            ptr = builder.bitcast(a.data, vi.as_pointer())
            builder.store(builder.load(lo), ptr, align=4)
            builder.store(builder.load(hi), builder.gep(ptr, [ir.Constant(intp, 1)]), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _bitonic_stage(builder, keys, size, stride, ascending):
    """One compare-exchange stage of a bitonic network on a <16 x i64> vector of keys: lane x meets lane
    x ^ stride and keeps the smaller key when its block of ``size`` runs in the wanted direction and x is the
    lower lane of the pair (else the larger)."""
    L = _LANES
    i32 = ir.IntType(32)
    partner = builder.shuffle_vector(keys, ir.Constant(keys.type, ir.Undefined),
                                     ir.Constant(ir.VectorType(i32, L), [x ^ stride for x in range(L)]))
    want_min = [((x & stride) == 0) == (((x & size) == 0) == ascending) for x in range(L)]
    smaller = builder.icmp_signed("<", partner, keys)
    take = builder.xor(smaller, ir.Constant(ir.VectorType(ir.IntType(1), L), [not w for w in want_min]))
    return builder.select(take, partner, keys)


def _bitonic_sort(builder, keys, ascending):
    for size in (2, 4, 8, 16):
        stride = size // 2
        while stride:
            keys = _bitonic_stage(builder, keys, size, stride, ascending)
            stride //= 2
    return keys


@intrinsic
def _smallest16(typingctx, lv, lj, sel):
    """The 16 smallest (distance bits, id) keys among the 32 of ``lv``/``lj`` (:func:`_lane_top2_ids`' layout),
    their ids written to sel[0..15] in ascending key order. Branch-free, in registers: the two halves are sorted in
    opposite directions by bitonic networks, their lane-wise minimum holds the 16 smallest (a bitonic split), and
    a bitonic merge orders them. (Equal keys, such as the sentinels of a lane with one column, stay a multiset.)"""
    if not all(isinstance(a, types.Array) and a.dtype == types.int32 and a.ndim == 1 for a in (lv, lj, sel)):
        return None
    sig = types.void(lv, lj, sel)

    def codegen(context, builder, signature, args):
        L = _LANES
        i64 = ir.IntType(64)
        vi = ir.VectorType(ir.IntType(32), L)
        vk = ir.VectorType(i64, L)
        ptrs = [builder.bitcast(context.make_array(t)(context, builder, v).data, vi.as_pointer())
                for t, v in zip(signature.args, args)]

        def keys(half):
            v = builder.load(builder.gep(ptrs[0], [ir.Constant(i64, half)]), align=4)
            j = builder.load(builder.gep(ptrs[1], [ir.Constant(i64, half)]), align=4)
            hi = builder.shl(builder.sext(v, vk), ir.Constant(vk, [32] * L))
            return builder.or_(hi, builder.zext(j, vk))

        a = _bitonic_sort(builder, keys(0), True)
        b = _bitonic_sort(builder, keys(1), False)
        c = builder.select(builder.icmp_signed("<", a, b), a, b)  # the 16 smallest, a bitonic sequence
        for stride in (8, 4, 2, 1):
            c = _bitonic_stage(builder, c, 16, stride, True)
        builder.store(builder.trunc(c, vi), ptrs[2], align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _compress_le(typingctx, g, i, cn, xi, off, th, bv, bj, n):
    """Append the distance bits and column ids of the columns off..off+15 of row ``i`` whose bits are <= ``th`` to
    ``bv``/``bj`` at position ``n`` (branch-free: a masked compress store, vpcompressd on AVX-512); returns the new
    length. ``bv``/``bj`` need 16 free slots from ``n`` on."""
    if not _typed_f32(g, cn, xi):
        return None
    sig = types.intp(g, i, cn, xi, off, th, bv, bj, n)

    def codegen(context, builder, signature, args):
        g_v, i_v, cn_v, xi_v, off_v, th_v, bv_v, bj_v, n_v = args
        dist, vi, L, intp = _lane_setup(context, builder, signature, g_v, i_v, cn_v, xi_v)
        i32 = ir.IntType(32)
        v = dist(off_v)
        keep = builder.icmp_signed("<=", v, splat(builder, th_v, vi))
        ids = builder.add(splat(builder, builder.trunc(off_v, i32), vi), ir.Constant(vi, list(range(L))))
        mod = builder.module
        store = llvm_fn(mod, f"llvm.masked.compressstore.v{L}i32", ir.VoidType(),
                         [vi, i32.as_pointer(), ir.VectorType(ir.IntType(1), L)])
        a_bv = context.make_array(signature.args[6])(context, builder, bv_v)
        a_bj = context.make_array(signature.args[7])(context, builder, bj_v)
        builder.call(store, [v, builder.gep(a_bv.data, [n_v]), keep])
        builder.call(store, [ids, builder.gep(a_bj.data, [n_v]), keep])
        cnt = builder.call(llvm_fn(mod, f"llvm.ctpop.i{L}", ir.IntType(L), [ir.IntType(L)]),
                           [builder.bitcast(keep, ir.IntType(L))])
        return builder.add(n_v, builder.zext(cnt, intp))

    return sig, codegen


@intrinsic
def _count_le(typingctx, bv, npad, th):
    """How many of bv[0:npad] (npad a multiple of 16) are <= th: 16-lane compares and popcounts."""
    if not (isinstance(bv, types.Array) and bv.dtype == types.int32 and bv.ndim == 1):
        return None
    sig = types.int64(bv, npad, th)

    def codegen(context, builder, signature, args):
        bv_v, npad_v, th_v = args
        a_bv = context.make_array(signature.args[0])(context, builder, bv_v)
        L = _LANES
        i32 = ir.IntType(32)
        vi = ir.VectorType(i32, L)
        intp = npad_v.type
        ths = splat(builder, th_v, vi)
        pop = llvm_fn(builder.module, f"llvm.ctpop.i{L}", ir.IntType(L), [ir.IntType(L)])
        acc = cgutils.alloca_once_value(builder, ir.Constant(ir.IntType(64), 0))
        with cgutils.for_range(builder, builder.udiv(npad_v, ir.Constant(intp, L))) as loop:
            at = builder.mul(loop.index, ir.Constant(intp, L))
            v = builder.load(builder.bitcast(builder.gep(a_bv.data, [at]), vi.as_pointer()), align=4)
            c = builder.call(pop, [builder.bitcast(builder.icmp_signed("<=", v, ths), ir.IntType(L))])
            builder.store(builder.add(builder.load(acc), builder.zext(c, ir.IntType(64))), acc)
        return builder.load(acc)

    return sig, codegen


def _lane_setup(context, builder, signature, g_v, i_v, cn_v, xi_v, f_v=None):
    """Shared IR of the lane intrinsics: a function computing 16 clamped distance bit patterns at a column offset
    (xi + cn[j] - 2 (g[i, j] f), f = 1 when not given; negative and NaN patterns mapped to 0, as top2_from_ip
    does), with the int32 vector type, the lane count and the index type."""
    a_g = context.make_array(signature.args[0])(context, builder, g_v)
    a_cn = context.make_array(signature.args[2])(context, builder, cn_v)
    L = _LANES
    vf = ir.VectorType(ir.FloatType(), L)
    vi = ir.VectorType(ir.IntType(32), L)
    intp = i_v.type
    stride0 = cgutils.unpack_tuple(builder, a_g.strides, 2)[0]
    i8p = ir.IntType(8).as_pointer()
    row = builder.bitcast(builder.gep(builder.bitcast(a_g.data, i8p), [builder.mul(i_v, stride0)]),
                          ir.FloatType().as_pointer())
    xs = splat(builder, xi_v, vf)
    two = ir.Constant(vf, [2.0] * L)
    zero = ir.Constant(vi, [0] * L)
    big = ir.Constant(vi, [0x7F800000] * L)

    fs = None if f_v is None else splat(builder, f_v, vf)

    def dist(off):
        gv = builder.load(builder.bitcast(builder.gep(row, [off]), vf.as_pointer()), align=4)
        if fs is not None:
            gv = builder.fmul(gv, fs)
        cv = builder.load(builder.bitcast(builder.gep(a_cn.data, [off]), vf.as_pointer()), align=4)
        b = builder.bitcast(builder.fsub(builder.fadd(xs, cv), builder.fmul(two, gv)), vi)
        b = builder.select(builder.icmp_signed(">", b, zero), b, zero)
        return builder.select(builder.icmp_signed(">", b, big), zero, b)

    return dist, vi, L, intp


CANDIDATE_IDS_MAX = _LANES  # candidate_ids_from_ip: at most 16 ids, the smallest among each lane's two nearest


@numba.njit(**_JIT)
def candidate_ids_from_ip(g, c_sqnorms, x_sqnorms, out):
    """For each row, ``m = out.shape[1]`` (1 <= m <= min(K, 16)) centroid ids close to it: the m smallest, by
    (distance, id), among the two nearest of each of 16 column classes (column j in class j mod 16; the last
    K mod 16 columns join classes 0.. in order). Distances as :func:`top2_from_ip` (so the row's argmin, ties to
    the smaller id, is always first among them). A cheap stand-in for :func:`nearest_ids_from_ip` (one pass over
    the row instead of a selection): the set equals the m nearest unless three of those share a class, and then
    it lacks only ids ranked below the class's second. The ids come in ascending (distance, id) order. With
    K < 16, or columns or norms not unit-stride, the call returns the exact m nearest instead."""
    K = g.shape[1]
    _candidate_ids_into(g, c_sqnorms, x_sqnorms, out, *_ids_scratch(K))


@numba.njit(inline="always", **_JIT)
def _ids_scratch(K):
    """The scratch of :func:`_candidate_ids_into` / :func:`_nearest_ids_into` for K columns."""
    return (np.empty(2 * _LANES, np.int32), np.empty(2 * _LANES, np.int32), np.empty(_LANES, np.int32),
            np.empty(K + 2 * _LANES, np.int32), np.empty(K + 2 * _LANES, np.int32), np.empty(K + 1, np.int32))


# The *_into kernels allocate nothing (their scratch comes from the caller), so loops compiled without Numba's
# reference counting (_nrt=False, e.g. kernels.amx_assign._assign_rows_loop) can call them: a function called from
# such a loop is compiled under the same flags, and an allocation in it fails to compile.
@numba.njit(**_JIT)
def _candidate_ids_into(g, c_sqnorms, x_sqnorms, out, lv, lj, sel, bv, bj, nsel):
    # candidate_ids_from_ip with its scratch (_ids_scratch) passed in
    b, K = g.shape
    m = out.shape[1]
    if m < 1 or m > min(K, CANDIDATE_IDS_MAX):
        raise ValueError("candidate_ids_from_ip needs 1 <= out.shape[1] <= min(K, 16)")
    kv = K - K % _LANES if g.strides[1] == 4 and c_sqnorms.strides[0] == 4 else 0
    if kv == 0:
        _nearest_ids_into(g, c_sqnorms, x_sqnorms, out, bv, bj, nsel)
        return
    for i in range(b):
        xi = x_sqnorms[i]
        _lane_top2_ids(g, i, c_sqnorms, xi, kv, lv, lj)
        for j in range(kv, K):  # the tail: column j joins class j - kv
            v = _dist_bits(xi, c_sqnorms[j], g[i, j])
            l = j - kv
            if v < lv[l]:
                lv[_LANES + l] = lv[l]
                lj[_LANES + l] = lj[l]
                lv[l] = v
                lj[l] = j
            elif v < lv[_LANES + l]:
                lv[_LANES + l] = v
                lj[_LANES + l] = j
        _smallest16(lv, lj, sel)
        for t in range(m):
            out[i, t] = sel[t]


@numba.njit(**_JIT)
def nearest_ids_from_ip(g, c_sqnorms, x_sqnorms, out):
    """Ids of the ``m = out.shape[1]`` nearest centroids of each row, from g (b, K) = x·cᵀ with the distance of
    :func:`top2_from_ip` (‖x‖² + ‖c‖² − 2x·c in float32, clamped at 0, compared as int32 bit patterns). Ties at
    the m-th distance keep the smaller ids, so the row's argmin (ties to the smaller id) is always among them.
    Needs 1 <= m <= K.

    With m <= 16 and rows of at least 16 unit-stride columns, a vector pass finds a threshold no smaller than
    the row's m-th distance (:func:`_lane_min_max`) and a second keeps only the columns at or below it
    (:func:`_compress_le`, a few dozen of K); the m-th distance among those is then found by bisection on the bit
    pattern (a vectorised count per step: no data-dependent branches, unlike a heap)."""
    K = g.shape[1]
    scratch = _ids_scratch(K)
    _nearest_ids_into(g, c_sqnorms, x_sqnorms, out, scratch[3], scratch[4], scratch[5])


@numba.njit(**_JIT)
def _nearest_ids_into(g, c_sqnorms, x_sqnorms, out, bv, bj, sel):
    # bv, bj: K + 32 entries (room for a compress store's 16 lanes and the padding); sel: K + 1 (slots 0..n written,
    # n <= K kept columns)
    b, K = g.shape
    m = out.shape[1]
    if m < 1 or m > K:
        raise ValueError("nearest_ids_from_ip needs 1 <= out.shape[1] <= K")
    vec = m <= _LANES and g.strides[1] == 4 and c_sqnorms.strides[0] == 4
    kv = K - K % _LANES if vec else 0
    for i in range(b):
        xi = x_sqnorms[i]
        th = _lane_min_max(g, i, c_sqnorms, xi, kv) if kv else np.int32(0x7F800001)
        n = 0
        for off in range(0, kv, _LANES):
            n = _compress_le(g, i, c_sqnorms, xi, off, th, bv, bj, n)
        for j in range(kv, K):
            bv[n] = _dist_bits(xi, c_sqnorms[j], g[i, j])
            bj[n] = j
            n += 1
        # kth = the smallest value with at least m of the kept distances at or below it: bisection between the
        # smallest and largest kept values, counting over a 16-padded buffer so the count vectorises fully
        npad = (n + _LANES - 1) // _LANES * _LANES
        lo = np.int32(0x7F800001)
        hi = np.int32(-1)
        for t in range(n):
            lo = min(lo, bv[t])
            hi = max(hi, bv[t])
        for t in range(n, npad):
            bv[t] = np.int32(0x7FFFFFFF)
        lo -= np.int32(1)
        while hi - lo > 1:
            mid = np.int32(lo + (hi - lo) // 2)
            take = _count_le(bv, npad, mid) >= m
            hi = mid if take else hi  # (selects, not branches: the outcome is a coin flip)
            lo = lo if take else mid
        # Branch-free (whether a kept column is taken is a coin flip): every kept id is written at the next slot of
        # sel, which advances only when the id is taken. First those below the m-th distance (fewer than m), then
        # those at it, the smallest ids first (kept in column order); the first m slots are the answer.
        w = 0
        for t in range(n):
            sel[w] = bj[t]
            w += bv[t] < hi
        for t in range(n):
            sel[w] = bj[t]
            w += bv[t] == hi
        for t in range(m):
            out[i, t] = sel[t]


def label_margins(dim: int, lane_norms: bool = False) -> tuple[float, float]:
    """(κ, tiny) of :func:`certify_top2`.

    κ bounds |d̃ − d| / (‖x‖ + ‖c‖)² for the float32 expanded distance d̃ = ‖x‖² + ‖c‖² − 2x·c (u = 2⁻²⁴):
    the product in float32 in any order, fused or not, errs by at most γ_D Σ|x_t c_t| <= γ_D‖x‖‖c‖ (γ_D =
    D·u/(1 − D·u)); the two norms (float64 sums rounded to float32), their sum and the difference add one rounding
    each, 4u in all. Unit rows (products scaled by a float32 1/‖x‖, whose own error is <= 1.5u; the scaled product
    rounded once more; ‖x/‖x‖‖² rounded from float64) add at most 4.5u, l2 rows moved and scaled for conditioning
    (each coordinate rounded twice) at most 4u: γ_D + 8.5u in the worst case, and κ = 1.05·(D + 16)·u covers it with
    room for the second-order terms. tiny = 4(D + 16)·2⁻¹²⁶ covers products that underflow float32 (each off by less
    than 2⁻¹²⁶, flushed to zero or not).

    ``lane_norms``: the row norms were summed in float32 instead (:func:`kvant.kernels.direct_assign.lane_norm_column`:
    16 lanes of ceil(D/16) multiply-adds, then a 4-level tree), relative error within γ(ceil(D/16) + 4) of ‖x‖² <=
    (‖x‖ + ‖c‖)²: κ grows by that many u."""
    terms = dim + 16 + ((-(-dim // 16) + 4) if lane_norms else 0)
    return 1.05 * terms * 2.0**-24, 4.0 * (dim + 16) * 2.0**-126


@numba.njit(**_JIT)
def _margin_test(labels, d1, d2, cn, kappa, tiny, uncertain):
    """uncertain[i] = 0 where :func:`certify_top2`'s test proves row i's label, 1 where it does not. The labels'
    centre norms are gathered first, so that the test itself vectorises (a gather in the loop kept it scalar): the
    final assignment of 1M×128 rows at K = 10 took 41.4 against 44.5 ms with the scalar test (Zen 4, 2026-12-05)."""
    n = labels.shape[0]
    cb2 = np.empty(n, np.float64)
    for i in range(n):
        cb2[i] = cn[labels[i]]
    grow = 4.5 * kappa
    for i in range(n):
        a = np.float64(d1[i])
        a = a if a > 0.0 else 0.0
        r2 = (a + grow * cb2[i] + tiny) / (1.0 - 9.0 * kappa)
        s = np.sqrt(r2) + np.sqrt(cb2[i])
        big_x = s * s
        lower = (np.float64(d2[i]) - grow * big_x - tiny) / (1.0 + 9.0 * kappa)
        upper = (a + grow * big_x + tiny) / (1.0 - 9.0 * kappa)
        uncertain[i] = np.uint8(0) if lower > upper else np.uint8(1)


@numba.njit(**_JIT)
def certify_top2(x, centroids, labels, d1, d2, exact_sq, unit_rows, cn, kappa, tiny):
    """Make float32 top-2 labels exact: keep row i's label where its two smallest float32 distances ``d1``, ``d2``
    (:func:`top2_from_ip`'s outputs, possibly of conditioned rows and centres: then the squared centre norms ``cn``
    are theirs) are farther apart than both could be off, else re-derive it from float64 distances to every centre
    (ties to the smaller id).

    Each distance d̃_j is within κ(‖x‖ + ‖c_j‖)² + ``tiny`` of the exact d_j (:func:`label_margins`). With b the label
    and c_b its centre's norm, ‖x‖ <= √d_b + c_b, so (‖x‖ + c_b)² <= (√d_b + 2c_b)² <= 9d_b + 4.5c_b² ((a + b)² <=
    (1 + 1/t)a² + (1 + t)b², t = 1/8) and d_b <= R² = (d̃₁ + 4.5κc_b² + tiny)/(1 − 9κ), which bounds X = ‖x‖² <=
    (R + c_b)². For any other centre ‖c_j‖ <= ‖x‖ + √d_j, so (‖x‖ + ‖c_j‖)² <= 4.5X + 9d_j and d_j >= (d̃_j − 4.5κX −
    tiny)/(1 + 9κ) >= (d̃₂ − 4.5κX − tiny)/(1 + 9κ); likewise d_b <= (d̃₁ + 4.5κX + tiny)/(1 − 9κ). When the first
    exceeds the second the label is the nearest centre. The test reads only the two
    distances and the label's centre norm: no pass over the rows, and far-out centres (heavy tails) do not widen the
    margin of rows near ordinary ones.

    ``x``: the raw float32 rows (unit rows are scaled by 1/‖x‖ here, as the assignment did, when ``unit_rows``),
    ``centroids`` raw. Rows that fail get their label and, when ``exact_sq`` is not empty, its float64 squared
    distance rewritten. Returns how many rows failed."""
    n = labels.shape[0]
    k = centroids.shape[0]
    want_exact = exact_sq.shape[0] > 0
    uncertain = np.ones(n, np.uint8)
    if kappa < 0.01:  # (else the margins are meaningless: every row is recomputed)
        _margin_test(labels, d1, d2, cn, kappa, tiny, uncertain)
    failed = 0
    for i in range(n):
        if not uncertain[i]:
            continue
        failed += 1
        f = 1.0
        if unit_rows:
            f = 1.0 / np.sqrt(_row_sqnorm(x, i))  # (the float64 norm, as every path scales unit rows)
        best = np.inf
        lab = 0
        for j in range(k):
            e = row_scaled_sq_dist64(x, i, f, centroids, j) if unit_rows else row_sq_dist64(x, i, centroids, j)
            if e < best:
                best, lab = e, j
        labels[i] = lab
        if want_exact:
            exact_sq[i] = best
    return failed
