"""Lloyd iterations in rounds: several iterations per scheduler round trip on a cluster.

When an iteration is short (``dkm.lloyd.round-below``), most of it is the scheduler round
trip of its tasks. A round instead runs one task per worker thread (a *rank*,
:mod:`dkm._parallel.spmd`) holding that thread's blocks; the ranks all-gather their
per-block statistics after every pass and each computes the next centres with the client's
own arithmetic (:mod:`dkm.kmeans._iteration`), combining the blocks in the order the
client's reduction does, and choosing plain or pruned passes as the client's loop would.
The centres, labels and history are those of the task-by-task loop to the last bit. A round
lasts about ``dkm.lloyd.round-seconds``; the client then records its iterations
(checkpoints and progress see every one) and starts the next.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from dkm import config
from dkm._parallel import kernels, spmd
from dkm._parallel.blocks import Blocks
from dkm._parallel.kernels import Tiles
from dkm._parallel.keys import Keys
from dkm.kmeans import _hamerly
from dkm.kmeans._iteration import (
    PRUNED_STEPS,
    _advance,
    _Chooser,
    _EmptyHandler,
    _stopping,
    objective,
)

__all__ = ["Rounds"]

log = logging.getLogger("dkm")

ROUND_MODES = ("auto", "always", "off")


@dataclass(frozen=True)
class _Job:
    """What every rank of a round needs besides its blocks and their previous steps."""

    first: int
    stop: int
    centers: np.ndarray  # float64, in the blocks' coordinates
    dtype: np.dtype
    sqn: float
    tol: float
    max_iter: int
    tiles: Tiles
    policy: str
    seed: int
    n: int
    d: int
    shift: np.ndarray | None
    value_range: tuple[float, float] | None
    starts: np.ndarray  # global row offset of every block
    blocks: tuple[tuple[int, ...], ...]  # the blocks of each rank
    every: int | None  # the client's reduction: None combines all at once, else a tree
    n_tasks: int  # tasks the round submits (recorded on its first iteration)
    previous: np.ndarray | None  # the centres of the blocks' previous steps (their bounds)
    prev_pruned: bool  # whether those steps hold bounds
    chooser: _Chooser  # plain or pruned passes, as the client's loop decides them


class _RankEmpty(_EmptyHandler):
    """:class:`_EmptyHandler` of a rank: the rows it needs come from every rank's blocks
    through the round's exchange (every rank asks for the same rows at the same point)."""

    def __init__(self, job: _Job, exchange: spmd.Exchange, rank: int, blocks: tuple):
        super().__init__(job.policy, job.seed, job.n, job.d, job.shift, job.value_range)
        self.job, self.exchange, self.blocks = job, exchange, blocks
        self.ids = job.blocks[rank]
        bounds = np.append(job.starts, job.n)
        self.held = [
            (blk, bounds[b], bounds[b + 1]) for blk, b in zip(blocks, self.ids, strict=True)
        ]
        self.steps: list = []  # this rank's blocks' last steps
        self.pruned, self.packed = False, None  # whether they hold bounds; their centres

    def farthest_parts(self, it: int, done, m: int) -> tuple[list, int]:
        starts = self.job.starts
        if self.pruned:  # the bounds kept no distances: another pass, as on the client
            mine = [
                kernels.farthest_rows(block, self.packed, m, int(starts[b]), self.job.tiles)
                for block, b in zip(self.blocks, self.ids, strict=True)
            ]
        else:
            mine = [
                kernels.farthest_from_step(block, step, m, int(starts[b]))
                for block, step, b in zip(self.blocks, self.steps, self.ids, strict=True)
            ]
        parts = [part for rank_parts in self.exchange.allgather(mine) for part in rank_parts]
        return parts, int(self.pruned)

    def take(self, it: int, rows: np.ndarray) -> np.ndarray:
        return spmd.allgather_rows(self.exchange, self.held, rows, self.d)


def _lloyd_rank(name: str, rank: int, link: spmd.Link, timeout: float, job: _Job, prev, *blocks):
    """Iterations ``job.first`` .. ``job.stop - 1`` (or until a stopping rule) on this rank's
    blocks. Returns ``(steps, records)``: the blocks' last steps (kept on the worker for the
    next round) and, on rank 0, one ``[centres, record, stopped, inertia, raw]`` per
    iteration (``raw``, the last pass's assigned sums and counts, on the last one only)."""
    exchange = spmd.Exchange(name, rank, link, timeout)
    try:
        steps = list(prev["round"][0]) if isinstance(prev, dict) else list(prev)
        handler = _RankEmpty(job, exchange, rank, blocks)
        C, C_prev = job.centers, job.previous
        chooser, prev_pruned = job.chooser, job.prev_pruned
        records = []
        raw = None
        for it in range(job.first, job.stop):
            t0 = time.perf_counter()
            packed = kernels.pack_centers(C, job.dtype)
            assignment = chooser.at(it)
            step = PRUNED_STEPS.get(assignment)
            pruned = step is not None
            if pruned:
                motion = _hamerly.motion_since(C_prev, steps, C, assignment)
                steps = [
                    step(block, packed, p, motion, job.tiles)
                    for block, p in zip(blocks, steps, strict=True)
                ]
            else:
                steps = [
                    kernels.lloyd_step(block, packed, p, job.tiles)
                    for block, p in zip(blocks, steps, strict=True)
                ]
            ordered: list = [None] * len(job.starts)
            gathered = exchange.allgather([s[2] for s in steps])
            for ids, parts in zip(job.blocks, gathered, strict=True):
                for b, part in zip(ids, parts, strict=True):
                    ordered[b] = part
            totals = spmd.combine_in_order(ordered, kernels.combine_stats, job.every)
            chooser.saw(it, pruned, totals[3], job.n, first_pruned=not prev_pruned)
            prev_pruned = pruned
            handler.steps, handler.pruned, handler.packed = steps, pruned, packed
            C_new, raw, record = _advance(it, C, totals, job.sqn, job.dtype, handler, None)
            stopped = _stopping(it, record, job.tol, job.max_iter)
            inertia = objective(job.sqn, C_new, *raw) if stopped == "strict" else None
            record["n_tasks"] = job.n_tasks if it == job.first else 0
            record["in_round"] = 1
            record["seconds"] = time.perf_counter() - t0
            records.append([C_new, record, stopped, inertia, None])
            C_prev, C = C, C_new
            if stopped is not None:
                break
        records[-1][4] = raw
        return steps, ((records, chooser, prev_pruned) if rank == 0 else None)
    finally:
        exchange.close()


