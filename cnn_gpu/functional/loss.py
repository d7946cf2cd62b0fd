"""Softmax and softmax cross-entropy, the public API (the math: functional/reference.py)."""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from . import _dispatch
from ._checks import check_float, check_same_dtype, describe, same_xp


def log_softmax(x, axis=-1):
    check_float("x", x)
    return _dispatch.impl("log_softmax", x)(x, axis)


def softmax(x, axis=-1):
    check_float("x", x)
    return _dispatch.impl("softmax", x)(x, axis)


# Probability (soft) targets: rows of entries >= 0 that sum to 1 within this (absolute, in the labels' dtype)
PROBABILITY_SUM_TOLERANCE = 1e-3
# The device-side label flag's bits (label_check; CrossEntropyLoss.check_labels reads them)
FLAG_INDEX, FLAG_PROBABILITY = 1, 2


def check_labels(labels, logits, validate_range=True):
    """Raise unless ``labels`` are int class indices (N,) in [0, K) or a float one-hot/probability
    (N, K) whose rows have entries >= 0 summing to 1 (within PROBABILITY_SUM_TOLERANCE). The values
    are checked (one host read) only with ``validate_range``."""
    if not hasattr(labels, "dtype"):
        raise TypeError(
            f"labels: expected an int array of class indices (N,) or a float array (N, K), got {type(labels).__name__}"
        )
    same_xp("labels", labels, "logits", logits)
    N, K = logits.shape
    if labels.dtype.kind in "iu":
        if labels.ndim != 1 or labels.shape[0] != N:
            raise ValueError(
                f"labels: expected class indices of shape ({N},) to match logits {tuple(logits.shape)}, got {describe(labels)}"
            )
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
        if validate_range and N > 0:
            _check_probability_rows(labels)
        return "onehot"
    raise TypeError(f"labels: expected integer class indices or float one-hot rows, got {describe(labels)}")


def _row_sum_error(labels):
    """|sum_k labels[n, k] - 1| per row (N,), NaN for a row holding a NaN."""
    return abs(labels.sum(axis=1) - 1)


def _check_probability_rows(labels) -> None:
    """Raise unless every entry is >= 0 and every row sums to 1 within the tolerance (one host read)."""
    xp = get_array_module(labels)
    err = _row_sum_error(labels)
    lo, worst = (float(v) for v in xp.stack([labels.min(), err.max()]).tolist())
    if lo < 0:
        n = int(xp.argmin(labels.min(axis=1)))
        raise ValueError(f"labels: expected probability rows with entries >= 0, got {lo:.6g} in row {n}")
    if not worst <= PROBABILITY_SUM_TOLERANCE:  # NaN too
        n = int(xp.argmax(xp.where(xp.isnan(err), xp.inf, err)))
        raise ValueError(
            f"labels: expected probability rows summing to 1 (within {PROBABILITY_SUM_TOLERANCE:g}), "
            f"got row {n} summing to {float(labels[n].sum()):.6g}"
        )


def device_probability_flag(labels, label_check) -> None:
    """The probability rows' check on the device, no host read: sets FLAG_PROBABILITY in the
    sticky ``label_check`` (0-d int64) when an entry is negative or a row does not sum to 1."""
    bad = (labels < 0).any() | ~(_row_sum_error(labels) <= PROBABILITY_SUM_TOLERANCE).all()
    label_check |= bad.astype(np.int64) * FLAG_PROBABILITY


def label_flag_message(value: int, num_classes: int) -> str:
    """The error for a device-side label flag ``value`` (its FLAG_* bits)."""
    what = []
    if value & FLAG_INDEX:
        what.append(
            f"class indices in [0, {num_classes - 1}]; a batch since the last check_labels() held one outside "
            "that range (checked on the device: those samples' loss is NaN)"
        )
    if value & FLAG_PROBABILITY:
        what.append(
            "probability rows with entries >= 0 summing to 1 (within "
            f"{PROBABILITY_SUM_TOLERANCE:g}); a batch since the last check_labels() held a row that is not one "
            "(checked on the device)"
        )
    return "labels: expected " + "; and ".join(what)


def check_label_smoothing(label_smoothing) -> float:
    """-> ``label_smoothing`` as a float, or raise unless it is a number in [0, 1]."""
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, (int, float, np.floating, np.integer))
        or not 0.0 <= float(label_smoothing) <= 1.0
    ):
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")
    return float(label_smoothing)


