"""Our CUDA kernels in the stand-in: NVRTC, cupy.cuda.function.Module and Function, with the
kernels compiled by g++ and run on the CPU by the emulator (tests/emulation).

* ``cupy.cuda.nvrtc`` (simulated): compileProgram records the options (the tests check
  cnn_gpu's: no ``-ftz=true``), getCUBIN/getPTX return a token that names the source.
* ``cupy.cuda.function.Module().load(token)`` builds that source for the CPU (the token must be
  ``bytes``: ``Module.load(self, bytes cubin)``, the signature embedded in CuPy's compiled
  module); ``get_function(name)`` gives a Function whose call takes ``grid`` and ``block`` as
  tuples (``Function.__call__(self, tuple grid, tuple block, args, ...)`` in function.pyx: a list
  is a TypeError), converts the arguments as CuPy does and launches the emulated grid. An array
  passes its data pointer, whatever its strides; a Python scalar becomes the NumPy scalar of
  CuPy's ``numpy_dtype_from_pyscalar`` (cupy/_core/_scalar.pyx): a bool a 1-byte ``numpy.bool_``,
  an int an int64, or a uint64 from 2**63 up, a float a float64, a complex a complex128. The
  emulator then checks every argument against the kernel's C signature, so a width CuPy would get
  wrong is an error here.
* On a capturing stream (the ``stream`` argument, else the current one) the launch is recorded
  into the CUDA graph with the converted arguments (tests/standin/graph.py): the arguments are
  checked now, the kernel runs at each replay, on the same buffers.
"""

from __future__ import annotations

import functools
import hashlib
import types

import numpy as np

from . import graph
from .array import StandinGap, ndarray

_programs: dict[int, dict] = {}
_binaries: dict[bytes, tuple[str, str]] = {}  # token -> (name, source)
compile_log: list[tuple[str, tuple]] = []  # (name, options) of every NVRTC compile


class NVRTCError(RuntimeError):
    pass


def _nvrtc():
    state = {"next": 1}

    def createProgram(src, name, headers, include_names):
        handle = state["next"]
        state["next"] += 1
        _programs[handle] = {"src": src, "name": name}
        return handle

    def compileProgram(prog, options):
        _programs[prog]["options"] = tuple(options)
        compile_log.append((_programs[prog]["name"], tuple(options)))

    def _token(prog, kind):
        p = _programs[prog]
        token = f"STANDIN-{kind}:".encode() + hashlib.sha256(p["src"].encode()).hexdigest().encode()
        _binaries[token] = (p["name"].rsplit(".", 1)[0], p["src"])
        return token

    return types.SimpleNamespace(
        NVRTCError=NVRTCError,
        createProgram=createProgram,
        compileProgram=compileProgram,
        getProgramLog=lambda prog: "",
        getCUBIN=lambda prog: _token(prog, "CUBIN"),
        getPTX=lambda prog: _token(prog, "PTX"),
        destroyProgram=lambda prog: _programs.pop(prog, None),
        getVersion=lambda: (12, 9),
        getSupportedArchs=lambda: [50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90],
    )


@functools.cache
def _harness():
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    tests = str(Path(__file__).resolve().parents[1])
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from helpers import load_harness  # noqa: PLC0415

    return load_harness()


def _kernel_arg(x):
    if isinstance(x, ndarray):
        if not x._a.flags.c_contiguous:
            raise AssertionError(
                "a non-contiguous array was passed to a raw kernel: CuPy passes its data pointer, "
                "so the kernel would read the wrong elements"
            )
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}: a host NumPy array cannot be a kernel argument")
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x
    return _from_pyscalar(x)


def _from_pyscalar(x):
    """CuPy's numpy_dtype_from_pyscalar: the exact type decides (a bool is not an int here)."""
    typ = type(x)
    if typ is bool:
        return np.bool_(x)
    if typ is int:
        return np.uint64(x) if x >= 0x8000000000000000 else np.int64(x)
    if typ is float:
        return np.float64(x)
    if typ is complex:
        return np.complex128(x)
    raise TypeError(f"Unsupported type {type(x)}")


class Function:
    __module__ = "cupy.cuda.function"

    def __init__(self, lib, name):
        self.lib, self.name = lib, name
        if name not in lib.kernels:
            raise RuntimeError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")

    def __call__(self, grid, block, args, shared_mem=0, stream=None, enable_cooperative_groups=False):
        for name, value in (("grid", grid), ("block", block)):
            if not isinstance(value, tuple):  # Cython's `tuple grid, tuple block`
                raise TypeError(f"Argument '{name}' has incorrect type (expected tuple, got {type(value).__name__})")
        grid, block = grid + (1, 1), block + (1, 1)
        if grid[1:3] != (1, 1) or block[1:3] != (1, 1):
            raise StandinGap("2-D and 3-D launch configurations are not emulated")
        launcher = _harness().EmulationLauncher(check_order=False, grid_cap=132 * 32)
        lib, name, g, b, kargs = self.lib, self.name, int(grid[0]), int(block[0]), tuple(_kernel_arg(a) for a in args)
        graph.launch(
            "kernel",
            lambda: launcher.launch_with(lib, name, g, b, kargs),
            inplace=True,
            kernel=name,
            stream=stream,
            check=lambda: launcher._check_args(name, lib.signature(name), kargs),
        )


class Module:
    __module__ = "cupy.cuda.function"

    def __init__(self):
        self.lib = None

    def load(self, cubin):
        if not isinstance(cubin, bytes):  # Module.load(self, bytes cubin)
            raise TypeError(f"Argument 'cubin' has incorrect type (expected bytes, got {type(cubin).__name__})")
        if cubin not in _binaries:
            raise RuntimeError("CUDA_ERROR_INVALID_IMAGE: not a binary the stand-in's NVRTC produced")
        name, src = _binaries[cubin]
        self.lib = _harness().build_source(src, name)

    def get_function(self, name):
        return Function(self.lib, name)


def function_namespace():
    return types.SimpleNamespace(Module=Module, Function=Function)


nvrtc = _nvrtc()
