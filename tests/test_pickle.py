"""Fitted objects survive pickle (process pools, Dask and joblib ship them that way) and answer as before."""

import pickle

import numba
import numpy as np
import pytest

import kvant

X = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
P = np.random.default_rng(1).random((2000, 3))


@numba.njit
def _manhattan(a, b):
    return np.abs(a - b).sum()


def _pq_index(nbits):
    index = kvant.PQIndex(16, 8 if nbits == 4 else 4, nbits=nbits)
    index.train(X)
    index.add(X)
    return index


def _flat():
    index = kvant.FlatIndex(16)
    index.add(X)
    return index


def _residual_tree():
    rc = kvant.ResidualCorrelation.from_points(P[:500], kvant.RBF(0.3, 1.0), n_inducing=64)
    return kvant.CoverTree(rc).fit()


CASES = {
    "Clusterer": (lambda: kvant.Clusterer(k=8).fit(X), lambda o: (o.predict(X), o.cluster_centers_)),
    "PQ": (lambda: kvant.PQ(16, 4).fit(X), lambda o: (o.encode(X),)),
    "OPQ": (lambda: kvant.OPQ(16, 4).fit(X), lambda o: (o.encode(X), o.rotation)),
    "PQIndex 8-bit": (lambda: _pq_index(8), lambda o: o.search(X[:20], 5)),
    "PQIndex 4-bit": (lambda: _pq_index(4), lambda o: o.search(X[:20], 5)),
    "FlatIndex": (_flat, lambda o: o.search(X[:20], 5)),
    "CoverTree euclidean": (lambda: kvant.CoverTree().fit(P), lambda o: o.knn(P[:20], 5)),
    "CoverTree callable": (lambda: kvant.CoverTree(_manhattan).fit(P), lambda o: o.knn(P[:20], 5)),
    "CoverTree residual": (_residual_tree, lambda o: o.knn(np.arange(20), 5)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pickle_round_trip_answers_alike(name):
    make, answer = CASES[name]
    obj = make()
    copy = pickle.loads(pickle.dumps(obj))
    for a, b in zip(answer(obj), answer(copy), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_cover_tree_pickled_before_the_level_base_loads_with_its_base():
    # a pickle from before 2026-12-06 carries base (always a number then) and no _lbase: the levels it holds were
    # built with that base, so it must answer, check and insert with it
    tree = kvant.CoverTree(base=1.3).fit(P)
    state = dict(tree.__dict__)
    del state["_lbase"]
    old = kvant.CoverTree.__new__(kvant.CoverTree)
    old.__setstate__(state)
    assert old.level_base_ == 1.3
    old.check_invariants()
    np.testing.assert_array_equal(old.knn(P[:20], 5)[1], tree.knn(P[:20], 5)[1])
    old.insert(P[:50] + 0.01)
    old.check_invariants()


@pytest.mark.parametrize("make", [_flat, lambda: _pq_index(8), lambda: _pq_index(4)], ids=["flat", "pq8", "pq4"])
def test_a_shallow_copy_of_an_index_is_independent_of_the_original(make):
    import copy

    index = make()
    before = index.search(X[:20], 5)  # (4-bit: packs the codes, a cache the copy must not leave stale)
    dup = copy.copy(index)
    dup.add(X[:7] + 1)
    dup.remove([0, 1])
    assert len(index) == 3000 and len(dup) == 3005
    for a, b in zip(index.search(X[:20], 5), before, strict=True):
        np.testing.assert_array_equal(a, b)
    index.add(X[:1] + 2)  # the original's next id is its own, and no id is shared with rows added to the copy
    assert np.unique(index.ids).size == len(index) == 3001 and index.ids[-1] == 3000
    assert 0 in index.ids and 0 not in dup.ids and dup.ids[-1] == 3006
    np.testing.assert_array_equal(dup.search(X[:1] + 1, 1)[1], [[3000]])
