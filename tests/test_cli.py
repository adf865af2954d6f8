"""The ``dkm`` command: datasets, ingest, patches, info; in-process and as a real subprocess.

Pins: ``dkm datasets`` lists the catalog; ``dkm ingest digits`` writes a store and a re-run says
it is already ingested; unknown names, bad sources, bad ``--size`` and unreachable schedulers
exit non-zero with a clear message and write nothing; ``dkm patches`` on a real cluster
(``--scheduler``) writes ``patches(patch, feature)`` with the right shape and values;
``dkm info`` describes a store.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dkm.cli import main
from dkm.data.catalog import DATASETS
from dkm.data.store import open_dataset

DKM = Path(sys.executable).with_name("dkm")


def run(*args):
    """Invoke ``dkm ARGS`` in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("cli") / "digits.zarr"
    result = run("ingest", "digits", "--store", store)
    assert result.exit_code == 0, result.output
    return store


def test_datasets_lists_every_name():
    result = run("datasets")
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert listed == list(DATASETS)
    assert "source: none (bundled)" in result.stdout


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert "0.1.0" in result.stdout


def test_ingest_digits_then_rerun(digits_store):
    ds = open_dataset(digits_store)
    assert ds["images"].shape == (1797, 8, 8)
    mtime = (digits_store / "zarr.json").stat().st_mtime_ns
    again = run("ingest", "digits", "--store", digits_store)
    assert again.exit_code == 0
    assert f"{digits_store}: already ingested (use --overwrite to redo)" in again.stdout
    assert "images {'sample': 1797, 'y': 8, 'x': 8} (digits)" in again.stdout
    assert (digits_store / "zarr.json").stat().st_mtime_ns == mtime


def test_ingest_unknown_name(tmp_path):
    result = run("ingest", "mnsit", "--store", tmp_path / "x.zarr")
    assert result.exit_code == 1
    assert "dkm: error: unknown dataset 'mnsit'; known datasets: cifar10, digits," in result.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_ingest_unknown_name_onto_an_existing_store(digits_store):
    # An unknown name is an error even when --store already holds a complete dataset.
    result = run("ingest", "mnsit", "--store", digits_store)
    assert result.exit_code == 1
    assert "unknown dataset 'mnsit'" in result.stderr


def test_ingest_missing_source_directory(tmp_path):
    result = run("ingest", "mnist", "--store", tmp_path / "m.zarr", "--source", tmp_path / "none")
    assert result.exit_code == 1
    assert "none: not a directory of IDX files" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_ingest_wrong_magic(tmp_path, make_mnist_dir):
    make_mnist_dir(tmp_path / "src")
    (tmp_path / "src" / "train-labels-idx1-ubyte.gz").write_bytes(b"\0\1\2\3 not idx")
    result = run("ingest", "mnist", "--store", tmp_path / "m.zarr", "--source", tmp_path / "src")
    assert result.exit_code == 1
    assert "train-labels-idx1-ubyte.gz: not an IDX file (magic number 00010203" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_ingest_images_with_size_and_bad_size(tmp_path):
    src = tmp_path / "drawn"
    (src / "x").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 30), 60 * i, np.uint8)).save(src / "x" / f"{i}.png")
    good = run(
        "ingest", "images", "--store", tmp_path / "i.zarr", "--source", src, "--resize", "7x9"
    )
    assert good.exit_code == 0, good.output
    assert "images {'sample': 3, 'y': 7, 'x': 9} (images)" in good.stdout
    np.testing.assert_array_equal(
        open_dataset(tmp_path / "i.zarr")["images"][:, 0, 0], [0, 60, 120]
    )

    for bad in ("28", "axb", "28x28x3"):
        result = run(
            "ingest", "images", "--store", tmp_path / "b.zarr", "--source", src, "--resize", bad
        )
        assert result.exit_code == 2
        assert f"expected HEIGHTxWIDTH such as 28x28, got '{bad}'" in result.stderr
    assert not (tmp_path / "b.zarr").exists()


def test_bad_option_pair(tmp_path):
    result = run("ingest", "synthetic", "--store", tmp_path / "s.zarr", "-o", "n_samples")
    assert result.exit_code == 2
    assert "expected KEY=VALUE, got 'n_samples'" in result.stderr


