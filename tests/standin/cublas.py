"""A fake libcublas for the stand-in: the cuBLAS C API that cnn_gpu/cuda/cublas.py calls through
ctypes, on the stand-in's host-backed arrays (their device pointers are NumPy buffers' addresses,
read and written with ctypes.from_address, as tests/standin/nccl.py does).

Strictness, as the real library reached through ctypes would have it:

* Each function takes the arguments of its C signature in cublas_api.h (handles, streams and
  device pointers ``void*``, enums and sizes ``int``, alpha/beta ``const float*`` or ``const
  double*``): cnn_gpu must declare exactly those ``argtypes`` and ``restype`` c_int, and every
  argument goes through ctypes' own conversion (``argtype.from_param``), so a float for an int,
  ``double*`` for ``float*``, too few arguments fail as ctypes fails them (ctypes.ArgumentError,
  TypeError). An int that ctypes would silently truncate to 32 bits fails too.
* Status codes as cuBLAS returns them: CUBLAS_STATUS_NOT_INITIALIZED for a handle that is not
  one (never made, destroyed), CUBLAS_STATUS_INVALID_VALUE for m, n or k < 0, a transpose other
  than N/T/C, lda < max(1, rows of A as stored), ldb likewise, ldc < max(1, m), a null
  alpha/beta/C, a null A or B that would be read, a workspace not 256-byte aligned (the cuBLAS
  docs of cublas<t>gemm and cublasSetWorkspace).
* State as cuBLAS keeps it: cublasSetStream resets the workspace to the default pool, so
  :data:`log` records, per GEMM, whether the user workspace was bound and its size.
* The math mode (cublasSetMathMode) is per handle, CUBLAS_DEFAULT_MATH when made; each GEMM
  records the mode it ran under in :attr:`FakeLibcublas.gemm_math_modes`, and a float32 GEMM under
  CUBLAS_TF32_TENSOR_OP_MATH rounds A and B to TF32 (10 mantissa bits, to nearest even) before
  multiplying in float32, as the tensor cores do (so results differ from the exact mode's).
* A GEMM is one "cublas" launch in the counters, like cupy.cublas.gemm; the handle must be used
  on the device it was made on (a handle is per device in CUDA). On a capturing stream (the
  handle's, cublasSetStream) it is recorded into the CUDA graph, as cuBLAS allows, and runs at each
  replay with alpha and beta as read at the call (pointer mode host): tests/standin/graph.py.

``install()`` makes cnn_gpu find this library (its documented seam, ``cnn_gpu.cuda.cublas.
_load_library``) and returns the function that undoes it; ``activated()`` calls both.
"""

from __future__ import annotations

import ctypes
import itertools

import numpy as np

from . import devices, graph

