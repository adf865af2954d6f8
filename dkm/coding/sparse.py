"""Sparse coding of patches over a dictionary, with scikit-learn's encoders, chunk by chunk.

A dictionary here is k-means centroids ``(k, n_features)``. scikit-learn's encoders
(:func:`sklearn.decomposition.sparse_encode`) assume unit-norm atoms, so every centroid is
divided by its l2 norm first (:func:`unit_atoms`); all-zero centroids (empty clusters) have no
direction and are left out, so no code ever uses them and no NaN appears. A patch's
reconstruction is then ``code @ unit_atoms``.

Codes are stored compactly: per patch the ``width`` largest weights by magnitude and the
dictionary rows they belong to (``codes_index``, ``codes_weight``; index -1 and weight 0 in
unused slots). The width is ``n_nonzero_coefs`` for ``omp`` and ``lars``, which is exact.
For ``lasso_lars``, ``lasso_cd`` and ``threshold`` it is ``min(n_atoms, n_features)``: a
lasso solution of one patch has at most ``n_features`` non-zeros (for atoms in general
position), so the compact code is exact there too; ``threshold`` keeps every atom whose
correlation exceeds ``alpha`` and may have more, in which case the compact code keeps the
largest ones (``codes_nonzero`` tells how many the full code had). Reconstructions made by
:func:`dkm.coding.reconstruct_images` always use the full code.

scikit-learn is imported inside the tasks, not at module import: dkm keeps the import cost of
its worker-side modules low.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import dask.array as da
import numpy as np
import xarray as xr

from dkm._parallel.kernels import Tiles
from dkm._validation import Interval, Options, problems

__all__ = [
    "CODING_METHODS",
    "NORMALIZE",
    "SparseCoding",
    "encode_patches",
    "unit_atoms",
    "unit_rows",
]

CODING_METHODS = ("omp", "lars", "lasso_lars", "lasso_cd", "threshold")
# Which parameter each method takes (the other one must be left unset).
_TAKES = {
    "omp": "n_nonzero_coefs",
    "lars": "n_nonzero_coefs",
    "lasso_lars": "alpha",
    "lasso_cd": "alpha",
    "threshold": "alpha",
}
# Patch scalings a layout may ask for before assignment or encoding.
NORMALIZE = (None, "l2")
# Patches per encoding task at most. scikit-learn encodes patch by patch (measured per patch
# of 36 features, one core: omp 0.14 / 0.47 / 15 ms and lasso_lars 2.4 / 11 / 61 ms at 256 /
# 1024 / 4096 atoms; threshold 0.02-0.05 ms), so blocks this small still take seconds, and
# they keep every worker busy and make a lost task cheap.
CODED_PATCHES_PER_BLOCK = 4096


@dataclass(frozen=True)
class SparseCoding:
    """How patches are encoded over the dictionary (scikit-learn's ``sparse_encode``).

    Parameters
    ----------
    method : {"omp", "lars", "lasso_lars", "lasso_cd", "threshold"}, default "omp"
        The ``algorithm`` of :func:`sklearn.decomposition.sparse_encode`.
    n_nonzero_coefs : int, optional
        Atoms per patch for ``omp`` and ``lars`` (default 2); not used by the others.
    alpha : float, optional
        Penalty of ``lasso_lars`` and ``lasso_cd`` (> 0; scikit-learn divides it by the
        number of features) or the threshold of ``threshold`` (>= 0); default 1.0; not used
        by ``omp`` and ``lars``.
    """

    method: str = "omp"
    n_nonzero_coefs: int | None = None
    alpha: float | None = None

    RULES: ClassVar[dict[str, list]] = {
        "method": [Options(*CODING_METHODS)],
        "n_nonzero_coefs": [Interval(int, 1), None],
        "alpha": [Interval(float, 0), None],
    }
    DEFAULTS: ClassVar[dict[str, Any]] = {"n_nonzero_coefs": 2, "alpha": 1.0}

    def __post_init__(self):
        given = {"method": self.method, "n_nonzero_coefs": self.n_nonzero_coefs}
        found = self.problems({**given, "alpha": self.alpha})
        if found:
            raise ValueError("; ".join(f"sparse coding {name} {msg}" for name, msg in found))
        takes = _TAKES[self.method]
        if getattr(self, takes) is None:
            object.__setattr__(self, takes, self.DEFAULTS[takes])
        if self.n_nonzero_coefs is not None:
            object.__setattr__(self, "n_nonzero_coefs", int(self.n_nonzero_coefs))
        if self.alpha is not None:
            object.__setattr__(self, "alpha", float(self.alpha))

    @classmethod
    def problems(cls, params: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Every problem of a coding mapping as ``(key, message)`` (a job file's check).

        Unknown keys, values that break :attr:`RULES`, a parameter the method does not use,
        and a lasso ``alpha`` of 0 (no penalty: the lasso is then undefined).
        """
        found = problems(params, cls.RULES)
        if found:
            return found
        method = params.get("method", "omp")
        takes = _TAKES[method]
        for name in ("n_nonzero_coefs", "alpha"):
            if params.get(name) is not None and takes != name:
                found.append((name, f"is not used by method {method!r} (it takes {takes})"))
        alpha = params.get("alpha")
        if method.startswith("lasso") and alpha is not None and alpha <= 0:
            found.append(("alpha", f"must be > 0 for method {method!r}, got {alpha!r}"))
        return found

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> SparseCoding:
        """The coding a job file names (``{method: omp, n_nonzero_coefs: 2}``).

        Raises
        ------
        ValueError
            Not a mapping, unknown keys, or invalid values; every problem is named.
        """
        if not isinstance(mapping, Mapping):
            raise ValueError(f"sparse coding must be a mapping, got {type(mapping).__name__}")
        found = cls.problems(mapping)
        if found:
            raise ValueError("; ".join(f"sparse coding {name} {msg}" for name, msg in found))
        return cls(**mapping)

    def to_dict(self) -> dict[str, Any]:
        """The method and the one parameter it takes (what :meth:`from_dict` reads back)."""
        takes = _TAKES[self.method]
        return {"method": self.method, takes: getattr(self, takes)}

    @property
    def tag(self) -> str:
        """A short name: ``omp-n2``, ``lasso_lars-a0.1``."""
        if _TAKES[self.method] == "n_nonzero_coefs":
            return f"{self.method}-n{self.n_nonzero_coefs}"
        return f"{self.method}-a{self.alpha:g}"

    def width(self, n_atoms: int, n_features: int) -> int:
        """Slots per patch of the compact codes (see the module docstring)."""
        if _TAKES[self.method] == "n_nonzero_coefs":
            return int(self.n_nonzero_coefs)
        return int(min(n_atoms, n_features))

    def dictionary_problems(self, n_atoms: int, n_features: int) -> list[str]:
        """Why this coding cannot use ``n_atoms`` unit atoms of ``n_features`` (empty if ok)."""
        if n_atoms == 0:
            return ["the dictionary has no non-zero atom to code with"]
        if _TAKES[self.method] == "n_nonzero_coefs":
            most = min(n_atoms, n_features)
            if self.n_nonzero_coefs > most:
                return [
                    f"sparse coding n_nonzero_coefs={self.n_nonzero_coefs} is more than "
                    f"min(non-zero atoms, features) = min({n_atoms}, {n_features}) = {most}"
                ]
        return []

    def _sklearn_kwargs(self) -> dict[str, Any]:
        if _TAKES[self.method] == "n_nonzero_coefs":
            return {"algorithm": self.method, "n_nonzero_coefs": self.n_nonzero_coefs}
        return {"algorithm": self.method, "alpha": self.alpha}


def unit_atoms(dictionary: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The dictionary's non-zero rows divided by their l2 norm, and which rows they are.

    Returns
    -------
    atoms : ndarray, ``(n_kept, n_features)`` in ``dtype``
    kept : ndarray of int32, ``(n_kept,)``, rows of ``dictionary`` the atoms come from
    """
    d = np.asarray(dictionary, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", d, d))
    kept = np.flatnonzero(norms > 0).astype(np.int32)
    return (d[kept] / norms[kept, None]).astype(dtype), kept


def unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows divided by their l2 norm (all-zero rows stay zero) and the norms (``l2`` scaling)."""
    # The same float operations as extract_patches' own scaling, so that a window here and
    # the stored patch it matches are the same vector.
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    return x / np.where(norms > 0, norms, x.dtype.type(1))[:, None], norms


def check_normalize(normalize: Any) -> str | None:
    """The patch scaling, checked: None (none) or ``"l2"``."""
    if normalize in (None, "none"):
        return None
    if normalize == "l2":
        return "l2"
    raise ValueError(f"normalize must be None or 'l2', got {normalize!r}")


def code_tiles(
    x: np.ndarray, atoms: np.ndarray, coding: SparseCoding, tiles: Tiles
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Dense codes of the rows of ``x`` over unit ``atoms``, a tile of rows at a time.

    Yields ``(rows, codes)``: indices into ``x`` and their ``(len(rows), n_atoms)`` codes,
    exactly what ``sparse_encode(x[rows], atoms, ...)`` gives. A tile holds ``rows x
    n_atoms`` correlations and codes, sized like a distance tile (``dkm.kernels.tile-bytes``)
    so that a block of many patches over 16384 atoms stays small; each row's code does not
    depend on the others, so the tiling does not change it. All-zero rows are not encoded:
    their code is zero for every method (and ``omp`` would only warn about them).
    """
    from sklearn.decomposition import sparse_encode

    x = np.ascontiguousarray(x)
    # The Gram matrix as sparse_encode computes it, once per block rather than per tile.
    gram = None if coding.method == "threshold" else np.dot(atoms, atoms.T).astype(x.dtype)
    live = np.flatnonzero(x.any(axis=1))
    step = tiles.rows(atoms.shape[0], 8)
    with warnings.catch_warnings():
        # A patch that an atom matches exactly leaves no residual: OMP stops early and
        # warns, but the code is the exact fit.
        warnings.filterwarnings("ignore", message="Orthogonal matching pursuit ended prematurely")
        for s in range(0, live.size, step):
            rows = live[s : s + step]
            codes = sparse_encode(x[rows], atoms, gram=gram, n_jobs=1, **coding._sklearn_kwargs())
            yield rows, codes


def compact(codes: np.ndarray, kept: np.ndarray, width: int):
    """The ``width`` largest weights of each row by magnitude, largest first.

    Returns ``index`` (int32, dictionary rows; -1 in unused slots), ``weight`` (float32, 0 in
    unused slots) and ``count`` (int32, non-zeros of the full code).
    """
    m, k = codes.shape
    mag = np.abs(codes)
    if width < k:
        top = np.argpartition(-mag, width - 1, axis=1)[:, :width]
    else:
        top = np.broadcast_to(np.arange(k), (m, k))
    order = np.argsort(-np.take_along_axis(mag, top, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    weight = np.take_along_axis(codes, top, axis=1)
    used = weight != 0
    index = np.where(used, kept[top], -1).astype(np.int32)
    if width > k:  # fewer atoms than slots: pad
        index = np.pad(index, ((0, 0), (0, width - k)), constant_values=-1)
        weight = np.pad(weight, ((0, 0), (0, width - k)))
    count = np.count_nonzero(codes, axis=1).astype(np.int32)
    return index, np.where(used, weight, 0).astype(np.float32), count


def _encode_block(
    x: np.ndarray,
    atoms: np.ndarray,
    kept: np.ndarray,
    coding: SparseCoding,
    width: int,
    normalize: str | None,
    tiles: Tiles,
) -> np.ndarray:
    """Compact codes of one patch block as one float64 array ``(n, 2 * width + 1)``:
    indices, weights, full non-zero count (one task, one result; split lazily after)."""
    x = np.asarray(x, dtype=np.float32)
    norms = None
    if normalize == "l2":
        x, norms = unit_rows(x)
    out = np.zeros((x.shape[0], 2 * width + 1), dtype=np.float64)
    out[:, :width] = -1
    for rows, codes in code_tiles(x, atoms, coding, tiles):
        index, weight, count = compact(codes, kept, width)
        if norms is not None:  # weights of the patch itself, not of its unit vector
            weight = weight * norms[rows, None]
        out[rows, :width] = index
        out[rows, width : 2 * width] = weight
        out[rows, -1] = count
    return out


def _as_patch_array(patches: Any) -> tuple[da.Array, dict[str, Any]]:
    if isinstance(patches, xr.DataArray):
        coords = {
            name: ("patch", patches.coords[name].data)
            for name in ("image", "row", "col")
            if name in patches.coords and patches.coords[name].dims == (patches.dims[0],)
        }
        data = patches.data
    else:
        coords, data = {}, patches
    if not isinstance(data, da.Array):
        data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"patches must be (patch, feature), got {data.ndim}-D")
    if not np.issubdtype(data.dtype, np.floating):
        raise ValueError(f"patches must be float vectors, got {data.dtype}")
    if not isinstance(data, da.Array):
        data = da.from_array(data, chunks=(max(1, len(data)), -1))
    if data.shape[0] and max(data.chunks[0]) > CODED_PATCHES_PER_BLOCK:
        return data.rechunk({0: CODED_PATCHES_PER_BLOCK, 1: -1}), coords
    return data.rechunk({1: -1}), coords


def encode_patches(
    patches: xr.DataArray | da.Array | np.ndarray,
    dictionary: np.ndarray,
    coding: SparseCoding,
    *,
    normalize: str | None = None,
) -> xr.Dataset:
    """Sparse codes of every patch over the dictionary, lazily, chunk by chunk on the cluster.

    Parameters
    ----------
    patches : DataArray, dask array or ndarray
        ``(patch, feature)`` float patch vectors (as :func:`dkm.extract_patches` makes them).
        Chunks of more than :data:`CODED_PATCHES_PER_BLOCK` patches are split (encoding is
        slow, see there).
    dictionary : ndarray
        ``(k, n_features)``, e.g. k-means centroids; rows are scaled to unit norm and
        all-zero rows left out (see :func:`unit_atoms`).
    coding : SparseCoding
        Method and its parameter.
    normalize : {None, "l2"}, default None
        ``"l2"``: encode each patch's unit vector and scale its weights back by the patch's
        norm, so ``codes @ unit_atoms`` is the patch's reconstruction either way.

    Returns
    -------
    xarray.Dataset
        ``codes_index(patch, nonzero)`` int32 (dictionary rows, -1 in unused slots),
        ``codes_weight(patch, nonzero)`` float32 (0 in unused slots), ``codes_nonzero(patch)``
        int32 (non-zeros of the full code; more than the width only for ``threshold``), the
        patches' ``image``/``row``/``col`` coordinates when given, and the coding in attrs.

    Raises
    ------
    ValueError
        Before any compute: wrong shapes, a dictionary width other than the patches', a
        non-finite dictionary, or a coding the dictionary cannot support.
    """
    if not isinstance(coding, SparseCoding):
        raise ValueError(f"coding must be a SparseCoding, got {type(coding).__name__}")
    normalize = check_normalize(normalize)
    data, coords = _as_patch_array(patches)
    atoms, kept = checked_atoms(dictionary, data.shape[1], coding, what="patches have")
    width = coding.width(len(kept), data.shape[1])
    packed = da.map_blocks(
        _encode_block,
        data,
        atoms,
        kept,
        coding,
        width,
        normalize,
        Tiles.from_config(),
        chunks=(data.chunks[0], (2 * width + 1,)),
        dtype=np.float64,
        token=f"dkm-encode-{coding.tag}",
    )
    dims = ("patch", "nonzero")
    return xr.Dataset(
        {
            "codes_index": (dims, packed[:, :width].astype(np.int32)),
            "codes_weight": (dims, packed[:, width : 2 * width].astype(np.float32)),
            "codes_nonzero": (("patch",), packed[:, -1].astype(np.int32)),
        },
        coords=coords,
        attrs={
            "coding": coding.tag,
            **{f"coding_{k}": v for k, v in coding.to_dict().items()},
            "n_atoms": int(np.asarray(dictionary).shape[0]),
            "n_unit_atoms": len(kept),
            "normalize": normalize or "none",
        },
    )


def checked_dictionary(dictionary: Any, n_features: int, what: str) -> np.ndarray:
    """The dictionary as a 2-D finite float array of ``n_features`` columns, or ValueError."""
    d = np.asarray(dictionary)
    if d.ndim != 2 or d.shape[0] == 0:
        raise ValueError(f"dictionary must be a non-empty (k, n_features) array, got {d.shape}")
    if not np.issubdtype(d.dtype, np.number) or np.issubdtype(d.dtype, np.complexfloating):
        raise ValueError(f"dictionary must be real numbers, got {d.dtype}")
    if d.shape[1] != n_features:
        raise ValueError(
            f"dictionary has {d.shape[1]} features per atom but the {what} {n_features} "
            f"(patch size * size * channels)"
        )
    if not np.all(np.isfinite(d)):
        raise ValueError("dictionary holds NaN or infinite values")
    return d


def checked_atoms(
    dictionary: Any, n_features: int, coding: SparseCoding, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`unit_atoms` of a checked dictionary that ``coding`` can use, or ValueError."""
    atoms, kept = unit_atoms(checked_dictionary(dictionary, n_features, what))
    found = coding.dictionary_problems(len(kept), n_features)
    if found:
        raise ValueError(found[0])
    return atoms, kept
