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

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from dkm import config
from dkm._parallel.random import row_uniforms


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the distance kernel, read once on the client and shipped to the tasks.

    ``tile_bytes``: one rows x k distance tile, small enough to stay in L2 so that the argmin
    reads it from cache right after the GEMM wrote it (measured: 2048 x 256 float32 tiles were
    35% faster than whole-block distance matrices). ``x_tile_bytes``: rows of x per tile in
    the fused step, so the partial sums read x from cache too. ``numba_min_memory``: workers
    with a smaller memory limit sum per cluster with numpy instead of numba (see
    :func:`accumulator`).
    """

    tile_bytes: int = 2 * 2**20
    x_tile_bytes: int = 512 * 2**10
    numba_min_memory: int = 2**30

    @classmethod
    def from_config(cls) -> Tiles:
        return cls(
            config.get_bytes("kernels.tile-bytes"),
            config.get_bytes("kernels.x-tile-bytes"),
            config.get_bytes("kernels.numba-min-memory"),
        )

    def rows(self, k: int, itemsize: int) -> int:
        """Rows per distance tile for ``k`` centres."""
        return int(max(256, min(65536, self.tile_bytes // max(1, k * itemsize))))


# Memory a task needs beside its block, used to size blocks from the workers' memory limit
# (:mod:`dkm._parallel.blocks`). Per row: the per-row vectors the kernels allocate while a
# block is loaded -- labels and squared distances (int32 + float32), and in a k-means|| round
# the running minimum (float64, previous and new), the uniforms and keys (float64 each) --
# about 56 bytes, rounded up. Per task: the distance and x tiles (the fused step and the
# statistics pass hold a float64 copy of one x tile).
ROW_WORK_BYTES = 64
# Per row kept on the workers between tasks while a fit runs, whatever the block size, for
# the models that do not state their own (``blocks.Source.row_state``): labels, distances,
# bounds or the running minimum of k-means|| (float64, previous and current). A KMeans fit
# states its own, by algorithm (:func:`dkm.kmeans.lloyd.row_state_bytes`: 12-28 bytes for
# float32 rows, up to 56 for Yinyang's eight group bounds set up beside a plain pass's state).
ROW_STATE_BYTES = 44


def task_fixed_bytes(tiles: Tiles) -> int:
    """Working memory of one kernel task that does not grow with the block."""
    return tiles.tile_bytes + 2 * tiles.x_tile_bytes


@dataclass(frozen=True, eq=False)
class ZarrRows:
    """A lazily loaded row block of a 2-D Zarr array.

    Holds only the location, so it is cheap to ship to a worker every iteration: streamed
    data is read through it every pass, and on a cluster persisted blocks of a store are
    loaded with it once (a task the scheduler can rerun if the block is lost).
    """

    store: str
    variable: str
    start: int
    stop: int
    dtype: str
    shift: np.ndarray | None = None  # data mean, subtracted on load

    def load(self) -> np.ndarray:
        """The rows in the working dtype, centered when a shift is set: one array, no copy.

        Read one Zarr chunk at a time straight into the block: a single read over many
        chunks decodes up to ``zarr.config["async.concurrency"]`` chunks at once, so a
        streamed block would need several chunk-sized buffers beside it. Here a task holds
        its block plus one decoded chunk (and, when the store's dtype differs from the
        working dtype, that chunk's rows once more before the cast). The mean is
        subtracted piece by piece, in place. Plain local arrays are decoded by
        :class:`dkm.data.chunks.DirectChunks`, without zarr's codec pipeline.
        """
        import zarr
        from zarr.core.buffer import default_buffer_prototype

        from dkm.data.chunks import DirectChunks

        arr = zarr.open_group(self.store, mode="r")[self.variable]
        dtype = np.dtype(self.dtype)
        x = np.empty((self.stop - self.start, arr.shape[1]), dtype=dtype)
        step = max(1, int(arr.chunks[0]))
        same = np.dtype(arr.dtype) == dtype
        direct = DirectChunks.of(arr) if same else None
        scratch: list = []
        a = self.start
        while a < self.stop:
            b = min(self.stop, (a // step + 1) * step)
            piece = x[a - self.start : b - self.start]
            if direct is not None and direct.read(a // step, a % step, piece, scratch):
                pass
            elif same:
                out = default_buffer_prototype().nd_buffer.from_numpy_array(piece)
                arr.get_basic_selection((slice(a, b), slice(None)), out=out)
            else:
                piece[...] = arr[a:b]
            if self.shift is not None:
                piece -= self.shift
            a = b
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


def same_block(block):
    """The block itself: a task that moves a persisted block to the worker it runs on."""
    return block


def process_memory() -> int:
    """Resident memory of this process in bytes (what a nanny compares with its limit)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is a dependency of distributed
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def malloc_settings() -> tuple[int, int]:
    """``(mmap, trim)`` thresholds in bytes for :func:`tune_malloc`, from the config."""
    return config.get_bytes("kernels.malloc-mmap-bytes"), config.get_bytes(
        "kernels.malloc-trim-bytes"
    )


def tune_malloc(mmap_bytes: int, trim_bytes: int) -> bool:
    """Keep this process's allocations below ``mmap_bytes`` on glibc's heap.

    Dask starts worker processes with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand freed memory
    back to the system), and any malloc threshold set from the environment turns off glibc's
    sliding mmap threshold: every allocation above 128 KiB is then a new mapping whose pages
    fault in on first touch. A 2048-row gather from a block took 0.14 ms in a worker against
    0.01-0.03 ms in the client, and each mini-batch step or pruned pass makes many such
    arrays. Applied only where a ``MALLOC_*_`` variable is set (elsewhere glibc's own
    threshold adapts) and only with glibc; the trim threshold is raised with it (at least
    ``mmap_bytes``) so that a freed temporary is not returned and faulted in again.
    Returns whether it was applied.
    """
    if not mmap_bytes or not any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_bytes))) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(max(trim_bytes, mmap_bytes)))
    )


