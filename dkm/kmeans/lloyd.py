"""Lloyd iterations over blocks, with scikit-learn's stopping rules and empty-cluster relocation.

Per iteration the driver submits the same tasks, whatever the iteration number:

- ``nblocks`` fused E-step + partial M-step tasks (:func:`dkm.kmeans.kernels.lloyd_step`),
  each returning labels (kept on the worker for the next moved-points count) and
  ``(sums, counts, moved)``;
- ``2 * nblocks`` tiny selector tasks and a tree reduction of the statistics
  (``ceil(nblocks / 8) + ...`` combine tasks);
- one gather of a ``k x d`` float64 array to this process, which computes the new centroids.

Centroids enter as one packed ``(d + 1) x k`` array, scattered to all workers when above 1 MB.
Nothing in the graph refers to the previous iteration except the label futures, so the graph
does not grow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dkm._parallel import backend as _backend
from dkm._parallel import kernels
from dkm._parallel.backend import SPLIT_EVERY
from dkm._parallel.blocks import Blocks

log = logging.getLogger("dkm")

EMPTY_POLICIES = ("farthest", "random-point", "zero", "keep")


@dataclass
class LloydResult:
    centers: np.ndarray
    labels: list  # futures / arrays of int32 labels per block, for the final centres
    inertia: float
    n_iter: int
    converged: str  # "strict" (labels unchanged), "tol", or "max_iter"
    history: dict = field(default_factory=dict)


def _tree_tasks(n: int) -> int:
    """Number of combine tasks :meth:`Backend.tree_reduce` submits for ``n`` inputs."""
    total = 0
    while n > 1:
        n = -(-n // SPLIT_EVERY)
        total += n
    return total


def _objective(sq_norm_total: float, centers: np.ndarray, sums: np.ndarray, counts) -> float:
    """sum ||x - c_label||^2 from the float64 statistics, without another pass.

    sum_x ||x||^2 - 2 sum_j c_j . S_j + sum_j n_j ||c_j||^2, where S_j, n_j are the sums and
    counts of the rows assigned to j. Exact in float64 for any ``centers`` given those
    assignments, so it also gives the inertia of the *updated* centres (scikit-learn's
    convention at strict convergence).
    """
    c = np.asarray(centers, dtype=np.float64)
    val = sq_norm_total - 2.0 * float((c * sums).sum()) + float((counts * (c * c).sum(1)).sum())
    return max(val, 0.0)


class _EmptyHandler:
    def __init__(self, blocks: Blocks, policy: str, seed: int, name: str):
        if policy not in EMPTY_POLICIES:
            raise ValueError(f"empty_cluster must be one of {EMPTY_POLICIES}, got {policy!r}")
        self.blocks, self.policy, self.seed, self.name = blocks, policy, seed, name

    def apply(self, it, centers, packed_ref, sums, counts):
        """Re-seed empty clusters in place on ``sums``/``counts``; return fixed centres dict."""
        empty = np.flatnonzero(counts == 0)
        fixed: dict[int, np.ndarray] = {}
        if len(empty) == 0 or self.policy == "keep":
            for j in empty:
                fixed[int(j)] = centers[j]
            return empty, fixed, 0
        b = self.blocks
        be = b.backend
        passes = 0
        if self.policy == "farthest":
            # Like scikit-learn: the rows farthest from their centres move to the empty
            # clusters, leaving their old clusters. One extra pass, only when needed.
            m = len(empty)
            futs = be.map(
                kernels.farthest_rows,
                b.handles,
                [packed_ref] * b.nblocks,
                [m] * b.nblocks,
                b.starts.tolist(),
                name=f"{self.name}-it{it}-far",
            )
            parts = be.gather(futs)
            passes = 1
            d2 = np.concatenate([p[0] for p in parts])
            gidx = np.concatenate([p[1] for p in parts])
            labs = np.concatenate([p[2] for p in parts])
            rows = np.concatenate([p[3] for p in parts], axis=0).astype(np.float64)
            order = np.lexsort((gidx, -d2))[:m]
            for j, o in zip(empty, order, strict=False):
                old = labs[o]
                sums[old] -= rows[o]
                counts[old] -= 1
                sums[j] = rows[o]
                counts[j] = 1
        elif self.policy == "random-point":
            rng = np.random.default_rng([self.seed, it])
            rows = b.take(
                rng.choice(b.n, size=len(empty), replace=False), name=f"{self.name}-it{it}-rnd"
            )
            for j, r in zip(empty, rows, strict=True):
                fixed[int(j)] = r
        elif self.policy == "zero":
            # The zero vector of the data space (rows are centred on ``b.shift``).
            zero = -(b.shift.astype(np.float64) if b.shift is not None else np.zeros(b.d))
            for j in empty:
                fixed[int(j)] = zero
        return empty, fixed, passes


def _assign_pass(blocks: Blocks, C: np.ndarray, prev_labels: list, name: str, part_bytes: int):
    """One pass over the data: nearest centre per row and the reduced partial statistics.

    Returns the shared packed centres (the empty-cluster policy reuses them), the per-block
    label handles (they stay where the blocks are) and ``(sums, counts, n_moved)``.
    """
    be, nb = blocks.backend, blocks.nblocks
    packed_ref = be.share(kernels.pack_centers(C, blocks.dtype))
    steps = be.map(
        kernels.lloyd_step, blocks.handles, [packed_ref] * nb, prev_labels, name=f"{name}-step"
    )
    labels = be.map(kernels.step_labels, steps, name=f"{name}-labels")
    stats = be.map(kernels.step_stats, steps, name=f"{name}-stats")
    totals = be.reduce(stats, kernels.combine_stats, name=f"{name}-sum", nbytes=part_bytes)
    return packed_ref, labels, totals


def lloyd(
    blocks: Blocks,
    centers: np.ndarray,
    *,
    max_iter: int = 300,
    tol: float = 0.0,
    empty_cluster: str = "farthest",
    seed: int = 0,
    name: str = "dkm-lloyd",
    verbose: bool = False,
    start: dict | None = None,
    callback: Callable[[int, np.ndarray, dict], None] | None = None,
) -> LloydResult:
    """Run Lloyd's algorithm from ``centers`` on prepared blocks.

    Parameters
    ----------
    blocks : Blocks
        Data after :func:`dkm.kmeans._data.compute_stats`.
    centers : ndarray (k, d)
        Initial centroids.
    max_iter : int
        Maximum number of iterations.
    tol : float
        *Absolute* tolerance on the sum of squared centre shifts (the estimator scales the
        user's ``tol`` by the mean feature variance, as scikit-learn does).
    empty_cluster : {"farthest", "random-point", "zero", "keep"}
        What to do with a cluster that lost all its points.
    seed : int
        Seed for the "random-point" policy.
    name : str
        Unique prefix for task keys (shows on the dashboard).
    start : dict, optional
        Resume a run: ``{"iteration": t, "centers": C, "history": {key: [values]}}`` as
        passed to ``callback`` after iteration ``t``; iterations continue from ``t + 1``.
    callback : callable, optional
        ``callback(iteration, centers, history)`` after every iteration (1-based count,
        float64 centres, history lists so far): the hook for checkpoints and progress.

    Returns
    -------
    LloydResult
        Stopping follows scikit-learn's Lloyd: stop when no label changed (strict) or when
        the squared shift is ``<= tol``; if not strictly converged, one more E-step gives
        labels and inertia consistent with the final centres.
    """
    nb = blocks.nblocks
    dtype = blocks.dtype
    sqn = blocks.stats["sq_norm_total"]
    handler = _EmptyHandler(blocks, empty_cluster, seed, name)
    C = np.asarray(centers, dtype=dtype).astype(np.float64)
    k = C.shape[0]
    part_bytes = k * (blocks.d + 1) * 8
    prev_labels: list = [None] * nb
    hist: dict[str, list] = {
        k_: []
        for k_ in (
            "inertia",
            "center_shift",
            "n_moved",
            "n_empty",
            "n_reseeded",
            "seconds",
            "n_tasks",
            "extra_passes",
        )
    }
    first = 0
    if start is not None:
        first = int(start["iteration"])
        C = np.asarray(start["centers"], dtype=np.float64)
        for key, values in start["history"].items():
            if key in hist:
                hist[key].extend(values)
    converged = "max_iter"
    last = None
    it = first - 1
    for it in range(first, max_iter):
        t0 = time.perf_counter()
        packed_ref, labels, (sums, counts, moved) = _assign_pass(
            blocks, C, prev_labels, f"{name}-it{it}", part_bytes
        )
        n_tasks = 3 * nb + (
            _tree_tasks(nb) if nb * part_bytes > _backend.CLIENT_REDUCE_BYTES else 0
        )
        sums = sums.copy()
        counts = counts.copy()
        raw_sums, raw_counts = sums.copy(), counts.copy()
        inertia = _objective(sqn, C, raw_sums, raw_counts)
        empty, fixed, extra = handler.apply(it, C, packed_ref, sums, counts)
        C_new = C.copy()
        nz = counts > 0
        C_new[nz] = sums[nz] / counts[nz, None]
        for j, v in fixed.items():
            C_new[j] = v
        C_new = C_new.astype(dtype).astype(np.float64)
        shift = float(((C_new - C) ** 2).sum())
        prev_labels = labels
        last = (raw_sums, raw_counts)
        hist["inertia"].append(inertia)
        hist["center_shift"].append(shift)
        hist["n_moved"].append(int(moved))
        hist["n_empty"].append(len(empty))
        hist["n_reseeded"].append(len(empty) if empty_cluster != "keep" else 0)
        hist["n_tasks"].append(n_tasks)
        hist["extra_passes"].append(extra)
        if verbose:
            log.info("iteration %d: inertia %.6g shift %.3g moved %d", it, inertia, shift, moved)
        C = C_new
        hist["seconds"].append(time.perf_counter() - t0)
        if callback is not None:
            callback(it + 1, C, hist)
        if it > 0 and moved == 0:
            converged = "strict"
            break
        if shift <= tol:
            converged = "tol"
            break
    n_iter = it + 1
    if converged == "strict":
        inertia = _objective(sqn, C, *last)
        final_labels = prev_labels
    else:  # one more E-step so labels and inertia belong to the final centres
        _, final_labels, (s, c, _) = _assign_pass(
            blocks, C, prev_labels, f"{name}-final", part_bytes
        )
        inertia = _objective(sqn, C, s, c)
    return LloydResult(
        centers=C.astype(dtype),
        labels=final_labels,
        inertia=float(inertia),
        n_iter=n_iter,
        converged=converged,
        history=hist,
    )
