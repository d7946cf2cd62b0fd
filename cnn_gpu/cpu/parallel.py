"""Spreading a batch over the CPU's cores: the CPU engine's threads.

NumPy runs an elementwise op or a copy on one core, while OpenBLAS splits every GEMM over
all of them, and its worker threads then spin for a long while (about 2**28 cycles)
waiting for the next GEMM, taking a core from whatever runs next. So on NumPy arrays the
ops here split their work themselves: :func:`run` hands independent parts (chunks of a
convolution, slices of the batch) to ``threads()`` Python threads (NumPy releases the GIL
inside its loops and GEMMs), with BLAS limited to one thread meanwhile, so every part of
the work uses every core and OpenBLAS's own threads stay asleep. Which worker gets which
part is fixed, and partial sums are added in worker order, so results are reproducible
(they depend on the thread count only through that order).

Only the CPU engine uses this module (the GPU runs none of it). The ``threads`` setting of
cnn_gpu.config (``CNN_GPU_THREADS``) sets the number of threads (default: the cores this
process may run on); 1 runs everything on the calling thread (still with single-threaded BLAS).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import config


@functools.cache
def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def threads() -> int:
    """Worker threads: the ``threads`` setting (CNN_GPU_THREADS), else the usable cores."""
    return config.get().threads or _usable_cores()


@functools.cache
def _executor(n: int, pid: int) -> ThreadPoolExecutor:
    """The worker pool of process ``pid`` (created on first use, kept for the life of the
    process; a forked child, which has none of its parent's threads, gets its own)."""
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="cnn_gpu")


class _BlasLimit:
    """BLAS limited to one thread while any caller is inside (entries from several threads
    nest: the first sets the limit, the last out restores the previous thread counts)."""

    def __init__(self, libs: tuple):
        self.libs = libs
        self.lock = threading.Lock()
        self.depth = 0
        self.before: list = []

    def __enter__(self) -> None:
        with self.lock:
            if self.depth == 0:
                self.before = [lc.get_num_threads() for lc in self.libs]
                for lc in self.libs:
                    lc.set_num_threads(1)
            self.depth += 1

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                for lc, n in zip(self.libs, self.before):
                    lc.set_num_threads(n)


@functools.cache
def _blas_limit() -> _BlasLimit | None:
    """The limiter of the loaded BLAS libraries (through threadpoolctl, a dependency of
    scikit-learn), or None without threadpoolctl: the parts then run in order, BLAS threaded
    as usual."""
    try:
        from threadpoolctl import ThreadpoolController  # noqa: PLC0415
    except ImportError:
        return None
    libs = tuple(lc for lc in ThreadpoolController().lib_controllers if lc.user_api == "blas")
    return _BlasLimit(libs) if libs else None


class _NoLimit:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def single_threaded_blas():
    """Context manager: BLAS limited to one thread inside (restored on exit; nested and
    concurrent uses share one limit)."""
    limit = _blas_limit()
    return limit if limit is not None else _NoLimit()


def workers(parts: int) -> int:
    """How many threads :func:`run` uses for ``parts`` independent parts."""
    if parts < 2 or _blas_limit() is None:
        return 1
    return min(threads(), parts)


def run(fns: Sequence[Callable[[], Any]]) -> list:
    """Call every function in ``fns`` (independent work, one per worker) and return their
    results in order: in threads, with BLAS limited to one thread (see above); without
    threadpoolctl, in order on the calling thread."""
    with single_threaded_blas():
        if len(fns) < 2 or workers(len(fns)) < 2:
            return [fn() for fn in fns]
        pool = _executor(threads(), os.getpid())
        futures = [pool.submit(fn) for fn in fns[1:]]
        try:
            first = fns[0]()  # the calling thread takes the first part
        except BaseException:
            for f in futures:  # no part outlives the call
                f.exception()
            raise
        return [first] + [f.result() for f in futures]


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) as ``parts`` contiguous ranges of near-equal size (empty ones dropped)."""
    step, extra = divmod(n, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + step + (1 if i < extra else 0)
        if hi > lo:
            out.append((lo, hi))
        lo = hi
    return out


def over_range(n: int, fn: Callable[[int, int], Any], min_per_part: int = 1) -> list:
    """fn(n0, n1) over a split of [0, n) (the batch, or another axis whose slices are
    independent work) into parts of at least ``min_per_part``, in parallel (see run)."""
    parts = workers(n // max(1, min_per_part))
    ranges = split(n, parts) or [(0, n)]
    return run([functools.partial(fn, lo, hi) for lo, hi in ranges])
