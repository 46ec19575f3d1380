"""Bad input raises InvalidInput (or DimensionMismatch) with a message naming the problem."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvant
import kvant.io.texmex as texmex
from kvant.errors import DimensionMismatch, InvalidInput, KvantError
from kvant.io import as_source, write_fvecs, write_ivecs, write_parquet

GOOD = [np.float32, np.float64, np.float16, np.int8, np.uint8]
BAD = [np.int64, np.int32, np.int16, np.uint16, np.uint32, np.uint64, np.bool_, np.complex64, np.longdouble]


def _consume(src):
    for _ in src.chunks(3):
        pass


# -- arrays ----------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 30),
    dim=st.integers(0, 6),
    dtype=st.sampled_from(GOOD + BAD),
    bad=st.lists(st.tuples(st.integers(0, 29), st.integers(0, 5), st.sampled_from([np.nan, np.inf, -np.inf]))),
    extra_dims=st.sampled_from([(), (2,), None]),
)
def test_array_validation(n, dim, dtype, bad, extra_dims):
    if extra_dims is None:  # 1-D input
        x = np.zeros(n, dtype)
    else:
        x = np.zeros((n, dim) + extra_dims, dtype)
    bad = [(r, c, v) for r, c, v in bad if r < n and c < dim]
    if np.dtype(dtype).kind in "fc" and extra_dims == ():
        for r, c, v in bad:
            x[r, c] = v
    with pytest.raises(InvalidInput) if _should_fail(x, dtype, bad) else _nothing():
        src = as_source(x)
        assert src.to_array().shape == x.shape
    if x.ndim != 2:
        with pytest.raises(InvalidInput, match="2-D"):
            as_source(x)
    elif dtype not in GOOD:
        with pytest.raises(InvalidInput, match="not supported.*float32"):
            as_source(x)
    elif n == 0:
        with pytest.raises(InvalidInput, match="zero rows"):
            as_source(x)
    elif dim == 0:
        with pytest.raises(InvalidInput, match="zero columns"):
            as_source(x)
    elif bad and np.dtype(dtype).kind == "f":
        first = min(r for r, _, _ in bad)
        with pytest.raises(InvalidInput, match=rf"NaN or inf \(first bad row: {first}\)"):
            as_source(x)


def _should_fail(x, dtype, bad):
    return x.ndim != 2 or dtype not in GOOD or 0 in x.shape or (bool(bad) and np.dtype(dtype).kind == "f")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), row=st.integers(0, 39), rows=st.integers(1, 12), dtype=st.sampled_from(GOOD[:3]))
def test_memmap_nan_found_while_reading(tmp_path_factory, n, row, rows, dtype):
    row = row % n
    path = tmp_path_factory.mktemp("mm") / "x.npy"
    x = np.ones((n, 3), dtype)
    x[row, 1] = np.nan
    np.save(path, x)
    src = as_source(path)  # memory-mapped: not read at open
    with pytest.raises(InvalidInput, match=rf"first bad row: {row}\)"):
        _consume(src)
    with pytest.raises(InvalidInput, match=rf"first bad row: {row}\)"):
        src.take([row, 0])  # names the file row, not the position in the index list
    with pytest.raises(InvalidInput, match=rf"first bad row: {row}\)"):
        src.to_array()


def test_int64_rejected_with_supported_list():
    with pytest.raises(InvalidInput, match="int64 is not supported .*float32, float64, float16, int8, uint8"):
        as_source(np.zeros((3, 2), np.int64))


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_masked_arrays_are_refused_and_matrices_read_as_arrays():
    m = np.ma.masked_array(np.ones((3, 4), np.float32), mask=[[1, 0, 0, 0]] * 3)
    with pytest.raises(InvalidInput, match="masked arrays are not supported"):
        as_source(m)
    src = as_source(np.matrix(np.arange(6, dtype=np.float32).reshape(3, 2)))
    out = src.to_array()
    assert type(out) is np.ndarray and out.shape == (3, 2) and out[2, 1] == 5.0


def test_hdf5_damaged_chunk_is_invalid_input(tmp_path):
    p = tmp_path / "cz.h5"
    a = np.arange(400, dtype=np.float32).reshape(100, 4)
    with h5py.File(p, "w") as f:
        f.create_dataset("gz", data=a, chunks=(10, 4), compression="gzip")
    with h5py.File(p, "r") as f:
        offset = f["gz"].id.get_chunk_info(3).byte_offset
    raw = bytearray(p.read_bytes())
    raw[offset : offset + 20] = b"\xff" * 20
    p.write_bytes(bytes(raw))
    src = as_source(p, column="gz")
    with pytest.raises(InvalidInput, match="cannot read"):
        src.to_array()
    with pytest.raises(InvalidInput, match="cannot read"):
        src.take([35])


def test_not_an_array():
    with pytest.raises(InvalidInput, match="list"):
        as_source([[1.0, 2.0]])
    with pytest.raises(InvalidInput, match="dict"):
        as_source({"a": 1})
    with pytest.raises(InvalidInput, match="column="):
        as_source(np.zeros((2, 2), np.float32), column="x")


def test_bad_chunk_rows_and_indices():
    src = as_source(np.zeros((5, 2), np.float32))
    with pytest.raises(InvalidInput, match="chunk rows"):
        list(src.chunks(0))
    with pytest.raises(InvalidInput, match="out of range"):
        src.take([5])
    with pytest.raises(InvalidInput, match="out of range"):
        src.take([-1])
    with pytest.raises(InvalidInput, match="integer"):
        src.take([0.5])


# -- paths -----------------------------------------------------------------------------------------
def test_missing_and_unsupported_files(tmp_path):
    for p in [tmp_path / "nope.npy", str(tmp_path / "nope.fvecs"), tmp_path / "nope.parquet", tmp_path / "a.h5"]:
        with pytest.raises(InvalidInput, match="not found"):
            as_source(p)
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(InvalidInput, match="unsupported file type '.csv'"):
        as_source(tmp_path / "x.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInput, match="no parquet files"):
        as_source(empty)
    np.save(tmp_path / "x.npy", np.zeros((2, 2), np.float32))
    with pytest.raises(InvalidInput, match="column="):
        as_source(tmp_path / "x.npy", column="train")


def test_npy_problems(tmp_path):
    np.save(tmp_path / "o.npy", np.array([[{"a": 1}]], dtype=object))
    with pytest.raises(InvalidInput, match="not a readable .npy"):
        as_source(tmp_path / "o.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(InvalidInput):
        as_source(tmp_path / "junk.npy")
    np.save(tmp_path / "i.npy", np.zeros((2, 2), np.int64))
    with pytest.raises(InvalidInput, match="int64 is not supported"):
        as_source(tmp_path / "i.npy")
    np.save(tmp_path / "z.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(InvalidInput, match="zero rows"):
        as_source(tmp_path / "z.npy")
    np.save(tmp_path / "v.npy", np.zeros(4, np.float32))
    with pytest.raises(InvalidInput, match="2-D"):
        as_source(tmp_path / "v.npy")


def test_npy_cut_before_its_magic_string_is_called_truncated_not_pickled(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.ones((10, 4), np.float32))
    data = p.read_bytes()
    for cut in (0, 1, 5):
        p.write_bytes(data[:cut])
        with pytest.raises(InvalidInput, match="truncated or empty") as err:
            as_source(p)
        assert "pickle" not in str(err.value)
    p.write_bytes(b"PK\x03\x04 not numpy")
    with pytest.raises(InvalidInput, match="not a .npy file"):
        as_source(p)


@pytest.mark.parametrize("rows", [2.7, True, "abc", [2], 0, -1])
def test_chunks_rejects_a_block_size_that_is_not_a_positive_integer(tmp_path, rows):
    x = np.ones((10, 3), np.float32)
    write_parquet(tmp_path / "x.parquet", x)
    for src in (as_source(x), as_source(tmp_path / "x.parquet")):
        with pytest.raises(InvalidInput, match="chunk rows must be an integer >= 1"):
            next(iter(src.chunks(rows)))
    assert [b.shape[0] for _, b in as_source(x).chunks(np.int16(4))] == [4, 4, 2]


# -- TEXMEX ----------------------------------------------------------------------------------------
def test_fvecs_truncated(tmp_path):
    p = tmp_path / "x.fvecs"
    write_fvecs(p, np.ones((10, 4), np.float32))
    data = p.read_bytes()
    p.write_bytes(data[:-3])
    with pytest.raises(InvalidInput, match="not a multiple of the record size 20"):
        as_source(p)
    p.write_bytes(b"")
    with pytest.raises(InvalidInput, match="empty"):
        as_source(p)
    p.write_bytes(b"\x01\x00")
    with pytest.raises(InvalidInput, match="truncated"):
        as_source(p)
    p.write_bytes(np.array([-3, 0, 0, 0], "<i4").tobytes())
    with pytest.raises(InvalidInput, match="bad dimension header -3"):
        as_source(p)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 30), row=st.integers(1, 29), eager=st.booleans(), header=st.integers(-5, 10))
def test_fvecs_dim_mismatch_named(tmp_path_factory, monkeypatch_session, n, row, eager, header):
    row = max(1, row % n)
    if header == 4:
        header = 5
    p = tmp_path_factory.mktemp("fv") / "x.fvecs"
    write_fvecs(p, np.ones((n, 4), np.float32))
    raw = bytearray(p.read_bytes())
    raw[row * 20 : row * 20 + 4] = np.int32(header).tobytes()
    p.write_bytes(bytes(raw))
    monkeypatch_session.setattr(texmex, "EAGER_CHECK_BYTES", 1 << 30 if eager else 0)
    if eager:
        with pytest.raises(InvalidInput, match=f"dim mismatch at row {row} "):
            as_source(p)
    else:  # large files: the headers are checked as rows are read
        src = as_source(p)
        with pytest.raises(InvalidInput, match=f"dim mismatch at row {row} "):
            _consume(src)
        with pytest.raises(InvalidInput, match=f"dim mismatch at row {row} "):
            src.take([0, row])
        np.testing.assert_array_equal(src.take([0]), np.ones((1, 4), np.float32))


@pytest.fixture(scope="module")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_fvecs_nan_row_named(tmp_path, raw_fvecs):
    x = np.ones((12, 3), np.float32)
    x[7, 2] = np.inf
    raw_fvecs(tmp_path / "x.fvecs", x)  # (write_fvecs refuses inf)
    src = as_source(tmp_path / "x.fvecs")
    with pytest.raises(InvalidInput, match=r"first bad row: 7\)"):
        _consume(src)
    with pytest.raises(InvalidInput, match=r"first bad row: 7\)"):
        src.take([0, 7])


def test_ivecs_values_must_fit_float32(tmp_path):
    x = np.zeros((4, 2), np.int32)
    x[2, 1] = (1 << 24) + 1
    with pytest.raises(InvalidInput, match=r"outside \+-2\*\*24"):  # the writer refuses it too ...
        write_ivecs(tmp_path / "x.ivecs", x)
    records = np.concatenate([np.full((4, 1), 2, "<i4"), x.astype("<i4")], axis=1)
    records.tofile(tmp_path / "x.ivecs")  # ... so write the file by hand
    src = as_source(tmp_path / "x.ivecs")
    with pytest.raises(InvalidInput, match="row 2 is outside"):
        src.to_array()
    with pytest.raises(InvalidInput, match="row 2 is outside"):
        src.take([3, 2])


def test_writers_validate(tmp_path):
    with pytest.raises(InvalidInput, match="2-D"):
        write_fvecs(tmp_path / "x.fvecs", np.zeros(3))
    with pytest.raises(InvalidInput, match="fit exactly"):
        texmex.write_bvecs(tmp_path / "x.bvecs", np.full((2, 2), 300))
    with pytest.raises(InvalidInput, match="2-D"):
        write_parquet(tmp_path / "x.parquet", np.zeros(3))


# -- parquet ---------------------------------------------------------------------------------------
def _list_table(rows, value_type=None):
    return pa.table({"emb": pa.array(rows, type=pa.list_(value_type or pa.float32()))})


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 40), row=st.integers(1, 39), delta=st.sampled_from([-1, 1, 2]), rg=st.integers(1, 9))
def test_ragged_parquet_names_row(tmp_path_factory, n, row, delta, rg):
    row = max(1, row % n)
    rows = [[1.0, 2.0, 3.0] for _ in range(n)]
    rows[row] = [1.0] * (3 + delta)
    p = tmp_path_factory.mktemp("pq") / "x.parquet"
    pq.write_table(_list_table(rows), p, row_group_size=rg)
    src = as_source(p)
    assert src.dim == 3
    with pytest.raises(InvalidInput, match=f"ragged list column 'emb': row {row} has {3 + delta} values"):
        _consume(src)
    with pytest.raises(InvalidInput, match=f"row {row} has"):
        src.take(np.arange(n))


def test_parquet_nulls_and_types(tmp_path, raw_parquet):
    p = tmp_path / "x.parquet"
    pq.write_table(_list_table([[1.0, 2.0], None, [3.0, 4.0]]), p)
    with pytest.raises(InvalidInput, match="row 1 of column 'emb' is null"):
        as_source(p).to_array()
    pq.write_table(_list_table([[1.0, 2.0], [3.0, None]]), p)
    with pytest.raises(InvalidInput, match="null value in column 'emb' at row 1"):
        as_source(p).to_array()
    pq.write_table(_list_table([[1, 2]], pa.int64()), p)
    with pytest.raises(InvalidInput, match="int64 values; supported value types: float32"):
        as_source(p)
    pq.write_table(_list_table([[]]), p)
    with pytest.raises(InvalidInput, match="empty list"):
        as_source(p)
    pq.write_table(pa.table({"id": np.arange(3), "a": np.ones(3, np.float32)}), p)
    with pytest.raises(InvalidInput, match="'id' has type int64.*column=\\[...\\]"):
        as_source(p)
    assert as_source(p, column=["a"]).dim == 1
    pq.write_table(pa.table({"a": pa.array([1.0, None], pa.float32())}), p)
    with pytest.raises(InvalidInput, match="null in column 'a' at row 1"):
        as_source(p).to_array()
    pq.write_table(pa.table({"e": _list_table([[1.0]])["emb"], "f": _list_table([[1.0]])["emb"]}), p)
    with pytest.raises(InvalidInput, match="several list columns"):
        as_source(p)
    with pytest.raises(InvalidInput, match="no column 'g'"):
        as_source(p, column="g")
    with pytest.raises(InvalidInput, match="column must be"):
        as_source(p, column=3)
    pq.write_table(pa.table({"s": ["x"]}), p)
    with pytest.raises(InvalidInput, match="no list or numeric column"):
        as_source(p)
    pq.write_table(_list_table([]), p)
    with pytest.raises(InvalidInput, match="zero rows"):
        as_source(p)
    x = np.ones((4, 2), np.float32)
    x[2, 0] = np.nan
    raw_parquet(p, x, row_group_rows=2)  # (write_parquet refuses NaN)
    with pytest.raises(InvalidInput, match=r"first bad row: 2\)"):
        as_source(p).to_array()
    with pytest.raises(InvalidInput, match=r"first bad row: 2\)"):
        as_source(p).take([3, 2])
    p.write_bytes(b"PAR1 garbage")
    with pytest.raises(InvalidInput, match="not a readable parquet file"):
        as_source(p)


def test_parquet_directory_mismatch(tmp_path):
    write_parquet(tmp_path / "a.parquet", np.ones((3, 4), np.float32))
    write_parquet(tmp_path / "b.parquet", np.ones((3, 5), np.float32))
    with pytest.raises(DimensionMismatch, match="dim 5.*dim 4"):
        as_source(tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"embedding": [[1, 2, 3, 4]] * 3}), tmp_path / "b.parquet")  # list<int64>
    with pytest.raises(InvalidInput, match="holds int64 values; supported value types"):
        as_source(tmp_path)
    with pytest.raises(InvalidInput, match="'embedding' has type int64, but .*a.parquet has .*supported value types"):
        as_source(tmp_path, column="embedding")
    write_parquet(tmp_path / "b.parquet", np.ones((3, 4), np.float32), column="other")
    with pytest.raises(InvalidInput, match=r"vector columns would be \['other'\].*are \['embedding'\]"):
        as_source(tmp_path)
    with pytest.raises(InvalidInput, match="no column 'embedding'"):
        as_source(tmp_path, column="embedding")
    write_parquet(tmp_path / "b.parquet", np.ones((3, 4), np.float32))
    assert as_source(tmp_path).n == 6


@pytest.mark.parametrize("extra_first", [False, True])
def test_parquet_directory_extra_column_in_one_file_is_refused_in_either_order(tmp_path, extra_first):
    # scalar-columns mode: a column only one file has was silently dropped when that file sorted last
    narrow = pa.table({"a": np.ones(3, np.float32), "b": np.ones(3, np.float32)})
    wide = pa.table({"a": np.ones(3, np.float32), "b": np.ones(3, np.float32), "c": np.ones(3, np.float32)})
    pq.write_table(wide if extra_first else narrow, tmp_path / "part-0.parquet")
    pq.write_table(narrow if extra_first else wide, tmp_path / "part-1.parquet")
    with pytest.raises(InvalidInput, match="parquet directory must agree|no column 'c'"):
        as_source(tmp_path)
    assert as_source(tmp_path, column=["a", "b"]).dim == 2  # an explicit choice still reads both files


def test_parquet_directory_files_may_order_their_columns_differently(tmp_path):
    pq.write_table(pa.table({"a": np.ones(3, np.float32), "b": np.full(3, 2, np.float32)}), tmp_path / "p0.parquet")
    pq.write_table(pa.table({"b": np.full(3, 2, np.float32), "a": np.ones(3, np.float32)}), tmp_path / "p1.parquet")
    out = as_source(tmp_path).to_array()
    assert out.shape == (6, 2) and (out[:, 0] == 1).all() and (out[:, 1] == 2).all()  # read by name


def test_parquet_directory_second_list_column_in_a_later_file_is_refused(tmp_path):
    emb = pa.array([[1.0, 2.0]] * 3, pa.list_(pa.float32()))
    pq.write_table(pa.table({"emb": emb}), tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"emb": emb, "other": emb}), tmp_path / "part-1.parquet")
    with pytest.raises(InvalidInput, match="several list columns"):
        as_source(tmp_path)
    assert as_source(tmp_path, column="emb").n == 6


def test_parquet_repeated_column_name_is_refused(tmp_path):
    pq.write_table(pa.table({"c1": np.ones(3, np.float32), "c2": np.ones(3, np.float32)}), tmp_path / "t.parquet")
    with pytest.raises(InvalidInput, match=r"names \['c1'\] more than once"):
        as_source(tmp_path / "t.parquet", column=["c1", "c1"])


# -- HDF5 ------------------------------------------------------------------------------------------
def test_hdf5_problems(tmp_path, monkeypatch):
    p = tmp_path / "x.hdf5"
    with h5py.File(p, "w") as f:
        f["train"] = np.ones((3, 2), np.float32)
        f["neighbors"] = np.ones((3, 2), np.int64)
        f["flat"] = np.ones(3, np.float32)
        f["empty"] = np.ones((0, 2), np.float32)
        f.create_group("grp")["inner"] = np.ones((3, 2), np.float32)
        f["dangling"] = h5py.SoftLink("/nowhere")
    # every dataset, nested ones by path; groups and links are not datasets (a review: the list named a group)
    with pytest.raises(InvalidInput,
                       match="no dataset 'test' \\(datasets: empty, flat, grp/inner, neighbors, train\\)"):
        as_source(p, column="test")
    with pytest.raises(InvalidInput, match="'dangling' is a link to '/nowhere', which does not resolve"):
        as_source(p, column="dangling")  # (it read as a damaged file)
    assert as_source(p, column="grp/inner").n == 3
    with pytest.raises(InvalidInput, match="int64 is not supported"):
        as_source(p, column="neighbors")
    with pytest.raises(InvalidInput, match="2-D"):
        as_source(p, column="flat")
    with pytest.raises(InvalidInput, match="zero rows"):
        as_source(p, column="empty")
    with pytest.raises(InvalidInput, match="group"):
        as_source(p, column="grp")
    (tmp_path / "bad.h5").write_bytes(b"garbage")
    with pytest.raises(InvalidInput, match="not a readable HDF5"):
        as_source(tmp_path / "bad.h5")
    monkeypatch.setitem(sys.modules, "h5py", None)  # simulate a missing optional dependency
    with pytest.raises(InvalidInput, match="needs the h5py package"):
        as_source(p)


def test_hdf5_sparse_take_and_nan(tmp_path):
    x = np.arange(400 * 3, dtype=np.float32).reshape(400, 3)
    x[250, 1] = np.nan
    with h5py.File(tmp_path / "x.hdf5", "w") as f:
        f["train"] = x
    src = as_source(tmp_path / "x.hdf5")
    np.testing.assert_array_equal(src.take([9, 3, 9, 399]), x[[9, 3, 9, 399]])  # point selection path
    with pytest.raises(InvalidInput, match=r"first bad row: 250\)"):
        src.take([5, 250])
    with pytest.raises(InvalidInput, match=r"first bad row: 250\)"):
        src.take(np.arange(400))  # range-read path
    src.close()


def test_all_errors_are_kvant_errors():
    assert issubclass(InvalidInput, KvantError) and issubclass(DimensionMismatch, InvalidInput)


def test_damaged_parquet_pages_are_invalid_input(tmp_path):
    # the footer still parses (as_source opens it); the first data pages do not
    p = tmp_path / "x.parquet"
    write_parquet(p, np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32), row_group_rows=500)
    raw = bytearray(p.read_bytes())
    raw[4:40] = b"\xff" * 36
    p.write_bytes(bytes(raw))
    src = as_source(p)
    with pytest.raises(InvalidInput, match="x.parquet"):
        src.to_array()
    with pytest.raises(InvalidInput, match="x.parquet"):
        as_source(p).take([1])
    with pytest.raises(InvalidInput):
        kvant.Clusterer(3).fit(p)


@pytest.mark.parametrize("bad", [np.zeros((0, 3)), np.array([[1e39, 1.0]]),
                                 np.array([["a", "b"]]), np.array([[1 + 1j, 2.0]])])
def test_fvecs_writer_refuses_what_the_reader_would_reject(tmp_path, bad):
    with pytest.raises(InvalidInput):
        write_fvecs(tmp_path / "x.fvecs", bad)


def test_fvecs_writer_missing_directory_is_invalid_input(tmp_path):
    with pytest.raises(InvalidInput, match="cannot write"):
        write_fvecs(tmp_path / "no" / "x.fvecs", np.ones((2, 2)))


def test_empty_path_is_refused_not_read_as_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_parquet(tmp_path / "stray.parquet", np.ones((4, 3), np.float32))
    with pytest.raises(InvalidInput, match="empty"):
        as_source("")


def test_negative_sample_size_is_invalid_input():
    src = as_source(np.ones((10, 2), np.float32))
    with pytest.raises(InvalidInput, match="sample size"):
        src.sample(-1)
    assert src.sample(np.int64(3)).shape == (3, 2)


def test_float64_beyond_float32_range_is_named_as_such(tmp_path, recwarn):
    big = np.zeros((300, 2))
    big[123, 1] = 1e300
    np.save(tmp_path / "big.npy", big)
    # a file from elsewhere (kvant's writer refuses such values)
    column = pa.FixedSizeListArray.from_arrays(pa.array(big.reshape(-1)), 2)
    pq.write_table(pa.table({"embedding": column}), tmp_path / "big.parquet", row_group_size=100)
    beyond = r"beyond float32's range .*first bad row: 123\)"
    with pytest.raises(InvalidInput, match=beyond):
        as_source(big)
    for path in ("big.npy", "big.parquet"):
        with pytest.raises(InvalidInput, match=beyond):
            as_source(tmp_path / path).to_array()
        with pytest.raises(InvalidInput, match=beyond):
            as_source(tmp_path / path, validate=False).take([5, 123])
    index = kvant.FlatIndex(2)
    index.add(np.zeros((3, 2), np.float32))
    with pytest.raises(InvalidInput, match=r"beyond float32's range .*first bad row: 123\)"):
        index.search(big, 1)
    with pytest.raises(InvalidInput, match=beyond):  # big-endian float64 too
        as_source(big.astype(">f8"))
    with pytest.raises(InvalidInput, match=beyond):  # mini-batches read rows outside the seeding sample
        kvant.Clusterer(2, algorithm="minibatch", batch_rows=50, seed=0).fit(tmp_path / "big.npy")
    big[123, 1] = np.nan
    with pytest.raises(InvalidInput, match=r"NaN or inf \(first bad row: 123\)"):
        as_source(big)
    assert not [w for w in recwarn if "overflow" in str(w.message)]


def test_fixed_size_list_of_size_zero_is_zero_columns(tmp_path):
    typ = pa.list_(pa.float32(), 0)
    pq.write_table(pa.table({"emb": pa.array([[], []], type=typ)}), tmp_path / "z.parquet")
    with pytest.raises(InvalidInput, match="zero columns"):
        as_source(tmp_path / "z.parquet")


def test_large_blocks_are_checked_in_parallel_ranges_and_name_the_first_bad_row():
    # blocks from _PARALLEL_CHECK_BYTES up are scanned by row ranges on all threads; the error still names the
    # first bad row, not the first one a thread happened to find
    from kvant.io import source

    kvant.set_num_threads(2)
    rows = 3 * source._PARALLEL_CHECK_BYTES // (4 * 64)
    x = np.ones((rows, 64), np.float32)
    x[rows - 5, 1] = np.inf
    x[rows // 2 + 7, 60] = np.nan
    with pytest.raises(InvalidInput, match=rf"first bad row: {rows // 2 + 7}\)"):
        kvant.io.as_source(x)
    x[rows // 2 + 7, 60] = 0.0
    x[rows - 5, 1] = 0.0
    assert kvant.io.as_source(x).n == rows


def _flip_sweep(path, offsets, read):
    """Flip each byte at ``offsets`` in turn: reading must succeed or raise a KvantError, nothing else."""
    good = Path(path).read_bytes()
    bad = Path(path).with_name("flipped" + Path(path).suffix)
    escaped = []
    for off in offsets:
        b = bytearray(good)
        b[off] ^= 0xFF
        bad.write_bytes(bytes(b))
        try:
            read(bad)
        except KvantError:
            pass
        except Exception as exc:  # the point of the test: anything but a KvantError
            escaped.append((off, type(exc).__name__, str(exc)[:80]))
    assert not escaped, f"{len(escaped)} damaged files raised non-kvant errors, e.g. {escaped[:3]}"


def test_damaged_parquet_raises_invalid_input(tmp_path):
    # a review found 454 of 1,763 single-byte flips of a gzip list-column file escaping as OSError (the first
    # row's page, read for the dimension) and a damaged footer name escaping as UnicodeDecodeError
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"embedding": pa.array(list(x), type=pa.list_(pa.float32()))}), p, row_group_size=100,
                   compression="gzip")
    size = p.stat().st_size
    footer = int.from_bytes(p.read_bytes()[-8:-4], "little")
    offsets = sorted(set(range(0, size, 5)) | set(range(size - 8 - footer, size)))
    _flip_sweep(p, offsets, lambda q: as_source(q).to_array())


def test_damaged_hdf5_raises_invalid_input(tmp_path):
    # h5py reported damaged metadata as RuntimeError / KeyError / TypeError (34 of 1,568 flips in a review)
    x = np.arange(200 * 4, dtype=np.float32).reshape(200, 4)
    p = tmp_path / "a.hdf5"
    with h5py.File(p, "w", track_order=False) as f:
        f["train"] = x
        f["test"] = x[:5]
        f.create_dataset("gz", data=x, chunks=(16, 4), compression="gzip")

    def read(q):
        for col in ("train", "gz"):
            s = as_source(q, column=col)
            s.to_array()
            s.close()

    _flip_sweep(p, range(0, p.stat().st_size, 2), read)


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_scanned_pages_of_a_shared_memmap_are_released_and_writes_survive(tmp_path, mode):
    # (review) only mode "r" maps were advised: np.memmap's default r+ stayed wholly resident during a scan
    import numpy as np

    from kvant.io.source import MappedPages

    path = tmp_path / "m.f32"
    np.arange(1 << 16, dtype=np.float32).tofile(path)
    m = np.memmap(path, dtype=np.float32, mode=mode, shape=(1 << 12, 16))
    pages = MappedPages.of(m)
    assert pages is not None
    if mode == "r+":
        m[5] = -1.0  # a write the release must not lose
    pages.release(0, m.nbytes)
    assert (m[5] == -1.0).all() if mode == "r+" else m[5, 0] == 80.0
    del m
    if mode == "r+":
        assert (np.fromfile(path, np.float32).reshape(-1, 16)[5] == -1.0).all()


def test_a_file_colon_dataset_path_points_to_column(tmp_path):
    # kvant's messages name HDF5 datasets as file:dataset; given as a path, the error says how to ask for one
    with h5py.File(tmp_path / "x.hdf5", "w") as f:
        f["test"] = np.ones((10, 3), np.float32)
    with pytest.raises(InvalidInput, match=r"not found: .*x.hdf5:test' \(to read 'test' of .*column='test'"):
        as_source(f"{tmp_path / 'x.hdf5'}:test")
    np.testing.assert_array_equal(as_source(tmp_path / "x.hdf5", column="test").to_array(), np.ones((10, 3)))


@pytest.mark.parametrize("mode", ["list", "columns"])
def test_parquet_directory_mixing_value_types_reads_in_the_common_dtype(tmp_path, mode):
    # two writers: one left float32 parts, the other float64 (and an int8 one); all are read, in float64
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((4, 3)),
             rng.integers(-9, 9, (2, 3)).astype(np.int8)]
    for i, x in enumerate(parts):
        if mode == "list":
            table = pa.table({"v": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 3)})
        else:
            table = pa.table({f"c{j}": x[:, j] for j in range(3)})
        pq.write_table(table, tmp_path / f"{i}.parquet")
    src = as_source(tmp_path)
    expected = np.concatenate([p.astype(np.float64) for p in parts]).astype(np.float32)
    assert src.dtype == np.float64
    np.testing.assert_array_equal(src.to_array(), expected)
    np.testing.assert_array_equal(src.take([10, 0, 6]), expected[[10, 0, 6]])
    got = np.concatenate([c for _, c in src.chunks(rows=3)])
    np.testing.assert_array_equal(got, expected)


def test_float64_data_that_underflows_to_zero_rows_is_refused(tmp_path):
    # (review) data x 1e-300 became zero rows in float32 and clustered as one point; x 1e300 was already refused
    x = np.random.default_rng(0).standard_normal((1000, 4)) * 1e-300
    np.save(tmp_path / "tiny.npy", x)
    for call in (lambda: kvant.Clusterer(4).fit(x), lambda: kvant.Clusterer(4).fit(tmp_path / "tiny.npy"),
                 lambda: kvant.Clusterer(4).fit(np.load(tmp_path / "tiny.npy", mmap_mode="r")),
                 lambda: kvant.FlatIndex(4).add(x), lambda: kvant.FlatIndex(4).search(x[:3], 1)):
        with pytest.raises(InvalidInput, match="row 0 has nonzero values all below float32's smallest"):
            call()
    write_parquet(tmp_path / "tiny.parquet", x, dtype=np.float64)
    with pytest.raises(InvalidInput, match="below float32's smallest"):
        kvant.Clusterer(4).fit(tmp_path / "tiny.parquet")
    for write, name in ((write_parquet, "tiny32.parquet"), (write_fvecs, "tiny32.fvecs")):  # float32 writers too
        with pytest.raises(InvalidInput, match="row 0's nonzero values are all below float32's smallest"):
            write(tmp_path / name, x)
        assert not (tmp_path / name).exists()
    # beside a value of float32's normal range such a row is below its rounding, as any float32 value's tail is
    y = np.random.default_rng(0).standard_normal((1000, 4))
    y[5] = 1e-60
    assert kvant.Clusterer(4, seed=0).fit(y).labels_.shape == (1000,)
    tiny = np.random.default_rng(0).standard_normal((1000, 4)) * 1e-40  # subnormal in float32: kept (and rescaled)
    assert np.unique(kvant.Clusterer(4, seed=0).fit(tiny).labels_).size == 4
