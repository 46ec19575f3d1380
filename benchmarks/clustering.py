"""k-means side by side: kvant vs FAISS (defaults and no subsampling) vs scikit-learn, one process.

Every method gets the same float32 data, the same thread count and the same seeds, and is scored the same
way from its own labels and centres: MSE per row (l2) or mean cosine to the assigned centre (cos), over all
rows, plus V-measure where true labels exist. FAISS's time includes the assignment of all rows
(``index.search(x, 1)``), since kvant's includes it too; FAISS train-only time is recorded as well. For cos,
every method starts from the same raw rows and its time includes normalising them (kvant does it inside
``fit``; FAISS and scikit-learn get ``faiss.normalize_L2`` / a NumPy division in their timed run).
Medians over ``--repeats`` runs (more for cells of milliseconds, see ``interleaved``) for kvant auto and FAISS default
(the two the targets compare), run ``r`` with seed ``r`` (FAISS: ``r + 1``), so their time *and* quality are medians
over seeds: at small K a single seed's local minimum moves the quality by 1-2%, as much as the target's 0.5% margin,
either way. The other anchors
run once when their first run exceeds ``--repeat-cap`` seconds, and slow anchors may be skipped on a time budget
(the table says so).

    python benchmarks/clustering.py                 # the issue grid (about two hours on 2 cores)
    python benchmarks/clustering.py --quick         # a small grid for a smoke run

Writes benchmarks/results/clustering.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import kvant
from kvant._parallel import numba_threading_layer
from kvant.bench import datasets

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------
# scoring (plain NumPy, independent of kvant's kernels)
# ------------------------------------------------------------------------------------------------
def quality(x: np.ndarray, labels: np.ndarray, centres: np.ndarray, metric: str) -> float:
    total = 0.0
    for s in range(0, x.shape[0], 65536):
        xb = x[s : s + 65536].astype(np.float64)
        cb = centres[labels[s : s + 65536]].astype(np.float64)
        if metric == "l2":
            total += ((xb - cb) ** 2).sum()
        else:
            num = (xb * cb).sum(1)
            den = np.linalg.norm(xb, axis=1) * np.linalg.norm(cb, axis=1)
            total += (num / np.maximum(den, 1e-30)).sum()
    return total / x.shape[0]


def better(metric: str) -> int:
    return -1 if metric == "l2" else 1  # lower MSE / higher cosine


# ------------------------------------------------------------------------------------------------
# methods: each returns (labels, centres, extra-info dict)
# ------------------------------------------------------------------------------------------------
def run_kvant(algorithm):
    def fn(x, k, metric, seed):
        c = kvant.Clusterer(k=k, metric=metric, algorithm=algorithm, seed=seed).fit(x)
        return c.labels_, c.cluster_centers_, {"algorithm": c.algorithm_, "n_iter": c.n_iter_, **c.timings_}

    return fn


def run_faiss(subsample: bool):
    def fn(x, k, metric, seed):
        import faiss

        data = x
        if metric == "cos":  # FAISS wants unit rows for spherical k-means; normalising is part of its job,
            faiss.normalize_L2(data)  # in place, on the copy ``prepare`` made outside the timer
        kw = {} if subsample else {"max_points_per_centroid": 1 << 30}
        km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed + 1, spherical=(metric == "cos"), **kw)
        t = time.perf_counter()
        km.train(data)
        train = time.perf_counter() - t
        _, idx = km.index.search(data, 1)
        return idx[:, 0].astype(np.int64), km.centroids, {"train_only": train}

    # The copy exists only so ``x`` survives for the next method: it is the benchmark's work, not FAISS's (an audit
    # found it timed: 0.09-0.73 s at 1M x 128, against FAISS cos fits of 0.39-0.9 s)
    fn.prepare = lambda x, metric: x.copy() if metric == "cos" else x
    return fn


def _prepared(fn, x, metric):
    """The input a method is timed on: ``fn.prepare``'s untimed copy where it has one, else ``x``."""
    prepare = getattr(fn, "prepare", None)
    return x if prepare is None else prepare(x, metric)


def run_sklearn(minibatch: bool):
    def fn(x, k, metric, seed):
        from sklearn.cluster import KMeans, MiniBatchKMeans

        data = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cos" else x  # timed, as for kvant
        if minibatch:
            m = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1, batch_size=4096)
        else:
            m = KMeans(n_clusters=k, n_init=1, random_state=seed)
        labels = m.fit_predict(data)
        return labels.astype(np.int64), m.cluster_centers_.astype(np.float32), {"n_iter": int(m.n_iter_)}

    return fn


