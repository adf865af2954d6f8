"""What the benchmarks share: the Markdown table they print and the Zarr store they time."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def fmt_table(rows, cols, heads) -> str:
    """``rows`` (dicts) as a Markdown table of the columns ``cols`` headed ``heads``."""
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, float):
                v = "-" if np.isnan(v) else (f"{v:.4g}" if abs(v) < 1e5 else f"{v:.6g}")
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_header(details: str) -> str:
    """``Run <UTC time>, <cores> cores; <details>``: the first line of a benchmark's report."""
    import os
    import time

    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"Run {stamp}, {os.cpu_count()} cores; {details}"


def publish(head: str, table: str, out: str | None) -> None:
    """Print the report and, with ``out``, also write it there."""
    print(head + "\n\n" + table)
    if out:
        Path(out).write_text(head + "\n\n" + table + "\n")


def to_zarr(X: np.ndarray, path: Path, nchunks: int = 4) -> Path:
    """``X`` as a ``features(sample, feature)`` Zarr store of ``nchunks`` chunks (kept)."""
    import xarray as xr

    if not path.exists():
        rows = -(-len(X) // nchunks)
        ds = xr.Dataset({"features": (("sample", "feature"), X)}).chunk({"sample": rows})
        ds.to_zarr(path, consolidated=False)
    return path
