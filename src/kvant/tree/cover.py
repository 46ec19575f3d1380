"""``CoverTree``: exact k-NN in general metrics with a compressed cover tree in flat arrays.

See docs/covertree.md for the invariants, the batch construction and the exactness argument.
"""

from __future__ import annotations

import numbers
import threading
import time

import numpy as np

from .. import persist
from .._config import get_num_threads, last_level_cache_bytes, with_threads
from .._parallel import for_each_block
from ..errors import DimensionMismatch, EmptyIndex, InvalidInput, KvantError, PersistError
from ..io.source import as_array
from ..kernels import kdtree as KD
from ..kernels import tree as K
from .metrics import _MAX_ABS, check_exact_in_float64, resolve_metric, spec_to_metric

__all__ = ["CoverTree"]

# Levels are int32, ~log(distance) / log(base): a base nearer 1 would need millions of levels (at base 1 + 1e-7
# float64's distances span more levels than int32 holds, and the levels wrapped around).
MIN_BASE = 1.001
_BIG_GROUP = 4096  # groups at least this large pick their centres in parallel blocks (net_centres_big)
_PATH_BUDGET = 1 << 22  # entries of the (points x depth) traversal buffers per chunk
_SCAN_METRICS = ("euclidean", "manhattan", "chebyshev")  # metrics with a SIMD bucket scan
# subtrees up to max(_SCAN_LEAF, _LEAF_PER_DIM[metric] * dim) points (at most _SCAN_LEAF_MAX) are buckets, scanned
# whole by SIMD (the multiplier was 16 for all three until 2026-12-02; docs/covertree.md has the A/B per metric)
_SCAN_LEAF, _SCAN_LEAF_MAX = 256, 1024
# The level base when none is given: 1.5 for points of up to _LOW_D_MAX coordinates (vector metrics, built-in or a
# callable), else 1.3 (and for the residual metric, whose rows are indices).
# One thread, 1,024 queries, k = 8, 2026-12-06 (Intel host; docs/covertree.md): 1.5 answered 1.01-1.23x faster than
# 1.3 in all 16 Euclidean cells at d = 2-8 (30k and 300k points, uniform and clustered), 1.11-1.17x at d = 10-12,
# 1.00-1.27x for Manhattan, Chebyshev and angular at d = 4 and 8; from d = 14 it was 0.82-0.99x, at d = 16-32 0.5-0.8x.
DEFAULT_BASE, LOW_D_BASE, _LOW_D_MAX = 1.3, 1.5, 12
_LEAF_PER_DIM = {"euclidean": 64, "manhattan": 64, "chebyshev": 16}
# Queries on points of few coordinates under these metrics may walk a kd-tree over the same points (kernels.kdtree;
# docs/covertree.md, "Few coordinates: a kd-tree"): its box bounds reach a query's neighbours with less work than the
# cover tree's child distances, but clustered data favours the cover tree from ~5 coordinates (Manhattan) or ~6
# (Euclidean), while uniform data favours the kd-tree to ~8-10 and Chebyshev to 8 at least. So: the kd-tree up to
# KD_MAX_DIM coordinates; up to KD_PROBE_MAX_DIM the faster of the two on KD_PROBE_QUERIES of the tree's own points,
# timed when the tree is fitted (both answer alike, so the choice moves only the speed); beyond that, the cover tree.
KD_MAX_DIM, KD_PROBE_MAX_DIM, KD_PROBE_QUERIES = 4, 16, 128
# serialises the deferred cover-tree builds (CoverTree._cover; rare, so one lock for every tree)
_COVER_LOCK = threading.Lock()
# A tree compacts its arrays when more than this many deleted points' slots, and more slots than it has points, are
# unused (CoverTree._compact): below it the unused slots cost little, above it operations would follow the ids issued
_COMPACT_MIN = 1024
# ids a tree issues stay below this (a file's next id above it is corrupt: inserts would overflow int64)
_MAX_ID = 2**62
# the query structure _freeze derives from the per-node arrays
_QUERY_ATTRS = ("_off", "_idx", "_minid", "_height", "_cdata", "_erec", "_dstart", "_dend", "_dnode", "_ddata", "_blk",
                "_box", "_frame", "_kd_cache")


class _State:
    """The mutable per-node arrays of a tree; operations work on a copy and commit it at the end."""

    __slots__ = ("parent", "level", "maxdist", "pd", "in_tree")

    def __init__(self, parent, level, maxdist, pd, in_tree):
        self.parent, self.level, self.maxdist, self.pd, self.in_tree = parent, level, maxdist, pd, in_tree

    @classmethod
    def empty(cls, cap: int) -> _State:
        return cls(np.full(cap, -1, np.int64), np.zeros(cap, np.int32), np.zeros(cap), np.zeros(cap),
                   np.zeros(cap, np.bool_))


class MetricError(InvalidInput):
    """The metric returned NaN, inf or a negative number."""


# The residual scan's float32 products (CoverTree._residual_knn): points with |w| <= sqrt(_F32_BOUND_POINTS / gam32)
# and queries with |w| <= sqrt(_F32_BOUND_QUERIES / gam32) pair in float32, so such a pair's bound on x = 1 - |rho|
# stays <= 0.17 (the 8th neighbour's x is ~0.37 and 99.9% of pairs lie above 0.49 on the benchmark's data). On
# that data (32k points, rank 512) 18% of the points and 3.5% of the queries take float64 products, and a query
# buffers ~15 candidates at k = 8 (max 28 over 64 queries, NumPy emulation); with 0.3 and 1.2 (|w| cut-offs 100 and
# 200) some queries buffered up to 742, more than the buffer holds.
_F32_BOUND_POINTS = 0.1
_F32_BOUND_QUERIES = 0.3


def _gam32(r: int) -> float:
    """|fl32(w_q . w_p) - w_q . w_p| <= _gam32(r) |w_q| |w_p| for rank-r float64 rows: the float32 rounding of both
    operands, then float32 products summed in any order (gamma_(r+2), with 0.1% to spare)."""
    u = 2.0**-24
    return 1.001 * (r + 2) * u / (1.0 - (r + 2) * u)


def _gam64(r: int) -> float:
    """The same for float64 products of float64 rows (gamma_r): the metric kernel's own dot product, or BLAS's."""
    u = 2.0**-53
    return 1.001 * r * u / (1.0 - r * u)


def _w_norms(W: np.ndarray) -> np.ndarray:
    """|w| of each row, rounded up past its float64 summation error: the norms in the screens' bounds."""
    return np.sqrt(np.einsum("ij,ij->i", W, W)) * (1.0 + 1e-12)


def _bad_metric(what: str) -> MetricError:
    return MetricError(f"the metric returned NaN, inf or a negative distance during {what}; "
                       "expected finite non-negative distances (the tree is unchanged)")


# A user metric's tolerated violation of the triangle inequality, relative to the root's radius (the data's scale):
# 4·sqrt(eps), room for three distances each off by ~sqrt(2·eps) of their scale, as arccos-based formulas are near 0
# (a review: an angle metric on near-duplicate directions gave 117 of 20,000 knn_self rows unlike brute force)
_CALLABLE_SLACK = 4.0 * 2.0**-26
# and at least 4 times the rounding a callable shows where distances are (nearly) 0 (_identity_error), up to this
_SELF_ERROR_MAX = 2.0**-20


# The order of each node's children in the query structure (kernels.tree.build_csr); a pickle records it
_CSR_ORDER = "subtree-min-id"


def _check_progress(progress) -> None:
    if progress is not None and not callable(progress):
        raise InvalidInput(f"progress must be a callable progress(phase, n) or None, got {progress!r}")


