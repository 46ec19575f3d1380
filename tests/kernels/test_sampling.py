"""The coreset draw's kernels against their NumPy references (kvant.bench.reference)."""

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kvant
from kvant.bench import reference as ref
from kvant.cluster.sampling import coreset_inclusion
from kvant.kernels import sampling as ks


@contextlib.contextmanager
def _threads(n):
    before = kvant.get_num_threads()
    kvant.set_num_threads(n)
    try:
        yield
    finally:
        kvant.set_num_threads(before)


# squared distances of float32 rows: 0 or at least ~1e-90, never subnormal in float64
_d2 = hnp.arrays(np.float64, st.integers(2, 300),
                 elements=st.sampled_from([0.0, 1e-90, 1.0, 3.5, 1e6, 1e30]) | st.floats(1e-90, 1e12)
                 | st.just(0.0))


@settings(max_examples=150, deadline=None)
@given(_d2, st.floats(-1.0, 1e13, allow_nan=False) | st.sampled_from([-np.inf, 0.0, np.inf]))
def test_sum_at_least_matches_numpy(d2, threshold):
    c, total = ks.sum_at_least(d2, threshold)
    keep = d2 >= threshold
    assert c == int(keep.sum())
    np.testing.assert_allclose(total, d2[keep].sum(), rtol=1e-12)


def test_sum_at_least_is_the_same_at_any_thread_count():
    d2 = np.random.default_rng(0).pareto(1.5, 3 * ks.BLOCK + 17) * 1e3
    with _threads(1):
        one = ks.sum_at_least(d2, 10.0)
    with _threads(2):
        two = ks.sum_at_least(d2, 10.0)
    assert one == two  # bit for bit: blocks are summed in order


@settings(max_examples=150, deadline=None)
@given(_d2, st.data())
def test_coreset_inclusion_matches_the_direct_solve(d2, data):
    m = data.draw(st.integers(1, d2.shape[0] - 1))
    a, b = coreset_inclusion(d2, m)
    pi = np.minimum(1.0, a + b * d2)
    want = ref.coreset_inclusion_ref(d2, m)
    np.testing.assert_allclose(pi, want, rtol=1e-9, atol=1e-15)
    assert pi.sum() == pytest.approx(m, rel=1e-9)


@pytest.mark.parametrize("case", ["heavy", "zeros", "equal", "one-far", "overflow", "subnormal"])
def test_coreset_inclusion_edge_cases(case):
    g = np.random.default_rng(1)
    d2 = {"heavy": g.pareto(0.7, 50000) ** 2, "zeros": np.zeros(1000), "equal": np.full(1000, 7.0),
          "one-far": np.r_[np.ones(999), 1e12], "overflow": np.r_[np.ones(999), 1e308, 1e308],
          "subnormal": np.r_[np.zeros(998), 2e-313, 2e-313]}[case]
    m = 100
    a, b = coreset_inclusion(d2, m)
    if case == "subnormal":  # 1/Σd2 overflows: uniform (float32 rows cannot give such sums)
        assert (a, b) == (m / d2.size, 0.0)
        return
    pi = np.minimum(1.0, a + b * d2)
    np.testing.assert_allclose(pi, ref.coreset_inclusion_ref(d2, m), rtol=1e-9, atol=1e-15)
    assert pi.sum() == pytest.approx(m, rel=1e-9)
    if case == "one-far":
        assert pi[-1] == 1.0


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float64, st.integers(0, 3 * 1024), elements=st.floats(0, 100)),
       st.floats(0, 1), st.floats(0, 0.05), st.integers(0, 2**64 - 1))
def test_poisson_draw_matches_reference(d2, a, b, key):
    rows, w = ks.poisson_draw(d2, a, b, np.uint64(key))
    want_rows, want_w = ref.poisson_draw_ref(np.minimum(1.0, a + b * d2), key)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(w, want_w)


def test_poisson_draw_across_blocks_and_threads():
    d2 = np.random.default_rng(2).random(2 * ks.BLOCK + 5)
    with _threads(1):
        one = ks.poisson_draw(d2, 0.1, 0.2, np.uint64(99))
    with _threads(2):
        two = ks.poisson_draw(d2, 0.1, 0.2, np.uint64(99))
    want = ref.poisson_draw_ref(np.minimum(1.0, 0.1 + 0.2 * d2), 99)
    for got in (one, two):
        np.testing.assert_array_equal(got[0], want[0])
    # the uniforms are uniform: the kept fraction matches the mean probability
    assert one[0].size / d2.size == pytest.approx(np.mean(0.1 + 0.2 * d2), abs=0.01)


def test_uniform_draw_ignores_infinite_distances():
    # b = 0 is the uniform fallback: an infinite d2 must not turn 0·inf into NaN (and NaN into a certain row)
    d2 = np.r_[np.zeros(9), np.inf]
    kept = np.zeros(10)
    for key in range(400):
        rows, w = ks.poisson_draw(d2, 0.3, 0.0, np.uint64(key))
        np.testing.assert_allclose(w, 1 / 0.3)
        kept[rows] += 1
    assert kept[9] / 400 == pytest.approx(0.3, abs=0.08)
