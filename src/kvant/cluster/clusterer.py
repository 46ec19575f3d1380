"""``kvant.Clusterer``: the public k-means estimator.

Every concrete algorithm has the same three phases, timed in ``timings_``:

1. **train** on a sample of about ``sample_per_centroid · k`` rows (``auto``: at least N/64 rows unless the caller
   sets ``sample_per_centroid``; all rows when N is smaller): by
   default a lightweight coreset (rows drawn ∝ ½ uniform + ½ squared distance from the data's centre,
   weighted so the sample's objective is an unbiased estimate of the full one; :mod:`.sampling`), or a
   uniform sample as FAISS draws it (``sampling="uniform"``). Seeding (k-means++ or random rows) and
   weighted Lloyd iterations with Hamerly bounds run until the relative improvement drops below ``tol``
   or ``max_iter`` is reached;
2. **polish** (in-memory inputs): ``polish_iter`` more Lloyd iterations on *all* rows, cheap because
   Hamerly bounds skip rows whose assignment cannot change;
3. **assign** every row of the input to its nearest centre. ``labels_`` and ``inertia_`` always come
   from this full assignment, never from the sample.

``minibatch`` replaces 1-2 with streaming mini-batch updates (Sculley 2010) over chunks read from the
source, its last pass one full Lloyd step, so its memory is bounded by ``batch_rows`` whatever N is;
clusters its assignment leaves empty are re-seeded with far rows and the rows assigned again
(``_fill_empty_clusters``).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import numpy as np

from .. import persist
from .._config import check_seed, get_num_threads, with_threads
from .._numerics import condition, conditioning, uncondition
from ..errors import DimensionMismatch, EmptyClusterWarning, EmptyIndex, InvalidInput, PersistError, warn
from ..io import ArraySource, VectorSource, as_source, check_finite
from ..kernels.assign import certify_top2, label_margins
from ..kernels.distance import sq_norms64_serial, sq_norms_serial
from ..kernels.lloyd import UNIT_WEIGHTS, cluster_sums, exact_sq_dist_rows, exact_sq_dist_rows_scaled
from .assign import (
    CertifiedCentres,
    annulus_centres,
    assign_certified,
    assign_top2,
    certified_e_step_may_apply,
    scales_unit_rows,
)
from .auto import DEFAULT_SAMPLE_PER_CENTROID, choose_algorithm, memory_budget_bytes
from .lloyd import _normalise, init_centroids, lloyd, normalise_rows
from .minibatch import minibatch_kmeans
from .neighbours import NeighbourFinal
from .reseed import distinct_far_rows, merge_distinct_far_rows, reseed_picks
from .sampling import (
    CENTRE_ROWS,
    NEAR_UNIFORM,
    SAMPLINGS,
    coreset_inclusion,
    gather_array_rows,
    gather_rows,
    poisson_sample,
    sq_distances,
    unit_proposal_ratio,
)

ALGORITHMS = ("dense-exact-row", "dense-exact-random", "dense-exact-nredo", "minibatch")
METRICS = ("l2", "cos")
# The final assignment by the centres' neighbour lists where rows have 1-3 coordinates and K is large
# (kvant.cluster.neighbours.NeighbourFinal).
NEIGHBOUR_FINAL = True


def available_algorithms() -> list[str]:
    """Concrete algorithm names accepted by :class:`Clusterer`, plus ``"auto"``."""
    return ["auto", *ALGORITHMS]


def available_metrics() -> list[str]:
    """Metric names accepted by :class:`Clusterer`."""
    return list(METRICS)


class Clusterer:
    """k-means clustering of any kvant vector source, exact or streaming.

    Parameters
    ----------
    k : number of clusters (required, 1 <= k <= N).
    metric : ``"l2"`` (squared Euclidean; quality = MSE per row) or ``"cos"`` (spherical k-means on
        unit-normalised rows; quality = mean cosine to the assigned centre).
    algorithm : ``"auto"`` or one of :func:`available_algorithms`. ``auto`` follows the static rule in
        ``docs/auto.md``; the choice is in ``algorithm_`` and the reason in ``auto_reason_``.
    seed : seed for sampling and initialisation. Same seed + same thread count -> same labels.
    max_iter : at most this many Lloyd iterations on the training sample (``None``, the default: 25, FAISS's
        niter, for the concrete algorithms; ``auto`` sets its own, see docs/auto.md).
    tol : stop when an iteration improves the objective by less than this fraction of the quality measure:
        of the sum of squared distances for ``l2``; for ``cos`` of the smaller of the sums of cosines and of
        (1 − cosine) (default 1e-4 for the concrete algorithms; ``auto`` picks its own, see docs/auto.md).
    sample_per_centroid : training-sample rows per centre. ``None`` (default): 256 (FAISS's
        max_points_per_centroid), and under ``auto`` at least N/64 rows (at most 16384·K), which costs about a
        quarter of a pass over the data and cuts the centres' sampling error (docs/auto.md, "Training-sample size"). A
        number is taken as given. ``sample_rows_`` is the size of the sample trained on.
    sampling : how the training sample is drawn: ``"coreset"`` (default; a weighted lightweight coreset,
        one extra pass over the rows, robust to far outliers) or ``"uniform"`` (distinct rows uniformly at
        random, as FAISS does). Falls back to uniform if the coreset comes out with fewer than k rows, and for
        ``cos`` draws a uniform sample without the distance pass when the unit rows spread so evenly (the mean of
        4,096 sampled unit rows has norm at most 0.0456) that the coreset's proposal is provably within 1.1× of
        uniform (``sampling_`` and ``auto_reason_`` say so; :mod:`kvant.cluster.sampling`).
    Seeding: the concrete algorithms seed with k-means++ on 8·K rows (``dense-exact-random``: K random rows);
    ``auto`` with greedy k-means++ (2 + ln K draws per centre) where that costs little, on at least 16·K rows when
    those cost under half a training E-step, else k-means++ or random rows by a cost budget (docs/auto.md,
    "Seeding"; ``auto_reason_`` says which ran).
    polish_iter : Lloyd iterations on all rows after training (in-memory inputs; default 0, ``auto`` sets it;
        over-relaxed as training is). When the training sample already was every row they are simply more
        iterations; ``polish_iter_`` is what ran (0 for streamed inputs and ``minibatch``).
    overrelax : β_max of the safeguarded over-relaxation of Lloyd's steps (see :mod:`kvant.cluster.lloyd`):
        0 is classic Lloyd; ``None`` (default) means 0 for the concrete algorithms and 1.0 for ``auto``
        (docs/auto.md has the measurements). Finite, >= 0.
    n_redo : restarts for ``dense-exact-nredo`` (default 3; seeds seed, seed+1, ...; the lowest training objective
        wins).
    batch_rows : rows per mini-batch for ``minibatch`` (default 65,536; bounds its memory).
    max_epochs : training passes over the data for ``minibatch`` (default 3): with two or more, the last is one full
        Lloyd step (each centre to the mean of its rows; it lowered the MSE more than another epoch in all 16 cases
        measured) and the others mini-batch epochs, which stop early when the objective improves by less than ``tol``.
        The final assignment is one more pass (and each round of re-seeding clusters it leaves empty two more:
        ``_fill_empty_clusters``).
    init : ``None`` (default: the algorithm's seeding, above) or the initial centres, an array of shape (k, dim) —
        a warm start, e.g. from an earlier fit's ``cluster_centers_`` (FAISS's ``init_centroids``, scikit-learn's
        ``init=array``). Copied as float32 at ``fit`` (finite; for ``cos`` non-zero rows, normalised), for every
        algorithm; ``dense-exact-nredo`` then runs once, as its restarts would all start there.

    Fitted attributes: ``labels_``, ``cluster_centers_``, ``inertia_`` (the objective over all rows, from the final
    assignment: Σ‖x − c‖² for ``l2``; Σ(1 − cos(x, c)) for ``cos``), ``mse_`` (l2) or ``mean_cosine_`` (cos),
    ``n_iter_`` (Lloyd iterations; for ``minibatch``, mini-batch steps and its finishing step), ``inertia_history_``
    (the training objective per iteration; for ``minibatch``, per pass); the settings actually used: ``algorithm_``,
    ``auto_reason_``, ``max_iter_``, ``overrelax_``, ``polish_iter_``, ``sample_rows_`` (rows of the training sample;
    0 for ``minibatch``), ``sampling_`` (how it was drawn: ``"all rows"``, ``"coreset"`` or ``"uniform"``; None for
    ``minibatch``), ``threads_``; and ``timings_`` (seconds per phase).

    Example
    -------
    >>> import numpy as np, kvant
    >>> x = np.random.default_rng(0).standard_normal((1000, 8)).astype("float32")
    >>> c = kvant.Clusterer(k=4, metric="l2", seed=0)
    >>> labels = c.fit_transform(x)
    >>> labels.shape, c.cluster_centers_.shape
    ((1000,), (4, 8))
    """

    def __init__(
        self,
        k: int,
        metric: str = "l2",
        algorithm: str = "auto",
        seed: int | None = 0,
        *,
        max_iter: int | None = None,
        tol: float | None = None,
        sample_per_centroid: int | None = None,
        sampling: str = "coreset",
        polish_iter: int | None = None,
        overrelax: float | None = None,
        n_redo: int = 3,
        batch_rows: int = 65536,
        max_epochs: int = 3,
        init=None,
    ):
        self.k = k
        self.metric = metric
        self.algorithm = algorithm
        self.seed = seed
        self.max_iter = max_iter
        self.tol = tol
        self.sample_per_centroid = sample_per_centroid
        self.sampling = sampling
        self.polish_iter = polish_iter
        self.overrelax = overrelax
        self.n_redo = n_redo
        self.batch_rows = batch_rows
        self.max_epochs = max_epochs
        self.init = init

    # ------------------------------------------------------------------------------------------
    def _check_settings(self, n: int | None = None) -> None:
        def positive_int(name, value, minimum=1):
            # (the compiled loops take int64: 2**63 raised OverflowError or a Numba typing error)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or not minimum <= value <= 2**62:
                raise InvalidInput(f"{name} must be an integer in [{minimum}, 2**62], got {value!r}")

        positive_int("k", self.k)
        if self.metric not in METRICS:
            raise InvalidInput(f"unknown metric {self.metric!r}; valid metrics: {', '.join(METRICS)}")
        if self.algorithm not in available_algorithms():
            raise InvalidInput(
                f"unknown algorithm {self.algorithm!r}; valid algorithms: {', '.join(available_algorithms())}"
            )
        check_seed(self.seed)
        if self.sampling not in SAMPLINGS:
            raise InvalidInput(f"unknown sampling {self.sampling!r}; valid: {', '.join(SAMPLINGS)}")
        if self.max_iter is not None:
            positive_int("max_iter", self.max_iter)
        if self.sample_per_centroid is not None:
            positive_int("sample_per_centroid", self.sample_per_centroid)
        positive_int("n_redo", self.n_redo)
        positive_int("batch_rows", self.batch_rows)
        positive_int("max_epochs", self.max_epochs)
        if self.polish_iter is not None:
            positive_int("polish_iter", self.polish_iter, 0)
        for name in ("tol", "overrelax"):
            value = getattr(self, name)
            number = isinstance(value, int | float | np.integer | np.floating)
            ok = number and not isinstance(value, bool | np.bool_) and np.isfinite(value)
            if value is not None and (not ok or value < 0):
                raise InvalidInput(f"{name} must be a finite number >= 0, got {value!r}")
        if n is not None and self.k > n:
            raise InvalidInput(f"k={self.k} is larger than the number of rows ({n}); k must be <= N")
        if self.init is not None:
            self._initial_centres(None)

    def _initial_centres(self, dim: int | None, unit: bool = True) -> np.ndarray | None:
        """``init`` as a fresh float32 (k, dim) array (``dim`` None: not checked; for ``cos`` unit-normalised unless
        ``unit`` is False), or None; InvalidInput when it is not one: a string, not real numbers, another shape,
        NaN/inf or values beyond float32, a zero row under ``cos``."""
        if self.init is None:
            return None
        if isinstance(self.init, str | bytes):
            raise InvalidInput(f"init must be None or an array of initial centres, shape (k, dim), got {self.init!r} "
                               f"(the seeding follows the algorithm: dense-exact-row k-means++, dense-exact-random "
                               f"random rows)")
        try:
            given = np.asarray(self.init)
            if given.dtype.kind not in "fiu":  # (complex values would lose their imaginary part, bools are no data)
                raise TypeError(f"values must be real numbers, got dtype {given.dtype}")
            c = np.array(given, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"init must be an array of initial centres, shape (k, dim): {exc}") from None
        k = int(self.k)
        if c.ndim != 2 or c.shape[0] != k or c.shape[1] < 1 or (dim is not None and c.shape[1] != dim):
            want = f"({k}, {dim})" if dim is not None else f"({k}, dim)"
            raise InvalidInput(f"init has shape {c.shape}; the initial centres must have shape {want}")
        with np.errstate(over="ignore"):
            c32 = c.astype(np.float32)
        if not np.isfinite(c32).all():
            raise InvalidInput("init contains NaN or inf (or values beyond float32)")
        if self.metric == "cos":
            zero = ~c32.any(axis=1)
            if zero.any():
                raise InvalidInput(f"init row {int(np.argmax(zero))} is zero: no direction for cos")
            if unit:
                c32 = _normalise(c32)
        return np.ascontiguousarray(c32)

    # ------------------------------------------------------------------------------------------
    @with_threads
    def fit(self, x, column: str | None = None, progress=None) -> Clusterer:
        """Cluster ``x`` (anything :func:`kvant.as_source` accepts). Returns self.

        ``progress(phase, amount)``, if given, is called as work completes: ``("train", 1)`` per Lloyd
        iteration, ``("minibatch", rows)`` per mini-batch and per block of mini-batch's finishing Lloyd step (its last
        pass), ``("assign", rows)`` per block of the final assignment (N rows in all: the passes that re-seed
        clusters a mini-batch fit leaves empty do not report).
        """
        if progress is not None and not callable(progress):
            raise InvalidInput(f"progress must be a callable progress(phase, amount) or None, got {progress!r}")
        report = progress or (lambda phase, amount: None)
        self._check_settings()
        src = as_source(x, column=column, validate=False)  # an array is checked below, in the first pass over it
        with _zero_rows_named(src):
            return self._fit_source(src, report)

    def _lloyd_only_settings(self, polish: bool) -> list[str]:
        """The caller's settings only the Lloyd algorithms read, as ``name=value`` (minibatch would ignore them)."""
        names = ("max_iter", "polish_iter", "overrelax") if polish else ("max_iter", "overrelax")
        found = [f"{name}={getattr(self, name)!r}" for name in names
                 if getattr(self, name) is not None and (name == "max_iter" or getattr(self, name) != 0)]
        # the training sample's settings too (minibatch draws none); coreset is the default, so only uniform shows
        found += [f"{name}={getattr(self, name)!r}" for name, default in
                  (("sample_per_centroid", DEFAULT_SAMPLE_PER_CENTROID), ("sampling", "coreset"))
                  if getattr(self, name) not in (None, default)]  # the defaults, spelt out, are fine
        return found

    def _fit_source(self, src: VectorSource, report) -> Clusterer:
        """:meth:`fit` from its validated settings and source."""
        self._check_settings(src.n)
        given = self._initial_centres(src.dim)  # (None: the algorithm seeds)
        spherical = self.metric == "cos"
        # plain ints: NumPy integer settings (uint8, int16, ...) would overflow in k * sample_per_centroid, seed + r
        k, seed0, batch_rows = int(self.k), check_seed(self.seed), int(self.batch_rows)
        max_epochs, n_redo = int(self.max_epochs), int(self.n_redo)
        per_centre = None if self.sample_per_centroid is None else int(self.sample_per_centroid)
        if self.algorithm == "auto":
            choice = choose_algorithm(src.n, src.dim, k, self.metric, src.nbytes, self.sampling, per_centre)
            algorithm, params, reason = choice.algorithm, choice.params, choice.reason
            lloyd_only = self._lloyd_only_settings(polish=False)  # (polish_iter is reported as 0 for streamed inputs)
            if algorithm == "minibatch" and lloyd_only:  # they would be silently ignored (a review found the CLI
                # exiting 0 with --max-iter 3 --overrelax 0.3 dropped)
                raise InvalidInput(f"{', '.join(lloyd_only)}: these settings apply to the Lloyd algorithms only, and "
                                   f"auto chose minibatch for this input ({reason}); name a Lloyd algorithm "
                                   f"(algorithm='dense-exact-row') or drop them (minibatch is controlled by batch_rows "
                                   f"and max_epochs)")
        else:
            algorithm, params, reason = self.algorithm, {}, "chosen by the caller"
            lloyd_only = self._lloyd_only_settings(polish=True)
            if algorithm == "minibatch" and lloyd_only:  # they would be silently ignored
                raise InvalidInput(f"{', '.join(lloyd_only)}: these settings apply to the Lloyd algorithms only; "
                                   f"minibatch is controlled by batch_rows and max_epochs")
        if algorithm == "minibatch" and self.algorithm == "auto":
            reason += "; max_iter, polish_iter, overrelax, sampling and sample_per_centroid do not apply to it"
            batch_rows = min(batch_rows, params.get("batch_rows", batch_rows))  # batches within the memory budget
        polish = params.get("polish_iter", 0) if self.polish_iter is None else self.polish_iter
        tol = params.get("tol", 1e-4) if self.tol is None else float(self.tol)
        max_iter = params.get("max_iter", 25) if self.max_iter is None else int(self.max_iter)
        overrelax = params.get("overrelax", 0.0) if self.overrelax is None else float(self.overrelax)
        named = [f"{name}={getattr(self, name)!r}" for name in ("max_iter", "overrelax", "tol", "polish_iter")
                 if name in params and getattr(self, name) is not None]
        if named:  # the reason describes what ran, not only the rule
            reason += f"; given by the caller: {', '.join(named)}"
        if given is not None:
            reason += "; but the initial centres were given by the caller (init=), so the seeding above did not run"
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        m = int(params.get("sample_rows", k * (per_centre or DEFAULT_SAMPLE_PER_CENTROID)))  # (None or >= 1)
        sampling, centre = self.sampling, None
        wants_coreset = algorithm != "minibatch" and sampling == "coreset" and m < src.n
        plain_f32 = isinstance(src, ArraySource) and src.array.dtype == np.float32 and src.array.flags.c_contiguous
        if wants_coreset and plain_f32:  # (other sources: after validation, below)
            # the proposal's centre; for cos it also bounds how far the proposal can be from uniform
            centre = _proposal_centre(src, src.array, seed0, spherical)
            sampling, reason = _unit_rows_near_uniform(centre, spherical, sampling, reason)
        # A coreset of an array reads every row once for the sampling distances; that pass also checks the
        # rows for NaN/inf (and zero rows for cos), so the data is read once before training instead of twice.
        fuse = wants_coreset and sampling == "coreset" and plain_f32
        # Otherwise, when training reads only a sample of an in-memory float32 array (gathered rows are checked as
        # they are read), the final assignment is the first pass over all rows: it checks each block for NaN/inf
        # while the block is in cache (for free in the fused kernel) instead of a separate pass first: uniform-sample
        # fits at K = 10 took 0.72-0.84x the time (Fashion-MNIST, 200k×384 l2, 1M×128 cos; same-process A/B).
        defer = not fuse and algorithm != "minibatch" and polish == 0 and m < src.n and plain_f32 and src.in_memory
        d2 = None
        if fuse:
            d2 = _coreset_distances(src, src.array, centre, spherical)
            src.mark_validated()
        elif isinstance(src, ArraySource) and src.in_memory and not defer:
            src.validate()
        # None when the source must be streamed; minibatch always streams to keep its memory bound.
        full = None if algorithm == "minibatch" else _in_memory_rows(src, validate=not defer, load=True)
        # cos: rows are unit-normalised block by block as they are read (no second copy of the input), except
        # when Lloyd must run over every row (all rows are the sample, or polish passes): then one unit copy.
        unit = spherical and full is not None and (m >= src.n or polish > 0)
        raw = full  # the final assignment reads these (predict's rows), not the unit copy
        if unit:
            full = normalise_rows(full)
        norm = spherical and not unit  # rows read from `full` or `src` still need normalising
        if wants_coreset and centre is None:
            centre = _proposal_centre(src, full, seed0, norm)  # (``full`` may be the unit copy already)
            sampling, reason = _unit_rows_near_uniform(centre, spherical, sampling, reason)
        timings["load"] = time.perf_counter() - t0

        if algorithm == "minibatch":
            t = time.perf_counter()
            mb = minibatch_kmeans(
                src, k, spherical, seed0, batch_rows, max_epochs, tol,
                on_batch=lambda rows: report("minibatch", rows), init=given,
            )
            centroids, history, n_iter = mb.centroids, mb.objective_history, mb.n_iter
            timings["train"] = time.perf_counter() - t
        else:
            t = time.perf_counter()
            sample, weights = _training_sample(src, full, m, seed0, norm, sampling, k, d2, centre)
            sample_rows = sample.shape[0]
            sampling_used = "all rows" if m >= src.n else "coreset" if weights is not None else "uniform"
            if sampling == "coreset" and sampling_used == "uniform":  # _training_sample's fallback
                reason += f"; the coreset drew fewer than k={k} rows, so a uniform {sample_rows}-row sample was used"
            every_row = sample is full and weights is None  # all rows, in order (m >= N)
            scale = 1.0 if weights is not None else src.n / sample_rows  # weights already sum to ~N
            # l2 trains on (x − shift)·cscale when the data has a large common offset or an extreme magnitude
            shift, cscale = (None, None) if spherical else conditioning(sample)
            sample = condition(sample, shift, cscale)
            init = "random" if algorithm == "dense-exact-random" else params.get("init", "k-means++")
            restarts = n_redo if algorithm == "dense-exact-nredo" and given is None else 1
            # Lloyd's last E-step can stand as the final assignment when it trained on every row as predict sees them
            # (float32 top-2, certified below; or a certified backend's exact labels, l2 only: for cos that E-step saw
            # the unit copy, not predict's scaled rows)
            keep_top2 = every_row and shift is None and cscale is None and polish == 0 and not (
                spherical and certified_e_step_may_apply(sample.shape[0], sample.shape[1], k))
            best = None
            for r in range(restarts):
                seed = None if seed0 is None else seed0 + r
                c0 = condition(given, shift, cscale) if given is not None else init_centroids(
                    sample, k, init, seed, spherical, weights, params.get("seed_rows"),
                    int(params.get("init_trials", 1)))
                # (Lloyd's labels serve only as that final assignment: otherwise its E-step after the last M-step,
                # which changes no centre, is skipped — one of up to 16 on a sample)
                res = lloyd(sample, c0, max_iter, tol, spherical, on_iter=lambda obj: report("train", 1),
                            weights=weights, overrelax=overrelax, candidates=int(params.get("candidates", 0)),
                            keep_top2=keep_top2, last_e_step=keep_top2)
                # the minimum: an over-relaxed run's last entry may be a rejected step (see lloyd)
                if best is None or min(res.objective_history) < min(best.objective_history):
                    best = res
            centroids = uncondition(best.centroids, shift, cscale)
            # Lloyd trained on every row and its last E-step assigned them all to these centroids (the compiled
            # loop's): its labels, made exact by certify_top2 (labels_ must be predict's exact nearest centres; its
            # float32 labels alone were one rounding off on 121 of 6,000 grid rows in a review), replace the final
            # assignment. Conditioned rows are excluded: their float32 labels certify the conditioned problem.
            # cos: Lloyd ran on a float32 unit copy, and certifying its labels on that copy (a review: 1-4 rows per
            # fit on offset data labelled with a centre 1e-13 farther than another; predict was right) is not
            # predict's definition; they are certified against the raw rows scaled by 1/‖x‖, as predict's are,
            # when every row's squared norm is in the range where predict scales rather than copies.
            # ... unless the final pass would take the centres' neighbour lists (they paid in training; 1-3
            # coordinates): certifying float32 labels fails for most rows where centres are dense on a line or a
            # circle (500k × 1 rows, K = 2,048: 1.6 s of float64 re-computation against ~30 ms on the lists)
            lists_final = (polish == 0 and _final_lists(best, src.n, centroids)
                           and NeighbourFinal.applies(src.n, sample.shape[1], k, spherical))
            reused = (every_row and shift is None and cscale is None and best.last_d1 is not None and polish == 0
                      and not lists_final and (not unit or scales_unit_rows(sq_norms_serial(raw))))
            # ... or its labels are exact already (a certified backend's E-step; l2 only: for cos it saw the unit copy)
            reused_certified = (every_row and shift is None and cscale is None and best.labels_certified
                                and polish == 0 and not spherical and not lists_final)
            scale /= 1.0 if cscale is None else cscale * cscale
            history = [h * scale for h in best.objective_history]
            n_iter = best.n_iter
            timings["train"] = time.perf_counter() - t
            if polish > 0 and full is not None:  # also when the sample was every row: then they are more iterations
                t = time.perf_counter()
                # the data's conditioning (centroids alone give no scale when K = 1); offset-dominated data is
                # polished on a conditioned copy of the rows
                shift, cscale = (None, None) if spherical else conditioning(full)
                # (no E-step after the last M-step: the final assignment below is that E-step)
                res = lloyd(condition(full, shift, cscale), condition(centroids, shift, cscale), polish, tol,
                            spherical, on_iter=lambda obj: report("train", 1), overrelax=overrelax, last_e_step=False)
                centroids = uncondition(res.centroids, shift, cscale)
                unscale = 1.0 if cscale is None else 1.0 / (cscale * cscale)
                history += [h * unscale for h in res.objective_history]
                n_iter += res.n_iter
                timings["polish"] = time.perf_counter() - t

        t = time.perf_counter()
        rows = batch_rows if algorithm == "minibatch" else None  # minibatch keeps its memory bound here too
        if algorithm != "minibatch" and reused:
            labels, inertia = _exact_from_last_e_step(raw, centroids, best, spherical)
            report("assign", src.n)
        elif algorithm != "minibatch" and reused_certified:
            labels = best.labels.copy()
            inertia = _blocked_total(exact_sq_dist_rows(raw, centroids, labels), raw)
            report("assign", src.n)
        else:
            # (the final pass tries the neighbour lists where they paid in training: lists=)
            lists = algorithm != "minibatch" and polish == 0 and _final_lists(best, src.n, centroids)
            labels, inertia = _assign_all(src, raw, centroids, spherical, rows, report, with_inertia=True,
                                          check=defer and not src.validated, lists=lists)
            # Lloyd's loops re-seed as they go, but mini-batch's last steps, and a sample's centres over all rows (or
            # rows the training's float32 could not tell apart), may leave clusters that no row is nearest to
            centroids, labels, inertia = _fill_empty_clusters(src, raw, centroids, labels, inertia, spherical, rows)
        timings["assign"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0

        # Commit state only now: a failure above leaves a previously fitted estimator untouched.
        self.algorithm_ = algorithm
        self.auto_reason_ = reason
        self.polish_iter_ = polish if algorithm != "minibatch" and full is not None else 0
        self.sample_rows_ = int(sample_rows) if algorithm != "minibatch" else 0
        self.sampling_ = sampling_used if algorithm != "minibatch" else None
        self.overrelax_ = overrelax if algorithm != "minibatch" else 0.0
        self.max_iter_ = max_iter if algorithm != "minibatch" else 0
        self.cluster_centers_ = self._fitted_centres = centroids
        self.labels_ = labels
        self.inertia_ = inertia
        self.n_iter_ = int(n_iter)
        self.inertia_history_ = [float(h) for h in history]
        self.n_features_in_ = src.dim
        self.n_samples_fit_ = src.n
        self.timings_ = timings
        self.threads_ = get_num_threads()
        self.metric_ = self.metric  # predict/score use the metric the centres were fitted with
        for stale in ("mean_cosine_", "mse_"):  # a refit with the other metric must not leave the old score
            self.__dict__.pop(stale, None)
        if spherical:
            self.mean_cosine_ = float(1.0 - inertia / src.n)
        else:
            self.mse_ = float(inertia / src.n)
        _warn_empty_clusters(np.bincount(labels, minlength=k))
        return self

    def fit_transform(self, x, column: str | None = None) -> np.ndarray:
        """Fit and return ``labels_`` (int64, shape (N,)); ``fit_predict`` is the same method. Unlike
        scikit-learn's ``KMeans.fit_transform``, which returns the (N, K) distances to every centre, this returns
        labels: kvant never builds an N×K matrix."""
        return self.fit(x, column=column).labels_

    fit_predict = fit_transform

    @with_threads
    def predict(self, x, column: str | None = None) -> np.ndarray:
        """Nearest fitted centre of each row of ``x`` (int64 labels)."""
        src, full, centres = self._prepare(x, column)
        with _zero_rows_named(src):
            return _assign_all(src, full, centres, self._fitted_metric() == "cos", lists=_lists_pay(src.n, centres))[0]

    @with_threads
    def score(self, x, column: str | None = None) -> float:
        """Quality on ``x``: minus the MSE per row (l2) or the mean cosine (cos). Higher is better."""
        src, full, centres = self._prepare(x, column)
        spherical = self._fitted_metric() == "cos"
        with _zero_rows_named(src):
            _, inertia = _assign_all(src, full, centres, spherical, with_inertia=True, lists=_lists_pay(src.n, centres))
        return float(1.0 - inertia / src.n) if spherical else -float(inertia / src.n)

    def _fitted_metric(self) -> str:
        return getattr(self, "metric_", self.metric)  # centres set by hand carry no fitted metric

    def _prepare(self, x, column):
        """The fitted-state and dimension checks shared by predict and score: (source, rows read once, centres)."""
        if not hasattr(self, "cluster_centers_"):
            raise EmptyIndex("this Clusterer is not fitted yet; call fit() first")
        centres = self._centres()
        src = as_source(x, column=column)
        if src.dim != centres.shape[1]:
            raise DimensionMismatch(f"input has dim {src.dim}, the clusterer's centres have dim {centres.shape[1]}")
        return src, _in_memory_rows(src), centres

    def _centres(self) -> np.ndarray:
        """``cluster_centers_`` as the assignment takes them: fitted ones as they are; centres set by hand are
        checked (a finite 2-D array of at least one row), copied to float32 and, for cos, unit-normalised."""
        c = self.cluster_centers_
        if self._has_fitted_centres():
            if not np.isfinite(c).all():  # (changed in place since the fit: K·D values, cheap beside any assignment)
                raise InvalidInput("cluster_centers_ contain NaN or inf (changed since the fit?)")
            if self._fitted_metric() != "cos" or _unit_rows(c):
                return c
            # cos centres scaled in place since the fit: taken as centres set by hand are (normalised below); used
            # as they were, assignment by ½‖u − c‖² read the scale as a change of direction (a review)
        try:
            kind = np.asarray(c).dtype.kind
            if kind not in "fiu":  # complex would lose its imaginary part, bool and objects mean a mistake
                raise TypeError(f"dtype {np.asarray(c).dtype} is not a real number type")
            c = np.array(c, dtype=np.float32, order="C")
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"cluster_centers_ set by hand must be a numeric (k, dim) array: {exc}") from None
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise InvalidInput(f"cluster_centers_ set by hand must have shape (k, dim) with k, dim >= 1, got {c.shape}")
        if not np.all(np.isfinite(c)):
            raise InvalidInput("cluster_centers_ set by hand contain NaN or inf (or values beyond float32)")
        if self._fitted_metric() == "cos":
            # a zero row has no direction, and cos assigns by ½‖u − c‖², which would treat it as a cosine of ½
            zero = ~c.any(axis=1)
            if zero.any():
                raise InvalidInput(f"cluster_centers_ row {int(np.argmax(zero))} is zero: no direction for cos")
            c = _normalise(c)
        return c

    _PARAMS = ("k", "metric", "algorithm", "seed", "max_iter", "tol", "sample_per_centroid", "sampling",
               "polish_iter", "overrelax", "n_redo", "batch_rows", "max_epochs", "init")
    init = None  # (instances pickled before the setting existed read it from here)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor settings, as scikit-learn's ``get_params`` (``deep`` is accepted; there are no
        nested estimators)."""
        return {key: getattr(self, key) for key in self._PARAMS}

    def set_params(self, **params) -> Clusterer:
        """Change constructor settings (scikit-learn's ``set_params``); they are validated by the next ``fit``.
        An unknown name raises :class:`InvalidInput` and changes nothing."""
        unknown = sorted(set(params) - set(self._PARAMS))
        if unknown:
            raise InvalidInput(f"unknown parameter(s) {unknown}; valid: {', '.join(self._PARAMS)}")
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        return f"Clusterer(k={self.k!r}, metric={self.metric!r}, algorithm={self.algorithm!r}, seed={self.seed!r})"

    # -- persistence ------------------------------------------------------------------------------
    _FITTED = ("algorithm_", "auto_reason_", "metric_", "inertia_", "n_iter_", "n_features_in_", "n_samples_fit_",
               "max_iter_", "overrelax_", "polish_iter_", "sample_rows_", "sampling_", "threads_")

    def save(self, path, labels: bool = True) -> None:
        """Write the fitted clusterer to ``path`` in kvant's container (docs/format.md): its settings, centres,
        scores, objective history and timings, and ``labels_`` unless ``labels=False`` (8 bytes per fitted row).
        :func:`kvant.load` gives back a Clusterer that predicts and scores as this one does. Settings changed since
        the fit are checked as ``fit`` would check them; the centres predicted with are the fitted ones.

        >>> import numpy as np, kvant, os, tempfile
        >>> c = kvant.Clusterer(3, seed=0).fit(np.random.default_rng(0).standard_normal((500, 4)).astype("float32"))
        >>> path = os.path.join(tempfile.mkdtemp(), "c.kvant")
        >>> c.save(path)
        >>> back = kvant.load(path)
        >>> bool((back.cluster_centers_ == c.cluster_centers_).all()), back.inertia_ == c.inertia_
        (True, True)
        """
        if not self._has_fitted_centres():
            raise EmptyIndex("only a fitted Clusterer can be saved (centres set by hand have no fit behind them)")
        self._check_settings()
        if not np.isfinite(self.cluster_centers_).all():  # changed in place since the fit
            raise InvalidInput("cluster_centers_ contain NaN or inf")
        if labels and not hasattr(self, "labels_"):
            raise InvalidInput("this Clusterer has no labels_ (it was loaded from a file saved without them): "
                               "save it with labels=False")
        params = {key: _plain(getattr(self, key)) for key in self._PARAMS if key != "init"}
        params["init"] = None if self.init is None else "array"  # (the array itself is stored beside the centres)
        meta = {"params": params,
                # (fits pickled before sample_rows_ / sampling_ existed lack them: unknown, so 0 / None)
                "fitted": {key: _plain(getattr(self, key, {"sample_rows_": 0}.get(key))) for key in self._FITTED},
                "timings": {key: float(v) for key, v in self.timings_.items()}, "labels": bool(labels)}
        # the checks load makes, so that no file is written that kvant.load refuses (a review: centres scaled in
        # place, inertia_ = -1 or a cut labels_ saved fine and failed to load)
        problem = _fitted_problem(meta["fitted"], self.cluster_centers_) or (
            _labels_problem(self.labels_, meta["fitted"]["n_samples_fit_"], self.cluster_centers_.shape[0])
            if labels else None)
        if problem:
            raise InvalidInput(f"cannot save: the fitted attributes were changed since the fit ({problem})")
        arrays = {"centres": self.cluster_centers_,
                  "history": np.asarray(self.inertia_history_, np.float64)}
        if labels:
            arrays["labels"] = self.labels_
        if self.init is not None:
            arrays["init"] = self._initial_centres(None, unit=False)  # (as given: cos normalises at fit)
        persist.write(path, "Clusterer", meta, arrays)

    def _has_fitted_centres(self) -> bool:
        """``cluster_centers_`` is the fit's own array (pickling and deepcopy keep the identity), or a fit pickled
        before that was recorded; False for centres set by hand."""
        fitted = self.__dict__.get("_fitted_centres")
        if fitted is None:
            return hasattr(self, "n_features_in_")
        return self.__dict__.get("cluster_centers_") is fitted

    @classmethod
    def _from_persist(cls, meta: dict, arrays: dict) -> Clusterer:
        try:
            params = dict(meta["params"])
            marker = params.pop("init", None)  # (files saved before init existed have none)
            if marker not in (None, "array") or (marker == "array") != ("init" in arrays):
                raise ValueError(f"init is {marker!r} with{'' if 'init' in arrays else 'out'} an init array")
            obj = cls(**params, init=np.array(arrays["init"]) if marker == "array" else None)
            obj._check_settings()
            fitted, timings, with_labels = dict(meta["fitted"]), dict(meta["timings"]), bool(meta["labels"])
            fitted.setdefault("sampling_", None)  # files saved before sampling_ existed
            centres, history = arrays["centres"], arrays["history"]
            labels = arrays["labels"] if with_labels else None
        except (KeyError, TypeError, ValueError, InvalidInput) as exc:
            raise PersistError(f"bad Clusterer content: {exc}") from exc
        problem = _fitted_problem(fitted, centres)
        if problem:
            raise PersistError(f"bad Clusterer content: {problem}")
        k, n = centres.shape[0], fitted["n_samples_fit_"]
        if history.dtype != np.float64 or history.ndim != 1:
            raise PersistError("the objective history is not a 1-D float64 array")
        if not all(isinstance(v, float) for v in timings.values()):
            raise PersistError("bad Clusterer content: timings must be numbers")
        problem = None if labels is None else _labels_problem(labels, n, k)
        if problem:
            raise PersistError(problem)
        for key, value in fitted.items():
            setattr(obj, key, value)
        obj.cluster_centers_ = obj._fitted_centres = np.array(centres)  # a writeable copy, even from a map
        if labels is not None:
            obj.labels_ = labels
        obj.inertia_history_ = [float(h) for h in history]
        obj.timings_ = timings
        if fitted["metric_"] == "cos":
            obj.mean_cosine_ = float(1.0 - obj.inertia_ / n)
        else:
            obj.mse_ = float(obj.inertia_ / n)
        return obj


@contextlib.contextmanager
def _zero_rows_named(src: VectorSource):
    """A zero row under cos names the file it is in, as a NaN/inf row's error does (``src.name``; arrays are "input",
    which the message leaves out). The error keeps ``bad_row`` and ``zero_norm``."""
    try:
        yield
    except InvalidInput as err:
        if not getattr(err, "zero_norm", False) or src.name == "input":
            raise
        named = InvalidInput(f"{err} (in {src.name})")
        named.bad_row, named.zero_norm = err.bad_row, True
        raise named from None


def _fitted_problem(fitted: dict, centres: np.ndarray) -> str | None:
    """What is wrong with a saved Clusterer's fitted attributes and centres, or None: each has the type and range
    a fit gives it, the centres match them (finite float32, unit rows for cos), and the score is possible."""
    if set(fitted) != set(Clusterer._FITTED):
        return "fitted attributes missing or unknown"
    if centres.dtype != np.float32 or centres.ndim != 2 or centres.shape[0] < 1 or not np.isfinite(centres).all():
        return f"centres must be a finite (k, dim) float32 array, got {centres.shape} {centres.dtype}"

    def whole(v, lo):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    def real(v):
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    k, dim = centres.shape
    checks = {
        "algorithm_": fitted["algorithm_"] in available_algorithms()[1:],
        "auto_reason_": isinstance(fitted["auto_reason_"], str),
        "metric_": fitted["metric_"] in ("l2", "cos"),
        "n_features_in_": whole(fitted["n_features_in_"], 1) and fitted["n_features_in_"] == dim,
        "n_samples_fit_": whole(fitted["n_samples_fit_"], k),
        "inertia_": real(fitted["inertia_"]),
        "n_iter_": whole(fitted["n_iter_"], 0),
        "max_iter_": whole(fitted["max_iter_"], 0),
        "overrelax_": real(fitted["overrelax_"]),
        "polish_iter_": whole(fitted["polish_iter_"], 0),
        "sample_rows_": whole(fitted["sample_rows_"], 0),
        "sampling_": fitted["sampling_"] in ("all rows", "coreset", "uniform", None),
        "threads_": whole(fitted["threads_"], 1),
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        return f"{', '.join(bad)} out of type or range"
    if fitted["metric_"] == "cos":
        if not _unit_rows(centres):
            return "cos centres must be unit rows"
        if fitted["inertia_"] > 2.0 * fitted["n_samples_fit_"]:  # mean cosine below -1
            return "inertia_ beyond what unit rows and centres allow"
    return None


def _labels_problem(labels, n: int, k: int) -> str | None:
    """What is wrong with a fit's labels, or None: n int64 values in [0, k)."""
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != (n,) or (
            n and (labels.min() < 0 or labels.max() >= k)):
        return f"labels must be {n} int64 values in [0, {k})"
    return None


