# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # CIFAR-10 through a convolutional autoencoder, then k-means, scored by the silhouette
#
# The study encodes the CIFAR-10 images (32x32 RGB, 10 classes) with a convolutional
# autoencoder, clusters the bottleneck vectors with k-means (k = 10) and scores the
# clusters by their silhouette: **0.053**, clusters that barely stand apart.
#
# dkm runs it from `jobs/cifar10-autoencoder.yaml`: the autoencoder (three stride-2
# convolutions down to a dense 64-wide bottleneck and back; Keras on JAX) is trained on a
# seeded sample of the training images on the client, the encoder is applied to every image
# chunk by chunk on the Dask cluster, and the bottleneck vectors are stored next to the data
# and reused. k-means is fitted on the 50,000 training vectors; the silhouette is computed on
# a seeded sample of 10,000 of them (it compares every pair), and on the test images with
# the same model; the clusters are also scored against the classes.
#
# **The data.** The job reads the CIFAR-10 python batches from `data/cifar-10-batches-py`.
# When they are not there (this machine has no copy and no internet), this notebook writes a
# **synthetic stand-in in the same format**: 60,000 32x32 RGB images in 10 classes, each
# class a coloured shape (cross, square, triangle, disc, stripes, ring, checkerboard, bar,
# diagonal) on a background, with random position, size, colours pulled toward other
# classes', a light gradient and pixel noise. The stand-in has far more class structure than
# photographs of animals and vehicles, so **its silhouette says nothing about the study's**:
# it shows the pipeline running end to end, not a reproduction. Put the real batches in
# `data/cifar-10-batches-py` and rerun to reproduce the study.
#
# Set `DKM_NOTEBOOK_SMALL=1` to run a small version (a few hundred synthetic images, one
# epoch, a tiny network, in a temporary folder): the test suite runs the notebook that way.

# %% tags=["parameters"]
import os

SMALL = os.environ.get("DKM_NOTEBOOK_SMALL", "0") == "1"

# %%
import pickle
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import xarray as xr
import yaml

import dkm

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
job = yaml.safe_load((ROOT / "jobs" / "cifar10-autoencoder.yaml").read_text())
REAL = not SMALL and (ROOT / job["data"]["source"]).is_dir()
print("data:", "the real CIFAR-10 batches" if REAL else "a SYNTHETIC stand-in (see above)")

# %% [markdown]
# ## The synthetic stand-in
#
# Written only when the real batches are missing, in CIFAR-10's "python version" format:
# pickled dicts with `b"data"` (n, 3072) uint8 rows (the red plane, then green, then blue,
# each 32x32 row-major) and `b"labels"`, in `data_batch_1` .. `data_batch_5` and
# `test_batch`, and the class names in `batches.meta`. dkm reads it exactly as it reads the
# real files.

# %%
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per class: background colour, shape colour (RGB) and the shape.
STYLE = [
    ((120, 160, 220), (230, 230, 235), "cross"),
    ((90, 90, 90), (200, 40, 40), "square"),
    ((110, 170, 90), (140, 90, 50), "triangle"),
    ((150, 120, 100), (240, 190, 120), "disc"),
    ((70, 120, 50), (170, 120, 70), "hstripes"),
    ((170, 150, 130), (90, 60, 40), "ring"),
    ((60, 140, 60), (40, 200, 80), "checker"),
    ((130, 110, 80), (100, 60, 30), "vstripes"),
    ((40, 80, 160), (220, 220, 220), "bar"),
    ((110, 110, 120), (230, 200, 40), "diagonal"),
]
YY, XX = np.mgrid[0:32, 0:32].astype(np.float32)


