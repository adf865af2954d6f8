"""Fits that lose every worker: blocks are recomputed, or the fit fails in bounded time.

Each test starts its own 2-process LocalCluster (it kills or restarts the workers) and
kills the worker processes from a fit callback after iteration 2, the way an OOM killer or
a node failure would: the nannies start new workers at new addresses. With blocks persisted
under worker restrictions (the earlier design) the scheduler kept the recomputed tasks in
``no-worker`` forever (dask/distributed#7346); ``pytest.mark.timeout`` bounds each test.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import dask
import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

from dkm._parallel.backend import FitLostError, NoWorkersError, get_backend
from dkm._parallel.blocks import as_source, load_blocks
from dkm.kmeans.estimators import KMeans, MiniBatchKMeans

pytestmark = pytest.mark.slow

K = 8
ITERS = 6


@pytest.fixture(scope="module")
def blobs():
    # Uniform data: Lloyd does not converge within ITERS iterations, so every one runs.
    return np.random.default_rng(3).random((120_000, 12), dtype=np.float32)


@pytest.fixture(scope="module")
def store(blobs, tmp_path_factory):
    path = tmp_path_factory.mktemp("loss") / "blobs.zarr"
    ds = xr.Dataset({"x": (("sample", "feature"), blobs)}).chunk({"sample": 10_000})
    with dask.config.set(scheduler="threads"):
        ds.to_zarr(path, consolidated=False)
    return str(path)


@pytest.fixture
def cluster():
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.CRITICAL,
    ) as cluster:
        yield cluster


@pytest.fixture
def client(cluster):
    with Client(cluster) as c:
        yield c


def _kill_all_workers(client) -> set[str]:
    """SIGKILL every worker process; return the addresses they had."""
    pids = client.run(os.getpid)
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    return set(pids)


def _wait_gone(client, old: set[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while set(client.scheduler_info()["workers"]) & old:
        assert time.monotonic() < deadline, "killed workers still listed"
        time.sleep(0.05)


def _killer(client, at: int, log: list):
    """A fit callback that kills every worker once, after iteration ``at``."""

    def callback(state):
        if state.iteration == at and not log:
            old = _kill_all_workers(client)
            _wait_gone(client, old)  # all gone before the fit submits its next tasks
            log.append(old)

    return callback


def _restrictions(client) -> dict:
    return client.run_on_scheduler(
        lambda dask_scheduler: {
            str(k): sorted(ts.worker_restrictions)
            for k, ts in dask_scheduler.tasks.items()
            if ts.worker_restrictions
        }
    )


# ------------------------------------------------------------------------------ placement


def _input(store: str, kind: str):
    """The store as a path (read by ZarrRows tasks) or as a dask-backed DataArray."""
    return store if kind == "path" else xr.open_zarr(store, consolidated=False)["x"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["path", "dask"])
def test_blocks_spread_over_both_workers_without_restrictions(client, store, kind):
    """Both workers hold blocks (each Lloyd step runs where its block is), no task of the
    blocks keeps a worker restriction, and after every worker is replaced the blocks are
    recomputed from the store."""
    src = as_source(_input(store, kind))
    blocks = load_blocks(src, get_backend(client), persist=True)
    assert blocks.nblocks >= 4 and not blocks.streamed
    holders = client.who_has(blocks.handles)
    per_worker = {}
    for f in blocks.handles:
        (addr,) = holders[f.key]
        per_worker[addr] = per_worker.get(addr, 0) + 1
    assert len(per_worker) == 2, per_worker
    assert max(per_worker.values()) - min(per_worker.values()) <= 1, per_worker
    assert _restrictions(client) == {}

    old = _kill_all_workers(client)
    _wait_gone(client, old)
    client.wait_for_workers(2, timeout=60)
    assert not set(client.scheduler_info()["workers"]) & old
    got = np.concatenate(client.gather(blocks.handles))
    np.testing.assert_array_equal(got, xr.open_zarr(store, consolidated=False)["x"].values)


@pytest.mark.timeout(60)
def test_spread_moves_blocks_and_drops_the_restrictions(client):
    """Blocks that all landed on one worker are moved so that each worker holds half, by
    tasks whose worker restriction is dropped once they ran; the moved blocks stay the
    same data."""
    parts = [np.full((1000, 3), i, dtype=np.float32) for i in range(8)]
    first = sorted(client.scheduler_info()["workers"])[0]
    futures = client.scatter(parts, workers=[first], hash=False)
    assert {a for f in futures for a in client.who_has([f])[f.key]} == {first}
    backend = get_backend(client)
    moved = backend.spread(futures, [1000] * 8, "data-place-0a1b2c3d4e")
    del futures
    holders = client.who_has(moved)
    per_worker = {}
    for f in moved:
        (addr,) = holders[f.key]
        per_worker[addr] = per_worker.get(addr, 0) + 1
    assert sorted(per_worker.values()) == [4, 4], per_worker
    assert sum(f.key.startswith("data-place-") for f in moved) == 4
    assert _restrictions(client) == {}
    for i, part in enumerate(backend.gather(moved)):
        np.testing.assert_array_equal(part, parts[i])


# ------------------------------------------------------------------------ losing every worker


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("kind", "persist"),
    [("path", True), ("path", False), ("dask", True)],
    ids=["persisted", "streamed", "dask-persisted"],
)
def test_fit_recomputes_blocks_after_all_workers_die(client, store, kind, persist):
    """The design's outcome: the fit finishes with the centroids of an uninterrupted fit."""
    kw = dict(init="k-means||", max_iter=ITERS, tol=0, random_state=0, persist=persist)
    ref = KMeans(K, **kw).fit(_input(store, kind))
    killed = []
    t0 = time.monotonic()
    km = KMeans(K, **kw).fit(_input(store, kind), callback=_killer(client, 2, killed))
    assert killed, "the callback never ran"
    assert not set(client.scheduler_info()["workers"]) & killed[0]  # new workers did the rest
    assert time.monotonic() - t0 < 120
    assert km.n_iter_ == ref.n_iter_ == ITERS
    np.testing.assert_array_equal(km.cluster_centers_, ref.cluster_centers_)
    assert km.inertia_ == ref.inertia_
    np.testing.assert_array_equal(km.labels_.compute(), ref.labels_.compute())
    np.testing.assert_array_equal(km.history_["inertia"], ref.history_["inertia"])


