"""Parameter rules declared once as a table, checked by one function.

The pattern scikit-learn uses (``_parameter_constraints``), written here so that dkm does not
depend on scikit-learn's private validation module: an owner (an estimator, a dataset, a
feature kind) declares ``{name: [rule, ...]}`` and a value is valid when it satisfies any of
its rules. The same table serves the Python API (a ``ValueError``) and job files (every
problem listed with its dotted key), so the two can never disagree.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "IntList",
    "Interval",
    "Options",
    "Range",
    "Rules",
    "describe",
    "problems",
    "short_repr",
    "validate",
]

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 6
_repr.maxlevel = 2


def short_repr(value: Any) -> str:
    """``repr`` cut to a readable length (a YAML alias bomb must not be printed whole)."""
    return _repr.repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


@dataclass(frozen=True)
class Interval:
    """A number of a kind (``int`` or ``float``) between ``low`` and ``high`` (None: open).

    Floats must be finite: NaN and infinity are refused whatever the bounds.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"  # "both", "left", "right", "neither"

    def accepts(self, value: Any) -> bool:
        if self.kind is int:
            if not _is_int(value):
                return False
        elif not _is_real(value) or not math.isfinite(float(value)):
            return False
        low_ok = self.low is None or (
            value >= self.low if self.closed in ("both", "left") else value > self.low
        )
        high_ok = self.high is None or (
            value <= self.high if self.closed in ("both", "right") else value < self.high
        )
        return bool(low_ok and high_ok)

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a finite number"
        bounds = []
        if self.low is not None:
            bounds.append((">= " if self.closed in ("both", "left") else "> ") + f"{self.low:g}")
        if self.high is not None:
            bounds.append(("<= " if self.closed in ("both", "right") else "< ") + f"{self.high:g}")
        return noun + (" " + " and ".join(bounds) if bounds else "")


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values (usually strings)."""

    values: tuple[Any, ...]

    def __init__(self, *values: Any):
        object.__setattr__(self, "values", tuple(values))

    def accepts(self, value: Any) -> bool:
        # Compare by type as well: True == 1 and an array == "auto" must not pass.
        return any(type(value) is type(v) and value == v for v in self.values)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


# Named rules for kinds that are not numbers or options.
_NAMED = {
    "boolean": (lambda v: isinstance(v, bool | np.bool_), "true or false"),
    "string": (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "mapping": (lambda v: isinstance(v, Mapping), "a mapping"),
    "array-like": (
        lambda v: isinstance(v, np.ndarray | Sequence) and not isinstance(v, str),
        "an array",
    ),
    "random_state": (
        lambda v: (_is_int(v) and 0 <= v <= 2**32 - 1) or isinstance(v, np.random.RandomState),
        "an integer in [0, 2**32 - 1] or a numpy RandomState",
    ),
    "dtype": (
        lambda v: _dtype_name(v) in ("float32", "float64"),
        "'float32' or 'float64'",
    ),
}

@dataclass(frozen=True)
class IntList:
    """A non-empty list of integers >= ``low``."""

    low: int = 1

    def accepts(self, value: Any) -> bool:
        if isinstance(value, str) or not isinstance(value, Sequence | np.ndarray):
            return False
        each = Interval(int, self.low)
        return len(value) > 0 and all(each.accepts(v) for v in value)

    def describe(self) -> str:
        return f"a non-empty list of integers >= {self.low}"


@dataclass(frozen=True)
class Range:
    """A pair ``[lo, hi]`` of finite numbers with ``lo < hi`` (list, tuple or array)."""

    def accepts(self, value: Any) -> bool:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
            return False
        if len(value) != 2:
            return False
        if not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_) for v in value
        ):
            return False
        lo, hi = (float(v) for v in value)
        return math.isfinite(lo) and math.isfinite(hi) and lo < hi

    def describe(self) -> str:
        return "a pair [lo, hi] of finite numbers with lo < hi"


Rule = Interval | Options | IntList | Range | str | None
Rules = Mapping[str, Sequence[Rule]]


def _dtype_name(value: Any) -> str | None:
    try:
        return np.dtype(value).name
    except Exception:  # numpy raises TypeError, ValueError or others for odd values
        return None


def _accepts(rule: Rule, value: Any) -> bool:
    if rule is None:
        return value is None
    if isinstance(rule, str):
        return _NAMED[rule][0](value)
    return rule.accepts(value)


def describe(rules: Sequence[Rule]) -> str:
    """What a parameter accepts, in words (``"an integer >= 1 or None"``)."""
    words = []
    for rule in rules:
        if rule is None:
            words.append("null")
        elif isinstance(rule, str):
            words.append(_NAMED[rule][1])
        else:
            words.append(rule.describe())
    return " or ".join(words)


def problems(
    params: Mapping[str, Any], rules: Rules, *, unknown: str = "error"
) -> list[tuple[str, str]]:
    """Every parameter that breaks its rules, as ``(name, message)``.

    Parameters
    ----------
    params : mapping
        Names and values to check.
    rules : mapping
        ``{name: [rule, ...]}``; a value is valid when any rule accepts it.
    unknown : {"error", "ignore"}
        Whether names missing from ``rules`` are problems.
    """
    found = []
    for name, value in params.items():
        if name not in rules:
            if unknown == "error":
                found.append((name, f"unknown parameter (expected one of: {', '.join(rules)})"))
            continue
        if not any(_accepts(rule, value) for rule in rules[name]):
            found.append((name, f"must be {describe(rules[name])}, got {short_repr(value)}"))
    return found


def validate(params: Mapping[str, Any], rules: Rules, owner: str) -> None:
    """Raise one ``ValueError`` listing every invalid parameter of ``owner``."""
    found = problems(params, rules)
    if found:
        raise ValueError(f"{owner}: " + "; ".join(f"{name} {msg}" for name, msg in found))