def warm_up(
    tiles: Tiles | None = None, malloc: tuple[int, int] | None = None, dask_worker=None
) -> dict:
    """Load what the kernels need on this worker, then report its memory use.

    Run with ``Client.run`` before a fit sizes its blocks: a fresh worker process holds
    about 60 MB; Zarr adds about 10 MB and numba's compiled partial sums (LLVM), on workers
    that use them (see :func:`accumulator`), about 120 MB the first time they run.
    Measuring after loading them is what the blocks can count on. ``malloc``: the
    thresholds of :func:`tune_malloc`, applied on workers that run numba. Returns
    ``{"rss": process bytes, "managed": bytes of task results held, "malloc_tuned": bool}``.
    """
    import zarr  # noqa: F401 - loaded here so that its memory is counted

    tiles = tiles or Tiles()
    managed, limit = 0, None
    if dask_worker is not None:
        state = getattr(dask_worker, "state", None)
        managed = int(getattr(state, "nbytes", 0) or 0)
        mm = getattr(dask_worker, "memory_manager", None)
        limit = float(getattr(mm, "memory_limit", None) or float("inf"))
    # Workers too small for numba keep Dask's malloc too: memory before speed there (the
    # heap holds on to what new mappings would have given back).
    tuned = bool(malloc) and use_numba(tiles, limit) and tune_malloc(*malloc)
    acc = accumulator(tiles, limit)
    acc(np.zeros((1, 1), np.float32), np.zeros(1, np.int32), np.zeros((1, 1)))
    if use_numba(tiles, limit):  # the fused pass too, so that its compiler memory counts
        x = np.zeros((1, 1), np.float32)
        fused_pass(x, pack_centers(x, x.dtype), tiles, np.zeros(1, np.int32), d2=x[0].copy())
    return {"rss": process_memory(), "managed": managed, "malloc_tuned": tuned}


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
    """Nearest centroid, tile by tile, with numpy: yields ``(start, rows, x_tile, dist, labels)``.

    ``dist`` holds ``||c||^2 - 2 x.c`` (the row norm left out) and ``labels`` its argmin; both
    live in buffers reused for every tile, so read them before the next one. Reusing them
    matters on worker processes: the nanny sets MALLOC_TRIM_THRESHOLD_, so a fresh 2 MB tile
    per GEMM is a fresh mmap with page faults every time (measured 3x slower steps on workers
    than in-process before the buffers were reused). The models use :func:`fused_pass`; this
    is its numpy twin for workers without numba and the reference the tests compare with.
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


# Below this many centres the fused pass's GEMM is row-major (rows x centres): a (centres x
# rows) GEMM with a left operand of a few rows runs at half speed in OpenBLAS (Fashion-MNIST
# pixels 35000 x 784, k = 10, one thread: 0.049 s against 0.025 s row-major).
FUSED_MIN_K = 32

# Rows per tile of the fused pass. The GEMM writes a (centres x rows) tile and one compiled
# loop reads it back while it is still in cache, keeping per row the running minimum; rows
# along the tile's fast axis make that loop a vectorised compare-and-select over rows, not a
# branchy argmin along each row. Measured on 400k x 25 float32, one thread, k = 256 / 1024 /
# 4096: 64 rows 0.102 / 0.515 / 1.38 s, 128 rows 0.087 / 0.417 / 1.20, 256 rows 0.081 / 0.43 /
# 1.19, 512 rows 0.085 / 0.49 / 1.66; numpy's GEMM + add + argmin + sums 0.11-0.18 / 0.49 /
# 2.12. Centres beyond ``tiles.tile_bytes`` per tile are taken in chunks (k = 16384: 7.2 s
# in chunks of 2048 against 9.7 s for the whole 16 MB tile).
FUSED_ROWS = 256
# Rows whose norms :func:`fused_pass` computes per call when not given (a multiple of
# FUSED_ROWS).
NORM_ROWS = 256 * FUSED_ROWS
# Centres per sweep over a tile's rows where the fused pass keeps two minima.
CENTRES_PER_SWEEP = 4


def fused_pass(
    x: np.ndarray,
    packed: np.ndarray,
    tiles: Tiles,
    labels: np.ndarray,
    *,
    d2: np.ndarray | None = None,
    second: np.ndarray | None = None,
    sums: np.ndarray | None = None,
    counts: np.ndarray | None = None,
    xsq: np.ndarray | None = None,
) -> None:
    """Nearest centroid of every row of ``x`` and what the models need of it, in one pass.

    Per tile of :data:`FUSED_ROWS` rows: one GEMM ``(-2 C) x^T`` into a buffer reused for
    every tile, then one compiled loop over the tile while it is in cache that adds
    ``||c||^2``, keeps the running minimum and its index (the first index on ties, as
    ``argmin``), and once the tile's last centres are in, writes the squared distance and
    adds the rows to the float64 per-cluster sums. The distances are the same float
    operations as :func:`nearest_tiles` (so the same labels to the last tie), the sums add
    the rows in row order (the same bits as :func:`cluster_sums`).

    Parameters
    ----------
    x : ndarray (n, d)
        Rows in the working dtype.
    packed : ndarray (d + 1, k)
        :func:`pack_centers` of the centres.
    tiles : Tiles
        Tile budget: centres are taken ``tile_bytes`` of distances at a time.
    labels : ndarray (n,) int32
        Filled with the index of the nearest centre.
    d2 : ndarray (n,), optional
        Filled with the squared distance to it (clipped at 0; the expanded form can go
        slightly negative).
    second : ndarray (n,), optional
        Filled with the squared distance to the second nearest centre (clipped at 0; inf when
        k = 1): the pruned Lloyd's lower bound.
    sums, counts : ndarray (k, d) float64 and (k,) int64, optional
        The rows and their number are added per nearest centre.
    xsq : ndarray (n,), optional
        :func:`row_sqnorms` of ``x``, which ``d2`` and ``second`` add to the distances;
        computed first when not given. A Lloyd fit keeps them per block between passes: over
        784 pixels they were a tenth of the pass.
    """
    n, d = x.shape
    k = packed.shape[1]
    if n == 0:
        return
    fn = _fused_kernels().tile
    dtype = np.result_type(x.dtype, packed.dtype)
    # Row norms not given: computed NORM_ROWS rows at a time into one small buffer (a call
    # per tile cost 5-8% of a pass over 25 features; one array for the block, its memory).
    own_sq = None
    if xsq is None and (d2 is not None or second is not None):
        own_sq = np.empty(min(n, NORM_ROWS), dtype=x.dtype)
    # Every GEMM is FUSED_ROWS rows high, the last tile padded: OpenBLAS computes a GEMM of a
    # few rows another way (784 features: a row's distances alone differed in the 5th
    # digit), and the pruned passes recompute a few gathered rows that must get the bits
    # this pass gets for them among their neighbours.
    rows = FUSED_ROWS
    # A few centres: one row-major GEMM (rows x centres), as numpy's twin has it, which the
    # compiled loop reads row by row. Else centres x rows, in chunks, read centre by centre.
    row_major = k < FUSED_MIN_K
    chunk = k if row_major else int(max(1, min(k, tiles.tile_bytes // (rows * dtype.itemsize))))
    neg2c, csq = packed[:-1].T, np.ascontiguousarray(packed[-1])
    buf = np.empty(chunk * rows, dtype=dtype)
    pad = np.zeros((rows, d), dtype=x.dtype) if n % rows else None
    best = np.empty(rows, dtype=dtype)
    nxt = np.empty(rows if second is not None else 0, dtype=dtype)
    no_rows = np.empty(0, dtype=dtype)
    no_sums, no_counts = np.empty((0, d)), np.empty(0, dtype=np.int64)
    for s in range(0, n, rows):
        xt = x[s : s + rows]
        m = len(xt)
        lab = labels[s : s + m]
        full = xt
        if m < rows:
            pad[:m] = xt
            full = pad
        for a in range(0, k, chunk):
            kk = min(chunk, k - a)
            if row_major:
                dist = np.matmul(full, packed[:-1], out=buf[: rows * k].reshape(rows, k))[:m]
            else:
                dist = np.matmul(neg2c[a : a + kk], full.T, out=buf[: kk * rows].reshape(kk, rows))
                dist = dist[:, :m]
            last = a + kk == k
            sq = no_rows
            if last and xsq is not None:
                sq = xsq[s : s + m]
            elif last and own_sq is not None:
                at = s % NORM_ROWS
                if at == 0:
                    fill = own_sq[: min(NORM_ROWS, n - s)]
                    _fused_kernels().sqnorms(x[s : s + len(fill)], fill)
                sq = own_sq[at : at + m]
            fn(
                dist,
                row_major,
                csq,
                a,
                xt,
                sq,
                lab,
                best[:m],
                nxt[:m] if second is not None else nxt,
                d2[s : s + m] if (last and d2 is not None) else no_rows,
                second[s : s + m] if (last and second is not None) else no_rows,
                sums if (last and sums is not None) else no_sums,
                counts if (last and counts is not None) else no_counts,
            )


def _fused_py(  # pragma: no cover - compiled by numba
    dist, rowwise, csq, off, xt, xsq, lab, best, nxt, d2, second, sums, counts
):
    m = lab.shape[0]
    kk = dist.shape[1] if rowwise else dist.shape[0]
    top2 = nxt.shape[0] > 0
    if off == 0:
        for i in range(m):
            best[i] = np.inf
            lab[i] = 0
            if top2:
                nxt[i] = np.inf
    if rowwise:  # dist is (rows, centres): one row's centres at a time, from its cache line
        for i in range(m):
            b, lb = best[i], lab[i]
            if top2:
                nx = nxt[i]
                for j in range(kk):
                    v = dist[i, j] + csq[off + j]
                    if v < b:
                        nx = b
                        b = v
                        lb = off + j
                    elif v < nx:
                        nx = v
                nxt[i] = nx
            else:
                for j in range(kk):
                    v = dist[i, j] + csq[off + j]
                    if v < b:
                        b = v
                        lb = off + j
            best[i], lab[i] = b, lb
    else:  # (centres, rows): a vectorised compare-and-select over the rows of each centre
        # Keeping two minima, CENTRES_PER_SWEEP centres per sweep over the rows: a row's
        # pair stays in registers across them (a constant count, which the compiler
        # unrolls). 5-10% of a pass with the second distance at k = 256-4096; the single
        # minimum gained nothing measurable that way.
        whole = kk - kk % CENTRES_PER_SWEEP if top2 else 0
        for j0 in range(0, whole, CENTRES_PER_SWEEP):
            for i in range(m):
                b, nx, lb = best[i], nxt[i], lab[i]
                for q in range(CENTRES_PER_SWEEP):
                    v = dist[j0 + q, i] + csq[off + j0 + q]
                    if v < b:
                        nx = b
                        b = v
                        lb = off + j0 + q
                    elif v < nx:
                        nx = v
                best[i], nxt[i], lab[i] = b, nx, lb
        for j in range(whole, kk):
            c = csq[off + j]
            row = dist[j]
            if top2:
                for i in range(m):
                    v = row[i] + c
                    if v < best[i]:
                        nxt[i] = best[i]
                        best[i] = v
                        lab[i] = off + j
                    elif v < nxt[i]:
                        nxt[i] = v
            else:
                for i in range(m):
                    v = row[i] + c
                    if v < best[i]:
                        best[i] = v
                        lab[i] = off + j
    d = xt.shape[1]
    if d2.shape[0] > 0 or second.shape[0] > 0:
        for i in range(m):
            q = xsq[i]
            if d2.shape[0] > 0:
                d2[i] = max(best[i] + q, 0)
            if second.shape[0] > 0:
                second[i] = max(nxt[i] + q, 0)
    if counts.shape[0] > 0:
        for i in range(m):
            counts[lab[i]] += 1
    if sums.shape[0] > 0:
        for i in range(m):
            lb = lab[i]
            for f in range(d):
                sums[lb, f] += xt[i, f]


def _sqnorms_py(x, out):  # pragma: no cover - compiled by numba
    for i in range(x.shape[0]):
        q = x[i, 0] * np.float32(0)  # in the rows' dtype: float32 * float32 stays float32
        for f in range(x.shape[1]):
            q += x[i, f] * x[i, f]
        out[i] = q


_FUSED = None


def _fused_kernels():
    """The compiled tile loop of :func:`fused_pass` and the row norms' loop.

    No fast-math in the tile loop: the distance adds and compares must be exactly numpy's.
    The row norms (only in the squared distances) may reassociate their sums: a single
    running sum is a chain of dependent adds that took half of a k = 10 pass over 784
    pixels (22 of 45 ms per 35,000 rows; 3.4 ms vectorised). They are computed by this one
    compiled loop only, never inlined in another, so a row's norm has the same bits
    whichever pass needs it (inlined, the compiler vectorised the sum another way).
    """
    global _FUSED
    if _FUSED is None:
        import numba

        _FUSED = SimpleNamespace(
            tile=numba.njit(nogil=True, cache=True)(_fused_py),
            sqnorms=numba.njit(fastmath={"reassoc"}, nogil=True, cache=True)(_sqnorms_py),
        )
    return _FUSED


def row_sqnorms(x: np.ndarray, tiles: Tiles) -> np.ndarray:
    """Squared norm of every row of ``x``, in its dtype: what :func:`fused_pass` (where numba
    runs) or :func:`assign_sums`'s numpy twin adds to the distances for ``d2``."""
    if use_numba(tiles):
        out = np.empty(len(x), dtype=x.dtype)
        if len(x):
            _fused_kernels().sqnorms(x, out)
        return out
    return np.einsum("ij,ij->i", x, x)


