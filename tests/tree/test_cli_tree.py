"""`kvant tree build` / `kvant tree knn` with --json and --log-file."""

from __future__ import annotations

import json

import numpy as np

import kvant
from kvant.cli import main


def test_tree_build_and_knn(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.random((500, 3))
    Q = rng.random((7, 3))
    np.save(tmp_path / "p.npy", X)
    np.save(tmp_path / "q.npy", Q)
    log = tmp_path / "log.jsonl"
    out = tmp_path / "t.kvant"
    assert main(["tree", "build", str(tmp_path / "p.npy"), "-o", str(out), "--log-file", str(log), "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["n"] == 500 and built["telemetry"]["op"] == "fit"
    assert built["level_base"] == 1.5 and kvant.load(out).base is None  # (3-d points: the automatic base)
    argv = ["tree", "build", str(tmp_path / "p.npy"), "-o", str(tmp_path / "b.kvant"), "--base", "2", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["level_base"] == 2.0 and kvant.load(tmp_path / "b.kvant").base == 2.0
    assert main(["tree", "knn", str(out), str(tmp_path / "q.npy"), "-k", "4", "--json", "--log-file", str(log),
                 "-o", str(tmp_path / "r.npz")]) == 0
    res = json.loads(capsys.readouterr().out)
    ref_d, ref_i = kvant.CoverTree().fit(X).brute_force(Q, 4)
    assert np.array_equal(np.array(res["ids"]), ref_i)
    np.testing.assert_allclose(np.array(res["distances"]), ref_d)
    assert np.array_equal(np.load(tmp_path / "r.npz")["ids"], ref_i)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["command"] for r in records] == ["tree build", "tree knn"]
    assert {"traversal", "net", "total"} <= set(records[0]) and "query" in records[1]
    assert main(["tree", "knn", str(out), "self", "-k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ids"][0] == [-1, -1, -1] and res["ids"][2][:2] in ([0, 1], [1, 0])


def test_tree_cli_errors(tmp_path, capsys):
    np.save(tmp_path / "p.npy", np.random.default_rng(0).random((20, 2)))
    out = tmp_path / "t.kvant"
    assert main(["tree", "build", str(tmp_path / "p.npy"), "-o", str(out)]) == 0
    assert main(["tree", "knn", str(out), str(tmp_path / "p.npy"), "-k", "0"]) == 2
    assert main(["tree", "knn", str(out), str(tmp_path / "p.npy"), "-k", "21"]) == 2
    assert main(["tree", "knn", str(tmp_path / "missing.kvant"), "self"]) == 2  # bad input, as a missing .npy
    assert main(["tree", "build", str(tmp_path / "p.npy"), "-o", str(out), "--metric", "cosine"]) == 2
    (tmp_path / "empty.npy").write_bytes(b"")  # np.load raises EOFError on it: still bad input, exit 2
    assert main(["tree", "build", str(tmp_path / "empty.npy"), "-o", str(tmp_path / "e.kvant")]) == 2
    assert main(["tree", "knn", str(out), str(tmp_path / "empty.npy"), "-k", "1"]) == 2
    np.save(tmp_path / "scalar.npy", np.float64(0.5))  # (review) a 0-d file was an "internal error", exit 1
    assert main(["tree", "build", str(tmp_path / "scalar.npy"), "-o", str(tmp_path / "s.kvant")]) == 2
    assert main(["tree", "knn", str(out), str(tmp_path / "scalar.npy"), "-k", "1"]) == 2
    capsys.readouterr()


def _strict(text):
    def bad(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=bad)


def test_tree_knn_json_is_strict_and_one_d_query_is_one_query(tmp_path, capsys):
    X = np.random.default_rng(0).random((50, 3))
    np.save(tmp_path / "p.npy", X)
    np.save(tmp_path / "q1.npy", X[3] + 0.01)  # one query, stored 1-D
    out = tmp_path / "t.kvant"
    assert main(["tree", "build", str(tmp_path / "p.npy"), "-o", str(out), "--json"]) == 0
    capsys.readouterr()
    assert main(["tree", "knn", str(out), "self", "-k", "3", "--json"]) == 0
    res = _strict(capsys.readouterr().out)  # row 0 has no predecessors: padding is null, not Infinity
    assert res["distances"][0] == [None, None, None] and res["ids"][0] == [-1, -1, -1]
    assert main(["tree", "knn", str(out), str(tmp_path / "q1.npy"), "-k", "3", "--json"]) == 0
    res = _strict(capsys.readouterr().out)
    assert res["nq"] == 1 and res["ids"][0][0] == 3


def test_unwritable_outputs_are_clean_errors(tmp_path, capsys):
    np.save(tmp_path / "p.npy", np.random.default_rng(0).random((30, 2)))
    missing = tmp_path / "no" / "such" / "dir"
    code = main(["tree", "build", str(tmp_path / "p.npy"), "-o", str(tmp_path / "t.kvant"),
                 "--log-file", str(missing / "log.jsonl")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "t.kvant").exists()  # checked before the build, not after it
    for argv in (["tree", "build", str(tmp_path / "p.npy"), "-o", str(missing / "t.kvant")],
                 ["index", "build", str(tmp_path / "p.npy"), "-o", str(missing / "i.kvant"), "--type", "flat"],
                 ["cluster", str(tmp_path / "p.npy"), "-k", "2", "-o", str(tmp_path / "a.npy"),
                  "--centroids", str(tmp_path / "a.npy")]):
        assert main(argv) == 2, argv
    assert not (tmp_path / "a.npy").exists()


def test_tree_cli_reads_a_named_hdf5_dataset(tmp_path, capsys):
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "ann.hdf5", "w") as f:
        f["train"] = rng.random((60, 3)).astype(np.float32)
        f["test"] = rng.random((4, 3)).astype(np.float32)
    out = tmp_path / "t.kvant"
    assert main(["tree", "build", str(tmp_path / "ann.hdf5"), "--column", "train", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["tree", "knn", str(out), str(tmp_path / "ann.hdf5"), "--column", "test", "-k", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nq"] == 4


def test_residual_tree_knn_takes_only_row_indices(tmp_path, capsys):
    # coordinates or fractional values were flattened and truncated into "row indices" (exit 0 with wrong rows)
    rng = np.random.default_rng(0)
    X = rng.random((60, 2))
    rc = kvant.ResidualCorrelation.from_points(X, kvant.RBF(0.5, 1.0), n_inducing=10)
    out = tmp_path / "rc.kvant"
    kvant.CoverTree(rc).fit().save(out)
    np.save(tmp_path / "coords.npy", rng.random((4, 3)))
    np.save(tmp_path / "frac.npy", np.array([2.9, 7.5]))
    np.save(tmp_path / "rows.npy", np.array([[3], [7]]))
    assert main(["tree", "knn", str(out), str(tmp_path / "coords.npy"), "-k", "2"]) == 2
    assert main(["tree", "knn", str(out), str(tmp_path / "frac.npy"), "-k", "2"]) == 2
    capsys.readouterr()
    assert main(["tree", "knn", str(out), str(tmp_path / "rows.npy"), "-k", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r[0] for r in res["ids"]] == [3, 7]


# /proc refuses new files even to root, on every Linux: an output there cannot be written
UNWRITABLE = "/proc/kvant-cannot-write-here"


def test_log_file_naming_an_input_or_output_is_refused_before_the_work(tmp_path, capsys):
    # the log lines were appended to the file after the save: a tree that no longer loads, a damaged .npy
    X = np.random.default_rng(0).random((30, 2))
    np.save(tmp_path / "p.npy", X)
    np.save(tmp_path / "q.npy", X[:3])
    tree, pts, qs = tmp_path / "t.kvant", tmp_path / "p.npy", tmp_path / "q.npy"
    assert main(["tree", "build", str(pts), "-o", str(tree), "--log-file", str(tree)]) == 2
    assert "--log-file" in capsys.readouterr().err and not tree.exists()
    assert main(["tree", "build", str(pts), "-o", str(tree), "--log-file", str(pts)]) == 2
    assert not tree.exists() and np.array_equal(np.load(pts), X)
    assert main(["tree", "build", str(pts), "-o", str(pts)]) == 2  # the output would replace the points
    assert np.array_equal(np.load(pts), X)
    assert main(["tree", "build", str(pts), "-o", str(tree)]) == 0
    before = tree.read_bytes()
    for log in (tree, qs, tmp_path / "r.npz"):
        assert main(["tree", "knn", str(tree), str(qs), "-k", "2", "-o", str(tmp_path / "r.npz"),
                     "--log-file", str(log)]) == 2, log
    capsys.readouterr()
    assert tree.read_bytes() == before and np.array_equal(np.load(qs), X[:3])
    assert not (tmp_path / "r.npz").exists()
    assert isinstance(kvant.load(tree), kvant.CoverTree)


def test_unwritable_tree_outputs_fail_before_the_work(tmp_path, capsys):
    np.save(tmp_path / "p.npy", np.random.default_rng(0).random((30, 2)))
    tree = tmp_path / "t.kvant"
    assert main(["tree", "build", str(tmp_path / "p.npy"), "-o", UNWRITABLE + ".kvant"]) == 2
    assert "cannot be written" in capsys.readouterr().err
    # the tree was saved, then the log failed with exit 1
    assert main(["tree", "build", str(tmp_path / "p.npy"), "-o", str(tree), "--log-file", UNWRITABLE]) == 2
    assert not tree.exists()
    assert main(["tree", "build", str(tmp_path / "p.npy"), "-o", str(tree)]) == 0
    assert main(["tree", "knn", str(tree), "self", "-k", "2", "-o", UNWRITABLE + ".npz"]) == 2
    assert main(["tree", "knn", str(tree), "self", "-k", "2", "--log-file", str(tmp_path)]) == 2  # a directory
    capsys.readouterr()


def test_tree_knn_all_only_with_self(tmp_path, capsys):
    np.save(tmp_path / "p.npy", np.random.default_rng(0).random((20, 2)))
    tree = tmp_path / "t.kvant"
    assert main(["tree", "build", str(tmp_path / "p.npy"), "-o", str(tree)]) == 0
    assert main(["tree", "knn", str(tree), str(tmp_path / "p.npy"), "-k", "2", "--all"]) == 2  # was ignored
    assert "--all" in capsys.readouterr().err
    assert main(["tree", "knn", str(tree), "self", "-k", "2", "--all", "--json"]) == 0


def test_tree_points_follow_the_io_dtype_rules(tmp_path, capsys):
    # int64/uint64 .npy files bypassed as_source and were cast silently (cluster and index build refuse them)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "i64.npy", rng.integers(0, 9, (20, 2)).astype(np.int64))
    np.save(tmp_path / "u64.npy", rng.integers(0, 9, (20, 2)).astype(np.uint64))
    np.save(tmp_path / "u8.npy", rng.integers(0, 9, (20, 2)).astype(np.uint8))
    np.save(tmp_path / "p.npy", rng.random((20, 2)))
    for name in ("i64", "u64"):
        assert main(["tree", "build", str(tmp_path / f"{name}.npy"), "-o", str(tmp_path / "t.kvant")]) == 2
        assert "is not supported" in capsys.readouterr().err
    assert main(["tree", "build", str(tmp_path / "u8.npy"), "-o", str(tmp_path / "t.kvant")]) == 0  # as_source takes it
    assert main(["tree", "build", str(tmp_path / "p.npy"), "-o", str(tmp_path / "t.kvant")]) == 0
    assert main(["tree", "knn", str(tmp_path / "t.kvant"), str(tmp_path / "i64.npy"), "-k", "2"]) == 2
    assert "is not supported" in capsys.readouterr().err


def test_tree_build_residual_makes_the_vecchia_tree_the_api_makes(tmp_path, capsys):
    # `kvant tree knn` answered residual trees, but only Python could build one: the CLI path a GP user needs
    rng = np.random.default_rng(3)
    X = rng.random((300, 2))
    np.save(tmp_path / "x.npy", X)
    out = tmp_path / "rc.kvant"
    argv = ["tree", "build", str(tmp_path / "x.npy"), "-o", str(out), "--metric", "residual", "--kernel", "rbf",
            "--lengthscale", "0.3,0.6", "--variance", "2", "--inducing", "40", "--seed", "7", "--json"]
    assert main(argv) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["n"] == 300 and built["dim"] is None
    assert built["residual"].pop("metric_seconds") > 0  # ResidualCorrelation.from_points, timed apart from the tree
    assert built["residual"] == {"kernel": "rbf", "lengthscale": [0.3, 0.6], "variance": 2.0, "n_inducing": 40,
                                 "seed": 7, "points_dim": 2}
    rc = kvant.ResidualCorrelation.from_points(X, kvant.RBF([0.3, 0.6], 2.0), n_inducing=40, seed=7)
    want_d, want_i = kvant.CoverTree(rc).fit().knn_self(5, predecessors=True)
    assert main(["tree", "knn", str(out), "self", "-k", "5", "-o", str(tmp_path / "r.npz"), "-q"]) == 0
    with np.load(tmp_path / "r.npz") as r:
        np.testing.assert_array_equal(r["ids"], want_i)
        np.testing.assert_allclose(r["distances"], want_d, rtol=1e-12)
    capsys.readouterr()
    # defaults: Matérn 5/2, lengthscale 1, variance 1, 512 inducing points (at most n), seed 0
    assert main(["tree", "build", str(tmp_path / "x.npy"), "-o", str(out), "--metric", "residual", "--json"]) == 0
    defaults = json.loads(capsys.readouterr().out)["residual"]
    assert defaults.pop("metric_seconds") > 0
    assert defaults == {"kernel": "matern52", "lengthscale": 1.0, "variance": 1.0, "n_inducing": 300, "seed": 0,
                        "points_dim": 2}


def test_tree_build_residual_options_are_checked(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((30, 2)))
    base = ["tree", "build", str(tmp_path / "x.npy"), "-o", str(tmp_path / "t.kvant")]
    for extra in (["--kernel", "rbf"], ["--lengthscale", "2"], ["--inducing", "5"], ["--variance", "1"],
                  ["--seed", "1"]):
        assert main(base + extra) == 2  # a residual option with another metric is refused, not ignored
        assert "apply only to --metric residual" in capsys.readouterr().err
    for bad in (["--lengthscale", "a,b"], ["--lengthscale", "1,2,3"], ["--lengthscale", "-1"], ["--variance", "0"],
                ["--inducing", "0"], ["--jitter", "-1"], ["--kernel", "cauchy"]):
        assert main(base + ["--metric", "residual"] + bad) == 2, bad
        assert capsys.readouterr().err.strip()
    assert not (tmp_path / "t.kvant").exists()  # nothing written by a refused build
