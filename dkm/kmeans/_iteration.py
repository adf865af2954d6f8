"""The arithmetic of one Lloyd iteration, shared by the client's loop and the ranks' rounds.

From one pass's reduced statistics to the next centres, the history record and the stopping
rule: the client (:func:`dkm.kmeans.lloyd.lloyd`) and every rank of a round
(:mod:`dkm.kmeans._rounds`) run this same code on the same numbers, so they agree to the
last bit.
"""

from __future__ import annotations

import numpy as np

from dkm.kmeans import _hamerly, _yinyang
from dkm.kmeans.init import uniform_vectors

# The pruned assignments and the block step each runs (the plain one is "lloyd").
PRUNED_STEPS = {"hamerly": _hamerly.hamerly_step, "yinyang": _yinyang.yinyang_step}
# From this many centres "auto" prunes with group bounds: Hamerly's single bound drops by
# the largest of all centres' shifts, which with many centres keeps few rows.
YINYANG_MIN_K = 512


class _Chooser:
    """The assignment of each iteration under "auto".

    The pruned pass costs more than the plain one when the bounds keep few rows: its first
    pass finds the second nearest centre too, it gathers the rows it recomputes, and the
    "farthest" empty-cluster policy needs another distance pass. With many centres in few
    dimensions the bounds may keep few rows for a while (Fashion-MNIST 5x5 patches, k=1024:
    95% of rows recomputed after 25 iterations, while on MNIST patches at the same k, 30%).
    So "auto" prunes (Hamerly's bounds below :data:`YINYANG_MIN_K` centres, Yinyang's group
    bounds from there), and when a pruned pass recomputed more than ``worth`` of the rows it
    runs plain passes for a while (4 iterations, doubling each time) before trying again.
    """

    worth = 0.8

    def __init__(self, assignment: str, k: int):
        self.fixed = None if assignment == "auto" else assignment
        self.pruned = "yinyang" if k >= YINYANG_MIN_K else "hamerly"
        self.plain_until = -1
        self.wait = 4

    def at(self, it: int) -> str:
        if self.fixed is not None:
            return self.fixed
        return "lloyd" if it < self.plain_until else self.pruned

    def saw(self, it: int, pruned: bool, computed: int, n: int, first_pruned: bool) -> None:
        """Learn from iteration ``it``'s pass (``pruned``: it kept bounds; ``first_pruned``:
        they were new)."""
        if self.fixed is not None or not pruned or first_pruned:
            return
        if computed > self.worth * n:
            self.plain_until = it + 1 + self.wait
            self.wait *= 2


HISTORY_KEYS = (
    "inertia",
    "center_shift",
    "n_moved",
    "n_empty",
    "n_reseeded",
    "seconds",
    "n_tasks",
    "extra_passes",
    "n_computed",
    "in_round",
)


def objective(sq_norm_total: float, centers: np.ndarray, sums: np.ndarray, counts) -> float:
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
    """What happens to a cluster that lost all its rows (see :func:`lloyd`'s
    ``empty_cluster``); the data it needs comes through :meth:`farthest_parts` and
    :meth:`take` (tasks on the blocks here, an exchange between ranks in a round)."""

    def __init__(
        self,
        policy: str,
        seed: int,
        n: int,
        d: int,
        shift: np.ndarray | None,
        value_range: tuple[float, float] | None = None,
    ):
        self.policy, self.seed, self.n, self.d, self.shift = policy, seed, n, d, shift
        self.value_range = value_range

    def apply(self, it, centers, done, sums, counts):
        """Re-seed empty clusters in place on ``sums``/``counts`` (``done``: the pass, for
        :meth:`farthest_parts`); returns ``(empty, fixed centres by index, extra passes)``."""
        empty = np.flatnonzero(counts == 0)
        fixed: dict[int, np.ndarray] = {}
        if len(empty) == 0 or self.policy == "keep":
            for j in empty:
                fixed[int(j)] = centers[j]
            return empty, fixed, 0
        passes = 0
        if self.policy == "farthest":
            # Like scikit-learn: the rows farthest from their centres move to the empty
            # clusters, leaving their old clusters. The plain step kept every row's distance,
            # so that costs one read of the chosen rows; the pruned step kept bounds only, so
            # there it is another distance pass (counted in ``extra_passes``).
            m = len(empty)
            parts, passes = self.farthest_parts(it, done, m)
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
            rows = self.take(it, rng.choice(self.n, size=len(empty), replace=False))
            for j, r in zip(empty, rows, strict=True):
                fixed[int(j)] = r
        elif self.policy == "random-vector":
            # Drawn here from the start's seed and the iteration number, like "random-point":
            # the same vectors on any backend and after a resume, at no cost on the data.
            vectors = uniform_vectors(
                len(empty), self.d, self.value_range, [self.seed, it], self.shift
            )
            for j, v in zip(empty, vectors, strict=True):
                fixed[int(j)] = v
        elif self.policy == "zero":
            # The zero vector of the data space (rows are centered on ``shift``).
            zero = -(self.shift.astype(np.float64) if self.shift is not None else np.zeros(self.d))
            for j in empty:
                fixed[int(j)] = zero
        return empty, fixed, passes

    def farthest_parts(self, it: int, done, m: int) -> tuple[list, int]:
        """Every block's ``m`` rows farthest from their centres (the parts of
        :func:`kernels.farthest_rows`) and the extra distance passes that took."""
        raise NotImplementedError

    def take(self, it: int, rows: np.ndarray) -> np.ndarray:
        """The given global rows as float64, in that order."""
        raise NotImplementedError


def _advance(it: int, C: np.ndarray, totals: tuple, sqn: float, dtype, handler, done):
    """The next centres from one pass's ``totals = (sums, counts, moved, computed)``.

    Empty clusters are re-seeded by ``handler`` (:class:`_EmptyHandler`; ``done`` is the
    pass it may read rows from). Returns ``(C_new, (sums, counts) as assigned, record)``,
    ``record`` holding the iteration's history entries but its ``seconds`` and ``n_tasks``.
    """
    sums, counts, moved, computed = totals
    raw = (sums, counts)  # as assigned; the empty-cluster handler changes copies
    sums, counts = sums.copy(), counts.copy()
    iteration_inertia = objective(sqn, C, *raw)
    empty, fixed, extra = handler.apply(it, C, done, sums, counts)
    C_new = C.copy()
    nz = counts > 0
    C_new[nz] = sums[nz] / counts[nz, None]
    for j, v in fixed.items():
        C_new[j] = v
    C_new = C_new.astype(dtype).astype(np.float64)
    record = {
        "inertia": iteration_inertia,
        "center_shift": float(((C_new - C) ** 2).sum()),
        "n_moved": int(moved),
        "n_empty": len(empty),
        "n_reseeded": len(empty) if handler.policy != "keep" else 0,
        "extra_passes": extra,
        "n_computed": int(computed),
        "in_round": 0,
    }
    return C_new, raw, record


def _stopping(it: int, record: dict, tol: float, max_iter: int) -> str | None:
    """scikit-learn's rules: no label moved ("strict"), a shift within ``tol`` ("tol"), or
    the last iteration ("max_iter"); None to go on."""
    if it > 0 and record["n_moved"] == 0:
        return "strict"
    if record["center_shift"] <= tol:
        return "tol"
    if it + 1 == max_iter:
        return "max_iter"
    return None


def _record(hist: dict, record: dict) -> None:
    for key in HISTORY_KEYS:
        hist[key].append(record[key])
