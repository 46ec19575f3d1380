"""Top-2 assignment with rows in the vector lanes, for few centres: :func:`tile_top2`.

The direct kernel (:mod:`kvant.kernels.direct_assign`) puts centres in the lanes: 16 per 512-bit register, so
K = 10 pays for 16 and each row ends in a horizontal reduction across the lanes. Here 16 rows share a register
instead (the rows transposed once into tiles of (D, 16), :func:`transpose_tiles`); each centre coordinate is
broadcast, and a row's top-2 over the centres is a plain lane-wise minimum. Centres go in passes of G <= 8
accumulators (G = ceil(K / ceil(K / 8)), so at most one padded centre per pass).

Each product is summed in coordinate order with one fused multiply-add per coordinate, as the direct kernel sums
it, and the distance is xn + ‖c‖² − 2·ip with the same float32 operations and clamps
(:func:`kvant.kernels.assign.top2_from_ip`); ties go to the smaller centre id. So the labels, d1 and d2 are the
direct kernel's bit for bit. Used by the compiled small-input Lloyd loop (:mod:`kvant.kernels.lloyd_small`),
whose rows are fixed across iterations, for K <= 32 (:data:`kvant.cluster.lloyd.ROW_LANES_MAX_K`): digits
(1,797 × 64) K = 10 E-steps took 28.6 µs with the direct kernel (Zen 4, 2 threads, 2026-12-05) and 16-18 µs here.
Greedy k-means++ seeding computes its distances to each candidate the same way (:func:`tile_sq_dists`).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._llvm import host_cpu_name, host_features, llvm_fn, splat
from .assign import store_top2
from .distance import exact_sq_dist_into, sq_norms_into

_JIT = dict(cache=True, nogil=True, fastmath=False)
LANES = 16  # rows per tile
MAX_GROUP = 8  # accumulators (centres) per pass
# transpose_tiles by masked 16-lane gathers (gather_tiles_into) on AVX-512 hosts other than AMD's, where gathers are
# slower and the gathering copy was not measured: on the Intel host without AMX (2026-12-07) 1.6-2.6x the scalar copy
GATHER_TRANSPOSE = "avx512f" in host_features() and not host_cpu_name().startswith("znver")


@numba.njit(**_JIT)
def group_size(k: int) -> int:
    """Centres per pass for K centres: the passes ceil(K/8) share them as evenly as whole centres allow."""
    passes = -(-k // MAX_GROUP)
    return -(-k // passes)


@numba.njit(**_JIT)
def padded_k(k: int) -> int:
    """K rounded up to whole passes of :func:`group_size` centres."""
    g = group_size(k)
    return -(-k // g) * g


@numba.njit(**_JIT)
def transpose_tiles(x, multiple=1):
    """x (n, D) float32 as tiles (ceil(n/16) rounded up to a multiple of ``multiple``, D, 16): tile b holds rows
    16b .. 16b + 15 column by column, zero rows after the last."""
    n, dim = x.shape
    nt = (n + LANES - 1) // LANES
    nt = (nt + multiple - 1) // multiple * multiple
    out = np.empty((nt, dim, LANES), np.float32)
    if GATHER_TRANSPOSE and (dim <= 1 or x.strides[1] == 4):
        gather_tiles_into(x, out)
    else:
        copy_tiles_into(x, out)
    return out


@numba.njit(**_JIT)
def gather_tiles_into(x, out):
    """:func:`transpose_tiles` into ``out`` by one masked gather per coordinate and tile (rows of unit stride): on the
    Intel host without AMX, digits 1,797 x 64 43 -> 23 us and 20,000 x 128 1.27 -> 0.79 ms against
    :func:`copy_tiles_into`. Padding tiles gather no lane."""
    n = x.shape[0]
    for b in range(out.shape[0]):
        i0 = b * LANES
        _gather_tile(x, min(i0, max(n - 1, 0)), max(0, min(LANES, n - i0)), out[b:b + 1])


@numba.njit(**_JIT)
def copy_tiles_into(x, out):
    """:func:`transpose_tiles` into ``out`` by scalar copies, whole tiles' 16 rows read column by column (rows in any
    layout; row by row into a zeroed array took 60 us against 44 on digits)."""
    n, dim = x.shape
    full = n // LANES
    for b in range(full):
        ob = out[b]
        xb = x[b * LANES:(b + 1) * LANES]
        for t in range(dim):
            for r in range(LANES):
                ob[t, r] = xb[r, t]
    for b in range(full, out.shape[0]):  # the last rows and the zero padding
        for t in range(dim):
            for r in range(LANES):
                i = b * LANES + r
                out[b, t, r] = x[i, t] if i < n else np.float32(0.0)


@numba.njit(**_JIT)
def fill_centres(centroids, c_sqnorms, cp, cnp):
    """The centre operands of :func:`tile_top2`: cp (KP, D) the centres with zero rows after K, cnp (KP,) their
    squared norms with +inf after K (a padded centre is never nearer than a real one: ties go to the smaller id)."""
    k = centroids.shape[0]
    for j in range(cp.shape[0]):
        for t in range(cp.shape[1]):
            cp[j, t] = centroids[j, t] if j < k else np.float32(0.0)
        cnp[j] = c_sqnorms[j] if j < k else np.float32(np.inf)


def _emit_tile(context, builder, signature, args, g_count: int):
    """The IR of one 16-row tile against every centre, G = ``g_count`` accumulators per pass."""
    xt_v, b_v, cp_v, cnp_v, xn_v, bo_v, ro_v, ao_v = args[:8]
    f32, i32 = ir.FloatType(), ir.IntType(32)
    vf, vi = ir.VectorType(f32, LANES), ir.VectorType(i32, LANES)
    intp = context.get_value_type(types.intp)
    a_xt = context.make_array(signature.args[0])(context, builder, xt_v)
    a_cp = context.make_array(signature.args[2])(context, builder, cp_v)
    dim = cgutils.unpack_tuple(builder, a_xt.shape, 3)[1]
    kp = cgutils.unpack_tuple(builder, a_cp.shape, 2)[0]
    bi = context.cast(builder, b_v, signature.args[1], types.intp)
    tile0 = builder.gep(a_xt.data, [builder.mul(builder.mul(bi, dim), ir.Constant(intp, LANES))])
    cdata = a_cp.data
    cnp_p = context.make_array(signature.args[3])(context, builder, cnp_v).data
    xn_p = context.make_array(signature.args[4])(context, builder, xn_v).data
    fma = llvm_fn(builder.module, "llvm.fma.v16f32", vf, [vf, vf, vf])

    def vptr(ptr, off, ty=vf):
        return builder.bitcast(builder.gep(ptr, [off]), ty.as_pointer())

    xs = builder.load(vptr(xn_p, builder.mul(bi, ir.Constant(intp, LANES))), align=4)
    two = ir.Constant(vf, [2.0] * LANES)
    zero_i, big = ir.Constant(vi, [0] * LANES), ir.Constant(vi, [0x7F800000] * LANES)
    above = ir.Constant(vi, [0x7F800001] * LANES)  # above every clamped value: the first centre is taken
    best_p = cgutils.alloca_once_value(builder, above)
    run_p = cgutils.alloca_once_value(builder, above)
    arg_p = cgutils.alloca_once_value(builder, ir.Constant(vi, [0] * LANES))
    accs = [cgutils.alloca_once(builder, vf) for _ in range(g_count)]
    n_pass = builder.udiv(kp, ir.Constant(intp, g_count))
    with cgutils.for_range(builder, n_pass) as passes:
        j0 = builder.mul(passes.index, ir.Constant(intp, g_count))
        for a in accs:
            builder.store(ir.Constant(vf, [0.0] * LANES), a)
        crows = [builder.gep(cdata, [builder.mul(builder.add(j0, ir.Constant(intp, g)), dim)]) for g in range(g_count)]
        with cgutils.for_range(builder, dim) as coords:
            t = coords.index
            xv = builder.load(vptr(tile0, builder.mul(t, ir.Constant(intp, LANES))), align=4)
            for g in range(g_count):
                cv = splat(builder, builder.load(builder.gep(crows[g], [t])), vf)
                builder.store(builder.call(fma, [xv, cv, builder.load(accs[g])]), accs[g])
        for g in range(g_count):  # the pass's centres in id order: (distance, id) ties to the smaller id
            j = builder.add(j0, ir.Constant(intp, g))
            cs = splat(builder, builder.load(builder.gep(cnp_p, [j])), vf)
            d = builder.bitcast(builder.fsub(builder.fadd(xs, cs), builder.fmul(two, builder.load(accs[g]))), vi)
            d = builder.select(builder.icmp_signed(">", d, zero_i), d, zero_i)
            d = builder.select(builder.icmp_signed(">", d, big), zero_i, d)
            best, run = builder.load(best_p), builder.load(run_p)
            lt = builder.icmp_signed("<", d, best)
            smaller_run = builder.select(builder.icmp_signed("<", d, run), d, run)
            builder.store(builder.select(lt, best, smaller_run), run_p)
            builder.store(builder.select(lt, d, best), best_p)
            jv = splat(builder, builder.trunc(j, i32), vi)
            builder.store(builder.select(lt, jv, builder.load(arg_p)), arg_p)
    for out_v, src in ((bo_v, best_p), (ro_v, run_p), (ao_v, arg_p)):
        p = context.make_array(signature.args[5])(context, builder, out_v).data
        builder.store(builder.load(src), builder.bitcast(p, vi.as_pointer()), align=4)


@intrinsic
def _tile(typingctx, g_count, xt, b, cp, cnp, xn, best_out, run_out, arg_out):
    """One 16-row tile against every centre in passes of ``g_count`` (1..MAX_GROUP) accumulators: best, runner-up
    (distance bit patterns) and first index of the best per lane into the three int32 outputs. The IR holds one
    body per pass size; ``g_count`` picks it."""
    ok = all(isinstance(a, types.Array) for a in (xt, cp, cnp, xn, best_out, run_out, arg_out))
    if not ok or xt.dtype != types.float32 or cp.dtype != types.float32 or xt.ndim != 3:
        return None
    sig = types.void(g_count, xt, b, cp, cnp, xn, best_out, run_out, arg_out)

    def codegen(context, builder, signature, args):
        inner = signature.args[1:]
        gv = context.cast(builder, args[0], signature.args[0], types.intp)
        for g in range(1, MAX_GROUP + 1):
            with builder.if_then(builder.icmp_signed("==", gv, ir.Constant(gv.type, g))):
                _emit_tile(context, builder, types.void(*inner), args[1:], g)
        return context.get_dummy_value()

    return sig, codegen


BLOCK_TILES = 4  # tiles per tile_sq_dists call


@intrinsic
def tile_sq_dists(typingctx, xt, b, x, i, out):
    """out[0:64] = float32 ‖x_r − x[i]‖² of the 64 rows of tiles b .. b + 3 of ``xt`` (:func:`transpose_tiles`, with
    ``multiple`` = 4), padding rows giving ‖x[i]‖². Each sum runs over the even and the odd coordinates separately
    (one fused multiply-add of the rounded difference each), then adds the two: eight independent chains, where one
    chain per tile waited on the multiply-add latency. Within the (D + 3)·2⁻²⁴ relative error bound of any float32
    sum of the D rounded squares."""
    ok = (isinstance(xt, types.Array) and xt.dtype == types.float32 and xt.ndim == 3 and isinstance(x, types.Array)
          and x.dtype == types.float32 and x.ndim == 2 and isinstance(out, types.Array) and out.dtype == types.float32)
    if not ok:
        return None
    sig = types.void(xt, b, x, i, out)

    def codegen(context, builder, signature, args):
        xt_v, b_v, x_v, i_v, out_v = args
        f32 = ir.FloatType()
        vf = ir.VectorType(f32, LANES)
        intp = context.get_value_type(types.intp)
        a_xt = context.make_array(signature.args[0])(context, builder, xt_v)
        a_x = context.make_array(signature.args[2])(context, builder, x_v)
        dim = cgutils.unpack_tuple(builder, a_xt.shape, 3)[1]
        bi = context.cast(builder, b_v, signature.args[1], types.intp)
        tile_len = builder.mul(dim, ir.Constant(intp, LANES))
        tiles = [builder.gep(a_xt.data, [builder.mul(builder.add(bi, ir.Constant(intp, q)), tile_len)])
                 for q in range(BLOCK_TILES)]
        xs0, xs1 = cgutils.unpack_tuple(builder, a_x.strides, 2)
        ii = context.cast(builder, i_v, signature.args[3], types.intp)
        i8p = ir.IntType(8).as_pointer()
        row = builder.gep(builder.bitcast(a_x.data, i8p), [builder.mul(ii, xs0)])
        fma = llvm_fn(builder.module, "llvm.fma.v16f32", vf, [vf, vf, vf])
        zero = ir.Constant(vf, [0.0] * LANES)
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(2)] for _ in range(BLOCK_TILES)]

        def step(t, h):
            c = splat(builder, builder.load(builder.bitcast(builder.gep(row, [builder.mul(t, xs1)]),
                                                            f32.as_pointer())), vf)
            off = builder.mul(t, ir.Constant(intp, LANES))
            for q in range(BLOCK_TILES):
                xv = builder.load(builder.bitcast(builder.gep(tiles[q], [off]), vf.as_pointer()), align=4)
                diff = builder.fsub(xv, c)
                builder.store(builder.call(fma, [diff, diff, builder.load(accs[q][h])]), accs[q][h])

        two = ir.Constant(intp, 2)
        with cgutils.for_range(builder, builder.udiv(dim, two)) as pairs:
            t0 = builder.mul(pairs.index, two)
            step(t0, 0)
            step(builder.add(t0, ir.Constant(intp, 1)), 1)
        with builder.if_then(builder.icmp_unsigned("!=", builder.urem(dim, two), ir.Constant(intp, 0))):
            step(builder.sub(dim, ir.Constant(intp, 1)), 0)
        optr = context.make_array(signature.args[4])(context, builder, out_v).data
        for q in range(BLOCK_TILES):
            total = builder.fadd(builder.load(accs[q][0]), builder.load(accs[q][1]))
            builder.store(total, builder.bitcast(builder.gep(optr, [ir.Constant(intp, q * LANES)]), vf.as_pointer()),
                          align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(**_JIT)
def tile_top2(xt, b0, b1, n, cp, cnp, g_count, xn, labels, d1, d2):
    """Labels, d1 and d2 (as :func:`kvant.kernels.assign.top2_from_ip` writes them) of the rows in tiles b0 .. b1 of
    ``xt`` (:func:`transpose_tiles`; n real rows in all) against the centres ``cp, cnp`` (:func:`fill_centres`, KP a
    multiple of ``g_count``); ``xn`` the rows' squared norms, zero-padded to whole tiles."""
    best = np.empty(LANES, np.int32)
    run = np.empty(LANES, np.int32)
    arg = np.empty(LANES, np.int32)
    for b in range(b0, b1):
        _tile(g_count, xt, b, cp, cnp, xn, best, run, arg)
        for r in range(min(LANES, n - b * LANES)):
            store_top2(labels, d1, d2, b * LANES + r, best[r], run[r], arg[r])