class CoverTree:
    """Exact k-nearest neighbours for any metric, with dynamic insert and delete.

    ``metric`` is ``"euclidean"``, ``"manhattan"``, ``"chebyshev"``, ``"angular"``, a
    :class:`kvant.ResidualCorrelation` (points are then row indices into its ``X``), or a Numba-jitted
    ``dist(a, b) -> float`` on float64 rows that satisfies the triangle inequality.

    ``base`` (in [1.001, 16]): the ratio between the covering radii of consecutive levels. None (the default) picks
    it from the data when the tree is built: 1.5 for points of up to 12 coordinates (built-in vector metrics or a
    callable), 1.3 otherwise and for the residual metric (measured: :data:`DEFAULT_BASE`); ``level_base_`` is the one
    in use.

    ``kd`` (Euclidean, Manhattan and Chebyshev only) answers :meth:`knn` and :meth:`knn_self` through a kd-tree over
    the same points, built on the first query after the points change (and by :meth:`fit`). None (the default)
    uses it for points of at most :data:`KD_MAX_DIM` coordinates, where it is faster, and from there to
    :data:`KD_PROBE_MAX_DIM` where it answered :data:`KD_PROBE_QUERIES` of the tree's own points faster than the cover
    tree when the tree was fitted (``telemetry_["kd_probe"]``; docs/covertree.md, "Few coordinates: a kd-tree"); True
    or False forces it on or off. Both paths return the same neighbours, ties included; ``telemetry_["path"]`` names
    the one a query took. A query-time setting, saved with the tree (with the probe's choice).

    ``residual_scan`` (residual-correlation metric only) answers :meth:`knn` by an exact BLAS-blocked scan
    instead of walking the tree. It is the default because on GP inputs the residual distances bunch near
    1 and the tree prunes little (docs/covertree.md); both paths return the same neighbours. It is a
    query-time setting (an attribute you may change), saved with the tree.

    >>> import numpy as np, kvant
    >>> X = np.random.default_rng(0).random((1000, 3))
    >>> tree = kvant.CoverTree().fit(X)
    >>> d, i = tree.knn(X[:5], 3)
    >>> i[:, 0].tolist()
    [0, 1, 2, 3, 4]
    """

    def __init__(self, metric="euclidean", base: float | None = None, residual_scan: bool = True,
                 kd: bool | None = None):
        self._m = resolve_metric(metric)
        self.kd = kd
        if base is not None and (isinstance(base, bool) or not isinstance(base, numbers.Real)
                                 or not (MIN_BASE <= float(base) <= 16.0)):
            raise InvalidInput(f"base must be None or a number in [{MIN_BASE}, 16], got {base!r}")
        self.metric = metric
        self.base = None if base is None else float(base)
        self._lbase = DEFAULT_BASE if base is None else float(base)  # the level base in use (_resolve_base)
        if not isinstance(residual_scan, bool):
            raise InvalidInput(f"residual_scan must be True or False, got {residual_scan!r}")
        # residual metric: answer queries by the exact BLAS scan (True) or the tree (False); see _residual_scan
        self.residual_scan = residual_scan
        # subtrees this small are scanned linearly (cheap metrics only: it trades pruning for contiguity)
        # Euclidean, Manhattan and Chebyshev buckets are scanned by a SIMD loop over a transposed copy
        self._scan = int(self._m.params[0]) if self._m.name in _SCAN_METRICS else -1
        self._leaf = _SCAN_LEAF if self._scan >= 0 else (24 if self._m.kind == "vector" else 0)
        self._reset()

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._dim = None  # feature width (vector metrics: the point dimension)
        self._data = np.empty((0, 0))
        self._parent = np.empty(0, np.int64)
        self._level = np.empty(0, np.int32)
        self._maxdist = np.empty(0, np.float64)
        self._pd = np.empty(0, np.float64)
        self._in = np.empty(0, np.bool_)
        self._root = -1
        self._n = 0
        self._next_id = 0  # the id the next inserted point gets (vector metrics; rows are ids for the residual one)
        self._next_slot = 0  # the first unused slot (vector metrics)
        # slot -> id for the used slots, ascending, or None where a slot is its id (until a compaction; _compact)
        self._sid = None
        self.telemetry_: dict = {}
        self._self_error = 0.0  # a callable metric's rounding at distance ~0 on a sample of the points (_slack)
        # fitted points whose cover tree is not built yet: the kd-tree answers their queries (fit, _cover)
        self._cover_pending = False
        self._kd_choice = None  # whether the kd-tree answers (None: not yet decided; _uses_kd)
        self._kd_probe = None  # the timings that decided it, when a probe did
        self._freeze()
        if self._m.kind == "index":
            rc = self._m.obj
            self._data = rc.features()
            cap = rc.n
            self._parent = np.full(cap, -1, np.int64)
            self._level = np.zeros(cap, np.int32)
            self._maxdist = np.zeros(cap)
            self._pd = np.zeros(cap)
            self._in = np.zeros(cap, np.bool_)
            self._freeze()

    @property
    def kd(self) -> bool | None:
        """Whether queries walk the kd-tree (None: chosen by the points' width; see the class doc). Settable."""
        return self._kd

    @kd.setter
    def kd(self, kd) -> None:
        # checked when set, not only at construction: a tree saved with kd=True on the angular metric (set after it
        # was made) could not be loaded again (a review)
        if kd is not None and not isinstance(kd, bool):
            raise InvalidInput(f"kd must be None, True or False, got {kd!r}")
        if kd and self._m.name not in _SCAN_METRICS:
            raise InvalidInput(f"kd=True needs a coordinate metric ({', '.join(_SCAN_METRICS)}), not {self._m.name!r}")
        self._kd = kd

    @property
    def n(self) -> int:
        """Number of points in the tree."""
        return self._n

    def __len__(self) -> int:
        return self._n

    @property
    def ids_(self) -> np.ndarray:
        """The ids of the points in the tree, ascending (the row order of :meth:`knn_self`)."""
        return self._ids_of(self._live())

    def _live(self) -> np.ndarray:
        """The slots of the points in the tree, ascending (so in id order: slots keep the order of their ids)."""
        return np.flatnonzero(self._in).astype(np.int64)

    def _ids_of(self, slots: np.ndarray) -> np.ndarray:
        """The ids of ``slots`` (-1, a padding slot, stays -1)."""
        if self._sid is None:
            return slots
        if self._sid.size == 0:  # (an emptied, compacted tree: every slot given is padding)
            return np.full_like(slots, -1)
        return np.where(slots >= 0, self._sid[np.maximum(slots, 0)], -1)

    def _slots_of(self, ids: np.ndarray) -> np.ndarray:
        """The slots of the int64 ``ids``, -1 for an id not in the tree."""
        cap = self._in.shape[0]
        if cap == 0 or (self._sid is not None and self._sid.size == 0):
            return np.full(ids.shape, -1, np.int64)
        if self._sid is None:
            slots = np.clip(ids, 0, cap - 1)
        else:  # the used slots' ids ascend
            slots = np.minimum(np.searchsorted(self._sid, ids), self._sid.size - 1)
        found = self._in[slots] & (self._ids_of(slots) == ids)
        return np.where(found, slots, -1)

    @property
    def dim(self) -> int | None:
        return self._dim if self._m.kind != "index" else None

    def __repr__(self) -> str:
        return f"CoverTree(metric={self._m.name!r}, n={self._n})"

    def _slack(self) -> tuple[float, float]:
        sa = self._m.slack_abs
        if self._m.name == "angular" and self._dim:
            sa = 3.0 * np.sqrt(2.0 * (self._dim + 4) * 2.3e-16)
        if self._m.name == "euclidean":  # three computed distances in a bound, each short by up to the pad
            sa = 4.0 * K.UNDERFLOW_PAD
        if self._m.kind == "callable" and self._n:
            # a user metric's computed values may break the triangle inequality by its rounding error, which is
            # absolute for formulas like arccos(a·b/|a||b|) (~1e-8 near 0): allow _CALLABLE_SLACK of the root's radius,
            # and at least 4 times the rounding it shows at distance ~0 on the tree's own points (_identity_error)
            sa = max(sa, _CALLABLE_SLACK * float(self._maxdist[self._root]), 4.0 * self._self_error)
        return self._m.slack_rel, sa

    def _freeze(self, bare: bool | None = None) -> None:
        """Derive the query structure (CSR children, subtree minimum ids, height) from parents; an empty one when
        ``bare`` (default: while the cover tree is pending, so a refit holds nothing of the tree before it)."""
        self._csr_order = _CSR_ORDER
        bare = self._cover_pending if bare is None else bare
        if self._parent.shape[0] == 0 or bare:
            self._off = np.zeros(1, np.int64)
            self._idx = np.empty(0, np.int64)
            self._minid = np.empty(0, np.int64)
            self._height = 0
        else:
            self._off, self._idx, self._minid, self._height = K.build_csr(self._parent, self._level, self._in)
        # children's rows and edge records in CSR order: a node's children are read contiguously by queries.
        # The residual metric's queries use the exact scan, so its copy (n x (d + rank + 2) float64, 137 MB at
        # 32k points and rank 512) is made only if the tree walk runs (_children_rows).
        idx = self._idx
        self._scan_cache = None  # the residual scan's arrays (_scan_arrays)
        self._kd_cache = None  # the kd-tree over the points (_kd_index), built when a query needs it
        self._cdata = None if self._m.kind == "index" else self._copy_children_rows()
        cap = 0 if bare else self._parent.shape[0]
        n_in = 0 if bare else int(np.count_nonzero(self._in))
        self._dstart, self._dend, self._dnode = K.dfs_order(max(self._root, 0), n_in, self._off, self._idx, cap)
        width = max(1, self._data.shape[1])
        if self._scan >= 0:
            self._leaf = min(_SCAN_LEAF_MAX, max(_SCAN_LEAF, _LEAF_PER_DIM[self._m.name] * width))
        rows = np.ascontiguousarray(self._data[self._dnode]) if n_in and self._leaf > 0 else None
        self._ddata = rows if rows is not None else np.zeros((1, width))
        self._blk = np.zeros(1, np.int16)
        # per child edge: [d(parent, child), maxdist, subtree size, DFS start, child slot, subtree min slot,
        # bucket box row or -1]
        erec = np.zeros((max(1, idx.size), 7))
        erec[:, 6] = -1.0
        self._box = np.zeros((1, 2 * width))
        self._frame = np.zeros((1, width + 2))
        if idx.size:
            size = self._dend - self._dstart
            erec[:, 0] = self._pd[idx]
            erec[:, 1] = self._maxdist[idx]
            erec[:, 2] = size[idx]
            erec[:, 3] = self._dstart[idx]
            erec[:, 4] = idx
            erec[:, 5] = self._minid[idx]
            if self._scan >= 0:
                # buckets a query can reach: subtrees of 2..leaf points whose parent is expanded (the root, or
                # a subtree larger than a bucket); each gets its bounding box
                par = self._parent[idx]
                reach = (size[idx] > 1) & (size[idx] <= self._leaf) & ((par == self._root) | (size[par] > self._leaf))
                eb = np.flatnonzero(reach)
                if eb.size:
                    erec[eb, 6] = np.arange(eb.size)
                    starts, sizes = self._dstart[idx[eb]], size[idx[eb]]
                    self._box = K.bucket_boxes(rows, starts, sizes)
                    self._frame = K.bucket_frames(rows, starts, sizes, self._box, self._scan)
                    self._blk = K.bucket_blocks(rows, starts, sizes, self._frame)
        self._erec = erec

    def _copy_children_rows(self) -> np.ndarray:
        idx = self._idx
        return np.ascontiguousarray(self._data[idx]) if idx.size else np.zeros((1, max(1, self._data.shape[1])))

    def _children_rows(self) -> np.ndarray:
        if self._cdata is None:
            self._cdata = self._copy_children_rows()
        return self._cdata

    # ------------------------------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------------------------------

    def _features(self, points, what: str) -> np.ndarray:
        """Validate vector points and return float64 feature rows (n, D)."""
        arr = as_array(points, what)
        if arr.dtype.kind not in "fiub" or arr.dtype.kind == "b":
            raise InvalidInput(f"{what}: expected a numeric array, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise InvalidInput(f"{what}: expected a 2-D array (n, dim), got shape {arr.shape}")
        if arr.shape[1] == 0:
            raise InvalidInput(f"{what}: has zero columns")
        if self._dim is not None and arr.shape[1] != self._dim:
            raise DimensionMismatch(f"{what}: has dimension {arr.shape[1]}, the tree holds {self._dim}-d points")
        F = np.ascontiguousarray(arr, dtype=np.float64)
        check_exact_in_float64(arr, what)
        amax = float(np.abs(F).max()) if F.size else 0.0  # (NaN if any value is: one pass checks both)
        if not amax <= _MAX_ABS:
            if not np.all(np.isfinite(F)):
                bad = np.argwhere(~np.isfinite(F))[0]
                raise InvalidInput(f"{what}: contains NaN or inf (first at row {bad[0]}, column {bad[1]})")
            raise InvalidInput(f"{what}: values above {_MAX_ABS:g} in magnitude would overflow distances")
        alone = what == "fit points" or (what == "insert points" and self._n == 0)  # no other points to measure
        if self._m.name == "euclidean" and alone and 0.0 < amax < 1 / _MAX_ABS:
            # every squared difference would underflow float64: all points would look like duplicates
            raise InvalidInput(f"{what}: all values are below {1 / _MAX_ABS:g} in magnitude, where squared "
                               "distances underflow; multiply the data by a power of two first")
        if self._m.name == "angular":
            peak = np.abs(F).max(axis=1) if F.size else np.zeros(F.shape[0])
            if np.any(peak == 0):
                raise InvalidInput(f"{what}: zero vector at row {int(np.argmin(peak))}; the angle is undefined")
            # each row scaled by a power of two (exact: no angle changes) to a largest |value| in [0.5, 1) first:
            # the squared norm of a row near 1e-160 was subnormal (neighbours changed) or 0 ("zero vector")
            F = np.ldexp(F, -np.frexp(peak)[1][:, None])
            norms = np.sqrt(np.einsum("ij,ij->i", F, F))
            F = F / norms[:, None]
        return F

    def _rows(self, points, what: str) -> np.ndarray:
        """Validate row indices into the residual metric's X."""
        rc = self._m.obj
        arr = as_array(points, what)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise InvalidInput(f"{what}: with a ResidualCorrelation metric, points are a 1-D array of row indices "
                               f"into X, got dtype {arr.dtype} shape {arr.shape}")
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= rc.n):
            raise InvalidInput(f"{what}: row index out of range [0, {rc.n})")
        if np.unique(arr).size != arr.size:
            raise InvalidInput(f"{what}: row indices must be unique")
        return arr

    @staticmethod
    def _check_k(k, n_max: int) -> int:
        if type(k) is not int and (isinstance(k, bool) or not isinstance(k, numbers.Integral)):
            raise InvalidInput(f"k must be an integer, got {k!r}")
        k = int(k)
        if k < 1:
            raise InvalidInput(f"k must be >= 1, got {k}")
        if k > n_max:
            raise InvalidInput(f"k={k} is larger than the number of points in the tree ({n_max})")
        return k

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------

    @with_threads
    def fit(self, points=None, progress=None) -> CoverTree:
        """Build the tree from scratch on ``points`` (ids 0..n-1; for a ResidualCorrelation metric the
        points are row indices into X and are their own ids; ``None`` means every row). ``progress``, if given,
        is called as ``progress("build", n)`` as each level of the construction places n points (n in all)."""
        _check_progress(progress)
        t0 = time.perf_counter()
        if self._m.kind == "index":
            rows = np.arange(self._m.obj.n) if points is None else self._rows(points, "fit points")
            if rows.size == 0:
                raise InvalidInput("fit points: need at least one point")
            data = self._data
            cap = data.shape[0]
            slots = rows
            dim = None
        else:
            if points is None:
                raise InvalidInput("fit: points are required for this metric")
            saved_dim, self._dim = self._dim, None
            try:
                F = self._features(points, "fit points")
            finally:
                self._dim = saved_dim
            if F.shape[0] == 0:
                raise InvalidInput("fit points: need at least one point")
            # the tree owns its points: a caller changing theirs must not change its answers (also for array-likes
            # whose __array__ hands out their buffer, and memoryviews: np.asarray of them is a view)
            if F.base is not None or np.may_share_memory(F, np.asarray(points)):
                F = F.copy()
            data, cap, slots, dim = F, F.shape[0], np.arange(F.shape[0], dtype=np.int64), F.shape[1]
        st = _State.empty(cap)
        tel = {"n": int(slots.size)}
        pending = dim is not None and self._defers_cover(dim)
        if pending:
            root, base = -1, self._resolve_base(dim)
        else:
            root, base = self._build_fresh(data, slots, st, tel, progress)
        st.in_tree[slots] = True
        # commit (every array is replaced, none written: restoring this dict undoes it, should progress raise below)
        before = dict(self.__dict__)
        self._lbase = base
        self._data = data
        self._set_state(st)
        self._root, self._n = int(root), int(slots.size)
        self._dim = dim
        self._next_id = self._next_slot = int(cap) if self._m.kind != "index" else 0
        self._sid = None
        self._self_error = self._identity_error(slots)
        self._cover_pending = pending
        t1 = time.perf_counter()
        self._freeze()
        if not pending:
            tel["freeze"] = time.perf_counter() - t1
        # the kd-tree (and the probe that may choose it) now, so that a fit's time includes them; after insert and
        # delete the next query rebuilds the kd-tree, and the fit's choice stands
        self._kd_choice, self._kd_probe = None, None
        t1 = time.perf_counter()
        if self._uses_kd():
            self._kd_index()
            if pending and progress is not None:
                try:
                    progress("build", int(slots.size))
                except BaseException:  # the caller stopped the fit: the tree stays as it was, as it does when a
                    self.__dict__.clear()  # report during the build raises (a review found this fit replaced it)
                    self.__dict__.update(before)
                    raise
        if self._kd_cache is not None or self._kd_probe is not None:
            tel["kd"] = time.perf_counter() - t1
        if self._kd_probe is not None:
            tel["kd_probe"] = {**self._kd_probe, "chose": "kd" if self._kd_choice else "cover"}
        tel["total"] = time.perf_counter() - t0
        self.telemetry_ = {"op": "fit", **tel}
        return self

    def _defers_cover(self, dim: int) -> bool:
        """Whether :meth:`fit` on points of ``dim`` coordinates leaves the cover tree for later (:meth:`_cover`): when
        the kd-tree answers their queries without a probe (``kd=True``, or up to KD_MAX_DIM coordinates). Then a fit
        costs the kd-tree's build alone (1M × 3 points: 0.39-0.55 s, and 2.16 s more for the cover tree; Zen 5), and an
        insert, delete, save, invariant check or cover-tree query pays for the cover tree when it first needs it."""
        return self._m.name in _SCAN_METRICS and (self.kd is True or (self.kd is None and dim <= KD_MAX_DIM))

    def _cover(self, progress=None, tel: dict | None = None) -> float:
        """Build the cover tree a fit left pending (fit: points of at most KD_MAX_DIM coordinates, or ``kd=True``, whose
        queries the kd-tree answers); every operation that reads the cover tree calls this first. Returns the seconds
        it took (0 when there was nothing to build); ``tel``, if given, gets the build's phases, and ``progress`` its
        reports, as :meth:`fit` gives them."""
        if not self._cover_pending:
            return 0.0
        with _COVER_LOCK:  # (queries on several threads may all need it: one builds, the others wait for it)
            if not self._cover_pending:
                return 0.0
            t = time.perf_counter()
            slots = self._live()
            st = _State.empty(self._in.shape[0])
            tel = {} if tel is None else tel
            # (the fit's level base: the same tree a fit that built it would have, whatever ``base`` is set to since)
            root, _ = self._build_fresh(self._data, slots, st, tel, progress, base=self._lbase)
            st.in_tree[slots] = True
            kd = self._kd_cache  # (the points are the same: the kd-tree stands)
            self._set_state(st)
            self._root = int(root)
            t1 = time.perf_counter()
            self._freeze(bare=False)
            tel["freeze"] = time.perf_counter() - t1
            self._kd_cache = kd
            self._cover_pending = False  # (last: a thread that reads it False finds the whole structure)
            return time.perf_counter() - t

    def _uses_kd(self) -> bool:
        """Whether queries walk the kd-tree: ``kd`` if set; else for a coordinate metric up to KD_MAX_DIM coordinates,
        and up to KD_PROBE_MAX_DIM where the probe (_probe_kd) found it faster."""
        if self._m.name not in _SCAN_METRICS or not self._dim:
            return False
        if self.kd is not None:
            return self.kd
        if self._dim <= KD_MAX_DIM:
            return True
        if self._dim > KD_PROBE_MAX_DIM:
            return False
        if self._kd_choice is None:
            self._kd_choice = self._probe_kd()
        return self._kd_choice

    def _probe_kd(self) -> bool:
        """Whether the kd-tree answered KD_PROBE_QUERIES of the tree's points (evenly spaced ids, k = 8) faster than
        the cover tree: best of three alternating runs each. Recorded in ``telemetry_["kd_probe"]`` by fit."""
        ids = self._live()
        Q = np.ascontiguousarray(self._data[ids[:: max(1, ids.size // KD_PROBE_QUERIES)][:KD_PROBE_QUERIES]])
        k = min(8, self._n)
        best = {True: np.inf, False: np.inf}
        tel = self.telemetry_
        try:  # (the path is passed, not set on the tree: a query on another thread meanwhile keeps its own)
            for _ in range(3):
                for kd in (True, False):
                    t = time.perf_counter()
                    self._query(Q, np.zeros(Q.shape[0], np.int64), 0, k, False, kd=kd)
                    best[kd] = min(best[kd], time.perf_counter() - t)
        finally:
            self.telemetry_ = tel
        self._kd_probe = {"kd_seconds": best[True], "cover_seconds": best[False], "queries": int(Q.shape[0])}
        if best[True] >= best[False]:
            self._kd_cache = None  # (not kept in memory for nothing)
        return bool(best[True] < best[False])

    def _kd_index(self) -> tuple:
        """The kd-tree over the points in the tree (kernels.kdtree.kd_build's arrays, after its reordered rows and
        their slots), built on first use after the points change."""
        if self._kd_cache is None:
            slots = self._live()
            rows = np.ascontiguousarray(self._data[slots])  # a copy: kd_build reorders it in place
            self._kd_cache = (rows, slots, *KD.kd_build(rows, slots, KD.KD_LEAF))
        return self._kd_cache

    def _state(self) -> _State:
        return _State(self._parent.copy(), self._level.copy(), self._maxdist.copy(), self._pd.copy(), self._in.copy())

    def _set_state(self, st: _State) -> None:
        self._parent, self._level, self._maxdist = st.parent, st.level, st.maxdist
        self._pd, self._in = st.pd, st.in_tree

    def __copy__(self) -> CoverTree:
        # insert writes new points into the spare rows of _data in place (every other array is replaced, never
        # written): a copy sharing it had its points overwritten by the original's inserts (a review)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._data = self._data.copy()
        return new

    def __setstate__(self, state: dict) -> None:
        # a tree pickled before 2026-12-06 has no _lbase: its levels were built with its base, always a number then
        if "_lbase" not in state:
            state = {**state, "_lbase": float(state["base"])}
        # (pickled before the kd-tree path: the defaults)
        state = {"_kd": state.pop("kd", None) if "kd" in state else None, "_kd_cache": None, "_kd_choice": None,
                 "_kd_probe": None, "_cover_pending": False, **state}
        if "_sid" not in state:  # (pickled before slots and ids parted, 2026-12-07: every slot was its id)
            state = {**state, "_sid": None, "_next_slot": state.get("_next_id", 0)}
        self.__dict__.update(state)
        if "_self_error" not in state:  # (pickled before 2026-12-07)
            self._self_error = self._identity_error(self._live())
        if state.get("_csr_order") != _CSR_ORDER:
            # queries stop at the first child past their id cut, which needs children by subtree minimum id: a tree
            # pickled before that order may have them otherwise (after a delete), so its query structure is rebuilt
            self._freeze()

    @property
    def level_base_(self) -> float:
        """The level base the tree is built with: ``base``, or the one chosen for the data when ``base`` is None."""
        return self._lbase

    def _resolve_base(self, width: int) -> float:
        """The level base a tree over points of this width is built with: ``base``, or when it is None
        :data:`LOW_D_BASE` for points of up to _LOW_D_MAX coordinates (the vector metrics, built-in or callable), else
        :data:`DEFAULT_BASE`."""
        if self.base is not None:
            return self.base
        return LOW_D_BASE if self._m.kind != "index" and width <= _LOW_D_MAX else DEFAULT_BASE

    def _build_fresh(self, data, slots, st, tel, progress=None, base=None) -> tuple[int, float]:
        """(root, level base) of a new tree over ``slots``, built into ``st``, with the level base ``base`` (default:
        :meth:`_resolve_base`'s). The base is the caller's to commit with ``st`` (a build that fails must leave the
        tree's own base alone: its levels were set from it)."""
        m = self._m
        if base is None:
            base = self._resolve_base(data.shape[1])  # (a fresh tree: every level below is set from it)
        root = int(slots[0])
        rest = np.ascontiguousarray(slots[1:], dtype=np.int64)
        t = time.perf_counter()
        dp = np.empty(rest.size)
        m.K.dist_to_one(data, m.params, root, rest, dp)
        if rest.size and not np.all((dp >= 0) & (dp < np.inf)):
            raise _bad_metric("construction")
        tel["traversal"] = tel.get("traversal", 0.0) + time.perf_counter() - t
        maxd = float(dp.max()) if rest.size else 0.0
        st.parent[root] = -1
        st.level[root] = K.ceil_log(base, maxd) if maxd > 0 else 0
        st.maxdist[root] = maxd
        st.pd[root] = 0.0
        if progress is not None:
            progress("build", 1)
        if rest.size:
            self._grow(data, st, rest, dp, np.array([root], np.int64), np.array([0], np.int64),
                       np.array([rest.size], np.int64), tel, progress, base=base)
        return root, base

    def _grow(self, data, st, perm, pdist, gnode, gstart, gend, tel, progress=None, base=None) -> None:
        """Level-synchronous top-down construction of the subtrees below ``gnode`` (see docs), with the level base
        ``base`` (default: the tree's)."""
        m = self._m
        base = self._lbase if base is None else base
        t_net = t_lay = 0.0
        levels = 0
        screen = None  # the big groups' residual screen (_cover_screen), made once per build
        while gnode.size:
            levels += 1
            t = time.perf_counter()
            B = perm.size
            asg = np.empty(B, np.int64)
            adist = np.empty(B)
            cent = np.empty(B, np.int64)
            G = gnode.size
            gm = np.zeros(G, np.int64)
            gcl = np.zeros(G, np.int64)
            sizes = gend - gstart
            big = np.flatnonzero(sizes >= _BIG_GROUP)
            small = np.flatnonzero(sizes < _BIG_GROUP)
            if small.size:
                gbad = np.zeros(small.size, np.bool_)
                sm_m = np.zeros(small.size, np.int64)
                sm_cl = np.zeros(small.size, np.int64)
                m.K.nets_small(data, m.params, base, perm, pdist, gnode[small], gstart[small], gend[small],
                             st.level, asg, adist, cent, sm_m, sm_cl, gbad)
                if gbad.any():
                    raise _bad_metric("construction")
                gm[small] = sm_m
                gcl[small] = sm_cl
            if big.size and screen is None:
                screen = self._cover_screen()
            for g in big:
                s0, s1 = int(gstart[g]), int(gend[g])
                mm, cl, bad = m.K.net_centres_big(data, m.params, base, perm, pdist, s0, s1,
                                                int(st.level[gnode[g]]), asg, adist, cent, *screen)
                if bad:
                    raise _bad_metric("construction")
                # Members move to their nearest centre: balanced groups, tight maxdist. Not for the residual
                # metric: there that scan is most of the build (79M distances at 32k points) and its tree
                # prunes nothing anyway -- queries use the exact scan (docs/covertree.md, "Construction").
                if m.kind != "index":
                    badv = np.zeros(s1 - s0, np.bool_)
                    m.K.net_assign_big(data, m.params, perm, s0, s1, mm, asg, adist, cent, badv)
                    if badv.any():  # pairs the first-fit pass never computed can fail here
                        raise _bad_metric("construction")
                gm[g] = mm
                gcl[g] = cl
            t2 = time.perf_counter()
            t_net += t2 - t
            perm, pdist, gnode, gstart, gend = K.relayout(perm, pdist, asg, adist, gnode, gstart, gend, gm, gcl, cent,
                                                          st.parent, st.level, st.maxdist, st.pd)
            t_lay += time.perf_counter() - t2
            if progress is not None:
                progress("build", B - perm.size)  # the points this level made nodes of
        tel["net"] = tel.get("net", 0.0) + t_net
        tel["relayout"] = tel.get("relayout", 0.0) + t_lay
        tel["levels"] = tel.get("levels", 0) + levels

    @with_threads
    def insert(self, points) -> np.ndarray:
        """Insert a batch; returns the new points' ids (for a ResidualCorrelation metric: the row indices)."""
        t0 = time.perf_counter()
        m = self._m
        if m.kind == "index":
            rows = self._rows(points, "insert points")
            if rows.size and np.any(self._in[rows]):
                raise InvalidInput(f"insert points: row {int(rows[np.argmax(self._in[rows])])} is already in the tree")
            new_slots = new_ids = rows
            data = self._data
            cap = data.shape[0]
        else:
            F = self._features(points, "insert points")
            b = F.shape[0]
            built = self._cover() if b else 0.0
            new_slots = np.arange(self._next_slot, self._next_slot + b, dtype=np.int64)
            new_ids = np.arange(self._next_id, self._next_id + b, dtype=np.int64)
            need = self._next_slot + b
            cap = self._data.shape[0]
            if need > cap or self._dim is None:
                cap = max(need, int(cap * 1.5) + 16)
                data = np.zeros((cap, F.shape[1]))
                if self._data.shape[0]:  # an empty tree's placeholder may have no columns yet
                    data[: self._data.shape[0]] = self._data
            else:
                data = self._data  # rows past next_slot are unused: writing them cannot disturb the tree
            data[new_slots] = F
        if new_slots.size == 0:
            return new_ids.copy()
        st = _State.empty(cap)
        old = self._parent.shape[0]
        st.parent[:old], st.level[:old], st.maxdist[:old] = self._parent, self._level, self._maxdist
        st.pd[:old], st.in_tree[:old] = self._pd, self._in
        tel = {"n": int(new_slots.size)}
        if m.kind != "index" and built:
            tel["cover_build"] = built
        base = self._lbase
        if self._n == 0:
            root, base = self._build_fresh(data, new_slots, st, tel)
        else:
            root = self._root
            self._insert_into(data, st, new_slots, tel)
        st.in_tree[new_slots] = True
        # commit
        self._lbase = base
        self._data = data
        self._set_state(st)
        self._root = int(root)
        self._n += int(new_slots.size)
        if m.kind != "index":
            self._dim = data.shape[1]
            self._next_slot, self._next_id = int(new_slots[-1]) + 1, int(new_ids[-1]) + 1
            if self._sid is not None:
                self._sid = np.concatenate([self._sid, new_ids])
        self._self_error = max(self._self_error, self._identity_error(new_slots))
        t1 = time.perf_counter()
        self._freeze()
        tel["freeze"] = time.perf_counter() - t1
        tel["total"] = time.perf_counter() - t0
        self.telemetry_ = {"op": "insert", **tel}
        return new_ids.copy()

    def _insert_into(self, data, st, new_slots, tel) -> None:
        """Insert new slots into the current frozen tree (self._off/_idx/_level describe it); the updated
        structure is written to ``st`` (a copy), so a failure leaves the tree unchanged."""
        m = self._m
        root = self._root
        t = time.perf_counter()
        B = new_slots.size
        land = np.empty(B, np.int64)
        dp = np.empty(B)
        depth = int(self._height) + 1
        chunk = max(1, _PATH_BUDGET // depth)
        for s in range(0, B, chunk):
            e = min(B, s + chunk)
            nb = e - s
            pn = np.empty((nb, depth), np.int64)
            pd = np.empty((nb, depth))
            pl = np.zeros(nb, np.int64)
            bad = np.zeros(nb, np.bool_)
            m.K.land(data, m.params, self._lbase, root, self._level, self._off, self._idx, new_slots[s:e],
                   land[s:e], dp[s:e], pn, pd, pl, bad)
            if bad.any():
                raise _bad_metric("insertion")
            K.apply_paths(st.maxdist, pn, pd, pl)
        at_root = land == root
        if at_root.any():
            mx = float(dp[at_root].max())
            if mx > 0:
                st.level[root] = max(int(st.level[root]), K.ceil_log(self._lbase, mx))
        tel["traversal"] = tel.get("traversal", 0.0) + time.perf_counter() - t
        copy = dp == 0.0  # lands on a node it coincides with (the traversal stops there)
        grow = np.flatnonzero(~copy)
        if grow.size:
            order = grow[np.argsort(land[grow], kind="stable")]
            perm = np.ascontiguousarray(new_slots[order])
            pdist = np.ascontiguousarray(dp[order])
            ls = land[order]
            starts = np.flatnonzero(np.r_[True, ls[1:] != ls[:-1]])
            gend = np.r_[starts[1:], grow.size].astype(np.int64)
            self._grow(data, st, perm, pdist, ls[starts].astype(np.int64), starts.astype(np.int64), gend, tel)
        if copy.any():
            self._attach_copies(st, new_slots[copy], land[copy], new_slots[grow])

    @staticmethod
    def _attach_copies(st, slots, twins, grown) -> None:
        """Hang each of ``slots`` off the node it coincides with (``twins``), as a leaf one level below all
        of that node's children, or at the level of its lowest children when those are all copies too.

        Why there: a child of the twin may lie within its covering radius of the twin, so a copy at that
        child's level would break separation; below every child it has no sibling but other copies (distance
        0, which separation exempts). Copies arriving one at a time therefore all share one level instead of
        each landing below the last (a chain as deep as the number of copies). Runs after ``_grow`` so the
        children it just created count.
        """
        uq, pos_s = np.unique(twins, return_inverse=True)
        member = st.in_tree.copy()
        member[grown] = True
        kids = np.flatnonzero(member & (st.parent >= 0))
        par = st.parent[kids]
        at = np.searchsorted(uq, par)
        sel = (at < uq.size) & (uq[np.minimum(at, uq.size - 1)] == par)
        kids, at = kids[sel], at[sel]
        low = st.level[uq].astype(np.int64)  # the twin's level stands in when it has no children
        np.minimum.at(low, at, st.level[kids].astype(np.int64))
        lowest = st.level[kids] == low[at]
        mixed = np.zeros(uq.size, np.bool_)  # a child at the lowest level that is not a copy of the twin
        np.logical_or.at(mixed, at[lowest], st.pd[kids[lowest]] != 0.0)
        has_kids = np.bincount(at, minlength=uq.size) > 0
        lev = np.where(has_kids & ~mixed, low, low - 1)
        st.parent[slots] = twins
        st.level[slots] = lev[pos_s]
        st.pd[slots] = 0.0
        st.maxdist[slots] = 0.0

    @with_threads
    def delete(self, ids) -> None:
        """Remove points by id. Their subtrees are detached and the surviving descendants re-inserted."""
        t0 = time.perf_counter()
        arr = as_array(ids, "delete ids")
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise InvalidInput(f"delete: expected a 1-D array of integer ids, got dtype {arr.dtype} shape {arr.shape}")
        if arr.size and arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:  # (named before the cast)
            huge = arr[arr > np.iinfo(np.int64).max][:5].tolist()
            raise InvalidInput(f"delete: unknown id(s) {huge} (not in the tree)")
        arr = arr.astype(np.int64)
        if arr.size == 0:
            return
        cap = self._in.shape[0]
        slots = self._slots_of(arr)
        unknown = arr[slots < 0]
        if unknown.size:
            raise InvalidInput(f"delete: unknown id(s) {unknown[:5].tolist()} (not in the tree)")
        if np.unique(arr).size != arr.size:
            raise InvalidInput("delete: ids must be unique")
        arr = slots
        built = self._cover()
        flag = np.zeros(cap, np.bool_)
        flag[arr] = True
        live = np.flatnonzero(self._in)
        order = live[np.argsort(-self._level[live].astype(np.int64), kind="stable")]
        K.mark_subtrees(self._parent, order, flag)
        deleted = np.zeros(cap, np.bool_)
        deleted[arr] = True
        reinsert = np.flatnonzero(flag & ~deleted).astype(np.int64)
        st = self._state()
        st.in_tree[flag] = False
        st.parent[flag] = -1
        tel = {"n": int(arr.size), "reinserted": int(reinsert.size), **({"cover_build": built} if built else {})}
        n_new = self._n - arr.size
        root, base = self._root, self._lbase
        if n_new == 0:
            root = -1
        elif deleted[self._root]:
            root, base = self._build_fresh(self._data, reinsert, st, tel)
            st.in_tree[reinsert] = True
        elif reinsert.size:
            # re-insert into the reduced tree: freeze it first (the traversal reads the CSR)
            saved = (self._parent, self._level, self._maxdist, self._pd, self._in)
            saved_q = {a: getattr(self, a) for a in _QUERY_ATTRS}
            try:
                self._set_state(st)
                self._freeze()
                st2 = self._state()
                self._insert_into(self._data, st2, reinsert, tel)
                st = st2
            finally:
                self._parent, self._level, self._maxdist, self._pd, self._in = saved
                for a, v in saved_q.items():
                    setattr(self, a, v)
            st.in_tree[reinsert] = True
        self._set_state(st)
        self._lbase = base
        self._root, self._n = int(root), int(n_new)
        if self._m.kind != "index" and self._next_slot - self._n > max(self._n, _COMPACT_MIN):
            self._compact()
        self._freeze()
        tel["total"] = time.perf_counter() - t0
        self.telemetry_ = {"op": "delete", **tel}

    def _compact(self) -> None:
        """Move the points into the first n slots, in order, dropping the deleted points' slots: the arrays then
        follow the points held, not the ids issued. Ids stay: ``_sid`` maps slots to them. The links are renumbered,
        not rebuilt (the tree is the same); delete calls it when unused slots outnumber the points (amortised: a
        compaction costs O(slots) and follows at least as many deletes)."""
        live = self._live()
        new = np.full(self._in.shape[0], -1, np.int64)
        new[live] = np.arange(live.size)
        par = self._parent[live]
        par = np.where(par >= 0, new[np.maximum(par, 0)], -1)
        st = _State(par, self._level[live], self._maxdist[live], self._pd[live], np.ones(live.size, np.bool_))
        self._sid = self._ids_of(live).copy()
        self._data = np.ascontiguousarray(self._data[live])
        self._set_state(st)
        self._root = int(new[self._root]) if self._root >= 0 else -1
        self._next_slot = int(live.size)

    # ------------------------------------------------------------------------------------------
    # queries
    # ------------------------------------------------------------------------------------------

    @with_threads
    def knn(self, queries, k: int, progress=None):
        """Exact k nearest neighbours: ``(distances, ids)``, each (nq, k), ascending by (distance, id).

        For a ResidualCorrelation metric the queries are row indices into X (a query row that is in the
        tree finds itself at distance 0). A 1-D query (a single vector, or a scalar row) gives 1-D arrays.
        ``progress``, if given, is called as ``progress("query", n)`` after each run of n queries (then the queries
        run in about 50 runs; the answers are the same).
        """
        _check_progress(progress)
        if self._n == 0:
            raise EmptyIndex("the cover tree is empty: fit or insert points before querying")
        k = self._check_k(k, self._n)
        m = self._m
        if m.kind == "index":
            rows = as_array(queries, "queries")
            single = rows.ndim == 0
            Q = np.ascontiguousarray(self._data[self._query_rows(rows)])
        else:
            q = as_array(queries, "queries")
            single = q.ndim == 1
            Q = self._features(q.reshape(1, -1) if single else q, "queries")
        return self._query(Q, np.zeros(Q.shape[0], np.int64), 0, k, single, progress)

    def _query_rows(self, queries) -> np.ndarray:
        """Query rows for a ResidualCorrelation metric: indices into X (repeats allowed), as int64."""
        rows = as_array(queries, "queries")
        rows = rows.reshape(1) if rows.ndim == 0 else rows
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise InvalidInput("queries: with a ResidualCorrelation metric, queries are row indices into X")
        rows = rows.astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self._m.obj.n):
            raise InvalidInput(f"queries: row index out of range [0, {self._m.obj.n})")
        return rows

    @with_threads
    def knn_self(self, k: int, predecessors: bool = True, progress=None):
        """k nearest neighbours of every point in the tree, rows in ascending id order (``ids_``).

        ``predecessors=True``: row i only sees points with a smaller id (Vecchia conditioning sets), padded
        with -1 / inf when fewer than k exist. ``predecessors=False``: all other points (self excluded).
        ``progress`` as in :meth:`knn`.
        """
        _check_progress(progress)
        if not isinstance(predecessors, (bool, np.bool_)):
            raise InvalidInput(f"predecessors must be True or False, got {predecessors!r}")
        if self._n == 0:
            raise EmptyIndex("the cover tree is empty: fit or insert points before querying")
        k = self._check_k(k, self._n)
        slots = self._live()
        Q = np.ascontiguousarray(self._data[slots])
        return self._query(Q, slots, 2 if predecessors else 1, k, False, progress)

    # queries per run when a caller follows progress: ~50 runs, none below this many queries
    _PROGRESS_MIN_RUN = 1024
    # batches of at most this many queries are searched on the calling thread (kernels.tree.knn_serial): starting the
    # parallel region cost more than one query's search
    _SERIAL_MAX_QUERIES = 1

    def _query(self, Q, qslot, mode, k, single, progress=None, kd=None):
        """k-NN of the rows ``Q``; ``kd`` forces the path (the probe times both) instead of _uses_kd()."""
        nq = Q.shape[0]
        if progress is not None and nq > 0:
            run = max(self._PROGRESS_MIN_RUN, -(-nq // 50))
            parts, seconds, built = [], 0.0, 0.0
            for s in range(0, nq, run):
                parts.append(self._query(Q[s : s + run], qslot[s : s + run], mode, k, False))
                seconds += self.telemetry_["query"]
                built += self.telemetry_.get("cover_build", 0.0)
                progress("query", min(run, nq - s))
            self.telemetry_ = {**self.telemetry_, "nq": int(nq), "query": seconds,
                               **({"cover_build": built} if built else {})}
            out_d = np.concatenate([d for d, _ in parts]) if parts else np.empty((0, k))
            out_i = np.concatenate([i for _, i in parts]) if parts else np.empty((0, k), np.int64)
            return (out_d[0], out_i[0]) if single else (out_d, out_i)
        m = self._m
        if m.kind == "index" and self.residual_scan:
            t = time.perf_counter()
            out_d, out_i = self._residual_scan(Q, qslot, mode, k)
            self.telemetry_ = {"op": "knn", "nq": int(nq), "k": int(k), "query": time.perf_counter() - t,
                               "path": "residual_scan"}
            if single:
                return out_d[0], out_i[0]
            return out_d, out_i
        use_kd = self._uses_kd() if kd is None else kd
        built = 0.0 if use_kd else self._cover()  # (before the query's clock)
        t = time.perf_counter()
        out_d = np.empty((nq, k))
        out_i = np.empty((nq, k), np.int64)
        bad = np.zeros(nq, np.bool_)
        serial = nq <= self._SERIAL_MAX_QUERIES
        if use_kd:
            path = "kd"
            search = KD.kd_knn_serial if serial else KD.kd_knn
            search(*self._kd_index(), m.params, self._scan, Q, qslot, mode, k, out_d, out_i, bad)
        else:
            path = "cover"
            order = self._locality_order(Q, qslot, mode)
            if order is not None:
                Q, qslot = np.ascontiguousarray(Q[order]), qslot[order]
            sr, sa = self._slack()
            search = m.K.knn_serial if serial else m.K.knn
            search(self._data, self._children_rows(), m.params, Q, qslot, mode, self._root, self._off, self._erec,
                   self._minid, k, sr, sa, self._ddata, self._dnode, self._leaf, self._blk, self._scan, self._box,
                   self._frame, out_d, out_i, bad)
            if order is not None:
                out_d[order], out_i[order] = out_d.copy(), out_i.copy()
        self.telemetry_ = {"op": "knn", "nq": int(nq), "k": int(k), "query": time.perf_counter() - t, "path": path,
                           **({"cover_build": built} if built else {})}
        if np.count_nonzero(bad):  # (cheaper than .any() on one query)
            raise _bad_metric("a query")
        out_i = self._ids_of(out_i)  # (the kernels answer in slots)
        if single:
            return out_d[0], out_i[0]
        return out_d, out_i

    def _locality_order(self, Q, qslot, mode):
        """The order to run queries in, or None to keep theirs (one query, or points that fit in the cache).

        Queries are sorted by the DFS position of the subtree each one starts near (its own node for
        ``knn_self``, else the end of a nearest-child walk from the root), so the queries of one chunk scan the
        same buckets while they are in cache. The kernel hands contiguous runs of chunks to each thread, so
        the sorted segments are laid out in bit-reversed order: every thread gets segments from all over the
        data, as with unsorted queries, instead of one region whose queries may all be expensive.
        """
        nq = Q.shape[0]
        # Only worth it when the points outgrow the cache: below that (measured up to 131k 8-d points) the walk
        # and the coarser balance cost up to 25% of the query time, above it (1M points) sorting gained 7-38%.
        if nq < 2 or self._data.nbytes <= last_level_cache_bytes() // 2:
            return None
        if mode != 0:
            keys = self._dstart[qslot].astype(np.float64)
        else:
            keys = np.empty(nq)
            self._m.K.descent_keys(self._children_rows(), self._m.params, Q, self._root, self._off, self._erec,
                                   self._leaf, keys)
        order = np.argsort(keys, kind="stable")
        nch = min(nq, K.QUERY_CHUNKS)
        bits = max(1, (nch - 1).bit_length())
        rev = [int(format(j, f"0{bits}b")[::-1], 2) for j in range(nch)]
        bounds = [j * nq // nch for j in range(nch + 1)]
        return np.concatenate([order[bounds[j] : bounds[j + 1]] for j in np.argsort(rev)])

    def _residual_scan(self, Q, qslot, mode, k):
        """Exact k-NN of the rows ``Q`` among the tree's points for the residual metric: ids, ties to the lower."""
        slots = self._live()
        out_d, pos = self._residual_knn(Q, qslot, mode, k, slots)
        return out_d, np.where(pos >= 0, slots[np.maximum(pos, 0)], -1)

    def _residual_knn(self, Q, qslot, mode, k, pts):
        """Exact k-NN of the rows ``Q`` among the points ``pts`` (slots; ascending when ``mode`` is 2) for the
        residual metric, by a blocked BLAS scan that screens with proven bounds and an exact recheck. Returns
        (distances, positions into ``pts``), ties to the lower position, padded with inf / -1.

        On the data this metric is used for, distances concentrate near 1 and no metric tree prunes (see
        docs/covertree.md), so every query costs ~n distances, and BLAS computes the rank-r dot products
        that dominate them faster than the per-pair kernel. Threads take blocks of queries; for each tile of
        points a BLAS product gives w_q . w_p, and :func:`kvant.kernels.tree.residual_screen_tile` bounds each
        pair's x = 1 - |rho| from below and above (the product's rounding bound is gam * |w_q| |w_p|), keeps each
        query's k smallest upper bounds and buffers every point whose lower bound does not exceed the k-th. The
        buffered points are recomputed with the metric kernel and the answer is taken from those exact
        distances: identical to brute force. A query whose buffer had to drop a point that may still count
        (more near-ties than it holds) is answered by :meth:`_residual_knn_numpy`, which keeps every candidate.

        The products run in float32 (twice the float64 GEMM rate) for pairs whose bound stays small: points with
        |w| <= ``tau_c`` and queries with |w| <= ``tau_q``, chosen so such a pair's bound on x (range [0, 1]) is
        at most 0.17. Points with a small residual variance p (|w| = |v| / sqrt(p) large: the inducing points
        and their close neighbours) are scanned first with float64 products, and so is every pair of a query
        with a large |w|. (tau_c = 57 and tau_q = 99 at rank 512.)
        """
        rc = self._m.obj
        d = rc.X.shape[1]
        r = rc.v.shape[1]
        n, nq = pts.size, Q.shape[0]
        sc = self._scan_arrays(pts)
        nh = sc["nh"]
        Wq = Q[:, d : d + r]
        nwq = _w_norms(Wq)
        hi_q = nwq > sc["tau_q"]
        kk = min(k, n)
        cap = 4 * kk + 64
        heap_u = np.empty((nq, kk))
        heap_c = np.empty((nq, kk), np.int64)
        heap_n = np.zeros(nq, np.int64)
        buf_l = np.empty((nq, cap))
        buf_c = np.zeros((nq, cap), np.int64)  # zeros: the unused entries are mapped through perm_pos below
        buf_n = np.zeros(nq, np.int64)
        lost = np.full(nq, np.inf)
        threads = max(1, get_num_threads())
        variance, kern = float(rc.kernel.variance), int(rc.kernel.code)
        gam32, gam64 = sc["gam32"], sc["gam64"]

        def run(qi, precise):
            """Scan the queries ``qi`` (positions into Q) over every point: ``precise`` in the stored order with
            float64 products, else the float64 points first (permuted order), then the float32 ones."""
            ZpT, Sp, Rp, NWp, SLp = sc["orig"] if precise else sc["perm"]
            tile = max(256, (1 << 18) // qi.size)  # a (queries, tile) block of 1-2 MiB stays in L2
            Zq = np.ascontiguousarray(Q[qi, :d])
            Sq = np.ascontiguousarray(Q[qi, d + r])
            Rq = np.ascontiguousarray(Q[qi, d + r + 1])
            W64 = np.ascontiguousarray(Wq[qi])
            out = (heap_u[qi], heap_c[qi], heap_n[qi], buf_l[qi], buf_c[qi], buf_n[qi], lost[qi])
            tmp = np.empty((3, tile))
            # Vecchia (mode 2): slots ascend within each part, so points at or after the block's last query
            # never count
            qmax = qslot[qi].max()
            nw_b, qslot_b = nwq[qi], qslot[qi]

            def tiles(lo, hi, W, Wq_, gam, g_dtype):
                stop = lo + int(np.searchsorted(SLp[lo:hi], qmax)) if mode == 2 else hi
                G = np.empty((qi.size, tile), g_dtype)
                for c0 in range(lo, stop, tile):
                    c1 = min(stop, c0 + tile)
                    g = G[:, : c1 - c0]
                    np.matmul(Wq_, W[c0 - lo : c1 - lo].T, out=g)
                    K.residual_screen_tile(g, gam, Zq, Sq, Rq, nw_b, ZpT, Sp, Rp, NWp, SLp, c0, variance, kern,
                                           qslot_b, mode, *out, tmp)

            if precise:
                tiles(0, n, sc["W"], W64, 2.0 * gam64, np.float64)
            else:
                tiles(0, nh, sc["W64h"], W64, 2.0 * gam64, np.float64)
                tiles(nh, n, sc["W32"], W64.astype(np.float32), gam32 + gam64, np.float32)
            heap_u[qi], heap_c[qi], heap_n[qi], buf_l[qi], buf_c[qi], buf_n[qi], lost[qi] = out

        # blocks of up to 256 queries (256 x 1024 sgemm blocks: 83 GFLOP/s against 63 at 128), both groups' blocks
        # in one task list: run one group after the other and a thread idles while the other finishes its last block
        tasks = []
        order = np.arange(nq)
        for precise in (True, False):  # the float64 queries' blocks (slower per query) first
            qs = order[hi_q == precise]
            bq = int(min(256, max(8, -(-qs.size // threads))))
            tasks += [(qs[b : b + bq], precise) for b in range(0, qs.size, bq)]
        for_each_block(len(tasks), 1, lambda a, b: [run(*tasks[t]) for t in range(a, b)], threads)
        # positions of the buffered points: the permuted order's back to the stored one
        buf_c[~hi_q] = sc["perm_pos"][buf_c[~hi_q]]
        thr = np.where(heap_n == kk, heap_u[:, 0], np.inf)
        thr = np.maximum(thr, 0.0) * (1.0 + 2.0**-40) + 1e-300  # kernels.tree.screen_threshold
        overflow = (lost < np.inf) & (lost <= thr)  # dropped a point that may be in the answer
        live = np.arange(cap)[None, :] < buf_n[:, None]
        keep = live & (buf_l <= thr[:, None]) & ~overflow[:, None]
        qi, b = np.nonzero(keep)
        out_d, out_i = self._exact_top_k(Q, qi, buf_c[qi, b], pts, nq, k)
        if overflow.any():
            bad = np.flatnonzero(overflow)
            od, oi = self._residual_knn_numpy(Q[bad], qslot[bad], mode, k, pts)
            out_d[bad], out_i[bad] = od, oi
        return out_d, out_i

    def _cover_screen(self) -> tuple:
        """(w32, nw, gam) for the big groups' first-fit centre selection (kernels.tree._first_cover_tile): the
        residual metric's float32 products of every row's w = v / sqrt(p), their norms and the rounding bound's
        factor; for other metrics an off switch (gam = -1)."""
        if self._m.kind != "index":
            return np.zeros((1, 1), np.float32), np.zeros(1), -1.0
        rc = self._m.obj
        d, r = rc.X.shape[1], rc.v.shape[1]
        W = self._data[:, d : d + r]
        return W.astype(np.float32), _w_norms(W), _gam32(r) + _gam64(r)

    def _scan_arrays(self, pts) -> dict:
        """The residual scan's per-point arrays for the points ``pts``, kept until the tree changes: in the stored
        order and in the permuted one (float64 points first), the float32 copy of the products' operand."""
        cache = self._scan_cache
        if cache is not None and np.array_equal(cache["pts"], pts):
            return cache
        rc = self._m.obj
        d = rc.X.shape[1]
        r = rc.v.shape[1]
        F = self._data
        # every row of X in order (a tree fitted on all rows): read the features in place; a copy of the
        # (n, rank) block page-faults in at ~0.5 GB/s on this VM, a third of a 32k-point query batch
        whole = pts.size == F.shape[0] and bool(np.all(pts == np.arange(pts.size)))
        P = F if whole else F[pts]
        W = P[:, d : d + r]  # a view: BLAS takes the row stride
        nw = _w_norms(W)
        gam32, gam64 = _gam32(r), _gam64(r)
        # float32 pairs: bound <= gam32 tau_q tau_c = 0.17 on x (0.1 between two points at tau_c)
        tau_c, tau_q = np.sqrt(_F32_BOUND_POINTS / gam32), np.sqrt(_F32_BOUND_QUERIES / gam32)
        hi = nw > tau_c
        perm = np.concatenate([np.flatnonzero(hi), np.flatnonzero(~hi)])
        nh = int(np.count_nonzero(hi))

        def arrays(rows):
            return (np.ascontiguousarray(P[rows, :d].T), np.ascontiguousarray(P[rows, d + r]),
                    np.ascontiguousarray(P[rows, d + r + 1]), np.ascontiguousarray(nw[rows]), pts[rows])

        self._scan_cache = {
            "pts": pts.copy(), "nh": nh, "tau_q": tau_q, "gam32": gam32, "gam64": gam64, "W": W,
            "W64h": np.ascontiguousarray(W[perm[:nh]]), "W32": W[perm[nh:]].astype(np.float32),
            "orig": arrays(slice(None)), "perm": arrays(perm), "perm_pos": perm}
        return self._scan_cache

    def _exact_top_k(self, Q, qi, ids, pts, nq, k):
        """k best of the candidate pairs (query qi[t], point pts[ids[t]]) by the metric kernel: (distances,
        ids), ties to the lower id."""
        F = self._data
        d = self._m.obj.X.shape[1]
        r = self._m.obj.v.shape[1]
        qrow = Q[:, d + r + 1].astype(np.int64)
        exact = np.empty(qi.size)
        self._m.K.pair_dists(F, qrow[qi], F, pts[ids], self._m.params, exact)
        if not np.all((exact >= 0) & (exact < np.inf)):
            raise _bad_metric("a query")
        o = np.lexsort((ids, exact, qi))
        qi, exact, ids = qi[o], exact[o], ids[o]
        start = np.searchsorted(qi, np.arange(nq))
        rank = np.arange(qi.size) - start[qi]
        keep = rank < k
        out_d = np.full((nq, k), np.inf)
        out_i = np.full((nq, k), -1, np.int64)
        out_d[qi[keep], rank[keep]] = exact[keep]
        out_i[qi[keep], rank[keep]] = ids[keep]
        return out_d, out_i

    @staticmethod
    def _midrange(Q, P, d):
        """The centre of the box around the first ``d`` coordinates of ``Q`` and ``P``, halved before adding: the
        rows minus it stay finite wherever the rows are (a mean overflowed on 300 rows at 1e307, and the NaN
        distances that followed emptied every answer of the fallback scan: a review)."""
        lo = np.minimum(P[:, :d].min(0), Q[:, :d].min(0))
        hi = np.maximum(P[:, :d].max(0), Q[:, :d].max(0))
        return lo * 0.5 + hi * 0.5

    def _residual_margin(self, Q, P):
        """A bound on |BLAS distance - kernel distance| for this metric on rows ``Q`` and ``P``."""
        rc = self._m.obj
        d = rc.X.shape[1]
        r = rc.v.shape[1]
        mu = self._midrange(Q, P, d)
        zmax = float(max(np.einsum("ij,ij->i", P[:, :d] - mu, P[:, :d] - mu).max(),
                         np.einsum("ij,ij->i", Q[:, :d] - mu, Q[:, :d] - mu).max()))
        eps = 2.3e-16
        # ratio >= variance / p_min, the largest factor variance * s_q * s_p on phi, and >= max |w|^2 = |v|^2 / p
        ratio = max(1.0, float(rc.kernel_diag.max()) / float(rc.p_diag.min()))
        # |error(r2)| <= 8 (d + 2) eps max|z|^2 (the expanded form's bound; the direct forms of the fused kernel and
        # of the NumPy fallback are tighter);
        # |d phi / d r2| <= 1 for RBF and Matern 5/2; |error(rho)| <= ratio (2 (rank + 4) eps + error(r2)) per
        # computation; |error(sqrt a)| <= sqrt(|error a|). (The variance is in ratio already: a second factor
        # shrank the margin below the error at small variances.)
        err_rho = ratio * (2.0 * (r + 4) * eps + 8.0 * (d + 2) * eps * zmax)
        return 2.0 * float(np.sqrt(2.0 * err_rho))

    def _residual_knn_numpy(self, Q, qslot, mode, k, pts):
        """The same scan in plain NumPy over (queries x all points) blocks, keeping every candidate within
        ``2 * margin`` of each query's k-th BLAS distance (no buffer to overflow): the fallback of
        :meth:`_residual_knn`, with its arguments and results."""
        rc = self._m.obj
        d = rc.X.shape[1]
        r = rc.v.shape[1]
        slots = pts
        P = self._data[slots]
        mu = self._midrange(Q, P, d)
        Zp = P[:, :d] - mu
        Wp, sp = P[:, d : d + r], P[:, d + r]
        qrow = Q[:, -1].astype(np.int64)
        Zq = Q[:, :d] - mu
        margin = self._residual_margin(Q, P)
        nq, n = Q.shape[0], slots.size
        out_d = np.full((nq, k), np.inf)
        out_i = np.full((nq, k), -1, np.int64)
        B = max(1, min(nq, (1 << 22) // max(n, 1)))
        for q0 in range(0, nq, B):
            q1 = min(nq, q0 + B)
            zq = Zq[q0:q1]
            # squared distances summed as differences, as the metric's kernel does: the expanded form
            # |zq|² + |zp|² - 2 zq·zp overflowed to inf - inf = NaN at scaled coordinates near 1e155 (a lengthscale
            # of 1e-160), and NaN candidates were dropped; a coordinate at a time bounds the block's memory
            r2 = np.zeros((q1 - q0, n))
            with np.errstate(over="ignore"):  # a difference beyond 1e154 squares to inf: the kernel is 0 there
                for t in range(d):
                    r2 += np.square(zq[:, t, None] - Zp[None, :, t])
            rho = rc.kernel.variance * rc.kernel._phi(r2) * (Q[q0:q1, d + r][:, None] * sp[None, :])
            rho -= Q[q0:q1, d : d + r] @ Wp.T
            dist = np.sqrt(np.maximum(1.0 - np.abs(rho), 0.0))
            dist[qrow[q0:q1, None] == slots[None, :]] = 0.0
            if mode == 1:
                dist[qslot[q0:q1, None] == slots[None, :]] = np.inf
            elif mode == 2:
                dist[slots[None, :] >= qslot[q0:q1, None]] = np.inf
            kk = min(k, n)
            kth = np.partition(dist, kk - 1, axis=1)[:, kk - 1]
            qi, cj = np.nonzero((dist <= (kth + 2.0 * margin)[:, None]) & (dist < np.inf))  # inf: excluded
            out_d[q0:q1], out_i[q0:q1] = self._exact_top_k(Q[q0:q1], qi, cj, slots, q1 - q0, k)
        return out_d, out_i

    @with_threads
    def brute_force(self, queries=None, k: int = 1, predecessors: bool | None = None):
        """Brute force with the same metric kernel and tie rule (the reference the tree must match).

        ``queries=None`` means every point in the tree, like :meth:`knn_self` (``predecessors`` as there).
        """
        if self._n == 0:
            raise EmptyIndex("the cover tree is empty")
        k = self._check_k(k, self._n)
        m = self._m
        slots = self._live()
        if queries is None:
            Q = np.ascontiguousarray(self._data[slots])
            qslot, mode = slots, (2 if (predecessors is None or predecessors) else 1)
        elif m.kind == "index":
            rows = self._query_rows(queries)
            Q, qslot, mode = np.ascontiguousarray(self._data[rows]), np.zeros(rows.size, np.int64), 0
        else:
            Q = self._features(queries, "queries")
            qslot, mode = np.zeros(Q.shape[0], np.int64), 0
        out_d = np.empty((Q.shape[0], k))
        out_i = np.empty((Q.shape[0], k), np.int64)
        bad = np.zeros(Q.shape[0], np.bool_)
        m.K.brute_knn(self._data, m.params, Q, qslot, mode, slots, k, out_d, out_i, bad)
        if bad.any():
            raise _bad_metric("brute force")
        return out_d, self._ids_of(out_i)

    # ------------------------------------------------------------------------------------------
    # invariants
    # ------------------------------------------------------------------------------------------

    def check_invariants(self) -> dict:
        """Verify the tree (O(n * depth) distance evaluations; meant for tests). Raises KvantError.

        Nesting: a child's level is below its parent's. Covering: d(parent, child) <= base**(level(child)+1).
        Separation: children of one node at the same level l are more than base**l apart, except exact
        duplicates (distance 0: the same point repeated), which hang off their twin as leaves of one level.
        maxdist(p) bounds the distance from p to every descendant.
        """
        built = self._cover()
        if built:
            self.telemetry_ = {"op": "check_invariants", "cover_build": built}
        live = self._live()
        if live.size != self._n:
            raise KvantError(f"{live.size} slots in the tree but n={self._n}")
        if self._n == 0:
            return {"n": 0}
        roots = live[self._parent[live] < 0]
        if roots.size != 1 or roots[0] != self._root:
            raise KvantError(f"expected exactly one root (id {self._ids_of(np.array([self._root]))[0]}), found ids "
                             f"{self._ids_of(roots).tolist()}")
        kids = live[live != self._root]
        par = self._parent[kids]
        if not np.all(self._in[par]):
            raise KvantError("a node's parent is not in the tree")
        if not np.all(self._level[kids] < self._level[par]):
            raise KvantError("nesting violated: a child's level is not below its parent's")
        d = self._pair(par, kids)
        if not np.all(d <= K.radii(self._lbase, self._level[kids].astype(np.int64) + 1)):
            raise KvantError("covering violated")
        if not np.array_equal(d, self._pd[kids]):
            raise KvantError("stored parent distances are stale")
        # separation among siblings of the same level
        key = np.lexsort((self._level[kids], par))
        ks, ps, ls = kids[key], par[key], self._level[kids][key]
        starts = np.flatnonzero(np.r_[True, (ps[1:] != ps[:-1]) | (ls[1:] != ls[:-1])])
        ends = np.r_[starts[1:], ks.size]
        slack = self._slack()[1]
        for s, e in zip(starts, ends, strict=True):
            if e - s > 1:
                grp = ks[s:e]
                # copies of one point (identical rows) are siblings of one level: one of them stands for the rest,
                # which must be at distance 0 (up to the slack) from it (a pair test of 200,000 copies needed 37 GiB)
                _, first, inv = np.unique(self._data[grp], axis=0, return_index=True, return_inverse=True)
                rep = grp[first]
                if rep.size < grp.size and not np.all(self._pair(rep[inv.ravel()], grp) <= slack):
                    raise KvantError(f"copies of one point among the children of id {self._ids_of(ps[s : s + 1])[0]} "
                                     "are not at distance 0")
                radius = K.radius(self._lbase, int(ls[s]))
                step = max(1, (1 << 22) // rep.size)  # pairs (i, j > i) for a block of i: bounded memory
                for i0 in range(0, rep.size - 1, step):
                    a, b = np.meshgrid(np.arange(i0, min(i0 + step, rep.size)), np.arange(i0 + 1, rep.size),
                                       indexing="ij")
                    upper = b > a
                    dd = self._pair(rep[a[upper]], rep[b[upper]])
                    # duplicates: distance 0 up to the metric's rounding slack (angular's arccos gives ~1e-8)
                    if not np.all((dd > radius) | (dd <= slack)):
                        raise KvantError(f"separation violated among children of id {self._ids_of(ps[s : s + 1])[0]} "
                                         f"at level {ls[s]}")
        if not _maxdist_bounds_subtrees(self._pair, self._parent, self._maxdist, kids):
            raise KvantError("maxdist is not an upper bound on a subtree's radius")
        # CSR consistent with parents
        off, idx, _, _ = K.build_csr(self._parent, self._level, self._in)
        if not (np.array_equal(off, self._off) and np.array_equal(np.sort(idx), np.sort(self._idx))):
            raise KvantError("query structure out of date")
        return {"n": self._n, "height": int(self._height), "root_level": int(self._level[self._root])}

    def _identity_error(self, slots) -> float:
        """For a callable metric, its rounding error as the points ``slots`` show it: the largest of d(x, x),
        d(x, x·(1 + 2⁻⁵²)) and d(x, x one ulp up) over up to 256 of them (evenly spaced), where the true distance is 0
        or nearly. Formulas like arccos(a·b/|a||b|) are off by ~1e-8 absolute there, which broke the triangle
        inequality beyond a slack relative to the data's spread on near-duplicate directions (a review). A value
        above _SELF_ERROR_MAX is taken for a genuine distance (a Hamming metric's 1), not rounding. 0 for other
        metrics."""
        if self._m.kind != "callable" or len(slots) == 0:
            return 0.0
        s = np.asarray(slots, np.int64)
        rows = self._data[s[:: max(1, s.size // 256)][:256]]
        near = np.concatenate([rows, rows * (1.0 + 2.0**-52), np.nextafter(rows, np.inf)])
        b = rows.shape[0]
        a = np.tile(np.arange(b, dtype=np.int64), 3)
        out = np.empty(3 * b)
        self._m.K.pair_dists(near, a, near, np.arange(3 * b, dtype=np.int64), self._m.params, out)
        out = out[np.isfinite(out) & (out <= _SELF_ERROR_MAX)]
        return float(out.max()) if out.size else 0.0

    def _pair(self, a, b) -> np.ndarray:
        out = np.empty(len(a))
        self._m.K.pair_dists(self._data, np.asarray(a, np.int64), self._data, np.asarray(b, np.int64),
                     self._m.params, out)
        return out

    # ------------------------------------------------------------------------------------------
    # persistence
    # ------------------------------------------------------------------------------------------

    def save(self, path) -> None:
        """Save with :mod:`kvant.persist`. Trees with a user callable metric cannot be saved."""
        m = self._m
        if not m.persistable:
            raise InvalidInput("a CoverTree with a user-supplied callable metric cannot be saved (the function "
                               "is code, and kvant files hold no code); rebuild it from the points instead")
        built = self._cover()  # (the file holds the tree's links)
        if built:
            self.telemetry_ = {"op": "save", "cover_build": built}
        # the file holds ids (a parent as its id too): slots are the process's layout, and a load compacts
        live = self._live()
        meta = {"metric": m.obj.spec() if m.kind == "index" else {"name": m.name}, "n": self._n,
                "root": int(self._ids_of(np.array([self._root]))[0]), "next_id": self._next_id, "base": self.base,
                "level_base": self._lbase, "dim": self._dim,
                # ids lie below cap (the residual metric's: rows of its X)
                "cap": int(self._in.shape[0]) if m.kind == "index" else self._next_id,
                # the query settings, and the probe's choice (it stands until the next fit; a review found a kd=False
                # tree answering through the kd-tree after a load)
                "kd": self.kd, "residual_scan": self.residual_scan, "kd_choice": self._kd_choice}
        arrays = {"ids": self._ids_of(live), "parent": self._ids_of(self._parent[live]), "level": self._level[live],
                  "maxdist": self._maxdist[live]}
        if m.kind == "index":
            rc = m.obj
            arrays.update(rc_X=rc.X, rc_v=rc.v, rc_p=rc.p_diag, rc_kd=rc.kernel_diag)
        else:
            arrays["data"] = self._data[live]
        persist.write(path, "CoverTree", meta, arrays)

    @classmethod
    def _from_persist(cls, meta, arrays):
        try:
            metric = spec_to_metric(meta["metric"], arrays)
            n, root, cap = int(meta["n"]), int(meta["root"]), int(meta["cap"])
            next_id = int(meta["next_id"])
            dim = meta["dim"]
            ids, par, lev, md = arrays["ids"], arrays["parent"], arrays["level"], arrays["maxdist"]
        except (KeyError, TypeError, ValueError, InvalidInput) as exc:
            raise PersistError(f"CoverTree file has an invalid header or arrays: {exc}") from exc
        try:
            given = meta.get("base", 0.0)
            tree = cls(metric, base=None if given is None else float(given),
                       residual_scan=meta.get("residual_scan", True), kd=meta.get("kd"))
            tree._lbase = float(meta["level_base"]) if "level_base" in meta else tree._lbase
            if not MIN_BASE <= tree._lbase <= 16.0:
                raise InvalidInput(f"level base {tree._lbase!r} outside [{MIN_BASE}, 16]")
            kd_choice = meta.get("kd_choice")
            if kd_choice is not None and not isinstance(kd_choice, bool):
                raise InvalidInput(f"kd_choice must be null or a bool, got {kd_choice!r}")
        except (TypeError, ValueError, InvalidInput) as exc:
            raise PersistError(f"CoverTree file has an invalid header: {exc}") from exc
        if ids.shape != (n,) or par.shape != (n,) or lev.shape != (n,) or md.shape != (n,):
            raise PersistError("CoverTree file: tree arrays do not match n")
        if ids.dtype != np.int64 or par.dtype != np.int64 or lev.dtype != np.int32 or md.dtype != np.float64:
            raise PersistError("CoverTree file: tree arrays have unexpected dtypes")
        if n and (np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= cap):
            raise PersistError("CoverTree file: ids are not sorted, unique and within capacity")
        if tree._m.kind == "index":
            if cap != tree._m.obj.n:
                raise PersistError("CoverTree file: capacity does not match the metric's X")
        elif dim is None:  # saved before any point was added: nothing to restore but the settings
            if n or next_id or arrays.get("data") is None or arrays["data"].size:
                raise PersistError("CoverTree file: no dimension recorded for a tree that holds points")
        else:
            data = arrays.get("data")
            if (not isinstance(dim, int) or dim < 1 or data is None or data.shape != (n, dim)
                    or data.dtype != np.float64 or not np.all(np.isfinite(data))):
                raise PersistError("CoverTree file: data array is missing or inconsistent")
            if next_id < 0 or next_id > _MAX_ID or cap < next_id or (n and next_id <= ids[-1]):
                raise PersistError("CoverTree file: next id is inconsistent")
            tree._data, tree._dim = np.array(data, np.float64, order="C"), int(dim)
        if not np.all(np.isfinite(md)) or np.any(md < 0):
            raise PersistError("CoverTree file: maxdist must be finite and >= 0")
        if tree._m.kind == "index":  # a point's slot is its row
            slots, par_s, root_s = ids, par, root
        else:  # the points fill slots 0..n-1 in id order (_compact's layout)
            cap = n
            slots = np.arange(n, dtype=np.int64)
            links = np.r_[par, root]  # ids (-1: the root's parent, or an empty tree's root)
            at = np.minimum(np.searchsorted(ids, links), max(n - 1, 0))
            found = ids[at] == links if n else np.zeros(links.size, np.bool_)
            mapped = np.where(links == -1, -1, np.where(found, at, -2))  # (-2: an id not in the file, caught below)
            par_s, root_s = mapped[:-1], int(mapped[-1])
            tree._next_slot = n
            tree._sid = None if n == next_id else ids.copy()
        parent = np.full(cap, -1, np.int64)
        level = np.zeros(cap, np.int32)
        maxdist = np.zeros(cap)
        in_tree = np.zeros(cap, np.bool_)
        parent[slots], level[slots], maxdist[slots], in_tree[slots] = par_s, lev, md, True
        root = root_s
        if n:
            if not (0 <= root < cap and in_tree[root] and parent[root] == -1):
                raise PersistError("CoverTree file: bad root")
            kids = slots[slots != root]
            pk = parent[kids]
            if np.any(pk < 0) or np.any(pk >= cap) or not np.all(in_tree[pk]) or np.any(level[kids] >= level[pk]):
                raise PersistError("CoverTree file: parent links are inconsistent (dangling parent or level order)")
        pd = np.zeros(cap)
        if n:
            kids = slots[slots != root]
            d = tree._pair(parent[kids], kids)
            cover = K.radii(tree._lbase, level[kids].astype(np.int64) + 1)
            if not (np.all(d <= cover) and np.all(d <= maxdist[parent[kids]])):
                raise PersistError("CoverTree file: covering invariant fails (corrupted distances or links)")
            # queries prune with maxdist: an understated one would silently drop neighbours
            if not _maxdist_bounds_subtrees(tree._pair, parent, maxdist, kids):
                raise PersistError("CoverTree file: maxdist understates a subtree's radius (corrupted file)")
            pd[kids] = d
        tree._set_state(_State(parent, level, maxdist, pd, in_tree))
        tree._root, tree._n, tree._next_id = (root if n else -1), n, next_id
        tree._self_error = tree._identity_error(slots)
        tree._kd_choice = kd_choice
        tree._freeze()
        return tree


def _maxdist_bounds_subtrees(pair, parent, maxdist, kids) -> bool:
    """Whether maxdist(a) >= d(a, c) for every node c in ``kids`` and each of its ancestors a: one vectorised
    step up the tree at a time (O(n * depth) distances, as many steps as the tree is deep)."""
    desc = np.asarray(kids, np.int64)
    anc = parent[desc]
    while desc.size:
        if not np.all(pair(anc, desc) <= maxdist[anc]):
            return False
        anc = parent[anc]
        up = anc >= 0
        desc, anc = desc[up], anc[up]
    return True


persist.register("CoverTree")(CoverTree)
