"""Product quantization (Jégou et al., 2011): split vectors into ``m`` sub-vectors, learn ``2**nbits``
codewords per subspace with k-means, store one codeword id per sub-vector.

Training runs on a sample of the input: by default ``256 * 2**nbits`` rows (65,536 for nbits=8,
4,096 for nbits=4; FAISS uses the same 256 points per centroid), override with ``max_train_rows``.
Each subspace is seeded with k-means++ (:func:`kvant.cluster.lloyd.init_centroids`), then the ``m``
k-means run their Lloyd iterations together, one parallel encoder pass per iteration (see
:func:`train_subspaces`); seeded from ``seed`` so the same seed and thread count give the same codebooks.

Code layout: nbits=8 gives ``m`` bytes per vector (byte j = codeword id of sub-vector j); nbits=4 packs
two codes per byte, sub-vector ``2i`` in the low nibble of byte ``i`` and ``2i+1`` in the high nibble
(``ceil(m/2)`` bytes).
"""

from __future__ import annotations

import math

import numpy as np

from .. import persist
from .._config import check_seed, rng, with_threads
from .._numerics import condition
from ..errors import DimensionMismatch, EmptyIndex, InvalidInput, PersistError
from ..io import as_source
from ..io.source import ArraySource, VectorSource, default_chunk_rows

__all__ = ["PQ", "pack_nibbles", "unpack_nibbles", "check_dim_m"]

_ROWS_PER_CODEWORD = 256
_ENCODE_CHUNK_ROWS = 65536
# k-means++ seeds each subspace from up to this many training rows, greedily (best of _SEED_TRIALS draws per codeword,
# scikit-learn's rule). The clustering default (8 rows per centre: 128 rows at 4 bits) missed the tail of sparse data:
# on TF-IDF-like rows (90% of 4-d sub-vectors zero) 128 rows held ~10 distinct non-zero sub-vectors for 16
# codewords, and the MSE was 1.30x FAISS's at 4 bits (now 0.97x) and 0.76x at 8 bits (now 0.62x); dense data
# (Fashion-MNIST, Gaussian, embedding-like) moved by <= 1%, for +0.4-1.5 s of 8-bit training (see train_subspaces).
_SEED_ROWS = 16384
_SEED_TRIALS = 4


def frozen(books: np.ndarray) -> np.ndarray:
    """``books`` made read-only, as every codebook array a codec holds is: what the codec derives from its codewords
    is kept per codebook array (the search scale, the kernels' transposed layout), so the codewords are replaced, never
    written in place (a review: codewords written in place were searched with the old ones' tables)."""
    books.flags.writeable = False
    return books


class RotationOverflow(InvalidInput):
    """A row of a block overflows float32 once rotated; ``row`` counts within the block, and callers that know the
    block's place re-raise it with :meth:`at` (a review: row 69,000 was reported as row 3,464 of its chunk)."""

    def __init__(self, row: int, what: str = "row"):
        self.row = row
        super().__init__(f"{what} {row} overflows float32 once rotated (its values come within ~√dim of float32's "
                         "maximum); scale the data down by a power of two first")

    def at(self, start: int, what: str = "row") -> RotationOverflow:
        return RotationOverflow(start + self.row, what)


def _kpq():
    # Imported lazily: keeps ``import kvant`` cheap and independent of kernel compilation.
    from ..kernels import pq as kpq

    return kpq


