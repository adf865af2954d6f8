"""Initial centroids: "random", "uniform", "sample", "k-means++", "k-means||" or a user array.

All methods work on :class:`dkm._parallel.blocks.Blocks` after the statistics pass
(:func:`dkm._parallel.blocks.compute_stats`), which already gives per-feature ranges and a
uniformly random first row, so "random", "uniform" and the first k-means|| centre cost no
extra pass. "random" draws each feature in that feature's own [min, max] (the data's bounding
box); "uniform" draws every coordinate in one scalar range ``[lo, hi]`` (the estimator's
``init_range``, by default the data's global [min, max]: :func:`data_range`), the
"independent uniform random vectors" of the classic k-means studies.
:func:`initialize` is the one entry point both estimators use; :func:`init_on_rows` runs the
in-memory methods on rows already gathered (mini-batch's ``init_size`` subset).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import warnings
from typing import Any

import numpy as np

from dkm._parallel import kernels
from dkm._parallel.backend import get_backend
from dkm._parallel.blocks import (
    Blocks,
    as_source,
    center,
    center_stats,
    compute_stats,
    load_blocks,
)
from dkm._parallel.kernels import Tiles
from dkm._parallel.keys import Keys
from dkm.kmeans import _kernels

__all__ = [
    "INIT_METHODS",
    "check_init_array",
    "data_range",
    "init_on_rows",
    "initialize",
    "kmeans_parallel",
    "kmeans_parallel_init",
    "recluster",
    "uniform_vectors",
    "weighted_kmeans_pp",
]

log = logging.getLogger("dkm")

INIT_METHODS = ("k-means||", "k-means++", "random", "sample", "uniform")

# k-means|| candidates per round, in units of k (see kmeans_parallel_init).
DEFAULT_OVERSAMPLING = 0.5


def check_init_array(init: Any, n_clusters: int, n_features: int) -> np.ndarray:
    """An explicit initial centroid array as float64, after shape and finiteness checks."""
    arr = np.asarray(init, dtype=np.float64)
    if arr.shape != (n_clusters, n_features):
        raise ValueError(
            f"init array has shape {arr.shape}; expected (n_clusters, n_features) = "
            f"({n_clusters}, {n_features})"
        )
    if not np.isfinite(arr).all():
        raise ValueError("init array contains NaN or infinity")
    return arr


def _uniform_in_box(lo: np.ndarray, hi: np.ndarray, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return lo + rng.random((k, len(lo))) * (hi - lo)


def data_range(blocks: Blocks) -> tuple[float, float]:
    """The data's global ``(min, max)`` over all features, in the data's own coordinates.

    From the per-feature minima and maxima of the statistics pass: no pass of its own. Once
    the blocks are centered the statistics describe the centered rows, so the shift is
    added back (exact for float32 data; the estimators read the range before centering).
    """
    lo = np.asarray(blocks.stats["min"], dtype=np.float64)
    hi = np.asarray(blocks.stats["max"], dtype=np.float64)
    if blocks.shift is not None:
        shift = blocks.shift.astype(np.float64)
        lo, hi = lo + shift, hi + shift
    return float(lo.min()), float(hi.max())


def uniform_vectors(
    k: int,
    d: int,
    value_range: tuple[float, float],
    seed,
    shift: np.ndarray | None = None,
) -> np.ndarray:
    """``k`` vectors whose ``d`` coordinates are independent and uniform in ``[lo, hi]``.

    The one draw behind ``init="uniform"`` and the "random-vector" empty-cluster policy:
    ``numpy.random.default_rng(seed).uniform(lo, hi, size=(k, d))``, in data coordinates,
    then moved into the fit's centered coordinates by subtracting ``shift``.

    Parameters
    ----------
    k, d : int
        Number of vectors and their length.
    value_range : (float, float)
        ``(lo, hi)`` in the data's coordinates.
    seed : int or sequence of int
        Anything :func:`numpy.random.default_rng` takes (the start's seed; ``[seed,
        iteration]`` for the empty-cluster resets).
    shift : ndarray (d,), optional
        The mean the blocks were centered on (``Blocks.shift``).

    Returns
    -------
    ndarray (k, d), float64
    """
    lo, hi = value_range
    vectors = np.random.default_rng(seed).uniform(lo, hi, size=(k, d))
    if shift is not None:
        vectors -= np.asarray(shift, dtype=np.float64)
    return vectors


def sample_init(blocks: Blocks, k: int, seed: int, name: str) -> np.ndarray:
    """k distinct random rows of the data (reads only the blocks holding them)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(blocks.n, size=k, replace=False))
    out = blocks.take(rows, name=name)
    return out[rng.permutation(k)]