def _unit_rows(centres: np.ndarray) -> bool:
    """Every row has norm 1 to within 1e-4 (a cos fit's centres; zero rows pass, as a fit may leave them)."""
    norms = np.sqrt((centres.astype(np.float64) ** 2).sum(1))
    return bool(np.all((np.abs(norms - 1.0) < 1e-4) | (norms == 0)))


def _plain(value):
    """A setting or fitted scalar as JSON takes it (NumPy scalars become Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value


persist.register("Clusterer")(Clusterer)


# ----------------------------------------------------------------------------------------------
# helpers shared by the algorithms
# ----------------------------------------------------------------------------------------------


# rounds of _fill_empty_clusters (two passes over the rows each; run while clusters are empty and a round helps)
_FILL_ROUNDS = 4


def _fill_empty_clusters(src, full, centroids, labels, inertia, spherical, rows):
    """(centroids, labels, inertia) with the clusters the final assignment left empty re-seeded. One pass keeps the
    distinct rows farthest from their centres among clusters of two or more rows (twice as many as the empty clusters,
    plus 32: memory O(K·D), like the centres); the empty clusters take them by
    :func:`kvant.cluster.reseed.reseed_picks` (Lloyd's rule: a row of a cluster that keeps one after losing the row's
    copies, not on its centre, no copy of another taken row), and a full assignment follows; up to ``_FILL_ROUNDS``
    rounds while each lowers the inertia (a re-seeded centre may take all the rows of a small cluster).
    Mini-batch's last updates can leave a centre that no row is nearest to (seen in 20 of 150 random fits with
    K > N/2 on 1- and 2-d rows). Clusters stay empty when no row qualifies (fewer distinct rows than K), and where
    float32 cannot tell the rows apart (cos directions closer than its resolution)."""
    k = centroids.shape[0]
    counts = np.bincount(labels, minlength=k)
    for _ in range(_FILL_ROUNDS):
        empty = int(np.count_nonzero(counts == 0))
        if empty == 0:
            break
        keep = 2 * empty + 32
        far = None
        for s, block in _iter_blocks(src, full, spherical, rows):  # (cos: unit rows, as the centres are)
            lab = np.ascontiguousarray(labels[s : s + block.shape[0]])
            dist = exact_sq_dist_rows(block, centroids, lab)
            dist[counts[lab] <= 1] = -1.0  # a singleton's row cannot leave it: not a candidate (nor taking a place)
            f = distinct_far_rows(dist, s, lab, block, keep)
            far = f if far is None else merge_distinct_far_rows([far, f], keep)
        picks = reseed_picks(counts, far, centroids)
        if not picks:
            break
        moved = centroids.copy()
        for dst, _, row in picks:
            moved[dst] = row
        new_labels, new_inertia = _assign_all(src, full, moved, spherical, rows, with_inertia=True)
        # A centre that moved onto a row only adds a choice: no row gets farther, so the inertia falls unless no row
        # moved (rows float32 cannot tell apart), and then the fit stays as it was. A round may empty another cluster
        # while it lowers the inertia (a centre stranded between two groups loses one to the new centre); the next
        # round re-seeds that one.
        if not new_inertia < inertia:
            break
        centroids, labels, inertia = moved, new_labels, new_inertia
        counts = np.bincount(labels, minlength=k)
    return centroids, labels, inertia


def _warn_empty_clusters(sizes: np.ndarray) -> None:
    """An :class:`EmptyClusterWarning` when a fit leaves clusters without a row (scikit-learn warns likewise): their
    centres are where the last re-seeding left them, and a caller counting on k groups should know. ``sizes``: the
    final rows per cluster (also kvant.distributed's final pass's counts)."""
    k = sizes.size
    empty = np.flatnonzero(sizes == 0)
    if empty.size:
        shown = ", ".join(str(int(j)) for j in empty[:8]) + (", ..." if empty.size > 8 else "")
        warn(f"{empty.size} of the k={k} clusters are empty (ids {shown}): the input has fewer distinct "
             f"rows than k, or rows too close to tell apart in float32", EmptyClusterWarning)


def _in_memory_rows(src: VectorSource, validate: bool = True, load: bool = False) -> np.ndarray | None:
    """All rows as one float32 array when the source can give them cheaply; None means stream it.

    A float32 array or memmap is used in place (validated chunk by chunk first, unless ``validate`` is False: the
    caller checks it later); other dtypes are converted only when they are held in memory already. With ``load``
    (a fit, which reads the rows several times), any other source — parquet, HDF5, a memmap of another dtype — is
    read into memory once when its float32 rows fit the memory budget (:func:`memory_budget_bytes`): decoding it
    again for the proposal sample, the coreset pass, the gathered sample and the final assignment cost more than
    reading it once and fitting in memory (a review, 200k × 128 parquet, K = 64 `cos`: 1.02 s against 0.08 s for
    the in-memory fit plus 0.2-0.6 s for the read). The rows are as given (not unit-normalised).
    """
    arr = src.array if isinstance(src, ArraySource) else None
    if arr is not None and arr.dtype == np.float32 and arr.flags.c_contiguous:
        if validate:
            src.validate()  # once per source (a memmap's scanned pages leave the resident set)
        return arr
    if arr is not None and src.in_memory:
        return src.to_array()
    if load and src.n * src.dim * 4 <= memory_budget_bytes():
        return src.to_array()  # (checked for NaN/inf as it is read)
    return None


def _unit_rows_near_uniform(centre, spherical, sampling, reason) -> tuple[str, str]:
    """(sampling, reason): "uniform" and the reason extended when the rows are cos's unit rows and the coreset
    proposal around ``centre`` is provably within ``NEAR_UNIFORM`` of uniform (:mod:`kvant.cluster.sampling`), else
    both unchanged."""
    if not spherical:
        return sampling, reason
    a = float(np.linalg.norm(centre))
    ratio = unit_proposal_ratio(a)
    if ratio > NEAR_UNIFORM:
        return sampling, reason
    return "uniform", (f"{reason}; but the unit rows spread evenly (the mean of the pre-sampled ones has norm "
                       f"{a:.3f}), so a coreset's proposal is within {ratio:.3f}× of uniform: a uniform sample was "
                       f"drawn instead, without the coreset's distance pass over every row")


def _proposal_centre(src, full, seed, norm) -> np.ndarray:
    """The coreset proposal's centre: the float64 mean of ``CENTRE_ROWS`` uniform rows (unit rows when ``norm``),
    float32. Gathered rows are checked as they are read (:func:`gather_rows`)."""
    rows = np.ascontiguousarray(_uniform_sample(src, full, min(src.n, CENTRE_ROWS), seed, norm), np.float32)
    # their float64 mean as Lloyd's sums of one cluster: NumPy's axis-0 mean with a float64 accumulator took 2.5 ms
    # for 4,096 × 784 rows against 0.85 ms (the same sums, row by row)
    return cluster_sums(rows, np.zeros(rows.shape[0], np.int64), 1, 1, UNIT_WEIGHTS)[0][0] / max(1, rows.shape[0])


def _coreset_distances(src, full, centre, norm) -> np.ndarray:
    """Squared distance of every row (a unit row when ``norm``) to ``centre`` (:func:`_proposal_centre`), in one pass
    over ``full`` (or the stream); the pass also checks rows not validated yet (:func:`sq_distances`)."""
    in_ram = full is not None and (full is not getattr(src, "array", None) or src.in_memory)
    # one block in RAM (threaded); a memmap or a stream goes window by window. cos rows are measured as
    # unit rows by the kernel itself, so no normalised copy is written.
    return sq_distances(_iter_blocks(src, full, False, src.n if in_ram else None), src.n, centre, src.name, unit=norm)


def _training_sample(src, full, m, seed, norm, sampling="uniform", k=1, d2=None, centre=None):
    """(rows, weights) to train on: all rows (weights None) when m >= N, else a coreset or uniform sample.

    ``norm``: rows read from ``full``/``src`` are unit-normalised on the way (cos). ``d2``: the rows'
    squared distances to the proposal centre when the caller already has them; ``centre``: that centre
    (:func:`_proposal_centre`) when the caller already has it."""
    if m >= src.n or sampling == "uniform":
        return _uniform_sample(src, full, m, seed, norm), None
    if d2 is None:
        if centre is None:
            centre = _proposal_centre(src, full, seed, norm)
        d2 = _coreset_distances(src, full, centre, norm)
    a, b = coreset_inclusion(d2, m)
    rows, weights = poisson_sample(d2, a, b, None if seed is None else seed + 104729)
    if rows.size < k:  # a tiny m can draw fewer rows than centres
        return _uniform_sample(src, full, m, seed, norm), None
    return _take(src, full, rows, norm), weights


def _take(src, full, idx, norm):
    if full is not None and type(full) is np.ndarray and full.dtype == np.float32 and full.flags.c_contiguous:
        return gather_array_rows(src, full, idx, norm)  # rows in RAM: every thread, normalising on the way
    if full is None or full is getattr(src, "array", None):  # in place: a memmap gathers without staying resident
        return gather_rows(src, lambda: src.take(idx), norm)
    return gather_rows(src, lambda: np.ascontiguousarray(full[idx]), norm)


def _uniform_sample(src, full, m, seed, norm):
    idx = src.sample_indices(m, seed)
    if full is not None and idx.size == src.n and not norm:
        return full
    return _take(src, full, idx, norm)


# Rows per block of an in-memory array in the passes over all rows (memmaps and normalised copies keep 16 MiB
# blocks): each block ends with its threads meeting, and 128 MiB ones took the final assignment of 1M×128
# (K = 64) 9% below 16 MiB ones (same-process A/B, 2026-12-02).
_RAM_CHUNK = 128 << 20


def _block_step(full: np.ndarray, norm: bool, rows: int | None = None) -> int:
    """Rows per block :func:`_iter_blocks` reads from ``full``."""
    in_ram = not norm and not isinstance(full, np.memmap)  # 16 MiB: a memmap's resident window
    return rows or max(1, (_RAM_CHUNK if in_ram else 16 << 20) // (4 * full.shape[1]))


def _blocked_total(per_row: np.ndarray, full: np.ndarray) -> float:
    """Σ per_row summed block by block as :func:`_assign_all` sums its blocks, so an inertia from reused labels equals
    ``score``'s to the last bit (a review: one ulp apart on inputs over 128 MiB when summed in one go)."""
    step = _block_step(full, False)
    total = 0.0
    for s in range(0, per_row.shape[0], step):
        total += float(per_row[s : s + step].sum())
    return total


