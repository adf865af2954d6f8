"""From a dataset store to the feature matrix a model clusters.

``pixels``: every image flattened (or, for a feature dataset such as ``synthetic``, its
``features`` variable). ``patches``: every image cut with a :class:`PatchLayout`, stored as a
patch store next to the dataset (``<data>-<layout tag>.zarr``) and reused while it is
complete, has the same layout and was cut from the same dataset store.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from dkm import config
from dkm.data.integrity import verify_once
from dkm.data.locks import store_lock
from dkm.data.store import StoreError, is_complete, open_dataset, probe, read_attrs, store_identity
from dkm.features.patches import PatchLayout, extract_patches, write_patches
from dkm.features.pixels import pixel_matrix

__all__ = [
    "FEATURE_KINDS",
    "SPLITS",
    "Features",
    "build_features",
    "cut_patches",
    "features_identity",
    "patch_store_path",
]

log = logging.getLogger("dkm")

FEATURE_KINDS = ("pixels", "patches")
SPLITS = ("all", "train", "test")
SOURCE_IDENTITY_ATTR = "source_identity"


@dataclass
class Features:
    """The matrix to cluster, with what the results need to know about it.

    Attributes
    ----------
    X : xarray.DataArray
        ``(sample, feature)`` or ``(patch, feature)``, dask-backed.
    labels : dask array or None
        Sample labels (pixels of a labelled dataset only).
    tile_shape : tuple of int
        How one vector is drawn: a patch ``(size, size[, channel])`` or a whole image.
    store : Path or None
        The store holding ``X`` when it is stored (an estimator can stream it by path).
    attrs : dict
        What a results store records about the features.
    identity : dict
        What determines the features: a run is reused only when this is unchanged.
    images : xarray.DataArray or None
        The images the patches were cut from (the split's), for rebuilding them.
    layout : PatchLayout or None
        The patch layout (None for pixels and feature datasets).
    """

    X: xr.DataArray
    labels: Any
    tile_shape: tuple[int, ...]
    store: Path | None
    attrs: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    images: xr.DataArray | None = None
    layout: PatchLayout | None = None

    @property
    def n_vectors(self) -> int:
        """How many vectors the images make: the rows of ``X``, plus for patches the
        all-zero ones ``drop_empty`` left out (the null centroid rebuilds them exactly, so
        they count, with zero error, in per-patch errors). Sampled patches count as drawn."""
        n = int(self.X.shape[0])
        layout = self.layout
        if layout is None or not layout.drop_empty or layout.patches_per_image is not None:
            return n
        return int(self.images.shape[0]) * layout.grid(self.images.shape[1:]).per_image

    @property
    def reconstruction_layout(self) -> PatchLayout | None:
        """How images are cut to be rebuilt from a dictionary of these patches: every
        window (no sampling); all-zero windows go to the null centroid whenever the
        dictionary never saw them (``drop_empty`` or sampled non-empty patches)."""
        if self.layout is None:
            return None
        lay = self.layout
        return PatchLayout(lay.size, lay.stride, lay.pad, lay.drop_empty, normalize=lay.normalize)


def patch_store_path(
    data_store: str | os.PathLike, layout: PatchLayout, split: str = "all"
) -> Path:
    """Where the patches of ``data_store`` cut with ``layout`` are kept by default:
    ``<data>-<layout tag>[-<split>].zarr`` next to the dataset store."""
    data = Path(data_store)
    tag = layout.tag + ("" if split == "all" else f"-{split}")
    return data.with_name(f"{data.name.removesuffix('.zarr')}-{tag}.zarr")


def _split_index(ds: xr.Dataset, split: str, data_store: Path) -> np.ndarray | None:
    if split == "all":
        return None
    if "split" not in ds:
        raise StoreError(f"{data_store}: has no split variable, so split {split!r} is unknown")
    index = np.flatnonzero(ds["split"].values == split)
    if index.size == 0:
        raise StoreError(f"{data_store}: has no {split!r} samples")
    return index


def cut_patches(
    images: xr.DataArray,
    layout: PatchLayout,
    out: str | os.PathLike,
    *,
    source_store: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Cut ``images`` with ``layout`` (its sampling and normalisation too) on the cluster and
    write the patch store ``out``.

    The store records the dataset store it was cut from and that store's identity, so a
    re-ingested dataset is never paired with stale patches.
    """
    patches = extract_patches(images, **asdict(layout))
    source = read_attrs(source_store)
    attrs = {
        "source_store": str(Path(source_store).resolve()),
        SOURCE_IDENTITY_ATTR: store_identity(source_store),
        "dataset": source.get("dataset"),
    }
    write_patches(patches, out, overwrite=overwrite, source_attrs=attrs)
    log.info("%s: wrote %d patches", out, patches.sizes["patch"])
    return Path(out)


def features_identity(
    data_store: str | os.PathLike,
    *,
    kind: str = "pixels",
    layout: PatchLayout | None = None,
    split: str = "all",
    store: str | os.PathLike | None = None,
) -> dict[str, Any] | None:
    """What determines the features :func:`build_features` would give, or None when they
    cannot be known without computing (the dataset is not ingested, the patches not cut).

    The identities of the stores read are part of it, so re-ingested data or re-cut patches
    never pass for the old ones.
    """
    data_store = Path(data_store)
    if not is_complete(data_store):
        return None
    data_id = store_identity(data_store)
    if not (data_store / "images").is_dir():  # a feature dataset such as synthetic blobs
        return {"kind": "features", "data": data_id}
    if kind == "pixels":
        return {"kind": "pixels", "data": data_id, "split": split}
    path = Path(store) if store is not None else patch_store_path(data_store, layout, split)
    try:
        if not _reusable(path, layout, data_store):
            return None
    except StoreError:
        return None
    return {"kind": "patches", "split": split, **layout.attrs(), "store": store_identity(path)}


def _reusable(path: Path, layout: PatchLayout, data_store: Path) -> bool:
    """Whether a complete patch store can be reused; raises when it is in the way."""
    state = probe(path)
    if state is None or state.empty:
        return False
    if state.kind != "patches" or not state.complete:
        raise StoreError(f"{path}: {state.what}, not a complete patch store")
    layout.check_store(path)
    recorded = read_attrs(path).get(SOURCE_IDENTITY_ATTR)
    if recorded is not None and recorded != store_identity(data_store):
        log.info("%s: cut from an earlier version of %s; cutting again", path, data_store)
        return False
    return True


def _intact(path: Path) -> bool:
    """Whether a stored patch matrix reads back whole (checked once per write); a damaged one
    is derived data, so it is cut again rather than refused."""
    try:
        verify_once(path)
    except StoreError as err:
        log.warning("%s; cutting the patches again", err)
        return False
    return True


def build_features(
    data_store: str | os.PathLike,
    *,
    kind: str = "pixels",
    layout: PatchLayout | None = None,
    split: str = "all",
    store: str | os.PathLike | None = None,
) -> Features:
    """Open (and for patches, cut and store when needed) the features of a dataset store.

    Must run with a Dask client active when patches have to be cut: that runs on the
    cluster.

    Parameters
    ----------
    data_store : path-like
        A complete dataset store.
    kind : {"pixels", "patches"}
        Whole images, or patches cut with ``layout``.
    layout : PatchLayout, optional
        Required for patches.
    split : {"all", "train", "test"}
        Which samples.
    store : path-like, optional
        Where the patch store is kept (default :func:`patch_store_path`).

    Raises
    ------
    StoreError
        The dataset store has no such split, no images to cut, or the patch store path holds
        something else (another layout, a damaged store).
    """
    data_store = Path(data_store)
    ds = open_dataset(data_store)

    def identity() -> dict[str, Any]:
        return features_identity(data_store, kind=kind, layout=layout, split=split, store=store)

    if "images" not in ds:  # a feature dataset such as synthetic blobs
        if kind == "patches":
            raise StoreError(f"{data_store}: holds feature vectors, no images to cut patches from")
        X = ds["features"]
        return Features(X, _labels(ds, None), (X.sizes["feature"],), data_store, {}, identity())

    index = _split_index(ds, split, data_store)
    images = ds["images"] if index is None else ds["images"].isel(sample=index)
    image_shape = tuple(int(s) for s in images.shape[1:])
    if kind == "pixels":
        attrs = {"kind": "pixels", "image_shape": list(image_shape), "split": split}
        return Features(
            pixel_matrix(images), _labels(ds, index), image_shape, None, attrs, identity()
        )

    if layout is None:
        raise ValueError("patch features need a PatchLayout")
    path = Path(store) if store is not None else patch_store_path(data_store, layout, split)
    # Two jobs may want the same patches at once: the second waits, then reuses them.
    with store_lock(path, purpose="cutting patches", wait=config.get_seconds("store.lock-wait")):
        if _reusable(path, layout, data_store) and _intact(path):
            log.info("%s: reusing extracted patches", path)
        else:
            cut_patches(images, layout, path, source_store=data_store, overwrite=path.exists())
    X = open_dataset(path)["patches"]
    attrs = {"kind": "patches", "image_shape": list(image_shape), "split": split, **layout.attrs()}
    return Features(
        X, None, layout.tile_shape(image_shape), path, attrs, identity(), images, layout
    )


def _labels(ds: xr.Dataset, index: np.ndarray | None):
    if "label" not in ds:
        return None
    label = ds["label"] if index is None else ds["label"].isel(sample=index)
    return label.data
