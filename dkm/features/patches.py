"""Cutting images into patch vectors and stitching patch vectors back into images.

Layout (the studies' convention): each image is zero-padded by ``pad`` pixels on every side,
then ``size x size`` windows are cut with their top-left corner on a ``stride`` grid, row by
row. A patch is a float32 vector in [0, 1] (pixel / 255 for uint8 images) whose features run
row-major over the window: y, then x, then channel for colour images. Each patch carries
coordinates ``image`` (the sample it came from), ``row`` and ``col`` (its top-left pixel in the
padded image). Everything is computed chunk-wise with dask, so a 40M x 25 patch matrix never
has to exist in one process.

Sampling (the patch-dictionary study's convention): with ``patches_per_image = n`` each image
gives ``n`` of its non-empty windows, drawn without replacement and kept in grid order;
an image with fewer non-empty windows gives all it has. The draw is keyed by
``(seed, image id, grid position)`` through :func:`dkm._parallel.random.row_uniforms`, so it
does not depend on how the images are chunked. ``normalize="l2"`` then divides each patch by
its l2 norm (all-zero patches stay zero).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import dask.array as da
import numpy as np
import xarray as xr

from dkm import config
from dkm._parallel.random import row_uniforms
from dkm._validation import Interval, Options, problems
from dkm.data.store import StoreError, read_attrs, rows_per_chunk, write_atomic

__all__ = ["PatchGrid", "PatchLayout", "extract_patches", "stitch_patches", "write_patches"]


@dataclass(frozen=True)
class PatchLayout:
    """How images are cut: window side, step, zero padding, which patches are kept, scaling.

    The one owner of the patch conventions: the stride default (the size: non-overlapping
    windows), the rules each value must meet, the tag that names a patch store, the attrs a
    patch store records and the check that a stored matrix has this layout.

    Parameters
    ----------
    size : int
        Window side in pixels.
    stride : int, optional
        Step between window corners; defaults to ``size``.
    pad : int, default 0
        Zeros added on every side of the image first.
    drop_empty : bool, default False
        Leave out all-zero patches. Set whenever ``patches_per_image`` is: sampled patches
        are always non-empty.
    patches_per_image : int, optional
        Keep this many randomly drawn non-empty patches of each image (the patch-dictionary
        study drew 3: 70,000 images give 210,000 patches). An image with fewer non-empty
        patches gives all it has, so the total is at most ``n_images * patches_per_image``.
        None keeps every (non-empty, with ``drop_empty``) patch.
    normalize : {None, "l2"}, default None
        ``"l2"``: divide each patch vector by its l2 norm after scaling to [0, 1]; all-zero
        patches stay zero.
    seed : int, default 0
        Seed of the ``patches_per_image`` draw (unused without it).
    """

    size: int
    stride: int | None = None
    pad: int = 0
    drop_empty: bool = False
    patches_per_image: int | None = None
    normalize: str | None = None
    seed: int = 0

    RULES: ClassVar[dict[str, list]] = {
        "size": [Interval(int, 1)],
        "stride": [Interval(int, 1), None],
        "pad": [Interval(int, 0)],
        "drop_empty": ["boolean"],
        "patches_per_image": [Interval(int, 1), None],
        "normalize": [Options("l2"), None],
        "seed": [Interval(int, 0, 2**32 - 1)],
    }

    # The attrs of the fields added with sampling. ``patches_per_image`` is recorded as
    # ``sampled_per_image``: patch stores have always recorded the grid's windows per image
    # under ``patches_per_image``.
    _OPTIONAL_ATTRS: ClassVar[tuple[str, ...]] = ("sampled_per_image", "sample_seed", "normalize")

    def __post_init__(self):
        found = problems({name: getattr(self, name) for name in self.RULES}, self.RULES)
        if found:
            raise ValueError("; ".join(f"patch {name} {msg}" for name, msg in found))
        sampled = self.patches_per_image is not None
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "stride", int(self.size if self.stride is None else self.stride))
        object.__setattr__(self, "pad", int(self.pad))
        object.__setattr__(self, "drop_empty", bool(self.drop_empty) or sampled)
        if sampled:
            object.__setattr__(self, "patches_per_image", int(self.patches_per_image))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def tag(self) -> str:
        """Names a patch store: ``patches-5x5-s5-p1``, then ``-nz`` when empty patches are
        dropped, ``-n3-seed0`` when 3 are sampled per image with seed 0, ``-l2`` when
        normalised (each only when set, so the names of earlier stores do not change)."""
        tag = f"patches-{self.size}x{self.size}-s{self.stride}-p{self.pad}"
        tag += "-nz" if self.drop_empty else ""
        if self.patches_per_image is not None:
            tag += f"-n{self.patches_per_image}-seed{self.seed}"
        return tag + (f"-{self.normalize}" if self.normalize else "")

    def attrs(self) -> dict[str, Any]:
        """What a patch store records of its layout (and :meth:`from_attrs` reads back).

        The sampling and scaling keys appear only when set (the seed only with
        ``patches_per_image``), so a layout without them records what earlier stores did.
        """
        attrs: dict[str, Any] = {
            "patch_size": self.size,
            "stride": self.stride,
            "pad": self.pad,
            "drop_empty": int(self.drop_empty),
        }
        if self.patches_per_image is not None:
            attrs["sampled_per_image"] = self.patches_per_image
            attrs["sample_seed"] = self.seed
        if self.normalize is not None:
            attrs["normalize"] = self.normalize
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> PatchLayout:
        """The layout a patch store records; stores from before sampling read as unsampled."""
        sampled = attrs.get("sampled_per_image")
        return cls(
            int(attrs["patch_size"]),
            int(attrs["stride"]),
            int(attrs["pad"]),
            bool(attrs.get("drop_empty", 0)),
            patches_per_image=None if sampled is None else int(sampled),
            normalize=attrs.get("normalize"),
            seed=int(attrs.get("sample_seed", 0)),
        )

    def check_store(self, path: str | os.PathLike) -> None:
        """Raise :class:`StoreError` unless ``path`` holds patches cut with this layout."""
        attrs = read_attrs(path)
        if "patch_size" not in attrs:
            raise StoreError(f"{path}: not a patch store (no patch layout in its attrs)")
        # Every layout key either side, so a sampled store never passes for an unsampled one.
        keys = [*self.attrs(), *(k for k in self._OPTIONAL_ATTRS if k in attrs)]
        have = {key: attrs.get(key) for key in dict.fromkeys(keys)}
        if have != self.attrs():
            raise StoreError(f"{path}: holds patches {have}, not {self.attrs()}")

    def image_problems(self, image_shape: tuple[int, ...]) -> list[str]:
        """Why this layout cannot cut images of ``image_shape`` (empty when it can)."""
        padded = (image_shape[0] + 2 * self.pad, image_shape[1] + 2 * self.pad)
        if min(padded) < self.size:
            return [
                f"patch size {self.size} is larger than the padded image "
                f"{padded[0]}x{padded[1]} ({image_shape[0]}x{image_shape[1]} with pad {self.pad})"
            ]
        return []

    def tile_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """How one patch vector is drawn: ``(size, size[, channel])``."""
        if len(image_shape) == 3:
            return (self.size, self.size, int(image_shape[2]))
        return (self.size, self.size)

    def most_per_image(self, image_shape: tuple[int, ...]) -> int:
        """The most patches one image of ``image_shape`` gives: every window of the grid, or
        ``patches_per_image`` when fewer (an exact count only without ``drop_empty``)."""
        windows = self.grid(image_shape).per_image
        return windows if self.patches_per_image is None else min(windows, self.patches_per_image)

    def grid(self, image_shape: tuple[int, ...]) -> PatchGrid:
        """The window grid over one padded image of ``image_shape``."""
        return PatchGrid(image_shape, self)


class PatchGrid:
    """The window grid of a :class:`PatchLayout` over one padded image (made by
    :meth:`PatchLayout.grid`, which has already checked the layout's values).

    Parameters
    ----------
    image_shape : tuple of int
        ``(y, x)`` or ``(y, x, channel)`` of one unpadded image.
    layout : PatchLayout
        Window side, step between windows, zero padding on every side.
    """

    def __init__(self, image_shape: tuple[int, ...], layout: PatchLayout):
        if len(image_shape) not in (2, 3):
            raise ValueError(f"images must be (y, x) or (y, x, channel), got {image_shape}")
        self.image_shape = tuple(int(s) for s in image_shape)
        problem = layout.image_problems(self.image_shape)
        if problem:
            raise ValueError(problem[0])
        self.size, self.stride, self.pad = layout.size, layout.stride, layout.pad
        self.padded = (self.image_shape[0] + 2 * self.pad, self.image_shape[1] + 2 * self.pad)
        self.n_rows = (self.padded[0] - self.size) // self.stride + 1
        self.n_cols = (self.padded[1] - self.size) // self.stride + 1
        self.channels = self.image_shape[2] if len(self.image_shape) == 3 else 0

    @property
    def per_image(self) -> int:
        return self.n_rows * self.n_cols

    @property
    def n_features(self) -> int:
        return self.size * self.size * max(1, self.channels)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Top-left ``row`` and ``col`` of every patch of one image, in patch order."""
        rows = np.repeat(np.arange(self.n_rows, dtype=np.int32) * self.stride, self.n_cols)
        cols = np.tile(np.arange(self.n_cols, dtype=np.int32) * self.stride, self.n_rows)
        return rows, cols

    def attrs(self) -> dict[str, Any]:
        return {
            "patch_size": self.size,
            "stride": self.stride,
            "pad": self.pad,
            "image_shape": list(self.image_shape),
            "padded_shape": list(self.padded),
            "patches_per_image": self.per_image,
            "feature_order": "y,x,channel" if self.channels else "y,x",
        }


def _windows(block: np.ndarray, layout: PatchGrid) -> np.ndarray:
    """All windows of a block of images as an ``(n * per_image, n_features)`` view/copy."""
    p, k, s = layout.pad, layout.size, layout.stride
    widths = [(0, 0), (p, p), (p, p)] + [(0, 0)] * (block.ndim - 3)
    padded = np.pad(block, widths) if p else block
    win = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(1, 2))
    win = win[:, : layout.n_rows * s : s, : layout.n_cols * s : s]
    if layout.channels:  # (n, R, C, ch, k, k) -> (n, R, C, k, k, ch): features y, x, channel
        win = np.moveaxis(win, 3, -1)
    return win.reshape(-1, layout.n_features)


