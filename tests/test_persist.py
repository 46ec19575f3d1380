"""persist.read on files whose checksum is valid but whose header is malformed (a writer bug or a hand-made
file): every case must be a PersistError, never a TypeError/KeyError/ValueError."""

from __future__ import annotations

import hashlib
import json

import pytest

import kvant
from kvant import persist
from kvant.errors import PersistError


def _raw(path, header) -> None:
    body = json.dumps(header).encode()
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
