"""Product-quantization kernels: distance tables, PQ encoding, 8-bit ADC scans and the 4-bit FastScan.

Pure functions on clean, C-contiguous arrays (float32 unless stated). No validation: the public layer
(``kvant.quant`` / ``kvant.index``) checks shapes, dtypes, finiteness and ``k`` before calling.

Interface (agreed with ``kvant.quant`` / ``kvant.index``):

- ``distance_tables_l2(queries (nq, dim), codebooks (m, ksub, dsub)) -> (nq, m, ksub)``: Σ(q−c)² computed
  directly (no ‖q‖²+‖c‖²−2q·c shortcut), summed over the sub-vector in index order in float32.
- ``ip_tables(queries, codebooks) -> (nq, m, ksub)``: per-sub-vector inner products.
- ``adc_distances(tables (nq, m, ksub), codes uint8 (n, m)) -> (nq, n)``: full ADC sums (small n only).
- ``adc_search(tables, codes, k) -> (dist (nq, k) float32, idx (nq, k) int64)``: fused scan + top-k of the
  smallest sums, ascending, ties broken by smaller idx, padded with inf / -1 when n < k. For ``ip`` the caller
  passes negated tables. Every ADC sum in this module is Σ_j tables[q, j, code_j] accumulated in float32 in
  order j = 0..m-1, so ``adc_distances``, ``adc_search`` and ``fastscan_search`` return bit-identical values.
- ``pq_encode(x (n, dim), codebooks) -> codes uint8 (n, m)``: nearest codeword per sub-vector (direct
  squared distances Σ(x−c)², never the expanded form; ties -> smaller codeword id). For even ``ksub`` each
  term is accumulated with a fused multiply-add (one rounding instead of two), see :func:`_enc_lanes`.
- ``pq_centroid_sums(x, codes, ksub) -> (sums float64 (m, ksub, dsub), counts int64 (m, ksub))``: the k-means
  M-step of all sub-quantizers in one pass over the rows (fixed row chunks in parallel, merged in order).
- ``pack_codes_4bit(codes uint8 (n, m), values < 16) -> packed uint8 (nblocks, mp // 2, 32)`` and
  ``fastscan_search(tables (nq, m, 16), packed, n, m, k, rerank) -> (dist, idx)``.

INTERFACE ADDITION (backward compatible): ``fastscan_search(..., rerank=0)`` selects the *exact* mode: the
shortlist is every row whose quantised sum is within the proven quantisation-error bound of the k-th best, so
the result equals ``adc_search`` on the unpacked codes (up to ties). ``rerank >= 1`` is the fixed-size
shortlist of ``rerank * k`` rows by quantised sum described in the interface.

4-bit packed layout
-------------------
Rows are grouped in blocks of 32 (the last block padded with code 0) and sub-quantizers in pairs (``mp`` = m
rounded up to even; a padding sub-quantizer has code 0 and an all-zero table). Within a block the layout is
sub-quantizer-pair-major: ``packed[b, p, r] = code[32 b + r, 2 p] | code[32 b + r, 2 p + 1] << 4``. One block
is ``16 * mp`` bytes, m / 2 bytes per row like FAISS's 4-bit codes.

FastScan arithmetic
-------------------
Per query, each sub-quantizer table is quantised to integers in [0, qmax] (qmax = min(255, 65535 // mp), so
the u16 accumulator cannot overflow): ``lut[j, v] = round((t[j, v] - min_j) / scale)`` with one shared
``scale = max_j (max_j - min_j) / qmax`` (offsets ``min_j`` are per sub-quantizer; their sum is a constant per
query and does not change the order). Each quantised entry is within scale / 2 of the true value, so a row's
true sum lies within ±m·scale/2 of ``Σ min_j + scale · acc``. The scan (:func:`_fs_block`, a Numba intrinsic)
does the 16-entry lookups of a 32-row block with ``vpshufb`` on AVX2 hosts (32 lookups per instruction, a
portable per-lane IR fallback elsewhere); on AVX-512BW hosts :func:`_fs_block2` takes two blocks per pass with
512-bit shuffles (64 lookups per instruction; +27-30% queries/s at 1M codes, PQ32x4, on the Intel host). It
accumulates in u16 registers (even and odd rows in the low and high
bytes of 16-bit lanes, no widening per pair), and returns a bitmask of the rows at or below the current
threshold so only candidate rows are visited. The shortlist is re-scored with the exact float32 ADC sum, so
returned distances are exact ADC distances. In shortlist mode ``FASTSCAN_GROUP`` queries scan each 256 KB tile
of blocks in turn, so the codes stream from memory once per group instead of once per query (1M PQ32x4 codes,
2,000 queries, this host: 856 -> 1,468 queries/s, identical results).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._llvm import host_features, llvm_fn, splat
from .direct_topk import CAPACITY as RESERVOIR_CAPACITY
from .direct_topk import _append, best_packed, capacity, finish_lists
from .topk import ranks_before, select_u64

__all__ = [
    "distance_tables_l2",
    "ip_tables",
    "adc_distances",
    "adc_search",
    "pq_encode",
    "pq_centroid_sums",
    "pack_codes_4bit",
    "unpack_codes_4bit",
    "fastscan_search",
    "quantize_luts",
]

_JIT = dict(cache=True, nogil=True, fastmath=False)

# queries per pass over the codes (query blocking): their tables are interleaved so that one 16-float vector
# load serves all of them for a code (one 512-bit load on AVX-512, two 256-bit loads on AVX2)
_QB = 16
# Below this many queries adc_search scans query by query (_adc_search_few_kernel): the 16-query kernel costs one
# 16-lane add chain per code row whatever the number of queries in the block. One query over 1M codes (m = 16, 2
# threads, Intel host, 2026-12-04): 3.4 ms against 5.1; two queries: 6.8 against 5.1, so only single queries.
ADC_FEW_QUERIES = 2


# ----------------------------------------------------------------------------------------------------------
# distance tables and encoding
# ----------------------------------------------------------------------------------------------------------


@numba.njit(inline="always", **_JIT)
def _l2_table(queries, cbt, out, q, j):
    # cbt: (m, dsub, ksub) — codebooks transposed so the inner loop runs over codewords (vectorises).
    dsub, ksub = cbt.shape[1], cbt.shape[2]
    acc = out[q, j]
    base = j * dsub
    xv = queries[q, base]
    for c in range(ksub):
        diff = xv - cbt[j, 0, c]
        acc[c] = diff * diff
    for d in range(1, dsub):
        xv = queries[q, base + d]
        for c in range(ksub):
            diff = xv - cbt[j, d, c]
            acc[c] += diff * diff


# Sub-tables of at most this many codewords (4-bit PQ's 16) are computed TABLE_LANES codewords at a time in vector
# registers, TABLE_UNITS such runs side by side (_l2_lanes4): the loop above keeps its running sums in memory, one
# store-to-load round trip per coordinate, and with 16 codewords nothing else runs meanwhile. The same operations in
# the same order, so the same bits. Intel host without AMX, 2026-12-07 (µs per call, loop / lanes): 4 × 784-d
# m = 16 (Fashion-MNIST's PQ16x4) 12.5 / 3.7, 1 query 3.5 / 1.5; 4 × 128-d m = 32 3.1 / 1.3; 64 codewords 22.5 /
# 13.8 (4 × 784-d); at 256 codewords 12.1 / 13.7 (4 × 128-d m = 16), so those keep the loop.
TABLE_LANES_MAX_KSUB = 64
TABLE_LANES = 16
TABLE_UNITS = 4


@intrinsic
def _l2_lanes4(typingctx, queries, q, cbt, out, j0, c0, j1, c1, j2, c2, j3, c3):
    """For each of the four units (j, c): out[q, j, c:c + 16] = Σ_d (queries[q, j·dsub + d] − cbt[j, d, c:c + 16])²
    in float32, summed in d order from d = 0 as :func:`_l2_table` sums (the same bits), the four runs' sums in vector
    registers side by side. C-contiguous float32 arrays; ``cbt`` is (m, dsub, ksub) with ksub a multiple of 16."""
    ok = all(isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C" for a in (queries, cbt, out))
    if not (ok and queries.ndim == 2 and cbt.ndim == 3 and out.ndim == 3):
        return None
    sig = types.void(queries, q, cbt, out, j0, c0, j1, c1, j2, c2, j3, c3)

    def codegen(context, builder, signature, args):
        vf = ir.VectorType(ir.FloatType(), TABLE_LANES)
        intp = context.get_value_type(types.intp)
        a_q = context.make_array(signature.args[0])(context, builder, args[0])
        a_cb = context.make_array(signature.args[2])(context, builder, args[2])
        a_out = context.make_array(signature.args[3])(context, builder, args[3])
        dim = cgutils.unpack_tuple(builder, a_q.shape, 2)[1]
        m, dsub, ksub = cgutils.unpack_tuple(builder, a_cb.shape, 3)
        qi = context.cast(builder, args[1], signature.args[1], types.intp)
        qrow = builder.gep(a_q.data, [builder.mul(qi, dim)])
        orow = builder.gep(a_out.data, [builder.mul(qi, builder.mul(m, ksub))])
        units = []  # (the unit's query coordinates, its codewords' first coordinate, its output)
        for u in range(TABLE_UNITS):
            j = context.cast(builder, args[4 + 2 * u], signature.args[4 + 2 * u], types.intp)
            c = context.cast(builder, args[5 + 2 * u], signature.args[5 + 2 * u], types.intp)
            units.append((builder.gep(qrow, [builder.mul(j, dsub)]),
                          builder.gep(a_cb.data, [builder.add(builder.mul(builder.mul(j, dsub), ksub), c)]),
                          builder.gep(orow, [builder.add(builder.mul(j, ksub), c)])))

        def term(u, d):  # (x_d − c_d)², rounded as the scalar loop rounds it: a subtraction, then a product
            xp, cp, _ = units[u]
            x = splat(builder, builder.load(builder.gep(xp, [d])), vf)
            cv = builder.load(builder.bitcast(builder.gep(cp, [builder.mul(d, ksub)]), vf.as_pointer()), align=4)
            diff = builder.fsub(x, cv)
            return builder.fmul(diff, diff)

        accs = [cgutils.alloca_once_value(builder, term(u, ir.Constant(intp, 0))) for u in range(TABLE_UNITS)]
        with cgutils.for_range(builder, builder.sub(dsub, ir.Constant(intp, 1))) as loop:
            d = builder.add(loop.index, ir.Constant(intp, 1))
            for u in range(TABLE_UNITS):
                builder.store(builder.fadd(builder.load(accs[u]), term(u, d)), accs[u])
        for u in range(TABLE_UNITS):
            builder.store(builder.load(accs[u]), builder.bitcast(units[u][2], vf.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always", **_JIT)
def _l2_lanes_group(queries, cbt, out, q, g):
    """Group ``g`` of query ``q``'s units (sub-table j, first codeword c) in order j, c: units 4g .. 4g + 3, a short
    last group repeating its last unit (the same values written twice)."""
    per = cbt.shape[2] // TABLE_LANES
    last = cbt.shape[0] * per - 1
    u0 = TABLE_UNITS * g
    u1 = min(last, u0 + 1)
    u2 = min(last, u0 + 2)
    u3 = min(last, u0 + 3)
    _l2_lanes4(queries, q, cbt, out, u0 // per, (u0 % per) * TABLE_LANES, u1 // per, (u1 % per) * TABLE_LANES,
               u2 // per, (u2 % per) * TABLE_LANES, u3 // per, (u3 % per) * TABLE_LANES)


@numba.njit(inline="always", **_JIT)
def _lanes_groups(cbt):
    """Unit groups per query for :func:`_l2_lanes_group`, or 0 where the sub-tables keep the loop."""
    ksub = cbt.shape[2]
    if ksub > TABLE_LANES_MAX_KSUB or ksub % TABLE_LANES or cbt.shape[1] == 0:
        return 0
    return -(-(cbt.shape[0] * (ksub // TABLE_LANES)) // TABLE_UNITS)


@numba.njit(parallel=True, **_JIT)
def _tables_kernel(queries, cbt, out):
    m = cbt.shape[0]
    groups = _lanes_groups(cbt)
    if groups:
        for w in prange(queries.shape[0] * groups):
            _l2_lanes_group(queries, cbt, out, w // groups, w % groups)
        return
    for w in prange(queries.shape[0] * m):
        _l2_table(queries, cbt, out, w // m, w % m)


@numba.njit(**_JIT)
def _tables_kernel_serial(queries, cbt, out):
    groups = _lanes_groups(cbt)
    for q in range(queries.shape[0]):
        if groups:
            for g in range(groups):
                _l2_lanes_group(queries, cbt, out, q, g)
        else:
            for j in range(cbt.shape[0]):
                _l2_table(queries, cbt, out, q, j)


# Tables of at most this many multiply-adds (queries × D × ksub) are computed on the calling thread: a parallel region
# costs more than they do (a search of a few queries ran up to three regions: tables, scan, re-score). Medians of 200
# calls, 2 threads, Intel host (µs, serial / parallel): 1 × 128-d ksub 256 (2^15) 2.4 / 8.7, 4 × 784-d ksub 16 8.9 /
# 11.9, 4 × 128-d ksub 256 (2^17) 9.5 / 13.2, 16 × 128-d ksub 256 (2^19) 39.3 / 27.6, 256 × 128-d ksub 16 104 / 72.
SERIAL_TABLE_WORK = 1 << 17


def _transpose_cb(codebooks):
    return np.ascontiguousarray(np.transpose(codebooks, (0, 2, 1)), dtype=np.float32)


def transposed_codebooks(codebooks):
    """(m, dsub, ksub) float32: the layout the table kernels read (codewords innermost, so they vectorise)."""
    return _transpose_cb(codebooks)


def distance_tables_l2(queries, codebooks, cbt=None):
    """(nq, m, ksub) float32 tables of Σ(q_j − c)² over each sub-vector, computed directly. ``cbt``: the codebooks
    as :func:`transposed_codebooks` gives them, when the caller keeps them (transposing 784-d codebooks with 256
    codewords took ~80 µs of a single query's 100 µs table)."""
    m, ksub, dsub = codebooks.shape
    out = np.empty((queries.shape[0], m, ksub), dtype=np.float32)
    if out.size:
        serial = queries.shape[0] * m * dsub * ksub <= SERIAL_TABLE_WORK
        cbt = _transpose_cb(codebooks) if cbt is None else np.ascontiguousarray(cbt, dtype=np.float32)
        (_tables_kernel_serial if serial else _tables_kernel)(np.ascontiguousarray(queries, dtype=np.float32), cbt, out)
    return out


@numba.njit(inline="always", **_JIT)
def _ip_table_row(queries, cbt, out, q, acc, centre):
    # float64 sums of exact products (float32 × float32 fits float64's mantissa), rounded once: a float32 sum lost
    # up to ~5% of q·c where large terms cancel (|q| = 1e3, q·c ≈ 1). With ``centre``, each sub-table's float64 mean
    # is taken out before the rounding and the sum of the means returned (else 0): the entries keep only their
    # spread, so data far from the origin (q·c ~ 1e8 where the entries differ by ~1e3) keeps its ranking.
    m, dsub, ksub = cbt.shape
    total = 0.0
    for j in range(m):
        base = j * dsub
        xv = np.float64(queries[q, base])
        for c in range(ksub):
            acc[c] = xv * np.float64(cbt[j, 0, c])
        for d in range(1, dsub):
            xv = np.float64(queries[q, base + d])
            for c in range(ksub):
                acc[c] += xv * np.float64(cbt[j, d, c])
        mid = _typical_entry(acc, ksub) if centre else 0.0  # (acc[ksub:] is its scratch)
        for c in range(ksub):
            out[q, j, c] = np.float32(acc[c] - mid)
        total += mid
    return total


_TYPICAL_SAMPLES = 15


@numba.njit(inline="always", **_JIT)
def _typical_entry(acc, ksub):
    # the median of up to 15 evenly spaced entries acc[:ksub] (sorted in acc[ksub:]): a centre the ordinary entries
    # lie near. The mean was used until 2026-12-07: one codeword of a 1e10-scale row moved it to ~4e7, and every
    # ordinary entry kept a float32 rounding of ~4 (the top-5 of 30 queries beside it were all wrong, a review)
    ns = min(ksub, _TYPICAL_SAMPLES)
    for i in range(ns):  # insertion sort of the samples
        v = acc[(i * ksub) // ns]
        t = ksub + i
        while t > ksub and acc[t - 1] > v:
            acc[t] = acc[t - 1]
            t -= 1
        acc[t] = v
    return acc[ksub + ns // 2]


@numba.njit(parallel=True, **_JIT)
def _ip_tables_kernel(queries, cbt, out):
    for q in prange(queries.shape[0]):
        _ip_table_row(queries, cbt, out, q, np.empty(cbt.shape[2] + _TYPICAL_SAMPLES, np.float64), False)


@numba.njit(**_JIT)
def _ip_tables_kernel_serial(queries, cbt, out):
    acc = np.empty(cbt.shape[2] + _TYPICAL_SAMPLES, np.float64)
    for q in range(queries.shape[0]):
        _ip_table_row(queries, cbt, out, q, acc, False)


@numba.njit(parallel=True, **_JIT)
def _ip_tables_centred_kernel(queries, cbt, out, shift):
    for q in prange(queries.shape[0]):
        shift[q] = _ip_table_row(queries, cbt, out, q, np.empty(cbt.shape[2] + _TYPICAL_SAMPLES, np.float64), True)


@numba.njit(**_JIT)
def _ip_tables_centred_kernel_serial(queries, cbt, out, shift):
    acc = np.empty(cbt.shape[2] + _TYPICAL_SAMPLES, np.float64)
    for q in range(queries.shape[0]):
        shift[q] = _ip_table_row(queries, cbt, out, q, acc, True)


def ip_tables_centred(queries, codebooks, cbt=None):
    """(tables, shift): :func:`ip_tables` minus a typical entry of each sub-table (the median of up to 15 evenly
    spaced ones, float64, taken out before rounding), and per query the sum of those centres (float64), so
    ``tables`` sums + ``shift`` = the inner products. Ranking by the tables alone is ranking by inner product, with
    float32 spent on the entries' differences only."""
    m, ksub, dsub = codebooks.shape
    nq = queries.shape[0]
    out = np.empty((nq, m, ksub), dtype=np.float32)
    shift = np.zeros(nq, dtype=np.float64)
    if out.size:
        serial = nq * m * dsub * ksub <= SERIAL_TABLE_WORK
        (_ip_tables_centred_kernel_serial if serial else _ip_tables_centred_kernel)(
            np.ascontiguousarray(queries, dtype=np.float32), _transpose_cb(codebooks) if cbt is None else cbt, out,
            shift)
    return out, shift


def ip_tables(queries, codebooks, cbt=None):
    """(nq, m, ksub) float32 tables of per-sub-vector inner products q_j · c (summed in float64, rounded once);
    ``cbt`` as in :func:`distance_tables_l2`."""
    m, ksub, dsub = codebooks.shape
    out = np.empty((queries.shape[0], m, ksub), dtype=np.float32)
    if out.size:
        serial = queries.shape[0] * m * dsub * ksub <= SERIAL_TABLE_WORK
        (_ip_tables_kernel_serial if serial else _ip_tables_kernel)(np.ascontiguousarray(queries, dtype=np.float32),
                                                                    _transpose_cb(codebooks) if cbt is None else cbt,
                                                                    out)
    return out


@numba.njit(inline="always", **_JIT)
def _argmin_bits(bits, ksub):
    # argmin on the int32 bit patterns: distances are >= +0, where IEEE order equals integer order, and integer
    # min-reductions vectorise without fast-math; ties go to the smaller codeword id
    mn = bits[0]
    for c in range(1, ksub):
        mn = min(mn, bits[c])
    best = ksub
    for c in range(ksub):
        cand = c if bits[c] == mn else ksub
        best = min(best, cand)
    return best


@numba.njit(inline="always", **_JIT)
def _row_bits_max(xbits, r):
    # the largest |value| of row r as its float32 bit pattern (sign cleared): integer compares order finite floats by
    # magnitude, and an integer max vectorises where a float one (NaN semantics) does not
    mx = np.int32(0)
    for col in range(xbits.shape[1]):
        mx = max(mx, xbits[r, col] & np.int32(0x7FFFFFFF))
    return mx


@numba.njit(parallel=True, **_JIT)
def _encode_kernel(x, xbits, cbf, m, dsub, ksub, out, block, far, limit):
    # Portable fallback for odd codebook sizes (see _encode_kernel_lanes for the fast path).
    # cbf: codebooks transposed to (m, dsub, ksub) and flattened; rows are encoded two at a time so each codebook
    # load feeds two rows; the inner loops run over codewords (vectorised) with unsigned indexing.
    n, dim = x.shape
    nblocks = (n + block - 1) // block
    uk = np.uint64(ksub)
    for b in prange(nblocks):
        acc = np.empty(ksub, dtype=np.float32)
        acc2 = np.empty(ksub, dtype=np.float32)
        bits = acc.view(np.int32)
        bits2 = acc2.view(np.int32)
        r1 = min(n, (b + 1) * block)
        for r in range(b * block, r1):
            far[r] = _row_bits_max(xbits, r) >= limit
        for r in range(b * block, r1, 2):
            ra = x[r]
            rb = x[min(r + 1, r1 - 1)]
            for j in range(m):
                base = j * dsub
                o = np.uint64(base) * uk
                xa = ra[base]
                xb = rb[base]
                for c in range(ksub):
                    cv = cbf[o + np.uint64(c)]
                    t = xa - cv
                    acc[c] = t * t
                    t2 = xb - cv
                    acc2[c] = t2 * t2
                for d in range(1, dsub):
                    xa = ra[base + d]
                    xb = rb[base + d]
                    o = np.uint64(base + d) * uk
                    for c in range(ksub):
                        cv = cbf[o + np.uint64(c)]
                        t = xa - cv
                        acc[c] += t * t
                        t2 = xb - cv
                        acc2[c] += t2 * t2
                out[r, j] = _argmin_bits(bits, ksub)
                if r + 1 < r1:
                    out[r + 1, j] = _argmin_bits(bits2, ksub)


_FEATURES = host_features()
_HAS_AVX2 = "avx2" in _FEATURES
# 512-bit byte shuffles: the scan then takes two 32-row blocks per pass (64 lookups per instruction)
_HAS_AVX512BW = "avx512bw" in _FEATURES
_HAS_AVX512F = "avx512f" in _FEATURES


_ENC_LANES = 32  # rows encoded together by _enc_lanes, one row per vector lane
# Vector width and codewords per pass of _enc_lanes: with AVX-512, 4 codewords × 2 row vectors of 16 lanes = 8
# accumulator chains (1.45 M vec/s against 0.95 M for 2 codewords × 4 row vectors of 8 lanes, 128-d, m=16, 2 threads,
# same-process A/B on the Intel host, 2026-12-03; 2 codewords with 16 lanes gave 1.35 M, 8 gave 1.30 M); else the
# 8-lane layout.
# Every lane runs the same operations in the same order, so the codes do not depend on the width.
_ENC_WIDTH = 16 if _HAS_AVX512F else 8
_ENC_CW = 4 if _HAS_AVX512F else 2


_ENC_UNROLLED = (4, 8, 16)  # sub-vector widths with a fully unrolled _enc_lanes (1.2x the loop at dsub = 8)


@intrinsic(prefer_literal=True)
def _enc_lanes(typingctx, xt, xo, cb, cbo, dsub, ksub, res):
    """Nearest codeword of one sub-vector in each of 32 rows, written to ``res`` (int32, 32): ties -> smaller id.

    ``xt`` holds the 32 rows transposed (column-major: ``xt[col * 32 + lane]``), ``xo`` the offset of this
    sub-vector's first column; ``cb`` the codebooks flattened from (m, ksub, dsub), ``cbo`` this
    sub-quantizer's offset; ``ksub`` a multiple of ``_ENC_CW``. A literal ``dsub`` (a constant at the call site)
    unrolls the loop over the sub-vector at compile time: no loop counter or address arithmetic per term, and the
    accumulators are plain SSA values.

    Rows sit in the vector lanes, so each codeword value is broadcast once and feeds 32 rows, and the running
    argmin is vertical: per lane a strict ``<`` against the best so far, visiting codewords in id order, keeps
    the smallest id among ties with no horizontal reduction or second pass. Each squared distance is
    Σ_d (c_d − x_d)² in order d = 0..dsub-1, one subtract and one fused multiply-add per term (c − x is
    exactly −(x − c), so the square is the same; LLVM schedules this operand order better here: 1.26× the
    previous encoder against 1.10× for x − c in a same-process A/B). Written as LLVM IR so the 8 accumulator
    vectors (``_ENC_CW`` codewords × ``_ENC_LANES / _ENC_WIDTH`` row vectors) stay in registers."""
    W, C = _ENC_WIDTH, _ENC_CW
    V = _ENC_LANES // W
    fixed = dsub.literal_value if isinstance(dsub, types.IntegerLiteral) else None
    if fixed not in _ENC_UNROLLED:
        fixed = None
    sig = types.void(xt, types.intp, cb, types.intp, dsub if fixed is not None else types.intp, types.intp, res)

    def codegen(context, builder, signature, args):
        xt_v, xo_v, cb_v, cbo_v, dsub_v, ksub_v, res_v = args
        axt = context.make_array(signature.args[0])(context, builder, xt_v)
        acb = context.make_array(signature.args[2])(context, builder, cb_v)
        ares = context.make_array(signature.args[6])(context, builder, res_v)
        intp = cbo_v.type
        f32, i32 = ir.FloatType(), ir.IntType(32)
        vf, vi = ir.VectorType(f32, W), ir.VectorType(i32, W)
        mod = builder.module
        fma = llvm_fn(mod, f"llvm.fma.v{W}f32", vf, [vf, vf, vf])

        def vptr(arr, idx, vt):
            return builder.bitcast(builder.gep(arr.data, [idx]), vt.as_pointer())

        def const(v):
            return ir.Constant(intp, v)

        width = const(fixed) if fixed is not None else dsub_v
        best = [cgutils.alloca_once_value(builder, ir.Constant(vf, [float("inf")] * W)) for _ in range(V)]
        idx = [cgutils.alloca_once_value(builder, ir.Constant(vi, [0] * W)) for _ in range(V)]
        acc = [[cgutils.alloca_once(builder, vf) for _ in range(V)] for _ in range(C)]
        zero = ir.Constant(vf, [0.0] * W)

        def accumulate(cbase, d, vals):  # one term c_d - x_d into every accumulator value in ``vals``
            xrow = builder.add(xo_v, builder.mul(d, const(_ENC_LANES)))
            xs = [builder.load(vptr(axt, builder.add(xrow, const(W * v)), vf), align=4) for v in range(V)]
            for cc in range(C):
                off = builder.add(cbase, builder.add(builder.mul(const(cc), width), d))
                cv = splat(builder, builder.load(builder.gep(acb.data, [off])), vf)
                for v in range(V):
                    t = builder.fsub(cv, xs[v])
                    vals[cc][v] = builder.call(fma, [t, t, vals[cc][v]])

        with cgutils.for_range_slice(builder, const(0), ksub_v, const(C), intp) as (c0, _):
            cbase = builder.add(cbo_v, builder.mul(c0, width))
            vals = [[zero] * V for _ in range(C)]
            if fixed is not None:  # unrolled: the accumulators are SSA values
                for d in range(fixed):
                    accumulate(cbase, const(d), vals)
            else:
                for cc in range(C):
                    for v in range(V):
                        builder.store(zero, acc[cc][v])
                with cgutils.for_range(builder, dsub_v) as loop:
                    vals = [[builder.load(acc[cc][v]) for v in range(V)] for cc in range(C)]
                    accumulate(cbase, loop.index, vals)
                    for cc in range(C):
                        for v in range(V):
                            builder.store(vals[cc][v], acc[cc][v])
                vals = [[builder.load(acc[cc][v]) for v in range(V)] for cc in range(C)]
            for cc in range(C):  # codewords in id order with a strict <: ties keep the smaller id
                cid = splat(builder, builder.trunc(builder.add(c0, const(cc)), i32), vi)
                for v in range(V):
                    a = vals[cc][v]
                    bv = builder.load(best[v])
                    lt = builder.fcmp_ordered("<", a, bv)  # NaN never wins: all-NaN rows keep id 0
                    builder.store(builder.select(lt, a, bv), best[v])
                    builder.store(builder.select(lt, cid, builder.load(idx[v])), idx[v])
        for v in range(V):
            builder.store(builder.load(idx[v]), vptr(ares, const(W * v), vi), align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always", **_JIT)
def _enc_sub(xt, xo, cbf, cbo, dsub, ksub, res):
    # literal widths get the unrolled _enc_lanes (see _ENC_UNROLLED); others the loop
    if dsub == 8:
        _enc_lanes(xt, xo, cbf, cbo, 8, ksub, res)
    elif dsub == 4:
        _enc_lanes(xt, xo, cbf, cbo, 4, ksub, res)
    elif dsub == 16:
        _enc_lanes(xt, xo, cbf, cbo, 16, ksub, res)
    else:
        _enc_lanes(xt, xo, cbf, cbo, dsub, ksub, res)


@numba.njit(parallel=True, **_JIT)
def _encode_kernel_lanes(x, xbits, cbf, m, dsub, ksub, out, block, far, limit):
    # Fast path for ksub a multiple of _ENC_CW: blocks of ``block`` rows in parallel; within a block, 32 rows at a
    # time are transposed into ``xt`` (the last group padded by repeating the block's last row, results dropped).
    n, dim = x.shape
    nblocks = (n + block - 1) // block
    for b in prange(nblocks):
        xt = np.empty(dim * _ENC_LANES, dtype=np.float32)
        res = np.empty(_ENC_LANES, dtype=np.int32)
        r1 = min(n, (b + 1) * block)
        for r0 in range(b * block, r1, _ENC_LANES):
            for lane in range(_ENC_LANES):
                r = min(r0 + lane, r1 - 1)
                for col in range(dim):
                    xt[col * _ENC_LANES + lane] = x[r, col]
                far[r] = _row_bits_max(xbits, r) >= limit
            nr = min(_ENC_LANES, r1 - r0)
            for j in range(m):
                _enc_sub(xt, j * dsub * _ENC_LANES, cbf, j * ksub * dsub, dsub, ksub, res)
                for lane in range(nr):
                    out[r0 + lane, j] = res[lane]


def pq_encode(x, codebooks):
    """uint8 (n, m) codes: index of the nearest codeword per sub-vector, ties to the smaller id."""
    return pq_encode_flagged(x, codebooks, np.inf)[0]


def pq_encode_flagged(x, codebooks, limit):
    """:func:`pq_encode`, and a bool mask (n,) of the rows holding a value of magnitude >= ``limit``, found while
    the rows are read (the caller re-encodes those whose float32 squared differences could overflow). ``x`` is
    taken as C-contiguous float32 (the mask reads its bit patterns: other dtypes are converted first)."""
    with np.errstate(over="ignore"):  # (beyond float32: inf, flagged far)
        x = np.ascontiguousarray(x, dtype=np.float32)
    m = codebooks.shape[0]
    out = np.empty((x.shape[0], m), dtype=np.uint8)
    far = np.zeros(x.shape[0], dtype=np.bool_)
    if out.size:
        m, ksub, dsub = codebooks.shape
        # the bit pattern of the smallest float32 >= limit (inf's pattern when none is: then only inf/NaN rows)
        lim = np.float32(limit)
        if np.float64(lim) < limit:
            lim = np.nextafter(lim, np.float32(np.inf))
        bits_limit = np.int32(np.array(lim, np.float32).view(np.int32))
        xbits = x.view(np.int32)
        if ksub % _ENC_CW == 0:
            _encode_kernel_lanes(x, xbits, np.ascontiguousarray(codebooks, dtype=np.float32).reshape(-1), m, dsub,
                                 ksub, out, 64, far, bits_limit)
        else:
            _encode_kernel(x, xbits, _transpose_cb(codebooks).reshape(-1), m, dsub, ksub, out, 64, far, bits_limit)
    return out, far


_SUM_CHUNKS = 8  # fixed row chunks of the M-step: partial sums merged in chunk order, so results do not
# depend on the thread count


@numba.njit(parallel=True, **_JIT)
def _centroid_sums_kernel(x, codes, part, pcount):
    # part: (nchunks, m, ksub, dsub) float64, pcount: (nchunks, m, ksub) int64, zero-initialised
    n = x.shape[0]
    nchunks, m, ksub, dsub = part.shape
    chunk = (n + nchunks - 1) // nchunks
    for t in prange(nchunks):
        s = part[t]
        cnt = pcount[t]
        for r in range(t * chunk, min(n, (t + 1) * chunk)):  # one sequential pass over whole rows
            for j in range(m):
                c = codes[r, j]
                cnt[j, c] += 1
                base = j * dsub
                for d in range(dsub):
                    s[j, c, d] += x[r, base + d]


def pq_centroid_sums(x, codes, ksub):
    """Per sub-quantizer sums of the sub-vectors assigned to each codeword, and the counts (the k-means M-step).

    ``x`` (n, dim) float32, ``codes`` uint8 (n, m) -> (sums float64 (m, ksub, dim // m), counts int64 (m, ksub)).
    One pass over the rows in a fixed number of chunks (partial float64 sums added in chunk order), so the
    result is the same for any thread count.
    """
    n, m = codes.shape
    dsub = x.shape[1] // m if m else 0
    nchunks = max(1, min(_SUM_CHUNKS, n // 4096))
    part = np.zeros((nchunks, m, ksub, dsub), dtype=np.float64)
    pcount = np.zeros((nchunks, m, ksub), dtype=np.int64)
    if n and m:
        _centroid_sums_kernel(x, codes, part, pcount)
    sums = part[0]
    counts = pcount[0]
    for t in range(1, nchunks):
        sums += part[t]
        counts += pcount[t]
    return sums, counts


@numba.njit(parallel=True, **_JIT)
def _code_row_sums_kernel(x, codes, out):
    # out: (m, ksub, dim) float64, zero-initialised; one sub-quantizer per task, rows in order within it
    n, dim = x.shape
    m = codes.shape[1]
    for j in prange(m):
        s = out[j]
        for r in range(n):
            row = s[codes[r, j]]
            for d in range(dim):
                row[d] += x[r, d]


def pq_code_row_sums(x, codes, ksub):
    """Per sub-quantizer sums of the *whole* rows assigned to each codeword: ``x`` (n, dim) float32, ``codes`` uint8
    (n, m) -> float64 (m, ksub, dim), ``out[j, c] = Σ x[r]`` over the rows ``r`` with ``codes[r, j] == c``.

    OPQ's Procrustes step needs ``xᵀ y`` with ``y`` the decoded rows; it equals ``Σ_j out[j]ᵀ codebooks[j]`` (placed
    in sub-space j's columns), which costs one pass over the rows per sub-quantizer instead of an (n × dim × dim)
    float64 GEMM. Each sub-quantizer's sums run over the rows in order, so the result does not depend on the thread
    count."""
    n, m = codes.shape
    out = np.zeros((m, ksub, x.shape[1]), dtype=np.float64)
    if n and m:
        _code_row_sums_kernel(x, codes, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# 8-bit ADC
# ----------------------------------------------------------------------------------------------------------


@numba.njit(parallel=True, **_JIT)
def _adc_distances_kernel(tables, codes, out):
    nq, m, ksub = tables.shape
    n = codes.shape[0]
    for q in prange(nq):
        t = tables[q]
        for r in range(n):
            s = np.float32(0.0)
            for j in range(m):
                s += t[j, codes[r, j]]
            out[q, r] = s


def adc_distances(tables, codes):
    """(nq, n) float32 full ADC sums Σ_j tables[q, j, codes[r, j]]."""
    out = np.empty((tables.shape[0], codes.shape[0]), dtype=np.float32)
    if out.size:
        _adc_distances_kernel(tables, codes, out)
    return out


@numba.njit(inline="always", **_JIT)
def _push(dd, ii, k, d, i):
    """Insert (d, i) into the sorted top-k lists (dd, ii); caller checked it beats the k-th (lexicographic, an empty
    slot's id -1 counting as larger than any: a row whose float32 sum overflowed to +inf still beats padding)."""
    p = k - 1
    while p > 0 and (dd[p - 1] > d or (dd[p - 1] == d and (ii[p - 1] > i or ii[p - 1] < 0))):
        dd[p] = dd[p - 1]
        ii[p] = ii[p - 1]
        p -= 1
    dd[p] = d
    ii[p] = i


@intrinsic
def _ctz(typingctx, x):
    """Count trailing zeros of a non-zero int64."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fn = llvm_fn(builder.module, "llvm.cttz.i64", i64, [i64, ir.IntType(1)])
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return sig, codegen


def _adc_rows_codegen(rows, lanes=_QB):
    """Code generator of :func:`_adc_row` (``rows`` = 1) and :func:`_adc_rows4` (4 consecutive rows), for blocks of
    ``lanes`` queries (16, or 4 and 8 for small batches: :func:`_adc_lanes`)."""

    def codegen(context, builder, signature, args):
        tq_v, codes_v, r_v, m_v, ksub_v, out_v, th_v = args
        a_tq = context.make_array(signature.args[0])(context, builder, tq_v)
        a_codes = context.make_array(signature.args[1])(context, builder, codes_v)
        a_out = context.make_array(signature.args[5])(context, builder, out_v)
        a_th = context.make_array(signature.args[6])(context, builder, th_v)
        vt = ir.VectorType(ir.FloatType(), lanes)
        intp = r_v.type
        row_stride = cgutils.unpack_tuple(builder, a_codes.strides, 2)[0]
        starts = [builder.gep(a_codes.data, [builder.mul(builder.add(r_v, ir.Constant(intp, i)), row_stride)])
                  for i in range(rows)]
        slots = [cgutils.alloca_once_value(builder, ir.Constant(vt, [0.0] * lanes)) for _ in range(rows)]
        with cgutils.for_range(builder, m_v) as loop:
            j = loop.index
            jk = builder.mul(j, ksub_v)
            for row, slot in zip(starts, slots, strict=True):  # independent chains: the core overlaps them
                c = builder.zext(builder.load(builder.gep(row, [j])), intp)
                at = builder.mul(builder.add(jk, c), ir.Constant(intp, lanes))
                v = builder.load(builder.bitcast(builder.gep(a_tq.data, [at]), vt.as_pointer()), align=4)
                builder.store(builder.fadd(builder.load(slot), v), slot)
        thv = builder.load(builder.bitcast(a_th.data, vt.as_pointer()), align=4)
        mask = ir.Constant(ir.IntType(64), 0)
        for i, slot in enumerate(slots):
            acc = builder.load(slot)
            dst = builder.gep(a_out.data, [ir.Constant(intp, i * lanes)])
            builder.store(acc, builder.bitcast(dst, vt.as_pointer()), align=4)
            bits = builder.zext(builder.bitcast(builder.fcmp_ordered("<=", acc, thv), ir.IntType(lanes)),
                                ir.IntType(64))
            mask = builder.or_(mask, builder.shl(bits, ir.Constant(ir.IntType(64), i * lanes)) if i else bits)
        return mask

    return codegen


@intrinsic
def _adc_row(typingctx, tq, codes, r, m, ksub, out, th):
    """ADC sums of code row ``r`` for a block of ``_QB`` queries, returned as a bitmask of the queries it beats.

    ``tq[(j * ksub + c) * _QB + qq]`` holds query qq's table entry for code c of sub-quantizer j: the block's
    entries for one code are adjacent, so one vector load fetches all of them. The sums go to ``out[0:_QB]``
    (each accumulated in order j, as the scalar reference does: no fast-math, so no reassociation); the mask
    has bit qq set where ``out[qq] <= th[qq]`` (a superset: the caller settles ties and empty slots, so a sum that
    overflowed to +inf still fills an empty slot). ``codes`` must be C-contiguous (rows of m bytes)."""
    return types.int64(tq, codes, types.intp, types.intp, types.intp, out, th), _adc_rows_codegen(1)


@intrinsic
def _adc_rows4(typingctx, tq, codes, r, m, ksub, out, th):
    """:func:`_adc_row` for rows r .. r + 3 at once: row r + i's sums in out[16 i : 16 i + 16] and its mask in bits
    16 i .. 16 i + 15, all against the thresholds ``th`` as they stand before row r. Each row's sum is the same chain
    (order j, from 0.0), so the results are those of four single-row calls; four independent chains let the core
    overlap the adds, where one row's 16-add chain was bound by the add latency (1M codes, m = 16: ~50 cycles a
    row)."""
    return types.int64(tq, codes, types.intp, types.intp, types.intp, out, th), _adc_rows_codegen(4)


# Batches of 2 to 4 (8) queries interleave their tables 4 (8) wide instead of 16: the same operations per code row,
# on tables a quarter (half) the size (64 KB at m = 16, ksub = 256, against 256 KB), and no lanes wasted on padding
# queries. 1M codes, m = 16, 2 threads, Intel host (2026-12-05): 2-4 queries 2.7 ms against 8.5-9.5 in a 16-wide block.
ADC_NARROW_QUERIES = 8


def _adc_lanes(nq: int) -> int:
    """Queries per interleaved block for a batch of ``nq``."""
    return 4 if nq <= 4 else 8 if nq <= ADC_NARROW_QUERIES else _QB


@intrinsic
def _adc_row_4(typingctx, tq, codes, r, m, ksub, out, th):
    """:func:`_adc_row` for a block of 4 queries (tables interleaved 4 wide)."""
    return types.int64(tq, codes, types.intp, types.intp, types.intp, out, th), _adc_rows_codegen(1, 4)


@intrinsic
def _adc_rows4_4(typingctx, tq, codes, r, m, ksub, out, th):
    """:func:`_adc_rows4` for a block of 4 queries: row r + i's mask in bits 4 i .. 4 i + 3."""
    return types.int64(tq, codes, types.intp, types.intp, types.intp, out, th), _adc_rows_codegen(4, 4)


@intrinsic
def _adc_row_8(typingctx, tq, codes, r, m, ksub, out, th):
    """:func:`_adc_row` for a block of 8 queries (tables interleaved 8 wide)."""
    return types.int64(tq, codes, types.intp, types.intp, types.intp, out, th), _adc_rows_codegen(1, 8)


@intrinsic
def _adc_rows4_8(typingctx, tq, codes, r, m, ksub, out, th):
    """:func:`_adc_rows4` for a block of 8 queries: row r + i's mask in bits 8 i .. 8 i + 7."""
    return types.int64(tq, codes, types.intp, types.intp, types.intp, out, th), _adc_rows_codegen(4, 8)


# Top-k lists longer than this are kept as reservoirs of RESERVOIR_CAPACITY·k slots (kernels.direct_topk: rows below
# the threshold appended, a full reservoir cut back to its k best by a selection), where a sorted list costs O(k) per
# insertion: PQ16x8 over 200k rows, 200 queries, k = 1,000 took 1.45× IndexPQ's time (Zen 4, 2026-12-06).
ADC_RESERVOIR_MIN_K = 128


@numba.njit(parallel=True, **_JIT)
def _adc_search_kernel(flat, codes, m, ksub, k, nchunks, part_d, part_i, nq, lanes):
    # flat: (nqb, m * ksub * lanes) tables of query blocks, interleaved by ``lanes`` (16, or 4 / 8: _adc_lanes);
    # part_*: (nchunks, lanes * nqb, k). Lanes from nq on pad the last block: their threshold is -inf, so no row ever
    # enters their (dropped) lists (at +inf, an all-zero padding table matched every row, and eight such lanes doubled
    # the time of an 8-query search).
    nqb = flat.shape[0]
    n = codes.shape[0]
    chunk = (n + nchunks - 1) // nchunks
    shift = 4 if lanes == 16 else 3 if lanes == 8 else 2  # log2(lanes): a mask bit's row within the group of four
    for w in prange(nqb * nchunks):
        qb = w // nchunks
        c = w - qb * nchunks
        q0 = qb * lanes
        r0 = min(n, c * chunk)
        r1 = min(n, r0 + chunk)
        dd = part_d[c]
        ii = part_i[c]
        sums = np.empty(4 * lanes, dtype=np.float32)
        th = np.empty(lanes, dtype=np.float32)  # each query's k-th best so far (a reservoir's threshold)
        for qq in range(lanes):
            dd[q0 + qq, :] = np.inf
            ii[q0 + qq, :] = -1
            th[qq] = np.inf if q0 + qq < nq else -np.inf
        big = k > ADC_RESERVOIR_MIN_K
        buf_d = np.empty((lanes, RESERVOIR_CAPACITY * k if big else 1), dtype=np.float32)
        buf_i = np.empty((lanes, RESERVOIR_CAPACITY * k if big else 1), dtype=np.int64)
        fill = np.zeros(lanes, dtype=np.int64)
        tq = flat[qb]
        r = r0
        while r < r1:  # rows ascending, and a tie does not displace: ties keep the smaller idx
            if r + 4 <= r1:
                if lanes == 16:
                    mask = _adc_rows4(tq, codes, r, m, ksub, sums, th)
                elif lanes == 8:
                    mask = _adc_rows4_8(tq, codes, r, m, ksub, sums, th)
                else:
                    mask = _adc_rows4_4(tq, codes, r, m, ksub, sums, th)
                step = 4
            else:
                if lanes == 16:
                    mask = _adc_row(tq, codes, r, m, ksub, sums, th)
                elif lanes == 8:
                    mask = _adc_row_8(tq, codes, r, m, ksub, sums, th)
                else:
                    mask = _adc_row_4(tq, codes, r, m, ksub, sums, th)
                step = 1
            while mask != 0:  # (bits in row order: a row's pushes see the thresholds the earlier rows left)
                bit = _ctz(mask)
                mask &= mask - 1
                qq = bit & (lanes - 1)
                if big:
                    if _admits(sums[bit], th[qq]):  # (a cut: the mask's bar may have been raised since)
                        _append(buf_d, buf_i, fill, th, qq, sums[bit], r + (bit >> shift), k)
                elif sums[bit] < th[qq] or ii[q0 + qq, k - 1] < 0:
                    _push(dd[q0 + qq], ii[q0 + qq], k, sums[bit], r + (bit >> shift))
                    th[qq] = dd[q0 + qq, k - 1]
            r += step
        if big:
            finish_lists(buf_d, buf_i, fill, dd[q0 : q0 + lanes], ii[q0 : q0 + lanes])


@numba.njit(inline="always", **_JIT)
def _admits(s, thr):
    """Whether a reservoir with threshold ``thr`` takes the sum ``s``: below it (rows come ascending, so a tie with
    the k-th never displaces it), or while it is still +inf any sum but NaN, so that a sum that overflowed to +inf
    ranks ahead of padding as the sorted lists rank it."""
    return s < thr or (thr == np.inf and s == s)


@numba.njit(inline="always", **_JIT)
def _offer(dd, ii, k, s, r, th):
    """Offer row r's sum s to the sorted top-k lists; returns the new k-th (the threshold)."""
    if s <= th and (s < th or ii[k - 1] < 0):
        _push(dd, ii, k, s, r)
        return dd[k - 1]
    return th


# Rows the one-query scan sums side by side (independent add chains; each row's sum is still in order j = 0, 1, ...).
# One thread, random codes, same-process medians (Intel host, 2026-12-06): 100k × 32 bytes 1.05 → 0.71-0.74 ms, 1M ×
# 16 7.7-8.1 → 5.0-5.1 ms, 100k × 96 3.6 → 2.9-3.0 ms; 4 rows side by side gained 0-20%, and reading each row's codes
# 8 bytes at a time (shifts instead of byte loads) nothing.
_FEW_ROWS = 8


@numba.njit(parallel=True, **_JIT)
def _adc_search_few_kernel(tables, codes, k, nchunks, part_d, part_i):
    # One query at a time (tables: (nq, m, ksub) float32), parallel over (query, chunk of rows); part_*: (nchunks, nq,
    # k). Each row's sum is a plain scalar loop in order j from 0.0, the vector kernel's float32 operations lane by
    # lane, so the sums, ids and ties are the same. _FEW_ROWS rows are summed side by side (a row's chain of m
    # dependent adds would otherwise leave the core waiting on the add latency) and offered in row order, so ties
    # still keep the smaller idx. Lists longer than ADC_RESERVOIR_MIN_K are reservoirs (_few_rows_reservoir).
    nq, m, _ = tables.shape
    n = codes.shape[0]
    chunk = (n + nchunks - 1) // nchunks
    for w in prange(nq * nchunks):
        q = w // nchunks
        c = w - q * nchunks
        r0 = min(n, c * chunk)
        r1 = min(n, r0 + chunk)
        if k > ADC_RESERVOIR_MIN_K:
            _few_rows_reservoir(tables[q], codes, r0, r1, part_d[c, q : q + 1], part_i[c, q : q + 1])
            continue
        dd = part_d[c, q]
        ii = part_i[c, q]
        dd[:] = np.inf
        ii[:] = -1
        th = np.float32(np.inf)
        t = tables[q]
        r = r0
        while r + _FEW_ROWS <= r1:
            b = codes[r : r + _FEW_ROWS]
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
            for j in range(m):
                tj = t[j]
                s0 += tj[b[0, j]]
                s1 += tj[b[1, j]]
                s2 += tj[b[2, j]]
                s3 += tj[b[3, j]]
                s4 += tj[b[4, j]]
                s5 += tj[b[5, j]]
                s6 += tj[b[6, j]]
                s7 += tj[b[7, j]]
            th = _offer(dd, ii, k, s0, r, th)
            th = _offer(dd, ii, k, s1, r + 1, th)
            th = _offer(dd, ii, k, s2, r + 2, th)
            th = _offer(dd, ii, k, s3, r + 3, th)
            th = _offer(dd, ii, k, s4, r + 4, th)
            th = _offer(dd, ii, k, s5, r + 5, th)
            th = _offer(dd, ii, k, s6, r + 6, th)
            th = _offer(dd, ii, k, s7, r + 7, th)
            r += _FEW_ROWS
        for rr in range(r, r1):  # rows ascending, and a tie does not displace: ties keep the smaller idx
            s = np.float32(0.0)
            for j in range(m):
                s += t[j, codes[rr, j]]
            th = _offer(dd, ii, k, s, rr, th)


@numba.njit(**_JIT)
def _few_rows_reservoir(t, codes, r0, r1, out_d, out_i):
    """One query's top k (out_d / out_i: (1, k)) of rows r0 .. r1 - 1, kept in a reservoir (kernels.direct_topk):
    O(1) per row where inserting into the sorted list costs O(k) (one query, k = 40,000 of 80k rows took 3.7 s). The
    same sums as :func:`_adc_search_few_kernel`'s, and the same list: NaN never enters, and while fewer than k rows
    are kept a sum that overflowed to +inf does (it ranks before padding). Selecting the k dominates here, so the
    rows are summed one at a time."""
    m = t.shape[0]
    k = out_d.shape[1]
    slots = capacity(k, r1 - r0)
    buf_d = np.empty((1, slots), dtype=np.float32)
    buf_i = np.empty((1, slots), dtype=np.int64)
    fill = np.zeros(1, dtype=np.int64)
    thr = np.full(1, np.inf, dtype=np.float32)
    for r in range(r0, r1):
        s = np.float32(0.0)
        for j in range(m):
            s += t[j, codes[r, j]]
        if _admits(s, thr[0]):
            _append(buf_d, buf_i, fill, thr, 0, s, r, k)
    finish_lists(buf_d, buf_i, fill, out_d, out_i)


@numba.njit(parallel=True, **_JIT)
def _merge_parts(part_d, part_i, out_d, out_i):
    # Each query's k best over the chunks' lists (each ascending, ties to the smaller row, padding inf / -1 last):
    # merged as sorted runs, O(k) per chunk, where inserting every entry into the sorted list cost O(k) apiece
    # (64 queries, k = 40,000, two chunks: 12.3 s against 0.18 s for one). A list holding NaN (FastScan's exact mode
    # on NaN tables) need not be in that order: those keep the insertions, whose result they define.
    nchunks, nq, k = part_d.shape
    for q in prange(nq):
        dd = out_d[q]
        ii = out_i[q]
        dd[:] = part_d[0, q]
        ii[:] = part_i[0, q]
        nan = False
        for c in range(nchunks):
            for t in range(k):
                nan |= part_d[c, q, t] != part_d[c, q, t]
        if not nan:
            td = np.empty(k, dtype=np.float32)
            ti = np.empty(k, dtype=np.int64)
            for c in range(1, nchunks):
                a = b = 0  # (a + b = t < k: neither run is read past its end)
                for t in range(k):
                    if ranks_before(part_d[c, q, b], part_i[c, q, b], dd[a], ii[a]):
                        td[t] = part_d[c, q, b]
                        ti[t] = part_i[c, q, b]
                        b += 1
                    else:
                        td[t] = dd[a]
                        ti[t] = ii[a]
                        a += 1
                dd[:] = td
                ii[:] = ti
        else:
            for c in range(1, nchunks):
                for t in range(k):
                    i = part_i[c, q, t]
                    if i < 0:
                        break
                    d = part_d[c, q, t]
                    if d < dd[k - 1] or (d == dd[k - 1] and (ii[k - 1] < 0 or i < ii[k - 1])):
                        _push(dd, ii, k, d, i)
                    else:
                        break


def _num_chunks(nq, n, min_rows=4096, lanes=_QB):
    threads = numba.get_num_threads()
    nqb = (nq + lanes - 1) // lanes
    if nqb >= 4 * threads or n < 2 * min_rows:
        return 1
    return int(max(1, min(threads * max(1, 4 // max(nqb, 1)), n // min_rows)))


def adc_search(tables, codes, k, nchunks=None):
    """Fused ADC scan + top-k of the smallest sums: (dist (nq, k) float32, idx (nq, k) int64), ascending,
    ties to the smaller idx, padded with inf / -1 when n < k. Parallel over query blocks and, when there are
    few queries, over chunks of codes (``nchunks``; default chosen from the thread count). Fewer than
    ``ADC_FEW_QUERIES`` queries are scanned one by one instead of in 16-query blocks, and up to
    ``ADC_NARROW_QUERIES`` in one 4- or 8-query block (same results)."""
    nq, m, ksub = tables.shape
    n = codes.shape[0]
    k = int(k)
    few = nq < ADC_FEW_QUERIES
    lanes = _adc_lanes(nq)
    if nchunks is None:
        nchunks = _num_chunks(nq, n, lanes=lanes)  # for the single query of the few-query path, as for one block
    nchunks = max(1, int(nchunks))
    out_d = np.full((nq, k), np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    if nq == 0 or k == 0 or n == 0:
        return out_d, out_i
    # both kernels read float32 tables and one byte per code: fix both dtypes here
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if few:
        part_d = np.empty((nchunks, nq, k), dtype=np.float32)
        part_i = np.empty((nchunks, nq, k), dtype=np.int64)
        _adc_search_few_kernel(np.ascontiguousarray(tables, dtype=np.float32), codes, k, nchunks, part_d, part_i)
        if nchunks == 1:
            return part_d[0], part_i[0]
        _merge_parts(part_d, part_i, out_d, out_i)
        return out_d, out_i
    nqb = (nq + lanes - 1) // lanes
    t = tables
    if nqb * lanes != nq:  # pad with all-zero dummy queries to whole blocks (their results are dropped)
        t = np.zeros((nqb * lanes, m, ksub), dtype=np.float32)
        t[:nq] = tables
    flat = np.ascontiguousarray(t.reshape(nqb, lanes, m * ksub).transpose(0, 2, 1), dtype=np.float32)
    flat = flat.reshape(nqb, m * ksub * lanes)
    part_d = np.empty((nchunks, nqb * lanes, k), dtype=np.float32)
    part_i = np.empty((nchunks, nqb * lanes, k), dtype=np.int64)
    _adc_search_kernel(flat, codes, m, ksub, k, nchunks, part_d, part_i, nq, lanes)
    if nchunks == 1:
        return np.ascontiguousarray(part_d[0, :nq]), np.ascontiguousarray(part_i[0, :nq])
    part_d = np.ascontiguousarray(part_d[:, :nq])
    part_i = np.ascontiguousarray(part_i[:, :nq])
    _merge_parts(part_d, part_i, out_d, out_i)
    return out_d, out_i


# ----------------------------------------------------------------------------------------------------------
# 4-bit FastScan
# ----------------------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
def _pack_kernel(codes, out):
    n, m = codes.shape
    for r in range(n):
        b = r >> 5
        rr = r & 31
        for j in range(m):
            out[b, j >> 1, rr] |= codes[r, j] << (4 * (j & 1))


def pack_codes_4bit(codes):
    """Pack uint8 (n, m) codes with values < 16 into (ceil(n / 32), ceil(m / 2), 32) uint8 (see module doc)."""
    n, m = codes.shape
    out = np.zeros(((n + 31) // 32, (m + 1) // 2, 32), dtype=np.uint8)
    if codes.size:
        _pack_kernel(codes, out)
    return out


def unpack_codes_4bit(packed, n, m):
    """Inverse of :func:`pack_codes_4bit`: uint8 (n, m)."""
    rows = np.ascontiguousarray(packed.transpose(0, 2, 1)).reshape(-1, packed.shape[1])[:n]
    out = np.empty((n, packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = rows & 15
    out[:, 1::2] = rows >> 4
    return np.ascontiguousarray(out[:, :m])


@numba.njit(**_JIT)
def _quantize_one(t, mp, lut8, cap=np.inf):
    """Quantise one (m, 16) table into lut8 ((mp * 16,) u8; sub-quantizer j at offset 16 j, padding zeros), each
    entry's excess over its sub-table's minimum first clipped to ``cap``.

    Returns (scale, m * max |t|)."""
    m = t.shape[0]
    qmax = min(255, 65535 // mp)
    span = 0.0
    sumabs = 0.0
    for j in range(m):
        lo = np.float64(t[j, 0])
        hi = lo
        for v in range(16):
            x = np.float64(t[j, v])
            lo = min(lo, x)
            hi = max(hi, x)
            sumabs = max(sumabs, abs(x))
        span = max(span, min(hi - lo, cap))
    sumabs *= m
    scale = span / qmax if span > 0 else 1.0
    lut8[:] = 0
    for j in range(m):
        lo = np.float64(t[j, 0])
        for v in range(1, 16):
            lo = min(lo, np.float64(t[j, v]))
        for v in range(16):
            qv = np.floor(min(np.float64(t[j, v]) - lo, cap) / scale + 0.5)
            lut8[16 * j + v] = np.uint8(min(max(qv, 0.0), qmax))
    return scale, sumabs


# Rows per top-k slot whose exact sums set the shortlist's clip (``_shortlist_cap``): 4k sums cost 4k·m lookups
# per query, next to the n·m of the scan. Up to _CAP_SMALL_K the k-th smallest is kept by insertion.
CAP_SAMPLE = 4
_CAP_SMALL_K = 64
_CAP_PAIRS_FROM_K = 128  # (200 queries over 200k PQ32x4 codes, k = 1,000: the clip 10.9 → 7.5 ms with pairs)


@numba.njit(inline="always", **_JIT)
def _sorts_after(a, b):
    """a comes after b in np.sort's order, where NaN is last (a review: with plain ``>`` a NaN sum stuck in its slot
    and the clip came from the wrong sum, recall 1 of 10 on tables holding NaN)."""
    return a > b or (a != a and b == b)


@numba.njit(**_JIT)
def _shortlist_cap(t, flat, n, m, mp2, k, L=0):
    """How far above its sub-table's minimum an entry can matter to the top k, from the exact ADC sums of the rows of
    ``CAP_SAMPLE * k / 32`` whole blocks spread evenly over the codes (at least ``CAP_SAMPLE * k`` rows, or all of
    them): their k-th smallest, U, bounds the k-th best from above (any
    k rows do), and a row with an entry more than U − Σ_j min_j above its minimum sums to more than U. Clipping
    entries there (a little above: see the end) keeps one far codeword (a table entry 1e4× the others) from setting
    the quantisation step alone, which rounded every other entry to 0 and made the shortlist the first rows
    scanned. (U was the largest of the
    first k rows' sums: when those rows held the far codeword the clip did nothing, and the shortlist found 1 of the
    exact top 10.) The sampled rows' excesses U − Σ min_j are summed term by term in float64: taken as a float32 sum
    minus Σ min_j, a row at the minimum of a sub-table of 1e9 lost the other sub-tables' excess, the clip fell to the
    smallest excess and clipped the true top-1 (at 1e9 + 0.31) with the rest (a review). Returns (the clip, U − Σ
    min_j, est_k, est_L), the first two inf when there are fewer than k rows. With ``L`` > 0 and k > _CAP_SMALL_K,
    est_k and est_L are the sample's excesses at the ranks where the k-th and L-th smallest of all n rows should fall
    (:func:`_estimate_rank`, three standard deviations high): guesses, not bounds (inf where there is none), for
    :func:`_optimistic_bound`."""
    if n < k:
        return np.inf, np.inf, np.inf, np.inf
    excess = np.empty((m, 16))  # each entry's excess over its sub-table's minimum
    step = np.inf  # the smallest positive one
    for j in range(m):
        lo = np.float64(t[j, 0])
        for v in range(1, 16):
            lo = min(lo, np.float64(t[j, v]))
        for v in range(16):
            e = np.float64(t[j, v]) - lo
            excess[j, v] = e
            if e > 0.0:
                step = min(step, e)
    # whole blocks of 32 rows, spread evenly over the codes: rows one by one each read their block's 8 cache lines
    # (4k rows took 16.5 ms of a 200-query k = 1,000 search over 200k PQ32x4 codes; 13 by blocks, 7.5 by byte pairs)
    full = n // 32
    nb = -(-min(n, CAP_SAMPLE * k) // 32)
    if nb > full:  # every row
        nb = -(-n // 32)
    ex = np.empty(32)
    if k <= _CAP_SMALL_K:  # the k smallest by insertion, in np.sort's order (NaN last): no sort (~0.3 µs of ~2)
        best = np.empty(_CAP_SMALL_K)
        filled = 0
        for i in range(nb):
            blk = i if nb * 32 >= n else (i * full) // nb
            nr = _block_excess(excess, flat, blk, n, m, mp2, ex)
            for r in range(nr):
                v = ex[r]
                if filled < k:
                    p = filled
                    filled += 1
                elif _sorts_after(best[k - 1], v):
                    p = k - 1
                else:
                    continue
                while p > 0 and _sorts_after(best[p - 1], v):
                    best[p] = best[p - 1]
                    p -= 1
                best[p] = v
        u = best[k - 1]
        est_k = est_l = np.inf
    else:
        # from _CAP_PAIRS_FROM_K, one lookup per code byte in a table of its two entries' excesses summed (256 per
        # pair of sub-quantizers: building it costs 256·m/2 additions, and halves the sample's lookups)
        pairs = _pair_excess(excess, m) if k >= _CAP_PAIRS_FROM_K else np.empty((0, 256))
        sums = np.empty(nb * 32)
        f = 0
        for i in range(nb):
            blk = i if nb * 32 >= n else (i * full) // nb
            if k >= _CAP_PAIRS_FROM_K:
                nr = _block_excess_pairs(pairs, flat, blk, n, mp2, ex)
            else:
                nr = _block_excess(excess, flat, blk, n, m, mp2, ex)
            sums[f : f + nr] = ex[:nr]
            f += nr
        keys = _excess_keys(sums[:f])
        u = _excess_at(keys, k - 1)
        est_k = est_l = np.inf
        if L > 0:
            rk = _estimate_rank(k, f, n)
            rl = _estimate_rank(L, f, n)
            if rl <= f:
                est_l = _excess_at(keys, rl - 1)
            if rk <= f:
                est_k = _excess_at(keys, rk - 1)
    # U = Σ min (a sampled row at every minimum: the query is a stored code) gave a clip of 0, which rounded every
    # entry to 0 and made the shortlist the first rows scanned (a review: 4,000 copies of the query missed). Clipping
    # no lower than the smallest positive excess keeps every entry above its minimum quantised above 0.
    c = max(u, step if step < np.inf else 0.0) * (1.0 + 2.0**-20)
    # A row with a clipped entry sums to more than U, but its quantised sum must also rank after every row within U,
    # or rows holding the far codeword tie with the true top k and fill the shortlist first (a review's case: 30 such
    # rows beside 10 at distance 1, recall 0). With the clip C' setting the step (C'/qmax), a clipped row's quantised
    # sum is at least qmax, and a row within U has at most (U − Σ min)/step + m/2: C' > C / (1 − (m + 1) / (2 qmax)).
    qmax = min(255, 65535 // (2 * mp2))
    room = 1.0 - (m + 1) / (2.0 * qmax)
    return (c / room if room > 0.0 else np.inf), u, est_k, est_l


@numba.njit(inline="always", **_JIT)
def _excess_keys(sums):
    """Sums of excesses (>= 0, or NaN) as uint64 keys in np.sort's order: a non-negative float64's bits rank as it
    does, and NaN takes the largest key (last, as np.sort puts it)."""
    keys = sums.copy().view(np.uint64)
    for i in range(sums.shape[0]):
        if sums[i] != sums[i]:
            keys[i] = np.uint64(0xFFFFFFFFFFFFFFFF)
    return keys


@numba.njit(inline="always", **_JIT)
def _excess_at(keys, r):
    """The r-th smallest (0-based) sum of :func:`_excess_keys`' keys (NaN for the NaN key), by radix selection
    (:func:`kvant.kernels.topk.select_u64`: Numba's np.partition took ~41 µs per 4,000 sampled sums, a fifth of a
    k = 1,000 search)."""
    v = select_u64(keys, r)
    if v == np.uint64(0xFFFFFFFFFFFFFFFF):
        return np.nan
    return np.array([v]).view(np.float64)[0]


@numba.njit(inline="always", **_JIT)
def _estimate_rank(r, f, n):
    """The rank among ``f`` rows sampled evenly from ``n`` at or above which the r-th smallest of all n should lie:
    r·f/n plus three standard deviations of a binomial count and 4 (f + 1, beyond the sample, when it cannot)."""
    if f >= n:
        return r
    mean = r * f / n
    return min(f + 1, np.int64(np.ceil(mean + 3.0 * np.sqrt(mean) + 4.0)))


@numba.njit(inline="always", **_JIT)
def _sample_bound(u, scale, m, margin):
    """The bound a row's quantised sum must stay below from the first row on (:func:`_push_candidates`), from U, the
    k-th smallest excess of the clip's sampled rows (:func:`_shortlist_cap`): those k rows hold no clipped entry and
    each entry rounds by at most half a unit, so they sum to at most U/scale + m/2 in LUT units, the k-th smallest sum
    is no larger, and a row more than ``margin`` above it cannot reach the top k. (Without it the first 2L rows all
    entered the shortlist.) 2·65535, no bound, when U is not finite."""
    b = u / scale + 0.5 * m + 2.0 + margin  # (+2: the float64 excess and the division may each round down)
    return np.int64(b) if b < 131070.0 else np.int64(131070)


@numba.njit(**_JIT)
def _pair_tables(lut8, lut2):
    for p in range(lut2.shape[0]):
        for byte in range(256):
            lut2[p, byte] = np.uint16(lut8[32 * p + (byte & 15)]) + np.uint16(lut8[32 * p + 16 + (byte >> 4)])


def quantize_luts(tables):
    """Quantised pair tables (nq, mp // 2, 256) u16 — entry ``[p, byte]`` is the quantised sum of sub-quantizers
    2p (low nibble) and 2p+1 (high nibble) — and the scale per query (for tests and the harness)."""
    nq, m, _ = tables.shape
    mp = m + (m & 1)
    lut2 = np.empty((nq, mp // 2, 256), dtype=np.uint16)
    lut8 = np.empty(mp * 16, dtype=np.uint8)
    scales = np.empty(nq, dtype=np.float64)
    for q in range(nq):
        scales[q] = _quantize_one(tables[q], mp, lut8)[0]
        _pair_tables(lut8, lut2[q])
    return lut2, scales



def _fs_emit(context, builder, nblk, luts, pk_data, off_v, stride_v, mp2_v):
    """IR of the FastScan accumulation of ``nblk`` (1 or 2) consecutive 32-row blocks for one or more queries:
    ``luts`` holds each query's table pointer (u8*: 16 · 2 entries per sub-quantizer pair). The code bytes are loaded
    and split into nibbles once per pair for all the queries. Returns each query's <rows x i16> sums."""
    rows = 32 * nblk
    i8, i16, i32, intp = ir.IntType(8), ir.IntType(16), ir.IntType(32), off_v.type
    v32i8, v16i8 = ir.VectorType(i8, 32), ir.VectorType(i8, 16)
    vbytes = ir.VectorType(i8, rows)
    vhalf = ir.VectorType(i16, rows // 2)  # one 16-bit lane per pair of rows (even row low byte, odd high)
    mod = builder.module

    def declare(name, width):
        ty = ir.VectorType(i8, width)
        return llvm_fn(mod, name, ty, [ty, ty])

    def shuffle16(table16, nib):
        """Look up each byte's nibble in the 16-entry table (``table16``: <16 x i8>)."""
        rep = builder.shuffle_vector(table16, table16, ir.Constant(ir.VectorType(i32, rows),
                                                                   [i % 16 for i in range(rows)]))
        if rows == 64 and _HAS_AVX512BW:
            return builder.call(declare("llvm.x86.avx512.pshuf.b.512", 64), [rep, nib])
        if _HAS_AVX2:
            fn = declare("llvm.x86.avx2.pshuf.b", 32)
            parts = []
            for h in range(rows // 32):
                sel = ir.Constant(ir.VectorType(i32, 32), [32 * h + i for i in range(32)])
                parts.append(builder.call(fn, [builder.shuffle_vector(rep, rep, sel),
                                               builder.shuffle_vector(nib, nib, sel)]))
            if len(parts) == 1:
                return parts[0]
            return builder.shuffle_vector(parts[0], parts[1], ir.Constant(ir.VectorType(i32, 64), list(range(64))))
        out = ir.Constant(vbytes, None)
        for lane in range(rows):
            li = ir.Constant(i32, lane)
            idx = builder.zext(builder.extract_element(nib, li), ir.IntType(32))
            out = builder.insert_element(out, builder.extract_element(table16, idx), li)
        return out

    slots_e = [cgutils.alloca_once_value(builder, ir.Constant(vhalf, [0] * (rows // 2))) for _ in luts]
    slots_o = [cgutils.alloca_once_value(builder, ir.Constant(vhalf, [0] * (rows // 2))) for _ in luts]
    eight = ir.Constant(vhalf, [8] * (rows // 2))
    m15 = ir.Constant(vbytes, [15] * rows)
    four = ir.Constant(vbytes, [4] * rows)
    with cgutils.for_range(builder, mp2_v) as loop:
        p32 = builder.mul(loop.index, ir.Constant(intp, 32))
        c = None
        for blk in range(nblk):  # block blk's 32 code bytes of pair p, blocks ``stride`` bytes apart
            o = builder.add(builder.add(off_v, p32), builder.mul(stride_v, ir.Constant(intp, blk)))
            part = builder.load(builder.bitcast(builder.gep(pk_data, [o]), v32i8.as_pointer()), align=1)
            c = part if c is None else builder.shuffle_vector(
                c, part, ir.Constant(ir.VectorType(i32, 64), list(range(64))))
        nlo = builder.and_(c, m15)
        nhi = builder.and_(builder.lshr(c, four), m15)
        for lut, slot_e, slot_o in zip(luts, slots_e, slots_o, strict=True):
            lptr = builder.gep(lut, [p32])
            hptr = builder.gep(lut, [builder.add(p32, ir.Constant(intp, 16))])
            lo16 = builder.load(builder.bitcast(lptr, v16i8.as_pointer()), align=1)
            hi16 = builder.load(builder.bitcast(hptr, v16i8.as_pointer()), align=1)
            w1 = builder.bitcast(shuffle16(lo16, nlo), vhalf)
            w2 = builder.bitcast(shuffle16(hi16, nhi), vhalf)
            # slot_e sums whole 16-bit lanes (even row + 256 · odd row, modulo 2^16), slot_o the odd rows alone;
            # the even rows' sums are recovered once per block below (no masking per pair)
            builder.store(builder.add(builder.load(slot_e), builder.add(w1, w2)), slot_e)
            od = builder.add(builder.lshr(w1, eight), builder.lshr(w2, eight))
            builder.store(builder.add(builder.load(slot_o), od), slot_o)
    totals = []
    half = rows // 2
    # row r of block blk sits in 16-bit lane 16·blk + (r >> 1): the even accumulator for even r
    inter = ir.Constant(ir.VectorType(i32, rows),
                        [16 * (r // 32) + (r % 32) // 2 + (half if r & 1 else 0) for r in range(rows)])
    for slot_e, slot_o in zip(slots_e, slots_o, strict=True):
        # even rows: (Σ even + 256 Σ odd) − 256 Σ odd, exact modulo 2^16 and each sum is < 2^16 (qmax · mp ≤ 65535)
        odd = builder.load(slot_o)
        even = builder.sub(builder.load(slot_e), builder.shl(odd, eight))
        totals.append(builder.shuffle_vector(even, odd, inter))
    return totals


def _fs_mask(builder, total, th_v, rows):
    """The rows (a bit each, as i64) whose sum in ``total`` is <= th (clamped to [0, 65535])."""
    i16, i64 = ir.IntType(16), ir.IntType(64)
    thc = builder.select(builder.icmp_signed(">", th_v, ir.Constant(i64, 65535)), ir.Constant(i64, 65535), th_v)
    thc = builder.select(builder.icmp_signed("<", thc, ir.Constant(i64, 0)), ir.Constant(i64, 0), thc)
    th16 = builder.trunc(thc, i16)
    mask = builder.bitcast(builder.icmp_unsigned("<=", total, splat(builder, th16, ir.VectorType(i16, rows))),
                           ir.IntType(rows))
    return mask if rows == 64 else builder.zext(mask, i64)


def _fs_codegen(nblk):
    """Code generator for the FastScan block scan over ``nblk`` (1 or 2) consecutive 32-row blocks, one query."""
    rows = 32 * nblk

    def codegen(context, builder, signature, args):
        acc_v, packed_v, off_v, stride_v, lut_v, mp2_v, th_v = args
        a_acc = context.make_array(signature.args[0])(context, builder, acc_v)
        a_pk = context.make_array(signature.args[1])(context, builder, packed_v)
        a_lut = context.make_array(signature.args[4])(context, builder, lut_v)
        (total,) = _fs_emit(context, builder, nblk, [a_lut.data], a_pk.data, off_v, stride_v, mp2_v)
        builder.store(total, builder.bitcast(a_acc.data, ir.VectorType(ir.IntType(16), rows).as_pointer()), align=2)
        return _fs_mask(builder, total, th_v, rows)

    return codegen


def _fs_codegen_multi(nblk, nqk):
    """:func:`_fs_codegen` for ``nqk`` queries at once (tables ``luts[j0 + i]``, thresholds ``ths[j0 + i]``): each
    query's sums go to ``acc[i, :rows]`` and its candidate mask to ``masks[i]``; returns their OR."""
    rows = 32 * nblk

    def codegen(context, builder, signature, args):
        acc_v, packed_v, off_v, stride_v, luts_v, j0_v, mp2_v, ths_v, masks_v = args
        a_acc = context.make_array(signature.args[0])(context, builder, acc_v)
        a_pk = context.make_array(signature.args[1])(context, builder, packed_v)
        a_luts = context.make_array(signature.args[4])(context, builder, luts_v)
        a_ths = context.make_array(signature.args[7])(context, builder, ths_v)
        a_masks = context.make_array(signature.args[8])(context, builder, masks_v)
        intp = off_v.type
        lstride = builder.extract_value(a_luts.strides, 0)
        astride = builder.extract_value(a_acc.strides, 0)
        luts = [builder.gep(a_luts.data, [builder.mul(builder.add(j0_v, ir.Constant(intp, i)), lstride)])
                for i in range(nqk)]
        totals = _fs_emit(context, builder, nblk, luts, a_pk.data, off_v, stride_v, mp2_v)
        i64 = ir.IntType(64)
        any_mask = ir.Constant(i64, 0)
        for i, total in enumerate(totals):
            acc8 = builder.bitcast(a_acc.data, ir.IntType(8).as_pointer())  # (strides are in bytes)
            dst = builder.gep(acc8, [builder.mul(ir.Constant(intp, i), astride)])
            builder.store(total, builder.bitcast(dst, ir.VectorType(ir.IntType(16), rows).as_pointer()), align=2)
            th = builder.load(builder.gep(a_ths.data, [builder.add(j0_v, ir.Constant(intp, i))]))
            mask = _fs_mask(builder, total, th, rows)
            builder.store(mask, builder.gep(a_masks.data, [ir.Constant(intp, i)]))
            any_mask = builder.or_(any_mask, mask)
        return any_mask

    return codegen


@intrinsic
def _fs_block(typingctx, acc, packed, off, stride, lut8, mp2, th):
    """acc[0:32] (u16) = Σ_p lut8[32p + (byte & 15)] + lut8[32p + 16 + (byte >> 4)], byte = packed[off + 32p + r].

    Returns a 32-bit mask (as int64) of the rows with acc <= th (th clamped to 65535): a superset of the rows
    that can beat a threshold th, found with one vector compare instead of 32 scalar ones.

    One 32-row block of the 4-bit FastScan. On AVX2 hosts the 16-entry lookups are ``vpshufb`` (32 lookups per
    instruction) with u16 accumulators held in registers across the sub-quantizer pairs; elsewhere the same IR
    is emitted with per-lane extract / insert (portable, slow). ``stride`` is unused (see :func:`_fs_block2`)."""
    return types.int64(acc, packed, types.intp, types.intp, lut8, types.intp, types.int64), _fs_codegen(1)


@intrinsic
def _fs_block2(typingctx, acc, packed, off, stride, lut8, mp2, th):
    """:func:`_fs_block` over two blocks at once: rows 0–31 from ``off``, rows 32–63 from ``off + stride``;
    acc[0:64] and a 64-bit mask. On AVX-512BW hosts each lookup is one 512-bit ``vpshufb`` (64 lookups)."""
    return types.int64(acc, packed, types.intp, types.intp, lut8, types.intp, types.int64), _fs_codegen(2)


# Queries a multi-query block scan serves per load of the codes (the nibbles are split once for all of them).
FS_QUERIES = 4


@intrinsic
def _fs_block_q(typingctx, acc, packed, off, stride, luts, j0, mp2, ths, masks):
    """:func:`_fs_block` for the ``FS_QUERIES`` queries j0 .. j0 + FS_QUERIES − 1 (tables ``luts[j]``, thresholds
    ``ths[j]``): query i's sums in acc[i, 0:32], its mask in masks[i]; returns the masks' OR (0: no candidate)."""
    sig = types.int64(acc, packed, types.intp, types.intp, luts, types.intp, types.intp, ths, masks)
    return sig, _fs_codegen_multi(1, FS_QUERIES)


@intrinsic
def _fs_block2_q(typingctx, acc, packed, off, stride, luts, j0, mp2, ths, masks):
    """:func:`_fs_block_q` over two blocks at once, as :func:`_fs_block2` (acc[i, 0:64], 64-bit masks)."""
    sig = types.int64(acc, packed, types.intp, types.intp, luts, types.intp, types.intp, ths, masks)
    return sig, _fs_codegen_multi(2, FS_QUERIES)


@numba.njit(inline="always", **_JIT)
def _exact_4bit(t, flat, r, m, mp2):
    base = (r >> 5) * mp2 * 32 + (r & 31)
    s = np.float32(0.0)
    for j in range(m):
        s += t[j, (flat[base + (j >> 1) * 32] >> (4 * (j & 1))) & 15]
    return s


@numba.njit(**_JIT)
def _pair_excess(excess, m):
    """(ceil(m/2), 256) float64: entry [p, b] is the excess of code byte b for sub-quantizers 2p (low nibble) and
    2p + 1 (high nibble; 0 past m), summed."""
    pairs = np.empty(((m + 1) // 2, 256))
    for p in range(pairs.shape[0]):
        for b in range(256):
            hi = excess[2 * p + 1, b >> 4] if 2 * p + 1 < m else 0.0
            pairs[p, b] = excess[2 * p, b & 15] + hi
    return pairs


@numba.njit(inline="always", **_JIT)
def _block_excess_pairs(pairs, flat, blk, n, mp2, out):
    """:func:`_block_excess` from :func:`_pair_excess`'s table: one lookup per code byte."""
    nr = min(32, n - blk * 32)
    out[:nr] = 0.0
    for p in range(pairs.shape[0]):
        base = blk * mp2 * 32 + p * 32
        e = pairs[p]
        for r in range(nr):
            out[r] += e[flat[base + r]]
    return nr


@numba.njit(inline="always", **_JIT)
def _block_excess(excess, flat, blk, n, m, mp2, out):
    """out[r] = Σ_j excess[j, code_j] (excess[j, v] = t[j, v] − min_j t[j], in float64) of row 32·blk + r, for the
    block's real rows (returns their number): each row's excess over Σ min_j, summed term by term (in j order) so
    that it survives beside entries far larger than it (where the row's sum minus Σ min_j rounds to 0)."""
    nr = min(32, n - blk * 32)
    out[:nr] = 0.0
    for j in range(m):
        base = blk * mp2 * 32 + (j >> 1) * 32
        shift = 4 * (j & 1)
        e = excess[j]
        for r in range(nr):
            out[r] += e[(flat[base + r] >> shift) & 15]
    return nr


# A FastScan shortlist entry is one int64 key, (quantised sum << _KEY_ROW_BITS) | row: integer order is the
# shortlist's order (sum, then row). Sums are at most 2·65535 (18 bits), rows below 2^40.
_KEY_ROW_BITS = 40
_KEY_ROW_MASK = (1 << _KEY_ROW_BITS) - 1
_KEY_EMPTY = ((65535 * 2) << _KEY_ROW_BITS) | _KEY_ROW_MASK  # an empty slot: after every real entry
# Shortlists longer than this are reservoirs of twice their length (rows below the threshold appended, a full one cut
# back to its L best by a selection, whose last sum becomes the threshold: O(1) per row); shorter ones stay sorted
# arrays (O(L) per insertion, but the threshold tightens with every one). PQ32x4 over 200k rows, 200 queries,
# k = 1,000 (L = 4,000) took 3.0 s sorted against FAISS FastScan's 29 ms (Zen 4, 2026-12-06).
RESERVOIR_MIN_L = 128


@numba.njit(**_JIT)
def shortlist_slots(L):
    """Slots a shortlist of ``L`` entries takes: L for a sorted array, 2L for a reservoir (RESERVOIR_MIN_L)."""
    return 2 * L if L > RESERVOIR_MIN_L else L


@numba.njit(inline="always", **_JIT)
def _push_candidates(mask, acc, ai, row0, keys, kj, fill, L, th, k, margin):
    """Push the rows set in ``mask`` (row ``row0 + r`` has quantised sum ``acc[ai, r]``) whose sums are below ``th``
    into the shortlist ``keys[kj]`` of ``L`` entries (:func:`shortlist_slots` slots: all :data:`_KEY_EMPTY` at first,
    ``fill`` 0, ``th`` 2·65535; 2-D arrays and a row index, as a view per call cost ~5% of a k = 1,000 search).
    Rows arrive in ascending order, so a sum equal to the threshold ranks after the entry that set it and is
    skipped. The threshold is the L-th smallest sum, or the k-th smallest plus ``margin`` plus one where
    that is lower: a row further than ``margin`` above the k-th smallest sum is beaten by each of the k
    (:func:`_shortlist_margin`), so it could not reach the top k, and admitting it only cost pushes. A reservoir
    stays in row order (:func:`_cut_shortlist`). Returns (fill, threshold)."""
    if keys.shape[1] > L:  # a reservoir: cut before a mask could overflow it, so the loop below calls nothing
        if fill + 64 > keys.shape[1]:
            fill, cut_th = _cut_shortlist(keys[kj], fill, L, k, margin)
            th = min(th, cut_th)  # (both bound the sums that can still matter: th may be the sample's, lower)
        while mask != 0:
            rr = _ctz(mask)
            mask &= mask - 1
            a = np.int64(acc[ai, rr])
            if a < th:
                keys[kj, fill] = (a << _KEY_ROW_BITS) | (row0 + rr)
                fill += 1
        return fill, th
    while mask != 0:
        rr = _ctz(mask)
        mask &= mask - 1
        a = np.int64(acc[ai, rr])
        if a < th:  # a sorted array
            key = (a << _KEY_ROW_BITS) | (row0 + rr)
            p = L - 1
            while p > 0 and keys[kj, p - 1] > key:
                keys[kj, p] = keys[kj, p - 1]
                p -= 1
            keys[kj, p] = key
            th = min(th, keys[kj, L - 1] >> _KEY_ROW_BITS, (keys[kj, k - 1] >> _KEY_ROW_BITS) + margin + 1)
    return fill, th


@numba.njit(inline="always", **_JIT)
def _shortlist_margin(t, m, scale, sumabs):
    """How far (in LUT units) a row's quantised sum may lie above the k-th smallest and still sum exactly to less
    than one of the k rows with the smallest quantised sums: each entry is rounded by at most half a unit (m/2 per
    row, m between two rows), plus the float32 rounding of the exact sums (:func:`_slack_units`). Those k rows hold
    no clipped entry (:func:`_shortlist_cap`: at least k rows sum below every row that does), and clipping only lowers
    a row's quantised sum, so the bound holds for every row. The certified mode keeps exactly these rows. No bound
    (2^20, beyond any sum) for a table ``t`` holding NaN, whose rows quantise low but sum to NaN and rank last, or
    whose exact sums could overflow float32 and tie at inf, to be ranked by row (a review found both pruning rows
    of the top k)."""
    if not sumabs < 1e38:
        return np.int64(1) << 20
    for j in range(m):
        for v in range(16):
            if t[j, v] != t[j, v]:
                return np.int64(1) << 20
    return np.int64(m) + _slack_units(m, sumabs, scale)


_SUM_HI_SHIFT = _KEY_ROW_BITS + 8  # a key's sum >> 8 (sums are below 2^17: 512 buckets)


@numba.njit(inline="always", **_JIT)
def _sum_at_rank(keys, fill, hist, r):
    """(the r-th smallest sum of keys[:fill] (1 <= r <= fill), how many entries sum to less), from ``hist``, the
    entries counted by sum >> 8: the bucket that holds rank r, then that bucket's entries counted by sum."""
    below = 0
    b = 0
    while below + hist[b] < r:
        below += hist[b]
        b += 1
    low = np.zeros(256, np.int64)
    for s in range(fill):
        if keys[s] >> _SUM_HI_SHIFT == b:
            low[(keys[s] >> _KEY_ROW_BITS) & 255] += 1
    v = 0
    while below + low[v] < r:
        below += low[v]
        v += 1
    return (np.int64(b) << 8) | v, below


@numba.njit(**_JIT)
def _cut_shortlist(keys, fill, L, k, margin):
    """Cut keys[:fill] (a reservoir: rows ascending, as appended) to what a shortlist of L keeps, still in row order:
    its L smallest by (sum, row), less those more than ``margin`` above the k-th smallest sum (they cannot reach the
    top k: :func:`_push_candidates`); the other slots of keys[:fill] are emptied. Returns (entries kept, the bound a
    later row's sum must be below). A radix selection on the sums: Numba's np.partition took 35-44 µs per 8,000 keys
    (NumPy's 7), most of a k = 1,000 search."""
    if fill <= k:
        return fill, np.int64(65535 * 2)
    hist = np.zeros(512, np.int64)
    for s in range(fill):
        hist[keys[s] >> _SUM_HI_SHIFT] += 1
    limit = _sum_at_rank(keys, fill, hist, k)[0] + margin  # the largest sum the bound admits
    if fill > L:
        sl, below = _sum_at_rank(keys, fill, hist, L)
    else:
        sl, below = np.int64(1) << 20, fill
    if limit < sl:  # the bound cuts deeper than the length: every entry up to the limit
        cut, ties, th = limit, 0, limit + 1
    else:  # the L best: every entry below the L-th sum, and the first (smallest) rows at it
        cut, ties, th = sl - 1, L - below, sl
    kept = 0
    for s in range(fill):
        key = keys[s]
        a = key >> _KEY_ROW_BITS
        if a <= cut or (a == cut + 1 and ties > 0):
            if a > cut:
                ties -= 1
            keys[kept] = key
            kept += 1
    for s in range(kept, fill):
        keys[s] = _KEY_EMPTY
    return kept, th


@numba.njit(inline="always", **_JIT)
def _shortlist_final(keys, fill, L, k, margin):
    """keys[:L] as the finished shortlist: its L best entries less those beyond the bound (:func:`_cut_shortlist`),
    empty slots last; a reservoir in row order, a sorted array ascending. Returns the entries kept (reservoirs; -1 for
    a sorted array)."""
    if keys.shape[0] > L:
        return _cut_shortlist(keys, fill, L, k, margin)[0]
    if L > k and keys[k - 1] != _KEY_EMPTY:
        cut = (keys[k - 1] >> _KEY_ROW_BITS) + margin
        for s in range(k, L):
            if keys[s] >> _KEY_ROW_BITS > cut:
                keys[s] = _KEY_EMPTY
    return -1


@numba.njit(inline="always", **_JIT)
def _optimistic_bound(est_k, est_l, scale, m, margin):
    """A guess at the bound a shortlist ends with, min(L-th smallest sum, k-th smallest + margin), from the clip
    sample's excesses at the ranks where the k-th and L-th of all rows should lie (:func:`_shortlist_cap`). Starting
    from the proven bound (:func:`_sample_bound`, the sample's k-th: a quarter of the rows at CAP_SAMPLE = 4) admitted
    ~15,000 rows per query into a 4,000-row shortlist at k = 1,000 over 200k codes, each pushed and most cut again.
    :func:`_shortlist_proven` checks the guess afterwards."""
    return min(_sample_bound(est_l, scale, m, 0), _sample_bound(est_k, scale, m, margin))


@numba.njit(**_JIT)
def _shortlist_proven(keys, kept, L, k, margin, start):
    """Whether a reservoir cut to its final ``kept`` entries (:func:`_shortlist_final`) after a scan that admitted
    only sums below ``start`` holds every row the proven bound would have kept. Every sum below ``start`` was
    admitted (the bound only tightened to values its entries proved), so it does if the L-th smallest sum of all rows
    is below ``start`` (L entries kept), or if at least k were and the k-th smallest plus the margin is (the rows
    kept are those up to it: :func:`_cut_shortlist`)."""
    if kept >= L:
        return True
    if kept < k:
        return False
    hist = np.zeros(512, np.int64)
    for s in range(kept):
        hist[keys[s] >> _SUM_HI_SHIFT] += 1
    return _sum_at_rank(keys, kept, hist, k)[0] + margin < start


@numba.njit(inline="always", **_JIT)
def _fs_step(acc, flat, b, b1, bbytes, lut8, mp2, th, n):
    """Scan block b, and block b + 1 with it on AVX-512BW hosts when it is below b1: (candidate mask of the
    real rows, blocks scanned, real rows). The first row of acc (1-D or 2-D) holds row 32·b + r's quantised sum
    at r."""
    two = _HAS_AVX512BW and b + 1 < b1
    if two:
        mask = _fs_block2(acc, flat, b * bbytes, bbytes, lut8, mp2, th)
    else:
        mask = _fs_block(acc, flat, b * bbytes, bbytes, lut8, mp2, th)
    width = 64 if two else 32
    nr = min(width, n - b * 32)
    if nr < width:
        mask &= (np.int64(1) << nr) - 1
    return mask, 2 if two else 1, nr


@numba.njit(inline="always", **_JIT)
def _slack_units(m, sumabs, scale):
    """The float32 rounding of the exact sums (m additions, relative 2^-24 each) in LUT units, plus one. Capped at
    2^20: any bound past 65535 + m admits every row, and an uncapped huge value (tables of magnitude ~1e25 with
    no spread: scale 1) overflowed the int64 conversion to a negative bound that admitted none."""
    s = np.ceil(2.0 * m * 6.0e-8 * sumabs / scale)
    if not s < 1048576.0:
        s = 1048576.0
    return np.int64(s) + 1


@numba.njit(parallel=True, **_JIT)
def _fastscan_exact_kernel(tables, flat, nblocks, mp2, n, m, k, nchunks, part_d, part_i):
    # Exact mode: keep every row whose quantised sum is within the error bound of the k-th best.
    # flat: the packed codes as one (nblocks * mp2 * 32,) uint8 array.
    nq = tables.shape[0]
    bchunk = (nblocks + nchunks - 1) // nchunks
    bbytes = mp2 * 32
    for w in prange(nq * nchunks):
        q = w // nchunks
        c = w - q * nchunks
        t = tables[q]
        dd = part_d[c, q]
        ii = part_i[c, q]
        dd[:] = np.inf
        ii[:] = -1
        lut8 = np.empty(bbytes, dtype=np.uint8)
        scale, sumabs = _quantize_one(t, 2 * mp2, lut8)
        # float32 rounding of the exact sums (m additions, relative 2^-24 each) expressed in LUT units
        slack = _slack_units(m, sumabs, scale)
        b0 = min(nblocks, c * bchunk)
        b1 = min(nblocks, b0 + bchunk)
        r_end = min(n, b1 * 32)
        acc = np.empty((1, 64), dtype=np.uint16)  # (2-D for _push_candidates; the block kernels fill row 0)
        r0 = b0 * 32
        nrows = max(0, r_end - r0)
        allacc = np.empty(nrows, dtype=np.uint16)
        keys = np.full((1, shortlist_slots(k)), _KEY_EMPTY, dtype=np.int64)
        fill = 0
        th = np.int64(65535 * 2)
        b = b0
        while b < b1:
            mask, nb, nr = _fs_step(acc, flat, b, b1, bbytes, lut8, mp2, th, n)
            o = b * 32 - r0
            for rr in range(nr):
                allacc[o + rr] = acc[0, rr]
            fill, th = _push_candidates(mask, acc, 0, b * 32, keys, 0, fill, k, th, k, 0)
            b += nb
        _shortlist_final(keys[0], fill, k, k, 0)
        th = np.int64(0)
        for s in range(k):  # the k-th smallest sum, the largest kept (2·65535, an empty slot's, if fewer rows)
            th = max(th, keys[0, s] >> _KEY_ROW_BITS)
        bound = th + m + slack
        if k <= ADC_RESERVOIR_MIN_K or not _exact_reservoir(t, flat, m, mp2, allacc, r0, bound,
                                                             part_d[c, q : q + 1], part_i[c, q : q + 1]):
            for x in range(nrows):
                if np.int64(allacc[x]) <= bound:
                    r = r0 + x
                    d = _exact_4bit(t, flat, r, m, mp2)
                    if d < dd[k - 1] or ii[k - 1] < 0:  # rows ascending: a tie never displaces
                        _push(dd, ii, k, d, r)


@numba.njit(**_JIT)
def _exact_reservoir(t, flat, m, mp2, allacc, r0, bound, out_d, out_i):
    """The exact mode's top k (out_d / out_i: (1, k)) of the rows r0 + x whose quantised sum allacc[x] is within
    ``bound``, by exact sum, ties to the smaller row, kept in a reservoir (kernels.direct_topk): O(1) per row, where
    inserting into the sorted list cost O(k) apiece (64 queries, k = 40,000 of 80k rows: 50 s). Returns False, with
    nothing written, at a NaN sum: the insertions' handling of those stays the rule (the caller falls back to them).
    A +inf sum (float32 overflow) enters while fewer than k rows are kept, as it does there."""
    k = out_d.shape[1]
    nrows = allacc.shape[0]
    slots = capacity(k, nrows)
    buf_d = np.empty((1, slots), dtype=np.float32)
    buf_i = np.empty((1, slots), dtype=np.int64)
    fill = np.zeros(1, dtype=np.int64)
    thr = np.full(1, np.inf, dtype=np.float32)
    for x in range(nrows):
        if np.int64(allacc[x]) <= bound:
            d = _exact_4bit(t, flat, r0 + x, m, mp2)
            if d != d:
                return False
            if _admits(d, thr[0]):
                _append(buf_d, buf_i, fill, thr, 0, d, r0 + x, k)
    finish_lists(buf_d, buf_i, fill, out_d, out_i)
    return True


@numba.njit(parallel=True, **_JIT)
def _fastscan_shortlist_kernel(tables, flat, nblocks, mp2, n, m, k, rerank, nchunks, group, tile, part_a, part_r,
                               margins, out_d, out_i):
    # Shortlist mode. A work item is a group of queries x a chunk of blocks; it walks its blocks in tiles
    # of ``tile`` blocks and scans each tile for every query of the group before the next, so a tile is
    # read from memory once per group and from L1/L2 for the others (one query at a time streamed all the
    # codes per query: 16 MB at 1M PQ32x4 codes, and the scan was bound by that stream).
    # With one chunk a group's shortlists are complete when its scan ends, and it re-scores them itself (no second
    # parallel region, which cost a worker's wake-up per search: up to ~0.4 ms on this VM after an idle spell).
    nq = tables.shape[0]
    bchunk = (nblocks + nchunks - 1) // nchunks
    bbytes = mp2 * 32
    ngroups = (nq + group - 1) // group
    L = rerank * k
    for w in prange(ngroups * nchunks):
        gi = w // nchunks
        c = w - gi * nchunks
        q0 = gi * group
        g = min(nq, q0 + group) - q0
        luts = np.empty((g, bbytes), dtype=np.uint8)
        sk = np.full((g, shortlist_slots(L)), _KEY_EMPTY, dtype=np.int64)  # per query: its shortlist's keys
        fills = np.zeros(g, dtype=np.int64)
        th = np.full(g, 65535 * 2, dtype=np.int64)
        marg = np.empty(g, dtype=np.int64)
        safe = np.empty(g, dtype=np.int64)  # each query's proven starting bound
        # One chunk with reservoirs: start from a guess of the final bound and check it at the end (_optimistic_bound)
        guess = nchunks == 1 and shortlist_slots(L) > L
        for j in range(g):
            t = tables[q0 + j]
            clip, u, est_k, est_l = _shortlist_cap(t, flat, n, m, mp2, k, L if guess else 0)
            scale, sumabs = _quantize_one(t, 2 * mp2, luts[j], clip)
            marg[j] = _shortlist_margin(t, m, scale, sumabs)
            safe[j] = th[j] = _sample_bound(u, scale, m, marg[j])
            if guess:
                th[j] = min(th[j], _optimistic_bound(est_k, est_l, scale, m, marg[j]))
            if c == 0:  # (every chunk's work item finds the same margin; one writes it for _rescore_query)
                margins[q0 + j] = marg[j]
        start = th.copy()
        b0 = min(nblocks, c * bchunk)
        b1 = min(nblocks, b0 + bchunk)
        acc = np.empty((1, 64), dtype=np.uint16)  # (2-D for _push_candidates; the block kernels fill row 0)
        accq = np.empty((FS_QUERIES, 64), dtype=np.uint16)
        masks = np.empty(FS_QUERIES, dtype=np.int64)
        multi = (g // FS_QUERIES) * FS_QUERIES if _HAS_AVX2 else 0  # queries scanned FS_QUERIES at a time
        for t0 in range(b0, b1, tile):
            t1 = min(b1, t0 + tile)
            for j0 in range(0, multi, FS_QUERIES):
                b = t0
                while b < t1:
                    two = _HAS_AVX512BW and b + 1 < t1
                    if two:
                        anym = _fs_block2_q(accq, flat, b * bbytes, bbytes, luts, j0, mp2, th, masks)
                    else:
                        anym = _fs_block_q(accq, flat, b * bbytes, bbytes, luts, j0, mp2, th, masks)
                    if anym != 0:
                        width = 64 if two else 32
                        nr = min(width, n - b * 32)
                        for i in range(FS_QUERIES):
                            mask = masks[i]
                            if nr < width:
                                mask &= (np.int64(1) << nr) - 1
                            if mask != 0:
                                fills[j0 + i], th[j0 + i] = _push_candidates(mask, accq, i, b * 32, sk, j0 + i,
                                                                             fills[j0 + i], L, th[j0 + i], k,
                                                                             marg[j0 + i])
                    b += 2 if two else 1
            for j in range(multi, g):
                lut8 = luts[j]
                fj = fills[j]
                thj = th[j]
                b = t0
                while b < t1:
                    mask, nb, nr = _fs_step(acc, flat, b, t1, bbytes, lut8, mp2, thj, n)
                    fj, thj = _push_candidates(mask, acc, 0, b * 32, sk, j, fj, L, thj, k, marg[j])
                    b += nb
                th[j] = thj
                fills[j] = fj
        for j in range(g):
            # (each chunk's k-th sum sets its bound: no tighter than all chunks' k-th, which _rescore_query applies)
            kept = _shortlist_final(sk[j], fills[j], L, k, marg[j])
            if start[j] < safe[j] and not _shortlist_proven(sk[j], kept, L, k, marg[j], start[j]):
                # the guess was too low (rare): scan this query's rows again from the proven bound
                sk[j, :] = _KEY_EMPTY
                fj = 0
                thj = safe[j]
                b = b0
                while b < b1:
                    mask, nb, nr = _fs_step(acc, flat, b, b1, bbytes, luts[j], mp2, thj, n)
                    fj, thj = _push_candidates(mask, acc, 0, b * 32, sk, j, fj, L, thj, k, marg[j])
                    b += nb
                _shortlist_final(sk[j], fj, L, k, marg[j])
            for s in range(L):
                key = sk[j, s]
                part_a[c, q0 + j, s] = key >> _KEY_ROW_BITS
                part_r[c, q0 + j, s] = -1 if key == _KEY_EMPTY else key & _KEY_ROW_MASK
        if nchunks == 1:
            for j in range(g):
                _rescore_query(tables, flat, mp2, m, part_a, part_r, margins, out_d, out_i, q0 + j)


@numba.njit(inline="always", **_JIT)
def _rescore_query(tables, flat, mp2, m, part_a, part_r, margins, out_d, out_i, q):
    # The L rows with the smallest (quantised sum, row) over every chunk's shortlist (each chunk keeps its own L
    # smallest in that order, so these are the L one chunk over all rows would keep), re-scored exactly. Re-scoring
    # each chunk's shortlist instead made the result depend on the chunk count, and so on the batch size: 68 of 300
    # queries changed ids at rerank=1 between one-at-a-time and batched search. Rows more than margins[q] above the
    # k-th smallest sum of all chunks are left out (_cut_shortlist: they cannot reach the top k).
    nchunks, _, L = part_a.shape
    k = out_d.shape[1]
    t = tables[q]
    dd = out_d[q]
    ii = out_i[q]
    aa = np.empty(nchunks * L, dtype=np.int64)
    rr = np.empty(nchunks * L, dtype=np.int64)
    f = 0
    for c in range(nchunks):
        for s in range(L):
            if part_r[c, q, s] < 0:
                break
            aa[f] = part_a[c, q, s]
            rr[f] = part_r[c, q, s]
            f += 1
    if nchunks > 1:
        order = np.argsort(aa[:f], kind="mergesort")  # stable: chunks are in row order, so ties keep row order
        take = min(f, L)
        if take > k:
            cut = aa[order[k - 1]] + margins[q]
            while aa[order[take - 1]] > cut:
                take -= 1
    else:
        order = np.arange(f)
        take = f
    if k <= RESCORE_PUSH_MAX_K:
        for s in range(take):
            r = rr[order[s]]
            d = _exact_4bit(t, flat, r, m, mp2)
            if d < dd[k - 1] or (d == dd[k - 1] and (ii[k - 1] < 0 or r < ii[k - 1])):
                _push(dd, ii, k, d, r)
        return
    # long lists: every exact sum first, in row order (neighbouring rows share the packed blocks' cache lines), then
    # the k best by (sum, row), where pushing each into the sorted list cost O(k) apiece
    rs = np.empty(take, dtype=np.int64)
    ascending = True
    for s in range(take):
        rs[s] = rr[order[s]]
        ascending &= s == 0 or rs[s] > rs[s - 1]
    if not ascending:  # (one chunk's reservoir is in row order already; Numba's sort took ~5 ns a row even then)
        rs.sort()  # (rows are distinct)
    ds = np.empty(take, dtype=np.float32)
    nan = False
    for s in range(take):
        ds[s] = _exact_4bit(t, flat, rs[s], m, mp2)
        nan |= ds[s] != ds[s]
    top = min(k, take)
    # the k best as packed (sum bits, row) keys, a partition and a sort of k, where sorting all L took most of this
    if take and not nan and best_packed(ds, rs, take, top, dd, ii, np.empty(take, np.uint64),
                                        np.empty(top, np.uint32)) >= 0:
        return
    best = np.argsort(ds, kind="mergesort")  # stable: equal sums keep the smaller row first (NaN last)
    for s in range(top):
        dd[s] = ds[best[s]]
        ii[s] = rs[best[s]]


# Top-k lists up to this long take each re-scored row by insertion; longer ones sort (_rescore_query).
RESCORE_PUSH_MAX_K = 32


@numba.njit(parallel=True, **_JIT)
def _rescore_shortlists(tables, flat, mp2, m, part_a, part_r, margins, out_d, out_i):
    for q in prange(part_a.shape[1]):
        _rescore_query(tables, flat, mp2, m, part_a, part_r, margins, out_d, out_i, q)


@numba.njit(**_JIT)
def _rescore_shortlists_serial(tables, flat, mp2, m, part_a, part_r, margins, out_d, out_i):
    for q in range(part_a.shape[1]):
        _rescore_query(tables, flat, mp2, m, part_a, part_r, margins, out_d, out_i, q)


# Batches of at most this many queries re-score their shortlists on the calling thread (a few microseconds each,
# less than a parallel region).
SERIAL_RESCORE_QUERIES = 16


# Shortlist mode: queries sharing each tile of codes, and the tile's size. 256 KB tiles stay in the 2 MB
# per-core L2 of the reference host with room for the group's tables (16 x 16·mp bytes).
FASTSCAN_GROUP = 16
FASTSCAN_TILE_BYTES = 1 << 18
# Batches of at most this many queries (shortlist mode) are one work item per thread. Below FS_QUERIES queries per
# thread they split the codes into one chunk per thread and scan each chunk for every query (a thread with fewer than
# FS_QUERIES queries of its own would lose the multi-query scan); from there on they split the queries, each thread
# scanning all codes for ~nq / threads of them. Splitting the codes repeats each query's table quantisation, clip and
# shortlist warm-up (its first rows all enter) in every chunk, ~6 µs per query and chunk at 60k codes. 2 threads,
# Intel host, 2026-12-05, medians of 30-300 back-to-back calls, random PQ16x4 / PQ32x4 codes (µs, split queries /
# split codes): 60k codes 10 queries 134 / 192 and 199 / 264, 32 queries 385 / 539 and 577 / 751; 1M codes 10
# queries 1,281 / 1,325 and 2,179 / 2,252, 32 queries 3,503 / 3,636 and 5,957 / 6,266; 4 queries split codes:
# 1M 522 / 690 and 909 / 1,220 (split queries). (Before 2026-12-05 the general rule below took 10 queries over 1M
# PQ32x4 codes in groups of 2: 4.19 ms against 2.81 ms split by codes.)
FASTSCAN_SMALL_BATCH = 32
# Sub-quantizers a FastScan can take: its u16 sums give each a quantised table entry of at most 65535 // m' (m' = m
# rounded up to even), which must be at least 1 (m = 65535 had a zero range and divided by it: a review).
FASTSCAN_MAX_M = 65534


def fastscan_search(tables, packed, n, m, k, rerank, nchunks=None, group=None, tile_blocks=None):
    """4-bit FastScan top-k: (dist (nq, k) float32 exact ADC distances, idx (nq, k) int64).

    ``tables`` (nq, m, 16) float32; ``packed`` from :func:`pack_codes_4bit`. ``rerank >= 1`` re-scores the
    ``rerank * k`` rows with the smallest quantised sums; ``rerank = 0`` is the exact mode (module doc).
    ``group`` / ``tile_blocks`` (shortlist mode) set how many queries scan each tile of blocks together and the
    tile's size (default ``FASTSCAN_TILE_BYTES``). By default a batch of at most ``FASTSCAN_SMALL_BATCH`` queries is
    one work item per thread: with at least ``FS_QUERIES`` queries per thread each thread takes its share of the
    queries over all codes, else every query over its chunk of the codes; larger batches take groups of at most
    ``FASTSCAN_GROUP``, lowered so each thread gets two work items. These, ``nchunks`` (how the codes are split among
    threads) and the thread count change the speed, never the result.
    """
    if m > FASTSCAN_MAX_M:
        raise ValueError(f"FastScan takes at most {FASTSCAN_MAX_M} sub-quantizers, got m={m}")
    nq = tables.shape[0]
    k = int(k)
    out_d = np.full((nq, k), np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    if nq == 0 or k == 0 or n == 0:
        return out_d, out_i
    nblocks = packed.shape[0]
    threads = numba.get_num_threads()
    # a small batch in shortlist mode: one work item per thread (FASTSCAN_SMALL_BATCH)
    small = rerank >= 1 and nq <= FASTSCAN_SMALL_BATCH
    # enough queries for a multi-query scan on every thread: split the queries, not the codes
    small_by_query = small and threads > 1 and nq >= FS_QUERIES * threads
    if nchunks is None:
        if nblocks < 256 or small_by_query:
            nchunks = 1
        elif small:
            nchunks = max(1, min(threads, nblocks // 128))
        else:
            nchunks = 1 if nq >= 4 * threads else min(threads * 2, nblocks // 128)
    nchunks = max(1, int(nchunks))
    flat = packed.reshape(-1)
    mp2 = packed.shape[1]
    if rerank >= 1:
        rerank = min(int(rerank), -(-int(n) // k))  # a shortlist of n rows holds every row: no longer one
        if group is None:  # small batches: every query, or a thread's share of them; else at most FASTSCAN_GROUP,
            # two work items per thread
            if small_by_query:
                group = -(-nq // threads)
            else:
                group = nq if small else min(FASTSCAN_GROUP, nq * nchunks // (2 * threads))
        group = max(1, int(group))
        tile = max(1, int(FASTSCAN_TILE_BYTES // (32 * mp2) if tile_blocks is None else tile_blocks))
        tile += tile & 1  # even, so the two-block steps of AVX-512 hosts pair the same blocks in every tile
        L = int(rerank) * k
        part_a = np.empty((nchunks, nq, L), dtype=np.int64)
        part_r = np.empty((nchunks, nq, L), dtype=np.int64)
        margins = np.empty(nq, dtype=np.int64)
        _fastscan_shortlist_kernel(tables, flat, nblocks, mp2, int(n), int(m), k, int(rerank), nchunks, group, tile,
                                   part_a, part_r, margins, out_d, out_i)
        if nchunks > 1:  # (one chunk: re-scored in the scan's work items)
            rescore = _rescore_shortlists_serial if nq <= SERIAL_RESCORE_QUERIES else _rescore_shortlists
            rescore(tables, flat, mp2, int(m), part_a, part_r, margins, out_d, out_i)
        return out_d, out_i
    part_d = np.empty((nchunks, nq, k), dtype=np.float32)
    part_i = np.empty((nchunks, nq, k), dtype=np.int64)
    _fastscan_exact_kernel(tables, flat, nblocks, mp2, int(n), int(m), k, nchunks, part_d, part_i)
    if nchunks == 1:
        return part_d[0], part_i[0]
    _merge_parts(part_d, part_i, out_d, out_i)
    return out_d, out_i
