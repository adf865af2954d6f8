"""Learned features (PCA and a convolutional autoencoder) against scikit-learn, dask-ml and
Keras in-process, on a real cluster and real feature stores."""

from __future__ import annotations

import logging
import sys

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA

from dkm._validation import problems
from dkm.cli import main
from dkm.data.store import StoreError, open_dataset, probe, read_attrs, store_identity, write_atomic
from dkm.features import (
    FEATURE_KINDS,
    LEARNED_RULES,
    AutoencoderFeatures,
    PCAFeatures,
    build_features,
    features_identity,
    learned_store_path,
    learner_from,
)

N_TRAIN, N_TEST = 200, 100


def digits_dataset(tmp_path, name="data.zarr", *, n=N_TRAIN + N_TEST, overwrite=False):
    """A dataset store of real 8x8 digits (scaled to 0..255 as ingest does), a train and a
    test split, chunked in blocks of 64 images."""
    bunch = load_digits()
    images = np.rint(bunch.images[:n] * (255 / 16)).astype(np.uint8)
    split = np.array(["train"] * N_TRAIN + ["test"] * (n - N_TRAIN), dtype=object)
    ds = xr.Dataset(
        {
            "images": (("sample", "y", "x"), images),
            "label": ("sample", bunch.target[:n].astype(np.int64)),
            "split": ("sample", split),
        },
        attrs={"dataset": "digits"},
    )
    encoding = {"images": {"chunks": (64, 8, 8)}, "label": {"chunks": (64,)}}
    path = tmp_path / name
    write_atomic(ds, path, kind="dataset", encoding=encoding, overwrite=overwrite)
    return path, ds


def pixels(images: np.ndarray) -> np.ndarray:
    """The pixels as pixel_matrix scales them (float32 / 255), in float64 for the fit."""
    return (images.reshape(len(images), -1).astype(np.float32) / np.float32(255)).astype(float)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_dataset(tmp_path_factory.mktemp("learned"))


def write_id(path):
    return read_attrs(path)["dkm_write_id"]


# ----------------------------------------------------------------------------- specs


def test_learner_specs_own_their_rules_tags_and_attrs():
    assert FEATURE_KINDS == ("pixels", "patches", "pca", "autoencoder")
    assert PCAFeatures(50).tag == "pca50" and PCAFeatures(50, whiten=True).tag == "pca50w"
    assert PCAFeatures(8).attrs() == {"kind": "pca", "n_components": 8, "whiten": False, "seed": 0}
    ae = learner_from("autoencoder", {"filters": [8, 16], "train_samples": 100, "seed": 3})
    assert ae == AutoencoderFeatures(filters=(8, 16), train_samples=100, seed=3)
    assert ae.tag == "ae32" and ae.attrs()["filters"] == [8, 16]
    assert AutoencoderFeatures().attrs()["train_samples"] is None
    # The job parser's table and the constructors agree.
    assert problems({"n_components": 0, "whiten": "yes"}, LEARNED_RULES["pca"]) == [
        ("n_components", "must be an integer >= 1, got 0"),
        ("whiten", "must be true or false, got 'yes'"),
    ]
    assert [k for k, _ in problems({"filters": [8, 0]}, LEARNED_RULES["autoencoder"])] == [
        "filters"
    ]
    with pytest.raises(ValueError, match=r"features\.n_components: required for kind 'pca'"):
        learner_from("pca", {"whiten": True})
    with pytest.raises(ValueError, match=r"features\.learning_rate: must be a finite number > 0"):
        learner_from("autoencoder", {"learning_rate": 0.0})
    with pytest.raises(ValueError, match=r"features\.filters: must be a non-empty list"):
        learner_from("autoencoder", {"filters": []})
    with pytest.raises(ValueError, match="PCAFeatures: n_components must be an integer >= 1"):
        PCAFeatures(0)


# ----------------------------------------------------------------------------- PCA


