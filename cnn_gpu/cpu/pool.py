"""The CPU engine's pooling: branch-free passes over the KH*KW strided tap views, spread over the
cores, in the input's layout (channels-last stays channels-last).

Max pooling records the winning *tap* kh*KW + kw of each window (uint8 for up to 255 taps),
not a flat index: forward finds it with integer arithmetic, and backward, when windows neither
overlap nor pad, writes each tap's strided view of dx by a bitwise select. The semantics are the
reference's (functional/reference.py): the first maximum wins, a NaN wins, padding never wins.
"""

from __future__ import annotations

import numpy as np

from ..functional.caches import AvgPool2dCache, MaxPool2dCache
from ..functional.geometry import tap_slices
from . import parallel
from .layout import empty_like_layout, is_channels_last, pad2d, to_channels_last, zeros_like_layout

_MIN_PART_ELEMENTS = 1 << 18  # a part of the batch spread over the cores keeps this many inputs


def _min_samples(g) -> int:
    return -(-_MIN_PART_ELEMENTS // max(1, g.C * g.H * g.W))


def _first_tap(views, yp, tp):
    """tp = the first tap t whose view equals yp (the window maximum). With n_t = (view_t != y) in
    {0, 1} it is, in Horner form, n_0 * (1 + n_1 * (1 + ... * (1 + n_{T-2}))): branch-free integer
    arithmetic (a masked select per tap would mispredict on random data)."""
    T = len(views)
    np.not_equal(views[T - 2], yp, out=tp)  # n_{T-2}
    if T > 2:
        n = empty_like_layout(yp, yp.shape, tp.dtype)
        for t in range(T - 3, -1, -1):
            tp += 1
            np.not_equal(views[t], yp, out=n)
            tp *= n


def _fix_nan_and_padding(views, yp, tp, g):
    """Windows whose maximum is NaN (every n_t is 1 there): the first NaN tap wins. Windows
    whose real values are all -inf tie with the padding: their first real element wins."""
    nan = np.nonzero(yp != yp)
    first = np.full(nan[0].shape, len(views) - 1, dtype=tp.dtype)
    for t in range(len(views) - 2, -1, -1):
        v = views[t][nan]
        first = np.where(v != v, tp.dtype.type(t), first)
    tp[nan] = first
    if (g.PH, g.PW) != (0, 0):
        n_i, c_i, oh_i, ow_i = np.nonzero(yp == -np.inf)
        kh0 = np.maximum(g.PH - oh_i * g.SH, 0)
        kw0 = np.maximum(g.PW - ow_i * g.SW, 0)
        tp[n_i, c_i, oh_i, ow_i] = (kh0 * g.KW + kw0).astype(tp.dtype)


def max_pool2d_forward(x, g):
    """-> (y, cache): y the running maximum over the tap views (np.maximum propagates NaN), the
    cache the winning taps. Both in x's layout."""
    T = g.T
    y = empty_like_layout(x, g.y_shape, x.dtype)
    tap = empty_like_layout(x, g.y_shape, np.uint8 if T <= 255 else np.int32)

    def part(n0, n1):
        xpad = pad2d(x[n0:n1], g.padding, value=-np.inf)  # (n, C, H+2PH, W+2PW)
        views = [xpad[:, :, rows, cs] for _, _, rows, cs in tap_slices(g)]  # (n, C, OH, OW) each
        yp, tp = y[n0:n1], tap[n0:n1]
        if T == 1:
            yp[...] = views[0]
            tp[...] = 0
            return
        np.maximum(views[0], views[1], out=yp)
        for v in views[2:]:
            np.maximum(yp, v, out=yp)
        _first_tap(views, yp, tp)
        _fix_nan_and_padding(views, yp, tp, g)

    parallel.over_range(g.N, part, _min_samples(g))
    return y, MaxPool2dCache("cpu", g, x.dtype, tap, "tap")


def _backward_disjoint(dy, tap, g):
    """Windows that neither overlap nor pad: tap t's outputs fill one strided view of dx, with dy
    where t won and +0.0 elsewhere, selected bitwise (exact and branch-free)."""
    covered = (g.SH, g.SW) == (g.KH, g.KW) and g.OH * g.SH == g.H and g.OW * g.SW == g.W
    dx = (empty_like_layout if covered else zeros_like_layout)(dy, g.x_shape, dy.dtype)
    bits = np.dtype(f"u{dy.dtype.itemsize}")

    def part(n0, n1):
        mask = empty_like_layout(dy, (n1 - n0,) + tuple(dy.shape[1:]), bits)
        dy_bits = dy[n0:n1].view(bits)
        for t, (_, _, rows, cs) in enumerate(tap_slices(g)):
            np.equal(tap[n0:n1], tap.dtype.type(t), out=mask)  # 1 where tap t won, else 0
            np.negative(mask, out=mask)  # all ones where tap t won, else 0
            np.bitwise_and(dy_bits, mask, out=dx[n0:n1, :, rows, cs].view(bits))

    parallel.over_range(g.N, part, _min_samples(g))
    return dx


def _like_forward(dy, index):
    """dy in the layout the forward's input had (that of its winners ``index``): the gradient then
    leaves in that layout too, and a channels-last run stays channels-last (dy is the smaller array)."""
    return to_channels_last(dy) if is_channels_last(index) else dy


def max_pool2d_backward(dy, cache):
    """dy (N, C, OH, OW) -> dx (N, C, H, W): each output's gradient goes to its window's winner."""
    g = cache.g
    if g.SH >= g.KH and g.SW >= g.KW and (g.PH, g.PW) == (0, 0):
        return _backward_disjoint(_like_forward(dy, cache.index), cache.index, g)
    NC, HW = g.N * g.C, g.H * g.W
    arg2 = cache.argmax.reshape(NC, -1)  # (N*C, OH*OW) flat indices into each input plane
    dy2 = dy.reshape(NC, -1)  # (N*C, OH*OW)
    if g.SH >= g.KH and g.SW >= g.KW:  # windows do not overlap: every input gets at most one gradient
        dx = np.zeros((NC, HW), dtype=dy.dtype)
        dx[np.arange(NC)[:, None], arg2] = dy2
    else:  # overlapping windows: sum the gradients landing on the same input
        flat = (np.arange(NC, dtype=np.int64) * HW)[:, None] + arg2  # (N*C, OH*OW) indices into dx
        dx = np.bincount(flat.ravel(), weights=dy2.ravel(), minlength=NC * HW).astype(dy.dtype, copy=False)
    return dx.reshape(g.x_shape)


def avg_pool2d_forward(x, g):
    """y = (1 / (KH*KW)) * the sum of the tap views (zero padding counted), in x's layout."""
    xpad = pad2d(x, g.padding)  # (N, C, H+2PH, W+2PW)
    y = zeros_like_layout(x, g.y_shape, x.dtype)
    for _, _, rows, cs in tap_slices(g):
        y += xpad[:, :, rows, cs]
    y *= x.dtype.type(1.0 / g.T)
    return y, AvgPool2dCache("cpu", g, x.dtype)


def avg_pool2d_backward(dy, cache):
    """dx = (1 / (KH*KW)) * the sum of dy over the windows containing each input, in dy's layout."""
    g = cache.g
    dxpad = zeros_like_layout(dy, (g.N, g.C, g.H + 2 * g.PH, g.W + 2 * g.PW), dy.dtype)
    share = dy * dy.dtype.type(1.0 / g.T)
    for _, _, rows, cs in tap_slices(g):
        dxpad[:, :, rows, cs] += share
    if (g.PH, g.PW) == (0, 0):
        return dxpad
    dx = empty_like_layout(dy, g.x_shape, dy.dtype)
    dx[...] = dxpad[:, :, g.PH : g.PH + g.H, g.PW : g.PW + g.W]
    return dx
