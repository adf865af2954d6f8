"""Cluster-count sweeps: the metrics-over-k table and the elbow (knee) estimate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

__all__ = ["elbow", "sweep_table"]


def elbow(ks: Sequence[int], values: Sequence[float]) -> int | None:
    """The k at the knee of a decreasing curve such as inertia against k.

    Kneedle-style: both axes are scaled to [0, 1] and the knee is the point farthest below
    the straight line joining the first and last points. Positive values are taken on a log
    scale (inertia falls by orders of magnitude, and on a linear scale the first steep drops
    hide the knee), and so is k when the sweep spans a factor of 8 or more, as log2 sweeps do.

    Returns
    -------
    int or None
        None when there are fewer than three points or the curve has no knee (a straight
        or concave line).
    """
    if len(ks) != len(values):
        raise ValueError(f"{len(ks)} k values but {len(values)} metric values")
    order = np.argsort(ks)
    k = np.asarray(ks, dtype=float)[order]
    y = np.asarray(values, dtype=float)[order]
    if len(k) < 3 or not np.all(np.isfinite(y)) or y[0] == y[-1]:
        return None
    x = np.log(k) if k[-1] / k[0] >= 8 else k
    if np.all(y > 0):
        y = np.log(y)
    xn = (x - x[0]) / (x[-1] - x[0])
    yn = (y - y.min()) / (y.max() - y.min())
    below = (1 - xn) - yn if y[0] > y[-1] else xn - yn
    best = int(np.argmax(below))
    if below[best] <= 1e-12:
        return None
    return int(k[best])


def sweep_table(ks: Sequence[int], metrics: Mapping[str, Sequence[float]]) -> xr.Dataset:
    """Metrics over ``k`` as a Dataset, with the inertia elbow in ``attrs["elbow_k"]``."""
    ds = xr.Dataset(
        {name: ("k", np.asarray(vals, dtype=float)) for name, vals in metrics.items()},
        coords={"k": np.asarray(ks, dtype=np.int64)},
    ).sortby("k")
    knee = elbow(ds["k"].values.tolist(), ds["inertia"].values) if "inertia" in ds else None
    ds.attrs["elbow_k"] = -1 if knee is None else knee
    ds.attrs["elbow_method"] = "kneedle on log inertia (log k for wide sweeps)"
    return ds
