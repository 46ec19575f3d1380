"""Product-quantization index: vectors stored as PQ (or OPQ) codes, searched by asymmetric distance
computation (ADC): the query stays exact, each stored vector is its reconstruction.

- nbits=8: per-query distance tables (m x 256) and a fused scan + top-k over the codes
  (:func:`kvant.kernels.pq.adc_search`).
- nbits=4: FastScan. Codes are repacked in blocks of 32 rows, lookup tables quantised to u8, sums
  accumulated in u16, and a shortlist of ``fastscan_rerank * k`` candidates re-scored with exact float
  ADC, so returned distances are exact ADC distances (:func:`kvant.kernels.pq.fastscan_search`).
  Default ``fastscan_rerank=4``: the smallest shortlist whose re-scored top-10 was the exact ADC top-10 on
  essentially every query in ``benchmarks/pq.py`` (Fashion-MNIST PQ16x4: 99.98% of ids with 4, 99.8% with 2,
  97.1% with 1; synthetic PQ32x4: 100% with 2 or more, 98.0% with 1) while staying near FAISS FastScan speed.
  The shortlist is a heuristic, not a guarantee: on other data a longer one can find more of the exact ADC
  top-k. Before quantising, each table entry's excess over its sub-table's minimum is clipped where no top-k row
  can reach (bounded by the k-th smallest exact sum of the rows of 4k/32 blocks spread over the codes), so one
  far codeword does not set the u8 step alone (it had rounded every other entry to 0: recall 0.002 of the exact
  ADC top-10 on data with 1% outliers, 1.000 with the clip). Rows of the shortlist beyond the certified bound
  (quantised sum more than the rounding margin above the k-th smallest) cannot reach the top k and are dropped
  before the re-score.
  ``fastscan_rerank=0`` is the certified mode: exactly the ADC top-k, about half the speed.
  (FAISS returns the quantised order; its recall differs from exact ADC's by rounding noise, either way.)
- ``refine=r`` keeps the raw float32 vectors and re-ranks the best ``r * k`` ADC candidates with exact
  distances (returned distances are then exact).

Metrics: ``l2`` (squared L2, ascending), ``ip`` (inner product, descending; tables are negated so the
kernels always minimise), ``cos`` (vectors and queries normalised, then ``ip``).
"""

from __future__ import annotations

import numpy as np

from .. import persist
from .._config import check_seed, with_threads
from .._numerics import condition, row_magnitude_scales
from ..errors import EmptyIndex, InvalidInput, PersistError
from ..quant.opq import OPQ
from ..quant.pq import PQ, RotationOverflow, _check_int
from ._common import (
    Rows,
    as_queries,
    as_vectors,
    check_dim,
    check_ids_array,
    check_k,
    check_metric,
    check_new_ids,
    check_next_id,
    check_remove_ids,
    copy_with_rows,
    default_ids,
    finish_results,
    normalize_rows,
    require_nonempty,
)

__all__ = ["PQIndex"]


_KPQ = None


def _kpq():
    global _KPQ
    if _KPQ is None:  # (imported on first use; then one global read per search instead of an import statement)
        from ..kernels import pq as kpq

        _KPQ = kpq
    return _KPQ


# add() stores cos rows as normalize_rows writes them: x/‖x‖ in float64, each coordinate rounded to float32, so
# | ‖x̂‖² − 1 | <= 2·2^-24 + O(2^-48) ≈ 1.2e-7 (measured in float64); zero rows stay zero
_UNIT_SQ_TOL = 1e-6
_CHECK_BLOCK_VALUES = 1 << 20  # raw values checked per block on load (4 MiB of float32)


