"""Sliding-window geometry shared by convolution and pooling.

A window op visits, for every output position (oh, ow), the taps (kh, kw) of a
KH x KW kernel. The input row touched by a tap is ``oh*SH - PH + kh*DH``.
Looping over the KH*KW taps, the rows touched by one tap for all ``oh`` form a
single strided slice of the padded input; the ops below are built on that.
"""
from __future__ import annotations

from typing import Iterator

from ._layout import empty_like_layout


def out_size(size: int, k: int, s: int, p: int, d: int = 1) -> int:
    """Output length of a window op along one axis (floor mode)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def tap_slices(
    KH: int, KW: int, OH: int, OW: int, stride: tuple[int, int], dilation: tuple[int, int] = (1, 1)
) -> Iterator[tuple[int, int, slice, slice]]:
    """Yield (kh, kw, rows, cols): the slices of the *padded* input that tap (kh, kw) reads."""
    SH, SW = stride
    DH, DW = dilation
    for kh in range(KH):
        h0 = kh * DH
        rows = slice(h0, h0 + SH * (OH - 1) + 1, SH)
        for kw in range(KW):
            w0 = kw * DW
            yield kh, kw, rows, slice(w0, w0 + SW * (OW - 1) + 1, SW)


def pad2d(xp, x, padding: tuple[int, int], value: float = 0.0):
    """x (N, C, H, W) -> (N, C, H + 2PH, W + 2PW) in x's layout, filled with ``value`` outside."""
    PH, PW = padding
    if PH == 0 and PW == 0:
        return x
    N, C, H, W = x.shape
    out = empty_like_layout(xp, x, (N, C, H + 2 * PH, W + 2 * PW), x.dtype)  # x's layout
    out[...] = value
    out[:, :, PH : PH + H, PW : PW + W] = x
    return out


def crop2d(xpad, padding: tuple[int, int], H: int, W: int):
    """The inverse view of pad2d: (N, C, H + 2PH, W + 2PW) -> (N, C, H, W)."""
    PH, PW = padding
    if PH == 0 and PW == 0:
        return xpad
    return xpad[:, :, PH : PH + H, PW : PW + W]


def clipped_range(k: int, out_len: int, size: int, s: int, p: int, d: int = 1) -> tuple[slice, slice] | None:
    """For tap ``k`` along one axis: (outputs, inputs), the slice of outputs whose input index
    ``o*s - p + k*d`` lies inside the *unpadded* axis [0, size), and the input slice they read.
    None when the tap reads only padding."""
    off = k * d - p  # input index read by output 0
    lo = max(0, -(off // s))  # the first o with o*s + off >= 0, i.e. ceil(-off / s)
    hi = min(out_len, (size - 1 - off) // s + 1)  # one past the last o with o*s + off <= size - 1
    if hi <= lo:
        return None
    return slice(lo, hi), slice(lo * s + off, (hi - 1) * s + off + 1, s)


def clipped_taps(
    KH: int, KW: int, OH: int, OW: int, H: int, W: int,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int] = (1, 1),
) -> Iterator[tuple[int, int, slice, slice, slice, slice]]:
    """Yield (kh, kw, out_rows, out_cols, in_rows, in_cols) for every tap that reads at least one
    input element: tap (kh, kw) of outputs [out_rows, out_cols] reads the *unpadded* input at
    [in_rows, in_cols]; its other outputs read padding."""
    (SH, SW), (PH, PW), (DH, DW) = stride, padding, dilation
    for kh in range(KH):
        r = clipped_range(kh, OH, H, SH, PH, DH)
        if r is None:
            continue
        for kw in range(KW):
            c = clipped_range(kw, OW, W, SW, PW, DW)
            if c is not None:
                yield kh, kw, r[0], c[0], r[1], c[1]
