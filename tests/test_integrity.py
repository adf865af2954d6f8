"""A store that says complete holds what was computed, and damage is detected and named.

Every kind of store (a dataset store, a patch store, a results store) is written for real in
tmp_path, then one chunk file is deleted, truncated to half, or has one bit flipped. Pins:
the cheap check on open (``open_dataset``, ``ResultsStore.runs``) names a missing chunk; the
deep pass (``verify_store``, ``ResultsStore.verify_run``, ``dkm verify``) names all three,
with store, array and chunk key and no traceback; an intact store passes and is stamped
verified until it is written again; stores written before checksums and manifests existed
read and verify without false alarms.
"""

from __future__ import annotations

import re
import shutil
import uuid

import dask
import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner

from dkm._parallel.base import FitState
from dkm.cli import main
from dkm.data.integrity import is_verified, verify_store
from dkm.data.store import (
    KIND_ATTR,
    MANIFEST_ATTR,
    STATUS_ATTR,
    VERIFIED_ATTR,
    WRITE_ID_ATTR,
    StoreError,
    open_dataset,
    probe,
    read_attrs,
    write_atomic,
)
from dkm.features import PatchLayout, cut_patches
from dkm.results import ResultsStore, load_model, run_name
from dkm.results.store import as_variables

N = 20  # images of 8x8, 3 per chunk: 7 chunks, the last one short


@pytest.fixture(autouse=True)
def sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


def cli(*args):
    return CliRunner().invoke(main, ["verify", *map(str, args)], catch_exceptions=False)


def images_ds(zero_chunk=False):
    images = np.random.default_rng(0).integers(1, 255, (N, 8, 8), dtype=np.uint8)
    if zero_chunk:
        images[3:6] = 0  # a chunk equal to the fill value is still written
    return xr.Dataset(
        {
            "images": (("sample", "y", "x"), images),
            "label": ("sample", np.arange(N) % 3),
            "split": ("sample", np.array(["train"] * N, dtype=object)),
        },
        attrs={"dataset": "npz"},
    )


def write_dataset(path, zero_chunk=False):
    encoding = {"images": {"chunks": (3, 8, 8)}}
    return write_atomic(images_ds(zero_chunk), path, kind="dataset", encoding=encoding)


def write_patches_store(tmp_path):
    data = write_dataset(tmp_path / "data.zarr")
    out = tmp_path / "patches.zarr"
    # 4 patches of 64 bytes per image: 1 KiB chunks hold 4 images, 5 chunks in all.
    with dask.config.set({"dkm.store.feature-chunk-bytes": "1KiB"}):
        cut_patches(open_dataset(data)["images"], PatchLayout(4), out, source_store=data)
    return out


def history(n=3):
    return xr.Dataset(
        {"inertia": ("iteration", np.linspace(3, 1, n))}, coords={"iteration": np.arange(n)}
    )


def write_results(path, ks=(2, 8)):
    results = ResultsStore(path)
    results.start_job({"job": {"name": "t"}, "tile_shape": [4, 4]})
    for k in ks:
        results.write_run(
            run_name("lloyd", k),
            as_variables(
                centroids=np.arange(k * 16, dtype=np.float32).reshape(k, 16),
                x_mean=np.zeros(16, np.float32),
                labels=np.arange(10) % k,
            ),
            history(),
            {"algorithm": "lloyd", "k": k, "n_iter": 3, "inertia": 1.0, "metrics": {}},
        )
    results.finish("complete")
    return results


# --------------------------------------------------------------------------- damage


def delete(path):
    path.unlink()


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {"deleted": delete, "truncated": truncate, "flipped": flip}
CRC = "is damaged (CRC32C checksum mismatch)"


def assert_cli_names(path, *words):
    result = cli(path)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"dkm: error: {path}: ")
    for word in words:
        assert word in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


# --------------------------------------------------------------------------- dataset, patches


