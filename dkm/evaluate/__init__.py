"""Scoring a fitted model: the metric registry a job's ``evaluate`` list names.

Each metric is declared once here, with what it needs (labels of the samples, the feature
matrix, patch features) and its definition; job validation, the runner and the README's
metric table all come from :data:`METRICS`. The confusion matrices of a labelled run are a
result, not a score: :func:`confusion_matrices`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dkm.evaluate.geometry import (
    SILHOUETTE_RULES,
    SILHOUETTE_SAMPLE,
    calinski_harabasz,
    davies_bouldin,
    geometry_metrics,
    sample_rows,
    silhouette,
)
from dkm.evaluate.labels import (
    adjusted_rand,
    completeness,
    confusion_matrices,
    contingency,
    homogeneity,
    hungarian_labels,
    majority_accuracy,
    majority_labels,
    nmi,
    one_to_one_accuracy,
    v_measure,
)
from dkm.evaluate.reconstruction import reconstruction_rmse

__all__ = [
    "METRICS",
    "MIXTURE_METRICS",
    "SILHOUETTE_RULES",
    "SILHOUETTE_SAMPLE",
    "Metric",
    "adjusted_rand",
    "calinski_harabasz",
    "completeness",
    "compute_metrics",
    "confusion_matrices",
    "contingency",
    "davies_bouldin",
    "geometry_metrics",
    "homogeneity",
    "hungarian_labels",
    "majority_accuracy",
    "majority_labels",
    "nmi",
    "one_to_one_accuracy",
    "reconstruction_rmse",
    "sample_rows",
    "silhouette",
    "v_measure",
]


@dataclass(frozen=True)
class Metric:
    """A named score of a run: what it needs and what it means.

    ``needs_labels``: the samples' true labels; ``needs_features``: the feature matrix and
    every row's cluster (a pass over the features on the cluster); ``needs_patches``: patch
    features; ``needs_coding``: the evaluate list's sparse_coding step; ``needs_mixture``: a
    probabilistic model (``model.algorithm: gmm``), whose runs record it always.
    """

    name: str
    definition: str
    needs_labels: bool = False
    needs_patches: bool = False
    needs_coding: bool = False
    needs_features: bool = False
    needs_mixture: bool = False


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
        Metric(
            "sparse_image_rmse", "sqrt(sparse_image_mse)", needs_patches=True, needs_coding=True
        ),
        Metric(
            "accuracy",
            "majority-vote accuracy: every cluster predicts the most frequent true label "
            "among its samples; the fraction of samples predicted right. On a held-out split "
            "(evaluate.on) the vote is the fitted split's",
            needs_labels=True,
        ),
        Metric(
            "one_to_one_accuracy",
            "Hungarian accuracy: the best one-to-one matching of clusters to labels "
            "(scipy's linear_sum_assignment). With more clusters than labels only as many "
            "clusters as labels are matched and the samples of the others count as wrong, so "
            "it is a lower bound that falls with k (the report says so); with fewer, some "
            "labels are never predicted",
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
        Metric(
            "completeness",
            "1 - H(cluster | label) / H(cluster): 1 when every label lies in one cluster only "
            "(scikit-learn's completeness_score)",
            needs_labels=True,
        ),
        Metric(
            "v_measure",
            "harmonic mean of homogeneity and completeness (scikit-learn's v_measure_score)",
            needs_labels=True,
        ),
        Metric(
            "ari",
            "adjusted Rand index: agreement of clusters and labels over pairs of samples, "
            "0 for a random clustering and 1 for a perfect one (scikit-learn's "
            "adjusted_rand_score)",
            needs_labels=True,
        ),
        Metric(
            "j_clust",
            "inertia / n_samples: the mean squared Euclidean distance of a sample to its "
            "nearest centroid (the 1000-digit study's J_clust); for patches n_samples counts "
            "the all-zero patches left out by drop_empty, as reconstruction_error does",
        ),
        Metric(
            "silhouette",
            "mean silhouette coefficient (b - a) / max(a, b), a the mean distance to the "
            "sample's own cluster and b to the nearest other cluster, over a seeded sample of "
            "10,000 rows drawn independently of the chunking (all rows when there are no "
            "more); scikit-learn's silhouette_score of the sampled rows",
            needs_features=True,
        ),
        Metric(
            "calinski_harabasz",
            "between-cluster over within-cluster dispersion, each per degree of freedom, over "
            "all rows (scikit-learn's calinski_harabasz_score; higher is better)",
            needs_features=True,
        ),
        Metric(
            "davies_bouldin",
            "mean over clusters of the largest (s_i + s_j) / d_ij, s the mean distance of a "
            "cluster's samples to its mean and d the distance between cluster means, over all "
            "rows (scikit-learn's davies_bouldin_score, to 1e-6 relative; lower is better)",
            needs_features=True,
        ),
        Metric(
            "log_likelihood",
            "mean log-likelihood of a sample under the mixture (scikit-learn's "
            "GaussianMixture.score; higher is better)",
            needs_mixture=True,
        ),
        Metric(
            "bic",
            "Bayesian information criterion -2 n log_likelihood + p ln n, p the mixture's "
            "free parameters (scikit-learn's bic; lower is better)",
            needs_mixture=True,
        ),
        Metric(
            "aic",
            "Akaike information criterion -2 n log_likelihood + 2 p (scikit-learn's aic; "
            "lower is better)",
            needs_mixture=True,
        ),
    )
}

MIXTURE_METRICS = tuple(m for m, info in METRICS.items() if info.needs_mixture)

_MAPPED_SCORES = {"accuracy": majority_accuracy, "one_to_one_accuracy": one_to_one_accuracy}
_LABEL_SCORES = {
    "nmi": nmi,
    "homogeneity": homogeneity,
    "completeness": completeness,
    "v_measure": v_measure,
    "ari": adjusted_rand,
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
    X: Any = None,
    centroids: Any = None,
    silhouette_sample: int = SILHOUETTE_SAMPLE,
    random_state: Any = 0,
    fitted_contingency: np.ndarray | None = None,
    log_likelihood: float | None = None,
    n_parameters: int | None = None,
) -> dict[str, float]:
    """The named metrics of one run, on the samples it was fitted on or on held-out ones.

    Label metrics share one contingency table, built with one ``bincount`` pass over the
    (dask) label arrays on the cluster. Feature metrics share one pass over ``X``
    (:func:`geometry_metrics`; Davies-Bouldin a second one unless ``centroids`` are the
    cluster means).

    Parameters
    ----------
    names : iterable of str
        Names in :data:`METRICS`.
    inertia : float
        The fit's inertia.
    n_samples, n_features : int
        Vectors scored (for patches, including those ``drop_empty`` left out) and their
        length.
    labels_true : array-like or dask array, optional
        The samples' labels (label metrics).
    labels_pred : array-like or dask array, optional
        Every row's cluster (label and feature metrics).
    n_clusters : int, optional
        Number of clusters.
    X : array-like, dask array or xarray.DataArray, optional
        The clustered features (feature metrics).
    centroids : array-like of shape (n_clusters, n_features), optional
        The model's centroids (spare Davies-Bouldin a pass at convergence).
    silhouette_sample : int, default 10,000
        Rows the silhouette is computed on (all rows when there are no more).
    random_state : int, RandomState or None, default 0
        Seed of the silhouette's sample.
    fitted_contingency : ndarray of shape (n_labels, n_clusters), optional
        For held-out samples: the contingency table of the fitted ones, whose majority vote
        and Hungarian matching map clusters to labels (default the scored samples' own).
    log_likelihood : float, optional
        A mixture's mean log-likelihood per scored sample (mixture metrics).
    n_parameters : int, optional
        The mixture's free parameters (BIC, AIC).

    Raises
    ------
    ValueError
        An unknown name, a label metric without sample labels or a feature metric without
        ``X`` and ``labels_pred``, checked before anything is computed.
    """
    names = list(dict.fromkeys(names))
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(
            f"unknown metric(s) {', '.join(map(repr, unknown))} (expected: {', '.join(METRICS)})"
        )
    wanted = [m for m in names if METRICS[m].needs_labels]
    if wanted and labels_true is None:
        raise ValueError(f"{', '.join(wanted)} need the samples' labels; the data has none")
    geometry = [m for m in names if METRICS[m].needs_features]
    if geometry and (X is None or labels_pred is None):
        raise ValueError(
            f"{', '.join(geometry)} need the feature matrix X and every row's cluster labels_pred"
        )
    mixture = [m for m in names if METRICS[m].needs_mixture]
    if mixture and (log_likelihood is None or n_parameters is None):
        raise ValueError(f"{', '.join(mixture)} need a mixture's log-likelihood and size")
    out: dict[str, float] = {}
    if "log_likelihood" in names:
        out["log_likelihood"] = float(log_likelihood)
    if "bic" in names:
        out["bic"] = -2 * log_likelihood * n_samples + n_parameters * math.log(n_samples)
    if "aic" in names:
        out["aic"] = -2 * log_likelihood * n_samples + 2 * n_parameters
    if "inertia" in names:
        out["inertia"] = float(inertia)
    if "reconstruction_error" in names:
        out["reconstruction_error"] = reconstruction_rmse(inertia, n_samples, n_features)
    if "j_clust" in names:
        out["j_clust"] = float(inertia) / n_samples
    if wanted:
        n_labels = None if fitted_contingency is None else fitted_contingency.shape[0]
        table = contingency(labels_true, labels_pred, n_clusters, n_labels)
        for m in wanted:
            if m in _MAPPED_SCORES:  # a map from clusters to labels, learned on the fit
                out[m] = _MAPPED_SCORES[m](table, fitted_contingency)
            else:
                out[m] = _LABEL_SCORES[m](table)
    if geometry:
        out.update(
            geometry_metrics(
                geometry,
                X,
                labels_pred,
                n_clusters=n_clusters,
                centroids=centroids,
                silhouette_sample=silhouette_sample,
                random_state=random_state,
            )
        )
    return out
