"""Benchmark datasets: real ones read offline, and seeded synthetic families that stress clustering.

Real data
    :func:`fashion_mnist` (70 000 x 784, Debian package ``dataset-fashion-mnist``, read by a small IDX
    parser written here) and :func:`digits` (scikit-learn's 1 797 x 64 digits).

Synthetic families, each ``fn(n, dim, k_true, seed=0) -> (X float32 (n, dim), labels int64 (n,))``
    ``blobs``            isotropic Gaussians (the easy baseline every method is tuned for);
    ``anisotropic``      every cluster has its own random covariance with condition number 100;
    ``zipf_imbalanced``  cluster sizes proportional to 1 / rank**1.1 (a few huge, many tiny clusters);
    ``heavy_tailed``     multivariate Student-t noise with 2 degrees of freedom (infinite variance:
                         a few points lie hundreds of noise widths from their centre);
    ``irrelevant_dims``  only ~25% of the (shuffled) coordinates carry cluster signal; the others are
                         noise with the same distribution of variances, so no coordinate stands out;
    ``hubness``          clusters on a low-dimensional curved manifold (random Fourier features of a
                         latent Gaussian mixture) plus hub points at the clusters' ambient means, which
                         are closer to most of their cluster than its members are to each other
                         (isotropic blobs in high dimension already show some hubness; this family
                         adds strong, labelled hubs on top of a low intrinsic dimension).

How hard they are: centres are drawn so that the expected distance between two centres is
``separation`` noise widths, with the default chosen per ``k_true`` so that the union bound on the
Bayes error of nearest-centre assignment is 5% (``separation = 2 * z(1 - 0.05 / (k_true - 1))``, about
5.1 noise widths for 10 clusters and 7.8 for 1024). Random centres scatter around that value, so some
pairs of clusters overlap: a perfect V-measure is not attainable, and local minima are real.

Generation is deterministic for a seed and independent of the thread count: rows are produced in fixed
blocks of ``_BLOCK`` rows, each from its own child of ``np.random.SeedSequence(seed)``, on up to
``kvant.get_num_threads()`` threads. 1M x 128 takes about a second or two on this 2-core machine.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import NormalDist

import numpy as np

from .._config import check_seed, get_num_threads
from ..errors import InvalidInput, KvantError

__all__ = [
    "DatasetNotFound",
    "read_idx",
    "fashion_mnist",
    "digits",
    "blobs",
    "anisotropic",
    "zipf_imbalanced",
    "heavy_tailed",
    "irrelevant_dims",
    "hubness",
    "FAMILIES",
    "load",
    "demo_dataset",
    "default_separation",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_BLOCK = 32768  # rows per generation block (fixed: the stream layout must not depend on threads)


class DatasetNotFound(KvantError, FileNotFoundError):
    """A real dataset's files are not installed on this machine."""


