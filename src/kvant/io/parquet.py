"""Parquet files, or directories of them, read row group by row group with pyarrow.

The vectors are either one list column (``fixed_size_list<float>`` or ``list<float>``, picked with
``column=``, or the only list column when ``column=None``) or a set of scalar numeric columns (all
of them with ``column=None``, or the names in ``column=[...]``). Memory stays bounded by one row group
(plus the chunk being returned): ``chunks`` streams record batches, ``take`` maps each requested row to
its row group and decodes each needed row group once.

Checks: unsupported value types, nulls, ragged list rows (the first bad row is named), NaN/inf, and,
for directories, that every file has the same column layout and dimension (else DimensionMismatch).
Ragged rows and NaN are found as rows are read (checking them up front would read the data twice).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import DimensionMismatch, InvalidInput
from ._paths import check_file, exists, missing
from ._write import first_overflow, values_to_write, writing
from .source import (
    SUPPORTED_DTYPES,
    VectorSource,
    check_finite_rows,
    checked_float32,
    chunk_rows,
    zero_rows_error,
)

__all__ = ["ParquetSource", "write_parquet", "PARQUET_SUFFIXES"]

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")


def _pa():
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


def _numpy_dtype(t) -> np.dtype | None:
    pa, _ = _pa()
    table = {
        pa.float32(): np.float32,
        pa.float64(): np.float64,
        pa.float16(): np.float16,
        pa.int8(): np.int8,
        pa.uint8(): np.uint8,
    }
    for k, v in table.items():
        if t.equals(k):
            return np.dtype(v)
    return None


def _common_dtype(types) -> np.dtype:
    """The dtype rows of these supported value types are assembled in. int8 with uint8 promote to int16,
    which no reader of a source accepts: such rows are float32 instead (exact for every mix of the supported
    types that does not promote to them)."""
    dtype = np.result_type(*[_numpy_dtype(t) for t in types])
    return dtype if dtype.type in SUPPORTED_DTYPES else np.dtype(np.float32)


def _is_list(t) -> bool:
    pa, _ = _pa()
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_numeric(t) -> bool:
    """A scalar column ``column=None`` takes as a vector component. Bool and null columns count too: they reach
    the "not supported" error (as int32 does) rather than being dropped silently."""
    pa, _ = _pa()
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
            or pa.types.is_boolean(t) or pa.types.is_null(t))


def _field(schema, name: str, f, missing: str):
    """The field called ``name``, looked up by position: ``schema.field(name)`` raises a bare KeyError for a
    name the file repeats. Missing (message ``missing``) or repeated: InvalidInput."""
    where = schema.get_all_field_indices(name)
    if not where:
        raise InvalidInput(missing)
    if len(where) > 1:
        raise InvalidInput(f"{f}: column {name!r} appears {len(where)} times; kvant cannot tell which one holds the "
                           f"vectors (rename the columns)")
    return schema.field(where[0])


def _repeated(names, counts) -> list[str]:
    return sorted({n for n in names if counts[n] > 1})


_SUPPORTED = "float32, float64, float16, int8, uint8"


def _list_files(p: Path, name: str) -> list[Path]:
    # as pyarrow.dataset does: a file or a sub-directory whose name starts with "_" or "." is not data
    # (Spark's _temporary/ staging, .ipynb_checkpoints/ copies, _SUCCESS, ...), and a link to a directory is followed
    # (Path.rglob did not follow one on Python 3.11: its rows vanished, a review); a link back to a directory above it
    # is an error, not an endless walk.
    # every entry with a parquet suffix that is not a directory: a broken link or a FIFO is listed, for the
    # per-file check to name, never skipped (its rows would vanish)
    files = []

    def walk(d: Path, above: frozenset) -> None:
        try:
            entries = sorted(d.iterdir())
        except OSError as err:  # (unreadable: an error, where skipping it would drop its rows)
            raise InvalidInput(f"{name}: cannot list {d}: {err.strerror or err}") from None
        for entry in entries:
            if entry.name.startswith(("_", ".")):
                continue
            if entry.is_dir():
                real = os.path.realpath(entry)
                if real in above:
                    raise InvalidInput(f"{name}: {entry} links back to {real}, a directory above it")
                walk(entry, above | {real})
            elif entry.suffix.lower() in PARQUET_SUFFIXES:
                files.append(entry)

    walk(p, frozenset({os.path.realpath(p)}))
    files.sort()
    if not files:
        raise InvalidInput(f"{name}: directory holds no parquet files (*.parquet, *.pq, *.parq)")
    return files


def _changed(path, what: str) -> str:
    """The message for a parquet file whose rows do not match what its footer said when it was opened."""
    return f"{path}: {what}; the file is damaged or was changed after it was opened"

class ParquetSource(VectorSource):
    """Vectors stored in a parquet file or a directory of parquet files.

    >>> import numpy as np, tempfile, os
    >>> from kvant.io import write_parquet
    >>> path = os.path.join(tempfile.mkdtemp(), "x.parquet")
    >>> write_parquet(path, np.ones((100, 8), np.float32), row_group_rows=32)
    >>> src = ParquetSource(path)
    >>> (src.n, src.dim, src.column)
    (100, 8, 'embedding')
    """

    def __init__(self, path, column=None, name: str | None = None):
        pa, pq = _pa()
        p = Path(os.fspath(path))
        self.path = p
        self.name = name or str(p)
        if not exists(p):
            raise missing(p, "parquet input")
        self.files = _list_files(p, self.name) if p.is_dir() else [p]
        metas, schemas = [], []
        for f in self.files:
            check_file(f, "parquet file")  # missing, a broken link, not a regular file, not readable
            try:
                metas.append(pq.read_metadata(f))
                schemas.append(pq.read_schema(f))
            except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: e.g. a damaged name's UTF-8
                raise InvalidInput(f"{f}: not a readable parquet file ({exc})") from None

        self._resolve_columns(schemas[0], column, self.files[0])
        if column is None and len(self.files) > 1:
            # the automatic choice must be the same in every file: an extra numeric column (or a second list
            # column) in a later file is an error, not silently dropped, whatever order the files sort in
            first = list(self.columns)
            for f, schema in zip(self.files[1:], schemas[1:], strict=True):
                self._resolve_columns(schema, None, f)
                if sorted(self.columns) != sorted(first):  # read by name: the order within a file is free
                    raise InvalidInput(
                        f"{f}: its vector columns would be {self.columns}, but {self.files[0]}'s are {first}; "
                        f"all files of a parquet directory must agree (or choose with column=...)"
                    )
            self._resolve_columns(schemas[0], None, self.files[0])  # the first file's order is the vectors'
        # per-file checks: same columns, same value types, same dim
        starts, rg_file, rg_index = [], [], []
        total = 0
        self.dim = -1
        dim_file = None
        value_types = []
        for fi, (f, meta, schema) in enumerate(zip(self.files, metas, schemas, strict=True)):
            value_types += self._check_schema(schema, f)
            if meta.num_rows > 0:
                d = self._file_dim(f, schema, meta)
                if self.dim < 0:
                    self.dim, dim_file = d, f
                elif d != self.dim:
                    raise DimensionMismatch(
                        f"{f}: vectors have dim {d}, but {dim_file} has dim {self.dim}; "
                        f"all files of a parquet directory must have the same dimension"
                    )
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if rows == 0:
                    continue
                starts.append(total)
                rg_file.append(fi)
                rg_index.append(g)
                total += rows
        if total == 0:
            raise zero_rows_error(f"{self.name}: has zero rows")
        self.dtype = _common_dtype(value_types)
        self.n = total
        self._rg_start = np.asarray(starts + [total], dtype=np.int64)
        self._rg_file = np.asarray(rg_file, dtype=np.int64)
        self._rg_index = np.asarray(rg_index, dtype=np.int64)
        self._open: tuple[int, object] | None = None
        self._cache: tuple[int, np.ndarray] | None = None

    # -- schema --------------------------------------------------------------------------------
    def _resolve_columns(self, schema, column, f) -> None:
        names = schema.names
        counts = Counter(names)
        if isinstance(column, str):
            if column not in names:
                raise InvalidInput(f"{f}: no column {column!r} (columns: {', '.join(names)})")
            cols = [column]
        elif column is None:
            # by position: a repeated name matters only if it is among the columns that would be read
            lists = [fl.name for fl in schema if _is_list(fl.type)]
            if _repeated(lists, counts):
                raise InvalidInput(f"{f}: repeated column name(s) {_repeated(lists, counts)} among the list columns; "
                                   f"rename them")
            if len(lists) > 1:
                raise InvalidInput(f"{f}: several list columns ({', '.join(lists)}); choose one with column=...")
            if lists:
                cols = lists
            else:
                cols = [fl.name for fl in schema if _is_numeric(fl.type)]
                if not cols:
                    raise InvalidInput(f"{f}: no list or numeric column to read vectors from (columns: {names})")
                if _repeated(cols, counts):
                    raise InvalidInput(
                        f"{f}: repeated column name(s) {_repeated(cols, counts)} among the numeric columns that "
                        f"column=None reads; rename them, or choose the vector columns with column=[...]"
                    )
        elif isinstance(column, list | tuple) and column and all(isinstance(c, str) for c in column):
            if len(set(column)) != len(column):
                repeated = sorted({c for c in column if list(column).count(c) > 1})
                raise InvalidInput(f"column= names {repeated} more than once; each vector column must be named once")
            missing = [c for c in column if c not in names]
            if missing:
                raise InvalidInput(f"{f}: no column(s) {missing} (columns: {', '.join(names)})")
            cols = list(column)
        else:
            raise InvalidInput(f"column must be a column name, a non-empty list of names, or None; got {column!r}")

        types = [_field(schema, c, f, f"{f}: no column {c!r}").type for c in cols]
        if len(cols) == 1 and _is_list(types[0]):
            self.mode = "list"
            vt = types[0].value_type
            if _numpy_dtype(vt) is None:
                raise InvalidInput(f"{f}: column {cols[0]!r} holds {vt} values; supported value types: {_SUPPORTED}")
        else:
            self.mode = "columns"
            for c, t in zip(cols, types, strict=True):
                if _is_list(t):
                    raise InvalidInput(f"{f}: column {c!r} is a list column; pass it alone as column={c!r}")
                if _numpy_dtype(t) is None:
                    raise InvalidInput(
                        f"{f}: column {c!r} has type {t}, which is not supported (supported: {_SUPPORTED}); "
                        f"pick the vector columns with column=[...]"
                    )
        # (the rows' dtype comes from every file's value types, after _check_schema: _common_dtype)
        self.columns = cols
        self.column = cols[0] if self.mode == "list" else None
        self._types = types

    def _check_schema(self, schema, f) -> list:
        """Check that file ``f`` holds the chosen columns in a supported type; return their value types.

        The value types may differ between files (float32 parts beside float64 ones, as two writers leave
        them): rows are assembled in the common dtype of all files (``_common_dtype``)."""
        types = []
        for c, t in zip(self.columns, self._types, strict=True):
            ft = _field(schema, c, f, f"{f}: no column {c!r}, which {self.files[0]} has").type
            if self.mode == "list":
                if not _is_list(ft):
                    raise InvalidInput(f"{f}: column {c!r} has type {ft}, but {self.files[0]} has {t}")
                ft = ft.value_type
            if _numpy_dtype(ft) is None:
                raise InvalidInput(f"{f}: column {c!r} has type {ft}, but {self.files[0]} has {t} "
                                   f"(supported value types: {_SUPPORTED})")
            types.append(ft)
        return types

    def _file_dim(self, f, schema, meta) -> int:
        if self.mode == "columns":
            return len(self.columns)
        t = _field(schema, self.columns[0], f, f"{f}: no column {self.columns[0]!r}").type
        if hasattr(t, "list_size"):
            if t.list_size < 1:
                raise InvalidInput(f"{f}: column {self.columns[0]!r} is a list of size {t.list_size} (zero columns)")
            return int(t.list_size)
        # variable-size list: the dim is the length of the first row (ragged rows are caught on read)
        pa, pq = _pa()
        try:
            pf = pq.ParquetFile(f)
            try:
                batch = next(pf.iter_batches(batch_size=1, columns=self.columns))
            finally:
                pf.close()
        except (pa.ArrowException, OSError, ValueError) as exc:  # a damaged first page
            raise InvalidInput(f"{f}: cannot decode row 0 of column {self.columns[0]!r}: {exc}") from None
        except StopIteration:
            raise InvalidInput(f"{f}: column {self.columns[0]!r} has no rows to take the dimension from") from None
        arr = batch.column(0)
        if arr.null_count:
            raise InvalidInput(f"{f}: row 0 of column {self.columns[0]!r} is null")
        d = int(arr.value_lengths()[0].as_py())
        if d == 0:
            raise InvalidInput(f"{f}: row 0 of column {self.columns[0]!r} is an empty list (zero columns)")
        return d

    # -- decoding ------------------------------------------------------------------------------
    def _to_numpy(self, batch, start: int) -> np.ndarray:
        """A record batch or table (the selected columns) as an (rows, dim) array of the stored dtype."""
        pa, _ = _pa()
        if self.mode == "columns":
            out = np.empty((batch.num_rows, self.dim), self.dtype)
            for j in range(self.dim):
                col = batch.column(j)
                if col.null_count:
                    row = int(np.argmax(np.asarray(col.is_null())))
                    raise InvalidInput(f"{self.name}: null in column {self.columns[j]!r} at row {start + row}")
                out[:, j] = col.to_numpy()
            return out
        col = batch.column(0)
        chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
        parts, offset = [], start
        for arr in chunks:
            m = len(arr)
            if arr.null_count:
                row = int(np.argmax(np.asarray(arr.is_null())))
                raise InvalidInput(f"{self.name}: row {offset + row} of column {self.column!r} is null")
            if not pa.types.is_fixed_size_list(arr.type):
                lengths = np.asarray(arr.value_lengths())
                bad = lengths != self.dim
                if bad.any():
                    i = int(np.argmax(bad))
                    raise InvalidInput(
                        f"{self.name}: ragged list column {self.column!r}: row {offset + i} has "
                        f"{int(lengths[i])} values, expected {self.dim} (the length of the first row)"
                    )
            values = arr.flatten()
            if values.null_count:
                i = int(np.argmax(np.asarray(values.is_null())))
                raise InvalidInput(f"{self.name}: null value in column {self.column!r} at row {offset + i // self.dim}")
            parts.append(values.to_numpy(zero_copy_only=False).reshape(m, self.dim).astype(self.dtype, copy=False))
            offset += m
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty((0, self.dim), self.dtype)
        return np.concatenate(parts)

    def _pf(self, fi: int):
        if self._open is None or self._open[0] != fi:
            _, pq = _pa()
            self.close()
            self._open = (fi, pq.ParquetFile(self.files[fi], pre_buffer=False))
        return self._open[1]

    def read_units(self) -> np.ndarray:
        return self._rg_start.copy()

    def _row_group(self, g: int) -> np.ndarray:
        """Decoded row group number ``g`` (global numbering), cached one at a time."""
        if self._cache is not None and self._cache[0] == g:
            return self._cache[1]
        pa, _ = _pa()
        fi = int(self._rg_file[g])
        try:
            table = self._pf(fi).read_row_group(int(self._rg_index[g]), columns=self.columns)
        except (pa.ArrowException, OSError) as exc:  # a damaged page: the footer was readable, the data not
            raise InvalidInput(f"{self.files[fi]}: cannot decode row group {int(self._rg_index[g])}: {exc}") from exc
        block = self._to_numpy(table, int(self._rg_start[g]))
        want = int(self._rg_start[g + 1] - self._rg_start[g])
        if block.shape[0] != want:
            raise InvalidInput(_changed(self.files[fi], f"row group {int(self._rg_index[g])} decodes to "
                                        f"{block.shape[0]} rows where its footer said {want}"))
        self._cache = (g, block)
        return block

    def _read(self, start: int, stop: int) -> np.ndarray:
        g0 = int(np.searchsorted(self._rg_start, start, side="right")) - 1
        g1 = int(np.searchsorted(self._rg_start, stop, side="left"))
        parts = []
        for g in range(g0, g1):
            lo, hi = int(self._rg_start[g]), int(self._rg_start[g + 1])
            block = self._row_group(g)
            parts.append(block[max(start, lo) - lo : min(stop, hi) - lo])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # -- protocol ------------------------------------------------------------------------------
    def chunks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        rows = chunk_rows(rows, self.dim)
        pa, pq = _pa()
        buf: list[np.ndarray] = []
        have = 0
        pos = 0  # global row of the first buffered row
        read = 0  # global row of the next row to decode
        for fi, f in enumerate(self.files):
            groups = self._rg_index[self._rg_file == fi]
            if groups.size == 0:
                continue
            end = int(self._rg_start[np.flatnonzero(self._rg_file == fi)[-1] + 1])  # the rows the footers promised
            pos0 = read
            try:
                pf = pq.ParquetFile(f, pre_buffer=False)  # pre-buffering would read the whole file
                batches = pf.iter_batches(batch_size=rows, row_groups=groups.tolist(), columns=self.columns)
            except (pa.ArrowException, OSError, ValueError) as exc:  # changed or damaged since it was opened
                raise InvalidInput(f"{f}: not a readable parquet file ({exc})") from None
            try:
                while True:
                    try:
                        batch = next(batches)
                    except StopIteration:
                        break
                    except (pa.ArrowException, OSError) as exc:  # a damaged page
                        raise InvalidInput(f"{f}: cannot decode rows after row {read}: {exc}") from exc
                    block = self._to_numpy(batch, read)
                    read += block.shape[0]
                    if read > end:
                        raise InvalidInput(_changed(f, f"it decodes to more rows than its footer said ({end - pos0})"))
                    buf.append(block)
                    have += block.shape[0]
                    while have >= rows:
                        raw, buf, have = _take_front(buf, rows, have)
                        yield pos, checked_float32(raw, pos, self.name)
                        pos += rows
            finally:
                pf.close()
            if read != end:  # rows the footer counted that no page holds: never left as unwritten memory
                raise InvalidInput(_changed(f, f"it decodes to {read - pos0} rows where its footer said {end - pos0}"))
        if have:
            yield pos, checked_float32(np.concatenate(buf) if len(buf) > 1 else buf[0], pos, self.name)

    def take(self, indices) -> np.ndarray:
        idx = self._check_indices(indices)
        out = np.empty((idx.size, self.dim), np.float32)
        if idx.size == 0:
            return out
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        groups = np.searchsorted(self._rg_start, sidx, side="right") - 1
        bounds = np.flatnonzero(np.diff(groups)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, sidx.size], strict=True):
            g = int(groups[lo])
            block = self._row_group(g)
            with np.errstate(over="ignore"):
                out[order[lo:hi]] = block[sidx[lo:hi] - self._rg_start[g]]
        check_finite_rows(out, idx, self.name, lambda i: self._read(int(idx[i]), int(idx[i]) + 1)[0])
        return out

    def close(self) -> None:
        """Close the open file handle and drop the cached row group."""
        if self._open is not None:
            try:
                self._open[1].close()
            finally:
                self._open = None
        self._cache = None


def _take_front(buf: list[np.ndarray], rows: int, have: int):
    """Split the first ``rows`` rows off a list of blocks."""
    parts, need = [], rows
    while need:
        b = buf[0]
        if b.shape[0] <= need:
            parts.append(b)
            need -= b.shape[0]
            buf = buf[1:]
        else:
            parts.append(b[:need])
            buf = [b[need:]] + buf[1:]
            need = 0
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out, buf, have - rows


def write_parquet(
    path, x, column: str = "embedding", row_group_rows: int | None = None, dtype=np.float32, compression="none"
) -> None:
    """Write ``x`` (n, dim) as a parquet file with one ``fixed_size_list<dtype>`` column.

    ``dtype`` is one of the types the reader accepts (float32, float64, float16, int8, uint8). Values are never
    changed silently: zero rows, a finite value that would become inf, or an integer the target type cannot
    hold exactly raise InvalidInput (as the TEXMEX writers do), and so do float64 values beyond float32's range,
    which the reader refuses as kvant computes in float32. ``row_group_rows`` sets the row group size
    (pyarrow's default when None). Dictionary encoding and column statistics are off and compression defaults
    to none: float embeddings do not compress, and all three slow reading down (measured: 0.14 GB/s with
    pyarrow's defaults vs 0.37 GB/s without).
    """
    pa, pq = _pa()
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise InvalidInput(f"dtype {dtype!r} is not a NumPy dtype (supported: {_SUPPORTED})") from None
    if dt.type not in SUPPORTED_DTYPES:
        raise InvalidInput(f"dtype {dt} is not supported (supported: {_SUPPORTED}); the reader would refuse the file")
    if not isinstance(column, str) or not column:
        raise InvalidInput(f"column must be a non-empty column name, got {column!r}")
    values = np.ascontiguousarray(values_to_write(x, dt.newbyteorder("=")))
    if dt == np.float64:  # the reader computes in float32 and refuses finite values that become inf there
        with np.errstate(over="ignore"):
            row = first_overflow(values, values.astype(np.float32))
        if row is not None:
            raise InvalidInput(f"values beyond float32's range (±3.4e38; first at row {row}): kvant computes in "
                               f"float32, so its reader would refuse the file")
    flat = pa.array(values.reshape(-1))
    table = pa.table({column: pa.FixedSizeListArray.from_arrays(flat, values.shape[1])})
    rg = row_group_rows
    if rg is not None and (isinstance(rg, bool) or not isinstance(rg, int | np.integer) or rg < 1):
        raise InvalidInput(f"row_group_rows must be an integer >= 1 or None, got {row_group_rows!r}")
    kwargs = {} if row_group_rows is None else {"row_group_size": int(row_group_rows)}
    if compression is not None and not isinstance(compression, str):
        raise InvalidInput(f"compression must be a codec name such as 'zstd' or 'none', got {compression!r}")
    # through a temporary file: pyarrow removes its target when writing fails (a bad compression= name deleted an
    # existing file at that path)
    try:
        with writing(path) as fh:
            pq.write_table(table, fh, use_dictionary=False, write_statistics=False, compression=compression, **kwargs)
    except InvalidInput:
        raise
    except (pa.ArrowException, ValueError) as exc:  # e.g. an unknown compression= name
        raise InvalidInput(f"cannot write {path}: {exc}") from None
