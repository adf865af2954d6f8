"""Where the per-block kernels run: a dask.distributed cluster, or local threads.

The model drivers keep the data as a list of block handles that live where the work runs
(futures of persisted blocks on a cluster; arrays in this process otherwise) and submit one
small, fixed-shape set of tasks per iteration against them: ``map`` over blocks, a tree
reduction, one ``gather`` of a k x d result. Going through futures instead of rebuilding a
dask-array graph each iteration keeps per-iteration overhead to a few milliseconds and makes
the number of tasks per iteration constant by construction.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from concurrent.futures import Future as LocalFuture
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np

from dkm import config

__all__ = [
    "Backend",
    "DistributedBackend",
    "FitLostError",
    "LocalBackend",
    "NoWorkersError",
    "WorkerMemory",
    "describe_worker_loss",
    "get_backend",
]

log = logging.getLogger("dkm")

MEMORY_SETTINGS = (
    "cluster.memory_limit in a job file, memory_limit= of the LocalCluster, "
    "or dask worker --memory-limit"
)


class NoWorkersError(TimeoutError):
    """No Dask worker was running for ``dkm.backend.no-worker-timeout`` while a fit waited."""


class FitLostError(RuntimeError):
    """Tasks or blocks of a fit were released or lost and cannot be recomputed."""


@dataclass(frozen=True)
class WorkerMemory:
    """What one worker can give a fit: its memory limit and what its process already uses.

    ``rss`` is measured after :func:`dkm._parallel.kernels.warm_up` loaded what the kernels
    need; ``managed`` is the part of it that is task results (Dask can spill those).
    """

    address: str
    nthreads: int
    limit: int  # bytes; 0 when the worker has no memory limit
    rss: int
    managed: int = 0

    @property
    def unmanaged(self) -> int:
        return max(0, self.rss - self.managed)


def memory_pause_fraction() -> float:
    """Share of its memory limit at which a worker stops running tasks (Dask's ``pause``).

    Read from this process's Dask config, like every dkm setting; falls back to the
    ``terminate`` threshold, then to the whole limit, when the thresholds are disabled.
    """
    for key in ("pause", "terminate"):
        value = dask.config.get(f"distributed.worker.memory.{key}", False)
        if value:
            return float(value)
    return 1.0


def memory_spill_fraction() -> float:
    """Share of its memory limit above which a worker spills task results to disk (Dask's
    ``spill``), or its pause threshold when lower or when spilling is disabled.

    Persisted blocks spilled to disk are read back on every pass (slower than streaming
    them from Zarr), so a plan that keeps them in memory stays below this.
    """
    spill = dask.config.get("distributed.worker.memory.spill", False)
    pause = memory_pause_fraction()
    return min(float(spill), pause) if spill else pause


def subtract_in_place(block: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``block -= shift``; returns the same array (a task whose result is its input).

    Centers a block that only the fit holds without making a second copy: on a worker the
    result is the very array of the input, so the block is held once after the input's key
    is released (``block - shift`` would hold it twice until then).
    """
    np.subtract(block, shift, out=block)
    return block


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.0f} MB"


def get_backend(client=None) -> Backend:
    """The distributed client if one is given or is the default scheduler, else local threads.

    An explicit ``dask.config.set(scheduler="threads"|"sync")`` wins over a default client,
    which is how the benchmark runs the "threaded" rows.
    """
    if client is not None:
        return DistributedBackend(client)
    sched = dask.config.get("scheduler", None)
    if sched in ("threads", "threading", "sync", "synchronous", "single-threaded"):
        n = 1 if sched in ("sync", "synchronous", "single-threaded") else None
        return LocalBackend(n)
    try:
        from distributed import default_client

        return DistributedBackend(default_client())
    except (ImportError, ValueError):
        return LocalBackend(dask.config.get("num_workers", None))


