"""The kvant command end to end: cluster, demo, info, exit codes."""

import json
import subprocess
import sys

import numpy as np
import pytest

import kvant
from kvant.cli import main
from kvant.errors import InvalidInput


def test_python_dash_m_kvant_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "kvant", "info", "--json"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["kvant"] == kvant.__version__
    bad = subprocess.run([sys.executable, "-m", "kvant", "cluster"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("kvant")


def test_cluster_npy_json_end_to_end(tmp_path):
    x = np.random.default_rng(0).standard_normal((2000, 10)).astype(np.float32)
    np.save(tmp_path / "data.npy", x)
    out = subprocess.run(
        [sys.executable, "-m", "kvant.cli", "cluster", str(tmp_path / "data.npy"), "-k", "16", "--json",
         "-o", str(tmp_path / "labels.npy")],
        capture_output=True, text=True, check=False,
    )
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["n"] == 2000 and payload["k"] == 16 and payload["algorithm"].startswith("dense-exact")
    labels = np.load(tmp_path / "labels.npy")
    assert labels.shape == (2000,) and sum(payload["cluster_sizes"]) == 2000
    assert np.bincount(labels, minlength=16).tolist() == payload["cluster_sizes"]
    assert payload["mse"] > 0


def test_cluster_reports_empty_clusters_as_a_one_line_warning(tmp_path):
    # in a process of its own: under pytest the warnings plugin records warnings instead of printing them
    x = np.repeat(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32), 20, axis=0)
    np.save(tmp_path / "d.npy", x)
    captured = subprocess.run([sys.executable, "-m", "kvant.cli", "cluster", str(tmp_path / "d.npy"), "-k", "8", "-q",
                               "--json"], capture_output=True, text=True, check=False)
    assert captured.returncode == 0, captured.stderr
    assert json.loads(captured.stdout)["cluster_sizes"].count(0) == 3  # stdout stays JSON only
    assert captured.stderr.strip().splitlines() == [
        "kvant: warning: 3 of the k=8 clusters are empty (ids 5, 6, 7): the input has fewer distinct rows than k, "
        "or rows too close to tell apart in float32"]


def test_cluster_init_starts_from_given_centres(tmp_path, capsys, blob_files):
    x_path, c_path, y = blob_files
    centres = np.load(c_path)
    argv = ["cluster", str(x_path), "-k", "4", "--init", str(c_path), "--max-iter", "1",
            "-o", str(tmp_path / "labels.npy"), "--json"]
    assert main(argv) == 0
    assert "init=" in json.loads(capsys.readouterr().out)["auto_reason"]
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), y)  # cluster j is blob j
    assert main(argv[:3] + ["3"] + argv[4:]) == 2  # k = 3 with 4 given centres
    assert "shape (3, dim)" in capsys.readouterr().err
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "4", "--init", str(tmp_path / "none.npy")]) == 2
    np.savez(tmp_path / "c.npz", centres=centres)
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "4", "--init", str(tmp_path / "c.npz")]) == 2
    assert "an .npz archive" in capsys.readouterr().err
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "4", "--init", str(tmp_path / "c.npy"), "--centroids",
                 str(tmp_path / "c.npy")]) == 2  # would overwrite its own start
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), centres)
    capsys.readouterr()


def test_errors_print_as_one_line_whatever_the_library_wrote(tmp_path, capsys, monkeypatch):
    # (a review: pyarrow's message for a damaged page spans three lines, and kvant passed it on as it was)
    import kvant.cluster

    def fail(self, *args, **kwargs):
        raise InvalidInput("x.parquet: cannot decode rows after row 0: Couldn't deserialize thrift:\n"
                           "Deserializing page header failed.\n")

    monkeypatch.setattr(kvant.cluster.Clusterer, "fit", fail)
    np.save(tmp_path / "d.npy", np.ones((5, 2), np.float32))
    assert main(["cluster", str(tmp_path / "d.npy"), "-k", "2"]) == 2
    assert capsys.readouterr().err == ("kvant: error: x.parquet: cannot decode rows after row 0: Couldn't deserialize "
                                       "thrift: Deserializing page header failed.\n")


