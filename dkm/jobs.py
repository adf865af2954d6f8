"""Job files: the declarative YAML a user submits, as validated, frozen dataclasses.

A job says data -> features -> model -> evaluation -> output (and optionally which cluster).
Everything is checked before anything runs; every problem is reported with the dotted key it
concerns and what was expected, all of them at once. Relative paths are taken relative to the
directory the job is run from.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ClusterSpec",
    "DataSpec",
    "FeatureSpec",
    "JobSpec",
    "JobSpecError",
    "ModelSpec",
    "OutputSpec",
    "load_job",
    "parse_job",
]

ALGORITHMS = ("lloyd", "minibatch")
INITS = ("k-means||", "k-means++", "random", "sample")
EMPTY_POLICIES = ("farthest", "random-point", "zero", "keep")
METRICS = (
    "inertia",
    "reconstruction_error",
    "accuracy",
    "one_to_one_accuracy",
    "nmi",
    "homogeneity",
)
LABEL_METRICS = ("accuracy", "one_to_one_accuracy", "nmi", "homogeneity")
MAX_K = 16384


class JobSpecError(ValueError):
    """A job file is malformed; ``problems`` lists each ``(key, message)``."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "job"):
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s):"]
        lines += [f"  {key}: {message}" for key, message in problems]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class DataSpec:
    """Which dataset, where its store is, and where to ingest it from if it is missing."""

    dataset: str
    store: str
    source: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureSpec:
    """How samples become vectors: whole images as pixels, or patches."""

    kind: Literal["pixels", "patches"] = "pixels"
    size: int | None = None
    stride: int | None = None
    pad: int = 0
    drop_empty: bool = False
    store: str | None = None
    split: Literal["all", "train", "test"] = "all"


@dataclass(frozen=True)
class ModelSpec:
    """The clustering: algorithm, k (one or a sweep) and its parameters."""

    k: tuple[int, ...]
    algorithm: Literal["lloyd", "minibatch"] = "lloyd"
    init: str = "k-means||"
    max_iter: int = 100
    tol: float = 1e-4
    random_state: int = 0
    n_init: int = 1
    empty_cluster: str = "farthest"
    oversampling_factor: float = 2.0
    init_max_iter: int | None = None
    batch_size: int = 4096
    max_no_improvement: int | None = 10
    reassignment_ratio: float = 0.01
    dtype: Literal["float32", "float64"] = "float32"


@dataclass(frozen=True)
class OutputSpec:
    """Where results go and what is kept."""

    store: str
    labels: bool = False
    report: bool = False
    checkpoint_every: int = 5


@dataclass(frozen=True)
class ClusterSpec:
    """Which Dask cluster: an address, or the shape of a new LocalCluster."""

    address: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | None = None


@dataclass(frozen=True)
class JobSpec:
    """A whole, validated job."""

    name: str
    data: DataSpec
    model: ModelSpec
    output: OutputSpec
    features: FeatureSpec = field(default_factory=FeatureSpec)
    evaluate: tuple[str, ...] = ("inertia",)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (what the results store records)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- checking


