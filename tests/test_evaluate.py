"""Label metrics from a contingency table equal scikit-learn's on the same labels."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from sklearn import metrics

from dkm import evaluate


@pytest.fixture
def labels():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 5000)
    # Clusters that mostly follow the labels, with noise, and one cluster left empty.
    pred = np.where(rng.random(5000) < 0.7, y * 2 % 13, rng.integers(0, 13, 5000))
    pred[pred == 5] = 6
    return y, pred, 14


def test_contingency_on_dask_arrays_matches_sklearn(labels):
    y, pred, k = labels
    table = evaluate.contingency(da.from_array(y, chunks=700), da.from_array(pred, chunks=900), k)
    want = metrics.cluster.contingency_matrix(y, pred)
    assert table.shape == (10, k)
    np.testing.assert_array_equal(table[:, np.unique(pred)], want)
    assert table[:, 5].sum() == 0


def test_scores_match_sklearn(labels):
    y, pred, k = labels
    table = evaluate.contingency(y, pred, k)
    assert evaluate.homogeneity(table) == pytest.approx(metrics.homogeneity_score(y, pred))
    assert evaluate.nmi(table) == pytest.approx(metrics.normalized_mutual_info_score(y, pred))
    majority = sum(np.bincount(y[pred == c]).max() for c in np.unique(pred)) / len(y)
    assert evaluate.majority_accuracy(table) == pytest.approx(majority)
    cm = metrics.confusion_matrix(y, pred, labels=np.arange(k))[:10]
    r, c = linear_sum_assignment(-cm)
    assert evaluate.one_to_one_accuracy(table) == pytest.approx(cm[r, c].sum() / len(y))


def test_perfect_and_degenerate_clusterings():
    y = np.repeat(np.arange(4), 25)
    perfect = evaluate.contingency(y, (y + 1) % 4, 4)
    assert evaluate.majority_accuracy(perfect) == 1.0
    assert evaluate.one_to_one_accuracy(perfect) == 1.0
    assert evaluate.nmi(perfect) == pytest.approx(1.0)
    single = evaluate.contingency(y, np.zeros_like(y), 1)
    assert evaluate.majority_accuracy(single) == 0.25
    assert evaluate.homogeneity(single) == pytest.approx(0.0)


def test_reconstruction_rmse():
    x = np.random.default_rng(1).random((300, 25))
    centers = x[:7]
    d2 = ((x[:, None, :] - centers[None]) ** 2).sum(-1).min(1)
    rmse = evaluate.reconstruction_rmse(d2.sum(), *x.shape)
    nearest = centers[((x[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)]
    assert rmse == pytest.approx(np.sqrt(((x - nearest) ** 2).mean()))


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate.contingency(np.zeros(3, int), np.zeros(4, int), 2)


# --------------------------------------------------------------------------- more label metrics


def test_pair_and_entropy_scores_match_sklearn(labels):
    y, pred, k = labels
    table = evaluate.contingency(y, pred, k)
    assert evaluate.adjusted_rand(table) == pytest.approx(metrics.adjusted_rand_score(y, pred))
    assert evaluate.completeness(table) == pytest.approx(metrics.completeness_score(y, pred))
    assert evaluate.v_measure(table) == pytest.approx(metrics.v_measure_score(y, pred))


@pytest.mark.parametrize(
    "y, pred",
    [
        ([0, 0, 1, 1], [0, 0, 0, 0]),  # one cluster
        ([0, 1, 2, 3], [3, 2, 1, 0]),  # all singletons, perfect
        ([0, 0, 0], [0, 1, 2]),  # one label
        ([0, 0, 1, 1], [0, 1, 0, 1]),  # worse than chance
    ],
)
def test_pair_and_entropy_scores_on_degenerate_labelings(y, pred):
    table = evaluate.contingency(np.array(y), np.array(pred), max(pred) + 1)
    assert evaluate.adjusted_rand(table) == pytest.approx(metrics.adjusted_rand_score(y, pred))
    assert evaluate.completeness(table) == pytest.approx(metrics.completeness_score(y, pred))
    assert evaluate.v_measure(table) == pytest.approx(metrics.v_measure_score(y, pred))


def test_adjusted_rand_does_not_overflow_on_large_counts():
    # 4e9 samples: pair counts near 1.6e19 overflow int64; Python integers do not.
    table = np.array([[2_000_000_000, 10], [5, 2_000_000_000]], dtype=np.int64)
    assert 0.99 < evaluate.adjusted_rand(table) <= 1.0


@pytest.mark.parametrize("k", [14, 7])  # more clusters than labels, and fewer
def test_confusion_matrices_match_sklearn_after_the_hungarian_mapping(threaded_client, labels, k):
    y, pred, _ = labels
    pred = pred % k
    ds = evaluate.confusion_matrices(da.from_array(y, chunks=800), da.from_array(pred, 650), k)
    mapping = ds["cluster_label"].values
    assert ds["contingency"].dims == ("label", "cluster")
    np.testing.assert_array_equal(ds["contingency"], evaluate.contingency(y, pred, k))
    want = metrics.confusion_matrix(y, mapping[pred], labels=ds["predicted_label"].values)
    # sklearn's matrix is square over the given labels: its row for -1 (no true label) is 0.
    np.testing.assert_array_equal(ds["confusion"], want[: ds.sizes["label"]])
    assert not want[ds.sizes["label"] :].any()
    assert ds["confusion"].dims == ("label", "predicted_label")
    # The matching is one-to-one and its trace is the Hungarian accuracy.
    matched = mapping[mapping >= 0]
    assert len(set(matched)) == len(matched) == min(k, 10)
    assert (-1 in ds["predicted_label"].values) == (k > 10)
    accuracy = evaluate.one_to_one_accuracy(ds["contingency"].values)
    assert np.trace(ds["confusion"].values) / len(y) == pytest.approx(accuracy)


# --------------------------------------------------------------------------- geometry metrics

GEOMETRY = ["silhouette", "calinski_harabasz", "davies_bouldin"]


@pytest.fixture(scope="module")
def blobs():
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(1500, 6, centers=5, cluster_std=1.5, random_state=0)
    X = X + 50  # far from the origin: the shifted sums must stay well conditioned
    centers = X[:: 1500 // 7][:7]
    pred = ((X[:, None] - centers) ** 2).sum(-1).argmin(1)
    return X.astype(np.float32), pred, 7


def _sklearn_geometry(X, pred):
    # dkm accumulates in float64 whatever the input's dtype; scikit-learn keeps float32.
    X = X.astype(np.float64)
    return {
        "silhouette": metrics.silhouette_score(X, pred),
        "calinski_harabasz": metrics.calinski_harabasz_score(X, pred),
        "davies_bouldin": metrics.davies_bouldin_score(X, pred),
    }


def test_geometry_metrics_match_sklearn_for_numpy_and_chunkings(client, blobs):
    X, pred, k = blobs
    want = _sklearn_geometry(X, pred)
    got = [
        evaluate.geometry_metrics(GEOMETRY, X, pred, n_clusters=k),
        evaluate.geometry_metrics(
            GEOMETRY,
            da.from_array(X, chunks=(400, 6)),
            da.from_array(pred, chunks=333),
            n_clusters=k,
        ),
        evaluate.geometry_metrics(
            GEOMETRY, xr.DataArray(da.from_array(X, chunks=(250, 3))), pred, n_clusters=k
        ),
    ]
    for scores in got:
        assert scores == pytest.approx(want, rel=1e-9)
    # The silhouette's blocks do not follow the chunks: any chunking gives the same bits.
    assert got[0]["silhouette"] == got[1]["silhouette"] == got[2]["silhouette"]


def test_silhouette_blocks_and_clusters_of_one(threaded_client):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(700, 4))
    pred = rng.integers(0, 5, 700)
    pred[[10, 500]] = [5, 6]  # two clusters of a single row: silhouette 0 there
    want = metrics.silhouette_score(X, pred)
    got = evaluate.silhouette(da.from_array(X, chunks=(90, 4)), pred, block_rows=128)
    assert got == pytest.approx(want, rel=1e-10)
    # Duplicate rows far from the origin: exactly 0 apart (the dot-product expansion alone
    # leaves rounding dust of ~1e-6 there), so equal to the silhouette of exact distances.
    dup = np.repeat(X[:50] + 1000, 2, axis=0)
    dpred = np.repeat(np.arange(50) % 3, 2)
    got = evaluate.silhouette(dup, dpred, block_rows=32)
    exact = metrics.silhouette_score(cdist(dup, dup), dpred, metric="precomputed")
    assert got == pytest.approx(exact, rel=1e-10)


def test_silhouette_on_a_sample_is_sklearns_on_the_sampled_rows(threaded_client):
    rng = np.random.default_rng(4)
    n, size = 12_000, 1500
    X = rng.normal(size=(n, 5)) + np.repeat(rng.normal(scale=4, size=(6, 5)), n // 6, axis=0)
    pred = np.repeat(np.arange(6), n // 6)
    rows = evaluate.sample_rows(n, size, random_state=7)
    assert len(rows) == size and len(np.unique(rows)) == size and np.all(np.diff(rows) > 0)
    assert rows[0] < n // 10 and rows[-1] > n - n // 10  # spread over all rows, not a prefix
    want = metrics.silhouette_score(X[rows], pred[rows])
    values = {
        evaluate.silhouette(
            da.from_array(X, chunks=(chunk, 5)), da.from_array(pred, chunks=chunk),
            sample_size=size, random_state=7,
        )
        for chunk in (1000, 4321)
    }  # fmt: skip
    assert len(values) == 1
    assert values.pop() == pytest.approx(want, rel=1e-10)
    other = evaluate.sample_rows(n, size, random_state=8)
    assert len(np.intersect1d(rows, other)) < size // 2
    assert len(evaluate.sample_rows(20_001)) == evaluate.SILHOUETTE_SAMPLE == 10_000
    np.testing.assert_array_equal(evaluate.sample_rows(500), np.arange(500))


def test_davies_bouldin_takes_one_pass_when_centroids_are_the_means(
    threaded_client, blobs, monkeypatch
):
    from dkm.evaluate import geometry

    X, pred, k = blobs
    passes = []
    original = geometry._stats_pass
    monkeypatch.setattr(geometry, "_stats_pass", lambda *a: passes.append(1) or original(*a))
    means = np.stack([X[pred == c].astype(np.float64).mean(0) for c in range(k)])
    want = _sklearn_geometry(X, pred)["davies_bouldin"]
    x = da.from_array(X, chunks=(300, 6))
    for centroids, n_passes in [(means, 1), (means + 0.05, 2), (None, 2)]:
        passes.clear()
        got = evaluate.davies_bouldin(x, pred, n_clusters=k, centroids=centroids)
        assert len(passes) == n_passes
        assert got == pytest.approx(want, rel=geometry.DB_RTOL)
    # The statistics and the silhouette's sample share the one pass.
    passes.clear()
    evaluate.geometry_metrics(GEOMETRY, x, pred, n_clusters=k, centroids=means)
    assert len(passes) == 1


def test_empty_clusters_are_left_out_as_sklearn_does(threaded_client, blobs):
    X, pred, k = blobs
    shifted = np.where(pred >= 3, pred + 2, pred)  # clusters 3 and 4 empty
    got = evaluate.geometry_metrics(GEOMETRY, X, shifted, n_clusters=k + 2)
    assert got == pytest.approx(_sklearn_geometry(X, shifted), rel=1e-9)


def test_geometry_errors_are_clear(threaded_client, blobs):
    X, pred, k = blobs
    with pytest.raises(ValueError, match=r"at least 2 non-empty clusters.*1 non-empty"):
        evaluate.calinski_harabasz(X, np.zeros(len(X), int), n_clusters=3)
    with pytest.raises(ValueError, match="silhouette need at least 2 clusters; n_clusters=1"):
        evaluate.silhouette(X, np.zeros(len(X), int))
    with pytest.raises(ValueError, match="one cluster per row of X"):
        evaluate.davies_bouldin(X, pred[:-1])
    with pytest.raises(ValueError, match=r"centroids has shape \(3, 6\)"):
        evaluate.davies_bouldin(X, pred, n_clusters=k, centroids=np.zeros((3, 6)))
    with pytest.raises(ValueError, match="silhouette_sample must be an integer >= 2"):
        evaluate.geometry_metrics(["silhouette"], X, pred, silhouette_sample=1)
    with pytest.raises(ValueError, match=r"labels_pred must be clusters 0 \.\. 6"):
        evaluate.calinski_harabasz(X, pred + 1, n_clusters=k)
    with pytest.raises(ValueError, match="2-D"):
        evaluate.silhouette(X[:, 0], pred)


# --------------------------------------------------------------------------- compute_metrics


def test_compute_metrics_with_features_and_labels(threaded_client, blobs):
    X, pred, k = blobs
    y = (pred + (np.arange(len(pred)) % 11 == 0)) % k
    centers = np.stack([X[pred == c].mean(0) for c in range(k)])
    inertia = float(((X - centers[pred]) ** 2).sum())
    names = ["inertia", "j_clust", "ari", "completeness", "v_measure", *GEOMETRY]
    got = evaluate.compute_metrics(
        names,
        inertia=inertia,
        n_samples=len(X),
        n_features=X.shape[1],
        labels_true=da.from_array(y, chunks=400),
        labels_pred=da.from_array(pred, chunks=500),
        n_clusters=k,
        X=xr.DataArray(da.from_array(X, chunks=(400, 6)), dims=("sample", "feature")),
        centroids=centers,
        silhouette_sample=1000,
        random_state=3,
    )
    assert list(got) == names
    rows = evaluate.sample_rows(len(X), 1000, random_state=3)
    want = {
        "inertia": inertia,
        "j_clust": inertia / len(X),
        "ari": metrics.adjusted_rand_score(y, pred),
        "completeness": metrics.completeness_score(y, pred),
        "v_measure": metrics.v_measure_score(y, pred),
        **_sklearn_geometry(X, pred),
        "silhouette": metrics.silhouette_score(X[rows], pred[rows]),
    }
    assert got == pytest.approx(want, rel=1e-6)


def test_compute_metrics_keeps_the_runners_call_and_checks_needs_first(blobs):
    _, pred, k = blobs
    base = dict(inertia=10.0, n_samples=5, n_features=2, n_clusters=k)
    got = evaluate.compute_metrics(["inertia", "nmi"], labels_true=pred, labels_pred=pred, **base)
    assert got == {"inertia": 10.0, "nmi": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="ari need the samples' labels"):
        evaluate.compute_metrics(["ari"], labels_pred=pred, **base)
    with pytest.raises(ValueError, match="silhouette, davies_bouldin need the feature matrix X"):
        evaluate.compute_metrics(
            ["j_clust", "silhouette", "davies_bouldin"], labels_pred=pred, **base
        )
    with pytest.raises(ValueError, match=r"unknown metric.*'sil'"):
        evaluate.compute_metrics(["sil"], **base)


def test_registry_flags():
    for name in ("accuracy", "one_to_one_accuracy", "nmi", "homogeneity", "completeness",
                 "v_measure", "ari"):  # fmt: skip
        assert evaluate.METRICS[name].needs_labels
        assert not evaluate.METRICS[name].needs_features
    for name in GEOMETRY:
        assert evaluate.METRICS[name].needs_features
        assert not evaluate.METRICS[name].needs_labels
    assert not any(vars(evaluate.METRICS["j_clust"])[f] for f in
                   ("needs_labels", "needs_features", "needs_patches", "needs_coding"))  # fmt: skip


def _numpy_heldout_accuracy(y_fit, p_fit, y_test, p_test, k, one_to_one=False):
    """The plain reference: the cluster -> label map of the fitted samples, applied to the
    held-out samples' clusters (a cluster the fit never used predicts nothing)."""
    n_labels = max(y_fit.max(), y_test.max()) + 1
    table = np.zeros((n_labels, k), dtype=np.int64)
    np.add.at(table, (y_fit, p_fit), 1)
    if one_to_one:
        rows, cols = linear_sum_assignment(table, maximize=True)
        mapping = np.full(k, -1)
        mapping[cols] = rows
    else:
        mapping = np.where(table.sum(axis=0) > 0, table.argmax(axis=0), -1)
    return float(np.mean(mapping[p_test] == y_test))


