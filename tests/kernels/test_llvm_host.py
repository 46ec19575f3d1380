"""The host queries kernels choose instructions and shapes by (kernels/_llvm.py)."""

import numba
from llvmlite import binding

from kvant.kernels import _llvm


def test_host_cpu_name_is_llvms_unless_numba_targets_another_cpu(monkeypatch):
    _llvm.host_cpu_name.cache_clear()
    try:
        monkeypatch.setattr(numba.config, "CPU_NAME", None)
        assert _llvm.host_cpu_name() == binding.get_host_cpu_name()
        _llvm.host_cpu_name.cache_clear()
        # compiling for another CPU: no host-specific choice may be taken
        monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
        assert _llvm.host_cpu_name() == ""
    finally:
        _llvm.host_cpu_name.cache_clear()


def test_host_features_are_empty_when_numba_targets_another_cpu(monkeypatch):
    _llvm.host_features.cache_clear()
    try:
        monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
        assert _llvm.host_features() == frozenset()
    finally:
        _llvm.host_features.cache_clear()


class _FakeLib:
    def __init__(self, architecture):
        self.architecture = architecture


class _FakeController:
    libs: list = []

    def select(self, internal_api):
        assert internal_api == "openblas"
        out = _FakeController()
        out.lib_controllers = list(self.libs)
        return out


def test_blas_avx512_is_false_only_for_openblas_cores_without_it(monkeypatch):
    import threadpoolctl

    monkeypatch.setattr(threadpoolctl, "ThreadpoolController", _FakeController)
    cases = [(["Haswell"], False), (["Zen"], False), (["SkylakeX"], True), (["SapphireRapids", "Cooperlake"], True),
             (["SkylakeX", "Haswell"], False), ([], True)]  # [] : MKL or BLIS only, taken to have AVX-512
    try:
        for cores, expected in cases:
            _llvm.blas_avx512.cache_clear()
            monkeypatch.setattr(_FakeController, "libs", [_FakeLib(c) for c in cores])
            assert _llvm.blas_avx512() is expected, cores
    finally:
        _llvm.blas_avx512.cache_clear()


def test_blas_avx512_reads_this_process_openblas():
    from threadpoolctl import threadpool_info

    cores = [i.get("architecture", "").lower() for i in threadpool_info() if i.get("internal_api") == "openblas"]
    assert _llvm.blas_avx512() == all(c in {"skylakex", "cooperlake", "sapphirerapids"} for c in cores)
