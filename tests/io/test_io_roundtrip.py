"""Every input format round-trips to the same float32 array through chunks / take / sample / to_array."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvant.io import (
    ArraySource,
    Hdf5Source,
    NpySource,
    ParquetSource,
    TexmexSource,
    VectorSource,
    as_source,
    write_bvecs,
    write_fvecs,
    write_ivecs,
    write_parquet,
)

DTYPES = [np.float32, np.float64, np.float16, np.int8, np.uint8]


def _data(n, dim, dtype, seed=0):
    g = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return (g.standard_normal((n, dim)) * 10).astype(dtype)
    info = np.iinfo(dtype)
    return g.integers(info.min, info.max, size=(n, dim), endpoint=True).astype(dtype)


def _write(fmt, tmp: Path, x: np.ndarray):
    """Store ``x`` in format ``fmt``; return (what to pass to as_source, column, expected source class)."""
    if fmt == "array":
        return x, None, ArraySource
    if fmt == "memmap":
        path = tmp / "x.bin"
        mm = np.memmap(path, dtype=x.dtype, mode="w+", shape=x.shape)
        mm[:] = x
        mm.flush()
        return np.memmap(path, dtype=x.dtype, mode="r", shape=x.shape), None, ArraySource
    if fmt == "npy":
        np.save(tmp / "x.npy", x)
        return str(tmp / "x.npy"), None, NpySource
    if fmt == "npy-fortran":
        np.save(tmp / "x.npy", np.asfortranarray(x))
        return tmp / "x.npy", None, NpySource
    if fmt == "fvecs":
        write_fvecs(tmp / "x.fvecs", x)
        return tmp / "x.fvecs", None, TexmexSource
    if fmt == "bvecs":
        write_bvecs(tmp / "x.bvecs", x)
        return str(tmp / "x.bvecs"), None, TexmexSource
    if fmt == "ivecs":
        write_ivecs(tmp / "x.ivecs", x)
        return tmp / "x.ivecs", None, TexmexSource
    if fmt == "parquet":
        write_parquet(tmp / "x.parquet", x, row_group_rows=7, dtype=x.dtype)
        return tmp / "x.parquet", None, ParquetSource
    if fmt == "parquet-list":  # variable-size list column, chosen by name next to another list column
        vals = pa.array(x.reshape(-1))
        offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32))
        lists = pa.ListArray.from_arrays(offsets, vals)
        tbl = pa.table({"emb": lists, "other": lists})
        pq.write_table(tbl, tmp / "x.parquet", row_group_size=5)
        return tmp / "x.parquet", "emb", ParquetSource
    if fmt == "parquet-columns":  # one scalar column per dimension, picked up with column=None
        tbl = pa.table({f"c{j}": x[:, j] for j in range(x.shape[1])})
        pq.write_table(tbl, tmp / "x.parquet", row_group_size=6)
        return tmp / "x.parquet", None, ParquetSource
    if fmt == "parquet-dir":
        d = tmp / "parts"
        d.mkdir()
        bounds = [0, x.shape[0] // 3, x.shape[0] // 3, x.shape[0]]  # includes an empty file
        for i in range(3):
            part = x[bounds[i] : bounds[i + 1]]
            if part.shape[0]:
                write_parquet(d / f"part-{i}.parquet", part, row_group_rows=4, dtype=x.dtype)
            else:  # write_parquet refuses zero rows (a file alone would be unreadable); pyarrow writes one
                typ = pa.list_(pa.from_numpy_dtype(x.dtype), x.shape[1])
                pq.write_table(pa.table({"embedding": pa.array([], typ)}), d / f"part-{i}.parquet")
        (d / "_SUCCESS").write_text("")
        for hidden in ("_temporary/0", ".ipynb_checkpoints"):  # copies that are not data (as pyarrow.dataset)
            (d / hidden).mkdir(parents=True)
            write_parquet(d / hidden / "part-0.parquet", x, row_group_rows=4, dtype=x.dtype)
        return d, None, ParquetSource
    if fmt == "hdf5":
        with h5py.File(tmp / "x.hdf5", "w") as f:
            f["train"] = x
            f["test"] = x[:1]
        return tmp / "x.hdf5", None, Hdf5Source
    if fmt == "hdf5-test":
        with h5py.File(tmp / "x.h5", "w") as f:
            f["train"] = x[:1]
            f["test"] = x
        return tmp / "x.h5", "test", Hdf5Source
    raise AssertionError(fmt)


FORMAT_DTYPES = [("array", d) for d in DTYPES] + [("memmap", d) for d in DTYPES]
FORMAT_DTYPES += [("npy", d) for d in DTYPES] + [("npy-fortran", np.float32)]
FORMAT_DTYPES += [("fvecs", np.float32), ("bvecs", np.uint8), ("ivecs", np.int8)]
FORMAT_DTYPES += [("parquet", d) for d in DTYPES]
FORMAT_DTYPES += [("parquet-list", np.float32), ("parquet-list", np.float16), ("parquet-columns", np.float64)]
FORMAT_DTYPES += [("parquet-dir", np.float32), ("parquet-dir", np.uint8)]
FORMAT_DTYPES += [("hdf5", d) for d in DTYPES] + [("hdf5-test", np.float32)]


def _check_source(src: VectorSource, expected: np.ndarray, rows: int, seed: int = 0):
    assert (src.n, src.dim) == expected.shape
    full = src.to_array()
    assert full.dtype == np.float32 and full.flags.c_contiguous
    np.testing.assert_array_equal(full, expected)
    seen = 0
    for start, block in src.chunks(rows):
        assert start == seen
        assert block.dtype == np.float32 and block.flags.c_contiguous
        assert 1 <= block.shape[0] <= rows and block.shape[1] == src.dim
        np.testing.assert_array_equal(block, expected[start : start + block.shape[0]])
        seen += block.shape[0]
    assert seen == src.n
    g = np.random.default_rng(seed)
    idx = g.integers(0, src.n, size=2 * src.n + 3)  # any order, with repeats
    got = src.take(idx)
    assert got.dtype == np.float32 and got.shape == (idx.size, src.dim)
    np.testing.assert_array_equal(got, expected[idx])
    assert src.take(np.array([], dtype=np.int64)).shape == (0, src.dim)
    m = max(1, src.n // 2)
    s1 = src.sample(m, seed=3)
    np.testing.assert_array_equal(s1, src.sample(m, seed=3))  # deterministic
    np.testing.assert_array_equal(s1, expected[src.sample_indices(m, seed=3)])
    assert src.sample(10 * src.n, seed=1).shape == (src.n, src.dim)


@pytest.mark.parametrize("fmt,dtype", FORMAT_DTYPES, ids=[f"{f}-{np.dtype(d).name}" for f, d in FORMAT_DTYPES])
def test_round_trip(tmp_path, fmt, dtype):
    x = _data(23, 5, dtype)
    arg, column, cls = _write(fmt, tmp_path, x)
    src = as_source(arg, column=column)
    assert isinstance(src, cls)
    assert src.dtype == np.dtype(dtype) or fmt == "ivecs"
    _check_source(src, x.astype(np.float32), rows=4)
    _check_source(src, x.astype(np.float32), rows=1000)


@settings(max_examples=25, deadline=None)
@given(
    fmt=st.sampled_from(["array", "npy", "fvecs", "parquet", "parquet-dir", "hdf5"]),
    dtype=st.sampled_from(DTYPES),
    n=st.integers(1, 40),
    dim=st.integers(1, 9),
    rows=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_round_trip_hypothesis(tmp_path_factory, fmt, dtype, n, dim, rows, seed):
    if fmt == "fvecs":
        dtype = np.float32
    if fmt == "parquet-dir" and n < 3:
        n = 3
    x = _data(n, dim, dtype, seed)
    arg, column, _ = _write(fmt, tmp_path_factory.mktemp("rt"), x)
    _check_source(as_source(arg, column=column), x.astype(np.float32), rows=rows, seed=seed)


def test_float32_array_is_never_copied():
    x = _data(50, 8, np.float32)
    src = as_source(x)
    assert src.to_array() is x
    for _start, block in src.chunks(16):
        assert np.shares_memory(block, x)


def test_other_dtypes_convert_per_chunk():
    x = _data(50, 8, np.float16)
    src = as_source(x)
    blocks = [b for _, b in src.chunks(16)]
    assert [b.shape[0] for b in blocks] == [16, 16, 16, 2]
    assert all(b.dtype == np.float32 for b in blocks)


def test_source_passthrough_and_repr(tmp_path):
    src = as_source(_data(4, 3, np.float32))
    assert as_source(src) is src
    assert "n=4" in repr(src) and len(src) == 4


def test_parquet_take_decodes_one_row_group_at_a_time(tmp_path):
    x = _data(100, 6, np.float32)
    write_parquet(tmp_path / "x.parquet", x, row_group_rows=10)
    src = as_source(tmp_path / "x.parquet")
    np.testing.assert_array_equal(src.take([95, 3, 41, 3]), x[[95, 3, 41, 3]])
    assert src._cache[1].shape[0] <= 10  # only the last decoded row group is kept
    np.testing.assert_array_equal(src._read(8, 33), x[8:33])
    src.close()


def test_parquet_column_list(tmp_path):
    x = _data(30, 3, np.float32)
    tbl = pa.table({"id": np.arange(30, dtype=np.int64), "a": x[:, 0], "b": x[:, 1], "c": x[:, 2]})
    pq.write_table(tbl, tmp_path / "x.parquet", row_group_size=8)
    src = as_source(tmp_path / "x.parquet", column=["c", "a"])
    np.testing.assert_array_equal(src.to_array(), x[:, [2, 0]])


def _rss_file_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no RssFile")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("fmt", ["npy", "npy-fortran", "fvecs", "memmap"])
def test_memmap_scan_keeps_resident_set_bounded(tmp_path, fmt):
    x = np.arange(48 * 2**20 // 4, dtype=np.float32).reshape(-1, 256)  # 48 MiB
    arg, _, _ = _write(fmt, tmp_path, x)
    (tmp_path / "warm").mkdir()
    warm, _, _ = _write(fmt, tmp_path / "warm", x[:64])  # (first scans map Numba's cached kernels: RssFile too)
    list(as_source(warm).chunks(16))
    before = _rss_file_mb()
    src = as_source(arg)  # (the TEXMEX header check at open reads every page too)
    kept = []
    peak = _rss_file_mb() - before
    for start, block in src.chunks(4096):  # 4 MiB blocks
        if start == 0:
            kept.append(block)
            block *= 2  # blocks are the caller's own: writing into them changes nothing in the source
        peak = max(peak, _rss_file_mb() - before)
    assert peak < 16, f"scanned pages stay resident: +{peak:.0f} MB of a 48 MB file"
    np.testing.assert_array_equal(kept[0], 2 * x[:4096])
    np.testing.assert_array_equal(next(src.chunks(4096))[1], x[:4096])
    np.testing.assert_array_equal(src.take([0, 5]), x[[0, 5]])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("fmt", ["npy", "npy-fortran", "fvecs"])
def test_memmap_sample_gathers_without_mapping_the_file(tmp_path, fmt):
    # 8,192 random rows of a 48 MiB file hit nearly every page; gathered in sorted pieces with the pages
    # behind each piece dropped, the file never becomes resident (a plain fancy-index gather maps all of it).
    # (Until 2026-12-06 only C-order .npy files did this: a Fortran-order .npy or a .fvecs file became resident.)
    x = np.arange(48 * 2**20 // 4, dtype=np.float32).reshape(-1, 128)
    arg, _, _ = _write(fmt, tmp_path, x)
    src = as_source(arg)
    idx = src.sample_indices(8192, seed=0)
    before = _rss_file_mb()
    got = src.take(idx)
    grown = _rss_file_mb() - before
    assert grown < 16, f"the sampled file stayed resident: +{grown:.0f} MB of 48 MB"
    np.testing.assert_array_equal(got, x[idx])
    np.testing.assert_array_equal(src.sample(8192, seed=0), x[idx])
    np.testing.assert_array_equal(src.take(idx[::-1]), x[idx[::-1]])  # unsorted: plain gather, same rows
