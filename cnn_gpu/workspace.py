"""Scratch buffers reused between training steps, and the cap on one convolution's im2col buffer.

Convolution through im2col builds a column matrix K x (N*OH*OW) (K = C*KH*KW) that is
9x (3x3) to 25x (5x5) the size of its input: 151 MB for the second conv of vgg_small at
batch 128. Allocating it afresh every step costs as much as the GEMM that reads it (on the
CPU every new page faults; on the GPU an allocation can wait for the memory pool), so each
Conv2d layer owns a :class:`Workspace` whose buffers live as long as the layer and are
reallocated only when a shape, dtype or backend changes. Any engine may use it.

The workspace limit caps one convolution's column matrix (in MiB, of 2**20 bytes). A
convolution whose columns would exceed it processes the batch in chunks of as many samples
as fit (at least one), with the same results::

    cnn_gpu.set_workspace_limit(64)          # this context (thread / task) from now on
    with cnn_gpu.use_workspace_limit(16):    # temporarily
        ...

The limit is the ``workspace_mb`` setting of :mod:`cnn_gpu.config` (``$CNN_GPU_WORKSPACE_MB``,
default 1024).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from . import config

_MIB = 1 << 20


def get_workspace_limit() -> float:
    """The cap on one convolution's im2col column matrix, in MiB."""
    return config.get().workspace_mb


def set_workspace_limit(mb: float) -> None:
    """Cap one convolution's im2col column matrix at ``mb`` MiB in the current context from now on."""
    config.update(workspace_mb=config.check("workspace_mb", mb, "mb"))


@contextlib.contextmanager
def use_workspace_limit(mb: float) -> Iterator[float]:
    """Context manager: convolutions inside cap their column matrices at ``mb`` MiB."""
    with config.override(workspace_mb=config.check("workspace_mb", mb, "mb")) as cfg:
        yield cfg.workspace_mb


def workspace_limit_bytes() -> int:
    """The limit in bytes."""
    return int(get_workspace_limit() * _MIB)


def chunk_size(n: int, bytes_per_sample: int, cap_bytes: int | None = None) -> int:
    """Samples per chunk of a convolution whose columns take ``bytes_per_sample`` per sample:
    as many as fit the workspace limit (and ``cap_bytes``, if given); n when everything fits,
    never less than 1."""
    cap = workspace_limit_bytes() if cap_bytes is None else min(cap_bytes, workspace_limit_bytes())
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


def scratch(ws: Workspace | None, name: str, shape: tuple, dtype: Any, xp: Any, zeros: bool = False) -> Any:
    """The buffer ``name`` of ``ws``, or a fresh array when there is no workspace."""
    if ws is None:
        return (xp.zeros if zeros else xp.empty)(shape, dtype=dtype)
    return ws.get(name, shape, dtype, xp, zeros)


__all__ = [
    "Workspace",
    "scratch",
    "get_workspace_limit",
    "set_workspace_limit",
    "use_workspace_limit",
    "chunk_size",
    "workspace_limit_bytes",
]
