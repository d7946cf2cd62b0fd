"""Data kept on the host, fed to the device one batch ahead.

A training run's data is uploaded to the GPU once, normalised, when it fits the device budget
(:func:`fits_device`: the normalised float32 splits take under the ``device_data`` fraction of the
device's free memory, ``CNN_GPU_DEVICE_DATA``, default 0.5). Larger data stays on the host as it
is (uint8 images, an ndarray or a read-only ``np.memmap``) in a :class:`HostImages`: each batch's
rows are gathered on the host, uploaded raw (uint8: a quarter of float32's bytes) and normalised
on the device. On NumPy the "upload" is nothing: the batch is gathered and normalised.

On CuPy the next batch is uploaded while this one trains (:class:`_Prefetcher`):

- the rows are gathered into a block of pinned (page-locked) host memory
  (``cupy.cuda.alloc_pinned_memory``), from which a copy runs asynchronously;
- the copy (``ndarray.set(host, stream=side)``, cudaMemcpyAsync) runs on a side stream made with
  ``non_blocking=True``, into one of two device buffers (double buffering), and an event is
  recorded behind it;
- the compute stream waits for that event (``stream.wait_event``: the device waits, not the host)
  before it normalises the batch into a fresh array and copies the labels out; an event recorded
  behind that lets the side stream overwrite the buffer two batches later (``wait_event`` again);
- a pinned block is kept until the event behind its copy is done, checked with a query
  (``Event.done``), never a wait, before CuPy's pinned pool may hand it out again.

So a step costs no host synchronisation; the host only gathers rows (sorted first, so a memmap
is read in file order) while the device trains on the previous batch.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import config
from ..backend import get_array_module, to_numpy
from .normalization import normalizer


def gather(x: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x[idx]`` for a host array (an ndarray or np.memmap) and host indices: the rows are read
    in sorted order (sequential reads of a memmap) and put back in ``idx``'s order."""
    idx = np.asarray(idx)
    if out is None:
        out = np.empty((idx.shape[0], *x.shape[1:]), dtype=x.dtype)
    if idx.shape[0] == 0:
        return out
    order = np.argsort(idx, kind="stable")
    out[order] = x[idx[order]]  # (n, ...) read in file order
    return out


class RowSubset:
    """Rows ``rows`` (increasing) of a host array, not copied: a split of a memory-mapped array
    (``x[a:b]`` and ``x[idx]`` read those rows; ``shape``/``dtype``/``ndim`` as an array's)."""

    def __init__(self, base: Any, rows: np.ndarray):
        self.base, self.rows = base, np.asarray(rows, dtype=np.int64)
        self.dtype, self.ndim = base.dtype, base.ndim

    @property
    def shape(self) -> tuple:
        return (int(self.rows.shape[0]), *self.base.shape[1:])

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.base[self.rows[key]]
        return gather(self.base, self.rows[np.asarray(key)])


def normalized_nbytes(*xs: Any) -> int:
    """Bytes the arrays take once normalised (float32)."""
    return sum(int(np.prod(x.shape)) * 4 for x in xs if x is not None)


def fits_device(nbytes: int, xp: Any) -> bool:
    """Whether ``nbytes`` of data may live on ``xp``'s device: under the ``device_data`` fraction of
    the device's free memory (``cudaMemGetInfo``; blocks CuPy's pool holds free are not counted, so
    the test errs towards streaming). On NumPy, data fits unless it is memory-mapped (the caller's test)."""
    if xp is np:
        return True
    free, _ = xp.cuda.runtime.memGetInfo()
    return nbytes <= config.get().device_data * free


