"""PQ / OPQ codecs and PQIndex side by side with FAISS, in one process, same data, same thread count.

Measures (medians of repeated runs):
- PQ and OPQ training time and reconstruction MSE (mean over all rows of ||x - x_hat||^2, the same float64 helper
  for both sides) vs faiss.ProductQuantizer and faiss.OPQMatrix + ProductQuantizer. PQ: both sides get all rows and
  draw their own sample (at most 65,536 rows, 256 per codeword). OPQ: both sides train on the same sample of
  ``OPQ.train_rows`` rows, drawn untimed (FAISS: OPQMatrix, then ProductQuantizer on the rotated sample, the pair
  an "OPQ,PQ" index trains);
- encoding throughput (vectors/s) vs ProductQuantizer.compute_codes;
- PQIndex 8-bit vs faiss.IndexPQ and 4-bit vs faiss.IndexPQFastScan: queries/s and recall@10 against exact
  ground truth from faiss.IndexFlatL2 (not from the library under test). Both sides use the SAME codebooks (kvant's,
  loaded into FAISS), so the search comparison isolates the scan; the 8-bit top-10 are checked for identity;
- the same indexes on small batches (1-100 queries per call: a service answering requests), ms per call.

Datasets: Fashion-MNIST (60k x 784, 10k test queries of which ``--fmnist-queries`` are used) and a synthetic
clustered 1M x 128 set (anisotropic Gaussian clusters, fixed seed).

Usage: flock /tmp/kvant-bench.lock .venv/bin/python benchmarks/pq.py [--quick]
       [--parts encode --resume benchmarks/results/pq.json]   (re-measure some parts, keep the other rows)
Writes benchmarks/results/pq.json, pq.md, pq.png.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import kvant
from kvant._parallel import numba_threading_layer

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    return arr.reshape(dims[0], -1)


def fashion_mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from kvant.bench import datasets

        out = datasets.fashion_mnist()
        if isinstance(out, dict):
            return np.asarray(out["train"], np.float32), np.asarray(out["test"], np.float32)
        if isinstance(out, tuple) and len(out) >= 2 and np.ndim(out[0]) == 2 and np.ndim(out[1]) == 2:
            return np.asarray(out[0], np.float32), np.asarray(out[1], np.float32)
    except (ImportError, AttributeError, TypeError, KeyError):
        pass
    root = Path("/usr/share/datasets/fashion-mnist")
    train = _read_idx(root / "train-images-idx3-ubyte.gz").astype(np.float32)
    test = _read_idx(root / "t10k-images-idx3-ubyte.gz").astype(np.float32)
    return train, test


def synthetic(n: int, nq: int, dim: int = 128, n_clusters: int = 1000, seed: int = 0):
    """Anisotropic Gaussian clusters: centres N(0, 4), per-cluster per-dimension scales log-uniform in [0.2, 2]."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32) * 2.0
    scales = np.exp(rng.uniform(np.log(0.2), np.log(2.0), (n_clusters, dim))).astype(np.float32)

    def draw(count):
        out = np.empty((count, dim), np.float32)
        step = 1 << 17
        for s in range(0, count, step):
            c = rng.integers(0, n_clusters, min(step, count - s))
            out[s : s + c.size] = centers[c] + rng.standard_normal((c.size, dim), dtype=np.float32) * scales[c]
        return out

    return draw(n), draw(nq)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def timed_pair(fn_a, fn_b, repeats: int):
    """((median seconds, last result) of ``fn_a``, the same of ``fn_b``), their runs alternating a, b, a, b, ...:
    on a host whose speed drifts within minutes, both sides then see the same drift."""
    times, outs = ([], []), [None, None]
    for _ in range(repeats):
        for side, fn in enumerate((fn_a, fn_b)):
            t0 = time.perf_counter()
            outs[side] = fn()
            times[side].append(time.perf_counter() - t0)
    return (statistics.median(times[0]), outs[0]), (statistics.median(times[1]), outs[1])


def hits_at(ids: np.ndarray, gt: np.ndarray, k: int = 10) -> np.ndarray:
    """Per query: how many of the first k returned ids are among the first k ground-truth ids."""
    return np.array([len(set(a[:k].tolist()) & set(b[:k].tolist())) for a, b in zip(ids, gt)], np.int64)


