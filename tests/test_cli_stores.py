"""``dkm info``, ``dkm show`` and ``dkm report`` on every kind of store and on damaged ones:
the right description, or one clear error line naming the path; never a traceback, never
advice to delete something complete."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner

from dkm.cli import main
from dkm.data.store import write_atomic
from dkm.features import PatchLayout, cut_patches
from dkm.results import ResultsStore, load_model, run_name, sweep_table
from dkm.results.store import as_variables


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8), dtype=np.uint8)
    ds = xr.Dataset(
        {
            "images": (("sample", "y", "x"), images),
            "label": ("sample", np.arange(6) % 2),
            "split": ("sample", np.array(["train"] * 6, dtype=object)),
        },
        attrs={"dataset": "npz"},
    )
    write_atomic(ds, root / "data.zarr", kind="dataset")
    import dask

    with dask.config.set(scheduler="sync"):
        cut_patches(
            ds["images"], PatchLayout(4), root / "patches.zarr", source_store=root / "data.zarr"
        )
    results = ResultsStore(root / "results.zarr")
    results.start_job({"job": {"name": "kinds"}, "tile_shape": [4, 4]})
    for k in (2, 3):
        hist = xr.Dataset(
            {"inertia": ("iteration", [3.0, 2.0]), "center_shift": ("iteration", [1.0, 0.1])}
        )
        results.write_run(
            run_name("lloyd", k),
            as_variables(centroids=np.ones((k, 16), np.float32)),
            hist,
            {"algorithm": "lloyd", "k": k, "n_iter": 2, "inertia": 2.0 / k, "metrics": {}},
        )
    results.write_failed_run("lloyd-k30", {"algorithm": "lloyd", "k": 30}, "30 > 24 patches")
    results.write_sweep(sweep_table([2, 3], {"inertia": [1.0, 0.6]}))
    results.finish("failed")
    return root


def test_info_describes_each_kind(stores):
    data = run("info", stores / "data.zarr")
    assert data.exit_code == 0 and "images" in data.stdout and "dkm_store:" in data.stdout
    patches = run("info", stores / "patches.zarr")
    assert patches.exit_code == 0 and "patches" in patches.stdout
    results = run("info", stores / "results.zarr")
    assert results.exit_code == 0, results.stderr
    assert "job 'kinds', status failed" in results.stdout
    assert "incomplete" not in results.output and "delete" not in results.output


def test_show_lists_complete_and_failed_runs(stores):
    shown = run("show", stores / "results.zarr")
    assert shown.exit_code == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any(line.split()[:3] == ["lloyd-k2", "2", "complete"] for line in lines)
    assert any(line.split()[:3] == ["lloyd-k30", "30", "failed"] for line in lines)
    assert "lloyd-k30 failed: 30 > 24 patches" in shown.stdout


@pytest.mark.parametrize("kind", ["data", "patches"])
def test_show_and_report_refuse_other_kinds(stores, kind):
    path = stores / f"{kind}.zarr"
    for verb in ("show", "report"):
        result = run(verb, path)
        assert result.exit_code == 1
        assert f"dkm: error: {path}: a " in result.stderr and "not a results store" in result.stderr
        assert f"`dkm info {path}` describes it" in result.stderr
        assert "job None" not in result.output


def test_not_a_store(tmp_path):
    (tmp_path / "file.zarr").write_text("x")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("x")
    for verb in ("info", "show", "report"):
        for path, words in [
            (tmp_path / "nothing.zarr", "no such store"),
            (tmp_path / "file.zarr", "regular file"),
            (tmp_path / "plain", "not a Zarr v3 store"),
        ]:
            result = run(verb, path)
            assert result.exit_code == 1, (verb, path, result.output)
            assert result.stderr.startswith(f"dkm: error: {path}") and words in result.stderr


@pytest.fixture
def copy_of(stores, tmp_path):
    def copy(name):
        shutil.copytree(stores / name, tmp_path / name)
        return tmp_path / name

    return copy


@pytest.mark.parametrize("verb", ["info", "show", "report"])
def test_damaged_root_metadata(copy_of, verb):
    for name in ("results.zarr", "data.zarr"):
        path = copy_of(name)
        (path / "zarr.json").write_text('{"zarr_format": 3, "node_')
        result = run(verb, path)
        assert result.exit_code == 1
        assert f"damaged metadata in {path}/zarr.json" in result.stderr
        assert "Traceback" not in result.output
        shutil.rmtree(path)


def test_missing_array_of_a_run(copy_of):
    path = copy_of("results.zarr")
    (path / "runs/lloyd-k3/centroids/zarr.json").unlink()
    shown = run("show", path)
    assert shown.exit_code == 1
    assert "lloyd-k3 damaged:" in shown.stdout and "centroids/zarr.json: missing" in shown.stdout
    assert "1 damaged run(s): lloyd-k3 (" in shown.stderr
    assert "centroids/zarr.json: missing); run the job again to compute them anew" in shown.stderr
    report = run("report", path)
    assert report.exit_code == 1
    assert f"dkm: error: {path}: damaged run(s): lloyd-k3" in report.stderr


def test_missing_array_of_a_dataset(copy_of):
    path = copy_of("data.zarr")
    (path / "images" / "zarr.json").unlink()
    result = run("info", path)
    assert result.exit_code == 1
    assert "variable 'images' has no metadata" in result.stderr and str(path) in result.stderr


def test_a_results_store_written_before_the_layout_move_still_reads(tmp_path):
    # What dkm 0.1 wrote: no dkm_store mark, no run ids, no x_mean, no variables list.
    path = tmp_path / "old.zarr"
    root = zarr.open_group(str(path), mode="w-", zarr_format=3)
    root.attrs.update({"job": {"name": "old"}, "status": "complete", "tile_shape": [4, 4]})
    rng = np.random.default_rng(1)
    for k in (2, 4):
        attrs = {
            "algorithm": "lloyd",
            "k": k,
            "inertia": 1.0 / k,
            "n_iter": 3,
            "status": "complete",
        }
        attrs["metrics"] = {"inertia": 1.0 / k}
        xr.Dataset(
            {"centroids": (("cluster", "feature"), rng.random((k, 16), dtype=np.float32))},
            attrs=attrs,
        ).to_zarr(path, group=f"runs/lloyd-k{k}", mode="w", consolidated=False)
        xr.Dataset({"inertia": ("iteration", [2.0, 1.5, 1.0 / k])}).to_zarr(
            path, group=f"runs/lloyd-k{k}/history", mode="w", consolidated=False
        )
    shown = run("show", path)
    assert shown.exit_code == 0, shown.output
    assert "job 'old', status complete" in shown.stdout and "lloyd-k4" in shown.stdout
    assert run("info", path).exit_code == 0
    assert run("report", path).exit_code == 0
    model = load_model(path, "lloyd-k4")
    x = rng.random((10, 16), dtype=np.float32)
    want = ((x[:, None] - model.cluster_centers_[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(model.predict(x), want)
