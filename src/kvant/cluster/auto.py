"""The ``auto`` rule: a static choice of algorithm and settings from (N, D, K, metric) and input size.

No peeking at the data or labels. The thresholds come from ``benchmarks/clustering.py`` runs on the
2-core reference machine; ``docs/auto.md`` has the table that justifies them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidInput
from .assign import one_region_direct_e_step

AUTO_TOL = 5e-4
AUTO_OVERRELAX = 1.0  # β_max of the over-relaxed Lloyd steps (docs/auto.md, "Over-relaxed Lloyd")
AUTO_MAX_ITER = 15  # over-relaxed iterations at most: within 1% of FAISS's 25 plain ones on every measured cell
# Candidate E-steps (lloyd's ``candidates``): AUTO_CANDIDATES centres near each row, when K >= 128 and
# K·D >= 2**14, where a GEMM row costs enough for recording them to pay (docs/auto.md, "Candidate E-steps"), unless
# the training E-steps are small enough for the one-region direct kernel, which cannot record them: recording would
# move every full E-step to the GEMM path (digits K=256 on the AVX-512 host: fits 1.13-1.36x the time).
AUTO_CANDIDATES = 16
AUTO_CANDIDATE_MIN_K = 128
AUTO_CANDIDATE_MIN_KD = 1 << 14
# The training sample: FAISS's 256·K rows at least, and at least N / AUTO_SAMPLE_DIVISOR rows (up to
# AUTO_SAMPLE_MAX_PER_CENTRE·K) when the caller leaves sample_per_centroid unset. The centres' sampling error costs
# about 1/(rows per centre) of the objective, so at small K a 256·K sample leaves a gap to a fit on every row
# (0.4-1.7% of MSE at K = 10 on 1M x 128); a training iteration over m rows costs about 1.2·m/N of the final
# assignment, so with at most AUTO_MAX_ITER = 15 iterations an N/64-row sample adds about a quarter of one
# (+10-15% of a K = 10 fit). N/16 closed more of the gap but cost +60% of the fit, and the grid's 2x target over
# FAISS defaults failed on 4 more cells (docs/auto.md, "Training-sample size"). The cap bounds the copy where the
# error is already negligible (1/16384) and N is huge.
DEFAULT_SAMPLE_PER_CENTROID = 256
AUTO_SAMPLE_DIVISOR = 64
AUTO_SAMPLE_MAX_PER_CENTRE = 16384
# Seeding runs one centre at a time, a pass over its rows each, at a fraction of GEMM's rate, so 8·K rows of an
# all-rows fit cost far more than Lloyd (50k × 768, K = 4096, cos: 32.8 s, nearly all of it seeding; random seeding
# 3.9 s, mean cosine 0.34762 vs 0.34766). Its budget is a share of one training E-step's multiply-adds (m·K·D for m
# training rows), or AUTO_SEED_FLOOR (about a millisecond) when that is more: greedy k-means++ (the best of 2 + ln K
# draws per centre, scikit-learn's default) on up to 32·K rows within 1/AUTO_GREEDY_DIVISOR of it; else plain
# k-means++ on up to 8·K rows within 1/AUTO_SEED_DIVISOR; when neither affords 2·K rows, K random rows, as FAISS does
# (docs/auto.md, "Seeding"). Greedy draws matter on clusters of very different spreads (100k × 17 rows from 64 blobs
# of spreads 0.01-30, K = 64: MSE 1,777 → 935 on 32·K rows, 1,080 on 8·K; scikit-learn 942), the floor on small
# fits (50 rows of 5 separated blobs, K = 5, on random rows: mean MSE 259 against 0.0045); at 1/8 greedy cost 9-10%
# of the fit on 1M × 128 K = 256 and 200k × 384 K = 64 with no gain on those sets, hence 1/32.
# The floor is a count of multiply-adds, so at large D it buys few rows: 20k × 1000 rows of 33 separated blobs,
# K = 33, got greedy seeding on 101 rows (3 per centre; a blob holding 1/33 of the rows is then missed with
# probability e^-3 ≈ 5%) and left one or two blobs without a centre in 9 of 10 fits (MSE 1,914-2,910 against
# scikit-learn's 998). So greedy gets at least AUTO_GREEDY_COVER_PER_CENTRE·K rows (a 1/K blob is missed with
# probability e^-16) when those cost less than 1/AUTO_GREEDY_COVER_DIVISOR of a training E-step's multiply-adds:
# that set then fit 10 of 10 at 998-1,000 in the same time (12·K rows: 9 of 10, 8·K: 8 of 10). With a 256·K-row
# sample the cover costs 16·L/256 of an E-step (0.31-0.44 for K = 10-1096; from K = 1097, L = 9, more than half, as
# on samples of fewer rows per centre). Fits alternating with and without it in one process took 0.92-1.08x the time
# at K = 32-256 (docs/auto.md, "Seeding").
# Under 16·K sample rows, where the budgets above buy only part of them (fewer than 2·K: K random rows), k-means++
# takes every row when they fit in AUTO_SEED_CACHE_BYTES (an L2 cache): one E-step's multiply-adds in K passes over the
# rows. Seeding on part of the rows misses whole clusters that are small or far: a review's 20,000 × 3 rows of 30
# Zipf-sized blobs, K = 5,000, fit to MSE 0.232 from K random rows against 0.0072 from k-means++ on every row, in less
# time (Lloyd from random rows ran all its iterations); digits K = 1,024 `l2` MSE 78.0 → 70.3 for ~6 ms more. Beyond
# the bound the passes cost more than they buy on diffuse rows: 16,000 × 128 rows of a Gaussian mixture at K = 1,024
# fit to the same MSE from every row in 146 ms against 98 from random rows (FAISS 231 ms); 8 MiB let those in
# (docs/auto.md, "Every row under 16·K rows").
AUTO_SEED_CACHE_BYTES = 2 << 20
# ... and at most this many row-steps (rows · K; ~0.5-0.8 ns each on few coordinates, a review: 2M × 1 rows at
# K = 200,000 would have seeded for ~3 minutes)
AUTO_SEED_EVERY_ROW_STEPS = 1 << 28
AUTO_SEED_DIVISOR = 8
AUTO_SEED_MIN_PER_CENTRE = 2
# Greedy draws need more rows than that: picking K centres among 2-3·K rows is nearly taking the rows, and on few
# coordinates Lloyd hardly moves centres past each other afterwards (a review: 200k × 1 rows of 30 blobs, K = 1,024,
# greedy on 2,048 rows fit to MSE 0.0016-0.0024 against 0.00055-0.00089 for plain k-means++ on 8,192, in the same
# time); below 4·K rows plain k-means++ takes the seeding if it affords 2·K.
AUTO_GREEDY_MIN_PER_CENTRE = 4
AUTO_SEED_FLOOR = 1 << 24
AUTO_GREEDY_DIVISOR = 32
AUTO_GREEDY_ROWS_PER_CENTRE = 32
AUTO_GREEDY_COVER_PER_CENTRE = 16
AUTO_GREEDY_COVER_DIVISOR = 2


@dataclass(frozen=True)
class Choice:
    algorithm: str
    params: dict = field(default_factory=dict)
    reason: str = ""


# Minibatch under the memory budget: a batch's rows are held about this many times over (see choose_algorithm),
# and no batch is cut below MIN_BATCH_ROWS rows (a tiny budget would otherwise give batches too small to learn from).
BATCH_COPIES = 4
MIN_BATCH_ROWS = 1024


def memory_budget_bytes() -> int:
    """Bytes of input kvant is willing to hold for exact k-means: KVANT_MEMORY_BUDGET or half of RAM."""
    env = os.environ.get("KVANT_MEMORY_BUDGET")
    if env:
        try:
            value = float(env)
        except ValueError:
            value = float("nan")
        if not (np.isfinite(value) and value > 0):
            raise InvalidInput(f"KVANT_MEMORY_BUDGET must be a positive number of bytes (e.g. 8e9), got {env!r}")
        return int(value)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def auto_sample_rows(n: int, k: int) -> int:
    """Training-sample rows ``auto`` asks for when the caller leaves ``sample_per_centroid`` unset: 256·K, or
    N/64 rows when that is more (at most 16384·K); see the constants above."""
    floor = min(-(-n // AUTO_SAMPLE_DIVISOR), AUTO_SAMPLE_MAX_PER_CENTRE * k)
    return max(DEFAULT_SAMPLE_PER_CENTROID * k, floor)


def compiled_lloyd(n: int, dim: int, k: int) -> bool:
    """Whether Lloyd on ``n`` rows runs as the compiled small-input loop
    (:func:`kvant.cluster.lloyd.small_lloyd_applies`: under 8,192 rows, E-steps of the register-blocked kernel).
    Then ``auto`` trains on all N rows instead of a sample, the loop's last E-step being the final assignment:
    drawing a sample (the coreset's pass over every row, its draw and gather) and assigning every row after cost more
    there than the iterations on the other rows, fits 1.1-1.8x faster at an equal or lower median objective
    (docs/auto.md, "Every row for small inputs"); and it asks for no candidate E-steps, which the loop cannot
    record."""
    from .lloyd import small_lloyd_applies

    return small_lloyd_applies(n, dim, k)


def greedy_trials(k: int) -> int:
    """Draws per centre of greedy k-means++: 2 + ⌊ln K⌋ (Arthur & Vassilvitskii; scikit-learn's default)."""
    return 2 + int(np.log(max(1, k)))


def auto_seeding(rows: int, k: int, dim: int) -> tuple[str, int, int]:
    """(init, seeding rows, draws per centre) for a training sample of ``rows`` rows of ``dim`` coordinates: greedy
    k-means++ on up to 32·K rows within max(rows·K·D / 32, ``AUTO_SEED_FLOOR``) multiply-adds, and on at least
    16·K rows (or every row of a smaller sample) when those cost less than rows·K·D / 2; if greedy gets fewer than
    4·K rows (and the sample has more), plain k-means++ within max(rows·K·D / 8, ``AUTO_SEED_FLOOR``) on at least
    2·K; else ``"random"`` (K random rows). Under 16·K rows, where that choice is random rows or under half of them,
    plain k-means++ on every row instead when they fit in ``AUTO_SEED_CACHE_BYTES`` as float32 and rows·K is at most
    ``AUTO_SEED_EVERY_ROW_STEPS``. See the constants above."""
    from .lloyd import INIT_ROWS_PER_CENTROID

    per_row = k * max(1, dim)  # multiply-adds per seeding row and draw
    e_step = rows * per_row
    trials = greedy_trials(k)
    plain = (1, AUTO_SEED_DIVISOR, INIT_ROWS_PER_CENTROID)
    options = ((trials, AUTO_GREEDY_DIVISOR, AUTO_GREEDY_ROWS_PER_CENTRE), plain) if trials > 1 else (plain,)
    choice = ("random", k, 1)
    for draws, divisor, per_centre in options:
        cap = min(per_centre * k, rows)
        seed_rows = min(cap, max(e_step // divisor, AUTO_SEED_FLOOR) // (per_row * draws))
        if draws > 1:
            cover = min(AUTO_GREEDY_COVER_PER_CENTRE * k, rows)
            if seed_rows < cover and cover * per_row * draws * AUTO_GREEDY_COVER_DIVISOR < e_step:
                seed_rows = cover
        least = AUTO_GREEDY_MIN_PER_CENTRE if draws > 1 else AUTO_SEED_MIN_PER_CENTRE
        if seed_rows >= min(least * k, rows):
            choice = ("k-means++", int(seed_rows), draws)
            break
    # Under 16·K rows the cover would be every row: seeding on under half of them misses whole clusters that are
    # small or not in the part, so plain k-means++ takes every row where they fit in cache (AUTO_SEED_CACHE_BYTES)
    # and its rows·K steps stay bounded (AUTO_SEED_EVERY_ROW_STEPS).
    partial = choice[0] == "random" or (2 * choice[1] < rows < AUTO_GREEDY_COVER_PER_CENTRE * k)
    if partial and rows * max(1, dim) * 4 <= AUTO_SEED_CACHE_BYTES and rows * k <= AUTO_SEED_EVERY_ROW_STEPS:
        return "k-means++", int(rows), 1
    return choice


def choose_algorithm(n: int, dim: int, k: int, metric: str, input_bytes: int, sampling: str = "coreset",
                     sample_per_centroid: int | None = None) -> Choice:
    """Pick the concrete algorithm for ``auto``. See docs/auto.md for the measurements behind it.

    ``sampling`` and ``sample_per_centroid`` are the caller's settings. ``sample_per_centroid=None`` lets the rule
    size the training sample (:func:`auto_sample_rows`); a number is taken as given (``per·K`` rows)."""
    float32_bytes = n * dim * 4
    budget = memory_budget_bytes()
    if float32_bytes > budget:
        # a batch is held about BATCH_COPIES times at once (its mapped pages, the float32 read, the conditioned or
        # normalised copy, products): batches that fit the budget (a review: 65,536-row batches of 300-d rows peaked
        # at 206 MiB under a 50 MB budget)
        rows = max(MIN_BATCH_ROWS, budget // (BATCH_COPIES * 4 * max(1, dim)))
        return Choice(
            "minibatch",
            {"batch_rows": int(rows)},
            f"input needs {float32_bytes / 2**30:.1f} GiB as float32, over the memory budget "
            f"({budget / 2**30:.1f} GiB): stream it with mini-batches of at most {rows:,} rows",
        )
    # Training on a sample of at least 256·K rows (auto_sample_rows) with k-means++ seeding, stopping once an
    # iteration improves the sample objective by < 5e-4: on the benchmark grid more iterations changed full-data
    # MSE by < 0.3% while costing up to 2× the time (docs/auto.md). Full-data polish passes cost ~1 assignment each and
    # are left to the caller (polish_iter=).
    # The sample is a lightweight coreset (Clusterer's default sampling): one extra pass over the rows buys an
    # unbiased estimate of the full objective, which a uniform sample is not when far outliers carry it.
    every_row = False
    if sample_per_centroid is None:
        sample = auto_sample_rows(n, k)
        size = f"max(256·K, N/{AUTO_SAMPLE_DIVISOR})={sample}"
        every_row = sample < n and compiled_lloyd(n, dim, k)
        if every_row:
            sample = n
    else:
        sample = int(sample_per_centroid) * k
        size = f"{int(sample_per_centroid)}·K={sample}"
    large = k >= AUTO_CANDIDATE_MIN_K and k * dim >= AUTO_CANDIDATE_MIN_KD
    rows = min(n, sample)  # the training rows
    # (the compiled loop cannot record them either)
    unrecorded = one_region_direct_e_step(rows, dim, k) or compiled_lloyd(rows, dim, k)
    candidates = AUTO_CANDIDATES if large and not unrecorded else 0
    init, seed_rows, trials = auto_seeding(rows, k, dim)
    if init == "random":
        every = (f"the {rows} rows are more than {AUTO_SEED_CACHE_BYTES >> 20} MiB"
                 if rows * max(1, dim) * 4 > AUTO_SEED_CACHE_BYTES else
                 f"every row would take {rows}·K row-steps, over 2^{AUTO_SEED_EVERY_ROW_STEPS.bit_length() - 1}")
        seeding = (f"K random rows (k-means++ on {AUTO_SEED_MIN_PER_CENTRE}·K rows would cost more than 1/"
                   f"{AUTO_SEED_DIVISOR} of a training E-step, and {every})")
    elif trials > 1:
        seeding = f"greedy k-means++ ({trials} draws per centre) on {seed_rows} rows"
    else:
        seeding = f"k-means++ on {seed_rows} rows"
    if every_row:
        where = ("all rows (under 8,192 rows the compiled Lloyd loop takes them all, in less time than drawing "
                 "and training on a sample and assigning every row after)")
    elif n <= sample:
        where = "all rows"
    elif sampling == "coreset":
        where = f"a ~{size}-row weighted coreset"
    else:
        where = f"a uniform {size}-row sample"
    return Choice(
        "dense-exact-row",
        {"polish_iter": 0, "tol": AUTO_TOL, "sample_rows": sample, "overrelax": AUTO_OVERRELAX,
         "max_iter": AUTO_MAX_ITER, "candidates": candidates, "init": init, "seed_rows": seed_rows,
         "init_trials": trials},
        f"fits in memory: {seeding}, then bounded, over-relaxed (β <= {AUTO_OVERRELAX:g}) Lloyd on {where} until "
        f"the objective improves < {AUTO_TOL:g} (at most {AUTO_MAX_ITER} iterations unless max_iter is given)"
        + (f"; from the third E-step on, two of every three training E-steps look only at {candidates} candidate "
           "centres per row, picked among its nearest at the last full one (K·D is large enough for that to pay; "
           "the last E-step and the final assignment are exact)" if candidates else ""),
    )
