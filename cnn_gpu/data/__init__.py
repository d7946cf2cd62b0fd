"""Data: the bundled digits, MNIST / Fashion-MNIST / CIFAR-10 readers, normalisation, batches."""
from __future__ import annotations

from typing import Any, NamedTuple

from .digits import DIGITS_MAX, load_digits
from .loader import DataLoader, channel_stats, normalize, split_validation


class Dataset(NamedTuple):
    """Train and test splits as NumPy arrays (images NCHW uint8, labels int64)."""

    name: str
    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any
    num_classes: int
    scale: float  # the pixel value that maps to 1.0

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])


DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10")


def get_dataset(name: str, data_dir=None, download: bool = True) -> Dataset:
    """Load a dataset by name (see DATASET_NAMES)."""
    if name == "digits":
        (xtr, ytr), (xte, yte) = load_digits()
        return Dataset(name, xtr, ytr, xte, yte, 10, float(DIGITS_MAX))
    from . import datasets  # noqa: PLC0415

    loaders = {"mnist": datasets.load_mnist, "fashion-mnist": datasets.load_fashion_mnist, "cifar10": datasets.load_cifar10}
    if name not in loaders:
        raise ValueError(f"dataset: expected one of {DATASET_NAMES}, got {name!r}")
    (xtr, ytr), (xte, yte) = loaders[name](root=data_dir, download=download)
    return Dataset(name, xtr, ytr, xte, yte, 10, 255.0)


def __getattr__(name: str):
    # the download/IDX/CIFAR readers load lazily (they import nothing heavy, but keep import light)
    if name in ("load_mnist", "load_fashion_mnist", "load_cifar10", "load_dataset", "parse_idx", "DownloadError"):
        from . import datasets  # noqa: PLC0415

        return getattr(datasets, name)
    raise AttributeError(f"module 'cnn_gpu.data' has no attribute {name!r}")


__all__ = [
    "Dataset", "DATASET_NAMES", "get_dataset", "load_digits", "DataLoader", "channel_stats", "normalize", "split_validation",
    "load_mnist", "load_fashion_mnist", "load_cifar10",
]
