"""The CUDA engine: cnn_gpu's kernels (kernels/*.cu) and cuBLAS, on CuPy arrays.

``build`` finds, compiles (our own NVRTC call, once per device) and launches the kernels;
``ops`` holds the op functions the engine dispatch calls (cnn_gpu.functional._dispatch; it is
imported by cnn_gpu/__init__.py, which registers it). Importing this package does not import
CuPy, and ``build`` imports nothing of cnn_gpu but the config and ``cublas`` (which imports none), so cnn_gpu.backend can use it.
"""

from . import build
from .build import (
    COMPILE_OPTIONS,
    KernelCompileError,
    compile_all,
    entry_points,
    expanded_source,
    get_launcher,
    kernel_dir,
    kernel_sources,
    list_kernels,
    nvrtc_compile,
    set_launcher,
    use_launcher,
)

__all__ = [
    "build",
    "COMPILE_OPTIONS",
    "KernelCompileError",
    "compile_all",
    "entry_points",
    "expanded_source",
    "get_launcher",
    "kernel_dir",
    "kernel_sources",
    "list_kernels",
    "nvrtc_compile",
    "set_launcher",
    "use_launcher",
]
