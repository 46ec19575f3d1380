import json

import numpy as np

from kvant.cli import main


def test_index_build_and_search(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", x[:4])
    out = tmp_path / "idx.kvant"
    assert main(["index", "build", str(tmp_path / "x.npy"), "-o", str(out), "--m", "4", "--nbits", "4",
                 "--refine", "8", "--json", "-q"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["n"] == 600 and built["code_size"] == 2
    assert main(["search", str(out), str(tmp_path / "q.npy"), "-k", "3", "--json",
                 "--output", str(tmp_path / "r.npz")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [row[0] for row in res["ids"]] == [0, 1, 2, 3]
    saved = np.load(tmp_path / "r.npz")
    assert saved["ids"].shape == (4, 3) and saved["ids"][:, 0].tolist() == [0, 1, 2, 3]
    assert main(["index", "build", str(tmp_path / "x.npy"), "-o", str(tmp_path / "f.kvant"), "--type", "flat"]) == 0
    assert main(["search", str(tmp_path / "f.kvant"), str(tmp_path / "q.npy"), "-k", "2"]) == 0
    assert "q0: 0:0" in capsys.readouterr().out


def test_cli_errors_map_to_exit_codes(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((300, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    # m does not divide dim -> bad input (2), message names the valid m
    assert main(["index", "build", str(tmp_path / "x.npy"), "-o", str(tmp_path / "i"), "--m", "4"]) == 2
    assert "m must be one of [1, 2, 3, 6]" in capsys.readouterr().err
    (tmp_path / "junk.kvant").write_bytes(b"not an index")
    # a missing or damaged index file is bad input (2), like a missing vector file
    assert main(["search", str(tmp_path / "junk.kvant"), str(tmp_path / "x.npy")]) == 2
    assert main(["search", str(tmp_path / "missing.kvant"), str(tmp_path / "x.npy")]) == 2
    assert main(["index", "build"]) == 2


UNWRITABLE = "/proc/kvant-cannot-write-here"  # /proc refuses new files even to root


def test_outputs_that_name_an_input_or_cannot_be_written_fail_before_the_work(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    # the index replaced the vectors it was built from
    assert main(["index", "build", str(tmp_path / "x.npy"), "-o", str(tmp_path / "x.npy"), "--type", "flat"]) == 2
    assert "same file" in capsys.readouterr().err and np.array_equal(np.load(tmp_path / "x.npy"), x)
    assert main(["index", "build", str(tmp_path / "x.npy"), "-o", UNWRITABLE, "--type", "flat"]) == 2
    assert "cannot be written" in capsys.readouterr().err
    idx = tmp_path / "i.npz"  # an index saved under a .npz name: search --output would overwrite it
    assert main(["index", "build", str(tmp_path / "x.npy"), "-o", str(idx), "--type", "flat", "-q"]) == 0
    before = idx.read_bytes()
    assert main(["search", str(idx), str(tmp_path / "x.npy"), "-k", "2", "--output", str(tmp_path / "i")]) == 2
    assert idx.read_bytes() == before
    assert main(["search", str(idx), str(tmp_path / "x.npy"), "-k", "2", "--output", UNWRITABLE + ".npz"]) == 2
    assert main(["search", str(idx), str(tmp_path / "x.npy"), "-k", "2", "--output", str(tmp_path)]) == 2
    capsys.readouterr()


def test_ignored_flags_are_refused(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "f.kvant"
    # --type flat silently dropped the PQ-only flags (exit 0)
    assert main(["index", "build", str(tmp_path / "x.npy"), "-o", str(out), "--type", "flat", "--m", "2", "--opq",
                 "--refine", "5", "--nbits", "4", "--train-rows", "30"]) == 2
    err = capsys.readouterr().err
    assert all(flag in err for flag in ("--m", "--opq", "--refine", "--nbits", "--train-rows")) and not out.exists()
    # (review) --seed too: a flat index has no randomness
    assert main(["index", "build", str(tmp_path / "x.npy"), "-o", str(out), "--type", "flat", "--seed", "123"]) == 2
    assert "--seed" in capsys.readouterr().err and not out.exists()
    assert main(["index", "build", str(tmp_path / "x.npy"), "-o", str(out), "--type", "flat", "-q"]) == 0
    assert main(["search", str(out), str(tmp_path / "x.npy"), "--show", "-1"]) == 2  # printed nothing, exit 0
    assert "--show" in capsys.readouterr().err
    # (review) flags that do nothing were accepted: --show beside --json, --column with 'self' queries
    assert main(["search", str(out), str(tmp_path / "x.npy"), "--json", "--show", "3"]) == 2
    assert "--show" in capsys.readouterr().err
    assert main(["tree", "build", str(tmp_path / "x.npy"), "-o", str(tmp_path / "t.kvant"), "-q"]) == 0
    assert main(["tree", "knn", str(tmp_path / "t.kvant"), "self", "-k", "2", "--column", "foo"]) == 2
    assert "--column" in capsys.readouterr().err


def test_index_build_seeding(tmp_path, capsys):
    import kvant

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32))
    out = tmp_path / "r.kvant"
    assert main(["index", "build", str(tmp_path / "x.npy"), "-o", str(out), "--m", "4", "--seeding", "random",
                 "-q"]) == 0
    assert kvant.load(out).codec.seeding == "random"
    assert main(["index", "build", str(tmp_path / "x.npy"), "-o", str(tmp_path / "f.kvant"), "--type", "flat",
                 "--seeding", "random"]) == 2  # a PQ-only flag
    assert "--seeding applies only to --type pq" in capsys.readouterr().err
