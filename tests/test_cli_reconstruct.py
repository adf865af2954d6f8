"""``dkm reconstruct``: images rebuilt from a stored patch dictionary, on a real cluster.

Pins: a dataset store, a folder of gray PNG/BMP files and a folder of colour PNGs are rebuilt
with a run's centroids exactly as a plain numpy reference does it (every window of the run's
layout replaced by its nearest centroid, overlaps averaged), ``--coding omp`` as scikit-learn's
``sparse_encode`` over the unit atoms does it; the store holds originals, reconstructions,
image_mse and attrs naming its inputs, the printed RMSE is the set's, and the PNG grid beside it
is a real image. Every bad input is one ``dkm: error:`` line naming the flag, exit code 1,
before any cluster is contacted (the scheduler given is a closed port), with nothing written;
a failure while computing leaves neither the store nor its PNG.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from PIL import Image

from dkm.cli import main
from dkm.data.store import open_dataset, store_kind
from dkm.results.store import ResultsStore

SIZE, STRIDE, PAD = 4, 2, 1  # overlapping windows: the reference averages them
N_IMAGES, SIDE, K = 7, 8, 6


def run(*args):
    """Invoke ``dkm ARGS`` in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# --------------------------------------------------------------------------- the reference


def reference(images: np.ndarray, centroids: np.ndarray, size=SIZE, stride=STRIDE, pad=PAD):
    """Nearest-centroid reconstruction in plain numpy: pad, cut every window of the grid,
    replace it by its nearest centroid, add it back, divide by the windows per pixel."""
    x = images.astype(np.float64) / 255
    tail = x.shape[3:]
    widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * len(tail)
    padded = np.pad(x, widths)
    total, cover = np.zeros_like(padded), np.zeros(padded.shape[1:3])
    c = centroids.astype(np.float64)
    gaps = []
    for i in range(len(x)):
        for r in range(0, padded.shape[1] - size + 1, stride):
            for col in range(0, padded.shape[2] - size + 1, stride):
                window = padded[i, r : r + size, col : col + size].reshape(-1)
                d2 = ((c - window) ** 2).sum(axis=1)
                best, second = np.sort(d2)[:2]
                gaps.append(second - best)
                total[i, r : r + size, col : col + size] += c[np.argmin(d2)].reshape(
                    (size, size, *tail)
                )
                if i == 0:
                    cover[r : r + size, col : col + size] += 1
    # The data are drawn so that no window is near a tie between two centroids.
    assert min(gaps) > 1e-4
    cover = cover[(..., *([None] * len(tail)))]
    recon = (total / cover)[:, pad : padded.shape[1] - pad, pad : padded.shape[2] - pad]
    mse = ((x - recon) ** 2).reshape(len(x), -1).mean(axis=1)
    return x, recon, mse


def omp_reference(images, centroids, n_nonzero_coefs, size=SIZE, stride=STRIDE, pad=PAD):
    """The same with each window drawn as its OMP code over the unit-norm centroids."""
    from sklearn.decomposition import sparse_encode

    atoms = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    x = images.astype(np.float64) / 255
    padded = np.pad(x, [(0, 0), (pad, pad), (pad, pad)])
    total, cover = np.zeros_like(padded), np.zeros(padded.shape[1:])
    for i in range(len(x)):
        for r in range(0, padded.shape[1] - size + 1, stride):
            for col in range(0, padded.shape[2] - size + 1, stride):
                window = padded[i, r : r + size, col : col + size].reshape(1, -1)
                code = sparse_encode(
                    window, atoms, algorithm="omp", n_nonzero_coefs=n_nonzero_coefs
                )
                total[i, r : r + size, col : col + size] += (code @ atoms).reshape(size, size)
                if i == 0:
                    cover[r : r + size, col : col + size] += 1
    recon = (total / cover)[:, pad:-pad, pad:-pad]
    return recon, ((x - recon) ** 2).reshape(len(x), -1).mean(axis=1)


# --------------------------------------------------------------------------- stores


def results_store(path, centroids, features, *, where="run", extra_runs=()):
    """A results store with one complete run ``lloyd-k<k>`` holding ``centroids``: written
    with ResultsStore's own methods, as the runner writes it. The features are recorded in
    the run's attrs, in its identity, or (stores from before runs recorded them) the root."""
    store = ResultsStore(path)
    root = {"job": {"name": "reconstruct-test"}}
    if where == "root":
        root["features"] = features
    store.start_job(root)
    k = len(centroids)
    history = xr.Dataset({"inertia": ("iteration", [2.0, 1.0])}, coords={"iteration": [1, 2]})
    attrs = {"algorithm": "lloyd", "k": k, "n_iter": 2, "inertia": 1.0, "run_id": "r1"}
    if where == "run":
        attrs["features"] = features
    elif where == "identity":
        attrs["identity"] = {"features": features, "algorithm": "lloyd", "k": k}
    variables = {
        "centroids": (("cluster", "feature"), centroids.astype(np.float32)),
        "x_mean": (("feature",), centroids.mean(axis=0).astype(np.float32)),
    }
    store.write_run(f"lloyd-k{k}", variables, history, attrs)
    for name, error in extra_runs:
        store.write_failed_run(name, {"algorithm": "lloyd", "k": 7}, error)
    store.finish("complete")
    return path


