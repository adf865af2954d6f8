"""What gets clustered: whole images as pixels, patches cut from them, or features learned
from them (PCA, a convolutional autoencoder's bottleneck).

:func:`build_features` turns a dataset store into the feature matrix of a job (cutting and
storing patches, or learning and storing features, when they are not stored yet); the runner
and ``dkm patches`` share it.
"""

from dkm.features.build import (
    FEATURE_KINDS,
    SPLITS,
    Features,
    build_features,
    cut_patches,
    features_identity,
    learn_features,
    learned_store_path,
    patch_store_path,
)
from dkm.features.learned import (
    LEARNED_KINDS,
    LEARNED_RULES,
    AutoencoderFeatures,
    PCAFeatures,
    learner_from,
    learner_problems,
)
from dkm.features.patches import PatchLayout, extract_patches, stitch_patches, write_patches
from dkm.features.pixels import pixel_matrix

__all__ = [
    "FEATURE_KINDS",
    "LEARNED_KINDS",
    "LEARNED_RULES",
    "SPLITS",
    "AutoencoderFeatures",
    "Features",
    "PCAFeatures",
    "PatchLayout",
    "build_features",
    "cut_patches",
    "extract_patches",
    "features_identity",
    "learn_features",
    "learned_store_path",
    "learner_from",
    "learner_problems",
    "patch_store_path",
    "pixel_matrix",
    "stitch_patches",
    "write_patches",
]
