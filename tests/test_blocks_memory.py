"""Memory of the blocks: the persist rule keeps workers below Dask's pause threshold, and
centering does not copy the blocks.

The persist test runs a real 2-process cluster with small workers and a dkm store in 32 MiB
Zarr chunks sized from the rule itself: just under the rule's limit the store is persisted
and every worker's peak RSS (VmHWM, reset before the fit) stays below Dask's spill and pause
thresholds; just over it, the store is streamed. A streamed store keeps what fits of it in
worker memory and fits as if it were all persisted.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import replace
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from conftest import worker_processes
from distributed import Client

from dkm._parallel import blocks as B
from dkm._parallel import kernels
from dkm._parallel.backend import (
    WorkerMemory,
    get_backend,
    memory_pause_fraction,
    memory_spill_fraction,
)
from dkm.data.store import write_atomic
from dkm.kmeans.estimators import KMeans

LIMIT = 400_000_000
D, K, SEED = 32, 8, 3
CHUNK_ROWS = 262_144  # 32 MiB chunks: reading one holds it decoded and compressed


def _blob_rows(block_info=None) -> np.ndarray:
    (r0, r1), _ = block_info[None]["array-location"]
    rng = np.random.default_rng([SEED, r0])
    centers = np.random.default_rng(SEED).uniform(-4, 4, (K, D)).astype(np.float32)
    return centers[rng.integers(0, K, r1 - r0)] + rng.standard_normal((r1 - r0, D), np.float32)


def _write(path, n: int) -> str:
    """A dkm feature store of ``n`` rows, written chunk by chunk in this process."""
    chunks = (tuple(min(CHUNK_ROWS, n - a) for a in range(0, n, CHUNK_ROWS)), (D,))
    x = da.map_blocks(_blob_rows, dtype=np.float32, chunks=chunks)
    ds = xr.Dataset({"x": (("sample", "feature"), x)})
    with dask.config.set(scheduler="threads"):
        write_atomic(ds, path, kind="features", encoding={"x": {"chunks": (CHUNK_ROWS, D)}})
    return str(path)


def _rule(path: str, backend) -> int:
    """The rule's limit for the store: the most bytes the workers can hold persisted."""
    source = B.as_source(path)
    workers = backend.worker_memory()
    limit, _ = B.block_limit(source, workers, True)
    splits = B._splits(source, backend, limit, False)
    largest = max(b - a for a, b in splits) * D * 4
    return B.persist_limit(source, workers, largest)[0]


def _reset_peaks(client) -> None:
    def reset() -> None:  # made here so that it is pickled by value (see _peaks)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    client.run(reset)


def _peaks(client) -> dict[str, int]:
    """Each worker's peak RSS since the last reset, by a function pickled by value: a worker
    importing this module (xarray, dask.array) would grow by ~150 MB."""

    def vm_hwm() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

    return client.run(vm_hwm)


