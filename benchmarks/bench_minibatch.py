"""Benchmark: mini-batch k-means samples per second, threads against a 2-process cluster.

The same data, initial centres and batches (``batch_size=4096``, ``reassignment_ratio=0``,
no early stop, ``--epochs`` passes) for scikit-learn's ``MiniBatchKMeans`` in this process,
dkm with the threaded scheduler (the steps in this process), and dkm on a ``LocalCluster``
of two single-threaded worker processes: with the rounds off (every batch row comes to the
client), in rounds merging every step (``dkm.minibatch.sync-rows: 0``, the one-process
loop's updates) and in rounds with the default merges. Samples per second are those of
the mini-batch loop (``history_.attrs``: without the loading, the initialisation and the
final labelling pass); scikit-learn's are its whole ``fit``, whose initialisation is the
given centres. The final inertia (a full pass) is compared with the threaded fit's.
faiss has no mini-batch k-means (it subsamples the data for its Lloyd instead).

    .venv/bin/python benchmarks/bench_minibatch.py [--workloads patches:256+1024,mnist5k:256]
        [--epochs 1] [--reps 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
from bench_faiss import initial_centres, parse_workloads
from common import fmt_table, publish, run_header, to_zarr
from sklearn.cluster import MiniBatchKMeans as SkMiniBatchKMeans

import dkm

BATCH = 4096


def dkm_fit(zpath: Path, C0: np.ndarray, epochs: int, settings: dict) -> tuple[float, float, dict]:
    with dask.config.set(settings):
        est = dkm.MiniBatchKMeans(
            len(C0), init=C0, n_init=1, batch_size=BATCH, max_iter=epochs,
            max_no_improvement=None, reassignment_ratio=0.0, random_state=0,
        ).fit(str(zpath))  # fmt: skip
    return est.history_.attrs["samples_per_second"], est.inertia_, dict(est.history_.attrs)


def sklearn_fit(X: np.ndarray, C0: np.ndarray, epochs: int) -> tuple[float, float, dict]:
    est = SkMiniBatchKMeans(
        len(C0), init=C0, n_init=1, batch_size=BATCH, max_iter=epochs,
        max_no_improvement=None, reassignment_ratio=0.0, random_state=0,
    )  # fmt: skip
    t = time.perf_counter()
    est.fit(X)
    return est.n_steps_ * BATCH / (time.perf_counter() - t), est.inertia_, {}


def best_of(reps: int, fit, *args) -> tuple[float, float, dict]:
    runs = [fit(*args) for _ in range(reps)]
    rate = statistics.median(r[0] for r in runs)
    return rate, runs[-1][1], runs[-1][2]


CLUSTER_MODES = {
    "cluster, rounds off": {"dkm.minibatch.rounds": "off"},
    "cluster, rounds merging every step": {"dkm.minibatch.sync-rows": 0},
    "cluster, rounds (default merges)": {},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="patches:256+1024,mnist5k:256")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dkm-bench-faiss"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    runs = []
    for w, ks in parse_workloads(args.workloads, quick=False):
        w.X = w.X if w.X is not None else w.load(False)
        w.zpath = to_zarr(w.X, work / f"{w.name}.zarr")
        for k in ks:
            runs.append((f"{w.name} {w.X.shape[0]}x{w.X.shape[1]} k={k}", w, k))
    results: dict[tuple[str, str], tuple] = {}
    # scikit-learn and the threaded dkm first: a LocalCluster sets OMP/OpenBLAS threads to 1
    # in this process when it starts.
    for label, w, k in runs:
        C0 = initial_centres(w.X, k, work / f"{w.name}-c{k}.npy")
        results[label, "scikit-learn"] = best_of(args.reps, sklearn_fit, w.X, C0, args.epochs)
        with dask.config.set(scheduler="threads"):
            dkm_fit(w.zpath, C0, 1, {})  # warm: compile the kernels
            results[label, "dkm threads"] = best_of(
                args.reps, dkm_fit, w.zpath, C0, args.epochs, {}
            )
        print(f"  {label}: threads {results[label, 'dkm threads'][0]:.4g}/s", flush=True)
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
            host="127.0.0.1", silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster),
    ):  # fmt: skip
        for label, w, k in runs:
            C0 = initial_centres(w.X, k, work / f"{w.name}-c{k}.npy")
            dkm_fit(w.zpath, C0, 1, {})  # warm the workers
            for mode, settings in CLUSTER_MODES.items():
                results[label, mode] = best_of(
                    args.reps, dkm_fit, w.zpath, C0, args.epochs, settings
                )
                print(f"  {label}: {mode} {results[label, mode][0]:.4g}/s", flush=True)
    rows = []
    for label, _, _ in runs:
        threads_rate, threads_inertia, _ = results[label, "dkm threads"]
        for mode in ["scikit-learn", "dkm threads", *CLUSTER_MODES]:
            rate, inertia, attrs = results[label, mode]
            rows.append(
                dict(
                    run=label,
                    mode=mode,
                    rate=rate,
                    vs_threads=rate / threads_rate,
                    inertia=inertia / threads_inertia - 1,
                    rounds=attrs.get("n_rounds", "-"),
                    sync=attrs.get("sync_every", "-") if attrs.get("n_rounds") else "-",
                )
            )
    table = fmt_table(
        rows,
        ["run", "mode", "rate", "vs_threads", "inertia", "rounds", "sync"],
        [
            "data, k",
            "tool / mode",
            "samples/s",
            "/ dkm threads",
            "final inertia / threads' - 1",
            "rounds",
            "steps per merge",
        ],
    )
    head = run_header(
        f"batch {BATCH}, {args.epochs} epoch(s), median of {args.reps} fits; load average "
        f"{load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    )
    publish(head, table, args.out)

if __name__ == "__main__":
    main()
