"""Mini-batch k-means in rounds: the batches split across the workers that hold their rows.

The one-process loop (:func:`dkm.kmeans.minibatch.minibatch`) gathers every batch row to the
client and steps through the batches there: on a cluster each row crosses a process
boundary and one core computes. In a round, one task per worker thread (a *rank*,
:mod:`dkm._parallel.spmd`) draws the same batches from the same stream and steps through
the rows of each batch that its blocks hold, on its own copy of the centres.

Every ``dkm.minibatch.sync-rows`` rows (``sync_every`` steps) the ranks all-gather what they
assigned (per-centre float64 sums and counts, and each step's inertia) and each merges the
same numbers in rank order. The steps between two merges are assigned to the same (last
merged) centres, and their merge is the update one step on all their rows makes: a centre
is the running mean of every row it received, ``(c0 * N0 + sum of the new rows) / (N0 +
their count)``. So the centres move as with a batch of ``sync_every * batch_size`` rows,
while the sampling, the smoothed inertia and its stopping rule still see ``batch_size``
steps; and the result does not depend on which worker holds which block (nor on the
chunking), only on the seed, up to the order of the float sums. With ``sync_every = 1`` it
is the one-process loop. Starved centres are reassigned at the merges, to rows of the
merge's last batch, identically on every rank.

A round lasts about ``dkm.lloyd.round-seconds``; the client then records its steps and
starts the next. A round that fails (:class:`~dkm._parallel.spmd.RoundFailed`) leaves the
fit to the one-process loop from the last merged state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from dkm import config
from dkm._parallel import kernels, spmd
from dkm._parallel.blocks import Blocks
from dkm._parallel.keys import Keys
from dkm.kmeans.minibatch import (
    MiniBatchState,
    StepRules,
    jump,
    move_centers,
    new_history,
    starved,
)

__all__ = ["MiniBatchRounds"]

log = logging.getLogger("dkm")

ROUND_MODES = ("auto", "off")
AUTO_SYNC_ROWS = 32768  # sync-rows "auto" on large data: 8 steps of the default batch


@dataclass(frozen=True)
class _Job:
    """What every rank of a round needs besides the state and its blocks."""

    merges: int  # merges in this round at most
    sync_every: int
    starts: tuple[np.ndarray, ...]  # global first row of each rank's blocks
    ends: tuple[np.ndarray, ...]  # and one past their last
    dtype: np.dtype
    rules: StepRules


class _RankRows:
    """The rows of a batch that one rank's blocks hold."""

    def __init__(self, blocks: tuple, starts: np.ndarray, ends: np.ndarray, d: int, dtype):
        self.held = [
            (kernels.load(b), lo, hi) for b, lo, hi in zip(blocks, starts, ends, strict=True)
        ]
        self.d, self.dtype = d, dtype
        self.ahead: tuple[np.ndarray, np.ndarray] | None = None  # a batch and its rows

    def gather_ahead(self, draws) -> None:
        """The rows of the next drawn batch, gathered now (while this rank waits for the
        others' statistics) if it is drawn already; :meth:`rows` hands them over."""
        self.ahead = None
        if draws.queue:
            nxt = draws.queue[0]
            self.ahead = (nxt, self.rows(nxt))

    def rows(self, idx: np.ndarray) -> np.ndarray:
        if self.ahead is not None and self.ahead[0] is idx:
            return self.ahead[1]
        parts = []
        for block, lo, hi in self.held:
            mine = idx[(idx >= lo) & (idx < hi)]
            if len(mine):
                parts.append(np.take(block, mine - lo, axis=0))  # 3x block[...] here
        if not parts:
            return np.empty((0, self.d), dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _merge_steps(state: MiniBatchState, job: _Job, here: _RankRows, exchange, hist: dict) -> None:
    """Up to ``job.sync_every`` steps' rows held by this rank, assigned to the last merged
    centres, then one merge with the other ranks. Updates ``state`` (the same on every rank)
    and records the steps in ``hist``."""
    k, d = state.centers.shape
    steps = min(job.sync_every, state.n_steps - state.step)
    B = state.batch_size
    reassign = state.reassign_now(k, steps * B)
    batches = [state.draws.next_batch() for _ in range(steps)]
    parts = [here.rows(idx) for idx in batches]
    ends = np.cumsum([len(p) for p in parts])
    sums = np.zeros((k, d), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    inertia = np.zeros(steps, dtype=np.float64)
    if ends[-1]:
        x = np.concatenate(parts) if steps > 1 else parts[0]
        packed = kernels.pack_centers(state.centers, job.dtype)
        _, d2, sums, counts = kernels.assign_sums(x, packed, job.rules.tiles)
        d2 = d2.astype(np.float64)
        for j, (lo, hi) in enumerate(zip(np.r_[0, ends[:-1]], ends, strict=True)):
            inertia[j] = float(d2[lo:hi].sum())
    mine = (sums, counts, inertia)
    sent = exchange.post(mine)
    here.gather_ahead(state.draws)
    gathered = exchange.collect(sent, mine)
    sums, counts, inertia = (a.copy() for a in gathered[0])
    for s, c, i in gathered[1:]:  # in rank order: the same float sums on every rank
        sums += s
        counts += c
        inertia += i
    C, N = state.centers.copy(), state.counts.copy()
    move_centers(C, N, sums, counts)
    n_reassigned = 0
    if reassign and job.rules.reassignment_ratio > 0:
        mask = starved(N, job.rules.reassignment_ratio, B)
        n_reassigned = int(mask.sum())
        if n_reassigned:
            pick = batches[-1][state.rng.choice(B, size=n_reassigned, replace=False)]
            jump(C, N, mask, spmd.allgather_rows(exchange, here.held, pick, d))
    change = float(((C - state.centers) ** 2).sum())
    state.centers, state.counts = C, N
    no_gain = False
    for j in range(steps):
        n_re = n_reassigned if j == steps - 1 else 0
        mean = float(inertia[j]) / B
        no_gain = state.record(hist, mean, n_re, job.rules.max_no_improvement) or no_gain
    state.settle(change, steps, no_gain, job.rules.tol)


def _minibatch_rank(
    name: str, rank: int, link: spmd.Link, timeout: float, job: _Job, state: MiniBatchState, *blocks
):
    """Up to ``job.merges`` merges of steps on this rank's blocks. Returns ``(state,
    history)`` on rank 0 (every rank ends with the same state), None elsewhere."""
    exchange = spmd.Exchange(name, rank, link, timeout)
    try:
        d = state.centers.shape[1]
        here = _RankRows(blocks, job.starts[rank], job.ends[rank], d, job.dtype)
        hist = new_history()
        for _ in range(job.merges):
            if state.stopped is not None or state.step >= state.n_steps:
                break
            _merge_steps(state, job, here, exchange, hist)
        return (state, hist) if rank == 0 else None
    finally:
        exchange.close()


class MiniBatchRounds:
    """Whether and how a mini-batch fit runs in rounds on the workers (see the module)."""

    def __init__(self, blocks: Blocks, ranks: spmd.Ranks, sync_every: int):
        self.blocks, self.ranks, self.sync_every = blocks, ranks, sync_every
        self.seconds = config.get_seconds("lloyd.round-seconds")
        self.timeout = config.get_seconds("lloyd.round-timeout")
        self.count = 0  # rounds run

    @classmethod
    def maybe(cls, blocks: Blocks, batch_size: int) -> MiniBatchRounds | None:
        """Rounds for this fit, or None: off by config, not on a cluster, or streamed
        blocks (the ranks hold their blocks for the whole fit)."""
        mode = str(config.get("minibatch.rounds"))
        if mode not in ROUND_MODES:
            raise ValueError(f"dkm.minibatch.rounds must be one of {ROUND_MODES}, got {mode!r}")
        sync_rows = config.get("minibatch.sync-rows")
        if sync_rows == "auto":
            # At least 32 merges per pass over the data: the centres then move about as
            # often as the one-process loop moves them (on 180k mnist-5k patches, 5 merges
            # per pass ended 0.5% higher after 5 epochs).
            sync_rows = min(AUTO_SYNC_ROWS, blocks.n // 32)
        if isinstance(sync_rows, bool) or not isinstance(sync_rows, int) or sync_rows < 0:
            raise ValueError(
                "dkm.minibatch.sync-rows must be 'auto' or a whole number of rows >= 0, "
                f"got {sync_rows!r}"
            )
        be = blocks.backend
        if mode == "off" or not be.is_distributed or blocks.streamed:
            return None
        ranks = spmd.plan_ranks(be, blocks.handles)
        if ranks is None:
            return None
        return cls(blocks, ranks, max(1, sync_rows // batch_size))

    def run(
        self, state: MiniBatchState, hist: dict, rules: StepRules, keys: Keys
    ) -> MiniBatchState:
        """Rounds from ``state`` until the fit stops; returns the last merged state (that
        of a round that failed is the one before it). ``hist`` gets every step."""
        b = self.blocks
        starts = np.asarray(b.starts, dtype=np.int64)
        ends = starts + np.asarray(b.sizes, dtype=np.int64)
        ids = [list(r) for r in self.ranks.blocks]
        merges = 2  # the first round measures a merge's time
        while state.stopped is None and state.step < state.n_steps:
            job = _Job(
                merges,
                self.sync_every,
                tuple(starts[i] for i in ids),
                tuple(ends[i] for i in ids),
                b.dtype,
                rules,
            )
            name = keys("minibatch", "round", r=self.count)
            t0 = time.perf_counter()
            try:
                futures = spmd.run_round(
                    b.backend,
                    self.ranks,
                    _minibatch_rank,
                    lambda r, job=job, state=state: (job, state, *[b.handles[i] for i in ids[r]]),
                    name,
                    self.timeout,
                )
                state, got = b.backend.gather(futures[0])
            except spmd.RoundFailed as err:
                log.warning("mini-batch rounds stopped (%s); the fit goes on in this process", err)
                return state
            self.count += 1
            for key, values in got.items():
                hist[key].extend(values)
            done = max(1, len(got["batch_inertia"]) // self.sync_every)
            per_merge = (time.perf_counter() - t0) / done
            merges = int(min(100_000, max(1, self.seconds / max(per_merge, 1e-6))))
        return state
