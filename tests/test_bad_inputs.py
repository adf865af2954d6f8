"""Malformed input, given the way a user would give it, and the one clear error dkm answers.

One table (``CASES``) holds every kind of bad input we know of: job files (J..), datasets and
their readers (D..), arguments of the Python API (A..), scheduler addresses (C..) and damaged
or half-written stores (S..). Each row pins what dkm must do *now*:

- the command exits 1 (2 for a click usage error) with a short ``dkm: error: ...`` on stderr
  that names the problem and the key, option or flag that fixes it; the API raises
  ``ValueError`` / ``TypeError`` / ``StoreError`` (or the standard exception of the case);
- never a traceback, never a hang (every command runs under a deadline);
- nothing that looks complete is left behind: no new store :func:`is_complete` accepts and no
  results store whose status is ``complete``;
- where the input is in fact valid, it keeps working and gives the right result.

Rows with an id ending in ``+`` are extra cases found while writing the table.
"""

from __future__ import annotations

import copy
import http.server
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dkm.cli import main
from dkm.data import catalog
from dkm.data.store import StoreError, is_complete, read_attrs
from dkm.jobs import JobSpecError, parse_job
from dkm.kmeans import KMeans, MiniBatchKMeans
from dkm.results import ResultsStore, load_model, run_name, sweep_table
from dkm.results.store import as_variables

DKM = Path(sys.executable).with_name("dkm")
ERROR_PREFIX = "dkm: error:"
MAX_MESSAGE = 2000  # characters: an error is read, not scrolled
CLI_SECONDS = 20.0  # a command that fails on its input fails within this
SUBPROCESS_TIMEOUT = 90.0  # a hung subprocess is killed here (and the row fails)
FAST_TIMEOUT = "2s"  # dkm.scheduler.timeout for rows that (mean to) fail connecting


# ============================================================================ outcomes


@dataclass
class Outcome:
    """How one command (in-process or a subprocess) ended."""

    code: int | None
    stdout: str
    stderr: str
    seconds: float
    exception: BaseException | None = None
    left: set[Path] = field(default_factory=set)  # stores that look complete and are new

    @property
    def error(self) -> str:
        """The ``dkm: error: ...`` message (it may list problems on indented lines)."""
        at = self.stderr.find(ERROR_PREFIX)
        return "" if at < 0 else self.stderr[at:]


def complete_stores(root: Path) -> set[Path]:
    """Stores under ``root`` that look finished: complete dkm stores, complete results."""
    found = set()
    if not root.exists():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if "zarr.json" not in filenames:
            continue
        path = Path(dirpath)
        dirnames[:] = []  # never look inside a store
        if is_complete(path):
            found.add(path)
            continue
        try:
            attrs = read_attrs(path)
        except StoreError:
            continue
        if attrs.get("dkm_store") == "results" and attrs.get("status") == "complete":
            found.add(path)
    return found


