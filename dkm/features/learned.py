"""Learned features: a model fitted on one split maps every sample to a short vector.

Two learners, each a frozen spec that owns its rules, defaults, the tag that names its
store and the attrs the store records:

- :class:`PCAFeatures`: principal components, fitted on the cluster with dask-ml's exact
  (tall-skinny QR) SVD of the fit split's pixels, scaled as :func:`pixel_matrix` scales
  them (or of a feature dataset's vectors);
- :class:`AutoencoderFeatures`: the bottleneck of a small convolutional autoencoder,
  trained on the client and applied chunk-wise on the cluster
  (:mod:`dkm.features.autoencoder`).

:meth:`learn` fits a learner and maps every sample of the dataset (a held-out split is
transformed by the model of the fitted one); :func:`write_learned` writes the result as a
``features`` store: ``features(sample, feature)`` float32, ``sample``, the dataset's ``label``
and ``split``, and the fitted model's variables.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import dask.array as da
import numpy as np
import xarray as xr

from dkm._validation import Interval, IntList, problems, validate
from dkm.data.store import rows_per_chunk, write_atomic
from dkm.features.pixels import pixel_matrix

__all__ = [
    "LEARNED_KINDS",
    "LEARNED_RULES",
    "LEARNERS",
    "AutoencoderFeatures",
    "Learned",
    "Learner",
    "PCAFeatures",
    "feature_matrix",
    "learner_from",
    "learner_problems",
    "write_learned",
]

LEARNED_KINDS = ("pca", "autoencoder")
_SEED = [Interval(int, 0, 2**32 - 1)]




@dataclass
class Learned:
    """A fitted learner's output, ready for :func:`write_learned`.

    Attributes
    ----------
    features : dask.array.Array
        ``(sample, n_components)`` float32: every sample of the dataset, lazily.
    model : dict
        The fitted model as variables, ``{name: (dims, values[, attrs])}``.
    attrs : dict
        What the store records of the fit beyond the learner's attrs (e.g. ``n_fit``).
    """

    features: da.Array
    model: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


class _Spec:
    """What both learners share: checked fields, attrs, the store match."""

    kind: ClassVar[str]
    RULES: ClassVar[dict[str, list]]

    def _check(self) -> None:
        validate(
            {name: getattr(self, name) for name in self.RULES}, self.RULES, type(self).__name__
        )

    def attrs(self) -> dict[str, Any]:
        """What a feature store records of this learner (plain JSON values, every field,
        ``"kind"`` first), so a store's attrs say exactly which learner made it."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def recorded_in(self, attrs: Mapping[str, Any]) -> bool:
        """Whether a store's ``attrs`` record this very learner (every field equal)."""
        mine = self.attrs()
        return {key: attrs.get(key) for key in mine} == mine


@dataclass(frozen=True)
class PCAFeatures(_Spec):
    """Principal components of the pixels (dask-ml's PCA, on the cluster).

    Parameters
    ----------
    n_components : int
        Components kept: the length of a feature vector. At most ``min(n_samples,
        n_features)`` of the fitted split.
    whiten : bool, default False
        Divide each component by the square root of its explained variance (unit variance
        on the fitted split).
    seed : int, default 0
        Passed to dask-ml as ``random_state``. The exact SVD dkm asks for draws nothing, so
        the components do not depend on it.
    """

    n_components: int
    whiten: bool = False
    seed: int = 0

    kind: ClassVar[str] = "pca"
    RULES: ClassVar[dict[str, list]] = {
        "n_components": [Interval(int, 1)],
        "whiten": ["boolean"],
        "seed": _SEED,
    }

    def __post_init__(self):
        self._check()
        object.__setattr__(self, "n_components", int(self.n_components))
        object.__setattr__(self, "whiten", bool(self.whiten))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def tag(self) -> str:
        """Names a store: ``pca50``, ``pca50w`` when whitened."""
        return f"pca{self.n_components}" + ("w" if self.whiten else "")

    def data_problems(
        self, n_samples: int, sample_shape: tuple[int, ...], *, images: bool = True
    ) -> list[tuple[str, str]]:
        """Why this PCA cannot be fitted on ``n_samples`` samples of ``sample_shape``, as
        ``(features key, message)`` (empty when it can)."""
        n_features = math.prod(sample_shape)
        if n_samples < 2:
            return [("fit_split", f"PCA needs at least 2 samples to fit, got {n_samples}")]
        most = min(n_samples, n_features)
        if self.n_components > most:
            return [
                (
                    "n_components",
                    f"{self.n_components} > {most} = min(samples, features) of the "
                    f"{n_samples} fitted samples of {n_features} features; choose at most {most}",
                )
            ]
        return []

    def learn(self, ds: xr.Dataset, fit_index: np.ndarray | None) -> Learned:
        """Fit on the samples ``fit_index`` of ``ds`` (None: all) on the cluster and
        transform every sample (lazily).

        The fit runs in float64 on dask-ml's exact SVD (``svd_solver="full"``: a tall-skinny
        QR of the centred matrix, which needs one block along features), so it matches
        scikit-learn's PCA up to the sign of each component.
        """
        from dask_ml.decomposition import PCA

        matrix = feature_matrix(ds).rechunk({1: -1})
        fit = matrix if fit_index is None else matrix[fit_index]
        pca = PCA(
            n_components=self.n_components,
            whiten=self.whiten,
            svd_solver="full",
            random_state=self.seed,
        )
        fit = fit.astype(np.float64)
        pca.fit(fit)
        # dask-ml leaves its mean lazy, under keys of the graph it has just computed (asking
        # for them again confuses the scheduler). The same mean, computed once by a graph of
        # its own, so transforming every sample does not recompute it in every block.
        pca.mean_ = (fit.sum(axis=0) / fit.shape[0]).compute()
        features = pca.transform(matrix).astype(np.float32)
        model = {
            "components": (("component", "pixel"), np.asarray(pca.components_)),
            "mean": (("pixel",), pca.mean_),
            "explained_variance": (("component",), np.asarray(pca.explained_variance_)),
            "explained_variance_ratio": (
                ("component",),
                np.asarray(pca.explained_variance_ratio_),
            ),
            "singular_values": (("component",), np.asarray(pca.singular_values_)),
        }
        attrs = {
            "n_fit": int(fit.shape[0]),
            "n_features_in": int(matrix.shape[1]),
            "noise_variance": float(pca.noise_variance_),
            "svd_solver": "full",
        }
        return Learned(features, model, attrs)