METHODS = {
    "kvant auto": run_kvant("auto"),
    "kvant minibatch": run_kvant("minibatch"),
    "kvant dense-exact-random": run_kvant("dense-exact-random"),
    "faiss default": run_faiss(True),
    "faiss no-subsample": run_faiss(False),
    "sklearn KMeans": run_sklearn(False),
    "sklearn MiniBatch": run_sklearn(True),
}


# ------------------------------------------------------------------------------------------------
def load_dataset(name: str, n: int | None, dim: int | None, k_true: int):
    if name == "fashion-mnist":
        return datasets.fashion_mnist()
    if name == "digits":
        return datasets.digits()
    import hashlib

    version = hashlib.sha1(Path(datasets.__file__).read_bytes()).hexdigest()[:10]  # new generator, new file
    cache = Path(tempfile.gettempdir()) / "kvant-bench-data" / f"{name}-{n}x{dim}-{k_true}-{version}.npz"
    if cache.exists():  # generated once per machine: regenerating 1M×128 per K would cost minutes
        with np.load(cache) as f:
            return f["x"], f["y"]
    x, y = datasets.load(name, n, dim, k_true, seed=0)
    cache.parent.mkdir(exist_ok=True)
    np.savez(cache, x=x, y=y)
    return x, y


TARGET_METHODS = ("kvant auto", "faiss default")


# Every method is called once, untimed, before its first timed run in a cell (same seed). kvant's first call of a
# code path compiles Numba code (seconds; cached on disk after), which is not the fit time the grid compares: a grid
# started with cold caches (2026-12-06 01:55, Zen 4 host) had first runs of 0.2-10.7 s in 9 cells against 1-250 ms
# for the runs after, and in cells of 3 runs that raised kvant's median (heavy-tailed 1M×128 K=64 l2: 1.86 s, then
# 0.25 and 0.26). FAISS gets the same call, so neither method's first run pays for one-time set-up.
WARM_FIRST_CALL = True


def time_method(fn, x, k, metric, seed, repeats, cap=None):
    times, results = [], None
    if WARM_FIRST_CALL:
        fn(_prepared(fn, x, metric), k, metric, seed)
    for r in range(repeats):
        data = _prepared(fn, x, metric)
        t = time.perf_counter()
        out = fn(data, k, metric, seed)
        times.append(time.perf_counter() - t)
        if r == 0:
            results = out
        if cap is not None and times[0] > cap:
            break
    return float(np.median(times)), times, results


# Cells whose runs take milliseconds (digits) are timed over more rounds: a median of 3 runs of 3-50 ms swung by
# up to 1.6x between two runs of the grid on a noisy host. Extra rounds take new seeds and their quality counts too:
# with 3 seeds a K = 10 cell's quality median moved by more than the target's 0.5% (Fashion-MNIST l2, Zen 4 host,
# 2026-12-05: kvant's seeds 0-2 were 1.1% worse than FAISS's, its seeds 0-11 0.3% better; either method's seeds
# spread 1.5-4% there).
SHORT_CELL_SECONDS = 1.0  # keep adding rounds while every method's total time is below this
SHORT_CELL_MAX_ROUNDS = 31
# When a method's first run in a cell took less than this, every method gets an untimed call of its own (same
# seed) just before each later timed one. FAISS's OpenMP threads spin for a while after each call, and in the
# round-robin the next method's run shared the two cores with them: digits K=256 l2 (Zen 4 host, 2026-12-05) kvant
# 8.5 ms right after FAISS against 7.4 ms after its own call, while FAISS read 13.3-13.5 ms either way. After its own
# call each method runs warm and alone, as a service calling it back to back would (a 50 ms pause instead made both
# cold: kvant 9.6, FAISS 20.9 ms).
WARM_CALL_SECONDS = 0.05


