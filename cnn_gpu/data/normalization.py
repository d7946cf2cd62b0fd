"""Per-channel normalisation: ``(x / scale - mean[c]) / std[c]``, the same arithmetic for a whole
split (normalised once) and for one batch (data kept on the host, cnn_gpu/data/prefetch.py)."""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module


def normalize(x, mean, std, scale: float, dtype=np.float32):
    """(x / scale - mean[c]) / std[c] per channel, as ``dtype`` (float32 by default)."""
    return normalizer(get_array_module(x), mean, std, scale, dtype)(x)


def normalizer(xp, mean, std, scale: float, dtype=np.float32):
    """:func:`normalize` as a function of x on ``xp``, its per-channel constants made (uploaded) once."""
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}")
    mean = xp.asarray(np.asarray(mean, dtype=dt).reshape(1, -1, 1, 1))
    inv_std = xp.asarray((1.0 / np.asarray(std, dtype=np.float64)).astype(dt).reshape(1, -1, 1, 1))
    factor = dt.type(1.0 / scale)

    def apply(x):
        if mean.shape[1] != x.shape[1]:
            raise ValueError(f"mean: expected {x.shape[1]} channel values for x of shape {tuple(x.shape)}, got {mean.shape[1]}")
        out = x.astype(dt) * factor
        out -= mean
        out *= inv_std
        return out

    return apply


__all__ = ["normalize", "normalizer"]
