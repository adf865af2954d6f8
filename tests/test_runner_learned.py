"""Learned features in jobs: a PCA or autoencoder feature store is built once, reused by every
run and by the next run of the job, and any model clusters it."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from sklearn.decomposition import PCA

from dkm.jobs import parse_job
from dkm.runner import plan_job, run_job

pytestmark = pytest.mark.slow


def _job(tmp_path, features, algorithm="lloyd"):
    return parse_job(
        {
            "name": "learned",
            "data": {"dataset": "digits", "store": str(tmp_path / "digits.zarr")},
            "features": features,
            "model": {"algorithm": algorithm, "k": [4, 10], "max_iter": 10},
            "evaluate": ["accuracy"],
            "output": {"store": str(tmp_path / "results.zarr")},
        }
    )


def test_pca_features_feed_kmeans_and_a_mixture_and_are_reused(tmp_path, client):
    spec = _job(tmp_path, {"kind": "pca", "n_components": 8}, ["lloyd", "gmm"])
    outcome = run_job(spec, scheduler=client.scheduler.address)
    assert outcome.status == "complete"
    store = tmp_path / "digits-pca8.zarr"
    tree = xr.open_datatree(outcome.store, engine="zarr")
    run = tree["runs/gmm-k10"]
    assert run.attrs["features"]["kind"] == "pca" and run["means"].shape == (10, 8)
    assert run.attrs["features"]["store"] == str(store)
    # The features are scikit-learn's PCA of the pixels (up to each component's sign).
    pixels = xr.open_zarr(tmp_path / "digits.zarr")["images"].values.reshape(1797, -1) / 255.0
    ours = xr.open_zarr(store)["features"].values
    theirs = PCA(8).fit_transform(pixels)
    np.testing.assert_allclose(np.abs(ours), np.abs(theirs), atol=1e-4)

    written = xr.open_zarr(store).attrs["dkm_write_id"]
    assert {r.action for r in plan_job(spec).runs} == {"reuse"}
    again = run_job(spec, scheduler=client.scheduler.address)
    assert {r.status for r in again.runs} == {"reused"}
    assert xr.open_zarr(store).attrs["dkm_write_id"] == written


def test_autoencoder_features_in_a_job(tmp_path, threaded_client):
    features = {
        "kind": "autoencoder",
        "n_components": 4,
        "filters": [4, 8],
        "epochs": 1,
        "train_samples": 300,
    }
    outcome = run_job(_job(tmp_path, features), scheduler=threaded_client.scheduler.address)
    assert outcome.status == "complete"
    run = xr.open_datatree(outcome.store, engine="zarr")["runs/lloyd-k10"]
    assert run["centroids"].shape == (10, 4)
    assert run.attrs["features"]["kind"] == "autoencoder"
    assert 0 < run.attrs["metrics"]["accuracy"] <= 1
