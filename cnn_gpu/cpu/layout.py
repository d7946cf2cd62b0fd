"""Memory layouts of 4-D (N, C, H, W) arrays in the CPU engine.

Every op takes and returns arrays of *shape* (N, C, H, W). The CPU engine keeps activations
"channels-last": NHWC memory seen through a transposed view, so that ``x.transpose(0, 2, 3, 1)``
is C-contiguous (PyTorch's channels_last memory format). A convolution is one GEMM whose result
lands in that layout (cpu/conv.py), and the pools and activations keep the layout they are
given, so a run of convolution layers converts only at its ends (Flatten's reshape makes the
NCHW-ordered copy the fully connected layers need). The values are the same in any layout.
"""

from __future__ import annotations

import numpy as np


def is_channels_last(x) -> bool:
    """True when x (N, C, H, W) has NHWC memory (also true for NCHW arrays with C == 1 or H*W == 1)."""
    return x.ndim == 4 and x.transpose(0, 2, 3, 1).flags.c_contiguous


def to_channels_last(x, copy=False):
    """x (N, C, H, W) with NHWC memory: x itself when it already is (unless ``copy``), else a copy."""
    if not copy and is_channels_last(x):
        return x
    N, C, H, W = x.shape
    out = np.empty((N, H, W, C), dtype=x.dtype)
    out[...] = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    return out.transpose(0, 3, 1, 2)  # (N, C, H, W) view of NHWC memory


def _like_layout(make, like, shape, dtype):
    if is_channels_last(like) and not like.flags.c_contiguous:
        N, C, H, W = shape
        return make((N, H, W, C), dtype=dtype).transpose(0, 3, 1, 2)  # (N, C, H, W) view of NHWC memory
    return make(shape, dtype=dtype)


def empty_like_layout(like, shape, dtype):
    """An uninitialised array of ``shape`` (N, C, H, W) in the layout of ``like`` (channels-last or not)."""
    return _like_layout(np.empty, like, shape, dtype)


def zeros_like_layout(like, shape, dtype):
    """Zeros of ``shape`` (N, C, H, W) in the layout of ``like``."""
    return _like_layout(np.zeros, like, shape, dtype)


def pad2d(x, padding: tuple[int, int], value: float = 0.0):
    """x (N, C, H, W) -> (N, C, H + 2PH, W + 2PW) in x's layout, filled with ``value`` outside."""
    PH, PW = padding
    if PH == 0 and PW == 0:
        return x
    N, C, H, W = x.shape
    out = empty_like_layout(x, (N, C, H + 2 * PH, W + 2 * PW), x.dtype)
    out[...] = value
    out[:, :, PH : PH + H, PW : PW + W] = x
    return out
