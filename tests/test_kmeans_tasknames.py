"""Tasks read as the algorithm on the dashboard's task stream (key prefixes)."""

from __future__ import annotations

import numpy as np
from dask.utils import key_split
from distributed import get_task_stream
from sklearn.datasets import make_blobs

from dkm._parallel.keys import Keys
from dkm.kmeans import KMeans, MiniBatchKMeans


def test_keys_put_what_the_task_does_first():
    keys = Keys("0a1b2c3d4e").sub(r=0)
    assert keys("lloyd", "assign", it=7) == "lloyd-assign-0a1b2c3d4e-r0-it7"
    assert key_split(keys("kmeans||", "round", r=2) + "-0") == "kmeans||-round"
    assert key_split(keys("lloyd", "reduce", it=7) + "-l1-0") == "lloyd-reduce"
    names = [keys("lloyd", p, it=i) for i in (1, 2) for p in ("assign", "stats")]
    assert len(set(names)) == 4  # unique within a fit
    # Tokens are never all letters, which key_split would take for part of the prefix.
    assert all(not Keys.new().token.isalpha() for _ in range(2000))


def test_task_stream_prefixes(client):
    x, _ = make_blobs(20000, n_features=8, centers=10, random_state=0)
    x = x.astype(np.float32)
    with get_task_stream(client) as stream:
        KMeans(10, init="k-means||", max_iter=5, tol=0, random_state=0).fit(x)
        MiniBatchKMeans(10, batch_size=1024, max_iter=1, random_state=0).fit(x)
    prefixes = {key_split(t["key"]) for t in stream.data}
    assert {"lloyd-assign", "kmeans||-round", "data-stats", "minibatch-round"} <= prefixes, prefixes
    assert {"lloyd-reduce", "minibatch-final"} & prefixes, prefixes
    assert not any(p.startswith("dkm-") for p in prefixes), prefixes
