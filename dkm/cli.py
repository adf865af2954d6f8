"""The ``dkm`` command."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from dkm.data import catalog
from dkm.data.download import ChecksumError
from dkm.data.readers import DataFormatError
from dkm.data.store import StoreError, is_complete, open_dataset
from dkm.features.patches import extract_patches, write_patches
from dkm.runtime import SchedulerUnreachable, connect

log = logging.getLogger("dkm")

# Failures a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (
    DataFormatError,
    StoreError,
    ChecksumError,
    catalog.UnknownDatasetError,
    SchedulerUnreachable,
    ValueError,
    TypeError,
    OSError,
)

scheduler_option = click.option(
    "--scheduler",
    metavar="ADDRESS",
    default=None,
    help="tcp:// or tls:// address of a Dask scheduler; default: $DKM_SCHEDULER, dask config, "
    "or a new LocalCluster sized to this machine.",
)


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as err:
            click.echo(f"dkm: error: {err}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.version_option(package_name="dkm")
def main(log_level: str) -> None:
    """dkm: distributed k-means jobs on Dask over chunked Zarr image datasets."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s dkm %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("dkm").setLevel(log_level.upper())


@main.command()
def datasets() -> None:
    """List the named datasets."""
    width = max(map(len, catalog.DATASETS))
    for name, info in catalog.DATASETS.items():
        click.echo(f"{name:<{width}}  {info.description}")
        click.echo(f"{'':<{width}}  source: {info.source_help}")


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--option")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        y, x = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HEIGHTxWIDTH such as 28x28, got {text!r}") from None
    return y, x


@main.command()
@click.argument("name")
@click.option("--store", required=True, type=click.Path(path_type=Path), help="Output Zarr store.")
@click.option("--source", default=None, help="Directory, file, URL, or 'download'.")
@click.option("--overwrite", is_flag=True, help="Re-ingest over an existing complete store.")
@click.option("--grayscale/--color", default=True, help="(images) channels to keep.")
@click.option("--size", "resize", default=None, metavar="YxX", help="(images) resize, e.g. 28x28.")
@click.option("--no-verify", is_flag=True, help="(downloads) accept files with no known checksum.")
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Dataset option, e.g. -o n_samples=1000000 -o centers=64 (synthetic).",
)
@scheduler_option
@_user_errors
def ingest(
    name: str,
    store: Path,
    source: str | None,
    overwrite: bool,
    grayscale: bool,
    resize: str | None,
    no_verify: bool,
    options: tuple[str, ...],
    scheduler: str | None,
) -> None:
    """Ingest dataset NAME into a Zarr store (atomically; a complete store is reused)."""
    opts = _parse_options(options)
    if name == "images":
        opts.update(grayscale=grayscale, size=_parse_size(resize))
    if no_verify:
        opts["verify"] = False
    reused = is_complete(store) and not overwrite
    if name == "synthetic" and not reused:  # generated chunk by chunk on the workers
        with connect(scheduler):
            catalog.ingest(name, store, source=source, overwrite=overwrite, **opts)
    else:
        catalog.ingest(name, store, source=source, overwrite=overwrite, **opts)
    if reused:
        click.echo(f"{store}: already ingested (use --overwrite to redo)")
    ds = open_dataset(store)
    main_var = "images" if "images" in ds else "features"
    click.echo(
        f"{store.resolve()}: {main_var} {dict(ds[main_var].sizes)} ({ds.attrs.get('dataset')})"
    )


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--size", required=True, type=int, help="Patch side in pixels.")
@click.option("--stride", type=int, default=None, help="Step between patches [default: size].")
@click.option("--pad", type=int, default=0, show_default=True, help="Zero padding per side.")
@click.option("--drop-empty", is_flag=True, help="Leave out all-zero patches.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output Zarr store.")
@click.option("--overwrite", is_flag=True, help="Replace an existing complete output.")
@scheduler_option
@_user_errors
def patches(
    data: Path,
    size: int,
    stride: int | None,
    pad: int,
    drop_empty: bool,
    out: Path,
    overwrite: bool,
    scheduler: str | None,
) -> None:
    """Cut the images of DATA (a dataset store) into patches and write them to --out."""
    ds = open_dataset(data)
    if "images" not in ds:
        raise StoreError(f"{data}: has no 'images' variable (is it a dataset store?)")
    if is_complete(out) and not overwrite:
        _check_patch_store(out, size, stride or size, pad, drop_empty)
        click.echo(f"{out}: already written (use --overwrite to redo)")
    else:
        with connect(scheduler):
            result = extract_patches(ds["images"], size, stride, pad, drop_empty)
            source = {"source_store": str(data.resolve()), "dataset": ds.attrs.get("dataset")}
            write_patches(result, out, overwrite=overwrite, source_attrs=source)
    written = open_dataset(out)["patches"]
    click.echo(f"{out.resolve()}: patches {dict(written.sizes)} float32")


