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
# # Patch dictionaries of handwritten digits
#
# The patch-dictionary study: cut the 5000 MNIST digits into 5x5 patches (stride 5, one
# pixel of zero padding: 36 windows per digit), learn dictionaries of k = 16 .. 16384
# centroids with Lloyd and with mini-batch k-means, rebuild whole digits from them, and see
# how the error falls with k; then code every patch with two atoms (orthogonal matching
# pursuit) over the same dictionaries, and rebuild images the dictionary never saw.
#
# Everything runs from the job file `jobs/patch-dictionary.yaml` through dkm's public API:
# `dkm.parse_job` / `dkm.run_job` run the sweep on a local Dask cluster and write one
# results store; `xarray.open_datatree` reads it back; `dkm.load_model` gives a fitted
# dictionary back.
#
# Set `DKM_NOTEBOOK_SMALL=1` to run a small version (two values of k, a few iterations, in a
# temporary folder): the test suite runs the notebook that way.

# %% tags=["parameters"]
import os

SMALL = os.environ.get("DKM_NOTEBOOK_SMALL", "0") == "1"

# %%
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
job = yaml.safe_load((ROOT / "jobs" / "patch-dictionary.yaml").read_text())
if SMALL:
    work = Path(tempfile.mkdtemp(prefix="dkm-notebook-"))
    job["model"].update(k=[16, 32], max_iter=5)
    job["data"]["store"] = str(work / "mnist-5k.zarr")
    job["output"].update(store=str(work / "patch-dictionary.zarr"))
else:
    os.chdir(ROOT)  # the job's relative paths (data/, results/) are the repository's
spec = dkm.parse_job(job, "jobs/patch-dictionary.yaml")
print(f"{len(spec.model.k)} values of k x {len(spec.model.algorithms)} algorithms")

# %%
started = time.perf_counter()
outcome = dkm.run_job(spec)
print(f"{outcome.status} in {time.perf_counter() - started:.0f} s:",
      {r.status for r in outcome.runs})

# %% [markdown]
# ## Image error against k
#
# Every run rebuilt all 5000 digits from its dictionary and recorded the per-pixel error
# over whole images (`image_rmse`: all-zero patches, left out of the clustering, are rebuilt
# by the null centroid). The sweep table holds it per algorithm and k, with the elbow of
# inertia against k.

# %%
tree = xr.open_datatree(spec.output.store, engine="zarr")
sweep = tree["sweep"].to_dataset()
elbows = sweep.attrs.get("elbows", {})
table = sweep[["image_rmse", "sparse_image_rmse", "inertia"]].to_dataframe().unstack(
    "algorithm"
)
table

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for algorithm in sweep["algorithm"].values:
    row = sweep.sel(algorithm=algorithm)
    for ax, metric in zip(axes, ("image_rmse", "inertia"), strict=True):
        (line,) = ax.plot(row["k"], row[metric], "o-", label=str(algorithm))
        knee = elbows.get(str(algorithm), -1)
        if knee > 0:
            ax.axvline(knee, color=line.get_color(), ls=":", lw=1)
for ax, metric in zip(axes, ("image RMSE per pixel", "inertia"), strict=True):
    ax.set(xscale="log", xlabel="k (dictionary size)", ylabel=metric)
    ax.legend()
axes[1].set_yscale("log")
fig.suptitle("Patch dictionaries of MNIST digits (dotted: elbow of inertia)")
plt.show()

# %% [markdown]
# ## Reconstructed digits
#
# The first digits next to their reconstructions from Lloyd dictionaries of growing size.

# %%
runs = tree["runs"]
wanted = [k for k in (16, 64, 256, 4096, 16384) if f"lloyd-k{k}" in runs.children]
wanted = wanted or [int(k) for k in spec.model.k]
first = runs[f"lloyd-k{wanted[0]}"]
rows = [("original", first["originals"].values)]
rows += [(f"k={k}", runs[f"lloyd-k{k}"]["reconstructions"].values) for k in wanted]
n = rows[0][1].shape[0]
fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.25 * len(rows)))
for r, (label, images) in enumerate(rows):
    for c in range(n):
        axes[r, c].imshow(images[c], cmap="gray", vmin=0, vmax=1)
        axes[r, c].set(xticks=[], yticks=[])
    axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center")
