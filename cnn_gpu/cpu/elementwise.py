"""The CPU engine's ReLU and residual sum (+ ReLU): the reference's, split over the batch on the
cores when large, in the input's layout."""

from __future__ import annotations

import numpy as np

from ..functional.caches import AddCache
from . import parallel

_MIN_PART_ELEMENTS = 1 << 18  # a part of the batch spread over the cores keeps this many elements


def _over_batch(a, fn):
    """fn(n0, n1) over slices of a's first axis, on the cores when a is large."""
    if a.ndim == 0:
        return fn(0, 1)
    per = a.size // max(1, a.shape[0])
    return parallel.over_range(a.shape[0], fn, -(-_MIN_PART_ELEMENTS // max(1, per)))


def relu_forward(x):
    if x.ndim == 0:
        y = np.maximum(x, 0)
        return y, y
    y = np.empty_like(x)  # x's layout

    def part(n0, n1):
        np.maximum(x[n0:n1], 0, out=y[n0:n1])

    _over_batch(x, part)
    return y, y


def add_forward(a, b, activation=None):
    """y = a + b, then relu(y) in place on each part while it is in cache (a's layout)."""
    relu = activation == "relu"
    if a.ndim == 0:
        y = np.add(a, b)
        y = np.maximum(y, 0) if relu else y
        return y, AddCache((), y.dtype, y if relu else None)
    y = np.empty_like(a)

    def part(n0, n1):
        np.add(a[n0:n1], b[n0:n1], out=y[n0:n1])
        if relu:
            np.maximum(y[n0:n1], 0, out=y[n0:n1])

    _over_batch(a, part)
    return y, AddCache(tuple(y.shape), y.dtype, y if relu else None)


def add_backward(dy, cache):
    return dy if cache.y is None else relu_backward(dy, cache.y)


def relu_backward(dy, y):
    if dy.ndim == 0:
        return dy * (y > 0)
    dx = np.empty_like(dy)

    def part(n0, n1):
        np.multiply(dy[n0:n1], y[n0:n1] > 0, out=dx[n0:n1])  # delta * f'(x), branch-free

    _over_batch(dy, part)
    return dx
