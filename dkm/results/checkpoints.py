"""A fit's state (:class:`~dkm._parallel.base.FitState`) as a Zarr group, and back.

Layout of one state group::

    GROUP/            attrs: status, start, iteration, info (JSON); one variable per
                      parameter array (``centers`` ...)
      history/        the current start's per-iteration record
      best/           the best finished start, in the same layout (when there is one)

The group is stamped ``status: complete`` last, together with its ``dkm_manifest`` (the chunk
grid of every array below it) and a fresh ``dkm_write_id``, so a state interrupted while being
written is never read back. Every array carries a CRC32C checksum and all of its chunks
(:func:`dkm.data.store.checksum_encoding`); a state with a missing or damaged chunk reads as a
:class:`~dkm.data.store.StoreError` naming it, never as a silently different state.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from dkm._parallel.base import FitState
from dkm.data.integrity import damage_message, plan_group, read_groups
from dkm.data.store import (
    MANIFEST_ATTR,
    WRITE_ID_ATTR,
    StoreError,
    chunk_manifest,
    chunk_problems,
    with_checksums,
)
from dkm.results.attrs import COMPLETE, jsonable

__all__ = ["read_state", "write_state"]


def write_state(store: Path, group: str, state: FitState, extra_attrs: dict[str, Any]) -> None:
    """Write ``state`` to ``store/group`` (replacing what was there), stamped complete last."""
    shutil.rmtree(store / group, ignore_errors=True)
    _write(store, group, state, extra_attrs)
    marks = {
        MANIFEST_ATTR: chunk_manifest(store / group),
        WRITE_ID_ATTR: uuid.uuid4().hex,
        "status": COMPLETE,
    }
    zarr.open_group(str(store / group), mode="r+").attrs.update(marks)


def _to_zarr(ds: xr.Dataset, store: Path, group: str) -> None:
    ds, encoding = with_checksums(ds)
    ds.to_zarr(
        str(store), group=group, mode="w", consolidated=False, zarr_format=3, encoding=encoding
    )


def _write(store: Path, group: str, state: FitState, extra_attrs: dict[str, Any]) -> None:
    data = {
        name: (tuple(f"{name}_{i}" for i in range(np.ndim(value))), np.asarray(value))
        for name, value in state.params.items()
    }
    attrs = {
        **extra_attrs,
        "start": state.start,
        "iteration": state.iteration,
        "info": state.info,
        "status": "writing",
    }
    _to_zarr(xr.Dataset(data, attrs=jsonable(attrs)), store, group)
    history = state.history.copy()
    history.attrs = jsonable(history.attrs)
    _to_zarr(history, store, f"{group}/history")
    if state.best is not None:
        _write(store, f"{group}/best", state.best, {})


def read_state(store: Path, group: str) -> FitState:
    """The state written by :func:`write_state` (also reads checkpoints of dkm 0.1).

    Raises
    ------
    StoreError
        A chunk file the state's manifest records is missing, or a chunk does not read back
        (``STORE: checkpoint 'checkpoints/lloyd-k8/slot-0': array 'centers' chunk c/0/0 is
        damaged (CRC32C checksum mismatch)``).
    """
    store = Path(store)
    label = f"{store}: checkpoint {group!r}"
    try:
        attrs = zarr.open_group(str(store / group), mode="r").attrs.asdict()
    except Exception as err:
        raise StoreError(f"{label}: damaged metadata ({err})") from err
    problems = chunk_problems(store / group, attrs.get(MANIFEST_ATTR))
    if problems:
        raise StoreError(f"{label}: {'; '.join(problems)}")
    try:
        return _read(store, group)
    except Exception as err:
        plan = plan_group(store / group, attrs.get(MANIFEST_ATTR))
        (damaged,) = read_groups([plan], parallel=False)
        if damaged:
            items = [d.describe() for d in damaged]
            raise StoreError(damage_message(label, items)) from err
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise StoreError(f"{label}: damaged ({reason})") from err


def _read(store: Path, group: str) -> FitState:
    ds = xr.open_zarr(str(store), group=group, consolidated=False).load()
    history = xr.open_zarr(str(store), group=f"{group}/history", consolidated=False).load()
    attrs = dict(ds.attrs)
    params = {str(name): var.values for name, var in ds.data_vars.items()}
    if "centroids" in params and "centers" not in params:  # dkm 0.1: one start, no best
        params = {"centers": params.pop("centroids")}
        return FitState(0, int(attrs["iteration"]), params, history, dict(attrs.get("state", {})))
    best = None
    if (store / group / "best" / "zarr.json").is_file():
        best = _read(store, f"{group}/best")
    return FitState(
        start=int(attrs["start"]),
        iteration=int(attrs["iteration"]),
        params=params,
        history=history,
        info=dict(attrs.get("info", {})),
        best=best,
    )
