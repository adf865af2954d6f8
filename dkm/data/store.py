"""How a dkm store is marked, written atomically and recognised again.

This module is the single owner of the conventions every dkm Zarr v3 store follows:

- ``dkm_store`` (:data:`KIND_ATTR`): what the store holds, one of :data:`KINDS`
  (``"dataset"``, ``"patches"``, ``"features"``, ``"results"``);
- ``dkm_write_id`` (:data:`WRITE_ID_ATTR`): a fresh random id per write, so a reader can tell
  that a store was rewritten even when its path and contents look alike;
- ``dkm_status = "complete"`` (:data:`STATUS_ATTR`): set only after all data is on disk;
- ``dkm_manifest`` (:data:`MANIFEST_ATTR`): stamped with the other marks, what was written:
  per array its chunk grid (shape, chunk shape, number of chunks) and its checksum codec;
- ``dkm_verified`` (:data:`VERIFIED_ATTR`): the write id of the last write whose every chunk
  a deep pass (:func:`dkm.data.integrity.verify_store`) read back intact.

Every array dkm writes carries a CRC32C checksum after its compressor and has every chunk of
its grid on disk (``write_empty_chunks``; :func:`checksum_encoding`), so an absent chunk file
can only mean damage and a changed byte fails to decode. :func:`open_dataset` (and
:func:`require_complete`, :func:`probe`) check from a directory listing that every chunk file
of the manifest is there and not empty; reading every chunk is the deep pass's job. Stores
written before the manifest existed read as before, unchecked.

:func:`write_atomic` builds a store under a hidden temporary name next to its destination,
stamps all the marks in one metadata write, consolidates, and renames it into place, so an
interrupted write can never be mistaken for a result. Stores written before ``dkm_store``
existed are still recognised from their attrs (:func:`store_kind`).

Problems are :class:`StoreError` with a ``problem`` (what is wrong, naming the path) and, only
when it holds in every context, a ``remedy``. Callers that know the context (a job file, a CLI
verb) re-raise with their own remedy, such as "set data.store to another path".
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from dkm import config

__all__ = [
    "KINDS",
    "KIND_ATTR",
    "MANIFEST_ATTR",
    "STATUS_ATTR",
    "VERIFIED_ATTR",
    "WRITE_ID_ATTR",
    "ArrayGrid",
    "StoreError",
    "StoreState",
    "array_grids",
    "check_chunks",
    "check_variables",
    "checksum_encoding",
    "chunk_manifest",
    "chunk_problems",
    "is_complete",
    "manifest_grids",
    "missing_chunks",
    "open_dataset",
    "probe",
    "read_attrs",
    "require_complete",
    "rows_per_chunk",
    "store_identity",
    "store_kind",
    "store_marks",
    "update_root_attrs",
    "with_checksums",
    "write_atomic",
]

log = logging.getLogger("dkm")

STATUS_ATTR = "dkm_status"
KIND_ATTR = "dkm_store"
WRITE_ID_ATTR = "dkm_write_id"
MANIFEST_ATTR = "dkm_manifest"
VERIFIED_ATTR = "dkm_verified"
KINDS = ("dataset", "patches", "features", "results", "reconstruction")
_COMPLETE = "complete"
# The marks belong to one write of one store: never copied from a Dataset read elsewhere.
_MARKS = (STATUS_ATTR, KIND_ATTR, WRITE_ID_ATTR, MANIFEST_ATTR, VERIFIED_ATTR)
MANIFEST_VERSION = 1
_DAMAGED = "the store is damaged"


class StoreError(RuntimeError):
    """A Zarr store is missing, incomplete, damaged, of another kind, or in the way.

    Parameters
    ----------
    problem : str
        What is wrong, naming the path.
    remedy : str, optional
        What to do about it, given only when it is true whatever the caller's context.

    Attributes
    ----------
    problem, remedy : str or None
        As given; ``str(err)`` is ``problem`` followed by ``"; " + remedy`` when there is one.
    """

    def __init__(self, problem: str, *, remedy: str | None = None):
        self.problem = problem
        self.remedy = remedy
        super().__init__(problem if remedy is None else f"{problem}; {remedy}")

    def __reduce__(self):  # keep problem/remedy across pickling (errors travel from workers)
        return (_rebuild_store_error, (self.problem, self.remedy))


def _rebuild_store_error(problem: str, remedy: str | None) -> StoreError:
    return StoreError(problem, remedy=remedy)


def rows_per_chunk(bytes_per_row: int, n_rows: int, target_bytes: int | None = None) -> int:
    """Rows in one chunk along the leading dimension for chunks of about ``target_bytes``.

    Parameters
    ----------
    bytes_per_row : int
        Size of one sample (or patch) in bytes.
    n_rows : int
        Number of rows; the chunk never exceeds it.
    target_bytes : int, optional
        Wanted chunk size. Default: dask config ``dkm.store.feature-chunk-bytes`` (64 MiB,
        inside the 32-128 MiB band dask and Zarr both like).

    Returns
    -------
    int
        At least 1 and at most ``max(1, n_rows)``.
    """
    if target_bytes is None:
        target_bytes = config.get_bytes("store.feature-chunk-bytes")
    rows = max(1, target_bytes // max(1, bytes_per_row))
    return int(max(1, min(rows, n_rows)))


def store_marks(kind: str) -> dict[str, str]:
    """The marks that say "dkm wrote this ``kind`` of store", with a fresh write id.

    For writers that build a store in place (the results store) rather than through
    :func:`write_atomic`; they add ``dkm_status`` themselves when they finish.
    """
    _check_kind(kind)
    return {KIND_ATTR: kind, WRITE_ID_ATTR: uuid.uuid4().hex}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"store kind must be one of {', '.join(KINDS)}, got {kind!r}")


# ----------------------------------------------------------------------------- reading marks


def _root_metadata(path: Path) -> dict[str, Any]:
    """The parsed root ``zarr.json`` of a Zarr v3 group, or a StoreError saying why not."""
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    if not path.is_dir():
        raise StoreError(f"{path}: a regular file, not a Zarr store (a directory)")
    meta_path = path / "zarr.json"
    if not meta_path.exists():
        raise StoreError(f"{path}: not a Zarr v3 store (no zarr.json)")
    meta = _parse_metadata(meta_path)
    if meta.get("node_type") == "array":
        raise StoreError(f"{path}: a Zarr array, not a group (a dkm store is a group)")
    return meta


def _parse_metadata(meta_path: Path, what: str = "") -> dict[str, Any]:
    # Read the JSON ourselves rather than through zarr: its exceptions name neither the file
    # nor the store, and some damage (a wrong node type) it reports only much later.
    def damaged(reason: str) -> StoreError:
        return StoreError(f"damaged metadata in {meta_path}{what}: {reason}")

    try:
        raw = meta_path.read_bytes()
    except OSError as err:
        raise damaged(f"unreadable ({err.strerror or err})") from err
    try:
        meta = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise damaged("not UTF-8 text") from err
    except json.JSONDecodeError as err:
        raise damaged(f"invalid JSON ({err.msg}: line {err.lineno} column {err.colno})") from err
    if not isinstance(meta, dict):
        raise damaged(f"not a JSON object (a {type(meta).__name__})")
    if meta.get("zarr_format") != 3:
        raise damaged(f"zarr_format is {meta.get('zarr_format')!r}, expected 3")
    if meta.get("node_type") not in ("group", "array"):
        raise damaged(f"node_type is {meta.get('node_type')!r}, expected 'group' or 'array'")
    if not isinstance(meta.get("attributes", {}), dict):
        raise damaged("attributes is not a JSON object")
    return meta


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The root attrs of any Zarr v3 store (a group), read from its ``zarr.json``.

    Parameters
    ----------
    path : path-like
        The store directory.

    Returns
    -------
    dict
        A copy of the root group's attributes.

    Raises
    ------
    StoreError
        Naming the path: "no such store", a regular file, "not a Zarr v3 store (no
        zarr.json)", "damaged metadata in PATH/zarr.json: <reason>", or an array, not a group.
    """
    return dict(_root_metadata(Path(path)).get("attributes", {}))


