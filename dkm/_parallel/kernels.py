"""Per-chunk kernels for k-means.

Every function here works on one block of rows held in memory on a worker (or in the local
thread pool) and returns small results: per-cluster sums and counts, a few candidate rows, a
labels vector. The drivers in :mod:`dkm.kmeans.lloyd`, :mod:`dkm.kmeans.init` and
:mod:`dkm.kmeans.minibatch` only ever ship centroids in and these small results out.

Blocks hold rows *centred* on the data mean (as scikit-learn does before Lloyd: the expanded
distance ``||c||^2 - 2 x.c`` loses precision when ``||x||`` is large compared with the
distances). Distances are computed tile by tile as ``x @ (-2 C)^T + ||c||^2``, the same
float32 operations as scikit-learn's GEMM with ``alpha=-2, beta=1``, so ties break the same
way. ``||x||^2`` is constant per row and never needed for the argmin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Target size of one rows x k distance tile. Small enough to stay in L2 so that the argmin
# reads it from cache right after the GEMM wrote it (measured: 2048 x 256 float32 tiles were
# 35% faster than whole-block distance matrices).
_TILE_BYTES = 2 * 1024 * 1024
_X_TILE_BYTES = 512 * 1024


@dataclass(frozen=True, eq=False)
class ZarrRows:
    """A lazily loaded row block of a 2-D Zarr array (used when data is streamed, not persisted).

    Holds only the location, so it is cheap to ship to a worker every iteration.
    """

    store: str
    variable: str
    start: int
    stop: int
    dtype: str
    shift: np.ndarray | None = None  # data mean, subtracted on load

    def load(self) -> np.ndarray:
        import zarr

        arr = zarr.open_group(self.store, mode="r")[self.variable]
        x = np.array(arr[self.start : self.stop], dtype=np.dtype(self.dtype))
        if self.shift is not None:
            x -= self.shift
        return x

    def centred(self, shift: np.ndarray) -> ZarrRows:
        return ZarrRows(self.store, self.variable, self.start, self.stop, self.dtype, shift)


def as_block(x, dtype) -> np.ndarray:
    """A C-contiguous private copy of a row block in the working dtype."""
    return np.array(x, dtype=dtype, order="C", copy=True)


def centre_block(block, shift: np.ndarray):
    if isinstance(block, ZarrRows):
        return block.centred(shift)
    return block - shift


def load(block) -> np.ndarray:
    """Materialise a block handle (an in-memory array or a :class:`ZarrRows`)."""
    if isinstance(block, ZarrRows):
        return block.load()
    return block


def pack_centers(centers: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Pack centroids as one ``(d + 1, k)`` array: rows ``(-2 C)^T`` then ``||c||^2``.

    ``||c||^2`` is computed in the working dtype like scikit-learn's ``row_norms``.
    """
    c = np.asarray(centers, dtype=dtype)
    packed = np.empty((c.shape[1] + 1, c.shape[0]), dtype=dtype)
    packed[:-1] = (-2 * c).T
    packed[-1] = np.einsum("ij,ij->i", c, c)
    return packed


