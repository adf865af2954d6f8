"""Per-block kernels of the Gaussian mixture: the E-step and its sufficient statistics, the
initial statistics, and the fitted model's log densities on raw chunks.

Workers unpickle this module, so it imports numpy and dkm's shared kernels only. Blocks hold
rows in the working dtype, centered on the data mean (:func:`dkm._parallel.blocks.center`);
every kernel copies one tile of rows at a time to float64 and does all its arithmetic there,
so float32 storage costs precision in the stored rows only. The log densities follow
scikit-learn's ``_estimate_log_gaussian_prob`` formula for formula (same operations, so the
same rounding up to summation order).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from dkm._parallel.kernels import Tiles, load
from dkm._parallel.random import row_uniforms

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


class Stats(NamedTuple):
    """Sufficient statistics of a set of rows under responsibilities ``r`` (float64).

    ``sxx`` depends on the covariance type: ``sum_i r_ik x_i x_i^T`` per component (full,
    ``(k, d, d)``), ``sum_i x_i x_i^T`` over all rows (tied, ``(d, d)``: scikit-learn's tied
    estimate does not weight it), ``sum_i r_ik x_i**2`` per component (diag and spherical,
    ``(k, d)``). ``log_lik`` is the sum over rows of ``log p(x_i)`` (0 for initial
    statistics).
    """

    n: int
    log_lik: float
    nk: np.ndarray  # (k,)
    sx: np.ndarray  # (k, d)
    sxx: np.ndarray


def stats_nbytes(k: int, d: int, covariance_type: str) -> int:
    """Bytes of one :class:`Stats` (how the backend decides where to reduce them)."""
    second = {"full": k * d * d, "tied": d * d}.get(covariance_type, k * d)
    return 8 * (k + k * d + second + 2)


def _tile_rows(n: int, d: int, k: int, tiles: Tiles) -> int:
    # One float64 copy of the rows, the (rows, k) log densities and one (rows, d) product.
    return max(64, min(n, tiles.tile_bytes // max(1, 8 * (2 * d + 2 * k))))


def _empty_stats(k: int, d: int, covariance_type: str) -> Stats:
    shape = {"full": (k, d, d), "tied": (d, d)}.get(covariance_type, (k, d))
    return Stats(0, 0.0, np.zeros(k), np.zeros((k, d)), np.zeros(shape))


def _add_tile(acc: Stats, x: np.ndarray, resp: np.ndarray, covariance_type: str) -> Stats:
    """``acc`` plus the statistics of float64 rows ``x`` under responsibilities ``resp``."""
    nk = acc.nk + resp.sum(axis=0)
    sx = acc.sx + resp.T @ x
    if covariance_type == "full":
        sxx = acc.sxx.copy()
        for j in range(resp.shape[1]):
            sxx[j] += (x * resp[:, j, None]).T @ x
    elif covariance_type == "tied":
        sxx = acc.sxx + x.T @ x
    else:
        sxx = acc.sxx + resp.T @ (x * x)
    return Stats(acc.n + len(x), acc.log_lik, nk, sx, sxx)


def log_det_cholesky(prec_chol: np.ndarray, covariance_type: str, d: int) -> np.ndarray:
    """``log det`` of each precision Cholesky factor (scikit-learn's
    ``_compute_log_det_cholesky``): half the log determinant of the precision."""
    if covariance_type == "full":
        k = prec_chol.shape[0]
        return np.sum(np.log(prec_chol.reshape(k, -1)[:, :: d + 1]), axis=1)
    if covariance_type == "tied":
        return np.sum(np.log(np.diag(prec_chol)))
    if covariance_type == "diag":
        return np.sum(np.log(prec_chol), axis=1)
    return d * np.log(prec_chol)


def weighted_log_prob(
    x: np.ndarray,
    log_weights: np.ndarray,
    means: np.ndarray,
    prec_chol: np.ndarray,
    covariance_type: str,
) -> np.ndarray:
    """``log w_k + log N(x_i | mu_k, Sigma_k)`` of float64 rows, ``(n, k)``."""
    d = x.shape[1]
    k = means.shape[0]
    log_det = log_det_cholesky(prec_chol, covariance_type, d)
    if covariance_type in ("full", "tied"):
        log_prob = np.empty((len(x), k))
        for j in range(k):
            p = prec_chol[j] if covariance_type == "full" else prec_chol
            y = x @ p - means[j] @ p
            log_prob[:, j] = np.sum(np.square(y), axis=1)
    elif covariance_type == "diag":
        prec = prec_chol**2
        log_prob = np.sum(means**2 * prec, axis=1) - 2.0 * (x @ (means * prec).T) + (x**2 @ prec.T)
    else:
        prec = prec_chol**2
        row_sq = np.einsum("ij,ij->i", x, x)
        log_prob = (
            np.sum(means**2, axis=1) * prec - 2 * (x @ means.T * prec) + np.outer(row_sq, prec)
        )
    return -0.5 * (d * math.log(2 * math.pi) + log_prob) + log_det + log_weights


def log_resp(wlp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(log p(x_i), log r_ik)`` from the weighted log densities (log-sum-exp per row).

    The form scikit-learn's ``_logsumexp`` uses (``log1p`` of the terms below the maximum),
    so that both round alike.
    """
    top = wlp.max(axis=1, keepdims=True)
    at_top = wlp == top
    m = at_top.sum(axis=1, keepdims=True).astype(np.float64)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", under="ignore", invalid="ignore"):
        s = np.exp(np.where(at_top, -np.inf, wlp) - shift).sum(axis=1, keepdims=True)
        s = np.where(s == 0, s, s / m)
        norm = (np.log1p(s) + np.log(m) + top)[:, 0]
        return norm, wlp - norm[:, None]


