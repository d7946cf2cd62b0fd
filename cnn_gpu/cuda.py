"""cnn_gpu's CUDA kernels: where the sources live, NVRTC compilation, launch wrappers.

This is the one module that touches ``cupy.RawModule``. It imports CuPy lazily, so
it is importable (and :func:`kernel_dir`, :func:`kernel_sources`,
:func:`list_kernels` work) on a machine without CuPy or a GPU.

Sources
    ``kernels/*.cu`` plus ``kernels/common.cuh``, found by :func:`kernel_dir`:
    ``$CNN_GPU_KERNELS_DIR``, else ``<package>/kernels`` (installed wheel), else
    ``<package>/../kernels`` (source checkout). ``#include "..."`` lines are inlined
    (with ``#line`` markers) before compiling, so the source CuPy hashes for its
    on-disk kernel cache covers the headers too.

Compilation
    One ``cupy.RawModule`` per (file, device), built on first use with
    :data:`COMPILE_OPTIONS`. ``--fmad=false`` stops a*b+c being fused into an FMA, so
    the GPU rounds like the NumPy path (the kernels are memory bound; it costs nothing).

Entry points
    Every kernel exists as ``<name>_f32`` and ``<name>_f64``; the wrappers below pick
    one from the input's dtype (anything but float32/float64 is a TypeError naming
    the argument). int scalars go to the kernel as ``np.int32`` (``np.int64`` for the
    ``long long`` sizes), float scalars as the array's dtype.

Launching
    Block size :data:`DEFAULT_BLOCK`; grid = min(ceil(work / block), a cap), and every
    kernel loops grid-stride, so any grid is correct. Every wrapper takes
    ``grid=``/``block=`` overrides (the tests use tiny grids to exercise the loops).
    The launches go through a *launcher* object (CuPy by default). The CPU emulation
    tests install theirs with :func:`use_launcher`, which runs the same wrappers, with
    NumPy arrays, against the kernels compiled by g++.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .functional._checks import check_same_dtype as _check_same_dtype
from .functional._checks import check_shape as _check_shape
from .functional._checks import pair as _pair

__all__ = [
    "COMPILE_OPTIONS", "DEFAULT_BLOCK", "KernelCompileError",
    "kernel_dir", "kernel_sources", "expanded_source", "list_kernels", "entry_points",
    "nvrtc_compile", "compile_all", "get_module", "get_function",
    "use_launcher", "set_launcher", "get_launcher",
    "im2col", "col2im", "im2col_cm", "col2im_cm",
    "max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward", "avg_pool2d_backward",
    "bias_add_forward_", "bias_relu_forward_", "relu_forward", "relu_backward",
    "relu_backward_bias_grad", "bias_grad",
    "softmax_cross_entropy",
    "sgd_update_", "adam_update_",
]

COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++14", "--fmad=false")
DEFAULT_BLOCK = 256
MAX_BLOCK = 1024  # CUDA's limit, and the size of the kernels' shared reduction buffers
BLOCKS_PER_SM = 32

_INT32_MAX = 2**31 - 1
_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)
_ENTRY_MACRO_RE = re.compile(r"^[ \t]*CNN_ENTRY_POINTS\(\s*(\w+)\s*,", re.MULTILINE)
_EXTERN_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')


class KernelCompileError(RuntimeError):
    """A kernel file failed to compile; the message carries the compiler log."""


# --------------------------------------------------------------------------- sources


def kernel_dir() -> Path:
    """The directory holding the kernel sources (``common.cuh`` and ``*.cu``).

    Search order: ``$CNN_GPU_KERNELS_DIR``, ``<package>/kernels`` (wheel layout),
    ``<package>/../kernels`` (source checkout).
    """
    env = os.environ.get("CNN_GPU_KERNELS_DIR")
    if env:
        d = Path(env)
        if not (d / "common.cuh").is_file():
            raise FileNotFoundError(f"CNN_GPU_KERNELS_DIR={env!r} does not contain common.cuh")
        return d
    pkg = Path(__file__).resolve().parent
    candidates = (pkg / "kernels", pkg.parent / "kernels")
    for d in candidates:
        if (d / "common.cuh").is_file():
            return d
    raise FileNotFoundError(
        "cnn_gpu's CUDA kernel sources were not found; looked in "
        + ", ".join(str(d) for d in candidates)
        + " (set CNN_GPU_KERNELS_DIR to the directory holding common.cuh and *.cu)"
    )


def kernel_sources() -> dict[str, str]:
    """{file stem: raw source} for every ``*.cu`` file, e.g. ``{"im2col": "...", ...}``."""
    d = kernel_dir()
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(d.glob("*.cu"))}


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", "", src)


def expanded_source(name: str) -> str:
    """The source of ``<name>.cu`` with its ``#include "..."`` lines inlined (what NVRTC compiles)."""
    d = kernel_dir()
    path = d / f"{name}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"name: no kernel file {path}")
    return _expand(path, d, set())


