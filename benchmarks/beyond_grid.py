"""Beyond the issues' grids: kvant against its anchors on shapes no target names, side by side in one process.

The issue benchmarks fix their grids (K in {10, 64, 256, 1024} on five datasets; PQ on Fashion-MNIST and 1M × 128;
cover trees at d = 3, 8, 32). A method tuned to those cells would pass them and fail elsewhere, so this script runs
the same comparisons on other shapes: very low and very high dimensions, K from 2 to 3,000, K close to N, tiny and
2M-row inputs, other metrics. It sets no target of its own; it reports where kvant wins and where it loses.

- Clustering: ``kvant auto`` against ``faiss.Kmeans`` defaults (benchmarks/clustering.py's methods and timing: FAISS's
  time includes assigning every row; medians over seeds of time and quality, alternating runs).
- PQ: ``PQIndex`` 8-bit against ``faiss.IndexPQ`` and 4-bit against ``faiss.IndexPQFastScan`` on the same codebooks and
  codes (benchmarks/pq.py's ``bench_search``), recall@10 against exact neighbours of 2,000 held-out rows; and
  (``pq_long``) result lists of k = 100 and 1,000.
- Cover tree: ``kvant.CoverTree`` against ``scipy.spatial.cKDTree(workers=threads)`` for Euclidean, Manhattan and
  Chebyshev distances, 1,024 queries; distances checked against cKDTree's (exact in both).
- Exact search: ``FlatIndex`` against ``faiss.IndexFlatL2`` / ``IndexFlatIP`` (cos: FAISS on normalised copies, the
  queries normalised inside its timed call), k from 1 to 5,000; the share of ids both return.

    python benchmarks/beyond_grid.py [--parts clustering,pq,pq_long,tree,flat] [--out beyond_grid]

Writes benchmarks/results/<out>.{json,md}. About 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clustering as cb  # noqa: E402 - the sibling benchmark's methods, timing and scoring
import kvant  # noqa: E402
import pq as pb  # noqa: E402
from kvant._parallel import numba_threading_layer  # noqa: E402
from kvant.bench import datasets  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# (family, N, D, true clusters, K, metric)
CLUSTER_CELLS = [
    ("blobs", 10_000, 2, 5, 5, "l2"),
    ("blobs", 2_000_000, 16, 10, 10, "l2"),
    ("heavy_tailed", 100_000, 100, 2, 2, "l2"),
    ("anisotropic", 1_000_000, 128, 256, 2, "l2"),
    ("anisotropic", 1_000_000, 128, 256, 5, "cos"),
    ("heavy_tailed", 1_000_000, 128, 256, 4, "l2"),
    ("zipf_imbalanced", 200_000, 384, 256, 3, "l2"),
    ("blobs", 500_000, 64, 20, 20, "l2"),
    ("zipf_imbalanced", 500_000, 32, 1000, 1000, "l2"),
    ("irrelevant_dims", 30_000, 300, 3000, 3000, "l2"),
    ("blobs", 100_000, 64, 2048, 2048, "l2"),
    ("blobs", 100_000, 768, 100, 100, "cos"),
    ("hubness", 50_000, 1536, 50, 50, "cos"),
    ("hubness", 200_000, 256, 128, 128, "cos"),
    ("anisotropic", 200_000, 1024, 256, 256, "l2"),
    ("blobs", 1_000_000, 2, 1024, 1024, "l2"),
    ("blobs", 500_000, 8, 256, 256, "l2"),
]

# (family, N, D, [(m, nbits), ...])
PQ_CELLS = [
    ("blobs", 200_000, 96, [(24, 8), (48, 4)]),
    ("hubness", 100_000, 768, [(96, 8), (192, 4)]),
    ("anisotropic", 300_000, 256, [(32, 8), (64, 4)]),
    ("blobs", 500_000, 16, [(8, 8), (16, 4)]),
]

# Long PQ result lists: (family, N, D, [(m, nbits), ...], k, queries); "same ids" is the share of FAISS's ids kvant
# returns too (8-bit: the same exact ADC order up to ties; 4-bit: kvant re-scores 4k rows exactly, FAISS ranks by its
# u8 sums)
PQ_LONG_CELLS = [
    ("blobs", 200_000, 64, [(16, 8), (32, 4)], 100, 200),
    ("blobs", 200_000, 64, [(16, 8), (32, 4)], 1000, 200),
]

# (data, N, D, metric, Minkowski p for cKDTree)
TREE_CELLS = [
    ("blobs", 200_000, 16, "euclidean", 2),
    ("blobs", 200_000, 16, "manhattan", 1),
    ("uniform", 100_000, 5, "chebyshev", np.inf),
    ("blobs", 300_000, 4, "euclidean", 2),
    ("hubness", 50_000, 64, "euclidean", 2),
]


# (family, N, D, metric, k, queries)
FLAT_CELLS = [
    ("hubness", 100_000, 1536, "cos", 10, 256),
    ("blobs", 2_000_000, 16, "l2", 10, 512),
    ("blobs", 50_000, 96, "ip", 100, 1024),
    ("anisotropic", 300_000, 256, "l2", 1, 64),
    ("blobs", 20_000, 3, "l2", 100, 1000),
    ("blobs", 100_000, 64, "l2", 1000, 100),
    ("anisotropic", 50_000, 32, "ip", 5000, 200),
]


def _data(family, n, dim, k_true, seed=0):
    """float32 rows; the benchmark families at the clustering grid's cache when k_true = 256 (the grid's)."""
    if k_true == 256:
        x, _ = cb.load_dataset(family, n, dim, k_true)
    else:
        x, _ = datasets.load(family, n, dim, k_true, seed=seed)
    return np.ascontiguousarray(x, np.float32)


def run_clustering(repeats):
    fns = {name: cb.METHODS[name] for name in cb.TARGET_METHODS}
    rows = []
    for family, n, dim, k_true, k, metric in CLUSTER_CELLS:
        x = _data(family, n, dim, k_true)
        with cb.cell_lock():
            res = cb.interleaved(fns, x, k, metric, 0, repeats)
        row = dict(data=family, n=n, dim=dim, k=k, metric=metric)
        for name, (med, _, outs) in res.items():
            key = "kvant" if name.startswith("kvant") else "faiss"
            row[f"{key}_s"] = med
            row[f"{key}_quality"] = float(np.median([cb.quality(x, o[0], o[1], metric) for o in outs]))
            row[f"{key}_runs"] = len(outs)
        worse = (row["kvant_quality"] - row["faiss_quality"]) / abs(row["faiss_quality"]) * 100.0
        row["kvant_worse_pct"] = worse if metric == "l2" else -worse
        row["speedup"] = row["faiss_s"] / row["kvant_s"]
        rows.append(row)
        print(f"  {family} {n}x{dim} K={k} {metric}: kvant {row['kvant_s'] * 1e3:.1f} ms, "
              f"FAISS {row['faiss_s'] * 1e3:.1f} ms, {row['speedup']:.2f}x, "
              f"quality {row['kvant_worse_pct']:+.2f}% worse", flush=True)
    return rows


def run_pq(faiss, repeats):
    rows = []
    for family, n, dim, shapes in PQ_CELLS:
        x = _data(family, n + 2000, dim, 100, seed=1)
        q, x = x[:2000].copy(), x[2000:].copy()  # held-out queries from the same distribution
        gt = pb.ground_truth(faiss, x, q)  # exact, from faiss.IndexFlatL2 (not the library under test)
        for m, nbits in shapes:
            with cb.cell_lock():
                row, _ = pb.bench_search(faiss, f"{family} {n}x{dim}", x, q, gt, m, nbits, repeats)
            row["ratio"] = row["kvant_qps"] / row["faiss_qps"]
            rows.append(row)
            print(f"  {row['dataset']} {row['index']}: {row['ratio']:.2f}x, R@10 {row['kvant_recall10']:.4f} vs "
                  f"{row['faiss_recall10']:.4f}", flush=True)
    return rows


def run_pq_long(faiss, repeats):
    rows = []
    for family, n, dim, shapes, k, nq in PQ_LONG_CELLS:
        x = _data(family, n + nq, dim, 100, seed=4)
        q, x = x[:nq].copy(), x[nq:].copy()
        for m, nbits in shapes:
            with cb.cell_lock():
                index, fidx, _, _, _ = pb.build_pair(faiss, x, m, nbits)
                index.search(q[:2], k)  # warm
                fidx.search(q[:2], k)
                (t_k, (_, ik)), (t_f, (_, i_f)) = pb.timed_pair(lambda a=index, q=q, k=k: a.search(q, k),
                                                                lambda b=fidx, q=q, k=k: b.search(q, k), repeats)
            same = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ik.tolist(), i_f.tolist())]))
            rows.append(dict(data=family, n=n, dim=dim, index=f"PQ{m}x{nbits}", k=k, nq=nq, kvant_ms=t_k * 1e3,
                             faiss_ms=t_f * 1e3, ratio=t_f / t_k, same_ids=same))
            print(f"  {family} {n}x{dim} PQ{m}x{nbits} k={k}: {rows[-1]['ratio']:.2f}x FAISS, same ids {same:.4f}",
                  flush=True)
    return rows


def _seconds(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _tree_cell(x, q, metric, p, k, threads, repeats):
    """One cover-tree cell: builds (one each), then ``repeats`` alternating query runs of each side (medians)."""
    from scipy.spatial import cKDTree

    build_k, tree = _seconds(lambda: kvant.CoverTree(metric=metric).fit(x))
    build_c, kd = _seconds(lambda: cKDTree(x))
    tree.knn(q[:64], k)  # warm: compile and page in
    kd.query(q[:64], k, p=p, workers=threads)
    times = ([], [])
    for _ in range(repeats):
        t_k, (dk, _) = _seconds(lambda: tree.knn(q, k))
        t_c, (dc, _) = _seconds(lambda: kd.query(q, k, p=p, workers=threads))
        times[0].append(t_k)
        times[1].append(t_c)
    nq = q.shape[0]
    return dict(kvant_build_s=build_k, ckdtree_build_s=build_c, kvant_qps=nq / float(np.median(times[0])),
                ckdtree_qps=nq / float(np.median(times[1])), exact=bool(np.allclose(dk, dc, rtol=1e-9, atol=1e-12)))


def run_tree(threads, repeats, nq=1024):
    rng = np.random.default_rng(0)
    rows = []
    for family, n, dim, metric, p in TREE_CELLS:
        if family == "uniform":
            x = rng.random((n + nq, dim))
        else:
            x = datasets.load(family, n + nq, dim, 50, seed=2)[0].astype(np.float64)
        q, x = x[:nq].copy(), x[nq:].copy()
        for k in (8, 50):
            with cb.cell_lock():
                row = dict(data=family, n=n, dim=dim, metric=metric, k=k,
                           **_tree_cell(x, q, metric, p, k, threads, repeats))
            row["ratio"] = row["kvant_qps"] / row["ckdtree_qps"]
            rows.append(row)
            print(f"  {family} {n}x{dim} {metric} k={k}: {row['ratio']:.2f}x cKDTree, exact {row['exact']}", flush=True)
    return rows


def _flat_cell(faiss, x, q, metric, k, repeats):
    index = kvant.FlatIndex(x.shape[1], metric=metric)
    index.add(x)
    xf = x
    if metric == "cos":
        xf = x.copy()
        faiss.normalize_L2(xf)
    fidx = faiss.IndexFlatL2(x.shape[1]) if metric == "l2" else faiss.IndexFlatIP(x.shape[1])
    fidx.add(xf)

    def faiss_search():
        qq = q
        if metric == "cos":  # normalising the queries is part of the search, as kvant's search does it
            qq = q.copy()
            faiss.normalize_L2(qq)
        return fidx.search(qq, k)

    index.search(q[:4], k)  # warm
    faiss_search()
    (t_k, (_, ik)), (t_f, (_, i_f)) = pb.timed_pair(lambda: index.search(q, k), faiss_search, repeats)
    overlap = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ik, i_f)]))
    return dict(kvant_ms=t_k * 1e3, faiss_ms=t_f * 1e3, same_ids=overlap)


def run_flat(faiss, repeats):
    rows = []
    for family, n, dim, metric, k, nq in FLAT_CELLS:
        x = _data(family, n + nq, dim, 50, seed=3)
        q, x = x[:nq].copy(), x[nq:].copy()
        with cb.cell_lock():
            row = dict(data=family, n=n, dim=dim, metric=metric, k=k, nq=nq, **_flat_cell(faiss, x, q, metric, k,
                                                                                          repeats))
        row["ratio"] = row["faiss_ms"] / row["kvant_ms"]
        rows.append(row)
        print(f"  {family} {n}x{dim} {metric} k={k} nq={nq}: {row['ratio']:.2f}x FAISS, same ids "
              f"{row['same_ids']:.4f}", flush=True)
    return rows


def _table(title, intro, columns, rows):
    """A markdown section: title, intro, and a table whose ``columns`` are (header, right-aligned) pairs."""
    out = [f"## {title}", "", intro, "", "| " + " | ".join(h for h, _ in columns) + " |",
           "|" + "|".join("---:" if right else "---" for _, right in columns) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in rows]
    return out + [""]


def write_markdown(res, path):
    lines = [f"# Beyond the grids ({res['run']})", "",
             f"Host: {res['host']}; {res['threads']} threads (Numba layer {res['numba_layer']}). Every row ran kvant "
             "and its anchor side by side in one process on the same data and threads; medians.", ""]
    if res.get("clustering"):
        lines += _table(
            "Clustering: `kvant auto` vs `faiss.Kmeans` defaults",
            "Quality: MSE (l2) or mean cosine (cos) over all rows, median over the seeds; \"worse\" > 0 means kvant's "
            "is worse. The grid's targets, for reference: >= 2x at <= 0.5% worse.",
            [("data", 0), ("N × D", 0), ("K", 1), ("metric", 0), ("kvant ms", 1), ("FAISS ms", 1),
             ("FAISS / kvant", 1), ("kvant worse", 1), ("runs", 1)],
            [[r["data"], f"{r['n']:,} × {r['dim']}", str(r["k"]), r["metric"], f"{r['kvant_s'] * 1e3:.1f}",
              f"{r['faiss_s'] * 1e3:.1f}", f"{r['speedup']:.2f}×", f"{r['kvant_worse_pct']:+.2f}%",
              str(r["kvant_runs"])] for r in res["clustering"]])
    if res.get("pq"):
        lines += _table(
            "PQ search: `PQIndex` vs FAISS on the same codebooks and codes",
            "2,000 held-out queries, k = 10; 8-bit against `IndexPQ`, 4-bit against `IndexPQFastScan`; \"same "
            "top-10\": share of queries whose top-10 matches IndexPQ's up to ties (8-bit); the 4-bit recall "
            "difference comes with a paired bootstrap 90% CI.",
            [("data", 0), ("index", 0), ("kvant q/s", 1), ("FAISS q/s", 1), ("kvant / FAISS", 1),
             ("kvant R@10", 1), ("FAISS R@10", 1), ("exact ADC R@10", 1), ("same top-10 / kvant − FAISS CI", 0)],
            [[r["dataset"], r["index"], f"{r['kvant_qps']:,.0f}", f"{r['faiss_qps']:,.0f}", f"{r['ratio']:.2f}×",
              f"{r['kvant_recall10']:.4f}", f"{r['faiss_recall10']:.4f}",
              f"{r['exact_adc_recall10']:.4f}" if r["nbits"] == 4 else "-",
              f"{r['same_top10']:.4f}" if r["nbits"] == 8 else "[{:+.4f}, {:+.4f}]".format(*r["recall_diff_ci90"])]
             for r in res["pq"]])
    if res.get("pq_long"):
        lines += _table(
            "PQ search with long result lists",
            "Same codebooks and codes on both sides; 8-bit against `IndexPQ`, 4-bit against `IndexPQFastScan`; "
            "\"same ids\": the share of FAISS's ids kvant returns too (4-bit: kvant re-scores 4k rows exactly, FAISS "
            "ranks by its u8 sums).",
            [("data", 0), ("N × D", 0), ("index", 0), ("k", 1), ("queries", 1), ("kvant ms", 1), ("FAISS ms", 1),
             ("FAISS / kvant", 1), ("same ids", 1)],
            [[r["data"], f"{r['n']:,} × {r['dim']}", r["index"], f"{r['k']:,}", f"{r['nq']:,}", f"{r['kvant_ms']:.1f}",
              f"{r['faiss_ms']:.1f}", f"{r['ratio']:.2f}×", f"{r['same_ids']:.4f}"] for r in res["pq_long"]])
    if res.get("tree"):
        lines += _table(
            "Cover tree: `kvant.CoverTree` vs `scipy.spatial.cKDTree`",
            "1,024 queries; \"exact\": kvant's distances equal cKDTree's (both are exact).",
            [("data", 0), ("N × D", 0), ("metric", 0), ("k", 1), ("build s (kvant / cKDTree)", 0), ("kvant q/s", 1),
             ("cKDTree q/s", 1), ("kvant / cKDTree", 1), ("exact", 0)],
            [[r["data"], f"{r['n']:,} × {r['dim']}", r["metric"], str(r["k"]),
              f"{r['kvant_build_s']:.2f} / {r['ckdtree_build_s']:.2f}", f"{r['kvant_qps']:,.0f}",
              f"{r['ckdtree_qps']:,.0f}", f"{r['ratio']:.2f}×", "yes" if r["exact"] else "NO"] for r in res["tree"]])
    if res.get("flat"):
        lines += _table(
            "Exact search: `FlatIndex` vs FAISS `IndexFlatL2` / `IndexFlatIP`",
            "Both exact; \"same ids\": the share of the k ids both return (ties may order differently).",
            [("data", 0), ("N × D", 0), ("metric", 0), ("k", 1), ("queries", 1), ("kvant ms", 1), ("FAISS ms", 1),
             ("FAISS / kvant", 1), ("same ids", 1)],
            [[r["data"], f"{r['n']:,} × {r['dim']}", r["metric"], str(r["k"]), f"{r['nq']:,}", f"{r['kvant_ms']:.1f}",
              f"{r['faiss_ms']:.1f}", f"{r['ratio']:.2f}×", f"{r['same_ids']:.4f}"] for r in res["flat"]])
    path.write_text("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="clustering,pq,pq_long,tree,flat")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="beyond_grid")
    args = p.parse_args(argv)
    import faiss

    # kvant caps the count at NUMBA_NUM_THREADS: FAISS, cKDTree and the record get the count it really uses
    threads = kvant.set_num_threads(args.threads)
    faiss.omp_set_num_threads(threads)
    parts = set(args.parts.split(","))
    unknown = parts - {"clustering", "pq", "pq_long", "tree", "flat"}
    if unknown:
        p.error(f"unknown parts: {', '.join(sorted(unknown))}")
    import platform

    from kvant.kernels._llvm import host_cpu_name

    host = f"{platform.processor() or platform.machine()}, LLVM cpu {host_cpu_name()}"
    res = dict(run=cb.this_run(), threads=threads, numba_layer=numba_threading_layer(), host=host)
    t0 = time.perf_counter()
    if "clustering" in parts:
        print("clustering", flush=True)
        res["clustering"] = run_clustering(args.repeats)
    if "pq" in parts:
        print("pq", flush=True)
        res["pq"] = run_pq(faiss, args.repeats)
    if "pq_long" in parts:
        print("pq_long", flush=True)
        res["pq_long"] = run_pq_long(faiss, args.repeats)
    if "tree" in parts:
        print("tree", flush=True)
        res["tree"] = run_tree(threads, args.repeats)
    if "flat" in parts:
        print("flat", flush=True)
        res["flat"] = run_flat(faiss, args.repeats)
    res["seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(res, indent=1, default=float))
    write_markdown(res, RESULTS / f"{args.out}.md")
    print(f"wrote {RESULTS / args.out}.{{json,md}} in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