def _check_int(name: str, value, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
        raise InvalidInput(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def check_dim_m(dim, m, nbits) -> tuple[int, int, int]:
    """Validate ``(dim, m, nbits)``; ``dim % m != 0`` names the values of m that would work."""
    dim = _check_int("dim", dim)
    m = _check_int("m", m)
    if isinstance(nbits, bool) or not isinstance(nbits, int | np.integer) or nbits not in (4, 8):
        raise InvalidInput(f"nbits must be 4 or 8, got {nbits!r}")
    if dim % m != 0:
        small = [d for d in range(1, int(dim**0.5) + 1) if dim % d == 0]  # O(√dim), not O(dim)
        divisors = sorted(set(small) | {dim // d for d in small})
        raise InvalidInput(f"m={m} does not divide dim={dim}; m must be one of {divisors}")
    return dim, m, int(nbits)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(n, m) codes < 16 -> (n, ceil(m/2)) bytes; sub-vector 2i in the low nibble of byte i."""
    n, m = codes.shape
    if m % 2:
        codes = np.concatenate([codes, np.zeros((n, 1), np.uint8)], axis=1)
    return np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4), dtype=np.uint8)


def unpack_nibbles(packed: np.ndarray, m: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`."""
    n = packed.shape[0]
    out = np.empty((n, packed.shape[1] * 2), np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return np.ascontiguousarray(out[:, :m])


def _as_checked_source(x, dim: int, what: str) -> VectorSource:
    src = as_source(x, name=what)
    if src.dim != dim:
        raise DimensionMismatch(f"{what} has dimension {src.dim}, expected {dim}")
    return src


# Squared distances Σ(x − c)² run in float32: the largest squared norm must stay well below 2^128 (4·max bounds
# any row-codeword distance) and the smallest well above 2^-126, or rows' squared differences over- or
# underflow and every row ties at codeword 0. Rows are scaled (by a power of two, exactly) only when needed,
# and then so that the largest squared norm is 2^80: as far from underflow as it can be with 2^48 of headroom
# for float32 sums.
_SQ_MAX, _SQ_MIN, _SQ_TARGET_LOG2 = 2.0**100, 2.0**-78, 80


def range_scale(sq: np.ndarray) -> float | None:
    """The power of two for rows with squared norms ``sq`` (float64; every row, since a few outliers decide it),
    or None when the rows need none. The rule follows the extremes, not a typical norm: scaled to bring the mean
    near 1, 50 rows at 1e25 among 5,000 at 1 pushed the others to 1e-25, where their squared differences
    underflowed (a review found 9,833 of 9,900 codes wrong)."""
    nz = sq[sq > 0]
    if nz.size == 0:
        return None
    mx, mn = float(nz.max()), float(nz.min())
    if 4.0 * mx <= _SQ_MAX and mn >= _SQ_MIN:
        return None
    e = int(np.floor((_SQ_TARGET_LOG2 - np.log2(mx)) / 2))
    if 4.0 * mx <= _SQ_MAX:
        e = max(e, 0)  # only the small rows need help: shrinking would push them further down
    return None if e == 0 else float(2.0**e)


def range_conditioned(xs: np.ndarray) -> tuple[np.ndarray, float | None]:
    """``xs`` times a power of two (exact) when its rows' squared norms leave float32's safe range (see
    :func:`range_scale`), and that factor (None when ``xs`` is returned as is)."""
    scale = range_scale(np.einsum("ij,ij->i", xs, xs, dtype=np.float64))
    return condition(xs, None, scale), scale


# Codes are chosen and searched with float32 squared differences under one power of two per sub-space: when one
# codeword's squared norm exceeds the typical codeword's by more than this, no factor keeps both in float32's range.
_SPAN_LOG2 = 190


def check_codebook_span(books: np.ndarray) -> None:
    """Refuse codebooks (m, ksub, dsub) whose largest squared norm in a sub-space exceeds the median nonzero one by
    more than 2**190: scaled so that the far codeword fits, the ordinary ones' squared differences underflow (a row
    1e34 times the others left 1,863 of 3,998 ordinary sub-codes wrong and every search ranking them arbitrary, a
    review). A few tiny codewords beside ordinary ones do not count: the median is an ordinary one."""
    sq = np.einsum("jcd,jcd->jc", *(2 * (books.astype(np.float64),)))
    for j in range(sq.shape[0]):
        nz = sq[j][sq[j] > 0]
        if nz.size and float(nz.max()) > float(np.median(nz)) * 2.0**_SPAN_LOG2:
            raise InvalidInput(
                f"the training rows span too many orders of magnitude for float32 codes: in sub-space {j} a "
                f"codeword's squared norm is {float(nz.max()):.3g} against a typical {float(np.median(nz)):.3g} "
                f"(more than 2**{_SPAN_LOG2} apart); remove or rescale the outlying rows")


def subspace_scales(rows: np.ndarray, m: int) -> np.ndarray | None:
    """A power of two per sub-space (m,) from :func:`range_scale` on that sub-space's sub-vectors of ``rows``, 1
    where none is needed; None when no sub-space needs one. Each sub-space's argmin is its own, so the sub-spaces
    are scaled apart: with one factor for all, a sub-space of 1e-9 beside one of 1e19 had its squared differences
    underflow, and every row took codeword 0 there."""
    dsub = rows.shape[1] // m
    x = rows.reshape(rows.shape[0], m, dsub)
    sq = np.einsum("ijk,ijk->ji", x, x, dtype=np.float64)  # (m, n)
    scales = [range_scale(sq[j]) for j in range(m)]
    if all(f is None for f in scales):
        return None
    return np.array([1.0 if f is None else f for f in scales])


# Rows with a value of magnitude >= 2^e (after the sub-space scales) are encoded in float64: the float32 kernel's
# squared differences would overflow. Codebooks hold squared norms <= 2^100, so |c| <= 2^50, and dsub terms below
# (2^e + 2^50)^2 each stay finite when e = 56 for dsub <= 2^14, one less per factor 4 beyond (a review: m=1 with
# dim 2^17 overflowed at 2^55.9). A review found a row at 2e19 beside codebooks at 1e14 given codeword 0 everywhere.
_FAR_EXPONENT = 56


def _far_limit(dsub: int) -> float:
    """The magnitude from which rows of sub-vectors of ``dsub`` values are encoded in float64 (see above)."""
    return 2.0 ** (_FAR_EXPONENT - max(0, math.ceil((math.log2(dsub) - 14) / 2)))


def _encode_far_rows(x: np.ndarray, books: np.ndarray, codes: np.ndarray, far: np.ndarray) -> None:
    """Re-encode, in float64 and in place, the rows ``far`` of ``x`` (far enough out to overflow the float32
    encoder)."""
    if far.size == 0:  # every ordinary block: no float64 copy of the codebooks
        return
    m, _, dsub = books.shape
    b64 = books.astype(np.float64)
    for r in far:
        sub = x[r].astype(np.float64).reshape(m, 1, dsub)
        codes[r] = np.argmin(((sub - b64) ** 2).sum(axis=2), axis=1)  # ties to the smaller id, as the kernel


def scale_subspaces(x: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``x`` (n, m·dsub) with sub-vector j times ``scales[j]`` (powers of two, exact), as float32."""
    dsub = x.shape[-1] // scales.shape[0]
    with np.errstate(over="ignore"):  # beyond float32: inf, which the encoder flags as far (re-encoded unscaled)
        return (x.astype(np.float64) * np.repeat(scales, dsub)).astype(np.float32)


SEEDINGS = ("k-means++", "random")


def check_seeding(seeding) -> str:
    if seeding not in SEEDINGS:
        raise InvalidInput(f"unknown seeding {seeding!r}; expected 'k-means++' or 'random'")
    return seeding


def train_subspaces(xs: np.ndarray, m: int, ksub: int, n_iter: int, seed: int | None, on_iter=None,
                    seeding: str = "k-means++") -> np.ndarray:
    """k-means in each of the ``m`` subspaces of ``xs`` (n, dim) -> codebooks (m, ksub, dim // m).

    Each subspace is seeded with greedy k-means++ (:func:`kvant.cluster.lloyd.init_centroids`) on up to
    ``_SEED_ROWS`` rows, then all subspaces
    run their Lloyd iterations together (:func:`lloyd_refine`): one parallel pass of the PQ encoder assigns
    every sub-vector of every row, so the ``m`` trainings proceed in parallel with one kernel launch per
    iteration instead of ``m`` small k-means runs. ``on_iter()``, if given, is called after each iteration.
    ``seeding="random"``: ``ksub`` distinct random rows per subspace and FAISS's empty-cell rule instead (see PQ).
    """
    from ..cluster.lloyd import init_centroids

    dim = xs.shape[1]
    dsub = dim // m
    seeds = rng(seed).integers(0, 2**31 - 1, size=m) if seed is not None else [None] * m
    books = np.empty((m, ksub, dsub), np.float32)
    for j in range(m):
        sub = np.ascontiguousarray(xs[:, j * dsub : (j + 1) * dsub])
        sj = None if seed is None else int(seeds[j])
        books[j] = (init_centroids(sub, ksub, "random", sj) if seeding == "random" else
                    init_centroids(sub, ksub, "k-means++", sj, seed_rows=_SEED_ROWS, trials=_SEED_TRIALS))
    return lloyd_refine(xs, books, n_iter, on_iter, split_seed=seed if seeding == "random" else False)


def lloyd_refine(xs: np.ndarray, books: np.ndarray, n_iter: int, on_iter=None, split_seed=False) -> np.ndarray:
    """``n_iter`` Lloyd iterations in all subspaces at once, warm-started from ``books`` (updated copy);
    ``on_iter()``, if given, is called after each one. ``split_seed`` other than False: empty cells by FAISS's rule
    instead (below), drawing from a generator seeded with it.

    Assignment is the parallel PQ encoder (every subspace in one pass over the rows, direct squared
    distances, so offset-dominated sub-vectors need no conditioning). An empty cell is
    re-seeded with the row of that subspace worst served by its current codeword (FAISS splits a large
    cluster instead; both keep every codeword in use, which matters on data with many repeated sub-vectors). With
    ``split_seed``: FAISS's rule, a cell drawn with probability ∝ (its rows − 1) is split in two (its codeword
    scaled by 1 ± 2⁻¹⁰ in alternate coordinates), which keeps the codewords where the rows are dense.
    """
    kpq = _kpq()
    xs = np.ascontiguousarray(xs, dtype=np.float32)
    books = np.array(books, dtype=np.float32, copy=True)
    m, ksub, dsub = books.shape
    n = xs.shape[0]
    xv = xs.reshape(n, m, dsub)
    g = None if split_seed is False else rng(split_seed)
    for _ in range(n_iter):
        # The direct encoder Σ(c − x)² needs no conditioning and, since the 32-lane encoder, beats a GEMM
        # assignment per subspace at every width measured (dsub 16: 4.1x, 49: 1.6x, 192: 1.2x on 65,536 rows).
        codes = kpq.pq_encode(xs, books)
        all_sums, all_counts = kpq.pq_centroid_sums(xs, codes, ksub)
        for j in range(m):
            c = codes[:, j]
            counts = all_counts[j]
            sums = all_sums[j]
            empty = np.flatnonzero(counts == 0)
            far = None
            if empty.size and g is None:  # (the worst-served rows, by the codewords that served them)
                res = xv[:, j, :] - books[j][c]
                err = np.einsum("ij,ij->i", res, res)
                far = np.argsort(-err, kind="stable")[: empty.size]
                far = far[err[far] > 0]
            nz = counts > 0
            books[j][nz] = (sums[nz] / counts[nz, None]).astype(np.float32)
            if g is not None:
                _split_cells(books[j], counts.astype(np.float64), empty, g)
            elif far is not None and far.size:
                books[j][empty[: far.size]] = xv[far, j, :]
        if on_iter is not None:
            on_iter()
    return books


def _split_cells(book: np.ndarray, counts: np.ndarray, empty: np.ndarray, g) -> None:
    """FAISS's empty-cell rule on one sub-space's codewords ``book`` (in place): each empty cell takes half of a cell
    drawn with probability ∝ (rows − 1), the pair's codeword scaled by 1 + 2⁻¹⁰ and 1 − 2⁻¹⁰ in alternate
    coordinates."""
    sign = np.where(np.arange(book.shape[1]) % 2 == 0, 1.0, -1.0) * 2.0**-10
    for e in empty:
        p = np.maximum(counts - 1.0, 0.0)
        if p.sum() <= 0:
            return
        c = int(g.choice(counts.shape[0], p=p / p.sum()))
        base = book[c].astype(np.float64)
        book[e] = (base * (1.0 + sign)).astype(np.float32)
        book[c] = (base * (1.0 - sign)).astype(np.float32)
        counts[e] = counts[c] // 2
        counts[c] -= counts[e]


def _step_reporter(progress):
    """``progress("train", 1)`` as a no-argument callback (None without ``progress``)."""
    if progress is not None and not callable(progress):
        raise InvalidInput(f"progress must be a callable progress(phase, amount) or None, got {progress!r}")
    return None if progress is None else (lambda: progress("train", 1))


class PQ:
    """Product quantizer: ``m`` sub-vectors, ``2**nbits`` codewords each (module docstring: training, code layout).

    Parameters
    ----------
    dim : vector dimension; ``m`` must divide it (the error names the values that do).
    m : number of sub-vectors (bytes per vector for nbits=8, half of that for nbits=4).
    nbits : 8 (256 codewords per sub-space, ADC search) or 4 (16, FastScan search); default 8.
    seed : seed of the training sample and k-means++ seeding (default 0; None draws fresh entropy). Keyword-only,
        as are the parameters after it.
    n_iter : Lloyd iterations per sub-space k-means (default 25, FAISS's; 0 keeps the seeding's codewords).
    max_train_rows : rows sampled for training (default ``256 * 2**nbits``: 65,536 for nbits=8, 4,096 for 4).
    seeding : how each sub-space's k-means starts: ``"k-means++"`` (default; greedy, on up to 16,384 rows; the lower
        MSE) or ``"random"`` (``2**nbits`` random rows, empty cells split as FAISS does: codewords that follow the
        density, which on very unequal clusters and heavy tails gave higher search recall at a higher MSE; README,
        "Beyond the benchmark's data").

    >>> import numpy as np, kvant
    >>> x = np.random.default_rng(0).standard_normal((5000, 32)).astype("float32")
    >>> pq = kvant.PQ(dim=32, m=8, nbits=4).fit(x)
    >>> codes = pq.encode(x)                      # uint8 (5000, 4): two 4-bit codes per byte
    >>> x_hat = pq.decode(codes)
    >>> err = pq.reconstruction_error(x)
    """

    _kind = "PQ"
    _MIN_TRAIN_ROWS = 0  # (OPQ's rotation needs more rows than the codebooks)

    def __init__(
        self,
        dim: int,
        m: int,
        nbits: int = 8,
        *,
        seed: int | None = 0,
        n_iter: int = 25,
        max_train_rows: int | None = None,
        seeding: str = "k-means++",
    ):
        self.dim, self.m, self.nbits = check_dim_m(dim, m, nbits)
        self.seeding = check_seeding(seeding)
        self.seed = check_seed(seed)
        self.n_iter = _check_int("n_iter", n_iter, lo=0)
        self.max_train_rows = None if max_train_rows is None else _check_int("max_train_rows", max_train_rows)
        if self.max_train_rows is not None and self.max_train_rows < self.ksub:
            raise InvalidInput(f"max_train_rows={self.max_train_rows} is below the {self.ksub} codewords per "
                               f"sub-space (2**nbits); use max_train_rows >= {self.ksub}")
        self.codebooks_: np.ndarray | None = None

    # -- shape facts ------------------------------------------------------------------------------
    @property
    def ksub(self) -> int:
        return 1 << self.nbits

    @property
    def dsub(self) -> int:
        return self.dim // self.m

    @property
    def code_size(self) -> int:
        """Bytes per encoded vector."""
        return self.m if self.nbits == 8 else (self.m + 1) // 2

    @property
    def is_fitted(self) -> bool:
        return self.codebooks_ is not None

    @property
    def codebooks(self) -> np.ndarray:
        """(m, 2**nbits, dim // m) float32 codewords (in the rotated space for OPQ), read-only: the codec caches what
        it derives from them (a review: codewords scaled in place kept the scale of the old ones); copy to change."""
        self._check_fitted()
        view = self.codebooks_.view()
        view.flags.writeable = False  # (held arrays are read-only already: frozen; unpickled ones may not be)
        return view

    def _check_fitted(self) -> None:
        if self.codebooks_ is None:
            raise EmptyIndex(f"{type(self).__name__} is not fitted; call fit(train) first")

    @property
    def train_rows(self) -> int:
        """How many rows ``fit`` samples at most."""
        if self.max_train_rows is not None:
            return self.max_train_rows
        return max(_ROWS_PER_CODEWORD * self.ksub, self._MIN_TRAIN_ROWS)

    # -- training ---------------------------------------------------------------------------------
    def _train_sample(self, x) -> np.ndarray:
        src = _as_checked_source(x, self.dim, "training data")
        if src.n < self.ksub:
            raise InvalidInput(
                f"training data has {src.n} rows; at least {self.ksub} (= 2**nbits codewords) are needed"
            )
        xs = src.sample(self.train_rows, seed=self.seed)
        return np.ascontiguousarray(xs, dtype=np.float32)

    @property
    def train_steps(self) -> int:
        """Lloyd iterations ``fit`` runs (over all subspaces at once): what its ``progress`` counts to."""
        return self.n_iter

    @with_threads
    def fit(self, x, progress=None) -> PQ:
        """Learn codebooks from ``x`` (any kvant.io source) on a sample of ``train_rows`` rows.

        ``progress(phase, amount)``, if given, is called with ``("train", 1)`` after each of the
        :attr:`train_steps` Lloyd iterations (the CLI's progress bar)."""
        step = _step_reporter(progress)
        xs = self._train_sample(x)
        scales = subspace_scales(xs, self.m)
        books = train_subspaces(xs if scales is None else scale_subspaces(xs, scales), self.m, self.ksub, self.n_iter,
                                self.seed, step, self.seeding)
        if scales is not None:
            books = (books.astype(np.float64) / scales[:, None, None]).astype(np.float32)
        check_codebook_span(books)
        self.codebooks_ = frozen(books)
        return self

    # -- coding -----------------------------------------------------------------------------------
    def _transform(self, block: np.ndarray) -> np.ndarray:
        """Map a float32 block into the space the codebooks live in: ``rotate(x − offset)`` (identity for PQ)."""
        offset = self._offset()
        return self._rotate(block if offset is None else np.subtract(block, offset, dtype=np.float32))

    def _inverse_transform(self, block: np.ndarray) -> np.ndarray:
        offset = self._offset()
        out = self._unrotate(block)
        return out if offset is None else out + offset

    def _rotate(self, block: np.ndarray) -> np.ndarray:
        """The linear part of :meth:`_transform` (no offset removed): inner products are not shift invariant,
        so ``q·x̂ = rotate(q)·c + q·offset`` (see :meth:`_offset`)."""
        return block

    def _unrotate(self, block: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`_rotate`."""
        return block

    def _offset(self) -> np.ndarray | None:
        """The offset :meth:`_transform` removes before rotating (None: none)."""
        return None

    def _per_books(self, name: str, compute):
        """``compute(codebooks_)``, kept until the codebooks change: a fit or load binds a new array (the library never
        writes one in place, and the arrays a codec holds are read-only: :func:`frozen`)."""
        books = self.codebooks_
        cached = self.__dict__.get(name)
        if cached is not None and cached[0] is books:
            return cached[1]
        value = compute(books)
        self.__dict__[name] = (books, value)
        return value

    def _codebook_scale(self) -> float | None:
        """The power of two codewords (and so rows and queries) are scaled by when they lie far outside float32's
        comfortable range, None for ordinary data: scaled alike, no argmin or ranking changes, but the squared
        differences stop over- or underflowing. Every search uses it (encoding scales each sub-space apart:
        :func:`subspace_scales`). The rule follows the extremes (:func:`range_scale`): scaled to bring the codewords'
        mean squared norm near 1, one codeword of a 1e24 row pushed the others' squared differences below float32's
        smallest value, and every ordinary query got distance 0 and the first stored rows (a review)."""
        return self._per_books("_scale_of_books", lambda books: range_scale(np.einsum(
            "ij,ij->i", *(2 * (books.transpose(1, 0, 2).reshape(self.ksub, self.dim).astype(np.float64),)))))

    def _transposed_books(self) -> np.ndarray:
        """The codebooks in the table kernels' layout (:func:`kvant.kernels.pq.transposed_codebooks`), kept per
        codebook array."""
        return self._per_books("_transposed_of_books", lambda books: _kpq().transposed_codebooks(books))

    def _encode_block(self, block: np.ndarray, start: int = 0) -> np.ndarray:
        """Codes of the rows ``block``, which start at row ``start`` of their source (named in errors)."""
        try:
            x = x0 = np.ascontiguousarray(self._transform(block), dtype=np.float32)
        except RotationOverflow as exc:
            raise exc.at(start) from None
        books = books0 = self.codebooks_
        scales = subspace_scales(books.transpose(1, 0, 2).reshape(self.ksub, self.dim), self.m)
        if scales is not None:
            x = scale_subspaces(x, scales)  # rows far outside the codebooks' range may become inf: flagged far
            books = (books.astype(np.float64) * scales[:, None, None]).astype(np.float32)
        codes, far = _kpq().pq_encode_flagged(x, books, _far_limit(books.shape[2]))
        _encode_far_rows(x0, books0, codes, np.flatnonzero(far))  # unscaled: float64 holds them as they are
        return pack_nibbles(codes) if self.nbits == 4 else codes

    @with_threads
    def encode(self, x) -> np.ndarray:
        """Codes of every row of ``x`` (any source), uint8 (n, code_size); streamed in chunks."""
        self._check_fitted()
        src = _as_checked_source(x, self.dim, "vectors to encode")
        out = np.empty((src.n, self.code_size), np.uint8)
        rows = min(_ENCODE_CHUNK_ROWS, default_chunk_rows(self.dim))
        for start, block in src.chunks(rows):
            out[start : start + block.shape[0]] = self._encode_block(block, start)
        return out

    def unpacked_codes(self, codes: np.ndarray) -> np.ndarray:
        """(n, m) codeword ids from codes in this codec's layout."""
        return unpack_nibbles(codes, self.m) if self.nbits == 4 else codes

    def _check_codes(self, codes) -> np.ndarray:
        """``codes`` as this codec writes them: uint8 (n, code_size), 2-D as :meth:`encode` returns and takes
        (a 1-D array is refused, as ``encode`` refuses a 1-D vector), and with odd ``m`` at 4 bits the last byte's
        padding high nibble zero (anything else was not written by this codec; one vectorised pass over one
        column)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.code_size:
            hint = "; for one vector use codes.reshape(1, -1)" if codes.ndim == 1 else ""
            raise InvalidInput(f"codes must have shape (n, {self.code_size}), got {codes.shape}{hint}")
        if codes.dtype != np.uint8:
            raise InvalidInput(f"codes must be uint8, got {codes.dtype}")
        if self.nbits == 4 and self.m % 2 and codes.shape[0]:
            padded = codes[:, -1] > 0x0F
            if padded.any():
                row = int(np.argmax(padded))
                raise InvalidInput(f"codes row {row}: the padding nibble (high 4 bits of the last byte, m={self.m} "
                                   f"is odd) is {int(codes[row, -1]) >> 4}, expected 0; these bytes were not "
                                   f"written by this codec")
        return np.ascontiguousarray(codes)

    @with_threads
    def decode(self, codes) -> np.ndarray:
        """Reconstructions (n, dim) float32 of ``codes`` (uint8 (n, code_size))."""
        self._check_fitted()
        codes = self._check_codes(codes)
        out = np.empty((codes.shape[0], self.dim), np.float32)
        step = _ENCODE_CHUNK_ROWS
        sub = np.arange(self.m)
        for s in range(0, codes.shape[0], step):
            c = self.unpacked_codes(codes[s : s + step])
            rec = self.codebooks_[sub, c].reshape(c.shape[0], self.dim)
            out[s : s + c.shape[0]] = self._inverse_transform(rec)
        return out

    @with_threads
    def reconstruction_error(self, x) -> float:
        """Mean over rows of the squared L2 error ``||x - decode(encode(x))||²``.

        A float64 array is compared in float64 (encoding sees its float32 rounding, as every kvant kernel
        does); other inputs as kvant reads them."""
        self._check_fitted()
        src = _as_checked_source(x, self.dim, "vectors")
        arr = src.array if isinstance(src, ArraySource) else None
        # (any byte order: a big-endian float64 array is float64 too)
        wide = arr if arr is not None and arr.dtype.kind == "f" and arr.dtype.itemsize == 8 else None
        total = 0.0
        for start, block in src.chunks(min(_ENCODE_CHUNK_ROWS, default_chunk_rows(self.dim))):
            rec = self.decode(self._encode_block(block, start))
            rows = block if wide is None else wide[start : start + block.shape[0]]
            diff = rows.astype(np.float64) - rec
            total += float(np.einsum("ij,ij->", diff, diff))
        return total / src.n

    # -- persistence ------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {
            "dim": self.dim,
            "m": self.m,
            "nbits": self.nbits,
            "seed": self.seed,
            "n_iter": self.n_iter,
            "max_train_rows": self.max_train_rows,
            "seeding": self.seeding,
        }

    _ARRAY_NAMES = frozenset({"codebooks"})  # what a file of this kind holds (_from_persist): these,
    _OPTIONAL_ARRAYS: frozenset = frozenset()  # and perhaps these (written by earlier versions without them)

    def _arrays(self) -> dict:
        return {"codebooks": self.codebooks_}

    def save(self, path) -> None:
        """Write the fitted codec to ``path`` (load with :func:`kvant.load`)."""
        self._check_fitted()
        persist.write(path, self._kind, self._meta(), self._arrays())

    @classmethod
    def _from_meta(cls, meta: dict):
        return cls(meta["dim"], meta["m"], meta["nbits"], seed=meta["seed"], n_iter=meta["n_iter"],
                   max_train_rows=meta["max_train_rows"], seeding=meta.get("seeding", "k-means++"))  # (older files)

    def _load_arrays(self, arrays: dict) -> None:
        cb = arrays["codebooks"]
        expected = (self.m, self.ksub, self.dsub)
        if cb.dtype != np.float32 or cb.shape != expected:
            raise PersistError(f"codebooks have shape {cb.shape} / {cb.dtype}, expected {expected} float32")
        if not np.isfinite(cb).all():
            raise PersistError("codebooks contain NaN or inf")
        try:  # what training refuses, a file cannot bring in (a review loaded a crafted one)
            check_codebook_span(cb)
        except InvalidInput as exc:
            raise PersistError(f"codebooks: {exc}") from None
        self.codebooks_ = frozen(np.ascontiguousarray(cb))

    @classmethod
    def _from_persist(cls, meta: dict, arrays: dict):
        try:
            obj = cls._from_meta(meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise PersistError(f"bad {cls._kind} settings in file: {exc}") from exc
        names = set(arrays)
        if not cls._ARRAY_NAMES - cls._OPTIONAL_ARRAYS <= names <= cls._ARRAY_NAMES:
            # (an OPQ file relabelled PQ loaded without its rotation)
            raise PersistError(f"{cls._kind} file holds arrays {sorted(names)}, expected {sorted(cls._ARRAY_NAMES)}")
        obj._load_arrays(arrays)
        return obj

    def __repr__(self) -> str:
        state = "fitted" if self.is_fitted else "not fitted"
        return f"{type(self).__name__}(dim={self.dim}, m={self.m}, nbits={self.nbits}, {state})"


persist.register("PQ")(PQ)
