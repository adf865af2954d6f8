"""The deep check of a dkm store: every chunk of every array read back and decoded.

:func:`dkm.data.store.open_dataset` (and :meth:`dkm.results.ResultsStore.runs`) only list
chunk files, which finds a deleted or emptied chunk but not one whose bytes changed. This
module reads each chunk once, so a CRC32C mismatch (stores written with checksums, see
:func:`dkm.data.store.checksum_encoding`) or a chunk that no longer decompresses is found and
named: store, array and chunk key. The reads run as tasks on the active Dask scheduler (the
distributed client when there is one), each holding one decoded chunk at a time.

A store that passes is stamped ``dkm_verified = <its dkm_write_id>``, so :func:`is_verified`
tells a caller that nothing was written to it since it was last read back whole.

Results stores are verified by :mod:`dkm.results` (the only code that reads them), which
registers itself here with :func:`register_verifier`; this module never imports it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import zarr

from dkm.data.store import (
    MANIFEST_ATTR,
    STATUS_ATTR,
    VERIFIED_ATTR,
    WRITE_ID_ATTR,
    ArrayGrid,
    StoreError,
    array_grids,
    chunk_problems,
    manifest_grids,
    missing_chunks,
    read_attrs,
    require_complete,
    store_kind,
    update_root_attrs,
)

__all__ = [
    "ChunkDamage",
    "GroupPlan",
    "VerifyReport",
    "damage_message",
    "is_verified",
    "plan_group",
    "read_groups",
    "register_verifier",
    "verify_once",
    "verify_store",
]

# Chunks one task reads in turn (one decoded chunk in memory at a time): about this many
# bytes of decoded data per task, so small chunks do not each cost a task.
_TASK_BYTES = 64 * 2**20
_MAX_CHUNKS_PER_TASK = 256
_MAX_LISTED = 10  # damaged chunks named in one message


@dataclass(frozen=True)
class ChunkDamage:
    """One chunk that did not read back: the array (path in its group), key, and why."""

    array: str
    key: str
    reason: str

    def describe(self) -> str:
        return f"array {self.array!r} chunk {self.key} is damaged ({self.reason})"


@dataclass
class GroupPlan:
    """What to read of one group (a store's root, a run): see :func:`plan_group`.

    Attributes
    ----------
    group : Path
        The group's directory.
    grids : dict
        ``{array: ArrayGrid}`` of the arrays to read.
    problems : list of str
        What the listing already showed (missing or empty chunk files, a changed grid).
    skip : dict
        ``{array: keys}`` not to read (already reported, or absent in a store without a
        manifest, where an absent chunk is the fill value).
    manifest : bool
        The group has a manifest: every chunk file of its grids must exist.
    checksummed : bool
        A manifest was found and every array carries a checksum.
    """

    group: Path
    grids: dict[str, ArrayGrid]
    problems: list[str] = field(default_factory=list)
    skip: dict[str, set[str]] = field(default_factory=dict)
    manifest: bool = False
    checksummed: bool = False

    @property
    def n_chunks(self) -> int:
        return sum(grid.n_chunks for grid in self.grids.values())


def plan_group(group: str | os.PathLike, manifest: Mapping[str, Any] | None) -> GroupPlan:
    """List a group's chunk files against its manifest and plan the reads of the rest.

    Without a manifest (written before dkm kept one) the arrays' own metadata gives the
    grids and only the chunk files that exist are read: nothing is reported missing.
    """
    group = Path(group)
    if manifest:
        grids, _ = manifest_grids(group, manifest)
        plan = GroupPlan(group, grids, chunk_problems(group, manifest), manifest=True)
        for name, grid in grids.items():
            missing, empty = missing_chunks(group, grid)
            plan.skip[name] = {*missing, *empty}
        plan.checksummed = all(grid.checksum for grid in grids.values())
        return plan
    plan = GroupPlan(group, array_grids(group))
    for name, grid in plan.grids.items():
        missing, _ = missing_chunks(group, grid)
        plan.skip[name] = set(missing)
    return plan


def chunk_reason(err: BaseException) -> str:
    """A short reason for a chunk that did not decode."""
    text = " ".join(str(err).split())
    if "checksum do not match" in text:
        return "CRC32C checksum mismatch"
    if isinstance(err, FileNotFoundError):
        return "chunk file is gone"
    text = text or type(err).__name__
    text = f"{type(err).__name__}: {text}" if type(err).__name__ not in text else text
    return text if len(text) <= 120 else text[:117] + "..."


def _read_chunks(
    group: str, grid: ArrayGrid, chunks: list[tuple[tuple[int, ...], str]], files: bool
) -> list[ChunkDamage]:
    """Read and decode ``chunks`` of one array in turn (a task); what did not decode.

    ``files``: the chunk files must exist (a store with a manifest), otherwise zarr would
    silently read a vanished chunk as its fill value.
    """
    array_dir = os.path.join(group, grid.name)
    try:
        array = zarr.open_array(array_dir, mode="r")
    except Exception as err:
        return [ChunkDamage(grid.name, key, chunk_reason(err)) for _, key in chunks]
    damaged = []
    for coords, key in chunks:
        if files:
            try:
                size = os.stat(os.path.join(array_dir, *key.split("/"))).st_size
            except OSError:
                damaged.append(ChunkDamage(grid.name, key, "chunk file is gone"))
                continue
            if size == 0:
                damaged.append(ChunkDamage(grid.name, key, "chunk file is empty"))
                continue
        try:
            array[grid.region(coords)]  # decoded, checked, dropped
        except Exception as err:
            damaged.append(ChunkDamage(grid.name, key, chunk_reason(err)))
    return damaged


def _batches(plan: GroupPlan) -> list[tuple[ArrayGrid, list[tuple[tuple[int, ...], str]]]]:
    out = []
    for name, grid in plan.grids.items():
        skip = plan.skip.get(name, set())
        per_chunk = 8 * math.prod(grid.chunks)  # bytes, taking 8 per item at most
        size = max(1, min(_MAX_CHUNKS_PER_TASK, _TASK_BYTES // per_chunk))
        todo = [(coords, key) for coords, key in grid.keys() if key not in skip]
        out.extend((grid, todo[i : i + size]) for i in range(0, len(todo), size))
    return out


def read_groups(
    plans: list[GroupPlan], *, client: Any = None, parallel: bool = True
) -> list[list[ChunkDamage]]:
    """Read every planned chunk of every group; the damaged chunks of each group.

    Parameters
    ----------
    plans : list of GroupPlan
    client : distributed.Client, optional
        Where the reads run. Default: the active Dask scheduler (the distributed client when
        there is one, else dask's default for delayed tasks).
    parallel : bool, default True
        False reads everything here, one chunk after another (small groups).
    """
    # A group with a manifest has every chunk file: one vanishing mid-check is damage.
    jobs = [
        (i, grid, chunks, plan.manifest)
        for i, plan in enumerate(plans)
        for grid, chunks in _batches(plan)
    ]
    if parallel and len(jobs) > 1:
        tasks = [
            dask.delayed(_read_chunks, pure=False)(str(plans[i].group), grid, chunks, files)
            for i, grid, chunks, files in jobs
        ]
        kwargs = {} if client is None else {"scheduler": client}
        results = dask.compute(*tasks, **kwargs)
    else:
        results = [
            _read_chunks(str(plans[i].group), grid, chunks, files)
            for i, grid, chunks, files in jobs
        ]
    found: list[list[ChunkDamage]] = [[] for _ in plans]
    for (i, *_), damaged in zip(jobs, results, strict=True):
        found[i].extend(damaged)
    return found


def damage_message(prefix: str, items: list[str], suffix: str = "") -> str:
    """``prefix: item; item; ... and N more[; suffix]`` with at most ten items named."""
    shown = items[:_MAX_LISTED]
    more = len(items) - len(shown)
    text = f"{prefix}: {'; '.join(shown)}"
    if more:
        text += f"; and {more} more damaged chunk{'s' if more != 1 else ''}"
    return f"{text}; {suffix}" if suffix else text


# ----------------------------------------------------------------------------- whole stores


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_store` read back intact.

    Attributes
    ----------
    path : Path
    kind : str
        The store's kind.
    arrays, chunks : int
        Arrays and chunks read (for a results store, of its complete runs and sweep).
    checksummed : bool
        Every array carries a CRC32C checksum (stores written before dkm added them are
        checked for decoding only).
    runs : int or None
        Complete runs verified (results stores only).
    """

    path: Path
    kind: str
    arrays: int
    chunks: int
    checksummed: bool = True
    runs: int | None = None

    def summary(self) -> str:
        """E.g. ``data/x.zarr: 7 arrays, 123 chunks, all intact``."""
        parts = [] if self.runs is None else [_plural(self.runs, "complete run")]
        parts += [_plural(self.arrays, "array"), _plural(self.chunks, "chunk"), "all intact"]
        text = f"{self.path}: {', '.join(parts)}"
        if not self.checksummed:
            text += " (some arrays have no checksums: those were checked for decoding only)"
        return text

    def __str__(self) -> str:
        return self.summary()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class _Verifier:
    verify: Callable[..., VerifyReport]
    is_verified: Callable[[Path], bool]


_VERIFIERS: dict[str, _Verifier] = {}


def register_verifier(
    kind: str,
    verify: Callable[..., VerifyReport],
    is_verified: Callable[[Path], bool],
) -> None:
    """Let the owner of a kind of store (``results``) verify it: ``verify(path, *,
    client=None) -> VerifyReport`` and ``is_verified(path) -> bool``."""
    _VERIFIERS[kind] = _Verifier(verify, is_verified)


def verify_store(path: str | os.PathLike, *, client: Any = None) -> VerifyReport:
    """Read and decode every chunk of every array of a dkm store once.

    Works on dataset, patches, features and results stores (for a results store, every
    complete run and the sweep). Missing or empty chunk files, CRC32C mismatches and chunks
    that no longer decompress are all found, each named. On success the store is stamped
    ``dkm_verified = <dkm_write_id>`` (see :func:`is_verified`).

    Parameters
    ----------
    path : path-like
        The store.
    client : distributed.Client, optional
        Where the reads run; default: the active Dask scheduler.

    Returns
    -------
    VerifyReport

    Raises
    ------
    StoreError
        Anything :func:`dkm.data.store.require_complete` raises on metadata, or damaged
        chunks: ``PATH: array 'images' chunk c/1/0/0 is damaged (CRC32C checksum mismatch);
        array 'images' is missing chunk c/3/0/0 (1 of 7 chunks); the store is damaged``.
    """
    path = Path(path)
    kind = store_kind(path)
    if kind in _VERIFIERS:
        return _VERIFIERS[kind].verify(path, client=client)
    attrs = require_complete(path, chunks=False)
    write_id = attrs.get(WRITE_ID_ATTR)
    plan = plan_group(path, attrs.get(MANIFEST_ATTR))
    (damaged,) = read_groups([plan], client=client)
    problems = plan.problems + [d.describe() for d in damaged]
    if problems:
        raise StoreError(damage_message(str(path), problems, "the store is damaged"))
    if isinstance(write_id, str) and write_id and read_attrs(path).get(WRITE_ID_ATTR) == write_id:
        update_root_attrs(path, {VERIFIED_ATTR: write_id})  # unless rewritten meanwhile
    return VerifyReport(path, kind, len(plan.grids), plan.n_chunks, plan.checksummed)


def is_verified(path: str | os.PathLike) -> bool:
    """Whether :func:`verify_store` passed on the store since it was last written.

    False for a missing or damaged store, and for stores without a ``dkm_write_id`` (written
    before dkm kept one: there is no write to tie the check to). Never raises.
    """
    path = Path(path)
    try:
        kind = store_kind(path)
        if kind in _VERIFIERS:
            return bool(_VERIFIERS[kind].is_verified(path))
        attrs = read_attrs(path)
    except (StoreError, OSError):
        return False
    write_id = attrs.get(WRITE_ID_ATTR)
    return (
        attrs.get(STATUS_ATTR) == "complete"
        and isinstance(write_id, str)
        and bool(write_id)
        and attrs.get(VERIFIED_ATTR) == write_id
    )


def verify_once(path: str | os.PathLike, *, client: Any = None) -> VerifyReport | None:
    """:func:`verify_store` unless it already passed since the store's last write.

    Jobs call this on their inputs: a store is read whole once per write, not once per job.
    Stores written before dkm kept checksums and a manifest are not read (there is nothing to
    check them against); None is returned for those and for stores verified already.
    """
    if is_verified(path) or MANIFEST_ATTR not in read_attrs(path):
        return None
    return verify_store(path, client=client)
