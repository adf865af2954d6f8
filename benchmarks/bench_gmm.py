"""Benchmark: dkm.GaussianMixture against scikit-learn, seconds per EM iteration.

One command runs everything (``python benchmarks/bench_gmm.py``; ``--quick`` for a small
smoke run) and prints tables; ``--out FILE`` also writes them as Markdown.

Data: Fashion-MNIST train + test (70000 images) through dkm's catalog (the Debian files in
/usr/share/datasets/fashion-mnist), pixels scaled to [0, 1], reduced to 50 principal
components by scikit-learn's ``PCA`` fitted once (its time is printed but is in no other
number: the benchmark times the mixture, not the PCA). The components are rounded to float32
once; dkm reads them from a Zarr store under ``--workdir`` (4 chunks) like a real input and
holds them as float32 (its default; its E-step works in float64 tile by tile), scikit-learn
gets the same values as an in-memory float64 array (its native dtype).

Model: k=10, ``covariance_type="full"``, ``reg_covar=1e-6``, ``tol=0`` (every iteration runs;
ConvergenceWarning suppressed). Both start from the same parameters, given to each as
``weights_init`` / ``means_init`` / ``precisions_init``: those scikit-learn's
``init_params="kmeans"`` would compute from one scikit-learn ``KMeans`` run (seed 0), so
iteration counts and lower bounds can be compared.

Seconds per iteration = the marginal cost ``(fit(max_iter=n) - fit(max_iter=1)) / (n - 1)``:
validation, loading, centering, the given-parameter setup and scikit-learn's final E-step
cancel out. Tools: scikit-learn in this process with its 2 BLAS threads, and again with
BLAS limited to 1 thread (threadpoolctl; on these small GEMMs one thread can be faster);
dkm "threads" = dask's local threaded scheduler (no distributed client; 2 pool threads x
1 BLAS thread); dkm "cluster" = a 2-process LocalCluster (1 thread each) on 127.0.0.1. The
cluster is started once, after every import, and stays up for the whole run; repeats are
interleaved (each round times every tool) and the tables show medians over rounds.

Last (``--no-profile`` skips it), where an iteration goes: one block's E-step kernel with one
thread, in this process and on a cluster worker (same rows, same parameters), split into its
parts, next to scikit-learn's ``_e_step`` and ``_m_step`` on the same rows.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

# Everything that loads a BLAS or OpenMP runtime is imported before the LocalCluster
# starts: starting one sets OMP_NUM_THREADS=1 in this process for whatever loads later.
import dask
import numpy as np
import psutil
import sklearn
from common import fmt_table, to_zarr
from sklearn.cluster import KMeans as SkKMeans
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGMM
from threadpoolctl import threadpool_info, threadpool_limits

import dkm
from dkm.data.catalog import load

REG_COVAR = 1e-6
# scikit-learn with its BLAS limited to one thread: on this data its small GEMMs
# ((n, 50) x (50, 50) per component) can run slower on 2 OpenBLAS threads than on one,
# most of all when another process holds a core.
SK_1THREAD = "scikit-learn 1 BLAS thread"


# ----------------------------------------------------------------------------- data


def pca_features(n_rows: int | None, n_pca: int) -> tuple[np.ndarray, float]:
    """Fashion-MNIST pixels in [0, 1] reduced to ``n_pca`` components (float32), and the
    PCA's seconds."""
    images = load("fashion-mnist")["images"].values
    if n_rows is not None:
        images = images[:n_rows]
    X = (images.reshape(len(images), -1) / np.float32(255)).astype(np.float32)
    t = time.perf_counter()
    Z = PCA(n_components=n_pca, random_state=0).fit_transform(X)
    return np.ascontiguousarray(Z, dtype=np.float32), time.perf_counter() - t