def test_kvant_warnings_reach_a_caller_that_records_them(tmp_path, capsys):
    # (review) main() replaced warnings.showwarning, so catch_warnings(record=True) around it recorded nothing
    import warnings

    x = np.repeat(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32), 20, axis=0)
    np.save(tmp_path / "d.npy", x)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        assert main(["cluster", str(tmp_path / "d.npy"), "-k", "8", "-q"]) == 0
    assert [w.category for w in got] == [kvant.EmptyClusterWarning]
    assert warnings.formatwarning.__module__ == "warnings"  # restored after the call
    capsys.readouterr()


def test_text_output_names_the_files_written(tmp_path, capsys):
    # -o labels.txt writes labels.txt.npy (np.save's suffix): the text output says so (a review found it unsaid)
    np.save(tmp_path / "d.npy", np.random.default_rng(0).standard_normal((300, 3)).astype(np.float32))
    assert main(["cluster", str(tmp_path / "d.npy"), "-k", "3", "-q", "-o", str(tmp_path / "labels.txt"),
                 "--centroids", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [f"wrote {tmp_path / 'labels.txt.npy'}", f"wrote {tmp_path / 'c.npy'}"]
    assert (tmp_path / "labels.txt.npy").exists() and (tmp_path / "c.npy").exists()


def test_exit_codes(tmp_path, capsys):
    np.save(tmp_path / "d.npy", np.ones((5, 2), np.float32))
    assert main(["cluster", str(tmp_path / "d.npy"), "-k", "9"]) == 2  # k > N: bad input
    assert "k=9" in capsys.readouterr().err
    assert main(["cluster", str(tmp_path / "missing.npy"), "-k", "2"]) == 2
    assert main(["cluster", str(tmp_path / "d.npy")]) == 2  # -k missing: usage
    assert main(["no-such-command"]) == 2
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["threads"] >= 1 and "simd_level" in info
    assert isinstance(info["amx_tiles"], bool) and isinstance(info["int16_assign"], bool)
    from kvant.kernels import direct_assign

    assert info["row_prefetch"] == (direct_assign.AVAILABLE and info["cpu"].startswith("znver") and
                                    direct_assign.PREFETCH_ROWS)
    assert info["numba_threading_layer"] in ("omp", "tbb", "workqueue")
    assert info["optional"]["dask"] is not None and info["optional"]["distributed"]  # the dev extra installs them


def test_demo_json(capsys):
    assert main(["demo", "--json", "--quiet"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [r["algorithm"].split(" ")[0] for r in payload["results"]] == ["auto", "dense-exact-random", "minibatch"]
    assert all(r["v_measure"] > 0.5 for r in payload["results"])


@pytest.mark.parametrize("sampling", ["coreset", "uniform"])
def test_cluster_sampling_flag_matches_the_api(tmp_path, capsys, sampling):
    # 9,000 rows: under 8,192 auto trains on every row (the compiled Lloyd loop takes them), with no sample to draw
    x = np.random.default_rng(1).standard_normal((9000, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    argv = ["cluster", str(tmp_path / "x.npy"), "-k", "5", "--sampling", sampling, "--json", "--quiet",
            "-o", str(tmp_path / "labels.npy")]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["sampling"] == sampling
    want = kvant.Clusterer(k=5, sampling=sampling, sample_per_centroid=256).fit(x).labels_  # m = 1280 < N
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), want)


def test_cluster_minibatch_reports_no_sampling(tmp_path, capsys):
    # minibatch samples nothing, but the JSON echoed the --sampling default ("coreset")
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((2000, 4)).astype(np.float32))
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "3", "--algorithm", "minibatch", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["sampling"] is None


def test_cluster_overrelax_and_max_iter_flags_match_the_api(tmp_path, capsys):
    x = np.random.default_rng(2).standard_normal((3000, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    argv = ["cluster", str(tmp_path / "x.npy"), "-k", "5", "--overrelax", "0", "--max-iter", "4", "--json", "--quiet",
            "-o", str(tmp_path / "labels.npy")]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overrelax"] == 0.0 and out["max_iter"] == 4 and "given by the caller" in out["auto_reason"]
    want = kvant.Clusterer(k=5, overrelax=0, max_iter=4).fit(x).labels_
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), want)
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "5", "--overrelax", "-1", "--quiet"]) == 2


def test_cluster_outputs_report_the_written_names_and_bad_dirs_fail_before_fitting(tmp_path, capsys):
    np.save(tmp_path / "d.npy", np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32))
    assert main(["cluster", str(tmp_path / "d.npy"), "-k", "3", "--json", "-o", str(tmp_path / "labels"),
                 "--centroids", str(tmp_path / "cents")]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["labels_file"] == str(tmp_path / "labels.npy") and (tmp_path / "labels.npy").exists()
    assert payload["centroids_file"] == str(tmp_path / "cents.npy") and (tmp_path / "cents.npy").exists()
    assert main(["cluster", str(tmp_path / "d.npy"), "-k", "3", "-o", str(tmp_path / "nope" / "l.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["cluster", str(tmp_path / "d.npy"), "-k", "3", "-o", str(tmp_path)]) == 2
    # a missing directory named with a trailing slash is not the file "new.npy" (Path drops the slash)
    assert main(["cluster", str(tmp_path / "d.npy"), "-k", "3", "-o", str(tmp_path / "new") + "/"]) == 2
    assert "ends with a slash" in capsys.readouterr().err and not (tmp_path / "new.npy").exists()
    assert main(["cluster", str(tmp_path / "d.npy"), "-k", "3", "-o", str(tmp_path / "new") + "/."]) == 2
    assert not (tmp_path / "new.npy").exists()


def _saved_flat(path, x):
    """A FlatIndex over ``x``, saved at ``path`` (for the ``kvant search`` tests)."""
    index = kvant.FlatIndex(x.shape[1])
    index.add(x)
    index.save(path)
    return index


def test_search_json_pads_with_null(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    _saved_flat(tmp_path / "f.kvant", x)
    np.save(tmp_path / "q.npy", x[:2])
    assert main(["search", str(tmp_path / "f.kvant"), str(tmp_path / "q.npy"), "-k", "8", "--json"]) == 0
    out = capsys.readouterr().out
    assert "Infinity" not in out
    payload = json.loads(out)
    flat = [v for row in payload["distances"] for v in row]
    assert flat.count(None) == 2 * 3


def test_search_takes_a_1d_npy_as_one_query_as_tree_knn_and_the_api_do(tmp_path, capsys):
    # (an audit: a (dim,) file exited 2 with "expected a 2-D array", while kvant tree knn took it as one query)
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    index = _saved_flat(tmp_path / "f.kvant", x)
    np.save(tmp_path / "q1.npy", x[7].astype(np.float64))
    assert main(["search", str(tmp_path / "f.kvant"), str(tmp_path / "q1.npy"), "-k", "3", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["nq"] == 1 and payload["ids"][0] == index.search(x[7], 3)[1].tolist()
    np.save(tmp_path / "bad.npy", np.array([[np.nan, 0, 0, 0]], np.float32)[0])
    assert main(["search", str(tmp_path / "f.kvant"), str(tmp_path / "bad.npy"), "-k", "3"]) == 2
    assert "NaN" in capsys.readouterr().err
    # (a review) an upper-case suffix, which kvant.io reads as .npy, was not taken as one query: exit 2
    (tmp_path / "q1.npy").rename(tmp_path / "Q1.NPY")
    assert main(["search", str(tmp_path / "f.kvant"), str(tmp_path / "Q1.NPY"), "-k", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"][0] == index.search(x[7], 3)[1].tolist()


def test_tree_build_keeps_a_float64_npy_at_full_precision_whatever_the_suffix_case(tmp_path, capsys):
    # (a review: P.NPY went through kvant.io's float32 reader while p.npy kept float64; distances differed by 0.16%)
    x = np.random.default_rng(5).standard_normal((50, 3)) * 1e-4 + 1.0
    with open(tmp_path / "P.NPY", "wb") as fh:  # (np.save would append .npy to the name)
        np.save(fh, x)
    assert main(["tree", "build", str(tmp_path / "P.NPY"), "-o", str(tmp_path / "t.kvant"), "-q"]) == 0
    got, _ = kvant.load(tmp_path / "t.kvant").knn(x, 2)
    want, _ = kvant.CoverTree().fit(x).knn(x, 2)
    np.testing.assert_array_equal(got, want)


def test_search_takes_o_like_every_other_command_and_says_where_it_wrote(tmp_path, capsys):
    # (a review: `kvant search ... -o r.npz` was "unrecognized arguments", though cluster, index build and tree take -o)
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    index = _saved_flat(tmp_path / "f.kvant", x)
    np.save(tmp_path / "q.npy", x[:3])
    assert main(["search", str(tmp_path / "f.kvant"), str(tmp_path / "q.npy"), "-k", "2", "-o",
                 str(tmp_path / "r")]) == 0
    assert f"wrote {tmp_path / 'r.npz'}" in capsys.readouterr().out  # the suffix NumPy's convention appends, named
    with np.load(tmp_path / "r.npz") as r:
        np.testing.assert_array_equal(r["ids"], index.search(x[:3], 2)[1])


UNWRITABLE = "/proc/kvant-cannot-write-here"  # /proc refuses new files even to root, on every Linux


def test_cluster_outputs_naming_the_input_are_refused(tmp_path, capsys):
    # the labels replaced the data (-o) or the centroids did (--centroids), exit 0
    x = np.random.default_rng(0).standard_normal((60, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for flag, name in (("-o", "x.npy"), ("-o", "x"), ("--centroids", "x.npy")):
        assert main(["cluster", str(tmp_path / "x.npy"), "-k", "3", "-q", flag, str(tmp_path / name)]) == 2
        assert "same file" in capsys.readouterr().err
    assert np.array_equal(np.load(tmp_path / "x.npy"), x)


def test_cluster_outputs_inside_a_parquet_input_directory_are_refused(tmp_path, capsys):
    # (review) --model replaced a.parquet in the input directory with the model (exit 0); the data was unreadable after
    x = np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)
    d = tmp_path / "emb"
    d.mkdir()
    kvant.io.write_parquet(d / "a.parquet", x[:100])
    kvant.io.write_parquet(d / "b.parquet", x[100:])
    before = (d / "a.parquet").read_bytes()
    for flag, name in (("--model", "a.parquet"), ("--model", "new.parquet"), ("-o", "labels"), ("--centroids", "c")):
        assert main(["cluster", str(d), "-k", "3", "-q", flag, str(d / name)]) == 2, (flag, name)
        assert "is inside the input" in capsys.readouterr().err
    assert (d / "a.parquet").read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == ["a.parquet", "b.parquet"]
    assert main(["cluster", str(d), "-k", "3", "-q", "--model", str(tmp_path / "m.kvant")]) == 0  # beside it is fine


def test_unwritable_cluster_outputs_fail_before_the_fit(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((60, 3)).astype(np.float32))
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "3", "-q", "-o", UNWRITABLE]) == 2
    assert "cannot be written" in capsys.readouterr().err
    # -o was written, then --centroids failed with exit 1
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "3", "-q", "-o", str(tmp_path / "l.npy"),
                 "--centroids", UNWRITABLE]) == 2
    assert not (tmp_path / "l.npy").exists()


def test_immutable_directory_output_fails_before_the_fit(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((60, 3)).astype(np.float32))
    locked = tmp_path / "locked"
    locked.mkdir()
    np.save(locked / "old.npy", np.zeros(2))
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True, check=False).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        for name in ("new.npy", "old.npy"):
            assert main(["cluster", str(tmp_path / "x.npy"), "-k", "3", "-q", "-o", str(locked / name)]) == 2
            assert "cannot be written" in capsys.readouterr().err
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_bench_results_path_is_checked_before_the_harness(tmp_path, capsys):
    # a missing directory was created silently; a directory or unwritable path failed after the whole run
    missing = tmp_path / "no" / "kernels.tsv"
    for path in (missing, tmp_path, UNWRITABLE):
        assert main(["bench", "kernels", "--quick", "--no-speed", "--results", str(path)]) == 2, path
        err = capsys.readouterr()
        assert "correctness" not in err.out and len(err.err.strip().splitlines()) == 1
    assert not missing.parent.exists()


def test_bench_kernels_outside_a_checkout_runs_without_recording(tmp_path, capsys, monkeypatch):
    # no benchmarks/results/ in the working directory: the gate runs and says no row is recorded
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "kernels", "--quick", "--no-speed"]) == 0
    assert "not recording" in capsys.readouterr().err
    assert not (tmp_path / "benchmarks").exists()


def test_malformed_dask_address_is_one_line_and_exit_2(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.ones((20, 2), np.float32))
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "2", "--dask", "notaurl", "-q"]) == 2  # was a traceback
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "notaurl" in err and "Traceback" not in err


def test_failed_dask_connection_leaves_the_default_scheduler_alone(tmp_path):
    # the half-built Client set scheduler="dask.distributed" for the whole process: later computes failed with
    # "Requested dask.distributed scheduler but no Client active" (CI, in tests that ran after this one)
    dask = pytest.importorskip("dask")
    import dask.array as da

    np.save(tmp_path / "x.npy", np.ones((20, 2), np.float32))
    before = dask.config.get("scheduler", None)
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "2", "--dask", "notaurl", "-q"]) == 2
    assert dask.config.get("scheduler", None) == before
    assert da.ones(4, chunks=2).sum().compute() == 4


