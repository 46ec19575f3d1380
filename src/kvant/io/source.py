"""The :class:`VectorSource` protocol: every input kvant reads goes through it.

A source knows its shape (``n``, ``dim``) and stored ``dtype`` and hands out float32, C-contiguous
row blocks with bounded memory. Conversion to float32 happens per chunk, so a float16 or uint8 memmap
is never copied whole; a float32 in-memory array is handed out as views (no copy at all).
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterator

import numpy as np

from .._config import get_num_threads, rng
from ..errors import InvalidInput
from ..kernels.finite import first_nonfinite_row, first_nonfinite_row_parallel
from ._write import first_underflow

__all__ = [
    "VectorSource",
    "ArraySource",
    "check_finite",
    "check_finite_rows",
    "check_shape_dtype",
    "as_array",
    "chunk_rows",
    "default_chunk_rows",
    "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES = (np.float32, np.float64, np.float16, np.int8, np.uint8)
_CHUNK_BYTES = 32 << 20  # 32 MiB of float32 per chunk: large enough to amortise, small enough for RAM
# blocks from this size up are checked for NaN/inf on all threads, in ranges of this many bytes
_PARALLEL_CHECK_BYTES = 4 << 20


_GATHER_WINDOW = 4 << 20  # bytes of a memory-mapped file ArraySource.take gathers from between page releases
_COLUMN_GROUP = 16  # columns of a column-major memory map read between page releases


def default_chunk_rows(dim: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * max(1, dim)))


def as_array(x, what: str, dtype=None) -> np.ndarray:
    """``np.asarray(x, dtype)``, with NumPy's refusals (ragged nested lists, strings for a float dtype, ...) as
    :class:`InvalidInput` naming ``what``; masked arrays are refused (np.asarray would use the values under the
    mask)."""
    if isinstance(x, np.ma.MaskedArray):
        raise InvalidInput(f"{what}: masked arrays are not supported; fill (x.filled(v)) or drop the masked rows "
                           "first")
    try:
        return np.asarray(x, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"{what} must be a numeric array: {exc}") from None


def chunk_rows(rows, dim: int) -> int:
    """``chunks(rows)``'s block size: the default for ``None``, else an integer >= 1 (``InvalidInput`` otherwise)."""
    if rows is None:
        return default_chunk_rows(dim)
    if isinstance(rows, bool | np.bool_) or not isinstance(rows, int | np.integer) or rows < 1:
        raise InvalidInput(f"chunk rows must be an integer >= 1, got {rows!r}")
    return int(rows)


def zero_rows_error(message: str) -> InvalidInput:
    """The InvalidInput of an input with no rows, marked ``zero_rows`` (a list of files may skip such a file)."""
    err = InvalidInput(message)
    err.zero_rows = True
    return err


def check_shape_dtype(shape, dtype, name: str, what: str) -> None:
    """Reject anything but a non-empty 2-D (n, dim) collection of a supported dtype (``what``: array/dataset)."""
    if len(shape) != 2:
        raise InvalidInput(f"{name}: expected a 2-D {what} (n, dim), got shape {tuple(shape)}")
    if np.dtype(dtype).type not in SUPPORTED_DTYPES:
        names = ", ".join(np.dtype(t).name for t in SUPPORTED_DTYPES)
        raise InvalidInput(f"{name}: dtype {dtype} is not supported (use one of: {names})")
    if shape[0] == 0:
        raise zero_rows_error(f"{name}: has zero rows")
    if shape[1] == 0:
        raise InvalidInput(f"{name}: has zero columns")


