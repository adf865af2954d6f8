"""How a dkm store is marked, written atomically and recognised again.

This module is the single owner of the conventions every dkm Zarr v3 store follows:

- ``dkm_store`` (:data:`KIND_ATTR`): what the store holds, one of :data:`KINDS`
  (``"dataset"``, ``"patches"``, ``"features"``, ``"results"``);
- ``dkm_write_id`` (:data:`WRITE_ID_ATTR`): a fresh random id per write, so a reader can tell
  that a store was rewritten even when its path and contents look alike;
- ``dkm_status = "complete"`` (:data:`STATUS_ATTR`): set only after all data is on disk.

:func:`write_atomic` builds a store under a hidden temporary name next to its destination,
stamps all three marks in one metadata write, consolidates, and renames it into place, so an
interrupted write can never be mistaken for a result. Stores written before ``dkm_store``
existed are still recognised from their attrs (:func:`store_kind`).

Problems are :class:`StoreError` with a ``problem`` (what is wrong, naming the path) and, only
when it holds in every context, a ``remedy``. Callers that know the context (a job file, a CLI
verb) re-raise with their own remedy, such as "set data.store to another path".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr
import zarr

from dkm import config

__all__ = [
    "KINDS",
    "KIND_ATTR",
    "STATUS_ATTR",
    "WRITE_ID_ATTR",
    "StoreError",
    "StoreState",
    "check_variables",
    "is_complete",
    "open_dataset",
    "probe",
    "read_attrs",
    "require_complete",
    "rows_per_chunk",
    "store_identity",
    "store_kind",
    "store_marks",
    "write_atomic",
]

log = logging.getLogger("dkm")

STATUS_ATTR = "dkm_status"
KIND_ATTR = "dkm_store"
WRITE_ID_ATTR = "dkm_write_id"
KINDS = ("dataset", "patches", "features", "results")
_COMPLETE = "complete"
# The marks belong to one write of one store: never copied from a Dataset read elsewhere.
_MARKS = (STATUS_ATTR, KIND_ATTR, WRITE_ID_ATTR)


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
    except StoreError as err:
        what = f"is a damaged {kind} store ({_inner(err.problem, path)})"
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
        Per-variable Zarr encoding (``chunks``, ``shards``, ``compressors``...).
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
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    ds = ds.copy(deep=False)
    ds.attrs = {k: v for k, v in ds.attrs.items() if k not in _MARKS}
    try:
        ds.to_zarr(
            str(tmp), mode="w-", consolidated=False, encoding=dict(encoding or {}), zarr_format=3
        )
        # All marks in one metadata write, after the data: a store is never marked complete
        # (or given an identity) before everything it holds is on disk.
        marks = {**store_marks(kind), STATUS_ATTR: _COMPLETE}
        zarr.open_group(str(tmp), mode="r+").attrs.update(marks)
        _consolidate_quietly(tmp)
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("wrote %s store %s", kind, path)
    return path


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


def require_complete(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Check that ``path`` is a complete, intact dataset, patches or features store.

    Reads metadata only: the root ``zarr.json`` and every variable's.

    Parameters
    ----------
    path : path-like
        The store directory.
    kind : str, optional
        The kind it must be (one of :data:`KINDS` but ``"results"``); any but results if None.

    Returns
    -------
    dict
        Its root attrs.

    Raises
    ------
    StoreError
        The path does not exist, is not a Zarr v3 store, has damaged metadata (root or any
        variable's, named), was not written by dkm, is a results store or another kind, or
        was never completed.
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
        variable's, named), was not written by dkm, is a results store, or was never
        completed.
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
