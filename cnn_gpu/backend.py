"""The array-backend seam: NumPy on the CPU, CuPy on an NVIDIA GPU.

Every op is written against an array module ``xp``. Ops take ``xp`` from their
inputs (:func:`get_array_module`); only code that *creates* arrays (parameter
initialisation, data loading, ``Module.to``) asks for the current backend,
which lives in a :class:`contextvars.ContextVar`::

    with cnn_gpu.use_backend("cupy"):
        model = cnn_gpu.models.lenet5()      # parameters are created on the GPU

The default backend comes from the setting ``backend`` of :mod:`cnn_gpu.config`
(``CNN_GPU_BACKEND``: "numpy", "cupy" or "auto"), else "numpy".
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from . import config
from .config import BACKENDS


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (CuPy missing, or no GPU)."""


@functools.cache
def _cupy_status() -> tuple[ModuleType | None, str]:
    """(cupy module or None, reason it is unusable or "")."""
    try:
        import cupy  # noqa: PLC0415  (optional dependency, imported lazily)
    except Exception as exc:  # ImportError, or a broken CUDA install
        return None, (
            f"CuPy is not importable ({type(exc).__name__}: {exc}); install the cuda12 or cuda13 extra "
            "(pip install -e '.[cuda12]' in a checkout of cnn_gpu)"
        )
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"CuPy is installed but no CUDA device is usable ({type(exc).__name__}: {exc})"
    if count < 1:
        return None, "CuPy is installed but no CUDA device was found"
    from .cuda import build  # noqa: PLC0415  (imports nothing of cnn_gpu but the config)

    try:
        build.probe()  # compile and launch a trivial kernel: a broken install fails here, once, clearly
    except Exception as exc:
        return None, (
            f"CuPy sees a GPU but cannot compile or run cnn_gpu's kernels ({type(exc).__name__}: {exc}); "
            "install CuPy with its CUDA libraries: pip install -e '.[cuda12]' (or '.[cuda13]') in a checkout"
        )
    return cupy, ""


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    return _cupy_status()[0] is not None


def _resolve(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend: expected one of {BACKENDS} as a str, got {type(name).__name__} {name!r}")
    key = name.strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if key == "auto":
        return "cupy" if cupy_available() else "numpy"
    if key == "cupy":
        cp, why = _cupy_status()
        if cp is None:
            raise BackendUnavailableError(f"backend 'cupy' was requested but cannot run: {why}")
    return key


def current_backend() -> str:
    """The resolved name of the current backend: "numpy" or "cupy"."""
    return _resolve(config.get().backend)


def current_xp() -> ModuleType:
    """The array module of the current backend (for array-creating code only)."""
    return backend_module(current_backend())


def backend_module(name: str) -> ModuleType:
    """The array module for a backend name ("numpy", "cupy" or "auto")."""
    if _resolve(name) == "cupy":
        cp, _ = _cupy_status()
        assert cp is not None  # _resolve raised BackendUnavailableError otherwise
        return cp
    return np


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[ModuleType]:
    """Context manager: array-creating code inside uses backend ``name``; yields its module."""
    resolved = _resolve(name)
    with config.override(backend=resolved):
        yield backend_module(resolved)


def set_backend(name: str) -> None:
    """Set the backend for the current context (thread / task) from now on."""
    config.update(backend=_resolve(name))


def is_cupy_array(a: Any) -> bool:
    """Whether ``a`` is a CuPy array (by its type's module: CuPy is not imported)."""
    return type(a).__module__.split(".")[0] == "cupy"


def get_array_module(*arrays: Any) -> ModuleType:
    """``cupy`` if any argument is a CuPy array, else ``numpy`` (never imports CuPy itself)."""
    for a in arrays:
        if is_cupy_array(a):
            import cupy  # noqa: PLC0415

            return cupy
    return np


# DLPack device types (dlpack.h DLDeviceType): arrays NumPy can read in place, and CUDA memory.
_DLPACK_HOST = (1, 3)  # kDLCPU, kDLCUDAHost (pinned host memory)
_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


def is_dlpack_producer(a: Any) -> bool:
    """True for an array of another framework that exports DLPack (a torch tensor, a JAX array, ...);
    False for NumPy and CuPy arrays, which cnn_gpu uses as they are."""
    return hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__") and not (isinstance(a, np.ndarray) or is_cupy_array(a))


def _dlpack_source(a: Any) -> Any:
    # torch refuses to export a tensor that records gradients; reading its values needs no autograd
    if getattr(a, "requires_grad", False) and callable(getattr(a, "detach", None)):
        return a.detach()
    return a


def from_dlpack(a: Any, xp: ModuleType | None = None) -> Any:
    """``a`` (any DLPack producer) as an array of ``xp`` (NumPy by default), sharing its memory
    whenever the device allows: host memory becomes a NumPy view, GPU memory a CuPy view. Across
    devices it is copied (what moving between backends means). The dtype is kept as it is."""
    xp = np if xp is None else xp
    a = _dlpack_source(a)
    try:
        device = int(a.__dlpack_device__()[0])
        if xp is np:
            return np.from_dlpack(a) if device in _DLPACK_HOST else np.from_dlpack(a, device="cpu")
        if device in _DLPACK_CUDA:
            return xp.from_dlpack(a)
        return xp.asarray(np.from_dlpack(a, device="cpu" if device not in _DLPACK_HOST else None))
    except (BufferError, TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise TypeError(
            f"a: cannot read the {type(a).__name__} through DLPack as a {xp.__name__} array ({type(exc).__name__}: {exc})"
        ) from None


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy copy (or view) of ``a``, which may live on either backend or be any DLPack producer
    (a view of its memory when it is on the host)."""
    if is_cupy_array(a):
        return a.get()
    if is_dlpack_producer(a):
        return from_dlpack(a, np)
    return np.asarray(a)


def asarray(a: Any, dtype: Any = None) -> Any:
    """``a`` as an array of the current backend, moving it across devices if needed.

    ``a`` may be any DLPack producer (a torch tensor, a JAX array, CuPy, NumPy): on the same
    device it is not copied (the result shares its memory: writes through either side show on
    the other), and its dtype is kept unless ``dtype`` asks for another (which copies).
    """
    xp = current_xp()
    if is_dlpack_producer(a):
        a = from_dlpack(a, xp)
    if xp is np:
        return np.asarray(to_numpy(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


def on_same_backend(a: Any, like: Any) -> Any:
    """``a`` moved to the backend that array ``like`` lives on."""
    xp = get_array_module(like)
    if is_dlpack_producer(a):
        return from_dlpack(a, xp)
    if xp is np:
        return to_numpy(a)
    return xp.asarray(a)
