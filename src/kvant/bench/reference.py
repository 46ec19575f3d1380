"""Plain NumPy references for every Numba kernel. Slow, obvious, and the ground truth in tests.

Nothing here is optimised; do not import from here in library code.
"""

from __future__ import annotations

# === distance / assign / topk (issue 2) ===


def sq_l2_ref(q, x):
    """(nq, nb) float64 squared L2, pair by pair: Σ (q − x)²."""
    import numpy as np

    q = np.asarray(q, np.float64)
    x = np.asarray(x, np.float64)
    out = np.empty((q.shape[0], x.shape[0]))
    for i in range(q.shape[0]):
        out[i] = ((x - q[i]) ** 2).sum(axis=1)
    return out


def exact_l2_topk_ref(q, x, k):
    """k nearest rows by float64 Σ(q−x)², ties to the smaller row, padded inf / -1 (plain NumPy)."""
    import numpy as np

    return _smallest_ref(((q.astype(np.float64)[:, None, :] - x.astype(np.float64)[None]) ** 2).sum(-1), k)


def exact_ip_topk_ref(q, x, k):
    """k rows of largest inner product, as ascending float64 −q·x, ties to the smaller row, padded inf / -1 (plain
    NumPy; exact for data whose products and sums are exact in float64, e.g. small integers)."""
    import numpy as np

    return _smallest_ref(-(q.astype(np.float64) @ x.astype(np.float64).T), k)


def _smallest_ref(d, k):
    """The k smallest entries of each row of the float64 scores ``d`` (nq, n) with their columns, ties to the smaller
    column, padded inf / -1."""
    import numpy as np

    out_d = np.full((d.shape[0], k), np.inf)
    out_i = np.full((d.shape[0], k), -1, np.int64)
    for r in range(d.shape[0]):
        order = np.lexsort((np.arange(d.shape[1]), d[r]))[:k]
        out_d[r, : order.size], out_i[r, : order.size] = d[r, order], order
    return out_d, out_i


def top2_ref(x, centroids):
    """(labels, d1, d2): nearest centroid (ties to the lower id) and the two smallest squared distances."""
    import numpy as np

    d = sq_l2_ref(x, centroids)
    labels = np.argmin(d, axis=1)  # argmin returns the first minimum: the lower id on ties
    d1 = d[np.arange(d.shape[0]), labels]
    d2 = np.full(d.shape[0], np.inf)
    if d.shape[1] > 1:
        masked = d.copy()
        masked[np.arange(d.shape[0]), labels] = np.inf
        d2 = masked.min(axis=1)
    return labels.astype(np.int64), d1, d2


def mean_and_spread_ref(x, step):
    """(mean, mean squared deviation from it, mean squared norm, per-row squared deviations, per-row squared norms) of
    rows 0, step, 2·step, ... in float64."""
    import numpy as np

    sub = np.asarray(x, np.float64)[::step]
    if sub.shape[0] == 0:
        return np.zeros(x.shape[1]), 0.0, 0.0, np.zeros(0), np.zeros(0)
    mu = sub.mean(axis=0)
    dev, sqs = ((sub - mu) ** 2).sum(axis=1), (sub**2).sum(axis=1)
    return mu, float(dev.mean()), float(sqs.mean()), dev, sqs


def topk_ref(dist, k):
    """k smallest per row by (distance, column), padded with inf / -1: the order kvant promises."""
    import numpy as np

    dist = np.asarray(dist)
    nq, n = dist.shape
    out_d = np.full((nq, k), np.inf, np.float64)
    out_i = np.full((nq, k), -1, np.int64)
    for r in range(nq):
        order = sorted((float(dist[r, j]), j) for j in range(n) if not np.isnan(dist[r, j]))[:k]
        for t, (dv, j) in enumerate(order):
            out_d[r, t] = dv
            out_i[r, t] = j
    return out_d, out_i


def cluster_sums_ref(x, labels, k, w=None):
    """Per-cluster float64 weighted row sums and total weights (row counts without ``w``)."""
    import numpy as np

    x = np.asarray(x, np.float64)
    w = np.ones(x.shape[0]) if w is None or len(w) == 0 else np.asarray(w, np.float64)
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, labels, x * w[:, None])
    return sums, np.bincount(labels, weights=w, minlength=k).astype(np.float64)


def m_step_ref(sums, counts, old, spherical, x_total):
    """Lloyd's M-step in NumPy, the reference for ``kernels.lloyd.m_step``: (means, objective)."""
    import numpy as np

    nz = counts > 0
    means = np.array(old, np.float32)
    means[nz] = (sums[nz] / counts[nz, None]).astype(np.float32)
    sq = np.einsum("ij,ij->i", sums[nz], sums[nz])
    if spherical:
        cancelled = nz & ~means.any(axis=1)  # unit rows summing to zero: the old centre stays
        means[cancelled] = np.asarray(old, np.float32)[cancelled]
        norms = np.linalg.norm(means.astype(np.float64), axis=1)
        norms[norms == 0] = 1.0
        means = (means / norms[:, None]).astype(np.float32)
        return means, float(counts.sum() - np.sqrt(sq).sum())
    return means, float(x_total - (sq / counts[nz]).sum())


