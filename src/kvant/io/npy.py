"""``.npy`` files, opened memory-mapped (nothing is read until a chunk is asked for)."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInput
from ._paths import check_file
from .source import ArraySource, MappedPages

_MAGIC = b"\x93NUMPY"


class NpySource(ArraySource):
    """A ``.npy`` file opened with ``np.load(path, mmap_mode="c")`` (copy-on-write: kvant never writes, but
    Numba compiles read-only arrays as a separate type, so a writeable view avoids a second compilation).
    Nothing may write into ``self.array``: sequential scans drop already-read pages from the process
    (``MADV_DONTNEED``, see :class:`~kvant.io.source.MappedPages`), which would discard such writes.

    The file is never read whole: chunks are converted to float32 one at a time and checked for
    NaN/inf as they are read (the first bad row is named in the error).

    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.npy")
    >>> np.save(path, np.ones((10, 4), np.float32))
    >>> NpySource(path).n
    10
    """

    def __init__(self, path, name: str | None = None):
        p = check_file(path, ".npy file")
        name = name or str(p)
        try:
            with open(p, "rb") as f:
                magic = f.read(len(_MAGIC))
        except OSError as exc:
            raise InvalidInput(f"{name}: cannot read .npy file ({exc})") from None
        if magic != _MAGIC:  # np.load would take it for pickled data and suggest allow_pickle=True
            what = "truncated or empty" if _MAGIC.startswith(magic) else "not a .npy file"
            raise InvalidInput(f"{name}: {what} (it does not start with the .npy magic string \\x93NUMPY)")
        try:
            array = np.load(p, mmap_mode="c", allow_pickle=False)
        except ValueError as exc:  # object dtype, pickled data, bad header
            raise InvalidInput(f"{name}: not a readable .npy array ({exc})") from None
        except (OSError, EOFError) as exc:
            raise InvalidInput(f"{name}: cannot read .npy file ({exc})") from None
        if not isinstance(array, np.ndarray):  # pragma: no cover - np.load on .npz returns NpzFile
            raise InvalidInput(f"{name}: expected a .npy array, got {type(array).__name__}")
        if not isinstance(array, np.memmap):
            # np.load returns a plain array for zero-size files; keep the "file source" semantics anyway.
            array = np.asarray(array)
        self.path = p
        super().__init__(array, name=name)
        if not self.in_memory and (array.flags.c_contiguous or array.flags.f_contiguous):
            self._pages = MappedPages.of(array, private_ok=True)  # kvant never writes into this map