def _first_bad_row(block: np.ndarray) -> int:
    """Index of the first row of a float ``block`` holding NaN or inf, or -1."""
    if block.dtype == np.float32 and block.ndim == 2 and block.flags.c_contiguous:
        bits = block.view(np.int32)  # one read, no (n, d) mask
        # the main thread only: a Numba parallel region entered from several threads at once (Dask's workers, say)
        # is not safe on every threading layer
        if (block.nbytes >= _PARALLEL_CHECK_BYTES and get_num_threads() > 1
                and threading.current_thread() is threading.main_thread()):
            return int(first_nonfinite_row_parallel(bits, max(1, _PARALLEL_CHECK_BYTES // (4 * block.shape[1]))))
        return int(first_nonfinite_row(bits))
    bad = ~np.isfinite(block).all(axis=1) if block.ndim == 2 else ~np.isfinite(block)
    return int(np.argmax(bad)) if bad.any() else -1


def _bad_row_error(what: str, row_name: int, original_row) -> InvalidInput:
    """The error for a row that is not finite in float32: a finite wider-typed ``original_row`` (float64 beyond
    ±3.4e38) is named as out of range, anything else as NaN or inf."""
    if (original_row is not None and np.asarray(original_row).dtype.kind == "f"
            and np.asarray(original_row).dtype.itemsize > 4 and np.isfinite(original_row).all()):
        err = InvalidInput(f"{what} holds a value beyond float32's range (±3.4e38), which kvant computes in "
                           f"(first bad row: {row_name})")
    else:
        err = InvalidInput(f"{what} contains NaN or inf (first bad row: {row_name})")
    err.bad_row = row_name  # for callers that saw only part of the input (kvant.distributed) to name the first
    return err


def _original_row(original, i: int):
    if original is None:
        return None
    return original(i) if callable(original) else original[i]


def check_finite(block: np.ndarray, start: int = 0, what: str = "input", original=None) -> None:
    """Raise InvalidInput naming the first row of ``block`` (offset by ``start``) holding NaN or inf.

    ``original``: the rows ``block`` was cast from (an array, or a function of the row number in ``block``), so
    that a finite float64 value that became inf in the cast is reported as beyond float32's range."""
    if block.dtype.kind != "f" or block.size == 0:
        return
    row = _first_bad_row(block)
    if row >= 0:
        raise _bad_row_error(what, row + start, _original_row(original, row))
    if isinstance(original, np.ndarray) and original.dtype.kind == "f" and original.dtype.itemsize > 4:
        _check_underflow(block, original, start, what)


def _check_underflow(block: np.ndarray, original: np.ndarray, start: int, what: str) -> None:
    """Raise InvalidInput naming the first row of float64 ``original`` that became a zero row in ``block``
    (:func:`kvant.io._write.first_underflow`)."""
    row = first_underflow(original, block)
    if row is not None:
        err = InvalidInput(f"{what} row {row + start} has nonzero values all below float32's smallest (1.4e-45), so "
                           "it would become a zero row in float32, which kvant computes in; multiply the data by a "
                           f"constant (first such row: {row + start})")
        err.bad_row = row + start
        raise err


def check_finite_rows(block: np.ndarray, rows: np.ndarray, what: str = "input", original=None) -> None:
    """Like :func:`check_finite` for a block gathered from arbitrary rows (``block[i]`` is row ``rows[i]``, in any
    order): names the smallest bad row number, whatever the order the rows were asked for in (as a scan would)."""
    if block.dtype.kind != "f" or block.size == 0:
        return
    if _first_bad_row(block) < 0:
        return
    rows = np.asarray(rows)
    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))  # the error path only: a full mask is fine here
    i = int(bad[np.argmin(rows[bad])])
    raise _bad_row_error(what, int(rows[i]), _original_row(original, i))


def to_float32(block: np.ndarray) -> np.ndarray:
    """``block`` as C-contiguous float32 (no copy when it is one); values beyond float32's range become inf
    without a NumPy warning, for the finiteness check to name (with ``original=block``)."""
    if block.dtype == np.float32 and block.flags.c_contiguous:
        return block  # (as np.ascontiguousarray would, without the error-state context: ~2 µs of a 1-query search)
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(block, dtype=np.float32)


def checked_float32(raw: np.ndarray, start: int, what: str = "input") -> np.ndarray:
    """``raw`` (rows ``start``...) as C-contiguous float32, checked: NaN/inf and float64 beyond float32's range
    raise InvalidInput naming the row. Integer rows are finite and are not scanned."""
    block = to_float32(raw)
    if raw.dtype.kind == "f":
        check_finite(block, start, what, raw)
    return block


class VectorSource:
    """Protocol for a 2-D collection of vectors. Subclasses implement ``_read(start, stop)`` and ``take``.

    Attributes: ``n`` (rows), ``dim`` (columns), ``dtype`` (stored dtype), ``name`` (for messages).
    """

    n: int
    dim: int
    dtype: np.dtype
    name: str = "input"

    # -- to implement -------------------------------------------------------------------------
    def _read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as stored (any supported dtype), shape (stop-start, dim)."""
        raise NotImplementedError

    def take(self, indices) -> np.ndarray:
        """Rows at ``indices`` (any order, repeats allowed) as float32 (len(indices), dim)."""
        idx = self._check_indices(indices)
        if idx.size == 0:
            return np.empty((0, self.dim), np.float32)
        order = np.argsort(idx, kind="stable")
        out = np.empty((idx.size, self.dim), np.float32)
        # Generic fallback: read the covering chunks once each, in order.
        sorted_idx = idx[order]
        step = default_chunk_rows(self.dim)
        pos = 0
        while pos < sorted_idx.size:
            lo = int(sorted_idx[pos])
            hi = min(self.n, lo + step)
            end = int(np.searchsorted(sorted_idx, hi, side="left"))
            block = self._read(lo, hi)
            with np.errstate(over="ignore"):
                out[order[pos:end]] = block[sorted_idx[pos:end] - lo]
            pos = end
        check_finite_rows(out, idx, self.name, lambda i: self._read(int(idx[i]), int(idx[i]) + 1)[0])
        return out

    # -- provided -----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return int(self.n) * int(self.dim) * np.dtype(self.dtype).itemsize

    def chunks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, block)`` with ``block`` float32 C-contiguous of at most ``rows`` rows."""
        rows = chunk_rows(rows, self.dim)
        for start in range(0, self.n, rows):
            stop = min(self.n, start + rows)
            block = checked_float32(self._read(start, stop), start, self.name)
            yield start, block
            self.release_rows(start, stop)

    def read_units(self) -> np.ndarray | None:
        """Boundaries ``[0, ..., n]`` of the spans this source decodes as a whole (a parquet row group), or None
        when any rows are as cheap as any others. Readers that visit rows out of order keep to one span at a
        time, so that each span is decoded once per pass."""
        return None

    def release_rows(self, start: int, stop: int) -> None:
        """Say the caller has finished with rows [start, stop) for now (``chunks`` calls it after each block).

        Memory-mapped sources drop those pages from the process (see :class:`MappedPages`), so a scan of
        a file larger than RAM keeps a bounded resident set; the rows stay readable (faulted back in from
        the page cache or disk). Default: nothing.
        """

    def sample(self, m: int, seed: int | None = 0) -> np.ndarray:
        """``min(m, n)`` distinct rows drawn uniformly at random (sorted by row number), as float32."""
        idx = self.sample_indices(m, seed)
        return self.take(idx)

    def sample_indices(self, m: int, seed: int | None = 0) -> np.ndarray:
        if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 0:
            raise InvalidInput(f"sample size must be an integer >= 0, got {m!r}")
        m = min(int(m), self.n)
        if m == self.n:
            return np.arange(self.n, dtype=np.int64)
        return np.sort(rng(seed).choice(self.n, size=m, replace=False)).astype(np.int64)

    def to_array(self) -> np.ndarray:
        """All rows as one float32 array (a view when the source already is float32 in memory)."""
        out = np.empty((self.n, self.dim), np.float32)
        for start, block in self.chunks():
            out[start : start + block.shape[0]] = block
        return out

    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise InvalidInput("row indices must be a 1-D integer array")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise InvalidInput(f"row index out of range [0, {self.n})")
        return idx

    def __len__(self) -> int:
        return int(self.n)

    def __repr__(self) -> str:
        dtype = np.dtype(self.dtype).name
        return f"{type(self).__name__}(n={self.n}, dim={self.dim}, dtype={dtype}, name={self.name!r})"


def is_sorted(idx: np.ndarray) -> bool:
    """True for a non-empty index array in non-decreasing order (the order window-by-window gathers need)."""
    return bool(idx.size) and bool(np.all(idx[1:] >= idx[:-1]))


def gather_windows(idx: np.ndarray, row_bytes: int):
    """Yield ``(a, b, lo, hi)``: take ``idx[a:b]`` (sorted), all in rows [lo, hi) of a memory-mapped file, then
    release rows [lo, hi). A scattered gather faults in (and, with fault-around, maps) most of the file, so the
    sorted rows are gathered window by window of the file and each window's pages dropped after it. A window is
    bounded in bytes, not in rows taken: a sparse sample spreads few rows over the file."""
    window = max(1, _GATHER_WINDOW // row_bytes)
    first = int(idx[0]) // window * window
    edges = np.arange(first, int(idx[-1]) + window + 1, window)
    cut = np.searchsorted(idx, edges)
    for w in range(edges.size - 1):
        a, b = int(cut[w]), int(cut[w + 1])
        if b > a:
            yield a, b, int(edges[w]), int(edges[w + 1])


class MappedPages:
    """Drops already-scanned pages of a read-only memory map from the process (``MADV_DONTNEED``).

    Pages of a file mapping count toward the process's RSS once touched; without this, a sequential
    scan of a memmap ends with the whole file resident. Dropping them is safe for shared mappings, read-only or
    writable (``np.memmap``'s default ``r+``, and ``w+``: the kernel moves a dropped page's dirty bit to the page
    cache, so nothing written is lost): the data stays in the page cache (and on disk) and is faulted back in if
    touched again. (Until a 2026-12-06 review only ``r`` maps were advised: a default ``np.memmap`` stayed resident.)
    A private (copy-on-write, ``mode="c"``) map would lose pages written since it was opened, so such
    maps are advised only when kvant opened them itself and never writes into them (``private_ok``).
    Blocks handed out by ``chunks`` are copies, never views of an advised map.
    """

    def __init__(self, mm, data_address: int):
        self.mm = mm
        base = np.frombuffer(mm, dtype=np.uint8).__array_interface__["data"][0] if len(mm) else 0
        self.offset = int(data_address) - int(base)  # where the array's data starts inside the map
        self.page = mmap.PAGESIZE

    @classmethod
    def of(cls, array: np.ndarray, private_ok: bool = False) -> MappedPages | None:
        mm = getattr(array, "_mmap", None)
        modes = ("r", "r+", "w+", "c") if private_ok else ("r", "r+", "w+")
        if mm is None or getattr(array, "mode", None) not in modes or not hasattr(mm, "madvise"):
            return None
        if not hasattr(mmap, "MADV_DONTNEED"):  # pragma: no cover - non-Linux
            return None
        try:
            return cls(mm, array.__array_interface__["data"][0])
        except (TypeError, ValueError, BufferError):  # pragma: no cover - closed or unusual maps
            return None

    def release(self, lo: int, hi: int, partial: bool = False) -> None:
        """Advise away the whole pages inside bytes [lo, hi) of the array's data; with ``partial``, also the pages
        [lo, hi) only touches (they are faulted back in if read again: used where [lo, hi) is a page or less)."""
        if hi <= lo:
            return
        a = self.offset + lo
        b = self.offset + hi
        if partial:
            a = max(0, a // self.page * self.page)
            b = min(len(self.mm), -(-b // self.page) * self.page)
        else:
            a = -(-a // self.page) * self.page
            b = (b // self.page) * self.page
        if b > a:
            try:
                self.mm.madvise(mmap.MADV_DONTNEED, a, b - a)
            except (OSError, ValueError):  # pragma: no cover - advice is best effort
                pass


class ArraySource(VectorSource):
    """A NumPy array or ``np.memmap`` of shape (n, dim) and a supported dtype.

    In-memory arrays are checked for NaN/inf once, here; memory-mapped ones chunk by chunk as they are
    read (checking a 100 GB memmap up front would read it twice).
    """

    def __init__(self, array: np.ndarray, name: str = "input", validate: bool = True):
        if not isinstance(array, np.ndarray):
            raise InvalidInput(f"{name}: expected a NumPy array, got {type(array).__name__}")
        if isinstance(array, np.ma.MaskedArray):  # reading .data would use the masked values as vectors
            raise InvalidInput(f"{name}: masked arrays are not supported; fill (x.filled(v)) or drop the masked "
                               f"rows (x[~x.mask.any(axis=1)].data) first")
        if type(array) is not np.ndarray and not isinstance(array, np.memmap):
            array = np.asarray(array)  # np.matrix and other subclasses: the plain array view, no copy
        check_shape_dtype(array.shape, array.dtype, name, "array")
        self.array = array
        self.n, self.dim = (int(s) for s in array.shape)
        self.dtype = array.dtype
        self.name = name
        self.in_memory = not isinstance(array, np.memmap)
        self._validated = False
        # a column-major map (a Fortran-order .npy) holds each row as one value per column: it releases column by
        # column
        self._column_major = not array.flags.c_contiguous and array.flags.f_contiguous
        contiguous = array.flags.c_contiguous or array.flags.f_contiguous
        self._pages = MappedPages.of(array) if not self.in_memory and contiguous else None
        if validate and self.in_memory:
            self.validate()

    @property
    def validated(self) -> bool:
        """True once every row is known to be finite (then reads skip the NaN/inf check)."""
        return self._validated

    def validate(self) -> None:
        """Check every row for NaN/inf now (once), naming the first bad row; a memmap's pages are released."""
        if self._validated:
            return
        # a memmap's resident window stays at 4 MiB (the scan is bandwidth-bound either way)
        step = default_chunk_rows(self.dim) if self.in_memory else max(1, (4 << 20) // (self.dim * self.array.itemsize))
        for start in range(0, self.n, step):
            raw = self.array[start : start + step]
            # check what kvant computes on: a finite float64 beyond float32's range becomes inf
            block = to_float32(raw) if raw.dtype.kind == "f" and raw.dtype.itemsize > 4 else raw  # any byte order
            check_finite(block, start, self.name, raw)
            self.release_rows(start, start + step)
        self._validated = True

    def mark_validated(self) -> None:
        """Record that the caller has checked every row for NaN/inf (e.g. fused into its own first pass)."""
        self._validated = True

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self._pages is not None and self._column_major:
            # a few columns at a time, each group's pages dropped after it: touching one row block of every
            # column at once maps a page-cache folio (measured: ~0.75 MiB) of each, which is most of the file
            out = np.empty((stop - start, self.dim), self.array.dtype)
            for j in range(0, self.dim, _COLUMN_GROUP):
                out[:, j : j + _COLUMN_GROUP] = self.array[start:stop, j : j + _COLUMN_GROUP]
                self._release_columns(start, stop, range(j, min(self.dim, j + _COLUMN_GROUP)))
            return out
        if self._pages is not None and self.array.dtype == np.float32:
            return np.array(self.array[start:stop], copy=True)  # never hand out views of an advised map
        return self.array[start:stop]

    def release_rows(self, start: int, stop: int) -> None:
        if self._pages is None:
            return
        stop = min(stop, self.n)
        if self._column_major:
            self._release_columns(start, stop, range(self.dim))
        else:
            row = self.dim * self.array.itemsize
            self._pages.release(start * row, stop * row)

    def _release_columns(self, start: int, stop: int, columns: range) -> None:
        # a row block is a few pages of each column: release the pages the rows touch (a neighbouring row on a
        # shared page is faulted back in if read), else a block shorter than a page per column releases nothing
        item = self.array.itemsize
        for column in columns:
            base = column * self.n * item
            self._pages.release(base + start * item, base + stop * item, partial=True)

    def chunks(self, rows: int | None = None):
        rows = chunk_rows(rows, self.dim)
        if self._pages is not None and self._column_major:  # _read drops each column group's pages as it copies
            for start in range(0, self.n, rows):  # them, so the generic path's release_rows would do it again
                yield start, checked_float32(self._read(start, min(self.n, start + rows)), start, self.name)
            return
        if not (self._validated and self.in_memory):  # a memmap goes through the generic path: it drops its pages
            yield from super().chunks(rows)
            return
        for start in range(0, self.n, rows):
            yield start, to_float32(self.array[start : start + rows])  # validated already

    def take(self, indices) -> np.ndarray:
        idx = self._check_indices(indices)
        if self._pages is not None and is_sorted(idx):
            out = np.empty((idx.size, self.dim), np.float32)
            for a, b, lo, hi in gather_windows(idx, self.dim * self.array.itemsize):
                with np.errstate(over="ignore"):
                    out[a:b] = self.array[idx[a:b]]
                self.release_rows(lo, hi)
        else:
            out = to_float32(self.array[idx])
        if not self._validated:
            check_finite_rows(out, idx, self.name, lambda i: self.array[idx[i]])
        return out

    def to_array(self) -> np.ndarray:
        if self.in_memory and self.array.dtype == np.float32 and self.array.flags.c_contiguous:
            self.validate()
            return self.array
        if self.in_memory:
            return super().to_array()
        # memory map: convert straight into the output (no intermediate chunk copy), then drop the pages
        out = np.empty((self.n, self.dim), np.float32)
        step = default_chunk_rows(self.dim)
        for start in range(0, self.n, step):
            stop = min(self.n, start + step)
            with np.errstate(over="ignore"):
                out[start:stop] = self.array[start:stop]
            if self.array.dtype.kind == "f":
                check_finite(out[start:stop], start, self.name, self.array[start:stop])
            self.release_rows(start, stop)
        return out
