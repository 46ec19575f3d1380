"""Shared plumbing of the searchable indexes: validation at the door, id bookkeeping, growable storage,
result conventions (squared L2 ascending / similarities descending, padding -1 and ±inf)."""

from __future__ import annotations

import copy
import os

import numpy as np

from ..errors import DimensionMismatch, EmptyIndex, InvalidInput, PersistError
from ..io import as_source, check_finite
from ..io.source import SUPPORTED_DTYPES, VectorSource, as_array, to_float32

METRICS = ("l2", "ip", "cos")


def check_metric(metric) -> str:
    if metric not in METRICS:
        raise InvalidInput(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return metric


def check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
        raise InvalidInput(f"dim must be a positive integer, got {dim!r}")
    return int(dim)


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InvalidInput(f"k must be a positive integer, got {k!r}")
    return int(k)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit-norm copy of ``x`` (float32); zero rows stay zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    norms[norms == 0] = 1.0
    return (x / norms[:, None]).astype(np.float32)


def as_queries(q, dim: int) -> tuple[np.ndarray, bool]:
    """Validate queries -> (float32 C-contiguous (nq, dim), was_1d). A file path is read with as_source."""
    if isinstance(q, str | os.PathLike):
        q = as_source(q, name="queries")
    if isinstance(q, VectorSource):
        arr = q.to_array()
        one = False
    else:
        listed = isinstance(q, list | tuple)
        arr = as_array(q, "queries")  # (refuses masked arrays: np.asarray would search with the masked values)
        if listed and arr.dtype.kind in "iu":  # Python numbers: taken as float64 values, then float32 as any float
            arr = arr.astype(np.float64)
        if arr.dtype.type not in SUPPORTED_DTYPES:  # the element types as_source takes, never silently cast
            names = ", ".join(np.dtype(t).name for t in SUPPORTED_DTYPES)
            raise InvalidInput(f"queries have dtype {arr.dtype}; supported: {names}")
        one = arr.ndim == 1
        if one:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2:
            raise InvalidInput(f"queries must be 1-D (dim,) or 2-D (nq, dim), got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise DimensionMismatch(f"queries have dimension {arr.shape[1]}, expected {dim}")
    arr32 = to_float32(arr)
    check_finite(arr32, 0, "queries", arr)
    return arr32, one


def as_vectors(x, dim: int, what: str = "vectors") -> VectorSource:
    if isinstance(x, np.ndarray) and x.ndim == 1:
        x = x.reshape(1, -1)
    src = as_source(x, name=what)
    if src.dim != dim:
        raise DimensionMismatch(f"{what} have dimension {src.dim}, expected {dim}")
    return src


def check_new_ids(ids, n: int, existing: np.ndarray) -> np.ndarray | None:
    """Validate caller ids for ``n`` new rows: 1-D integers, unique, not already in the index."""
    if ids is None:
        return None
    arr = as_array(ids, "ids")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InvalidInput(f"ids must be a 1-D array of {n} integers, got shape {arr.shape}")
    if n and (arr.dtype.kind not in "iu" or arr.dtype == np.bool_):
        raise InvalidInput(f"ids must be integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and n and arr.max() > np.iinfo(np.int64).max:
        raise InvalidInput("ids must fit in int64")
    arr = arr.astype(np.int64)
    if n and arr.min() < 0:
        raise InvalidInput("ids must be >= 0 (-1 marks a missing result)")
    s = np.sort(arr)
    dup = s[1:][s[1:] == s[:-1]]
    if dup.size:
        raise InvalidInput(f"ids contain duplicates (e.g. {int(dup[0])}); ids must be unique")
    if existing.size:
        clash = np.isin(arr, existing)
        if clash.any():
            raise InvalidInput(f"id {int(arr[np.argmax(clash)])} is already in the index; ids must be unique")
    return arr


def check_remove_ids(ids, what: str = "ids to remove") -> np.ndarray:
    """``ids`` as a 1-D int64 array (a scalar is one id); ``what`` names them in errors."""
    arr = as_array(ids, what)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or (arr.size and (arr.dtype.kind not in "iu" or arr.dtype == np.bool_)):
        raise InvalidInput(f"{what} must be a 1-D array of integers")
    return arr.astype(np.int64)


class Rows:
    """A growable (n, *shape) array with amortised O(1) append and in-place compaction."""

    def __init__(self, shape: tuple[int, ...], dtype, data: np.ndarray | None = None):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        if data is None:
            data = np.empty((0, *self.shape), self.dtype)
        self._buf = data
        self.n = data.shape[0]

    @property
    def view(self) -> np.ndarray:
        return self._buf[: self.n]

    def _reserve(self, need: int) -> None:
        if need > self._buf.shape[0] or not self._buf.flags.writeable:
            cap = max(need, 2 * self._buf.shape[0], 1024) if self._buf.flags.writeable else need
            new = np.empty((cap, *self.shape), self.dtype)
            new[: self.n] = self._buf[: self.n]
            self._buf = new

    def append(self, block: np.ndarray) -> None:
        need = self.n + block.shape[0]
        self._reserve(need)
        self._buf[self.n : need] = block
        self.n = need

    def extend(self, blocks, total: int) -> None:
        """Append ``total`` rows arriving as ``blocks`` (an iterable), written straight into the buffer: one copy
        of the data where collecting the blocks, joining them and appending made three (adding 1M x 768 float32 rows
        to a FlatIndex took 40 s on this VM, where fresh memory is slow to touch). The rows count only once every
        block has arrived, so an error raised by the iterable (a NaN found in a later block) leaves them out."""
        need = self.n + int(total)
        self._reserve(need)
        pos = self.n
        for block in blocks:
            end = pos + block.shape[0]
            if end > need:
                raise ValueError("more rows than announced")  # pragma: no cover - internal misuse
            self._buf[pos:end] = block
            pos = end
        if pos != need:
            raise ValueError("fewer rows than announced")  # pragma: no cover - internal misuse
        self.n = need

    def keep(self, mask: np.ndarray) -> None:
        kept = self.view[mask]
        self._buf = np.ascontiguousarray(kept)
        self.n = kept.shape[0]

    def __copy__(self) -> Rows:
        # shares the rows without copying them: nothing writes rows [0, n) in place (append writes past n, keep
        # replaces the buffer), and the copy's buffer ends at n, so its first append moves it to a buffer of its own
        return Rows(self.shape, self.dtype, self.view)


def copy_with_rows(index):
    """``copy.copy`` for an index: its attributes shared, but each :class:`Rows` store copied (cheaply, see
    ``Rows.__copy__``) so that adding to or removing from either index leaves the other as it was. A plain shallow
    copy shared the stores while each kept its own next id and caches: the original then held rows added through
    the copy, gave one id to two rows and searched a stale 4-bit packing (a review)."""
    new = object.__new__(type(index))
    new.__dict__.update({k: copy.copy(v) if isinstance(v, Rows) else v for k, v in index.__dict__.items()})
    return new


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 62


def finish_results(dist: np.ndarray, rows: np.ndarray, ids: np.ndarray, similarity: bool, one: bool,
                   k: int | None = None):
    """Map internal row numbers to ids, apply the sign/padding convention, squeeze 1-D queries.

    ``k`` wider than the results (the index holds fewer vectors than asked for): pad to ``k`` columns. The
    search itself runs with at most the number of stored vectors, so an absurd ``k`` fails here, cleanly."""
    if k is not None and k > dist.shape[1]:
        nq = dist.shape[0]
        # the padded arrays and their copies below, ~24 bytes a result: the allocation itself may succeed (Linux
        # overcommits) and the process be killed while filling it (a review's k=2**31 over 300 rows), so ask first
        if nq * k * 24 > _physical_memory():
            raise InvalidInput(f"k={k} asks for {nq}×{k} results ({nq * k * 24 / 2**30:.3g} GiB with their copies), "
                               f"more than this machine's memory; the index holds {dist.shape[1]} vectors")
        try:
            wide_d = np.full((nq, k), np.inf, np.float32)
            wide_r = np.full((nq, k), -1, np.int64)
        except (MemoryError, ValueError) as exc:
            raise InvalidInput(f"k={k} asks for {nq}×{k} results ({nq * k * 12 / 2**30:.3g} GiB), which cannot be "
                               f"allocated; the index holds {dist.shape[1]} vectors") from exc
        wide_d[:, : dist.shape[1]], wide_r[:, : dist.shape[1]] = dist, rows
        dist, rows = wide_d, wide_r
    padded = bool((rows < 0).any())
    if not padded and ids.size:  # (the common case: one gather; the general one below cost ~7 µs per search)
        out_ids = ids[rows].astype(np.int64, copy=False)
    else:
        out_ids = np.where(rows >= 0, ids[np.maximum(rows, 0)] if ids.size else -1, -1).astype(np.int64)
    dist = dist.astype(np.float32, copy=True)
    if similarity:
        dist = np.float32(0.0) - dist  # (not -dist: a zero similarity reads +0, never -0)
    if padded:
        dist[out_ids < 0] = -np.inf if similarity else np.inf
    if one:
        return dist[0], out_ids[0]
    return dist, out_ids


def default_ids(next_id: int, n: int) -> np.ndarray:
    """Consecutive new ids from ``next_id``; InvalidInput when they would pass the largest int64."""
    if next_id + n - 1 > np.iinfo(np.int64).max:
        raise InvalidInput(f"no default ids left after id {next_id - 1}: pass ids= explicitly")
    return np.arange(next_id, next_id + n, dtype=np.int64)


def require_nonempty(n: int, what: str) -> None:
    if n == 0:
        raise EmptyIndex(f"{what} holds no vectors; add vectors before searching")


def check_ids_array(ids: np.ndarray, n: int) -> np.ndarray:
    if ids.dtype != np.int64 or ids.shape != (n,):
        raise PersistError(f"ids have shape {ids.shape} / {ids.dtype}, expected ({n},) int64")
    if n and (ids.min() < 0 or np.unique(ids).size != n):
        raise PersistError("ids are negative or not unique")
    return ids


def check_next_id(next_id, ids: np.ndarray) -> int:
    """A loaded index's next default id: an integer (a file's 300.5 or "300" is not one) in [0, 2**63] and above every
    stored id, else PersistError (2**63: every int64 id issued). Returns it as an int."""
    if isinstance(next_id, bool) or not isinstance(next_id, int):
        raise PersistError(f"next_id must be an integer, got {next_id!r}")
    if not 0 <= next_id <= 2**63 or (ids.size and next_id <= int(ids.max())):
        raise PersistError(f"next_id {next_id} is outside [0, 2**63] or not larger than every stored id")
    return next_id