def interleaved(fns, x, k, metric, seed, repeats):
    """Time several methods round-robin (a, b, a, b, ...) so load from elsewhere hits each alike.

    Run r uses seed ``seed + r``; every run's output is kept (one per seed) so quality can be taken over the seeds
    too. When every method's runs so far total less than ``SHORT_CELL_SECONDS``, further rounds follow (at most
    ``SHORT_CELL_MAX_ROUNDS``), so millisecond cells get a stable median of time and quality. Every method is called
    once untimed before its first timed run (``WARM_FIRST_CALL``) and, from the second round on, when some method's
    first run took less than ``WARM_CALL_SECONDS``, before each of its timed runs (see there)."""
    times = {name: [] for name in fns}
    results = {name: [] for name in fns}
    r = 0
    while r < repeats or (r < SHORT_CELL_MAX_ROUNDS and all(sum(t) < SHORT_CELL_SECONDS for t in times.values())):
        for name, fn in fns.items():
            if (r == 0 and WARM_FIRST_CALL) or (r > 0 and min(t[0] for t in times.values()) < WARM_CALL_SECONDS):
                fn(_prepared(fn, x, metric), k, metric, seed + r)
            data = _prepared(fn, x, metric)
            t = time.perf_counter()
            out = fn(data, k, metric, seed + r)
            times[name].append(time.perf_counter() - t)
            results[name].append(out)
        r += 1
    return {name: (float(np.median(times[name])), times[name], results[name]) for name in fns}


def bench_cell(ds, x, y, k, metric, methods, repeats, slow_repeats, slow_budget, sklearn_budget, repeat_cap):
    rows = []
    measured = {}
    # The two methods the targets compare run first, interleaved run by run.
    paired = interleaved({m: METHODS[m] for m in TARGET_METHODS if m in methods}, x, k, metric, 0, repeats)
    for name in methods:
        fn = METHODS[name]
        # Slow anchors: skip a cell only when a measured neighbour says it would blow the budget. FAISS without
        # subsampling does 25 full-data iterations, each about one assignment of all rows, which FAISS default's
        # final index.search measures; scikit-learn's KMeans runs full-data Lloyd to convergence, estimated at
        # 3 × FAISS no-subsample.
        est, budget = None, slow_budget
        one_pass = measured.get("faiss default search", 0.0)
        if name == "faiss no-subsample" and "faiss default" in measured:
            est = 25 * one_pass
        elif name == "sklearn KMeans":
            est, budget = 3 * measured.get("faiss no-subsample", 25 * one_pass), sklearn_budget
        if est is not None and est > budget:
            rows.append({"dataset": ds, "n": x.shape[0], "dim": x.shape[1], "k": k, "metric": metric,
                         "method": name, "skipped": f"estimated {est:.0f} s > budget {budget:.0f} s"})
            print(f"  {name:<26} skipped (est. {est:.0f} s)", flush=True)
            continue
        reps = slow_repeats if est is not None and est > 20 else repeats
        # The other anchors stop after one run that took longer than repeat_cap seconds (runs=1 in the table).
        if name in paired:  # one output per seed: quality and V-measure are medians over the seeds
            med, times, outs = paired[name]
        else:
            med, times, out = time_method(fn, x, k, metric, 0, reps, repeat_cap)
            outs = [out]
        qs = [quality(x, labels, centres, metric) for labels, centres, _ in outs]
        q = float(np.median(qs))
        info = outs[0][2]
        row = {"dataset": ds, "n": x.shape[0], "dim": x.shape[1], "k": k, "metric": metric, "method": name,
               "seconds": med, "runs": times, "quality": q, **{f"info_{a}": b for a, b in info.items()}}
        if len(outs) > 1:
            row["seed_qualities"] = qs
        if y is not None:
            from sklearn.metrics import v_measure_score

            row["v_measure"] = float(np.median([v_measure_score(y, labels) for labels, _, _ in outs]))
        measured[name] = med
        if "train_only" in info:
            measured[f"{name} search"] = med - info["train_only"]
        rows.append(row)
        qname = "MSE" if metric == "l2" else "cos"
        print(f"  {name:<26} {med:8.3f}s  {qname} {q:.6g}  V {row.get('v_measure', float('nan')):.4f}", flush=True)
    return rows


# The targets for `kvant auto`: (anchor, minimum speedup, maximum relative quality loss).
TARGETS = (("faiss default", 2.0, 0.005), ("faiss no-subsample", 5.0, 0.002))


