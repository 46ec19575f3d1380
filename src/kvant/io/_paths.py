"""Path helpers shared by the file-format sources."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidInput


def check_file(path, what: str = "file") -> Path:
    """``path`` as a Path to an existing, readable regular file, else InvalidInput."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise InvalidInput(f"{what} not found: {str(p)!r}")
    if not p.is_file():
        raise InvalidInput(f"{what} is not a regular file: {str(p)!r}")
    if not os.access(p, os.R_OK):
        raise InvalidInput(f"{what} is not readable (permission denied): {str(p)!r}")
    return p
