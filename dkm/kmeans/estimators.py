"""scikit-learn style k-means estimators: :class:`KMeans` (Lloyd) and :class:`MiniBatchKMeans`.

Both share one initialisation (:func:`dkm.kmeans.init.initialize`), one final assignment pass
(:func:`dkm.kmeans.lloyd.assign_pass`) and predict / transform / score; each declares its
parameter rules once in ``_param_rules``, which job files are checked against too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import xarray as xr
from sklearn.base import ClusterMixin, TransformerMixin
from sklearn.utils import check_random_state

from dkm._parallel.backend import get_backend
from dkm._parallel.base import FitState, ParallelEstimator, history_dataset
from dkm._parallel.blocks import Blocks, center, compute_stats, load_blocks, rows_array
from dkm._parallel.kernels import Tiles
from dkm._parallel.keys import Keys
from dkm._validation import Interval, Options, Range, short_repr
from dkm.kmeans import _kernels
from dkm.kmeans.init import (
    DEFAULT_OVERSAMPLING,
    INIT_METHODS,
    check_init_array,
    data_range,
    init_on_rows,
    initialize,
)
from dkm.kmeans.lloyd import (
    ASSIGNMENTS,
    EMPTY_POLICIES,
    LloydProgress,
    assign_pass,
    lloyd,
    objective,
    row_state_bytes,
)
from dkm.kmeans.minibatch import minibatch

__all__ = ["KMeans", "MiniBatchKMeans"]


_COMMON_RULES = {
    "n_clusters": [Interval(int, 1)],
    "init": [Options(*INIT_METHODS), "array-like"],
    "init_range": [Range(), None],
    "max_iter": [Interval(int, 1)],
    "tol": [Interval(float, 0)],
    "random_state": ["random_state", None],
    "oversampling_factor": [Interval(float, 0, closed="neither")],
    "init_max_iter": [Interval(int, 1), None],
    "init_size": [Interval(int, 1), None],
    "dtype": ["dtype"],
    "persist": [Options("auto"), "boolean"],
    "variable": ["string", None],
}


def _uses_range(params: Mapping[str, Any]) -> bool:
    """Whether a draw reads ``init_range``: "uniform" init or the "random-vector" policy."""
    init = params.get("init")
    uniform = isinstance(init, str) and init == "uniform"
    return uniform or params.get("empty_cluster") == "random-vector"


class _KMeansBase(ClusterMixin, TransformerMixin, ParallelEstimator):
    """What both k-means estimators share: data checks, initialisation, predict/transform."""

    @classmethod
    def joint_problems(cls, params: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Problems between parameters that each pass their own rule, as ``(name, message)``.

        ``init_range`` only means something to ``init="uniform"`` and to the
        ``empty_cluster="random-vector"`` policy; given with neither, it would be silently
        ignored, so it is refused.
        """
        if params.get("init_range") is None or _uses_range(params):
            return []
        init, policy = params.get("init"), params.get("empty_cluster")
        if "empty_cluster" in cls._param_rules:
            used = "init='uniform' or empty_cluster='random-vector'"
            got = f"init={short_repr(init)} and empty_cluster={short_repr(policy)}"
        else:
            used, got = "init='uniform'", f"init={short_repr(init)}"
        return [("init_range", f"is used only with {used}, got {got}; remove init_range")]

    def _validate_params(self) -> None:
        super()._validate_params()
        found = self.joint_problems(self.get_params(deep=False))
        if found:
            raise ValueError(
                f"{type(self).__name__}: " + "; ".join(f"{name} {msg}" for name, msg in found)
            )

    def _value_range(self, blocks: Blocks) -> tuple[float, float]:
        """``(lo, hi)`` of "uniform" and "random-vector": ``init_range``, else the data's
        global [min, max] (read once per fit, from the first statistics pass)."""
        if self.init_range is not None:
            lo, hi = self.init_range
            return float(lo), float(hi)
        return data_range(blocks)

    def _check_data(self, n_samples: int, n_features: int) -> None:
        if self.n_clusters > n_samples:
            raise ValueError(f"n_clusters={self.n_clusters} must be <= n_samples={n_samples}")
        if not isinstance(self.init, str):
            check_init_array(self.init, self.n_clusters, n_features)

    def _initialize(
        self,
        blocks: Blocks,
        seed: int,
        keys: Keys,
        center_blocks: bool,
        value_range: tuple[float, float] | None = None,
    ) -> tuple[np.ndarray, dict]:
        t0 = time.perf_counter()
        centers, info = initialize(
            blocks,
            self.init,
            self.n_clusters,
            seed,
            keys,
            center_blocks=center_blocks,
            init_size=self.init_size,
            oversampling_factor=self.oversampling_factor,
            rounds=self.init_max_iter,
            value_range=value_range,
        )
        info["seconds"] = time.perf_counter() - t0
        return centers, info

    def _final_pass(self, blocks: Blocks, centers: np.ndarray, keys: Keys, algorithm: str):
        """Labels and inertia of final centres: one assignment pass over the data."""
        done = assign_pass(
            blocks, centers, [None] * blocks.nblocks, keys, algorithm=algorithm, phase="final"
        )
        sums, counts = done.totals[:2]
        return done.labels, objective(blocks.stats["sq_norm_total"], centers, sums, counts)

    def _set_model(self, centers_centered: np.ndarray, shift: np.ndarray) -> None:
        self._x_mean = np.asarray(shift)
        self._centers_centered = np.asarray(centers_centered)
        self.cluster_centers_ = self._centers_centered + self._x_mean
        self.n_features_in_ = int(self._centers_centered.shape[1])

    # What a results store keeps of the fitted model (the runner writes it, load_model reads
    # it back): arrays by name with their dims, and the scalars a run records.
    def _stored_model(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        return {
            "centroids": (("cluster", "feature"), self.cluster_centers_),
            "x_mean": (("feature",), np.asarray(self._x_mean)),
        }

    def _stored_summary(self) -> dict[str, float]:
        return {"inertia": float(self.inertia_), "n_iter": int(self.n_iter_)}

    def _restore_stored(self, ds: xr.Dataset, attrs: dict, history: xr.Dataset) -> None:
        centroids = ds["centroids"].values
        # Runs written before x_mean was stored were fitted on data centered the same way,
        # but the mean was not kept: predicting from uncentered centroids differs only in
        # rounding.
        x_mean = ds["x_mean"].values if "x_mean" in ds else np.zeros(centroids.shape[1])
        self._restore(centroids, x_mean, attrs, history)

    def _restore(
        self, centroids: np.ndarray, x_mean: np.ndarray, attrs: dict, history: xr.Dataset
    ) -> None:
        """Become the fitted model a results store recorded (see :func:`dkm.load_model`)."""
        dtype = np.dtype(self.dtype)
        shift = np.asarray(x_mean, dtype=dtype)
        self._set_model(np.asarray(centroids, dtype=dtype) - shift, shift)
        self.cluster_centers_ = np.asarray(centroids, dtype=dtype)
        self.inertia_ = float(attrs["inertia"])
        self.n_iter_ = int(attrs["n_iter"])
        self.history_ = history
        self.history_.attrs.update(attrs.get("history_attrs", {}))

    def _kernel_args(self) -> tuple:
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "cluster_centers_")
        return (self._centers_centered, self._x_mean, self.dtype, Tiles.from_config())

    def predict(self, X: Any):
        """Index of the nearest centroid for each sample.

        Streams over the chunks of ``X``: for a dask / xarray / Zarr input the result is a
        lazy dask array; for numpy input a numpy array.
        """
        return self._map_rows(
            X, _kernels.predict_chunk, self._kernel_args(), out_cols=None, dtype=np.int32
        )

    def transform(self, X: Any):
        """Euclidean distance of each sample to every centroid, ``(n_samples, n_clusters)``.

        Lazy (dask) for dask / xarray / Zarr input, numpy for numpy input.
        """
        k = self.cluster_centers_.shape[0]
        return self._map_rows(
            X, _kernels.transform_chunk, self._kernel_args(), out_cols=k, dtype=self.dtype
        )

    def score(self, X: Any, y=None) -> float:
        """Opposite of the sum of squared distances to the nearest centroid (computed)."""
        return -self._sum_rows(X, _kernels.score_chunk, self._kernel_args())

    def fit_predict(self, X: Any, y=None, sample_weight=None):
        """Fit and return the labels (numpy for numpy input, else the lazy ``labels_``)."""
        self.fit(X, sample_weight=sample_weight)
        if isinstance(X, np.ndarray):
            return self.labels_.compute()
        return self.labels_