class LazyKernels:
    """Numba twins of plain-Python kernels, compiled on the first call of this object.

    numba is imported only then: a worker too small for its compiler (:func:`use_numba`)
    never loads it. ``build`` returns the compiled kernels (see :func:`jit_all`).
    """

    def __init__(self, build: Callable[[], SimpleNamespace]):
        self._build, self._built = build, None

    def __call__(self) -> SimpleNamespace:
        if self._built is None:
            self._built = self._build()
        return self._built


def jit_all(*functions: Callable) -> SimpleNamespace:
    """Each ``_name_py`` function compiled (no fast-math, releasing the GIL, cached on disk),
    as attribute ``name``."""
    import numba

    jit = numba.njit(nogil=True, cache=True)
    return SimpleNamespace(**{f.__name__.strip("_").removesuffix("_py"): jit(f) for f in functions})


def use_numba(tiles: Tiles, memory_limit: float | None = None) -> bool:
    """Whether this process runs the compiled kernels: not on workers whose memory limit is
    below ``tiles.numba_min_memory`` (see :func:`accumulator`), which run numpy's twins."""
    limit = _memory_limit_here() if memory_limit is None else memory_limit
    return not (tiles.numba_min_memory and limit < tiles.numba_min_memory)


def assign(x: np.ndarray, packed: np.ndarray, tiles: Tiles, want_d2: bool = True):
    """Nearest centroid of every row.

    Returns ``labels`` (int32) and, if asked, ``d2`` (squared distance, same float dtype,
    clipped at 0 because the expanded form can go slightly negative in float32).
    """
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int32)
    d2 = np.empty(n, dtype=np.result_type(x.dtype, packed.dtype)) if want_d2 else None
    if use_numba(tiles):
        fused_pass(x, packed, tiles, labels, d2=d2)
        return labels, d2
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
    else:  # pragma: no cover - numba is a dependency of dkm
        accumulate_numpy(x, labels, sums)
    return sums


