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
import inspect
import os
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
from dkm.data.catalog import (
    DATASETS,
    DataShape,
    UnknownDatasetError,
    check_options,
    ingest,
    known_shape,
    load,
    store_shape,
)
from dkm.data.readers import DataFormatError
from dkm.data.store import StoreError, is_complete, open_dataset, read_attrs, write_atomic

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
        ValueError,
        match=r"dataset 'digits': grayscale: unknown option for dataset 'digits' \(expected: "
        r"n_samples, seed, test_size\)",
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
    with pytest.raises(StoreError, match=r"d\.zarr: holds dataset 'digits', this asks 'mnist-5k'"):
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


def _obstacle(store, kind):
    """Put something other than a complete dataset store at ``store``."""
    images = xr.Dataset({"images": (("sample", "y", "x"), np.zeros((2, 3, 3), np.uint8))})
    if kind == "empty-dir":
        store.mkdir()
    elif kind == "file":
        store.write_text("precious")
    elif kind == "foreign-zarr":  # a Zarr store someone else wrote: no dkm marks at all
        images.to_zarr(str(store), zarr_format=3, consolidated=False)
    elif kind == "incomplete":  # marked as a dkm dataset store, never stamped complete
        images.assign_attrs(dkm_store="dataset", dataset="digits").to_zarr(
            str(store), zarr_format=3, consolidated=False
        )
    elif kind == "damaged":  # a complete store whose root zarr.json was cut in half
        ingest("digits", store)
        meta = store / "zarr.json"
        meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    elif kind == "results":  # what ResultsStore.create leaves while a job runs
        root = zarr.open_group(str(store), mode="w-", zarr_format=3)
        root.attrs.update({"job": {"name": "j"}, "status": "running"})
        root.create_group("runs")
    elif kind == "patches":
        patches = xr.Dataset({"patches": (("patch", "feature"), np.ones((4, 9), np.float32))})
        write_atomic(patches.assign_attrs(patch_size=3), store, kind="patches")


@pytest.mark.parametrize(
    ("obstacle", "what", "replaceable"),
    [
        ("empty-dir", "is an empty directory", True),
        ("file", "is a regular file", False),
        ("foreign-zarr", "is a Zarr store that dkm did not write", False),
        ("incomplete", r"is an incomplete dataset store \(it was interrupted while being", True),
        ("damaged", r"is a damaged dataset store \(damaged metadata in .*d\.zarr/zarr\.json", True),
        ("results", "is a results store", False),
        ("patches", "is a complete patches store", False),
    ],
)
def test_path_in_the_way_is_refused(tmp_path, obstacle, what, replaceable):
    store = tmp_path / "d.zarr"
    _obstacle(store, obstacle)
    assert not is_complete(store) or obstacle == "patches"
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    with pytest.raises(StoreError, match=rf"d\.zarr: already exists and {what}") as err:
        ingest("digits", store)
    assert "overwrite" not in str(err.value)
    if replaceable:
        ingest("digits", store, overwrite=True)
        assert open_dataset(store).sizes["sample"] == 1797
    else:  # never destroyed, not even with overwrite
        with pytest.raises(StoreError, match=rf"d\.zarr: {what}.*never replaces"):
            ingest("digits", store, overwrite=True)
        after = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
        assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.zarr"]  # nothing set aside is left


