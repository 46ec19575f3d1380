"""Row-block parallelism (kvant._parallel): BLAS thread limits around the blocks."""

import json

import pytest


def test_blas_is_single_threaded_inside_row_blocks_and_restored_after_even_on_error():
    # The BLAS libraries loaded when kvant first enters a row block (numpy's, which kvant's GEMMs call) are limited;
    # one loaded later (scipy's or faiss's OpenBLAS, when another test imported them first in this worker) is not
    # kvant's to limit, so only the controlled ones are checked.
    from threadpoolctl import threadpool_info

    from kvant import _parallel
    from kvant._parallel import _blas_single_thread

    with _blas_single_thread():
        pass
    controlled = {lib.filepath for lib in _parallel._blas_libs}
    assert controlled  # numpy's BLAS at least

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and i["filepath"] in controlled]

    before = blas_threads()
    with _blas_single_thread():
        assert set(blas_threads()) == {1}
    assert blas_threads() == before
    with pytest.raises(RuntimeError), _blas_single_thread():
        assert set(blas_threads()) == {1}
        raise RuntimeError("inside")
    assert blas_threads() == before


_FORKED_WORKERS = """
import multiprocessing as mp
import numba
import numpy as np
import kvant
from kvant._parallel import numba_threading_layer


@numba.njit(parallel=True)
def bump(a):
    for i in numba.prange(a.shape[0]):
        a[i] += 1.0


def fit(seed):
    bump(np.zeros(64))  # a parallel kernel in the child, after the parent ran its own
    x = np.random.default_rng(seed).standard_normal((60_000, 16)).astype(np.float32)
    return float(kvant.Clusterer(k=8, seed=seed).fit(x).inertia_)  # row blocks on kvant's thread pool


if __name__ == "__main__":
    kvant.set_num_threads(2)
    bump(np.zeros(64))
    parent = fit(0)
    with mp.get_context("fork").Pool(2) as pool:
        children = pool.map_async(fit, [0, 1]).get(timeout=120)
    print(numba_threading_layer(), children[0] == parent, children[1] != parent)
"""


@pytest.mark.parametrize("threads_env", [{}, {"KVANT_NUM_THREADS": "2"}, {"NUMBA_NUM_THREADS": "1"}])
def test_fits_work_in_processes_forked_after_a_fit(threads_env):
    # multiprocessing's default start on Linux, DataLoader workers and pre-forking servers fork after the parent has
    # used kvant. Two ways this broke: the child inherited kvant's thread pool without its threads (the fit waited
    # forever), and on GNU OpenMP Numba kills a forked child at its first parallel kernel. kvant loads pip's oneTBB so
    # Numba runs on TBB, which is fork-safe. A thread count in the environment started Numba's threads at import,
    # before oneTBB was loaded, and left it on OpenMP (an audit: the forked Pool hung).
    import os
    import subprocess
    import sys
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("tbb")
    except PackageNotFoundError:
        pytest.skip("oneTBB is not installed: Numba falls back to GNU OpenMP, which is not fork-safe")
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_THREADING_LAYER", "KVANT_NUM_THREADS", "NUMBA_NUM_THREADS")} | threads_env
    run = subprocess.run([sys.executable, "-c", _FORKED_WORKERS], capture_output=True, text=True, timeout=300,
                         env=env, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["tbb", "True", "True"]


def test_row_blocks_from_threads_using_different_thread_counts():
    # Each count has its own pool; replacing the pool when the count changed shut it down under the other thread
    # ("cannot schedule new futures after shutdown").
    import threading

    from kvant._parallel import for_each_block

    errors = []

    def work(n_threads):
        try:
            for _ in range(200):
                seen = []
                for_each_block(64, 8, lambda s, e, seen=seen: seen.append((s, e)), n_threads=n_threads)
                assert sorted(seen) == [(s, s + 8) for s in range(0, 64, 8)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(2 + i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("env", ["KVANT_NUM_THREADS", "NUMBA_NUM_THREADS"])
def test_a_thread_count_from_the_environment_caps_every_blas(env):
    # (review) NUMBA_NUM_THREADS alone left BLAS at every core, and scipy's OpenBLAS (Numba's np.dot in compiled
    # code, loaded on first use) escaped the limit of set_num_threads
    import os
    import subprocess
    import sys

    code = ("import kvant, json; from threadpoolctl import threadpool_info; "
            "print(json.dumps([i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas']))")
    base = {k: v for k, v in os.environ.items() if k not in ("KVANT_NUM_THREADS", "NUMBA_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**base, env: "1"})
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts and all(c == 1 for c in counts)


def test_small_work_runs_every_block_on_the_calling_thread_and_large_work_uses_the_pool():
    # Handing a few microseconds of work to the pool costs more than doing it (SERIAL_WORK); real work still spreads.
    import threading

    from kvant._parallel import SERIAL_WORK, for_each_block

    def threads_used(work):
        seen = {}
        for_each_block(64, 8, lambda s, e: seen.setdefault((s, e), threading.get_ident()), n_threads=2, work=work)
        assert sorted(seen) == [(s, s + 8) for s in range(0, 64, 8)]  # every block, once
        return set(seen.values())

    assert threads_used(SERIAL_WORK - 1) == {threading.get_ident()}
    assert threading.get_ident() not in threads_used(SERIAL_WORK)
    assert threading.get_ident() not in threads_used(None)  # callers that give no estimate keep the pool
