"""The one place that decides whether an op runs in our CUDA kernels.

An op calls :func:`kernels` with its input: it gets the :mod:`cnn_gpu.cuda`
module when the input is a CuPy array and custom kernels are enabled, else
None and the op runs its ``xp`` reference code (NumPy on the CPU, plain CuPy
array expressions on the GPU).

Kernels are on by default; ``CNN_GPU_KERNELS=0`` in the environment, or
``with use_kernels(False):``, turns them off (the tests use that to compare the
two CuPy paths against each other).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator

from ..backend import is_cupy_array

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "cnn_gpu_kernels", default=os.environ.get("CNN_GPU_KERNELS", "1") != "0"
)


@contextlib.contextmanager
def use_kernels(enabled: bool) -> Iterator[None]:
    token = _enabled.set(bool(enabled))
    try:
        yield
    finally:
        _enabled.reset(token)


def kernels(x: Any):
    """cnn_gpu.cuda if ``x`` is a CuPy array and kernels are enabled, else None."""
    if not is_cupy_array(x) or not _enabled.get():
        return None
    from .. import cuda  # noqa: PLC0415  (imports CuPy lazily itself)

    return cuda
