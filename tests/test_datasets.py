"""Tests for cnn_gpu.data.datasets: downloads, verification, caching, parsing.

Everything is served from a local HTTP server on 127.0.0.1 with small fixture
files in the real formats (IDX / gzip, CIFAR pickles in a tar.gz); the registry
is monkeypatched to point at it, with fixture checksums and small counts.
No test touches the internet.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import importlib
import io
import os
import pickle
import struct
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

_REPO = Path(__file__).resolve().parents[1]
try:
    ds = importlib.import_module("cnn_gpu.data.datasets")
except ImportError:  # not installed: run from the checkout
    sys.path.insert(0, str(_REPO))
    ds = importlib.import_module("cnn_gpu.data.datasets")
import cnn_gpu  # noqa: E402

N_TRAIN, N_TEST = 50, 20
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CIFAR_TRAIN_ROWS, CIFAR_TEST_ROWS = 2, 4  # per train batch (x5), test batch


# --------------------------------------------------------------------------- #
# Fixture builders
# --------------------------------------------------------------------------- #
def idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", 0x803, n, h, w) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def mnist_arrays():
    rng = np.random.default_rng(0)
    return {
        "train_images": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, N_TRAIN).astype(np.uint8),
        "test_images": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, N_TEST).astype(np.uint8),
    }


@pytest.fixture(scope="module")
def mnist_raw(mnist_arrays):
    """role -> uncompressed IDX bytes."""
    return {r: (idx_images(a) if r.endswith("images") else idx_labels(a)) for r, a in mnist_arrays.items()}


@pytest.fixture(scope="module")
def mnist_gz(mnist_raw):
    """canonical file name -> gzipped bytes (what the mirror serves)."""
    return {IDX_NAMES[r]: gz(b) for r, b in mnist_raw.items()}


def cifar_batch(rows: int, seed: int, protocol: int = 2) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, rows)]
    d = {
        b"batch_label": b"fixture batch",
        b"labels": labels,
        b"data": data,
        b"filenames": [b"img_%d.png" % i for i in range(rows)],
    }
    return pickle.dumps(d, protocol=protocol), data, np.array(labels)


@pytest.fixture(scope="module")
def cifar_batches():
    """batch name -> (pickle bytes, data, labels)."""
    out = {f"data_batch_{i}": cifar_batch(CIFAR_TRAIN_ROWS, i, protocol=2 if i % 2 else 5) for i in range(1, 6)}
    payload, data, labels = cifar_batch(CIFAR_TEST_ROWS, 99, protocol=2)
    # The real batches were pickled by Python 2 / old NumPy, naming numpy.core (not numpy._core).
    payload = payload.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in payload
    out["test_batch"] = (payload, data, labels)
    return out


def make_tar(batches: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, payload in [("batches.meta", pickle.dumps({b"label_names": []}))] + list(batches.items()):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.fixture(scope="module")
def cifar_tar(cifar_batches):
    return make_tar({k: v[0] for k, v in cifar_batches.items()})


# --------------------------------------------------------------------------- #
# Local HTTP server
# --------------------------------------------------------------------------- #
class Server:
    def __init__(self):
        self.files: dict[str, bytes] = {}  # url path ("/a/b.gz") -> body
        self.truncate: dict[str, bool] = {}  # path -> send Content-Length?
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                if self.path in outer.truncate:
                    if outer.truncate[self.path]:
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test may see the user's cache or mirror settings (CNN_GPU_DATA, CNN_GPU_MIRROR, XDG_CACHE_HOME)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with cnn_gpu.config.override(data_dir=str(tmp_path / "env-data"), mirror=None):
        yield


def idx_spec(name: str, subdir: str, files: dict[str, bytes], base_url: str, prefix: str = "/m/", extra_dirs=("MNIST/raw",)):
    """A registry entry for fixture IDX files served under base_url + prefix."""
    entries = {}
    for role, fname in IDX_NAMES.items():
        body = files[fname]
        entries[role] = ds.DatasetFile(fname, sha(body), len(body), (base_url + prefix + fname,))
    return ds.DatasetSpec(
        name=name,
        subdir=subdir,
        kind="idx",
        files=entries,
        n_train=N_TRAIN,
        n_test=N_TEST,
        image_shape=(1, 28, 28),
        extra_dirs=tuple(extra_dirs),
    )


@pytest.fixture
def mnist_server(server, mnist_gz, monkeypatch):
    for fname, body in mnist_gz.items():
        server.files["/m/" + fname] = body
    monkeypatch.setitem(ds.REGISTRY, "mnist", idx_spec("MNIST", "mnist", mnist_gz, server.url))
    return server


def cifar_spec(tar: bytes, base_url: str) -> ds.DatasetSpec:
    entry = ds.DatasetFile("cifar-10-python.tar.gz", sha(tar), len(tar), (base_url + "/c/cifar-10-python.tar.gz",))
    return ds.DatasetSpec(
        name="CIFAR-10",
        subdir="cifar-10",
        kind="cifar10",
        files={"archive": entry},
        n_train=5 * CIFAR_TRAIN_ROWS,
        n_test=CIFAR_TEST_ROWS,
        image_shape=(3, 32, 32),
    )


def check_mnist(result, arrays):
    (x_train, y_train), (x_test, y_test) = result
    assert x_train.shape == (N_TRAIN, 1, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (N_TEST, 1, 28, 28) and x_test.dtype == np.uint8
    assert y_train.shape == (N_TRAIN,) and y_train.dtype == np.int64
    assert y_test.shape == (N_TEST,) and y_test.dtype == np.int64
    np.testing.assert_array_equal(x_train[:, 0], arrays["train_images"])
    np.testing.assert_array_equal(x_test[:, 0], arrays["test_images"])
    np.testing.assert_array_equal(y_train, arrays["train_labels"])
    np.testing.assert_array_equal(y_test, arrays["test_labels"])
    assert x_train.flags.writeable and x_train.flags.c_contiguous


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- #
# Downloads, verification, caching
# --------------------------------------------------------------------------- #
def test_download_parses_gz_idx_and_reuses_cache(mnist_server, mnist_arrays, mnist_gz, tmp_path):
    check_mnist(ds.load_mnist(root=tmp_path), mnist_arrays)
    assert sorted(mnist_server.requests) == sorted("/m/" + n for n in mnist_gz)
    assert files_in(tmp_path / "mnist") == sorted(mnist_gz)
    for name, body in mnist_gz.items():
        assert (tmp_path / "mnist" / name).read_bytes() == body

    mnist_server.requests.clear()
    check_mnist(ds.load_mnist(root=tmp_path), mnist_arrays)
    check_mnist(ds.load_mnist(root=tmp_path, download=False), mnist_arrays)
    assert mnist_server.requests == []  # verified cache: zero requests


def test_default_root_is_env_then_xdg(mnist_server, mnist_arrays, tmp_path, monkeypatch):
    check_mnist(ds.load_mnist(), mnist_arrays)
    assert len(files_in(tmp_path / "env-data" / "mnist")) == 4
    with cnn_gpu.config.override(data_dir=None):  # CNN_GPU_DATA unset
        assert ds.data_dir() == tmp_path / "xdg" / "cnn_gpu"
        check_mnist(ds.load_mnist(), mnist_arrays)
        assert len(files_in(tmp_path / "xdg" / "cnn_gpu" / "mnist")) == 4
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert ds.data_dir() == Path.home() / ".cache" / "cnn_gpu"
    assert ds.data_dir(tmp_path / "x") == tmp_path / "x"


def test_checksum_mismatch_raises_and_leaves_no_file(mnist_server, tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    good = mnist_server.files["/m/" + name]
    bad = bytearray(good)
    bad[-9] ^= 0xFF  # same length, different bytes
    mnist_server.files["/m/" + name] = bytes(bad)
    with pytest.raises(ds.DownloadError) as exc:
        ds.load_mnist(root=tmp_path)
    msg = str(exc.value)
    assert name in msg and "/m/" + name in msg and mnist_server.url in msg
    assert sha(good) in msg and sha(bytes(bad)) in msg  # expected vs got
    assert name not in files_in(tmp_path / "mnist")
    assert not [n for n in files_in(tmp_path / "mnist") if n.endswith(".part")]


@pytest.mark.parametrize("content_length", [True, False], ids=["with-length", "no-length"])
def test_truncated_download_raises_and_leaves_no_file(mnist_server, tmp_path, content_length):
    name = "train-images-idx3-ubyte.gz"
    mnist_server.truncate["/m/" + name] = content_length
    with pytest.raises(ds.DownloadError) as exc:
        ds.load_mnist(root=tmp_path)
    assert name in str(exc.value) and mnist_server.url in str(exc.value)
    assert name not in files_in(tmp_path / "mnist")
    assert not [n for n in files_in(tmp_path / "mnist") if n.endswith(".part")]
    # The server recovers: the next load completes the cache; the one after makes no request.
    del mnist_server.truncate["/m/" + name]
    ds.load_mnist(root=tmp_path)
    assert len(files_in(tmp_path / "mnist")) == 4
    n = len(mnist_server.requests)
    ds.load_mnist(root=tmp_path)
    assert len(mnist_server.requests) == n


def test_interrupted_download_leaves_no_file(mnist_server, monkeypatch, tmp_path):
    real_replace = os.replace
    calls = []

    def interrupt(src, dst):
        calls.append(Path(src).name)
        if len(calls) == 2:  # the second file: fully written and verified, not yet renamed
            assert Path(src).exists() and Path(src).name.endswith(".part")
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(ds.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        ds.load_mnist(root=tmp_path)
    names = files_in(tmp_path / "mnist")
    assert names == ["train-images-idx3-ubyte.gz"]  # the first file completed; no .part left
    assert (tmp_path / "mnist" / names[0]).stat().st_mode & 0o777 == 0o644


def test_mirrors_are_tried_in_order(server, mnist_gz, mnist_arrays, monkeypatch, tmp_path):
    for fname, body in mnist_gz.items():
        server.files["/second/" + fname] = body
    spec = idx_spec("MNIST", "mnist", mnist_gz, server.url, prefix="/first/")
    spec = dataclasses.replace(
        spec, files={r: dataclasses.replace(f, urls=f.urls + (server.url + "/second/" + f.name,)) for r, f in spec.files.items()}
    )
    monkeypatch.setitem(ds.REGISTRY, "mnist", spec)
    check_mnist(ds.load_mnist(root=tmp_path), mnist_arrays)
    assert sorted(server.requests) == sorted([f"/first/{n}" for n in mnist_gz] + [f"/second/{n}" for n in mnist_gz])


def test_all_mirrors_failing_names_every_url(server, mnist_gz, monkeypatch, tmp_path):
    monkeypatch.setitem(ds.REGISTRY, "mnist", idx_spec("MNIST", "mnist", mnist_gz, server.url))
    with pytest.raises(ds.DownloadError) as exc:
        ds.load_mnist(root=tmp_path)
    assert "404" in str(exc.value) and "/m/train-images-idx3-ubyte.gz" in str(exc.value)
    assert files_in(tmp_path / "mnist") == []


def test_cnn_gpu_mirror_env_and_mirrors_argument(server, mnist_gz, mnist_arrays, monkeypatch, tmp_path):
    for fname, body in mnist_gz.items():
        server.files["/mirror/" + fname] = body
    # Registry URLs point at a closed port: only the override can succeed.
    monkeypatch.setitem(ds.REGISTRY, "mnist", idx_spec("MNIST", "mnist", mnist_gz, "http://127.0.0.1:9"))
    with cnn_gpu.config.override(mirror=server.url + "/mirror/"):  # what CNN_GPU_MIRROR sets
        check_mnist(ds.load_mnist(root=tmp_path / "a", timeout=5), mnist_arrays)
    assert len(server.requests) == 4
    check_mnist(ds.load_mnist(root=tmp_path / "b", mirrors=[server.url + "/mirror"]), mnist_arrays)
    assert len(server.requests) == 8


def test_corrupt_cache_is_redownloaded_or_reported(mnist_server, mnist_gz, mnist_arrays, tmp_path):
    ds.load_mnist(root=tmp_path)
    cached = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    cached.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="failed verification.*size is 7 bytes"):
        ds.load_mnist(root=tmp_path, download=False)
    mnist_server.requests.clear()
    check_mnist(ds.load_mnist(root=tmp_path), mnist_arrays)
    assert mnist_server.requests == ["/m/train-labels-idx1-ubyte.gz"]
    assert cached.read_bytes() == mnist_gz[cached.name]
    # Same size, wrong content: caught by the SHA-256.
    body = bytearray(mnist_gz[cached.name])
    body[20] ^= 1
    cached.write_bytes(bytes(body))
    with pytest.raises(ValueError, match="SHA-256 is [0-9a-f]{64}, expected " + sha(mnist_gz[cached.name])):
        ds.load_mnist(root=tmp_path, download=False)


def test_fashion_mnist_uses_its_own_subfolder(server, mnist_gz, mnist_arrays, monkeypatch, tmp_path):
    for fname, body in mnist_gz.items():
        server.files["/m/" + fname] = body
    monkeypatch.setitem(ds.REGISTRY, "fashion-mnist", idx_spec("Fashion-MNIST", "fashion-mnist", mnist_gz, server.url))
    check_mnist(ds.load_fashion_mnist(root=tmp_path), mnist_arrays)
    assert len(files_in(tmp_path / "fashion-mnist")) == 4


def test_known_repacks_are_accepted_on_disk_but_never_downloaded(
    server, mnist_raw, mnist_gz, mnist_arrays, monkeypatch, tmp_path
):
    """A distribution's re-compressed copy under the canonical name (Debian's Fashion-MNIST) verifies
    against its recorded (SHA-256, size); a mirror serving those bytes is refused (downloads must be
    the canonical file), and a repack not on record is still an error."""
    repack = {IDX_NAMES[r]: gzip.compress(b, compresslevel=5, mtime=3) for r, b in mnist_raw.items()}
    assert all(repack[n] != mnist_gz[n] for n in repack)
    spec = idx_spec("Fashion-MNIST", "fashion-mnist", mnist_gz, server.url)
    spec = dataclasses.replace(
        spec,
        files={r: dataclasses.replace(f, repacks=((sha(repack[f.name]), len(repack[f.name])),)) for r, f in spec.files.items()},
    )
    monkeypatch.setitem(ds.REGISTRY, "fashion-mnist", spec)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name, body in repack.items():
        (folder / name).write_bytes(body)
    check_mnist(ds.load_fashion_mnist(root=tmp_path, download=False), mnist_arrays)
    (folder / IDX_NAMES["test_labels"]).write_bytes(gzip.compress(mnist_raw["test_labels"], compresslevel=1, mtime=7))
    with pytest.raises(ValueError, match="failed verification"):
        ds.load_fashion_mnist(root=tmp_path, download=False)
    for name, body in repack.items():  # a mirror serving the repack's bytes
        server.files["/m/" + name] = body
    with pytest.raises(ds.DownloadError, match="SHA-256"):
        ds.load_fashion_mnist(root=tmp_path / "fresh", download=True)


def test_fashion_mnist_records_debians_repack():
    """The registry accepts Debian's dataset-fashion-mnist files (tests/test_real_data.py loads them
    where the package is installed): one (SHA-256, size) per file, 23-24 bytes shorter than the
    originals (the gzip header's file name, with its NUL, stripped)."""
    for f in ds.REGISTRY["fashion-mnist"].files.values():
        ((digest, size),) = f.repacks
        assert len(digest) == 64 and f.size - size == len(f.name) - len(".gz") + 1
    assert all(not f.repacks for key in ("mnist", "cifar10") for f in ds.REGISTRY[key].files.values())


# --------------------------------------------------------------------------- #
# Offline use, alternative names, structural checks
# --------------------------------------------------------------------------- #
def alt_name(canonical: str, dotted: bool, gzipped: bool) -> str:
    stem = canonical[:-3]
    if dotted:
        stem = stem.replace("-idx", ".idx")
    return stem + (".gz" if gzipped else "")


@pytest.mark.parametrize("gzipped", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("dotted", [True, False], ids=["t10k-images.idx3-ubyte", "t10k-images-idx3-ubyte"])
@pytest.mark.parametrize("in_subdir", [True, False], ids=["root/mnist", "root"])
def test_offline_root_with_either_naming(mnist_server, mnist_raw, mnist_gz, mnist_arrays, tmp_path, dotted, gzipped, in_subdir):
    folder = tmp_path / "mnist" if in_subdir else tmp_path
    folder.mkdir(exist_ok=True)
    for role, raw in mnist_raw.items():
        if gzipped and not dotted:  # the canonical name: must be the mirror's bytes (SHA-256 checked)
            body = mnist_gz[IDX_NAMES[role]]
        elif gzipped:  # re-compressed, other bytes than the mirror's: only structure can be checked
            body = gzip.compress(raw, compresslevel=1, mtime=1)
        else:
            body = raw
        (folder / alt_name(IDX_NAMES[role], dotted, gzipped)).write_bytes(body)
    for download in (False, True):
        check_mnist(ds.load_mnist(root=tmp_path, download=download), mnist_arrays)
    assert mnist_server.requests == []


def test_offline_canonical_gz_in_root_is_checksum_verified(mnist_server, mnist_gz, mnist_arrays, tmp_path):
    for name, body in mnist_gz.items():
        (tmp_path / name).write_bytes(body)
    check_mnist(ds.load_mnist(root=tmp_path, download=False), mnist_arrays)
    assert mnist_server.requests == []


def test_offline_torchvision_layout(mnist_server, mnist_gz, mnist_arrays, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, body in mnist_gz.items():
        (raw / name).write_bytes(body)
    check_mnist(ds.load_mnist(root=tmp_path, download=False), mnist_arrays)


def write_raw(tmp_path: Path, mnist_raw, **override) -> Path:
    folder = tmp_path / "mnist"
    folder.mkdir(exist_ok=True)
    for role, body in mnist_raw.items():
        path = folder / IDX_NAMES[role][:-3]
        path.write_bytes(override.get(role, body))
    return folder


def test_corrupt_magic_number(mnist_server, mnist_raw, tmp_path):
    bad = b"\x00\x00\x08\x01" + mnist_raw["test_images"][4:]  # label magic on an image file
    folder = write_raw(tmp_path, mnist_raw, test_images=bad)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: bad IDX magic number 0x00000801, expected 0x00000803"):
        ds.load_mnist(root=tmp_path, download=False)
    write_raw(tmp_path, mnist_raw, train_labels=b"\xde\xad\xbe\xef" + mnist_raw["train_labels"][4:])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: bad IDX magic number 0xdeadbeef"):
        ds.load_mnist(root=tmp_path, download=False)
    assert folder.is_dir()


@pytest.mark.parametrize("delta", [-1, +1], ids=["truncated", "trailing"])
def test_wrong_length(mnist_server, mnist_raw, tmp_path, delta):
    body = mnist_raw["train_images"]
    body = body[:-1] if delta < 0 else body + b"\x00"
    write_raw(tmp_path, mnist_raw, train_images=body)
    expected = len(mnist_raw["train_images"])
    with pytest.raises(ValueError, match=rf"train-images-idx3-ubyte: wrong length: {len(body)} bytes, expected {expected}"):
        ds.load_mnist(root=tmp_path, download=False)


def test_wrong_count_dims_and_labels(mnist_server, mnist_raw, mnist_arrays, tmp_path):
    write_raw(tmp_path, mnist_raw, test_labels=idx_labels(mnist_arrays["test_labels"][:-1]))
    with pytest.raises(ValueError, match=f"t10k-labels-idx1-ubyte: holds {N_TEST - 1} items, expected {N_TEST}"):
        ds.load_mnist(root=tmp_path, download=False)
    write_raw(tmp_path, mnist_raw, test_images=idx_images(np.zeros((N_TEST, 28, 27), np.uint8)))
    with pytest.raises(ValueError, match="images are 28x27, expected 28x28"):
        ds.load_mnist(root=tmp_path, download=False)
    labels = mnist_arrays["train_labels"].copy()
    labels[3] = 10
    write_raw(tmp_path, mnist_raw, train_labels=idx_labels(labels))
    with pytest.raises(ValueError, match="label 10 out of range"):
        ds.load_mnist(root=tmp_path, download=False)


def test_truncated_gzip_under_alternative_name(mnist_server, mnist_raw, tmp_path):
    folder = write_raw(tmp_path, mnist_raw)
    (folder / "t10k-images-idx3-ubyte").unlink()
    body = gz(mnist_raw["test_images"])
    (folder / "t10k-images.idx3-ubyte.gz").write_bytes(body[: len(body) // 2])
    with pytest.raises(ValueError, match=r"t10k-images\.idx3-ubyte\.gz: corrupt or truncated gzip"):
        ds.load_mnist(root=tmp_path, download=False)


def test_parse_idx_generic():
    header = struct.pack(">III", 0x00000C02, 2, 3)  # big-endian int32, 2-D, shape (2, 3)
    arr = ds.parse_idx(header + np.arange(6, dtype=">i4").tobytes())
    np.testing.assert_array_equal(arr, np.arange(6).reshape(2, 3))
    assert arr.dtype == np.int32 and arr.dtype.isnative
    with pytest.raises(ValueError, match="wrong length: 12 bytes, expected 36"):
        ds.parse_idx(header)
    with pytest.raises(ValueError, match="bad IDX magic number 0x00000702"):
        ds.parse_idx(struct.pack(">III", 0x00000702, 2, 3) + bytes(6))
    with pytest.raises(ValueError, match="gzip-compressed"):
        ds.parse_idx(gz(header))


def test_download_false_missing_files(mnist_server, monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        ds.load_mnist(root=tmp_path, download=False)
    msg = str(exc.value)
    for name in IDX_NAMES.values():
        assert name in msg
    assert "t10k-images.idx3-ubyte" in msg and str(tmp_path / "mnist") in msg
    assert "download=True" in msg and "--data-dir" in msg
    assert mnist_server.requests == []
    assert not (tmp_path / "mnist").exists()  # nothing created

    monkeypatch.setitem(ds.REGISTRY, "cifar10", cifar_spec(b"x", mnist_server.url))
    with pytest.raises(FileNotFoundError, match=r"(?s)cifar-10-python\.tar\.gz.*cifar-10-batches-py.*download=True"):
        ds.load_cifar10(root=tmp_path, download=False)


# --------------------------------------------------------------------------- #
# CIFAR-10
# --------------------------------------------------------------------------- #
def check_cifar(result, batches):
    (x_train, y_train), (x_test, y_test) = result
    n_train = 5 * CIFAR_TRAIN_ROWS
    assert x_train.shape == (n_train, 3, 32, 32) and x_train.dtype == np.uint8
    assert x_test.shape == (CIFAR_TEST_ROWS, 3, 32, 32) and x_test.dtype == np.uint8
    assert y_train.shape == (n_train,) and y_train.dtype == np.int64
    assert y_test.shape == (CIFAR_TEST_ROWS,) and y_test.dtype == np.int64
    train_data = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    train_labels = np.concatenate([batches[f"data_batch_{i}"][2] for i in range(1, 6)])
    # Row layout: 1024 red, 1024 green, 1024 blue, each row-major 32x32.
    np.testing.assert_array_equal(x_train[:, 0].reshape(n_train, -1), train_data[:, :1024])
    np.testing.assert_array_equal(x_train[:, 2, 1, 0], train_data[:, 2048 + 32])
    np.testing.assert_array_equal(x_train.reshape(n_train, -1), train_data)
    np.testing.assert_array_equal(y_train, train_labels)
    np.testing.assert_array_equal(x_test.reshape(CIFAR_TEST_ROWS, -1), batches["test_batch"][1])
    np.testing.assert_array_equal(y_test, batches["test_batch"][2])
    assert x_test.flags.writeable and x_train.flags.writeable


def test_cifar_tarball_download_and_cache(server, cifar_tar, cifar_batches, monkeypatch, tmp_path):
    server.files["/c/cifar-10-python.tar.gz"] = cifar_tar
    monkeypatch.setitem(ds.REGISTRY, "cifar10", cifar_spec(cifar_tar, server.url))
    check_cifar(ds.load_cifar10(root=tmp_path), cifar_batches)
    assert server.requests == ["/c/cifar-10-python.tar.gz"]
    assert files_in(tmp_path / "cifar-10") == ["cifar-10-python.tar.gz"]  # not extracted
    check_cifar(ds.load_cifar10(root=tmp_path, download=False), cifar_batches)
    assert len(server.requests) == 1


def test_cifar_tarball_checksum_mismatch(server, cifar_tar, monkeypatch, tmp_path):
    server.files["/c/cifar-10-python.tar.gz"] = cifar_tar[:-1] + bytes([cifar_tar[-1] ^ 1])
    monkeypatch.setitem(ds.REGISTRY, "cifar10", cifar_spec(cifar_tar, server.url))
    with pytest.raises(ds.DownloadError, match="checksum mismatch"):
        ds.load_cifar10(root=tmp_path)
    assert files_in(tmp_path / "cifar-10") == []


def test_cifar_extracted_folder(server, cifar_batches, monkeypatch, tmp_path):
    monkeypatch.setitem(ds.REGISTRY, "cifar10", cifar_spec(b"unused", server.url))
    folder = tmp_path / "cifar-10-batches-py"  # keras/torchvision style: directly under root
    folder.mkdir()
    for name, (payload, _, _) in cifar_batches.items():
        (folder / name).write_bytes(payload)
    check_cifar(ds.load_cifar10(root=tmp_path, download=False), cifar_batches)
    check_cifar(ds.load_cifar10(root=tmp_path), cifar_batches)  # present: no download
    assert server.requests == []

    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        ds.load_cifar10(root=tmp_path, download=False)


@pytest.mark.parametrize("problem", ["shape", "dtype", "labels", "keys", "not-a-pickle", "evil"])
def test_cifar_bad_batch_is_rejected(server, cifar_batches, monkeypatch, tmp_path, problem):
    monkeypatch.setitem(ds.REGISTRY, "cifar10", cifar_spec(b"unused", server.url))
    folder = tmp_path / "cifar-10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, (payload, _, _) in cifar_batches.items():
        (folder / name).write_bytes(payload)
    data = np.zeros((CIFAR_TEST_ROWS, 3072), np.uint8)
    labels = [0] * CIFAR_TEST_ROWS
    bad = {
        "shape": lambda: pickle.dumps({b"data": np.zeros((CIFAR_TEST_ROWS, 3071), np.uint8), b"labels": labels}),
        "dtype": lambda: pickle.dumps({b"data": data.astype(np.float32), b"labels": labels}),
        "labels": lambda: pickle.dumps({b"data": data, b"labels": [0, 1, 2, 10]}),
        "keys": lambda: pickle.dumps({b"images": data, b"labels": labels}),
        "not-a-pickle": lambda: b"hello",
        "evil": lambda: pickle.dumps(os.system),
    }[problem]()
    (folder / "test_batch").write_bytes(bad)
    expected = {
        "shape": "expected uint8 array of shape",
        "dtype": "float32",
        "labels": "labels must be in",
        "keys": "missing key",
        "not-a-pickle": "not a readable CIFAR batch",
        "evil": "not allowed",
    }[problem]
    with pytest.raises(ValueError, match=expected) as exc:
        ds.load_cifar10(root=tmp_path, download=False)
    assert "test_batch" in str(exc.value)


def test_cifar_tarball_missing_member(server, cifar_batches, monkeypatch, tmp_path):
    tar = make_tar({k: v[0] for k, v in cifar_batches.items() if k != "data_batch_5"})
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(tar)
    monkeypatch.setitem(ds.REGISTRY, "cifar10", cifar_spec(tar, server.url))
    with pytest.raises(ValueError, match="archive lacks cifar-10-batches-py/data_batch_5"):
        ds.load_cifar10(root=tmp_path, download=False)


# --------------------------------------------------------------------------- #
# The real registry (static checks only; nothing is downloaded)
# --------------------------------------------------------------------------- #
def test_real_registry_is_complete():
    expected_sizes = {
        "mnist": {"train_images": 9912422, "train_labels": 28881, "test_images": 1648877, "test_labels": 4542},
        "fashion-mnist": {"train_images": 26421880, "train_labels": 29515, "test_images": 4422102, "test_labels": 5148},
        "cifar10": {"archive": 170498071},
    }
    assert ds.REGISTRY["mnist"].files["train_images"].urls[0] == (
        "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz"
    )
    assert ds.REGISTRY["fashion-mnist"].files["test_labels"].urls[0] == (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels-idx1-ubyte.gz"
    )
    assert ds.REGISTRY["cifar10"].files["archive"].urls == ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
    shas = set()
    for key, sizes in expected_sizes.items():
        spec = ds.REGISTRY[key]
        assert {r: f.size for r, f in spec.files.items()} == sizes
        for f in spec.files.values():
            assert len(f.sha256) == 64 and all(u.endswith("/" + f.name) for u in f.urls)
            shas.add(f.sha256)
    assert len(shas) == 9
    assert (ds.REGISTRY["mnist"].n_train, ds.REGISTRY["mnist"].n_test) == (60000, 10000)
    assert (ds.REGISTRY["cifar10"].n_train, ds.REGISTRY["cifar10"].n_test) == (50000, 10000)
    with pytest.raises(ValueError, match="unknown dataset"):
        ds.load_dataset("imagenet")


def test_module_imports_only_stdlib_numpy_and_the_config():
    """The readers stay light: their imports are the standard library, NumPy and cnn_gpu.config."""
    import ast  # noqa: PLC0415

    tree = ast.parse(Path(ds.__file__).read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.split(".")[0] not in sys.stdlib_module_names | {"numpy"}]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module.split(".")[0] not in sys.stdlib_module_names | {"numpy", "__future__"}:
                bad.append(node.module)
            if node.level and not (node.level == 2 and node.module is None and [a.name for a in node.names] == ["config"]):
                bad.append("." * node.level + (node.module or "") + ":" + ",".join(a.name for a in node.names))
    assert bad == []