def _kind_from_attrs(attrs: Mapping[str, Any]) -> str | None:
    kind = attrs.get(KIND_ATTR)
    if kind in KINDS:
        return kind
    if kind is not None:  # a dkm_store value from a newer dkm, or damage: do not guess
        return None
    # Stores written before dkm_store existed: their own attrs say what they are. A patch
    # store carries its source's "dataset" attr too, so patch_size is asked first.
    if "job" in attrs:
        return "results"
    if "patch_size" in attrs:
        return "patches"
    if "dataset" in attrs:
        return "dataset"
    return None


def _kind_or_raise(path: Path, attrs: Mapping[str, Any]) -> str:
    kind = _kind_from_attrs(attrs)
    if kind is None:
        if KIND_ATTR in attrs:
            raise StoreError(f"{path}: unknown dkm_store value {attrs[KIND_ATTR]!r}")
        raise StoreError(f"{path}: a Zarr store, but not one dkm wrote (no dkm_store attribute)")
    return kind


def store_kind(path: str | os.PathLike) -> str:
    """What a dkm store holds: ``"dataset"``, ``"patches"``, ``"features"`` or ``"results"``.

    Read from ``dkm_store``; for stores written before that attr existed, inferred from their
    attrs (``job`` -> results, ``patch_size`` -> patches, ``dataset`` -> dataset).

    Raises
    ------
    StoreError
        Anything :func:`read_attrs` raises, or the store is not one dkm wrote.
    """
    path = Path(path)
    return _kind_or_raise(path, read_attrs(path))


