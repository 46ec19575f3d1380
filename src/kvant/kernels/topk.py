"""Top-k selection: keep the k smallest (distance, id) pairs per row, ascending, ties to the smaller id."""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

_JIT = dict(cache=True, nogil=True, fastmath=False)


@numba.njit(inline="always")
def _insert(dist_row, idx_row, d, i):
    """Insert (d, i) into the sorted row if it beats the current worst; rows stay sorted by (d, i)."""
    k = dist_row.shape[0]
    if d > dist_row[k - 1] or (d == dist_row[k - 1] and (idx_row[k - 1] != -1 and i >= idx_row[k - 1])):
        return
    pos = k - 1
    while pos > 0 and (
        dist_row[pos - 1] > d or (dist_row[pos - 1] == d and (idx_row[pos - 1] > i or idx_row[pos - 1] == -1))
    ):
        dist_row[pos] = dist_row[pos - 1]
        idx_row[pos] = idx_row[pos - 1]
        pos -= 1
    dist_row[pos] = d
    idx_row[pos] = i


@numba.njit(inline="always")
def _merge_row(drow, irow, block_row, ids_row, base):
    """Merge one row of candidates; column j's id is ``ids_row[j]`` or, when ids_row is empty, base + j."""
    worst = drow[drow.shape[0] - 1]
    explicit = ids_row.shape[0] > 0
    for j in range(block_row.shape[0]):
        d = block_row[j]
        if d <= worst:
            cid = ids_row[j] if explicit else base + j
            if cid >= 0:
                _insert(drow, irow, d, cid)
                worst = drow[drow.shape[0] - 1]


@numba.njit(parallel=True, **_JIT)
def merge_topk(block_dist, base, out_dist, out_idx):
    """Merge a (nq, nb) block whose columns are ids base..base+nb-1 into the running top-k (in place).

    ``out_dist``/``out_idx`` start as inf / -1. NaN distances are never selected.
    """
    if out_dist.shape[1] == 0:  # k = 0: nothing to keep (the row merge indexes the k-th slot)
        return
    no_ids = np.empty(0, np.int64)
    for r in prange(block_dist.shape[0]):
        _merge_row(out_dist[r], out_idx[r], block_dist[r], no_ids, base)


@numba.njit(parallel=True, **_JIT)
def merge_topk_ids(block_dist, block_ids, out_dist, out_idx):
    """Like :func:`merge_topk` but the block's column ids are given explicitly (``block_ids`` (nq, nb));
    negative ids are skipped."""
    if out_dist.shape[1] == 0:
        return
    for r in prange(block_dist.shape[0]):
        _merge_row(out_dist[r], out_idx[r], block_dist[r], block_ids[r], 0)


