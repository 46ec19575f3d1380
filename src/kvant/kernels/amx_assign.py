"""Certified nearest-centre assignment with AMX bf16 tile products: fast approximate distances, exact labels.

Intel AMX multiplies 16×32 bf16 tiles into 16×16 float32 accumulators at 16× the multiply-add rate of AVX-512
float32 FMAs. bf16 keeps only 8 significant bits, so its distances are approximate; every row is therefore
*certified* before its label is taken:

1. rows and centres are centred on the centres' coordinate-wise median μ (distances do not change; the products
   shrink, and a few far centres of heavy-tailed data do not inflate them): v = x − μ, w_j = c_j − μ. Both are
   rounded to bf16, ṽ = v + e and w̃_j = w_j + f_j, where the residuals e (per row, measured while the row is
   converted; ‖e‖ is bounded from float32 sums, :func:`_err_bound`) and f_j (per centre, measured once) are exact
   in float32. The tiles give g_j ≈ ṽ·w̃_j and the
   approximate distance d̃_j = ‖v‖² + ‖w_j‖² − 2g_j;
2. ṽ·w̃_j − v·w_j = e·w_j + ṽ·f_j, and the float32 accumulation of the DP products adds at most γ‖ṽ‖‖w̃_j‖
   (γ = :func:`gamma`), so by Cauchy-Schwarz |d̃_j − d_j| ≤ M_j = 2(‖e‖‖w_j‖ + ‖ṽ‖‖f_j‖ + γ‖ṽ‖‖w̃_j‖) +
   2⁻²⁰(‖v‖ + ‖w_j‖)² (the last term covers float32 rounding of the centring and of d̃'s own three terms, with a wide
   margin; unit rows add the rounding of their 1/‖x‖ scaling, :data:`_UNIT_ROW_EPS`; rows and centres within ~2⁻⁶³
   of μ, where float32 rounds absolutely or flushes to zero, add :data:`_TINY_COORD` and :data:`_TINY_OP`). The
   measured ‖e‖ and ‖f_j‖ are ~0.42u of their worst case u‖v‖, u‖w_j‖ (u = 2⁻⁸, bf16's unit roundoff): on the
   benchmark's clustered data this margin sends 2-3× fewer rows past the quick test than the worst-case one
   (2u + u²)‖v‖ max‖w‖ did;
3. a row whose best two approximate distances differ by more than M_b + max_j M_j has the approximate best b as its
   exact nearest centre. Any other row compares centre by centre: a centre with d̃_j − M_j > d̃_b + M_b is farther
   than b; the rest (usually b alone) are compared by exact float64 distances and the smallest wins (ties to the
   smaller id). In final assignments (no runner-up bound wanted) such a row first drops the *outer* centres, ‖w_j‖ >
   ‖v‖ + sqrt(d̃_b + M_b) with a rounding allowance, which are farther than b by the triangle inequality; when at
   most half the centres are left, the quick test is retried with the max over those and the scan visits only them
   (centres sorted by ‖w‖, prefix maxima of the margin's centre terms). On heavy-tailed data a few dozen centres
   sit far out, up to 127× the median ‖w‖ on the benchmark's 1M×128 K=256 cell: with the max over all centres 0.1%
   of its rows passed the quick test, with the max over the inner ones 50% (NumPy emulation on 50,000 rows).

So labels are the exact nearest centres of the float32 rows and centres — not merely nearest up to the float32
rounding of the expanded distance, as the GEMM paths are — and each row's exact squared distance to its centre
(float64, term by term) comes out of the same pass.

The tiles need the host's AMX (``amx-tile``, ``amx-bf16``) and Linux's permission to use its state
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``); :data:`AVAILABLE` is False anywhere else and callers
keep the float32 kernels.
"""

from __future__ import annotations

import ctypes
import sys

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._llvm import host_features, llvm_fn, sum_lanes
from .assign import _candidate_ids_into, _ids_scratch, _top2_lanes
from .distance import _row_sqnorm, row_scaled_sq_dist64, row_sq_dist64

_JIT = dict(cache=True, nogil=True, fastmath=False)
_JIT_RAW = dict(_JIT, _nrt=False)  # no reference counting: for loops that allocate nothing (see _assign_rows_loop)
_TILE_ROWS = 16  # rows of x per tile; also the centres per accumulator tile
_TILE_K = 32  # bf16 coordinates per tile row (64 bytes)
_STRIP = 2 * _TILE_ROWS  # rows per strip: two row tiles
_KP_STEP = 2 * _TILE_ROWS  # centres per pass: two centre tiles
U_BF16 = 2.0**-8


def _host_has_amx() -> bool:
    return {"amx-tile", "amx-bf16"} <= host_features()


