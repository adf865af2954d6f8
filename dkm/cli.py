"""The ``dkm`` command."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import yaml

from dkm.config import get_bytes
from dkm.data import catalog
from dkm.data.download import ChecksumError
from dkm.data.readers import DataFormatError
from dkm.data.store import (
    StoreError,
    is_complete,
    open_dataset,
    probe,
    rows_per_chunk,
    store_identity,
    store_kind,
    update_root_attrs,
    write_atomic,
)
from dkm.runtime import SchedulerLost, SchedulerUnreachable, connect

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
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT

scheduler_option = click.option(
    "--scheduler",
    metavar="ADDRESS",
    default=None,
    help="tcp:// or tls:// address of a Dask scheduler; default: $DKM_SCHEDULER, the job's "
    "cluster.address, dask config, or a new LocalCluster sized to this machine.",
)


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Report a user's error in one line (exit 1) and Ctrl-C in one line (exit 130)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as err:
            click.echo(f"dkm: error: {err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            click.echo("dkm: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)

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


def _with_remedy(err: StoreError, remedy: str) -> StoreError:
    return StoreError(getattr(err, "problem", str(err)), remedy=remedy)


@main.command()
@click.argument("name")
@click.option("--store", required=True, type=click.Path(path_type=Path), help="Output Zarr store.")
@click.option("--source", default=None, help="Directory, file, URL, or 'download'.")
@click.option("--overwrite", is_flag=True, help="Re-ingest over an existing complete store.")
@click.option("--grayscale/--color", default=True, help="(images) channels to keep.")
@click.option(
    "--resize", default=None, metavar="YxX", help="(images) resize every image, e.g. 28x28."
)
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
    found = catalog.check_options(name, opts)  # before any cluster starts
    if found:
        raise ValueError(
            f"dataset {name!r}: " + "; ".join(f"-o {key}: {message}" for key, message in found)
        )
    reused = is_complete(store) and not overwrite
    try:
        if name == "synthetic" and not reused:  # generated chunk by chunk on the workers
            with connect(scheduler):
                catalog.ingest(name, store, source=source, overwrite=overwrite, **opts)
        else:
            catalog.ingest(name, store, source=source, overwrite=overwrite, **opts)
    except StoreError as err:
        state = probe(store)
        if state is not None and state.replaceable_by("dataset") and not overwrite:
            raise _with_remedy(
                err, "pass --overwrite to replace it, or choose another --store"
            ) from None
        raise _with_remedy(err, "choose another --store") from None
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
    from dkm.features import PatchLayout, cut_patches

    layout = PatchLayout(size, stride, pad, drop_empty)
    ds = open_dataset(data)
    if "images" not in ds:
        raise StoreError(f"{data}: has no 'images' variable (is it a dataset store?)")
    problem = layout.image_problems(tuple(ds["images"].shape[1:]))
    if problem:
        raise click.BadParameter(f"{problem[0]} of {data}", param_hint="--size")
    state = probe(out)
    if state is not None and not overwrite:
        if state.kind != "patches" or not state.complete:
            raise StoreError(f"{out}: {state.what}", remedy="choose another --out")
        try:
            layout.check_store(out)
        except StoreError as err:
            raise _with_remedy(err, "pass --overwrite to redo, or choose another --out") from None
        click.echo(f"{out}: already written (use --overwrite to redo)")
    else:
        if state is not None and not state.replaceable_by("patches"):
            raise StoreError(
                f"{out}: {state.what}", remedy="--overwrite replaces patch stores only"
            )
        with connect(scheduler):
            cut_patches(ds["images"], layout, out, source_store=data, overwrite=overwrite)
    written = open_dataset(out)["patches"]
    click.echo(f"{out.resolve()}: patches {dict(written.sizes)} float32")


# ----------------------------------------------------------------------------- reconstruct

RECONSTRUCTION_KIND = "reconstruction"
_CODING_FLAGS = {"method": "--coding", "n_nonzero_coefs": "--n-nonzero-coefs", "alpha": "--alpha"}


def _flag_error(flag: str, value: object, message: str) -> ValueError:
    """``--flag VALUE: what is wrong``: the one line a user's bad input gets."""
    return ValueError(f"{flag} {value}: {message}")


