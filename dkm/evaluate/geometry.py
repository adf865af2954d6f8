"""Clustering metrics from the geometry of the features, equal to scikit-learn's, computed on
the cluster: silhouette, Calinski-Harabasz and Davies-Bouldin.

Calinski-Harabasz and Davies-Bouldin are exact over all rows. They come from per-cluster
sufficient statistics gathered in one pass over the (dask) feature matrix: counts, sums and
sums of squared norms of the rows relative to a per-cluster shift, and the sum of the rows'
distances to that shift. With the model's centroids as shifts the distances are
Davies-Bouldin's cluster spreads whenever the centroids are the cluster means, as at k-means
convergence; when they are not (within :data:`DB_RTOL`, see :func:`geometry_metrics`) a
second pass measures the spreads from the means.

The silhouette compares every row with every other, so it is computed on a sample of the
rows (all of them when there are few): drawn with :func:`dkm._parallel.random.row_uniforms`,
so the sample depends on the seed and the number of rows, never on the chunking, gathered in
the same pass as the statistics, and compared block against block on the cluster, so no
task holds more than one block of pairwise distances.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from scipy import sparse

from dkm._parallel.random import row_uniforms
from dkm._validation import Interval, validate

__all__ = [
    "DB_RTOL",
    "GEOMETRY_METRICS",
    "SILHOUETTE_RULES",
    "SILHOUETTE_SAMPLE",
    "calinski_harabasz",
    "davies_bouldin",
    "geometry_metrics",
    "sample_rows",
    "silhouette",
]

GEOMETRY_METRICS = ("silhouette", "calinski_harabasz", "davies_bouldin")
# Rows the silhouette is computed on by default (all of them when there are no more).
SILHOUETTE_SAMPLE = 10_000
# The model's centroids stand in for the cluster means in Davies-Bouldin's spreads when that
# changes the score by at most this relative amount; otherwise a second pass is made.
DB_RTOL = 1e-6

_SAMPLE_STREAM = 0x5111_0E77E  # row_uniforms stream of the silhouette sample
_KEY_ROWS = 1 << 20  # rows per task drawing sample keys (the sample does not depend on it)
_BLOCK_ROWS = 2048  # rows per side of a block of pairwise distances (32 MiB of float64)
_BATCH_ROWS = 8192  # rows of a chunk turned into float64 at once by the statistics
# Squared distances below this fraction of |a|^2 + |b|^2 are measured directly: above it the
# dot-product expansion's relative error stays below ~1e-10.
_CLOSE = 1e-6

_RULES = {
    "silhouette_sample": [Interval(int, 2, None)],
    "random_state": ["random_state", None],
    "block_rows": [Interval(int, 1, None)],
}
# What a job's evaluate.silhouette_sample accepts.
SILHOUETTE_RULES = {"silhouette_sample": _RULES["silhouette_sample"]}


# --------------------------------------------------------------------------- inputs


def _features(X: Any) -> da.Array:
    """``X`` (numpy, dask or xarray) as a dask array with whole rows per chunk."""
    data = X.data if isinstance(X, xr.DataArray) else X
    x = data if isinstance(data, da.Array) else da.from_array(np.asarray(data))
    if x.ndim != 2:
        raise ValueError(f"X must be a 2-D (sample, feature) matrix, got shape {x.shape}")
    return x.rechunk({1: -1})


def _cluster_labels(labels: Any, x: da.Array) -> da.Array:
    """The clusters as a dask array chunked like the rows of ``x``."""
    lab = da.asarray(labels)
    if lab.shape != (x.shape[0],):
        raise ValueError(
            f"labels_pred has shape {lab.shape}; it needs one cluster per row of X "
            f"({x.shape[0]} rows)"
        )
    return lab.rechunk((x.chunks[0],))


def _seed(random_state: Any) -> int:
    if random_state is None or isinstance(random_state, np.random.RandomState):
        from sklearn.utils import check_random_state

        return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    return int(random_state)


def _n_clusters(n_clusters: int | None, centroids: np.ndarray | None, lab: da.Array) -> int:
    if n_clusters is not None:
        return int(n_clusters)
    if centroids is not None:
        return len(centroids)
    return int(lab.max().compute()) + 1


def _check_enough(metric: str, n_present: int, n_rows: int) -> None:
    # scikit-learn's rule (check_number_of_labels): 2 <= clusters <= rows - 1.
    if not 2 <= n_present <= n_rows - 1:
        raise ValueError(
            f"{metric} needs at least 2 non-empty clusters and fewer clusters than rows; "
            f"labels_pred has {n_present} non-empty cluster(s) over {n_rows} rows"
        )


# --------------------------------------------------------------------------- the sample


def _row_keys(rows: np.ndarray, seed: int) -> np.ndarray:
    if rows.size == 0:
        return np.empty(0)
    return row_uniforms(seed, _SAMPLE_STREAM, int(rows[0]), rows.size)


def sample_rows(n_rows: int, size: int = SILHOUETTE_SAMPLE, random_state: Any = 0) -> np.ndarray:
    """The rows the silhouette is computed on: ``size`` of ``n_rows`` (all when
    ``n_rows <= size``), sorted.

    Every row gets a uniform key from ``(seed, global row)``; the sample is the ``size``
    rows with the smallest keys, found on the cluster, so it does not depend on how any
    array is chunked.

    Parameters
    ----------
    n_rows : int
        Rows to draw from.
    size : int, default 10,000
        Rows to draw.
    random_state : int, RandomState or None, default 0
        Seed of the draw.

    Returns
    -------
    ndarray of int64
    """
    if n_rows <= size:
        return np.arange(n_rows)
    seed = _seed(random_state)
    keys = da.arange(n_rows, chunks=_KEY_ROWS).map_blocks(_row_keys, seed, dtype=np.float64)
    return np.sort(da.argtopk(keys, -size).compute()).astype(np.int64)


# --------------------------------------------------------------------------- one pass: statistics


def _chunk_stats(x: np.ndarray, labels: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """``(1, k, d + 3)``: per cluster, count | sum of (x - shift) | sum of |x - shift|^2 |
    sum of |x - shift|."""
    k, d = shifts.shape
    out = np.zeros((1, k, d + 3))
    for lo in range(0, len(x), _BATCH_ROWS):
        lab = labels[lo : lo + _BATCH_ROWS].astype(np.intp)
        if lab.min() < 0 or lab.max() >= k:
            raise ValueError(
                f"labels_pred must be clusters 0 .. {k - 1} (n_clusters={k}), "
                f"got {lab.min()} .. {lab.max()}"
            )
        diff = x[lo : lo + _BATCH_ROWS].astype(np.float64) - shifts[lab]
        sq = np.einsum("ij,ij->i", diff, diff)
        onehot = sparse.csr_matrix(
            (np.ones(lab.size), (lab, np.arange(lab.size))), shape=(k, lab.size)
        )
        out[0, :, 0] += np.bincount(lab, minlength=k)
        out[0, :, 1 : d + 1] += onehot @ diff
        out[0, :, d + 1] += np.bincount(lab, sq, minlength=k)
        out[0, :, d + 2] += np.bincount(lab, np.sqrt(sq), minlength=k)
    return out


def _stats_pass(x: da.Array, lab: da.Array, shifts: np.ndarray) -> da.Array:
    """The statistics of every cluster relative to its row of ``shifts``, lazily: one task
    per chunk of ``x`` and a tree sum of their small results."""
    d = shifts.shape[1]
    parts = da.blockwise(
        _chunk_stats, "ikj",
        x, "if",
        lab, "i",
        da.from_array(shifts, chunks=-1), "kf",
        new_axes={"j": d + 3},
        adjust_chunks={"i": 1},
        concatenate=True,
        dtype=np.float64,
    )  # fmt: skip
    return parts.sum(axis=0)


class _Stats:
    """The gathered statistics of the non-empty clusters."""

    def __init__(self, table: np.ndarray, shifts: np.ndarray):
        d = shifts.shape[1]
        present = table[:, 0] > 0
        self.present = present
        self.counts = table[present, 0]
        self.shifts = shifts[present]
        self.sums = table[present, 1 : d + 1]
        self.squares = table[present, d + 1]
        self.distances = table[present, d + 2]

    @property
    def means(self) -> np.ndarray:
        return self.shifts + self.sums / self.counts[:, None]

    @property
    def n_rows(self) -> int:
        return int(self.counts.sum())


def _calinski_harabasz(st: _Stats) -> float:
    """scikit-learn's formula: between- over within-cluster dispersion, each per degree of
    freedom; 1 when every cluster is a single point."""
    n, k = st.n_rows, len(st.counts)
    _check_enough("calinski_harabasz", k, n)
    means = st.means
    mean = st.counts @ means / n
    between = float(st.counts @ ((means - mean) ** 2).sum(axis=1))
    # Within-cluster sum of squares around the means, from the shifted sums (float64).
    within = float(np.maximum(st.squares - (st.sums**2).sum(axis=1) / st.counts, 0).sum())
    return 1.0 if within == 0 else between * (n - k) / (within * (k - 1))


def _spreads_from_shifts(st: _Stats) -> np.ndarray | None:
    """Each cluster's mean distance to its mean, taken from the distances to its shift (the
    model's centroid) when that is within :data:`DB_RTOL` of the score, else None.

    By the triangle inequality the mean distance to the shift differs from the mean
    distance to the mean by at most delta = |mean - shift|; every ratio of Davies-Bouldin,
    so the score, then moves by at most max(delta / spread) relatively.
    """
    spreads = st.distances / st.counts
    delta = np.sqrt(((st.means - st.shifts) ** 2).sum(axis=1))
    lower = spreads - delta
    if np.any((delta > 0) & (lower <= 0)):
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(delta > 0, delta / lower, 0.0)
    return spreads if relative.max() <= DB_RTOL else None


def _davies_bouldin(st: _Stats, spreads: np.ndarray) -> float:
    """scikit-learn's formula: the mean over clusters of the worst (s_i + s_j) / d_ij."""
    from sklearn.metrics.pairwise import euclidean_distances

    between = euclidean_distances(st.means)
    if np.allclose(spreads, 0) or np.allclose(between, 0):
        return 0.0
    between[between == 0] = np.inf
    return float(np.mean(np.max((spreads[:, None] + spreads) / between, axis=1)))


