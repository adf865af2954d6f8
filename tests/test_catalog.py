"""The dataset catalog and atomic ingest into Zarr.

Pins: each dataset ingests into a store that plain ``xarray.open_zarr`` and dkm's
``open_dataset`` both read (uint8 ``images(sample, y, x[, channel])``, ``label``, ``split``,
chunked along ``sample`` only); unknown names, missing files, wrong magic and truncated files are
clear errors that leave neither a store nor a hidden temporary behind; a complete store is
reused untouched unless ``overwrite``; a path in the way is refused; ``synthetic`` is generated
on the cluster's workers, identical for one seed whatever the chunking.
"""

from __future__ import annotations

import gzip
import pickle

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from distributed import get_task_stream
from PIL import Image
from sklearn.datasets import load_digits

from dkm.data import catalog
from dkm.data.catalog import DATASETS, UnknownDatasetError, ingest, load
from dkm.data.readers import DataFormatError
from dkm.data.store import StoreError, is_complete, open_dataset, write_atomic

ALL_NAMES = [
    "cifar10",
    "digits",
    "fashion-mnist",
    "images",
    "mnist",
    "mnist-5k",
    "npz",
    "synthetic",
]


def assert_nothing_written(store):
    """Neither the store nor any hidden temporary sibling of it exists."""
    assert not store.exists()
    stray = [p.name for p in store.parent.iterdir() if p.name.startswith(f".{store.name}.")]
    assert stray == []


def assert_image_store(store, *, shape, n_train, n_test=0):
    """Both readers see uint8 images with the given per-sample shape, labels and splits."""
    dims = ("sample", "y", "x", "channel")[: 1 + len(shape)]
    plain = xr.open_zarr(store)
    ours = open_dataset(store)
    for ds in (plain, ours):
        assert ds["images"].dims == dims
        assert ds["images"].dtype == np.uint8
        assert ds["images"].shape == (n_train + n_test, *shape)
        assert ds["label"].dims == ("sample",)
        assert list(ds["split"].values) == ["train"] * n_train + ["test"] * n_test
        assert ds.attrs["dkm_status"] == "complete"
    # Chunked along sample only: every other dimension is one whole chunk.
    zimages = zarr.open_group(str(store), mode="r")["images"]
    assert zimages.chunks[1:] == shape
    return ours


# ----------------------------------------------------------------------------- catalog


def test_catalog_names():
    assert sorted(DATASETS) == ALL_NAMES
    for name, info in DATASETS.items():
        assert info.name == name and info.description and info.source_help


def test_unknown_name_lists_known_names(tmp_path):
    store = tmp_path / "x.zarr"
    with pytest.raises(UnknownDatasetError, match="unknown dataset 'mnsit'; known datasets: "):
        ingest("mnsit", store)
    with pytest.raises(UnknownDatasetError) as err:
        load("nope")
    assert str(err.value).endswith(", ".join(ALL_NAMES))
    assert isinstance(err.value, KeyError)
    assert_nothing_written(store)


def test_option_a_dataset_does_not_take(tmp_path):
    store = tmp_path / "d.zarr"
    with pytest.raises(
        ValueError, match=r"dataset 'digits' does not take that option.*'grayscale'"
    ):
        ingest("digits", store, grayscale=True)
    with pytest.raises(ValueError, match="digits ships inside scikit-learn and takes no source"):
        ingest("digits", store, source="/somewhere")
    assert_nothing_written(store)


# ----------------------------------------------------------------------------- IDX family


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_mnist_from_directory(tmp_path, make_mnist_dir, gz):
    arrays = make_mnist_dir(tmp_path / "src", n_train=5, n_test=3, gz=gz)
    store = ingest("mnist", tmp_path / "mnist.zarr", source=tmp_path / "src")
    ds = assert_image_store(store, shape=(28, 28), n_train=5, n_test=3)
    np.testing.assert_array_equal(
        ds["images"].values, np.concatenate([arrays["train-images"], arrays["test-images"]])
    )
    np.testing.assert_array_equal(
        ds["label"].values, np.concatenate([arrays["train-labels"], arrays["test-labels"]])
    )
    assert ds.attrs["dataset"] == "mnist"
    assert ds.attrs["source"] == str((tmp_path / "src").resolve())
    suffix = ".gz" if gz else ""
    sums = ds.attrs["sha256"]
    assert sorted(sums) == sorted(f"{stem}{suffix}" for stem in catalog._IDX_ROLES.values())
    assert all(len(v) == 64 for v in sums.values())


