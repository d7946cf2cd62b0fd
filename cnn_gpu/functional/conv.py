"""2-D convolution through im2col + one matrix multiply per sample, forward and backward.

Notation (used throughout this module and the kernels):
    N   batch size            C   input channels        H, W    input height, width
    F   filters (out chans)   KH, KW  kernel size       SH, SW  stride
    PH, PW  zero padding      DH, DW  dilation          OH, OW  output height, width
    OH = (H + 2*PH - DH*(KH-1) - 1) // SH + 1, OW likewise;  P = OH*OW;  K = C*KH*KW.
    x (N, C, H, W), w (F, C, KH, KW), b (F,), y (N, F, OH, OW).
    cols (N, K, P): column p = oh*OW + ow holds the receptive field of output (oh, ow),
    row k = (c*KH + kh)*KW + kw (the layout of torch.nn.functional.unfold).

Forward:   y[n] = W2 @ cols[n] + b           with W2 = w.reshape(F, K)
Backward (delta = dL/dy):
    db     = sum over n, p of delta[n, :, p]
    dW2    = sum over n of delta[n] @ cols[n]^T
    dcols  = W2^T @ delta[n]                 then dx = col2im(dcols), the adjoint of im2col
"""
from __future__ import annotations

from typing import Any, NamedTuple

from ..backend import get_array_module
from . import _dispatch
from ._checks import check_float, check_same_dtype, check_shape, describe, pair, same_xp
from ._window import crop2d, out_size, pad2d, tap_slices


def _geometry(x_shape, kernel_size, stride, padding, dilation, what="x"):
    KH, KW = pair("kernel_size", kernel_size, minimum=1)
    stride = pair("stride", stride, minimum=1)
    padding = pair("padding", padding, minimum=0)
    dilation = pair("dilation", dilation, minimum=1)
    N, C, H, W = x_shape
    (SH, SW), (PH, PW), (DH, DW) = stride, padding, dilation
    eff_h, eff_w = DH * (KH - 1) + 1, DW * (KW - 1) + 1
    if eff_h > H + 2 * PH or eff_w > W + 2 * PW:
        raise ValueError(
            f"kernel_size: the (dilated) kernel {eff_h}x{eff_w} must fit the padded input "
            f"{H + 2 * PH}x{W + 2 * PW} ({what} {H}x{W}, padding {PH},{PW}), got kernel {KH}x{KW}, dilation {DH},{DW}"
        )
    OH, OW = out_size(H, KH, SH, PH, DH), out_size(W, KW, SW, PW, DW)
    return (KH, KW), stride, padding, dilation, (OH, OW)


def im2col(x, kernel_size, stride=1, padding=0, dilation=1):
    """x (N, C, H, W) -> cols (N, C*KH*KW, OH*OW); zero padding."""
    check_float("x", x, ndim=4)
    (KH, KW), stride, padding, dilation, (OH, OW) = _geometry(x.shape, kernel_size, stride, padding, dilation)
    k = _dispatch.kernels(x)
    if k is not None:
        return k.im2col(x, (KH, KW), stride, padding, dilation)
    xp = get_array_module(x)
    N, C = x.shape[:2]
    xpad = pad2d(xp, x, padding)  # (N, C, H+2PH, W+2PW)
    cols = xp.empty((N, C, KH, KW, OH, OW), dtype=x.dtype)
    for kh, kw, rows, cs in tap_slices(KH, KW, OH, OW, stride, dilation):
        cols[:, :, kh, kw] = xpad[:, :, rows, cs]  # (N, C, OH, OW)
    return cols.reshape(N, C * KH * KW, OH * OW)  # (N, C*KH*KW, OH*OW)


