"""EM for Gaussian mixtures over blocks: the E-step on the cluster, the M-step here.

Per iteration the driver submits the same tasks, whatever the iteration number:

- ``nblocks`` E-step tasks (:func:`dkm.mixture._kernels.estep`), each returning the block's
  log-likelihood and float64 sufficient statistics (``N_k``, ``sum r x``, and ``sum r x x^T``
  or ``sum r x**2`` by covariance type) -- one pass over the data;
- for large statistics, a tree reduction on the workers (small ones are combined here);
- the M-step here, on the reduced statistics, with scikit-learn's formulas
  (``_estimate_gaussian_parameters``, ``_compute_precision_cholesky``, ``reg_covar`` on the
  diagonal), so a fit follows scikit-learn's iterates to float rounding.

The parameters enter each task as three small arrays (scattered to all workers when large);
nothing in a task refers to an earlier iteration, so the graph does not grow. Everything runs
in the blocks' centered coordinates (rows minus the data mean, as k-means does): covariances
do not change, means are shifted back by the estimator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from dkm._parallel import kernels
from dkm._parallel.blocks import Blocks
from dkm._parallel.kernels import Tiles
from dkm._parallel.keys import Keys
from dkm.kmeans.init import initialize
from dkm.kmeans.lloyd import lloyd
from dkm.mixture import _kernels
from dkm.mixture._kernels import COVARIANCE_TYPES, Stats

__all__ = [
    "COVARIANCE_TYPES",
    "INIT_PARAMS",
    "EMProgress",
    "EMResult",
    "GaussianParams",
    "em",
    "estep_pass",
    "initial_params",
    "m_step",
    "precision_cholesky",
    "precision_cholesky_from_precisions",
]

log = logging.getLogger("dkm")

INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")
HISTORY_KEYS = ("lower_bound", "seconds", "n_tasks")
# The k-means run behind init_params="kmeans": scikit-learn's KMeans defaults.
KMEANS_MAX_ITER = 300
KMEANS_TOL = 1e-4

_ILL_DEFINED = (
    "Fitting the mixture model failed because some components have ill-defined empirical "
    "covariance (for instance caused by singleton or collapsed samples). Try to decrease "
    "the number of components, increase reg_covar, or scale the input data."
)


def covariance_shape(covariance_type: str, k: int, d: int) -> tuple[int, ...]:
    """Shape of ``covariances_`` / ``precisions_`` for a covariance type."""
    return {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}[covariance_type]


@dataclass
class GaussianParams:
    """Mixture parameters in the fit's (centered) coordinates, float64."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    precisions_cholesky: np.ndarray

    NAMES = ("weights", "means", "covariances", "precisions_cholesky")

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: np.array(getattr(self, name), copy=True) for name in self.NAMES}

    @classmethod
    def from_dict(cls, params: Mapping[str, np.ndarray]) -> GaussianParams:
        return cls(*(np.asarray(params[name], dtype=np.float64) for name in cls.NAMES))

    @staticmethod
    def shapes(covariance_type: str, k: int, d: int) -> dict[str, tuple[int, ...]]:
        cov = covariance_shape(covariance_type, k, d)
        return {"weights": (k,), "means": (k, d), "covariances": cov, "precisions_cholesky": cov}


# ------------------------------------------------------------------------- the M-step


def precision_cholesky(covariances: np.ndarray, covariance_type: str) -> np.ndarray:
    """Cholesky factors of the precisions (scikit-learn's ``_compute_precision_cholesky``).

    Raises ``ValueError`` (scikit-learn's message) when a covariance is not positive definite.
    """
    d = covariances.shape[-1]
    eye = np.eye(d)
    if covariance_type in ("full", "tied"):
        mats = covariances if covariance_type == "full" else covariances[None]
        out = np.empty_like(mats)
        for j, cov in enumerate(mats):
            try:
                chol = scipy.linalg.cholesky(cov, lower=True)
            except np.linalg.LinAlgError:
                raise ValueError(_ILL_DEFINED) from None
            out[j] = scipy.linalg.solve_triangular(chol, eye, lower=True).T
        return out if covariance_type == "full" else out[0]
    if np.any(covariances <= 0.0):
        raise ValueError(_ILL_DEFINED)
    return 1.0 / np.sqrt(covariances)


def precision_cholesky_from_precisions(precisions: np.ndarray, covariance_type: str):
    """Upper-triangular ``U`` with ``U U^T = precision`` (scikit-learn's
    ``_compute_precision_cholesky_from_precisions``: Cholesky of the flipped matrix)."""

    def flipped(m):
        return m[::-1, ::-1]

    if covariance_type == "full":
        return np.stack(
            [flipped(scipy.linalg.cholesky(flipped(p), lower=True)) for p in precisions]
        )
    if covariance_type == "tied":
        return flipped(scipy.linalg.cholesky(flipped(precisions), lower=True))
    return np.sqrt(precisions)


