"""Jobs end to end on real clusters: the results store, remote schedulers, the dashboard,
kill-and-resume, and the README's quickstart job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from dkm.jobs import parse_job
from dkm.kmeans import KMeans
from dkm.results.store import ResultsStore
from dkm.runner import run_job

DKM = Path(sys.executable).with_name("dkm")
REPO = Path(__file__).resolve().parents[1]


def job_dict(tmp_path: Path, **changes) -> dict:
    job = {
        "name": "digits-sweep",
        "data": {"dataset": "digits", "store": str(tmp_path / "digits.zarr")},
        "features": {"kind": "pixels"},
        "model": {
            "algorithm": "lloyd",
            "init": "k-means||",
            "k": [4, 10],
            "max_iter": 30,
            "tol": 0.0,
            "random_state": 3,
        },
        "evaluate": ["inertia", "accuracy", "nmi"],
        "output": {"store": str(tmp_path / "out.zarr"), "labels": True, "checkpoint_every": 1},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            job[section][field] = value
        else:
            job[key] = value
    return job


def write_job(tmp_path: Path, name: str = "job.yaml", **changes) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(job_dict(tmp_path, **changes)))
    return path


def centroids(store: Path) -> dict[str, np.ndarray]:
    tree = xr.open_datatree(store, engine="zarr")
    return {name: tree[f"runs/{name}"]["centroids"].values for name in tree["runs"].children}


def test_job_writes_a_complete_results_store(tmp_path, client):
    spec = parse_job(job_dict(tmp_path))
    report = tmp_path / "dask-report.html"
    store = run_job(spec, scheduler=client.scheduler.address, performance_report=report)
    tree = xr.open_datatree(store, engine="zarr")
    assert tree.attrs["status"] == "complete"
    assert tree.attrs["job"]["name"] == "digits-sweep"
    assert tree.attrs["cluster"]["n_workers"] == 2
    assert set(tree["runs"].children) == {"lloyd-k4", "lloyd-k10"}
    run = tree["runs/lloyd-k10"]
    assert run.attrs["status"] == "complete"
    assert run["centroids"].shape == (10, 64)
    assert run["labels"].shape == (1797,)
    assert 0.5 < run.attrs["metrics"]["accuracy"] <= 1.0
    assert tree["runs/lloyd-k10/history"]["inertia"].sizes["iteration"] == run.attrs["n_iter"]
    assert tree["sweep"]["k"].values.tolist() == [4, 10]
    assert tree["sweep"]["inertia"].values[1] < tree["sweep"]["inertia"].values[0]
    assert "checkpoints" not in tree or not tree["checkpoints"].children
    assert report.stat().st_size > 10_000 and "bokeh" in report.read_text().lower()

    # The same fit by hand through the estimator gives the same centroids and labels.
    images = xr.open_zarr(tmp_path / "digits.zarr")["images"].values.reshape(1797, -1)
    est = KMeans(10, init="k-means||", max_iter=30, tol=0.0, random_state=3)
    est.fit(images.astype(np.float32) / np.float32(255))
    np.testing.assert_allclose(run["centroids"].values, est.cluster_centers_, atol=1e-6)
    np.testing.assert_array_equal(run["labels"].values, est.labels_.compute())

    with pytest.raises(FileExistsError, match="pass --resume"):
        run_job(spec, scheduler=client.scheduler.address)


def test_patch_job_reuses_extracted_patches(tmp_path, client):
    spec = parse_job(
        job_dict(
            tmp_path,
            features={"kind": "patches", "size": 4, "stride": 2, "pad": 1},
            evaluate=["inertia", "reconstruction_error"],
            model__k=[8],
            output={"store": str(tmp_path / "p.zarr"), "report": True},
        )
    )
    run_job(spec, scheduler=client.scheduler.address)
    patch_store = tmp_path / "digits-patches-4x4-s2-p1.zarr"
    stamp = (patch_store / "zarr.json").stat().st_mtime_ns
    tree = xr.open_datatree(tmp_path / "p.zarr", engine="zarr")
    rmse = tree["runs/lloyd-k8"].attrs["metrics"]["reconstruction_error"]
    assert 0 < rmse < 0.5
    assert (tmp_path / "p-report" / "index.html").is_file()
    again = parse_job(
        {
            **job_dict(tmp_path),
            "features": spec.to_dict()["features"],
            "model": {**job_dict(tmp_path)["model"], "k": [8]},
            "evaluate": ["inertia"],
            "output": {"store": str(tmp_path / "p2.zarr")},
        }
    )
    run_job(again, scheduler=client.scheduler.address)
    assert (patch_store / "zarr.json").stat().st_mtime_ns == stamp


def test_bad_job_file_exits_non_zero_with_its_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {dataset: mnist-5k}\nmodel: {k: 0}\noutput: {}\n")
    proc = subprocess.run([DKM, "run", bad], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    for words in (
        "data.store: required key is missing",
        "model.k: k must be >= 1",
        "output.store: required key is missing",
    ):
        assert words in proc.stderr


def test_unreachable_scheduler_fails_fast(tmp_path, closed_port):
    job = write_job(tmp_path)
    start = time.monotonic()
    proc = subprocess.run(
        [DKM, "run", job, "--scheduler", f"tcp://127.0.0.1:{closed_port}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "no Dask scheduler answered" in proc.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "out.zarr").exists()


# --------------------------------------------------------------------------- separate processes


@pytest.mark.slow
def test_remote_scheduler_gives_the_same_store_as_the_local_default(tmp_path, cli_cluster):
    remote = write_job(tmp_path, "remote.yaml", output={"store": str(tmp_path / "remote.zarr")})
    local = write_job(tmp_path, "local.yaml", output={"store": str(tmp_path / "local.zarr")})
    for args in ([remote, "--scheduler", cli_cluster], [local]):
        proc = subprocess.run(
            [DKM, "run", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr
    a, b = centroids(tmp_path / "remote.zarr"), centroids(tmp_path / "local.zarr")
    assert a.keys() == b.keys() == {"lloyd-k4", "lloyd-k10"}
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6)
    ta = xr.open_datatree(tmp_path / "remote.zarr", engine="zarr")
    tb = xr.open_datatree(tmp_path / "local.zarr", engine="zarr")
    assert ta.attrs["cluster"]["scheduler"] == cli_cluster
    assert ta.attrs["cluster"]["scheduler"] != tb.attrs["cluster"]["scheduler"]
    xr.testing.assert_allclose(ta["sweep"].to_dataset(), tb["sweep"].to_dataset())


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_killed_client_resumes_to_the_same_centroids(tmp_path, cli_cluster):
    changes = {
        "features": {"kind": "patches", "size": 5, "stride": 5, "pad": 1},
        "data": {"dataset": "mnist-5k", "store": str(tmp_path / "mnist-5k.zarr")},
        "model__k": [16, 64, 128],
        "model__max_iter": 40,
        "model__init": "sample",
        "evaluate": ["inertia"],
        "output": {"store": str(tmp_path / "killed.zarr"), "checkpoint_every": 2},
    }
    killed = write_job(tmp_path, "killed.yaml", **changes)
    reference = write_job(
        tmp_path, "reference.yaml", **{**changes, "output": {"store": str(tmp_path / "ref.zarr")}}
    )
    store = ResultsStore(tmp_path / "killed.zarr")
    proc = subprocess.Popen(
        [DKM, "run", killed, "--scheduler", cli_cluster],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Kill mid-sweep: the first run is complete and the second has a checkpoint.
        _wait_for(
            lambda: (
                store.path.exists()
                and "lloyd-k16" in store.completed_runs()
                and store.read_checkpoint("lloyd-k64") is not None
            ),
            240,
            "a checkpoint",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert store.attrs["status"] == "running"
    first_run = store.path / "runs/lloyd-k16/zarr.json"
    stamp = first_run.stat().st_mtime_ns

    for args in ([killed, "--resume"], [reference]):
        done = subprocess.run(
            [DKM, "run", *args, "--scheduler", cli_cluster],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
    assert first_run.stat().st_mtime_ns == stamp  # the finished run was not redone
    tree = xr.open_datatree(store.path, engine="zarr")
    assert tree.attrs["status"] == "complete"
    assert tree["runs/lloyd-k64"].attrs["resumed_from_iteration"] >= 2
    got, want = centroids(store.path), centroids(tmp_path / "ref.zarr")
    assert got.keys() == want.keys() == {"lloyd-k16", "lloyd-k64", "lloyd-k128"}
    for name in got:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6)


@pytest.mark.slow
def test_dashboard_answers_while_a_job_runs(tmp_path):
    # 2.88M stride-1 patches and two large k: far more work than the few HTTP requests need.
    job = write_job(
        tmp_path,
        model__k=[128, 256],
        model__max_iter=300,
        model__init="random",
        data={"dataset": "mnist-5k", "store": str(tmp_path / "m.zarr")},
        evaluate=["inertia"],
        output={"store": str(tmp_path / "o.zarr")},
        features={"kind": "patches", "size": 5, "stride": 1, "pad": 0},
    )
    proc = subprocess.Popen(
        [DKM, "run", job],
        stderr=subprocess.PIPE,
        text=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "DKM_SCHEDULER": ""},
    )
    try:
        link = None
        for line in proc.stderr:
            if m := re.search(r"dashboard: (http://127\.0\.0\.1:\d+)/status", line):
                link = m.group(1)
                break
        assert link, "no dashboard link logged"
        with urllib.request.urlopen(f"{link}/health", timeout=10) as r:
            assert r.read() == b"ok"
        with urllib.request.urlopen(f"{link}/status", timeout=30) as r:
            assert r.status == 200 and b"bokeh" in r.read().lower()
        assert proc.poll() is None  # the job was still running when the dashboard answered
    finally:
        proc.send_signal(signal.SIGINT)  # lets the LocalCluster shut its workers down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.slow
def test_readme_quickstart_job_runs(tmp_path):
    # The README's main job, exactly as shipped, from a clean working directory.
    proc = subprocess.run(
        [DKM, "run", REPO / "jobs" / "quickstart.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tree = xr.open_datatree(tmp_path / "results/quickstart.zarr", engine="zarr")
    assert tree.attrs["status"] == "complete"
    rmse = tree["sweep"]["reconstruction_error"].values
    assert np.all(np.diff(rmse) < 0)  # bigger dictionaries reconstruct better
    assert (tmp_path / "results/quickstart-report/index.html").is_file()
    assert "lloyd-k256" in proc.stdout
