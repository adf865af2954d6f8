"""A matrix in one Zarr chunk keeps every worker thread busy; a sweep reads its store once.

The data is generated here and written as a dkm store (``write_atomic``) in ONE chunk. On
the session's 2-worker x 1-thread cluster it must be split into at least two blocks per
thread, spread over both workers (the scheduler says who holds what), and fit to the same
model as the in-process fit on the numpy array. Fits one after another on the same store
and client share the persisted blocks (the cache counters say so) and give exactly the
models of fresh loads; a rewritten store (another write id) misses the cache.
"""

from __future__ import annotations

import itertools

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from dkm._parallel.backend import get_backend
from dkm._parallel.blocks import BLOCK_CACHE, _row_splits, as_source, load_blocks
from dkm.data.store import write_atomic
from dkm.kmeans.estimators import KMeans, MiniBatchKMeans

N, D = 12_000, 6


def _data(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-4, 4, (10, D))
    return (centers[rng.integers(0, 10, N)] + rng.standard_normal((N, D))).astype(np.float32)


def _write(path, x: np.ndarray, overwrite: bool = False) -> str:
    """A dkm feature store holding ``x`` in a single Zarr chunk."""
    ds = xr.Dataset({"x": (("sample", "feature"), x)})
    enc = {"x": {"chunks": x.shape}}
    write_atomic(ds, path, kind="features", encoding=enc, overwrite=overwrite)
    return str(path)


@pytest.fixture
def one_chunk(tmp_path):
    x = _data(0)
    path = _write(tmp_path / "one.zarr", x)
    assert zarr.open_group(path, mode="r")["x"].chunks == x.shape  # one chunk indeed
    return path, x


def _init(x: np.ndarray, k: int) -> np.ndarray:
    return x[np.random.default_rng(5).choice(len(x), k, replace=False)].copy()


# ------------------------------------------------------------------------------ the split


def test_row_splits_give_every_thread_two_blocks_in_row_order():
    for nthreads in (1, 2, 3, 16):
        splits = _row_splits((66_181,), 100, nthreads, min_rows=1024)
        assert len(splits) == 2 * nthreads
        assert splits[0][0] == 0 and splits[-1][1] == 66_181
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(splits))
        sizes = [b - a for a, b in splits]
        assert max(sizes) - min(sizes) <= 1
    # Never below min_rows (here: 3000 rows make 2 blocks, not 32)...
    assert _row_splits((3000,), 100, 16, min_rows=1024) == [(0, 1500), (1500, 3000)]
    # ...and chunks that already give every thread two blocks are left alone.
    assert _row_splits((5000,) * 8, 100, 2, min_rows=1024) == [
        (a, a + 5000) for a in range(0, 40_000, 5000)
    ]


@pytest.mark.parametrize("kind", ["path", "dask", "numpy"])
def test_one_chunk_is_split_and_spread_over_both_workers(client, one_chunk, kind):
    path, x = one_chunk
    X = {"path": path, "dask": da.from_array(x, chunks=x.shape), "numpy": x}[kind]
    BLOCK_CACHE.clear(client)
    backend = get_backend(client)
    assert backend.nthreads == 2
    blocks = load_blocks(as_source(X), backend, persist=True)
    assert blocks.nblocks >= 2 * backend.nthreads and not blocks.streamed
    holders = client.who_has(blocks.handles)
    per_worker: dict[str, int] = {}
    for f in blocks.handles:
        (addr,) = holders[f.key]
        per_worker[addr] = per_worker.get(addr, 0) + 1
    assert len(per_worker) == 2, per_worker
    assert max(per_worker.values()) - min(per_worker.values()) <= 1, per_worker
    # Rows in the same global order.
    np.testing.assert_array_equal(blocks.starts, np.cumsum([0, *blocks.sizes[:-1]]))
    np.testing.assert_array_equal(np.concatenate(client.gather(blocks.handles)), x)


def test_one_chunk_fit_on_the_cluster_equals_the_in_process_fit(client, one_chunk):
    path, x = one_chunk
    init = _init(x, 32)
    km = KMeans(32, init=init, n_init=1, max_iter=8, tol=0).fit(path)
    labels = np.asarray(km.labels_)
    assert km.history_.attrs["n_blocks"] >= 4
    with dask.config.set(scheduler="threads"):
        ref = KMeans(32, init=init, n_init=1, max_iter=8, tol=0).fit(x)
    np.testing.assert_array_equal(labels, np.asarray(ref.labels_))
    np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(km.inertia_, ref.inertia_, rtol=1e-6)


