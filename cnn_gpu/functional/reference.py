"""The reference engine: every op's forward and backward, side by side, in plain ``xp`` code.

This file is the library's math, readable top to bottom. It runs on NumPy and on CuPy (``xp``
comes from the arrays), and it is the oracle the fast engines are tested against
(tests/test_engines.py): the CPU engine (cnn_gpu/cpu) and the CUDA engine (cnn_gpu/cuda) must
give these numbers. The public API (cnn_gpu.functional) checks the arguments, computes the
geometry and picks the engine; functions here receive checked inputs.

Notation (see functional/geometry.py): N batch, C channels, H W height and width, F filters,
G groups, KH KW kernel, SH SW stride, PH PW padding, DH DW dilation, OH OW output size,
P = OH*OW, K = (C/G)*KH*KW, T = KH*KW. ``d`` prefixes a gradient: dy = dL/dy, the "delta"
of the backprop formulas, flows backward; every backward returns dL/d(its inputs).

The im2col column layout: cols (N, C*KH*KW, P), row k = (c*KH + kh)*KW + kw, column
p = oh*OW + ow, holds x_padded[n, c, oh*SH + kh*DH, ow*SW + kw*DW] (torch's ``unfold``).
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from . import counter_rng
from .caches import (
    AdaptivePool2dCache,
    AddCache,
    AvgPool2dCache,
    BatchNormCache,
    Conv2dCache,
    DropoutCache,
    GeluCache,
    LinearCache,
    MaxPool2dCache,
)
from .geometry import tap_slices

NAME = "reference"
FUSED_ACTIVATIONS = ()  # the reference runs every layer on its own (see nn.Sequential)


def _pad(xp, x, g, value=0.0):
    """x (N, C, H, W) -> (N, C, H+2PH, W+2PW), ``value`` in the border."""
    if g.PH == 0 and g.PW == 0:
        return x
    return xp.pad(x, ((0, 0), (0, 0), (g.PH, g.PH), (g.PW, g.PW)), constant_values=value)


def _crop(xpad, g):
    """The inverse view of _pad."""
    return xpad[:, :, g.PH : g.PH + g.H, g.PW : g.PW + g.W]


# ================================================================== convolution
def im2col(x, g):
    """x (N, C, H, W) -> cols (N, C*KH*KW, OH*OW): one copy per tap of a strided view."""
    xp = get_array_module(x)
    xpad = _pad(xp, x, g)  # (N, C, H+2PH, W+2PW)
    cols = xp.empty((g.N, g.C, g.KH, g.KW, g.OH, g.OW), dtype=x.dtype)
    for kh, kw, rows, cs in tap_slices(g):
        cols[:, :, kh, kw] = xpad[:, :, rows, cs]  # tap (kh, kw) of every output
    return cols.reshape(g.N, g.C * g.KH * g.KW, g.P)  # (N, C*KH*KW, OH*OW)


def col2im(cols, g):
    """The adjoint of im2col: cols (N, C*KH*KW, OH*OW) -> (N, C, H, W), overlaps summed."""
    xp = get_array_module(cols)
    dxpad = xp.zeros((g.N, g.C, g.H + 2 * g.PH, g.W + 2 * g.PW), dtype=cols.dtype)
    cols6 = cols.reshape(g.N, g.C, g.KH, g.KW, g.OH, g.OW)  # (N, C, KH, KW, OH, OW)
    for kh, kw, rows, cs in tap_slices(g):
        dxpad[:, :, rows, cs] += cols6[:, :, kh, kw]
    return xp.ascontiguousarray(_crop(dxpad, g))  # (N, C, H, W)


def conv2d_forward(x, w, b, g, activation=None, workspace=None):
    """y = W2 @ im2col(x) + b per group (then relu(y) with ``activation="relu"``).
    W2 = w as a (G, F/G, K) stack of matrices; ``workspace`` is not used here."""
    xp = get_array_module(x)
    cols = im2col(x, g).reshape(g.N, g.G, g.K, g.P)  # (N, G, K, P): group gi reads channels gi*C/G ...
    w3 = w.reshape(g.G, g.F // g.G, g.K)  # (G, F/G, K)
    y = xp.matmul(w3, cols).reshape(g.y_shape)  # (N, G, F/G, P) -> (N, F, OH, OW)
    if b is not None:
        y += b.reshape(1, g.F, 1, 1)
    if activation == "relu":
        y = xp.maximum(y, 0)
    kept = y if activation else None
    return y, Conv2dCache(NAME, g, x, w, b is not None, activation, kept, cols)


def conv2d_backward(dy, cache, input_grad=True):
    """dy (N, F, OH, OW) -> (dx or None, dw, db or None):
    delta = dy * relu'(y) (with the activation), else dy
    db = sum of delta over n, oh, ow
    dW2 = sum_n delta[n] @ cols[n]^T        (F/G, P) @ (P, K) per group
    dx = col2im(W2^T @ delta)               (K, F/G) @ (F/G, P) per group, then the adjoint of im2col
    """
    g, w, cols = cache.g, cache.w, cache.aux
    xp = get_array_module(dy)
    delta = dy * (cache.y > 0) if cache.activation == "relu" else dy
    d = delta.reshape(g.N, g.G, g.F // g.G, g.P)  # (N, G, F/G, P)
    db = delta.sum(axis=(0, 2, 3)) if cache.has_bias else None  # (F,)
    dw = xp.matmul(d, cols.transpose(0, 1, 3, 2)).sum(axis=0).reshape(w.shape)  # (G, F/G, K) summed over n
    dx = None
    if input_grad:
        w3t = w.reshape(g.G, g.F // g.G, g.K).transpose(0, 2, 1)  # (G, K, F/G)
        dcols = xp.matmul(w3t, d).reshape(g.N, g.C * g.KH * g.KW, g.P)  # (N, G, K, P) -> (N, C*KH*KW, P)
        dx = col2im(dcols, g)
    return dx, dw, db


# ================================================================== pooling
def _window_origins(xp, g):
    """(OH, 1) and (1, OW): the input row and column of each window's tap (0, 0)."""
    oh0 = (xp.arange(g.OH) * g.SH - g.PH)[:, None]
    ow0 = (xp.arange(g.OW) * g.SW - g.PW)[None, :]
    return oh0, ow0


