"""dkm: distributed k-means clustering jobs on Dask over chunked Zarr datasets."""

from dkm.data.catalog import DATASETS, ingest
from dkm.data.store import open_dataset
from dkm.features.patches import extract_patches, stitch_patches
from dkm.jobs import JobSpec, load_job
from dkm.kmeans import KMeans, MiniBatchKMeans, kmeans_parallel
from dkm.runner import run_job

__version__ = "0.1.0"

__all__ = [
    "DATASETS",
    "JobSpec",
    "KMeans",
    "MiniBatchKMeans",
    "__version__",
    "extract_patches",
    "ingest",
    "kmeans_parallel",
    "load_job",
    "open_dataset",
    "run_job",
    "stitch_patches",
]
