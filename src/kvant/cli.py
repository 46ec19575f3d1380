"""The ``kvant`` command: cluster, index, search, bench, demo, info.

Exit codes: 0 ok, 1 runtime error, 2 bad usage or input (141 when stdout is closed early, as by ``| head``).
``--json`` prints one JSON document on stdout; ``--quiet`` (or a non-TTY stderr) turns progress bars off.
``KVANT_DEBUG=1`` shows the traceback of an unexpected error instead of one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np

from .errors import InvalidInput, KvantError, PersistError
from .io._paths import names_a_directory

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a tool killed by SIGPIPE reports when its reader went away

# Each section below defines its subcommands and appends an ``add(subparsers)`` function here.
_ADDERS: list[Callable] = []


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 itself; raise so main() owns every exit path
        raise _UsageError(f"{self.prog}: {message}")


def progress_enabled(args) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def progress(args, total: int | None = None, desc: str = ""):
    """A tqdm bar on stderr, disabled when quiet or not a TTY."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not progress_enabled(args), file=sys.stderr, leave=False)


def _bar_update(args, bar):
    """A ``progress(phase, amount)`` callback advancing ``bar``, or None when no bar is shown (the work then runs in
    one piece)."""
    return (lambda phase, amount: bar.update(amount)) if progress_enabled(args) else None


_WRITTEN_KEYS = ("labels_file", "centroids_file", "model_file", "output", "index_file", "tree_file")


def emit(args, payload: dict, text: str | None = None) -> None:
    """Print ``payload`` as JSON with --json, else ``text`` (or a key: value listing).

    JSON output is strict: NaN and ±inf (padding slots in k-NN results) are written as ``null``."""
    if getattr(args, "json", False):
        print(json.dumps(_jsonable(payload), indent=2, allow_nan=False))
    elif text is not None:
        # the files written, by the names they got (-o labels.txt writes labels.txt.npy: a review found it unsaid)
        written = [str(payload[key]) for key in _WRITTEN_KEYS if payload.get(key) and str(payload[key]) not in text]
        print(text + "".join(f"\nwrote {name}" for name in written))
    else:
        for key, value in payload.items():
            print(f"{key}: {value}")


def _jsonable(obj):
    """``obj`` with NumPy values turned into plain Python ones and non-finite floats into None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def _same_file(a, b) -> bool:
    """True when paths ``a`` and ``b`` name one file (the same inode when both exist, else the same resolved path)."""
    from pathlib import Path

    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError):
        return False


def _inside_dir(path, directory) -> bool:
    """True when ``directory`` is a directory and ``path`` lies in it (at any depth), symlinks resolved."""
    from pathlib import Path

    try:
        return os.path.isdir(directory) and Path(directory).resolve() in Path(path).resolve().parents
    except (OSError, ValueError):
        return False


def _output_file(path, suffix: str | None = None, others=(), what: str = "output") -> str:
    """``path`` as the writer will name it (``suffix`` appended when missing, as np.save / np.savez do);
    InvalidInput if it cannot be written or names the same file as one of ``others`` (``(label, path)`` pairs:
    the inputs, and the outputs already checked). Called before the work, so a bad path costs nothing and no
    output is written when another one could not be."""
    try:
        return _checked_output(path, suffix, others, what)
    except OSError as exc:  # e.g. a name too long for the file system: is_dir() raises on Python 3.11
        raise InvalidInput(f"{what} {os.fspath(path)} cannot be written: {exc.strerror or exc}") from None


def _checked_output(path, suffix, others, what) -> str:
    import tempfile
    from pathlib import Path

    text = os.fspath(path)
    out = Path(path)
    if out.is_dir():  # np.save would quietly write "<dir>.npy" beside it
        raise InvalidInput(f"{what} {out} is a directory; give a file name")
    if names_a_directory(text):  # "new/" or "new/." would become the file "new.npy"
        raise InvalidInput(f"{what} {text} names a directory (it ends with a slash or a dot); give a file name")
    if suffix and out.suffix != suffix:
        out = out.with_name(out.name + suffix)
    if out.is_dir():
        raise InvalidInput(f"{what} {out} is a directory")
    if not out.parent.is_dir():
        state = "is not a directory" if out.parent.exists() else "does not exist"
        raise InvalidInput(f"{what} directory {out.parent} {state}")
    for label, other in others:
        if other is not None and _same_file(out, other):
            raise InvalidInput(f"{what} {out} is the same file as {label} {other}; writing it would destroy it")
        if other is not None and _inside_dir(out, other):  # a parquet directory reads every file in it
            raise InvalidInput(f"{what} {out} is inside {label} {other}; it would replace or join the data read")
    if os.path.lexists(out) and not out.is_file():
        raise InvalidInput(f"{what} {out} exists and is not a regular file")
    # the writers create a file in this directory (np.save, a log) or a temp file they rename (kvant.persist):
    # probe both now; access() also answers for immutable files and read-only file systems, even to root
    try:
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".kvant-probe-"):
            pass
    except OSError as exc:
        raise InvalidInput(f"{what} {out} cannot be written: no new file can be created in {out.parent} "
                           f"({exc.strerror or exc})") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise InvalidInput(f"{what} {out} cannot be written: the file is read-only")
    return str(out)


def _load_object(path: str, **kw):
    """A saved kvant object given as input: a missing or damaged file is bad input (exit 2), not a runtime error."""
    from .persist import load

    try:
        return load(path, **kw)
    except PersistError as exc:
        raise InvalidInput(str(exc)) from exc


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for kernels and BLAS (default: KVANT_NUM_THREADS when set, else all cores)")


# ----------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------


def _cmd_info(args) -> int:
    import platform

    import numba
    import pyarrow

    from . import __version__
    from ._config import get_num_threads
    from ._parallel import numba_threading_layer

    try:
        from numba.misc.numba_sysinfo import get_sysinfo

        simd = get_sysinfo().get("CPU Features", "")
        cpu_name = get_sysinfo().get("CPU Name", "")
    except Exception:  # sysinfo layout varies across numba releases
        simd, cpu_name = "", ""
    flags = set(str(simd).split())
    level = next((lv for lv in ("avx512f", "avx2", "avx", "sse4.2", "neon") if lv in flags), "baseline")
    payload = {
        "kvant": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "pyarrow": pyarrow.__version__,
        "threads": get_num_threads(),
        "cpu": cpu_name,
        "simd_level": level,
        "simd_features": sorted(f for f in flags if f.startswith(("avx", "sse", "fma", "f16c", "neon", "amx"))),
        # k-means assignments with K >= AMX_MIN_K and K·D >= AMX_MIN_KD (kvant.cluster.assign) use certified bf16 tile
        # products when this is true (docs/auto.md)
        "amx_tiles": _amx_available(),
        # final k-means assignments with K >= I16_MIN_K (on Zen 4: and a large enough K·D) use certified int16
        # products when this is true (docs/auto.md)
        "int16_assign": _int16_available(),
        # the fused K <= 64 assignment prefetches its rows (AMD Zen hosts; kernels/direct_assign, docs/auto.md)
        "row_prefetch": _row_prefetch(),
        # Numba's threading layer; per-step parallel regions (k-means++ seeding) are used on "omp" only
        "numba_threading_layer": numba_threading_layer(),
        "optional": _optional_versions(),
    }
    emit(args, payload)
    return EXIT_OK


def _amx_available() -> bool:
    from .kernels import amx_assign

    return bool(amx_assign.AVAILABLE)


def _row_prefetch() -> bool:
    from .kernels import direct_assign

    return bool(direct_assign.AVAILABLE and direct_assign.PREFETCH_ROWS)


def _int16_available() -> bool:
    from .cluster import assign

    return bool(assign.I16_ASSIGN and assign.I16_HOST)


def _optional_versions() -> dict:
    """Versions of the optional packages kvant uses when present (None when missing)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("dask", "distributed", "h5py", "faiss-cpu", "scikit-learn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, threads and the SIMD level Numba sees")
    _common(p)
    p.set_defaults(func=_cmd_info)