@pytest.mark.parametrize("k", [3, 10, 14])
def test_heldout_accuracy_uses_the_fitted_samples_map(k):
    rng = np.random.default_rng(k)
    y_fit, y_test = rng.integers(0, 10, 600), rng.integers(0, 10, 250)
    # Clusters that agree with the labels more often than not, one cluster unused by the fit.
    p_fit = np.where(rng.random(600) < 0.7, y_fit % k, rng.integers(0, k, 600))
    p_fit[p_fit == k - 1] = 0
    p_test = np.where(rng.random(250) < 0.6, y_test % k, rng.integers(0, k, 250))
    fitted = evaluate.contingency(y_fit, p_fit, k, n_labels=10)
    found = evaluate.compute_metrics(
        ["accuracy", "one_to_one_accuracy", "nmi"],
        inertia=0.0,
        n_samples=250,
        n_features=1,
        labels_true=da.from_array(y_test, chunks=64),
        labels_pred=da.from_array(p_test, chunks=64),
        n_clusters=k,
        fitted_contingency=fitted,
    )
    assert found["accuracy"] == pytest.approx(
        _numpy_heldout_accuracy(y_fit, p_fit, y_test, p_test, k), abs=1e-15
    )
    assert found["one_to_one_accuracy"] == pytest.approx(
        _numpy_heldout_accuracy(y_fit, p_fit, y_test, p_test, k, one_to_one=True), abs=1e-15
    )
    # Map-free scores are the held-out samples' own.
    assert found["nmi"] == pytest.approx(metrics.normalized_mutual_info_score(y_test, p_test))


def test_mixture_metrics_are_scikit_learns_definitions():
    from sklearn.mixture import GaussianMixture

    X = np.random.default_rng(0).normal(size=(300, 3))
    gm = GaussianMixture(3, random_state=0).fit(X)
    n_params = gm._n_parameters()
    found = evaluate.compute_metrics(
        evaluate.MIXTURE_METRICS,
        inertia=np.nan,
        n_samples=300,
        n_features=3,
        log_likelihood=gm.score(X),
        n_parameters=n_params,
    )
    assert found["bic"] == pytest.approx(gm.bic(X), rel=1e-12)
    assert found["aic"] == pytest.approx(gm.aic(X), rel=1e-12)
    assert found["log_likelihood"] == gm.score(X)
    with pytest.raises(ValueError, match="bic need a mixture"):
        evaluate.compute_metrics(["bic"], inertia=0.0, n_samples=3, n_features=1)
