"""Per-step scalars in device memory, for the kernels a CUDA graph replays step after step.

A CUDA graph freezes every launch argument at capture, so a value that changes from step to step
must reach its kernel through device memory. Four kernels can take such values from a small
device array instead of their scalar arguments (kernels/optim.cu, dropout.cu, augment.cu: a
pointer and a flag); their wrappers in cuda/ops.py take it as ``device_scalars=`` (None: the
arguments, as eagerly). Each array's layout (LAYOUTS):

    op                dtype    values
    sgd_update_       float64  (lr,)
    adam_update_      float64  (step_size = lr / bc1, bc2, decay = 1 - lr * weight_decay)   adam_scalars()
    dropout_forward   int64    (key,)                  the 64-bit key's bits
    crop_flip         int64    (crop_key, flip_key)

The float64 values are the host's double-precision ones; the kernel rounds them to the data's type
as the host rounds a launch argument (round to nearest), so both ways give the same bits.

:class:`DeviceScalars` owns one such array, at a fixed address for its life (a graph may hold
it). ``upload(values)`` writes the values into pinned host memory and copies them with one
``ndarray.set(host, stream=current stream)``: CuPy's ``set`` is ``copy_from_host_async``
(cudaMemcpyAsync) on that stream, and from pinned memory such a copy is fully asynchronous (CUDA,
"API synchronization behavior"), so the host does not wait; stream order puts it after the work
already queued and before the launches that read it. A copy reads its pinned block when it runs,
so each block is kept until an event recorded behind its copy is done (a query, never a wait)
before CuPy's pinned pool may hand it out again.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from ..backend import is_cupy_array
from ..functional import _dispatch
from .build import get_launcher

#: op -> (dtype, names of the values): the layout of each kernel's device scalars
LAYOUTS = {
    "sgd_update_": (np.dtype(np.float64), ("lr",)),
    "adam_update_": (np.dtype(np.float64), ("step_size", "bc2", "decay")),
    "dropout_forward": (np.dtype(np.int64), ("key",)),
    "crop_flip": (np.dtype(np.int64), ("crop_key", "flip_key")),
}

_placeholders: dict = {}  # (array type, device id, dtype) -> a one-element array the kernels never read


def adam_scalars(lr: float, weight_decay: float, bc1: float, bc2: float) -> tuple[float, float, float]:
    """Adam's per-step scalars in double precision: (step_size, bc2, decay) = (lr / bc1, bc2,
    1 - lr * weight_decay), the launch arguments of adam_update and its device scalars alike."""
    return lr / bc1, bc2, 1.0 - lr * weight_decay


def _device_id(a: Any):
    return getattr(getattr(a, "device", None), "id", None)


def kernel_args(op: str, like: Any, device_scalars: Any) -> tuple:
    """The kernel's last two arguments for ``op``: (``device_scalars``, 1) once checked against
    LAYOUTS (an array of ``like``'s kind), or (an unread one-element placeholder, 0) for None."""
    dtype, names = LAYOUTS[op]
    if device_scalars is None:
        key = (type(like), _device_id(like), dtype)
        if key not in _placeholders:  # allocated once (per array kind, device and dtype), never read
            _placeholders[key] = get_launcher().empty((1,), dtype)
        return _placeholders[key], np.int32(0)
    got = f"{type(device_scalars).__module__}.{type(device_scalars).__name__}"
    if type(device_scalars) is not type(like):
        raise TypeError(f"device_scalars: expected a {type(like).__module__} array like the data, got {got}")
    shape, dt = tuple(device_scalars.shape), device_scalars.dtype
    if dt != dtype or shape != (len(names),) or not device_scalars.flags.c_contiguous:
        raise ValueError(
            f"device_scalars: expected a contiguous {dtype} array of shape ({len(names)},) holding "
            f"({', '.join(names)}), got {dt} of shape {shape}"
        )
    return device_scalars, np.int32(1)


def takes_device_scalars(fn: Any, x: Any) -> bool:
    """Whether engine function ``fn`` takes ``device_scalars=`` for array ``x``: the CUDA engine's
    wrappers on CuPy arrays (the reference and CPU engines, and NumPy arrays, take the values)."""
    return is_cupy_array(x) and _dispatch.takes(fn, "device_scalars")


class DeviceScalars:
    """One kernel's per-step scalars on the device (``op``'s layout in LAYOUTS), uploaded with one
    asynchronous copy per :meth:`upload`; ``xp`` is cupy (the module of the data)."""

    def __init__(self, xp: Any, op: str):
        self.xp = xp
        dtype, names = LAYOUTS[op]
        self.array = xp.zeros(len(names), dtype=dtype)  # its address stays: a graph may hold it
        self._in_flight: collections.deque = collections.deque()  # (event, pinned block) per copy

    def upload(self, values) -> Any:
        """Copy ``values`` (floats, or for int64 arrays ints in [0, 2**64): their bits) to the
        device array, asynchronously on the current stream; returns the device array."""
        cuda = self.xp.cuda
        while self._in_flight and self._in_flight[0][0].done:  # copies that ran: their blocks go back
            self._in_flight.popleft()
        a = self.array
        block = cuda.alloc_pinned_memory(a.nbytes)  # from CuPy's pinned pool (reused: no cudaHostAlloc)
        host = np.ndarray(a.shape, a.dtype, buffer=block)
        if a.dtype == np.int64:
            host.view(np.uint64)[...] = np.array(values, dtype=np.uint64)  # a key's 64 bits, as a signed word
        else:
            host[...] = values
        stream = cuda.get_current_stream()
        a.set(host, stream=stream)  # cudaMemcpyAsync from pinned memory: no host sync
        done = cuda.Event(disable_timing=True)
        done.record(stream)
        self._in_flight.append((done, block))
        return a


__all__ = ["LAYOUTS", "adam_scalars", "kernel_args", "takes_device_scalars", "DeviceScalars"]