# --------------------------------------------------------------------------- silhouette


def _onehot(lab: np.ndarray, n_present: int) -> sparse.csr_matrix:
    """``(n_present, len(lab))``: row c selects the samples of cluster c."""
    return sparse.csr_matrix(
        (np.ones(lab.size), (lab, np.arange(lab.size))), shape=(n_present, lab.size)
    )


def _pair_sums(
    a: np.ndarray, b: np.ndarray, lab_a: np.ndarray, lab_b: np.ndarray, n_present: int,
    same: bool,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One block of the pairwise distance matrix, reduced at once: for each row of ``a``
    the sums of its distances to the rows of ``b`` in each cluster, and the same for the
    rows of ``b`` (the matrix is symmetric, so each pair of blocks is computed once)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    # |a - b|^2 by the dot-product expansion (BLAS), as scikit-learn's euclidean_distances;
    # it cancels badly for close pairs, so those are measured again directly: equal rows
    # are at distance exactly 0 (scikit-learn leaves rounding dust there).
    norms = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :]
    d2 = norms - 2 * a @ b.T
    close = np.nonzero(d2 < _CLOSE * norms)
    d2[close] = ((a[close[0]] - b[close[1]]) ** 2).sum(axis=1)
    dist = np.sqrt(np.maximum(d2, 0, out=d2), out=d2)
    if same:
        np.fill_diagonal(dist, 0)  # a row's distance to itself
    to_a = (_onehot(lab_b, n_present) @ dist.T).T
    to_b = (_onehot(lab_a, n_present) @ dist).T
    return to_a, to_b


