"""Dask-parallel k-means: Lloyd, mini-batch, k-means|| and scikit-learn style estimators."""

from importlib import import_module

__all__ = ["KMeans", "MiniBatchKMeans", "kmeans_parallel"]

# Imported on first use: workers unpickle dkm.kmeans._kernels, which must not pull in the
# estimators (scikit-learn, xarray) with this package.
_API = {
    "KMeans": "dkm.kmeans.estimators",
    "MiniBatchKMeans": "dkm.kmeans.estimators",
    "kmeans_parallel": "dkm.kmeans.init",
}


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'dkm.kmeans' has no attribute {name!r}")
    value = getattr(import_module(_API[name]), name)
    globals()[name] = value
    return value
