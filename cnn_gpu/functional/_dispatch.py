"""The one place that picks the engine an op runs on.

An engine is a module with functions named like the ops (``conv2d_forward(x, w, b, g, ...)``,
``max_pool2d_backward(dy, cache)``, ...): ``reference`` (functional/reference.py, the readable
xp code), ``cpu`` (cnn_gpu/cpu, NumPy arrays) and ``cuda`` (cnn_gpu/cuda, CuPy arrays). An op an
engine does not define runs the reference. The setting ``engine`` of cnn_gpu.config
(``CNN_GPU_ENGINE``) chooses:

    auto        the cuda engine for CuPy arrays, the cpu engine for NumPy arrays (the default);
                empty arrays (a batch of none) run on the reference
    reference   the reference for everything
    cpu, cuda   that engine (tests force them; cuda on NumPy arrays needs the CPU emulation of
                the kernels, tests/emulation)

A backward runs on the engine that made its forward's cache (``cache.engine``).
The engines register themselves here (cnn_gpu/__init__.py), so this module imports none of them.

Some public ops take keywords that an engine may do inside its own launches, or not at all
(a backward's ``accumulate_into``: add the parameter gradients into given arrays). An engine
function marks the ones it does with :func:`native`; for the others the public API does the
work around the call (:func:`backward_into`), so every engine gives the same result.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from .. import config
from ..backend import is_cupy_array
from . import reference

_engines: dict[str, ModuleType] = {"reference": reference}


def register(engine: ModuleType) -> None:
    """Make ``engine`` (a module with ``NAME`` and op functions) selectable."""
    _engines[engine.NAME] = engine


def engine_name(x: Any) -> str:
    """The engine that runs ops on array ``x`` under the current settings."""
    setting = config.get().engine
    if setting == "auto":
        return "cuda" if is_cupy_array(x) else "cpu"
    if setting == "cpu" and is_cupy_array(x):
        raise TypeError("engine: the cpu engine (CNN_GPU_ENGINE=cpu) runs NumPy arrays only, got a CuPy array")
    return setting


def engine(x: Any) -> ModuleType:
    """The engine module for array ``x``. An empty array runs on the reference (the fast engines
    split work that is not there)."""
    if getattr(x, "size", 1) == 0:
        return reference
    name = engine_name(x)
    try:
        return _engines[name]
    except KeyError:
        raise RuntimeError(f"engine: {name!r} is not registered (import cnn_gpu first)") from None


def _lookup(eng: ModuleType, op: str) -> Callable:
    fn = getattr(eng, op, None)
    return fn if fn is not None else getattr(reference, op)


def impl(op: str, x: Any) -> Callable:
    """The function that runs ``op`` on array ``x``: its engine's, else the reference's."""
    return _lookup(engine(x), op)


def impl_for(op: str, cache: Any) -> Callable:
    """The backward ``op`` of the engine that made ``cache``."""
    return _lookup(_engines[cache.engine], op)


def native(*keywords: str) -> Callable:
    """Decorator: the engine function takes these optional keywords itself."""

    def mark(fn: Callable) -> Callable:
        fn.native_keywords = frozenset(keywords)  # type: ignore[attr-defined]  # a mark read by _lookup
        return fn

    return mark


def takes(fn: Callable, keyword: str) -> bool:
    """Whether engine function ``fn`` does ``keyword``'s work itself (see :func:`native`)."""
    return keyword in getattr(fn, "native_keywords", ())


def backward_into(fn: Callable, args: tuple, accumulate_into: Any) -> tuple:
    """Run backward ``fn(*args)`` -> (dx, *parameter gradients); with ``accumulate_into`` (one array
    or None per parameter gradient, checked by the caller) the gradients are added into those
    arrays in place and returned in their stead: by the engine when it can (the CUDA engine: inside
    its GEMMs and kernels, no extra launch), else here, one in-place sum each."""
    if accumulate_into is None:
        return fn(*args)
    if takes(fn, "accumulate_into"):
        return fn(*args, accumulate_into=accumulate_into)
    dx, *grads = fn(*args)
    for acc, g in zip(accumulate_into, grads):
        if acc is not None:
            acc += g
    return (dx, *accumulate_into)


__all__ = ["register", "engine_name", "engine", "impl", "impl_for", "native", "takes", "backward_into"]