def _expand(path: Path, d: Path, seen: set[str]) -> str:
    text = path.read_text(encoding="utf-8")
    out: list[str] = [f'#line 1 "{path.name}"\n']
    pos = 0
    for m in _INCLUDE_RE.finditer(text):
        out.append(text[pos : m.start()])
        inc = m.group(1)
        line_after = text.count("\n", 0, m.end()) + 2  # 1-based line following the include
        if inc not in seen:
            seen.add(inc)
            inc_path = d / inc
            if not inc_path.is_file():
                raise FileNotFoundError(f"{path.name}: included file {inc_path} not found")
            out.append(_expand(inc_path, d, seen))
        out.append(f'\n#line {line_after} "{path.name}"')
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def list_kernels() -> dict[str, list[str]]:
    """{file stem: [extern "C" entry point names]}, read from the sources (no compiler needed)."""
    return {name: entry_points(src) for name, src in kernel_sources().items()}


def entry_points(src: str) -> list[str]:
    """The extern "C" kernel names defined by one source text (CNN_ENTRY_POINTS lines and
    literal ``extern "C" __global__ void name(`` definitions)."""
    code = _strip_comments(src)
    names: list[str] = []
    for m in _ENTRY_MACRO_RE.finditer(code):
        names += [f"{m.group(1)}_f32", f"{m.group(1)}_f64"]
    names += _EXTERN_RE.findall(code)
    return names


# ----------------------------------------------------------------------- compilation