def _check_patch_store(out: Path, size: int, stride: int, pad: int, drop_empty: bool) -> None:
    existing = open_dataset(out)
    if "patches" not in existing:
        raise StoreError(f"{out}: exists and is not a patch store; choose another --out")
    want = {"patch_size": size, "stride": stride, "pad": pad, "drop_empty": int(drop_empty)}
    have = {key: existing.attrs.get(key) for key in want}
    if have != want:
        raise StoreError(f"{out}: holds patches {have}, not {want}; pass --overwrite to redo")


@main.command()
@click.argument("job_file", type=click.Path(path_type=Path))
@scheduler_option
@click.option("--resume", is_flag=True, help="Continue an interrupted job in its results store.")
@click.option("--dry-run", is_flag=True, help="Validate the job and print its plan; run nothing.")
@click.option(
    "--performance-report",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE",
    help="Write Dask's performance report (HTML) of the job.",
)
@_user_errors
def run(
    job_file: Path,
    scheduler: str | None,
    resume: bool,
    dry_run: bool,
    performance_report: Path | None,
) -> None:
    """Run the job described by JOB_FILE (YAML)."""
    from dkm.jobs import load_job
    from dkm.results.store import run_name

    spec = load_job(job_file)
    if dry_run:
        click.echo(f"job {spec.name!r} is valid")
        click.echo(f"data:     {spec.data.dataset} -> {spec.data.store}")
        click.echo(
            f"features: {spec.features.kind}"
            + (
                f" {spec.features.size}x{spec.features.size} stride "
                f"{spec.features.stride or spec.features.size} pad {spec.features.pad}"
                if spec.features.kind == "patches"
                else ""
            )
        )
        runs = ", ".join(run_name(spec.model.algorithm, k) for k in spec.model.k)
        click.echo(f"runs:     {runs}")
        click.echo(f"output:   {spec.output.store}")
        return
    from dkm.runner import run_job

    store = run_job(spec, scheduler=scheduler, resume=resume, performance_report=performance_report)
    _show(store)


def _show(store: Path) -> None:
    from dkm.results.store import ResultsStore

    results = ResultsStore(store)
    if not (Path(store) / "zarr.json").is_file():
        raise StoreError(f"{store}: not a results store")
    attrs = results.attrs
    click.echo(
        f"{Path(store).resolve()}: job {attrs.get('job', {}).get('name')!r}, "
        f"status {attrs.get('status')}"
    )
    runs = sorted(
        results.completed_runs(), key=lambda n: (n.rsplit("-k", 1)[0], int(n.rsplit("-k", 1)[1]))
    )
    if not runs:
        click.echo("no complete runs")
        return
    metric_names = sorted(results.read_run(runs[0]).attrs.get("metrics", {}))
    header = ["run", "k", "iter", *metric_names, "seconds"]
    rows = []
    for name in runs:
        a = results.read_run(name).attrs
        rows.append(
            [
                name,
                str(a["k"]),
                str(a["n_iter"]),
                *(f"{a['metrics'].get(m, float('nan')):.6g}" for m in metric_names),
                f"{a.get('seconds', float('nan')):.1f}",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    sweep = Path(store) / "sweep" / "zarr.json"
    if sweep.is_file():
        import json

        knee = json.loads(sweep.read_text())["attributes"].get("elbow_k", -1)
        click.echo(f"elbow: k={knee}" if knee > 0 else "elbow: none found")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@_user_errors
def show(store: Path) -> None:
    """Print the runs and metrics of a results STORE."""
    _show(store)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder [default: STORE-report next to the store].",
)
@_user_errors
def report(store: Path, out: Path | None) -> None:
    """Write PNG figures and an HTML page for a results STORE."""
    from dkm.report.html import write_report

    click.echo(str(write_report(store, out).resolve()))


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@_user_errors
def info(store: Path) -> None:
    """Describe a dataset or patch store."""
    click.echo(open_dataset(store))


if __name__ == "__main__":  # pragma: no cover
    main()
