"""Per-block kernels of the Gaussian mixture: the E-step and its sufficient statistics, the
initial statistics, and the fitted model's log densities on raw chunks.

Workers unpickle this module, so it imports numpy and dkm's shared kernels only. Blocks hold
rows in the working dtype, centered on the data mean (:func:`dkm._parallel.blocks.center`);
every kernel copies one tile of rows at a time to float64 and does all its arithmetic there,
in work buffers it reuses from tile to tile (:class:`_Work`), so float32 storage costs
precision in the stored rows only. The log densities follow
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
    # One tile's work buffers (see _Work): two (rows, d) and two (rows, k) float64 arrays.
    return max(64, min(n, tiles.tile_bytes // max(1, 8 * (2 * d + 2 * k))))


def _empty_stats(k: int, d: int, covariance_type: str) -> Stats:
    shape = {"full": (k, d, d), "tied": (d, d)}.get(covariance_type, (k, d))
    return Stats(0, 0.0, np.zeros(k), np.zeros((k, d)), np.zeros(shape))


class _Model(NamedTuple):
    """The parameters as the log densities use them, computed once per block."""

    covariance_type: str
    log_weights: np.ndarray
    log_det: np.ndarray
    const: float  # d log(2 pi)
    a: np.ndarray  # full/tied: prec_chol; diag/spherical: the per-component constant term
    b: np.ndarray  # full/tied: row j is mu_j P_j; diag: (mu prec)^T; spherical: mu^T
    c: np.ndarray | None  # diag: prec^T; spherical: prec; full/tied: None


def _model(log_weights, means, prec_chol, covariance_type: str) -> _Model:
    """The terms of scikit-learn's ``_estimate_log_gaussian_prob`` that do not depend on
    the rows, written as it writes them (so they round alike)."""
    k, d = means.shape
    log_det = log_det_cholesky(prec_chol, covariance_type, d)
    const = d * math.log(2 * math.pi)
    if covariance_type in ("full", "tied"):
        chol = prec_chol if covariance_type == "full" else np.broadcast_to(prec_chol, (k, d, d))
        mu_p = np.stack([means[j] @ chol[j] for j in range(k)])
        return _Model(covariance_type, log_weights, log_det, const, chol, mu_p, None)
    prec = prec_chol**2
    if covariance_type == "diag":
        a = np.sum(means**2 * prec, axis=1)
        return _Model(covariance_type, log_weights, log_det, const, a, (means * prec).T, prec.T)
    a = np.sum(means**2, axis=1) * prec
    return _Model(covariance_type, log_weights, log_det, const, a, means.T, prec)


class _Work:
    """Float64 work buffers for one tile of rows, reused by every tile of a block.

    Reusing them matters on worker processes: the nanny sets ``MALLOC_TRIM_THRESHOLD_``, so
    glibc serves every array above 128 KiB with a fresh ``mmap`` and its page faults (see
    :func:`dkm._parallel.kernels.nearest_tiles`). Measured on a 17,500 x 50 block, k=10 full:
    while each tile allocated its temporaries the E-step took 0.20 s on a worker against
    0.07 s in-process; with these buffers, 0.074 s against 0.069 s (benchmarks/RESULTS.md).
    The methods write into them (``out=``, in-place updates) with the same operations in the
    same order as scikit-learn's allocating expressions, so they round alike.
    """

    def __init__(self, rows: int, d: int, k: int):
        self.x = np.empty((rows, d))  # the tile's rows in float64
        self.y = np.empty((rows, d))  # x P_j - mu_j P_j, x**2, r_j x
        self.lp = np.empty((rows, k))  # log densities, then log r, then r
        self.t = np.empty((rows, k))  # log-sum-exp terms, the second product of diag/spherical
        self.mask = np.empty((rows, k), dtype=bool)  # the row maxima
        self.v = np.empty((4, rows))  # per-row maximum, its shift, count, log-sum-exp
        self.ok = np.empty(rows, dtype=bool)
        self.dd = np.empty((d, d))
        self.kd = np.empty((k, d))
        self.cast = None  # raw rows in the working dtype, when their own dtype differs

    def load(self, rows: np.ndarray) -> np.ndarray:
        """The rows copied to float64 (a view of the buffer)."""
        x = self.x[: len(rows)]
        x[...] = rows
        return x

    def load_centered(self, rows: np.ndarray, shift: np.ndarray, dtype) -> np.ndarray:
        """Raw rows cast to the working dtype, minus ``shift``, in float64: what
        ``(np.asarray(rows, dtype) - shift).astype(np.float64)`` computes."""
        m = len(rows)
        rows, dtype = np.asarray(rows), np.dtype(dtype)
        if rows.dtype != dtype:
            # Cast first, as np.asarray(rows, dtype) does: that rounding is part of the model.
            if self.cast is None or self.cast.dtype != dtype:
                self.cast = np.empty(self.x.shape, dtype)
            self.cast[:m] = rows
            rows = self.cast[:m]
        x = self.x[:m]
        np.subtract(rows, shift, out=x, dtype=np.result_type(rows, shift))
        return x

    def weighted_log_prob(self, x: np.ndarray, model: _Model) -> np.ndarray:
        """``log w_k + log N(x_i | mu_k, Sigma_k)`` of float64 rows ``x`` (a tile-buffer
        view)."""
        m = len(x)
        lp = self.lp[:m]
        if model.covariance_type in ("full", "tied"):
            y = self.y[:m]
            for j in range(lp.shape[1]):
                np.matmul(x, model.a[j], out=y)
                y -= model.b[j]
                np.square(y, out=y)
                np.sum(y, axis=1, out=lp[:, j])
        else:
            # diag:      sum(mu**2 prec) - 2.0 * (x @ (mu prec)^T) + x**2 @ prec^T
            # spherical: sum(mu**2) prec - 2 * (x @ mu^T * prec) + outer(||x||**2, prec)
            t = self.t[:m]
            np.matmul(x, model.b, out=lp)
            if model.covariance_type == "diag":
                lp *= 2.0
                np.subtract(model.a, lp, out=lp)
                np.matmul(np.square(x, out=self.y[:m]), model.c, out=t)
            else:
                lp *= model.c
                lp *= 2
                np.subtract(model.a, lp, out=lp)
                row_sq = np.einsum("ij,ij->i", x, x, out=self.v[0, :m])
                np.multiply(row_sq[:, None], model.c[None, :], out=t)
            lp += t
        # -0.5 * (d log(2 pi) + log_prob) + log_det + log_weights, in place.
        lp += model.const
        lp *= -0.5
        lp += model.log_det
        lp += model.log_weights
        return lp

    def log_resp(self, lp: np.ndarray) -> np.ndarray:
        """Turn the weighted log densities ``lp`` into ``log r_ik`` in place; return
        ``log p(x_i)`` (a buffer view: read it before the next tile).

        The form scikit-learn's ``_logsumexp`` uses (``log1p`` of the terms below the
        maximum), so that both round alike.
        """
        m = len(lp)
        top, shift, count, s = (v[:m] for v in self.v)
        at_top, t, ok = self.mask[:m], self.t[:m], self.ok[:m]
        np.max(lp, axis=1, out=top)
        np.equal(lp, top[:, None], out=at_top)
        np.sum(at_top, axis=1, out=count)
        # shift = top where finite, else 0
        np.copyto(shift, top)
        np.copyto(shift, 0.0, where=np.logical_not(np.isfinite(top, out=ok), out=ok))
        with np.errstate(divide="ignore", under="ignore", invalid="ignore"):
            np.subtract(lp, shift[:, None], out=t)
            np.copyto(t, -np.inf, where=at_top)
            np.exp(t, out=t)
            np.sum(t, axis=1, out=s)
            np.divide(s, count, out=s, where=np.not_equal(s, 0, out=ok))
            np.log1p(s, out=s)
            s += np.log(count, out=count)
            s += top
            lp -= s[:, None]
        return s

    def add_stats(self, acc: Stats, x: np.ndarray, resp: np.ndarray, covariance_type: str) -> Stats:
        """``acc`` plus the statistics of float64 rows ``x`` under responsibilities ``resp``
        (added to ``acc``'s arrays in place)."""
        m = len(x)
        nk, sx, sxx = acc.nk, acc.sx, acc.sxx
        nk += resp.sum(axis=0)
        sx += np.matmul(resp.T, x, out=self.kd)
        if covariance_type == "full":
            y = self.y[:m]
            for j in range(resp.shape[1]):
                np.multiply(x, resp[:, j, None], out=y)
                sxx[j] += np.matmul(y.T, x, out=self.dd)
        elif covariance_type == "tied":
            sxx += np.matmul(x.T, x, out=self.dd)
        else:
            sxx += np.matmul(resp.T, np.square(x, out=self.y[:m]), out=self.kd)
        return acc._replace(n=acc.n + m)


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
    """``log w_k + log N(x_i | mu_k, Sigma_k)`` of float64 rows, ``(n, k)`` (a new array)."""
    work = _Work(len(x), x.shape[1], means.shape[0])
    return work.weighted_log_prob(x, _model(log_weights, means, prec_chol, covariance_type))


def log_resp(wlp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(log p(x_i), log r_ik)`` from the weighted log densities (new arrays; see
    :meth:`_Work.log_resp`)."""
    lr = np.array(wlp, dtype=np.float64)
    norm = _Work(len(lr), 0, lr.shape[1]).log_resp(lr)
    return norm.copy(), lr


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
    model = _model(log_weights, means, prec_chol, covariance_type)
    acc = _empty_stats(k, d, covariance_type)
    log_lik = 0.0
    step = _tile_rows(n, d, k, tiles)
    work = _Work(min(step, n), d, k)
    for a in range(0, n, step):
        xt = work.load(x[a : a + step])
        lp = work.weighted_log_prob(xt, model)
        log_lik += float(work.log_resp(lp).sum())
        acc = work.add_stats(acc, xt, np.exp(lp, out=lp), covariance_type)
    return acc._replace(log_lik=log_lik)


def label_stats(block, labels, k: int, covariance_type: str, tiles: Tiles) -> Stats:
    """Statistics under hard responsibilities (one-hot ``labels``, e.g. k-means labels)."""
    x = load(block)
    labels = np.asarray(labels)
    n, d = x.shape
    acc = _empty_stats(k, d, covariance_type)
    step = _tile_rows(n, d, k, tiles)
    work = _Work(min(step, n), d, k)
    for a in range(0, n, step):
        lab = labels[a : a + step]
        resp = work.lp[: len(lab)]
        resp.fill(0.0)
        resp[np.arange(len(lab)), lab] = 1.0
        acc = work.add_stats(acc, work.load(x[a : a + step]), resp, covariance_type)
    return acc


def random_stats(block, k: int, seed: int, start: int, covariance_type: str, tiles: Tiles) -> Stats:
    """Statistics under uniform random responsibilities normalised per row
    (scikit-learn's ``init_params="random"``), drawn per global row: any chunking gives the
    same responsibilities."""
    x = load(block)
    n, d = x.shape
    acc = _empty_stats(k, d, covariance_type)
    step = _tile_rows(n, d, k, tiles)
    work = _Work(min(step, n), d, k)
    for a in range(0, n, step):
        m = min(step, n - a)
        resp = work.lp[:m]
        for j in range(k):
            resp[:, j] = row_uniforms(seed, 1 + j, start + a, m)
        resp /= np.sum(resp, axis=1, out=work.v[0, :m])[:, None]
        acc = work.add_stats(acc, work.load(x[a : a + m]), resp, covariance_type)
    return acc


def gram(block, tiles: Tiles) -> np.ndarray:
    """``sum_i x_i x_i^T`` of a block in float64 (the tied covariance of row-based inits)."""
    x = load(block)
    n, d = x.shape
    out = np.zeros((d, d))
    step = _tile_rows(n, d, 0, tiles)
    work = _Work(min(step, n), d, 0)
    for a in range(0, n, step):
        xt = work.load(x[a : a + step])
        out += np.matmul(xt.T, xt, out=work.dd)
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


def _chunk_tiles(x, shift, dtype, log_weights, means, prec_chol, covariance_type, tiles):
    """Weighted log densities of raw rows tile by tile, centered with the fitted mean as
    during the fit: yields ``(start, work, lp)``, ``lp`` a buffer reused for every tile."""
    x = np.asarray(x)
    n, d = x.shape
    k = means.shape[0]
    model = _model(log_weights, means, prec_chol, covariance_type)
    step = _tile_rows(n, d, k, tiles or Tiles.from_config())
    work = _Work(min(step, n), d, k)
    for a in range(0, n, step):
        xt = work.load_centered(x[a : a + step], shift, dtype)
        yield a, work, work.weighted_log_prob(xt, model)


def predict_chunk(x, *model, tiles: Tiles | None = None) -> np.ndarray:
    """Most probable component of each row (int64, as scikit-learn's argmax)."""
    out = np.empty(len(x), dtype=np.intp)
    for a, _, lp in _chunk_tiles(x, *model, tiles):
        np.argmax(lp, axis=1, out=out[a : a + len(lp)])
    return out.astype(np.int64, copy=False)


def proba_chunk(x, *model, tiles: Tiles | None = None) -> np.ndarray:
    """Posterior probability of each component, ``(n, k)``."""
    means = model[3]
    out = np.empty((len(x), means.shape[0]))
    for a, work, lp in _chunk_tiles(x, *model, tiles):
        work.log_resp(lp)
        np.exp(lp, out=out[a : a + len(lp)])
    return out


def score_samples_chunk(x, *model, tiles: Tiles | None = None) -> np.ndarray:
    """``log p(x)`` of each row."""
    out = np.empty(len(x))
    for a, work, lp in _chunk_tiles(x, *model, tiles):
        out[a : a + len(lp)] = work.log_resp(lp)
    return out


def score_chunk(x, *model, tiles: Tiles | None = None) -> np.ndarray:
    """Sum of ``log p(x)`` over the chunk's rows, as (1,)."""
    return np.array([score_samples_chunk(x, *model, tiles=tiles).sum()])
