"""cnn_gpu's own cuBLAS handle: a small ctypes binding to the libcublas that CuPy loads.

Why
    cnn_gpu captures its training step as a CUDA graph. CuPy 14 refuses every cuBLAS call made
    during stream capture: each of its cuBLAS wrappers calls
    ``cupy_backends.cuda.libs.cublas.setStream``, which raises NotImplementedError('calling
    cuBLAS API during stream capture is currently unsupported'). cuBLAS itself allows it
    ("cuBLAS routines can be captured in CUDA Graph stream capture without restrictions in most
    situations", cuBLAS docs, CUDA Graphs Support), so the weight-gradient GEMMs
    (CupyLauncher.gemm) go through this module instead.

The library
    The libcublas CuPy uses, found as CuPy 14 finds it: ``cuda.pathfinder.load_nvidia_dynamic_lib
    ("cublas")`` (what ``cupy_backends.cuda.libs`` calls before importing its cuBLAS module; it is
    cached, and returns the copy already loaded in the process when there is one), opened by its
    path; else the soname of CuPy's CUDA major (``libcublas.so.12`` for cupy-cuda12x, whose cuBLAS
    module links that soname) already loaded in the process, else loaded by that soname.

The handle
    One per device, made lazily by :func:`get_handle`, which returns ``(handle, "")`` or
    ``(None, reason)`` (no libcublas, a symbol missing, cublasCreate failing) so that the caller
    can fall back, saying why in one line (:func:`warn_fallback`). Pointer mode host (alpha and
    beta are captured into a graph by value). Before each GEMM the handle is put on the current
    CuPy stream when that changed, and the stream's own workspace is bound again (cublasSetStream
    resets the workspace to cuBLAS's default pool).

Workspace
    A user workspace, owned by the handle, one per stream: cuBLAS's docs (CUDA Graphs Support)
    warn that captured cuBLAS routines may otherwise allocate (memory nodes through
    cudaMallocAsync), which fails in child graphs, and tell to "use cublasSetWorkspace() to
    provide user-owned workspace memory". Size (:func:`workspace_bytes`): the docs' recommended
    size for cublasSetWorkspace, which is "based on the cuBLAS default workspace pool size":
    32 MiB on Hopper (sm90) and Blackwell (sm10x, sm12x), 4 MiB on other GPUs (at least 16 KiB
    avoids CUBLAS_STATUS_ALLOC_FAILED; less can cost speed). The pointer must be 256-byte
    aligned. One workspace per stream, because cuBLAS kernels of one call rely on it staying
    intact, so two streams must not share one; each is kept until the handle is destroyed (a
    graph captured on a stream keeps using that stream's workspace address). The first GEMM on a
    stream allocates its workspace: run a step on the capturing stream before capturing (a warm-up).

Precision
    float32 GEMMs are cublasSgemm_v2, float64 cublasDgemm_v2, float16 ones (float16 training,
    cnn_gpu/precision.py) cublasGemmEx with float16 A and B, a float16 or float32 C and
    CUBLAS_COMPUTE_32F (float32 sums). :meth:`CublasHandle.set_math_mode` sets cublasMath_t:
    CUBLAS_TF32_TENSOR_OP_MATH for a tf32 run (precision.gemm_math sets it around fit and restores
    the previous mode); a new handle has cuBLAS's default, CUBLAS_DEFAULT_MATH.

The seam for tests
    :func:`_load_library` is the one function tests replace: the CuPy stand-in
    (tests/standin/cublas.py) sets it to return its fake libcublas while active. When it changes,
    the handles made with the previous library are destroyed and the library is looked up again.

This module imports nothing of cnn_gpu and imports CuPy only when a handle is asked for.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
import warnings
from typing import Any

__all__ = [
    "CublasError",
    "CublasHandle",
    "get_handle",
    "warn_fallback",
    "reset",
    "workspace_bytes",
    "STATUS_NAMES",
    "CUBLAS_OP_N",
    "CUBLAS_OP_T",
    "CUBLAS_POINTER_MODE_HOST",
    "CUBLAS_DEFAULT_MATH",
    "CUBLAS_TF32_TENSOR_OP_MATH",
]

# cublas_api.h
STATUS_NAMES = {
    0: "CUBLAS_STATUS_SUCCESS",
    1: "CUBLAS_STATUS_NOT_INITIALIZED",
    3: "CUBLAS_STATUS_ALLOC_FAILED",
    7: "CUBLAS_STATUS_INVALID_VALUE",
    8: "CUBLAS_STATUS_ARCH_MISMATCH",
    11: "CUBLAS_STATUS_MAPPING_ERROR",
    13: "CUBLAS_STATUS_EXECUTION_FAILED",
    14: "CUBLAS_STATUS_INTERNAL_ERROR",
    15: "CUBLAS_STATUS_NOT_SUPPORTED",
    16: "CUBLAS_STATUS_LICENSE_ERROR",
}
CUBLAS_OP_N = 0  # cublasOperation_t: as stored
CUBLAS_OP_T = 1  # cublasOperation_t: transposed
CUBLAS_POINTER_MODE_HOST = 0  # cublasPointerMode_t
CUBLAS_DEFAULT_MATH = 0  # cublasMath_t: float32 GEMMs exact (a new handle's mode)
CUBLAS_TF32_TENSOR_OP_MATH = 3  # cublasMath_t: float32 GEMMs on TF32 tensor cores (precision="tf32")
CUDA_R_32F, CUDA_R_16F = 0, 2  # cudaDataType (library_types.h)
CUBLAS_COMPUTE_32F = 68  # cublasComputeType_t: float32 accumulation
CUBLAS_GEMM_DEFAULT = -1  # cublasGemmAlgo_t
WORKSPACE_ALIGNMENT = 256  # cublasSetWorkspace: "aligned to at least 256 bytes"
_INT_MAX = 2**31 - 1  # the _v2 entry points take int sizes

_P = ctypes.c_void_p
_INT = ctypes.c_int
# the C signatures of cublas_api.h (handles, streams and device pointers as void*, enums as int)
SIGNATURES: dict[str, list] = {
    "cublasCreate_v2": [ctypes.POINTER(_P)],
    "cublasDestroy_v2": [_P],
    "cublasSetStream_v2": [_P, _P],
    "cublasSetWorkspace_v2": [_P, _P, ctypes.c_size_t],
    "cublasSetPointerMode_v2": [_P, _INT],
    "cublasSetMathMode": [_P, _INT],
    "cublasSgemm_v2": [
        _P,
        _INT,
        _INT,
        _INT,
        _INT,
        _INT,
        ctypes.POINTER(ctypes.c_float),
        _P,
        _INT,
        _P,
        _INT,
        ctypes.POINTER(ctypes.c_float),
        _P,
        _INT,
    ],
    "cublasDgemm_v2": [
        _P,
        _INT,
        _INT,
        _INT,
        _INT,
        _INT,
        ctypes.POINTER(ctypes.c_double),
        _P,
        _INT,
        _P,
        _INT,
        ctypes.POINTER(ctypes.c_double),
        _P,
        _INT,
    ],
    # handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, computeType, algo
    "cublasGemmEx": [_P, _INT, _INT, _INT, _INT, _INT, _P, _P, _INT, _INT, _P, _INT, _INT, _P, _P, _INT, _INT, _INT, _INT],
}


class CublasError(RuntimeError):
    """A cuBLAS call returned a status other than CUBLAS_STATUS_SUCCESS."""

    def __init__(self, call: str, status: int, detail: str = ""):
        self.call, self.status = call, int(status)
        self.status_name = STATUS_NAMES.get(self.status, "unknown cublasStatus_t")
        super().__init__(f"{call} failed: {self.status_name} ({self.status}){': ' + detail if detail else ''}")


def _check(call: str, status: int, detail: str = "") -> None:
    if status != 0:
        raise CublasError(call, status, detail)


def workspace_bytes(compute_capability: str | int) -> int:
    """The cuBLAS docs' recommended user workspace (cublasSetWorkspace): 32 MiB for Hopper (sm90)
    and Blackwell (sm10x, sm12x) -- and newer --, 4 MiB for the other GPUs."""
    return (32 if int(compute_capability) >= 90 else 4) * 2**20


# ------------------------------------------------------------------------------ the library
def _soname_major(path: str) -> int | None:
    m = re.search(r"(?:\.so\.|cublas64_)(\d+)", os.path.basename(path))
    return int(m.group(1)) if m else None


def _load_library() -> tuple[Any, str]:
    """THE SEAM: ``(lib, where)``, the libcublas CuPy uses, opened with ctypes, and where it came
    from; raises OSError (or ImportError) saying why there is none. ``lib`` exposes the C
    functions of :data:`SIGNATURES` as attributes whose ``argtypes``/``restype`` are set by
    :func:`_bind`. Tests replace this function (the CuPy stand-in installs its fake libcublas)."""
    import cupy  # noqa: PLC0415  (the CuPy whose libcublas we bind)

    try:
        major = int(cupy.cuda.runtime.runtimeGetVersion()) // 1000  # 12 for cupy-cuda12x
    except Exception:  # noqa: BLE001  (no runtime: take what pathfinder finds)
        major = None
    tried = []
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib  # noqa: PLC0415  (CuPy 14's dependency)
    except ImportError as exc:
        tried.append(f"cuda-pathfinder: {exc}")
    else:
        try:
            dl = load_nvidia_dynamic_lib("cublas")  # cached; CuPy made the same call before loading cuBLAS
        except Exception as exc:  # noqa: BLE001  (DynamicLibNotFoundError and platform errors)
            tried.append(f"cuda-pathfinder: {exc}")
        else:
            if dl.abs_path and (major is None or _soname_major(dl.abs_path) in (None, major)):
                return ctypes.CDLL(dl.abs_path), f"{dl.abs_path} (cuda-pathfinder, {dl.found_via})"
            tried.append(f"cuda-pathfinder gave {dl.abs_path!r}, not CUDA {major}'s libcublas")
    majors = [major] if major else [13, 12]
    names = [f"cublas64_{v}.dll" if os.name == "nt" else f"libcublas.so.{v}" for v in majors]
    modes = [(ctypes.DEFAULT_MODE, "loaded by soname")]
    if hasattr(os, "RTLD_NOLOAD"):  # first: the copy CuPy's cuBLAS module already loaded
        modes.insert(0, (os.RTLD_NOLOAD | os.RTLD_NOW, "already loaded"))
    for name in names:
        for mode, how in modes:
            try:
                return ctypes.CDLL(name, mode=mode), f"{name} ({how})"
            except OSError as exc:
                tried.append(f"{name}: not loaded in this process" if mode & getattr(os, "RTLD_NOLOAD", 0) else str(exc))
    raise OSError("no libcublas: " + "; ".join(tried))


def _bind(lib) -> None:
    """Declare the C signatures; AttributeError when the library lacks a symbol."""
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int


class _State:
    def __init__(self):
        self.lock = threading.RLock()
        self.loader = None  # the _load_library the cached library came from
        self.lib: Any = None
        self.where = ""
        self.error = ""  # why there is no library
        self.handles: dict[int, Any] = {}  # device id -> CublasHandle, or the reason it could not be made
        self.warned = False


_state = _State()


def reset() -> None:
    """Destroy the handles and forget the library (looked up again on next use)."""
    with _state.lock:
        for h in _state.handles.values():
            if isinstance(h, CublasHandle):
                h.destroy()
        _state.handles.clear()
        _state.loader, _state.lib, _state.where, _state.error, _state.warned = None, None, "", "", False


def _library():
    """(lib, "") or (None, reason), for the current :func:`_load_library`."""
    if _state.loader is not _load_library:
        reset()
        _state.loader = _load_library
        try:
            lib, _state.where = _load_library()
            _bind(lib)
            _state.lib = lib
        except (OSError, ImportError, AttributeError) as exc:
            _state.error = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
    return _state.lib, _state.error


def get_handle() -> tuple[CublasHandle | None, str]:
    """``(handle, "")``: cnn_gpu's cuBLAS handle for the current CuPy device (made on first use),
    or ``(None, reason)`` when it cannot be made: no libcublas, a symbol missing, cublasCreate
    failing. A failure is remembered (per device) and not retried."""
    import cupy  # noqa: PLC0415

    device = cupy.cuda.Device().id
    h = _state.handles.get(device) if _state.loader is _load_library else None
    if isinstance(h, CublasHandle):
        return h, ""
    with _state.lock:
        lib, why = _library()
        if lib is None:
            return None, why
        h = _state.handles.get(device)
        if h is None:
            try:
                h = CublasHandle(lib, device)
            except CublasError as exc:
                h = str(exc)
            _state.handles[device] = h
    return (h, "") if isinstance(h, CublasHandle) else (None, h)


def warn_fallback(reason: str) -> None:
    """Warn, once, that CuPy's cuBLAS wrappers are used instead of cnn_gpu's handle, and why."""
    if not _state.warned:
        _state.warned = True
        warnings.warn(
            f"cnn_gpu: using cupy.cublas for GEMMs (not capturable in a CUDA graph): cnn_gpu's own "
            f"cuBLAS handle is unavailable ({reason})",
            RuntimeWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------------------ the handle
def _is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def _extent(x) -> tuple[int, int]:
    p = int(x.data.ptr)
    return p, p + int(x.nbytes)


def _check_operands(a, b, out, transa: bool, transb: bool, beta) -> tuple[int, int, int]:
    """(m, n, k) of out (m, n) = op(a) (m, k) @ op(b) (k, n); ValueError/TypeError naming the argument."""
    import numpy as np  # noqa: PLC0415

    for name, x in (("a", a), ("b", b), ("out", out)):
        if not _is_cupy(x):
            raise TypeError(f"gemm: {name} must be a CuPy array, got {type(x).__module__}.{type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"gemm: {name} must be 2-D, got shape {x.shape}")
        if not x.flags.c_contiguous:
            raise ValueError(f"gemm: {name} must be C-contiguous, got strides {x.strides} for shape {x.shape}")
    if a.dtype not in (np.float32, np.float64, np.float16):
        raise TypeError(f"gemm: a must be float32 or float64 (or float16), got {a.dtype}")
    if b.dtype != a.dtype:
        raise TypeError(f"gemm: b must have a's dtype {a.dtype}, got {b.dtype}")
    if out.dtype != a.dtype and not (a.dtype == np.float16 and out.dtype == np.float32):
        also = " or float32" if a.dtype == np.float16 else ""
        raise TypeError(f"gemm: out must have a's dtype {a.dtype}{also}, got {out.dtype}")
    if not isinstance(beta, (int, float, np.integer, np.floating)) or isinstance(beta, bool):
        raise TypeError(f"gemm: beta must be a real number on the host, got {type(beta).__name__}")
    m, k = a.shape[::-1] if transa else a.shape
    kb, n = b.shape[::-1] if transb else b.shape
    if kb != k:
        raise ValueError(f"gemm: b: op(a) is {m}x{k} but op(b) is {kb}x{n} (inner sizes differ)")
    if out.shape != (m, n):
        raise ValueError(f"gemm: out must have shape {(m, n)} (op(a) @ op(b)), got {out.shape}")
    if not getattr(out.flags, "writeable", True):
        raise ValueError("gemm: out must be writable")
    if out.size:
        lo, hi = _extent(out)
        for name, x in (("a", a), ("b", b)):
            if x.size and max(lo, _extent(x)[0]) < min(hi, _extent(x)[1]):
                raise ValueError(f"gemm: out overlaps {name} (cuBLAS reads {name} while writing out)")
    for what, v in (("m", m), ("n", n), ("k", k)):
        if v > _INT_MAX:
            raise ValueError(f"gemm: {what} = {v} exceeds cuBLAS's 32-bit int (the _v2 entry points)")
    return m, n, k


def _gemm_args(a, b, out, transa: bool, transb: bool, m: int, n: int, k: int) -> tuple:
    """The cuBLAS (column-major) arguments of out = op(a) @ op(b) on row-major arrays.

    A C-contiguous (r, c) array is the column-major c x r matrix of its transpose, with leading
    dimension c. So out^T (n x m) = op(b)^T (n x k) @ op(a)^T (k x m): cuBLAS's first operand is
    b, transposed when ``transb``, its second a, transposed when ``transa``; ld = the row length
    (at least 1, as cuBLAS requires even for empty matrices).
    Returns (transa, transb, m, n, k, A, lda, B, ldb, C, ldc) in cuBLAS's order."""
    return (
        CUBLAS_OP_T if transb else CUBLAS_OP_N,
        CUBLAS_OP_T if transa else CUBLAS_OP_N,
        n,
        m,
        k,
        int(b.data.ptr),
        max(1, b.shape[1]),
        int(a.data.ptr),
        max(1, a.shape[1]),
        int(out.data.ptr),
        max(1, n),
    )


