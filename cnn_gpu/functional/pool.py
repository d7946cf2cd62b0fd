"""Max and average pooling, forward and backward (NCHW, floor mode, no dilation).

Max pooling pads with -inf and records, for every output, the flat index
``h*W + w`` of the winning input inside its (H, W) plane (int32, the
"argmax"). Taps are scanned row-major and the first maximum wins, so on ties
exactly one input gets the gradient. A NaN in a window wins (NaN propagates).

    forward   y[n, c, oh, ow] = max over the window of x
    backward  dx[n, c, h, w]  = sum of dy[n, c, oh, ow] over outputs whose argmax is h*W + w

Average pooling counts padding as zeros and always divides by KH*KW
(PyTorch's count_include_pad=True):

    forward   y = (1 / (KH*KW)) * sum over the window of x
    backward  dx[n, c, h, w] = (1 / (KH*KW)) * sum of dy over the windows that contain (h, w)
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..backend import get_array_module
from . import _dispatch
from ._checks import check_float, check_shape, pair
from ._window import crop2d, out_size, pad2d, tap_slices


def _pool_geometry(x, kernel_size, stride, padding):
    check_float("x", x, ndim=4)
    KH, KW = pair("kernel_size", kernel_size, minimum=1)
    SH, SW = pair("stride", kernel_size if stride is None else stride, minimum=1)
    PH, PW = pair("padding", padding, minimum=0)
    if 2 * PH > KH or 2 * PW > KW:
        raise ValueError(f"padding: expected at most half the kernel size ({KH // 2}, {KW // 2}), got ({PH}, {PW})")
    N, C, H, W = x.shape
    if KH > H + 2 * PH or KW > W + 2 * PW:
        raise ValueError(
            f"kernel_size: the {KH}x{KW} window must fit the padded input {H + 2 * PH}x{W + 2 * PW} "
            f"(x {H}x{W}, padding {PH},{PW})"
        )
    OH, OW = out_size(H, KH, SH, PH), out_size(W, KW, SW, PW)
    return (KH, KW), (SH, SW), (PH, PW), (OH, OW)


def _check_dtype(dy, dtype) -> None:
    if dy.dtype != dtype:
        raise TypeError(f"dy: expected dtype {dtype} (the forward input's), got {dy.dtype}; nothing is cast silently")


class MaxPool2dCache(NamedTuple):
    x_shape: tuple
    argmax: Any  # (N, C, OH, OW) int32, flat index h*W + w into the input plane
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dtype: Any  # of the forward input; dy must match it


def max_pool2d_forward(x, kernel_size, stride=None, padding=0):
    """x (N, C, H, W) -> (y (N, C, OH, OW), cache); stride defaults to kernel_size."""
    ks, stride, padding, (OH, OW) = _pool_geometry(x, kernel_size, stride, padding)
    k = _dispatch.kernels(x)
    if k is not None:
        y, argmax = k.max_pool2d_forward(x, ks, stride, padding)
        return y, MaxPool2dCache(tuple(x.shape), argmax, ks, stride, padding, x.dtype)
    xp = get_array_module(x)
    N, C, H, W = x.shape
    KH, KW = ks
    xpad = pad2d(xp, x, padding, value=-np.inf)  # (N, C, H+2PH, W+2PW)
    best = None
    tap = xp.zeros((N, C, OH, OW), dtype=np.int32)  # winning tap index kh*KW + kw
    for kh, kw, rows, cs in tap_slices(KH, KW, OH, OW, stride):
        v = xpad[:, :, rows, cs]  # (N, C, OH, OW)
        if best is None:
            best = v.copy()
            continue
        # strictly greater keeps the first maximum; a NaN beats any number, the first NaN stays
        wins = (v > best) | ((v != v) & (best == best))
        best = xp.where(wins, v, best)
        tap = xp.where(wins, np.int32(kh * KW + kw), tap)
    # tap -> flat index into the unpadded plane: h = oh*SH - PH + kh, w = ow*SW - PW + kw
    SH, SW = stride
    PH, PW = padding
    oh = xp.arange(OH, dtype=np.int32) * SH - PH
    ow = xp.arange(OW, dtype=np.int32) * SW - PW
    base = oh[:, None] * W + ow[None, :]  # (OH, OW)
    argmax = (base + (tap // KW) * W + tap % KW).astype(np.int32)  # (N, C, OH, OW)
    return best, MaxPool2dCache(tuple(x.shape), argmax, ks, stride, padding, x.dtype)


def max_pool2d_backward(dy, cache: MaxPool2dCache):
    """dy (N, C, OH, OW) -> dx (N, C, H, W): each output's gradient goes to its argmax."""
    x_shape, argmax, (KH, KW), (SH, SW), padding, dtype = cache
    check_float("dy", dy, ndim=4)
    _check_dtype(dy, dtype)
    check_shape("dy", dy, argmax.shape)
    k = _dispatch.kernels(dy)
    if k is not None:
        return k.max_pool2d_backward(dy, argmax, x_shape, (KH, KW), (SH, SW), padding)
    xp = get_array_module(dy)
    N, C, H, W = x_shape
    NC, HW = N * C, H * W
    arg2 = argmax.reshape(NC, -1)  # (N*C, OH*OW)
    dy2 = dy.reshape(NC, -1)  # (N*C, OH*OW)
    if SH >= KH and SW >= KW:
        # windows do not overlap: every input receives at most one gradient, a plain scatter
        dx = xp.zeros((NC, HW), dtype=dy.dtype)
        dx[xp.arange(NC)[:, None], arg2] = dy2
    else:
        # overlapping windows: sum the gradients landing on the same input
        flat = (xp.arange(NC, dtype=np.int64) * HW)[:, None] + arg2  # (N*C, OH*OW) indices into dx
        dx = xp.bincount(flat.ravel(), weights=dy2.ravel(), minlength=NC * HW).astype(dy.dtype, copy=False)
    return dx.reshape(N, C, H, W)


