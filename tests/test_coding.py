"""Images rebuilt from a patch dictionary and sparse codes, against plain numpy and scikit-learn
references, computed on a two-process cluster."""

from __future__ import annotations

import dataclasses
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from sklearn.decomposition import sparse_encode

from dkm.coding import (
    CODING_METHODS,
    SparseCoding,
    encode_patches,
    image_error,
    reconstruct_images,
)
from dkm.features.patches import PatchLayout, extract_patches

# --------------------------------------------------------------------------- numpy references


def ref_windows(images, size, stride, pad):
    """Every window of the grid by explicit loops (float32 in [0, 1]) and its corner."""
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x /= np.float32(255)
    widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (images.ndim - 3)
    padded = np.pad(x, widths)
    rows, coords = [], []
    for i, img in enumerate(padded):
        for r in range(0, img.shape[0] - size + 1, stride):
            for c in range(0, img.shape[1] - size + 1, stride):
                rows.append(img[r : r + size, c : c + size].reshape(-1))
                coords.append((i, r, c))
    return np.array(rows, dtype=np.float32), coords


def ref_stitch(recs, coords, images, size, pad):
    """Average the windows back (float64 sums), NaN where no window lands, crop the pad."""
    n, h, w = images.shape[:3]
    tail = images.shape[3:]
    total = np.zeros((n, h + 2 * pad, w + 2 * pad, *tail))
    cover = np.zeros((n, h + 2 * pad, w + 2 * pad, *tail))
    for rec, (i, r, c) in zip(recs, coords, strict=True):
        total[i, r : r + size, c : c + size] += rec.reshape(size, size, *tail)
        cover[i, r : r + size, c : c + size] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / cover
    return mean[:, pad : pad + h, pad : pad + w]


def ref_reconstruct(images, dictionary, size, stride, pad, drop_empty, *, l2=False, encode=None):
    """Whole images rebuilt by brute force: nearest centroid in float64 (or ``encode``)."""
    x, coords = ref_windows(images, size, stride, pad)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    if l2:
        x = np.where(norms[:, None] > 0, x / np.where(norms > 0, norms, 1)[:, None], 0)
        x = x.astype(np.float32)
    if encode is None:
        d = dictionary.astype(np.float64)
        dist = ((x[:, None, :].astype(np.float64) - d[None]) ** 2).sum(axis=2)
        recs = d[dist.argmin(axis=1)]
    else:
        recs = encode(x)
    if l2:
        recs = recs * norms[:, None]
    if drop_empty:
        recs = np.where(x.any(axis=1)[:, None], recs, 0)
    recon = ref_stitch(recs, coords, images, size, pad)
    originals = images / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)
    axes = tuple(range(1, images.ndim))
    mse = np.nanmean((originals - recon.astype(np.float32)) ** 2, axis=axes)
    return recon, mse


def unit(dictionary):
    """The dictionary's non-zero rows at unit norm, and which rows they are."""
    norms = np.linalg.norm(dictionary.astype(np.float64), axis=1)
    kept = np.flatnonzero(norms > 0)
    return (dictionary[kept] / norms[kept, None]).astype(np.float32), kept


def sk_codes(x, atoms, coding):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparse_encode(x, atoms, **coding._sklearn_kwargs())


