"""TEXMEX ``.fvecs`` / ``.bvecs`` / ``.ivecs`` files (the format of SIFT1M, GIST1M, BIGANN).

Each record is a little-endian int32 ``dim`` followed by ``dim`` values (float32, uint8 or int32).
The file is memory-mapped; the per-record dimension headers are checked when the file is opened
(files up to ``EAGER_CHECK_BYTES``) and again, for the rows read, by every chunk and ``take``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InvalidInput
from ._paths import check_file
from ._write import values_to_write, writing
from .source import (
    MappedPages,
    VectorSource,
    check_finite_rows,
    default_chunk_rows,
    gather_windows,
    is_sorted,
    zero_rows_error,
)

__all__ = ["TexmexSource", "write_fvecs", "write_bvecs", "write_ivecs", "TEXMEX_DTYPES"]

TEXMEX_DTYPES = {".fvecs": np.dtype("<f4"), ".bvecs": np.dtype("u1"), ".ivecs": np.dtype("<i4")}
EAGER_CHECK_BYTES = 1 << 30  # check all headers at open time for files up to 1 GiB
_INT_EXACT = 1 << 24  # int32 values beyond +-2**24 are not exactly representable in float32


class TexmexSource(VectorSource):
    """A memory-mapped ``.fvecs`` (float32), ``.bvecs`` (uint8) or ``.ivecs`` (int32) file.

    ``.ivecs`` values are converted to float32 only if they are exactly representable
    (``|v| <= 2**24``); otherwise reading raises InvalidInput rather than rounding silently.
    """

    def __init__(self, path, name: str | None = None):
        p = check_file(path, "TEXMEX file")
        self.path = p
        self.name = name or str(p)
        suffix = p.suffix.lower()
        if suffix not in TEXMEX_DTYPES:
            raise InvalidInput(f"{self.name}: unknown TEXMEX extension {suffix!r} (use .fvecs, .bvecs or .ivecs)")
        self.dtype = TEXMEX_DTYPES[suffix]
        size = p.stat().st_size
        if size == 0:
            raise zero_rows_error(f"{self.name}: file is empty (zero rows)")
        if size < 4:
            raise InvalidInput(f"{self.name}: truncated file ({size} bytes; a record starts with a 4-byte dim)")
        with open(p, "rb") as fh:
            dim = int(np.frombuffer(fh.read(4), dtype="<i4")[0])
        if dim <= 0:
            raise InvalidInput(f"{self.name}: bad dimension header {dim} at row 0 (expected a positive int32)")
        record = 4 + dim * self.dtype.itemsize
        if size % record != 0:
            raise InvalidInput(
                f"{self.name}: file size {size} is not a multiple of the record size {record} bytes "
                f"(dim={dim}); the file is truncated or the rows have different dims"
            )
        self.dim = dim
        self.n = size // record
        self._record = record
        raw = np.memmap(p, dtype=np.uint8, mode="r", shape=(self.n, record))
        self._raw = raw
        self._pages = MappedPages.of(raw)
        if self.dtype.itemsize == 1:
            self._headers = None
            self._values = raw[:, 4:]
        else:  # records are 4-byte aligned: view the whole file as 4-byte words
            self._values = raw.view("<i4")[:, 1:].view(self.dtype)
        if size <= EAGER_CHECK_BYTES:
            step = default_chunk_rows(self.dim)
            for start in range(0, self.n, step):
                self._check_headers(start, min(self.n, start + step))
                self.release_rows(start, min(self.n, start + step))

    def _header_rows(self, rows) -> np.ndarray:
        """The int32 dim headers of the given rows (a slice or an index array)."""
        return np.ascontiguousarray(self._raw[rows, :4]).view("<i4").ravel()

    def _check_headers(self, start: int, stop: int) -> None:
        heads = self._header_rows(slice(start, stop))
        self._raise_if_bad(heads, np.arange(start, stop))

    def _raise_if_bad(self, heads: np.ndarray, rows: np.ndarray) -> None:
        bad = heads != self.dim
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidInput(
                f"{self.name}: dim mismatch at row {int(rows[i])} (header says {int(heads[i])}, "
                f"row 0 says {self.dim}); the file is corrupted or mixes dimensions"
            )

    def _check_ints(self, block: np.ndarray, start: int, rows=None) -> None:
        if self.dtype.kind == "i" and block.size:
            big = np.abs(block.astype(np.int64)) > _INT_EXACT
            if big.any():
                i = int(np.argmax(big.any(axis=1)))
                row = int(rows[i]) if rows is not None else start + i
                raise InvalidInput(
                    f"{self.name}: value at row {row} is outside +-2**24 and cannot be converted to float32 exactly"
                )

    def _read(self, start: int, stop: int) -> np.ndarray:
        self._check_headers(start, stop)
        block = self._values[start:stop]
        self._check_ints(block, start)
        return block

    def release_rows(self, start: int, stop: int) -> None:
        if self._pages is not None:
            self._pages.release(start * self._record, min(stop, self.n) * self._record)

    def take(self, indices) -> np.ndarray:
        idx = self._check_indices(indices)
        if idx.size == 0:
            return np.empty((0, self.dim), np.float32)
        if self._pages is None or not is_sorted(idx):
            return self._take_rows(idx)
        out = np.empty((idx.size, self.dim), np.float32)
        for a, b, lo, hi in gather_windows(idx, self._record):  # (a sample would map most of the file otherwise)
            out[a:b] = self._take_rows(idx[a:b])
            self.release_rows(lo, hi)
        return out

    def _take_rows(self, idx: np.ndarray) -> np.ndarray:
        self._raise_if_bad(self._header_rows(idx), idx)
        block = self._values[idx]
        self._check_ints(block, 0, rows=idx)
        out = np.ascontiguousarray(block, dtype=np.float32)
        check_finite_rows(out, idx, self.name)
        return out

    def close(self) -> None:
        """Release the memory map (the source is unusable afterwards)."""
        mm = getattr(self._raw, "_mmap", None)
        self._raw = self._values = self._pages = None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # views still alive elsewhere: leave it to the garbage collector
                pass


def _write_vecs(path, x, kind: str) -> None:
    dtype = TEXMEX_DTYPES[kind]
    name = os.fspath(path) if isinstance(path, str | os.PathLike) else None  # others: writing() refuses them
    suffix = Path(name).suffix.lower() if isinstance(name, str) else None
    if suffix is not None and suffix != kind:
        # the reader takes the record type from the suffix: ints under a .fvecs name would read as garbage floats
        raise InvalidInput(f"{name}: write_{kind[1:]} writes {kind} records, so the file name must end "
                           f"in {kind} (the reader takes the record type from it), not {suffix or '(no extension)'!r}")
    values = values_to_write(x, dtype)  # (NaN/inf and values that would change are refused)
    n, dim = values.shape
    if dtype.kind == "i":
        big = np.abs(values.astype(np.int64)) > _INT_EXACT
        if big.any():
            raise InvalidInput(
                f"values outside +-2**24 (first at row {int(np.argmax(big.any(axis=1)))}): the .ivecs reader refuses "
                f"them, as float32 cannot hold them exactly"
            )
    out = np.empty((n, 4 + dim * dtype.itemsize), np.uint8)
    out[:, :4] = np.frombuffer(np.int32(dim).astype("<i4").tobytes(), np.uint8)
    out[:, 4:] = np.ascontiguousarray(values).view(np.uint8).reshape(n, dim * dtype.itemsize)
    with writing(path) as fh:  # (complete or not at all: an existing file survives a failed write)
        fh.write(out.data)


def write_fvecs(path, x) -> None:
    """Write ``x`` (n, dim) as a TEXMEX ``.fvecs`` file (float32 values); the name must end in ``.fvecs``."""
    _write_vecs(path, x, ".fvecs")


def write_bvecs(path, x) -> None:
    """Write ``x`` (n, dim) of integers in [0, 255] as a TEXMEX ``.bvecs`` file (name ending in ``.bvecs``)."""
    _write_vecs(path, x, ".bvecs")


def write_ivecs(path, x) -> None:
    """Write ``x`` (n, dim) of integers with |v| <= 2**24 (what the reader accepts) as a TEXMEX ``.ivecs`` file
    (name ending in ``.ivecs``)."""
    _write_vecs(path, x, ".ivecs")
