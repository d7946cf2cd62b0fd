"""Argument checks shared by the functional ops.

Every message names the argument, what was expected and what was given.
Nothing is silently broadcast, truncated or upcast.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import config
from ..backend import is_cupy_array

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
FLOAT16 = np.dtype(np.float16)  # float16 storage: the cuda engine's float16 kernels only (docs/PRECISION.md)


def _float16_ok(a: Any) -> bool:
    """float16 arrays run where the cuda engine runs them (its float16 kernels; an op without one
    says so at its launch); the reference and CPU engines compute in float32 / float64 only. (The
    engine as _dispatch.engine_name picks it: "cuda", or "auto" with a CuPy array.)"""
    if a.dtype != FLOAT16:
        return False
    engine = config.get().engine
    return engine == "cuda" or (engine == "auto" and is_cupy_array(a))


def describe(a: Any) -> str:
    shape = getattr(a, "shape", None)
    dtype = getattr(a, "dtype", None)
    if shape is None:
        return f"{type(a).__name__} {a!r}"
    return f"{dtype} array of shape {tuple(shape)}"


def check_array(name: str, a: Any, ndim: int | None = None) -> None:
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name}: expected a NumPy or CuPy array, got {type(a).__name__}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got {describe(a)}")


def check_float(name: str, a: Any, ndim: int | None = None) -> None:
    check_array(name, a, ndim)
    if a.dtype not in FLOAT_DTYPES and not _float16_ok(a):
        raise TypeError(f"{name}: expected a float32 or float64 array, got {describe(a)}")


def check_same_dtype(name: str, a: Any, ref_name: str, ref: Any) -> None:
    if a.dtype != ref.dtype:
        raise TypeError(
            f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {a.dtype}; "
            "convert explicitly, nothing is cast silently"
        )


def check_shape(name: str, a: Any, shape: tuple) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {describe(a)}")


def pair(name: str, v: Any, minimum: int = 0) -> tuple[int, int]:
    """An int or an (h, w) pair of ints, each >= minimum, as a tuple."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        out = (int(v), int(v))
    elif (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in v)
    ):
        out = (int(v[0]), int(v[1]))
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints (h, w), got {v!r}")
    if out[0] < minimum or out[1] < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {v!r}")
    return out


def same_xp(name: str, a: Any, ref_name: str, ref: Any) -> None:
    if type(a).__module__.split(".")[0] != type(ref).__module__.split(".")[0]:
        raise TypeError(
            f"{name}: expected an array on the same backend as {ref_name} "
            f"({type(ref).__module__}.{type(ref).__name__}), got {type(a).__module__}.{type(a).__name__}"
        )


ACTIVATIONS = (None, "relu")


def check_activation(activation: Any) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def check_dy(dy: Any, shape: tuple, dtype: Any, what: str = "the forward output") -> None:
    """dy must be a float array of the forward's dtype and the shape of ``what``."""
    check_float("dy", dy, ndim=len(shape))
    if dy.dtype != dtype:
        raise TypeError(f"dy: expected dtype {np.dtype(dtype)} (the forward input's), got {dy.dtype}; nothing is cast silently")
    check_shape("dy", dy, shape)


def check_weights(x: Any, w: Any, b: Any, in_features: int, what: str) -> None:
    """w (and b, if given) of x's backend and dtype; w's axis 1 is the input's ``in_features``."""
    check_float("w", w, ndim=2 if what == "linear" else 4)
    same_xp("w", w, "x", x)
    check_same_dtype("w", w, "x", x)
    if w.size == 0:  # only the batch may be empty: a layer has at least one output and one input feature
        unit = "output and one input feature" if what == "linear" else "filter and one input channel"
        raise ValueError(f"w: expected at least one {unit}, got {describe(w)}")
    if w.shape[1] != in_features:
        if what == "linear":
            raise ValueError(f"w: expected shape (out, {in_features}) to match x of shape {tuple(x.shape)}, got {describe(w)}")
        raise ValueError(
            f"w: expected {in_features} input channels{' per group' if in_features != x.shape[1] else ''} "
            f"(x has shape {tuple(x.shape)}), got {describe(w)}"
        )
    if b is not None:
        check_float("b", b, ndim=1)
        same_xp("b", b, "x", x)
        check_same_dtype("b", b, "x", x)
        check_shape("b", b, (w.shape[0],))


def check_accumulate_into(acc: Any, want: list, dy: Any) -> None:
    """``accumulate_into`` of a backward: None, or a tuple with one entry per parameter gradient,
    ``want`` [(name, shape or None)]: an array of that shape (dy's backend and dtype, writable; for a
    float16 dy float32, the gradients of float16 training) where the gradient exists, None where it
    does not (a layer without a bias)."""
    if acc is None:
        return
    names = ", ".join(n for n, _ in want)
    if not isinstance(acc, (tuple, list)) or len(acc) != len(want):
        raise TypeError(
            f"accumulate_into: expected None or a tuple of {len(want)} arrays or Nones ({names}), "
            f"got {type(acc).__name__}{f' of {len(acc)}' if isinstance(acc, (tuple, list)) else ''}"
        )
    for a, (name, shape) in zip(acc, want):
        what = f"accumulate_into[{name}]"
        if shape is None:
            if a is not None:
                raise ValueError(f"{what}: expected None (the op has no {name}: no bias or no affine step), got {describe(a)}")
            continue
        if a is None:
            raise ValueError(f"{what}: expected an array of shape {tuple(shape)} to add {name} into, got None")
        check_float(what, a)
        same_xp(what, a, "dy", dy)
        if not (dy.dtype == FLOAT16 and a.dtype == np.float32):  # float16 training: float32 gradients
            check_same_dtype(what, a, "dy", dy)
        check_shape(what, a, shape)
        if not getattr(getattr(a, "flags", None), "writeable", True):
            raise ValueError(f"{what}: expected a writable array (the gradient is added into it in place), got a read-only one")
