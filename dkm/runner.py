"""Running a job: plan -> connect -> data -> features -> one run per k -> metrics -> results.

A run's identity is what determines its result: the features (the dataset store and patch
store it reads, the layout, the split), the algorithm and all its parameters, and k. Running a
job again reuses every complete run whose identity is unchanged (adding only metrics or
labels the job now asks for), recomputes runs whose inputs changed, retries failed ones, and
continues interrupted ones from their last checkpoint. A run that fails is recorded with its
error and the others still run. Everything that can be checked without a cluster is checked
first by :func:`plan_job`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
from sklearn.exceptions import ConvergenceWarning

from dkm import config, evaluate
from dkm._parallel.backend import describe_worker_loss
from dkm._parallel.base import FitState
from dkm.data import catalog
from dkm.data.integrity import verify_once
from dkm.data.locks import StoreLocked, StoreUnwritable, store_lock
from dkm.data.store import StoreError, probe
from dkm.features import Features, build_features, features_identity
from dkm.jobs import JobSpec, JobSpecError, ModelSpec, check_against_data
from dkm.results import ResultsStore, load_model, run_name, sweep_table
from dkm.results.attrs import COMPLETE, FAILED, INTERRUPTED
from dkm.runtime import (
    SchedulerLost,
    SchedulerUnreachable,
    check_interrupted,
    check_scheduler,
    connect,
)

__all__ = ["JobOutcome", "Plan", "PlannedRun", "plan_job", "run_id", "run_job"]

log = logging.getLogger("dkm")


# ----------------------------------------------------------------------------- identity


def run_identity(model: ModelSpec, k: int, features: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines a run's result (and nothing that does not).

    ``model`` is one algorithm of the job (:meth:`ModelSpec.each`).
    """
    return {
        "features": features,
        "algorithm": model.algorithm,
        "k": int(k),
        # A parameter left at None means "the estimator's own behaviour": leaving it out keeps
        # finished runs valid when a release adds a parameter with a None default.
        "params": {key: v for key, v in model.resolved().items() if v is not None},
    }


def run_id(identity: dict[str, Any]) -> str:
    """A short digest of a run identity."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the plan


@dataclass
class PlannedRun:
    """What the job will do for one k: ``reuse``, ``compute``, ``resume``, ``recompute`` or
    ``retry``, with a few words why."""

    name: str
    k: int
    action: str
    detail: str = ""


@dataclass
class Plan:
    """What :func:`run_job` will do, decided without a cluster (``dkm run --dry-run``)."""

    spec: JobSpec
    data_shape: catalog.DataShape | None
    data_ready: bool
    runs: list[PlannedRun] = field(default_factory=list)


def _data_problems(spec: JobSpec, shape: catalog.DataShape | None, where: str) -> None:
    if shape is None:
        return
    found = check_against_data(spec, shape, where)
    if found:
        raise JobSpecError(found, where)


def _check_data_store(spec: JobSpec) -> tuple[catalog.DataShape | None, bool]:
    """The data's shape (from the store or the catalog) and whether the store is ready."""
    store = Path(spec.data.store)
    try:
        ready = catalog.check_store(spec.data.dataset, store, spec.data.options)
    except StoreError as err:
        raise JobSpecError(
            [("data.store", f"{err}; set data.store to another path")], "job"
        ) from None
    if ready:
        return catalog.store_shape(store), True
    return catalog.known_shape(spec.data.dataset, spec.data.options), False


def plan_job(spec: JobSpec, *, fresh: bool = False, resume: bool = False) -> Plan:
    """Check the job against its data and its results store, and say what each run will do.

    Nothing is computed and no cluster is started.

    Raises
    ------
    JobSpecError
        A problem only the data or the stores reveal, named by the job key that fixes it.
    """
    results = ResultsStore(spec.output.store)
    try:
        results.check()
    except StoreError as err:
        raise JobSpecError([("output.store", f"{err}; choose another path")], "job") from None
    if resume and not results.exists():
        raise JobSpecError(
            [
                (
                    "output.store",
                    f"nothing to resume: {results.path} does not exist; run the job without "
                    "--resume to start it",
                )
            ],
            "job",
        )
    shape, ready = _check_data_store(spec)
    _data_problems(spec, shape, spec.data.store)
    plan = Plan(spec, shape, ready)
    identity = None
    if ready:
        f = spec.features
        identity = features_identity(
            spec.data.store,
            kind=f.kind,
            layout=f.layout,
            split=f.split,
            store=f.store,
            learner=f.learner,
        )
    for model in spec.model.each():
        for k in spec.model.k:
            plan.runs.append(_plan_run(model, k, identity, results, fresh))
    return plan


