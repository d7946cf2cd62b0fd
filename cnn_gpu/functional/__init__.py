"""The functional ops: each op a forward/backward pair, ``*_forward(...) -> (y, cache)`` and
``*_backward(dy, cache) -> gradients``.

The math of every op is in :mod:`cnn_gpu.functional.reference`, forward and backward side by
side; the functions here check their arguments and run the op on an engine (the reference,
the CPU engine or the CUDA engine; see ``_dispatch``).
"""

from . import reference
from .activation import (
    AddCache,
    DropoutCache,
    add_backward,
    add_forward,
    dropout_backward,
    dropout_forward,
    flatten_backward,
    flatten_forward,
    gelu_backward,
    gelu_forward,
    leaky_relu_backward,
    leaky_relu_forward,
    relu_backward,
    relu_forward,
    sigmoid_backward,
    sigmoid_forward,
    tanh_backward,
    tanh_forward,
)
from .caches import AdaptivePool2dCache, AvgPool2dCache, BatchNormCache, Conv2dCache, GeluCache, LinearCache, MaxPool2dCache
from .conv import col2im, conv2d_backward, conv2d_forward, im2col
from .linear import linear_backward, linear_forward
from .loss import check_label_smoothing, log_softmax, softmax, softmax_cross_entropy
from .norm import batch_norm_backward, batch_norm_forward
from .pool import (
    adaptive_avg_pool2d_backward,
    adaptive_avg_pool2d_forward,
    avg_pool2d_backward,
    avg_pool2d_forward,
    max_pool2d_backward,
    max_pool2d_forward,
)

__all__ = [
    "reference",
    "conv2d_forward",
    "conv2d_backward",
    "im2col",
    "col2im",
    "Conv2dCache",
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
    "MaxPool2dCache",
    "AvgPool2dCache",
    "adaptive_avg_pool2d_forward",
    "adaptive_avg_pool2d_backward",
    "AdaptivePool2dCache",
    "batch_norm_forward",
    "batch_norm_backward",
    "BatchNormCache",
    "gelu_forward",
    "gelu_backward",
    "GeluCache",
    "linear_forward",
    "linear_backward",
    "LinearCache",
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
    "flatten_forward",
    "flatten_backward",
    "dropout_forward",
    "dropout_backward",
    "DropoutCache",
    "softmax",
    "log_softmax",
    "softmax_cross_entropy",
    "check_label_smoothing",
]
