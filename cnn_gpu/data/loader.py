"""In-memory datasets, normalisation and the batch iterator.

The arrays live on one backend (uploaded once); shuffling happens on that backend too, so
on the GPU an epoch never copies data from the host. Epoch ``e``'s order depends only on
(seed, e) -- it is the argsort of counter-based random keys (functional/counter_rng.py), the
same order on NumPy and CuPy -- which makes a resumed run see the same batches as an
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..backend import get_array_module
from ..functional import counter_rng
from .normalization import normalize, normalizer  # noqa: F401  (cnn_gpu.data.loader.normalize: re-exported)
from .prefetch import HostImages, gather

STATS_CHUNK_BYTES = 32 * 2**20  # channel_stats reads this many float64 bytes of images at a time


def channel_stats(x: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``x / scale`` over (N, H, W), in float64, for (N, C, H, W) x.

    Read in chunks of rows (STATS_CHUNK_BYTES as float64), so a memory-mapped x is never loaded
    whole; the chunks' means and squared deviations are merged exactly as Chan et al.'s parallel
    variance (stable: no sum of squares minus square of sums)."""
    if x.ndim != 4:
        raise ValueError(f"x: expected images (N, C, H, W), got shape {tuple(x.shape)}")
    n_img, c = int(x.shape[0]), int(x.shape[1])
    per_row = max(1, int(np.prod(x.shape[1:])) * 8)
    rows = max(1, STATS_CHUNK_BYTES // per_row)
    count, mean, m2 = 0, np.zeros(c), np.zeros(c)
    for first in range(0, n_img, rows):
        chunk = np.asarray(x[first : first + rows], dtype=np.float64) / scale  # (n, C, H, W)
        k = chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
        if k == 0:
            continue
        c_mean = chunk.mean(axis=(0, 2, 3))
        c_m2 = ((chunk - c_mean.reshape(1, -1, 1, 1)) ** 2).sum(axis=(0, 2, 3))
        total = count + k
        delta = c_mean - mean
        mean = mean + delta * (k / total)
        m2 = m2 + c_m2 + delta**2 * (count * k / total)
        count = total
    if count == 0:
        nan = np.full(c, np.nan)
        return nan, nan
    std = np.sqrt(m2 / count)
    return mean, np.where(std > 0, std, 1.0)


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
    """Mini-batches of (x, y) arrays already on their backend; or of host data: a ``np.memmap`` x
    (each batch's rows read in file order), or a :class:`cnn_gpu.data.HostImages` x with NumPy
    labels (each batch gathered, uploaded one batch ahead and normalised: data/prefetch.py).

    ``for xb, yb in loader.epoch(e)`` yields the batches of epoch ``e``; the order is a
    permutation drawn from (seed, e) when ``shuffle`` (on the arrays' backend). ``transform``
    (e.g. cnn_gpu.data.augment.Compose) is applied to each batch's x as
    ``transform(xb, seed=seed, epoch=e, step=batch number)``: a pure function of those, so a
    resumed epoch sees the same batches.
    """

    def __init__(
        self,
        x: Any,
        y: Any,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        transform: Any = None,
    ):
        if not hasattr(x, "shape") or not hasattr(y, "shape"):
            raise TypeError(f"x, y: expected arrays, got {type(x).__name__} and {type(y).__name__}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"y: expected {x.shape[0]} labels to match x of shape {tuple(x.shape)}, got shape {tuple(y.shape)}")
        if get_array_module(x) is not get_array_module(y):
            raise TypeError("x, y: expected both on the same backend")
        if isinstance(x, HostImages) and not isinstance(y, np.ndarray):
            raise TypeError(f"y: a HostImages x takes its labels on the host (a NumPy array), got {type(y).__name__}")
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
        firsts = range(start * b, stop, b)
        if isinstance(self.x, HostImages):  # host data: gathered, uploaded one batch ahead, normalised
            sels = (slice(f, f + b) if idx is None else idx[f : f + b] for f in firsts)
            yield from self.x.batches(self.y, sels)
            return
        mapped = isinstance(self.x, np.memmap)
        for first in firsts:
            if idx is None:
                xb = self.x[first : first + b]
                yield (np.asarray(xb) if mapped else xb), self.y[first : first + b]
            else:
                sel = idx[first : first + b]
                yield (gather(self.x, sel) if mapped else self.x[sel]), self.y[sel]

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self.epoch(0)