def _kill_one_worker_in(client, prefix: str, killed: list, part: str = "", wait: float = 60):
    """SIGKILL the worker running a task whose key starts with ``prefix`` and holds
    ``part``, once one runs."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not killed:
        for addr, keys in client.processing().items():
            if any(str(k).startswith(prefix) and part in str(k) for k in keys):
                os.kill(client.run(os.getpid, workers=[addr])[addr], signal.SIGKILL)
                killed.append(addr)
                return
        time.sleep(0.01)


@pytest.mark.timeout(180)
def test_minibatch_rounds_go_on_in_the_client_after_a_worker_dies(client, store):
    """A worker killed during a mini-batch round: the round is called off, the fit goes on
    in the client's loop from the last merge, its lost blocks read again from the store, to
    the same centres as a fit without rounds (merging every step, both make the same
    updates)."""
    params = {"batch_size": 2_000, "max_iter": 10, "max_no_improvement": None}
    params |= {"random_state": 0, "reassignment_ratio": 0.0}
    settings = {"dkm.minibatch.sync-rows": 0, "dkm.lloyd.round-seconds": "200ms"}
    with dask.config.set({**settings, "dkm.minibatch.rounds": "off"}):
        plain = MiniBatchKMeans(K, **params).fit(store)
    killed: list = []
    # In the third round or later: the fit goes on from a merged state, not from its start.
    killer = threading.Thread(
        target=_kill_one_worker_in, args=(client, "minibatch-round-", killed, "-r2-")
    )
    killer.start()
    try:
        with dask.config.set(settings):
            km = MiniBatchKMeans(K, **params).fit(store)
    finally:
        killer.join()
    assert killed
    assert km.history_.attrs["n_rounds"] == 2 and km.n_steps_ == plain.n_steps_ == 600
    np.testing.assert_allclose(km.cluster_centers_, plain.cluster_centers_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(km.history_["batch_inertia"], plain.history_["batch_inertia"])


@pytest.mark.timeout(120)
def test_numpy_input_fails_clearly_when_its_blocks_are_lost(client, blobs):
    """Blocks scattered from a numpy array exist only on the workers: when all of them die
    the fit cannot recompute them and says so at once (no wait)."""
    killed = []
    t0 = time.monotonic()
    with pytest.raises(FitLostError, match=r"lost with the workers.*dask array or a Zarr path"):
        KMeans(K, init="k-means||", max_iter=ITERS, tol=0, random_state=0).fit(
            blobs, callback=_killer(client, 2, killed)
        )
    assert killed and time.monotonic() - t0 < 60


@pytest.mark.timeout(120)
def test_client_restart_mid_fit_fails_clearly(client, store):
    """Client.restart releases every task of every client: the fit says so."""
    restarted = []

    def callback(state):
        if state.iteration == 2 and not restarted:
            client.restart()
            restarted.append(True)

    t0 = time.monotonic()
    with pytest.raises(FitLostError, match=r"cluster was restarted during the fit"):
        KMeans(K, max_iter=ITERS, tol=0, random_state=0, persist=True).fit(store, callback=callback)
    assert restarted and time.monotonic() - t0 < 60


# ------------------------------------------------------------------------------ no workers at all


@pytest.mark.timeout(120)
def test_no_workers_for_too_long_is_an_error_not_a_hang(cluster, client, store):
    """Workers that never come back: the fit fails after dkm.backend.no-worker-timeout."""
    cluster.scale(0)

    def gone():
        return not client.scheduler_info()["workers"]

    deadline = time.monotonic() + 30
    while not gone():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t0 = time.monotonic()
    with (
        dask.config.set({"dkm.backend.no-worker-timeout": "3s"}),
        pytest.raises(NoWorkersError, match=r"no Dask worker ran any task for 3 s"),
    ):
        KMeans(K, init="sample", max_iter=2, random_state=0, persist=False).fit(store)
    assert time.monotonic() - t0 < 30
