"""The results store of a job: runs, checkpoints, the sweep, and reading them back.

One Zarr v3 store per job::

    STORE/                      attrs: job spec, status, versions, cluster, timings
      runs/<algorithm>-k<k>/    centroids(cluster, feature), labels(sample) when asked;
                                attrs: status, k, inertia, n_iter, metrics, timings, ...
        history/                inertia, center_shift, n_moved, seconds, ... over iteration
      checkpoints/<run>/slot-0  centroids and history so far, attrs: iteration, state
      checkpoints/<run>/slot-1  (two slots written in turn, so a kill while writing one
                                never damages the other)
      sweep/                    inertia and metrics over k; attrs: elbow_k

Every group is stamped ``status: complete`` only after all of its data is written; readers
trust nothing else. Everything opens with ``xarray.open_datatree(STORE, engine="zarr")``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

__all__ = ["Checkpoint", "ResultsStore", "run_name"]

COMPLETE = "complete"


def run_name(algorithm: str, k: int) -> str:
    """The group name of one run, e.g. ``lloyd-k256``."""
    return f"{algorithm}-k{k}"


def _jsonable(value: Any) -> Any:
    """Attrs must be plain JSON: numpy scalars and arrays nested anywhere are converted."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


@dataclass
class Checkpoint:
    """Where a run stood: its centroids, iteration, history so far and algorithm state."""

    iteration: int
    centroids: np.ndarray
    history: xr.Dataset
    state: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class ResultsStore:
    """Read and write one job's results store.

    Parameters
    ----------
    path : path-like
        The store directory (created by :meth:`create`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ------------------------------------------------------------------ whole store
    def create(self, attrs: dict[str, Any], *, resume: bool = False) -> None:
        """Start the store, or reopen it to resume.

        Without ``resume`` an existing store is an error: results are never silently
        overwritten. With it, the store must exist and belong to the same job.
        """
        if resume:
            if not (self.path / "zarr.json").is_file():
                raise FileNotFoundError(f"{self.path}: nothing to resume (no results store)")
            stored = self.attrs.get("job")
            if stored is not None and stored != _jsonable(attrs.get("job")):
                raise ValueError(
                    f"{self.path}: holds a different job's results; resume needs the same job "
                    "file (or remove the store to start afresh)"
                )
            self._update_attrs({"status": "running"})
            return
        if self.path.exists():
            raise FileExistsError(
                f"{self.path}: results store already exists; pass --resume to continue it "
                "or remove it to start afresh"
            )
        root = zarr.open_group(str(self.path), mode="w-", zarr_format=3)
        root.attrs.update(_jsonable({**attrs, "status": "running"}))

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(zarr.open_group(str(self.path), mode="r").attrs)

    def _update_attrs(self, attrs: dict[str, Any], group: str | None = None) -> None:
        # xarray's mode="a" would replace group attrs wholesale; zarr merges them.
        where = str(self.path) if group is None else str(self.path / group)
        zarr.open_group(where, mode="r+").attrs.update(_jsonable(attrs))

    def finish(self, attrs: dict[str, Any] | None = None) -> None:
        """Mark the whole job complete and consolidate the metadata once."""
        self._update_attrs({**(attrs or {}), "status": COMPLETE})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(str(self.path))

    # ------------------------------------------------------------------ runs
    def completed_runs(self) -> set[str]:
        """Names of the runs whose data is entirely written."""
        runs = self.path / "runs"
        if not runs.is_dir():
            return set()
        done = set()
        for group in runs.iterdir():
            meta = group / "zarr.json"
            if (
                meta.is_file()
                and json.loads(meta.read_text()).get("attributes", {}).get("status") == COMPLETE
            ):
                done.add(group.name)
        return done

    def write_run(
        self,
        name: str,
        centroids: np.ndarray,
        history: xr.Dataset,
        attrs: dict[str, Any],
        labels: Any = None,
    ) -> None:
        """Write one finished run; it is marked complete only after everything is on disk."""
        group = f"runs/{name}"
        shutil.rmtree(self.path / group, ignore_errors=True)  # a partial earlier attempt
        data = {"centroids": (("cluster", "feature"), np.asarray(centroids))}
        if labels is not None:
            data["labels"] = ("sample", labels)
        ds = xr.Dataset(data, attrs=_jsonable({**attrs, "status": "writing"}))
        ds.to_zarr(str(self.path), group=group, mode="w", consolidated=False, zarr_format=3)
        history.attrs = _jsonable(history.attrs)
        history.to_zarr(str(self.path), group=f"{group}/history", mode="w", consolidated=False)
        self._update_attrs({"status": COMPLETE}, group)

    def read_run(self, name: str) -> xr.Dataset:
        """A complete run's centroids (and labels) with its attrs."""
        if name not in self.completed_runs():
            raise KeyError(f"{self.path}: no complete run {name!r}")
        return xr.open_zarr(str(self.path), group=f"runs/{name}", consolidated=False)

    def read_history(self, name: str) -> xr.Dataset:
        return xr.open_zarr(str(self.path), group=f"runs/{name}/history", consolidated=False)

    # ------------------------------------------------------------------ checkpoints
    def write_checkpoint(self, name: str, checkpoint: Checkpoint) -> None:
        """Save a run's state into the older of its two slots."""
        slots = self._slots(name)
        # Overwrite the free or older slot, never the one holding the newest checkpoint.
        newest = max(slots, key=slots.__getitem__) if slots else 1
        target = 1 - newest
        group = f"checkpoints/{name}/slot-{target}"
        shutil.rmtree(self.path / group, ignore_errors=True)
        data = {"centroids": (("cluster", "feature"), checkpoint.centroids)}
        for key, value in checkpoint.arrays.items():
            data[key] = (tuple(f"{key}_{i}" for i in range(np.ndim(value))), value)
        attrs = {"iteration": checkpoint.iteration, "state": checkpoint.state, "status": "writing"}
        xr.Dataset(data, attrs=_jsonable(attrs)).to_zarr(
            str(self.path), group=group, mode="w", consolidated=False
        )
        hist = checkpoint.history.copy()
        hist.attrs = _jsonable(hist.attrs)
        hist.to_zarr(str(self.path), group=f"{group}/history", mode="w", consolidated=False)
        self._update_attrs({"status": COMPLETE}, group)

    def _slots(self, name: str) -> dict[int, int]:
        """Complete checkpoint slots of a run and their iterations."""
        found = {}
        for i in (0, 1):
            meta = self.path / f"checkpoints/{name}/slot-{i}/zarr.json"
            if meta.is_file():
                attrs = json.loads(meta.read_text()).get("attributes", {})
                if attrs.get("status") == COMPLETE:
                    found[i] = int(attrs["iteration"])
        return found

    def read_checkpoint(self, name: str) -> Checkpoint | None:
        """The latest complete checkpoint of a run, or None."""
        slots = self._slots(name)
        if not slots:
            return None
        best = max(slots, key=slots.__getitem__)
        group = f"checkpoints/{name}/slot-{best}"
        ds = xr.open_zarr(str(self.path), group=group, consolidated=False).load()
        history = xr.open_zarr(str(self.path), group=f"{group}/history", consolidated=False)
        arrays = {k: v.values for k, v in ds.data_vars.items() if k != "centroids"}
        return Checkpoint(
            iteration=int(ds.attrs["iteration"]),
            centroids=ds["centroids"].values,
            history=history.load(),
            state=dict(ds.attrs.get("state", {})),
            arrays=arrays,
        )

    def drop_checkpoints(self, name: str) -> None:
        shutil.rmtree(self.path / f"checkpoints/{name}", ignore_errors=True)

    # ------------------------------------------------------------------ sweep
    def write_sweep(self, sweep: xr.Dataset) -> None:
        """Write the metrics-over-k table (replacing an earlier one)."""
        sweep = sweep.copy()
        sweep.attrs = _jsonable({**sweep.attrs, "status": "writing"})
        sweep.to_zarr(str(self.path), group="sweep", mode="w", consolidated=False)
        self._update_attrs({"status": COMPLETE}, "sweep")

    def open_tree(self) -> xr.DataTree:
        """The whole store as a DataTree (what plain xarray users would open)."""
        return xr.open_datatree(str(self.path), engine="zarr", consolidated=False)
