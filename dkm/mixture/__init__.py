"""Dask-parallel Gaussian mixtures: EM with scikit-learn's API (:class:`GaussianMixture`)."""

from importlib import import_module

__all__ = ["GaussianMixture"]

# Imported on first use: workers unpickle dkm.mixture._kernels, which must not pull in the
# estimator (scikit-learn, scipy, xarray) with this package.
_API = {"GaussianMixture": "dkm.mixture.estimators"}


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'dkm.mixture' has no attribute {name!r}")
    value = getattr(import_module(_API[name]), name)
    globals()[name] = value
    return value
