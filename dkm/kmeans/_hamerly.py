"""Pruned Lloyd (Hamerly's bounds) that gives exactly Lloyd's labels and centres.

Each row keeps, between iterations and on the worker that holds its block, an upper bound
``u`` on the distance to its centre and a lower bound ``l`` on the distance to every other
centre. When the centres move by ``delta``, ``u + delta[a]`` and ``l - max(delta)`` are
still bounds, and a row whose upper bound is below ``max(l, s[a])`` (``s[a]`` half the
distance from its centre to the nearest other one) cannot change centre: no distance is
computed for it. Only the other rows go through the fused distance kernel.

"Exactly Lloyd's" is meant to the last bit: the plain loop picks the argmin of *float*
distances in expanded form, which can differ from the true nearest centre when two centres
are nearly equally far. A row is therefore skipped only when the squared-distance gap
exceeds the rounding error bounds of that expanded form for its centre and the others
(``(d + 2) eps (||x|| + ||c||)^2``, with the centre's own norm, or the largest); the rows
that are recomputed go through the same kernel as the plain loop; and the per-cluster sums
add every row in row order, as the plain loop does. A test pins the equality of labels and
centres at every iteration.
"""

from __future__ import annotations

import numpy as np

from dkm._parallel.kernels import (
    LazyKernels,
    Tiles,
    fused_pass,
    jit_all,
    lloyd_step,
    load,
    use_numba,
)

# Rows recomputed per gather: bounds the copy of the rows the bounds could not keep.
_RECOMPUTE_ROWS = 65536

# Relative slack on stored bounds: they are kept in float32 (4 bytes per row each), rounded
# outwards by more than float32's half ulp.
_SLACK = 1e-6


def centre_motion(
    previous: np.ndarray | None, centers: np.ndarray, half_gaps: bool = True
) -> np.ndarray:
    """What every block needs to update its bounds from ``previous`` to ``centers``.

    One float64 array (so that it is shipped to the workers once, like the centres): rows
    ``shift`` (how far each centre moved, rounded up; NaN before the first iteration, when
    there are no bounds yet) and ``half_gap`` (half the distance from each centre to its
    nearest other centre, rounded down; zeros without ``half_gaps`` or when k is large,
    where the k x k distances would cost more than they save), then one row holding the
    largest centre norm. Read with :func:`_unpack_motion`.
    """
    c = np.asarray(centers, dtype=np.float64)
    k = len(c)
    out = np.zeros((3, k))
    out[0] = np.nan
    if previous is not None:
        shift = np.sqrt(((c - np.asarray(previous, dtype=np.float64)) ** 2).sum(axis=1))
        out[0] = shift * (1 + _SLACK)
    out[1] = _half_gaps(c) if half_gaps and 1 < k <= 4096 else 0.0
    out[2] = float(np.sqrt((c * c).sum(axis=1).max())) * (1 + _SLACK)
    return out


def motion_since(
    previous: np.ndarray | None, prev_steps: list, centers: np.ndarray, assignment: str
) -> np.ndarray:
    """:func:`centre_motion` for a pruned pass after ``prev_steps``: from ``previous`` (their
    centres) when some block has a step to move bounds from, else as a first pass.

    Only Hamerly's pass reads the half gaps: Yinyang's group bounds do their work, and at
    k = 4096 they cost 36 ms of the client's time per iteration.
    """
    had = previous is not None and any(p is not None for p in prev_steps)
    return centre_motion(previous if had else None, centers, half_gaps=assignment == "hamerly")


def _unpack_motion(motion: np.ndarray) -> dict | None:
    """The bound updates of :func:`centre_motion`: None when it has no shifts.

    ``first``/``second`` are the two largest shifts and ``argfirst`` the centre that moved
    most: a row of that centre loses only the second largest from its lower bound.
    """
    shift = motion[0]
    if np.isnan(shift[0]):
        return None
    order = np.argsort(-shift, kind="stable")
    return {
        "shift": shift,
        "argfirst": int(order[0]),
        "first": float(shift[order[0]]),
        "second": float(shift[order[1]]) if len(shift) > 1 else 0.0,
        "half_gap": motion[1],
        "cmax": float(motion[2, 0]),
    }


