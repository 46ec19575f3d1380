"""The PQ kernel harness (``kvant bench kernels``): judge kernels on mathematics first, then on speed.

Modelled on the lance-autoresearch contract. Kernels are injectable (:class:`PQKernels`), so a candidate
kernel can be put through exactly the same gate as the shipped one.

1. **Correctness phase** — inputs from 5 distributions (gaussian, uniform, sparse with 90% zeros, large
   dynamic range with column scales 1e-3/1/1e3, mostly-zero) × shapes (dim, m, ksub) = (128,16,256),
   (256,16,256), (768,96,256) plus 4-bit shapes. Distance tables, encodings and top-k results are compared
   with the immutable scalar references in :mod:`kvant.bench.reference`: max error ≤ 1e-4 relative to
   max(1, |reference|), top-k compared tie-tolerantly. The 4-bit FastScan is checked in its exact mode
   (``rerank=0``) against the reference top-k, and in shortlist mode its returned distances must be the exact
   ADC distances of the returned ids. Then every batching path of the scans (1-17 queries) over codes enough to be
   split into chunks (default, 1 and 3 chunks), and the encoder on sub-vector widths and codebook sizes the shapes
   above miss. Any failure → exit code 2 with a diagnostic naming the combo.
2. **Speed phase** — ns/query for distance_table + scan + top-10 over 20,000 codes on the 3 shapes ×
   {clustered, uniform, sparse}, fixed seeds, a warm-up then repeated timed batches of queries; per-combo
   table, global geomean with a bootstrap 90% CI, worst and best combo, GB/s of codes scanned (n·m bytes per
   query: a work rate — the kernels read the codes once per block of 16 queries, and 20,000 codes stay in cache, so
   it is not DRAM traffic), the machine's memory-bandwidth read (in ``--quick`` mode over 16 MiB, mostly cache),
   peak memory and total seconds; a row is appended to a TSV. When FAISS is importable, ``faiss.IndexPQ`` is
   loaded with the same codebooks and codes, its top-10 is compared (a difference is printed as a warning, not a
   failure: FAISS sums the tables in its own order, so near-ties may swap; the gate is the exact reference above),
   and its time gives a kvant/FAISS queries-per-second ratio per combo. A 4-bit table does
   the same for ``fastscan_search`` vs ``faiss.IndexPQFastScan`` (FastScan recall@10 vs exact ADC is shown).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import reference as R

EXIT_OK, EXIT_FAIL = 0, 2
TOL = 1e-4
K_TOP = 10

CORRECTNESS_DISTS = ("gaussian", "uniform", "sparse", "wide", "mostly_zero")
SHAPES_8BIT = ((128, 16, 256), (256, 16, 256), (768, 96, 256))
SHAPES_4BIT = ((128, 32, 16), (64, 16, 16), (60, 15, 16))
SPEED_DISTS = ("clustered", "uniform", "sparse")
DEFAULT_RESULTS = Path("benchmarks") / "results" / "kernels.tsv"


@dataclasses.dataclass
class PQKernels:
    """The kernels under test. Defaults are :mod:`kvant.kernels.pq`; replace any field to test a candidate."""

    distance_table: Callable | None = None  # (queries (nq, dim), codebooks (m, ksub, dsub)) -> (nq, m, ksub)
    ip_table: Callable | None = None  # the same, inner products q_j·c (the ip and cos indexes' tables)
    encode: Callable | None = None  # (x (n, dim), codebooks) -> uint8 (n, m)
    adc_search: Callable | None = None  # (tables, codes, k) -> (dist, idx)
    pack_4bit: Callable | None = None  # (codes (n, m) < 16) -> packed
    fastscan_search: Callable | None = None  # (tables, packed, n, m, k, rerank) -> (dist, idx)

    def __post_init__(self):
        from ..kernels import pq as K

        self.distance_table = self.distance_table or K.distance_tables_l2
        self.ip_table = self.ip_table or K.ip_tables
        self.encode = self.encode or K.pq_encode
        self.adc_search = self.adc_search or K.adc_search
        self.pack_4bit = self.pack_4bit or K.pack_codes_4bit
        self.fastscan_search = self.fastscan_search or K.fastscan_search


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------


def generate(dist: str, n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) float32 rows from a named distribution, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    if dist == "gaussian":
        x = rng.standard_normal((n, dim))
    elif dist == "uniform":
        x = rng.uniform(-1.0, 1.0, (n, dim))
    elif dist == "sparse":  # 90% zeros
        x = rng.standard_normal((n, dim)) * (rng.random((n, dim)) < 0.1)
    elif dist == "wide":  # large dynamic range: column scales 1e-3 / 1 / 1e3
        x = rng.standard_normal((n, dim)) * np.array([1e-3, 1.0, 1e3])[np.arange(dim) % 3]
    elif dist == "mostly_zero":  # 95% of rows exactly zero, the rest gaussian: massive exact ties
        x = rng.standard_normal((n, dim)) * (rng.random((n, 1)) < 0.05)
    elif dist == "clustered":  # 64 anisotropic gaussian blobs
        centers = rng.standard_normal((64, dim)) * 4.0
        scales = rng.uniform(0.2, 1.5, (64, dim))
        lab = rng.integers(0, 64, n)
        x = centers[lab] + rng.standard_normal((n, dim)) * scales[lab]
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    return np.ascontiguousarray(x, dtype=np.float32)


def make_codebooks(train: np.ndarray, m: int, ksub: int, seed: int) -> np.ndarray:
    """Codebooks (m, ksub, dsub) from sampled training sub-vectors (+ tiny jitter so codewords differ)."""
    rng = np.random.default_rng(seed + 7919)
    n, dim = train.shape
    dsub = dim // m
    rows = rng.integers(0, n, size=(m, ksub))
    cb = np.empty((m, ksub, dsub), dtype=np.float32)
    for j in range(m):
        sub = train[rows[j], j * dsub:(j + 1) * dsub].astype(np.float64)
        spread = np.abs(sub).max() if sub.size else 1.0
        cb[j] = sub + rng.standard_normal(sub.shape) * 1e-2 * max(spread, 1e-3)
    return cb


# ----------------------------------------------------------------------------------------------------------
# correctness phase
# ----------------------------------------------------------------------------------------------------------


def _rel_err(got, ref) -> float:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return math.inf
    if got.size == 0:
        return 0.0
    err = np.abs(got - ref) / np.maximum(1.0, np.abs(ref))
    err[~np.isfinite(err)] = math.inf
    return float(err.max())


def _pure(name: str, fn, *args, **kw):
    """``fn(*args, **kw)`` on copies of its array arguments, so that references computed from the originals are
    the inputs' references; AssertionError if ``fn`` wrote into one (a kernel that scaled its queries in place, or
    overwrote the rows it encoded, had passed against references computed after it ran: a review)."""
    copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    out = fn(*copies, **kw)
    for a, c in zip(args, copies, strict=True):
        if isinstance(a, np.ndarray) and not np.array_equal(a, c, equal_nan=True):
            raise AssertionError(f"{name} wrote into its input")
    return out


def _check_combo(kern: PQKernels, dist: str, shape, nbits: int, nq: int, n: int, seed: int) -> list[str]:
    """Problems found for one (distribution, shape) combo; empty when it passes."""
    dim, m, ksub = shape
    problems = []
    data = generate(dist, n + nq + 512, dim, seed)
    x, q, train = data[:n], data[n:n + nq], data[n + nq:]
    cb = make_codebooks(train, m, ksub, seed)

    ref_t = R.pq_distance_tables_l2_ref(q, cb)
    ref_ip = R.pq_ip_tables_ref(q, cb)
    for count in (1, nq):  # one query (the most common call; kernels may take another path for it), and a batch
        tables = np.asarray(_pure("distance_table", kern.distance_table, np.ascontiguousarray(q[:count]), cb))
        err = _rel_err(tables, ref_t[:count])
        if err > TOL:
            problems.append(f"distance_table nq={count}: max rel err {err:.3g} > {TOL} (shape {tables.shape} vs "
                            f"{ref_t[:count].shape})")
            return problems
        err = _rel_err(np.asarray(_pure("ip_table", kern.ip_table, np.ascontiguousarray(q[:count]), cb)),
                       ref_ip[:count])
        if err > TOL:
            problems.append(f"ip_table nq={count}: max rel err {err:.3g} > {TOL}")
            return problems

    codes = np.asarray(_pure("encode", kern.encode, x, cb))
    ref_full = R.pq_distance_tables_l2_ref(x, cb)
    if codes.shape != (n, m):
        problems.append(f"encode: shape {codes.shape}, expected {(n, m)}")
        return problems
    rows, cols = np.indices(codes.shape)
    chosen = ref_full[rows, cols, codes.astype(np.int64) % ksub]
    best = ref_full.min(axis=2)
    bad = np.abs(chosen - best) > TOL * np.maximum(1.0, best)
    if bad.any() or codes.max(initial=0) >= ksub:
        r, j = np.argwhere(bad | (codes >= ksub))[0]
        problems.append(f"encode: row {r} sub-quantizer {j} got codeword {codes[r, j]} at distance "
                        f"{chosen[r, j]!r}, nearest is {best[r, j]!r}")
        return problems

    tables32 = np.ascontiguousarray(tables, dtype=np.float32)
    rd, ri = R.pq_adc_search_ref(tables32, codes, K_TOP)
    full = R.pq_adc_distances_ref(tables32, codes)  # every row's reference distance: returned ids are checked too
    if nbits == 8:
        d, i = _pure("adc_search", kern.adc_search, tables32, codes, K_TOP)
        msg = R.pq_topk_agrees(rd, ri, d, i, TOL, all_d=full)
        if msg:
            problems.append(f"adc_search top-{K_TOP}: {msg}")
        # also a small-n case (n < k: padding) and k = 1
        d, i = _pure("adc_search", kern.adc_search, tables32, np.ascontiguousarray(codes[:3]), K_TOP)
        rd3, ri3 = R.pq_adc_search_ref(tables32, codes[:3], K_TOP)
        msg = R.pq_topk_agrees(rd3, ri3, d, i, TOL, all_d=full[:, :3])
        if msg:
            problems.append(f"adc_search n=3 < k: {msg}")
        d, i = _pure("adc_search", kern.adc_search, tables32, codes, 1)
        msg = R.pq_topk_agrees(rd[:, :1], ri[:, :1], d, i, TOL, all_d=full)
        if msg:
            problems.append(f"adc_search k=1: {msg}")
        # one query: the query-by-query kernel (ADC_FEW_QUERIES)
        d, i = _pure("adc_search", kern.adc_search, np.ascontiguousarray(tables32[:1]), codes, K_TOP)
        msg = R.pq_topk_agrees(rd[:1], ri[:1], d, i, TOL, all_d=full[:1])
        if msg:
            problems.append(f"adc_search one query: {msg}")
    else:
        packed = _pure("pack_4bit", kern.pack_4bit, codes)
        d, i = _pure("fastscan_search", kern.fastscan_search, tables32, packed, n, m, K_TOP, 0)
        msg = R.pq_topk_agrees(rd, ri, d, i, TOL, all_d=full)
        if msg:
            problems.append(f"fastscan_search exact mode top-{K_TOP}: {msg}")
        d, i = _pure("fastscan_search", kern.fastscan_search, tables32, packed, n, m, K_TOP, 2)
        msg = shortlist_agrees(tables32, rd, ri, np.asarray(d), np.asarray(i), full, n)
        if msg:
            problems.append(f"fastscan_search shortlist: {msg}")
    return problems


def shortlist_agrees(tables, ref_d, ref_i, got_d, got_i, full, n) -> str | None:
    """The lossy shortlist mode's contract, None when it holds: distinct ids in range, each reported at its exact ADC
    distance, ascending; and no reference top-k row left out unless the returned k-th is within what the u8 lookup
    tables can explain of it. A row displaces a true top-k row r only if its quantised sum is no larger than r's, so
    its exact distance exceeds r's by at most the two sums' rounding: m entries each off by at most half a step of
    1/255 of the widest sub-table's range (twice that allows for other rounding schemes)."""
    nq, k = ref_d.shape
    if got_i.shape != (nq, k) or got_d.shape != (nq, k) or np.any(got_i < 0) or np.any(got_i >= n):
        return f"ids out of range or bad shape {got_i.shape}"
    err = _rel_err(got_d, np.take_along_axis(full, got_i, 1))
    if not err <= TOL:
        return f"returned distances are not the exact ADC distances of their ids (max rel err {err:.3g})"
    m = tables.shape[1]
    spans = (tables.max(axis=2) - tables.min(axis=2)).astype(np.float64).max(axis=1)  # per query
    for q in range(nq):
        ids = got_i[q].tolist()
        if len(set(ids)) != k:
            return f"query {q}: repeated ids {ids}"
        if not np.all(np.diff(got_d[q].astype(np.float64)) >= 0):
            return f"query {q}: distances not ascending {got_d[q].tolist()}"
        kth = float(got_d[q, -1])
        for r in set(ref_i[q].tolist()) - set(ids):  # each reference row left out, against the returned k-th
            slack = 2.0 * m * spans[q] / 255.0 + TOL * max(1.0, abs(float(full[q, r])))
            if not kth <= float(full[q, r]) + slack:
                return (f"query {q}: row {r} (exact distance {float(full[q, r])!r}) is left out while the k-th "
                        f"returned is at {kth!r}, more than quantised tables allow ({slack:.3g})")
    return None