_ADDERS.append(_add_info)


# --- cluster + demo (issue 2) ---


def _v_measure(labels_true, labels_pred):
    """scikit-learn's V-measure when it is installed (the bench/dev extras), else None."""
    try:
        from sklearn.metrics import v_measure_score
    except ImportError:
        return None
    return float(v_measure_score(labels_true, labels_pred))


def _load_init(path: str) -> np.ndarray:
    """The initial centres of ``--init``: a (k, dim) array in a .npy file (shape and values are checked by the fit)."""
    try:
        arr = np.load(path, allow_pickle=False)
        if not isinstance(arr, np.ndarray):  # an .npz archive loads as a mapping of arrays
            arr.close()
            raise ValueError("it is an .npz archive; save the centres alone with np.save")
        return arr
    except (OSError, ValueError, EOFError) as exc:
        why = "not a .npy array file: NumPy could read it only as a pickle, which kvant never loads" \
            if "pickle" in str(exc) else exc
        raise InvalidInput(f"--init {path}: not a readable .npy array of initial centres ({why})") from None


def _cmd_cluster(args) -> int:
    import time

    from .cluster import Clusterer

    t0 = time.perf_counter()
    init = _load_init(args.init) if args.init else None
    c = Clusterer(k=args.k, metric=args.metric, algorithm=args.algorithm, seed=args.seed, max_iter=args.max_iter,
                  sampling=args.sampling, polish_iter=args.polish_iter, overrelax=args.overrelax, init=init)
    bars = {}

    def report(phase: str, amount: int) -> None:
        if phase not in bars:  # one bar per phase: Lloyd iterations, then rows assigned
            for bar in bars.values():
                bar.close()
            unit = "it" if phase == "train" else "rows"
            total = args.max_iter if phase == "train" else None
            bars[phase] = progress(args, total=total, desc=f"k-means {phase}")
            bars[phase].unit = unit
        bars[phase].update(amount)

    # the file names np.save really writes (it appends .npy), checked before the fit rather than after it
    inputs = [("the input", path) for path in args.input] + ([("--init", args.init)] if args.init else [])
    if args.output:
        args.output = _output_file(args.output, ".npy", inputs, what="-o")
    if args.centroids:
        args.centroids = _output_file(args.centroids, ".npy", inputs + [("-o", args.output)], what="--centroids")
    if args.model:
        if args.dask:
            raise InvalidInput("--model saves a kvant.Clusterer; a --dask fit is not one (use -o and --centroids)")
        args.model = _output_file(args.model, None, inputs + [("-o", args.output), ("--centroids", args.centroids)],
                                  what="--model")
    if args.dask:
        return _cluster_dask(args, t0, init)
    if len(args.input) > 1:
        raise InvalidInput("several inputs are clustered together only with --dask (one input file otherwise)")
    args.input = args.input[0]
    try:
        c.fit(args.input, column=args.column, progress=report)
    finally:
        for bar in bars.values():
            bar.close()
    wall = time.perf_counter() - t0
    payload = {
        "input": str(args.input),
        "n": c.n_samples_fit_,
        "dim": c.n_features_in_,
        "k": args.k,
        "metric": args.metric,
        "algorithm": c.algorithm_,
        "auto_reason": c.auto_reason_,
        "sampling": c.sampling_,
        "polish_iter": c.polish_iter_,
        "overrelax": c.overrelax_,
        "max_iter": c.max_iter_,
        "n_iter": c.n_iter_,
        "inertia": c.inertia_,
        "seconds": wall,
        "timings": c.timings_,
        "cluster_sizes": np.bincount(c.labels_, minlength=args.k).tolist(),
    }
    payload["mse" if args.metric == "l2" else "mean_cosine"] = c.mse_ if args.metric == "l2" else c.mean_cosine_
    _write_cluster_outputs(args, c.labels_, c.cluster_centers_, payload)
    if args.model:
        c.save(args.model)
        payload["model_file"] = str(args.model)
    quality = f"MSE/row {c.mse_:.6g}" if args.metric == "l2" else f"mean cosine {c.mean_cosine_:.6f}"
    text = (
        f"{c.n_samples_fit_} x {c.n_features_in_} -> k={args.k} with {c.algorithm_} ({c.auto_reason_})\n"
        f"{quality}, {c.n_iter_} iterations, {wall:.2f} s"
    )
    emit(args, payload, text)
    return EXIT_OK