def _scale(values: np.ndarray, normalize: str | None) -> np.ndarray:
    out = values.astype(np.float32)
    if values.dtype == np.uint8:
        out /= np.float32(255)
    if normalize == "l2":
        norms = np.sqrt(np.einsum("ij,ij->i", out, out))
        out /= np.where(norms > 0, norms, np.float32(1))[:, None]
    return out


# The stream of the patch draw within its seed (the seed is the patches' own).
_SAMPLE_STREAM = 0


def _window_uniforms(ids: np.ndarray, per_image: int, seed: int) -> np.ndarray:
    """One uniform per (image id, grid position): global row ``id * per_image + position``,
    so an image's draw depends on its id alone, never on the block it falls in."""
    if ids.size == 0:
        return np.empty((0, per_image))
    runs = np.split(ids, np.flatnonzero(np.diff(ids) != 1) + 1)  # usually one per block
    draws = [
        row_uniforms(seed, _SAMPLE_STREAM, int(run[0]) * per_image, run.size * per_image)
        for run in runs
    ]
    return np.concatenate(draws).reshape(ids.size, per_image)


def _kept(win: np.ndarray, ids: np.ndarray, grid: PatchGrid, layout: PatchLayout):
    """Which of a block's windows are kept, as a mask in window order (None: all of them).

    With ``patches_per_image = n`` those are, in each image, the non-empty windows with the
    ``n`` smallest uniforms: a draw without replacement that stays in grid order.
    """
    if not layout.drop_empty:
        return None
    nonempty = win.any(axis=1)
    n = layout.patches_per_image
    if n is None or n >= grid.per_image:
        return nonempty
    nonempty = nonempty.reshape(-1, grid.per_image)
    draw = _window_uniforms(ids.reshape(-1).astype(np.int64), grid.per_image, layout.seed)
    draw[~nonempty] = np.inf
    pick = np.argpartition(draw, n - 1, axis=1)[:, :n]
    keep = np.zeros_like(nonempty)
    np.put_along_axis(keep, pick, True, axis=1)
    return (keep & nonempty).reshape(-1)