def nvrtc_compile(name: str, arch: str = "sm_80", options: tuple[str, ...] = COMPILE_OPTIONS) -> tuple[bytes, str]:
    """Compile ``<name>.cu`` with NVRTC for ``arch`` ("sm_XX" -> CUBIN, "compute_XX" -> PTX).

    Needs CuPy and libnvrtc (e.g. the nvidia-cuda-nvrtc-cu12 wheel) but no GPU or driver.
    Returns (binary, compiler log); raises :class:`KernelCompileError` with the log on errors.
    """
    from cupy_backends.cuda.libs import nvrtc  # noqa: PLC0415  (optional dependency)

    src = expanded_source(name)
    prog = nvrtc.createProgram(src, f"{name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [*options, f"--gpu-architecture={arch}"])
        except nvrtc.NVRTCError as exc:
            log = _as_str(nvrtc.getProgramLog(prog))
            raise KernelCompileError(f"{name}.cu failed to compile for {arch} with NVRTC ({exc}):\n{log}") from None
        log = _as_str(nvrtc.getProgramLog(prog))
        binary = nvrtc.getCUBIN(prog) if arch.startswith("sm_") else nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return bytes(binary) if not isinstance(binary, bytes) else binary, log


def _as_str(s: Any) -> str:
    if isinstance(s, bytes):
        return s.decode("utf-8", "replace")
    return str(s)


_modules: dict[tuple[str, int], Any] = {}
_modules_lock = threading.Lock()


def get_module(name: str):
    """The compiled ``cupy.RawModule`` for ``<name>.cu`` on the current device (cached)."""
    import cupy  # noqa: PLC0415

    key = (name, cupy.cuda.Device().id)
    mod = _modules.get(key)
    if mod is None:
        with _modules_lock:
            mod = _modules.get(key)
            if mod is None:
                mod = cupy.RawModule(code=expanded_source(name), options=COMPILE_OPTIONS)
                try:
                    mod.compile()
                except cupy.cuda.compiler.CompileException as exc:
                    raise KernelCompileError(f"{name}.cu failed to compile:\n{exc}") from None
                _modules[key] = mod
    return mod


_functions: dict[tuple[str, str, int], Any] = {}


def get_function(name: str, kernel: str):
    """The ``cupy.RawKernel`` for entry point ``kernel`` of ``<name>.cu`` on the current device (cached)."""
    import cupy  # noqa: PLC0415

    key = (name, kernel, cupy.cuda.Device().id)
    fn = _functions.get(key)
    if fn is None:
        fn = get_module(name).get_function(kernel)
        _functions[key] = fn
    return fn


def compile_all(arch: str | None = None) -> dict[str, list[str]]:
    """Compile every kernel file; returns :func:`list_kernels`.

    ``arch=None``: build the RawModules for the current GPU (needs a GPU) and look up
    every entry point. ``arch="sm_80"`` etc.: an offline NVRTC compile for that
    architecture (no GPU needed).
    """
    kernels = list_kernels()
    for name, entries in kernels.items():
        if arch is None:
            for e in entries:
                get_function(name, e)
        else:
            nvrtc_compile(name, arch)
    return kernels


# ------------------------------------------------------------------------- launchers


class CupyLauncher:
    """Launches the kernels on the current CUDA device through CuPy."""

    def __init__(self) -> None:
        self._max_grid: dict[int, int] = {}

    @staticmethod
    def _cupy():
        import cupy  # noqa: PLC0415

        return cupy

    def empty(self, shape, dtype):
        return self._cupy().empty(shape, dtype=dtype)

    def ascontiguousarray(self, a):
        return self._cupy().ascontiguousarray(a)

    def is_contiguous(self, a) -> bool:
        return bool(a.flags.c_contiguous)

    def max_grid(self) -> int:
        cupy = self._cupy()
        dev = cupy.cuda.Device()
        cap = self._max_grid.get(dev.id)
        if cap is None:
            cap = int(dev.attributes["MultiProcessorCount"]) * BLOCKS_PER_SM
            self._max_grid[dev.id] = cap
        return cap

    def launch(self, name: str, kernel: str, grid: int, block: int, args: tuple) -> None:
        get_function(name, kernel)((grid,), (block,), args)


_launcher: Any = None


def get_launcher():
    """The launcher in use (a :class:`CupyLauncher` unless replaced)."""
    global _launcher
    if _launcher is None:
        _launcher = CupyLauncher()
    return _launcher


def set_launcher(launcher) -> Any:
    """Replace the launcher (None restores CuPy); returns the previous one."""
    global _launcher
    prev = _launcher
    _launcher = launcher
    return prev


@contextlib.contextmanager
def use_launcher(launcher) -> Iterator[Any]:
    """Run the wrappers through ``launcher`` inside the block (the CPU emulation tests use this)."""
    prev = set_launcher(launcher)
    try:
        yield launcher
    finally:
        set_launcher(prev)


# -------------------------------------------------------------------------- helpers


def _suffix(name: str, a: Any) -> str:
    dt = getattr(a, "dtype", None)
    if dt == np.float32:
        return "f32"
    if dt == np.float64:
        return "f64"
    raise TypeError(f"{name}: expected a float32 or float64 array, got {dt if dt is not None else type(a).__name__}")


def _scalar_type(suffix: str):
    return np.float32 if suffix == "f32" else np.float64


def _i32(*values: int) -> tuple:
    out = []
    for v in values:
        v = int(v)
        if not -_INT32_MAX - 1 <= v <= _INT32_MAX:
            raise ValueError(f"size {v} does not fit the kernels' int32 parameters")
        out.append(np.int32(v))
    return tuple(out)


def _shape4(name: str, shape: Any) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"{name}: expected (N, C, H, W), got {shape!r}")
    return shape  # type: ignore[return-value]


