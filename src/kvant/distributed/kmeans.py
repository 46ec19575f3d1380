"""k-means and PQ encoding over a Dask array of rows.

``DaskClusterer`` follows ``kvant.Clusterer``'s ``auto`` rule, spread over a cluster:

1. a uniform sample of ``sample_per_centroid·K`` rows (unset: ``auto``'s size, max(256·K, N/64) rows, N/64 capped at
   16384·K) is gathered to the client and clustered there with ``kvant.Clusterer`` (k-means++ and Lloyd's until the
   objective improves < ``tol``), exactly as on one machine: the sample is small and training on it is what
   FAISS and ``auto`` do;
2. optionally, ``polish_iter`` Lloyd iterations over *all* rows: each chunk returns its per-cluster sums and
   counts (k×D float64) and its 32 farthest distinct rows with their copy counts, reduced in a tree, so the client
   never holds more than a few k×D arrays; a cluster left empty is re-seeded with the farthest row of a cluster that
   keeps one beyond that row's copies, as ``kvant.Clusterer`` does (rows on their centre and copies of a row already
   taken are skipped; up to 32 per pass; the pass after a re-seed always runs); clusters the final pass finds empty
   raise ``kvant.Clusterer``'s ``EmptyClusterWarning``;
3. one pass over all rows for the exact inertia; ``labels_`` is a lazy Dask array (materialising it costs one
   more assignment pass, on the workers).

The uniform sample replaces the single-machine lightweight coreset, which needs a pass over every row before
training; on data with far outliers carrying the MSE (heavy tails) ``polish_iter`` is the way to reach them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np

from .._config import check_seed, rng
from .._numerics import conditioning
from ..cluster.assign import assign_top2, zero_norm_error
from ..cluster.auto import auto_sample_rows
from ..cluster.clusterer import Clusterer, _warn_empty_clusters
from ..cluster.lloyd import _centroids_from_sums, normalise_rows
from ..cluster.reseed import distinct_far_rows, merge_distinct_far_rows, reseed_picks
from ..errors import DimensionMismatch, EmptyClusterWarning, EmptyIndex, InvalidInput, warn
from ..io import as_source
from ..io.parquet import ParquetSource
from ..io.source import (
    SUPPORTED_DTYPES,
    _bad_row_error,
    _first_bad_row,
    check_finite_rows,
    check_shape_dtype,
    checked_float32,
    default_chunk_rows,
    to_float32,
)
from ..io.source import (
    chunk_rows as checked_chunk_rows,
)
from ..kernels.distance import sq_norms_serial
from ..kernels.lloyd import UNIT_WEIGHTS, cluster_sums
from ..kernels.lloyd_small import tolerance_scale

__all__ = ["DaskClusterer", "as_dask_array", "encode"]

_FAN_IN = 8  # partial results combined per task in the tree reduction


def _dask():
    try:
        import dask
        import dask.array as da
    except ImportError as exc:  # the optional extra
        raise InvalidInput("kvant.distributed needs Dask: pip install 'kvant[dask]'") from exc
    return dask, da


def as_dask_array(x, chunk_rows: int | None = None):
    """``x`` as a 2-D Dask array chunked along rows only (columns in one chunk).

    ``x``: a ``dask.array.Array``; a NumPy array (split into chunks of ``chunk_rows`` rows, default ~64 MiB
    of float32); or a path or list of paths that :func:`kvant.as_source` reads (.npy, parquet, fvecs, HDF5 ...),
    one chunk per file (a parquet directory stands for its files; files with zero rows are skipped), read on the
    workers (the files must be reachable from them, at the same absolute paths: a relative path is made absolute
    here). Their row counts and dimension are read here from the files' headers. Every parquet file is read by the
    first parquet file's vector columns, in its order, as a parquet directory's parts are (InvalidInput when the
    columns are other names). A task refuses a file whose size or modification time changed since.
    """
    dask, da = _dask()
    if isinstance(x, str | os.PathLike):  # one file, or a parquet directory: its files
        x = [x]
    if chunk_rows is not None:  # (0 fell back to the default, "10" gave one-row chunks, -5 a bare ValueError)
        chunk_rows = checked_chunk_rows(chunk_rows, 1)
    paths = isinstance(x, Sequence) and not isinstance(x, str | bytes) and all(
        isinstance(p, str | os.PathLike) for p in x)
    if isinstance(x, np.ma.MaskedArray) or (isinstance(x, da.Array) and isinstance(x._meta, np.ma.MaskedArray)):
        # (np.ndarray and dask arrays pass them: .data would use the masked values as vectors)
        raise InvalidInput("input: masked arrays are not supported; fill (x.filled(v)) or drop the masked rows first")
    if isinstance(x, da.Array):
        arr = x
    elif isinstance(x, np.ndarray):
        if x.ndim != 2:
            raise InvalidInput(f"input: expected a 2-D array (n, dim), got shape {x.shape}")
        rows = min(chunk_rows or default_chunk_rows(max(1, x.shape[1])), max(1, x.shape[0]))
        arr = da.from_array(x, chunks=(rows, -1))
    elif paths:
        arr = files_as_dask_array(input_files(x))
    else:
        raise InvalidInput(f"input: expected a dask.array.Array, a NumPy array or a list of file paths, "
                           f"got {type(x).__name__}")
    if arr.ndim == 2 and any(np.isnan(c) for chunks in arr.chunks for c in chunks):
        raise InvalidInput("input: chunk sizes are unknown; call x.compute_chunk_sizes() first")
    check_shape_dtype(arr.shape, arr.dtype, "input", "array")  # the dtypes as_source accepts, never cast silently
    return arr.rechunk({1: -1}) if len(arr.chunks[1]) > 1 else arr


def input_files(paths) -> list[tuple]:
    """(path, source, column) of each file of ``paths`` with rows: a directory stands for the files its reader reads
    (a parquet directory: its parts, in its order, each read by the directory's columns in the directory's order, as
    its reader reads them: a part storing them in another order had its columns swapped), so each file is a chunk of
    its own; ``column`` is None for a file given by itself. Files with zero rows are skipped, as a parquet directory's
    reader skips its empty parts. Opening each names a missing or unreadable input here, before any task runs.
    InvalidInput when none has rows (or ``paths`` is empty)."""
    if not paths:
        raise InvalidInput("input: an empty list of files")
    files = []
    for path in paths:
        if os.path.isdir(path):
            try:
                src = as_source(path, validate=False)
            except InvalidInput as err:
                if not getattr(err, "zero_rows", False):  # (a directory whose parts are all empty holds no rows)
                    raise
                continue
            column = list(src.columns) if getattr(src, "columns", None) else None
            files += [(str(f), column) for f in getattr(src, "files", [path])]
        else:
            files.append((path, None))
    seen: dict[str, str] = {}
    for path, _ in files:  # the same file twice (a glob and its directory, say) would count its rows twice
        real = os.path.realpath(path)
        if real in seen:
            warn(f"input: {path} is listed more than once (also as {seen[real]}); its rows are used once per listing")
        seen.setdefault(real, str(path))
    out = []
    first = None  # (path, vector columns) of the first parquet file with rows
    for path, column in files:
        try:
            src = as_source(path, column=column, validate=False)
        except InvalidInput as err:
            if not getattr(err, "zero_rows", False):
                raise
            continue
        if isinstance(src, ParquetSource):
            # every parquet file is read by the first one's vector columns, in its order, as a parquet directory's
            # reader reads its parts (a file storing them in another order had its dims permuted, a review), and
            # files whose columns (as ParquetSource chose them) are other names are refused as the directory refuses
            if first is None:
                first = (path, list(src.columns))
            elif list(src.columns) != first[1]:
                if sorted(src.columns) != sorted(first[1]):  # read by name: the order within a file is free
                    raise InvalidInput(
                        f"{path}: its vector columns would be {list(src.columns)}, but {first[0]}'s are {first[1]}; "
                        f"all parquet files of the input must agree, as the files of a parquet directory must")
                column = first[1]
        out.append((path, src, column))
    if not out:  # (a directory whose parts are all empty counts as one input, not as its parts)
        raise InvalidInput(f"input: every file of {', '.join(map(str, paths))} has zero rows")
    return out


def files_as_dask_array(files: list[tuple]):
    """The rows of :func:`input_files`' ``files`` as one Dask array, a chunk per file read on the workers."""
    dask, da = _dask()
    shapes, dtypes = [], []
    for p, src, _ in files:
        if shapes and src.dim != shapes[0][1]:
            raise DimensionMismatch(f"{p}: vectors have dim {src.dim}, the first file has dim {shapes[0][1]}")
        shapes.append((src.n, src.dim))
        dtypes.append(src.dtype)
    # every file as_source accepts is accepted here: its rows are read as one dtype all files convert to
    # exactly (int32 .ivecs values are checked to fit float32 exactly; int8 with uint8 files promote to int16,
    # which no task accepts, so float32)
    dtype = np.result_type(*dtypes)
    if dtype.type not in SUPPORTED_DTYPES:
        dtype = np.dtype(np.float32)
    # absolute paths: a worker resolves a relative one against its own directory, which may hold other files of the
    # same shape (a review: `kvant cluster files/a.npy ...` clustered the worker's files/a.npy, exit 0); the client
    # opened them against its directory just before, in input_files
    paths = [os.path.abspath(os.fspath(p)) for p, _, _ in files]
    parts = [da.from_delayed(dask.delayed(_read_file)(p, dtype, column, _stamp(p)), shape, dtype)
             for p, (_, _, column), shape in zip(paths, files, shapes, strict=True)]
    return da.concatenate(parts, axis=0)


