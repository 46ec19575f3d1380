"""The clustering benchmark's round-robin timer (benchmarks/clustering.py): which seeds its runs use and which
outputs it keeps for the quality medians."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "clustering.py"
    spec = importlib.util.spec_from_file_location("kvant_clustering_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recorder(calls, name):
    def fn(x, k, metric, seed):
        calls.append((name, seed))
        return np.full(x.shape[0], seed), np.zeros((k, x.shape[1])), {}

    return fn


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("fast", [False, True])
def test_every_round_takes_a_new_seed_and_counts_for_quality(bench, monkeypatch, fast, first):
    # fast cells get extra rounds (until SHORT_CELL_SECONDS) and an untimed warm call before each later timed run;
    # slow ones run --repeats rounds only; with WARM_FIRST_CALL every method is called untimed before its first run
    monkeypatch.setattr(bench, "SHORT_CELL_SECONDS", 1e9 if fast else 0.0)
    monkeypatch.setattr(bench, "SHORT_CELL_MAX_ROUNDS", 6)
    monkeypatch.setattr(bench, "WARM_CALL_SECONDS", 1e9 if fast else 0.0)
    monkeypatch.setattr(bench, "WARM_FIRST_CALL", first)
    calls = []
    fns = {"a": _recorder(calls, "a"), "b": _recorder(calls, "b")}
    out = bench.interleaved(fns, np.zeros((4, 2), np.float32), 2, "l2", 10, 3)
    rounds = 6 if fast else 3
    for name in fns:
        _, times, results = out[name]
        assert len(times) == rounds
        # one output per round, each from its own seed 10, 11, ...
        assert [int(labels[0]) for labels, _, _ in results] == list(range(10, 10 + rounds))
    # round-robin, a warm call of the same seed before each timed run after the first round (fast cells) and
    # before the first one (WARM_FIRST_CALL)
    want = []
    for r in range(rounds):
        for name in fns:
            want += [(name, 10 + r)] * (2 if (fast and r > 0) or (first and r == 0) else 1)
    assert calls == want


@pytest.mark.parametrize("first", [False, True])
def test_the_single_method_timer_calls_once_untimed_first(bench, monkeypatch, first):
    monkeypatch.setattr(bench, "WARM_FIRST_CALL", first)
    calls = []
    _, times, results = bench.time_method(_recorder(calls, "a"), np.zeros((4, 2), np.float32), 2, "l2", 7, 3)
    assert len(times) == 3 and calls == [("a", 7)] * (4 if first else 3)
    assert int(results[0][0]) == 7
