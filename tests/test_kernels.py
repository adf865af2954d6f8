"""The compiled kernels' process settings on the workers."""

from __future__ import annotations

import os
import resource

import numpy as np
import pytest

from dkm._parallel import kernels


def _faults_making_fresh_arrays() -> int:
    """Minor page faults while 200 arrays of 1 MiB are made, filled and freed."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        a = np.ones(262_144, np.float32)  # above glibc's fixed 128 KiB mmap threshold
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.slow
def test_worker_processes_keep_temporaries_on_the_heap(client):
    """Dask starts workers with MALLOC_TRIM_THRESHOLD_, which makes every allocation above
    128 KiB a new mapping faulted in page by page (256 faults per MiB). The warm-up that runs
    before every fit keeps them on the heap: the same pages serve every new array."""
    assert all(client.run(lambda: "MALLOC_TRIM_THRESHOLD_" in os.environ).values())
    done = client.run(kernels.warm_up, kernels.Tiles(), kernels.malloc_settings())
    assert all(r["malloc_tuned"] for r in done.values()), done
    faults = client.run(_faults_making_fresh_arrays)
    assert all(f < 5_000 for f in faults.values()), faults  # 51,200 as new mappings


@pytest.mark.slow
def test_workers_too_small_for_numba_keep_dasks_malloc(client):
    """Memory before speed where numba is not loaded either: the heap holds on to what new
    mappings would have given back (a 300 MB worker was refused a fit it had room for)."""
    lean = kernels.Tiles(numba_min_memory=2**50)  # above any worker's limit
    done = client.run(kernels.warm_up, lean, kernels.malloc_settings())
    assert not any(r["malloc_tuned"] for r in done.values()), done


def test_left_alone_without_a_malloc_variable(monkeypatch):
    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    assert kernels.tune_malloc(8 << 20, 32 << 20) is False
    assert kernels.tune_malloc(0, 0) is False
