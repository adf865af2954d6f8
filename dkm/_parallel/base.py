"""What every dkm estimator shares: parameter rules, input coercion, per-chunk application of
a fitted model, pickling, and the one fit-state object for callbacks, checkpoints and resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import dask.array as da
import numpy as np
import xarray as xr
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state

from dkm import config
from dkm._parallel.blocks import Source, as_source
from dkm._validation import Rules, validate

__all__ = ["FitState", "ParallelEstimator", "history_dataset"]


def history_dataset(history: Mapping[str, list]) -> xr.Dataset:
    """Per-iteration lists as a Dataset over a 1-based ``iteration`` coordinate."""
    n = min((len(v) for v in history.values()), default=0)
    return xr.Dataset(
        {key: ("iteration", np.asarray(v[:n])) for key, v in history.items()},
        coords={"iteration": np.arange(1, n + 1)},
    )


@dataclass
class FitState:
    """Where a fit stands: what a callback receives and what ``resume_from`` takes back.

    A fit of ``n_init`` starts runs them one after another; the state names the current
    start, how far it got, the model parameters at that point, and the best start finished so
    far (itself a FitState whose ``info`` holds its objective). Everything is plain numpy,
    JSON-able dicts and an xarray Dataset, so a results store can write it as a checkpoint.

    Parameters
    ----------
    start : int
        Index of the current start (0-based, ``< n_init``).
    iteration : int
        Iterations finished in the current start (0: initialised, not yet iterated).
    params : dict of str to ndarray
        Model parameters in the coordinates the fit runs in (for k-means: ``centers``, and
        ``previous_centers`` whose assignment gave the last labels).
    history : xarray.Dataset
        Per-iteration record of the current start so far.
    info : dict
        JSON-able extras the algorithm needs to continue exactly (seed, initialisation
        details, ``stopped`` once the start has finished, its objective...).
    best : FitState, optional
        The best finished start so far (None before the first one finishes).
    """

    start: int
    iteration: int
    params: dict[str, np.ndarray]
    history: xr.Dataset
    info: dict[str, Any] = field(default_factory=dict)
    best: FitState | None = None

    def copy(self) -> FitState:
        """A snapshot that later iterations of the fit cannot change."""
        return replace(
            self,
            params={k: np.array(v, copy=True) for k, v in self.params.items()},
            history=self.history.copy(deep=True),
            info=dict(self.info),
        )

    def check(self, n_init: int, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse a state that cannot belong to this fit (wrong start or parameter shapes)."""
        if not 0 <= self.start < n_init:
            raise ValueError(f"resume_from is at start {self.start}, but n_init={n_init}")
        for state in (self, self.best):
            if state is None:
                continue
            for name, shape in shapes.items():
                value = state.params.get(name)
                if value is None or tuple(np.shape(value)) != tuple(shape):
                    got = None if value is None else tuple(np.shape(value))
                    raise ValueError(f"resume_from: {name} has shape {got}, expected {shape}")
                if not np.isfinite(value).all():
                    raise ValueError(f"resume_from: {name} contains NaN or infinity")


class ParallelEstimator(BaseEstimator):
    """Base of the dkm estimators (scikit-learn conventions, dask underneath).

    Subclasses declare ``_param_rules`` (see :mod:`dkm._validation`) once; :meth:`fit`
    starts with :meth:`_validate_params`, and job files are checked against the same table.
    """

    _param_rules: ClassVar[Rules] = {}

    @classmethod
    def param_rules(cls) -> Rules:
        """The rules every constructor parameter must satisfy."""
        return cls._param_rules

    @classmethod
    def joint_problems(cls, params: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Problems between parameters that each pass their own rule, as ``(name,
        message)``; job files ask this too, so they fail before anything runs."""
        return []

    def _validate_params(self) -> None:
        validate(self.get_params(deep=False), self._param_rules, type(self).__name__)

    def _source(self, X: Any) -> Source:
        return as_source(X, dtype=self.dtype, variable=getattr(self, "variable", None))

    def _check_fitted_input(self, src: Source) -> None:
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "n_features_in_")
        if src.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {src.shape[1]} features, but {type(self).__name__} was fitted with "
                f"{self.n_features_in_}"
            )

    def _map_rows(
        self,
        X: Any,
        fn: Callable[..., np.ndarray],
        args: tuple,
        *,
        out_cols: int | None,
        dtype,
        per_chunk: bool = False,
    ):
        """Apply ``fn(rows, *args)`` to every row chunk of ``X`` with the fitted model.

        numpy input is processed here in row pieces (no graph that would embed the array);
        dask / xarray / Zarr input gives a lazy dask array over the input's chunks.
        ``out_cols`` None means one value per row; ``per_chunk`` one value per chunk.
        """
        src = self._source(X)
        self._check_fitted_input(src)
        if isinstance(src.array, np.ndarray):
            arr = src.array
            piece = config.get_bytes("kernels.predict-chunk-bytes")
            step = max(1, piece // max(1, arr.shape[1] * arr.itemsize))
            return np.concatenate([fn(arr[s : s + step], *args) for s in range(0, len(arr), step)])
        dsk = src.as_dask()
        if per_chunk:
            chunks = ((1,) * dsk.numblocks[0],)
            return dsk.map_blocks(fn, *args, drop_axis=1, chunks=chunks, dtype=dtype)
        if out_cols is None:
            return dsk.map_blocks(fn, *args, drop_axis=1, dtype=dtype)
        return dsk.map_blocks(fn, *args, chunks=(dsk.chunks[0], (out_cols,)), dtype=dtype)

    def _sum_rows(self, X: Any, fn: Callable[..., np.ndarray], args: tuple) -> float:
        """The sum over the row chunks of ``X`` of ``fn(rows, *args)`` (one float64 each),
        computed."""
        parts = self._map_rows(X, fn, args, out_cols=None, dtype=np.float64, per_chunk=True)
        if hasattr(parts, "compute"):
            parts = parts.compute()
        return float(np.sum(parts))

    def _draw_seeds(self, n: int) -> list[int]:
        """The seed of each start, drawn up front so a resumed fit uses the same ones."""
        rs = check_random_state(self.random_state)
        return [int(rs.randint(np.iinfo(np.int32).max)) for _ in range(n)]

    def __getstate__(self):
        # labels_ may hold futures of blocks on a cluster; pickle their values instead so
        # that a fitted estimator can be saved (dask-ml #460).
        state = self.__dict__.copy()
        labels = state.get("labels_")
        if isinstance(labels, da.Array):
            state["labels_"] = np.asarray(labels.compute())
            state["_labels_chunks"] = labels.chunks
        return state

    def __setstate__(self, state):
        chunks = state.pop("_labels_chunks", None)
        if chunks is not None:
            state["labels_"] = da.from_array(state["labels_"], chunks=chunks)
        self.__dict__.update(state)
