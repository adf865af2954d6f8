"""The registry of clustering algorithms a job can name (``model.algorithm``).

One entry per algorithm: the estimator class (whose ``_param_rules`` say which parameters
exist and what they accept), the parameter that takes the job's ``k``, the defaults a job
uses where they differ from the estimator's, and whether fits can be checkpointed. Job
validation, the runner and :func:`dkm.load_model` all ask this table, so adding a model
family means adding its entries here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dkm.kmeans import KMeans, MiniBatchKMeans
from dkm.mixture import GaussianMixture

__all__ = ["ALGORITHMS", "Algorithm", "get"]


@dataclass(frozen=True)
class Algorithm:
    """How a job's ``model`` section maps onto an estimator.

    Parameters
    ----------
    name : str
        The job's ``model.algorithm`` value.
    estimator : type
        A :class:`~dkm._parallel.base.ParallelEstimator` subclass.
    k_param : str
        The estimator parameter that receives each ``model.k``.
    job_defaults : mapping
        Values a job uses unless it sets them. Jobs are reproducible, so ``random_state``
        defaults to 0 instead of the estimator's None.
    checkpoints : bool
        Whether ``fit`` takes ``callback`` / ``resume_from`` (runs resume mid-fit).
    """

    name: str
    estimator: type
    description: str
    k_param: str = "n_clusters"
    job_defaults: Mapping[str, Any] = field(default_factory=lambda: {"random_state": 0})
    checkpoints: bool = False
    # Parameters a job file cannot set: the runner decides them. KMeans's ``algorithm`` (how
    # an iteration assigns rows, with the same result either way) is left at "auto": a job's
    # ``model.algorithm`` names the model family.
    runner_params: tuple[str, ...] = ("variable", "verbose", "persist", "algorithm")

    def job_rules(self) -> dict[str, list]:
        """The rules of the parameters a job may set (``model.<name>``)."""
        skip = {self.k_param, *self.runner_params}
        return {k: v for k, v in self.estimator.param_rules().items() if k not in skip}

    def params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every job-settable parameter: the given ones over the job defaults over the
        estimator's defaults (what a run's identity records)."""
        defaults = self.estimator().get_params(deep=False)
        out = {k: defaults[k] for k in self.job_rules()}
        out.update(self.job_defaults)
        out.update(given)
        if "dtype" in out:
            out["dtype"] = np.dtype(out["dtype"]).name
        return out

    def make(self, k: int, params: Mapping[str, Any], **runner: Any):
        """The estimator for one run."""
        return self.estimator(**{self.k_param: k, **self.params(params), **runner})


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("lloyd", KMeans, "k-means with Lloyd iterations (dkm.KMeans)", checkpoints=True),
        Algorithm("minibatch", MiniBatchKMeans, "mini-batch k-means (dkm.MiniBatchKMeans)"),
        Algorithm(
            "gmm",
            GaussianMixture,
            "Gaussian mixture fitted by EM (dkm.GaussianMixture)",
            k_param="n_components",
            checkpoints=True,
        ),
    )
}


def get(name: str) -> Algorithm:
    """The registry entry of ``name``; a clear error names the known ones."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(
            f"unknown algorithm {name!r} (expected one of: {', '.join(ALGORITHMS)})"
        ) from None
