"""Building cnn_gpu's CUDA kernels: where the sources live, NVRTC compilation, the module
cache and the launcher. The op wrappers that launch them are in cuda/ops.py.

This is the one module that compiles and loads CUDA code. It imports CuPy lazily, so
it is importable (and :func:`kernel_dir`, :func:`kernel_sources`,
:func:`list_kernels` work) on a machine without CuPy or a GPU.

Sources
    ``kernels/*.cu`` plus ``kernels/common.cuh``, found by :func:`kernel_dir`: the
    ``kernels_dir`` setting (``$CNN_GPU_KERNELS_DIR``), else ``<package>/kernels``
    (installed wheel), else ``<repo>/kernels`` (source checkout). ``#include "..."`` lines are inlined
    (with ``#line`` markers) before compiling, so the source CuPy hashes for its
    on-disk kernel cache covers the headers too.

Compilation
    One module per (file, device), built on first use by our own NVRTC call with
    :data:`COMPILE_OPTIONS` for the device's architecture (a CUBIN, or PTX for the driver to
    JIT when the device is newer than NVRTC knows) and loaded with
    ``cupy.cuda.function.Module``. Not ``cupy.RawModule(code=...)``: CuPy adds ``-ftz=true``
    to every compile it makes, flushing float32 subnormals to zero, and the kernels must
    round as the reference does. ``--fmad=false`` stops a*b+c being fused into an FMA, for
    the same reason (the kernels are memory bound; it costs nothing).

Launching
    The wrappers (cuda/ops.py) launch through a *launcher* object (:class:`CupyLauncher`
    by default). The CPU emulation tests install theirs with :func:`use_launcher`, which
    runs the same wrappers, with NumPy arrays, against the kernels compiled by g++.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import config
from . import cublas

__all__ = [
    "COMPILE_OPTIONS",
    "BLOCKS_PER_SM",
    "KernelCompileError",
    "kernel_dir",
    "kernel_sources",
    "expanded_source",
    "list_kernels",
    "entry_points",
    "fp16_include_dir",
    "fp16_options",
    "nvrtc_compile",
    "compile_all",
    "get_module",
    "get_function",
    "device_arch",
    "probe",
    "clear_caches",
    "CupyLauncher",
    "use_launcher",
    "set_launcher",
    "get_launcher",
]

COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++14", "--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true")
BLOCKS_PER_SM = 32  # the default grid's cap, per multiprocessor

_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)
_ENTRY_MACRO_RE = re.compile(r"^[ \t]*CNN_ENTRY_POINTS(_FP16)?\(\s*(\w+)\s*,", re.MULTILINE)
_EXTERN_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')


class KernelCompileError(RuntimeError):
    """A kernel file failed to compile; the message carries the compiler log."""


# --------------------------------------------------------------------------- sources


def kernel_dir() -> Path:
    """The directory holding the kernel sources (``common.cuh`` and ``*.cu``).

    Search order: the ``kernels_dir`` setting (``$CNN_GPU_KERNELS_DIR``), ``<package>/kernels``
    (wheel layout), ``<repo>/kernels`` (source checkout).
    """
    setting = config.get().kernels_dir
    if setting:
        d = Path(setting)
        if not (d / "common.cuh").is_file():
            raise FileNotFoundError(f"CNN_GPU_KERNELS_DIR={setting!r} does not contain common.cuh")
        return d
    pkg = Path(__file__).resolve().parent.parent  # cnn_gpu/
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
    """The extern "C" kernel names defined by one source text (CNN_ENTRY_POINTS lines: name_f32,
    name_f64; CNN_ENTRY_POINTS_FP16 lines: name_f16 too, compiled where :func:`fp16_include_dir` finds
    cuda_fp16.h; and literal ``extern "C" __global__ void name(`` definitions)."""
    code = _strip_comments(src)
    names: list[str] = []
    for m in _ENTRY_MACRO_RE.finditer(code):
        names += [f"{m.group(2)}_f32", f"{m.group(2)}_f64"] + ([f"{m.group(2)}_f16"] if m.group(1) else [])
    names += _EXTERN_RE.findall(code)
    return names


# ----------------------------------------------------------------------- compilation


def nvrtc_compile(name: str, arch: str = "sm_80", options: tuple[str, ...] = COMPILE_OPTIONS) -> tuple[bytes, str]:
    """Compile ``<name>.cu`` with NVRTC for ``arch`` ("sm_XX" -> CUBIN, "compute_XX" -> PTX).

    Needs CuPy and libnvrtc (e.g. the nvidia-cuda-nvrtc-cu12 wheel) but no GPU or driver.
    Returns (binary, compiler log); raises :class:`KernelCompileError` with the log on errors.
    """
    import cupy  # noqa: PLC0415  (optional dependency)

    nvrtc = cupy.cuda.nvrtc

    src = expanded_source(name)
    prog = nvrtc.createProgram(src, f"{name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [*options, *fp16_options(), f"--gpu-architecture={arch}"])
        except nvrtc.NVRTCError as exc:
            log = _as_str(nvrtc.getProgramLog(prog))
            raise KernelCompileError(f"{name}.cu failed to compile for {arch} with NVRTC ({exc}):\n{log}") from None
        log = _as_str(nvrtc.getProgramLog(prog))
        binary = nvrtc.getCUBIN(prog) if arch.startswith("sm_") else nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return bytes(binary) if not isinstance(binary, bytes) else binary, log


def fp16_include_dir() -> tuple[str | None, str]:
    """``(folder, "")``: the CUDA headers' folder holding cuda_fp16.h, which NVRTC is given to compile
    the float16 entry points (kernels/common.cuh); or ``(None, why)``. Looked up once, in order:
    cuda-pathfinder's CUDA runtime headers (the nvidia-cuda-runtime wheel or a toolkit), $CUDA_PATH,
    $CUDA_HOME, /usr/local/cuda, then /usr/local/cuda-* (newest first)."""
    global _fp16_dir
    if _fp16_dir is None:
        _fp16_dir = _find_fp16_include_dir()
    return _fp16_dir


_fp16_dir: tuple[str | None, str] | None = None


def _find_fp16_include_dir() -> tuple[str | None, str]:
    import os  # noqa: PLC0415

    candidates: list[str] = []
    try:
        from cuda.pathfinder import find_nvidia_header_directory  # noqa: PLC0415  (CuPy 14's dependency)

        found = find_nvidia_header_directory("cudart")
        if found:
            candidates.append(str(found))
    except Exception:  # noqa: BLE001  (not installed, or an older cuda-pathfinder without it)
        pass
    candidates += [str(Path(os.environ[v]) / "include") for v in ("CUDA_PATH", "CUDA_HOME") if os.environ.get(v)]
    toolkits = sorted(
        Path("/usr/local").glob("cuda-*"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in re.split(r"[-.]", p.name)[1:]],
        reverse=True,
    )
    candidates += ["/usr/local/cuda/include", *(str(t / "include") for t in toolkits)]
    for d in candidates:
        if (Path(d) / "cuda_fp16.h").is_file():
            return d, ""
    return None, "no cuda_fp16.h in " + ", ".join(dict.fromkeys(candidates))


def fp16_options() -> tuple[str, ...]:
    """The NVRTC options that compile the float16 entry points (``-DCNN_FP16 -I<headers>``), or ()
    where :func:`fp16_include_dir` finds no cuda_fp16.h (the float32 and float64 ones still compile)."""
    d, _ = fp16_include_dir()
    return () if d is None else ("-DCNN_FP16", f"-I{d}")


def _as_str(s: Any) -> str:
    if isinstance(s, bytes):
        return s.decode("utf-8", "replace")
    return str(s)


_modules: dict[tuple[str, int], Any] = {}
_functions: dict[tuple[str, str, int], Any] = {}
_modules_lock = threading.Lock()


def clear_caches() -> None:
    """Forget the compiled modules (a new CuPy, e.g. the tests' stand-in, builds its own)."""
    with _modules_lock:
        _modules.clear()
        _functions.clear()


def device_arch() -> str:
    """The NVRTC target for the current device: ``sm_XY`` when NVRTC knows the device, else
    ``compute_XY`` (PTX) for the newest architecture it knows below it, for the driver to JIT."""
    import cupy  # noqa: PLC0415

    cc = int(cupy.cuda.Device().compute_capability)
    known = sorted(int(a) for a in cupy.cuda.nvrtc.getSupportedArchs())
    if cc in known:
        return f"sm_{cc}"
    older = [a for a in known if a <= cc]
    if not older:
        raise KernelCompileError(
            f"NVRTC {cupy.cuda.nvrtc.getVersion()} cannot target this GPU (compute capability {cc}; it knows {known})"
        )
    return f"compute_{older[-1]}"


def get_module(name: str):
    """The loaded module of ``<name>.cu`` on the current device (compiled once, then cached)."""
    import cupy  # noqa: PLC0415

    key = (name, cupy.cuda.Device().id)
    mod = _modules.get(key)
    if mod is None:
        with _modules_lock:
            mod = _modules.get(key)
            if mod is None:
                binary, _ = nvrtc_compile(name, device_arch())
                mod = cupy.cuda.function.Module()
                mod.load(binary)
                _modules[key] = mod
    return mod


def get_function(name: str, kernel: str):
    """The kernel ``kernel`` of ``<name>.cu`` on the current device (cached)."""
    import cupy  # noqa: PLC0415

    key = (name, kernel, cupy.cuda.Device().id)
    fn = _functions.get(key)
    if fn is None:
        fn = get_module(name).get_function(kernel)
        _functions[key] = fn
    return fn


def probe() -> None:
    """Compile, load and launch kernels/probe.cu and check what it wrote: raises when CuPy
    cannot run cnn_gpu's kernels here (cnn_gpu.backend calls this once, before using CuPy)."""
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    out = cupy.empty((64,), dtype=np.int64)
    get_function("probe", "cnn_probe")((1,), (64,), (out, np.int64(64)))
    got = cupy.asnumpy(out)
    if not (got == 3 * np.arange(64) + 1).all():
        raise RuntimeError(f"the probe kernel ran but wrote {got[:4]}... instead of 1, 4, 7, 10, ...")


def compile_all(arch: str | None = None) -> dict[str, list[str]]:
    """Compile every kernel file; returns :func:`list_kernels`.

    ``arch=None``: build the modules for the current GPU (needs a GPU) and look up
    every entry point. ``arch="sm_80"`` etc.: an offline NVRTC compile for that
    architecture (no GPU needed).
    """
    kernels = list_kernels()
    half = fp16_include_dir()[0] is not None
    for name, entries in kernels.items():
        if arch is None:
            for e in entries:
                if half or not e.endswith("_f16"):
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

    def gemm(self, a, b, out, *, transa=False, transb=False, beta=0.0) -> None:
        """out = op(a) @ op(b) + beta * out (op: the transpose with ``trans*``), one cuBLAS GEMM on
        2-D C-contiguous arrays: with beta = 1 it adds into ``out`` (a Parameter.grad) in place.
        Through cnn_gpu's own cuBLAS handle (cuda/cublas.py: callable during CUDA-graph stream
        capture, which CuPy's cuBLAS wrappers refuse); where that cannot be made, cupy.cublas.gemm,
        after one warning saying why."""
        handle, why = cublas.get_handle()
        if handle is not None:
            handle.gemm(a, b, out, transa=transa, transb=transb, beta=beta)
            return
        cublas.warn_fallback(why)
        import cupy.cublas  # noqa: PLC0415  (loads cuBLAS: only on a GPU)

        cupy.cublas.gemm("T" if transa else "N", "T" if transb else "N", a, b, out=out, beta=beta)


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
