"""Optimized product quantization (Ge et al., 2013): PQ after a learned orthogonal rotation.

Training (on the same sample as :class:`~kvant.quant.pq.PQ`):

1. Initial rotation: the identity (``init="identity"``: the alternation starts from the plain PQ solution, so OPQ
   only improves on it), *eigenvalue allocation* (``init="eigen"``, the paper's parametric solution: principal
   directions dealt to the ``m`` subspaces so the products of their variances balance), or (``init="auto"``,
   default) eigen when its first codebooks' training MSE is more than 1% below the identity's. On Fashion-MNIST (20k
   rows, m=16, 20 iterations) identity reached MSE 4.72e5 and eigen 5.42e5; on axis-aligned anisotropic rows (the
   output of a PCA: variances sorted by coordinate, 128-d, m=16) identity ended at 1.44× FAISS's MSE (116 vs 81)
   and eigen at 0.93× (75.5); the first codebooks' MSE (8.6 vs 11.4, 130 vs 76) picked the better start on both
   and on the low-rank and embedding-like sets tried (2026-12-07).
2. Codebooks are trained in the rotated space (k-means, ``n_iter_pq_0`` iterations).
3. ``n_iter`` alternations of: encode/decode in the rotated space -> orthogonal Procrustes (SVD of
   ``Xᵀ Y``) for the rotation minimising ``||X R - Y||`` -> ``n_iter_pq`` warm-started Lloyd iterations
   of every codebook.

``x`` is encoded as PQ codes of ``(x - mean) @ rotation``; decoding maps back with ``rotation.T`` and adds
``mean``. ``mean`` is zero unless the training rows share an offset much larger than their spread
(:func:`kvant._numerics.conditioning`'s rule): rotating un-centred float32 rows of such data (1e4 + 0.01·N)
kept only the offset's digits and made OPQ 2.4× worse than plain PQ.
"""

from __future__ import annotations

import numpy as np

from .. import persist
from .._config import with_threads
from .._numerics import conditioning, uncondition
from ..errors import InvalidInput, PersistError
from .pq import (
    PQ,
    RotationOverflow,
    _check_int,
    _kpq,
    _step_reporter,
    check_codebook_span,
    frozen,
    lloyd_refine,
    range_conditioned,
    train_subspaces,
)

__all__ = ["OPQ", "eigenvalue_allocation"]



def eigenvalue_allocation(xs: np.ndarray, m: int) -> np.ndarray:
    """Orthogonal (dim, dim) matrix whose column block j holds the principal directions given to subspace j."""
    dim = xs.shape[1]
    dsub = dim // m
    x64 = xs.astype(np.float64)
    x64 -= x64.mean(axis=0)
    cov = x64.T @ x64 / max(1, xs.shape[0] - 1)
    # normalised by a power of two near its trace: LAPACK's eigenvectors of c·cov differ from cov's in their last
    # bits, and rows scaled by 2^k must give the same rotation (and codebooks exactly scaled)
    cov = np.ldexp(cov, -int(np.frexp(max(float(np.trace(cov)), 1e-300))[1]))
    w, v = np.linalg.eigh(cov)
    order = np.argsort(-w, kind="stable")
    w, v = w[order], v[:, order]
    logw = np.log(np.maximum(w, max(float(w[0]), 1e-30) * 1e-12))
    buckets: list[list[int]] = [[] for _ in range(m)]
    logprod = np.zeros(m)
    for i in range(dim):
        if i < m:
            j = i
        else:
            open_ = [b for b in range(m) if len(buckets[b]) < dsub]
            j = min(open_, key=lambda b: (logprod[b], b))
        buckets[j].append(i)
        logprod[j] += logw[i]
    cols = [i for b in buckets for i in b]
    return np.ascontiguousarray(v[:, cols])


def procrustes(x: np.ndarray, codes: np.ndarray, books: np.ndarray) -> np.ndarray:
    """Orthogonal R minimising ``||x R - y||_F`` for ``y`` the rows decoded from ``codes`` with ``books``: with
    ``xᵀy = U S Vᵀ``, ``R = U Vᵀ``.

    ``xᵀy`` is formed from the per-codeword sums of the rows (:func:`kvant.kernels.pq.pq_code_row_sums`), in float64:
    sub-space j's columns are ``sums[j]ᵀ books[j]``. On Fashion-MNIST's 60,000 × 784 rows this took 0.09 s where the
    float64 GEMM ``xᵀ y`` took 0.81 s, nearly half of each OPQ iteration (Zen 5, 2026-12-07)."""
    m, ksub, dsub = books.shape
    sums = _kpq().pq_code_row_sums(np.ascontiguousarray(x, dtype=np.float32), codes, ksub)
    xty = np.empty((x.shape[1], m * dsub), np.float64)
    for j in range(m):
        xty[:, j * dsub : (j + 1) * dsub] = sums[j].T @ books[j].astype(np.float64)
    u, _, vt = np.linalg.svd(xty)
    return u @ vt


