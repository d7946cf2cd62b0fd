"""The CUDA engine: cnn_gpu's kernels (kernels/*.cu) and cuBLAS, on CuPy arrays.

``build`` finds, compiles (NVRTC through cupy.RawModule, once per device) and launches the
kernels; ``ops`` holds the op wrappers the engine dispatch calls (cnn_gpu.functional._dispatch).
Importing this package does not import CuPy.
"""
from . import build, ops
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

__all__ = ["build", "ops", "COMPILE_OPTIONS", "KernelCompileError", "compile_all", "entry_points", "expanded_source",
           "get_launcher", "kernel_dir", "kernel_sources", "list_kernels", "nvrtc_compile", "set_launcher",
           "use_launcher"]
