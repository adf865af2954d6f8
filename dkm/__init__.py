"""dkm: distributed k-means clustering jobs on Dask over chunked Zarr datasets."""

from dkm.data.catalog import DATASETS, ingest
from dkm.data.patches import extract_patches, stitch_patches
from dkm.data.store import open_dataset

__version__ = "0.1.0"

__all__ = [
    "DATASETS",
    "__version__",
    "extract_patches",
    "ingest",
    "open_dataset",
    "stitch_patches",
]

# k-means estimators (dkm/kmeans/).
from dkm.kmeans import KMeans, MiniBatchKMeans, kmeans_parallel

__all__ += ["KMeans", "MiniBatchKMeans", "kmeans_parallel"]
