"""Jobs end to end on real clusters: the results store, the job lifecycle (run again, edit
and run again, failed runs, k checked against the data), remote schedulers, the dashboard,
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

from dkm.jobs import JobSpecError, parse_job
from dkm.kmeans import KMeans
from dkm.results import ResultsStore, load_model
from dkm.runner import plan_job, run_job

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


def mtimes(store: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (store / "runs").glob("*/zarr.json")}


def dkm(*args, cwd=None, timeout=600, env=None):
    return subprocess.run(
        [str(DKM), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def test_job_writes_a_complete_results_store(tmp_path, client):
    spec = parse_job(job_dict(tmp_path))
    report = tmp_path / "dask-report.html"
    outcome = run_job(spec, scheduler=client.scheduler.address, performance_report=report)
    assert outcome.status == "complete" and not outcome.failed
    tree = xr.open_datatree(outcome.store, engine="zarr")
    assert tree.attrs["status"] == "complete" and tree.attrs["dkm_store"] == "results"
    assert tree.attrs["job"]["name"] == "digits-sweep"
    assert tree.attrs["cluster"]["n_workers"] == 2
    assert set(tree["runs"].children) == {"lloyd-k4", "lloyd-k10"}
    run = tree["runs/lloyd-k10"]
    assert run.attrs["status"] == "complete"
    assert run["centroids"].shape == (10, 64)
    assert run["labels"].shape == (1797,)
    assert 0.5 < run.attrs["metrics"]["accuracy"] <= 1.0
    assert run.attrs["params"]["random_state"] == 3 and run.attrs["params"]["max_iter"] == 30
    assert tree["runs/lloyd-k10/history"]["inertia"].sizes["iteration"] == run.attrs["n_iter"]
    assert tree["sweep"]["k"].values.tolist() == [4, 10]
    inertia = tree["sweep"]["inertia"].sel(algorithm="lloyd").values
    assert inertia[1] < inertia[0]
    # The data has labels and the job asks for label metrics: the confusion matrices too.
    assert run["contingency"].shape == (10, 10)
    assert run["confusion"].values.sum() == 1797 == run["contingency"].values.sum()
    assert "checkpoints" not in tree or not tree["checkpoints"].children
    assert report.stat().st_size > 10_000 and "bokeh" in report.read_text().lower()

    # The same fit by hand through the estimator gives the same centroids and labels.
    images = xr.open_zarr(tmp_path / "digits.zarr")["images"].values.reshape(1797, -1)
    X = images.astype(np.float32) / np.float32(255)
    est = KMeans(10, init="k-means||", max_iter=30, tol=0.0, random_state=3).fit(X)
    np.testing.assert_allclose(run["centroids"].values, est.cluster_centers_, atol=1e-6)
    np.testing.assert_array_equal(run["labels"].values, est.labels_.compute())
    # ... and the stored model predicts like it.
    model = load_model(outcome.store, "lloyd-k10")
    np.testing.assert_array_equal(model.predict(X), est.predict(X))
    assert model.score(X) == pytest.approx(est.score(X), rel=1e-6)


def test_running_a_finished_job_again_reuses_every_run(tmp_path, client):
    spec = parse_job(job_dict(tmp_path))
    run_job(spec, scheduler=client.scheduler.address)
    before = mtimes(tmp_path / "out.zarr")
    assert [r.action for r in plan_job(spec).runs] == ["reuse", "reuse"]
    again = run_job(spec, scheduler=client.scheduler.address)
    assert again.status == "complete"
    assert [r.status for r in again.runs] == ["reused", "reused"]
    assert mtimes(tmp_path / "out.zarr") == before


def test_editing_a_job_keeps_what_did_not_change(tmp_path, client):
    address = client.scheduler.address
    first = parse_job(
        job_dict(tmp_path, evaluate=["inertia"], output={"store": str(tmp_path / "o.zarr")})
    )
    run_job(first, scheduler=address)
    before = mtimes(tmp_path / "o.zarr")
    # Add a k, a metric and labels: k=4 and k=10 are kept, with the new metric and labels.
    edited = parse_job(
        job_dict(
            tmp_path,
            model__k=[4, 10, 16],
            evaluate=["inertia", "homogeneity"],
            output={"store": str(tmp_path / "o.zarr"), "labels": True},
        )
    )
    assert [r.action for r in plan_job(edited).runs] == ["reuse", "reuse", "compute"]
    outcome = run_job(edited, scheduler=address)
    assert [r.status for r in outcome.runs] == ["reused", "reused", "computed"]
    tree = xr.open_datatree(tmp_path / "o.zarr", engine="zarr")
    for name in ("lloyd-k4", "lloyd-k10", "lloyd-k16"):
        run = tree[f"runs/{name}"]
        assert 0 < run.attrs["metrics"]["homogeneity"] <= 1 and run["labels"].shape == (1797,)
        assert run["contingency"].values.sum() == 1797  # added to the kept runs too
    # The added labels are those of the stored model.
    ref = load_model(tmp_path / "o.zarr", "lloyd-k10").predict(
        xr.open_zarr(tmp_path / "digits.zarr")["images"].values.reshape(1797, -1) / np.float32(255)
    )
    np.testing.assert_array_equal(tree["runs/lloyd-k10"]["labels"].values, ref)
    assert tree["sweep"]["k"].values.tolist() == [4, 10, 16]
    # A changed parameter is a different run: it is computed again.
    changed = parse_job(
        job_dict(tmp_path, model__max_iter=5, output={"store": str(tmp_path / "o.zarr")})
    )
    plan = plan_job(changed)
    assert [r.action for r in plan.runs] == ["recompute", "recompute"]
    assert mtimes(tmp_path / "o.zarr")["lloyd-k4"] != before["lloyd-k4"]  # labels were added


def _blank_heavy_npz(tmp_path: Path) -> Path:
    # 20 images of which 15 are blank: with drop_empty only 5 patches exist, which the
    # validation cannot know before cutting (it sees at most 20).
    images = np.zeros((20, 6, 6), np.uint8)
    rng = np.random.default_rng(0)
    images[:5] = rng.integers(1, 255, (5, 6, 6))
    path = tmp_path / "few.npz"
    np.savez(path, images=images, labels=np.arange(20) % 2)
    return path


def test_a_failed_run_is_recorded_and_fixing_it_keeps_the_others(tmp_path, client):
    npz = _blank_heavy_npz(tmp_path)
    changes = {
        "data": {"dataset": "npz", "store": str(tmp_path / "few.zarr"), "source": str(npz)},
        "features": {"kind": "patches", "size": 6, "drop_empty": True},
        "model__init": "sample",
        "evaluate": ["inertia", "reconstruction_error"],
        "output": {"store": str(tmp_path / "few-out.zarr")},
    }
    bad = write_job(tmp_path, "bad.yaml", **changes, model__k=[2, 8])
    proc = dkm("run", bad, "--scheduler", client.scheduler.address)
    assert proc.returncode == 1, proc.stderr
    assert (
        "dkm: error: 1 of 2 runs failed (lloyd-k8: n_clusters=8 must be <= n_samples=5)"
        in proc.stderr
    )
    assert "fix the job and run it again: the finished runs are kept" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(r"lloyd-k8\s+8\s+failed", proc.stdout) and "status failed" in proc.stdout
    store = ResultsStore(tmp_path / "few-out.zarr")
    assert store.status() == "failed"
    assert {r.name: r.status for r in store.runs()} == {
        "lloyd-k2": "complete",
        "lloyd-k8": "failed",
    }
    kept = mtimes(store.path)["lloyd-k2"]

    fixed = write_job(tmp_path, "fixed.yaml", **changes, model__k=[2, 4])
    proc = dkm("run", fixed, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"lloyd-k2\s+reuse", proc.stdout) and re.search(
        r"lloyd-k4\s+compute", proc.stdout
    )
    proc = dkm("run", fixed, "--scheduler", client.scheduler.address)
    assert proc.returncode == 0, proc.stderr
    assert mtimes(store.path)["lloyd-k2"] == kept
    assert store.status() == "complete"
    assert xr.open_datatree(store.path, engine="zarr")["sweep"]["k"].values.tolist() == [2, 4]


def test_k_above_the_data_is_refused_before_anything_runs(tmp_path):
    # The catalog knows mnist-5k has 5000 samples: nothing is ingested to find out.
    for k in ([10, 6000], {"start": 2, "stop": 16384}):
        job = write_job(
            tmp_path, data={"dataset": "mnist-5k", "store": str(tmp_path / "m.zarr")}, model__k=k
        )
        for args in (["--dry-run"], []):
            proc = dkm("run", job, *args)
            assert proc.returncode == 1
            assert (
                "model.k: 6000 > 5000 samples in" in proc.stderr or "> 5000 samples" in proc.stderr
            )
            assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m.zarr").exists() and not (tmp_path / "out.zarr").exists()
    # Patches: k against samples x patches per image; a patch larger than the image.
    spec = parse_job(
        job_dict(tmp_path, features={"kind": "patches", "size": 9}, evaluate=["inertia"])
    )
    with pytest.raises(
        JobSpecError, match=r"features.size: patch size 9 is larger than the padded image 8x8"
    ):
        plan_job(spec)
    spec = parse_job(
        job_dict(
            tmp_path, features={"kind": "patches", "size": 8}, model__k=[1798], evaluate=["inertia"]
        )
    )
    with pytest.raises(JobSpecError, match=r"model.k: 1798 > 1797 patches in"):
        plan_job(spec)


def test_resume_without_a_store_says_so_at_once(tmp_path):
    job = write_job(tmp_path)
    start = time.monotonic()
    proc = dkm("run", job, "--resume")
    assert proc.returncode == 1
    assert "output.store: nothing to resume:" in proc.stderr and "without --resume" in proc.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "digits.zarr").exists()  # nothing was ingested first


def test_a_damaged_data_store_names_the_job_key(tmp_path):
    (tmp_path / "digits.zarr").mkdir()
    (tmp_path / "digits.zarr" / "zarr.json").write_text("{not json")
    proc = dkm("run", write_job(tmp_path))
    assert proc.returncode == 1
    assert "data.store:" in proc.stderr and "digits.zarr" in proc.stderr
    assert "set data.store to another path" in proc.stderr and "overwrite" not in proc.stderr


def test_output_store_that_is_a_dataset_store(tmp_path, client):
    spec = parse_job(job_dict(tmp_path))
    run_job(spec, scheduler=client.scheduler.address)
    onto = parse_job(job_dict(tmp_path, output={"store": str(tmp_path / "digits.zarr")}))
    with pytest.raises(JobSpecError, match=r"output.store: .*dataset store, not a results store"):
        run_job(onto, scheduler=client.scheduler.address)


def test_bad_job_file_exits_non_zero_with_its_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {dataset: mnist-5k}\nmodel: {k: 0}\noutput: {}\n")
    proc = dkm("run", bad, timeout=60)
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
    # A short dkm.scheduler.timeout: the 10 s default (and its message) is test_cli's.
    fast = {**os.environ, "DASK_DKM__SCHEDULER__TIMEOUT": "2s"}
    proc = dkm("run", job, "--scheduler", f"tcp://127.0.0.1:{closed_port}", timeout=120, env=fast)
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
        proc = dkm("run", *args, cwd=tmp_path, timeout=300)
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


def _mnist_patch_job(tmp_path: Path, **changes) -> dict:
    return {
        "features": {"kind": "patches", "size": 5, "stride": 5, "pad": 1},
        "data": {"dataset": "mnist-5k", "store": str(tmp_path / "mnist-5k.zarr")},
        "model__k": [16, 64],
        "model__max_iter": 12,
        "model__init": "sample",
        "model__n_init": 3,
        "evaluate": ["inertia"],
        **changes,
    }


@pytest.mark.slow
def test_killed_client_resumes_to_the_same_centroids(tmp_path, cli_cluster):
    # n_init: 3, killed in the middle of the second start of the second run.
    changes = _mnist_patch_job(
        tmp_path, output={"store": str(tmp_path / "killed.zarr"), "checkpoint_every": 2}
    )
    killed = write_job(tmp_path, "killed.yaml", **changes)
    reference = write_job(
        tmp_path, "reference.yaml", **{**changes, "output": {"store": str(tmp_path / "ref.zarr")}}
    )
    store = ResultsStore(tmp_path / "killed.zarr")

    def second_start_checkpointed() -> bool:
        if not store.path.exists() or "lloyd-k16" not in store.completed_runs():
            return False
        state = store.read_checkpoint("lloyd-k64")
        return state is not None and state.start >= 1 and state.iteration >= 2

    proc = subprocess.Popen(
        [DKM, "run", killed, "--scheduler", cli_cluster],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(second_start_checkpointed, 300, "a checkpoint of the second start")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert store.attrs["status"] == "running"
    assert store.status().startswith("interrupted")  # the process is gone
    stamp = mtimes(store.path)["lloyd-k16"]

    for args in ([killed, "--resume"], [reference]):
        done = dkm("run", *args, "--scheduler", cli_cluster)
        assert done.returncode == 0, done.stderr
    assert mtimes(store.path)["lloyd-k16"] == stamp  # the finished run was not redone
    tree = xr.open_datatree(store.path, engine="zarr")
    assert tree.attrs["status"] == "complete"
    assert tree["runs/lloyd-k64"].attrs["resumed_from_iteration"] >= 2
    got, want = centroids(store.path), centroids(tmp_path / "ref.zarr")
    assert got.keys() == want.keys() == {"lloyd-k16", "lloyd-k64"}
    for name in got:
        np.testing.assert_array_equal(got[name], want[name])
    ref_tree = xr.open_datatree(tmp_path / "ref.zarr", engine="zarr")
    for name in got:
        assert tree[f"runs/{name}"].attrs["inertia"] == ref_tree[f"runs/{name}"].attrs["inertia"]


def _group_alive(pgid: int) -> list[str]:
    """Processes left in a process group (zombies excluded)."""
    ps = subprocess.run(["ps", "-o", "stat=,cmd=", "-g", str(pgid)], capture_output=True, text=True)
    return [line for line in ps.stdout.splitlines() if line.strip() and not line.startswith("Z")]


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_job_resumes(tmp_path):
    # One k and few iterations: the rerun after Ctrl-C is the whole rest of the job.
    changes = _mnist_patch_job(
        tmp_path,
        output={"store": str(tmp_path / "int.zarr"), "checkpoint_every": 1},
        model__k=[16],
        model__max_iter=8,
    )
    job = write_job(tmp_path, "int.yaml", **changes)
    store = ResultsStore(tmp_path / "int.zarr")
    proc = subprocess.Popen(
        [DKM, "run", job],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives a job
        env={**os.environ, "DKM_SCHEDULER": ""},
    )
    try:
        _wait_for(
            lambda: store.path.exists() and store.read_checkpoint("lloyd-k16") is not None,
            300,
            "a checkpoint",
        )
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "AllExit" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("dkm: ")]
    assert len(lines) == 1 and "interrupted" in lines[0] and "int.yaml" in lines[0], err
    assert store.status() == "interrupted"
    assert store.read_checkpoint("lloyd-k16") is not None
    _wait_for(lambda: not _group_alive(proc.pid), 15, "the worker processes to exit")
    done = dkm("run", job, env={**os.environ, "DKM_SCHEDULER": ""})
    assert done.returncode == 0, done.stderr
    assert ResultsStore(store.path).status() == "complete"


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
        start_new_session=True,
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
        os.killpg(proc.pid, signal.SIGINT)  # lets the LocalCluster shut its workers down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_readme_quickstart_job_runs_twice(tmp_path):
    # The README's main job, exactly as shipped, from a clean working directory; the second
    # time it reuses everything and still exits 0 with the summary table.
    proc = dkm("run", REPO / "jobs" / "quickstart.yaml", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tree = xr.open_datatree(tmp_path / "results/quickstart.zarr", engine="zarr")
    assert tree.attrs["status"] == "complete"
    rmse = tree["sweep"]["reconstruction_error"].values
    assert np.all(np.diff(rmse) < 0)  # bigger dictionaries reconstruct better
    assert (tmp_path / "results/quickstart-report/index.html").is_file()
    assert "lloyd-k256" in proc.stdout
    before = mtimes(tmp_path / "results/quickstart.zarr")
    again = dkm("run", REPO / "jobs" / "quickstart.yaml", cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "lloyd-k256" in again.stdout and "already complete, kept" in again.stderr
    assert mtimes(tmp_path / "results/quickstart.zarr") == before
