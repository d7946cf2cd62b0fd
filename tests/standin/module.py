"""The stand-in ``cupy`` namespace: creation, transfers, math, cuBLAS-class products, random
numbers and the ``cupy.cuda`` pieces cnn_gpu uses, each checked against the installed CuPy.

Functions that NumPy also has and that need nothing special are simulated generically (the
NumPy function on the device buffers, one launch of the right kind); the rest are written out.
Work is issued through tests/standin/graph.py (recorded, not run, on a capturing stream); new
buffers go through tests/standin/memory.py.
"""

from __future__ import annotations

import time
import types
from typing import Any

import numpy as np

from . import devices, graph, memory, surface
from . import null as null_mode
from .array import StandinGap, ndarray, unwrap, wrap
from .counters import current
from .graph import Stream, get_current_stream  # noqa: F401  (cupy.cuda's, defined with capture)

_REDUCTIONS = {
    "sum",
    "prod",
    "max",
    "min",
    "amax",
    "amin",
    "argmax",
    "argmin",
    "mean",
    "var",
    "std",
    "all",
    "any",
    "count_nonzero",
    "nansum",
    "nanmax",
    "nanmin",
    "argsort",
    "sort",
    "cumsum",
}
_CREATION = {"empty": np.empty, "zeros": np.zeros, "ones": np.ones, "full": np.full}
# CuPy reads how many values there are (a device-to-host copy) to size these results
_VALUE_SIZED = {"nonzero", "flatnonzero", "argwhere", "unique"}


def _checked(path: str, name: str, impl):
    """impl, refusing calls whose arguments the real ``path.name`` would refuse."""
    if not surface.has(path, name):
        raise AssertionError(f"the stand-in defines {path}.{name}, which the installed CuPy lacks")

    def call(*args, **kwargs):
        surface.check_call(path, name, args, kwargs)
        return impl(*args, **kwargs)

    call.__name__ = name
    return call


# ------------------------------------------------------------------ creation and transfers
def _create(name):
    def create(shape, *args, **kwargs):
        def make():
            return _CREATION[name](shape, *args, **kwargs)

        a = graph.fresh(make()) if name == "empty" else graph.launch("fill", make)
        return ndarray._of(memory.allocated(a))

    return create


def _like(name):
    base = name[: -len("_like")]

    def like(a, *args, **kwargs):
        kwargs.pop("subok", None)
        src = unwrap(a)

        def make():
            return getattr(np, name)(src, *args, **kwargs)

        out = graph.fresh(make()) if base == "empty" else graph.launch("fill", make)
        return ndarray._of(memory.allocated(out))

    return like


def asarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    host = np.array(a, dtype=dtype, order="C" if order in (None, "K", "A") else order)
    if host.dtype == object:
        raise ValueError("Unsupported dtype object")
    graph.refuse_transfer("H2D")
    current().upload(host.nbytes)
    return ndarray._of(memory.allocated(host))


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        out = obj.astype(dtype or obj.dtype) if copy else asarray(obj, dtype)
        return out
    return asarray(obj, dtype)


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if isinstance(a, ndarray):
        return a.get(order=order)
    return np.asarray(a, order=order)


def ascontiguousarray(a, dtype=None):
    a = asarray(a) if not isinstance(a, ndarray) else a
    if a._a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    src = a._a
    out = graph.launch(
        "copy",
        lambda: np.ascontiguousarray(src, dtype=dtype),
        meta=lambda: np.empty(src.shape, src.dtype if dtype is None else dtype),
    )
    current().copy(out.nbytes, layout=dtype is None or np.dtype(dtype) == a.dtype, site="ascontiguousarray")
    return wrap(out)


def arange(start, stop=None, step=1, dtype=None):
    def make():
        return np.arange(start, stop, step, dtype=dtype) if stop is not None else np.arange(start, dtype=dtype)

    return wrap(graph.launch("elementwise", make))


def get_array_module(*args):
    from . import active_module  # noqa: PLC0415

    return active_module() if any(isinstance(a, ndarray) for a in args) else np


# ------------------------------------------------------------------ cuBLAS-class products
def _blas_operand(a, site):
    """A 2-D operand as cuBLAS takes it: C- or F-contiguous as is, else copied (CuPy does)."""
    if a.ndim == 2 and (a.flags.c_contiguous or a.flags.f_contiguous):
        return a
    current().launch("copy")
    current().copy(a.nbytes, layout=True, site=site)
    return np.ascontiguousarray(a)


