"""Fused assignment without BLAS: register-blocked inner products and the top-2, for few centroids (K <= 64 on
AVX-512 with AMX, 128 on AMD Zen 4, 2,048 on other AVX-512 hosts, K <= 16 on AVX2).

The E-step's GEMM of (rows × D) by (D × K) is skinny (K is small next to the rows): OpenBLAS ran it at 45-90% of
its large-matrix rate on this project's AVX-512 host, and the (rows × K) product then makes a round trip through
memory before :func:`kvant.kernels.assign.top2_from_ip` reads it. Here a micro-kernel keeps R rows × NV 16-float
column vectors of x·cᵀ in registers (R·NV accumulators; per coordinate t: NV loads of cᵀ[t], R broadcasts of
x[i, t], R·NV fused multiply-adds), writes the R × K block to a scratch buffer that stays in L1, and hands it to
the top-2 pass of ``top2_from_ip`` (the same lane code): the same distances, clamping, tie rule and outputs as
the BLAS path, from products summed in coordinate order (one fused multiply-add per term) rather than in BLAS's
order.

The shapes (R, NV) are chosen so that the accumulators, the NV column vectors and one broadcast fit the 32
vector registers of AVX-512 and there are enough independent accumulators to cover the multiply-add latency:
(8, 1..3) for K <= 48 and (6, 4) per 64 columns above. Every group of rows reads all of cᵀ, so the kernel is
used only while cᵀ fits in half of L2, and (measured on whole fits) for the K above: :func:`fits`. On
AVX2 hosts (16 registers of 8 floats: a 16-float vector is two) the shapes are (6, 1) for K <= 16 and (2, 2) per 32
columns above, and :func:`fits` takes only K <= 16, where they beat OpenBLAS, or K <= 128 for a small E-step (bound by
overheads, not products); without AVX2 and FMA :data:`AVAILABLE` is False and callers keep BLAS.

For few centres on AVX-512 (K <= 14 and 17-28, :func:`coord_lanes`) the centre operand is turned around
(:func:`coord_operands`): coordinates in the lanes, one accumulator per (row, centre) pair, a shuffle tree per row
(see the comment above ``COORD_ROWS``). :func:`centre_operands` picks the operand; the kernels take either.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import amx_assign
from ._llvm import blas_avx512, half_rate_avx512, host_cpu_name, host_features, llvm_fn, splat
from .assign import _top2_lanes, store_top2
from .distance import exact_scaled_sq_dist_into, exact_sq_dist_into, sq_norms_into

_L = 16  # floats per vector


def _padded(k: int) -> int:
    """K rounded up to whole 16-float vectors: the column count of the padded cᵀ."""
    return -(-k // _L) * _L


def _l2_bytes() -> int:
    """This core's L2 cache size from sysfs (Linux), 1 MiB when it cannot be read."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            with open(f"{base}/{entry}/level") as f:
                if f.read().strip() != "2":
                    continue
            with open(f"{base}/{entry}/size") as f:
                size = f.read().strip().upper()
            unit = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
            return int(size.rstrip("KM")) * unit
    except (OSError, ValueError):
        pass
    return 1 << 20


# Each group of R rows reads its rows side by side, a few bytes of each per coordinate step, and every group starts on
# a new 4 KiB page: the hardware prefetcher, which does not cross pages, left each group waiting on its lines. The
# micro-kernel therefore prefetches the rows PREFETCH_GROUPS groups ahead into L2 (locality 2, prefetcht1), one line
# per coordinate step. AMD Zen 4 host, 2026-12-05, one thread, K = 10 (KP = 16) products of 1M × 128 rows from DRAM:
# 1.45 G 16-float multiply-adds/s without, 1.9-2.1 prefetching into L1 (locality 3) 1-6 groups ahead, 3.2-3.4 into
# L2 1-8 groups ahead (3.3-3.4 with the rows in cache). Whole fits (5 seeds, alternating processes): 1M×128 K=10
# 0.87-0.96x the time, K=64 0.88-0.94x, 200k×384 K=10 0.84-1.00x, Fashion-MNIST K=10/64 0.87-1.02x. On the Intel
# AVX-512 host an earlier trial (2026-12-02, prefetching into L1) had not helped: 360-406 against 327-372 ns per
# 384-d row, rows largely in its big L3. So only AMD Zen hosts (LLVM cpu "znver*") prefetch. Zen 3 (2026-12-06, one
# thread, the same K = 10 products, 6 rows × 16 lanes): 57-58 ns per 128-d row from DRAM with, 112-113 without; 55-58
# either way with the rows in L3.
PREFETCH_ROWS = host_cpu_name().startswith("znver")
PREFETCH_GROUPS = 2
PREFETCH_LOCALITY = 2
_FEATURES = host_features()
AVX512 = "avx512f" in _FEATURES
# AVX2 hosts (16 vector registers of 8 floats) take smaller micro-kernel shapes, see _products_avx2
AVAILABLE = AVX512 or {"avx2", "fma"} <= _FEATURES