def _dictionary_run(path: Path, name: str):
    """The run ``name`` of the results store at ``path``: its centroids, its patch layout and
    the channels of its patches, every problem named by the flag that fixes it."""
    from dkm.features import PatchLayout

    try:
        results = _results_store(path)
    except StoreError as err:
        raise StoreError(f"RESULTS {err.problem}", remedy=err.remedy) from None
    info = results.run_info(name)
    complete = sorted(r.name for r in results.runs() if r.status == "complete")
    if info is None or info.status != "complete":
        state = "no such run" if info is None else f"run {name!r} is {info.status}"
        listing = ", ".join(complete) if complete else "none"
        raise _flag_error("--run", name, f"{state} in {path} (its complete runs: {listing})")
    # Runs record their features (in their attrs, or in their identity); stores written
    # before that recorded them once per job.
    features = (
        info.attrs.get("features")
        or (info.attrs.get("identity") or {}).get("features")
        or results.attrs.get("features")
        or {}
    )
    if features.get("kind") != "patches" or "patch_size" not in features:
        kind = features.get("kind", "unknown")
        raise _flag_error(
            "--run",
            name,
            f"clusters {kind} features, not patches: it has no patch layout to cut "
            "images with; choose a run of a patch job",
        )
    layout = PatchLayout.from_attrs(features)
    centroids = results.read_run(name)["centroids"].values
    # A patch holds size * size values per channel; one channel is a gray image (y, x).
    per_channel = layout.size * layout.size
    channels, rest = divmod(centroids.shape[1], per_channel)
    shape = features.get("image_shape") or []
    expected = (int(shape[2]) if len(shape) == 3 else 1) if shape else channels
    if rest or channels != expected:
        raise StoreError(
            f"{path}: run {name!r} holds centroids of {centroids.shape[1]} features, not the "
            f"{per_channel * expected} of its {layout.tag} patches"
        )
    # Images of (y, x, 1) keep their channel dim; gray images (y, x) have none.
    channels = channels if len(shape) == 3 or channels > 1 else 0
    return results, info, layout, centroids, channels


def _sparse_coding(method: str | None, n_nonzero_coefs: int | None, alpha: float | None, centroids):
    """The ``--coding`` asked for (None: nearest centroid), checked against the dictionary."""
    from dkm.coding import SparseCoding

    if method is None:
        for flag, value in (("--n-nonzero-coefs", n_nonzero_coefs), ("--alpha", alpha)):
            if value is not None:
                raise _flag_error(flag, value, "a sparse coding parameter: give --coding too")
        return None
    params = {"method": method, "n_nonzero_coefs": n_nonzero_coefs, "alpha": alpha}
    found = SparseCoding.problems(params)
    if found:
        key, message = found[0]
        raise _flag_error(_CODING_FLAGS[key], params[key], message)
    coding = SparseCoding(method, n_nonzero_coefs, alpha)
    # The dictionary's all-zero rows (empty clusters) are no atoms to code with.
    n_atoms = int(np.count_nonzero(np.any(centroids != 0, axis=1)))
    found = coding.dictionary_problems(n_atoms, centroids.shape[1])
    if found:
        key = next(key for key in coding.to_dict() if key != "method")
        raise _flag_error(_CODING_FLAGS[key], getattr(coding, key), found[0])
    return coding


