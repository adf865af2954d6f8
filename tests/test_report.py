"""The HTML report: figures are written, and a real headless browser renders every one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from dkm.data.store import StoreError
from dkm.report.html import report_dir, write_report
from dkm.results.store import ResultsStore, as_variables, run_name
from dkm.results.sweep import sweep_table

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def results(tmp_path):
    rng = np.random.default_rng(0)
    store = ResultsStore(tmp_path / "job.zarr")
    store.start_job({"job": {"name": "report-test"}, "tile_shape": [5, 5]})
    ks, inertia = [4, 16, 64], []
    for k in ks:
        n = 6
        hist = xr.Dataset(
            {
                "inertia": ("iteration", np.geomspace(100 / k, 50 / k, n)),
                "center_shift": ("iteration", np.geomspace(1, 1e-4, n)),
            },
            coords={"iteration": np.arange(1, n + 1)},
        )
        inertia.append(float(hist["inertia"][-1]))
        store.write_run(
            run_name("lloyd", k),
            as_variables(centroids=rng.random((k, 25), dtype=np.float32)),
            hist,
            {
                "algorithm": "lloyd",
                "k": k,
                "n_iter": n,
                "inertia": inertia[-1],
                "metrics": {"inertia": inertia[-1], "reconstruction_error": 0.1 / k},
                "seconds": 1.0,
            },
        )
    store.write_sweep(sweep_table(ks, {"inertia": inertia}))
    store.finish("complete")
    return store


@pytest.fixture
def compared(tmp_path):
    """A store of the newer runner: two algorithms in one sweep (dims algorithm, k), runs
    holding their first images rebuilt (nearest centroid and sparse coding), image errors."""
    rng = np.random.default_rng(1)
    store = ResultsStore(tmp_path / "compared.zarr")
    store.start_job({"job": {"name": "compare-test"}})
    features = {"kind": "patches", "patch_size": 4, "stride": 4, "pad": 0, "drop_empty": 0}
    runs = [("lloyd", 4), ("lloyd", 16), ("lloyd", 64), ("minibatch", 4), ("minibatch", 16)]
    metrics: dict[str, list[float]] = {
        m: [] for m in ("inertia", "image_rmse", "sparse_image_rmse")
    }
    originals = rng.random((6, 12, 12)).astype(np.float32)
    for algorithm, k in runs:
        rmse = 0.3 / np.log2(k) + (0.02 if algorithm == "minibatch" else 0)
        values = {"inertia": 100 / k, "image_rmse": rmse, "sparse_image_rmse": 0.7 * rmse}
        for m, v in values.items():
            metrics[m].append(v)
        noisy = np.clip(originals + rng.normal(0, rmse, originals.shape), 0, 1)
        dims = ("image", "y", "x")
        store.write_run(
            run_name(algorithm, k),
            {
                **as_variables(centroids=rng.random((k, 16), dtype=np.float32)),
                "originals": (dims, originals),
                "reconstructions": (dims, noisy.astype(np.float32)),
                "sparse_reconstructions": (dims, originals * 0.9),
                "image_mse": (("sample",), rng.random(20)),
            },
            # Mini-batch runs record a smoothed batch inertia, not the full one.
            xr.Dataset(
                {"inertia" if algorithm == "lloyd" else "ewa_inertia": ("iteration", [2.0, 1.0])},
                coords={"iteration": [1, 2]},
            ),
            {
                "algorithm": algorithm,
                "k": k,
                "n_iter": 2,
                "inertia": values["inertia"],
                "metrics": {**values, "image_mse": rmse**2},
                "features": {**features, "image_shape": [12, 12]},
                "tile_shape": [4, 4],
                "seconds": 1.0,
            },
        )
    algorithms = [a for a, _ in runs]
    sweep = sweep_table([k for _, k in runs], metrics, algorithms)
    # Names as variable-length strings: Zarr v3 warns about fixed-length ones ('<U9').
    store.write_sweep(sweep.assign_coords(algorithm=sweep["algorithm"].astype(object)))
    store.finish("complete")
    return store


def test_report_of_compared_algorithms_with_reconstructions(compared):
    page = write_report(compared.path)
    html = page.read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    # Inertia against k, then beside it image error against k, at the top of the sweep.
    assert images[:2] == ["sweep-inertia.png", "sweep-image-error.png"]
    assert not any(name.startswith("sweep-image_") or "sparse_image" in name for name in images)
    for run in ("lloyd-k4", "lloyd-k64", "minibatch-k16"):
        assert f"reconstructions-{run}.png" in images
        assert f"sparse-reconstructions-{run}.png" in images
        assert f"Originals and reconstructions of {run}" in html
    assert "image error against k (nearest centroid and sparse coding)" in html
    for name in images:
        assert (page.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The runs table names each run's algorithm.
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", html).group(1)
    assert re.findall(r"<th>(.*?)</th>", header)[:3] == ["run", "algorithm", "k"]
    assert "<tr><td>minibatch-k4</td><td>minibatch</td><td>4</td>" in html
    assert "Elbow of inertia against k: <b>lloyd: " in html and "minibatch: " in html


def test_image_error_figure_draws_one_line_per_algorithm_and_coding(
    compared, tmp_path, monkeypatch
):
    from dkm.report import plots

    drawn = {}
    save = plots._save

    def keep(fig, path):  # what each figure draws, read before it is saved and closed
        lines = fig.axes[0].lines
        drawn[Path(path).name] = {line.get_label(): list(line.get_xdata()) for line in lines}
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    sweep = compared.read_sweep()
    plots.image_error_against_k(sweep, tmp_path / "error.png")
    plots.metric_against_k(sweep, "inertia", tmp_path / "inertia.png")
    # minibatch did not run k=64: its lines stop at 16 rather than drawing the NaN.
    assert drawn["error.png"] == {
        "lloyd, nearest centroid": [4, 16, 64],
        "minibatch, nearest centroid": [4, 16],
        "lloyd, sparse": [4, 16, 64],
        "minibatch, sparse": [4, 16],
    }
    assert {"lloyd", "minibatch"} <= set(drawn["inertia.png"])


def test_report_writes_page_and_figures(results):
    page = write_report(results.path)
    assert page == report_dir(results.path) / "index.html"
    html = page.read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert "inertia-by-iteration.png" in images and "sweep-inertia.png" in images
    assert {"centroids-lloyd-k4.png", "centroids-lloyd-k64.png"} <= set(images)
    for name in images:
        assert (page.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lloyd-k16" in html and "report-test" in html


def test_report_lists_failed_runs_and_refuses_damaged_ones(results):
    results.write_failed_run("lloyd-k99", {"algorithm": "lloyd", "k": 99}, "k=99 > 50 samples")
    html = write_report(results.path).read_text()
    assert "Failed runs" in html and "k=99 &gt; 50 samples" in html
    (results.path / "runs/lloyd-k16/centroids/zarr.json").unlink()
    with pytest.raises(StoreError, match=r"damaged run\(s\): lloyd-k16 .*run the job again"):
        write_report(results.path)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["results", "compared"])
def test_a_headless_browser_renders_every_figure(store, request, tmp_path):
    """Both stores: one algorithm with an old sweep over k alone; two compared algorithms
    with reconstruction grids and the image-error figure."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run must install it")
        pytest.skip("chromium is not installed")
    page = write_report(request.getfixturevalue(store).path)
    html = page.read_text()
    n_images = len(re.findall(r"<img ", html))
    if store == "compared":
        assert (
            'src="sweep-image-error.png"' in html and 'src="reconstructions-lloyd-k4.png"' in html
        )
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [*cmd, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert f'data-figures="{n_images}/{n_images}"' in dom, dom[:500]
    shot = tmp_path / "report.png"
    subprocess.run(
        [*cmd, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000