def col2im(cols, x_shape, kernel_size, stride=1, padding=0, dilation=1):
    """The adjoint of :func:`im2col`: cols (N, C*KH*KW, OH*OW) -> (N, C, H, W), summing overlaps."""
    check_float("cols", cols, ndim=3)
    if len(tuple(x_shape)) != 4:
        raise ValueError(f"x_shape: expected (N, C, H, W), got {tuple(x_shape)!r}")
    N, C, H, W = (int(s) for s in x_shape)
    (KH, KW), stride, padding, dilation, (OH, OW) = _geometry((N, C, H, W), kernel_size, stride, padding, dilation, "x_shape")
    check_shape("cols", cols, (N, C * KH * KW, OH * OW))
    k = _dispatch.kernels(cols)
    if k is not None:
        return k.col2im(cols, (N, C, H, W), (KH, KW), stride, padding, dilation)
    xp = get_array_module(cols)
    PH, PW = padding
    dxpad = xp.zeros((N, C, H + 2 * PH, W + 2 * PW), dtype=cols.dtype)
    cols6 = cols.reshape(N, C, KH, KW, OH, OW)  # (N, C, KH, KW, OH, OW)
    for kh, kw, rows, cs in tap_slices(KH, KW, OH, OW, stride, dilation):
        dxpad[:, :, rows, cs] += cols6[:, :, kh, kw]
    return xp.ascontiguousarray(crop2d(dxpad, padding, H, W))  # (N, C, H, W)


class Conv2dCache(NamedTuple):
    """What conv2d_backward needs: the input shape, its columns and the weights."""

    x_shape: tuple
    cols: Any  # (N, C*KH*KW, OH*OW)
    w: Any  # (F, C, KH, KW)
    has_bias: bool
    stride: tuple
    padding: tuple
    dilation: tuple


def conv2d_forward(x, w, b=None, stride=1, padding=0, dilation=1):
    """y = conv(x, w) + b. x (N, C, H, W), w (F, C, KH, KW), b (F,) or None -> (y, cache)."""
    check_float("x", x, ndim=4)
    check_float("w", w, ndim=4)
    same_xp("w", w, "x", x)
    check_same_dtype("w", w, "x", x)
    N, C, H, W = x.shape
    F, Cw, KH, KW = w.shape
    if Cw != C:
        raise ValueError(f"w: expected {C} input channels (x has shape {tuple(x.shape)}), got {describe(w)}")
    if b is not None:
        check_float("b", b, ndim=1)
        same_xp("b", b, "x", x)
        check_same_dtype("b", b, "x", x)
        check_shape("b", b, (F,))
    xp = get_array_module(x)
    (_, _), stride, padding, dilation, (OH, OW) = _geometry(x.shape, (KH, KW), stride, padding, dilation)
    cols = im2col(x, (KH, KW), stride, padding, dilation)  # (N, C*KH*KW, OH*OW)
    w2 = w.reshape(F, C * KH * KW)  # (F, C*KH*KW)
    y = xp.matmul(w2, cols)  # (N, F, OH*OW)
    if b is not None:
        y += b[:, None]  # (F, 1) broadcast over N and OH*OW
    y = y.reshape(N, F, OH, OW)  # (N, F, OH, OW)
    return y, Conv2dCache(tuple(x.shape), cols, w, b is not None, stride, padding, dilation)


def conv2d_backward(dy, cache: Conv2dCache):
    """dy (N, F, OH, OW) -> (dx, dw, db); db is None when the forward had no bias."""
    x_shape, cols, w, has_bias, stride, padding, dilation = cache
    N = x_shape[0]
    F, C, KH, KW = w.shape
    P = cols.shape[2]
    check_float("dy", dy, ndim=4)
    check_same_dtype("dy", dy, "the forward input", cols)
    if dy.shape[0] != N or dy.shape[1] != F or dy.shape[2] * dy.shape[3] != P:
        raise ValueError(f"dy: expected the forward output's shape (N={N}, F={F}, OH*OW={P}), got {describe(dy)}")
    xp = get_array_module(dy)
    dy3 = dy.reshape(N, F, P)  # (N, F, OH*OW)
    db = dy3.sum(axis=(0, 2)) if has_bias else None  # (F,)
    dw = xp.matmul(dy3, cols.transpose(0, 2, 1)).sum(axis=0)  # (N, F, K) -> (F, K)
    dw = dw.reshape(F, C, KH, KW)
    w2 = w.reshape(F, C * KH * KW)  # (F, K)
    dcols = xp.matmul(w2.T, dy3)  # (N, K, OH*OW)
    dx = col2im(dcols, x_shape, (KH, KW), stride, padding, dilation)  # (N, C, H, W)
    return dx, dw, db
