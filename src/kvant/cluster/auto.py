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


@dataclass(frozen=True)
class Choice:
    algorithm: str
    params: dict = field(default_factory=dict)
    reason: str = ""


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


def choose_algorithm(n: int, dim: int, k: int, metric: str, input_bytes: int, sampling: str = "coreset",
                     sample_per_centroid: int = 256) -> Choice:
    """Pick the concrete algorithm for ``auto``. See docs/auto.md for the measurements behind it.

    ``sampling`` and ``sample_per_centroid`` are the caller's settings; they only shape the reason text."""
    float32_bytes = n * dim * 4
    if float32_bytes > memory_budget_bytes():
        return Choice(
            "minibatch",
            {},
            f"input needs {float32_bytes / 2**30:.1f} GiB as float32, over the memory budget "
            f"({memory_budget_bytes() / 2**30:.1f} GiB): stream it with mini-batches",
        )
    # Training on 256·K rows (FAISS's default) with k-means++ seeding, stopping once an iteration improves the
    # sample objective by < 5e-4: on the benchmark grid more iterations changed full-data MSE by < 0.3%
    # while costing up to 2× the time (docs/auto.md). Full-data polish passes cost ~1 assignment each and
    # are left to the caller (polish_iter=).
    # The sample is a lightweight coreset (Clusterer's default sampling): one extra pass over the rows buys an
    # unbiased estimate of the full objective, which a uniform sample is not when far outliers carry it.
    per = int(sample_per_centroid)
    sample = per * k
    large = k >= AUTO_CANDIDATE_MIN_K and k * dim >= AUTO_CANDIDATE_MIN_KD
    candidates = AUTO_CANDIDATES if large and not one_region_direct_e_step(min(n, sample), dim, k) else 0
    if n <= sample:
        where = "all rows"
    elif sampling == "coreset":
        where = f"a ~{per}·K={sample}-row weighted coreset"
    else:
        where = f"a uniform {per}·K={sample}-row sample"
    return Choice(
        "dense-exact-row",
        {"polish_iter": 0, "tol": AUTO_TOL, "sample_per_centroid": 256, "overrelax": AUTO_OVERRELAX,
         "max_iter": AUTO_MAX_ITER, "candidates": candidates},
        f"fits in memory: k-means++ and bounded, over-relaxed (β <= {AUTO_OVERRELAX:g}) Lloyd on {where} until "
        f"the objective improves < {AUTO_TOL:g} (at most {AUTO_MAX_ITER} iterations unless max_iter is given)"
        + (f"; from the third E-step on, two of every three training E-steps look only at {candidates} candidate "
           "centres per row, picked among its nearest at the last full one (K·D is large enough for that to pay; "
           "the last E-step and the final assignment are exact)" if candidates else ""),
    )
