"""The kernel harness accepts the shipped kernels and rejects wrong ones with exit code 2."""

import sys
from pathlib import Path

import numpy as np
import pytest

import kvant
from kvant.bench import kernels as H
from kvant.cli import main
from kvant.kernels import pq as K


def _quiet(_):
    pass


def test_shipped_kernels_pass_correctness_gate():
    out = H.run(quick=True, speed=False, results=None, log=_quiet)
    assert out["exit_code"] == 0, out["failures"]
    assert "PASS" in out["text"]


def _off_by_a_bit(tables, codes, k):
    d, i = K.adc_search(tables, codes, k)
    return d * np.float32(1.001), i  # lossy: 0.1% relative error


def _wrong_ids(tables, codes, k):
    d, i = K.adc_search(tables, codes, k)
    i = i.copy()
    if i.shape[1] > 1:
        i[:, [0, 1]] = i[:, [1, 0]]  # swap ranks 0 and 1: wrong unless they tie
    return d, i


def _wrong_last_id(tables, codes, k):
    # keeps every distance, swaps the k-th id for a row outside the top-k: only a check of the returned ids'
    # true distances catches it (a black-box review found the gate let this through)
    d, i = K.adc_search(tables, codes, k)
    i = i.copy()
    full = K.adc_distances(tables, codes)
    for q in range(i.shape[0]):
        outside = np.setdiff1d(np.arange(codes.shape[0]), i[q])
        if outside.size:
            i[q, -1] = outside[np.argmax(full[q, outside])]  # the farthest row: never a tie
    return d, i


def _sloppy_tables(queries, codebooks):
    # the ‖q‖²+‖c‖²−2q·c shortcut in float32: loses precision on the large-dynamic-range distribution
    m, ksub, dsub = codebooks.shape
    q = queries.reshape(len(queries), m, dsub)
    qq = np.einsum("qjd,qjd->qj", q, q)[:, :, None]
    cc = np.einsum("jcd,jcd->jc", codebooks, codebooks)[None]
    return (qq + cc - 2 * np.einsum("qjd,jcd->qjc", q, codebooks)).astype(np.float32)


def _half_precision_ip(queries, codebooks):
    # inner-product tables from float16-rounded operands: ~1e-3 relative error, beyond the gate's 1e-4
    m, ksub, dsub = codebooks.shape
    q = queries.astype(np.float16).astype(np.float32).reshape(len(queries), m, dsub)
    return np.einsum("qjd,jcd->qjc", q, codebooks.astype(np.float16).astype(np.float32))


def _lossy_fastscan(tables, packed, n, m, k, rerank):
    return K.fastscan_search(tables, packed, n, m, k, 1 if rerank == 0 else rerank)  # shortlist of k only


def _nan_distances(tables, codes, k):
    d, i = K.adc_search(tables, codes, k)  # the right ids beside NaN distances: `err > tol` is False for NaN
    return np.full_like(d, np.nan), i


def _wrong_after_four_queries(tables, codes, k):
    d, i = K.adc_search(tables, codes, k)  # right for the first queries only (the gate used to check 2 or 4)
    d, i = d.copy(), i.copy()
    d[4:], i[4:] = d[4:, ::-1], i[4:, ::-1]
    return d, i


def _first_rows_shortlist(tables, packed, n, m, k, rerank):
    if rerank == 0:
        return K.fastscan_search(tables, packed, n, m, k, 0)
    # rows 0..k-1 for every query, each at its exact ADC distance: only a check against the exact top-k catches it
    i = np.tile(np.arange(k), (tables.shape[0], 1))
    d_all, order = K.fastscan_search(tables, packed, n, m, n, 0)  # every row's exact ADC distance, ascending
    by_row = np.empty_like(d_all)
    np.put_along_axis(by_row, order, d_all, axis=1)
    d = np.take_along_axis(by_row, i, 1)
    o = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(d, o, 1), np.take_along_axis(i, o, 1)


def _drops_the_best_shortlist(tables, packed, n, m, k, rerank):
    if rerank == 0:
        return K.fastscan_search(tables, packed, n, m, k, 0)
    d, i = K.fastscan_search(tables, packed, n, m, k + 1, 0)  # exact ranks 1..k: ascending, distinct, exact
    return np.ascontiguousarray(d[:, 1:]), np.ascontiguousarray(i[:, 1:])


def _nan_padding(tables, codes, k):
    d, i = K.adc_search(tables, codes, k)
    d = d.copy()
    d[i < 0] = np.nan  # padding (n < k) must be inf
    return d, i


def _repeated_best_shortlist(tables, packed, n, m, k, rerank):
    d, i = K.fastscan_search(tables, packed, n, m, k, rerank)
    if rerank == 0:
        return d, i
    return np.repeat(d[:, :1], k, axis=1), np.repeat(i[:, :1], k, axis=1)


