"""Dask-parallel k-means: Lloyd, mini-batch, k-means|| and scikit-learn style estimators."""

from dkm.kmeans.estimators import KMeans, MiniBatchKMeans
from dkm.kmeans.init import kmeans_parallel

__all__ = ["KMeans", "MiniBatchKMeans", "kmeans_parallel"]
