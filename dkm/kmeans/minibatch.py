"""Mini-batch k-means (Sculley 2010) with scikit-learn's update, reassignment and stopping.

Batches are drawn uniformly with replacement over the *global* row index (so they do not
depend on the chunking) and gathered from the blocks where the data lives, several batches per
round trip (``prefetch``), and the next group is on its way while this one's steps run, so
that neither the scheduler's latency nor the transfer holds the steps up. The center updates
are sequential by nature and run in this process on the gathered batch (a ``batch_size x k``
GEMM per step).
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

    Every center that received points moves to the running mean of all points it has ever
    received (learning rate ``1 / count``), as scikit-learn's ``_minibatch_update_dense``.
    With ``reassign``, centers whose count is below ``reassignment_ratio * max(count)`` jump
    to random rows of the batch and take the smallest remaining count.

    Returns the batch inertia (for the old centers) and the number of reassigned centers.
    """
    packed = kernels.pack_centers(centers, dtype)
    _, d2, sums, cnt = kernels.assign_sums(batch, packed, tiles or Tiles())
    inertia = float(d2.astype(np.float64).sum())
    cnt = cnt.astype(np.float64)
    hit = cnt > 0
    new_counts = counts[hit] + cnt[hit]
    centers[hit] = (centers[hit] * counts[hit, None] + sums[hit]) / new_counts[:, None]
    counts[hit] = new_counts
    n_reassigned = 0
    if reassign and reassignment_ratio > 0:
        to_reassign = counts < reassignment_ratio * counts.max()
        # Never reassign more than half the batch worth of centers (scikit-learn's cap).
        if to_reassign.sum() > 0.5 * len(batch):
            keep = np.argsort(counts)[int(0.5 * len(batch)) :]
            to_reassign[keep] = False
        n_reassigned = int(to_reassign.sum())
        if n_reassigned:
            pick = rng.choice(len(batch), size=n_reassigned, replace=False)
            centers[to_reassign] = batch[pick]
            counts[to_reassign] = counts[~to_reassign].min()
    return inertia, n_reassigned


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
    (absolute; the estimator scales it by the feature variance).
    """
    keys = keys or Keys.new()
    tiles = Tiles.from_config()
    n, k = blocks.n, centers.shape[0]
    dtype = blocks.dtype
    rng = np.random.default_rng(seed)
    # Batches come from a stream of their own, so the next group is drawn (and its rows
    # fetched) before this group's steps draw their reassignments.
    batch_rng = np.random.default_rng([seed, 1])
    C = np.asarray(centers, dtype=np.float64).copy()
    counts = np.zeros(k, dtype=np.float64)
    n_steps = max(1, (max_iter * n) // batch_size)
    alpha = min(1.0, batch_size * 2.0 / (n + 1))
    ewa, ewa_min, no_improve = None, None, 0
    since_reassign = 0
    hist: dict[str, list] = {"batch_inertia": [], "ewa_inertia": [], "n_reassigned": []}
    stopped = "max_iter"
    t0 = time.perf_counter()
    step = 0
    queue: list[np.ndarray] = []
    fetched = 0

    def fetch():
        nonlocal fetched
        m = min(prefetch, n_steps - fetched * prefetch)
        if m <= 0:
            return None
        idx = batch_rng.integers(0, n, size=m * batch_size)
        fetched += 1
        return blocks.take_later(idx, keys("minibatch", "batch", f=fetched - 1), dtype)

    # The steps' GEMMs are small tiles: a multi-threaded BLAS spends more time waking its
    # threads than computing (a 4096-row step at k = 256 took 36 ms with 2 OpenBLAS threads
    # beside a busy cluster, 2-3 ms with one), so the steps run it single-threaded.
    with threadpool_limits(1, user_api="blas"):
        # Two groups on their way: one fetch takes about as long as a group's steps.
        coming = [fetch(), fetch()]
        while step < n_steps:
            if not queue:
                rows = coming.pop(0)()
                coming.append(fetch())
                m = len(rows) // batch_size
                queue = [rows[i * batch_size : (i + 1) * batch_size] for i in range(m)]
            batch = queue.pop(0)
            since_reassign += batch_size
            reassign = bool((counts == 0).any() or since_reassign >= 10 * k)
            if reassign:
                since_reassign = 0
            C_old = C.copy() if tol > 0 else None
            inertia, n_re = minibatch_step(
                batch, C, counts, rng, reassign, reassignment_ratio, dtype, tiles
            )
            inertia /= batch_size
            hist["batch_inertia"].append(inertia)
            hist["n_reassigned"].append(n_re)
            step += 1
            if step == 1:  # scikit-learn ignores the first step (inertia of the initial centers)
                hist["ewa_inertia"].append(np.nan)
                continue
            ewa = inertia if ewa is None else ewa * (1 - alpha) + inertia * alpha
            hist["ewa_inertia"].append(ewa)
            if C_old is not None and float(((C - C_old) ** 2).sum()) <= tol:
                stopped = "tol"
                break
            if ewa_min is None or ewa < ewa_min:
                no_improve, ewa_min = 0, ewa
            else:
                no_improve += 1
            if max_no_improvement is not None and no_improve >= max_no_improvement:
                stopped = "no_improvement"
                break
    log.debug("mini-batch: %d steps in %.3f s (%s)", step, time.perf_counter() - t0, stopped)
    return MiniBatchResult(
        centers=C.astype(dtype),
        counts=counts,
        n_steps=step,
        n_iter=int(np.ceil(step * batch_size / n)),
        stopped=stopped,
        history=hist,
    )
