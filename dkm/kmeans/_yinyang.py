"""Pruned Lloyd with Yinyang group bounds, for many centres: exactly Lloyd's labels and centres.

Hamerly's single lower bound (:mod:`dkm.kmeans._hamerly`) drops by the largest centre shift
of all ``k`` centres every iteration, so with thousands of centres it keeps few rows. Here
the centres are split once into ``t`` groups of nearby centres (k-means on the centres), and
each row keeps one lower bound per group (Ding et al., "Yinyang K-means", ICML 2015): a group's
bound drops only by the largest shift *in that group*. A row is skipped when its upper bound
is below every group's bound ("global filtering"); otherwise only the groups whose bound is
below the row's distance to its centre are opened and their centres' distances computed,
group by group, with the same fused kernel as the plain loop ("local filtering"). On MNIST
5x5 patches at k = 4096 that is 2.5-7.5% of the plain loop's distances with 8 groups, against
25-30% for Hamerly's rows.

Exact to the last bit, like Hamerly's pass: a row takes the nearest opened centre only when
it beats every other candidate (computed, or a group's bound) by more than the rounding
error of the plain loop's expanded float distances; rows with a closer race go through the
full fused pass, as the plain loop computes them. That error is bounded per centre, with
its own norm (``(d + 2) eps (||x|| + ||c||)^2``): bounded with the largest centre norm, as
Hamerly's pass does, it sent 64% of MNIST patch rows at k = 16384 (blank patches, one pixel
from their runner-up) to the full pass every iteration. Per-cluster sums add every row in
row order.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from dkm._parallel import kernels
from dkm._parallel.kernels import LazyKernels, Tiles, fused_pass, jit_all
from dkm.kmeans._hamerly import (
    _SLACK,
    _error_eps,
    _exact_sq_py,
    _rounding_py,
    _unpack_motion,
)
from dkm.kmeans._hamerly import _kernels as _hamerly_kernels

# Rows handled at once: bounds the gathered copies of the rows each group computes.
_CHUNK_ROWS = 65536

# Groups per row: every group costs 4 bytes of bounds per row, kept on the workers. Eight
# already cut the distances computed ten-fold against Hamerly on MNIST patches at k = 4096
# (16 groups: another halving, for twice the memory).
MAX_GROUPS = 8
# Centres per group at the least: fewer, and a group's bound gains nothing on a row's own.
MIN_GROUP_SIZE = 16


def n_groups(k: int) -> int:
    """Centre groups for ``k`` centres: ``k / 16``, at least 1, at most :data:`MAX_GROUPS`."""
    return int(max(1, min(MAX_GROUPS, k // MIN_GROUP_SIZE)))


def group_centres(centers: np.ndarray, t: int) -> np.ndarray:
    """Group index of every centre: ``t`` groups of nearby centres (a short k-means).

    The groups only decide which rows the bounds keep, never a label, so a few iterations
    from a fixed seed are enough.
    """
    from sklearn.cluster import KMeans

    k = len(centers)
    if t <= 1 or k <= t:
        return np.zeros(k, dtype=np.int32) if t <= 1 else np.arange(k, dtype=np.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate centres: fewer distinct groups is fine
        fit = KMeans(t, n_init=1, max_iter=10, random_state=0).fit(centers)
    return fit.labels_.astype(np.int32)


def yinyang_step(block, packed: np.ndarray, prev, motion: np.ndarray, tiles: Tiles):
    """One pruned Lloyd step on a block with group bounds: labels, bounds, partial statistics.

    Takes and returns what :func:`dkm.kmeans._hamerly.hamerly_step` does, with these bounds:
    a previous step holding group bounds has them moved by ``motion`` and updated in place;
    any other (None, or a plain or Hamerly step) has every row computed, group by group, and
    the bounds set up. The state is ``(upper, lower, norms, groups)``: one lower bound per
    row and group (``lower`` is ``(n, t)``) and the centres' group indices. ``n_computed``
    counts the rows that computed any distance.
    """
    if not kernels.use_numba(tiles):
        return kernels.lloyd_step(block, packed, prev, tiles)  # see hamerly_step
    x = kernels.load(block)
    n, d = x.shape
    k = packed.shape[1]
    update = _unpack_motion(motion)
    centers = packed[:-1].T.astype(np.float64) * -0.5  # exact: -2 c was exact
    cnorm = np.sqrt((centers * centers).sum(axis=1)) * (1 + _SLACK)
    fresh = prev is None or update is None or not _holds_groups(prev[1])
    if fresh:
        groups = group_centres(centers, n_groups(k))
        t = int(groups.max()) + 1
        labels = np.full(n, -1, dtype=np.int32)
        # inf: a group the short k-means left empty bounds nothing.
        upper, lower = np.empty(n, np.float32), np.full((n, t), np.inf, np.float32)
        norms = np.empty(n, np.float32)
        _hamerly_kernels().norms(x, _SLACK, norms)
    else:
        labels = prev[0]
        upper, lower, norms, groups = prev[1]
        t = lower.shape[1]
    gmax = np.zeros(t)
    np.maximum.at(gmax, groups, cnorm)
    rounding = _Rounding(_error_eps(x.dtype, d), norms, cnorm, gmax, float(cnorm.max()))
    if fresh:  # every row, every group
        todo = np.arange(n, dtype=np.int32)
        opened = np.ones((n, t), dtype=np.bool_)
        own, floor = np.full(n, np.inf), np.full(n, np.inf)
        m = n
    else:
        gshift = np.zeros(t)
        np.maximum.at(gshift, groups, update["shift"])
        todo = np.empty(n, dtype=np.int32)
        opened = np.empty((n, t), dtype=np.bool_)
        own, floor = np.empty(n), np.empty(n)
        m = _kernels().scan(
            x, labels, upper, lower, update["shift"], gshift, groups, update["half_gap"],
            centers, *rounding, _SLACK, todo, opened, own, floor,
        )  # fmt: skip
    members = [np.flatnonzero(groups == g).astype(np.int32) for g in range(t)]
    group_packed = [np.ascontiguousarray(packed[:, cols]) for cols in members]
    moved = 0  # skipped rows cannot move
    for a in range(0, m, _CHUNK_ROWS):
        b = min(m, a + _CHUNK_ROWS)
        rows = _Rows(todo[a:b], opened[a:b], own[a:b], floor[a:b])
        moved += _assign_rows(x, rows, labels, upper, lower, groups, members, group_packed,
                              packed, rounding, tiles)  # fmt: skip
    sums = np.zeros((k, d), dtype=np.float64)
    _hamerly_kernels().accumulate(x, labels, sums)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    if fresh:  # no labels to move from, or a plain or Hamerly step's
        moved = n if prev is None else int(np.count_nonzero(labels != prev[0]))
    return labels, (upper, lower, norms, groups), (sums, counts, moved, m)


def _holds_groups(state) -> bool:
    return isinstance(state, tuple) and len(state) == 4


class _Rounding(NamedTuple):
    """What bounds the rounding of a row's expanded float distance to a centre:
    ``eps * (||x|| + ||c||)^2``, with ``||c||`` the centre's norm, its group's largest or
    the largest of all (see :func:`dkm.kmeans._hamerly._error_eps`)."""

    eps: float
    norms: np.ndarray  # per row, rounded up
    cnorm: np.ndarray  # per centre, rounded up
    gmax: np.ndarray  # per group: its largest centre norm
    cmax: float


class _Rows(NamedTuple):
    """Rows the bounds could not keep, with what the scan found for each."""

    index: np.ndarray  # their positions in the block
    opened: np.ndarray  # (m, t): the groups whose centres each must compute
    own: np.ndarray  # exact squared distance to the current centre (inf: none yet)
    floor: np.ndarray  # least of the shut groups' margins (inf: none)


def _assign_rows(x, rows, labels, upper, lower, groups, members, group_packed, packed,
                 rounding, tiles):  # fmt: skip
    """Nearest centre of ``rows`` from their opened groups; rows in a close race in full.
    Returns how many rows changed centre."""
    kern = _kernels()
    m = len(rows.index)
    race = _Race(np.empty(m), np.empty(m), np.empty(m, np.int32), np.empty(m, np.int32),
                 np.empty(m), np.empty(m))  # fmt: skip
    kern.start(rows.index, labels, groups, rows.opened, rows.own, *rounding, *race)
    for g, cols in enumerate(members):
        pos = np.flatnonzero(rows.opened[:, g]).astype(np.int32)
        if len(pos) == 0 or len(cols) == 0:
            continue
        lab = np.empty(len(pos), dtype=np.int32)
        d2 = np.empty(len(pos), dtype=x.dtype)
        second = np.empty(len(pos), dtype=x.dtype)
        fused_pass(_take(x, rows.index[pos]), group_packed[g], tiles, lab, d2=d2, second=second)
        kern.merge(pos, rows.index, g, cols, lab, d2, second, *rounding, _SLACK, *race, lower)
    close = np.empty(m, dtype=np.int32)
    c, moved = kern.finish(rows.index, labels, upper, lower, groups, rows.opened, rows.own,
                           rows.floor, *rounding, _SLACK, *race, close)  # fmt: skip
    if c:
        full = rows.index[close[:c]]
        lab = np.empty(c, dtype=np.int32)
        d2 = np.empty(c, dtype=x.dtype)
        second = np.empty(c, dtype=x.dtype)
        fused_pass(x[full], packed, tiles, lab, d2=d2, second=second)
        moved += kern.set_full(full, lab, d2, second, *rounding, _SLACK, labels, upper, lower)
    return moved


def _take(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``x[index]``, without the copy when the rows are consecutive (a first pass)."""
    if len(index) and index[-1] - index[0] == len(index) - 1:
        return x[index[0] : index[0] + len(index)]
    return x[index]