class _Checker:
    """Collects every problem instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def fail(self, key: str, message: str) -> None:
        self.problems.append((key, message))


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + " or null"
    if origin is dict:
        return "a mapping"
    if origin is tuple:
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True  # composite fields are checked by their own rules


def _section(check: _Checker, cls: type, raw: Any, key: str, special=()) -> dict[str, Any]:
    """Type-check one mapping against a dataclass; returns the accepted fields."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        check.fail(key, f"expected a mapping, got {type(raw).__name__}")
        return {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for name in raw:
        if name not in fields:
            known = ", ".join(fields)
            check.fail(f"{key}.{name}", f"unknown key (expected one of: {known})")
    for name, f in fields.items():
        where = f"{key}.{name}"
        if name not in raw:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                check.fail(where, "required key is missing")
            continue
        value = raw[name]
        if name in special:
            out[name] = value
        elif not _matches(value, hints[name]):
            check.fail(where, f"expected {_describe(hints[name])}, got {value!r}")
        else:
            out[name] = float(value) if hints[name] is float else value
    return out


def _at_least(check: _Checker, where: str, value: Any, low: float) -> None:
    if value is not None and value < low:
        check.fail(where, f"must be >= {low:g}, got {value!r}")


def expand_k(check: _Checker, raw: Any, where: str = "model.k") -> tuple[int, ...]:
    """An int, a list of ints, or ``{start, stop, scale: log2|linear, step}`` as a tuple."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        values = [raw]
    elif isinstance(raw, list):
        if not raw:
            check.fail(where, "empty list; give at least one k")
            return ()
        bad = [v for v in raw if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            check.fail(where, f"expected integers, got {bad!r}")
            return ()
        values = list(raw)
    elif isinstance(raw, Mapping):
        values = _k_range(check, raw, where)
    else:
        check.fail(
            where, f"expected an integer, a list of integers or {{start, stop, scale}}, got {raw!r}"
        )
        return ()
    for v in values:
        if v < 1:
            check.fail(where, f"k must be >= 1, got {v}")
        elif v > MAX_K:
            check.fail(where, f"k must be <= {MAX_K}, got {v}")
    if len(set(values)) != len(values):
        check.fail(where, f"repeated k values in {values}")
    return tuple(values)


def _k_range(check: _Checker, raw: Mapping, where: str) -> list[int]:
    unknown = set(raw) - {"start", "stop", "scale", "step"}
    if unknown:
        check.fail(where, f"unknown keys {sorted(unknown)} (expected start, stop, scale, step)")
    start, stop = raw.get("start"), raw.get("stop")
    scale, step = raw.get("scale", "log2"), raw.get("step")
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop))
    if not ints:
        check.fail(where, f"start and stop must be integers, got {start!r} and {stop!r}")
        return []
    if start < 1 or stop < start:
        check.fail(where, f"need 1 <= start <= stop, got start={start}, stop={stop}")
        return []
    if scale == "log2":
        if step is not None:
            check.fail(where, "step goes with scale: linear")
        return [start * 2**i for i in range(int(math.log2(stop / start)) + 1)]
    if scale == "linear":
        step = 1 if step is None else step
        if not isinstance(step, int) or step < 1:
            check.fail(where, f"step must be an integer >= 1, got {step!r}")
            return []
        return list(range(start, stop + 1, step))
    check.fail(where, f"scale must be 'log2' or 'linear', got {scale!r}")
    return []


def parse_job(raw: Any, source: str = "job") -> JobSpec:
    """Validate a job given as plain data (what YAML loads to).

    Raises
    ------
    JobSpecError
        Listing every problem, each with the key it concerns.
    """
    from dkm.data.catalog import DATASETS

    check = _Checker()
    if not isinstance(raw, Mapping):
        raise JobSpecError(
            [("(top)", f"a job is a mapping of sections, got {type(raw).__name__}")], source
        )
    top = {f.name for f in dataclasses.fields(JobSpec)}
    for key in raw:
        if key not in top:
            check.fail(str(key), f"unknown section (expected one of: {', '.join(sorted(top))})")
    for key in ("name", "data", "model", "output"):
        if key not in raw:
            check.fail(key, "required section is missing")

    name = raw.get("name", "")
    if "name" in raw and (not isinstance(name, str) or not name.strip()):
        check.fail("name", f"expected a non-empty string, got {name!r}")

    data = _section(check, DataSpec, raw.get("data"), "data") if "data" in raw else {}
    if "dataset" in data and data["dataset"] not in DATASETS:
        check.fail(
            "data.dataset",
            f"unknown dataset {data['dataset']!r} (known: {', '.join(sorted(DATASETS))})",
        )

    features = _section(check, FeatureSpec, raw.get("features"), "features")
    if features.get("kind") == "patches":
        if features.get("size") is None:
            check.fail("features.size", "required when kind is patches")
        _at_least(check, "features.size", features.get("size"), 1)
        _at_least(check, "features.stride", features.get("stride"), 1)
        _at_least(check, "features.pad", features.get("pad"), 0)
    elif features.get("size") is not None or features.get("drop_empty"):
        check.fail("features.kind", "size/stride/pad/drop_empty need kind: patches")

    model = {}
    if "model" in raw:
        model = _section(check, ModelSpec, raw.get("model"), "model", special=("k",))
        if "k" in model:
            model["k"] = expand_k(check, model["k"])
        for key, choices in (
            ("algorithm", ALGORITHMS),
            ("init", INITS),
            ("empty_cluster", EMPTY_POLICIES),
        ):
            if key in model and model[key] not in choices:
                check.fail(
                    f"model.{key}",
                    f"unknown {key} {model[key]!r} (expected one of: {', '.join(choices)})",
                )
        for key, low in (
            ("max_iter", 1),
            ("tol", 0),
            ("n_init", 1),
            ("batch_size", 1),
            ("oversampling_factor", 0),
            ("init_max_iter", 1),
            ("max_no_improvement", 1),
            ("reassignment_ratio", 0),
        ):
            _at_least(check, f"model.{key}", model.get(key), low)

    evaluate = raw.get("evaluate", ["inertia"])
    if isinstance(evaluate, str):
        evaluate = [evaluate]
    if not isinstance(evaluate, list) or not all(isinstance(m, str) for m in evaluate):
        check.fail("evaluate", f"expected a list of metric names, got {evaluate!r}")
        evaluate = []
    for metric in evaluate:
        if metric not in METRICS:
            check.fail("evaluate", f"unknown metric {metric!r} (expected: {', '.join(METRICS)})")
        elif metric in LABEL_METRICS and features.get("kind") == "patches":
            check.fail("evaluate", f"{metric} compares sample labels; patches have none")
        elif metric == "reconstruction_error" and features.get("kind", "pixels") != "patches":
            check.fail("evaluate", "reconstruction_error needs features.kind: patches")

    output = _section(check, OutputSpec, raw.get("output"), "output") if "output" in raw else {}
    _at_least(check, "output.checkpoint_every", output.get("checkpoint_every"), 1)

    cluster = _section(check, ClusterSpec, raw.get("cluster"), "cluster")
    address = cluster.get("address")
    if address is not None and not address.startswith(("tcp://", "tls://", "inproc://")):
        check.fail("cluster.address", f"expected a tcp:// or tls:// address, got {address!r}")
    _at_least(check, "cluster.n_workers", cluster.get("n_workers"), 1)
    _at_least(check, "cluster.threads_per_worker", cluster.get("threads_per_worker"), 1)

    if check.problems:
        raise JobSpecError(check.problems, source)
    return JobSpec(
        name=name.strip(),
        data=DataSpec(**data),
        features=FeatureSpec(**features),
        model=ModelSpec(**model),
        evaluate=tuple(dict.fromkeys(evaluate)),
        output=OutputSpec(**output),
        cluster=ClusterSpec(**cluster),
    )


def load_job(path: str | Path) -> JobSpec:
    """Read and validate a job file.

    Raises
    ------
    JobSpecError
        The file is missing, is not YAML, or does not describe a valid job.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise JobSpecError(
            [("(file)", f"cannot read the job file ({err.strerror})")], str(path)
        ) from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        problem = getattr(err, "problem", None) or str(err)
        raise JobSpecError([(where, f"not valid YAML: {problem}")], str(path)) from err
    return parse_job(raw, str(path))