def estep(
    block,
    log_weights: np.ndarray,
    means: np.ndarray,
    prec_chol: np.ndarray,
    covariance_type: str,
    tiles: Tiles,
) -> Stats:
    """One block's E-step: its log-likelihood and its sufficient statistics under the
    responsibilities of the current parameters (in the blocks' centered coordinates)."""
    x = load(block)
    n, d = x.shape
    k = means.shape[0]
    acc = _empty_stats(k, d, covariance_type)
    log_lik = 0.0
    step = _tile_rows(n, d, k, tiles)
    for a in range(0, n, step):
        xt = x[a : a + step].astype(np.float64)
        norm, lr = log_resp(weighted_log_prob(xt, log_weights, means, prec_chol, covariance_type))
        log_lik += float(norm.sum())
        acc = _add_tile(acc, xt, np.exp(lr), covariance_type)
    return acc._replace(log_lik=log_lik)


def label_stats(block, labels, k: int, covariance_type: str, tiles: Tiles) -> Stats:
    """Statistics under hard responsibilities (one-hot ``labels``, e.g. k-means labels)."""
    x = load(block)
    labels = np.asarray(labels)
    n, d = x.shape
    acc = _empty_stats(k, d, covariance_type)
    step = _tile_rows(n, d, k, tiles)
    for a in range(0, n, step):
        lab = labels[a : a + step]
        resp = np.zeros((len(lab), k))
        resp[np.arange(len(lab)), lab] = 1.0
        acc = _add_tile(acc, x[a : a + step].astype(np.float64), resp, covariance_type)
    return acc


def random_stats(block, k: int, seed: int, start: int, covariance_type: str, tiles: Tiles) -> Stats:
    """Statistics under uniform random responsibilities normalised per row
    (scikit-learn's ``init_params="random"``), drawn per global row: any chunking gives the
    same responsibilities."""
    x = load(block)
    n, d = x.shape
    acc = _empty_stats(k, d, covariance_type)
    step = _tile_rows(n, d, k, tiles)
    for a in range(0, n, step):
        m = min(step, n - a)
        resp = np.stack([row_uniforms(seed, 1 + j, start + a, m) for j in range(k)], axis=1)
        resp /= resp.sum(axis=1, keepdims=True)
        acc = _add_tile(acc, x[a : a + m].astype(np.float64), resp, covariance_type)
    return acc


def gram(block, tiles: Tiles) -> np.ndarray:
    """``sum_i x_i x_i^T`` of a block in float64 (the tied covariance of row-based inits)."""
    x = load(block)
    n, d = x.shape
    out = np.zeros((d, d))
    step = _tile_rows(n, d, 0, tiles)
    for a in range(0, n, step):
        xt = x[a : a + step].astype(np.float64)
        out += xt.T @ xt
    return out


def combine(*parts: Stats) -> Stats:
    """Sum of partial statistics (the tree reduction's combine)."""
    n, log_lik, nk, sx, sxx = parts[0]
    nk, sx, sxx = nk.copy(), sx.copy(), sxx.copy()
    for p in parts[1:]:
        n += p.n
        log_lik += p.log_lik
        nk += p.nk
        sx += p.sx
        sxx += p.sxx
    return Stats(n, log_lik, nk, sx, sxx)


# ------------------------------------------------------------------ the fitted model on chunks


def _chunk_wlp(x, shift, dtype, log_weights, means, prec_chol, covariance_type) -> np.ndarray:
    """Weighted log densities of raw rows, centered with the fitted mean as during the fit."""
    xc = (np.asarray(x, dtype=dtype) - shift).astype(np.float64)
    return weighted_log_prob(xc, log_weights, means, prec_chol, covariance_type)


def predict_chunk(x, *model) -> np.ndarray:
    """Most probable component of each row (int64, as scikit-learn's argmax)."""
    return np.argmax(_chunk_wlp(x, *model), axis=1)


def proba_chunk(x, *model) -> np.ndarray:
    """Posterior probability of each component, ``(n, k)``."""
    return np.exp(log_resp(_chunk_wlp(x, *model))[1])


def score_samples_chunk(x, *model) -> np.ndarray:
    """``log p(x)`` of each row."""
    return log_resp(_chunk_wlp(x, *model))[0]


def score_chunk(x, *model) -> np.ndarray:
    """Sum of ``log p(x)`` over the chunk's rows, as (1,)."""
    return np.array([score_samples_chunk(x, *model).sum()])
