"""A convolutional autoencoder whose bottleneck is the feature vector (Keras 3 on JAX).

The network of the classic deep-clustering studies: one stride-2 3x3 ReLU convolution per
entry of ``filters`` on the way down, a dense bottleneck of ``n_components`` (linear, the
layer named :data:`EMBEDDING`), a dense layer reshaped back to the smallest feature map, the
mirrored stride-2 transposed convolutions on the way up and a sigmoid convolution to the
image's channels, cropped to the image size (``same`` padding rounds odd sizes up, so a
28x28 image comes back from 4x4 as 32x32 and is cropped by 2 on every side).

It is trained on the client (:func:`fit_autoencoder`, MSE and Adam, seeded) on images scaled
to [0, 1] with a channel axis (:func:`as_inputs`), and saved as ``.keras`` bytes. The encoder
is then applied chunk-wise on the cluster (:func:`encode`): every worker process rebuilds it
from those bytes once (cached by their hash) and predicts its blocks in batches.

Keras is imported only when an autoencoder is used (:func:`import_keras`), so dkm works
without the ``embed`` extra.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

__all__ = [
    "EMBEDDING",
    "MISSING_EXTRA",
    "as_inputs",
    "build_autoencoder",
    "encode",
    "encoder_from_bytes",
    "fit_autoencoder",
    "import_keras",
    "load_model",
    "missing_extra",
    "versions",
]

log = logging.getLogger("dkm")

EMBEDDING = "embedding"
MISSING_EXTRA = "features.kind: autoencoder needs the embed extra: pip install 'dkm[embed]'"
# Encoders a worker process keeps, by the hash of their model bytes (a sweep uses one).
_CACHE_SIZE = 2
_encoders: OrderedDict[str, Any] = OrderedDict()
# One lock for the cache and for predicting: Keras builds its predict function on first use,
# which is not thread-safe, and XLA already spreads one prediction over the cores.
_lock = threading.Lock()


def missing_extra() -> bool:
    """Whether the ``embed`` extra is missing (found without importing it: a job is checked
    before anything heavy is imported)."""
    import importlib.util

    return any(importlib.util.find_spec(name) is None for name in ("keras", "jax"))


def import_keras():
    """Keras, on the JAX backend unless ``KERAS_BACKEND`` says otherwise.

    Raises
    ------
    ImportError
        :data:`MISSING_EXTRA` when Keras (or its backend) cannot be imported.
    """
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError as err:
        raise ImportError(MISSING_EXTRA) from err
    return keras


def versions() -> dict[str, str]:
    """The Keras version and backend a model was trained with (recorded in its store)."""
    keras = import_keras()
    return {"keras_version": keras.__version__, "keras_backend": keras.backend.backend()}


def as_inputs(images: np.ndarray) -> np.ndarray:
    """Images as the network takes them: float32 in [0, 1] (uint8 divided by 255, as
    :func:`dkm.features.pixel_matrix` scales them) with a channel axis."""
    x = np.asarray(images).astype(np.float32)
    if np.asarray(images).dtype == np.uint8:
        x /= np.float32(255)
    return x[..., None] if x.ndim == 3 else x


def build_autoencoder(image_shape: tuple[int, ...], n_components: int, filters: tuple[int, ...]):
    """The (uncompiled) autoencoder for images of ``image_shape`` ``(y, x[, channel])``.

    Returns
    -------
    keras.Model
        ``(y, x, channel)`` in, the same shape out; the bottleneck is the layer
        :data:`EMBEDDING`.
    """
    keras = import_keras()
    layers = keras.layers
    height, width = int(image_shape[0]), int(image_shape[1])
    channels = int(image_shape[2]) if len(image_shape) == 3 else 1
    inputs = keras.Input((height, width, channels))
    x = inputs
    for f in filters:
        x = layers.Conv2D(f, 3, strides=2, padding="same", activation="relu")(x)
    smallest = tuple(int(s) for s in x.shape[1:])
    x = layers.Flatten()(x)
    code = layers.Dense(n_components, name=EMBEDDING)(x)
    x = layers.Dense(math.prod(smallest), activation="relu")(code)
    x = layers.Reshape(smallest)(x)
    for f in reversed(filters):
        x = layers.Conv2DTranspose(f, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(channels, 3, padding="same", activation="sigmoid")(x)
    extra_y, extra_x = int(x.shape[1]) - height, int(x.shape[2]) - width
    crop = ((extra_y // 2, extra_y - extra_y // 2), (extra_x // 2, extra_x - extra_x // 2))
    outputs = layers.Cropping2D(crop)(x)
    return keras.Model(inputs, outputs, name="dkm_autoencoder")


def fit_autoencoder(
    x: np.ndarray,
    *,
    n_components: int,
    filters: tuple[int, ...],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> tuple[bytes, list[float]]:
    """Train an autoencoder on ``x`` (from :func:`as_inputs`) in this process.

    Logs one line per epoch through the ``dkm`` logger (epoch, loss, seconds).

    Returns
    -------
    model : bytes
        The trained model as a ``.keras`` file.
    losses : list of float
        The training loss (MSE) after each epoch.
    """
    keras = import_keras()
    keras.utils.set_random_seed(seed)  # weights, batch order
    model = build_autoencoder(x.shape[1:], n_components, filters)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")

    class Progress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.started
            loss = (logs or {}).get("loss", float("nan"))
            log.info(
                "autoencoder: epoch %d/%d, loss %.6g, %.1f s", epoch + 1, epochs, loss, seconds
            )

    history = model.fit(
        x, x, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0, callbacks=[Progress()]
    )
    return model_bytes(model), [float(v) for v in history.history["loss"]]


def model_bytes(model) -> bytes:
    """A Keras model as the bytes of its ``.keras`` file."""
    with tempfile.TemporaryDirectory(prefix="dkm-keras-") as tmp, warnings.catch_warnings():
        # Keras's variables convert to numpy without the ``copy`` keyword numpy 2 asks for:
        # numpy warns once per variable saved, about Keras's code, not dkm's or the model's.
        warnings.filterwarnings(
            "ignore", message="__array__ implementation doesn't", category=DeprecationWarning
        )
        path = Path(tmp) / "model.keras"
        model.save(path)
        return path.read_bytes()


def load_model(data: bytes):
    """The Keras model saved as ``data`` (``.keras`` bytes), uncompiled."""
    keras = import_keras()
    with tempfile.TemporaryDirectory(prefix="dkm-keras-") as tmp:
        path = Path(tmp) / "model.keras"
        path.write_bytes(bytes(data))
        return keras.saving.load_model(path, compile=False)


def encoder_from_bytes(data: bytes):
    """The encoder (input to :data:`EMBEDDING`) of the autoencoder saved as ``data``."""
    keras = import_keras()
    model = load_model(data)
    return keras.Model(model.inputs, model.get_layer(EMBEDDING).output)


def _encode_block(
    block: np.ndarray, model: bytes, digest: str, n_components: int, batch_size: int
) -> np.ndarray:
    if block.shape[0] == 0:
        return np.empty((0, n_components), dtype=np.float32)
    x = as_inputs(block)
    with _lock:
        encoder = _encoders.get(digest)
        if encoder is None:  # once per worker process (and model)
            encoder = _encoders[digest] = encoder_from_bytes(model)
            while len(_encoders) > _CACHE_SIZE:
                _encoders.popitem(last=False)
        out = encoder.predict(x, batch_size=batch_size, verbose=0)
    return np.asarray(out, dtype=np.float32)


def encode(images: da.Array, model: bytes, n_components: int, batch_size: int) -> da.Array:
    """The bottleneck of every image, chunk-wise on the cluster (lazily).

    Parameters
    ----------
    images : dask.array.Array
        ``(sample, y, x[, channel])`` as the dataset stores them.
    model : bytes
        The autoencoder as ``.keras`` bytes: one key in the graph, so each worker receives
        it once however many blocks it encodes.
    n_components : int
        The bottleneck size.
    batch_size : int
        Images per prediction step.

    Returns
    -------
    dask.array.Array
        ``(sample, n_components)`` float32, chunked as ``images`` along sample.
    """
    digest = hashlib.sha256(model).hexdigest()
    data = images.rechunk({i: -1 for i in range(1, images.ndim)})
    shipped = dask.delayed(model, name=f"dkm-autoencoder-model-{digest[:16]}")
    return da.map_blocks(
        _encode_block,
        data,
        shipped,
        digest,
        n_components,
        batch_size,
        chunks=(data.chunks[0], (n_components,)),
        drop_axis=list(range(2, data.ndim)),
        dtype=np.float32,
        token="dkm-encode",
    )