def test_every_array_is_checksummed_and_every_chunk_written(tmp_path):
    path = write_dataset(tmp_path / "d.zarr", zero_chunk=True)
    manifest = read_attrs(path)[MANIFEST_ATTR]
    assert manifest["arrays"]["images"] == {
        "shape": [N, 8, 8],
        "chunks": [3, 8, 8],
        "n_chunks": 7,
        "checksum": "crc32c",
    }
    assert sorted(manifest["arrays"]) == ["images", "label", "split"]
    assert all(a["checksum"] == "crc32c" for a in manifest["arrays"].values())
    codecs = [c.to_dict()["name"] for c in zarr.open_array(str(path / "images")).metadata.codecs]
    assert codecs == ["bytes", "zstd", "crc32c"]
    # The all-zero chunk (the fill value) is on disk too: an absent chunk means damage.
    assert sorted(p.name for p in (path / "images/c").iterdir()) == [str(i) for i in range(7)]
    np.testing.assert_array_equal(open_dataset(path)["images"].values, images_ds(True).images)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_dataset_chunk_is_named(tmp_path, damage):
    path = write_dataset(tmp_path / "d.zarr")
    DAMAGE[damage](path / "images/c/3/0/0")
    if damage == "deleted":
        message = f"{path}: array 'images' is missing chunk c/3/0/0 (1 of 7 chunks)"
        with pytest.raises(StoreError) as err:
            open_dataset(path)
        assert str(err.value) == f"{message}; the store is damaged"
        assert not probe(path).complete and "missing chunk c/3/0/0" in probe(path).what
    else:  # the listing cannot see changed bytes: that takes reading them
        message = f"{path}: array 'images' chunk c/3/0/0 {CRC}"
        open_dataset(path)
    with pytest.raises(StoreError) as err:
        verify_store(path)
    assert str(err.value) == f"{message}; the store is damaged"
    assert not is_verified(path)
    assert_cli_names(path, "array 'images'", "c/3/0/0", "the store is damaged")


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_patch_chunk_is_named(tmp_path, damage):
    path = write_patches_store(tmp_path)
    assert read_attrs(path)[MANIFEST_ATTR]["arrays"]["patches"]["n_chunks"] == 5
    DAMAGE[damage](path / "patches/c/1/0")
    if damage == "deleted":
        with pytest.raises(StoreError, match=r"array 'patches' is missing chunk c/1/0 \(1 of 5"):
            open_dataset(path)
        words = "array 'patches' is missing chunk c/1/0"
    else:
        words = f"array 'patches' chunk c/1/0 {CRC}"
    with pytest.raises(StoreError, match="^" + re.escape(f"{path}: {words}")):
        verify_store(path)
    assert_cli_names(path, words)


def test_every_damaged_chunk_is_named_on_a_cluster(tmp_path, client):
    path = write_dataset(tmp_path / "d.zarr")
    delete(path / "images/c/0/0/0")
    truncate(path / "images/c/2/0/0")
    flip(path / "label/c/0")
    with pytest.raises(StoreError) as err:
        verify_store(path, client=client)
    assert str(err.value) == (
        f"{path}: array 'images' is missing chunk c/0/0/0 (1 of 7 chunks); "
        f"array 'images' chunk c/2/0/0 {CRC}; array 'label' chunk c/0 {CRC}; "
        "the store is damaged"
    )


def test_garbage_in_a_chunk_is_named_not_a_codec_error(tmp_path):
    path = write_dataset(tmp_path / "d.zarr")
    (path / "images/c/6/0/0").write_bytes(b"\x00garbage" * 8)
    with pytest.raises(StoreError, match=r"array 'images' chunk c/6/0/0 is damaged \(CRC32C"):
        verify_store(path)
    (path / "images/c/6/0/0").write_bytes(b"")
    with pytest.raises(StoreError, match=r"has an empty chunk file c/6/0/0 \(1 of 7 chunks\)"):
        open_dataset(path)