def _plan_run(
    model: ModelSpec, k: int, features: dict | None, results: ResultsStore, fresh: bool
) -> PlannedRun:
    name = run_name(model.algorithm, k)
    info = None if fresh or not results.exists() else results.run_info(name)
    wanted = None if features is None else run_id(run_identity(model, k, features))
    if info is None:
        checkpoint = None
        if wanted is not None and results.exists() and not fresh:
            checkpoint = results.read_checkpoint(name, wanted)
        if checkpoint is not None:
            return PlannedRun(name, k, "resume", f"from iteration {checkpoint.iteration}")
        return PlannedRun(name, k, "compute")
    if info.status == COMPLETE and wanted is not None and info.run_id == wanted:
        problem = results.verify_run(name)
        if problem is None:
            return PlannedRun(name, k, "reuse")
        return PlannedRun(name, k, "recompute", f"damaged: {problem}")
    if info.status == COMPLETE:
        why = (
            "its features are not cut yet" if wanted is None else "its inputs or parameters changed"
        )
        return PlannedRun(name, k, "recompute", why)
    if info.status == FAILED:
        return PlannedRun(name, k, "retry", f"failed: {info.attrs.get('error', '')}")
    return PlannedRun(name, k, "compute", info.status)


# ----------------------------------------------------------------------------- running


@dataclass
class RunOutcome:
    name: str
    algorithm: str
    k: int
    status: str  # "reused", "computed", "failed"
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


@dataclass
class JobOutcome:
    """How a job ended: its results store, status and what happened to each run."""

    store: Path
    status: str
    runs: list[RunOutcome]

    @property
    def failed(self) -> list[RunOutcome]:
        return [r for r in self.runs if r.status == "failed"]


class _Progress:
    """One status line per iteration: redrawn in place on a terminal, silent otherwise."""

    def __init__(self, name: str, total: int, stream=None):
        self.name, self.total = name, total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()

    def __call__(self, state: FitState) -> None:
        if self.live and state.iteration > 0:
            hist = state.history
            shown = " ".join(
                f"{name.replace('center_', '')} {float(hist[name][-1]):.6g}"
                for name in ("inertia", "center_shift", "lower_bound")
                if len(hist.get(name, ())) > 0
            )
            self.stream.write(
                f"\r{self.name}: start {state.start + 1} iteration {state.iteration}/{self.total} "
                f"{shown}   "
            )
            self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")


def _error_text(err: BaseException, client=None) -> str:
    from distributed import KilledWorker

    if isinstance(err, KilledWorker):  # workers died running it: most often memory
        return describe_worker_loss(err, client)
    if isinstance(err, ValueError | StoreError | OSError | MemoryError):
        return str(err)
    return f"{type(err).__name__}: {err}"


def _predicted(est, features: Features):
    labels = getattr(est, "labels_", None)
    return labels if labels is not None else est.predict(features.X)


def _scored(names) -> list[str]:
    """The metrics of ``names`` scored from the features and clusters (not those of rebuilt
    images, nor a mixture's, which :func:`_model_metrics` records)."""
    return [
        m
        for m in names
        if not (evaluate.METRICS[m].needs_coding or evaluate.METRICS[m].needs_mixture)
        and m not in _IMAGE_ERRORS
    ]


def _run_metrics(
    spec: JobSpec,
    est,
    features: Features,
    names,
    *,
    labels_pred=None,
    inertia: float | None = None,
    fitted_table: np.ndarray | None = None,
) -> dict[str, float]:
    """The metrics of ``names`` that need no image reconstruction, on ``features`` (the
    fitted samples, or a held-out split scored with ``labels_pred``, its ``inertia`` and the
    fitted samples' contingency table ``fitted_table``)."""
    names = _scored(names)
    info = [evaluate.METRICS[m] for m in names]
    if labels_pred is None and any(m.needs_labels or m.needs_features for m in info):
        labels_pred = _predicted(est, features)
    if inertia is None:
        inertia = float(getattr(est, "inertia_", np.nan))  # k-means only
    names = [m for m in names if not (m in _INERTIA_METRICS and np.isnan(inertia))]
    return evaluate.compute_metrics(
        names,
        inertia=inertia,
        n_samples=features.n_vectors,
        n_features=features.X.shape[1],
        labels_true=features.labels,
        labels_pred=labels_pred,
        n_clusters=_n_clusters(est),
        X=features.X if any(m.needs_features for m in info) else None,
        centroids=getattr(est, "cluster_centers_", None),
        random_state=int(getattr(est, "random_state", None) or 0),
        fitted_contingency=fitted_table,
        **_silhouette_sample(spec),
    )