def _write_cluster_outputs(args, labels, centres, payload: dict) -> None:
    """Save -o labels and --centroids (paths checked before the fit) and name them in the JSON payload."""
    if args.output:
        _save_npy(args.output, labels)
        payload["labels_file"] = str(args.output)
    if args.centroids:
        _save_npy(args.centroids, centres)
        payload["centroids_file"] = str(args.centroids)


def _save_npy(path, array=None, **arrays) -> None:
    """np.save (or, with keyword arrays, np.savez) to ``path`` (already given its suffix by _output_file),
    complete or not at all: a failed write leaves an existing file there as it was."""
    from .io._atomic import replacing

    try:
        with replacing(path) as fh:
            if arrays:
                np.savez(fh, **arrays)
            else:
                np.save(fh, array)
    except OSError as exc:  # (a runtime failure, exit 1, as main treats OSError; named by its file)
        raise OSError(f"cannot write {path}: {exc}") from exc


def _cluster_dask(args, t0: float, init: np.ndarray | None) -> int:
    """``kvant cluster --dask``: DaskClusterer over the input files (a parquet directory counts as its files), from
    the initial centres ``init`` (``--init``, already read) when given."""
    import time

    from .distributed import DaskClusterer
    from .distributed.kmeans import files_as_dask_array, input_files

    if args.algorithm != "auto" or args.sampling != "coreset" or args.column is not None:
        raise InvalidInput("--dask trains as auto on a uniform sample: --algorithm, --sampling and --column "
                           "do not apply")
    # each file of each input (a directory's parts), empty ones skipped; a missing or unreadable input is named here,
    # before any worker starts
    parts = input_files(args.input)  # (opened once: fit gets their array, not the paths to open again)
    files = [path for path, _, _ in parts]
    try:
        import distributed
    except ImportError as exc:
        raise InvalidInput("--dask needs Dask: pip install 'kvant[dask]'") from exc
    import dask

    # Not the process's default client: a Client that fails to connect has already made itself the default
    # scheduler and stays alive in the traceback, so later .compute() calls in the process would wait on it forever.
    # The work below names the client explicitly instead.
    if args.dask != "local":  # a Client that fails to parse its address hangs the interpreter's exit for ~60 s
        _check_dask_address(args.dask)
    rows = files_as_dask_array(parts)
    with _quiet_distributed_logs():
        try:
            client = (distributed.Client(processes=False, dashboard_address=None, set_as_default=False)
                      if args.dask == "local" else distributed.Client(args.dask, set_as_default=False))
        except (ValueError, TypeError) as exc:  # what the check above cannot see
            raise _bad_dask_address(args.dask, exc) from None
        with client, dask.config.set(scheduler=client):
            c = DaskClusterer(k=args.k, metric=args.metric, seed=args.seed, max_iter=args.max_iter,
                              polish_iter=args.polish_iter or 0, overrelax=args.overrelax, init=init).fit(rows)
            labels = c.labels_.compute() if args.output else None
    wall = time.perf_counter() - t0
    quality_key, quality = ("mse", c.mse_) if args.metric == "l2" else ("mean_cosine", c.mean_cosine_)
    payload = {"input": files, "n": c.n_samples_fit_, "dim": c.n_features_in_, "k": args.k, "metric": args.metric,
               "algorithm": "dask", "scheduler": args.dask, "polish_iter": args.polish_iter or 0, "n_iter": c.n_iter_,
               "inertia": c.inertia_, quality_key: quality, "seconds": wall, "cluster_sizes": c.counts_.tolist()}
    _write_cluster_outputs(args, labels, c.cluster_centers_, payload)
    text = (f"{c.n_samples_fit_} x {c.n_features_in_} -> k={args.k} on Dask ({args.dask}, {len(files)} files)\n"
            f"{quality_key} {quality:.6g}, {c.n_iter_} iterations, {wall:.2f} s")
    emit(args, payload, text)
    return EXIT_OK


def _check_dask_address(address: str) -> None:
    """InvalidInput unless ``address`` parses as a scheduler address (a known protocol; host:port for tcp/tls),
    checked before a Client exists: one built on a bad address survives in the exception and its close at exit
    waits ~60 s for a connection that never was."""
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port
    from distributed.comm.registry import get_backend

    try:
        protocol, location = parse_address(address)
        get_backend(protocol)
        if protocol == "inproc":  # (a scheduler inside another process is out of reach: Client raised, then hung)
            raise ValueError("an inproc:// scheduler lives in its own process; this command cannot reach it")
        if protocol in ("tcp", "tls"):
            host, port = parse_host_port(location)
            if not host or not 0 < int(port) < 65536:
                raise ValueError(f"host {host!r} and port {port} do not name a TCP endpoint")
    except (ValueError, TypeError) as exc:  # "missing port number in address", an unknown protocol, ...
        raise _bad_dask_address(address, exc) from None


def _bad_dask_address(address: str, exc: Exception) -> InvalidInput:
    return InvalidInput(f"--dask {address!r} is not a scheduler address ({exc}); give one such as tcp://host:8786, "
                        "or 'local'")


