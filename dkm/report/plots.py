"""Figures of a job's results, written as PNG files (matplotlib, headless)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # jobs run on servers without a display

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

__all__ = ["centroid_tiles", "inertia_curves", "metric_against_k"]


def centroid_tiles(
    centroids: np.ndarray,
    tile_shape: tuple[int, ...],
    path: str | Path,
    *,
    title: str = "",
    max_tiles: int = 256,
) -> Path:
    """Draw centroids as image tiles (patches or whole images) in a square grid.

    Parameters
    ----------
    centroids : ndarray (k, d)
        With ``d == prod(tile_shape)``, features in y, x[, channel] order.
    tile_shape : tuple
        ``(y, x)`` or ``(y, x, channel)``.
    max_tiles : int, default 256
        Draw at most this many (the first ones) so large-k runs stay legible.
    """
    centroids = np.asarray(centroids)
    if int(np.prod(tile_shape)) != centroids.shape[1]:
        raise ValueError(f"tile shape {tile_shape} does not hold {centroids.shape[1]} features")
    shown = centroids[:max_tiles]
    cols = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * 0.6 + 0.4, rows * 0.6 + 0.6), squeeze=False
    )
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, c in zip(axes.flat, shown, strict=False):
        tile = np.clip(c.reshape(tile_shape), 0, 1)
        ax.imshow(
            tile,
            cmap="gray" if len(tile_shape) == 2 else None,
            vmin=0,
            vmax=1,
            interpolation="nearest",
        )
    suffix = f" (first {max_tiles} of {len(centroids)})" if len(centroids) > max_tiles else ""
    fig.suptitle(f"{title}{suffix}", fontsize=9)
    return _save(fig, path)


def inertia_curves(histories: Mapping[str, xr.Dataset], path: str | Path) -> Path:
    """Inertia against iteration, one line per run."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, hist in histories.items():
        ax.plot(np.arange(1, hist.sizes["iteration"] + 1), hist["inertia"].values, label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("inertia")
    ax.set_yscale("log")
    if len(histories) <= 12:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def metric_against_k(sweep: xr.Dataset, metric: str, path: str | Path) -> Path:
    """A metric against k, with the elbow marked when the sweep has one."""
    fig, ax = plt.subplots(figsize=(6, 4))
    k = sweep["k"].values
    ax.plot(k, sweep[metric].values, "o-")
    if k.max() / max(k.min(), 1) >= 8:
        ax.set_xscale("log", base=2)
    knee = int(sweep.attrs.get("elbow_k", -1))
    if knee in k and metric == "inertia":
        ax.axvline(knee, color="tab:red", linestyle="--", label=f"elbow k={knee}")
        ax.legend()
    ax.set_xlabel("k (clusters)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
