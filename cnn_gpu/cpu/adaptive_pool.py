"""The CPU engine's adaptive average pooling: the reference's windows (functional/reference.py),
with the gradient written in the input's memory layout. A channels-last activation (the
engine's convolutions produce them) gets a channels-last dx, so the elementwise backward steps
before it (ReLU, a residual sum, BatchNorm) keep running on arrays of one layout instead of
mixing NCHW and NHWC strides (3-5x slower per pass) or copying between them.
"""

from __future__ import annotations

import numpy as np

from ..functional import reference
from ..functional.caches import AdaptivePool2dCache
from .layout import is_channels_last

NAME = "cpu"


def adaptive_avg_pool2d_forward(x, output_size):
    OH, OW = output_size
    if (OH, OW) == (1, 1):
        y = x.mean(axis=(2, 3), keepdims=True)  # (N, C, 1, 1): global average pooling
    else:
        y, _ = reference.adaptive_avg_pool2d_forward(x, output_size)
    return y, AdaptivePool2dCache(NAME, tuple(x.shape), x.dtype, (OH, OW), is_channels_last(x))


def adaptive_avg_pool2d_backward(dy, cache):
    """dx[n, c, h, w] = the sum over the windows (i, j) containing (h, w) of dy[n, c, i, j] / |window|,
    in the forward input's layout."""
    N, C, H, W = cache.x_shape
    if cache.aux:
        dx = np.zeros((N, H, W, C), dtype=dy.dtype).transpose(0, 3, 1, 2)  # (N, C, H, W) view of NHWC memory
    else:
        dx = np.zeros(cache.x_shape, dtype=dy.dtype)
    return reference.adaptive_avg_pool2d_scatter(dy, dx)