# Query counts each batching path of the scans sees (one query; the 4- and 8-wide interleaved tables of 2-8; one
# block of 16 and one past it), and code counts large enough that the scans split the codes into chunks and merge
# the chunks' lists (adc_search from 2 x 4,096 rows, fastscan_search from 256 blocks of 32); the encoder's shapes
# (dim, m, ksub) beyond the benchmark's: sub-vector widths other than 4, 8 and 16, and ksub not a multiple of its
# lane width (a review, 2026-12-06: kernels wrong on any of these passed the gate).
PATH_QUERY_COUNTS = (1, 2, 3, 4, 5, 8, 9, 16, 17)
BIG_K = (64, 130, 300)
PATH_ROWS = {8: 2 * 4096 + 4096 + 77, 4: 256 * 32 + 1024 + 45}
ENCODE_SHAPES = ((3, 3, 16), (36, 12, 20), (60, 5, 100), (50, 2, 256), (30, 10, 7))


def _chunk_kw(fn) -> list[dict]:
    """The ``nchunks`` settings to try: the default, and 1 and 3 chunks when the kernel takes the argument."""
    import inspect

    try:
        takes = "nchunks" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes = False
    return [{}, {"nchunks": 1}, {"nchunks": 3}] if takes else [{}]


def _check_paths(kern: PQKernels, nbits: int, seed: int) -> list[str]:
    """The scans on random tables and codes over every query count and chunking; empty when they pass."""
    rng = np.random.default_rng(seed)
    m = 8 if nbits == 8 else 15
    ksub = 256 if nbits == 8 else 16
    n = PATH_ROWS[nbits]
    nq = max(PATH_QUERY_COUNTS)
    tables = np.ascontiguousarray((rng.standard_normal((nq, m, ksub)) ** 2).astype(np.float32))
    codes = np.ascontiguousarray(rng.integers(0, ksub, (n, m)).astype(np.uint8))
    codes[n // 2 :: 97] = codes[0]  # repeated codes: exact ties across chunks
    rd, ri = R.pq_adc_search_ref(tables, codes, K_TOP)
    full = R.pq_adc_distances_ref(tables, codes)
    packed = _pure("pack_4bit", kern.pack_4bit, codes) if nbits == 4 else None
    fn = kern.adc_search if nbits == 8 else kern.fastscan_search
    problems = []
    for count in PATH_QUERY_COUNTS:
        t = np.ascontiguousarray(tables[:count])
        for kw in _chunk_kw(fn):
            if nbits == 8:
                d, i = _pure("adc_search", fn, t, codes, K_TOP, **kw)
            else:
                d, i = _pure("fastscan_search", fn, t, packed, n, m, K_TOP, 0, **kw)
            msg = R.pq_topk_agrees(rd[:count], ri[:count], d, i, TOL, all_d=full[:count])
            if msg:
                problems.append(f"{'adc_search' if nbits == 8 else 'fastscan_search exact mode'} n={n} "
                                f"nq={count} {kw or 'default chunks'}: {msg}")
                return problems
    # long lists, which the scans keep differently (adc_search's reservoir from ADC_RESERVOIR_MIN_K = 128, the
    # FastScan clip's small-k and pair-table rules at 64 and 128): exact, and the 4-bit shortlist mode's contract
    for k in BIG_K:
        rdk, rik = R.pq_adc_search_ref(tables, codes, k)
        for count in (1, 5, 17):
            t = np.ascontiguousarray(tables[:count])
            d, i = _pure("adc_search", fn, t, codes, k) if nbits == 8 else \
                _pure("fastscan_search", fn, t, packed, n, m, k, 0)
            msg = R.pq_topk_agrees(rdk[:count], rik[:count], d, i, TOL, all_d=full[:count])
            if not msg and nbits == 4:
                d, i = _pure("fastscan_search", fn, t, packed, n, m, k, 2)
                msg = shortlist_agrees(t, rdk[:count], rik[:count], np.asarray(d), np.asarray(i), full[:count], n)
            if msg:
                problems.append(f"{'adc_search' if nbits == 8 else 'fastscan_search'} n={n} nq={count} k={k}: {msg}")
                return problems
    return problems


def _check_encode_shapes(kern: PQKernels, seed: int) -> list[str]:
    problems = []
    for c, (dim, m, ksub) in enumerate(ENCODE_SHAPES):
        data = generate("gaussian", 300 + max(ksub, 64), dim, seed + c)
        x, train = data[:300], data[300:]
        cb = make_codebooks(train, m, ksub, seed + c)
        codes = np.asarray(_pure("encode", kern.encode, x, cb))
        ref_full = R.pq_distance_tables_l2_ref(x, cb)
        if codes.shape != (300, m) or codes.max(initial=0) >= ksub:
            problems.append(f"encode shape (dim,m,ksub)={(dim, m, ksub)}: codes of shape {codes.shape} or >= ksub")
            continue
        rows, cols = np.indices(codes.shape)
        chosen = ref_full[rows, cols, codes.astype(np.int64)]
        best = ref_full.min(axis=2)
        bad = np.abs(chosen - best) > TOL * np.maximum(1.0, best)
        if bad.any():
            r, j = np.argwhere(bad)[0]
            problems.append(f"encode shape (dim,m,ksub)={(dim, m, ksub)}: row {r} sub-quantizer {j} got codeword "
                            f"{codes[r, j]} at {chosen[r, j]!r}, nearest is {best[r, j]!r}")
    return problems


def correctness_phase(kern: PQKernels, quick: bool = False, seed: int = 0, log=print) -> list[str]:
    """Run every correctness combo; returns diagnostics ('combo: problem'), empty on pass."""
    # queries past the first block of 16 (kernels batch queries): 19 quick, 37 full
    nq, n = (19, 150) if quick else (37, 400)
    failures = []
    combos = [(d, s, 8) for d in CORRECTNESS_DISTS for s in SHAPES_8BIT]
    combos += [(d, s, 4) for d in CORRECTNESS_DISTS for s in SHAPES_4BIT]
    for c, (dist, shape, nbits) in enumerate(combos):
        name = f"{nbits}-bit dist={dist} shape(dim,m,ksub)={shape}"
        try:
            problems = _check_combo(kern, dist, shape, nbits, nq, n, seed + 101 * c)
        except Exception as exc:  # a crashing kernel is a failing kernel
            problems = [f"raised {type(exc).__name__}: {exc}"]
        for p in problems:
            failures.append(f"{name}: {p}")
        log(f"  [{'ok' if not problems else 'FAIL'}] {name}")
    checks = [("8-bit paths: query counts x chunks", lambda: _check_paths(kern, 8, seed + 7)),
              ("4-bit paths: query counts x chunks", lambda: _check_paths(kern, 4, seed + 8)),
              ("encode: sub-vector widths and codebook sizes", lambda: _check_encode_shapes(kern, seed + 9))]
    for name, check in checks:
        try:
            problems = check()
        except Exception as exc:  # a crashing kernel is a failing kernel
            problems = [f"raised {type(exc).__name__}: {exc}"]
        for p in problems:
            failures.append(f"{name}: {p}")
        log(f"  [{'ok' if not problems else 'FAIL'}] {name}")
    return failures


# ----------------------------------------------------------------------------------------------------------
# speed phase
# ----------------------------------------------------------------------------------------------------------


def _timed(fn, reps: int) -> list[float]:
    fn()  # warm-up (and JIT)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def memory_bandwidth_gbs(nbytes: int = 1 << 28, reps: int = 3) -> float:
    """Read bandwidth of this machine in GB/s: parallel sum over a large uint64 array (all threads)."""
    import numba

    @numba.njit(parallel=True, cache=False, nogil=True)
    def _sum(a):
        s = np.uint64(0)
        for i in numba.prange(a.shape[0]):
            s += a[i]
        return s

    a = np.ones(nbytes // 8, dtype=np.uint64)
    ts = _timed(lambda: _sum(a), reps)
    return nbytes / min(ts) / 1e9


def _faiss():
    try:
        import faiss  # noqa: F401
    except Exception:
        return None
    return faiss


def _faiss_pq(faiss, cb, codes, nbits, fastscan=False):
    m, ksub, dsub = cb.shape
    index = faiss.IndexPQ(m * dsub, m, nbits)
    faiss.copy_array_to_vector(np.ascontiguousarray(cb, dtype=np.float32).ravel(), index.pq.centroids)
    index.is_trained = True
    if nbits == 8:
        sa = codes
    else:  # FAISS standalone 4-bit codes: code j in bits 4j..4j+3 (low nibble first)
        c = codes if m % 2 == 0 else np.concatenate([codes, np.zeros((len(codes), 1), np.uint8)], 1)
        sa = c[:, 0::2] | (c[:, 1::2] << 4)
    index.add_sa_codes(np.ascontiguousarray(sa, dtype=np.uint8))
    if fastscan:
        return faiss.IndexPQFastScan(index)
    return index


def _geomean(v) -> float:
    v = np.asarray(v, dtype=np.float64)
    return float(np.exp(np.mean(np.log(v)))) if v.size else math.nan


def _bootstrap_ci(samples: list[list[float]], seed: int = 0, b: int = 2000) -> tuple[float, float]:
    """90% CI of the geomean over combos of each combo's median time (resampling each combo's repetitions)."""
    rng = np.random.default_rng(seed)
    arr = [np.asarray(s) for s in samples]
    stats = np.empty(b)
    for t in range(b):
        meds = [np.median(a[rng.integers(0, a.size, a.size)]) for a in arr]
        stats[t] = _geomean(meds)
    lo, hi = np.percentile(stats, [5, 95])
    return float(lo), float(hi)


def speed_phase(kern: PQKernels, quick: bool = False, seed: int = 0, use_faiss: bool = True, log=print) -> dict:
    """Time distance_table + scan + top-10; compare against FAISS when available. Returns a summary dict."""
    from .._config import get_num_threads

    n = 2000 if quick else 20_000
    nq = 16 if quick else 256
    reps = 2 if quick else 7
    faiss = _faiss() if use_faiss else None
    if faiss is not None:
        faiss.omp_set_num_threads(get_num_threads())
    rows, samples, mismatches = [], [], []
    for shape in SHAPES_8BIT:
        dim, m, ksub = shape
        for dist in SPEED_DISTS:
            s = seed + 1000 * dim + len(dist)
            data = generate(dist, n + nq + 4096, dim, s)
            x, q, train = data[:n], data[n:n + nq], data[n + nq:]
            cb = make_codebooks(train, m, ksub, s)
            codes = np.asarray(kern.encode(x, cb))

            def run(q=q, cb=cb, codes=codes):
                return kern.adc_search(kern.distance_table(q, cb), codes, K_TOP)

            ts = _timed(run, reps)
            med = float(np.median(ts))
            row = {"shape": shape, "dist": dist, "ns_per_query": med / nq * 1e9,
                   "gbs": n * m * nq / med / 1e9, "faiss_ns_per_query": None, "ratio": None, "faiss_top10": None}
            if faiss is not None:
                index = _faiss_pq(faiss, cb, codes, 8)
                fts = _timed(lambda index=index, q=q: index.search(q, K_TOP), reps)
                fmed = float(np.median(fts))
                fd, fi = index.search(q, K_TOP)
                kd, ki = run()
                msg = R.pq_topk_agrees(kd, ki, fd, fi, TOL)
                row["faiss_top10"] = "same" if msg is None else "DIFFERENT"
                if msg:
                    mismatches.append(f"8-bit dist={dist} shape={shape}: FAISS top-10 differs: {msg}")
                row["faiss_ns_per_query"] = fmed / nq * 1e9
                row["ratio"] = fmed / med  # kvant queries/s over FAISS queries/s
            rows.append(row)
            samples.append([t / nq * 1e9 for t in ts])
            log(_fmt_row(row))

    rows4 = []
    for dim, m in ((128, 32), (128, 16)):
        dist = "clustered"
        s = seed + 77 * dim + m
        data = generate(dist, n + nq + 4096, dim, s)
        x, q, train = data[:n], data[n:n + nq], data[n + nq:]
        cb = make_codebooks(train, m, 16, s)
        codes = np.asarray(kern.encode(x, cb))
        packed = kern.pack_4bit(codes)
        exact = kern.adc_search(kern.distance_table(q, cb), codes, K_TOP)[1]
        for rerank in (0, 2):
            def run4(q=q, cb=cb, packed=packed, rerank=rerank, m=m):
                return kern.fastscan_search(kern.distance_table(q, cb), packed, n, m, K_TOP, rerank)

            ts = _timed(run4, reps)
            med = float(np.median(ts))
            ki = run4()[1]
            row = {"shape": (dim, m, 16), "dist": dist, "rerank": rerank, "ns_per_query": med / nq * 1e9,
                   "recall": _recall(ki, exact), "faiss_ns_per_query": None, "faiss_recall": None, "ratio": None}
            if faiss is not None:
                index = _faiss_pq(faiss, cb, codes, 4, fastscan=True)
                fts = _timed(lambda index=index, q=q: index.search(q, K_TOP), reps)
                fmed = float(np.median(fts))
                row["faiss_ns_per_query"] = fmed / nq * 1e9
                row["faiss_recall"] = _recall(index.search(q, K_TOP)[1], exact)
                row["ratio"] = fmed / med
            rows4.append(row)
            log(_fmt_row4(row))

    enc = _encode_speed(kern, faiss, quick, seed, reps)
    log(f"  encode (128, 16, 256) clustered: {enc['vectors_per_s']:,.0f} vectors/s"
        + ("" if enc["faiss_vectors_per_s"] is None else
           f" | FAISS ProductQuantizer.compute_codes {enc['faiss_vectors_per_s']:,.0f} vectors/s | "
           f"same codes {enc['faiss_same_codes']:.4f}"))

    gm = _geomean([r["ns_per_query"] for r in rows])
    lo, hi = _bootstrap_ci(samples, seed)
    key = (lambda r: r["ratio"]) if faiss is not None else (lambda r: -r["ns_per_query"])
    worst, best = min(rows, key=key), max(rows, key=key)
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    return {"rows": rows, "rows4": rows4, "geomean_ns": gm, "ci90": (lo, hi), "worst": worst, "best": best,
            "gbs_geomean": _geomean([r["gbs"] for r in rows]),
            "faiss_ratio_geomean": _geomean(ratios) if ratios else None,
            "faiss_mismatches": mismatches, "n": n, "nq": nq, "reps": reps, "faiss": faiss is not None,
            "encode": enc}


def _encode_speed(kern: PQKernels, faiss, quick: bool, seed: int, reps: int) -> dict:
    """Encoding throughput, dim 128, m 16, ksub 256 (issue target: >= 1M vectors/s on 2 cores)."""
    n = 5000 if quick else 200_000
    data = generate("clustered", n + 8192, 128, seed + 5)
    x, train = data[:n], data[n:]
    cb = make_codebooks(train, 16, 256, seed + 5)
    med = float(np.median(_timed(lambda: kern.encode(x, cb), reps)))
    out = {"n": n, "vectors_per_s": n / med, "faiss_vectors_per_s": None, "faiss_same_codes": None}
    if faiss is not None:
        pq = faiss.ProductQuantizer(128, 16, 8)
        faiss.copy_array_to_vector(cb.ravel(), pq.centroids)
        fmed = float(np.median(_timed(lambda: pq.compute_codes(x), reps)))
        out["faiss_vectors_per_s"] = n / fmed
        out["faiss_same_codes"] = float(np.mean(pq.compute_codes(x) == np.asarray(kern.encode(x, cb))))
    return out


def _recall(got, exact) -> float:
    return float(np.mean([len(set(g.tolist()) & set(e.tolist())) / exact.shape[1] for g, e in zip(got, exact)]))


def _combo_name(r) -> str:
    return f"{r['dist']} {r['shape']}"


def _fmt_row(r) -> str:
    f = "" if r["ratio"] is None else (f" | FAISS {r['faiss_ns_per_query']:10.0f} ns/q | kvant/FAISS qps "
                                       f"{r['ratio']:5.2f}x | top-10 {r['faiss_top10']}")
    return f"  {_combo_name(r):32s} | {r['ns_per_query']:10.0f} ns/q | {r['gbs']:6.2f} GB/s{f}"


def _fmt_row4(r) -> str:
    f = "" if r["ratio"] is None else (f" | FAISS FastScan {r['faiss_ns_per_query']:9.0f} ns/q (recall "
                                       f"{r['faiss_recall']:.3f}) | kvant/FAISS qps {r['ratio']:5.2f}x")
    return (f"  4-bit {_combo_name(r):26s} rerank={r['rerank']} | {r['ns_per_query']:9.0f} ns/q | "
            f"recall@10 vs exact ADC {r['recall']:.3f}{f}")


def markdown_table(speed: dict) -> str:
    """The per-combo tables as markdown (for README / results)."""
    lines = ["| combo (dist, (dim, m, ksub)) | kvant ns/query | GB/s codes | FAISS IndexPQ ns/query | "
             "kvant/FAISS qps | top-10 vs FAISS |", "|---|---:|---:|---:|---:|---|"]
    for r in speed["rows"]:
        fa = "–" if r["ratio"] is None else f"{r['faiss_ns_per_query']:.0f}"
        ra = "–" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        lines.append(f"| {_combo_name(r)} | {r['ns_per_query']:.0f} | {r['gbs']:.2f} | {fa} | {ra} | "
                     f"{r['faiss_top10'] or '–'} |")
    lines += ["", "| 4-bit combo | rerank | kvant ns/query | recall@10 vs exact ADC | FAISS FastScan ns/query | "
              "FAISS recall@10 | kvant/FAISS qps |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in speed["rows4"]:
        fa = "–" if r["ratio"] is None else f"{r['faiss_ns_per_query']:.0f}"
        fr = "–" if r["ratio"] is None else f"{r['faiss_recall']:.3f}"
        ra = "–" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        lines.append(f"| {_combo_name(r)} | {r['rerank']} | {r['ns_per_query']:.0f} | {r['recall']:.3f} | {fa} | "
                     f"{fr} | {ra} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        # in kvant's own checkout (not the caller's directory, which may be another repository), if it is one
        here = Path(__file__).resolve().parent
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=5,
                             cwd=here).stdout.strip()
        if not top or not (Path(top) / "src" / "kvant" / "bench" / "kernels.py").exists():
            return "unknown"
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=here)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


TSV_COLUMNS = ["timestamp", "commit", "host", "threads", "quick", "status", "geomean_ns_per_query", "ci90_lo",
               "ci90_hi", "worst_combo", "best_combo", "gbs_geomean", "mem_bw_gbs", "faiss_ratio_geomean",
               "peak_mib", "total_s"]


def check_results_file(path: Path) -> None:
    """InvalidInput unless ``path`` is absent, empty, or a TSV whose header is :data:`TSV_COLUMNS` (a row appended
    under another header would sit in the wrong columns)."""
    from ..errors import InvalidInput

    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        with open(path, encoding="utf-8") as fh:
            header = fh.readline().rstrip("\n").split("\t")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read the results file {path}: {exc}") from exc
    if header != TSV_COLUMNS:
        raise InvalidInput(f"{path} is not a kernel-harness results file (its header is not {' '.join(TSV_COLUMNS)}); "
                           "name a new file")


def _append_tsv(path: Path, row: dict) -> None:
    check_results_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            unterminated = fh.read(1) != b"\n"  # (a last line without its newline: the row would join it)
    with open(path, "a", encoding="utf-8") as fh:
        if new:
            fh.write("\t".join(TSV_COLUMNS) + "\n")
        elif unterminated:
            fh.write("\n")
        fh.write("\t".join(str(row.get(c, "")) for c in TSV_COLUMNS) + "\n")


def run(kernels: PQKernels | None = None, quick: bool = False, seed: int = 0, speed: bool = True,
        use_faiss: bool = True, results: str | os.PathLike | None = None, log=print) -> dict:
    """Run the harness. Returns a dict with ``exit_code`` (0 pass, 2 correctness failure), ``failures``,
    ``speed`` (or None) and ``text`` (the printed report). ``results``: a TSV to append a row to (none by default;
    ``kvant bench kernels`` passes ``DEFAULT_RESULTS`` in a checkout)."""
    from .._config import get_num_threads

    kern = kernels or PQKernels()
    if results is not None:  # before the run, not after it
        check_results_file(Path(results))
    t0 = time.perf_counter()
    lines: list[str] = []

    def say(s=""):
        lines.append(s)
        log(s)

    say(f"kvant kernel harness — threads={get_num_threads()} quick={quick} seed={seed}")
    say("correctness phase (tolerance: max_abs_err <= 1e-4 * max(1, |reference|), tie-tolerant top-k)")
    failures = correctness_phase(kern, quick=quick, seed=seed, log=say)
    out = {"exit_code": EXIT_OK, "failures": failures, "speed": None}
    if failures:
        say(f"CORRECTNESS FAILED in {len(failures)} check(s):")
        for f in failures:
            say(f"  {f}")
        out["exit_code"] = EXIT_FAIL
    sp = None
    if speed and not failures:
        n = 2000 if quick else 20_000
        say(f"speed phase: distance_table + scan + top-{K_TOP} over {n} codes, batches of queries")
        sp = speed_phase(kern, quick=quick, seed=seed, use_faiss=use_faiss, log=say)
        bw = memory_bandwidth_gbs(1 << 24 if quick else 1 << 29)
        sp["mem_bw_gbs"] = bw
        lo, hi = sp["ci90"]
        say(f"geomean {sp['geomean_ns']:.0f} ns/query (bootstrap 90% CI {lo:.0f} – {hi:.0f}); "
            f"worst {_combo_name(sp['worst'])}, best {_combo_name(sp['best'])}"
            + (" (by kvant/FAISS ratio)" if sp["faiss"] else " (by ns/query)"))
        say(f"codes scanned: geomean {sp['gbs_geomean']:.2f} GB/s; machine read bandwidth (parallel sum over "
            f"{(1 << 24 if quick else 1 << 29) >> 20} MiB) {bw:.1f} GB/s")
        if sp["faiss"]:
            say(f"kvant/FAISS IndexPQ queries/s: geomean {sp['faiss_ratio_geomean']:.2f}x")
        for msg in sp["faiss_mismatches"]:
            say(f"  WARNING {msg}")
        out["speed"] = sp
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    total = time.perf_counter() - t0
    say(f"peak memory {peak:.0f} MiB; total {total:.1f} s; "
        f"{'PASS' if out['exit_code'] == EXIT_OK else 'FAIL (exit 2)'}")
    out.update(peak_mib=peak, total_s=total, text="\n".join(lines))
    if results is not None:
        row = {"timestamp": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": _git_commit(),
               "host": platform.node() or "?", "threads": get_num_threads(), "quick": int(quick),
               "status": "pass" if out["exit_code"] == EXIT_OK else "fail", "peak_mib": f"{peak:.0f}",
               "total_s": f"{total:.1f}"}
        if sp is not None:
            row.update(geomean_ns_per_query=f"{sp['geomean_ns']:.0f}", ci90_lo=f"{sp['ci90'][0]:.0f}",
                       ci90_hi=f"{sp['ci90'][1]:.0f}", worst_combo=_combo_name(sp["worst"]),
                       best_combo=_combo_name(sp["best"]), gbs_geomean=f"{sp['gbs_geomean']:.2f}",
                       mem_bw_gbs=f"{sp['mem_bw_gbs']:.1f}",
                       faiss_ratio_geomean="" if sp["faiss_ratio_geomean"] is None
                       else f"{sp['faiss_ratio_geomean']:.3f}")
        _append_tsv(Path(results), row)
        out["results"] = str(results)
        if sp is not None and not quick:  # the latest full run's tables, for README
            md = Path(results).with_suffix(".md")
            enc = sp["encode"]
            extra = [f"Encoding (128, 16, 256), {enc['n']:,} clustered vectors: kvant {enc['vectors_per_s']:,.0f} "
                     "vectors/s" + ("" if enc["faiss_vectors_per_s"] is None else
                                    f", FAISS {enc['faiss_vectors_per_s']:,.0f} vectors/s "
                                    f"(same codes: {enc['faiss_same_codes']:.4f})") + ".",
                     f"Geomean {sp['geomean_ns']:.0f} ns/query (bootstrap 90% CI {sp['ci90'][0]:.0f}–"
                     f"{sp['ci90'][1]:.0f}); codes scanned {sp['gbs_geomean']:.2f} GB/s vs machine read bandwidth "
                     f"{sp['mem_bw_gbs']:.1f} GB/s; peak memory {peak:.0f} MiB; total {total:.1f} s; "
                     f"threads {get_num_threads()}; commit {row['commit']}."]
            if sp["faiss_ratio_geomean"] is not None:
                extra.append(f"kvant/FAISS IndexPQ queries/s geomean: {sp['faiss_ratio_geomean']:.2f}×.")
            md.write_text(markdown_table(sp) + "\n\n" + "\n".join(extra) + "\n", encoding="utf-8")
    return out


def main(argv=None) -> int:
    """``python -m kvant.bench.kernels [flags]``: the same run, flags and exit codes as ``kvant bench kernels``."""
    from ..cli import main as cli_main

    return cli_main(["bench", "kernels", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # python -m kvant.bench.kernels [--quick]
    sys.exit(main())