@contextlib.contextmanager
def _quiet_distributed_logs():
    """Silence Dask's ``distributed`` loggers for the CLI's client: a task that fails on bad input is reported
    once, as kvant's one-line error, not also as a worker's "Compute Failed ... Traceback". Restored after."""
    import logging

    names = ["distributed"] + [n for n in logging.root.manager.loggerDict if n.startswith("distributed.")]
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _cmd_demo(args) -> int:
    import time

    from .bench.datasets import demo_dataset
    from .cluster import Clusterer

    x, y = demo_dataset(seed=args.seed)
    k = int(y.max()) + 1
    rows = []
    for algorithm in ("auto", "dense-exact-random", "minibatch"):
        t = time.perf_counter()
        c = Clusterer(k=k, metric="l2", algorithm=algorithm, seed=args.seed).fit(x)
        rows.append(
            {
                "algorithm": algorithm if algorithm != "auto" else f"auto -> {c.algorithm_}",
                "seconds": time.perf_counter() - t,
                "mse": c.mse_,
                "v_measure": _v_measure(y, c.labels_),
            }
        )
    lines = [
        f"kvant demo: built-in dataset {x.shape[0]} x {x.shape[1]}, k={k}, metric=l2 (first run includes JIT)",
        f"{'algorithm':<34}{'seconds':>9}{'MSE/row':>12}{'V-measure':>11}",
    ]
    for r in rows:
        vm = "n/a" if r["v_measure"] is None else f"{r['v_measure']:.4f}"
        lines.append(f"{r['algorithm']:<34}{r['seconds']:>9.2f}{r['mse']:>12.5f}{vm:>11}")
    emit(args, {"n": x.shape[0], "dim": x.shape[1], "k": k, "results": rows}, "\n".join(lines))
    return EXIT_OK


def _add_cluster(sub) -> None:
    from .cluster import available_algorithms, available_metrics

    p = sub.add_parser("cluster", help="k-means cluster a vector file (.npy, .fvecs, parquet, hdf5)")
    p.add_argument("input", nargs="+", help="vectors: .npy, .fvecs/.bvecs, parquet file or directory, .hdf5 "
                                            "(several files only with --dask)")
    p.add_argument("-k", type=int, required=True, help="number of clusters")
    p.add_argument("--metric", default="l2", choices=available_metrics(), help="(default %(default)s)")
    p.add_argument("--algorithm", default="auto", choices=available_algorithms(), help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.add_argument("--max-iter", type=int, default=None,
                   help="Lloyd iterations at most (default: the algorithm's; auto 15, the others 25)")
    p.add_argument("--sampling", default="coreset", choices=["coreset", "uniform"],
                   help="training sample: weighted lightweight coreset (default) or uniform rows (FAISS's)")
    p.add_argument("--column", default=None, help="parquet column / HDF5 dataset holding the vectors")
    p.add_argument("-o", "--output", default=None,
                   help="write labels (int64) to this .npy file ('.npy' is appended when missing)")
    p.add_argument("--centroids", default=None, help="write centroids (float32) to this .npy file")
    p.add_argument("--model", default=None,
                   help="save the fitted clusterer to this kvant file (kvant.load(path) predicts with it)")
    p.add_argument("--dask", default=None, metavar="SCHEDULER",
                   help="cluster on Dask (kvant.distributed): a scheduler address, or 'local' for a local cluster; "
                        "the input files must be readable by the workers")
    p.add_argument("--polish-iter", type=int, default=None,
                   help="Lloyd passes over all rows after training on the sample (default: the algorithm's; auto: 0); "
                        "inputs held in memory only (arrays, float32 .npy, files within KVANT_MEMORY_BUDGET), "
                        "streamed ones report 0")
    p.add_argument("--init", default=None, metavar="CENTRES.npy",
                   help="start from these centres, a (k, dim) .npy array (e.g. an earlier --centroids output) "
                        "instead of seeding")
    p.add_argument("--overrelax", type=float, default=None, metavar="BETA",
                   help="max over-relaxation of Lloyd's steps, 0 = classic Lloyd (default: auto 1.0, others 0)")
    _common(p)
    p.set_defaults(func=_cmd_cluster)

    d = sub.add_parser("demo", help="cluster a built-in dataset with auto and two concrete algorithms")
    d.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    _common(d)
    d.set_defaults(func=_cmd_demo)


_ADDERS.append(_add_cluster)

# --- index + search + bench kernels (issue 3) ---
# `kvant bench ...`: one `bench` parser whose actions come from _BENCH_ADDERS (other sections may append).
_BENCH_ADDERS: list[Callable] = []


def _cmd_bench_kernels(args) -> int:
    from pathlib import Path

    from ._config import check_seed
    from .bench.kernels import DEFAULT_RESULTS, run

    check_seed(args.seed)  # a negative seed failed inside the harness, reported as a kernel correctness failure
    results = None
    if args.results is None and not args.no_results and not DEFAULT_RESULTS.parent.is_dir():
        # outside a kvant checkout: run, and say where a row would go (a given --results must be writable)
        print(f"kvant: not recording a results row ({DEFAULT_RESULTS.parent}/ does not exist here; give --results)",
              file=sys.stderr)
    elif not args.no_results:  # checked before the harness runs, as every output (the harness would mkdir it)
        results = _output_file(args.results or DEFAULT_RESULTS, what="--results")
        if not args.quick and not args.no_speed:  # a full run also writes its tables beside the TSV
            _output_file(Path(results).with_suffix(".md"), others=[("--results", results)], what="--results tables")
    quiet_log = (lambda s: None) if args.json else print
    out = run(quick=args.quick, seed=args.seed, speed=not args.no_speed, use_faiss=not args.no_faiss,
              results=results, log=quiet_log)
    if args.json:
        sp = out["speed"]
        payload = {"exit_code": out["exit_code"], "failures": out["failures"], "total_s": out["total_s"],
                   "peak_mib": out["peak_mib"], "results": out.get("results")}
        if sp is not None:
            payload.update({k: sp[k] for k in ("rows", "rows4", "geomean_ns", "ci90", "gbs_geomean", "mem_bw_gbs",
                                               "faiss_ratio_geomean", "faiss_mismatches")})
        emit(args, payload)
    return out["exit_code"]


def _add_bench_kernels(bsub) -> None:
    p = bsub.add_parser("kernels", help="PQ kernel harness: correctness gate vs scalar reference, then speed")
    p.add_argument("--quick", action="store_true", help="small sizes (seconds); for tests and smoke runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-speed", action="store_true", help="correctness phase only")
    p.add_argument("--no-faiss", action="store_true", help="skip the FAISS comparison even if installed")
    p.add_argument("--results", default=None,
                   help="TSV file the run appends a row to (default: benchmarks/results/kernels.tsv when that "
                        "directory exists here, as in a kvant checkout; otherwise no row is recorded)")
    p.add_argument("--no-results", action="store_true", help="do not append to the results TSV")
    _common(p)
    p.set_defaults(func=_cmd_bench_kernels)


_BENCH_ADDERS.append(_add_bench_kernels)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks and the kernel harness")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT", parser_class=_Parser)
    bsub.required = True
    for add in _BENCH_ADDERS:
        add(bsub)