# Every group of rows sweeps the whole padded cᵀ, so it must stay in L2: with cᵀ up to half of L2 the kernel beat
# BLAS + top2_from_ip on one thread at every measured shape (D 64-784, K 64-1024: 0.75-0.98× the time, 2 MiB L2);
# beyond it, it lost (D=384, K=1024: 1.32×; D=784, K=1024: 2.8×).
MAX_CT_BYTES = _l2_bytes() // 2
# Whole fits on two threads (same-process A/B, 2026-12-02) gained only up to K = 64: 3-9% at K = 10 and 64, but
# K = 256 was even at 1M×128 and 12% slower on Fashion-MNIST (784-d), K = 1024 (1M×128, cos) 8% slower.
# On AVX2 (AMD EPYC Zen 3, alternating fits in one process, 2026-12-03) the smaller shapes gained at K = 10 —
# digits 0.83× the BLAS path's time, 200k×384 anisotropic 0.86× — but lost at K = 64 against OpenBLAS's Zen
# kernels: 1M×128 1.03×, heavy-tailed 200k×384 1.29× (1.24× with 3 rows per group), Fashion-MNIST 1.44×. Re-checked
# there with the row prefetch (2026-12-06, MAX_K = 64 against 16, alternating, medians of 5): 1M×128 K=64 l2 1.01×,
# 200k×384 K=64 l2 and cos 1.16×.
# On AMD Zen 4 (kernels._llvm.HALF_RATE_AVX512), where OpenBLAS runs its SkylakeX kernels at ~176 GFLOP/s on two
# threads, the kernel keeps its lead up to K = 128: whole fits, same process, alternating, medians of 3 (2026-12-06),
# MAX_K 64 → 128: 100k×768 K=100 cos 707 → 602 ms, Fashion-MNIST K=128 cos 319 → 284, K=96 l2 413 → 399, 200k×384
# K=100 l2 315 → 290, 500k×64 K=128 120 → 114, 1M×128 Zipf K=96 202 → 196, 200k×256 K=128 cos 232 → 229; but at
# K = 200-256 it was even or up to 4% slower (1M×128 K=256 l2 454 → 471, cos 464 → 484), so 128.
# On AVX-512 hosts whose BLAS lacks AVX-512 kernels (kernels._llvm.blas_avx512: AMD Zen 5, where OpenBLAS 0.3.31 runs
# its Haswell kernels) the kernel wins at every K whose centre operand fits MAX_CT_BYTES: whole fits, same process,
# alternating, medians of 3 (2026-12-06), MAX_K 64 → 1,024-4,096: 1M×128 K=128 238 → 141 ms, K=256 447 → 285, K=512
# 1,145 → 768, K=1,024 3,228 → 2,151; 500k×64 K=256 196 → 130, K=1,024 1,542 → 1,333, K=2,048 5,654 → 4,638;
# 200k×384 K=100 192 → 149, K=256 492 → 308; 200k×256 cos K=128 219 → 137, K=512 762 → 460; 100k×768 cos K=100
# 235 → 136; Fashion-MNIST K=128 516 → 412. So MAX_K = 2,048 there, the largest K measured.
# On full-rate AVX-512 hosts without AMX whose BLAS has AVX-512 kernels (an Intel Xeon "emeraldrapids" whose
# hypervisor hides AMX, OpenBLAS 0.3.31 on its SkylakeX kernels) the kernel, improved since the 2026-12-02 A/B above,
# no longer loses beyond K = 64 while its operand fits MAX_CT_BYTES: whole fits, same process, alternating, medians
# of 3 (2 at K >= 512), 2026-12-07, MAX_K 64 → 2,048 (time ratio): 1M×128 K=96 cos 0.84-0.87×, K=128 0.90-0.96×,
# K=256 l2 0.86-0.88×, cos 0.91-0.99×, K=512 0.96-1.00×, K=1,024 0.98×; 500k×64 K=512 0.93-0.99×, K=1,024
# 0.96-0.99×; 200k×384 K=100 cos 0.83-0.84×, K=160 0.96-0.99×, K=256 0.93-1.03× (twice); 200k×256 K=256 cos
# 0.95-0.99×; 100k×768 K=100 0.94-0.96×; Fashion-MNIST K=256 0.99-1.01×. (Intel hosts with AMX keep 64: there the
# tiles take K >= 96, and the last A/B of the float32 paths was the one above.)
FULL_RATE_NO_AMX = AVX512 and not half_rate_avx512() and not amx_assign.AVAILABLE
BLAS_LACKS_AVX512 = AVX512 and not blas_avx512()
MAX_K = (2048 if BLAS_LACKS_AVX512 or FULL_RATE_NO_AMX else 128 if half_rate_avx512() else 64) if AVX512 else 16
# There the kernel also wins with centre operands beyond MAX_CT_BYTES (512 KiB on that host, L2 1 MiB), read from L3:
# same fits, MAX_CT_BYTES 512 KiB → 4 MiB: Fashion-MNIST K=256 1,590 → 1,350 ms, K=1,024 5,205 → 4,388; 1M×128
# K=2,048 12.5 → 11.4 s; 100k×768 K=256 565 → 421 ms, K=1,024 cos 3,650 → 3,001; 200k×384 K=1,024 4,474 → 3,989;
# 200k×256 K=2,048 cos 4,545 → 3,378. So such hosts take operands up to WIDE_CT_BYTES.
WIDE_CT_BYTES = 4 << 20


# A small E-step (one parallel region, see cluster.assign) is bound by overheads, not by its products: on AVX2
# hosts it takes the kernel up to K = 128 (SMALL_MAX_K; digits K=96/128 fits 0.73-0.88× the BLAS path's time, K=256
# 1.01-1.09×, docs/auto.md); on the Intel AVX-512/AMX host up to K = 256 (digits fits at K = 96, 128 and 192
# 0.63-0.70×; K=256 1.03-1.04× l2, 0.90-0.93× cos; 2026-12-04, docs/auto.md).
SMALL_MAX_K = 256 if AVX512 else 128


def fits(dim: int, k: int, small: bool = False) -> bool:
    """Whether :func:`direct_top2` should replace the GEMM for D = dim, K = k: on an AVX-512 or AVX2 host, K <= MAX_K
    (64 and 16; 128 on Zen 4; 2,048 where the BLAS lacks AVX-512 or the host has full-rate AVX-512 but no AMX; for a
    ``small`` E-step at least ``SMALL_MAX_K``, 256 and 128) and the centre operand (:func:`centre_operands`) within
    :data:`MAX_CT_BYTES` (``WIDE_CT_BYTES`` where the BLAS lacks AVX-512)."""
    size = _coord_rows(k) * _padded(dim) if coord_lanes(k) else dim * _padded(k)
    limit = WIDE_CT_BYTES if BLAS_LACKS_AVX512 else MAX_CT_BYTES
    return AVAILABLE and k <= (max(SMALL_MAX_K, MAX_K) if small else MAX_K) and size * 4 <= limit


def _row_ptr(builder, arr, ndim: int, r):
    """float* to row ``r`` (first index) of the array struct ``arr`` of ``ndim`` dimensions (byte strides)."""
    stride = cgutils.unpack_tuple(builder, arr.strides, ndim)[0]
    data = builder.bitcast(arr.data, ir.IntType(8).as_pointer())
    return builder.bitcast(builder.gep(data, [builder.mul(r, stride)]), ir.FloatType().as_pointer())