def _rank_records(result):
    return result[1]


@dataclass(frozen=True)
class RoundSteps:
    """The blocks' last steps after a round, held by the ranks' results on the workers: only
    the next round reads them (see :func:`dkm.kmeans.lloyd.lloyd`'s final labels)."""

    futures: list

    def for_rank(self, r: int):
        return {"round": self.futures[r]}


class Rounds:
    """Whether and how a Lloyd fit runs its iterations in rounds (see the module's text)."""

    def __init__(self, blocks: Blocks, ranks: spmd.Ranks, part_bytes: int, mode: str):
        self.blocks, self.ranks, self.part_bytes, self.mode = blocks, ranks, part_bytes, mode
        self.below = config.get_seconds("lloyd.round-below")
        self.seconds = config.get_seconds("lloyd.round-seconds")
        self.timeout = config.get_seconds("lloyd.round-timeout")
        self.count = 0  # iterations run in rounds
        self.last: list[float] = []  # a rank's seconds per iteration in the last round

    @classmethod
    def maybe(cls, blocks: Blocks, part_bytes: int) -> Rounds | None:
        """Rounds for this fit, or None: off by config, not on a cluster, streamed blocks,
        or per-rank statistics above ``dkm.lloyd.round-exchange-bytes``."""
        mode = str(config.get("lloyd.rounds"))
        if mode not in ROUND_MODES:
            raise ValueError(f"dkm.lloyd.rounds must be one of {ROUND_MODES}, got {mode!r}")
        be = blocks.backend
        if mode == "off" or not be.is_distributed or blocks.streamed:
            return None
        ranks = spmd.plan_ranks(be, blocks.handles)
        if ranks is None or ranks.n < 1:
            return None
        most = max(len(b) for b in ranks.blocks)
        if most * part_bytes > config.get_bytes("lloyd.round-exchange-bytes"):
            return None
        return cls(blocks, ranks, part_bytes, mode)

    def worth(self, done_here: int, seconds: list) -> bool:
        """Run the next iterations in a round? Under "auto", once two iterations of this
        fit were each shorter than ``dkm.lloyd.round-below``; once begun, to the end (the
        blocks' last steps are then the ranks', which only a round reads)."""
        if self.mode == "always" or self.count:
            return True
        return done_here >= 2 and max(seconds[-2:]) < self.below

    def run(
        self,
        it: int,
        C: np.ndarray,
        C_prev: np.ndarray | None,
        prev,
        prev_pruned: bool,
        chooser: _Chooser,
        max_iter: int,
        tol: float,
        handler,
        sqn: float,
        keys: Keys,
    ):
        """One round from iteration ``it`` (centres ``C``; ``C_prev``, ``prev`` and
        ``prev_pruned`` describe the blocks' last steps; ``chooser`` picks plain or pruned
        passes). Returns ``(RoundSteps, records, chooser, prev_pruned)`` as they are after
        the round, or None if it failed."""
        be, b = self.blocks.backend, self.blocks
        last = max(1e-4, self._iteration_seconds())
        stop = min(max_iter, it + max(2, min(256, int(self.seconds / last))))
        every = None
        if not be.reduces_on_client(b.nblocks, self.part_bytes):
            every = int(config.get("backend.split-every"))
        job = _Job(
            it,
            stop,
            np.asarray(C, dtype=np.float64),
            b.dtype,
            sqn,
            tol,
            max_iter,
            handler.tiles,
            handler.policy,
            handler.seed,
            b.n,
            b.d,
            b.shift,
            handler.value_range,
            np.asarray(b.starts, dtype=np.int64),
            self.ranks.blocks,
            every,
            self.ranks.n + 1,
            None if C_prev is None else np.asarray(C_prev, dtype=np.float64),
            prev_pruned,
            chooser,
        )

        def per_rank(r: int) -> tuple:
            ids = self.ranks.blocks[r]
            mine = prev.for_rank(r) if isinstance(prev, RoundSteps) else [prev[i] for i in ids]
            return (job, mine, *[b.handles[i] for i in ids])

        name = keys("lloyd", "round", it=it)
        try:
            # A peer may be a whole iteration behind: wait at least ten of them.
            timeout = max(self.timeout, 10 * last)
            futures = spmd.run_round(be, self.ranks, _lloyd_rank, per_rank, name, timeout)
            got = be.gather(be.submit(_rank_records, futures[0], name=f"{name}-records"))
        except spmd.RoundFailed as err:
            log.warning("Lloyd rounds stopped (%s); the fit goes on task by task", err)
            return None
        records, chooser, prev_pruned = got
        self.count += len(records)
        self.last = [r[1]["seconds"] for r in records]
        return RoundSteps(futures), records, chooser, prev_pruned

    def _iteration_seconds(self) -> float:
        """A rank's iteration time, from the last round (before the first, ``round-below``:
        the first round is short)."""
        return float(np.median(self.last)) if self.last else float(self.below)