_ADDERS.append(_add_bench)
# --- end bench kernels (issue 3) ---



def _cmd_index_build(args) -> int:
    import time

    from .index import FlatIndex, PQIndex
    from .io import as_source

    pq_only = {"--m": args.m, "--nbits": args.nbits, "--opq": args.opq or None, "--refine": args.refine,
               "--train-rows": args.train_rows, "--seed": args.seed, "--seeding": args.seeding}
    if args.type == "flat":
        given = [flag for flag, value in pq_only.items() if value is not None]
        if given:  # they would be silently ignored
            raise InvalidInput(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to --type pq, "
                               f"not to --type flat")
    else:
        args.m = 16 if args.m is None else args.m
        args.nbits = 8 if args.nbits is None else args.nbits
        args.refine = 0 if args.refine is None else args.refine
        args.seed = 0 if args.seed is None else args.seed
    args.output = _output_file(args.output, others=[("the input", args.input)])
    src = as_source(args.input, column=args.column)
    t0 = time.perf_counter()
    if args.type == "flat":
        index = FlatIndex(src.dim, metric=args.metric)
    else:
        index = PQIndex(src.dim, m=args.m, nbits=args.nbits, metric=args.metric, opq=args.opq, refine=args.refine,
                        seed=args.seed, max_train_rows=args.train_rows, seeding=args.seeding)
        with progress(args, total=index.codec.train_steps, desc="training") as bar:
            index.train(src, progress=_bar_update(args, bar))
    t_train = time.perf_counter() - t0
    with progress(args, total=src.n, desc="adding") as bar:
        for _, block in src.chunks(65536):
            index.add(block)
            bar.update(block.shape[0])
    index.save(args.output)
    payload = {
        "output": str(args.output),
        "type": args.type,
        "n": len(index),
        "dim": src.dim,
        "metric": args.metric,
        "code_size": getattr(index, "code_size", 4 * src.dim),
        "train_seconds": round(t_train, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
    }
    emit(args, payload, f"built {index!r} -> {args.output} in {payload['total_seconds']} s")
    return EXIT_OK


def _cmd_search(args) -> int:
    import time

    from .io import as_source

    if args.show is not None and args.json:
        raise InvalidInput("--show applies to the text output; --json prints every query's results")
    args.show = 5 if args.show is None else args.show
    if args.show < 0:
        raise InvalidInput(f"--show must be >= 0, got {args.show}")
    if args.output:
        args.output = _output_file(args.output, ".npz", [("the index", args.index), ("the queries", args.queries)])
    index = _load_object(args.index, mmap=args.mmap)
    if not hasattr(index, "search"):
        raise InvalidInput(f"{args.index} holds a {type(index).__name__}, which cannot be searched")
    queries = _one_npy_query(args.queries, args.column)
    if queries is None:
        queries = as_source(args.queries, column=args.column).to_array()
    if queries.shape[0]:  # load the compiled kernels first, so queries/s measures searching, not start-up
        index.search(queries[:1], args.k)
    t0 = time.perf_counter()
    dist, ids = index.search(queries, args.k)
    seconds = time.perf_counter() - t0
    if args.output:
        _save_npy(args.output, distances=dist, ids=ids)
    payload = {"index": str(args.index), "nq": int(ids.shape[0]), "k": args.k, "seconds": round(seconds, 4),
               "queries_per_second": round(ids.shape[0] / max(seconds, 1e-9), 1)}
    if args.json:
        payload.update(ids=ids, distances=dist)
    if args.output:
        payload["output"] = str(args.output)
    lines = [f"{payload['nq']} queries, k={args.k}, {seconds:.3f} s ({payload['queries_per_second']} q/s)"]
    for r in range(min(ids.shape[0], args.show)):
        pairs = " ".join(f"{int(i)}:{float(d):.4g}" for i, d in zip(ids[r], dist[r]))
        lines.append(f"q{r}: {pairs}")
    emit(args, payload, "\n".join(lines))
    return EXIT_OK


def _add_index(sub) -> None:
    p = sub.add_parser("index", help="build searchable indexes")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION", parser_class=_Parser)
    isub.required = True
    b = isub.add_parser("build", help="train an index on vectors, add them and save it")
    b.add_argument("input", help="vectors: .npy, .fvecs/.bvecs, parquet or HDF5")
    b.add_argument("-o", "--output", required=True, help="where to write the index")
    b.add_argument("--type", choices=["pq", "flat"], default="pq", help="(default %(default)s)")
    # the PQ-only flags default to None so that --type flat can refuse them when given
    b.add_argument("--m", type=int, default=None, help="PQ sub-quantizers (must divide dim; default 16)")
    b.add_argument("--nbits", type=int, choices=[4, 8], default=None, help="bits per PQ code (default 8)")
    b.add_argument("--metric", choices=["l2", "ip", "cos"], default="l2", help="(default %(default)s)")
    b.add_argument("--opq", action="store_true", help="learn an OPQ rotation (pq)")
    b.add_argument("--refine", type=int, default=None,
                   help="keep raw vectors and re-rank refine*k candidates (pq; default 0)")
    b.add_argument("--train-rows", type=int, default=None,
                   help="PQ training sample size (default 256 per codeword)")
    b.add_argument("--column", default=None, help="parquet column / HDF5 dataset")
    b.add_argument("--seed", type=int, default=None, help="PQ training seed (pq; default 0)")
    b.add_argument("--seeding", choices=["k-means++", "random"], default=None,
                   help="codebook seeding (pq; default random at 8 bits, k-means++ at 4: see kvant.PQIndex)")
    _common(b)
    b.set_defaults(func=_cmd_index_build)


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="k-nearest-neighbour search in a saved index")
    p.add_argument("index", help="a file written by `kvant index build`")
    p.add_argument("queries", help="query vectors: .npy, .fvecs/.bvecs, parquet or HDF5")
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default %(default)s)")
    p.add_argument("--column", default=None, help="parquet column / HDF5 dataset of the queries")
    p.add_argument("-o", "--output", default=None,
                   help="write distances and ids to this .npz file ('.npz' is appended when missing)")
    p.add_argument("--show", type=int, default=None,
                   help="print the results of the first SHOW queries (default 5; not with --json)")
    p.add_argument("--mmap", action="store_true", help="memory-map the index instead of reading it")
    _common(p)
    p.set_defaults(func=_cmd_search)


