"""HDF5 files in the ann-benchmarks layout (datasets ``train``, ``test``, ``neighbors``, ``distances``).

h5py is imported only when an HDF5 file is opened. Rows are read by slicing the dataset, so memory is
bounded by the chunk asked for; ``take`` uses HDF5 point selection for sparse index sets and range
reads otherwise.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInput
from ._paths import check_file
from .source import VectorSource, check_finite_rows, check_shape_dtype

__all__ = ["Hdf5Source", "HDF5_SUFFIXES"]

HDF5_SUFFIXES = (".hdf5", ".h5", ".he5")


def _h5py():
    try:
        import h5py
    except ImportError:
        raise InvalidInput(
            "reading HDF5 files needs the h5py package, which is not installed: pip install h5py "
            "(or install kvant with the [bench] extra)"
        ) from None
    return h5py


class Hdf5Source(VectorSource):
    """One 2-D dataset of an HDF5 file (``column=`` picks it; default ``"train"``).

    >>> # src = Hdf5Source("sift-128-euclidean.hdf5", column="test")
    """

    def __init__(self, path, column: str | None = None, name: str | None = None):
        p = check_file(path, "HDF5 file")
        h5py = _h5py()
        column = "train" if column is None else column
        if not isinstance(column, str):
            raise InvalidInput(f"column must be the name of an HDF5 dataset, got {column!r}")
        self.path = p
        self.column = column
        self.name = name or f"{p}:{column}"
        try:
            fh = h5py.File(p, "r")
        except OSError as exc:
            raise InvalidInput(f"{p}: not a readable HDF5 file ({exc})") from None
        try:
            try:
                if column not in fh:
                    names = _dataset_names(fh, h5py)
                    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
                    raise InvalidInput(f"{p}: no dataset {column!r} (datasets: {shown or 'none'})")
                ds = fh[column]
                is_ds = isinstance(ds, h5py.Dataset)
                shape, dtype = (ds.shape, ds.dtype) if is_ds else (None, None)
            except InvalidInput:  # a ValueError too, but already the message to give
                raise
            except (KeyError, RuntimeError, TypeError, ValueError, OSError) as exc:  # damaged metadata in h5py
                link = _link_of(fh, column, h5py)
                if link is not None:  # a soft or external link whose target is missing: the file is fine
                    raise InvalidInput(f"{p}: {column!r} is a link to {link}, which does not resolve") from None
                why = f"{type(exc).__name__}: {exc}"
                raise InvalidInput(f"{p}: damaged HDF5 file or dataset {column!r} ({why})") from None
            if not is_ds:
                raise InvalidInput(f"{p}: {column!r} is a group, not a dataset")
            if shape is None:  # h5py.Empty: a null dataspace has no shape at all
                raise InvalidInput(f"{p}: dataset {column!r} is empty (a null dataspace, no shape); "
                                   f"expected a 2-D dataset (n, dim)")
            check_shape_dtype(shape, dtype, self.name, "dataset")
        except BaseException:
            fh.close()
            raise
        self._file = fh
        self._ds = ds
        self.n, self.dim = (int(s) for s in ds.shape)
        self.dtype = ds.dtype

    def _read(self, start: int, stop: int) -> np.ndarray:
        try:
            return self._ds[start:stop]
        except OSError as exc:  # a damaged chunk: h5py reports the filter's failure as OSError
            raise InvalidInput(f"{self.name}: cannot read rows {start}..{stop - 1}: {exc}") from None

    def take(self, indices) -> np.ndarray:
        idx = self._check_indices(indices)
        if idx.size == 0:
            return np.empty((0, self.dim), np.float32)
        uniq, inverse = np.unique(idx, return_inverse=True)
        if uniq.size * 16 >= self.n:  # dense: range reads are faster than point selection
            rows = super().take(uniq)
        else:
            rows = np.empty((uniq.size, self.dim), np.float32)
            step = 4096
            for s in range(0, uniq.size, step):
                with np.errstate(over="ignore"):
                    try:
                        rows[s : s + step] = self._ds[uniq[s : s + step]]
                    except OSError as exc:  # a damaged chunk, as in _read
                        raise InvalidInput(f"{self.name}: cannot read the requested rows: {exc}") from None
            check_finite_rows(rows, uniq, self.name, lambda i: self._ds[int(uniq[i])])
        return rows[inverse.reshape(-1)]

    def close(self) -> None:
        """Close the HDF5 file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _dataset_names(fh, h5py) -> list[str]:
    """Every dataset's path in the file (groups walked, links not followed), sorted."""
    names: list[str] = []
    fh.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return sorted(names)


def _link_of(fh, column: str, h5py) -> str | None:
    """What ``column`` links to when it is a soft or external link (else None, also when that cannot be read)."""
    try:
        link = fh.get(column, getlink=True)
    except (KeyError, RuntimeError, TypeError, ValueError, OSError):
        return None
    if isinstance(link, h5py.SoftLink):
        return repr(link.path)
    if isinstance(link, h5py.ExternalLink):
        return f"{link.path!r} in {link.filename}"
    return None
