"""Row-block parallelism shared by every BLAS-plus-Numba loop in kvant.

Alternating a multithreaded BLAS call with a ``parallel=True`` Numba pass makes each thread pool spin while
the other works; on this project's 2-core reference machine that cost 5-20× (measured in
``benchmarks/clustering.py`` development: 3.8 GFLOP/s instead of 150). So kvant parallelises one level up:
``T`` Python threads each take whole row blocks and run single-threaded BLAS plus a serial ``nogil``
Numba kernel on them. Rows are independent, so results do not depend on the thread count.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ._config import get_num_threads

# One pool per thread count, kept: replacing a pool when the count changed shut it down under any other Python thread
# still submitting to it ("cannot schedule new futures after shutdown" from two threads using 2 and 3 threads).
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_blas_libs = None


class _BlasOneThread:
    """Context manager: the BLAS libraries loaded at first use run single-threaded inside it, their counts restored
    after. Talks to threadpoolctl's per-library controllers directly: ``ThreadpoolController.limit`` cost ~12 µs per
    call against ~1 µs here, and a small fit enters this once per E-step (digits K=10: 13 times in a 4 ms fit)."""

    __slots__ = ("changed",)

    def __enter__(self):
        global _blas_libs
        if _blas_libs is None:
            from threadpoolctl import ThreadpoolController

            _blas_libs = ThreadpoolController().select(user_api="blas").lib_controllers
        self.changed = []
        for lib in _blas_libs:
            n = lib.get_num_threads()
            if n != 1:
                lib.set_num_threads(1)
                self.changed.append((lib, n))
        return self

    def __exit__(self, *exc):
        for lib, n in self.changed:
            lib.set_num_threads(n)
        return False


_blas_single_thread = _BlasOneThread


def _forget_pools_in_child() -> None:
    # A forked child inherits the pool objects but none of their threads: work submitted to one would wait forever
    # (a fit in a multiprocessing worker forked after a fit in the parent hung). The child makes its own, under a
    # fresh lock (another thread may have held the parent's at the fork).
    global _pools, _pools_lock
    _pools, _pools_lock = {}, threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_in_child)


def _executor(n_threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(n_threads)
        if pool is None:
            pool = _pools[n_threads] = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="kvant")
        return pool


# Below this much work (``for_each_block``'s ``work``: about one unit per multiply-add or value read) the blocks run on
# the calling thread: handing them to the pool and waiting for its threads cost ~50-80 µs per call (Zen 4 host,
# 2026-12-06), more than such work takes on one core. A 10,000 × 2 fit at K = 5 made five such calls (1.9 ms).
SERIAL_WORK = 1 << 18


def for_each_block(n: int, block_rows: int, fn: Callable[[int, int], None], n_threads: int | None = None,
                   work: float | None = None) -> None:
    """Call ``fn(start, stop)`` on every row block of ``range(n)``, spread over threads, BLAS single-threaded.

    ``fn`` must release the GIL for its heavy work (NumPy matmul and ``nogil`` Numba kernels do) and
    write only to its own rows. ``work``: the whole call's work in ~multiply-adds (rows × D × K for an assignment);
    below ``SERIAL_WORK`` every block runs on the calling thread.
    """
    if n <= 0:
        return
    n_threads = n_threads or get_num_threads()
    blocks = [(s, min(n, s + block_rows)) for s in range(0, n, block_rows)]
    if n_threads <= 1 or len(blocks) == 1 or (work is not None and work < SERIAL_WORK):
        with _blas_single_thread() if n_threads > 1 else _nullcontext():
            for s, e in blocks:
                fn(s, e)
        return
    n_threads = min(n_threads, len(blocks))
    # Threads pull the next block as they finish one (next() on a shared count is atomic under the GIL), so a
    # thread slowed by anything (a hypervisor's steal time, another process) leaves its blocks to the others
    # instead of keeping them all waiting at the end.
    order = itertools.count()

    def worker() -> None:
        for i in order:
            if i >= len(blocks):
                return
            fn(*blocks[i])

    with _blas_single_thread():
        pool = _executor(n_threads)
        futures = [pool.submit(worker) for _ in range(n_threads)]
        for f in futures:
            f.result()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_layer: str | None = None

# The layers whose threads wait for the next region without a wake-up per region; the per-step regions of k-means++
# seeding pay off on these (both measured below) and not on "workqueue".
SPINNING_LAYERS = ("tbb", "omp")


def numba_threading_layer() -> str:
    """The threading layer Numba's ``parallel=True`` kernels run on here ("tbb", "omp" or "workqueue"), found by
    running a tiny parallel kernel once (Numba names its layer only after one has run). Per-step parallel regions
    (k-means++ seeding) pay off on "tbb" and "omp" (8,192×128 rows, K = 1024: 64 and 56 ms against 130 ms serial); on
    "workqueue" a region per step cost up to 10x the serial time (1,797×64 rows, K = 1024: 98 against 10 ms)."""
    global _layer
    if _layer is None:
        import numba
        import numpy as np

        @numba.njit(parallel=True, cache=True)
        def touch(a):
            for i in numba.prange(a.shape[0]):
                a[i] += 1.0

        touch(np.zeros(2))
        _layer = str(numba.threading_layer())
    return _layer


