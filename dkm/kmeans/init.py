"""Initial centroids: "random", "sample", "k-means++", "k-means||" or a user array.

All methods work on :class:`dkm._parallel.blocks.Blocks` after the statistics pass
(:func:`dkm._parallel.blocks.compute_stats`), which already gives per-feature ranges and a
uniformly random first row, so "random" and the first k-means|| centre cost no extra pass.
:func:`initialize` is the one entry point both estimators use; :func:`init_on_rows` runs the
in-memory methods on rows already gathered (mini-batch's ``init_size`` subset).
"""

from __future__ import annotations

import logging
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
    "init_on_rows",
    "initialize",
    "kmeans_parallel",
    "kmeans_parallel_init",
]

log = logging.getLogger("dkm")

INIT_METHODS = ("k-means||", "k-means++", "random", "sample")


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


def sample_init(blocks: Blocks, k: int, seed: int, name: str) -> np.ndarray:
    """k distinct random rows of the data (reads only the blocks holding them)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(blocks.n, size=k, replace=False))
    out = blocks.take(rows, name=name)
    return out[rng.permutation(k)]


def init_on_rows(x: np.ndarray, method: str, k: int, seed: int) -> np.ndarray:
    """Initial centres from rows already in this process ("k-means++", "random", "sample").

    Parameters
    ----------
    x : ndarray (n, d)
        Rows (in the coordinates the fit runs in), ``n >= k``.
    method : str
        "k-means++" (scikit-learn's greedy k-means++), "random" (uniform in the rows'
        bounding box) or "sample" (distinct random rows).
    k, seed : int
        Number of centres and seed.
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
    oversampling_factor: float = 2.0,
    rounds: int | None = None,
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
    raise ValueError(f"init must be one of {INIT_METHODS} or an array, got {method!r}")


def kmeans_parallel_init(
    blocks: Blocks,
    k: int,
    seed: int,
    oversampling_factor: float = 2.0,
    max_iter: int | None = None,
    keys: Keys | None = None,
    center: bool = False,
) -> tuple[np.ndarray, dict]:
    """k-means|| (Bahmani et al. 2012) with ``ell = oversampling_factor * k``.

    Passes over the data: the statistics pass (already done; it picks the first centre
    uniformly at random), one pass per round (each measures only the candidates added by the
    previous round against a per-row running minimum kept on the workers), and one pass that
    weights the candidates by the number of rows nearest to them. The weighted candidates are
    then reduced to ``k`` centres with k-means++ followed by weighted Lloyd, in this process.
    With ``center=True`` the first round also centers the blocks on the data mean.

    Returns the centres and a dict with ``rounds``, ``n_candidates``, ``passes``,
    ``phi`` (cost after each round).
    """
    from sklearn.cluster import KMeans as SkKMeans

    keys = keys or Keys.new()
    tiles = Tiles.from_config()
    be = blocks.backend
    nb = blocks.nblocks
    shift = center_stats(blocks) if center else None
    rounds = 5 if max_iter is None else int(max_iter)
    ell = float(oversampling_factor) * k
    cands = [np.asarray(blocks.stats["first_row"], dtype=np.float64)[None, :]]
    new = cands[0]
    d2 = [None] * nb
    phis = []
    passes = 1  # the statistics pass
    for r in range(1, rounds + 1):
        packed = be.share(kernels.pack_centers(new, blocks.dtype))
        steps = be.map(
            _kernels.parallel_round,
            blocks.handles,
            d2,
            [packed] * nb,
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
        d2 = be.map(_kernels.round_d2, steps, name=keys("kmeans||", "mindist", r=r))
        results = be.gather(
            be.map(_kernels.round_result, steps, name=keys("kmeans||", "select", r=r))
        )
        del steps
        passes += 1
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
    del d2
    cand = np.concatenate(cands, axis=0)
    # Weight each candidate by the rows nearest to it (Bahmani et al. step 7).
    packed = be.share(kernels.pack_centers(cand, blocks.dtype))
    wf = be.map(
        _kernels.candidate_weights,
        blocks.handles,
        [packed] * nb,
        [tiles] * nb,
        name=keys("kmeans||", "weights"),
    )
    weights = be.reduce(
        wf, kernels.add_arrays, name=keys("kmeans||", "reduce"), nbytes=8 * len(cand)
    )
    passes += 1
    keep = weights > 0
    cand, weights = cand[keep], weights[keep]
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
    if len(cand) == k:
        return cand, info
    km = SkKMeans(
        n_clusters=k, init="k-means++", n_init=1, max_iter=300, random_state=seed % (2**32)
    )
    km.fit(cand, sample_weight=weights.astype(np.float64))
    return km.cluster_centers_.astype(np.float64), info


def kmeans_parallel(
    X: Any,
    n_clusters: int,
    *,
    oversampling_factor: float = 2.0,
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
    oversampling_factor : float, default 2
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
        validation pass) and ``phi`` (cost after each round).
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
