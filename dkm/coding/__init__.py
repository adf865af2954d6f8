"""Using a patch dictionary: whole images rebuilt from it, and patches sparse-coded over it.

:func:`reconstruct_images` replaces every window of every image by its nearest centroid (or
by its sparse code, :class:`SparseCoding`) and stitches the windows back, lazily on the
cluster; :func:`image_error` turns its per-image errors into the set's per-pixel error;
:func:`encode_patches` gives compact sparse codes of a patch matrix. scikit-learn is imported
only inside the encoding tasks.
"""

from dkm.coding.reconstruct import image_error, reconstruct_images
from dkm.coding.sparse import CODING_METHODS, SparseCoding, encode_patches

__all__ = [
    "CODING_METHODS",
    "SparseCoding",
    "encode_patches",
    "image_error",
    "reconstruct_images",
]
