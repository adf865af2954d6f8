"""Streaming a Zarr store larger than the whole cluster on workers with a 300 MB limit.

The store (~0.67 GB float32) is generated chunk by chunk with dask into Zarr, never held in
this process. The fit streams it automatically (it does not fit), with blocks sized from the
workers' memory limit: it must finish without any worker being restarted, with every
worker's peak RSS below its limit, and with the centroids of the same fit on a roomy
(in-process) backend. When a block cannot fit at all, the fit fails before it starts.
"""

from __future__ import annotations

import logging

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from distributed import Client, KilledWorker, LocalCluster

from dkm._parallel.backend import describe_worker_loss, get_backend
from dkm._parallel.blocks import WorkerMemoryError
from dkm.kmeans.estimators import KMeans, MiniBatchKMeans

pytestmark = pytest.mark.slow

LIMIT = 300_000_000  # "300MB", per worker
N, D, K = 2_621_440, 64, 16  # 671 MB of float32: 1.1x the two workers' limits together
CHUNK_ROWS = 16_384  # 4 MiB Zarr chunks
SEED = 7


def _peak_rss(client) -> dict[str, int]:
    """Each worker's peak RSS (VmHWM), by ``Client.run``.

    The function is made here so that it is pickled by value: a worker that had to import
    this test module (xarray, dask.array, scikit-learn...) to unpickle it would grow by
    ~200 MB and be restarted by its nanny on a 300 MB limit.
    """

    def vm_hwm() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

    return client.run(vm_hwm)


def _centers() -> np.ndarray:
    return np.random.default_rng(SEED).uniform(-3, 3, (K, D)).astype(np.float32)


def _blob_rows(block_info=None) -> np.ndarray:
    """Gaussian blobs around ``_centers()``: a chunk is a function of its first row only."""
    (r0, r1), _ = block_info[None]["array-location"]
    rng = np.random.default_rng([SEED, r0])
    labels = rng.integers(0, K, r1 - r0)
    noise = rng.standard_normal((r1 - r0, D), dtype=np.float32)
    return _centers()[labels] + noise


def write_blobs(path, n: int = N, chunk_rows: int = CHUNK_ROWS) -> str:
    """Write ``n`` x ``D`` float32 blobs to a Zarr store chunk by chunk (local threads)."""
    chunks = (tuple(min(chunk_rows, n - a) for a in range(0, n, chunk_rows)), (D,))
    x = da.map_blocks(_blob_rows, dtype=np.float32, chunks=chunks)
    with dask.config.set(scheduler="threads"):
        xr.Dataset({"x": (("sample", "feature"), x)}).to_zarr(path, consolidated=False)
    return str(path)


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    return write_blobs(tmp_path_factory.mktemp("stream") / "blobs.zarr")


@pytest.fixture(scope="module")
def small_cluster():
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        memory_limit="300MB",
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster:
        yield cluster


def _inertia_numpy(path: str, centers: np.ndarray) -> float:
    """sum ||x - nearest centre||^2 over the store, read chunk-wise, in float64 numpy."""
    arr = xr.open_zarr(path, consolidated=False)["x"].data
    c = centers.astype(np.float64)
    total = 0.0
    for a in range(0, arr.shape[0], 250_000):
        x = np.asarray(arr[a : a + 250_000]).astype(np.float64)
        d2 = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)
        total += float(np.maximum(d2.min(1), 0).sum())
    return total


@pytest.mark.timeout(300)
def test_stream_larger_than_cluster_memory_on_300mb_workers(small_cluster, big_store):
    with Client(small_cluster) as client:
        before = set(client.scheduler_info()["workers"])
        assert len(before) == 2
        km = KMeans(K, max_iter=3, tol=0, random_state=0).fit(big_store)
        after = set(client.scheduler_info()["workers"])
        peaks = _peak_rss(client)
        restarts = client.get_events("worker-restart-memory")
    attrs = km.history_.attrs
    assert attrs["streamed"] == 1  # chosen automatically: the data does not fit
    # Blocks of ~20 MiB (25.6 MB at most on average), not 64 MiB.
    assert attrs["n_blocks"] >= N * D * 4 / 25_600_000
    assert after == before and not restarts  # no worker was restarted
    assert all(peak < LIMIT for peak in peaks.values()), peaks
    assert len(peaks) == 2

    # The same fit with room to spare: in-process threads, 64 MiB blocks, still streamed.
    with dask.config.set(scheduler="threads"):
        ref = KMeans(K, max_iter=3, tol=0, random_state=0, persist=False).fit(big_store)
    assert ref.history_.attrs["n_blocks"] < attrs["n_blocks"]
    assert km.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(km.inertia_, ref.inertia_, rtol=1e-7)
    # ...and the inertia of the fitted centres, recomputed from the store with numpy.
    np.testing.assert_allclose(
        km.inertia_, _inertia_numpy(big_store, km.cluster_centers_), rtol=1e-5
    )
    # The centres found are the blobs' centres.
    found = np.sort(km.cluster_centers_, axis=0)
    np.testing.assert_allclose(found, np.sort(_centers(), axis=0), atol=0.05)


