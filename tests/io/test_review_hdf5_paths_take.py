"""HDF5 and path errors that escaped or were mis-wrapped, and take() naming different bad rows per source
(a review of kvant.io); each test failed before its fix."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from kvant.errors import InvalidInput
from kvant.io import ParquetSource, as_source
from kvant.io.source import check_finite_rows


# -- 5, 6. HDF5 -------------------------------------------------------------------------------------
def test_hdf5_null_dataspace_is_invalid_input(tmp_path):
    p = tmp_path / "x.hdf5"
    with h5py.File(p, "w") as f:
        f.create_dataset("train", data=h5py.Empty("f4"))
    with pytest.raises(InvalidInput, match=r"dataset 'train' is empty \(a null dataspace"):
        as_source(p)


def test_hdf5_missing_dataset_message_is_not_wrapped_as_damage(tmp_path):
    p = tmp_path / "x.hdf5"
    with h5py.File(p, "w") as f:
        f["test"] = np.ones((2, 2), np.float32)
        f["train"] = np.ones((2, 2), np.float32)
    with pytest.raises(InvalidInput) as info:
        as_source(p, column="missing")
    assert str(info.value) == f"{p}: no dataset 'missing' (datasets: test, train)"


# -- 7. over-long paths -----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npy", ".fvecs", ".parquet", ".hdf5", ""])
def test_overlong_path_is_invalid_input(tmp_path, suffix):
    p = str(tmp_path / ("a" * 300 + suffix))
    with pytest.raises(InvalidInput, match="cannot access .*File name too long"):
        as_source(p)
    if suffix == ".parquet":
        with pytest.raises(InvalidInput, match="cannot access .*File name too long"):
            ParquetSource(p)


# -- 9. take names the smallest bad row it was asked for, whatever the source -----------------------
def test_take_names_the_smallest_bad_row_for_every_source(tmp_path, raw_fvecs, raw_parquet):
    x = np.ones((100, 3), np.float32)
    x[57, 0] = np.nan
    x[90, 1] = np.inf
    np.save(tmp_path / "x.npy", x)
    raw_parquet(tmp_path / "x.parquet", x, row_group_rows=30)  # (kvant's writers refuse NaN/inf)
    raw_fvecs(tmp_path / "x.fvecs", x)
    with h5py.File(tmp_path / "x.hdf5", "w") as f:
        f["train"] = x
    sources = [as_source(x, validate=False)] + [as_source(tmp_path / f"x{s}") for s in
                                                (".npy", ".parquet", ".fvecs", ".hdf5")]
    for src in sources:
        for idx in ([90, 57], [90, 3, 57, 90], np.arange(100)[::-1]):
            with pytest.raises(InvalidInput, match=r"first bad row: 57\)"):
                src.take(idx)
    # the original row checked for "beyond float32's range" is the one named
    block = np.array([[np.nan], [np.inf]], np.float32)
    with pytest.raises(InvalidInput, match=r"beyond float32's range .*first bad row: 4\)"):
        check_finite_rows(block, np.array([9, 4]), "t", np.array([[np.nan], [1e39]]))