def _patch_block(
    block: np.ndarray, ids: np.ndarray, grid: PatchGrid, layout: PatchLayout
) -> np.ndarray:
    win = _windows(block, grid)
    keep = _kept(win, ids, grid, layout)
    return _scale(win if keep is None else win[keep], layout.normalize)


def _coord_block(
    block: np.ndarray, ids: np.ndarray, grid: PatchGrid, layout: PatchLayout
) -> np.ndarray:
    rows, cols = grid.grid()
    n = block.shape[0]
    out = np.empty((n * grid.per_image, 3), dtype=np.int64)
    out[:, 0] = np.repeat(ids.reshape(-1).astype(np.int64), grid.per_image)
    out[:, 1] = np.tile(rows, n)
    out[:, 2] = np.tile(cols, n)
    keep = _kept(_windows(block, grid), ids, grid, layout) if layout.drop_empty else None
    return out if keep is None else out[keep]


def _count_block(block: np.ndarray, grid: PatchGrid, layout: PatchLayout) -> np.ndarray:
    """How many patches a block gives (its share of the known chunk sizes)."""
    nonempty = _windows(block, grid).any(axis=1).reshape(block.shape[0], grid.per_image)
    per_image = nonempty.sum(axis=1)
    if layout.patches_per_image is not None:
        per_image = np.minimum(per_image, layout.patches_per_image)
    return np.array([per_image.sum()], dtype=np.int64)