plt.show()

# %% [markdown]
# ## Sparse coding against k-means
#
# The study's claim: coding each patch with two atoms reaches the error of hard assignment
# with half the dictionary. Per k, the error of hard assignment at k and at 2k against the
# error of OMP with two atoms at k (Lloyd dictionaries).

# %%
lloyd = sweep.sel(algorithm="lloyd")
ks = [int(k) for k in lloyd["k"].values]
rows = []
for k in ks:
    hard_2k = float(lloyd["image_rmse"].sel(k=2 * k)) if 2 * k in ks else np.nan
    rows.append(
        {
            "k": k,
            "hard, k": float(lloyd["image_rmse"].sel(k=k)),
            "hard, 2k": hard_2k,
            "OMP 2 atoms, k": float(lloyd["sparse_image_rmse"].sel(k=k)),
        }
    )
comparison = pd.DataFrame(rows).set_index("k")
comparison["sparse at k <= hard at 2k"] = comparison["OMP 2 atoms, k"] <= comparison["hard, 2k"]
comparison

# %% [markdown]
# ## Novel images
#
# A dictionary learned on digits rebuilds images it never saw: letters and shapes drawn
# here, and Fashion-MNIST clothing (from Debian's `dataset-fashion-mnist` when installed),
# with the same patch layout as the run.

# %%
from PIL import Image, ImageDraw, ImageFont


def drawn(kind: str) -> np.ndarray:
    """A 28x28 white-on-black letter or shape."""
    img = Image.new("L", (28, 28), 0)
    draw = ImageDraw.Draw(img)
    if len(kind) == 1:
        font = ImageFont.load_default(size=22)
        draw.text((14, 14), kind, fill=255, font=font, anchor="mm")
    elif kind == "circle":
        draw.ellipse((5, 5, 22, 22), outline=255, width=3)
    elif kind == "square":
        draw.rectangle((6, 6, 21, 21), outline=255, width=3)
    elif kind == "triangle":
        draw.polygon([(14, 4), (24, 23), (4, 23)], outline=255, width=3)
    elif kind == "cross":
        draw.line((5, 5, 22, 22), fill=255, width=3)
        draw.line((5, 22, 22, 5), fill=255, width=3)
    return np.asarray(img)


novel = np.stack([drawn(s) for s in ["d", "k", "m", "A", "circle", "square", "triangle", "cross"]])
fashion_file = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
if fashion_file.exists():
    from dkm.data.readers import read_idx

    novel = np.concatenate([novel, read_idx(fashion_file)[:8]])

largest = max(int(k) for k in lloyd["k"].values)
run_name = f"lloyd-k{largest}"
model = dkm.load_model(spec.output.store, run_name)
layout = dkm.PatchLayout.from_attrs(tree[f"runs/{run_name}"].attrs["features"])
images = xr.DataArray(novel, dims=("sample", "y", "x"))
hard = dkm.reconstruct_images(images, model.cluster_centers_, layout).compute()
omp = dkm.reconstruct_images(
    images, model.cluster_centers_, layout, coding=dkm.SparseCoding("omp", n_nonzero_coefs=2)
).compute()
print(
    f"{run_name}: image RMSE on novel images, hard {np.sqrt(hard['image_mse'].mean()):.4f}, "
    f"OMP {np.sqrt(omp['image_mse'].mean()):.4f}"
)
rows = [("original", hard["originals"].values), ("hard", hard["reconstructions"].values),
        ("OMP", omp["reconstructions"].values)]
n = novel.shape[0]
fig, axes = plt.subplots(3, n, figsize=(0.9 * n, 3.2))
for r, (label, values) in enumerate(rows):
    for c in range(n):
        axes[r, c].imshow(values[c], cmap="gray", vmin=0, vmax=1)
        axes[r, c].set(xticks=[], yticks=[])
    axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center")
fig.suptitle(f"Novel images rebuilt with the MNIST dictionary of {run_name}")
plt.show()