def max_pool2d_forward(x, g):
    """y = the maximum of each window; argmax = h*W + w of its winner: taps in row-major order,
    the first maximum wins, a NaN wins (the first NaN), padding never wins."""
    xp = get_array_module(x)
    xpad = _pad(xp, x, g)  # the border's value never matters: padding cannot win
    y = xp.full(g.y_shape, -np.inf, dtype=x.dtype)
    argmax = xp.full(g.y_shape, -1, dtype=np.int32)
    oh0, ow0 = _window_origins(xp, g)
    for kh, kw, rows, cs in tap_slices(g):
        h, w = oh0 + kh, ow0 + kw  # the input position this tap reads, per output
        real = (h >= 0) & (h < g.H) & (w >= 0) & (w < g.W)  # (OH, OW): not padding
        v = xpad[:, :, rows, cs]
        wins = real & ((argmax < 0) | (v > y) | (xp.isnan(v) & ~xp.isnan(y)))
        y = xp.where(wins, v, y)
        argmax = xp.where(wins, (h * g.W + w).astype(np.int32), argmax)
    return y, MaxPool2dCache(NAME, g, x.dtype, argmax, "flat")


def max_pool2d_backward(dy, cache):
    """dx[n, c, h, w] = the sum of dy over the windows whose winner is (h, w)."""
    g, argmax = cache.g, cache.argmax
    xp = get_array_module(dy)
    dxpad = xp.zeros((g.N, g.C, g.H + 2 * g.PH, g.W + 2 * g.PW), dtype=dy.dtype)
    oh0, ow0 = _window_origins(xp, g)
    for kh, kw, rows, cs in tap_slices(g):
        h, w = oh0 + kh, ow0 + kw
        real = (h >= 0) & (h < g.H) & (w >= 0) & (w < g.W)
        dxpad[:, :, rows, cs] += xp.where(real & (argmax == h * g.W + w), dy, 0)  # where this tap won
    return xp.ascontiguousarray(_crop(dxpad, g))


