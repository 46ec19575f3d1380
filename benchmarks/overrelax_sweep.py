"""The sweep behind docs/auto.md's "Over-relaxed Lloyd": `auto` with overrelax β_max × max_iter vs FAISS default.

For each cell and seed, runs ``faiss.Kmeans`` with its defaults (25 plain iterations on a 256·K sample) and
``kvant.Clusterer`` (auto's sampling, seeding and tolerance) with each ``β_max/max_iter`` setting, side by side
in one process on the same data and threads, and prints seconds, iterations and the quality relative to
FAISS (MSE for l2, mean cosine for cos, both scored by the grid's NumPy ``quality``; negative = kvant better).
Uses the benchmark grid's cached datasets.

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cells", nargs="+", help="family:N:D:K:metric (N = D = 0 for digits / fashion-mnist)")
    ap.add_argument("--settings", default="0/25,1/10,1/15,1/25", help="comma-separated overrelax/max_iter pairs")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import faiss

    kvant.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    settings = [(float(s.split("/")[0]), int(s.split("/")[1])) for s in args.settings.split(",")]
    for cell in args.cells:
        fam, n, dim, k, metric = cell.split(":")
        n, dim, k = int(n) or None, int(dim) or None, int(k)
        x, _ = grid.load_dataset(fam, n, dim, 256 if n else 10)
        sign = -grid.better(metric)  # + = kvant worse
        for seed in (int(s) for s in args.seeds.split(",")):
            t = time.perf_counter()
            labels, centres, _ = grid.run_faiss(True)(x, k, metric, seed)
            t_faiss = time.perf_counter() - t
            q_faiss = grid.quality(x, labels, centres, metric)
            out = [f"{cell} seed {seed}: FAISS {t_faiss:.2f} s"]
            for beta, max_iter in settings:
                t = time.perf_counter()
                c = kvant.Clusterer(k=k, metric=metric, seed=seed, max_iter=max_iter, overrelax=beta).fit(x)
                t_kvant = time.perf_counter() - t
                q = grid.quality(x, c.labels_, c.cluster_centers_, metric)  # the grid's own NumPy score, both sides
                rel = sign * (q - q_faiss) / abs(q_faiss) * 100
                speed = t_faiss / t_kvant
                out.append(f"β≤{beta:g}/{max_iter}: {t_kvant:.2f} s ({speed:.2f}×) {c.n_iter_} it {rel:+.2f}%")
            print(" | ".join(out), flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
