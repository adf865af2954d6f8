"""Shared fixtures: real dask.distributed clusters and on-disk Zarr stores."""

from __future__ import annotations

import logging

import pytest
from distributed import Client, LocalCluster


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
