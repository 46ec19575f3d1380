"""LLVM IR helpers shared by the kernels' ``@intrinsic`` code generators (``assign.py``, ``pq.py``, ...), and the
host facts they choose instructions and paths by (CPU features and name, the BLAS's kernels)."""

from __future__ import annotations

import functools

from llvmlite import ir


def llvm_fn(module: ir.Module, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    """The module's declaration of the LLVM function or intrinsic ``name``, declared on first use."""
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(ret, args), name=name)


def splat(builder: ir.IRBuilder, value: ir.Value, vector: ir.VectorType) -> ir.Value:
    """``value`` broadcast to every lane of a vector of type ``vector``."""
    i32 = ir.IntType(32)
    first = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(i32, 0))
    return builder.shuffle_vector(first, ir.Constant(vector, ir.Undefined),
                                  ir.Constant(ir.VectorType(i32, vector.count), [0] * vector.count))


def sum_lanes(builder: ir.IRBuilder, vector: ir.Value) -> ir.Value:
    """The sum of a vector's lanes by pairwise halves (a fixed order, so the result does not depend on the host)."""
    i32 = ir.IntType(32)
    total, width = vector, vector.type.count
    while width > 1:
        width //= 2
        lo = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(i32, width), list(range(width))))
        hi = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(i32, width), list(range(width, 2 * width))))
        total = builder.fadd(lo, hi)
    return builder.extract_element(total, ir.Constant(i32, 0))


@functools.cache
def host_features() -> frozenset[str]:
    """The CPU features LLVM reports for this host ("avx2", "avx512f", "amx-tile", ...), for the kernels that pick
    instructions or shapes by host. Empty when Numba compiles for another CPU (``NUMBA_CPU_NAME``: then only portable
    code may be generated) or when the query is unavailable."""
    import numba
    from llvmlite import binding

    if numba.config.CPU_NAME:
        return frozenset()
    try:
        return frozenset(f[1:] for f in binding.get_host_cpu_features().flatten().split(",") if f.startswith("+"))
    except Exception:  # pragma: no cover - llvmlite without feature detection
        return frozenset()


@functools.cache
def host_cpu_name() -> str:
    """LLVM's name for this host's CPU ("znver4", "sapphirerapids", ...), for choices that depend on the
    microarchitecture rather than on its features (e.g. whether 512-bit FMAs run at full rate). Empty when Numba
    compiles for another CPU (``NUMBA_CPU_NAME``) or when the query is unavailable."""
    import numba
    from llvmlite import binding

    if numba.config.CPU_NAME:
        return ""
    try:
        return str(binding.get_host_cpu_name())
    except Exception:  # pragma: no cover - llvmlite without the query
        return ""


# LLVM cpu names of AVX-512 hosts whose 512-bit FMAs run at half rate (two 256-bit pipes: AMD Zen 4), where the
# kernels' choices measured on full-rate hosts (Intel) do not hold: kvant.cluster.assign's int16 rules, FlatIndex's
# BLAS blocks.
HALF_RATE_AVX512 = frozenset({"znver4"})


def half_rate_avx512() -> bool:
    """Whether this host is one of :data:`HALF_RATE_AVX512`."""
    return host_cpu_name() in HALF_RATE_AVX512


# OpenBLAS cores (threadpoolctl's "architecture") whose sgemm uses AVX-512.
_OPENBLAS_AVX512_CORES = frozenset({"skylakex", "cooperlake", "sapphirerapids"})


@functools.cache
def blas_avx512() -> bool:
    """Whether numpy's BLAS runs AVX-512 kernels, as far as threadpoolctl can tell: False only when an OpenBLAS loaded
    so far (at kvant's import, numpy's) has a core that lacks them. OpenBLAS 0.3.31 has no AMD Zen 5 target and runs
    its AVX2 Haswell kernels there (1 thread 94-97 GFLOP/s), where the fused AVX-512 kernels are well ahead. Other
    libraries (MKL, BLIS) count as AVX-512."""
    try:
        from threadpoolctl import ThreadpoolController

        libs = ThreadpoolController().select(internal_api="openblas").lib_controllers
    except Exception:  # pragma: no cover - threadpoolctl failed to inspect the process
        return True
    return all(str(getattr(lib, "architecture", "")).lower() in _OPENBLAS_AVX512_CORES for lib in libs)