class _Race(NamedTuple):
    """Per row of :func:`_assign_rows`: the nearest candidate so far and the race's margin."""

    best: np.ndarray  # its float squared distance (or the exact one, for the own centre)
    best_err: np.ndarray  # the rounding bound of that distance (0: exact)
    best_j: np.ndarray  # its centre (-1: none yet)
    best_g: np.ndarray  # its group (-1: the own centre, from a shut group)
    best_second: np.ndarray  # the second nearest in its group
    rest: np.ndarray  # least lower bound on the others, less their own rounding bound


# ----------------------------------------------------------------------------- kernels
# Bounds are true (Euclidean) distances, rounded outwards by ``slack`` when stored in float32.
# A float distance v to centre j is within b_j = eps (||x|| + ||c_j||)^2 of the true one, and
# the plain loop's is too, so it picks a centre j* over every other j when
# true_j - true_j* > b_j + b_j*: each candidate enters the race as ``lower bound - b_j``, and
# the nearest wins when that "rest" exceeds its own upper bound + its b_j*.


def _scan_py(  # pragma: no cover - numba
    x, labels, upper, lower, shift, gshift, groups, half_gap, c,
    eps, norms, cnorm, gmax, cmax, slack, todo, opened, own, floor,
):  # fmt: skip
    n = x.shape[0]
    t = lower.shape[1]
    m = 0
    for i in range(n):
        a = labels[i]
        nx = float(norms[i])
        ba = _rounding(eps, nx, cnorm[a])
        u = (float(upper[i]) + shift[a]) * (1 + slack)
        shut = True
        for g in range(t):
            lo = max(float(lower[i, g]) - gshift[g], 0.0) * (1 - slack)
            lower[i, g] = lo
            lo = float(lower[i, g])
            shut = shut and lo * lo - _rounding(eps, nx, gmax[g]) > u * u + ba
        s = half_gap[a]
        upper[i] = u
        if shut or s * s - _rounding(eps, nx, cmax) > u * u + ba:
            continue
        # Tighten the upper bound to the exact distance to the row's centre.
        e = _exact_sq(x, i, c, a)
        u = np.sqrt(e) * (1 + slack)
        upper[i] = u
        if s * s - _rounding(eps, nx, cmax) > u * u + ba:
            continue
        fl = np.inf
        for g in range(t):
            lo = float(lower[i, g])
            margin = lo * lo - _rounding(eps, nx, gmax[g])
            opened[m, g] = not margin > u * u + ba
            if not opened[m, g]:
                fl = min(fl, margin)
        if _all_shut(opened, m, t):
            continue
        todo[m] = i
        own[m] = e
        floor[m] = fl
        m += 1
    return m