def precisions_from_cholesky(prec_chol: np.ndarray, covariance_type: str) -> np.ndarray:
    """``precisions_`` from their Cholesky factors (scikit-learn's ``_set_parameters``)."""
    if covariance_type == "full":
        return np.einsum("kij,klj->kil", prec_chol, prec_chol)
    if covariance_type == "tied":
        return prec_chol @ prec_chol.T
    return prec_chol**2


def m_step(
    stats: Stats, reg_covar: float, covariance_type: str, n_samples: int | None = None
) -> GaussianParams:
    """Parameters from sufficient statistics, as scikit-learn's M-step computes them.

    ``N_k`` gets ``10 * eps`` added (an empty component keeps finite means); the weights are
    ``N_k / sum(N_k)``, or ``N_k / n_samples`` when given (scikit-learn's initialisation).
    The full covariances are scikit-learn's centered sums written in terms of the
    statistics: ``sum r (x - m)(x - m)^T = S - (2 N_k' - N_k) m m^T`` with ``N_k'`` the
    regularised count (exact algebra; the rows are centered, so no cancellation worth the
    name).
    """
    nk_raw = stats.nk
    nk = nk_raw + 10 * np.finfo(np.float64).eps
    means = stats.sx / nk[:, None]
    d = means.shape[1]
    if covariance_type == "full":
        outer = np.einsum("ki,kj->kij", means, means)
        cov = (stats.sxx - (2 * nk - nk_raw)[:, None, None] * outer) / nk[:, None, None]
        cov[:, np.arange(d), np.arange(d)] += reg_covar
    elif covariance_type == "tied":
        cov = (stats.sxx - (nk * means.T) @ means) / nk.sum()
        cov[np.arange(d), np.arange(d)] += reg_covar
    else:
        cov = stats.sxx / nk[:, None] - means**2 + reg_covar
        if covariance_type == "spherical":
            cov = cov.mean(axis=1)
    weights = nk / (nk.sum() if n_samples is None else n_samples)
    return GaussianParams(weights, means, cov, precision_cholesky(cov, covariance_type))


# ------------------------------------------------------------------------- passes


def estep_pass(
    blocks: Blocks,
    params: GaussianParams,
    covariance_type: str,
    keys: Keys,
    tiles: Tiles | None = None,
    **counters: int,
) -> Stats:
    """One pass over the data: the reduced log-likelihood and sufficient statistics.

    Task keys read ``gmm-estep`` and ``gmm-reduce`` with ``counters`` (e.g. ``it=3``).
    """
    be, nb = blocks.backend, blocks.nblocks
    tiles = tiles or Tiles.from_config()
    with np.errstate(divide="ignore"):
        log_w = np.log(params.weights)
    shared = [be.share(np.asarray(a)) for a in (log_w, params.means, params.precisions_cholesky)]
    parts = be.map(
        _kernels.estep,
        blocks.handles,
        *[[a] * nb for a in shared],
        [covariance_type] * nb,
        [tiles] * nb,
        name=keys("gmm", "estep", **counters),
    )
    k, d = params.means.shape
    return be.reduce(
        parts,
        _kernels.combine,
        name=keys("gmm", "reduce", **counters),
        nbytes=_kernels.stats_nbytes(k, d, covariance_type),
    )


def tasks_per_iteration(blocks: Blocks, k: int, covariance_type: str) -> int:
    """Tasks :func:`estep_pass` submits: one per block, plus the tree when reduced there."""
    nb = blocks.nblocks
    nbytes = _kernels.stats_nbytes(k, blocks.d, covariance_type)
    return nb + blocks.backend.reduce_tasks(nb, nbytes)


def _row_stats(blocks: Blocks, rows: np.ndarray, covariance_type: str, keys: Keys) -> Stats:
    """Statistics of responsibilities that pick one row per component (scikit-learn's
    "k-means++" and "random_from_data": ``r = 1`` at the chosen rows, 0 elsewhere)."""
    k = len(rows)
    if covariance_type == "full":
        sxx = np.einsum("ki,kj->kij", rows, rows)
    elif covariance_type == "tied":
        # scikit-learn's tied estimate takes X^T X over all rows, whatever the responsibilities.
        be, nb = blocks.backend, blocks.nblocks
        tiles = Tiles.from_config()
        grams = be.map(_kernels.gram, blocks.handles, [tiles] * nb, name=keys("gmm-init", "gram"))
        d = blocks.d
        sxx = be.reduce(
            grams, kernels.add_arrays, name=keys("gmm-init", "reduce"), nbytes=8 * d * d
        )
    else:
        sxx = rows**2
    return Stats(k, 0.0, np.ones(k), rows.copy(), sxx)


