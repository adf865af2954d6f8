"""Downloading dataset files with checksum checks, and hashing local ones."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["CANONICAL_URLS", "KNOWN_MD5", "ChecksumError", "fetch_all", "sha256_file"]

log = logging.getLogger("dkm")

# The datasets' canonical mirrors. Nothing downloads unless the user asks for it.
CANONICAL_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
}

# MD5 of the files as the canonical mirrors serve them (the digests the datasets publish).
KNOWN_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12e480ee83cd310",
    },
    "cifar10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
}

_BUFFER = 1 << 20


class ChecksumError(ValueError):
    """A downloaded file does not have the digest it must have."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces."""
    return _hash_file(Path(path), "sha256")


def _cache_root(cache_dir: str | os.PathLike | None, name: str) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("DKM_CACHE_DIR") or Path.home() / ".cache" / "dkm"
    root = Path(cache_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    return root


def _parse_digest(expected: str, fname: str = "") -> tuple[str, str]:
    where = f"{fname}: " if fname else ""
    algo, sep, value = expected.partition(":")
    if not sep:  # a bare hex digest: its length says which algorithm
        algo, value = ("md5" if len(expected) == 32 else "sha256"), expected
    if algo not in ("md5", "sha256"):
        raise ValueError(f"{where}unsupported checksum algorithm {algo!r} (use md5: or sha256:)")
    value = value.strip().lower()
    length = 32 if algo == "md5" else 64
    if len(value) != length or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(
            f"{where}checksum {expected!r} is not a {algo} digest ({length} hex digits)"
        )
    return algo, value


def _download(url: str, dest: Path, expected: str | None, timeout: float) -> None:
    algo, want = _parse_digest(expected, dest.name) if expected else ("sha256", None)
    digest = hashlib.new(algo)
    part = dest.with_name(f".{dest.name}.part-{uuid.uuid4().hex[:8]}")
    try:
        try:
            with (
                urllib.request.urlopen(url, timeout=timeout) as response,
                open(part, "wb") as out,
            ):
                while block := response.read(_BUFFER):
                    digest.update(block)
                    out.write(block)
        except urllib.error.URLError as err:  # HTTP errors too (404, 500...)
            raise OSError(f"{url}: download failed ({err.reason})") from err
        except (http.client.HTTPException, OSError, ValueError) as err:
            # A connection cut mid-file (IncompleteRead), a timeout, a malformed URL: the same
            # story for the user, told with the URL rather than as a bare exception.
            raise OSError(f"{url}: download failed ({type(err).__name__}: {err})") from err
        if want is not None and digest.hexdigest() != want:
            raise ChecksumError(
                f"{url}: checksum mismatch ({algo} {digest.hexdigest()}, expected {want}); "
                "the file was discarded"
            )
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def fetch_all(
    base_url: str,
    files: Iterable[str],
    *,
    name: str,
    checksums: Mapping[str, str] | None = None,
    verify: bool = True,
    cache_dir: str | os.PathLike | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``files`` from ``base_url`` into the cache and return the cache directory.

    Parameters
    ----------
    base_url : str
        ``http(s)://`` or ``file://`` URL of the folder holding the files.
    files : iterable of str
        File names under ``base_url``.
    name : str
        Dataset name: picks the cache sub-folder and the known checksums.
    checksums : mapping, optional
        ``{file: "md5:<hex>" | "sha256:<hex>"}`` overriding the known digests.
    verify : bool, default True
        Require a digest for every file. Known digests (published or given) are always
        checked; ``verify=False`` only admits files for which no digest is known.
    cache_dir : path-like, optional
        Cache root (default ``$DKM_CACHE_DIR`` or ``~/.cache/dkm``).

    Raises
    ------
    ChecksumError
        A file's digest differs from the expected one; the bad file is not kept.
    OSError
        The URL cannot be reached.
    """
    known = {**KNOWN_MD5.get(name, {}), **(checksums or {})}
    root = _cache_root(cache_dir, name)
    base = base_url if base_url.endswith("/") else base_url + "/"
    for fname in files:
        expected = known.get(fname)  # verify=False only admits files with no known digest
        if verify and expected is None:
            raise ChecksumError(
                f"{fname}: no known checksum to verify the download against; pass one "
                "(checksums={file: 'sha256:...'}) or verify=False"
            )
        dest = root / fname
        if dest.is_file() and expected is not None:
            algo, want = _parse_digest(expected, fname)
            if _hash_file(dest, algo) == want:
                log.info("%s: cached", dest)
                continue
        elif dest.is_file():
            continue
        log.info("downloading %s%s", base, fname)
        _download(base + fname, dest, expected, timeout)
    return root


def _hash_file(path: Path, algo: str) -> str:
    digest = hashlib.new(algo)
    with open(path, "rb") as fh:
        while block := fh.read(_BUFFER):
            digest.update(block)
    return digest.hexdigest()
