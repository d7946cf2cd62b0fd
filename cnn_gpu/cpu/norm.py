"""The CPU engine's batch normalisation: the reference's math (functional/reference.py) on the
engine's channels-last memory.

A channels-last activation x (N, C, H, W) is, in memory, a C-contiguous (M, C) matrix of rows
(M = N*H*W), and an (N, C) input already is one; an NCHW input is first copied channels-last (the
engine's convolutions never hand one over). A channel's statistics are then column sums. With
few channels (ResNet's 16) a row is too short for NumPy's vectorised loops, so each block of rows
is seen as a wider matrix of k rows side by side, (rows/k, k*C), and its k*C column sums are
folded back to C: 3x faster at C = 16. The sums run in fixed blocks of rows (each block's column
sums, then those partial sums in block order), spread over the cores: the result does not depend
on the thread count, and float32 sums gather less rounding than one long running sum. The
elementwise passes use the same wide view. The output keeps the channels-last layout.
"""
from __future__ import annotations

import numpy as np

from ..functional import reference
from ..functional.caches import BatchNormCache
from . import parallel
from .layout import empty_like_layout, is_channels_last, to_channels_last

NAME = "cpu"
_BLOCK_ELEMENTS = 1 << 15  # elements per block of rows whose column sums are one partial sum
_WIDE = 128  # the wide view has at least this many columns


def _matrix(x):
    """x (N, C) or channels-last (N, C, H, W) as its (M, C) memory (a view)."""
    return x if x.ndim == 2 else x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])  # (N*H*W, C)