def shape_masks(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, 32, 32)`` masks of one shape at random centres, sizes and stripe periods."""
    cy, cx = rng.uniform(10, 22, (2, n, 1, 1)).astype(np.float32)
    r = rng.uniform(6, 11, (n, 1, 1)).astype(np.float32)
    period = rng.uniform(5, 9, (n, 1, 1)).astype(np.float32)
    dy, dx = YY - cy, XX - cx
    dist = np.sqrt(dy**2 + dx**2)
    waves_y, waves_x = np.sin(2 * np.pi * YY / period), np.sin(2 * np.pi * XX / period)
    return {
        "disc": lambda: dist < r,
        "ring": lambda: (dist < r) & (dist > 0.55 * r),
        "square": lambda: (np.abs(dy) < 0.8 * r) & (np.abs(dx) < 0.8 * r),
        "triangle": lambda: (dy < 0.7 * r) & (dy > -r + 2 * np.abs(dx)),
        "cross": lambda: (
            ((np.abs(dy) < 0.25 * r) & (np.abs(dx) < 1.3 * r))
            | ((np.abs(dx) < 0.25 * r) & (np.abs(dy) < r))
        ),
        "hstripes": lambda: (waves_y > 0) & (dist < 1.4 * r),
        "vstripes": lambda: (waves_x > 0) & (dist < 1.4 * r),
        "checker": lambda: (waves_y * waves_x > 0) & (dist < 1.3 * r),
        "bar": lambda: (np.abs(dy) < 0.35 * r) & (np.abs(dx) < 1.5 * r),
        "diagonal": lambda: np.abs(dy - dx) < 0.35 * r,
    }[kind]()


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(n, 32, 32, 3)`` uint8 images of the classes ``labels``."""
    n = labels.size
    palette = np.array([style[:2] for style in STYLE], np.float32)  # (class, back/shape, rgb)
    # Each image's colours are its class's, pulled part of the way toward another class's
    # and jittered, so that colour alone does not give the class away.
    pull = rng.uniform(0, 0.5, (n, 1, 1)).astype(np.float32)
    colours = (1 - pull) * palette[labels] + pull * palette[rng.integers(0, 10, n)]
    colours += rng.normal(0, 30, colours.shape).astype(np.float32)
    mask = np.zeros((n, 32, 32), bool)
    for c, (_, _, kind) in enumerate(STYLE):
        where = np.flatnonzero(labels == c)
        mask[where] = shape_masks(kind, where.size, rng)
    images = np.where(mask[..., None], colours[:, None, None, 1], colours[:, None, None, 0])
    images += (YY[None, :, :, None] - 16) * rng.normal(0, 1.5, (n, 1, 1, 1)).astype(np.float32)
    images += 20 * rng.standard_normal(images.shape, dtype=np.float32)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def write_cifar_batches(folder: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Synthetic images in CIFAR-10's python batch format (5 training batches, 1 test)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = {f"data_batch_{i}": n_train // 5 for i in range(1, 6)} | {"test_batch": n_test}
    for name, n in sizes.items():
        labels = rng.permutation(np.arange(n) % 10)
        planes = synthetic_images(labels, rng).transpose(0, 3, 1, 2).reshape(n, 3072)
        batch = {b"batch_label": name.encode(), b"data": planes, b"labels": labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


if SMALL:
    work = Path(tempfile.mkdtemp(prefix="dkm-notebook-"))
    source = work / "cifar-10-batches-py"
    write_cifar_batches(source, n_train=500, n_test=100)
    job["data"].update(store=str(work / "cifar10-synthetic.zarr"), source=str(source))
    job["features"].update(epochs=1, filters=[4, 8], n_components=8, train_samples=300)
    job["model"].update(max_iter=10, n_init=1)
    job["evaluate"]["silhouette_sample"] = 400
    job["output"]["store"] = str(work / "cifar10-autoencoder-synthetic.zarr")
else:
    os.chdir(ROOT)  # the job's relative paths (data/, results/) are the repository's
    if not REAL:
        source = Path("data/cifar10-synthetic/cifar-10-batches-py")
        if not (source / "test_batch").is_file():
            started = time.perf_counter()
            write_cifar_batches(source, n_train=50_000, n_test=10_000)
            print(f"wrote the synthetic batches in {time.perf_counter() - started:.0f} s")
        # Stores of their own, so the stand-in is never mistaken for CIFAR-10.
        job["data"].update(store="data/cifar10-synthetic.zarr", source=str(source))
        job["output"]["store"] = "results/cifar10-autoencoder-synthetic.zarr"
spec = dkm.parse_job(job, "jobs/cifar10-autoencoder.yaml")
print(spec.data.source, "->", spec.data.store, "->", spec.output.store)

# %%
started = time.perf_counter()
outcome = dkm.run_job(spec)
job_seconds = time.perf_counter() - started
print(
    f"{outcome.status} in {job_seconds:.0f} s:",
    ", ".join(f"{r.name} {r.status}" for r in outcome.runs),
)

# %% [markdown]
# ## The images
#
# Ten training images of each class, as dkm stored them (`images (sample, y, x, channel)`
# uint8).

# %%
data = dkm.open_dataset(spec.data.store)
labels = data["label"].values
shown = np.concatenate([np.flatnonzero(labels == c)[:10] for c in range(10)])
tiles = data["images"][np.sort(shown)].values[np.argsort(np.argsort(shown))]
fig, axes = plt.subplots(10, 10, figsize=(8, 8.6))
for c in range(10):
    for j in range(10):
        axes[c, j].imshow(tiles[10 * c + j])
    axes[c, 0].set_ylabel(CLASSES[c], rotation=0, ha="right", va="center", fontsize=8)
for ax in axes.flat:
    ax.set(xticks=[], yticks=[])
fig.suptitle(("CIFAR-10" if REAL else "SYNTHETIC stand-in for CIFAR-10") + ": training images")
plt.show()

# %% [markdown]
# ## The autoencoder
#
# The feature store keeps the trained network (`.keras` bytes, variable `model`) and the
# training loss of every epoch (`loss (epoch)`). Rebuilt from those bytes, it reconstructs
# test images it never saw.

# %%
from dkm.features import autoencoder

tree = xr.open_datatree(spec.output.store, engine="zarr")
run = tree["runs/lloyd-k10"]
features = xr.open_zarr(run.attrs["features"]["store"])
network = autoencoder.load_model(features["model"].values.tobytes())
test = np.flatnonzero(data["split"].values == "test")[:10]
originals = data["images"][test].values
rebuilt = network.predict(autoencoder.as_inputs(originals), verbose=0)

fig = plt.figure(figsize=(12, 4.2))
grid = fig.add_gridspec(2, 13)
ax = fig.add_subplot(grid[:, :3])
loss = features["loss"].values
ax.plot(np.arange(1, loss.size + 1), loss, "o-")
ax.set(
    xlabel="epoch",
    ylabel="training loss (MSE per value)",
    yscale="log",
    title=f"{features.attrs['n_train']} training images",
)
for j in range(10):
    for r, images in enumerate((originals, rebuilt)):
        ax = fig.add_subplot(grid[r, 3 + j])
        ax.imshow(np.clip(images[j], 0, 255 if images.dtype == np.uint8 else 1))
        ax.set(xticks=[], yticks=[])
        if j == 0:
            ax.set_ylabel(("original", "rebuilt")[r])
fig.suptitle(
    f"autoencoder: filters {features.attrs['filters']}, bottleneck {features.attrs['n_components']}"
)
plt.show()

# %% [markdown]
# ## The clusters in the bottleneck
#
# The bottleneck vectors of held-out test images, projected on their first two principal
# components, coloured by class and by k-means cluster.

# %%
from sklearn.decomposition import PCA

model = dkm.load_model(spec.output.store, "lloyd-k10")
split = features["split"].values
embedded = features["features"].values
clusters = np.asarray(model.predict(embedded))
held_out = np.flatnonzero(split == "test")[:3000]
flat = PCA(2).fit(embedded[split == "train"]).transform(embedded[held_out])
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
for ax, colour, what in (
    (axes[0], labels[held_out], "class"),
    (axes[1], clusters[held_out], "k-means cluster"),
):
    points = ax.scatter(flat[:, 0], flat[:, 1], c=colour, cmap="tab10", vmin=0, vmax=9, s=3)
    ax.set(xlabel="PC 1 of the bottleneck", ylabel="PC 2", title=f"test images by {what}")
    if what == "class":
        ax.legend(points.legend_elements()[0], CLASSES, fontsize=7, loc="best", ncol=2)
plt.show()

# %% [markdown]
# ## Silhouette per cluster
#
# The silhouette of a vector is (b - a) / max(a, b), a its mean distance to its own
# cluster and b to the nearest other cluster; the job's `silhouette` is the mean over its
# seeded sample of training vectors. Per vector (scikit-learn's `silhouette_samples` on a
# sample of the stored training vectors), sorted within each cluster:

# %%
from sklearn.metrics import silhouette_samples

rng = np.random.default_rng(0)
train = np.flatnonzero(split == "train")
sample = np.sort(rng.choice(train, size=min(5000, train.size), replace=False))
values = silhouette_samples(embedded[sample], clusters[sample])
metrics = run.attrs["metrics"]
fig, ax = plt.subplots(figsize=(7, 5))
bottom, middles = 0, []
for c in range(10):
    mine = np.sort(values[clusters[sample] == c])
    ax.fill_betweenx(np.arange(bottom, bottom + mine.size), 0, mine, color=plt.cm.tab10(c))
    middles.append(bottom + mine.size / 2)
    bottom += mine.size + values.size // 100
ax.axvline(
    metrics["silhouette"], color="k", ls="--", label=f"dkm's silhouette {metrics['silhouette']:.3f}"
)
ax.axvline(0.053, color="C3", ls=":", label="the study's 0.053 (real CIFAR-10)")
ax.set(
    xlabel="silhouette",
    ylabel="cluster (its vectors, sorted)",
    yticks=middles,
    yticklabels=range(10),
    title=("CIFAR-10" if REAL else "SYNTHETIC stand-in") + ": silhouette per vector",
)
ax.legend(loc="lower right")
plt.show()
print(
    f"mean silhouette: dkm's job {metrics['silhouette']:.4f} (its seeded sample of "
    f"{spec.silhouette_sample}), scikit-learn {values.mean():.4f} (this sample of {sample.size})"
)
per_cluster = pd.Series(values).groupby(clusters[sample]).mean().rename("mean silhouette")
per_cluster.to_frame().T.round(3)

# %% [markdown]
# ## The study's number and dkm's
#
# The job's metrics (training vectors, and `test_` for the held-out test images), then the
# comparison. On the synthetic stand-in the numbers only show that the pipeline runs: its
# classes are coloured shapes, far easier to separate than CIFAR-10's photographs.

# %%
pd.Series(metrics).to_frame("value").T

# %%
data_note = "CIFAR-10" if REAL else "SYNTHETIC stand-in, not comparable"
fe = features.attrs
pd.DataFrame(
    [
        (
            "silhouette of k-means (k = 10) on the autoencoder's bottleneck",
            "0.053",
            f"{metrics['silhouette']:.3f} ({data_note})",
            ("data yes; " if REAL else "no: synthetic data; ")
            + f"network not the study's (filters {fe['filters']}, bottleneck "
            f"{fe['n_components']}, {loss.size} epochs on {fe['n_train']} images); "
            f"silhouette on a sample of {spec.silhouette_sample} training vectors",
        ),
        (
            "the same, held-out test images",
            "-",
            f"{metrics['test_silhouette']:.3f} ({data_note})",
            "-",
        ),
        (
            "Hungarian accuracy of the clusters",
            "-",
            f"{100 * metrics['one_to_one_accuracy']:.1f} % ({data_note})",
            "-",
        ),
    ],
    columns=["", "the study's number", "dkm's number", "same protocol?"],
).set_index("")