def test_dask_worker_failure_is_one_line_on_stderr(tmp_path, capfd):
    # distributed.worker logged "Compute Failed ... Traceback" (8 lines) before kvant's own error
    import logging

    x = np.random.default_rng(0).standard_normal((1000, 2)).astype(np.float32)
    x[7, 1] = np.nan  # outside the 256-row training sample: a worker meets it
    np.save(tmp_path / "nan.npy", x)
    records = []
    seen = logging.Handler()
    seen.emit = records.append  # what distributed's own stderr handler would print (the workers run in-process)
    logger = logging.getLogger("distributed.worker")
    level = logging.getLogger("distributed").level
    logger.addHandler(seen)
    try:
        assert main(["cluster", str(tmp_path / "nan.npy"), "-k", "1", "--dask", "local", "-q"]) == 2
    finally:
        logger.removeHandler(seen)
    err = capfd.readouterr().err
    assert err.strip().splitlines() == ["kvant: error: input contains NaN or inf (first bad row: 7)"], err
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert logging.getLogger("distributed").level == level  # restored for the rest of the process


def test_unexpected_exception_is_one_line_unless_kvant_debug(monkeypatch, capsys):
    import kvant.cli as cli

    def boom(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_cmd_info", boom)
    monkeypatch.delenv("KVANT_DEBUG", raising=False)
    assert main(["info"]) == 1
    assert capsys.readouterr().err == "kvant: internal error: RuntimeError: boom\n"
    monkeypatch.setenv("KVANT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["info"])


def test_bench_kernels_refuses_a_negative_seed_before_the_harness(capsys):
    # the harness ran and reported a kernel correctness failure (exit 2 for the wrong reason)
    assert main(["bench", "kernels", "--quick", "--no-speed", "--no-results", "--seed", "-1"]) == 2
    out = capsys.readouterr()
    assert "seed must be a non-negative integer" in out.err and "correctness" not in out.out


def test_closed_stdout_exits_quietly_with_141(monkeypatch, capsys):
    # `kvant search ... --json | head -1` exited 1 with "[Errno 32] Broken pipe"
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["info", "--json"]) == 141
    assert capsys.readouterr().err == ""


def test_closed_stdout_pipe_end_to_end():
    # the reader is gone before kvant writes: no message, and none at interpreter exit when stdout is flushed
    proc = subprocess.Popen([sys.executable, "-m", "kvant.cli", "info", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


@pytest.mark.parametrize("sampling", ["coreset", "uniform"])
def test_cluster_json_reports_all_rows_when_the_sample_is_every_row(tmp_path, capsys, sampling):
    # 200 rows, k=3: the 768-row sample is every row, but the JSON said "coreset"
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((200, 3)).astype(np.float32))
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "3", "--sampling", sampling, "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["sampling"] == "all rows"


def _run_with_env(argv, **env):
    import os

    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300,
                          env={**os.environ, **env})


def test_invalid_kvant_num_threads_is_a_usage_error_in_the_cli(monkeypatch, capsys):
    # the CLI printed a 2-line UserWarning (with a source line) and ran on all cores
    import shutil
    from pathlib import Path

    for module in ("kvant.cli", "kvant"):  # (python -m kvant added a KvantWarning line: a review)
        out = _run_with_env([sys.executable, "-m", module, "info"], KVANT_NUM_THREADS="abc")
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.strip().splitlines() == ["kvant: error: KVANT_NUM_THREADS='abc' is not a positive integer"]
    script = shutil.which("kvant", path=str(Path(sys.executable).parent))
    if script:  # the console script, as users run it
        out = _run_with_env([script, "info", "--json"], KVANT_NUM_THREADS="0")
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    monkeypatch.setenv("KVANT_NUM_THREADS", "-3")
    assert main(["info"]) == 2
    assert "KVANT_NUM_THREADS" in capsys.readouterr().err
    before = kvant.get_num_threads()
    try:
        assert main(["info", "--threads", "1", "--json"]) == 0  # --threads overrides the variable (its help says so)
        assert json.loads(capsys.readouterr().out)["threads"] == 1
    finally:
        kvant.set_num_threads(before)


def test_invalid_kvant_num_threads_still_only_warns_in_python():
    out = _run_with_env([sys.executable, "-c", "import kvant; print(kvant.get_num_threads())"],
                        KVANT_NUM_THREADS="abc")
    assert out.returncode == 0 and "<string>:1: KvantWarning: ignoring KVANT_NUM_THREADS='abc'" in out.stderr


def test_threads_help_names_the_environment_variable(capsys):
    assert main(["info", "--help"]) == 0  # said "default: all" although KVANT_NUM_THREADS overrides it
    assert "KVANT_NUM_THREADS" in " ".join(capsys.readouterr().out.split())


def test_malformed_dask_address_exits_at_once(tmp_path):
    # a Client built on a bad address outlived the error, and its close at interpreter exit waited ~60 s
    np.save(tmp_path / "x.npy", np.ones((20, 2), np.float32))
    p = subprocess.run([sys.executable, "-m", "kvant.cli", "cluster", str(tmp_path / "x.npy"), "-k", "2", "--dask",
                        "nonsense", "-q"], capture_output=True, text=True, timeout=40)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "nonsense" in p.stderr


def test_cluster_model_saves_a_clusterer_that_load_predicts_with(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((2000, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "4", "--json", "-q", "--model", str(tmp_path / "m.kvant"),
                 "-o", str(tmp_path / "l.npy")]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["model_file"] == str(tmp_path / "m.kvant")
    c = kvant.load(tmp_path / "m.kvant")
    np.testing.assert_array_equal(c.predict(x), np.load(tmp_path / "l.npy"))
    assert c.inertia_ == payload["inertia"]
    # checked before the fit: the input itself, or a --dask fit (not a Clusterer)
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "4", "--model", str(tmp_path / "x.npy")]) == 2
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "4", "--model", str(tmp_path / "d.kvant"),
                 "--dask", "local"]) == 2
    assert "--model" in capsys.readouterr().err and not (tmp_path / "d.kvant").exists()


