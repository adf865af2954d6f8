"""Several iterations per scheduler round trip: long tasks ("ranks") that exchange statistics.

An iteration submitted as tasks pays a scheduler round trip (client -> scheduler -> workers
-> scheduler -> client: 13-16 ms on a 2-process cluster on this kind of machine), which is
most of an iteration of a small problem (Fashion-MNIST pixels, k = 10: 28 ms of compute).
A *round* instead runs one task per worker thread, each holding its share of the blocks for
several iterations; after every pass the ranks all-gather their per-block statistics (k x d
float64 per block) and each computes the same next centres from the same numbers in the same
order, so every rank, and the client afterwards, agree to the last bit.

The all-gather goes through Dask queues held by the scheduler (one ``put`` per peer and one
``get`` per message: about 3 ms per exchange between 2 worker processes). A rank that waits
longer than ``dkm.lloyd.round-timeout`` for a peer (a worker died, a rank never started)
raises :class:`RoundFailed`; the driver then continues the fit task by task.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass

__all__ = ["Exchange", "Ranks", "RoundFailed", "combine_in_order", "plan_ranks", "run_round"]


class RoundFailed(RuntimeError):
    """A round of rank tasks could not complete (a peer is gone or never started)."""


# The sender "rank" of the message that calls a round off: ranks waiting for their peers
# stop at once instead of holding their worker's thread until the timeout.
_ABORT = -1


class Exchange:
    """All-gather among the ``n`` ranks of one round, through Dask queues.

    Parameters
    ----------
    name : str
        Unique per round: the queues are ``<name>-<rank>``.
    rank, n : int
        This rank and the number of ranks.
    timeout : float
        Seconds to wait for a peer's message before :class:`RoundFailed`.
    """

    def __init__(self, name: str, rank: int, n: int, timeout: float):
        from distributed import Queue, get_client

        self.rank, self.n, self.timeout = rank, n, timeout
        self.seq = 0
        self.pending: dict[tuple[int, int], object] = {}
        client = get_client()
        self.inbox = Queue(f"{name}-{rank}", client=client)
        self.peers = [Queue(f"{name}-{r}", client=client) for r in range(n) if r != rank]

    def allgather(self, obj) -> list:
        """Every rank's ``obj``, indexed by rank (this rank's own is ``obj`` itself)."""
        seq = self.seq
        self.seq += 1
        if self.n == 1:
            return [obj]
        # Bytes through the scheduler: it stores them and never unpickles them.
        payload = pickle.dumps((self.rank, seq, obj), protocol=pickle.HIGHEST_PROTOCOL)
        for q in self.peers:
            q.put(payload, timeout=self.timeout)
        out: list = [None] * self.n
        out[self.rank] = obj
        missing = {r for r in range(self.n) if r != self.rank}
        for r in list(missing):
            if (seq, r) in self.pending:
                out[r] = self.pending.pop((seq, r))
                missing.discard(r)
        deadline = time.monotonic() + self.timeout
        while missing:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                raw = self.inbox.get(timeout=left)
            except TimeoutError as err:
                raise RoundFailed(
                    f"rank {self.rank} waited {self.timeout:.0f} s for rank(s) "
                    f"{sorted(missing)} (dkm.lloyd.round-timeout)"
                ) from err
            r, s, value = pickle.loads(raw)
            if r == _ABORT:
                raise RoundFailed(f"rank {self.rank}: the round was called off ({value})")
            if s == seq:
                out[r] = value
                missing.discard(r)
            else:  # a faster peer's next exchange
                self.pending[(s, r)] = value
        return out

    def close(self) -> None:
        for q in (self.inbox, *self.peers):
            try:
                q.close()
            except Exception:  # pragma: no cover - the client is closing
                pass


@dataclass(frozen=True)
class Ranks:
    """Which blocks each rank holds and on which worker it runs.

    ``blocks[r]`` lists block indices in increasing order; every block is in one rank.
    """

    workers: tuple[str, ...]
    blocks: tuple[tuple[int, ...], ...]

    @property
    def n(self) -> int:
        return len(self.workers)


def plan_ranks(backend, handles: Sequence) -> Ranks | None:
    """One rank per worker thread that holds blocks, given the blocks where they are.

    ``backend`` is a :class:`~dkm._parallel.backend.DistributedBackend`. Returns None when
    a block is not in any worker's memory (ranks run where their blocks are; a block in
    flight or lost is left to the task-by-task path).
    """
    backend.wait(list(handles))  # blocks being centered are not anywhere yet
    info = backend.workers()
    who = backend.client.who_has(list(handles))
    by_worker: dict[str, list[int]] = {}
    for i, f in enumerate(handles):
        held = sorted(a for a in who.get(f.key, ()) if a in info)
        if not held:
            return None
        by_worker.setdefault(held[0], []).append(i)
    workers, blocks = [], []
    for addr in sorted(by_worker):
        mine = by_worker[addr]
        t = max(1, min(int(info[addr].get("nthreads", 1) or 1), len(mine)))
        for j in range(t):
            workers.append(addr)
            blocks.append(tuple(mine[j::t]))
    return Ranks(tuple(workers), tuple(blocks))


def combine_in_order(parts: list, combine: Callable, every: int | None):
    """``parts`` combined as :meth:`~dkm._parallel.backend.Backend.reduce` combines them:
    all at once (``every`` None, the client's reduction) or in a tree of fan-in ``every``,
    so that a rank's float sums are the client's to the last bit."""
    if every is None:
        return combine(*parts)
    while len(parts) > 1:
        parts = [combine(*parts[i : i + every]) for i in range(0, len(parts), every)]
    return parts[0]


def run_round(
    backend,
    ranks: Ranks,
    fn: Callable,
    per_rank: Callable[[int], tuple],
    name: str,
    timeout: float,
) -> list:
    """Run ``fn(name, rank, n, timeout, *per_rank(rank))`` as one task per rank.

    Each task is pinned to its rank's worker. Returns the rank futures (their results stay
    on the workers) once all finished. Raises :class:`RoundFailed` when a rank erred, a
    rank's worker left, or the others did not finish within ``timeout`` of the first; the
    futures are then cancelled.
    """
    from distributed import wait

    client = backend.client
    futures = [
        client.submit(
            fn,
            name,
            r,
            ranks.n,
            timeout,
            *per_rank(r),
            key=f"{name}-{r}",
            workers=[ranks.workers[r]],
            allow_other_workers=False,
            pure=False,
        )
        for r in range(ranks.n)
    ]
    first_done = None
    try:
        while True:
            try:
                wait(futures, timeout=0.5)
            except TimeoutError as err:
                err.__traceback__ = None
            except CancelledError as err:  # its blocks were lost: the task path says how
                raise RoundFailed(f"a rank of {name} was cancelled: {err}") from None
            states = [f.status for f in futures]
            if any(s in ("error", "cancelled", "lost") for s in states):
                bad = next(f for f in futures if f.status in ("error", "cancelled", "lost"))
                reason = bad.exception() if bad.status == "error" else bad.status
                raise RoundFailed(f"a rank of {name} ended with: {reason}")
            if all(s == "finished" for s in states):
                return futures
            now = time.monotonic()
            if any(s == "finished" for s in states):
                first_done = first_done or now
                if now - first_done > timeout:
                    raise RoundFailed(f"ranks of {name} did not finish with the others")
            alive = set(backend.workers())
            if not set(ranks.workers) <= alive:
                raise RoundFailed(f"a worker of {name} left during the round")
    except BaseException as err:
        client.cancel(futures)
        _call_off(client, name, ranks.n, str(err))
        raise


def _call_off(client, name: str, n: int, why: str) -> None:
    """Tell every rank of a failed round to stop waiting (best effort)."""
    from distributed import Queue

    if client.status != "running":  # the scheduler is gone, and the ranks with it
        return
    payload = pickle.dumps((_ABORT, -1, why), protocol=pickle.HIGHEST_PROTOCOL)
    for r in range(n):
        try:
            q = Queue(f"{name}-{r}", client=client)
            q.put(payload, timeout=5)
            q.close()
        except Exception:  # pragma: no cover - the scheduler is going away
            pass