def store_identity(path: str | os.PathLike) -> str:
    """A string that changes whenever the store at ``path`` is rewritten.

    The ``dkm_write_id`` of the store; for stores written before it existed, the SHA-256
    (hex) of the root ``zarr.json`` bytes.

    Raises
    ------
    StoreError
        Anything :func:`read_attrs` raises.
    """
    path = Path(path)
    meta = _root_metadata(path)
    write_id = meta.get("attributes", {}).get(WRITE_ID_ATTR)
    if isinstance(write_id, str) and write_id:
        return write_id
    return hashlib.sha256((path / "zarr.json").read_bytes()).hexdigest()


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a Zarr store that dkm finished writing (its root attrs say so).

    Never raises: a missing, damaged or foreign store is simply not complete;
    :func:`open_dataset` or :func:`probe` say why.
    """
    try:
        return read_attrs(path).get(STATUS_ATTR) == _COMPLETE
    except StoreError:
        return False


# ----------------------------------------------------------------------------- variables


def _child_dirs(path: Path) -> list[str]:
    # Hidden entries are not nodes (and a writer's temporaries are hidden by construction).
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_variables(path: str | os.PathLike) -> dict[str, str]:
    """Check that the metadata of every variable (child node) of a store is there and valid.

    The expected variables are those the consolidated metadata lists, plus every
    sub-directory; each must have a readable ``zarr.json`` of the node type it is listed as.
    Without this check a deleted ``images/zarr.json`` goes unnoticed (xarray reads the
    consolidated copy) or silently yields a Dataset without that variable.

    Parameters
    ----------
    path : path-like
        A store whose root metadata is valid.

    Returns
    -------
    dict
        ``{name: node_type}`` of the top-level children.

    Raises
    ------
    StoreError
        Naming the store and the variable.
    """
    path = Path(path)
    meta = _root_metadata(path)
    consolidated = meta.get("consolidated_metadata") or {}
    listed = {
        name: child.get("node_type")
        for name, child in (consolidated.get("metadata") or {}).items()
        if "/" not in name and isinstance(child, dict)
    }
    found: dict[str, str] = {}
    for name in sorted(set(listed) | set(_child_dirs(path))):
        meta_path = path / name / "zarr.json"
        if not meta_path.is_file():
            raise StoreError(f"{path}: variable {name!r} has no metadata ({meta_path} is missing)")
        child = _parse_metadata(meta_path, f" (variable {name!r})")
        node_type = child["node_type"]
        if name in listed and listed[name] != node_type:
            raise StoreError(
                f"damaged metadata in {meta_path} (variable {name!r}): it is a {node_type}, "
                f"the consolidated metadata says {listed[name]}"
            )
        if node_type == "array":
            try:  # zarr's own parser: shape, data type, codecs...
                zarr.open_array(str(path / name), mode="r")
            except Exception as err:
                raise StoreError(
                    f"damaged metadata in {meta_path} (variable {name!r}): {_short(err)}"
                ) from err
        found[name] = node_type
    return found


def _short(err: BaseException, limit: int = 160) -> str:
    if isinstance(err, KeyError):  # zarr's metadata parser reports a missing field this way
        return f"missing field {err.args[0]!r}" if err.args else "a field is missing"
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- chunks


def checksum_encoding(encoding: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A variable's Zarr v3 encoding with a CRC32C checksum and every chunk written.

    The given keys are kept (``chunks``, ``shards``, CF keys...); a CRC32C codec is appended
    to the compressors (zarr's default Zstd when none are given; none when they are
    explicitly ``None``) unless one is there, and ``write_empty_chunks`` is forced on, so an
    absent chunk file can only mean damage.

    Parameters
    ----------
    encoding : mapping, optional
        What the caller (or the variable read from another store) asks for.

    Returns
    -------
    dict
        A new encoding dict, accepted by ``xarray.Dataset.to_zarr(encoding=...)``.
    """
    out = dict(encoding or {})
    given = out.get("compressors", [ZstdCodec(level=0, checksum=False)])  # zarr's v3 default
    if given is None:
        given = []
    elif isinstance(given, Mapping | str) or not isinstance(given, list | tuple):
        given = [given]
    compressors = list(given)
    if not any(_is_crc32c(c) for c in compressors):
        compressors.append(Crc32cCodec())
    out["compressors"] = compressors
    out["write_empty_chunks"] = True
    return out


