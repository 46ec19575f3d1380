"""Writers that changed values silently or wrote files their readers refuse (a review of kvant.io); each test
failed before its fix."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from kvant.errors import InvalidInput
from kvant.io import as_source, write_fvecs, write_ivecs, write_parquet


# -- 4. writers refuse what would change values or what their readers refuse ------------------------
@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (np.array([[1e39, 1.0]]), {}, "out of the float32 range"),
        (np.array([[2**24 + 1, 1]], np.int64), {}, "not exactly representable in float32"),
        (np.array([[1, 2**11 + 1]], np.int32), {"dtype": np.float16}, "not exactly representable in float16"),
        (np.ones((0, 3)), {}, "zero vectors"),
        (np.ones((2, 2)), {"dtype": np.int64}, "dtype int64 is not supported"),
        (np.array([[0.5, 1.0]]), {"dtype": np.int8}, "do not fit exactly into int8"),
        (np.array([["a", "b"]]), {}, "real numbers"),
    ],
)
def test_write_parquet_refuses_silent_changes(tmp_path, x, kwargs, match):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, not a NumPy warning and a changed value
        with pytest.raises(InvalidInput, match=match):
            write_parquet(tmp_path / "x.parquet", x, **kwargs)
    assert not (tmp_path / "x.parquet").exists()


def test_write_parquet_missing_directory_and_exact_values(tmp_path):
    with pytest.raises(InvalidInput, match="cannot write"):
        write_parquet(tmp_path / "no" / "x.parquet", np.ones((2, 2)))
    exact = np.array([[2**24, -(2**24)], [2**30, 3]], np.int64)  # large but exact in float32
    write_parquet(tmp_path / "x.parquet", exact)
    np.testing.assert_array_equal(as_source(tmp_path / "x.parquet").to_array(), exact.astype(np.float32))
    write_parquet(tmp_path / "y.parquet", np.array([[1, -2]], np.int16), dtype=np.int8)
    assert as_source(tmp_path / "y.parquet").dtype == np.int8


def test_write_parquet_float64_beyond_float32_is_refused(tmp_path):
    # the reader computes in float32 and refuses a finite float64 that becomes inf there
    x = np.array([[1.0, 2.0], [3.0, -4e38]])
    with pytest.raises(InvalidInput, match=r"beyond float32's range.*first at row 1"):
        write_parquet(tmp_path / "x.parquet", x, dtype=np.float64)
    assert not (tmp_path / "x.parquet").exists()
    x[1, 1] = -3e38  # within range: written as float64 and read back as float32
    write_parquet(tmp_path / "x.parquet", x, dtype=np.float64)
    np.testing.assert_array_equal(as_source(tmp_path / "x.parquet").to_array(), x.astype(np.float32))


@pytest.mark.parametrize("writer", ["fvecs", "bvecs", "ivecs"])
@pytest.mark.parametrize("name", ["x.fvecs", "x.bvecs", "x.ivecs", "x.bin", "x", "x.FVECS"])
def test_texmex_writers_need_their_own_suffix(tmp_path, writer, name):
    from kvant.io import texmex

    write = getattr(texmex, f"write_{writer}")
    x = np.array([[1, 2], [3, 4]], np.int32)
    if name.lower() == f"x.{writer}":
        write(tmp_path / name, x)
        np.testing.assert_array_equal(as_source(tmp_path / name).to_array(), x)
    else:  # the reader takes the record type from the suffix, so it would misread or refuse the file
        with pytest.raises(InvalidInput, match=f"must end in .{writer}"):
            write(tmp_path / name, x)
        assert list(tmp_path.iterdir()) == []


def test_texmex_writers_refuse_inexact_integers(tmp_path):
    with pytest.raises(InvalidInput, match="not exactly representable in float32"):
        write_fvecs(tmp_path / "x.fvecs", np.array([[2**24 + 1, 1]], np.int64))
    for v in (2**24 + 1, -(2**24) - 1, 2**31 - 1):
        with pytest.raises(InvalidInput, match=r"outside \+-2\*\*24"):
            write_ivecs(tmp_path / "x.ivecs", np.array([[1, v]], np.int64))
    assert not (tmp_path / "x.fvecs").exists() and not (tmp_path / "x.ivecs").exists()
    ok = np.array([[2**24, -(2**24)]], np.int64)
    write_ivecs(tmp_path / "x.ivecs", ok)
    np.testing.assert_array_equal(as_source(tmp_path / "x.ivecs").to_array(), ok.astype(np.float32))
    write_fvecs(tmp_path / "x.fvecs", np.array([[2**25, 3]], np.int64))
    np.testing.assert_array_equal(as_source(tmp_path / "x.fvecs").to_array(), [[2**25, 3]])




@pytest.mark.parametrize("bad", [{"compression": "bogus"}, {"compression": 5}])
def test_write_parquet_that_fails_keeps_the_existing_file(tmp_path, bad):
    # (review) pyarrow removes its target when writing fails: a bad compression= name deleted a good file
    from kvant.io.parquet import write_parquet

    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    path = tmp_path / "keep.parquet"
    write_parquet(path, x)
    before = path.read_bytes()
    with pytest.raises(InvalidInput):
        write_parquet(path, x * 2, **bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.parquet"]


def test_texmex_write_that_fails_midway_keeps_the_existing_file(tmp_path, monkeypatch):
    from kvant.io import _atomic
    from kvant.io.texmex import write_fvecs

    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    path = tmp_path / "keep.fvecs"
    write_fvecs(path, x)
    before = path.read_bytes()
    real = _atomic.os.fsync

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_atomic.os, "fsync", full_disk)
    with pytest.raises(InvalidInput, match="cannot write"):
        write_fvecs(path, x * 2)
    monkeypatch.setattr(_atomic.os, "fsync", real)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.fvecs"]


@pytest.mark.parametrize("writer", ["fvecs", "parquet"])
def test_writers_turn_bad_arguments_into_kvant_errors(tmp_path, writer):
    from kvant.io.parquet import write_parquet
    from kvant.io.texmex import write_fvecs

    write = write_fvecs if writer == "fvecs" else write_parquet
    x = np.ones((2, 3), np.float32)
    for path, data in [(None, x), (3, x), (b"x", x), (tmp_path / "r", [[1.0, 2.0], [3.0]]),
                       (tmp_path / "m", np.ma.masked_array(x, mask=[[0, 1, 0], [0, 0, 0]]))]:
        with pytest.raises(InvalidInput):
            write(path, data)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_writers_refuse_nan_and_inf_which_their_readers_would_refuse(tmp_path, value):
    # (a review: write_fvecs and write_parquet wrote them, and as_source then refused the file)
    from kvant.io import write_bvecs, write_fvecs, write_ivecs

    x = np.ones((5, 3), np.float64)
    x[3, 1] = value
    for write, name in ((write_fvecs, "x.fvecs"), (write_parquet, "x.parquet"), (write_bvecs, "x.bvecs"),
                        (write_ivecs, "x.ivecs")):
        with pytest.raises(InvalidInput, match=r"NaN or inf \(first at row 3\)"):
            write(tmp_path / name, x)
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("writer,suffix",
                         [(write_fvecs, ".fvecs"), (write_ivecs, ".ivecs"), (write_parquet, ".parquet")])
def test_a_path_with_a_nul_byte_is_a_kvant_error(tmp_path, writer, suffix):
    # (a review: the TEXMEX writers raised a bare ValueError from os.stat; nothing may be left behind either)
    x = np.arange(6, dtype=np.int32 if writer is write_ivecs else np.float32).reshape(2, 3)
    with pytest.raises(InvalidInput, match="NUL"):
        writer(str(tmp_path / f"a\0b{suffix}"), x)
    assert list(tmp_path.iterdir()) == []