def _check_raw_rows(raw: np.ndarray, ids: np.ndarray, unit: bool) -> None:
    """Refuse a file's raw (re-ranking) rows that are not finite or, for ``cos`` (``unit``), neither unit nor zero:
    add() stores them normalised, and others would re-rank by wrong similarities (outside [-1, 1]). One pass in blocks
    of ~1M values: an mmap-loaded file's rows are read once more after its checksum (as the finiteness check always
    did), with memory per block, not per file."""
    step = max(1, _CHECK_BLOCK_VALUES // max(1, raw.shape[1]))
    for s in range(0, raw.shape[0], step):
        block = raw[s : s + step]
        if not np.isfinite(block).all():
            raise PersistError("raw vectors contain NaN or inf")
        if unit:
            sq = np.einsum("ij,ij->i", block, block, dtype=np.float64)
            bad = ~((np.abs(sq - 1.0) <= _UNIT_SQ_TOL) | (sq == 0.0))
            if bad.any():
                r = int(np.argmax(bad))
                raise PersistError(f"a cos index's raw vector at row {s + r} (id {int(ids[s + r])}) has squared norm "
                                   f"{float(sq[r])!r}; add() stores unit (or zero) rows for cos")


class PQIndex:
    """Approximate k-NN search over PQ/OPQ codes (module docstring: the kernels, the shortlist, the metrics).

    Parameters
    ----------
    dim, m, nbits : as for :class:`kvant.PQ` (nbits 8: ADC scan; 4: FastScan).
    metric : ``"l2"`` (default; squared L2, ascending), ``"ip"`` or ``"cos"`` (similarities, descending).
    opq : train an :class:`kvant.OPQ` rotation first (default False). Keyword-only, as are the parameters after it.
    refine : keep the raw float32 vectors and re-rank the best ``refine * k`` ADC candidates exactly (default 0:
        no raw vectors kept, distances are ADC distances).
    seed : training seed (default 0).
    fastscan_rerank : nbits=4 only: re-score a shortlist of ``fastscan_rerank * k`` rows with exact ADC (default 4;
        0: the certified mode, exactly the ADC top-k at about half the speed).
    max_train_rows : rows sampled to train the codec (default: the codec's, ``256 * 2**nbits``).
    seeding : the codec's codebook seeding, ``"k-means++"`` or ``"random"`` (:class:`kvant.PQ`); default ``None``:
        ``"random"`` at 8 bits, ``"k-means++"`` at 4. Random rows with FAISS's empty-cell rule follow the data's
        density: the search recall@10 was higher at 8 bits on every set measured (0.5562 vs 0.5553 Fashion-MNIST,
        0.1269 vs 0.1241 Gaussian 200k × 128, 0.3681 vs 0.3629 embedding-like 384-d ``ip``, 0.325 vs 0.258 on very
        unequal clusters), at 4 bits lower on the Gaussian set (0.1039 vs 0.1102) though higher on heavy tails and
        sparse rows (README, "Beyond the benchmark's data"). The codec alone (:class:`kvant.PQ`) keeps k-means++,
        the lower MSE.

    >>> import numpy as np, kvant
    >>> x = np.random.default_rng(0).standard_normal((5000, 32)).astype("float32")
    >>> index = kvant.PQIndex(32, m=8, nbits=8, refine=4)
    >>> _ = index.train(x)  # returns the index, for chaining
    >>> index.add(x)
    >>> dist, ids = index.search(x[:2], k=3)
    >>> ids[:, 0].tolist()
    [0, 1]
    """

    _kind = "PQIndex"

    def __init__(
        self,
        dim: int,
        m: int,
        nbits: int = 8,
        metric: str = "l2",
        *,
        opq: bool = False,
        refine: int = 0,
        seed: int | None = 0,
        fastscan_rerank: int = 4,
        max_train_rows: int | None = None,
        seeding: str | None = None,
    ):
        self.dim = check_dim(dim)
        self.metric = check_metric(metric)
        if not isinstance(opq, bool | np.bool_):
            raise InvalidInput(f"opq must be True or False, got {opq!r}")
        self.opq = bool(opq)
        self.refine = _check_int("refine", refine, lo=0)
        self.fastscan_rerank = _check_int("fastscan_rerank", fastscan_rerank, lo=0)
        self.seed = check_seed(seed)
        codec_cls = OPQ if self.opq else PQ
        if seeding is None:  # (see the docstring)
            seeding = "random" if nbits == 8 else "k-means++"
        self.codec: PQ = codec_cls(self.dim, m, nbits, seed=self.seed, max_train_rows=max_train_rows, seeding=seeding)
        self.m, self.nbits = self.codec.m, self.codec.nbits
        if self.nbits == 4 and self.m > (limit := _kpq().FASTSCAN_MAX_M):
            raise InvalidInput(f"a 4-bit PQIndex takes m <= {limit} (its FastScan sums are 16-bit), got m={self.m}; "
                               "use nbits=8")
        self._codes = Rows((self.codec.code_size,), np.uint8)
        self._raw = Rows((self.dim,), np.float32)
        self._ids = Rows((), np.int64)
        self._next_id = 0
        self._fastscan = None  # packed 4-bit codes, rebuilt lazily after add/remove

    # -- state ------------------------------------------------------------------------------------
    __copy__ = copy_with_rows  # copy.copy: independent stores (see copy_with_rows)

    def __len__(self) -> int:
        return self._ids.n

    @property
    def ntotal(self) -> int:
        return self._ids.n

    @property
    def is_trained(self) -> bool:
        return self.codec.is_fitted

    @property
    def code_size(self) -> int:
        return self.codec.code_size

    @property
    def ids(self) -> np.ndarray:
        return self._ids.view.copy()

    @property
    def codes(self) -> np.ndarray:
        """Stored codes in the codec's layout (n, code_size) (a copy)."""
        return self._codes.view.copy()

    def _prep(self, block: np.ndarray) -> np.ndarray:
        return normalize_rows(block) if self.metric == "cos" else block

    # -- life cycle -------------------------------------------------------------------------------
    @with_threads
    def train(self, x, progress=None) -> PQIndex:
        """Learn the codec on a sample of ``x`` (any kvant.io source); ``progress`` as in :meth:`kvant.PQ.fit`
        (``("train", 1)`` per Lloyd iteration, ``index.codec.train_steps`` of them)."""
        if self.ntotal:
            raise InvalidInput("the index already holds vectors encoded with its codebooks; build a new index")
        src = as_vectors(x, self.dim, "training data")
        if src.n < self.codec.ksub:
            raise InvalidInput(f"training data has {src.n} rows; at least {self.codec.ksub} are needed")
        xs = self._prep(src.sample(self.codec.train_rows, seed=self.seed))
        codec = type(self.codec)._from_meta(self.codec._meta())
        codec.fit(xs, progress=progress)
        self.codec = codec
        return self

    @with_threads
    def add(self, x, ids=None) -> None:
        """Encode and store ``x`` under ``ids`` (default: consecutive new ids). All-or-nothing."""
        if not self.is_trained:
            raise EmptyIndex("the index is not trained; call train(x) before add")
        src = as_vectors(x, self.dim)
        new_ids = check_new_ids(ids, src.n, self._ids.view)
        if new_ids is None:  # (before any row is stored: it raises when the id space is used up)
            new_ids = default_ids(self._next_id, src.n)
        codes = []

        def prepared():  # NaN raises here, before any row counts (Rows.extend)
            for start, block in src.chunks(65536):
                block = self._prep(block)
                codes.append(self.codec._encode_block(block, start))
                yield block

        if self.refine:  # raw rows written straight into the index's buffer
            self._raw.extend(prepared(), src.n)
        else:
            for _ in prepared():
                pass
        self._codes.append(np.concatenate(codes) if len(codes) > 1 else codes[0])
        self._ids.append(new_ids)
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        self._fastscan = None

    def remove(self, ids) -> int:
        """Remove the vectors with these ids (unknown ids are ignored). Returns how many were removed."""
        ids = check_remove_ids(ids)
        drop = np.isin(self._ids.view, ids)
        count = int(drop.sum())
        if count:
            keep = ~drop
            self._codes.keep(keep)
            if self.refine:
                self._raw.keep(keep)
            self._ids.keep(keep)
            self._fastscan = None
        return count

    # -- search -----------------------------------------------------------------------------------
    def _tables(self, q: np.ndarray, scale: float | None = None,
                qfactor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(tables, bias): lookup tables of the queries ``q``, and for inner products the per-query term (float64, in
        the tables' units) that every row's sum lacks: the sub-tables' means, and ``q·offset`` when the codec has an
        offset, negated as the tables are (None for l2).
        With ``scale``, transformed queries and codebooks are scaled by it (after the transform: OPQ's offset is in
        the data's units). Inner products may scale each query by its own power of two ``qfactor[i]`` instead (the
        codebooks keep ``scale``): its tables are then in units of ``qfactor[i]·scale``."""
        kpq = _kpq()
        l2 = self.metric == "l2"
        # l2 tables see the offset-removed rotation (the offset cancels in q − x̂); inner products the rotation
        # alone, and q·x̂ = (qR)·c + q·offset: the last term is the same for every row, so it stays out of the tables
        # and is added to the sums afterwards in float64 (spread over the m sub-tables it set their float32 rounding:
        # on data 1e4 off the origin 17% of queries' top-10 differed from the float64 exact-ADC one, a review)
        qr = self.codec._transform(q) if l2 else self.codec._rotate(q)
        if qfactor is not None:  # powers of two: exact wherever the result is a normal float32
            qr = (np.asarray(qr, np.float64) * qfactor[:, None]).astype(np.float32)
        qr = np.ascontiguousarray(qr, dtype=np.float32)
        if scale is not None and qfactor is None:
            qr = condition(qr, None, scale)
        books = self.codec.codebooks_ if scale is None else condition(self.codec.codebooks_, None, scale)
        cbt = self.codec._transposed_books() if scale is None else None
        if l2:
            return kpq.distance_tables_l2(qr, books, cbt), None
        # each sub-table centred (its mean goes into the bias): entries of ~1e8 that differ by ~1e3 kept only a
        # float32 rounding of ~64 each, and 17% of queries' top-10 differed from the float64 exact-ADC one (a review)
        t, shift = kpq.ip_tables_centred(qr, books, cbt)
        np.negative(t, out=t)
        bias = -shift
        offset = self.codec._offset()
        if offset is not None:
            s = 1.0 if scale is None else scale
            units = s * (s if qfactor is None else qfactor)  # the tables' units: both sides' factors
            bias -= (q.astype(np.float64) @ offset.astype(np.float64)) * units
        return t, bias

    def _finite_tables(self, q: np.ndarray,
                       scale: float | None) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
        """(units, tables, bias) for the queries ``q``: tables in units of units[i] (distances come back in the data's
        after adding bias[i], when not None (:meth:`_tables`), and a division by units[i]; units is None when every
        query's is 1).

        l2: per query, the codebooks' scale (units scale²), or for a query so far outside the codebooks' range that
        its tables overflow (an infinite entry ranks nothing: the scans admit no row), a smaller power of two of its
        own, so every row is ranked as well as float32 allows. Per query: one factor for the whole batch pushed the
        other queries' tables to float32 subnormals (30 of 50 ordinary queries changed their ids next to one of norm
        1e37). Inner products, whose order any positive factor per query keeps: a query whose norm at the codebooks'
        scale leaves [2**-20, 2**20] is scaled by a power of two of its own, so its tables neither overflow nor
        underflow (a 1e-25 query on 1e20 data had every entry 0 at the common scale, and arbitrary ids)."""
        base = 1.0 if scale is None else scale
        with np.errstate(over="ignore", invalid="ignore"):
            if self.metric != "l2":
                own = row_magnitude_scales(q.astype(np.float64) * base)  # (OPQ rotations keep norms)
                if own is not None:
                    qfactor = base * own
                    return (qfactor * base, *self._tables(q, scale, qfactor))
            tables, bias = self._tables(q, scale)
            if scale is None and np.isfinite(tables).all():  # (the common case, in one reduction)
                return None, tables, bias
            scales = np.full(q.shape[0], base)
            bad = np.flatnonzero(~np.isfinite(tables.reshape(q.shape[0], -1)).all(axis=1))
            s = base
            while bad.size:
                s *= 2.0**-24
                if s < 2.0**-200:  # pragma: no cover - finite float32 queries fit long before
                    raise AssertionError("query tables do not fit float32 at any scale")
                sub, sub_bias = self._tables(np.ascontiguousarray(q[bad]), s)
                ok = np.isfinite(sub.reshape(bad.size, -1)).all(axis=1)
                tables[bad[ok]], scales[bad[ok]] = sub[ok], s
                if bias is not None:
                    bias[bad[ok]] = sub_bias[ok]
                bad = bad[~ok]
        return scales * scales, tables, bias

    def _packed(self):
        if self._fastscan is None:
            codes = self.codec.unpacked_codes(self._codes.view)
            self._fastscan = _kpq().pack_codes_4bit(np.ascontiguousarray(codes))
        return self._fastscan

    def _adc(self, tables: np.ndarray, k: int):
        kpq = _kpq()
        if self.nbits == 8:
            return kpq.adc_search(tables, np.ascontiguousarray(self._codes.view), k)
        return kpq.fastscan_search(tables, self._packed(), self.ntotal, self.m, k, self.fastscan_rerank)

    def _exact(self, q: np.ndarray, rows: np.ndarray, k: int):
        """Re-rank candidate rows (nq, kc) by exact distance and keep the best k (ties -> smaller row): computed and
        ranked in float64 on the stored float32 vectors and queries (float64 holds every product of float32 values,
        so no scaling is needed and 1e-25-scale data keeps its order), then returned as float32."""
        raw = self._raw.view
        valid = rows >= 0
        vecs = raw[np.where(valid, rows, 0)].astype(np.float64)  # (nq, kc, dim)
        q64 = q.astype(np.float64)
        if self.metric == "l2":
            diff = vecs - q64[:, None, :]
            d = np.einsum("ijk,ijk->ij", diff, diff)
        else:
            d = -np.einsum("ijk,ik->ij", vecs, q64)
        d[~valid] = np.inf
        order = np.lexsort((np.where(valid, rows, np.iinfo(np.int64).max), d), axis=-1)[:, :k]
        with np.errstate(over="ignore"):  # beyond float32's range a distance is ±inf (documented)
            out_d = np.take_along_axis(d, order, axis=1).astype(np.float32)
        out_i = np.take_along_axis(np.where(valid, rows, -1), order, axis=1)
        return out_d, out_i

    @with_threads
    def search(self, q, k: int):
        """``(distances, ids)`` of the ``k`` best stored vectors per query (see the conventions)."""
        q, one = as_queries(q, self.dim)
        k_out = check_k(k)
        if not self.is_trained:
            raise EmptyIndex("the index is not trained; call train(x) and add(x) before searching")
        require_nonempty(self.ntotal, "the index")
        k = min(k_out, self.ntotal)  # padded back to k_out by finish_results
        q = self._prep(q)
        nq = q.shape[0]
        kc = min(k * self.refine, self.ntotal) if self.refine else k  # no more candidates than vectors
        out_d = np.empty((nq, k), np.float32)
        out_i = np.empty((nq, k), np.int64)
        step = max(1, (1 << 22) // (self.m * self.codec.ksub))
        if self.refine:
            step = max(1, min(step, (1 << 22) // (kc * self.dim)))
        # the encoder's scale: without it tables of 1e19-scale data overflow, of 1e-25-scale data underflow to 0
        scale = self.codec._codebook_scale()
        for s in range(0, nq, step):
            qb = q[s : s + step]
            try:
                units, tables, bias = self._finite_tables(qb, scale)
            except RotationOverflow as exc:
                raise exc.at(s, "query") from None
            d, rows = self._adc(tables, kc)
            if self.refine:
                d, rows = self._exact(qb, rows, k)
            elif bias is not None or (units is not None and np.any(units != 1.0)):
                # back to the data's units, the offset's term added in float64 (±inf beyond float32)
                with np.errstate(over="ignore", invalid="ignore"):
                    d64 = d.astype(np.float64) + (0.0 if bias is None else bias[:, None])
                    d = (d64 if units is None else d64 / units[:, None]).astype(np.float32)
            out_d[s : s + step], out_i[s : s + step] = d, rows
        return finish_results(out_d, out_i, self._ids.view, self.metric != "l2", one, k_out)

    # -- persistence ------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {
            "dim": self.dim,
            "m": self.m,
            "nbits": self.nbits,
            "metric": self.metric,
            "opq": self.opq,
            "refine": self.refine,
            "seed": self.seed,
            "fastscan_rerank": self.fastscan_rerank,
            "max_train_rows": self.codec.max_train_rows,
            "seeding": self.codec.seeding,
            "next_id": self._next_id,
            "trained": self.is_trained,
        }

    def save(self, path) -> None:
        arrays = {"ids": self._ids.view, "codes": self._codes.view}
        if self.refine:
            arrays["raw"] = self._raw.view
        if self.is_trained:
            for name, arr in self.codec._arrays().items():
                arrays[f"codec.{name}"] = arr
        persist.write(path, self._kind, self._meta(), arrays)

    @classmethod
    def _from_persist(cls, meta: dict, arrays: dict) -> PQIndex:
        try:
            obj = cls(meta["dim"], meta["m"], meta["nbits"], meta["metric"], opq=meta["opq"], refine=meta["refine"],
                      seed=meta["seed"], fastscan_rerank=meta["fastscan_rerank"],
                      max_train_rows=meta["max_train_rows"], seeding=meta.get("seeding", "k-means++"))
            next_id, trained = meta["next_id"], meta["trained"]
            ids, codes = arrays["ids"], arrays["codes"]
        except (KeyError, TypeError, ValueError) as exc:
            raise PersistError(f"bad PQIndex content: {exc}") from exc
        n = ids.shape[0] if ids.ndim == 1 else -1
        check_ids_array(ids, n)
        if codes.dtype != np.uint8 or codes.shape != (n, obj.code_size):
            raise PersistError(f"codes have shape {codes.shape} / {codes.dtype}, expected ({n}, {obj.code_size})")
        try:  # (odd m at 4 bits: a set padding nibble is a file this codec did not write; decode would refuse it)
            obj.codec._check_codes(codes)
        except InvalidInput as exc:
            raise PersistError(f"bad PQIndex codes: {exc}") from None
        next_id = check_next_id(next_id, ids)
        if trained is not True and (trained is not False or n):
            raise PersistError("an untrained index cannot hold vectors")
        if obj.refine:
            raw = arrays.get("raw")
            if raw is None or raw.dtype != np.float32 or raw.shape != (n, obj.dim):
                raise PersistError(f"raw vectors missing or not ({n}, {obj.dim}) float32")
            _check_raw_rows(raw, ids, obj.metric == "cos")
            obj._raw = Rows((obj.dim,), np.float32, raw)
        if trained:
            codec_arrays = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("codec.")}
            if ("rotation" in codec_arrays) != bool(obj.opq):
                # an OPQ rotation in a file whose settings say plain PQ (or the reverse) would be silently
                # dropped and every search answered in the wrong space
                raise PersistError(f"settings say opq={obj.opq} but the file "
                                   f"{'holds' if 'rotation' in codec_arrays else 'lacks'} an OPQ rotation")
            try:
                obj.codec._load_arrays(codec_arrays)
            except KeyError as exc:
                raise PersistError(f"codec array {exc} missing") from exc
        obj._codes = Rows((obj.code_size,), np.uint8, codes)
        obj._ids = Rows((), np.int64, ids)
        obj._next_id = next_id
        return obj

    def __repr__(self) -> str:
        return (f"PQIndex(dim={self.dim}, m={self.m}, nbits={self.nbits}, metric={self.metric!r}, opq={self.opq}, "
                f"refine={self.refine}, ntotal={self.ntotal})")


persist.register("PQIndex")(PQIndex)
