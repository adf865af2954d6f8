"""The results store of a job: runs, failures, checkpoints, the sweep, and reading them back.

One Zarr v3 store per job::

    STORE/                      attrs: dkm_store=results, job spec, status, owner, versions,
                                cluster, timings
      runs/<algorithm>-k<k>/    centroids(cluster, feature), x_mean(feature), labels(sample)
                                when asked; attrs: status (complete or failed), identity,
                                run_id, k, params, inertia, n_iter, metrics, timings, error
        history/                inertia, center_shift, n_moved, seconds, ... over iteration
      checkpoints/<run>/slot-0  the fit's state (see dkm.results.checkpoints), two slots
      checkpoints/<run>/slot-1  written in turn, so a kill while writing one never damages
                                the other
      sweep/                    inertia and metrics over k; attrs: elbow_k

Every group is stamped ``status: complete`` only after all of its data is written; readers
trust nothing else. This class is the only code that reads or writes a results store; the
whole store also opens with ``xarray.open_datatree(STORE, engine="zarr")``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from dkm._parallel.base import FitState
from dkm.data.store import KIND_ATTR, StoreError, probe, read_attrs, store_marks
from dkm.results.attrs import COMPLETE, FAILED, INTERRUPTED, RUNNING, jsonable
from dkm.results.checkpoints import read_state, write_state

__all__ = ["ResultsStore", "RunInfo", "run_name"]

KIND = "results"


def run_name(algorithm: str, k: int) -> str:
    """The group name of one run, e.g. ``lloyd-k256``."""
    return f"{algorithm}-k{k}"


@dataclass
class RunInfo:
    """One run group as listed by :meth:`ResultsStore.runs`.

    ``status`` is "complete", "failed", "writing" (interrupted while being written) or
    "damaged" (its metadata or an array it records is missing or unreadable: ``problem``).
    """

    name: str
    status: str
    attrs: dict[str, Any] = field(default_factory=dict)
    problem: str = ""

    @property
    def k(self) -> int:
        return int(self.attrs.get("k", -1))

    @property
    def algorithm(self) -> str:
        return str(self.attrs.get("algorithm", self.name.rsplit("-k", 1)[0]))

    @property
    def run_id(self) -> str | None:
        return self.attrs.get("run_id")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{path}: damaged metadata ({type(err).__name__}: {err})") from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class ResultsStore:
    """Read and write one job's results store.

    Parameters
    ----------
    path : path-like
        The store directory (created by :meth:`start_job`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ------------------------------------------------------------------ whole store
    def exists(self) -> bool:
        """Whether a results store is there (an empty directory is not one yet)."""
        state = probe(self.path)
        return state is not None and not state.empty

    def check(self) -> None:
        """Refuse a path that holds something other than a results store (a dataset store,
        a plain file, a damaged store); a missing path or an empty directory is fine."""
        state = probe(self.path)
        if state is None or state.empty or (state.kind == KIND and state.problem is None):
            return
        raise StoreError(f"{self.path}: {state.what}, not a results store")

    def start_job(self, attrs: dict[str, Any]) -> None:
        """Create the store, or take over an existing one for a new run of its job.

        The root attrs are replaced by ``attrs`` (the job as it is now) with status
        ``running`` and this process as the owner; the runs already in the store stay.
        """
        self.check()
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        root_attrs = jsonable({**attrs, KIND_ATTR: KIND, "status": RUNNING, "owner": owner})
        if not self.exists():
            root = zarr.open_group(str(self.path), mode="w", zarr_format=3)
            root.attrs.update({**root_attrs, **store_marks(KIND)})
            return
        root = zarr.open_group(str(self.path), mode="r+")
        stale = set(root.attrs) - set(root_attrs) - set(store_marks(KIND))
        for key in stale:
            del root.attrs[key]  # keys of the previous run of the job (error, seconds...)
        root.attrs.update(root_attrs)

    @property
    def attrs(self) -> dict[str, Any]:
        return read_attrs(self.path)

    def status(self) -> str:
        """The job's status; a ``running`` store whose process is gone reads ``interrupted``."""
        attrs = self.attrs
        status = str(attrs.get("status", "unknown"))
        owner = attrs.get("owner") or {}
        if (
            status == RUNNING
            and owner.get("host") == socket.gethostname()
            and isinstance(owner.get("pid"), int)
            and not _process_alive(owner["pid"])
        ):
            return f"{INTERRUPTED} (process {owner['pid']} is gone)"
        return status

    def finish(self, status: str, attrs: dict[str, Any] | None = None) -> None:
        """Record how the job ended ("complete", "failed" or "interrupted"); consolidate."""
        self._update_attrs({**(attrs or {}), "status": status})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(str(self.path))

    def _update_attrs(self, attrs: dict[str, Any], group: str | None = None) -> None:
        # xarray's mode="a" would replace group attrs wholesale; zarr merges them.
        where = str(self.path) if group is None else str(self.path / group)
        zarr.open_group(where, mode="r+").attrs.update(jsonable(attrs))

    # ------------------------------------------------------------------ runs
    def runs(self) -> list[RunInfo]:
        """Every run group, sorted by algorithm then k, with its status."""
        runs_dir = self.path / "runs"
        if not runs_dir.is_dir():
            return []
        found = [self._run_info(group) for group in runs_dir.iterdir() if group.is_dir()]
        return sorted(found, key=lambda r: (r.algorithm, r.k, r.name))

    def _run_info(self, group: Path) -> RunInfo:
        try:
            attrs = _read_json(group / "zarr.json").get("attributes", {})
        except StoreError as err:
            return RunInfo(group.name, "damaged", problem=str(err))
        status = attrs.get("status", "writing")
        info = RunInfo(group.name, status, attrs)
        if status == COMPLETE:
            # A complete run must still hold every array it was written with.
            for var in [*attrs.get("variables", ["centroids"]), "history"]:
                meta = group / var / "zarr.json"
                try:
                    _read_json(meta)
                except StoreError as err:
                    info.status, info.problem = "damaged", str(err)
                    break
        return info

    def run_info(self, name: str) -> RunInfo | None:
        group = self.path / "runs" / name
        return self._run_info(group) if group.is_dir() else None

    def completed_runs(self) -> set[str]:
        """Names of the runs whose data is entirely written."""
        return {r.name for r in self.runs() if r.status == COMPLETE}

    def write_run(
        self,
        name: str,
        variables: dict[str, tuple[tuple[str, ...], Any]],
        history: xr.Dataset,
        attrs: dict[str, Any],
    ) -> None:
        """Write one finished run (replacing an earlier attempt); complete only at the end.

        ``variables`` maps names to ``(dims, values)`` (numpy or dask arrays).
        """
        group = f"runs/{name}"
        shutil.rmtree(self.path / group, ignore_errors=True)
        ds = xr.Dataset(
            variables,
            attrs=jsonable({**attrs, "variables": sorted(variables), "status": "writing"}),
        )
        ds.to_zarr(str(self.path), group=group, mode="w", consolidated=False, zarr_format=3)
        history = history.copy()
        history.attrs = jsonable(history.attrs)
        history.to_zarr(str(self.path), group=f"{group}/history", mode="w", consolidated=False)
        self._update_attrs({"status": COMPLETE}, group)

    def write_failed_run(self, name: str, attrs: dict[str, Any], error: str) -> None:
        """Record that a run failed and why (replacing an earlier attempt)."""
        group = f"runs/{name}"
        shutil.rmtree(self.path / group, ignore_errors=True)
        root = zarr.open_group(str(self.path), mode="r+")
        root.require_group(group).attrs.update(
            jsonable({**attrs, "status": FAILED, "error": error, "variables": []})
        )

    def add_to_run(
        self,
        name: str,
        attrs: dict[str, Any] | None = None,
        variables: dict[str, tuple[tuple[str, ...], Any]] | None = None,
    ) -> None:
        """Add metrics or arrays (e.g. labels asked for later) to a complete run.

        The run reads ``writing`` while its new arrays are written, so an interruption
        leaves it to be recomputed rather than looking complete without them.
        """
        group = f"runs/{name}"
        current = dict(self.run_info(name).attrs)
        if variables:
            current["variables"] = sorted({*current.get("variables", []), *variables})
            # xarray's mode="a" replaces the group's attrs with the Dataset's: carry them.
            ds = xr.Dataset(variables, attrs=jsonable({**current, "status": "writing"}))
            ds.to_zarr(str(self.path), group=group, mode="a", consolidated=False, zarr_format=3)
        self._update_attrs({**current, **(attrs or {}), "status": COMPLETE}, group)

    def read_run(self, name: str) -> xr.Dataset:
        """A complete run's arrays with its attrs.

        Raises
        ------
        StoreError
            The run is missing, failed, unfinished or damaged.
        """
        info = self.run_info(name)
        if info is None:
            raise StoreError(f"{self.path}: no run {name!r}")
        if info.status != COMPLETE:
            detail = f": {info.problem or info.attrs.get('error', '')}".rstrip(": ")
            raise StoreError(f"{self.path}: run {name!r} is {info.status}{detail}")
        try:
            return xr.open_zarr(str(self.path), group=f"runs/{name}", consolidated=False)
        except Exception as err:  # zarr and xarray raise many kinds on damaged metadata
            raise StoreError(f"{self.path}/runs/{name}: damaged ({err})") from err

    def read_history(self, name: str) -> xr.Dataset:
        try:
            return xr.open_zarr(str(self.path), group=f"runs/{name}/history", consolidated=False)
        except Exception as err:
            raise StoreError(f"{self.path}/runs/{name}/history: damaged ({err})") from err

    # ------------------------------------------------------------------ checkpoints
    def write_checkpoint(self, name: str, state: FitState, run_id: str | None = None) -> None:
        """Save a fit's state into the older of the run's two slots."""
        slots = self._slots(name)
        # Overwrite the free or older slot, never the one holding the newest checkpoint.
        newest = max(slots, key=lambda i: slots[i][0]) if slots else 1
        write_state(
            self.path,
            f"checkpoints/{name}/slot-{1 - newest}",
            state,
            {"run_id": run_id, "written": time.time()},
        )

    def _slots(self, name: str) -> dict[int, tuple[float, str | None]]:
        """Complete checkpoint slots of a run: ``{slot: (written, run_id)}``."""
        found = {}
        for i in (0, 1):
            meta = self.path / f"checkpoints/{name}/slot-{i}/zarr.json"
            try:
                attrs = _read_json(meta).get("attributes", {})
            except StoreError:
                continue
            if attrs.get("status") == COMPLETE:
                # dkm 0.1 slots carry no time; their iteration still orders them.
                written = attrs.get("written", attrs.get("iteration", 0))
                found[i] = (float(written), attrs.get("run_id"))
        return found

    def read_checkpoint(self, name: str, run_id: str | None = None) -> FitState | None:
        """The latest complete checkpoint of a run (of the run ``run_id`` when given)."""
        slots = {i: v for i, v in self._slots(name).items() if run_id is None or v[1] == run_id}
        if not slots:
            return None
        best = max(slots, key=lambda i: slots[i][0])
        return read_state(self.path, f"checkpoints/{name}/slot-{best}")

    def drop_checkpoints(self, name: str) -> None:
        shutil.rmtree(self.path / f"checkpoints/{name}", ignore_errors=True)

    # ------------------------------------------------------------------ sweep
    def write_sweep(self, sweep: xr.Dataset) -> None:
        """Write the metrics-over-k table (replacing an earlier one)."""
        sweep = sweep.copy()
        sweep.attrs = jsonable({**sweep.attrs, "status": "writing"})
        sweep.to_zarr(str(self.path), group="sweep", mode="w", consolidated=False)
        self._update_attrs({"status": COMPLETE}, "sweep")

    def read_sweep(self) -> xr.Dataset | None:
        """The metrics-over-k table, or None when the store has none (yet)."""
        meta = self.path / "sweep" / "zarr.json"
        if not meta.is_file():
            return None
        if _read_json(meta).get("attributes", {}).get("status") != COMPLETE:
            return None
        try:
            return xr.open_zarr(str(self.path), group="sweep", consolidated=False).load()
        except Exception as err:
            raise StoreError(f"{self.path}/sweep: damaged ({err})") from err

    def open_tree(self) -> xr.DataTree:
        """The whole store as a DataTree (what plain xarray users would open)."""
        return xr.open_datatree(str(self.path), engine="zarr", consolidated=False)

    def remove(self) -> None:
        """Delete the whole store (``dkm run --fresh``); refuses anything but a results store."""
        self.check()
        if self.exists():
            shutil.rmtree(self.path)


def as_variables(**arrays: Any) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Run arrays with their dims by name: centroids, x_mean, labels."""
    dims = {"centroids": ("cluster", "feature"), "x_mean": ("feature",), "labels": ("sample",)}
    return {
        name: (dims[name], np.asarray(v) if isinstance(v, list) else v)
        for name, v in arrays.items()
    }