class Ctx:
    """What a row needs: a scratch directory, commands, and fixtures fetched on demand."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch):
        self.request = request
        self.tmp = tmp_path
        self.monkeypatch = monkeypatch

    # -- fixtures only the rows that use them pay for
    @cached_property
    def cluster(self) -> str:
        """Address of the session's two-process cluster."""
        return self.request.getfixturevalue("process_cluster").scheduler_address

    @cached_property
    def closed_port(self) -> int:
        return self.request.getfixturevalue("closed_port")

    @cached_property
    def digits(self) -> Path:
        """A complete digits dataset store shared by the module (read-only)."""
        return self.request.getfixturevalue("digits_store")

    @cached_property
    def results(self) -> Path:
        """A results store (in this row's scratch directory) with runs lloyd-k4, lloyd-k8."""
        return make_results_store(self.tmp / "results.zarr")

    def fixture(self, name: str):
        return self.request.getfixturevalue(name)

    # -- commands
    def cli(self, *args, env: dict | None = None) -> Outcome:
        """``dkm ARGS`` in-process (no cluster is started unless a row asks for one)."""
        before = complete_stores(self.tmp)
        start = time.monotonic()
        result = CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=True)
        seconds = time.monotonic() - start
        after = complete_stores(self.tmp)
        exception = result.exception
        if isinstance(exception, SystemExit):
            exception = None
        return Outcome(
            result.exit_code, result.stdout, result.stderr, seconds, exception, after - before
        )

    def proc(
        self,
        *args,
        env: dict | None = None,
        timeout: float = SUBPROCESS_TIMEOUT,
        preexec_fn: Callable[[], None] | None = None,
        cwd: Path | None = None,
    ) -> Outcome:
        """``dkm ARGS`` as a separate process, killed after ``timeout`` seconds."""
        before = complete_stores(self.tmp)
        start = time.monotonic()
        done = subprocess.run(
            [str(DKM), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            preexec_fn=preexec_fn,
            cwd=cwd or self.tmp,
        )
        seconds = time.monotonic() - start
        left = complete_stores(self.tmp) - before
        return Outcome(done.returncode, done.stdout, done.stderr, seconds, None, left)

    def run_job(self, job: dict | str | bytes, *flags) -> Outcome:
        """``dkm run`` on a job written here; a job that passes its checks finds no scheduler
        at ``$DKM_SCHEDULER`` (a closed port), so it can never start a LocalCluster."""
        path = self.write("job.yaml", job)
        env = {"DKM_SCHEDULER": f"tcp://127.0.0.1:{self.closed_port}"}
        with dask.config.set({"dkm.scheduler.timeout": FAST_TIMEOUT}):
            return self.cli("run", path, *flags, env=env)

    def write(self, name: str, content: dict | str | bytes) -> Path:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(yaml.safe_dump(content, sort_keys=False))
        return path

    def job(self, changes: dict[str, Any] | None = None) -> dict:
        """A valid job on the shared digits store, with dotted keys changed (DELETE: removed)."""
        job = copy.deepcopy(
            {
                "name": "bad-input",
                "data": {"dataset": "digits", "store": str(self.digits)},
                "features": {"kind": "pixels"},
                "model": {"algorithm": "lloyd", "k": 4, "max_iter": 5, "init": "k-means++"},
                "evaluate": ["inertia"],
                "output": {"store": str(self.tmp / "out.zarr")},
            }
        )
        for dotted, value in (changes or {}).items():
            *parents, last = dotted.split(".")
            node = job
            for p in parents:
                node = node.setdefault(p, {})
            if value is DELETE:
                node.pop(last, None)
            else:
                node[last] = value
        return job


DELETE = object()


def assert_error(out: Outcome, *needles: str, codes=(1,), seconds: float = CLI_SECONDS) -> None:
    """One clear error: exit code, ``dkm: error:`` naming every needle, no traceback, in time,
    nothing complete-looking left behind."""
    shown = (
        f"exit {out.code} after {out.seconds:.1f} s\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    )
    assert out.exception is None, f"uncaught {out.exception!r}\n{shown}"
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, shown
    assert out.code in codes, shown
    message = out.error if 1 in codes and out.code == 1 else out.stderr
    if out.code == 1:
        assert message, f"no {ERROR_PREFIX!r} line\n{shown}"
    assert message.strip(), shown
    assert len(message) < MAX_MESSAGE, f"{len(message)} characters\n{shown}"
    for needle in needles:
        if isinstance(needle, re.Pattern):
            assert needle.search(message), f"{needle.pattern!r} not in the message\n{shown}"
        else:
            assert needle in message, f"{needle!r} not in the message\n{shown}"
    assert out.seconds < seconds, f"took {out.seconds:.1f} s\n{shown}"
    assert not out.left, f"left behind, looking complete: {sorted(map(str, out.left))}\n{shown}"


def assert_ok(out: Outcome) -> None:
    shown = f"exit {out.code}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    assert out.exception is None, f"uncaught {out.exception!r}\n{shown}"
    assert out.code == 0, shown
    assert "Traceback" not in out.stderr, shown


def api_error(call: Callable[[], Any], types, *needles: str, seconds: float = 30.0) -> None:
    """``call()`` raises one of ``types`` whose message names every needle, quickly."""
    start = time.monotonic()
    with dask.config.set(scheduler="sync"), pytest.raises(types) as info:
        call()
    message = str(info.value)
    assert time.monotonic() - start < seconds
    assert len(message) < MAX_MESSAGE, message
    for needle in needles:
        if isinstance(needle, re.Pattern):
            assert needle.search(message), f"{needle.pattern!r} not in {message!r}"
        else:
            assert needle in message, f"{needle!r} not in {message!r}"


def icase(pattern: str) -> re.Pattern:
    """A needle matched as a case-insensitive regular expression."""
    return re.compile(pattern, re.IGNORECASE)


# ============================================================================ fixtures


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("bad-inputs-data") / "digits.zarr"
    catalog.ingest("digits", store)
    return store


@pytest.fixture
def ctx(request, tmp_path, monkeypatch) -> Ctx:
    monkeypatch.delenv("DKM_SCHEDULER", raising=False)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    return Ctx(request, tmp_path, monkeypatch)


def make_results_store(path: Path) -> Path:
    """A finished results store written through its API: runs lloyd-k4 and lloyd-k8."""
    results = ResultsStore(path)
    results.start_job({"job": {"name": "damaged"}, "tile_shape": [8, 8]})
    rng = np.random.default_rng(0)
    for k in (4, 8):
        hist = xr.Dataset(
            {"inertia": ("iteration", [3.0, 2.0]), "center_shift": ("iteration", [1.0, 0.1])}
        )
        results.write_run(
            run_name("lloyd", k),
            as_variables(
                centroids=rng.random((k, 64), dtype=np.float32),
                x_mean=np.zeros(64, np.float32),
            ),
            hist,
            {
                "algorithm": "lloyd",
                "k": k,
                "n_iter": 2,
                "inertia": 2.0 / k,
                "metrics": {},
                "params": {"random_state": 0},
            },
        )
    results.write_sweep(sweep_table([4, 8], {"inertia": [0.5, 0.25]}))
    results.finish("complete")
    return path


def chunk_files(array_dir: Path) -> list[Path]:
    """The chunk files of a Zarr v3 array, in key order."""
    return sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())


# ============================================================================ the rows

CASES: list[Case] = []


@dataclass(frozen=True)
class Case:
    id: str
    given: str  # the input, in words
    check: Callable[[Ctx], None]
    marks: tuple = ()


def row(id: str, given: str, *marks) -> Callable:
    def register(check: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        CASES.append(Case(id, given, check, marks))
        return check

    return register


def job_row(id: str, given: str, changes: dict, *needles, marks=()) -> None:
    """A row whose job is the valid one with ``changes``; it must fail before any cluster."""

    def check(ctx: Ctx) -> None:
        out = ctx.run_job(ctx.job(changes))
        assert_error(out, *needles)
        assert "Dask scheduler" not in out.stderr  # refused before connecting

    CASES.append(Case(id, given, check, tuple(marks)))


def text_job_row(id: str, given: str, text: str | bytes, *needles) -> None:
    """A row whose job file holds ``text`` as it is (YAML or not)."""
    CASES.append(Case(id, given, lambda ctx: assert_error(ctx.run_job(text), *needles)))


# ---------------------------------------------------------------------------- job files

text_job_row("J01", "an empty job file", "", "a job is a mapping of sections")
text_job_row("J02", "a YAML list instead of a mapping", "- name\n- data\n", "mapping", "list")
text_job_row("J03", "a bare YAML scalar", "42\n", "a job is a mapping of sections, got int")
text_job_row(
    "J04",
    "a YAML syntax error (unclosed bracket)",
    "name: x\nmodel: {k: [4, 8\n",
    "not valid YAML",
    icase(r"line \d+, column \d+"),
)
job_row("J05", "unknown section 'modle'", {"modle": {"k": 4}}, "modle: unknown section")
job_row(
    "J06",
    "unknown key model.n_clusters",
    {"model.n_clusters": 4},
    "model.n_clusters",
    "unknown key",
)
job_row("J07", "k: 0", {"model.k": 0}, "model.k", "k must be >= 1, got 0")
job_row("J08", "k: -5", {"model.k": -5}, "model.k", "k must be >= 1, got -5")
job_row("J09", "k: 10**9", {"model.k": 10**9}, "model.k", "k must be <= 16384")
job_row("J10", "k: '16' (a string)", {"model.k": "16"}, "model.k", "'16'")
job_row("J11", "k: [] (an empty list)", {"model.k": []}, "model.k", "empty list")
job_row(
    "J12",
    "k range with start > stop",
    {"model.k": {"start": 64, "stop": 8}},
    "model.k",
    "start=64, stop=8",
)


@row("J13", "k range 1..10**9 linear (would be a billion runs), under a 3 GiB address space")
def _j13(ctx: Ctx) -> None:
    job = ctx.job({"model.k": {"start": 1, "stop": 10**9, "scale": "linear"}})
    out = ctx.proc("run", ctx.write("job.yaml", job), "--dry-run", preexec_fn=limit_memory)
    assert_error(out, "model.k", "k must be <= 16384", seconds=30)


job_row(
    "J14",
    "k range scale: cubic",
    {"model.k": {"start": 2, "stop": 8, "scale": "cubic"}},
    "model.k",
    "'cubic'",
)
job_row("J15", "k: 16.5", {"model.k": 16.5}, "model.k", "16.5")
job_row("J16", "k: true", {"model.k": True}, "model.k", "True")
job_row("J17", "max_iter: 0", {"model.max_iter": 0}, "model.max_iter", ">= 1")
job_row("J18", "tol: -1", {"model.tol": -1}, "model.tol", ">= 0")
job_row("J19", "tol: .nan", {"model.tol": float("nan")}, "model.tol", "nan")
job_row("J20", "algorithm: kmedoids", {"model.algorithm": "kmedoids"}, "model.algorithm", "'lloyd'")
job_row(
    "J20+",
    "algorithm: [] (a list: unhashable)",
    {"model.algorithm": []},
    "model.algorithm",
)
job_row("J21", "init: kmeans++ (typo)", {"model.init": "kmeans++"}, "model.init", "'k-means++'")
job_row(
    "J22",
    "empty_cluster: drop",
    {"model.empty_cluster": "drop"},
    "model.empty_cluster",
    "'farthest'",
)
job_row("J23", "dtype: float16", {"model.dtype": "float16"}, "model.dtype", "'float32'")
job_row(
    "J23+",
    "dtype: {x: y} (a mapping)",
    {"model.dtype": {"x": "y"}},
    "model.dtype",
    "'float32'",
)
job_row(
    "J24", "random_state: -1", {"model.random_state": -1}, "model.random_state", "[0, 2**32 - 1]"
)
job_row("J25", "n_init: 0", {"model.n_init": 0}, "model.n_init", ">= 1")
job_row(
    "J26",
    "minibatch with batch_size: 0",
    {"model.algorithm": "minibatch", "model.batch_size": 0},
    "model.batch_size",
    ">= 1",
)
job_row(
    "J27",
    "unknown dataset 'mnist-10k'",
    {"data.dataset": "mnist-10k"},
    "data.dataset",
    "'mnist-10k'",
)
job_row(
    "J28", "data.store missing", {"data.store": DELETE}, "data.store", "required key is missing"
)
job_row("J29", "name: '' (empty)", {"name": ""}, "name", "non-empty string")
job_row("J30", "k = 2000 > the 1797 digits", {"model.k": 2000}, "model.k", "2000 > 1797 samples")


@row("J31", "output.store is an existing regular file")
def _j31(ctx: Ctx) -> None:
    target = ctx.write("out.zarr", "not a store\n")
    out = ctx.run_job(ctx.job({"output.store": str(target)}))
    assert_error(out, "output.store", str(target), "regular file")
    assert target.read_text() == "not a store\n"


@row("J32", "output.store is an existing regular file, with --resume")
def _j32(ctx: Ctx) -> None:
    target = ctx.write("out.zarr", "not a store\n")
    out = ctx.run_job(ctx.job({"output.store": str(target)}), "--resume")
    assert_error(out, "output.store", str(target), "regular file")
    assert target.read_text() == "not a store\n"


@row("J33", "data.store is an existing regular file")
def _j33(ctx: Ctx) -> None:
    target = ctx.write("data.zarr", "not a store\n")
    out = ctx.run_job(ctx.job({"data.store": str(target)}))
    assert_error(out, "data.store", str(target), "regular file")
    assert target.read_text() == "not a store\n"


@row("J34", "output.store '../../escape.zarr' (a relative path upwards): valid, written there")
def _j34(ctx: Ctx) -> None:
    workdir = ctx.tmp / "a" / "b"
    workdir.mkdir(parents=True)
    ctx.monkeypatch.chdir(workdir)
    job = ctx.job({"output.store": "../../escape-J34.zarr", "model.k": 3})
    out = ctx.cli("run", ctx.write("job.yaml", job), "--scheduler", ctx.cluster)
    assert_ok(out)
    store = ctx.tmp / "escape-J34.zarr"
    assert read_attrs(store)["status"] == "complete"
    assert load_model(store, "lloyd-k3").cluster_centers_.shape == (3, 64)


@row(
    "J35",
    "output.store under /proc (cannot be created)",
)
def _j35(ctx: Ctx) -> None:
    target = "/proc/dkm-bad-input-J35.zarr"
    job = ctx.job({"output.store": target})
    out = ctx.cli("run", ctx.write("job.yaml", job), "--scheduler", ctx.cluster)
    assert_error(out, "output.store", target)
    assert not Path(target).exists()


job_row("J36", "output.store: '' (empty)", {"output.store": ""}, "output.store", "non-empty string")


@row("J37", "features.store pointing at the dataset store (not a patch store)")
def _j37(ctx: Ctx) -> None:
    data = ctx.tmp / "digits.zarr"
    shutil.copytree(ctx.digits, data)
    job = ctx.job(
        {
            "data.store": str(data),
            "features": {"kind": "patches", "size": 4, "store": str(data)},
            "evaluate": ["inertia"],
        }
    )
    with dask.config.set({"dkm.scheduler.timeout": FAST_TIMEOUT}):
        out = ctx.cli("run", ctx.write("job.yaml", job), "--scheduler", ctx.cluster)
    assert_error(out, "features.store", str(data), "dataset store")
    assert is_complete(data) and read_attrs(data)["dkm_store"] == "dataset"  # untouched


job_row(
    "J38",
    "patch size 100 on 8x8 digits",
    {"features": {"kind": "patches", "size": 100}},
    "features.size",
    "100",
)
job_row(
    "J39",
    "features.pad: -1 and stride: 0",
    {"features": {"kind": "patches", "size": 4, "pad": -1, "stride": 0}},
    "features.pad",
    "features.stride",
)
job_row(
    "J40",
    "evaluate: accuracy on patches",
    {"features": {"kind": "patches", "size": 4}, "evaluate": ["accuracy"]},
    "evaluate",
    "accuracy",
    "patches",
)
job_row("J41", "evaluate: [bogus]", {"evaluate": ["bogus"]}, "evaluate", "unknown metric 'bogus'")
job_row(
    "J42", "cluster.address: garbage", {"cluster.address": "garbage"}, "cluster.address", "tcp://"
)
job_row(
    "J43",
    "cluster.memory_limit: 'lots'",
    {"cluster.memory_limit": "lots"},
    "cluster.memory_limit",
    "'lots'",
)
job_row("J44", "cluster.n_workers: 0", {"cluster.n_workers": 0}, "cluster.n_workers", ">= 1")
job_row(
    "J45",
    "output.checkpoint_every: 0",
    {"output.checkpoint_every": 0},
    "output.checkpoint_every",
    ">= 1",
)
job_row(
    "J46",
    "features.split: test on a dataset that has only train",
    {"features.split": "test"},
    "features.split",
    "no 'test' samples",
)


def _synthetic(ctx: Ctx, **options) -> dict:
    return ctx.job(
        {
            "data": {
                "dataset": "synthetic",
                "store": str(ctx.tmp / "synthetic.zarr"),
                "options": options,
            }
        }
    )


@row("J47", "synthetic option typo n_sample")
def _j47(ctx: Ctx) -> None:
    assert_error(ctx.run_job(_synthetic(ctx, n_sample=100)), "data.options.n_sample", "n_samples")


@row("J48", "synthetic n_samples: -5")
def _j48(ctx: Ctx) -> None:
    assert_error(ctx.run_job(_synthetic(ctx, n_samples=-5)), "data.options.n_samples", ">= 1")


@row("J49", "synthetic n_samples: 10 with k: 16")
def _j49(ctx: Ctx) -> None:
    job = _synthetic(ctx, n_samples=10)
    job["model"]["k"] = 16
    assert_error(ctx.run_job(job), "model.k", "16 > 10 samples")


@row("J50", "the job file is a directory")
def _j50(ctx: Ctx) -> None:
    (ctx.tmp / "job.yaml").mkdir()
    out = ctx.cli("run", ctx.tmp / "job.yaml")
    assert_error(out, str(ctx.tmp / "job.yaml"), "cannot read the job file", codes=(1, 2))


@row("J51", "the job file does not exist")
def _j51(ctx: Ctx) -> None:
    out = ctx.cli("run", ctx.tmp / "nope.yaml")
    assert_error(out, "nope.yaml", icase("no such file"), codes=(1, 2))


text_job_row(
    "J52",
    "binary garbage as the job file",
    bytes(range(256)) * 8,
    "job.yaml",
    icase("cannot read the job file|not valid YAML|not a text file"),
)


@row("J53", "a YAML alias bomb (9 levels x 10) in evaluate, under a 3 GiB address space")
def _j53(ctx: Ctx) -> None:
    lines = ["  - &a0 [" + ", ".join(["inertia"] * 10) + "]"]
    for level in range(1, 9):
        lines.append(f"  - &a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]")
    job = ctx.job()
    job.pop("evaluate")
    text = yaml.safe_dump(job, sort_keys=False) + "evaluate:\n" + "\n".join(lines) + "\n"
    out = ctx.proc("run", ctx.write("job.yaml", text), "--dry-run", preexec_fn=limit_memory)
    assert_error(out, "evaluate", "expected a list of metric names", seconds=30)


text_job_row(
    "J54",
    "the key 'model' given twice",
    "name: x\ndata: {dataset: digits, store: d.zarr}\nmodel: {k: 4}\nmodel: {k: 8}\n"
    "output: {store: o.zarr}\n",
    "duplicate key 'model'",
)
job_row(
    "J55",
    "data.options is not a mapping (options: 5)",
    {"data.options": 5},
    "data.options",
    "mapping",
)


@row("J56", "existing complete synthetic store (n_samples 5000), job asks n_samples 2000")
def _j56(ctx: Ctx) -> None:
    store = ctx.tmp / "synthetic.zarr"
    with dask.config.set(scheduler="sync"):
        catalog.ingest("synthetic", store, n_samples=5000, n_features=4)
    before = read_attrs(store)["dkm_write_id"]
    out = ctx.run_job(_synthetic(ctx, n_samples=2000, n_features=4))
    assert_error(out, "data.store", str(store), "n_samples=5000", "n_samples=2000")
    assert read_attrs(store)["dkm_write_id"] == before  # left as it was
    assert not (ctx.tmp / "out.zarr").exists()


@row("J57", "--resume into a foreign Zarr store (a copy of a dataset store as output.store)")
def _j57(ctx: Ctx) -> None:
    foreign = ctx.tmp / "copy.zarr"
    shutil.copytree(ctx.digits, foreign)
    before = read_attrs(foreign)
    out = ctx.run_job(ctx.job({"output.store": str(foreign)}), "--resume")
    assert_error(out, "output.store", str(foreign), "dataset store", "not a results store")
    assert read_attrs(foreign) == before


@row("J58", "output.store == data.store, with --resume")
def _j58(ctx: Ctx) -> None:
    data = ctx.tmp / "digits.zarr"
    shutil.copytree(ctx.digits, data)
    before = read_attrs(data)
    out = ctx.run_job(ctx.job({"data.store": str(data), "output.store": str(data)}), "--resume")
    assert_error(out, "output.store", str(data), "not a results store")
    assert read_attrs(data) == before


def limit_memory() -> None:
    """``preexec_fn``: at most 3 GiB of address space, as the rows that met a bomb ran."""
    limit = 3 * 1024**3
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# ---------------------------------------------------------------------------- datasets, readers


def ingest(ctx: Ctx, name: str, *args) -> tuple[Outcome, Path]:
    store = ctx.tmp / "out-store.zarr"
    return ctx.cli("ingest", name, "--store", store, *args), store


def assert_ingest_error(ctx: Ctx, out: Outcome, store: Path, *needles) -> None:
    """A refused ingest: one error line, and neither the store nor its temporary exists."""
    assert_error(out, *needles)
    assert len(out.error.strip().splitlines()) == 1, out.error
    assert not store.exists()
    assert not list(store.parent.glob(f".{store.name}.tmp-*"))


def _mnist(ctx: Ctx, **kw) -> tuple[Path, dict]:
    directory = ctx.tmp / "mnist"
    return directory, ctx.fixture("make_mnist_dir")(directory, **kw)


def _idx_row(id: str, given: str, damage: Callable[[Path], None], *needles) -> None:
    def check(ctx: Ctx) -> None:
        directory, _ = _mnist(ctx, gz=False)
        target = directory / "train-images-idx3-ubyte"
        damage(target)
        out, store = ingest(ctx, "mnist", "--source", directory)
        assert_ingest_error(ctx, out, store, "train-images-idx3-ubyte", *needles)

    CASES.append(Case(id, given, check))


_idx_row(
    "D01",
    "IDX images file cut in the middle of its data",
    lambda p: p.write_bytes(p.read_bytes()[: 16 + 3000]),
    "truncated",
)
_idx_row(
    "D02",
    "IDX file with a zip magic number (PK)",
    lambda p: p.write_bytes(b"PK\x03\x04" + p.read_bytes()[4:]),
    "not an IDX file",
)
_idx_row(
    "D03",
    "IDX file cut to 6 bytes (inside its header)",
    lambda p: p.write_bytes(p.read_bytes()[:6]),
    "truncated IDX header",
)


@row("D04", "gzipped IDX file cut mid-stream")
def _d04(ctx: Ctx) -> None:
    directory, _ = _mnist(ctx, gz=True)
    target = directory / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:-200])
    out, store = ingest(ctx, "mnist", "--source", directory)
    assert_ingest_error(ctx, out, store, str(target), "truncated gzip")