def _encode_overwriting_its_rows(x, cb):  # codeword 0 everywhere, and codeword 0 written into the caller's rows
    m, _, dsub = cb.shape
    for j in range(m):
        x[:, j * dsub:(j + 1) * dsub] = cb[j, 0]
    return np.zeros((x.shape[0], m), np.uint8)


def _tables_of_halved_queries(q, cb):
    q *= 0.5
    return K.distance_tables_l2(q, cb)


def _tables_wrong_for_few_queries(q, cb):
    t = K.distance_tables_l2(q, cb)
    return t * 1.5 if q.shape[0] < 16 else t


def _reservoir_reversed(tables, codes, k, nchunks=None):
    d, i = K.adc_search(tables, codes, k, nchunks)
    return (d, i[:, ::-1].copy()) if k > 128 else (d, i)


def _fastscan_long_lists_shifted(tables, packed, n, m, k, rerank, nchunks=None):
    d, i = K.fastscan_search(tables, packed, n, m, k + (k >= 64), rerank, nchunks)
    return (np.ascontiguousarray(d[:, 1:]), np.ascontiguousarray(i[:, 1:])) if k >= 64 else (d, i)


# A review (2026-12-07) passed each of these through the gate with exit 0: references were computed after the
# kernel ran, from inputs it could write into; tables were never checked for fewer than 19 queries; k was 1 or 10.
@pytest.mark.parametrize("field,kernel,expect", [
    ("encode", _encode_overwriting_its_rows, "encode wrote into its input"),
    ("distance_table", _tables_of_halved_queries, "distance_table wrote into its input"),
    ("distance_table", _tables_wrong_for_few_queries, "distance_table nq=1"),
    ("adc_search", _reservoir_reversed, "k=130"),
    ("fastscan_search", _fastscan_long_lists_shifted, "k=64"),
])
def test_gate_rejects_kernels_that_write_their_inputs_or_fail_rare_paths(field, kernel, expect):
    out = H.run(kernels=H.PQKernels(**{field: kernel}), quick=True, speed=False, results=None, log=_quiet)
    assert out["exit_code"] == 2 and any(expect in f for f in out["failures"]), out["failures"][:2]


def test_results_file_of_another_layout_is_refused_and_a_missing_newline_is_added(tmp_path):
    other = tmp_path / "other.tsv"
    other.write_text("a\tb\n1\t2\n")
    with pytest.raises(kvant.InvalidInput, match="not a kernel-harness results file"):
        H.run(quick=True, speed=False, results=other, log=_quiet)
    assert other.read_text() == "a\tb\n1\t2\n"
    tsv = tmp_path / "k.tsv"
    tsv.write_text("\t".join(H.TSV_COLUMNS) + "\n" + "\t".join(["x"] * len(H.TSV_COLUMNS)))  # no final newline
    assert H.run(quick=True, speed=False, results=tsv, log=_quiet)["exit_code"] == 0
    lines = tsv.read_text().splitlines()
    assert len(lines) == 3 and lines[1].split("\t") == ["x"] * len(H.TSV_COLUMNS)
    assert len(lines[2].split("\t")) == len(H.TSV_COLUMNS)


@pytest.mark.parametrize("field,kernel,expect", [
    ("adc_search", _nan_distances, "adc_search"),
    ("adc_search", _wrong_after_four_queries, "adc_search"),
    ("fastscan_search", _first_rows_shortlist, "fastscan_search shortlist"),
    ("fastscan_search", _repeated_best_shortlist, "fastscan_search shortlist"),
    ("fastscan_search", _drops_the_best_shortlist, "fastscan_search shortlist"),
    ("adc_search", _nan_padding, "adc_search n=3 < k"),
    ("adc_search", _off_by_a_bit, "adc_search"),
    ("adc_search", _wrong_ids, "adc_search"),
    ("adc_search", _wrong_last_id, "adc_search"),
    ("distance_table", _sloppy_tables, "distance_table"),
    ("ip_table", _half_precision_ip, "ip_table"),
    ("fastscan_search", _lossy_fastscan, "fastscan_search exact mode"),
])
def test_gate_rejects_wrong_kernels(field, kernel, expect):
    kern = H.PQKernels(**{field: kernel})
    out = H.run(kernels=kern, quick=True, speed=False, results=None, log=_quiet)
    assert out["exit_code"] == 2
    assert out["failures"] and any(expect in f for f in out["failures"])
    # the diagnostic names the combo (distribution and shape)
    assert any("dist=" in f and "shape(dim,m,ksub)=" in f for f in out["failures"])