class AvgPool2dCache(NamedTuple):
    x_shape: tuple
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dtype: Any  # of the forward input; dy must match it


def avg_pool2d_forward(x, kernel_size, stride=None, padding=0):
    """x (N, C, H, W) -> (y (N, C, OH, OW), cache); zero padding counted in the divisor."""
    ks, stride, padding, (OH, OW) = _pool_geometry(x, kernel_size, stride, padding)
    cache = AvgPool2dCache(tuple(x.shape), ks, stride, padding, x.dtype)
    k = _dispatch.kernels(x)
    if k is not None:
        return k.avg_pool2d_forward(x, ks, stride, padding), cache
    xp = get_array_module(x)
    N, C = x.shape[:2]
    KH, KW = ks
    xpad = pad2d(xp, x, padding)  # (N, C, H+2PH, W+2PW)
    y = xp.zeros((N, C, OH, OW), dtype=x.dtype)
    for _, _, rows, cs in tap_slices(KH, KW, OH, OW, stride):
        y += xpad[:, :, rows, cs]
    y *= x.dtype.type(1.0 / (KH * KW))
    return y, cache


def avg_pool2d_backward(dy, cache: AvgPool2dCache):
    """dy (N, C, OH, OW) -> dx (N, C, H, W)."""
    x_shape, (KH, KW), stride, padding, dtype = cache
    N, C, H, W = x_shape
    check_float("dy", dy, ndim=4)
    _check_dtype(dy, dtype)
    # the full forward output shape: a smaller dy would otherwise be accepted silently
    check_shape("dy", dy, (N, C, out_size(H, KH, stride[0], padding[0]), out_size(W, KW, stride[1], padding[1])))
    k = _dispatch.kernels(dy)
    if k is not None:
        return k.avg_pool2d_backward(dy, x_shape, (KH, KW), stride, padding)
    xp = get_array_module(dy)
    PH, PW = padding
    OH, OW = dy.shape[2:]
    dxpad = xp.zeros((N, C, H + 2 * PH, W + 2 * PW), dtype=dy.dtype)
    g = dy * dy.dtype.type(1.0 / (KH * KW))
    for _, _, rows, cs in tap_slices(KH, KW, OH, OW, stride):
        dxpad[:, :, rows, cs] += g
    return xp.ascontiguousarray(crop2d(dxpad, padding, H, W))


__all__ = [
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
    "MaxPool2dCache",
    "AvgPool2dCache",
]