def _as_image_array(images: Any, keyed: bool = False) -> tuple[da.Array, da.Array]:
    """The images as a dask array plus the sample index of each image (which must be >= 0
    when it ``keyed`` a random draw)."""
    if isinstance(images, xr.DataArray):
        if images.dims[0] != "sample":
            raise ValueError(f"images must have 'sample' as first dimension, got {images.dims}")
        data = images.data
        sample = images.coords.get("sample")
        ids = np.asarray(sample.values) if sample is not None else None
    else:
        data, ids = images, None
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(max(1, len(data)), *data.shape[1:]))
    if data.ndim not in (3, 4):
        raise ValueError(f"images must be (sample, y, x[, channel]), got {data.ndim}-D")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise TypeError(f"images must be numeric, got {data.dtype}")
    if keyed and ids is not None and ids.size and np.min(ids) < 0:
        raise ValueError(
            "patches_per_image keys its draw by the images' 'sample' coordinate, which must "
            f"be >= 0; got {np.min(ids)}"
        )
    if ids is None:
        ids_arr = da.arange(data.shape[0], chunks=data.chunks[0], dtype=np.int64)
    else:
        ids_arr = da.from_array(ids.astype(np.int64), chunks=(data.chunks[0],))
    return data, ids_arr


def extract_patches(
    images: xr.DataArray | da.Array | np.ndarray,
    size: int,
    stride: int | None = None,
    pad: int = 0,
    drop_empty: bool = False,
    *,
    patches_per_image: int | None = None,
    normalize: str | None = None,
    seed: int = 0,
    chunk_bytes: int | None = None,
) -> xr.DataArray:
    """Cut every image into ``size x size`` patch vectors, lazily and chunk-wise.

    Parameters
    ----------
    images : DataArray, dask array or ndarray
        ``(sample, y, x)`` or ``(sample, y, x, channel)``. uint8 pixels are divided by 255;
        other dtypes are taken as already scaled and only cast to float32.
    size : int
        Side of the square window.
    stride : int, optional
        Step between window corners; defaults to ``size`` (non-overlapping).
    pad : int, default 0
        Zeros added on every side before cutting.
    drop_empty : bool, default False
        Leave out patches whose pixels are all zero. This needs one cheap counting pass over
        the images when called, so that the result has known chunk sizes.
    patches_per_image : int, optional
        Keep this many non-empty patches of each image, drawn at random (implies
        ``drop_empty``, and its counting pass); an image with fewer gives all it has. The
        draw is keyed by ``seed``, the image's ``sample`` id and the grid position, so any
        chunking of the images gives the same patches.
    normalize : {None, "l2"}, default None
        ``"l2"``: divide each patch by its l2 norm after scaling; all-zero patches stay zero.
    seed : int, default 0
        Seed of the ``patches_per_image`` draw.
    chunk_bytes : int, optional
        Aim for output chunks of about this size (default ``dkm.store.feature-chunk-bytes``).

    Returns
    -------
    xarray.DataArray
        ``patches(patch, feature)`` float32, dask-backed, with coordinates ``image``, ``row``,
        ``col`` along ``patch`` (patches of an image in grid order) and the layout in
        ``attrs``.

    Examples
    --------
    >>> import numpy as np
    >>> p = extract_patches(np.zeros((2, 28, 28), np.uint8), size=5, stride=5, pad=1)
    >>> p.shape
    (72, 25)
    """
    layout = PatchLayout(size, stride, pad, drop_empty, patches_per_image, normalize, seed)
    data, ids = _as_image_array(images, keyed=patches_per_image is not None)
    grid = layout.grid(data.shape[1:])
    chunk_bytes = chunk_bytes or config.get_bytes("store.feature-chunk-bytes")
    if grid.per_image == 0:
        raise ValueError(f"no {size}x{size} patch fits the image {grid.image_shape}")

    # Sized by every window of a block: the block function holds them all before selecting.
    images_per_block = rows_per_chunk(
        grid.per_image * grid.n_features * 4, data.shape[0], chunk_bytes
    )
    if data.chunks[0] != _regular(data.shape[0], images_per_block):
        data = data.rechunk({0: images_per_block, **{i: -1 for i in range(1, data.ndim)}})
        ids = ids.rechunk({0: images_per_block})

    if layout.drop_empty:
        counts = da.map_blocks(
            _count_block,
            data,
            grid,
            layout,
            chunks=((1,) * data.numblocks[0],),
            drop_axis=list(range(1, data.ndim)),
            dtype=np.int64,
            token="dkm-count-patches",
        ).compute()
        patch_chunks = tuple(int(c) for c in counts)
    else:
        patch_chunks = tuple(n * grid.per_image for n in data.chunks[0])

    drop_axes = list(range(2, data.ndim))
    image_ids = ids[:, None, None] if data.ndim == 3 else ids[:, None, None, None]
    values = da.map_blocks(
        _patch_block,
        data,
        image_ids,
        grid,
        layout,
        chunks=(patch_chunks, (grid.n_features,)),
        drop_axis=drop_axes,
        dtype=np.float32,
        token="dkm-extract-patches",
    )
    coords = da.map_blocks(
        _coord_block,
        data,
        image_ids,
        grid,
        layout,
        chunks=(patch_chunks, (3,)),
        drop_axis=drop_axes,
        dtype=np.int64,
        token="dkm-patch-coords",
    )
    attrs = {
        **grid.attrs(),
        **layout.attrs(),
        "n_images": int(data.shape[0]),
        "scale": "pixel / 255" if data.dtype == np.uint8 else "as given",
    }
    return xr.DataArray(
        values,
        dims=("patch", "feature"),
        coords={
            "image": ("patch", coords[:, 0]),
            "row": ("patch", coords[:, 1].astype(np.int32)),
            "col": ("patch", coords[:, 2].astype(np.int32)),
        },
        name="patches",
        attrs=attrs,
    )


