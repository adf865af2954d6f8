"""Reconstruction error of a dictionary: every vector replaced by its nearest centroid."""

from __future__ import annotations

import numpy as np

__all__ = ["reconstruction_rmse"]


def reconstruction_rmse(inertia: float, n_samples: int, n_features: int) -> float:
    """Root mean squared error per feature of replacing each vector by its centroid.

    For patches in [0, 1] this is the per-pixel RMSE of the patch-dictionary reconstruction
    (each patch drawn as its nearest centroid).
    """
    return float(np.sqrt(inertia / (n_samples * n_features)))
