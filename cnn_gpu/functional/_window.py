"""Sliding-window geometry shared by convolution and pooling.

A window op visits, for every output position (oh, ow), the taps (kh, kw) of a
KH x KW kernel. The input row touched by a tap is ``oh*SH - PH + kh*DH``.
Looping over the KH*KW taps, the rows touched by one tap for all ``oh`` form a
single strided slice of the padded input; the ops below are built on that.
"""
from __future__ import annotations

from typing import Iterator


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
    """x (N, C, H, W) -> (N, C, H + 2PH, W + 2PW), filled with ``value`` outside."""
    PH, PW = padding
    if PH == 0 and PW == 0:
        return x
    N, C, H, W = x.shape
    out = xp.full((N, C, H + 2 * PH, W + 2 * PW), value, dtype=x.dtype)
    out[:, :, PH : PH + H, PW : PW + W] = x
    return out


def crop2d(xpad, padding: tuple[int, int], H: int, W: int):
    """The inverse view of pad2d: (N, C, H + 2PH, W + 2PW) -> (N, C, H, W)."""
    PH, PW = padding
    if PH == 0 and PW == 0:
        return xpad
    return xpad[:, :, PH : PH + H, PW : PW + W]
