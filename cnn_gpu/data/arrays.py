"""Your own arrays: an ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test`` as a Dataset.

Images: 4-D, NCHW or NHWC (or 3-D (N, H, W): one channel), ``uint8`` (scale 255) or float
(float16/32/64, kept as float32 with scale 1.0, whatever range it has: normalisation statistics
are computed from the train split either way). The layout is read from the shape: NHWC when the
last axis has 1, 3 or 4 entries and axis 1 does not; otherwise NCHW. So ``(N, 3, 32, 32)`` and
``(N, 32, 32, 3)`` are both understood, and an ambiguous shape whose axis 1 AND last axis are
both in (1, 3, 4), e.g. ``(N, 3, 4, 4)``, is read as NCHW: transpose it yourself if it is not.
Labels: 1-D integers in ``[0, K)``; K is ``len(classes)`` when the optional ``classes`` (an
array of strings) is given, else the largest label + 1. ``x_val`` / ``y_val`` are optional.
The file is read with ``allow_pickle=False``: object arrays are refused, never unpickled.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

REQUIRED = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL = ("x_val", "y_val", "classes")


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:  # ValueError: not numpy data (a pickle)
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not hasattr(npz, "files"):
        raise DataError(f"{path}: expected an .npz archive of named arrays, got a single array")
    try:
        with npz:
            unknown = sorted(set(npz.files) - set(REQUIRED) - set(OPTIONAL))
            if unknown:
                raise DataError(
                    f"{path}: unexpected array(s) {', '.join(unknown)}; expected "
                    f"{', '.join(REQUIRED)} and optionally {', '.join(OPTIONAL)}"
                )
            missing = [k for k in REQUIRED if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}; it has {', '.join(npz.files) or 'none'}")
            return {k: _member(path, npz, k) for k in npz.files}
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None


def _member(path: Path, npz, key: str) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as exc:  # an object array: would need pickle
        raise DataError(
            f"{path}: {key} is an object array, which would need pickle to load ({exc}); "
            "save numbers (and class names as a string array)"
        ) from None


def _images(path: Path, key: str, x: np.ndarray) -> tuple[np.ndarray, str]:
    """x as NCHW (uint8, or float32 checked finite), and the layout it was read in."""
    if x.ndim == 3:
        x = x[:, None]
        layout = "NHW"
    elif x.ndim == 4:
        nhwc = x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
        layout = "NHWC" if nhwc else "NCHW"
        if nhwc:
            x = x.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    else:
        raise DataError(f"{path}: {key} must be images (N, C, H, W), (N, H, W, C) or (N, H, W), got shape {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x), layout
    if x.dtype.kind != "f":
        raise DataError(f"{path}: {key} must be uint8 (0-255) or float images, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        first = np.unravel_index(int(np.argmin(finite)), x.shape)[0]
        raise DataError(f"{path}: {key} holds non-finite values (NaN or inf), first in image {first}")
    return x, layout


def _labels(path: Path, key: str, y: np.ndarray, n: int, xkey: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{path}: {key} must be 1-D class indices, got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise DataError(f"{path}: {key} must be integer class indices, got dtype {y.dtype}")
    if y.shape[0] != n:
        raise DataError(f"{path}: {key} has {y.shape[0]} labels but {xkey} has {n} images")
    if y.size and y.min() < 0:
        raise DataError(f"{path}: {key} holds negative labels (smallest {int(y.min())}); expected class indices >= 0")
    return y.astype(np.int64)


def _classes(path: Path, raw: Any, labels: list[np.ndarray]) -> tuple[tuple[str, ...] | None, int]:
    top = max(int(y.max()) for y in labels if y.size) if any(y.size for y in labels) else -1
    if raw is None:
        k = top + 1
        if k < 2:
            raise DataError(f"{path}: the labels name a single class ({k} in all); expected at least 2 classes")
        return None, k
    if raw.ndim != 1 or raw.dtype.kind not in "US":
        raise DataError(f"{path}: classes must be a 1-D array of names (strings), got {raw.dtype} of shape {raw.shape}")
    names = tuple(str(c.decode() if isinstance(c, bytes) else c) for c in raw.tolist())
    if len(set(names)) != len(names):
        raise DataError(f"{path}: classes holds duplicate names")
    if len(names) < 2:
        raise DataError(f"{path}: classes names {len(names)} class; expected at least 2")
    if top >= len(names):
        raise DataError(f"{path}: labels must be in [0, {len(names)}) for its {len(names)} classes, got label {top}")
    return names, len(names)


def load_arrays(path: str | os.PathLike):
    """An ``.npz`` of arrays as a :class:`cnn_gpu.data.Dataset` (see the module docs)."""
    from . import Dataset  # noqa: PLC0415

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: expected an .npz file, got a folder")
    d = _read(path)
    if ("x_val" in d) != ("y_val" in d):
        raise DataError(
            f"{path}: has {'x_val' if 'x_val' in d else 'y_val'} without "
            f"{'y_val' if 'x_val' in d else 'x_val'}; give both or neither"
        )
    splits = [s for s in ("train", "val", "test") if f"x_{s}" in d]
    xs, ys = {}, {}
    for s in splits:
        xs[s], _ = _images(path, f"x_{s}", d[f"x_{s}"])
        ys[s] = _labels(path, f"y_{s}", d[f"y_{s}"], xs[s].shape[0], f"x_{s}")
    for s in splits:
        if xs[s].shape[1:] != xs["train"].shape[1:] or xs[s].dtype != xs["train"].dtype:
            raise DataError(
                f"{path}: x_{s} holds {xs[s].dtype} images of shape (C, H, W) = {xs[s].shape[1:]}, but "
                f"x_train holds {xs['train'].dtype} of {xs['train'].shape[1:]}"
            )
    if xs["train"].shape[0] == 0 or xs["test"].shape[0] == 0:
        raise DataError(
            f"{path}: x_train and x_test must hold at least one image each, got {xs['train'].shape[0]} and {xs['test'].shape[0]}"
        )
    classes, k = _classes(path, d.get("classes"), list(ys.values()))
    scale = 255.0 if xs["train"].dtype == np.uint8 else 1.0
    return Dataset(path.stem, xs["train"], ys["train"], xs["test"], ys["test"], k, scale, classes, xs.get("val"), ys.get("val"))


__all__ = ["load_arrays", "REQUIRED", "OPTIONAL"]
