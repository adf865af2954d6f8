"""Readers on small files written here in each true format.

Pins: IDX header/magic/type code/byte order, gzip detected by content, truncated and trailing
data refused; CIFAR python batches from a directory or .tar.gz with the R/G/B planes landing in
``[i, y, x, c]``; image folders (labels from sub-folders, grayscale/colour, resize, mixed sizes,
garbage and empty folders); npz. Every malformed case is a :class:`DataFormatError` naming the
file and the problem.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from dkm.data.readers import (
    DataFormatError,
    read_cifar_batches,
    read_idx,
    read_image_folder,
    read_npz,
)

# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_uint8_images_round_trip(tmp_path, write_idx, gz):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5) * 4
    path = write_idx(tmp_path / "imgs-idx3-ubyte", images, gz=gz)
    out = read_idx(path)
    assert out.dtype == np.uint8
    assert out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, images)


def test_idx_header_written_by_hand(tmp_path):
    # Canonical MNIST labels header: magic 0x00000801, count, then bytes.
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(struct.pack(">II", 0x00000801, 5) + bytes([7, 2, 1, 0, 4]))
    np.testing.assert_array_equal(read_idx(path), [7, 2, 1, 0, 4])


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        ("int16", [[-300, 0, 1], [32767, -32768, 258]]),
        ("int32", [[-70000, 1, 2**31 - 1], [-(2**31), 5, 65536]]),
        ("float32", [[-1.5, 0.25, 3e10], [1e-3, -0.0, 7.0]]),
    ],
)
def test_idx_wider_dtypes_are_big_endian(tmp_path, write_idx, dtype, values, gz):
    array = np.array(values, dtype=dtype)
    out = read_idx(write_idx(tmp_path / "wide.idx", array, gz=gz))
    assert out.dtype == np.dtype(dtype)  # native byte order, same kind and width
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_idx_gzip_is_detected_by_content_not_name(tmp_path, write_idx):
    images = np.full((2, 3, 3), 9, dtype=np.uint8)
    gz_without_suffix = write_idx(tmp_path / "train-images-idx3-ubyte", images, gz=True)
    plain_with_gz_suffix = write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, gz=False)
    np.testing.assert_array_equal(read_idx(gz_without_suffix), images)
    np.testing.assert_array_equal(read_idx(plain_with_gz_suffix), images)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_truncated_data(tmp_path, write_idx, gz):
    images = np.ones((4, 5, 5), dtype=np.uint8)
    full = write_idx(tmp_path / "full", images)
    cut = full.read_bytes()[:-7]
    path = tmp_path / "cut-idx3-ubyte"
    path.write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(DataFormatError, match=r"cut-idx3-ubyte: truncated.*\(4, 5, 5\).*100.*93"):
        read_idx(path)


def test_idx_truncated_header(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">I", 10))
    with pytest.raises(DataFormatError, match="short: truncated IDX header"):
        read_idx(path)


def test_idx_truncated_gzip_stream(tmp_path, write_idx):
    good = write_idx(tmp_path / "good.gz", np.zeros((50, 28, 28), np.uint8) + 3, gz=True)
    path = tmp_path / "broken.gz"
    path.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DataFormatError, match=r"broken\.gz: corrupt or truncated gzip"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_trailing_bytes(tmp_path, write_idx, gz):
    raw = write_idx(tmp_path / "full", np.ones((2, 3, 3), np.uint8)).read_bytes() + b"\0\0\0"
    path = tmp_path / "long-idx3-ubyte"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataFormatError, match=r"long-idx3-ubyte: 3 bytes of trailing data"):
        read_idx(path)


@pytest.mark.parametrize(
    "content",
    [
        struct.pack(">BBBB", 0x08, 0x03, 0, 0) + b"\0" * 40,  # bytes swapped
        b"\x89PNG\r\n\x1a\n" + b"\0" * 40,  # some other format
        b"hello, world",
    ],
    ids=["swapped", "png", "text"],
)
def test_idx_wrong_magic(tmp_path, content):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte: not an IDX file \(magic"):
        read_idx(path)


def test_idx_wrong_magic_inside_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"\x01\x02\x08\x01" + b"\0" * 8))
    with pytest.raises(DataFormatError, match="not an IDX file"):
        read_idx(path)


def test_idx_unknown_type_code(tmp_path, write_idx):
    path = write_idx(tmp_path / "odd", np.zeros(3, np.uint8), type_code=0x0A)
    with pytest.raises(DataFormatError, match="odd: unknown IDX type code 0x0a"):
        read_idx(path)


def test_idx_zero_dimensions(tmp_path):
    path = tmp_path / "scalar"
    path.write_bytes(struct.pack(">BBBB", 0, 0, 8, 0) + b"\x05")
    with pytest.raises(DataFormatError, match="zero dimensions"):
        read_idx(path)


def test_idx_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(DataFormatError, match=r"empty: not an IDX file \(magic number empty"):
        read_idx(empty)
    with pytest.raises(DataFormatError, match="nowhere: file not found"):
        read_idx(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- CIFAR

CIFAR_NAMES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]


def _cifar_payloads(n_per_batch=3, seed=0):
    """Random batches in the shipped layout: bytes keys, (n, 3072) uint8 rows."""
    rng = np.random.default_rng(seed)
    batches = {}
    for b, name in enumerate(CIFAR_NAMES):
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        if b == 0:
            # Image 0: constant planes R=10, G=20, B=30, except one marked pixel per plane.
            data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 20, 30
            data[0, 0 * 1024 + 1 * 32 + 2] = 200  # R at y=1, x=2
            data[0, 1 * 1024 + 5 * 32 + 31] = 201  # G at y=5, x=31
            data[0, 2 * 1024 + 31 * 32 + 0] = 202  # B at y=31, x=0
        batches[name] = {
            b"batch_label": f"batch {b}".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(n_per_batch)],
        }
    return batches


def _write_cifar_dir(directory, batches, skip=()):
    directory.mkdir(parents=True, exist_ok=True)
    for name, batch in batches.items():
        if name not in skip:
            (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
    return directory


def _check_cifar(images, labels, split, batches):
    n = sum(len(b[b"labels"]) for b in batches.values())
    assert images.shape == (n, 32, 32, 3)
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.concatenate([b[b"labels"] for b in batches.values()]))
    n_test = len(batches["test_batch"][b"labels"])
    assert list(split) == ["train"] * (n - n_test) + ["test"] * n_test
    # Hand-set pixels: plane c at (y, x) is images[i, y, x, c].
    np.testing.assert_array_equal(images[0, 0, 0], [10, 20, 30])
    assert images[0, 1, 2, 0] == 200 and images[0, 2, 1, 0] == 10
    assert images[0, 5, 31, 1] == 201 and images[0, 31, 5, 1] == 20
    assert images[0, 31, 0, 2] == 202 and images[0, 0, 31, 2] == 30
    # Every pixel of every image: [i, y, x, c] == data[i, c * 1024 + y * 32 + x].
    data = np.concatenate([b[b"data"] for b in batches.values()])
    i, y, x, c = np.indices(images.shape)
    np.testing.assert_array_equal(images, data[i, c * 1024 + y * 32 + x])


def test_cifar_directory(tmp_path):
    batches = _cifar_payloads()
    _check_cifar(*read_cifar_batches(_write_cifar_dir(tmp_path / "flat", batches)), batches)


def test_cifar_nested_directory_as_unpacked(tmp_path):
    batches = _cifar_payloads(seed=1)
    _write_cifar_dir(tmp_path / "cifar-10-batches-py", batches)
    _check_cifar(*read_cifar_batches(tmp_path), batches)


def test_cifar_tar_gz(tmp_path):
    batches = _cifar_payloads(n_per_batch=2, seed=2)
    folder = _write_cifar_dir(tmp_path / "cifar-10-batches-py", batches)
    (folder / "readme.html").write_text("<html></html>")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    _check_cifar(*read_cifar_batches(archive), batches)


def test_cifar_str_keys_accepted(tmp_path):
    batches = {name: {k.decode(): v for k, v in b.items()} for name, b in _cifar_payloads().items()}
    images, labels, _ = read_cifar_batches(_write_cifar_dir(tmp_path / "d", batches))
    assert images.shape == (18, 32, 32, 3)
    np.testing.assert_array_equal(labels[:3], batches["data_batch_1"]["labels"])


def test_cifar_missing_batch(tmp_path):
    folder = _write_cifar_dir(tmp_path / "d", _cifar_payloads(), skip=("data_batch_3",))
    with pytest.raises(DataFormatError, match=r"CIFAR-10 batches missing: data_batch_3$"):
        read_cifar_batches(folder)


def test_cifar_missing_test_batch_in_tar(tmp_path):
    folder = _write_cifar_dir(tmp_path / "d", _cifar_payloads(), skip=("test_batch",))
    archive = tmp_path / "partial.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    with pytest.raises(DataFormatError, match=r"partial.tar.gz: CIFAR-10 batches missing: test"):
        read_cifar_batches(archive)


def test_cifar_empty_directory_lists_all_missing(tmp_path):
    with pytest.raises(DataFormatError, match=r"data_batch_1, data_batch_2, .*, test_batch$"):
        read_cifar_batches(tmp_path)


def test_cifar_garbage_batch(tmp_path):
    folder = _write_cifar_dir(tmp_path / "d", _cifar_payloads())
    (folder / "data_batch_2").write_bytes(b"this is not a pickle")
    with pytest.raises(DataFormatError, match="data_batch_2: not a CIFAR python batch"):
        read_cifar_batches(folder)


def test_cifar_batch_without_labels(tmp_path):
    batches = _cifar_payloads()
    del batches["data_batch_4"][b"labels"]
    with pytest.raises(DataFormatError, match=r"data_batch_4: CIFAR batch lacks \['labels'\]"):
        read_cifar_batches(_write_cifar_dir(tmp_path / "d", batches))


def test_cifar_batch_wrong_row_length(tmp_path):
    batches = _cifar_payloads()
    batches["test_batch"][b"data"] = np.zeros((3, 1024), np.uint8)
    with pytest.raises(DataFormatError, match=r"test_batch: data has shape \(3, 1024\)"):
        read_cifar_batches(_write_cifar_dir(tmp_path / "d", batches))


def test_cifar_not_a_tar_and_not_there(tmp_path):
    bogus = tmp_path / "cifar.tar.gz"
    bogus.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataFormatError, match=r"cifar\.tar\.gz: not a readable tar archive"):
        read_cifar_batches(bogus)
    with pytest.raises(DataFormatError, match="nothing-here: no such file or directory"):
        read_cifar_batches(tmp_path / "nothing-here")


# ----------------------------------------------------------------------------- image folders


def _gray(value, shape=(6, 5)):
    return Image.fromarray(np.full(shape, value, dtype=np.uint8), mode="L")


def _ramp(shape=(6, 5), offset=0):
    y, x = np.indices(shape)
    return ((10 * y + x + offset) % 256).astype(np.uint8)


def test_image_folder_labels_from_subfolders(tmp_path):
    (tmp_path / "zebra").mkdir()
    (tmp_path / "ant").mkdir()
    Image.fromarray(_ramp(offset=1)).save(tmp_path / "zebra" / "a.png")
    Image.fromarray(_ramp(offset=2)).save(tmp_path / "ant" / "b.png")
    Image.fromarray(_ramp(offset=3)).save(tmp_path / "ant" / "c.bmp")
    (tmp_path / "ant" / "notes.txt").write_text("not an image, ignored")
    folder = read_image_folder(tmp_path)
    assert folder.images.shape == (3, 6, 5)  # (n, y, x): 6 rows, 5 columns
    assert folder.images.dtype == np.uint8
    assert folder.label_names == ("ant", "zebra")
    assert folder.files == ("ant/b.png", "ant/c.bmp", "zebra/a.png")
    np.testing.assert_array_equal(folder.labels, [0, 0, 1])
    for i, offset in enumerate([2, 3, 1]):
        np.testing.assert_array_equal(folder.images[i], _ramp(offset=offset))


def test_image_folder_flat_has_no_labels(tmp_path):
    for i in range(3):
        _gray(40 * i).save(tmp_path / f"img{i}.png")
    folder = read_image_folder(tmp_path)
    assert folder.labels is None
    assert folder.label_names == ()
    np.testing.assert_array_equal(folder.images[:, 0, 0], [0, 40, 80])


def test_image_folder_color_and_grayscale(tmp_path):
    rgb = np.zeros((6, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    rgb[2, 3] = (1, 2, 3)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "color.png")
    _gray(77).save(tmp_path / "gray.png")

    color = read_image_folder(tmp_path, grayscale=False)
    assert color.images.shape == (2, 6, 5, 3)
    np.testing.assert_array_equal(color.images[0], rgb)
    np.testing.assert_array_equal(color.images[1], np.full((6, 5, 3), 77))  # L -> RGB

    gray = read_image_folder(tmp_path, grayscale=True)
    assert gray.images.shape == (2, 6, 5)
    # ITU-R 601-2 luma, as PIL converts: 200*.299 + 100*.587 + 50*.114 = 124.2
    assert gray.images[0, 0, 0] == 124
    np.testing.assert_array_equal(gray.images[1], np.full((6, 5), 77))


def test_image_folder_resize_is_y_then_x(tmp_path):
    (tmp_path / "a").mkdir()
    _gray(90, shape=(6, 5)).save(tmp_path / "a" / "small.png")
    _gray(180, shape=(30, 20)).save(tmp_path / "a" / "big.png")
    folder = read_image_folder(tmp_path, size=(4, 3))
    assert folder.images.shape == (2, 4, 3)
    np.testing.assert_array_equal(folder.images[0], np.full((4, 3), 180))  # big.png first
    np.testing.assert_array_equal(folder.images[1], np.full((4, 3), 90))

    color = read_image_folder(tmp_path, size=(7, 2), grayscale=False)
    assert color.images.shape == (2, 7, 2, 3)


def test_image_folder_mixed_sizes_refused(tmp_path):
    _gray(1, shape=(6, 5)).save(tmp_path / "a.png")
    _gray(1, shape=(8, 8)).save(tmp_path / "b.png")
    with pytest.raises(
        DataFormatError, match=r"images differ in size \(a.png is \(6, 5\), b.png is \(8, 8\)\)"
    ):
        read_image_folder(tmp_path)


def test_image_folder_garbage_with_image_suffix(tmp_path):
    _gray(1).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"definitely not a PNG")
    with pytest.raises(DataFormatError, match=r"b.png: not a readable image"):
        read_image_folder(tmp_path)


def test_image_folder_truncated_png(tmp_path):
    _gray(1, shape=(64, 64)).save(tmp_path / "a.png")
    raw = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match=r"a\.png: not a readable image"):
        read_image_folder(tmp_path)


def test_image_folder_empty_or_missing(tmp_path):
    with pytest.raises(DataFormatError, match="no image files"):
        read_image_folder(tmp_path)
    (tmp_path / "readme.txt").write_text("no images here")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataFormatError, match="no image files"):
        read_image_folder(tmp_path)
    with pytest.raises(DataFormatError, match="missing: not a directory"):
        read_image_folder(tmp_path / "missing")


# ----------------------------------------------------------------------------- npz


def test_npz_with_and_without_labels(tmp_path):
    images = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    np.savez(tmp_path / "with.npz", images=images, labels=np.array([4, 1]))
    out, labels = read_npz(tmp_path / "with.npz")
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(labels, [4, 1])

    np.savez_compressed(tmp_path / "without.npz", images=images[..., 0])
    out, labels = read_npz(tmp_path / "without.npz")
    assert labels is None
    np.testing.assert_array_equal(out, images[..., 0])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"pixels": np.zeros((2, 3, 3), np.uint8)}, r"no 'images' array \(has \['pixels'\]\)"),
        ({"images": np.zeros((2, 3, 3), np.float32)}, "must be uint8.*float32"),
        ({"images": np.zeros((2, 9), np.uint8)}, r"must be uint8.*\(2, 9\)"),
        (
            {"images": np.zeros((2, 3, 3), np.uint8), "labels": np.zeros(3)},
            r"'labels' has shape \(3,\), expected \(2,\)",
        ),
    ],
    ids=["no-images", "float", "2d", "label-count"],
)
def test_npz_refused(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataFormatError, match=message):
        read_npz(tmp_path / "bad.npz")


def test_npz_garbage_and_missing(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"PK not really a zip file")
    with pytest.raises(DataFormatError, match=r"junk\.npz: not a readable \.npz file"):
        read_npz(tmp_path / "junk.npz")
    with pytest.raises(DataFormatError, match=r"gone\.npz: file not found"):
        read_npz(tmp_path / "gone.npz")


def test_npz_given_a_plain_npy_file(tmp_path):
    # np.load returns a bare ndarray for .npy; it must be a clear format error.
    np.save(tmp_path / "images.npy", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(DataFormatError, match=r"images\.npy"):
        read_npz(tmp_path / "images.npy")
