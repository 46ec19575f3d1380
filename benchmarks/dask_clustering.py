"""kvant.distributed.DaskClusterer on one machine: what the Dask path costs next to the single-process fit.

The same data (zipf_imbalanced 1M x 128, seed 0, as in benchmarks/clustering.py) is written as 8 ``.npy``
shards. In one process, side by side, 2 threads/workers each:

- kvant ``Clusterer(auto)`` on the whole array in memory (2 threads);
- ``DaskClusterer`` (polish_iter 0 and 3) on a ``distributed.LocalCluster`` of 2 single-threaded worker
  processes that read the shards themselves (a list of paths), so the timing includes workers reading
  their data, the sample gather, scheduling and the reductions;
- ``faiss.Kmeans`` with its defaults, the anchor of the clustering benchmark.

Reported: median seconds of ``--repeats`` fits and MSE per row over all rows. Every method gets one untimed fit,
then the timed fits run in rounds whose order alternates (kvant, Dask 0, Dask 3, FAISS; then the reverse), all while
the LocalCluster is up (its idle workers are there for every method alike). Every method's MSE is computed by
this script's float64 ``mse`` from the method's own final centres and labels (first timed fit; the Dask labels are
materialised on the workers after the timings); the methods' own ``mse_`` is kept as ``reported_mse``.
This measures overhead on one machine, not scaling: there is one machine here.

Usage: flock /tmp/kvant-bench.lock .venv/bin/python benchmarks/dask_clustering.py [--n 1000000 --k 256]
Writes benchmarks/results/dask_clustering.json and dask_clustering.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def mse(x: np.ndarray, centres: np.ndarray, labels: np.ndarray) -> float:
    """Σ‖x − c(label)‖² / N in float64, in blocks."""
    total = 0.0
    for s in range(0, x.shape[0], 65536):
        diff = x[s : s + 65536].astype(np.float64) - centres[labels[s : s + 65536]]
        total += float(np.einsum("ij,ij->", diff, diff))
    return total / x.shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import faiss

    import distributed
    import kvant
    import kvant.distributed as kd
    from kvant.bench import datasets

    threads = kvant.set_num_threads(2)  # (capped at NUMBA_NUM_THREADS: FAISS gets the same count)
    faiss.omp_set_num_threads(threads)
    x, _ = datasets.load("zipf_imbalanced", args.n, args.dim, 256, seed=0)
    x = np.ascontiguousarray(x, np.float32)
    tmp = Path(tempfile.mkdtemp(prefix="kvant-dask-"))
    paths = []
    for i, part in enumerate(np.array_split(x, 8)):
        paths.append(tmp / f"part-{i}.npy")
        np.save(paths[-1], part)

    def kvant_fit():
        c = kvant.Clusterer(k=args.k, seed=0).fit(x)
        return c.cluster_centers_, c.labels_, c.mse_

    def dask_fit(polish):
        c = kd.DaskClusterer(k=args.k, seed=0, polish_iter=polish).fit(paths)
        return c.cluster_centers_, c.labels_, c.mse_  # labels_: lazy, computed after the timings

    def faiss_fit():
        km = faiss.Kmeans(args.dim, args.k, niter=25, seed=1)
        km.train(x)
        _, idx = km.index.search(x, 1)
        return km.centroids, idx[:, 0], None

    methods = {f"kvant Clusterer (auto), 1 process x {threads} threads": kvant_fit}
    methods |= {f"kvant DaskClusterer polish_iter={polish}, 2 worker processes x 1 thread":
                (lambda polish=polish: dask_fit(polish)) for polish in (0, 3)}
    methods[f"faiss.Kmeans defaults (+ assignment), {threads} threads"] = faiss_fit
    times = {name: [] for name in methods}
    outs = {}
    env = {"KVANT_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  env=env) as cluster, distributed.Client(cluster):
        for fn in methods.values():  # warm-up, untimed: workers import kvant and load its kernels, JIT, page faults
            fn()
        for r in range(args.repeats):
            for name in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
                t = time.perf_counter()
                out = methods[name]()
                times[name].append(time.perf_counter() - t)
                outs.setdefault(name, out)
        rows = []
        for name in methods:
            centres, labels, reported = outs[name]
            if not isinstance(labels, np.ndarray):
                labels = np.asarray(labels.compute())  # the Dask fit's lazy labels, on the workers
            rows.append({"method": name, "seconds": statistics.median(times[name]), "runs": times[name],
                         "mse": mse(x, centres.astype(np.float64), labels), "reported_mse": reported})
    for r in rows:
        own = "" if r["reported_mse"] is None else f" (its own mse_ {r['reported_mse']:.4f})"
        print(f"{r['method']}: {r['seconds']:.2f} s, MSE {r['mse']:.4f}{own}", flush=True)

    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "n": args.n, "dim": args.dim, "k": args.k,
            "data": "zipf_imbalanced, 8 .npy shards", "versions": {"kvant": kvant.__version__,
                                                                  "distributed": distributed.__version__}}
    (RESULTS / "dask_clustering.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = [f"DaskClusterer on one machine: {args.n:,} x {args.dim}, K = {args.k}, l2 (zipf_imbalanced, "
             f"8 .npy shards read by the workers). Median of {args.repeats} fits, alternating, after an untimed "
             "one each; MSE by this script's float64 score from each method's own centres and labels.", "",
             "| method | seconds | MSE per row |", "|---|---:|---:|"]
    lines += [f"| {r['method']} | {r['seconds']:.2f} | {r['mse']:.4f} |" for r in rows]
    (RESULTS / "dask_clustering.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
