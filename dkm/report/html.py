"""A static HTML report of a results store: figures plus tables, one self-contained folder."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from dkm.data.store import StoreError
from dkm.report import plots
from dkm.results import ResultsStore

__all__ = ["report_dir", "write_report"]


def report_dir(store: str | Path) -> Path:
    """Where the report of ``store`` goes: a sibling folder ``<store>-report``."""
    store = Path(store)
    return store.with_name(store.name.removesuffix(".zarr") + "-report")


def _tile_shape(attrs: dict) -> tuple[int, ...] | None:
    # The runner records how one feature vector is drawn: a patch or a whole image.
    shape = attrs.get("tile_shape")
    return tuple(shape) if shape and len(shape) in (2, 3) else None


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
img {{ max-width: 520px; }}
</style></head>
<body data-figures="pending">
<h1>{title}</h1>
{body}
<script>
// Lets a headless browser (and the tests) confirm every figure decoded.
window.addEventListener("load", function () {{
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.dataset.figures = ok + "/" + imgs.length;
}});
</script>
</body></html>
"""


def _figure(src: str, caption: str) -> str:
    return (
        f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


# Shown together in one figure (image error against k), not each on its own.
_IMAGE_ERRORS = ("image_mse", "image_rmse", "sparse_image_mse", "sparse_image_rmse")


def _sweep_figures(sweep, out: Path) -> list[tuple[str, str]]:
    """Inertia against k, beside it the image error against k, then every other metric."""
    figures = []
    if "inertia" in sweep:
        png = plots.metric_against_k(sweep, "inertia", out / "sweep-inertia.png")
        figures.append((png.name, "inertia against k"))
    if "image_rmse" in sweep:
        png = plots.image_error_against_k(sweep, out / "sweep-image-error.png")
        sparse = " (nearest centroid and sparse coding)" if "sparse_image_rmse" in sweep else ""
        figures.append((png.name, f"image error against k{sparse}"))
    for metric in sweep.data_vars:
        if metric == "inertia" or metric in _IMAGE_ERRORS:
            continue
        png = plots.metric_against_k(sweep, metric, out / f"sweep-{metric}.png")
        figures.append((png.name, f"{metric} against k"))
    return figures


def _elbow_text(sweep) -> str:
    elbows = sweep.attrs.get("elbows")
    if "algorithm" in sweep.dims and isinstance(elbows, dict):
        return ", ".join(
            f"{a}: {'k=' + str(k) if int(k) > 0 else 'none'}" for a, k in elbows.items()
        )
    knee = int(sweep.attrs.get("elbow_k", -1))
    return f"k={knee}" if knee > 0 else "none"


# Stored reconstructions drawn next to their originals: variable, how, figure caption.
_GRIDS = (
    ("reconstructions", "nearest-centroid", "reconstructions"),
    ("sparse_reconstructions", "sparse-coding", "sparse-coding reconstructions"),
)


def write_report(store: str | Path, out: str | Path | None = None) -> Path:
    """Write PNG figures and ``index.html`` for a results store.

    Parameters
    ----------
    store : path-like
        A results store written by a job.
    out : path-like, optional
        Output folder (default :func:`report_dir`).

    Returns
    -------
    Path
        The ``index.html`` file.
    """
    results = ResultsStore(store)
    attrs = results.attrs
    runs = results.runs()
    damaged = [f"{r.name} ({r.problem})" for r in runs if r.status == "damaged"]
    if damaged:
        raise StoreError(
            f"{store}: damaged run(s): {'; '.join(damaged)}",
            remedy="run the job again to compute them anew",
        )
    out = Path(out) if out is not None else report_dir(store)
    out.mkdir(parents=True, exist_ok=True)
    job = attrs.get("job", {})
    title = f"dkm report: {job.get('name', Path(store).name)}"
    parts = [
        f"<p>Store <code>{html.escape(str(Path(store).resolve()))}</code>, "
        f"status <b>{html.escape(results.status())}</b>.</p>"
    ]
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        parts.append("<h2>Failed runs</h2><ul>")
        parts += [
            f"<li>{html.escape(r.name)}: {html.escape(str(r.attrs.get('error', '')))}</li>"
            for r in failed
        ]
        parts.append("</ul>")

    complete = [r for r in runs if r.status == "complete"]
    metric_names = sorted({m for r in complete for m in r.attrs.get("metrics", {})} - {"inertia"})
    rows, histories, figures = [], {}, []
    for info in complete:
        name = info.name
        run = results.read_run(name)
        histories[name] = results.read_history(name).load()
        metrics = run.attrs.get("metrics", {})
        rows.append(
            [
                name,
                info.algorithm,
                run.attrs.get("k"),
                run.attrs.get("n_iter"),
                run.attrs.get("inertia", ""),
                *(metrics.get(m, "") for m in metric_names),
                run.attrs.get("seconds"),
            ]
        )
        shape = _tile_shape(run.attrs) or _tile_shape(attrs)
        # k-means runs keep centroids, mixtures their component means: both draw as tiles.
        centers = next((run[v] for v in ("centroids", "means") if v in run), None)
        drawable = shape is not None and int(np.prod(shape)) == run.sizes["feature"]
        if centers is not None and drawable:
            what = "centroids" if centers.name == "centroids" else "component means"
            png = plots.centroid_tiles(
                centers.values,
                shape,
                out / f"centroids-{name}.png",
                title=f"{what} of {name}",
            )
            figures.append((png.name, f"{what.capitalize()} of {name}"))
        for var, how, caption in _GRIDS:
            if "originals" not in run or var not in run:
                continue
            png = plots.reconstruction_grid(
                run["originals"].values,
                run[var].values,
                out / f"{var.replace('_', '-')}-{name}.png",
                n=run.sizes["image"],
                title=f"{name}: originals (above) and {how} reconstructions",
            )
            figures.append((png.name, f"Originals and {caption} of {name}"))
    if complete:
        parts.append("<h2>Runs</h2>")
        header = ["run", "algorithm", "k", "iterations", "inertia", *metric_names, "seconds"]
        parts.append(_table(header, rows))
        png = plots.inertia_curves(histories, out / "inertia-by-iteration.png")
        figures.insert(0, (png.name, "Inertia against iteration"))

    sweep = results.read_sweep()
    if sweep is not None:
        parts.append("<h2>Sweep</h2>")
        parts.append(
            f"<p>Elbow of inertia against k: <b>{html.escape(_elbow_text(sweep))}</b>.</p>"
        )
        parts += [_figure(src, cap) for src, cap in _sweep_figures(sweep, out)]

    parts.append("<h2>Figures</h2>")
    parts += [_figure(src, cap) for src, cap in figures]
    parts.append("<h2>Job</h2><pre>" + html.escape(json.dumps(job, indent=2)) + "</pre>")
    page = out / "index.html"
    page.write_text(_PAGE.format(title=html.escape(title), body="\n".join(parts)))
    return page
