"""What each op's forward hands to its backward: small NamedTuples, shared by every engine.

``engine`` names the engine that made the cache; the public backward runs that engine's
backward (a cache may hold engine-private data in ``aux``). A cache refers to the forward's
inputs: they must not change between forward and backward -- except a convolution's input x,
which every engine either does not need in the backward (its columns are kept) or copies
(conv2d_forward: tests/test_reliability.py holds every engine and layout to it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..backend import get_array_module
from .geometry import ConvGeometry, PoolGeometry


class Conv2dCache(NamedTuple):
    engine: str
    g: ConvGeometry
    x: Any  # the input (N, C, H, W), in the engine's memory layout
    w: Any  # (F, C/G, KH, KW)
    has_bias: bool
    activation: str | None  # "relu" when forward returned relu(conv(x) + b)
    y: Any  # the output, kept when an activation was applied (its backward needs y > 0), else None
    aux: Any = None  # engine-private (kept columns, chunking, ...)

    @property
    def x_shape(self) -> tuple:
        return self.g.x_shape

    @property
    def stride(self) -> tuple:
        return self.g.stride

    @property
    def padding(self) -> tuple:
        return self.g.padding

    @property
    def dilation(self) -> tuple:
        return self.g.dilation


class MaxPool2dCache(NamedTuple):
    engine: str
    g: PoolGeometry
    dtype: Any  # of the forward input; dy must match it
    index: Any  # (N, C, OH, OW): the winner of each window, as ``index_kind`` says
    index_kind: str = "flat"  # "flat": int32 h*W + w in the unpadded plane; "tap": kh*KW + kw

    @property
    def x_shape(self) -> tuple:
        return self.g.x_shape

    @property
    def argmax(self):
        """int32 (N, C, OH, OW): the flat index h*W + w of each window's winner in its input plane."""
        if self.index_kind == "flat":
            return self.index
        return tap_to_flat(self.index, self.g)


class AvgPool2dCache(NamedTuple):
    engine: str
    g: PoolGeometry
    dtype: Any

    @property
    def x_shape(self) -> tuple:
        return self.g.x_shape


class LinearCache(NamedTuple):
    engine: str
    x: Any  # (N, in)
    w: Any  # (out, in)
    has_bias: bool
    activation: str | None = None
    y: Any = None  # kept when an activation was applied


class BatchNormCache(NamedTuple):
    engine: str
    x: Any  # the input (N, C) or (N, C, H, W), in the engine's memory layout
    gamma: Any  # (C,), or None without the affine step (then gamma = 1)
    mean: Any  # (C,): the mean that normalised x (the batch's, or the running mean)
    invstd: Any  # (C,): 1 / sqrt(var + eps) that normalised x
    batch_stats: bool  # True: mean and invstd came from x itself (their gradient flows into dx)
    has_beta: bool
    aux: Any = None  # engine-private
    activation: str | None = None  # "relu" when forward returned relu(batch_norm(x))
    y: Any = None  # the output, kept when an activation was applied (its backward needs y > 0)


class AdaptivePool2dCache(NamedTuple):
    engine: str
    x_shape: tuple  # (N, C, H, W)
    dtype: Any
    output_size: tuple  # (OH, OW)
    aux: Any = None  # engine-private (the CPU engine: whether x was channels-last)


class GeluCache(NamedTuple):
    x: Any
    approximate: str  # "none" (the erf form) or "tanh"


class AddCache(NamedTuple):
    shape: tuple  # of the sum (and of each addend)
    dtype: Any
    y: Any  # the output, kept with the ReLU (its backward needs y > 0), else None


class DropoutCache(NamedTuple):
    mask: Any  # the scaled mask (0 or 1/(1-p), x's dtype), or None when dropout was inactive


def tap_to_flat(tap, g: PoolGeometry):
    """Winning taps kh*KW + kw -> flat indices h*W + w into the unpadded plane (int32)."""
    xp = get_array_module(tap)
    oh = xp.arange(g.OH, dtype=np.int32) * g.SH - g.PH
    ow = xp.arange(g.OW, dtype=np.int32) * g.SW - g.PW
    base = oh[:, None] * g.W + ow[None, :]  # (OH, OW): flat index of each window's tap (0, 0)
    t = np.arange(g.KH * g.KW, dtype=np.int32)
    offset = xp.asarray((t // g.KW) * g.W + t % g.KW)  # (KH*KW,): each tap's offset from its window's origin
    return base + xp.take(offset, tap)  # (N, C, OH, OW)


__all__ = [
    "Conv2dCache",
    "MaxPool2dCache",
    "AvgPool2dCache",
    "LinearCache",
    "DropoutCache",
    "BatchNormCache",
    "AdaptivePool2dCache",
    "GeluCache",
    "tap_to_flat",
]
