"""Shared test setup.

Tests run in one process per xdist worker, in an order that changes between machines, so a test that leaves
process-wide state behind fails some *other* test somewhere else (CI at 0cb9b46: a Client that failed to connect
stayed Dask's default scheduler and two later Dask tests failed). The guards below restore or flag such state.
"""

import sys

import numpy as np
import pytest

import kvant


@pytest.fixture(autouse=True)
def _restore_thread_count():
    # A test (or doctest) that sets kvant's thread count must not change it for the tests after it: with pytest-xdist
    # the order of files on a worker varies from run to run.
    before = kvant.get_num_threads()
    yield
    if kvant.get_num_threads() != before:
        kvant.set_num_threads(before)


def _dask_scheduler_state():
    if "dask" not in sys.modules:  # never import Dask for tests that do not use it
        return None
    import dask

    client = None
    if "distributed" in sys.modules:
        from distributed.client import _get_global_client

        client = _get_global_client()
    return dask.config.get("scheduler", None), client


@pytest.fixture(autouse=True)
def _no_leaked_dask_scheduler():
    before = _dask_scheduler_state()
    yield
    after = _dask_scheduler_state()
    if after is not None and after != (before if before is not None else (None, None)):
        pytest.fail(f"the test left Dask's default scheduler changed: {before} -> {after}")


@pytest.fixture
def blob_files(tmp_path):
    """(rows.npy, centres.npy, true labels): 2,000 rows of 3 coordinates around 4 centres ~50 apart, so that one
    Lloyd step from those centres labels every row with its blob (tests of ``--init``)."""
    g = np.random.default_rng(2)
    centres = (g.standard_normal((4, 3)) * 50).astype(np.float32)
    y = g.integers(0, 4, 2000)
    np.save(tmp_path / "x.npy", (centres[y] + g.standard_normal((2000, 3))).astype(np.float32))
    np.save(tmp_path / "c.npy", centres)
    return tmp_path / "x.npy", tmp_path / "c.npy", y


@pytest.fixture
def check_corrupted_copy(tmp_path_factory):
    """``check(path, data)``: a copy of the saved file ``path``, cut short or with one to four bytes flipped (drawn
    with hypothesis's ``data``), must make ``kvant.load`` raise ``PersistError`` (the container's checksums, kvant's
    file format promise: a damaged file is refused, never half read)."""
    from hypothesis import strategies as st

    from kvant.errors import PersistError

    def check(path, data) -> None:
        blob = bytearray(path.read_bytes())
        if data.draw(st.booleans(), label="truncate"):
            blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="length")]
        else:
            positions = st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=4, unique=True)
            for pos in data.draw(positions, label="positions"):
                blob[pos] ^= data.draw(st.integers(1, 255), label="xor")
        bad = tmp_path_factory.mktemp("bad") / path.name
        bad.write_bytes(bytes(blob))
        with pytest.raises(PersistError):
            kvant.load(bad)

    return check
