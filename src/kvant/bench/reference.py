"""Plain NumPy references for every Numba kernel. Slow, obvious, and the ground truth in tests.

Nothing here is optimised; do not import from here in library code.
"""

from __future__ import annotations


# === distance / assign / topk (issue 2) ===

# === pq (issue 3) ===

# === tree (issue 4) ===