@pytest.mark.parametrize("kind", ["dataset", "patches"])
def test_an_intact_store_passes_until_it_is_written_again(tmp_path, kind):
    path = write_patches_store(tmp_path) if kind == "patches" else write_dataset(tmp_path / "d")
    assert not is_verified(path)
    report = verify_store(path)
    arrays, chunks = (4, 20) if kind == "patches" else (3, 9)  # patches, image, row, col
    assert (report.kind, report.arrays, report.chunks) == (kind, arrays, chunks)
    assert report.summary() == f"{path}: {arrays} arrays, {chunks} chunks, all intact"
    assert is_verified(path)
    assert read_attrs(path)[VERIFIED_ATTR] == read_attrs(path)[WRITE_ID_ATTR]
    result = cli(path)
    assert result.exit_code == 0 and result.stdout == f"{report.summary()}\n"
    assert probe(path).complete  # the stamp changes nothing else
    write_atomic(open_dataset(path).load(), path, kind=kind, overwrite=True)
    assert not is_verified(path) and VERIFIED_ATTR not in read_attrs(path)


def test_a_store_written_before_manifests_reads_and_verifies(tmp_path):
    path = tmp_path / "old.zarr"
    ds = images_ds()
    ds.attrs.update(
        {KIND_ATTR: "dataset", WRITE_ID_ATTR: uuid.uuid4().hex, STATUS_ATTR: "complete"}
    )
    encoding = {"images": {"chunks": (3, 8, 8)}}  # no checksums, no manifest
    ds.to_zarr(str(path), zarr_format=3, consolidated=True, encoding=encoding)
    np.testing.assert_array_equal(open_dataset(path)["images"].values, images_ds().images)
    report = verify_store(path)
    assert (report.arrays, report.chunks, report.checksummed) == (3, 9, False)
    assert "all intact" in report.summary() and is_verified(path)
    # Without a manifest an absent chunk may be the fill value: no false alarm.
    delete(path / "images/c/1/0/0")
    open_dataset(path)
    verify_store(path)
    # A chunk that no longer decompresses is still found.
    (path / "images/c/2/0/0").write_bytes(b"\x00garbage" * 8)
    with pytest.raises(StoreError, match=f"^{path}: array 'images' chunk c/2/0/0 is damaged"):
        verify_store(path)


def test_a_store_without_a_write_id_verifies_but_is_never_marked(tmp_path):
    path = tmp_path / "legacy.zarr"
    images_ds().assign_attrs({STATUS_ATTR: "complete"}).to_zarr(str(path), zarr_format=3)
    before = (path / "zarr.json").read_bytes()
    assert verify_store(path).summary().startswith(f"{path}: 3 arrays, 3 chunks, all intact")
    assert not is_verified(path)  # nothing to tie the check to: and its identity is kept
    assert (path / "zarr.json").read_bytes() == before


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("array", ["centroids", "history/inertia"])
def test_a_damaged_run_chunk_is_named(tmp_path, damage, array):
    results = write_results(tmp_path / "r.zarr")
    key = "c/0/0" if array == "centroids" else "c/0"
    DAMAGE[damage](results.path / "runs/lloyd-k8" / array / key)
    runs = {r.name: r for r in results.runs()}
    assert runs["lloyd-k2"].status == "complete" and results.verify_run("lloyd-k2") is None
    if damage == "deleted":
        problem = (
            f"{results.path}: run 'lloyd-k8': array {array!r} is missing chunk {key} (1 of 1 chunk)"
        )
        assert runs["lloyd-k8"].status == "damaged" and runs["lloyd-k8"].problem == problem
        assert results.completed_runs() == {"lloyd-k2"}
    else:
        problem = f"{results.path}: run 'lloyd-k8': array {array!r} chunk {key} {CRC}"
        assert runs["lloyd-k8"].status == "complete"  # found by reading it:
        with pytest.raises(StoreError) as err:
            load_model(results.path, "lloyd-k8")
        assert str(err.value) == problem
    assert results.verify_run("lloyd-k8") == problem
    with pytest.raises(StoreError) as err:
        verify_store(results.path)
    inner = problem.removeprefix(f"{results.path}: ")
    assert str(err.value) == f"{results.path}: {inner}; the store is damaged"
    assert not is_verified(results.path)
    assert_cli_names(results.path, f"run 'lloyd-k8': array {array!r}", key)


