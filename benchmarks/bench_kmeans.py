"""Benchmark: scikit-learn vs dask-ml vs dkm k-means on Fashion-MNIST pixels and 5x5 patches.

One command runs everything (``python benchmarks/bench_kmeans.py``; ``--quick`` for a small
smoke run) and prints tables; ``--out FILE`` also writes them as Markdown.

Data: Fashion-MNIST train + test (70000 images) from /usr/share/datasets/fashion-mnist,
(a) pixels 70000 x 784 in [0, 1], k=10; (b) 5x5 patches, pad 1, stride 5 (36 per image),
2.52M x 25, k=256. Both are written once to Zarr (64 MiB-ish chunks) under ``--workdir`` so the
dask runs read them like real inputs.

Every Lloyd run starts from the same centroids (scikit-learn ``kmeans_plusplus`` on a 50k-row
sample, seed 0) and runs a fixed number of iterations with ``tol=0``. Seconds per iteration:
scikit-learn and dask-ml = fit time / ``n_iter_``; dkm = median of ``history_.seconds`` (the
fit's extra validation pass and final E-step are reported separately as total fit time).
"GEMM ceiling" = the time of ``X @ C.T`` alone with all cores (numpy/OpenBLAS).

Modes: "threads" = dask's local threaded scheduler (no distributed client); "cluster" = a
2-process LocalCluster (1 thread each) on 127.0.0.1. scikit-learn always runs in this process
with its own 2 OpenMP threads.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import psutil
from common import fmt_table, to_zarr

FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- data


def load_fashion_mnist() -> np.ndarray:
    from dkm.data.readers import read_idx

    parts = [read_idx(FMNIST / f"{s}-images-idx3-ubyte.gz") for s in ("train", "t10k")]
    return np.concatenate(parts)  # (70000, 28, 28) uint8


def patches_of(images: np.ndarray) -> np.ndarray:
    img = np.pad(images, ((0, 0), (1, 1), (1, 1)))  # 30 x 30 -> 6 x 6 patches of 5 x 5
    n = len(img)
    p = img.reshape(n, 6, 5, 6, 5).transpose(0, 1, 3, 2, 4).reshape(n * 36, 25)
    return (p / np.float32(255)).astype(np.float32)


# ----------------------------------------------------------------------------- helpers


class PeakRSS:
    """Peak resident memory of this process and its children while the block runs."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _sample(self):
        rss = self.proc.memory_info().rss
        for c in self.proc.children(recursive=True):
            try:
                rss += c.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, rss)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def inertia_of(X: np.ndarray, C: np.ndarray) -> float:
    """Reference inertia: float32 expanded distances in row blocks, float64 sum."""
    C = np.asarray(C, dtype=np.float32)
    csq = (C * C).sum(1)
    tot = 0.0
    for s in range(0, len(X), 100_000):
        x = X[s : s + 100_000]
        d2 = (x * x).sum(1)[:, None] - 2 * x @ C.T + csq
        tot += float(np.maximum(d2.min(1), 0).astype(np.float64).sum())
    return tot