def avg_pool2d_forward(x, g):
    """y = (1 / (KH*KW)) * the sum over each window; padding counts as zeros (count_include_pad)."""
    xp = get_array_module(x)
    xpad = _pad(xp, x, g)
    y = xp.zeros(g.y_shape, dtype=x.dtype)
    for _, _, rows, cs in tap_slices(g):
        y += xpad[:, :, rows, cs]
    y *= x.dtype.type(1.0 / g.T)
    return y, AvgPool2dCache(NAME, g, x.dtype)


def avg_pool2d_backward(dy, cache):
    """dx[n, c, h, w] = (1 / (KH*KW)) * the sum of dy over the windows that contain (h, w)."""
    g = cache.g
    xp = get_array_module(dy)
    dxpad = xp.zeros((g.N, g.C, g.H + 2 * g.PH, g.W + 2 * g.PW), dtype=dy.dtype)
    share = dy * dy.dtype.type(1.0 / g.T)
    for _, _, rows, cs in tap_slices(g):
        dxpad[:, :, rows, cs] += share
    return xp.ascontiguousarray(_crop(dxpad, g))


def adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """torch's adaptive window rule: output i averages [floor(i*size/out), ceil((i+1)*size/out))."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool2d_forward(x, output_size):
    """y[n, c, i, j] = the mean of x[n, c, rows_i, cols_j] over the adaptive windows (they may overlap)."""
    xp = get_array_module(x)
    N, C, H, W = x.shape
    OH, OW = output_size
    y = xp.empty((N, C, OH, OW), dtype=x.dtype)
    for i, (h0, h1) in enumerate(adaptive_windows(H, OH)):
        for j, (w0, w1) in enumerate(adaptive_windows(W, OW)):
            y[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return y, AdaptivePool2dCache(NAME, tuple(x.shape), x.dtype, (OH, OW))


def adaptive_avg_pool2d_backward(dy, cache):
    """dx[n, c, h, w] = the sum over the windows (i, j) containing (h, w) of dy[n, c, i, j] / |window|."""
    dx = get_array_module(dy).zeros(cache.x_shape, dtype=dy.dtype)
    return adaptive_avg_pool2d_scatter(dy, dx)


def adaptive_avg_pool2d_scatter(dy, dx):
    """dx += each output's gradient spread evenly over its window; -> dx (N, C, H, W), of any
    strides (the CPU engine passes a channels-last one)."""
    H, W = dx.shape[2:]
    OH, OW = dy.shape[2:]
    for i, (h0, h1) in enumerate(adaptive_windows(H, OH)):
        for j, (w0, w1) in enumerate(adaptive_windows(W, OW)):
            area = dy.dtype.type(1.0 / ((h1 - h0) * (w1 - w0)))
            dx[:, :, h0:h1, w0:w1] += (dy[:, :, i, j] * area)[:, :, None, None]
    return dx


# ================================================================== batch normalisation
# Per channel c, over the M = N*H*W values x[:, c] (M = N for (N, C) inputs):
#   training (batch statistics): mu = mean(x), var = mean((x - mu)^2) (biased), and in place
#     running_mean = (1 - m) running_mean + m mu,  running_var = (1 - m) running_var + m var M/(M-1)
#   evaluation: mu, var = running_mean, running_var
#   xhat = (x - mu) / sqrt(var + eps),  y = gamma xhat + beta
# Backward, with g = dy * gamma:  dbeta = sum(dy),  dgamma = sum(dy xhat), and
#   batch statistics:  dx = invstd / M * (M g - sum(g) - xhat sum(g xhat))
#   fixed statistics:  dx = invstd g
def _channel_axes(x):
    """The axes a per-channel statistic reduces: (0,) for (N, C), (0, 2, 3) for (N, C, H, W)."""
    return (0,) if x.ndim == 2 else (0, 2, 3)


def _per_channel(v, x):
    """(C,) -> a shape that broadcasts against x along its axis 1."""
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def update_running_stats(running_mean, running_var, mean, var, momentum, M):
    """In place: running = (1 - momentum) running + momentum batch, the variance unbiased
    (var M / (M - 1), M values per channel), as torch does."""
    t = running_mean.dtype.type
    running_mean *= t(1.0 - momentum)
    running_mean += t(momentum) * mean
    running_var *= t(1.0 - momentum)
    running_var += t(momentum * M / (M - 1)) * var


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, activation=None):
    """(then relu(y) with ``activation="relu"``: how nn.Sequential fuses a following ReLU)"""
    xp = get_array_module(x)
    t = x.dtype.type
    axes = _channel_axes(x)
    if x.size == 0:  # an empty batch: nothing to normalise, no statistics to learn from
        zeros = xp.zeros(x.shape[1], dtype=x.dtype)
        return x.copy(), BatchNormCache(NAME, x, gamma, zeros, zeros, False, beta is not None)
    batch_stats = training or running_mean is None
    if batch_stats:
        mean = x.mean(axis=axes)
        var = ((x - _per_channel(mean, x)) ** 2).mean(axis=axes)
        if training and running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, momentum, x.size // x.shape[1])
    else:
        mean, var = running_mean, running_var
    invstd = 1 / xp.sqrt(var + t(eps))
    y = (x - _per_channel(mean, x)) * _per_channel(invstd, x)  # xhat
    if gamma is not None:
        y *= _per_channel(gamma, x)
    if beta is not None:
        y += _per_channel(beta, x)
    if activation == "relu":
        y = xp.maximum(y, 0)
    return y, BatchNormCache(
        NAME, x, gamma, mean, invstd, batch_stats, beta is not None, None, activation, y if activation else None
    )


def batch_norm_backward(dy, cache):
    """-> (dx, dgamma or None, dbeta or None); with the fused ReLU, dy * relu'(y) first."""
    x, axes = cache.x, _channel_axes(cache.x)
    if cache.activation == "relu":
        dy = dy * (cache.y > 0)
    xhat = (x - _per_channel(cache.mean, x)) * _per_channel(cache.invstd, x)
    dbeta = dy.sum(axis=axes) if cache.has_beta else None
    dgamma = (dy * xhat).sum(axis=axes) if cache.gamma is not None else None
    g = dy * _per_channel(cache.gamma, x) if cache.gamma is not None else dy
    scale = _per_channel(cache.invstd, x)
    if not cache.batch_stats:
        return g * scale, dgamma, dbeta
    M = x.size // x.shape[1]
    t = dy.dtype.type
    sum_g = _per_channel(g.sum(axis=axes), x)
    sum_gx = _per_channel((g * xhat).sum(axis=axes), x)
    dx = (g - (sum_g + xhat * sum_gx) * t(1.0 / M)) * scale
    return dx, dgamma, dbeta


