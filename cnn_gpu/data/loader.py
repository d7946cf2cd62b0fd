"""In-memory datasets, normalisation and the batch iterator.

The arrays live on one backend (uploaded once); shuffling happens on that backend too, so
on the GPU an epoch never copies data from the host. Epoch ``e``'s order depends only on
(seed, e) -- it is the argsort of counter-based random keys (functional/counter_rng.py), the
same order on NumPy and CuPy -- which makes a resumed run see the same batches as an
uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..backend import get_array_module
from ..functional import counter_rng


def channel_stats(x: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``x / scale`` over (N, H, W), in float64, for (N, C, H, W) x."""
    if x.ndim != 4:
        raise ValueError(f"x: expected images (N, C, H, W), got shape {tuple(x.shape)}")
    xf = np.asarray(x, dtype=np.float64) / scale
    mean = xf.mean(axis=(0, 2, 3))
    std = xf.std(axis=(0, 2, 3))
    return mean, np.where(std > 0, std, 1.0)


def normalize(x, mean, std, scale: float, dtype=np.float32):
    """(x / scale - mean[c]) / std[c] per channel, as ``dtype`` (float32 by default)."""
    xp = get_array_module(x)
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}")
    mean = xp.asarray(np.asarray(mean, dtype=dt).reshape(1, -1, 1, 1))
    inv_std = xp.asarray((1.0 / np.asarray(std, dtype=np.float64)).astype(dt).reshape(1, -1, 1, 1))
    if mean.shape[1] != x.shape[1]:
        raise ValueError(f"mean: expected {x.shape[1]} channel values for x of shape {tuple(x.shape)}, got {mean.shape[1]}")
    out = x.astype(dt) * dt.type(1.0 / scale)
    out -= mean
    out *= inv_std
    return out


def split_validation(x: np.ndarray, y: np.ndarray, fraction: float, seed: int = 0):
    """Hold out ``fraction`` of (x, y) for validation, stratified by class, deterministically.

    -> (x_train, y_train), (x_val, y_val). The split depends only on the labels, ``fraction``
    and ``seed`` (fixed at 0 by the command line), not on the training seed, so runs with
    different seeds validate on the same examples. Both parts keep the original order.
    """
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: expected a float in (0, 1), got {fraction!r}")
    y = np.asarray(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"y: expected {x.shape[0]} labels to match x of shape {tuple(x.shape)}, got shape {tuple(y.shape)}")
    rng = np.random.default_rng(seed)
    val_mask = np.zeros(y.shape[0], dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val_mask[idx[: int(round(fraction * idx.size))]] = True
    if not val_mask.any() or val_mask.all():
        raise ValueError(f"fraction: {fraction} of {y.shape[0]} examples leaves an empty training or validation set")
    return (x[~val_mask], y[~val_mask]), (x[val_mask], y[val_mask])


class DataLoader:
    """Mini-batches of (x, y) arrays already on their backend.

    ``for xb, yb in loader.epoch(e)`` yields the batches of epoch ``e``; the order is a
    permutation drawn from (seed, e) when ``shuffle`` (on the arrays' backend). ``transform``
    (e.g. cnn_gpu.data.augment.Compose) is applied to each batch's x as
    ``transform(xb, seed=seed, epoch=e, step=batch number)``: a pure function of those, so a
    resumed epoch sees the same batches.
    """

    def __init__(self, x: Any, y: Any, batch_size: int, shuffle: bool = False, drop_last: bool = False, seed: int = 0,
                 transform: Any = None):
        if not hasattr(x, "shape") or not hasattr(y, "shape"):
            raise TypeError(f"x, y: expected arrays, got {type(x).__name__} and {type(y).__name__}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"y: expected {x.shape[0]} labels to match x of shape {tuple(x.shape)}, got shape {tuple(y.shape)}")
        if get_array_module(x) is not get_array_module(y):
            raise TypeError("x, y: expected both on the same backend")
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if drop_last and x.shape[0] < batch_size:
            raise ValueError(f"batch_size: {batch_size} is larger than the {x.shape[0]} examples with drop_last=True")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.drop_last, self.seed = int(batch_size), bool(shuffle), bool(drop_last), int(seed)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform: expected a callable (x, seed=, epoch=, step=) -> x, got {transform!r}")
        self.transform = transform

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])

    def __len__(self) -> int:
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int):
        """The example order of epoch ``epoch`` (an index array on the data's backend), or None:
        the argsort of a 64-bit random key per example, drawn from (seed, epoch) on the device."""
        if not self.shuffle:
            return None
        xp = get_array_module(self.x)
        keys = counter_rng.bits(xp, counter_rng.key(self.seed, int(epoch)), xp.arange(self.num_examples))
        return xp.argsort(keys)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[Any, Any]]:
        """The batches of epoch ``epoch``, from batch number ``start`` on (to resume mid-epoch)."""
        if not isinstance(start, (int, np.integer)) or isinstance(start, bool) or not 0 <= start <= len(self):
            raise ValueError(f"start: expected a batch index in [0, {len(self)}], got {start!r}")
        batches = self._batches(self.order(epoch), int(start))
        return batches if self.transform is None else self._transformed(batches, int(epoch), int(start))

    def _transformed(self, batches, epoch: int, start: int) -> Iterator[tuple[Any, Any]]:
        for step, (xb, yb) in enumerate(batches, start):
            yield self.transform(xb, seed=self.seed, epoch=epoch, step=step), yb

    def _batches(self, idx, start: int) -> Iterator[tuple[Any, Any]]:
        n, b = self.num_examples, self.batch_size
        stop = (n // b) * b if self.drop_last else n
        for first in range(start * b, stop, b):
            if idx is None:
                yield self.x[first : first + b], self.y[first : first + b]
            else:
                sel = idx[first : first + b]
                yield self.x[sel], self.y[sel]

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self.epoch(0)
