"""scikit-learn style estimators: :class:`KMeans` (and the shared input/predict machinery)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.utils import check_random_state

from dkm._parallel import kernels
from dkm._parallel.backend import get_backend
from dkm._parallel.blocks import Blocks, Source, as_source, centre, compute_stats, load_blocks
from dkm.kmeans.init import (
    INIT_METHODS,
    check_init_array,
    kmeans_parallel_init,
    kmeans_plusplus_init,
    random_init,
    sample_init,
)
from dkm.kmeans.lloyd import EMPTY_POLICIES, lloyd


def _history_dataset(history: dict[str, list]) -> xr.Dataset:
    """Per-iteration lists as a Dataset over a 1-based ``iteration`` coordinate."""
    n = len(history["inertia"])
    return xr.Dataset(
        {key: ("iteration", np.asarray(v[:n])) for key, v in history.items()},
        coords={"iteration": np.arange(1, n + 1)},
    )


def _labels_array(blocks: Blocks, label_handles: list) -> da.Array:
    """A dask array over the final per-block labels (no recomputation, no data re-read)."""
    if blocks.backend.is_distributed:
        parts = [
            da.from_delayed(f, shape=(int(s),), dtype=np.int32)
            for f, s in zip(label_handles, blocks.sizes, strict=True)
        ]
        return da.concatenate(parts) if len(parts) > 1 else parts[0]
    labels = np.concatenate(blocks.backend.gather(label_handles))
    return da.from_array(labels, chunks=(tuple(int(s) for s in blocks.sizes),))


class _KMeansBase(ClusterMixin, TransformerMixin, BaseEstimator):
    """Validation, prediction and transformation shared by the k-means estimators."""

    def _source(self, X: Any) -> Source:
        return as_source(X, dtype=self.dtype, variable=getattr(self, "variable", None))

    def _check_params(self, n_samples: int, n_features: int) -> None:
        k = self.n_clusters
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"n_clusters must be a positive integer, got {k!r}")
        if k > n_samples:
            raise ValueError(f"n_clusters={k} must be <= n_samples={n_samples}")
        init = self.init
        if isinstance(init, str):
            if init not in INIT_METHODS:
                raise ValueError(f"init must be one of {INIT_METHODS} or an array, got {init!r}")
        else:
            check_init_array(init, k, n_features)

    def _check_fitted_input(self, src: Source) -> None:
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "cluster_centers_")
        if src.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {src.shape[1]} features, but {type(self).__name__} was fitted with "
                f"{self.n_features_in_}"
            )

    def _initial_centers(
        self, blocks: Blocks, seed: int, name: str, first: bool
    ) -> tuple[np.ndarray, dict]:
        """Initial centres (centred coordinates); on the first run also centres the blocks."""
        k = self.n_clusters
        t0 = time.perf_counter()
        info: dict = {}
        init = self.init
        if first and not (isinstance(init, str) and init == "k-means||"):
            centre(blocks, name)
        if not isinstance(init, str):
            # Centred like the data, in the working dtype (as scikit-learn does).
            centers = check_init_array(init, k, blocks.d).astype(blocks.dtype) - blocks.shift
            info = {"passes": 0}
        elif init == "k-means||":
            centers, info = kmeans_parallel_init(
                blocks,
                k,
                seed,
                oversampling_factor=self.oversampling_factor,
                max_iter=self.init_max_iter,
                name=f"{name}-kmpar",
                centre=first,
            )
        elif init == "k-means++":
            centers = kmeans_plusplus_init(
                blocks, k, seed, init_size=getattr(self, "init_size", None), name=f"{name}-kpp"
            )
        elif init == "sample":
            centers = sample_init(blocks, k, seed, name=f"{name}-sample")
        else:
            centers = random_init(blocks, k, seed)
        info["seconds"] = time.perf_counter() - t0
        return centers, info

    def _apply(self, X: Any, fn, out_cols: int | None, dtype, per_chunk: bool = False):
        """Apply a per-chunk kernel with the fitted (centred) centres.

        numpy input is processed here in row chunks (no graph that would embed the array);
        dask / xarray / Zarr input gives a lazy dask array over the input's chunks.
        """
        src = self._source(X)
        self._check_fitted_input(src)
        args = (self._centers_centred, self._x_mean, self.dtype)
        if isinstance(src.array, np.ndarray):
            arr = src.array
            step = max(1, (32 * 2**20) // max(1, arr.shape[1] * 4))
            parts = [fn(arr[s : s + step], *args) for s in range(0, len(arr), step)]
            return np.concatenate(parts)
        dsk = src.as_dask()
        if per_chunk:  # one value per chunk
            chunks = ((1,) * dsk.numblocks[0],)
            return dsk.map_blocks(fn, *args, drop_axis=1, chunks=chunks, dtype=dtype)
        if out_cols is None:
            return dsk.map_blocks(fn, *args, drop_axis=1, dtype=dtype)
        return dsk.map_blocks(fn, *args, chunks=(dsk.chunks[0], (out_cols,)), dtype=dtype)

    def predict(self, X: Any):
        """Index of the nearest centroid for each sample.

        Streams over the chunks of ``X``: for a dask / xarray / Zarr input the result is a
        lazy dask array; for numpy input a numpy array.
        """
        return self._apply(X, kernels.predict_chunk, None, np.int32)

    def transform(self, X: Any):
        """Euclidean distance of each sample to every centroid, ``(n_samples, n_clusters)``.

        Lazy (dask) for dask / xarray / Zarr input, numpy for numpy input.
        """
        k = self.cluster_centers_.shape[0]
        return self._apply(X, kernels.transform_chunk, k, self.dtype)

    def score(self, X: Any, y=None) -> float:
        """Opposite of the sum of squared distances to the nearest centroid (computed)."""
        parts = self._apply(X, kernels.score_chunk, None, np.float64, per_chunk=True)
        if isinstance(parts, da.Array):
            parts = parts.compute()
        return -float(np.sum(parts))

    def __getstate__(self):
        # labels_ may hold futures of blocks on a cluster; pickle their values instead so
        # that a fitted estimator can be saved (dask-ml #460).
        state = self.__dict__.copy()
        labels = state.get("labels_")
        if isinstance(labels, da.Array):
            state["labels_"] = np.asarray(labels.compute())
            state["_labels_chunks"] = labels.chunks
        return state

    def __setstate__(self, state):
        chunks = state.pop("_labels_chunks", None)
        if chunks is not None:
            state["labels_"] = da.from_array(state["labels_"], chunks=chunks)
        self.__dict__.update(state)

    def fit_predict(self, X: Any, y=None, sample_weight=None):
        """Fit and return the labels (numpy for numpy input, else the lazy ``labels_``)."""
        self.fit(X)
        if isinstance(X, np.ndarray):
            return self.labels_.compute()
        return self.labels_


class KMeans(_KMeansBase):
    """K-means clustering with Lloyd's algorithm on dask / dask.distributed.

    Parameters
    ----------
    n_clusters : int, default 8
        Number of clusters.
    init : {"k-means||", "k-means++", "random", "sample"} or array of shape (k, d)
        "k-means||": Bahmani et al. scalable k-means++ (``init_max_iter`` rounds of
        ``oversampling_factor * k`` samples, weighted reclustering), chunking independent.
        "k-means++": scikit-learn's greedy k-means++ on ``init_size`` rows gathered to this
        process. "random": uniform in the data's bounding box. "sample": random data rows.
    n_init : int or "auto", default 1
        Number of initialisations; the run with the lowest inertia is kept. "auto" is 1 for
        "k-means||", "k-means++" and arrays, 10 otherwise (as scikit-learn).
    max_iter : int, default 300
        Maximum number of Lloyd iterations.
    tol : float, default 1e-4
        Relative tolerance: the run stops when the sum of squared centroid shifts is at most
        ``tol * mean(feature variance)`` (scikit-learn semantics), or when no label changed.
    random_state : int, RandomState or None
        Seed. Same seed, same data and same chunking give the same result; k-means|| is also
        independent of the chunking.
    empty_cluster : {"farthest", "random-point", "zero", "keep"}, default "farthest"
        Policy for a cluster that loses all its points: move the farthest points to it (like
        scikit-learn; costs one extra pass in the iterations where it fires), a random data
        row, the zero vector, or keep the old centroid. Counts go to ``history_``.
    oversampling_factor : float, default 2
        k-means|| candidates per round in units of ``n_clusters``.
    init_max_iter : int, optional
        k-means|| rounds (default 5).
    init_size : int, optional
        Rows gathered for "k-means++" (default: all).
    dtype : float32 or float64, default float32
        Working precision. Integer and boolean inputs are cast to it as values (no scaling).
    persist : "auto", bool, default "auto"
        Persist the data on the cluster once ("auto": when it fits in half of the cluster
        memory); ``False`` streams a Zarr input from the store every iteration.
    variable : str, optional
        Variable to use when X is a Zarr store with several 2-D float variables.
    verbose : bool, default False
        Log one line per iteration on the "dkm" logger.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
    labels_ : dask array of shape (n_samples,)
        Labels for the final centroids; blocks stay on the cluster until computed.
    inertia_ : float
        Sum of squared distances to the closest centroid (float64 accumulation).
    n_iter_ : int
    history_ : xarray.Dataset
        Over ``iteration``: inertia (of the assignment made in that iteration), center_shift
        (sum of squared shifts), n_moved, n_empty, n_reseeded, seconds, n_tasks (tasks
        submitted), extra_passes; attrs: init, empty_cluster, converged, tol_abs, n_blocks.
    init_info_ : dict
        Details of the initialisation (seconds, passes; rounds and candidates for k-means||).
    n_features_in_ : int

    Notes
    -----
    Each iteration is one pass over the data: per block a tiled GEMM of ``[x, 1]`` against
    ``[-2 C, ||c||^2]`` gives the argmin, and float64 partial sums and counts are reduced in a
    tree; only a ``k x d`` array travels back per iteration.
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init: str | np.ndarray = "k-means||",
        n_init: int | str = 1,
        max_iter: int = 300,
        tol: float = 1e-4,
        random_state=None,
        empty_cluster: str = "farthest",
        oversampling_factor: float = 2.0,
        init_max_iter: int | None = None,
        init_size: int | None = None,
        dtype=np.float32,
        persist: str | bool = "auto",
        variable: str | None = None,
        verbose: bool = False,
    ):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.empty_cluster = empty_cluster
        self.oversampling_factor = oversampling_factor
        self.init_max_iter = init_max_iter
        self.init_size = init_size
        self.dtype = dtype
        self.persist = persist
        self.variable = variable
        self.verbose = verbose

    def _n_init(self) -> int:
        if self.n_init == "auto":
            if isinstance(self.init, str) and self.init in ("random", "sample"):
                return 10
            return 1
        if not isinstance(self.init, str) and self.n_init != 1:
            return 1  # an explicit array gives one deterministic start (scikit-learn warns)
        n = int(self.n_init)
        if n < 1:
            raise ValueError(f"n_init must be >= 1, got {self.n_init}")
        return n

    def fit(
        self,
        X: Any,
        y=None,
        sample_weight=None,
        *,
        callback: Callable[[dict], None] | None = None,
        resume_from: dict | None = None,
    ) -> KMeans:
        """Compute k-means clustering.

        Parameters
        ----------
        X : array-like, dask array, xarray.DataArray, or str/Path of a Zarr store
            Feature matrix ``(sample, feature)``.
        y : ignored
        sample_weight : None
            Not supported (raises if given).
        callback : callable, optional
            Called after every Lloyd iteration with a state dict: ``iteration`` (1-based),
            ``centers`` (float64, in the centred coordinates the iterations run in),
            ``history`` (xarray Dataset so far) and ``state`` (what resuming needs besides).
            Giving that dict back as ``resume_from`` continues the run exactly where it
            stood. Needs ``n_init == 1``.
        resume_from : dict, optional
            A state from ``callback``: skips initialisation and continues the iterations.
            Same data, chunking and ``random_state`` give the same final centroids as an
            uninterrupted fit.

        Returns
        -------
        self
        """
        with get_backend().blas_limit():
            return self._fit(X, sample_weight, callback, resume_from)

    def _fit(self, X: Any, sample_weight=None, callback=None, resume_from=None) -> KMeans:

        if sample_weight is not None:
            raise NotImplementedError("sample_weight is not supported by dkm.KMeans")
        if self.empty_cluster not in EMPTY_POLICIES:
            raise ValueError(
                f"empty_cluster must be one of {EMPTY_POLICIES}, got {self.empty_cluster!r}"
            )
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        src = self._source(X)
        n, d = src.shape
        self._check_params(n, d)
        n_init = self._n_init()
        if (callback is not None or resume_from is not None) and n_init != 1:
            raise ValueError(f"callback and resume_from need n_init=1, got n_init={n_init}")
        rs = check_random_state(self.random_state)
        backend = get_backend()
        t_load = time.perf_counter()
        blocks = load_blocks(src, backend, self.persist)
        name = f"dkm-kmeans-{backend.new_token()}"
        best = None
        for run in range(n_init):
            seed = int(rs.randint(np.iinfo(np.int32).max))
            if run == 0 or self.init == "k-means||":
                # The statistics pass validates the data, gives the variance for tol and the
                # k-means|| first centre (seeded, so it is redone for each k-means|| start).
                stats = compute_stats(blocks, seed, name=f"{name}-r{run}")
            if run == 0:
                load_seconds = time.perf_counter() - t_load
            tol_abs = float(self.tol) * float(np.mean(stats["var"]))
            start = None
            if resume_from is not None:
                centers0 = np.asarray(resume_from["centers"], dtype=np.float64)
                check_init_array(centers0, self.n_clusters, d)
                hist = resume_from["history"]
                start = {
                    "iteration": int(resume_from["iteration"]),
                    "centers": centers0,
                    "history": {key: hist[key].values.tolist() for key in hist.data_vars},
                }
                centre(blocks, f"{name}-r{run}")  # initialisation would have done it
                info = {"resumed_from_iteration": start["iteration"], "passes": 0}
            else:
                centers0, info = self._initial_centers(blocks, seed, f"{name}-r{run}", run == 0)
            res = lloyd(
                blocks,
                centers0,
                max_iter=self.max_iter,
                tol=tol_abs,
                empty_cluster=self.empty_cluster,
                seed=seed,
                name=f"{name}-r{run}",
                verbose=self.verbose,
                start=start,
                callback=None if callback is None else self._state_reporter(callback, seed),
            )
            if best is None or res.inertia < best[0].inertia:
                best = (res, info, tol_abs)
        res, info, tol_abs = best
        self._store_fit(res, info, tol_abs, blocks, backend, d, load_seconds)
        return self

    def _state_reporter(self, callback: Callable[[dict], None], seed: int):
        def report(iteration: int, centers: np.ndarray, history: dict) -> None:
            callback(
                {
                    "iteration": iteration,
                    "centers": centers.copy(),
                    "history": _history_dataset(history),
                    "state": {"seed": seed},
                }
            )

        return report

    def _store_fit(self, res, info, tol_abs, blocks, backend, d, load_seconds) -> None:
        self._x_mean = blocks.shift
        self._centers_centred = res.centers
        self.cluster_centers_ = res.centers + blocks.shift
        self.inertia_ = res.inertia
        self.n_iter_ = res.n_iter
        self.n_features_in_ = d
        self.init_info_ = info
        self.labels_ = _labels_array(blocks, res.labels)
        self.history_ = _history_dataset(res.history)
        self.history_.attrs.update(
            {
                "algorithm": "lloyd",
                "init": self.init if isinstance(self.init, str) else "array",
                "empty_cluster": self.empty_cluster,
                "converged": res.converged,
                "tol_abs": tol_abs,
                "n_blocks": blocks.nblocks,
                "streamed": int(blocks.streamed),
                "backend": "distributed" if backend.is_distributed else "threads",
                "init_seconds": float(info.get("seconds", 0.0)),
                "load_seconds": float(load_seconds),
            }
        )


