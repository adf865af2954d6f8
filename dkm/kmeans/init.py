"""Initial centroids: "random", "sample", "k-means++", "k-means||" or a user array.

All methods work on :class:`dkm.kmeans._data.Blocks` after the statistics pass
(:func:`dkm.kmeans._data.compute_stats`), which already gives per-feature ranges and a
uniformly random first row, so "random" and the first k-means|| centre cost no extra pass.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

from dkm._parallel import kernels
from dkm._parallel.backend import get_backend
from dkm._parallel.blocks import Blocks, as_source, centre_stats, compute_stats, load_blocks

log = logging.getLogger("dkm")

INIT_METHODS = ("k-means||", "k-means++", "random", "sample")


def check_init_array(init: Any, n_clusters: int, n_features: int) -> np.ndarray:
    arr = np.asarray(init, dtype=np.float64)
    if arr.shape != (n_clusters, n_features):
        raise ValueError(
            f"init array has shape {arr.shape}; expected (n_clusters, n_features) = "
            f"({n_clusters}, {n_features})"
        )
    if not np.isfinite(arr).all():
        raise ValueError("init array contains NaN or infinity")
    return arr


def random_init(blocks: Blocks, k: int, seed: int) -> np.ndarray:
    """Uniform in the data's per-feature [min, max] box (no pass: uses the stats)."""
    rng = np.random.default_rng(seed)
    lo, hi = blocks.stats["min"], blocks.stats["max"]
    return lo + rng.random((k, blocks.d)) * (hi - lo)


def sample_init(blocks: Blocks, k: int, seed: int, name: str = "dkm-sample") -> np.ndarray:
    """k distinct random rows of the data (reads only the blocks holding them)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(blocks.n, size=k, replace=False))
    out = blocks.take(rows, name=name)
    return out[rng.permutation(k)]


def kmeans_plusplus_init(
    blocks: Blocks, k: int, seed: int, init_size: int | None = None, name: str = "dkm-kpp"
) -> np.ndarray:
    """scikit-learn's greedy k-means++ on the rows gathered to the client.

    k-means++ is sequential (k passes), so it runs in this process on ``init_size`` random
    rows (all rows when None). Use "k-means||" for data that should not leave the cluster.
    """
    from sklearn.cluster import kmeans_plusplus

    if init_size is None or init_size >= blocks.n:
        rows = np.arange(blocks.n)
    else:
        rows = np.sort(np.random.default_rng(seed).choice(blocks.n, init_size, replace=False))
        if len(rows) < k:
            raise ValueError(f"init_size={init_size} is smaller than n_clusters={k}")
    x = blocks.take(rows, name=name).astype(blocks.dtype)
    centers, _ = kmeans_plusplus(x, k, random_state=seed % (2**32))
    return centers.astype(np.float64)


def kmeans_parallel_init(
    blocks: Blocks,
    k: int,
    seed: int,
    oversampling_factor: float = 2.0,
    max_iter: int | None = None,
    name: str = "dkm-kmpar",
    centre: bool = False,
) -> tuple[np.ndarray, dict]:
    """k-means|| (Bahmani et al. 2012) with ``ell = oversampling_factor * k``.

    Passes over the data: the statistics pass (already done; it picks the first centre
    uniformly at random), one pass per round (each measures only the candidates added by the
    previous round against a per-row running minimum kept on the workers), and one pass that
    weights the candidates by the number of rows nearest to them. The weighted candidates are
    then reduced to ``k`` centres with k-means++ followed by weighted Lloyd, in this process.
    With ``centre=True`` the first round also centres the blocks on the data mean.

    Returns the centres and a dict with ``rounds``, ``n_candidates``, ``passes``,
    ``phi`` (cost after each round).
    """
    from sklearn.cluster import KMeans as SkKMeans

    be = blocks.backend
    nb = blocks.nblocks
    shift = centre_stats(blocks) if centre else None
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
            kernels.parallel_round,
            blocks.handles,
            d2,
            [packed] * nb,
            [seed] * nb,
            [r] * nb,
            blocks.starts.tolist(),
            [ell] * nb,
            [shift if r == 1 else None] * nb,
            name=f"{name}-r{r}",
        )
        if shift is not None and r == 1:
            blocks.handles = (
                be.map(kernels.round_block, steps, name=f"{name}-centred")
                if be.is_distributed
                else [s[2] for s in be.gather(steps)]
            )
        d2 = be.map(kernels.round_d2, steps, name=f"{name}-r{r}-d2")
        results = be.gather(be.map(kernels.round_result, steps, name=f"{name}-r{r}-sel"))
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
    wf = be.map(kernels.candidate_weights, blocks.handles, [packed] * nb, name=f"{name}-weights")
    weights = be.reduce(wf, kernels.add_arrays, name=f"{name}-weights-sum", nbytes=8 * len(cand))
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
        extra = sample_init(blocks, k - len(cand), seed + 1, name=f"{name}-fill")
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
    name = f"dkm-kmpar-{blocks.backend.new_token()}"
    compute_stats(blocks, seed, name=name)
    return kmeans_parallel_init(
        blocks,
        n_clusters,
        seed,
        oversampling_factor=oversampling_factor,
        max_iter=init_max_iter,
        name=name,
    )
