"""How the report names and orders metrics, held-out ones (``test_accuracy``) included.

A run scores the samples it was fitted on under a metric's plain name (``accuracy``) and,
when the job also scores another split, the same metric under the split's name as a prefix
(``test_accuracy``). The report shows both side by side: ``accuracy``, ``accuracy (test)``.
"""

from __future__ import annotations

from collections.abc import Iterable

from dkm.features import SPLITS

__all__ = ["held_out_variants", "metric_label", "metric_order", "split_metric"]


def split_metric(name: str) -> tuple[str, str | None]:
    """``(metric, split)`` of a metric name: ``("accuracy", "test")`` for ``test_accuracy``,
    ``("accuracy", None)`` for ``accuracy`` (scored on the fitted samples).

    Only the dataset splits count as prefixes, so ``sparse_image_rmse`` stays whole.
    """
    prefix, _, rest = name.partition("_")
    if prefix in SPLITS and rest:
        return rest, prefix
    return name, None


def metric_label(name: str) -> str:
    """What a table header or a figure axis calls a metric: ``accuracy (test)``."""
    metric, split = split_metric(name)
    return metric if split is None else f"{metric} ({split})"


def metric_order(names: Iterable[str]) -> list[str]:
    """Metric names sorted by metric, each followed by its held-out variants in split order,
    so ``accuracy`` and ``accuracy (test)`` stand next to each other."""

    def key(name: str) -> tuple[str, int]:
        metric, split = split_metric(name)
        return metric, -1 if split is None else SPLITS.index(split)

    return sorted(set(names), key=key)


def held_out_variants(metric: str, available: Iterable[str]) -> list[str]:
    """The held-out variants of ``metric`` among ``available`` (``test_accuracy`` for
    ``accuracy``), in split order; none for a name that is itself held-out."""
    if split_metric(metric)[1] is not None:
        return []
    have = set(available)
    return [f"{split}_{metric}" for split in SPLITS if f"{split}_{metric}" in have]
