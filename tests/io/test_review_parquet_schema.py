"""Parquet schemas a review of kvant.io found mishandled (repeated names, broken links, bool/null columns);
each test failed before its fix."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvant.errors import InvalidInput
from kvant.io import as_source, write_parquet


def _fsl(rows, dim=2):
    return pa.array(rows, pa.list_(pa.float32(), dim))


# -- 1. repeated column names ----------------------------------------------------------------------
def test_parquet_repeated_column_names_are_named_or_ignored_when_unrelated(tmp_path):
    emb = _fsl([[1.0, 2.0], [3.0, 4.0]])
    x1 = pa.array([5.0, 6.0], pa.float32())
    x2 = pa.array([7.0, 8.0], pa.float32())
    p = tmp_path / "list_and_dup.parquet"
    pq.write_table(pa.Table.from_arrays([emb, x1, x2], names=["emb", "x", "x"]), p)
    # the only list column is fine: an unrelated repeated scalar column does not matter
    np.testing.assert_array_equal(as_source(p).to_array(), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(as_source(p, column="emb").take([1, 0]), [[3, 4], [1, 2]])
    with pytest.raises(InvalidInput, match=r"column 'x' appears 2 times"):
        as_source(p, column="x")
    with pytest.raises(InvalidInput, match=r"column 'x' appears 2 times"):
        as_source(p, column=["x"])

    p = tmp_path / "scalars_dup.parquet"
    a = pa.array([0.5, 1.5], pa.float32())
    pq.write_table(pa.Table.from_arrays([a, x1, x2], names=["a", "x", "x"]), p)
    # column=None would read all numeric columns, among them the repeated ones: an error naming them
    with pytest.raises(InvalidInput, match=r"repeated column name\(s\) \['x'\]"):
        as_source(p)
    np.testing.assert_array_equal(as_source(p, column=["a"]).to_array(), [[0.5], [1.5]])

    p = tmp_path / "lists_dup.parquet"
    pq.write_table(pa.Table.from_arrays([emb, emb], names=["e", "e"]), p)
    with pytest.raises(InvalidInput, match=r"repeated column name\(s\) \['e'\]"):
        as_source(p)

    # a directory: the chosen column is repeated only in a later file
    d = tmp_path / "dir"
    d.mkdir()
    pq.write_table(pa.Table.from_arrays([emb], names=["emb"]), d / "p0.parquet")
    pq.write_table(pa.Table.from_arrays([emb, emb], names=["emb", "emb"]), d / "p1.parquet")
    with pytest.raises(InvalidInput, match=r"p1.parquet: column 'emb' appears 2 times"):
        as_source(d, column="emb")


# -- 2. broken symbolic links in a parquet directory ------------------------------------------------
def test_parquet_directory_broken_symlink_is_named_not_skipped(tmp_path):
    write_parquet(tmp_path / "a.parquet", np.ones((3, 2), np.float32))
    os.symlink(tmp_path / "nowhere" / "b.parquet", tmp_path / "b.parquet")
    with pytest.raises(InvalidInput, match=r"broken symbolic link: .*b.parquet"):
        as_source(tmp_path)
    (tmp_path / "b.parquet").unlink()
    os.symlink(tmp_path / "a.parquet", tmp_path / "b.parquet")  # a working link is read
    assert as_source(tmp_path).n == 6



def test_parquet_directory_follows_a_linked_sub_directory_and_refuses_a_loop(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    write_parquet(data / "a.parquet", x[:10])
    write_parquet(elsewhere / "b.parquet", x[10:])
    os.symlink(elsewhere, data / "more")  # read by pyarrow.dataset too; Path.rglob skipped it (rows vanished)
    np.testing.assert_array_equal(as_source(data).to_array(), x)
    os.symlink(data, elsewhere / "back")  # data/more/back -> data: an endless walk
    with pytest.raises(InvalidInput, match="links back to"):
        as_source(data)

# -- 8. bool and null columns -----------------------------------------------------------------------
@pytest.mark.parametrize(("col", "typ"), [(pa.array([True, False]), "bool"), (pa.array([None, None]), "null")])
def test_parquet_bool_and_null_columns_are_rejected_not_dropped(tmp_path, col, typ):
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"a": pa.array([1.0, 2.0], pa.float32()), "flag": col}), p)
    with pytest.raises(InvalidInput, match=rf"column 'flag' has type {typ}, which is not supported"):
        as_source(p)
    assert as_source(p, column=["a"]).dim == 1




@pytest.mark.parametrize("later_rows", [6, 14])
def test_parquet_rows_are_checked_against_the_footer_read_at_open(tmp_path, later_rows):
    # (review) a file rewritten after as_source (or a damaged footer): to_array left the missing rows as uninitialised
    # memory, take raised a bare IndexError, more rows a bare ValueError
    path = tmp_path / "r.parquet"
    x = np.arange(56, dtype=np.float32).reshape(14, 4) + 1
    write_parquet(path, x[:10])
    src = as_source(str(path))
    write_parquet(path, x[:later_rows])
    with pytest.raises(InvalidInput, match="changed after it was opened"):
        src.to_array()
    with pytest.raises(InvalidInput, match="changed after it was opened"):
        src.take(np.array([0, 9]))
