"""Path helpers shared by the file-format sources."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidInput


def names_a_directory(text: str) -> bool:
    """Whether ``text`` ends in a slash or is "." / "..": Path drops a trailing "/" or "/.", so "new/" would be
    written as the file "new"."""
    return text.endswith(("/", os.sep)) or os.path.basename(text) in (".", "..")


def exists(p: Path) -> bool:
    """``p.exists()``, with an error other than "no such file" (a name too long, say) as InvalidInput."""
    try:
        return p.exists()
    except OSError as exc:  # Path.exists swallows only ENOENT-like errors: ENAMETOOLONG, EACCES ... escape
        raise InvalidInput(f"cannot access {p}: {exc.strerror or exc}") from None


def missing(p: Path, what: str) -> InvalidInput:
    """The error for a path that does not exist: a broken symbolic link is named as one."""
    if p.is_symlink():
        return InvalidInput(f"{what} is a broken symbolic link: {str(p)!r} -> {os.readlink(p)!r}")
    head, sep, tail = str(p).rpartition(":")
    if sep and head and tail and Path(head).is_file():  # "file.hdf5:test", the form kvant's messages name datasets in
        return InvalidInput(f"{what} not found: {str(p)!r} (to read {tail!r} of {head}, give the file and "
                            f"column={tail!r}, or --column {tail} on the command line)")
    return InvalidInput(f"{what} not found: {str(p)!r}")


def check_file(path, what: str = "file") -> Path:
    """``path`` as a Path to an existing, readable regular file, else InvalidInput."""
    p = Path(os.fspath(path))
    if not exists(p):
        raise missing(p, what)
    if not p.is_file():
        raise InvalidInput(f"{what} is not a regular file: {str(p)!r}")
    if not os.access(p, os.R_OK):
        raise InvalidInput(f"{what} is not readable (permission denied): {str(p)!r}")
    return p
