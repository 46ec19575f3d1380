"""Fused assignment: for each row, the nearest centroid and the two smallest squared distances.

``top2_from_ip`` finishes a BLAS inner-product block. A hand-written direct kernel (Σ(x−c)² term by term)
was measured against it on D·K from 16 to 3,000 and lost everywhere, by 1× to 10× (docs/auto.md), so
BLAS is used for every shape. The top-2 distances feed Hamerly bounds in
:mod:`kvant.cluster.lloyd`: the second distance is the lower bound to every other centroid.
Ties go to the smaller centroid id. The kernel is serial and ``nogil``: callers run them on row blocks
from several threads (see :mod:`kvant._parallel`).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

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


def _llvm_fn(module, name, ret, args):
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(ret, args), name=name)


@intrinsic
def _top2_lanes(typingctx, g, i, cn, xi, f, kv):
    """Top-2 of row ``i`` of ``g`` over its first ``kv`` columns (a multiple of 16), one pass, 16 lanes.

    Distance j is ``bits(max(xi + cn[j] − 2·(g[i, j]·f), 0))`` with NaN mapped to 0, as
    :func:`top2_from_ip` defines it (same float32 operations in the same order, no contraction). Each lane
    keeps its smallest value, its first index and its second smallest (``m2 = min(m2, max(m1, v))`` counts a
    repeated minimum); the lanes are then reduced. Returns (best, runner-up, first index of best) as int32."""
    i32 = types.int32
    sig = types.UniTuple(i32, 3)(g, i, cn, xi, f, kv)

    def codegen(context, builder, signature, args):
        g_v, i_v, cn_v, xi_v, f_v, kv_v = args
        a_g = context.make_array(signature.args[0])(context, builder, g_v)
        a_cn = context.make_array(signature.args[2])(context, builder, cn_v)
        L = _LANES
        vf = ir.VectorType(ir.FloatType(), L)
        it = ir.IntType(32)
        vi = ir.VectorType(it, L)
        intp = i_v.type
        mod = builder.module

        def splat(val, vt):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(vt, ir.Undefined), val,
                                                                 ir.Constant(it, 0)),
                                          ir.Constant(vt, ir.Undefined), ir.Constant(vi, [0] * L))

        def smin(a, b):
            return builder.select(builder.icmp_signed("<", a, b), a, b)

        def smax(a, b):
            return builder.select(builder.icmp_signed(">", a, b), a, b)

        stride0 = cgutils.unpack_tuple(builder, a_g.strides, 2)[0]
        i8p = ir.IntType(8).as_pointer()
        row = builder.bitcast(builder.gep(builder.bitcast(a_g.data, i8p), [builder.mul(i_v, stride0)]),
                              ir.FloatType().as_pointer())
        big = ir.Constant(vi, [0x7F800000] * L)
        zero = ir.Constant(vi, [0] * L)
        xs = splat(xi_v, vf)
        fs = splat(f_v, vf)
        two = ir.Constant(vf, [2.0] * L)
        above = ir.Constant(vi, [0x7F800001] * L)  # above every value (so the first one is always taken)
        m1p = cgutils.alloca_once_value(builder, above)
        m2p = cgutils.alloca_once_value(builder, above)
        ixp = cgutils.alloca_once_value(builder, ir.Constant(vi, [0x7FFFFFFF] * L))
        jp = cgutils.alloca_once_value(builder, ir.Constant(vi, list(range(L))))
        nblk = builder.udiv(kv_v, ir.Constant(intp, L))
        with cgutils.for_range(builder, nblk) as loop:
            off = builder.mul(loop.index, ir.Constant(intp, L))
            gv = builder.load(builder.bitcast(builder.gep(row, [off]), vf.as_pointer()), align=4)
            cv = builder.load(builder.bitcast(builder.gep(a_cn.data, [off]), vf.as_pointer()), align=4)
            dv = builder.fsub(builder.fadd(xs, cv), builder.fmul(two, builder.fmul(gv, fs)))
            v = smax(builder.bitcast(dv, vi), zero)
            v = builder.select(builder.icmp_signed(">", v, big), zero, v)  # NaN patterns (above +inf's) -> 0
            m1 = builder.load(m1p)
            jv = builder.load(jp)
            builder.store(smin(builder.load(m2p), smax(m1, v)), m2p)
            builder.store(builder.select(builder.icmp_signed("<", v, m1), jv, builder.load(ixp)), ixp)
            builder.store(smin(m1, v), m1p)
            builder.store(builder.add(jv, ir.Constant(vi, [L] * L)), jp)
        m1, m2, ix = builder.load(m1p), builder.load(m2p), builder.load(ixp)
        red = _llvm_fn(mod, f"llvm.vector.reduce.smin.v{L}i32", it, [vi])
        best = builder.call(red, [m1])
        eq = builder.icmp_signed("==", m1, splat(best, vi))
        arg = builder.call(red, [builder.select(eq, ix, ir.Constant(vi, [0x7FFFFFFF] * L))])
        run = builder.call(red, [smin(m2, builder.select(eq, above, m1))])
        ties = builder.call(_llvm_fn(mod, f"llvm.ctpop.i{L}", ir.IntType(L), [ir.IntType(L)]),
                            [builder.bitcast(eq, ir.IntType(L))])
        run = builder.select(builder.icmp_unsigned(">", ties, ir.Constant(ir.IntType(L), 1)), best, run)
        return context.make_tuple(builder, signature.return_type, [best, run, arg])

    return sig, codegen


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
    big = np.int32(0x7F800000)  # +inf's bit pattern
    above = np.int32(0x7F800001)  # above every clamped value: the first column is always taken
    zero = np.int32(0)
    two = np.float32(2.0)
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
            v = max(_f32_bits(xi + c_sqnorms[j] - two * (g[i, j] * f)), zero)
            v = v if v <= big else zero
            if v < best:
                run = best
                best = v
                arg = np.int32(j)
            elif v < run:
                run = v
        labels[i] = arg
        d1[i] = np.int32(best).view(np.float32)
        d2[i] = np.int32(min(run, big)).view(np.float32)  # +inf when K == 1
