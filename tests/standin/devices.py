"""The stand-in's machine: which GPUs this process sees, which is current, and a trace of what
touched which GPU (selected, a kernel or cuBLAS launch, an allocation), as CUDA would see it.

Like ``CUDA_VISIBLE_DEVICES``, ``visible`` lists the physical GPUs the process sees, in order:
``Device(i)`` is ``visible[i]``; each physical GPU has its own PCI bus id. cudaSetDevice
(``Device(i).use()``) with ``i`` outside ``[0, len(visible))`` fails as CUDA does
(cudaErrorInvalidDevice). A fresh process starts on device 0 (CUDA's default), so a launch or an
allocation before any selection lands there: the trace shows it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator


class CUDARuntimeError(RuntimeError):
    """As cupy_backends.cuda.api.runtime.CUDARuntimeError (its message format)."""

    __module__ = "cupy_backends.cuda.api.runtime"


@dataclasses.dataclass
class Machine:
    visible: tuple = (0,)  # physical GPU ids, in the order this process sees them
    current: int = 0  # index into visible
    trace: list = dataclasses.field(default_factory=list)  # (what, physical GPU) in order, repeats merged
    memory: int | None = None  # each GPU's memory in bytes when a test sets it (device_memory), else untracked
    in_use: int = 0  # bytes of live device buffers while ``memory`` is set (all GPUs together)
    peak: int = 0  # the most ``in_use`` has been within device_memory

    def physical(self, index: int) -> int:
        if not 0 <= int(index) < len(self.visible):
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        return self.visible[int(index)]

    def touch(self, what: str) -> None:
        """Record that ``what`` ("select", "launch", "alloc") happened on the current GPU."""
        entry = (what, self.visible[self.current]) if self.visible else (what, None)
        if not self.trace or self.trace[-1] != entry:
            self.trace.append(entry)


_machine = [Machine()]


def machine() -> Machine:
    return _machine[0]


def pci_bus_id(physical: int) -> str:
    return f"0000:{0x18 + physical:02X}:00.0"


@contextlib.contextmanager
def visible(*physical: int) -> Iterator[Machine]:
    """Within the block this process sees the physical GPUs ``physical`` (none: a machine with no
    GPU), starts on device 0 and traces what touches each."""
    before = _machine[0]
    _machine[0] = Machine(visible=tuple(int(p) for p in physical))
    try:
        yield _machine[0]
    finally:
        _machine[0] = before


DEFAULT_MEMORY = 80 * 2**30  # what the stand-in GPU reports without device_memory (totalGlobalMem)


def total_memory() -> int:
    """The current GPU's memory (totalGlobalMem, mem_info's total)."""
    m = machine()
    return DEFAULT_MEMORY if m.memory is None else m.memory


@contextlib.contextmanager
def device_memory(nbytes: int) -> Iterator[Machine]:
    """Within the block the GPU has ``nbytes`` of memory: Device.mem_info, runtime.memGetInfo and
    getDeviceProperties report it (free = nbytes minus the live device buffers made in the block),
    and an allocation past it raises cupy.cuda.memory.OutOfMemoryError, as cudaMalloc failing
    under CuPy's allocator does (tests/standin/memory.py). Buffers are charged at their size rounded
    to 512 bytes, from creation until freed; a MemoryPool's cached free blocks are not counted."""
    m = machine()
    before = (m.memory, m.in_use, m.peak)
    m.memory, m.in_use, m.peak = int(nbytes), 0, 0
    try:
        yield m
    finally:
        m.memory, m.in_use, m.peak = before


__all__ = ["Machine", "machine", "visible", "pci_bus_id", "CUDARuntimeError", "device_memory", "total_memory", "DEFAULT_MEMORY"]
