"""The results store of a job: runs, failures, checkpoints, the sweep, and reading them back.

One Zarr v3 store per job::

    STORE/                      attrs: dkm_store=results, job spec, status, owner, versions,
                                cluster, timings
      runs/<algorithm>-k<k>/    centroids(cluster, feature), x_mean(feature), labels(sample
                                or patch) when asked; patch runs also image_mse(sample),
                                originals / reconstructions(image, y, x[, channel]) for the
                                first output.reconstructions images, sparse_image_mse and
                                sparse_reconstructions with a sparse_coding step,
                                codes_index / codes_weight(patch, nonzero) when asked;
                                attrs: status (complete or failed), identity, run_id, k,
                                params, inertia, n_iter, metrics, timings, error
        history/                inertia, center_shift, n_moved, seconds, ... over iteration
      checkpoints/<run>/slot-0  the fit's state (see dkm.results.checkpoints), two slots
      checkpoints/<run>/slot-1  written in turn, so a kill while writing one never damages
                                the other
      sweep/                    inertia and metrics over (algorithm, k); attrs: elbow_k
                                (first algorithm), elbows (each algorithm)

Every group is stamped ``status: complete`` only after all of its data is written; readers
trust nothing else. This class is the only code that reads or writes a results store; the
whole store also opens with ``xarray.open_datatree(STORE, engine="zarr")``.

Every array is written with a CRC32C checksum and all of its chunks
(:func:`dkm.data.store.checksum_encoding`); a run (the sweep, a checkpoint) is stamped complete
together with its ``dkm_manifest`` (the chunk grid of each of its arrays, history included)
and a fresh ``dkm_write_id``. :meth:`ResultsStore.runs` lists each complete run's chunk files
against its manifest (a missing one makes the run ``damaged``); :meth:`ResultsStore.verify_run`
reads a run back whole; :meth:`ResultsStore.verify` (``dkm verify``,
:func:`dkm.data.integrity.verify_store`) reads every complete run and stamps each
``dkm_verified = <its dkm_write_id>``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from dkm._parallel.base import FitState
from dkm.data.integrity import (
    GroupPlan,
    VerifyReport,
    damage_message,
    plan_group,
    read_groups,
    register_verifier,
)
from dkm.data.store import (
    KIND_ATTR,
    MANIFEST_ATTR,
    VERIFIED_ATTR,
    WRITE_ID_ATTR,
    StoreError,
    chunk_manifest,
    chunk_problems,
    probe,
    process_alive,
    read_attrs,
    store_marks,
    with_checksums,
)
from dkm.results.attrs import COMPLETE, FAILED, INTERRUPTED, RUNNING, jsonable
from dkm.results.checkpoints import read_state, write_state

__all__ = ["ResultsStore", "RunInfo", "run_name"]

KIND = "results"
DAMAGED = "damaged"
# Marks of one write of a group: never carried over into another write.
_GROUP_MARKS = (MANIFEST_ATTR, WRITE_ID_ATTR, VERIFIED_ATTR)

log = logging.getLogger("dkm")


def run_name(algorithm: str, k: int) -> str:
    """The group name of one run, e.g. ``lloyd-k256``."""
    return f"{algorithm}-k{k}"


@dataclass
class RunInfo:
    """One run group as listed by :meth:`ResultsStore.runs`.

    ``status`` is "complete", "failed", "writing" (interrupted while being written) or
    "damaged" (its metadata, an array it records or a chunk file of its manifest is missing
    or unreadable: ``problem``, e.g. ``STORE: run 'lloyd-k8': array 'centroids' is missing
    chunk c/0/0 (1 of 1 chunk)``). Chunks whose bytes changed are found only by reading
    them: :meth:`ResultsStore.verify_run`.
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
            and not process_alive(owner["pid"])
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
            return RunInfo(group.name, DAMAGED, problem=str(err))
        status = attrs.get("status", "writing")
        info = RunInfo(group.name, status, attrs)
        if status == COMPLETE:
            # A complete run must still hold every array it was written with.
            for var in [*attrs.get("variables", ["centroids"]), "history"]:
                meta = group / var / "zarr.json"
                try:
                    _read_json(meta)
                except StoreError as err:
                    info.status, info.problem = DAMAGED, str(err)
                    return info
            # ... and every chunk file of them (runs written before manifests: unchecked).
            try:
                problems = chunk_problems(group, attrs.get(MANIFEST_ATTR))
            except StoreError as err:
                problems = [err.problem]
            if problems:
                info.status = DAMAGED
                info.problem = f"{self.path}: run {group.name!r}: {'; '.join(problems)}"
        return info

    def run_info(self, name: str) -> RunInfo | None:
        """The run ``name`` as :meth:`runs` lists it, or None when there is no such run."""
        group = self.path / "runs" / name
        return self._run_info(group) if group.is_dir() else None

    def verify_run(self, name: str, *, labels: bool = True) -> str | None:
        """Read a run's arrays back whole (checksums checked); what is wrong, or None.

        Call it before reusing a run: a run that says complete but does not read back
        (``damaged``) should be computed again. The arrays (centroids, x_mean, labels,
        history) are read here, chunk by chunk.

        Returns
        -------
        str or None
            None when the run is complete and every chunk reads back intact; otherwise the
            problem, e.g. ``STORE: run 'lloyd-k8': array 'centroids' chunk c/0/0 is damaged
            (CRC32C checksum mismatch)``, or why the run is not complete.

        Raises
        ------
        StoreError
            There is no run ``name``.
        """
        info = self.run_info(name)
        if info is None:
            raise StoreError(f"{self.path}: no run {name!r}")
        if info.status != COMPLETE:
            if info.problem:
                return info.problem
            error = info.attrs.get("error")
            return f"{self.path}: run {name!r} is {info.status}" + (f": {error}" if error else "")
        try:
            self._read_back(name, info.attrs, skip=() if labels else ("labels",))
        except StoreError as err:
            return err.problem
        return None

    def _read_back(self, name: str, attrs: dict[str, Any], skip: tuple[str, ...] = ()) -> GroupPlan:
        """Read every chunk of a run here (but the arrays in ``skip``); StoreError naming the
        first damaged ones."""
        plan = plan_group(self.path / "runs" / name, attrs.get(MANIFEST_ATTR))
        for array in skip:
            plan.grids.pop(array, None)
        (damaged,) = read_groups([plan], parallel=False)
        problems = plan.problems + [d.describe() for d in damaged]
        if problems:
            raise StoreError(damage_message(f"{self.path}: run {name!r}", problems))
        return plan

    def _named_read_error(self, name: str, attrs: dict[str, Any], what: str, err: Exception):
        """A StoreError for a failed read of a run's ``what``, naming the chunk if it can."""
        try:
            self._read_back(name, attrs)
        except StoreError as named:
            return named
        reason = " ".join(str(err).split()) or type(err).__name__
        return StoreError(f"{self.path}: run {name!r}: {what} is damaged ({reason[:160]})")

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

        ``variables`` maps names to ``(dims, values)`` (numpy or dask arrays). Every array
        is checksummed; the run is stamped complete with its manifest and a write id.
        """
        group = f"runs/{name}"
        shutil.rmtree(self.path / group, ignore_errors=True)
        ds = xr.Dataset(
            variables,
            attrs=jsonable(
                {
                    **{k: v for k, v in attrs.items() if k not in _GROUP_MARKS},
                    "variables": sorted(variables),
                    "status": "writing",
                }
            ),
        )
        self._to_zarr(ds, group, mode="w")
        history = history.copy()
        history.attrs = jsonable(history.attrs)
        self._to_zarr(history, f"{group}/history", mode="w")
        self._stamp_complete(group)

    def _to_zarr(self, ds: xr.Dataset, group: str, mode: str) -> None:
        ds, encoding = with_checksums(ds)
        ds.to_zarr(
            str(self.path),
            group=group,
            mode=mode,
            consolidated=False,
            zarr_format=3,
            encoding=encoding,
        )

    def _stamp_complete(self, group: str, attrs: dict[str, Any] | None = None) -> None:
        # Status, manifest and write id in one metadata write, after all the data.
        marks = {
            MANIFEST_ATTR: chunk_manifest(self.path / group),
            WRITE_ID_ATTR: uuid.uuid4().hex,
            "status": COMPLETE,
        }
        self._update_attrs({**(attrs or {}), **marks}, group)

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
        if not variables:
            self._update_attrs({**current, **(attrs or {}), "status": COMPLETE}, group)
            return
        current["variables"] = sorted({*current.get("variables", []), *variables})
        # xarray's mode="a" replaces the group's attrs with the Dataset's: carry them (but
        # the marks of the previous write: a new manifest and write id come at the end).
        kept = {k: v for k, v in current.items() if k not in _GROUP_MARKS}
        ds = xr.Dataset(variables, attrs=jsonable({**kept, "status": "writing"}))
        # An array given again is written anew: appending to it would keep its old
        # encoding, which may drop chunks equal to the fill value (read back as damage).
        self._update_attrs({"status": "writing"}, group)
        for var in variables:
            shutil.rmtree(self.path / group / var, ignore_errors=True)
        self._to_zarr(ds, group, mode="a")
        self._stamp_complete(group, attrs)

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
            ds = xr.open_zarr(str(self.path), group=f"runs/{name}", consolidated=False)
        except Exception as err:  # zarr and xarray raise many kinds on damaged metadata
            raise StoreError(f"{self.path}/runs/{name}: damaged ({err})") from err
        # The model's arrays are small: read them now, so damage is a StoreError naming the
        # chunk rather than a bare codec error later. Labels and codes (one per vector) stay
        # lazy.
        for var in [v for v in ds.data_vars if v not in _PER_VECTOR]:
            try:
                ds.variables[var].load()
            except Exception as err:
                raise self._named_read_error(name, info.attrs, f"array {var!r}", err) from err
        return ds

    def read_history(self, name: str) -> xr.Dataset:
        """A run's per-iteration record, read into memory."""
        try:
            history = xr.open_zarr(str(self.path), group=f"runs/{name}/history", consolidated=False)
        except Exception as err:
            raise StoreError(f"{self.path}/runs/{name}/history: damaged ({err})") from err
        try:
            return history.load()
        except Exception as err:
            info = self.run_info(name)
            attrs = info.attrs if info is not None else {}
            raise self._named_read_error(name, attrs, "its history", err) from err

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
        """The latest complete checkpoint of a run (of the run ``run_id`` when given).

        A damaged slot (a missing chunk file, a checksum mismatch) is skipped with a warning
        for the other slot, or None: the run then starts from an older state or afresh.
        """
        slots = {i: v for i, v in self._slots(name).items() if run_id is None or v[1] == run_id}
        for slot in sorted(slots, key=lambda i: slots[i][0], reverse=True):
            try:
                return read_state(self.path, f"checkpoints/{name}/slot-{slot}")
            except StoreError as err:
                log.warning("%s: checkpoint not used: %s", name, err)
        return None

    def drop_checkpoints(self, name: str) -> None:
        shutil.rmtree(self.path / f"checkpoints/{name}", ignore_errors=True)

    # ------------------------------------------------------------------ sweep
    def write_sweep(self, sweep: xr.Dataset) -> None:
        """Write the metrics-over-k table (replacing an earlier one)."""
        sweep = sweep.copy()
        attrs = {k: v for k, v in sweep.attrs.items() if k not in _GROUP_MARKS}
        sweep.attrs = jsonable({**attrs, "status": "writing"})
        self._to_zarr(sweep, "sweep", mode="w")
        self._stamp_complete("sweep")

    def read_sweep(self) -> xr.Dataset | None:
        """The metrics-over-k table, or None when the store has none (yet)."""
        meta = self.path / "sweep" / "zarr.json"
        if not meta.is_file():
            return None
        attrs = _read_json(meta).get("attributes", {})
        if attrs.get("status") != COMPLETE:
            return None
        problems = chunk_problems(self.path / "sweep", attrs.get(MANIFEST_ATTR))
        if problems:
            raise StoreError(f"{self.path}: sweep: {'; '.join(problems)}")
        try:
            return xr.open_zarr(str(self.path), group="sweep", consolidated=False).load()
        except Exception as err:
            plan = plan_group(self.path / "sweep", attrs.get(MANIFEST_ATTR))
            (damaged,) = read_groups([plan], parallel=False)
            if damaged:
                items = [d.describe() for d in damaged]
                raise StoreError(damage_message(f"{self.path}: sweep", items)) from err
            raise StoreError(f"{self.path}/sweep: damaged ({err})") from err

    # ------------------------------------------------------------------ verification
    def verify(self, *, client: Any = None) -> VerifyReport:
        """Read every chunk of every complete run (and of the sweep) back, on the cluster.

        On success each of them is stamped ``dkm_verified = <its dkm_write_id>``
        (:meth:`is_verified`). This is what :func:`dkm.data.integrity.verify_store` and
        ``dkm verify`` do with a results store.

        Parameters
        ----------
        client : distributed.Client, optional
            Where the reads run; default: the active Dask scheduler.

        Raises
        ------
        StoreError
            A damaged run or sweep, every damaged chunk named (ten at most), e.g.
            ``STORE: run 'lloyd-k8': array 'centroids' chunk c/0/0 is damaged (CRC32C
            checksum mismatch); the store is damaged``.
        """
        problems, plans = [], []
        runs = self.runs()
        for r in runs:
            if r.status == DAMAGED:
                problems.append(r.problem.removeprefix(f"{self.path}: "))
            elif r.status == COMPLETE:
                group = f"runs/{r.name}"
                manifest = r.attrs.get(MANIFEST_ATTR)
                plans.append((group, f"run {r.name!r}", plan_group(self.path / group, manifest)))
        sweep_meta = self.path / "sweep" / "zarr.json"
        if sweep_meta.is_file():
            try:
                attrs = _read_json(sweep_meta).get("attributes", {})
            except StoreError as err:
                problems.append(err.problem)
            else:
                if attrs.get("status") == COMPLETE:
                    plan = plan_group(self.path / "sweep", attrs.get(MANIFEST_ATTR))
                    plans.append(("sweep", "sweep", plan))
        found = read_groups([plan for *_, plan in plans], client=client)
        for (_, label, plan), damaged in zip(plans, found, strict=True):
            items = [*plan.problems, *(d.describe() for d in damaged)]
            problems += [f"{label}: {item}" for item in items]
        if problems:
            raise StoreError(damage_message(str(self.path), problems, "the store is damaged"))
        for group, _, _ in plans:
            self._stamp_verified(group)
        return VerifyReport(
            self.path,
            KIND,
            arrays=sum(len(plan.grids) for *_, plan in plans),
            chunks=sum(plan.n_chunks for *_, plan in plans),
            checksummed=all(plan.checksummed for *_, plan in plans),
            runs=sum(r.status == COMPLETE for r in runs),
        )

    def _stamp_verified(self, group: str) -> None:
        try:
            attrs = _read_json(self.path / group / "zarr.json").get("attributes", {})
        except StoreError:
            return
        write_id = attrs.get(WRITE_ID_ATTR)
        if isinstance(write_id, str) and write_id and attrs.get(VERIFIED_ATTR) != write_id:
            self._update_attrs({VERIFIED_ATTR: write_id}, group)

    def is_verified(self) -> bool:
        """Whether every complete run and the sweep were read back whole (:meth:`verify`)
        since they were last written. False when a run is damaged, or was written before
        runs had a write id."""
        groups = []
        for r in self.runs():
            if r.status == DAMAGED:
                return False
            if r.status == COMPLETE:
                groups.append(r.attrs)
        sweep_meta = self.path / "sweep" / "zarr.json"
        if sweep_meta.is_file():
            try:
                attrs = _read_json(sweep_meta).get("attributes", {})
            except StoreError:
                return False
            if attrs.get("status") == COMPLETE:
                groups.append(attrs)
        return all(
            isinstance(a.get(WRITE_ID_ATTR), str)
            and bool(a.get(WRITE_ID_ATTR))
            and a.get(VERIFIED_ATTR) == a.get(WRITE_ID_ATTR)
            for a in groups
        )

    def open_tree(self) -> xr.DataTree:
        """The whole store as a DataTree (what plain xarray users would open)."""
        return xr.open_datatree(str(self.path), engine="zarr", consolidated=False)

    def remove(self) -> None:
        """Delete the whole store (``dkm run --fresh``); refuses anything but a results store."""
        self.check()
        if self.exists():
            shutil.rmtree(self.path)


# Run arrays with one entry per clustered vector: read lazily.
_PER_VECTOR = ("labels", "codes_index", "codes_weight")


def as_variables(**arrays: Any) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Run arrays with their dims by name: centroids, x_mean, labels."""
    dims = {"centroids": ("cluster", "feature"), "x_mean": ("feature",), "labels": ("sample",)}
    return {
        name: (dims[name], np.asarray(v) if isinstance(v, list) else v)
        for name, v in arrays.items()
    }


def _verify(path: Path, *, client: Any = None) -> VerifyReport:
    return ResultsStore(path).verify(client=client)


def _is_verified(path: Path) -> bool:
    return ResultsStore(path).is_verified()


register_verifier(KIND, _verify, _is_verified)
