"""Row-block parallelism (kvant._parallel): BLAS thread limits around the blocks."""

import pytest


def test_blas_is_single_threaded_inside_row_blocks_and_restored_after_even_on_error():
    from threadpoolctl import threadpool_info

    from kvant._parallel import _blas_single_thread

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    with _blas_single_thread():
        assert set(blas_threads()) <= {1}
    assert blas_threads() == before
    with pytest.raises(RuntimeError), _blas_single_thread():
        assert set(blas_threads()) <= {1}
        raise RuntimeError("inside")
    assert blas_threads() == before