@dataclass(frozen=True)
class AutoencoderFeatures(_Spec):
    """The bottleneck of a convolutional autoencoder (:mod:`dkm.features.autoencoder`).

    Parameters
    ----------
    n_components : int, default 32
        Bottleneck size: the length of a feature vector.
    filters : tuple of int, default (32, 64, 128)
        One stride-2 3x3 convolution per entry on the way down (the mirror on the way up).
    epochs : int, default 10
    batch_size : int, default 256
        Training batch, and the batch the encoder predicts in.
    train_samples : int, optional
        Train on a seeded sample of this many images of the fitted split; None: on all.
    learning_rate : float, default 1e-3
        Adam's step size.
    seed : int, default 0
        Seeds the training sample, the weights and the batch order
        (``keras.utils.set_random_seed``).
    """

    n_components: int = 32
    filters: tuple[int, ...] = (32, 64, 128)
    epochs: int = 10
    batch_size: int = 256
    train_samples: int | None = None
    learning_rate: float = 1e-3
    seed: int = 0

    kind: ClassVar[str] = "autoencoder"
    RULES: ClassVar[dict[str, list]] = {
        "n_components": [Interval(int, 1)],
        "filters": [IntList(1)],
        "epochs": [Interval(int, 1)],
        "batch_size": [Interval(int, 1)],
        "train_samples": [Interval(int, 1), None],
        "learning_rate": [Interval(float, 0, None, closed="neither")],
        "seed": _SEED,
    }

    def __post_init__(self):
        self._check()
        for name in ("n_components", "epochs", "batch_size", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "filters", tuple(int(f) for f in self.filters))
        if self.train_samples is not None:
            object.__setattr__(self, "train_samples", int(self.train_samples))
        object.__setattr__(self, "learning_rate", float(self.learning_rate))

    @property
    def tag(self) -> str:
        """Names a store: ``ae32`` for a bottleneck of 32."""
        return f"ae{self.n_components}"

    def data_problems(
        self, n_samples: int, sample_shape: tuple[int, ...], *, images: bool = True
    ) -> list[tuple[str, str]]:
        """Why this autoencoder cannot be trained on ``n_samples`` samples of
        ``sample_shape``, as ``(features key, message)`` (empty when it can)."""
        if not images or len(sample_shape) not in (2, 3):
            return [("kind", "autoencoder features need images; the dataset holds vectors")]
        if self.train_samples is not None and self.train_samples > n_samples:
            return [
                (
                    "train_samples",
                    f"{self.train_samples} > the {n_samples} samples of the fitted split; "
                    f"choose at most {n_samples}, or null for all of them",
                )
            ]
        return []

    def learn(self, ds: xr.Dataset, fit_index: np.ndarray | None) -> Learned:
        """Train on (a seeded sample of) the images ``fit_index`` of ``ds`` on the client,
        then encode every image on the cluster (lazily)."""
        from dkm.features import autoencoder

        images = ds["images"].data
        fitted = np.arange(images.shape[0]) if fit_index is None else np.asarray(fit_index)
        chosen = fitted
        if self.train_samples is not None and self.train_samples < fitted.size:
            rng = np.random.default_rng(self.seed)
            chosen = np.sort(rng.choice(fitted, size=self.train_samples, replace=False))
        train = autoencoder.as_inputs(np.asarray(images[chosen].compute()))
        model, losses = autoencoder.fit_autoencoder(
            train,
            n_components=self.n_components,
            filters=self.filters,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            seed=self.seed,
        )
        features = autoencoder.encode(images, model, self.n_components, self.batch_size)
        # The .keras bytes as an array: checksummed and verified like every other variable.
        saved = {"format": "keras", "encoder_output": autoencoder.EMBEDDING}
        variables = {
            "model": (("model_byte",), np.frombuffer(model, dtype=np.uint8), saved),
            "loss": (("epoch",), np.asarray(losses)),
        }
        attrs = {
            "n_fit": int(fitted.size),
            "n_train": int(chosen.size),
            "image_shape": [int(s) for s in images.shape[1:]],
            **autoencoder.versions(),
        }
        return Learned(features, variables, attrs)