def _is_crc32c(codec: Any) -> bool:
    if isinstance(codec, Crc32cCodec):
        return True
    if isinstance(codec, Mapping):
        return codec.get("name") == "crc32c"
    return codec == "crc32c"


def with_checksums(
    ds: xr.Dataset, encoding: Mapping[str, Any] | None = None
) -> tuple[xr.Dataset, dict[str, Any]]:
    """``ds`` (a shallow copy) and the ``encoding=`` to write it with, every array checksummed.

    Variables named in ``encoding`` get that encoding (xarray checks its keys); the others
    keep their own ``.encoding`` (from the store they were read from, if any). Both gain
    :func:`checksum_encoding`.
    """
    given = dict(encoding or {})
    ds = ds.copy(deep=False)
    for name, var in ds.variables.items():
        if name not in given:
            var.encoding = checksum_encoding(var.encoding)
    return ds, {name: checksum_encoding(enc) for name, enc in given.items()}


@dataclass(frozen=True)
class ArrayGrid:
    """The chunk grid of one Zarr v3 array and how its chunk files are named.

    Attributes
    ----------
    name : str
        Path of the array inside its group (``"images"``, ``"history/inertia"``).
    shape, chunks : tuple of int
        Array shape and (outer, on-disk) chunk shape.
    key_encoding : tuple of str
        ``(encoding name, separator)``: ``("default", "/")`` names chunks ``c/0/1``.
    checksum : str or None
        ``"crc32c"`` when the codecs checksum every chunk.
    """

    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    key_encoding: tuple[str, str] = ("default", "/")
    checksum: str | None = None

    @classmethod
    def from_metadata(cls, name: str, meta: Mapping[str, Any]) -> ArrayGrid | None:
        """From a parsed array ``zarr.json``; None for grids or key encodings dkm cannot
        enumerate (anything but a regular grid with the default or v2 chunk keys)."""
        grid = meta.get("chunk_grid") or {}
        key = meta.get("chunk_key_encoding") or {"name": "default"}
        if grid.get("name") != "regular" or key.get("name") not in ("default", "v2"):
            return None
        try:
            shape = tuple(int(s) for s in meta["shape"])
            chunks = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
        except (KeyError, TypeError, ValueError):
            return None
        if len(chunks) != len(shape) or any(c < 1 for c in chunks):
            return None
        default_sep = "/" if key["name"] == "default" else "."
        sep = str((key.get("configuration") or {}).get("separator", default_sep))
        checksum = "crc32c" if '"crc32c"' in json.dumps(meta.get("codecs")) else None
        return cls(name, shape, chunks, (key["name"], sep), checksum)

    @property
    def counts(self) -> tuple[int, ...]:
        """Chunks along each dimension."""
        return tuple(math.ceil(s / c) for s, c in zip(self.shape, self.chunks, strict=True))

    @property
    def n_chunks(self) -> int:
        return math.prod(self.counts)

    def key(self, coords: tuple[int, ...]) -> str:
        """The chunk's file path inside the array directory, e.g. ``c/3/0/0``."""
        kind, sep = self.key_encoding
        if kind == "default":
            return "c" + "".join(f"{sep}{i}" for i in coords)
        return sep.join(map(str, coords)) or "0"

    def keys(self) -> Iterator[tuple[tuple[int, ...], str]]:
        """``(chunk coordinates, key)`` of every chunk of the grid, in C order."""
        for coords in itertools.product(*(range(n) for n in self.counts)):
            yield coords, self.key(coords)

    def region(self, coords: tuple[int, ...]) -> tuple[slice, ...]:
        """The selection that reads exactly one chunk."""
        return tuple(
            slice(i * c, min((i + 1) * c, s))
            for i, c, s in zip(coords, self.chunks, self.shape, strict=True)
        )

    def record(self) -> dict[str, Any]:
        """What the manifest keeps of this array."""
        return {
            "shape": list(self.shape),
            "chunks": list(self.chunks),
            "n_chunks": self.n_chunks,
            "checksum": self.checksum,
        }


