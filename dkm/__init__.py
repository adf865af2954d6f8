"""dkm: distributed k-means clustering jobs on Dask over chunked Zarr datasets."""

from dkm import config  # noqa: F401 - registers dkm's defaults in dask's config first
from dkm.data.catalog import DATASETS, ingest
from dkm.data.store import open_dataset
from dkm.features import PatchLayout, extract_patches, stitch_patches
from dkm.jobs import JobSpec, load_job
from dkm.kmeans import KMeans, MiniBatchKMeans, kmeans_parallel
from dkm.results import ResultsStore, load_model
from dkm.runner import plan_job, run_job

__version__ = "0.1.0"

__all__ = [
    "DATASETS",
    "JobSpec",
    "KMeans",
    "MiniBatchKMeans",
    "PatchLayout",
    "ResultsStore",
    "__version__",
    "extract_patches",
    "ingest",
    "kmeans_parallel",
    "load_job",
    "load_model",
    "open_dataset",
    "plan_job",
    "run_job",
    "stitch_patches",
]