def patch_features(image_shape):
    return {
        "kind": "patches",
        "split": "all",
        "patch_size": SIZE,
        "stride": STRIDE,
        "pad": PAD,
        "drop_empty": 0,
        "image_shape": list(image_shape),
    }


def ingest_npz(tmp_path, name, images):
    npz = tmp_path / f"{name}.npz"
    np.savez(npz, images=images)
    store = tmp_path / f"{name}.zarr"
    result = run("ingest", "npz", "--source", npz, "--store", store)
    assert result.exit_code == 0, result.output
    return store


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reconstruct")
    rng = np.random.default_rng(7)
    gray = rng.integers(0, 256, (N_IMAGES, SIDE, SIDE), dtype=np.uint8)
    colour = rng.integers(0, 256, (N_IMAGES, SIDE, SIDE, 3), dtype=np.uint8)
    gray_centroids = rng.random((K, SIZE * SIZE)).astype(np.float32)
    colour_centroids = rng.random((K, SIZE * SIZE * 3)).astype(np.float32)
    pixels = {"kind": "pixels", "split": "all", "image_shape": [SIDE, SIDE]}
    s = {
        "gray": gray,
        "colour": colour,
        "gray_centroids": gray_centroids,
        "colour_centroids": colour_centroids,
        "data": ingest_npz(tmp, "gray", gray),
        "colour_data": ingest_npz(tmp, "colour", colour),
        "results": results_store(
            tmp / "gray-results.zarr",
            gray_centroids,
            patch_features((SIDE, SIDE)),
            extra_runs=[("lloyd-k7", "k=7 > 5 samples")],
        ),
        "colour_results": results_store(  # no image shape: channels from the centroids
            tmp / "colour-results.zarr",
            colour_centroids,
            {k: v for k, v in patch_features(()).items() if k != "image_shape"},
            where="identity",
        ),
        "pixel_results": results_store(
            tmp / "pixel-results.zarr",
            rng.random((3, SIDE * SIDE)),
            pixels,
            where="root",
        ),
        "folder": tmp / "gray-png",
        "colour_folder": tmp / "colour-png",
    }
    s["folder"].mkdir()
    for i, image in enumerate(gray):  # PNG and BMP: any image file the readers know
        Image.fromarray(image).save(s["folder"] / f"img{i}.{'bmp' if i == 3 else 'png'}")
    s["colour_folder"].mkdir()
    for i, image in enumerate(colour):
        Image.fromarray(image).save(s["colour_folder"] / f"img{i}.png")
    return s


def check_png(path, n_shown):
    with Image.open(path) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 10, "the grid is blank"
    return pixels


def printed_rmse(stdout: str) -> float:
    return float(re.search(r"image RMSE ([0-9.e+-]+)", stdout).group(1))


# --------------------------------------------------------------------------- rebuilding