def _stamp(path: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a file: what its task checks before reading it."""
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def _read_file(path: str, dtype, column=None, stamp=None) -> np.ndarray:
    """The file's rows (``column`` as for :func:`kvant.as_source`), as stored or converted exactly to ``dtype`` (the
    files' common dtype). The tasks that use them convert and check them as for any Dask array, so a NaN is named by
    its row in the whole input, not in this file. ``stamp``: the file's :func:`_stamp` when the client opened it; a
    file changed since (rewritten, appended to: its rows are not the ones counted and sampled, and a lazy result
    computed later would mix two versions) is refused by name."""
    if stamp is not None:
        try:
            now = _stamp(path)
        except OSError as err:
            raise InvalidInput(f"{path}: cannot read the input file on this worker: {err.strerror or err}") from None
        if now != tuple(stamp):
            raise InvalidInput(
                f"{path}: the input file changed after it was opened on the client (size {stamp[0]} -> {now[0]} bytes, "
                f"modified time {stamp[1]} -> {now[1]} ns); open the input again (as_dask_array, fit) to use its "
                f"new rows (workers reading their own copies of the files need the same size and modification time)")
    src = as_source(path, column=column)
    return src._read(0, src.n).astype(dtype, copy=False)


def _assign_chunk(block, start, centroids, spherical, what="input"):
    """(float32 rows, labels, exact squared distance of each row to its centre) for one chunk (``what`` names the
    rows in a NaN/inf error)."""
    x = checked_float32(block, start, what)
    b = x.shape[0]
    labels = np.empty(b, np.int64)
    per_row = np.empty(b, np.float64)
    shift, scale = (None, None) if spherical else conditioning(centroids)
    assign_top2(x, centroids, sq_norms_serial(centroids), labels, np.empty(b, np.float32), np.empty(b, np.float32),
                exact_sq=per_row, unit_rows=spherical, row_offset=start, shift=shift, scale=scale)
    return x, labels, per_row


_FAR_ROWS = 32  # farthest rows each polish pass brings back, to re-seed clusters left empty


def _chunk_stats(block, start, centroids, spherical, with_sums):
    """(sums k×D float64 or None, counts k, objective, farthest rows or None) of one chunk: the map step of
    Lloyd's and of the inertia. The farthest rows (``_far_rows``) re-seed empty clusters, as on one machine."""
    x, labels, per_row = _assign_chunk(block, start, centroids, spherical)
    objective = float(per_row.sum()) * (0.5 if spherical else 1.0)  # ½‖u − c‖² = 1 − cos for unit rows
    k = centroids.shape[0]
    if not with_sums:
        return None, np.bincount(labels, minlength=k).astype(np.float64), objective, None
    rows = normalise_rows(x, start) if spherical else x
    sums, counts = cluster_sums(rows, labels, k, 1, UNIT_WEIGHTS)
    return sums, counts, objective, _distinct_far_rows(per_row, start, labels, rows, _FAR_ROWS)


# odd 64-bit multipliers of the rows' 32-bit words: _distinct_far_rows' hash (equal rows hash alike; a collision is
# found and handled exactly)
_HASH_MULT = np.random.default_rng(0x6B76616E74).integers(0, 2**63, 1024, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _distinct_far_rows(per_row, start, labels, rows, count):
    """:func:`kvant.cluster.reseed.distinct_far_rows` of a chunk (what ``kvant.Clusterer`` keeps), the same result in
    a third of its time on a 131072×128 chunk (0.12 s against 0.41 s, next to 0.1 s for the assignment at K = 256):
    every polish pass runs it on every chunk, where Clusterer runs it only when clusters are empty. Its sort of every
    row as a key is run only on the rows that can be among the result, with all their copies: the rows are grouped by
    a 64-bit hash of their words (rows in a group of several are checked equal to its first, and on a collision the
    whole chunk goes to ``distinct_far_rows``), a group ranks by its first row's distance, as there, and the
    ``count`` farthest groups' rows are kept."""
    pos = np.flatnonzero(per_row > 0.0)
    if pos.size <= 8 * count or rows.dtype.itemsize != 4:
        return distinct_far_rows(per_row, start, labels, rows, count)
    picked = rows if pos.size == rows.shape[0] else rows[pos]
    words = np.ascontiguousarray(picked).view(np.uint32)
    mult = np.resize(_HASH_MULT, words.shape[1])
    h = np.empty(pos.size, np.uint64)
    for s in range(0, pos.size, 4096):  # (wrapping uint64 arithmetic; in slices: a uint64 copy of 4096 rows at a time)
        h[s : s + 4096] = words[s : s + 4096].astype(np.uint64) @ mult
    _, first, inv, size = np.unique(h, return_index=True, return_inverse=True, return_counts=True)
    inv = inv.ravel()
    shared = np.flatnonzero(size[inv] > 1)
    if shared.size and not np.array_equal(words[shared], words[first[inv[shared]]]):
        return distinct_far_rows(per_row, start, labels, rows, count)  # two different rows hashed alike
    top = np.lexsort((first, -per_row[pos[first]]))[:count]
    keep = pos[np.isin(inv, top)]
    masked = np.zeros_like(per_row)  # (distinct_far_rows leaves out rows at distance 0)
    masked[keep] = per_row[keep]
    return distinct_far_rows(masked, start, labels, rows, count)


def _far_rows(*fars):
    """The ``_FAR_ROWS`` farthest distinct rows of several chunks' (copies summed), as ``kvant.Clusterer`` keeps them:
    (distance, global row, label, row, copies). Distinct rows: on data with many copies of a row the farthest rows
    were mostly its copies, and one re-seed per pass happened (a review: two of five clusters left empty)."""
    return merge_distinct_far_rows(fars, _FAR_ROWS)


def _combine(*parts):
    sums = None if parts[0][0] is None else np.sum([p[0] for p in parts], axis=0)
    far = None if parts[0][3] is None else _far_rows(*[p[3] for p in parts])  # (the tree's combine step too)
    return sums, np.sum([p[1] for p in parts], axis=0), float(sum(p[2] for p in parts)), far


def _reseed_empty(sums, counts, far, centroids) -> int:
    """Move the farthest rows into empty clusters, as ``kvant.Clusterer`` does (``kernels.lloyd.reseed_empty``; the
    rule: :func:`kvant.cluster.reseed.reseed_picks`), updating ``sums`` and ``counts``. Returns how many were
    re-seeded (at most ``_FAR_ROWS`` per pass; any left empty keep their centre and get the next pass's rows).
    ``far`` holds the distinct rows as the M-step sums them (cos: their float32 unit copies) with their copies: a
    row's cluster must keep a row beyond all of them, and one copy's weight moves (the next E-step moves the rest)."""
    if far is None or not np.any(counts == 0):
        return 0
    picks = reseed_picks(counts, far, centroids)
    for dst, src, row in picks:
        sums[src] -= row
        counts[src] -= 1
        sums[dst] = row
        counts[dst] = 1
    return len(picks)


def _blocks_with_starts(arr):
    """(delayed row block, its first global row) for every chunk of a row-chunked Dask array."""
    starts = np.concatenate([[0], np.cumsum(arr.chunks[0])[:-1]]).astype(np.int64)
    return [(blk, int(s)) for blk, s in zip(arr.to_delayed().ravel(), starts, strict=True)]


def _chunk_first_bad(block, start):
    """Global index of the first row of this chunk that is not finite in float32, or -1."""
    if block.dtype.kind != "f" or block.size == 0:
        return -1
    row = _first_bad_row(to_float32(block))
    return -1 if row < 0 else start + row


def _chunk_first_zero(block, start):
    """Global index of the first row of this chunk with zero norm (no direction for cos), or -1."""
    b = to_float32(block)
    zero = ~(np.einsum("ij,ij->i", b, b, dtype=np.float64) > 0)
    return start + int(np.argmax(zero)) if zero.any() else -1


def _chunk_firsts(block, start, zero):
    """(first row not finite in float32, first zero-norm row when ``zero`` else -1) of this chunk: global rows, -1
    for none."""
    return _chunk_first_bad(block, start), (_chunk_first_zero(block, start) if zero else -1)


def _first_bad_rows_of(arr, zero=False) -> tuple[int | None, int | None]:
    """The first NaN/inf row of the whole Dask array and, with ``zero``, its first zero-norm row (None for none), in
    one pass over its chunks."""
    dask, _ = _dask()
    found = dask.compute(*[dask.delayed(_chunk_firsts, pure=True)(blk, s, zero) for blk, s in _blocks_with_starts(arr)])

    def first(col):
        rows = [int(f[col]) for f in found if f[col] >= 0]
        return min(rows) if rows else None

    return first(0), first(1)


def _chunk_what(start: int, rows: int) -> str:
    """How a lazy task's error names its rows: a chunk of the input, not all of it. Its "first bad row" is its chunk's
    (nothing runs a pass over the other chunks when a lazy result fails, and Dask reports whichever task failed
    first)."""
    return f"the chunk of input rows {start}-{start + rows - 1}"


def _labels_block(block, centroids, spherical, block_info=None):
    start = block_info[0]["array-location"][0][0] if block_info else 0
    what = _chunk_what(start, block.shape[0])
    try:
        return _assign_chunk(block, start, centroids, spherical, what)[1]
    except InvalidInput as exc:
        if not getattr(exc, "zero_norm", False):
            raise
        # named as the NaN error is: this chunk's first zero row, not the input's (no pass over the others runs)
        raise zero_norm_error(_chunk_first_zero(block, start), what) from None


def _pass(arr, centroids, spherical, with_sums):
    """One pass over every chunk: the reduced (sums, counts, objective)."""
    dask, _ = _dask()
    cd = dask.delayed(centroids, pure=True)  # one copy in the graph, shared by every task
    parts = [dask.delayed(_chunk_stats, pure=True)(blk, s, cd, spherical, with_sums)
             for blk, s in _blocks_with_starts(arr)]
    while len(parts) > 1:  # tree reduction: the client receives one result, not one per chunk
        parts = [dask.delayed(_combine, pure=True)(*parts[i : i + _FAN_IN]) for i in range(0, len(parts), _FAN_IN)]
    return dask.compute(parts[0])[0]


class DaskClusterer:
    """k-means over a Dask array of rows, with ``kvant.Clusterer``'s training and kernels on each chunk.

    >>> import numpy as np, dask.array as da, kvant.distributed as kd
    >>> x = da.from_array(np.random.default_rng(0).standard_normal((5000, 8)).astype("float32"), chunks=(1000, 8))
    >>> c = kd.DaskClusterer(k=4, seed=0).fit(x)
    >>> c.cluster_centers_.shape, c.labels_.shape
    ((4, 8), (5000,))

    ``sample_per_centroid``: rows gathered to the client per centre (``None``: ``auto``'s training-sample size,
    max(256·K, N/64) rows; ``sample_rows_`` is the number gathered). ``polish_iter``: Lloyd iterations over all
    rows after training on the sample (0 = as ``auto``; each costs one pass; plain Lloyd steps). Other settings,
    ``overrelax`` and ``init`` (initial centres, a warm start) included, are ``kvant.Clusterer``'s.
    Runs on the current Dask scheduler (a ``distributed.Client`` if one is active).
    """

    def __init__(self, k: int, metric: str = "l2", seed: int | None = 0, *, max_iter: int | None = None,
                 tol: float | None = None, sample_per_centroid: int | None = None, polish_iter: int = 0,
                 overrelax: float | None = None, init=None):
        self.k = k
        self.metric = metric
        self.seed = seed
        self.max_iter = max_iter
        self.tol = tol
        self.sample_per_centroid = sample_per_centroid
        self.polish_iter = polish_iter
        self.overrelax = overrelax
        self.init = init

    def _local(self) -> Clusterer:
        return Clusterer(self.k, self.metric, "auto", self.seed, max_iter=self.max_iter, tol=self.tol,
                         sample_per_centroid=self.sample_per_centroid, polish_iter=0, overrelax=self.overrelax,
                         init=getattr(self, "init", None))

    def fit(self, x) -> DaskClusterer:
        """Cluster ``x`` (see :func:`as_dask_array`). Returns self; state changes only on success.

        NaN or inf anywhere raises ``InvalidInput`` naming the first bad row of the whole input (found by one
        extra pass, run only on that error: the sample and the chunks each see only part of the rows)."""
        local = self._local()
        local._check_settings()
        if isinstance(self.polish_iter, bool) or not isinstance(self.polish_iter, int | np.integer) \
                or self.polish_iter < 0:
            raise InvalidInput(f"polish_iter must be an integer >= 0, got {self.polish_iter!r}")
        arr = as_dask_array(x)
        n, dim = arr.shape
        local._check_settings(n)
        try:
            return self._fit(arr, local, n, dim)
        except InvalidInput as exc:
            if getattr(exc, "bad_row", None) is None:
                raise
            # NaN/inf first, as one machine checks (kvant.cluster.assign): a chunk's cos zero row may come back before
            # another chunk's NaN, and the error must not depend on which task failed first (a review: 7 of 12 fits
            # named the zero row); then, for cos, the input's first zero row
            zero = getattr(exc, "zero_norm", False)
            first, first_zero = _first_bad_rows_of(arr, zero)  # (one pass for both)
            if first is not None:
                if first == exc.bad_row and not zero:
                    raise
                raise _bad_row_error("input", first, arr[first].compute()) from None
            if first_zero is None or first_zero == exc.bad_row:
                raise
            raise zero_norm_error(first_zero) from None

    def _fit(self, arr, local: Clusterer, n: int, dim: int) -> DaskClusterer:
        spherical = self.metric == "cos"
        k, seed = int(self.k), check_seed(self.seed)
        m = min(n, auto_sample_rows(n, k) if self.sample_per_centroid is None else k * int(self.sample_per_centroid))
        local.sample_per_centroid = -(-m // k)  # the client trains on every gathered row
        idx = np.sort(rng(seed).choice(n, size=m, replace=False)) if m < n else np.arange(n)
        sample = arr[idx].compute() if m < n else arr.compute()
        sample32 = to_float32(sample)
        if sample.dtype.kind == "f":
            check_finite_rows(sample32, idx, "input", sample)
        if spherical:
            zero = _chunk_first_zero(sample32, 0)
            if zero >= 0:
                raise zero_norm_error(int(idx[zero]))
        with warnings.catch_warnings():  # the sample's empty clusters are not the fit's: the final counts below are
            warnings.simplefilter("ignore", EmptyClusterWarning)
            local.fit(sample32)
        centroids = local.cluster_centers_
        history = [h * n / m for h in local.inertia_history_]  # the sample's objective, scaled to N rows
        n_iter = local.n_iter_
        tol = 1e-4 if self.tol is None else float(self.tol)
        previous = None
        for _ in range(int(self.polish_iter)):
            # the objective of the current centres; the step below never raises it
            sums, counts, objective, far = _pass(arr, centroids, spherical, True)
            history.append(objective)
            n_iter += 1
            reseeded = _reseed_empty(sums, counts, far, centroids)
            centroids = _centroids_from_sums(sums, counts, centroids, spherical)  # Lloyd's M-step, as on one machine
            scale = tolerance_scale(objective, float(n), spherical)  # as Lloyd's does
            # a re-seeded centre has not had its E-step yet: never stop right after one
            if not reseeded and previous is not None and previous - objective <= tol * max(abs(scale), 1e-30):
                break
            previous = objective
        _, counts, inertia, _ = _pass(arr, centroids, spherical, False)
        # commit
        self.cluster_centers_ = centroids
        self.inertia_ = float(inertia)
        self.counts_ = counts.astype(np.int64)
        self.inertia_history_ = [float(h) for h in history] + [float(inertia)]
        self.n_iter_ = int(n_iter)
        self.max_iter_, self.overrelax_ = local.max_iter_, local.overrelax_  # training's settings, as used
        self.n_samples_fit_, self.n_features_in_ = int(n), int(dim)
        self.sample_rows_ = int(m)
        self.metric_ = self.metric
        self.labels_ = self._labels(arr)
        for stale in ("mean_cosine_", "mse_"):
            self.__dict__.pop(stale, None)
        if spherical:
            self.mean_cosine_ = float(1.0 - inertia / n)
        else:
            self.mse_ = float(inertia / n)
        _warn_empty_clusters(self.counts_)
        return self

    def _labels(self, arr):
        dask, _ = _dask()
        # one key holding the centres, shared by every task: Dask de-duplicates only NumPy arguments above 1 MB, and
        # each task carried its own copy (a review: k=1000, D=240, 40 chunks)
        centres = dask.delayed(self.cluster_centers_, pure=True)
        return arr.map_blocks(_labels_block, centres, self.metric_ == "cos", dtype=np.int64, drop_axis=1,
                              chunks=(arr.chunks[0],))

    def predict(self, x):
        """Nearest fitted centre of each row, as a lazy Dask array of int64 labels."""
        if not hasattr(self, "cluster_centers_"):
            raise EmptyIndex("this DaskClusterer is not fitted yet; call fit() first")
        arr = as_dask_array(x)
        if arr.shape[1] != self.n_features_in_:
            raise DimensionMismatch(f"input has dim {arr.shape[1]}, the clusterer was fitted on dim "
                                    f"{self.n_features_in_}")
        return self._labels(arr)

    def __repr__(self) -> str:
        return f"DaskClusterer(k={self.k!r}, metric={self.metric!r}, seed={self.seed!r})"


def _encode_block(block, codec, block_info=None):
    if block.shape[0] == 0:  # (an empty chunk, e.g. from filtering a Dask array: codec.encode refuses zero rows)
        return np.empty((0, codec.code_size), np.uint8)
    start = block_info[0]["array-location"][0][0] if block_info else 0
    return codec.encode(checked_float32(block, start, _chunk_what(start, block.shape[0])))


def encode(codec, x):
    """PQ/OPQ codes of every row of ``x`` (see :func:`as_dask_array`), as a lazy uint8 Dask array
    (n, codec.code_size), each chunk encoded on a worker with ``codec.encode``."""
    from ..quant.pq import PQ

    if not isinstance(codec, PQ):  # OPQ is a PQ
        raise InvalidInput(f"codec: expected a kvant.PQ or kvant.OPQ, got {type(codec).__name__}")
    codec._check_fitted()
    arr = as_dask_array(x)
    if arr.shape[1] != codec.dim:
        raise DimensionMismatch(f"input has dim {arr.shape[1]}, the codec expects {codec.dim}")
    dask, _ = _dask()
    shared = dask.delayed(codec, pure=True)  # one key holding the codec (codebooks, OPQ's rotation) for every task
    return arr.map_blocks(_encode_block, shared, dtype=np.uint8, chunks=(arr.chunks[0], (codec.code_size,)))