def gemm_ceiling(X: np.ndarray, C: np.ndarray, reps: int = 3) -> float:
    """Seconds for ``X @ C.T`` alone, the best of two layouts (outputs into reused buffers,
    so neither page faults of a huge output nor writing it to memory count):
    (a) 2-thread OpenBLAS on 8192-row tiles; (b) two Python threads, each a 1-thread BLAS on
    2048-row tiles of half the rows (dkm's layout; for K=25 OpenBLAS threads scale poorly)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    ct = np.ascontiguousarray(C.astype(np.float32).T)

    def tiles(x, rows):
        buf = np.empty((rows, ct.shape[1]), dtype=np.float32)
        for s in range(0, len(x), rows):
            xt = x[s : s + rows]
            np.matmul(xt, ct, out=buf[: len(xt)])

    def layout_a():
        tiles(X, 8192)

    def layout_b():
        half = len(X) // 2
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda x: tiles(x, 2048), [X[:half], X[half:]]))

    best = np.inf
    for fn, limit in ((layout_a, None), (layout_b, 1)):
        with threadpool_limits(limit, user_api="blas"):
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
    return float(best)


def timed(fn, reps=1):
    out, times, peak = None, [], 0.0
    for _ in range(reps):
        gc.collect()
        with PeakRSS() as mem:
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        peak = max(peak, mem.gib)
    return out, float(np.median(times)), peak


# ----------------------------------------------------------------------------- runs


def run_lloyd(name, X, zpath, C0, n_iter, mode, client, reps, with_daskml=True, rows=None):
    from sklearn.cluster import KMeans as SkKMeans

    import dkm

    k = len(C0)
    rows = rows if rows is not None else []
    if mode == "threads":
        sk, t_sk, m_sk = timed(
            lambda: SkKMeans(k, init=C0, n_init=1, max_iter=n_iter, tol=0).fit(X), reps
        )
        rows.append(
            dict(
                data=name,
                tool="scikit-learn lloyd",
                mode="in-process (OpenMP 2)",
                sec_it=t_sk / sk.n_iter_,
                fit=t_sk,
                n_iter=sk.n_iter_,
                inertia=sk.inertia_,
                mem=m_sk,
            )
        )
        t_gemm = gemm_ceiling(X, C0)
        rows.append(
            dict(
                data=name,
                tool="GEMM ceiling (X @ C.T)",
                mode="numpy, 2 threads",
                sec_it=t_gemm,
                fit=np.nan,
                n_iter=1,
                inertia=np.nan,
                mem=np.nan,
            )
        )

    def fit_dkm():
        return dkm.KMeans(k, init=C0, max_iter=n_iter, tol=0).fit(zpath)

    km, t_km, m_km = timed(fit_dkm, reps)
    sec = km.history_["seconds"].values
    rows.append(
        dict(
            data=name,
            tool="dkm KMeans",
            mode=mode,
            sec_it=float(np.median(sec[1:])),
            fit=t_km,
            n_iter=km.n_iter_,
            inertia=km.inertia_,
            mem=m_km,
            blocks=km.history_.attrs["n_blocks"],
        )
    )
    if with_daskml:
        import dask_ml.cluster

        Xd = da.from_zarr(str(zpath / "features"))
        Xd = client.persist(Xd) if client is not None else Xd.persist()

        def fit_dml():
            return dask_ml.cluster.KMeans(k, init=C0, max_iter=n_iter, tol=0).fit(Xd)

        dm, t_dm, m_dm = timed(fit_dml, 1)
        rows.append(
            dict(
                data=name,
                tool="dask-ml KMeans",
                mode=mode,
                sec_it=t_dm / dm.n_iter_,
                fit=t_dm,
                n_iter=dm.n_iter_,
                inertia=inertia_of(X, dm.cluster_centers_),
                mem=m_dm,
            )
        )
        del Xd
    return rows


def run_init(X, zpath, k, mode, client, seed=0, with_sklearn=True, with_daskml=True):
    from sklearn.cluster import kmeans_plusplus

    import dkm

    rows = []
    if with_sklearn:
        (c, _), t, m = timed(lambda: kmeans_plusplus(X, k, random_state=seed))
        rows.append(
            dict(
                tool="scikit-learn kmeans_plusplus",
                mode="in-process",
                sec=t,
                inertia=inertia_of(X, c),
                mem=m,
                passes="k greedy rounds",
            )
        )
    (c, info), t, m = timed(lambda: dkm.kmeans_parallel(zpath, k, random_state=seed))
    rows.append(
        dict(
            tool="dkm k-means|| (l=2k, 5 rounds)",
            mode=mode,
            sec=t,
            inertia=inertia_of(X, c),
            mem=m,
            passes=str(info["passes"]),
        )
    )
    if with_daskml:
        Xd = da.from_zarr(str(zpath / "features"))
        Xd = client.persist(Xd) if client is not None else Xd.persist()
        # dask-ml's oversampling_factor is absolute (candidates per round); 2k and 5 rounds
        # is the same budget as dkm's and much better than its defaults (PEERS.md).
        from dask_ml.cluster.k_means import k_init

        c, t, m = timed(
            lambda: k_init(
                Xd, k, init="k-means||", random_state=seed, oversampling_factor=2 * k, max_iter=5
            )
        )
        rows.append(
            dict(
                tool="dask-ml k-means|| (l=2k, 5 rounds)",
                mode=mode,
                sec=t,
                inertia=inertia_of(X, np.asarray(c)),
                mem=m,
                passes="-",
            )
        )
    return rows


def run_minibatch(X, zpath, k, mode, lloyd_inertia, seed=0, with_sklearn=True):
    from sklearn.cluster import MiniBatchKMeans as SkMB

    import dkm

    rows = []
    kw = dict(batch_size=4096, max_iter=1, max_no_improvement=None, random_state=seed)
    if with_sklearn:
        for ratio in (0.01, 0.0):
            sk, t, m = timed(lambda r=ratio: SkMB(k, n_init=1, reassignment_ratio=r, **kw).fit(X))
            rows.append(
                dict(
                    tool=f"scikit-learn MiniBatchKMeans (ratio {ratio})",
                    mode="in-process",
                    sec=t,
                    samples_s=sk.n_steps_ * 4096 / t,
                    inertia=sk.inertia_,
                    rel=sk.inertia_ / lloyd_inertia,
                    mem=m,
                )
            )
    for ratio in (0.01, 0.0):
        mb, t, m = timed(
            lambda r=ratio: dkm.MiniBatchKMeans(k, reassignment_ratio=r, **kw).fit(zpath)
        )
        rows.append(
            dict(
                tool=f"dkm MiniBatchKMeans (ratio {ratio})",
                mode=mode,
                sec=t,
                samples_s=mb.history_.attrs["samples_per_second"],
                inertia=mb.inertia_,
                rel=mb.inertia_ / lloyd_inertia,
                mem=m,
            )
        )
    return rows


def kernel_profile(X: np.ndarray, C: np.ndarray) -> dict:
    """Single-thread split of one dkm block (250k rows or fewer) into its kernel parts."""
    from threadpoolctl import threadpool_limits

    from dkm._parallel import kernels

    x = np.ascontiguousarray(X[:250_000])
    packed = kernels.pack_centers(C, np.dtype(np.float32))
    k = len(C)
    tiles = kernels.Tiles.from_config()
    step = tiles.rows(k, 4)
    out = {}
    with threadpool_limits(1):
        kernels.lloyd_step(x, packed, None, tiles)  # warm up (numba)

        def t(fn, reps=3):
            best = np.inf
            for _ in range(reps):
                s = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - s)
            return best

        def gemm():
            for s in range(0, len(x), step):
                x[s : s + step] @ packed[:-1]

        def gemm_add():
            for s in range(0, len(x), step):
                d = x[s : s + step] @ packed[:-1]
                d += packed[-1]

        labels, _ = kernels.assign(x, packed, tiles, want_d2=False)
        out["gemm"] = t(gemm)
        out["+norms"] = t(gemm_add) - out["gemm"]
        out["argmin"] = (
            t(lambda: kernels.assign(x, packed, tiles, want_d2=False)) - out["gemm"] - out["+norms"]
        )
        out["sums+counts"] = t(
            lambda: (kernels.cluster_sums(x, labels, k), np.bincount(labels, minlength=k))
        )
        out["whole step"] = t(lambda: kernels.lloyd_step(x, packed, None, tiles))
        out["rows"] = len(x)
    return out


# ----------------------------------------------------------------------------- report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small subset, for a smoke run")
    ap.add_argument("--workdir", default="/tmp/dkm-bench")
    ap.add_argument("--out", default=None, help="also write the tables (Markdown) here")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--modes", default="threads,cluster")
    ap.add_argument("--skip", default="", help="comma list of: pixels,patches,init,minibatch")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("distributed").setLevel(logging.ERROR)
    skip = set(filter(None, args.skip.split(",")))

    from sklearn.cluster import kmeans_plusplus

    load_start = os.getloadavg()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    images = load_fashion_mnist()
    if args.quick:
        images = images[:7000]
    pixels = (images.reshape(len(images), -1) / np.float32(255)).astype(np.float32)
    patches = patches_of(images)
    tag = "quick" if args.quick else "full"
    zpix = to_zarr(pixels, work / f"pixels-{tag}.zarr")
    zpat = to_zarr(patches, work / f"patches-{tag}.zarr")
    rng = np.random.default_rng(0)
    c_pix, _ = kmeans_plusplus(
        pixels[rng.choice(len(pixels), 50_000 if not args.quick else 5000, replace=False)],
        10,
        random_state=0,
    )
    c_pat, _ = kmeans_plusplus(
        patches[rng.choice(len(patches), 50_000, replace=False)], 256, random_state=0
    )
    it_pix, it_pat = (20, 10) if not args.quick else (5, 3)

    lloyd_rows, init_rows, mb_rows, prof = [], [], [], {}
    from distributed import Client, LocalCluster

    for mode in args.modes.split(","):
        cluster = client = None
        if mode == "cluster":
            cluster = LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            client = Client(cluster)
        ctx = dask.config.set(scheduler="threads") if mode == "threads" else dask.config.set({})
        with ctx:
            print(f"== mode {mode}", flush=True)
            if "pixels" not in skip:
                run_lloyd(
                    f"pixels {pixels.shape[0]}x784 k=10",
                    pixels,
                    zpix,
                    c_pix,
                    it_pix,
                    mode,
                    client,
                    args.reps,
                    rows=lloyd_rows,
                )
                print(fmt_table(lloyd_rows[-3:], ["tool", "mode", "sec_it"], ["", "", "s/it"]))
            if "patches" not in skip:
                run_lloyd(
                    f"patches {patches.shape[0]}x25 k=256",
                    patches,
                    zpat,
                    c_pat,
                    it_pat,
                    mode,
                    client,
                    args.reps,
                    rows=lloyd_rows,
                )
                print(fmt_table(lloyd_rows[-3:], ["tool", "mode", "sec_it"], ["", "", "s/it"]))
            if "init" not in skip:
                init_rows += run_init(
                    patches, zpat, 256, mode, client, with_sklearn=(mode == "threads")
                )
                print(fmt_table(init_rows, ["tool", "mode", "sec", "inertia"], ["", "", "s", "I"]))
            if "minibatch" not in skip:
                ref = [
                    r
                    for r in lloyd_rows
                    if r["tool"] == "scikit-learn lloyd" and r["data"].startswith("patches")
                ]
                lref = ref[0]["inertia"] if ref else inertia_of(patches, c_pat)
                mb_rows += run_minibatch(
                    patches, zpat, 256, mode, lref, with_sklearn=(mode == "threads")
                )
                print(fmt_table(mb_rows, ["tool", "mode", "samples_s", "rel"], ["", "", "", ""]))
        if client is not None:
            client.close()
            cluster.close()
    if "patches" not in skip:
        prof["patches k=256"] = kernel_profile(patches, c_pat)
    if "pixels" not in skip:
        prof["pixels k=10"] = kernel_profile(pixels, c_pix)

    # ratios
    for r in lloyd_rows:
        base = [
            b for b in lloyd_rows if b["data"] == r["data"] and b["tool"] == "scikit-learn lloyd"
        ]
        ceil = [b for b in lloyd_rows if b["data"] == r["data"] and b["tool"].startswith("GEMM")]
        r["vs_sk"] = r["sec_it"] / base[0]["sec_it"] if base else np.nan
        r["gemm_frac"] = ceil[0]["sec_it"] / r["sec_it"] if ceil else np.nan
        if base and not np.isnan(r.get("inertia", np.nan)):
            r["inertia_rel"] = r["inertia"] / base[0]["inertia"] - 1
    for r in init_rows:
        base = [b for b in init_rows if b["tool"].startswith("scikit-learn")]
        if base:
            r["vs_kpp"] = r["inertia"] / base[0]["inertia"]
    out = []
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_end = os.getloadavg()
    mem_gib = psutil.virtual_memory().total / 2**30
    out.append(
        f"Machine: {os.cpu_count()} cores, {mem_gib:.0f} GiB; Python {sys.version.split()[0]};"
        f" run {stamp}"
        + (" (QUICK subset)" if args.quick else "")
        + f"; load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} (1 min)"
    )
    out.append("\n### Lloyd, same initial centroids, tol=0, fixed iterations\n")
    out.append(
        fmt_table(
            lloyd_rows,
            [
                "data",
                "tool",
                "mode",
                "sec_it",
                "vs_sk",
                "gemm_frac",
                "n_iter",
                "fit",
                "inertia_rel",
                "mem",
            ],
            [
                "data",
                "tool",
                "mode",
                "s / iteration",
                "x scikit-learn",
                "GEMM ceiling / time",
                "iters",
                "fit s (total)",
                "inertia vs sklearn - 1",
                "peak RSS GiB",
            ],
        )
    )
    if init_rows:
        out.append("\n### Initialisation, patches k=256\n")
        out.append(
            fmt_table(
                init_rows,
                ["tool", "mode", "sec", "inertia", "vs_kpp", "passes", "mem"],
                [
                    "method",
                    "mode",
                    "seconds",
                    "initial inertia",
                    "x k-means++ inertia",
                    "passes",
                    "peak RSS GiB",
                ],
            )
        )
    if mb_rows:
        out.append("\n### Mini-batch, patches k=256, batch 4096, one epoch\n")
        out.append(
            fmt_table(
                mb_rows,
                ["tool", "mode", "sec", "samples_s", "inertia", "rel", "mem"],
                [
                    "tool",
                    "mode",
                    "fit s",
                    "samples / s",
                    "final inertia",
                    "x sklearn Lloyd (10 it)",
                    "peak RSS GiB",
                ],
            )
        )
    if prof:
        out.append("\n### dkm kernel split, one block, one thread (seconds)\n")
        keys = ["rows", "gemm", "+norms", "argmin", "sums+counts", "whole step"]
        out.append(
            fmt_table(
                [dict(data=k, **v) for k, v in prof.items()], ["data", *keys], ["data", *keys]
            )
        )
    text = "\n".join(out)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
