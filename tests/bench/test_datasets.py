"""kvant.bench.datasets: IDX parser, real datasets, synthetic families (shape, determinism, what they stress)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

import kvant
from kvant.bench import datasets as D
from kvant.errors import InvalidInput, KvantError


# -- IDX -------------------------------------------------------------------------------------------
def _idx_bytes(arr: np.ndarray, code: int) -> bytes:
    be = arr.astype(arr.dtype.newbyteorder(">"))
    return struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + be.tobytes()


@pytest.mark.parametrize(
    "dtype,code",
    [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)],
)
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx(tmp_path, dtype, code, compress):
    arr = (np.arange(2 * 3 * 4) * 7 - 20).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 9
    data = _idx_bytes(arr, code)
    p = tmp_path / "x.idx"
    p.write_bytes(gzip.compress(data) if compress else data)
    got = D.read_idx(p)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


def test_read_idx_errors(tmp_path):
    good = _idx_bytes(np.arange(6, dtype=np.uint8).reshape(2, 3), 0x08)
    p = tmp_path / "x.idx"
    p.write_bytes(good[:-1])
    with pytest.raises(InvalidInput, match="payload is 5 bytes, expected 6"):
        D.read_idx(p)
    p.write_bytes(good + b"\x00")
    with pytest.raises(InvalidInput, match="expected 6"):
        D.read_idx(p)
    p.write_bytes(b"\x01\x02\x08\x01" + good[4:])
    with pytest.raises(InvalidInput, match="not an IDX file"):
        D.read_idx(p)
    p.write_bytes(good[:6])
    with pytest.raises(InvalidInput, match="truncated IDX header"):
        D.read_idx(p)
    p.write_bytes(b"\x00")
    with pytest.raises(InvalidInput, match="truncated"):
        D.read_idx(p)
    p.write_bytes(gzip.compress(good)[:-6])
    with pytest.raises(InvalidInput, match="decompress"):
        D.read_idx(p)
    with pytest.raises(D.DatasetNotFound, match="not found"):
        D.read_idx(tmp_path / "missing.idx")


def _fake_fashion(root, n_train=5, n_test=3):
    g = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        img = g.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
        lab = g.integers(0, 10, size=n).astype(np.uint8)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(img, 0x08)))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(lab, 0x08)))
        out[prefix] = (img, lab)
    return out


def test_fashion_mnist_loader_on_tiny_files(tmp_path):
    ref = _fake_fashion(tmp_path)
    x, y = D.fashion_mnist("all", root=tmp_path)
    assert x.shape == (8, 784) and x.dtype == np.float32 and y.dtype == np.int64
    want = np.concatenate([ref["train"][0], ref["t10k"][0]]).reshape(8, 784) / 255.0
    np.testing.assert_allclose(x, want, rtol=1e-6)
    np.testing.assert_array_equal(y, np.concatenate([ref["train"][1], ref["t10k"][1]]))
    assert D.fashion_mnist("train", root=tmp_path)[0].shape == (5, 784)
    assert D.fashion_mnist("test", root=tmp_path)[1].shape == (3,)
    with pytest.raises(InvalidInput, match="unknown split"):
        D.fashion_mnist("valid", root=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        D.fashion_mnist("all", root=tmp_path)
    assert issubclass(D.DatasetNotFound, KvantError)


@pytest.mark.skipif(not (D.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(), reason="not installed")
def test_real_fashion_mnist_test_split():
    x, y = D.fashion_mnist("test")
    assert x.shape == (10000, 784) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.99
    assert np.array_equal(np.bincount(y), np.full(10, 1000))


def test_digits():
    pytest.importorskip("sklearn")
    x, y = D.digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32 and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0 and set(np.unique(y)) == set(range(10))


# -- synthetic families ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(D.FAMILIES))
def test_family_contract(name):
    fn = D.FAMILIES[name]
    x, y = fn(3000, 12, 7, seed=5)
    assert x.shape == (3000, 12) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (3000,) and y.dtype == np.int64
    assert set(np.unique(y)) == set(range(7))
    assert np.isfinite(x).all()
    x2, y2 = fn(3000, 12, 7, seed=5)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = fn(3000, 12, 7, seed=6)
    assert not np.array_equal(x, x3)
    # edge shapes
    x1, y1 = fn(1, 1, 1, seed=0)
    assert x1.shape == (1, 1) and y1.tolist() == [0]
    xk, yk = fn(9, 3, 9, seed=0)
    assert sorted(yk.tolist()) == list(range(9))


def test_generation_independent_of_thread_count():
    before = kvant.get_num_threads()
    try:
        kvant.set_num_threads(1)
        a = D.anisotropic(2 * D._BLOCK + 5, 4, 3, seed=1)
        kvant.set_num_threads(2)
        b = D.anisotropic(2 * D._BLOCK + 5, 4, 3, seed=1)
    finally:
        kvant.set_num_threads(before)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def _class_means(x, y, k):
    return np.stack([x[y == c].mean(axis=0) for c in range(k)])


def _nearest_mean_accuracy(x, y, k):
    m = _class_means(x, y, k)
    d = (x**2).sum(1)[:, None] - 2 * x @ m.T + (m**2).sum(1)[None]
    return float((d.argmin(1) == y).mean())


def test_blobs_are_not_trivially_separable():
    x, y = D.blobs(8000, 32, 16, seed=0)
    acc = _nearest_mean_accuracy(x, y, 16)
    assert 0.85 < acc < 0.995  # clusters overlap a little: perfect recovery is impossible


def test_zipf_sizes():
    _, y = D.zipf_imbalanced(100000, 4, 50, seed=0)
    sizes = np.sort(np.bincount(y))[::-1]
    assert sizes.sum() == 100000 and sizes.min() >= 1
    ranks = np.arange(1, 51)
    np.testing.assert_allclose(sizes / sizes[0], 1.0 / ranks**1.1, atol=2e-3)
    _, y = D.zipf_imbalanced(60, 4, 50, seed=0)  # tiny n: every cluster still gets a point
    assert np.bincount(y).min() >= 1


def test_anisotropic_condition_number():
    x, y = D.anisotropic(40000, 6, 2, seed=0, separation=50.0)
    for c in range(2):
        ev = np.linalg.eigvalsh(np.cov(x[y == c].T))
        assert 60 < ev[-1] / ev[0] < 160
        assert 0.8 < ev.mean() < 1.2  # spread normalised to unit variance on average


def test_heavy_tails():
    x, y = D.heavy_tailed(20000, 8, 4, seed=0)
    r = np.linalg.norm(x - _class_means(x, y, 4)[y], axis=1)
    assert np.percentile(r, 99.9) > 10 * np.median(r)  # Gaussian noise would give < 2x
    xb, yb = D.blobs(20000, 8, 4, seed=0)
    rb = np.linalg.norm(xb - _class_means(xb, yb, 4)[yb], axis=1)
    assert np.percentile(rb, 99.9) < 3 * np.median(rb)


def test_irrelevant_dims():
    x, y = D.irrelevant_dims(40000, 40, 8, seed=0)
    between = _class_means(x, y, 8).var(axis=0)
    order = np.argsort(between)[::-1]
    signal, noise = order[:10], order[10:]
    assert between[signal].sum() > 0.97 * between.sum()  # 25% of 40 dims carry the signal
    assert not np.array_equal(np.sort(signal), np.arange(30, 40))  # at shuffled positions
    var = x.var(axis=0)
    assert 0.8 < var[signal].mean() / var[noise].mean() < 1.25  # noise of comparable variance


def test_hubness_has_hubs():
    def max_k_occurrence(x, k=10):
        d = (x**2).sum(1)[:, None] - 2 * x @ x.T + (x**2).sum(1)[None]
        np.fill_diagonal(d, np.inf)
        knn = np.argpartition(d, k, axis=1)[:, :k]
        return np.bincount(knn.ravel(), minlength=len(x)).max()

    x, _ = D.hubness(3000, 64, 6, seed=0)
    assert max_k_occurrence(x) > 100  # mean k-occurrence is 10: a few points are in very many 10-NN lists
    x0, _ = D.hubness(3000, 64, 6, seed=0, hubs_per_cluster=0)
    assert max_k_occurrence(x0) < 100


def test_family_validation():
    for args in [(0, 4, 2), (10, 0, 2), (10, 4, 0), (3, 4, 5), (10.0, 4, 2), (True, 4, 2)]:
        with pytest.raises(InvalidInput):
            D.blobs(*args)
    with pytest.raises(InvalidInput, match="seed"):
        D.blobs(10, 4, 2, seed=-1)


def test_load_and_registry():
    assert set(D.FAMILIES) == {"blobs", "anisotropic", "zipf_imbalanced", "heavy_tailed", "irrelevant_dims", "hubness"}
    x, y = D.load("heavy_tailed", 500, 8, 5, seed=3)
    x2, _ = D.heavy_tailed(500, 8, 5, seed=3)
    np.testing.assert_array_equal(x, x2)
    with pytest.raises(InvalidInput, match="unknown dataset 'nope'.*blobs"):
        D.load("nope", 10, 2, 2)
    with pytest.raises(InvalidInput, match="needs n, dim and k_true"):
        D.load("blobs")
    with pytest.raises(InvalidInput, match="fixed real dataset"):
        D.load("digits", 100)


def test_demo_dataset():
    x, y = D.demo_dataset()
    assert x.shape == (20000, 64) and x.dtype == np.float32
    assert set(np.unique(y)) == set(range(20))
    x2, y2 = D.demo_dataset()
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    acc = _nearest_mean_accuracy(x, y, 20)
    assert 0.8 < acc < 0.999
