"""Kernels stay loadable from Numba's on-disk cache.

A cached jitted function that calls a ``parallel=True`` one can crash with a segmentation fault when a later
process loads it from the cache (numba#8578). kmeanspp did, from 2026-12-04 (its ``n_parts`` split called a
parallel helper): a process loading its second cached signature died. The rule now is that parallel loops live
in the function the caller enters, never in a function another jitted function calls; the first test checks
that rule over the whole package, the second replays the crash.
"""

import ast
import os
import pathlib
import subprocess
import sys

import kvant

SRC = pathlib.Path(kvant.__file__).parent


def _decorators(node: ast.FunctionDef) -> str:
    return " ".join(ast.unparse(d) for d in node.decorator_list)


def test_no_jitted_function_calls_a_parallel_one():
    jitted, parallel = [], set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and "jit" in _decorators(node):
                jitted.append((path.relative_to(SRC), node))
                if "parallel=True" in _decorators(node):
                    parallel.add(node.name)
    assert parallel, "found no parallel kernels: the scan is broken"
    calls = sorted(
        f"{path}: {node.name} calls {ast.unparse(sub.func)}"
        for path, node in jitted
        for sub in ast.walk(node)
        if isinstance(sub, ast.Call) and ast.unparse(sub.func).split(".")[-1] in parallel
    )
    assert not calls, "jitted functions calling parallel=True ones (numba#8578):\n" + "\n".join(calls)


_SEEDING = """
import sys
import numpy as np
from kvant.kernels.lloyd import kmeanspp
x = np.random.default_rng(0).standard_normal((3000, 64)).astype(np.float32)
u = np.random.default_rng(1).random(100)
w = np.empty(0)
rows = kmeanspp(x, 100, u, 0, w) if sys.argv[1] == "serial" else kmeanspp(x, 100, u, 0, w, n_parts=2)
print(" ".join(map(str, rows[:5])))
"""


def test_kmeanspp_signatures_load_from_a_shared_cache(tmp_path):
    # Two signatures compiled by two processes, then each loaded by a third and a fourth: the fourth crashed before.
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    outputs = []
    for mode in ("serial", "split", "serial", "split"):
        run = subprocess.run([sys.executable, "-c", _SEEDING, mode], env=env, capture_output=True, text=True,
                             timeout=300, check=False)
        assert run.returncode == 0, f"{mode} run exited {run.returncode}: {run.stderr[-2000:]}"
        outputs.append(run.stdout)
    assert len(set(outputs)) == 1  # the split picks the serial rows