@pytest.mark.timeout(120)
def test_a_block_that_cannot_fit_is_refused_before_the_fit(small_cluster, tmp_path):
    """Reading any row of a Zarr chunk decodes the whole chunk: a 128 MiB chunk (decoded
    plus compressed) does not fit in what a 300 MB worker has left, and the fit says so
    before any task runs. 32 MiB chunks still stream, in blocks of a quarter chunk (so no
    chunk is decoded more than 4 times a pass), with no worker restarted."""
    fat = write_blobs(tmp_path / "fat.zarr", n=524_288, chunk_rows=524_288)
    ok = write_blobs(tmp_path / "ok.zarr", n=524_288, chunk_rows=131_072)
    with Client(small_cluster) as client:
        before = set(client.scheduler_info()["workers"])
        with pytest.raises(WorkerMemoryError, match="memory") as info:
            KMeans(K, max_iter=3, persist=False).fit(fat)
        km = KMeans(K, max_iter=2, persist=False).fit(ok)
        assert set(client.scheduler_info()["workers"]) == before
        assert not client.get_events("worker-restart-memory")
        peaks = _peak_rss(client)
    text = str(info.value)
    assert isinstance(info.value, MemoryError)
    assert "memory limit of 300 MB" in text
    assert "cluster.memory_limit" in text and "memory_limit=" in text
    assert "dkm.blocks.target-bytes" in text
    assert "one Zarr chunk of 524288 rows (128.0 MiB)" in text
    assert km.history_.attrs["n_blocks"] == 16  # 32768-row blocks: a quarter of a chunk
    assert all(peak < LIMIT for peak in peaks.values()), peaks


def test_a_refusal_counts_the_state_of_the_fits_algorithm(small_cluster, tmp_path):
    """The per-row state a KMeans fit reserves is its algorithm's: plain Lloyd keeps the
    labels of two passes and the distances of one (12 bytes per float32 row of 2 features),
    Yinyang's group bounds 52 at k = 512 -- counted before any task runs (the store has no
    chunk written)."""
    x = da.zeros((30_000_000, 2), dtype=np.float32, chunks=(65_536, 2))
    path = tmp_path / "long.zarr"
    xr.Dataset({"x": (("sample", "feature"), x)}).to_zarr(path, compute=False)
    init = np.zeros((512, 2), np.float32)
    with Client(small_cluster):
        for algorithm, per_row in (("lloyd", 12), ("yinyang", 52)):
            with pytest.raises(WorkerMemoryError, match=rf"\({per_row} bytes per row"):
                KMeans(512, init=init, algorithm=algorithm, persist=False).fit(str(path))
        # Mini-batch steps keep nothing per row: its final labels pass, or k-means||.
        for start, per_row in ((init, 12), ("k-means||", 16)):
            with pytest.raises(WorkerMemoryError, match=rf"\({per_row} bytes per row"):
                MiniBatchKMeans(512, init=start, persist=False).fit(str(path))


@pytest.mark.timeout(180)
def test_killed_worker_is_told_as_memory(tmp_path):
    """A task that needs more than the memory limit kills its worker every time it is tried:
    the KilledWorker a fit's gather raises carries a note about memory, and
    describe_worker_loss says which task, how often the workers died, and the limit."""
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 1}),
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            memory_limit="300MB",
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
        ) as cluster,
        Client(cluster) as client,
    ):

        def hog(nbytes: int) -> int:
            # Touch memory slowly enough for the nanny's monitor (every 100 ms) to see it.
            import time

            parts = []
            for _ in range(nbytes // 50_000_000):
                parts.append(np.ones(50_000_000, dtype=np.uint8))
                time.sleep(0.05)
            return len(parts)

        backend = get_backend(client)
        hog = client.submit(hog, 600_000_000, key="lloyd-assign-0a1b2c3d4e-r0-it3-7")
        with pytest.raises(KilledWorker) as info:
            backend.gather([hog])
        text = describe_worker_loss(info.value, client)
    assert "'lloyd-assign-0a1b2c3d4e-r0-it3-7' (lloyd-assign)" in text
    assert "died 2 times in a row" in text
    assert "300 MB" in text
    assert "restarted workers" in text and "for exceeding 95%" in text
    assert "cluster.memory_limit" in text and "dkm.blocks.target-bytes" in text
    notes = getattr(info.value, "__notes__", [])
    assert any("lloyd-assign" in note and "memory limit" in note for note in notes), notes