class _Rows:
    """The blocks of rows of an (M, C) matrix and their wide views (rows/k, k*C)."""

    def __init__(self, M: int, C: int):
        self.C, self.k = C, max(1, -(-_WIDE // C))
        rows = max(self.k, (_BLOCK_ELEMENTS // max(1, C)) // self.k * self.k)  # a multiple of k
        self.blocks = [(r, min(r + rows, M)) for r in range(0, M, rows)]

    def split(self, a):
        """a block (r, C) -> (its first r//k*k rows as (r//k, k*C), the other r%k rows (r%k, C))."""
        q = a.shape[0] // self.k
        return a[: q * self.k].reshape(q, self.k * self.C), a[q * self.k :]

    def tile(self, v):
        return np.tile(v, self.k)  # (k*C,): a per-channel vector for the wide view

    def fold(self, wide_sums, rest_sums):
        return wide_sums.reshape(self.k, self.C).sum(axis=0) + rest_sums

    def over(self, fn) -> None:
        """fn(r0, r1) for every block, the blocks spread over the cores."""
        blocks = self.blocks
        parallel.over_range(len(blocks), lambda b0, b1: [fn(*blocks[b]) for b in range(b0, b1)])

    def sums(self, fn, n: int, dtype) -> list:
        """The n per-channel sums (C,) of fn(r0, r1) -> n arrays (C,) over the blocks, the blocks'
        partial sums added in block order in float64, returned in ``dtype``."""
        partial = np.empty((n, len(self.blocks), self.C), dtype=np.float64)

        def part(b0, b1):
            for b in range(b0, b1):
                for i, s in enumerate(fn(*self.blocks[b])):
                    partial[i, b] = s

        parallel.over_range(len(self.blocks), part)
        return [partial[i].sum(axis=0).astype(dtype) for i in range(n)]


def _colsum(rows: _Rows, a):
    w, rest = rows.split(a)
    return rows.fold(w.sum(axis=0), rest.sum(axis=0))


def _coldot_centred(rows: _Rows, a, b, mean, mean_wide):
    """The per-channel sums of a * (b - mean) over a block."""
    wa, ra = rows.split(a)
    wb, rb = rows.split(b)
    return rows.fold(np.einsum("ij,ij->j", wa, wb - mean_wide), np.einsum("ij,ij->j", ra, rb - mean))


def _affine(rows: _Rows, out, a, s, t, s_wide, t_wide) -> None:
    """out = a * s + t per channel, on a block (wide view, then the rest)."""
    (ow, orest), (aw, arest) = rows.split(out), rows.split(a)
    for o, v, ss, tt in ((ow, aw, s_wide, t_wide), (orest, arest, s, t)):
        np.multiply(v, ss, out=o)
        o += tt


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, activation=None):
    if x.ndim == 4 and not is_channels_last(x):
        x = to_channels_last(x)
    elif x.ndim == 2:
        x = np.ascontiguousarray(x)
    xm = _matrix(x)  # (M, C)
    M, C = xm.shape
    rows, t = _Rows(M, C), x.dtype.type
    batch_stats = training or running_mean is None
    if batch_stats:
        mean = rows.sums(lambda r0, r1: (_colsum(rows, xm[r0:r1]),), 1, x.dtype)[0] / t(M)
        mean_wide = rows.tile(mean)

        def squares(r0, r1):
            w, rest = rows.split(xm[r0:r1])
            dw, dr = w - mean_wide, rest - mean
            return (rows.fold(np.einsum("ij,ij->j", dw, dw), np.einsum("ij,ij->j", dr, dr)),)

        var = rows.sums(squares, 1, x.dtype)[0] / t(M)
        if training and running_mean is not None:
            reference.update_running_stats(running_mean, running_var, mean, var, momentum, M)
    else:
        mean, var = running_mean, running_var
    invstd = 1 / np.sqrt(var + t(eps))
    scale = invstd * gamma if gamma is not None else invstd
    shift = -mean * scale + beta if beta is not None else -mean * scale  # y = x scale + shift
    y = empty_like_layout(x, x.shape, x.dtype)
    ym, scale_w, shift_w = _matrix(y), rows.tile(scale), rows.tile(shift)
    relu = activation == "relu"

    def normalise(r0, r1):
        _affine(rows, ym[r0:r1], xm[r0:r1], scale, shift, scale_w, shift_w)
        if relu:
            np.maximum(ym[r0:r1], 0, out=ym[r0:r1])  # the fused ReLU, on the block while it is in cache

    rows.over(normalise)
    return y, BatchNormCache(NAME, x, gamma, mean, invstd, batch_stats, beta is not None, None, activation,
                             y if relu else None)


def batch_norm_backward(dy, cache):
    """dx = delta a + (x - mean) b + c per channel, delta = dy (* (y > 0) with the fused ReLU), with
    a = gamma invstd, and for batch statistics b = -a invstd sum(delta xhat) / M, c = -a sum(delta) / M
    (the reference's formula expanded; xhat = (x - mean) invstd). Two sweeps over the row blocks: the
    sums (with the fused ReLU, delta is written into dx's memory on the way), then dx in place."""
    x, mean, invstd = cache.x, cache.mean, cache.invstd
    if dy.strides != x.strides:
        dy = to_channels_last(dy, copy=True) if x.ndim == 4 else np.ascontiguousarray(dy)
    xm, dym = _matrix(x), _matrix(dy)
    M, C = xm.shape
    rows, t = _Rows(M, C), x.dtype.type
    dx = empty_like_layout(x, x.shape, x.dtype)
    dxm, mean_wide = _matrix(dx), rows.tile(mean)
    relu = cache.activation == "relu"
    ym, src = (_matrix(cache.y), dxm) if relu else (None, dym)  # src: delta, in dx's memory with the ReLU

    def sums(r0, r1):
        if relu:
            np.multiply(dym[r0:r1], ym[r0:r1] > 0, out=dxm[r0:r1])
        return _colsum(rows, src[r0:r1]), _coldot_centred(rows, src[r0:r1], xm[r0:r1], mean, mean_wide)

    sum_dy, sum_dyc = rows.sums(sums, 2, x.dtype)
    sum_dyxhat = sum_dyc * invstd  # sum(delta (x - mean)) invstd
    dbeta = sum_dy if cache.has_beta else None
    dgamma = sum_dyxhat if cache.gamma is not None else None
    a = cache.gamma * invstd if cache.gamma is not None else invstd
    a_w = rows.tile(a)
    if not cache.batch_stats:
        rows.over(lambda r0, r1: _affine(rows, dxm[r0:r1], src[r0:r1], a, 0, a_w, 0))
        return dx, dgamma, dbeta
    b = -a * invstd * sum_dyxhat * t(1.0 / M)
    c = -a * sum_dy * t(1.0 / M)
    b_w, c_w = rows.tile(b), rows.tile(c)

    def step(r0, r1):
        _affine(rows, dxm[r0:r1], src[r0:r1], a, c, a_w, c_w)  # delta a + c (in place over delta)
        for o, v, mm, bb in zip(rows.split(dxm[r0:r1]), rows.split(xm[r0:r1]), (mean_wide, mean), (b_w, b)):
            o += (v - mm) * bb  # + (x - mean) b

    rows.over(step)
    return dx, dgamma, dbeta