@intrinsic
def _gather_tile(typingctx, x, i0, m, tile):
    """tile[0, t, r] = x[i0 + r, t] for the m (<= 16) rows from i0, zeros in the lanes after them: one masked 16-lane
    gather per coordinate (x float32 2-D with unit-stride rows, any row stride; tile (1, D, 16) float32)."""
    ok = (isinstance(x, types.Array) and x.dtype == types.float32 and x.ndim == 2 and isinstance(tile, types.Array)
          and tile.dtype == types.float32 and tile.ndim == 3)
    if not ok:
        return None
    sig = types.void(x, i0, m, tile)

    def codegen(context, builder, signature, args):
        x_v, i0_v, m_v, tile_v = args
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        vf, vi64 = ir.VectorType(f32, LANES), ir.VectorType(i64, LANES)
        vptr = ir.VectorType(f32.as_pointer(), LANES)
        vmask = ir.VectorType(ir.IntType(1), LANES)
        intp = context.get_value_type(types.intp)
        ax = context.make_array(signature.args[0])(context, builder, x_v)
        at = context.make_array(signature.args[3])(context, builder, tile_v)
        xs0 = cgutils.unpack_tuple(builder, ax.strides, 2)[0]
        dim = cgutils.unpack_tuple(builder, ax.shape, 2)[1]
        i0 = context.cast(builder, i0_v, signature.args[1], types.intp)
        m = builder.trunc(context.cast(builder, m_v, signature.args[2], types.intp), i32)
        base = builder.add(builder.ptrtoint(ax.data, i64), builder.sext(builder.mul(i0, xs0), i64))
        lane = ir.Constant(vi64, list(range(LANES)))
        rows = builder.add(splat(builder, base, vi64), builder.mul(lane, splat(builder, builder.sext(xs0, i64), vi64)))
        mask = builder.icmp_signed("<", ir.Constant(ir.VectorType(i32, LANES), list(range(LANES))),
                                   splat(builder, m, ir.VectorType(i32, LANES)))
        gather = llvm_fn(builder.module, f"llvm.masked.gather.v{LANES}f32.v{LANES}p0f32", vf,
                         [vptr, i32, vmask, vf])
        zero = ir.Constant(vf, [0.0] * LANES)
        with cgutils.for_range(builder, dim) as loop:
            t = loop.index
            off = splat(builder, builder.mul(builder.sext(t, i64), ir.Constant(i64, 4)), vi64)
            ptrs = builder.inttoptr(builder.add(rows, off), vptr)
            v = builder.call(gather, [ptrs, ir.Constant(i32, 4), mask, zero])
            dst = builder.gep(at.data, [builder.mul(t, ir.Constant(intp, LANES))])
            builder.store(v, builder.bitcast(dst, vf.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(**_JIT)
def _check_lanes_operands(x, cp, cnp, g_count):
    """Refuse rows the gathers would misread and centre operands built for other rows."""
    n, dim = x.shape
    if n > 0 and dim > 1 and x.strides[1] != 4:
        raise ValueError("rows in the lanes need rows of unit stride (the gathers read consecutive coordinates)")
    if cp.shape[1] != dim or cnp.shape[0] != cp.shape[0] or cp.shape[0] % g_count != 0:
        raise ValueError("centre operands do not match: build them with fill_centres for these rows")


@numba.njit(**_JIT)
def _lanes_top2(x, cp, cnp, g_count, xn_given, labels, d1, d2, centroids, exact_sq):
    """Each 16 rows of ``x`` gathered into a tile in L1 and their top-2 taken lane-wise (:func:`tile_top2`'s tile).
    ``xn_given``: the rows' squared norms (float32), or empty: each row's float64 norm rounded to float32
    (:func:`sq_norms_into`), stopping with False at one that is not finite. ``exact_sq`` (float64) non-empty: each
    row's exact squared distance to its label too (:func:`exact_sq_dist_into`), while the rows are in cache."""
    n, dim = x.shape
    tile = np.empty((1, dim, LANES), np.float32)
    xn = np.zeros(LANES, np.float32)
    best = np.empty(LANES, np.int32)
    run = np.empty(LANES, np.int32)
    arg = np.empty(LANES, np.int32)
    given = xn_given.shape[0] > 0
    for i0 in range(0, n, LANES):
        m = min(LANES, n - i0)
        if given:
            for r in range(m):
                xn[r] = xn_given[i0 + r]
        else:
            sq_norms_into(x[i0 : i0 + m], 0, m, xn)
            for r in range(m):
                if not xn[r] < np.inf:
                    return False
        for r in range(m, LANES):
            xn[r] = np.float32(0.0)
        _gather_tile(x, i0, m, tile)
        _tile(g_count, tile, 0, cp, cnp, xn, best, run, arg)
        for r in range(m):
            store_top2(labels, d1, d2, i0 + r, best[r], run[r], arg[r])
        if exact_sq.shape[0] > 0:
            exact_sq_dist_into(x, i0, i0 + m, centroids, labels, exact_sq)
    return True


@numba.njit(**_JIT)
def tile_top2_exact(x, cp, cnp, g_count, centroids, labels, d1, d2, exact_sq):
    """The final assignment's fused pass with rows in the lanes (float32 rows ``x``, unit-stride): each 16 rows are
    gathered into a tile that stays in L1, their float64 norms (:func:`sq_norms_into`, rounded to float32) and top-2
    (:func:`tile_top2`'s tile) computed, then each row's exact float64 squared distance to its label
    (:func:`exact_sq_dist_into`) while the rows are in cache. Labels, d1 and d2 are those of
    :func:`kvant.kernels.direct_assign.direct_top2` with centres in the lanes, bit for bit; ``exact_sq`` that of
    :func:`kvant.kernels.distance.exact_sq_dist_rows`. Returns False as soon as a row's squared norm is not finite
    (a NaN or inf in it, or a float32 overflow), leaving the outputs partly written: True means every row is finite."""
    _check_lanes_operands(x, cp, cnp, g_count)
    if centroids.shape[1] != x.shape[1] or exact_sq.shape[0] != x.shape[0]:
        raise ValueError("centre operands do not match: centroids of the rows' dimension, one exact_sq per row")
    return _lanes_top2(x, cp, cnp, g_count, np.empty(0, np.float32), labels, d1, d2, centroids, exact_sq)


@numba.njit(**_JIT)
def tile_top2_given(x, cp, cnp, g_count, xn, labels, d1, d2):
    """Labels, d1 and d2 of rows ``x`` (float32, unit-stride rows) with squared norms ``xn`` given (float32, one per
    row) against the centres ``cp, cnp`` (:func:`fill_centres`): :func:`tile_top2_exact`'s gathered tiles and lane-wise
    top-2 for Lloyd's E-steps, which have the norms already and want no exact distances."""
    _check_lanes_operands(x, cp, cnp, g_count)
    if xn.shape[0] != x.shape[0]:
        raise ValueError("operands do not match: one norm per row")
    _lanes_top2(x, cp, cnp, g_count, xn, labels, d1, d2, np.empty((0, x.shape[1]), np.float32),
                np.empty(0, np.float64))


def top2(x: np.ndarray, centroids: np.ndarray, x_sqnorms: np.ndarray, c_sqnorms: np.ndarray):
    """(labels, d1, d2) of every row of x (float32) by :func:`tile_top2`, its operands made here: the convenience form
    (tests, references) of what :func:`kvant.kernels.lloyd_small.lloyd_small` sets up once per fit."""
    n, dim = x.shape
    k = centroids.shape[0]
    xt = transpose_tiles(np.ascontiguousarray(x, np.float32))
    kp = padded_k(k)
    cp, cnp = np.empty((kp, dim), np.float32), np.empty(kp, np.float32)
    fill_centres(np.ascontiguousarray(centroids, np.float32), np.asarray(c_sqnorms, np.float32), cp, cnp)
    xn = np.zeros(xt.shape[0] * LANES, np.float32)
    xn[:n] = x_sqnorms
    out = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.float32)
    tile_top2(xt, 0, xt.shape[0], n, cp, cnp, group_size(k), xn, *out)
    return out


__all__ = ["BLOCK_TILES", "LANES", "MAX_GROUP", "fill_centres", "group_size", "padded_k", "tile_sq_dists", "tile_top2",
           "top2", "transpose_tiles"]
