"""Benchmark: the patch-dictionary sweep, dkm against scikit-learn, k = 16 ... 16384.

One command runs the whole study (``python benchmarks/bench_dictionary.py``) and prints a
per-k table as it goes; ``--out FILE`` also writes it as Markdown.

Data: the mnist-5k dataset (``dkm ingest mnist-5k``) cut into 5x5 patches, stride 5, pad 1
(36 per image, all 180000 patches, 25 features), written to a patch store under
``--workdir`` once, exactly as a dictionary job does.

For every k = 16, 32, ..., ``--max-k``: dkm's k-means|| initial centres are computed once
(:func:`dkm.kmeans.init.kmeans_parallel`, seed 0; its time is reported as "init") and both
sides then run Lloyd from those same centres for ``--max-iter`` iterations with ``tol=0``:
dkm as the job runner does (``dkm.KMeans`` fitting the Zarr path inside one
``dkm.runtime.connect()`` client, a 2-worker x 1-thread LocalCluster by default), and
``sklearn.cluster.KMeans(init=centres, n_init=1, algorithm="lloyd")`` in this process on
the same patches in memory with its own OpenMP threads (2 by default). The job format takes
``model.init`` as a method name only, so the estimators are run directly.

Printed per k: dkm init seconds and its candidates, Lloyd fit seconds of both, the final
inertia of both (they should agree), and at the end the total-time ratio dkm / scikit-learn.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np
from common import fmt_table


def patch_store(workdir: Path, client) -> Path:
    """The mnist-5k 5x5 patch store (ingested and cut on the first run)."""
    from dkm.data.catalog import ingest
    from dkm.features import PatchLayout, build_features

    data = workdir / "mnist-5k.zarr"
    if not data.exists():
        ingest("mnist-5k", data)
    feats = build_features(data, kind="patches", layout=PatchLayout(5, 5, 1))
    return Path(feats.store)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-k", type=int, default=16384, help="largest k (powers of 2 from 16)")
    ap.add_argument("--max-iter", type=int, default=20, help="Lloyd iterations, tol=0")
    ap.add_argument("--workdir", default="/tmp/dkm-bench-dict")
    ap.add_argument("--out", default=None, help="also write the table (Markdown) here")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per worker")
    args = ap.parse_args(argv)

    import xarray as xr
    from sklearn.cluster import KMeans as SkKMeans

    from dkm import KMeans
    from dkm.kmeans.init import kmeans_parallel
    from dkm.runtime import connect

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ks = [16 * 2**i for i in range(20) if 16 * 2**i <= args.max_k]
    rows = []
    t_start = time.perf_counter()
    with connect(
        n_workers=args.workers, threads_per_worker=args.threads, dashboard_address=None
    ) as client:
        store = patch_store(workdir, client)
        ds = xr.open_zarr(store)
        var = next(v for v in ds.data_vars if ds[v].ndim == 2)
        X = np.ascontiguousarray(ds[var].values, dtype=np.float32)
        print(f"data: {store} {X.shape}, Lloyd {args.max_iter} iterations, tol=0", flush=True)
        for k in ks:
            t0 = time.perf_counter()
            centres, info = kmeans_parallel(str(store), k, random_state=0, client=client)
            t_init = time.perf_counter() - t0

            t0 = time.perf_counter()
            ours = KMeans(
                k, init=centres, n_init=1, max_iter=args.max_iter, tol=0, random_state=0
            ).fit(str(store))
            t_dkm = time.perf_counter() - t0

            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter
                ref = SkKMeans(
                    k,
                    init=centres,
                    n_init=1,
                    max_iter=args.max_iter,
                    tol=0,
                    algorithm="lloyd",
                    random_state=0,
                ).fit(X)
            t_sk = time.perf_counter() - t0
            row = {
                "k": k,
                "init": t_init,
                "cands": info["n_candidates"],
                "recl": float(info.get("recluster_seconds", 0.0)),
                "dkm": t_dkm,
                "sk": t_sk,
                "ratio": t_dkm / t_sk,
                "it": f"{ours.n_iter_}/{ref.n_iter_}",
                "i_dkm": float(ours.inertia_),
                "i_sk": float(ref.inertia_),
            }
            rows.append(row)
            print(fmt_table([row], COLS, HEADS).splitlines()[-1], flush=True)
    tot_dkm = sum(r["dkm"] for r in rows)
    tot_sk = sum(r["sk"] for r in rows)
    tot_init = sum(r["init"] for r in rows)
    text = "\n".join(
        [
            f"### Patch dictionary sweep: mnist-5k 5x5 patches (180000 x 25), k = 16..{ks[-1]}, "
            f"Lloyd {args.max_iter} iterations from the same k-means|| centres "
            f"({args.workers} workers x {args.threads} thread)\n",
            fmt_table(rows, COLS, HEADS),
            "",
            f"Total Lloyd seconds: dkm {tot_dkm:.1f}, scikit-learn {tot_sk:.1f}, "
            f"ratio dkm / scikit-learn = {tot_dkm / tot_sk:.2f}; "
            f"dkm k-means|| init {tot_init:.1f} s in total; "
            f"wall {time.perf_counter() - t_start:.0f} s.",
        ]
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


COLS = ["k", "init", "cands", "recl", "dkm", "sk", "ratio", "it", "i_dkm", "i_sk"]
HEADS = [
    "k",
    "dkm init s",
    "candidates",
    "recluster s",
    "dkm Lloyd s",
    "sklearn Lloyd s",
    "dkm / sklearn",
    "iterations dkm/sk",
    "inertia dkm",
    "inertia sklearn",
]


if __name__ == "__main__":
    logging.getLogger("distributed").setLevel(logging.ERROR)
    main()