def _source_images(source: Path, channels: int):
    """The images of ``--images`` (a dataset store or a folder of image files) as
    ``images(sample, y, x[, channel])`` and what the results should record of them."""
    import xarray as xr

    from dkm.data.readers import read_image_folder

    state = probe(source)
    if state is None:
        raise _flag_error("--images", source, "no such file or directory")
    if state.kind is None and source.is_dir() and not (source / "zarr.json").exists():
        try:
            folder = read_image_folder(source, grayscale=channels == 0)
        except DataFormatError as err:
            raise _flag_error("--images", source, str(err).removeprefix(f"{source}: ")) from None
        if channels not in (0, 3):
            raise _flag_error(
                "--images",
                source,
                f"image files give 1 (gray) or 3 (RGB) channels, but the run's patches have "
                f"{channels}",
            )
        dims = ("sample", "y", "x", "channel")[: folder.images.ndim]
        per_image = int(np.prod(folder.images.shape[1:]))
        rows = rows_per_chunk(per_image, len(folder.images), get_bytes("store.image-chunk-bytes"))
        images = xr.DataArray(folder.images, dims=dims).chunk({"sample": rows})
        about = {"kind": "image folder", "path": str(source.resolve()), "files": list(folder.files)}
        return images, about
    try:
        ds = open_dataset(source)
    except StoreError as err:
        problem = err.problem.removeprefix(f"{source}: ")
        remedy = (
            "give a dataset store or a folder of image files"
            if state.kind == "results"
            else err.remedy
        )
        raise StoreError(f"--images {source}: {problem}", remedy=remedy) from None
    if "images" not in ds:
        raise _flag_error(
            "--images",
            source,
            f"a {state.kind} store without an 'images' variable; give a dataset store of "
            "images or a folder of image files",
        )
    about = {"kind": "dataset store", "path": str(source.resolve())}
    about["identity"] = store_identity(source)
    return ds["images"], about


def _check_images(images, channels: int, layout, run: str, source: Path) -> None:
    shape = tuple(int(s) for s in images.shape[1:])
    if images.shape[0] == 0:
        raise _flag_error("--images", source, "holds no images")
    have = shape[2] if len(shape) == 3 else 0
    if have != channels:

        def words(c: int) -> str:
            return "1 channel (gray)" if c == 0 else f"{c} channels"

        raise _flag_error(
            "--images",
            source,
            f"images of {words(have)}, but the patches of run {run} have {words(channels)}",
        )
    found = layout.image_problems(shape)
    if found:
        raise _flag_error("--images", source, f"{found[0]} (run {run} cuts {layout.tag})")


def _check_out(out: Path, overwrite: bool) -> Path:
    """Where the PNG grid goes (``OUT.png`` beside the store), once ``--out`` may be written."""
    if out.suffix.lower() == ".png":
        raise _flag_error(
            "--out", out, "name the Zarr store (e.g. recon.zarr); its PNG grid goes beside it"
        )
    png = out.with_suffix(".png")
    state = probe(out)
    if state is not None and not overwrite:
        raise StoreError(
            f"--out {out}: already exists and {state.what.removeprefix('is ')}",
            remedy="pass --overwrite to replace it, or choose another --out",
        )
    if state is not None and not state.replaceable_by(RECONSTRUCTION_KIND):
        raise StoreError(
            f"--out {out}: {state.what.removeprefix('is ')}, which --overwrite never replaces "
            "(only reconstruction stores)",
            remedy="choose another --out",
        )
    if png.is_dir() or (png.exists() and not overwrite):
        raise _flag_error(
            "--out",
            out,
            f"{png} (its PNG grid) already exists; pass --overwrite to replace it, or choose "
            "another --out",
        )
    return png