def test_a_dataset_store_is_rebuilt_like_the_numpy_reference(setup, tmp_path, process_cluster):
    out = tmp_path / "recon.zarr"
    result = run(
        "reconstruct", setup["results"], "--run", "lloyd-k6", "--images", setup["data"],
        "--out", out, "--grid", 5, "--scheduler", process_cluster.scheduler_address,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    x, recon, mse = reference(setup["gray"], setup["gray_centroids"])
    assert store_kind(out) == "reconstruction"
    ds = open_dataset(out)
    assert ds["reconstructions"].dims == ("image", "y", "x")
    np.testing.assert_allclose(ds["originals"].values, x, rtol=1e-6)
    np.testing.assert_allclose(ds["reconstructions"].values, recon, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds["image_mse"].values, mse, rtol=1e-5)
    rmse = float(np.sqrt(mse.mean()))
    assert ds.attrs["image_rmse"] == pytest.approx(rmse, rel=1e-6)
    assert printed_rmse(result.stdout) == pytest.approx(rmse, rel=1e-5)
    assert ds.attrs["run"] == "lloyd-k6" and ds.attrs["run_id"] == "r1"
    assert ds.attrs["results_store"] == str(setup["results"].resolve())
    assert ds.attrs["source"]["kind"] == "dataset store"
    assert ds.attrs["source"]["path"] == str(setup["data"].resolve())
    assert ds.attrs["coding"] == "nearest" and ds.attrs["sparse_coding"] is None
    png = tmp_path / "recon.png"
    assert f"{png.resolve()}: originals above reconstructions, first 5" in result.stdout
    check_png(png, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recon.png", "recon.zarr"]


def test_a_folder_of_png_and_bmp_files_is_rebuilt(setup, tmp_path, process_cluster):
    out = tmp_path / "folder.zarr"
    result = run(
        "reconstruct", setup["results"], "--run", "lloyd-k6", "--images", setup["folder"],
        "--out", out, "--scheduler", process_cluster.scheduler_address,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    x, recon, mse = reference(setup["gray"], setup["gray_centroids"])
    ds = open_dataset(out)
    np.testing.assert_allclose(ds["originals"].values, x, rtol=1e-6)
    np.testing.assert_allclose(ds["reconstructions"].values, recon, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds["image_mse"].values, mse, rtol=1e-5)
    assert ds.attrs["source"]["kind"] == "image folder"
    assert ds.attrs["source"]["files"] == [f"img{i}.{'bmp' if i == 3 else 'png'}" for i in range(7)]
    check_png(tmp_path / "folder.png", N_IMAGES)


def test_a_colour_folder_is_rebuilt_with_a_colour_dictionary(setup, tmp_path, process_cluster):
    out = tmp_path / "colour.zarr"
    result = run(
        "reconstruct", setup["colour_results"], "--run", "lloyd-k6",
        "--images", setup["colour_folder"], "--out", out,
        "--scheduler", process_cluster.scheduler_address,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    x, recon, mse = reference(setup["colour"], setup["colour_centroids"])
    ds = open_dataset(out)
    assert ds["reconstructions"].dims == ("image", "y", "x", "channel")
    np.testing.assert_allclose(ds["originals"].values, x, rtol=1e-6)
    np.testing.assert_allclose(ds["reconstructions"].values, recon, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds["image_mse"].values, mse, rtol=1e-5)
    with Image.open(tmp_path / "colour.png") as img:
        rgb = np.asarray(img.convert("RGB"), dtype=float)
    # Colour is drawn as colour: the channels of the grid differ somewhere.
    assert np.abs(rgb[..., 0] - rgb[..., 1]).max() > 50


def test_omp_coding_matches_scikit_learn(setup, tmp_path, process_cluster):
    out = tmp_path / "omp.zarr"
    result = run(
        "reconstruct", setup["results"], "--run", "lloyd-k6", "--images", setup["data"],
        "--out", out, "--coding", "omp", "--n-nonzero-coefs", 2,
        "--scheduler", process_cluster.scheduler_address,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    recon, mse = omp_reference(setup["gray"], setup["gray_centroids"], 2)
    ds = open_dataset(out)
    np.testing.assert_allclose(ds["reconstructions"].values, recon, atol=1e-5)
    np.testing.assert_allclose(ds["image_mse"].values, mse, rtol=1e-4)
    assert ds.attrs["sparse_coding"] == {"method": "omp", "n_nonzero_coefs": 2}
    assert "sparse coding omp-n2" in result.stdout
    # Two atoms per patch fit better than the nearest one.
    _, _, nearest = reference(setup["gray"], setup["gray_centroids"])
    assert mse.mean() < nearest.mean()


def test_overwrite_replaces_the_store_and_its_grid(setup, tmp_path, process_cluster):
    out = tmp_path / "again.zarr"
    args = [
        "reconstruct", setup["results"], "--run", "lloyd-k6", "--images", setup["data"],
        "--out", out, "--scheduler", process_cluster.scheduler_address,
    ]  # fmt: skip
    assert run(*args).exit_code == 0
    first_id = open_dataset(out).attrs["dkm_write_id"]
    again = run(*args)
    assert again.exit_code == 1
    assert "--out" in again.stderr and "--overwrite" in again.stderr
    replaced = run(*args, "--overwrite", "--coding", "omp")
    assert replaced.exit_code == 0, replaced.output
    ds = open_dataset(out)
    assert ds.attrs["dkm_write_id"] != first_id and ds.attrs["coding"] == "omp-n2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "again.zarr"]


def test_a_failure_while_computing_leaves_nothing(setup, tmp_path, process_cluster):
    # A chunk whose bytes changed passes every check before compute and fails when read.
    data = tmp_path / "damaged.zarr"
    shutil.copytree(setup["data"], data)
    chunk = next(p for p in (data / "images" / "c").rglob("*") if p.is_file())
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    out = tmp_path / "out" / "recon.zarr"
    result = CliRunner().invoke(
        main,
        [
            "reconstruct", str(setup["results"]), "--run", "lloyd-k6", "--images", str(data),
            "--out", str(out), "--scheduler", process_cluster.scheduler_address,
        ],
    )  # fmt: skip
    assert result.exit_code == 1
    # The one line names the store and its damaged chunk, not only zarr's checksum words.
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"dkm: error: --images {data}: array 'images' chunk c/"), line
    assert "is damaged (CRC32C checksum mismatch)" in line
    assert not out.exists() and not out.with_suffix(".png").exists()
    assert list(out.parent.iterdir()) == []  # no temporary store left behind either


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def odd_folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("odd")
    tiny, mixed = tmp / "tiny", tmp / "mixed"
    tiny.mkdir()
    mixed.mkdir()
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tiny / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(mixed / "b.png")
    taken = tmp / "taken.zarr"
    taken.mkdir()
    (taken / "notes.txt").write_text("not a store")
    png_taken = tmp / "free.png"
    png_taken.write_bytes(b"\x89PNG\r\n\x1a\n")
    return {"tiny": tiny, "mixed": mixed, "taken": taken, "png_taken": png_taken}


BAD = {
    # id: (overrides of the good arguments, words the one error line must hold)
    "not-a-results-store": (
        {"results": "data"},
        ["RESULTS", "a dataset store, not a results store"],
    ),
    "missing-results-store": ({"results": "nowhere"}, ["RESULTS", "no such store"]),
    "run-not-in-store": (
        {"--run": "lloyd-k99"},
        ["--run lloyd-k99: no such run in", "its complete runs: lloyd-k6"],
    ),
    "failed-run": ({"--run": "lloyd-k7"}, ["--run lloyd-k7:", "is failed", "lloyd-k6"]),
    "pixel-feature-run": (
        {"results": "pixel_results", "--run": "lloyd-k3"},
        ["--run lloyd-k3: clusters pixels features, not patches"],
    ),
    "images-smaller-than-a-patch": (
        {"--images": "tiny"},
        ["--images", "patch size 4 is larger than the padded image 3x3", "patches-4x4-s2-p1"],
    ),
    "images-of-other-channels": (
        {"--images": "colour_data"},
        ["--images", "images of 3 channels, but the patches of run lloyd-k6 have 1 channel"],
    ),
    "images-of-several-sizes": ({"--images": "mixed"}, ["--images", "images differ in size"]),
    "images-missing": ({"--images": "nowhere"}, ["--images", "no such file or directory"]),
    "images-from-a-results-store": (
        {"--images": "results"},
        ["--images", "a results store, not a dataset"],
    ),
    "unknown-coding": ({"--coding": "kmeans"}, ["--coding kmeans: must be one of 'omp'"]),
    "n-nonzero-coefs-zero": (
        {"--coding": "omp", "--n-nonzero-coefs": "0"},
        ["--n-nonzero-coefs 0: must be an integer >= 1"],
    ),
    "n-nonzero-coefs-above-the-dictionary": (
        {"--coding": "omp", "--n-nonzero-coefs": "7"},
        ["--n-nonzero-coefs 7:", "more than min(non-zero atoms, features) = min(6, 16) = 6"],
    ),
    "negative-alpha": (
        {"--coding": "lasso_lars", "--alpha": "-1"},
        ["--alpha -1.0: must be a finite number >= 0"],
    ),
    "alpha-for-omp": (
        {"--coding": "omp", "--alpha": "0.5"},
        ["--alpha 0.5: is not used by method 'omp'"],
    ),
    "alpha-without-coding": ({"--alpha": "0.5"}, ["--alpha 0.5: a sparse coding parameter"]),
    "grid-zero": ({"--grid": "0"}, ["--grid 0: must be an integer >= 1"]),
    "out-exists": (
        {"--out": "taken"},
        ["--out", "already exists and", "not a Zarr store", "pass --overwrite"],
    ),
    "out-exists-overwrite-never-replaces-a-results-store": (
        {"--out": "colour_results", "--overwrite": None},
        ["--out", "a results store, which --overwrite never replaces"],
    ),
    "out-png-exists": ({"--out": "free.zarr"}, ["--out", "free.png (its PNG grid) already"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_the_flag_before_any_cluster(
    case, setup, odd_folders, tmp_path, closed_port
):
    overrides, words = BAD[case]
    named = {**setup, **odd_folders, "nowhere": tmp_path / "nowhere"}
    args = {
        "results": setup["results"],
        "--run": "lloyd-k6",
        "--images": setup["data"],
        "--out": tmp_path / "recon.zarr",
    }
    for key, value in overrides.items():
        if key == "--out" and value == "free.zarr":
            value = odd_folders["png_taken"].with_suffix(".zarr")
        args[key] = named.get(value, value) if isinstance(value, str) else value
    argv = [args.pop("results")]
    for key, value in args.items():
        argv += [key] if value is None else [key, value]
    # A closed port: a check that came after connecting would fail on the scheduler instead.
    result = run("reconstruct", *argv, "--scheduler", f"tcp://127.0.0.1:{closed_port}")
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dkm: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "recon.zarr").exists() and not (tmp_path / "recon.png").exists()
    assert result.stdout == ""
