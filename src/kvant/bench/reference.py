"""Plain NumPy references for every Numba kernel. Slow, obvious, and the ground truth in tests.

Nothing here is optimised; do not import from here in library code.
"""

from __future__ import annotations


# === distance / assign / topk (issue 2) ===

# === pq (issue 3) ===
# Immutable scalar references for kvant.kernels.pq and the kernel harness. Plain loops / float64; do not
# optimise these: they are what the kernels are judged against.


def pq_distance_tables_l2_ref(queries, codebooks):
    """(nq, m, ksub) float64: Σ_d (q[j*dsub+d] − c[j, c, d])², one (query, sub-quantizer) pair at a time."""
    import numpy as np

    q = np.asarray(queries, dtype=np.float64)
    cb = np.asarray(codebooks, dtype=np.float64)
    m, ksub, dsub = cb.shape
    out = np.zeros((q.shape[0], m, ksub))
    for i in range(q.shape[0]):
        for j in range(m):
            sub = q[i, j * dsub:(j + 1) * dsub]
            out[i, j] = np.sum((sub[None, :] - cb[j]) ** 2, axis=1)
    return out


def pq_ip_tables_ref(queries, codebooks):
    """(nq, m, ksub) float64 per-sub-vector inner products."""
    import numpy as np

    q = np.asarray(queries, dtype=np.float64)
    cb = np.asarray(codebooks, dtype=np.float64)
    m, ksub, dsub = cb.shape
    out = np.zeros((q.shape[0], m, ksub))
    for i in range(q.shape[0]):
        for j in range(m):
            out[i, j] = cb[j] @ q[i, j * dsub:(j + 1) * dsub]
    return out


def pq_adc_distances_ref(tables, codes):
    """(nq, n) float64 ADC sums Σ_j tables[q, j, codes[r, j]]."""
    import numpy as np

    t = np.asarray(tables, dtype=np.float64)
    codes = np.asarray(codes).astype(np.int64)
    nq, m, _ = t.shape
    out = np.zeros((nq, codes.shape[0]))
    for i in range(nq):
        for j in range(m):
            out[i] += t[i, j, codes[:, j]]
    return out


def pq_adc_search_ref(tables, codes, k):
    """Top-k smallest ADC sums per query: (dist (nq, k) float64, idx (nq, k) int64), ties to the smaller idx,
    padded with inf / -1."""
    import numpy as np

    d = pq_adc_distances_ref(tables, codes)
    nq, n = d.shape
    out_d = np.full((nq, k), np.inf)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    for i in range(nq):
        order = np.lexsort((np.arange(n), d[i]))[:k]
        out_d[i, :len(order)] = d[i, order]
        out_i[i, :len(order)] = order
    return out_d, out_i


def pq_encode_ref(x, codebooks):
    """(n, m) nearest codeword per sub-vector by exact float64 squared distance, ties to the smaller id."""
    import numpy as np

    t = pq_distance_tables_l2_ref(x, codebooks)
    return np.argmin(t, axis=2).astype(np.uint8) if t.size else np.zeros((len(x), codebooks.shape[0]), np.uint8)


def pq_topk_agrees(ref_d, ref_i, got_d, got_i, tol=1e-4):
    """Tie-tolerant top-k comparison. Returns None when they agree, else a message naming the first mismatch.

    Distances must match within ``tol * max(1, |ref|)`` position by position; a differing id is accepted only if
    its distance is within tolerance of the reference k-th distance (a tie at the boundary), and no id repeats.
    """
    import numpy as np

    ref_d = np.atleast_2d(np.asarray(ref_d, dtype=np.float64))
    got_d = np.atleast_2d(np.asarray(got_d, dtype=np.float64))
    ref_i = np.atleast_2d(ref_i)
    got_i = np.atleast_2d(got_i)
    if ref_d.shape != got_d.shape or ref_i.shape != got_i.shape:
        return f"shape mismatch: reference {ref_d.shape}, got {got_d.shape}"
    for q in range(ref_d.shape[0]):
        valid = ref_i[q] >= 0
        if not np.array_equal(valid, got_i[q] >= 0):
            return f"query {q}: padding differs (reference ids {ref_i[q].tolist()}, got {got_i[q].tolist()})"
        rd, gd = ref_d[q, valid], got_d[q, valid]
        err = np.abs(rd - gd) / np.maximum(1.0, np.abs(rd))
        if err.size and err.max() > tol:
            p = int(np.argmax(err))
            return f"query {q} rank {p}: distance {gd[p]!r} vs reference {rd[p]!r} (rel err {err.max():.3g})"
        gi = got_i[q, valid]
        if len(set(gi.tolist())) != gi.size:
            return f"query {q}: repeated ids {gi.tolist()}"
        kth = rd[-1] if rd.size else 0.0
        for p in np.flatnonzero(gi != ref_i[q, valid]):
            if abs(gd[p] - kth) / max(1.0, abs(kth)) > tol:
                return (f"query {q} rank {int(p)}: id {int(gi[p])} (distance {gd[p]!r}) instead of "
                        f"{int(ref_i[q, valid][p])}, not a tie with the k-th distance {kth!r}")
    return None

# === tree (issue 4) ===
