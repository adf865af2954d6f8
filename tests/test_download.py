"""Downloads with checksum checks, against a real HTTP server on 127.0.0.1 and file:// URLs.

Pins: matching md5/sha256 digests succeed; a mismatch is a ChecksumError and leaves nothing in
the cache; the datasets' published digests reject fake files with canonical names; a file with
no known digest is refused unless verify=False; unreachable URLs are OSError; the cache is
reused when it holds the right bytes; and ``ingest("mnist", source=URL)`` runs end to end.
Every test uses its own cache directory under tmp_path.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import pickle
import tarfile
import threading
import time

import numpy as np
import pytest
import xarray as xr

from dkm.data.catalog import ingest
from dkm.data.download import KNOWN_MD5, ChecksumError, fetch_all, sha256_file
from dkm.data.store import open_dataset


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """A directory served over http://127.0.0.1:<free port>/; the server stops on teardown."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.mark.parametrize(
    "digest",
    [
        lambda b: "sha256:" + _sha256(b),
        lambda b: "md5:" + _md5(b),
        lambda b: _sha256(b).upper(),  # bare: the length picks the algorithm
        lambda b: _md5(b),
    ],
    ids=["sha256", "md5", "bare-sha256", "bare-md5"],
)
def test_http_download_with_matching_checksums(served, cache, digest):
    root, url = served
    payloads = {"a.bin": b"alpha" * 1000, "b.bin": bytes(range(256)) * 5000}
    for name, data in payloads.items():
        (root / name).write_bytes(data)
    out = fetch_all(
        url.rstrip("/"),  # with or without the trailing slash
        list(payloads),
        name="toy",
        checksums={n: digest(d) for n, d in payloads.items()},
        cache_dir=cache,
    )
    assert out == cache / "toy"
    assert _leftovers(out) == ["a.bin", "b.bin"]
    for name, data in payloads.items():
        assert (out / name).read_bytes() == data


def test_file_url_download(tmp_path, cache):
    src = tmp_path / "mirror"
    src.mkdir()
    data = b"\x00\x01file url payload"
    (src / "f.bin").write_bytes(data)
    out = fetch_all(
        src.as_uri(), ["f.bin"], name="toy", checksums={"f.bin": _md5(data)}, cache_dir=cache
    )
    assert (out / "f.bin").read_bytes() == data


@pytest.mark.parametrize("scheme", ["http", "file"])
def test_checksum_mismatch_leaves_nothing_in_cache(served, cache, scheme):
    root, url = served
    (root / "f.bin").write_bytes(b"what the server has")
    base = url if scheme == "http" else root.as_uri()
    wrong = "sha256:" + _sha256(b"what we expected")
    with pytest.raises(ChecksumError, match=r"f\.bin: checksum mismatch \(sha256 [0-9a-f]{64}"):
        fetch_all(base, ["f.bin"], name="toy", checksums={"f.bin": wrong}, cache_dir=cache)
    assert _leftovers(cache / "toy") == []  # neither the file nor a .part remnant


def test_mismatch_on_second_file_keeps_the_first(served, cache):
    root, url = served
    (root / "good").write_bytes(b"good")
    (root / "bad").write_bytes(b"bad")
    sums = {"good": _md5(b"good"), "bad": _md5(b"not bad")}
    with pytest.raises(ChecksumError, match="bad: checksum mismatch"):
        fetch_all(url, ["good", "bad"], name="toy", checksums=sums, cache_dir=cache)
    assert _leftovers(cache / "toy") == ["good"]


def test_known_checksums_reject_fake_canonical_files(served, cache, make_mnist_dir):
    root, url = served
    make_mnist_dir(root)
    for fname, md5 in KNOWN_MD5["mnist"].items():
        with pytest.raises(ChecksumError, match=f"checksum mismatch.*expected {md5}"):
            fetch_all(url, [fname], name="mnist", cache_dir=cache)
    assert _leftovers(cache / "mnist") == []


def test_known_checksums_still_checked_without_verify(served, cache, make_mnist_dir):
    # verify=False only accepts files *without* a known digest; known ones are still checked.
    root, url = served
    make_mnist_dir(root)
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        fetch_all(url, ["train-labels-idx1-ubyte.gz"], name="mnist", verify=False, cache_dir=cache)
    (root / "x").write_bytes(b"x")
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        fetch_all(
            url, ["x"], name="toy", checksums={"x": _md5(b"y")}, verify=False, cache_dir=cache
        )


def test_unknown_checksum_refused_unless_verify_false(served, cache):
    root, url = served
    (root / "extra.bin").write_bytes(b"no digest published for this")
    with pytest.raises(ChecksumError, match=r"extra\.bin: no known checksum"):
        fetch_all(url, ["extra.bin"], name="mnist", cache_dir=cache)
    assert _leftovers(cache / "mnist") == []
    out = fetch_all(url, ["extra.bin"], name="mnist", verify=False, cache_dir=cache)
    assert (out / "extra.bin").read_bytes() == b"no digest published for this"


def test_unreachable_url_is_oserror(cache, closed_port):
    start = time.monotonic()
    with pytest.raises(OSError, match=rf"127\.0\.0\.1:{closed_port}/f\.bin: download failed"):
        fetch_all(
            f"http://127.0.0.1:{closed_port}/",
            ["f.bin"],
            name="toy",
            verify=False,
            cache_dir=cache,
            timeout=5,
        )
    assert time.monotonic() - start < 5
    assert _leftovers(cache / "toy") == []