def _launch_cfg(work: int, grid: int | None, block: int | None, launcher) -> tuple[int, int]:
    """(grid, block) for ``work`` independent items, honouring the overrides."""
    block = DEFAULT_BLOCK if block is None else int(block)
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block: expected 1..{MAX_BLOCK} threads, got {block}")
    if grid is None:
        grid = max(1, min(math.ceil(work / block), launcher.max_grid()))
    else:
        grid = int(grid)
        if grid < 1:
            raise ValueError(f"grid: expected at least 1 block, got {grid}")
    return grid, block


def _contig(L, name: str, a: Any):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name}: expected a CuPy array, got {type(a).__name__}")
    return L.ascontiguousarray(a)


def _require_contiguous(L, name: str, a: Any) -> None:
    if not L.is_contiguous(a):
        raise ValueError(f"{name}: updated in place, so it must be C-contiguous")


# ------------------------------------------------------------------- im2col / col2im


def _conv_geometry(x_shape, kernel_size, stride, padding, dilation):
    N, C, H, W = x_shape
    KH, KW = _pair("kernel_size", kernel_size, 1)
    SH, SW = _pair("stride", stride, 1)
    PH, PW = _pair("padding", padding, 0)
    DH, DW = _pair("dilation", dilation, 1)
    OH = (H + 2 * PH - DH * (KH - 1) - 1) // SH + 1
    OW = (W + 2 * PW - DW * (KW - 1) - 1) // SW + 1
    if OH < 1 or OW < 1:
        raise ValueError(f"kernel_size: the dilated kernel does not fit the padded {H}x{W} input")
    return (KH, KW, SH, SW, PH, PW, DH, DW, OH, OW)


def _out_array(L, name: str, out, shape: tuple, dtype):
    """``out`` checked (shape, dtype, C-contiguous), or a fresh array."""
    if out is None:
        return L.empty(shape, dtype)
    _check_shape(name, out, shape)
    if getattr(out, "dtype", None) != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {getattr(out, 'dtype', type(out).__name__)}")
    _require_contiguous(L, name, out)
    return out


def _im2col(kernel, x, kernel_size, stride, padding, dilation, out, grid, block, channel_major):
    L = get_launcher()
    sfx = _suffix("x", x)
    if x.ndim != 4:
        layout = "(C, N, H, W)" if channel_major else "(N, C, H, W)"
        raise ValueError(f"x: expected a 4-D array {layout}, got shape {tuple(x.shape)}")
    x = _contig(L, "x", x)
    if channel_major:
        C, N, H, W = x.shape
    else:
        N, C, H, W = x.shape
    KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _conv_geometry((N, C, H, W), kernel_size, stride, padding, dilation)
    shape = (C * KH * KW, N * OH * OW) if channel_major else (N, C * KH * KW, OH * OW)
    cols = _out_array(L, "out", out, shape, x.dtype)
    if cols.size:
        g, b = _launch_cfg(cols.size, grid, block, L)
        L.launch("im2col", f"{kernel}_{sfx}", g, b,
                 (x, cols, *_i32(N, C, H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW)))
    return cols


def im2col(x, kernel_size, stride=1, padding=0, dilation=1, *, out=None, grid=None, block=None):
    """x (N, C, H, W) -> cols (N, C*KH*KW, OH*OW), zero padding (layout of torch's unfold).

    ``out``: an optional C-contiguous array of that shape and x's dtype to write into.
    """
    return _im2col("im2col", x, kernel_size, stride, padding, dilation, out, grid, block, False)


def im2col_cm(x_cm, kernel_size, stride=1, padding=0, dilation=1, *, out=None, grid=None, block=None):
    """Channel-major im2col: x_cm (C, N, H, W) -> cols (C*KH*KW, N*OH*OW), cols[r, n*P + p].

    Equals ``im2col(x_cm.transpose(1, 0, 2, 3)).transpose(1, 0, 2).reshape(C*KH*KW, -1)``
    without the transposes. ``out`` as in :func:`im2col`.
    """
    return _im2col("im2col_cm", x_cm, kernel_size, stride, padding, dilation, out, grid, block, True)


