"""Figures of a job's results, written as PNG files (matplotlib figures without pyplot)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dkm.report.metric_names import held_out_variants, metric_label, split_metric

__all__ = [
    "centroid_tiles",
    "confusion_heatmap",
    "image_error_against_k",
    "inertia_curves",
    "metric_against_k",
    "reconstruction_grid",
]


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
    shown = np.clip(centroids[:max_tiles], 0, 1).reshape(-1, *tile_shape)
    cols = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / cols)
    # One mosaic image (tiles on a white grid), drawn with one imshow: a grid of hundreds of
    # axes takes matplotlib seconds per figure.
    h, w = tile_shape[:2]
    channels = tile_shape[2:]
    mosaic = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, *channels), dtype=np.float32)
    for i, tile in enumerate(shown):
        r, c = divmod(i, cols)
        mosaic[1 + r * (h + 1) : (r + 1) * (h + 1), 1 + c * (w + 1) : (c + 1) * (w + 1)] = tile
    fig, ax = _subplots(figsize=(cols * 0.6 + 0.4, rows * 0.6 + 0.6))
    ax.set_axis_off()
    ax.imshow(
        mosaic,
        cmap="gray" if not channels else None,
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    suffix = f" (first {max_tiles} of {len(centroids)})" if len(centroids) > max_tiles else ""
    fig.suptitle(f"{title}{suffix}", fontsize=9)
    return _save(fig, path)


def inertia_curves(histories: Mapping[str, xr.Dataset], path: str | Path) -> Path:
    """Inertia against iteration, one line per run.

    Full-pass runs (Lloyd) record the inertia of every iteration; mini-batch runs record the
    smoothed inertia per sample of their batches (``ewa_inertia``), on another scale, so
    those are drawn on a second axes beside the first; Gaussian mixtures record their
    lower bound (a mean log-likelihood, often negative: a linear axis) on a third.
    """
    panels = [
        ("inertia", "iteration", "inertia", "log"),
        ("ewa_inertia", "mini-batch step", "smoothed batch inertia per sample", "log"),
        ("lower_bound", "EM iteration", "lower bound per sample", "linear"),
    ]
    drawn = [
        (var, xlabel, ylabel, scale, {n: h for n, h in histories.items() if var in h})
        for var, xlabel, ylabel, scale in panels
    ]
    drawn = [panel for panel in drawn if panel[4]] or [(*panels[0], {})]
    fig, axes = _subplots(1, len(drawn), figsize=(6 * len(drawn), 4), squeeze=False)
    for ax, (var, xlabel, ylabel, scale, runs) in zip(axes[0], drawn, strict=True):
        for name, hist in runs.items():
            ax.plot(np.arange(1, hist.sizes["iteration"] + 1), hist[var].values, label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yscale(scale)
        if 0 < len(runs) <= 12:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


_Line = tuple[str | None, np.ndarray, np.ndarray]


def _colors(sweep: xr.Dataset) -> dict[str | None, str]:
    """One colour per algorithm of the sweep, the same in every figure and for a metric's
    held-out variant (an algorithm lacking one metric does not shift the others)."""
    if "algorithm" not in sweep.dims:
        return {None: "C0"}
    return {str(a): f"C{i}" for i, a in enumerate(sweep["algorithm"].values)}


# How a metric's held-out variant is drawn beside it: the same colour, dotted, open markers.
_HELD_OUT = {"linestyle": ":", "markerfacecolor": "white"}


def _held_out_label(label: str | None, split: str) -> str:
    return f"({split})" if label is None else f"{label} ({split})"


def _by_algorithm(sweep: xr.Dataset, metric: str) -> list[_Line]:
    """``(algorithm, k, values)`` per line of a sweep: one per algorithm when the sweep has an
    ``algorithm`` dim (the k an algorithm did not run, NaN, left out), else one unnamed line."""
    k = sweep["k"].values
    if "algorithm" not in sweep[metric].dims:
        values = sweep[metric].values.astype(float)
        keep = np.isfinite(values)
        return [(None, k[keep], values[keep])]
    lines = []
    for algorithm in sweep["algorithm"].values:
        values = sweep[metric].sel(algorithm=algorithm).values.astype(float)
        keep = np.isfinite(values)
        if keep.any():
            lines.append((str(algorithm), k[keep], values[keep]))
    return lines


def _elbows(sweep: xr.Dataset) -> dict[str | None, int]:
    """The inertia elbow of each algorithm (``attrs["elbows"]``), or of the one-algorithm
    sweep (``attrs["elbow_k"]``); algorithms without one are left out."""
    found = sweep.attrs.get("elbows")
    if "algorithm" in sweep.dims and isinstance(found, dict):
        return {str(a): int(k) for a, k in found.items() if int(k) > 0}
    knee = int(sweep.attrs.get("elbow_k", -1))
    return {None: knee} if knee > 0 else {}


def _k_axis(ax: Axes, sweep: xr.Dataset) -> None:
    k = sweep["k"].values
    if len(k) and k.max() / max(k.min(), 1) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("k (clusters)")
    ax.grid(alpha=0.3)


def metric_against_k(sweep: xr.Dataset, metric: str, path: str | Path) -> Path:
    """A metric against k, one line per algorithm, with each inertia elbow marked, and
    beside each line the metric on held-out samples when the sweep has it (``test_accuracy``
    beside ``accuracy``: same colour, dotted, labelled ``(test)``).

    Parameters
    ----------
    sweep : xarray.Dataset
        The sweep table: dims ``(algorithm, k)``, or ``k`` alone (one algorithm).
    metric : str
        One of its variables.
    path : path-like
        The PNG to write.
    """
    fig, ax = _subplots(figsize=(6, 4))
    elbows = _elbows(sweep) if metric == "inertia" else {}
    colors = _colors(sweep)
    for algorithm, k, values in _by_algorithm(sweep, metric):
        color = colors[algorithm]
        ax.plot(k, values, "o-", color=color, label=algorithm)
        knee = elbows.get(algorithm, -1)
        if knee in k:
            who = f"{algorithm} " if algorithm else ""
            ax.axvline(knee, color=color, linestyle="--", label=f"{who}elbow k={knee}")
    for variant in held_out_variants(metric, sweep.data_vars):
        split = split_metric(variant)[1]
        for algorithm, k, values in _by_algorithm(sweep, variant):
            label = _held_out_label(algorithm, split)
            ax.plot(k, values, marker="o", color=colors[algorithm], label=label, **_HELD_OUT)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _k_axis(ax, sweep)
    ax.set_ylabel(metric_label(metric).replace("_", " "))
    return _save(fig, path)


def image_error_against_k(sweep: xr.Dataset, path: str | Path) -> Path:
    """Per-pixel RMSE of the reconstructed images against k, one colour per algorithm:
    nearest-centroid reconstruction (``image_rmse``, solid) and, when the sweep has it,
    sparse coding over the same dictionary (``sparse_image_rmse``, dashed); the same on
    held-out images (``test_image_rmse``...) dotted with open markers.

    Parameters
    ----------
    sweep : xarray.Dataset
        The sweep table with ``image_rmse`` (and optionally ``sparse_image_rmse``).
    path : path-like
        The PNG to write.
    """
    if "image_rmse" not in sweep:
        raise ValueError("the sweep has no image_rmse")
    fig, ax = _subplots(figsize=(6, 4))
    colors = _colors(sweep)
    styles = [("image_rmse", "o-", "nearest centroid"), ("sparse_image_rmse", "s--", "sparse")]
    for metric, style, how in styles:
        if metric not in sweep:
            continue
        for algorithm, k, values in _by_algorithm(sweep, metric):
            label = how if algorithm is None else f"{algorithm}, {how}"
            ax.plot(k, values, style, color=colors[algorithm], label=label)
        for variant in held_out_variants(metric, sweep.data_vars):
            split = split_metric(variant)[1]
            for algorithm, k, values in _by_algorithm(sweep, variant):
                label = how if algorithm is None else f"{algorithm}, {how}"
                ax.plot(
                    k,
                    values,
                    marker=style[0],
                    color=colors[algorithm],
                    label=_held_out_label(label, split),
                    **_HELD_OUT,
                )
    ax.legend(fontsize=8)
    _k_axis(ax, sweep)
    ax.set_ylabel("image RMSE per pixel")
    return _save(fig, path)


def confusion_heatmap(
    counts: Any,
    path: str | Path,
    *,
    rows: Sequence[str],
    columns: Sequence[str],
    xlabel: str,
    ylabel: str = "true label",
    title: str = "",
    annotate_max: int = 20,
) -> Path:
    """A matrix of counts as a heatmap, each cell annotated with its count when the matrix
    is at most ``annotate_max`` on each side (past that the numbers do not fit).

    Parameters
    ----------
    counts : array-like (row, column)
        Non-negative counts, e.g. samples per true label and cluster.
    path : path-like
        The PNG to write.
    rows, columns : sequence of str
        Tick names, one per row and per column.
    xlabel, ylabel : str
        Axis labels (columns, rows).
    title : str, optional
        Drawn above the matrix.
    annotate_max : int, default 20
        Write the counts in the cells up to this many rows and columns.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape != (len(rows), len(columns)):
        raise ValueError(
            f"counts of shape {counts.shape} do not match {len(rows)} rows and "
            f"{len(columns)} columns"
        )
    n_rows, n_cols = counts.shape
    fig, ax = _subplots(figsize=(min(0.42 * n_cols + 2.6, 16), min(0.36 * n_rows + 2.0, 12)))
    image = ax.imshow(counts, cmap="Blues", vmin=0, aspect="auto", interpolation="nearest")
    longest = max((len(c) for c in columns), default=0)
    rotation = 90 if longest > 3 else 0  # "3 (T-shirt/top)" reads upwards
    ax.set_xticks(np.arange(n_cols), labels=list(columns), fontsize=7, rotation=rotation)
    ax.set_yticks(np.arange(n_rows), labels=list(rows), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if max(n_rows, n_cols) <= annotate_max:
        # Dark text on light cells, light text on dark ones.
        light = counts > 0.5 * max(int(counts.max()), 1)
        for (r, c), value in np.ndenumerate(counts):
            color = "white" if light[r, c] else "black"
            ax.text(c, r, str(int(value)), ha="center", va="center", fontsize=6, color=color)
    else:
        fig.colorbar(image, ax=ax, shrink=0.8, label="samples")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def reconstruction_grid(
    originals: Any,
    reconstructions: Any,
    path: str | Path,
    *,
    n: int = 16,
    title: str = "",
    columns: int = 8,
) -> Path:
    """Originals above their reconstructions: rows of up to ``columns`` images, each row of
    originals followed by the row of their reconstructions.

    Parameters
    ----------
    originals, reconstructions : array-like (image, y, x[, channel])
        Pixels in [0, 1] (reconstructions are clipped to it; NaN, a pixel no patch covers,
        is drawn blank). One channel is drawn in gray, three as colour.
    path : path-like
        The PNG to write.
    n : int, default 16
        Draw the first ``n`` images (all when there are fewer).
    title : str, optional
        Drawn above the grid.
    columns : int, default 8
        Images per row.
    """
    originals = np.asarray(originals)[:n]
    reconstructions = np.asarray(reconstructions)[:n]
    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"originals {originals.shape} and reconstructions {reconstructions.shape} differ"
        )
    if originals.ndim not in (3, 4) or len(originals) == 0:
        raise ValueError(f"expected (image, y, x[, channel]) images, got {originals.shape}")
    shown = len(originals)
    cols = min(columns, shown)
    pairs = math.ceil(shown / cols)
    height, width = originals.shape[1:3]
    cell = 1.0  # inches per image, whatever its pixels: 100 px at the dpi of _save
    fig, axes = _subplots(
        2 * pairs,
        cols,
        figsize=(cols * cell * width / max(height, width) + 1.2, 2 * pairs * cell + 0.6),
        squeeze=False,
    )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for i in range(shown):
        row, col = divmod(i, cols)
        for offset, image in ((0, originals[i]), (1, reconstructions[i])):
            _draw(axes[2 * row + offset, col], image)
    for row in range(pairs):
        axes[2 * row, 0].set_ylabel("original", fontsize=7)
        axes[2 * row + 1, 0].set_ylabel("reconstructed", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _draw(ax: Axes, image: np.ndarray) -> None:
    image = np.clip(image.astype(np.float32), 0, 1)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3:  # RGB: imshow has no vmin/vmax for colour, NaN must not reach it
        ax.imshow(np.nan_to_num(image, nan=1.0), interpolation="nearest")
    else:
        ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _subplots(*grid: int, figsize: tuple[float, float], **kwargs: Any):
    """A figure and its axes without pyplot: drawing a report never switches the backend
    of the process (a notebook that runs a job keeps showing its own figures) and needs no
    display."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kwargs)