def accumulate_numpy(x: np.ndarray, labels: np.ndarray, sums: np.ndarray) -> None:
    """``sums[labels[i]] += x[i]`` with numpy: one ``bincount`` over (cluster, feature).

    ``bincount`` adds its weights in index order, so every sum sees the same additions in
    the same order as numba's loop: the result is the same to the last bit. Slower than the
    compiled loop, but it needs no compiler in the worker process (see :func:`accumulator`).
    """
    NumpyAccumulator()(x, labels, sums)


class NumpyAccumulator:
    """:func:`accumulate_numpy` with its index and weight buffers kept between tiles.

    On a worker the nanny sets ``MALLOC_TRIM_THRESHOLD_``, so every fresh tile-sized array
    is a fresh ``mmap`` with page faults (see :func:`nearest_tiles`); reusing the two
    buffers made the numpy sums 2x faster per Lloyd step on workers.
    """

    def __init__(self):
        self.idx = np.empty(0, dtype=np.intp)
        self.w = np.empty(0, dtype=np.float64)

    def __call__(self, x: np.ndarray, labels: np.ndarray, sums: np.ndarray) -> None:
        k, d = sums.shape
        m = len(labels)
        if self.idx.size < m * d:
            self.idx = np.empty(m * d, dtype=np.intp)
            self.w = np.empty(m * d, dtype=np.float64)
        idx = self.idx[: m * d].reshape(m, d)
        np.multiply(labels[:, None], d, out=idx)
        idx += np.arange(d, dtype=np.intp)
        w = self.w[: m * d].reshape(m, d)
        w[...] = x
        flat = sums.reshape(-1)
        flat += np.bincount(idx.reshape(-1), weights=w.reshape(-1), minlength=k * d)


