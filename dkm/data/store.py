"""The xarray <-> Zarr layout of dkm stores, written atomically.

Every store dkm writes (datasets, patch matrices) is built under a hidden temporary name next
to its destination, stamped ``dkm_status = "complete"`` only after all of its data is on disk,
consolidated, and then renamed into place. A store without that stamp is never opened as if it
were whole, so an interrupted write can never be mistaken for a result.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import xarray as xr
import zarr

__all__ = [
    "STATUS_ATTR",
    "StoreError",
    "is_complete",
    "open_dataset",
    "rows_per_chunk",
    "write_atomic",
]

log = logging.getLogger("dkm")

STATUS_ATTR = "dkm_status"
_COMPLETE = "complete"


class StoreError(RuntimeError):
    """A Zarr store is missing, incomplete, corrupt or in the way."""


def rows_per_chunk(bytes_per_row: int, n_rows: int, target_bytes: int = 64 * 2**20) -> int:
    """Rows in one chunk along the leading dimension for chunks of about ``target_bytes``.

    Parameters
    ----------
    bytes_per_row : int
        Size of one sample (or patch) in bytes.
    n_rows : int
        Number of rows; the chunk never exceeds it.
    target_bytes : int, default 64 MiB
        Wanted chunk size: inside the 32-128 MiB band dask and Zarr both like.
    """
    rows = max(1, target_bytes // max(1, bytes_per_row))
    return int(max(1, min(rows, n_rows)))


def _consolidate_quietly(path: Path) -> None:
    # Zarr v3 warns that consolidated metadata is not in the spec yet; we write it once at the
    # end (CONVENTIONS.md section 2) and still read stores without relying on it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(path))


def write_atomic(
    ds: xr.Dataset,
    path: str | os.PathLike,
    *,
    encoding: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``ds`` to a Zarr v3 store at ``path``; all or nothing.

    Dask-backed variables are computed chunk by chunk on the active scheduler (the
    distributed client when there is one), so the data never has to fit one process.

    Parameters
    ----------
    ds : xarray.Dataset
        What to write. Its attrs are kept; ``dkm_status`` is added.
    path : path-like
        Destination directory of the store.
    encoding : mapping, optional
        Per-variable Zarr encoding (``chunks``, ``shards``, ``compressors``...).
    overwrite : bool, default False
        Replace an existing store. Without it an existing path is an error.

    Returns
    -------
    Path
        The destination path.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"{path}: already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        ds.to_zarr(
            str(tmp), mode="w-", consolidated=False, encoding=dict(encoding or {}), zarr_format=3
        )
        zarr.open_group(str(tmp), mode="r+").attrs.update({STATUS_ATTR: _COMPLETE})
        _consolidate_quietly(tmp)
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("wrote %s", path)
    return path


def _replace(tmp: Path, path: Path) -> None:
    # os.replace cannot swap a directory for a non-empty one, so the old store steps aside
    # first; the window in which neither exists is as short as two renames.
    trash = None
    if path.exists():
        trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
    os.replace(tmp, path)
    if trash is not None and trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    elif trash is not None:
        trash.unlink(missing_ok=True)


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a Zarr store that dkm finished writing."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        return False
    try:
        attrs = zarr.open_group(str(path), mode="r").attrs
    except Exception:  # corrupt metadata: treat as not complete, open_dataset says why
        return False
    return attrs.get(STATUS_ATTR) == _COMPLETE


def open_dataset(path: str | os.PathLike, *, chunks: Any = None) -> xr.Dataset:
    """Open a complete dkm store as a lazily loaded (dask-backed) :class:`xarray.Dataset`.

    Parameters
    ----------
    path : path-like
        The store directory.
    chunks : optional
        Passed to :func:`xarray.open_zarr`; by default the store's own chunks.

    Raises
    ------
    StoreError
        The path does not exist, is not a Zarr store, is corrupt, or was never completed.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: not a Zarr v3 store (no zarr.json)")
    try:
        status = zarr.open_group(str(path), mode="r").attrs.get(STATUS_ATTR)
    except Exception as err:
        raise StoreError(f"{path}: corrupt store metadata ({err})") from err
    if status != _COMPLETE:
        raise StoreError(
            f"{path}: incomplete store (dkm_status={status!r}); it was interrupted while "
            "being written - delete it and write it again"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            ds = xr.open_zarr(str(path), chunks=chunks if chunks is not None else {})
    except Exception as err:
        raise StoreError(f"{path}: corrupt store ({err})") from err
    return ds

