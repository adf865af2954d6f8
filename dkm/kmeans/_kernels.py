"""Per-block kernels of k-means only: k-means|| rounds and the fitted model's predict,
transform and score on raw chunks. The shared distance kernel is in
:mod:`dkm._parallel.kernels`.
"""

from __future__ import annotations

import numpy as np

from dkm._parallel.kernels import Tiles, assign, center_block, load, pack_centers
from dkm._parallel.random import row_uniforms


def parallel_round(
    block,
    d2_prev,
    packed_new,
    seed: int,
    rnd: int,
    start: int,
    ell: float,
    tiles: Tiles,
    shift=None,
):
    """One k-means|| round on a block.

    Updates the block's running min squared distance with the candidates added last round
    only (``packed_new``), then returns every row that *could* be selected this round: a row
    is selected globally when ``ell * d2 / u > phi`` (``u`` uniform), and since the block's own
    cost ``phi_b <= phi`` the rows with ``ell * d2 / u > phi_b`` are a superset (about ``ell``
    of them per block in expectation). The driver keeps those whose key beats the global
    ``phi``; this is exact Bernoulli sampling with ``p = min(1, ell d2 / phi)`` in one pass.

    With ``shift`` the block is first centered and the centered block is returned too (the
    first round doubles as the centering pass).

    Returns ``(d2, (phi_b, keys, global_index, rows), centered block or None)``.
    """
    centered = None
    if shift is not None:
        centered = center_block(block, shift)
        x = load(centered)  # a streamed block is read once, centered on load
    else:
        x = load(block)
    if packed_new.shape[1] == 0:  # nothing was selected last round
        d2 = d2_prev
    else:
        _, d2_new = assign(x, packed_new, tiles)
        d2 = d2_new.astype(np.float64) if d2_prev is None else np.minimum(d2_prev, d2_new)
    phi_b = float(d2.sum())
    u = row_uniforms(seed, rnd, start, len(d2))
    with np.errstate(divide="ignore"):
        keys = ell * d2 / np.maximum(u, 1e-300)
    sel = np.flatnonzero(keys > phi_b)
    return d2, (phi_b, keys[sel], sel + start, x[sel].copy()), centered


def round_result(step):
    return step[1]


def round_d2(step):
    return step[0]


def round_block(step):
    return step[2]


def candidate_weights(block, packed: np.ndarray, tiles: Tiles):
    """Number of rows of the block nearest to each candidate (Bahmani et al. step 7)."""
    labels, _ = assign(load(block), packed, tiles, want_d2=False)
    return np.bincount(labels, minlength=packed.shape[1]).astype(np.int64)


def predict_chunk(
    x: np.ndarray, centers_c: np.ndarray, shift: np.ndarray, dtype, tiles: Tiles
) -> np.ndarray:
    """Labels of raw rows, centered with the fitted mean exactly as during the fit."""
    xc = np.asarray(x, dtype=dtype) - shift
    labels, _ = assign(xc, pack_centers(centers_c, np.dtype(dtype)), tiles, want_d2=False)
    return labels


def transform_chunk(
    x: np.ndarray, centers_c: np.ndarray, shift: np.ndarray, dtype, tiles: Tiles
) -> np.ndarray:
    """Euclidean distances to every centroid (float, ``(n, k)``)."""
    xc = np.asarray(x, dtype=dtype) - shift
    c = np.asarray(centers_c, dtype=dtype)
    d2 = np.einsum("ij,ij->i", xc, xc)[:, None] - 2 * (xc @ c.T) + np.einsum("ij,ij->i", c, c)
    return np.sqrt(np.maximum(d2, 0))


def score_chunk(
    x: np.ndarray, centers_c: np.ndarray, shift: np.ndarray, dtype, tiles: Tiles
) -> np.ndarray:
    """Sum of squared distances of the chunk's rows to their nearest centroid, as (1,)."""
    xc = np.asarray(x, dtype=dtype) - shift
    labels, _ = assign(xc, pack_centers(centers_c, np.dtype(dtype)), tiles, want_d2=False)
    diff = xc.astype(np.float64) - np.asarray(centers_c, dtype=np.float64)[labels]
    return np.array([np.einsum("ij,ij->", diff, diff)])