class MiniBatchKMeans(_KMeansBase):
    """Mini-batch k-means (Sculley 2010) over dask / distributed data.

    Parameters
    ----------
    n_clusters : int, default 8
    init : {"k-means++", "k-means||", "random", "sample"} or array, default "k-means++"
        "k-means++" (as scikit-learn) runs on ``init_size`` random rows; "k-means||" runs on
        all the data on the cluster.
    max_iter : int, default 100
        Maximum number of epochs (passes' worth of samples).
    batch_size : int, default 4096
    tol : float, default 0.0
        Stop when the squared centre change of a step is at most ``tol`` times the mean
        feature variance (0 disables it, as in scikit-learn).
    max_no_improvement : int or None, default 10
        Stop after this many steps without improvement of the smoothed batch inertia.
    init_size : int, optional
        Rows used for "k-means++"/"random"/"sample" and to compare ``n_init`` candidates
        (default ``3 * batch_size``, at least ``3 * n_clusters``).
    n_init : int or "auto", default "auto"
        Initialisations compared on the ``init_size`` rows ("auto": 1 for k-means++ and
        k-means||, 3 otherwise; scikit-learn's rule).
    reassignment_ratio : float, default 0.01
        Centres with fewer than this fraction of the largest count are moved to random batch
        rows (every ``10 * n_clusters`` samples, or when a centre has never been hit).
    random_state : int, RandomState or None
    dtype, persist, variable
        As in :class:`KMeans`.
    prefetch : int, default 16
        Batches gathered per round trip to the cluster.

    Attributes
    ----------
    cluster_centers_, labels_, inertia_ (final full pass, like scikit-learn), n_iter_
    (epochs started), n_steps_, history_ (over ``iteration`` = step: batch_inertia,
    ewa_inertia, n_reassigned), n_features_in_.
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init: str | np.ndarray = "k-means++",
        max_iter: int = 100,
        batch_size: int = 4096,
        tol: float = 0.0,
        max_no_improvement: int | None = 10,
        init_size: int | None = None,
        n_init: int | str = "auto",
        reassignment_ratio: float = 0.01,
        random_state=None,
        oversampling_factor: float = 2.0,
        init_max_iter: int | None = None,
        dtype=np.float32,
        persist: str | bool = "auto",
        variable: str | None = None,
        prefetch: int = 16,
    ):
        self.n_clusters = n_clusters
        self.init = init
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.init_size = init_size
        self.n_init = n_init
        self.reassignment_ratio = reassignment_ratio
        self.random_state = random_state
        self.oversampling_factor = oversampling_factor
        self.init_max_iter = init_max_iter
        self.dtype = dtype
        self.persist = persist
        self.variable = variable
        self.prefetch = prefetch

    def fit(self, X: Any, y=None, sample_weight=None) -> MiniBatchKMeans:
        """Compute the centroids with mini-batches; labels and inertia from one full pass."""
        with get_backend().blas_limit():
            return self._fit(X, sample_weight)

    def _fit(self, X: Any, sample_weight=None) -> MiniBatchKMeans:
        import xarray as xr

        from dkm.kmeans.lloyd import _objective
        from dkm.kmeans.minibatch import minibatch

        if sample_weight is not None:
            raise NotImplementedError("sample_weight is not supported by dkm.MiniBatchKMeans")
        if self.batch_size < 1 or self.max_iter < 1:
            raise ValueError("batch_size and max_iter must be >= 1")
        src = self._source(X)
        n, d = src.shape
        self._check_params(n, d)
        rs = check_random_state(self.random_state)
        backend = get_backend()
        blocks = load_blocks(src, backend, self.persist)
        name = f"dkm-minibatch-{backend.new_token()}"
        seed = int(rs.randint(np.iinfo(np.int32).max))
        stats = compute_stats(blocks, seed, name=name)
        init = self.init
        is_str = isinstance(init, str)
        n_init = self.n_init
        if n_init == "auto":
            n_init = 1 if (not is_str or init in ("k-means++", "k-means||")) else 3
        init_size = self.init_size or 3 * self.batch_size
        init_size = min(n, max(init_size, 3 * self.n_clusters))
        t0 = time.perf_counter()
        if is_str and init in ("k-means++", "random", "sample"):
            # Like scikit-learn: initialise on a random subset, compare n_init candidates on it.
            centre(blocks, name)
            rows = np.sort(np.random.default_rng(seed).choice(n, init_size, replace=False))
            sub = blocks.take(rows, name=f"{name}-initrows").astype(blocks.dtype)
            best = None
            for _ in range(int(n_init)):
                s = int(rs.randint(np.iinfo(np.int32).max))
                if init == "k-means++":
                    from sklearn.cluster import kmeans_plusplus

                    c, _ = kmeans_plusplus(sub, self.n_clusters, random_state=s)
                elif init == "sample":
                    c = sub[np.random.default_rng(s).choice(len(sub), self.n_clusters, False)]
                else:
                    lo, hi = sub.min(0), sub.max(0)
                    c = lo + np.random.default_rng(s).random((self.n_clusters, d)) * (hi - lo)
                score = kernels.score_chunk(sub, c, np.zeros(d, blocks.dtype), blocks.dtype)
                if best is None or score[0] < best[0]:
                    best = (score[0], np.asarray(c, dtype=np.float64))
            centers0, info = best[1], {"init_size": init_size, "n_init": int(n_init)}
        else:
            centers0, info = self._initial_centers(blocks, seed, name, first=True)
        info["seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = minibatch(
            blocks,
            centers0,
            batch_size=int(self.batch_size),
            max_iter=int(self.max_iter),
            max_no_improvement=self.max_no_improvement,
            tol=float(self.tol) * float(np.mean(stats["var"])),
            reassignment_ratio=float(self.reassignment_ratio),
            seed=seed,
            prefetch=int(self.prefetch),
            name=name,
        )
        fit_seconds = time.perf_counter() - t0
        # Labels and inertia of the final centres: one full pass, as scikit-learn does.
        packed = backend.share(kernels.pack_centers(res.centers, blocks.dtype))
        nb = blocks.nblocks
        steps = backend.map(
            kernels.lloyd_step, blocks.handles, [packed] * nb, [None] * nb, name=f"{name}-final"
        )
        labels = backend.map(kernels.step_labels, steps, name=f"{name}-final-labels")
        st = backend.map(kernels.step_stats, steps, name=f"{name}-final-stats")
        sums, counts, _ = backend.reduce(
            st, kernels.combine_stats, name=f"{name}-final-sum", nbytes=8 * res.centers.size
        )
        self.inertia_ = _objective(blocks.stats["sq_norm_total"], res.centers, sums, counts)
        self._x_mean = blocks.shift
        self._centers_centred = res.centers
        self.cluster_centers_ = res.centers + blocks.shift
        self.labels_ = _labels_array(blocks, labels)
        self.n_iter_ = res.n_iter
        self.n_steps_ = res.n_steps
        self.n_features_in_ = d
        self.init_info_ = info
        self.history_ = xr.Dataset(
            {key: ("iteration", np.asarray(v, dtype=float)) for key, v in res.history.items()},
            coords={"iteration": np.arange(1, res.n_steps + 1)},
            attrs={
                "algorithm": "minibatch",
                "init": init if is_str else "array",
                "stopped": res.stopped,
                "batch_size": int(self.batch_size),
                "fit_seconds": fit_seconds,
                "samples_per_second": res.n_steps * self.batch_size / max(fit_seconds, 1e-9),
                "n_blocks": nb,
                "backend": "distributed" if backend.is_distributed else "threads",
            },
        )
        return self