def test_mnist_subset_and_prefixed_names(tmp_path, write_idx):
    # Any number of images, EMNIST-style prefixes, only a training split.
    src = tmp_path / "emnist"
    src.mkdir()
    images = np.random.default_rng(1).integers(0, 256, (9, 28, 28), dtype=np.uint8)
    write_idx(src / "emnist-letters-train-images-idx3-ubyte.gz", images, gz=True)
    write_idx(src / "emnist-letters-train-labels-idx1-ubyte.gz", np.arange(9, dtype=np.uint8))
    ds = assert_image_store(
        ingest("mnist", tmp_path / "e.zarr", source=src), shape=(28, 28), n_train=9
    )
    np.testing.assert_array_equal(ds["images"].values, images)
    np.testing.assert_array_equal(ds["label"].values, np.arange(9))


def test_fashion_mnist_from_given_directory(tmp_path, make_mnist_dir):
    make_mnist_dir(tmp_path / "src", n_train=3, n_test=2, side=28)
    ds = open_dataset(ingest("fashion-mnist", tmp_path / "f.zarr", source=tmp_path / "src"))
    assert ds.sizes["sample"] == 5
    assert ds["label"].attrs["names"][0] == "T-shirt/top"
    assert len(ds["label"].attrs["names"]) == 10


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        ("missing-dir", "not a directory of IDX files"),
        ("empty-dir", "no IDX files found"),
        ("no-labels", r"train-images-idx3-ubyte\.gz has no matching pair file"),
        ("wrong-magic", r"t10k-images-idx3-ubyte\.gz: not an IDX file"),
        ("truncated", r"train-images-idx3-ubyte\.gz: truncated"),
        ("bad-gzip", r"t10k-labels-idx1-ubyte\.gz: corrupt or truncated gzip"),
        ("count-mismatch", r"do not pair up"),
    ],
)
def test_mnist_broken_sources_leave_no_store(tmp_path, make_mnist_dir, write_idx, damage, error):
    src = tmp_path / "src"
    if damage != "missing-dir":
        src.mkdir()
    if damage not in ("missing-dir", "empty-dir"):
        make_mnist_dir(src)
    if damage == "no-labels":
        (src / "train-labels-idx1-ubyte.gz").unlink()
    elif damage == "wrong-magic":
        (src / "t10k-images-idx3-ubyte.gz").write_bytes(b"GIF89a" + b"\0" * 64)
    elif damage == "truncated":
        raw = (src / "train-images-idx3-ubyte.gz").read_bytes()
        (src / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(gzip.decompress(raw)[:-100]))
    elif damage == "bad-gzip":
        raw = (src / "t10k-labels-idx1-ubyte.gz").read_bytes()
        (src / "t10k-labels-idx1-ubyte.gz").write_bytes(raw[:-12])
    elif damage == "count-mismatch":
        write_idx(src / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8), gz=True)
    store = tmp_path / "mnist.zarr"
    with pytest.raises(DataFormatError, match=error):
        ingest("mnist", store, source=src)
    assert_nothing_written(store)


def test_mnist_without_source(tmp_path):
    with pytest.raises(ValueError, match="dataset 'mnist' needs a source"):
        ingest("mnist", tmp_path / "m.zarr")
    assert_nothing_written(tmp_path / "m.zarr")


# ----------------------------------------------------------------------------- re-runs


def test_complete_store_is_reused_untouched(tmp_path, make_mnist_dir):
    make_mnist_dir(tmp_path / "src", n_train=4, n_test=2)
    store = ingest("mnist", tmp_path / "m.zarr", source=tmp_path / "src")
    meta = store / "zarr.json"
    before = meta.stat().st_mtime_ns
    listing = sorted(p.relative_to(store) for p in store.rglob("*"))

    make_mnist_dir(tmp_path / "src", n_train=8, n_test=2, seed=9)  # the source changed...
    assert ingest("mnist", store, source=tmp_path / "src") == store
    assert meta.stat().st_mtime_ns == before  # ...but a complete store is a no-op
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == listing
    assert open_dataset(store).sizes["sample"] == 6

    ingest("mnist", store, source=tmp_path / "src", overwrite=True)
    assert meta.stat().st_mtime_ns != before
    assert open_dataset(store).sizes["sample"] == 10
    assert_nothing_written(tmp_path / "gone.zarr")  # no .m.zarr.old-* or .tmp-* siblings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr", "src"]


def test_complete_store_of_another_dataset_is_not_reused(tmp_path):
    # The no-op is for re-runs: a store holding another dataset must not pass for this one.
    store = ingest("digits", tmp_path / "d.zarr")
    with pytest.raises(StoreError, match=r"d\.zarr.*'digits'"):
        ingest("mnist-5k", store)
    assert open_dataset(store).attrs["dataset"] == "digits"