def assess(rows):
    """Per cell: auto vs FAISS default (>= 2x faster, <= 0.5% worse) and vs no-subsample (>= 5x, ±0.2%)."""
    cells = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["n"], r["dim"], r["k"], r["metric"]), {})[r["method"]] = r
    verdicts = []
    for key, m in cells.items():
        metric = key[4]
        a = m.get("kvant auto")
        v = {"cell": list(key)}
        for anchor, speed, tol in TARGETS:
            f = m.get(anchor)
            if not a or not f or "seconds" not in f:
                continue
            if a.get("run") != f.get("run"):  # a verdict compares one run's measurements, never two runs' (audit)
                continue
            speedup = f["seconds"] / a["seconds"]
            # relative quality loss of kvant vs the anchor (positive = kvant worse)
            loss = (a["quality"] - f["quality"]) / abs(f["quality"]) * (1 if metric == "l2" else -1)
            v[anchor] = {"speedup": speedup, "quality_loss": loss, "pass": bool(speedup >= speed and loss <= tol)}
        verdicts.append(v)
    return verdicts


# ------------------------------------------------------------------------------------------------
# FLOP rate of the fused assignment vs numpy sgemm on the same shapes
# ------------------------------------------------------------------------------------------------
def flop_rate(shapes, repeats=5):
    from kvant.cluster.assign import assign_top2, block_rows_for
    from kvant.kernels.distance import sq_norms

    out = []
    g = np.random.default_rng(0)
    for n, d, k in shapes:
        x = g.standard_normal((n, d), dtype=np.float32)
        c = g.standard_normal((k, d), dtype=np.float32)
        cn = sq_norms(c)
        lab = np.empty(n, np.int64)
        d1 = np.empty(n, np.float32)
        d2 = np.empty(n, np.float32)
        assign_top2(x[:1000], c, cn, lab[:1000], d1[:1000], d2[:1000])
        xb = x[: 4 * block_rows_for(d, k)]
        t_assign = _median_time(repeats, assign_top2, x, c, cn, lab, d1, d2)
        t_gemm_full = _median_time(repeats, np.matmul, x, c.T)
        t_gemm_blk = _median_time(repeats, np.matmul, xb, c.T) * n / xb.shape[0]
        flops = 2.0 * n * d * k
        row = {"n": n, "dim": d, "k": k, "assign_gflops": flops / t_assign / 1e9,
               "sgemm_full_gflops": flops / t_gemm_full / 1e9, "sgemm_4blocks_gflops": flops / t_gemm_blk / 1e9}
        row["ratio_vs_best_sgemm"] = row["assign_gflops"] / max(row["sgemm_full_gflops"], row["sgemm_4blocks_gflops"])
        out.append(row)
        print(f"  assign {n}x{d}, K={k}: {row['assign_gflops']:.1f} GFLOP/s; numpy sgemm full "
              f"{row['sgemm_full_gflops']:.1f}, 4 blocks {row['sgemm_4blocks_gflops']:.1f} -> "
              f"{100 * row['ratio_vs_best_sgemm']:.0f}%", flush=True)
    return out


def _median_time(repeats, fn, *args):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


# ------------------------------------------------------------------------------------------------
# end to end + memory, each in a fresh process so peak RSS is its own
# ------------------------------------------------------------------------------------------------
_CHILD = r"""
import json, sys, time, threading, numpy as np
def status():
    out = {}
    for line in open('/proc/self/status'):
        if line.startswith(('VmRSS', 'RssAnon', 'RssFile')):
            key, val = line.split(':'); out[key] = int(val.split()[0]) * 1024
    return out
peak = {'VmRSS': 0, 'RssAnon': 0, 'RssFile': 0}; stop = False
def sampler():
    while not stop:
        for a, b in status().items(): peak[a] = max(peak[a], b)
        time.sleep(0.005)
import kvant
from kvant.cluster.clusterer import Clusterer
kvant.set_num_threads(int(sys.argv[4]))
# warm the JIT on a tiny problem so the timing is the job, not compilation (the cache is on disk anyway)
Clusterer(k=4, algorithm=sys.argv[3]).fit(np.random.default_rng(0).standard_normal((5000, 8)).astype('float32'))
base = status()
threading.Thread(target=sampler, daemon=True).start()
t = time.perf_counter()
kw = {'batch_rows': 16384, 'max_epochs': 2} if sys.argv[3] == 'minibatch' else {}
c = Clusterer(k=int(sys.argv[2]), algorithm=sys.argv[3], seed=0, **kw).fit(sys.argv[1])
wall = time.perf_counter() - t
stop = True; time.sleep(0.02)
print(json.dumps({'wall': wall, 'mse': c.mse_, 'algorithm': c.algorithm_, 'timings': c.timings_,
                  'peak': peak, 'baseline': base}))
"""


