"""Readers for the file formats datasets ship in: IDX, CIFAR python batches, image folders, npz.

Each reader returns plain numpy arrays exactly as shipped (uint8 pixels) and raises
:class:`DataFormatError` with a message that names the file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DataFormatError",
    "ImageFolder",
    "read_cifar_batches",
    "read_idx",
    "read_image_folder",
    "read_npz",
]

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".gif", ".tif", ".tiff", ".pgm", ".ppm")


class DataFormatError(ValueError):
    """A data file is missing, truncated or not in the format it claims to be."""


def _reason(err: BaseException, limit: int = 200) -> str:
    """An underlying error in one short line (tarfile, PIL and pickle can be chatty)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_maybe_gzip(path: Path) -> bytes:
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataFormatError(f"{path}: corrupt or truncated gzip stream ({_reason(err)})") from err


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzipped or not.

    Parameters
    ----------
    path : str or Path
        The file. Gzip compression is detected from its first two bytes, not its name.

    Returns
    -------
    numpy.ndarray
        The array with the shape its header declares, in native byte order
        (uint8 for image and label files).

    Raises
    ------
    DataFormatError
        Missing file, wrong magic number, unknown type code, or fewer (or more) bytes of
        data than the header declares.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataFormatError(
            f"{path}: not an IDX file (magic number {raw[:4].hex() or 'empty'}, "
            "expected 0x0000 followed by a type code and a dimension count)"
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise DataFormatError(f"{path}: unknown IDX type code 0x{type_code:02x}")
    if ndim == 0:
        raise DataFormatError(f"{path}: IDX header declares zero dimensions")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DataFormatError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header_end
    if got < expected:
        raise DataFormatError(
            f"{path}: truncated: header declares shape {shape} ({expected} bytes of data) "
            f"but the file holds {got}"
        )
    if got > expected:
        raise DataFormatError(
            f"{path}: {got - expected} bytes of trailing data after shape {shape}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


def _unpickle_batch(name: str, payload: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = pickle.loads(payload, encoding="bytes")
    except Exception as err:  # pickle raises many types on garbage input
        raise DataFormatError(f"{name}: not a CIFAR python batch ({_reason(err)})") from err
    if not isinstance(batch, dict):
        raise DataFormatError(f"{name}: not a CIFAR python batch (no dictionary inside)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = {"data", "labels"} - batch.keys()
    if missing:
        raise DataFormatError(f"{name}: CIFAR batch lacks {sorted(missing)}")
    try:
        data = np.asarray(batch["data"])
        labels = np.asarray(batch["labels"])
    except (ValueError, TypeError) as err:  # ragged or exotic contents
        raise DataFormatError(
            f"{name}: CIFAR batch 'data'/'labels' are not arrays ({_reason(err)})"
        ) from err
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataFormatError(
            f"{name}: 'labels' must be a list of integers, got {labels.dtype} {labels.shape}"
        )
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DataFormatError(
            f"{name}: data has shape {data.shape} for {labels.shape[0]} labels, expected (n, 3072)"
        )
    if data.dtype.kind not in "iu":
        raise DataFormatError(f"{name}: data must hold uint8 pixel values, got {data.dtype}")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DataFormatError(
            f"{name}: data must hold pixel values 0..255, got {data.min()}..{data.max()}"
        )
    labels = labels.astype(np.int64)
    # Rows are 1024 red, then green, then blue values, each a row-major 32x32 plane.
    images = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _cifar_members(source: Path) -> dict[str, bytes]:
    wanted = (*_CIFAR_TRAIN, _CIFAR_TEST)
    if source.is_dir():
        found = {}
        for root in (source, source / "cifar-10-batches-py"):
            for name in wanted:
                if (root / name).is_file() and name not in found:
                    found[name] = (root / name).read_bytes()
        return found
    if source.is_file():
        try:
            with tarfile.open(source, "r:*") as tar:
                found = {}
                for member in tar.getmembers():
                    base = member.name.rsplit("/", 1)[-1]
                    if base in wanted and member.isfile():
                        found[base] = tar.extractfile(member).read()
                return found
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DataFormatError(f"{source}: not a readable tar archive ({_reason(err)})") from err
    raise DataFormatError(f"{source}: no such file or directory")


def read_cifar_batches(source: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read CIFAR-10 in its "python version" batch format.

    Parameters
    ----------
    source : str or Path
        A directory holding ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (directly
        or in ``cifar-10-batches-py/``), or the ``.tar.gz`` archive they ship in.

    Returns
    -------
    images : numpy.ndarray
        ``(n, 32, 32, 3)`` uint8, training batches first, then the test batch.
    labels : numpy.ndarray
        ``(n,)`` int64 class indices.
    split : numpy.ndarray
        ``(n,)`` strings ``"train"`` / ``"test"``.
    """
    source = Path(source)
    members = _cifar_members(source)
    missing = [n for n in (*_CIFAR_TRAIN, _CIFAR_TEST) if n not in members]
    if missing:
        raise DataFormatError(f"{source}: CIFAR-10 batches missing: {', '.join(missing)}")
    parts = [_unpickle_batch(f"{source}:{n}", members[n]) for n in (*_CIFAR_TRAIN, _CIFAR_TEST)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    n_test = parts[-1][0].shape[0]
    split = np.array(["train"] * (images.shape[0] - n_test) + ["test"] * n_test)
    return images, labels, split


@dataclass(frozen=True)
class ImageFolder:
    """Images read from a folder: pixels, labels (or None) and the label names."""

    images: np.ndarray
    labels: np.ndarray | None
    label_names: tuple[str, ...]
    files: tuple[str, ...]


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _load_image(path: Path, grayscale: bool, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if grayscale else "RGB")
            if size is not None:
                # PIL takes (width, height); dkm speaks (y, x).
                img = img.resize((size[1], size[0]), Image.Resampling.LANCZOS)
            return np.asarray(img, dtype=np.uint8)
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as err:
        # PIL reports some damaged files as SyntaxError or ValueError, oversized ones as a
        # DecompressionBombError: all mean "this file is not an image dkm can read".
        raise DataFormatError(f"{path}: not a readable image ({_reason(err)})") from err


def read_image_folder(
    root: str | Path,
    *,
    grayscale: bool = True,
    size: tuple[int, int] | None = None,
) -> ImageFolder:
    """Read every image file below ``root``.

    Parameters
    ----------
    root : str or Path
        The folder. When every image sits in a sub-folder, the sub-folder's name is its label
        (sorted names become 0, 1, ...); images directly in ``root`` get no label.
    grayscale : bool, default True
        Convert to one channel (``images`` is ``(n, y, x)``); otherwise RGB ``(n, y, x, 3)``.
    size : (int, int), optional
        Resize every image to ``(y, x)``. Without it, all images must share one size.

    Returns
    -------
    ImageFolder
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(f"{root}: not a directory")
    files = _image_files(root)
    if not files:
        raise DataFormatError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    arrays = [_load_image(f, grayscale, size) for f in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        odd = next(f for f, a in zip(files, arrays, strict=True) if a.shape != first)
        raise DataFormatError(
            f"{root}: images differ in size ({files[0].name} is {first}, {odd.name} is "
            f"{arrays[files.index(odd)].shape}); resize them to one size with --resize YxX "
            "(dkm ingest) or data.options.size: [y, x] (a job)"
        )
    relative = [f.relative_to(root) for f in files]
    labels, names = _folder_labels(relative)
    return ImageFolder(
        images=np.stack(arrays),
        labels=labels,
        label_names=names,
        files=tuple(str(r) for r in relative),
    )


def _folder_labels(relative: Iterable[Path]) -> tuple[np.ndarray | None, tuple[str, ...]]:
    relative = list(relative)
    if any(len(r.parts) < 2 for r in relative):
        return None, ()
    names = tuple(sorted({r.parts[0] for r in relative}))
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[r.parts[0]] for r in relative], dtype=np.int64), names


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``images`` (and optional ``labels``) arrays from an ``.npz`` file.

    ``images`` must be ``(n, y, x)`` or ``(n, y, x, channel)`` uint8; anything else is refused
    rather than silently rescaled.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise DataFormatError(
            f"{path}: not a readable .npz file (corrupt or truncated zip archive: {_reason(err)})"
        ) from err
    except (ValueError, OSError) as err:
        raise DataFormatError(f"{path}: not a readable .npz file ({_reason(err)})") from err
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
        raise DataFormatError(f"{path}: not an .npz archive (a single {type(loaded).__name__})")
    arrays = {}
    with loaded as npz:
        for key in npz.files:
            try:
                arrays[key] = npz[key]
            except ValueError as err:
                if "allow_pickle" in str(err):
                    raise DataFormatError(
                        f"{path}: array {key!r} holds Python objects (dtype object), which dkm "
                        "never unpickles; save it as a uint8 array"
                    ) from err
                raise DataFormatError(
                    f"{path}: array {key!r} is unreadable ({_reason(err)})"
                ) from err
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
                raise DataFormatError(
                    f"{path}: array {key!r} is unreadable (corrupt or truncated zip archive: "
                    f"{_reason(err)})"
                ) from err
    if "images" not in arrays:
        raise DataFormatError(f"{path}: no 'images' array (has {sorted(arrays)})")
    images, labels = arrays["images"], arrays.get("labels")
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataFormatError(
            f"{path}: 'images' must be uint8 (n, y, x[, channel]), got {images.dtype} "
            f"{images.shape}"
        )
    if labels is not None and labels.shape != (images.shape[0],):
        raise DataFormatError(
            f"{path}: 'labels' has shape {labels.shape}, expected ({images.shape[0]},)"
        )
    return images, labels