def _iter_blocks(src: VectorSource, full: np.ndarray | None, norm: bool, rows: int | None = None):
    """(start, float32 rows) over every row, from ``full`` when given, else streamed from ``src``; each block
    unit-normalised when ``norm`` (so cos never holds a normalised copy of the whole input)."""
    if full is not None:
        step = _block_step(full, norm, rows)
        for s in range(0, full.shape[0], step):
            yield s, normalise_rows(full[s : s + step], s) if norm else full[s : s + step]
            if full is getattr(src, "array", None):  # rows used in place (a memmap): drop the scanned pages
                src.release_rows(s, s + step)
    else:
        for s, block in src.chunks(rows):
            yield s, normalise_rows(block, s) if norm else block


def _exact_from_last_e_step(x, centroids, res, spherical) -> tuple[np.ndarray, float]:
    """(labels, inertia) of the rows ``x`` Lloyd's last E-step assigned to ``centroids`` (``res``: its LloydResult,
    with the E-step's float32 distances): the labels made exact by :func:`certify_top2`, the inertia from float64
    distances term by term — what :func:`_assign_all` returns, without a second assignment.

    ``x`` are the raw rows; for cos the E-step ran on their float32 unit copy, and the rows are scaled by 1/‖x‖ here
    as the assignment scales them. The copy's rounding (< 1 unit in the last place per coordinate, ~2u(‖x‖ + ‖c‖)² in
    a distance) fits inside the certificate's margin, which allows 4.5u for scaling rows inside the kernel that a copy
    does not use (:func:`kvant.kernels.assign.label_margins`)."""
    labels = res.labels.copy()
    cn = sq_norms_serial(centroids)
    certify_top2(x, centroids, labels, res.last_d1, res.last_d2, np.empty(0, np.float64), spherical, cn,
                 *label_margins(x.shape[1]))
    if spherical:
        factor = 1.0 / np.sqrt(sq_norms64_serial(x))
        return labels, 0.5 * _blocked_total(exact_sq_dist_rows_scaled(x, centroids, labels, factor), x)
    return labels, _blocked_total(exact_sq_dist_rows(x, centroids, labels), x)


