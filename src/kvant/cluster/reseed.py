"""Re-seeding empty clusters from the farthest rows, for the passes that stream the rows (mini-batch's final
assignment, Dask's polish passes): each pass keeps its few farthest rows, and the empty clusters take them.

(Lloyd's in-memory loop does the same with the jitted :func:`kvant.kernels.lloyd.reseed_empty`.)
"""

from __future__ import annotations

import numpy as np


def block_far_rows(per_row: np.ndarray, start: int, labels: np.ndarray, rows: np.ndarray, count: int) -> tuple:
    """The ``count`` rows of a block farthest from their centres: (distance, global row, label, row as float64),
    farthest first, ties to the lower row. ``per_row`` holds the block's distances to its rows' centres, ``rows`` the
    rows as the centres are made of them (cos: unit rows)."""
    top = np.lexsort((np.arange(per_row.size), -per_row))[:count]
    return per_row[top], start + top, labels[top], np.asarray(rows[top], np.float64)


def merge_far_rows(fars, count: int) -> tuple:
    """The ``count`` farthest of several :func:`block_far_rows` results, in the same form."""
    d = np.concatenate([f[0] for f in fars])
    row = np.concatenate([f[1] for f in fars])
    top = np.lexsort((row, -d))[:count]
    return d[top], row[top], np.concatenate([f[2] for f in fars])[top], np.concatenate([f[3] for f in fars])[top]


def reseed_picks(counts: np.ndarray, far: tuple, centroids: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """(empty cluster, the cluster its row leaves, row) for the empty clusters (``counts == 0``) in index order: each
    takes the next farthest row whose cluster keeps at least one row. Rows on their centre and copies of a row already
    taken are skipped: they would seed identical centres, and the next assignment would empty all but one again.

    "On its centre" is decided on the row's values, not by its distance alone: for cos the distance is measured on
    x/‖x‖ in float64, and a row whose unit copy equals its centre measured ~1e-16 there (a review), which a test of
    ``dist > 0`` let through."""
    empty = np.flatnonzero(counts == 0)
    left = np.array(counts, np.int64)
    picks: list[tuple[int, int, np.ndarray]] = []
    for dist, _, src, row in zip(*far, strict=True):
        if len(picks) == empty.size or not dist > 0.0:  # farthest first: the rest are on their centre too
            break
        if left[src] <= 1 or np.array_equal(row, centroids[src]) or any(np.array_equal(row, p[2]) for p in picks):
            continue
        left[src] -= 1
        picks.append((int(empty[len(picks)]), int(src), row))
    return picks
