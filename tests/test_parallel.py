"""Row-block parallelism (kvant._parallel): BLAS thread limits around the blocks."""

import pytest


def test_blas_is_single_threaded_inside_row_blocks_and_restored_after_even_on_error():
    # The BLAS libraries loaded when kvant first enters a row block (numpy's, which kvant's GEMMs call) are limited;
    # one loaded later (scipy's or faiss's OpenBLAS, when another test imported them first in this worker) is not
    # kvant's to limit, so only the controlled ones are checked.
    from threadpoolctl import threadpool_info

    from kvant import _parallel
    from kvant._parallel import _blas_single_thread

    with _blas_single_thread():
        pass
    controlled = {lib.filepath for lib in _parallel._blas_libs}
    assert controlled  # numpy's BLAS at least

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and i["filepath"] in controlled]

    before = blas_threads()
    with _blas_single_thread():
        assert set(blas_threads()) == {1}
    assert blas_threads() == before
    with pytest.raises(RuntimeError), _blas_single_thread():
        assert set(blas_threads()) == {1}
        raise RuntimeError("inside")
    assert blas_threads() == before
