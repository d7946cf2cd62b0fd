"""A CuPy stand-in for the tests: CuPy's API, computed with NumPy on the CPU, so the code that
drives CuPy runs in CI without a GPU. Test support, not part of cnn_gpu.

* Its surface comes from the installed ``cupy`` package (which imports without a GPU):
  a name, method or keyword the real CuPy lacks raises (tests/standin/surface.py).
* Its arrays are their own type (``cupy.ndarray``), so cnn_gpu takes its CuPy branches;
  implicit conversion to NumPy raises as in CuPy (tests/standin/array.py).
* Our kernels go through NVRTC and ``cupy.cuda.function.Module`` into the g++ emulation
  (tests/emulation), with CuPy's argument conversion (tests/standin/kernels.py).
* It counts what a GPU step costs: launches by kind, host syncs, transfers, allocations and
  layout-only copies (tests/standin/counters.py).
* It can see any number of GPUs (tests/standin/devices.py: ``with devices.visible(0, 1, 2, 3):``,
  as CUDA_VISIBLE_DEVICES) and traces what touches which GPU: selected, launched on, allocated on.
* ``cupy.cuda.nccl`` as CuPy 14 has it (tests/standin/nccl.py): bytes unique ids, typed arguments.
* Streams, stream capture and CUDA graphs (tests/standin/graph.py): on a capturing stream work is
  recorded, not run, and ``Graph.launch`` replays it; what CuPy and CUDA refuse during capture
  refuses. ``MemoryPool`` and ``using_allocator`` (tests/standin/memory.py).
* ``with null_compute():`` (tests/standin/null.py): launches cost nothing. Work is issued, checked
  and counted as always but no arithmetic runs (our kernels, the fake cuBLAS GEMMs, CuPy's
  elementwise, reduction, copy and fill operations, graph replays); new results are unwritten
  arrays of the right shape and dtype. For timing our Python alone (benchmarks/gpu_budget.py
  --host-time); values are garbage inside the block.

    from standin import activated, counting
    with activated() as cupy:          # `import cupy` gives the stand-in; cnn_gpu sees a GPU
        with counting() as c:
            ...
        print(c.summary())
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator

import numpy as np

from . import devices, graph, kernels, memory, module, nccl, null, surface
from .array import StandinGap, ndarray
from .counters import Counters, counting, current
from .null import null_compute

_MODULE: types.ModuleType | None = None


class _Cupy(types.ModuleType):
    """The stand-in ``cupy`` module: what it defines, else CuPy's names simulated generically."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if not surface.has("cupy", name):
            raise AttributeError(f"module 'cupy' has no attribute {name!r} (the installed CuPy lacks it)")
        real = getattr(surface.real_cupy(), name)
        if isinstance(real, type) and issubclass(real, np.generic) or name in ("dtype", "newaxis", "inf", "nan", "pi"):
            return getattr(np, name)
        fn = module.generic_function(name)
        if fn is None:
            raise StandinGap(f"cupy.{name} exists in CuPy but the stand-in does not simulate it: add it to tests/standin")
        setattr(self, name, fn)
        return fn


def _submodule(name: str, path: str, members: dict) -> types.ModuleType:
    mod = _Strict(name, path)
    for k, v in members.items():
        if not surface.has(path, k):
            raise AssertionError(f"the stand-in defines {path}.{k}, which the installed CuPy lacks")
        setattr(mod, k, v)
    return mod


class _Strict(types.ModuleType):
    def __init__(self, name, path):
        super().__init__(name)
        self._path = path

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if not surface.has(self._path, name):
            raise AttributeError(f"module '{self._path}' has no attribute {name!r} (the installed CuPy lacks it)")
        raise StandinGap(f"{self._path}.{name} exists in CuPy but the stand-in does not simulate it")


class _CompileException(Exception):
    pass


