"""persist.read on files whose checksum is valid but whose header is malformed (a writer bug or a hand-made
file): every case must be a PersistError, never a TypeError/KeyError/ValueError."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import kvant
from kvant import persist
from kvant.errors import InvalidInput, PersistError


def _raw(path, header, tail: bytes = b"") -> None:
    body = (header if isinstance(header, bytes) else json.dumps(header).encode()) + tail
    digest = hashlib.blake2b(body, digest_size=32).digest()
    pre = persist._PREAMBLE.pack(persist.MAGIC, persist.FORMAT_VERSION, 0, len(body), persist._DATA_START + len(body),
                                 digest)
    path.write_bytes(pre + bytes(persist._DATA_START - len(pre)) + body)


@pytest.mark.parametrize("header", [
    {"kind": "FlatIndex", "meta": {}, "arrays": {"a": 1}},
    {"kind": ["FlatIndex"], "meta": {}, "arrays": []},
    {"kind": "FlatIndex", "meta": [], "arrays": []},
    {"kind": "FlatIndex", "meta": {}, "arrays": [{"dtype": "<f4", "shape": [0], "offset": 64, "nbytes": 0}]},
    {"kind": "FlatIndex", "meta": {}, "arrays": [{"name": "x", "dtype": "<f4", "shape": [2**32, 2**32],
                                                  "offset": 200, "nbytes": 0}]},
    {"kind": "FlatIndex", "meta": {}, "arrays": ["x"]},
    {"kind": "FlatIndex", "meta": {"dim": "four"}, "arrays": []},
])
def test_malformed_header_is_persist_error(tmp_path, header):
    _raw(tmp_path / "f.kvant", header)
    with pytest.raises(PersistError):
        kvant.load(tmp_path / "f.kvant")
    with pytest.raises(PersistError):
        kvant.load(tmp_path / "f.kvant", mmap=True)


@pytest.mark.parametrize("mmap", ["yes", 1, None])
def test_load_takes_mmap_as_a_bool_only(tmp_path, mmap):
    path = tmp_path / "f.kvant"
    idx = kvant.FlatIndex(4)
    idx.add(np.eye(4, dtype=np.float32))
    idx.save(path)
    with pytest.raises(InvalidInput, match="mmap"):
        kvant.load(path, mmap=mmap)
    assert kvant.load(path, mmap=np.bool_(True)).ntotal == 4


def test_crafted_header_with_a_valid_checksum_is_persist_error(tmp_path):
    # JSON nested past the recursion limit, a shape or offset of 1e400 (int() overflows) and a shape of more
    # dimensions than NumPy allows, with its 4 bytes present: each must be a PersistError, not a raw error
    _raw(tmp_path / "deep.kvant", b"[" * 100000 + b"]" * 100000)
    for field in ("shape", "offset"):
        entry = {"name": "x", "dtype": "<f4", "shape": [1], "offset": 4096, "nbytes": 4}
        entry[field] = [float("inf")] if field == "shape" else float("inf")
        _raw(tmp_path / f"{field}.kvant", {"kind": "FlatIndex", "meta": {}, "arrays": [entry]})
    head = b'{"kind": "FlatIndex", "meta": {}, "arrays": [{"name": "x", "dtype": "<f4", "shape": %s, ' \
           b'"offset": %08d, "nbytes": 4}]}'
    shape = json.dumps([1] * 70).encode()
    length = len(head % (shape, 0))
    _raw(tmp_path / "ndim.kvant", head % (shape, persist._DATA_START + length), tail=b"\0" * 4)
    for name in ("deep", "shape", "offset", "ndim"):
        for mmap in (False, True):
            with pytest.raises(PersistError):
                kvant.load(tmp_path / f"{name}.kvant", mmap=mmap)


def test_saved_files_get_a_normal_mode(tmp_path):  # noqa: D103
    import os
    import stat

    old = os.umask(0o022)
    try:
        kvant.FlatIndex(2).save(tmp_path / "a.kvant")
        assert stat.S_IMODE((tmp_path / "a.kvant").stat().st_mode) == 0o644  # not mkstemp's 0600
        os.chmod(tmp_path / "a.kvant", 0o640)
        kvant.FlatIndex(2).save(tmp_path / "a.kvant")  # overwriting keeps the existing mode
        assert stat.S_IMODE((tmp_path / "a.kvant").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_thread_count_reaches_calls_from_worker_threads():
    from concurrent.futures import ThreadPoolExecutor

    import numba
    import numpy as np

    previous = kvant.get_num_threads()
    kvant.set_num_threads(1)
    try:
        seen = []

        @kvant._config.with_threads
        def probe():
            seen.append(numba.get_num_threads())

        with ThreadPoolExecutor(1) as ex:
            ex.submit(probe).result()
            x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
            ex.submit(kvant.PQ(8, 2, 4).fit, x).result()
        assert seen == [1]
    finally:
        kvant.set_num_threads(previous)


@pytest.mark.parametrize("shape", [[0, 10**30], [0, 2**63], [0, 2**40, 2**40]])
def test_empty_array_with_impossible_shape_is_persist_error(tmp_path, shape):
    _raw(tmp_path / "f.kvant", {"kind": "FlatIndex", "meta": {}, "arrays": [
        {"name": "x", "dtype": "<f4", "shape": shape, "offset": 4096, "nbytes": 0}]})
    for mmap in (False, True):
        with pytest.raises(PersistError):
            kvant.load(tmp_path / "f.kvant", mmap=mmap)


def test_saving_does_not_touch_the_process_umask(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("persist.write changed the process umask"))
    kvant.FlatIndex(2).save(tmp_path / "u.kvant")
    assert kvant.load(tmp_path / "u.kvant").ntotal == 0


def test_save_to_a_name_near_the_file_name_limit(tmp_path):
    import numpy as np

    name = "i" * 249 + ".kvant"  # 255 bytes, the limit: legal; the temporary file must not be longer
    idx = kvant.FlatIndex(3)
    idx.add(np.eye(3, dtype=np.float32))
    idx.save(tmp_path / name)
    assert len(kvant.load(tmp_path / name)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left


def test_paths_the_os_cannot_open_are_kvant_errors(tmp_path):
    import os

    import numpy as np

    idx = kvant.FlatIndex(2)
    idx.add(np.ones((1, 2), np.float32))
    for bad in ("a\0b.kvant", str(tmp_path / "x\0.kvant")):
        with pytest.raises(kvant.InvalidInput, match="NUL"):
            idx.save(bad)
        with pytest.raises(kvant.InvalidInput, match="NUL"):
            kvant.load(bad)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # nobody writes it: open() would block forever
    with pytest.raises(PersistError, match="not a regular file"):
        kvant.load(fifo)
    with pytest.raises(PersistError, match="not a regular file") as err:
        kvant.load(tmp_path)
    assert str(err.value).count(str(tmp_path)) == 1  # said once (PersistError is an OSError: it was wrapped again)
    bad = tmp_path / "x.kvant"
    idx.save(bad)
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 1
    bad.write_bytes(bytes(raw))
    with pytest.raises(PersistError, match="checksum") as err:
        kvant.load(bad)
    assert str(err.value).count(str(bad)) == 1


@pytest.mark.parametrize("mmap", [False, True])
def test_load_reads_one_file_while_saves_replace_it(tmp_path, monkeypatch, mmap):
    # A save renames a new file over the path between the loader's checksum pass and its header read / maps: the
    # loader must keep reading the file it verified (it re-opened the path, and failed or mapped an unchecked file).
    import numpy as np

    path = tmp_path / "x.kvant"
    small, big = kvant.FlatIndex(2), kvant.FlatIndex(2)
    small.add(np.ones((1, 2), np.float32))
    big.add(np.arange(2000, dtype=np.float32).reshape(1000, 2), ids=np.arange(1000) + 7)
    small.save(path)
    real = persist._read_open
    replaced = []

    def racing(fh, p, kind, m):
        if not replaced:
            big.save(path)  # the path now names another, valid file
            replaced.append(True)
        return real(fh, p, kind, m)

    monkeypatch.setattr(persist, "_read_open", racing)
    got = kvant.load(path, mmap=mmap)
    assert len(got) == 1  # the file that was open, verified


def test_an_opq_file_relabelled_as_pq_is_refused(tmp_path):
    # (review) the PQ loader took the codebooks and ignored the rotation and mean beside them
    import numpy as np

    x = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    opq = kvant.OPQ(8, 2, nbits=4, seed=0).fit(x)
    opq.save(tmp_path / "o.kvant")
    _, meta, arrays = persist.read(tmp_path / "o.kvant")
    persist.write(tmp_path / "p.kvant", "PQ", meta, arrays)
    with pytest.raises(PersistError, match="arrays"):
        kvant.load(tmp_path / "p.kvant")


def test_a_missing_file_is_named_as_the_readers_name_one(tmp_path):
    with pytest.raises(PersistError, match=r"^file not found: '.*none\.kvant'$"):
        kvant.load(tmp_path / "none.kvant")
    with pytest.raises(PersistError, match="cannot open .*not a regular file"):
        kvant.load(tmp_path)


@pytest.mark.parametrize("suffix", ["/", "/.", "/.."])
def test_a_path_naming_a_directory_is_refused(tmp_path, suffix):
    # (review) Path drops a trailing "/" or "/.": save("missing_dir/") wrote a file named missing_dir
    flat = kvant.FlatIndex(2)
    target = str(tmp_path / "missing_dir") + suffix
    with pytest.raises(PersistError, match="names a directory"):
        flat.save(target)
    assert not (tmp_path / "missing_dir").exists()
    flat.save(tmp_path / "f.kvant")
    with pytest.raises(PersistError, match="names a directory"):
        kvant.load(str(tmp_path / "f.kvant") + "/")


def test_save_writes_through_a_symlink_and_refuses_a_fifo(tmp_path):
    # (review) the rename replaced the link itself with a file, leaving its target stale, and replaced a device or
    # FIFO node with a file (as root, index.save("/dev/null") broke /dev/null for the machine)
    import os
    import stat

    flat = kvant.FlatIndex(4)
    flat.add(np.ones((3, 4), np.float32))
    flat.save(tmp_path / "v3.kvant")
    (tmp_path / "current.kvant").symlink_to("v3.kvant")
    flat.add(np.zeros((2, 4), np.float32))
    flat.save(tmp_path / "current.kvant")
    assert (tmp_path / "current.kvant").is_symlink()
    assert kvant.load(tmp_path / "v3.kvant").ntotal == 5
    (tmp_path / "dangling.kvant").symlink_to("new.kvant")
    flat.save(tmp_path / "dangling.kvant")  # creates the link's target, as open() would
    assert (tmp_path / "dangling.kvant").is_symlink() and kvant.load(tmp_path / "new.kvant").ntotal == 5
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(PersistError, match="not a regular file"):
        flat.save(tmp_path / "fifo")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.kvant", "dangling.kvant", "fifo", "new.kvant",
                                                          "v3.kvant"]  # no temporary file left behind
