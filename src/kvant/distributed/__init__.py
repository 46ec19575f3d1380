"""kvant on many machines through Dask (the optional ``dask`` extra: ``pip install 'kvant[dask]'``).

The rows stay where Dask keeps them: a ``dask.array.Array`` chunked along rows (each chunk must fit in one
worker's memory). Every task runs kvant's single-machine kernels on one chunk, and only small results (k×D
partial sums, counts, scalars, codes) travel back. See ``docs/distributed.md``.
"""

from .kmeans import DaskClusterer, as_dask_array, encode

__all__ = ["DaskClusterer", "as_dask_array", "encode"]
