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
from . import _dispatch, _parallel
from ._checks import check_float, check_shape, pair
from ._layout import empty_like_layout, zeros_like_layout
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
    argmax: Any  # (N, C, OH, OW) int32, flat index h*W + w into the input plane; None in the tap-only cache
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dtype: Any  # of the forward input; dy must match it
    tap: Any = None  # (N, C, OH, OW) uint8/int32 winning tap kh*KW + kw (the NumPy path), else None


# Pooling splits the batch over the cores (see _parallel) when a part keeps this many inputs.
_MIN_PART_ELEMENTS = 1 << 18


def _min_samples(x_shape) -> int:
    per_sample = 1
    for d in x_shape[1:]:
        per_sample *= int(d)
    return -(-_MIN_PART_ELEMENTS // max(1, per_sample))


def _max_pool_taps(xp, x, ks, stride, padding, out_hw):
    """y (N, C, OH, OW) and the winning tap (N, C, OH, OW) = kh*KW + kw of the first maximum
    (both in x's layout).

    y is the running maximum over the KH*KW strided tap views (xp.maximum propagates NaN).
    With n_t = (view_t != y) in {0, 1}, the first tap equal to y is, in Horner form,
    n_0 * (1 + n_1 * (1 + ... * (1 + n_{T-2}))): branch-free integer arithmetic (a masked
    select per tap would mispredict on random data). In a window whose maximum is NaN every
    n_t is 1; those (rare) windows are then redone exactly: the first NaN tap wins.
    On NumPy the batch is split over the cores."""
    KH, KW = ks
    OH, OW = out_hw
    T = KH * KW
    N, C = x.shape[:2]
    y = empty_like_layout(xp, x, (N, C, OH, OW), x.dtype)  # channels-last in, channels-last out
    tap = empty_like_layout(xp, x, (N, C, OH, OW), np.uint8 if T <= 255 else np.int32)

    def part(n0, n1):
        xpad = pad2d(xp, x[n0:n1], padding, value=-np.inf)  # (n, C, H+2PH, W+2PW)
        views = [xpad[:, :, rows, cs] for _, _, rows, cs in tap_slices(KH, KW, OH, OW, stride)]  # (n, C, OH, OW)
        yp, tp = y[n0:n1], tap[n0:n1]
        if T == 1:
            yp[...] = views[0]
            tp[...] = 0
            return
        xp.maximum(views[0], views[1], out=yp)
        for v in views[2:]:
            xp.maximum(yp, v, out=yp)
        xp.not_equal(views[T - 2], yp, out=tp)  # n_{T-2}
        if T > 2:
            n = empty_like_layout(xp, yp, yp.shape, tp.dtype)
            for t in range(T - 3, -1, -1):
                tp += 1
                xp.not_equal(views[t], yp, out=n)
                tp *= n
        nan = xp.nonzero(yp != yp)  # the windows holding a NaN (usually none)
        first = xp.full(nan[0].shape, T - 1, dtype=tp.dtype)
        for t in range(T - 2, -1, -1):
            v = views[t][nan]
            first = xp.where(v != v, tp.dtype.type(t), first)
        tp[nan] = first
        if padding != (0, 0):
            # a window whose real values are all -inf ties with its padding: padding must not win,
            # the window's first real element does (row-major, like the CUDA kernel)
            n_i, c_i, oh_i, ow_i = xp.nonzero(yp == -np.inf)
            kh0 = xp.maximum(padding[0] - oh_i * stride[0], 0)
            kw0 = xp.maximum(padding[1] - ow_i * stride[1], 0)
            tp[n_i, c_i, oh_i, ow_i] = (kh0 * KW + kw0).astype(tp.dtype)

    _parallel.over_range(xp, N, part, _min_samples(x.shape))
    return y, tap


def _argmax_from_tap(xp, tap, x_shape, ks, stride, padding):
    """tap kh*KW + kw -> flat index h*W + w into the unpadded plane (int32)."""
    W = x_shape[3]
    KH, KW = ks
    (SH, SW), (PH, PW) = stride, padding
    OH, OW = tap.shape[2:]
    # h = oh*SH - PH + kh, w = ow*SW - PW + kw
    oh = xp.arange(OH, dtype=np.int32) * SH - PH
    ow = xp.arange(OW, dtype=np.int32) * SW - PW
    base = oh[:, None] * W + ow[None, :]  # (OH, OW)
    t = np.arange(KH * KW, dtype=np.int32)
    offset = xp.asarray((t // KW) * W + t % KW)  # (KH*KW,) flat offset of each tap from its window's origin
    return base + xp.take(offset, tap)  # (N, C, OH, OW) int32


def max_pool2d_forward_taps(x, kernel_size, stride=None, padding=0):
    """As :func:`max_pool2d_forward`, but the NumPy path's cache keeps only the winning taps
    (argmax is None): the layers' fast path, which never reads flat indices."""
    return _max_pool2d_forward(x, kernel_size, stride, padding, flat=False)


def max_pool2d_forward(x, kernel_size, stride=None, padding=0):
    """x (N, C, H, W) -> (y (N, C, OH, OW), cache); stride defaults to kernel_size."""
    return _max_pool2d_forward(x, kernel_size, stride, padding, flat=True)


def _max_pool2d_forward(x, kernel_size, stride, padding, flat):
    ks, stride, padding, out_hw = _pool_geometry(x, kernel_size, stride, padding)
    k = _dispatch.kernels(x)
    if k is not None:
        y, argmax = k.max_pool2d_forward(x, ks, stride, padding)
        return y, MaxPool2dCache(tuple(x.shape), argmax, ks, stride, padding, x.dtype)
    xp = get_array_module(x)
    y, tap = _max_pool_taps(xp, x, ks, stride, padding, out_hw)
    argmax = _argmax_from_tap(xp, tap, x.shape, ks, stride, padding) if flat else None
    return y, MaxPool2dCache(tuple(x.shape), argmax, ks, stride, padding, x.dtype, tap)


def max_pool2d_backward(dy, cache: MaxPool2dCache):
    """dy (N, C, OH, OW) -> dx (N, C, H, W): each output's gradient goes to its argmax."""
    x_shape, argmax, (KH, KW), (SH, SW), padding, dtype, tap = cache
    check_float("dy", dy, ndim=4)
    _check_dtype(dy, dtype)
    check_shape("dy", dy, (tap if argmax is None else argmax).shape)
    k = _dispatch.kernels(dy)
    if k is not None:
        return k.max_pool2d_backward(dy, argmax, x_shape, (KH, KW), (SH, SW), padding)
    xp = get_array_module(dy)
    N, C, H, W = x_shape
    OH, OW = dy.shape[2:]
    if tap is not None and SH >= KH and SW >= KW and padding == (0, 0):
        # windows neither overlap nor pad: tap t's outputs fill one strided view of dx, with dy
        # where t won and +0.0 elsewhere, selected bitwise (exact and branch-free)
        covered = (SH, SW) == (KH, KW) and OH * SH == H and OW * SW == W
        dx = (empty_like_layout if covered else zeros_like_layout)(xp, dy, (N, C, H, W), dy.dtype)
        bits = np.dtype(f"u{dy.dtype.itemsize}")

        def part(n0, n1):
            mask = empty_like_layout(xp, dy, (n1 - n0,) + tuple(dy.shape[1:]), bits)
            dy_bits = dy[n0:n1].view(bits)
            for t, (_, _, rows, cs) in enumerate(tap_slices(KH, KW, OH, OW, (SH, SW))):
                xp.equal(tap[n0:n1], tap.dtype.type(t), out=mask)  # 1 where tap t won, else 0
                xp.negative(mask, out=mask)  # all ones where tap t won, else 0
                xp.bitwise_and(dy_bits, mask, out=dx[n0:n1, :, rows, cs].view(bits))

        _parallel.over_range(xp, N, part, _min_samples(x_shape))
        return dx
    if argmax is None:
        argmax = _argmax_from_tap(xp, tap, x_shape, (KH, KW), (SH, SW), padding)
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
    y = zeros_like_layout(xp, x, (N, C, OH, OW), x.dtype)
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
    dxpad = zeros_like_layout(xp, dy, (N, C, H + 2 * PH, W + 2 * PW), dy.dtype)
    g = dy * dy.dtype.type(1.0 / (KH * KW))
    for _, _, rows, cs in tap_slices(KH, KW, OH, OW, stride):
        dxpad[:, :, rows, cs] += g
    if PH == 0 and PW == 0:
        return dxpad
    dx = empty_like_layout(xp, dy, (N, C, H, W), dy.dtype)
    dx[...] = crop2d(dxpad, padding, H, W)
    return dx


__all__ = [
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
    "MaxPool2dCache",
    "AvgPool2dCache",
]
