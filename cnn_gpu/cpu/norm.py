"""The CPU engine's batch normalisation: the reference's math (functional/reference.py) on the
engine's channels-last memory.

A channels-last activation x (N, C, H, W) is, in memory, a C-contiguous (M, C) matrix of rows
(M = N*H*W), and an (N, C) input already is one; an NCHW input is first copied channels-last (the
engine's convolutions never hand one over). A channel's statistics are then column sums. With
few channels (ResNet's 16) a row is too short for NumPy's vectorised loops, so each block of rows
is seen as a wider matrix of k rows side by side, (rows/k, k*C), and its k*C column sums are
folded back to C. Column sums are GEMVs (ones @ block: 2x NumPy's sum(axis=0)), sums of products
einsum's (no temporary). The rows are cut into fixed blocks of about a megabyte (each block's sums,
then those partial sums in block order, in float64), spread over the cores: the result does not
depend on the thread count, and float32 sums gather less rounding than one long running sum. Each
pass over a block runs a handful of whole-block NumPy calls, so the Python between them is small
next to the work and the threads do not queue on the GIL.

Notation: x (M, C) rows, delta = dL/dy (times y > 0 after the fused ReLU), per channel
mean, invstd = 1/sqrt(var + eps), a = gamma invstd.
Forward, two passes: the shifted sums s1 = sum(x - K), s2 = sum((x - K)^2) with K the first
block's mean (one read of x; as exact as the two-pass formula while K is within a few standard
deviations of the mean, as a block's mean is: the rounding grows with ((mean - K)^2 + var) / var),
mean = K + s1/M, var = s2/M - (s1/M)^2; then y = x scale + shift (scale = a, shift = beta - mean a).
Backward, two passes: sum(delta), sum(delta (x - mean)); then
dx = delta a + x b + (c - mean b), b = -a invstd sum(delta xhat)/M, c = -a sum(delta)/M.
"""

from __future__ import annotations

import numpy as np

from ..functional import reference
from ..functional.caches import BatchNormCache
from . import parallel
from .layout import empty_like_layout, is_channels_last, to_channels_last

NAME = "cpu"
_BLOCK_ELEMENTS = 1 << 18  # elements per block of rows (1 MiB of float32): one partial sum, in cache
_WIDE = 128  # the wide view has at least this many columns


def _matrix(x):
    """x (N, C) or channels-last (N, C, H, W) as its (M, C) memory (a view)."""
    return x if x.ndim == 2 else x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])  # (N*H*W, C)


