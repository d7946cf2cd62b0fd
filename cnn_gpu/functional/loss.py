"""Softmax and softmax cross-entropy, the public API (the math: functional/reference.py)."""
from __future__ import annotations

from . import _dispatch
from ._checks import check_float, check_same_dtype, describe, same_xp


def log_softmax(x, axis=-1):
    check_float("x", x)
    return _dispatch.impl("log_softmax", x)(x, axis)


def softmax(x, axis=-1):
    check_float("x", x)
    return _dispatch.impl("softmax", x)(x, axis)


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
                f"got {describe(labels)}")
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
    An empty batch (N = 0) gives a NaN loss (the mean over no rows, as torch's) and an empty
    (0, K) dlogits.
    """
    check_float("logits", logits, ndim=2)
    check_labels(labels, logits, validate_range)
    return _dispatch.impl("softmax_cross_entropy", logits)(logits, labels)


__all__ = ["softmax", "log_softmax", "softmax_cross_entropy", "check_labels"]