def _memory_limit_here() -> float:
    """The memory limit of the Dask worker running this task (inf outside a worker)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return float("inf")
    limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
    return float(limit) if limit else float("inf")


def accumulator(tiles: Tiles, memory_limit: float | None = None):
    """The per-cluster sum kernel for this process: numba's compiled loop, or numpy's.

    numba's compiler (LLVM) adds about 120 MB to a worker process the first time it runs,
    which on a worker with a 300 MB limit is most of what its blocks could use. Workers
    whose memory limit is below ``tiles.numba_min_memory`` (``dkm.kernels.numba-min-memory``)
    therefore use :func:`accumulate_numpy`: the same sums to the last bit, slower. Returns
    the kernel, called as ``fn(x, labels, sums)``.
    """
    limit = _memory_limit_here() if memory_limit is None else memory_limit
    if tiles.numba_min_memory and limit < tiles.numba_min_memory:
        return NumpyAccumulator()
    return _numba_accumulate() or NumpyAccumulator()


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


# Rows at least this wide keep their squared norms between Lloyd passes (4 bytes per row,
# at most 1/64 of the row). Over 784 pixels the norms were a tenth of a pass; over 25
# features a few percent, for 4% more memory than the data.
NORMS_KEPT_MIN_ROW_BYTES = 256


def assign_sums(
    x: np.ndarray,
    packed: np.ndarray,
    tiles: Tiles,
    xsq: np.ndarray | None = None,
    d2: np.ndarray | None = None,
):
    """Nearest centre, squared distance and per-cluster float64 sums and counts, in one pass.

    :func:`fused_pass` where numba runs (see :func:`accumulator`), its numpy twin (the GEMM,
    argmin and per-cluster sums tile by tile) elsewhere: the same labels and sums to the
    last bit. ``xsq``: :func:`row_sqnorms` of ``x`` if known; ``d2``: an array to write the
    squared distances into, else a new one. Returns ``(labels int32, d2, sums (k, d),
    counts (k,) int64)``.
    """
    k = packed.shape[1]
    n, d = x.shape
    labels = np.empty(n, dtype=np.int32)
    dtype = np.result_type(x.dtype, packed.dtype)
    if d2 is None or d2.shape != (n,) or d2.dtype != dtype:
        d2 = np.empty(n, dtype=dtype)
    sums = np.zeros((k, d), dtype=np.float64)
    if use_numba(tiles):
        counts = np.zeros(k, dtype=np.int64)
        fused_pass(x, packed, tiles, labels, d2=d2, sums=sums, counts=counts, xsq=xsq)
        return labels, d2, sums, counts
    acc = accumulator(tiles)
    xsq = row_sqnorms(x, tiles) if xsq is None else xsq
    step = max(64, min(tiles.rows(k, x.itemsize), tiles.x_tile_bytes // max(1, d * x.itemsize)))
    for s, m, xt, dist, lab in nearest_tiles(x, packed, step):
        labels[s : s + m] = lab
        d2[s : s + m] = np.maximum(dist[np.arange(m), lab] + xsq[s : s + m], 0)
        acc(xt, labels[s : s + m], sums)
    return labels, d2, sums, np.bincount(labels, minlength=k).astype(np.int64)


def lloyd_step(block, packed: np.ndarray, prev, tiles: Tiles):
    """E-step and partial M-step on one block, in one pass (:func:`assign_sums`).

    ``prev`` is this block's previous step (or None): its labels give the moved-points
    count. Returns ``(labels, d2, stats, xsq)`` where ``stats = (sums (k, d) float64, counts
    (k,) int64, n_moved, n_computed)``, ``n_computed`` the rows whose distances were
    computed (all of them here; fewer in the pruned step), and ``xsq`` the rows' squared
    norms (:func:`row_sqnorms`), taken from ``prev`` when it has them (None for rows
    narrower than :data:`NORMS_KEPT_MIN_ROW_BYTES`: computed in the pass). Labels and squared
    distances stay on the worker: the next step counts moved points from the labels, and the
    "farthest" empty-cluster policy picks its rows from the distances
    (:func:`farthest_from_step`) instead of another distance pass.
    """
    x = load(block)
    # A pruned step's state is not a plain step's: its bounds are not distances.
    plain = prev if prev is not None and len(prev) == 4 else (None, None, None, None)
    xsq = plain[3]
    if xsq is None and x.shape[1] * x.itemsize >= NORMS_KEPT_MIN_ROW_BYTES:
        xsq = row_sqnorms(x, tiles)
    # The previous plain pass's distances are read by nothing once this pass runs (the
    # "farthest" policy reads the last pass's, before the next one starts): written over,
    # they save a block-length array of the state a fit keeps.
    labels, d2, sums, counts = assign_sums(x, packed, tiles, xsq, d2=plain[1])
    moved = len(labels) if prev is None else int(np.count_nonzero(labels != prev[0]))
    return labels, d2, (sums, counts, moved, len(labels)), xsq


def step_stats(step):
    return step[2]


def step_labels(step):
    return step[0]


def combine_stats(*parts):
    sums = parts[0][0].copy()
    counts = parts[0][1].copy()
    moved, computed = parts[0][2], parts[0][3]
    for s, c, m, n in parts[1:]:
        sums += s
        counts += c
        moved += m
        computed += n
    return sums, counts, moved, computed


def _farthest_order(d2: np.ndarray, m: int) -> np.ndarray:
    """Local indices of the ``m`` largest ``d2``, largest first (ties: lower index first)."""
    m = min(m, len(d2))
    idx = np.argpartition(d2, len(d2) - m)[len(d2) - m :] if m < len(d2) else np.arange(len(d2))
    return idx[np.argsort(-d2[idx], kind="stable")]


def farthest_rows(block, packed: np.ndarray, m: int, start: int, tiles: Tiles):
    """The ``m`` rows of a block farthest from their nearest centroid.

    Returns ``(d2, global_index, labels, rows)`` sorted by decreasing ``d2``; used to re-seed
    empty clusters the way scikit-learn does, when the step kept no distances.
    """
    x = load(block)
    labels, d2 = assign(x, packed, tiles)
    order = _farthest_order(d2, m)
    return d2[order].astype(np.float64), order + start, labels[order], x[order].copy()


def farthest_from_step(block, step, m: int, start: int):
    """:func:`farthest_rows` from the labels and distances a :func:`lloyd_step` kept.

    No distance is computed: the block is read once for the chosen rows (as scikit-learn
    relocates from the distances of the assignment it just made).
    """
    labels, d2 = step[0], step[1]
    order = _farthest_order(d2, m)
    rows = load(block)[order].copy()
    return d2[order].astype(np.float64), order + start, labels[order], rows


def take_rows(block, local_index: np.ndarray) -> np.ndarray:
    return load(block)[local_index].copy()


# --------------------------------------------------------------------------------------------
# Statistics / validation pass
# --------------------------------------------------------------------------------------------


def block_stats(block, seed: int, start: int, tiles: Tiles | None = None):
    """One pass of validation and moments over a block.

    Returns a dict with the number of rows holding NaN/inf, per-feature sum, sum of squares,
    min and max (float64, over finite rows), the sum of ``||x||^2`` and the block's row with the
    largest uniform key (``u`` from :func:`row_uniforms`), which gives a uniformly random row
    over the whole data set independent of chunking.

    Works tile by tile (``tiles.x_tile_bytes`` of rows): only one tile at a time is copied to
    float64, never the block. The running sums are carried as the first row of each tile's
    float64 buffer, so the additions happen in the same order as one ``sum(axis=0)`` over
    the whole float64 block: the result is the same to the last bit.
    """
    x = load(block)
    n, d = x.shape
    tiles = tiles or Tiles()
    step = max(64, tiles.x_tile_bytes // max(1, d * x.itemsize))
    s = np.zeros(d, dtype=np.float64)
    sq = np.zeros(d, dtype=np.float64)
    lo = np.full(d, np.inf)
    hi = np.full(d, -np.inf)
    buf = np.empty((min(step, n) + 1, d), dtype=np.float64)
    n_bad = 0
    best_key, best = -np.inf, 0
    for a in range(0, n, step):
        xt = x[a : a + step]
        finite = np.isfinite(xt).all(axis=1)
        bad = len(xt) - int(np.count_nonzero(finite))
        u = row_uniforms(seed, 0, start + a, len(xt))
        if bad:
            n_bad += bad
            u[~finite] = -1.0
            xt = xt[finite]
        j = int(np.argmax(u))
        if u[j] > best_key:
            best_key, best = float(u[j]), a + j
        m = len(xt)
        if m == 0:
            continue
        t = buf[1 : m + 1]
        t[...] = xt
        buf[0] = s
        s = buf[: m + 1].sum(axis=0)
        np.multiply(t, t, out=t)
        buf[0] = sq
        sq = buf[: m + 1].sum(axis=0)
        np.minimum(lo, xt.min(axis=0), out=lo)
        np.maximum(hi, xt.max(axis=0), out=hi)
    return {
        "n": n,
        "n_bad": n_bad,
        "sum": s,
        "sumsq": sq,
        "min": lo,
        "max": hi,
        "first_key": best_key,
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
