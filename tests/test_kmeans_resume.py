"""Checkpoint hooks of KMeans: a fit resumed from any reported state ends where an
uninterrupted fit ends, for one start or several, also after the state went through the
results store."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from dkm.kmeans import KMeans
from dkm.results.store import ResultsStore


@pytest.fixture(scope="module")
def blobs():
    x, _ = make_blobs(6000, n_features=6, centers=40, cluster_std=3.0, random_state=1)
    return x.astype(np.float32)


def fit(init="random", **kw):
    return KMeans(12, init=init, max_iter=40, tol=0.0, random_state=7, **kw)


def through_store(state, tmp_path):
    store = ResultsStore(tmp_path / "r.zarr")
    if not store.path.exists():
        store.start_job({"job": {}})
    store.write_checkpoint("lloyd-k12", state)
    return store.read_checkpoint("lloyd-k12")


def assert_same_fit(resumed, full):
    np.testing.assert_array_equal(resumed.cluster_centers_, full.cluster_centers_)
    assert resumed.inertia_ == full.inertia_
    assert resumed.n_iter_ == full.n_iter_
    np.testing.assert_array_equal(resumed.labels_.compute(), full.labels_.compute())
    for key in ("inertia", "n_moved", "center_shift"):
        np.testing.assert_array_equal(resumed.history_[key].values, full.history_[key].values)


@pytest.mark.parametrize(("stop_at", "init"), [(1, "random"), (3, "k-means||"), (8, "sample")])
def test_resume_from_a_reported_state(blobs, stop_at, init, tmp_path):
    states = []
    full = fit(init).fit(blobs, callback=states.append)
    assert [s.iteration for s in states] == list(range(full.n_iter_ + 1))
    assert full.n_iter_ > stop_at + 1
    state = through_store(states[stop_at], tmp_path)
    assert state.iteration == stop_at
    resumed = fit(init).fit(blobs, resume_from=state)
    assert_same_fit(resumed, full)
    assert resumed.init_info_["resumed_from_iteration"] == stop_at


def test_resume_after_the_last_iteration(blobs, tmp_path):
    # Killed after the final iteration was reported, before the model was saved.
    states = []
    full = fit("sample").fit(blobs, callback=states.append)
    assert states[-1].info["stopped"] in ("strict", "tol", "max_iter")
    assert_same_fit(fit("sample").fit(blobs, resume_from=through_store(states[-1], tmp_path)), full)


@pytest.mark.parametrize("init", ["sample", "k-means||"])
def test_resume_with_several_starts(blobs, init, tmp_path):
    states = []
    full = fit(init, n_init=3).fit(blobs, callback=states.append)
    assert {s.start for s in states} == {0, 1, 2}
    # Mid-way through the second start, and at the very beginning of the third.
    second = [s for s in states if s.start == 1]
    third = [s for s in states if s.start == 2]
    for state in (second[len(second) // 2], third[0]):
        assert state.best is not None
        resumed = fit(init, n_init=3).fit(blobs, resume_from=through_store(state, tmp_path))
        assert_same_fit(resumed, full)


def test_a_state_of_another_fit_is_refused(blobs):
    states = []
    fit().fit(blobs, callback=states.append)
    with pytest.raises(ValueError, match="n_init=1"):
        fit().fit(blobs, resume_from=type(states[0])(5, 0, states[0].params, states[0].history))
    with pytest.raises(ValueError, match=r"centers has shape \(12, 6\), expected \(11, 6\)"):
        KMeans(11, init="random", random_state=7).fit(blobs, resume_from=states[3])
