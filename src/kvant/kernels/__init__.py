"""Numba compute kernels: pure functions on clean arrays. No validation, no policy, no I/O.

Every kernel has a plain NumPy reference in :mod:`kvant.bench.reference` that tests compare against.
"""
