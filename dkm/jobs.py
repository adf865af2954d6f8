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
from dkm.features import FEATURE_KINDS, SPLITS, PatchLayout, autoencoder
from dkm.features.learned import LEARNED_RULES, learner_from, learner_problems

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
    # The learned kinds' own keys (n_components, whiten, filters, ...), as the job gives them;
    # their defaults belong to the learner (dkm.features.learned).
    learned: dict[str, Any] = field(default_factory=dict)

    @property
    def learner(self) -> Any:
        """The learned-feature spec (:mod:`dkm.features.learned`) of a ``pca`` or
        ``autoencoder`` job, else None."""
        if self.kind not in LEARNED_RULES:
            return None
        return learner_from(self.kind, {**self.learned, "seed": self.seed})

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
    # Splits scored besides the fitted samples (evaluate.on), and the silhouette's sample.
    evaluate_on: tuple[str, ...] = ()
    silhouette_sample: int | None = None

    @property
    def heldout(self) -> tuple[str, ...]:
        """The splits of ``evaluate.on`` other than the one fitted: each is scored with the
        model (and the cluster-to-label maps) of the fitted samples, its metrics stored as
        ``<split>_<metric>``."""
        return tuple(s for s in self.evaluate_on if s != self.features.split)
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
        out["features"].update(out["features"].pop("learned"))
        coding = out.pop("sparse_coding")
        on, sample = out.pop("evaluate_on"), out.pop("silhouette_sample")
        if coding is not None:
            out["evaluate"] = [*out["evaluate"], {"sparse_coding": self.sparse_coding.to_dict()}]
        if on or sample is not None:
            out["evaluate"] = {"metrics": out["evaluate"], "on": on, "silhouette_sample": sample}
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
        # The learned kinds' keys; _features_problems checks them against their kind's rules.
        **{key: r for rules in LEARNED_RULES.values() for key, r in rules.items() if key != "seed"},
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
    before = len(found)
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
    if len(found) == before:  # rules between parameters, once each passes its own
        for name in names:
            entry = algorithms.get(name)
            taken = {key: v for key, v in params.items() if key in rules_of[name]}
            for key, message in entry.estimator.joint_problems(entry.params(taken)):
                found.add(f"model.{key}", message)
    algorithm: str | tuple[str, ...] = names[0] if len(names) == 1 else names
    return {"algorithm": algorithm, "k": k, "params": dict(params)}


_LEARNED_KEYS = {key for rules in LEARNED_RULES.values() for key in rules if key != "seed"}


def _features_problems(found: _Problems, features: dict[str, Any]) -> dict[str, Any]:
    """Checks across the features keys; moves the learned kinds' keys under ``learned``."""
    kind = features.get("kind", "pixels")
    learned = {key: features.pop(key) for key in list(features) if key in _LEARNED_KEYS}
    if kind == "patches":
        if features.get("size") is None:
            found.add("features.size", "required when kind is patches")
    else:
        sampling = ("patches_per_image", "normalize") if kind in LEARNED_RULES else _SAMPLING_KEYS
        if any(features.get(key) for key in ("size", "stride", "pad", "drop_empty", *sampling)):
            found.add(
                "features.kind",
                f"size/stride/pad/drop_empty/{'/'.join(sampling)} need kind: patches",
            )
    rules = LEARNED_RULES.get(kind, {})
    for key in learned:
        if key not in rules:
            takers = [k for k, r in LEARNED_RULES.items() if key in r]
            found.add(f"features.{key}", f"needs kind: {' or '.join(takers)}")
    if kind == "autoencoder" and autoencoder.missing_extra():
        found.add("features.kind", autoencoder.MISSING_EXTRA.removeprefix("features.kind: "))
    if kind in LEARNED_RULES:
        given = {k: v for k, v in learned.items() if k in rules}
        for key, message in learner_problems(kind, {**given, "seed": features.get("seed", 0)}):
            found.add(f"features.{key}", message)
    features["learned"] = learned
    return features


_EVALUATE_KEYS = ("metrics", "on", "silhouette_sample", "sparse_coding")


