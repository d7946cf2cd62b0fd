"""Real datasets: MNIST, Fashion-MNIST and CIFAR-10, downloaded, verified, parsed.

Each loader returns ``(x_train, y_train), (x_test, y_test)`` as NumPy arrays:
images NCHW ``uint8`` (left unnormalised), labels ``int64`` of shape ``(N,)``::

    (x_train, y_train), (x_test, y_test) = load_mnist()        # (60000, 1, 28, 28) ...
    (x_train, y_train), (x_test, y_test) = load_cifar10()      # (50000, 3, 32, 32) ...

Where the files live
    ``root`` if given, else ``$CNN_GPU_DATA``, else the user cache folder
    (``$XDG_CACHE_HOME/cnn_gpu`` or ``~/.cache/cnn_gpu``); one subfolder per
    dataset (``mnist``, ``fashion-mnist``, ``cifar-10``). Files are looked for in
    that subfolder first, then in the folder itself (so ``root`` may point
    straight at a folder of files), then in torchvision's layout
    (``MNIST/raw``, ``FashionMNIST/raw``). Downloads go to the subfolder.

Integrity
    Every file under its canonical name (exactly as the mirrors serve it) is
    checked against the SHA-256 and size recorded in :data:`REGISTRY`, on every
    load, whether it was just downloaded or found in the cache. A download is
    written to a temporary file in the destination folder, fsynced, verified and
    only then renamed into place, so a failed, short or tampered download never
    leaves a file behind. A cached file that does not verify is downloaded again
    (``download=True``) or is an error (``download=False``).

    Files found under another name or format (``t10k-images.idx3-ubyte``,
    uncompressed IDX, an already extracted ``cifar-10-batches-py/`` folder) have
    no published checksum, so they are verified *structurally* instead: IDX
    magic numbers, dimensions, item counts and exact file length; CIFAR pickle
    keys, array shapes and dtypes; labels in range. Any mismatch is a
    ``ValueError`` naming the file and what was expected, never a silent
    mis-parse. (Structure cannot tell MNIST from Fashion-MNIST, which share file
    names: when one root holds several datasets, keep each in its subfolder.)

Mirrors
    Each file lists its mirrors, tried in order. ``mirrors=[base_url, ...]`` or
    the environment variable ``CNN_GPU_MIRROR`` (one base URL) replace that list;
    the file name is appended to the base URL.

Only the standard library and NumPy are imported.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import logging
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .. import config

__all__ = [
    "DatasetFile",
    "DatasetSpec",
    "DownloadError",
    "REGISTRY",
    "data_dir",
    "load_dataset",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
    "parse_idx",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0  # seconds, per network operation (connect / each read)
_CHUNK = 1 << 20
_USER_AGENT = "cnn_gpu-datasets/0.1 (+urllib)"


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class DatasetFile:
    """One downloadable file: its canonical name, SHA-256, size and mirror URLs; ``repacks``:
    the (SHA-256, size) of known copies with the same contents in other bytes (a distribution's
    re-compressed package), accepted when found on disk; downloads must match ``sha256``."""

    name: str
    sha256: str
    size: int | None
    urls: tuple[str, ...]
    repacks: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        for sha in (self.sha256,) + tuple(r[0] for r in self.repacks):
            if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower()):
                raise ValueError(f"DatasetFile {self.name!r}: sha256 must be 64 hex digits, got {sha!r}")
        object.__setattr__(self, "sha256", self.sha256.lower())
        object.__setattr__(self, "repacks", tuple((sha.lower(), int(n)) for sha, n in self.repacks))
        object.__setattr__(self, "urls", tuple(self.urls))


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its files (by role), cache subfolder and expected shapes/counts.

    IDX datasets (``kind="idx"``) have the roles ``train_images``,
    ``train_labels``, ``test_images`` and ``test_labels``; CIFAR-10
    (``kind="cifar10"``) has the single role ``archive``. ``n_train`` and
    ``n_test`` are the exact example counts the files must hold (tests use a
    spec with small counts and their own fixture files).
    """

    name: str
    subdir: str
    kind: str  # "idx" or "cifar10"
    files: Mapping[str, DatasetFile]
    n_train: int
    n_test: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int = 10
    # Extra folders (relative to the data root) to look in, e.g. torchvision's.
    extra_dirs: tuple[str, ...] = ()


