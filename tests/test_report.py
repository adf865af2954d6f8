"""The HTML report: figures are written, and a real headless browser renders every one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from distributed import Client
from sklearn.metrics import confusion_matrix

from dkm.data.catalog import FASHION_MNIST_CLASSES
from dkm.data.store import StoreError
from dkm.evaluate import confusion_matrices, majority_accuracy, one_to_one_accuracy
from dkm.jobs import parse_job
from dkm.report import confusion, plots
from dkm.report.html import report_dir, write_report
from dkm.results.store import ResultsStore, as_variables, run_name
from dkm.results.sweep import sweep_table
from dkm.runner import run_job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def results(tmp_path):
    rng = np.random.default_rng(0)
    store = ResultsStore(tmp_path / "job.zarr")
    store.start_job({"job": {"name": "report-test"}, "tile_shape": [5, 5]})
    ks, inertia = [4, 16, 64], []
    for k in ks:
        n = 6
        hist = xr.Dataset(
            {
                "inertia": ("iteration", np.geomspace(100 / k, 50 / k, n)),
                "center_shift": ("iteration", np.geomspace(1, 1e-4, n)),
            },
            coords={"iteration": np.arange(1, n + 1)},
        )
        inertia.append(float(hist["inertia"][-1]))
        variables = as_variables(centroids=rng.random((k, 25), dtype=np.float32))
        if k == 4:  # a labelled run, as the runner stores one: its confusion matrices
            found = confusion_matrices(np.arange(50) % 5, rng.integers(0, k, 50), k)
            variables.update({n: (v.dims, v.values) for n, v in found.variables.items()})
        store.write_run(
            run_name("lloyd", k),
            variables,
            hist,
            {
                "algorithm": "lloyd",
                "k": k,
                "n_iter": n,
                "inertia": inertia[-1],
                "metrics": {"inertia": inertia[-1], "reconstruction_error": 0.1 / k},
                "seconds": 1.0,
            },
        )
    store.write_sweep(sweep_table(ks, {"inertia": inertia}))
    store.finish("complete")
    return store


@pytest.fixture
def compared(tmp_path):
    """A store of the newer runner: two algorithms in one sweep (dims algorithm, k), runs
    holding their first images rebuilt (nearest centroid and sparse coding), image errors."""
    rng = np.random.default_rng(1)
    store = ResultsStore(tmp_path / "compared.zarr")
    store.start_job({"job": {"name": "compare-test"}})
    features = {"kind": "patches", "patch_size": 4, "stride": 4, "pad": 0, "drop_empty": 0}
    runs = [("lloyd", 4), ("lloyd", 16), ("lloyd", 64), ("minibatch", 4), ("minibatch", 16)]
    metrics: dict[str, list[float]] = {
        m: [] for m in ("inertia", "image_rmse", "sparse_image_rmse")
    }
    originals = rng.random((6, 12, 12)).astype(np.float32)
    for algorithm, k in runs:
        rmse = 0.3 / np.log2(k) + (0.02 if algorithm == "minibatch" else 0)
        values = {"inertia": 100 / k, "image_rmse": rmse, "sparse_image_rmse": 0.7 * rmse}
        for m, v in values.items():
            metrics[m].append(v)
        noisy = np.clip(originals + rng.normal(0, rmse, originals.shape), 0, 1)
        dims = ("image", "y", "x")
        store.write_run(
            run_name(algorithm, k),
            {
                **as_variables(centroids=rng.random((k, 16), dtype=np.float32)),
                "originals": (dims, originals),
                "reconstructions": (dims, noisy.astype(np.float32)),
                "sparse_reconstructions": (dims, originals * 0.9),
                "image_mse": (("sample",), rng.random(20)),
            },
            # Mini-batch runs record a smoothed batch inertia, not the full one.
            xr.Dataset(
                {"inertia" if algorithm == "lloyd" else "ewa_inertia": ("iteration", [2.0, 1.0])},
                coords={"iteration": [1, 2]},
            ),
            {
                "algorithm": algorithm,
                "k": k,
                "n_iter": 2,
                "inertia": values["inertia"],
                "metrics": {**values, "image_mse": rmse**2},
                "features": {**features, "image_shape": [12, 12]},
                "tile_shape": [4, 4],
                "seconds": 1.0,
            },
        )
    algorithms = [a for a, _ in runs]
    sweep = sweep_table([k for _, k in runs], metrics, algorithms)
    # Names as variable-length strings: Zarr v3 warns about fixed-length ones ('<U9').
    store.write_sweep(sweep.assign_coords(algorithm=sweep["algorithm"].astype(object)))
    store.finish("complete")
    return store


def test_report_of_compared_algorithms_with_reconstructions(compared):
    page = write_report(compared.path)
    html = page.read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    # Inertia against k, then beside it image error against k, at the top of the sweep.
    assert images[:2] == ["sweep-inertia.png", "sweep-image-error.png"]
    assert not any(name.startswith("sweep-image_") or "sparse_image" in name for name in images)
    for run in ("lloyd-k4", "lloyd-k64", "minibatch-k16"):
        assert f"reconstructions-{run}.png" in images
        assert f"sparse-reconstructions-{run}.png" in images
        assert f"Originals and reconstructions of {run}" in html
    assert "image error against k (nearest centroid and sparse coding)" in html
    for name in images:
        assert (page.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The runs table names each run's algorithm.
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", html).group(1)
    assert re.findall(r"<th>(.*?)</th>", header)[:3] == ["run", "algorithm", "k"]
    assert "<tr><td>minibatch-k4</td><td>minibatch</td><td>4</td>" in html
    assert "Elbow of inertia against k: <b>lloyd: " in html and "minibatch: " in html


def test_image_error_figure_draws_one_line_per_algorithm_and_coding(
    compared, tmp_path, monkeypatch
):
    from dkm.report import plots

    drawn = {}
    save = plots._save

    def keep(fig, path):  # what each figure draws, read before it is saved and closed
        lines = fig.axes[0].lines
        drawn[Path(path).name] = {line.get_label(): list(line.get_xdata()) for line in lines}
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    sweep = compared.read_sweep()
    plots.image_error_against_k(sweep, tmp_path / "error.png")
    plots.metric_against_k(sweep, "inertia", tmp_path / "inertia.png")
    # minibatch did not run k=64: its lines stop at 16 rather than drawing the NaN.
    assert drawn["error.png"] == {
        "lloyd, nearest centroid": [4, 16, 64],
        "minibatch, nearest centroid": [4, 16],
        "lloyd, sparse": [4, 16, 64],
        "minibatch, sparse": [4, 16],
    }
    assert {"lloyd", "minibatch"} <= set(drawn["inertia.png"])
    # Held-out image errors are drawn beside the fitted ones, in the same colour.
    held_out = sweep.assign(test_image_rmse=sweep["image_rmse"] * 1.1)
    plots.image_error_against_k(held_out, tmp_path / "held-out.png")
    assert drawn["held-out.png"]["minibatch, nearest centroid (test)"] == [4, 16]
    assert len(drawn["held-out.png"]) == 6


def test_report_writes_page_and_figures(results):
    page = write_report(results.path)
    assert page == report_dir(results.path) / "index.html"
    html = page.read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert "inertia-by-iteration.png" in images and "sweep-inertia.png" in images
    assert {"centroids-lloyd-k4.png", "centroids-lloyd-k64.png"} <= set(images)
    # Only the labelled run has a confusion matrix (k=4 < 5 labels: one label without cluster).
    assert [i for i in images if i.startswith("confusion-")] == ["confusion-lloyd-k4.png"]
    assert "1 label has no cluster" in html
    for name in images:
        assert (page.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lloyd-k16" in html and "report-test" in html


def test_report_lists_failed_runs_and_refuses_damaged_ones(results):
    results.write_failed_run("lloyd-k99", {"algorithm": "lloyd", "k": 99}, "k=99 > 50 samples")
    html = write_report(results.path).read_text()
    assert "Failed runs" in html and "k=99 &gt; 50 samples" in html
    (results.path / "runs/lloyd-k16/centroids/zarr.json").unlink()
    with pytest.raises(StoreError, match=r"damaged run\(s\): lloyd-k16 .*run the job again"):
        write_report(results.path)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["results", "compared"])
def test_a_headless_browser_renders_every_figure(store, request, tmp_path):
    """Both stores: one algorithm with an old sweep over k alone; two compared algorithms
    with reconstruction grids and the image-error figure."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run must install it")
        pytest.skip("chromium is not installed")
    page = write_report(request.getfixturevalue(store).path)
    html = page.read_text()
    n_images = len(re.findall(r"<img ", html))
    if store == "compared":
        assert (
            'src="sweep-image-error.png"' in html and 'src="reconstructions-lloyd-k4.png"' in html
        )
    else:
        assert 'src="confusion-lloyd-k4.png"' in html
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [*cmd, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert f'data-figures="{n_images}/{n_images}"' in dom, dom[:500]
    shot = tmp_path / "report.png"
    subprocess.run(
        [*cmd, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000


# --------------------------------------------------------------------------- labelled jobs


@pytest.fixture(scope="module")
def digits_job(tmp_path_factory, threaded_cluster):
    """A real labelled job: k-means on scikit-learn's digits pixels at k=4 and k=10 (the
    number of classes), scored by accuracy, with its labels and confusion matrices."""
    tmp = tmp_path_factory.mktemp("digits-report")
    job = {
        "name": "digits-report",
        "data": {"dataset": "digits", "store": str(tmp / "digits.zarr")},
        "features": {"kind": "pixels"},
        "model": {"algorithm": "lloyd", "k": [4, 10], "max_iter": 10, "random_state": 0},
        "evaluate": ["inertia", "accuracy", "one_to_one_accuracy", "nmi"],
        "output": {"store": str(tmp / "out.zarr"), "labels": True},
    }
    with Client(threaded_cluster) as client:
        outcome = run_job(parse_job(job), scheduler=client.scheduler.address)
    assert outcome.status == "complete", outcome.failed
    return ResultsStore(outcome.store)


def _drawn(monkeypatch) -> dict[str, object]:
    """Each figure written from now on, by file name (read before it is saved)."""
    drawn = {}
    save = plots._save

    def keep(fig, path):
        drawn[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return drawn


def test_report_of_a_labelled_job_draws_its_confusion_matrices_and_features(
    digits_job, tmp_path, monkeypatch
):
    drawn = _drawn(monkeypatch)
    page = write_report(digits_job.path, tmp_path / "report")
    html = page.read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert {"confusion-lloyd-k4.png", "confusion-lloyd-k10.png"} <= set(images)
    for name in images:
        assert (page.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<p><b>Features</b>: pixels: images 8 × 8, split all, matrix 1797 × 64.</p>" in html

    run = digits_job.read_run("lloyd-k10")
    metrics = run.attrs["metrics"]
    assert f"one-to-one accuracy {metrics['one_to_one_accuracy']:.3f}." in html
    # What is drawn is scikit-learn's confusion matrix after the Hungarian mapping: rows
    # in label order, column j the cluster matched to label j (the stored order).
    view = confusion.confusion_view(run, "lloyd-k10")
    mapped = run["cluster_label"].values[run["labels"].values]
    digits = xr.open_zarr(digits_job.attrs["job"]["data"]["store"])["label"].values
    np.testing.assert_array_equal(view.counts, confusion_matrix(digits, mapped))
    assert np.trace(view.counts) / 1797 == pytest.approx(metrics["one_to_one_accuracy"])
    for j, tick in enumerate(view.columns):
        cluster, label = re.fullmatch(r"(\d+) \((\d)\)", tick).groups()
        assert run["cluster_label"].values[int(cluster)] == j == int(label)

    ax = drawn["confusion-lloyd-k10.png"].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("cluster (Hungarian-matched label)", "true label")
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(d) for d in range(10)]
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(view.counts.ravel())


def test_held_out_metrics_stand_beside_the_fitted_ones(digits_job, tmp_path, monkeypatch):
    """A job that also scores the test split records test_accuracy beside accuracy: the
    runs table, the note below it and the metric-against-k figures show both."""
    store = ResultsStore(tmp_path / "held-out.zarr")
    shutil.copytree(digits_job.path, store.path)
    sweep = store.read_sweep()
    for k in (4, 10):
        name = run_name("lloyd", k)
        metrics = store.read_run(name).attrs["metrics"]
        held_out = {f"test_{m}": metrics[m] - 0.01 for m in ("accuracy", "nmi")}
        store.add_to_run(name, {"metrics": {**metrics, **held_out}})
        for m, v in held_out.items():
            sweep[m] = sweep.get(m, xr.full_like(sweep["accuracy"], np.nan))
            sweep[m].loc[{"algorithm": "lloyd", "k": k}] = v
    store.write_sweep(sweep)
    drawn = _drawn(monkeypatch)
    html = write_report(store.path, tmp_path / "report").read_text()

    header = re.findall(r"<th>(.*?)</th>", re.search(r"<thead>(.*?)</thead>", html).group(1))
    metrics = header[header.index("inertia") + 1 : -1]
    assert metrics == ["accuracy", "accuracy (test)", "nmi", "nmi (test)", "one_to_one_accuracy"]
    k10 = store.read_run("lloyd-k10").attrs["metrics"]
    row = re.search(r"<tr><td>lloyd-k10</td>(.*?)</tr>", html).group(1)
    assert f"<td>{k10['test_accuracy']:.6g}</td>" in row
    assert "Metrics marked (test) score held-out samples" in html
    assert "fitted on (split all)" in html
    # Drawn in the figure of their metric, not in one of their own.
    assert "sweep-test_accuracy.png" not in html and "sweep-test_nmi.png" not in html
    assert "accuracy against k (dotted: test samples)" in html
    lines = drawn["sweep-accuracy.png"].axes[0].lines
    assert {line.get_label(): list(line.get_xdata()) for line in lines} == {
        "lloyd": [4, 10],
        "lloyd (test)": [4, 10],
    }
    assert drawn["sweep-accuracy.png"].axes[0].get_ylabel() == "accuracy"


@pytest.fixture
def mixed(tmp_path):
    """A store built directly: k-means and mixture runs with every kind of metric name a
    job records (mixture scores, geometry, held-out variants, one held-out metric without
    its fitted one), learned features that differ between the runs, and class names."""
    rng = np.random.default_rng(2)
    store = ResultsStore(tmp_path / "mixed.zarr")
    pca = {"kind": "pca", "n_components": 6, "whiten": True, "fit_split": "train"}
    pca.update({"store": "/data/pca.zarr", "image_shape": [4, 4], "split": "train"})
    coder = {k: v for k, v in pca.items() if k != "whiten"}
    coder.update({"kind": "autoencoder", "filters": [8, 16], "epochs": 3})
    store.start_job(
        {
            "job": {"name": "mixed"},
            "features": {**pca, "label_names": list(FASHION_MNIST_CLASSES), "shape": [60, 6]},
        }
    )
    runs = [("lloyd", 4), ("lloyd", 10), ("lloyd", 12), ("gmm", 10), ("gmm", 40)]
    rows = []
    for algorithm, k in runs:
        found = confusion_matrices(np.arange(200) % 10, rng.integers(0, k, 200), k)
        variables = {n: (v.dims, v.values) for n, v in found.variables.items()}
        centers = "centroids" if algorithm == "lloyd" else "means"
        variables[centers] = (("cluster", "feature"), rng.random((k, 6)))
        metrics = {"accuracy": 0.5, "test_accuracy": 0.4, "nmi": 0.3, "test_nmi": 0.2}
        metrics.update({"test_silhouette": 0.1, "test_ari": 0.05})
        if algorithm == "gmm":
            scores = {"bic": 10.0 * k, "aic": 9.0 * k, "log_likelihood": -1.0, "lower_bound": -1}
            metrics.update({**scores, "test_log_likelihood": -1.5, "inertia": None})
            history = {"lower_bound": ("iteration", [-2.0, -1.0])}
        else:
            metrics.update({"inertia": 100.0 / k, "silhouette": 0.2, "j_clust": 1.0 / k})
            metrics["test_inertia"] = 30.0 / k
            history = {"inertia": ("iteration", [2.0, 1.0])}
        store.write_run(
            run_name(algorithm, k),
            variables,
            xr.Dataset(history, coords={"iteration": [1, 2]}),
            {
                "algorithm": algorithm,
                "k": k,
                "n_iter": 2,
                "metrics": metrics,
                "features": coder if algorithm == "gmm" else pca,
                **({"inertia": metrics["inertia"]} if algorithm == "lloyd" else {}),
            },
        )
        rows.append(metrics)
    names = sorted({m for r in rows for m in r})
    table = sweep_table(
        [k for _, k in runs],
        {m: [np.nan if r.get(m) is None else r[m] for r in rows] for m in names},
        [a for a, _ in runs],
    )
    store.write_sweep(table.assign_coords(algorithm=table["algorithm"].astype(object)))
    store.finish("complete")
    return store


def test_mixture_scores_held_out_names_and_learned_features_render(mixed, monkeypatch):
    drawn = _drawn(monkeypatch)
    html = write_report(mixed.path).read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    header = re.findall(r"<th>(.*?)</th>", re.search(r"<thead>(.*?)</thead>", html).group(1))
    assert header[4:-1] == [
        "inertia",
        "inertia (test)",
        "accuracy",
        "accuracy (test)",
        "aic",
        "ari (test)",
        "bic",
        "j_clust",
        "log_likelihood",
        "log_likelihood (test)",
        "lower_bound",
        "nmi",
        "nmi (test)",
        "silhouette",
        "silhouette (test)",
    ]
    assert "<tr><td>gmm-k10</td><td>gmm</td><td>10</td><td>2</td><td></td>" in html
    for metric in ("bic", "aic", "lower_bound", "log_likelihood", "j_clust", "silhouette"):
        assert f"sweep-{metric}.png" in images
    # Drawn with its fitted metric; a held-out one without it gets its own figure.
    assert "sweep-test_log_likelihood.png" not in images
    assert "sweep-test_ari.png" in images and "<figcaption>ari (test) against k<" in html
    assert "log_likelihood against k (dotted: test samples)" in html
    assert "inertia against k (dotted: test samples)" in html
    # Features: the runs differ (PCA for k-means, an autoencoder for the mixtures).
    assert "<b>Features</b> (the runs differ)" in html
    assert (
        "PCA: components 6, whiten yes, images 4 × 4, split train, fitted on split train, "
        "store /data/pca.zarr, matrix 60 × 6 <i>(lloyd-k4, lloyd-k10, lloyd-k12)</i>" in html
    )
    assert "autoencoder: components 6, filters [8, 16], epochs 3, images 4 × 4" in html
    assert "(gmm-k10, gmm-k40)" in html
    # Confusion figures: each algorithm's smallest k and its k = 10 classes, class names.
    shown = [i for i in images if i.startswith("confusion-")]
    assert shown == ["confusion-gmm-k10.png", "confusion-lloyd-k4.png", "confusion-lloyd-k10.png"]
    ax = drawn["confusion-gmm-k10.png"].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(FASHION_MNIST_CLASSES)
    assert ax.get_xticklabels()[0].get_text().endswith(" (T-shirt/top)")


def test_more_clusters_than_classes_draw_the_contingency_table_or_the_majority_map():
    rng = np.random.default_rng(3)
    y = np.arange(300) % 5
    names = ["zero", "one", "two", "three", "four"]
    # k = 8 > 5 classes: the contingency table, matched clusters first in label order.
    found = confusion_matrices(y, rng.integers(0, 8, 300), 8)
    table = found["contingency"].values
    view = confusion.confusion_view(found, "lloyd-k8", names)
    assert view.kind == "contingency" and view.counts.shape == (5, 8)
    assert sorted(view.counts.T.tolist()) == sorted(table.T.tolist())  # columns reordered
    assert np.trace(view.counts[:, :5]) / 300 == pytest.approx(one_to_one_accuracy(table))
    assert all(
        re.fullmatch(rf"\d+ \({n}\)", c) for c, n in zip(view.columns[:5], names, strict=True)
    )
    assert f"matches only 5 clusters to labels ({one_to_one_accuracy(table):.3f})" in view.caption
    assert "Contingency table of lloyd-k8" in view.caption
    # k = 30 > MAX_CONTINGENCY_COLUMNS: the confusion matrix of the majority map.
    assert confusion.MAX_CONTINGENCY_COLUMNS < 30
    found = confusion_matrices(y, rng.integers(0, 30, 300), 30)
    table = found["contingency"].values
    view = confusion.confusion_view(found, "lloyd-k30", names[:4])  # wrong length: values
    assert view.kind == "majority" and view.counts.shape == (5, 5)
    assert view.rows == view.columns == ["0", "1", "2", "3", "4"]
    assert view.counts.sum() == 300
    assert np.trace(view.counts) / 300 == pytest.approx(majority_accuracy(table))
    assert "majority map" in view.caption and "matches only 5 clusters" in view.caption
    assert view.xlabel == "cluster (majority label)"


def test_confusion_runs_are_each_algorithms_smallest_k_and_k_equal_to_the_classes():
    runs = [("a-k2", "a", 2, 10), ("a-k10", "a", 10, 10), ("a-k64", "a", 64, 10)]
    runs += [("b-k16", "b", 16, 10), ("b-k32", "b", 32, 10)]
    assert confusion.confusion_runs(runs) == ["a-k2", "a-k10", "b-k16"]
    many = [(f"x{i}-k4", f"x{i}", 4, 10) for i in range(20)]
    assert len(confusion.confusion_runs(many)) == confusion.MAX_CONFUSION_FIGURES