def _ip_block(R: int, NV: int):
    """Intrinsic ``(x, i0, ct, j0, g)``: g[r, j0 : j0 + 16·NV] = x[i0 + r] · ct[:, j0 : j0 + 16·NV] for r < R, each
    sum over the coordinates in order with fused multiply-adds. x (n, D) and ct (D, KP) float32 with unit-stride
    rows; g (R, KP) float32."""

    @intrinsic
    def ip_block(typingctx, x, i0, ct, j0, g):
        if not all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 2 for a in (x, ct, g)):
            return None
        sig = types.void(x, i0, ct, j0, g)

        def codegen(context, builder, signature, args):
            x_v, i0_v, ct_v, j0_v, g_v = args
            ax = context.make_array(signature.args[0])(context, builder, x_v)
            act = context.make_array(signature.args[2])(context, builder, ct_v)
            ag = context.make_array(signature.args[4])(context, builder, g_v)
            intp = i0_v.type
            f32 = ir.FloatType()
            vf = ir.VectorType(f32, _L)
            i8p = ir.IntType(8).as_pointer()
            n_coords = cgutils.unpack_tuple(builder, ax.shape, 2)[1]

            def row(a, r):  # float* to row r of a 2-D array
                return _row_ptr(builder, a, 2, r)

            def vec(ptr, v):  # <16 x float>* at ptr + 16·v
                return builder.bitcast(builder.gep(ptr, [ir.Constant(intp, _L * v)]), vf.as_pointer())

            xrows = [row(ax, builder.add(i0_v, ir.Constant(intp, r))) for r in range(R)]
            zero = ir.Constant(vf, [0.0] * _L)
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(NV)] for _ in range(R)]
            fma = llvm_fn(builder.module, "llvm.fma.v16f32", vf, [vf, vf, vf])
            if PREFETCH_ROWS:
                i32 = ir.IntType(32)
                prefetch = llvm_fn(builder.module, "llvm.prefetch.p0", ir.VoidType(), [i8p, i32, i32, i32])
                last_row = builder.sub(cgutils.unpack_tuple(builder, ax.shape, 2)[0], ir.Constant(intp, 1))
                last_coord = builder.sub(n_coords, ir.Constant(intp, 1))
            with cgutils.for_range(builder, n_coords) as loop:
                t = loop.index
                if PREFETCH_ROWS:  # row i0 + PREFETCH_GROUPS·R + (t mod R), line t div R (clamped to the array)
                    nxt = builder.add(i0_v, ir.Constant(intp, PREFETCH_GROUPS * R))
                    nxt = builder.add(nxt, builder.urem(t, ir.Constant(intp, R)))
                    nxt = builder.select(builder.icmp_signed(">", nxt, last_row), last_row, nxt)
                    off = builder.mul(builder.udiv(t, ir.Constant(intp, R)), ir.Constant(intp, 16))
                    off = builder.select(builder.icmp_signed(">", off, last_coord), last_coord, off)
                    addr = builder.bitcast(builder.gep(row(ax, nxt), [off]), i8p)
                    hint = [ir.Constant(i32, 0), ir.Constant(i32, PREFETCH_LOCALITY), ir.Constant(i32, 1)]
                    builder.call(prefetch, [addr, *hint])  # (read, locality, data cache)
                crow = builder.gep(row(act, t), [j0_v])
                cv = [builder.load(vec(crow, v), align=4) for v in range(NV)]
                for r in range(R):
                    xv = splat(builder, builder.load(builder.gep(xrows[r], [t])), vf)
                    for v in range(NV):
                        builder.store(builder.call(fma, [xv, cv[v], builder.load(acc[r][v])]), acc[r][v])
            for r in range(R):
                grow = builder.gep(row(ag, ir.Constant(intp, r)), [j0_v])
                for v in range(NV):
                    builder.store(builder.load(acc[r][v]), vec(grow, v), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return ip_block


_ip8x1, _ip8x2, _ip8x3 = _ip_block(8, 1), _ip_block(8, 2), _ip_block(8, 3)
_ip6x1, _ip6x2, _ip6x3, _ip6x4 = _ip_block(6, 1), _ip_block(6, 2), _ip_block(6, 3), _ip_block(6, 4)
_ip2x1, _ip2x2 = _ip_block(2, 1), _ip_block(2, 2)

_JIT = dict(cache=True, nogil=True, fastmath=False)


@numba.njit(**_JIT)
def _products_avx512(x, i0, ct, g):
    """g[:R] = x[i0 : i0 + R] · ct with the AVX-512 micro-kernel shapes described above (R = 8 for KP <= 48, else
    6)."""
    kp = ct.shape[1]
    if kp == 16:
        _ip8x1(x, i0, ct, 0, g)
    elif kp == 32:
        _ip8x2(x, i0, ct, 0, g)
    elif kp == 48:
        _ip8x3(x, i0, ct, 0, g)
    else:
        _blocks6(x, i0, ct, 0, kp // 16, g)


@numba.njit(inline="always", **_JIT)
def _blocks6(x, i0, ct, j0, nb, g):
    """g[:6, j0 : j0 + 16·nb] = x[i0 : i0 + 6] · ct[:, j0 : j0 + 16·nb]: the (6, 4) micro-kernel per 64 columns, then
    (6, 1..3) for the last 16-48."""
    end = j0 + 64 * (nb // 4)
    for j in range(j0, end, 64):
        _ip6x4(x, i0, ct, j, g)
    rest = nb % 4
    if rest == 3:
        _ip6x3(x, i0, ct, end, g)
    elif rest == 2:
        _ip6x2(x, i0, ct, end, g)
    elif rest == 1:
        _ip6x1(x, i0, ct, end, g)


@numba.njit(**_JIT)
def _products_avx2(x, i0, ct, g):
    """The same products with AVX2's 16 registers of 8 floats (a 16-float vector is two): 6 rows × 16 columns (12
    accumulators) for KP = 16, else 2 rows × 32 columns per pass (8 accumulators, 4 column registers) and 2 × 16 for
    a last 16."""
    kp = ct.shape[1]
    if kp == 16:
        _ip6x1(x, i0, ct, 0, g)
    else:
        for j0 in range(0, kp - kp % 32, 32):
            _ip2x2(x, i0, ct, j0, g)
        if kp % 32:
            _ip2x1(x, i0, ct, kp - 16, g)


_products = _products_avx512 if AVX512 else _products_avx2


# Products with the coordinates in the lanes. Above, each 16-float vector holds 16 centres, so K = 10 leaves 6 of 16
# lanes idle (K = 20: 12 of 32): the multiply-adds, which bound the kernel, are 1.6x what K needs. Here each
# accumulator holds one (row, centre) pair's partial sums over 16 coordinates: per 16 coordinates, COORD_ROWS row
# loads, one load per centre and COORD_ROWS multiply-adds per centre, every lane used; after the last coordinate a
# tree of shuffles and adds turns the accumulators of a row into one vector of its K products (4 levels, ~3K
# operations per row), stored into the same (R, KP) scratch as the centres-in-lanes kernel, so the top-2 pass is
# shared. Rows of D mod 16 coordinates end with a masked load; the centres are stored zero-padded to whole vectors
# (``coord_operands``), 64-byte aligned (unaligned centre loads made the in-cache rate vary 0.36-0.77 ms between
# runs). Summation order: 16 interleaved partial sums and the tree, inside the error bound certification assumes
# (kernels.assign.label_margins: any order). AMD Zen 4, one thread, K = 10 (2026-12-06): products from DRAM 1M×128
# 36.1 -> 26.1 ms, 200k×384 21.9 -> 14.4, Fashion-MNIST 70k×784 15.6 -> 11.8, 500k×64 9.3 -> 8.1; from cache
# 0.56 -> 0.36-0.47 ms. Two rows per group: 2·14 accumulators, two row vectors and a centre vector fit AVX-512's 32
# registers, so one block takes up to COORD_MAX_BLOCK centres (an even count: odd K gets a zero centre) and K = 17-28
# two blocks (K rounded up to a multiple of 4); K = 15-16 and 29-32 fill the centre lanes already. AVX2 (16 registers
# of 8 floats) would spill: there, and for larger K, the centres stay in the lanes.
COORD_ROWS = 2
COORD_GROUP = 16  # rows per call of the coordinate kernel (8 pairs), and per top-2 pass
COORD_MAX_BLOCK = 14
COORD_LANES = AVX512
# rows ahead that the coordinate kernel prefetches (into L2, on the hosts that prefetch): 16 rows, as the other kernel
# (2 groups of 8); 2-4 rows ahead left 1M×128 products at 41-52 ms against 26 (Zen 4, one thread)
COORD_PREFETCH_ROWS = 16


def coord_lanes(k: int) -> bool:
    """Whether K centres take the coordinates-in-lanes products (:func:`coord_operands`)."""
    return COORD_LANES and (1 <= k <= COORD_MAX_BLOCK or 17 <= k <= 2 * COORD_MAX_BLOCK)


def _coord_rows(k: int) -> int:
    """Centre rows of the coordinate operand: K rounded up to even (one block) or to a multiple of 4 (two)."""
    return k + k % 2 if k <= COORD_MAX_BLOCK else -(-k // 4) * 4


def _lane_sums(builder, vectors):
    """One 16-float vector whose lane j is the sum of the lanes of ``vectors[j]`` (up to 16; the other lanes 0): four
    levels of pairwise shuffles and adds (each level halves the lanes per source and doubles the sources per vector),
    then one permutation into source order."""
    i32 = ir.IntType(32)
    vf = ir.VectorType(ir.FloatType(), _L)
    zero = ir.Constant(vf, [0.0] * _L)
    cur = [(v, [j] * _L) for j, v in enumerate(vectors)] + [(None, [None] * _L)] * (_L - len(vectors))
    width = _L  # lanes per source in every vector of ``cur``
    while len(cur) > 1:
        groups, half = _L // width, width // 2
        nxt = []
        for (p, own_p), (q, own_q) in zip(cur[0::2], cur[1::2]):
            if p is None and q is None:
                nxt.append((None, [None] * _L))
                continue
            lo, hi, own = [], [], []
            for m in range(2 * groups):  # output group m: p's group m, then q's groups
                src, base, owners = (0, m * width, own_p) if m < groups else (_L, (m - groups) * width, own_q)
                for o in range(half):
                    lo.append(src + base + o)
                    hi.append(src + base + half + o)
                    own.append(owners[base + o])
            a = p if p is not None else zero
            b = q if q is not None else zero
            nxt.append((builder.fadd(builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, _L), lo)),
                                     builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, _L), hi))), own))
        cur, width = nxt, half
    total, own = cur[0]
    spare = [lane for lane in range(_L) if own[lane] is None]  # lanes holding 0
    perm = [own.index(j) if j in own else spare.pop() for j in range(_L)]
    return builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(i32, _L), perm))