# ------------------------------------------------------------------------------ the cache


def _sweep(path: str) -> list[np.ndarray]:
    """Three fits of a sweep on one store: k-means|| (centers in its first round),
    k-means++ (centers first) and mini-batch."""
    return [
        KMeans(8, init="k-means||", random_state=0, max_iter=20).fit(path).cluster_centers_,
        KMeans(5, init="k-means++", random_state=1, max_iter=20).fit(path).cluster_centers_,
        MiniBatchKMeans(6, random_state=2, batch_size=2048, max_iter=5).fit(path).cluster_centers_,
    ]


def test_sweep_shares_the_blocks_and_gives_the_models_of_fresh_loads(client, one_chunk):
    path, x = one_chunk
    BLOCK_CACHE.clear(client)
    with dask.config.set({"dkm.blocks.cache-fraction": 0}):  # every fit loads afresh
        before = BLOCK_CACHE.info(client)
        fresh = _sweep(path)
        after = BLOCK_CACHE.info(client)
        assert after["hits"] == before["hits"] and after["entries"] == 0

    before = BLOCK_CACHE.info(client)
    shared = _sweep(path)
    after = BLOCK_CACHE.info(client)
    assert after["misses"] - before["misses"] == 1  # the first fit loads...
    assert after["hits"] - before["hits"] == 2  # ...the other two reuse its blocks
    assert after["entries"] == 1 and after["nbytes"] == x.nbytes
    for got, want in zip(shared, fresh, strict=True):
        np.testing.assert_array_equal(got, want)

    # The cached blocks are the rows as stored: no fit centered them in place.
    entry = next(iter(BLOCK_CACHE._clients[id(client)].entries.values()))
    np.testing.assert_array_equal(np.concatenate(client.gather(entry.handles)), x)


def test_a_rewritten_store_misses_the_cache(client, one_chunk, tmp_path):
    path, x = one_chunk
    BLOCK_CACHE.clear(client)
    init = _init(x, 8)
    KMeans(8, init=init, n_init=1, max_iter=3, tol=0).fit(path)
    assert BLOCK_CACHE.info(client)["entries"] == 1

    # Same path, same shape, other rows: a new write id, so the fit reads the new rows.
    y = _data(1)
    _write(path, y, overwrite=True)
    before = BLOCK_CACHE.info(client)
    km = KMeans(8, init=init, n_init=1, max_iter=3, tol=0).fit(path)
    after = BLOCK_CACHE.info(client)
    assert after["misses"] - before["misses"] == 1 and after["hits"] == before["hits"]
    assert after["entries"] == 1  # the stale entry was replaced, not kept beside
    with dask.config.set(scheduler="threads"):
        ref = KMeans(8, init=init, n_init=1, max_iter=3, tol=0).fit(y)
    np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, rtol=1e-5, atol=1e-5)

    # Another store (a copy of the same rows) is another entry, not a hit.
    other = _write(tmp_path / "copy.zarr", y)
    before = BLOCK_CACHE.info(client)
    KMeans(8, init=init, n_init=1, max_iter=3, tol=0).fit(other)
    after = BLOCK_CACHE.info(client)
    assert after["misses"] - before["misses"] == 1 and after["entries"] == 2


def test_the_cache_is_dropped_with_its_client(process_cluster, one_chunk):
    from distributed import Client

    path, x = one_chunk
    with Client(process_cluster) as c:
        KMeans(4, init=_init(x, 4), n_init=1, max_iter=2, tol=0).fit(path)
        assert BLOCK_CACHE.info(c)["entries"] == 1
    assert BLOCK_CACHE.info(c)["entries"] == 0
    assert id(c) not in BLOCK_CACHE._clients


def test_a_bad_cache_fraction_is_named(client, one_chunk):
    path, x = one_chunk
    with dask.config.set({"dkm.blocks.cache-fraction": "half"}):
        with pytest.raises(ValueError, match=r"dkm\.blocks\.cache-fraction: expected a number"):
            KMeans(4, init=_init(x, 4), n_init=1, max_iter=2, tol=0).fit(path)
