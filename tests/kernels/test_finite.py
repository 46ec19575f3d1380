"""first_nonfinite_row against the NumPy reference, including the edge values of float32."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvant.bench import reference as ref
from kvant.kernels.finite import first_nonfinite_row, first_nonfinite_row_parallel

EDGE = [0.0, -0.0, 1.0, np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).tiny,
        1e-45, np.nan, np.inf, -np.inf]


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=40),
                  elements=st.sampled_from(EDGE) | st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_first_nonfinite_row_matches_reference(x):
    want = ref.first_nonfinite_row_ref(x)
    assert first_nonfinite_row(x.view(np.int32)) == want
    for block_rows in (1, 3, 40):  # ranges of one row, ranges that split the rows unevenly, one range
        assert first_nonfinite_row_parallel(x.view(np.int32), block_rows) == want


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, np.float32("nan") * -1])
def test_every_non_finite_kind_is_caught_at_its_row(bad):
    x = np.full((9, 33), np.finfo(np.float32).max, np.float32)
    x[6, 32] = bad
    x[8, 0] = bad
    assert first_nonfinite_row(x.view(np.int32)) == 6
    assert first_nonfinite_row(x[:6].view(np.int32)) == -1


def test_parallel_scan_reports_the_first_bad_row_across_ranges():
    # bad rows in a later range only, then in an earlier one too: the earliest wins whichever thread finds it first
    x = np.ones((1000, 7), np.float32)
    x[900, 3] = np.nan
    assert first_nonfinite_row_parallel(x.view(np.int32), 64) == 900
    x[130, 0] = -np.inf
    x[131, 0] = np.inf
    assert first_nonfinite_row_parallel(x.view(np.int32), 64) == 130
    assert first_nonfinite_row_parallel(x[:130].view(np.int32), 64) == -1
