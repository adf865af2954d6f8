"""The report's account of what a run clustered: its features, in a line of words.

A run records ``features`` attrs (:attr:`dkm.features.Features.attrs`): the kind (pixels,
patches, or learned features such as pca and autoencoder) and what shaped it. The report
names the known keys in words and shows any other key as it is, so a feature kind added
later still shows everything it records.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["describe_features", "features_summary"]

# How each kind reads; an unknown kind reads as its name.
_KINDS = {
    "pixels": "pixels",
    "patches": "patches",
    "pca": "PCA",
    "autoencoder": "autoencoder",
}

# The keys named in words, in the order they read; every other key follows as "key value".
_WORDS = {
    "n_components": "components",
    "whiten": "whiten",
    "filters": "filters",
    "epochs": "epochs",
    "batch_size": "batch size",
    "train_samples": "trained on samples",
    "learning_rate": "learning rate",
    "seed": "seed",
    "patch_size": "patch size",
    "stride": "stride",
    "pad": "pad",
    "drop_empty": "drop empty",
    "sampled_per_image": "sampled per image",
    "sample_seed": "sample seed",
    "normalize": "normalize",
    "image_shape": "images",
    "split": "split",
    "fit_split": "fitted on split",
    "shape": "matrix",
    "store": "store",
}
_SKIPPED = ("kind", "label_names")  # the class names show on the confusion matrices


def _value(key: str, value: Any) -> str:
    if key in ("image_shape", "shape") and isinstance(value, list | tuple):
        return " × ".join(str(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def describe_features(attrs: Mapping[str, Any] | None) -> str:
    """One line saying what a run clustered, e.g. ``PCA: components 32, whiten no,
    images 28 × 28, split all, fitted on split train, store /data/pca.zarr``.

    Parameters
    ----------
    attrs : mapping or None
        A run's (or the job's) ``features`` attrs.

    Returns
    -------
    str
        ``"not recorded"`` for missing or empty attrs (runs of a feature dataset such as
        ``synthetic`` record none: they cluster its stored feature vectors).
    """
    if not attrs:
        return "not recorded"
    kind = str(attrs.get("kind", "features"))
    known = [key for key in _WORDS if key in attrs]
    other = sorted(key for key in attrs if key not in _WORDS and key not in _SKIPPED)
    parts = [
        f"{_WORDS.get(key, key.replace('_', ' '))} {_value(key, attrs[key])}"
        for key in [*known, *other]
    ]
    head = _KINDS.get(kind, kind)
    return f"{head}: {', '.join(parts)}" if parts else head


def features_summary(
    job_attrs: Mapping[str, Any] | None, runs: Mapping[str, Mapping[str, Any] | None]
) -> list[tuple[str, list[str]]]:
    """The distinct features of a store: ``(description, runs using it)``, the job's first.

    Parameters
    ----------
    job_attrs : mapping or None
        The store's ``features`` attrs (the job as last run, with the matrix ``shape``).
    runs : mapping of run name to its ``features`` attrs
        The complete runs. A run computed by an earlier version of the job may differ.

    Returns
    -------
    list of (str, list of str)
        The job's own features come first (with an empty run list when no run used them).
    """
    job = dict(job_attrs or {})
    shape = job.pop("shape", None)
    groups: dict[str, list[str]] = {}
    if job_attrs:
        groups[describe_features(job)] = []
    for name, attrs in runs.items():
        groups.setdefault(describe_features(attrs), []).append(name)
    out = list(groups.items())
    if shape is not None and out and job_attrs:
        # The matrix shape is the job's (the runs do not record it): said on its line only.
        first, names = out[0]
        out[0] = (f"{first}, matrix {_value('shape', shape)}", names)
    return out