class _Rows:
    """The blocks of rows of an (M, C) matrix and their wide views (rows/k, k*C)."""

    def __init__(self, M: int, C: int, dtype):
        self.C, self.k = C, max(1, -(-_WIDE // C))
        rows = max(self.k, (_BLOCK_ELEMENTS // max(1, C)) // self.k * self.k)  # a multiple of k
        self.blocks = [(r, min(r + rows, M)) for r in range(0, M, rows)]
        self.ones = np.ones(rows // self.k + self.k, dtype=dtype)  # GEMV row sums of a wide or rest part

    def parts(self, a, r0, r1):
        """Block r0:r1 of a (M, C) -> [wide (q, k*C), rest (r, C)]: its first q*k rows side by side,
        and the r = (r1 - r0) % k rows left over (often none)."""
        q = (r1 - r0) // self.k
        b = a[r0:r1]
        return [b[: q * self.k].reshape(q, self.k * self.C), b[q * self.k :]]

    def tile(self, v):
        """A per-channel vector (C,) -> [wide (k*C,), rest (C,)], matching ``parts``."""
        return [np.tile(v, self.k), v]

    def colsum(self, part):
        return self.ones[: part.shape[0]] @ part  # (cols,): a GEMV

    def fold(self, wide_rest):
        """Sums over [wide (k*C,), rest (C,)] parts -> (C,)."""
        wide, rest = wide_rest
        return wide.reshape(self.k, self.C).sum(axis=0) + rest

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


def _shifted_sums(rows: _Rows, xm, K):
    """Per block: (sum(x - K), sum((x - K)^2)) per channel."""
    Kt = rows.tile(K)

    def block(r0, r1):
        s1, s2 = [], []
        for part, k in zip(rows.parts(xm, r0, r1), Kt):
            d = part - k  # (rows, cols): a block-sized temporary, in cache
            s1.append(rows.colsum(d))
            s2.append(np.einsum("ij,ij->j", d, d))
        return rows.fold(s1), rows.fold(s2)

    return block


def _batch_stats(rows: _Rows, xm, dtype):
    """(mean, biased var) per channel of the (M, C) rows, by the shifted sums."""
    M = xm.shape[0]
    r0, r1 = rows.blocks[0]
    first = rows.parts(xm, r0, r1)
    K = (rows.fold([rows.colsum(p) for p in first]) / (r1 - r0)).astype(dtype)  # the first block's mean
    s1, s2 = rows.sums(_shifted_sums(rows, xm, K), 2, np.float64)
    d = s1 / M
    return (K + d).astype(dtype), np.maximum(s2 / M - d * d, 0).astype(dtype)


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, activation=None):
    if x.ndim == 4 and not is_channels_last(x):
        x = to_channels_last(x)
    elif x.ndim == 2:
        x = np.ascontiguousarray(x)
    xm = _matrix(x)  # (M, C)
    M, C = xm.shape
    rows, t = _Rows(M, C, x.dtype), x.dtype.type
    batch_stats = training or running_mean is None
    if batch_stats:
        mean, var = _batch_stats(rows, xm, x.dtype)
        if training and running_mean is not None:
            reference.update_running_stats(running_mean, running_var, mean, var, momentum, M)
    else:
        mean, var = running_mean, running_var
    invstd = 1 / np.sqrt(var + t(eps))
    scale = invstd * gamma if gamma is not None else invstd
    shift = -mean * scale + beta if beta is not None else -mean * scale  # y = x scale + shift
    y = empty_like_layout(x, x.shape, x.dtype)
    ym, scale_t, shift_t = _matrix(y), rows.tile(scale), rows.tile(shift)
    relu = activation == "relu"

    def normalise(r0, r1):
        for o, v, s, h in zip(rows.parts(ym, r0, r1), rows.parts(xm, r0, r1), scale_t, shift_t):
            np.multiply(v, s, out=o)
            o += h
            if relu:
                np.maximum(o, 0, out=o)  # the fused ReLU, on the block while it is in cache

    rows.over(normalise)
    return y, BatchNormCache(NAME, x, gamma, mean, invstd, batch_stats, beta is not None, None, activation, y if relu else None)


def _delta_sums(rows: _Rows, dym, xm, ym, dxm, mean):
    """Per block: (sum(delta), sum(delta (x - mean))) per channel; with the fused ReLU (ym given),
    delta = dy (y > 0) is written into dx's rows on the way."""
    mean_t = rows.tile(mean)

    def block(r0, r1):
        s1, s2 = [], []
        src = rows.parts(dym, r0, r1)
        if ym is not None:
            src = rows.parts(dxm, r0, r1)
            for o, g, y in zip(src, rows.parts(dym, r0, r1), rows.parts(ym, r0, r1)):
                np.multiply(g, y > 0, out=o)
        for g, v, m in zip(src, rows.parts(xm, r0, r1), mean_t):
            s1.append(rows.colsum(g))
            s2.append(np.einsum("ij,ij->j", g, v - m))
        return rows.fold(s1), rows.fold(s2)

    return block


def batch_norm_backward(dy, cache):
    """dx = delta a + x b + (c - mean b) per channel (the module docstring), delta = dy (* (y > 0)
    with the fused ReLU). Two sweeps over the row blocks: the sums (with the fused ReLU, delta is
    written into dx's memory on the way), then dx."""
    x, mean, invstd = cache.x, cache.mean, cache.invstd
    if dy.strides != x.strides:
        dy = to_channels_last(dy, copy=True) if x.ndim == 4 else np.ascontiguousarray(dy)
    xm, dym = _matrix(x), _matrix(dy)
    M, C = xm.shape
    rows, t = _Rows(M, C, x.dtype), x.dtype.type
    dx = empty_like_layout(x, x.shape, x.dtype)
    dxm = _matrix(dx)
    relu = cache.activation == "relu"
    src = dxm if relu else dym  # delta: in dx's memory with the ReLU
    sum_dy, sum_dyc = rows.sums(_delta_sums(rows, dym, xm, _matrix(cache.y) if relu else None, dxm, mean), 2, x.dtype)
    sum_dyxhat = sum_dyc * invstd  # sum(delta (x - mean)) invstd
    dbeta = sum_dy if cache.has_beta else None
    dgamma = sum_dyxhat if cache.gamma is not None else None
    a = cache.gamma * invstd if cache.gamma is not None else invstd
    if not cache.batch_stats:  # the running statistics: constants, dx = delta a
        a_t = rows.tile(a)
        rows.over(
            lambda r0, r1: [np.multiply(g, aa, out=o) for o, g, aa in zip(rows.parts(dxm, r0, r1), rows.parts(src, r0, r1), a_t)]
        )
        return dx, dgamma, dbeta
    b = -a * invstd * sum_dyxhat * t(1.0 / M)
    c = -a * sum_dy * t(1.0 / M) - mean * b
    a_t, b_t, c_t = rows.tile(a), rows.tile(b), rows.tile(c)

    def step(r0, r1):
        for o, g, v, aa, bb, cc in zip(rows.parts(dxm, r0, r1), rows.parts(src, r0, r1), rows.parts(xm, r0, r1), a_t, b_t, c_t):
            xb = np.multiply(v, bb)  # a block-sized temporary
            np.multiply(g, aa, out=o)  # delta a (in place over delta with the ReLU)
            o += xb
            o += cc

    rows.over(step)
    return dx, dgamma, dbeta
