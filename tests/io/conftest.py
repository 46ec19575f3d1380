"""Fixtures for the io tests: files the kvant writers refuse to write (NaN/inf values), written directly, so the
readers' checks can be tested."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def _raw_fvecs(path, x: np.ndarray) -> None:
    """TEXMEX .fvecs: each row as int32 dim, then its float32 values."""
    x = np.ascontiguousarray(x, np.float32)
    rec = np.empty((x.shape[0], x.shape[1] + 1), np.float32)
    rec[:, 0] = np.array([x.shape[1]], np.int32).view(np.float32)[0]
    rec[:, 1:] = x
    rec.tofile(path)


def _raw_parquet(path, x: np.ndarray, row_group_rows: int | None = None) -> None:
    """One fixed_size_list<float32> column named "vector", as kvant.io.write_parquet lays it out."""
    x = np.ascontiguousarray(x, np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    pq.write_table(pa.table({"vector": col}), path, row_group_size=row_group_rows)


@pytest.fixture
def raw_fvecs():
    return _raw_fvecs


@pytest.fixture
def raw_parquet():
    return _raw_parquet