def _array_metadata(group: Path, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Parsed ``zarr.json`` of every array below ``group`` (sub-groups included)."""
    found: dict[str, dict[str, Any]] = {}
    for name in _child_dirs(group):
        meta_path = group / name / "zarr.json"
        if not meta_path.is_file():
            continue
        meta = _parse_metadata(meta_path, f" (variable {prefix + name!r})")
        if meta["node_type"] == "array":
            found[prefix + name] = meta
        else:
            found.update(_array_metadata(group / name, f"{prefix}{name}/"))
    return found


def array_grids(group: str | os.PathLike) -> dict[str, ArrayGrid]:
    """The chunk grid of every array below ``group`` (sub-groups included), from its
    metadata; arrays whose grid dkm cannot enumerate are left out."""
    grids = {}
    for name, meta in _array_metadata(Path(group)).items():
        grid = ArrayGrid.from_metadata(name, meta)
        if grid is not None:
            grids[name] = grid
    return grids


def chunk_manifest(group: str | os.PathLike) -> dict[str, Any]:
    """The ``dkm_manifest`` of a group just written: every array below it and its chunk grid.

    ``{"version": 1, "arrays": {name: {"shape", "chunks", "n_chunks", "checksum"}}}``; array
    names are paths inside the group (``"history/inertia"`` for a sub-group's array).
    """
    arrays = {name: grid.record() for name, grid in array_grids(group).items()}
    return {"version": MANIFEST_VERSION, "arrays": arrays}


def manifest_grids(
    group: str | os.PathLike, manifest: Mapping[str, Any]
) -> tuple[dict[str, ArrayGrid], list[str]]:
    """The grids a manifest records, as the arrays' metadata names their chunks.

    Returns
    -------
    grids : dict
        ``{name: ArrayGrid}`` of the arrays whose metadata agrees with the manifest.
    problems : list of str
        One per array that is gone or whose grid changed, e.g. ``"array 'images' is
        missing (the manifest records it)"``.
    """
    group = Path(group)
    grids: dict[str, ArrayGrid] = {}
    problems: list[str] = []
    for name, rec in sorted((manifest.get("arrays") or {}).items()):
        meta_path = group / name / "zarr.json"
        if not meta_path.is_file():
            problems.append(f"array {name!r} is missing (its metadata {meta_path} is gone)")
            continue
        try:
            meta = _parse_metadata(meta_path, f" (variable {name!r})")
        except StoreError as err:
            problems.append(err.problem)
            continue
        grid = ArrayGrid.from_metadata(name, meta)
        if grid is None or [list(grid.shape), list(grid.chunks)] != [
            list(rec.get("shape", [])),
            list(rec.get("chunks", [])),
        ]:
            problems.append(
                f"array {name!r} has shape {list(meta.get('shape', []))} in chunks other than "
                f"the manifest's {rec.get('shape')} in chunks {rec.get('chunks')}"
            )
            continue
        grids[name] = grid
    return grids, problems


def _chunk_files(array_dir: Path) -> dict[str, int]:
    """``{key: size in bytes}`` of every file below an array directory but its zarr.json."""
    found: dict[str, int] = {}

    def walk(directory: Path, prefix: str) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            key = prefix + entry.name
            if entry.is_dir(follow_symlinks=True):
                walk(Path(entry.path), key + "/")
            elif key != "zarr.json" and not entry.name.startswith("."):
                try:
                    found[key] = entry.stat(follow_symlinks=True).st_size
                except OSError:
                    found[key] = 0

    walk(array_dir, "")
    return found


def _count(n: int, total: int) -> str:
    return f"({n} of {total} chunk{'' if total == 1 else 's'})"


def _keys_text(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def missing_chunks(group: Path, grid: ArrayGrid) -> tuple[list[str], list[str]]:
    """Keys of the chunks of ``grid`` with no file, and of those whose file is empty."""
    files = _chunk_files(group / grid.name)
    missing, empty = [], []
    for _, key in grid.keys():
        size = files.get(key)
        if size is None:
            missing.append(key)
        elif size == 0:
            empty.append(key)
    return missing, empty


def chunk_problems(group: str | os.PathLike, manifest: Mapping[str, Any] | None) -> list[str]:
    """What a directory listing shows is wrong with the chunks a manifest records.

    One entry per damaged array, e.g. ``"array 'images' is missing chunk c/3/0/0 (1 of 7
    chunks)"``; empty when every chunk file is there and not empty, or when there is no
    manifest (a store written before dkm kept one: nothing to check against).
    """
    if not manifest:
        return []
    group = Path(group)
    grids, problems = manifest_grids(group, manifest)
    for name, grid in grids.items():
        missing, empty = missing_chunks(group, grid)
        what = []
        if missing:
            word = "chunk" if len(missing) == 1 else "chunks"
            what.append(f"is missing {word} {_keys_text(missing)}")
        if empty:
            word = "an empty chunk file" if len(empty) == 1 else "empty chunk files"
            what.append(f"has {word} {_keys_text(empty)}")
        if what:
            bad = len(missing) + len(empty)
            problems.append(f"array {name!r} {' and '.join(what)} {_count(bad, grid.n_chunks)}")
    return problems


def check_chunks(path: str | os.PathLike, attrs: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`StoreError` when a chunk file the store's manifest records is missing
    or empty: ``PATH: array 'images' is missing chunk c/3/0/0 (1 of 7 chunks); the store is
    damaged``. A store without a manifest passes (there is nothing to check against).

    Parameters
    ----------
    path : path-like
        A dataset, patches or features store.
    attrs : mapping, optional
        Its root attrs when already read.
    """
    path = Path(path)
    attrs = read_attrs(path) if attrs is None else attrs
    problems = chunk_problems(path, attrs.get(MANIFEST_ATTR))
    if problems:
        raise StoreError(f"{path}: {'; '.join(problems)}; {_DAMAGED}")


def update_root_attrs(path: str | os.PathLike, attrs: Mapping[str, Any]) -> None:
    """Merge ``attrs`` into a store's root attrs, replacing ``zarr.json`` atomically.

    Everything else in the metadata (consolidated metadata included) is kept as it is.
    """
    path = Path(path)
    meta = _root_metadata(path)
    meta["attributes"] = {**meta.get("attributes", {}), **attrs}
    tmp = path / f".zarr.json.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, path / "zarr.json")
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- what is there


@dataclass(frozen=True)
class StoreState:
    """What is at a path, as far as dkm's store conventions can tell (see :func:`probe`).

    Attributes
    ----------
    path : Path
        The path looked at.
    kind : str or None
        The dkm kind (:data:`KINDS`) when recognisable, also for a damaged or incomplete
        store; None for a file, a foreign directory or Zarr store, or an empty directory.
    complete : bool
        A dkm store whose write finished and whose metadata is intact.
    problem : str or None
        For a damaged store, what is damaged.
    what : str
        A predicate for messages, e.g. ``"is an incomplete dataset store (it was interrupted
        while being written)"`` or ``"is a regular file"``.
    empty : bool
        An empty directory: nothing would be lost by writing there.
    """

    path: Path
    kind: str | None
    complete: bool
    problem: str | None
    what: str
    empty: bool = False

    def replaceable_by(self, kind: str) -> bool:
        """Whether a :func:`write_atomic` of ``kind`` with ``overwrite`` may replace this.

        Only a store of the same kind (complete, incomplete or damaged) or an empty
        directory: a results store, another kind of store, a file or a directory dkm did not
        write is never destroyed.
        """
        return self.empty or (self.kind == kind and kind != "results")


def _inner(problem: str, path: Path) -> str:
    # A problem quoted inside a message that already starts with the path need not repeat it.
    return problem.removeprefix(f"{path}: ")


def _layout_kind(path: Path) -> str | None:
    """Recognise a dkm store whose root metadata is gone from its children's metadata."""
    dims = {}
    for name in _child_dirs(path):
        try:
            child = json.loads((path / name / "zarr.json").read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(child, dict):
            dims[name] = tuple(child.get("dimension_names") or ())
    if {"runs", "sweep", "checkpoints"} & set(dims):
        return "results"
    if dims.get("patches") == ("patch", "feature") and "image" in dims:
        return "patches"
    if dims.get("images", ("",))[0] == "sample" and "split" in dims:
        return "dataset"
    if dims.get("features") == ("sample", "feature") and "label" in dims:
        return "dataset"  # the synthetic feature dataset
    if {"originals", "reconstructions"} <= set(dims):
        return "reconstruction"
    return None


def probe(path: str | os.PathLike) -> StoreState | None:
    """Describe what is at ``path`` without changing anything; None when nothing is there.

    Parameters
    ----------
    path : path-like
        Where a store is, or is about to be written.

    Returns
    -------
    StoreState or None
    """
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            return StoreState(path, None, False, None, "is a symbolic link to nothing")
        return None
    if not path.is_dir():
        return StoreState(path, None, False, None, "is a regular file")
    if not any(path.iterdir()):
        return StoreState(path, None, False, None, "is an empty directory", empty=True)
    meta_path = path / "zarr.json"
    if not meta_path.exists():
        kind = _layout_kind(path)
        if kind is None:
            return StoreState(path, None, False, None, "is a directory that is not a Zarr store")
        problem = f"{meta_path} is missing"
        return StoreState(path, kind, False, problem, f"is a damaged {kind} store ({problem})")
    try:
        meta = _parse_metadata(meta_path)
    except StoreError as err:
        kind = _layout_kind(path)
        what = f"is a damaged {kind or 'Zarr'} store ({_inner(err.problem, path)})"
        return StoreState(path, kind, False, err.problem, what)
    if meta["node_type"] == "array":
        return StoreState(path, None, False, None, "is a Zarr array, not a dkm store")
    attrs = meta.get("attributes", {})
    kind = _kind_from_attrs(attrs)
    if kind is None:
        return StoreState(path, None, False, None, "is a Zarr store that dkm did not write")
    if kind == "results":
        return StoreState(path, kind, attrs.get("status") == _COMPLETE, None, "is a results store")
    if attrs.get(STATUS_ATTR) != _COMPLETE:
        what = f"is an incomplete {kind} store (it was interrupted while being written)"
        return StoreState(path, kind, False, None, what)
    try:
        check_variables(path)
        check_chunks(path, attrs)
    except StoreError as err:
        inner = _inner(err.problem, path).removesuffix(f"; {_DAMAGED}")
        what = f"is a damaged {kind} store ({inner})"
        return StoreState(path, kind, False, err.problem, what)
    return StoreState(path, kind, True, None, f"is a complete {kind} store")


# ----------------------------------------------------------------------------- writing


def _consolidate_quietly(path: Path) -> None:
    # Zarr v3 warns that consolidated metadata is not in the spec yet; we write it once at the
    # end (CONVENTIONS.md section 2) and still read stores without relying on it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(path))


def _infer_kind(ds: xr.Dataset) -> str:
    if "patches" in ds:
        return "patches"
    if "images" in ds or "features" in ds:
        return "dataset"
    raise ValueError(
        "write_atomic: give kind= (one of " + ", ".join(KINDS) + "); it cannot be inferred "
        f"from the variables {sorted(map(str, ds.data_vars))}"
    )


def write_atomic(
    ds: xr.Dataset,
    path: str | os.PathLike,
    *,
    kind: str | None = None,
    encoding: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``ds`` to a Zarr v3 store at ``path``; all or nothing.

    Dask-backed variables are computed chunk by chunk on the active scheduler (the
    distributed client when there is one), so the data never has to fit one process.

    Parameters
    ----------
    ds : xarray.Dataset
        What to write. Its attrs are kept, except any dkm marks it carries from a store it
        was read from; ``dkm_store``, ``dkm_write_id`` and ``dkm_status`` are set afresh.
    path : path-like
        Destination directory of the store.
    kind : str, optional
        One of :data:`KINDS`. Default (for older callers): ``"patches"`` when ``ds`` has a
        ``patches`` variable, ``"dataset"`` when it has ``images`` or ``features``.
    encoding : mapping, optional
        Per-variable Zarr encoding (``chunks``, ``shards``, ``compressors``...). Every
        variable is written with a CRC32C checksum and all of its chunks
        (:func:`checksum_encoding`), and the store's ``dkm_manifest`` records each array's
        chunk grid.
    overwrite : bool, default False
        Replace an existing store of the same ``kind`` (complete, incomplete or damaged) or an
        empty directory. Anything else in the way (a store of another kind, a results store,
        a file, a directory dkm did not write) is refused even then.

    Returns
    -------
    Path
        The destination path.

    Raises
    ------
    StoreError
        ``path`` exists (without ``overwrite``) or holds something that must not be replaced.
    """
    path = Path(path)
    kind = _infer_kind(ds) if kind is None else kind
    _check_kind(kind)
    state = probe(path)
    if state is not None and not overwrite:
        raise StoreError(f"{path}: already exists and {state.what}")
    if state is not None and not state.replaceable_by(kind):
        raise StoreError(f"{path}: {state.what}, which dkm never replaces with a {kind} store")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(path)
    host = socket.gethostname().replace("-", "_")
    tmp = path.with_name(f".{path.name}.tmp-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    ds, encoding = with_checksums(ds, encoding)
    ds.attrs = {k: v for k, v in ds.attrs.items() if k not in _MARKS}
    try:
        ds.to_zarr(str(tmp), mode="w-", consolidated=False, encoding=encoding, zarr_format=3)
        # All marks in one metadata write, after the data: a store is never marked complete
        # (or given an identity) before everything it holds is on disk.
        marks = {
            **store_marks(kind),
            MANIFEST_ATTR: chunk_manifest(tmp),
            STATUS_ATTR: _COMPLETE,
        }
        zarr.open_group(str(tmp), mode="r+").attrs.update(marks)
        _consolidate_quietly(tmp)
        _replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    log.debug("wrote %s store %s", kind, path)
    return path


def _remove_dead_temporaries(path: Path) -> None:
    """Remove the temporary stores of earlier writers of ``path`` that died on this host.

    A writer killed mid-write (SIGKILL, a lost machine) cannot clean up after itself; its
    temporary folder is named after its host and pid, so the next writer can tell it is
    dead. Folders of live writers, of other hosts, or of dkm versions before the host and
    pid were in the name are left alone.
    """
    host = socket.gethostname().replace("-", "_")
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-{glob.escape(host)}-*-*"):
        pid = tmp.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            log.info("%s: removing the temporary store of a dead writer (pid %s)", tmp, pid)
            shutil.rmtree(tmp, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _discard(tmp: Path, quiet: float = 1.0, limit: float = 15.0) -> None:
    """Remove a failed write's temporary store until it stays gone.

    Dask does not stop the tasks already running when one fails: they go on writing their
    chunks (every chunk is written, see :func:`checksum_encoding`) and recreate the
    directory, so it is removed again until nothing has reappeared for ``quiet`` seconds.
    """
    deadline = time.monotonic() + limit
    gone_since = None
    while True:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            gone_since = None
        now = time.monotonic()
        if gone_since is None:
            gone_since = now
        elif now - gone_since >= quiet or now >= deadline:
            return
        time.sleep(0.02)


def _replace(tmp: Path, path: Path) -> None:
    # os.replace cannot swap a directory for a non-empty one, so the old store steps aside
    # first; the window in which neither exists is as short as two renames.
    trash = None
    if path.exists() or path.is_symlink():
        trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
    os.replace(tmp, path)
    if trash is not None and trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    elif trash is not None:
        trash.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- opening


def require_complete(
    path: str | os.PathLike, kind: str | None = None, *, chunks: bool = True
) -> dict[str, Any]:
    """Check that ``path`` is a complete, intact dataset, patches or features store.

    Reads metadata only: the root ``zarr.json`` and every variable's, and lists the chunk
    files of every array its ``dkm_manifest`` records (none may be missing or empty).

    Parameters
    ----------
    path : path-like
        The store directory.
    kind : str, optional
        The kind it must be (one of :data:`KINDS` but ``"results"``); any but results if None.
    chunks : bool, default True
        Also check that every chunk file the manifest records is there (:func:`check_chunks`).

    Returns
    -------
    dict
        Its root attrs.

    Raises
    ------
    StoreError
        The path does not exist, is not a Zarr v3 store, has damaged metadata (root or any
        variable's, named), was not written by dkm, is a results store or another kind, was
        never completed, or misses chunk files (store, array and chunk named).
    """
    if kind is not None and (kind == "results" or kind not in KINDS):
        raise ValueError(f"kind must be one of dataset, patches, features, got {kind!r}")
    path = Path(path)
    attrs = read_attrs(path)
    found = _kind_or_raise(path, attrs)
    if found == "results":
        raise StoreError(
            f"{path}: a results store, not a {kind or 'dataset, patches or features'} store",
            remedy="read it with xarray.open_datatree or dkm show",
        )
    if kind is not None and found != kind:
        raise StoreError(f"{path}: a {found} store, not a {kind} store")
    status = attrs.get(STATUS_ATTR)
    if status != _COMPLETE:
        raise StoreError(
            f"{path}: incomplete {found} store (dkm_status={status!r}): it was interrupted "
            "while being written",
            remedy="write it again",
        )
    check_variables(path)
    if chunks:
        check_chunks(path, attrs)
    return attrs


def open_dataset(path: str | os.PathLike, *, chunks: Any = None) -> xr.Dataset:
    """Open a complete dkm store as a lazily loaded (dask-backed) :class:`xarray.Dataset`.

    Parameters
    ----------
    path : path-like
        A dataset, patches or features store.
    chunks : optional
        Passed to :func:`xarray.open_zarr`; by default the store's own chunks.

    Raises
    ------
    StoreError
        The path does not exist, is not a Zarr v3 store, has damaged metadata (root or any
        variable's, named), was not written by dkm, is a results store, was never completed,
        or a chunk file its manifest records is missing or empty, e.g. ``data/x.zarr: array
        'images' is missing chunk c/3/0/0 (1 of 7 chunks); the store is damaged``. A chunk
        whose bytes changed is found only by reading it: see
        :func:`dkm.data.integrity.verify_store`.
    """
    path = Path(path)
    require_complete(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            ds = xr.open_zarr(str(path), chunks=chunks if chunks is not None else {})
    except Exception as err:
        raise StoreError(f"{path}: damaged store ({_short(err)})") from err
    return ds
