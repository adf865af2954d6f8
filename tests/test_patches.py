"""Patch extraction and stitching against a plain numpy reference, on dask and on a cluster."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from dkm.data.store import StoreError, open_dataset
from dkm.features.patches import (
    PatchGrid,
    PatchLayout,
    extract_patches,
    stitch_patches,
    write_patches,
)


def reference_patches(images: np.ndarray, size: int, stride: int, pad: int):
    """Every patch by explicit loops: the definition extract_patches must match."""
    widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (images.ndim - 3)
    padded = np.pad(images, widths)
    rows, coords = [], []
    for i, img in enumerate(padded):
        for r in range(0, img.shape[0] - size + 1, stride):
            for c in range(0, img.shape[1] - size + 1, stride):
                rows.append(img[r : r + size, c : c + size].reshape(-1))
                coords.append((i, r, c))
    values = np.array(rows).astype(np.float32) / np.float32(255)
    return values, np.array(coords)


def random_images(n, shape, seed=0, zero_fraction=0.0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    # Sparse digits-like images: most pixels zero, so some patches are all zero.
    images[rng.random(images.shape) < zero_fraction] = 0
    return images


@pytest.mark.parametrize(
    ("size", "stride", "pad"),
    [(5, 5, 1), (5, 1, 0), (3, 2, 2), (4, 4, 0), (7, 3, 1), (28, 1, 0), (2, 5, 0)],
)
def test_matches_numpy_reference(size, stride, pad):
    images = random_images(7, (28, 28))
    got = extract_patches(images, size, stride, pad, chunk_bytes=4096)
    want, coords = reference_patches(images, size, stride, pad)
    assert got.dims == ("patch", "feature")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.values, want)
    np.testing.assert_array_equal(got["image"].values, coords[:, 0])
    np.testing.assert_array_equal(got["row"].values, coords[:, 1])
    np.testing.assert_array_equal(got["col"].values, coords[:, 2])
    assert got.attrs["patches_per_image"] == len(want) // 7


def test_studies_layout_counts():
    images = np.zeros((3, 28, 28), np.uint8)
    assert extract_patches(images, 5, 5, 1).shape == (3 * 36, 25)
    assert extract_patches(images, 5, 1, 0).shape == (3 * 576, 25)


def test_colour_feature_order_is_y_x_channel():
    images = random_images(4, (10, 12, 3), seed=1)
    got = extract_patches(images, 3, 2, 1)
    want, _ = reference_patches(images, 3, 2, 1)
    np.testing.assert_array_equal(got.values, want)
    assert got.attrs["feature_order"] == "y,x,channel"
    # First patch's second feature is the first pixel's green value (x=0, channel 1).
    np.testing.assert_array_equal(got.values[1::100, 1], want[1::100, 1])
    patch = got.isel(patch=got.attrs["patches_per_image"] + 5).values.reshape(3, 3, 3)
    r, c = (
        int(got["row"][got.attrs["patches_per_image"] + 5]),
        int(got["col"][got.attrs["patches_per_image"] + 5]),
    )
    padded = np.pad(images[1], ((1, 1), (1, 1), (0, 0)))
    np.testing.assert_array_equal(patch, padded[r : r + 3, c : c + 3] / np.float32(255))


def test_chunking_does_not_change_values():
    images = random_images(23, (16, 16), seed=2)
    small = extract_patches(images, 4, 2, 1, chunk_bytes=1000)
    large = extract_patches(images, 4, 2, 1)
    assert small.data.numblocks[0] > large.data.numblocks[0] == 1
    np.testing.assert_array_equal(small.values, large.values)


def test_sample_coordinate_becomes_image():
    images = xr.DataArray(random_images(5, (8, 8)), dims=("sample", "y", "x"))
    images = images.assign_coords(sample=np.arange(100, 105)).isel(sample=[1, 3])
    got = extract_patches(images, 4, 4)
    np.testing.assert_array_equal(np.unique(got["image"].values), [101, 103])


def test_drop_empty_removes_exactly_the_all_zero_patches():
    images = random_images(9, (28, 28), seed=3, zero_fraction=0.97)
    images[4] = 0  # an image with no content at all
    full, coords = reference_patches(images, 5, 1, 2)
    keep = full.any(axis=1)
    assert 0 < keep.sum() < len(keep)
    got = extract_patches(images, 5, 1, 2, drop_empty=True, chunk_bytes=20_000)
    np.testing.assert_array_equal(got.values, full[keep])
    np.testing.assert_array_equal(got["image"].values, coords[keep, 0])
    np.testing.assert_array_equal(got["row"].values, coords[keep, 1])
    assert 4 not in got["image"].values
    assert got.data.chunks[0] != (len(got),)  # several blocks with their own counts


@pytest.mark.parametrize(
    ("size", "stride", "pad"), [(5, 5, 1), (5, 1, 0), (3, 2, 1), (4, 3, 2), (6, 2, 0)]
)
def test_stitch_inverts_extract(size, stride, pad):
    images = random_images(6, (14, 14), seed=4)
    patches = extract_patches(images, size, stride, pad, chunk_bytes=5000)
    layout = PatchLayout(size, stride, pad).grid((14, 14))
    back = stitch_patches(patches, images_per_block=4)
    assert back.dims == ("image", "y", "x")
    covered = _covered(layout)
    np.testing.assert_allclose(back.values[:, covered], images[:, covered] / 255.0, atol=1e-6)
    assert np.isnan(back.values[:, ~covered]).all()
    if covered.all():
        np.testing.assert_allclose(back.values, images / 255.0, atol=1e-6)


def _covered(layout: PatchGrid) -> np.ndarray:
    cover = np.zeros(layout.padded, bool)
    for r, c in zip(*layout.grid(), strict=True):
        cover[r : r + layout.size, c : c + layout.size] = True
    p = layout.pad
    return cover[p : layout.padded[0] - p, p : layout.padded[1] - p]


def test_stitch_with_dropped_patches_and_colour():
    images = random_images(5, (12, 12, 3), seed=5, zero_fraction=0.9)
    images[2] = 0
    patches = extract_patches(images, 4, 2, 2, drop_empty=True)
    back = stitch_patches(patches, images_per_block=2)
    assert back.shape == images.shape
    np.testing.assert_allclose(back.values, images / 255.0, atol=1e-6)


def test_stitch_numpy_backed_input():
    images = random_images(3, (10, 10), seed=6)
    patches = extract_patches(images, 5, 5).compute()
    np.testing.assert_allclose(stitch_patches(patches).values, images / 255.0, atol=1e-6)


def test_stitch_refuses_patches_without_layout():
    bare = xr.DataArray(np.zeros((4, 25), np.float32), dims=("patch", "feature"))
    with pytest.raises(ValueError, match="layout attrs"):
        stitch_patches(bare)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "size must be an integer >= 1"),
        ({"size": 5, "stride": 0}, "stride must be an integer >= 1"),
        ({"size": 5, "pad": -1}, "pad must be an integer >= 0"),
        ({"size": 40}, "larger than the padded image"),
    ],
)
def test_bad_layouts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        extract_patches(np.zeros((2, 28, 28), np.uint8), **kwargs)


def test_bad_image_arrays():
    with pytest.raises(ValueError, match="sample, y, x"):
        extract_patches(np.zeros((28, 28), np.uint8), 5)
    with pytest.raises(TypeError, match="numeric"):
        extract_patches(np.full((2, 8, 8), "a"), 2)
    wrong = xr.DataArray(np.zeros((8, 8, 2), np.uint8), dims=("y", "x", "sample"))
    with pytest.raises(ValueError, match="'sample' as first dimension"):
        extract_patches(wrong, 2)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    channels=st.sampled_from([0, 1, 3]),
    size=st.integers(1, 6),
    stride=st.integers(1, 7),
    pad=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_property_extract_and_stitch(n, height, width, channels, size, stride, pad, seed):
    shape = (height, width, channels) if channels else (height, width)
    images = random_images(n, shape, seed=seed, zero_fraction=0.5)
    if min(height, width) + 2 * pad < size:
        with pytest.raises(ValueError, match="larger than the padded image"):
            extract_patches(images, size, stride, pad)
        return
    layout = PatchLayout(size, stride, pad).grid(shape)
    patches = extract_patches(images, size, stride, pad, chunk_bytes=256)
    want, coords = reference_patches(images, size, stride, pad)
    assert patches.shape == (n * layout.per_image, layout.n_features)
    np.testing.assert_array_equal(patches.values, want)
    np.testing.assert_array_equal(patches["image"].values, coords[:, 0])
    back = stitch_patches(patches, images_per_block=2).values
    covered = _covered(layout)
    np.testing.assert_allclose(back[:, covered], images[:, covered] / 255.0, atol=1e-6)


def test_write_and_read_back_on_a_process_cluster(client, tmp_path):
    images = random_images(40, (28, 28), seed=7, zero_fraction=0.8)
    patches = extract_patches(images, 5, 1, 0, drop_empty=True, chunk_bytes=200_000)
    assert len(set(patches.data.chunks[0])) > 1  # irregular: write_patches must regularise
    path = write_patches(patches, tmp_path / "p.zarr", source_attrs={"dataset": "test"})
    stored = open_dataset(path)
    assert stored["patches"].dims == ("patch", "feature")
    assert stored.attrs["dataset"] == "test"
    assert stored.attrs["patch_size"] == 5
    want, coords = reference_patches(images, 5, 1, 0)
    keep = want.any(axis=1)
    np.testing.assert_array_equal(stored["patches"].values, want[keep])
    np.testing.assert_array_equal(stored["row"].values, coords[keep, 1])
    plain = xr.open_zarr(path)  # readable without dkm
    assert plain["patches"].shape == (int(keep.sum()), 25)
    with pytest.raises(StoreError, match="already exists"):
        write_patches(patches, path)


def test_failed_write_leaves_nothing(client, tmp_path):
    images = np.zeros((4, 8, 8), np.float64)
    images[2, 3, 3] = np.nan  # the kernel runs fine; force a failure in the graph instead
    patches = extract_patches(images, 4, 4)
    broken = patches.copy(data=patches.data.map_blocks(_explode, dtype=np.float32))
    with pytest.raises(RuntimeError, match="boom"):
        write_patches(broken, tmp_path / "p.zarr")
    assert list(tmp_path.iterdir()) == []


def _explode(block):
    raise RuntimeError("boom")