def _training_error(xr: np.ndarray, books: np.ndarray, codes: np.ndarray) -> float:
    """Squared error of the rows ``xr`` coded as ``codes`` with ``books``, summed in float64 (blocks of rows)."""
    m = books.shape[0]
    total = 0.0
    for a in range(0, xr.shape[0], 8192):
        y = books[np.arange(m), codes[a : a + 8192]].reshape(-1, xr.shape[1])
        total += float(np.sum((xr[a : a + 8192].astype(np.float64) - y) ** 2))
    return total


class OPQ(PQ):
    """Product quantizer after a learned rotation (Ge et al., 2013): the methods of :class:`PQ`, plus ``.rotation``.

    Training alternates PQ on the rotated rows with an orthogonal Procrustes update of the rotation (module
    docstring); codes are PQ codes of ``(x - mean) @ rotation``.

    Parameters
    ----------
    dim, m, nbits, seed : as for :class:`PQ` (everything after ``nbits`` is keyword-only).
    max_train_rows : rows sampled for training; default max(256·2**nbits, 65,536): the rotation has dim² entries
        to learn, so 4-bit OPQ trains on 65,536 rows like 8-bit (FAISS's ``OPQMatrix`` samples 65,536 too; on
        4,096 rows a 384-d rotation over-fitted, 1.29x FAISS's MSE on held-out rows).
    n_iter : rotation updates, alternating with codebook updates (default 50, as FAISS's ``OPQMatrix``; 0 keeps the
        starting rotation). 20 was the default until 2026-12-07: on 384- and 768-d embedding-like rows (decaying
        spectrum) it left the MSE 12% above FAISS's, where 50 reaches 0.98-1.0x of it in under half its time.
        Not PQ's Lloyd iterations: those are ``n_iter_pq`` per alternation (default 4) and ``n_iter_pq_0`` for the
        first codebooks (default 10).
    init : the starting rotation: ``"auto"`` (default: ``"eigen"`` when its first codebooks' training MSE is more than
        1% below ``"identity"``'s, else the identity; one extra codebook training), ``"identity"`` (OPQ then only
        improves on plain PQ) or ``"eigen"`` (eigenvalue allocation: principal directions dealt to the sub-spaces so
        their variances balance).
    seeding : the codebooks' seeding, as for :class:`PQ`.

    >>> import numpy as np, kvant
    >>> x = np.random.default_rng(0).standard_normal((5000, 32)).astype("float32") * np.arange(1, 33)
    >>> opq = kvant.OPQ(dim=32, m=8, nbits=4, n_iter=5).fit(x)
    >>> opq.rotation.shape
    (32, 32)
    """

    _kind = "OPQ"
    _MIN_TRAIN_ROWS = 65_536  # (see max_train_rows above)

    def __init__(
        self,
        dim: int,
        m: int,
        nbits: int = 8,
        *,
        n_iter: int = 50,
        seed: int | None = 0,
        n_iter_pq: int = 4,
        n_iter_pq_0: int = 10,
        max_train_rows: int | None = None,
        init: str = "auto",
        seeding: str = "k-means++",
    ):
        super().__init__(dim, m, nbits, seed=seed, n_iter=n_iter, max_train_rows=max_train_rows, seeding=seeding)
        self.n_iter_pq = _check_int("n_iter_pq", n_iter_pq, lo=0)
        self.n_iter_pq_0 = _check_int("n_iter_pq_0", n_iter_pq_0, lo=0)
        if init not in ("auto", "identity", "eigen"):
            raise InvalidInput(f"unknown OPQ init {init!r}; expected 'auto', 'identity' or 'eigen'")
        self.init = init
        self.rotation_: np.ndarray | None = None
        self.mean_: np.ndarray | None = None

    @property
    def rotation(self) -> np.ndarray:
        """(dim, dim) orthogonal float32 matrix; codes are PQ codes of ``(x - mean) @ rotation``."""
        self._check_fitted()
        return self.rotation_

    @property
    def mean(self) -> np.ndarray:
        """(dim,) float32 offset removed before the rotation (zeros unless the data has a large common offset)."""
        self._check_fitted()
        return self.mean_

    @property
    def train_steps(self) -> int:
        """Lloyd iterations ``fit`` runs: the first PQ training's (two of them for ``init="auto"``), then each rotation
        step's."""
        return self.n_iter_pq_0 * (2 if self.init == "auto" else 1) + self.n_iter * self.n_iter_pq

    @with_threads
    def fit(self, x, progress=None) -> OPQ:
        """Learn the rotation and codebooks from ``x`` (any kvant.io source) on a sample of ``train_rows`` rows;
        ``progress`` as in :meth:`PQ.fit`, counting to :attr:`train_steps`."""
        step = _step_reporter(progress)
        xs = self._train_sample(x)
        shift = conditioning(xs)[0]  # a large common offset is removed first (module docstring)
        mean = np.zeros(self.dim, np.float32) if shift is None else shift
        if shift is not None:
            xs = np.subtract(xs, shift, dtype=np.float32)
        xs, scale = range_conditioned(xs)  # a rotation is scale-free; codebooks are not
        kpq = _kpq()
        best = None
        for init in (("identity", "eigen") if self.init == "auto" else (self.init,)):
            r = (eigenvalue_allocation(xs, self.m) if init == "eigen" else np.eye(self.dim)).astype(np.float32)
            xr = xs @ r
            books = train_subspaces(xr, self.m, self.ksub, self.n_iter_pq_0, self.seed, step, self.seeding)
            err = 0.0 if self.init != "auto" else _training_error(xr, books, kpq.pq_encode(xr, books))
            # eigen only when clearly better: on isotropic rows the two tie, and a tie decided by rounding would
            # make the codebooks depend on the data's scale (a power of two changes the eigenvectors' last bits)
            if best is None or err < 0.99 * best[0]:
                best = (err, r, xr, books)
        _, r, xr, books = best
        split = self.seed if self.seeding == "random" else False
        for _ in range(self.n_iter):
            codes = kpq.pq_encode(np.ascontiguousarray(xr), books)
            r = procrustes(xs, codes, books).astype(np.float32)
            xr = xs @ r
            books = lloyd_refine(np.ascontiguousarray(xr), books, self.n_iter_pq, step, split)
        with np.errstate(over="ignore"):  # checked just below
            books = uncondition(books, None, scale)
        if not np.all(np.isfinite(books)):  # rotated codewords near float32's maximum overflow when unscaled
            raise InvalidInput("OPQ: the rotated codewords overflow float32 (the training rows come within ~√dim "
                               "of float32's maximum); scale the data down by a power of two first")
        check_codebook_span(books)
        self.rotation_ = np.ascontiguousarray(r, dtype=np.float32)
        self.mean_ = mean
        self.codebooks_ = frozen(books)
        return self

    def _rotate(self, block: np.ndarray) -> np.ndarray:
        # in float64, then rounded: float32 BLAS rounds a one-row product differently from a many-row one, and
        # codes then depended on how many rows were encoded together (1 row in 3,000 in a review)
        with np.errstate(over="ignore"):  # checked just below
            out = (np.asarray(block, dtype=np.float64) @ self.rotation_.astype(np.float64)).astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise RotationOverflow(int(np.argmax(~np.all(np.isfinite(out), axis=1))))
        return out

    def _unrotate(self, block: np.ndarray) -> np.ndarray:
        return block @ self.rotation_.T

    def _offset(self) -> np.ndarray | None:
        return self.mean_ if self.mean_.any() else None

    def _meta(self) -> dict:
        meta = super()._meta()
        meta.update(n_iter_pq=self.n_iter_pq, n_iter_pq_0=self.n_iter_pq_0, init=self.init)
        return meta

    _ARRAY_NAMES = frozenset({"codebooks", "rotation", "mean"})
    _OPTIONAL_ARRAYS = frozenset({"mean"})  # files written before the offset fix have none

    def _arrays(self) -> dict:
        return {"codebooks": self.codebooks_, "rotation": self.rotation_, "mean": self.mean_}

    @classmethod
    def _from_meta(cls, meta: dict):
        return cls(meta["dim"], meta["m"], meta["nbits"], n_iter=meta["n_iter"], seed=meta["seed"],
                   n_iter_pq=meta["n_iter_pq"], n_iter_pq_0=meta["n_iter_pq_0"],
                   max_train_rows=meta["max_train_rows"], init=meta.get("init", "identity"),  # (older files)
                   seeding=meta.get("seeding", "k-means++"))

    def _load_arrays(self, arrays: dict) -> None:
        rot = arrays["rotation"]
        if rot.dtype != np.float32 or rot.shape != (self.dim, self.dim):
            raise PersistError(f"rotation has shape {rot.shape} / {rot.dtype}, expected ({self.dim}, {self.dim})")
        if not np.isfinite(rot).all():
            raise PersistError("rotation contains NaN or inf")
        err = np.abs(rot.astype(np.float64).T @ rot - np.eye(self.dim)).max()
        if err > 1e-3:
            raise PersistError(f"rotation is not orthogonal (max |RᵀR - I| = {err:.2g})")
        mean = arrays.get("mean")  # files written before the offset fix have none: a zero mean
        if mean is None:
            mean = np.zeros(self.dim, np.float32)
        if mean.dtype != np.float32 or mean.shape != (self.dim,) or not np.isfinite(mean).all():
            raise PersistError(f"mean has shape {mean.shape} / {mean.dtype} or non-finite values, expected "
                               f"({self.dim},) float32")
        super()._load_arrays(arrays)
        self.rotation_ = np.ascontiguousarray(rot)
        self.mean_ = np.ascontiguousarray(mean)


persist.register("OPQ")(OPQ)