def _kmeans_stats(
    blocks: Blocks, k: int, seed: int, covariance_type: str, keys: Keys
) -> tuple[Stats, dict]:
    """Hard responsibilities from dkm's k-means (k-means|| then Lloyd, as dkm.KMeans runs
    with scikit-learn's defaults), and their statistics: one more pass."""
    centers, info = initialize(blocks, "k-means||", k, seed, keys, center_blocks=False)
    tol = KMEANS_TOL * float(np.mean(blocks.stats["var"]))
    res = lloyd(
        blocks,
        np.asarray(centers, dtype=blocks.dtype).astype(np.float64),
        max_iter=KMEANS_MAX_ITER,
        tol=tol,
        seed=seed,
        keys=keys,
    )
    be, nb = blocks.backend, blocks.nblocks
    parts = be.map(
        _kernels.label_stats,
        blocks.handles,
        res.labels,
        [k] * nb,
        [covariance_type] * nb,
        [Tiles.from_config()] * nb,
        name=keys("gmm-init", "kmeans-stats"),
    )
    stats = be.reduce(
        parts,
        _kernels.combine,
        name=keys("gmm-init", "reduce"),
        nbytes=_kernels.stats_nbytes(k, blocks.d, covariance_type),
    )
    info = {
        **info,
        "kmeans_n_iter": res.n_iter,
        "kmeans_inertia": res.inertia,
        "kmeans_converged": res.converged,
    }
    info["passes"] = int(info.get("passes", 0)) + res.n_iter + 1
    return stats, info


def _random_stats(blocks: Blocks, k: int, seed: int, covariance_type: str, keys: Keys) -> Stats:
    be, nb = blocks.backend, blocks.nblocks
    parts = be.map(
        _kernels.random_stats,
        blocks.handles,
        [k] * nb,
        [seed] * nb,
        blocks.starts.tolist(),
        [covariance_type] * nb,
        [Tiles.from_config()] * nb,
        name=keys("gmm-init", "random-stats"),
    )
    return be.reduce(
        parts,
        _kernels.combine,
        name=keys("gmm-init", "reduce"),
        nbytes=_kernels.stats_nbytes(k, blocks.d, covariance_type),
    )


def initial_params(
    blocks: Blocks,
    method: str,
    k: int,
    seed: int,
    keys: Keys,
    *,
    covariance_type: str,
    reg_covar: float,
    weights_init: np.ndarray | None = None,
    means_init: np.ndarray | None = None,
    precisions_init: np.ndarray | None = None,
) -> tuple[GaussianParams, dict]:
    """Initial parameters of one start, in the blocks' (centered) coordinates.

    As scikit-learn: responsibilities from ``method`` give weights, means and covariances
    through the M-step (weights divided by ``n_samples``), then the given
    ``weights_init`` / ``means_init`` (data coordinates) / ``precisions_init`` replace
    theirs; when all three are given no responsibilities are computed at all.

    - "kmeans": labels of dkm's k-means (k-means|| initialisation, Lloyd to convergence);
    - "k-means++": dkm's k-means++ centres (rows gathered here) as single-row components;
    - "random_from_data": distinct random rows (dkm's "sample" initialisation), likewise;
    - "random": uniform random responsibilities per row, independent of the chunking.

    Returns the parameters and a JSON-able dict of details (``passes``...).
    """
    t0 = time.perf_counter()
    d = blocks.d
    info: dict = {"method": method, "passes": 0}
    if weights_init is None or means_init is None or precisions_init is None:
        if method == "kmeans":
            stats, info2 = _kmeans_stats(blocks, k, seed, covariance_type, keys)
            info.update(info2)
        elif method in ("k-means++", "random_from_data"):
            dkm_method = "k-means++" if method == "k-means++" else "sample"
            rows, info2 = initialize(blocks, dkm_method, k, seed, keys)
            info.update(info2)
            rows = np.asarray(rows, dtype=blocks.dtype).astype(np.float64)
            stats = _row_stats(blocks, rows, covariance_type, keys)
            info["passes"] += int(covariance_type == "tied")
        elif method == "random":
            stats = _random_stats(blocks, k, seed, covariance_type, keys)
            info["passes"] += 1
        else:
            raise ValueError(f"init_params must be one of {INIT_PARAMS}, got {method!r}")
        params = m_step(stats, reg_covar, covariance_type, n_samples=blocks.n)
    else:
        info["method"] = "given"
        params = GaussianParams(
            np.zeros(k),
            np.zeros((k, d)),
            np.zeros(covariance_shape(covariance_type, k, d)),
            np.zeros(covariance_shape(covariance_type, k, d)),
        )
    if weights_init is not None:
        params.weights = np.asarray(weights_init, dtype=np.float64).copy()
    if means_init is not None:
        shift = np.zeros(d) if blocks.shift is None else blocks.shift.astype(np.float64)
        params.means = np.asarray(means_init, dtype=np.float64) - shift
    if precisions_init is not None:
        prec = np.asarray(precisions_init, dtype=np.float64)
        params.precisions_cholesky = precision_cholesky_from_precisions(prec, covariance_type)
        # scikit-learn leaves covariances_ unset until the first M-step; a fit state needs
        # an array, so it holds their inverse (never reported: max_iter >= 1).
        params.covariances = (
            np.linalg.inv(prec) if covariance_type in ("full", "tied") else 1.0 / prec
        )
    info["seconds"] = time.perf_counter() - t0
    return params, info


