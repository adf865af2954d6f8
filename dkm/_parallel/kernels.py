"""Per-block kernels every model shares: loading a block, the distance / assignment kernel,
per-cluster partial sums, and the statistics pass.

Every function here works on one block of rows held in memory on a worker (or in the local
thread pool) and returns small results: per-cluster sums and counts, a few rows, a labels
vector. The model drivers only ever ship parameters in and these small results out.

Blocks hold rows *centered* on the data mean (as scikit-learn does before Lloyd: the expanded
distance ``||c||^2 - 2 x.c`` loses precision when ``||x||`` is large compared with the
distances). Distances are computed tile by tile as ``x @ (-2 C)^T + ||c||^2``, the same
float32 operations as scikit-learn's GEMM with ``alpha=-2, beta=1``, so ties break the same
way. ``||x||^2`` is constant per row and never needed for the argmin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dkm import config
from dkm._parallel.random import row_uniforms


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the distance kernel, read once on the client and shipped to the tasks.

    ``tile_bytes``: one rows x k distance tile, small enough to stay in L2 so that the argmin
    reads it from cache right after the GEMM wrote it (measured: 2048 x 256 float32 tiles were
    35% faster than whole-block distance matrices). ``x_tile_bytes``: rows of x per tile in
    the fused step, so the partial sums read x from cache too.
    """

    tile_bytes: int = 2 * 2**20
    x_tile_bytes: int = 512 * 2**10

    @classmethod
    def from_config(cls) -> Tiles:
        return cls(config.get_bytes("kernels.tile-bytes"), config.get_bytes("kernels.x-tile-bytes"))

    def rows(self, k: int, itemsize: int) -> int:
        """Rows per distance tile for ``k`` centres."""
        return int(max(256, min(65536, self.tile_bytes // max(1, k * itemsize))))


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

    def centered(self, shift: np.ndarray) -> ZarrRows:
        return ZarrRows(self.store, self.variable, self.start, self.stop, self.dtype, shift)


def as_block(x, dtype) -> np.ndarray:
    """A C-contiguous private copy of a row block in the working dtype."""
    return np.array(x, dtype=dtype, order="C", copy=True)


def center_block(block, shift: np.ndarray):
    if isinstance(block, ZarrRows):
        return block.centered(shift)
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


def assign(x: np.ndarray, packed: np.ndarray, tiles: Tiles, want_d2: bool = True):
    """Nearest centroid of every row.

    Returns ``labels`` (int32) and, if asked, ``d2`` (squared distance, same float dtype,
    clipped at 0 because the expanded form can go slightly negative in float32).
    """
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int32)
    d2 = np.empty(n, dtype=x.dtype) if want_d2 else None
    for s, m, xt, dist, lab in nearest_tiles(x, packed, tiles.rows(packed.shape[1], x.itemsize)):
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


def lloyd_step(block, packed: np.ndarray, prev_labels, tiles: Tiles):
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
    # Rows per tile: the distance tile stays in L2 (see Tiles) and so does the x tile,
    # so that the partial sums read x from cache right after the GEMM did. For wide rows
    # (pixels, d=784) this is what keeps a step at about one pass over memory, not two.
    step = max(64, min(tiles.rows(k, x.itemsize), tiles.x_tile_bytes // max(1, d * x.itemsize)))
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


def farthest_rows(block, packed: np.ndarray, m: int, start: int, tiles: Tiles):
    """The ``m`` rows of a block farthest from their nearest centroid.

    Returns ``(d2, global_index, labels, rows)`` sorted by decreasing ``d2``; used to re-seed
    empty clusters the way scikit-learn does.
    """
    x = load(block)
    labels, d2 = assign(x, packed, tiles)
    m = min(m, len(d2))
    idx = np.argpartition(d2, len(d2) - m)[len(d2) - m :] if m < len(d2) else np.arange(len(d2))
    order = idx[np.argsort(-d2[idx], kind="stable")]
    return d2[order].astype(np.float64), order + start, labels[order], x[order].copy()


def take_rows(block, local_index: np.ndarray) -> np.ndarray:
    return load(block)[local_index].copy()


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


def add_arrays(*parts):
    out = parts[0].copy()
    for p in parts[1:]:
        out += p
    return out
