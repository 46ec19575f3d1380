"""Write a file so that it is either complete or not there: a temporary file in the target's directory, flushed
to disk, then renamed over the target. A failed write (disk full, a size limit, an interrupt) leaves an existing
file at that path as it was. Used by :func:`kvant.persist.write` and the CLI's ``.npy`` / ``.npz`` outputs."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | os.PathLike):
    """``with replacing(path) as fh:`` write to the binary file ``fh``; on a clean exit it becomes ``path``
    (keeping an existing file's permissions), on an exception it is removed. OSError from creating the temporary
    file propagates before the body runs."""
    # Through a symlink to its target, as open() writes: renaming over the link itself replaced it with a file and
    # left its target stale (a review). A device, FIFO or socket at the path is refused: the rename would replace
    # the node itself (as root, index.save("/dev/null") replaced /dev/null with a file).
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    if os.path.lexists(path) and not path.is_file() and not path.is_dir():
        raise OSError(errno.EINVAL, "it exists and is not a regular file (a device, FIFO or socket), which kvant will "
                                    "not replace", str(path))
    directory = path.parent if str(path.parent) else Path(".")
    # not mkstemp (always 0600): O_EXCL with mode 0666 gives what a plain new file gets under the umask, without
    # touching the process-wide umask; a short name: the target's own may already be near the 255-byte limit
    tmp = str(directory / f".kvant-{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        try:  # overwriting keeps the existing file's permissions
            os.chmod(tmp, path.stat().st_mode & 0o777)
        except FileNotFoundError:
            pass
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