def images_with_empty_corner(n, shape, seed):
    """Random uint8 images whose top-left 5x5 corner is zero: some windows are all zero."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    images[rng.random(images.shape) < 0.3] = 0
    images[:, :5, :5] = 0
    return images


def positive_dictionary(k, n_features, seed):
    """Centroids in [0.1, 0.9]: none of them is the null centroid."""
    return (np.random.default_rng(seed).random((k, n_features)) * 0.8 + 0.1).astype(np.float32)


# size, stride, pad, image shape: stride = size with pad; overlapping (and a last column no
# window reaches); gaps (stride > size); colour.
LAYOUTS = {
    "tiling-pad": (4, 4, 1, (10, 10)),
    "overlap": (4, 2, 0, (11, 11)),
    "gaps": (3, 5, 0, (13, 13)),
    "colour": (3, 2, 1, (9, 9, 3)),
}


# --------------------------------------------------------------------------- nearest centroid


@pytest.mark.parametrize("drop_empty", [False, True])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_reconstruction_matches_numpy_reference(client, name, drop_empty):
    size, stride, pad, shape = LAYOUTS[name]
    images = images_with_empty_corner(5, shape, seed=1)
    n_features = size * size * (shape[2] if len(shape) == 3 else 1)
    dictionary = positive_dictionary(9, n_features, seed=2)
    layout = PatchLayout(size, stride, pad, drop_empty)

    ds = reconstruct_images(images, dictionary, layout, images_per_block=2)
    recon, mse = ref_reconstruct(images, dictionary, size, stride, pad, drop_empty)

    got = ds.compute()
    assert got["reconstructions"].dims == ("image", "y", "x", "channel")[: images.ndim]
    assert got["reconstructions"].dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got["reconstructions"].values), np.isnan(recon))
    np.testing.assert_allclose(got["reconstructions"].values, recon, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got["originals"].values, images / 255.0, atol=1e-7)
    np.testing.assert_allclose(got["image_mse"].values, mse, rtol=1e-6)
    assert got["image_mse"].dtype == np.float64
    np.testing.assert_array_equal(got["image"].values, np.arange(5))
    if name in ("overlap", "gaps"):  # the reference leaves pixels uncovered here
        assert np.isnan(recon).any()
    # The zero corner: drawn as zeros only with drop_empty (no centroid is zero).
    corner = got["reconstructions"].values[:, :2, :2]
    assert np.all(corner == 0) == drop_empty


def test_float_images_and_sample_ids_and_image_error(client):
    rng = np.random.default_rng(3)
    images = rng.random((6, 8, 8))
    arr = xr.DataArray(
        da.from_array(images, chunks=(4, 8, 8)),
        dims=("sample", "y", "x"),
        coords={"sample": np.arange(100, 106)},
    )
    dictionary = rng.random((5, 16)).astype(np.float32)
    ds = reconstruct_images(arr, dictionary, PatchLayout(4, 2))
    recon, mse = ref_reconstruct(images, dictionary, 4, 2, 0, False)
    np.testing.assert_array_equal(ds["image"].values, np.arange(100, 106))
    np.testing.assert_allclose(ds["reconstructions"].values, recon, atol=1e-6)
    np.testing.assert_allclose(ds["image_mse"].values, mse, rtol=1e-6)
    error = image_error(ds["image_mse"])
    # Every pixel covered here: the mean of the per-image MSEs is the per-pixel MSE.
    per_pixel = np.mean((images.astype(np.float32) - recon.astype(np.float32)) ** 2)
    assert error["image_mse"] == pytest.approx(per_pixel, rel=1e-6)
    assert error["image_rmse"] == pytest.approx(np.sqrt(per_pixel), rel=1e-6)
    assert image_error(ds["image_mse"].values) == pytest.approx(error, rel=1e-12)


def test_chunking_does_not_change_results(client):
    images = images_with_empty_corner(7, (10, 10), seed=4)
    dictionary = positive_dictionary(20, 9, seed=5)
    layout = PatchLayout(3, 2, 1, True)
    results = [
        reconstruct_images(
            da.from_array(images, chunks=c), dictionary, layout, images_per_block=b
        ).compute()
        for c, b in [((7, 10, 10), None), ((2, 10, 10), 1), ((3, 10, 10), 3)]
    ]
    for other in results[1:]:
        xr.testing.assert_allclose(results[0], other, rtol=0, atol=1e-7)
    coding = SparseCoding("omp", 2)
    coded = [
        reconstruct_images(images, dictionary, layout, coding=coding, images_per_block=b)
        for b in (1, 7)
    ]
    xr.testing.assert_allclose(coded[0].compute(), coded[1].compute(), rtol=0, atol=1e-6)


def test_coded_blocks_are_capped_in_patches():
    images = np.zeros((10, 10, 10), np.uint8)  # 25 windows of 3x3, stride 2, pad 1
    dictionary = positive_dictionary(4, 9, seed=5)
    layout = PatchLayout(3, 2, 1)
    with dask.config.set({"dkm.coding.patches-per-block": 50}):
        coded = reconstruct_images(images, dictionary, layout, coding=SparseCoding("omp", 1))
    assert coded["reconstructions"].chunks[0] == (2, 2, 2, 2, 2)
    assert reconstruct_images(images, dictionary, layout)["reconstructions"].chunks[0] == (10,)


def test_many_centroids_use_the_tiled_kernel(client):
    # More centroids than a distance tile's rows: the assignment runs tile by tile.
    images = images_with_empty_corner(3, (12, 12), seed=6)
    dictionary = positive_dictionary(3000, 16, seed=7)
    ds = reconstruct_images(images, dictionary, PatchLayout(4, 1))
    recon, mse = ref_reconstruct(images, dictionary, 4, 1, 0, False)
    np.testing.assert_allclose(ds["reconstructions"].values, recon, atol=1e-6)
    np.testing.assert_allclose(ds["image_mse"].values, mse, rtol=1e-6)


def _layout_with_l2(*args):
    if "normalize" not in {f.name for f in dataclasses.fields(PatchLayout)}:
        pytest.skip("PatchLayout has no normalize field yet")
    return PatchLayout(*args, normalize="l2")


@pytest.mark.parametrize("coded", [False, True])
def test_l2_normalised_layout(client, coded):
    layout = _layout_with_l2(4, 2, 1)
    images = images_with_empty_corner(4, (10, 10), seed=8)
    rng = np.random.default_rng(9)
    dictionary = rng.random((12, 16)).astype(np.float32)
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True) * 1.25
    coding = SparseCoding("omp", 2) if coded else None
    atoms, _ = unit(dictionary)
    encode = (lambda x: sk_codes(x, atoms, coding) @ atoms) if coded else None
    ds = reconstruct_images(images, dictionary, layout, coding=coding)
    recon, mse = ref_reconstruct(images, dictionary, 4, 2, 1, False, l2=True, encode=encode)
    np.testing.assert_allclose(ds["reconstructions"].values, recon, atol=2e-6)
    np.testing.assert_allclose(ds["image_mse"].values, mse, rtol=1e-5)
    assert np.all(ds["reconstructions"].values[:, :1, :1] == 0)  # zero windows stay zero


# --------------------------------------------------------------------------- sparse coding


def dictionary_with_zero_atom(k, n_features, seed):
    rng = np.random.default_rng(seed)
    d = rng.random((k, n_features)) * rng.uniform(0.2, 3.0, (k, 1))  # uneven norms
    d[3] = 0  # an empty cluster's centroid
    return d.astype(np.float32)


def dense_from_compact(ds, k):
    index, weight = ds["codes_index"].values, ds["codes_weight"].values
    dense = np.zeros((index.shape[0], k))
    rows = np.repeat(np.arange(index.shape[0]), index.shape[1]).reshape(index.shape)
    used = index >= 0
    dense[rows[used], index[used]] = weight[used]
    return dense


@pytest.mark.parametrize(
    "coding",
    [
        SparseCoding("omp", n_nonzero_coefs=2),
        SparseCoding("lars", n_nonzero_coefs=3),
        SparseCoding("lasso_lars", alpha=0.1),
        SparseCoding("lasso_cd", alpha=0.1),
    ],
    ids=lambda c: c.tag,
)
def test_encode_patches_matches_sparse_encode(client, coding):
    images = images_with_empty_corner(6, (10, 10), seed=10)
    patches = extract_patches(images, 4, 2, 1).chunk({"patch": 50})
    dictionary = dictionary_with_zero_atom(12, 16, seed=11)
    ds = encode_patches(patches, dictionary, coding).compute()

    atoms, kept = unit(dictionary)
    x = patches.values
    expected = np.zeros((len(x), len(dictionary)))
    expected[:, kept] = sk_codes(x, atoms, coding)
    width = coding.n_nonzero_coefs if coding.method in ("omp", "lars") else 11
    assert ds.sizes == {"patch": len(x), "nonzero": width}
    assert ds["codes_index"].dtype == np.int32 and ds["codes_weight"].dtype == np.float32
    assert not np.any(ds["codes_index"].values == 3)  # the zero atom is never used
    np.testing.assert_allclose(dense_from_compact(ds, len(dictionary)), expected, atol=1e-5)
    np.testing.assert_array_equal(ds["codes_nonzero"].values, np.count_nonzero(expected, 1))
    np.testing.assert_array_equal(ds["image"].values, patches["image"].values)
    # Unused slots: index -1 and weight 0; zero patches have no code.
    unused = ds["codes_index"].values < 0
    assert np.all(ds["codes_weight"].values[unused] == 0)
    assert np.all(unused[~x.any(axis=1)])
    # The reconstruction is the code times the unit atoms.
    recon = dense_from_compact(ds, len(dictionary))[:, kept] @ atoms
    np.testing.assert_allclose(recon, expected[:, kept] @ atoms, atol=1e-5)


def test_threshold_codes_keep_the_largest_weights(client):
    rng = np.random.default_rng(12)
    x = rng.random((40, 9)).astype(np.float32)
    dictionary = rng.random((30, 9)).astype(np.float32)
    coding = SparseCoding("threshold", alpha=0.5)
    ds = encode_patches(da.from_array(x, chunks=(15, 9)), dictionary, coding).compute()
    atoms, _ = unit(dictionary)
    full = sk_codes(x, atoms, coding)
    assert ds.sizes["nonzero"] == 9  # min(atoms, features)
    np.testing.assert_array_equal(ds["codes_nonzero"].values, np.count_nonzero(full, axis=1))
    assert ds["codes_nonzero"].values.max() > 9  # some codes were cut
    top = -np.sort(-np.abs(full), axis=1)[:, :9]
    np.testing.assert_allclose(np.abs(ds["codes_weight"].values), top, atol=1e-6)
    picked = np.take_along_axis(full, np.maximum(ds["codes_index"].values, 0), axis=1)
    np.testing.assert_allclose(ds["codes_weight"].values, np.where(top > 0, picked, 0), atol=1e-6)


@pytest.mark.parametrize(
    "coding", [SparseCoding("omp", 2), SparseCoding("lasso_lars", alpha=0.1)], ids=str
)
def test_coded_reconstruction_matches_reference(client, coding):
    size, stride, pad, shape = LAYOUTS["overlap"]
    images = images_with_empty_corner(4, shape, seed=13)
    dictionary = dictionary_with_zero_atom(10, 16, seed=14)
    atoms, _ = unit(dictionary)
    ds = reconstruct_images(
        images, dictionary, PatchLayout(size, stride, pad, True), coding=coding
    ).compute()

    def encode(x):
        return sk_codes(x, atoms, coding) @ atoms

    recon, mse = ref_reconstruct(images, dictionary, size, stride, pad, True, encode=encode)
    assert not np.isnan(ds["image_mse"].values).any()
    np.testing.assert_allclose(ds["reconstructions"].values, recon, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(ds["image_mse"].values, mse, rtol=1e-4)
    assert ds.attrs["coding"] == coding.tag


# --------------------------------------------------------------------------- parameters


def test_sparse_coding_parameters():
    assert CODING_METHODS == ("omp", "lars", "lasso_lars", "lasso_cd", "threshold")
    assert SparseCoding().tag == "omp-n2"
    assert SparseCoding("lasso_lars").to_dict() == {"method": "lasso_lars", "alpha": 1.0}
    assert SparseCoding("threshold", alpha=0).tag == "threshold-a0"
    c = SparseCoding.from_dict({"method": "lars", "n_nonzero_coefs": 4})
    assert c == SparseCoding("lars", 4) and c.tag == "lars-n4"
    assert SparseCoding.from_dict(c.to_dict()) == c
    for kwargs, match in [
        ({"method": "ksvd"}, "method must be one of"),
        ({"method": "omp", "n_nonzero_coefs": 0}, "n_nonzero_coefs must be an integer >= 1"),
        ({"method": "omp", "n_nonzero_coefs": 1.5}, "n_nonzero_coefs"),
        ({"method": "omp", "alpha": 0.1}, "alpha is not used by method 'omp'"),
        ({"method": "lasso_cd", "n_nonzero_coefs": 3}, "n_nonzero_coefs is not used"),
        ({"method": "lasso_lars", "alpha": 0}, "alpha must be > 0"),
        ({"method": "threshold", "alpha": float("nan")}, "alpha must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=match):
            SparseCoding(**kwargs)
        with pytest.raises(ValueError, match=match):
            SparseCoding.from_dict(kwargs)
    with pytest.raises(ValueError, match="n_atoms unknown parameter"):
        SparseCoding.from_dict({"method": "omp", "n_atoms": 3})
    with pytest.raises(ValueError, match="must be a mapping"):
        SparseCoding.from_dict(["omp"])
    assert SparseCoding.problems({"method": "omp", "alpha": 1}) == [
        ("alpha", "is not used by method 'omp' (it takes n_nonzero_coefs)")
    ]


def _exploding_images(shape):
    """Lazy images whose computation fails: a check that touches them would say so."""

    def boom(block):
        raise RuntimeError("the images were computed")

    return da.zeros(shape, dtype=np.uint8, chunks=shape).map_blocks(boom, dtype=np.uint8)


def test_bad_inputs_fail_before_compute():
    images = _exploding_images((4, 10, 10))
    layout = PatchLayout(4, 2)
    good = np.full((5, 16), 0.5, np.float32)
    reconstruct_images(images, good, layout)  # lazy: nothing computed yet
    cases = [
        (images, np.zeros((5, 25)), layout, None, "dictionary has 25 features per atom"),
        (_exploding_images((4, 10, 10, 3)), good, layout, None, "48"),
        (images, np.zeros(16), layout, None, r"dictionary must be a non-empty \(k, n_features\)"),
        (images, np.zeros((0, 16)), layout, None, "non-empty"),
        (images, np.full((5, 16), np.nan), layout, None, "NaN or infinite"),
        (_exploding_images((4, 100)), good, layout, None, "images must be .* got 2-D"),
        (_exploding_images((4, 10, 10, 3, 1)), good, layout, None, "got 5-D"),
        (_exploding_images((4, 3, 3)), good, layout, None, "patch size 4 is larger than"),
        (images, good, layout, SparseCoding("omp", 6), "n_nonzero_coefs=6 is more than"),
        (images, np.zeros((5, 16)), layout, SparseCoding("omp"), "no non-zero atom"),
        (images, good, layout, {"method": "omp"}, "coding must be a SparseCoding"),
        (images, good, {"size": 4}, None, "layout must be a PatchLayout"),
    ]
    with pytest.raises(ValueError, match="images_per_block must be an integer >= 1"):
        reconstruct_images(images, good, layout, images_per_block=0)
    for imgs, dictionary, lay, coding, match in cases:
        with pytest.raises(ValueError, match=match):
            reconstruct_images(imgs, dictionary, lay, coding=coding)
    with pytest.raises(ValueError, match="at least one image"):
        image_error(np.zeros(0))
    with pytest.raises(ValueError, match="dictionary has 9 features per atom"):
        encode_patches(np.zeros((3, 16), np.float32), np.ones((2, 9)), SparseCoding())
    with pytest.raises(ValueError, match=r"patches must be \(patch, feature\)"):
        encode_patches(np.zeros(16, np.float32), np.ones((2, 16)), SparseCoding())
    with pytest.raises(ValueError, match="normalize must be None or 'l2'"):
        encode_patches(np.zeros((3, 4)), np.ones((2, 4)), SparseCoding("omp", 1), normalize="l1")
    with pytest.raises(ValueError, match="patches must be float vectors"):
        encode_patches(np.zeros((3, 4), np.uint8), np.ones((2, 4)), SparseCoding("omp", 1))


# --------------------------------------------------------------------------- batched OMP


def ref_omp(x, atoms, n_nonzero):
    """Textbook OMP in float64, one patch at a time: the chosen atoms, their weights, and the
    smallest gap between the best and second-best ``|correlation|`` over the steps taken."""
    a = atoms.astype(np.float64)
    chosen, weights, gaps = [], [], []
    for row in x.astype(np.float64):
        support, gamma, gap, r = [], np.zeros(0), np.inf, row.copy()
        for _ in range(n_nonzero):
            corr = np.abs(a @ r)
            order = np.argsort(-corr)
            if corr[order[0]] ** 2 < np.finfo(np.float32).eps:  # nothing left to explain
                break
            gap = min(gap, corr[order[0]] - corr[order[1]])
            support.append(order[0])
            gamma = np.linalg.lstsq(a[support].T, row, rcond=None)[0]
            r = row - gamma @ a[support]
        chosen.append(support)
        weights.append(gamma)
        gaps.append(gap)
    return chosen, weights, np.array(gaps)


def overcomplete_patches(k, n_features, n, seed):
    """Gaussian unit atoms (k > n_features) and patches: random ones, an all-zero one, some
    that are one atom exactly and some that are two atoms exactly (OMP stops early there)."""
    rng = np.random.default_rng(seed)
    atoms, _ = unit(rng.standard_normal((k, n_features)))
    x = rng.standard_normal((n, n_features)).astype(np.float32)
    x[0] = 0
    x[1:4] = 1.5 * atoms[[7, 8, 9]]
    x[4:7] = atoms[[10, 11, 12]] - 0.4 * atoms[[13, 14, 15]]
    return atoms, x


@pytest.mark.parametrize("n_nonzero", [1, 2, 3, 4])
def test_batched_omp_matches_sparse_encode_overcomplete(client, n_nonzero):
    atoms, x = overcomplete_patches(512, 25, 400, seed=20)
    # Through the cluster in several blocks; atoms already unit-norm, so codes index them.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the batched kernel never warns
        ds = encode_patches(
            da.from_array(x, chunks=(150, 25)), atoms, SparseCoding("omp", n_nonzero)
        ).compute()
    got = dense_from_compact(ds, 512)
    expected = sk_codes(x, atoms, SparseCoding("omp", n_nonzero))

    _, _, gaps = ref_omp(x, atoms, n_nonzero)
    clear = gaps > 1e-4  # no near-tie at any step: every float rounding picks the same atom
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(got[clear] != 0, expected[clear] != 0)
    np.testing.assert_allclose(got[clear], expected[clear], atol=1e-5)
    # Early stops: the zero patch has no code, an exact atom one weight, two atoms two.
    counts = ds["codes_nonzero"].values
    assert counts[0] == 0 and np.all(ds["codes_index"].values[0] == -1)
    np.testing.assert_array_equal(counts[1:4], 1)
    np.testing.assert_allclose(got[[1, 2, 3], [7, 8, 9]], 1.5, rtol=1e-5)
    np.testing.assert_array_equal(counts[4:7], min(n_nonzero, 2))
    np.testing.assert_array_equal(counts[7:], n_nonzero)
    np.testing.assert_array_equal(counts, np.count_nonzero(expected, axis=1))
    # The compact slots hold the largest weights first.
    w = np.abs(ds["codes_weight"].values)
    assert np.all(w[:, :-1] >= w[:, 1:])


def test_batched_omp_tiles_do_not_change_codes(monkeypatch):
    from dkm._parallel.kernels import Tiles
    from dkm.coding import sparse as coding_sparse

    atoms, x = overcomplete_patches(700, 16, 600, seed=21)
    # A duplicate atom in another tile, at the same place in it (so the same GEMM rounding):
    # the tie goes to the lower index, as with one argmax.
    atoms[250] = atoms[50]
    x[7] = atoms[50]
    live = x[x.any(axis=1)]
    whole = coding_sparse.omp_codes(live, atoms, 3, Tiles()).toarray()
    # Best atoms against one dense argmax, then with 3 row tiles x 7 atom tiles.
    dense = np.abs(live.astype(np.float64) @ atoms.T.astype(np.float64))
    monkeypatch.setattr(coding_sparse, "_ATOMS_PER_TILE", 100)
    small = Tiles(tile_bytes=1)  # the minimum: 256 rows per tile
    best, top = coding_sparse.best_atoms(live, atoms, small)
    np.testing.assert_array_equal(best, dense.argmax(axis=1))
    assert best[6] == 50
    np.testing.assert_allclose(top, dense.max(axis=1), rtol=1e-5)
    tiled = coding_sparse.omp_codes(live, atoms, 3, small).toarray()
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(tiled != 0, whole != 0)
    # And the reference OMP in float64 agrees with both on every patch here.
    chosen, weights, gaps = ref_omp(live, atoms, 3)
    clear = gaps > 1e-5  # not those that tie between the duplicates
    assert clear.sum() > 0.95 * len(live)
    for row in np.flatnonzero(clear):
        support, gamma = chosen[row], weights[row]
        np.testing.assert_array_equal(np.flatnonzero(whole[row]), np.sort(support))
        np.testing.assert_allclose(whole[row, support], gamma, atol=1e-5)


def test_coded_reconstruction_overcomplete(client):
    images = images_with_empty_corner(4, (12, 12), seed=22)
    rng = np.random.default_rng(23)
    dictionary = rng.standard_normal((300, 16)).astype(np.float32)  # k > n_features
    dictionary[5] = 0
    coding = SparseCoding("omp", 3)
    atoms, _ = unit(dictionary)
    ds = reconstruct_images(images, dictionary, PatchLayout(4, 2, 1, True), coding=coding)

    def encode(x):
        return sk_codes(x, atoms, coding) @ atoms

    recon, mse = ref_reconstruct(images, dictionary, 4, 2, 1, True, encode=encode)
    np.testing.assert_allclose(ds["reconstructions"].values, recon, atol=1e-5)
    np.testing.assert_allclose(ds["image_mse"].values, mse, rtol=1e-4)