# A mixture has no inertia: these are left out of its runs rather than recorded as NaN.
_INERTIA_METRICS = ("inertia", "j_clust", "reconstruction_error")


def _silhouette_sample(spec: JobSpec) -> dict[str, int]:
    return {} if spec.silhouette_sample is None else {"silhouette_sample": spec.silhouette_sample}


def _heldout_names(spec: JobSpec, est) -> list[str]:
    """The metric names recorded for every held-out split (without the split prefix) by a
    run of ``est`` (an estimator or its class)."""
    names = _scored(spec.evaluate)
    if hasattr(est, "bic"):
        names += list(evaluate.MIXTURE_METRICS)
    return names


def _heldout_metrics(
    spec: JobSpec, est, fitted: Features, heldout: dict[str, Features]
) -> dict[str, float]:
    """Every metric of the job on each held-out split, named ``<split>_<metric>``.

    The model is the one fitted; the maps from clusters to labels (majority vote,
    Hungarian matching) are those of the fitted samples, applied to the held-out samples'
    clusters.
    """
    if not heldout:
        return {}
    names = _heldout_names(spec, est)
    k = _n_clusters(est)
    fitted_table = None
    labelled = fitted.labels is not None
    if labelled and any(evaluate.METRICS[m].needs_labels for m in names):
        largest = dask.compute(*(f.labels.max() for f in (fitted, *heldout.values())))
        n_labels = 1 + int(max(largest))  # one trip for every split's largest label
        fitted_table = evaluate.contingency(
            fitted.labels, _predicted(est, fitted), k, n_labels=n_labels
        )
    out: dict[str, float] = {}
    for split, features in heldout.items():
        X = features.X
        predicted = np.asarray(est.predict(X))  # a held-out split is scored whole, in memory
        inertia = -float(est.score(X)) if hasattr(est, "inertia_") else np.nan
        found = _run_metrics(
            spec,
            est,
            features,
            names,
            labels_pred=predicted,
            inertia=inertia,
            fitted_table=fitted_table,
        )
        if hasattr(est, "bic"):
            found.update(_model_metrics(est, X, int(X.shape[0]), recorded=False))
        out.update({f"{split}_{m}": v for m, v in found.items()})
    return out


def _confusion_wanted(spec: JobSpec, features: Features) -> bool:
    return features.labels is not None and any(
        evaluate.METRICS[m].needs_labels for m in spec.metrics
    )


def _confusion(spec: JobSpec, est, features: Features) -> dict[str, tuple]:
    """The contingency table and the Hungarian confusion matrix of a run whose job scores
    it against the samples' labels (stored as run variables)."""
    if not _confusion_wanted(spec, features):
        return {}
    predicted = _predicted(est, features)
    found = evaluate.confusion_matrices(features.labels, predicted, _n_clusters(est))
    out = {name: (var.dims, var.values) for name, var in found.data_vars.items()}
    out.update({name: ((name,), c.values) for name, c in found.coords.items()})
    return out


def _n_clusters(est) -> int:
    return int(getattr(est, "n_clusters", None) or est.n_components)


def _dictionary(est) -> np.ndarray:
    """The vectors a model rebuilds patches from: centroids, or a mixture's means."""
    centers = getattr(est, "cluster_centers_", None)
    return centers if centers is not None else est.means_