def init_on_rows(
    x: np.ndarray,
    method: str,
    k: int,
    seed: int,
    *,
    value_range: tuple[float, float] | None = None,
    shift: np.ndarray | None = None,
) -> np.ndarray:
    """Initial centres from rows already in this process ("k-means++", "random", "sample",
    "uniform").

    Parameters
    ----------
    x : ndarray (n, d)
        Rows (in the coordinates the fit runs in), ``n >= k``.
    method : str
        "k-means++" (scikit-learn's greedy k-means++), "random" (uniform in the rows'
        bounding box), "sample" (distinct random rows) or "uniform" (every coordinate
        uniform in ``value_range``; the rows only give ``d``).
    k, seed : int
        Number of centres and seed.
    value_range : (float, float), optional
        ``(lo, hi)`` in data coordinates; required by "uniform".
    shift : ndarray (d,), optional
        The mean the rows were centered on ("uniform" draws in data coordinates).
    """
    if method == "k-means++":
        from sklearn.cluster import kmeans_plusplus

        centers, _ = kmeans_plusplus(x, k, random_state=seed % (2**32))
        return centers.astype(np.float64)
    if method == "random":
        return _uniform_in_box(x.min(0).astype(np.float64), x.max(0).astype(np.float64), k, seed)
    if method == "sample":
        pick = np.random.default_rng(seed).choice(len(x), k, replace=False)
        return x[pick].astype(np.float64)
    if method == "uniform":
        if value_range is None:
            raise ValueError("init_on_rows: 'uniform' needs value_range")
        return uniform_vectors(k, x.shape[1], value_range, seed, shift)
    raise ValueError(f"init_on_rows: unknown method {method!r}")


def _plusplus_on_blocks(
    blocks: Blocks, k: int, seed: int, init_size: int | None, name: str
) -> np.ndarray:
    """k-means++ on ``init_size`` random rows (all rows when None) gathered to this process.

    k-means++ is sequential (k passes), so it runs here; use "k-means||" for data that
    should not leave the cluster.
    """
    if init_size is None or init_size >= blocks.n:
        rows = np.arange(blocks.n)
    else:
        rows = np.sort(np.random.default_rng(seed).choice(blocks.n, init_size, replace=False))
        if len(rows) < k:
            raise ValueError(f"init_size={init_size} is smaller than n_clusters={k}")
    x = blocks.take(rows, name=name).astype(blocks.dtype)
    return init_on_rows(x, "k-means++", k, seed)


def initialize(
    blocks: Blocks,
    method: str | np.ndarray,
    k: int,
    seed: int,
    keys: Keys,
    *,
    center_blocks: bool = False,
    init_size: int | None = None,
    oversampling_factor: float = DEFAULT_OVERSAMPLING,
    rounds: int | None = None,
    value_range: tuple[float, float] | None = None,
) -> tuple[np.ndarray, dict]:
    """Initial centres of one start, in the blocks' (centered) coordinates.

    Parameters
    ----------
    blocks : Blocks
        Data after the statistics pass.
    method : str or ndarray
        One of :data:`INIT_METHODS`, or explicit centres ``(k, d)`` in data coordinates.
    k, seed : int
        Number of centres and the start's seed.
    keys : Keys
        Task key maker.
    center_blocks : bool
        Center the blocks on the data mean first (the first start of a fit). k-means|| does
        it inside its first round, without a separate pass.
    init_size : int, optional
        Rows gathered for "k-means++" (default: all).
    oversampling_factor, rounds
        k-means|| candidates per round (in units of k) and number of rounds (default 5).
    value_range : (float, float), optional
        ``(lo, hi)`` of "uniform", in data coordinates (default: :func:`data_range`).

    Returns
    -------
    centers : ndarray (k, d), float64
    info : dict
        JSON-able details (passes over the data; rounds and candidates for k-means||).
    """
    if isinstance(method, str) and method == "k-means||":
        return kmeans_parallel_init(
            blocks,
            k,
            seed,
            oversampling_factor=oversampling_factor,
            max_iter=rounds,
            keys=keys,
            center=center_blocks,
        )
    if center_blocks:
        center(blocks, keys)
    if not isinstance(method, str):
        # Centered like the data, in the working dtype (as scikit-learn does).
        return check_init_array(method, k, blocks.d).astype(blocks.dtype) - blocks.shift, {
            "passes": 0
        }
    if method == "k-means++":
        name = keys("kmeans++", "gather")
        return _plusplus_on_blocks(blocks, k, seed, init_size, name), {"passes": 1}
    if method == "sample":
        return sample_init(blocks, k, seed, name=keys("sample-init", "gather")), {"passes": 0}
    if method == "random":
        # Uniform in the data's per-feature [min, max] box: no pass, the stats have it.
        return _uniform_in_box(blocks.stats["min"], blocks.stats["max"], k, seed), {"passes": 0}
    if method == "uniform":
        # One scalar range for every coordinate, in data coordinates: no pass either.
        value_range = data_range(blocks) if value_range is None else value_range
        centers = uniform_vectors(k, blocks.d, value_range, seed, blocks.shift)
        return centers, {"passes": 0, "range": [float(v) for v in value_range]}
    raise ValueError(f"init must be one of {INIT_METHODS} or an array, got {method!r}")