def test_missing_remote_file_is_oserror(served, tmp_path, cache):
    _, url = served
    with pytest.raises(OSError, match=r"nope\.bin: download failed"):
        fetch_all(url, ["nope.bin"], name="toy", verify=False, cache_dir=cache)
    with pytest.raises(OSError, match=r"nope\.bin: download failed"):
        fetch_all(tmp_path.as_uri(), ["nope.bin"], name="toy", verify=False, cache_dir=cache)
    assert _leftovers(cache / "toy") == []


def test_cache_reused_when_digest_matches_and_refetched_when_not(served, cache):
    root, url = served
    data = b"cached payload"
    (root / "f.bin").write_bytes(data)
    sums = {"f.bin": "sha256:" + _sha256(data)}
    fetch_all(url, ["f.bin"], name="toy", checksums=sums, cache_dir=cache)
    (root / "f.bin").unlink()  # the server no longer has it: only the cache can answer
    out = fetch_all(url, ["f.bin"], name="toy", checksums=sums, cache_dir=cache)
    assert (out / "f.bin").read_bytes() == data

    (out / "f.bin").write_bytes(b"corrupted in the cache")
    (root / "f.bin").write_bytes(data)
    fetch_all(url, ["f.bin"], name="toy", checksums=sums, cache_dir=cache)
    assert (out / "f.bin").read_bytes() == data


def test_cache_dir_from_environment(served, tmp_path, monkeypatch):
    root, url = served
    (root / "f.bin").write_bytes(b"x")
    monkeypatch.setenv("DKM_CACHE_DIR", str(tmp_path / "envcache"))
    out = fetch_all(url, ["f.bin"], name="toy", checksums={"f.bin": _md5(b"x")})
    assert out == tmp_path / "envcache" / "toy"
    assert (out / "f.bin").read_bytes() == b"x"


def test_unsupported_algorithm(served, cache):
    root, url = served
    (root / "f.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checksum algorithm 'sha1'"):
        fetch_all(url, ["f.bin"], name="toy", checksums={"f.bin": "sha1:00"}, cache_dir=cache)


def test_sha256_file(tmp_path):
    data = np.random.default_rng(0).bytes(3 * 2**20 + 17)  # spans several read blocks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == _sha256(data)


# ----------------------------------------------------------------------------- ingest via URL


def _mnist_sums(directory):
    return {p.name: "sha256:" + sha256_file(p) for p in directory.iterdir()}


def _check_mnist_store(store, arrays, source):
    ds = xr.open_zarr(store)
    np.testing.assert_array_equal(
        ds["images"].values, np.concatenate([arrays["train-images"], arrays["test-images"]])
    )
    np.testing.assert_array_equal(
        ds["label"].values, np.concatenate([arrays["train-labels"], arrays["test-labels"]])
    )
    n_train, n_test = len(arrays["train-labels"]), len(arrays["test-labels"])
    assert list(ds["split"].values) == ["train"] * n_train + ["test"] * n_test
    assert ds.attrs["source"] == source
    assert ds.attrs["dataset"] == "mnist"
    assert set(ds.attrs["sha256"]) == {
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    }


def test_ingest_mnist_over_http(served, tmp_path, cache, make_mnist_dir):
    root, url = served
    arrays = make_mnist_dir(root, n_train=7, n_test=3, seed=5)
    store = ingest(
        "mnist", tmp_path / "mnist.zarr", source=url, checksums=_mnist_sums(root), cache_dir=cache
    )
    _check_mnist_store(store, arrays, url)
    assert open_dataset(store).sizes["sample"] == 10
    assert _leftovers(cache / "mnist") == sorted(_mnist_sums(root))


def test_ingest_mnist_over_file_url(tmp_path, cache, make_mnist_dir):
    mirror = tmp_path / "mirror"
    arrays = make_mnist_dir(mirror, n_train=2, n_test=2, seed=6)
    store = ingest(
        "mnist",
        tmp_path / "m.zarr",
        source=mirror.as_uri(),
        checksums=_mnist_sums(mirror),
        cache_dir=cache,
    )
    _check_mnist_store(store, arrays, mirror.as_uri())


def test_ingest_mnist_url_with_bad_checksum_leaves_no_store(
    served, tmp_path, cache, make_mnist_dir
):
    root, url = served
    make_mnist_dir(root)
    sums = _mnist_sums(root)
    sums["t10k-labels-idx1-ubyte.gz"] = "sha256:" + "0" * 64
    store = tmp_path / "mnist.zarr"
    with pytest.raises(ChecksumError, match=r"t10k-labels-idx1-ubyte\.gz: checksum mismatch"):
        ingest("mnist", store, source=url, checksums=sums, cache_dir=cache)
    assert _leftovers(tmp_path) == ["cache", "served"]  # no store, no hidden temporary


def test_ingest_mnist_url_with_published_checksums_refuses_fakes(
    served, tmp_path, cache, make_mnist_dir
):
    root, url = served
    make_mnist_dir(root)
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        ingest("mnist", tmp_path / "mnist.zarr", source=url, cache_dir=cache)
    assert not (tmp_path / "mnist.zarr").exists()


def test_ingest_cifar10_over_http(served, tmp_path, cache):
    root, url = served
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [3, 4]}
        (folder / name).write_bytes(pickle.dumps(batch))
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    digest = {archive.name: "sha256:" + sha256_file(archive)}
    source = url + archive.name
    store = ingest("cifar10", tmp_path / "c.zarr", source=source, checksums=digest, cache_dir=cache)
    ds = open_dataset(store)
    assert ds["images"].shape == (12, 32, 32, 3)
    assert ds.attrs["source"] == source
    assert ds.attrs["sha256"] == {archive.name: digest[archive.name].removeprefix("sha256:")}
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        ingest("cifar10", tmp_path / "d.zarr", source=source, cache_dir=tmp_path / "cache2")
    assert not (tmp_path / "d.zarr").exists()
