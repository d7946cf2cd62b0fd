"""GPU memory: what the device has, its out-of-memory error recognised, and the largest batch
size that fits (``cnn-gpu train --batch-size auto``).

CuPy raises ``cupy.cuda.memory.OutOfMemoryError`` when an allocation fails (its pool has already
released its cached blocks and retried). :func:`largest_fitting_batch` tries a training step at
batch sizes from a power of two down, halving after each such error, and returns the first that
runs; a trial allocates what a real step would (the caller's ``try_batch``), so the answer holds
for the model, optimizer and data the caller puts in it. Nothing here imports CuPy: the error's
class is looked up in the ``cupy`` module already imported (the stand-in's, in tests).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any

AUTO_MAX_BATCH = 4096  # --batch-size auto tries no larger batch (nor more than the training examples)


def out_of_memory_type() -> type | None:
    """``cupy.cuda.memory.OutOfMemoryError`` if CuPy has been imported, else None."""
    cupy = sys.modules.get("cupy")
    memory = getattr(getattr(cupy, "cuda", None), "memory", None)
    return getattr(memory, "OutOfMemoryError", None)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is CuPy's out-of-memory error."""
    oom = out_of_memory_type()
    return oom is not None and isinstance(exc, oom)


def release_cached(xp: Any) -> None:
    """Give the blocks CuPy's default pool holds free back to the device (nothing on NumPy)."""
    pool = getattr(xp, "get_default_memory_pool", None)
    if pool is not None:
        pool().free_all_blocks()


def device_memory(xp: Any) -> tuple[int, int] | None:
    """(free, total) bytes of the current GPU (cudaMemGetInfo), None on NumPy."""
    if not hasattr(xp, "cuda"):
        return None
    free, total = xp.cuda.Device().mem_info
    return int(free), int(total)


def device_name(xp: Any) -> str:
    """ "GPU <id> (<name>)" of the current GPU, for messages."""
    dev = xp.cuda.Device()
    name = xp.cuda.runtime.getDeviceProperties(dev.id)["name"]
    return f"GPU {dev.id} ({name.decode() if isinstance(name, bytes) else name})"


def gib(nbytes: int) -> str:
    """A memory size for messages: GiB (two decimals) from 1 GiB on, else MiB."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def largest_fitting_batch(try_batch: Callable[[int], None], start: int, xp: Any) -> int | None:
    """The largest power of two ``b <= start`` for which ``try_batch(b)`` runs without CuPy's
    out-of-memory error (b = the largest power of two <= start, then halving); None if not even
    1 fits. Other errors propagate. The pool's cached blocks are released after every trial."""
    if start < 1:
        raise ValueError(f"start: expected a positive batch size, got {start!r}")
    b = 1 << (int(start).bit_length() - 1)
    while b >= 1:
        try:
            try_batch(b)
            return b
        except Exception as exc:  # noqa: BLE001 (only the out-of-memory error is handled)
            if not is_out_of_memory(exc):
                raise
            traceback.clear_frames(exc.__traceback__)  # its frames hold the trial's arrays
        finally:
            release_cached(xp)
        b //= 2
    return None


__all__ = [
    "AUTO_MAX_BATCH",
    "out_of_memory_type",
    "is_out_of_memory",
    "release_cached",
    "device_memory",
    "device_name",
    "gib",
    "largest_fitting_batch",
]
