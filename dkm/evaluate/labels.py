"""Clustering metrics against known labels, computed from a contingency table.

The table (true label x cluster counts) is the only thing that has to be gathered from the
cluster, so every metric here scales to any number of samples: it is built with one
``bincount`` pass over the (dask) label arrays.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from scipy.optimize import linear_sum_assignment

__all__ = [
    "adjusted_rand",
    "completeness",
    "confusion_matrices",
    "contingency",
    "homogeneity",
    "hungarian_labels",
    "majority_accuracy",
    "majority_labels",
    "nmi",
    "one_to_one_accuracy",
    "v_measure",
]


def contingency(
    labels_true: Any, labels_pred: Any, n_clusters: int, n_labels: int | None = None
) -> np.ndarray:
    """Counts of samples per (true label, cluster), as an ``(n_labels, n_clusters)`` array.

    Parameters
    ----------
    labels_true, labels_pred : array-like or dask array of non-negative ints
        Same length; computed lazily chunk by chunk when they are dask arrays.
    n_clusters : int
        Number of clusters (columns), so empty clusters still get a column.
    n_labels : int, optional
        Number of labels (rows); default the largest label + 1. Give it when tables of two
        splits must line up (a held-out split may lack the largest label).
    """
    y = da.asarray(labels_true).astype(np.int64)
    p = da.asarray(labels_pred).astype(np.int64)
    if y.shape != p.shape:
        raise ValueError(f"labels_true {y.shape} and labels_pred {p.shape} differ in shape")
    if n_labels is None:
        n_labels = int(y.max().compute()) + 1
    flat = da.bincount(y * n_clusters + p, minlength=n_labels * n_clusters)
    return np.asarray(flat.compute()).reshape(n_labels, n_clusters)


def majority_labels(table: np.ndarray) -> np.ndarray:
    """The label each cluster predicts under the majority vote: its most frequent label,
    -1 for a cluster without samples (it predicts nothing)."""
    mapping = table.argmax(axis=0).astype(np.int64)
    mapping[table.sum(axis=0) == 0] = -1
    return mapping


def _mapped_accuracy(table: np.ndarray, mapping: np.ndarray) -> float:
    """Fraction of the table's samples whose cluster maps to their label (-1: wrong)."""
    matched = mapping >= 0
    right = table[mapping[matched], np.flatnonzero(matched)].sum()
    return float(right / table.sum())


def majority_accuracy(table: np.ndarray, fitted: np.ndarray | None = None) -> float:
    """Each cluster predicts its most frequent label: the fraction predicted right.

    Parameters
    ----------
    table : ndarray of shape (n_labels, n_clusters)
        The :func:`contingency` table of the samples scored.
    fitted : ndarray of shape (n_labels, n_clusters), optional
        The table of the samples the model was fitted on, whose majority vote maps clusters
        to labels for held-out samples (default ``table`` itself).
    """
    return _mapped_accuracy(table, majority_labels(table if fitted is None else fitted))


def hungarian_labels(table: np.ndarray) -> np.ndarray:
    """The label each cluster stands for under the best one-to-one matching of clusters to
    labels (scipy's ``linear_sum_assignment`` on the counts), -1 for an unmatched cluster
    (more clusters than labels).

    Parameters
    ----------
    table : ndarray of shape (n_labels, n_clusters)
        A :func:`contingency` table.

    Returns
    -------
    ndarray of shape (n_clusters,), int64
    """
    rows, cols = linear_sum_assignment(table, maximize=True)
    mapping = np.full(table.shape[1], -1, dtype=np.int64)
    mapping[cols] = rows
    return mapping


def one_to_one_accuracy(table: np.ndarray, fitted: np.ndarray | None = None) -> float:
    """Best one-to-one matching of clusters to labels (Hungarian); samples of unmatched
    clusters (more clusters than labels) count as wrong.

    Parameters
    ----------
    table : ndarray of shape (n_labels, n_clusters)
        The :func:`contingency` table of the samples scored.
    fitted : ndarray of shape (n_labels, n_clusters), optional
        The table the matching is learned on (the fitted split's, for held-out samples;
        default ``table`` itself).
    """
    return _mapped_accuracy(table, hungarian_labels(table if fitted is None else fitted))


