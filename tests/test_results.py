"""The results store: runs, two-slot checkpoints, the sweep group, plain-xarray readability."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from dkm.results.store import Checkpoint, ResultsStore, run_name
from dkm.results.sweep import sweep_table

JOB = {"job": {"name": "t", "model": {"k": [2, 3]}}}


def history(n: int) -> xr.Dataset:
    return xr.Dataset(
        {"inertia": ("iteration", np.linspace(10, 1, n)), "n_moved": ("iteration", np.arange(n))},
        coords={"iteration": np.arange(n)},
    )


@pytest.fixture
def store(tmp_path):
    s = ResultsStore(tmp_path / "r.zarr")
    s.create(JOB)
    return s


def test_create_refuses_an_existing_store(store):
    with pytest.raises(FileExistsError, match="already exists; pass --resume"):
        ResultsStore(store.path).create(JOB)


def test_resume_needs_the_same_job(store, tmp_path):
    ResultsStore(store.path).create(JOB, resume=True)
    with pytest.raises(ValueError, match="different job"):
        ResultsStore(store.path).create({"job": {"name": "other"}}, resume=True)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        ResultsStore(tmp_path / "none.zarr").create(JOB, resume=True)


def test_runs_round_trip_and_open_with_plain_xarray(store):
    c = np.arange(6, dtype=np.float32).reshape(2, 3)
    store.write_run(
        run_name("lloyd", 2),
        c,
        history(4),
        {"k": 2, "inertia": np.float32(1.5), "metrics": {"nmi": np.float64(0.5)}},
        labels=np.array([0, 1, 1, 0], dtype=np.int32),
    )
    assert store.completed_runs() == {"lloyd-k2"}
    run = store.read_run("lloyd-k2")
    np.testing.assert_array_equal(run["centroids"].values, c)
    assert run.attrs["metrics"] == {"nmi": 0.5} and run.attrs["status"] == "complete"
    store.write_sweep(sweep_table([2, 3, 4], {"inertia": [9.0, 4.0, 3.5]}))
    store.finish({"seconds": 1.0})
    tree = xr.open_datatree(store.path, engine="zarr")
    assert tree.attrs["status"] == "complete"
    np.testing.assert_array_equal(tree["runs/lloyd-k2"]["labels"].values, [0, 1, 1, 0])
    np.testing.assert_allclose(
        tree["runs/lloyd-k2/history"]["inertia"].values, np.linspace(10, 1, 4)
    )
    assert tree["sweep"]["k"].values.tolist() == [2, 3, 4]


def test_a_run_without_its_complete_stamp_is_not_complete(store):
    store.write_run("lloyd-k3", np.zeros((3, 2)), history(2), {"k": 3})
    meta = store.path / "runs/lloyd-k3/zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["status"] = "writing"  # as if killed before the last step
    meta.write_text(json.dumps(doc))
    assert store.completed_runs() == set()
    with pytest.raises(KeyError, match="no complete run"):
        store.read_run("lloyd-k3")


def test_checkpoints_alternate_slots_and_keep_the_newest(store):
    name = "lloyd-k2"
    assert store.read_checkpoint(name) is None
    for it in (5, 10, 15):
        store.write_checkpoint(
            name,
            Checkpoint(
                it,
                np.full((2, 3), it, np.float32),
                history(it),
                {"seed": 3},
                {"counts": np.arange(2)},
            ),
        )
    latest = store.read_checkpoint(name)
    assert latest.iteration == 15 and latest.state == {"seed": 3}
    np.testing.assert_array_equal(latest.centroids, np.full((2, 3), 15))
    np.testing.assert_array_equal(latest.arrays["counts"], [0, 1])
    assert latest.history.sizes["iteration"] == 15
    # A slot interrupted mid-write is ignored: the other slot still has iteration 10.
    slots = {
        i: json.loads((store.path / f"checkpoints/{name}/slot-{i}/zarr.json").read_text())
        for i in (0, 1)
    }
    newest = max(slots, key=lambda i: slots[i]["attributes"]["iteration"])
    slots[newest]["attributes"]["status"] = "writing"
    (store.path / f"checkpoints/{name}/slot-{newest}/zarr.json").write_text(
        json.dumps(slots[newest])
    )
    assert store.read_checkpoint(name).iteration == 10
    store.drop_checkpoints(name)
    assert store.read_checkpoint(name) is None