SUCCESS, NOT_INITIALIZED, INVALID_VALUE, NOT_SUPPORTED = 0, 1, 7, 15  # cublas_api.h
OP_N, OP_T, OP_C = 0, 1, 2
POINTER_MODE_HOST, POINTER_MODE_DEVICE = 0, 1
DEFAULT_MATH, TENSOR_OP_MATH, PEDANTIC_MATH, TF32_TENSOR_OP_MATH = 0, 1, 2, 3  # cublasMath_t
DISALLOW_REDUCED_PRECISION_REDUCTION = 16  # a flag or-ed into a mode
R_32F, R_16F = 0, 2  # cudaDataType
COMPUTE_32F, COMPUTE_32F_PEDANTIC = 68, 69  # cublasComputeType_t (the float32 ones: alpha/beta are float)
GEMM_DEFAULT = -1  # cublasGemmAlgo_t
_DTYPES = {R_32F: np.float32, R_16F: np.float16}
_P, _INT, _SIZE = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
_FP, _DP = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_double)
#: cublas_api.h, as ctypes types: (C declaration, argtypes)
HEADER = {
    "cublasCreate_v2": ("cublasStatus_t cublasCreate_v2(cublasHandle_t *handle)", [ctypes.POINTER(_P)]),
    "cublasDestroy_v2": ("cublasStatus_t cublasDestroy_v2(cublasHandle_t handle)", [_P]),
    "cublasSetStream_v2": ("cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t streamId)", [_P, _P]),
    "cublasSetWorkspace_v2": (
        "cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void *workspace, size_t workspaceSizeInBytes)",
        [_P, _P, _SIZE],
    ),
    "cublasSetPointerMode_v2": (
        "cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t mode)",
        [_P, _INT],
    ),
    "cublasSetMathMode": ("cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode)", [_P, _INT]),
    "cublasSgemm_v2": (
        "cublasStatus_t cublasSgemm_v2(cublasHandle_t handle, cublasOperation_t transa, "
        "cublasOperation_t transb, int m, int n, int k, const float *alpha, const float *A, int lda, "
        "const float *B, int ldb, const float *beta, float *C, int ldc)",
        [_P, _INT, _INT, _INT, _INT, _INT, _FP, _P, _INT, _P, _INT, _FP, _P, _INT],
    ),
    "cublasGemmEx": (
        "cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t "
        "transb, int m, int n, int k, const void *alpha, const void *A, cudaDataType Atype, int lda, "
        "const void *B, cudaDataType Btype, int ldb, const void *beta, void *C, cudaDataType Ctype, "
        "int ldc, cublasComputeType_t computeType, cublasGemmAlgo_t algo)",
        [_P, _INT, _INT, _INT, _INT, _INT, _P, _P, _INT, _INT, _P, _INT, _INT, _P, _P, _INT, _INT, _INT, _INT],
    ),
    "cublasDgemm_v2": (
        "cublasStatus_t cublasDgemm_v2(cublasHandle_t handle, cublasOperation_t transa, "
        "cublasOperation_t transb, int m, int n, int k, const double *alpha, const double *A, "
        "int lda, const double *B, int ldb, const double *beta, double *C, int ldc)",
        [_P, _INT, _INT, _INT, _INT, _INT, _DP, _P, _INT, _P, _INT, _DP, _P, _INT],
    ),
}
_INT_RANGE = {ctypes.c_int: (-(2**31), 2**31 - 1), ctypes.c_size_t: (0, 2**64 - 1)}


def _value(arg):
    """The C value of one argument: an int (None for NULL) or, for ``T*`` host pointers, the address."""
    if isinstance(arg, ctypes._SimpleCData):
        return arg.value
    if type(arg).__name__ == "CArgObject":  # ctypes.byref(obj)
        return ctypes.addressof(arg._obj)
    if isinstance(arg, ctypes._Pointer):
        return ctypes.cast(arg, ctypes.c_void_p).value
    return arg


class _Function:
    """One C function of the fake library: ``argtypes``/``restype`` as a ctypes foreign function has."""

    def __init__(self, name, impl):
        self.__name__, self._impl = name, impl
        self.argtypes, self.restype = None, ctypes.c_int

    def __call__(self, *args):
        decl, header = HEADER[self.__name__]
        if self.argtypes is None or list(self.argtypes) != header or self.restype is not ctypes.c_int:
            raise AssertionError(
                f"{self.__name__}: cnn_gpu declared argtypes {self.argtypes}, restype "
                f"{self.restype}; cublas_api.h declares {decl}"
            )
        if len(args) != len(header):
            raise TypeError(f"this function takes {len(header)} arguments ({len(args)} given)")
        values = []
        for i, (t, a) in enumerate(zip(header, args), 1):
            try:
                t.from_param(a)  # what ctypes does with each argument of a function with argtypes
            except TypeError as exc:
                raise ctypes.ArgumentError(f"argument {i}: TypeError: {exc}") from None
            v = _value(a)
            lo, hi = _INT_RANGE.get(t, (None, None))
            if lo is not None and not lo <= v <= hi:
                raise AssertionError(
                    f"{self.__name__} argument {i}: {v} does not fit {t.__name__} (ctypes would silently truncate it)"
                )
            values.append(v)
        return self._impl(*values)


