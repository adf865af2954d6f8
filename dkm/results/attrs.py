"""Conventions of results-store attributes: status words and JSON-safe values."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["COMPLETE", "FAILED", "INTERRUPTED", "RUNNING", "jsonable"]

COMPLETE = "complete"
RUNNING = "running"
FAILED = "failed"
INTERRUPTED = "interrupted"


def jsonable(value: Any) -> Any:
    """Attrs must be plain JSON: numpy scalars and arrays nested anywhere are converted and
    non-finite floats become None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
