"""Softmax and softmax cross-entropy, the public API (the math: functional/reference.py)."""
from __future__ import annotations

import numpy as np

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


def check_label_smoothing(label_smoothing) -> float:
    """-> ``label_smoothing`` as a float, or raise unless it is a number in [0, 1]."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")
    return float(label_smoothing)


def check_label_flag(label_check, logits) -> None:
    """Raise unless ``label_check`` is a writable 0-d int64 array on logits' backend."""
    same_xp("label_check", label_check, "logits", logits)
    if label_check.dtype != np.int64 or label_check.ndim != 0:
        raise TypeError(f"label_check: expected a 0-d int64 array (the device-side flag), got {describe(label_check)}")


def softmax_cross_entropy(logits, labels, validate_range=True, *, label_smoothing=0.0, label_check=None):
    """Mean cross-entropy of softmax(logits) against labels -> (loss, dlogits).

    ``label_smoothing`` eps in [0, 1] (torch's semantics): the target becomes
    (1 - eps) * onehot + eps / K, or (1 - eps) * labels + eps / K for probability rows.

    ``loss`` is a 0-d array of logits' dtype on logits' device (reading it is the caller's
    choice of host sync). ``validate_range=False`` skips the labels' range check, which
    reads the labels on the host; pass it only for labels checked once beforehand.
    ``label_check`` (a 0-d int64 array on logits' device, for integer labels): the range check
    runs on the device instead, with no host read: a label outside [0, K) sets it to 1 (it is
    never reset here) and gives that sample a NaN loss; the caller reads it when it chooses
    (nn.CrossEntropyLoss.check_labels). The CUDA engine sets it inside its loss kernel.
    An empty batch (N = 0) gives a NaN loss (the mean over no rows, as torch's) and an empty
    (0, K) dlogits.
    """
    check_float("logits", logits, ndim=2)
    eps = check_label_smoothing(label_smoothing)
    on_device = label_check is not None and validate_range
    if on_device:
        check_label_flag(label_check, logits)
    kind = check_labels(labels, logits, validate_range and not on_device)
    fn = _dispatch.impl("softmax_cross_entropy", logits)
    if not on_device or kind != "index":
        return fn(logits, labels, eps)
    if _dispatch.takes(fn, "label_check"):
        return fn(logits, labels, eps, label_check=label_check)
    K = logits.shape[1]
    label_check |= ((labels < 0) | (labels >= K)).any()  # an engine without the flag: a few launches
    return fn(logits, labels, eps)


__all__ = ["softmax", "log_softmax", "softmax_cross_entropy", "check_labels", "check_label_smoothing", "check_label_flag"]
