"""Softmax and softmax cross-entropy.

For logits z (N, K) and targets t (one-hot rows, or class indices):
    log_softmax(z) = z - max(z) - log(sum(exp(z - max(z))))      (stable for |z| ~ 1e4)
    L = -(1/N) sum_n sum_k t[n, k] log_softmax(z)[n, k]
    dL/dz = (softmax(z) - t) / N                                  the output-layer delta
"""
from __future__ import annotations

from ..backend import get_array_module
from . import _dispatch
from ._checks import check_float, check_same_dtype, describe, same_xp


def log_softmax(x, axis=-1):
    check_float("x", x)
    xp = get_array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(x, axis=-1):
    check_float("x", x)
    xp = get_array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def check_labels(labels, logits, validate_range=True):
    """Raise unless ``labels`` are int class indices (N,) in [0, K) or a float one-hot/probability (N, K)."""
    if not hasattr(labels, "dtype"):
        raise TypeError(f"labels: expected an int array of class indices (N,) or a float array (N, K), got {type(labels).__name__}")
    same_xp("labels", labels, "logits", logits)
    N, K = logits.shape
    if labels.dtype.kind in "iu":
        if labels.ndim != 1 or labels.shape[0] != N:
            raise ValueError(f"labels: expected class indices of shape ({N},) to match logits {tuple(logits.shape)}, got {describe(labels)}")
        if validate_range and N > 0:
            lo, hi = int(labels.min()), int(labels.max())  # a host read: skipped by callers that validated once
            if lo < 0 or hi >= K:
                raise ValueError(f"labels: expected class indices in [0, {K - 1}], got values in [{lo}, {hi}]")
        return "index"
    if labels.dtype.kind == "f":
        if labels.ndim != 2:
            raise TypeError(
                f"labels: expected integer class indices of shape ({N},) or a one-hot float array of shape ({N}, {K}), "
                f"got {describe(labels)}"
            )
        if tuple(labels.shape) != (N, K):
            raise ValueError(f"labels: expected a one-hot array of shape ({N}, {K}) to match logits, got {describe(labels)}")
        check_same_dtype("labels", labels, "logits", logits)
        return "onehot"
    raise TypeError(f"labels: expected integer class indices or float one-hot rows, got {describe(labels)}")


def softmax_cross_entropy(logits, labels, validate_range=True):
    """Mean cross-entropy of softmax(logits) against labels -> (loss, dlogits).

    ``loss`` is a 0-d array of logits' dtype on logits' device (reading it is the caller's
    choice of host sync). ``validate_range=False`` skips the labels' range check, which
    reads the labels on the host; pass it only for labels checked once beforehand.
    """
    check_float("logits", logits, ndim=2)
    kind = check_labels(labels, logits, validate_range)
    N, K = logits.shape
    if N == 0:
        raise ValueError(f"logits: expected at least one row, got {describe(logits)}")
    if kind == "index":
        k = _dispatch.kernels(logits)
        if k is not None:
            return k.softmax_cross_entropy(logits, labels)
    xp = get_array_module(logits)
    logp = log_softmax(logits)  # (N, K)
    p = xp.exp(logp)  # (N, K)
    inv_n = logits.dtype.type(1.0 / N)
    if kind == "index":
        rows = xp.arange(N)
        loss = -logp[rows, labels].sum() * inv_n
        p[rows, labels] -= 1
    else:
        loss = -(labels * logp).sum() * inv_n
        p -= labels
    p *= inv_n
    return xp.asarray(loss, dtype=logits.dtype), p


__all__ = ["softmax", "log_softmax", "softmax_cross_entropy", "check_labels"]
