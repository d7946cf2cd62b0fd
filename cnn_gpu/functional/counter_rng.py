"""Counter-based random numbers: a random number is a pure function of (key, counter).

No generator state: element i of a draw is ``uniform(key, i)``, so a draw can be recomputed
from a few integers (resumable), split over threads or GPU threads in any order, and the CPU
and the GPU produce the same bits (kernels/common.cuh: cnn_mix64, cnn_random_bits, cnn_uniform
are this module, line for line).

    mix64(z)            the splitmix64 finaliser, a bijection of 64-bit words
    bits(key, counter)  = mix64(key + mix64(counter))            (arithmetic modulo 2**64)
    uniform             the top 24 (float32) or 53 (float64) bits of bits() as a float in [0, 1)
    key(*words)         folds integers (a seed, a call number, an epoch, ...) into one key
"""

from __future__ import annotations

import numpy as np

_M = (1 << 64) - 1
_C1, _C2, _C3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64(xp, z):
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = z + _C1
    z = (z ^ (z >> np.uint64(30))) * _C2
    z = (z ^ (z >> np.uint64(27))) * _C3
    return z ^ (z >> np.uint64(31))


def key(*words: int) -> int:
    """One 64-bit key from non-negative integers (each folded in with mix64), as a Python int."""
    k = 0
    for w in words:
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 0:
            raise ValueError(f"key: expected non-negative integers, got {w!r}")
        k = _mix64_int((k + _mix64_int(int(w) & _M)) & _M)
    return k


def _mix64_int(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def bits(xp, k: int, counters):
    """bits(key, counter) for a uint64 array of counters."""
    with np.errstate(over="ignore"):
        return mix64(xp, xp.uint64(k) + mix64(xp, counters.astype(xp.uint64, copy=False)))


def uniform(xp, k: int, shape, dtype):
    """A uniform [0, 1) array of ``shape`` and float ``dtype``: element i (C order) is uniform(key, i)."""
    n = int(np.prod(shape))
    b = bits(xp, k, xp.arange(n, dtype=xp.uint64))
    if np.dtype(dtype) == np.float32:
        u = (b >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    else:
        u = (b >> np.uint64(11)).astype(np.float64) * np.float64(1.0 / 9007199254740992.0)
    return u.reshape(shape)


__all__ = ["mix64", "key", "bits", "uniform"]
