"""Mini-batch k-means (Sculley 2010) with scikit-learn's update, reassignment and stopping.

Batches are drawn uniformly with replacement over the *global* row index (so they do not
depend on the chunking), ``prefetch`` batches at a time from a stream of their own
(:class:`Draws`). Two loops run them:

- here, in this process: each group of batches is gathered from the blocks where the data
  lives while the previous group's steps run (so neither the scheduler's latency nor the
  transfer holds the steps up), and every step is a ``batch_size x k`` GEMM on the client;
- on a cluster, in rounds of long tasks on the workers (:mod:`dkm.kmeans._minibatch_rounds`):
  every worker thread steps through the rows of each batch that it holds, and the ranks
  merge what they assigned every ``dkm.minibatch.sync-rows`` rows.

Both keep the same :class:`MiniBatchState`, so a fit that loses its rounds goes on here from
the last merged state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from dkm._parallel import kernels
from dkm._parallel.blocks import Blocks
from dkm._parallel.kernels import Tiles
from dkm._parallel.keys import Keys

log = logging.getLogger("dkm")


@dataclass
class MiniBatchResult:
    centers: np.ndarray
    counts: np.ndarray
    n_steps: int
    n_iter: int
    stopped: str
    history: dict = field(default_factory=dict)
    n_rounds: int = 0  # rounds on the workers (0: every step ran in this process)
    sync_every: int = 1  # steps between the ranks' merges in those rounds


class Draws:
    """The batches' global row indices: uniform with replacement, ``prefetch`` batches per
    draw, from the stream ``default_rng([seed, 1])`` (apart from the reassignments' stream,
    so that the next group can be drawn before this group's steps run)."""

    def __init__(self, seed: int, n: int, batch_size: int, n_steps: int, prefetch: int):
        self.rng = np.random.default_rng([seed, 1])
        self.n, self.batch_size, self.n_steps, self.prefetch = n, batch_size, n_steps, prefetch
        self.drawn = 0  # steps drawn so far
        self.queue: list[np.ndarray] = []  # drawn, not yet stepped (see next_batch)

    def next_group(self) -> np.ndarray | None:
        """The next ``prefetch`` batches' rows, concatenated (None after the last step)."""
        m = min(self.prefetch, self.n_steps - self.drawn)
        if m <= 0:
            return None
        self.drawn += m
        return self.rng.integers(0, self.n, size=m * self.batch_size)

    def next_batch(self) -> np.ndarray:
        """One step's rows, from the group drawn last (drawing the next when it is used up)."""
        if not self.queue:
            self.queue = split_batches(self.next_group(), self.batch_size)
        return self.queue.pop(0)


def split_batches(group: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """A group of batches (their indices or rows, concatenated), batch by batch."""
    return np.split(group, len(group) // batch_size)


@dataclass
class MiniBatchState:
    """Everything a mini-batch fit carries from one step (or merge) to the next."""

    centers: np.ndarray  # float64
    counts: np.ndarray  # float64: rows each centre has received
    draws: Draws
    rng: np.random.Generator  # the reassignments' stream
    n_steps: int  # steps in the fit at most
    batch_size: int
    alpha: float  # weight of a step in the smoothed batch inertia
    step: int = 0
    since_reassign: int = 0
    ewa: float | None = None
    ewa_min: float | None = None
    no_improve: int = 0
    stopped: str | None = None

    def reassign_now(self, k: int, rows: int) -> bool:
        """Whether the step (or merge) after ``rows`` more rows looks for starved centres:
        when a centre was never hit, or every ``10 * k`` rows (scikit-learn's rule)."""
        self.since_reassign += rows
        due = bool((self.counts == 0).any() or self.since_reassign >= 10 * k)
        if due:
            self.since_reassign = 0
        return due

    def watch(self, inertia: float, max_no_improvement: int | None) -> bool:
        """Record one step's mean batch inertia in the smoothed one; True when it has not
        improved for ``max_no_improvement`` steps. scikit-learn ignores the first step (the
        inertia of the initial centres): its smoothed value is NaN."""
        self.step += 1
        if self.step == 1:
            return False
        a = self.alpha
        self.ewa = inertia if self.ewa is None else self.ewa * (1 - a) + inertia * a
        if self.ewa_min is None or self.ewa < self.ewa_min:
            self.no_improve, self.ewa_min = 0, self.ewa
        else:
            self.no_improve += 1
        return max_no_improvement is not None and self.no_improve >= max_no_improvement

    def record(
        self, hist: dict, inertia: float, n_reassigned: int, max_no_improvement: int | None
    ) -> bool:
        """One step in ``hist`` (see :func:`new_history`) and in the smoothed inertia
        (:meth:`watch`, whose answer it returns)."""
        hist["batch_inertia"].append(inertia)
        hist["n_reassigned"].append(n_reassigned)
        no_gain = self.watch(inertia, max_no_improvement)
        hist["ewa_inertia"].append(np.nan if self.ewa is None else self.ewa)
        return no_gain

    def settle(self, change: float | None, steps: int, no_gain: bool, tol: float) -> None:
        """After ``steps`` steps moved the centres by ``change`` (squared; None when not
        measured), stop on ``tol`` (per step) or on no improvement; never after step 1."""
        if self.step <= 1:
            return
        if tol > 0 and change is not None and change / steps <= tol:
            self.stopped = "tol"
        elif no_gain:
            self.stopped = "no_improvement"


def new_state(
    centers: np.ndarray, n: int, *, batch_size: int, max_iter: int, seed: int, prefetch: int
) -> MiniBatchState:
    """The state before the first step: ``max_iter`` epochs are ``max_iter * n //
    batch_size`` steps at most."""
    n_steps = max(1, (max_iter * n) // batch_size)
    return MiniBatchState(
        centers=np.asarray(centers, dtype=np.float64).copy(),
        counts=np.zeros(len(centers), dtype=np.float64),
        draws=Draws(seed, n, batch_size, n_steps, prefetch),
        rng=np.random.default_rng(seed),
        n_steps=n_steps,
        batch_size=batch_size,
        alpha=min(1.0, batch_size * 2.0 / (n + 1)),
    )


def move_centers(centers: np.ndarray, counts: np.ndarray, sums: np.ndarray, cnt) -> None:
    """Every centre that received rows moves to the running mean of all rows it has ever
    received (learning rate ``1 / count``), as scikit-learn's ``_minibatch_update_dense``;
    in place on ``centers`` and ``counts`` (float64)."""
    cnt = np.asarray(cnt, dtype=np.float64)
    hit = cnt > 0
    new_counts = counts[hit] + cnt[hit]
    centers[hit] = (centers[hit] * counts[hit, None] + sums[hit]) / new_counts[:, None]
    counts[hit] = new_counts


def starved(counts: np.ndarray, reassignment_ratio: float, batch_len: int) -> np.ndarray:
    """Centres below ``reassignment_ratio * max(count)``, never more than half a batch of
    them (scikit-learn's cap: the best-fed of them are kept)."""
    to_reassign = counts < reassignment_ratio * counts.max()
    if to_reassign.sum() > 0.5 * batch_len:
        keep = np.argsort(counts)[int(0.5 * batch_len) :]
        to_reassign[keep] = False
    return to_reassign


def jump(centers: np.ndarray, counts: np.ndarray, mask: np.ndarray, rows: np.ndarray) -> None:
    """Starved centres (``mask``) jump to ``rows`` and take the smallest remaining count."""
    centers[mask] = rows
    counts[mask] = counts[~mask].min()


def minibatch_step(
    batch: np.ndarray,
    centers: np.ndarray,
    counts: np.ndarray,
    rng: np.random.Generator,
    reassign: bool,
    reassignment_ratio: float,
    dtype: np.dtype,
    tiles: Tiles | None = None,
) -> tuple[float, int]:
    """One Sculley update in place on ``centers`` (float64) and ``counts`` (float64).

    Centres move as :func:`move_centers`. With ``reassign``, the :func:`starved` centres jump
    to random rows of the batch (:func:`jump`).

    Returns the batch inertia (for the old centers) and the number of reassigned centers.
    """
    packed = kernels.pack_centers(centers, dtype)
    _, d2, sums, cnt = kernels.assign_sums(batch, packed, tiles or Tiles())
    inertia = float(d2.astype(np.float64).sum())
    move_centers(centers, counts, sums, cnt)
    n_reassigned = 0
    if reassign and reassignment_ratio > 0:
        mask = starved(counts, reassignment_ratio, len(batch))
        n_reassigned = int(mask.sum())
        if n_reassigned:
            pick = rng.choice(len(batch), size=n_reassigned, replace=False)
            jump(centers, counts, mask, batch[pick])
    return inertia, n_reassigned


@dataclass(frozen=True)
class StepRules:
    """What every step of one fit follows, in this process or in rounds: the reassignment of
    starved centres, the stopping rules (see :func:`minibatch`) and the kernels' tiles."""

    reassignment_ratio: float
    tol: float
    max_no_improvement: int | None
    tiles: Tiles


def new_history() -> dict[str, list]:
    return {"batch_inertia": [], "ewa_inertia": [], "n_reassigned": []}


def minibatch(
    blocks: Blocks,
    centers: np.ndarray,
    *,
    batch_size: int,
    max_iter: int,
    max_no_improvement: int | None,
    tol: float,
    reassignment_ratio: float,
    seed: int,
    prefetch: int = 16,
    keys: Keys | None = None,
) -> MiniBatchResult:
    """Run mini-batch k-means from ``centers`` on prepared (centered) blocks.

    ``max_iter`` counts epochs: ``max_iter * n // batch_size`` steps at most. Early stopping
    follows scikit-learn: an exponentially weighted average of the batch inertia that has not
    improved for ``max_no_improvement`` steps, or a squared center change ``<= tol``
    (absolute; the estimator scales it by the feature variance). In rounds on a cluster the
    change is that of a merge over the steps it merged, per step.
    """
    from dkm.kmeans._minibatch_rounds import MiniBatchRounds

    keys = keys or Keys.new()
    rules = StepRules(reassignment_ratio, tol, max_no_improvement, Tiles.from_config())
    state = new_state(
        centers, blocks.n, batch_size=batch_size, max_iter=max_iter, seed=seed, prefetch=prefetch
    )
    hist = new_history()
    t0 = time.perf_counter()
    rounds = MiniBatchRounds.maybe(blocks, batch_size)
    if rounds is not None:
        state = rounds.run(state, hist, rules, keys)
    if state.stopped is None and state.step < state.n_steps:
        _steps_here(blocks, state, hist, rules, keys)
    stopped = state.stopped or "max_iter"
    log.debug("mini-batch: %d steps in %.3f s (%s)", state.step, time.perf_counter() - t0, stopped)
    return MiniBatchResult(
        centers=state.centers.astype(blocks.dtype),
        counts=state.counts,
        n_steps=state.step,
        n_iter=int(np.ceil(state.step * batch_size / blocks.n)),
        stopped=stopped,
        history=hist,
        n_rounds=0 if rounds is None else rounds.count,
        sync_every=1 if rounds is None else rounds.sync_every,
    )


def _steps_here(
    blocks: Blocks, state: MiniBatchState, hist: dict, rules: StepRules, keys: Keys
) -> None:
    """The steps in this process, from ``state`` to the end of the fit."""
    k, dtype, batch_size = len(state.centers), blocks.dtype, state.batch_size
    draws = state.draws
    # Groups already drawn (by a round that stopped) are stepped first, from the draws' queue.
    queue: list[np.ndarray] = []
    if draws.queue:
        rows = blocks.take(np.concatenate(draws.queue), keys("minibatch", "rest")).astype(dtype)
        queue, draws.queue = split_batches(rows, batch_size), []
    fetched = 0

    def fetch():
        nonlocal fetched
        idx = draws.next_group()
        if idx is None:
            return None
        fetched += 1
        return blocks.take_later(idx, keys("minibatch", "batch", f=fetched - 1), dtype)

    # The steps' GEMMs are small tiles: a multi-threaded BLAS spends more time waking its
    # threads than computing (a 4096-row step at k = 256 took 36 ms with 2 OpenBLAS threads
    # beside a busy cluster, 2-3 ms with one), so the steps run it single-threaded.
    with threadpool_limits(1, user_api="blas"):
        # Two groups on their way: one fetch takes about as long as a group's steps.
        coming = [fetch(), fetch()]
        while state.step < state.n_steps:
            if not queue:
                queue = split_batches(coming.pop(0)(), batch_size)
                coming.append(fetch())
            batch = queue.pop(0)
            reassign = state.reassign_now(k, batch_size)
            C_old = state.centers.copy() if rules.tol > 0 else None
            inertia, n_re = minibatch_step(
                batch, state.centers, state.counts, state.rng, reassign,
                rules.reassignment_ratio, dtype, rules.tiles,
            )  # fmt: skip
            no_gain = state.record(hist, inertia / batch_size, n_re, rules.max_no_improvement)
            change = None if C_old is None else float(((state.centers - C_old) ** 2).sum())
            state.settle(change, 1, no_gain, rules.tol)
            if state.stopped is not None:
                return
