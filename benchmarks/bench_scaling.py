"""Benchmark: dkm's Lloyd iteration on 1 and on 2 worker processes (worker scaling, issue 11).

The same data and the same initial centres on a ``LocalCluster`` of one single-threaded
worker process, then of two; seconds per iteration are the median of ``history_["seconds"]``
over iterations 2..n (``algorithm="lloyd"``, ``tol=0``), the scaling is the ratio. Workloads
as in ``bench_faiss.py``: Fashion-MNIST 5x5 patches (2.52M x 25) and pixels (70k x 784).

    .venv/bin/python benchmarks/bench_scaling.py [--workloads patches:256+1024,pixels]
        [--iters 10] [--reps 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_faiss import initial_centres, parse_workloads
from common import fmt_table, publish, run_header, to_zarr

import dkm


def per_iteration(zpath: Path, C0: np.ndarray, n: int) -> tuple[float, float]:
    est = dkm.KMeans(len(C0), init=C0, n_init=1, max_iter=n, tol=0, algorithm="lloyd")
    t = time.perf_counter()
    est.fit(str(zpath))
    wall = time.perf_counter() - t
    return float(np.median(est.history_["seconds"].values[1:])), wall


def on_workers(n_workers: int, runs: list, n: int, reps: int) -> dict:
    from distributed import Client, LocalCluster

    out = {}
    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster),
    ):
        for label, zpath, C0 in runs:
            per_iteration(zpath, C0, 2)  # warm: compile, load the blocks' cache
            times = [per_iteration(zpath, C0, n) for _ in range(reps)]
            out[label] = (statistics.median(t[0] for t in times), min(t[1] for t in times))
            print(f"  {n_workers} worker(s) {label}: {out[label][0]:.4g} s/it", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="patches:256+1024,pixels")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dkm-bench-faiss"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for w, ks in parse_workloads(args.workloads, quick=False):
        w.X = w.X if w.X is not None else w.load(False)
        w.zpath = to_zarr(w.X, work / f"{w.name}.zarr")
        for k in ks:
            C0 = initial_centres(w.X, k, work / f"{w.name}-c{k}.npy")
            runs.append((f"{w.label} k={k}", w.zpath, C0))
    one = on_workers(1, runs, args.iters, args.reps)
    two = on_workers(2, runs, args.iters, args.reps)
    rows = [
        dict(
            run=label,
            one=one[label][0],
            two=two[label][0],
            scaling=one[label][0] / two[label][0],
            wall1=one[label][1],
            wall2=two[label][1],
        )
        for label, _, _ in runs
    ]
    table = fmt_table(
        rows,
        ["run", "one", "two", "scaling", "wall1", "wall2"],
        [
            "data, k",
            "1 worker s/it",
            "2 workers s/it",
            "1 -> 2 scaling",
            "1 worker fit s",
            "2 workers fit s",
        ],
    )
    head = run_header(
        f"load average {os.getloadavg()[0]:.2f} at the end; {args.iters} iterations, "
        f"median of {args.reps} fits"
    )
    publish(head, table, args.out)

if __name__ == "__main__":
    main()
