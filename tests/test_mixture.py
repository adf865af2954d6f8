"""GaussianMixture: scikit-learn's EM iterates on every input kind and chunking, the fitted
model's densities, dkm's initialisations, resume from a fit state, parameter errors before any
compute, and a constant task graph per iteration."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from distributed.diagnostics.plugin import SchedulerPlugin
from sklearn.datasets import make_blobs
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from dkm.mixture import GaussianMixture
from dkm.results.store import ResultsStore

K, D = 3, 4
COV_TYPES = ["full", "tied", "diag", "spherical"]


@pytest.fixture(scope="module")
def blobs():
    # Overlapping blobs of different spreads, away from the origin: EM needs a dozen or more
    # iterations and the centering of the blocks matters.
    x, _ = make_blobs(
        3000,
        n_features=D,
        centers=K,
        cluster_std=[1.0, 2.5, 0.6],
        center_box=(-8, 8),
        random_state=3,
    )
    return x + 20.0


def initial(x: np.ndarray, cov: str) -> dict:
    """weights_init, means_init and precisions_init, as both estimators take them."""
    rng = np.random.default_rng(0)
    means = x[rng.choice(len(x), K, replace=False)]
    prec = {
        "full": np.stack([np.eye(D) * s for s in (0.5, 1.0, 2.0)]),
        "tied": np.eye(D) * 0.7,
        "diag": np.tile([[0.5], [1.0], [2.0]], (1, D)),
        "spherical": np.array([0.5, 1.0, 2.0]),
    }[cov]
    return {"weights_init": np.array([0.2, 0.3, 0.5]), "means_init": means, "precisions_init": prec}


def sk_fit(x, cov, **kw):
    return SkGaussianMixture(K, covariance_type=cov, **initial(x, cov), **kw).fit(x)


def dkm(cov, x, **kw):
    kw = {"tol": 1e-8, "max_iter": 200, "dtype": np.float64, **kw}
    return GaussianMixture(K, covariance_type=cov, **initial(x, cov), **kw)


def zarr_path(tmp_path, x, rows):
    path = tmp_path / "x.zarr"
    xr.Dataset({"features": (("sample", "feature"), x)}).chunk({"sample": rows}).to_zarr(
        path, consolidated=False
    )
    return str(path)


ATTRS = ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_")


def assert_same_model(g, sk, rtol=1e-6):
    for attr in ATTRS:
        np.testing.assert_allclose(
            getattr(g, attr), getattr(sk, attr), rtol=rtol, atol=rtol * 1e-3, err_msg=attr
        )
    assert g.lower_bound_ == pytest.approx(sk.lower_bound_, rel=rtol)
    np.testing.assert_allclose(g.lower_bounds_, sk.lower_bounds_, rtol=rtol)
    assert (g.n_iter_, g.converged_) == (sk.n_iter_, sk.converged_)


@pytest.mark.parametrize("cov", COV_TYPES)
def test_em_matches_sklearn_on_every_input_and_chunking(client, blobs, cov, tmp_path):
    sk = sk_fit(blobs, cov, tol=1e-8, max_iter=200)
    assert sk.converged_ and sk.n_iter_ > 5  # the comparison covers many iterations
    inputs = {
        "numpy": blobs,
        "dask, chunks of 500": da.from_array(blobs, chunks=(500, D)),
        "dask, uneven chunks": da.from_array(blobs, chunks=((1234, 1, 765, 1000), (D,))),
        "zarr, chunks of 700": zarr_path(tmp_path, blobs, 700),
    }
    inputs["zarr, streamed"] = inputs["zarr, chunks of 700"]
    for label, x in inputs.items():
        g = dkm(cov, blobs, persist=label != "zarr, streamed").fit(x)
        assert g.history_.attrs["backend"] == "distributed", label
        assert g.history_.attrs["streamed"] == (label == "zarr, streamed")
        assert_same_model(g, sk)
        np.testing.assert_allclose(g.history_["lower_bound"], sk.lower_bounds_, rtol=1e-6)


@pytest.mark.parametrize("cov", COV_TYPES)
def test_two_worker_processes_and_threads_give_the_same_model(
    client, threaded_client, blobs, cov
):
    """The E-step's partial statistics are combined in block order wherever the blocks
    run, so the fitted model is the same to the last bit."""
    x = da.from_array(blobs, chunks=(400, D))
    fits = {}
    for name, where in (
        ("2 worker processes", client.as_current()),
        ("a worker with 2 threads", threaded_client.as_current()),
        ("local threads", dask.config.set(scheduler="threads")),
    ):
        with where:
            fits[name] = dkm(cov, blobs, max_iter=30).fit(x)
    ref = fits.pop("2 worker processes")
    assert ref.history_.attrs["backend"] == "distributed"
    for name, g in fits.items():
        assert g.history_.attrs["n_blocks"] == ref.history_.attrs["n_blocks"], name
        for attr in ATTRS:
            np.testing.assert_array_equal(getattr(g, attr), getattr(ref, attr), f"{name} {attr}")
        np.testing.assert_array_equal(g.lower_bounds_, ref.lower_bounds_, name)
        assert g.n_iter_ == ref.n_iter_, name
    assert fits["local threads"].history_.attrs["backend"] == "threads"


def sk_with(g, cov):
    """A scikit-learn estimator holding dkm's fitted parameters."""
    sk = SkGaussianMixture(K, covariance_type=cov)
    for attr in (*ATTRS, "n_features_in_"):
        setattr(sk, attr, getattr(g, attr))
    return sk


