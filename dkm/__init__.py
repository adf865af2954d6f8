"""dkm: distributed k-means clustering jobs on Dask over chunked Zarr datasets."""

from importlib import import_module

from dkm import config  # noqa: F401 - registers dkm's defaults in dask's config first

__version__ = "0.1.0"

# The public API is imported on first use (PEP 562): a Dask worker that unpickles one of
# dkm's kernels imports this package first, and importing everything here (xarray,
# dask.array, scikit-learn, the runner) would take ~200 MB of its memory limit before it
# holds any data.
_API = {
    "DATASETS": "dkm.data.catalog",
    "ingest": "dkm.data.catalog",
    "open_dataset": "dkm.data.store",
    "PatchLayout": "dkm.features",
    "extract_patches": "dkm.features",
    "stitch_patches": "dkm.features",
    "SparseCoding": "dkm.coding",
    "reconstruct_images": "dkm.coding",
    "encode_patches": "dkm.coding",
    "JobSpec": "dkm.jobs",
    "load_job": "dkm.jobs",
    "parse_job": "dkm.jobs",
    "GaussianMixture": "dkm.mixture",
    "KMeans": "dkm.kmeans",
    "MiniBatchKMeans": "dkm.kmeans",
    "kmeans_parallel": "dkm.kmeans",
    "ResultsStore": "dkm.results",
    "load_model": "dkm.results",
    "plan_job": "dkm.runner",
    "run_job": "dkm.runner",
}

__all__ = [
    "DATASETS",
    "GaussianMixture",
    "JobSpec",
    "KMeans",
    "MiniBatchKMeans",
    "PatchLayout",
    "ResultsStore",
    "SparseCoding",
    "__version__",
    "encode_patches",
    "extract_patches",
    "ingest",
    "kmeans_parallel",
    "load_job",
    "load_model",
    "open_dataset",
    "parse_job",
    "plan_job",
    "reconstruct_images",
    "run_job",
    "stitch_patches",
]


def __getattr__(name: str):
    if name in _API:
        value = getattr(import_module(_API[name]), name)
    elif not name.startswith("_"):
        try:  # a subpackage used as an attribute (dkm.kmeans...) after a bare `import dkm`
            value = import_module(f"dkm.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"dkm.{name}":
                raise
            raise AttributeError(f"module 'dkm' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'dkm' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
