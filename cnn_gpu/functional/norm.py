"""Batch normalisation, the public API (torch's semantics). The math is in functional/reference.py.

``batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5)``
normalises each channel c of x (N, C) or (N, C, H, W) over its M = N*H*W values:

* ``training=True``: with the batch's mean and biased variance; ``running_mean`` and
  ``running_var`` (if given) are updated in place, the variance as its unbiased estimate
  var * M / (M - 1), as torch does. M = 1 (one value per channel) is an error, as in torch.
* ``training=False``: with ``running_mean`` / ``running_var``; without them (None), with the
  batch's statistics (torch's track_running_stats=False).
* ``num_batches_tracked`` (a 0-d int64 array, the layers' buffer): incremented in place whenever
  the running statistics are updated (the CUDA engine does it in its last launch).

``gamma`` / ``beta`` (C,) may be None (no affine step). An empty batch gives an empty y and
leaves the running statistics alone (as torch). The cache refers to x and to the
statistics used: they must not change between forward and backward.
"""

from __future__ import annotations

import math

import numpy as np

from . import _dispatch
from ._checks import check_accumulate_into, check_activation, check_dy, check_float, check_same_dtype, describe, same_xp
from .caches import BatchNormCache


def _check_channel_vector(name, v, x):
    """``v``: one value per channel of x, of x's dtype; the running statistics of float16 x are
    float32 (the float16 kernels keep every statistic in float32: kernels/batchnorm.cu)."""
    if v is None:
        return
    check_float(name, v, ndim=1)
    same_xp(name, v, "x", x)
    if name.startswith("running_") and x.dtype == np.float16:
        if v.dtype != np.float32:
            raise TypeError(f"{name}: expected a float32 array (the statistics of float16 x), got {v.dtype}")
    else:
        check_same_dtype(name, v, "x", x)
    if v.shape[0] != x.shape[1]:
        raise ValueError(
            f"{name}: expected shape ({x.shape[1]},), one value per channel of x of shape {tuple(x.shape)}, got {describe(v)}"
        )


def _check_scalars(training, momentum, eps):
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {training!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a float in [0, 1], got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps: expected a positive float, got {eps!r}")


def _check_counter(num_batches_tracked, x):
    if num_batches_tracked is None:
        return
    if getattr(num_batches_tracked, "shape", None) != () or num_batches_tracked.dtype != np.int64:
        raise TypeError(
            f"num_batches_tracked: expected a 0-d int64 array (incremented in place), got {describe(num_batches_tracked)}"
        )
    same_xp("num_batches_tracked", num_batches_tracked, "x", x)


def batch_norm_forward(
    x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5, *, activation=None, num_batches_tracked=None
):
    """x (N, C) or (N, C, H, W) -> (y of x's shape, cache); ``activation="relu"``: relu(y), one op."""
    check_float("x", x)
    if x.ndim not in (2, 4):
        raise ValueError(f"x: expected a 2-D (N, C) or 4-D (N, C, H, W) array, got {describe(x)}")
    for name, v in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)):
        _check_channel_vector(name, v, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean, running_var: expected both arrays or both None, got "
            f"{'None' if running_mean is None else 'an array'} and {'None' if running_var is None else 'an array'}"
        )
    _check_scalars(training, momentum, eps)
    check_activation(activation)
    _check_counter(num_batches_tracked, x)
    per_channel = math.prod(x.shape) // x.shape[1] if x.shape[1] else 0
    if (training or running_mean is None) and per_channel == 1:
        raise ValueError(
            f"x: expected more than 1 value per channel to compute batch statistics (training), got "
            f"{describe(x)}; a batch of one sample cannot be normalised by its own statistics"
        )
    fn = _dispatch.impl("batch_norm_forward", x)
    args = (x, gamma, beta, running_mean, running_var, training, float(momentum), float(eps), activation)
    if not (training and running_mean is not None and num_batches_tracked is not None):
        return fn(*args)
    if _dispatch.takes(fn, "num_batches_tracked"):
        return fn(*args, num_batches_tracked=num_batches_tracked)
    out = fn(*args)
    num_batches_tracked += 1  # in place
    return out


def batch_norm_backward(dy, cache: BatchNormCache, *, accumulate_into=None):
    """dy (x's shape) -> (dx, dgamma or None, dbeta or None). ``accumulate_into=(dgamma_acc,
    dbeta_acc)``: add dgamma and dbeta into these arrays (see conv2d_backward)."""
    if not isinstance(cache, BatchNormCache):
        raise TypeError(f"cache: expected the BatchNormCache of batch_norm_forward, got {type(cache).__name__}")
    check_dy(dy, tuple(cache.x.shape), cache.x.dtype)
    C = cache.x.shape[1]
    check_accumulate_into(
        accumulate_into, [("dgamma", (C,) if cache.gamma is not None else None), ("dbeta", (C,) if cache.has_beta else None)], dy
    )
    return _dispatch.backward_into(_dispatch.impl_for("batch_norm_backward", cache), (dy, cache), accumulate_into)


__all__ = ["batch_norm_forward", "batch_norm_backward", "BatchNormCache"]
