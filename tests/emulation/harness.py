"""Run cnn_gpu's CUDA kernels on the CPU: g++ + cuda_shim.h + launcher.h, called through ctypes.

Each ``kernels/<name>.cu`` is compiled once (per content hash) into a shared library
together with generated wrappers::

    extern "C" int launch_<kernel>(unsigned grid, unsigned block, int order, void** args);
    extern "C" const char* signature_<kernel>();   // e.g. "f*,f*,i,i"

:class:`EmulationLauncher` implements the launcher interface of :mod:`cnn_gpu.cuda`
(``empty``, ``ascontiguousarray``, ``is_contiguous``, ``max_grid``, ``launch``), so
``with cnn_gpu.cuda.use_launcher(EmulationLauncher()):`` runs the real launch wrappers
on NumPy arrays. On every launch it also

* checks each argument against the kernel's C signature (arrays: dtype of the pointee;
  scalars: exactly np.int32 / np.int64 / np.float32 / np.float64 as the C type says; a
  plain Python number is refused, since CuPy would pass it with the wrong width);
* surrounds every array with guard bands: NaN (floats) or 0x7fffffff (ints) that an
  out-of-bounds read turns into a visibly wrong result, and that must be intact after
  the launch (an out-of-bounds write fails the launch);
* hands out ``empty`` arrays filled with NaN / a marker, so an element a kernel forgets
  to write shows up;
* optionally runs the grid twice, in forward and in reverse block/thread order, and
  requires bitwise-identical results (catches races and order dependence).

Set ``CNN_GPU_EMUL_CACHE`` to choose the build cache directory, ``CXX`` the compiler and
``CNN_GPU_EMUL_CXXFLAGS`` extra flags (e.g. ``-fsanitize=undefined`` for a UBSan run).
AddressSanitizer run (every out-of-bounds read or write, exactly)::

    CNN_GPU_EMUL_GUARD=0 CNN_GPU_EMUL_CXXFLAGS=-fsanitize=address CNN_GPU_EMUL_CACHE=/tmp/emul-asan \
    LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 pytest -k emul
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from cnn_gpu import cuda

HERE = Path(__file__).resolve().parent
SHIM = HERE / "cuda_shim.h"
LAUNCHER = HERE / "launcher.h"
CXXFLAGS = (
    "-std=c++17",
    "-O1",
    "-shared",
    "-fPIC",
    "-pthread",
    "-ffp-contract=off",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-DCNN_FP16",
    "-U_FORTIFY_SOURCE",  # launcher.h's _longjmp between fiber stacks (a fortified one aborts on it)
)  # the float16 entry points too (cuda_shim.h's __half)
# guard elements on each side of every array argument; CNN_GPU_EMUL_GUARD=0 turns the bands
# off (then every argument is its own malloc block, for an AddressSanitizer run)
GUARD = int(os.environ.get("CNN_GPU_EMUL_GUARD", "64"))
INT_GUARD = 0x7FFFFFFF
INT_POISON = -0x2BADBAD  # what EmulationLauncher.empty puts in int arrays

_SCALARS = {"i": np.int32, "u": np.uint32, "q": np.int64, "f": np.float32, "d": np.float64}
_CTYPES = {"i": ctypes.c_int32, "u": ctypes.c_uint32, "q": ctypes.c_int64, "f": ctypes.c_float, "d": ctypes.c_double}
_POINTEES = {
    "i": np.dtype(np.int32),
    "u": np.dtype(np.uint32),
    "q": np.dtype(np.int64),
    "f": np.dtype(np.float32),
    "d": np.dtype(np.float64),
    "h": np.dtype(np.float16),
}


class EmulationError(RuntimeError):
    """A launch failed in the emulator (bad arguments, divergent barrier, out-of-bounds write, race)."""


def cache_dir() -> Path:
    d = os.environ.get("CNN_GPU_EMUL_CACHE")
    path = Path(d) if d else Path(tempfile.gettempdir()) / f"cnn_gpu_emul_{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cxxflags() -> tuple[str, ...]:
    return CXXFLAGS + tuple(os.environ.get("CNN_GPU_EMUL_CXXFLAGS", "").split())


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise EmulationError("no C++ compiler found (set CXX); the emulation tests need g++ >= 9")
    return cxx


def wrapper_source(name: str, kernels: list[str]) -> str:
    lines = [
        f'#include "{name}.cu"',
        '#include "launcher.h"',
        "",
    ]
    for k in kernels:
        lines += [
            f'extern "C" int launch_{k}(unsigned grid, unsigned block, int order, void** args) {{',
            f"    return cnn_emu::launch(&{k}, grid, block, order, args);",
            "}",
            f'extern "C" const char* signature_{k}() {{',
            f"    static const std::string s = cnn_emu::signature(&{k});",
            "    return s.c_str();",
            "}",
        ]
    return "\n".join(lines) + "\n"


class KernelLibrary:
    """One compiled kernels/<name>.cu: launch(kernel, grid, block, order, args) and signature(kernel)."""

    def __init__(self, name: str, path: Path, kernels: list[str]):
        self.name = name
        self.path = path
        self.kernels = list(kernels)
        self._lib = ctypes.CDLL(str(path))
        self._lib.emu_last_error.restype = ctypes.c_char_p
        self._sigs: dict[str, list[str]] = {}
        for k in kernels:
            fn = getattr(self._lib, f"launch_{k}")
            fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
            fn.restype = ctypes.c_int
            sig = getattr(self._lib, f"signature_{k}")
            sig.restype = ctypes.c_char_p
            text = sig().decode()
            self._sigs[k] = text.split(",") if text else []

    def signature(self, kernel: str) -> list[str]:
        return self._sigs[kernel]

    def launch_raw(self, kernel: str, grid: int, block: int, order: int, argv) -> None:
        rc = getattr(self._lib, f"launch_{kernel}")(grid, block, order, argv)
        if rc != 0:
            raise EmulationError(f"{kernel}: {self._lib.emu_last_error().decode()}")


_libs: dict[str, KernelLibrary | EmulationError] = {}
_build_lock = threading.Lock()


def build(name: str, directory: str | os.PathLike | None = None) -> KernelLibrary:
    """Compile (or fetch from the cache) ``<directory>/<name>.cu`` for the CPU.

    ``directory`` defaults to cnn_gpu's kernel directory; ``common.cuh`` is always
    found there (tests/emulation/selftest.cu uses that).
    """
    kdir = cuda.kernel_dir()
    src_dir = Path(directory).resolve() if directory is not None else kdir
    key = str(src_dir / name)
    with _build_lock:
        lib = _libs.get(key)
        if isinstance(lib, EmulationError):  # failed before in this process: fail fast
            raise EmulationError(str(lib))
        if lib is not None:
            return lib
        src_path = src_dir / f"{name}.cu"
        source = src_path.read_text(encoding="utf-8")
        kernels = cuda.entry_points(source)
        wrapper = wrapper_source(name, kernels)
        cxx = compiler()
        h = hashlib.sha256()
        for part in (
            key,
            source,
            (kdir / "common.cuh").read_text(),
            SHIM.read_text(),
            LAUNCHER.read_text(),
            wrapper,
            cxx,
            " ".join(cxxflags()),
        ):
            h.update(part.encode())
            h.update(b"\0")
        digest = h.hexdigest()[:20]
        out = cache_dir() / f"{name}-{digest}.so"
        if not out.exists():
            fd, tmp_src = tempfile.mkstemp(suffix=".cpp", prefix=f"{name}-", dir=cache_dir())
            with os.fdopen(fd, "w") as f:
                f.write(wrapper)
            tmp_out = f"{out}.{os.getpid()}.tmp"
            cmd = [cxx, *cxxflags(), "-include", str(SHIM), f"-I{src_dir}", f"-I{kdir}", f"-I{HERE}", tmp_src, "-o", tmp_out]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    err = EmulationError(
                        f"g++ failed to compile {src_path} for the CPU emulation:\n$ {' '.join(cmd)}\n{proc.stderr}"
                    )
                    _libs[key] = err
                    raise err
                os.replace(tmp_out, out)
            finally:
                os.unlink(tmp_src)
                if os.path.exists(tmp_out):
                    os.unlink(tmp_out)
        lib = KernelLibrary(name, out, kernels)
        _libs[key] = lib
        return lib


def build_source(source: str, name: str) -> KernelLibrary:
    """Compile a kernel source text (e.g. what cnn_gpu hands NVRTC, headers inlined) for the CPU."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    folder = cache_dir() / f"src-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.cu"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    return build(name, folder)