def _no_unroll(builder, branch) -> None:
    """Mark ``branch`` (a loop's back edge) llvm.loop.unroll.disable: unrolled twice, the coordinate kernel's loop
    held two iterations' operands next to its accumulators and LLVM spilled them to the stack."""
    mod = builder.module
    disable = mod.add_metadata([ir.MetaDataString(mod, "llvm.loop.unroll.disable")])
    loop_id = mod.add_metadata([None, disable])
    loop_id.operands = (loop_id, disable)  # a loop ID refers to itself
    branch.set_metadata("llvm.loop", loop_id)


def _coord_block(kb: int, norms: bool = False):
    """Intrinsic ``(x, i0, c3, j0, g)``: g[r, j0 + j] = x[i0 + r] · c3[j0 + j] for r < g's rows (even), j < kb, and
    g[r, j0 + kb : j0 + 16] = 0, COORD_ROWS rows at a time. x (n, D) float32 with unit-stride rows; c3 (rows,
    ceil(D/16), 16) float32, zero beyond D, unit-stride rows; g (rows, >= j0 + 16) float32. (A whole group per call:
    with the centre count chosen per call of one row pair, the same products took 14.8 against 12.2 ms.)

    ``norms`` (kb <= NORM_MAX_BLOCK): g[r, j0 + kb] = ‖x[i0 + r]‖² in float32 as well, from one more accumulator per
    row summed like the products (16 lane sums of D/16 multiply-adds each, then the tree): relative error within
    γ(D/16 + 4), which :func:`kvant.kernels.assign.label_margins` covers with ``lane_norms``."""
    R = COORD_ROWS
    n_acc = kb + 1 if norms else kb

    @intrinsic
    def coord_block(typingctx, x, i0, c3, j0, g):
        if not (all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (x, c3, g))
                and (x.ndim, c3.ndim, g.ndim) == (2, 3, 2) and c3.layout == "C"):
            return None
        sig = types.void(x, i0, c3, j0, g)

        def codegen(context, builder, signature, args):
            x_v, i0_v, c_v, j0_v, g_v = args
            ax = context.make_array(signature.args[0])(context, builder, x_v)
            ac = context.make_array(signature.args[2])(context, builder, c_v)
            ag = context.make_array(signature.args[4])(context, builder, g_v)
            intp = i0_v.type
            f32, i32 = ir.FloatType(), ir.IntType(32)
            vf = ir.VectorType(f32, _L)
            i8p = ir.IntType(8).as_pointer()
            n_rows, dim = cgutils.unpack_tuple(builder, ax.shape, 2)

            def vec(ptr, off):  # <16 x float>* at ptr + off
                return builder.bitcast(builder.gep(ptr, [off]), vf.as_pointer())

            crows = [_row_ptr(builder, ac, 3, builder.add(j0_v, ir.Constant(intp, j))) for j in range(kb)]
            zero = ir.Constant(vf, [0.0] * _L)
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(n_acc)] for _ in range(R)]
            fma = llvm_fn(builder.module, "llvm.fma.v16f32", vf, [vf, vf, vf])
            masked_load = llvm_fn(builder.module, f"llvm.masked.load.v{_L}f32.p0v{_L}f32", vf,
                                  [vf.as_pointer(), i32, ir.VectorType(ir.IntType(1), _L), vf])
            if PREFETCH_ROWS:
                prefetch = llvm_fn(builder.module, "llvm.prefetch.p0", ir.VoidType(), [i8p, i32, i32, i32])
                hint = [ir.Constant(i32, 0), ir.Constant(i32, PREFETCH_LOCALITY), ir.Constant(i32, 1)]
                last_row = builder.sub(n_rows, ir.Constant(intp, 1))
            lanes = ir.Constant(intp, _L)
            n_full = builder.udiv(dim, lanes)

            def pair_products(g0):  # g rows g0, g0 + 1 (x rows i0 + g0, ...)
                first = builder.add(i0_v, g0)
                xrows = [_row_ptr(builder, ax, 2, builder.add(first, ir.Constant(intp, r))) for r in range(R)]
                if PREFETCH_ROWS:
                    ahead = [builder.add(first, ir.Constant(intp, COORD_PREFETCH_ROWS + r)) for r in range(R)]
                    ahead = [builder.select(builder.icmp_signed(">", a, last_row), last_row, a) for a in ahead]
                    ahead = [_row_ptr(builder, ax, 2, a) for a in ahead]  # (clamped to the last row)
                for r in range(R):
                    for j in range(n_acc):
                        builder.store(zero, acc[r][j])

                def step(off, mask):
                    if mask is None:
                        xv = [builder.load(vec(xrows[r], off), align=4) for r in range(R)]
                        if PREFETCH_ROWS:  # one line of each row COORD_PREFETCH_ROWS ahead per 16 coordinates
                            for a in ahead:
                                builder.call(prefetch, [builder.bitcast(builder.gep(a, [off]), i8p), *hint])
                    else:  # the last D mod 16 coordinates; zeros in the other lanes
                        xv = [builder.call(masked_load, [vec(xrows[r], off), ir.Constant(i32, 4), mask, zero])
                              for r in range(R)]
                    for j in range(kb):
                        cv = builder.load(vec(crows[j], off), align=4)  # (vmovups: as fast when aligned, safe if not)
                        for r in range(R):
                            builder.store(builder.call(fma, [xv[r], cv, builder.load(acc[r][j])]), acc[r][j])
                    if norms:
                        for r in range(R):
                            builder.store(builder.call(fma, [xv[r], xv[r], builder.load(acc[r][kb])]), acc[r][kb])

                entry = builder.block
                head = builder.append_basic_block("chunks.head")
                body = builder.append_basic_block("chunks.body")
                done = builder.append_basic_block("chunks.done")
                builder.branch(head)
                builder.position_at_end(head)
                t = builder.phi(intp)
                t.add_incoming(ir.Constant(intp, 0), entry)
                builder.cbranch(builder.icmp_signed("<", t, n_full), body, done)
                builder.position_at_end(body)
                step(builder.mul(t, lanes), None)
                t.add_incoming(builder.add(t, ir.Constant(intp, 1)), builder.block)
                _no_unroll(builder, builder.branch(head))
                builder.position_at_end(done)
                n16 = builder.mul(n_full, lanes)
                rem = builder.sub(dim, n16)
                with builder.if_then(builder.icmp_signed(">", rem, ir.Constant(intp, 0)), likely=False):
                    lane_ids = ir.Constant(ir.VectorType(intp, _L), list(range(_L)))
                    step(n16, builder.icmp_signed("<", lane_ids, splat(builder, rem, ir.VectorType(intp, _L))))
                for r in range(R):
                    out = _lane_sums(builder, [builder.load(acc[r][j]) for j in range(n_acc)])
                    grow = builder.gep(_row_ptr(builder, ag, 2, builder.add(g0, ir.Constant(intp, r))), [j0_v])
                    builder.store(out, builder.bitcast(grow, vf.as_pointer()), align=4)

            pairs = builder.udiv(cgutils.unpack_tuple(builder, ag.shape, 2)[0], ir.Constant(intp, R))
            with cgutils.for_range(builder, pairs) as pair:
                pair_products(builder.mul(pair.index, ir.Constant(intp, R)))
            return context.get_dummy_value()

        return sig, codegen

    return coord_block