class Backend:
    """Minimal futures interface the drivers use."""

    nthreads: int
    is_distributed: bool

    def blas_limit(self):
        """Context in which kernels run: one BLAS thread per task when tasks share a process."""
        return contextlib.nullcontext()

    def map(self, fn: Callable, *iterables: Sequence, name: str) -> list:
        raise NotImplementedError

    def submit(self, fn: Callable, *args, name: str):
        raise NotImplementedError

    def gather(self, futures):
        raise NotImplementedError

    def share(self, obj: Any):
        """Make a (possibly large) read-only object available to tasks."""
        return obj

    def reduces_on_client(self, n: int, nbytes: int) -> bool:
        """Whether :meth:`reduce` combines ``n`` partials of ``nbytes`` here, not in a tree."""
        return n * nbytes <= config.get_bytes("backend.client-reduce-bytes")

    def reduce(self, futures: list, combine: Callable, name: str, nbytes: int):
        """Combine per-block results and return the value (not a future).

        Small partials (``dkm.backend.client-reduce-bytes`` in all) are gathered and combined
        here: that saves a scheduler hop per iteration (measured ~15 ms of a 50 ms iteration
        floor on a 2-process cluster). Large ones are combined on the workers in a tree.
        """
        if self.reduces_on_client(len(futures), nbytes):
            return combine(*self.gather(futures))
        return self.gather(self.tree_reduce(futures, combine, name))

    def reduce_tasks(self, n: int, nbytes: int) -> int:
        """How many combine tasks :meth:`reduce` submits for ``n`` partials of ``nbytes``
        (none when they are combined here)."""
        if self.reduces_on_client(n, nbytes):
            return 0
        every = int(config.get("backend.split-every"))
        total = 0
        while n > 1:
            n = -(-n // every)
            total += n
        return total

    def tree_reduce(self, futures: list, combine: Callable, name: str):
        """Combine futures in groups of ``dkm.backend.split-every`` (a tree, not a chain)."""
        every = int(config.get("backend.split-every"))
        level = 0
        while len(futures) > 1:
            groups = [futures[i : i + every] for i in range(0, len(futures), every)]
            futures = [
                self.submit(combine, *g, name=f"{name}-l{level}-{j}") for j, g in enumerate(groups)
            ]
            level += 1
        return futures[0]


class DistributedBackend(Backend):
    is_distributed = True

    def __init__(self, client):
        self.client = client
        # Client.restart bumps the client's generation and cancels all its futures.
        self._generation = getattr(client, "generation", None)
        info = self._info()
        self.nthreads = max(1, sum(w["nthreads"] for w in info["workers"].values()))
        self.memory = sum(w.get("memory_limit", 0) or 0 for w in info["workers"].values())

    def _info(self) -> dict:
        if _accepts_n_workers(self.client):
            return self.client.scheduler_info(n_workers=-1)
        return self.client.scheduler_info()

    def workers(self) -> dict[str, dict]:
        """The scheduler's record of every connected worker, by address (all of them, not
        the first few that ``scheduler_info`` lists by default)."""
        return self._info()["workers"]

    def worker_memory(self) -> list[WorkerMemory]:
        """Memory limit, threads and current memory use of every worker.

        Runs :func:`~dkm._parallel.kernels.warm_up` on each worker first (``Client.run``,
        outside the task graph), so the memory use includes Zarr and the compiled kernels.
        """
        from dkm._parallel import kernels

        workers = self._info()["workers"]
        if not workers:
            return []
        try:
            used = self.client.run(
                kernels.warm_up,
                kernels.Tiles.from_config(),
                kernels.malloc_settings(),
                on_error="return",
            )
        except Exception as err:  # pragma: no cover - a worker left mid-call
            log.debug("warm-up on the workers failed: %s", err)
            used = {}
        out = []
        for addr, w in sorted(workers.items()):
            u = used.get(addr)
            if not isinstance(u, dict):
                metrics = w.get("metrics", {})
                u = {"rss": metrics.get("memory", 0), "managed": metrics.get("managed_bytes", 0)}
            out.append(
                WorkerMemory(
                    addr,
                    int(w.get("nthreads", 1) or 1),
                    int(w.get("memory_limit", 0) or 0),
                    int(u.get("rss", 0) or 0),
                    int(u.get("managed", 0) or 0),
                )
            )
        return out

    def map(self, fn, *iterables, name):
        keys = [f"{name}-{i}" for i in range(len(iterables[0]))]
        return self.client.map(fn, *iterables, key=keys, pure=False)

    def submit(self, fn, *args, name):
        return self.client.submit(fn, *args, key=name, pure=False)

    def wait(self, futures) -> None:
        """Wait until every future is finished or erred -- but not forever with no workers.

        Waiting is bounded by ``dkm.backend.no-worker-timeout``: when no worker is running
        (none connected, or all paused for memory) for that long, :class:`NoWorkersError`
        says so instead of waiting silently. Workers that come back in time (a nanny
        restarting them) reset the clock: the scheduler recomputes what was lost.
        """
        from distributed import wait

        futures = [futures] if not isinstance(futures, (list, tuple)) else list(futures)
        if not futures:
            return
        limit = config.get_seconds("backend.no-worker-timeout")
        poll = max(0.05, min(2.0, limit / 4))
        idle_since = None
        while True:
            try:
                wait(futures, timeout=poll)
                return
            except TimeoutError as err:
                # distributed's sync() keeps the error in a closure that the traceback holds:
                # a cycle through this frame that kept ``futures`` (a fit's blocks) on the
                # workers until Python's garbage collector ran, beside the next fit's blocks.
                err.__traceback__ = None
            if self.client.status != "running":
                return  # the scheduler is gone: gather reports it
            try:
                workers = self._info()["workers"]
            except Exception:  # pragma: no cover - the scheduler went away just now
                return
            running = [w for w in workers.values() if w.get("status", "running") == "running"]
            if running:
                idle_since = None
                continue
            now = time.monotonic()
            idle_since = idle_since if idle_since is not None else now
            if now - idle_since >= limit:
                raise NoWorkersError(_no_workers_message(workers, limit))

    def gather(self, futures):
        try:
            self.wait(futures)
            return self.client.gather(futures)
        except CancelledError as err:
            restarted = getattr(self.client, "generation", None) != self._generation
            raise FitLostError(_cancelled_message(err, restarted)) from err
        except Exception as err:
            if _is_killed_worker(err):
                err.add_note(describe_worker_loss(err, self.client))
            raise

    def share(self, obj):
        if isinstance(obj, np.ndarray) and obj.nbytes > config.get_bytes("backend.scatter-bytes"):
            return self.client.scatter(obj, broadcast=True, hash=False)
        return obj

    def load_spread(self, handles: list, sizes: Sequence[int], keys) -> list:
        """Load blocks (:class:`~dkm._parallel.kernels.ZarrRows`) into worker memory, spread
        over the workers by their threads (see :meth:`spread`); keys ``data-load-...``.

        Each block is read on the worker that will hold it (a loose restriction, dropped
        once read): left to the scheduler, a worker that read faster took more blocks than
        its share, which were then moved, and while the load ran it held up to 100 MB more
        than planned (2 x 600 MB workers). The load tasks have no dependencies: after every
        worker is lost the scheduler reads the blocks from the store again.
        """
        from dkm._parallel import kernels

        name = keys("data", "load")
        threads = self._threads()
        plan = {}
        if len(threads) > 1:
            plan = _spread_plan([None] * len(handles), [int(s) for s in sizes], threads)
        futures = []
        for i, h in enumerate(handles):
            where = {"workers": [plan[i]], "allow_other_workers": True} if i in plan else {}
            futures.append(
                self.client.submit(kernels.load, h, key=f"{name}-{i}", pure=False, **where)
            )
        self.wait(futures)
        _drop_restrictions(self.client, [f.key for i, f in enumerate(futures) if i in plan])
        return self.spread(futures, sizes, keys("data", "place"))

    def _threads(self) -> dict[str, int]:
        info = self._info()["workers"]
        return {a: int(w["nthreads"]) for a, w in info.items() if w.get("nthreads")}

    def persist_spread(self, arrays: list, sizes: Sequence[int], keys) -> list:
        """Persist one block per dask array, spread over the workers by their threads.

        No task keeps a worker restriction: the blocks are persisted in one graph wherever
        the scheduler puts them, then blocks on workers holding more than their share
        (rows in proportion to threads) are moved by a one-off task that returns its input
        on the target worker, and that task's restriction is dropped once it has run.
        Restricting the persisted graph itself to worker addresses (the earlier design)
        leaves tasks that can never run once every worker has been replaced: the scheduler
        keeps them in ``no-worker`` until a worker with the old address returns
        (dask/distributed#7346), so a fit that lost all its workers waited forever.
        """
        from distributed import futures_of

        persisted = self.client.persist(list(arrays))
        futures = [futures_of(p)[0] for p in persisted]
        self.wait(futures)
        return self.spread(futures, sizes, keys("data", "place"))

    def spread(self, futures: list, sizes: Sequence[int], name: str) -> list:
        """Move blocks so that every worker holds rows in proportion to its threads.

        Returns the handles to use (moved blocks are new futures; the old ones are released).
        """
        from dkm._parallel import kernels

        threads = self._threads()
        if len(threads) < 2 or len(futures) < 2:
            return list(futures)
        who = self.client.who_has(futures)
        owner = []
        for f in futures:
            held = sorted(a for a in who.get(f.key, ()) if a in threads)
            owner.append(held[0] if held else None)
        plan = _spread_plan(owner, [int(s) for s in sizes], threads)
        if not plan:
            return list(futures)
        out = list(futures)
        moved = {}
        for i, target in plan.items():
            moved[i] = self.client.submit(
                kernels.same_block,
                futures[i],
                key=f"{name}-{i}",
                workers=[target],
                allow_other_workers=True,
                pure=False,
            )
        self.wait(list(moved.values()))
        for i, f in moved.items():
            out[i] = f
        _drop_restrictions(self.client, [f.key for f in moved.values()])
        log.debug("moved %d of %d blocks to spread them over the workers", len(moved), len(out))
        return out


def _spread_plan(owner: list, sizes: list[int], threads: dict[str, int]) -> dict[int, str]:
    """Which blocks to move where: ``{block: worker}``.

    Each worker's share is the total rows times its share of the threads. Blocks stay where
    they are while their worker is within its share (by at most half a block); the others
    go, largest first, to the worker furthest below its share.
    """
    total = sum(sizes)
    nthreads = sum(threads.values())
    quota = {a: total * t / nthreads for a, t in threads.items()}
    load = dict.fromkeys(threads, 0)
    pool = []
    for i, (w, size) in enumerate(zip(owner, sizes, strict=True)):
        if w is not None and load[w] + size / 2 <= quota[w]:
            load[w] += size
        else:
            pool.append(i)
    plan = {}
    for i in sorted(pool, key=lambda j: -sizes[j]):
        target = max(sorted(threads), key=lambda a: quota[a] - load[a])
        load[target] += sizes[i]
        if target != owner[i]:
            plan[i] = target
    return plan


def _drop_restrictions(client, keys: list) -> None:
    """Forget the worker restrictions of finished tasks (best effort).

    A restricted task that must be recomputed after its workers are gone would otherwise
    wait for them forever (see :meth:`DistributedBackend.persist_spread`). These tasks have
    a dependency and ``allow_other_workers``, which already lets the scheduler run them
    elsewhere in the common case; dropping the restriction also covers a recomputation
    that starts while no worker is running.
    """
    if not keys:
        return
    try:
        client.sync(client.scheduler.set_restrictions, worker=dict.fromkeys(keys))
    except Exception as err:  # pragma: no cover - an older or newer scheduler
        log.debug("could not drop worker restrictions: %s", err)


def _is_killed_worker(err: BaseException) -> bool:
    try:
        from distributed import KilledWorker
    except ImportError:  # pragma: no cover
        return False
    return isinstance(err, KilledWorker)


def _no_workers_message(workers: dict, limit: float) -> str:
    if not workers:
        state = "no worker is connected to the scheduler"
    else:
        paused = [a for a, w in workers.items() if w.get("status") == "paused"]
        limits = sorted({w.get("memory_limit") or 0 for w in workers.values()})
        state = f"{len(workers)} worker(s) connected, none running"
        if paused:
            state += (
                f" ({len(paused)} paused: their memory use is above "
                f"{memory_pause_fraction():.0%} of the memory limit, "
                f"{', '.join(_mb(x) for x in limits if x) or 'unknown'})"
            )
    return (
        f"no Dask worker ran any task for {limit:.0f} s ({state}); the fit stopped instead of "
        "waiting longer. Start or scale up workers (a cluster restarting its workers gets "
        "them back within seconds), give paused workers more memory "
        f"({MEMORY_SETTINGS}), or raise dkm.backend.no-worker-timeout"
    )


def _cancelled_message(err: BaseException, restarted: bool = False) -> str:
    reasons = set()
    reason = getattr(err, "reason", None)
    if reason:
        reasons.add(str(reason))
    for group in getattr(err, "error_groups", ()) or ():
        if getattr(group, "reason", None):
            reasons.add(str(group.reason))
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if restarted or any("restart" in r for r in reasons):
        return (
            "the Dask cluster was restarted during the fit (Client.restart releases every "
            f"task and block of every client): {first}. Run the fit again; a job run again "
            "continues from its last checkpoint"
        )
    return (
        f"tasks of the fit were cancelled ({first}): data they need was released or lost with "
        "the workers that held it and cannot be recomputed (blocks scattered from a numpy "
        "input live only on the workers). Run the fit again, or pass a dask array or a "
        "Zarr path so that lost blocks are recomputed"
    )


def describe_worker_loss(err: BaseException, client=None) -> str:
    """A ``distributed.KilledWorker`` from a fit, told as what most likely happened: memory.

    Says which task (by the name dkm gave it, e.g. ``lloyd-assign``), that the workers
    running it died repeatedly (``distributed.scheduler.allowed-failures`` + 1 times), the
    workers' memory limit, the nanny's memory restarts the scheduler recorded (event topic
    ``worker-restart-memory``), and which settings to change. ``client`` is optional; with
    it the message includes the recorded restarts and the current workers' limits.
    """
    from dask.utils import key_split

    task = getattr(err, "task", None)
    last = getattr(err, "last_worker", None)
    tries = int(getattr(err, "allowed_failures", 0) or 0) + 1
    name = key_split(task) if task is not None else "a task"
    limit = int(getattr(last, "memory_limit", 0) or 0)
    address = getattr(last, "address", None)
    kills = []
    limits = set()
    if client is not None:
        try:
            kills = [msg for _, msg in client.get_events("worker-restart-memory")]
        except Exception:  # pragma: no cover - scheduler gone
            kills = []
        try:
            info = (
                client.scheduler_info(n_workers=-1)
                if _accepts_n_workers(client)
                else client.scheduler_info()
            )
            limits = {int(w.get("memory_limit") or 0) for w in info["workers"].values()}
        except Exception:  # pragma: no cover
            limits = set()
    if limit:
        limits.add(limit)
    limits.discard(0)
    limit_text = " / ".join(_mb(x) for x in sorted(limits)) if limits else "no limit set"
    text = (
        f"the Dask workers running task {task!r} ({name}) died {tries} times in a row "
        f"(distributed.scheduler.allowed-failures = {tries - 1}), the last one "
        f"{address or 'unknown'}; worker memory limit: {limit_text}. "
    )
    if kills:
        peak = max(int(k.get("rss", 0) or 0) for k in kills)
        text += (
            f"The nannies restarted workers {len(kills)} time(s) for exceeding "
            f"{dask.config.get('distributed.worker.memory.terminate', 0.95):.0%} of their "
            f"memory limit (largest process: {_mb(peak)}), so the work did not fit in the "
            "workers' memory. "
        )
    else:
        text += (
            "A worker dying while it runs a task is most often the nanny restarting it for "
            "going over its memory limit (check the worker logs). "
        )
    return text + (
        f"Give the workers more memory ({MEMORY_SETTINGS}), or make the blocks smaller: "
        "dkm.blocks.target-bytes (an upper bound) or dkm.blocks.memory-fraction (the share of "
        "a worker's memory limit a block and its kernels may take)"
    )


def _accepts_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


class LocalBackend(Backend):
    """Kernels on a thread pool in this process (numpy and BLAS release the GIL)."""

    is_distributed = False
    _pools: dict[int, ThreadPoolExecutor] = {}  # noqa: RUF012 - shared, lazily created

    def __init__(self, nthreads: int | None = None):
        self.nthreads = int(nthreads or os.cpu_count() or 1)
        if self.nthreads not in self._pools:
            self._pools[self.nthreads] = ThreadPoolExecutor(self.nthreads, thread_name_prefix="dkm")
        self.pool = self._pools[self.nthreads]
        self.memory = 0

    def blas_limit(self):
        # Two pool threads each running a 2-thread OpenBLAS GEMM oversubscribe the cores
        # (measured 1.5-3x slower per iteration on 2 cores); workers get the same setting
        # from the nanny (OMP/OPENBLAS_NUM_THREADS=1).
        if self.nthreads == 1:
            return contextlib.nullcontext()
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=1, user_api="blas")

    @staticmethod
    def _call(fn, args):
        # Inputs are submitted before the tasks that consume them and the pool is FIFO, so
        # waiting here cannot deadlock.
        return fn(*[a.result() if isinstance(a, LocalFuture) else a for a in args])

    def map(self, fn, *iterables, name):
        return [self.pool.submit(self._call, fn, args) for args in zip(*iterables, strict=True)]

    def submit(self, fn, *args, name):
        return self.pool.submit(self._call, fn, args)

    def gather(self, futures):
        if isinstance(futures, LocalFuture):
            return futures.result()
        return [f.result() for f in futures]
