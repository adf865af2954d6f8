"""Job files: the declarative YAML a user submits, as validated, frozen dataclasses.

A job says data -> features -> model -> evaluation -> output (and optionally which cluster).
Everything is checked before anything runs; every problem is reported with the dotted key it
concerns and what was expected, all of them at once. The rules come from their owners: the
dataset catalog (``data.options``), :class:`~dkm.features.PatchLayout` (``features``), the
algorithm registry and each estimator's parameter table (``model``), and the metric registry
(``evaluate``). Relative paths are taken relative to the directory the job is run from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dkm import algorithms, evaluate
from dkm._validation import Interval, Options, describe, problems, short_repr
from dkm.data import catalog
from dkm.features import FEATURE_KINDS, SPLITS, PatchLayout

__all__ = [
    "ClusterSpec",
    "DataSpec",
    "FeatureSpec",
    "JobSpec",
    "JobSpecError",
    "ModelSpec",
    "OutputSpec",
    "check_against_data",
    "load_job",
    "parse_job",
]

MAX_K = 16384


class JobSpecError(ValueError):
    """A job is malformed; ``problems`` lists each ``(key, message)``."""

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

    kind: str = "pixels"
    size: int | None = None
    stride: int | None = None
    pad: int = 0
    drop_empty: bool = False
    store: str | None = None
    split: str = "all"
    patches_per_image: int | None = None
    normalize: str | None = None
    seed: int = 0

    @property
    def layout(self) -> PatchLayout | None:
        """The patch layout (None for pixels)."""
        if self.kind != "patches":
            return None
        sampling = {
            key: getattr(self, key)
            for key in _SAMPLING_KEYS
            if getattr(self, key) != FeatureSpec.__dataclass_fields__[key].default
        }
        return PatchLayout(self.size, self.stride, self.pad, self.drop_empty, **sampling)


@dataclass(frozen=True)
class ModelSpec:
    """The clustering: an algorithm of :mod:`dkm.algorithms` (or several to compare, as a
    tuple), k (one or a sweep), and the estimator parameters the job sets (the rest take the
    algorithm's job defaults). With several algorithms, each takes the parameters it has."""

    k: tuple[int, ...]
    algorithm: str | tuple[str, ...] = "lloyd"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def algorithms(self) -> tuple[str, ...]:
        """Every algorithm the job runs, in the job's order."""
        return (self.algorithm,) if isinstance(self.algorithm, str) else tuple(self.algorithm)

    def each(self) -> list[ModelSpec]:
        """One single-algorithm model per algorithm, each with the parameters it accepts."""
        out = []
        for name in self.algorithms:
            rules = algorithms.get(name).job_rules()
            params = {k: v for k, v in self.params.items() if k in rules}
            out.append(ModelSpec(self.k, name, params))
        return out

    @property
    def entry(self) -> algorithms.Algorithm:
        return algorithms.get(self._single())

    def resolved(self) -> dict[str, Any]:
        """Every parameter with its value, defaults included (one algorithm only)."""
        return self.entry.params(self.params)

    def _single(self) -> str:
        if not isinstance(self.algorithm, str):
            raise ValueError(f"{self.algorithm} are several algorithms; use ModelSpec.each()")
        return self.algorithm

    def __getattr__(self, name: str) -> Any:
        # spec.model.max_iter and friends read the resolved parameters.
        if name.startswith("_") or name in ("k", "algorithm", "params"):
            raise AttributeError(name)
        resolved = self.resolved()
        if name in resolved:
            return resolved[name]
        raise AttributeError(f"{self.algorithm} has no parameter {name!r}")


@dataclass(frozen=True)
class OutputSpec:
    """Where results go and what is kept: labels, the first ``reconstructions`` images of a
    patch run next to their originals, the sparse codes (``codes``), the HTML report."""

    store: str
    labels: bool = False
    report: bool = False
    checkpoint_every: int = 5
    reconstructions: int = 0
    codes: bool = False


@dataclass(frozen=True)
class ClusterSpec:
    """Which Dask cluster: an address, or the shape of a new LocalCluster."""

    address: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | int | None = None


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
    sparse_coding: Any = None  # a dkm.coding.SparseCoding when evaluate asks for one

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric a run records: the job's, plus the image errors every patch run
        records (and their sparse-coding twins when the job asks for sparse coding)."""
        names = list(self.evaluate)
        if self.features.kind == "patches":
            names += ["image_mse", "image_rmse"]
            if self.sparse_coding is not None:
                names += ["sparse_image_mse", "sparse_image_rmse"]
        return tuple(dict.fromkeys(names))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (what the results store records, and parse_job reads)."""
        out = _plain(dataclasses.asdict(self))
        model = out.pop("model")
        out["model"] = {"algorithm": model["algorithm"], "k": model["k"], **model["params"]}
        coding = out.pop("sparse_coding")
        if coding is not None:
            out["evaluate"] = [*out["evaluate"], {"sparse_coding": self.sparse_coding.to_dict()}]
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- section rules

_SECTION_RULES: dict[str, dict[str, list]] = {
    "data": {
        "dataset": [Options(*catalog.DATASETS)],
        "store": ["string"],
        "source": ["string", None],
        "options": ["mapping"],
    },
    "features": {
        "kind": [Options(*FEATURE_KINDS)],
        **PatchLayout.RULES,
        "size": [Interval(int, 1), None],
        "store": ["string", None],
        "split": [Options(*SPLITS)],
    },
    "output": {
        "store": ["string"],
        "labels": ["boolean"],
        "report": ["boolean"],
        "checkpoint_every": [Interval(int, 1)],
        "reconstructions": [Interval(int, 0)],
        "codes": ["boolean"],
    },
    "cluster": {
        "address": ["string", None],
        "n_workers": [Interval(int, 1), None],
        "threads_per_worker": [Interval(int, 1), None],
        "memory_limit": ["string", Interval(int, 1), None],
    },
}
# Patch-sampling keys of features (PatchLayout's rules own their values).
_SAMPLING_KEYS = ("patches_per_image", "normalize", "seed")
_REQUIRED = {"data": ("dataset", "store"), "output": ("store",)}
_SECTIONS = ("name", "data", "features", "model", "evaluate", "output", "cluster")


class _Problems(list):
    def add(self, key: str, message: str) -> None:
        self.append((key, message))


def _section(found: _Problems, raw: Any, name: str) -> dict[str, Any]:
    """Check one mapping section against its rules; returns the accepted keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        found.add(name, f"expected a mapping, got {type(raw).__name__}")
        return {}
    rules = _SECTION_RULES[name]
    for key in _REQUIRED.get(name, ()):
        if key not in raw:
            found.add(f"{name}.{key}", "required key is missing")
    bad = problems(raw, rules)
    for key, message in bad:
        if message.startswith("unknown parameter"):
            message = f"unknown key (expected one of: {', '.join(rules)})"
        found.add(f"{name}.{key}", message)
    bad_keys = {key for key, _ in bad}
    return {k: v for k, v in raw.items() if k not in bad_keys}


def _expand_k(found: _Problems, raw: Any, where: str = "model.k") -> tuple[int, ...]:
    """An int, a list of ints, or ``{start, stop, scale: log2|linear, step}`` as a tuple."""
    is_int = Interval(int).accepts
    if is_int(raw):
        values = [raw]
    elif isinstance(raw, list):
        if not raw:
            found.add(where, "empty list; give at least one k")
            return ()
        bad = [v for v in raw if not is_int(v)]
        if bad:
            found.add(where, f"expected integers, got {short_repr(bad)}")
            return ()
        values = list(raw)
    elif isinstance(raw, Mapping):
        values = _k_range(found, raw, where)
    else:
        found.add(
            where,
            f"expected an integer, a list of integers or {{start, stop, scale}}, got "
            f"{short_repr(raw)}",
        )
        return ()
    for v in values:
        if v < 1:
            found.add(where, f"k must be >= 1, got {v}")
        elif v > MAX_K:
            found.add(where, f"k must be <= {MAX_K}, got {v}")
    if len(set(values)) != len(values):
        found.add(where, f"repeated k values in {short_repr(values)}")
    return tuple(values)


def _k_range(found: _Problems, raw: Mapping, where: str) -> list[int]:
    unknown = set(raw) - {"start", "stop", "scale", "step"}
    if unknown:
        found.add(
            where, f"unknown keys {sorted(map(str, unknown))} (expected start, stop, scale, step)"
        )
    start, stop = raw.get("start"), raw.get("stop")
    scale, step = raw.get("scale", "log2"), raw.get("step")
    is_int = Interval(int).accepts
    if not (is_int(start) and is_int(stop)):
        found.add(
            where,
            f"start and stop must be integers, got {short_repr(start)} and {short_repr(stop)}",
        )
        return []
    if start < 1 or stop < start:
        found.add(where, f"need 1 <= start <= stop, got start={start}, stop={stop}")
        return []
    if stop > MAX_K:
        found.add(where, f"k must be <= {MAX_K}, got stop={stop}")
        return []
    if scale == "log2":
        if step is not None:
            found.add(where, "step goes with scale: linear")
        return [start * 2**i for i in range(int(math.log2(stop / start)) + 1)]
    if scale == "linear":
        step = 1 if step is None else step
        if not is_int(step) or step < 1:
            found.add(where, f"step must be an integer >= 1, got {short_repr(step)}")
            return []
        return list(range(start, stop + 1, step))
    found.add(where, f"scale must be 'log2' or 'linear', got {short_repr(scale)}")
    return []


def _algorithm_names(found: _Problems, raw: Any) -> tuple[str, ...]:
    """``model.algorithm``: one name, or a list of names to compare in one sweep."""
    names = [raw] if isinstance(raw, str) else raw
    expected = describe([Options(*algorithms.ALGORITHMS)])
    if not isinstance(names, list) or not names:
        found.add("model.algorithm", f"must be {expected} or a list of them, got {short_repr(raw)}")
        return ()
    bad = [n for n in names if not isinstance(n, str) or n not in algorithms.ALGORITHMS]
    if bad:
        found.add("model.algorithm", f"must be {expected}, got {short_repr(bad[0])}")
        return ()
    if len(set(names)) != len(names):
        found.add("model.algorithm", f"repeated algorithms in {short_repr(names)}")
        return ()
    return tuple(names)


def _model(found: _Problems, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        found.add("model", f"expected a mapping, got {type(raw).__name__}")
        return {}
    names = _algorithm_names(found, raw.get("algorithm", "lloyd"))
    if not names:
        return {}
    if "k" not in raw:
        found.add("model.k", "required key is missing")
    k = _expand_k(found, raw["k"]) if "k" in raw else ()
    params = {key: v for key, v in raw.items() if key not in ("algorithm", "k")}
    rules_of = {name: algorithms.get(name).job_rules() for name in names}
    for key, value in params.items():
        takers = [name for name in names if key in rules_of[name]]
        if not takers:
            known = sorted({r for rules in rules_of.values() for r in rules})
            which = f"algorithm {names[0]!r}" if len(names) == 1 else f"algorithms {list(names)}"
            found.add(
                f"model.{key}",
                f"unknown key for {which} (expected one of: algorithm, k, {', '.join(known)})",
            )
            continue
        for message in dict.fromkeys(
            m for name in takers for _, m in problems({key: value}, rules_of[name])
        ):
            found.add(f"model.{key}", message)
    algorithm: str | tuple[str, ...] = names[0] if len(names) == 1 else names
    return {"algorithm": algorithm, "k": k, "params": dict(params)}


def _features_problems(found: _Problems, features: dict[str, Any]) -> None:
    if features.get("kind") == "patches":
        if features.get("size") is None:
            found.add("features.size", "required when kind is patches")
    elif any(
        features.get(key) for key in ("size", "stride", "pad", "drop_empty", *_SAMPLING_KEYS)
    ):
        found.add("features.kind", f"size/stride/pad/drop_empty/{'/'.join(_SAMPLING_KEYS)} "
                  "need kind: patches")


def _evaluate(found: _Problems, raw: Any, kind: str) -> tuple[tuple[str, ...], Any]:
    """``evaluate``: metric names, and at most one ``{sparse_coding: {method: ..., ...}}``
    step; returns the names and the :class:`~dkm.coding.SparseCoding` (or None)."""
    entries = [raw] if isinstance(raw, str | Mapping) else raw
    expected = "a list of metric names and {sparse_coding: {...}}"
    if not isinstance(entries, list):
        found.add("evaluate", f"expected {expected}, got {short_repr(raw)}")
        return (), None
    names, coding, bad = [], None, []
    for entry in entries:
        if isinstance(entry, Mapping):
            coding = _sparse_coding(found, entry, kind, coding)
        elif isinstance(entry, str):
            names.append(entry)
        else:
            bad.append(entry)
    if bad:  # one line however many: the list may be a YAML alias bomb
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        found.add("evaluate", f"expected {expected}, got {short_repr(bad[0])}{more}")
    for metric in names:
        info = evaluate.METRICS.get(metric)
        if info is None:
            found.add(
                "evaluate",
                f"unknown metric {metric!r} (expected: {', '.join(evaluate.METRICS)}, "
                "or {sparse_coding: {...}})",
            )
        elif info.needs_labels and kind == "patches":
            found.add("evaluate", f"{metric} compares sample labels; patches have none")
        elif info.needs_patches and kind != "patches":
            found.add("evaluate", f"{metric} needs features.kind: patches")
        elif info.needs_coding and coding is None:
            found.add("evaluate", f"{metric} needs a sparse_coding step in evaluate")
    return tuple(dict.fromkeys(names)), coding


def _sparse_coding(found: _Problems, entry: Mapping, kind: str, earlier: Any) -> Any:
    from dkm.coding import SparseCoding

    if list(entry) != ["sparse_coding"]:
        found.add(
            "evaluate",
            f"a mapping entry must be {{sparse_coding: {{method: ...}}}}, got {short_repr(entry)}",
        )
        return earlier
    if earlier is not None:
        found.add("evaluate.sparse_coding", "given twice; give one sparse_coding step")
        return earlier
    if kind != "patches":
        found.add("evaluate.sparse_coding", "needs features.kind: patches")
        return None
    options = entry["sparse_coding"]
    if not isinstance(options, Mapping):
        found.add(
            "evaluate.sparse_coding",
            f"expected a mapping such as {{method: omp, n_nonzero_coefs: 2}}, got "
            f"{short_repr(options)}",
        )
        return None
    bad = SparseCoding.problems(options)
    for key, message in bad:
        found.add(f"evaluate.sparse_coding.{key}", message)
    return None if bad else SparseCoding.from_dict(dict(options))


def parse_job(raw: Any, source: str = "job") -> JobSpec:
    """Validate a job given as plain data (what YAML loads to).

    Raises
    ------
    JobSpecError
        Listing every problem, each with the key it concerns.
    """
    found = _Problems()
    if not isinstance(raw, Mapping):
        raise JobSpecError(
            [("(top)", f"a job is a mapping of sections, got {type(raw).__name__}")], source
        )
    for key in raw:
        if key not in _SECTIONS:
            found.add(str(key), f"unknown section (expected one of: {', '.join(_SECTIONS)})")
    for key in ("name", "data", "model", "output"):
        if key not in raw:
            found.add(key, "required section is missing")

    name = raw.get("name", "")
    if "name" in raw and (not isinstance(name, str) or not name.strip()):
        found.add("name", f"expected a non-empty string, got {short_repr(name)}")

    data = _section(found, raw.get("data"), "data") if "data" in raw else {}
    if "dataset" in data and isinstance(data.get("options", {}), Mapping):
        for key, message in catalog.check_options(data["dataset"], data.get("options", {})):
            found.add(f"data.options.{key}", message)

    features = _section(found, raw.get("features"), "features")
    _features_problems(found, features)
    model = _model(found, raw["model"]) if "model" in raw else {}
    metrics, coding = _evaluate(
        found, raw.get("evaluate", ["inertia"]), features.get("kind", "pixels")
    )
    output = _section(found, raw.get("output"), "output") if "output" in raw else {}
    cluster = _section(found, raw.get("cluster"), "cluster")
    address = cluster.get("address")
    if address is not None and not address.startswith(("tcp://", "tls://", "inproc://")):
        found.add("cluster.address", f"expected a tcp:// or tls:// address, got {address!r}")
    limit = cluster.get("memory_limit")
    if isinstance(limit, str) and limit != "auto":
        from dask.utils import parse_bytes

        try:
            parse_bytes(limit)
        except (ValueError, TypeError):
            found.add(
                "cluster.memory_limit", f"expected a size such as '4GiB' or 'auto', got {limit!r}"
            )

    kind = features.get("kind", "pixels")
    if output.get("reconstructions") and kind != "patches":
        found.add("output.reconstructions", "images are rebuilt from patches: needs kind: patches")
    if output.get("codes") and coding is None:
        found.add("output.codes", "stores sparse codes: needs a sparse_coding step in evaluate")

    if found:
        raise JobSpecError(list(found), source)
    return JobSpec(
        name=name.strip(),
        data=DataSpec(**data),
        features=FeatureSpec(**features),
        model=ModelSpec(**model),
        evaluate=metrics,
        sparse_coding=coding,
        output=OutputSpec(**output),
        cluster=ClusterSpec(**cluster),
    )


def check_against_data(
    spec: JobSpec, shape: catalog.DataShape, where: str
) -> list[tuple[str, str]]:
    """Problems of a valid job that only the data reveals (k above the number of vectors,
    a patch larger than the padded image, a split or labels the data lacks).

    Parameters
    ----------
    spec : JobSpec
    shape : DataShape
        What the dataset store (or the catalog) says of the data.
    where : str
        How to name the data in messages (the dataset store path).
    """
    found = _Problems()
    f = spec.features
    n = shape.n_samples
    if f.split != "all":
        if shape.splits and f.split not in shape.splits:
            found.add(
                "features.split",
                f"{where} has no {f.split!r} samples (it has: {', '.join(shape.splits)})",
            )
            return list(found)
        n = shape.splits.get(f.split, n)
    what, bound = "samples", ""
    if f.kind == "patches":
        if not shape.has_images:
            found.add(
                "features.kind", f"{where} holds feature vectors, not images to cut patches from"
            )
            return list(found)
        layout = f.layout
        for message in layout.image_problems(shape.sample_shape):
            found.add("features.size", f"{message} of {where}")
        if found:
            return list(found)
        n *= layout.most_per_image(shape.sample_shape)
        what, bound = "patches", "at most " if layout.drop_empty else ""
    for k in spec.model.k:
        if k > n:
            found.add("model.k", f"{k} > {bound}{n} {what} in {where}")
    if not shape.has_labels:
        for metric in spec.evaluate:
            if evaluate.METRICS[metric].needs_labels:
                found.add("evaluate", f"{metric} needs labels; {where} has none")
    return list(found)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that refuses a key given twice in one mapping (YAML would keep the last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


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
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or "not a text file"
        raise JobSpecError([("(file)", f"cannot read the job file ({reason})")], str(path)) from err
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        problem = getattr(err, "problem", None) or str(err)
        raise JobSpecError([(where, f"not valid YAML: {problem}")], str(path)) from err
    return parse_job(raw, str(path))