def test_failed_overwrite_keeps_the_old_store(tmp_path, make_mnist_dir):
    make_mnist_dir(tmp_path / "src", n_train=4, n_test=2)
    store = ingest("mnist", tmp_path / "m.zarr", source=tmp_path / "src")
    (tmp_path / "src" / "train-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="not an IDX file"):
        ingest("mnist", store, source=tmp_path / "src", overwrite=True)
    assert open_dataset(store).sizes["sample"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr", "src"]


@pytest.mark.parametrize("obstacle", ["empty-dir", "file", "zarr-without-stamp"])
def test_path_in_the_way_is_refused(tmp_path, obstacle):
    store = tmp_path / "d.zarr"
    if obstacle == "empty-dir":
        store.mkdir()
    elif obstacle == "file":
        store.write_text("precious")
    else:  # a Zarr store an interrupted writer left behind: no dkm_status stamp
        xr.Dataset({"images": (("sample", "y", "x"), np.zeros((2, 3, 3), np.uint8))}).to_zarr(
            str(store), zarr_format=3, consolidated=False
        )
    assert not is_complete(store)
    with pytest.raises(StoreError, match=r"d\.zarr: exists but is not a complete dkm store"):
        ingest("digits", store)
    assert store.exists()
    if obstacle == "file":
        assert store.read_text() == "precious"
    ingest("digits", store, overwrite=True)
    assert open_dataset(store).sizes["sample"] == 1797
    assert [p.name for p in tmp_path.iterdir()] == ["d.zarr"]  # nothing set aside is left


def test_open_dataset_refuses_what_is_not_a_complete_store(tmp_path):
    with pytest.raises(StoreError, match=r"nothing\.zarr: no such store"):
        open_dataset(tmp_path / "nothing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match=r"plain: not a Zarr v3 store \(no zarr\.json\)"):
        open_dataset(tmp_path / "plain")
    half = tmp_path / "half.zarr"
    xr.Dataset({"a": ("sample", np.arange(3))}).to_zarr(
        str(half), zarr_format=3, consolidated=False
    )
    with pytest.raises(StoreError, match=r"half\.zarr: incomplete store \(dkm_status=None\)"):
        open_dataset(half)
    broken = tmp_path / "broken.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("{ not json")
    with pytest.raises(StoreError, match=r"broken\.zarr: corrupt store metadata"):
        open_dataset(broken)


def _explode_on_block_2(block, block_info=None):
    if block_info[None]["chunk-location"][0] == 2:
        raise RuntimeError("disk on fire")
    return block


def test_write_interrupted_mid_data_leaves_nothing(tmp_path):
    lazy = da.zeros((40, 4, 4), chunks=(10, 4, 4), dtype=np.uint8).map_blocks(
        _explode_on_block_2, dtype=np.uint8
    )
    store = tmp_path / "d.zarr"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_atomic(xr.Dataset({"images": (("sample", "y", "x"), lazy)}), store)
    assert_nothing_written(store)


# ----------------------------------------------------------------------------- other datasets


def test_digits(tmp_path):
    ds = assert_image_store(ingest("digits", tmp_path / "d.zarr"), shape=(8, 8), n_train=1797)
    bunch = load_digits()
    images = ds["images"].values
    assert images.min() == 0 and images.max() == 255
    np.testing.assert_array_equal(images, np.rint(bunch.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(ds["label"].values, bunch.target)
    assert np.bincount(ds["label"].values).tolist()[:2] == [178, 182]


def _cifar_source(directory, n=2):
    rng = np.random.default_rng(0)
    directory.mkdir()
    names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    data = {}
    for name in names:
        data[name] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batch = {b"data": data[name], b"labels": list(range(n))}
        (directory / name).write_bytes(pickle.dumps(batch))
    return np.concatenate([data[n] for n in names])


def test_cifar10(tmp_path):
    rows = _cifar_source(tmp_path / "cifar-10-batches-py")
    ds = assert_image_store(
        ingest("cifar10", tmp_path / "c.zarr", source=tmp_path),
        shape=(32, 32, 3),
        n_train=10,
        n_test=2,
    )
    images = ds["images"].values
    np.testing.assert_array_equal(images[:, 3, 4, 0], rows[:, 0 * 1024 + 3 * 32 + 4])
    np.testing.assert_array_equal(images[:, 3, 4, 2], rows[:, 2 * 1024 + 3 * 32 + 4])
    assert ds["label"].attrs["names"][:2] == ["airplane", "automobile"]


def test_images_folder(tmp_path):
    src = tmp_path / "drawn"
    for label, value in (("b", 200), ("a", 50)):
        (src / label).mkdir(parents=True)
        for i in range(2):
            rgb = np.zeros((10, 12, 3), np.uint8) + np.uint8(value + i)
            Image.fromarray(rgb).save(src / label / f"{i}.png")

    gray = assert_image_store(
        ingest("images", tmp_path / "g.zarr", source=src), shape=(10, 12), n_train=4
    )
    np.testing.assert_array_equal(gray["label"].values, [0, 0, 1, 1])
    assert gray["label"].attrs["names"] == ["a", "b"]
    assert list(gray["file"].values) == ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]
    np.testing.assert_array_equal(gray["images"].values[:, 0, 0], [50, 51, 200, 201])

    color = assert_image_store(
        ingest("images", tmp_path / "c.zarr", source=src, grayscale=False, size=(5, 6)),
        shape=(5, 6, 3),
        n_train=4,
    )
    assert color.attrs["grayscale"] == 0 and color.attrs["resized_to"] == [5, 6]
    np.testing.assert_array_equal(color["images"].values[3], np.full((5, 6, 3), 201))


def test_images_folder_errors_leave_no_store(tmp_path):
    (tmp_path / "src").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "src" / "a.png")
    (tmp_path / "src" / "b.png").write_bytes(b"junk")
    store = tmp_path / "i.zarr"
    with pytest.raises(DataFormatError, match=r"b\.png: not a readable image"):
        ingest("images", store, source=tmp_path / "src")
    assert_nothing_written(store)


def test_npz(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (6, 7, 9), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(6) % 2)
    ds = assert_image_store(
        ingest("npz", tmp_path / "n.zarr", source=tmp_path / "d.npz"), shape=(7, 9), n_train=6
    )
    np.testing.assert_array_equal(ds["images"].values, images)
    np.testing.assert_array_equal(ds["label"].values, [0, 1, 0, 1, 0, 1])
    assert list(ds.attrs["sha256"]) == ["d.npz"]


def test_chunking_follows_chunk_bytes(tmp_path):
    store = ingest("digits", tmp_path / "d.zarr", chunk_bytes=64 * 100)
    group = zarr.open_group(str(store), mode="r")
    assert group["images"].chunks == (100, 8, 8)
    assert group["label"].chunks == (100,)
    assert open_dataset(store)["images"].chunks[0][:2] == (100, 100)


# ----------------------------------------------------------------------------- synthetic

SYNTH = dict(n_samples=20_000, n_features=5, centers=4, cluster_std=0.05, seed=7)


@pytest.mark.slow
def test_synthetic_generated_on_the_cluster_independent_of_chunking(client, tmp_path):
    with get_task_stream(client) as stream:
        small = ingest("synthetic", tmp_path / "a.zarr", chunk_rows=8192, **SYNTH)
    assert any("dkm-synthetic-blobs" in str(t["key"]) for t in stream.data)
    big = ingest("synthetic", tmp_path / "b.zarr", chunk_rows=16384, **SYNTH)
    other_seed = ingest("synthetic", tmp_path / "c.zarr", chunk_rows=8192, **{**SYNTH, "seed": 8})

    a, b, c = (open_dataset(p) for p in (small, big, other_seed))
    assert zarr.open_group(str(small), mode="r")["features"].chunks == (8192, 5)
    assert zarr.open_group(str(big), mode="r")["features"].chunks == (16384, 5)
    assert a["features"].dims == ("sample", "feature")
    assert a["features"].shape == (20_000, 5) and a["features"].dtype == np.float32
    assert a["label"].dtype == np.int64
    fa, fb = a["features"].values, b["features"].values
    np.testing.assert_array_equal(fa, fb)
    np.testing.assert_array_equal(a["label"].values, b["label"].values)
    assert not np.array_equal(fa, c["features"].values)

    # Small spread: each row sits next to the generator center its label names.
    centers = a["centers"].values
    nearest = np.argmin(((fa[:, None, :] - centers[None]) ** 2).sum(axis=2), axis=1)
    np.testing.assert_array_equal(nearest, a["label"].values)
    assert set(np.unique(a["label"].values)) == {0, 1, 2, 3}
    assert (fa - centers[a["label"].values]).std() == pytest.approx(0.05, rel=0.05)
    assert a.attrs["generator"]["seed"] == 7


def test_synthetic_bad_sizes():
    with pytest.raises(ValueError, match="synthetic: centers must be >= 1, got 0"):
        load("synthetic", centers=0)
    with pytest.raises(ValueError, match="dataset 'synthetic' is generated and takes no source"):
        load("synthetic", source="/x")
