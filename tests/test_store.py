"""How a dkm store is marked, recognised, opened and replaced (dkm.data.store).

Pins: every write stamps ``dkm_store`` (its kind), a fresh ``dkm_write_id`` and
``dkm_status = "complete"`` together; stores written before those marks are still recognised by
their attrs; a missing path, a regular file, a directory without ``zarr.json``, a damaged root
``zarr.json`` and missing or damaged array metadata are each a StoreError naming the path (and
the variable), never a traceback or a silently smaller Dataset; ``write_atomic`` never replaces
a store of another kind, a results store, a file or a foreign directory, not even with
``overwrite``; and no message in this layer tells the user to "pass overwrite".
All stores are real Zarr v3 stores in tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import pickle

import dask
import numpy as np
import pytest
import xarray as xr
import zarr

from dkm.data.catalog import ingest
from dkm.data.store import (
    KIND_ATTR,
    STATUS_ATTR,
    WRITE_ID_ATTR,
    StoreError,
    is_complete,
    open_dataset,
    probe,
    read_attrs,
    require_complete,
    rows_per_chunk,
    store_identity,
    store_kind,
    store_marks,
    write_atomic,
)


def images_ds(n=4, **attrs):
    rng = np.random.default_rng(n)
    return xr.Dataset(
        {
            "images": (("sample", "y", "x"), rng.integers(0, 256, (n, 5, 5), dtype=np.uint8)),
            "label": ("sample", np.arange(n)),
            "split": ("sample", np.array(["train"] * n, dtype=object)),
        },
        attrs=attrs,
    )


def patches_ds(**attrs):
    return xr.Dataset(
        {
            "patches": (("patch", "feature"), np.ones((6, 4), np.float32)),
            "image": ("patch", np.arange(6, dtype=np.int32)),
        },
        attrs={"patch_size": 2, **attrs},
    )


def features_ds():
    return xr.Dataset({"features": (("sample", "feature"), np.ones((5, 3), np.float32))})


def results_store(path, *, marked=True):
    """A results store as ResultsStore.create leaves it (a group written in place)."""
    root = zarr.open_group(str(path), mode="w-", zarr_format=3)
    attrs = {"job": {"name": "j"}, "status": "running"}
    root.attrs.update({**(store_marks("results") if marked else {}), **attrs})
    root.create_group("runs")
    return path


def legacy(ds, path):
    """A store as dkm wrote it before dkm_store/dkm_write_id: only dkm_status, consolidated."""
    ds.assign_attrs({STATUS_ATTR: "complete"}).to_zarr(str(path), zarr_format=3, consolidated=True)
    return path


def no_overwrite_advice(err):
    assert "overwrite" not in str(err.value)


# ----------------------------------------------------------------------------- StoreError


def test_store_error_problem_and_remedy():
    plain = StoreError("x.zarr: no such store")
    assert str(plain) == "x.zarr: no such store"
    assert plain.problem == "x.zarr: no such store" and plain.remedy is None
    advised = StoreError("x.zarr: incomplete", remedy="write it again")
    assert str(advised) == "x.zarr: incomplete; write it again"
    assert (advised.problem, advised.remedy) == ("x.zarr: incomplete", "write it again")
    back = pickle.loads(pickle.dumps(advised))  # errors travel between processes
    assert (str(back), back.problem, back.remedy) == (
        str(advised),
        "x.zarr: incomplete",
        "write it again",
    )
    assert isinstance(advised, RuntimeError)


# ----------------------------------------------------------------------------- kinds


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda p: write_atomic(images_ds(), p, kind="dataset"), "dataset"),
        (lambda p: write_atomic(patches_ds(), p, kind="patches"), "patches"),
        (lambda p: write_atomic(features_ds(), p, kind="features"), "features"),
        (lambda p: results_store(p), "results"),
        # kind left out (callers written before it): inferred from the variables
        (lambda p: write_atomic(images_ds(), p), "dataset"),
        (lambda p: write_atomic(features_ds(), p), "dataset"),
        (lambda p: write_atomic(patches_ds(), p), "patches"),
        # written before dkm_store existed: inferred from their own attrs
        (lambda p: legacy(images_ds(dataset="digits"), p), "dataset"),
        (lambda p: legacy(patches_ds(dataset="digits"), p), "patches"),
        (lambda p: results_store(p, marked=False), "results"),
    ],
    ids=[
        "dataset", "patches", "features", "results", "default-images", "default-features",
        "default-patches", "legacy-dataset", "legacy-patches", "legacy-results",
    ],
)  # fmt: skip
def test_store_kind(tmp_path, make, kind):
    store = tmp_path / "s.zarr"
    make(store)
    assert store_kind(store) == kind
    attrs = read_attrs(store)
    if KIND_ATTR in attrs:
        assert attrs[KIND_ATTR] == kind and len(attrs[WRITE_ID_ATTR]) == 32
    if kind != "results":
        assert is_complete(store)
        assert probe(store).what == f"is a complete {kind} store"


def test_marks_written_together_and_never_copied(tmp_path):
    first = write_atomic(images_ds(dataset="digits"), tmp_path / "a.zarr", kind="dataset")
    attrs = read_attrs(first)
    assert attrs[KIND_ATTR] == "dataset" and attrs[STATUS_ATTR] == "complete"
    assert attrs["dataset"] == "digits"
    # A Dataset read from one store carries its marks; a copy written elsewhere gets its own.
    copy = write_atomic(open_dataset(first).load(), tmp_path / "b.zarr", kind="features")
    assert read_attrs(copy)[KIND_ATTR] == "features"
    assert store_identity(copy) != store_identity(first)


def test_kind_cannot_be_inferred_or_is_unknown(tmp_path):
    other = xr.Dataset({"a": ("x", np.arange(3))})
    with pytest.raises(
        ValueError, match=r"give kind= .*cannot be inferred from the variables \['a'\]"
    ):
        write_atomic(other, tmp_path / "a.zarr")
    with pytest.raises(ValueError, match="store kind must be one of dataset, patches, features"):
        write_atomic(other, tmp_path / "a.zarr", kind="model")
    assert list(tmp_path.iterdir()) == []


def test_not_a_dkm_store(tmp_path):
    store = tmp_path / "foreign.zarr"
    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(str(store), zarr_format=3, consolidated=False)
    with pytest.raises(
        StoreError,
        match=r"foreign\.zarr: a Zarr store, but not one dkm wrote \(no dkm_store attribute\)$",
    ):
        store_kind(store)
    assert not is_complete(store)
    assert probe(store).what == "is a Zarr store that dkm did not write"


# ----------------------------------------------------------------------------- root metadata


def test_read_attrs_errors_name_the_path(tmp_path):
    with pytest.raises(StoreError, match=r"gone\.zarr: no such store$"):
        read_attrs(tmp_path / "gone.zarr")
    (tmp_path / "file.zarr").write_text("precious")
    with pytest.raises(StoreError, match=r"file\.zarr: a regular file, not a Zarr store"):
        read_attrs(tmp_path / "file.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match=r"plain: not a Zarr v3 store \(no zarr\.json\)$"):
        read_attrs(tmp_path / "plain")
    array = tmp_path / "array.zarr"
    zarr.create_array(str(array), shape=(3,), dtype="i4", zarr_format=3)
    with pytest.raises(StoreError, match=r"array\.zarr: a Zarr array, not a group"):
        read_attrs(array)
    listed = tmp_path / "list.zarr"
    listed.mkdir()
    (listed / "zarr.json").write_text("[1, 2]")
    with pytest.raises(
        StoreError, match=r"damaged metadata in .*list\.zarr/zarr\.json: not a JSON object"
    ):
        read_attrs(listed)


@pytest.mark.parametrize("damage", ["deleted", "truncated", "garbage-bytes"])
def test_damaged_root_metadata(tmp_path, damage):
    store = ingest("digits", tmp_path / "d.zarr")
    meta = store / "zarr.json"
    if damage == "deleted":
        meta.unlink()
        expected = r"d\.zarr: not a Zarr v3 store \(no zarr\.json\)$"
    elif damage == "truncated":
        meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
        expected = (
            r"^damaged metadata in .*d\.zarr/zarr\.json: invalid JSON \(.*: line \d+ column \d+\)$"
        )
    else:
        meta.write_bytes(b"\xff\xfe" + b"\x00" * 40)
        expected = r"^damaged metadata in .*d\.zarr/zarr\.json: not UTF-8 text$"
    for reader in (read_attrs, store_kind, store_identity, open_dataset):
        with pytest.raises(StoreError, match=expected) as err:
            reader(store)
        no_overwrite_advice(err)
        assert "Traceback" not in str(err.value) and len(str(err.value)) < 300
    assert not is_complete(store)
    state = probe(store)
    assert state.kind == "dataset" and not state.complete  # recognised from its arrays
    assert state.what.startswith("is a damaged dataset store (")


# ----------------------------------------------------------------------------- variables


@pytest.mark.parametrize("consolidated", [True, False], ids=["consolidated", "plain"])
@pytest.mark.parametrize("variable", ["images", "label"])
def test_deleted_array_metadata(tmp_path, consolidated, variable):
    # With consolidated metadata xarray would read the copy in the root and never notice;
    # without it the variable would silently vanish from the Dataset.
    store = tmp_path / "d.zarr"
    if consolidated:
        write_atomic(images_ds(dataset="x"), store, kind="dataset")
    else:
        images_ds(dataset="x", dkm_status="complete").to_zarr(
            str(store), zarr_format=3, consolidated=False
        )
    (store / variable / "zarr.json").unlink()
    with pytest.raises(
        StoreError,
        match=rf"d\.zarr: variable '{variable}' has no metadata \(.*d\.zarr/{variable}/zarr\.json "
        "is missing\\)",
    ) as err:
        open_dataset(store)
    no_overwrite_advice(err)
    state = probe(store)
    assert (state.kind, state.complete) == ("dataset", False)
    assert f"variable '{variable}'" in state.what


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda raw: raw[: len(raw) // 2], r"invalid JSON"),
        (lambda raw: b'{"zarr_format": 3, "node_type": "array"}', r"\S"),  # zarr's own parser
        (lambda raw: raw.replace(b'"array"', b'"group"'), r"it is a group, the consolidated"),
    ],
    ids=["truncated", "incomplete-fields", "wrong-node-type"],
)
def test_damaged_array_metadata(tmp_path, damage, reason):
    store = write_atomic(images_ds(dataset="x"), tmp_path / "d.zarr", kind="dataset")
    meta = store / "images" / "zarr.json"
    meta.write_bytes(damage(meta.read_bytes()))
    with pytest.raises(
        StoreError,
        match=rf"^damaged metadata in .*d\.zarr/images/zarr\.json \(variable 'images'\): {reason}",
    ):
        open_dataset(store)


def test_open_dataset_reads_what_was_written(tmp_path):
    ds = images_ds(7, dataset="x")
    store = write_atomic(ds, tmp_path / "d.zarr", kind="dataset")
    back = open_dataset(store)
    assert back["images"].chunks is not None  # lazy
    np.testing.assert_array_equal(back["images"].values, ds["images"].values)
    assert back.attrs[KIND_ATTR] == "dataset"


def test_open_dataset_refuses_a_results_store(tmp_path):
    store = results_store(tmp_path / "r.zarr")
    with pytest.raises(
        StoreError, match=r"r\.zarr: a results store, not a dataset, patches or features store"
    ) as err:
        open_dataset(store)
    assert err.value.remedy == "read it with xarray.open_datatree or dkm show"


def test_require_complete_checks_the_kind(tmp_path):
    store = write_atomic(patches_ds(), tmp_path / "p.zarr", kind="patches")
    assert require_complete(store, "patches")["patch_size"] == 2
    with pytest.raises(StoreError, match=r"p\.zarr: a patches store, not a dataset store$"):
        require_complete(store, "dataset")


# ----------------------------------------------------------------------------- identity


def test_store_identity_changes_when_rewritten(tmp_path):
    store = ingest("digits", tmp_path / "d.zarr")
    first = store_identity(store)
    assert first == read_attrs(store)[WRITE_ID_ATTR] and store_identity(store) == first
    ingest("digits", store)  # reused: untouched
    assert store_identity(store) == first
    ingest("digits", store, overwrite=True)
    assert store_identity(store) != first


def test_store_identity_of_older_stores_is_the_metadata_digest(tmp_path):
    store = legacy(images_ds(dataset="x"), tmp_path / "old.zarr")
    digest = hashlib.sha256((store / "zarr.json").read_bytes()).hexdigest()
    assert store_identity(store) == digest
    legacy(images_ds(9, dataset="x"), tmp_path / "new.zarr")
    (tmp_path / "old.zarr" / "zarr.json").write_bytes(
        (tmp_path / "new.zarr" / "zarr.json").read_bytes()
    )
    assert store_identity(store) != digest


# ----------------------------------------------------------------------------- replacing


def test_write_atomic_refuses_an_existing_path(tmp_path):
    store = write_atomic(images_ds(), tmp_path / "d.zarr", kind="dataset")
    with pytest.raises(
        StoreError, match=r"d\.zarr: already exists and is a complete dataset store$"
    ) as err:
        write_atomic(images_ds(), store, kind="dataset")
    no_overwrite_advice(err)
    again = write_atomic(images_ds(9), store, kind="dataset", overwrite=True)
    assert open_dataset(again).sizes["sample"] == 9


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda p: results_store(p), "is a results store"),
        (lambda p: write_atomic(images_ds(), p, kind="dataset"), "is a complete dataset store"),
        (lambda p: p.write_text("precious"), "is a regular file"),
        (
            lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")),
            "is a directory that is not a Zarr store",
        ),
    ],
    ids=["results", "dataset", "file", "foreign-dir"],
)
def test_overwrite_never_replaces_another_kind(tmp_path, make, what):
    store = tmp_path / "p.zarr"
    make(store)
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    with pytest.raises(
        StoreError, match=rf"p\.zarr: {what}, which dkm never replaces with a patches store"
    ):
        write_atomic(patches_ds(), store, kind="patches", overwrite=True)
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_a_damaged_store_of_its_kind(tmp_path):
    store = write_atomic(patches_ds(), tmp_path / "p.zarr", kind="patches")
    (store / "zarr.json").write_text("{")
    assert probe(store).kind == "patches"
    write_atomic(patches_ds(), store, kind="patches", overwrite=True)
    assert open_dataset(store)["patches"].shape == (6, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["p.zarr"]


def test_probe(tmp_path):
    assert probe(tmp_path / "nothing") is None
    (tmp_path / "empty").mkdir()
    empty = probe(tmp_path / "empty")
    assert empty.empty and empty.replaceable_by("dataset") and empty.kind is None
    results = probe(results_store(tmp_path / "r.zarr"))
    assert results.kind == "results" and not results.replaceable_by("results")
    incomplete = tmp_path / "i.zarr"
    images_ds(dkm_store="dataset").to_zarr(str(incomplete), zarr_format=3, consolidated=False)
    state = probe(incomplete)
    assert (state.kind, state.complete) == ("dataset", False)
    assert state.what == "is an incomplete dataset store (it was interrupted while being written)"
    assert state.replaceable_by("dataset") and not state.replaceable_by("patches")


# ----------------------------------------------------------------------------- chunking


def test_rows_per_chunk_default_comes_from_config():
    assert rows_per_chunk(100, 10**9) == 64 * 2**20 // 100
    with dask.config.set({"dkm.store.feature-chunk-bytes": "1KiB"}):
        assert rows_per_chunk(100, 10**9) == 10
    assert rows_per_chunk(100, 10**9, 1000) == 10
    assert rows_per_chunk(10**9, 5) == 1 and rows_per_chunk(1, 3) == 3


def test_consolidated_metadata_lists_every_variable(tmp_path):
    store = write_atomic(images_ds(), tmp_path / "d.zarr", kind="dataset")
    meta = json.loads((store / "zarr.json").read_bytes())
    assert sorted(meta["consolidated_metadata"]["metadata"]) == ["images", "label", "split"]


def test_a_dead_writers_temporary_store_is_removed_by_the_next_write(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    host = socket.gethostname().replace("-", "_")
    stale = tmp_path / f".d.zarr.tmp-{host}-{dead}-0a1b2c3d"
    live = tmp_path / f".d.zarr.tmp-{host}-{os.getpid()}-0a1b2c3d"
    other_host = tmp_path / f".d.zarr.tmp-elsewhere-{dead}-0a1b2c3d"
    for folder in (stale, live, other_host):
        (folder / "images").mkdir(parents=True)
    write_atomic(images_ds(), tmp_path / "d.zarr", kind="dataset")
    assert not stale.exists()
    assert live.exists() and other_host.exists()