@dataclass
class _Best:
    """The best finished start of a fit (labels None when it was restored from a state)."""

    start: int
    centers: np.ndarray
    inertia: float
    n_iter: int
    converged: str
    history: dict
    info: dict
    tol_abs: float
    labels: list | None

    def state(self) -> FitState:
        return FitState(
            start=self.start,
            iteration=self.n_iter,
            params={"centers": self.centers.astype(np.float64)},
            history=history_dataset(self.history),
            info={
                "inertia": self.inertia,
                "n_iter": self.n_iter,
                "converged": self.converged,
                "tol_abs": self.tol_abs,
                "init": self.info,
            },
        )

    @classmethod
    def from_state(cls, state: FitState, dtype) -> _Best:
        info = state.info
        return cls(
            start=state.start,
            centers=np.asarray(state.params["centers"]).astype(dtype),
            inertia=float(info["inertia"]),
            n_iter=int(info["n_iter"]),
            converged=str(info["converged"]),
            history={k: state.history[k].values.tolist() for k in state.history.data_vars},
            info=dict(info.get("init", {})),
            tol_abs=float(info["tol_abs"]),
            labels=None,
        )


class KMeans(_KMeansBase):
    """K-means clustering with Lloyd's algorithm on dask / dask.distributed.

    Parameters
    ----------
    n_clusters : int, default 8
        Number of clusters.
    algorithm : {"auto", "lloyd", "hamerly", "yinyang"}, default "auto"
        How each iteration finds every row's nearest centre. "lloyd" computes every
        distance; "hamerly" keeps two distance bounds per row on the workers (8 bytes) and
        skips the rows that cannot change centre, computing distances only for the rest;
        "yinyang" splits the centres into up to 8 groups of nearby centres and keeps one
        lower bound per row and group (up to 36 bytes per row): a row computes distances
        only to the groups whose bound it does not clear, and a group's bound drops only by
        its own centres' largest shift, so it prunes far more than "hamerly" with hundreds
        of centres or more. All give the same labels, centres and history to the last bit
        (a distance is skipped only when the bounds clear the float rounding of the
        distances); pruning is faster once most rows have settled, slower while most rows
        still move near boundaries. "auto" prunes ("hamerly" below 512 centres, "yinyang"
        from there) while the bounds keep at least a fifth of the rows, and runs plain
        iterations otherwise, trying again after 4, 8, 16... of them.
    init : {"k-means||", "k-means++", "random", "sample", "uniform"} or array of shape (k, d)
        "k-means||": Bahmani et al. scalable k-means++ (``init_max_iter`` rounds of
        ``oversampling_factor * k`` samples, weighted reclustering), chunking independent.
        "k-means++": scikit-learn's greedy k-means++ on ``init_size`` rows gathered to this
        process. "random": uniform in the data's bounding box (each feature in its own
        [min, max]). "sample": random data rows. "uniform": independent random vectors,
        every coordinate uniform in the one range ``init_range`` (default: the data's global
        [min, max] over all features), drawn with ``numpy.random.default_rng(seed)
        .uniform(lo, hi, (k, d))`` from the start's seed.
    init_range : (float, float), optional
        ``(lo, hi)``, ``lo < hi``, of "uniform" and of the "random-vector" empty-cluster
        policy, in the data's coordinates; None: the data's global [min, max] (from the
        statistics pass, no extra pass). Only allowed with one of those two.
    n_init : int or "auto", default 1
        Number of initialisations; the run with the lowest inertia is kept. "auto" is 1 for
        "k-means||", "k-means++" and arrays, 10 otherwise (as scikit-learn). Each start
        draws from its own seed.
    max_iter : int, default 300
        Maximum number of Lloyd iterations.
    tol : float, default 1e-4
        Relative tolerance: the run stops when the sum of squared centroid shifts is at most
        ``tol * mean(feature variance)`` (scikit-learn semantics), or when no label changed.
    random_state : int, RandomState or None
        Seed. Same seed, same data and same chunking give the same result; k-means|| is also
        independent of the chunking.
    empty_cluster : {"farthest", "random-point", "random-vector", "zero", "keep"}, \
default "farthest"
        Policy for a cluster that loses all its points: move the farthest points to it (like
        scikit-learn; costs one extra pass in the iterations where it fires), a random data
        row, a random vector (every coordinate uniform in ``init_range``, as "uniform"), the
        zero vector, or keep the old centroid. The random policies draw from
        ``numpy.random.default_rng([seed, iteration])`` (the start's seed, 0-based
        iteration), so threads, a cluster and a resumed fit reset alike. Counts go to
        ``history_``.
    oversampling_factor : float, default 0.5
        k-means|| candidates per round in units of ``n_clusters``. The rounds cost about
        ``init_max_iter * oversampling_factor`` Lloyd iterations; the candidates are
        reclustered as the means of the rows nearest each, so a quarter of Bahmani et al.'s
        2k per round initialises as well (Fashion-MNIST patches, k=4096: 2.5 iterations'
        worth instead of 10, initial inertia 294,843 against scikit-learn k-means++'s
        320,953).
    init_max_iter : int, optional
        k-means|| rounds (default 5).
    init_size : int, optional
        Rows gathered for "k-means++" (default: all).
    dtype : float32 or float64, default float32
        Working precision. Integer and boolean inputs are cast to it as values (no scaling).
    persist : "auto", bool, default "auto"
        Persist the data on the cluster once ("auto": when it fits in the cluster memory
        share ``dkm.blocks.persist-fraction``); ``False`` streams a Zarr input from the store
        every iteration.
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
        submitted), extra_passes, n_computed (rows whose distances were computed: all of
        them with "lloyd", those the bounds could not keep with "hamerly"), in_round (1 when
        the iteration ran in a round of long tasks on a cluster, several iterations per
        scheduler round trip, ``dkm.lloyd.rounds``; n_tasks then counts the round's tasks on
        its first iteration and 0 on the others); attrs: init,
        empty_cluster, assignment, converged, tol_abs, n_blocks, and init_range
        ``[lo, hi]`` when "uniform" or "random-vector" used one.
    init_info_ : dict
        Details of the initialisation (seconds, passes; rounds and candidates for k-means||).
    n_features_in_ : int

    Notes
    -----
    Each iteration is one pass over the data: per block a tiled GEMM of ``[x, 1]`` against
    ``[-2 C, ||c||^2]`` gives the argmin, and float64 partial sums and counts are reduced in a
    tree; only a ``k x d`` array travels back per iteration.
    """

    _param_rules: ClassVar = {
        **_COMMON_RULES,
        "n_init": [Interval(int, 1), Options("auto")],
        "empty_cluster": [Options(*EMPTY_POLICIES)],
        "algorithm": [Options("auto", *ASSIGNMENTS)],
        "verbose": ["boolean"],
    }

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        algorithm: str = "auto",
        init: str | np.ndarray = "k-means||",
        init_range: tuple[float, float] | None = None,
        n_init: int | str = 1,
        max_iter: int = 300,
        tol: float = 1e-4,
        random_state=None,
        empty_cluster: str = "farthest",
        oversampling_factor: float = DEFAULT_OVERSAMPLING,
        init_max_iter: int | None = None,
        init_size: int | None = None,
        dtype=np.float32,
        persist: str | bool = "auto",
        variable: str | None = None,
        verbose: bool = False,
    ):
        self.n_clusters = n_clusters
        self.algorithm = algorithm
        self.init = init
        self.init_range = init_range
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
        if not isinstance(self.init, str):
            return 1  # an explicit array gives one deterministic start (scikit-learn warns)
        if self.n_init == "auto":
            return 10 if self.init in ("random", "sample", "uniform") else 1
        return int(self.n_init)

    def fit(
        self,
        X: Any,
        y=None,
        sample_weight=None,
        *,
        callback: Callable[[FitState], None] | None = None,
        resume_from: FitState | None = None,
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
            Called with a :class:`~dkm._parallel.base.FitState` once each start is
            initialised (``iteration == 0``) and after every Lloyd iteration: the current
            start, its centres (float64, in the centered coordinates the iterations run in),
            its history so far, and the best finished start. The hook for checkpoints and
            progress.
        resume_from : FitState, optional
            A state from ``callback``: skips what was done and continues. Same data,
            chunking and ``random_state`` give the same final model as an uninterrupted fit,
            for any ``n_init``.

        Returns
        -------
        self
        """
        with get_backend().blas_limit():
            return self._fit(X, sample_weight, callback, resume_from)

    def _fit(self, X: Any, sample_weight, callback, resume_from: FitState | None) -> KMeans:
        if sample_weight is not None:
            raise NotImplementedError("sample_weight is not supported by dkm.KMeans")
        self._validate_params()
        src = self._source(X)
        n, d = src.shape
        self._check_data(n, d)
        n_init = self._n_init()
        if resume_from is not None:
            resume_from.check(n_init, {"centers": (self.n_clusters, d)})
        seeds = self._draw_seeds(n_init)
        kpar = isinstance(self.init, str) and self.init == "k-means||"
        state = row_state_bytes(self.algorithm, self.n_clusters, d, src.dtype, kpar, n_init)
        src = replace(src, row_state=state)
        backend = get_backend()
        t_load = time.perf_counter()
        blocks = load_blocks(src, backend, self.persist)
        dtype = blocks.dtype
        keys = Keys.new()
        first = 0 if resume_from is None else resume_from.start
        best = None
        stats = None
        value_range = None  # of "uniform" / "random-vector", from the first statistics
        if resume_from is not None:
            if resume_from.best is not None:
                best = _Best.from_state(resume_from.best, dtype)
            # Bring the blocks and statistics to where an uninterrupted fit had them at this
            # start: the first start's statistics and centering, then (k-means|| only) this
            # start's own statistics pass over the centered blocks.
            stats = compute_stats(blocks, seeds[0], keys.sub(r=0))
            value_range = self._value_range(blocks)
            center(blocks, keys.sub(r=0))
            if first > 0 and kpar:
                stats = compute_stats(blocks, seeds[first], keys.sub(r=first))
        load_seconds = None
        for run in range(first, n_init):
            rkeys, seed = keys.sub(r=run), seeds[run]
            resumed = resume_from is not None and run == first
            if not resumed and (run == 0 or kpar):
                # Validates the data, gives the variance for tol and the k-means|| first
                # centre (seeded, so it is redone for each k-means|| start).
                stats = compute_stats(blocks, seed, rkeys)
            if value_range is None:
                value_range = self._value_range(blocks)
            if load_seconds is None:
                load_seconds = time.perf_counter() - t_load
            tol_abs = float(self.tol) * float(np.mean(stats["var"]))
            if resumed:
                start = _progress_from_state(resume_from)
                info = {
                    **resume_from.info.get("init", {}),
                    "resumed_from_iteration": resume_from.iteration,
                }
                centers0 = start.centers
            else:
                start = None
                centers0, info = self._initialize(
                    blocks, seed, rkeys, center_blocks=run == 0, value_range=value_range
                )
                # Rounded to the working dtype as the iterations will see them.
                centers0 = np.asarray(centers0, dtype=dtype).astype(np.float64)
                if callback is not None:
                    callback(
                        FitState(
                            run,
                            0,
                            {"centers": centers0},
                            history_dataset({}),
                            {"seed": seed, "init": info},
                            None if best is None else best.state(),
                        )
                    )
            res = lloyd(
                blocks,
                centers0,
                max_iter=self.max_iter,
                tol=tol_abs,
                empty_cluster=self.empty_cluster,
                seed=seed,
                keys=rkeys,
                verbose=self.verbose,
                start=start,
                value_range=value_range,
                assignment=self.algorithm,
                callback=None
                if callback is None
                else _state_reporter(callback, run, seed, info, best),
            )
            if best is None or res.inertia < best.inertia:
                best = _Best(
                    run,
                    res.centers,
                    res.inertia,
                    res.n_iter,
                    res.converged,
                    res.history,
                    info,
                    tol_abs,
                    res.labels,
                )
        if best.labels is None:  # restored from a state: its labels were not kept
            best.labels, _ = self._final_pass(blocks, best.centers, keys, "lloyd")
        self._store_fit(best, blocks, backend, load_seconds, value_range)
        return self

    def _store_fit(self, best: _Best, blocks: Blocks, backend, load_seconds, value_range) -> None:
        self._set_model(best.centers, blocks.shift)
        self.inertia_ = best.inertia
        self.n_iter_ = best.n_iter
        self.init_info_ = best.info
        self.labels_ = rows_array(blocks, best.labels, np.int32)
        self.history_ = history_dataset(best.history)
        self.history_.attrs.update(
            {
                "algorithm": "lloyd",
                "init": self.init if isinstance(self.init, str) else "array",
                "empty_cluster": self.empty_cluster,
                "assignment": self.algorithm,
                "converged": best.converged,
                "tol_abs": best.tol_abs,
                "best_start": best.start,
                "n_blocks": blocks.nblocks,
                "streamed": int(blocks.streamed),
                "backend": "distributed" if backend.is_distributed else "threads",
                "init_seconds": float(best.info.get("seconds", 0.0)),
                "load_seconds": float(load_seconds),
            }
        )
        if _uses_range(self.get_params(deep=False)):
            self.history_.attrs["init_range"] = [float(v) for v in value_range]


def _progress_from_state(state: FitState) -> LloydProgress:
    hist = state.history
    return LloydProgress(
        iteration=state.iteration,
        centers=np.asarray(state.params["centers"], dtype=np.float64),
        previous_centers=state.params.get("previous_centers"),
        history={key: hist[key].values.tolist() for key in hist.data_vars},
        stopped=state.info.get("stopped"),
        inertia=state.info.get("inertia"),
    )


def _state_reporter(
    callback: Callable[[FitState], None], run: int, seed: int, info: dict, best: _Best | None
) -> Callable[[LloydProgress], None]:
    best_state = None if best is None else best.state()

    def report(p: LloydProgress) -> None:
        params = {"centers": p.centers.copy()}
        if p.previous_centers is not None:
            params["previous_centers"] = p.previous_centers.copy()
        state_info = {"seed": seed, "init": info, "stopped": p.stopped, "inertia": p.inertia}
        callback(
            FitState(run, p.iteration, params, history_dataset(p.history), state_info, best_state)
        )

    return report


class MiniBatchKMeans(_KMeansBase):
    """Mini-batch k-means (Sculley 2010) over dask / distributed data.

    Parameters
    ----------
    n_clusters : int, default 8
    init : {"k-means++", "k-means||", "random", "sample", "uniform"} or array, \
default "k-means++"
        "k-means++" (as scikit-learn) runs on ``init_size`` random rows; "k-means||" runs on
        all the data on the cluster. "random" (each feature uniform in its own [min, max]),
        "sample" (random rows) and "uniform" (every coordinate uniform in ``init_range``)
        as in :class:`KMeans`; their ``n_init`` candidates are compared on the
        ``init_size`` rows.
    init_range : (float, float), optional
        ``(lo, hi)``, ``lo < hi``, of "uniform" in the data's coordinates; None: the data's
        global [min, max]. Only allowed with ``init="uniform"`` (mini-batch has no
        empty-cluster policy: ``reassignment_ratio`` moves starved centres to batch rows).
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
    oversampling_factor, init_max_iter
        k-means|| settings, as in :class:`KMeans`.
    dtype, persist, variable
        As in :class:`KMeans`.
    prefetch : int, default 16
        Batches gathered per round trip to the cluster.

    Attributes
    ----------
    cluster_centers_, labels_, inertia_ (final full pass, like scikit-learn), n_iter_
    (epochs started), n_steps_, history_ (over ``iteration`` = step: batch_inertia,
    ewa_inertia, n_reassigned; attrs include init_range ``[lo, hi]`` for "uniform"),
    n_features_in_.
    """

    _param_rules: ClassVar = {
        **_COMMON_RULES,
        "batch_size": [Interval(int, 1)],
        "max_no_improvement": [Interval(int, 1), None],
        "n_init": [Interval(int, 1), Options("auto")],
        "reassignment_ratio": [Interval(float, 0)],
        "prefetch": [Interval(int, 1)],
    }

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init: str | np.ndarray = "k-means++",
        init_range: tuple[float, float] | None = None,
        max_iter: int = 100,
        batch_size: int = 4096,
        tol: float = 0.0,
        max_no_improvement: int | None = 10,
        init_size: int | None = None,
        n_init: int | str = "auto",
        reassignment_ratio: float = 0.01,
        random_state=None,
        oversampling_factor: float = DEFAULT_OVERSAMPLING,
        init_max_iter: int | None = None,
        dtype=np.float32,
        persist: str | bool = "auto",
        variable: str | None = None,
        prefetch: int = 16,
    ):
        self.n_clusters = n_clusters
        self.init = init
        self.init_range = init_range
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

    def _subset_init(
        self, blocks: Blocks, seed: int, rs, keys: Keys, value_range: tuple[float, float]
    ) -> tuple[np.ndarray, dict]:
        """scikit-learn's mini-batch initialisation: ``n_init`` candidates drawn on a random
        ``init_size`` subset of rows, the one with the lowest inertia on it kept."""
        n, k = blocks.n, self.n_clusters
        n_init = self.n_init
        if n_init == "auto":
            n_init = 1 if self.init == "k-means++" else 3
        init_size = self.init_size or 3 * self.batch_size
        init_size = min(n, max(init_size, 3 * k))
        center(blocks, keys)
        rows = np.sort(np.random.default_rng(seed).choice(n, init_size, replace=False))
        sub = blocks.take(rows, name=keys("minibatch", "init-rows")).astype(blocks.dtype)
        tiles = Tiles.from_config()
        best = None
        for _ in range(int(n_init)):
            candidate = init_on_rows(
                sub,
                self.init,
                k,
                int(rs.randint(np.iinfo(np.int32).max)),
                value_range=value_range,
                shift=blocks.shift,
            )
            score = _kernels.score_chunk(
                sub, candidate, np.zeros(blocks.d, blocks.dtype), blocks.dtype, tiles
            )
            if best is None or score[0] < best[0]:
                best = (score[0], candidate)
        return best[1], {"init_size": init_size, "n_init": int(n_init), "passes": 0}

    def _fit(self, X: Any, sample_weight=None) -> MiniBatchKMeans:
        if sample_weight is not None:
            raise NotImplementedError("sample_weight is not supported by dkm.MiniBatchKMeans")
        self._validate_params()
        src = self._source(X)
        n, d = src.shape
        self._check_data(n, d)
        rs = check_random_state(self.random_state)
        # The steps keep nothing per row; the labels pass at the end is a plain Lloyd pass
        # (reserved as Lloyd's two: 4 bytes per row spare), k-means|| its running minimum.
        kpar = isinstance(self.init, str) and self.init == "k-means||"
        state = row_state_bytes("lloyd", self.n_clusters, d, src.dtype, kpar, 1)
        src = replace(src, row_state=state)
        backend = get_backend()
        blocks = load_blocks(src, backend, self.persist)
        keys = Keys.new()
        seed = int(rs.randint(np.iinfo(np.int32).max))
        stats = compute_stats(blocks, seed, keys)
        value_range = self._value_range(blocks)  # before centering moves the statistics
        t0 = time.perf_counter()
        if isinstance(self.init, str) and self.init in ("k-means++", "random", "sample", "uniform"):
            centers0, info = self._subset_init(blocks, seed, rs, keys, value_range)
        else:
            centers0, info = self._initialize(blocks, seed, keys, center_blocks=True)
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
            keys=keys,
        )
        fit_seconds = time.perf_counter() - t0
        labels, self.inertia_ = self._final_pass(blocks, res.centers, keys, "minibatch")
        self._set_model(res.centers, blocks.shift)
        self.labels_ = rows_array(blocks, labels, np.int32)
        self.n_iter_ = res.n_iter
        self.n_steps_ = res.n_steps
        self.init_info_ = info
        self.history_ = xr.Dataset(
            {key: ("iteration", np.asarray(v, dtype=float)) for key, v in res.history.items()},
            coords={"iteration": np.arange(1, res.n_steps + 1)},
            attrs={
                "algorithm": "minibatch",
                "init": self.init if isinstance(self.init, str) else "array",
                "stopped": res.stopped,
                "batch_size": int(self.batch_size),
                "fit_seconds": fit_seconds,
                "samples_per_second": res.n_steps * self.batch_size / max(fit_seconds, 1e-9),
                "n_blocks": blocks.nblocks,
                "backend": "distributed" if backend.is_distributed else "threads",
                "n_rounds": res.n_rounds,
                "sync_every": res.sync_every,
            },
        )
        if _uses_range(self.get_params(deep=False)):
            self.history_.attrs["init_range"] = [float(v) for v in value_range]
        return self
