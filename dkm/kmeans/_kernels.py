"""Per-block kernels of k-means only: k-means|| rounds and the fitted model's predict,
transform and score on raw chunks. The shared distance kernel is in
:mod:`dkm._parallel.kernels`.
"""

from __future__ import annotations

import numpy as np

from dkm._parallel.kernels import (
    Tiles,
    accumulator,
    assign,
    center_block,
    load,
    pack_centers,
)
from dkm._parallel.random import row_uniforms


def nearest_update(x: np.ndarray, state, packed: np.ndarray, offset: int, tiles: Tiles):
    """Running nearest candidate of every row after adding the candidates in ``packed``.

    ``state`` is ``(d2, labels)`` from the previous round (None before the first): the
    squared distance to the nearest candidate so far (float32) and its index in the
    driver's candidate list (int32). The new candidates are numbered from ``offset``; a row
    moves to one only when it is strictly closer, so ties keep the earlier candidate, as an
    argmin over the whole list would. Rows already at distance 0 cannot get closer and are
    left out of the GEMM: on image patches most rows are exact copies of a candidate after
    the first rounds (62-74% of MNIST 5x5 patches), which is most of the rounds' work.

    Works tile by tile; a tile's remaining rows are gathered into one buffer of at most
    ``tiles.x_tile_bytes`` (never a copy of the block). Returns a new ``(d2, labels)``.
    """
    n, d = x.shape
    k = packed.shape[1]
    if state is None:
        # The distances keep the data's precision: float64 data (magnitudes whose squares
        # overflow float32) must not be squeezed into float32.
        d2 = np.full(n, np.inf, dtype=np.result_type(x.dtype, np.float32))
        labels = np.zeros(n, dtype=np.int32)
    else:
        d2, labels = state[0].copy(), state[1].copy()
    if k == 0 or n == 0:
        return d2, labels
    neg2ct, csq = packed[:-1], packed[-1]
    step = max(64, min(tiles.rows(k, x.itemsize), tiles.x_tile_bytes // max(1, d * x.itemsize)))
    step = min(step, n)
    buf = np.empty((step, k), dtype=np.result_type(x.dtype, packed.dtype))
    lab = np.empty(step, dtype=np.intp)
    for s in range(0, n, step):
        cur = d2[s : s + step]
        idx = np.flatnonzero(cur > 0)
        m = len(idx)
        if m == 0:
            continue
        xt = x[s : s + len(cur)] if m == len(cur) else x[s + idx]
        dist = np.matmul(xt, neg2ct, out=buf[:m])
        dist += csq
        np.argmin(dist, axis=1, out=lab[:m])
        new = dist[np.arange(m), lab[:m]] + np.einsum("ij,ij->i", xt, xt)
        np.maximum(new, 0, out=new)
        closer = new < cur[idx]
        rows = idx[closer]
        cur[rows] = new[closer]
        labels[s + rows] = lab[:m][closer] + offset
    return d2, labels


def parallel_round(
    block,
    state,
    packed_new,
    offset: int,
    seed: int,
    rnd: int,
    start: int,
    ell: float,
    tiles: Tiles,
    shift=None,
):
    """One k-means|| round on a block.

    Updates the block's running nearest candidate (:func:`nearest_update`) with the
    candidates added last round only (``packed_new``, numbered from ``offset``), then
    returns every row that *could* be selected this round: a row is selected globally when
    ``ell * d2 / u > phi`` (``u`` uniform), and since the block's own cost ``phi_b <= phi``
    the rows with ``ell * d2 / u > phi_b`` are a superset (about ``ell`` of them per block
    in expectation). The driver keeps those whose key beats the global ``phi``; this is
    exact Bernoulli sampling with ``p = min(1, ell d2 / phi)`` in one pass.

    With ``shift`` the block is first centered and the centered block is returned too (the
    first round doubles as the centering pass).

    Returns ``((d2, labels), (phi_b, keys, global_index, rows), centered block or None)``.
    """
    centered = None
    if shift is not None:
        centered = center_block(block, shift)
        x = load(centered)  # a streamed block is read once, centered on load
    else:
        x = load(block)
    d2, labels = nearest_update(x, state, packed_new, offset, tiles)
    phi_b = float(d2.sum(dtype=np.float64))
    u = row_uniforms(seed, rnd, start, len(d2))
    with np.errstate(divide="ignore"):
        keys = ell * d2.astype(np.float64) / np.maximum(u, 1e-300)
    sel = np.flatnonzero(keys > phi_b)
    return (d2, labels), (phi_b, keys[sel], sel + start, x[sel].copy()), centered


def round_result(step):
    return step[1]


def round_state(step):
    return step[0]


def round_block(step):
    return step[2]


def candidate_weights(
    block,
    state,
    packed_last,
    offset: int,
    n_candidates: int,
    tiles: Tiles,
    with_sums: bool = False,
):
    """Rows of the block nearest to each candidate (Bahmani et al. step 7), and their sums.

    The rounds already know every row's nearest candidate among all but the last round's
    candidates (``state``), so only those (``packed_last``, numbered from ``offset``) are
    measured here: the pass costs one round, not a distance to every candidate.

    Returns ``(counts (n_candidates,) int64, sums)``: with ``with_sums`` the float64 sum of
    the rows nearest to each candidate ``(n_candidates, d)``, else None. The sums give the
    mean of each candidate's cell, which summarises the data far better than the candidate
    row itself when the candidates are reclustered (see ``dkm.kmeans.init.recluster``).
    """
    x = load(block)
    _, labels = nearest_update(x, state, packed_last, offset, tiles)
    counts = np.bincount(labels, minlength=n_candidates).astype(np.int64)
    if not with_sums:
        return counts, None
    sums = np.zeros((n_candidates, x.shape[1]), dtype=np.float64)
    acc = accumulator(tiles)
    # Tile by tile: numpy's accumulator (small workers) holds index and weight buffers the
    # size of what it is given, which for a whole block would be 16 bytes per value.
    step = max(64, tiles.x_tile_bytes // max(1, x.shape[1] * x.itemsize))
    for s in range(0, len(x), step):
        acc(x[s : s + step], labels[s : s + step], sums)
    return counts, sums


def add_weights(*parts):
    """Sum of :func:`candidate_weights` results (counts, and sums when present)."""
    counts = parts[0][0].copy()
    sums = None if parts[0][1] is None else parts[0][1].copy()
    for c, s in parts[1:]:
        counts += c
        if sums is not None:
            sums += s
    return counts, sums


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
