"""The quality-vs-work sweep behind docs/auto.md: training-sample size × init × iterations, vs FAISS defaults.

For each cell, trains kvant's bounded Lloyd on samples of 32/64/128/256 rows per centre with k-means++ or random
init for 5/10/15/25 iterations, assigns all rows, and prints the MSE relative to ``faiss.Kmeans`` with its defaults
(25 iterations on a 256·K sample) together with the work in units of N (a full assignment = 1 N). Quality only:
it is deterministic for the seeds, so it can run on a busy machine.

    python benchmarks/auto_sweep.py > benchmarks/results/auto_sweep.txt
"""

from __future__ import annotations

import numpy as np

from kvant.bench import datasets
from kvant.cluster.clusterer import _assign_all
from kvant.cluster.lloyd import init_centroids, lloyd
from kvant.io import as_source

CELLS = [("zipf_imbalanced", 1_000_000, 128, 256), ("anisotropic", 200_000, 384, 64),
         ("fashion-mnist", None, None, 256), ("heavy_tailed", 200_000, 384, 256)]


def mse(x: np.ndarray, centroids: np.ndarray) -> float:
    src = as_source(x)
    return _assign_all(src, x, centroids, False, with_inertia=True)[1] / len(x)


def main() -> None:
    import faiss

    for name, n, dim, k in CELLS:
        x = datasets.fashion_mnist()[0] if name == "fashion-mnist" else datasets.load(name, n, dim, 256, seed=0)[0]
        x = np.ascontiguousarray(x, dtype=np.float32)
        km = faiss.Kmeans(x.shape[1], k, niter=25, seed=1)
        km.train(x)
        ref = mse(x, km.centroids)
        faiss_work = (min(len(x), 256 * k) * 25 + len(x)) / len(x)
        print(f"{name} {x.shape} K={k}: FAISS default MSE {ref:.6g}, work {faiss_work:.2f} N", flush=True)
        g = np.random.default_rng(0)
        for spc in (32, 64, 128, 256):
            m = min(len(x), spc * k)
            idx = np.sort(g.choice(len(x), m, replace=False)) if m < len(x) else np.arange(len(x))
            sample = np.ascontiguousarray(x[idx])
            for init in ("k-means++", "random"):
                c0 = init_centroids(sample, k, init, 0)
                for iters in (5, 10, 15, 25):
                    q = mse(x, lloyd(sample, c0, iters, 0.0).centroids)
                    work = (m * iters + len(x)) / len(x)
                    print(f"  rows/centre={spc} {init} iterations={iters} work={work:.2f} N "
                          f"MSE vs FAISS default {100 * (q - ref) / ref:+.2f}%", flush=True)


if __name__ == "__main__":
    main()