def test_open_dataset_refuses_what_is_not_a_complete_store(tmp_path):
    with pytest.raises(StoreError, match=r"nothing\.zarr: no such store"):
        open_dataset(tmp_path / "nothing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match=r"plain: not a Zarr v3 store \(no zarr\.json\)"):
        open_dataset(tmp_path / "plain")
    half = tmp_path / "half.zarr"
    _obstacle(half, "incomplete")
    with pytest.raises(
        StoreError,
        match=r"half\.zarr: incomplete dataset store \(dkm_status=None\): it was interrupted "
        "while being written; write it again",
    ):
        open_dataset(half)
    foreign = tmp_path / "foreign.zarr"
    _obstacle(foreign, "foreign-zarr")
    with pytest.raises(StoreError, match=r"foreign\.zarr: a Zarr store, but not one dkm wrote"):
        open_dataset(foreign)
    broken = tmp_path / "broken.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("{ not json")
    with pytest.raises(StoreError, match=r"damaged metadata in .*broken\.zarr/zarr\.json: "):
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
    with pytest.raises(
        ValueError, match="dataset 'synthetic': centers: must be an integer >= 1, got 0"
    ):
        load("synthetic", centers=0)
    with pytest.raises(ValueError, match="dataset 'synthetic' is generated and takes no source"):
        load("synthetic", source="/x")


# ----------------------------------------------------------------------------- options

SYNTHETIC_OPTIONS = "n_samples, n_features, centers, cluster_std, center_box, seed, chunk_rows"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"n_sample": 10},
            rf"n_sample: unknown option for dataset 'synthetic' \(expected: {SYNTHETIC_OPTIONS}\); "
            r"did you mean 'n_samples'\?$",
        ),
        ({"n_samples": "abc"}, r"n_samples: must be an integer >= 1, got 'abc'$"),
        ({"n_samples": -5}, r"n_samples: must be an integer >= 1, got -5$"),
        ({"n_samples": 2.5}, r"n_samples: must be an integer >= 1, got 2\.5$"),
        ({"cluster_std": 0}, r"cluster_std: must be a finite number > 0, got 0$"),
        ({"center_box": [5, -5]}, r"center_box: must be two finite numbers \[low, high\] with low"),
        ({"seed": -1}, r"seed: must be an integer in \[0, 2\*\*32 - 1\] or a numpy RandomState"),
        ({"chunk_rows": 0}, r"chunk_rows: must be an integer >= 1 or null, got 0$"),
    ],
    ids=["typo", "string", "negative", "float", "std", "box", "seed", "chunk_rows"],
)
def test_synthetic_option_problems_name_the_option(tmp_path, options, message):
    store = tmp_path / "s.zarr"
    for call in (load, ingest, known_shape):
        args = ("synthetic", store) if call is ingest else ("synthetic",)
        with pytest.raises(ValueError, match=rf"^dataset 'synthetic': {message}") as err:
            call(*args, **options) if call is not known_shape else call(*args, options)
        assert "_load_synthetic" not in str(err.value)
        assert "unexpected keyword" not in str(err.value)
    assert_nothing_written(store)


def test_check_options(tmp_path):
    assert check_options("synthetic", {"n_samples": 10, "seed": 3, "center_box": (0, 1)}) == []
    assert check_options("synthetic", None) == []
    assert check_options("synthetic", {"n_sample": 1, "n_samples": "abc"}) == [
        (
            "n_sample",
            f"unknown option for dataset 'synthetic' (expected: {SYNTHETIC_OPTIONS}); "
            "did you mean 'n_samples'?",
        ),
        ("n_samples", "must be an integer >= 1, got 'abc'"),
    ]
    assert check_options("npz", {"x": 1}) == [
        ("x", "unknown option for dataset 'npz' (it takes no options)")
    ]
    assert check_options("digits", {"test_size": 1.5, "n_samples": 0}) == [
        ("test_size", "must be a finite number > 0 and < 1 or an integer >= 1 or null, got 1.5"),
        ("n_samples", "must be an integer >= 1 or null, got 0"),
    ]
    assert check_options("images", {"grayscale": False, "size": (28, 28)}) == []
    assert check_options("images", {"size": [28]}) == [
        ("size", "must be two integers >= 1 [height, width] (dkm ingest --resize YxX), got [28]")
    ]
    assert check_options("mnist", {"cache_dir": tmp_path, "checksums": None}) == []  # path-like
    assert check_options("mnist", {"verify": "yes"}) == [
        ("verify", "must be true or false, got 'yes'")
    ]
    assert check_options("cifar10", {"checksums": {"a.tar.gz": 5}}) == [
        ("checksums", "must map file names to digests (strings), got {'a.tar.gz': 5}")
    ]
    assert check_options("synthetic", 5) == [
        ("options", "must be a mapping of option names to values, got 5")
    ]
    with pytest.raises(UnknownDatasetError, match="unknown dataset 'nope'"):
        check_options("nope", {})


def test_option_rules_are_the_loaders_options():
    # Declared once: the rule table lists exactly the keyword options each loader accepts.
    for info in DATASETS.values():
        params = inspect.signature(info.load).parameters.values()
        assert [p.name for p in params if p.kind is p.KEYWORD_ONLY] == list(info.options)


def test_seed_may_be_a_random_state(tmp_path):
    store = ingest("synthetic", tmp_path / "s.zarr", n_samples=10, seed=np.random.RandomState(3))
    seed = read_attrs(store)["dkm_ingest"]["options"]["seed"]
    assert isinstance(seed, int) and seed == open_dataset(store).attrs["generator"]["seed"]


# ----------------------------------------------------------------------------- requests


def _snapshot(store):
    return sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*"))