class HostImages:
    """A split's images kept on the host (``host``: NCHW ndarray or np.memmap, unnormalised), with
    the normalisation ``(x / scale - mean) / std`` and the backend ``xp`` its batches go to.

    ``x[idx]`` (host or device indices) gathers, uploads and normalises those rows (a device
    array of ``dtype``); ``x[a:b]`` is a HostImages of those rows (nothing read). A DataLoader
    over a HostImages prefetches its batches (module docs); ``cnn_gpu.train.fit`` and
    ``evaluate`` take one where they take x."""

    def __init__(self, host: Any, mean, std, scale: float, xp: Any = np, dtype=np.float32):
        if getattr(host, "ndim", None) != 4:
            raise ValueError(f"host: expected images (N, C, H, W), got shape {getattr(host, 'shape', None)}")
        if not isinstance(host, RowSubset) and get_array_module(host) is not np:
            raise TypeError("host: expected a NumPy array or np.memmap (data kept on the host)")
        self.host, self.scale, self.xp = host, float(scale), xp
        self.mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        self.std = np.asarray(std, dtype=np.float64).reshape(-1)
        self.dtype = np.dtype(dtype)
        self._normalize = None  # made at the first batch (on self.xp)
        if self.mean.shape[0] != host.shape[1] or self.std.shape[0] != host.shape[1]:
            raise ValueError(
                f"mean, std: expected {host.shape[1]} values each (one per channel), got "
                f"{self.mean.shape[0]} and {self.std.shape[0]}"
            )

    @property
    def shape(self) -> tuple:
        return tuple(self.host.shape)

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return int(self.host.shape[0])

    def __repr__(self) -> str:
        kind = type(self.host).__name__
        return f"HostImages({kind} {self.host.dtype} {self.shape} -> {self.xp.__name__} {self.dtype})"

    def __getitem__(self, key):
        if isinstance(key, slice):
            host = self.host
            part = RowSubset(host.base, host.rows[key]) if isinstance(host, RowSubset) else host[key]
            return HostImages(part, self.mean, self.std, self.scale, self.xp, self.dtype)
        rows = gather(self.host, to_numpy(key).astype(np.int64, copy=False).reshape(-1))
        return self.prepare(self.xp.asarray(rows))

    def prepare(self, xb):
        """A raw batch on the device -> normalised (cnn_gpu.data.normalize's arithmetic, its
        per-channel constants uploaded once)."""
        if self._normalize is None:
            self._normalize = normalizer(self.xp, self.mean, self.std, self.scale, self.dtype)
        return self._normalize(xb)

    def batches(self, y: np.ndarray, selections: Iterator[Any]) -> Iterator[tuple[Any, Any]]:
        """(x, y) on the device for each selection (an index array, or a slice of the rows)."""
        if self.xp is np:
            return self._host_batches(y, selections)
        return _Prefetcher(self, y).run(selections)

    def _host_batches(self, y, selections):
        for sel in selections:
            if isinstance(sel, slice):
                yield self.prepare(np.asarray(self.host[sel])), y[sel]
            else:
                sel = np.asarray(sel)
                yield self.prepare(gather(self.host, sel)), y[sel]


class _Slot:
    """One of the two device buffers a batch is uploaded into, with the events that order its use."""

    def __init__(self, xp, x_shape: tuple, x_dtype, n: int):
        self.x = xp.empty(x_shape, dtype=x_dtype)  # (B, C, H, W) raw
        self.y = xp.empty((n,), dtype=np.int64)
        self.uploaded = None  # recorded on the side stream behind this slot's copy
        self.consumed = None  # recorded on the compute stream behind the reads of this slot
        self.rows = 0