# ----------------------------------------------------------------------------------------------------
# IDX files (the MNIST / Fashion-MNIST format)
# ----------------------------------------------------------------------------------------------------
_IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a native-endian NumPy array.

    Layout: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian uint32
    sizes and the values in C order (big-endian). Truncated or malformed files raise InvalidInput.
    """
    p = Path(os.fspath(path))
    if not p.is_file():
        raise DatasetNotFound(f"IDX file not found: {str(p)!r}")
    with open(p, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(p, "rb") if gz else open(p, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise InvalidInput(f"{p}: cannot decompress IDX file ({exc})") from None
    if len(data) < 4:
        raise InvalidInput(f"{p}: truncated IDX file ({len(data)} bytes, header needs 4)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_TYPES or ndim == 0:
        raise InvalidInput(f"{p}: not an IDX file (magic {data[:4].hex()}; expected 0000 + type code + ndim)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise InvalidInput(f"{p}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_TYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise InvalidInput(
            f"{p}: IDX payload is {len(data) - header} bytes, expected {expected} for shape {shape} of {dtype.name}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist(split: str = "all", root=None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as ``(X float32 (n, 784) in [0, 1], labels int64 (n,))``.

    ``split`` is ``"train"`` (60 000 rows), ``"test"`` (10 000) or ``"all"`` (70 000, train then
    test). Files are read from ``root`` (default ``/usr/share/datasets/fashion-mnist``, where the Debian
    package ``dataset-fashion-mnist`` installs them).
    """
    splits = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}
    if split not in splits:
        raise InvalidInput(f"unknown split {split!r} (use 'train', 'test' or 'all')")
    root = FASHION_MNIST_DIR if root is None else Path(os.fspath(root))
    xs, ys = [], []
    for prefix in splits[split]:
        img = root / f"{prefix}-images-idx3-ubyte.gz"
        lab = root / f"{prefix}-labels-idx1-ubyte.gz"
        for f in (img, lab):
            if not f.is_file():
                raise DatasetNotFound(
                    f"Fashion-MNIST file {str(f)!r} is missing; install it with "
                    f"`sudo apt-get install dataset-fashion-mnist` (or pass root= to a directory holding "
                    f"the four *-ubyte.gz files)"
                )
        images, labels = read_idx(img), read_idx(lab)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise InvalidInput(f"{img}: unexpected shapes {images.shape} and {labels.shape}")
        xs.append(images.reshape(images.shape[0], -1))
        ys.append(labels)
    x = np.concatenate(xs) if len(xs) > 1 else xs[0]
    out = x.astype(np.float32)
    out *= np.float32(1.0 / 255.0)
    return out, np.concatenate(ys).astype(np.int64)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as ``(X float32 (1797, 64) scaled to [0, 1], labels int64)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetNotFound("digits() needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    return x, d.target.astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# synthetic families
# ----------------------------------------------------------------------------------------------------
def default_separation(k_true: int, overlap: float = 0.05) -> float:
    """Expected centre distance (in noise widths) at which the Bayes-error union bound is ``overlap``."""
    pairs = max(1, int(k_true) - 1)
    return 2.0 * NormalDist().inv_cdf(1.0 - overlap / pairs)


def _check(n, dim, k_true, seed) -> tuple[int, int, int, int | None]:
    for nm, v in (("n", n), ("dim", dim), ("k_true", k_true)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise InvalidInput(f"{nm} must be a positive integer, got {v!r}")
    if k_true > n:
        raise InvalidInput(f"k_true={k_true} must not exceed n={n}")
    return int(n), int(dim), int(k_true), check_seed(seed)


def _balanced_labels(g: np.random.Generator, n: int, k: int) -> np.ndarray:
    sizes = np.full(k, n // k, dtype=np.int64)
    sizes[: n % k] += 1
    return g.permutation(np.repeat(np.arange(k, dtype=np.int64), sizes))


def _zipf_sizes(n: int, k: int, exponent: float) -> np.ndarray:
    """Cluster sizes proportional to 1 / rank**exponent, each at least 1, summing to n (largest remainder)."""
    w = 1.0 / np.arange(1, k + 1, dtype=np.float64) ** exponent
    rest = n - k  # every cluster gets one point, the rest is shared out by weight
    share = w / w.sum() * rest
    sizes = np.floor(share).astype(np.int64)
    short = rest - int(sizes.sum())
    sizes[np.argsort(-(share - sizes), kind="stable")[:short]] += 1
    return sizes + 1


def _centres(g: np.random.Generator, k: int, dim: int, sep: float) -> np.ndarray:
    """k centres whose expected pairwise distance is ``sep``."""
    return (g.standard_normal((k, dim)) * (sep / math.sqrt(2.0 * dim))).astype(np.float32)


def _generate(n: int, dim: int, seed_seq: np.random.SeedSequence, fill: Callable) -> np.ndarray:
    """Fill an (n, dim) float32 array block by block; ``fill(g, start, stop, out_block)``."""
    x = np.empty((n, dim), np.float32)
    nblocks = (n + _BLOCK - 1) // _BLOCK
    kids = seed_seq.spawn(nblocks)

    def run(b: int) -> None:
        s = b * _BLOCK
        e = min(n, s + _BLOCK)
        fill(np.random.default_rng(kids[b]), s, e, x[s:e])

    threads = max(1, min(get_num_threads(), nblocks))
    if threads == 1:
        for b in range(nblocks):
            run(b)
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(run, range(nblocks)))
    return x


def _seeds(seed) -> tuple[np.random.Generator, np.random.SeedSequence]:
    setup, data = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(setup), data


def blobs(n: int, dim: int, k_true: int, seed: int | None = 0, separation: float | None = None):
    """Isotropic unit-variance Gaussian clusters of equal size (the easy baseline)."""
    n, dim, k_true, seed = _check(n, dim, k_true, seed)
    g, data = _seeds(seed)
    sep = default_separation(k_true) if separation is None else float(separation)
    centres = _centres(g, k_true, dim, sep)
    labels = _balanced_labels(g, n, k_true)

    def fill(rg, s, e, out):
        rg.standard_normal(out=out, dtype=np.float32)
        out += centres[labels[s:e]]

    return _generate(n, dim, data, fill), labels


def anisotropic(
    n: int, dim: int, k_true: int, seed: int | None = 0, separation: float | None = None, condition: float = 100.0
):
    """Gaussian clusters, each with its own random covariance of condition number ``condition``.

    Covariance of cluster c is ``Q_r diag(v_c) Q_r^T``: ``v_c`` a random permutation of variances
    spaced geometrically over [1, condition] (normalised to mean 1, so the total spread matches
    :func:`blobs`), ``Q_r`` one of up to 8 random rotations (shared pool; the permuted spectra still
    make every cluster's covariance different).
    """
    n, dim, k_true, seed = _check(n, dim, k_true, seed)
    g, data = _seeds(seed)
    sep = default_separation(k_true) if separation is None else float(separation)
    centres = _centres(g, k_true, dim, sep)
    labels = _balanced_labels(g, n, k_true)
    var = np.geomspace(1.0, float(condition), dim) if dim > 1 else np.ones(1)
    var /= var.mean()
    stds = np.stack([np.sqrt(g.permutation(var)) for _ in range(k_true)]).astype(np.float32)
    n_rot = min(k_true, 8)
    rots = [np.linalg.qr(g.standard_normal((dim, dim)))[0].T.astype(np.float32) for _ in range(n_rot)]
    rot_of = g.integers(0, n_rot, size=k_true)

    def fill(rg, s, e, out):
        lab = labels[s:e]
        z = rg.standard_normal((e - s, dim), dtype=np.float32)
        z *= stds[lab]
        which = rot_of[lab]
        for r in range(n_rot):
            rows = np.flatnonzero(which == r)
            if rows.size:
                out[rows] = z[rows] @ rots[r]
        out += centres[lab]

    return _generate(n, dim, data, fill), labels


def zipf_imbalanced(
    n: int, dim: int, k_true: int, seed: int | None = 0, separation: float | None = None, exponent: float = 1.1
):
    """Isotropic clusters whose sizes are proportional to 1 / rank**1.1 (every cluster has >= 1 point).

    With 1M points and 1024 clusters the largest holds ~17% of the data and the smallest ~80 points:
    methods that balance cluster sizes split the big ones and merge the small ones.
    """
    n, dim, k_true, seed = _check(n, dim, k_true, seed)
    g, data = _seeds(seed)
    sep = default_separation(k_true) if separation is None else float(separation)
    centres = _centres(g, k_true, dim, sep)
    sizes = _zipf_sizes(n, k_true, exponent)
    labels = g.permutation(np.repeat(np.arange(k_true, dtype=np.int64), sizes))

    def fill(rg, s, e, out):
        rg.standard_normal(out=out, dtype=np.float32)
        out += centres[labels[s:e]]

    return _generate(n, dim, data, fill), labels


def heavy_tailed(n: int, dim: int, k_true: int, seed: int | None = 0, separation: float | None = None, df: float = 2.0):
    """Clusters with multivariate Student-t noise (``df`` = 2: infinite variance).

    Each point is ``centre + z / sqrt(w / df)`` with ``z ~ N(0, I)`` and ``w ~ chi2(df)`` per point, so
    every coordinate is Student-t distributed and whole points are outliers (P(scale > s) ~ 1/s**2).
    """
    n, dim, k_true, seed = _check(n, dim, k_true, seed)
    g, data = _seeds(seed)
    sep = default_separation(k_true) if separation is None else float(separation)
    centres = _centres(g, k_true, dim, sep)
    labels = _balanced_labels(g, n, k_true)
    df = float(df)

    def fill(rg, s, e, out):
        rg.standard_normal(out=out, dtype=np.float32)
        w = rg.chisquare(df, size=e - s)
        w = np.maximum(w, 1e-12)  # chi2 is > 0 almost surely; guard the division against 0.0 underflow
        out *= np.sqrt(df / w).astype(np.float32)[:, None]
        out += centres[labels[s:e]]

    return _generate(n, dim, data, fill), labels


def irrelevant_dims(
    n: int, dim: int, k_true: int, seed: int | None = 0, separation: float | None = None, signal_fraction: float = 0.25
):
    """Clusters separated only in ~25% of the coordinates (at shuffled positions).

    Signal coordinates hold ``centre + N(0, 1)``; the others are ``N(0, 1 + v)`` with ``v`` drawn from
    the centres' per-coordinate variances, so signal and noise coordinates have the same distribution
    of variances and none can be spotted as informative from its spread.
    """
    n, dim, k_true, seed = _check(n, dim, k_true, seed)
    g, data = _seeds(seed)
    sep = default_separation(k_true) if separation is None else float(separation)
    n_sig = max(1, round(signal_fraction * dim))
    sig_centres = _centres(g, k_true, n_sig, sep)
    cols = g.permutation(dim)
    sig_cols, noise_cols = np.sort(cols[:n_sig]), np.sort(cols[n_sig:])
    centres = np.zeros((k_true, dim), np.float32)
    centres[:, sig_cols] = sig_centres
    # noise coordinates get variances drawn from the signal coordinates' total variances (1 + the
    # spread of the centres along that coordinate): the two groups have the same variance distribution
    cvar = sig_centres.astype(np.float64).var(axis=0)
    scale = np.ones(dim, np.float32)
    scale[noise_cols] = np.sqrt(1.0 + cvar[g.integers(0, n_sig, size=noise_cols.size)])
    labels = _balanced_labels(g, n, k_true)

    def fill(rg, s, e, out):
        rg.standard_normal(out=out, dtype=np.float32)
        out *= scale
        out += centres[labels[s:e]]

    return _generate(n, dim, data, fill), labels


def hubness(
    n: int,
    dim: int,
    k_true: int,
    seed: int | None = 0,
    separation: float | None = None,
    latent_dim: int | None = None,
    hubs_per_cluster: int = 2,
):
    """Clusters on a curved low-dimensional manifold in high dimension, plus a few hub points.

    Latent points ``z`` (``latent_dim`` = clip(dim // 4, 2, 16)) form a Gaussian mixture; they are
    mapped to ``sqrt(2) * cos(z W + b)`` (random Fourier features of bandwidth ``separation``, so
    nearby latent points stay close and distant clusters become nearly equidistant) plus 0.1 ambient
    noise. Then ``hubs_per_cluster`` points per cluster are replaced by points at that cluster's ambient
    mean (plus tiny noise): these are closer to most of the cluster than its members are to each other,
    so they appear in most nearest-neighbour lists — hubs. Hubs keep their cluster's label.
    """
    n, dim, k_true, seed = _check(n, dim, k_true, seed)
    g, data = _seeds(seed)
    d = int(latent_dim) if latent_dim is not None else int(np.clip(dim // 4, 2, 16))
    if d < 1:
        raise InvalidInput(f"latent_dim must be >= 1, got {latent_dim}")
    sep = default_separation(k_true) if separation is None else float(separation)
    lat_centres = (g.standard_normal((k_true, d)) * (sep / math.sqrt(2.0 * d))).astype(np.float32)
    bandwidth = max(sep, math.sqrt(2.0 * d))
    w = (g.standard_normal((d, dim)) / bandwidth).astype(np.float32)
    b = g.uniform(0, 2 * np.pi, size=dim).astype(np.float32)
    labels = _balanced_labels(g, n, k_true)
    root2 = np.float32(math.sqrt(2.0))

    def embed(z):
        y = z @ w
        y += b
        np.cos(y, out=y)
        y *= root2
        return y

    def fill(rg, s, e, out):
        lab = labels[s:e]
        z = rg.standard_normal((e - s, d), dtype=np.float32)
        z += lat_centres[lab]
        out[:] = embed(z)
        out += rg.standard_normal((e - s, dim), dtype=np.float32) * np.float32(0.1)

    x = _generate(n, dim, data, fill)
    # hubs: ambient means of each cluster, estimated from 256 fresh latent draws per cluster
    n_hubs = min(hubs_per_cluster * k_true, n // 50)
    if n_hubs:
        hub_clusters = np.arange(n_hubs) % k_true
        means = np.empty((k_true, dim), np.float32)
        for c in range(k_true):
            z = g.standard_normal((256, d)).astype(np.float32) + lat_centres[c]
            means[c] = embed(z).mean(axis=0)
        rows = g.choice(n, size=n_hubs, replace=False)
        x[rows] = means[hub_clusters] + (g.standard_normal((n_hubs, dim)) * 0.01).astype(np.float32)
        labels[rows] = hub_clusters
    return x, labels


FAMILIES: dict[str, Callable] = {
    "blobs": blobs,
    "anisotropic": anisotropic,
    "zipf_imbalanced": zipf_imbalanced,
    "heavy_tailed": heavy_tailed,
    "irrelevant_dims": irrelevant_dims,
    "hubness": hubness,
}
_REAL = {"fashion_mnist": fashion_mnist, "fashion-mnist": fashion_mnist, "digits": digits}


def load(name: str, n: int | None = None, dim: int | None = None, k_true: int | None = None, seed: int | None = 0):
    """A dataset by name: a synthetic family (needs ``n``, ``dim``, ``k_true``) or a real one
    (``"fashion_mnist"``, ``"digits"``; then ``n``/``dim``/``k_true`` must be left out).

    >>> x, y = load("anisotropic", 1000, 16, 8, seed=0)
    >>> x.shape, x.dtype.name, int(y.max()) + 1
    ((1000, 16), 'float32', 8)
    """
    if name in _REAL:
        if n is not None or dim is not None or k_true is not None:
            raise InvalidInput(f"{name} is a fixed real dataset: do not pass n, dim or k_true")
        return _REAL[name]()
    if name not in FAMILIES:
        valid = ", ".join(list(FAMILIES) + ["fashion_mnist", "digits"])
        raise InvalidInput(f"unknown dataset {name!r} (valid: {valid})")
    if n is None or dim is None or k_true is None:
        raise InvalidInput(f"synthetic family {name!r} needs n, dim and k_true")
    return FAMILIES[name](n, dim, k_true, seed=seed)


def demo_dataset(n: int = 20000, dim: int = 64, seed: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """The embedded default dataset of ``kvant demo``: 20 000 x 64, 20 labelled clusters, generated.

    A mix of three families placed at random offsets: 8 anisotropic clusters (40% of rows), 8
    Zipf-imbalanced clusters (35%) and 4 heavy-tailed (df=5) clusters (25%). Labels 0-7, 8-15, 16-19.
    """
    n, dim, _, seed = _check(n, dim, 20, seed)
    g, _ = _seeds(seed)
    parts = [(anisotropic, 0.40, 8, {}), (zipf_imbalanced, 0.35, 8, {}), (heavy_tailed, 0.25, 4, {"df": 5.0})]
    sizes = [int(n * f) for _, f, _, _ in parts]
    sizes[0] += n - sum(sizes)
    sep = default_separation(20)
    xs, ys, offset = [], [], 0
    for (fn, _, k, kw), m in zip(parts, sizes, strict=True):
        sub_seed = int(g.integers(0, 2**31)) if seed is not None else None
        x, y = fn(m, dim, k, seed=sub_seed, separation=sep, **kw)
        x += _centres(g, 1, dim, 1.5 * sep)  # move the family away from the others (they may still touch)
        xs.append(x)
        ys.append(y + offset)
        offset += k
    perm = g.permutation(n)
    return np.concatenate(xs)[perm], np.concatenate(ys)[perm]