def test_ingest_records_the_request_as_given(tmp_path, make_mnist_dir):
    make_mnist_dir(tmp_path / "src", n_train=2, n_test=1)
    store = ingest(
        "mnist", tmp_path / "m.zarr", source=tmp_path / "src", cache_dir=tmp_path / "cache"
    )
    assert read_attrs(store)["dkm_ingest"] == {
        "dataset": "mnist",
        "options": {"cache_dir": str(tmp_path / "cache")},
    }
    assert read_attrs(ingest("digits", tmp_path / "d.zarr"))["dkm_ingest"] == {
        "dataset": "digits",
        "options": {},
    }
    # How files are fetched and checked is not part of the request: the store is reused.
    before = _snapshot(store)
    ingest("mnist", store, source=tmp_path / "src", verify=False)
    assert _snapshot(store) == before


def test_synthetic_store_of_other_options_is_refused(tmp_path):
    # J56: a complete store with n_samples 5000, a job asking 2000, must not be reused.
    store = ingest("synthetic", tmp_path / "s.zarr", n_samples=5000, n_features=3)
    assert read_attrs(store)["dkm_ingest"] == {
        "dataset": "synthetic",
        "options": {"n_samples": 5000, "n_features": 3},
    }
    before = _snapshot(store)
    with pytest.raises(
        StoreError,
        match=r"s\.zarr: holds dataset 'synthetic' with n_samples=5000, this asks n_samples=2000$",
    ) as err:
        ingest("synthetic", store, n_samples=2000, n_features=3)
    assert err.value.remedy is None
    with pytest.raises(
        StoreError, match=r"with n_features=3, centers=16, this asks n_features=4, centers=8$"
    ):
        ingest("synthetic", store, n_samples=5000, n_features=4, centers=8)
    assert _snapshot(store) == before  # nothing rewritten
    assert open_dataset(store).sizes["sample"] == 5000

    # The same request spelled with its defaults (or another chunking) is the same request.
    ingest(
        "synthetic", store, n_samples=5000, n_features=3, centers=16, cluster_std=1,
        center_box=(-10, 10), seed=0, chunk_rows=16384,
    )  # fmt: skip
    assert _snapshot(store) == before

    ingest("synthetic", store, n_samples=2000, n_features=3, overwrite=True)
    assert open_dataset(store).sizes["sample"] == 2000


def test_no_options_is_the_default_request(tmp_path):
    store = ingest("synthetic", tmp_path / "s.zarr")
    before = _snapshot(store)
    ingest("synthetic", store, n_samples=100_000)
    assert _snapshot(store) == before
    with pytest.raises(StoreError, match=r"with seed=0, this asks seed=1$"):
        ingest("synthetic", store, seed=1)


def _drop_ingest_record(store):
    """Make ``store`` look as if written before dkm_ingest existed."""
    group = zarr.open_group(str(store), mode="r+")
    group.attrs.put({k: v for k, v in group.attrs.items() if k != "dkm_ingest"})


def test_older_stores_compare_what_they_recorded(tmp_path):
    synthetic = ingest("synthetic", tmp_path / "s.zarr", n_samples=300, n_features=2)
    _drop_ingest_record(synthetic)
    ingest("synthetic", synthetic, n_samples=300, n_features=2)  # the generator attrs agree
    with pytest.raises(StoreError, match=r"with n_samples=300, this asks n_samples=200$"):
        ingest("synthetic", synthetic, n_samples=200, n_features=2)

    digits = ingest("digits", tmp_path / "d.zarr")
    _drop_ingest_record(digits)
    ingest("digits", digits)  # only the name to go by
    with pytest.raises(StoreError, match=r"d\.zarr: holds dataset 'digits', this asks 'mnist-5k'"):
        ingest("mnist-5k", digits)


def test_image_folder_store_of_other_options_is_refused(tmp_path):
    src = tmp_path / "drawn"
    src.mkdir()
    for i in range(2):
        Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(src / f"{i}.png")
    store = ingest("images", tmp_path / "i.zarr", source=src)
    ingest("images", store, source=src, grayscale=True, size=None)
    with pytest.raises(StoreError, match=r"with grayscale=True, this asks grayscale=False$"):
        ingest("images", store, source=src, grayscale=False)
    with pytest.raises(StoreError, match=r"with size=None, this asks size=\[3, 3\]$"):
        ingest("images", store, source=src, size=(3, 3))


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", ["mnist-5k", "digits"])
def test_known_shape_is_the_ingested_shape(tmp_path, name):
    store = ingest(name, tmp_path / "d.zarr")
    shape = known_shape(name)
    assert shape == store_shape(store)
    ds = open_dataset(store)
    assert shape.n_samples == ds.sizes["sample"]
    assert shape.sample_shape == ds["images"].shape[1:]
    assert shape.splits == {"train": ds.sizes["sample"]}


