"""A fit's state (:class:`~dkm._parallel.base.FitState`) as a Zarr group, and back.

Layout of one state group::

    GROUP/            attrs: status, start, iteration, info (JSON); one variable per
                      parameter array (``centers`` ...)
      history/        the current start's per-iteration record
      best/           the best finished start, in the same layout (when there is one)

The group is stamped ``status: complete`` last, so a state interrupted while being written
is never read back.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from dkm._parallel.base import FitState
from dkm.results.attrs import COMPLETE, jsonable

__all__ = ["read_state", "write_state"]


def write_state(store: Path, group: str, state: FitState, extra_attrs: dict[str, Any]) -> None:
    """Write ``state`` to ``store/group`` (replacing what was there), stamped complete last."""
    shutil.rmtree(store / group, ignore_errors=True)
    _write(store, group, state, extra_attrs)
    zarr.open_group(str(store / group), mode="r+").attrs.update({"status": COMPLETE})


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
    xr.Dataset(data, attrs=jsonable(attrs)).to_zarr(
        str(store), group=group, mode="w", consolidated=False, zarr_format=3
    )
    history = state.history.copy()
    history.attrs = jsonable(history.attrs)
    history.to_zarr(str(store), group=f"{group}/history", mode="w", consolidated=False)
    if state.best is not None:
        _write(store, f"{group}/best", state.best, {})


def read_state(store: Path, group: str) -> FitState:
    """The state written by :func:`write_state` (also reads checkpoints of dkm 0.1)."""
    ds = xr.open_zarr(str(store), group=group, consolidated=False).load()
    history = xr.open_zarr(str(store), group=f"{group}/history", consolidated=False).load()
    attrs = dict(ds.attrs)
    params = {str(name): var.values for name, var in ds.data_vars.items()}
    if "centroids" in params and "centers" not in params:  # dkm 0.1: one start, no best
        params = {"centers": params.pop("centroids")}
        return FitState(0, int(attrs["iteration"]), params, history, dict(attrs.get("state", {})))
    best = None
    if (store / group / "best" / "zarr.json").is_file():
        best = read_state(store, f"{group}/best")
    return FitState(
        start=int(attrs["start"]),
        iteration=int(attrs["iteration"]),
        params=params,
        history=history,
        info=dict(attrs.get("info", {})),
        best=best,
    )
