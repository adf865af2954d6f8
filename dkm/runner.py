"""Running a job: data -> features -> one run per k -> metrics -> results store -> report.

Every step that already has a complete output is reused (ingested data, extracted patches,
finished runs of a sweep), so ``--resume`` after a crash redoes only what was lost: the run
that was interrupted restarts from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from dkm.data.catalog import ingest
from dkm.data.store import is_complete, open_dataset
from dkm.evaluate import labels as evaluate
from dkm.features.patches import extract_patches, write_patches
from dkm.jobs import JobSpec, ModelSpec
from dkm.results.store import Checkpoint, ResultsStore, run_name
from dkm.results.sweep import sweep_table
from dkm.runtime import connect

__all__ = ["Features", "prepare_features", "run_job"]

log = logging.getLogger("dkm")


@dataclass
class Features:
    """The matrix to cluster, with what the results need to know about it."""

    X: xr.DataArray
    labels: Any  # dask array of sample labels, or None
    tile_shape: tuple[int, ...]
    store: Path | None
    attrs: dict[str, Any]


def _split_index(ds: xr.Dataset, split: str) -> np.ndarray | None:
    if split == "all":
        return None
    if "split" not in ds:
        raise ValueError(f"features.split is {split!r} but the dataset has no split variable")
    index = np.flatnonzero(ds["split"].values == split)
    if index.size == 0:
        raise ValueError(f"features.split is {split!r} but the dataset has no such samples")
    return index


def _patch_store_path(spec: JobSpec) -> Path:
    if spec.features.store:
        return Path(spec.features.store)
    f = spec.features
    stride = f.stride or f.size
    tag = f"patches-{f.size}x{f.size}-s{stride}-p{f.pad}" + ("-nz" if f.drop_empty else "")
    if f.split != "all":
        tag += f"-{f.split}"
    data = Path(spec.data.store)
    return data.with_name(f"{data.name.removesuffix('.zarr')}-{tag}.zarr")


def prepare_features(spec: JobSpec) -> Features:
    """Ingest the dataset and cut patches if their stores are missing; open the features.

    Must run with a Dask client active: patch extraction runs on the cluster.
    """
    data_store = ingest(
        spec.data.dataset, spec.data.store, source=spec.data.source, **spec.data.options
    )
    ds = open_dataset(data_store)
    if "images" not in ds:  # a feature dataset such as synthetic blobs
        if spec.features.kind == "patches":
            raise ValueError(f"dataset {spec.data.dataset!r} has no images to cut patches from")
        X = ds["features"]
        return Features(X, ds.get("label"), (X.sizes["feature"],), Path(data_store), {})

    index = _split_index(ds, spec.features.split)
    images = ds["images"] if index is None else ds["images"].isel(sample=index)
    image_shape = tuple(images.shape[1:])
    if spec.features.kind == "pixels":
        n = images.sizes["sample"]
        flat = images.data.reshape(n, -1).astype(np.float32) / np.float32(255)
        X = xr.DataArray(flat, dims=("sample", "feature"), name="pixels")
        labels = None
        if "label" in ds:
            labels = (ds["label"] if index is None else ds["label"].isel(sample=index)).data
        attrs = {"kind": "pixels", "image_shape": list(image_shape)}
        return Features(X, labels, image_shape, None, attrs)

    f = spec.features
    path = _patch_store_path(spec)
    if is_complete(path):
        log.info("%s: reusing extracted patches", path)
    else:
        patches = extract_patches(images, f.size, f.stride, f.pad, f.drop_empty)
        write_patches(
            patches,
            path,
            overwrite=path.exists(),
            source_attrs={"source_store": str(Path(data_store).resolve())},
        )
        log.info("%s: wrote %d patches", path, patches.sizes["patch"])
    X = open_dataset(path)["patches"]
    want = {
        "patch_size": f.size,
        "stride": f.stride or f.size,
        "pad": f.pad,
        "drop_empty": int(f.drop_empty),
    }
    have = {key: X.attrs.get(key) for key in want}
    if have != want:
        raise ValueError(
            f"{path}: holds patches {have}, the job asks for {want}; "
            "remove it or set features.store"
        )
    channels = image_shape[2] if len(image_shape) == 3 else 0
    tile = (f.size, f.size, channels) if channels else (f.size, f.size)
    attrs = {"kind": "patches", "image_shape": list(image_shape), **want}
    return Features(X, None, tile, path, attrs)


def _estimator(model: ModelSpec, k: int):
    from dkm.kmeans import KMeans, MiniBatchKMeans

    common = dict(
        n_clusters=k,
        init=model.init,
        max_iter=model.max_iter,
        tol=model.tol,
        random_state=model.random_state,
        n_init=model.n_init,
        dtype=np.dtype(model.dtype),
    )
    if model.algorithm == "lloyd":
        return KMeans(
            **common,
            empty_cluster=model.empty_cluster,
            oversampling_factor=model.oversampling_factor,
            init_max_iter=model.init_max_iter,
        )
    return MiniBatchKMeans(
        **common,
        batch_size=model.batch_size,
        max_no_improvement=model.max_no_improvement,
        reassignment_ratio=model.reassignment_ratio,
    )


def _metrics(spec: JobSpec, est, features: Features) -> dict[str, float]:
    n, d = features.X.shape
    out: dict[str, float] = {}
    wanted = set(spec.evaluate)
    if "reconstruction_error" in wanted:
        out["reconstruction_error"] = evaluate.reconstruction_rmse(est.inertia_, n, d)
    label_metrics = wanted & {"accuracy", "one_to_one_accuracy", "nmi", "homogeneity"}
    if label_metrics:
        if features.labels is None:
            raise ValueError(
                f"{sorted(label_metrics)} need labels; dataset {spec.data.dataset!r} has none"
            )
        table = evaluate.contingency(features.labels, est.labels_, est.n_clusters)
        scores = {
            "accuracy": evaluate.majority_accuracy,
            "nmi": evaluate.nmi,
            "one_to_one_accuracy": evaluate.one_to_one_accuracy,
            "homogeneity": evaluate.homogeneity,
        }
        out.update({m: scores[m](table) for m in sorted(label_metrics)})
    return out


class _Progress:
    """One status line per iteration: redrawn in place on a terminal, silent otherwise."""

    def __init__(self, name: str, total: int, stream=None):
        self.name, self.total = name, total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()

    def __call__(self, iteration: int, inertia: float, shift: float) -> None:
        if self.live:
            self.stream.write(
                f"\r{self.name}: iteration {iteration}/{self.total} "
                f"inertia {inertia:.6g} shift {shift:.3g}   "
            )
            self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")


def _fit_run(spec: JobSpec, k: int, features: Features, results: ResultsStore, resume: bool):
    name = run_name(spec.model.algorithm, k)
    est = _estimator(spec.model, k)
    checkpoint = results.read_checkpoint(name) if resume else None
    if checkpoint is not None:
        log.info("%s: resuming from the checkpoint at iteration %d", name, checkpoint.iteration)
    progress = _Progress(name, spec.model.max_iter)
    every = spec.output.checkpoint_every

    def on_iteration(state: dict[str, Any]) -> None:
        hist = state["history"]
        progress(state["iteration"], hist["inertia"].values[-1], hist["center_shift"].values[-1])
        if state["iteration"] % every == 0:
            results.write_checkpoint(
                name,
                Checkpoint(
                    iteration=state["iteration"],
                    centroids=state["centers"],
                    history=hist,
                    state=state.get("state", {}),
                    arrays=state.get("arrays", {}),
                ),
            )

    resume_from = None
    if checkpoint is not None:
        resume_from = {
            "iteration": checkpoint.iteration,
            "centers": checkpoint.centroids,
            "history": checkpoint.history,
            "state": checkpoint.state,
            "arrays": checkpoint.arrays,
        }
    # A stored feature matrix goes in by path, so the estimator can stream it from Zarr when it
    # does not fit in cluster memory instead of persisting it.
    data = features.X
    if features.store is not None:
        data = str(features.store)
        est.set_params(variable=features.X.name)
    start = time.perf_counter()
    try:
        if spec.model.algorithm == "lloyd":
            est.fit(data, callback=on_iteration, resume_from=resume_from)
        else:  # mini-batch runs are not checkpointed: a resumed job redoes them (same seed)
            est.fit(data)
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    metrics = {"inertia": float(est.inertia_), **_metrics(spec, est, features)}
    attrs = {
        "algorithm": spec.model.algorithm,
        "k": k,
        "inertia": float(est.inertia_),
        "n_iter": int(est.n_iter_),
        "metrics": metrics,
        "seconds": seconds,
        "resumed_from_iteration": checkpoint.iteration if checkpoint else -1,
        "history_attrs": dict(est.history_.attrs),
    }
    labels = est.labels_ if spec.output.labels else None
    results.write_run(name, est.cluster_centers_, est.history_, attrs, labels=labels)
    results.drop_checkpoints(name)
    log.info("%s: %d iterations, inertia %.6g, %.1f s", name, est.n_iter_, est.inertia_, seconds)
    return metrics


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("dkm", "dask", "distributed", "numpy", "scikit-learn", "xarray", "zarr")
    out = {"python": platform.python_version()}
    for pkg in names:
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def run_job(
    spec: JobSpec,
    *,
    scheduler: str | None = None,
    resume: bool = False,
    performance_report: str | os.PathLike | None = None,
) -> Path:
    """Run a validated job and return its results store.

    Parameters
    ----------
    spec : JobSpec
        The job (see :func:`dkm.jobs.load_job`).
    scheduler : str, optional
        Scheduler address; overrides the job's ``cluster.address``. Without either, dkm
        starts a LocalCluster shaped by ``cluster``.
    resume : bool, default False
        Continue an interrupted job in its existing results store: completed runs are kept,
        the interrupted one restarts from its last checkpoint.
    performance_report : path-like, optional
        Write Dask's performance report (HTML) of the whole job here.
    """
    c = spec.cluster
    started = time.perf_counter()
    with connect(
        scheduler or c.address,
        n_workers=c.n_workers,
        threads_per_worker=c.threads_per_worker,
        memory_limit=c.memory_limit or "auto",
    ) as client:
        report_ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if performance_report is not None:
            from distributed import performance_report as dask_report

            report_ctx = dask_report(filename=str(performance_report))
        with report_ctx:
            features = prepare_features(spec)
            info = client.scheduler_info(n_workers=-1)
            workers = info["workers"].values()
            results = ResultsStore(spec.output.store)
            results.create(
                {
                    "job": spec.to_dict(),
                    "features": {**features.attrs, "shape": list(features.X.shape)},
                    "tile_shape": list(features.tile_shape),
                    "versions": _versions(),
                    "cluster": {
                        "scheduler": client.scheduler.address,
                        "n_workers": len(workers),
                        "threads": sum(w["nthreads"] for w in workers),
                    },
                },
                resume=resume,
            )
            done = results.completed_runs()
            metrics: dict[int, dict[str, float]] = {}
            for k in spec.model.k:
                name = run_name(spec.model.algorithm, k)
                if name in done:
                    log.info("%s: already complete, kept", name)
                    metrics[k] = dict(results.read_run(name).attrs["metrics"])
                    continue
                metrics[k] = _fit_run(spec, k, features, results, resume)
            names = sorted({m for v in metrics.values() for m in v})
            table = sweep_table(
                list(metrics), {m: [metrics[k].get(m, np.nan) for k in metrics] for m in names}
            )
            results.write_sweep(table)
            results.finish({"seconds": time.perf_counter() - started})
    if spec.output.report:
        from dkm.report.html import write_report

        page = write_report(spec.output.store)
        log.info("report: %s", page)
    return Path(spec.output.store)
