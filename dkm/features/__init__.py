"""What gets clustered: whole images as pixels, or patches cut from them.

:func:`build_features` turns a dataset store into the feature matrix of a job (cutting and
storing patches when they are not stored yet); the runner and ``dkm patches`` share it.
"""

from dkm.features.build import (
    FEATURE_KINDS,
    SPLITS,
    Features,
    build_features,
    cut_patches,
    features_identity,
    patch_store_path,
)
from dkm.features.patches import PatchLayout, extract_patches, stitch_patches, write_patches
from dkm.features.pixels import pixel_matrix

__all__ = [
    "FEATURE_KINDS",
    "SPLITS",
    "Features",
    "PatchLayout",
    "build_features",
    "cut_patches",
    "extract_patches",
    "features_identity",
    "patch_store_path",
    "pixel_matrix",
    "stitch_patches",
    "write_patches",
]
