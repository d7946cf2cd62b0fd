"""Every setting of cnn_gpu in one place: the ``CNN_GPU_*`` environment variables and the switches.

The environment is read once, on first use, into a :class:`Config`. Code reads the settings with
:func:`get`; a ``with override(...)`` block (or :func:`update`, for the rest of the current
context) changes them for the current thread or task only, since the active Config lives in a
:class:`contextvars.ContextVar`::

    with cnn_gpu.config.override(engine="reference", workspace_mb=16):
        ...                                  # the readable reference ops, 16 MiB im2col buffers

| variable               | field          | meaning                                                      |
|------------------------|----------------|--------------------------------------------------------------|
| ``CNN_GPU_BACKEND``    | ``backend``    | where new arrays go: numpy, cupy or auto (default numpy)     |
| ``CNN_GPU_ENGINE``     | ``engine``     | which engine runs the ops: auto (cuda for CuPy arrays, cpu   |
|                        |                | for NumPy ones), reference, cpu or cuda                      |
| ``CNN_GPU_THREADS``    | ``threads``    | the CPU engine's threads (default: the usable cores)         |
| ``CNN_GPU_WORKSPACE_MB``| ``workspace_mb``| cap on one convolution's im2col buffer, MiB (default 1024)  |
| ``CNN_GPU_KERNELS_DIR``| ``kernels_dir``| where the CUDA sources are (default: found next to the code) |
| ``CNN_GPU_DATA``       | ``data_dir``   | dataset folder (default ~/.cache/cnn_gpu)                    |
| ``CNN_GPU_MIRROR``     | ``mirror``     | one base URL to download datasets from                       |
| ``CNN_GPU_TIMEOUT_S``  | ``timeout_s``  | data-parallel runs: seconds a collective may wait for the    |
|                        |                | other ranks before every rank is aborted (default 300)       |
| ``CNN_GPU_MMAP_MB``    | ``mmap_mb``    | a cached image array larger than this (MiB) is memory-mapped |
|                        |                | (np.memmap), not read into memory (default 1024)             |
| ``CNN_GPU_DEVICE_DATA``| ``device_data``| a run's data is uploaded to the GPU once when its normalised |
|                        |                | splits take under this fraction of the free device memory;   |
|                        |                | else batches stream from the host (default 0.5; docs/DATA.md)|
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

BACKENDS = ("numpy", "cupy", "auto")
ENGINES = ("auto", "reference", "cpu", "cuda")
DEFAULT_WORKSPACE_MB = 1024.0
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MMAP_MB = 1024.0
DEFAULT_DEVICE_DATA = 0.5

# field -> environment variable
ENV = {
    "backend": "CNN_GPU_BACKEND",
    "engine": "CNN_GPU_ENGINE",
    "threads": "CNN_GPU_THREADS",
    "workspace_mb": "CNN_GPU_WORKSPACE_MB",
    "kernels_dir": "CNN_GPU_KERNELS_DIR",
    "data_dir": "CNN_GPU_DATA",
    "mirror": "CNN_GPU_MIRROR",
    "timeout_s": "CNN_GPU_TIMEOUT_S",
    "mmap_mb": "CNN_GPU_MMAP_MB",
    "device_data": "CNN_GPU_DEVICE_DATA",
}


@dataclasses.dataclass(frozen=True)
class Config:
    backend: str = "numpy"
    engine: str = "auto"
    threads: int | None = None
    workspace_mb: float = DEFAULT_WORKSPACE_MB
    kernels_dir: str | None = None
    data_dir: str | None = None
    mirror: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    mmap_mb: float = DEFAULT_MMAP_MB
    device_data: float = DEFAULT_DEVICE_DATA


def _choice(name: str, value: Any, choices: tuple) -> str:
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value.strip().lower()


def _positive_int_or_none(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int (or None for the usable cores), got {value!r}")
    return value


def _positive_mb(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive number of MiB, got {value!r}")
    return float(value)


def _positive_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive number of seconds, got {value!r}")
    return float(value)


def _text_or_none(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a str or None, got {type(value).__name__}")
    return None if value is None else os.fspath(value)


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a fraction in [0, 1], got {value!r}")
    return float(value)


def _mib(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a non-negative number of MiB, got {value!r}")
    return float(value)


_CHECKS = {
    "backend": lambda n, v: _choice(n, v, BACKENDS),
    "engine": lambda n, v: _choice(n, v, ENGINES),
    "threads": _positive_int_or_none,
    "workspace_mb": _positive_mb,
    "kernels_dir": _text_or_none,
    "data_dir": _text_or_none,
    "mirror": _text_or_none,
    "timeout_s": _positive_seconds,
    "mmap_mb": _mib,
    "device_data": _fraction,
}


def check(field: str, value: Any, name: str | None = None) -> Any:
    """``value`` validated (and normalised) for ``field``; errors name ``name`` (default: the field)."""
    if field not in _CHECKS:
        raise AttributeError(f"config has no setting {field!r}; known: {sorted(_CHECKS)}")
    return _CHECKS[field](name or field, value)


def _parse_env(field: str, text: str) -> Any:
    var = ENV[field]
    if field == "threads":
        try:
            return check(field, int(text), var)
        except ValueError:
            raise ValueError(f"{var}: expected a positive int, got {text!r}") from None
    if field in ("workspace_mb", "timeout_s", "mmap_mb", "device_data"):
        try:
            return check(field, float(text), var)
        except ValueError:
            what = {
                "workspace_mb": "a positive number of MiB",
                "timeout_s": "a positive number of seconds",
                "mmap_mb": "a non-negative number of MiB",
                "device_data": "a fraction in [0, 1]",
            }[field]
            raise ValueError(f"{var}: expected {what}, got {text!r}") from None
    return check(field, text, var)


def from_environment(environ: Mapping[str, str] | None = None) -> Config:
    """A Config from the ``CNN_GPU_*`` variables (unset or empty ones keep their defaults)."""
    env = os.environ if environ is None else environ
    values = {f: _parse_env(f, env[v]) for f, v in ENV.items() if env.get(v)}
    return Config(**values)


_active: contextvars.ContextVar[Config | None] = contextvars.ContextVar("cnn_gpu_config", default=None)
_from_env: list[Config] = []  # the environment, read once


_env_given: list[frozenset] = []  # the fields the environment sets, read once


def given_by_environment() -> frozenset:
    """The fields whose ``CNN_GPU_*`` variable is set (non-empty) in the environment, e.g. so that
    a front end can tell ``CNN_GPU_BACKEND=numpy`` from the default."""
    if not _env_given:
        _env_given.append(frozenset(f for f, v in ENV.items() if os.environ.get(v)))
    return _env_given[0]


def get() -> Config:
    """The settings in effect here."""
    cfg = _active.get()
    if cfg is None:
        if not _from_env:
            _from_env.append(from_environment())
        cfg = _from_env[0]
    return cfg


def _replaced(changes: dict) -> Config:
    checked = {k: check(k, v) for k, v in changes.items()}
    return dataclasses.replace(get(), **checked)


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[Config]:
    """Within the block, the given settings replace the current ones (this thread / task only)."""
    cfg = _replaced(changes)
    token = _active.set(cfg)
    try:
        yield cfg
    finally:
        _active.reset(token)


def update(**changes: Any) -> Config:
    """Change settings for the rest of the current context (thread / task); returns the new Config."""
    cfg = _replaced(changes)
    _active.set(cfg)
    return cfg


__all__ = [
    "Config",
    "get",
    "override",
    "update",
    "check",
    "from_environment",
    "given_by_environment",
    "ENV",
    "BACKENDS",
    "ENGINES",
    "DEFAULT_WORKSPACE_MB",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_MMAP_MB",
    "DEFAULT_DEVICE_DATA",
]