def _silhouette_sum(parts: list[np.ndarray], lab: np.ndarray, counts: np.ndarray) -> float:
    """Sum of the silhouettes of a block's rows from their distance sums per cluster
    (scikit-learn's silhouette_samples: 0 for a row alone in its cluster)."""
    sums = functools.reduce(np.add, parts)
    rows = np.arange(len(lab))
    own = sums[rows, lab]
    means = sums / counts
    means[rows, lab] = np.inf
    nearest_other = means.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        within = own / (counts[lab] - 1)
        s = (nearest_other - within) / np.maximum(within, nearest_other)
    return float(np.nan_to_num(s).sum())


def _silhouette(sample: da.Array, labels: np.ndarray, block_rows: int) -> float:
    """Mean silhouette of the rows of ``sample`` (on the cluster), in blocks of
    ``block_rows``: one task per pair of blocks, then one per block to reduce its rows."""
    present, lab = np.unique(labels, return_inverse=True)
    _check_enough("silhouette", len(present), len(lab))
    counts = np.bincount(lab).astype(np.float64)
    s = sample.rechunk((block_rows, -1))
    blocks = s.to_delayed().ravel()
    edges = np.cumsum((0, *s.chunks[0]))
    labs = [lab[lo:hi] for lo, hi in itertools.pairwise(edges)]
    pair = dask.delayed(_pair_sums, nout=2, pure=True)
    parts: list[list] = [[] for _ in blocks]
    for i, j in itertools.combinations_with_replacement(range(len(blocks)), 2):
        to_i, to_j = pair(blocks[i], blocks[j], labs[i], labs[j], len(present), i == j)
        parts[i].append(to_i)
        if i != j:
            parts[j].append(to_j)
    reduce = dask.delayed(_silhouette_sum, pure=True)
    sums = dask.compute(*(reduce(p, labs[i], counts) for i, p in enumerate(parts)))
    return float(np.sum(sums) / len(lab))