def _col2im(kernel, cols, x_shape, kernel_size, stride, padding, dilation, out, accumulate, grid, block,
            channel_major):
    L = get_launcher()
    sfx = _suffix("cols", cols)
    if channel_major:
        C, N, H, W = _shape4("x_shape", x_shape)
    else:
        N, C, H, W = _shape4("x_shape", x_shape)
    KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _conv_geometry((N, C, H, W), kernel_size, stride, padding, dilation)
    _check_shape("cols", cols, (C * KH * KW, N * OH * OW) if channel_major else (N, C * KH * KW, OH * OW))
    if accumulate and out is None:
        raise ValueError("accumulate: needs out= (the array to add into)")
    cols = _contig(L, "cols", cols)
    dx = _out_array(L, "out", out, (C, N, H, W) if channel_major else (N, C, H, W), cols.dtype)
    if dx.size:
        g, b = _launch_cfg(dx.size, grid, block, L)
        L.launch("im2col", f"{kernel}_{sfx}", g, b,
                 (cols, dx, *_i32(N, C, H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW, bool(accumulate))))
    return dx


def col2im(cols, x_shape, kernel_size, stride=1, padding=0, dilation=1, *, out=None, accumulate=False,
           grid=None, block=None):
    """The adjoint of :func:`im2col`: cols (N, C*KH*KW, OH*OW) -> dx (N, C, H, W), a gather.

    ``out``: write into this C-contiguous array; with ``accumulate=True`` add to it
    (``out += col2im(cols)``, the sum formed first, then added once).
    """
    return _col2im("col2im", cols, x_shape, kernel_size, stride, padding, dilation, out, accumulate, grid, block,
                   False)


def col2im_cm(cols_cm, x_shape, kernel_size, stride=1, padding=0, dilation=1, *, out=None, accumulate=False,
              grid=None, block=None):
    """The adjoint of :func:`im2col_cm`: cols (C*KH*KW, N*OH*OW) -> dx (C, N, H, W);
    ``x_shape`` is the channel-major (C, N, H, W). ``out``/``accumulate`` as in :func:`col2im`.
    """
    return _col2im("col2im_cm", cols_cm, x_shape, kernel_size, stride, padding, dilation, out, accumulate, grid,
                   block, True)


# --------------------------------------------------------------------------- pooling


def _pool_geometry(x_shape, kernel_size, stride, padding):
    N, C, H, W = x_shape
    KH, KW = _pair("kernel_size", kernel_size, 1)
    SH, SW = _pair("stride", kernel_size if stride is None else stride, 1)
    PH, PW = _pair("padding", padding, 0)
    if 2 * PH > KH or 2 * PW > KW:
        raise ValueError(f"padding: expected at most half the kernel size ({KH // 2}, {KW // 2}), got ({PH}, {PW})")
    OH = (H + 2 * PH - KH) // SH + 1
    OW = (W + 2 * PW - KW) // SW + 1
    if OH < 1 or OW < 1:
        raise ValueError(f"kernel_size: the {KH}x{KW} window does not fit the padded {H}x{W} input")
    return (N, C, H, W, KH, KW, SH, SW, PH, PW, OH, OW)


def _pool_forward_setup(x, kernel_size, stride, padding):
    """The shared prologue of the pool forwards: (launcher, dtype suffix, contiguous x, geometry, y)."""
    L = get_launcher()
    sfx = _suffix("x", x)
    if x.ndim != 4:
        raise ValueError(f"x: expected a 4-D array (N, C, H, W), got shape {tuple(x.shape)}")
    x = _contig(L, "x", x)
    geom = _pool_geometry(x.shape, kernel_size, stride, padding)
    N, C, OH, OW = geom[0], geom[1], geom[-2], geom[-1]
    return L, sfx, x, geom, L.empty((N, C, OH, OW), x.dtype)


