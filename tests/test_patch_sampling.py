"""Random non-empty patches per image and l2 normalisation (the patch-dictionary study's
features), against plain numpy references on generated images."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from dkm.data.store import StoreError, open_dataset, read_attrs, write_atomic
from dkm.features import PatchLayout, build_features, extract_patches, stitch_patches
from dkm.features.build import patch_store_path
from dkm.features.patches import write_patches


def all_windows(images: np.ndarray, size: int, stride: int, pad: int) -> dict:
    """Every window by explicit loops, as ``{(image, row, col): uint8 window}``."""
    widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (images.ndim - 3)
    padded = np.pad(images, widths)
    out = {}
    for i, img in enumerate(padded):
        for r in range(0, img.shape[0] - size + 1, stride):
            for c in range(0, img.shape[1] - size + 1, stride):
                out[(i, r, c)] = img[r : r + size, c : c + size].reshape(-1)
    return out


def sparse_images(n, shape, seed=0, zero_fraction=0.0):
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, size=(n, *shape), dtype=np.uint8)
    images[rng.random(images.shape) < zero_fraction] = 0
    return images


def coords_of(patches: xr.DataArray) -> np.ndarray:
    return np.stack([patches[c].values for c in ("image", "row", "col")], axis=1)


def test_exact_count_when_every_image_has_enough(client):
    images = sparse_images(20, (28, 28), seed=1)  # no zero pixel: every window non-empty
    got = extract_patches(images, 5, 5, 1, patches_per_image=3, chunk_bytes=20_000)
    assert got.shape == (20 * 3, 25)
    assert got.data.numblocks[0] > 1
    np.testing.assert_array_equal(np.bincount(got["image"].values), [3] * 20)


def test_images_short_of_non_empty_patches_give_all_they_have():
    images = np.zeros((5, 12, 12), np.uint8)
    images[1, 0, 0] = 7  # one non-empty window
    images[2, 0, 0] = images[2, 11, 11] = 9  # two
    images[3] = sparse_images(1, (12, 12), seed=2)[0]  # nine, every one non-empty
    # images 0 and 4 are blank
    got = extract_patches(images, 4, 4, 0, patches_per_image=3, chunk_bytes=1000)
    per_image = np.bincount(got["image"].values, minlength=5)
    np.testing.assert_array_equal(per_image, [0, 1, 2, 3, 0])
    assert got.shape == (6, 16)
    assert got.attrs["patches_per_image"] == 9  # the grid's windows, as stores always said
    assert got.attrs["sampled_per_image"] == 3


@pytest.mark.parametrize(
    ("size", "stride", "pad", "shape"), [(5, 5, 1, (28, 28)), (3, 2, 2, (9, 11, 3))]
)
def test_sampled_patches_are_non_empty_windows_at_their_coordinates(size, stride, pad, shape):
    images = sparse_images(30, shape, seed=3, zero_fraction=0.85)
    images[::3] = sparse_images(10, shape, seed=13, zero_fraction=0.995)  # few non-empty
    windows = all_windows(images, size, stride, pad)
    got = extract_patches(images, size, stride, pad, patches_per_image=4, chunk_bytes=5_000)
    values, coords = got.values, coords_of(got)
    for value, key in zip(values, map(tuple, coords), strict=True):
        assert windows[key].any()
        np.testing.assert_array_equal(value, windows[key] / np.float32(255))
    # Each image gives min(4, its non-empty windows), distinct ones, in grid order.
    nonempty = np.zeros(len(images), int)
    for (i, _, _), w in windows.items():
        nonempty[i] += bool(w.any())
    assert nonempty.min() < 4 < nonempty.max()  # the data exercises both cases
    np.testing.assert_array_equal(
        np.bincount(coords[:, 0], minlength=len(images)), np.minimum(nonempty, 4)
    )
    order = np.lexsort((coords[:, 2], coords[:, 1], coords[:, 0]))
    np.testing.assert_array_equal(order, np.arange(len(coords)))
    assert len({tuple(c) for c in coords}) == len(coords)


def test_chunking_does_not_change_the_draw(client):
    images = sparse_images(37, (16, 16), seed=4, zero_fraction=0.6)
    runs = [
        extract_patches(images, 4, 2, 1, patches_per_image=5, seed=11, chunk_bytes=cb)
        for cb in (6_000, 20_000, None)
    ]
    irregular = da.from_array(images, chunks=((5, 20, 1, 11), 16, 16))
    runs.append(extract_patches(irregular, 4, 2, 1, patches_per_image=5, seed=11))
    assert len({r.data.numblocks[0] for r in runs}) >= 3
    runs = [r.compute() for r in runs]  # values and coordinates in one pass each
    for other in runs[1:]:
        assert other.values.tobytes() == runs[0].values.tobytes()
        np.testing.assert_array_equal(coords_of(other), coords_of(runs[0]))


def test_draw_follows_the_sample_id_not_the_position():
    images = xr.DataArray(sparse_images(12, (10, 10), seed=5), dims=("sample", "y", "x"))
    images = images.assign_coords(sample=np.arange(12))
    every = extract_patches(images, 2, 2, patches_per_image=3, seed=1)
    some = extract_patches(images.isel(sample=[3, 4, 9]), 2, 2, patches_per_image=3, seed=1)
    keep = np.isin(every["image"].values, [3, 4, 9])
    np.testing.assert_array_equal(coords_of(some), coords_of(every)[keep])
    np.testing.assert_array_equal(some.values, every.values[keep])


def test_negative_sample_ids_are_refused_before_any_compute():
    images = xr.DataArray(np.ones((2, 4, 4), np.uint8), dims=("sample", "y", "x"))
    images = images.assign_coords(sample=[-1, 0])
    with pytest.raises(ValueError, match="'sample' coordinate, which must be >= 0"):
        extract_patches(images, 2, patches_per_image=1)


def test_different_seed_different_selection():
    images = sparse_images(20, (28, 28), seed=6)
    a, b = (extract_patches(images, 5, 5, 1, patches_per_image=3, seed=s) for s in (0, 1))
    assert a.shape == b.shape == (60, 25)
    assert not np.array_equal(coords_of(a), coords_of(b))
    again = extract_patches(images, 5, 5, 1, patches_per_image=3, seed=0)
    np.testing.assert_array_equal(coords_of(again), coords_of(a))


def test_draw_is_uniform_over_grid_positions():
    # 3 of 36 windows from each of 2,400 images: every position expects 200 picks
    # (binomial sd ~13.8); a biased draw (e.g. always the first windows) lands far outside.
    images = np.ones((2400, 30, 30), np.uint8)
    got = extract_patches(images, 5, 5, 0, patches_per_image=3, seed=3)
    position = got["row"].values // 5 * 6 + got["col"].values // 5
    picks = np.bincount(position, minlength=36)
    assert picks.sum() == 7200
    assert picks.min() > 140 and picks.max() < 260


def test_asking_for_every_window_is_drop_empty():
    images = sparse_images(6, (12, 12), seed=7, zero_fraction=0.95)
    all_of_them = extract_patches(images, 4, 4, 0, patches_per_image=9)
    dropped = extract_patches(images, 4, 4, 0, drop_empty=True)
    np.testing.assert_array_equal(all_of_them.values, dropped.values)
    np.testing.assert_array_equal(coords_of(all_of_them), coords_of(dropped))


def test_l2_normalize_gives_unit_norms_and_keeps_zeros_zero():
    images = sparse_images(8, (12, 12), seed=8, zero_fraction=0.9)
    images[3] = 0
    plain = extract_patches(images, 3, 3, 0).values
    got = extract_patches(images, 3, 3, 0, normalize="l2", chunk_bytes=2_000)
    assert got.dtype == np.float32
    assert got.attrs["normalize"] == "l2"
    values = got.values
    zero = ~plain.any(axis=1)
    assert 0 < zero.sum() < len(zero)
    np.testing.assert_array_equal(values[zero], 0)
    np.testing.assert_allclose(np.linalg.norm(values[~zero], axis=1), 1, rtol=1e-6)
    want = plain[~zero] / np.linalg.norm(plain[~zero].astype(np.float64), axis=1)[:, None]
    np.testing.assert_allclose(values[~zero], want, rtol=1e-6)


def test_l2_normalize_of_sampled_patches(client):
    images = sparse_images(10, (28, 28), seed=9, zero_fraction=0.7)
    plain = extract_patches(images, 5, 5, 1, patches_per_image=3)
    unit = extract_patches(images, 5, 5, 1, patches_per_image=3, normalize="l2")
    np.testing.assert_array_equal(coords_of(unit), coords_of(plain))
    norms = np.linalg.norm(plain.values, axis=1)
    np.testing.assert_allclose(unit.values, plain.values / norms[:, None], rtol=1e-6)


@pytest.mark.parametrize(("size", "stride", "pad"), [(4, 4, 0), (5, 5, 1), (4, 2, 1)])
def test_stitch_counts_unsampled_windows_as_zeros(size, stride, pad):
    images = sparse_images(7, (12, 12), seed=10, zero_fraction=0.5)
    patches = extract_patches(images, size, stride, pad, patches_per_image=2)
    back = stitch_patches(patches, images_per_block=3).values
    # Reference: the sampled windows summed into their place, over every window's cover.
    hp = 12 + 2 * pad
    total, cover = np.zeros((7, hp, hp)), np.zeros((hp, hp))
    for r in range(0, hp - size + 1, stride):
        for c in range(0, hp - size + 1, stride):
            cover[r : r + size, c : c + size] += 1
    for value, (i, r, c) in zip(patches.values, coords_of(patches), strict=True):
        total[i, r : r + size, c : c + size] += value.reshape(size, size)
    with np.errstate(invalid="ignore"):  # pixels no window covers are NaN either side
        want = (total / cover)[:, pad : hp - pad, pad : hp - pad]
    np.testing.assert_allclose(back, want, atol=1e-6)
    sampled = back[np.isfinite(back)]
    assert 0 < np.count_nonzero(sampled) < np.count_nonzero(images)


def test_tags_attrs_and_old_stores():
    # Earlier layouts keep their names and attrs; the new fields appear only when set.
    assert PatchLayout(5, 5, 1).tag == "patches-5x5-s5-p1"
    assert PatchLayout(5, 1, 0, True).tag == "patches-5x5-s1-p0-nz"
    old = {"patch_size": 5, "stride": 5, "pad": 1, "drop_empty": 0}
    assert PatchLayout(5, 5, 1).attrs() == old
    assert PatchLayout(5, 5, 1, seed=9).attrs() == old  # the seed only matters when sampling
    assert PatchLayout.from_attrs(old) == PatchLayout(5, 5, 1)
    assert PatchLayout.from_attrs({**old, "patches_per_image": 36}) == PatchLayout(5, 5, 1)

    sampled = PatchLayout(5, patches_per_image=3, seed=2, normalize="l2")
    assert sampled.tag == "patches-5x5-s5-p0-nz-n3-seed2-l2"
    assert sampled.drop_empty  # sampled patches are non-empty
    assert PatchLayout(5, normalize="l2").tag == "patches-5x5-s5-p0-l2"
    for layout in (sampled, PatchLayout(4, 2, 1, True, 7), PatchLayout(3, normalize="l2")):
        assert PatchLayout.from_attrs(layout.attrs()) == layout
    assert PatchLayout(4, 2, 1, True, 7).patches_per_image == 7  # positional order kept


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patches_per_image": 0}, "patch patches_per_image must be an integer >= 1 or null"),
        ({"patches_per_image": 2.5}, "patches_per_image must be an integer"),
        ({"normalize": "l1"}, "patch normalize must be one of 'l2' or null, got 'l1'"),
        ({"seed": -1}, "patch seed must be an integer >= 0"),
        ({"seed": "x"}, "patch seed must be an integer"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PatchLayout(5, **kwargs)
    with pytest.raises(ValueError, match=message):
        extract_patches(da.ones((2, 28, 28), dtype=np.uint8), 5, **kwargs)


def test_rules_are_the_job_validators(tmp_path):
    assert PatchLayout.RULES.keys() >= {"patches_per_image", "normalize", "seed"}


def test_check_store_tells_sampled_from_unsampled(tmp_path):
    images = sparse_images(6, (12, 12), seed=11)
    sampled = PatchLayout(4, patches_per_image=2, seed=5)
    path = write_patches(
        extract_patches(images, 4, patches_per_image=2, seed=5), tmp_path / "p.zarr"
    )
    sampled.check_store(path)
    assert PatchLayout.from_attrs(read_attrs(path)) == sampled
    for other in (
        PatchLayout(4),
        PatchLayout(4, drop_empty=True),
        PatchLayout(4, None, 0, True, 2),
        PatchLayout(4, patches_per_image=2, seed=5, normalize="l2"),
    ):
        with pytest.raises(StoreError, match="holds patches"):
            other.check_store(path)
    plain = write_patches(extract_patches(images, 4), tmp_path / "q.zarr")
    PatchLayout(4).check_store(plain)
    with pytest.raises(StoreError, match="holds patches"):
        sampled.check_store(plain)


def test_build_features_cuts_sampled_normalised_patches(client, tmp_path):
    images = sparse_images(15, (12, 12), seed=12, zero_fraction=0.9)
    data = tmp_path / "data.zarr"
    write_atomic(
        xr.Dataset({"images": (("sample", "y", "x"), images)}, attrs={"dataset": "npz"}),
        data,
        kind="dataset",
    )
    layout = PatchLayout(4, 2, 1, patches_per_image=3, normalize="l2", seed=4)
    features = build_features(data, kind="patches", layout=layout)
    assert features.store == patch_store_path(data, layout)
    assert features.store.name == "data-patches-4x4-s2-p1-nz-n3-seed4-l2.zarr"
    want = extract_patches(images, 4, 2, 1, patches_per_image=3, normalize="l2", seed=4)
    np.testing.assert_array_equal(features.X.values, want.values)
    np.testing.assert_array_equal(coords_of(features.X), coords_of(want))
    assert features.attrs["sampled_per_image"] == 3
    assert features.identity["sample_seed"] == 4
    # Stored, then reused as it is; another seed is another store.
    again = build_features(data, kind="patches", layout=layout)
    assert again.identity == features.identity
    other = build_features(data, kind="patches", layout=PatchLayout(4, 2, 1, patches_per_image=3))
    assert other.store != features.store
    assert open_dataset(other.store).attrs.get("normalize") is None


def test_most_per_image_bounds_what_an_image_gives():
    assert PatchLayout(5, 5, 1).most_per_image((28, 28)) == 36
    assert PatchLayout(5, 5, 1, patches_per_image=3).most_per_image((28, 28)) == 3
    assert PatchLayout(5, 5, 1, patches_per_image=50).most_per_image((28, 28)) == 36
    images = sparse_images(4, (28, 28), seed=14)
    got = extract_patches(images, 5, 5, 1, patches_per_image=50)
    assert got.shape[0] == 4 * PatchLayout(5, 5, 1, patches_per_image=50).most_per_image((28, 28))
