"""Reading vectors through kvant.io vs loading the whole file with the format's own library.

For every format, the same 1M x 128 data set (``blobs``, seed 0; float32 unless the format stores
another type) is written once, then, each in a fresh subprocess so that peak RSS is per reader:

- kvant: ``as_source(path)`` and a full ``chunks()`` scan (float32 blocks, NaN-checked), plus
  ``take`` of 10 000 random rows;
- anchor: the format's natural "load everything" call (``np.load``, ``np.fromfile``,
  ``pyarrow.parquet.read_table(...).to_numpy``, ``h5py ds[:]``) converted to float32.

Reported: median seconds of 3 runs, output GB/s (float32 bytes produced per second), and the peak RSS
above the process's baseline after imports during the full reads. (kvant's random ``take`` on a memory
map is not included there: page-fault-around maps neighbouring cached pages, so 10k random rows leave most
of the file's clean, reclaimable page cache mapped; ``peak_rss_mb_after_take`` in the JSON records it.)
Files are read from a warm page cache (they were just written), so the numbers measure decoding and
copying, not the disk.

Usage: flock /tmp/kvant-bench.lock .venv/bin/python benchmarks/io_read.py [--n 1000000]
Writes benchmarks/results/io_read.json, io_read.md, io_read.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ["npy-f32", "npy-f16", "fvecs", "bvecs", "parquet", "parquet-dir", "hdf5"]


def write_all(root: Path, n: int, dim: int) -> dict[str, str]:
    import h5py

    from kvant.bench.datasets import blobs
    from kvant.io import write_bvecs, write_fvecs, write_parquet

    x, _ = blobs(n, dim, 64, seed=0)
    paths = {}
    np.save(root / "x32.npy", x)
    paths["npy-f32"] = str(root / "x32.npy")
    np.save(root / "x16.npy", x.astype(np.float16))
    paths["npy-f16"] = str(root / "x16.npy")
    write_fvecs(root / "x.fvecs", x)
    paths["fvecs"] = str(root / "x.fvecs")
    write_bvecs(root / "x.bvecs", np.clip(x * 20 + 128, 0, 255).astype(np.uint8))
    paths["bvecs"] = str(root / "x.bvecs")
    write_parquet(root / "x.parquet", x, row_group_rows=65536)
    paths["parquet"] = str(root / "x.parquet")
    (root / "parts").mkdir()
    for i, part in enumerate(np.array_split(x, 4)):
        write_parquet(root / "parts" / f"part-{i}.parquet", part, row_group_rows=65536)
    paths["parquet-dir"] = str(root / "parts")
    with h5py.File(root / "x.hdf5", "w") as f:
        f.create_dataset("train", data=x, chunks=(4096, dim))
    paths["hdf5"] = str(root / "x.hdf5")
    return paths


# ------------------------------------------------------------------------------------------------
# child process: one (format, reader) measurement
# ------------------------------------------------------------------------------------------------
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(key)


def _reset_peak() -> None:
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0); ru_maxrss would include the parent's."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def anchor_load(fmt: str, path: str) -> np.ndarray:
    if fmt.startswith("npy"):
        return np.load(path).astype(np.float32, copy=False)
    if fmt == "fvecs":  # one read and one copy (the records without their dim headers): what a user would write
        # (a review: the anchor made two copies, rec.copy() then astype, which doubled its time and peak)
        dim = int(np.fromfile(path, dtype="<i4", count=1)[0])
        return np.ascontiguousarray(np.fromfile(path, dtype="<f4").reshape(-1, dim + 1)[:, 1:])
    if fmt == "bvecs":
        raw = np.fromfile(path, dtype=np.uint8)
        dim = int(raw[:4].view("<i4")[0])
        return raw.reshape(-1, 4 + dim)[:, 4:].astype(np.float32)
    if fmt.startswith("parquet"):
        import pyarrow.parquet as pq

        col = pq.read_table(path).column(0).combine_chunks()
        return col.flatten().to_numpy().reshape(len(col), -1).astype(np.float32, copy=False)
    if fmt == "hdf5":
        import h5py

        with h5py.File(path, "r") as f:
            return f["train"][:].astype(np.float32, copy=False)
    raise AssertionError(fmt)


def child(fmt: str, path: str, reader: str, repeats: int) -> dict:
    import kvant  # noqa: F401  (imports counted in the baseline)
    import kvant.io

    if fmt.startswith("parquet"):
        import pyarrow.parquet  # noqa: F401
    if fmt == "hdf5":
        import h5py  # noqa: F401
    _reset_peak()
    base = _status_mb("VmRSS")
    out = {"format": fmt, "reader": reader}
    times, take_times = [], []
    scan_peak = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        if reader == "kvant":
            src = kvant.io.as_source(path)
            total = 0.0
            rows = 0
            for _, block in src.chunks():
                total += float(block[0, 0])  # touch the block
                rows += block.shape[0]
            n, dim = src.n, src.dim
        else:
            arr = anchor_load(fmt, path)
            rows, dim = arr.shape
            n = rows
            del arr
        times.append(time.perf_counter() - t)
        if not take_times:  # before the first take (whose fault-around maps most of a memmapped file)
            scan_peak = max(scan_peak, _status_mb("VmHWM") - base)
        if reader == "kvant":
            idx = np.random.default_rng(0).choice(n, size=10000, replace=False)
            t = time.perf_counter()
            src.take(idx)
            take_times.append(time.perf_counter() - t)
            if hasattr(src, "close"):
                src.close()
            del src
    out["n"], out["dim"] = int(n), int(dim)
    out["seconds"] = statistics.median(times)
    out["gb_per_s"] = n * dim * 4 / out["seconds"] / 1e9
    out["take_10k_seconds"] = statistics.median(take_times) if take_times else None
    out["peak_rss_mb_above_baseline"] = scan_peak  # during the full reads (before any take)
    out["peak_rss_mb_after_take"] = _status_mb("VmHWM") - base
    return out


# ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=3, metavar=("FORMAT", "PATH", "READER"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.repeats)))
        return

    import kvant

    rows = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        paths = write_all(Path(tmp), args.n, args.dim)
        sizes = {
            f: sum(q.stat().st_size for q in Path(p).rglob("*")) if Path(p).is_dir() else Path(p).stat().st_size
            for f, p in paths.items()
        }
        for fmt in FORMATS:
            for reader in ("kvant", "anchor"):
                cmd = [sys.executable, __file__, "--repeats", str(args.repeats), "--child", fmt, paths[fmt], reader]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                res["file_mb"] = sizes[fmt] / 2**20
                rows.append(res)
                print(
                    f"{fmt:12s} {reader:6s} {res['seconds']:.3f}s {res['gb_per_s']:.2f} GB/s "
                    f"peak +{res['peak_rss_mb_above_baseline']:.0f} MB (file {res['file_mb']:.0f} MB)",
                    flush=True,
                )

    meta = {
        "n": args.n,
        "dim": args.dim,
        "float32_mb": args.n * args.dim * 4 / 2**20,
        "threads": kvant.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "numpy": np.__version__,
        "note": "warm page cache; each reader in its own subprocess; peak RSS above post-import baseline",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "io_read.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"Full read of {args.n:,} x {args.dim} (float32 output {meta['float32_mb']:.0f} MB), "
        f"median of {args.repeats}, warm page cache.",
        "",
        "| format | file MB | kvant chunks() s | kvant GB/s | kvant peak MB | load-all anchor s | anchor GB/s "
        "| anchor peak MB | kvant take(10k) s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["format"], r["reader"]): r for r in rows}
    for fmt in FORMATS:
        k, a = by[(fmt, "kvant")], by[(fmt, "anchor")]
        lines.append(
            f"| {fmt} | {k['file_mb']:.0f} | {k['seconds']:.3f} | {k['gb_per_s']:.2f} | "
            f"{k['peak_rss_mb_above_baseline']:.0f} | {a['seconds']:.3f} | {a['gb_per_s']:.2f} | "
            f"{a['peak_rss_mb_above_baseline']:.0f} | {k['take_10k_seconds']:.3f} |"
        )
    (RESULTS / "io_read.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = np.arange(len(FORMATS))
    for ax, key, title in (
        (axes[0], "gb_per_s", "throughput (GB/s of float32 out)"),
        (axes[1], "peak_rss_mb_above_baseline", "peak RSS above baseline (MB)"),
    ):
        ax.bar(xs - 0.2, [by[(f, "kvant")][key] for f in FORMATS], 0.4, label="kvant chunks()")
        ax.bar(xs + 0.2, [by[(f, "anchor")][key] for f in FORMATS], 0.4, label="load-all anchor")
        ax.set_xticks(xs, FORMATS, rotation=30)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "io_read.png", dpi=110)


if __name__ == "__main__":
    main()
