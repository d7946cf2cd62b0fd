"""Fully connected layer, forward and backward.

x (N, in), w (out, in), b (out,), y (N, out):
    forward   y  = x @ w^T + b
    backward  delta = dL/dy (N, out)
              dx = delta @ w          (N, in)
              dw = delta^T @ x        (out, in)   the textbook dL/dW = delta a_prev^T, summed over the batch
              db = sum_n delta[n]     (out,)
"""
from __future__ import annotations

from typing import Any, NamedTuple

from ..backend import get_array_module
from . import _parallel
from ._checks import check_float, check_same_dtype, check_shape, describe, same_xp


class LinearCache(NamedTuple):
    x: Any  # (N, in)
    w: Any  # (out, in)
    has_bias: bool


# A part of a split GEMM should keep at least this many multiply-adds (see _parallel).
_MIN_PART_MACS = 1 << 24


def _min_rows(a: int, b: int) -> int:
    """The fewest features per part of a split GEMM whose every feature costs a * b multiply-adds."""
    return -(-_MIN_PART_MACS // max(1, a * b))


def linear_forward(x, w, b=None):
    """y = x @ w.T + b -> (y, cache). On NumPy the output features are split over the cores."""
    check_float("x", x, ndim=2)
    check_float("w", w, ndim=2)
    same_xp("w", w, "x", x)
    check_same_dtype("w", w, "x", x)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w: expected shape (out, {x.shape[1]}) to match x of shape {tuple(x.shape)}, got {describe(w)}")
    if b is not None:
        check_float("b", b, ndim=1)
        same_xp("b", b, "x", x)
        check_same_dtype("b", b, "x", x)
        check_shape("b", b, (w.shape[0],))
    xp = get_array_module(x)
    N, (n_out, n_in) = x.shape[0], w.shape
    y = xp.empty((N, n_out), dtype=x.dtype)

    def cols(o0, o1):
        xp.matmul(x, w[o0:o1].T, out=y[:, o0:o1])  # (N, in) @ (in, o)
        if b is not None:
            y[:, o0:o1] += b[o0:o1]

    _parallel.over_range(xp, n_out, cols, _min_rows(N, n_in))  # split: the output features
    return y, LinearCache(x, w, b is not None)


def linear_backward(dy, cache: LinearCache):
    """dy (N, out) -> (dx (N, in), dw (out, in), db (out,) or None). On NumPy the input
    features are split over the cores: each part computes its columns of dx and dw, so no
    partial sums are added."""
    x, w, has_bias = cache
    check_float("dy", dy, ndim=2)
    check_shape("dy", dy, (x.shape[0], w.shape[0]))
    check_same_dtype("dy", dy, "x", x)
    xp = get_array_module(dy)
    N, (n_out, n_in) = x.shape[0], w.shape
    dx = xp.empty((N, n_in), dtype=dy.dtype)
    dw = xp.empty((n_out, n_in), dtype=dy.dtype)

    def cols(i0, i1):
        xp.matmul(dy, w[:, i0:i1], out=dx[:, i0:i1])  # (N, out) @ (out, i)
        xp.matmul(dy.T, x[:, i0:i1], out=dw[:, i0:i1])  # (out, N) @ (N, i)

    _parallel.over_range(xp, n_in, cols, _min_rows(N, n_out))  # split: the input features
    db = dy.sum(axis=0) if has_bias else None  # (out,)
    return dx, dw, db