@pytest.mark.parametrize("cov", COV_TYPES)
def test_fitted_model_matches_sklearn(client, blobs, cov):
    g = dkm(cov, blobs, max_iter=5, tol=0.0)
    with pytest.warns(ConvergenceWarning, match="max_iter=5"):
        g.fit(blobs)
    sk = sk_with(g, cov)
    x_new = blobs[::7] + np.random.default_rng(1).normal(size=(len(blobs[::7]), D))
    xd = da.from_array(x_new, chunks=(100, D))
    for x in (x_new, xd):
        kind = np.ndarray if x is x_new else da.Array
        pred, proba, samples = g.predict(x), g.predict_proba(x), g.score_samples(x)
        assert all(isinstance(v, kind) for v in (pred, proba, samples))
        np.testing.assert_array_equal(np.asarray(pred), sk.predict(x_new))
        np.testing.assert_allclose(np.asarray(proba), sk.predict_proba(x_new), atol=1e-12)
        np.testing.assert_allclose(np.asarray(samples), sk.score_samples(x_new), rtol=1e-10)
        assert g.score(x) == pytest.approx(sk.score(x_new), rel=1e-10)
        assert g.bic(x) == pytest.approx(sk.bic(x_new), rel=1e-10)
        assert g.aic(x) == pytest.approx(sk.aic(x_new), rel=1e-10)
    with pytest.warns(ConvergenceWarning):
        labels = g.fit_predict(xd)  # refits on x_new: the labels of the new model
    assert isinstance(labels, da.Array)
    np.testing.assert_array_equal(labels.compute(), sk_with(g, cov).predict(x_new))


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_kmeans_init_finds_a_likelihood_as_good_as_sklearn(client, cov):
    x, _ = make_blobs(4000, n_features=5, centers=6, cluster_std=0.8, random_state=4)
    sk = SkGaussianMixture(6, covariance_type=cov, random_state=0).fit(x)
    # Default float32 storage, a dask input in uneven chunks.
    g = GaussianMixture(6, covariance_type=cov, random_state=0).fit(
        da.from_array(x, chunks=((1500, 700, 1800), (5,)))
    )
    assert g.converged_
    assert g.init_info_["method"] == "kmeans" and g.init_info_["kmeans_n_iter"] >= 1
    assert g.lower_bound_ >= sk.lower_bound_ - 1e-3
    assert g.score(x) >= sk.score(x) - 1e-3
    # dkm's k-means initialisation does not depend on the chunking.
    again = GaussianMixture(6, covariance_type=cov, random_state=0).fit(x.astype(np.float32))
    np.testing.assert_allclose(again.means_, g.means_, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["k-means++", "random", "random_from_data"])
def test_other_initialisations_converge(client, init):
    x, _ = make_blobs(2000, n_features=3, centers=3, cluster_std=0.5, random_state=1)
    sk = SkGaussianMixture(3, random_state=0).fit(x)

    def make():
        # Random responsibilities start every component at the data mean: EM leaves it
        # slowly, and stops there with the default tol (scikit-learn's does too).
        return GaussianMixture(3, init_params=init, n_init=2, random_state=0, tol=1e-6)

    g = make().fit(x)
    assert g.converged_
    assert g.init_info_["method"] == init
    assert g.lower_bound_ == pytest.approx(sk.lower_bound_, abs=1e-3)
    if init == "random":  # responsibilities drawn per row: any chunking, the same start
        again = make().fit(da.from_array(x, chunks=((333, 1000, 667), (3,))))
        np.testing.assert_allclose(again.means_, g.means_, rtol=1e-6)
        assert again.n_iter_ == g.n_iter_


def through_store(state, tmp_path):
    store = ResultsStore(tmp_path / "r.zarr")
    if not store.path.exists():
        store.start_job({"job": {}})
    store.write_checkpoint("gmm-k3", state)
    return store.read_checkpoint("gmm-k3")