def confusion_matrices(labels_true: Any, labels_pred: Any, n_clusters: int) -> xr.Dataset:
    """The contingency table and the confusion matrix of the Hungarian-matched clustering.

    Both come from one :func:`contingency` pass on the cluster; the confusion matrix is the
    table with each cluster's column added to the column of the label it is matched to.

    Parameters
    ----------
    labels_true, labels_pred : array-like or dask array of non-negative ints
        The samples' labels and clusters, same length.
    n_clusters : int
        Number of clusters, so empty clusters still get a column.

    Returns
    -------
    xarray.Dataset
        ``contingency`` ``(label, cluster)``: samples per true label and cluster;
        ``confusion`` ``(label, predicted_label)``: samples per true label and label of their
        cluster under the matching, ``predicted_label = -1`` (the last column, present only
        when there are more clusters than labels) collecting the samples of unmatched
        clusters, so the
        trace over the total is ``one_to_one_accuracy``; ``cluster_label`` ``(cluster)``:
        the matched label of each cluster, -1 when unmatched. Equal to
        ``sklearn.metrics.confusion_matrix(labels_true, cluster_label[labels_pred])``.
    """
    table = contingency(labels_true, labels_pred, n_clusters)
    n_labels = table.shape[0]
    mapping = hungarian_labels(table)
    predicted = np.arange(n_labels + int((mapping < 0).any()))
    predicted[n_labels:] = -1
    confusion = np.zeros((n_labels, predicted.size), dtype=np.int64)
    # Unmatched clusters (-1) go to the last column, matched ones to their label's.
    np.add.at(confusion.T, np.where(mapping < 0, predicted.size - 1, mapping), table.T)
    return xr.Dataset(
        {
            "contingency": (("label", "cluster"), table),
            "confusion": (("label", "predicted_label"), confusion),
            "cluster_label": (("cluster",), mapping),
        },
        coords={
            "label": np.arange(n_labels),
            "cluster": np.arange(table.shape[1]),
            "predicted_label": predicted,
        },
    )


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _mutual_information(table: np.ndarray) -> float:
    n = table.sum()
    nz = table > 0
    outer = np.outer(table.sum(axis=1), table.sum(axis=0))
    return float((table[nz] / n * np.log(table[nz] * n / outer[nz])).sum())


def homogeneity(table: np.ndarray) -> float:
    """1 - H(label | cluster) / H(label), as :func:`sklearn.metrics.homogeneity_score`."""
    h_label = _entropy(table.sum(axis=1))
    if h_label == 0:
        return 1.0
    return float(_mutual_information(table) / h_label)


def completeness(table: np.ndarray) -> float:
    """1 - H(cluster | label) / H(cluster), as :func:`sklearn.metrics.completeness_score`."""
    h_cluster = _entropy(table.sum(axis=0))
    if h_cluster == 0:
        return 1.0
    return float(_mutual_information(table) / h_cluster)


def v_measure(table: np.ndarray) -> float:
    """Harmonic mean of homogeneity and completeness, as
    :func:`sklearn.metrics.v_measure_score`."""
    h, c = homogeneity(table), completeness(table)
    return 0.0 if h + c == 0 else float(2 * h * c / (h + c))


def adjusted_rand(table: np.ndarray) -> float:
    """Adjusted Rand index from the pair counts of the table, as
    :func:`sklearn.metrics.adjusted_rand_score`."""
    # Python integers: the pair counts reach n**2 and their products overflow int64.
    n = int(table.sum())
    squares = int((table.astype(object) ** 2).sum())
    rows = table.sum(axis=1).astype(object)
    cols = table.sum(axis=0).astype(object)
    # Ordered pairs of distinct samples: in the same cluster only, the same label only, both,
    # neither (scikit-learn's pair_confusion_matrix).
    same_cluster = int((table.astype(object) @ cols).sum()) - squares
    same_label = int((table.T.astype(object) @ rows).sum()) - squares
    together = squares - n
    apart = n * n - same_cluster - same_label - squares
    if same_cluster == 0 and same_label == 0:
        return 1.0
    numerator = 2.0 * (together * apart - same_label * same_cluster)
    denominator = (together + same_label) * (same_label + apart) + (together + same_cluster) * (
        same_cluster + apart
    )
    return float(numerator / denominator)


def nmi(table: np.ndarray) -> float:
    """Normalised mutual information with the arithmetic mean of the entropies
    (scikit-learn's default normalisation)."""
    h_label, h_cluster = _entropy(table.sum(axis=1)), _entropy(table.sum(axis=0))
    if h_label == 0 and h_cluster == 0:
        return 1.0
    denominator = (h_label + h_cluster) / 2
    return float(_mutual_information(table) / denominator) if denominator > 0 else 0.0
