"""A static HTML report of a results store: figures plus tables, one self-contained folder.

The page, top to bottom: the store's status and failed runs; the features the runs clustered;
the runs table (held-out metrics such as ``test_accuracy`` as their own columns, "accuracy
(test)"); the sweep's metrics against k (held-out variants dotted in their metric's figure);
confusion matrices of a few labelled runs (:mod:`dkm.report.confusion`); centroids,
reconstructions and training curves; the job.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from dkm.data.store import StoreError
from dkm.report import plots
from dkm.report.confusion import (
    TRUE_LABEL,
    class_names,
    confusion_runs,
    confusion_view,
)
from dkm.report.features import features_summary
from dkm.report.metric_names import held_out_variants, metric_label, metric_order, split_metric
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
    # A metric a run lacks (a mixture has no inertia) is recorded as None or NaN: blank.
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
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
img.wide {{ max-width: 100%; }}
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


def _figure(src: str, caption: str, *, wide: bool = False) -> str:
    # A wide figure (a contingency table of many clusters) may take the page's width.
    size = ' class="wide"' if wide else ""
    return (
        f'<figure><img src="{html.escape(src)}"{size} alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


# Shown together in one figure (image error against k), not each on its own.
_IMAGE_ERRORS = ("image_mse", "image_rmse", "sparse_image_mse", "sparse_image_rmse")


def _held_out_note(metric: str, names) -> str:
    splits = [split_metric(v)[1] for v in held_out_variants(metric, names)]
    return f" (dotted: {', '.join(splits)} samples)" if splits else ""


def _sweep_figures(sweep, out: Path) -> list[tuple[str, str]]:
    """Inertia against k, beside it the image error against k, then every other metric.

    A metric's held-out variant (``test_accuracy``) is drawn in its figure, not in one of
    its own; one without its fitted-split metric in the sweep gets its own figure."""
    names = list(sweep.data_vars)
    figures = []
    if "inertia" in sweep:
        png = plots.metric_against_k(sweep, "inertia", out / "sweep-inertia.png")
        figures.append((png.name, f"inertia against k{_held_out_note('inertia', names)}"))
    if "image_rmse" in sweep:
        png = plots.image_error_against_k(sweep, out / "sweep-image-error.png")
        sparse = " (nearest centroid and sparse coding)" if "sparse_image_rmse" in sweep else ""
        held = _held_out_note("image_rmse", names)
        figures.append((png.name, f"image error against k{sparse}{held}"))
    for metric in names:
        base, split = split_metric(metric)
        if metric == "inertia" or metric in _IMAGE_ERRORS or (split and base in sweep):
            continue
        png = plots.metric_against_k(sweep, metric, out / f"sweep-{metric}.png")
        label = metric_label(metric)
        figures.append((png.name, f"{label} against k{_held_out_note(metric, names)}"))
    return figures


def _features_section(attrs: dict, run_features: dict[str, dict]) -> str:
    """What the runs clustered: one line when they all used the job's features, else one
    line per distinct features with the runs that used them."""
    found = features_summary(attrs.get("features"), run_features)
    if not found:
        return ""
    if len(found) == 1:
        return f"<p><b>Features</b>: {html.escape(found[0][0])}.</p>"
    items = []
    for text, names in found:
        who = ", ".join(names) if names else "the job as last run (no complete run yet)"
        items.append(f"<li>{html.escape(text)} <i>({html.escape(who)})</i></li>")
    return "<p><b>Features</b> (the runs differ):</p><ul>" + "".join(items) + "</ul>"


def _confusion_figures(attrs: dict, labelled: list, out: Path) -> list[tuple[str, str]]:
    """Heatmaps of the chosen labelled runs (see :func:`confusion_runs`)."""
    if not labelled:
        return []
    chosen = confusion_runs(
        [(name, algorithm, k, run.sizes["label"]) for name, algorithm, k, run in labelled]
    )
    names = class_names(attrs)
    figures = []
    for name, _, _, run in labelled:
        if name not in chosen:
            continue
        view = confusion_view(run, name, names)
        png = plots.confusion_heatmap(
            view.counts,
            out / f"confusion-{name}.png",
            rows=view.rows,
            columns=view.columns,
            xlabel=view.xlabel,
            ylabel=TRUE_LABEL,
            title=view.title,
        )
        figures.append((png.name, view.caption))
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
    parts.append(
        _features_section(attrs, {r.name: r.attrs.get("features") or {} for r in complete})
    )
    # Held-out inertia (test_inertia) stands next to the inertia column, the rest by name.
    metric_names = sorted(
        metric_order({m for r in complete for m in r.attrs.get("metrics", {})} - {"inertia"}),
        key=lambda m: split_metric(m)[0] != "inertia",
    )
    rows, histories, figures, labelled = [], {}, [], []
    for info in complete:
        name = info.name
        run = results.read_run(name)
        histories[name] = results.read_history(name).load()
        if "contingency" in run:
            labelled.append((name, info.algorithm, info.k, run))
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
        labels = [metric_label(m) for m in metric_names]
        header = ["run", "algorithm", "k", "iterations", "inertia", *labels, "seconds"]
        parts.append(_table(header, rows))
        held_out = sorted({s for m in metric_names if (s := split_metric(m)[1])})
        if held_out:
            fitted = (attrs.get("features") or {}).get("split", "fitted")
            parts.append(
                f"<p>Metrics marked ({html.escape(', '.join(held_out))}) score held-out "
                "samples of that split with the fitted model (label metrics map clusters to "
                "labels as on the fitted samples); the others score the samples the model was "
                f"fitted on (split {html.escape(str(fitted))}).</p>"
            )
        png = plots.inertia_curves(histories, out / "inertia-by-iteration.png")
        curves = (
            "Inertia (k-means) and lower bound (mixtures) against iteration"
            if any("lower_bound" in h for h in histories.values())
            else "Inertia against iteration"
        )
        figures.insert(0, (png.name, curves))

    sweep = results.read_sweep()
    if sweep is not None:
        parts.append("<h2>Sweep</h2>")
        parts.append(
            f"<p>Elbow of inertia against k: <b>{html.escape(_elbow_text(sweep))}</b>.</p>"
        )
        parts += [_figure(src, cap) for src, cap in _sweep_figures(sweep, out)]

    confusion = _confusion_figures(attrs, labelled, out)
    if confusion:
        parts.append("<h2>Confusion matrices</h2>")
        parts += [_figure(src, cap, wide=True) for src, cap in confusion]

    parts.append("<h2>Figures</h2>")
    parts += [_figure(src, cap) for src, cap in figures]
    parts.append("<h2>Job</h2><pre>" + html.escape(json.dumps(job, indent=2)) + "</pre>")
    page = out / "index.html"
    page.write_text(_PAGE.format(title=html.escape(title), body="\n".join(parts)))
    return page
