"""The seeding study's settings through a real job: Lloyd with n_init: 3, init: uniform and
empty_cluster: random-vector, interrupted in its second start, resumes from its checkpoint on
a two-process cluster and ends where the uninterrupted fit ends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from dkm.data import catalog
from dkm.features import build_features
from dkm.jobs import JobSpecError, parse_job
from dkm.results import ResultsStore
from dkm.runner import plan_job, run_id, run_identity, run_job


def job_dict(tmp_path: Path, **model) -> dict:
    return {
        "name": "digits-seeding",
        "data": {"dataset": "digits", "store": str(tmp_path / "digits.zarr")},
        "features": {"kind": "pixels"},
        "model": {
            "algorithm": "lloyd",
            "k": [12],
            "init": "uniform",
            "init_range": [0.0, 1.0],
            "empty_cluster": "random-vector",
            "n_init": 3,
            "max_iter": 6,
            "tol": 0.0,
            "random_state": 1,
            **model,
        },
        "evaluate": ["inertia"],
        "output": {"store": str(tmp_path / "out.zarr"), "checkpoint_every": 1},
    }


def test_uniform_random_vector_job_resumes_from_a_checkpoint(tmp_path, client):
    spec = parse_job(job_dict(tmp_path))
    [model] = spec.model.each()
    # The uninterrupted fit, by hand on the job's input (as the runner passes it): its
    # states are what the job's checkpoints hold.
    catalog.ingest("digits", tmp_path / "digits.zarr")
    features = build_features(tmp_path / "digits.zarr", kind="pixels")
    X, runner_params = features.X, {}
    if features.store is not None:
        X, runner_params = str(features.store), {"variable": features.X.name}
    states = []
    full = model.entry.make(12, model.params, **runner_params).fit(X, callback=states.append)
    # Uniform vectors in 64-D catch no digit: clusters are reset in every iteration.
    assert full.history_["n_empty"].values.all()

    # The job's store, interrupted after iteration 3 of the second start.
    store = ResultsStore(spec.output.store)
    store.start_job({"job": spec.to_dict()})
    state = next(s for s in states if s.start == 1 and s.iteration == 3)
    store.write_checkpoint("lloyd-k12", state, run_id(run_identity(model, 12, features.identity)))
    assert [r.action for r in plan_job(spec).runs] == ["resume"]
    outcome = run_job(spec, scheduler=client.scheduler.address, resume=True)
    assert outcome.status == "complete" and not outcome.failed

    tree = xr.open_datatree(outcome.store, engine="zarr")
    run = tree["runs/lloyd-k12"]
    assert run.attrs["resumed_from_iteration"] == 3
    assert run.attrs["params"]["init_range"] == [0.0, 1.0]
    history_attrs = run.attrs["history_attrs"]
    assert history_attrs["init"] == "uniform" and history_attrs["init_range"] == [0.0, 1.0]
    assert history_attrs["empty_cluster"] == "random-vector"
    # The reset centres are among the centroids: they must be the same draws too.
    np.testing.assert_array_equal(run["centroids"].values, full.cluster_centers_)
    assert run.attrs["inertia"] == full.inertia_ and run.attrs["n_iter"] == full.n_iter_
    np.testing.assert_array_equal(
        tree["runs/lloyd-k12/history"]["n_empty"].values, full.history_["n_empty"].values
    )
    assert store.read_checkpoint("lloyd-k12") is None  # dropped once the run is saved


@pytest.mark.parametrize("value", [[1.0, 0.0], [0.0, float("inf")], [0.0], "0-1", [None, []]])
def test_a_bad_init_range_is_a_job_error(tmp_path, value):
    with pytest.raises(JobSpecError, match=r"model.init_range: must be a pair \[lo, hi\]"):
        parse_job(job_dict(tmp_path, init_range=value))