# ================================================================== fully connected
def linear_forward(x, w, b, activation=None):
    """y = x @ w^T + b (then relu(y) with ``activation="relu"``). x (N, in), w (out, in)."""
    xp = get_array_module(x)
    y = xp.matmul(x, w.T)  # (N, out)
    if b is not None:
        y += b
    if activation == "relu":
        y = xp.maximum(y, 0)
    return y, LinearCache(NAME, x, w, b is not None, activation, y if activation else None)


def linear_backward(dy, cache, input_grad=True):
    """delta = dy (* relu'(y)) (N, out):  dx = delta @ w (N, in),  dw = delta^T @ x (out, in)
    (the textbook's dL/dW = delta a_prev^T, summed over the batch),  db = sum_n delta[n]."""
    xp = get_array_module(dy)
    delta = dy * (cache.y > 0) if cache.activation == "relu" else dy
    dw = xp.matmul(delta.T, cache.x)
    db = delta.sum(axis=0) if cache.has_bias else None
    dx = xp.matmul(delta, cache.w) if input_grad else None
    return dx, dw, db


# ================================================================== activations
# With delta = dL/dy, each backward returns delta * f'(x): a product, so a NaN in delta stays NaN.
def relu_forward(x):
    """y = max(x, 0); the cache is y (y > 0 exactly where x > 0)."""
    y = get_array_module(x).maximum(x, 0)
    return y, y


def relu_backward(dy, y):
    return dy * (y > 0)