def _all_shut_py(opened, m, t):  # pragma: no cover - numba
    for g in range(t):
        if opened[m, g]:
            return False
    return True


def _start_py(  # pragma: no cover - numba
    rows, labels, groups, opened, own, eps, norms, cnorm, gmax, cmax,
    best, best_err, best_j, best_g, best_second, rest,
):  # fmt: skip
    # A row whose own centre's group stays shut starts from that centre's exact distance.
    for p in range(len(rows)):
        a = labels[rows[p]]
        rest[p] = np.inf
        best_g[p] = -1
        if a >= 0 and not opened[p, groups[a]]:
            best[p] = own[p]
            best_err[p] = _rounding(eps, float(norms[rows[p]]), cnorm[a])
            best_j[p] = a
        else:
            best[p] = np.inf
            best_err[p] = 0.0
            best_j[p] = -1


def _merge_py(  # pragma: no cover - numba
    pos, rows, g, cols, lab, d2, second, eps, norms, cnorm, gmax, cmax, slack,
    best, best_err, best_j, best_g, best_second, rest, lower,
):  # fmt: skip
    for q in range(len(pos)):
        p = pos[q]
        i = rows[p]
        nx = float(norms[i])
        v1, v2 = float(d2[q]), float(second[q])
        j = cols[lab[q]]
        b1, bg = _rounding(eps, nx, cnorm[j]), _rounding(eps, nx, gmax[g])
        # This group's bound: its nearest centre, unless that becomes the row's own.
        lower[i, g] = np.sqrt(max(v1 - bg, 0.0)) * (1 - slack)
        if v1 < best[p]:
            if best_j[p] >= 0:  # the one it displaces joins the others
                twice = 2.0 if best_g[p] >= 0 else 1.0  # 1: an exact distance
                rest[p] = min(rest[p], best[p] - twice * best_err[p])
            rest[p] = min(rest[p], v2 - 2.0 * bg)
            best[p], best_err[p], best_j[p], best_g[p] = v1, b1, j, g
            best_second[p] = v2
        else:
            rest[p] = min(rest[p], v1 - 2.0 * b1)