@pytest.mark.parametrize("whiten", [False, True])
def test_pca_features_equal_scikit_learn_and_dask_ml(client, digits, whiten):
    from dask_ml.decomposition import PCA as DaskPCA

    data, ds = digits
    learner = PCAFeatures(10, whiten=whiten)
    with dask.config.set({"dkm.store.feature-chunk-bytes": 4 * 10 * 64}):  # 64 rows a chunk
        features = build_features(data, kind="pca", learner=learner, fit_split="train")
    train = pixels(ds["images"].values[:N_TRAIN])
    every = pixels(ds["images"].values)
    sk = PCA(10, whiten=whiten, svd_solver="full").fit(train)

    stored = open_dataset(features.store)
    components = stored["components"].values
    sign = np.sign(np.sum(components * sk.components_, axis=1))
    np.testing.assert_allclose(components * sign[:, None], sk.components_, atol=1e-10)
    np.testing.assert_allclose(stored["mean"].values, sk.mean_, atol=1e-12)
    for name in ("explained_variance", "explained_variance_ratio", "singular_values"):
        np.testing.assert_allclose(stored[name].values, getattr(sk, name + "_"), rtol=1e-10)
    # Every sample, the held-out ones too, mapped by the model of the fitted split.
    assert features.X.shape == (N_TRAIN + N_TEST, 10) and features.X.dtype == np.float32
    assert stored["features"].chunks[0][0] == 64
    want = sk.transform(every) * sign
    np.testing.assert_allclose(features.X.values, want, rtol=1e-5, atol=1e-5)
    # dask-ml on the same pixels, in this process: the same fit.
    ref = DaskPCA(10, whiten=whiten, svd_solver="full").fit(da.from_array(train, chunks=(50, -1)))
    np.testing.assert_allclose(components, ref.components_, atol=1e-10)

    assert features.store == learned_store_path(data, learner, "train")
    assert features.store.name == f"data-pca10{'w' if whiten else ''}-train.zarr"
    assert features.tile_shape == (10,) and features.X.name == "features"
    np.testing.assert_array_equal(np.asarray(features.labels), ds["label"].values)
    assert features.attrs == {
        **learner.attrs(),
        "fit_split": "train",
        "split": "all",
        "store": str(features.store),
    }
    attrs = read_attrs(features.store)
    assert attrs["dkm_store"] == "features" and attrs["fit_split"] == "train"
    assert attrs["source_identity"] == store_identity(data) and attrs["whiten"] is whiten
    np.testing.assert_array_equal(stored["split"].values, ds["split"].values.astype(str))


def test_a_heldout_split_is_the_transform_of_its_rows(client, digits):
    data, ds = digits
    learner = PCAFeatures(6)
    held = build_features(data, kind="pca", learner=learner, split="test", fit_split="train")
    sk = PCA(6, svd_solver="full").fit(pixels(ds["images"].values[:N_TRAIN]))
    components = open_dataset(held.attrs["store"])["components"].values
    sign = np.sign(np.sum(components * sk.components_, axis=1))
    want = sk.transform(pixels(ds["images"].values[N_TRAIN:])) * sign
    np.testing.assert_allclose(held.X.values, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(held.labels), ds["label"].values[N_TRAIN:])
    # The store holds every sample, so it is not X's store: the runner is given X.
    assert held.store is None and held.attrs["store"] == str(
        learned_store_path(data, learner, "train")
    )
    assert held.identity["split"] == "test" and held.identity["fit_split"] == "train"
    # The train features of the same fit are the same store, reused.
    fitted = build_features(data, kind="pca", learner=learner, split="train", fit_split="train")
    assert fitted.identity["store"] == held.identity["store"]
    assert fitted.X.shape == (N_TRAIN, 6)
    # dkm info says what learned the store, from what.
    shown = CliRunner().invoke(main, ["info", held.attrs["store"]], catch_exceptions=False)
    assert shown.exit_code == 0
    assert shown.stdout.splitlines()[0].endswith(
        f"pca features, 6 per sample, of {N_TRAIN + N_TEST} samples; fitted on split "
        f"'train' of {data.resolve()}"
    )


def test_a_pca_store_is_reused_until_something_it_depends_on_changes(client, tmp_path):
    data, _ = digits_dataset(tmp_path)
    store = tmp_path / "pca.zarr"
    learner = PCAFeatures(5)
    kwargs = {"kind": "pca", "store": store, "fit_split": "train"}
    assert features_identity(data, learner=learner, **kwargs) is None  # not learned yet
    first = build_features(data, learner=learner, **kwargs)
    assert first.identity == features_identity(data, learner=learner, **kwargs)
    # (Reusing marks the root verified once, so the features' own metadata is watched.)
    written, mtime = write_id(store), (store / "features" / "zarr.json").stat().st_mtime_ns
    again = build_features(data, learner=learner, **kwargs)
    assert write_id(store) == written
    assert (store / "features" / "zarr.json").stat().st_mtime_ns == mtime
    assert again.identity == first.identity
    # Another learner at the same path is learned anew.
    wider = build_features(data, learner=PCAFeatures(7), **kwargs)
    assert write_id(store) != written and wider.X.shape == (N_TRAIN + N_TEST, 7)
    assert open_dataset(store)["components"].shape == (7, 64)
    # So is a re-ingested dataset's.
    before = write_id(store)
    digits_dataset(tmp_path, overwrite=True)
    assert features_identity(data, learner=PCAFeatures(7), **kwargs) is None
    build_features(data, learner=PCAFeatures(7), **kwargs)
    assert write_id(store) != before


