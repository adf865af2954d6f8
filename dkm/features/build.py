"""From a dataset store to the feature matrix a model clusters.

``pixels``: every image flattened (or, for a feature dataset such as ``synthetic``, its
``features`` variable). ``patches``: every image cut with a :class:`PatchLayout`, stored as a
patch store next to the dataset (``<data>-<layout tag>.zarr``) and reused while it is
complete, has the same layout and was cut from the same dataset store.

``pca`` and ``autoencoder``: a learner (:mod:`dkm.features.learned`) fitted on the
``fit_split`` samples maps every sample of the dataset to a vector; the result is a feature
store next to the dataset (``<data>-<learner tag>[-<fit_split>].zarr``), reused while it is
complete, made by the same learner on the same fit split of the same dataset store. The
features of ``split`` are its rows of that split, so a held-out split is transformed by the
model fitted on another.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from dkm import config
from dkm.data.integrity import verify_once
from dkm.data.locks import store_lock
from dkm.data.store import StoreError, is_complete, open_dataset, probe, read_attrs, store_identity
from dkm.features.learned import LEARNED_KINDS, LEARNERS, Learner, write_learned
from dkm.features.patches import PatchLayout, extract_patches, write_patches
from dkm.features.pixels import pixel_matrix

__all__ = [
    "FEATURE_KINDS",
    "SPLITS",
    "Features",
    "build_features",
    "cut_patches",
    "features_identity",
    "learn_features",
    "learned_store_path",
    "patch_store_path",
]

log = logging.getLogger("dkm")

FEATURE_KINDS = ("pixels", "patches", *LEARNED_KINDS)
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
        The store holding exactly ``X`` when it is stored (an estimator can stream it by
        path). A learned feature store holds every sample, so it is ``X``'s store only for
        split ``"all"``; for another split this is None (``X`` is the store's rows of that
        split, and ``attrs["store"]`` names the store).
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


def learned_store_path(
    data_store: str | os.PathLike, learner: Learner, fit_split: str = "all"
) -> Path:
    """Where the features ``learner`` learns from the ``fit_split`` samples of
    ``data_store`` are kept by default: ``<data>-<learner tag>[-<fit_split>].zarr`` next to
    the dataset store (it holds every sample, whichever split a job clusters)."""
    data = Path(data_store)
    tag = learner.tag + ("" if fit_split == "all" else f"-{fit_split}")
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


def learn_features(
    data_store: str | os.PathLike,
    learner: Learner,
    out: str | os.PathLike,
    *,
    fit_split: str = "all",
    overwrite: bool = False,
) -> Path:
    """Fit ``learner`` on the ``fit_split`` samples of a dataset store, map every sample
    with it and write the feature store ``out``.

    PCA fits and transforms on the cluster; an autoencoder trains on the client and encodes
    on the cluster, so a Dask client must be active. The store records the learner, the fit
    split, the dataset store and that store's identity, so a re-ingested dataset is never
    paired with stale features.

    Raises
    ------
    ValueError
        The learner cannot be fitted on these samples (named by their ``features.`` key),
        before anything is computed.
    StoreError
        The dataset has no such split or no images (autoencoder), or ``out`` holds
        something that is not a features store.
    """
    data_store = Path(data_store)
    ds = open_dataset(data_store)
    fit_index = _split_index(ds, fit_split, data_store)
    _check_learnable(ds, learner, fit_index, data_store)
    source = read_attrs(data_store)
    attrs = {
        **learner.attrs(),
        "fit_split": fit_split,
        "source_store": str(data_store.resolve()),
        SOURCE_IDENTITY_ATTR: store_identity(data_store),
        "dataset": source.get("dataset"),
    }
    write_learned(ds, learner.learn(ds, fit_index), out, attrs=attrs, overwrite=overwrite)
    log.info("%s: wrote %s features of %d samples", out, learner.tag, ds.sizes["sample"])
    return Path(out)


def _check_learnable(
    ds: xr.Dataset, learner: Learner, fit_index: np.ndarray | None, data_store: Path
) -> None:
    if "images" not in ds and learner.kind == "autoencoder":
        raise StoreError(f"{data_store}: holds feature vectors, no images to train an autoencoder")
    main = ds["images"] if "images" in ds else ds["features"]
    n_fit = main.sizes["sample"] if fit_index is None else fit_index.size
    found = learner.data_problems(n_fit, tuple(main.shape[1:]), images="images" in ds)
    if found:
        raise ValueError(
            "; ".join(f"features.{key}: {message} ({data_store})" for key, message in found)
        )


def features_identity(
    data_store: str | os.PathLike,
    *,
    kind: str = "pixels",
    layout: PatchLayout | None = None,
    split: str = "all",
    store: str | os.PathLike | None = None,
    learner: Learner | None = None,
    fit_split: str | None = None,
) -> dict[str, Any] | None:
    """What determines the features :func:`build_features` would give, or None when they
    cannot be known without computing (the dataset is not ingested, the patches not cut,
    the learned features not stored).

    The identities of the stores read are part of it, so re-ingested data or re-cut patches
    or re-learned features never pass for the old ones.
    """
    data_store = Path(data_store)
    if not is_complete(data_store):
        return None
    if kind in LEARNED_KINDS:
        return _learned_identity(data_store, learner, split, fit_split, store)
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


def _learned_identity(
    data_store: Path,
    learner: Learner | None,
    split: str,
    fit_split: str | None,
    store: str | os.PathLike | None,
) -> dict[str, Any] | None:
    if learner is None:
        return None
    fit_split = split if fit_split is None else fit_split
    path = Path(store) if store is not None else learned_store_path(data_store, learner, fit_split)
    try:
        if not _learned_reusable(path, learner, fit_split, data_store):
            return None
    except StoreError:
        return None
    return {
        **learner.attrs(),
        "fit_split": fit_split,
        "split": split,
        "store": store_identity(path),
    }


def _learned_reusable(path: Path, learner: Learner, fit_split: str, data_store: Path) -> bool:
    """Whether a complete learned feature store can be reused; raises when a store of
    another kind is in the way. Another learner's, another fit split's, another dataset
    version's or a damaged features store is learned again (it is derived data)."""
    state = probe(path)
    if state is None or state.empty:
        return False
    if state.kind != "features":
        raise StoreError(f"{path}: {state.what}, not a learned feature store")
    if not state.complete:
        log.info("%s: %s; learning the features again", path, state.what.removeprefix("is "))
        return False
    attrs = read_attrs(path)
    if not learner.recorded_in(attrs) or attrs.get("fit_split") != fit_split:
        log.info("%s: learned by another learner or on another split; learning again", path)
        return False
    if attrs.get(SOURCE_IDENTITY_ATTR) != store_identity(data_store):
        log.info("%s: learned from an earlier version of %s; learning again", path, data_store)
        return False
    return True


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