def _model_metrics(est, X, n_samples: int, recorded: bool = True) -> dict[str, float]:
    """The scores every run of a model family records: k-means inertia; a mixture's lower
    bound, log-likelihood, BIC and AIC (from one scoring pass over ``X``, as scikit-learn
    defines them). ``recorded=False``: only the scores of ``X`` (no fit summary)."""
    summary = est._stored_summary() if recorded else {}
    out = {m: summary[m] for m in ("inertia", "lower_bound") if m in summary}
    if hasattr(est, "bic"):
        out.update(
            evaluate.compute_metrics(
                evaluate.MIXTURE_METRICS,
                inertia=np.nan,
                n_samples=n_samples,
                n_features=int(est.n_features_in_),
                log_likelihood=float(est.score(X)),
                n_parameters=est._n_parameters(),
            )
        )
    return out


_IMAGE_ERRORS = ("image_mse", "image_rmse")


class _ImageStep:
    """Whole images rebuilt from a run's dictionary: the image errors every patch run
    records, the first ``output.reconstructions`` images next to their originals, and the
    same again through the job's sparse coding (with its codes when ``output.codes``)."""

    def __init__(self, spec: JobSpec, features: Features):
        self.spec, self.features = spec, features
        self.layout = features.reconstruction_layout

    def coding_attrs(self) -> dict[str, Any] | None:
        coding = self.spec.sparse_coding
        return None if coding is None else coding.to_dict()

    def missing(self, attrs: dict[str, Any]) -> tuple[bool, bool, bool]:
        """What a complete run lacks: (hard images, sparse images, codes)."""
        have = set(attrs.get("variables", []))
        metrics = attrs.get("metrics", {})
        shown = self.spec.output.reconstructions
        hard = "image_mse" not in metrics or int(attrs.get("reconstructions", 0)) < shown
        sparse = self.spec.sparse_coding is not None and (
            attrs.get("sparse_coding") != self.coding_attrs()
            or "sparse_image_mse" not in metrics
            or int(attrs.get("reconstructions", 0)) < shown
        )
        codes = self.spec.output.codes and ("codes_index" not in have or sparse)
        return hard, sparse, codes

    def __call__(
        self, centroids: np.ndarray, hard: bool = True, sparse: bool = True, codes: bool = True
    ) -> tuple[dict[str, float], dict[str, tuple]]:
        from dkm.coding import encode_patches, image_error, reconstruct_images

        metrics: dict[str, float] = {}
        variables: dict[str, tuple] = {}
        shown = self.spec.output.reconstructions
        images = self.features.images
        passes = [("", None, hard)]
        if self.spec.sparse_coding is not None:
            passes.append(("sparse_", self.spec.sparse_coding, sparse))
        # Every pass is built lazily and computed together: one trip through the cluster.
        lazy: dict[str, Any] = {}
        for prefix, coding, wanted in passes:
            if not wanted:
                continue
            rebuilt = reconstruct_images(images, centroids, self.layout, coding=coding)
            lazy[f"{prefix}image_mse"] = rebuilt["image_mse"].data
            if shown:
                first = rebuilt.isel(image=slice(0, shown))
                lazy[f"{prefix}reconstructions"] = first["reconstructions"]
                lazy["originals"] = first["originals"]
        (done,) = dask.compute(lazy)
        for name, value in done.items():
            if name.endswith("image_mse"):
                prefix = name.removesuffix("image_mse")
                metrics.update({f"{prefix}{k}": v for k, v in image_error(value).items()})
                variables[name] = (("sample",), value)
            else:
                variables[name] = (value.dims, value.values)
        if codes and self.spec.output.codes:
            found = encode_patches(self.features.X, centroids, self.spec.sparse_coding)
            for var in ("codes_index", "codes_weight"):
                variables[var] = (found[var].dims, found[var].data)
        return metrics, variables

    def attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reconstructions": self.spec.output.reconstructions}
        if self.spec.sparse_coding is not None:
            out["sparse_coding"] = self.coding_attrs()
        return out