def _evaluate(found: _Problems, raw: Any, kind: str) -> dict[str, Any]:
    """``evaluate``: a list of metric names and at most one ``{sparse_coding: {...}}`` step,
    or the mapping ``{metrics, on, silhouette_sample, sparse_coding}``; returns the JobSpec
    fields it sets (``evaluate``, ``sparse_coding``, ``evaluate_on``, ``silhouette_sample``)."""
    out: dict[str, Any] = {}
    if isinstance(raw, Mapping) and True in raw and "on" not in raw:
        # YAML 1.1 (PyYAML) reads a bare `on:` key as the boolean true.
        raw = {("on" if key is True else key): v for key, v in raw.items()}
    if isinstance(raw, Mapping) and set(raw) - {"sparse_coding"}:
        unknown = [str(k) for k in raw if k not in _EVALUATE_KEYS]
        if unknown:
            found.add(
                f"evaluate.{unknown[0]}",
                f"unknown key (expected one of: {', '.join(_EVALUATE_KEYS)})",
            )
        metrics = raw.get("metrics", ["inertia"])
        entries = [metrics] if isinstance(metrics, str) else metrics
        if "sparse_coding" in raw and isinstance(entries, list):
            entries = [*entries, {"sparse_coding": raw["sparse_coding"]}]
        out["evaluate_on"] = _evaluate_on(found, raw.get("on", []), kind)
        sample = raw.get("silhouette_sample")
        if sample is not None:
            bad = problems({"silhouette_sample": sample}, evaluate.SILHOUETTE_RULES)
            for _, message in bad:
                found.add("evaluate.silhouette_sample", message)
            out["silhouette_sample"] = None if bad else sample
    else:
        entries = [raw] if isinstance(raw, str | Mapping) else raw
    expected = "a list of metric names and {sparse_coding: {...}}"
    if not isinstance(entries, list):
        found.add("evaluate", f"expected {expected}, got {short_repr(raw)}")
        return out
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
    if out.get("silhouette_sample") is not None and "silhouette" not in names:
        found.add("evaluate.silhouette_sample", "is the silhouette's sample: add silhouette "
                  "to evaluate.metrics, or remove it")
    return {**out, "evaluate": tuple(dict.fromkeys(names)), "sparse_coding": coding}


def _evaluate_on(found: _Problems, raw: Any, kind: str) -> tuple[str, ...]:
    """``evaluate.on``: the splits to score (the fitted one and held-out ones)."""
    splits = [raw] if isinstance(raw, str) else raw
    named = [s for s in SPLITS if s != "all"]
    if not isinstance(splits, list) or any(s not in named for s in splits):
        found.add("evaluate.on", f"expected a list of splits ({', '.join(named)}), got "
                  f"{short_repr(raw)}")
        return ()
    if splits and kind == "patches":
        found.add("evaluate.on", "held-out scoring scores samples; patches are not samples "
                  "(use kind pixels, pca or autoencoder)")
        return ()
    return tuple(dict.fromkeys(splits))


def _mixture_problems(found: _Problems, names: tuple[str, ...], model: dict[str, Any]) -> None:
    algorithms_ = model.get("algorithm")
    if algorithms_ is None:
        return
    algorithms_ = (algorithms_,) if isinstance(algorithms_, str) else algorithms_
    if "gmm" in algorithms_:
        return
    for metric in names:
        if evaluate.METRICS[metric].needs_mixture if metric in evaluate.METRICS else False:
            found.add("evaluate", f"{metric} scores a mixture: needs model.algorithm: gmm")


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

    features = _features_problems(found, _section(found, raw.get("features"), "features"))
    model = _model(found, raw["model"]) if "model" in raw else {}
    scoring = _evaluate(found, raw.get("evaluate", ["inertia"]), features.get("kind", "pixels"))
    _mixture_problems(found, scoring.get("evaluate", ()), model)
    coding = scoring.get("sparse_coding")
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
        **scoring,
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
    for split in spec.evaluate_on:
        if split not in shape.splits:
            have = ", ".join(shape.splits) if shape.splits else "no split variable"
            found.add("evaluate.on", f"{where} has no {split!r} samples (it has: {have})")
    if spec.silhouette_sample is not None and spec.silhouette_sample > n:
        found.add(
            "evaluate.silhouette_sample",
            f"{spec.silhouette_sample} > the {n} samples clustered in {where}; leave it out to "
            "score them all",
        )
    what, bound = "samples", ""
    if f.kind in LEARNED_RULES:
        for key, message in f.learner.data_problems(
            n, shape.sample_shape, images=shape.has_images
        ):
            found.add(f"features.{key}", f"{message} ({where})")
        if found:
            return list(found)
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