class CublasHandle:
    """A cuBLAS handle on one device, with pointer mode host and a user workspace per stream."""

    def __init__(self, lib, device_id: int):
        import cupy  # noqa: PLC0415

        self._lib, self.device_id = lib, int(device_id)
        self.workspace_bytes = workspace_bytes(cupy.cuda.Device(device_id).compute_capability)
        self._workspaces: dict[int, tuple[Any, int]] = {}  # stream ptr -> (owning buffer, aligned ptr)
        self._stream: int | None = None  # the stream set on the handle
        self.math_mode = CUBLAS_DEFAULT_MATH  # cuBLAS's default for a new handle (set_math_mode changes it)
        self._lock = threading.RLock()  # a GEMM's (set stream, workspace, call) is not interleaved
        handle = ctypes.c_void_p()
        _check("cublasCreate_v2", lib.cublasCreate_v2(ctypes.byref(handle)))
        self.ptr: int | None = handle.value
        try:
            _check("cublasSetPointerMode_v2", lib.cublasSetPointerMode_v2(self.ptr, CUBLAS_POINTER_MODE_HOST))
        except CublasError:
            self.destroy()
            raise

    def __repr__(self):
        return f"<CublasHandle device {self.device_id} {'destroyed' if self.ptr is None else hex(self.ptr or 0)}>"

    def _live(self) -> int:
        if self.ptr is None:
            raise CublasError("cnn_gpu CublasHandle", 1, "the handle was destroyed")
        return self.ptr

    def destroy(self) -> None:
        """cublasDestroy_v2, then release the workspaces (idempotent)."""
        with self._lock:
            if self.ptr is None:
                return
            ptr, self.ptr, self._stream = self.ptr, None, None
            try:
                _check("cublasDestroy_v2", self._lib.cublasDestroy_v2(ptr))
            finally:
                self._workspaces.clear()

    def set_stream(self, stream_ptr: int | None = None) -> None:
        """cublasSetStream_v2 with ``stream_ptr`` (default: the current CuPy stream), then that
        stream's workspace (cublasSetStream resets the workspace to the default pool)."""
        if stream_ptr is None:
            import cupy  # noqa: PLC0415

            stream_ptr = int(cupy.cuda.get_current_stream().ptr)
        with self._lock:
            _check("cublasSetStream_v2", self._lib.cublasSetStream_v2(self._live(), stream_ptr))
            self._stream = None
            self.set_workspace(stream_ptr)
            self._stream = stream_ptr

    def set_math_mode(self, mode: int) -> int:
        """cublasSetMathMode: :data:`CUBLAS_TF32_TENSOR_OP_MATH` lets the float32 GEMMs round their
        inputs to TF32 on the tensor cores, :data:`CUBLAS_DEFAULT_MATH` keeps them exact. Returns the
        previous mode (to restore it; cnn_gpu/precision.py does so around a run)."""
        if mode not in (CUBLAS_DEFAULT_MATH, CUBLAS_TF32_TENSOR_OP_MATH):
            raise ValueError(f"mode: expected CUBLAS_DEFAULT_MATH (0) or CUBLAS_TF32_TENSOR_OP_MATH (3), got {mode!r}")
        with self._lock:
            previous = self.math_mode
            if mode != previous:
                _check("cublasSetMathMode", self._lib.cublasSetMathMode(self._live(), int(mode)))
                self.math_mode = int(mode)
        return previous

    def set_workspace(self, stream_ptr: int) -> None:
        """cublasSetWorkspace_v2 with the handle's workspace for stream ``stream_ptr`` (allocated,
        :attr:`workspace_bytes` 256-byte aligned, on the first call for that stream)."""
        with self._lock:
            ws = self._workspaces.get(stream_ptr)
            if ws is None:
                import cupy  # noqa: PLC0415
                import numpy as np  # noqa: PLC0415

                buf = cupy.empty((self.workspace_bytes + WORKSPACE_ALIGNMENT,), dtype=np.uint8)
                ptr = -(-int(buf.data.ptr) // WORKSPACE_ALIGNMENT) * WORKSPACE_ALIGNMENT
                ws = self._workspaces[stream_ptr] = (buf, ptr)
            _check("cublasSetWorkspace_v2", self._lib.cublasSetWorkspace_v2(self._live(), ws[1], self.workspace_bytes))

    def gemm(self, a, b, out, *, transa: bool = False, transb: bool = False, beta: float = 0.0) -> None:
        """out = op(a) @ op(b) + beta * out on 2-D C-contiguous CuPy arrays of float32
        (cublasSgemm_v2), float64 (cublasDgemm_v2), or float16 a and b with a float16 or float32
        out (cublasGemmEx, float32 sums: CUBLAS_COMPUTE_32F), on the current stream; beta = 0: out
        is not read. ValueError/TypeError naming the argument when the operands do not fit,
        :class:`CublasError` when cuBLAS refuses."""
        import cupy  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415

        m, n, k = _check_operands(a, b, out, transa, transb, beta)
        if out.size == 0:
            return
        if k == 0:  # BLAS's out = beta * out, with CuPy kernels (capturable too): cuBLAS's docs allow k = 0
            # but do not say what it writes then
            if beta == 0:
                out.fill(0)
            elif beta != 1:
                out *= out.dtype.type(beta)
            return
        ta, tb, m_, n_, k_, pa, lda, pb, ldb, pc, ldc = _gemm_args(a, b, out, transa, transb, m, n, k)
        half = a.dtype == np.float16
        scalar: type[ctypes.c_float] | type[ctypes.c_double]
        if half or a.dtype == np.float32:
            name, scalar = ("cublasGemmEx" if half else "cublasSgemm_v2"), ctypes.c_float
        else:
            name, scalar = "cublasDgemm_v2", ctypes.c_double
        alpha, beta_ = scalar(1.0), scalar(float(beta))
        stream = int(cupy.cuda.get_current_stream().ptr)
        with self._lock:
            if stream != self._stream:
                self.set_stream(stream)
            if half:  # float16 A, B; float32 sums (CUBLAS_COMPUTE_32F: alpha, beta as float); C float16 or float32
                ctype = CUDA_R_16F if out.dtype == np.float16 else CUDA_R_32F
                status = self._lib.cublasGemmEx(
                    self._live(),
                    ta,
                    tb,
                    m_,
                    n_,
                    k_,
                    ctypes.byref(alpha),
                    pa,
                    CUDA_R_16F,
                    lda,
                    pb,
                    CUDA_R_16F,
                    ldb,
                    ctypes.byref(beta_),
                    pc,
                    ctype,
                    ldc,
                    CUBLAS_COMPUTE_32F,
                    CUBLAS_GEMM_DEFAULT,
                )
            else:
                status = getattr(self._lib, name)(
                    self._live(), ta, tb, m_, n_, k_, ctypes.byref(alpha), pa, lda, pb, ldb, ctypes.byref(beta_), pc, ldc
                )
        if status != 0:
            raise CublasError(
                name, status, f"out {out.shape} = op(a {a.shape}) @ op(b {b.shape}), transa={transa}, transb={transb}"
            )
