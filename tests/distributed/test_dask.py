"""kvant.distributed: DaskClusterer and encode against the single-machine code on the same data."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

import kvant
import kvant.distributed as kd
from kvant.errors import DimensionMismatch, EmptyIndex, InvalidInput


def _blobs(n=6000, d=8, k=5, seed=0):
    g = np.random.default_rng(seed)
    centres = g.standard_normal((k, d)) * 4
    return (centres[g.integers(0, k, n)] + g.standard_normal((n, d))).astype(np.float32)


def _nearest(x, c, spherical=False):
    x = x.astype(np.float64)
    if spherical:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = ((x[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    return d.argmin(1), d.min(1)


@pytest.fixture(autouse=True)
def synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.mark.parametrize("metric", ["l2", "cos"])
def test_all_rows_in_the_sample_equals_the_single_machine_fit(metric):
    x = _blobs(n=1200)
    c = kd.DaskClusterer(k=5, metric=metric, seed=3).fit(da.from_array(x, chunks=(300, 4)))  # column chunks too
    ref = kvant.Clusterer(k=5, metric=metric, seed=3).fit(x)  # 1200 <= 256·K: both train on every row
    assert np.array_equal(c.cluster_centers_, ref.cluster_centers_)
    assert np.array_equal(c.labels_.compute(), ref.labels_)
    assert c.inertia_ == pytest.approx(ref.inertia_, rel=1e-9)
    score = c.mean_cosine_ if metric == "cos" else c.mse_
    assert score == pytest.approx(ref.mean_cosine_ if metric == "cos" else ref.mse_, rel=1e-9)
    assert (c.max_iter_, c.overrelax_) == (ref.max_iter_, ref.overrelax_) == (15, 1.0)
    plain = kd.DaskClusterer(k=5, metric=metric, seed=3, overrelax=0, max_iter=30).fit(x)
    ref0 = kvant.Clusterer(k=5, metric=metric, seed=3, overrelax=0, max_iter=30).fit(x)
    assert (plain.max_iter_, plain.overrelax_) == (30, 0.0)
    assert np.array_equal(plain.cluster_centers_, ref0.cluster_centers_)


@pytest.mark.parametrize("metric", ["l2", "cos"])
def test_sampled_fit_labels_inertia_and_polish(metric):
    x = _blobs(n=9000)
    arr = da.from_array(x, chunks=(1000, 8))
    c = kd.DaskClusterer(k=5, metric=metric, seed=0, sample_per_centroid=64, tol=0).fit(arr)  # 320-row sample
    labels, dist = _nearest(x, c.cluster_centers_, metric == "cos")
    got = c.labels_.compute()
    clear = np.sort(((x[:, None] - c.cluster_centers_[None]) ** 2).sum(-1), 1)
    clear = (clear[:, 1] - clear[:, 0]) > 1e-3 if metric == "l2" else np.ones(len(x), bool)
    assert np.array_equal(got[clear], labels[clear])
    want = dist.sum() * (0.5 if metric == "cos" else 1.0)
    assert c.inertia_ == pytest.approx(want, rel=1e-6)
    assert np.array_equal(c.counts_, np.bincount(got, minlength=5))
    assert np.array_equal(c.predict(arr).compute(), got)
    polished = kd.DaskClusterer(k=5, metric=metric, seed=0, sample_per_centroid=64, polish_iter=5, tol=0).fit(arr)
    assert polished.inertia_ <= c.inertia_ * (1 + 1e-9)  # Lloyd's steps over all rows never raise it
    assert polished.n_iter_ > c.n_iter_
    steps = polished.inertia_history_[-(polished.n_iter_ - c.n_iter_) - 1 :]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(steps, steps[1:], strict=False))


def test_distributed_client_and_file_shards(tmp_path):
    distributed = pytest.importorskip("distributed")  # part of the dask extra; the test uses real workers
    x = _blobs(n=4000, d=6)
    paths = []
    for i in range(4):
        p = tmp_path / f"part-{i}.npy"
        np.save(p, x[i * 1000 : (i + 1) * 1000])
        paths.append(p)
    kvant.io.write_parquet(tmp_path / "part-4.parquet", x[:500])
    paths.append(tmp_path / "part-4.parquet")
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None):
        with dask.config.set(scheduler=None):
            c = kd.DaskClusterer(k=4, seed=1, sample_per_centroid=100, polish_iter=2).fit(paths)
            assert c.labels_.shape == (4500,) and c.labels_.compute().max() < 4
            pq = kvant.PQ(dim=6, m=3, nbits=4, seed=0).fit(x)
            codes = kd.encode(pq, paths).compute()
    assert np.array_equal(codes, pq.encode(np.vstack([x, x[:500]])))


def test_nan_is_named_by_its_global_row_and_state_is_kept():
    x = _blobs(n=3000)
    c = kd.DaskClusterer(k=3, seed=0, sample_per_centroid=16).fit(da.from_array(x, chunks=(500, 8)))
    before = c.cluster_centers_.copy()
    x[2345, 3] = np.nan
    with pytest.raises(InvalidInput, match="bad row: 2345"):
        c.fit(da.from_array(x, chunks=(500, 8)))
    assert np.array_equal(c.cluster_centers_, before)
    x[2345, 3] = 0
    x[1234] = 0
    with pytest.raises(InvalidInput, match="row 1234"):
        kd.DaskClusterer(k=3, metric="cos", sample_per_centroid=16).fit(da.from_array(x, chunks=(500, 8)))


def test_nan_error_names_the_first_bad_row_of_the_whole_input():
    # the training sample and the chunk passes each see only part of the rows: the error must still name the
    # first bad row of the input, as kvant.io does for one machine (here the sample holds only later ones)
    x = _blobs(n=3000)
    x[2000:, 1] = np.nan
    x[7, 0] = np.inf
    with pytest.raises(InvalidInput, match=r"first bad row: 7\)"):
        kd.DaskClusterer(k=3, seed=0, sample_per_centroid=16).fit(da.from_array(x, chunks=(500, 8)))
    big = _blobs(n=3000).astype(np.float64)
    big[11, 2] = 1e39  # finite in float64, beyond float32: named as out of range, at its global row
    big[2500:, 0] = np.nan
    with pytest.raises(InvalidInput, match=r"beyond float32's range.*first bad row: 11\)"):
        kd.DaskClusterer(k=3, seed=0, sample_per_centroid=16).fit(da.from_array(big, chunks=(500, 8)))


def test_cos_zero_row_error_names_the_first_zero_row_of_the_whole_input():
    # the chunk passes raise for whichever chunk fails first (row 15000 here), the sample for its own rows; the
    # single-machine fit names row 100, and so must the distributed one
    x = np.random.default_rng(0).standard_normal((20000, 16)).astype(np.float32)
    x[100] = 0
    x[15000] = 0
    for sample in (100, 20000):  # row 100 outside the training sample, then every row in it
        with pytest.raises(InvalidInput, match=r"^row 100 has zero norm"):
            kd.DaskClusterer(k=2, metric="cos", seed=0, sample_per_centroid=sample).fit(
                da.from_array(x, chunks=(1000, 16)))


def test_cos_nan_is_named_before_a_zero_row_whichever_chunk_fails_first():
    # one machine checks NaN/inf before zero rows; here the zero row's chunk is scanned (and fails) first, and the
    # training sample holds neither row: the error must still name the NaN, as kvant.Clusterer does (a review saw 7
    # of 12 distributed fits name the zero row, by task timing)
    x = np.random.default_rng(1).standard_normal((20000, 32)).astype(np.float32)
    x[100] = 0
    x[15000, 3] = np.nan
    with pytest.raises(InvalidInput, match=r"NaN or inf \(first bad row: 15000\)"):
        kvant.Clusterer(16, "cos", sample_per_centroid=4).fit(x)
    with pytest.raises(InvalidInput, match=r"NaN or inf \(first bad row: 15000\)"):
        kd.DaskClusterer(16, "cos", seed=0, sample_per_centroid=4).fit(da.from_array(x, chunks=(1000, 32)))


def test_lazy_results_name_the_chunk_whose_rows_they_checked():
    # labels and codes are lazy: the task that fails sees its own chunk only, and no pass over the other chunks runs,
    # so the error names that chunk's rows rather than claiming the input's first bad row
    x = _blobs(n=3000)
    arr = da.from_array(x, chunks=(1000, 8))
    c = kd.DaskClusterer(k=3, seed=0).fit(arr)
    pq = kvant.PQ(8, 2).fit(x)
    x[2500, 0] = np.nan
    x[2700, 1] = np.inf
    bad = da.from_array(x, chunks=(1000, 8))
    for lazy in (c.predict(bad), kd.encode(pq, bad)):
        with pytest.raises(InvalidInput, match=r"^the chunk of input rows 2000-2999 contains NaN or inf \(first bad "
                                               r"row: 2500\)"):
            lazy.compute()


def test_nan_in_a_file_list_is_named_by_its_row_in_the_whole_input(tmp_path):
    # each file is read whole by one task: its NaN must still be named by the row of the concatenated input,
    # and the first bad row of all files wins (not whichever task failed first)
    paths = []
    for f in range(3):
        x = _blobs(n=1000, seed=f)
        if f == 1:
            x[500, 0] = np.nan  # global row 1500
        if f == 2:
            x[3, 0] = np.inf  # global row 2003
        paths.append(tmp_path / f"p{f}.npy")
        np.save(paths[-1], x)
    for _ in range(3):
        with pytest.raises(InvalidInput, match=r"first bad row: 1500\)"):
            kd.DaskClusterer(k=3, seed=0, sample_per_centroid=16).fit(paths)


def test_bad_settings_and_inputs():
    x = da.from_array(_blobs(n=500), chunks=(100, 8))
    with pytest.raises(InvalidInput, match="k="):
        kd.DaskClusterer(k=501).fit(x)
    with pytest.raises(InvalidInput, match="metric"):
        kd.DaskClusterer(k=2, metric="dot").fit(x)
    with pytest.raises(InvalidInput, match="polish_iter"):
        kd.DaskClusterer(k=2, polish_iter=-1).fit(x)
    with pytest.raises(InvalidInput, match="2-D"):
        kd.DaskClusterer(k=2).fit(da.zeros(10, chunks=5))
    with pytest.raises(InvalidInput, match="input file not found: 'not-a-path'"):  # (one path is a list of one)
        kd.DaskClusterer(k=2).fit("not-a-path")
    with pytest.raises(InvalidInput, match="expected a dask"):
        kd.DaskClusterer(k=2).fit({"a": 1})
    with pytest.raises(EmptyIndex):
        kd.DaskClusterer(k=2).predict(x)
    c = kd.DaskClusterer(k=2).fit(x)
    with pytest.raises(DimensionMismatch):
        c.predict(da.zeros((5, 3), chunks=5))
    with pytest.raises(EmptyIndex):
        kd.encode(kvant.PQ(dim=8, m=2), x)
    with pytest.raises(InvalidInput, match="codec"):
        kd.encode(object(), x)


def test_numpy_input_and_encode_match_single_machine():
    x = _blobs(n=3000, d=16)
    pq = kvant.OPQ(dim=16, m=4, nbits=8, seed=0).fit(x)
    assert np.array_equal(kd.encode(pq, x).compute(), pq.encode(x))
    c = kd.DaskClusterer(k=3, seed=0).fit(x)  # a NumPy array is split into row chunks
    assert c.labels_.compute().shape == (3000,)


def test_cli_cluster_with_dask_over_files_and_a_parquet_directory(tmp_path, capsys):
    import json

    from kvant.cli import main

    x = _blobs(n=3000, d=6)
    (tmp_path / "parts").mkdir()
    for i in range(3):
        kvant.io.write_parquet(tmp_path / "parts" / f"p{i}.parquet", x[i * 1000 : (i + 1) * 1000])
    np.save(tmp_path / "extra.npy", x[:200])
    argv = ["cluster", str(tmp_path / "parts"), str(tmp_path / "extra.npy"), "-k", "3", "--dask", "local",
            "--polish-iter", "1", "-o", str(tmp_path / "labels.npy"), "--json"]
    with dask.config.set(scheduler=None):
        assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    labels = np.load(tmp_path / "labels.npy")
    assert out["n"] == 3200 and labels.shape == (3200,) and out["algorithm"] == "dask"
    assert out["cluster_sizes"] == np.bincount(labels, minlength=3).tolist()
    assert main(["cluster", str(tmp_path / "extra.npy"), str(tmp_path / "extra.npy"), "-k", "3"]) == 2  # needs --dask
    assert main(["cluster", str(tmp_path / "missing.npy"), "-k", "3", "--dask", "local"]) == 2
    assert main(["cluster", str(tmp_path / "extra.npy"), "-k", "3", "--dask", "local", "--algorithm",
                 "minibatch"]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("metric", ["l2", "cos"])
def test_polish_reseeds_a_cluster_left_empty_with_the_farthest_rows(metric, monkeypatch):
    # training hands the polish a centre no row is near (an empty cluster in the full pass): like
    # kvant.Clusterer, the polish must move the farthest rows into it instead of keeping a dead centre
    from kvant.distributed import kmeans as dk

    x = np.abs(_blobs(n=3000, k=4)) + 0.1  # every coordinate positive: the centre -1/sqrt(d) attracts no row
    local_cls = dk.Clusterer

    class DeadCentre(local_cls):
        def fit(self, rows):
            super().fit(rows)
            self.cluster_centers_ = self.cluster_centers_.copy()
            self.cluster_centers_[1] = -1e4 if metric == "l2" else -1.0 / np.sqrt(rows.shape[1])
            return self

    monkeypatch.setattr(dk, "Clusterer", DeadCentre)
    arr = da.from_array(x, chunks=(700, 8))
    with pytest.warns(kvant.EmptyClusterWarning):  # (the final counts' warning)
        dead = kd.DaskClusterer(k=5, metric=metric, seed=0, sample_per_centroid=64, polish_iter=0).fit(arr)
    assert dead.counts_[1] == 0  # the set-up works: without a polish the centre stays empty
    c = kd.DaskClusterer(k=5, metric=metric, seed=0, sample_per_centroid=64, polish_iter=3).fit(arr)
    assert (c.counts_ > 0).all()
    assert c.inertia_ < dead.inertia_
    lab = c.labels_.compute()
    assert np.array_equal(np.bincount(lab, minlength=5), c.counts_)
    assert np.array_equal(lab, _nearest(x, c.cluster_centers_, metric == "cos")[0])


@pytest.mark.parametrize("metric", ["l2", "cos"])
def test_polish_never_reseeds_two_empty_clusters_with_copies_of_one_row(metric, monkeypatch):
    # four empty clusters; the farthest rows are three copies of one row (in different chunks): like
    # kvant.Clusterer, the re-seeding takes one of them and then the next farthest distinct rows, not identical
    # centres (all but one left empty again by the next E-step)
    from kvant.distributed import kmeans as dk

    x = np.abs(_blobs(n=3000, k=4)) + 0.1
    far = np.full(8, 60.0, np.float32) if metric == "l2" else np.array([1, -3, 1, 1, 1, 1, 1, 1], np.float32)
    x[[5, 1500, 2900]] = far
    local_cls = dk.Clusterer

    class OneLiveCentre(local_cls):  # training hands the polish one centre every row is near, four no row is near
        def fit(self, rows):
            super().fit(rows)
            c = np.zeros_like(self.cluster_centers_)
            c[0] = x.mean(0)
            c[1:] = -1e4 * np.arange(1, 5)[:, None] if metric == "l2" else -np.eye(8)[[0, 2, 3, 4]]
            if metric == "cos":
                c[0] /= np.linalg.norm(c[0])
            self.cluster_centers_ = c
            return self

    monkeypatch.setattr(dk, "Clusterer", OneLiveCentre)
    arr = da.from_array(x, chunks=(700, 8))
    with pytest.warns(kvant.EmptyClusterWarning):  # (the final counts' warning)
        dead = kd.DaskClusterer(k=5, metric=metric, seed=0, sample_per_centroid=64, polish_iter=0).fit(arr)
    assert dead.counts_.tolist() == [3000, 0, 0, 0, 0]  # the set-up
    c = kd.DaskClusterer(k=5, metric=metric, seed=0, sample_per_centroid=64, polish_iter=1).fit(arr)
    assert (c.counts_ > 0).all()
    assert len(np.unique(c.cluster_centers_, axis=0)) == 5


@pytest.mark.parametrize("spherical", [False, True])
def test_polish_never_reseeds_with_a_row_on_its_centre(spherical):
    # every row sits on its centre: moving one into the empty cluster would only copy a centre. cos: the rows' unit
    # copies equal their centres, while the float64 distance of x/‖x‖ to the float32 centre is ~1e-16, not 0 (a review)
    from kvant.distributed import kmeans as dk

    if spherical:
        x = np.repeat(np.array([[3, 4], [4, -3]], np.float32), 3, axis=0)
        centres = np.array([[0.6, 0.8], [0.8, -0.6], [-1, 0]], np.float32)
    else:
        x = np.repeat(np.array([[0, 0], [5, 5]], np.float32), 3, axis=0)
        centres = np.array([[0, 0], [5, 5], [100, 100]], np.float32)
    sums, counts, _, far = dk._pass(da.from_array(x, chunks=(2, 2)), centres, spherical, True)
    assert counts.tolist() == [3, 3, 0]
    assert dk._reseed_empty(sums, counts, far, centres) == 0
    assert counts.tolist() == [3, 3, 0]
    np.testing.assert_array_equal(dk._centroids_from_sums(sums, counts, centres, spherical), centres)


def test_default_sample_is_autos_size_and_the_client_trains_on_all_of_it(monkeypatch):
    x = np.random.default_rng(7).standard_normal((64000, 4)).astype(np.float32)
    arr = da.from_array(x, chunks=(8000, 4))
    seen = []
    real_fit = kvant.Clusterer.fit
    monkeypatch.setattr(kvant.Clusterer, "fit", lambda self, rows, *a, **kw: seen.append(rows.shape[0]) or
                        real_fit(self, rows, *a, **kw))
    with dask.config.set(scheduler="synchronous"):
        c = kd.DaskClusterer(k=3, seed=0).fit(arr)  # N/64 = 1000 > 256·K = 768
        assert c.sample_rows_ == 1000 and seen == [1000]
        given = kd.DaskClusterer(k=3, seed=0, sample_per_centroid=100).fit(arr)
        assert given.sample_rows_ == 300
    monkeypatch.undo()
    # the client's Clusterer trained on every gathered row: the same fit as a Clusterer on those rows
    idx = np.sort(kvant._config.rng(0).choice(64000, size=1000, replace=False))
    local = kvant.Clusterer(3, seed=0, sample_per_centroid=334).fit(x[idx])
    assert local.sample_rows_ == 1000
    np.testing.assert_array_equal(c.cluster_centers_, local.cluster_centers_)


def test_dask_clusterer_starts_from_given_centres():
    # far-apart blobs and a start on the true centres: cluster j is blob j (seeding would number them otherwise)
    g = np.random.default_rng(3)
    centres = (g.standard_normal((4, 5)) * 100).astype(np.float32)
    y = g.integers(0, 4, 3000)
    x = da.from_array((centres[y] + g.standard_normal((3000, 5))).astype(np.float32), chunks=(700, 5))
    with dask.config.set(scheduler="synchronous"):
        c = kd.DaskClusterer(k=4, seed=1, max_iter=1, init=centres).fit(x)
        np.testing.assert_array_equal(c.labels_.compute(), y)
        with pytest.raises(kvant.InvalidInput, match="init"):
            kd.DaskClusterer(k=4, init=centres[:3]).fit(x)


def test_empty_files_and_empty_chunks_are_skipped(tmp_path):
    # A 0-row part (a parquet directory holds them; the local reader skips them) and an empty chunk (filtering a
    # Dask array makes them) hold no rows: files are skipped, chunks encode to zero codes, instead of refusing.
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = _blobs(n=2000, d=6)
    np.save(tmp_path / "a.npy", x[:1000])
    np.save(tmp_path / "empty.npy", np.zeros((0, 6), np.float32))
    empty = pa.array([], type=pa.list_(pa.float32(), 6))
    pq.write_table(pa.table({"vector": empty}), tmp_path / "empty.parquet")
    kvant.io.write_parquet(tmp_path / "b.parquet", x[1000:])
    files = [tmp_path / "a.npy", tmp_path / "empty.npy", tmp_path / "empty.parquet", tmp_path / "b.parquet"]
    with dask.config.set(scheduler="synchronous"):
        c = kd.DaskClusterer(k=5, seed=0).fit(files)
        assert c.labels_.shape == (2000,) and c.n_samples_fit_ == 2000
        with pytest.raises(InvalidInput, match="every file of .*empty.npy, .*empty.parquet has zero rows"):
            kd.DaskClusterer(k=2).fit(files[1:3])
        (tmp_path / "parts").mkdir()  # a directory whose empty part is skipped too: one chunk per non-empty part
        pq.write_table(pa.table({"embedding": empty}), tmp_path / "parts" / "a_empty.parquet")
        with pytest.raises(InvalidInput, match="every file of .*parts has zero rows"):  # (said "all 0 files", a review)
            kd.DaskClusterer(k=2).fit([tmp_path / "parts"])
        kvant.io.write_parquet(tmp_path / "parts" / "b.parquet", x[:700])
        assert kd.as_dask_array(tmp_path / "parts").chunks[0] == (700,)
        from kvant.cli import main

        assert main(["cluster", *map(str, files), "-k", "5", "--dask", "local", "-q", "--json"]) == 0  # (review)
        pq_codec = kvant.PQ(dim=6, m=3, seed=0).fit(x)
        codes = kd.encode(pq_codec, da.from_array(x, chunks=((1000, 0, 1000), (6,)))).compute()
        np.testing.assert_array_equal(codes, pq_codec.encode(x))


def test_a_path_or_a_parquet_directory_is_one_chunk_per_file(tmp_path):
    x = _blobs(n=3000, d=6)
    (tmp_path / "parts").mkdir()
    for i in range(3):
        kvant.io.write_parquet(tmp_path / "parts" / f"p{i}.parquet", x[i * 1000 : (i + 1) * 1000])
    np.save(tmp_path / "x.npy", x)
    assert kd.as_dask_array(tmp_path / "parts").chunks[0] == (1000, 1000, 1000)
    assert kd.as_dask_array([str(tmp_path / "parts"), tmp_path / "x.npy"]).chunks[0] == (1000, 1000, 1000, 3000)
    with dask.config.set(scheduler="synchronous"):
        a = kd.DaskClusterer(k=4, seed=0).fit(str(tmp_path / "x.npy"))
        b = kd.DaskClusterer(k=4, seed=0).fit(tmp_path / "parts")
        np.testing.assert_array_equal(a.labels_.compute(), b.labels_.compute())  # the same rows, the same fit
    with pytest.raises(InvalidInput, match="an empty list of files"):
        kd.DaskClusterer(k=2).fit([])


def test_a_file_listed_twice_warns_and_names_it(tmp_path):
    # `kvant cluster --dask data/*.parquet data/` lists every part twice: its rows would count twice, silently
    x = _blobs(n=1000, d=6)
    (tmp_path / "parts").mkdir()
    kvant.io.write_parquet(tmp_path / "parts" / "p0.parquet", x)
    with pytest.warns(kvant.KvantWarning, match=r"p0.parquet is listed more than once") as record:
        arr = kd.as_dask_array([tmp_path / "parts" / "p0.parquet", tmp_path / "parts"])
    assert record[0].filename == __file__  # attributed to the caller's line, not to kvant
    assert arr.chunks[0] == (1000, 1000)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kd.as_dask_array([tmp_path / "parts"])  # once: no warning


def test_cli_dask_starts_from_init_centres(tmp_path, capsys, blob_files):
    from kvant.cli import main

    x_path, c_path, y = blob_files
    assert main(["cluster", str(x_path), "-k", "4", "--init", str(c_path), "--dask", "local",
                 "--max-iter", "1", "-o", str(tmp_path / "labels.npy"), "-q", "--json"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), y)  # cluster j is blob j: the given start
    capsys.readouterr()


@pytest.mark.parametrize("bad", [0, -5, 2.5, "10", True])
def test_as_dask_array_validates_chunk_rows(bad):
    # (review) 0 fell back to the default, "10" and True gave one-row chunks, -5 and 2.5 raised bare ValueErrors
    x = np.zeros((100, 3), np.float32)
    with pytest.raises(InvalidInput, match="chunk rows"):
        kd.as_dask_array(x, chunk_rows=bad)
    assert kd.as_dask_array(x, chunk_rows=10**20).numblocks == (1, 1)  # (more rows than the array: one chunk)


def test_parquet_directory_parts_storing_columns_in_another_order_read_as_the_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    pq.write_table(pa.table({"a": x[:5, 0], "b": x[:5, 1]}), tmp_path / "part0.parquet")
    pq.write_table(pa.table({"b": x[5:, 1], "a": x[5:, 0]}), tmp_path / "part1.parquet")
    np.testing.assert_array_equal(kvant.as_source(tmp_path).to_array(), x)
    np.testing.assert_array_equal(kd.as_dask_array(tmp_path).compute(), x)  # part1's columns were swapped


@pytest.mark.parametrize("dtype", [np.float32, np.int8])
def test_masked_arrays_are_refused_not_read_through_their_mask(dtype):
    x = _blobs(400, 6)
    m = np.ma.array((x * 10).astype(dtype), mask=np.zeros(x.shape, bool))
    m.mask[:10] = True
    fitted = kd.DaskClusterer(4, seed=0).fit(x)
    for call in (lambda: kd.DaskClusterer(4, seed=0).fit(m), lambda: fitted.predict(m),
                 lambda: kd.DaskClusterer(4, seed=0).fit(da.from_array(m, chunks=100))):
        with pytest.raises(InvalidInput, match="masked arrays are not supported"):
            call()


def test_relative_paths_are_read_from_the_clients_directory_not_the_workers(tmp_path, monkeypatch):
    # (review) the client opened files/a.npy against its own directory, but the tasks opened the relative path against
    # the worker's: a worker started elsewhere, holding other files of the same shape, clustered those, exit 0
    x = _blobs(n=1000, d=6)
    (tmp_path / "here" / "files").mkdir(parents=True)
    (tmp_path / "worker" / "files").mkdir(parents=True)
    np.save(tmp_path / "here" / "files" / "a.npy", x)
    kvant.io.write_parquet(tmp_path / "here" / "files" / "p.parquet", x[:300])
    np.save(tmp_path / "worker" / "files" / "a.npy", x * 100 + 7)  # same shape and dtype, other rows
    kvant.io.write_parquet(tmp_path / "worker" / "files" / "p.parquet", x[:300] * 100 + 7)
    (tmp_path / "worker" / "files" / "parts").mkdir()
    (tmp_path / "here" / "files" / "parts").mkdir()
    kvant.io.write_parquet(tmp_path / "here" / "files" / "parts" / "q.parquet", x[:200])
    kvant.io.write_parquet(tmp_path / "worker" / "files" / "parts" / "q.parquet", x[:200] * 100 + 7)
    monkeypatch.chdir(tmp_path / "here")
    arr = kd.as_dask_array(["files/a.npy", "files/p.parquet", "files/parts"])  # opened here: counts and dim
    c = kd.DaskClusterer(k=4, seed=0).fit(["files/a.npy"])
    pq_codec = kvant.PQ(dim=6, m=3, nbits=4, seed=0).fit(x)
    codes = kd.encode(pq_codec, "files/a.npy")
    monkeypatch.chdir(tmp_path / "worker")  # the tasks run from another directory, as a worker started elsewhere does
    np.testing.assert_array_equal(arr.compute(), np.vstack([x, x[:300], x[:200]]))
    np.testing.assert_array_equal(c.labels_.compute(), c.predict(x).compute())
    np.testing.assert_array_equal(codes.compute(), pq_codec.encode(x))


def test_parquet_files_listed_one_by_one_are_read_by_the_first_files_columns(tmp_path):
    # (review) as a parquet directory's reader does: a file storing the vector columns in another order is read in
    # the first file's order (its dims were permuted), and files whose columns differ are refused (accepted silently)
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = _blobs(n=200, d=4)
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({f"c{j}": x[:100, j] for j in range(4)}), tmp_path / "d" / "p0.parquet")
    pq.write_table(pa.table({f"c{j}": x[100:, j] for j in (2, 0, 1, 3)}), tmp_path / "d" / "p1.parquet")
    files = [tmp_path / "d" / "p0.parquet", tmp_path / "d" / "p1.parquet"]
    np.testing.assert_array_equal(kd.as_dask_array(tmp_path / "d").compute(), x)  # the directory form
    np.testing.assert_array_equal(kd.as_dask_array(files).compute(), x)  # the list form, as a shell glob gives it
    np.save(tmp_path / "a.npy", x[:50])  # other files in between change nothing
    np.testing.assert_array_equal(kd.as_dask_array([tmp_path / "a.npy", *files]).compute(), np.vstack([x[:50], x]))
    pq.write_table(pa.table({f"zz{j}": x[100:, j] for j in range(4)}), tmp_path / "other.parquet")
    with pytest.raises(InvalidInput, match=r"other.parquet: its vector columns would be \['zz0', 'zz1', 'zz2', "
                                           r"'zz3'\], but .*p0.parquet's are \['c0', 'c1', 'c2', 'c3'\]; all .*agree"):
        kd.as_dask_array([files[0], tmp_path / "other.parquet"])
    with pytest.raises(InvalidInput, match="must agree"):  # a directory's columns and a file's
        kd.as_dask_array([tmp_path / "d", tmp_path / "other.parquet"])
    with pytest.raises(InvalidInput, match="must agree"):  # an extra numeric column, as the directory refuses it
        pq.write_table(pa.table({**{f"c{j}": x[100:, j] for j in range(4)}, "w": np.ones(100, np.float32)}),
                       tmp_path / "extra.parquet")
        kd.as_dask_array([files[0], tmp_path / "extra.parquet"])


def test_polish_reseeds_every_empty_cluster_from_distinct_rows_as_clusterer_does():
    # (review) 3000 copies of one row and four far rows 100 times each: the 32 farthest rows were mostly copies of one
    # row, so one re-seed per pass happened and two clusters stayed empty ([100, 100, 3200, 0, 0]); Clusterer re-seeds
    # from distinct rows with their copy counts
    import warnings

    x = np.vstack([np.zeros((3000, 2))] + [np.tile(f, (100, 1)) for f in
                                           ([100, 0], [0, 100], [-100, 0], [0, -100])]).astype(np.float32)
    ref = kvant.Clusterer(5, "l2", "auto", 0, sample_per_centroid=1, polish_iter=1).fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kvant.EmptyClusterWarning)
        c = kd.DaskClusterer(5, seed=0, sample_per_centroid=1, polish_iter=1).fit(da.from_array(x, chunks=1000))
    assert sorted(c.counts_.tolist()) == sorted(np.bincount(ref.labels_, minlength=5).tolist()) == [100] * 4 + [3000]
    assert c.inertia_ <= ref.inertia_  # (here 0: every centre on its rows; Clusterer's moved centre is not re-fitted)
    assert np.array_equal(np.bincount(c.labels_.compute(), minlength=5), c.counts_)


def test_a_fit_leaving_clusters_empty_warns_as_clusterer_does(monkeypatch):
    # the final counts decide, as Clusterer's final labels do: not the sample's fit on the client (it warned for its
    # own empty clusters, which the polish then filled, and said nothing of a cluster the full pass left empty)
    import warnings

    from kvant.distributed import kmeans as dk

    x = np.repeat(np.array([[0, 0], [5, 5], [9, 1]], np.float32), 50, axis=0)  # 3 distinct rows, k = 5
    with pytest.warns(kvant.EmptyClusterWarning, match=r"2 of the k=5 clusters are empty") as record:
        kvant.Clusterer(5, seed=0).fit(x)
    with pytest.warns(kvant.EmptyClusterWarning, match=r"2 of the k=5 clusters are empty \(ids") as mine:
        c = kd.DaskClusterer(5, seed=0, polish_iter=2).fit(da.from_array(x, chunks=40))
    assert [str(w.message).split(" (ids")[0] for w in mine] == [str(record[0].message).split(" (ids")[0]]
    assert mine[0].filename == __file__ and (c.counts_ == 0).sum() == 2
    y = np.abs(_blobs(n=3000, k=4)) + 0.1
    local_cls = dk.Clusterer

    class DeadCentre(local_cls):  # training hands the full pass a centre no row is near
        def fit(self, rows):
            super().fit(rows)
            self.cluster_centers_ = self.cluster_centers_.copy()
            self.cluster_centers_[1] = -1e4
            return self

    monkeypatch.setattr(dk, "Clusterer", DeadCentre)
    with pytest.warns(kvant.EmptyClusterWarning, match=r"^1 of the k=5 clusters are empty \(ids 1\)"):
        kd.DaskClusterer(k=5, seed=0, sample_per_centroid=64).fit(da.from_array(y, chunks=(700, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", kvant.EmptyClusterWarning)
        kd.DaskClusterer(k=5, seed=0, sample_per_centroid=64, polish_iter=2).fit(da.from_array(y, chunks=(700, 8)))


def _keys_holding(graph, data: bytes) -> int:
    import pickle

    return sum(data in pickle.dumps(task) for task in dict(graph).values())


def test_centres_and_codebooks_are_one_key_shared_by_every_task():
    # (review) Dask de-duplicates only NumPy arguments over 1 MB: every label task carried its own copy of the
    # centres, and every encode task its own copy of the codec, where the docs promise one key shared by all
    x = _blobs(n=4000, d=8)
    arr = da.from_array(x, chunks=(250, 8))  # 16 chunks
    c = kd.DaskClusterer(k=5, seed=0).fit(arr)
    centres = c.cluster_centers_.tobytes()
    assert _keys_holding(c.labels_.__dask_graph__(), centres) == 1
    assert _keys_holding(c.predict(arr).__dask_graph__(), centres) == 1
    for codec in (kvant.PQ(8, 2, nbits=4, seed=0).fit(x), kvant.OPQ(8, 2, nbits=4, seed=0).fit(x)):
        codes = kd.encode(codec, arr)
        assert _keys_holding(codes.__dask_graph__(), np.asarray(codec.codebooks_).tobytes()) == 1
        np.testing.assert_array_equal(codes.compute(), codec.encode(x))
    np.testing.assert_array_equal(c.labels_.compute(), c.predict(x).compute())


def test_lazy_zero_norm_error_names_the_chunk_and_its_first_zero_row():
    x = _blobs(n=3000)
    c = kd.DaskClusterer(k=3, metric="cos", seed=0).fit(da.from_array(x, chunks=(1000, 8)))
    x[2500] = 0
    x[2700] = 0
    with pytest.raises(InvalidInput, match=r"^the chunk of input rows 2000-2999 has a row of zero norm \(first bad "
                                           r"row: 2500\); metric='cos' needs non-zero vectors") as err:
        c.predict(da.from_array(x, chunks=(1000, 8))).compute()
    assert err.value.bad_row == 2500 and err.value.zero_norm


@pytest.mark.parametrize("case", ["distinct", "copies", "collision", "negative zero"])
def test_chunk_far_rows_are_clusterers_distinct_far_rows(case, monkeypatch):
    # the polish keeps per chunk what kvant.cluster.reseed.distinct_far_rows keeps (Clusterer's helper), found faster
    from kvant.cluster.reseed import distinct_far_rows
    from kvant.distributed import kmeans as dk

    g = np.random.default_rng(5)
    x = g.standard_normal((3000, 6)).astype(np.float32)
    if case in ("copies", "collision"):
        x[100:2500] = x[g.integers(0, 40, 2400)] * 10  # 40 rows, many copies each, far from the centres
    if case == "collision":
        monkeypatch.setattr(dk, "_HASH_MULT", np.zeros(1024, np.uint64))  # every row hashes alike
    if case == "negative zero":
        x[:, 0] = 0.0
        x[::2, 0] = -0.0  # other bytes: distinct rows for distinct_far_rows too
        x[1::2, 1:] = x[::2, 1:]
    centres = x[:5] / 2
    _, labels, per_row = dk._assign_chunk(x, 7000, centres, False)
    per_row[::7] = 0.0  # rows on their centre (or left out) are not candidates
    want = distinct_far_rows(per_row, 7000, labels, x, 32)
    got = dk._distinct_far_rows(per_row, 7000, labels, x, 32)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)
    if case == "copies":
        assert want[4].max() > 1


def test_a_file_changed_after_it_was_opened_is_refused_by_name(tmp_path):
    # (review) a lazy result computed after an input file was rewritten read its new rows, silently (or a file of
    # another row count made a chunk of the wrong shape)
    import os

    x = _blobs(n=2000, d=6)
    np.save(tmp_path / "a.npy", x[:1000])
    np.save(tmp_path / "b.npy", x[1000:])
    files = [tmp_path / "a.npy", tmp_path / "b.npy"]
    c = kd.DaskClusterer(k=4, seed=0).fit(files)
    arr = kd.as_dask_array(files)
    np.testing.assert_array_equal(arr.compute(), x)  # unchanged: read as opened
    before = os.stat(tmp_path / "b.npy").st_mtime_ns
    np.save(tmp_path / "b.npy", x[1000:] * 2)  # the same shape, other rows
    os.utime(tmp_path / "b.npy", ns=(before + 10**9, before + 10**9))
    for lazy in (arr, c.labels_):
        with pytest.raises(InvalidInput, match=r"b.npy: the input file changed after it was opened on the client"):
            lazy.compute()
    np.testing.assert_array_equal(kd.as_dask_array(files).compute(), np.vstack([x[:1000], x[1000:] * 2]))  # opened anew
