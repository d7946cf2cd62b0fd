"""Seeding. Parameters are initialised on the host with a NumPy Generator and then
moved to the current backend, so a seed gives the same initial weights on NumPy and CuPy."""

from __future__ import annotations

import contextvars

import numpy as np

_default: contextvars.ContextVar[np.random.Generator | None] = contextvars.ContextVar("cnn_gpu_generator", default=None)


def manual_seed(seed: int) -> np.random.Generator:
    """Seed the default generator used for initialisation, shuffling and dropout seeds."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    gen = np.random.default_rng(int(seed))
    _default.set(gen)
    return gen


def default_generator() -> np.random.Generator:
    """cnn_gpu's default NumPy Generator for the current context (seeded by :func:`manual_seed`,
    else from fresh entropy on first use): what initialisation, shuffling and dropout seeds draw from."""
    gen = _default.get()
    if gen is None:
        gen = np.random.default_rng()
        _default.set(gen)
    return gen


def resolve_generator(generator: np.random.Generator | int | None) -> np.random.Generator:
    """A Generator from ``generator`` (a Generator, a seed, or None for the default one)."""
    if generator is None:
        return default_generator()
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator))
    raise TypeError(f"generator: expected a numpy.random.Generator, an int seed or None, got {type(generator).__name__}")
