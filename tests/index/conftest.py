"""TEMPORARY: a NumPy stand-in for kvant.cluster.lloyd.train_centroids until the real one lands."""

import importlib
import sys
import types

import numpy as np


def _train_centroids(x, k, *, n_iter=25, seed=0, init="k-means++"):
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    c = np.empty((k, x.shape[1]), np.float32)
    c[0] = x[rng.integers(n)]
    d = ((x - c[0]) ** 2).sum(1)
    for i in range(1, k):
        p = d / d.sum() if d.sum() > 0 else np.full(n, 1 / n)
        c[i] = x[rng.choice(n, p=p)]
        d = np.minimum(d, ((x - c[i]) ** 2).sum(1))
    for _ in range(n_iter):
        lab = (-2 * x @ c.T + (c * c).sum(1)).argmin(1)
        for j in range(k):
            sel = lab == j
            if sel.any():
                c[j] = x[sel].mean(0)
    return c


try:
    importlib.import_module("kvant.cluster.lloyd")
except ImportError:
    mod = types.ModuleType("kvant.cluster.lloyd")
    mod.train_centroids = _train_centroids
    sys.modules["kvant.cluster.lloyd"] = mod