def kmeans_start(X: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The parameters scikit-learn's ``init_params="kmeans"`` starts from: hard
    responsibilities of one KMeans run through the M-step (weights over n, ``reg_covar``
    on the diagonal), precisions from the covariances' Cholesky factors."""
    labels = SkKMeans(k, n_init=1, random_state=0).fit(X).labels_
    n, d = X.shape
    weights = np.bincount(labels, minlength=k) / n
    means = np.empty((k, d))
    precisions = np.empty((k, d, d))
    for j in range(k):
        rows = X[labels == j]
        means[j] = rows.mean(axis=0)
        diff = rows - means[j]
        cov = diff.T @ diff / len(rows) + REG_COVAR * np.eye(d)
        inv_chol = np.linalg.inv(np.linalg.cholesky(cov))  # L^-1, precision = L^-T L^-1
        precisions[j] = inv_chol.T @ inv_chol
        precisions[j] = (precisions[j] + precisions[j].T) / 2
    return {"weights_init": weights, "means_init": means, "precisions_init": precisions}


# ----------------------------------------------------------------------------- fits


def fit_sklearn(X64: np.ndarray, k: int, start: dict, max_iter: int):
    return SkGMM(
        k, covariance_type="full", tol=0, reg_covar=REG_COVAR, max_iter=max_iter, **start
    ).fit(X64)


def fit_dkm(store: Path, k: int, start: dict, max_iter: int):
    return dkm.GaussianMixture(
        k, covariance_type="full", tol=0, reg_covar=REG_COVAR, max_iter=max_iter, **start
    ).fit(str(store))


def timed_fit(tool: str, n: int, ctx: dict):
    """One fit of ``tool`` with ``max_iter=n``: (model, seconds)."""
    k, start = ctx["k"], ctx["start"]
    t = time.perf_counter()
    if tool == "scikit-learn":
        model = fit_sklearn(ctx["X64"], k, start, n)
    elif tool == SK_1THREAD:
        with threadpool_limits(1):
            model = fit_sklearn(ctx["X64"], k, start, n)
    elif tool == "dkm threads":
        with dask.config.set(scheduler="threads"):
            model = fit_dkm(ctx["store"], k, start, n)
    else:  # the default client: the LocalCluster
        model = fit_dkm(ctx["store"], k, start, n)
    return model, time.perf_counter() - t


# ----------------------------------------------------------------------------- one block


def estep_seconds(x, log_w, means, prec_chol, reps: int = 3) -> dict[str, float]:
    """Best-of-``reps`` seconds of dkm's E-step kernel on one block with one BLAS thread,
    and its parts tile by tile (log densities, log-sum-exp, statistics). Runs in this
    process or, submitted, on a worker: it imports what it needs itself."""
    import time

    import numpy as np
    from threadpoolctl import threadpool_limits

    from dkm._parallel.kernels import Tiles
    from dkm.mixture import _kernels

    tiles = Tiles.from_config()
    n, d = x.shape
    step = _kernels._tile_rows(n, d, len(means), tiles)

    def parts():
        # estep's loop, timed piece by piece (the same buffers, reused tile by tile).
        model = _kernels._model(log_w, means, prec_chol, "full")
        work = _kernels._Work(min(step, n), d, len(means))
        acc = _kernels._empty_stats(len(means), d, "full")
        out = dict.fromkeys(("log densities", "log-sum-exp", "statistics"), 0.0)
        for a in range(0, n, step):
            t0 = time.perf_counter()
            xt = work.load(x[a : a + step])
            lp = work.weighted_log_prob(xt, model)
            t1 = time.perf_counter()
            work.log_resp(lp)
            resp = np.exp(lp, out=lp)
            t2 = time.perf_counter()
            acc = work.add_stats(acc, xt, resp, "full")
            t3 = time.perf_counter()
            for key, dt in zip(out, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                out[key] += dt
        return out

    best = {}
    with threadpool_limits(1):
        for _ in range(reps):
            t = time.perf_counter()
            _kernels.estep(x, log_w, means, prec_chol, "full", tiles)
            whole = time.perf_counter() - t
            split = parts()
            for key, v in {"E-step kernel": whole, **split}.items():
                best[key] = min(best.get(key, np.inf), v)
    best["malloc trim"] = _start_env("MALLOC_TRIM_THRESHOLD_")
    return best


def _start_env(name: str) -> str:
    """``name`` in this process's environment as it started (what glibc's malloc read: the
    worker launcher sets MALLOC_TRIM_THRESHOLD_, which made per-tile temporaries costly, and
    starting a LocalCluster also sets it in this process's ``os.environ``, too late for
    malloc). Linux only; "?" elsewhere."""
    try:
        with open("/proc/self/environ", "rb") as f:
            env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
    except OSError:
        return "?"
    return env.get(name.encode(), b"unset").decode()


def block_profile(Z: np.ndarray, fitted, sk_model, client, rows: int) -> list[dict]:
    """One block of ``rows`` rows, one thread: dkm's E-step kernel in this process and on a
    cluster worker (same data, same parameters), and scikit-learn's E- and M-step."""
    import copy

    shift = Z.mean(axis=0, dtype=np.float64)
    x = np.ascontiguousarray(Z[:rows] - shift.astype(np.float32))  # as dkm centers blocks
    args = (np.log(fitted.weights_), fitted.means_ - shift, fitted.precisions_cholesky_)
    out = [{"where": "dkm, this process", **estep_seconds(x, *args)}]
    if client is not None:
        xf = client.scatter(x)
        res = client.submit(estep_seconds, xf, *args, pure=False).result()
        out.append({"where": "dkm, a cluster worker", **res})
    if sk_model is not None:
        g = copy.deepcopy(sk_model)
        X64 = Z[:rows].astype(np.float64)
        best_e = best_m = np.inf
        with threadpool_limits(1):
            for _ in range(3):
                t = time.perf_counter()
                _, log_resp = g._e_step(X64)  # private, but it is the E-step itself
                t1 = time.perf_counter()
                g._m_step(X64, log_resp)
                best_m = min(best_m, time.perf_counter() - t1)
                best_e = min(best_e, t1 - t)
        out.append({"where": "scikit-learn _e_step + _m_step", "E-step kernel": best_e + best_m})
        out[-1].update({"sk_e": best_e, "sk_m": best_m})
    return out


# ----------------------------------------------------------------------------- report


def blas_facts() -> str:
    """numpy's BLAS and every thread pool threadpoolctl sees in this process (read after
    the cluster started: they must still have all cores)."""
    cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    pools = [
        f"{p['internal_api']} {p.get('version') or ''} ({p['prefix']}, {p['num_threads']} threads)"
        for p in threadpool_info()
    ]
    return f"numpy BLAS: {cfg['name']} {cfg.get('version', '')}; thread pools: " + "; ".join(pools)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="7000 images, 3 iterations, 1 round")
    ap.add_argument("--iters", type=int, default=None, help="n of the max_iter=n fit (20)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved repeats (3)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--pca", type=int, default=50, help="principal components")
    ap.add_argument(
        "--tools", default=f"scikit-learn,{SK_1THREAD},dkm threads,dkm cluster", help="comma list"
    )
    ap.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time one block's E-step in this process, on a worker, and scikit-learn's",
    )
    ap.add_argument("--workdir", default="/tmp/dkm-bench-gmm")
    ap.add_argument("--out", default=None, help="also write the tables (Markdown) here")
    args = ap.parse_args(argv)
    n_iter = args.iters or (3 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 3)
    if n_iter < 2:
        ap.error("--iters must be at least 2 (the marginal cost subtracts a max_iter=1 fit)")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    warnings.simplefilter("ignore", ConvergenceWarning)
    logging.getLogger("distributed").setLevel(logging.ERROR)

    load_start = os.getloadavg()
    t_start = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    Z, t_pca = pca_features(7000 if args.quick else None, args.pca)
    n, d = Z.shape
    store = to_zarr(Z, work / f"fmnist-pca{d}-{n}.zarr")
    X64 = Z.astype(np.float64)
    t = time.perf_counter()
    start = kmeans_start(X64, args.k)
    t_init = time.perf_counter() - t
    ctx = {"k": args.k, "start": start, "X64": X64, "store": store}
    print(
        f"data: Fashion-MNIST {n} x {d} (PCA {t_pca:.1f} s), k={args.k} full, "
        f"start from scikit-learn KMeans ({t_init:.1f} s); fits max_iter=1 and {n_iter}, "
        f"{rounds} round(s)",
        flush=True,
    )

    cluster = client = None
    if "dkm cluster" in tools:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
    try:
        # Untimed warm-up: imports on the workers, first-call costs in this process.
        for tool in tools:
            timed_fit(tool, 2, ctx)
        runs = {tool: [] for tool in tools}
        models = {}
        for r in range(rounds):
            for tool in tools:
                m1, t1 = timed_fit(tool, 1, ctx)
                mn, tn = timed_fit(tool, n_iter, ctx)
                runs[tool].append((t1, tn))
                models[tool] = (m1, mn)
                print(
                    f"round {r + 1} {tool}: max_iter=1 {t1:.3f} s, max_iter={n_iter} "
                    f"{tn:.3f} s, marginal {(tn - t1) / (n_iter - 1):.4f} s/it",
                    flush=True,
                )
        blas = blas_facts()
        prof, block_rows = [], 0
        if args.profile:
            dkm_fit = next((models[t][1] for t in tools if t.startswith("dkm")), None)
            sk_fit = models.get("scikit-learn", models.get(SK_1THREAD, (None, None)))[1]
            if dkm_fit is not None:
                block_rows = -(-n // int(dkm_fit.history_.attrs["n_blocks"]))
                prof = block_profile(Z, dkm_fit, sk_fit, client, block_rows)
    finally:
        if client is not None:
            client.close()
            cluster.close()

    rows = []
    for tool in tools:
        t1s, tns = (np.array(v) for v in zip(*runs[tool], strict=True))
        m1, mn = models[tool]
        row = {
            "tool": tool,
            "t1": float(np.median(t1s)),
            "tn": float(np.median(tns)),
            "marg": float(np.median((tns - t1s) / (n_iter - 1))),
            "spread": f"{np.min((tns - t1s) / (n_iter - 1)):.4f}-"
            f"{np.max((tns - t1s) / (n_iter - 1)):.4f}",
            "n_iter": int(mn.n_iter_),
            "lb": float(mn.lower_bound_),
            "lb1": float(m1.lower_bound_),
        }
        if tool.startswith("dkm"):
            # dkm's own per-iteration record (its EM loop), iterations 2..n of the last fit.
            row["hist"] = float(np.median(mn.history_["seconds"].values[1:]))
            row["blocks"] = int(mn.history_.attrs["n_blocks"])
        rows.append(row)
    base = next((r for r in rows if r["tool"] == "scikit-learn"), None)
    base1 = next((r for r in rows if r["tool"] == SK_1THREAD), None)
    for r in rows:
        r["ratio"] = r["marg"] / base["marg"] if base else np.nan
        r["ratio1"] = r["marg"] / base1["marg"] if base1 else np.nan
        r["dlb"] = r["lb"] - base["lb"] if base else np.nan
        r["dlb1"] = r["lb1"] - base["lb1"] if base else np.nan
        if base and r is not base:
            m, b = models[r["tool"]][1], models["scikit-learn"][1]
            r["dmean"] = float(np.abs(m.means_ - b.means_).max())

    load_end = os.getloadavg()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    mem_gib = psutil.virtual_memory().total / 2**30
    out = [
        f"Machine: {os.cpu_count()} cores, {mem_gib:.0f} GiB; Python {sys.version.split()[0]}, "
        f"numpy {np.__version__}, scikit-learn {sklearn.__version__}, dask {dask.__version__}; "
        f"run {stamp}" + (" (QUICK subset)" if args.quick else ""),
        f"{blas}",
        f"Load average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f}; "
        f"wall {time.perf_counter() - t_start:.0f} s.",
        f"\n### Gaussian mixture, Fashion-MNIST {n} x {d} PCA, k={args.k} full, same start, "
        f"tol=0: marginal seconds per EM iteration, median of {rounds} interleaved round(s)\n",
        fmt_table(
            rows,
            ["tool", "marg", "ratio", "ratio1", "spread", "hist", "t1", "tn", "n_iter", "blocks"],
            [
                "tool",
                "s / iteration (marginal)",
                "x scikit-learn",
                "x sklearn 1 thread",
                "range over rounds",
                "dkm history s/it",
                "fit s, max_iter=1",
                f"fit s, max_iter={n_iter}",
                "n_iter",
                "blocks",
            ],
        ),
        "\n### Same iterates? Final lower bounds (mean log-likelihood)\n",
        fmt_table(
            rows,
            ["tool", "n_iter", "lb", "dlb", "dlb1", "dmean"],
            [
                "tool",
                "n_iter",
                f"lower bound after {n_iter}",
                "- scikit-learn's",
                "same after 1 iteration",
                "max abs(means - scikit-learn's)",
            ],
        ),
    ]
    if prof:
        out += [
            f"\n### Where an iteration goes: one block ({block_rows} rows), "
            "one thread, best of 3 (seconds)\n",
            fmt_table(
                prof,
                [
                    "where",
                    "E-step kernel",
                    "log densities",
                    "log-sum-exp",
                    "statistics",
                    "sk_e",
                    "sk_m",
                    "malloc trim",
                ],
                [
                    "",
                    "E-step + statistics",
                    "log densities",
                    "log-sum-exp",
                    "statistics",
                    "sklearn E-step",
                    "sklearn M-step",
                    "MALLOC_TRIM_THRESHOLD_",
                ],
            ),
        ]
    text = "\n".join(out)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