def centre_moves_ref(new, old):
    """(delta, largest, an index of the largest, second largest) of the centres' moves, the reference for
    ``kernels.lloyd.centre_moves``."""
    import numpy as np

    delta = np.sqrt(((np.asarray(new, np.float64) - old) ** 2).sum(axis=1)).astype(np.float32)
    order = np.argsort(delta)[::-1]
    second = delta[order[1]] if delta.size > 1 else delta[0]
    return delta, float(delta[order[0]]), int(order[0]), float(second)


def sq_dist_to_point_unit_ref(x, c):
    """‖x_i/‖x_i‖ − c‖² per row in float64 (NaN for a zero row), the reference for ``sq_dist_to_point_unit``."""
    import numpy as np

    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((x / norms[:, None] - np.asarray(c, np.float64)) ** 2).sum(axis=1)
    out[norms == 0] = np.nan
    return out


def kmeanspp_ref(x, k, uniforms, first, w=None):
    """k-means++ D² seeding in float64, the reference for ``kernels.lloyd.kmeanspp``: the next centre is
    the first row (with positive w·D²) whose running w·D² sum exceeds ``uniforms[c]`` × the total (greedy seeding
    with one draw per centre)."""
    import numpy as np

    return kmeanspp_greedy_ref(x, k, np.asarray(uniforms, np.float64)[:, None], first, w)


def kmeanspp_greedy_ref(x, k, uniforms, first, w=None):
    """Greedy k-means++ in float64, the reference for ``kernels.lloyd.kmeanspp_greedy``: each step draws
    ``uniforms.shape[1]`` candidates as :func:`kmeanspp_ref` draws one and keeps the one leaving the smallest
    Σ w·min(D², distance) (ties to the earlier draw)."""
    import numpy as np

    x = np.asarray(x, np.float64)
    w = np.ones(x.shape[0]) if w is None or len(w) == 0 else np.asarray(w, np.float64)
    chosen = [int(first)]
    d2 = ((x - x[first]) ** 2).sum(1)
    for c in range(1, k):
        mass = w * d2
        total = mass.sum()
        if total <= 0:
            chosen.append(chosen[-1] + 1 if chosen[-1] + 1 < len(x) else 0)
            continue
        run = np.cumsum(np.where(mass > 0, mass, 0.0))
        best, best_pot, best_d = -1, np.inf, None
        for u in uniforms[c]:
            hit = np.flatnonzero((run > u * total) & (mass > 0))
            row = int(hit[0]) if hit.size else int(np.flatnonzero(mass > 0)[-1])
            dist = np.minimum(d2, ((x - x[row]) ** 2).sum(1))
            pot = (w * dist).sum()
            if pot < best_pot:
                best, best_pot, best_d = row, pot, dist
        chosen.append(best)
        d2 = best_d
    return np.array(chosen, np.int64)


def lloyd_ref(x, centroids, n_iter):
    """Plain Lloyd's iterations (no bounds): assign, then move each non-empty centre to its mean."""
    import numpy as np

    c = np.asarray(centroids, np.float64).copy()
    x64 = np.asarray(x, np.float64)
    for _ in range(n_iter):
        labels, _, _ = top2_ref(x64, c)
        sums, counts = cluster_sums_ref(x64, labels, c.shape[0])
        nz = counts > 0
        c[nz] = sums[nz] / counts[nz, None]
    labels, _, _ = top2_ref(x64, c)
    return c, labels


def reseed_empty_ref(x, labels, dist, rows_in, means=None):
    """Empty-cluster re-seeding, the reference for ``kernels.lloyd.reseed_empty``: returns the new labels and the
    number of clusters re-seeded. Empty clusters in id order take the rows farthest from their centres (``dist``
    decreasing, ties to the lower row), skipping rows on their centre, rows whose cluster would empty, copies of a
    row already taken and (with ``means``) rows equal to their cluster's mean rounded to float32; then, if clusters
    are still empty and ``means`` (the clusters' means when the call starts) is given, the rows not yet moved by
    their exact float64 squared distance to their cluster's mean."""
    import numpy as np

    labels = np.array(labels, np.int64)
    rows_in = np.array(rows_in, np.int64)
    empty = [j for j in range(len(rows_in)) if rows_in[j] == 0]
    taken = []

    def take(rank):
        for row in sorted(range(len(rank)), key=lambda i: (-float(rank[i]), i)):
            if len(taken) == len(empty) or not rank[row] > 0:
                break
            src = labels[row]
            if rows_in[src] <= 1 or any(np.array_equal(x[row], x[t]) for t in taken):
                continue
            if means is not None and np.array_equal(x[row], means[src].astype(np.float32)):
                continue  # the row is its cluster's centre: a copy of it would be emptied again
            dst = empty[len(taken)]
            rows_in[src] -= 1
            rows_in[dst] += 1
            labels[row] = dst
            taken.append(row)

    take(dist)
    if means is not None and len(taken) < len(empty):
        x64 = np.asarray(x, np.float64)
        exact = np.array([sum((x64[i, t] - means[labels[i], t]) ** 2 for t in range(x.shape[1]))
                          for i in range(x.shape[0])])
        take(exact)
    return labels, len(taken)


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


