"""Gaussian mixtures as a job algorithm: fitted on the cluster like k-means, stored with
their parameters and scores, loaded back as an estimator that predicts the same."""

from __future__ import annotations

import numpy as np
import pytest

from dkm.data.store import open_dataset
from dkm.jobs import parse_job
from dkm.mixture import GaussianMixture
from dkm.results import ResultsStore, load_model
from dkm.runner import run_job


@pytest.mark.slow
def test_gmm_job_stores_a_model_that_predicts_like_the_fitted_one(tmp_path, client):
    job = {
        "name": "digits-gmm",
        "data": {"dataset": "digits", "store": str(tmp_path / "digits.zarr")},
        "features": {"kind": "pixels"},
        "model": {
            "algorithm": ["lloyd", "gmm"],
            "k": [10],
            "max_iter": 15,
            "covariance_type": "diag",
            "random_state": 1,
        },
        "evaluate": ["inertia", "accuracy", "nmi"],
        "output": {"store": str(tmp_path / "out.zarr"), "labels": True},
    }
    outcome = run_job(parse_job(job))
    assert outcome.status == "complete", outcome.failed
    results = ResultsStore(tmp_path / "out.zarr")
    run = results.read_run("gmm-k10")
    assert run["covariances"].dims == ("component", "feature")
    metrics = run.attrs["metrics"]

    X = open_dataset(tmp_path / "digits.zarr")["images"].values.reshape(1797, -1) / 255.0
    direct = GaussianMixture(10, covariance_type="diag", max_iter=15, random_state=1)
    with pytest.warns(Warning):  # 15 iterations do not converge: scikit-learn warns
        direct.fit(X.astype(np.float32))
    np.testing.assert_allclose(run["means"].values, direct.means_, rtol=1e-4, atol=1e-3)
    assert metrics["lower_bound"] == pytest.approx(direct.lower_bound_, rel=1e-6)
    assert metrics["bic"] == pytest.approx(direct.bic(X), rel=1e-5)
    assert metrics["aic"] == pytest.approx(direct.aic(X), rel=1e-5)
    assert 0.3 < metrics["accuracy"] <= 1 and "inertia" not in run.attrs

    model = load_model(tmp_path / "out.zarr", "gmm-k10")
    np.testing.assert_array_equal(model.predict(X), run["labels"].values)
    np.testing.assert_allclose(model.score_samples(X), direct.score_samples(X), rtol=1e-5)
    sweep = results.read_sweep()
    assert list(sweep["algorithm"].values) == ["lloyd", "gmm"]
    assert np.isfinite(sweep["bic"].sel(algorithm="gmm", k=10))
