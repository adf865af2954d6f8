"""Held-out scoring in jobs: fit on one split, score the others with the fitted model and the
cluster-to-label maps of the fitted samples; every metric stored per split."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy.optimize import linear_sum_assignment
from sklearn import metrics

from dkm import load_model
from dkm.jobs import parse_job
from dkm.runner import run_job

pytestmark = pytest.mark.slow


def _job(tmp_path, algorithms, metrics_, **evaluate):
    return parse_job(
        {
            "name": "heldout",
            "data": {
                "dataset": "digits",
                "store": str(tmp_path / "digits.zarr"),
                "options": {"test_size": 0.25, "seed": 1},
            },
            "features": {"kind": "pixels", "split": "train"},
            "model": {"algorithm": algorithms, "k": 12, "max_iter": 20, "random_state": 2},
            "evaluate": {"metrics": metrics_, "on": ["train", "test"], **evaluate},
            "output": {"store": str(tmp_path / "results.zarr")},
        }
    )


def _split(tmp_path, split):
    ds = xr.open_zarr(tmp_path / "digits.zarr")
    keep = ds["split"].values == split
    X = ds["images"].values[keep].reshape(keep.sum(), -1).astype(np.float32) / np.float32(255)
    return X, ds["label"].values[keep]


def test_heldout_metrics_use_the_fitted_splits_maps(tmp_path, client):
    names = ["accuracy", "one_to_one_accuracy", "nmi", "inertia", "j_clust", "silhouette"]
    spec = _job(tmp_path, ["lloyd", "gmm"], names, silhouette_sample=300)
    outcome = run_job(spec, scheduler=client.scheduler.address)
    assert outcome.status == "complete"
    tree = xr.open_datatree(outcome.store, engine="zarr")
    X_fit, y_fit = _split(tmp_path, "train")
    X_test, y_test = _split(tmp_path, "test")
    assert X_fit.shape[0] == 1347 and X_test.shape[0] == 450

    found = tree["runs/lloyd-k12"].attrs["metrics"]
    model = load_model(outcome.store, "lloyd-k12")
    p_fit, p_test = np.asarray(model.predict(X_fit)), np.asarray(model.predict(X_test))
    table = np.zeros((10, 12), dtype=np.int64)
    np.add.at(table, (y_fit, p_fit), 1)
    majority = table.argmax(axis=0)
    rows, cols = linear_sum_assignment(table, maximize=True)
    matched = np.full(12, -1)
    matched[cols] = rows
    assert found["test_accuracy"] == pytest.approx(np.mean(majority[p_test] == y_test), abs=1e-12)
    assert found["test_one_to_one_accuracy"] == pytest.approx(
        np.mean(matched[p_test] == y_test), abs=1e-12
    )
    assert found["accuracy"] == pytest.approx(np.mean(majority[p_fit] == y_fit), abs=1e-12)
    assert found["test_nmi"] == pytest.approx(metrics.normalized_mutual_info_score(y_test, p_test))
    d2 = ((X_test[:, None, :].astype(np.float64) - model.cluster_centers_[None]) ** 2).sum(-1)
    assert found["test_inertia"] == pytest.approx(d2.min(axis=1).sum(), rel=1e-5)
    assert found["test_j_clust"] == pytest.approx(found["test_inertia"] / 450, rel=1e-12)
    # The silhouette sample size is the job's (300 of 1347 fitted rows); held-out: 300 of 450.
    assert -1 < found["silhouette"] < 1 and -1 < found["test_silhouette"] < 1

    mixture = tree["runs/gmm-k12"].attrs["metrics"]
    gmm = load_model(outcome.store, "gmm-k12")
    assert mixture["test_log_likelihood"] == pytest.approx(gmm.score(X_test), rel=1e-10)
    assert mixture["log_likelihood"] == pytest.approx(gmm.score(X_fit), rel=1e-10)
    n_params = gmm._n_parameters()
    assert mixture["test_bic"] == pytest.approx(
        -2 * 450 * gmm.score(X_test) + n_params * np.log(450), rel=1e-10
    )
    assert "inertia" not in mixture and "test_inertia" not in mixture  # a mixture has none
    assert "test_accuracy" in tree["sweep"]

    # Adding a held-out split's metrics later keeps the fits.
    again = run_job(
        _job(tmp_path, ["lloyd", "gmm"], [*names, "ari"], silhouette_sample=300),
        scheduler=client.scheduler.address,
    )
    assert {o.status for o in again.runs} == {"reused"}
    assert "test_ari" in xr.open_datatree(again.store, engine="zarr")["runs/lloyd-k12"].attrs[
        "metrics"
    ]
