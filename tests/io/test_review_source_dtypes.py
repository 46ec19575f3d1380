"""Source dtypes the distributed path refused (a review of kvant.io); the test failed before its fix."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvant.io import as_source, write_ivecs
from kvant.io.source import SUPPORTED_DTYPES


# -- 3. every source as_source accepts is accepted by the distributed path --------------------------
def test_source_dtypes_are_supported_and_accepted_by_dask(tmp_path):
    pytest.importorskip("dask")
    from kvant.distributed.kmeans import as_dask_array

    a = np.array([-128, 0, 127, 5], np.int8)
    b = np.array([0, 200, 255, 7], np.uint8)
    pq.write_table(pa.table({"a": a, "b": b}), tmp_path / "m.parquet")
    src = as_source(tmp_path / "m.parquet")
    assert src.dtype == np.float32 and src.dtype.type in SUPPORTED_DTYPES
    want = np.stack([a, b], axis=1).astype(np.float32)
    np.testing.assert_array_equal(src.to_array(), want)
    np.testing.assert_array_equal(src.take([3, 0]), want[[3, 0]])

    iv = np.arange(-8, 8, dtype=np.int32).reshape(8, 2) * (1 << 20)
    write_ivecs(tmp_path / "m.ivecs", iv)
    for paths, expect in ([[tmp_path / "m.parquet"], want], [[tmp_path / "m.ivecs"], iv.astype(np.float32)],
                          [[tmp_path / "m.ivecs", tmp_path / "m.parquet"], np.r_[iv, want].astype(np.float32)]):
        arr = as_dask_array(paths)
        assert arr.dtype.type in SUPPORTED_DTYPES
        got = arr.compute()
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got.astype(np.float32), expect)
    import kvant.distributed as kd

    c = kd.DaskClusterer(k=2, seed=0).fit([tmp_path / "m.ivecs", tmp_path / "m.parquet"])  # end to end
    assert c.cluster_centers_.shape == (2, 2)
