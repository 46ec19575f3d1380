"""Certified nearest-centre assignment from int16 products, for AVX2 hosts without AMX (and AVX-512 hosts whose
512-bit FMAs run at half rate, ``kvant.kernels._llvm.HALF_RATE_AVX512``).

AVX2's ``vpmaddwd`` multiplies 16 pairs of int16 and adds adjacent products into 8 int32 lanes: twice the
multiply-adds of a float32 FMA per instruction. On this project's AMD EPYC Zen 3 host a 4-row × 16-centre
register block ran 61-65 G multiply-adds per second on one thread against 27-35 G for OpenBLAS sgemm on the same
shapes. The products are exact integers; rounding the operands to 16 bits is the only approximation, and it is
certified the way :mod:`kvant.kernels.amx_assign` certifies its bf16 tiles — the same margins, quick test and exact
fallback (:func:`kvant.kernels.amx_assign.settle_strip`) — so labels are the exact nearest centres and each row's
float64 squared distance to its centre comes out of the same pass. Only the operands differ:

- rows and centres are centred on the centres' median μ (v = x − μ, w = c − μ), and each is scaled by its own
  float32 step ρ: q = rint(v/ρ) with |q_t| <= 32767 and ‖q‖ <= ``QNORM``. So every int32 partial sum of q_x·q_c
  stays below 2³¹ (Cauchy-Schwarz: |Σ_S q_x q_c| <= ‖q_x‖‖q_c‖ <= QNORM² for any subset S of coordinates) and
  nothing overflows, at any dimension;
- ṽ = ρ_x q_x and w̃ = ρ_c q_c; the residuals e = ṽ − v and f = w̃ − w are exact in float64 and measured;
- g = (float32(q_x·q_c)·ρ_c)·ρ_x: three float32 roundings of a product whose size is at most ‖ṽ‖‖w̃‖, covered by
  γ = :data:`GAMMA` in the margin's accumulation term.

The step keeps ‖q‖ within a factor 1.0 of QNORM ≈ 2^15.5, so ‖e‖/‖v‖ <= 0.5·sqrt(D)/(QNORM − sqrt(D)) — about
1.2·10⁻⁴ at D = 128, where bf16's is up to 3.9·10⁻³: far fewer rows reach the exact fallback than on the tiles.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._llvm import host_features, llvm_fn, splat, sum_lanes
from .amx_assign import settle_scratch, settle_strip, strip_row

_JIT = dict(cache=True, nogil=True, fastmath=False)
_JIT_RAW = dict(_JIT, _nrt=False)  # no reference counting: for loops that allocate nothing

_STRIP = 32  # rows per strip
_ROWS = 4  # rows per register block
_COLS = 16  # centres per register block (two 8-lane int32 accumulators per row)
QNORM = 32767.0  # largest ‖q‖, so every |q_t| fits int16 and every int32 partial sum is within QNORM² < 2³⁰
# |q_t − v_t/ρ| <= 0.504 (see step), so ‖ṽ − v‖ <= E_UNIT·ρ·sqrt(D)
E_UNIT = 0.5041
# ρ is rounded up by this factor, so the float32 step never falls below the bound it was computed from
_STEP_UP = 1.0 + 2.0**-20
_MIN_STEP = 2.0**-126  # float32's smallest normal: 1/ρ stays finite (rows of (near) zero: q = 0, e = −v)
# g's three float32 roundings (int32 → float32, × ρ_c, × ρ_x) err by at most 3.01·2⁻²⁴ of |ṽ·w̃| <= ‖ṽ‖‖w̃‖
GAMMA = 2.0**-22

AVAILABLE = {"avx2", "fma"} <= host_features()


def padded_k(k: int) -> int:
    """K rounded up to whole register blocks of centres."""
    return -(-k // _COLS) * _COLS


def _pairs(dim: int) -> int:
    return (dim + 1) // 2


def step(norm: float, dim: int) -> np.float32:
    """The float32 step ρ of a vector with ‖v‖ = norm (float64): the smallest (up to a factor 1 + 2⁻¹⁹) for which
    q = rint(v·float32(1/ρ)) keeps ‖q‖ <= QNORM, hence also every |q_t| <= QNORM. v·(1/ρ) in float32 errs by at most
    32767·2⁻²³ < 0.004, so |q_t − v_t/ρ| <= 0.504 and ‖q‖ <= ‖v‖/ρ + 0.504·sqrt(D)."""
    rho = max(norm / (QNORM - 0.51 * np.sqrt(dim)), _MIN_STEP) * _STEP_UP  # the division's rounding
    return np.float32(rho * _STEP_UP)  # and float32's


_step = numba.njit(inline="always", **_JIT)(step)


def pack_centres(centroids: np.ndarray):
    """The centre operands of :func:`assign_rows`: (μ, ct, colstep, cn, cstat). μ is the centres' coordinate-wise
    median (as on the AMX tiles); ct (KP/16, 32·P) int16 holds q_c = rint((c − μ)/ρ_c) in vpmaddwd's pair layout,
    block by block of 16 centres: ct[b, 32t + 2j + h] = q_c[16b + j, 2t + h] (P = ceil(D/2) coordinate pairs, KP =
    16·ceil(K/16) centres, zero padding). Each block is contiguous: with one row of pairs per coordinate pair across
    all centres instead, a block's 64-byte pieces sat KP·4 bytes apart, and at K = 1024 (4 KiB apart) they all
    fell in the same L1 sets: the products ran at half speed (34 against 68 G multiply-adds per second).
    colstep (KP,) float32 the steps ρ_c (0 for the padding); cn (KP,) float32 ‖w‖² (+inf for the padding); cstat
    (3, K) float64: ‖w_j‖, ‖f_j‖ with f_j = ρ_c q_c − w_j the rounding residual, and ‖w̃_j‖ = ρ_c‖q_c‖."""
    centroids = np.ascontiguousarray(centroids, np.float32)
    k, dim = centroids.shape
    mu = np.median(centroids.astype(np.float64), axis=0).astype(np.float32)
    w = (centroids - mu).astype(np.float32)
    w64 = w.astype(np.float64)
    sq = (w64**2).sum(axis=1)
    kp, p = padded_k(k), _pairs(dim)
    # step() for every centre at once (the same float64 operations, so the same float32 steps)
    rho = (np.maximum(np.sqrt(sq) * (1.0 + 2.0**-40) / (QNORM - 0.51 * np.sqrt(dim)), _MIN_STEP) * _STEP_UP
           * _STEP_UP).astype(np.float32)
    qc = np.rint(w * (np.float32(1.0) / rho)[:, None]).astype(np.int64)
    qsq = (qc * qc).sum(axis=1)
    if qsq.size and float(qsq.max()) > QNORM * QNORM:  # pragma: no cover - step() guarantees it
        raise AssertionError("int16 centre step out of bounds")
    q = np.zeros((kp, 2 * p), np.int16)
    q[:k, :dim] = qc
    colstep = np.zeros(kp, np.float32)
    colstep[:k] = rho
    rho64 = rho.astype(np.float64)
    cstat = np.empty((3, k), np.float64)
    # ρ·q is exact in float64 (16 × 24 bits); the sums round by less than D·2⁻⁵³ of themselves
    cstat[1] = np.sqrt((((qc * rho64[:, None]) - w64) ** 2).sum(axis=1)) * (1.0 + 2.0**-40)
    cstat[2] = rho64 * np.sqrt(qsq.astype(np.float64)) * (1.0 + 2.0**-40)
    cstat[0] = np.sqrt(sq)
    blocks = q.reshape(kp // _COLS, _COLS, p, 2).transpose(0, 2, 1, 3)
    ct = np.ascontiguousarray(blocks).reshape(kp // _COLS, 2 * _COLS * p)
    cn = np.full(kp, np.inf, np.float32)
    cn[:k] = sq
    return mu, ct, colstep, cn, cstat


def _row_pointer(context, builder, sig_arg, value, index, elem):
    """elem* to row ``index`` of the 2-D array ``value`` (of Numba type ``sig_arg``)."""
    a = context.make_array(sig_arg)(context, builder, value)
    stride = cgutils.unpack_tuple(builder, a.strides, 2)[0]
    i8p = ir.IntType(8).as_pointer()
    return builder.bitcast(builder.gep(builder.bitcast(a.data, i8p), [builder.mul(index, stride)]), elem.as_pointer())


@intrinsic
def _i16_block(typingctx, a16, i0, ct, j0, colstep, rowstep, g):
    """g[i0 + r, j0 : j0 + 16] = (float32(q_x[i0 + r] · q_c[j0 : j0 + 16])·ρ_c)·ρ_x[i0 + r] for r < 4: a16 (rows, 2P)
    int16 rows, ct (KP/16, 32·P) int16 centres in blocked pair layout (:func:`pack_centres`), colstep (KP,) and
    rowstep (rows,) float32, g (rows, KP) float32. Per coordinate pair: two 16-lane int16 loads of ct, four 32-bit
    broadcasts of a row's pair, eight vpmaddwd into 8-lane int32 accumulators (exact, see the module docstring)."""
    ok = (isinstance(a16, types.Array) and a16.dtype == types.int16 and a16.ndim == 2
          and isinstance(ct, types.Array) and ct.dtype == types.int16 and ct.ndim == 2
          and all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (colstep, rowstep, g)))
    if not ok:
        return None
    sig = types.void(a16, i0, ct, j0, colstep, rowstep, g)

    def codegen(context, builder, signature, args):
        a_v, i0_v, ct_v, j0_v, cs_v, rs_v, g_v = args
        intp = context.get_value_type(types.intp)
        i0_v = context.cast(builder, i0_v, signature.args[1], types.intp)
        j0_v = context.cast(builder, j0_v, signature.args[3], types.intp)
        i32, i16, f32 = ir.IntType(32), ir.IntType(16), ir.FloatType()
        v8, v16, vf = ir.VectorType(i32, 8), ir.VectorType(i16, 16), ir.VectorType(f32, 8)
        n_pairs = builder.udiv(cgutils.unpack_tuple(
            builder, context.make_array(signature.args[2])(context, builder, ct_v).shape, 2)[1], ir.Constant(intp, 32))
        block = _row_pointer(context, builder, signature.args[2], ct_v, builder.udiv(j0_v, ir.Constant(intp, _COLS)),
                             i16)
        xrows = [_row_pointer(context, builder, signature.args[0], a_v, builder.add(i0_v, ir.Constant(intp, r)), i32)
                 for r in range(_ROWS)]
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(v8, [0] * 8)) for _ in range(2)] for _ in range(_ROWS)]
        pmadd = llvm_fn(builder.module, "llvm.x86.avx2.pmadd.wd", v8, [v16, v16])
        with cgutils.for_range(builder, n_pairs) as loop:
            t = loop.index
            crow = builder.gep(block, [builder.mul(t, ir.Constant(intp, 2 * _COLS))])
            cv = [builder.load(builder.bitcast(builder.gep(crow, [ir.Constant(intp, 16 * v)]), v16.as_pointer()),
                               align=2) for v in range(2)]
            for r in range(_ROWS):
                xv = builder.bitcast(splat(builder, builder.load(builder.gep(xrows[r], [t]), align=2), v8), v16)
                for v in range(2):
                    builder.store(builder.add(builder.load(acc[r][v]), builder.call(pmadd, [xv, cv[v]])), acc[r][v])
        cs = context.make_array(signature.args[4])(context, builder, cs_v).data
        rs = context.make_array(signature.args[5])(context, builder, rs_v).data
        csv = [builder.load(builder.bitcast(builder.gep(cs, [builder.add(j0_v, ir.Constant(intp, 8 * v))]),
                                            vf.as_pointer()), align=4) for v in range(2)]
        for r in range(_ROWS):
            ri = builder.add(i0_v, ir.Constant(intp, r))
            rho = splat(builder, builder.load(builder.gep(rs, [ri])), vf)
            grow = builder.gep(_row_pointer(context, builder, signature.args[6], g_v, ri, f32), [j0_v])
            for v in range(2):
                val = builder.fmul(builder.fmul(builder.sitofp(builder.load(acc[r][v]), vf), csv[v]), rho)
                builder.store(val, builder.bitcast(builder.gep(grow, [ir.Constant(intp, 8 * v)]), vf.as_pointer()),
                              align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _scan16(typingctx, x, i, f, mu, vbuf, n16):
    """Row i of x over its first ``n16`` coordinates (a multiple of 16) as v = x·f − μ in float32 (the AMX path's
    operations), stored to vbuf; returns Σ v² in float64. Explicit 16-lane vectors (LLVM keeps such reductions scalar
    without reassociation)."""
    ok = (isinstance(x, types.Array) and x.dtype == types.float32 and x.ndim == 2 and f == types.float32
          and isinstance(mu, types.Array) and mu.dtype == types.float32 and isinstance(vbuf, types.Array)
          and vbuf.dtype == types.float32)
    if not ok:
        return None
    sig = types.float64(x, i, f, mu, vbuf, n16)

    def codegen(context, builder, signature, args):
        x_v, i_v, f_v, mu_v, vb_v, n16_v = args
        f32, f64 = ir.FloatType(), ir.DoubleType()
        vf, vd = ir.VectorType(f32, 16), ir.VectorType(f64, 16)
        intp = context.get_value_type(types.intp)
        xrow = _row_pointer(context, builder, signature.args[0], x_v,
                            context.cast(builder, i_v, signature.args[1], types.intp), f32)
        mup = context.make_array(signature.args[3])(context, builder, mu_v).data
        vbp = context.make_array(signature.args[4])(context, builder, vb_v).data
        n16 = context.cast(builder, n16_v, signature.args[5], types.intp)
        fv = splat(builder, f_v, vf)
        acc = cgutils.alloca_once_value(builder, ir.Constant(vd, [0.0] * 16))
        fma = llvm_fn(builder.module, "llvm.fma.v16f64", vd, [vd, vd, vd])

        def at(ptr, off):
            return builder.bitcast(builder.gep(ptr, [off]), vf.as_pointer())

        with cgutils.for_range(builder, builder.udiv(n16, ir.Constant(intp, 16))) as loop:
            off = builder.mul(loop.index, ir.Constant(intp, 16))
            xv = builder.load(at(xrow, off), align=4)
            v = builder.fsub(builder.fmul(xv, fv), builder.load(at(mup, off), align=4))
            builder.store(v, at(vbp, off), align=4)
            vv = builder.fpext(v, vd)
            builder.store(builder.call(fma, [vv, vv, builder.load(acc)]), acc)
        return sum_lanes(builder, builder.load(acc))

    return sig, codegen


@intrinsic
def _quantise16(typingctx, vbuf, inv, a16, r, n16):
    """q = rint(v·inv) for the first ``n16`` entries of vbuf (a multiple of 16), stored as int16 to a16[r]."""
    ok = (isinstance(vbuf, types.Array) and vbuf.dtype == types.float32 and inv == types.float32
          and isinstance(a16, types.Array) and a16.dtype == types.int16 and a16.ndim == 2)
    if not ok:
        return None
    sig = types.void(vbuf, inv, a16, r, n16)

    def codegen(context, builder, signature, args):
        vb_v, inv_v, a_v, r_v, n16_v = args
        f32, i32, i16 = ir.FloatType(), ir.IntType(32), ir.IntType(16)
        vf, vi, vh = (ir.VectorType(t, 16) for t in (f32, i32, i16))
        intp = context.get_value_type(types.intp)
        vbp = context.make_array(signature.args[0])(context, builder, vb_v).data
        arow = _row_pointer(context, builder, signature.args[2], a_v,
                            context.cast(builder, r_v, signature.args[3], types.intp), i16)
        n16 = context.cast(builder, n16_v, signature.args[4], types.intp)
        invv = splat(builder, inv_v, vf)
        rint = llvm_fn(builder.module, "llvm.rint.v16f32", vf, [vf])
        with cgutils.for_range(builder, builder.udiv(n16, ir.Constant(intp, 16))) as loop:
            off = builder.mul(loop.index, ir.Constant(intp, 16))
            v = builder.load(builder.bitcast(builder.gep(vbp, [off]), vf.as_pointer()), align=4)
            q = builder.fptosi(builder.call(rint, [builder.fmul(v, invv)]), vi)
            builder.store(builder.trunc(q, vh), builder.bitcast(builder.gep(arow, [off]), vh.as_pointer()), align=2)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always", **_JIT_RAW)
def _convert_row(x, i, f, mu, vbuf, a16, r):
    """Row i as q = rint(v/ρ) into a16[r] (v = x·f − μ): returns (‖v‖² in float64, ρ). Coordinates past the last
    multiple of 16 go one by one, with the same operations. ‖ṽ − v‖ <= E_UNIT·ρ·sqrt(D) (not measured: measuring it
    cost more per row than the wider margin costs in rows sent to the exact fallback)."""
    dim = x.shape[1]
    n16 = dim - dim % 16 if x.strides[1] == 4 else 0
    sq = _scan16(x, i, f, mu, vbuf, n16) if n16 else 0.0
    for t in range(n16, dim):
        v = x[i, t] * f - mu[t]
        vbuf[t] = v
        sq += np.float64(v) * np.float64(v)
    # the float64 sum of D exact squares errs by less than D·2⁻⁵³ of it
    rho = _step(np.sqrt(sq * (1.0 + dim * 2.0**-52)), dim)
    inv = np.float32(1.0) / rho
    if n16:
        _quantise16(vbuf, inv, a16, r, n16)
    for t in range(n16, dim):
        a16[r, t] = np.int16(np.rint(vbuf[t] * inv))
    return sq, rho


@numba.njit(**_JIT_RAW)
def _strip_products(a16, ct, colstep, rowstep, g):
    """g (32, KP) = the strip's approximate products with every centre (:func:`_i16_block`), centre blocks outside
    so each block of ct (64·P bytes, contiguous) stays in L1 across the strip's eight row blocks."""
    for j0 in range(0, g.shape[1], _COLS):
        for i0 in range(0, _STRIP, _ROWS):
            _i16_block(a16, i0, ct, j0, colstep, rowstep, g)


@numba.njit(**_JIT)
def assign_rows(x, rows, centroids, mu, ct, colstep, cn, cstat, inner_lower, unit_rows, labels, exact_sq, lower2,
                nearest):
    """:func:`kvant.kernels.amx_assign.assign_rows` with int16 products: the same arguments and outputs, with
    ``mu, ct, colstep, cn, cstat`` from :func:`pack_centres` in place of the tile operands. Returns how many rows
    needed exact distances to more than one centre."""
    kp = cn.shape[0]
    dim = x.shape[1]
    a16 = np.zeros((_STRIP, 2 * ((dim + 1) // 2)), np.int16)
    return _assign_rows_loop(x, rows, centroids, mu, ct, colstep, cn, cstat, inner_lower, unit_rows, labels, exact_sq,
                             lower2, nearest, a16, np.empty(dim, np.float32), np.empty((_STRIP, kp), np.float32),
                             np.empty(_STRIP, np.float32), np.empty(_STRIP, np.float64), np.ones(_STRIP, np.float64),
                             np.zeros(_STRIP, np.float32), settle_scratch(cstat))


@numba.njit(**_JIT_RAW)
def _assign_rows_loop(x, rows, centroids, mu, ct, colstep, cn, cstat, inner_lower, unit_rows, labels, exact_sq, lower2,
                      nearest, a16, vbuf, g, xn, en, scale, rowstep, tables):
    listed = rows.shape[0] > 0
    n = rows.shape[0] if listed else x.shape[0]
    e_unit = E_UNIT * np.sqrt(np.float64(x.shape[1])) * (1.0 + 2.0**-40)
    fallback = 0
    for s in range(0, n, _STRIP):
        nr = min(_STRIP, n - s)
        for r in range(nr):
            i, f = strip_row(x, rows, s + r, unit_rows, scale, r)
            sq, rho = _convert_row(x, i, f, mu, vbuf, a16, r)
            xn[r] = np.float32(sq)
            en[r] = e_unit * np.float64(rho)
            rowstep[r] = rho
        for r in range(nr, _STRIP):  # the tail strip: zero rows, their products ignored
            rowstep[r] = 0.0
            a16[r, :] = 0
        _strip_products(a16, ct, colstep, rowstep, g)
        fallback += settle_strip(x, rows, s, nr, centroids, cn, cstat, GAMMA, inner_lower, unit_rows, labels, exact_sq,
                                 lower2, nearest, g, xn, en, scale, tables)
    return fallback


__all__ = ["AVAILABLE", "E_UNIT", "GAMMA", "QNORM", "assign_rows", "pack_centres", "padded_k", "step"]