def test_an_intact_results_store_passes_until_a_run_is_written_again(tmp_path):
    results = write_results(tmp_path / "r.zarr")
    manifest = results.run_info("lloyd-k8").attrs[MANIFEST_ATTR]
    assert sorted(manifest["arrays"]) == [
        "centroids",
        "history/inertia",
        "history/iteration",
        "labels",
        "x_mean",
    ]
    assert not is_verified(results.path)
    report = verify_store(results.path)
    # 2 runs x 5 arrays + the sweep's... none written here
    assert (report.kind, report.runs, report.arrays, report.chunks) == ("results", 2, 10, 10)
    assert report.summary() == f"{results.path}: 2 complete runs, 10 arrays, 10 chunks, all intact"
    assert is_verified(results.path)
    assert cli(results.path).stdout == f"{report.summary()}\n"
    results.add_to_run("lloyd-k2", {"metrics": {"nmi": 0.5}})  # attrs only: data unchanged
    assert is_verified(results.path)
    results.add_to_run("lloyd-k2", variables=as_variables(labels=np.zeros(10, np.int64)))
    assert not is_verified(results.path) and results.verify_run("lloyd-k2") is None
    verify_store(results.path)
    write_results(results.path, ks=(8,))
    assert not is_verified(results.path)


def test_runs_written_before_manifests_read_without_false_alarms(tmp_path):
    path = tmp_path / "old.zarr"
    root = zarr.open_group(str(path), mode="w-", zarr_format=3)
    root.attrs.update({"job": {"name": "old"}, "status": "complete"})
    attrs = {"algorithm": "lloyd", "k": 2, "status": "complete", "variables": ["centroids"]}
    xr.Dataset(
        {"centroids": (("cluster", "feature"), np.zeros((2, 4), np.float32))}, attrs=attrs
    ).to_zarr(path, group="runs/lloyd-k2", mode="w", consolidated=False)
    history().to_zarr(path, group="runs/lloyd-k2/history", mode="w", consolidated=False)
    results = ResultsStore(path)
    assert results.run_info("lloyd-k2").status == "complete"
    assert results.verify_run("lloyd-k2") is None
    report = verify_store(path)
    assert (report.runs, report.checksummed) == (1, False)
    assert not is_verified(path)  # runs without a write id cannot be marked
    assert cli(path).exit_code == 0


def test_a_damaged_checkpoint_slot_falls_back_to_the_other(tmp_path):
    results = write_results(tmp_path / "r.zarr", ks=())

    def state(iteration):
        return FitState(
            0, iteration, {"centers": np.full((2, 3), iteration, np.float32)}, history()
        )

    results.write_checkpoint("lloyd-k2", state(1), run_id="a")
    results.write_checkpoint("lloyd-k2", state(2), run_id="a")
    assert results.read_checkpoint("lloyd-k2", "a").iteration == 2
    newest = max(
        (results.path / "checkpoints/lloyd-k2").glob("slot-*"),
        key=lambda p: zarr.open_group(str(p)).attrs["written"],
    )
    flip(newest / "centers/c/0/0")
    assert results.read_checkpoint("lloyd-k2", "a").iteration == 1
    shutil.rmtree(
        results.path
        / "checkpoints/lloyd-k2"
        / {"slot-0": "slot-1", "slot-1": "slot-0"}[newest.name]
    )
    assert results.read_checkpoint("lloyd-k2", "a") is None