class _Prefetcher:
    """Uploads batch i + 1 on a side stream while batch i trains (see the module docs)."""

    SLOTS = 2

    def __init__(self, data: HostImages, y: np.ndarray):
        self.data, self.y = data, np.asarray(y)
        self.cuda = data.xp.cuda
        self.side = self.cuda.Stream(non_blocking=True)
        self.slots: list[_Slot] = []
        self.in_flight: collections.deque = collections.deque()  # (event, pinned block) per copy

    def run(self, selections) -> Iterator[tuple[Any, Any]]:
        pending: collections.deque = collections.deque()
        it = iter(selections)
        try:
            for sel in it:  # prime: the first SLOTS batches in flight
                pending.append(self._issue(sel, len(pending)))
                if len(pending) == self.SLOTS:
                    break
            k = 0
            while pending:
                slot = pending.popleft()
                yield self._consume(slot)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(self._issue(nxt, k % self.SLOTS))  # batch k + SLOTS: the slot batch k used
                k += 1
        finally:  # stopped early too: the compute stream's later work (and its reuse of the buffers) waits for the copies
            compute = self.cuda.get_current_stream()
            for slot in self.slots:
                if slot.uploaded is not None:
                    compute.wait_event(slot.uploaded)

    def _slot(self, i: int, rows: int) -> _Slot:
        while len(self.slots) <= i:
            shape = (rows, *self.data.host.shape[1:])
            self.slots.append(_Slot(self.data.xp, shape, self.data.host.dtype, rows))
        slot = self.slots[i]
        if slot.x.shape[0] < rows:  # a larger batch than the first (not in a DataLoader's epoch)
            self.slots[i] = slot = _Slot(self.data.xp, (rows, *self.data.host.shape[1:]), self.data.host.dtype, rows)
        return slot

    def _pinned(self, rows: int) -> tuple[np.ndarray, np.ndarray, Any]:
        """Pinned host views (x rows, labels) for ``rows`` examples, from CuPy's pinned pool."""
        while self.in_flight and self.in_flight[0][0].done:  # copies that ran: their blocks go back
            self.in_flight.popleft()
        host = self.data.host
        x_bytes = rows * int(np.prod(host.shape[1:])) * host.dtype.itemsize
        off = -(-x_bytes // 8) * 8
        block = self.cuda.alloc_pinned_memory(off + rows * 8)
        px = np.ndarray((rows, *host.shape[1:]), host.dtype, buffer=block)
        py = np.ndarray((rows,), np.int64, buffer=block, offset=off)
        return px, py, block

    def _issue(self, sel, i: int) -> _Slot:
        """Gather batch ``sel`` into pinned memory and start its copy into slot ``i`` on the side stream."""
        if isinstance(sel, slice):
            idx = np.arange(*sel.indices(self.y.shape[0]))
        else:
            idx = to_numpy(sel).astype(np.int64, copy=False)
        rows = int(idx.shape[0])
        slot = self._slot(i, rows)
        px, py, block = self._pinned(rows)
        gather(self.data.host, idx, out=px)
        py[...] = self.y[idx]
        with self.side:
            if slot.consumed is not None:  # the device waits until the batch before has been read
                self.side.wait_event(slot.consumed)
            slot.x[:rows].set(px, stream=self.side)
            slot.y[:rows].set(py, stream=self.side)
            done = self.cuda.Event(disable_timing=True)
            done.record(self.side)
        slot.uploaded, slot.rows = done, rows
        self.in_flight.append((done, block))
        return slot

    def _consume(self, slot: _Slot) -> tuple[Any, Any]:
        """On the compute stream: wait for the slot's copy, normalise into a new array, copy the labels out."""
        compute = self.cuda.get_current_stream()
        compute.wait_event(slot.uploaded)
        xb = self.data.prepare(slot.x[: slot.rows])
        yb = slot.y[: slot.rows].copy()
        consumed = self.cuda.Event(disable_timing=True)
        consumed.record(compute)
        slot.consumed = consumed
        return xb, yb


def resident(xs: list, xp: Any) -> bool:
    """Whether host splits ``xs`` go to ``xp``'s device whole (normalised once) rather than batch by
    batch: never when one is memory-mapped (np.memmap or RowSubset); on NumPy otherwise yes; on
    CuPy when their raw and normalised bytes pass :func:`fits_device`."""
    if any(isinstance(x, (np.memmap, RowSubset)) for x in xs):
        return False
    if xp is np:
        return True
    return fits_device(normalized_nbytes(*xs) + sum(int(x.nbytes) for x in xs), xp)


def place(x: Any, y: Any, mean, std, scale: float, xp: Any, dtype=np.float32, whole: bool | None = None):
    """(x, y) to train or evaluate on with ``xp``: normalised on the device once (``whole``), or a
    :class:`HostImages` and host labels whose batches stream (``whole=False``); ``whole=None``
    decides by :func:`resident`. ``evaluate(model, *place(...))`` works either way."""
    if whole is None:
        whole = resident([x], xp)
    if whole:
        return normalizer(xp, mean, std, scale, dtype)(xp.asarray(x)), xp.asarray(y)
    return HostImages(x, mean, std, scale, xp, dtype), np.asarray(y)


def backend_of(x: Any):
    """The array module a batch of ``x`` lives on: a HostImages' target, else x's own."""
    return x.xp if isinstance(x, HostImages) else get_array_module(x)


__all__ = ["HostImages", "RowSubset", "gather", "place", "resident", "fits_device", "normalized_nbytes", "backend_of"]
