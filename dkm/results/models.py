"""Fitted models back from a results store."""

from __future__ import annotations

import os
from typing import Any

from dkm import algorithms
from dkm.results.store import ResultsStore

__all__ = ["load_model"]


def load_model(store: str | os.PathLike, run: str) -> Any:
    """The fitted estimator of one complete run of a results store.

    It predicts, transforms and scores like the estimator that was fitted (``labels_`` is
    not restored: the store keeps labels only when the job asked, as ``labels``).

    Parameters
    ----------
    store : path-like
        A results store written by a job.
    run : str
        The run's name, e.g. ``"lloyd-k128"`` (``dkm show STORE`` lists them).

    Raises
    ------
    StoreError
        The run is missing, failed, unfinished or damaged.
    """
    results = ResultsStore(store)
    ds = results.read_run(run)
    attrs = ds.attrs
    entry = algorithms.get(attrs["algorithm"])
    params = {k: v for k, v in attrs.get("params", {}).items() if k in entry.job_rules()}
    est = entry.make(int(attrs["k"]), params)
    est._restore_stored(ds, attrs, results.read_history(run).load())
    return est