# --------------------------------------------------------------------------- entry points


def geometry_metrics(
    names: Iterable[str],
    X: Any,
    labels_pred: Any,
    *,
    n_clusters: int | None = None,
    centroids: Any = None,
    silhouette_sample: int = SILHOUETTE_SAMPLE,
    random_state: Any = 0,
    block_rows: int = _BLOCK_ROWS,
) -> dict[str, float]:
    """The named geometry metrics of a clustering, in as few passes over ``X`` as possible.

    One pass gathers the per-cluster statistics (Calinski-Harabasz, Davies-Bouldin) and the
    silhouette's sample together. Davies-Bouldin takes a second pass only when
    ``centroids`` are not given, or are not the cluster means closely enough to change the
    score by at most :data:`DB_RTOL` (relative).

    Parameters
    ----------
    names : iterable of str
        Among ``"silhouette"``, ``"calinski_harabasz"``, ``"davies_bouldin"``.
    X : array-like, dask array or xarray.DataArray of shape (n_samples, n_features)
        The clustered features; a dask (or dask-backed) array is read chunk by chunk on
        the cluster.
    labels_pred : array-like or dask array of shape (n_samples,)
        Cluster of every row, in ``0 .. n_clusters - 1``.
    n_clusters : int, optional
        Number of clusters (default: ``len(centroids)``, else the largest label + 1).
    centroids : array-like of shape (n_clusters, n_features), optional
        The model's centroids; they spare Davies-Bouldin its second pass when they are the
        cluster means (k-means at convergence).
    silhouette_sample : int, default 10,000
        Rows the silhouette is computed on (:func:`sample_rows`); all rows when there are
        no more, which gives scikit-learn's exact silhouette_score.
    random_state : int, RandomState or None, default 0
        Seed of the silhouette's sample.
    block_rows : int, default 2048
        Rows per side of a block of pairwise distances.

    Returns
    -------
    dict of str to float

    Raises
    ------
    ValueError
        An unknown name, bad parameter, shapes that do not match, or (from the gathered
        counts) fewer than 2 non-empty clusters.
    """
    names = list(dict.fromkeys(names))
    unknown = [m for m in names if m not in GEOMETRY_METRICS]
    if unknown:
        raise ValueError(
            f"unknown geometry metric(s) {', '.join(map(repr, unknown))} "
            f"(expected: {', '.join(GEOMETRY_METRICS)})"
        )
    validate(
        {
            "silhouette_sample": silhouette_sample,
            "random_state": random_state,
            "block_rows": block_rows,
        },
        _RULES,
        "geometry_metrics",
    )
    x = _features(X)
    lab = _cluster_labels(labels_pred, x)
    if centroids is not None:
        centroids = np.asarray(centroids, dtype=np.float64)
    k = _n_clusters(n_clusters, centroids, lab)
    if centroids is not None and centroids.shape != (k, x.shape[1]):
        raise ValueError(
            f"centroids has shape {centroids.shape}; expected (n_clusters, n_features) = "
            f"({k}, {x.shape[1]})"
        )
    if not names:
        return {}
    if k < 2:
        raise ValueError(f"{', '.join(names)} need at least 2 clusters; n_clusters={k}")

    lazy: dict[str, da.Array] = {}
    wants_stats = "calinski_harabasz" in names or "davies_bouldin" in names
    if wants_stats:
        shifts = centroids
        if shifts is None:  # any point near the data keeps the shifted sums well conditioned
            shifts = np.repeat(np.asarray(x[0].compute(), np.float64)[None], k, axis=0)
        lazy["stats"] = _stats_pass(x, lab, shifts)
    if "silhouette" in names:
        rows = sample_rows(x.shape[0], silhouette_sample, random_state)
        whole = len(rows) == x.shape[0]
        lazy["sample"] = x if whole else x[rows]
        lazy["sample_labels"] = lab if whole else lab[rows]
    # One graph: every chunk of X is read once for the statistics and the sample.
    done = dict(zip(lazy, dask.persist(*lazy.values()), strict=True))

    out: dict[str, float] = {}
    if wants_stats:
        st = _Stats(np.asarray(done["stats"].compute()), shifts)
        if "calinski_harabasz" in names:
            out["calinski_harabasz"] = _calinski_harabasz(st)
        if "davies_bouldin" in names:
            _check_enough("davies_bouldin", len(st.counts), st.n_rows)
            spreads = None if centroids is None else _spreads_from_shifts(st)
            if spreads is None:
                means = np.zeros_like(shifts)
                means[st.present] = st.means
                second = _Stats(np.asarray(_stats_pass(x, lab, means).compute()), means)
                spreads = second.distances / second.counts
            out["davies_bouldin"] = _davies_bouldin(st, spreads)
    if "silhouette" in names:
        labels = np.asarray(done["sample_labels"].compute())
        out["silhouette"] = _silhouette(done["sample"], labels, block_rows)
    return {m: out[m] for m in names}