_cb2, _cb4, _cb6, _cb8, _cb10, _cb12, _cb14 = (_coord_block(kb) for kb in range(2, COORD_MAX_BLOCK + 1, 2))
# One block of up to NORM_MAX_BLOCK centres also sums each row's squared norm (one more accumulator per row: 2·13
# accumulators, two rows and a centre fit the 32 registers; 14 would spill). The fused final pass then skips its
# float64 norm loop: 500k×128 rows at K = 10, one thread, 33.2 → 28.0 ms without it (Zen 4, 2026-12-06).
NORM_MAX_BLOCK = 12
_cbn2, _cbn4, _cbn6, _cbn8, _cbn10, _cbn12 = (_coord_block(kb, norms=True) for kb in range(2, NORM_MAX_BLOCK + 1, 2))


# (inlined into the row-group loops, with the dispatch on the block size; see _coord_block)
@numba.njit(inline="always", **_JIT)
def _coord_block_of(x, i0, c3, j0, kb, g):
    if kb == 2:
        _cb2(x, i0, c3, j0, g)
    elif kb == 4:
        _cb4(x, i0, c3, j0, g)
    elif kb == 6:
        _cb6(x, i0, c3, j0, g)
    elif kb == 8:
        _cb8(x, i0, c3, j0, g)
    elif kb == 10:
        _cb10(x, i0, c3, j0, g)
    elif kb == 12:
        _cb12(x, i0, c3, j0, g)
    elif kb == 14:
        _cb14(x, i0, c3, j0, g)
    else:  # (unreachable through _check_operands)
        raise ValueError("coordinate-lane block size must be even, 2-14")


