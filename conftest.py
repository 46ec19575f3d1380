"""Shared test setup."""

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
