"""Memory layouts of 4-D (N, C, H, W) arrays.

Every op takes and returns arrays of *shape* (N, C, H, W). Their memory is either
contiguous NCHW, or "channels-last": NHWC memory seen through a transposed view, so
that ``x.transpose(0, 2, 3, 1)`` is C-contiguous (PyTorch's channels_last memory
format). Convolution is fastest channels-last (see functional/conv.py); the ops keep the
layout they are given, so nn.Sequential converts once at each end of a run of layers.
"""
from __future__ import annotations


def is_channels_last(x) -> bool:
    """True when x (N, C, H, W) has NHWC memory (also true for NCHW arrays with C == 1 or H*W == 1)."""
    return x.ndim == 4 and x.transpose(0, 2, 3, 1).flags.c_contiguous


def to_channels_last(xp, x, copy=False):
    """x (N, C, H, W) with NHWC memory: x itself when it already is (unless ``copy``), else a copy."""
    if not copy and is_channels_last(x):
        return x
    N, C, H, W = x.shape
    out = xp.empty((N, H, W, C), dtype=x.dtype)
    out[...] = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    return out.transpose(0, 3, 1, 2)  # (N, C, H, W) view of NHWC memory


def to_contiguous(xp, x, copy=False):
    """x (N, C, H, W) as a C-contiguous array: x itself when it already is (unless ``copy``), else a copy."""
    if not copy and x.flags.c_contiguous:
        return x
    out = xp.empty(x.shape, dtype=x.dtype)
    out[...] = x
    return out


def empty_like_layout(xp, like, shape, dtype):
    """An uninitialised array of ``shape`` (N, C, H, W) in the layout of ``like`` (channels-last or not)."""
    if is_channels_last(like) and not like.flags.c_contiguous:
        N, C, H, W = shape
        return xp.empty((N, H, W, C), dtype=dtype).transpose(0, 3, 1, 2)  # (N, C, H, W) view of NHWC memory
    return xp.empty(shape, dtype=dtype)


def zeros_like_layout(xp, like, shape, dtype):
    """Zeros of ``shape`` (N, C, H, W) in the layout of ``like``."""
    if is_channels_last(like) and not like.flags.c_contiguous:
        N, C, H, W = shape
        return xp.zeros((N, H, W, C), dtype=dtype).transpose(0, 3, 1, 2)  # (N, C, H, W) view of NHWC memory
    return xp.zeros(shape, dtype=dtype)
