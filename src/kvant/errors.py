"""Exceptions and warnings raised by kvant. Every error kvant raises derives from :class:`KvantError`, every warning
it emits from :class:`KvantWarning`."""

from __future__ import annotations

import os
import sys
import warnings

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


def warn(message: str, category: type[KvantWarning] = KvantWarning) -> None:
    """Emit ``message`` as a ``category`` warning attributed to the first frame outside kvant (the user's line),
    whatever the depth of the entry point or wrapper that calls this."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(0), 0
    while frame is not None:
        name = frame.f_code.co_filename
        if "importlib" in name and "_bootstrap" in name:  # warnings skips the import machinery's frames
            frame = frame.f_back
            continue
        if not os.path.abspath(name).startswith(package):
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