_MNIST_MIRRORS = (
    # torchvision's primary mirror.
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    # TensorFlow Datasets' mirror (the one its recorded checksums were taken from).
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_FASHION_MIRRORS = (
    # Zalando's canonical bucket (http only; the SHA-256 check guards integrity).
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    # Keras' mirror; keras pins the same SHA-256 values, so the bytes are identical.
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
)
_CIFAR10_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)


def _files(
    mirrors: Sequence[str], entries: Iterable[tuple], repacks: Mapping[str, tuple] | None = None
) -> dict[str, DatasetFile]:
    """{role: DatasetFile} from (role, name, sha256, size) entries; ``repacks``: {role: ((sha256, size), ...)}."""
    return {
        role: DatasetFile(name, sha, size, tuple(m + name for m in mirrors), (repacks or {}).get(role, ()))
        for role, name, sha, size in entries
    }


# MNIST checksums and sizes: tensorflow/datasets,
#   tensorflow_datasets/url_checksums/mnist.txt (url, size, sha256), recorded for
#   the storage.googleapis.com/cvdf-datasets/mnist/ copies of the same four files.
#   The identical SHA-256 values are pinned by many independent MNIST loaders
#   fetching from ossci-datasets / yann.lecun.com, and the sizes equal those on
#   yann.lecun.com/exdb/mnist (9912422, 28881, 1648877, 4542 bytes).
_MNIST = DatasetSpec(
    name="MNIST",
    subdir="mnist",
    kind="idx",
    files=_files(
        _MNIST_MIRRORS,
        [
            (
                "train_images",
                "train-images-idx3-ubyte.gz",
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                9912422,
            ),
            (
                "train_labels",
                "train-labels-idx1-ubyte.gz",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                28881,
            ),
            (
                "test_images",
                "t10k-images-idx3-ubyte.gz",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                1648877,
            ),
            (
                "test_labels",
                "t10k-labels-idx1-ubyte.gz",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                4542,
            ),
        ],
    ),
    n_train=60000,
    n_test=10000,
    image_shape=(1, 28, 28),
    extra_dirs=("MNIST/raw",),
)

# Fashion-MNIST checksums and sizes: tensorflow/datasets,
#   tensorflow_datasets/url_checksums/fashion_mnist.txt (url, size, sha256), for
#   the fashion-mnist.s3-website.eu-central-1.amazonaws.com URLs used here.
#   Cross-checked: keras-team/keras keras/src/datasets/fashion_mnist.py
#   FILE_HASHES pins the same four SHA-256 values.
_FASHION_MNIST = DatasetSpec(
    name="Fashion-MNIST",
    subdir="fashion-mnist",
    kind="idx",
    files=_files(
        _FASHION_MIRRORS,
        [
            (
                "train_images",
                "train-images-idx3-ubyte.gz",
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                26421880,
            ),
            (
                "train_labels",
                "train-labels-idx1-ubyte.gz",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                29515,
            ),
            (
                "test_images",
                "t10k-images-idx3-ubyte.gz",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                4422102,
            ),
            (
                "test_labels",
                "t10k-labels-idx1-ubyte.gz",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                5148,
            ),
        ],
        repacks={
            # Debian's (and Ubuntu's) package dataset-fashion-mnist, 0.0~git20200523.55506a9-1
            # (/usr/share/datasets/fashion-mnist; apt checks it against the signed archive): the same
            # four files without the gzip header's file name (each is shorter by exactly that field,
            # 23-24 bytes) and a 2020 time stamp, so other SHA-256s. Their contents were checked against the
            # originals' published facts: IDX structure, 6,000 / 1,000 images per class, the first
            # training labels 9 0 0 3 0 2 7 2 5 5, pixel mean 0.2860 (tests/test_real_data.py).
            "train_images": (("b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7", 26421856),),
            "train_labels": (("0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056", 29491),),
            "test_images": (("cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa", 4422079),),
            "test_labels": (("8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05", 5125),),
        },
    ),
    n_train=60000,
    n_test=10000,
    image_shape=(1, 28, 28),
    extra_dirs=("FashionMNIST/raw",),
)