def _regular(n: int, step: int) -> tuple[int, ...]:
    full, rest = divmod(n, step)
    return (step,) * full + ((rest,) if rest else ())


def write_patches(
    patches: xr.DataArray,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    source_attrs: dict[str, Any] | None = None,
) -> Path:
    """Write a patch matrix to a Zarr store (atomically), computed chunk by chunk.

    Irregular chunks (from ``drop_empty``) are first rechunked to a regular grid, because a
    Zarr array's chunks are regular and each must map to exactly one dask chunk.
    """
    rows = max(patches.chunks[0]) if patches.chunks else patches.shape[0]
    ds = patches.to_dataset()
    if patches.chunks and set(patches.chunks[0][:-1]) != {rows}:
        ds = ds.chunk({"patch": rows})
    ds.attrs.update({**(source_attrs or {}), **patches.attrs})
    encoding = {name: {"chunks": (rows, *ds[name].shape[1:])} for name in ds.variables}
    return write_atomic(ds, path, kind="patches", encoding=encoding, overwrite=overwrite)


def _stitch_block(
    values: np.ndarray,
    coords: np.ndarray,
    first_image: int,
    n_images: int,
    layout: PatchGrid,
) -> np.ndarray:
    k, (hp, wp), ch = layout.size, layout.padded, layout.channels
    shape = (n_images, hp, wp) + ((ch,) if ch else ())
    total = np.zeros(shape, dtype=np.float64)
    patches = values.reshape((-1, k, k) + ((ch,) if ch else ()))
    image, row, col = coords[:, 0] - first_image, coords[:, 1], coords[:, 2]
    # Within one grid position each image appears at most once, so fancy-index += is safe.
    for r, c in {(int(a), int(b)) for a, b in zip(row, col, strict=True)}:
        at = (row == r) & (col == c)
        total[image[at], r : r + k, c : c + k] += patches[at]
    # Divide by how many grid windows cover each pixel, dropped (all-zero) ones included.
    cover = np.zeros((hp, wp), dtype=np.float64)
    for r, c in zip(*layout.grid(), strict=True):
        cover[r : r + k, c : c + k] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / (cover[:, :, None] if ch else cover)
    p = layout.pad
    mean = mean[:, p : hp - p, p : wp - p]
    return mean.astype(np.float32)