@pytest.mark.timeout(120)
def test_persisted_near_the_limit_stays_below_pause_and_more_is_streamed(tmp_path):
    with (
        # The workers' plan bounds the data, not the share of their free memory.
        dask.config.set({"dkm.blocks.persist-fraction": 1.0}),
        worker_processes(2, LIMIT) as cluster,
        Client(cluster) as client,
    ):
        backend = get_backend(client)
        # The limit depends on the block size, which depends on the rows: probe, then size.
        probe = _rule(_write(tmp_path / "probe.zarr", CHUNK_ROWS), backend)
        near = _write(tmp_path / "near.zarr", int(0.95 * probe) // (4 * D))
        most = _rule(near, backend)
        assert 0.9 * most < B._nbytes(B.as_source(near)) <= most
        _reset_peaks(client)
        # Plain Lloyd: the rule counts its kernels' memory (kernels.ROW_WORK_BYTES).
        km = KMeans(K, max_iter=4, tol=0, random_state=0, algorithm="lloyd").fit(near)
        peaks = _peaks(client)
        assert km.history_.attrs["streamed"] == 0
        assert not client.get_events("worker-restart-memory")
        # Below the spill threshold (70%), so below the pause (80%) too.
        spill = memory_spill_fraction() * LIMIT
        assert all(p < spill for p in peaks.values()), {a: p / LIMIT for a, p in peaks.items()}

        over = _write(tmp_path / "over.zarr", int(1.05 * most) // (4 * D))
        assert B.load_blocks(B.as_source(over), backend).streamed


# ---------------------------------------------------------------------- the rule's terms


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return _write(Path(tmp_path_factory.mktemp("rule")) / "x.zarr", 4096)


def _worker(address: str, unmanaged_mb: float, limit_mb: float = 1000) -> WorkerMemory:
    return WorkerMemory(address, 1, int(limit_mb * 1e6), int(unmanaged_mb * 1e6))


def test_the_rule_counts_copies_reads_state_and_what_is_held(store):
    source = B.as_source(store)
    workers = [_worker("a", 100), _worker("b", 100)]
    block = 8 * 2**20
    with dask.config.set({"dkm.blocks.persist-fraction": 1.0}):
        one, _ = B.persist_limit(source, workers, block)
        two, _ = B.persist_limit(source, workers, block, copies=2)
        held, _ = B.persist_limit(source, workers, block, resident=100_000_000)
        busy, why = B.persist_limit(source, [_worker("a", 100), _worker("b", 300)], block)
    # Per worker: 60% of 1000 MB (Dask spills at 70%, less the margin), less 100 MB in use
    # and one block; then a 32 MiB chunk read twice (decoded and compressed), or the
    # kernels' per-row vectors and tiles and the per-row state beside every row of data.
    room = 0.6e9 - 100e6 - block
    reading = room - 2 * CHUNK_ROWS * D * 4
    work = block // (D * 4) * kernels.ROW_WORK_BYTES + kernels.task_fixed_bytes(kernels.Tiles())
    per_byte = 1 + kernels.ROW_STATE_BYTES / (D * 4)
    fitting = (room - work) / per_byte
    assert one == int(2 * min(reading, fitting))
    # The raw blocks kept beside the centered ones: one more byte per byte of data.
    assert two == int(2 * min(reading, (room - block - work) / (per_byte + 1)))
    assert two < 0.6 * one
    assert one - 100e6 - 2 <= held <= one - 100e6 / per_byte + 2  # spread like the data
    assert busy < one and "worker b" in why and "300 MB in use" in why
    # The share of the free memory (persist-fraction) stays an upper bound.
    with dask.config.set({"dkm.blocks.persist-fraction": 0.1}):
        assert B.persist_limit(source, workers, block)[0] == int(0.1 * 2 * (0.8e9 - 100e6))


# ----------------------------------------------------------------------------- centering


@pytest.mark.parametrize("init", ["k-means||", "random"])
def test_threaded_fit_centers_its_copy_of_the_data_in_place(init):
    """A numpy input is copied once into blocks, which are centered in place: the fit's
    peak allocation stays near one copy of the data (it was twice the data with a centered
    copy beside each block), and the caller's array is untouched."""
    x = np.random.default_rng(0).random((200_000, D), dtype=np.float32)
    before = x.copy()
    with dask.config.set(scheduler="threads"):
        KMeans(K, max_iter=1, random_state=0).fit(x[:2000])  # imports and compiles outside
        tracemalloc.start()
        try:
            # Plain Lloyd: its per-row state is the labels (Hamerly's bounds add their own).
            km = KMeans(K, init=init, max_iter=3, tol=0, random_state=0, algorithm="lloyd")
            km.fit(x)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 1.3 * x.nbytes, peak / x.nbytes
    np.testing.assert_array_equal(x, before)
    ref = KMeans(K, init=km.cluster_centers_, n_init=1, max_iter=1, tol=0).fit(x)
    assert km.inertia_ == pytest.approx(ref.inertia_, rel=1e-3)


def test_threaded_fit_reads_a_store_block_by_block(tmp_path):
    """A store fitted in this process is read straight into one array per block (chunk by
    chunk, as the workers read it): not dask's decoded chunks and a concatenation beside
    them, which peaked near twice the data."""
    x = np.random.default_rng(0).random((400_000, D), dtype=np.float32)
    path = tmp_path / "x.zarr"
    xr.Dataset({"x": (("sample", "feature"), x)}).chunk({"sample": 50_000}).to_zarr(path)
    init = x[:K].copy()
    with dask.config.set(scheduler="threads"):
        KMeans(K, max_iter=1, random_state=0).fit(x[:2000])  # imports and compiles outside
        tracemalloc.start()
        try:
            km = KMeans(K, init=init, max_iter=2, tol=0, algorithm="lloyd").fit(str(path))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 1.3 * x.nbytes, peak / x.nbytes
    ref = KMeans(K, init=init, max_iter=2, tol=0, algorithm="lloyd").fit(x)
    np.testing.assert_array_equal(km.cluster_centers_, ref.cluster_centers_)


# ------------------------------------------------------------------ streaming, partly held


@pytest.mark.timeout(120)
def test_streamed_data_keeps_what_fits_in_memory_and_fits_the_same(tmp_path):
    """Data over the persist limit is streamed, but the first blocks are read once into
    the workers' memory (as many as fit beside the streaming): the fit gives the centres
    and labels of the fully persisted and the fully streamed fits."""
    n, d = 200_000, 16
    x = np.random.default_rng(1).standard_normal((n, d), dtype=np.float32)
    x += np.random.default_rng(2).uniform(-6, 6, (K, d)).astype(np.float32)[np.arange(n) % K]
    path = tmp_path / "x.zarr"
    ds = xr.Dataset({"x": (("sample", "feature"), x)})
    write_atomic(ds, path, kind="features", encoding={"x": {"chunks": (16_384, d)}})
    init = x[:: n // K][:K].copy()
    with (
        dask.config.set({"dkm.blocks.target-bytes": "1MiB", "dkm.blocks.cache-fraction": 0}),
        worker_processes(2, "1GB") as cluster,
        Client(cluster) as client,
    ):
        backend = get_backend(client)
        source = B.as_source(str(path))
        workers = backend.worker_memory()
        free = sum(memory_pause_fraction() * w.limit - w.unmanaged for w in workers)
        # A persist limit of 12.5 MB (the data is 12.8 MB): less the streamed blocks being
        # worked on (2 x 1 MiB) and the per-row state (8.8 MB), a block is held.
        with dask.config.set({"dkm.blocks.persist-fraction": 12.5e6 / free}):
            blocks = B.load_blocks(source, backend)
            assert blocks.streamed and 0 < blocks.resident < blocks.nblocks
            del blocks
            fits = {"auto": KMeans(K, init=init, max_iter=5, tol=0).fit(str(path))}
        for persist in (True, False):
            fits[persist] = KMeans(K, init=init, max_iter=5, tol=0, persist=persist)
            fits[persist].fit(str(path))
        labels = {key: km.labels_.compute() for key, km in fits.items()}
    assert fits["auto"].history_.attrs["streamed"] == 1
    assert fits[True].history_.attrs["streamed"] == 0
    for key in (True, False):
        km = fits[key]
        np.testing.assert_allclose(km.cluster_centers_, fits["auto"].cluster_centers_, rtol=1e-6)
        np.testing.assert_array_equal(labels[key], labels["auto"])
        assert km.inertia_ == pytest.approx(fits["auto"].inertia_, rel=1e-6)


def test_the_state_reserved_per_row_is_the_models(tmp_path):
    """Workers refused the worst case (Yinyang's bounds, 44 bytes per row) take a model that
    keeps less, and a refusal counts the model's bytes."""
    n = 4_000_000  # the store's metadata only: the rule reads no chunk
    x = da.zeros((n, 2), dtype=np.float32, chunks=(65_536, 2))
    path = tmp_path / "long.zarr"
    xr.Dataset({"x": (("sample", "feature"), x)}).to_zarr(path, compute=False)
    source = B.as_source(str(path))
    # 70 MB free below the pause: 44 bytes per row of a worker's half are 88 MB, 16 are 32.
    workers = [_worker("a", 100, 170 / 0.8), _worker("b", 100, 170 / 0.8)]
    with pytest.raises(B.WorkerMemoryError, match=r"88 MB of labels .*\(44 bytes per row"):
        B.block_limit(source, workers, from_zarr=True)
    lean = replace(source, row_state=16)
    assert B.block_limit(lean, workers, from_zarr=True)[0] >= B.MIN_BLOCK_ROWS * 2 * 4
    few = [_worker("a", 100, 120 / 0.8), _worker("b", 100, 120 / 0.8)]  # 20 MB free
    with pytest.raises(B.WorkerMemoryError, match=r"32 MB of labels .*\(16 bytes per row"):
        B.block_limit(lean, few, from_zarr=True)
