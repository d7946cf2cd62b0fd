"""Convolution, the public API: argument checks, the geometry, the engine.

The math is in functional/reference.py (im2col, one GEMM per group, col2im); the CPU and CUDA
engines compute the same numbers their own way (see functional/_dispatch.py).
"""

from __future__ import annotations

from . import _dispatch
from ._checks import check_accumulate_into, check_activation, check_dy, check_float, check_shape, check_weights, describe
from .caches import Conv2dCache
from .geometry import conv_geometry


def conv2d_forward(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, activation=None, workspace=None):
    """y = conv(x, w) + b -> (y, cache). x (N, C, H, W), w (F, C/groups, KH, KW), b (F,) or None.

    ``activation="relu"`` returns relu(conv(x) + b), and backward then takes the gradient of that
    output (the fast engines fuse it). ``workspace``: a cnn_gpu.Workspace whose buffers are
    reused from call to call (the cache may refer to them: one backward per forward).
    The cache does not depend on x's memory: the caller may reuse x before the backward (each
    engine keeps the columns it made, or, where its backward reads x -- columns rebuilt per chunk,
    the CPU engine's stride-1 path, depthwise -- a copy of a caller's x). It refers to w.
    """
    check_float("x", x, ndim=4)
    check_float("w", w, ndim=4)
    check_activation(activation)
    g = conv_geometry(x.shape, w.shape[0], w.shape[2:], stride, padding, dilation, groups)
    check_weights(x, w, b, g.C // g.G, "conv")
    return _dispatch.impl("conv2d_forward", x)(x, w, b, g, activation, workspace)


def conv2d_backward(dy, cache: Conv2dCache, input_grad=True, *, accumulate_into=None):
    """dy (N, F, OH, OW) -> (dx, dw, db); dx is None without ``input_grad``, db None without a bias.

    ``accumulate_into=(dw_acc, db_acc)`` (db_acc None without a bias): add dw and db into these
    arrays in place (a layer's Parameter.grad) and return them as dw and db; the CUDA engine adds
    inside its GEMMs and kernels (no extra launch)."""
    if not isinstance(cache, Conv2dCache):
        raise TypeError(f"cache: expected the Conv2dCache of conv2d_forward, got {type(cache).__name__}")
    check_dy(dy, cache.g.y_shape, cache.w.dtype)
    check_accumulate_into(accumulate_into, [("dw", cache.w.shape), ("db", (cache.g.F,) if cache.has_bias else None)], dy)
    return _dispatch.backward_into(_dispatch.impl_for("conv2d_backward", cache), (dy, cache, input_grad), accumulate_into)


def im2col(x, kernel_size, stride=1, padding=0, dilation=1):
    """x (N, C, H, W) -> cols (N, C*KH*KW, OH*OW), zero padding (the layout of torch's unfold)."""
    check_float("x", x, ndim=4)
    g = conv_geometry(x.shape, 1, kernel_size, stride, padding, dilation)
    return _dispatch.impl("im2col", x)(x, g)


def col2im(cols, x_shape, kernel_size, stride=1, padding=0, dilation=1):
    """The adjoint of :func:`im2col`: cols (N, C*KH*KW, OH*OW) -> (N, C, H, W), summing overlaps."""
    check_float("cols", cols, ndim=3)
    if len(tuple(x_shape)) != 4:
        raise ValueError(f"x_shape: expected (N, C, H, W), got {tuple(x_shape)!r}")
    g = conv_geometry(x_shape, 1, kernel_size, stride, padding, dilation, what="x_shape")
    check_shape("cols", cols, (g.N, g.C * g.KH * g.KW, g.P))
    return _dispatch.impl("col2im", cols)(cols, g)


__all__ = ["conv2d_forward", "conv2d_backward", "im2col", "col2im", "Conv2dCache", "describe"]
