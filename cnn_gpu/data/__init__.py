"""Data: the bundled digits, MNIST / Fashion-MNIST / CIFAR-10 readers, your own images and arrays
(docs/DATA.md), normalisation, batches."""

from __future__ import annotations

from typing import Any, NamedTuple

from .arrays import load_arrays
from .cache import clear_cache
from .digits import DIGITS_MAX, load_digits
from .errors import DataError
from .images import IMAGE_SUFFIXES, ImageFolder, open_data, read_image
from .loader import DataLoader, channel_stats, normalize, split_validation
from .prefetch import HostImages


class Dataset(NamedTuple):
    """Train and test splits as NumPy arrays (images NCHW, uint8 or float32; labels int64); the
    images may be read-only ``np.memmap`` arrays when the data is large (docs/DATA.md)."""

    name: str
    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any
    num_classes: int
    scale: float  # the pixel value that maps to 1.0
    classes: tuple | None = None  # class names in label order (None: "0".."K-1")
    x_val: Any = None  # a validation split, when the data has one (an image folder's val/)
    y_val: Any = None

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])


DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10")
_DIGIT_NAMES = tuple(str(i) for i in range(10))
CLASS_NAMES = {
    "digits": _DIGIT_NAMES,
    "mnist": _DIGIT_NAMES,
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


def get_dataset(name: str, data_dir=None, download: bool = True) -> Dataset:
    """Load a dataset by name (see DATASET_NAMES)."""
    if name == "digits":
        (xtr, ytr), (xte, yte) = load_digits()
        return Dataset(name, xtr, ytr, xte, yte, 10, float(DIGITS_MAX), CLASS_NAMES[name])
    from . import datasets  # noqa: PLC0415

    loaders = {"mnist": datasets.load_mnist, "fashion-mnist": datasets.load_fashion_mnist, "cifar10": datasets.load_cifar10}
    if name not in loaders:
        raise ValueError(f"dataset: expected one of {DATASET_NAMES}, got {name!r}")
    (xtr, ytr), (xte, yte) = loaders[name](root=data_dir, download=download)
    return Dataset(name, xtr, ytr, xte, yte, 10, 255.0, CLASS_NAMES[name])


def __getattr__(name: str):
    # the download/IDX/CIFAR readers load lazily (they import nothing heavy, but keep import light)
    if name in ("load_mnist", "load_fashion_mnist", "load_cifar10", "load_dataset", "parse_idx", "DownloadError"):
        from . import datasets  # noqa: PLC0415

        return getattr(datasets, name)
    raise AttributeError(f"module 'cnn_gpu.data' has no attribute {name!r}")


__all__ = [
    "Dataset",
    "DATASET_NAMES",
    "CLASS_NAMES",
    "get_dataset",
    "load_digits",
    "DataLoader",
    "channel_stats",
    "normalize",
    "split_validation",
    "ImageFolder",
    "load_arrays",
    "open_data",
    "read_image",
    "DataError",
    "IMAGE_SUFFIXES",
    "HostImages",
    "clear_cache",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
]
