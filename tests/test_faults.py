"""Faults on real scheduler and worker processes: the scheduler killed mid-job gives one clear
line and a resumable store; after a restart, the job continues to the same centroids."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from dkm.results import ResultsStore

DKM = Path(sys.executable).with_name("dkm")
pytestmark = pytest.mark.slow


def write_job(tmp_path: Path, name: str, store: str) -> Path:
    job = {
        "name": name,
        "data": {"dataset": "mnist-5k", "store": str(tmp_path / "mnist-5k.zarr")},
        "features": {"kind": "patches", "size": 5, "stride": 5, "pad": 1},
        "model": {"k": [16, 64], "init": "sample", "max_iter": 40, "tol": 0.0},
        "output": {"store": str(tmp_path / store), "checkpoint_every": 2},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def centroids(store: Path) -> dict[str, np.ndarray]:
    tree = xr.open_datatree(store, engine="zarr")
    return {n: tree[f"runs/{n}"]["centroids"].values for n in tree["runs"].children}


def test_scheduler_killed_mid_job_then_resumed(tmp_path, start_cli_cluster):
    cluster = start_cli_cluster()
    job = write_job(tmp_path, "lost", "lost.zarr")
    store = ResultsStore(tmp_path / "lost.zarr")
    proc = subprocess.Popen(
        [DKM, "run", job, "--scheduler", cluster.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: store.path.exists()
            and "lloyd-k16" in store.completed_runs()
            and store.read_checkpoint("lloyd-k64") is not None,
            300,
            "a checkpoint of the second run",
        )
        cluster.scheduler.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - killed_at < 60
    assert proc.returncode == 1, err
    assert "Traceback" not in err and " ERROR " not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("dkm: ")]
    assert line.startswith("dkm: error: lost the Dask scheduler at " + cluster.address)
    assert "finished runs and checkpoints are kept in" in line and "lost.yaml` again" in line
    assert store.status() == "interrupted"
    cluster.stop()

    restarted = start_cli_cluster()
    kept = (store.path / "runs/lloyd-k16/zarr.json").stat().st_mtime_ns
    reference = write_job(tmp_path, "reference", "reference.zarr")
    for args in ([job, "--resume"], [reference]):
        done = subprocess.run(
            [DKM, "run", *args, "--scheduler", restarted.address],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
    assert (store.path / "runs/lloyd-k16/zarr.json").stat().st_mtime_ns == kept
    assert store.status() == "complete"
    got, want = centroids(store.path), centroids(tmp_path / "reference.zarr")
    assert got.keys() == want.keys() == {"lloyd-k16", "lloyd-k64"}
    for name in got:
        np.testing.assert_array_equal(got[name], want[name])