def recall_at(ids: np.ndarray, gt: np.ndarray, k: int = 10) -> float:
    return float(hits_at(ids, gt, k).sum() / (gt.shape[0] * k))


def recall_diff_ci(hits_a: np.ndarray, hits_b: np.ndarray, k: int = 10, n_boot: int = 2000, seed: int = 0):
    """Paired bootstrap over queries: 90% CI of recall@k(a) - recall@k(b) (same queries on both sides)."""
    diff = (hits_a - hits_b) / k
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, diff.size, diff.size)].mean() for _ in range(n_boot)])
    return float(np.quantile(means, 0.05)), float(np.quantile(means, 0.95))


MSE_BLOCK_VALUES = 1 << 22  # values per block of rows in ``mse``: 32 MB as float64, whatever N and dim


def mse(x: np.ndarray, roundtrip) -> float:
    """Mean over all rows of ``||x - roundtrip(x)||²`` in float64, ``roundtrip`` (encode then decode) applied to
    blocks of rows so memory stays bounded at any N."""
    step = max(1, MSE_BLOCK_VALUES // x.shape[1])
    total = 0.0
    for s in range(0, x.shape[0], step):
        block = x[s : s + step]
        d = block.astype(np.float64) - roundtrip(block)
        total += float(np.einsum("ij,ij->", d, d))
    return total / x.shape[0]


def faiss_pq_with(faiss, dim: int, m: int, nbits: int, codebooks: np.ndarray):
    index = faiss.IndexPQ(dim, m, nbits)
    faiss.copy_array_to_vector(np.ascontiguousarray(codebooks, np.float32).ravel(), index.pq.centroids)
    index.is_trained = True
    return index


def same_topk(d1, i1, d2, i2, tol=1e-4) -> float:
    """Fraction of queries whose top-k id sets agree, tie-tolerantly (ids may differ only at the k-th distance)."""
    ok = 0
    for a, b, da, db in zip(i1, i2, d1, d2):
        diff = set(a.tolist()) ^ set(b.tolist())
        if not diff:
            ok += 1
            continue
        kth = max(float(da[-1]), float(db[-1]))
        dist = dict(zip(a.tolist(), da.tolist())) | dict(zip(b.tolist(), db.tolist()))
        ok += all(abs(dist[j] - kth) <= tol * max(1.0, abs(kth)) for j in diff)
    return ok / len(i1)


# ----------------------------------------------------------------------------------------------------------
# benchmark sections
# ----------------------------------------------------------------------------------------------------------


def bench_codecs(faiss, name, x, m, repeats, opq_iter):
    dim = x.shape[1]
    rows = []

    # --- PQ --- (both sides get all rows and sample them themselves: at most 65,536 rows each, 256 per codeword)
    def faiss_pq():
        fpq = faiss.ProductQuantizer(dim, m, 8)
        fpq.train(x)
        return fpq

    (t_k, pq), (t_f, fpq) = timed_pair(lambda: kvant.PQ(dim, m, nbits=8, seed=0).fit(x), faiss_pq, repeats)
    mse_k = mse(x, lambda b: pq.decode(pq.encode(b)))
    mse_f = mse(x, lambda b: fpq.decode(fpq.compute_codes(b)))
    rows.append(dict(dataset=name, codec="PQ", m=m, nbits=8, kvant_train_s=t_k, faiss_train_s=t_f,
                     kvant_mse=mse_k, faiss_mse=mse_f))

    # --- OPQ --- Both sides train on the same sample, drawn here, untimed: kvant.OPQ.fit samples ``train_rows``
    # rows and learns the rotation and codebooks on them only; FAISS's OPQMatrix samples as many (max_train_points
    # 65,536) and its ProductQuantizer 256 per codeword. Given all N rows, FAISS's timed run also rotated all of them
    # (``mat.apply(x)``) before its PQ training, work kvant's fit never does.
    kw = {} if opq_iter is None else {"n_iter": opq_iter}
    train_rows = kvant.OPQ(dim, m, nbits=8, seed=0, **kw).train_rows
    pick = np.sort(np.random.default_rng(0).choice(x.shape[0], size=min(train_rows, x.shape[0]), replace=False))
    xs = np.ascontiguousarray(x[pick], np.float32)

    def faiss_opq():  # the rotation, then codebooks in the rotated space: what an "OPQ,PQ" index's train does
        mat = faiss.OPQMatrix(dim, m)
        mat.train(xs)
        fpq = faiss.ProductQuantizer(dim, m, 8)
        fpq.train(mat.apply(xs))
        return mat, fpq

    (t_k, opq), (t_f, (mat, fpq)) = timed_pair(lambda: kvant.OPQ(dim, m, nbits=8, seed=0, **kw).fit(xs), faiss_opq,
                                               repeats)
    opq_iter = opq.n_iter
    # encoding and MSE over all rows: untimed, outside the training comparison
    mse_k = mse(x, lambda b: opq.decode(opq.encode(b)))
    mse_f = mse(x, lambda b: mat.reverse_transform(fpq.decode(fpq.compute_codes(mat.apply(b)))))
    rows.append(dict(dataset=name, codec="OPQ", m=m, nbits=8, kvant_train_s=t_k, faiss_train_s=t_f,
                     kvant_mse=mse_k, faiss_mse=mse_f, kvant_opq_iter=opq_iter, faiss_opq_iter=mat.niter,
                     train_rows=int(xs.shape[0])))
    return rows, pq


def bench_encode(faiss, name, x, pq, repeats):
    fpq = faiss.ProductQuantizer(x.shape[1], pq.m, 8)
    faiss.copy_array_to_vector(pq.codebooks.ravel(), fpq.centroids)
    (t_k, ck), (t_f, cf) = timed_pair(lambda: pq.encode(x), lambda: fpq.compute_codes(x), repeats)
    return dict(dataset=name, n=x.shape[0], dim=x.shape[1], m=pq.m, kvant_vec_per_s=x.shape[0] / t_k,
                faiss_vec_per_s=x.shape[0] / t_f, codes_identical=float(np.mean(np.all(ck == cf, axis=1))))


def build_pair(faiss, x, m, nbits, fastscan_rerank=4):
    """kvant's PQIndex trained and filled with ``x``, and FAISS's index on the same codebooks and rows (IndexPQ, or
    IndexPQFastScan for 4 bits, then with the IndexPQ it came from): (index, faiss index, exact-ADC IndexPQ or None,
    kvant build s, FAISS build s)."""
    dim = x.shape[1]
    index = kvant.PQIndex(dim, m, nbits=nbits, fastscan_rerank=fastscan_rerank)
    t0 = time.perf_counter()
    index.train(x)
    index.add(x)
    build_k = time.perf_counter() - t0
    t0 = time.perf_counter()
    fidx = faiss_pq_with(faiss, dim, m, nbits, index.codec.codebooks)
    fidx.add(x)
    exact_adc = None
    if nbits == 4:
        exact_adc = fidx  # IndexPQ on the same codes: the exact (float) ADC top-10 the FastScan results approximate
        fidx = faiss.IndexPQFastScan(fidx)
    return index, fidx, exact_adc, build_k, time.perf_counter() - t0


# Queries per call in the small-batch part, and its timing: blocks of SMALL_CALLS back-to-back calls per side (after
# a pause of SMALL_PAUSE s and two untimed calls), the sides alternating for SMALL_ROUNDS rounds; the median call.
# Back-to-back, as a service answering a stream of requests calls it. The pause lets the other library's threads stop
# spinning: FAISS's OpenMP threads spin for milliseconds after each call, and without it kvant's block right after
# FAISS's measured 194 µs per 4-query Fashion-MNIST FastScan call against 117 µs alone (2026-12-05); a pause before
# every call instead measured thread wake-ups (1.6-2.2 ms per 1-query call for both).
SMALL_BATCHES = (1, 4, 10, 32, 100)
SMALL_CALLS = 8
SMALL_ROUNDS = 6
SMALL_PAUSE = 0.05


def bench_small_batches(faiss, name, x, q, m, nbits):
    """ms per search call for batches of SMALL_BATCHES queries: kvant's PQIndex and FAISS's index on the same codes."""
    index, fidx, _, _, _ = build_pair(faiss, x, m, nbits)
    rows = []
    for nq in SMALL_BATCHES:
        qb = q[:nq]
        times = ([], [])
        for _ in range(SMALL_ROUNDS):
            for side, fn in enumerate((lambda qb=qb: index.search(qb, 10), lambda qb=qb: fidx.search(qb, 10))):
                time.sleep(SMALL_PAUSE)
                fn()
                fn()
                for _ in range(SMALL_CALLS):
                    t0 = time.perf_counter()
                    fn()
                    times[side].append(time.perf_counter() - t0)
        tk, tf = statistics.median(times[0]), statistics.median(times[1])
        rows.append(dict(dataset=name, index=f"PQ{m}x{nbits}", faiss="IndexPQ" if nbits == 8 else "IndexPQFastScan",
                         n=x.shape[0], nq=nq, kvant_ms=tk * 1e3, faiss_ms=tf * 1e3))
        print("  ", rows[-1], flush=True)
    return rows


def bench_search(faiss, name, x, q, gt, m, nbits, repeats, fastscan_rerank=4):
    index, fidx, exact_adc, build_k, build_f = build_pair(faiss, x, m, nbits, fastscan_rerank)
    index.search(q[:8], 10)  # warm-up (JIT already compiled by earlier sections; loads caches)
    fidx.search(q[:8], 10)
    (t_k, (dk, ik)), (t_f, (df, i_f)) = timed_pair(lambda: index.search(q, 10), lambda: fidx.search(q, 10), repeats)
    row = dict(dataset=name, index=f"PQ{m}x{nbits}", m=m, nbits=nbits, code_bytes=index.code_size,
               nq=q.shape[0], n=x.shape[0], kvant_qps=q.shape[0] / t_k, faiss_qps=q.shape[0] / t_f,
               kvant_recall10=recall_at(ik, gt), faiss_recall10=recall_at(i_f, gt),
               faiss="IndexPQ" if nbits == 8 else "IndexPQFastScan", kvant_build_s=build_k, faiss_add_s=build_f)
    if nbits == 8:
        row["same_top10"] = same_topk(dk, ik, df, i_f)
    else:
        # Where the 4-bit recall comes from: both FastScans rank by u8-quantised lookup tables; kvant re-scores a
        # shortlist with exact ADC, FAISS returns the quantised order. Compare both with the exact ADC top-10.
        _, i_adc = exact_adc.search(q, 10)
        row["recall_diff_ci90"] = recall_diff_ci(hits_at(ik, gt), hits_at(i_f, gt))
        row.update(fastscan_rerank=fastscan_rerank, exact_adc_recall10=recall_at(i_adc, gt),
                   kvant_in_exact_adc=recall_at(ik, i_adc), faiss_in_exact_adc=recall_at(i_f, i_adc))
    return row, index


def ground_truth(faiss, x, q, k=10):
    """Exact top-k ids by squared L2 (PQIndex's metric here) from faiss.IndexFlatL2: an exact scan from outside the
    library under test."""
    flat = faiss.IndexFlatL2(x.shape[1])
    flat.add(np.ascontiguousarray(x, np.float32))
    return flat.search(np.ascontiguousarray(q, np.float32), k)[1]


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------


def write_markdown(res: dict, path: Path) -> None:
    def reps(part, default):  # rows carry their own run's repeats (``--parts`` re-runs may differ)
        return "/".join(str(v) for v in sorted({r.get("repeats", default) for r in res[part]})) or str(default)

    layer = res.get("numba_threading_layer", "not recorded")
    lines = [f"Threads: {res['threads']} (kvant and FAISS), Numba layer {layer}, FAISS {res['faiss_version']}, "
             "encode: medians of "
             f"{reps('encode', res['repeats'])} runs, search: medians of {reps('search', res['repeats'])} runs, "
             f"training: median of {reps('codecs', res['train_repeats'])} run(s), {res['machine']}. Encode and search "
             f"runs alternate kvant, FAISS, kvant, ... (since 2026-12-03 22:06; earlier rows ran kvant's repeats, then "
             f"FAISS's).", ""]
    when = {part: sorted({r.get("measured", "?") for r in res.get(part, [])})
            for part in ("codecs", "encode", "search", "smallbatch")}
    if any(w != ["?"] for w in when.values()):
        lines += ["Measured: " + "; ".join(f"{part} {', '.join(w)}" for part, w in when.items() if w) + ".", ""]
    lines += ["**Codecs** (training time: PQ given the full training set, each side sampling it; OPQ on the same "
              "sample of the training set for both sides, FAISS = OPQMatrix then ProductQuantizer on the rotated "
              "sample; MSE = mean ||x - x̂||² per row over all rows, the same float64 helper for both)", "",
             "| dataset | codec | m×bits | kvant train s | FAISS train s | kvant MSE | FAISS MSE | MSE ratio |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in res["codecs"]:
        lines.append(f"| {r['dataset']} | {r['codec']} | {r['m']}×{r['nbits']} | {r['kvant_train_s']:.2f} | "
                     f"{r['faiss_train_s']:.2f} | {r['kvant_mse']:.4g} | {r['faiss_mse']:.4g} | "
                     f"{r['kvant_mse'] / r['faiss_mse']:.3f} |")
    lines += ["", "**Encoding** (same codebooks)", "",
              "| dataset | n×dim, m | kvant vec/s | FAISS vec/s | ratio | identical codes |",
              "|---|---|---:|---:|---:|---:|"]
    for r in res["encode"]:
        lines.append(f"| {r['dataset']} | {r['n']}×{r['dim']}, m={r['m']} | {r['kvant_vec_per_s']:,.0f} | "
                     f"{r['faiss_vec_per_s']:,.0f} | {r['kvant_vec_per_s'] / r['faiss_vec_per_s']:.2f} | "
                     f"{r['codes_identical']:.4f} |")
    lines += ["", "**Search** (k=10, same codebooks on both sides, recall@10 vs exact faiss.IndexFlatL2)", "",
              "| dataset | index | bytes/vec | kvant q/s | FAISS q/s | FAISS index | ratio | kvant R@10 | FAISS R@10 "
              "| same top-10 |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in res["search"]:
        same = f"{r['same_top10']:.4f}" if "same_top10" in r else "n/a"
        lines.append(f"| {r['dataset']} | {r['index']} | {r['code_bytes']} | {r['kvant_qps']:,.0f} | "
                     f"{r['faiss_qps']:,.0f} | {r['faiss']} | {r['kvant_qps'] / r['faiss_qps']:.2f} | "
                     f"{r['kvant_recall10']:.4f} | {r['faiss_recall10']:.4f} | {same} |")
    fs = [r for r in res["search"] if "exact_adc_recall10" in r]
    if fs:
        lines += ["", "**4-bit: FastScan vs exact ADC** (same codes; exact ADC top-10 from faiss.IndexPQ; "
                  "\"in exact ADC\" = share of the returned top-10 ids that are in the exact ADC top-10)", "",
                  "| dataset | index | kvant rerank | exact ADC R@10 | kvant R@10 | FAISS FastScan R@10 "
                  "| kvant − FAISS R@10, paired bootstrap 90% CI | kvant in exact ADC | FAISS in exact ADC |",
                  "|---|---|---:|---:|---:|---:|---|---:|---:|"]
        for r in fs:
            lo, hi = r.get("recall_diff_ci90", (float("nan"), float("nan")))
            lines.append(f"| {r['dataset']} | {r['index']} | {r['fastscan_rerank']} | {r['exact_adc_recall10']:.4f} | "
                         f"{r['kvant_recall10']:.4f} | {r['faiss_recall10']:.4f} | "
                         f"{r['kvant_recall10'] - r['faiss_recall10']:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
                         f"{r['kvant_in_exact_adc']:.4f} | {r['faiss_in_exact_adc']:.4f} |")
    if res.get("smallbatch"):
        lines += ["", "**Small batches** (ms per search call, k=10, same codes; medians of "
                  f"{SMALL_ROUNDS}×{SMALL_CALLS} back-to-back calls per side, the sides alternating in blocks, "
                  f"{SMALL_PAUSE * 1e3:.0f} ms apart)", "",
                  "| dataset | index | queries per call | kvant ms | FAISS ms | FAISS index | kvant speed / FAISS |",
                  "|---|---|---:|---:|---:|---|---:|"]
        for r in res["smallbatch"]:
            lines.append(f"| {r['dataset']} | {r['index']} | {r['nq']} | {r['kvant_ms']:.3f} | {r['faiss_ms']:.3f} | "
                         f"{r['faiss']} | {r['faiss_ms'] / r['kvant_ms']:.2f} |")
    lines += ["", "**Targets** (issue 3; from the rows above)", ""] + [f"- {t}" for t in target_verdicts(res)]
    path.write_text("\n".join(lines) + "\n")


def target_verdicts(res: dict) -> list[str]:
    """Issue 3's targets, per dataset, as met / missed (an audit found them asserted only by hand in README)."""
    def v(ok):
        return "**met**" if ok else "**missed**"

    out = []
    for r in res["search"]:
        ratio = r["kvant_qps"] / r["faiss_qps"]
        if r["faiss"] == "IndexPQ" and r["nbits"] == 8:
            out.append(f"{r['dataset']} 8-bit ADC ≥ 1.0× IndexPQ q/s: {ratio:.2f}× (same top-10 in "
                       f"{r.get('same_top10', float('nan')):.4f} of queries), {v(ratio >= 1.0)}")
        elif r["faiss"].startswith("IndexPQFastScan"):
            ok = ratio >= 0.8 and r["kvant_recall10"] >= r["faiss_recall10"]
            out.append(f"{r['dataset']} 4-bit ≥ 0.8× IndexPQFastScan q/s at ≥ its recall@10: {ratio:.2f}×, recall "
                       f"{r['kvant_recall10']:.4f} vs {r['faiss_recall10']:.4f}, {v(ok)}")
    for r in res["codecs"]:
        if r["codec"] == "OPQ":
            mse, t = r["kvant_mse"] / r["faiss_mse"], r["kvant_train_s"] / r["faiss_train_s"]
            out.append(f"{r['dataset']} OPQ MSE ≤ FAISS + 1% in no more training time: {mse:.3f}× MSE in {t:.2f}× "
                       f"the time ({r.get('kvant_opq_iter', '?')} vs {r.get('faiss_opq_iter', '?')} iterations), "
                       f"{v(mse <= 1.01 and t <= 1.0)}")
    for r in res["encode"]:
        if r["dim"] == 128 and r["m"] == 16:
            out.append(f"{r['dataset']} encoding ≥ 1M vectors/s (128-d, m=16): {r['kvant_vec_per_s']:,.0f}, "
                       f"{v(r['kvant_vec_per_s'] >= 1e6)}")
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    s = res["search"]
    labels = [f"{r['dataset']}\n{r['index']}" for r in s]
    xs = np.arange(len(s))
    axes[0].bar(xs - 0.2, [r["kvant_qps"] for r in s], 0.4, label="kvant")
    axes[0].bar(xs + 0.2, [r["faiss_qps"] for r in s], 0.4, label="FAISS")
    axes[0].set_xticks(xs, labels, fontsize=7)
    axes[0].set_ylabel("queries / s (k=10)")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].bar(xs - 0.2, [r["kvant_recall10"] for r in s], 0.4, label="kvant")
    axes[1].bar(xs + 0.2, [r["faiss_recall10"] for r in s], 0.4, label="FAISS")
    axes[1].set_xticks(xs, labels, fontsize=7)
    axes[1].set_ylabel("recall@10")
    axes[1].legend()
    c = res["codecs"]
    cl = [f"{r['dataset']}\n{r['codec']}" for r in c]
    cx = np.arange(len(c))
    axes[2].bar(cx - 0.2, [r["kvant_mse"] / r["faiss_mse"] for r in c], 0.4, label="MSE kvant/FAISS")
    axes[2].bar(cx + 0.2, [r["kvant_train_s"] / r["faiss_train_s"] for r in c], 0.4, label="train time kvant/FAISS")
    axes[2].axhline(1.0, color="k", lw=0.8)
    axes[2].set_xticks(cx, cl, fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"kvant vs FAISS, PQ/OPQ, {res['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for checking the script")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of encode and search (median)")
    ap.add_argument("--train-repeats", type=int, default=1, help="timed trainings per codec (FAISS OPQ takes minutes)")
    ap.add_argument("--synthetic-n", type=int, default=1_000_000)
    ap.add_argument("--fmnist-queries", type=int, default=10000, help="test rows used as queries (all)")
    ap.add_argument("--synthetic-queries", type=int, default=10000)
    ap.add_argument("--opq-iter", type=int, default=None, help="OPQ rotation updates (default: kvant.OPQ's)")
    ap.add_argument("--out", default="pq",
                    help="results name: NAME.{json,md,png} under benchmarks/results, as the other benchmarks write "
                         "them (a path with a directory is taken as given)")
    ap.add_argument("--parts", default="search,smallbatch,encode,codecs",
                    help="comma-separated parts to measure: search, smallbatch, encode, codecs")
    ap.add_argument("--resume", default=None,
                    help="earlier results JSON: its rows of the parts not measured now are kept (each row keeps "
                         "its own run's date in 'measured')")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    known = {"search", "smallbatch", "encode", "codecs"}
    if not parts <= known:
        ap.error(f"unknown part(s) in --parts: {sorted(parts - known)}")

    import faiss

    threads = kvant.set_num_threads(args.threads)
    faiss.omp_set_num_threads(threads)
    repeats = 1 if args.quick else args.repeats
    train_repeats = 1 if args.quick else args.train_repeats
    machine = f"{platform.processor() or platform.machine()}, Python {platform.python_version()}"
    res = {"threads": threads, "numba_threading_layer": numba_threading_layer(), "faiss_version": faiss.__version__,
           "kvant_version": kvant.__version__,
           "repeats": repeats, "train_repeats": train_repeats, "machine": machine,
           "codecs": [], "encode": [], "search": [], "smallbatch": []}
    stamp = time.strftime("%Y-%m-%d %H:%M")
    if args.resume:
        old = json.loads(Path(args.resume).read_text())
        for part in ("codecs", "encode", "search", "smallbatch"):
            if part not in parts:
                res[part] = [dict(r, measured=r.get("measured", "earlier run")) for r in old.get(part, [])]

    # warm-up: compile every kernel once outside the timed runs
    w = np.random.default_rng(0).standard_normal((4096, 32)).astype(np.float32)
    for nbits in (8, 4):
        i = kvant.PQIndex(32, 4, nbits=nbits)
        i.train(w)
        i.add(w)
        i.search(w[:8], 10)
    kvant.OPQ(32, 4, nbits=4, n_iter=1).fit(w)

    train, test = fashion_mnist()
    nqf = 200 if args.quick else args.fmnist_queries
    if args.quick:
        train = train[:10000]
    datasets = [("fashion-mnist", train, test[:nqf], 16, [(16, 8), (16, 4)])]
    n_syn = 50_000 if args.quick else args.synthetic_n
    xs, qs = synthetic(n_syn, 100 if args.quick else args.synthetic_queries)
    datasets.append((f"synthetic-{n_syn // 1000}k×128", xs, qs, 16, [(16, 8), (32, 4)]))

    out = Path(args.out) if Path(args.out).parent != Path(".") else RESULTS / args.out
    out.parent.mkdir(parents=True, exist_ok=True)

    def save_partial():  # results so far, so an interrupted run still leaves numbers behind
        out.with_suffix(".json").write_text(json.dumps(res, indent=2))
        write_markdown(res, out.with_suffix(".md"))

    for name, x, q, m, search_cfgs in datasets:
        # search first (the headline targets), then encoding with the 8-bit index's codec, then codec training
        print(f"[{name}] {x.shape} queries {q.shape}", flush=True)
        pq = None
        if "search" in parts:
            gt = ground_truth(faiss, x, q)
            for m_s, nbits in search_cfgs:
                row, index = bench_search(faiss, name, x, q, gt, m_s, nbits, repeats)
                res["search"].append(dict(row, measured=stamp, repeats=repeats))
                if nbits == 8 and m_s == m:
                    pq = index.codec
                print("  ", row, flush=True)
                save_partial()
        if "smallbatch" in parts:
            for m_s, nbits in search_cfgs:
                rows = bench_small_batches(faiss, name, x, q, m_s, nbits)
                res["smallbatch"] += [dict(r, measured=stamp) for r in rows]
                save_partial()
        if "encode" in parts:
            if pq is None:  # the 8-bit index's codec, trained as bench_search trains it
                index = kvant.PQIndex(x.shape[1], m, nbits=8)
                index.train(x)
                pq = index.codec
            res["encode"].append(dict(bench_encode(faiss, name, x, pq, repeats), measured=stamp, repeats=repeats))
            print("  ", res["encode"][-1], flush=True)
            save_partial()
        if "codecs" in parts:
            rows, _ = bench_codecs(faiss, name, x, m, train_repeats, args.opq_iter)
            res["codecs"] += [dict(r, measured=stamp, repeats=train_repeats) for r in rows]
            for r in rows:
                print("  ", r, flush=True)
            save_partial()

    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    write_markdown(res, out.with_suffix(".md"))
    plot(res, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
