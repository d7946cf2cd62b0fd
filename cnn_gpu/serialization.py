"""Saving and loading models: one ``.npz`` file with the weights and the architecture.

File format (a NumPy ``.npz`` archive, readable with ``numpy.load(path, allow_pickle=False)``):

- one array per parameter, under its derived name (``features.0.weight``, ...), in the model's dtype;
- ``__cnn_gpu__``: a uint8 array holding UTF-8 JSON:
  ``{"format": "cnn_gpu.model", "version": 1, "dtype": "float32",
     "architecture": <module description>, "metadata": {...}}``.
  A module description is ``{"type": "Sequential", "children": [[name, description], ...]}``,
  ``{"type": "Residual", "body": description, "shortcut": description or null}``
  or ``{"type": "<Layer class>", "config": {constructor arguments}}``.
- buffers (BatchNorm's running statistics) are stored like parameters, under their names.

``load`` rebuilds the model from the description alone, so a saved model can be evaluated
without the code that built it.
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np

from .backend import to_numpy
from .io import atomic_write
from .nn import LAYER_TYPES, Module, Residual, Sequential

FORMAT = "cnn_gpu.model"
VERSION = 1
HEADER_KEY = "__cnn_gpu__"


def describe(module: Module) -> dict:
    """The JSON-serialisable architecture of ``module``."""
    if isinstance(module, Sequential):
        return {"type": "Sequential", "children": [[n, describe(c)] for n, c in module.named_children()]}
    if isinstance(module, Residual):
        return {"type": "Residual", "body": describe(module.body),
                "shortcut": describe(module.shortcut) if module.shortcut is not None else None}
    name = type(module).__name__
    if name not in LAYER_TYPES:
        raise TypeError(f"module: {name} is not a cnn_gpu layer type and cannot be described; known: {sorted(LAYER_TYPES)}")
    return {"type": name, "config": module.config()}


def build(desc: dict, dtype: Any = np.float32) -> Module:
    """A freshly initialised module from a description (the inverse of :func:`describe`)."""
    if not isinstance(desc, dict) or "type" not in desc:
        raise ValueError(f"architecture: expected a dict with a 'type' key, got {desc!r}")
    kind = desc["type"]
    if kind == "Sequential":
        from collections import OrderedDict

        return Sequential(OrderedDict((n, build(c, dtype)) for n, c in desc["children"]))
    if kind == "Residual":
        shortcut = desc.get("shortcut")
        return Residual(build(desc["body"], dtype), build(shortcut, dtype) if shortcut is not None else None)
    if kind not in LAYER_TYPES:
        raise ValueError(f"architecture: unknown layer type {kind!r}; known: {sorted(LAYER_TYPES)}")
    cls = LAYER_TYPES[kind]
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in desc.get("config", {}).items()}
    if kind in ("Conv2d", "Linear"):
        cfg.update(dtype=dtype, generator=np.random.default_rng(0))  # weights are overwritten by load
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        cfg.update(dtype=dtype)
    return cls(**cfg)


def model_dtype(model: Module) -> np.dtype:
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1:
        raise TypeError(f"model: expected one parameter dtype, got {sorted(map(str, dtypes))}")
    return next(iter(dtypes)) if dtypes else np.dtype(np.float32)


def encode_header(obj: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, sort_keys=True).encode("utf-8"), dtype=np.uint8)


def decode_header(arr: np.ndarray, path: Any, expected_format: str) -> dict:
    try:
        header = json.loads(arr.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: the {HEADER_KEY} header is not valid JSON ({exc})") from None
    if header.get("format") != expected_format:
        raise ValueError(f"{path}: expected a {expected_format!r} file, got format {header.get('format')!r}")
    return header


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an .npz file, with a clear error for a missing, truncated or corrupt file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    # NotImplementedError: a corrupted compression method; RuntimeError: a corrupted 'encrypted' flag
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a readable cnn_gpu file (truncated or corrupted?): {type(exc).__name__}: {exc}") from None
    # np.load returns raw bytes for a member whose name does not end in .npy (a corrupted directory entry)
    odd = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
    if odd:
        raise ValueError(f"{path}: not a readable cnn_gpu file (truncated or corrupted?): members {odd} are not arrays")
    return arrays


def read_file(path: str | os.PathLike, expected_format: str, version: int, what: str) -> tuple[dict, dict]:
    """(header, arrays) of a cnn_gpu .npz file of ``expected_format``, checked for its header and version."""
    arrays = read_npz(path)
    if HEADER_KEY not in arrays:
        raise ValueError(f"{path}: missing the {HEADER_KEY} header; not a {what} written by cnn_gpu")
    header = decode_header(arrays.pop(HEADER_KEY), path, expected_format)
    if header.get("version") != version:
        raise ValueError(f"{path}: expected format version {version}, got {header.get('version')!r} (a {what})")
    return header, arrays


def save(model: Module, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write ``model`` (architecture + weights) to ``path`` atomically."""
    if not isinstance(model, Module):
        raise TypeError(f"model: expected a cnn_gpu.nn.Module, got {type(model).__name__}")
    header = {"format": FORMAT, "version": VERSION, "dtype": str(model_dtype(model)),
              "architecture": describe(model), "metadata": metadata or {}}
    arrays = {name: to_numpy(a) for name, a in model.state_dict().items()}
    arrays[HEADER_KEY] = encode_header(header)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load(path: str | os.PathLike, backend: str | None = None) -> Module:
    """Rebuild a model saved by :func:`save` (on the current backend, or ``backend``)."""
    header, arrays = read_file(path, FORMAT, VERSION, "model file")
    model = build(header["architecture"], dtype=np.dtype(header["dtype"]))
    if backend is not None:
        model.to(backend)
    try:
        model.load_state_dict(arrays)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: weights do not match the saved architecture: {exc}") from None
    return model
