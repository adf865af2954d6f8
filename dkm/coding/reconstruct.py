"""Whole images rebuilt from a patch dictionary, and their error.

Every window of the layout's grid is cut from the image, replaced by its nearest centroid (or
by its sparse code over the unit atoms), and the windows are put back where they came from,
overlapping ones averaged: the conventions of :func:`dkm.features.stitch_patches`, on a full
grid. One dask task per block of images does all of it, so the patch matrix of the whole set
never exists; the nearest centroid comes from the tiled kernel the models use
(:func:`dkm._parallel.kernels.assign`), so 16384 centroids cost a tile, not a
``patches x k`` matrix.

With ``drop_empty`` in the layout, all-zero windows are drawn as zeros (the null centroid:
they were never clustered) instead of as their nearest centroid. With ``normalize="l2"``
each window is scaled to unit norm before the assignment or encoding and its reconstruction
scaled back by the window's norm; all-zero windows stay zero.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from dkm import config
from dkm._parallel.kernels import Tiles, assign, pack_centers
from dkm._validation import Interval
from dkm.coding.sparse import (
    SparseCoding,
    check_normalize,
    checked_atoms,
    checked_dictionary,
    code_tiles,
    coded_patches_per_block,
    unit_rows,
)
from dkm.data.store import rows_per_chunk
from dkm.features.patches import PatchGrid, PatchLayout, _windows

__all__ = ["image_error", "reconstruct_images"]

_DIMS = ("image", "y", "x", "channel")


def _as_images(images: Any) -> tuple[da.Array, np.ndarray]:
    """The images as a dask array and the id of each image (its ``sample`` value)."""
    ids = None
    if isinstance(images, xr.DataArray):
        first = images.dims[0] if images.dims else None
        if first is not None and first in images.coords:
            ids = np.asarray(images.coords[first].values)
        images = images.data
    if not isinstance(images, da.Array):
        images = np.asarray(images)
        if images.ndim in (3, 4):
            images = da.from_array(images, chunks=(max(1, len(images)), *images.shape[1:]))
    if images.ndim not in (3, 4):
        raise ValueError(
            f"images must be (sample, y, x) or (sample, y, x, channel), got "
            f"{images.ndim}-D of shape {images.shape}"
        )
    if not np.issubdtype(images.dtype, np.number) and images.dtype != bool:
        raise ValueError(f"images must be numeric, got {images.dtype}")
    if np.issubdtype(images.dtype, np.complexfloating):
        raise ValueError(f"images must be real numbers, got {images.dtype}")
    if ids is None or ids.shape != (images.shape[0],):
        ids = np.arange(images.shape[0], dtype=np.int64)
    return images, ids


def _images_per_block(grid: PatchGrid, n_images: int, coded: bool) -> int:
    """Images per task: the block's patches, their reconstructions and the stitch buffers
    together about ``dkm.store.feature-chunk-bytes``, at most
    ``dkm.store.stitch-images-per-block`` images; with sparse coding at most
    ``dkm.coding.patches-per-block`` patches (encoding is slow)."""
    patch_bytes = grid.per_image * grid.n_features * 4
    stitch_bytes = grid.padded[0] * grid.padded[1] * max(1, grid.channels) * 8
    per_image = 3 * patch_bytes + 2 * stitch_bytes
    target = config.get_bytes("store.feature-chunk-bytes")
    most = int(config.get("store.stitch-images-per-block"))
    if coded:
        most = min(most, max(1, coded_patches_per_block() // grid.per_image))
    return min(most, rows_per_chunk(per_image, n_images, target))


def _fold(values: np.ndarray, n_images: int, grid: PatchGrid) -> np.ndarray:
    """Average a full grid of window vectors back into images (``stitch_patches``' rule).

    Sums in float64, divides by the number of grid windows covering each pixel, NaN where
    none does, then crops the padding. Adds one window offset ``(dy, dx)`` at a time: for a
    fixed offset the windows hit distinct pixels, so each ``+=`` is one strided slice over
    every window of the block (``size**2`` numpy calls instead of one per grid position).
    """
    k, s, ch = grid.size, grid.stride, grid.channels
    (hp, wp), nr, nc = grid.padded, grid.n_rows, grid.n_cols
    tail = (ch,) if ch else ()
    windows = values.reshape((n_images, nr, nc, k, k, *tail))
    total = np.zeros((n_images, hp, wp, *tail), dtype=np.float64)
    cover = np.zeros((hp, wp), dtype=np.float64)
    for dy in range(k):
        ys = slice(dy, dy + (nr - 1) * s + 1, s)
        for dx in range(k):
            xs = slice(dx, dx + (nc - 1) * s + 1, s)
            total[:, ys, xs] += windows[:, :, :, dy, dx]
            cover[ys, xs] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / (cover[:, :, None] if ch else cover)
    p = grid.pad
    return mean[:, p : hp - p, p : wp - p].astype(np.float32)


def _reconstruct_block(
    block: np.ndarray,
    grid: PatchGrid,
    dictionary: np.ndarray,
    packed: np.ndarray | None,
    coding: SparseCoding | None,
    atoms: np.ndarray | None,
    drop_empty: bool,
    normalize: str | None,
    tiles: Tiles,
) -> np.ndarray:
    """One block of images rebuilt: cut every window, replace it, average back."""
    x = _windows(block, grid).astype(np.float32)
    if block.dtype == np.uint8:  # extract_patches' scale: pixel / 255
        x /= np.float32(255)
    norms = None
    if normalize == "l2":
        x, norms = unit_rows(x)
    if coding is None:
        labels, _ = assign(x, packed, tiles, want_d2=False)
        out = dictionary[labels]
    else:
        out = np.zeros_like(x)
        for rows, codes in code_tiles(x, atoms, coding, tiles):
            out[rows] = codes @ atoms
    if norms is not None:
        out *= norms[:, None]
    if drop_empty:  # never clustered: the null centroid, whatever is nearest
        out[~x.any(axis=1)] = 0
    return _fold(out, block.shape[0], grid)


def reconstruct_images(
    images: xr.DataArray | da.Array | np.ndarray,
    dictionary: np.ndarray,
    layout: PatchLayout,
    *,
    coding: SparseCoding | None = None,
    images_per_block: int | None = None,
) -> xr.Dataset:
    """Rebuild whole images from a patch dictionary, lazily, one task per block of images.

    Parameters
    ----------
    images : DataArray, dask array or ndarray
        ``(sample, y, x)`` or ``(sample, y, x, channel)``; uint8 pixels are divided by 255,
        other dtypes taken as already in [0, 1] (as :func:`dkm.extract_patches` does).
    dictionary : ndarray
        ``(k, size * size * channels)`` in the patches' space, e.g. k-means centroids.
    layout : PatchLayout
        How the dictionary's patches were cut. ``drop_empty``: all-zero windows are drawn as
        zeros. ``normalize="l2"`` (when the layout has that field): windows are matched at
        unit norm and scaled back. Sampling fields (``patches_per_image``) are ignored: every
        window of the grid is rebuilt.
    coding : SparseCoding, optional
        Encode each window over the unit-norm atoms (:func:`dkm.coding.encode_patches`) and
        draw ``code @ atoms`` instead of the nearest centroid.
    images_per_block : int, optional
        Images per task. Default: the block's patches and buffers about
        ``dkm.store.feature-chunk-bytes``, at most ``dkm.store.stitch-images-per-block``
        images, and with ``coding`` at most ``dkm.coding.patches-per-block`` (4096) patches.

    Returns
    -------
    xarray.Dataset
        Dask-backed, coordinate ``image`` (the samples' index values):
        ``reconstructions(image, y, x[, channel])`` float32 in [0, 1] scale, NaN at pixels no
        window covers (possible when ``stride > size``); ``originals(image, y, x[, channel])``
        float32 in [0, 1]; ``image_mse(image)`` float64, the mean over the pixels (and
        channels) a window covers of ``(original - reconstruction) ** 2``.

    Raises
    ------
    ValueError
        Before any compute: images not 3-D/4-D or not numeric, images the layout cannot cut,
        a dictionary that is not ``(k, size * size * channels)`` or not finite, a coding the
        dictionary cannot support, an unknown ``normalize``.
    """
    data, ids = _as_images(images)
    if not isinstance(layout, PatchLayout):
        raise ValueError(f"layout must be a PatchLayout, got {type(layout).__name__}")
    if images_per_block is not None and not Interval(int, 1).accepts(images_per_block):
        raise ValueError(f"images_per_block must be an integer >= 1, got {images_per_block!r}")
    if coding is not None and not isinstance(coding, SparseCoding):
        raise ValueError(f"coding must be a SparseCoding or None, got {type(coding).__name__}")
    try:
        grid = layout.grid(tuple(data.shape[1:]))
    except ValueError as err:
        raise ValueError(f"images of shape {tuple(data.shape[1:])}: {err}") from None
    normalize = check_normalize(getattr(layout, "normalize", None))
    what = f"{layout.tag} windows of {tuple(data.shape[1:])} images have"
    if coding is None:
        d = checked_dictionary(dictionary, grid.n_features, what).astype(np.float32)
        packed, atoms = pack_centers(d, np.dtype(np.float32)), None
    else:
        atoms, _ = checked_atoms(dictionary, grid.n_features, coding, what)
        d = packed = None

    step = images_per_block or _images_per_block(grid, data.shape[0], coding is not None)
    data = data.rechunk({0: step, **{i: -1 for i in range(1, data.ndim)}})
    recon = da.map_blocks(
        _reconstruct_block,
        data,
        grid,
        d,
        packed,
        coding,
        atoms,
        bool(layout.drop_empty),
        normalize,
        Tiles.from_config(),
        dtype=np.float32,
        token="dkm-reconstruct-" + ("nearest" if coding is None else coding.tag),
    )
    originals = data.astype(np.float32)
    if data.dtype == np.uint8:
        originals = originals / np.float32(255)
    pixels = tuple(range(1, data.ndim))
    # Uncovered pixels are NaN in the reconstruction: nanmean leaves exactly them out.
    err = (originals.astype(np.float64) - recon.astype(np.float64)) ** 2
    mse = da.nanmean(err, axis=pixels)
    dims = _DIMS[: data.ndim]
    return xr.Dataset(
        {
            "reconstructions": (dims, recon),
            "originals": (dims, originals),
            "image_mse": (("image",), mse),
        },
        coords={"image": ids},
        attrs={
            **grid.attrs(),
            "drop_empty": int(layout.drop_empty),
            "normalize": normalize or "none",
            "n_atoms": int(np.asarray(dictionary).shape[0]),
            "coding": "nearest" if coding is None else coding.tag,
        },
    )


def image_error(image_mse: xr.DataArray | da.Array | np.ndarray) -> dict[str, float]:
    """The error of a whole image set from its per-image MSEs.

    Every image has the same pixel count, so the mean of the per-image MSEs is the per-pixel
    MSE over the set (pixels no window covers aside). Computed where the data lives: on the
    cluster for dask input.

    Returns
    -------
    dict
        ``{"image_mse": mean, "image_rmse": sqrt(mean)}``.
    """
    data = image_mse.data if isinstance(image_mse, xr.DataArray) else image_mse
    if 0 in np.shape(data):
        raise ValueError("image_error needs the MSE of at least one image, got none")
    if isinstance(data, da.Array):
        mean = float(data.mean().compute())
    else:
        mean = float(np.mean(np.asarray(data, dtype=np.float64)))
    return {"image_mse": mean, "image_rmse": float(np.sqrt(mean))}
