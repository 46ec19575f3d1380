"""The sweep behind docs/auto.md's "Over-relaxed Lloyd": `auto` with overrelax β_max × max_iter vs FAISS default.

For each cell and seed, runs ``faiss.Kmeans`` with its defaults (25 plain iterations on a 256·K sample) and
``kvant.Clusterer`` (auto's sampling, seeding and tolerance) with each ``β_max/max_iter`` setting, side by side
in one process on the same data and threads, and prints seconds, iterations and the quality relative to
FAISS (MSE for l2, mean cosine for cos, both scored by the grid's NumPy ``quality``; negative = kvant better).
Every method gets one untimed call, then ``--runs`` timed runs (same seed) in rounds whose order alternates
(FAISS first, then last, ...); times are medians, quality and iterations are the first timed run's. Each call gets
its own input as the grid prepares it (``clustering._prepared``: FAISS's cos fit normalises a copy, never ``x``),
and FAISS's time includes assigning all rows, as kvant's does. Uses the benchmark grid's cached datasets.

    flock /tmp/kvant-bench.lock .venv/bin/python benchmarks/overrelax_sweep.py --seeds 0,1,2 \\
        --settings 0/25,1/10,1/15,1/25 anisotropic:200000:384:256:cos fashion-mnist:0:0:10:l2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import clustering as grid  # noqa: E402  (the grid's dataset loader, FAISS runner and quality score)
import kvant  # noqa: E402


def timed_rounds(fns: dict, x, k, metric, seed, runs):
    """{name: (median seconds, first timed run's output)}: one untimed call of each method, then ``runs`` rounds of
    one timed call each, in the order of ``fns`` on even rounds and reversed on odd ones, so neither side always runs
    right after the other. Every call gets its own input, prepared untimed (``clustering._prepared``)."""
    times = {name: [] for name in fns}
    outs = {}
    for fn in fns.values():  # warm-up: compilation, page faults, thread-pool start
        fn(grid._prepared(fn, x, metric), k, metric, seed)
    for r in range(runs):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            fn = fns[name]
            data = grid._prepared(fn, x, metric)
            t = time.perf_counter()
            out = fn(data, k, metric, seed)
            times[name].append(time.perf_counter() - t)
            outs.setdefault(name, out)
    return {name: (float(np.median(times[name])), outs[name]) for name in fns}


def run_kvant(beta: float, max_iter: int):
    def fn(x, k, metric, seed):
        c = kvant.Clusterer(k=k, metric=metric, seed=seed, max_iter=max_iter, overrelax=beta).fit(x)
        return c.labels_, c.cluster_centers_, {"n_iter": c.n_iter_}

    return fn


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cells", nargs="+", help="family:N:D:K:metric (N = D = 0 for digits / fashion-mnist)")
    ap.add_argument("--settings", default="0/25,1/10,1/15,1/25", help="comma-separated overrelax/max_iter pairs")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per method, cell and seed (median)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    import faiss

    threads = kvant.set_num_threads(args.threads)  # (capped at NUMBA_NUM_THREADS: FAISS gets the same count)
    faiss.omp_set_num_threads(threads)
    settings = [(float(s.split("/")[0]), int(s.split("/")[1])) for s in args.settings.split(",")]
    fns = {"FAISS": grid.run_faiss(True)} | {(beta, max_iter): run_kvant(beta, max_iter) for beta, max_iter in settings}
    for cell in args.cells:
        fam, n, dim, k, metric = cell.split(":")
        n, dim, k = int(n) or None, int(dim) or None, int(k)
        x, _ = grid.load_dataset(fam, n, dim, 256 if n else 10)
        x = np.ascontiguousarray(x, dtype=np.float32)  # as the grid runs every method
        sign = -grid.better(metric)  # + = kvant worse
        for seed in (int(s) for s in args.seeds.split(",")):
            res = timed_rounds(fns, x, k, metric, seed, args.runs)
            t_faiss, (labels, centres, _) = res["FAISS"]
            q_faiss = grid.quality(x, labels, centres, metric)
            out = [f"{cell} seed {seed}: FAISS {t_faiss:.2f} s"]
            for beta, max_iter in settings:
                t_kvant, (labels, centres, info) = res[(beta, max_iter)]
                q = grid.quality(x, labels, centres, metric)  # the grid's own NumPy score, both sides
                rel = sign * (q - q_faiss) / abs(q_faiss) * 100
                speed = t_faiss / t_kvant
                out.append(f"β≤{beta:g}/{max_iter}: {t_kvant:.2f} s ({speed:.2f}×) {info['n_iter']} it {rel:+.2f}%")
            print(" | ".join(out), flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