def topk_smallest(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest entries of each row of ``dist`` (nq, n): (values (nq, k) float32, ids (nq, k) int64).

    The selection is made on ``dist`` as float32 (ties to the smaller id): float64 entries closer than float32
    resolves, or beyond its range (inf), rank as ties — select on float64 yourself when that matters."""
    nq = dist.shape[0]
    out_d = np.full((nq, k), np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    merge_topk(np.ascontiguousarray(dist, dtype=np.float32), 0, out_d, out_i)
    return out_d, out_i


@numba.njit(inline="always")
def ranks_before(d1, i1, d2, i2):
    """(d1, i1) ranks before (d2, i2) in a top-k list: a smaller score, or an equal one with a smaller id; id −1 (an
    empty slot, score +inf) after every id. The one order of the kernels' lists (merge_topk's)."""
    if d1 != d2:
        return d1 < d2
    if i1 < 0 or i2 < 0:
        return i2 < 0 and i1 >= 0
    return i1 < i2


@numba.njit(parallel=True, **_JIT)
def merge_sorted_topk(parts_d, parts_i, out_d, out_i):
    """Merge per-part lists that are each sorted already (``parts_d``/``parts_i`` (parts, nq, keep): ascending, ties
    to the smaller id, empty slots inf / −1 last; no NaN) into ``out_d``/``out_i`` (nq, keep), which hold the same
    kind of list (inf / −1 at first): two sorted runs merged in one pass each, O(parts · keep) per query, where
    :func:`merge_topk_ids` inserts each entry into a sorted array, O(keep) apiece (two chunks' lists of 10,008 rows
    took ~50 ms per query that way)."""
    parts, nq, keep = parts_d.shape
    for j in prange(nq):
        td = np.empty(keep, out_d.dtype)
        ti = np.empty(keep, np.int64)
        for p in range(parts):
            a = b = 0
            for t in range(keep):
                if ranks_before(parts_d[p, j, b], parts_i[p, j, b], out_d[j, a], out_i[j, a]):
                    td[t], ti[t] = parts_d[p, j, b], parts_i[p, j, b]
                    b += 1
                else:
                    td[t], ti[t] = out_d[j, a], out_i[j, a]
                    a += 1
            out_d[j, :] = td
            out_i[j, :] = ti


@numba.njit(inline="always")
def _insertion_sort(a, n):
    """Sort a[:n] in place by insertion (a few keys)."""
    for x in range(1, n):
        v = a[x]
        y = x - 1
        while y >= 0 and a[y] > v:
            a[y + 1] = a[y]
            y -= 1
        a[y + 1] = v


@numba.njit(**_JIT)
def radix_sort_u64(a):
    """Sort ``a`` (uint64) in place: a least-significant-digit radix sort, one byte a pass, skipping the bytes every
    key shares (packed (score bits, row) keys share most of the row's high bytes). Numba's np.sort, a quicksort,
    took ~40 ns a key on 8,000 random keys, and sorting 5,000 of them was a tenth of a k = 5,000 exact search."""
    n = a.shape[0]
    if n < 64:
        _insertion_sort(a, n)
        return
    counts = np.zeros((8, 256), np.int64)
    for x in range(n):
        v = a[x]
        for d in range(8):
            counts[d, (v >> np.uint64(8 * d)) & np.uint64(255)] += 1
    tmp = np.empty(n, np.uint64)
    swapped = False
    for d in range(8):
        c = counts[d]
        if c[(a[0] >> np.uint64(8 * d)) & np.uint64(255)] == n:  # every key has this byte: the pass moves nothing
            continue
        start = 0
        for b in range(256):
            k = c[b]
            c[b] = start
            start += k
        src = tmp if swapped else a
        dst = a if swapped else tmp
        shift = np.uint64(8 * d)
        for x in range(n):
            v = src[x]
            b = (v >> shift) & np.uint64(255)
            dst[c[b]] = v
            c[b] += 1
        swapped = not swapped
    if swapped:
        a[:] = tmp


_SELECT_BITS = 11  # digit width of select_u64: 2,048 counters, cleared per pass


@numba.njit(**_JIT)
def select_u64(a, r):
    """The r-th smallest (0-based) of ``a`` (uint64; left unchanged): a most-significant-digit radix selection,
    11 bits a pass, each pass over the keys that share the selected digits so far. Numba's np.partition, a quickselect,
    took ~41 µs per 4,000 structured keys (sums of evenly spread blocks of clustered codes) where NumPy's takes ~7."""
    n = a.shape[0]
    buf = a.copy()
    m = n
    shift = 64
    hist = np.zeros(1 << _SELECT_BITS, np.int64)
    while m > 16 and shift > 0:
        w = min(_SELECT_BITS, shift)
        shift -= w
        mask = np.uint64((1 << w) - 1)
        sh = np.uint64(shift)
        hist[:] = 0
        for x in range(m):
            hist[(buf[x] >> sh) & mask] += 1
        b = 0
        while hist[b] <= r:
            r -= hist[b]
            b += 1
        if hist[b] == m:  # every key shares this digit: nothing to narrow
            continue
        keep = np.uint64(b)
        j = 0
        for x in range(m):  # (in place: j <= x)
            if (buf[x] >> sh) & mask == keep:
                buf[j] = buf[x]
                j += 1
        m = j
    _insertion_sort(buf, m)  # (the few left share every selected digit)
    return buf[r]
