"""Lloyd iterations: equivalence with scikit-learn, scheduler/chunking independence, graph size,
empty-cluster policies. Runs on the real clusters from conftest."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from distributed.diagnostics.plugin import SchedulerPlugin
from sklearn.cluster import KMeans as SkKMeans
from sklearn.cluster import kmeans_plusplus
from sklearn.datasets import load_digits, make_blobs
from sklearn.utils import check_random_state

from dkm.kmeans.estimators import KMeans


@pytest.fixture(scope="module")
def blobs():
    X, _ = make_blobs(100_000, n_features=25, centers=64, cluster_std=1.5, random_state=0)
    X = X.astype(np.float32)
    C0, _ = kmeans_plusplus(X, 64, random_state=1)
    return X, C0


def _sklearn(X, C0, **kw):
    return SkKMeans(C0.shape[0], init=C0, n_init=1, algorithm="lloyd", **kw).fit(X)


def _assert_same(km, sk):
    assert km.n_iter_ == sk.n_iter_
    np.testing.assert_allclose(km.cluster_centers_, sk.cluster_centers_, rtol=0, atol=1e-4)
    assert abs(km.inertia_ - sk.inertia_) <= 1e-5 * sk.inertia_
    np.testing.assert_array_equal(np.asarray(km.labels_.compute()), sk.labels_)


@pytest.mark.slow
def test_matches_sklearn_on_blobs_process_cluster(client, blobs):
    X, C0 = blobs
    sk = _sklearn(X, C0, tol=0, max_iter=300)
    km = KMeans(64, init=C0, tol=0, max_iter=300).fit(X)
    assert km.history_.attrs["backend"] == "distributed"
    assert km.history_.attrs["converged"] == "strict"
    _assert_same(km, sk)


@pytest.mark.parametrize("max_iter", [3, 300])
def test_matches_sklearn_on_digits(threaded_client, max_iter):
    X = load_digits().data.astype(np.float32)
    C0, _ = kmeans_plusplus(X, 10, random_state=3)
    sk = _sklearn(X, C0, tol=0, max_iter=max_iter)
    km = KMeans(10, init=C0, tol=0, max_iter=max_iter).fit(X)
    _assert_same(km, sk)
    if max_iter == 3:
        assert km.history_.attrs["converged"] == "max_iter"


def test_tol_is_relative_to_feature_variance(threaded_client, blobs):
    X, C0 = blobs
    X = X[:20000]
    sk = _sklearn(X, C0, tol=1e-2, max_iter=300)
    km = KMeans(64, init=C0, tol=1e-2, max_iter=300).fit(X)
    assert km.history_.attrs["tol_abs"] == pytest.approx(1e-2 * X.astype(np.float64).var(0).mean())
    _assert_same(km, sk)


def _zarr_store(tmp_path, X, rows):
    path = tmp_path / "feat.zarr"
    ds = xr.Dataset({"features": (("sample", "feature"), X)}).chunk({"sample": rows})
    ds.to_zarr(path, consolidated=False)
    return path


@pytest.mark.slow
def test_same_result_threaded_processes_and_chunkings(tmp_path, process_cluster, threaded_cluster):
    from distributed import Client

    X, _ = make_blobs(30_000, n_features=8, centers=20, cluster_std=2.0, random_state=5)
    X = X.astype(np.float32)
    path = _zarr_store(tmp_path, X, rows=4_000)
    params = dict(n_clusters=20, init="k-means||", tol=0, max_iter=100, random_state=11)
    results = {}
    with Client(process_cluster):
        results["processes, zarr chunks 4000"] = KMeans(**params).fit(path)
    with Client(threaded_cluster):
        xd = da.from_zarr(str(path / "features")).rechunk(7_001)
        results["threaded client, chunks 7001"] = KMeans(**params).fit(xd)
    with dask.config.set(scheduler="threads"):
        results["local threads, numpy"] = KMeans(**params).fit(X)
    ref = results.pop("processes, zarr chunks 4000")
    assert ref.history_.attrs["backend"] == "distributed"
    for label, km in results.items():
        assert km.n_iter_ == ref.n_iter_, label
        np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, atol=1e-5), label
        assert km.inertia_ == pytest.approx(ref.inertia_, rel=1e-6), label
    assert results["local threads, numpy"].history_.attrs["backend"] == "threads"


class _TaskLog(SchedulerPlugin):
    """Records every task key the scheduler receives (runs inside the scheduler)."""

    name = "dkm-test-task-log"

    def __init__(self):
        self.keys = []

    def update_graph(self, scheduler, *, tasks, **kwargs):
        self.keys.extend(str(k) for k in tasks)


@pytest.mark.slow
@pytest.mark.parametrize("tree", [False, True])
def test_tasks_per_iteration_constant(client, tree):
    # tree: force the on-worker tree reduction used for large k x d partial sums.
    # Task by task: rounds (several iterations per task, test_kmeans_rounds.py) are off.
    limit = 0 if tree else "32MiB"
    with dask.config.set({"dkm.backend.client-reduce-bytes": limit, "dkm.lloyd.rounds": "off"}):
        _tasks_per_iteration_constant(client, tree)


def _tasks_per_iteration_constant(client, tree):
    # Uniform data: Lloyd does not converge within 50 iterations, so all 50 run.
    X = np.random.default_rng(0).random((40_000, 2), dtype=np.float32)
    client.register_plugin(_TaskLog())
    try:
        km = KMeans(60, init="sample", tol=0, max_iter=50, random_state=0).fit(
            da.from_array(X, chunks=5_000)  # 8 blocks (no merging): one tree level if forced
        )
        keys = client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.plugins[_TaskLog.name].keys
        )
    finally:
        client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.plugins.pop(_TaskLog.name, None)
        )
    assert km.n_iter_ == 50
    # update_graph also lists already-known dependencies, so count distinct keys.
    per_it = [len({k for k in keys if f"-it{i}-" in k}) for i in range(50)]
    nb = km.history_.attrs["n_blocks"]
    assert nb == 8
    assert per_it[1] == per_it[49] == 2 * nb + (1 if tree else 0)
    assert per_it == km.history_["n_tasks"].values.tolist()
    with dask.config.set(scheduler="threads"):  # same numbers without the cluster
        ref = KMeans(60, init="sample", tol=0, max_iter=3, random_state=0).fit(X)
    np.testing.assert_allclose(km.history_["inertia"][:3], ref.history_["inertia"], rtol=1e-9)


def _empty_setup():
    X, _ = make_blobs(3_000, n_features=4, centers=5, cluster_std=0.5, random_state=2)
    X = X.astype(np.float32)
    C0 = X[[0, 10, 20, 30, 40]].astype(np.float64)
    C0 = np.vstack([C0, np.full((2, 4), 1000.0)])  # two centers no point will pick
    return X, C0


@pytest.mark.parametrize("policy", ["farthest", "random-point", "random-vector", "zero", "keep"])
def test_empty_cluster_policies(threaded_client, policy):
    X, C0 = _empty_setup()
    km = KMeans(7, init=C0, max_iter=1, tol=0, empty_cluster=policy, random_state=5).fit(X)
    h = km.history_
    assert h.attrs["empty_cluster"] == policy
    assert int(h["n_empty"][0]) == 2
    assert int(h["n_reseeded"][0]) == (0 if policy == "keep" else 2)
    new = km.cluster_centers_[5:]
    if policy == "farthest":
        # scikit-learn relocates empty clusters to the farthest points too: same centers.
        sk = _sklearn(X, C0, max_iter=1, tol=0)
        np.testing.assert_allclose(km.cluster_centers_, sk.cluster_centers_, atol=1e-5)
        d2 = ((X[:, None, :] - C0[None, :5, :]) ** 2).sum(-1).min(1)
        far = X[np.argsort(-d2)[:2]]
        np.testing.assert_allclose(new, far, atol=1e-6)
    elif policy == "random-point":
        for row in new:
            assert (np.abs(X - row).max(axis=1) < 1e-5).any()  # a data row (centering rounds)
        assert not np.allclose(new[0], new[1])
    elif policy == "random-vector":
        # Every coordinate uniform in the data's global [min, max], from the first start's
        # seed and the iteration (0).
        lo, hi = float(X.min()), float(X.max())
        assert h.attrs["init_range"] == [lo, hi]
        ref = np.random.default_rng([_start_seed(5), 0]).uniform(lo, hi, size=(2, 4))
        np.testing.assert_allclose(new, ref, atol=1e-5)
    elif policy == "zero":
        np.testing.assert_array_equal(new, 0)
    else:
        np.testing.assert_array_equal(new, C0[5:].astype(np.float32))


def test_empty_cluster_keep_runs_to_convergence(threaded_client):
    X, C0 = _empty_setup()
    km = KMeans(7, init=C0, max_iter=100, tol=0, empty_cluster="keep").fit(X)
    assert (km.history_["n_empty"].values == 2).all()
    assert np.bincount(km.labels_.compute(), minlength=7)[5:].sum() == 0


def test_float64(threaded_client, blobs):
    X, C0 = blobs
    X = X[:10000].astype(np.float64)
    sk = _sklearn(X, C0, tol=0, max_iter=300)
    km = KMeans(64, init=C0, tol=0, max_iter=300, dtype=np.float64).fit(X)
    assert km.cluster_centers_.dtype == np.float64
    assert km.n_iter_ == sk.n_iter_
    np.testing.assert_allclose(km.cluster_centers_, sk.cluster_centers_, atol=1e-9)
    assert km.inertia_ == pytest.approx(sk.inertia_, rel=1e-9)


# --------------------------------------------------------------------------- "random-vector"


def _start_seed(random_state: int, start: int = 0) -> int:
    """The seed of a start, drawn as the estimator draws them."""
    rs = check_random_state(random_state)
    return [int(rs.randint(np.iinfo(np.int32).max)) for _ in range(start + 1)][start]


def _reset_setup():
    """2-D blobs, five centres on data rows and two no row picks: the two are empty after
    the first assignment, and in 2-D the random vectors that replace them catch rows."""
    X, _ = make_blobs(3_000, n_features=2, centers=5, cluster_std=1.5, random_state=2)
    X = X.astype(np.float32)
    C0 = np.vstack([X[[0, 10, 20, 30, 40]].astype(np.float64), np.full((2, 2), 1000.0)])
    return X, C0


def _lloyd_reference(X, C0, seed, lo, hi, max_iter):
    """Plain numpy Lloyd (float64, data coordinates) with dkm's stopping rules (tol=0) and
    the random-vector reset: the empty clusters, in order, take the rows of
    ``default_rng([seed, iteration]).uniform(lo, hi, (n_empty, d))``."""
    X = X.astype(np.float64)
    C, prev, n_empty = C0.copy(), None, []
    k, d = C.shape
    for it in range(max_iter):
        labels = ((X[:, None, :] - C[None]) ** 2).sum(-1).argmin(1)
        counts = np.bincount(labels, minlength=k)
        new = C.copy()
        for j in np.flatnonzero(counts):
            new[j] = X[labels == j].mean(0)
        empty = np.flatnonzero(counts == 0)
        new[empty] = np.random.default_rng([seed, it]).uniform(lo, hi, size=(len(empty), d))
        n_empty.append(len(empty))
        shift, C = ((new - C) ** 2).sum(), new
        if prev is not None and (labels == prev).all():
            break
        if shift <= 0:
            break
        prev = labels
    return C, n_empty


@pytest.mark.parametrize("init_range", [None, (-20.0, 20.0)])
def test_random_vector_resets_match_a_numpy_lloyd(threaded_client, init_range):
    X, C0 = _reset_setup()
    km = KMeans(
        7,
        init=C0,
        max_iter=60,
        tol=0,
        empty_cluster="random-vector",
        init_range=init_range,
        random_state=8,
    ).fit(X)
    lo, hi = (float(X.min()), float(X.max())) if init_range is None else init_range
    ref, n_empty = _lloyd_reference(X, C0, _start_seed(8), lo, hi, 60)
    assert km.history_["n_empty"].values.tolist() == n_empty
    assert n_empty[0] == 2 and km.history_.attrs["converged"] == "strict"
    np.testing.assert_allclose(km.cluster_centers_, ref, atol=1e-4)
    # The reset centres caught rows: the run ends with no cluster empty.
    assert (np.bincount(km.labels_.compute(), minlength=7) > 0).all()


def _resetting_fit() -> KMeans:
    # On _reset_setup's data this fit's second (and best) start resets empty clusters in its
    # first four iterations.
    return KMeans(
        20,
        init="uniform",
        n_init=2,
        empty_cluster="random-vector",
        tol=0,
        max_iter=40,
        random_state=1,
    )


def test_random_vector_same_on_threads_and_process_cluster(process_cluster, threaded_cluster):
    from distributed import Client

    X, _ = _reset_setup()
    Xd = da.from_array(X, chunks=1_000)
    with Client(process_cluster):
        ref = _resetting_fit().fit(Xd)
    with Client(threaded_cluster):
        threads = _resetting_fit().fit(Xd)
    assert ref.history_.attrs["backend"] == "distributed"
    assert ref.history_["n_empty"].values[:4].all()  # the resets did happen
    assert threads.n_iter_ == ref.n_iter_
    np.testing.assert_array_equal(threads.history_["n_empty"], ref.history_["n_empty"])
    np.testing.assert_allclose(threads.cluster_centers_, ref.cluster_centers_, atol=1e-5)
    assert threads.inertia_ == pytest.approx(ref.inertia_, rel=1e-6)


def test_random_vector_resume_ends_where_the_full_fit_ends():
    X, _ = _reset_setup()
    states = []
    with dask.config.set(scheduler="threads"):
        full = _resetting_fit().fit(X, callback=states.append)
        assert full.history_.attrs["best_start"] == 1
        assert full.history_["n_empty"].values[:4].all()
        # Resumed in the best start before its third and fourth resets (0-based iterations
        # 2 and 3).
        state = next(s for s in states if s.start == 1 and s.iteration == 2)
        resumed = _resetting_fit().fit(X, resume_from=state)
    np.testing.assert_array_equal(resumed.cluster_centers_, full.cluster_centers_)
    assert resumed.inertia_ == full.inertia_ and resumed.n_iter_ == full.n_iter_
    for key in ("n_empty", "inertia", "center_shift"):
        np.testing.assert_array_equal(resumed.history_[key], full.history_[key])


def _bytes_per_row(n: int, *steps) -> float:
    """Bytes of the distinct arrays with a length-``n`` axis inside the given steps."""
    seen: dict[int, int] = {}

    def walk(obj):
        if isinstance(obj, np.ndarray):
            if n in obj.shape:
                seen[id(obj)] = obj.nbytes
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                walk(item)

    for step in steps:
        walk(step)
    return sum(seen.values()) / n


@pytest.mark.parametrize("d", [25, 64])  # row norms computed in each pass; kept between them
def test_row_state_bytes_is_what_the_steps_keep(d):
    """The blocks plan reserves ``row_state_bytes`` per row: the most that two consecutive
    steps of a block hold at once, whatever the passes (plain, pruned, back to plain)."""
    from dkm._parallel import kernels
    from dkm.kmeans import _hamerly
    from dkm.kmeans._iteration import PRUNED_STEPS
    from dkm.kmeans.lloyd import row_state_bytes

    rng = np.random.default_rng(0)
    n, k = 3001, 128
    x = rng.normal(size=(n, d)).astype(np.float32)
    centres = [x[rng.choice(n, k, replace=False)].astype(np.float64) for _ in range(4)]
    packed = [kernels.pack_centers(c, np.dtype(np.float32)) for c in centres]
    tiles = kernels.Tiles()
    first = kernels.lloyd_step(x, packed[0], None, tiles)
    second = kernels.lloyd_step(x, packed[1], first, tiles)
    plain = _bytes_per_row(n, first, second)
    assert plain == row_state_bytes("lloyd", k, d, np.float32, False, 1)
    assert row_state_bytes("lloyd", k, d, np.float32, False, 3) == plain + 4  # best labels
    for name, step in PRUNED_STEPS.items():

        def pruned(i, prev, name=name, step=step):
            motion = _hamerly.motion_since(centres[i - 1], [prev], centres[i], name)
            return step(x, packed[i], prev, motion, tiles)

        setup = pruned(1, first)
        moved = pruned(2, setup)
        back = kernels.lloyd_step(x, packed[3], moved, tiles)
        held = [
            _bytes_per_row(n, *pair) for pair in ((first, setup), (setup, moved), (moved, back))
        ]
        assert max(held) == row_state_bytes(name, k, d, np.float32, False, 1), (name, held)
    # "auto" reserves for the bounds it would use: Hamerly's below 512 centres.
    assert row_state_bytes("auto", k, d, np.float32, False, 1) == row_state_bytes(
        "hamerly", k, d, np.float32, False, 1
    )
