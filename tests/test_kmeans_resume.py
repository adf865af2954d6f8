"""Checkpoint hooks of KMeans: a fit resumed from any reported state ends where an
uninterrupted fit ends, also after the state went through the results store."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from dkm.kmeans import KMeans
from dkm.results.store import Checkpoint, ResultsStore


@pytest.fixture(scope="module")
def blobs():
    x, _ = make_blobs(6000, n_features=6, centers=40, cluster_std=3.0, random_state=1)
    return x.astype(np.float32)


def fit(x, init="random", **kw):
    return KMeans(12, init=init, max_iter=40, tol=0.0, random_state=7, **kw)


@pytest.mark.parametrize(("stop_at", "init"), [(1, "random"), (3, "k-means||"), (8, "sample")])
def test_resume_from_a_reported_state(blobs, stop_at, init, tmp_path):
    states = []
    full = fit(blobs, init).fit(blobs, callback=states.append)
    assert [s["iteration"] for s in states] == list(range(1, full.n_iter_ + 1))
    assert full.n_iter_ > stop_at + 1

    # Through the results store, as a job's checkpoint travels.
    store = ResultsStore(tmp_path / "r.zarr")
    store.create({"job": {}})
    s = states[stop_at - 1]
    store.write_checkpoint(
        "lloyd-k12", Checkpoint(s["iteration"], s["centers"], s["history"], s["state"])
    )
    ck = store.read_checkpoint("lloyd-k12")
    resumed = fit(blobs, init).fit(
        blobs,
        resume_from={
            "iteration": ck.iteration,
            "centers": ck.centroids,
            "history": ck.history,
            "state": ck.state,
        },
    )
    np.testing.assert_array_equal(resumed.cluster_centers_, full.cluster_centers_)
    assert resumed.inertia_ == pytest.approx(full.inertia_, rel=1e-12)
    np.testing.assert_array_equal(resumed.labels_.compute(), full.labels_.compute())
    np.testing.assert_allclose(
        resumed.history_["inertia"].values[:stop_at], full.history_["inertia"].values[:stop_at]
    )
    assert resumed.init_info_["resumed_from_iteration"] == stop_at


def test_callback_needs_a_single_init(blobs):
    with pytest.raises(ValueError, match="n_init=1"):
        fit(blobs, n_init=3).fit(blobs, callback=lambda state: None)
