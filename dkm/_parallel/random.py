"""Random numbers that do not depend on how the data is chunked.

dask's per-block generators make a sample depend on the chunking; dkm's sampling steps
(k-means||, the first center, mini-batches) draw from a counter-based hash of
``(seed, stream, global row)`` instead, so any chunking gives the same result.
"""

from __future__ import annotations

import numpy as np

__all__ = ["row_uniforms"]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + _GOLD
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def row_uniforms(seed: int, stream: int, start: int, n: int) -> np.ndarray:
    """Uniform [0, 1) numbers for global rows ``start .. start + n`` of stream ``stream``.

    Parameters
    ----------
    seed : int
        The fit's seed.
    stream : int
        Which draw (e.g. the k-means|| round), so rounds are independent.
    start, n : int
        First global row and number of rows.
    """
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed, stream], dtype=np.uint64)).sum(dtype=np.uint64)
        rows = np.arange(start, start + n, dtype=np.uint64)
        z = _splitmix64(_splitmix64(rows ^ key) + np.uint64(stream))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
