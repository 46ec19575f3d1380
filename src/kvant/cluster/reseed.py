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


def distinct_far_rows(dist: np.ndarray, start: int, labels: np.ndarray, rows: np.ndarray, count: int) -> tuple:
    """The ``count`` distinct rows of a block farthest from their centres, with how many copies of each the block holds:
    (distance, global row, label, row as float64, copies). Copies of a row share its label and distance, so the first
    of them stands for all; rows with ``dist <= 0`` (on their centre, or excluded by the caller) are left out. For
    data with many repeated rows, whose farthest rows may all be one row's copies (a review: 54 kept, 1 distinct)."""
    # (copies share their distance, so the rows on their centre go first: with fewer distinct rows than centres
    # every row may be, and sorting all of them as keys cost 1.7 s on 1M rows for no candidate)
    pos = np.flatnonzero(dist > 0.0)
    flat = np.ascontiguousarray(rows[pos])
    keys = flat.view(np.dtype((np.void, flat.dtype.itemsize * flat.shape[1]))).ravel()
    _, first, copies = np.unique(keys, return_index=True, return_counts=True)
    top = np.lexsort((first, -dist[pos[first]]))[:count]
    sel = first[top]
    return dist[pos[sel]], start + pos[sel], labels[pos[sel]], np.asarray(flat[sel], np.float64), copies[top]


def merge_distinct_far_rows(fars, count: int) -> tuple:
    """The ``count`` farthest distinct rows of several :func:`distinct_far_rows` results (copies summed)."""
    d, row, lab, x, cp = (np.concatenate([f[i] for f in fars]) for i in range(5))
    keys = np.ascontiguousarray(x).view(np.dtype((np.void, 8 * x.shape[1]))).ravel()
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    cp = np.bincount(inv.ravel(), weights=cp, minlength=first.size).astype(np.int64)
    top = np.lexsort((row[first], -d[first]))[:count]
    sel = first[top]
    return d[sel], row[sel], lab[sel], x[sel], cp[top]


def reseed_picks(counts: np.ndarray, far: tuple, centroids: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """(empty cluster, the cluster its row leaves, row) for the empty clusters (``counts == 0``) in index order: each
    takes the next farthest row whose cluster keeps at least one row. Rows on their centre and copies of a row already
    taken are skipped: they would seed identical centres, and the next assignment would empty all but one again.
    ``far`` as :func:`block_far_rows` gives it, or with a fifth field, the copies of each row (its cluster loses them
    all to the new centre: it must keep one row more than that).

    "On its centre" is decided on the row's values, not by its distance alone: for cos the distance is measured on
    x/‖x‖ in float64, and a row whose unit copy equals its centre measured ~1e-16 there (a review), which a test of
    ``dist > 0`` let through."""
    empty = np.flatnonzero(counts == 0)
    left = np.array(counts, np.int64)
    copies = far[4] if len(far) > 4 else np.ones(far[0].shape[0], np.int64)
    picks: list[tuple[int, int, np.ndarray]] = []
    taken: set[bytes] = set()
    for dist, src, row, cp in zip(far[0], far[2], far[3], copies, strict=True):
        if len(picks) == empty.size or not dist > 0.0:  # farthest first: the rest are on their centre too
            break
        key = (row + 0.0).tobytes()  # (+ 0.0: -0.0 is 0.0)
        if left[src] <= cp or key in taken or np.array_equal(row, centroids[src]):
            continue
        left[src] -= cp
        taken.add(key)
        picks.append((int(empty[len(picks)]), int(src), row))
    return picks
