"""The stand-in's null-compute switch: device work that costs nothing, for timing the host side.

    from standin import null_compute
    with null_compute() as computed:
        step()          # issued, checked, counted and captured as always; no arithmetic runs
    assert not computed  # every operation of the step had a shape rule (nothing was computed)

Inside the block, work issued on a stream that is not capturing is counted (``Counters``) but not
run: our kernels (tests/standin/kernels.py), the fake cuBLAS GEMMs (cublas.py, and
``cupy.cublas.gemm``/``cupy.matmul``), CuPy's elementwise, reduction, copy and fill operations
(array.py, module.py), and a graph launch skips its recorded work (graph.py: only its event and
host-function nodes run). What stays: argument conversion and checks, allocations (a new result is
an uninitialised array of the right shape and dtype, from a shape rule: :func:`ufunc_meta`,
:func:`reduction_meta`, ...), capture and graph bookkeeping, transfers (a staged scalar's
8-byte upload still happens). So the values are garbage: a step run this way trains nothing and
nothing should read its results (a check that compares them, e.g. StepGraph's first-replay check,
fails; build the graph with ``check=False``).

An operation that makes a new array and has no shape rule still computes, and is counted in
``computed`` (kind -> count; the block yields it, cleared on entry), so a benchmark can say its
null mode was complete. A result that is a view of its inputs (a reshape) is no arithmetic and is
not counted.

Not CuPy's API: test and benchmark support (benchmarks/gpu_budget.py --host-time). The stand-in's
own per-call overhead (its API-surface checks, ctypes checks, Python wrappers) is not CuPy's, so
host times measured this way are our Python's cost plus the stand-in's, not a real GPU's."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import numpy as np

_depth = [0]
computed: collections.Counter = collections.Counter()  # kind -> new arrays computed for lack of a shape rule


def active() -> bool:
    return _depth[0] > 0


@contextlib.contextmanager
def null_compute() -> Iterator[collections.Counter]:
    """Within the block, issued device work is counted but not run (see the module docstring)."""
    if not _depth[0]:
        computed.clear()
    _depth[0] += 1
    try:
        yield computed
    finally:
        _depth[0] -= 1


def issued(kind: str, fn, inplace: bool, meta, inputs=()):
    """What work of ``kind``, issued outside capture under null compute, returns: nothing for
    ``inplace`` work, ``meta()`` (an unwritten result of the right shape and dtype) for new arrays,
    else ``fn()`` (counted in ``computed`` unless it is a view of ``inputs``)."""
    if inplace:
        return None
    if meta is not None:
        return meta()
    from .graph import _is_view  # noqa: PLC0415  (graph imports this module)

    result = fn()
    if not _is_view(result, list(inputs)):
        computed[kind] += 1
    return result


# ------------------------------------------------------------------ shape rules
def _zero(a):
    """A 0-d zero of ``a``'s dtype for an array (NumPy 2 promotes 0-d arrays by dtype, as arrays);
    other arguments (Python scalars) as they are."""
    return np.zeros((), a.dtype) if isinstance(a, np.ndarray) else a


def _empty_as(shape, r):
    if isinstance(r, tuple):
        return tuple(_empty_as(shape, v) for v in r)
    return np.empty(shape, np.asarray(r).dtype)


def ufunc_meta(ufunc, args, kwargs):
    """The unwritten result of ``ufunc(*args, **kwargs)`` (no ``out``): the broadcast shape, the
    dtype the ufunc gives for these dtypes (found on 0-d zeros)."""

    def meta():
        shape = np.broadcast_shapes(*(np.shape(a) for a in args))
        with np.errstate(all="ignore"):
            r = ufunc(*(_zero(a) for a in args), **kwargs)
        return _empty_as(shape, r)

    return meta


_SHAPE_KEPT = {"argsort", "sort", "cumsum"}


def reduction_meta(name: str, fn, a: np.ndarray, args: tuple, kwargs: dict):
    """The unwritten result of reduction ``name`` of ``a`` (``a.name(*args, **kwargs)`` or
    ``numpy.name(a, *args, **kwargs)``: ``args`` without ``a``) when its form is simple (an axis,
    keepdims, dtype); else None (it will compute). ``fn(x)`` runs the same call on another array."""
    if len(args) > 1 or set(kwargs) - {"axis", "keepdims", "dtype"} or not isinstance(a, np.ndarray):
        return None
    given = bool(args) or "axis" in kwargs
    axis = args[0] if args else kwargs.get("axis")
    keep = bool(kwargs.get("keepdims", False))
    nd = a.ndim
    if name in _SHAPE_KEPT:  # sort, argsort: axis -1 by default; cumsum: the flattened array by default
        flat = axis is None and (given or name == "cumsum")
        shape = (a.size,) if flat else a.shape
    else:
        axes = range(nd) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        try:
            axes = {int(ax) % nd if nd else 0 for ax in axes}
        except TypeError:
            return None
        shape = (
            tuple(1 if i in axes else s for i, s in enumerate(a.shape))
            if keep
            else tuple(s for i, s in enumerate(a.shape) if i not in axes)
        )

    def meta():
        with np.errstate(all="ignore"):
            r = fn(np.zeros((1,) * nd, a.dtype))  # the dtype this reduction gives
        return np.empty(shape, np.asarray(r).dtype)

    return meta


def matmul_shape(a_shape: tuple, b_shape: tuple) -> tuple:
    """The shape of ``numpy.matmul`` of operands shaped ``a_shape`` and ``b_shape``."""
    a2, b2 = (
        (1,) + tuple(a_shape) if len(a_shape) == 1 else tuple(a_shape),
        tuple(b_shape) + (1,) if len(b_shape) == 1 else tuple(b_shape),
    )
    shape = np.broadcast_shapes(a2[:-2], b2[:-2]) + (a2[-2], b2[-1])
    if len(a_shape) == 1:
        shape = shape[:-2] + shape[-1:]
    if len(b_shape) == 1:
        shape = shape[:-1]
    return shape


__all__ = ["null_compute", "active", "computed", "issued", "ufunc_meta", "reduction_meta", "matmul_shape"]
