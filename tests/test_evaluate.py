"""Label metrics from a contingency table equal scikit-learn's on the same labels."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
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