def test_ingest_synthetic_on_given_scheduler(tmp_path, process_cluster):
    store = tmp_path / "s.zarr"
    result = run(
        "ingest", "synthetic", "--store", store, "-o", "n_samples=3000", "-o", "n-features=4",
        "-o", "centers=3", "--scheduler", process_cluster.scheduler_address,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "features {'sample': 3000, 'feature': 4} (synthetic)" in result.stdout
    assert open_dataset(store)["centers"].shape == (3, 4)


def test_patches_on_the_cluster(digits_store, tmp_path, process_cluster):
    out = tmp_path / "p.zarr"
    args = ("patches", digits_store, "--size", 4, "--stride", 4, "--pad", 0, "--out", out)
    result = run(*args, "--scheduler", process_cluster.scheduler_address)
    assert result.exit_code == 0, result.output
    assert f"{out}: patches {{'patch': 7188, 'feature': 16}} float32" in result.stdout

    patches = open_dataset(out)["patches"]
    assert patches.dims == ("patch", "feature")
    assert patches.shape == (1797 * 4, 16)  # 8x8 digits, 4x4 windows: 4 per image
    assert patches.dtype == np.float32
    images = open_dataset(digits_store)["images"].values
    np.testing.assert_array_equal(patches["image"].values[:8], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(patches["row"].values[:4], [0, 0, 4, 4])
    np.testing.assert_array_equal(patches["col"].values[:4], [0, 4, 0, 4])
    expected = images[1, 4:8, 0:4].reshape(-1) / np.float32(255)
    np.testing.assert_allclose(patches[6].values, expected, rtol=1e-6)

    again = run(*args, "--scheduler", process_cluster.scheduler_address)
    assert again.exit_code == 0
    assert f"{out}: already written (use --overwrite to redo)" in again.stdout

    other_layout = run("patches", digits_store, "--size", 2, "--out", out)
    assert other_layout.exit_code == 1
    assert "holds patches" in other_layout.stderr and "--overwrite" in other_layout.stderr


def test_patches_refuses_a_store_without_images(tmp_path, process_cluster):
    store = tmp_path / "s.zarr"
    addr = process_cluster.scheduler_address
    assert (
        run(
            "ingest", "synthetic", "--store", store, "-o", "n_samples=100", "--scheduler", addr
        ).exit_code
        == 0
    )
    result = run("patches", store, "--size", 2, "--out", tmp_path / "p.zarr", "--scheduler", addr)
    assert result.exit_code == 1
    assert "s.zarr: has no 'images' variable" in result.stderr
    assert not (tmp_path / "p.zarr").exists()


def test_patches_out_is_a_dataset_store(digits_store, tmp_path):
    # --out pointing at a complete store that is not a patch store: a clear error, no traceback.
    other = tmp_path / "other.zarr"
    assert run("ingest", "digits", "--store", other).exit_code == 0
    result = CliRunner().invoke(
        main, ["patches", str(digits_store), "--size", "4", "--out", str(other)]
    )
    assert result.exit_code == 1, result.exception
    assert "other.zarr" in result.stderr and "patches" in result.stderr
    assert open_dataset(other)["images"].shape == (1797, 8, 8)


def test_info(digits_store, tmp_path):
    result = run("info", digits_store)
    assert result.exit_code == 0
    assert "images" in result.stdout and "(sample, y, x) uint8" in result.stdout
    assert "dkm_status:" in result.stdout and "complete" in result.stdout
    missing = run("info", tmp_path / "nothing.zarr")
    assert missing.exit_code == 1
    assert "nothing.zarr: no such store" in missing.stderr


# ----------------------------------------------------------------------------- real processes


def _dkm(*args, timeout=120):
    return subprocess.run(
        [str(DKM), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_subprocess_ingest_then_in_process_rerun(tmp_path):
    store = tmp_path / "digits.zarr"
    first = _dkm("ingest", "digits", "--store", store)
    assert first.returncode == 0, first.stderr
    assert f"{store}: images {{'sample': 1797, 'y': 8, 'x': 8}} (digits)" in first.stdout
    assert "Traceback" not in first.stderr
    second = run("ingest", "digits", "--store", store)
    assert second.exit_code == 0
    assert "already ingested" in second.stdout


@pytest.mark.slow
def test_unreachable_scheduler(digits_store, tmp_path, closed_port):
    address = f"tcp://127.0.0.1:{closed_port}"
    out = tmp_path / "p.zarr"
    result = run("patches", digits_store, "--size", 4, "--out", out, "--scheduler", address)
    assert result.exit_code == 1
    assert f"dkm: error: no Dask scheduler answered at {address} within 10 s" in result.stderr
    assert not out.exists()