def check_label_flag(label_check, logits) -> None:
    """Raise unless ``label_check`` is a writable 0-d int64 array on logits' backend."""
    same_xp("label_check", label_check, "logits", logits)
    if label_check.dtype != np.int64 or label_check.ndim != 0:
        raise TypeError(f"label_check: expected a 0-d int64 array (the device-side flag), got {describe(label_check)}")


def softmax_cross_entropy(logits, labels, validate_range=True, *, label_smoothing=0.0, label_check=None, grad_scale=None):
    """Mean cross-entropy of softmax(logits) against labels -> (loss, dlogits).

    ``label_smoothing`` eps in [0, 1] (torch's semantics): the target becomes
    (1 - eps) * onehot + eps / K, or (1 - eps) * labels + eps / K for probability rows.

    ``loss`` is a 0-d array of logits' dtype on logits' device (reading it is the caller's
    choice of host sync). ``validate_range=False`` skips the labels' range check, which
    reads the labels on the host; pass it only for labels checked once beforehand.
    ``label_check`` (a 0-d int64 array on logits' device): the labels' check runs on the device
    instead, with no host read: a label outside [0, K) sets it to FLAG_INDEX (1) and gives that
    sample a NaN loss; a probability row with a negative entry or a sum off 1 by more than
    PROBABILITY_SUM_TOLERANCE sets FLAG_PROBABILITY (2). It is never reset here; the caller reads
    it when it chooses (nn.CrossEntropyLoss.check_labels). The CUDA engine sets the index flag
    inside its loss kernel. Without it (and with ``validate_range``) probability rows are checked
    at once (one host read), as class indices are.
    An empty batch (N = 0) gives a NaN loss (the mean over no rows, as torch's) and an empty
    (0, K) dlogits.
    ``grad_scale`` (float16 logits on the cuda engine, integer labels): a float32 device array (1,),
    the loss scale of float16 training, multiplied into dlogits inside the loss kernel (the loss
    itself is not scaled; cnn_gpu/precision.py).
    """
    check_float("logits", logits, ndim=2)
    eps = check_label_smoothing(label_smoothing)
    if grad_scale is not None:
        return _scaled(logits, labels, validate_range, eps, label_check, grad_scale)
    on_device = label_check is not None and validate_range
    if on_device:
        check_label_flag(label_check, logits)
    kind = check_labels(labels, logits, validate_range and not on_device)
    fn = _dispatch.impl("softmax_cross_entropy", logits)
    if on_device and kind == "onehot":
        device_probability_flag(labels, label_check)
    if not on_device or kind != "index":
        return fn(logits, labels, eps)
    if _dispatch.takes(fn, "label_check"):
        return fn(logits, labels, eps, label_check=label_check)
    K = logits.shape[1]
    label_check |= ((labels < 0) | (labels >= K)).any()  # an engine without the flag: a few launches
    return fn(logits, labels, eps)


def _scaled(logits, labels, validate_range, eps, label_check, grad_scale):
    """softmax_cross_entropy with dlogits multiplied by ``grad_scale`` in the loss kernel (the cuda
    engine's float16 path, integer labels)."""
    fn = _dispatch.impl("softmax_cross_entropy", logits)
    if not _dispatch.takes(fn, "grad_scale") or logits.dtype != np.float16:
        raise ValueError(
            f"grad_scale: the loss scale of float16 training needs float16 logits on the cuda engine, got "
            f"{describe(logits)} on the {_dispatch.engine_name(logits)} engine"
        )
    same_xp("grad_scale", grad_scale, "logits", logits)
    on_device = label_check is not None and validate_range
    if on_device:
        check_label_flag(label_check, logits)
    if check_labels(labels, logits, validate_range and not on_device) != "index":
        raise ValueError(f"labels: the loss scale needs integer class indices, got {describe(labels)}")
    return fn(logits, labels, eps, label_check=label_check if on_device else None, grad_scale=grad_scale)


__all__ = [
    "softmax",
    "log_softmax",
    "softmax_cross_entropy",
    "check_labels",
    "check_label_smoothing",
    "check_label_flag",
    "PROBABILITY_SUM_TOLERANCE",
    "label_flag_message",
]