def make() -> types.ModuleType:
    """The stand-in ``cupy`` module (built once)."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    cp = _Cupy("cupy")
    cp.__version__ = surface.real_cupy().__version__
    cp.ndarray = ndarray
    cp.ufunc = type(surface.real_cupy().exp)
    for name, fn in module.namespace_functions().items():
        setattr(cp, name, fn)
    cp.random = _submodule("cupy.random", "cupy.random", {"default_rng": module.default_rng, "Generator": module.Generator})
    cuda = _submodule(
        "cupy.cuda",
        "cupy.cuda",
        {
            "Device": module.Device,
            "nvrtc": kernels.nvrtc,
            "Stream": graph.Stream,
            "Event": module.Event,
            "get_elapsed_time": module.get_elapsed_time,
            "alloc_pinned_memory": module.alloc_pinned_memory,
            "get_current_stream": graph.get_current_stream,
            "MemoryPool": memory.MemoryPool,
            "MemoryPointer": memory.MemoryPointer,
            "using_allocator": memory.using_allocator,
            "set_allocator": memory.set_allocator,
            "get_allocator": memory.get_allocator,
        },
    )
    cuda.graph = _submodule("cupy.cuda.graph", "cupy.cuda.graph", {"Graph": graph.Graph})
    cuda.memory = _submodule(
        "cupy.cuda.memory",
        "cupy.cuda.memory",
        {"OutOfMemoryError": memory.OutOfMemoryError, "MemoryPool": memory.MemoryPool, "MemoryPointer": memory.MemoryPointer},
    )
    cuda.runtime = module._runtime()
    cuda.function = _submodule("cupy.cuda.function", "cupy.cuda.function", vars(kernels.function_namespace()))
    cuda.compiler = _submodule("cupy.cuda.compiler", "cupy.cuda.compiler", {"CompileException": _CompileException})
    cuda.nccl = types.ModuleType("cupy.cuda.nccl")  # its surface: CuPy's compiled NCCL module (standin/nccl.py)
    vars(cuda.nccl).update(nccl.members())
    cp.cuda = cuda
    cp.cublas = _submodule("cupy.cublas", "cupy.cublas", {"gemm": module._checked("cupy.cublas", "gemm", module.cublas_gemm)})
    cp.get_default_memory_pool = memory.get_default_memory_pool
    cp._standin_cupyx = _cupyx()
    _MODULE = cp
    return cp


def _cupyx() -> dict[str, types.ModuleType]:
    """The stand-in's cupyx: only cupyx.scipy.special.erf (GELU), an elementwise launch."""
    from scipy import special  # noqa: PLC0415  (scipy comes with scikit-learn)

    special_mod = _submodule(
        "cupyx.scipy.special", "cupyx.scipy.special", {"erf": module.elementwise_from("cupyx.scipy.special.erf", special.erf)}
    )
    scipy_mod = _submodule("cupyx.scipy", "cupyx.scipy", {"special": special_mod})
    root = _submodule("cupyx", "cupyx", {"scipy": scipy_mod})
    return {"cupyx": root, "cupyx.scipy": scipy_mod, "cupyx.scipy.special": special_mod}


def active_module() -> types.ModuleType:
    return make()


@contextlib.contextmanager
def activated() -> Iterator[types.ModuleType]:
    """Within the block ``import cupy`` gives the stand-in and cnn_gpu sees one (simulated) GPU."""
    from cnn_gpu import backend  # noqa: PLC0415
    from cnn_gpu.cuda import build  # noqa: PLC0415

    cp = make()
    # cupy is the stand-in; real cupyx (CuPy's extras, which import CuPy's internals) is replaced
    # by the stand-in's few members: any other cupyx module gets an ImportError
    hidden = {k: v for k, v in sys.modules.items() if k == "cupyx" or k.startswith("cupyx.")}
    for k in hidden:
        del sys.modules[k]
    replaced = {
        "cupy": cp,
        "cupy.cublas": cp.cublas,
        "cupy.cuda": cp.cuda,
        "cupy.cuda.nccl": cp.cuda.nccl,
        "cupy.cuda.graph": cp.cuda.graph,
    }
    saved = {k: sys.modules.get(k) for k in replaced}
    sys.modules.update(replaced)
    sys.modules.update(cp._standin_cupyx)
    backend._cupy_status.cache_clear()
    build.clear_caches()
    graph.reset()
    memory.reset()
    from . import cublas as fake_cublas  # noqa: PLC0415  (cnn_gpu's cuBLAS binding loads the fake libcublas)

    uninstall_cublas = fake_cublas.install()
    try:
        yield cp
    finally:
        graph.reset()
        memory.reset()
        uninstall_cublas()
        for k in cp._standin_cupyx:
            sys.modules.pop(k, None)
        sys.modules.update(hidden)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        backend._cupy_status.cache_clear()
        build.clear_caches()


__all__ = [
    "activated",
    "make",
    "counting",
    "current",
    "Counters",
    "StandinGap",
    "ndarray",
    "kernels",
    "surface",
    "devices",
    "nccl",
    "graph",
    "memory",
    "null",
    "null_compute",
]