def _guard_value(dtype: np.dtype):
    return np.nan if dtype.kind == "f" else INT_GUARD


def _guarded_copy(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(buffer with guard bands, the view of its middle holding a copy of a)."""
    buf = np.full(a.size + 2 * GUARD, _guard_value(a.dtype), dtype=a.dtype)
    inner = buf[GUARD : GUARD + a.size]
    inner[...] = a.reshape(-1)
    return buf, inner


def _guards_intact(buf: np.ndarray, size: int) -> bool:
    ref = np.full(GUARD, _guard_value(buf.dtype), dtype=buf.dtype)
    lo, hi = buf[:GUARD], buf[GUARD + size :]
    return lo.tobytes() == ref.tobytes() and hi.tobytes() == ref.tobytes()


class EmulationLauncher:
    """The cnn_gpu.cuda launcher interface, backed by the g++-compiled kernels and NumPy arrays.

    check_order: run each launch in forward and reverse order and require identical bits.
    grid_cap:    the default grid's cap (what the SM count gives on a GPU); small values make
                 the default launches exercise the grid-stride loops too.
    """

    def __init__(self, check_order: bool = True, grid_cap: int = 64):
        self.check_order = check_order
        self.grid_cap = grid_cap
        self.log: list[tuple[str, int, int]] = []  # (kernel, grid, block) of every launch

    # -- array creation ------------------------------------------------------------
    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        return np.full(shape, np.nan if dtype.kind == "f" else INT_POISON, dtype=dtype)

    def ascontiguousarray(self, a):
        return np.ascontiguousarray(a)

    def is_contiguous(self, a) -> bool:
        return bool(a.flags.c_contiguous)

    def max_grid(self) -> int:
        return self.grid_cap

    def gemm(self, a, b, out, *, transa=False, transb=False, beta=0.0) -> None:
        """The launcher's GEMM, out = op(a) @ op(b) + beta * out, with NumPy (beta = 0: out is not read)."""
        for name, m in (("a", a), ("b", b), ("out", out)):
            if m.ndim != 2 or not m.flags.c_contiguous:
                raise EmulationError(f"gemm: {name} must be a 2-D C-contiguous array, got shape {m.shape}, strides {m.strides}")
        if a.dtype == np.float16:  # cublasGemmEx with CUBLAS_COMPUTE_32F: float32 sums, out rounded to its dtype
            a, b = a.astype(np.float32), b.astype(np.float32)
            with np.errstate(invalid="ignore", over="ignore"):  # inf inputs (an overflowed float16 step): NaN, as cuBLAS
                r = (a.T if transa else a) @ (b.T if transb else b)
            with np.errstate(over="ignore"):
                out[...] = r if beta == 0 else r + np.float32(beta) * out.astype(np.float32)
            return
        r = (a.T if transa else a) @ (b.T if transb else b)
        if beta == 0:
            out[...] = r
        else:
            out *= out.dtype.type(beta)
            out += r

    # -- launching -------------------------------------------------------------------
    def launch(self, name: str, kernel: str, grid: int, block: int, args: tuple) -> None:
        self.launch_with(build(name), kernel, grid, block, args)

    def launch_with(self, lib: KernelLibrary, kernel: str, grid: int, block: int, args: tuple) -> None:
        """Launch ``kernel`` of a built library on NumPy arrays (in place, like a CUDA launch)."""
        sig = lib.signature(kernel)
        self._check_args(kernel, sig, args)
        self.log.append((kernel, int(grid), int(block)))

        # distinct arrays (the same array may be passed twice, e.g. as an unused alias)
        arrays: list[np.ndarray] = []
        slot: list[int | None] = []
        for a in args:
            if isinstance(a, np.ndarray):
                for j, b in enumerate(arrays):
                    if b is a:
                        slot.append(j)
                        break
                    if np.may_share_memory(a, b):
                        raise EmulationError(f"{kernel}: overlapping array arguments are not supported")
                else:
                    arrays.append(a)
                    slot.append(len(arrays) - 1)
            else:
                slot.append(None)

        orders = (0, 1) if self.check_order else (0,)
        results = []
        for order in orders:
            guarded = [_guarded_copy(a) for a in arrays]
            holders = []
            for a, s, code in zip(args, slot, sig):
                if s is not None:
                    holders.append(ctypes.c_void_p(guarded[s][1].ctypes.data))
                else:
                    holders.append(_CTYPES[code](a))
            argv = (ctypes.c_void_p * max(1, len(holders)))(*[ctypes.addressof(h) for h in holders])
            lib.launch_raw(kernel, int(grid), int(block), order, argv)
            for (buf, inner), a in zip(guarded, arrays):
                if not _guards_intact(buf, inner.size):
                    raise EmulationError(f"{kernel}: out-of-bounds write next to an array argument of shape {a.shape}")
            results.append([inner for _, inner in guarded])
        if len(results) == 2:
            for j, (r0, r1) in enumerate(zip(*results)):
                if r0.tobytes() != r1.tobytes():
                    bad = np.flatnonzero(r0.view(np.uint8) != r1.view(np.uint8)).size
                    raise EmulationError(
                        f"{kernel}: array argument {j} differs between forward and reverse execution order "
                        f"({bad} bytes; a race or an order-dependent result) with grid={grid}, block={block}"
                    )
        for a, r in zip(arrays, results[0]):
            a.reshape(-1)[...] = r  # a is contiguous: reshape is a view

    def _check_args(self, kernel: str, sig: list[str], args: tuple) -> None:
        if len(sig) != len(args):
            raise EmulationError(f"{kernel}: takes {len(sig)} arguments ({','.join(sig)}), got {len(args)}")
        for i, (code, a) in enumerate(zip(sig, args)):
            if code.endswith("*"):
                want = _POINTEES[code[0]]
                if not isinstance(a, np.ndarray):
                    raise EmulationError(f"{kernel}: argument {i} must be an array of {want}, got {type(a).__name__}")
                if a.dtype != want:
                    raise EmulationError(f"{kernel}: argument {i} must be an array of {want}, got {a.dtype}")
                if not a.flags.c_contiguous:
                    raise EmulationError(f"{kernel}: array argument {i} is not C-contiguous")
            else:
                want = _SCALARS[code]
                if type(a) is not want:
                    raise EmulationError(
                        f"{kernel}: argument {i} is a C {code!r} scalar and must be passed as {want.__name__}, "
                        f"got {type(a).__name__} {a!r}"
                    )
