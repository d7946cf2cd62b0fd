"""Max and average pooling, the public API (NCHW shapes, floor mode, no dilation).

The math is in functional/reference.py. Max pooling: the first maximum of a window (taps in
row-major order) wins, a NaN wins, padding never wins; ``cache.argmax`` is the int32 flat index
h*W + w of each window's winner in its input plane. Average pooling counts padding as zeros
and divides by KH*KW (torch's count_include_pad=True).
"""

from __future__ import annotations

from . import _dispatch
from ._checks import check_dy, check_float, pair
from .caches import AdaptivePool2dCache, AvgPool2dCache, MaxPool2dCache
from .geometry import pool_geometry


def max_pool2d_forward(x, kernel_size, stride=None, padding=0):
    """x (N, C, H, W) -> (y (N, C, OH, OW), cache); stride defaults to kernel_size."""
    check_float("x", x, ndim=4)
    g = pool_geometry(x.shape, kernel_size, stride, padding)
    return _dispatch.impl("max_pool2d_forward", x)(x, g)


def max_pool2d_backward(dy, cache: MaxPool2dCache):
    """dy (N, C, OH, OW) -> dx (N, C, H, W): each output's gradient goes to its window's winner."""
    if not isinstance(cache, MaxPool2dCache):
        raise TypeError(f"cache: expected the MaxPool2dCache of max_pool2d_forward, got {type(cache).__name__}")
    check_dy(dy, cache.g.y_shape, cache.dtype)
    return _dispatch.impl_for("max_pool2d_backward", cache)(dy, cache)


def avg_pool2d_forward(x, kernel_size, stride=None, padding=0):
    """x (N, C, H, W) -> (y (N, C, OH, OW), cache); zero padding counted in the divisor."""
    check_float("x", x, ndim=4)
    g = pool_geometry(x.shape, kernel_size, stride, padding)
    return _dispatch.impl("avg_pool2d_forward", x)(x, g)


def avg_pool2d_backward(dy, cache: AvgPool2dCache):
    """dy (N, C, OH, OW) -> dx (N, C, H, W)."""
    if not isinstance(cache, AvgPool2dCache):
        raise TypeError(f"cache: expected the AvgPool2dCache of avg_pool2d_forward, got {type(cache).__name__}")
    check_dy(dy, cache.g.y_shape, cache.dtype)
    return _dispatch.impl_for("avg_pool2d_backward", cache)(dy, cache)


def adaptive_avg_pool2d_forward(x, output_size):
    """x (N, C, H, W) -> (y (N, C, OH, OW), cache): torch's adaptive windows, output (i, j) averaging
    rows [floor(i*H/OH), ceil((i+1)*H/OH)) and the columns likewise. output_size: an int or (OH, OW)."""
    check_float("x", x, ndim=4)
    out = pair("output_size", output_size, minimum=1)
    return _dispatch.impl("adaptive_avg_pool2d_forward", x)(x, out)


def adaptive_avg_pool2d_backward(dy, cache: AdaptivePool2dCache):
    """dy (N, C, OH, OW) -> dx (N, C, H, W)."""
    if not isinstance(cache, AdaptivePool2dCache):
        raise TypeError(f"cache: expected the AdaptivePool2dCache of adaptive_avg_pool2d_forward, got {type(cache).__name__}")
    check_dy(dy, tuple(cache.x_shape[:2]) + tuple(cache.output_size), cache.dtype)
    return _dispatch.impl_for("adaptive_avg_pool2d_backward", cache)(dy, cache)


__all__ = [
    "adaptive_avg_pool2d_forward",
    "adaptive_avg_pool2d_backward",
    "AdaptivePool2dCache",
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
    "MaxPool2dCache",
    "AvgPool2dCache",
]
