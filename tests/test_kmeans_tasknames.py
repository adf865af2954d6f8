"""Tasks read as the algorithm on the dashboard's task stream (key prefixes)."""

from __future__ import annotations

import numpy as np
from dask.utils import key_split
from distributed import get_task_stream
from sklearn.datasets import make_blobs

from dkm._parallel.backend import task_key
from dkm.kmeans import KMeans, MiniBatchKMeans


def test_task_key_puts_the_phase_first():
    assert task_key("dkm-kmeans-0a1b2c3d4e-r0-it7-step", 3) == "lloyd-assign-0a1b2c3d4e-r0-it7-3"
    assert key_split(task_key("dkm-kmeans-0a1b2c3d4e-r0-kmpar-r2", 0)) == "kmeans||-round"
    assert key_split(task_key("dkm-kmeans-0a1b2c3d4e-r0-it7-sum-l1-0")) == "lloyd-reduce"
    assert task_key("plain-name", 2) == "plain-name-2"
    names = [f"dkm-kmeans-0a1b2c3d4e-r0-it{i}-{p}" for i in (1, 2) for p in ("step", "stats")]
    assert len({task_key(n, j) for n in names for j in range(3)}) == 12  # still unique


def test_task_stream_prefixes(client):
    x, _ = make_blobs(20000, n_features=8, centers=10, random_state=0)
    x = x.astype(np.float32)
    with get_task_stream(client) as stream:
        KMeans(10, init="k-means||", max_iter=5, tol=0, random_state=0).fit(x)
        MiniBatchKMeans(10, batch_size=1024, max_iter=1, random_state=0).fit(x)
    prefixes = {key_split(t["key"]) for t in stream.data}
    assert {"lloyd-assign", "kmeans||-round", "data-stats", "minibatch-batch"} <= prefixes, prefixes
    assert not any(p.startswith("dkm-") for p in prefixes), prefixes