def add_forward(a, b, activation=None):
    """y = a + b (a residual block's sum), relu(y) with ``activation="relu"``; a and b of one shape."""
    y = a + b
    if activation == "relu":
        y = get_array_module(y).maximum(y, 0)
    return y, AddCache(tuple(y.shape), y.dtype, y if activation else None)


def add_backward(dy, cache):
    """dL/da = dL/db = delta: dy, or dy * relu'(y) with the ReLU."""
    return dy if cache.y is None else relu_backward(dy, cache.y)


def leaky_relu_forward(x, negative_slope):
    xp = get_array_module(x)
    return xp.where(x > 0, x, x * x.dtype.type(negative_slope)), (x, float(negative_slope))


def leaky_relu_backward(dy, cache):
    x, slope = cache
    return get_array_module(dy).where(x > 0, dy, dy * dy.dtype.type(slope))


def sigmoid_forward(x):
    """y = 1 / (1 + exp(-x)), computed from exp(-|x|) (never overflows); f'(x) = y (1 - y)."""
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))
    y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
    return y, y


def sigmoid_backward(dy, y):
    return dy * y * (1 - y)


def tanh_forward(x):
    """y = tanh(x); f'(x) = 1 - y^2."""
    y = get_array_module(x).tanh(x)
    return y, y


def tanh_backward(dy, y):
    return dy * (1 - y * y)


def _erf(x):
    """The error function, elementwise, in x's dtype: scipy.special.erf (NumPy) or
    cupyx.scipy.special.erf (CuPy), both accurate to a few ulp."""
    if get_array_module(x) is np:
        from scipy.special import erf
    else:
        from cupyx.scipy.special import erf
    return erf(x)


_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)
_TANH_C = 0.7978845608028654  # sqrt(2 / pi)
_TANH_K = 0.044715


def gelu_forward(x, approximate):
    """approximate="none": y = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2;
    approximate="tanh": y = x (1 + tanh(u)) / 2, u = sqrt(2/pi) (x + 0.044715 x^3)."""
    xp = get_array_module(x)
    t = x.dtype.type
    if approximate == "tanh":
        y = t(0.5) * x * (1 + xp.tanh(t(_TANH_C) * (x + t(_TANH_K) * x * x * x)))
    else:
        y = t(0.5) * x * (1 + _erf(x * t(_SQRT_HALF)))
    return y.astype(x.dtype, copy=False), GeluCache(x, approximate)


def gelu_backward(dy, cache):
    """f'(x) = Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi)  (erf form);
    f'(x) = (1 + tanh(u)) / 2 + x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2) / 2  (tanh form)."""
    xp = get_array_module(dy)
    x, t = cache.x, dy.dtype.type
    if cache.approximate == "tanh":
        th = xp.tanh(t(_TANH_C) * (x + t(_TANH_K) * x * x * x))
        d = t(0.5) * (1 + th) + t(0.5) * x * (1 - th * th) * t(_TANH_C) * (1 + t(3 * _TANH_K) * x * x)
    else:
        d = t(0.5) * (1 + _erf(x * t(_SQRT_HALF))) + x * t(_INV_SQRT_2PI) * xp.exp(t(-0.5) * x * x)
    return dy * d


def flatten_forward(x):
    """(N, ...) -> (N, prod(...)) in C order; the cache is the input shape."""
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:]))), tuple(x.shape)


def flatten_backward(dy, shape):
    return dy.reshape(shape)


def dropout_forward(x, p, training, rng=None, key=None):
    """Inverted dropout: y = x * mask, mask[i] = 1 / (1 - p) where u[i] >= p, else 0; u uniform
    in [0, 1): u = counter_rng.uniform(key, i) (element i of the draw ``key``; what the layer
    uses: no generator state), or drawn from a Generator ``rng``."""
    if not training or p == 0.0:
        return x, DropoutCache(None)
    xp = get_array_module(x)
    u = counter_rng.uniform(xp, key, x.shape, x.dtype) if key is not None else rng.random(x.shape, dtype=x.dtype)
    keep = u >= x.dtype.type(p)
    mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, DropoutCache(mask)


def dropout_backward(dy, cache):
    return dy if cache.mask is None else dy * cache.mask