def max_pool2d_forward(x, kernel_size, stride=None, padding=0, *, grid=None, block=None):
    """x (N, C, H, W) -> (y (N, C, OH, OW), argmax int32 (N, C, OH, OW) = flat h*W + w)."""
    L, sfx, x, geom, y = _pool_forward_setup(x, kernel_size, stride, padding)
    argmax = L.empty(y.shape, np.int32)
    if y.size:
        g, b = _launch_cfg(y.size, grid, block, L)
        L.launch("pool", f"max_pool2d_forward_{sfx}", g, b, (x, y, argmax, *_i32(*geom)))
    return y, argmax


def max_pool2d_backward(dy, argmax, x_shape, kernel_size, stride=None, padding=0, *, grid=None, block=None):
    """dy (N, C, OH, OW), argmax -> dx (N, C, H, W); a gather over the covering windows."""
    L = get_launcher()
    sfx = _suffix("dy", dy)
    geom = _pool_geometry(_shape4("x_shape", x_shape), kernel_size, stride, padding)
    N, C, H, W, OH, OW = geom[0], geom[1], geom[2], geom[3], geom[-2], geom[-1]
    _check_shape("dy", dy, (N, C, OH, OW))
    _check_shape("argmax", argmax, (N, C, OH, OW))
    if getattr(argmax, "dtype", None) != np.int32:
        raise TypeError(f"argmax: expected an int32 array, got {getattr(argmax, 'dtype', type(argmax).__name__)}")
    dy = _contig(L, "dy", dy)
    argmax = _contig(L, "argmax", argmax)
    dx = L.empty((N, C, H, W), dy.dtype)
    if dx.size:
        g, b = _launch_cfg(dx.size, grid, block, L)
        L.launch("pool", f"max_pool2d_backward_{sfx}", g, b, (dy, argmax, dx, *_i32(*geom)))
    return dx


def avg_pool2d_forward(x, kernel_size, stride=None, padding=0, *, grid=None, block=None):
    """x (N, C, H, W) -> y (N, C, OH, OW); zero padding counted in the divisor KH*KW."""
    L, sfx, x, geom, y = _pool_forward_setup(x, kernel_size, stride, padding)
    if y.size:
        g, b = _launch_cfg(y.size, grid, block, L)
        L.launch("pool", f"avg_pool2d_forward_{sfx}", g, b, (x, y, *_i32(*geom)))
    return y


def avg_pool2d_backward(dy, x_shape, kernel_size, stride=None, padding=0, *, grid=None, block=None):
    """dy (N, C, OH, OW) -> dx (N, C, H, W); a gather over the covering windows."""
    L = get_launcher()
    sfx = _suffix("dy", dy)
    geom = _pool_geometry(_shape4("x_shape", x_shape), kernel_size, stride, padding)
    N, C, H, W, OH, OW = geom[0], geom[1], geom[2], geom[3], geom[-2], geom[-1]
    _check_shape("dy", dy, (N, C, OH, OW))
    dy = _contig(L, "dy", dy)
    dx = L.empty((N, C, H, W), dy.dtype)
    if dx.size:
        g, b = _launch_cfg(dx.size, grid, block, L)
        L.launch("pool", f"avg_pool2d_backward_{sfx}", g, b, (dy, dx, *_i32(*geom)))
    return dx


# ------------------------------------------------------------------- bias and ReLU


def _nfp(name: str, a: Any) -> tuple[int, int, int]:
    if a.ndim < 2:
        raise ValueError(f"{name}: expected (N, F, ...) with at least 2 dimensions, got shape {tuple(a.shape)}")
    P = 1
    for s in a.shape[2:]:
        P *= int(s)
    return int(a.shape[0]), int(a.shape[1]), P


def _bias_forward(kernel: str, y, b, grid, block):
    L = get_launcher()
    sfx = _suffix("y", y)
    _check_same_dtype("b", b, "y", y)
    N, F, P = _nfp("y", y)
    _check_shape("b", b, (F,))
    _require_contiguous(L, "y", y)
    b = _contig(L, "b", b)
    if y.size:
        g, bl = _launch_cfg(y.size, grid, block, L)
        L.launch("elementwise", f"{kernel}_{sfx}", g, bl, (y, b, *_i32(N, F, P)))
    return y