def _request_tile_state() -> bool:
    """Ask Linux for permission to use the AMX tile data state (needed once per process)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    except (OSError, AttributeError):  # pragma: no cover - no libc symbol table
        return False


AVAILABLE = _host_has_amx() and _request_tile_state()

# Palette 1, tiles 0-7 all 16 rows × 64 bytes: 0-3 accumulate float32 products, 4-5 hold rows, 6-7 centres.
TILE_CONFIG = np.zeros(64, np.uint8)
TILE_CONFIG[0] = 1
TILE_CONFIG[16:32].view(np.uint16)[:] = 64
TILE_CONFIG[48:56] = _TILE_ROWS


@intrinsic
def _tiles_begin(typingctx, cfg):
    """Load the tile configuration (``TILE_CONFIG``) on this thread."""
    if not (isinstance(cfg, types.Array) and cfg.dtype == types.uint8):
        return None

    def codegen(context, builder, signature, args):
        p = ir.IntType(8).as_pointer()
        data = builder.bitcast(context.make_array(signature.args[0])(context, builder, args[0]).data, p)
        builder.call(llvm_fn(builder.module, "llvm.x86.ldtilecfg", ir.VoidType(), [p]), [data])
        return context.get_dummy_value()

    return types.void(cfg), codegen


@intrinsic
def _tiles_end(typingctx):
    """Release the tile state of this thread."""

    def codegen(context, builder, signature, args):
        builder.call(llvm_fn(builder.module, "llvm.x86.tilerelease", ir.VoidType(), []), [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _strip_products(typingctx, a16, bt, g):
    """g[r, j] = Σ_t a16[r, t]·c[j, t] for the 32 rows of ``a16`` ((32, DP) bf16 bits, DP a multiple of 32) and every
    centre: ``bt`` (DP/32, KP/16, 16, 32) bf16 bits is cᵀ in AMX's pair layout (:func:`pack_centres`), g (32, KP)
    float32, KP a multiple of 32. 2×2 register blocking: per 32 coordinates, two row tiles and two centre tiles feed
    four accumulators, one tile load per multiply (with one row tile and four centre tiles per pass, the loads —
    which wait for the multiplies still reading their tile — cost more). Needs ``_tiles_begin`` first."""
    ok = (isinstance(a16, types.Array) and a16.dtype == types.uint16 and a16.ndim == 2
          and isinstance(bt, types.Array) and bt.dtype == types.uint16 and bt.ndim == 4
          and isinstance(g, types.Array) and g.dtype == types.float32 and g.ndim == 2)
    if not ok:
        return None

    def codegen(context, builder, signature, args):
        from numba.core import cgutils

        i8, i64 = ir.IntType(8), ir.IntType(64)
        p = ir.IntType(8).as_pointer()
        mod = builder.module
        aa, ab, ag = (context.make_array(signature.args[k])(context, builder, args[k]) for k in range(3))
        a_ptr, b_ptr, g_ptr = (builder.bitcast(a.data, p) for a in (aa, ab, ag))
        a_stride = cgutils.unpack_tuple(builder, aa.strides, 2)[0]
        g_stride = cgutils.unpack_tuple(builder, ag.strides, 2)[0]
        nkc, ng = cgutils.unpack_tuple(builder, ab.shape, 4)[:2]
        load = llvm_fn(mod, "llvm.x86.tileloadd64", ir.VoidType(), [i8, p, i64])
        store = llvm_fn(mod, "llvm.x86.tilestored64", ir.VoidType(), [i8, p, i64])
        zero = llvm_fn(mod, "llvm.x86.tilezero", ir.VoidType(), [i8])
        dot = llvm_fn(mod, "llvm.x86.tdpbf16ps", ir.VoidType(), [i8, i8, i8])
        tile = [ir.Constant(i8, t) for t in range(8)]
        row_bytes = ir.Constant(i64, 64)
        tile_bytes = ir.Constant(i64, _TILE_ROWS * 64)
        second_rows = builder.mul(a_stride, ir.Constant(i64, _TILE_ROWS))  # rows 16-31 of a16 and g
        g_second = builder.mul(g_stride, ir.Constant(i64, _TILE_ROWS))
        with cgutils.for_range(builder, builder.udiv(ng, ir.Constant(ng.type, 2))) as pairs:
            j0 = builder.mul(pairs.index, ir.Constant(ng.type, 2))
            for q in range(4):
                builder.call(zero, [tile[q]])
            with cgutils.for_range(builder, nkc) as chunks:
                kc = chunks.index
                a0 = builder.gep(a_ptr, [builder.mul(kc, row_bytes)])

                def centre_tile(jj):
                    return builder.gep(b_ptr, [builder.mul(builder.add(builder.mul(kc, ng), jj), tile_bytes)])

                builder.call(load, [tile[4], a0, a_stride])
                builder.call(load, [tile[6], centre_tile(j0), row_bytes])
                builder.call(dot, [tile[0], tile[4], tile[6]])
                builder.call(load, [tile[7], centre_tile(builder.add(j0, ir.Constant(ng.type, 1))), row_bytes])
                builder.call(dot, [tile[1], tile[4], tile[7]])
                builder.call(load, [tile[5], builder.gep(a0, [second_rows]), a_stride])
                builder.call(dot, [tile[2], tile[5], tile[6]])
                builder.call(dot, [tile[3], tile[5], tile[7]])
            col = builder.gep(g_ptr, [builder.mul(j0, row_bytes)])
            builder.call(store, [tile[0], col, g_stride])
            builder.call(store, [tile[1], builder.gep(col, [row_bytes]), g_stride])
            builder.call(store, [tile[2], builder.gep(col, [g_second]), g_stride])
            builder.call(store, [tile[3], builder.gep(col, [builder.add(g_second, row_bytes)]), g_stride])
        return context.get_dummy_value()

    return types.void(a16, bt, g), codegen


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 bit patterns, round to nearest even (finite inputs)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def padded_k(k: int) -> int:
    return -(-k // _KP_STEP) * _KP_STEP


def pack_centres(centroids: np.ndarray, mu: np.ndarray | None = None):
    """The centre operands of :func:`assign_rows`: (μ, bt, cn, cstat) with μ the centres' coordinate-wise median
    unless given (float32; a median, so a few far centres do not pull the rows' centred norms up; the flat index's
    inner products pass μ = 0, as they are not shift invariant), bt the centred centres w = c − μ
    as bf16 in AMX's pair layout, zero-padded to DP = 32·ceil(D/32) coordinates and KP = 32·ceil(K/32) centres,
    cn = ‖w‖² (float32, +inf for the padding) and cstat (3, K) float64: ‖w_j‖, ‖f_j‖ with f_j = bf16(w_j) − w_j the
    centre's rounding residual, and ‖bf16(w_j)‖ (the accumulation bound's magnitude)."""
    k, dim = centroids.shape
    if mu is None:
        mu = np.median(centroids.astype(np.float64), axis=0).astype(np.float32)
    cc = (centroids - mu).astype(np.float32)
    kp, dp = padded_k(k), -(-dim // _TILE_K) * _TILE_K
    padded = np.zeros((kp, dp), np.float32)
    padded[:k, :dim] = cc
    bits = _bf16_bits(padded)
    rounded = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)[:k, :dim]
    # bt[kc, jg, p, 2n + h] = c[16·jg + n, 32·kc + 2p + h]
    bt = bits.reshape(kp // 16, 16, dp // 32, 16, 2).transpose(2, 0, 3, 1, 4)
    bt = np.ascontiguousarray(bt).reshape(dp // 32, kp // 16, 16, 32)
    w64 = cc.astype(np.float64)
    sq = (w64**2).sum(axis=1)
    cn = np.full(kp, np.inf, np.float32)
    cn[:k] = sq
    cstat = np.empty((3, k), np.float64)
    cstat[0] = np.sqrt(sq)
    cstat[1] = np.sqrt(((rounded - w64) ** 2).sum(axis=1))  # exact in float64
    cstat[2] = np.sqrt((rounded**2).sum(axis=1))
    return mu, bt, cn, cstat


def gamma(dim: int) -> float:
    """Relative bound on the float32 accumulation of the tile products: the sum of the DP bf16 products (each exact in
    float32; DP = D padded to 32) is within γ·Σ|products| of its exact value, γ = 1.01·(DP + 2)·2⁻²⁴, plus 2⁻²² of
    slack."""
    dp = -(-dim // _TILE_K) * _TILE_K
    return 1.01 * (dp + 2) * 2.0**-24 + 2.0**-22


@numba.njit(inline="always", **_JIT)
def _rne16(b):
    # float32 bits -> bf16 bits, round to nearest even
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@intrinsic
def _convert16(typingctx, x, i, f, mu, a16, r, n16):
    """Row i of x over its first ``n16`` coordinates (a multiple of 16), as v = x·f − μ in float32 (f = 1 for l2,
    1/‖x‖ for cos): v's bf16 bits h go to a16[r, :n16]. Returns (Σ v² in float64, Σ (h − v)² summed in float32
    lanes): h − v is exact in float32; its squares are only bounded (:func:`_err_bound`), so float32 lanes do —
    with float64 ones the conversion cost 66 instead of 46 ns per 128-d row. Explicit 16-lane vectors: LLVM's own
    vectoriser left these loops mostly scalar."""
    ok = (isinstance(x, types.Array) and x.dtype == types.float32 and x.ndim == 2 and f == types.float32
          and isinstance(mu, types.Array) and mu.dtype == types.float32 and mu.ndim == 1
          and isinstance(a16, types.Array) and a16.dtype == types.uint16 and a16.ndim == 2)
    if not ok:
        return None
    sig = types.UniTuple(types.float64, 2)(x, i, f, mu, a16, r, n16)

    def codegen(context, builder, signature, args):
        from numba.core import cgutils

        x_v, i_v, f_v, mu_v, a_v, r_v, n16_v = args
        f32, f64, i32, i16 = ir.FloatType(), ir.DoubleType(), ir.IntType(32), ir.IntType(16)
        L = 16
        vf, vd, vi, vh = ir.VectorType(f32, L), ir.VectorType(f64, L), ir.VectorType(i32, L), ir.VectorType(i16, L)
        intp = context.get_value_type(types.intp)
        i8p = ir.IntType(8).as_pointer()

        def cast(v, k):
            return context.cast(builder, v, signature.args[k], types.intp)

        def row(arr_k, arr_v, idx):
            a = context.make_array(signature.args[arr_k])(context, builder, arr_v)
            stride = cgutils.unpack_tuple(builder, a.strides, 2)[0]
            return builder.gep(builder.bitcast(a.data, i8p), [builder.mul(idx, stride)])

        xrow = builder.bitcast(row(0, x_v, cast(i_v, 1)), f32.as_pointer())
        arow = builder.bitcast(row(4, a_v, cast(r_v, 5)), i16.as_pointer())
        mup = context.make_array(signature.args[3])(context, builder, mu_v).data
        n16 = cast(n16_v, 6)
        fv = ir.Constant(vf, ir.Undefined)
        fv = builder.insert_element(fv, f_v, ir.Constant(i32, 0))
        fv = builder.shuffle_vector(fv, ir.Constant(vf, ir.Undefined), ir.Constant(ir.VectorType(i32, L), [0] * L))
        acc = cgutils.alloca_once_value(builder, ir.Constant(vd, [0.0] * L))
        err = cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * L))
        fma = llvm_fn(builder.module, f"llvm.fma.v{L}f64", vd, [vd, vd, vd])
        fma32 = llvm_fn(builder.module, f"llvm.fma.v{L}f32", vf, [vf, vf, vf])

        def vload(ptr, off, ty):
            return builder.load(builder.bitcast(builder.gep(ptr, [off]), ty.as_pointer()), align=2)

        def vstore(val, ptr, off):
            builder.store(val, builder.bitcast(builder.gep(ptr, [off]), val.type.as_pointer()), align=2)

        sixteen = ir.Constant(vi, [16] * L)

        def rne16(bits):
            odd = builder.and_(builder.lshr(bits, sixteen), ir.Constant(vi, [1] * L))
            return builder.trunc(builder.lshr(builder.add(builder.add(bits, ir.Constant(vi, [0x7FFF] * L)), odd),
                                              sixteen), vh)

        with cgutils.for_range(builder, builder.udiv(n16, ir.Constant(intp, L))) as loop:
            off = builder.mul(loop.index, ir.Constant(intp, L))
            v = builder.fsub(builder.fmul(vload(xrow, off, vf), fv), vload(mup, off, vf))
            vv = builder.fpext(v, vd)
            builder.store(builder.call(fma, [vv, vv, builder.load(acc)]), acc)
            hi = rne16(builder.bitcast(v, vi))
            hi_f = builder.bitcast(builder.shl(builder.zext(hi, vi), sixteen), vf)
            e = builder.fsub(hi_f, v)
            builder.store(builder.call(fma32, [e, e, builder.load(err)]), err)
            vstore(hi, arow, off)
        return context.make_tuple(builder, signature.return_type,
                                  [sum_lanes(builder, builder.load(acc)),
                                   sum_lanes(builder, builder.fpext(builder.load(err), vd))])

    return sig, codegen


@numba.njit(inline="always", **_JIT)
def _err_bound(err32, n16):
    """An upper bound on the exact Σ (h − v)² over the first n16 coordinates from :func:`_convert16`'s float32 lane
    sums ``err32``. Each lane adds n16/16 non-negative terms with one rounding per fused multiply-add, so its sum is
    at least (1 − 2⁻²⁴)^(n16/16) times the exact one, less at most 2⁻¹²⁶ per step where a result falls below
    float32's normal range (2⁻¹⁵⁰ with gradual underflow; 2⁻¹²⁶ also covers a library that set flush-to-zero);
    1/(1 − u)^m <= 1 + 2mu for mu <= ½, and the float64 sum of the 16 lanes is within 15·2⁻⁵³ < 2⁻⁴⁸. (The last
    D mod 16 squares, summed in float64 by :func:`_convert_row`, are exact up to float64 rounding, which the
    margin's 2⁻²⁰ term absorbs, as before.)"""
    return (err32 * (1.0 + 2.0**-48) + n16 * 2.0**-126) * (1.0 + (n16 / 16 + 1) * 2.0**-23)


@numba.njit(inline="always", **_JIT)
def _convert_row(x, i, f, mu, a16, r, one):
    """:func:`_convert16` over every coordinate (the last D mod 16 one by one, the same operations, through the
    1-float scratch ``one``, in float64); returns (‖v‖², an upper bound on ‖h − v‖²)."""
    dim = x.shape[1]
    n16 = dim - dim % 16 if x.strides[1] == 4 else 0
    acc, err = 0.0, 0.0
    if n16:
        acc, err32 = _convert16(x, i, f, mu, a16, r, n16)
        err = _err_bound(err32, n16)
    bits = one.view(np.uint32)
    for t in range(n16, dim):
        v = x[i, t] * f - mu[t]
        acc += np.float64(v) * np.float64(v)
        one[0] = v
        hb = _rne16(bits[0])
        a16[r, t] = hb
        bits[0] = np.uint32(hb) << np.uint32(16)
        e = np.float64(one[0] - v)
        err += e * e
    return acc, err


# Unit rows: v = fl(fl(x·f) − μ) is within 2⁻²³‖x·f‖ + 2⁻²⁴‖v‖ of the exact x/‖x‖ − μ (f is 1/‖x‖ rounded to
# float32); the 2⁻²⁴‖v‖ part is in the 2⁻²⁰ term, this is the rest with ~2× margin.
_UNIT_ROW_EPS = 2.0**-22
# Below float32's normal range rounding is absolute, not relative: a result under 2⁻¹²⁶ may be off by up to 2⁻¹⁵⁰,
# or by 2⁻¹²⁶ where the hardware flushes it (AMX bf16 products treat subnormal inputs as zero and flush subnormal
# results). The 2⁻²⁰ term of the margin is relative, so rows and centres within ~2⁻⁶³ of μ need these on top: per
# coordinate of ṽ or w̃ that may be flushed (_TINY_COORD·sqrt(D) joins ‖e‖ and, times ‖ṽ‖, ‖f_j‖) and per float32
# operation behind a d̃_j (_TINY_OP·(D + 64)). Both are ~10⁻³⁵ of a squared distance: nothing at ordinary scales.
_TINY_COORD = 2.0**-126
_TINY_OP = 2.0**-124
# Unit rows whose norm lies outside [2⁻⁶⁰, 2⁶⁰] are not scaled in float32 (1/‖x‖ would overflow or be subnormal): they
# are settled by exact float64 distances to every centre (:func:`row_scale` marks them with a negative factor).
_UNIT_NORM_RANGE = (2.0**-60, 2.0**60)


@numba.njit(inline="always", **_JIT)
def _margin(e_eff, vt, vn, eps_v, wn, fn, mag, gam):
    """Bound on |d̃_j − d_j| for a row with ‖e‖ + ε = e_eff, ‖ṽ‖ <= vt, ‖v‖ = vn, row term eps_v = 2ε‖v‖ + ε², and a
    centre with ‖w‖ = wn, ‖f‖ = fn and term norms ``mag`` (module docstring)."""
    return 2.0 * (e_eff * wn + vt * fn + gam * vt * mag) + eps_v + 2.0**-20 * (vn + wn) ** 2


@numba.njit(inline="always", **_JIT)
def _inner_count(wsort, vn, top):
    """How many centres (in ascending ‖w‖ order) are *inner*: ‖w_j‖ <= radius. Beyond it sqrt(d_j) >= ‖W_j‖ − ‖V‖ >
    sqrt(top) >= sqrt(d_b) for the exact centred vectors V, W (the factor covers their float32 rounding, relative
    2⁻²⁴ per coordinate, and vn's), so an outer centre is farther than the approximate best."""
    radius = (vn + np.sqrt(max(top, 0.0))) * (1.0 + 2.0**-19)
    k = wsort.shape[0]
    if radius >= wsort[k - 1]:
        return k
    lo, hi = 0, k  # binary search: the first position above the radius
    while lo < hi:
        mid = (lo + hi) >> 1
        if wsort[mid] <= radius:
            lo = mid + 1
        else:
            hi = mid
    return max(1, lo)


@numba.njit(**_JIT_RAW)
def _row_by_inner_centres(x, i, f, unit_rows, centroids, g, r, cn, cstat, xr, d1, d2, lab, mb, top, e_eff, vt, vn,
                          eps_v, gam, n_in, order, wsort, fpre, mpre, cand, lower_end, res):
    """Settle a row that failed the quick test with its ``n_in`` *inner* centres only (:func:`_inner_count`): (label,
    exact squared distance, runner-up lower bound, centres given exact distances) go to ``res``. A separate function,
    not inlined: inside assign_rows' loop this code slowed the other rows' scans (E-steps 49 → 71 ms on heavy-tailed
    1M×128 K=256 data with identical results); so did sharing its lower-end formula with that loop through an
    inlined helper (E-steps 32 → 43 ms), hence the twin."""
    gap = wsort[n_in] * (1.0 - 2.0**-19) - vn * (1.0 + 2.0**-19)
    low_out = gap * gap if gap > 0 else 0.0  # every outer centre's squared distance is at least this
    mmax = _margin(e_eff, vt, vn, eps_v, wsort[n_in - 1], fpre[n_in - 1], mpre[n_in - 1], gam)
    if d2 - d1 > mmax + mb:  # the quick test over the inner centres
        ex = row_scaled_sq_dist64(x, i, f, centroids, lab) if unit_rows else row_sq_dist64(x, i, centroids, lab)
        res[0], res[1] = lab, ex
        res[2] = min(max(d2 - mmax, ex + (d2 - d1) - (mmax + mb)), low_out)
        res[3] = 1
        return
    # per-centre margins over the inner centres, in norm order: the twin of assign_rows' scan over every centre, kept
    # apart (that one runs in id order with no gather, in the hot loop); a change to one belongs in both
    m0 = eps_v + 2.0**-20 * vn * vn
    m1 = 2.0 * e_eff + 2.0**-19 * vn
    m2 = 2.0 * vt
    m3 = 2.0 * gam * vt
    for t in range(n_in):
        j = order[t]
        dj = max(np.float64(xr + cn[j] - np.float32(2.0) * g[r, j]), 0.0)
        wn = cstat[0, j]
        lower_end[t] = dj - (m0 + wn * (m1 + 2.0**-20 * wn) + m2 * cstat[1, j] + m3 * cstat[2, j])
    low = low_out
    n_cand = 0
    for t in range(n_in):
        lj = lower_end[t]
        if lj > top:
            low = min(low, lj)
        else:
            cand[n_cand] = order[t]
            n_cand += 1
    ex = np.inf
    ex2 = np.inf
    best = lab
    for t in range(n_cand):
        j = cand[t]
        e = row_scaled_sq_dist64(x, i, f, centroids, j) if unit_rows else row_sq_dist64(x, i, centroids, j)
        if e < ex or (e == ex and j < best):  # norm order, not id order: ties to the smaller id explicitly
            ex2 = ex
            ex = e
            best = j
        elif e < ex2:
            ex2 = e
    res[0], res[1], res[2], res[3] = best, ex, min(low, ex2), n_cand


@numba.njit(**_JIT)
def settle_scratch(cstat):
    """The centre tables and scratch :func:`settle_strip` reads: (order, wsort, fpre, mpre, cand, lower_end, res,
    ids_scratch) — the centres by ‖w‖, with prefix maxima of ‖f‖ and of the term norms (the margin grows with each,
    so the entries at position t bound the margin of every centre up to t in this order), then scratch."""
    k = cstat.shape[1]
    order = np.argsort(cstat[0])
    wsort = np.empty(k, np.float64)
    fpre = np.empty(k, np.float64)
    mpre = np.empty(k, np.float64)
    fmax = magmax = 0.0
    for t in range(k):
        j = order[t]
        wsort[t] = cstat[0, j]
        fmax = max(fmax, cstat[1, j])
        magmax = max(magmax, cstat[2, j])
        fpre[t] = fmax
        mpre[t] = magmax
    return (order, wsort, fpre, mpre, np.empty(k, np.int64), np.empty(k, np.float64), np.empty(4, np.float64),
            _ids_scratch(k))


@numba.njit(**_JIT)
def assign_rows(x, rows, centroids, mu, bt, cn, cstat, gam, inner_lower, unit_rows, cfg, labels, exact_sq, lower2,
                nearest):
    """Exact nearest centre of rows of ``x`` (unit-normalised first when ``unit_rows``) and its float64 squared
    distance, certified from AMX bf16 products as the module docstring describes. Returns how many rows needed exact
    distances to more than one centre.

    ``rows`` (int64): the rows to assign, in that order (outputs per listed row); empty: every row. ``mu, bt, cn,
    cstat`` from :func:`pack_centres`, ``gam`` = :func:`gamma` (D). Rows that fail the quick test drop the centres
    the triangle inequality rules out (module docstring) when no ``lower2`` is wanted, and with it too when
    ``inner_lower`` (the outer centres' bound is then their norm gap, looser than their per-centre lower ends unless
    they are far out). Outputs:
    ``labels`` (a zero row with ``unit_rows`` gets -1; the caller reports it), ``exact_sq``; when not empty,
    ``lower2`` (float32): a lower bound on the squared distance to the nearest *other* centre (+inf when K = 1), and
    ``nearest`` ((n, m) int32): m candidate centres per row by the approximate distances
    (:func:`kvant.kernels.assign.candidate_ids_from_ip`), the row's label always among them."""
    kp = cn.shape[0]
    dp = bt.shape[0] * 32
    a16 = np.zeros((_STRIP, dp), np.uint16)
    one = np.zeros(1, np.float32)
    g = np.empty((_STRIP, kp), np.float32)
    xn = np.empty(_STRIP, np.float32)
    en = np.empty(_STRIP, np.float64)
    scale = np.ones(_STRIP, np.float64)
    return _assign_rows_loop(x, rows, centroids, mu, bt, cn, cstat, gam, inner_lower, unit_rows, cfg, labels, exact_sq,
                             lower2, nearest, a16, one, g, xn, en, scale, settle_scratch(cstat))


@numba.njit(inline="always", **_JIT_RAW)
def row_scale(x, i, unit_rows):
    """The factor row i is used at: 1/‖x_i‖ for unit rows, else 1. 0 marks a zero row; −1/‖x_i‖ a unit row whose norm
    is outside ``_UNIT_NORM_RANGE``, which :func:`settle_strip` settles by exact distances (convert it with factor 0:
    :func:`conversion_scale`)."""
    if not unit_rows:
        return 1.0
    nrm = np.sqrt(_row_sqnorm(x, i))
    if nrm == 0:
        return 0.0
    if nrm < _UNIT_NORM_RANGE[0] or nrm > _UNIT_NORM_RANGE[1]:
        return -1.0 / nrm
    return 1.0 / nrm


@numba.njit(inline="always", **_JIT_RAW)
def conversion_scale(f):
    """The float32 factor a row is converted with: :func:`row_scale`'s, or 0 for the rows it marks negative."""
    return np.float32(max(f, 0.0))


@numba.njit(inline="always", **_JIT_RAW)
def strip_row(x, rows, o, unit_rows, scale, r):
    """Row o of the listed ``rows`` (or of x when none are listed) as strip row r: (its index in x, the float32 factor
    to convert it with); its :func:`row_scale` goes to scale[r]."""
    i = rows[o] if rows.shape[0] > 0 else o
    f = row_scale(x, i, unit_rows)
    scale[r] = f
    return i, conversion_scale(f)


@numba.njit(inline="always", **_JIT_RAW)
def _down32(v):
    """float32 at or below v >= 0 (a lower bound stays one after rounding)."""
    r = np.float32(v)
    if np.float64(r) > v:
        r = np.nextafter(r, np.float32(0.0))
    return r


# The strip loop runs without Numba's reference counting (``_nrt=False``), its scratch made by assign_rows: with it,
# the calls in the loop that take arrays paid atomic increfs and decrefs (as in kernels.direct_assign). Whatever it
# calls is compiled under the same flags, so nothing it calls may allocate (hence kernels.assign's *_into kernels).
@numba.njit(**_JIT_RAW)
def _assign_rows_loop(x, rows, centroids, mu, bt, cn, cstat, gam, inner_lower, unit_rows, cfg, labels, exact_sq,
                      lower2, nearest, a16, one, g, xn, en, scale, tables):
    listed = rows.shape[0] > 0
    n = rows.shape[0] if listed else x.shape[0]
    fallback = 0
    _tiles_begin(cfg)
    for s in range(0, n, _STRIP):
        nr = min(_STRIP, n - s)
        for r in range(nr):
            i, f = strip_row(x, rows, s + r, unit_rows, scale, r)
            sq, err = _convert_row(x, i, f, mu, a16, r, one)
            xn[r] = np.float32(sq)
            en[r] = np.sqrt(err)
        if nr < _STRIP:  # the tail strip: zero rows, their products ignored
            a16[nr:, :] = 0
        _strip_products(a16, bt, g)
        fallback += settle_strip(x, rows, s, nr, centroids, cn, cstat, gam, inner_lower, unit_rows, labels, exact_sq,
                                 lower2, nearest, g, xn, en, scale, tables)
    _tiles_end()
    return fallback


_F32_MAX = float(np.finfo(np.float32).max)


@numba.njit(**_JIT_RAW)
def _every_centre_exactly(x, i, f, unit_rows, centroids):
    """(label, exact squared distance, exact runner-up) of row i over every centre in float64 (of the row scaled by f
    when ``unit_rows``): for rows no float32 margin covers. Ties go to the smaller id."""
    ex, ex2, lab = np.inf, np.inf, 0
    for j in range(centroids.shape[0]):
        e = row_scaled_sq_dist64(x, i, f, centroids, j) if unit_rows else row_sq_dist64(x, i, centroids, j)
        if e < ex:
            ex, ex2, lab = e, ex, j
        elif e < ex2:
            ex2 = e
    return lab, ex, ex2


@numba.njit(**_JIT_RAW)
def settle_strip(x, rows, s, nr, centroids, cn, cstat, gam, inner_lower, unit_rows, labels, exact_sq, lower2, nearest,
                 g, xn, en, scale, tables):
    """Certify rows s .. s + nr of a strip (module docstring, steps 2-3) from their approximate products ``g`` (row r
    of the strip in g[r]: ṽ·w̃_j for every padded centre), ``xn`` (Σ v² as float32), ``en`` (a bound on ‖e‖) and
    ``scale`` (:func:`row_scale`: 1/‖x‖ for unit rows, else 1; 0 for a zero unit row, which gets label −1; negative
    for a unit row settled by exact distances to every centre, as is a row whose Σv² overflows float32); writes
    labels, exact_sq, and lower2 / nearest when not empty (lower2 rounded down to float32). ``tables`` from
    :func:`settle_scratch`. Shared by every product backend (AMX tiles here, int16 products in
    :mod:`kvant.kernels.i16_assign`); returns how many rows needed exact distances to more than one centre."""
    order, wsort, fpre, mpre, cand, lower_end, res, ids_scratch = tables
    listed = rows.shape[0] > 0
    k = centroids.shape[0]
    kp = cn.shape[0]
    want_lower = lower2.shape[0] > 0
    want_near = nearest.shape[0] > 0
    eps = _UNIT_ROW_EPS if unit_rows else 0.0
    tiny_e = _TINY_COORD * np.sqrt(np.float64(x.shape[1]))
    tiny_abs = _TINY_OP * (x.shape[1] + 64)
    fallback = 0
    for r in range(nr):
        o = s + r
        i = rows[o] if listed else o
        if unit_rows and scale[r] == 0.0:
            labels[o] = -1
            exact_sq[o] = 0.0
            if want_lower:
                lower2[o] = 0.0
            continue
        if (unit_rows and scale[r] < 0.0) or not xn[r] <= _F32_MAX:  # a norm out of float32's reach
            lab, ex, ex2 = _every_centre_exactly(x, i, abs(scale[r]), unit_rows, centroids)
            labels[o] = lab
            exact_sq[o] = ex
            if want_lower:
                lower2[o] = _down32(ex2)
            fallback += k > 1
            continue
        best, run, arg = _top2_lanes(g, r, cn, xn[r], np.float32(1.0), kp)
        d1 = np.float64(np.int32(best).view(np.float32))
        d2 = np.float64(np.int32(min(run, np.int32(0x7F800000))).view(np.float32))
        vn = np.sqrt(np.float64(xn[r]) + 2.0**-149) * (1.0 + 2.0**-22)  # >= ‖v‖ (xn: Σv² rounded to float32)
        vt = vn + en[r]  # ‖ṽ‖ <= ‖v‖ + ‖e‖
        e_eff = en[r] + eps + tiny_e
        eps_v = 2.0 * eps * vn + eps * eps + 2.0 * vt * tiny_e + tiny_abs
        lab = np.int64(arg)
        mb = _margin(e_eff, vt, vn, eps_v, cstat[0, lab], cstat[1, lab], cstat[2, lab], gam)
        top = d1 + mb  # >= d_b
        mmax = _margin(e_eff, vt, vn, eps_v, wsort[k - 1], fpre[k - 1], mpre[k - 1], gam)
        # quick test: d_j − d_b >= (d̃_j − d̃_b) − (M_j + M_b) >= (d̃₂ − d̃₁) − (M_max + M_b) for every other j
        if k == 1 or d2 - d1 > mmax + mb:
            ex = row_scaled_sq_dist64(x, i, scale[r], centroids, lab) if unit_rows else row_sq_dist64(
                x, i, centroids, lab)
            low = max(d2 - mmax, ex + (d2 - d1) - (mmax + mb))
        else:
            # the triangle inequality may leave few centres to check: in final assignments, and in E-steps when
            # inner_lower (elsewhere the full scan's runner-up bound is tighter, and Hamerly's bounds recompute
            # fewer rows with it; with the inner centres there, Zipf 1M×128 K=256 l2 fits took 1.09-1.13×)
            n_in = k if want_lower and not inner_lower else _inner_count(wsort, vn, top)
            if 2 * n_in <= k:
                _row_by_inner_centres(x, i, scale[r], unit_rows, centroids, g, r, cn, cstat, xn[r], d1, d2, lab,
                                      mb, top, e_eff, vt, vn, eps_v, gam, n_in, order, wsort, fpre, mpre, cand,
                                      lower_end, res)
                lab, ex, low = np.int64(res[0]), res[1], res[2]
                fallback += res[3] > 1
            else:
                # per-centre margins M_j: every centre whose lower end d̃_j − M_j reaches the approximate best's
                # upper end d̃_b + M_b may be the nearest; the others are not, and their lower ends bound the
                # runner-up. M_j = m0 + ‖w_j‖·(m1 + 2⁻²⁰‖w_j‖) + m2·‖f_j‖ + m3·mag_j (_margin, expanded per row)
                m0 = eps_v + 2.0**-20 * vn * vn
                m1 = 2.0 * e_eff + 2.0**-19 * vn
                m2 = 2.0 * vt
                m3 = 2.0 * gam * vt
                xr = xn[r]
                for j in range(k):  # branch-free (with the candidate branch in it: 41 vs 37 ms per 100k rows, K=64)
                    dj = max(np.float64(xr + cn[j] - np.float32(2.0) * g[r, j]), 0.0)
                    wn = cstat[0, j]
                    lower_end[j] = dj - (m0 + wn * (m1 + 2.0**-20 * wn) + m2 * cstat[1, j] + m3 * cstat[2, j])
                low = np.inf
                n_cand = 0
                for j in range(k):
                    lj = lower_end[j]
                    if lj > top:
                        low = min(low, lj)
                    else:
                        cand[n_cand] = j
                        n_cand += 1
                ex = np.inf
                ex2 = np.inf
                for t in range(n_cand):
                    j = cand[t]
                    e = row_scaled_sq_dist64(x, i, scale[r], centroids, j) if unit_rows else row_sq_dist64(
                        x, i, centroids, j)
                    if e < ex:
                        ex2 = ex
                        ex = e
                        lab = j
                    elif e < ex2:
                        ex2 = e
                fallback += n_cand > 1
                low = min(low, ex2)
        labels[o] = lab
        exact_sq[o] = ex
        if want_lower:
            lower2[o] = _down32(max(low, 0.0))
    if want_near:
        out = nearest[s : s + nr]
        _candidate_ids_into(g[:nr, :k], cn[:k], xn[:nr], out, *ids_scratch)
        m = out.shape[1]
        for r in range(nr):  # the exact label may differ from the approximate best: keep it a candidate
            lab = labels[s + r]
            found = False
            for t in range(m):
                found = found or out[r, t] == lab
            if not found and lab >= 0:
                out[r, m - 1] = lab
    return fallback


__all__ = ["AVAILABLE", "TILE_CONFIG", "assign_rows", "gamma", "pack_centres", "padded_k"]