def matmul(a, b, out=None, **kwargs):
    """cupy.matmul as CuPy runs it (cupy/_core/_routines_linalg.pyx): 2-D operands go to one
    GEMM (a C- or F-contiguous operand as is, others copied; a non-contiguous ``out`` gets a
    temporary and a copy); more dimensions: operands made C-contiguous (copies), one strided
    batched GEMM, or, when broadcasting, three pointer-array kernels and a batched GEMM."""
    if kwargs:
        raise StandinGap(f"matmul keywords {sorted(kwargs)}")
    A, B = unwrap(a, "matmul a"), unwrap(b, "matmul b")
    graph.refuse_cublas(np.result_type(A, B))  # its cuBLAS handle takes the current stream
    if A.ndim <= 2 and B.ndim <= 2:
        A2, B2 = _blas_operand(A, "matmul a") if A.ndim == 2 else A, _blas_operand(B, "matmul b") if B.ndim == 2 else B
        current().launch("cublas")
        result = _null_matmul(A2, B2) if null_mode.active() else np.matmul(A2, B2)
    else:
        ops = []
        for name, M in (("a", A), ("b", B)):
            if not M.flags.c_contiguous:
                current().launch("copy")
                current().copy(M.nbytes, layout=True, site=f"matmul {name} (batched)")
                M = np.ascontiguousarray(M)
            ops.append(M)
        if ops[0].shape[:-2] != ops[1].shape[:-2]:
            for _ in range(3):
                current().launch("elementwise")  # the _mat_ptrs kernels of a broadcast batch
        current().launch("cublas")
        result = _null_matmul(*ops) if null_mode.active() else np.matmul(*ops)
    if out is None:
        return wrap(result)
    O = unwrap(out, "out")
    if not O.flags.c_contiguous or O.dtype != result.dtype:
        current().launch("copy")
        current().copy(result.nbytes, layout=False, site="matmul out")
    if not null_mode.active():
        O[...] = result
    return out


def _null_matmul(A, B):
    """Under null compute (tests/standin/null.py): an unwritten result of the product's shape and dtype."""
    return np.empty(null_mode.matmul_shape(A.shape, B.shape), np.result_type(A, B))


def _gemm_op(M, trans: str, what: str):
    if trans not in ("N", "T", "H"):
        raise TypeError(f"invalid transpose value {trans!r} ({what})")  # cupy.cublas._trans_to_cublas_op
    return M if trans == "N" else M.T if trans == "T" else M.conj().T