Learner = PCAFeatures | AutoencoderFeatures
LEARNERS: dict[str, type[PCAFeatures] | type[AutoencoderFeatures]] = {
    "pca": PCAFeatures,
    "autoencoder": AutoencoderFeatures,
}
# The rules of each learned kind's options, for a job's ``features.<key>``.
LEARNED_RULES: dict[str, dict[str, list]] = {kind: cls.RULES for kind, cls in LEARNERS.items()}


def learner_problems(kind: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every problem of a learned kind's ``options``, as ``(key, message)``: unknown keys,
    invalid values (:data:`LEARNED_RULES`) and required keys left out."""
    if kind not in LEARNERS:
        return [("kind", f"must be one of {', '.join(map(repr, LEARNED_KINDS))}, got {kind!r}")]
    cls = LEARNERS[kind]
    found = problems(options, cls.RULES)
    required = [f.name for f in fields(cls) if f.default is MISSING]
    found += [(name, f"required for kind {kind!r}") for name in required if name not in options]
    return found


def learner_from(kind: str, options: Mapping[str, Any]) -> Learner:
    """The learner of ``kind`` (``"pca"`` or ``"autoencoder"``) with ``options``.

    Raises
    ------
    ValueError
        Listing every problem by its job key, e.g. ``features.n_components: must be an
        integer >= 1, got 0``.
    """
    found = learner_problems(kind, options)
    if found:
        raise ValueError("; ".join(f"features.{name}: {message}" for name, message in found))
    return LEARNERS[kind](**options)


def feature_matrix(ds: xr.Dataset) -> da.Array:
    """What a learner is fitted on: every image flattened and scaled as
    :func:`pixel_matrix` does, or a feature dataset's vectors, as float32."""
    if "images" in ds:
        return pixel_matrix(ds["images"]).data
    return ds["features"].data.astype(np.float32)


def write_learned(
    ds: xr.Dataset,
    learned: Learned,
    path: str | os.PathLike,
    *,
    attrs: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write a learned feature store (atomically, kind ``"features"``): the features of
    every sample, the dataset's ``label`` and ``split``, and the fitted model.

    Parameters
    ----------
    ds : xarray.Dataset
        The dataset the features were learned from (its ``label``, ``split`` and ``sample``
        are copied).
    learned : Learned
        What :meth:`PCAFeatures.learn` or :meth:`AutoencoderFeatures.learn` gave.
    path : path-like
        The store.
    attrs : mapping
        The learner's attrs and where the features come from; the fit's own attrs are added.
    overwrite : bool, default False
        Replace a features store (never a store of another kind).
    """
    n, k = (int(s) for s in learned.features.shape)
    rows = rows_per_chunk(4 * k, n)
    data_vars: dict[str, Any] = {
        "features": (("sample", "feature"), learned.features.rechunk({0: rows, 1: -1})),
    }
    for name in ("label", "split"):
        if name in ds:  # the dataset's chunks and encoding are not this store's
            data_vars[name] = ds[name].drop_encoding().chunk({"sample": rows}).variable
    data_vars.update(learned.model)
    sample = ds["sample"].values if "sample" in ds.coords else np.arange(n, dtype=np.int64)
    out = xr.Dataset(
        data_vars,
        coords={"sample": sample},
        attrs={**attrs, **learned.attrs},
    )
    encoding = {
        name: {"chunks": (rows, *out[name].shape[1:])}
        for name in out.variables
        if out[name].dims[:1] == ("sample",)
    }
    return write_atomic(out, path, kind="features", encoding=encoding, overwrite=overwrite)
