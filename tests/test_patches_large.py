"""The 40M-patch run: every stride-1 5x5 patch of full Fashion-MNIST (4.03 GB float32) goes to
Zarr on two workers limited to 1 GiB each (about half of it together), so no process can ever
hold more than a few chunks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

from dkm.data.catalog import DEBIAN_FASHION_MNIST, ingest
from dkm.data.store import open_dataset
from dkm.features.patches import extract_patches, write_patches

pytestmark = pytest.mark.slow

WORKER_LIMIT = 2**30  # 1 GiB per worker, two workers: half the output size in total


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


@pytest.fixture(scope="module")
def fashion_store(tmp_path_factory):
    if not DEBIAN_FASHION_MNIST.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{DEBIAN_FASHION_MNIST} missing: .ci/run must install it")
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    return ingest("fashion-mnist", tmp_path_factory.mktemp("fm") / "fashion-mnist.zarr")


def test_full_fashion_mnist_stride_1_under_a_memory_limit(fashion_store, tmp_path):
    images = open_dataset(fashion_store)["images"]
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit=WORKER_LIMIT,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        patches = extract_patches(images, size=5, stride=1, pad=0)
        output_bytes = patches.size * 4
        assert output_bytes > 3.5 * WORKER_LIMIT
        path = write_patches(patches, tmp_path / "patches.zarr")
        peaks = client.run(_vm_hwm)
        workers_seen = len(client.scheduler_info()["workers"])

    assert workers_seen == 2  # nobody was killed for memory
    assert all(peak < WORKER_LIMIT for peak in peaks.values()), peaks
    stored = open_dataset(path)
    assert stored["patches"].shape == (70000 * 576, 25)
    # Spot-check whole images against the definition.
    raw = images.values
    for i in (0, 34567, 69999):
        block = stored["patches"].isel(patch=slice(i * 576, (i + 1) * 576)).values
        windows = np.lib.stride_tricks.sliding_window_view(raw[i], (5, 5)).reshape(576, 25)
        np.testing.assert_array_equal(block, windows.astype(np.float32) / np.float32(255))
        assert (stored["image"].isel(patch=slice(i * 576, (i + 1) * 576)).values == i).all()
