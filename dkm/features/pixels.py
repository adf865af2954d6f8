"""Whole images as feature vectors: one row of pixel values in [0, 1] per image."""

from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["pixel_matrix"]


def pixel_matrix(images: xr.DataArray) -> xr.DataArray:
    """``pixels(sample, feature)`` float32, lazily: every image flattened (y, x[, channel])
    and uint8 values divided by 255, as patches are.

    Parameters
    ----------
    images : xarray.DataArray
        ``(sample, y, x[, channel])``, usually dask-backed from a dataset store.
    """
    n = images.sizes["sample"]
    flat = images.data.reshape(n, -1).astype(np.float32)
    if images.dtype == np.uint8:
        flat = flat / np.float32(255)
    coords = {"sample": images["sample"]} if "sample" in images.coords else {}
    return xr.DataArray(flat, dims=("sample", "feature"), coords=coords, name="pixels")