def stitch_patches(
    patches: xr.DataArray,
    *,
    images_per_block: int | None = None,
) -> xr.DataArray:
    """Reassemble images from patches made by :func:`extract_patches` (its inverse).

    Overlapping patches are averaged. Patches left out by ``drop_empty`` count as zeros.
    Pixels no window covers (possible when ``stride > size`` or the grid stops short of the
    edge) are NaN.

    Parameters
    ----------
    patches : xarray.DataArray
        ``(patch, feature)`` with coordinates ``image``, ``row``, ``col`` and the layout
        attrs that :func:`extract_patches` writes; patches may be reconstructions (e.g. the
        nearest centroid of each patch) as long as those coordinates are kept.
    images_per_block : int, optional
        Output chunk size along ``image`` (default ``dkm.store.stitch-images-per-block``).

    Returns
    -------
    xarray.DataArray
        ``images(image, y, x[, channel])`` float32 in the patches' scale; dask-backed when the
        input is. Only the ``image`` coordinate is computed eagerly (it sets the chunking).
    """
    missing = [
        k
        for k in ("patch_size", "stride", "pad", "image_shape", "n_images")
        if k not in patches.attrs
    ]
    if missing:
        raise ValueError(
            f"patches lack the layout attrs {missing}; were they made by extract_patches?"
        )
    a = patches.attrs
    layout = PatchLayout.from_attrs(a).grid(tuple(a["image_shape"]))
    images_per_block = images_per_block or int(config.get("store.stitch-images-per-block"))
    n_images = int(a["n_images"])
    image = np.asarray(patches["image"].values, dtype=np.int64)
    if image.size and (np.any(np.diff(image) < 0) or image[0] < 0 or image[-1] >= n_images):
        raise ValueError("patch 'image' coordinates must be sorted and within n_images")
    coords = np.stack([image, patches["row"].values, patches["col"].values], axis=1)
    dims = ("image", "y", "x", "channel")[: 1 + len(layout.image_shape)]

    if not isinstance(patches.data, da.Array):
        out = _stitch_block(np.asarray(patches.values), coords, 0, n_images, layout)
        return xr.DataArray(out, dims=dims, name="images", attrs={"n_images": n_images})

    starts = np.arange(0, n_images, images_per_block)
    bounds = np.searchsorted(image, np.append(starts, n_images))
    chunks = tuple(int(b) for b in np.diff(bounds))
    values = patches.data.rechunk({0: chunks, 1: -1}, method="tasks")
    coord_arr = da.from_array(coords, chunks=(chunks, 3))
    sizes = _regular(n_images, images_per_block)
    blocks = [
        da.map_blocks(
            _stitch_block,
            values.blocks[i],
            coord_arr.blocks[i],
            int(starts[i]),
            sizes[i],
            layout,
            chunks=(sizes[i], *layout.image_shape),
            new_axis=list(range(2, 1 + len(layout.image_shape))),
            dtype=np.float32,
            token="dkm-stitch",
        )
        for i in range(len(sizes))
    ]
    out = da.concatenate(blocks, axis=0)
    return xr.DataArray(out, dims=dims, name="images", attrs={"n_images": n_images})
