"""The CPU engine's fully connected layer: the reference's GEMMs, split over the cores by
features (so no partial sums are added), with the bias and a fused ReLU applied per part."""

from __future__ import annotations

import numpy as np

from ..functional.caches import LinearCache
from . import parallel

_MIN_PART_MACS = 1 << 24  # a part of a split GEMM keeps at least this many multiply-adds


def _min_features(a: int, b: int) -> int:
    """The fewest features per part of a split GEMM whose every feature costs a * b multiply-adds."""
    return -(-_MIN_PART_MACS // max(1, a * b))


def linear_forward(x, w, b, activation=None):
    """y = x @ w^T + b (relu(y) with the activation), the output features split over the cores."""
    N, (n_out, n_in) = x.shape[0], w.shape
    y = np.empty((N, n_out), dtype=x.dtype)

    def part(o0, o1):
        yp = y[:, o0:o1]
        np.matmul(x, w[o0:o1].T, out=yp)  # (N, in) @ (in, o)
        if b is not None:
            yp += b[o0:o1]
        if activation == "relu":
            np.maximum(yp, 0, out=yp)

    parallel.over_range(n_out, part, _min_features(N, n_in))
    return y, LinearCache("cpu", x, w, b is not None, activation, y if activation else None)


def linear_backward(dy, cache, input_grad=True):
    """The input features split over the cores: each part computes its columns of dx and dw."""
    x, w = cache.x, cache.w
    N, (n_out, n_in) = x.shape[0], w.shape
    delta = dy * (cache.y > 0) if cache.activation == "relu" else dy
    dx = np.empty((N, n_in), dtype=dy.dtype) if input_grad else None
    dw = np.empty((n_out, n_in), dtype=dy.dtype)

    def part(i0, i1):
        if dx is not None:
            np.matmul(delta, w[:, i0:i1], out=dx[:, i0:i1])  # (N, out) @ (out, i)
        np.matmul(delta.T, x[:, i0:i1], out=dw[:, i0:i1])  # (out, N) @ (N, i)

    parallel.over_range(n_in, part, _min_features(N, n_out))
    db = delta.sum(axis=0) if cache.has_bias else None  # (out,)
    return dx, dw, db
