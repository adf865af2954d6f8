"""KMeans estimator API: input kinds, bad input, predict/transform/score, history_, params."""

from __future__ import annotations

import re

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from sklearn.base import clone
from sklearn.cluster import KMeans as SkKMeans
from sklearn.datasets import make_blobs

from dkm.kmeans.estimators import KMeans


@pytest.fixture(scope="module")
def data():
    X, _ = make_blobs(6_000, n_features=6, centers=5, cluster_std=0.7, random_state=0)
    X = X.astype(np.float32)
    C0 = X[[0, 1, 2, 3, 4]].astype(np.float64)
    return X, C0


def _store(tmp_path, **variables):
    path = tmp_path / "x.zarr"
    ds = xr.Dataset({k: (("sample", f"f_{k}"), v) for k, v in variables.items()})
    ds.chunk({"sample": 1_000}).to_zarr(path, consolidated=False)
    return path


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_are_counted(threaded_client, data, bad):
    X = data[0].copy()
    X[[5, 17, 4000], [0, 3, 5]] = bad
    X[17, 1] = bad  # same row twice: still 3 rows
    with pytest.raises(ValueError, match=r"NaN or infinity in 3 of 6000 rows"):
        KMeans(3).fit(X)
    with pytest.raises(ValueError, match=r"in 3 of 6000 rows"):
        KMeans(3).fit(da.from_array(X, chunks=1_000))


def test_too_many_clusters(data):
    with pytest.raises(ValueError, match=r"n_clusters=11 must be <= n_samples=10"):
        KMeans(11).fit(data[0][:10])


@pytest.mark.parametrize(
    ("shape", "msg"),
    [
        ((100,), r"2-D input .* got a 1-D array of shape \(100,\).*reshape"),
        ((10, 5, 5), r"got a 3-D array of shape \(10, 5, 5\).*extract_patches"),
    ],
)
def test_wrong_ndim(shape, msg):
    with pytest.raises(ValueError, match=msg):
        KMeans(2).fit(np.zeros(shape, dtype=np.float32))


def test_non_numeric_and_empty():
    with pytest.raises(TypeError, match="not numeric"):
        KMeans(2).fit(np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(TypeError, match="not numeric"):
        KMeans(2).fit(np.ones((4, 2), dtype=complex))
    with pytest.raises(ValueError, match="at least one sample"):
        KMeans(1).fit(np.zeros((0, 3), dtype=np.float32))


def test_integer_input_is_cast_as_values(threaded_client):
    rng = np.random.default_rng(0)
    Xi = rng.integers(0, 256, size=(3_000, 4)).astype(np.uint8)
    C0 = Xi[:4].astype(np.float64)
    a = KMeans(4, init=C0, tol=0, max_iter=10).fit(Xi)  # uniform data: cap the iterations
    b = KMeans(4, init=C0, tol=0, max_iter=10).fit(Xi.astype(np.float32))
    assert a.cluster_centers_.dtype == np.float32
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.inertia_ == b.inertia_
    assert a.cluster_centers_.max() > 100  # no scaling to [0, 1]
    c = KMeans(2, init=np.array([[0.0], [1.0]]), tol=0).fit(
        np.array([[True], [False], [True]] * 10)
    )
    np.testing.assert_array_equal(np.sort(c.cluster_centers_.ravel()), [0.0, 1.0])


@pytest.mark.parametrize("shape", [(4, 6), (5, 5), (5,)])
def test_init_array_wrong_shape(data, shape):
    with pytest.raises(ValueError, match=r"init array has shape .* expected .* \(5, 6\)"):
        KMeans(5, init=np.zeros(shape)).fit(data[0])


def test_bad_params(data):
    X = data[0]
    for params, words in [
        ({"empty_cluster": "nope"}, "empty_cluster must be one of 'farthest'"),
        ({"init": "kmeans++"}, "init must be one of 'k-means||', 'k-means++', 'random', 'sample'"),
        ({"n_clusters": 0}, "n_clusters must be an integer >= 1, got 0"),
        ({"n_clusters": True}, "n_clusters must be an integer >= 1, got True"),
        ({"dtype": np.float16}, "dtype must be 'float32' or 'float64'"),
        ({"tol": -1.0}, "tol must be a finite number >= 0, got -1.0"),
        ({"tol": float("nan")}, "tol must be a finite number >= 0, got nan"),
        ({"n_init": 0}, "n_init must be an integer >= 1 or one of 'auto', got 0"),
        ({"random_state": -1}, "random_state must be an integer in [0, 2**32 - 1]"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
    ]:
        params = {"n_clusters": 3, **params}
        with pytest.raises(ValueError, match=re.escape(f"KMeans: {words}")):
            KMeans(**params).fit(X)


# ------------------------------------------------------------------------------ API


def test_inputs_agree_and_predict_transform_score(threaded_client, tmp_path, data):
    X, C0 = data
    path = _store(tmp_path, features=X)
    sk = SkKMeans(5, init=C0, n_init=1, tol=0).fit(X)
    fits = {
        "numpy": KMeans(5, init=C0, tol=0).fit(X),
        "dask": KMeans(5, init=C0, tol=0).fit(da.from_array(X, chunks=1_500)),
        "xarray": KMeans(5, init=C0, tol=0).fit(xr.DataArray(X, dims=("sample", "feature"))),
        "zarr": KMeans(5, init=C0, tol=0).fit(path),
    }
    for name, km in fits.items():
        np.testing.assert_allclose(km.cluster_centers_, sk.cluster_centers_, atol=1e-4), name
        assert isinstance(km.labels_, da.Array)
        np.testing.assert_array_equal(km.labels_.compute(), sk.labels_)
    km = fits["zarr"]
    lazy = km.predict(da.from_array(X, chunks=700))
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), sk.predict(X))
    np.testing.assert_array_equal(km.predict(X), sk.predict(X))
    np.testing.assert_allclose(km.transform(X), sk.transform(X), rtol=1e-4, atol=1e-3)
    t = km.transform(path)
    assert isinstance(t, da.Array) and t.shape == (6_000, 5)
    assert km.score(X) == pytest.approx(sk.score(X), rel=1e-5)
    assert km.inertia_ == pytest.approx(-km.score(X), rel=1e-5)
    np.testing.assert_array_equal(KMeans(5, init=C0, tol=0).fit_predict(X), sk.labels_)
    with pytest.raises(ValueError, match="X has 3 features"):
        km.predict(X[:, :3])