_ADDERS.append(_add_index)
_ADDERS.append(_add_search)

# --- tree (issue 4) ---


def _plain_npy(path: str, column: str | None) -> bool:
    """Whether ``path`` is read as a .npy file of its own (the suffix in any case, as kvant.io.as_source takes it)."""
    from pathlib import Path

    return column is None and Path(path).suffix.lower() == ".npy"


def _one_npy_query(path: str, column: str | None) -> np.ndarray | None:
    """A 1-D .npy file as one query (1, dim), as ``index.search(vector)`` and ``kvant tree knn`` take it; None for
    any other file (read by kvant.io.as_source, which checks it)."""
    if not _plain_npy(path, column):
        return None
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None  # (as_source reports it)
    if arr.ndim != 1:
        return None
    from .io import as_source

    return as_source(np.asarray(arr).reshape(1, -1), name=path).to_array()


def _tree_load_points(path: str, column: str | None = None, coordinates: bool = True) -> np.ndarray:
    """Points (or, ``coordinates=False``, a residual tree's row indices) from a file. A .npy keeps its float64
    precision, but coordinates take only the dtypes kvant.io.as_source takes: never a silent cast of int64."""
    if _plain_npy(path, column):  # keep float64 precision when the file has it
        from .io.source import SUPPORTED_DTYPES

        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
            raise InvalidInput(f"cannot read {path}: {exc}") from exc
        if coordinates and arr.dtype.type not in SUPPORTED_DTYPES:
            names = ", ".join(np.dtype(t).name for t in SUPPORTED_DTYPES)
            raise InvalidInput(f"{path}: dtype {arr.dtype} is not supported (use one of: {names})")
        if coordinates and arr.ndim == 0:
            raise InvalidInput(f"{path} holds a single number (a 0-d array), expected points: a 2-D array (n, dim)")
        return np.asarray(arr)
    from .io import as_source

    return as_source(path, column=column).to_array()


def _check_log_file(args, others) -> None:
    """--log-file is appended to after the work: refuse one that names an input or output (it would corrupt it)."""
    if getattr(args, "log_file", None):
        args.log_file = _output_file(args.log_file, others=others, what="--log-file")


def _tree_log(args, record: dict) -> None:
    """Append one JSON line of per-phase telemetry to --log-file."""
    if getattr(args, "log_file", None):
        with open(args.log_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_jsonable({"time": time.time(), "command": f"tree {args.tree_cmd}", **record}),
                                allow_nan=False) + "\n")


# --metric residual's options, with their defaults (None on the parser, so that naming one with another metric is
# caught rather than ignored)
_RESIDUAL_DEFAULTS = {"kernel": "matern52", "lengthscale": "1.0", "variance": 1.0, "inducing": 512, "jitter": 1e-6,
                      "seed": 0}


def _residual_metric(args, X):
    """(metric, what it was made of) for ``tree build``: the metric's name and None, or for ``--metric residual`` the
    ``kvant.ResidualCorrelation.from_points`` of the points X with the chosen covariance and a dict of its settings.
    Refuses the residual options with any other metric."""
    given = [f"--{name}" for name in _RESIDUAL_DEFAULTS if getattr(args, name) is not None]
    if args.metric != "residual":
        if given:
            raise InvalidInput(f"{', '.join(given)} apply only to --metric residual (the metric is {args.metric})")
        return args.metric, None
    from .tree import RBF, Matern52, ResidualCorrelation

    opts = {name: default if getattr(args, name) is None else getattr(args, name)
            for name, default in _RESIDUAL_DEFAULTS.items()}
    try:  # one lengthscale, or one per coordinate: "0.5" or "0.5,2,1" (from_points checks the count)
        parts = [float(t) for t in str(opts["lengthscale"]).split(",")]
    except ValueError:
        raise InvalidInput(f"--lengthscale must be a number or comma-separated numbers (one per coordinate), got "
                           f"{opts['lengthscale']!r}") from None
    lengthscale = parts[0] if len(parts) == 1 else np.array(parts)
    kernel = (Matern52 if opts["kernel"] == "matern52" else RBF)(lengthscale=lengthscale, variance=opts["variance"])
    metric = ResidualCorrelation.from_points(X, kernel, n_inducing=opts["inducing"], seed=opts["seed"],
                                             jitter=opts["jitter"])
    return metric, {**kernel.spec(), "n_inducing": int(metric.v.shape[1]), "seed": opts["seed"],
                    "points_dim": int(np.shape(X)[1])}


