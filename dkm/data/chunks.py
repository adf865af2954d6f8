"""Whole chunks of a plain local Zarr array, read from their files and decoded in place.

A streamed fit reads every row of its store on every pass, so what a read costs beyond the
decompression counts: zarr-python's codec pipeline (async tasks, a buffer per codec, a copy
into the selection) took 115 ns per 25-feature float32 row of a Zstd store, against 75 ns
for the file read and the decompression into the block alone (Blosc LZ4: 84 against 39).

:class:`DirectChunks` does only that, for the arrays where it is exactly what zarr would do:
Zarr v3 on a local directory, no sharding and no array-to-array codecs, bytes in the
machine's order, then at most one Zstd or Blosc compressor and a CRC32C checksum, chunks
that span every column. Anything else (and a chunk whose file is missing, which zarr fills
with the fill value) is left to zarr. The CRC32C is checked as zarr checks it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DirectChunks"]


@dataclass
class DirectChunks:
    """Reader of whole row chunks of one array (see the module's text).

    Use :meth:`of` to get one, or None when the array is not plain enough.
    """

    root: Path  # the array's directory
    encode_key: Any  # chunk coordinates -> key, the array's own chunk key encoding
    chunk_rows: int
    row_bytes: int
    decoder: Any  # numcodecs codec with decode(buf, out=...), or None (stored raw)
    crc32c: bool

    @classmethod
    def of(cls, arr) -> DirectChunks | None:
        """A reader for the zarr array ``arr``, or None if zarr must read it."""
        try:
            from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec
            from zarr.storage import LocalStore
        except ImportError:  # pragma: no cover - another zarr major version
            return None
        meta = arr.metadata
        store = arr.store_path.store
        if getattr(meta, "zarr_format", None) != 3 or not isinstance(store, LocalStore):
            return None
        if getattr(meta, "storage_transformers", ()):
            return None
        if len(arr.shape) != 2 or arr.chunks[1] != arr.shape[1] or not arr.dtype.isnative:
            return None
        codecs = list(meta.codecs)
        if not codecs or not isinstance(codecs[0], BytesCodec):
            return None  # array-to-array codecs (transpose...) or sharding come first
        endian = getattr(codecs[0].endian, "value", codecs[0].endian)
        if arr.dtype.itemsize > 1 and endian not in (None, sys.byteorder):
            return None
        rest = codecs[1:]
        crc = bool(rest) and isinstance(rest[-1], Crc32cCodec)
        rest = rest[:-1] if crc else rest
        decoder = None
        if len(rest) > 1:
            return None
        if rest and isinstance(rest[0], ZstdCodec):
            from numcodecs.zstd import Zstd

            decoder = Zstd()
        elif rest and isinstance(rest[0], BloscCodec):
            from numcodecs import Blosc

            decoder = Blosc()
        elif rest:
            return None
        return cls(
            Path(store.root) / arr.store_path.path,
            meta.encode_chunk_key,
            int(arr.chunks[0]),
            int(arr.shape[1]) * arr.dtype.itemsize,
            decoder,
            crc,
        )

    def read(self, chunk: int, first: int, out: np.ndarray, scratch: list) -> bool:
        """Rows ``first ..`` of row chunk ``chunk`` into ``out`` (C-contiguous, the array's
        dtype). Returns False, with ``out`` untouched, when the chunk has no file (zarr
        reads it as the fill value). ``scratch`` holds a reused chunk-sized buffer for
        chunks only partly wanted."""
        path = self.root / self.encode_key((chunk, 0))
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return False
        if self.crc32c:
            data = self._checked(data, path)
        size = self.chunk_rows * self.row_bytes
        whole = first == 0 and out.shape[0] == self.chunk_rows
        if whole:
            target = out.reshape(-1).view(np.uint8)
        else:
            if not scratch or scratch[0].nbytes < size:
                scratch[:] = [np.empty(size, np.uint8)]
            target = scratch[0][:size]
        if self.decoder is None:
            if len(data) != size:
                raise ValueError(f"chunk {path} holds {len(data)} bytes, not {size}")
            target[:] = np.frombuffer(data, np.uint8)
        else:
            self.decoder.decode(data, out=target)
        if not whole:
            part = target[first * self.row_bytes : (first + out.shape[0]) * self.row_bytes]
            out.reshape(-1).view(np.uint8)[:] = part
        return True

    @staticmethod
    def _checked(data: bytes, path: Path) -> np.ndarray:
        import google_crc32c

        inner = np.frombuffer(data, np.uint8)[:-4]
        stored = bytes(data[-4:])
        if np.uint32(google_crc32c.value(inner)).tobytes() != stored:
            # zarr's own words, which the callers that name damaged chunks look for.
            raise ValueError(f"Stored and computed checksum do not match in chunk {path}")
        return inner
