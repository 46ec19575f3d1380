"""Process-wide settings: thread count, seeds, environment knobs and the machine's cache size.

``KVANT_NUM_THREADS`` (read at import) or :func:`set_num_threads` sets the number of threads used by
every Numba kernel *and* by the BLAS library behind NumPy, so that a benchmark or a user's run is
reproducible: same seed + same thread count gives the same result.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numba
import numpy as np

from ._tbb import load_pip_tbb

# before _init_from_env below, whose set_num_threads starts Numba's threads and so fixes its threading layer: with
# KVANT_NUM_THREADS or NUMBA_NUM_THREADS set, loading oneTBB later (it was loaded when _parallel was imported) left
# Numba on GNU OpenMP, and a Pool forked after a fit hung (an audit)
load_pip_tbb()

__all__ = ["set_num_threads", "get_num_threads", "rng", "check_seed", "with_threads"]

_num_threads: int | None = None
_blas_limiter = None


def _max_threads() -> int:
    return int(numba.config.NUMBA_NUM_THREADS)


def set_num_threads(n: int | None) -> int:
    """Use ``n`` threads in kvant kernels and BLAS (``None`` = all cores). Returns the value set.

    >>> import kvant
    >>> kvant.set_num_threads(1)
    1
    """
    from threadpoolctl import threadpool_limits

    from .errors import InvalidInput

    global _num_threads, _blas_limiter
    cap = _max_threads()
    if n is None:
        n = cap
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise InvalidInput(f"number of threads must be a positive integer, got {n!r}")
    n = min(int(n), cap)
    numba.set_num_threads(n)
    # Numba's np.dot inside compiled code calls scipy's own OpenBLAS, which is loaded on first use: load it now, or
    # the limit below (which reaches the libraries already loaded) missed it (a review: 2 threads under a limit of 1)
    try:
        import scipy.linalg.cython_blas  # noqa: F401
    except ImportError:  # pragma: no cover - scipy is a Numba linear-algebra dependency, normally present
        pass
    # threadpoolctl's limiter stays in force until it is replaced: that is the global setting we want.
    _blas_limiter = threadpool_limits(limits=n)
    _num_threads = n
    return n


def with_threads(fn):
    """Decorator for public entry points: apply the kvant thread count in the *calling* thread.

    ``numba.set_num_threads`` is thread-local, so a count set in the main thread would not reach a call made
    from a worker thread (a ThreadPoolExecutor, a web server); this re-applies it on entry (a cheap check).
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        n = _num_threads
        if n is not None and numba.get_num_threads() != n:
            numba.set_num_threads(n)
        return fn(*args, **kwargs)

    return wrapper


def get_num_threads() -> int:
    """The number of threads kvant kernels use."""
    return _num_threads if _num_threads is not None else numba.get_num_threads()


@functools.cache
def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache Linux reports (the last level shared by the cores); 32 MiB if unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


def rng(seed: int | None) -> np.random.Generator:
    """The one way kvant turns a user seed into a generator (PCG64)."""
    return np.random.default_rng(check_seed(seed))


def check_seed(seed) -> int | None:
    from .errors import InvalidInput

    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InvalidInput(f"seed must be a non-negative integer or None, got {seed!r}")
    return int(seed)


def env_num_threads(value: str) -> int:
    """``KVANT_NUM_THREADS`` as a thread count; InvalidInput unless it is a positive integer (the CLI's check)."""
    from .errors import InvalidInput

    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise InvalidInput(f"KVANT_NUM_THREADS={value!r} is not a positive integer")
    return n


def _is_kvant_command() -> bool:
    """True when this process is the ``kvant`` command (the console script, ``python -m kvant`` or ``-m kvant.cli``)."""
    import sys

    if Path(sys.argv[0]).name in ("kvant", "kvant.exe"):
        return True
    argv = list(getattr(sys, "orig_argv", ()))
    return any(a == "-m" and b in ("kvant", "kvant.cli") for a, b in zip(argv, argv[1:]))


def _init_from_env() -> None:
    value = os.environ.get("KVANT_NUM_THREADS")
    if not value and os.environ.get("NUMBA_NUM_THREADS") and numba.config.NUMBA_NUM_THREADS < (os.cpu_count() or 1):
        # NUMBA_NUM_THREADS alone capped the kernels but not BLAS, so seeded OPQ training (a BLAS product) differed
        # from a KVANT_NUM_THREADS run of the same count (a review)
        set_num_threads(numba.config.NUMBA_NUM_THREADS)
        return
    if value:
        try:
            set_num_threads(env_num_threads(value))
        except Exception:  # a bad env var must not break import (env_num_threads is the one check)
            if _is_kvant_command():  # the command reports it as a usage error itself (exit 2, one line)
                return
            from .errors import warn

            warn(f"ignoring KVANT_NUM_THREADS={value!r}: not a positive integer")  # (names the user's import line)


_init_from_env()