class FakeLibcublas:
    """The fake library: its functions are attributes, as a ctypes.CDLL's; ``missing`` names
    symbols it lacks (AttributeError, as a CDLL raises for an undefined symbol)."""

    def __init__(self, missing=()):
        self.handles: dict[int, dict] = {}  # live handle -> its state
        # (function, its C arguments..., then for a GEMM the handle's stream and (workspace, bytes) or
        # None for cuBLAS's default pool) of every call that passed the checks
        self.log: list[tuple] = []
        self.gemm_math_modes: list[int] = []  # the handle's math mode at each GEMM of gemms()
        self._ids = itertools.count(0x7F0000001000, 0x1000)
        for name in HEADER:
            if name not in missing:
                setattr(self, name, _Function(name, getattr(self, "_" + name)))

    def __getattr__(self, name):
        if name.startswith("cublas"):
            raise AttributeError(f"fake libcublas: undefined symbol: {name}")
        raise AttributeError(name)

    def gemms(self) -> list[tuple]:
        return [e for e in self.log if e[0] in ("cublasSgemm_v2", "cublasDgemm_v2", "cublasGemmEx")]

    # ------------------------------------------------------------------ the C functions
    def _cublasCreate_v2(self, handle_p):
        if not handle_p:
            return INVALID_VALUE
        h = next(self._ids)
        self.handles[h] = {
            "device": devices.machine().current,
            "stream": 0,
            "workspace": None,
            "pointer_mode": POINTER_MODE_HOST,
            "math_mode": DEFAULT_MATH,
        }
        ctypes.c_void_p.from_address(handle_p).value = h
        self.log.append(("cublasCreate_v2", h))
        return SUCCESS

    def _cublasDestroy_v2(self, h):
        if self.handles.pop(h, None) is None:
            return NOT_INITIALIZED
        self.log.append(("cublasDestroy_v2", h))
        return SUCCESS

    def _cublasSetStream_v2(self, h, stream):
        if h not in self.handles:
            return NOT_INITIALIZED
        state = self.handles[h]
        state["stream"], state["workspace"] = stream or 0, None  # "unconditionally resets the ... workspace"
        self.log.append(("cublasSetStream_v2", h, stream or 0))
        return SUCCESS

    def _cublasSetWorkspace_v2(self, h, ptr, nbytes):
        if h not in self.handles:
            return NOT_INITIALIZED
        if (ptr or 0) % 256:
            return INVALID_VALUE  # "aligned to at least 256 bytes"
        self.handles[h]["workspace"] = (ptr or 0, nbytes)
        self.log.append(("cublasSetWorkspace_v2", h, ptr or 0, nbytes))
        return SUCCESS

    def _cublasSetPointerMode_v2(self, h, mode):
        if h not in self.handles:
            return NOT_INITIALIZED
        if mode not in (POINTER_MODE_HOST, POINTER_MODE_DEVICE):
            return INVALID_VALUE
        self.handles[h]["pointer_mode"] = mode
        self.log.append(("cublasSetPointerMode_v2", h, mode))
        return SUCCESS

    def _cublasSetMathMode(self, h, mode):
        if h not in self.handles:
            return NOT_INITIALIZED
        if mode & ~DISALLOW_REDUCED_PRECISION_REDUCTION not in (DEFAULT_MATH, TENSOR_OP_MATH, PEDANTIC_MATH, TF32_TENSOR_OP_MATH):
            return INVALID_VALUE
        self.handles[h]["math_mode"] = mode
        self.log.append(("cublasSetMathMode", h, mode))
        return SUCCESS

    def _cublasSgemm_v2(self, *args):
        return self._gemm("cublasSgemm_v2", np.float32, ctypes.c_float, *args)

    def _cublasDgemm_v2(self, *args):
        return self._gemm("cublasDgemm_v2", np.float64, ctypes.c_double, *args)

    def _cublasGemmEx(self, h, ta, tb, m, n, k, alpha_p, A, atype, lda, B, btype, ldb, beta_p, C, ctype, ldc, compute, algo):
        """cublasGemmEx for the types cnn_gpu uses: float16 A and B, float16 or float32 C, float32 compute
        (alpha and beta float): the products and sums in float32 from the float16 inputs, C rounded to
        its type (to nearest even; beyond float16's range, inf) -- INVALID_VALUE / NOT_SUPPORTED otherwise."""
        if h not in self.handles:
            return NOT_INITIALIZED
        if atype != R_16F or btype != R_16F or ctype not in _DTYPES or compute not in (COMPUTE_32F, COMPUTE_32F_PEDANTIC):
            return NOT_SUPPORTED
        if algo != GEMM_DEFAULT:
            return INVALID_VALUE
        return self._gemm(
            "cublasGemmEx",
            np.float16,
            ctypes.c_float,
            h,
            ta,
            tb,
            m,
            n,
            k,
            alpha_p,
            A,
            lda,
            B,
            ldb,
            beta_p,
            C,
            ldc,
            out_dtype=_DTYPES[ctype],
        )

    def _gemm(self, name, dtype, scalar, h, ta, tb, m, n, k, alpha_p, A, lda, B, ldb, beta_p, C, ldc, out_dtype=None):
        """C (m x n, column-major, ldc) = alpha op(A) op(B) + beta C, as cublas<t>gemm (A, B of ``dtype``,
        C of ``out_dtype``, default ``dtype``; float16 inputs are multiplied in float32)."""
        out_dtype = dtype if out_dtype is None else out_dtype
        acc = np.float32 if dtype == np.float16 else dtype
        state = self.handles.get(h)
        if state is None:
            return NOT_INITIALIZED
        if state["device"] != devices.machine().current:
            raise AssertionError(
                f"{name}: a cuBLAS handle made on device {state['device']} used on device {devices.machine().current}"
            )
        rows_a, rows_b = (m if ta == OP_N else k), (k if tb == OP_N else n)
        if (
            min(m, n, k) < 0
            or ta not in (OP_N, OP_T, OP_C)
            or tb not in (OP_N, OP_T, OP_C)
            or lda < max(1, rows_a)
            or ldb < max(1, rows_b)
            or ldc < max(1, m)
            or not alpha_p
            or not beta_p
        ):
            return INVALID_VALUE
        if m == 0 or n == 0:
            return SUCCESS
        alpha, beta = scalar.from_address(alpha_p).value, scalar.from_address(beta_p).value
        if not C or (k and alpha != 0 and (not A or not B)):
            return INVALID_VALUE
        self.log.append((name, h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, state["stream"], state["workspace"]))
        self.gemm_math_modes.append(state["math_mode"])
        tf32 = dtype == np.float32 and state["math_mode"] & ~DISALLOW_REDUCED_PRECISION_REDUCTION == TF32_TENSOR_OP_MATH

        def run():
            if k and alpha != 0:
                opa = _matrix(A, rows_a, k if ta == OP_N else m, lda, dtype)
                opb = _matrix(B, rows_b, n if tb == OP_N else k, ldb, dtype)
                if tf32:
                    opa, opb = round_to_tf32(opa), round_to_tf32(opb)
                opa, opb = opa.astype(acc, copy=False), opb.astype(acc, copy=False)
                with np.errstate(invalid="ignore", over="ignore"):  # inf inputs (an overflowed float16 step): NaN
                    r = (opa if ta == OP_N else opa.T) @ (opb if tb == OP_N else opb.T)
                r = r * acc(alpha) if alpha != 1 else r
            else:
                r = np.zeros((m, n), acc)
            c = _matrix(C, m, n, ldc, out_dtype)
            with np.errstate(over="ignore"):  # float16 C: beyond its range is inf, as cuBLAS's conversion
                c[...] = r if beta == 0 else r + acc(beta) * c.astype(acc)  # beta = 0: C is not read

        graph.launch("cublas", run, inplace=True, stream=state["stream"])
        return SUCCESS


