"""Suite-wide guards.

Tests run in one process per xdist worker, in an order that changes between machines, so a test that leaves
process-wide state behind fails some *other* test somewhere else (CI at 0cb9b46: a Client that failed to connect
stayed Dask's default scheduler and two later Dask tests failed). The guard below fails the test that leaks.
"""

import sys

import pytest


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