def _finish_py(  # pragma: no cover - numba
    rows, labels, upper, lower, groups, opened, own, floor, eps, norms, cnorm, gmax, cmax,
    slack, best, best_err, best_j, best_g, best_second, rest, close,
):  # fmt: skip
    c = moved = 0
    for p in range(len(rows)):
        i = rows[p]
        exact = best_g[p] < 0  # the own centre, exactly, from a shut group
        top = best[p] if exact else best[p] + best_err[p]
        if not (best_j[p] >= 0 and min(rest[p], floor[p]) > top + best_err[p]):
            close[c] = p
            c += 1
            continue
        a = labels[i]
        j = best_j[p]
        labels[i] = j
        moved += a != j
        upper[i] = np.sqrt(top) * (1 + slack)
        if not exact:
            g = best_g[p]
            bg = _rounding(eps, float(norms[i]), gmax[g])
            lower[i, g] = np.sqrt(max(best_second[p] - bg, 0.0)) * (1 - slack)
            if a >= 0 and a != j and not opened[p, groups[a]]:
                # The old centre is now among its shut group's others.
                ga = groups[a]
                lower[i, ga] = min(float(lower[i, ga]), np.sqrt(own[p]) * (1 - slack))
    return c, moved


def _set_full_py(  # pragma: no cover - numba
    full, lab, d2, second, eps, norms, cnorm, gmax, cmax, slack, labels, upper, lower,
):  # fmt: skip
    # Every other centre is at least the second nearest away: one bound for all groups.
    t = lower.shape[1]
    moved = 0
    for q in range(len(full)):
        i = full[q]
        b = _rounding(eps, float(norms[i]), cmax)
        moved += labels[i] != lab[q]
        labels[i] = lab[q]
        upper[i] = np.sqrt(float(d2[q]) + b) * (1 + slack)
        lo = np.sqrt(max(float(second[q]) - b, 0.0)) * (1 - slack)
        for g in range(t):
            lower[i, g] = lo
    return moved


# The kernels call these names; _build binds them to compiled functions first.
_rounding = _rounding_py
_all_shut = _all_shut_py
_exact_sq = _exact_sq_py


def _build():
    global _rounding, _all_shut, _exact_sq
    _all_shut = jit_all(_all_shut_py).all_shut
    _rounding, _exact_sq = _hamerly_kernels().rounding, _hamerly_kernels().exact_sq
    return jit_all(_scan_py, _start_py, _merge_py, _finish_py, _set_full_py)


_kernels = LazyKernels(_build)
