"""Numba's TBB threading layer where pip installed oneTBB (:func:`load_pip_tbb`).

Imported by :mod:`kvant._config` before anything can start Numba's threads: Numba picks its layer when its
threads start (the first parallel kernel, or ``numba.set_num_threads``, which ``KVANT_NUM_THREADS`` and
``NUMBA_NUM_THREADS`` trigger at import), and a library loaded after that is too late.
"""

from __future__ import annotations

import sys


def load_pip_tbb() -> str | None:
    """Make Numba's TBB threading layer loadable where pip installed oneTBB; returns the library loaded, if any.

    Numba takes the first layer that loads among "tbb", "omp" and "workqueue". pip's ``tbb`` wheel puts
    ``libtbb.so.12`` in ``<prefix>/lib``, outside the dynamic loader's search path, so the TBB layer failed to load and
    Numba fell back to GNU OpenMP, which is not fork-safe: a process forked after a kvant call (multiprocessing's
    default on Linux, a PyTorch DataLoader worker, a pre-forking web server) was killed on its first parallel kernel
    ("Terminating: fork() called from a process already using GNU OpenMP"). Loading the library by path first lets
    Numba's TBB layer find it. A ``NUMBA_THREADING_LAYER`` the user set still decides."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as maps:
            if "libtbb.so" in maps.read():  # some other package loaded a oneTBB already: one copy per process
                return None
    except OSError:
        pass
    import ctypes
    from importlib.metadata import PackageNotFoundError, files

    try:
        found = [f for f in files("tbb") or () if f.name == "libtbb.so.12"]
    except PackageNotFoundError:
        return None
    for f in found:
        path = str(f.locate())
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return path
    return None