def _intact(path: Path, redo: str = "cutting the patches again") -> bool:
    """Whether a stored patch or feature matrix reads back whole (checked once per write); a
    damaged one is derived data, so it is made again rather than refused."""
    try:
        verify_once(path)
    except StoreError as err:
        log.warning("%s; %s", err, redo)
        return False
    return True


def build_features(
    data_store: str | os.PathLike,
    *,
    kind: str = "pixels",
    layout: PatchLayout | None = None,
    split: str = "all",
    store: str | os.PathLike | None = None,
    learner: Learner | None = None,
    fit_split: str | None = None,
) -> Features:
    """Open (and for patches or learned features, make and store when needed) the features
    of a dataset store.

    Must run with a Dask client active when patches have to be cut or features learned:
    that runs on the cluster (an autoencoder trains on the client, then encodes there).

    Parameters
    ----------
    data_store : path-like
        A complete dataset store.
    kind : {"pixels", "patches", "pca", "autoencoder"}
        Whole images, patches cut with ``layout``, or features learned by ``learner``.
    layout : PatchLayout, optional
        Required for patches.
    split : {"all", "train", "test"}
        Which samples.
    store : path-like, optional
        Where the patch or feature store is kept (default :func:`patch_store_path`,
        :func:`learned_store_path`).
    learner : PCAFeatures or AutoencoderFeatures, optional
        Required for ``pca`` and ``autoencoder`` (its kind must be ``kind``).
    fit_split : {"all", "train", "test"}, optional
        The samples a learner is fitted on; default ``split``. Every sample is mapped, so
        ``fit_split="train", split="test"`` clusters held-out samples.

    Raises
    ------
    StoreError
        The dataset store has no such split, no images to cut or encode, or the patch or
        feature store path holds something else (another layout, another kind of store).
    ValueError
        The learner cannot be fitted on the ``fit_split`` samples (too many components, a
        training sample larger than the split), named by its ``features.`` key.
    """
    data_store = Path(data_store)
    ds = open_dataset(data_store)

    def identity() -> dict[str, Any]:
        return features_identity(
            data_store,
            kind=kind,
            layout=layout,
            split=split,
            store=store,
            learner=learner,
            fit_split=fit_split,
        )

    if kind in LEARNED_KINDS:
        return _learned_features(ds, data_store, kind, learner, split, fit_split, store, identity)

    if "images" not in ds:  # a feature dataset such as synthetic blobs
        if kind == "patches":
            raise StoreError(f"{data_store}: holds feature vectors, no images to cut patches from")
        X = ds["features"]
        return Features(X, _labels(ds, None), (X.sizes["feature"],), data_store, {}, identity())

    index = _split_index(ds, split, data_store)
    images = ds["images"] if index is None else ds["images"].isel(sample=index)
    image_shape = tuple(int(s) for s in images.shape[1:])
    if kind == "pixels":
        attrs = {
            "kind": "pixels",
            "image_shape": list(image_shape),
            "split": split,
            **_label_names(ds),
        }
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
    attrs = {
        "kind": "patches",
        "image_shape": list(image_shape),
        "split": split,
        **layout.attrs(),
        "store": str(path),
    }
    return Features(
        X, None, layout.tile_shape(image_shape), path, attrs, identity(), images, layout
    )