def _half_gaps(c: np.ndarray) -> np.ndarray:
    """Half the distance from each centre to its nearest other one, rounded down."""
    k = len(c)
    sq = (c * c).sum(axis=1)
    out = np.empty(k)
    step = max(1, 2**21 // k)  # about 16 MB of float64 products at a time
    buf = np.empty(min(step, k) * k)
    for a in range(0, k, step):
        m = min(step, k - a)
        # One GEMM, then one compiled pass over it (numpy's temporaries made this pass
        # 100 ms at k = 4096, on the client, every iteration).
        products = np.matmul(c[a : a + m], c.T, out=buf[: m * k].reshape(m, k))
        _kernels().nearest_other(products, sq, a, out)
    # The expanded form cancels: take off a margin of its float64 rounding error.
    out = np.maximum(out - 1e-12 * (sq + sq.max()), 0)
    return 0.5 * np.sqrt(out) * (1 - _SLACK)


def _nearest_other_py(products, sq, a, out):  # pragma: no cover - numba
    m, k = products.shape
    for r in range(m):
        i = a + r
        best = np.inf
        for j in range(k):
            v = sq[i] + sq[j] - 2.0 * products[r, j]
            if j != i and v < best:
                best = v
        out[i] = best


def _error_eps(dtype: np.dtype, d: int) -> float:
    """Factor of ``(||x|| + max ||c||)^2`` that bounds the expanded distance's rounding."""
    return (d + 2) * float(np.finfo(dtype).eps)


def hamerly_step(block, packed: np.ndarray, prev, motion: dict, tiles: Tiles):
    """One pruned Lloyd step on a block: labels, bounds and the partial statistics.

    Parameters
    ----------
    block : array or ZarrRows
        The block's rows (centered).
    packed : ndarray (d + 1, k)
        :func:`dkm._parallel.kernels.pack_centers` of the current centres.
    prev : tuple or None
        This block's previous step ``(labels, (upper, lower, norms), stats)``, or None (every
        row is computed, and bounds are set up). Its arrays are updated in place and
        returned: they are the block's state, which only the next step reads.
    motion : ndarray
        :func:`centre_motion` from the previous centres to the current ones.
    tiles : Tiles
        Kernel tile sizes.

    Returns
    -------
    (labels, (upper, lower, norms), (sums, counts, n_moved, n_computed))
        Like :func:`dkm._parallel.kernels.lloyd_step`, with the bounds (and the row norms
        their rounding margins need) in place of the squared distances.
    """
    if not use_numba(tiles):
        # A worker too small for numba's compiler: the plain step, in numpy (the bounds
        # would cost more in numpy than they save).
        return lloyd_step(block, packed, prev, tiles)
    x = load(block)
    n, d = x.shape
    k = packed.shape[1]
    eps = _error_eps(x.dtype, d)
    sums = np.zeros((k, d), dtype=np.float64)
    cmax = float(motion[2, 0])
    update = _unpack_motion(motion)
    centers = packed[:-1].T.astype(np.float64) * -0.5  # exact: -2 c was exact
    cnorm = np.sqrt((centers * centers).sum(axis=1)) * (1 + _SLACK)
    if prev is None or update is None or not _holds_bounds(prev[1]):
        labels = np.empty(n, dtype=np.int32)
        d2 = np.empty(n, dtype=x.dtype)
        second = np.empty(n, dtype=x.dtype)
        fused_pass(x, packed, tiles, labels, d2=d2, second=second, sums=sums)
        upper, lower = np.empty(n, np.float32), np.empty(n, np.float32)
        norms = np.empty(n, np.float32)
        _kernels().norms(x, _SLACK, norms)
        _kernels().bounds(norms, labels, d2, second, eps, cnorm, cmax, _SLACK, upper, lower)
        counts = np.bincount(labels, minlength=k).astype(np.int64)
        moved = n if prev is None else int(np.count_nonzero(labels != prev[0]))
        return labels, (upper, lower, norms), (sums, counts, moved, n)

    # The previous step's arrays are this block's state and nothing else reads them once
    # this step runs: they are updated in place, so the state costs 16 bytes per row, not
    # twice that while a step runs.
    labels = prev[0]
    upper, lower, norms = prev[1]
    todo = np.empty(n, dtype=np.int32)
    m = _kernels().scan(
        x,
        norms,
        labels,
        upper,
        lower,
        update["shift"],
        update["argfirst"],
        update["first"],
        update["second"],
        update["half_gap"],
        cnorm,
        cmax,
        eps,
        _SLACK,
        centers,
        todo,
    )
    moved = 0
    for a in range(0, m, _RECOMPUTE_ROWS):
        rows = todo[a : min(m, a + _RECOMPUTE_ROWS)]
        xs = x[rows]
        lab = np.empty(len(rows), dtype=np.int32)
        d2 = np.empty(len(rows), dtype=x.dtype)
        second = np.empty(len(rows), dtype=x.dtype)
        fused_pass(xs, packed, tiles, lab, d2=d2, second=second)
        moved += int(np.count_nonzero(lab != labels[rows]))  # skipped rows cannot move
        labels[rows] = lab
        up, lo = np.empty(len(rows), np.float32), np.empty(len(rows), np.float32)
        _kernels().bounds(norms[rows], lab, d2, second, eps, cnorm, cmax, _SLACK, up, lo)
        upper[rows], lower[rows] = up, lo
    _kernels().accumulate(x, labels, sums)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    return labels, (upper, lower, norms), (sums, counts, moved, m)


def _holds_bounds(state) -> bool:
    """Whether a step's state is this pass's (a plain step keeps distances, a Yinyang step
    one bound per group)."""
    return isinstance(state, tuple) and len(state) == 3


def _norms_py(x, slack, norms):  # pragma: no cover - numba
    n, d = x.shape
    for i in range(n):
        q = 0.0
        for f in range(d):
            q += float(x[i, f]) * float(x[i, f])
        norms[i] = np.sqrt(q) * (1 + slack)


def _bounds_py(  # pragma: no cover - numba
    norms, labels, d2, second, eps, cnorm, cmax, slack, upper, lower
):
    # A float squared distance to centre j is within eps (||x|| + ||c_j||)^2 of the true one;
    # the second nearest's centre is unknown: the largest norm bounds it.
    for i in range(len(norms)):
        own = _rounding(eps, norms[i], cnorm[labels[i]])
        other = _rounding(eps, norms[i], cmax)
        upper[i] = np.sqrt(float(d2[i]) + own) * (1 + slack)
        lower[i] = np.sqrt(max(float(second[i]) - other, 0.0)) * (1 - slack)


def _scan_py(  # pragma: no cover - numba
    x,
    norms,
    labels,
    upper,
    lower,
    shift,
    argfirst,
    first,
    second,
    half_gap,
    cnorm,
    cmax,
    eps,
    slack,
    c,
    todo,
):
    # The plain pass picks the row's centre a over every other j when the true squared
    # distances differ by more than the two float distances' rounding bounds.
    n = x.shape[0]
    m = 0
    for i in range(n):
        a = labels[i]
        u = (float(upper[i]) + shift[a]) * (1 + slack)
        lo = float(lower[i]) - (second if a == argfirst else first)
        lo = max(lo, 0.0) * (1 - slack)
        z = max(lo, half_gap[a])
        lower[i] = lo
        upper[i] = u
        if u >= z:
            todo[m] = i
            m += 1
            continue
        err = _rounding(eps, norms[i], cmax) + _rounding(eps, norms[i], cnorm[a])
        if (z - u) * (z + u) > err:
            continue
        # Tighten the upper bound to the exact distance to the row's centre.
        u = np.sqrt(_exact_sq(x, i, c, a)) * (1 + slack)
        upper[i] = u
        if u < z and (z - u) * (z + u) > err:
            continue
        todo[m] = i
        m += 1
    return m


def _rounding_py(eps, norm_x, norm_c):  # pragma: no cover - numba
    """Bound on the rounding of a row's expanded float squared distance to a centre (``eps``
    from :func:`_error_eps`, the row's norm and the centre's, or a larger one)."""
    return eps * (float(norm_x) + norm_c) ** 2


def _exact_sq_py(x, i, c, a):  # pragma: no cover - numba
    """Squared distance from row ``i`` to centre ``a``, in float64 (not the expanded form)."""
    e = 0.0
    for f in range(x.shape[1]):
        t = float(x[i, f]) - c[a, f]
        e += t * t
    return e


# The kernels call these names; _build binds them to the compiled functions first.
_rounding = _rounding_py
_exact_sq = _exact_sq_py


def _accumulate_py(x, labels, sums):  # pragma: no cover - numba
    n, d = x.shape
    for i in range(n):
        lab = labels[i]
        for f in range(d):
            sums[lab, f] += x[i, f]


def _build():
    global _rounding, _exact_sq
    helpers = jit_all(_rounding_py, _exact_sq_py)
    _rounding, _exact_sq = helpers.rounding, helpers.exact_sq
    kernels = jit_all(_norms_py, _bounds_py, _scan_py, _accumulate_py, _nearest_other_py)
    kernels.rounding, kernels.exact_sq = _rounding, _exact_sq
    return kernels


_kernels = LazyKernels(_build)