def test_a_failed_output_write_leaves_the_existing_file_whole(tmp_path, monkeypatch, capsys):
    # (review) -o / --centroids / search --output were np.save'd onto the final path: a write that failed midway
    # (disk full, a size limit) left a truncated file where a good one had been
    x = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "labels.npy"
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "3", "-o", str(out)]) == 0
    before = out.read_bytes()

    def failing_save(fh, arr, *a, **kw):
        fh.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", failing_save)
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "5", "-o", str(out)]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".kvant-")] == []


@pytest.mark.parametrize("flag", ["-o", "--centroids", "--model"])
def test_an_empty_output_name_is_a_usage_error(tmp_path, flag, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32))
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "2", flag, ""]) == 2
    assert "empty" in capsys.readouterr().err


@pytest.mark.parametrize("address", ["inproc://x", "tcp://127.0.0.1:99999", "tcp://:8786"])
def test_unreachable_dask_addresses_are_refused_before_a_client_exists(tmp_path, address, capsys):
    pytest.importorskip("distributed")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32))
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "2", "--dask", address]) == 2
    assert "not a scheduler address" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--max-iter", str(2**64)), ("--polish-iter", str(2**63))])
def test_huge_iteration_settings_are_usage_errors(tmp_path, flag, value, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32))
    assert main(["cluster", str(tmp_path / "x.npy"), "-k", "2", flag, value]) == 2
    assert "2**62" in capsys.readouterr().err


def test_empty_init_and_dask_and_too_long_outputs_are_usage_errors(tmp_path, capsys):
    # (review) --init '' and --dask '' were taken as "not given" (exit 0, a plain fit), and an output name too long for
    # the file system escaped as a bare OSError (exit 1) from Path.is_dir()
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32))
    x = str(tmp_path / "x.npy")
    assert main(["cluster", x, "-k", "4", "--init", ""]) == 2
    assert "--init is an empty string" in capsys.readouterr().err
    assert main(["cluster", x, "-k", "4", "--dask", ""]) == 2
    assert "--dask is an empty string" in capsys.readouterr().err
    long = str(tmp_path / ("a" * 300))
    assert main(["cluster", x, "-k", "4", "-o", long]) == 2
    assert main(["index", "build", x, "--type", "flat", "-o", long]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_an_output_under_a_file_says_that_file_is_not_a_directory(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((20, 2), np.float32))
    assert main(["index", "build", str(tmp_path / "x.npy"), "--type", "flat", "-o",
                 str(tmp_path / "x.npy" / "i.kvant")]) == 2
    assert "is not a directory" in capsys.readouterr().err