# predict and score try the centres' neighbour lists (where _assign_all's rule allows them) from this many rows per
# centre: building them and the grid costs about as much as the fused pass over 64·K rows of 1-3 coordinates (~4 ms at
# K = 1,024 on the Zen 5 host).
PREDICT_LISTS_ROWS_PER_CENTRE = 64


def _lists_pay(n: int, centres: np.ndarray) -> bool:
    return n >= PREDICT_LISTS_ROWS_PER_CENTRE * centres.shape[0]


def _final_lists(res, n: int, centres: np.ndarray) -> bool:
    """Whether a fit's final pass tries the neighbour lists: where they paid in training, or, where no probe judged
    them there (a training sample small enough for the compiled loop), by predict's rule."""
    return res.neighbour_lists or (not res.neighbour_judged and _lists_pay(n, centres))


def _assign_all(src, full, centroids, spherical, rows: int | None = None, report=None,
                with_inertia: bool = False, unit: bool = False, check: bool = False,
                lists: bool = False) -> tuple[np.ndarray, float | None]:
    """Labels of every row and, with ``with_inertia``, the exact inertia (Σ‖x − c‖² in float64,
    term by term; ½ of it for unit rows, = Σ(1 − cos)) in the same pass.
    With K >= ``AMX_MIN_K`` and K·D >= ``AMX_MIN_KD`` on AMX hosts, and K >= ``I16_MIN_K`` on ``I16_HOST`` hosts
    (AVX2 without AVX-512, AMD Zen 4; on Zen 4 for larger K·D only, ``assign._int16_final``), the labels come from
    certified products (:func:`assign_certified`); they are exact nearest centres on every path.

    ``unit``: ``full`` already holds unit rows (cos); otherwise cos scales each row by 1/‖x‖ inside the
    assignment (no normalised copy of the block: one pass over the data fewer).

    ``check``: the rows have not been checked for NaN/inf; each block is checked as it is assigned (in cache) and
    the first bad row is named as ``src.validate()`` would; after the pass the source is marked validated.

    ``lists``: try the centres' neighbour lists (:class:`~kvant.cluster.neighbours.NeighbourFinal`; rows of 1-3
    coordinates, K >= its ``min_k``; cos rows scaled by 1/‖x‖): the fit passes it where the lists paid in training,
    predict and score from 64 rows per centre. The same labels (exact nearest, ties to the smaller id) and per-row
    distances."""
    labels = np.empty(src.n, np.int64)
    cn = sq_norms_serial(centroids)
    shift, scale = (None, None) if spherical else conditioning(centroids)
    # far-out centres, K <= 64: the fused pass skips the ones a row cannot reach (faster than int16 products there)
    annulus = annulus_centres(centroids, spherical)
    certified = CertifiedCentres(centroids, spherical)  # bf16 tiles (AMX) or int16 products (AVX2): exact labels
    certified.ok = certified.ok and annulus is None
    # few coordinates and many centres: the centres' neighbour lists, from grid starts (kept while they pay); not where
    # the annulus prunes far-out centres (its pass beat the lists' first, uniform grid: 28 against 66 ms on 500k × 2
    # heavy-tailed rows, K = 1,024; not measured against the quantile grid since)
    if (lists and NEIGHBOUR_FINAL and annulus is None
            and NeighbourFinal.applies(src.n, centroids.shape[1], centroids.shape[0], spherical)):
        lists = NeighbourFinal(centroids)
    else:
        lists = None
    total = 0.0
    buffer = np.empty(0, np.float64)  # the blocks' exact distances, one buffer for all (fresh pages cost, see assign)
    for s, block in _iter_blocks(src, full, False, rows):
        b = block.shape[0]
        if buffer.shape[0] < b:
            buffer = np.empty(b, np.float64)
        per_row = buffer[:b]
        left = None
        if lists is not None:
            out = labels[s : s + b]
            # (cos: rows scaled by 1/‖x‖ in float64, as the fused pass and the exact inertia take them)
            with np.errstate(divide="ignore"):  # (a zero row's inf factor leaves it to the fused pass, which names it)
                factor = 1.0 / np.sqrt(sq_norms64_serial(block)) if spherical and not unit else None
            left = lists.assign(block, out, per_row, factor)
            if left is None:  # the lists do not pay on these rows: the fused pass takes every block
                lists = None
            elif left.size and not (np.isfinite(block[left]).all()
                                    and (factor is None or np.isfinite(factor[left]).all())):
                left = None  # NaN, inf or a zero cos row: the fused pass below names the first one, as without lists
            elif left.size:
                sub = np.ascontiguousarray(block[left])
                lab = np.empty(left.size, np.int64)
                ex = np.empty(left.size, np.float64)
                assign_top2(sub, centroids, cn, lab, None, None, exact_sq=ex, shift=shift, scale=scale,
                            unit_rows=spherical and not unit, exact_labels=True)
                out[left] = lab
                per_row[left] = ex
        if left is not None:
            pass  # (assigned on the lists above)
        elif certified.ok:
            try:
                assign_certified(block, certified, labels[s : s + b], per_row, unit_rows=spherical and not unit,
                                 row_offset=s)
            except InvalidInput:  # a zero unit row (or one holding inf, whose norm the kernel cannot scale by)
                if check:  # NaN/inf anywhere is named first, as when the rows are validated up front
                    src.validate()
                raise
            # The check for free: a row holding NaN/inf gets a non-finite exact distance (the kernels settle it by
            # float64 distances to every centre), a finite row a finite one. A separate validation pass cost 16-20 ms
            # of a 1M×128 K=64 cos fit's 160-170 (Zen 4, 2026-12-05); a per-block scan measured 10% slower at K=64.
            if check and not math.isfinite(per_row.sum()):
                check_finite(block, s, src.name)
        else:
            assign_top2(block, centroids, cn, labels[s : s + b], None, None,
                        exact_sq=per_row if with_inertia else None, unit_rows=spherical and not unit, row_offset=s,
                        shift=shift, scale=scale, check=src.name if check else None, exact_labels=True,
                        annulus=annulus)
        if with_inertia:
            total += float(per_row.sum())
        if report is not None:
            report("assign", b)
    if check:
        src.mark_validated()
    if not with_inertia:
        return labels, None
    return labels, (0.5 * total if spherical else total)