@main.command()
@click.argument("results", type=click.Path(path_type=Path))
@click.option(
    "--run",
    "run_name",
    required=True,
    metavar="RUN",
    help="The patch run whose centroids are the dictionary, e.g. lloyd-k128 (dkm show lists them).",
)
@click.option(
    "--images",
    "source",
    required=True,
    metavar="SOURCE",
    type=click.Path(path_type=Path),
    help="A dataset store, or a folder of image files (PNG, BMP, JPEG...) of one size.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Output Zarr store; the PNG grid goes beside it (OUT.zarr -> OUT.png).",
)
@click.option(
    "--coding",
    default=None,
    metavar="METHOD",
    help="Rebuild each patch from its sparse code over the dictionary: omp, lars, lasso_lars, "
    "lasso_cd or threshold [default: the nearest centroid].",
)
@click.option(
    "--n-nonzero-coefs", type=int, default=None, help="(omp, lars) atoms per patch [default: 2]."
)
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="(lasso_lars, lasso_cd) penalty, (threshold) threshold [default: 1.0].",
)
@click.option("--grid", type=int, default=16, show_default=True, help="Images drawn in the PNG.")
@click.option("--overwrite", is_flag=True, help="Replace an existing reconstruction store.")
@scheduler_option
@_user_errors
def reconstruct(
    results: Path,
    run_name: str,
    source: Path,
    out: Path,
    coding: str | None,
    n_nonzero_coefs: int | None,
    alpha: float | None,
    grid: int,
    overwrite: bool,
    scheduler: str | None,
) -> None:
    """Rebuild the images of --images from the patch dictionary of a run of RESULTS.

    Every image is cut with the run's patch layout, each patch replaced by its nearest
    centroid (or its sparse code, --coding) and the patches put back, overlaps averaged.
    Writes originals, reconstructions and the error of each image to --out, a PNG grid of
    the first --grid images beside it, and prints the per-pixel RMSE of the whole set.
    """
    from dkm.coding import image_error, reconstruct_images

    # Every check before any cluster starts or any image is rebuilt.
    store, info, layout, centroids, channels = _dictionary_run(results, run_name)
    sparse = _sparse_coding(coding, n_nonzero_coefs, alpha, centroids)
    if grid < 1:
        raise _flag_error("--grid", grid, "must be an integer >= 1")
    images, about = _source_images(source, channels)
    _check_images(images, channels, layout, run_name, source)
    png = _check_out(out, overwrite)
    rebuilt = reconstruct_images(images, centroids, layout, coding=sparse)  # lazy
    rebuilt.attrs.update(
        {
            "source": about,
            "results_store": str(store.path.resolve()),
            "run": run_name,
            "run_id": info.run_id,
            "algorithm": info.algorithm,
            "k": info.k,
            "layout": layout.attrs(),
            "sparse_coding": None if sparse is None else sparse.to_dict(),
        }
    )
    with connect(scheduler) as client:
        try:
            write_atomic(rebuilt, out, kind=RECONSTRUCTION_KIND, overwrite=overwrite)
        except Exception as err:
            _name_damage(source, about, client, err)
            raise
    written = open_dataset(out)
    error = image_error(written["image_mse"].values)
    # The set's error is known only once every image is rebuilt: stamped after the atomic
    # write (one zarr.json replace) rather than rebuilding every image a second time.
    update_root_attrs(out, error)
    png.unlink(missing_ok=True)  # a grid of a replaced store must not outlive it
    shown = written.isel(image=slice(0, grid))
    how = "nearest centroid" if sparse is None else f"sparse coding {sparse.tag}"
    _write_png_atomically(
        png,
        lambda path: _reconstruction_grid(
            shown, path, title=f"{run_name} ({how}): image RMSE {error['image_rmse']:.4g}"
        ),
    )
    size = "x".join(str(s) for s in images.shape[1:])
    click.echo(f"{out.resolve()}: {images.shape[0]} images {size} rebuilt with {run_name} ({how})")
    click.echo(f"{png.resolve()}: originals above reconstructions, first {shown.sizes['image']}")
    click.echo(f"image RMSE {error['image_rmse']:.6g} (per pixel, pixels in [0, 1])")


def _name_damage(source: Path, about: dict, client, err: Exception) -> None:
    """When rebuilding failed on a damaged chunk of the --images store (zarr's bare
    "checksum do not match"), raise the StoreError that names the chunk instead."""
    from dkm.data.integrity import verify_store

    if about["kind"] != "dataset store" or "checksum" not in str(err).lower():
        return
    try:
        verify_store(source, client=client)
    except StoreError as damaged:
        problem = damaged.problem.removeprefix(f"{source}: ")
        raise StoreError(f"--images {source}: {problem}", remedy="ingest it again") from err


