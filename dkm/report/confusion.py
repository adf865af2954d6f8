"""Which labelled runs the report draws a confusion matrix of, and what each one shows.

A labelled run stores ``contingency (label, cluster)``, the Hungarian ``confusion (label,
predicted_label)`` and each cluster's matched label ``cluster_label (cluster)``
(:func:`dkm.evaluate.confusion_matrices`). What is drawn depends on k against the number of
classes n:

- k <= n: the stored confusion matrix, columns in label order, which is the Hungarian order:
  column j holds the cluster matched to label j, so the diagonal holds the matched samples;
- n < k <= ``MAX_CONTINGENCY_COLUMNS``: the contingency table, the n matched clusters first
  (in the order of their labels) and the unmatched ones after them by majority label;
- larger k: the confusion matrix of the majority map (each cluster predicts its most
  frequent label), n x n, as a table of k columns would not be legible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from dkm.data.store import StoreError, open_dataset
from dkm.evaluate import hungarian_labels, majority_labels

__all__ = [
    "MAX_CONFUSION_FIGURES",
    "MAX_CONTINGENCY_COLUMNS",
    "ConfusionView",
    "class_names",
    "confusion_runs",
    "confusion_view",
]

# At most this many confusion figures per report, and contingency tables this wide: past
# that a figure squeezed into the page is no longer legible.
MAX_CONFUSION_FIGURES = 8
MAX_CONTINGENCY_COLUMNS = 20

TRUE_LABEL = "true label"
MATCHED = "cluster (Hungarian-matched label)"
MAJORITY = "cluster (majority label)"


@dataclass(frozen=True)
class ConfusionView:
    """One drawn matrix: ``counts (row, column)`` with tick names, axis label and caption.

    ``kind`` is ``"confusion"`` (Hungarian), ``"contingency"`` or ``"majority"``.
    """

    kind: str
    name: str
    counts: np.ndarray
    rows: list[str]
    columns: list[str]
    xlabel: str
    caption: str

    @property
    def title(self) -> str:
        """A short title drawn above the matrix."""
        what = {
            "confusion": "Hungarian confusion matrix",
            "contingency": "contingency table",
            "majority": "majority-map confusion matrix",
        }[self.kind]
        return f"{what} of {self.name}"


def confusion_runs(runs: Sequence[tuple[str, str, int, int]]) -> list[str]:
    """The runs to draw, in the order given: per algorithm the run of its smallest k and the
    run whose k is the number of classes, at most :data:`MAX_CONFUSION_FIGURES` in all.

    Parameters
    ----------
    runs : sequence of (name, algorithm, k, n_classes)
        The labelled runs.
    """
    chosen: set[str] = set()
    for algorithm in dict.fromkeys(a for _, a, _, _ in runs):
        own = [(name, k, n) for name, a, k, n in runs if a == algorithm]
        chosen.add(min(own, key=lambda r: r[1])[0])
        chosen.update(name for name, k, n in own if k == n)
    return [name for name, *_ in runs if name in chosen][:MAX_CONFUSION_FIGURES]


def class_names(job_attrs: Mapping[str, Any]) -> list[str] | None:
    """The names of the classes: recorded with the job's features (``label_names``), else
    read from its dataset store (the ``label`` variable's ``names`` attr, e.g.
    Fashion-MNIST's); None when neither has them or the store cannot be opened."""
    names = (job_attrs.get("features") or {}).get("label_names")
    store = (job_attrs.get("job") or {}).get("data", {}).get("store")
    if not names and store:
        try:
            label = open_dataset(Path(store)).get("label")
        except (StoreError, OSError, ValueError):
            label = None  # moved or removed since the job ran: label values stand in
        names = None if label is None else label.attrs.get("names")
    return [str(n) for n in names] if isinstance(names, list | tuple) and names else None


def _tick_names(run: xr.Dataset, n: int, names: Sequence[str] | None) -> list[str]:
    if names is not None and len(names) == n:
        return list(names)
    values = run["label"].values if "label" in run.coords else np.arange(n)
    return [str(int(v)) for v in values]


def confusion_view(run: xr.Dataset, name: str, names: Sequence[str] | None = None) -> ConfusionView:
    """What to draw of a labelled run (see the module docstring for which matrix).

    Parameters
    ----------
    run : xarray.Dataset
        A run read back with its ``contingency`` (and ``confusion``, ``cluster_label``).
    name : str
        The run's name, for the caption.
    names : sequence of str, optional
        Class names in label order; the label values when None or of another length.
    """
    table = run["contingency"].transpose("label", "cluster").values
    n, k = table.shape
    labels = _tick_names(run, n, names)
    matched = (
        run["cluster_label"].values if "cluster_label" in run else hungarian_labels(table)
    ).astype(np.int64)
    clusters = np.arange(k)
    total = max(int(table.sum()), 1)
    one_to_one = table[matched[matched >= 0], clusters[matched >= 0]].sum() / total
    if k <= n:
        return _hungarian(run, name, table, matched, labels, one_to_one)
    limit = (
        f"With k={k} clusters for {n} classes, one-to-one (Hungarian) accuracy matches only "
        f"{n} clusters to labels ({one_to_one:.3f})"
    )
    majority = majority_labels(table)
    if k <= MAX_CONTINGENCY_COLUMNS:
        first = [int(np.flatnonzero(matched == j)[0]) for j in range(n) if (matched == j).any()]
        rest = sorted(np.flatnonzero(matched < 0), key=lambda c: (majority[c], c))
        order = [*first, *(int(c) for c in rest)]
        columns = [f"{c} ({labels[matched[c]]})" if matched[c] >= 0 else str(c) for c in order]
        caption = (
            f"Contingency table of {name}: samples per true label and cluster. {limit}: the "
            f"first {len(first)} columns, their matches on the diagonal; the samples of the "
            f"other {k - len(first)} clusters (after them, by majority label) count as wrong."
        )
        return ConfusionView(
            "contingency", name, table[:, order], labels, columns, MATCHED, caption
        )
    counts = np.stack([table[:, majority == j].sum(axis=1) for j in range(n)], axis=1)
    caption = (
        f"Confusion matrix of the majority map of {name}: each of its {k} clusters predicts "
        f"its most frequent true label (accuracy {np.trace(counts) / total:.3f}). {limit}."
    )
    return ConfusionView("majority", name, counts, labels, list(labels), MAJORITY, caption)


def _hungarian(
    run: xr.Dataset,
    name: str,
    table: np.ndarray,
    matched: np.ndarray,
    labels: list[str],
    one_to_one: float,
) -> ConfusionView:
    """k <= n: the stored confusion matrix (label x the label each cluster is matched to)."""
    n, k = table.shape
    if "confusion" in run:
        confusion = run["confusion"].transpose("label", "predicted_label")
        counts = confusion.sel(predicted_label=np.arange(n)).values
    else:  # the same, built from the table: each cluster's column added to its label's
        counts = np.zeros((n, n), dtype=table.dtype)
        np.add.at(counts.T, matched, table.T)
    cluster_of = {int(label): c for c, label in enumerate(matched) if label >= 0}
    columns = [f"{cluster_of.get(j, '–')} ({labels[j]})" for j in range(n)]
    caption = (
        f"Confusion matrix of {name}: rows the true label, columns the cluster matched to "
        f"each label by the Hungarian (one-to-one) assignment, so the diagonal holds the "
        f"matched samples: one-to-one accuracy {one_to_one:.3f}."
    )
    if k < n:
        missing = f"{n - k} label has" if n - k == 1 else f"{n - k} labels have"
        caption += f" With k={k} < {n} classes, {missing} no cluster (columns –)."
    return ConfusionView("confusion", name, counts, labels, columns, MATCHED, caption)