def _cmd_tree_build(args) -> int:
    from .tree import CoverTree

    args.output = _output_file(args.output, others=[("the points", args.points)])
    _check_log_file(args, [("the points", args.points), ("-o", args.output)])
    X = _tree_load_points(args.points, args.column)
    t_metric = time.perf_counter()
    metric, residual = _residual_metric(args, X)
    t_metric = time.perf_counter() - t_metric
    with progress(args, total=int(np.shape(X)[0]), desc="building") as bar:
        tree = CoverTree(metric=metric, base=args.base)
        # the file holds the cover tree, which a fit answering by its kd-tree leaves for later: built here, timed as
        # part of the build (the bar follows whichever builds level by level)
        if residual:  # the points are X's rows, by index: every one
            tree.fit(progress=_bar_update(args, bar))
        else:
            tree.fit(X, progress=None if tree._defers_cover(np.shape(X)[-1]) else _bar_update(args, bar))
        tel = dict(tree.telemetry_)
        built = tree._cover(_bar_update(args, bar), tel)
        if built:
            tel["cover_build"] = built
            tel["total"] = tel.get("total", 0.0) + built
    tree.save(args.output)
    _tree_log(args, tel)
    payload = {"output": args.output, "n": tree.n, "dim": tree.dim, "metric": args.metric,
               "level_base": tree.level_base_, "build_seconds": tel.get("total"), "telemetry": tel}
    if residual:  # its points are row indices: dim is None; say what the metric was made of
        payload["residual"] = {**residual, "metric_seconds": t_metric}
    emit(args, payload, f"built a cover tree of {tree.n} points ({args.metric}, level base {tree.level_base_:g}) in "
                        f"{tel.get('total', 0.0):.3f} s" + (f" (+ {t_metric:.3f} s making the metric)"
                                                             if residual else "")
                        + f" -> {args.output}")
    return EXIT_OK


def _cmd_tree_knn(args) -> int:
    from .tree import CoverTree

    if args.queries == "self" and args.column is not None:
        raise InvalidInput("--column names the queries' column in a file; 'self' queries are the tree's points")
    if args.all and args.queries != "self":
        raise InvalidInput("--all applies only to 'self' queries (every tree point's neighbours among all others)")
    inputs = [("the tree", args.tree)] + ([] if args.queries == "self" else [("the queries", args.queries)])
    if args.output:
        args.output = _output_file(args.output, ".npz", inputs)
    _check_log_file(args, inputs + [("-o", args.output)])
    tree = _load_object(args.tree)
    if not isinstance(tree, CoverTree):
        raise InvalidInput(f"{args.tree} holds a {type(tree).__name__}, expected a CoverTree")
    if args.queries == "self":
        with progress(args, total=tree.n, desc="queries") as bar:
            dist, ids = tree.knn_self(args.k, predecessors=not args.all, progress=_bar_update(args, bar))
        qids = tree.ids_
    else:
        Q = _tree_load_points(args.queries, args.column, coordinates=tree.dim is not None)
        if tree.dim is None:  # residual metric: queries are row indices, which knn validates (integers, 1-D)
            Q = np.asarray(Q)
            Q = Q.reshape(-1) if Q.ndim == 0 or (Q.ndim == 2 and Q.shape[1] == 1) else Q
        elif np.ndim(Q) == 1:  # one query point in a 1-D file, not len(Q) one-dimensional queries
            Q = np.asarray(Q).reshape(1, -1)
        with progress(args, total=len(Q), desc="queries") as bar:
            dist, ids = tree.knn(Q, args.k, progress=_bar_update(args, bar))
        qids = None
    _tree_log(args, tree.telemetry_)
    if args.output:
        arrays = {"distances": dist, "ids": ids}
        if qids is not None:
            arrays["query_ids"] = qids
        _save_npy(args.output, **arrays)
    payload = {"nq": int(dist.shape[0]), "k": args.k, "query_seconds": tree.telemetry_.get("query"),
               "distances": dist, "ids": ids}
    if qids is not None:
        payload["query_ids"] = qids
    if args.json:
        emit(args, payload)
    else:
        print(f"{dist.shape[0]} queries, k={args.k}, {tree.telemetry_.get('query', 0.0):.3f} s"
              + (f" -> {args.output}" if args.output else ""))
        for r in range(min(5, dist.shape[0])):
            print(f"  {r}: ids {ids[r].tolist()} dist {np.round(dist[r], 6).tolist()}")
    return EXIT_OK