def _reconstruction_grid(shown, path: Path, *, title: str) -> Path:
    from dkm.report.plots import reconstruction_grid

    return reconstruction_grid(
        shown["originals"].values,
        shown["reconstructions"].values,
        path,
        n=shown.sizes["image"],
        title=title,
    )


def _write_png_atomically(path: Path, draw: Callable[[Path], Path]) -> None:
    # Drawn under a hidden name and renamed, so a PNG that is there is a whole one.
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.png")
    try:
        draw(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@main.command()
@click.argument("job_file", type=click.Path(path_type=Path))
@scheduler_option
@click.option(
    "--fresh", is_flag=True, help="Delete the job's results store first and compute every run."
)
@click.option(
    "--resume", is_flag=True, help="Require the job's results store to exist (to continue it)."
)
@click.option("--dry-run", is_flag=True, help="Check the job and print what it would do.")
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
    fresh: bool,
    resume: bool,
    dry_run: bool,
    performance_report: Path | None,
) -> None:
    """Run the job described by JOB_FILE (YAML).

    Runs already complete in the results store are kept; a run whose inputs or parameters
    changed is computed again; an interrupted run continues from its last checkpoint.
    """
    from dkm.jobs import load_job
    from dkm.runner import plan_job, run_job

    spec = load_job(job_file)
    if fresh and resume:
        raise click.UsageError("--fresh and --resume contradict each other; give one")
    if dry_run:
        _print_plan(plan_job(spec, fresh=fresh, resume=resume))
        return
    try:
        outcome = run_job(
            spec,
            scheduler=scheduler,
            fresh=fresh,
            resume=resume,
            performance_report=performance_report,
        )
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: we are leaving anyway
        click.echo(
            f"dkm: interrupted; finished runs and checkpoints are kept in {spec.output.store}: "
            f"run `dkm run {job_file}` again to continue",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    except SchedulerLost as err:
        click.echo(
            f"dkm: error: {err}: start a scheduler and run `dkm run {job_file}` again "
            "(with --scheduler if its address changed) to continue",
            err=True,
        )
        sys.exit(1)
    _show(outcome.store)
    if outcome.failed:
        lines = "; ".join(f"{r.name}: {r.error}" for r in outcome.failed)
        raise StoreError(
            f"{len(outcome.failed)} of {len(outcome.runs)} runs failed ({lines})",
            remedy="fix the job and run it again: the finished runs are kept",
        )


def _print_plan(plan) -> None:
    spec = plan.spec
    click.echo(f"job {spec.name!r} is valid")
    shape = plan.data_shape
    state = "ingested" if plan.data_ready else "to ingest"
    size = (
        ""
        if shape is None
        else f", {shape.n_samples} samples {'x'.join(map(str, shape.sample_shape))}"
    )
    click.echo(f"data:     {spec.data.dataset} -> {spec.data.store} ({state}{size})")
    f = spec.features
    if f.kind == "patches":
        layout = f.layout
        extra = " drop empty" if layout.drop_empty else ""
        click.echo(
            f"features: patches {layout.size}x{layout.size} stride {layout.stride} "
            f"pad {layout.pad}{extra}, split {f.split}"
        )
    else:
        click.echo(f"features: {f.kind}, split {f.split}")
    click.echo(f"output:   {spec.output.store}")
    click.echo("runs:")
    for r in plan.runs:
        detail = f" ({r.detail})" if r.detail else ""
        click.echo(f"  {r.name:<16} {r.action}{detail}")


def _results_store(path: Path):
    from dkm.results import ResultsStore

    kind = store_kind(path)
    if kind != "results":
        raise StoreError(
            f"{path}: a {kind} store, not a results store; `dkm info {path}` describes it"
        )
    return ResultsStore(path)


def _show(path: Path) -> None:
    results = _results_store(path)
    attrs = results.attrs
    job = attrs.get("job") or {}
    click.echo(f"{Path(path).resolve()}: job {job.get('name')!r}, status {results.status()}")
    runs = results.runs()
    if not runs:
        click.echo("no runs")
        return
    for r in runs:
        if r.status == "complete":
            problem = results.verify_run(r.name, labels=False)
            if problem is not None:
                r.status, r.problem = "damaged", problem
    metric_names = sorted({m for r in runs for m in r.attrs.get("metrics", {})})
    header = ["run", "k", "status", "iter", *metric_names, "seconds"]
    rows, notes = [], []
    for r in runs:
        metrics = r.attrs.get("metrics", {})
        rows.append(
            [
                r.name,
                str(r.k) if r.k >= 0 else "?",
                r.status,
                str(r.attrs.get("n_iter", "")),
                *(f"{metrics[m]:.6g}" if metrics.get(m) is not None else "" for m in metric_names),
                f"{r.attrs['seconds']:.1f}" if "seconds" in r.attrs else "",
            ]
        )
        if r.status == "failed":
            notes.append(f"{r.name} failed: {r.attrs.get('error', '')}")
        elif r.status == "damaged":
            notes.append(f"{r.name} damaged: {r.problem}")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    for note in notes:
        click.echo(note)
    sweep = results.read_sweep()
    if sweep is not None:
        knee = int(sweep.attrs.get("elbow_k", -1))
        click.echo(f"elbow: k={knee}" if knee > 0 else "elbow: none found")
    damaged = [r for r in runs if r.status == "damaged"]
    if damaged:
        detail = "; ".join(
            f"{r.name} ({r.problem.removeprefix(f'{path}: ').removeprefix(f'run {r.name!r}: ')})"
            for r in damaged
        )
        raise StoreError(
            f"{path}: {len(damaged)} damaged run(s): {detail}",
            remedy="run the job again to compute them anew",
        )


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
    from dkm.report import write_report

    _results_store(store)
    click.echo(str(write_report(store, out).resolve()))


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    default=None,
    help="tcp:// or tls:// address of a Dask scheduler to read the chunks on; default: "
    "$DKM_SCHEDULER or dask config, else threads in this process.",
)
@_user_errors
def verify(store: Path, scheduler: str | None) -> None:
    """Read back every chunk of a dataset, patch or results STORE; name any damaged one."""
    from dkm.data.integrity import verify_store
    from dkm.runtime import resolve_address

    # Without a scheduler address the chunks are read by threads in this process, not on a
    # new LocalCluster: reading is I/O, Zstd and CRC32C work that releases the GIL, so threads
    # keep every core busy, each holding one decoded chunk, without the seconds a cluster
    # takes to start. Given an address (--scheduler, $DKM_SCHEDULER, dask config), the reads
    # run on that cluster, close to stores too large for one machine.
    if resolve_address(scheduler) is None:
        report = verify_store(store)
    else:
        with connect(scheduler) as client:
            report = verify_store(store, client=client)
    click.echo(report.summary())


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@_user_errors
def info(store: Path) -> None:
    """Describe a dataset, patch, feature or results store."""
    kind = store_kind(store)
    if kind == "results":
        _show(store)
        return
    ds = open_dataset(store)
    if kind == "features":
        click.echo(_features_line(store, ds))
    click.echo(ds)


def _features_line(path: Path, ds) -> str:
    """One line on a learned feature store: what learned it, from which split of what."""
    attrs = ds.attrs
    n, width = ds["features"].shape
    learner = attrs.get("kind", "learned")
    source = attrs.get("source_store", "an unrecorded dataset store")
    return (
        f"{path.resolve()}: {learner} features, {width} per sample, of {n} samples; "
        f"fitted on split {attrs.get('fit_split', 'all')!r} of {source}"
    )


if __name__ == "__main__":  # pragma: no cover
    main()
