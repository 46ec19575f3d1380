"""Exact brute-force search: the ground truth every approximate index is measured against.

Queries are processed in blocks of rows against blocks of stored vectors; each (query block x vector
block) distance tile comes from BLAS (:mod:`kvant.kernels.distance`) and is merged into a running top-k
(:func:`kvant.kernels.topk.merge_topk`), so memory stays bounded at any size. ``cos`` normalises stored
vectors and queries and then searches by inner product.
"""

from __future__ import annotations

import numpy as np

from .. import persist
from .._config import get_num_threads, with_threads
from .._numerics import condition, conditioning, magnitude_scale, row_magnitude_scales, scale_rows, scale_steps
from .._parallel import for_each_block
from ..errors import PersistError
from ..kernels import amx_topk, direct_topk
from ..kernels._llvm import half_rate_avx512
from ..kernels.direct_assign import BLAS_LACKS_AVX512
from ._common import (
    Rows,
    as_queries,
    as_vectors,
    check_dim,
    check_ids_array,
    check_k,
    check_metric,
    check_new_ids,
    check_next_id,
    check_remove_ids,
    copy_with_rows,
    default_ids,
    finish_results,
    normalize_rows,
    require_nonempty,
)

__all__ = ["FlatIndex"]

_TILE = 1 << 22  # elements of one (query block x vector block) distance tile: 16 MiB of float32
# Batches of at least this many queries (l2, ip/cos unscaled; at most direct_topk.MAX_BATCH queries on AVX2 hosts)
# skip BLAS for the fused kernel of kernels.direct_topk. 1M x 128, k = 10, Intel host, 2026-12-05, each path run on
# its own: 2 queries 31 vs 63 ms, 16: 35 vs 90 ms; in benchmarks/flat.py (alternating with FAISS) 1,024: 1.07 vs
# 1.75 s. A single query is a matrix-vector product, where BLAS (17 ms) beats the kernel (31 ms: its 16 lanes hold
# one query). Lists of any length take it (reservoirs: O(1) per kept row); until 2026-12-06 lists of more than 1,024
# rows took the BLAS tiles, whose sorted lists cost O(keep) per insertion: k = 5,000 over 50k × 32, 200 queries,
# 9.2 s against FAISS's 0.14 s (Zen 4).
DIRECT_MIN_QUERIES = 2
# Where the fused kernel does not take a batch (AVX2 hosts beyond direct_topk.MAX_BATCH queries), lists of at least
# this many rows take BLAS blocks screened into reservoirs (_blas_screen_topk) at any width, not the BLAS tiles'
# sorted lists, whose insertions cost O(keep). Zen 4, 100k × 64, 256 queries, the fused kernel switched off, one
# process, medians of 7, tiles / screened blocks (2026-12-06): k = 64 (keep 136) 79 / 102 ms, k = 100 (208) 100 / 78,
# k = 150 (308) 125 / 98, k = 200 179 / 111; at k = 1,000 (100 queries) 480 / ~55.
SCREEN_MIN_KEEP = 200
# Searches for k >= SHORT_KEEP_MIN_K first keep k + k/16 + 8 rows per query rather than 2k + 8, both certified the
# same way: a list that costs about half as much, and enough wherever few rows tie at the k-th. The first
# SHORT_KEEP_PROBE queries try it; if more than 1 in SHORT_KEEP_MAX_MISSES of them cannot be certified (ties), the
# others go straight to 2k + 8. 200 queries, Intel host, 2026-12-06 (ms, 2k + 8 / k + k/16 + 8 for all queries):
# 50k × 32 ip k = 5,000 170 / 105, 100k × 64 k = 1,000 37 / 25, 20k × 3 k = 100 27 / 18; integer coordinates
# (100k × 3 in 0..59, 100k × 16 in 0..2) at k = 100: 11 / 27 and 22 / 55, which the probe of 16 queries holds to
# 11 / 12 and 22 / 25 (k = 1,000: 56 / 62).
SHORT_KEEP_MIN_K = 64
SHORT_KEEP_PROBE = 16
SHORT_KEEP_MAX_MISSES = 4
# Wide rows and many queries: the fused kernel's products reach ~230 GFLOP/s, BLAS's ~260-280. Such batches multiply
# row blocks by the queries with single-threaded BLAS in each worker thread (a BLAS_SCREEN_ROWS × ≤ BLAS_SCREEN_QUERIES
# tile that stays in L2/L3) and screen the tile with the fused kernel's screen (direct_topk.keep_from_products): no
# tile goes through main memory. 300k rows, k = 10, ip, 2 threads, Intel host, 2026-12-05, GFLOP/s fused / this /
# FAISS IndexFlatIP: D = 768 nq = 1,000 235 / 265 / 267, nq = 256 214 / 237 / 237, nq = 4,000 237 / 259 / 277;
# D = 1,536 nq = 256 232 / 255 / 256, nq = 1,000 230 / 281 / 285; 1M rows, D = 384 nq = 1,000 247 / 267 / 253. The fused
# kernel stays ahead below (D = 384 nq = 128: 246 / 224; D = 768 nq = 64: 215 / 168; D <= 256 at any batch).
# On AMD Zen 4 (kernels._llvm.HALF_RATE_AVX512; OpenBLAS 0.3.31 runs its SkylakeX kernels there) the fused kernel was
# ahead at every wide shape measured, so such hosts never take the BLAS blocks. GFLOP/s fused / BLAS blocks, cos,
# k = 10, 2 threads, 2026-12-06: 100k × 1,536 nq = 256 209 / 178, nq = 1,024 200 / 180; 300k × 768 nq = 1,000
# 199 / 175; 100k × 768 nq = 4,000 182 / 169; 300k × 384 nq = 1,000 203 / 183; 100k × 384 nq = 4,000 167 / 149.
# Nor do AVX-512 hosts whose BLAS lacks AVX-512 kernels (kernels.direct_assign.BLAS_LACKS_AVX512: AMD Zen 5, where
# OpenBLAS 0.3.31 runs its Haswell kernels). GFLOP/s fused / BLAS blocks, k = 10, 2 threads, medians of 3,
# 2026-12-06: cos 300k × 768 nq = 1,000 291 / 174, nq = 4,000 308 / 182; 100k × 1,536 nq = 256 345 / 153, nq = 1,024
# 293 / 181; l2 300k × 384 nq = 1,000 291 / 174, 300k × 768 nq = 1,000 304 / 167.
BLAS_SCREEN_MIN_DIM = 1 << 62 if half_rate_avx512() or BLAS_LACKS_AVX512 else 384
BLAS_SCREEN_MIN_WORK = 1 << 18  # queries × D
BLAS_SCREEN_ROWS = 1024
BLAS_SCREEN_QUERIES = 1024
# On hosts with AMX, batches of at least AMX_MIN_QUERIES queries of AMX_MIN_DIM or more dimensions, queries × D at
# least AMX_MIN_WORK (k up to AMX_MAX_K), first take kernels.amx_topk's bf16 pass: per query a buffer of up to
# AMX_BUFFER_PER_K·k + AMX_BUFFER_EXTRA rows that may still be among the k nearest; queries whose buffer overflows take
# the float32 passes. Intel host, 2026-12-05, l2, k = 10, medians of 3, this pass / the float32 paths: 300k × 64 rows
# 64 queries 0.93×, 128 1.32×; 300k × 128 64 0.96×, 128 1.57×; 100k × 384 32 1.14×, 64 1.32×; 100k × 768 32 1.01×,
# 64 1.24×; 20k × 128 128 1.02×; 50k × 128, 20k × 768, 300k × 768 and 1M × 128 at 256-1,024 queries 1.22-3.49×.
AMX_MIN_DIM = 32
AMX_MIN_QUERIES = 64
AMX_MIN_WORK = 1 << 14
# Below this many rows the pass's fixed costs (centre, packing, seeding: ~1-3 ms) outweighed its products (a review,
# 2026-12-05: 3,000 × 768 rows 64 queries 5.8 against 3.7 ms, 200 × 128 128 queries 1.8 against 1.0 ms)
AMX_MIN_ROWS = 16384
AMX_MAX_K = 128
AMX_BUFFER_PER_K = 8
AMX_BUFFER_EXTRA = 64
AMX_SEED_PER_K = 32  # rows spread over the data whose bounds every thread's lists start from
AMX_SEED_EXTRA = 256

