"""Lloyd iterations over blocks, with scikit-learn's stopping rules and empty-cluster relocation.

Per iteration the driver submits the same tasks, whatever the iteration number:

- ``nblocks`` fused E-step + partial M-step tasks (:func:`dkm._parallel.kernels.lloyd_step`,
  or :func:`dkm.kmeans._hamerly.hamerly_step` when pruned), each returning labels and per-row
  distances or bounds (kept on the worker for the next step) and ``(sums, counts, moved)``;
- ``nblocks`` tiny tasks selecting the statistics and, for large partials, a tree reduction
  (the labels are selected from the last iteration's steps only, when the fit ends);
- one gather of a ``k x d`` float64 array to this process, which computes the new centroids.

Centroids enter as one packed ``(d + 1) x k`` array, scattered to all workers when large.
Nothing in the graph refers to the previous iteration except the previous steps' futures, so
the graph does not grow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dkm._parallel import kernels
from dkm._parallel.blocks import Blocks
from dkm._parallel.kernels import Tiles
from dkm._parallel.keys import Keys
from dkm.kmeans import _hamerly, _yinyang
from dkm.kmeans._iteration import (
    HISTORY_KEYS,
    PRUNED_STEPS,
    _advance,
    _Chooser,
    _EmptyHandler,
    _record,
    _stopping,
    objective,
)
from dkm.kmeans._rounds import Rounds, RoundSteps
from dkm.kmeans.init import data_range

__all__ = [
    "ASSIGNMENTS",
    "EMPTY_POLICIES",
    "LloydProgress",
    "LloydResult",
    "assign_pass",
    "lloyd",
    "objective",
    "row_state_bytes",
]

log = logging.getLogger("dkm")

EMPTY_POLICIES = ("farthest", "random-point", "random-vector", "zero", "keep")
# How an iteration assigns rows: every distance ("lloyd"), or bounds skip the rows that
# cannot move -- Hamerly's one bound per row ("hamerly") or one per group of centres
# ("yinyang") -- or whichever is paying off ("auto"); all give the same labels and centres.
ASSIGNMENTS = ("lloyd", "hamerly", "yinyang", "auto")


def row_state_bytes(
    assignment: str, k: int, d: int, dtype: np.dtype, kmeans_parallel: bool, n_init: int
) -> int:
    """Bytes per row a :class:`dkm.KMeans` fit keeps on the workers between tasks.

    What the blocks plan reserves beside every row (``dkm._parallel.blocks.Source.row_state``;
    the default there, :data:`dkm._parallel.kernels.ROW_STATE_BYTES`, is the most any
    model keeps). The largest of the fit's phases:

    - plain Lloyd: labels (int32) of the last pass and of the running one, the squared
      distances (working dtype; the running pass writes over the last one's) and the rows'
      squared norms when they are kept (:data:`~dkm._parallel.kernels.NORMS_KEPT_MIN_ROW_BYTES`);
    - pruned passes (``assignment`` other than "lloyd"): the bounds, updated in place --
      labels, float32 upper bound and row norm, one float32 lower bound for Hamerly's or
      one per group of centres for Yinyang's -- beside the last plain pass's state while
      the first pruned pass sets them up;
    - k-means|| (``kmeans_parallel``): the running minimum distance, float64, previous and
      current;

    plus the best start's labels while the next of ``n_init`` starts runs.
    """
    size = np.dtype(dtype).itemsize
    norms = size if d * size >= kernels.NORMS_KEPT_MIN_ROW_BYTES else 0
    plain = 4 + size  # labels and squared distances of one pass
    state = plain + 4 + norms
    if assignment != "lloyd":
        pruned = assignment if assignment != "auto" else _Chooser(assignment, k).pruned
        bounds = 12 + 4 * (_yinyang.n_groups(k) if pruned == "yinyang" else 1)
        state = max(state, plain + norms + bounds)
    if kmeans_parallel:
        state = max(state, 16)
    return state + (4 if n_init > 1 else 0)


@dataclass
class LloydProgress:
    """Where a Lloyd run stands after an iteration (or where a resumed run starts).

    ``previous_centers`` are the centres whose assignment gave the labels of the last
    iteration: a resumed run recomputes those labels from them, so the next moved-points
    count and the strict-convergence test are exactly those of an uninterrupted run.
    ``stopped`` is set once the run has met a stopping rule; ``inertia`` is then its final
    objective when it stopped strictly (no label moved).
    """

    iteration: int
    centers: np.ndarray
    previous_centers: np.ndarray | None
    history: dict[str, list]
    stopped: str | None = None
    inertia: float | None = None


@dataclass
class LloydResult:
    centers: np.ndarray
    labels: list  # futures / arrays of int32 labels per block, for the final centres
    inertia: float
    n_iter: int
    converged: str  # "strict" (labels unchanged), "tol", or "max_iter"
    history: dict = field(default_factory=dict)


class _BlocksEmpty(_EmptyHandler):
    """:class:`_EmptyHandler` reading the rows it needs with tasks on the blocks."""

    def __init__(self, blocks: Blocks, keys: Keys, tiles: Tiles, policy, seed, value_range):
        super().__init__(policy, seed, blocks.n, blocks.d, blocks.shift, value_range)
        self.blocks, self.keys, self.tiles = blocks, keys, tiles

    def farthest_parts(self, it: int, done: _Pass, m: int) -> tuple[list, int]:
        b = self.blocks
        be, nb = b.backend, b.nblocks
        name = self.keys("lloyd", "farthest", it=it)
        starts = b.starts.tolist()
        if done.pruned:  # the bounds kept no distances: another pass
            futs = be.map(
                kernels.farthest_rows,
                b.handles,
                [done.packed] * nb,
                [m] * nb,
                starts,
                [self.tiles] * nb,
                name=name,
            )
            return be.gather(futs), 1
        args = (b.handles, done.steps, [m] * nb, starts)
        return be.gather(be.map(kernels.farthest_from_step, *args, name=name)), 0

    def take(self, it: int, rows: np.ndarray) -> np.ndarray:
        return self.blocks.take(rows, name=self.keys("lloyd", "random-point", it=it))


@dataclass
class _Pass:
    """One assignment pass: the shared packed centres, the per-block steps (they stay on
    the workers for the next pass), and the reduced statistics."""

    packed: object
    steps: list
    totals: tuple
    pruned: bool
    backend: object
    labels_key: str

    @property
    def labels(self) -> list:
        """Per-block label handles, selected from the steps when a result needs them: only
        the last pass's labels are ever used, so the iterations do not submit them."""
        if not hasattr(self, "_labels"):
            self._labels = self.backend.map(kernels.step_labels, self.steps, name=self.labels_key)
        return self._labels


def assign_pass(
    blocks: Blocks,
    C: np.ndarray,
    prev_steps: list,
    keys: Keys,
    *,
    algorithm: str = "lloyd",
    phase: str = "assign",
    tiles: Tiles | None = None,
    assignment: str = "lloyd",
    previous_centers: np.ndarray | None = None,
    **counters: int,
) -> _Pass:
    """One pass over the data: nearest centre per row and the reduced partial statistics.

    Parameters
    ----------
    blocks : Blocks
        The (centered) data.
    C : ndarray (k, d)
        Centres in the blocks' coordinates.
    prev_steps : list
        Per-block steps of the previous pass (or None each): their labels give the
        moved-points count, and the pruned pass updates their bounds.
    keys : Keys
        Task key maker; the keys read ``<algorithm>-<phase>``, ``<algorithm>-reduce``... with
        ``counters`` (e.g. ``it=3``) keeping them unique.
    tiles : Tiles, optional
        Kernel tile sizes (default: from dask config).
    assignment : {"lloyd", "hamerly", "yinyang"}
        Compute every distance, or skip the rows (and the groups of centres) the bounds show
        cannot be nearer (the first pruned pass after plain ones computes every distance and
        sets the bounds).
    previous_centers : ndarray (k, d), optional
        The centres of ``prev_steps`` (the pruned pass moves their bounds by the shift).

    Returns
    -------
    _Pass
    """
    be, nb = blocks.backend, blocks.nblocks
    tiles = tiles or Tiles.from_config()
    part_bytes = C.shape[0] * (blocks.d + 1) * 8
    packed_ref = be.share(kernels.pack_centers(C, blocks.dtype))
    step = PRUNED_STEPS.get(assignment)
    pruned = step is not None
    if pruned:
        motion = _hamerly.motion_since(previous_centers, prev_steps, C, assignment)
        steps = be.map(
            step,
            blocks.handles,
            [packed_ref] * nb,
            prev_steps,
            [be.share(motion)] * nb,
            [tiles] * nb,
            name=keys(algorithm, phase, **counters),
        )
    else:
        steps = be.map(
            kernels.lloyd_step,
            blocks.handles,
            [packed_ref] * nb,
            prev_steps,
            [tiles] * nb,
            name=keys(algorithm, phase, **counters),
        )
    stats = be.map(kernels.step_stats, steps, name=keys(algorithm, "stats", **counters))
    totals = be.reduce(
        stats, kernels.combine_stats, name=keys(algorithm, "reduce", **counters), nbytes=part_bytes
    )
    return _Pass(packed_ref, steps, totals, pruned, be, keys(algorithm, "labels", **counters))


def _log_iteration(it: int, record: dict) -> None:
    log.info(
        "iteration %d: inertia %.6g shift %.3g moved %d%s",
        it,
        record["inertia"],
        record["center_shift"],
        record["n_moved"],
        " (in a round)" if record["in_round"] else "",
    )


def lloyd(
    blocks: Blocks,
    centers: np.ndarray,
    *,
    max_iter: int = 300,
    tol: float = 0.0,
    empty_cluster: str = "farthest",
    seed: int = 0,
    keys: Keys | None = None,
    verbose: bool = False,
    start: LloydProgress | None = None,
    callback: Callable[[LloydProgress], None] | None = None,
    value_range: tuple[float, float] | None = None,
    assignment: str = "lloyd",
) -> LloydResult:
    """Run Lloyd's algorithm from ``centers`` on prepared blocks.

    Parameters
    ----------
    blocks : Blocks
        Data after :func:`dkm._parallel.blocks.compute_stats`, centered.
    centers : ndarray (k, d)
        Initial centroids (ignored when ``start`` is given).
    max_iter : int
        Maximum number of iterations.
    tol : float
        *Absolute* tolerance on the sum of squared centre shifts (the estimator scales the
        user's ``tol`` by the mean feature variance, as scikit-learn does).
    empty_cluster : {"farthest", "random-point", "random-vector", "zero", "keep"}
        What to do with a cluster that lost all its points: move the farthest rows to it, a
        random data row, a vector with coordinates uniform in ``value_range``, the zero
        vector (of the data space), or keep its centre.
    seed : int
        Seed of the "random-point" and "random-vector" policies; iteration ``it`` (0-based)
        draws from ``numpy.random.default_rng([seed, it])``.
    keys : Keys, optional
        Task key maker (shows on the dashboard).
    start : LloydProgress, optional
        Resume a run from a state passed to ``callback``; iterations continue from there and
        end exactly where an uninterrupted run ends.
    callback : callable, optional
        ``callback(progress)`` after every iteration: the hook for checkpoints and progress.
    value_range : (float, float), optional
        ``(lo, hi)`` of the "random-vector" policy in data coordinates (default: the data's
        global [min, max], :func:`dkm.kmeans.init.data_range`).
    assignment : {"lloyd", "hamerly", "yinyang", "auto"}
        Compute every distance each iteration, or keep distance bounds per row on the
        workers (Hamerly's, or Yinyang's per group of centres) and skip the distances that
        cannot win, or prune while it pays (:class:`_Chooser`). The labels, centres and
        history are the same either way.

    Returns
    -------
    LloydResult
        Stopping follows scikit-learn's Lloyd: stop when no label changed (strict) or when
        the squared shift is ``<= tol``; if not strictly converged, one more E-step gives
        labels and inertia consistent with the final centres.
    """
    if empty_cluster not in EMPTY_POLICIES:
        raise ValueError(f"empty_cluster must be one of {EMPTY_POLICIES}, got {empty_cluster!r}")
    keys = keys or Keys.new()
    tiles = Tiles.from_config()
    nb = blocks.nblocks
    dtype = blocks.dtype
    sqn = blocks.stats["sq_norm_total"]
    if empty_cluster == "random-vector" and value_range is None:
        value_range = data_range(blocks)
    handler = _BlocksEmpty(blocks, keys, tiles, empty_cluster, seed, value_range)
    C = np.asarray(centers, dtype=dtype).astype(np.float64)
    k = C.shape[0]
    part_bytes = k * (blocks.d + 1) * 8
    n_tasks = 2 * nb + blocks.backend.reduce_tasks(nb, part_bytes)
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
    chooser = _Chooser(assignment, k)
    prev_pruned = False  # whether the steps in ``prev`` hold bounds
    prev: list = [None] * nb  # the previous pass's steps, kept on the workers
    C_prev = None
    hist: dict[str, list] = {key: [] for key in HISTORY_KEYS}
    first, stopped, inertia = 0, None, None
    if start is not None:
        first, stopped, inertia = int(start.iteration), start.stopped, start.inertia
        C = np.asarray(start.centers, dtype=np.float64)
        for key, values in start.history.items():
            if key in hist:
                hist[key].extend(values)
        done_before = len(start.history.get("inertia", []))
        for values in hist.values():  # a key newer than the checkpoint: unknown there
            values.extend([-1] * (done_before - len(values)))
        if start.previous_centers is not None and stopped is None:
            # The labels the interrupted run held, so that moved counts continue exactly.
            prev = assign_pass(
                blocks,
                start.previous_centers,
                prev,
                keys,
                tiles=tiles,
                assignment=chooser.at(first - 1),
                it=first - 1,
            )
            prev_pruned = prev.pruned
            prev = prev.steps
            C_prev = np.asarray(start.previous_centers, dtype=np.float64)
    last = None
    rounds = Rounds.maybe(blocks, part_bytes)
    done = None
    it = first
    while stopped is None and it < max_iter:
        if rounds is not None and rounds.worth(it - first, hist["seconds"]):
            t0 = time.perf_counter()
            ran = rounds.run(
                it, C, C_prev, prev, prev_pruned, chooser, max_iter, tol, handler, sqn, keys
            )
            if ran is None:  # the round failed: on task by task, from the same state
                rounds = None
                if C_prev is not None:  # the labels of the last iteration, for its moves
                    again = keys.sub(recover=it)  # keys of their own: "-it<n>" ones are taken
                    prev = assign_pass(blocks, C_prev, [None] * nb, again, it=it - 1).steps
                prev_pruned = False
                continue
            prev, records, chooser, prev_pruned = ran
            # The round's own cost (its tasks, the records' trip) is spread over its
            # iterations, so that the history's seconds add up to the wall time.
            spent = time.perf_counter() - t0 - sum(r[1]["seconds"] for r in records)
            for r in records:
                r[1]["seconds"] += max(0.0, spent) / len(records)
            for C_new, record, stopped, inertia, raw in records:
                last = raw
                _record(hist, record)
                if verbose:
                    _log_iteration(it, record)
                C_prev, C = C, C_new
                if callback is not None:
                    callback(LloydProgress(it + 1, C, C_prev, hist, stopped, inertia))
                it += 1
            done = None
            continue
        t0 = time.perf_counter()
        done = assign_pass(
            blocks,
            C,
            prev,
            keys,
            tiles=tiles,
            assignment=chooser.at(it),
            previous_centers=C_prev,
            it=it,
        )
        chooser.saw(it, done.pruned, done.totals[3], blocks.n, first_pruned=not prev_pruned)
        prev_pruned = done.pruned
        C_new, last, record = _advance(it, C, done.totals, sqn, dtype, handler, done)
        prev = done.steps
        record["n_tasks"] = n_tasks
        if verbose:
            _log_iteration(it, record)
        C_prev, C = C, C_new
        record["seconds"] = time.perf_counter() - t0
        _record(hist, record)
        stopped = _stopping(it, record, tol, max_iter)
        if stopped == "strict":
            inertia = objective(sqn, C, *last)
        if callback is not None:
            callback(LloydProgress(it + 1, C, C_prev, hist, stopped, inertia))
        it += 1
    it -= 1
    n_iter = it + 1 if start is None or start.stopped is None else first
    stopped = stopped or "max_iter"
    if isinstance(prev, RoundSteps):
        # Results must never depend on a rank's task: the scheduler cannot run one again
        # alone (it waits for its peers), so labels lost with a worker would never return.
        prev, prev_pruned = [None] * nb, False
    if stopped == "strict":
        if last is None:  # resumed after it had stopped: only the labels are missing
            final_labels = assign_pass(
                blocks, C, [None] * nb, keys, phase="final", tiles=tiles
            ).labels
        elif done is None:  # stopped in a round: its last labels again, as plain tasks
            final_labels = assign_pass(
                blocks, C_prev, prev, keys, phase="final", tiles=tiles
            ).labels
        else:
            final_labels = done.labels
    else:  # one more E-step so labels and inertia belong to the final centres
        final = assign_pass(
            blocks,
            C,
            prev,
            keys,
            phase="final",
            tiles=tiles,
            assignment=chooser.at(it + 1) if prev_pruned else "lloyd",
            previous_centers=C_prev,
        )
        final_labels = final.labels
        inertia = objective(sqn, C, *final.totals[:2])
    return LloydResult(
        centers=C.astype(dtype),
        labels=final_labels,
        inertia=float(inertia),
        n_iter=n_iter,
        converged=stopped,
        history=hist,
    )
