"""Streaming k-means from Zarr on small workers, against the same fit with data in memory.

Writes a synthetic float32 matrix (uniform, so Lloyd keeps moving points for every
iteration) chunk by chunk with dask into a Zarr store, then fits ``KMeans`` with the same
initial centres, ``tol=0`` and a fixed number of iterations:

- **streamed, small**: 2 single-threaded workers with a small memory limit (default 300 MB
  each: the store is several times the whole cluster's memory), data streamed from Zarr
  every iteration (chosen automatically), blocks sized from the memory limit;
- **streamed, roomy**: the same on workers with a large limit (64 MiB blocks);
- **in memory, roomy**: the data persisted on the workers once.

Prints, per run: blocks, seconds per iteration (median of iterations 2..n), cost per row and
iteration (ns), total fit time, each worker's peak RSS (VmHWM, read with ``Client.run``),
and how many times a nanny restarted a worker for memory.

    python benchmarks/bench_streaming.py [--rows 8000000] [--features 64] [--k 16]
        [--iters 5] [--small 300MB] [--roomy 6GB] [--out DIR]

Heavy imports stay inside ``main``: worker processes are spawned and import this script's
top level again, which on a 300 MB worker must stay small.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path


def _uniform_rows(block_info=None, seed=0):
    import numpy as np

    (r0, r1), (_, d) = block_info[None]["array-location"]
    return np.random.default_rng([seed, r0]).random((r1 - r0, d), dtype=np.float32)


def write_store(path: Path, rows: int, features: int, chunk_rows: int) -> float:
    import dask
    import dask.array as da
    import numpy as np
    import xarray as xr

    chunks = (tuple(min(chunk_rows, rows - a) for a in range(0, rows, chunk_rows)), (features,))
    x = da.map_blocks(_uniform_rows, dtype=np.float32, chunks=chunks)
    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        xr.Dataset({"x": (("sample", "feature"), x)}).to_zarr(path, consolidated=False)
    return time.perf_counter() - t0


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run(store: str, limit: str, persist, C0, iters: int, label: str) -> dict:
    import numpy as np
    from distributed import Client, LocalCluster

    from dkm.kmeans.estimators import KMeans

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit=limit,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        before = set(client.scheduler_info()["workers"])
        t0 = time.perf_counter()
        km = KMeans(len(C0), init=C0, max_iter=iters, tol=0, persist=persist).fit(store)
        fit_s = time.perf_counter() - t0
        peaks = sorted(client.run(_vm_hwm).values())
        restarts = len(client.get_events("worker-restart-memory"))
        replaced = len(before - set(client.scheduler_info()["workers"]))
    h = km.history_
    per_it = float(np.median(h["seconds"].values[1:])) if km.n_iter_ > 1 else float("nan")
    n = int(km.labels_.shape[0])
    return {
        "run": label,
        "limit": limit,
        "streamed": int(h.attrs["streamed"]),
        "blocks": int(h.attrs["n_blocks"]),
        "iters": int(km.n_iter_),
        "s_per_iter": per_it,
        "ns_per_row_iter": per_it / n * 1e9,
        "fit_s": fit_s,
        "peak_mib": [p / 2**20 for p in peaks],
        "restarts": restarts + replaced,
        "inertia": float(km.inertia_),
        "centers": km.cluster_centers_,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8_000_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--chunk-rows", type=int, default=16_384, help="Zarr chunk rows")
    parser.add_argument("--small", default="300MB", help="memory limit of the small workers")
    parser.add_argument("--roomy", default="6GB", help="memory limit of the roomy workers")
    parser.add_argument("--out", type=Path, default=None, help="work dir (default: temp dir)")
    args = parser.parse_args()

    import numpy as np
    import zarr

    work = args.out or Path(tempfile.mkdtemp(prefix="dkm-bench-streaming-"))
    store = work / "uniform.zarr"
    shutil.rmtree(store, ignore_errors=True)
    gib = args.rows * args.features * 4 / 2**30
    print(
        f"data: {args.rows} x {args.features} float32 = {gib:.2f} GiB, k={args.k}, "
        f"{args.iters} iterations, Zarr chunks of {args.chunk_rows} rows"
    )
    write_s = write_store(store, args.rows, args.features, args.chunk_rows)
    print(f"store written in {write_s:.1f} s (dask threads, chunk by chunk)")
    head = np.asarray(zarr.open_group(store, mode="r")["x"][:100_000])
    C0 = head[np.random.default_rng(0).choice(len(head), args.k, replace=False)]

    runs = [
        run(str(store), args.small, "auto", C0, args.iters, "streamed, small workers"),
        run(str(store), args.roomy, False, C0, args.iters, "streamed, roomy workers"),
        run(str(store), args.roomy, True, C0, args.iters, "in memory, roomy workers"),
    ]
    print()
    print(
        "| run | memory limit | streamed | blocks | s / iteration | ns / row / iteration "
        "| fit s (total) | peak RSS per worker MiB | worker restarts |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        peaks = " / ".join(f"{p:.0f}" for p in r["peak_mib"])
        print(
            f"| {r['run']} | {r['limit']} | {r['streamed']} | {r['blocks']} "
            f"| {r['s_per_iter']:.3f} | {r['ns_per_row_iter']:.1f} | {r['fit_s']:.1f} "
            f"| {peaks} | {r['restarts']} |"
        )
    ref = runs[-1]
    for r in runs[:-1]:
        diff = float(np.abs(r["centers"] - ref["centers"]).max())
        print(
            f"{r['run']}: max |centre - in-memory centre| = {diff:.3g}, "
            f"inertia / in-memory - 1 = {r['inertia'] / ref['inertia'] - 1:.3g}"
        )
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