# ------------------------------------------------------------------------- the EM loop


@dataclass
class EMProgress:
    """Where an EM run stands after an iteration (or where a resumed run starts).

    ``params`` are the parameters after ``iteration`` M-steps; ``history["lower_bound"]``
    holds the lower bound of each E-step so far (the last one is the previous bound the
    next iteration compares with). ``stopped`` ("converged" or "max_iter") once the run met
    a stopping rule.
    """

    iteration: int
    params: GaussianParams
    history: dict[str, list]
    stopped: str | None = None


@dataclass
class EMResult:
    params: GaussianParams
    lower_bound: float
    n_iter: int
    converged: bool
    history: dict = field(default_factory=dict)


def em(
    blocks: Blocks,
    params: GaussianParams,
    *,
    covariance_type: str,
    reg_covar: float,
    max_iter: int = 100,
    tol: float = 1e-3,
    keys: Keys | None = None,
    verbose: bool = False,
    start: EMProgress | None = None,
    callback: Callable[[EMProgress], None] | None = None,
) -> EMResult:
    """Run EM from ``params`` on prepared (centered) blocks.

    Parameters
    ----------
    blocks : Blocks
        The data, centered (:func:`dkm._parallel.blocks.center`).
    params : GaussianParams
        Initial parameters (ignored when ``start`` is given).
    covariance_type : {"full", "tied", "diag", "spherical"}
    reg_covar : float
        Added to the covariances' diagonal in every M-step.
    max_iter : int
        Maximum number of EM iterations (E-step + M-step).
    tol : float
        Stop when the lower bound (mean log-likelihood) changed by less than ``tol``
        (scikit-learn's rule).
    keys : Keys, optional
        Task key maker (shows on the dashboard).
    start : EMProgress, optional
        Resume a run from a state passed to ``callback``; it ends exactly where an
        uninterrupted run ends.
    callback : callable, optional
        ``callback(progress)`` after every iteration: the hook for checkpoints and progress.

    Returns
    -------
    EMResult
        As scikit-learn: the parameters after the last M-step, and the lower bound of the
        last E-step (which saw the parameters before it).
    """
    keys = keys or Keys.new()
    tiles = Tiles.from_config()
    k = params.means.shape[0]
    n_tasks = tasks_per_iteration(blocks, k, covariance_type)
    hist: dict[str, list] = {key: [] for key in HISTORY_KEYS}
    first, stopped = 0, None
    if start is not None:
        first, stopped, params = int(start.iteration), start.stopped, start.params
        for key, values in start.history.items():
            if key in hist:
                hist[key].extend(values)
    for it in range(first, max_iter if stopped is None else first):
        t0 = time.perf_counter()
        stats = estep_pass(blocks, params, covariance_type, keys, tiles, it=it)
        lower_bound = stats.log_lik / stats.n
        params = m_step(stats, reg_covar, covariance_type)
        change = lower_bound - (hist["lower_bound"][-1] if hist["lower_bound"] else -np.inf)
        hist["lower_bound"].append(float(lower_bound))
        hist["n_tasks"].append(n_tasks)
        hist["seconds"].append(time.perf_counter() - t0)
        if verbose:
            log.info("EM iteration %d: lower bound %.10g change %.3g", it + 1, lower_bound, change)
        if abs(change) < tol:
            stopped = "converged"
        elif it + 1 == max_iter:
            stopped = "max_iter"
        if callback is not None:
            callback(EMProgress(it + 1, params, hist, stopped))
        if stopped is not None:
            break
    n_iter = len(hist["lower_bound"])
    return EMResult(
        params=params,
        lower_bound=float(hist["lower_bound"][-1]) if n_iter else -np.inf,
        n_iter=n_iter,
        converged=stopped == "converged",
        history=hist,
    )
