"""Sparse coding of patches over a dictionary, chunk by chunk: a batched OMP kernel and
scikit-learn's other encoders.

A dictionary here is k-means centroids ``(k, n_features)``. The encoders (those of
:func:`sklearn.decomposition.sparse_encode`) assume unit-norm atoms, so every centroid is
divided by its l2 norm first (:func:`unit_atoms`); all-zero centroids (empty clusters) have no
direction and are left out, so no code ever uses them and no NaN appears. A patch's
reconstruction is then ``code @ unit_atoms``.

``omp`` runs :func:`omp_codes`, scikit-learn's algorithm vectorised over every patch of a
block (scikit-learn copies the ``k x k`` Gram matrix for every patch: measured on two cores,
about 15 minutes for the 69k non-empty 5x5 patches of mnist-5k at k = 4096 and an
estimated 9 hours at 16384, against 3 and 4 seconds batched); the other methods run
``sparse_encode`` itself.

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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import dask.array as da
import numpy as np
import xarray as xr
from scipy import sparse as sp

from dkm import config
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


def coded_patches_per_block() -> int:
    """Patches per encoding task at most (``dkm.coding.patches-per-block``).

    scikit-learn encodes patch by patch (milliseconds per patch at 1024 atoms and more, see
    SparseCoding), so blocks this small still take seconds, and they keep every worker busy
    and make a lost task cheap. The batched OMP takes 0.1-0.3 s per 4096 patches even at
    16384 atoms.
    """
    return int(config.get("coding.patches-per-block"))

# Atoms per correlation tile of the batched OMP: wide enough for an efficient GEMM, narrow
# enough that a tile of the minimum 256 rows stays about ``dkm.kernels.tile-bytes``.
_ATOMS_PER_TILE = 2048


@dataclass(frozen=True)
class SparseCoding:
    """How patches are encoded over the dictionary (the methods of ``sparse_encode``).

    Every method gives the codes :func:`sklearn.decomposition.sparse_encode` gives (``omp``:
    the same atoms but where two correlations tie within float32 rounding, the weights to
    float32 rounding). ``omp``
    runs the batched kernel :func:`omp_codes` and ``threshold`` is one product: both are fast
    at any dictionary size. ``lars``, ``lasso_lars`` and ``lasso_cd`` run scikit-learn patch
    by patch over the ``k x k`` Gram matrix of the atoms (computed once per block, but
    scikit-learn's LARS copies it for every patch): practical up to about a thousand atoms,
    slow at 4096, and at 16384 the Gram matrix alone is 1 GiB per task. Measured per patch
    (25 features, MNIST 5x5 patches, random-patch dictionaries, one core of a shared
    machine), at 256 / 1024 / 4096 / 16384 atoms:

    ==============  ======  ======  ======  ======
    method          256     1024    4096    16384
    ==============  ======  ======  ======  ======
    omp (n=2)       1 us    3 us    10 us   35 us
    omp (n=4)       2 us    6 us    19 us   62 us
    threshold       6 us    12 us   32 us
    lars (n=2)      0.2 ms  3 ms    18 ms
    lasso_lars      0.8 ms  4 ms    19 ms
    lasso_cd        1.3 ms  5 ms    28 ms
    ==============  ======  ======  ======  ======

    (scikit-learn's own ``omp``, which this replaces: about 0.2 / 0.5 / 15 / 250 ms.)

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
) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
    """Codes of the rows of ``x`` over unit ``atoms``, a tile of rows at a time.

    Yields ``(rows, codes)``: indices into ``x`` and their codes as a ``(len(rows),
    n_atoms)`` CSR matrix holding the non-zeros only, what ``sparse_encode(x[rows], atoms,
    ...)`` gives. ``omp`` runs :func:`omp_codes` on up to ``dkm.coding.patches-per-block``
    rows at once; the other methods run scikit-learn on tiles of ``rows x n_atoms`` dense
    codes sized like a distance tile (``dkm.kernels.tile-bytes``), so that a block over
    16384 atoms stays small. Each row's code does not depend on the others, so the tiling
    does not change it. All-zero rows are not encoded: their code is zero for every method
    (and scikit-learn's ``omp`` would only warn about them).
    """
    x = np.ascontiguousarray(x)
    live = np.flatnonzero(x.any(axis=1))
    if coding.method == "omp":
        step = coded_patches_per_block()
        for s in range(0, live.size, step):
            rows = live[s : s + step]
            yield rows, omp_codes(x[rows], atoms, coding.n_nonzero_coefs, tiles)
        return
    from sklearn.decomposition import sparse_encode

    # The Gram matrix as sparse_encode computes it, once per block rather than per tile.
    gram = None if coding.method == "threshold" else np.dot(atoms, atoms.T).astype(x.dtype)
    step = tiles.rows(atoms.shape[0], 8)
    for s in range(0, live.size, step):
        rows = live[s : s + step]
        codes = sparse_encode(x[rows], atoms, gram=gram, n_jobs=1, **coding._sklearn_kwargs())
        yield rows, sp.csr_matrix(codes)


def best_atoms(r: np.ndarray, atoms: np.ndarray, tiles: Tiles) -> tuple[np.ndarray, np.ndarray]:
    """The atom of largest ``|correlation|`` with each row of ``r``, and that magnitude.

    Tile by tile: ``rows x atoms`` correlations of at most ``dkm.kernels.tile-bytes`` (one
    GEMM each, into a buffer reused for every tile, see
    :func:`dkm._parallel.kernels.nearest_tiles`), so 16384 atoms never make a ``patches x
    k`` matrix. Ties go to the lowest atom index, like a single ``argmax``.
    """
    m, k = r.shape[0], atoms.shape[0]
    width = min(k, _ATOMS_PER_TILE)
    step = tiles.rows(width, r.itemsize)
    pieces = [np.ascontiguousarray(atoms[a : a + width].T) for a in range(0, k, width)]
    corr = np.empty((min(step, m), width), dtype=np.result_type(r, atoms))
    best = np.zeros(m, dtype=np.intp)
    top = np.full(m, -1.0, dtype=corr.dtype)
    for s in range(0, m, step):
        rt = r[s : s + step]
        n = len(rt)
        at = np.arange(n)
        for a, piece in zip(range(0, k, width), pieces, strict=True):
            c = np.matmul(rt, piece, out=corr[:n, : piece.shape[1]])
            np.abs(c, out=c)
            j = np.argmax(c, axis=1)
            mag = c[at, j]
            better = mag > top[s : s + n]  # strict: an earlier tile wins a tie
            best[s : s + n][better] = a + j[better]
            top[s : s + n][better] = mag[better]
    return best, top


def omp_codes(
    x: np.ndarray, atoms: np.ndarray, n_nonzero_coefs: int, tiles: Tiles
) -> sp.csr_matrix:
    """Orthogonal matching pursuit of every row of ``x`` at once, as scikit-learn does it.

    The steps of scikit-learn's ``orthogonal_mp_gram`` (what ``sparse_encode(...,
    algorithm="omp")`` runs, one patch at a time, copying the ``k x k`` Gram matrix for each),
    vectorised over the rows: each step picks for every row the atom of largest
    ``|correlation|`` with its residual (:func:`best_atoms`), extends the row's Cholesky
    factor of the chosen atoms' Gram matrix by one row, solves the least-squares weights
    from it and updates the residual. Only the chosen atoms' Gram entries are ever computed.
    A row stops early where scikit-learn's does (it warns there, this does not): when the
    best correlation is below ``sqrt(eps)`` of the patches' dtype (the residual is spent),
    when the best atom is one already chosen, or when the new atom is linearly dependent on
    the chosen ones (the Cholesky pivot is below ``eps``). The weights are solved in float64
    (scikit-learn: in the patches' dtype), so they agree with scikit-learn's to the
    latter's rounding. The correlations come from the residual (scikit-learn updates them
    through the Gram matrix: the same numbers up to rounding), so only atoms whose
    correlations tie within float32 rounding may be picked differently; exact ties go to the
    lowest atom index (scikit-learn's to the lowest in its swapped order).

    Parameters
    ----------
    x : ndarray, ``(m, n_features)``
        Non-zero patches (float32 or float64).
    atoms : ndarray, ``(k, n_features)``
        Unit-norm atoms.
    n_nonzero_coefs : int
        Steps at most (atoms per patch).
    tiles : Tiles
        Size of the correlation tiles.

    Returns
    -------
    scipy.sp.csr_matrix
        ``(m, k)`` float64 codes.
    """
    m, n = x.shape[0], int(n_nonzero_coefs)
    eps = np.finfo(x.dtype).eps  # scikit-learn's, of its Gram matrix in the patches' dtype
    a64 = np.asarray(atoms, dtype=np.float64)
    x64 = np.asarray(x, dtype=np.float64)
    chosen = np.zeros((m, n), dtype=np.intp)
    chol = np.zeros((m, n, n))  # lower Cholesky factor of the chosen atoms' Gram matrix
    xy = np.zeros((m, n))  # correlations of the patch with the chosen atoms
    gamma = np.zeros((m, n))
    used = np.zeros(m, dtype=np.intp)  # atoms chosen per row
    live = np.arange(m)  # rows still being extended
    residual = np.array(x, dtype=atoms.dtype)
    for t in range(n):
        lam, top = best_atoms(residual, atoms, tiles)
        go = top.astype(np.float64) ** 2 >= eps
        if t:
            go &= ~(chosen[live, :t] == lam[:, None]).any(axis=1)
        g = a64[lam]
        pivot = np.einsum("ij,ij->i", g, g)
        if t:  # the new row of the Cholesky factor: L v = G[chosen, lam]
            v = _forward(chol[live, :t, :t], np.einsum("itj,ij->it", a64[chosen[live, :t]], g))
            pivot = pivot - np.einsum("it,it->i", v, v)
            go &= pivot > eps
        live, lam, g, pivot = live[go], lam[go], g[go], pivot[go]
        if t:
            chol[live, t, :t] = v[go]
        chol[live, t, t] = np.sqrt(pivot)
        chosen[live, t] = lam
        xy[live, t] = np.einsum("ij,ij->i", x64[live], g)
        used[live] = t + 1
        lower = chol[live, : t + 1, : t + 1]
        gamma[live, : t + 1] = _backward(lower, _forward(lower, xy[live, : t + 1]))
        if t + 1 < n:
            fit = np.einsum("it,itj->ij", gamma[live, : t + 1], a64[chosen[live, : t + 1]])
            residual = (x64[live] - fit).astype(atoms.dtype)
    slots = np.arange(n) < used[:, None]
    slots &= gamma != 0
    indptr = np.concatenate([[0], np.cumsum(slots.sum(axis=1))])
    return sp.csr_matrix((gamma[slots], chosen[slots], indptr), shape=(m, atoms.shape[0]))


def _forward(lower: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``L y = b`` for a batch of lower-triangular ``L`` ``(m, t, t)``, ``b`` ``(m, t)``."""
    y = np.empty_like(b)
    for i in range(b.shape[1]):
        y[:, i] = (b[:, i] - np.einsum("ij,ij->i", lower[:, i, :i], y[:, :i])) / lower[:, i, i]
    return y


def _backward(lower: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``L^T y = b`` for a batch of lower-triangular ``L`` ``(m, t, t)``."""
    y = np.empty_like(b)
    for i in range(b.shape[1] - 1, -1, -1):
        rest = np.einsum("ij,ij->i", lower[:, i + 1 :, i], y[:, i + 1 :])
        y[:, i] = (b[:, i] - rest) / lower[:, i, i]
    return y


def compact(codes: sp.csr_matrix, kept: np.ndarray, width: int):
    """The ``width`` largest weights of each row by magnitude, largest first.

    ``codes`` holds rows of codes over the unit atoms (:func:`code_tiles`). Returns ``index``
    (int32, dictionary rows; -1 in unused slots), ``weight`` (float32, 0 in unused slots) and
    ``count`` (int32, non-zeros of the full code).
    """
    codes = sp.csr_matrix(codes)
    codes.eliminate_zeros()
    m = codes.shape[0]
    count = np.diff(codes.indptr).astype(np.int32)
    # The non-zeros of each row side by side, padded to the longest row (magnitude -1).
    most = max(width, int(count.max(initial=0)))
    row = np.repeat(np.arange(m), count)
    slot = np.arange(codes.nnz) - codes.indptr[row]
    index = np.full((m, most), -1, dtype=np.intp)
    weight = np.zeros((m, most), dtype=np.float64)
    index[row, slot] = codes.indices
    weight[row, slot] = codes.data
    mag = np.where(index >= 0, np.abs(weight), -1.0)
    if most > width:
        top = np.argpartition(-mag, width - 1, axis=1)[:, :width]
    else:
        top = np.broadcast_to(np.arange(most), (m, most))
    order = np.argsort(-np.take_along_axis(mag, top, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    index = np.take_along_axis(index, top, axis=1)
    weight = np.take_along_axis(weight, top, axis=1)
    used = index >= 0
    index = np.where(used, kept[np.maximum(index, 0)], -1).astype(np.int32)
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
    most = coded_patches_per_block()
    if data.shape[0] and max(data.chunks[0]) > most:
        return data.rechunk({0: most, 1: -1}), coords
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
        Chunks of more than ``dkm.coding.patches-per-block`` patches are split (encoding is
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