def test_pca_refuses_too_many_components_before_computing(client, digits, tmp_path):
    data, _ = digits
    store = tmp_path / "too-many.zarr"
    with pytest.raises(
        ValueError, match=r"features\.n_components: 65 > 64 = min\(samples, features\)"
    ):
        build_features(data, kind="pca", learner=PCAFeatures(65), store=store)
    too_many = AutoencoderFeatures(train_samples=N_TRAIN + 1)
    with pytest.raises(
        ValueError, match=rf"features\.train_samples: {N_TRAIN + 1} > the {N_TRAIN}"
    ):
        build_features(data, kind="autoencoder", learner=too_many, fit_split="train", store=store)
    assert not store.exists()


def test_a_store_of_another_kind_is_never_replaced(client, digits):
    data, _ = digits
    with pytest.raises(StoreError, match="complete dataset store, not a learned feature store"):
        build_features(data, kind="pca", learner=PCAFeatures(3), store=data)
    with pytest.raises(ValueError, match="pca features need a PCAFeatures learner"):
        build_features(data, kind="pca", learner=AutoencoderFeatures())


# ----------------------------------------------------------------------------- autoencoder


def test_a_missing_keras_names_the_extra(monkeypatch):
    from dkm.features.autoencoder import MISSING_EXTRA, import_keras

    monkeypatch.setitem(sys.modules, "keras", None)  # what an install without it does
    with pytest.raises(ImportError, match=r"pip install 'dkm\[embed\]'") as err:
        import_keras()
    assert str(err.value) == MISSING_EXTRA


@pytest.mark.slow
def test_autoencoder_features_train_encode_on_the_cluster_and_reload(
    threaded_client, tmp_path, caplog
):
    from dkm.features.autoencoder import (
        EMBEDDING,
        as_inputs,
        build_autoencoder,
        encoder_from_bytes,
        load_model,
    )

    data, ds = digits_dataset(tmp_path)
    learner = AutoencoderFeatures(4, (4, 8, 8), epochs=1, batch_size=32, train_samples=150)
    assert features_identity(data, kind="autoencoder", learner=learner) is None
    with (
        caplog.at_level(logging.INFO, logger="dkm"),
        dask.config.set({"dkm.store.feature-chunk-bytes": 4 * 4 * 64}),
    ):
        features = build_features(data, kind="autoencoder", learner=learner, fit_split="train")
    assert "autoencoder: epoch 1/1, loss" in caplog.text
    path = features.store
    assert path.name == "data-ae4-train.zarr"
    assert probe(path).complete and probe(path).kind == "features"
    stored = open_dataset(path)
    assert stored["loss"].shape == (1,) and np.isfinite(stored["loss"].values).all()
    attrs = read_attrs(path)
    assert attrs["n_train"] == 150 and attrs["n_fit"] == N_TRAIN and attrs["filters"] == [4, 8, 8]

    # Encoded block by block on the cluster = the encoder predicting here, on every image.
    model = stored["model"].values.tobytes()
    encoder = encoder_from_bytes(model)
    want = encoder.predict(as_inputs(ds["images"].values), batch_size=32, verbose=0)
    assert features.X.shape == (N_TRAIN + N_TEST, 4)
    np.testing.assert_allclose(features.X.values, want, rtol=1e-5, atol=1e-6)
    assert features.identity == features_identity(
        data, kind="autoencoder", learner=learner, fit_split="train"
    )

    # The stored bytes are the whole trained model.
    reloaded = load_model(model)
    assert reloaded.output_shape == (None, 8, 8, 1)
    assert reloaded.get_layer(EMBEDDING).output.shape == (None, 4)

    written = write_id(path)
    again = build_features(data, kind="autoencoder", learner=learner, fit_split="train")
    assert write_id(path) == written and again.identity == features.identity

    # The network fits MNIST-sized and colour CIFAR-sized images as well.
    for shape in ((28, 28), (32, 32, 3)):
        net = build_autoencoder(shape, 8, (4, 8, 8))
        channels = shape[2] if len(shape) == 3 else 1
        assert net.input_shape == net.output_shape == (None, shape[0], shape[1], channels)