# ================================================================== softmax and the loss
# For logits z (N, K) and targets t (one-hot rows or class indices):
#   log_softmax(z) = z - max(z) - log(sum(exp(z - max(z))))      (exp of non-positive numbers only)
#   L = -(1/N) sum_n sum_k t[n, k] log_softmax(z)[n, k]
#   dL/dz = (softmax(z) - t) / N                                  the output layer's delta
def log_softmax(x, axis=-1):
    xp = get_array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(x, axis=-1):
    xp = get_array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def softmax_cross_entropy(logits, labels, label_smoothing=0.0):
    """-> (loss, dlogits): the mean cross-entropy (a 0-d array on logits' device) and dL/dlogits.
    ``labels``: int class indices (N,) or float one-hot / probability rows (N, K).

    Label smoothing eps (torch's): the target is t = (1 - eps) * onehot + eps / K (or
    (1 - eps) * labels + eps / K for probability rows), so with on = 1 - eps, off = eps / K:
        loss[n] = -(on * logp[n, label] + off * sum_k logp[n, k])
        dlogits = (softmax - t) / N
    """
    xp = get_array_module(logits)
    N, K = logits.shape
    if N == 0:  # the mean over no rows: NaN, as torch's; no row gets a gradient
        return xp.asarray(float("nan"), dtype=logits.dtype), xp.zeros_like(logits)
    logp = log_softmax(logits)  # (N, K)
    p = xp.exp(logp)  # softmax
    T = logits.dtype.type
    inv_n = T(1.0 / N)
    if labels.dtype.kind in "iu":
        rows = xp.arange(N)
        if label_smoothing == 0:
            loss = -logp[rows, labels].sum() * inv_n
            p[rows, labels] -= 1  # softmax - onehot
        else:
            on, off = T(1.0 - label_smoothing), T(label_smoothing / K)
            per = on * logp[rows, labels] + off * logp.sum(axis=1)  # (N,)
            loss = -per.sum() * inv_n
            t = xp.full(p.shape, off, dtype=p.dtype)  # (N, K) the smoothed one-hot
            t[rows, labels] += on
            p -= t
    else:
        t = labels if label_smoothing == 0 else labels * T(1.0 - label_smoothing) + T(label_smoothing / K)
        loss = -(t * logp).sum() * inv_n
        p -= t
    p *= inv_n
    return xp.asarray(loss, dtype=logits.dtype), p


# ================================================================== augmentation (a gather, no gradient)
def crop_flip_draws(xp, a):
    """Sample n's crop offsets and flip, from the counter-based generator (functional/counter_rng.py;
    kernels/augment.cu draws the same): oy, ox (N,) int64 and flip (N,) bool."""
    n = xp.arange(a.N, dtype=xp.uint64)
    two_n = n * np.uint64(2)
    oy = counter_rng.bits(xp, a.crop_key, two_n) % np.uint64(a.H + 2 * a.PH - a.OH + 1)
    ox = counter_rng.bits(xp, a.crop_key, two_n + np.uint64(1)) % np.uint64(a.W + 2 * a.PW - a.OW + 1)
    flip = (counter_rng.bits(xp, a.flip_key, n) >> np.uint64(11)) < np.uint64(a.flip_threshold)
    return oy.astype(xp.int64), ox.astype(xp.int64), flip


def _reflect(xp, r, size):
    """torch's reflect padding of indices in [-size + 1, 2 * size - 1): -1 -> 1, size -> size - 2."""
    return xp.where(r < 0, -r, xp.where(r >= size, 2 * (size - 1) - r, r))


