"""Patch-dictionary jobs end to end on a real cluster: image errors over whole images,
stored reconstructions, sparse coding beside hard assignment, several algorithms in one
sweep, and what running the job again keeps and adds."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.decomposition import sparse_encode

from dkm.data.store import open_dataset
from dkm.jobs import parse_job
from dkm.results import ResultsStore, load_model
from dkm.runner import run_job


def patch_job(tmp_path: Path, **changes) -> dict:
    job = {
        "name": "digits-dictionary",
        "data": {"dataset": "digits", "store": str(tmp_path / "digits.zarr")},
        "features": {"kind": "patches", "size": 4, "stride": 4, "pad": 0, "drop_empty": True},
        "model": {"algorithm": ["lloyd", "minibatch"], "k": [6, 12], "max_iter": 10},
        "evaluate": [
            "inertia",
            "reconstruction_error",
            {"sparse_coding": {"method": "omp", "n_nonzero_coefs": 2}},
        ],
        "output": {"store": str(tmp_path / "out.zarr"), "reconstructions": 3, "codes": True},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            job[section][field] = value
        else:
            job[key] = value
    return job


def windows(images: np.ndarray, size: int) -> np.ndarray:
    """Non-overlapping size x size windows of (n, h, w) images as (n, cells, size*size)."""
    n, h, w = images.shape
    cells = images.reshape(n, h // size, size, w // size, size).swapaxes(2, 3)
    return cells.reshape(n, -1, size * size)


def unwindow(patches: np.ndarray, shape: tuple[int, int, int], size: int) -> np.ndarray:
    n, h, w = shape
    cells = patches.reshape(n, h // size, w // size, size, size).swapaxes(2, 3)
    return cells.reshape(n, h, w)


def rebuild(images: np.ndarray, atoms: np.ndarray, size: int, sparse: bool) -> np.ndarray:
    """The numpy reference: every non-empty patch by its nearest centroid (or its OMP code
    over the unit-norm atoms), all-zero patches by zeros, windows put back."""
    x = windows(images.astype(np.float64) / 255, size)
    flat = x.reshape(-1, x.shape[-1])
    if sparse:
        unit = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
        with warnings.catch_warnings():  # OMP warns on patches one atom already matches
            warnings.simplefilter("ignore", RuntimeWarning)
            codes = sparse_encode(flat, unit, algorithm="omp", n_nonzero_coefs=2)
        out = codes @ unit
    else:
        d2 = ((flat[:, None, :] - atoms[None]) ** 2).sum(-1)
        out = atoms[d2.argmin(1)]
    out[~flat.any(axis=1)] = 0
    return unwindow(out, images.shape, size)


@pytest.mark.slow
def test_dictionary_sweep_records_image_errors_hard_and_sparse(tmp_path, client):
    spec = parse_job(patch_job(tmp_path))
    outcome = run_job(spec)
    assert outcome.status == "complete", outcome.failed
    results = ResultsStore(tmp_path / "out.zarr")
    images = open_dataset(tmp_path / "digits.zarr")["images"].values
    truth = images.astype(np.float64) / 255

    run = results.read_run("lloyd-k12")
    atoms = run["centroids"].values.astype(np.float64)
    for sparse, prefix in ((False, ""), (True, "sparse_")):
        expected = ((rebuild(images, atoms, 4, sparse) - truth) ** 2).mean(axis=(1, 2))
        np.testing.assert_allclose(run[f"{prefix}image_mse"].values, expected, rtol=1e-4, atol=1e-6)
        metrics = run.attrs["metrics"]
        assert metrics[f"{prefix}image_mse"] == pytest.approx(expected.mean(), rel=1e-4)
        assert metrics[f"{prefix}image_rmse"] == pytest.approx(np.sqrt(expected.mean()), rel=1e-4)
    shown = rebuild(images[:3], atoms, 4, sparse=False)
    np.testing.assert_allclose(run["reconstructions"].values, shown, atol=1e-5)
    np.testing.assert_allclose(run["originals"].values, truth[:3], atol=1e-6)
    assert run["codes_index"].dims == ("patch", "nonzero")

    # Dropped (all-zero) patches count, with zero error, in the per-patch error.
    n_all = images.shape[0] * 4
    dim = run.sizes["feature"]
    expected_error = np.sqrt(run.attrs["inertia"] / (n_all * dim))
    assert metrics["reconstruction_error"] == pytest.approx(expected_error, rel=1e-6)

    sweep = results.read_sweep()
    assert list(sweep["algorithm"].values) == ["lloyd", "minibatch"]
    assert list(sweep["k"].values) == [6, 12]
    for name in ("image_rmse", "sparse_image_rmse", "inertia"):
        assert not np.isnan(sweep[name].values).any(), name
    # Sparse coding with two atoms rebuilds better than one centroid per patch.
    assert (sweep["sparse_image_rmse"] < sweep["image_rmse"]).all()
    model = load_model(tmp_path / "out.zarr", "minibatch-k6")
    assert model.cluster_centers_.shape == (6, 16)


@pytest.mark.slow
def test_running_again_adds_only_what_the_job_now_asks(tmp_path, client):
    run_job(parse_job(patch_job(tmp_path, model__algorithm="lloyd", model__k=[6])))
    results = ResultsStore(tmp_path / "out.zarr")
    before = results.read_run("lloyd-k6")

    job = patch_job(
        tmp_path,
        model__algorithm="lloyd",
        model__k=[6],
        output__reconstructions=5,
        evaluate=["inertia", {"sparse_coding": {"method": "lasso_lars", "alpha": 0.01}}],
    )
    outcome = run_job(parse_job(job))
    assert [o.status for o in outcome.runs] == ["reused"]
    after = results.read_run("lloyd-k6")
    np.testing.assert_array_equal(after["centroids"].values, before["centroids"].values)
    assert after.sizes["image"] == 5
    assert after.attrs["sparse_coding"]["method"] == "lasso_lars"
    assert after.attrs["metrics"]["sparse_image_mse"] != before.attrs["metrics"]["sparse_image_mse"]
    assert after.attrs["metrics"]["image_mse"] == before.attrs["metrics"]["image_mse"]
