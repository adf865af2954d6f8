"""Shared fixtures: real dask.distributed clusters and on-disk Zarr stores."""

from __future__ import annotations

import gzip
import json
import logging
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster


def assert_same_fit(a, b, history_keys) -> None:
    """Two KMeans fits with the same centres, labels, inertia, iteration count and
    ``history_keys`` entries, to the last bit."""
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(np.asarray(a.labels_), np.asarray(b.labels_))
    assert a.inertia_ == b.inertia_
    assert a.n_iter_ == b.n_iter_
    for key in history_keys:
        np.testing.assert_array_equal(a.history_[key].values, b.history_[key].values, key)


def worker_processes(n_workers: int = 2, memory_limit="auto", **kw) -> LocalCluster:
    """A LocalCluster of single-threaded worker processes on 127.0.0.1 with a memory limit,
    for tests of memory rules (use as a context manager)."""
    kw.setdefault("silence_logs", logging.ERROR)
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        memory_limit=memory_limit,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        **kw,
    )


@pytest.fixture(scope="session")
def process_cluster():
    """Two single-threaded worker *processes* on 127.0.0.1 (the CI-sized default)."""
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster:
        yield cluster


@pytest.fixture
def client(process_cluster):
    """A client on the session's two-process cluster; it becomes the default scheduler."""
    with Client(process_cluster) as c:
        yield c


@pytest.fixture(scope="session")
def threaded_cluster():
    """One in-process worker with two threads: fast, shares memory with the test."""
    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster:
        yield cluster


@pytest.fixture
def threaded_client(threaded_cluster):
    with Client(threaded_cluster) as c:
        yield c


# --------------------------------------------------------------------------- dataset-layer helpers

IDX_TYPE_CODES = {
    np.dtype("uint8"): 0x08,
    np.dtype("int8"): 0x09,
    np.dtype("int16"): 0x0B,
    np.dtype("int32"): 0x0C,
    np.dtype("float32"): 0x0D,
    np.dtype("float64"): 0x0E,
}


def _write_idx(path, array, *, gz=False, type_code=None, magic=None):
    """Write ``array`` in the IDX format with ``struct`` (big-endian header and data)."""
    array = np.asarray(array)
    code = IDX_TYPE_CODES[array.dtype] if type_code is None else type_code
    header = magic if magic is not None else struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


@pytest.fixture
def write_idx():
    """``write_idx(path, array, gz=False, type_code=None, magic=None)`` -> path."""
    return _write_idx


MNIST_STEMS = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}


@pytest.fixture
def make_mnist_dir():
    """``make(directory, n_train=6, n_test=4, gz=True, seed=0, side=28)`` writes the four
    canonically named MNIST IDX files of random digits and returns their arrays by role."""

    def make(directory, n_train=6, n_test=4, *, gz=True, seed=0, side=28):
        rng = np.random.default_rng(seed)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {
            "train-images": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
            "train-labels": rng.integers(0, 10, n_train, dtype=np.uint8),
            "test-images": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
            "test-labels": rng.integers(0, 10, n_test, dtype=np.uint8),
        }
        for role, array in arrays.items():
            name = MNIST_STEMS[role] + (".gz" if gz else "")
            _write_idx(directory / name, array, gz=gz)
        return arrays

    return make


@pytest.fixture
def closed_port():
    """A 127.0.0.1 TCP port nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- a CLI-started cluster

DASK_CLI = Path(sys.executable).with_name("dask")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


class CliCluster:
    """A scheduler and single-threaded workers started with the ``dask`` command on 127.0.0.1
    as separate processes, as a user would start a remote cluster."""

    def __init__(self, workdir: Path, n_workers: int = 2):
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        sched_file = workdir / "scheduler.json"
        sched_file.unlink(missing_ok=True)
        self.scheduler = self._start(
            [
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--scheduler-file",
                str(sched_file),
                "--no-dashboard",
            ],
            "scheduler.log",
        )
        deadline = time.monotonic() + 60
        self.address = None
        while self.address is None:
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"dask scheduler did not start:\n{(workdir / 'scheduler.log').read_text()}"
                )
            try:
                self.address = json.loads(sched_file.read_text())["address"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                time.sleep(0.1)
        self.workers = self._start(
            [
                "worker",
                "--scheduler-file",
                str(sched_file),
                "--host",
                "127.0.0.1",
                "--nworkers",
                str(n_workers),
                "--nthreads",
                "1",
                "--no-dashboard",
                "--local-directory",
                str(workdir),
            ],
            "worker.log",
        )
        with Client(self.address, timeout=30) as c:
            c.wait_for_workers(n_workers, timeout=60)

    def _start(self, args: list[str], log_name: str) -> subprocess.Popen:
        with open(self.workdir / log_name, "ab") as log:
            proc = subprocess.Popen(
                [str(DASK_CLI), *args], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)


@pytest.fixture(scope="session")
def cli_cluster(tmp_path_factory):
    """Address of a scheduler and two single-threaded workers started as separate processes
    with the ``dask`` command on 127.0.0.1, as a user would start a remote cluster."""
    cluster = CliCluster(tmp_path_factory.mktemp("dask-cli-cluster"))
    try:
        yield cluster.address
    finally:
        cluster.stop()


@pytest.fixture
def start_cli_cluster(tmp_path):
    """``start()`` -> a new :class:`CliCluster` of its own (stopped after the test), for
    tests that kill or restart cluster processes."""
    started: list[CliCluster] = []

    def start(n_workers: int = 2) -> CliCluster:
        workdir = tmp_path / f"cluster-{len(started)}"
        workdir.mkdir()
        started.append(CliCluster(workdir, n_workers))
        return started[-1]

    yield start
    for cluster in started:
        cluster.stop()