def crop_flip(x, a):
    """x (N, C, H, W) -> y (N, C, OH, OW) (a: functional.geometry.CropFlip):
        y[n, c, i, j] = x_padded[n, c, oy[n] + i, ox[n] + (OW - 1 - j if flip[n] else j)]
    one fancy-indexing gather for the whole batch (no loop over samples)."""
    xp = get_array_module(x)
    oy, ox, flip = crop_flip_draws(xp, a)
    j = xp.arange(a.OW)
    rows = oy[:, None] + xp.arange(a.OH)[None, :] - a.PH  # (N, OH) rows of x
    cols = ox[:, None] + xp.where(flip[:, None], a.OW - 1 - j[None, :], j[None, :]) - a.PW  # (N, OW)
    if a.reflect:
        rows, cols = _reflect(xp, rows, a.H), _reflect(xp, cols, a.W)
    else:
        inside = ((rows >= 0) & (rows < a.H))[:, :, None] & ((cols >= 0) & (cols < a.W))[:, None, :]  # (N, OH, OW)
        rows, cols = xp.clip(rows, 0, a.H - 1), xp.clip(cols, 0, a.W - 1)
    n = xp.arange(a.N)[:, None, None, None]
    c = xp.arange(a.C)[None, :, None, None]
    y = x[n, c, rows[:, None, :, None], cols[:, None, None, :]]  # (N, C, OH, OW)
    if not a.reflect:  # zero padding: a select, not y[~inside] = 0 (a boolean mask syncs on CuPy)
        y = xp.where(inside[:, None], y, x.dtype.type(0))  # (N, 1, OH, OW) broadcast over C
    return y


# ================================================================== optimizers (in place, on flat buffers)
def sgd_update_(p, g, buf, lr, momentum, weight_decay, nesterov, first_step):
    """torch.optim.SGD: d = g + wd*p;  buf = d (first step) or momentum*buf + d;
    d = d + momentum*buf (Nesterov) or buf;  p -= lr*d."""
    t = p.dtype.type
    d = g
    if weight_decay != 0:
        d = d + t(weight_decay) * p
    if momentum != 0:
        if first_step:
            buf[...] = d
        else:
            buf *= t(momentum)
            buf += d
        d = d + t(momentum) * buf if nesterov else buf
    p -= t(lr) * d


def adam_update_(p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, bc1, bc2):
    """torch.optim.Adam / AdamW: m = b1*m + (1-b1) g;  v = b2*v + (1-b2) g^2;
    p -= (lr/bc1) * m / (sqrt(v/bc2) + eps), with bc = 1 - beta^t. Adam adds wd*p to g;
    AdamW first decays p *= 1 - lr*wd."""
    xp = get_array_module(p)
    t = p.dtype.type
    d = g
    if weight_decay != 0:
        if decoupled:
            p *= t(1.0 - lr * weight_decay)
        else:
            d = d + t(weight_decay) * p
    m *= t(beta1)
    m += t(1.0 - beta1) * d
    v *= t(beta2)
    v += t(1.0 - beta2) * (d * d)
    denom = xp.sqrt(v / t(bc2))
    denom += t(eps)
    p -= t(lr / bc1) * m / denom


# ================================================================== float16 storage
def float16_storage(fn, *args, keep_float32=(), **kwargs):
    """Op ``fn`` (a function of this module) in the float16 storage mode of the CUDA engine's
    float16 kernels (kernels/common.cuh: CNN_ENTRY_POINTS_FP16): the float16 arrays among ``args``
    (and in the caches among them) are read exactly into float32, ``fn`` computes in float32, and
    every float array it returns
    (alone or in a tuple) is rounded to float16 -- to nearest even, beyond +-65504 to +-inf -- as a
    kernel rounds where it stores. For an op that is one kernel (im2col, col2im, the bias and ReLU
    epilogues, the residual sum) those are the kernels' rounding points, so the results are theirs
    bit for bit. ``keep_float32``: positions in the returned tuple left float32 (the sums the kernels
    keep in float32: a bias gradient)."""

    def up(a):
        if isinstance(a, tuple) and hasattr(a, "_replace"):  # a cache (NamedTuple): its float16 arrays and dtype
            return a._replace(
                **{k: np.dtype(np.float32) if k == "dtype" and v == np.float16 else up(v) for k, v in a._asdict().items()}
            )
        return a.astype(np.float32) if hasattr(a, "astype") and a.dtype == np.float16 else a

    def down(a):
        if not hasattr(a, "astype") or a.dtype != np.float32:  # (a cache, an int array: as it is)
            return a
        with np.errstate(over="ignore"):  # beyond float16's range: inf, as __float2half_rn
            return a.astype(np.float16)

    out = fn(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})
    if isinstance(out, tuple):
        return tuple(o if i in keep_float32 else down(o) for i, o in enumerate(out))
    return down(out)
