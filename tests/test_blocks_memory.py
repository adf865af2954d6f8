"""Memory of the blocks: centering does not copy the blocks."""

from __future__ import annotations

import tracemalloc

import dask
import numpy as np
import pytest

from dkm.kmeans.estimators import KMeans

D, K = 32, 8


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