def tile_rows(k: int, itemsize: int) -> int:
    return int(max(256, min(65536, _TILE_BYTES // max(1, k * itemsize))))


def nearest_tiles(x: np.ndarray, packed: np.ndarray, step: int):
    """Nearest centroid, tile by tile: yields ``(start, rows, x_tile, dist, labels)``.

    ``dist`` holds ``||c||^2 - 2 x.c`` (the row norm left out) and ``labels`` its argmin; both
    live in buffers reused for every tile, so read them before the next one. Reusing them
    matters on worker processes: the nanny sets MALLOC_TRIM_THRESHOLD_, so a fresh 2 MB tile
    per GEMM is a fresh mmap with page faults every time (measured 3x slower steps on workers
    than in-process before the buffers were reused).
    """
    n, k = x.shape[0], packed.shape[1]
    neg2ct, csq = packed[:-1], packed[-1]
    buf = np.empty((min(step, n), k), dtype=np.result_type(x.dtype, packed.dtype))
    lab = np.empty(min(step, n), dtype=np.intp)
    for s in range(0, n, step):
        xt = x[s : s + step]
        m = len(xt)
        dist = np.matmul(xt, neg2ct, out=buf[:m])
        dist += csq
        np.argmin(dist, axis=1, out=lab[:m])
        yield s, m, xt, dist, lab[:m]


def assign(x: np.ndarray, packed: np.ndarray, want_d2: bool = True):
    """Nearest centroid of every row.

    Returns ``labels`` (int32) and, if asked, ``d2`` (squared distance, same float dtype,
    clipped at 0 because the expanded form can go slightly negative in float32).
    """
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int32)
    d2 = np.empty(n, dtype=x.dtype) if want_d2 else None
    for s, m, xt, dist, lab in nearest_tiles(x, packed, tile_rows(packed.shape[1], x.itemsize)):
        labels[s : s + m] = lab
        if want_d2:
            d2[s : s + m] = np.maximum(dist[np.arange(m), lab] + np.einsum("ij,ij->i", xt, xt), 0)
    return labels, d2


def cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per-cluster float64 sums of the rows of ``x`` (``x`` may be a strided view)."""
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    fn = _numba_accumulate()
    if fn is not None:
        fn(x, labels, sums)
    else:  # pragma: no cover - numba is a dependency of dask-ml, so normally present
        import scipy.sparse as sp

        onehot = sp.csr_matrix(
            (np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(k, len(labels))
        )
        sums[:] = onehot @ np.asarray(x, dtype=np.float64)
    return sums


_NUMBA_ACC = None


def _accumulate_py(x, labels, sums):  # pragma: no cover - compiled by numba
    n, d = x.shape
    for i in range(n):
        lab = labels[i]
        for f in range(d):
            sums[lab, f] += x[i, f]


def _numba_accumulate():
    """A compiled ``sums[label[i]] += x[i]`` loop, or None without numba.

    Measured at 3.5 ms per 250k x 25 block against 29-55 ms for a sparse one-hot product and
    44 ms for per-feature ``bincount``: the sums would otherwise cost a third of an iteration.
    Imported lazily so that dkm does not pay numba's import time unless it fits.
    """
    global _NUMBA_ACC
    if _NUMBA_ACC is None:
        try:
            import numba
        except ImportError:  # pragma: no cover
            _NUMBA_ACC = False
            return None

        _NUMBA_ACC = numba.njit(nogil=True, cache=True)(_accumulate_py)
    return _NUMBA_ACC or None


# --------------------------------------------------------------------------------------------
# Lloyd
# --------------------------------------------------------------------------------------------


def lloyd_step(block, packed: np.ndarray, prev_labels):
    """E-step and partial M-step on one block.

    Returns ``(labels, stats)`` where ``stats = (sums (k, d) float64, counts (k,) int64,
    n_moved)``. ``labels`` stay on the worker for the next iteration's moved-points count.
    """
    x = load(block)
    k = packed.shape[1]
    n, d = x.shape
    labels = np.empty(n, dtype=np.int32)
    sums = np.zeros((k, d), dtype=np.float64)
    acc = _numba_accumulate()
    # Rows per tile: the distance tile stays in L2 (see tile_rows) and so does the x tile,
    # so that the partial sums read x from cache right after the GEMM did. For wide rows
    # (pixels, d=784) this is what keeps a step at about one pass over memory, not two.
    step = max(64, min(tile_rows(k, x.itemsize), _X_TILE_BYTES // max(1, d * x.itemsize)))
    for s, m, xt, _dist, lab in nearest_tiles(x, packed, step):
        labels[s : s + m] = lab
        if acc is not None:
            acc(xt, labels[s : s + m], sums)
    if acc is None:  # pragma: no cover
        sums = cluster_sums(x, labels, k)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    if prev_labels is None:
        moved = len(labels)
    else:
        moved = int(np.count_nonzero(labels != prev_labels))
    return labels, (sums, counts, moved)


def step_stats(step):
    return step[1]


def step_labels(step):
    return step[0]


def combine_stats(*parts):
    sums = parts[0][0].copy()
    counts = parts[0][1].copy()
    moved = parts[0][2]
    for s, c, m in parts[1:]:
        sums += s
        counts += c
        moved += m
    return sums, counts, moved


def farthest_rows(block, packed: np.ndarray, m: int, start: int):
    """The ``m`` rows of a block farthest from their nearest centroid.

    Returns ``(d2, global_index, labels, rows)`` sorted by decreasing ``d2``; used to re-seed
    empty clusters the way scikit-learn does.
    """
    x = load(block)
    labels, d2 = assign(x, packed)
    m = min(m, len(d2))
    idx = np.argpartition(d2, len(d2) - m)[len(d2) - m :] if m < len(d2) else np.arange(len(d2))
    order = idx[np.argsort(-d2[idx], kind="stable")]
    return d2[order].astype(np.float64), order + start, labels[order], x[order].copy()


def take_rows(block, local_index: np.ndarray) -> np.ndarray:
    return load(block)[local_index].copy()


def combine_rows(*parts):
    return np.concatenate(parts, axis=0)


# --------------------------------------------------------------------------------------------
# Statistics / validation pass
# --------------------------------------------------------------------------------------------


def block_stats(block, seed: int, start: int):
    """One pass of validation and moments over a block.

    Returns a dict with the number of rows holding NaN/inf, per-feature sum, sum of squares,
    min and max (float64, over finite rows), the sum of ``||x||^2`` and the block's row with the
    largest uniform key (``u`` from :func:`row_uniforms`), which gives a uniformly random row
    over the whole data set independent of chunking.
    """
    x = load(block)
    n = x.shape[0]
    finite = np.isfinite(x).all(axis=1)
    n_bad = int(n - np.count_nonzero(finite))
    xf = x[finite] if n_bad else x
    x64 = xf.astype(np.float64)
    u = row_uniforms(seed, 0, start, n)
    u[~finite] = -1.0
    best = int(np.argmax(u))
    return {
        "n": n,
        "n_bad": n_bad,
        "sum": x64.sum(axis=0),
        "sumsq": (x64 * x64).sum(axis=0),
        "min": xf.min(axis=0).astype(np.float64) if len(xf) else np.full(x.shape[1], np.inf),
        "max": xf.max(axis=0).astype(np.float64) if len(xf) else np.full(x.shape[1], -np.inf),
        "first_key": float(u[best]),
        "first_row": x[best].copy(),
    }


def combine_block_stats(*parts):
    out = dict(parts[0])
    for p in parts[1:]:
        out["n"] += p["n"]
        out["n_bad"] += p["n_bad"]
        out["sum"] = out["sum"] + p["sum"]
        out["sumsq"] = out["sumsq"] + p["sumsq"]
        out["min"] = np.minimum(out["min"], p["min"])
        out["max"] = np.maximum(out["max"], p["max"])
        if p["first_key"] > out["first_key"]:
            out["first_key"] = p["first_key"]
            out["first_row"] = p["first_row"]
    return out


# --------------------------------------------------------------------------------------------
# Chunking-independent random numbers
# --------------------------------------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + _GOLD
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def row_uniforms(seed: int, stream: int, start: int, n: int) -> np.ndarray:
    """Uniform [0, 1) numbers for global rows ``start .. start + n``.

    A counter-based hash of (seed, stream, global row) rather than a per-block generator:
    dask's per-block RNG makes samples depend on the chunking (CONVENTIONS section 3), this
    does not, so k-means|| and mini-batch give the same result for any chunking.
    """
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed, stream], dtype=np.uint64)).sum(dtype=np.uint64)
        rows = np.arange(start, start + n, dtype=np.uint64)
        z = _splitmix64(_splitmix64(rows ^ key) + np.uint64(stream))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --------------------------------------------------------------------------------------------
# k-means||
# --------------------------------------------------------------------------------------------


def parallel_round(
    block, d2_prev, packed_new, seed: int, rnd: int, start: int, ell: float, shift=None
):
    """One k-means|| round on a block.

    Updates the block's running min squared distance with the candidates added last round
    only (``packed_new``), then returns every row that *could* be selected this round: a row
    is selected globally when ``ell * d2 / u > phi`` (``u`` uniform), and since the block's own
    cost ``phi_b <= phi`` the rows with ``ell * d2 / u > phi_b`` are a superset (about ``ell``
    of them per block in expectation). The driver keeps those whose key beats the global
    ``phi``; this is exact Bernoulli sampling with ``p = min(1, ell d2 / phi)`` in one pass.

    With ``shift`` the block is first centred and the centred block is returned too (the
    first round doubles as the centring pass).

    Returns ``(d2, (phi_b, keys, global_index, rows), centred block or None)``.
    """
    x = load(block)
    centred = None
    if shift is not None:
        centred = centre_block(block, shift)
        x = load(centred)
    if packed_new.shape[1] == 0:  # nothing was selected last round
        d2 = d2_prev
    else:
        _, d2_new = assign(x, packed_new)
        d2 = d2_new.astype(np.float64) if d2_prev is None else np.minimum(d2_prev, d2_new)
    phi_b = float(d2.sum())
    u = row_uniforms(seed, rnd, start, len(d2))
    with np.errstate(divide="ignore"):
        keys = ell * d2 / np.maximum(u, 1e-300)
    sel = np.flatnonzero(keys > phi_b)
    return d2, (phi_b, keys[sel], sel + start, x[sel].copy()), centred


def round_result(step):
    return step[1]


def round_d2(step):
    return step[0]


def round_block(step):
    return step[2]


def candidate_weights(block, packed: np.ndarray):
    """Number of rows of the block nearest to each candidate (Bahmani et al. step 7)."""
    labels, _ = assign(load(block), packed, want_d2=False)
    return np.bincount(labels, minlength=packed.shape[1]).astype(np.int64)


def add_arrays(*parts):
    out = parts[0].copy()
    for p in parts[1:]:
        out += p
    return out


# --------------------------------------------------------------------------------------------
# Predict / transform on raw chunks, for dask map_blocks
# --------------------------------------------------------------------------------------------


def predict_chunk(x: np.ndarray, centers_c: np.ndarray, shift: np.ndarray, dtype) -> np.ndarray:
    """Labels of raw rows, centred with the fitted mean exactly as during the fit."""
    xc = np.asarray(x, dtype=dtype) - shift
    labels, _ = assign(xc, pack_centers(centers_c, np.dtype(dtype)), want_d2=False)
    return labels


def transform_chunk(x: np.ndarray, centers_c: np.ndarray, shift: np.ndarray, dtype) -> np.ndarray:
    """Euclidean distances to every centroid (float, ``(n, k)``)."""
    xc = np.asarray(x, dtype=dtype) - shift
    c = np.asarray(centers_c, dtype=dtype)
    d2 = np.einsum("ij,ij->i", xc, xc)[:, None] - 2 * (xc @ c.T) + np.einsum("ij,ij->i", c, c)
    return np.sqrt(np.maximum(d2, 0))


def score_chunk(x: np.ndarray, centers_c: np.ndarray, shift: np.ndarray, dtype) -> np.ndarray:
    """Sum of squared distances of the chunk's rows to their nearest centroid, as (1,)."""
    xc = np.asarray(x, dtype=dtype) - shift
    labels, _ = assign(xc, pack_centers(centers_c, np.dtype(dtype)), want_d2=False)
    diff = xc.astype(np.float64) - np.asarray(centers_c, dtype=np.float64)[labels]
    return np.array([np.einsum("ij,ij->", diff, diff)])
