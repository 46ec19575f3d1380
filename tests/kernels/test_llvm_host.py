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