class _JobRunner:
    """The loop over a job's runs, on a connected cluster."""

    def __init__(
        self,
        spec: JobSpec,
        features: Features,
        results: ResultsStore,
        client,
        heldout: dict[str, Features] | None = None,
    ):
        self.spec, self.features, self.results = spec, features, results
        self.heldout = heldout or {}
        self.client = client
        self.images = _ImageStep(spec, features) if features.images is not None else None

    def run(self, model: ModelSpec, k: int) -> RunOutcome:
        name = run_name(model.algorithm, k)
        identity = run_identity(model, k, self.features.identity)
        rid = run_id(identity)
        info = self.results.run_info(name)
        if info is not None and info.status == COMPLETE and info.run_id == rid:
            problem = self.results.verify_run(name)
            if problem is None:
                return self._complete(name, model, k, info.attrs)
            log.warning("%s: %s; computing it again", name, problem)
        try:
            metrics = self._fit(name, model, k, identity, rid)
        except Exception as err:  # the run fails; the job goes on with the others
            if self._scheduler_gone(err):  # not the run's fault: the cluster is gone
                raise SchedulerLost(
                    f"lost the Dask scheduler at {self.client.scheduler.address} during {name} "
                    f"({_error_text(err).splitlines()[0]}); finished runs and checkpoints are "
                    f"kept in {self.results.path}"
                ) from None
            log.debug("%s failed", name, exc_info=True)
            text = _error_text(err, self.client)
            log.error("%s: failed: %s", name, text)
            attrs = {"algorithm": model.algorithm, "k": k, "identity": identity, "run_id": rid}
            self.results.write_failed_run(name, attrs, text)
            return RunOutcome(name, model.algorithm, k, "failed", error=text)
        return RunOutcome(name, model.algorithm, k, "computed", metrics)

    def _scheduler_gone(self, err: Exception) -> bool:
        """Whether a run failed because the scheduler went away. The client notices that
        a moment after a gather in flight fails with a closed connection, so a connection
        error is checked against the scheduler itself before the run is called failed."""
        if self.client.status != "running":
            return True
        if not isinstance(err, OSError):
            return False
        try:
            check_scheduler(self.client.scheduler.address, 5.0)
        except SchedulerUnreachable:
            return True
        return False

    def _complete(self, name: str, model: ModelSpec, k: int, attrs: dict[str, Any]) -> RunOutcome:
        """A reused run: add the metrics, labels and images the job asks for now and it
        lacks."""
        metrics = dict(attrs.get("metrics", {}))
        missing = [m for m in self.spec.metrics if m not in metrics]
        heldout = [
            f"{split}_{m}"
            for split in self.heldout
            for m in _heldout_names(self.spec, model.entry.estimator)
        ]
        missing_heldout = [m for m in heldout if m not in metrics]
        want_labels = self.spec.output.labels and "labels" not in attrs.get("variables", [])
        images = self.images.missing(attrs) if self.images is not None else (False,) * 3
        want_confusion = "contingency" not in attrs.get("variables", []) and bool(
            _confusion_wanted(self.spec, self.features)
        )
        if not (missing or missing_heldout or want_labels or any(images) or want_confusion):
            log.info("%s: already complete, kept", name)
            return RunOutcome(name, model.algorithm, k, "reused", metrics)
        est = load_model(self.results.path, name)
        added: dict[str, tuple] = {}
        extra: dict[str, Any] = {}
        if want_labels:
            est.labels_ = est.predict(self._input())
            added["labels"] = ((self.features.X.dims[0],), est.labels_)
        metrics.update(_run_metrics(self.spec, est, self.features, missing))
        if missing_heldout:
            metrics.update(_heldout_metrics(self.spec, est, self.features, self.heldout))
        if "contingency" not in attrs.get("variables", []):
            added.update(_confusion(self.spec, est, self.features))
        if any(images):
            found, variables = self.images(_dictionary(est), *images)
            metrics.update(found)
            added.update(variables)
            extra = self.images.attrs()
        self.results.add_to_run(name, {"metrics": metrics, **extra}, added or None)
        log.info(
            "%s: kept; added %s",
            name,
            ", ".join(dict.fromkeys([*missing, *missing_heldout, *added])),
        )
        return RunOutcome(name, model.algorithm, k, "reused", metrics)

    def _input(self):
        # A stored feature matrix goes in by path, so an estimator can stream it from Zarr
        # when it does not fit in cluster memory instead of persisting it.
        if self.features.store is not None:
            return str(self.features.store)
        return self.features.X

    def _fit(
        self, name: str, model: ModelSpec, k: int, identity: dict, rid: str
    ) -> dict[str, float]:
        spec = self.spec
        entry = model.entry
        runner_params = {"variable": self.features.X.name} if self.features.store else {}
        est = entry.make(k, model.params, **runner_params)
        checkpoint = self.results.read_checkpoint(name, rid) if entry.checkpoints else None
        if checkpoint is not None:
            log.info(
                "%s: resuming from the checkpoint at start %d, iteration %d",
                name,
                checkpoint.start + 1,
                checkpoint.iteration,
            )
        progress = _Progress(name, int(model.resolved().get("max_iter", 0)))
        every = spec.output.checkpoint_every

        def on_state(state: FitState) -> None:
            check_interrupted()
            progress(state)
            if state.iteration % every == 0 or state.info.get("stopped"):
                self.results.write_checkpoint(name, state, rid)

        start = time.perf_counter()
        try:
            # A fit that stops at max_iter is a result like any other: recorded (converged
            # in the run's attrs) and logged, not a Python warning.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                if entry.checkpoints:
                    est.fit(self._input(), callback=on_state, resume_from=checkpoint)
                else:  # not checkpointed: an interrupted run is redone (same seed, same result)
                    est.fit(self._input())
        finally:
            progress.close()
        for warning in caught:
            if issubclass(warning.category, ConvergenceWarning):
                log.warning("%s: %s", name, warning.message)
            else:
                warnings.warn_explicit(
                    warning.message, warning.category, warning.filename, warning.lineno
                )
        seconds = time.perf_counter() - start
        # Predicted once (a mixture has no labels_ of its own): labels, label metrics and the
        # confusion matrices all read them.
        uses_labels = any(
            evaluate.METRICS[m].needs_labels or evaluate.METRICS[m].needs_features
            for m in spec.metrics
        )
        if getattr(est, "labels_", None) is None and (spec.output.labels or uses_labels):
            est.labels_ = est.predict(self._input())
        metrics = _model_metrics(est, self._input(), int(self.features.X.shape[0]))
        metrics.update(_run_metrics(spec, est, self.features, spec.metrics))
        metrics.update(_heldout_metrics(spec, est, self.features, self.heldout))
        variables = {**est._stored_model(), **_confusion(spec, est, self.features)}
        extra: dict[str, Any] = {}
        if self.images is not None:
            started = time.perf_counter()
            found, images = self.images(_dictionary(est))
            metrics.update(found)
            variables.update(images)
            extra = {**self.images.attrs(), "image_seconds": time.perf_counter() - started}
        attrs = {
            "algorithm": model.algorithm,
            "k": k,
            "params": model.resolved(),
            "identity": identity,
            "run_id": rid,
            **est._stored_summary(),
            "metrics": metrics,
            "seconds": seconds,
            "resumed_from_iteration": -1 if checkpoint is None else checkpoint.iteration,
            "features": self.features.attrs,
            "history_attrs": dict(est.history_.attrs),
            **extra,
        }
        if spec.output.labels:
            variables["labels"] = ((self.features.X.dims[0],), est.labels_)
        self.results.write_run(name, variables, est.history_, attrs)
        self.results.drop_checkpoints(name)
        scores = ", ".join(
            f"{m.replace('image_rmse', 'image RMSE')} {metrics[m]:.6g}"
            for m in ("inertia", "lower_bound", "image_rmse")
            if m in metrics
        )
        log.info("%s: %d iterations, %s, %.1f s", name, est.n_iter_, scores, seconds)
        return metrics


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("dkm", "dask", "distributed", "numpy", "scikit-learn", "xarray", "zarr")
    out = {"python": platform.python_version()}
    for pkg in names:
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _data_error(spec: JobSpec, err: StoreError, damaged: bool) -> JobSpecError:
    """A data-store problem named by its job key, with the remedy that fits it."""
    state = probe(spec.data.store)
    if damaged or (state is not None and state.kind == "dataset" and not state.complete):
        again = f"dkm ingest {spec.data.dataset} --store {spec.data.store} --overwrite"
        remedy = f": ingest it again ({again}) or set data.store to another path"
    else:
        remedy = "; set data.store to another path"
    return JobSpecError([("data.store", f"{err}{remedy}")], "job")


