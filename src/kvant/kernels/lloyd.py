"""Kernels for Lloyd iterations: centroid sums, incremental updates, Hamerly bounds, k-means++ steps.

All serial or with a fixed, thread-count-determined split so that the same seed and thread count give
bit-identical results. Sums are accumulated in float64.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

_JIT = dict(cache=True, nogil=True, fastmath=False)


@numba.njit(parallel=True, **_JIT)
def cluster_sums(x, labels, k, n_parts):
    """Per-cluster float64 sums of rows and counts, from ``n_parts`` fixed row ranges reduced in order."""
    n, d = x.shape
    part_sums = np.zeros((n_parts, k, d), np.float64)
    part_counts = np.zeros((n_parts, k), np.int64)
    for p in prange(n_parts):
        lo = p * n // n_parts
        hi = (p + 1) * n // n_parts
        for i in range(lo, hi):
            c = labels[i]
            part_counts[p, c] += 1
            for t in range(d):
                part_sums[p, c, t] += x[i, t]
    sums = np.zeros((k, d), np.float64)
    counts = np.zeros(k, np.int64)
    for p in range(n_parts):
        sums += part_sums[p]
        counts += part_counts[p]
    return sums, counts


@numba.njit(**_JIT)
def move_rows(x, rows, old, new, sums, counts):
    """Move each listed row's contribution from cluster ``old[r]`` to ``new[r]`` (in listed order)."""
    d = x.shape[1]
    for r in range(rows.shape[0]):
        i = rows[r]
        a = old[r]
        b = new[r]
        counts[a] -= 1
        counts[b] += 1
        for t in range(d):
            v = np.float64(x[i, t])
            sums[a, t] -= v
            sums[b, t] += v


@numba.njit(**_JIT)
def loosen_bounds(labels, upper, lower, delta, max_delta, argmax_delta, second_delta, lo, hi):
    """Hamerly: after centroids move by ``delta``, widen bounds of rows [lo, hi). Returns rows to check."""
    out = np.empty(hi - lo, np.int64)
    m = 0
    for i in range(lo, hi):
        a = labels[i]
        upper[i] += delta[a]
        lower[i] -= second_delta if a == argmax_delta else max_delta
        if upper[i] >= lower[i]:
            out[m] = i
            m += 1
    return out[:m]


@numba.njit(**_JIT)
def exact_dist_to(x, rows, centroids, labels):
    """sqrt ‖x_i − c_{labels_i}‖² for each listed row, term by term (float64 accumulation)."""
    d = x.shape[1]
    out = np.empty(rows.shape[0], np.float32)
    for r in range(rows.shape[0]):
        i = rows[r]
        c = labels[i]
        acc = 0.0
        for t in range(d):
            diff = np.float64(x[i, t]) - np.float64(centroids[c, t])
            acc += diff * diff
        out[r] = np.sqrt(acc)
    return out


@numba.njit(**_JIT)
def exact_sq_dist_rows(x, centroids, labels):
    """Σ_t (x_i − c_{labels_i})² per row, float64, for the final exact inertia."""
    n, d = x.shape
    out = np.empty(n, np.float64)
    for i in range(n):
        c = labels[i]
        acc = 0.0
        for t in range(d):
            diff = np.float64(x[i, t]) - np.float64(centroids[c, t])
            acc += diff * diff
        out[i] = acc
    return out


@numba.njit(parallel=True, **_JIT)
def kmeanspp(x, k, uniforms, first):
    """k-means++ seeding (Arthur & Vassilvitskii): returns k row indices of ``x``.

    ``first`` is the first centre's row; ``uniforms`` (k,) in [0, 1) drive the D² sampling, so the
    result is a pure function of its inputs. Distances accumulate in float64.
    """
    n, d = x.shape
    chosen = np.empty(k, np.int64)
    chosen[0] = first
    d2 = np.empty(n, np.float64)
    for i in prange(n):
        acc = 0.0
        for t in range(d):
            diff = np.float64(x[i, t]) - np.float64(x[first, t])
            acc += diff * diff
        d2[i] = acc
    for c in range(1, k):
        total = 0.0
        for i in range(n):
            total += d2[i]
        if total <= 0.0:  # fewer distinct points than k: take the next unused rows deterministically
            chosen[c] = chosen[c - 1] + 1 if chosen[c - 1] + 1 < n else 0
        else:
            target = uniforms[c] * total
            run = 0.0
            pick = n - 1
            for i in range(n):
                run += d2[i]
                if run > target and d2[i] > 0.0:
                    pick = i
                    break
            chosen[c] = pick
        p = chosen[c]
        for i in prange(n):
            acc = 0.0
            for t in range(d):
                diff = np.float64(x[i, t]) - np.float64(x[p, t])
                acc += diff * diff
            if acc < d2[i]:
                d2[i] = acc
    return chosen
