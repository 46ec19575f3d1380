"""Exact brute-force search: kvant.FlatIndex (l2, cos) vs faiss.IndexFlatL2 / IndexFlatIP, and kvant's own other
paths.

One process, same data, same thread count; kvant (its default routing), kvant's fused kernel alone, its BLAS-tile path
(the shortlist before 2026-12-05, kept for unconditioned data below ``DIRECT_MIN_QUERIES`` queries) and FAISS run
alternately (each timed call right after an untimed one of its own, since 2026-12-07), medians of ``--repeat`` runs
per query-batch size, on 1M × 128 and 300k × 768 Gaussian rows (the
second: wide rows, where batches of D × queries >= ``BLAS_SCREEN_MIN_WORK`` take BLAS blocks screened in cache).
On hosts with AMX, kvant's default routing first runs the bf16 tile pass (``kvant.kernels.amx_topk``) on batches of
at least ``AMX_MIN_QUERIES`` queries of ``AMX_MIN_DIM`` or more dimensions (and ``AMX_MIN_WORK``); the fused and
BLAS-tile columns never do.
FAISS runs twice: with its defaults (1.15.1 here: its
``distance_compute_blas_threshold`` reads 128,000, and batches of 16-256 queries took its slow non-BLAS scan) and
with that threshold at 20, the value FAISS long documented, where batches of 20 queries and more go to BLAS.
Every answer is checked against the others (identical ids; the script
fails if kvant's paths differ, and reports FAISS's agreement).

    flock /tmp/kvant-bench.lock .venv/bin/python benchmarks/flat.py            # k = 10, l2 and cos
    flock /tmp/kvant-bench.lock .venv/bin/python benchmarks/flat.py --quick    # 100k x 128 and 30k x 768 rows

Writes benchmarks/results/flat.{json,md} (``--name`` another stem).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import kvant
from kvant._parallel import numba_threading_layer
from kvant.index import flat

RESULTS = Path(__file__).resolve().parent / "results"


def timed_alternating(fns: dict, repeat: int) -> tuple[dict, dict]:
    """Median seconds of each function, the functions run in turn ``repeat`` times (drift hits all alike), each timed
    call right after an untimed one of its own. FAISS's OpenMP threads spin on after each call, and the call after
    FAISS's shared the cores with them: on the Zen 5 host (2026-12-07) kvant's default routing, then the same code
    as the fused path, read 25-53 ms against 20-46 ms at 1M × 128 and 417 against 295 ms at 300k × 768 nq = 256. After
    its own call each method runs warm and alone, as a service calling it back to back would (the clustering
    benchmark's ``WARM_CALL_SECONDS`` rule). The first untimed call also takes each method's compilation and page
    faults."""
    times = {name: [] for name in fns}
    outs = {}
    for _ in range(repeat):
        for name, fn in fns.items():
            fn()
            t = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--name", default=None, help="results file stem in benchmarks/results (default flat, flat_quick)")
    args = ap.parse_args()
    shapes = [(100_000, 128), (30_000, 768)] if args.quick else [(1_000_000, 128), (300_000, 768)]
    threads = kvant.get_num_threads()
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:  # pragma: no cover - faiss is in the bench extra
        faiss = None
    fused_min, screen_min, amx_min = flat.DIRECT_MIN_QUERIES, flat.BLAS_SCREEN_MIN_DIM, flat.AMX_MIN_QUERIES
    rows = []
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    cells = [(n, dim, metric) for n, dim in shapes for metric in ("l2", "cos")]
    for n, dim, metric in cells:
        if metric == "l2":  # (cos searches the same rows)
            x = rng.standard_normal((n, dim), dtype=np.float32)
        index = kvant.FlatIndex(dim, metric)
        index.add(x)
        fi = None
        if faiss is not None:  # cos: inner product on the rows kvant normalised at add (the same vectors)
            fi = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
            fi.add(x if metric == "l2" else index._x.view)

        def kvant_path(q, path: str, index=index):
            flat.DIRECT_MIN_QUERIES = 1 << 62 if path == "tiles" else fused_min
            flat.BLAS_SCREEN_MIN_DIM = screen_min if path == "default" else 1 << 62
            flat.AMX_MIN_QUERIES = amx_min if path == "default" else 1 << 62
            try:
                return index.search(q, args.k)
            finally:
                flat.DIRECT_MIN_QUERIES, flat.BLAS_SCREEN_MIN_DIM, flat.AMX_MIN_QUERIES = fused_min, screen_min, amx_min

        def faiss_search(q, fi=fi, metric=metric):
            if metric == "cos":  # normalising the queries is part of the search, timed, as kvant's search does it
                q = q.copy()
                faiss.normalize_L2(q)
            return fi.search(q, args.k)

        def faiss_search_blas20(q, faiss_search=faiss_search):
            default = faiss.cvar.distance_compute_blas_threshold
            faiss.cvar.distance_compute_blas_threshold = 20
            try:
                return faiss_search(q)
            finally:
                faiss.cvar.distance_compute_blas_threshold = default

        for nq in (1, 4, 16, 64, 256, 1024):
            q = rng.standard_normal((nq, dim), dtype=np.float32)
            fns = {"kvant": lambda q=q: kvant_path(q, "default"), "kvant_fused": lambda q=q: kvant_path(q, "fused"),
                   "kvant_blas_tiles": lambda q=q: kvant_path(q, "tiles")}
            if fi is not None:  # FAISS gets the raw queries too (cos: normalised inside its timed call)
                fns["faiss"] = lambda q=q: faiss_search(q)
                fns["faiss_blas20"] = lambda q=q: faiss_search_blas20(q)
            secs, outs = timed_alternating(fns, args.repeat)
            if not (np.array_equal(outs["kvant"][1], outs["kvant_blas_tiles"][1])
                    and np.array_equal(outs["kvant"][1], outs["kvant_fused"][1])):
                raise SystemExit(f"kvant's paths disagree at {n}x{dim} {metric} nq={nq}")
            row = {"metric": metric, "n": n, "dim": dim, "nq": nq, "k": args.k, "seconds": secs,
                   "faiss_same_ids": float(np.mean(outs["faiss"][1] == outs["kvant"][1])) if fi is not None else None}
            rows.append(row)
            print(f"{n}x{dim} {metric} nq={nq}: " + "  ".join(f"{name} {s * 1e3:.1f} ms" for name, s in secs.items())
                  + (f"  same ids as FAISS {row['faiss_same_ids']:.4f}" if fi is not None else ""), flush=True)
    elapsed = time.perf_counter() - t0
    meta = {"machine": platform.processor() or platform.machine(), "threads": threads,
            "numba_threading_layer": numba_threading_layer(), "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0], "numpy": np.__version__, "elapsed_s": elapsed, "quick": args.quick,
            "faiss": None if faiss is None else faiss.__version__,
            "faiss_blas_threshold_default": None if faiss is None else int(faiss.cvar.distance_compute_blas_threshold),
            "repeat": args.repeat,
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.name or ("flat_quick" if args.quick else "flat")
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"FlatIndex, Gaussian rows, k = {args.k}, {threads} threads, medians of {args.repeat} "
             f"alternating runs ({meta['measured']}); FAISS: IndexFlatL2 for l2, IndexFlatIP on the normalised rows "
             "for cos (its time includes normalising the queries, as kvant's does). kvant: its default routing (on "
             "AMX hosts the bf16 tile pass first for batches of at least "
             f"{amx_min} queries, {flat.AMX_MIN_DIM} dimensions and queries × D >= {flat.AMX_MIN_WORK}; AMX here: "
             f"{flat.amx_topk.AVAILABLE}); kvant fused: "
             "the fused kernel alone; kvant BLAS tiles: the path before the fused kernel.", "",
             "| rows × D | metric | queries | kvant ms | kvant fused ms | kvant BLAS tiles ms | FAISS default ms "
             "| FAISS BLAS from 20 queries ms | FAISS (best of the two) / kvant | same ids as FAISS |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["seconds"]
        fa, fb = s.get("faiss"), s.get("faiss_blas20")
        lines.append(f"| {r['n']:,} × {r['dim']} | {r['metric']} | {r['nq']:,} | {s['kvant'] * 1e3:.1f} | "
                     f"{s['kvant_fused'] * 1e3:.1f} | {s['kvant_blas_tiles'] * 1e3:.1f} | "
                     + (f"{fa * 1e3:.1f} | {fb * 1e3:.1f} | {min(fa, fb) / s['kvant']:.2f} | "
                        f"{r['faiss_same_ids']:.4f} |"
                        if fa else "- | - | - | - |"))
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
