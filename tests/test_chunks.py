"""Direct chunk reads of plain local Zarr arrays: the rows zarr reads, wherever a block starts."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ShardingCodec, TransposeCodec, ZstdCodec

from dkm._parallel.kernels import ZarrRows
from dkm.data.chunks import DirectChunks

CHUNK = 1000
N, D = 4321, 7  # the last chunk is partly past the end

COMPRESSORS = {
    "zstd": [ZstdCodec(level=0, checksum=False)],
    "zstd+crc32c": [ZstdCodec(level=3, checksum=True), Crc32cCodec()],
    "blosc-lz4": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    "raw": [],
    "raw+crc32c": [Crc32cCodec()],
}
# Block bounds: whole chunks, blocks starting and ending inside chunks, the partial last one.
RANGES = [(0, N), (0, CHUNK), (CHUNK, 3 * CHUNK), (17, 2503), (2999, 3001), (4000, N), (4320, N)]


def _array(path, compressors, **kw):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(kw.pop("dtype", np.float32))
    arr = zarr.create_array(
        str(path),
        name="features",
        shape=x.shape,
        chunks=kw.pop("chunks", (CHUNK, D)),
        dtype=x.dtype,
        compressors=compressors,
        **kw,
    )
    arr[:] = x
    return arr, x


def _rows(path, a, b, dtype="<f4"):
    return ZarrRows(str(path), "features", a, b, np.dtype(dtype).str).load()


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_direct_reads_give_zarrs_rows(tmp_path, name):
    arr, x = _array(tmp_path / "s.zarr", COMPRESSORS[name])
    assert DirectChunks.of(arr) is not None  # the direct path is the one under test
    for a, b in RANGES:
        np.testing.assert_array_equal(_rows(tmp_path / "s.zarr", a, b), x[a:b])


@pytest.mark.parametrize(
    "layout",
    [
        {"chunks": (CHUNK, 3)},  # chunks that split the columns
        {"serializer": {"name": "bytes", "configuration": {"endian": "big"}}},
        {"filters": [TransposeCodec(order=(1, 0))]},
        {"shards": (2 * CHUNK, D)},
        {"zarr_format": 2},
    ],
    ids=["column-chunks", "big-endian", "transpose", "sharded", "zarr-v2"],
)
def test_arrays_zarr_must_decode_are_left_to_it(tmp_path, layout):
    compressors = None if layout.get("zarr_format") == 2 else COMPRESSORS["zstd"]
    arr, x = _array(tmp_path / "s.zarr", compressors, **layout)
    assert DirectChunks.of(arr) is None
    for a, b in RANGES[:4]:
        np.testing.assert_array_equal(_rows(tmp_path / "s.zarr", a, b), x[a:b])


def test_sharded_codec_is_recognised_as_such(tmp_path):
    arr, _ = _array(tmp_path / "s.zarr", COMPRESSORS["zstd"], shards=(2 * CHUNK, D))
    assert isinstance(arr.metadata.codecs[0], ShardingCodec)


def test_a_missing_chunk_reads_as_the_fill_value(tmp_path):
    arr, x = _array(tmp_path / "s.zarr", COMPRESSORS["zstd+crc32c"], fill_value=-7.0)
    gone = tmp_path / "s.zarr" / "features" / arr.metadata.encode_chunk_key((2, 0))
    gone.unlink()
    got = _rows(tmp_path / "s.zarr", 1500, 3500)
    np.testing.assert_array_equal(got[:500], x[1500:2000])
    assert (got[500:1500] == -7.0).all()
    np.testing.assert_array_equal(got[1500:], x[3000:3500])


def test_a_damaged_chunk_is_refused_naming_it(tmp_path):
    arr, _ = _array(tmp_path / "s.zarr", COMPRESSORS["raw+crc32c"])
    chunk = tmp_path / "s.zarr" / "features" / arr.metadata.encode_chunk_key((1, 0))
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"checksum do not match in chunk .*c/1/0"):
        _rows(tmp_path / "s.zarr", 0, 2 * CHUNK)


def test_another_working_dtype_is_cast_by_zarr(tmp_path):
    _, x = _array(tmp_path / "s.zarr", COMPRESSORS["zstd"], dtype=np.float64)
    got = _rows(tmp_path / "s.zarr", 17, 2503, dtype="<f4")
    np.testing.assert_array_equal(got, x[17:2503].astype(np.float32))