def pq_topk_agrees(ref_d, ref_i, got_d, got_i, tol=1e-4, all_d=None):
    """Tie-tolerant top-k comparison. Returns None when they agree, else a message naming the first mismatch.

    Distances must match within ``tol * max(1, |ref|)`` position by position and no id repeats. A differing id
    is accepted only as a tie: an id the reference also returns must carry (within tolerance) the reference's
    distance for it (two near-equal distances may swap: the float32 kernels round 1000 + 1e-5 to 1000, ties go
    to the smaller id); an id the reference does not return, and a reference id left out, must both be within
    tolerance of the reference k-th distance (a tie at the boundary).
    With ``all_d`` (nq, n): the reference distance of every row, each returned id's *true* distance must equal
    the distance reported for it (else a kernel could return any id beside a correct-looking distance).
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
        if not np.all(got_d[q, ~valid] == np.inf):  # padding is +inf, never NaN or a number
            return f"query {q}: padded positions hold {got_d[q, ~valid].tolist()}, expected inf"
        rd, gd = ref_d[q, valid], got_d[q, valid]
        err = np.abs(rd - gd) / np.maximum(1.0, np.abs(rd))
        if err.size and not err.max() <= tol:  # (written so that a NaN distance fails too)
            p = int(np.argmax(np.where(np.isnan(err), np.inf, err)))
            return f"query {q} rank {p}: distance {gd[p]!r} vs reference {rd[p]!r} (rel err {err.max():.3g})"
        gi = got_i[q, valid]
        if len(set(gi.tolist())) != gi.size:
            return f"query {q}: repeated ids {gi.tolist()}"
        if all_d is not None and gi.size:
            if gi.min() < 0 or gi.max() >= all_d.shape[1]:
                return f"query {q}: ids out of range {gi.tolist()}"
            true = np.asarray(all_d[q], dtype=np.float64)[gi]
            bad = ~(np.abs(true - gd) / np.maximum(1.0, np.abs(true)) <= tol)
            if bad.any():
                p = int(np.argmax(bad))
                return (f"query {q} rank {p}: id {int(gi[p])} is reported at distance {gd[p]!r} but its reference "
                        f"distance is {true[p]!r}")
        kth = rd[-1] if rd.size else 0.0
        ri = ref_i[q, valid]
        ref_pos = {int(i): j for j, i in enumerate(ri.tolist())}
        for p in np.flatnonzero(gi != ri):
            g = int(gi[p])
            j = ref_pos.get(g)
            if j is not None:  # reordered: only between ties (a float32 kernel may round 1000 + 1e-5 to 1000)
                if not abs(rd[j] - gd[p]) / max(1.0, abs(rd[j])) <= tol:
                    return (f"query {q} rank {int(p)}: id {g} is reported at distance {gd[p]!r}, but the reference "
                            f"has it at rank {j} with distance {rd[j]!r}")
            elif not abs(gd[p] - kth) / max(1.0, abs(kth)) <= tol:
                return (f"query {q} rank {int(p)}: id {g} (distance {gd[p]!r}) instead of "
                        f"{int(ri[p])}, not a tie with the k-th distance {kth!r}")
        returned = set(gi.tolist())
        for r, j in ref_pos.items():  # a reference id left out must be a tie at the boundary too
            if r not in returned and abs(rd[j] - kth) / max(1.0, abs(kth)) > tol:
                return f"query {q}: id {r} (reference rank {j}, distance {rd[j]!r}) is missing"
    return None

# === tree (issue 4) ===


def tree_pairwise(metric: str, A, B):
    """True metric distances between rows of A and B (float64): euclidean, manhattan, chebyshev, angular."""
    import numpy as np

    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    diff = A[:, None, :] - B[None, :, :]
    if metric == "euclidean":
        return np.sqrt((diff**2).sum(-1))
    if metric == "manhattan":
        return np.abs(diff).sum(-1)
    if metric == "chebyshev":
        return np.abs(diff).max(-1)
    if metric == "angular":
        a = A / np.linalg.norm(A, axis=1, keepdims=True)
        b = B / np.linalg.norm(B, axis=1, keepdims=True)
        # 2·atan2(‖a − b‖, ‖a + b‖): well conditioned at every angle (arccos of the dot product is not near 0 or π)
        minus = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
        plus = np.sqrt(((a[:, None] + b[None]) ** 2).sum(-1))
        return 2.0 * np.arctan2(minus, plus)
    raise ValueError(metric)


def residual_correlation_distance(X, v, p, kernel_fn, i, j):
    """sqrt(1 - |rho|), rho = (k(x_i, x_j) - v_i . v_j) / sqrt(p_i p_j); 0 on the diagonal (i == j)."""
    import numpy as np

    i = np.asarray(i)
    j = np.asarray(j)
    k = kernel_fn(X[i], X[j])
    rho = (k - v[i] @ v[j].T) / np.sqrt(np.outer(p[i], p[j]))
    d = np.sqrt(np.clip(1.0 - np.abs(rho), 0.0, None))
    d[i[:, None] == j[None, :]] = 0.0
    return d


def knn_from_distances(D, ids, k: int, allowed=None):
    """k smallest per row of the distance matrix D (columns are ``ids``), ties broken by smaller id,
    padded with -1 / inf; ``allowed`` is an optional boolean mask of the same shape."""
    import numpy as np

    D = np.asarray(D, dtype=np.float64)
    ids = np.asarray(ids, dtype=np.int64)
    nq = D.shape[0]
    out_d = np.full((nq, k), np.inf)
    out_i = np.full((nq, k), -1, np.int64)
    for q in range(nq):
        cols = np.arange(D.shape[1]) if allowed is None else np.flatnonzero(allowed[q])
        order = np.lexsort((ids[cols], D[q, cols]))[:k]
        out_d[q, : order.size] = D[q, cols[order]]
        out_i[q, : order.size] = ids[cols[order]]
    return out_d, out_i


def transpose_tiles_ref(x, multiple=1):
    """:func:`kvant.kernels.row_lanes.transpose_tiles`: rows 16b .. 16b + 15 as tile b's columns, (tiles rounded up to
    ``multiple``, D, 16), zero rows after the last."""
    import numpy as np

    n, d = x.shape
    tiles = -(-n // 16)  # ceil(n / 16) tiles ...
    tiles = -(-tiles // multiple) * multiple  # ... rounded up to a multiple
    padded = np.zeros((tiles * 16, d), np.float32)
    padded[:n] = x
    return np.ascontiguousarray(padded.reshape(tiles, 16, d).transpose(0, 2, 1))


def first_nonfinite_row_ref(x):
    """Index of the first row of ``x`` holding NaN or inf, or -1."""
    import numpy as np

    bad = ~np.isfinite(x).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else -1


def normalise_rows_ref(x):
    """(unit rows, first zero-norm row or -1): each row over its float64 norm rounded to float32."""
    import numpy as np

    norms = np.sqrt((x.astype(np.float64) ** 2).sum(axis=1)).astype(np.float32)
    zero = np.flatnonzero(norms == 0)
    safe = np.where(norms == 0, np.float32(1), norms)
    return x / safe[:, None], (int(zero[0]) if zero.size else -1)


def coreset_inclusion_ref(d2, m):
    """π_i = min(1, s·q_i), q_i = ½·1/n + ½·d2_i/Σd2 (uniform when Σd2 is 0 or not finite), s such that Σπ = m:
    the direct solve over an explicit q (each pass recomputes the capped set with ``q >= 1/s``)."""
    import numpy as np

    n = d2.shape[0]
    with np.errstate(over="ignore"):
        total = float(np.sum(d2, dtype=np.float64))
    q = np.full(n, 1.0 / n) if not (np.isfinite(total) and total > 0) else 0.5 / n + 0.5 * d2 / total
    s = m / q.sum()
    for _ in range(200):
        capped = q >= 1.0 / s
        c = int(capped.sum())
        rest = q.sum() - q[capped].sum()
        if c >= m or rest <= 0:
            break
        s_new = (m - c) / rest
        if s_new <= s * (1 + 1e-15):
            break
        s = s_new
    return np.minimum(1.0, s * q)


def poisson_draw_ref(pi, key):
    """(rows, 1/π of them) of the rows with uniform_at(key, i) < π_i, SplitMix64's finaliser over
    key + (i + 1)·0x9E3779B97F4A7C15 (mod 2⁶⁴), top 53 bits — vectorised in NumPy's uint64 arithmetic."""
    import numpy as np

    with np.errstate(over="ignore"):
        z = np.uint64(key) + (np.arange(pi.shape[0], dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    rows = np.flatnonzero(u < pi)
    return rows, 1.0 / pi[rows]