# CIFAR-10 (python version) checksum: keras-team/keras
#   keras/src/datasets/cifar10.py, get_file(..., file_hash="6d958be0...01ce") for
#   https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz. (TFDS's
#   url_checksums/cifar10.txt covers only the *binary* tarball, so it is not
#   usable here.) Size 170,498,071 bytes, as listed next to this SHA-256 (and
#   torchvision's MD5 c58f30108f718f92721af3b95e74349a) in independent
#   provenance records of the same archive.
_CIFAR10 = DatasetSpec(
    name="CIFAR-10",
    subdir="cifar-10",
    kind="cifar10",
    files=_files(
        _CIFAR10_MIRRORS,
        [
            ("archive", "cifar-10-python.tar.gz", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", 170498071),
        ],
    ),
    n_train=50000,
    n_test=10000,
    image_shape=(3, 32, 32),
)

#: Dataset name -> spec. Tests (or users with a private mirror) may replace entries.
REGISTRY: dict[str, DatasetSpec] = {
    "mnist": _MNIST,
    "fashion-mnist": _FASHION_MNIST,
    "cifar10": _CIFAR10,
}

_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar_10": "cifar10"}


class DownloadError(OSError):
    """A file could not be downloaded and verified from any of its mirrors."""


# --------------------------------------------------------------------------- #
# Paths
# --------------------------------------------------------------------------- #
def data_dir(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root``, else the ``data_dir`` setting (``$CNN_GPU_DATA``), else the user cache folder."""
    if root is not None:
        return Path(root).expanduser()
    setting = config.get().data_dir
    if setting:
        return Path(setting).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "cnn_gpu"


def _search_dirs(base: Path, spec: DatasetSpec) -> list[Path]:
    dirs = [base / spec.subdir, base] + [base / d for d in spec.extra_dirs]
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def _alt_names(canonical: str) -> list[str]:
    """Other common spellings of an IDX file name (after the canonical one).

    ``t10k-images-idx3-ubyte.gz`` -> ``t10k-images-idx3-ubyte``,
    ``t10k-images.idx3-ubyte.gz``, ``t10k-images.idx3-ubyte``.
    """
    stem = canonical[:-3] if canonical.endswith(".gz") else canonical
    dotted = stem.replace("-idx", ".idx", 1)
    names = [stem, dotted + ".gz", dotted, canonical]
    out: list[str] = []
    for n in names:
        if n != canonical and n not in out:
            out.append(n)
    return out


# --------------------------------------------------------------------------- #
# Verification and download
# --------------------------------------------------------------------------- #
def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_problem(path: Path, entry: DatasetFile) -> str | None:
    """None if ``path`` matches ``entry``'s size and SHA-256 (or a known repack's), else what is wrong."""
    size = path.stat().st_size
    repacks = [sha for sha, n in entry.repacks if n == size]
    if entry.size is not None and size != entry.size and not repacks:
        return f"size is {size} bytes, expected {entry.size}"
    digest = _sha256_of(path)
    if digest != entry.sha256 and digest not in repacks:
        return f"SHA-256 is {digest}, expected {entry.sha256}"
    return None


def _mirror_urls(entry: DatasetFile, mirrors: Sequence[str] | str | None) -> list[str]:
    if mirrors is None:
        setting = config.get().mirror  # $CNN_GPU_MIRROR
        mirrors = [setting] if setting else None
    if mirrors is None:
        return list(entry.urls)
    if isinstance(mirrors, (str, bytes)):
        mirrors = [mirrors]
    return [m.rstrip("/") + "/" + entry.name for m in mirrors]


def _fetch(url: str, entry: DatasetFile, dest: Path, timeout: float) -> None:
    """Download ``url`` into ``dest`` atomically; on any failure leave nothing behind."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                header_len = resp.headers.get("Content-Length")
                h = hashlib.sha256()
                n = 0
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
                    if entry.size is not None and n > entry.size:
                        raise DownloadError(f"{entry.name}: {url} sent more than the expected {entry.size} bytes")
            out.flush()
            os.fsync(out.fileno())
        if header_len is not None and header_len.isdigit() and n != int(header_len):
            raise DownloadError(
                f"{entry.name}: short read from {url}: got {n} bytes, server announced {header_len} (expected {entry.size})"
            )
        if entry.size is not None and n != entry.size:
            raise DownloadError(f"{entry.name}: {url} gave {n} bytes, expected {entry.size}")
        digest = h.hexdigest()
        if digest != entry.sha256:
            raise DownloadError(f"{entry.name}: checksum mismatch for {url}: SHA-256 is {digest}, expected {entry.sha256}")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a data cache may be shared
        os.replace(tmp, dest)
    except BaseException:  # includes KeyboardInterrupt: never leave a partial file
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; -> the folders it created, outermost first."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _download(entry: DatasetFile, dest: Path, mirrors, timeout: float) -> Path:
    urls = _mirror_urls(entry, mirrors)
    if not urls:
        raise DownloadError(f"{entry.name}: no mirror URL to download it from")
    created = _make_dirs(dest.parent)
    failures = []
    for url in urls:
        log.info("downloading %s -> %s", url, dest)
        try:
            _fetch(url, entry, dest, timeout)
            return dest
        except DownloadError as e:
            failures.append(str(e))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            # URLError covers HTTPError (404...); HTTPException covers IncompleteRead;
            # OSError covers timeouts and resets; ValueError a malformed URL.
            failures.append(f"{entry.name}: {url}: {type(e).__name__}: {e}")
    for d in reversed(created):  # a failed download leaves no empty folder behind
        try:
            d.rmdir()
        except OSError:
            break
    raise DownloadError(
        f"could not download {entry.name} (expected {entry.size} bytes, SHA-256 "
        f"{entry.sha256}) into {dest.parent}:\n  " + "\n  ".join(failures)
    )


def _resolve_verified(
    entry: DatasetFile, dirs: list[Path], dest_dir: Path, download: bool, mirrors, timeout: float, alternates: Iterable[Path] = ()
) -> tuple[Path, bool] | None:
    """Find (or download) the file for ``entry``.

    Returns ``(path, checksum_verified)``, or None when nothing is found and
    ``download`` is False. A canonical-name file is used only if it verifies;
    ``alternates`` (paths under other names/formats) are used as they are and
    must be verified structurally by the caller.
    """
    for d in dirs:
        p = d / entry.name
        if p.is_file():
            problem = _verify_problem(p, entry)
            if problem is None:
                return p, True
            if not download:
                raise ValueError(
                    f"{p}: cached file failed verification ({problem}); delete it or pass download=True to fetch it again"
                )
            log.warning("%s failed verification (%s); downloading it again", p, problem)
            return _download(entry, dest_dir / entry.name, mirrors, timeout), True
    for p in alternates:
        if p.exists():
            log.info(
                "using %s for %s: no published checksum for this name/format, verifying its structure instead", p, entry.name
            )
            return p, False
    if download:
        return _download(entry, dest_dir / entry.name, mirrors, timeout), True
    return None


def _not_found(spec: DatasetSpec, looked: list[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"{spec.name} files not found and download=False. Looked for:\n  "
        + "\n  ".join(looked)
        + "\nPass download=True to fetch them (or point root= / --data-dir / "
        "$CNN_GPU_DATA at a folder holding them)."
    )


# --------------------------------------------------------------------------- #
# IDX
# --------------------------------------------------------------------------- #
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}  # big-endian


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an (uncompressed) IDX file; the length must match its header exactly."""
    if len(data) < 4:
        raise ValueError(f"{source}: not an IDX file: only {len(data)} bytes")
    if data[:2] == b"\x1f\x8b":
        raise ValueError(f"{source}: gzip-compressed data, decompress it first")
    magic = int.from_bytes(data[:4], "big")
    code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{source}: bad IDX magic number 0x{magic:08x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: IDX header needs {header} bytes, file has {len(data)}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{source}: wrong length: {len(data)} bytes, expected {expected} for an IDX "
            f"array of shape {dims} ({'truncated' if len(data) < expected else 'trailing data'})"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from None


def _load_idx_file(path: Path, *, images: bool, count: int, spec: DatasetSpec) -> np.ndarray:
    data = _read_maybe_gzip(path)
    want_magic = 0x00000803 if images else 0x00000801
    what = "uint8 3-D image array" if images else "uint8 1-D label array"
    if len(data) >= 4:
        magic = int.from_bytes(data[:4], "big")
        if magic != want_magic:
            raise ValueError(f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{want_magic:08x} ({what})")
    arr = parse_idx(data, str(path))
    if arr.shape[0] != count:
        raise ValueError(f"{path}: holds {arr.shape[0]} items, expected {count}")
    if images:
        c, h, w = spec.image_shape
        if c != 1 or arr.shape[1:] != (h, w):
            raise ValueError(f"{path}: images are {arr.shape[1]}x{arr.shape[2]}, expected {h}x{w}")
        return np.ascontiguousarray(arr.reshape(count, 1, h, w))
    if arr.size and int(arr.max()) >= spec.num_classes:
        raise ValueError(f"{path}: label {int(arr.max())} out of range, expected labels < {spec.num_classes}")
    return arr.astype(np.int64)


def _load_idx_dataset(spec: DatasetSpec, base: Path, download: bool, mirrors, timeout):
    dirs = _search_dirs(base, spec)
    dest_dir = base / spec.subdir
    found: dict[str, Path] = {}
    looked: list[str] = []
    for role in ("train_images", "train_labels", "test_images", "test_labels"):
        entry = spec.files[role]
        alternates = [d / n for d in dirs for n in _alt_names(entry.name)]
        hit = _resolve_verified(entry, dirs, dest_dir, download, mirrors, timeout, alternates)
        if hit is None:
            names = ", ".join([entry.name] + _alt_names(entry.name))
            looked.append(f"{names} in " + ", ".join(str(d) for d in dirs))
        else:
            found[role] = hit[0]
    if looked:
        raise _not_found(spec, looked)
    x_train = _load_idx_file(found["train_images"], images=True, count=spec.n_train, spec=spec)
    y_train = _load_idx_file(found["train_labels"], images=False, count=spec.n_train, spec=spec)
    x_test = _load_idx_file(found["test_images"], images=True, count=spec.n_test, spec=spec)
    y_test = _load_idx_file(found["test_labels"], images=False, count=spec.n_test, spec=spec)
    return (x_train, y_train), (x_test, y_test)


# --------------------------------------------------------------------------- #
# CIFAR-10
# --------------------------------------------------------------------------- #
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of bytes/lists/ndarrays) and nothing else.

    CIFAR batches are pickles; a pickle can run arbitrary code, and an extracted
    folder carries no checksum. Only the globals NumPy needs to rebuild an array
    are allowed.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.dtypes", "UInt8DType"),
        ("numpy.dtypes", "Int64DType"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _parse_cifar_batch(f, source: str, rows: int, spec: DatasetSpec):
    try:
        d = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"{source}: not a readable CIFAR batch pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a dict, got {type(d).__name__}")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    missing = [k for k in ("data", "labels") if k not in d]
    if missing:
        raise ValueError(f"{source}: missing key(s) {missing}; has {sorted(map(str, d))}")
    data, labels = d["data"], d["labels"]
    c, h, w = spec.image_shape
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (rows, c * h * w):
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{source}: 'data' is {got}, expected uint8 array of shape {(rows, c * h * w)}")
    try:
        labels = np.asarray(labels)
    except Exception:  # noqa: BLE001
        labels = np.asarray([], dtype=object)
    if labels.shape != (rows,) or labels.dtype.kind not in "iu":
        raise ValueError(f"{source}: 'labels' has shape {labels.shape} ({labels.dtype}), expected {rows} integers")
    if rows and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"{source}: labels must be in [0, {spec.num_classes}), got range [{labels.min()}, {labels.max()}]")
    return data.reshape(rows, c, h, w), labels.astype(np.int64)


def _cifar_rows(spec: DatasetSpec) -> dict[str, int]:
    if spec.n_train % len(_CIFAR_TRAIN):
        raise ValueError(f"{spec.name}: n_train={spec.n_train} is not divisible by {len(_CIFAR_TRAIN)} batches")
    rows = {b: spec.n_train // len(_CIFAR_TRAIN) for b in _CIFAR_TRAIN}
    rows[_CIFAR_TEST] = spec.n_test
    return rows


def _assemble_cifar(batches: dict):
    x_train = np.concatenate([batches[b][0] for b in _CIFAR_TRAIN])
    y_train = np.concatenate([batches[b][1] for b in _CIFAR_TRAIN])
    x_test, y_test = batches[_CIFAR_TEST]
    # Own, writable, C-contiguous arrays (an unpickled array may share a read-only buffer).
    x_test = np.require(x_test, requirements=["C", "W", "O"])
    return (np.require(x_train, requirements=["C", "W", "O"]), y_train), (x_test, y_test)


def _read_cifar_tar(path: Path, spec: DatasetSpec):
    rows = _cifar_rows(spec)
    batches = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                parts = [p for p in member.name.replace("\\", "/").split("/") if p not in ("", ".")]
                if len(parts) != 2 or parts[0] != _CIFAR_DIR or parts[1] not in rows:
                    continue
                if not member.isfile():
                    raise ValueError(f"{path}: member {member.name} is not a regular file")
                f = tf.extractfile(member)
                batches[parts[1]] = _parse_cifar_batch(f, f"{path}:{member.name}", rows[parts[1]], spec)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated tar.gz archive ({type(e).__name__}: {e})") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: corrupt or truncated tar.gz archive ({type(e).__name__}: {e})") from None
    missing = [f"{_CIFAR_DIR}/{b}" for b in rows if b not in batches]
    if missing:
        raise ValueError(f"{path}: archive lacks {', '.join(missing)}")
    return _assemble_cifar(batches)


def _read_cifar_dir(folder: Path, spec: DatasetSpec):
    rows = _cifar_rows(spec)
    missing = [str(folder / b) for b in rows if not (folder / b).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: extracted CIFAR-10 folder is incomplete, missing: " + ", ".join(missing))
    batches = {}
    for b, n in rows.items():
        with open(folder / b, "rb") as f:
            batches[b] = _parse_cifar_batch(f, str(folder / b), n, spec)
    return _assemble_cifar(batches)


def _load_cifar10_dataset(spec: DatasetSpec, base: Path, download: bool, mirrors, timeout):
    dirs = _search_dirs(base, spec)
    entry = spec.files["archive"]
    folders = [d / _CIFAR_DIR for d in dirs]
    alternates = [f for f in folders if f.is_dir()]
    hit = _resolve_verified(entry, dirs, base / spec.subdir, download, mirrors, timeout, alternates)
    if hit is None:
        raise _not_found(
            spec,
            [
                f"{entry.name} or {_CIFAR_DIR}/ (with {', '.join(_CIFAR_TRAIN)}, "
                f"{_CIFAR_TEST}) in " + ", ".join(str(d) for d in dirs)
            ],
        )
    path, _ = hit
    if path.is_dir():
        return _read_cifar_dir(path, spec)
    return _read_cifar_tar(path, spec)


# --------------------------------------------------------------------------- #
# Public loaders
# --------------------------------------------------------------------------- #
def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    download: bool = True,
    *,
    mirrors: Sequence[str] | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
):
    """Load ``name`` ("mnist", "fashion-mnist" or "cifar10"); see the module docs.

    Returns ``(x_train, y_train), (x_test, y_test)``: NCHW uint8 images and
    int64 labels. ``mirrors`` (base URLs) replaces the registry's mirror list,
    as does ``$CNN_GPU_MIRROR`` when ``mirrors`` is not given.
    """
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(REGISTRY)}")
    spec = REGISTRY[key]
    base = data_dir(root)
    if spec.kind == "idx":
        return _load_idx_dataset(spec, base, download, mirrors, timeout)
    if spec.kind == "cifar10":
        return _load_cifar10_dataset(spec, base, download, mirrors, timeout)
    raise ValueError(f"{spec.name}: unknown dataset kind {spec.kind!r}")


def load_mnist(root=None, download=True, *, mirrors=None, timeout=DEFAULT_TIMEOUT):
    """MNIST digits: ``(60000, 1, 28, 28)`` / ``(10000, 1, 28, 28)`` uint8, int64 labels."""
    return load_dataset("mnist", root, download, mirrors=mirrors, timeout=timeout)


def load_fashion_mnist(root=None, download=True, *, mirrors=None, timeout=DEFAULT_TIMEOUT):
    """Fashion-MNIST: ``(60000, 1, 28, 28)`` / ``(10000, 1, 28, 28)`` uint8, int64 labels."""
    return load_dataset("fashion-mnist", root, download, mirrors=mirrors, timeout=timeout)


def load_cifar10(root=None, download=True, *, mirrors=None, timeout=DEFAULT_TIMEOUT):
    """CIFAR-10: ``(50000, 3, 32, 32)`` / ``(10000, 3, 32, 32)`` uint8, int64 labels."""
    return load_dataset("cifar10", root, download, mirrors=mirrors, timeout=timeout)
