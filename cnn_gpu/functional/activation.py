"""Activations, flatten and dropout, the public API. The math (functional/reference.py), with
delta = dL/dy, each backward returning delta * f'(x):
    relu        f'(x) = 1 if x > 0 else 0          (cache: the output y; y > 0 iff x > 0)
    leaky_relu  f'(x) = 1 if x > 0 else slope
    sigmoid     f'(x) = y (1 - y)
    tanh        f'(x) = 1 - y^2
    gelu        f'(x) = Phi(x) + x phi(x)  (Phi, phi: the standard normal's cdf and density), or the
                derivative of torch's tanh approximation with approximate="tanh"
    dropout     y = x * mask / (1 - p), dx = dy * mask / (1 - p) (inverted dropout)
    add         y = a + b, or relu(a + b) (a residual block's sum and the ReLU after it, one op):
                the backward returns delta (* relu'(y)), the gradient of both addends
"""

from __future__ import annotations

import math

from . import _dispatch
from ._checks import check_activation, check_dy, check_float, check_same_dtype, check_shape, same_xp
from .caches import AddCache, DropoutCache, GeluCache


def _elementwise(op, x):
    check_float("x", x)
    return _dispatch.impl(op, x)(x)


def _backward(op, dy, cache, like):
    check_dy(dy, tuple(like.shape), like.dtype)
    return _dispatch.impl(op, dy)(dy, cache)


def relu_forward(x):
    """relu(x) = max(x, 0) -> (y, cache); the cache is y."""
    return _elementwise("relu_forward", x)


def relu_backward(dy, cache):
    """dx = dy where the forward's output was positive, else 0 (``cache``: relu_forward's)."""
    return _backward("relu_backward", dy, cache, cache)


def add_forward(a, b, activation=None):
    """y = a + b -> (y, cache); ``activation="relu"``: relu(a + b) in one op (how nn.Sequential runs
    a ReLU after a Residual). a and b have one shape and dtype: nothing is broadcast or cast."""
    check_float("a", a)
    check_float("b", b)
    same_xp("b", b, "a", a)
    check_same_dtype("b", b, "a", a)
    check_shape("b", b, tuple(a.shape))
    check_activation(activation)
    return _dispatch.impl("add_forward", a)(a, b, activation)


def add_backward(dy, cache: AddCache):
    """dy -> the gradient of both addends (dy, or dy * relu'(y) with the ReLU)."""
    if not isinstance(cache, AddCache):
        raise TypeError(f"cache: expected the AddCache of add_forward, got {type(cache).__name__}")
    check_dy(dy, cache.shape, cache.dtype)
    return _dispatch.impl("add_backward", dy)(dy, cache)


def leaky_relu_forward(x, negative_slope=0.01):
    """x where x > 0, else ``negative_slope`` * x -> (y, cache)."""
    check_float("x", x)
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"negative_slope: expected a float, got {negative_slope!r}")
    return _dispatch.impl("leaky_relu_forward", x)(x, negative_slope)


def leaky_relu_backward(dy, cache):
    """dx = dy where x > 0, else ``negative_slope`` * dy (``cache``: leaky_relu_forward's)."""
    return _backward("leaky_relu_backward", dy, cache, cache[0])


def sigmoid_forward(x):
    """1 / (1 + exp(-x)), computed without overflow -> (y, cache); the cache is y."""
    return _elementwise("sigmoid_forward", x)


def sigmoid_backward(dy, cache):
    """dx = dy * y * (1 - y) (``cache``: sigmoid_forward's y)."""
    return _backward("sigmoid_backward", dy, cache, cache)


def tanh_forward(x):
    """tanh(x) -> (y, cache); the cache is y."""
    return _elementwise("tanh_forward", x)


def tanh_backward(dy, cache):
    """dx = dy * (1 - y^2) (``cache``: tanh_forward's y)."""
    return _backward("tanh_backward", dy, cache, cache)


GELU_APPROXIMATIONS = ("none", "tanh")


def gelu_forward(x, approximate="none"):
    """GELU as torch: x * Phi(x) (``approximate="none"``, with erf) or the tanh approximation."""
    check_float("x", x)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate: expected one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    return _dispatch.impl("gelu_forward", x)(x, approximate)


def gelu_backward(dy, cache: GeluCache):
    """dx = dy * GELU'(x), in the form (exact or tanh) gelu_forward used (``cache``: its GeluCache)."""
    if not isinstance(cache, GeluCache):
        raise TypeError(f"cache: expected the GeluCache of gelu_forward, got {type(cache).__name__}")
    return _backward("gelu_backward", dy, cache, cache.x)


def flatten_forward(x):
    """(N, ...) -> (N, prod(...)); the cache is the input shape."""
    check_float("x", x)
    if x.ndim < 1:
        raise ValueError("x: expected at least 1 dimension (the batch), got a 0-D array")
    return _dispatch.impl("flatten_forward", x)(x)


def flatten_backward(dy, cache):
    """(N, prod(...)) -> the forward's input shape (``cache``: flatten_forward's shape)."""
    shape = tuple(cache)
    check_float("dy", dy, ndim=2)
    check_shape("dy", dy, (shape[0], math.prod(shape[1:])))
    return _dispatch.impl("flatten_backward", dy)(dy, shape)


def dropout_forward(x, p, training, rng=None, *, key=None):
    """Inverted dropout -> (y, cache). The mask's randomness: ``key`` (an int in [0, 2**64): the
    counter-based draw of functional/counter_rng.py, the same bits on every engine, no state;
    what nn.Dropout uses), or ``rng``, a Generator of the array's backend."""
    check_float("x", x)
    if not isinstance(p, (float, int)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ValueError(f"p: expected a probability in [0, 1), got {p!r}")
    if training and p > 0.0:
        if key is not None:
            if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 2**64:
                raise ValueError(f"key: expected an int in [0, 2**64), got {key!r}")
        elif rng is None or not hasattr(rng, "random"):
            raise TypeError(f"rng: expected a random Generator of the array's backend (or key=), got {type(rng).__name__}")
    y, cache = _dispatch.impl("dropout_forward", x)(x, p, training, rng, key)
    if cache.mask is not None and type(cache.mask) is not type(x):
        raise TypeError(f"rng: expected a Generator of the same backend as x, got {type(rng).__module__}.{type(rng).__name__}")
    return y, cache


def dropout_backward(dy, cache: DropoutCache):
    """dx = dy * mask, the forward's mask (dy itself when the forward dropped nothing: eval mode or p = 0)."""
    if cache.mask is None:
        return dy
    check_dy(dy, tuple(cache.mask.shape), cache.mask.dtype)
    return _dispatch.impl("dropout_backward", dy)(dy, cache)


__all__ = [
    "add_forward",
    "add_backward",
    "AddCache",
    "relu_forward",
    "relu_backward",
    "leaky_relu_forward",
    "leaky_relu_backward",
    "sigmoid_forward",
    "sigmoid_backward",
    "tanh_forward",
    "tanh_backward",
    "gelu_forward",
    "gelu_backward",
    "flatten_forward",
    "flatten_backward",
    "dropout_forward",
    "dropout_backward",
    "DropoutCache",
]