def _prepare(spec: JobSpec) -> tuple[Path, Features, dict[str, Features]]:
    """Ingest the dataset if needed and build the features (and those of every held-out
    split of ``evaluate.on``), errors named by job key."""
    try:
        with store_lock(
            spec.data.store, purpose="ingest", wait=config.get_seconds("store.lock-wait")
        ):
            data_store = catalog.ingest(
                spec.data.dataset, spec.data.store, source=spec.data.source, **spec.data.options
            )
    except StoreError as err:
        raise _data_error(spec, err, damaged=False) from None
    try:
        verify_once(data_store)  # read whole once per write of the store
    except StoreError as err:
        raise _data_error(spec, err, damaged=True) from None
    _data_problems(spec, catalog.store_shape(data_store), spec.data.store)
    f = spec.features
    common = {"kind": f.kind, "layout": f.layout, "store": f.store, "learner": f.learner}
    try:
        features = build_features(data_store, split=f.split, **common)
        heldout = {
            split: build_features(data_store, split=split, fit_split=f.split, **common)
            for split in spec.heldout
        }
    except StoreError as err:
        key = "features.store" if f.store else "features"
        raise JobSpecError([(key, f"{err}; set features.store to another path")], "job") from None
    return data_store, features, heldout


def run_job(
    spec: JobSpec,
    *,
    scheduler: str | None = None,
    fresh: bool = False,
    resume: bool = False,
    performance_report: str | os.PathLike | None = None,
) -> JobOutcome:
    """Run a validated job; return how it ended.

    Parameters
    ----------
    spec : JobSpec
        The job (see :func:`dkm.jobs.load_job`).
    scheduler : str, optional
        Scheduler address; see :func:`dkm.runtime.resolve_address` for the precedence over
        ``$DKM_SCHEDULER`` and the job's ``cluster.address``. Without any, dkm starts a
        LocalCluster shaped by ``cluster``.
    fresh : bool, default False
        Delete the job's results store first and compute every run again.
    resume : bool, default False
        Require the results store to exist (continuing is what every run does anyway).
    performance_report : path-like, optional
        Write Dask's performance report (HTML) of the whole job here.

    Raises
    ------
    JobSpecError
        Before any cluster starts, for problems the data or the stores reveal.
    KeyboardInterrupt
        After recording the job as interrupted (finished runs and checkpoints are kept).
    """
    try:
        with store_lock(spec.output.store, purpose=f"dkm run of job {spec.name!r}"):
            return _run_locked(spec, scheduler, fresh, resume, performance_report)
    except StoreLocked as err:
        raise JobSpecError(
            [("output.store", f"{err}; wait for it to finish, or stop it and run again")], "job"
        ) from None
    except StoreUnwritable as err:
        raise JobSpecError([("output.store", f"{err}; choose another path")], "job") from None