@numba.njit(inline="always", **_JIT)
def _coord_products(x, i0, c3, g):
    """g[:, :rows of c3] = x[i0 : i0 + g's rows] · c3 (one block of centres, or two halves)."""
    kc = c3.shape[0]
    if kc <= COORD_MAX_BLOCK:
        _coord_block_of(x, i0, c3, 0, kc, g)
    else:
        _coord_block_of(x, i0, c3, 0, kc // 2, g)
        _coord_block_of(x, i0, c3, kc // 2, kc // 2, g)


@numba.njit(inline="always", **_JIT)
def _coord_norm_products(x, i0, c3, g):
    """g[:, :kb] = x[i0 : i0 + g's rows] · c3 and g[:, kb] = the rows' squared norms (one block, kb <= 12)."""
    kb = c3.shape[0]
    if kb == 2:
        _cbn2(x, i0, c3, 0, g)
    elif kb == 4:
        _cbn4(x, i0, c3, 0, g)
    elif kb == 6:
        _cbn6(x, i0, c3, 0, g)
    elif kb == 8:
        _cbn8(x, i0, c3, 0, g)
    elif kb == 10:
        _cbn10(x, i0, c3, 0, g)
    elif kb == 12:
        _cbn12(x, i0, c3, 0, g)
    else:  # (unreachable through lane_norm_column)
        raise ValueError("norms come with one coordinate-lane block of 2-12 centres")


def lane_norm_column(ops) -> int:
    """The column of the product tile where the fused pass finds each row's float32 squared norm (see the overload
    below, which compiled code calls), or −1."""
    return ops.shape[0] if ops.ndim == 3 and ops.shape[0] <= NORM_MAX_BLOCK else -1


@overload(lane_norm_column, jit_options=_JIT)
def _lane_norm_column_impl(ops):
    """The column of the product tile where :func:`_products_with_norms` leaves each row's float32 squared norm: the
    centre rows of a one-block coordinate operand of <= NORM_MAX_BLOCK centres; −1 for other operands (their
    products come without norms)."""
    if isinstance(ops, types.Array) and ops.ndim == 3:
        return lambda ops: ops.shape[0] if ops.shape[0] <= NORM_MAX_BLOCK else -1
    return lambda ops: -1


def _products_with_norms(x, i0, ops, g):  # pragma: no cover - replaced in compiled code by the overload below
    raise NotImplementedError


@overload(_products_with_norms, jit_options=_JIT)
def _products_with_norms_impl(x, i0, ops, g):
    """:func:`_coord_norm_products` for operands where :func:`lane_norm_column` is >= 0 (the caller checks)."""
    if isinstance(ops, types.Array) and ops.ndim == 3:
        return lambda x, i0, ops, g: _coord_norm_products(x, i0, ops, g)
    return lambda x, i0, ops, g: _products(x, i0, ops, g)


def _products_any(x, i0, ops, g):  # pragma: no cover - replaced in compiled code by the overload below
    raise NotImplementedError


@overload(_products_any, jit_options=_JIT)
def _products_any_impl(x, i0, ops, g):
    """The products of either centre operand: 3-D ``coord_operands`` or 2-D ``padded_centroids``."""
    if isinstance(ops, types.Array) and ops.ndim == 3:
        return lambda x, i0, ops, g: _coord_products(x, i0, ops, g)
    return lambda x, i0, ops, g: _products(x, i0, ops, g)


def _check_operands(dim, ops, cn_padded):  # pragma: no cover - replaced in compiled code by the overload below
    raise NotImplementedError


@overload(_check_operands, jit_options=_JIT)
def _check_operands_impl(dim, ops, cn_padded):
    """Refuse centre operands the kernels would read or write out of bounds with (``direct_top2*`` are public): the
    shapes ``coord_operands`` or ``padded_centroids`` build for D = ``dim``, and norms of matching width."""
    if isinstance(ops, types.Array) and ops.ndim == 3:
        def check_coord(dim, ops, cn_padded):
            rows = ops.shape[0]
            one = 2 <= rows <= COORD_MAX_BLOCK and rows % 2 == 0
            two = 2 * COORD_MAX_BLOCK >= rows > 16 and rows % 4 == 0
            if not ((one and cn_padded.shape[0] == 16) or (two and cn_padded.shape[0] == 32)) or (
                    ops.shape[2] != 16 or ops.shape[1] * 16 < dim or ops.shape[1] * 16 >= dim + 16):
                raise ValueError("centre operands do not match: build them with coord_operands")
        return check_coord

    def check_padded(dim, ops, cn_padded):
        if ops.shape[0] != dim or ops.shape[1] % 16 != 0 or cn_padded.shape[0] != ops.shape[1]:
            raise ValueError("centre operands do not match: build them with padded_centroids")
    return check_padded


def _rows_per_group(ops):  # pragma: no cover - replaced in compiled code by the overload below
    raise NotImplementedError


@overload(_rows_per_group, jit_options=_JIT)
def _rows_per_group_impl(ops):
    """Rows per group of either operand's products."""
    if isinstance(ops, types.Array) and ops.ndim == 3:
        return lambda ops: COORD_GROUP
    return lambda ops: _group_rows(ops.shape[1])


@numba.njit(**_JIT)
def _top2_rows(g, rows, cn_padded, x_sqnorms, row_scale, i0, labels, d1, d2):
    """The lane top-2 of ``top2_from_ip`` on g's first ``rows`` rows, written to data rows i0.. (in place: slicing
    the outputs every few rows cost more than the reduction). The padded columns' norms are +inf, so their distance
    is +inf and a real column always wins a tie with them (the smaller index): with every column in the lanes the
    results are those of ``top2_from_ip`` on the K real columns, K < 16 included."""
    kp = cn_padded.shape[0]
    for r in range(rows):
        f = np.float32(1.0) if row_scale is None else row_scale[i0 + r]
        best, run, arg = _top2_lanes(g, r, cn_padded, x_sqnorms[i0 + r], f, kp)
        store_top2(labels, d1, d2, i0 + r, best, run, arg)


# The row-group loops run without Numba's reference counting (``_nrt=False``; their scratch comes from the caller):
# with it, every call in the loop that takes arrays paid atomic increfs and decrefs, 8-12% of a final assignment
# (1M×128 at K = 10 and 64, same-process A/B, 2026-12-03; identical outputs).
_JIT_RAW = dict(_JIT, _nrt=False)


@numba.njit(inline="always", **_JIT)
def _group_rows(kp):
    """Rows per group of :func:`_products` for KP padded centres: on AVX-512 its micro-kernels take 8 rows up to 48
    columns, 6 above; on AVX2 6 rows at 16 columns, 2 above."""
    if AVX512:
        return 8 if kp <= 48 else 6
    return 6 if kp == 16 else 2


@numba.njit(inline="always", **_JIT_RAW)
def _copy_rows(x, i0, count, xt):
    """xt[:count] = x[i0 : i0 + count] (the last partial group, into the zero-padded scratch ``xt``)."""
    for r in range(count):
        for t in range(x.shape[1]):
            xt[r, t] = x[i0 + r, t]


@numba.njit(**_JIT_RAW)
def _direct_top2_into(x, ct, cn_padded, x_sqnorms, labels, d1, d2, row_scale, g, xt):
    n = x.shape[0]
    R = g.shape[0]
    full = n - n % R
    for i0 in range(0, full, R):
        _products_any(x, i0, ct, g)
        _top2_rows(g, R, cn_padded, x_sqnorms, row_scale, i0, labels, d1, d2)
    if full < n:  # the last n mod R rows, through a zero-padded copy
        _copy_rows(x, full, n - full, xt)
        _products_any(xt, 0, ct, g)
        _top2_rows(g, n - full, cn_padded, x_sqnorms, row_scale, full, labels, d1, d2)


@numba.njit(**_JIT)
def direct_top2(x, ct, cn_padded, x_sqnorms, labels, d1, d2, row_scale=None):
    """:func:`kvant.kernels.assign.top2_from_ip` of ``x @ cᵀ`` without the product matrix.

    x (n, D) float32 with unit-stride rows; ``ct, cn_padded = centre_operands(c, ‖c‖²)`` (or ``padded_centroids``);
    ``row_scale`` as in ``top2_from_ip``. Outputs as ``top2_from_ip`` writes them, from products summed in coordinate
    order (centres in the lanes) or in 16 interleaved partial sums (coordinates in the lanes)."""
    _check_operands(x.shape[1], ct, cn_padded)
    R = _rows_per_group(ct)
    tail_rows = R if x.shape[0] % R else 0  # the zero-padded copy is needed only for a last partial group
    # (zeros: the coordinate kernel's second block leaves the columns after it as they are)
    _direct_top2_into(x, ct, cn_padded, x_sqnorms, labels, d1, d2, row_scale,
                      np.zeros((R, cn_padded.shape[0]), np.float32), np.zeros((tail_rows, x.shape[1]), np.float32))


@numba.njit(**_JIT_RAW)
def _direct_top2_exact_into(x, ct, cn_padded, centroids, labels, d1, d2, exact_sq, unit_rows, safe_lo, safe_hi, g, xn,
                            factor, scale32, xt):
    n = x.shape[0]
    R = g.shape[0]
    nc = -1 if unit_rows else lane_norm_column(ct)  # >= 0: the products bring float32 norms (column nc of g)
    for i0 in range(0, n, R):
        i1 = min(n, i0 + R)
        if nc >= 0:  # (its own loop body: merged with the path below, 500k×128 K = 10 read 30.2 against 28.2 ms)
            if i1 - i0 == R:
                _products_with_norms(x, i0, ct, g)
            else:  # the last n mod R rows, through a zero-padded copy
                _copy_rows(x, i0, i1 - i0, xt)
                _products_with_norms(xt, 0, ct, g)
            for i in range(i0, i1):
                xn[i] = g[i - i0, nc]
                # the column's norm is +inf, so its distance is +inf once its product is 0; left as ‖x‖², a row of
                # ‖x‖² > FLT_MAX/2 made it inf − inf = NaN, which the top-2 reads as distance 0 (a review, 2026-12-06)
                g[i - i0, nc] = 0.0
                if not xn[i] < np.inf:  # NaN or inf in the row (or a float32 norm overflow): the caller's path
                    return False
            _top2_rows(g, i1 - i0, cn_padded, xn, None, i0, labels, d1, d2)
            exact_sq_dist_into(x, i0, i1, centroids, labels, exact_sq)
            continue
        if not unit_rows:
            sq_norms_into(x, i0, i1, xn)
            for i in range(i0, i1):
                if not xn[i] < np.inf:  # NaN or inf in the row (or a float32 norm overflow): the caller's path
                    return False
        else:
            sq_norms_into(x, i0, i1, factor)  # the float64 norms first: every path scales unit rows by 1/√ of them
            for i in range(i0, i1):
                xn[i] = np.float32(factor[i])
                if not (xn[i] > safe_lo and xn[i] < safe_hi):
                    return False
                f = 1.0 / np.sqrt(factor[i])
                xn[i] = np.float32(factor[i] * f * f)  # ‖x/‖x‖‖² (1 up to rounding)
                factor[i] = f
                scale32[i] = np.float32(f)
        if i1 - i0 == R:
            _products_any(x, i0, ct, g)
        else:  # the last n mod R rows, through a zero-padded copy
            _copy_rows(x, i0, i1 - i0, xt)
            _products_any(xt, 0, ct, g)
        _top2_rows(g, i1 - i0, cn_padded, xn, scale32 if unit_rows else None, i0, labels, d1, d2)
        if unit_rows:
            exact_scaled_sq_dist_into(x, i0, i1, centroids, labels, factor, exact_sq)
        else:
            exact_sq_dist_into(x, i0, i1, centroids, labels, exact_sq)
    return True


@numba.njit(**_JIT)
def direct_top2_exact(x, ct, cn_padded, centroids, labels, d1, d2, exact_sq, unit_rows, safe_lo, safe_hi):
    """:func:`direct_top2` with each row's norm computed just before its products and its exact float64 squared
    distance to the label just after, a few rows at a time: the final assignment's three passes over a block in one,
    each row read from memory once and then used from L1. The same operations as ``sq_norms_serial``,
    ``direct_top2`` and ``exact_sq_dist_rows`` in turn, so the same results — except for l2 rows (no ``unit_rows``)
    on a coordinate operand of <= NORM_MAX_BLOCK centres (:func:`lane_norm_column`), whose squared norms come with
    the products, summed in float32: there ``d1``/``d2`` differ from the float64-norm path's by that rounding
    (:func:`kvant.kernels.assign.label_margins` with ``lane_norms`` bounds it) and ``exact_sq`` is the same.

    ``unit_rows``: assign x_i/‖x_i‖ as ``assign_top2`` does without a normalised copy (products scaled by 1/‖x_i‖,
    ``exact_sq`` of the unit row); returns False, leaving the outputs partly written, as soon as a row's squared norm
    is outside (safe_lo, safe_hi) — the caller then normalises the block explicitly. Without ``unit_rows`` it returns
    False as soon as a row's squared norm is not finite (a NaN or inf in the row, or float32 overflow). So True means
    every row of x is finite: callers that defer the NaN/inf check to this pass rely on it."""
    n, dim = x.shape
    _check_operands(dim, ct, cn_padded)
    kp = cn_padded.shape[0]
    R = _rows_per_group(ct)
    m = n if unit_rows else 0
    tail_rows = R if n % R else 0  # the zero-padded copy is needed only for a last partial group
    return _direct_top2_exact_into(x, ct, cn_padded, centroids, labels, d1, d2, exact_sq, unit_rows, safe_lo, safe_hi,
                                   np.zeros((R, kp), np.float32), np.empty(n, np.float32), np.empty(m, np.float64),
                                   np.empty(m, np.float32), np.zeros((tail_rows, dim), np.float32))


@numba.njit(parallel=True, **_JIT)
def direct_top2_parallel(x, rows, ct, cn_padded, x_sqnorms, labels, d1, d2, block_rows):
    """:func:`direct_top2` over row blocks of ``block_rows`` in one parallel region (Numba's threads): of x's rows
    ``rows`` (int64, listed order; outputs and ``x_sqnorms`` per listed row), or of every row when ``rows`` is
    empty. One region costs a few microseconds where handing blocks to Python threads costs tens, which decides
    the E-steps of small inputs (a 2,560-row sample was one block on one thread)."""
    _check_operands(x.shape[1], ct, cn_padded)  # (before the parallel region; each block's call checks again)
    n = x.shape[0] if rows.shape[0] == 0 else rows.shape[0]
    for b in numba.prange((n + block_rows - 1) // block_rows):
        s = b * block_rows
        e = min(n, s + block_rows)
        xb = x[s:e] if rows.shape[0] == 0 else x[rows[s:e]]
        direct_top2(xb, ct, cn_padded, x_sqnorms[s:e], labels[s:e], d1[s:e], d2[s:e])


@numba.njit(**_JIT)
def fill_padded(centroids, c_sqnorms, ct, cn_padded):
    """Write :func:`padded_centroids`' operands into ``ct`` (D, KP) and ``cn_padded`` (KP,): cᵀ with zero columns
    after K, the norms with +inf after K (callable from compiled loops that reuse the buffers)."""
    k = centroids.shape[0]
    for t in range(ct.shape[0]):
        for j in range(ct.shape[1]):
            ct[t, j] = centroids[j, t] if j < k else np.float32(0.0)
    for j in range(cn_padded.shape[0]):
        cn_padded[j] = c_sqnorms[j] if j < k else np.float32(np.inf)


def padded_centroids(centroids: np.ndarray, c_sqnorms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cᵀ as a (D, KP) float32 C-contiguous array with zero columns after K, the norms padded with +inf to KP),
    KP = 16·ceil(K/16): centre operands :func:`direct_top2` reads (centres in the lanes; any K)."""
    k, dim = centroids.shape
    ct = np.empty((dim, _padded(k)), np.float32)
    cn = np.empty(_padded(k), np.float32)
    fill_padded(np.asarray(centroids, np.float32), np.asarray(c_sqnorms, np.float32), ct, cn)
    return ct, cn


@numba.njit(**_JIT)
def fill_coord(centroids, c_sqnorms, c3, cn_padded):
    """Write :func:`coord_operands`' operands into ``c3`` (rows, ceil(D/16), 16) and ``cn_padded`` (KP,): the centres
    zero-padded to whole vectors and zero centres after K, the norms with +inf after K."""
    k, dim = centroids.shape
    for j in range(c3.shape[0]):
        for t in range(c3.shape[1]):
            for lane in range(16):
                col = t * 16 + lane
                c3[j, t, lane] = centroids[j, col] if j < k and col < dim else np.float32(0.0)
    for j in range(cn_padded.shape[0]):
        cn_padded[j] = c_sqnorms[j] if j < k else np.float32(np.inf)


def coord_operands(centroids: np.ndarray, c_sqnorms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the centres as a (rows, ceil(D/16), 16) float32 array, 64-byte aligned, zero beyond D and zero centres after
    K up to :func:`_coord_rows`, the norms padded with +inf to KP = 16·ceil(K/16)): the operands of the
    coordinates-in-lanes products (K <= 2·COORD_MAX_BLOCK)."""
    k, dim = centroids.shape
    if not (1 <= k <= COORD_MAX_BLOCK or 17 <= k <= 2 * COORD_MAX_BLOCK):  # (two blocks write 16 columns after the
        raise ValueError(f"coordinate-lane operands take 1-14 or 17-28 centres, not {k}")  # first: KP must be 32)
    rows, chunks = _coord_rows(k), _padded(dim) // _L
    buf = np.empty(rows * chunks * _L + _L, np.float32)
    start = (-buf.ctypes.data % 64) // 4  # (numpy aligns to 16 bytes: a whole number of floats)
    c3 = buf[start : start + rows * chunks * _L].reshape(rows, chunks, _L)
    cn = np.empty(_padded(k), np.float32)
    fill_coord(np.asarray(centroids, np.float32), np.asarray(c_sqnorms, np.float32), c3, cn)
    return c3, cn


def centre_operands(centroids: np.ndarray, c_sqnorms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The centre operands :func:`direct_top2` and :func:`direct_top2_exact` run fastest with for K centres:
    :func:`coord_operands` where :func:`coord_lanes`, else :func:`padded_centroids`."""
    if coord_lanes(centroids.shape[0]):
        return coord_operands(centroids, c_sqnorms)
    return padded_centroids(centroids, c_sqnorms)


def fill_operands(centroids, c_sqnorms, ops, cn_padded):  # pragma: no cover - replaced in compiled code
    raise NotImplementedError


@overload(fill_operands, jit_options=_JIT)
def _fill_operands_impl(centroids, c_sqnorms, ops, cn_padded):
    """Refill either operand (:func:`fill_coord` or :func:`fill_padded`) from compiled loops that reuse it."""
    if isinstance(ops, types.Array) and ops.ndim == 3:
        return lambda centroids, c_sqnorms, ops, cn_padded: fill_coord(centroids, c_sqnorms, ops, cn_padded)
    return lambda centroids, c_sqnorms, ops, cn_padded: fill_padded(centroids, c_sqnorms, ops, cn_padded)


__all__ = ["AVAILABLE", "AVX512", "MAX_CT_BYTES", "MAX_K", "centre_operands", "coord_lanes", "coord_operands",
           "direct_top2", "direct_top2_exact", "direct_top2_parallel", "fill_coord", "fill_operands", "fill_padded",
           "fits", "padded_centroids"]
