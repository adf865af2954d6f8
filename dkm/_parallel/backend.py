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
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future as LocalFuture
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
import numpy as np

from dkm import config


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
        info = (
            client.scheduler_info(n_workers=-1)
            if _accepts_n_workers(client)
            else (client.scheduler_info())
        )
        self.nthreads = max(1, sum(w["nthreads"] for w in info["workers"].values()))
        self.memory = sum(w.get("memory_limit", 0) or 0 for w in info["workers"].values())

    def worker_slots(self) -> list[str]:
        """Worker addresses, each repeated once per thread, interleaved."""
        info = (
            self.client.scheduler_info(n_workers=-1)
            if _accepts_n_workers(self.client)
            else (self.client.scheduler_info())
        )
        ws = sorted(info["workers"].items())
        most = max((w["nthreads"] for _, w in ws), default=1)
        return [a for t in range(most) for a, w in ws if w["nthreads"] > t]

    def map(self, fn, *iterables, name):
        keys = [f"{name}-{i}" for i in range(len(iterables[0]))]
        return self.client.map(fn, *iterables, key=keys, pure=False)

    def submit(self, fn, *args, name):
        return self.client.submit(fn, *args, key=name, pure=False)

    def gather(self, futures):
        return self.client.gather(futures)

    def share(self, obj):
        if isinstance(obj, np.ndarray) and obj.nbytes > config.get_bytes("backend.scatter-bytes"):
            return self.client.scatter(obj, broadcast=True, hash=False)
        return obj


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
