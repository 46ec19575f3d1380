"""The one on-disk container used by every saveable kvant object.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"KVANTPF\\0"
    8       4     format version (uint32)
    12      4     reserved, zero
    16      8     length of the JSON header in bytes (uint64)
    24      8     total file length in bytes (uint64)
    32      32    BLAKE2b-256 digest of bytes [64, file length)
    64      H     JSON header (UTF-8): {"kind", "meta", "arrays": [{name, dtype, shape, offset, nbytes}]}
    ...           zero padding, then each array's raw little-endian bytes at a 64-byte aligned offset

Writes go to a temporary file in the same directory, are fsync'ed, then renamed over the target, so a
crash never leaves a half-written file under the final name. Loading checks the magic, the version, the
recorded length against the real length, the checksum, and every array's extent before trusting
anything; any problem raises :class:`~kvant.errors.PersistError`. No pickle, ever: arrays are plain
numeric data and everything else is JSON.

Objects register a loader for their ``kind`` with :func:`register`; :func:`load` dispatches on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidInput, PersistError
from .io._atomic import replacing
from .io._paths import names_a_directory

__all__ = ["MAGIC", "FORMAT_VERSION", "write", "read", "load", "register"]

MAGIC = b"KVANTPF\0"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIIQQ32s")  # magic, version, reserved, header_len, file_len, digest
_DATA_START = 64
_ALIGN = 64
_ALLOWED_KINDS = set("biuf")  # bool, signed, unsigned, float: no objects, no strings
_MAX_NDIM = 32  # NumPy refuses more than 64 dimensions; no kvant array has more than a few

_loaders: dict[str, Callable[[dict, dict[str, np.ndarray]], Any]] = {}


def register(kind: str):
    """Class decorator / function decorator: register ``loader(meta, arrays)`` for ``kind``.

    Used as ``@register("PQIndex")`` on a classmethod-like function, or on a class that defines
    ``_from_persist(meta, arrays)``.
    """

    def deco(obj):
        fn = getattr(obj, "_from_persist", obj)
        _loaders[kind] = fn
        return obj

    return deco


def _path(path) -> Path:
    """``path`` as a Path: a str, bytes or os.PathLike, else InvalidInput (not a bare TypeError)."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str | os.PathLike):
        raise InvalidInput(f"path must be a str or os.PathLike, got {type(path).__name__}")
    text = os.fspath(path)
    if "\0" in text:  # the OS cannot name such a file; open() would raise a bare ValueError
        raise InvalidInput(f"path {text!r} contains a NUL byte")
    if names_a_directory(text):  # save("missing_dir/") wrote a file named missing_dir (a review)
        raise PersistError(f"path {text!r} names a directory (it ends with a slash or a dot); give a file name")
    return Path(path)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def write(path: str | os.PathLike, kind: str, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically write ``arrays`` (name -> numeric ndarray) and JSON-able ``meta`` under ``kind``."""
    path = _path(path)
    entries = []
    prepared = []
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        if arr.dtype.kind not in _ALLOWED_KINDS:
            raise PersistError(f"array {name!r} has dtype {arr.dtype}; only numeric arrays can be saved")
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        prepared.append(arr)
        entries.append({"name": str(name), "dtype": arr.dtype.str, "shape": list(arr.shape), "nbytes": arr.nbytes})
    # Offsets depend on the header length, which depends on the offsets' digits: iterate to a fixpoint.
    offset_guess = 0
    while True:
        pos = _align(_DATA_START + offset_guess)
        for e in entries:
            e["offset"] = pos
            pos = _align(pos + e["nbytes"])
        header = json.dumps({"kind": kind, "meta": meta, "arrays": entries}, sort_keys=True).encode()
        if _align(_DATA_START + len(header)) == _align(_DATA_START + offset_guess):
            break
        offset_guess = len(header)
    file_len = pos if entries else _DATA_START + len(header)

    hasher = hashlib.blake2b(digest_size=32)
    chunks: list[tuple[int, bytes | memoryview]] = [(_DATA_START, header)]
    for e, arr in zip(entries, prepared):
        chunks.append((e["offset"], memoryview(arr.reshape(-1).view(np.uint8))))
    # Hash the body exactly as laid out on disk, padding included.
    cursor = _DATA_START
    for off, data in chunks:
        if off > cursor:
            hasher.update(bytes(off - cursor))
        hasher.update(data)
        cursor = off + len(data)
    if file_len > cursor:
        hasher.update(bytes(file_len - cursor))

    pre = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(header), file_len, hasher.digest())
    try:
        with replacing(path) as fh:
            fh.write(pre)
            fh.write(bytes(_DATA_START - _PREAMBLE.size))
            cursor = _DATA_START
            for off, data in chunks:
                fh.write(bytes(off - cursor))
                fh.write(data)
                cursor = off + len(data)
            fh.write(bytes(file_len - cursor))
    except OSError as exc:
        raise PersistError(f"cannot write {path}: {exc}") from exc


def read(
    path: str | os.PathLike, expected_kind: str | None = None, mmap: bool = False
) -> tuple[str, dict, dict[str, np.ndarray]]:
    """Read and verify a container. Returns ``(kind, meta, arrays)``.

    With ``mmap=True`` arrays are read-only memory maps into the file (the checksum is still verified
    once, by streaming the file); otherwise they are independent in-memory copies.
    """
    path = _path(path)
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
        fh = open(path, "rb") if regular else None  # a FIFO would block open() forever; a directory cannot be read
    except FileNotFoundError as exc:  # (worded as the readers word a missing input)
        raise PersistError(f"file not found: {str(path)!r}") from exc
    except OSError as exc:
        raise PersistError(f"cannot open {path}: {exc}") from exc
    if fh is None:
        raise PersistError(f"cannot open {path}: not a regular file")
    # Everything below reads this one open file (a save renaming a new file over the path meanwhile changes nothing)
    with fh:
        try:
            return _read_open(fh, path, expected_kind, mmap)
        except PersistError:  # (an OSError subclass) already says what went wrong
            raise
        except OSError as exc:
            raise PersistError(f"cannot read {path}: {exc}") from exc


def _read_open(fh, path: Path, expected_kind: str | None, mmap: bool) -> tuple[str, dict, dict[str, np.ndarray]]:
    size = os.fstat(fh.fileno()).st_size
    pre = fh.read(_DATA_START)
    if len(pre) < _DATA_START:
        raise PersistError(f"{path}: file is {size} bytes, too short to be a kvant file")
    magic, version, _reserved, header_len, file_len, digest = _PREAMBLE.unpack_from(pre)
    if magic != MAGIC:
        raise PersistError(f"{path}: not a kvant file (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise PersistError(f"{path}: format version {version} is not supported (expected {FORMAT_VERSION})")
    if _reserved != 0:
        raise PersistError(f"{path}: reserved header field is {_reserved}, expected 0 (corrupted?)")
    if file_len != size:
        raise PersistError(f"{path}: file is {size} bytes but its header says {file_len} (truncated?)")
    if _DATA_START + header_len > size:
        raise PersistError(f"{path}: header length {header_len} runs past the end of the file")
    hasher = hashlib.blake2b(digest_size=32)
    body = fh.read() if not mmap else None
    if body is not None:
        hasher.update(body)
    else:
        while block := fh.read(1 << 24):
            hasher.update(block)
    if hasher.digest() != digest:
        raise PersistError(f"{path}: checksum mismatch, the file is corrupted")
    if body is not None:
        header_bytes = body[:header_len]
    else:
        fh.seek(_DATA_START)
        header_bytes = fh.read(header_len)
    try:
        header = json.loads(header_bytes.decode())
        kind = header["kind"]
        meta = header["meta"]
        entries = header["arrays"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise PersistError(f"{path}: unreadable header: {exc}") from exc
    if not (isinstance(kind, str) and isinstance(meta, dict) and isinstance(entries, list)
            and all(isinstance(e, dict) for e in entries)):
        raise PersistError(f"{path}: malformed header (kind, meta or arrays has the wrong type)")
    if expected_kind is not None and kind != expected_kind:
        raise PersistError(f"{path}: holds a {kind!r}, expected a {expected_kind!r}")
    arrays: dict[str, np.ndarray] = {}
    for e in entries:
        try:
            name = str(e["name"])
            dtype = np.dtype(e["dtype"])
            shape = tuple(int(s) for s in e["shape"])
            offset, nbytes = int(e["offset"]), int(e["nbytes"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(1e400)
            raise PersistError(f"{path}: bad array entry {e!r}") from exc
        if dtype.kind not in _ALLOWED_KINDS or any(s < 0 for s in shape) or len(shape) > _MAX_NDIM:
            raise PersistError(f"{path}: bad array entry {e!r}")
        count = 1
        for s_ in shape:  # Python ints: a crafted shape cannot overflow to a small product
            count *= s_
        if count * dtype.itemsize != nbytes or offset < _DATA_START + header_len:
            raise PersistError(f"{path}: array {name!r} has inconsistent size or offset")
        if offset + nbytes > size:
            raise PersistError(f"{path}: array {name!r} runs past the end of the file")
        if nbytes == 0:
            try:
                arr = np.empty(shape, dtype=dtype)  # np.memmap refuses empty maps
            except (ValueError, OverflowError, MemoryError) as exc:  # e.g. shape [0, 10**30]
                raise PersistError(f"{path}: array {name!r} has an impossible shape {list(shape)}") from exc
        else:
            try:
                if mmap:
                    arr = np.memmap(fh, dtype=dtype, mode="r", offset=offset, shape=shape)  # the verified file
                else:
                    start = offset - _DATA_START
                    arr = np.frombuffer(body[start : start + nbytes], dtype=dtype).reshape(shape).copy()
            except (ValueError, OverflowError) as exc:  # consistent sizes NumPy still refuses
                raise PersistError(f"{path}: array {name!r} cannot be read as {dtype} {list(shape)}: {exc}") from exc
        arrays[name] = arr
    return kind, meta, arrays


def load(path: str | os.PathLike, mmap: bool = False):
    """Load any saved kvant object (index, codec, tree, clusterer) from ``path``.

    The file's checksum is verified first; a missing, truncated or corrupted file raises
    :class:`~kvant.errors.PersistError`. With ``mmap=True`` (default False) the object's arrays are read-only
    memory maps into the file instead of copies in the process's memory (the checksum pass still reads the file
    once, through the page cache).

    >>> import kvant, numpy as np, tempfile, os
    >>> idx = kvant.FlatIndex(4); idx.add(np.eye(4, dtype="float32"))   # doctest: +SKIP
    >>> idx.save("/tmp/flat.kvant"); kvant.load("/tmp/flat.kvant")       # doctest: +SKIP
    """
    if not isinstance(mmap, (bool, np.bool_)):
        raise InvalidInput(f"mmap must be True or False, got {mmap!r}")
    kind, meta, arrays = read(path, mmap=mmap)
    if kind not in _loaders:
        # Loaders register on import; make sure every subpackage has been imported.
        import kvant  # noqa: F401
    try:
        loader = _loaders[kind]
    except KeyError:
        raise PersistError(f"{path}: unknown object kind {kind!r}") from None
    try:
        return loader(meta, arrays)
    except PersistError:
        raise
    except Exception as exc:  # a loader that trips on inconsistent content means a bad file
        raise PersistError(f"{path}: inconsistent {kind} content: {exc}") from exc
