"""dkm's namespace in dask's configuration: every tuning constant, with its default.

The defaults live in ``dkm/dkm.yaml`` (the downstream-library convention of dask); users
override them like any dask setting: ``DASK_DKM__KERNELS__TILE_BYTES=1MiB`` in the
environment, a YAML file in ``~/.config/dask/``, or ``dask.config.set(...)``. Code asks this
module, never a module-level constant, so one place owns each value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dask.config
import yaml
from dask.utils import parse_bytes, parse_timedelta

__all__ = ["get", "get_bytes", "get_fraction", "get_seconds"]

_DEFAULTS_FILE = Path(__file__).with_name("dkm.yaml")
dask.config.update_defaults(yaml.safe_load(_DEFAULTS_FILE.read_text()))


def get(key: str) -> Any:
    """The value of ``dkm.<key>`` (e.g. ``get("backend.split-every")``)."""
    return dask.config.get(f"dkm.{key}")


def get_bytes(key: str) -> int:
    """A size setting in bytes; accepts integers and strings such as ``"64MiB"``."""
    value = get(key)
    try:
        return int(parse_bytes(value)) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"dask config dkm.{key}: expected a size such as 64MiB, got {value!r}"
        ) from err


def get_seconds(key: str) -> float:
    """A duration setting in seconds; accepts numbers and strings such as ``"10s"``."""
    value = get(key)
    try:
        return float(parse_timedelta(value, default="seconds"))
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(
            f"dask config dkm.{key}: expected a duration such as 10s, got {value!r}"
        ) from err


def get_fraction(key: str) -> float:
    """A share setting: a number from 0 to 1 (e.g. ``get_fraction("blocks.cache-fraction")``)."""
    value = get(key)
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = math.nan
    if not 0 <= share <= 1:
        raise ValueError(f"dask config dkm.{key}: expected a number from 0 to 1, got {value!r}")
    return share