def silhouette(
    X: Any,
    labels_pred: Any,
    *,
    sample_size: int = SILHOUETTE_SAMPLE,
    random_state: Any = 0,
    block_rows: int = _BLOCK_ROWS,
) -> float:
    """Mean silhouette coefficient over :func:`sample_rows` (all rows when at most
    ``sample_size``): ``sklearn.metrics.silhouette_score`` of the sampled rows.

    See :func:`geometry_metrics` for the parameters.
    """
    return geometry_metrics(
        ["silhouette"],
        X,
        labels_pred,
        silhouette_sample=sample_size,
        random_state=random_state,
        block_rows=block_rows,
    )["silhouette"]


def calinski_harabasz(X: Any, labels_pred: Any, *, n_clusters: int | None = None) -> float:
    """Calinski-Harabasz score over all rows, as ``sklearn.metrics.calinski_harabasz_score``,
    from one pass over ``X``."""
    return geometry_metrics(["calinski_harabasz"], X, labels_pred, n_clusters=n_clusters)[
        "calinski_harabasz"
    ]


def davies_bouldin(
    X: Any, labels_pred: Any, *, n_clusters: int | None = None, centroids: Any = None
) -> float:
    """Davies-Bouldin score over all rows, as ``sklearn.metrics.davies_bouldin_score``:
    one pass over ``X`` when ``centroids`` are the cluster means, else two."""
    return geometry_metrics(
        ["davies_bouldin"], X, labels_pred, n_clusters=n_clusters, centroids=centroids
    )["davies_bouldin"]