def test_history_dataset(threaded_client, data):
    X, C0 = data
    km = KMeans(5, init=C0, tol=0, max_iter=300).fit(X)
    h = km.history_
    assert isinstance(h, xr.Dataset)
    assert h.sizes["iteration"] == km.n_iter_
    for var in ("inertia", "center_shift", "n_moved", "n_empty", "seconds", "n_tasks"):
        assert var in h
    assert int(h["n_moved"][0]) == len(X)
    assert int(h["n_moved"][-1]) == 0  # strict convergence
    assert (np.diff(h["inertia"].values) <= 1e-6 * h["inertia"].values[0]).all()  # monotone
    assert h.attrs["converged"] == "strict"
    assert h.attrs["empty_cluster"] == "farthest"
    # The inertia of the last assignment equals the final inertia at strict convergence.
    assert float(h["inertia"][-1]) == pytest.approx(km.inertia_, rel=1e-9)


def test_params_and_clone():
    km = KMeans(7, init="sample", tol=1e-3, random_state=3, empty_cluster="zero")
    p = km.get_params()
    assert p["n_clusters"] == 7 and p["empty_cluster"] == "zero"
    k2 = clone(km).set_params(n_clusters=9)
    assert k2.n_clusters == 9 and k2.init == "sample"
    assert not hasattr(k2, "cluster_centers_")


def test_n_init_keeps_best(threaded_client, data):
    X = data[0]
    runs = [KMeans(5, init="random", n_init=1, random_state=s, max_iter=50).fit(X) for s in (0,)]
    best = KMeans(5, init="random", n_init=4, random_state=0, max_iter=50).fit(X)
    assert best.inertia_ <= runs[0].inertia_ * (1 + 1e-9)


def test_pickle_roundtrip_on_cluster(client, data):
    import pickle

    X, C0 = data
    km = KMeans(5, init=C0, tol=0).fit(X)
    assert km.history_.attrs["backend"] == "distributed"
    back = pickle.loads(pickle.dumps(km))
    np.testing.assert_array_equal(back.labels_.compute(), km.labels_.compute())
    np.testing.assert_array_equal(back.predict(X), km.predict(X))


def test_streaming_from_zarr_matches_persisted(client, tmp_path, data):
    X, C0 = data
    path = _store(tmp_path, features=X)
    a = KMeans(5, init=C0, tol=0, persist=False).fit(path)
    b = KMeans(5, init=C0, tol=0).fit(path)
    assert a.history_.attrs["streamed"] == 1 and b.history_.attrs["streamed"] == 0
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.n_iter_ == b.n_iter_
    np.testing.assert_array_equal(a.labels_.compute(), b.labels_.compute())
    k = KMeans(5, init="k-means||", random_state=0, persist=False).fit(path)
    m = KMeans(5, init="k-means||", random_state=0).fit(path)
    np.testing.assert_allclose(k.cluster_centers_, m.cluster_centers_, atol=1e-6)
    with pytest.raises(ValueError, match="needs a Zarr path"):
        KMeans(5, persist=False).fit(X)