# The shortlists' per-chunk lists (12 bytes per entry), at most: fewer row chunks, or fewer query blocks per call,
# when they would hold more (unless one block's lists of one chunk alone do: they are the answer's size). The BLAS
# path's tile is 16 MiB.
_DIRECT_LISTS_BYTES = 64 << 20
# Besides those lists, each running task (one per thread) holds its reservoirs (queries × direct_topk.capacity(keep)
# × 12 bytes), at most this much: long lists take narrower blocks of queries (k = 5,000: 32 queries of 20,016
# slots, 7.7 MiB)
_RESERVOIR_BYTES = 8 << 20


def _reservoir_width(keep: int, rows: int = 1 << 62) -> int:
    """The most queries (a multiple of 16, at least 16) whose reservoirs for lists of ``keep`` over ``rows`` rows fit
    ``_RESERVOIR_BYTES``."""
    return max(16, _RESERVOIR_BYTES // (12 * direct_topk.capacity(keep, rows)) // 16 * 16)


def _gemm_l2_error(dim: int, q_sq: np.ndarray, x_sq_max: float) -> np.ndarray:
    """Bound on |GEMM-form − exact| squared L2 in float32 for each query: the dot product errs by at most
    dim·u·‖q‖‖x‖ (u = 2**-24), the norms and the two additions by a few u·(‖q‖² + ‖x‖²); with
    2‖q‖‖x‖ <= ‖q‖² + ‖x‖² that is (dim + 5)·u·(‖q‖² + ‖x‖²). Doubled for safety (BLAS may block sums)."""
    return 2.0 * (dim + 5) * 2.0**-24 * (q_sq + x_sq_max)


def _gemm_ip_error(dim: int, q_norm: np.ndarray, x_norm_max: float) -> np.ndarray:
    """Bound on |float32 − exact| q·x for each query (norms in the units the products were formed in): any summation
    order errs by at most γ_dim·Σ|q_t x_t| <= (dim + 2)·u·‖q‖‖x‖, doubled for safety as in :func:`_gemm_l2_error`, plus
    2·dim·2**-149 for products that underflow. Infinite where a partial sum could overflow float32 (a row that
    overflowed is NaN, never kept, so nothing can be certified)."""
    bound = q_norm * x_norm_max
    with np.errstate(over="ignore", invalid="ignore"):
        err = 2.0 * (dim + 2) * 2.0**-24 * bound + 2.0 * dim * 2.0**-149
    return np.where(bound < 2.0**127, err, np.inf)


def _rescore_exact(q: np.ndarray, x: np.ndarray, out_d: np.ndarray, out_i: np.ndarray, ip: bool = False) -> None:
    """Replace the float32 scores of the selected neighbours by exact ones in float64, Σ(q−x)² or, with ``ip``,
    −Σ q·x, and re-sort (ties by row), so the returned distances are exact even where ‖q‖² + ‖x‖² − 2q·x rounds
    (near-duplicates) or two inner products round alike (:func:`kvant.kernels.distance.exact_rerank`). The sums are the
    full scan's (``exact_topk``) own: with NumPy's pairwise sums here, a review (2026-12-05) found a query answered
    with different tied rows depending on which of the two it took (20 rows at one exact distance whose float64 sums
    differ by rounding, dim 700)."""
    from ..kernels.distance import exact_rerank

    exact_rerank(q, x, out_i, out_d, ip)


CHUNKS_PER_THREAD = 4  # row chunks per thread in the shortlist passes (load balance) ...
SHORT_CHUNK_ROWS_PER_KEEP = 64  # ... unless a chunk would hold fewer than this many rows per list entry


def _chunks_per_thread(n: int, keep: int) -> int:
    """Row chunks per thread for a shortlist pass over ``n`` rows keeping ``keep`` per query. Each chunk fills its own
    lists from empty, about keep·(1 + ln(rows/keep)) insertions per query and chunk, so short chunks of long lists
    multiply the insertions: 20,000 × 3 rows, k = 100 (keep 208), 1,000 queries took 0.24 s in 8 chunks against
    FAISS's 0.04 s (Zen 4, 2026-12-06). Such passes take one chunk per thread."""
    threads = max(1, get_num_threads())
    return CHUNKS_PER_THREAD if n >= SHORT_CHUNK_ROWS_PER_KEEP * keep * CHUNKS_PER_THREAD * threads else 1


def _direct_split(n: int, nq: int, keep: int, max_width: int, threads: int) -> tuple[int, int, int]:
    """(queries per block, blocks, row chunks) for the fused shortlist of ``nq`` queries over ``n`` rows keeping
    ``keep`` per query, blocks at most ``max_width`` queries wide. Long chunks split the rows, a few chunks per thread
    (:func:`_chunks_per_thread`), into as few blocks as that width allows. Short chunks of long lists split the queries
    instead, into a multiple of ``threads`` blocks of similar width, so that each query's list fills once over all
    the rows: 20,000 × 3 rows, k = 100 (keep 208), 1,000 queries, two threads took 90 ms in two row chunks and
    52 ms in four query blocks (Zen 4, 2026-12-06); rows are split too only when there are fewer queries than
    threads × 16."""
    rows_per_thread = _chunks_per_thread(n, keep)
    split_rows = rows_per_thread > 1 or nq <= 16
    # blocks of similar width: every padded column costs its products (300k × 768, 256 queries in blocks of at most
    # 160: 160 + 96 wide, not 160 + 160)
    wanted = -(-nq // max_width) if split_rows else threads * -(-nq // (threads * max_width))
    width = 16 * -(-nq // (16 * wanted))
    blocks = -(-nq // width)
    chunks = rows_per_thread * threads if split_rows else -(-threads // blocks)
    return width, blocks, max(1, min(chunks, n // 64))


class FlatIndex:
    """Exact k-nearest-neighbour search by brute force.

    ``metric``: ``"l2"`` (default; squared L2 distances, ascending), ``"ip"`` (inner products, descending) or
    ``"cos"`` (rows and queries normalised, then ``"ip"``). Results are exact: the module docstring says how the
    GEMM candidates are certified and re-scored.

    >>> import numpy as np, kvant
    >>> x = np.random.default_rng(0).standard_normal((1000, 16)).astype("float32")
    >>> index = kvant.FlatIndex(16, metric="l2")
    >>> index.add(x)
    >>> dist, ids = index.search(x[:3], k=5)
    >>> ids[:, 0].tolist()
    [0, 1, 2]
    """

    _kind = "FlatIndex"
    is_trained = True

    def __init__(self, dim: int, metric: str = "l2"):
        self.dim = check_dim(dim)
        self.metric = check_metric(metric)
        self._x = Rows((self.dim,), np.float32)
        self._norms = Rows((), np.float32)
        self._ids = Rows((), np.int64)
        self._next_id = 0

    __copy__ = copy_with_rows  # copy.copy: independent stores (see copy_with_rows)

    def __len__(self) -> int:
        return self._ids.n

    @property
    def ntotal(self) -> int:
        return self._ids.n

    @property
    def ids(self) -> np.ndarray:
        """The stored ids, in storage order (a copy)."""
        return self._ids.view.copy()

    def train(self, x=None) -> FlatIndex:
        """Nothing to learn; present so every index has the same life cycle."""
        return self

    @with_threads
    def add(self, x, ids=None) -> None:
        """Store vectors ``x`` (any kvant.io source) under ``ids`` (default: consecutive new ids)."""
        from ..kernels.distance import sq_norms

        src = as_vectors(x, self.dim)
        new_ids = check_new_ids(ids, src.n, self._ids.view)
        if new_ids is None:  # (before any row is stored: it raises when the id space is used up)
            new_ids = default_ids(self._next_id, src.n)
        start = self._x.n
        # chunks() raises on NaN before the rows count (Rows.extend), so a failed add stores nothing
        self._x.extend((normalize_rows(block) if self.metric == "cos" else block for _, block in src.chunks()), src.n)
        self._norms.append(sq_norms(self._x.view[start:]))
        self._ids.append(new_ids)
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)

    @with_threads
    def search(self, q, k: int):
        """``(distances, ids)`` of the ``k`` nearest stored vectors to each query (see the conventions).

        Exact for every metric: float32 scores (the GEMM form ‖q‖² + ‖x‖² − 2q·x for l2, q·x for ip and cos) only
        shortlist. They err by at most ``_gemm_l2_error`` / ``_gemm_ip_error`` each, so each query keeps ``2k + 8``
        rows (``k + k/16 + 8`` first from k = ``SHORT_KEEP_MIN_K``, unless a probe of the batch's first queries finds
        many ties); when the last of them lies more than twice that bound beyond the k-th, every true neighbour is
        among them, and they are re-scored exactly in float64 (Σ(q−x)², or q·x from exact products) and ranked with
        ties to the earlier row. Queries that cannot be certified (many rows tied at the k-th: duplicates) repeat the
        pass keeping ``2k + 8``, then ``8k + 64`` rows; what is still uncertain (tight clusters far from the origin,
        where the GEMM form keeps no digit of the distances) is answered by an exact float64 scan of every row. On
        hosts with AMX, batches of at least ``AMX_MIN_QUERIES`` queries of ``AMX_MIN_DIM`` or more dimensions
        (queries × D >= ``AMX_MIN_WORK``, at least ``AMX_MIN_ROWS`` rows, k <= ``AMX_MAX_K``, ordinary magnitudes)
        first take candidates from bf16 tile products with a proven error bound
        (:mod:`kvant.kernels.amx_topk`), re-scored exactly; queries with more candidates than its buffer holds go on
        as above.
        """
        from ..kernels.distance import exact_topk

        q, one = as_queries(q, self.dim)
        k_out = check_k(k)
        require_nonempty(self.ntotal, "the index")
        k = min(k_out, self.ntotal)  # padded back to k_out by finish_results
        if self.metric == "cos":
            q = normalize_rows(q)
        x, n = self._x.view, self.ntotal
        ip = self.metric != "l2"
        if ip:
            # inner products of rows far outside float32's range overflow (inf − inf = NaN drops a row) or
            # underflow to 0 (losing the ranking): the rows by one power of two, each query by its own (no shift:
            # inner products are not shift invariant), which keeps each query's order
            shift, scale, q_scale = None, magnitude_scale(x), row_magnitude_scales(q)
            q_norm = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64)) * (1.0 if q_scale is None else q_scale)
            x_norm_max = self._max_row_norm() * (scale or 1.0)
        else:
            # data with a large common offset or an extreme magnitude is searched as (x − shift)·scale
            (shift, scale), q_scale = conditioning(x), None
        out_d = np.empty((q.shape[0], k), np.float32)
        out_i = np.empty((q.shape[0], k), np.int64)
        todo = np.arange(q.shape[0])
        if self._amx_screen_applies(q, k, shift, scale, q_scale):
            cand, sure = self._amx_candidates(q, k)  # every exact neighbour of a sure query is among its candidates
            if sure.any():
                kd = np.empty(cand[sure].shape, np.float32)
                ki = np.ascontiguousarray(cand[sure])
                _rescore_exact(np.ascontiguousarray(q[sure]), x, kd, ki, ip)
                out_d[sure], out_i[sure] = kd[:, :k], ki[:, :k]
            todo = todo[~sure]
        def certified(rows, keep):
            """One shortlist pass keeping ``keep`` rows for each query of ``rows`` (ascending): answers the queries it
            certifies into out_d / out_i and returns the others."""
            qs = q if rows.size == q.shape[0] else np.ascontiguousarray(q[rows])
            with np.errstate(over="ignore", invalid="ignore"):  # (overflowing products are handled below)
                kd, ki, q_sq, x_sq_max = self._gemm_topk(qs, keep, shift, scale,
                                                         None if q_scale is None else q_scale[rows])
            err = _gemm_ip_error(self.dim, q_norm[rows], x_norm_max) if ip else _gemm_l2_error(self.dim, q_sq, x_sq_max)
            # a list of every row is sure only when it holds them all: an ip product that overflowed float32 is
            # NaN and never kept (a review: the best row, at 3e38, missing from k = 600 of 1,100)
            every = ki[:, n - 1] >= 0 if n <= keep else np.zeros(rows.size, np.bool_)
            sure = every | (kd[:, keep - 1].astype(np.float64) > kd[:, k - 1] + 2.0 * err)
            _rescore_exact(qs, x, kd, ki, ip)
            out_d[rows[sure]], out_i[rows[sure]] = kd[sure, :k], ki[sure, :k]
            return rows[~sure]

        short = max(k, min(n, k + k // 16 + 8))
        if k >= SHORT_KEEP_MIN_K and short < min(n, 2 * k + 8) and todo.size:
            # long lists first keep k + k/16 + 8 rows, which certify nearly every query of float data, unless the
            # first queries show many ties at the k-th (duplicates, integer coordinates), where they would pay for
            # a second pass (SHORT_KEEP_PROBE)
            probe = todo[:SHORT_KEEP_PROBE]
            left = certified(probe, short)
            rest = todo[probe.size :]
            if rest.size and left.size * SHORT_KEEP_MAX_MISSES <= probe.size:
                rest = certified(rest, short)
            todo = np.sort(np.concatenate([left, rest]))
        for keep in (max(k, min(n, 2 * k + 8)), max(k, min(n, 8 * k + 64))):
            if todo.size == 0:
                break
            todo = certified(todo, keep)
        if todo.size:
            exact_d = np.empty((todo.size, k))
            exact_i = np.empty((todo.size, k), np.int64)
            exact_topk(np.ascontiguousarray(q[todo]), x, exact_d, exact_i, ip)
            with np.errstate(over="ignore"):
                out_d[todo], out_i[todo] = exact_d, exact_i
        return finish_results(out_d, out_i, self._ids.view, ip, one, k_out)

    def _max_row_norm(self) -> float:
        """An upper bound on the stored rows' largest ‖x‖ (float64): from the float32 squared norms kept beside them,
        or, where one overflowed float32, from the rows themselves."""
        top = float(self._norms.view.max(initial=0.0))
        if 2.0**-100 <= top < np.inf:  # (well inside float32's normal range: rounded, never flushed)
            return float(np.sqrt(top)) * (1.0 + 2.0**-20)  # (the stored squares are rounded to float32)
        # squares beyond float32's range, or subnormal / 0 for rows below ~1e-19 (a review: a bound of 0 certified
        # shortlists of such rows, searched scaled up to norm ~1, and returned wrong ids)
        x = self._x.view
        return max(float(np.sqrt(np.einsum("ij,ij->i", x[s : s + 65536], x[s : s + 65536], dtype=np.float64).max()))
                   for s in range(0, x.shape[0], 65536))

    def _gemm_topk(self, q, kk, shift, scale, q_scale: np.ndarray | None = None):
        """The ``kk`` best rows per query by BLAS: squared L2 in the GEMM form on (· − shift)·scale for l2,
        negated inner products of x·scale and q[i]·q_scale[i] otherwise.
        Returns (float32 scores, rows, ‖q‖² and max ‖x‖² as conditioned)."""
        from ..kernels.distance import ip_block, sq_l2_block, sq_norms
        from ..kernels.topk import merge_topk

        x, norms, n = self._x.view, self._norms.view, self.ntotal
        l2 = self.metric == "l2"
        cond = shift is not None or scale is not None
        nq = q.shape[0]
        # (written whole by each path: filling long lists first cost 25 ms of a 320 ms search at k = 5,000)
        out_d = np.empty((nq, kk), np.float32)
        out_i = np.empty((nq, kk), np.int64)
        q_sq = np.zeros(nq, np.float64)  # for the error bound
        scaled = not l2 and (scale is not None or q_scale is not None)
        fused = direct_topk.AVAILABLE and DIRECT_MIN_QUERIES <= nq <= (direct_topk.MAX_BATCH or nq)
        wide = self.dim >= BLAS_SCREEN_MIN_DIM and nq * self.dim >= BLAS_SCREEN_MIN_WORK
        if not cond and not scaled and (wide or (not fused and kk >= SCREEN_MIN_KEEP)):
            return self._blas_screen_topk(q, kk, out_d, out_i, q_sq)
        if fused and not scaled:
            return self._direct_topk(q, kk, out_d, out_i, q_sq, shift if l2 else None, scale if l2 else None)
        x_sq_max = 0.0 if cond or not l2 else float(norms.max())
        out_d.fill(np.inf)  # (the tiles are merged into empty lists)
        out_i.fill(-1)
        qb = max(1, min(nq, 1024))
        xb = max(256, _TILE // qb)
        for qs in range(0, nq, qb):
            qblk = (condition(q[qs : qs + qb], shift, scale) if l2
                    else scale_rows(q[qs : qs + qb], None if q_scale is None else q_scale[qs : qs + qb]))
            qn = sq_norms(qblk) if l2 else None
            if l2:
                q_sq[qs : qs + qb] = qn
            od, oi = out_d[qs : qs + qb], out_i[qs : qs + qb]
            for xs in range(0, n, xb):
                xblk = np.ascontiguousarray(x[xs : xs + xb])
                if l2 and cond:
                    xblk = condition(xblk, shift, scale)
                    xn = sq_norms(xblk)
                    x_sq_max = max(x_sq_max, float(xn.max()))
                    d = sq_l2_block(qblk, xblk, xn, qn)
                elif l2:
                    d = sq_l2_block(qblk, xblk, np.ascontiguousarray(norms[xs : xs + xb]), qn)
                else:
                    d = np.negative(ip_block(qblk, condition(xblk, None, scale)), dtype=np.float32)
                merge_topk(np.ascontiguousarray(d, dtype=np.float32), xs, od, oi)
        return out_d, out_i, q_sq, x_sq_max

    def _amx_screen_applies(self, q, k, shift, scale, q_scale) -> bool:
        """The AMX bf16 first pass (:mod:`kvant.kernels.amx_topk`) runs on batches of at least ``AMX_MIN_QUERIES``
        queries of ``AMX_MIN_DIM`` or more dimensions (queries × D >= ``AMX_MIN_WORK``), k up to ``AMX_MAX_K``, on
        data of ordinary magnitude:
        unconditioned, unscaled, norms below 2⁶⁰ (so no float32 product or score can overflow)."""
        if not (amx_topk.AVAILABLE and shift is None and scale is None and q_scale is None):
            return False
        if k > AMX_MAX_K or self.dim < AMX_MIN_DIM or q.shape[0] < AMX_MIN_QUERIES:
            return False
        if q.shape[0] * self.dim < AMX_MIN_WORK or self.ntotal < AMX_MIN_ROWS:
            return False
        q_top = float(np.einsum("ij,ij->i", q, q, dtype=np.float64).max())
        return max(q_top, self._max_row_norm() ** 2) < 2.0**120

    def _row_centre(self) -> np.ndarray:
        """A centre of the stored rows for the inner-product pass: the mean of up to 4,096 rows spread evenly
        (any centre keeps the answer exact; one near the rows keeps the bf16 bound narrow)."""
        x, n = self._x.view, self.ntotal
        pick = np.linspace(0, n - 1, num=min(n, 4096)).astype(np.int64)
        return x[pick].mean(axis=0, dtype=np.float64).astype(np.float32)

    def _amx_candidates(self, q, k):
        """(candidates (nq, c) int64 padded with −1, sure (nq,) bool): for each sure query, a set of rows that holds
        its k exact nearest (:mod:`kvant.kernels.amx_topk`); the others overflowed their buffer. Worker threads pull
        chunks of rows, as in :meth:`_blas_screen_topk`, into state of their own (one set per thread, each starting
        from the seeded bounds), merged at the end."""
        import threading

        import numba

        x, n = self._x.view, self.ntotal
        ip = self.metric != "l2"
        nq_all = q.shape[0]
        cap = AMX_BUFFER_PER_K * k + AMX_BUFFER_EXTRA
        gam = amx_topk.gamma(self.dim)
        centre = self._row_centre() if ip else None
        threads = numba.get_num_threads()
        seed_rows = np.unique(np.linspace(0, n - 1, num=min(n, AMX_SEED_PER_K * k + AMX_SEED_EXTRA)).astype(np.int64))
        blocks = []
        for qs in range(0, nq_all, BLAS_SCREEN_QUERIES):
            qb = np.ascontiguousarray(q[qs : qs + BLAS_SCREEN_QUERIES])
            nq = qb.shape[0]
            mu, bt, qn, qstat = amx_topk.queries_operand(qb, ip, centre)
            chunks = max(1, min(4 * threads, -(-n // BLAS_SCREEN_ROWS)))
            # every thread starts from the upper bounds of rows spread over all the data (amx_topk.seed_tops)
            seed_d = np.full((nq, k), np.inf, np.float32)
            seed_i = np.full((nq, k), -1, np.int64)
            a16, g = amx_topk.scratch(self.dim, bt.shape[1] * 16)
            amx_topk.seed_tops(x, seed_rows, mu, bt, qn, qstat, nq, ip, gam, amx_topk.TILE_CONFIG, seed_d, seed_i,
                               a16, g)
            states: dict[int, tuple] = {}

            def run(c0: int, c1: int, mu=mu, bt=bt, qn=qn, qstat=qstat, states=states, chunks=chunks, nq=nq,
                    seed_d=seed_d, seed_i=seed_i) -> None:
                mine = states.get(threading.get_ident())
                if mine is None:  # (each thread adds its own key; dict assignment is atomic under the GIL)
                    mine = states[threading.get_ident()] = (
                        seed_d.copy(), seed_i.copy(),
                        np.empty((nq, cap), np.float32), np.empty((nq, cap), np.int64), np.zeros(nq, np.int64),
                        np.zeros(nq, np.bool_), *amx_topk.scratch(self.dim, bt.shape[1] * 16))
                top_d, top_i, lo, ci, cn, fail, a16, g = mine
                for c in range(c0, c1):
                    amx_topk.screen_strips(x, c * n // chunks, (c + 1) * n // chunks, mu, bt, qn, qstat, nq, ip, gam,
                                           amx_topk.TILE_CONFIG, top_d, top_i, lo, ci, cn, fail, a16, g)

            for_each_block(chunks, 1, run)
            parts = list(states.values())
            # the final k-th upper bound over k distinct rows. The seeded rows start in every thread's lists with one
            # bound each; equal (id, bound) pairs sort together and count once. A seeded row its own thread evicted
            # and met again with a tighter bound may still sit in other threads' lists with its seeded bound: that
            # bound is above the owner's k-th, itself the k-th of k distinct rows, so it never decides the k-th here
            all_d = np.concatenate([st[0] for st in parts], axis=1)
            all_i = np.concatenate([st[1] for st in parts], axis=1)
            order = np.lexsort((all_i, all_d), axis=1)
            all_d, all_i = np.take_along_axis(all_d, order, 1), np.take_along_axis(all_i, order, 1)
            again = np.zeros(all_i.shape, np.bool_)
            again[:, 1:] = (all_i[:, 1:] == all_i[:, :-1]) & (all_i[:, 1:] >= 0)
            all_d = np.where(again | (all_i < 0), np.inf, all_d)
            kth = np.sort(all_d, axis=1)[:, k - 1]
            u = kth[:, None]
            fail = np.any([st[5] for st in parts], axis=0) | ~np.isfinite(kth)
            # every thread's buffered rows whose lower bound is at most the final k-th upper bound
            rows = np.concatenate([np.where((np.arange(cap) < st[4][:, None]) & ~(st[2] > u), st[3], -1)
                                   for st in parts], axis=1)
            width = max(k, int((rows >= 0).sum(axis=1).max(initial=0)))
            order = np.argsort(rows < 0, axis=1, kind="stable")[:, :width]  # the real rows first
            blocks.append((np.take_along_axis(rows, order, axis=1), ~fail))
        width = max(b[0].shape[1] for b in blocks)
        cand = np.concatenate([np.pad(c, ((0, 0), (0, width - c.shape[1])), constant_values=-1) for c, _ in blocks])
        return cand, np.concatenate([ok for _, ok in blocks])

    def _blas_screen_topk(self, q, kk, out_d, out_i, q_sq):
        """:meth:`_direct_topk` (unconditioned l2, unscaled ip/cos) with BLAS products: each worker thread multiplies a
        block of rows by a block of queries (single-threaded BLAS) and screens the tile while it is in cache
        (:func:`kvant.kernels.direct_topk.keep_from_products`), into its chunk's lists, merged in order as there."""
        import numba

        from ..kernels.distance import sq_norms
        from ..kernels.topk import merge_sorted_topk

        x, norms, n = self._x.view, self._norms.view, self.ntotal
        ip = self.metric != "l2"
        qn = sq_norms(q)
        if not ip:
            q_sq[:] = qn
        rows = BLAS_SCREEN_ROWS
        step = min(BLAS_SCREEN_QUERIES, _reservoir_width(kk, n))  # (each worker thread holds one block's reservoirs)
        for qs in range(0, q.shape[0], step):
            qb, qnb = q[qs : qs + step], qn[qs : qs + step]
            qt = np.ascontiguousarray(qb).T  # (BLAS takes the transposed operand as is: 146-152 vs 140-144 GFLOP/s)
            nq = qb.shape[0]
            chunks = max(1, min(_chunks_per_thread(n, kk) * numba.get_num_threads(), -(-n // rows),
                                _DIRECT_LISTS_BYTES // (12 * nq * kk)))
            cd = np.empty((chunks, nq, kk), np.float32)
            ci = np.empty((chunks, nq, kk), np.int64)

            def run(c0: int, c1: int, qt=qt, qnb=qnb, cd=cd, ci=ci, chunks=chunks) -> None:
                nq = qt.shape[1]
                tile = np.empty((rows, nq), np.float32)
                buf_d = np.empty((nq, direct_topk.capacity(kk, n)), np.float32)
                buf_i = np.empty((nq, direct_topk.capacity(kk, n)), np.int64)
                hits = np.empty(nq + 16, np.int32)  # (16 spare slots: keep_from_products)
                for c in range(c0, c1):
                    thr = np.full(nq, np.inf, np.float32)
                    fill = np.zeros(nq, np.int64)
                    r0, r1 = c * n // chunks, (c + 1) * n // chunks
                    for s in range(r0, r1, rows):
                        e = min(r1, s + rows)
                        g = tile[: e - s]
                        with np.errstate(over="ignore", invalid="ignore"):  # (thread-local: the caller's does not
                            np.dot(x[s:e], qt, out=g)                     # reach this worker; NaN is handled there)
                        direct_topk.keep_from_products(g, s, norms[s:e], qnb, ip, buf_d, buf_i, fill, thr, kk, hits)
                    direct_topk.finish_lists(buf_d, buf_i, fill, cd[c], ci[c])

            for_each_block(chunks, 1, run)
            out_d[qs : qs + nq], out_i[qs : qs + nq] = cd[0], ci[0]
            if chunks > 1:
                merge_sorted_topk(cd[1:], ci[1:], out_d[qs : qs + nq], out_i[qs : qs + nq])
        return out_d, out_i, q_sq, (0.0 if ip else float(norms.max()))

    def _direct_topk(self, q, kk, out_d, out_i, q_sq, shift, scale):
        """:meth:`_gemm_topk` by :func:`kvant.kernels.direct_topk.direct_keep` (l2, conditioned in the kernel as the
        BLAS path conditions its blocks; unscaled ip/cos): the same float32 expressions and clamp from products summed
        in another order (for l2 within ``_gemm_l2_error``, then certified and re-scored as before), merged per chunk
        of rows with the same tie rule."""
        import numba

        from ..kernels.distance import sq_norms
        from ..kernels.topk import merge_sorted_topk

        x, norms, n = self._x.view, self._norms.view, self.ntotal
        ip = self.metric != "l2"
        cond = shift is not None or scale is not None
        q = condition(q, shift, scale)
        qn = sq_norms(q)
        if not ip:
            q_sq[:] = qn
        shift_a = np.empty(0, np.float32) if shift is None else np.ascontiguousarray(shift, np.float32)
        steps = np.array(scale_steps(scale), np.float32)
        max_width = min(direct_topk.max_queries(self.dim), _reservoir_width(kk, n))
        width, blocks, chunks = _direct_split(n, q.shape[0], kk, max_width, numba.get_num_threads())
        chunks = max(1, min(chunks, _DIRECT_LISTS_BYTES // (12 * width * kk)))  # (a block's lists within the budget)
        # each (block, chunk) holds its own lists (12 bytes per entry), merged in order below: a call takes as many
        # blocks as fit _DIRECT_LISTS_BYTES however many threads run (a review: 800 MiB at 64 threads otherwise)
        per_call = max(1, min(blocks, _DIRECT_LISTS_BYTES // (12 * chunks * width * kk)))
        x_max = 0.0
        for qs in range(0, q.shape[0], per_call * width):
            qe = min(q.shape[0], qs + per_call * width)
            starts = range(qs, qe, width)
            # the queries in the centroids' operand layout (direct_assign.padded_centroids), zero columns after them
            cts = np.zeros((len(starts), self.dim, width), np.float32)
            qns = np.zeros((len(starts), width), np.float32)
            nqs = np.array([min(width, qe - s) for s in starts], np.int64)
            for b, s in enumerate(starts):
                cts[b, :, : nqs[b]] = q[s : s + nqs[b]].T
                qns[b, : nqs[b]] = qn[s : s + nqs[b]]
            cd = np.empty((chunks, len(starts), width, kk), np.float32)
            ci = np.empty((chunks, len(starts), width, kk), np.int64)
            x_sq_max = np.zeros((len(starts), chunks))
            direct_topk.direct_keep(x, cts, qns, nqs, norms, ip, cd, ci, shift_a, steps, x_sq_max)
            x_max = max(x_max, float(x_sq_max.max()))
            for b, s in enumerate(starts):
                rows = slice(s, s + nqs[b])
                out_d[rows], out_i[rows] = cd[0, b, : nqs[b]], ci[0, b, : nqs[b]]
                if chunks > 1:
                    merge_sorted_topk(cd[1:, b, : nqs[b]], ci[1:, b, : nqs[b]], out_d[rows], out_i[rows])
        x_max = x_max if cond else (0.0 if ip else float(norms.max()))
        return out_d, out_i, q_sq, x_max

    def remove(self, ids) -> int:
        """Remove the vectors with these ids (unknown ids are ignored). Returns how many were removed."""
        ids = check_remove_ids(ids)
        drop = np.isin(self._ids.view, ids)
        count = int(drop.sum())
        if count:
            keep = ~drop
            self._x.keep(keep)
            self._norms.keep(keep)
            self._ids.keep(keep)
        return count

    def reconstruct(self, ids) -> np.ndarray:
        """Stored vectors (normalised for cos) for these ids, in the given order."""
        from ..errors import InvalidInput

        ids = check_remove_ids(ids, "ids to reconstruct")
        stored = self._ids.view
        order = np.argsort(stored, kind="stable")
        pos = np.searchsorted(stored[order], ids)
        pos = np.minimum(pos, max(0, stored.size - 1))
        if ids.size and (stored.size == 0 or not np.array_equal(stored[order][pos], ids)):
            raise InvalidInput("some ids are not in the index")
        return self._x.view[order[pos]].copy()

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path) -> None:
        meta = {"dim": self.dim, "metric": self.metric, "next_id": self._next_id}
        persist.write(path, self._kind, meta, {"vectors": self._x.view, "ids": self._ids.view})

    @classmethod
    def _from_persist(cls, meta: dict, arrays: dict) -> FlatIndex:
        from ..kernels.distance import sq_norms

        try:
            obj = cls(meta["dim"], meta["metric"])
            next_id = meta["next_id"]
            x, ids = arrays["vectors"], arrays["ids"]
        except (KeyError, TypeError, ValueError) as exc:
            raise PersistError(f"bad FlatIndex content: {exc}") from exc
        n = ids.shape[0] if ids.ndim == 1 else -1
        check_ids_array(ids, n)
        if x.dtype != np.float32 or x.shape != (n, obj.dim):
            raise PersistError(f"vectors have shape {x.shape} / {x.dtype}, expected ({n}, {obj.dim}) float32")
        next_id = check_next_id(next_id, ids)
        if not np.isfinite(x).all():
            raise PersistError("stored vectors contain NaN or inf")
        norms = sq_norms(np.ascontiguousarray(x)) if n else None
        if obj.metric == "cos" and n and not np.all((np.abs(norms - 1) < 1e-4) | (norms == 0)):
            # add() stores unit rows for cos; others would return similarities outside [-1, 1]
            raise PersistError("a cos index holds vectors that are not unit-normalised")
        obj._x = Rows((obj.dim,), np.float32, x)
        obj._norms = Rows((), np.float32, norms)
        obj._ids = Rows((), np.int64, ids)
        obj._next_id = next_id
        return obj

    def __repr__(self) -> str:
        return f"FlatIndex(dim={self.dim}, metric={self.metric!r}, ntotal={self.ntotal})"


persist.register("FlatIndex")(FlatIndex)