def kmeans_parallel_init(
    blocks: Blocks,
    k: int,
    seed: int,
    oversampling_factor: float = DEFAULT_OVERSAMPLING,
    max_iter: int | None = None,
    keys: Keys | None = None,
    center: bool = False,
) -> tuple[np.ndarray, dict]:
    """k-means|| (Bahmani et al. 2012) with ``ell = oversampling_factor * k``.

    Passes over the data: the statistics pass (already done; it picks the first centre
    uniformly at random), one pass per round, and one pass that weights the candidates by
    the number of rows nearest to them. Each row's nearest candidate so far and its squared
    distance stay on the workers between passes, so every pass measures only the candidates
    added by the previous round (a pass over all the candidates would cost as much as all the
    rounds together). With ``center=True`` the first round also centers the blocks on the
    data mean.

    The passes cost about ``rounds * oversampling_factor`` Lloyd iterations (a distance
    from every row to every candidate), which is why the default factor is 0.5, not the
    2 of the paper: the weights pass also sums the rows of each candidate's cell, and the
    candidates are reclustered (:func:`recluster`, in this process) as those cell means.
    The means summarise the data far better than the sampled rows, so a quarter of the
    candidates give an initialisation as good. Measured on the 180k mnist-5k 5x5
    patches, k = 4096: factor 2 (39k candidates, reclustered as rows) initial inertia
    11134; factor 0.5 (9.9k candidates) 13452 as rows, 11488 as cell means; scikit-learn's
    k-means++ 13790.

    Returns the centres and a dict with ``rounds``, ``n_candidates``, ``passes``,
    ``phi`` (cost after each round) and ``recluster_seconds``.
    """
    keys = keys or Keys.new()
    tiles = Tiles.from_config()
    be = blocks.backend
    nb = blocks.nblocks
    shift = center_stats(blocks) if center else None
    rounds = 5 if max_iter is None else int(max_iter)
    ell = float(oversampling_factor) * k
    cands = [np.asarray(blocks.stats["first_row"], dtype=np.float64)[None, :]]
    new, offset = cands[0], 0
    state = [None] * nb
    phis = []
    passes = 1  # the statistics pass
    for r in range(1, rounds + 1):
        packed = be.share(kernels.pack_centers(new, blocks.dtype))
        steps = be.map(
            _kernels.parallel_round,
            blocks.handles,
            state,
            [packed] * nb,
            [offset] * nb,
            [seed] * nb,
            [r] * nb,
            blocks.starts.tolist(),
            [ell] * nb,
            [tiles] * nb,
            [shift if r == 1 else None] * nb,
            name=keys("kmeans||", "round", r=r),
        )
        if shift is not None and r == 1:
            blocks.handles = (
                be.map(_kernels.round_block, steps, name=keys("kmeans||", "center"))
                if be.is_distributed
                else [s[2] for s in be.gather(steps)]
            )
        state = be.map(_kernels.round_state, steps, name=keys("kmeans||", "nearest", r=r))
        results = be.gather(
            be.map(_kernels.round_result, steps, name=keys("kmeans||", "select", r=r))
        )
        del steps
        passes += 1
        offset += len(new)
        new = np.empty((0, blocks.d))
        phi = sum(res[0] for res in results)
        phis.append(phi)
        if phi <= 0:
            break
        rows = [res[3][res[1] > phi] for res in results]
        new = np.concatenate(rows, axis=0).astype(np.float64)
        log.debug("k-means|| round %d: phi=%.6g, %d new candidates", r, phi, len(new))
        if len(new):
            cands.append(new)
        if r == rounds:
            break
    cand = np.concatenate(cands, axis=0)
    weights, means = _candidate_weights(blocks, state, new, offset, len(cand), tiles, keys)
    del state
    passes += 1
    keep = weights > 0
    cand, weights = cand[keep], weights[keep]
    if means is not None:
        # Each candidate stands for the rows of its cell: their mean is where they are.
        cand = means[keep] / weights[:, None]
    info = {"rounds": len(phis), "n_candidates": len(cand), "passes": passes, "phi": phis}
    if len(cand) < k:
        warnings.warn(
            f"k-means|| found only {len(cand)} distinct candidates for {k} clusters; "
            "filling with random rows",
            RuntimeWarning,
            stacklevel=2,
        )
        extra = sample_init(blocks, k - len(cand), seed + 1, name=keys("kmeans||", "fill"))
        return np.concatenate([cand, extra], axis=0), info
    t0 = time.perf_counter()
    # A Lloyd iteration on the candidates costs (candidates / rows) of one over the data:
    # at most as many as add up to one pass (when k approaches the distinct rows, the
    # candidates are nearly all of them and the fit's own iterations do the rest).
    iters = min(5, max(1, blocks.n // len(cand)))
    centers = cand if len(cand) == k else recluster(cand, weights, k, seed, blocks.dtype, iters)
    info["recluster_seconds"] = round(time.perf_counter() - t0, 4)
    return centers, info


# Largest per-block array of cell sums (candidates x features, float64) the weights pass
# returns; past it (wide rows and many candidates) the candidates are reclustered as they
# are, without their cell means. A tree reduction holds split-every (8) of them at once, so
# this keeps a combine task within about 128 MiB (k = 4096 on 25 features: 2 MiB).
_MEANS_MAX_BYTES = 16 * 2**20


def _candidate_weights(blocks, state, last, offset, n_cand, tiles, keys):
    """The weights pass: rows nearest to each candidate and, while small, their sums.

    Returns ``(counts (n_cand,) float64, sums (n_cand, d) float64 or None)``.
    """
    be, nb = blocks.backend, blocks.nblocks
    with_sums = n_cand * blocks.d * 8 <= _MEANS_MAX_BYTES
    packed = be.share(kernels.pack_centers(last, blocks.dtype))
    parts = be.map(
        _kernels.candidate_weights,
        blocks.handles,
        state,
        [packed] * nb,
        [offset] * nb,
        [n_cand] * nb,
        [tiles] * nb,
        [with_sums] * nb,
        name=keys("kmeans||", "weights"),
    )
    nbytes = 8 * n_cand * (1 + (blocks.d if with_sums else 0))
    counts, sums = be.reduce(
        parts, _kernels.add_weights, name=keys("kmeans||", "reduce"), nbytes=nbytes
    )
    return counts.astype(np.float64), sums


def recluster(
    x: np.ndarray,
    weights: np.ndarray,
    k: int,
    seed: int,
    dtype=np.float32,
    max_iter: int = 5,
) -> np.ndarray:
    """Reduce weighted candidates to ``k`` centres: weighted k-means++, then weighted Lloyd.

    The seeding is k-means++ proper (each centre drawn with probability proportional to
    ``weight * D^2``) computed in blocks (:func:`weighted_kmeans_pp`): its cost is one
    float32 GEMM of the candidates against the centres, where a centre-at-a-time loop
    (scikit-learn's, with greedy trials, used here before) took most of the init time at
    k = 4096. The greedy trials are left out; the weighted Lloyd iterations that follow
    (stopped when no candidate changes cluster, at most ``max_iter``) more than make up for
    them. Measured on the 180k mnist-5k 5x5 patches, k = 4096, 39k candidate rows, one
    core: seeding 0.3 s, then 0.2 s per Lloyd iteration; data inertia 16140 after the
    seeding, 12050 after 1 iteration, 11030 after 5, 10950 after 10, against 13790 for
    scikit-learn's greedy k-means++ on all the data (52-160 s). With the 9.9k cell means
    of the default oversampling: 13040 after the seeding, 11488 after 5 iterations (it
    stops there), under 1 s in all.

    Parameters
    ----------
    x : ndarray (c, d)
        Candidates, ``c > k``.
    weights : ndarray (c,)
        Positive weights (rows nearest to each candidate).
    k, seed : int
        Number of centres and seed.
    dtype : float32 or float64
        Precision of the distance computations.
    max_iter : int
        Most weighted Lloyd iterations.

    Returns
    -------
    ndarray (k, d), float64
    """
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng([seed, 0x6B6D2B2B])
    w = np.asarray(weights, dtype=np.float64)
    xw = np.asarray(x, dtype=dtype)
    # The GEMMs are small tiles: a multi-threaded BLAS spends more time waking its threads
    # than computing (measured 12x slower with 2 OpenBLAS threads than with 1), so BLAS runs
    # single-threaded and the rows are split over this process's cores instead.
    # Plain k-means++ may seed two centres in one well-separated group, which Lloyd never
    # undoes; scikit-learn's greedy trials guard against that at k x the cost. Here whole
    # seedings are repeated instead while they are cheap (small k or few candidates: up to
    # _RECLUSTER_TRIES), and the one of least weighted cost is kept. At large k one trial
    # is kept: there a misplaced centre costs little and the time matters.
    tries = int(np.clip(_RECLUSTER_BUDGET // max(1, len(xw) * k), 1, _RECLUSTER_TRIES))
    best, best_cost = None, np.inf
    with threadpool_limits(1, user_api="blas"):
        for _ in range(tries):
            centers = np.asarray(x, dtype=np.float64)[weighted_kmeans_pp(xw, w, k, rng)]
            centers = _weighted_lloyd(x, xw, w, centers, max_iter)
            cost = _weighted_cost(xw, w, centers) if tries > 1 else 0.0
            if cost < best_cost:
                best, best_cost = centers, cost
    return best


# Repeated seedings of recluster: at most this many, while candidates x k stays within the
# budget (a few hundred milliseconds of GEMM on one core).
_RECLUSTER_TRIES = 8
_RECLUSTER_BUDGET = 10**8


def _weighted_cost(xw: np.ndarray, w: np.ndarray, centers: np.ndarray) -> float:
    _, d2 = _nearest(xw, centers, want_d2=True)
    return float(np.dot(w, d2))


def _nearest(x: np.ndarray, centers: np.ndarray, want_d2: bool = False):
    """:func:`dkm._parallel.kernels.assign` of ``x``, split by rows over this process's cores."""
    from concurrent.futures import ThreadPoolExecutor

    tiles = Tiles.from_config()
    packed = kernels.pack_centers(centers, x.dtype)
    parts = min(os.cpu_count() or 1, 8, max(1, len(x) * packed.shape[1] // 2**22))
    if parts == 1:
        return kernels.assign(x, packed, tiles, want_d2)
    cuts = np.linspace(0, len(x), parts + 1).astype(int)
    with ThreadPoolExecutor(parts) as pool:
        res = list(
            pool.map(
                lambda ab: kernels.assign(x[ab[0] : ab[1]], packed, tiles, want_d2),
                itertools.pairwise(cuts),
            )
        )
    labels = np.concatenate([r[0] for r in res])
    return labels, (np.concatenate([r[1] for r in res]) if want_d2 else None)


def _weighted_lloyd(x, xw, w, centers, max_iter: int) -> np.ndarray:
    """Weighted Lloyd on the candidates, stopped when no candidate changes cluster."""
    k = len(centers)
    wx = x * w[:, None]
    prev = None
    for _ in range(max_iter):
        labels, _ = _nearest(xw, centers)
        if prev is not None and np.array_equal(labels, prev):
            break
        sums = np.zeros_like(centers)
        kernels.accumulate_numpy(wx, labels, sums)
        mass = np.bincount(labels, weights=w, minlength=k)
        full = mass > 0  # an empty cluster keeps its centre
        centers[full] = sums[full] / mass[full, None]
        prev = labels
    return centers


def weighted_kmeans_pp(x: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator):
    """Indices of ``k`` rows of ``x`` drawn by weighted k-means++ (``p ~ w * D^2``).

    Exact k-means++ sampling, done in blocks: ``D^2`` is brought up to date with one GEMM
    per block of new centres (:func:`dkm._parallel.kernels.assign`), and within a block a
    row drawn from the block's stale distribution is accepted with probability
    ``D^2_now / D^2_stale`` (its distance to the block's centres is computed for that row
    alone). That is rejection sampling from the current distribution, so every centre is
    drawn as in the one-at-a-time algorithm. Blocks grow with the number of centres (a
    quarter of them) because each new centre then changes the distribution less.
    Rows of zero weight or distance are never drawn; if the positive ``w * D^2`` runs out
    before ``k`` (fewer distinct rows than ``k``), the rest are the first rows not drawn.
    """
    c = len(x)
    x64 = x.astype(np.float64)
    chosen = [int(np.searchsorted(np.cumsum(w), rng.random() * w.sum(), side="right"))]
    chosen[0] = min(chosen[0], c - 1)
    d2 = np.full(c, np.inf, dtype=np.float64)
    done = 0  # centres already in d2
    while len(chosen) < k:
        fresh = np.asarray(chosen[done:])
        _, dn = _nearest(x, x64[fresh], want_d2=True)
        np.minimum(d2, dn, out=d2)
        d2[fresh] = 0
        done = len(chosen)
        cum = np.cumsum(w * d2)
        total = cum[-1]
        if not total > 0:
            rest = np.setdiff1d(np.arange(c), chosen)[: k - len(chosen)]
            return np.concatenate([np.asarray(chosen), rest])
        block = min(k - len(chosen), max(1, len(chosen) // 4), 256)
        block_rows = np.empty((block, x.shape[1]))
        nblock, tries = 0, 0
        # Many rejections in a row mean the block's centres took most of the mass: end the
        # block early and measure again (also ends a block when no mass is left outside it).
        while nblock < block and tries < 4 * block + 64:
            tries += 1
            i = min(int(np.searchsorted(cum, rng.random() * total, side="right")), c - 1)
            if nblock:
                diff = block_rows[:nblock] - x64[i]
                now = min(d2[i], float(np.einsum("ij,ij->i", diff, diff).min()))
                if rng.random() * d2[i] >= now:
                    continue
            chosen.append(i)
            block_rows[nblock] = x64[i]
            nblock += 1
    return np.asarray(chosen)


def kmeans_parallel(
    X: Any,
    n_clusters: int,
    *,
    oversampling_factor: float = DEFAULT_OVERSAMPLING,
    init_max_iter: int | None = None,
    random_state: int | None = None,
    dtype=np.float32,
    variable: str | None = None,
    client=None,
) -> tuple[np.ndarray, dict]:
    """Compute k-means|| initial centroids of a feature matrix.

    Parameters
    ----------
    X : array-like, dask array, xarray.DataArray or str/Path
        Feature matrix ``(sample, feature)``; a path opens a Zarr store.
    n_clusters : int
        Number of centroids.
    oversampling_factor : float, default 0.5
        Candidates sampled per round, in units of ``n_clusters`` (``ell = factor * k``).
    init_max_iter : int, optional
        Number of sampling rounds (default 5, as in Bahmani et al.).
    random_state : int, optional
        Seed; results do not depend on the chunking of ``X``.
    dtype : float32 or float64
        Precision of the distance computations.
    variable : str, optional
        Variable to use when ``X`` is a Zarr store with several 2-D float variables.
    client : distributed.Client, optional
        Defaults to the current default client, or local threads without one.

    Returns
    -------
    centers : ndarray of shape (n_clusters, n_features), float64
        In the data's own coordinates.
    info : dict
        ``rounds``, ``n_candidates``, ``passes`` (passes over the data, including the
        validation pass), ``phi`` (cost after each round) and ``recluster_seconds`` (the
        reduction of the candidates to ``n_clusters`` centres in this process).
    """
    from sklearn.utils import check_random_state

    src = as_source(X, dtype=dtype, variable=variable)
    if n_clusters > src.shape[0]:
        raise ValueError(f"n_clusters={n_clusters} > n_samples={src.shape[0]}")
    seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    blocks = load_blocks(src, get_backend(client))
    keys = Keys.new()
    compute_stats(blocks, seed, keys)
    return kmeans_parallel_init(
        blocks,
        n_clusters,
        seed,
        oversampling_factor=oversampling_factor,
        max_iter=init_max_iter,
        keys=keys,
    )