def round_to_tf32(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to TF32 (8 exponent bits, 10 mantissa bits), to nearest with ties to
    even, as float32; inf and NaN kept as they are."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0xFFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return np.where(np.isfinite(x), rounded.view(np.float32), x)


def _matrix(ptr: int, rows: int, cols: int, ld: int, dtype) -> np.ndarray:
    """The column-major rows x cols matrix with leading dimension ``ld`` at device address ``ptr``
    (a view of the stand-in's host-backed buffer)."""
    item = np.dtype(dtype).itemsize
    nbytes = ((cols - 1) * ld + rows) * item
    buf = np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype)
    return np.lib.stride_tricks.as_strided(buf, shape=(rows, cols), strides=(item, ld * item))


def install(lib: FakeLibcublas | None = None):
    """Make cnn_gpu's cuBLAS binding load ``lib`` (a new FakeLibcublas by default) through its seam
    ``cnn_gpu.cuda.cublas._load_library``; returns the function that restores the real loader."""
    from cnn_gpu.cuda import cublas  # noqa: PLC0415

    lib = FakeLibcublas() if lib is None else lib
    real = cublas._load_library

    def load():
        return lib, "the CuPy stand-in's fake libcublas (tests/standin/cublas.py)"

    load.lib = lib
    cublas._load_library = load
    cublas.reset()

    def uninstall():
        cublas.reset()
        cublas._load_library = real

    return uninstall


def active() -> FakeLibcublas:
    """The fake library cnn_gpu's binding loads now (the stand-in must be active)."""
    from cnn_gpu.cuda import cublas  # noqa: PLC0415

    lib = getattr(cublas._load_library, "lib", None)
    if lib is None:
        raise AssertionError("the stand-in's fake libcublas is not installed (use standin.activated())")
    return lib


__all__ = ["FakeLibcublas", "install", "active", "HEADER", "round_to_tf32"]