def bias_add_forward_(y, b, *, grid=None, block=None):
    """In place: y (N, F, ...) += b[f]. Returns y."""
    return _bias_forward("bias_add_forward", y, b, grid, block)


def bias_relu_forward_(y, b, *, grid=None, block=None):
    """In place: y (N, F, ...) = max(y + b[f], 0). Returns y."""
    return _bias_forward("bias_relu_forward", y, b, grid, block)


def relu_forward(x, *, grid=None, block=None):
    """y = max(x, 0) (NaN propagates)."""
    L = get_launcher()
    sfx = _suffix("x", x)
    x = _contig(L, "x", x)
    y = L.empty(x.shape, x.dtype)
    if x.size:
        g, b = _launch_cfg(x.size, grid, block, L)
        L.launch("elementwise", f"relu_forward_{sfx}", g, b, (x, y, np.int64(x.size)))
    return y


def relu_backward(dy, y, *, grid=None, block=None):
    """dx = dy where y > 0 else 0 (``y`` is the ReLU's output)."""
    L = get_launcher()
    sfx = _suffix("dy", dy)
    _check_same_dtype("y", y, "dy", dy)
    _check_shape("y", y, dy.shape)
    dy = _contig(L, "dy", dy)
    y = _contig(L, "y", y)
    dx = L.empty(dy.shape, dy.dtype)
    if dy.size:
        g, b = _launch_cfg(dy.size, grid, block, L)
        L.launch("elementwise", f"relu_backward_{sfx}", g, b, (dy, y, dx, np.int64(dy.size)))
    return dx


def relu_backward_bias_grad(dy, y, *, grid=None, block=None):
    """(dx, db): dx = dy where y > 0 else 0, db[f] = sum over n and positions of dx[n, f]."""
    L = get_launcher()
    sfx = _suffix("dy", dy)
    _check_same_dtype("y", y, "dy", dy)
    _check_shape("y", y, dy.shape)
    N, F, P = _nfp("dy", dy)
    dy = _contig(L, "dy", dy)
    y = _contig(L, "y", y)
    dx = L.empty(dy.shape, dy.dtype)
    db = L.empty((F,), dy.dtype)
    if F:
        g, b = _launch_cfg(F * DEFAULT_BLOCK, grid, block, L)  # one block per filter
        L.launch("elementwise", f"relu_backward_bias_grad_{sfx}", g, b, (dy, y, dx, db, *_i32(N, F, P)))
    return dx, db


def bias_grad(dy, *, grid=None, block=None):
    """db[f] = sum over n and positions of dy[n, f] (deterministic block reduction)."""
    L = get_launcher()
    sfx = _suffix("dy", dy)
    N, F, P = _nfp("dy", dy)
    dy = _contig(L, "dy", dy)
    db = L.empty((F,), dy.dtype)
    if F:
        g, b = _launch_cfg(F * DEFAULT_BLOCK, grid, block, L)
        L.launch("elementwise", f"bias_grad_{sfx}", g, b, (dy, db, *_i32(N, F, P)))
    return db


# ------------------------------------------------------------------------------ loss


