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


def sweep_table(
    ks: Sequence[int],
    metrics: Mapping[str, Sequence[float]],
    algorithms: Sequence[str] | None = None,
) -> xr.Dataset:
    """Metrics over ``k`` as a Dataset, with the inertia elbow in ``attrs["elbow_k"]``.

    Parameters
    ----------
    ks : sequence of int
        The k of each run.
    metrics : mapping of str to sequence of float
        Each metric's value per run (NaN where a run lacks it).
    algorithms : sequence of str, optional
        The algorithm of each run. When given, the table has dims ``(algorithm, k)`` (NaN
        where an algorithm did not run a k), ``attrs["elbows"]`` holds each algorithm's
        elbow and ``attrs["elbow_k"]`` the first algorithm's.
    """
    if algorithms is None:
        ds = xr.Dataset(
            {name: ("k", np.asarray(vals, dtype=float)) for name, vals in metrics.items()},
            coords={"k": np.asarray(ks, dtype=np.int64)},
        ).sortby("k")
        knee = _elbow_of(ds)
        ds.attrs["elbow_k"] = knee
    else:
        names = list(dict.fromkeys(algorithms))
        grid = np.asarray(sorted(set(int(k) for k in ks)), dtype=np.int64)
        # Object strings are stored as Zarr v3's variable-length strings (fixed-width
        # unicode has no v3 specification yet).
        ds = xr.Dataset(coords={"algorithm": np.array(names, dtype=object), "k": grid})
        for metric, values in metrics.items():
            table = np.full((len(names), len(grid)), np.nan)
            for algo, k, value in zip(algorithms, ks, values, strict=True):
                table[names.index(algo), np.searchsorted(grid, int(k))] = value
            ds[metric] = (("algorithm", "k"), table)
        elbows = {a: _elbow_of(ds.sel(algorithm=a).dropna("k", how="all")) for a in names}
        ds.attrs["elbows"] = elbows
        ds.attrs["elbow_k"] = elbows[names[0]]
    ds.attrs["elbow_method"] = "kneedle on log inertia (log k for wide sweeps)"
    return ds


def _elbow_of(ds: xr.Dataset) -> int:
    """The inertia elbow of a one-algorithm table, -1 when there is none."""
    if "inertia" not in ds:
        return -1
    knee = elbow(ds["k"].values.tolist(), ds["inertia"].values)
    return -1 if knee is None else knee
