"""Exceptions and warnings raised by kvant. Every error kvant raises derives from :class:`KvantError`, every warning
it emits from :class:`KvantWarning`."""

from __future__ import annotations

__all__ = ["KvantError", "InvalidInput", "DimensionMismatch", "EmptyIndex", "PersistError", "KvantWarning",
           "EmptyClusterWarning"]


class KvantError(Exception):
    """Base class of every error raised by kvant."""


class InvalidInput(KvantError, ValueError):
    """An argument or an input array is not what kvant expects (bad shape, NaN, unknown name, ...)."""


class DimensionMismatch(InvalidInput):
    """Vectors have a different dimensionality from the one the object was built for."""


class EmptyIndex(KvantError):
    """An operation needs data, but the object holds none (search before add, predict before fit)."""


class PersistError(KvantError, OSError):
    """A file could not be written, or a file being loaded is missing, truncated or corrupted."""


class KvantWarning(UserWarning):
    """Base class of every warning kvant emits (filter them with ``warnings.simplefilter(..., kvant.KvantWarning)``)."""


class EmptyClusterWarning(KvantWarning):
    """A fit ended with clusters that hold no row (fewer distinct rows than k, or rows float32 cannot tell apart)."""