def cublas_gemm(transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
    """cupy.cublas.gemm as CuPy runs it (cupy/cublas.py): out = alpha op(a) @ op(b) + beta out in one
    GEMM (beta = 0: out is not read); an operand neither C- nor F-contiguous is copied first, an
    ``out`` neither C- nor F-contiguous gets an F-ordered temporary and a copy back; without ``out``
    a new F-ordered array (beta ignored). Its checks are CuPy's asserts."""
    A, B = unwrap(a, "cublas.gemm a"), unwrap(b, "cublas.gemm b")
    graph.refuse_cublas(A.dtype)  # cupy_backends.cuda.libs.cublas.setStream, before any check of CuPy's
    assert A.ndim == B.ndim == 2
    assert A.dtype == B.dtype
    if A.dtype.char not in "fdFD":
        raise TypeError("invalid dtype")
    opA, opB = _gemm_op(A, transa, "transa"), _gemm_op(B, transb, "transb")
    assert opB.shape[0] == opA.shape[1]
    for M, what in ((A, "cublas.gemm a"), (B, "cublas.gemm b")):
        _blas_operand(M, what)
    current().launch("cublas")
    null = null_mode.active()  # tests/standin/null.py: the GEMM costs nothing, its result is unwritten
    if null:
        r = np.empty((opA.shape[0], opB.shape[1]), A.dtype, order="F")
    else:
        r = opA @ opB
        if alpha != 1:
            r = r * A.dtype.type(alpha)
    if out is None:
        return wrap(r if null else np.asfortranarray(r))
    O = unwrap(out, "cublas.gemm out")
    assert O.ndim == 2
    assert O.shape == r.shape
    assert O.dtype == A.dtype
    if not (O.flags.c_contiguous or O.flags.f_contiguous):
        for _ in range(2):
            current().launch("copy")
            current().copy(O.nbytes, layout=True, site="cublas.gemm out")
    if not null:
        O[...] = r if beta == 0 else r + A.dtype.type(beta) * O
    return out


def dot(a, b, out=None):
    return matmul(a, b, out=out)


def concatenate(tup, axis=0, out=None, *, dtype=None, casting="same_kind"):
    parts = [unwrap(t, "concatenate") for t in tup]
    result = graph.launch("copy", lambda: np.concatenate(parts, axis=axis, dtype=dtype))
    current().copy(result.nbytes, layout=False, site="concatenate")
    return wrap(result)


# ------------------------------------------------------------------ generic functions
def _generic(name):
    kind = "reduction" if name in _REDUCTIONS else "elementwise"
    fn = getattr(np, name)

    def call(*args, **kwargs):
        outs = kwargs.get("out")
        if name in _VALUE_SIZED:
            graph.refuse_transfer("D2H")
        np_args = unwrap(list(args), f"cupy.{name}")
        np_kwargs = {k: unwrap(v, f"cupy.{name}({k}=)") for k, v in kwargs.items()}
        if outs is not None:
            graph.launch(kind, lambda: fn(*np_args, **np_kwargs), inplace=True)
            return outs
        if isinstance(fn, np.ufunc):
            meta = null_mode.ufunc_meta(fn, np_args, np_kwargs)
        elif kind == "reduction" and np_args:
            meta = null_mode.reduction_meta(
                name, lambda z: fn(z, *np_args[1:], **np_kwargs), np_args[0], tuple(np_args[1:]), np_kwargs
            )
        else:
            meta = None
        return wrap(graph.launch(kind, lambda: fn(*np_args, **np_kwargs), inputs=graph._arrays(np_args, np_kwargs), meta=meta))

    return call


def elementwise_from(site: str, fn):
    """A CuPy elementwise function computed by the NumPy-compatible ``fn`` (one launch)."""

    def call(x, *args, **kwargs):
        if args or kwargs:
            raise StandinGap(f"{site}: the stand-in simulates one array argument, got more")
        src = unwrap(x, site)
        meta = null_mode.ufunc_meta(fn, (src,), {}) if isinstance(fn, np.ufunc) else None
        return wrap(graph.launch("elementwise", lambda: fn(src), meta=meta))

    return call


# ------------------------------------------------------------------ random
class Generator:
    """cupy.random.Generator (the methods the installed CuPy has), simulated with NumPy: the
    numbers differ from cuRAND's; the calls and their shapes and dtypes do not."""

    __module__ = "cupy.random._generator_api"

    def __init__(self, seed):
        self._g = np.random.default_rng(seed)

    def __getattr__(self, name):
        if name.startswith("_") or not surface.has("cupy.random.Generator", name):
            raise AttributeError(f"'Generator' object has no attribute {name!r} (cupy.random.Generator lacks it)")
        if not hasattr(self._g, name):
            raise StandinGap(f"cupy.random.Generator.{name}")

        def draw(*args, **kwargs):
            """A draw; captured, each replay draws anew (the generator's state lives on the device)."""
            surface.check_call("cupy.random.Generator", name, args, kwargs, method=True)
            return wrap(graph.launch("curand", lambda: np.asarray(getattr(self._g, name)(*args, **kwargs))))

        return draw


def default_rng(seed=None):
    return Generator(seed)


# ------------------------------------------------------------------ cuda
class Device:
    """A simulated GPU (compute capability 9.0, 132 multiprocessors): ``Device(i)`` is the i-th GPU
    this process sees (tests/standin/devices.py: the visible GPUs, the current one, the trace)."""

    __module__ = "cupy.cuda.device"

    def __init__(self, device=None):
        m = devices.machine()
        self.id = m.current if device is None else int(getattr(device, "id", device))
        if device is not None:
            m.physical(self.id)  # an invalid ordinal fails here, as cudaDeviceGetAttribute would

    compute_capability = "90"
    attributes = {"MultiProcessorCount": 132, "MaxThreadsPerBlock": 1024}

    @property
    def pci_bus_id(self):
        return devices.pci_bus_id(devices.machine().physical(self.id))

    @property
    def mem_info(self):
        """(free, total) bytes of this GPU, as cudaMemGetInfo (devices.device_memory sets them)."""
        return _mem_get_info()

    def synchronize(self):
        _device_synchronize()

    def use(self):
        m = devices.machine()
        m.physical(self.id)
        m.current = self.id
        m.touch("select")

    def __enter__(self):
        self._before = devices.machine().current
        self.use()
        return self

    def __exit__(self, *exc):
        devices.machine().current = self._before
        return None


def _device_synchronize():
    """cudaDeviceSynchronize (Device.synchronize, runtime.deviceSynchronize): a host sync;
    refused while a stream of the device captures (tests/standin/graph.py)."""
    graph.refuse_device_sync()
    current().sync("synchronize")


class Event:
    """A CUDA event on the simulated device: recorded work is complete at once (``done``). Recorded
    on a capturing stream it is a node of the graph: each replay records it (its time); querying
    or waiting on it while the capture lasts is refused, as CUDA does (tests/standin/graph.py)."""

    __module__ = "cupy.cuda.stream"

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.recorded_on, self._t, self._timing, self._capture = None, None, not disable_timing, None

    def record(self, stream=None):
        stream = get_current_stream() if stream is None else stream
        cap = graph.target(stream)
        self.recorded_on, self._capture = stream.ptr, cap
        if cap is None:
            self._t = time.perf_counter()  # the simulated device runs each launch at once: host time
        else:
            cap.record("event", None, self._replayed, launches=0)

    def _replayed(self):
        self._t = time.perf_counter()

    @property
    def done(self):  # a query (cudaEventQuery), not a wait: no sync counted
        graph.refuse_event_query(self._capture)
        return True

    def synchronize(self):
        graph.refuse_event_query(self._capture)
        current().sync("Event.synchronize")


pinned_sizes: list = []  # every cupy.cuda.alloc_pinned_memory size asked, in order (tests read it)


def alloc_pinned_memory(size):
    """cupy.cuda.alloc_pinned_memory: a block of page-locked host memory from CuPy's pinned pool;
    the stand-in's host memory is all alike, so a buffer of that size (NumPy arrays can view it,
    as they view a PinnedMemoryPointer), its size recorded in ``pinned_sizes``."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise TypeError(f"an integer size is required, got {size!r}")
    pinned_sizes.append(int(size))
    return memoryview(bytearray(int(size)))


def get_elapsed_time(start_event, end_event):
    """cupy.cuda.get_elapsed_time: milliseconds between two recorded timing events (the stand-in's
    device is the host, so it is host time); unrecorded or timing-disabled events fail as in CUDA."""
    for e in (start_event, end_event):
        graph.refuse_event_query(e._capture)
        if e._t is None:
            raise devices.CUDARuntimeError("cudaErrorInvalidResourceHandle: invalid resource handle")
        if not e._timing:
            raise devices.CUDARuntimeError(
                "cudaErrorInvalidResourceHandle: invalid resource handle (an event made with disable_timing=True)"
            )
    return (end_event._t - start_event._t) * 1e3


def _device_count():
    """cudaGetDeviceCount: how many GPUs the process sees; with none, CUDA's error (not 0)."""
    count = len(devices.machine().visible)
    if count == 0:
        raise devices.CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    return count


device_free: list = [None]  # what memGetInfo reports free (None: all of it); tests set it


def _mem_get_info():
    """cudaMemGetInfo -> (free, total) bytes of the current device: the stand-in keeps no device of
    its own, so all of it is free unless a test sets ``device_free[0]``."""
    m, total = devices.machine(), devices.total_memory()
    if m.memory is not None:  # devices.device_memory: what the live buffers leave
        return max(0, total - m.in_use), total
    return (total if device_free[0] is None else int(device_free[0])), total


def _runtime():
    props = {"name": b"cnn_gpu CuPy stand-in (emulated sm_90)", "major": 9, "minor": 0, "multiProcessorCount": 132}
    ns = types.SimpleNamespace(
        getDeviceCount=_device_count,
        getDeviceProperties=lambda i: dict(props, totalGlobalMem=devices.total_memory()),
        runtimeGetVersion=lambda: 12090,
        driverGetVersion=lambda: 12090,
        deviceSynchronize=_device_synchronize,
        memGetInfo=_mem_get_info,
        streamIsCapturing=graph.stream_is_capturing,
        streamCaptureModeGlobal=graph.CAPTURE_MODE_GLOBAL,
        streamCaptureModeThreadLocal=graph.CAPTURE_MODE_THREAD_LOCAL,
        streamCaptureModeRelaxed=graph.CAPTURE_MODE_RELAXED,
        streamLegacy=graph.STREAM_LEGACY,
        streamPerThread=graph.STREAM_PER_THREAD,
        CUDARuntimeError=devices.CUDARuntimeError,
    )
    for n in vars(ns):
        assert surface.has("cupy.cuda.runtime", n), n
    return ns


def namespace_functions() -> dict[str, Any]:
    """The stand-in's cupy-level callables, by name (each checked against the real surface)."""
    funcs: dict[str, Any] = {n: _create(n) for n in _CREATION}
    funcs.update({n: _like(n) for n in ("empty_like", "zeros_like", "ones_like", "full_like")})
    funcs.update(
        asarray=asarray,
        array=array,
        asnumpy=asnumpy,
        ascontiguousarray=ascontiguousarray,
        arange=arange,
        matmul=matmul,
        dot=dot,
        concatenate=concatenate,
        get_array_module=get_array_module,
    )
    return {n: _checked("cupy", n, f) for n, f in funcs.items()}


def generic_function(name: str):
    """A CuPy function simulated by its NumPy namesake, or None."""
    if surface.has("cupy", name) and hasattr(np, name) and callable(getattr(np, name)):
        real = getattr(surface.real_cupy(), name)
        if isinstance(real, type):
            return None
        return _checked("cupy", name, _generic(name))
    return None


__all__ = [
    "namespace_functions",
    "generic_function",
    "Generator",
    "default_rng",
    "Device",
    "matmul",
    "cublas_gemm",
    "asarray",
    "StandinGap",
]
