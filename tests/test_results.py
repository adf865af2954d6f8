"""The results store: runs (complete, failed, damaged), two-slot checkpoints of fit states,
the sweep group, the job's status, plain-xarray readability."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
import zarr

from dkm._parallel.base import FitState
from dkm.data.store import StoreError, write_atomic
from dkm.results import ResultsStore, run_name, sweep_table
from dkm.results.store import as_variables

JOB = {"job": {"name": "t", "model": {"k": [2, 3]}}}


def history(n: int) -> xr.Dataset:
    return xr.Dataset(
        {"inertia": ("iteration", np.linspace(10, 1, n)), "n_moved": ("iteration", np.arange(n))},
        coords={"iteration": np.arange(1, n + 1)},
    )


@pytest.fixture
def store(tmp_path):
    s = ResultsStore(tmp_path / "r.zarr")
    s.start_job(JOB)
    return s


def write(store, k, **attrs):
    c = np.arange(k * 3, dtype=np.float32).reshape(k, 3)
    store.write_run(
        run_name("lloyd", k),
        as_variables(centroids=c, x_mean=np.zeros(3, np.float32)),
        history(4),
        {"algorithm": "lloyd", "k": k, "inertia": np.float32(1.5), **attrs},
    )
    return c


def test_runs_round_trip_and_open_with_plain_xarray(store):
    c = write(store, 2, metrics={"nmi": np.float64(0.5)}, run_id="abc")
    store.add_to_run("lloyd-k2", variables={"labels": (("sample",), np.array([0, 1, 1, 0]))})
    assert store.completed_runs() == {"lloyd-k2"}
    info = store.run_info("lloyd-k2")
    assert info.k == 2 and info.algorithm == "lloyd" and info.run_id == "abc"
    assert info.attrs["variables"] == ["centroids", "labels", "x_mean"]
    run = store.read_run("lloyd-k2")
    np.testing.assert_array_equal(run["centroids"].values, c)
    assert run.attrs["metrics"] == {"nmi": 0.5} and run.attrs["status"] == "complete"
    store.write_sweep(sweep_table([2, 3, 4], {"inertia": [9.0, 4.0, 3.5]}))
    store.finish("complete", {"seconds": 1.0})
    tree = xr.open_datatree(store.path, engine="zarr")
    assert tree.attrs["status"] == "complete" and tree.attrs["dkm_store"] == "results"
    np.testing.assert_array_equal(tree["runs/lloyd-k2"]["labels"].values, [0, 1, 1, 0])
    np.testing.assert_allclose(
        tree["runs/lloyd-k2/history"]["inertia"].values, np.linspace(10, 1, 4)
    )
    assert store.read_sweep()["k"].values.tolist() == [2, 3, 4]


def test_runs_are_listed_by_k_with_their_status(store):
    for k in (16, 2, 4):
        write(store, k)
    store.write_failed_run("lloyd-k8", {"algorithm": "lloyd", "k": 8}, "n_clusters=8 > 5")
    runs = store.runs()
    assert [r.name for r in runs] == ["lloyd-k2", "lloyd-k4", "lloyd-k8", "lloyd-k16"]
    assert [r.status for r in runs] == ["complete", "complete", "failed", "complete"]
    assert runs[2].attrs["error"] == "n_clusters=8 > 5"
    with pytest.raises(StoreError, match="run 'lloyd-k8' is failed: n_clusters=8 > 5"):
        store.read_run("lloyd-k8")
    # A failed run written again as complete replaces the failure.
    write(store, 8)
    assert store.run_info("lloyd-k8").status == "complete"


def test_a_run_without_its_complete_stamp_is_not_complete(store):
    write(store, 3)
    meta = store.path / "runs/lloyd-k3/zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["status"] = "writing"  # as if killed before the last step
    meta.write_text(json.dumps(doc))
    assert store.completed_runs() == set()
    with pytest.raises(StoreError, match="run 'lloyd-k3' is writing"):
        store.read_run("lloyd-k3")


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("runs/lloyd-k2/centroids/zarr.json", "centroids/zarr.json: missing"),
        ("runs/lloyd-k2/history/zarr.json", "history/zarr.json: missing"),
        ("runs/lloyd-k2/zarr.json", "lloyd-k2/zarr.json: missing"),
    ],
)
def test_a_run_missing_an_array_is_damaged(store, damage, words):
    write(store, 2)
    write(store, 3)
    (store.path / damage).unlink()
    info = {r.name: r for r in store.runs()}
    assert info["lloyd-k2"].status == "damaged" and words in info["lloyd-k2"].problem
    assert info["lloyd-k3"].status == "complete"
    with pytest.raises(StoreError, match="damaged"):
        store.read_run("lloyd-k2")


def test_damaged_run_metadata_is_reported_with_its_path(store):
    write(store, 2)
    (store.path / "runs/lloyd-k2/zarr.json").write_text('{"attributes": ')
    (info,) = store.runs()
    assert info.status == "damaged" and "lloyd-k2/zarr.json: damaged metadata" in info.problem


def test_a_new_run_of_the_job_keeps_the_runs(store):
    write(store, 2)
    store.finish("failed", {"error": "boom"})
    ResultsStore(store.path).start_job({"job": {"name": "t2"}})
    attrs = store.attrs
    assert attrs["status"] == "running" and attrs["job"] == {"name": "t2"}
    assert "error" not in attrs and attrs["dkm_store"] == "results"
    assert attrs["owner"]["pid"] == os.getpid()
    assert store.completed_runs() == {"lloyd-k2"}


def test_a_running_store_whose_process_is_gone_reads_interrupted(tmp_path):
    path = tmp_path / "gone.zarr"
    code = f"from dkm.results import ResultsStore; ResultsStore({str(path)!r}).start_job({{}})"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert ResultsStore(path).attrs["status"] == "running"
    assert ResultsStore(path).status().startswith("interrupted (process ")


def test_other_things_at_the_path_are_refused(tmp_path):
    ds = xr.Dataset({"images": (("sample", "y", "x"), np.zeros((2, 3, 3), np.uint8))})
    ds["split"] = ("sample", np.array(["train", "train"], dtype=object))
    write_atomic(ds, tmp_path / "d.zarr", kind="dataset")
    (tmp_path / "file.zarr").write_text("x")
    (tmp_path / "empty.zarr").mkdir()
    for name, words in [("d.zarr", "dataset store"), ("file.zarr", "regular file")]:
        with pytest.raises(StoreError, match=f"{words}.*not a results store"):
            ResultsStore(tmp_path / name).start_job(JOB)
    ResultsStore(tmp_path / "empty.zarr").start_job(JOB)  # an empty directory is fine
    assert ResultsStore(tmp_path / "empty.zarr").attrs["status"] == "running"


def state(start: int, it: int, best: FitState | None = None) -> FitState:
    return FitState(
        start,
        it,
        {"centers": np.full((2, 3), it, np.float64), "previous_centers": np.ones((2, 3))},
        history(it),
        {"seed": 3, "stopped": None, "init": {"passes": 2, "phi": [1.5, 0.5]}},
        best,
    )


def test_checkpoints_alternate_slots_and_keep_the_newest(store):
    name = "lloyd-k2"
    assert store.read_checkpoint(name) is None
    best = state(0, 7)
    best.info = {"inertia": 2.5, "n_iter": 7}
    for it in (5, 10, 15):
        store.write_checkpoint(name, state(1, it, best), run_id="abc")
    latest = store.read_checkpoint(name, "abc")
    assert (latest.start, latest.iteration) == (1, 15)
    assert latest.info == {"seed": 3, "stopped": None, "init": {"passes": 2, "phi": [1.5, 0.5]}}
    np.testing.assert_array_equal(latest.params["centers"], np.full((2, 3), 15))
    assert latest.history.sizes["iteration"] == 15
    assert latest.best.iteration == 7 and latest.best.info == {"inertia": 2.5, "n_iter": 7}
    np.testing.assert_array_equal(latest.best.params["centers"], np.full((2, 3), 7))
    assert store.read_checkpoint(name, "another-run") is None
    # A slot interrupted mid-write is ignored: the other slot still has iteration 10.
    slots = {i: store.path / f"checkpoints/{name}/slot-{i}/zarr.json" for i in (0, 1)}
    docs = {i: json.loads(p.read_text()) for i, p in slots.items()}
    newest = max(docs, key=lambda i: docs[i]["attributes"]["iteration"])
    docs[newest]["attributes"]["status"] = "writing"
    slots[newest].write_text(json.dumps(docs[newest]))
    assert store.read_checkpoint(name).iteration == 10
    store.drop_checkpoints(name)
    assert store.read_checkpoint(name) is None


def test_checkpoints_of_dkm_0_1_still_read(store):
    # The layout dkm 0.1 wrote: centroids, the history, attrs iteration and state.
    group = "checkpoints/lloyd-k2/slot-0"
    xr.Dataset(
        {"centroids": (("cluster", "feature"), np.ones((2, 3)))},
        attrs={"iteration": 4, "state": {"seed": 9}, "status": "writing"},
    ).to_zarr(store.path, group=group, mode="w", consolidated=False)
    history(4).to_zarr(store.path, group=f"{group}/history", mode="w", consolidated=False)
    zarr.open_group(str(store.path / group), mode="r+").attrs.update({"status": "complete"})
    old = store.read_checkpoint("lloyd-k2")
    assert (old.start, old.iteration, old.info) == (0, 4, {"seed": 9})
    np.testing.assert_array_equal(old.params["centers"], np.ones((2, 3)))
