"""Device memory allocators in the stand-in, as cupy/cuda/memory.pyx has them: ``MemoryPool``,
``using_allocator``, ``set_allocator``, ``get_allocator``.

Every device buffer the stand-in makes (tests/standin/array.py, module.py) goes through
:func:`allocated`: it is counted, and when an allocator other than the default is in use
(``with cupy.cuda.using_allocator(pool.malloc):``, thread-local, or ``set_allocator``) that
allocator is called with the buffer's size, as CuPy's ``memory.alloc`` does for each ndarray, and
the buffer is charged to what it returned until the buffer is freed. So a test can ask which pool
an array's memory came from (:func:`pool_of`) and what a pool holds (``used_bytes``...).

A MemoryPool rounds each request up to 512 bytes (``ALLOCATION_UNIT_SIZE``: cudaMalloc's
alignment), serves it from the smallest free block that fits (splitting it) or grows by a new
block (a cudaMalloc), and gets the block back, free, when the memory is freed. ``free_all_blocks``
releases the free blocks. Addresses are the NumPy buffers' (``a.data.ptr``), not the pool's.

One difference from CuPy: a buffer that a CUDA graph's recorded work uses stays allocated while
the graph lives (the stand-in's graph holds it); in CuPy it returns to its pool when its ndarray
is freed, though the graph still writes it, which is why capture should allocate from a pool of
its own.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
import weakref

import numpy as np

from . import devices, graph
from .counters import current

ALLOCATION_UNIT_SIZE = 512  # memory.pyx: cudaMalloc() is aligned to at least 512 bytes
_DEVICE_BYTES = devices.DEFAULT_MEMORY  # the stand-in GPU's totalGlobalMem (module._runtime)
_addresses = itertools.count(1)


class OutOfMemoryError(MemoryError):
    """cupy.cuda.memory.OutOfMemoryError (its message)."""

    __module__ = "cupy.cuda.memory"

    def __init__(self, size, total, limit=0):
        msg = f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes"
        msg += f", limit set to: {limit:,} bytes)." if limit else ")."
        super().__init__(msg)


class _Memory:
    """A block of device memory (CuPy's PooledMemory, or Memory for the raw allocator)."""

    def __init__(self, size: int, pool: MemoryPool | None):
        self.size, self.device_id = size, devices.machine().current
        self.ptr = 0x7D0000000000 + (next(_addresses) << 32) if size else 0  # a fake device address
        self.pool = weakref.ref(pool) if pool is not None else None


class MemoryPointer:
    """cupy.cuda.MemoryPointer: ``ptr``, ``mem``, ``device_id``."""

    __module__ = "cupy.cuda.memory"

    def __init__(self, mem, offset):
        self.mem, self.ptr, self.device_id = mem, mem.ptr + int(offset), mem.device_id

    def __int__(self):
        return self.ptr

    @property
    def device(self):
        from .module import Device  # noqa: PLC0415

        return Device(self.device_id)


def _round(size: int) -> int:
    return -(-size // ALLOCATION_UNIT_SIZE) * ALLOCATION_UNIT_SIZE


def _give_back(pool_ref, size: int) -> None:
    pool = pool_ref()
    if pool is not None:
        pool._used -= size
        pool._free.append(size)


class MemoryPool:
    """cupy.cuda.MemoryPool (see the module docstring): ``malloc(size)`` gives a MemoryPointer whose
    block returns to the pool when the pointer (or the array charged to it) is freed."""

    __module__ = "cupy.cuda.memory"

    def __init__(self, allocator=None):
        if allocator is not None:
            raise graph._gap("MemoryPool(allocator=...) (another base allocator) is not simulated")
        self._free: list[int] = []  # the sizes of the free blocks
        self._total = self._used = self._limit = 0
        self._lock = threading.Lock()

    def malloc(self, size):
        size = int(size)
        if size < 0:
            raise OverflowError("can't convert negative value to size_t")
        if size == 0:
            return MemoryPointer(_Memory(0, None), 0)
        rounded = _round(size)
        with self._lock:
            if not self._take(rounded):
                if self._limit and self._total + rounded > self._limit:
                    self._release_free()  # CuPy frees the free blocks and retries before giving up
                    if self._total + rounded > self._limit:
                        raise OutOfMemoryError(rounded, self._total, self._limit)
                self._total += rounded
            self._used += rounded
        mem = _Memory(rounded, self)
        weakref.finalize(mem, _give_back, weakref.ref(self), rounded)
        return MemoryPointer(mem, 0)

    def _take(self, rounded: int) -> bool:
        """Serve ``rounded`` bytes from the smallest free block that fits (the rest stays free)."""
        fits = [b for b in self._free if b >= rounded]
        if not fits:
            return False
        block = min(fits)
        self._free.remove(block)
        if block > rounded:
            self._free.append(block - rounded)
        return True

    def _release_free(self) -> None:
        self._total -= sum(self._free)
        self._free.clear()

    def free_all_blocks(self, stream=None):
        with self._lock:
            self._release_free()

    def free_all_free(self):
        warnings.warn("free_all_free is deprecated. Use free_all_blocks instead.", DeprecationWarning, stacklevel=2)
        self.free_all_blocks()

    def n_free_blocks(self):
        return len(self._free)

    def used_bytes(self):
        return self._used

    def free_bytes(self):
        return self._total - self._used

    def total_bytes(self):
        return self._total

    def set_limit(self, size=None, fraction=None):
        if size is not None and fraction is not None:
            raise ValueError("size and fraction cannot be specified at one time")
        if fraction is not None:
            if not 0 <= fraction <= 1:
                raise ValueError(f"memory limit fraction out of range: {fraction}")
            size = int(_DEVICE_BYTES * fraction)
        self._limit = 0 if size is None else int(size)

    def get_limit(self):
        return self._limit


# ------------------------------------------------------------------ the current allocator
class _Local(threading.local):
    allocator = None  # using_allocator's, None outside one


_tls = _Local()
_global = [None]  # set_allocator's; None: the stand-in's default (no pool is charged)
_owners: dict[int, tuple] = {}  # id(buffer) -> (weakref to it, the MemoryPointer it is charged to)


def _default_malloc(size):
    """The stand-in's default allocator: plain device memory (CuPy's default is a MemoryPool)."""
    return MemoryPointer(_Memory(_round(int(size)) if size else 0, None), 0)


def get_allocator():
    """cupy.cuda.get_allocator: ``using_allocator``'s, else ``set_allocator``'s, else the default."""
    return _tls.allocator or _global[0] or _default_malloc


def set_allocator(allocator=None):
    """cupy.cuda.set_allocator (None: the default); refused inside ``using_allocator``, as CuPy does."""
    if _tls.allocator is not None:
        raise ValueError("Can't change the global allocator inside `using_allocator` context manager")
    _global[0] = allocator


@contextlib.contextmanager
def using_allocator(allocator=None):
    """cupy.cuda.using_allocator: ``allocator`` (None: the raw one, no pool) for this thread's
    allocations inside the block."""
    previous = _tls.allocator
    _tls.allocator = _default_malloc if allocator is None else allocator
    try:
        yield
    finally:
        _tls.allocator = previous


def reset() -> None:
    _global[0] = None
    _tls.allocator = None
    _default_pool[0] = None


_default_pool: list = [None]


def get_default_memory_pool():
    """cupy.get_default_memory_pool: the process's pool (the stand-in's default allocator does not
    draw from it: its buffers are plain device memory; ``free_all_blocks`` is a no-op for them)."""
    if _default_pool[0] is None:
        _default_pool[0] = MemoryPool()
    return _default_pool[0]


def _pool(memptr):
    ref = getattr(getattr(memptr, "mem", None), "pool", None)
    return ref() if ref is not None else None


def _forget(key: int, ref) -> None:
    if _owners.get(key, (None,))[0] is ref:
        del _owners[key]


def _charge_device(buf: np.ndarray) -> None:
    """Charge ``buf`` to the GPU's memory while devices.device_memory sets one: OutOfMemoryError
    (CuPy's, its message) past it; given back when ``buf`` is freed."""
    m = devices.machine()
    if m.memory is None:
        return
    size = _round(buf.nbytes)
    if m.in_use + size > m.memory:
        raise OutOfMemoryError(size, m.in_use)
    m.in_use += size
    m.peak = max(m.peak, m.in_use)
    weakref.finalize(buf, _uncharge, m, size)


def _uncharge(m, size: int) -> None:
    if m.memory is not None:
        m.in_use = max(0, m.in_use - size)


def allocated(buf: np.ndarray) -> np.ndarray:
    """A new device buffer: counted, charged to the current allocator (unless the default) for as
    long as it lives, and noted against the current stream's capture. Returns ``buf``."""
    _charge_device(buf)
    current().alloc(buf.nbytes)
    allocator = get_allocator()
    pool = None
    if allocator is not _default_malloc:
        memptr = allocator(buf.nbytes)
        pool = _pool(memptr)
        key = id(buf)
        ref = weakref.ref(buf, lambda r, k=key: _forget(k, r))
        _owners[key] = (ref, memptr)
    graph.note_allocation(buf.nbytes, pool)
    return buf


def pool_of(array):
    """The MemoryPool the memory of ``array`` (a stand-in array or its NumPy buffer) was charged
    to, or None (the default allocator). For tests: CuPy has no such query."""
    a = getattr(array, "_a", array)
    while isinstance(a, np.ndarray):
        entry = _owners.get(id(a))
        if entry is not None and entry[0]() is a:
            return _pool(entry[1])
        a = a.base
    return None


__all__ = [
    "MemoryPool",
    "MemoryPointer",
    "OutOfMemoryError",
    "using_allocator",
    "set_allocator",
    "get_allocator",
    "get_default_memory_pool",
    "allocated",
    "pool_of",
    "reset",
    "ALLOCATION_UNIT_SIZE",
]
