"""Functional ops: each op's forward and backward side by side, written against ``xp``.

``*_forward(...) -> (y, cache)`` and ``*_backward(dy, cache) -> gradients``.
On CuPy arrays the index-heavy ops run in cnn_gpu's CUDA kernels (see ``_dispatch``).
"""
from ._dispatch import use_kernels
from .activation import (
    dropout_backward,
    dropout_forward,
    flatten_backward,
    flatten_forward,
    leaky_relu_backward,
    leaky_relu_forward,
    relu_backward,
    relu_forward,
    sigmoid_backward,
    sigmoid_forward,
    tanh_backward,
    tanh_forward,
)
from .conv import Conv2dCache, col2im, conv2d_backward, conv2d_forward, im2col
from .linear import LinearCache, linear_backward, linear_forward
from .loss import log_softmax, softmax, softmax_cross_entropy
from .pool import (
    AvgPool2dCache,
    MaxPool2dCache,
    avg_pool2d_backward,
    avg_pool2d_forward,
    max_pool2d_backward,
    max_pool2d_forward,
)

__all__ = [
    "use_kernels",
    "conv2d_forward", "conv2d_backward", "im2col", "col2im", "Conv2dCache",
    "max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward", "avg_pool2d_backward",
    "MaxPool2dCache", "AvgPool2dCache",
    "linear_forward", "linear_backward", "LinearCache",
    "relu_forward", "relu_backward", "leaky_relu_forward", "leaky_relu_backward",
    "sigmoid_forward", "sigmoid_backward", "tanh_forward", "tanh_backward",
    "flatten_forward", "flatten_backward", "dropout_forward", "dropout_backward",
    "softmax", "log_softmax", "softmax_cross_entropy",
]
