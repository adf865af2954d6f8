"""scikit-learn style Gaussian mixture on dask: :class:`GaussianMixture`.

The sibling of :class:`dkm.KMeans`: the same input handling and blocks, the same fit state
for callbacks, checkpoints and resume, the same per-chunk predict; EM itself is in
:mod:`dkm.mixture.em`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import xarray as xr
from sklearn.base import DensityMixin
from sklearn.exceptions import ConvergenceWarning

from dkm._parallel.backend import get_backend
from dkm._parallel.base import FitState, ParallelEstimator, history_dataset
from dkm._parallel.blocks import Blocks, center, compute_stats, load_blocks
from dkm._parallel.keys import Keys
from dkm._validation import Interval, Options
from dkm.mixture import _kernels
from dkm.mixture.em import (
    COVARIANCE_TYPES,
    INIT_PARAMS,
    EMProgress,
    GaussianParams,
    covariance_shape,
    em,
    initial_params,
    precisions_from_cholesky,
)

__all__ = ["GaussianMixture"]


@dataclass
class _Best:
    """The best finished start of a fit (by lower bound, as scikit-learn picks it)."""

    start: int
    params: GaussianParams
    lower_bound: float
    n_iter: int
    converged: bool
    history: dict
    info: dict

    def state(self) -> FitState:
        return FitState(
            start=self.start,
            iteration=self.n_iter,
            params=self.params.as_dict(),
            history=history_dataset(self.history),
            info={
                "lower_bound": self.lower_bound,
                "n_iter": self.n_iter,
                "converged": self.converged,
                "init": self.info,
            },
        )

    @classmethod
    def from_state(cls, state: FitState) -> _Best:
        info = state.info
        return cls(
            start=state.start,
            params=GaussianParams.from_dict(state.params),
            lower_bound=float(info["lower_bound"]),
            n_iter=int(info["n_iter"]),
            converged=bool(info["converged"]),
            history={k: state.history[k].values.tolist() for k in state.history.data_vars},
            info=dict(info.get("init", {})),
        )


class GaussianMixture(DensityMixin, ParallelEstimator):
    """Gaussian mixture fitted by EM on dask / dask.distributed (scikit-learn's API).

    Parameters
    ----------
    n_components : int, default 1
        Number of mixture components.
    covariance_type : {"full", "tied", "diag", "spherical"}, default "full"
        Each component its own full covariance; one full covariance shared by all; a
        diagonal covariance each; one variance each.
    tol : float, default 1e-3
        Stop when the lower bound (mean log-likelihood) changes by less than ``tol``.
    reg_covar : float, default 1e-6
        Added to the diagonal of every covariance (keeps them positive definite).
    max_iter : int, default 100
        Maximum number of EM iterations per start.
    n_init : int, default 1
        Number of starts; the one with the largest lower bound is kept.
    init_params : {"kmeans", "k-means++", "random", "random_from_data"}, default "kmeans"
        Responsibilities the initial parameters are computed from: labels of dkm's k-means
        (k-means|| then Lloyd, on the cluster); dkm's k-means++ centres (the rows are
        gathered to this process, like :class:`dkm.KMeans` with ``init="k-means++"``) or
        distinct random rows, each a one-row component; or uniform random responsibilities
        (drawn per row, independent of the chunking).
    weights_init : array of shape (n_components,), optional
    means_init : array of shape (n_components, n_features), optional
    precisions_init : array, optional
        Initial weights, means and precisions (inverse covariances; shape by
        ``covariance_type`` as ``precisions_``), replacing those from ``init_params``.
    random_state : int, RandomState or None
        Seed of the initialisations. Same seed, data and chunking give the same model;
        "kmeans" and "random" do not depend on the chunking either.
    dtype : float32 or float64, default float32
        Precision the rows are held in on the workers. The E-step and the statistics are
        computed in float64 whatever it is, tile by tile.
    persist : "auto", bool, default "auto"
        As :class:`dkm.KMeans`: persist the data on the cluster once, or (``False``) stream
        a Zarr input every iteration.
    variable : str, optional
        Variable to use when X is a Zarr store with several 2-D float variables.
    verbose : bool, default False
        Log one line per EM iteration on the "dkm" logger.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_features)
    covariances_, precisions_, precisions_cholesky_ : ndarray
        Shapes by ``covariance_type``: (k, d, d) full, (d, d) tied, (k, d) diag, (k,)
        spherical.
    converged_ : bool
    n_iter_ : int
        EM iterations of the best start.
    lower_bound_ : float
        Mean log-likelihood at the last E-step of the best start.
    lower_bounds_ : list of float
        The lower bound of each iteration of the best start.
    history_ : xarray.Dataset
        Over ``iteration``: lower_bound, seconds, n_tasks (tasks submitted); attrs: init,
        covariance_type, converged, best_start, n_blocks, backend...
    init_info_ : dict
        Details of the best start's initialisation.
    n_features_in_ : int

    Notes
    -----
    Each iteration is one pass over the data: per block, the weighted log densities of
    each component (scikit-learn's formulas, float64), a log-sum-exp per row, and the
    responsibilities' sufficient statistics, reduced in a tree; the M-step runs here on
    ``k x d`` (``k x d x d`` for full covariances) arrays with scikit-learn's formulas and
    ``reg_covar``. From the same initial parameters the fit follows scikit-learn's
    iterates to float rounding.
    """

    _param_rules: ClassVar = {
        "n_components": [Interval(int, 1)],
        "covariance_type": [Options(*COVARIANCE_TYPES)],
        "tol": [Interval(float, 0)],
        "reg_covar": [Interval(float, 0)],
        "max_iter": [Interval(int, 1)],
        "n_init": [Interval(int, 1)],
        "init_params": [Options(*INIT_PARAMS)],
        "weights_init": ["array-like", None],
        "means_init": ["array-like", None],
        "precisions_init": ["array-like", None],
        "random_state": ["random_state", None],
        "dtype": ["dtype"],
        "persist": [Options("auto"), "boolean"],
        "variable": ["string", None],
        "verbose": ["boolean"],
    }

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        random_state=None,
        dtype=np.float32,
        persist: str | bool = "auto",
        variable: str | None = None,
        verbose: bool = False,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.dtype = dtype
        self.persist = persist
        self.variable = variable
        self.verbose = verbose

    # ------------------------------------------------------------------ checks

    def _check_data(self, n_samples: int, n_features: int) -> dict[str, np.ndarray | None]:
        """Shape checks and the initial arrays, validated (scikit-learn's rules)."""
        k = self.n_components
        if n_samples < max(2, k):
            raise ValueError(
                f"n_components={k} needs at least max(2, n_components) samples, "
                f"got n_samples={n_samples}"
            )
        return {
            "weights_init": _check_weights(self.weights_init, k),
            "means_init": _check_array(self.means_init, "means_init", (k, n_features)),
            "precisions_init": _check_precisions(
                self.precisions_init, self.covariance_type, k, n_features
            ),
        }

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        X: Any,
        y=None,
        *,
        callback: Callable[[FitState], None] | None = None,
        resume_from: FitState | None = None,
    ) -> GaussianMixture:
        """Estimate the mixture's parameters with EM.

        Parameters
        ----------
        X : array-like, dask array, xarray.DataArray, or str/Path of a Zarr store
            Feature matrix ``(sample, feature)``.
        y : ignored
        callback : callable, optional
            Called with a :class:`~dkm._parallel.base.FitState` once each start is
            initialised (``iteration == 0``) and after every EM iteration: the current
            start, its parameters (``weights``, ``means`` in the centered coordinates the
            fit runs in, ``covariances``, ``precisions_cholesky``; float64), its history so
            far, and the best finished start. The hook for checkpoints and progress.
        resume_from : FitState, optional
            A state from ``callback``: skips what was done and continues. Same data,
            chunking and ``random_state`` give the same model as an uninterrupted fit.

        Returns
        -------
        self
        """
        with get_backend().blas_limit():
            return self._fit(X, callback, resume_from)

    def _fit(self, X: Any, callback, resume_from: FitState | None) -> GaussianMixture:
        self._validate_params()
        src = self._source(X)
        n, d = src.shape
        given = self._check_data(n, d)
        k, n_init = self.n_components, int(self.n_init)
        if resume_from is not None:
            resume_from.check(n_init, GaussianParams.shapes(self.covariance_type, k, d))
        seeds = self._draw_seeds(n_init)
        by_kmeans = self.init_params == "kmeans" and any(v is None for v in given.values())
        backend = get_backend()
        t_load = time.perf_counter()
        blocks = load_blocks(src, backend, self.persist)
        keys = Keys.new()
        # Validates the data (NaN/inf), gives the mean the blocks are centered on.
        compute_stats(blocks, seeds[0], keys.sub(r=0))
        center(blocks, keys.sub(r=0))
        load_seconds = time.perf_counter() - t_load
        first = 0 if resume_from is None else resume_from.start
        best = None
        if resume_from is not None and resume_from.best is not None:
            best = _Best.from_state(resume_from.best)
        for run in range(first, n_init):
            rkeys, seed = keys.sub(r=run), seeds[run]
            resumed = resume_from is not None and run == first
            if resumed:
                start = _progress_from_state(resume_from)
                info = {
                    **resume_from.info.get("init", {}),
                    "resumed_from_iteration": resume_from.iteration,
                }
            else:
                if by_kmeans and run > 0:
                    # k-means|| draws its first centre in the statistics pass: a seeded
                    # pass per start, as dkm.KMeans does.
                    compute_stats(blocks, seed, rkeys)
                params0, info = initial_params(
                    blocks,
                    self.init_params,
                    k,
                    seed,
                    rkeys,
                    covariance_type=self.covariance_type,
                    reg_covar=float(self.reg_covar),
                    **given,
                )
                start = EMProgress(0, params0, {}, None)
                if callback is not None:
                    callback(_state(run, start, seed, info, best))
            res = em(
                blocks,
                start.params,
                covariance_type=self.covariance_type,
                reg_covar=float(self.reg_covar),
                max_iter=int(self.max_iter),
                tol=float(self.tol),
                keys=rkeys,
                verbose=self.verbose,
                start=start,
                callback=None if callback is None else _reporter(callback, run, seed, info, best),
            )
            if best is None or res.lower_bound > best.lower_bound:
                best = _Best(
                    run, res.params, res.lower_bound, res.n_iter, res.converged, res.history, info
                )
        if not best.converged:
            warnings.warn(
                f"the best of {n_init} start(s) did not converge within max_iter="
                f"{self.max_iter} iterations (lower bound change >= tol={self.tol}); raise "
                "max_iter or tol, or try other initial parameters",
                ConvergenceWarning,
                stacklevel=3,
            )
        self._store_fit(best, blocks, backend, load_seconds)
        return self

    def _store_fit(self, best: _Best, blocks: Blocks, backend, load_seconds: float) -> None:
        self._set_model(best.params, blocks.shift)
        self.converged_ = best.converged
        self.n_iter_ = best.n_iter
        self.lower_bound_ = best.lower_bound
        self.lower_bounds_ = list(best.history.get("lower_bound", []))
        self.init_info_ = best.info
        self.history_ = history_dataset(best.history)
        self.history_.attrs.update(
            {
                "algorithm": "gmm",
                "init": self.init_params,
                "covariance_type": self.covariance_type,
                "converged": int(best.converged),
                "best_start": best.start,
                "n_blocks": blocks.nblocks,
                "streamed": int(blocks.streamed),
                "backend": "distributed" if backend.is_distributed else "threads",
                "init_seconds": float(best.info.get("seconds", 0.0)),
                "load_seconds": float(load_seconds),
            }
        )

    def _set_model(self, params: GaussianParams, shift: np.ndarray) -> None:
        self._x_mean = np.asarray(shift)
        self._means_centered = np.asarray(params.means, dtype=np.float64)
        self.weights_ = np.asarray(params.weights, dtype=np.float64)
        self.means_ = self._means_centered + self._x_mean.astype(np.float64)
        self.covariances_ = np.asarray(params.covariances, dtype=np.float64)
        self.precisions_cholesky_ = np.asarray(params.precisions_cholesky, dtype=np.float64)
        self.precisions_ = precisions_from_cholesky(self.precisions_cholesky_, self.covariance_type)
        self.n_features_in_ = int(self.means_.shape[1])

    # What a results store keeps of the fitted model (the runner writes it, load_model reads
    # it back): arrays by name with their dims, and the scalars a run records.
    def _stored_model(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        cov_dims = _COVARIANCE_DIMS[self.covariance_type]
        return {
            "weights": (("component",), self.weights_),
            "means": (("component", "feature"), self.means_),
            "covariances": (cov_dims, self.covariances_),
            "precisions_cholesky": (cov_dims, self.precisions_cholesky_),
            "x_mean": (("feature",), np.asarray(self._x_mean)),
        }

    def _stored_summary(self) -> dict[str, float]:
        return {
            "lower_bound": float(self.lower_bound_),
            "n_iter": int(self.n_iter_),
            "converged": int(self.converged_),
        }

    def _restore_stored(self, ds: xr.Dataset, attrs: dict, history: xr.Dataset) -> None:
        x_mean = ds["x_mean"].values
        params = GaussianParams(
            ds["weights"].values,
            ds["means"].values - x_mean,
            ds["covariances"].values,
            ds["precisions_cholesky"].values,
        )
        self._set_model(params, x_mean)
        self.lower_bound_ = float(attrs["lower_bound"])
        self.n_iter_ = int(attrs["n_iter"])
        self.converged_ = bool(attrs.get("converged", 1))
        self.history_ = history
        self.history_.attrs.update(attrs.get("history_attrs", {}))

    # ------------------------------------------------------------------ the fitted model

    def _kernel_args(self) -> tuple:
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "means_")
        with np.errstate(divide="ignore"):
            log_w = np.log(self.weights_)
        return (
            self._x_mean,
            self.dtype,
            log_w,
            self._means_centered,
            self.precisions_cholesky_,
            self.covariance_type,
        )

    def predict(self, X: Any):
        """Most probable component of each sample.

        Lazy (dask) for dask / xarray / Zarr input, numpy for numpy input.
        """
        return self._map_rows(
            X, _kernels.predict_chunk, self._kernel_args(), out_cols=None, dtype=np.int64
        )

    def predict_proba(self, X: Any):
        """Posterior probability of each component, ``(n_samples, n_components)``."""
        return self._map_rows(
            X,
            _kernels.proba_chunk,
            self._kernel_args(),
            out_cols=self.n_components,
            dtype=np.float64,
        )

    def score_samples(self, X: Any):
        """Log-likelihood of each sample (lazy for dask / xarray / Zarr input)."""
        return self._map_rows(
            X, _kernels.score_samples_chunk, self._kernel_args(), out_cols=None, dtype=np.float64
        )

    def score(self, X: Any, y=None) -> float:
        """Mean log-likelihood of the samples (computed)."""
        total = self._sum_rows(X, _kernels.score_chunk, self._kernel_args())
        return total / self._source(X).shape[0]

    def _n_parameters(self) -> int:
        """Free parameters of the model (scikit-learn's count)."""
        k, d = self.means_.shape
        cov = {
            "full": k * d * (d + 1) / 2.0,
            "diag": k * d,
            "tied": d * (d + 1) / 2.0,
            "spherical": k,
        }[self.covariance_type]
        return int(cov + d * k + k - 1)

    def bic(self, X: Any) -> float:
        """Bayesian information criterion on X (lower is better)."""
        n = self._source(X).shape[0]
        return -2 * self.score(X) * n + self._n_parameters() * math.log(n)

    def aic(self, X: Any) -> float:
        """Akaike information criterion on X (lower is better)."""
        n = self._source(X).shape[0]
        return -2 * self.score(X) * n + 2 * self._n_parameters()

    def fit_predict(self, X: Any, y=None):
        """Fit, then the most probable component of each sample (one more pass, as
        scikit-learn does): numpy for numpy input, lazy dask otherwise."""
        return self.fit(X).predict(X)


# ------------------------------------------------------------------ fit states


# Dims of covariances_ (and precisions_cholesky_) in a results store, per covariance type.
_COVARIANCE_DIMS = {
    "full": ("component", "feature", "feature_b"),
    "tied": ("feature", "feature_b"),
    "diag": ("component", "feature"),
    "spherical": ("component",),
}


def _state(run: int, p: EMProgress, seed: int, info: dict, best: _Best | None) -> FitState:
    return FitState(
        run,
        p.iteration,
        p.params.as_dict(),
        history_dataset(p.history),
        {"seed": seed, "init": info, "stopped": p.stopped},
        None if best is None else best.state(),
    )


def _reporter(
    callback: Callable[[FitState], None], run: int, seed: int, info: dict, best: _Best | None
) -> Callable[[EMProgress], None]:
    def report(p: EMProgress) -> None:
        callback(_state(run, p, seed, info, best))

    return report


def _progress_from_state(state: FitState) -> EMProgress:
    hist = state.history
    return EMProgress(
        iteration=state.iteration,
        params=GaussianParams.from_dict(state.params),
        history={key: hist[key].values.tolist() for key in hist.data_vars},
        stopped=state.info.get("stopped"),
    )


# ------------------------------------------------------------------ initial arrays


def _check_array(value, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}; expected {shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return arr


def _check_weights(value, k: int) -> np.ndarray | None:
    w = _check_array(value, "weights_init", (k,))
    if w is None:
        return None
    if w.min() < 0 or w.max() > 1:
        raise ValueError(f"weights_init must be in [0, 1], got min {w.min():g} and max {w.max():g}")
    if not np.allclose(np.abs(1.0 - w.sum()), 0.0):
        raise ValueError(f"weights_init must sum to 1, got a sum of {w.sum():.5f}")
    return w


def _check_precisions(value, covariance_type: str, k: int, d: int) -> np.ndarray | None:
    p = _check_array(value, "precisions_init", covariance_shape(covariance_type, k, d))
    if p is None:
        return None
    if covariance_type in ("diag", "spherical"):
        if (p <= 0).any():
            raise ValueError(f"precisions_init ({covariance_type}) must be positive")
        return p
    for m in p if covariance_type == "full" else [p]:
        if not np.allclose(m, m.T) or np.linalg.eigvalsh(m).min() <= 0:
            raise ValueError(
                f"precisions_init ({covariance_type}) must be symmetric positive-definite"
            )
    return p
