"""Activations, flatten and dropout: forward/backward pairs.

With delta = dL/dy, each backward returns dL/dx = delta * f'(x) (a product: a NaN or inf in
delta stays NaN where f'(x) = 0):
    relu        f'(x) = 1 if x > 0 else 0          (cache: the output y; y > 0 iff x > 0)
    leaky_relu  f'(x) = 1 if x > 0 else slope
    sigmoid     f'(x) = y (1 - y)
    tanh        f'(x) = 1 - y^2
    dropout     y = x * mask / (1 - p), dx = dy * mask / (1 - p) (inverted dropout)
"""
from __future__ import annotations

from typing import Any, NamedTuple

from ..backend import get_array_module
from . import _parallel
from ._checks import check_float, check_same_dtype, check_shape


def _check_dy(dy, like):
    check_float("dy", dy)
    check_shape("dy", dy, like.shape)
    check_same_dtype("dy", dy, "the forward input", like)


# Elementwise ops split the batch over the cores (see _parallel) when a part keeps this many elements.
_MIN_PART_ELEMENTS = 1 << 18


def _over_batch(xp, a, fn):
    """fn(n0, n1) over slices of a's first axis, on the cores (NumPy) when a is large."""
    n = a.shape[0] if a.ndim else 1
    per = a.size // max(1, n)
    if a.ndim == 0:
        return fn(0, 1)
    return _parallel.over_range(xp, n, fn, -(-_MIN_PART_ELEMENTS // max(1, per)))


def relu_forward(x):
    check_float("x", x)
    xp = get_array_module(x)
    if x.ndim == 0:
        y = xp.maximum(x, 0)
        return y, y
    y = xp.empty_like(x)  # x's layout

    def part(n0, n1):
        xp.maximum(x[n0:n1], 0, out=y[n0:n1])

    _over_batch(xp, x, part)
    return y, y


def relu_backward(dy, cache):
    y = cache
    _check_dy(dy, y)
    xp = get_array_module(dy)
    if dy.ndim == 0:
        return dy * (y > 0)
    dx = xp.empty_like(dy)

    def part(n0, n1):
        xp.multiply(dy[n0:n1], y[n0:n1] > 0, out=dx[n0:n1])  # delta * f'(x), branch-free

    _over_batch(xp, dy, part)
    return dx


def relu_backward_(dy, y):
    """In place: dy *= (y > 0), for a scratch dy the caller owns (the layers' fast path; y is
    the ReLU's output). Returns dy."""
    xp = get_array_module(dy)

    def part(n0, n1):
        xp.multiply(dy[n0:n1], y[n0:n1] > 0, out=dy[n0:n1])

    _over_batch(xp, dy, part)
    return dy


class LeakyReluCache(NamedTuple):
    x: Any
    negative_slope: float


def leaky_relu_forward(x, negative_slope=0.01):
    check_float("x", x)
    xp = get_array_module(x)
    s = x.dtype.type(negative_slope)
    return xp.where(x > 0, x, x * s), LeakyReluCache(x, float(negative_slope))


def leaky_relu_backward(dy, cache: LeakyReluCache):
    x, slope = cache
    _check_dy(dy, x)
    xp = get_array_module(dy)
    return xp.where(x > 0, dy, dy * dy.dtype.type(slope))


def sigmoid_forward(x):
    check_float("x", x)
    xp = get_array_module(x)
    # stable for large |x|: exp of a non-positive number only
    e = xp.exp(-xp.abs(x))
    y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
    return y, y


def sigmoid_backward(dy, cache):
    y = cache
    _check_dy(dy, y)
    return dy * y * (1 - y)


def tanh_forward(x):
    check_float("x", x)
    xp = get_array_module(x)
    y = xp.tanh(x)
    return y, y


def tanh_backward(dy, cache):
    y = cache
    _check_dy(dy, y)
    return dy * (1 - y * y)


def flatten_forward(x):
    """(N, ...) -> (N, prod(...)); the cache is the input shape."""
    check_float("x", x)
    if x.ndim < 1:
        raise ValueError("x: expected at least 1 dimension (the batch), got a 0-D array")
    return x.reshape(x.shape[0], -1), tuple(x.shape)  # (N, C*H*W)


def flatten_backward(dy, cache):
    shape = cache
    check_float("dy", dy, ndim=2)
    n = 1
    for s in shape[1:]:
        n *= s
    check_shape("dy", dy, (shape[0], n))
    return dy.reshape(shape)


class DropoutCache(NamedTuple):
    mask: Any  # scaled mask: 0 or 1/(1-p), same dtype as x; None when inactive


def dropout_forward(x, p, training, rng):
    """Inverted dropout. ``rng``: a NumPy Generator for NumPy arrays, a CuPy Generator for CuPy arrays."""
    check_float("x", x)
    if not isinstance(p, (float, int)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ValueError(f"p: expected a probability in [0, 1), got {p!r}")
    if not training or p == 0.0:
        return x, DropoutCache(None)
    if rng is None or not hasattr(rng, "random"):
        raise TypeError(f"rng: expected a random Generator of the array's backend, got {type(rng).__name__}")
    u = rng.random(x.shape, dtype=x.dtype)
    if get_array_module(u) is not get_array_module(x):
        raise TypeError(f"rng: expected a Generator of the same backend as x, got {type(rng).__module__}.{type(rng).__name__}")
    keep = u >= x.dtype.type(p)
    mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, DropoutCache(mask)


def dropout_backward(dy, cache: DropoutCache):
    if cache.mask is None:
        return dy
    _check_dy(dy, cache.mask)
    return dy * cache.mask
