"""first_nonfinite_row against the NumPy reference, including the edge values of float32."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvant.bench import reference as ref
from kvant.kernels.finite import first_nonfinite_row

EDGE = [0.0, -0.0, 1.0, np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).tiny,
        1e-45, np.nan, np.inf, -np.inf]


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=40),
                  elements=st.sampled_from(EDGE) | st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_first_nonfinite_row_matches_reference(x):
    assert first_nonfinite_row(x.view(np.int32)) == ref.first_nonfinite_row_ref(x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, np.float32("nan") * -1])
def test_every_non_finite_kind_is_caught_at_its_row(bad):
    x = np.full((9, 33), np.finfo(np.float32).max, np.float32)
    x[6, 32] = bad
    x[8, 0] = bad
    assert first_nonfinite_row(x.view(np.int32)) == 6
    assert first_nonfinite_row(x[:6].view(np.int32)) == -1