@row("D05", "IDX images and labels that disagree in count (20 vs 19)")
def _d05(ctx: Ctx) -> None:
    directory = ctx.tmp / "mnist"
    directory.mkdir()
    write_idx = ctx.fixture("write_idx")
    write_idx(directory / "train-images-idx3-ubyte", np.zeros((20, 28, 28), np.uint8))
    write_idx(directory / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    out, store = ingest(ctx, "mnist", "--source", directory)
    assert_ingest_error(
        ctx,
        out,
        store,
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "(20, 28, 28)",
        "(19,)",
    )


@row("D06", "IDX header declaring 4e9 x 28 x 28 images in a tiny file")
def _d06(ctx: Ctx) -> None:
    import struct

    directory, _ = _mnist(ctx, gz=False)
    target = directory / "train-images-idx3-ubyte"
    target.write_bytes(struct.pack(">BBBBIII", 0, 0, 8, 3, 4_000_000_000, 28, 28) + bytes(100))
    out, store = ingest(ctx, "mnist", "--source", directory)
    assert_ingest_error(ctx, out, store, str(target), "truncated", "4000000000")


def _png(path: Path, value: int = 128, size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


@row("D06+", "IDX images of type float32 (would be wrapped into uint8 silently)")
def _d06_float(ctx: Ctx) -> None:
    directory, arrays = _mnist(ctx, gz=False)
    target = directory / "train-images-idx3-ubyte"
    ctx.fixture("write_idx")(target, arrays["train-images"].astype(np.float32) * 1.5)
    out, store = ingest(ctx, "mnist", "--source", directory)
    assert_ingest_error(ctx, out, store, str(target), "unsigned bytes", "float32")


@row("D07", "image folder with a text file named .png")
def _d07(ctx: Ctx) -> None:
    folder = ctx.tmp / "imgs"
    _png(folder / "a" / "0.png")
    (folder / "a" / "1.png").write_text("I am not a picture\n")
    out, store = ingest(ctx, "images", "--source", folder)
    assert_ingest_error(ctx, out, store, str(folder / "a" / "1.png"), "not a readable image")


@row("D08", "image folder with a stray .txt file: valid, the text file is ignored")
def _d08(ctx: Ctx) -> None:
    folder = ctx.tmp / "imgs"
    _png(folder / "a" / "0.png", 10)
    _png(folder / "b" / "1.png", 200)
    (folder / "a" / "README.txt").write_text("notes\n")
    out, store = ingest(ctx, "images", "--source", folder)
    assert_ok(out)
    ds = xr.open_zarr(store)
    assert ds["images"].shape == (2, 8, 8)
    assert ds["label"].values.tolist() == [0, 1]
    assert ds["images"].values[1].min() == 200


@row("D09", "image folder with images of different sizes and no --resize")
def _d09(ctx: Ctx) -> None:
    folder = ctx.tmp / "imgs"
    _png(folder / "0.png", size=(8, 8))
    _png(folder / "1.png", size=(9, 7))
    out, store = ingest(ctx, "images", "--source", folder)
    assert_ingest_error(ctx, out, store, str(folder), "differ in size", "--resize")


@row("D10", "an empty image folder")
def _d10(ctx: Ctx) -> None:
    folder = ctx.tmp / "imgs"
    folder.mkdir()
    out, store = ingest(ctx, "images", "--source", folder)
    assert_ingest_error(ctx, out, store, str(folder), "no image files")


def _npz_row(id: str, given: str, arrays: Callable[[], dict], *needles) -> None:
    def check(ctx: Ctx) -> None:
        path = ctx.tmp / "data.npz"
        np.savez(path, **arrays())
        out, store = ingest(ctx, "npz", "--source", path)
        assert_ingest_error(ctx, out, store, str(path), *needles)

    CASES.append(Case(id, given, check))


_npz_row(
    "D11", "npz without 'images'", lambda: {"pixels": np.zeros((2, 4, 4), np.uint8)}, "'images'"
)
_npz_row(
    "D12", "npz with float64 images", lambda: {"images": np.zeros((2, 4, 4))}, "uint8", "float64"
)
_npz_row(
    "D13",
    "npz with object-dtype images (needs pickle)",
    lambda: {"images": np.array([np.zeros((4, 4), np.uint8), "x"], dtype=object)},
    "'images'",
    "dtype object",
)


@row("D14", "an .npy file given as the npz source")
def _d14(ctx: Ctx) -> None:
    path = ctx.tmp / "data.npy"
    np.save(path, np.zeros((2, 4, 4), np.uint8))
    out, store = ingest(ctx, "npz", "--source", path)
    assert_ingest_error(ctx, out, store, str(path), "not an .npz archive")


_npz_row(
    "D15",
    "npz labels of the wrong length",
    lambda: {"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros(2, np.int64)},
    "'labels'",
    "(3,)",
)


@row("D16", "npz cut in half (a truncated zip)")
def _d16(ctx: Ctx) -> None:
    path = ctx.tmp / "data.npz"
    np.savez(path, images=np.arange(4 * 16 * 16, dtype=np.uint8).reshape(4, 16, 16))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out, store = ingest(ctx, "npz", "--source", path)
    assert_ingest_error(ctx, out, store, str(path), "corrupt or truncated")


def _cifar_batch(n: int = 3, data=None) -> bytes:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data
    return pickle.dumps({b"data": data, b"labels": [0] * n})


@row("D17", "cifar10 directory missing some batches")
def _d17(ctx: Ctx) -> None:
    folder = ctx.tmp / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        (folder / name).write_bytes(_cifar_batch())
    out, store = ingest(ctx, "cifar10", "--source", folder)
    assert_ingest_error(ctx, out, store, str(folder), "missing", "data_batch_3", "data_batch_5")


@row("D18", "cifar10 .tar.gz that is garbage")
def _d18(ctx: Ctx) -> None:
    path = ctx.tmp / "cifar-10-python.tar.gz"
    path.write_bytes(b"\x1f\x8bthis is not a tar archive" * 10)
    out, store = ingest(ctx, "cifar10", "--source", path)
    assert_ingest_error(ctx, out, store, str(path), "not a readable tar archive")


@row("D19", "a source directory that does not exist")
def _d19(ctx: Ctx) -> None:
    missing = ctx.tmp / "nowhere"
    for name in ("mnist", "images", "cifar10", "npz"):
        out, store = ingest(ctx, name, "--source", missing)
        assert_ingest_error(ctx, out, store, str(missing))


@row("D20", "synthetic -o n_samples=abc (the error arrives; a cluster is given)")
def _d20(ctx: Ctx) -> None:
    out, store = ingest(ctx, "synthetic", "-o", "n_samples=abc", "--scheduler", ctx.cluster)
    assert_ingest_error(ctx, out, store, "n_samples", "'abc'", "integer")


@row(
    "D20+",
    "synthetic -o n_samples=abc is refused before connecting to any scheduler",
)
def _d20_first(ctx: Ctx) -> None:
    with dask.config.set({"dkm.scheduler.timeout": FAST_TIMEOUT}):
        out, store = ingest(
            ctx,
            "synthetic",
            "-o",
            "n_samples=abc",
            "--scheduler",
            f"tcp://127.0.0.1:{ctx.closed_port}",
        )
    assert_ingest_error(ctx, out, store, "n_samples", "'abc'")


@row("D21", "an unknown dataset name")
def _d21(ctx: Ctx) -> None:
    out, store = ingest(ctx, "mnist-10k")
    assert_ingest_error(ctx, out, store, "unknown dataset 'mnist-10k'", "known datasets")


@row("D22", "images --resize 0x0")
def _d22(ctx: Ctx) -> None:
    folder = ctx.tmp / "imgs"
    _png(folder / "0.png")
    out, store = ingest(ctx, "images", "--source", folder, "--resize", "0x0")
    assert_ingest_error(ctx, out, store, "size", ">= 1", "--resize")


@row("D23", "a cifar batch whose data has the wrong shape (a pickled dict)")
def _d23(ctx: Ctx) -> None:
    folder = ctx.tmp / "cifar-10-batches-py"
    folder.mkdir()
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        (folder / name).write_bytes(_cifar_batch())
    (folder / "data_batch_2").write_bytes(_cifar_batch(data=np.zeros((3, 100), np.uint8)))
    out, store = ingest(ctx, "cifar10", "--source", folder)
    assert_ingest_error(ctx, out, store, "data_batch_2", "(3, 100)", "3072")


@row("D23+", "a cifar batch with pixel values above 255 (would be wrapped silently)")
def _d23_range(ctx: Ctx) -> None:
    folder = ctx.tmp / "cifar-10-batches-py"
    folder.mkdir()
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        (folder / name).write_bytes(_cifar_batch())
    (folder / "test_batch").write_bytes(_cifar_batch(data=np.full((3, 3072), 300, np.int64)))
    out, store = ingest(ctx, "cifar10", "--source", folder)
    assert_ingest_error(ctx, out, store, "test_batch", "0..255", "300")


@row("D24", "synthetic -o n_features=0 (a cluster is given)")
def _d24(ctx: Ctx) -> None:
    out, store = ingest(ctx, "synthetic", "-o", "n_features=0", "--scheduler", ctx.cluster)
    assert_ingest_error(ctx, out, store, "n_features", ">= 1", "got 0")


# ---------------------------------------------------------------------------- API arguments

X = np.random.default_rng(0).random((20, 3)).astype(np.float32)


def _with(value, at=(3, 1)) -> np.ndarray:
    x = X.copy()
    x[at] = value
    return x


def api_row(id: str, given: str, call: Callable[[], Any], types, *needles, marks=()) -> None:
    CASES.append(Case(id, given, lambda ctx: api_error(call, types, *needles), tuple(marks)))


api_row("A01", "NaN in X", lambda: KMeans(2).fit(_with(np.nan)), ValueError, icase("nan"))
api_row("A02", "+inf in X", lambda: KMeans(2).fit(_with(np.inf)), ValueError, icase("inf"))
api_row("A03", "1-D input", lambda: KMeans(2).fit(X[:, 0]), ValueError, "2-D", "reshape")
api_row(
    "A04", "an empty (0, 5) array", lambda: KMeans(2).fit(np.zeros((0, 5))), ValueError, "(0, 5)"
)
api_row("A05", "a (5, 0) array", lambda: KMeans(2).fit(np.zeros((5, 0))), ValueError, "(5, 0)")
api_row("A06", "k=0", lambda: KMeans(0).fit(X), ValueError, "n_clusters")
api_row("A07", "k=-1", lambda: KMeans(-1).fit(X), ValueError, "n_clusters")
api_row("A08", "k=True", lambda: KMeans(True).fit(X), (ValueError, TypeError), "n_clusters")
api_row("A09", "k=2.0", lambda: KMeans(2.0).fit(X), (ValueError, TypeError), "n_clusters")
api_row(
    "A10",
    "an object-dtype array",
    lambda: KMeans(2).fit(X.astype(object)),
    (ValueError, TypeError),
    "object",
)
api_row(
    "A11",
    "a string array",
    lambda: KMeans(2).fit(np.array([["a", "b"], ["c", "d"]])),
    (ValueError, TypeError),
    icase("dtype|numeric"),
)
api_row(
    "A12",
    "a list of lists of numeric strings",
    lambda: KMeans(1).fit([["1", "2"], ["3", "4"]]),
    (ValueError, TypeError),
    icase("numeric"),
)
api_row("A13", "k=10 > 5 samples", lambda: KMeans(10).fit(X[:5]), ValueError, "n_clusters=10", "5")
api_row(
    "A14",
    "complex input",
    lambda: KMeans(2).fit(X.astype(np.complex64)),
    (ValueError, TypeError),
    "complex",
)
api_row("A15", "3-D input", lambda: KMeans(2).fit(np.zeros((4, 3, 2))), ValueError, "3-D")
api_row(
    "A16",
    "an init array of the wrong shape",
    lambda: KMeans(2, init=np.zeros((3, 3))).fit(X),
    ValueError,
    "init",
    "(3, 3)",
)
api_row(
    "A17",
    "an init array holding NaN",
    lambda: KMeans(2, init=np.array([[0, 0, 0], [np.nan, 1, 1]])).fit(X),
    ValueError,
    "init",
    icase("nan|finite"),
)
api_row(
    "A18",
    "predict before fit",
    lambda: KMeans(2).predict(X),
    (ValueError, AttributeError),
    icase("not fitted"),
)


def _predict_wrong_width() -> None:
    with dask.config.set(scheduler="sync"):
        est = KMeans(2, random_state=0).fit(X)
    est.predict(np.zeros((4, 5), np.float32))


api_row("A19", "predict with the wrong n_features", _predict_wrong_width, ValueError, "5", "3")
api_row(
    "A20", "random_state=-1", lambda: KMeans(2, random_state=-1).fit(X), ValueError, "random_state"
)
api_row("A21", "dtype=float16", lambda: KMeans(2, dtype=np.float16).fit(X), ValueError, "float16")
api_row(
    "A22",
    "MiniBatchKMeans batch_size=0",
    lambda: MiniBatchKMeans(2, batch_size=0).fit(X),
    ValueError,
    "batch_size",
)


@row("A23", "a Zarr path that does not exist")
def _a23(ctx: Ctx) -> None:
    missing = str(ctx.tmp / "nowhere.zarr")
    api_error(lambda: KMeans(2).fit(missing), (FileNotFoundError, StoreError, ValueError), missing)


@row("A24", "an xarray Dataset (not a DataArray)")
def _a24(ctx: Ctx) -> None:
    ds = xr.Dataset({"x": (("sample", "feature"), X)})
    api_error(lambda: KMeans(2).fit(ds), TypeError, "Dataset", "ds[")


@row("A25", "all rows identical with k=3: valid, every centre is that row, inertia 0")
def _a25(ctx: Ctx) -> None:
    rows = np.tile(np.array([[0.25, 0.5, 0.75]], np.float32), (30, 1))
    with dask.config.set(scheduler="sync"), warnings.catch_warnings():
        # Saying that k-means|| found fewer distinct candidates than clusters is fair.
        warnings.filterwarnings("ignore", message=".*distinct", category=RuntimeWarning)
        est = KMeans(3, random_state=0).fit(rows)
        labels = np.asarray(est.labels_)
    np.testing.assert_allclose(est.cluster_centers_, np.tile(rows[:1], (3, 1)), atol=1e-6)
    assert est.inertia_ == pytest.approx(0.0, abs=1e-6)
    assert labels.shape == (30,)


def _two_far_groups(scale: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    a = rng.normal(1.0, 0.01, (20, 3))
    b = rng.normal(-1.0, 0.01, (20, 3))
    return (np.concatenate([a, b]) * scale).astype(np.float32), np.repeat([0, 1], 20)


def _far_groups_ok(scale: float) -> None:
    x, truth = _two_far_groups(scale)
    with dask.config.set(scheduler="sync"):
        est = KMeans(2, random_state=0, dtype=np.float64).fit(x)
        labels = np.asarray(est.labels_)
    assert np.isfinite(est.cluster_centers_).all() and np.isfinite(est.inertia_)
    assert len(set(labels[truth == 0])) == 1 and len(set(labels[truth == 1])) == 1
    assert labels[0] != labels[-1]
    np.testing.assert_allclose(np.sort(est.cluster_centers_[:, 0]), [-scale, scale], rtol=0.05)


row("A26", "magnitudes of 1e20 (beyond float32 squares): valid, found right")(
    lambda ctx: _far_groups_ok(1e20)
)
api_row("A27", "n_init=0", lambda: KMeans(2, n_init=0).fit(X), ValueError, "n_init")
api_row("A28", "max_iter=0", lambda: KMeans(2, max_iter=0).fit(X), ValueError, "max_iter")
api_row("A29", "tol=-1", lambda: KMeans(2, tol=-1).fit(X), ValueError, "tol")


@row("A30", "NaN only in the last chunk of a dask array")
def _a30(ctx: Ctx) -> None:
    x = da.from_array(_with(np.nan, at=(19, 2)), chunks=(5, 3))
    api_error(lambda: KMeans(2).fit(x), ValueError, icase("nan"))


@row("A31", "-inf in a float32 Zarr store given by path")
def _a31(ctx: Ctx) -> None:
    path = ctx.tmp / "features.zarr"
    xr.Dataset({"features": (("sample", "feature"), _with(-np.inf))}).to_zarr(
        path, zarr_format=3, consolidated=False
    )
    api_error(lambda: KMeans(2).fit(str(path)), ValueError, icase("infinity"))


api_row(
    "A32",
    "sample_weight given",
    lambda: KMeans(2).fit(X, sample_weight=np.ones(20)),
    (ValueError, TypeError, NotImplementedError),
    "sample_weight",
)
api_row(
    "A33", "init='kmeans++' (typo)", lambda: KMeans(2, init="kmeans++").fit(X), ValueError, "init"
)
api_row(
    "A34",
    "n_clusters='4' (a string)",
    lambda: KMeans("4").fit(X),
    (ValueError, TypeError),
    "n_clusters",
)
row("A35", "values of 1e19: valid, found right")(lambda ctx: _far_groups_ok(1e19))


# ---------------------------------------------------------------------------- scheduler addresses


def scheduler_row(
    id: str, given: str, address: Callable[[Ctx], str], *needles, marks: tuple = ()
) -> None:
    def check(ctx: Ctx) -> None:
        job = ctx.write("job.yaml", ctx.job())
        with dask.config.set({"dkm.scheduler.timeout": FAST_TIMEOUT}):
            out = ctx.cli("run", job, "--scheduler", address(ctx))
        assert_error(out, *needles, seconds=15)
        assert not (ctx.tmp / "out.zarr").exists()

    CASES.append(Case(id, given, check, tuple(marks)))


scheduler_row(
    "C01",
    "--scheduler tcp://127.0.0.1:1 (a closed port)",
    lambda ctx: "tcp://127.0.0.1:1",
    "tcp://127.0.0.1:1",
    "no Dask scheduler answered",
)
scheduler_row(
    "C02",
    "--scheduler garbage-string",
    lambda ctx: "garbage-string",
    "garbage-string",
    icase("tcp://|port"),
)
scheduler_row(
    "C03",
    "--scheduler tls://... without any TLS configuration",
    lambda ctx: f"tls://127.0.0.1:{ctx.closed_port}",
    "TLS",
    "distributed.comm.tls.ca-file",
)


@row(
    "C04",
    "tls:// with the CA file configured to a missing file",
)
def _c04(ctx: Ctx) -> None:
    job = ctx.write("job.yaml", ctx.job())
    missing = str(ctx.tmp / "missing-ca.pem")
    config = {
        "dkm.scheduler.timeout": FAST_TIMEOUT,
        "distributed.comm.tls.ca-file": missing,
        "distributed.comm.tls.client.cert": missing,
        "distributed.comm.tls.client.key": missing,
    }
    with dask.config.set(config):
        out = ctx.cli("run", job, "--scheduler", f"tls://127.0.0.1:{ctx.closed_port}")
    assert_error(out, missing, "ca-file", seconds=15)


def _server_row(id: str, given: str, serve: Callable[[], tuple[int, Callable]]) -> None:
    def check(ctx: Ctx) -> None:
        port, stop = serve()
        try:
            job = ctx.write("job.yaml", ctx.job())
            out = ctx.proc(
                "run",
                job,
                "--scheduler",
                f"tcp://127.0.0.1:{port}",
                env={"DASK_DKM__SCHEDULER__TIMEOUT": "3s"},
                timeout=15,
            )
        finally:
            stop()
        assert_error(out, f"tcp://127.0.0.1:{port}", icase("not .*dask|dask protocol"), seconds=15)

    CASES.append(Case(id, given, check))


def _blackhole() -> tuple[int, Callable]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stopping = threading.Event()

    def accept() -> None:
        while not stopping.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)  # accepted, never answered

    threading.Thread(target=accept, daemon=True).start()

    def stop() -> None:
        stopping.set()
        server.close()
        for conn in held:
            conn.close()

    return server.getsockname()[1], stop


def _http_server() -> tuple[int, Callable]:
    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>dashboard</html>")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return server.server_address[1], stop


_server_row("C05", "tcp:// to a socket that accepts and never answers", _blackhole)
scheduler_row(
    "C06",
    "--scheduler tcp://127.0.0.1:99999 (port out of range)",
    lambda ctx: "tcp://127.0.0.1:99999",
    "99999",
    icase("port"),
)


@row("C07", "DKM_SCHEDULER=garbage")
def _c07(ctx: Ctx) -> None:
    job = ctx.write("job.yaml", ctx.job())
    with dask.config.set({"dkm.scheduler.timeout": FAST_TIMEOUT}):
        out = ctx.cli("run", job, env={"DKM_SCHEDULER": "garbage"})
    assert_error(out, "garbage", icase("tcp://|port"), seconds=15)


scheduler_row("C08", "--scheduler '' (empty)", lambda ctx: "", "--scheduler is empty")
scheduler_row(
    "C09",
    "--scheduler http://127.0.0.1:8787 (the wrong scheme)",
    lambda ctx: f"http://127.0.0.1:{ctx.closed_port}",
    "http://",
    icase("tcp|scheme"),
)


@row("C10", "dkm ingest synthetic --scheduler tcp://127.0.0.1:1")
def _c10(ctx: Ctx) -> None:
    with dask.config.set({"dkm.scheduler.timeout": FAST_TIMEOUT}):
        out, store = ingest(
            ctx, "synthetic", "-o", "n_samples=100", "--scheduler", "tcp://127.0.0.1:1"
        )
    assert_ingest_error(ctx, out, store, "tcp://127.0.0.1:1", "no Dask scheduler answered")


_server_row(
    "C11", "tcp:// to a plain HTTP server (a dashboard port given by mistake)", _http_server
)


# ---------------------------------------------------------------------------- damaged stores


def _damaged_results_row(id: str, given: str, damage: Callable[[Path], None]) -> None:
    """A results store whose runs/lloyd-k8 centroids chunk is damaged: ``load_model`` and
    ``dkm show`` both say which store, array and chunk."""

    def check(ctx: Ctx) -> None:
        store = ctx.results
        (chunk,) = chunk_files(store / "runs" / "lloyd-k8" / "centroids")
        damage(chunk)
        with pytest.raises(StoreError) as info:
            load_model(store, "lloyd-k8")
        message = str(info.value)
        for needle in (str(store), "centroids", "chunk"):
            assert needle in message, message
        out = ctx.cli("show", store)
        assert_error(out, str(store), "lloyd-k8", "centroids", "chunk")
        assert load_model(store, "lloyd-k4").cluster_centers_.shape == (4, 64)  # the rest reads

    CASES.append(Case(id, given, check))


def _flip_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


_damaged_results_row("S01", "results store: the centroids chunk of lloyd-k8 deleted", Path.unlink)
_damaged_results_row(
    "S02",
    "results store: the centroids chunk overwritten with random bytes of the same size",
    lambda p: p.write_bytes(np.random.default_rng(2).bytes(p.stat().st_size)),
)
_damaged_results_row("S03", "results store: one bit flipped mid centroids chunk", _flip_bit)


def _mnist_store(ctx: Ctx) -> Path:
    """A dataset store of 70 IDX images in 7 chunks of 10 along sample."""
    directory, _ = _mnist(ctx, n_train=60, n_test=10)
    store = ctx.tmp / "mnist.zarr"
    with dask.config.set({"dkm.store.image-chunk-bytes": 10 * 28 * 28}):
        catalog.ingest("mnist", store, source=directory)
    assert len(chunk_files(store / "images")) == 7
    return store


def _damaged_data_row(id: str, given: str, damage: Callable[[Path], None]) -> None:
    def check(ctx: Ctx) -> None:
        store = _mnist_store(ctx)
        chunk = chunk_files(store / "images")[3]
        damage(chunk)
        job = ctx.job(
            {"data": {"dataset": "mnist", "store": str(store), "source": str(ctx.tmp / "mnist")}}
        )
        out = ctx.cli("run", ctx.write("job.yaml", job), "--scheduler", ctx.cluster)
        assert_error(out, str(store), "images", "chunk", icase(r"c[/.]3\b|chunk 3"))

    CASES.append(Case(id, given, check))


_damaged_data_row("S04", "dataset store: images chunk 3 of 7 deleted, then a job", Path.unlink)
_damaged_data_row(
    "S05",
    "dataset store: images chunk 3 overwritten with random bytes, then a job",
    lambda p: p.write_bytes(np.random.default_rng(3).bytes(p.stat().st_size)),
)


def _damaged_meta_row(id: str, given: str, damage: Callable[[Path], None], *needles) -> None:
    """A damaged dataset store: ``dkm info`` and a job reading it both say what is wrong."""

    def check(ctx: Ctx) -> None:
        store = ctx.tmp / "digits.zarr"
        shutil.copytree(ctx.digits, store)
        damage(store)
        out = ctx.cli("info", store)
        assert_error(out, str(store), *needles)
        out = ctx.run_job(ctx.job({"data.store": str(store)}))
        assert_error(out, "data.store", str(store), *needles)

    CASES.append(Case(id, given, check))


def _delete(relative: str) -> Callable[[Path], None]:
    return lambda store: (store / relative).unlink()


def _truncate_root(store: Path) -> None:
    meta = store / "zarr.json"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])


_damaged_meta_row("S06", "dataset store: root zarr.json deleted", _delete("zarr.json"), "zarr.json")
_damaged_meta_row(
    "S07", "dataset store: root zarr.json cut in half", _truncate_root, "zarr.json", "invalid JSON"
)
_damaged_meta_row(
    "S08",
    "dataset store: images/zarr.json deleted",
    _delete("images/zarr.json"),
    "'images'",
    "zarr.json",
)


def _kill_when_writing(proc: subprocess.Popen, store: Path, deadline: float = 60.0) -> None:
    """SIGKILL ``proc`` once its hidden temporary store holds some chunks."""
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        tmps = list(store.parent.glob(f".{store.name}.tmp-*"))
        if tmps and any(p.is_file() for p in tmps[0].rglob("c/*/*")):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return
        if proc.poll() is not None:
            pytest.fail(f"finished before it could be killed:\n{proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("never started writing")


@row("S09", "SIGKILL of `dkm ingest synthetic` mid-write, then the same command again")
def _s09(ctx: Ctx) -> None:
    store = ctx.tmp / "synthetic.zarr"
    args = [
        "ingest",
        "synthetic",
        "--store",
        store,
        "-o",
        "n_samples=400000",
        "-o",
        "chunk_rows=8192",
        "--scheduler",
        ctx.cluster,
    ]
    proc = subprocess.Popen(
        [str(DKM), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _kill_when_writing(proc, store)
    assert not store.exists() and not is_complete(store)
    out = ctx.cli(*args)
    assert_ok(out)
    assert is_complete(store)
    with dask.config.set(scheduler="sync"):
        expected = catalog.load("synthetic", n_samples=400000)["features"][-5:].values
    np.testing.assert_array_equal(xr.open_zarr(store)["features"][-5:].values, expected)


@row("S10", "SIGKILL of `dkm patches` mid-write, then the same command again")
def _s10(ctx: Ctx) -> None:
    rng = np.random.default_rng(4)
    npz = ctx.tmp / "images.npz"
    np.savez(npz, images=rng.integers(0, 256, (4000, 28, 28), dtype=np.uint8))
    data = ctx.tmp / "images.zarr"
    catalog.ingest("npz", data, source=npz)
    out_store = ctx.tmp / "patches.zarr"
    args = [
        "patches",
        data,
        "--size",
        5,
        "--stride",
        2,
        "--out",
        out_store,
        "--scheduler",
        ctx.cluster,
    ]
    proc = subprocess.Popen(
        [str(DKM), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DASK_DKM__STORE__FEATURE_CHUNK_BYTES": "1MiB"},  # many chunks
    )
    _kill_when_writing(proc, out_store)
    assert not out_store.exists() and not is_complete(out_store)
    out = ctx.cli(*args)
    assert_ok(out)
    assert is_complete(out_store)
    patches = xr.open_zarr(out_store)["patches"]
    assert patches.shape == (4000 * 12 * 12, 25)
    first = np.load(npz)["images"][0, :5, :5].reshape(-1) / np.float32(255)
    np.testing.assert_allclose(patches[0].values, first, rtol=1e-6)


@row("S11", "results store: root zarr.json deleted")
def _s11(ctx: Ctx) -> None:
    store = ctx.results
    (store / "zarr.json").unlink()
    out = ctx.cli("show", store)
    assert_error(out, str(store), "zarr.json")
    out = ctx.run_job(ctx.job({"output.store": str(store)}))
    assert_error(out, "output.store", str(store), "zarr.json")


@row("S13", "results store: runs/lloyd-k8/centroids/zarr.json deleted")
def _s13(ctx: Ctx) -> None:
    store = ctx.results
    meta = store / "runs" / "lloyd-k8" / "centroids" / "zarr.json"
    meta.unlink()
    out = ctx.cli("show", store)
    assert_error(out, str(store), "lloyd-k8", "damaged")
    assert "lloyd-k4" in out.stdout
    with pytest.raises(StoreError) as info:
        load_model(store, "lloyd-k8")
    assert "lloyd-k8" in str(info.value) and str(meta) in str(info.value)
    assert load_model(store, "lloyd-k4").cluster_centers_.shape == (4, 64)


# ----------------------------------------------------------- learned features and scoring

job_row("L01", "features.kind: umap", {"features.kind": "umap"}, "features.kind", "'umap'")
job_row(
    "L02",
    "an autoencoder key on pca features",
    {"features.kind": "pca", "features.n_components": 8, "features.filters": [8]},
    "features.filters",
    "needs kind: autoencoder",
)
job_row(
    "L03", "pca without n_components", {"features.kind": "pca"}, "features.n_components",
    "required",
)
job_row(
    "L04",
    "pca n_components 100 on 8x8 digits",
    {"features.kind": "pca", "features.n_components": 100},
    "features.n_components",
    "100 > 64",
)
job_row(
    "L05",
    "evaluate.on a split the data lacks",
    {"evaluate": {"metrics": ["accuracy"], "on": ["train", "test"]}},
    "evaluate.on",
    "no 'test' samples",
)
job_row(
    "L06",
    "a silhouette sample larger than the data",
    {"evaluate": {"metrics": ["silhouette"], "silhouette_sample": 5000}},
    "evaluate.silhouette_sample",
    "5000 > the 1797 samples",
)
job_row("L07", "bic without a mixture", {"evaluate": ["bic"]}, "evaluate", "model.algorithm: gmm")
job_row(
    "L08",
    "a mixture with a negative reg_covar",
    {"model.algorithm": "gmm", "model.init": DELETE, "model.reg_covar": -1e-6},
    "model.reg_covar",
    ">= 0",
)
job_row(
    "L09", "test_size: 2.0", {"data.options": {"test_size": 2.0}}, "data.options.test_size", "2.0"
)
job_row(
    "L10",
    "held-out scoring of patches",
    {"features": {"kind": "patches", "size": 4}, "evaluate": {"on": ["test"]}},
    "evaluate.on",
    "patches are not samples",
)
job_row(
    "L11",
    "autoencoder filters: [0]",
    {"features.kind": "autoencoder", "features.filters": [0]},
    "features.filters",
)
job_row(
    "L12",
    "init_range with k-means++ seeding",
    {"model.init_range": [0, 1]},
    "model.init_range",
    "remove init_range",
)


# ============================================================================ the test

EXPECTED_IDS = (
    [f"J{i:02d}" for i in range(1, 59)]
    + [f"D{i:02d}" for i in range(1, 25)]
    + [f"A{i:02d}" for i in range(1, 36)]
    + [f"C{i:02d}" for i in range(1, 12)]
    + [f"S{i:02d}" for i in (*range(1, 12), 13)]
    + [f"L{i:02d}" for i in range(1, 13)]
)


def test_the_table_covers_every_known_bad_input():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "a row is listed twice"
    assert [i for i in EXPECTED_IDS if i not in ids] == []
    assert [i for i in ids if i not in EXPECTED_IDS and not i.endswith("+")] == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, ctx: Ctx) -> None:
    case.check(ctx)


# ============================================================================ generated job files

SKELETON = {
    "name": "generated",
    "data": {"dataset": "digits", "store": "data/digits.zarr"},
    "features": {"kind": "pixels"},
    "model": {"algorithm": "lloyd", "k": [2, 4]},
    "evaluate": ["inertia"],
    "output": {"store": "results/generated.zarr"},
    "cluster": {"address": None},
}
KEYS = [
    *SKELETON,
    "data.dataset",
    "data.store",
    "data.source",
    "data.options",
    "data.options.n_samples",
    "features.kind",
    "features.size",
    "features.stride",
    "features.pad",
    "features.drop_empty",
    "features.split",
    "features.store",
    "features.n_components",
    "features.whiten",
    "features.filters",
    "features.epochs",
    "data.options.test_size",
    "evaluate.metrics",
    "evaluate.on",
    "evaluate.silhouette_sample",
    "model.algorithm",
    "model.k",
    "model.k.start",
    "model.k.stop",
    "model.k.scale",
    "model.k.step",
    "model.init",
    "model.n_init",
    "model.max_iter",
    "model.tol",
    "model.random_state",
    "model.dtype",
    "model.empty_cluster",
    "model.init_range",
    "model.covariance_type",
    "model.batch_size",
    "output.store",
    "output.labels",
    "output.report",
    "output.checkpoint_every",
    "cluster.address",
    "cluster.n_workers",
    "cluster.threads_per_worker",
    "cluster.memory_limit",
    "unknown",
    "model.unknown",
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "lloyd",
            "minibatch",
            "patches",
            "pixels",
            "k-means++",
            "auto",
            "4GiB",
            "tcp://h:1",
            "digits",
            "synthetic",
            "float32",
            "train",
            "test",
            "pca",
            "autoencoder",
            "gmm",
            "uniform",
            "random-vector",
            "log2",
            "linear",
        ]
    )
)
yaml_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers() | st.booleans(), inner, max_size=4)
    ),
    max_leaves=12,
)


def _set(job: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node: Any = job
    for p in parents:
        if not isinstance(node, dict):
            return
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    if isinstance(node, dict):
        node[last] = value


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=st.lists(st.tuples(st.sampled_from(KEYS), yaml_values), max_size=5),
    drop=st.lists(st.sampled_from(list(SKELETON)), max_size=2),
)
def test_generated_job_files_raise_only_job_spec_errors(changes, drop):
    job = copy.deepcopy(SKELETON)
    for key in drop:
        job.pop(key, None)
    for dotted, value in changes:
        _set(job, dotted, value)
    text = yaml.safe_dump(job)  # what a job file would hold
    try:
        parse_job(yaml.safe_load(text))
    except JobSpecError as err:
        assert len(str(err)) < 20 * MAX_MESSAGE
