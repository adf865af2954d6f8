"""Clustering metrics against known labels, computed from a contingency table.

The table (true label x cluster counts) is the only thing that has to be gathered from the
cluster, so every metric here scales to any number of samples: it is built with one
``bincount`` pass over the (dask) label arrays.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "contingency",
    "homogeneity",
    "majority_accuracy",
    "nmi",
    "one_to_one_accuracy",
]


def contingency(labels_true: Any, labels_pred: Any, n_clusters: int) -> np.ndarray:
    """Counts of samples per (true label, cluster), as an ``(n_labels, n_clusters)`` array.

    Parameters
    ----------
    labels_true, labels_pred : array-like or dask array of non-negative ints
        Same length; computed lazily chunk by chunk when they are dask arrays.
    n_clusters : int
        Number of clusters (columns), so empty clusters still get a column.
    """
    y = da.asarray(labels_true).astype(np.int64)
    p = da.asarray(labels_pred).astype(np.int64)
    if y.shape != p.shape:
        raise ValueError(f"labels_true {y.shape} and labels_pred {p.shape} differ in shape")
    n_labels = int(y.max().compute()) + 1
    flat = da.bincount(y * n_clusters + p, minlength=n_labels * n_clusters)
    return np.asarray(flat.compute()).reshape(n_labels, n_clusters)


def majority_accuracy(table: np.ndarray) -> float:
    """Each cluster predicts its most frequent label: the fraction predicted right."""
    return float(table.max(axis=0).sum() / table.sum())


def one_to_one_accuracy(table: np.ndarray) -> float:
    """Best one-to-one matching of clusters to labels (Hungarian); unmatched count as wrong."""
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


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


def nmi(table: np.ndarray) -> float:
    """Normalised mutual information with the arithmetic mean of the entropies
    (scikit-learn's default normalisation)."""
    h_label, h_cluster = _entropy(table.sum(axis=1)), _entropy(table.sum(axis=0))
    if h_label == 0 and h_cluster == 0:
        return 1.0
    denominator = (h_label + h_cluster) / 2
    return float(_mutual_information(table) / denominator) if denominator > 0 else 0.0