def test_crashing_kernel_is_a_failure():
    def boom(*a):
        raise RuntimeError("kernel exploded")

    out = H.run(kernels=H.PQKernels(encode=boom), quick=True, speed=False, results=None, log=_quiet)
    assert out["exit_code"] == 2 and "kernel exploded" in out["failures"][0]


def test_cli_quick_run_appends_results_row(tmp_path, capsys):
    tsv = tmp_path / "kernels.tsv"
    rc = main(["bench", "kernels", "--quick", "--results", str(tsv)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ns/q" in text and "geomean" in text and "peak memory" in text
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == H.TSV_COLUMNS and len(lines) == 2
    row = dict(zip(H.TSV_COLUMNS, lines[1].split("\t")))
    assert row["status"] == "pass" and float(row["geomean_ns_per_query"]) > 0
    assert main(["bench", "kernels", "--quick", "--no-speed", "--results", str(tsv)]) == 0
    assert len(tsv.read_text().splitlines()) == 3


def test_results_row_names_kvants_commit_whatever_the_working_directory(tmp_path, monkeypatch):
    # the commit came from `git rev-parse` in the caller's directory: another repository's HEAD, or "unknown"
    import subprocess

    here = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(H.__file__).parent).stdout.strip()
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    monkeypatch.chdir(other)
    assert H._git_commit() == (here or "unknown")


def test_module_entry_point_runs_the_gate():
    # `python -m kvant.bench.kernels` had no __main__ guard: it ran nothing and exited 0
    import subprocess

    out = subprocess.run([sys.executable, "-m", "kvant.bench.kernels", "--quick", "--no-results"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "geomean" in out.stdout


def test_cli_exit_code_2_on_gate_failure(monkeypatch, capsys):
    class Wrong(H.PQKernels):
        def __init__(self):
            super().__init__(adc_search=_off_by_a_bit)

    monkeypatch.setattr(H, "PQKernels", Wrong)
    rc = main(["bench", "kernels", "--quick", "--no-speed", "--no-results"])
    assert rc == 2
    assert "CORRECTNESS FAILED" in capsys.readouterr().out


def test_generators_are_deterministic_and_shaped():
    for dist in H.CORRECTNESS_DISTS + H.SPEED_DISTS:
        a = H.generate(dist, 50, 12, 3)
        assert a.shape == (50, 12) and a.dtype == np.float32
        np.testing.assert_array_equal(a, H.generate(dist, 50, 12, 3))
    assert np.mean(H.generate("sparse", 400, 32, 0) == 0) > 0.85
    with pytest.raises(ValueError):
        H.generate("nope", 1, 1, 0)


def _wrong_for_query_counts(counts):
    from kvant.kernels import pq as K

    def adc(tables, codes, k, nchunks=None):
        d, i = K.adc_search(tables, codes, k, nchunks=nchunks)
        if tables.shape[0] in counts:
            i = np.asarray(i)[:, ::-1].copy()
            d = np.asarray(d)[:, ::-1].copy()
        return d, i
    return adc


@pytest.mark.parametrize("counts", [(2, 3, 4), (5, 8), (16,)])
def test_gate_fails_a_scan_wrong_only_for_some_query_counts(counts):
    # (review) the correctness phase used 1 and 19 queries only: a scan wrong for 2-8 or exactly 16 queries passed
    out = H.run(kernels=H.PQKernels(adc_search=_wrong_for_query_counts(counts)), quick=True, speed=False,
                results=None, log=_quiet)
    assert out["exit_code"] == H.EXIT_FAIL
    assert any("query counts" in f for f in out["failures"])


def test_gate_fails_a_scan_that_drops_all_chunks_but_one():
    from kvant.kernels import pq as K

    def adc(tables, codes, k, nchunks=None):  # as if the merge kept only the last chunk's list
        chunks = max(2, nchunks or 2)
        part = codes.shape[0] // chunks * (chunks - 1)
        d, i = K.adc_search(tables, np.ascontiguousarray(codes[part:]), k, nchunks=1)
        return d, np.where(np.asarray(i) >= 0, np.asarray(i) + part, -1)

    out = H.run(kernels=H.PQKernels(adc_search=adc), quick=True, speed=False, results=None, log=_quiet)
    assert out["exit_code"] == H.EXIT_FAIL


def test_gate_fails_an_encoder_wrong_for_odd_shapes():
    from kvant.kernels import pq as K

    def enc(x, cb):
        codes = K.pq_encode(x, cb)
        if cb.shape[2] not in (4, 8, 16) or cb.shape[1] % 16:
            codes = np.zeros_like(codes)
        return codes

    out = H.run(kernels=H.PQKernels(encode=enc), quick=True, speed=False, results=None, log=_quiet)
    assert out["exit_code"] == H.EXIT_FAIL
    assert any("sub-vector widths" in f for f in out["failures"])