def end_to_end(n, dim, k, algorithm, threads, family="zipf_imbalanced"):
    x, _ = datasets.load(family, n, dim, 64, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.npy")
        np.save(path, x)
        del x
        out = subprocess.run([sys.executable, "-c", _CHILD, path, str(k), algorithm, str(threads)],
                             capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    r.update({"n": n, "dim": dim, "k": k, "input_bytes": n * dim * 4})
    print(f"  end-to-end {n}x{dim} K={k} {algorithm}: {r['wall']:.2f} s wall, peak RSS "
          f"{r['peak']['VmRSS'] / 2**20:.0f} MiB (anon {r['peak']['RssAnon'] / 2**20:.0f} MiB, file-backed "
          f"{r['peak']['RssFile'] / 2**20:.0f} MiB; baseline before fit {r['baseline']['VmRSS'] / 2**20:.0f} MiB)"
          f" for a {r['input_bytes'] / 2**20:.0f} MiB input", flush=True)
    return r


# ------------------------------------------------------------------------------------------------
class cell_lock:
    """Hold the machine-wide benchmark lock (KVANT_BENCH_LOCK, default /tmp/kvant-bench.lock) for one cell."""

    def __enter__(self):
        import fcntl

        self.fh = open(os.environ.get("KVANT_BENCH_LOCK", "/tmp/kvant-bench.lock"), "a")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()
        return False


SYNTHETIC_FAMILIES = ["anisotropic", "zipf_imbalanced", "heavy_tailed", "irrelevant_dims"]
GRID_KS = [10, 64, 256, 1024]


def grid(quick: bool):
    """The issue's grid: real data first (cheap), then every synthetic family at 1M×128 and 200k×384."""
    if quick:
        return [("digits", None, None, 10, [10, 64], ["l2", "cos"]),
                ("anisotropic", 50_000, 64, 64, [64], ["l2"])]
    cells = [("digits", None, None, 10, GRID_KS, ["l2", "cos"]),
             ("fashion-mnist", None, None, 10, GRID_KS, ["l2", "cos"])]
    for n, dim in ((1_000_000, 128), (200_000, 384)):
        cells += [(fam, n, dim, 256, GRID_KS, ["l2", "cos"]) for fam in SYNTHETIC_FAMILIES]
    return cells


EARLIER_RUN = "first full grid, 2026-11-22 to 2026-12-01, code of 10e4d7f"  # rows from before runs were recorded
SUMMARY_METHODS = ["kvant auto", "kvant minibatch", "faiss default", "faiss no-subsample", "sklearn KMeans",
                   "sklearn MiniBatch"]


def summary_table(res) -> list[str]:
    """One row per cell: seconds and quality of each method (the README table)."""
    cells = {}
    for r in res["rows"]:
        cells.setdefault((r["dataset"], r["n"], r["dim"], r["k"], r["metric"]), {})[r["method"]] = r
    head = "| cell | " + " | ".join(SUMMARY_METHODS) + " |"
    lines = ["Each entry: median seconds / quality (MSE per row for l2, lower is better; mean cosine for cos, higher "
             "is better). — = not run in this grid, skip = skipped by the time budget.", "", head,
             "|---|" + "---|" * len(SUMMARY_METHODS)]
    for key, m in cells.items():
        entries = []
        for name in SUMMARY_METHODS:
            r = m.get(name)
            if r is None:
                entries.append("—")
            elif "seconds" not in r:
                entries.append("skip")
            else:
                entries.append(f"{r['seconds']:.2f} s / {r['quality']:.5g}")
        lines.append(f"| {key[0]} {key[1]}×{key[2]} K={key[3]} {key[4]} | " + " | ".join(entries) + " |")
    return lines


def verdict_summary(verdicts) -> list[str]:
    """Counts over the grid: how many cells pass each target, and the median speedup and quality loss."""
    lines = []
    for anchor, speed, tol in TARGETS:
        tol *= 100  # percent, as the loss below
        vs = [v[anchor] for v in verdicts if anchor in v]
        if not vs:
            continue
        sp = np.array([v["speedup"] for v in vs])
        loss = 100 * np.array([v["quality_loss"] for v in vs])
        lines.append(f"- vs {anchor} (target ≥{speed:g}× at ≤{tol}% worse): **{sum(v['pass'] for v in vs)} of "
                     f"{len(vs)} cells pass**; faster in {int((sp > 1).sum())}, ≥{speed:g}× in "
                     f"{int((sp >= speed).sum())}; speedup median {np.median(sp):.2f}× "
                     f"(range {sp.min():.2f}–{sp.max():.2f}×); quality within {tol}% in "
                     f"{int((loss <= tol).sum())}, median loss {np.median(loss):+.2f}%.")
    return lines


def write_markdown(res, path):
    layer = res.get("numba_threading_layer", "not recorded")
    lines = [f"Machine: {res['machine']}, threads={res['threads']}, Numba layer {layer}; "
             f"medians of {res['repeats']} runs "
             "(single runs where the runs column says 1). Quality: MSE/row for l2 (lower is better), "
             "mean cosine for cos (higher is better). FAISS time includes assigning all rows. Rows with a quality "
             "range ran once per seed (0, 1, 2, …): their time and quality are medians over the seeds, and the range "
             "is the lowest–highest seed's quality; the other rows ran seed 0.", ""]
    run_ids = sorted({r.get("run", EARLIER_RUN) for r in res["rows"]})
    if len(run_ids) > 1:
        lines += ["Rows come from more than one run of this script (same machine, data and threads; within a cell "
                  "the methods of one run ran side by side, and `kvant auto` and `faiss default` always come from "
                  "the same run):", ""]
        lines += [f"- run {i + 1}: {run} ({sum(r.get('run', EARLIER_RUN) == run for r in res['rows'])} rows)"
                  for i, run in enumerate(run_ids)]
        lines.append("")
    lines += ["## Summary", ""] + summary_table(res) + ["", "## All rows", ""]
    lines += ["The machine was shared with other jobs during the run. *spread* is max/min over a method's runs: "
              "a large spread means load noise, so read such cells with care.", "",
              "| dataset | N×D | K | metric | method | s (median) | runs | spread | quality | V-measure "
              "| vs FAISS default |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    by_cell = {}
    for r in res["rows"]:
        by_cell.setdefault((r["dataset"], r["n"], r["dim"], r["k"], r["metric"]), []).append(r)
    for key, rows in by_cell.items():
        ref = next((r for r in rows if r["method"] == "faiss default" and "seconds" in r), None)
        for r in rows:
            if "seconds" not in r:
                lines.append(f"| {key[0]} | {key[1]}×{key[2]} | {key[3]} | {key[4]} | {r['method']} | skipped: "
                             f"{r['skipped']} | | | | | |")
                continue
            rel = ""
            if ref is not None and r is not ref:
                loss = (r["quality"] - ref["quality"]) / abs(ref["quality"]) * (1 if key[4] == "l2" else -1)
                ratio = ref["seconds"] / r["seconds"]
                speed = f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"
                rel = f"{speed}, {100 * loss:+.2f}% quality loss"
            vm = f"{r['v_measure']:.4f}" if "v_measure" in r else ""
            alg = f" ({r['info_algorithm']})" if r["method"] == "kvant auto" and "info_algorithm" in r else ""
            if r.get("runs_not_logged"):  # recovered from an interrupted run's log: median only
                runs, spread = "median only", "n/a"
            else:
                runs, spread = str(len(r["runs"])), f"{max(r['runs']) / min(r['runs']):.2f}"
            if len(run_ids) > 1:
                runs += f" (run {run_ids.index(r.get('run', EARLIER_RUN)) + 1})"
            qual = f"{r['quality']:.6g}"
            if r.get("seed_qualities"):
                qual += f" ({min(r['seed_qualities']):.6g}–{max(r['seed_qualities']):.6g})"
            lines.append(f"| {key[0]} | {key[1]}×{key[2]} | {key[3]} | {key[4]} | {r['method']}{alg} | "
                         f"{r['seconds']:.3f} | {runs} | {spread} | {qual} | {vm} | {rel} |")
    lines += ["", "Targets for `kvant auto` per cell (speedup, quality loss; PASS/FAIL):", ""]
    lines += verdict_summary(res["verdicts"]) + ["",
              "| cell | vs FAISS default (≥2×, ≤0.5%) | vs FAISS no-subsample (≥5×, ≤0.2%) |", "|---|---|---|"]
    for v in res["verdicts"]:
        cells = []
        for anchor in ("faiss default", "faiss no-subsample"):
            a = v.get(anchor)
            cells.append("n/a" if a is None else
                         f"{'PASS' if a['pass'] else 'FAIL'} {a['speedup']:.2f}×, {100 * a['quality_loss']:+.2f}%")
        lines.append(f"| {' '.join(str(c) for c in v['cell'])} | {cells[0]} | {cells[1]} |")
    if res.get("flops"):
        lines += ["", "Fused assignment vs numpy sgemm on the same shapes:", "",
                  "| N×D, K | assign GFLOP/s | sgemm full | sgemm 4 blocks | ratio |", "|---|---:|---:|---:|---:|"]
        for f in res["flops"]:
            lines.append(f"| {f['n']}×{f['dim']}, {f['k']} | {f['assign_gflops']:.1f} | {f['sgemm_full_gflops']:.1f} "
                         f"| {f['sgemm_4blocks_gflops']:.1f} | {100 * f['ratio_vs_best_sgemm']:.0f}% |")
    for e in res.get("end_to_end", []):
        lines.append(f"\nEnd to end ({e['algorithm']}, .npy on disk, {e['n']}×{e['dim']}, K={e['k']}): "
                     f"{e['wall']:.2f} s wall; peak RSS {e['peak']['VmRSS'] / 2**20:.0f} MiB "
                     f"(anonymous {e['peak']['RssAnon'] / 2**20:.0f} MiB, file-backed page cache "
                     f"{e['peak']['RssFile'] / 2**20:.0f} MiB; "
                     f"{e['baseline']['VmRSS'] / 2**20:.0f} MiB before the fit) "
                     f"for a {e['input_bytes'] / 2**20:.0f} MiB input.")
    path.write_text("\n".join(lines) + "\n")


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {}
    for r in res["rows"]:
        if "seconds" in r:
            cells.setdefault((r["dataset"], r["n"], r["dim"], r["k"], r["metric"]), []).append(r)
    n = len(cells)
    if n == 0:  # a run with no grid cells (only --only none): nothing to plot
        return
    cols = min(4, n)
    rows_ = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.4 * rows_), squeeze=False)
    for ax, (key, rs) in zip(axes.flat, cells.items()):
        for r in rs:
            ax.scatter(r["seconds"], r["quality"], label=r["method"], s=30,
                       marker="*" if r["method"].startswith("kvant") else "o")
        ax.set_xscale("log")
        ax.set_title(f"{key[0]} {key[1]}×{key[2]} K={key[3]} {key[4]}", fontsize=8)
        ax.set_xlabel("seconds (log)", fontsize=7)
        ax.set_ylabel("MSE/row" if key[4] == "l2" else "mean cosine", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=90)


def this_run() -> str:
    """When and from which commit this process measures (rows carry it, so merged runs stay traceable)."""
    import subprocess

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown commit"
    return f"{time.strftime('%Y-%m-%d %H:%M')} at {rev}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slow-repeats", type=int, default=1, help="repeats for anchors estimated to take > 20 s")
    p.add_argument("--slow-budget", type=float, default=60.0,
                   help="skip FAISS no-subsample where one run is estimated to take longer (seconds)")
    p.add_argument("--sklearn-budget", type=float, default=30.0,
                   help="skip scikit-learn KMeans where one run is estimated to take longer (seconds)")
    p.add_argument("--repeat-cap", type=float, default=10.0,
                   help="anchors other than kvant auto / FAISS default run once when their first run takes longer")
    p.add_argument("--methods", default="kvant auto,kvant minibatch,faiss default,faiss no-subsample,"
                   "sklearn KMeans,sklearn MiniBatch", help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--out", default="clustering")
    p.add_argument("--resume", default=None, help="a .json/.partial.json whose rows are kept (cells run elsewhere)")
    p.add_argument("--from-json", action="store_true", help="rewrite the .md and .png from the saved .json")
    p.add_argument("--only", default=None, help="comma-separated dataset names to run (default: all)")
    p.add_argument("--ks", default=None, help="comma-separated K values to run (default: the grid's)")
    p.add_argument("--metrics", default=None, help="comma-separated metrics to run, l2 and/or cos (default: both)")
    p.add_argument("--replace", action="store_true",
                   help="with --resume: re-measure --methods on the selected cells, keeping the resumed rows of "
                        "other methods (each row records the run it came from)")
    args = p.parse_args(argv)

    if args.from_json:
        res = json.loads((RESULTS / f"{args.out}.json").read_text())
        res["verdicts"] = assess(res["rows"])
        write_markdown(res, RESULTS / f"{args.out}.md")
        plot(res, RESULTS / f"{args.out}.png")
        return

    import faiss
    from threadpoolctl import threadpool_limits

    # kvant caps the count at NUMBA_NUM_THREADS: every other library, and the record, get the count it really uses
    threads = kvant.set_num_threads(args.threads)
    faiss.omp_set_num_threads(threads)
    threadpool_limits(threads)  # sklearn's OpenMP and BLAS
    methods = args.methods.split(",")
    # Warm the JIT so no timed run pays for compilation.
    warm = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    for alg in ("auto", "dense-exact-random", "minibatch"):
        for metric in ("l2", "cos"):
            kvant.Clusterer(k=4, metric=metric, algorithm=alg).fit(warm)

    rows = json.loads(Path(args.resume).read_text())["rows"] if args.resume else []
    RESULTS.mkdir(exist_ok=True)
    t_all = time.perf_counter()
    cells = []
    for ds, n, dim, k_true, ks, metrics in grid(args.quick):
        if args.only and ds not in args.only.split(","):
            continue
        if args.ks:
            ks = [k for k in ks if str(k) in args.ks.split(",")]
        if args.metrics:
            metrics = [mt for mt in metrics if mt in args.metrics.split(",")]
        cells += [(ds, n, dim, k_true, k, metric) for k in ks for metric in metrics]
    # Real data first, then the synthetic cells K by K, so a run cut short still covers every family.
    cells.sort(key=lambda c: (c[1] is not None, c[4] if c[1] is not None else 0))
    loaded = (None, None, None)
    if args.replace and any(m in methods for m in TARGET_METHODS) and not all(m in methods for m in TARGET_METHODS):
        p.error(f"--replace must re-measure {' and '.join(TARGET_METHODS)} together (the targets compare them)")
    if args.replace:
        selected = {(c[0], c[4], c[5]) for c in cells}
        rows = [r for r in rows if not ((r["dataset"], r["k"], r["metric"]) in selected and r["method"] in methods)]
    done = {(r["dataset"], r["n"], r["k"], r["metric"], r["method"]) for r in rows}
    run_id = this_run()
    for ds, n, dim, k_true, k, metric in cells:
        if n is not None and all((ds, n, k, metric, m) in done for m in methods):
            continue  # already measured (--resume); skip before paying for the data
        if loaded[0] != (ds, n, dim):
            loaded = ((ds, n, dim), *load_dataset(ds, n, dim, k_true))
        x, y = np.ascontiguousarray(loaded[1], dtype=np.float32), loaded[2]
        if k > x.shape[0]:
            continue
        todo = [m for m in methods if (ds, x.shape[0], k, metric, m) not in done]
        if not todo:
            continue  # already measured (--resume)
        print(f"{ds} {x.shape[0]}x{x.shape[1]} K={k} {metric}", flush=True)
        with cell_lock():  # other timed jobs on the machine may run between cells, never during one
            new = bench_cell(ds, x, y, k, metric, todo, args.repeats, args.slow_repeats,
                             args.slow_budget, args.sklearn_budget, args.repeat_cap)
        rows += [{**r, "run": run_id} for r in new]
        (RESULTS / f"{args.out}.partial.json").write_text(json.dumps({"rows": rows}))
    loaded = x = None  # free the last cell's data before the end-to-end runs
    res = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "threads": threads,
        "numba_threading_layer": numba_threading_layer(),
        "repeats": args.repeats,
        "versions": {"kvant": kvant.__version__, "numpy": np.__version__, "faiss": faiss.__version__},
        "rows": rows,
        "verdicts": assess(rows),
    }
    print("FLOP rate of the fused assignment:", flush=True)
    with cell_lock():
        res["flops"] = flop_rate([(200_000, 128, 256), (200_000, 128, 1024), (100_000, 384, 256), (70_000, 784, 64)]
                                 if not args.quick else [(50_000, 64, 64)])
    if not args.no_e2e:
        n = 1_000_000 if not args.quick else 100_000
        with cell_lock():
            res["end_to_end"] = [end_to_end(n, 128, 256, "auto", threads),
                                 end_to_end(n, 128, 256, "minibatch", threads)]
    res["total_seconds"] = time.perf_counter() - t_all
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, RESULTS / f"{args.out}.md")
    plot(res, RESULTS / f"{args.out}.png")
    print(f"wrote {RESULTS / args.out}.{{json,md,png}} in {res['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