@pytest.mark.parametrize(("cov", "init"), [("full", "kmeans"), ("diag", "random")])
def test_resume_from_a_mid_fit_state_equals_the_uninterrupted_fit(
    client, blobs, cov, init, tmp_path
):
    def make():
        return GaussianMixture(
            K,
            covariance_type=cov,
            init_params=init,
            n_init=2,
            tol=1e-6,
            max_iter=200,
            random_state=5,
            dtype=np.float64,
        )

    states = []
    full = make().fit(blobs, callback=states.append)
    assert {s.start for s in states} == {0, 1}
    first = [s for s in states if s.start == 0]
    second = [s for s in states if s.start == 1]
    assert [s.iteration for s in first] == list(range(len(first)))
    assert len(first) > 4 and first[-1].info["stopped"] == "converged"
    for state in (first[3], second[0], second[len(second) // 2], second[-1]):
        resumed = make().fit(blobs, resume_from=through_store(state, tmp_path))
        for attr in ATTRS:
            np.testing.assert_array_equal(getattr(resumed, attr), getattr(full, attr), attr)
        assert resumed.lower_bound_ == full.lower_bound_
        assert resumed.n_iter_ == full.n_iter_
        np.testing.assert_array_equal(resumed.history_["lower_bound"], full.history_["lower_bound"])


def test_a_state_of_another_fit_is_refused(client, blobs):
    states = []
    dkm("diag", blobs).fit(blobs, callback=states.append)
    with pytest.raises(ValueError, match=r"covariances has shape \(3, 4\), expected \(3,\)"):
        dkm("spherical", blobs).fit(blobs, resume_from=states[2])


def _never_computed():
    raise AssertionError("the input was computed before the parameters were checked")


LAZY = da.from_delayed(dask.delayed(_never_computed)(), shape=(100, 3), dtype=np.float64)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"n_components": 0}, r"n_components must be an integer >= 1, got 0"),
        ({"covariance_type": "banana"}, r"covariance_type must be one of 'full'.*got 'banana'"),
        ({"reg_covar": -1}, r"reg_covar must be a finite number >= 0, got -1"),
        ({"init_params": "kmeans||"}, r"init_params must be one of 'kmeans'"),
        ({"max_iter": 0}, r"max_iter must be an integer >= 1"),
        ({"n_components": 101}, r"n_components=101 needs at least .* n_samples=100"),
        ({"means_init": np.zeros((2, 3))}, r"means_init has shape \(2, 3\); expected \(1, 3\)"),
        ({"weights_init": [0.5, 0.6], "n_components": 2}, r"weights_init must sum to 1"),
        (
            {"precisions_init": -np.eye(3)[None], "n_components": 1},
            r"precisions_init \(full\) must be symmetric positive-definite",
        ),
        ({"precisions_init": [0.0], "covariance_type": "spherical"}, r"must be positive"),
    ],
)
def test_bad_parameters_fail_before_any_compute(params, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**params).fit(LAZY)


def test_predict_before_fit():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        GaussianMixture(2).predict(np.zeros((3, 2)))


class _TaskLog(SchedulerPlugin):
    """Records every task key the scheduler receives (runs inside the scheduler)."""

    name = "dkm-test-gmm-task-log"

    def __init__(self):
        self.keys = []

    def update_graph(self, scheduler, *, tasks, **kwargs):
        self.keys.extend(str(k) for k in tasks)


@pytest.mark.parametrize("tree", [False, True])
def test_tasks_per_iteration_constant(client, blobs, tree):
    # tree: force the on-worker tree reduction used for large statistics.
    limit = 0 if tree else "32MiB"
    client.register_plugin(_TaskLog())
    try:
        with dask.config.set({"dkm.backend.client-reduce-bytes": limit}):
            g = dkm("full", blobs, tol=0.0, max_iter=12)
            with pytest.warns(ConvergenceWarning):
                g.fit(da.from_array(blobs, chunks=(375, D)))  # 8 blocks: one tree level
        keys = client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.plugins[_TaskLog.name].keys
        )
    finally:
        client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.plugins.pop(_TaskLog.name, None)
        )
    assert g.n_iter_ == 12
    nb = g.history_.attrs["n_blocks"]
    assert nb == 8
    # update_graph also lists already-known dependencies, so count distinct keys.
    per_it = [len({k for k in keys if f"-it{i}-" in k}) for i in range(12)]
    assert per_it == [nb + (1 if tree else 0)] * 12
    assert per_it == g.history_["n_tasks"].values.tolist()
    assert {k.split("-")[1] for k in keys if "-it" in k} == (
        {"estep", "reduce"} if tree else {"estep"}
    )
