"""Fully connected layer, the public API. The math (functional/reference.py):
forward   y = x @ w^T + b                    x (N, in), w (out, in), b (out,)
backward  dx = delta @ w,  dw = delta^T @ x,  db = sum_n delta[n]      delta = dL/dy
"""

from __future__ import annotations

from . import _dispatch
from ._checks import check_accumulate_into, check_activation, check_dy, check_float, check_weights
from .caches import LinearCache


def linear_forward(x, w, b=None, activation=None):
    """y = x @ w.T + b -> (y, cache); ``activation="relu"`` returns relu(y) (see conv2d_forward).
    The cache refers to x: x must not change before the backward."""
    check_float("x", x, ndim=2)
    check_weights(x, w, b, x.shape[1], "linear")
    check_activation(activation)
    return _dispatch.impl("linear_forward", x)(x, w, b, activation)


def linear_backward(dy, cache: LinearCache, input_grad=True, *, accumulate_into=None):
    """dy (N, out) -> (dx (N, in) or None without ``input_grad``, dw (out, in), db (out,) or None).
    ``accumulate_into=(dw_acc, db_acc)``: add dw and db into these arrays (see conv2d_backward)."""
    if not isinstance(cache, LinearCache):
        raise TypeError(f"cache: expected the LinearCache of linear_forward, got {type(cache).__name__}")
    check_dy(dy, (cache.x.shape[0], cache.w.shape[0]), cache.x.dtype, "the forward output")
    check_accumulate_into(accumulate_into, [("dw", cache.w.shape), ("db", cache.w.shape[:1] if cache.has_bias else None)], dy)
    return _dispatch.backward_into(_dispatch.impl_for("linear_backward", cache), (dy, cache, input_grad), accumulate_into)


__all__ = ["linear_forward", "linear_backward", "LinearCache"]
