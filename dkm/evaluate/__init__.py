"""Scoring a fitted model: the metric registry a job's ``evaluate`` list names.

Each metric is declared once here, with what it needs (labels of the samples, patch
features) and its definition; job validation, the runner and the README's metric table all
come from :data:`METRICS`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dkm.evaluate.labels import (
    contingency,
    homogeneity,
    majority_accuracy,
    nmi,
    one_to_one_accuracy,
)
from dkm.evaluate.reconstruction import reconstruction_rmse

__all__ = [
    "METRICS",
    "Metric",
    "compute_metrics",
    "contingency",
    "homogeneity",
    "majority_accuracy",
    "nmi",
    "one_to_one_accuracy",
    "reconstruction_rmse",
]


@dataclass(frozen=True)
class Metric:
    """A named score of a run: what it needs and what it means."""

    name: str
    definition: str
    needs_labels: bool = False
    needs_patches: bool = False
    needs_coding: bool = False


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "inertia",
            "sum over samples of the squared Euclidean distance to the nearest centroid "
            "(float64 accumulation; lower is better)",
        ),
        Metric(
            "reconstruction_error",
            "root mean squared error per patch feature when every patch is replaced by its "
            "nearest centroid: sqrt(inertia / (n_patches * n_features)), where n_patches "
            "counts every patch of the images, all-zero patches left out by drop_empty "
            "included (the null centroid rebuilds them exactly)",
            needs_patches=True,
        ),
        Metric(
            "image_mse",
            "mean squared error per pixel of whole images rebuilt from their patches (each "
            "patch replaced by its nearest centroid, all-zero patches by the null centroid "
            "under drop_empty, overlaps averaged), pixels in [0, 1]; recorded for every "
            "patch run",
            needs_patches=True,
        ),
        Metric("image_rmse", "sqrt(image_mse)", needs_patches=True),
        Metric(
            "sparse_image_mse",
            "image_mse with every patch rebuilt from its sparse code over the dictionary "
            "(the evaluate list's sparse_coding step)",
            needs_patches=True,
            needs_coding=True,
        ),
        Metric("sparse_image_rmse", "sqrt(sparse_image_mse)", needs_patches=True,
               needs_coding=True),
        Metric(
            "accuracy",
            "majority-vote accuracy: every cluster predicts the most frequent true label "
            "among its samples; the fraction of samples predicted right",
            needs_labels=True,
        ),
        Metric(
            "one_to_one_accuracy",
            "Hungarian accuracy: the best one-to-one matching of clusters to labels "
            "(scipy's linear_sum_assignment); samples of unmatched clusters count as wrong",
            needs_labels=True,
        ),
        Metric(
            "nmi",
            "normalised mutual information between clusters and labels, arithmetic-mean "
            "normalisation (scikit-learn's normalized_mutual_info_score)",
            needs_labels=True,
        ),
        Metric(
            "homogeneity",
            "1 - H(label | cluster) / H(label): 1 when every cluster holds one label only "
            "(scikit-learn's homogeneity_score)",
            needs_labels=True,
        ),
    )
}

_LABEL_SCORES = {
    "accuracy": majority_accuracy,
    "one_to_one_accuracy": one_to_one_accuracy,
    "nmi": nmi,
    "homogeneity": homogeneity,
}


def compute_metrics(
    names: Iterable[str],
    *,
    inertia: float,
    n_samples: int,
    n_features: int,
    labels_true: Any = None,
    labels_pred: Any = None,
    n_clusters: int | None = None,
) -> dict[str, float]:
    """The named metrics of one run.

    Label metrics share one contingency table, built with one ``bincount`` pass over the
    (dask) label arrays on the cluster.

    Raises
    ------
    ValueError
        A label metric without sample labels.
    """
    names = list(dict.fromkeys(names))
    out: dict[str, float] = {}
    if "inertia" in names:
        out["inertia"] = float(inertia)
    if "reconstruction_error" in names:
        out["reconstruction_error"] = reconstruction_rmse(inertia, n_samples, n_features)
    wanted = [m for m in names if METRICS[m].needs_labels]
    if wanted:
        if labels_true is None:
            raise ValueError(f"{', '.join(wanted)} need the samples' labels; the data has none")
        table = contingency(labels_true, labels_pred, n_clusters)
        out.update({m: _LABEL_SCORES[m](table) for m in wanted})
    return out