def _learned_features(
    ds: xr.Dataset,
    data_store: Path,
    kind: str,
    learner: Learner | None,
    split: str,
    fit_split: str | None,
    store: str | os.PathLike | None,
    identity: Callable[[], dict[str, Any] | None],
) -> Features:
    if learner is None or learner.kind != kind:
        raise ValueError(
            f"{kind} features need a {LEARNERS[kind].__name__} learner, got {learner!r}"
        )
    fit_split = split if fit_split is None else fit_split
    for key, value in (("split", split), ("fit_split", fit_split)):
        if value not in SPLITS:
            raise ValueError(f"features.{key}: must be one of {', '.join(SPLITS)}, got {value!r}")
    index = _split_index(ds, split, data_store)
    _check_learnable(ds, learner, _split_index(ds, fit_split, data_store), data_store)
    path = Path(store) if store is not None else learned_store_path(data_store, learner, fit_split)
    wait = config.get_seconds("store.lock-wait")
    # Two jobs may want the same features at once: the second waits, then reuses them.
    with store_lock(path, purpose=f"learning {learner.tag} features", wait=wait):
        if _learned_reusable(path, learner, fit_split, data_store) and _intact(
            path, "learning the features again"
        ):
            log.info("%s: reusing learned features", path)
        else:
            learn_features(data_store, learner, path, fit_split=fit_split, overwrite=path.exists())
    stored = open_dataset(path)
    X = stored["features"] if index is None else stored["features"].isel(sample=index)
    attrs = {
        **learner.attrs(),
        "fit_split": fit_split,
        "split": split,
        "store": str(path),
        **_label_names(ds),
    }
    return Features(
        X,
        _labels(stored, index),
        (learner.n_components,),
        path if index is None else None,
        attrs,
        identity(),
    )


def _label_names(ds: xr.Dataset) -> dict[str, list[str]]:
    """``{"label_names": [...]}`` when the dataset names its classes (the report's axes)."""
    names = ds["label"].attrs.get("names") if "label" in ds else None
    return {"label_names": [str(n) for n in names]} if names else {}


def _labels(ds: xr.Dataset, index: np.ndarray | None):
    if "label" not in ds:
        return None
    label = ds["label"] if index is None else ds["label"].isel(sample=index)
    return label.data