def softmax_cross_entropy(logits, labels, *, grid=None, block=None, return_per_sample=False):
    """Mean softmax cross-entropy -> (loss 0-d array, dlogits (N, K) = (softmax - onehot) / N).

    ``labels``: integer class indices (N,), converted to int32; a label outside [0, K)
    gives a NaN loss (the caller validates the range). With ``return_per_sample=True``
    the per-sample losses (N,) come third.
    """
    L = get_launcher()
    sfx = _suffix("logits", logits)
    if logits.ndim != 2:
        raise ValueError(f"logits: expected a 2-D array (N, K), got shape {tuple(logits.shape)}")
    N, K = (int(s) for s in logits.shape)
    if N == 0 or K == 0:
        raise ValueError(f"logits: expected a non-empty (N, K) array, got shape {tuple(logits.shape)}")
    ldt = getattr(labels, "dtype", None)
    if ldt is None or ldt.kind not in "iu":
        raise TypeError(f"labels: expected an integer array of class indices, got {ldt if ldt is not None else type(labels).__name__}")
    _check_shape("labels", labels, (N,))
    logits = _contig(L, "logits", logits)
    labels = L.ascontiguousarray(labels.astype(np.int32, copy=False))
    T = _scalar_type(sfx)
    per_sample = L.empty((N,), logits.dtype)
    dlogits = L.empty((N, K), logits.dtype)
    loss = L.empty((), logits.dtype)
    if block is None:
        block = min(DEFAULT_BLOCK, max(32, 1 << (K - 1).bit_length()))  # one block per row
    g, b = _launch_cfg(N * block, grid, block, L)
    inv_n = T(1.0 / N)
    L.launch("loss", f"softmax_cross_entropy_{sfx}", g, b,
             (logits, labels, per_sample, dlogits, *_i32(N, K), inv_n))
    L.launch("loss", f"scaled_sum_{sfx}", 1, b, (per_sample, loss, np.int64(N), inv_n))
    if return_per_sample:
        return loss, dlogits, per_sample
    return loss, dlogits


# ------------------------------------------------------------------------- optimizers


def _flat_state(L, p, others: dict):
    sfx = _suffix("p", p)
    _require_contiguous(L, "p", p)
    for name, a in others.items():
        _check_same_dtype(name, a, "p", p)
        if a.size != p.size:
            raise ValueError(f"{name}: expected {p.size} elements like p, got {a.size}")
        _require_contiguous(L, name, a)
    return sfx


def sgd_update_(p, g, buf, lr, momentum=0.0, weight_decay=0.0, nesterov=False, first_step=False, *,
                dampening=0.0, grid=None, block=None):
    """One SGD step in place over flat buffers (torch.optim.SGD semantics).

    ``buf`` (the momentum buffer; None when ``momentum == 0``) is required when
    ``momentum != 0``; ``first_step`` says it is uninitialised (it is then set to the
    gradient). Returns p.
    """
    L = get_launcher()
    if momentum != 0 and buf is None:
        raise ValueError("buf: a momentum buffer is required when momentum != 0")
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError("nesterov: requires momentum > 0 and dampening == 0")
    others = {"g": g} if buf is None else {"g": g, "buf": buf}
    sfx = _flat_state(L, p, others)
    T = _scalar_type(sfx)
    if p.size:
        gr, b = _launch_cfg(p.size, grid, block, L)
        L.launch("optim", f"sgd_update_{sfx}", gr, b,
                 (p, g, p if buf is None else buf, np.int64(p.size), T(lr), T(momentum), T(dampening),
                  T(weight_decay), np.int32(bool(nesterov)), np.int32(bool(first_step))))
    return p


def adam_update_(p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, bias_correction1, bias_correction2,
                 *, grid=None, block=None):
    """One Adam (``decoupled=False``) or AdamW (``decoupled=True``) step in place over flat buffers.

    ``bias_correction1/2`` = 1 - beta1^t, 1 - beta2^t for the 1-based step t. The scalars
    the kernel needs (lr/bc1, 1 - lr*wd, 1 - beta) are formed here in double precision,
    as the NumPy path does. Returns p.
    """
    L = get_launcher()
    if not bias_correction1 > 0 or not bias_correction2 > 0:
        raise ValueError(f"bias_correction1/2: expected 1 - beta^t > 0, got {bias_correction1!r}, {bias_correction2!r}")
    sfx = _flat_state(L, p, {"g": g, "m": m, "v": v})
    T = _scalar_type(sfx)
    lr, beta1, beta2, wd = float(lr), float(beta1), float(beta2), float(weight_decay)
    if p.size:
        gr, b = _launch_cfg(p.size, grid, block, L)
        L.launch("optim", f"adam_update_{sfx}", gr, b,
                 (p, g, m, v, np.int64(p.size), T(beta1), T(1.0 - beta1), T(beta2), T(1.0 - beta2), T(eps), T(wd),
                  np.int32(bool(decoupled)), T(1.0 - lr * wd), T(lr / bias_correction1), T(bias_correction2)))
    return p
