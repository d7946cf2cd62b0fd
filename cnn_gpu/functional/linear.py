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
from ._checks import check_float, check_same_dtype, check_shape, describe, same_xp


class LinearCache(NamedTuple):
    x: Any  # (N, in)
    w: Any  # (out, in)
    has_bias: bool


def linear_forward(x, w, b=None):
    """y = x @ w.T + b -> (y, cache)."""
    check_float("x", x, ndim=2)
    check_float("w", w, ndim=2)
    same_xp("w", w, "x", x)
    check_same_dtype("w", w, "x", x)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w: expected shape (out, {x.shape[1]}) to match x of shape {tuple(x.shape)}, got {describe(w)}")
    xp = get_array_module(x)
    y = xp.matmul(x, w.T)  # (N, out)
    if b is not None:
        check_float("b", b, ndim=1)
        same_xp("b", b, "x", x)
        check_same_dtype("b", b, "x", x)
        check_shape("b", b, (w.shape[0],))
        y += b
    return y, LinearCache(x, w, b is not None)


def linear_backward(dy, cache: LinearCache):
    """dy (N, out) -> (dx (N, in), dw (out, in), db (out,) or None)."""
    x, w, has_bias = cache
    check_float("dy", dy, ndim=2)
    check_shape("dy", dy, (x.shape[0], w.shape[0]))
    check_same_dtype("dy", dy, "x", x)
    xp = get_array_module(dy)
    dx = xp.matmul(dy, w)  # (N, in)
    dw = xp.matmul(dy.T, x)  # (out, in)
    db = dy.sum(axis=0) if has_bias else None  # (out,)
    return dx, dw, db