def _run_locked(spec, scheduler, fresh, resume, performance_report) -> JobOutcome:
    plan_job(spec, fresh=fresh, resume=resume)
    results = ResultsStore(spec.output.store)
    if fresh and results.exists():
        log.info("%s: --fresh: removing the earlier results", results.path)
        results.remove()
    c = spec.cluster
    started = time.perf_counter()
    with connect(
        scheduler,
        job_address=c.address,
        n_workers=c.n_workers,
        threads_per_worker=c.threads_per_worker,
        memory_limit=c.memory_limit or "auto",
    ) as client:
        report_ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if performance_report is not None:
            from distributed import performance_report as dask_report

            report_ctx = dask_report(filename=str(performance_report))
        with report_ctx:
            _, features, heldout = _prepare(spec)
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            results.start_job(
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
                }
            )
            runner = _JobRunner(spec, features, results, client, heldout)
            outcomes: list[RunOutcome] = []
            try:
                for model in spec.model.each():
                    for k in spec.model.k:
                        check_interrupted()
                        outcomes.append(runner.run(model, k))
            except KeyboardInterrupt:
                results.finish(INTERRUPTED, {"seconds": time.perf_counter() - started})
                raise
            except SchedulerLost as err:
                results.finish(
                    INTERRUPTED, {"seconds": time.perf_counter() - started, "error": str(err)}
                )
                raise
            done = [o for o in outcomes if o.status != "failed"]
            if done:
                names = sorted({m for o in done for m in o.metrics})
                results.write_sweep(
                    sweep_table(
                        [o.k for o in done],
                        {m: [o.metrics.get(m, np.nan) for o in done] for m in names},
                        algorithms=[o.algorithm for o in done],
                    )
                )
            status = FAILED if len(done) < len(outcomes) else COMPLETE
            results.finish(status, {"seconds": time.perf_counter() - started})
    if spec.output.report:
        from dkm.report import write_report

        log.info("report: %s", write_report(spec.output.store))
    return JobOutcome(Path(spec.output.store), status, outcomes)
