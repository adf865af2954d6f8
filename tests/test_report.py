"""The HTML report: figures are written, and a real headless browser renders every one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

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
def test_a_headless_browser_renders_every_figure(results, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run must install it")
        pytest.skip("chromium is not installed")
    page = write_report(results.path)
    n_images = len(re.findall(r"<img ", page.read_text()))
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
