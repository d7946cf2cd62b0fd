"""Scratch buffers reused between training steps, and the cap on the im2col workspace.

Convolution through im2col builds a column matrix K x (N*OH*OW) (K = C*KH*KW) that is
9x (3x3) to 25x (5x5) the size of its input: 151 MB for the second conv of vgg_small at
batch 128. Allocating it afresh every step costs as much as the GEMM that reads it
(the kernel hands out zeroed pages, one page fault per 4 KiB on first touch), so each
Conv2d layer owns a :class:`Workspace` whose buffers live as long as the layer and are
reallocated only when a shape, dtype or backend changes.

The workspace limit caps one convolution's column matrix (in MiB, of 2**20 bytes).
A convolution whose columns would exceed it processes the batch in chunks of as many
samples as fit (at least one), rebuilding each chunk's columns in backward rather
than keeping them. On the CPU the chunks are smaller still (:data:`CPU_CHUNK_BYTES`,
cache-sized, whatever the limit) and only small column matrices are kept for backward
(:data:`CPU_KEEP_BYTES`): there the limit is a cap, on the GPU it sets the chunks::

    cnn_gpu.set_workspace_limit(64)          # this context (thread / task) from now on
    with cnn_gpu.use_workspace_limit(16):    # temporarily
        ...

The default is ``$CNN_GPU_WORKSPACE_MB``, else :data:`DEFAULT_LIMIT_MB`. Like the
backend, the limit lives in a :class:`contextvars.ContextVar`: there is no module state.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Any, Iterator

DEFAULT_LIMIT_MB = 1024.0
_MIB = 1 << 20
# On the CPU a convolution's chunk is also kept to about this size, whatever the limit: a
# chunk's im2col, GEMMs and col2im then work on data in the cache, and the GEMMs run at
# ~1.6x the speed of one GEMM over the whole batch (measured; docs/BENCHMARKS.md).
CPU_CHUNK_BYTES = 8 * _MIB
# On the CPU a convolution keeps its columns for backward only up to about this size (they
# then stay in the last-level cache); larger ones are rebuilt chunk by chunk in backward.
CPU_KEEP_BYTES = 32 * _MIB


def _check_limit(mb: Any) -> float:
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not math.isfinite(mb) or mb <= 0:
        raise ValueError(f"mb: expected a positive number of MiB, got {mb!r}")
    return float(mb)


def _default_limit() -> float:
    env = os.environ.get("CNN_GPU_WORKSPACE_MB")
    if not env:
        return DEFAULT_LIMIT_MB
    try:
        return _check_limit(float(env))
    except ValueError:
        raise ValueError(f"CNN_GPU_WORKSPACE_MB: expected a positive number of MiB, got {env!r}") from None


_limit_mb: contextvars.ContextVar[float | None] = contextvars.ContextVar("cnn_gpu_workspace_limit_mb", default=None)


def get_workspace_limit() -> float:
    """The cap on one convolution's im2col column matrix, in MiB."""
    mb = _limit_mb.get()
    if mb is None:
        mb = _default_limit()
        _limit_mb.set(mb)
    return mb


def set_workspace_limit(mb: float) -> None:
    """Cap one convolution's im2col column matrix at ``mb`` MiB in the current context from now on."""
    _limit_mb.set(_check_limit(mb))


@contextlib.contextmanager
def use_workspace_limit(mb: float) -> Iterator[float]:
    """Context manager: convolutions inside cap their column matrices at ``mb`` MiB."""
    token = _limit_mb.set(_check_limit(mb))
    try:
        yield float(mb)
    finally:
        _limit_mb.reset(token)


def workspace_limit_bytes() -> int:
    """The limit in bytes."""
    return int(get_workspace_limit() * _MIB)


def keep_bytes(xp: Any) -> int:
    """The largest column matrix a convolution keeps from forward to backward (rather than
    rebuilding it): the limit, and on the CPU at most :data:`CPU_KEEP_BYTES`."""
    cap = workspace_limit_bytes()
    return min(cap, CPU_KEEP_BYTES) if xp.__name__ == "numpy" else cap


def chunk_size(n: int, bytes_per_sample: int, xp: Any = None) -> int:
    """Samples per chunk of a convolution whose columns take ``bytes_per_sample`` per sample:
    as many as fit the workspace limit and, on the CPU (``xp`` NumPy), :data:`CPU_CHUNK_BYTES`;
    n when everything fits, never less than 1."""
    cap = workspace_limit_bytes()
    if xp is not None and xp.__name__ == "numpy":
        cap = min(cap, CPU_CHUNK_BYTES)
    if n * bytes_per_sample <= cap:
        return n
    return max(1, min(n, cap // max(1, bytes_per_sample)))


class Workspace:
    """Named scratch buffers kept between calls.

    ``get(name, shape, dtype, xp)`` returns the buffer ``name``, reallocating it only when
    the shape, dtype or array module differs from the last request. Its contents are
    whatever the last user left there; ``zeros=True`` zero-fills a *new* buffer only (for
    buffers whose untouched parts must stay zero, e.g. the border of a padded copy).
    A buffer never leaves the op that requested it: results handed to callers are
    fresh arrays.
    """

    __slots__ = ("_buffers",)

    def __init__(self) -> None:
        self._buffers: dict[str, Any] = {}

    def get(self, name: str, shape: tuple, dtype: Any, xp: Any, zeros: bool = False) -> Any:
        shape = tuple(int(s) for s in shape)
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or type(buf) is not xp.ndarray:
            self._buffers.pop(name, None)  # free the old one before allocating its replacement
            buf = (xp.zeros if zeros else xp.empty)(shape, dtype=dtype)
            self._buffers[name] = buf
        return buf

    def clear(self) -> None:
        """Drop every buffer (they are reallocated on next use)."""
        self._buffers.clear()

    @property
    def nbytes(self) -> int:
        return int(sum(b.nbytes for b in self._buffers.values()))

    def __repr__(self) -> str:
        return f"Workspace({len(self._buffers)} buffers, {self.nbytes / _MIB:.1f} MiB)"


__all__ = ["DEFAULT_LIMIT_MB", "Workspace", "get_workspace_limit", "set_workspace_limit", "use_workspace_limit",
           "chunk_size", "keep_bytes", "workspace_limit_bytes"]