@pytest.mark.slow
def test_known_shape_of_fashion_mnist(tmp_path):
    if not catalog.DEBIAN_FASHION_MNIST.is_dir():
        message = "install the Debian package dataset-fashion-mnist"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    store = ingest("fashion-mnist", tmp_path / "f.zarr")
    assert store_shape(store) == known_shape("fashion-mnist")
    assert known_shape("fashion-mnist") == DataShape(
        70000, (28, 28), {"train": 60000, "test": 10000}, True, True
    )
    assert known_shape("fashion-mnist", source=catalog.DEBIAN_FASHION_MNIST) is not None


def test_known_shape_of_synthetic_follows_its_options(tmp_path):
    options = {"n_samples": 1234, "n_features": 7}
    store = ingest("synthetic", tmp_path / "s.zarr", **options)
    assert known_shape("synthetic", options) == store_shape(store)
    assert store_shape(store) == DataShape(1234, (7,), {}, False, True)
    assert known_shape("synthetic") == DataShape(100_000, (25,), {}, False, True)


def test_known_shape_only_for_published_files(tmp_path):
    cifar = DataShape(60000, (32, 32, 3), {"train": 50000, "test": 10000}, True, True)
    assert known_shape("cifar10") == cifar
    assert known_shape("cifar10", source="download") == cifar
    assert known_shape("cifar10", source=tmp_path) is None  # a directory may hold anything
    assert known_shape("fashion-mnist", source=tmp_path) is None
    assert known_shape("mnist") is None  # any IDX subset is "mnist"
    assert known_shape("mnist", source="download").n_samples == 70000
    assert known_shape("images") is None and known_shape("npz") is None
    with pytest.raises(UnknownDatasetError):
        known_shape("nope")


def test_store_shape(tmp_path, make_mnist_dir):
    make_mnist_dir(tmp_path / "src", n_train=5, n_test=3)
    store = ingest("mnist", tmp_path / "m.zarr", source=tmp_path / "src")
    assert store_shape(store) == DataShape(8, (28, 28), {"train": 5, "test": 3}, True, True)
    patches = xr.Dataset({"patches": (("patch", "feature"), np.zeros((2, 4), np.float32))})
    write_atomic(patches.assign_attrs(patch_size=2), tmp_path / "p.zarr", kind="patches")
    with pytest.raises(StoreError, match=r"p\.zarr: a patches store, not a dataset store"):
        store_shape(tmp_path / "p.zarr")
    with pytest.raises(StoreError, match=r"gone\.zarr: no such store"):
        store_shape(tmp_path / "gone.zarr")


def test_check_store_says_what_ingest_would_do(tmp_path):
    store = tmp_path / "s.zarr"
    assert catalog.check_store("synthetic", store, {"n_samples": 300}) is False  # nothing there
    ingest("synthetic", store, n_samples=300, n_features=2)
    assert catalog.check_store("synthetic", store, {"n_samples": 300, "n_features": 2}) is True
    with pytest.raises(StoreError, match=r"with n_samples=300, this asks n_samples=200$"):
        catalog.check_store("synthetic", store, {"n_samples": 200, "n_features": 2})
    assert catalog.check_store("synthetic", store, {"n_samples": 200}, overwrite=True) is False
    with pytest.raises(StoreError, match=r"s\.zarr: holds dataset 'synthetic', this asks 'digits'"):
        catalog.check_store("digits", store)
    with pytest.raises(ValueError, match="n_sample: unknown option"):
        catalog.check_store("synthetic", store, {"n_sample": 1})
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match=r"f: already exists and is a regular file$"):
        catalog.check_store("digits", tmp_path / "f")
    with pytest.raises(StoreError, match="never replaces"):
        catalog.check_store("digits", tmp_path / "f", overwrite=True)


@pytest.mark.parametrize("name", ["digits", "mnist-5k"])
def test_bundled_datasets_take_a_stratified_subset_and_test_split(tmp_path, name):
    from sklearn.model_selection import train_test_split

    from dkm.data.catalog import known_shape, load

    full = load(name)
    ds = load(name, n_samples=500, test_size=0.2, seed=3)
    split = ds["split"].values
    assert ds.sizes["sample"] == 500
    assert dict(zip(*np.unique(split, return_counts=True), strict=True)) == {
        "test": 100,
        "train": 400,
    }
    # scikit-learn's stratified draws, reproduced: the subset, then the test rows in it.
    index, _ = train_test_split(
        np.arange(full.sizes["sample"]),
        train_size=500,
        stratify=full["label"].values,
        random_state=3,
    )
    np.testing.assert_array_equal(ds["images"].values, full["images"].values[np.sort(index)])
    counts = np.bincount(ds["label"].values[split == "test"])
    assert counts.max() - counts.min() <= 1  # stratified
    shape = known_shape(name, {"n_samples": 500, "test_size": 0.2})
    assert (shape.n_samples, shape.splits) == (500, {"train": 400, "test": 100})
