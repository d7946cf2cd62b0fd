"""The CPU engine's depthwise convolution (groups = C, F = C*M): direct, channels-last, tap by tap.

No columns and no GEMM: for each tap (kh, kw) the outputs that read inside the input (the
clipped ranges of functional/geometry.py: no padded copy) get x's strided window times that
tap's weights, a multiply-add over whole (n, oh, ow, c) blocks with the channels contiguous
(NHWC). With xt = x_nhwc[:, rows(kh), cols(kw), :] (n, oh, ow, C) and w_t (C, M) = tap t's weights:
    forward   y5[n, oh, ow, c, m]  += xt[..., c] * w_t[c, m]           then + b, max(., 0)
    backward  dw[c*M + m, t]        = sum_{n, oh, ow} delta5 * xt[..., None]
              dx_nhwc[:, rows, cols] += sum_m delta5 * w_t              (the adjoint, tap by tap)
delta = dy (* (y > 0) with the fused ReLU), db its sum over (n, oh, ow). The reference computes
the same sums in another order (im2col + matmul): equal to rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..functional.caches import Conv2dCache
from ..functional.geometry import ConvGeometry, clipped_taps
from .layout import to_channels_last


class DepthwiseAux(NamedTuple):
    """A depthwise Conv2dCache's part: x's channels-last view (n, H, W, C)."""

    x_nhwc: object


def _taps(w, g: ConvGeometry):
    """w (F, 1, KH, KW) -> (KH, KW, C, M): tap (kh, kw)'s weights per channel and multiplier."""
    M = g.F // g.C
    return np.ascontiguousarray(w.reshape(g.C, M, g.KH, g.KW).transpose(2, 3, 0, 1))  # (KH, KW, C, M)


def conv2d_forward(x, w, b, g: ConvGeometry, activation=None):
    """x (N, C, H, W), any layout -> (y (N, F, OH, OW) channels-last, cache)."""
    M = g.F // g.C
    x_nhwc = to_channels_last(x)
    if x_nhwc is x:  # backward reads it: a copy, not the caller's memory (which the caller may reuse)
        x_nhwc = to_channels_last(x, copy=True)
    x_nhwc = x_nhwc.transpose(0, 2, 3, 1)  # (N, H, W, C)
    wt = _taps(w, g)
    y5 = np.zeros((g.N, g.OH, g.OW, g.C, M), dtype=x.dtype)  # (N, OH, OW, C, M) = NHWC of (N, F, OH, OW)
    for kh, kw, orows, ocols, irows, icols in clipped_taps(g):
        y5[:, orows, ocols] += x_nhwc[:, irows, icols, :, None] * wt[kh, kw]
    y_nhwc = y5.reshape(g.N, g.OH, g.OW, g.F)
    if b is not None:
        y_nhwc += b
    if activation == "relu":
        np.maximum(y_nhwc, 0, out=y_nhwc)
    y = y_nhwc.transpose(0, 3, 1, 2)  # (N, F, OH, OW) view of NHWC memory
    return y, Conv2dCache("cpu", g, x, w, b is not None, activation, y if activation else None, DepthwiseAux(x_nhwc))


def conv2d_backward(dy, cache, input_grad=True):
    """-> (dx (N, C, H, W) channels-last or None, dw (F, 1, KH, KW), db or None)."""
    g = cache.g
    M = g.F // g.C
    delta = to_channels_last(dy).transpose(0, 2, 3, 1)  # (N, OH, OW, F)
    if cache.activation == "relu":
        delta = delta * (cache.y.transpose(0, 2, 3, 1) > 0)
    db = delta.sum(axis=(0, 1, 2)) if cache.has_bias else None  # (F,)
    delta5 = delta.reshape(g.N, g.OH, g.OW, g.C, M)  # (N, OH, OW, C, M)
    x_nhwc, wt = cache.aux.x_nhwc, _taps(cache.w, g)
    dwt = np.zeros((g.KH, g.KW, g.C, M), dtype=dy.dtype)
    dx_nhwc = np.zeros((g.N, g.H, g.W, g.C), dtype=dy.dtype) if input_grad else None
    for kh, kw, orows, ocols, irows, icols in clipped_taps(g):
        d = delta5[:, orows, ocols]  # (N, oh, ow, C, M)
        dwt[kh, kw] = (d * x_nhwc[:, irows, icols, :, None]).sum(axis=(0, 1, 2))
        if input_grad:
            dx_nhwc[:, irows, icols] += (d * wt[kh, kw]).sum(axis=-1) if M > 1 else d[..., 0] * wt[kh, kw, :, 0]
    dw = dwt.transpose(2, 3, 0, 1).reshape(g.F, 1, g.KH, g.KW)  # (C, M, KH, KW) -> (F, 1, KH, KW)
    dx = dx_nhwc.transpose(0, 3, 1, 2) if input_grad else None  # (N, C, H, W) view of NHWC memory
    return dx, np.ascontiguousarray(dw), db
