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