def _add_tree(sub) -> None:
    p = sub.add_parser("tree", help="exact k-NN in general metrics with a cover tree")
    tsub = p.add_subparsers(dest="tree_cmd", metavar="TREE_COMMAND", parser_class=_Parser)
    tsub.required = True
    b = tsub.add_parser("build", help="build a cover tree from points (.npy, .fvecs, parquet, hdf5)")
    b.add_argument("points")
    b.add_argument("-o", "--output", required=True, help="where to save the tree (.kvant)")
    b.add_argument("--metric", default="euclidean",
                   choices=["euclidean", "manhattan", "chebyshev", "angular", "residual"],
                   help="(default %(default)s); residual: the residual-correlation distance of a GP predictive "
                        "process on the points (Vecchia neighbour sets), made by ResidualCorrelation.from_points "
                        "with the options below; the tree's points are then the rows' indices")
    r = b.add_argument_group("--metric residual")
    r.add_argument("--kernel", default=None, choices=["matern52", "rbf"],
                   help=f"covariance function (default {_RESIDUAL_DEFAULTS['kernel']})")
    r.add_argument("--lengthscale", default=None,
                   help="a number, or one per coordinate comma-separated "
                        f"(default {_RESIDUAL_DEFAULTS['lengthscale']})")
    r.add_argument("--variance", type=float, default=None,
                   help=f"kernel variance (default {_RESIDUAL_DEFAULTS['variance']:g})")
    r.add_argument("--inducing", type=int, default=None,
                   help="inducing points, a seeded random subset of the rows "
                        f"(default {_RESIDUAL_DEFAULTS['inducing']})")
    r.add_argument("--jitter", type=float, default=None,
                   help=f"relative jitter on K(U, U)'s diagonal (default {_RESIDUAL_DEFAULTS['jitter']:g})")
    r.add_argument("--seed", type=int, default=None,
                   help=f"seed of the inducing points' choice (default {_RESIDUAL_DEFAULTS['seed']})")
    b.add_argument("--base", type=float, default=None,
                   help="level base (default: 1.5 for points of up to 12 coordinates, else 1.3)")
    b.add_argument("--log-file", default=None, help="append per-phase telemetry as JSON lines")
    b.add_argument("--column", default=None, help="parquet column / HDF5 dataset holding the points")
    _common(b)
    b.set_defaults(func=_cmd_tree_build)
    q = tsub.add_parser("knn", help="exact k nearest neighbours from a saved tree")
    q.add_argument("tree")
    q.add_argument("queries", help="query points file, or 'self' for every tree point (Vecchia predecessors)")
    q.add_argument("-k", type=int, default=8, help="neighbours per point (default %(default)s)")
    q.add_argument("--all", action="store_true", help="with 'self': all other points, not only predecessors")
    q.add_argument("-o", "--output", default=None,
                   help="write distances/ids to this .npz file ('.npz' is appended when missing)")
    q.add_argument("--log-file", default=None, help="append per-phase telemetry as JSON lines")
    q.add_argument("--column", default=None, help="parquet column / HDF5 dataset holding the queries")
    _common(q)
    q.set_defaults(func=_cmd_tree_knn)


_ADDERS.append(_add_tree)


_EPILOG = """\
exit codes: 0 ok, 1 runtime error, 2 bad usage or input; errors are one line on stderr.
  141 (128 + SIGPIPE, as other Unix tools): stdout was closed before kvant finished writing
  (e.g. `kvant search ... --json | head -1`); nothing is printed.
environment:
  KVANT_NUM_THREADS=N  threads for kernels and BLAS (--threads overrides it)
  KVANT_DEBUG=1        an internal error (a bug) shows its traceback instead of one line"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvant", description="Cluster, compress and search embedding vectors.", epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"kvant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in _ADDERS:
        add(sub)
    return parser


# options naming files to write (and --init, a file to read: "" must not pass for "not given" either)
_PATH_OPTIONS = ("output", "centroids", "model", "log_file", "results", "init")


def main(argv: list[str] | None = None) -> int:
    # kvant's warnings print as one "kvant: warning:" line. Only the formatting changes: a caller recording
    # warnings (catch_warnings(record=True), pytest) still receives them (replacing showwarning bypassed that).
    original = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = original


# Python's own formatting, for the warnings that are not kvant's (main() swaps warnings.formatwarning for the call)
_PYTHON_FORMAT_WARNING = warnings.formatwarning


def _one_line(message) -> str:
    """A message as one line (a library's text can span several: pyarrow's for a damaged page did)."""
    return " ".join(str(message).split())


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """kvant's warnings as one line, as its errors are; others as Python formats them."""
    from .errors import KvantWarning

    if issubclass(category, KvantWarning):
        return f"kvant: warning: {_one_line(message)}\n"
    return _PYTHON_FORMAT_WARNING(message, category, filename, lineno, line)


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    try:
        # the library only warns about a bad value (and uses every core); --threads overrides the variable
        if os.environ.get("KVANT_NUM_THREADS") and getattr(args, "threads", None) is None:
            from ._config import env_num_threads

            env_num_threads(os.environ["KVANT_NUM_THREADS"])
        if getattr(args, "threads", None) is not None:
            from ._config import set_num_threads

            set_num_threads(args.threads)
        for name in _PATH_OPTIONS:  # ("" was quietly taken as "not given": nothing written, exit 0)
            if getattr(args, name, None) == "":
                raise InvalidInput(f"--{name.replace('_', '-')} is an empty string; give a file name or leave it out")
        if getattr(args, "dask", None) == "":  # (taken as "not given": the fit ran on this machine)
            raise InvalidInput("--dask is an empty string; give 'local' or a scheduler address, or leave it out")
        return int(args.func(args) or 0)
    except InvalidInput as exc:
        print(f"kvant: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KvantError as exc:
        print(f"kvant: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_RUNTIME
    except BrokenPipeError:  # stdout closed early (`kvant ... --json | head -1`): stop quietly, as Unix tools do
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # an output path that cannot be written, a log file in a missing directory, ...
        print(f"kvant: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line, not a traceback (KVANT_DEBUG=1 shows it)
        if os.environ.get("KVANT_DEBUG"):
            raise
        print(f"kvant: internal error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_RUNTIME


def _stdout_to_devnull() -> None:
    """Point stdout's descriptor at /dev/null, so the interpreter's final flush of what could not be written does
    not fail again ("Exception ignored ... BrokenPipeError") on stderr."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (an in-process capture): nothing to flush
        pass


if __name__ == "__main__":
    sys.exit(main())
