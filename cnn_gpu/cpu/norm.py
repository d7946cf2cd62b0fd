"""The CPU engine's batch normalisation: the reference's math (functional/reference.py) on the
engine's channels-last memory.

A channels-last activation x (N, C, H, W) is, in memory, a C-contiguous (M, C) matrix of rows
(M = N*H*W): a channel's statistics are column sums of that matrix, which NumPy adds row by row,
vectorised along the channels. An (N, C) input is already such a matrix; an NCHW one is seen as
(N, C, H*W). The sums run in fixed blocks of rows (each block's column sums, then those partial
sums in block order), spread over the cores: the result does not depend on the thread count,
and float32 sums gather less rounding than one long running sum. The output keeps x's layout.
"""
from __future__ import annotations

import numpy as np

from ..functional.caches import BatchNormCache
from . import parallel
from .layout import empty_like_layout, is_channels_last

NAME = "cpu"
_BLOCK_ELEMENTS = 1 << 15  # elements per block of rows whose column sums are one partial sum


def _view(x):
    """x as a 3-D (R, C, Q) view: (M, C, 1) for channels-last or (N, C) memory, (N, C, H*W) for NCHW."""
    N, C = x.shape[:2]
    if x.ndim == 2:
        return x[:, :, None]  # (N, C, 1)
    if is_channels_last(x):
        return x.transpose(0, 2, 3, 1).reshape(-1, C)[:, :, None]  # (N*H*W, C, 1), a view
    return x.reshape(N, C, -1)  # (N, C, H*W)


def _blocks(v) -> list[tuple[int, int]]:
    rows = max(1, _BLOCK_ELEMENTS // max(1, v.shape[1] * v.shape[2]))
    return [(r, min(r + rows, v.shape[0])) for r in range(0, v.shape[0], rows)]


def _over_blocks(v, fn) -> None:
    """fn(r0, r1) for every block of rows of v, the blocks spread over the cores."""
    blocks = _blocks(v)

    def part(b0, b1):
        for r0, r1 in blocks[b0:b1]:
            fn(r0, r1)

    parallel.over_range(len(blocks), part)


def _column_sums(v, fn, k: int) -> list:
    """The k per-channel sums (C,) of fn(r0, r1) -> k arrays (C,) over the blocks, added in block order."""
    blocks = _blocks(v)
    partial = np.empty((k, len(blocks), v.shape[1]), dtype=v.dtype)

    def part(b0, b1):
        for b in range(b0, b1):
            for i, s in enumerate(fn(*blocks[b])):
                partial[i, b] = s

    parallel.over_range(len(blocks), part)
    return [partial[i].sum(axis=0) for i in range(k)]


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps):
    v = _view(x)
    t, M = x.dtype.type, v.shape[0] * v.shape[2]
    batch_stats = training or running_mean is None
    if batch_stats:
        (total,) = _column_sums(v, lambda r0, r1: (v[r0:r1].sum(axis=(0, 2)),), 1)
        mean = total / t(M)
        mean3 = mean.reshape(1, -1, 1)

        def squares(r0, r1):
            d = v[r0:r1] - mean3
            return (np.einsum("rcq,rcq->c", d, d),)

        var = _column_sums(v, squares, 1)[0] / t(M)
        if training and running_mean is not None:
            running_mean *= t(1.0 - momentum)
            running_mean += t(momentum) * mean
            running_var *= t(1.0 - momentum)
            running_var += t(momentum * M / (M - 1)) * var
    else:
        mean, var = running_mean, running_var
    invstd = 1 / np.sqrt(var + t(eps))
    scale = invstd * gamma if gamma is not None else invstd
    shift = -mean * scale + beta if beta is not None else -mean * scale
    y = empty_like_layout(x, x.shape, x.dtype)
    yv = _view(y)
    scale3, shift3 = scale.reshape(1, -1, 1), shift.reshape(1, -1, 1)

    def normalise(r0, r1):
        np.multiply(v[r0:r1], scale3, out=yv[r0:r1])  # y = x * gamma * invstd + (beta - mean * gamma * invstd)
        yv[r0:r1] += shift3

    _over_blocks(v, normalise)
    return y, BatchNormCache(NAME, x, gamma, mean, invstd, batch_stats, beta is not None)


def _in_layout_of(a, x):
    """a (x's shape) in x's memory layout (a itself, or a copy)."""
    if a.strides == x.strides or (a.flags.c_contiguous and x.flags.c_contiguous):
        return a
    out = empty_like_layout(x, x.shape, a.dtype)
    out[...] = a
    return out


def batch_norm_backward(dy, cache):
    """dx = dy a + x b + c per channel, with a = gamma invstd, and for batch statistics
    b = -gamma invstd^2 sum(dy xhat) / M, c = -gamma invstd sum(dy) / M - mean b (the reference's
    formula expanded; xhat = (x - mean) invstd)."""
    x, mean, invstd = cache.x, cache.mean, cache.invstd
    v, dv = _view(x), _view(_in_layout_of(dy, x))
    t, M = x.dtype.type, v.shape[0] * v.shape[2]
    mean3, invstd3 = mean.reshape(1, -1, 1), invstd.reshape(1, -1, 1)

    def sums(r0, r1):
        xhat = (v[r0:r1] - mean3) * invstd3
        return dv[r0:r1].sum(axis=(0, 2)), np.einsum("rcq,rcq->c", dv[r0:r1], xhat)

    sum_dy, sum_dyx = _column_sums(v, sums, 2)
    dbeta = sum_dy if cache.has_beta else None
    dgamma = sum_dyx if cache.gamma is not None else None
    g = cache.gamma if cache.gamma is not None else np.ones_like(invstd)
    a = g * invstd
    b = -a * invstd * sum_dyx * t(1.0 / M) if cache.batch_stats else np.zeros_like(a)
    c = -a * sum_dy * t(1.0 / M) - mean * b if cache.batch_stats else np.zeros_like(a)
    a3, b3, c3 = a.reshape(1, -1, 1), b.reshape(1, -1, 1), c.reshape(1, -1, 1)
    dx = empty_like_layout(x, x.shape, x.dtype)
    dxv = _view(dx)

    def step(r0, r1):
        np.multiply(dv[r0:r1], a3, out=dxv[r0:r1])
        if cache.batch_stats:
            dxv[r0:r1] += v[r0:r1] * b3
            dxv[r0:r1] += c3

    _over_blocks(v, step)
    return dx, dgamma, dbeta
