"""Every kernels/*.cu compiles with NVRTC for sm_70, sm_80 and sm_90 -- no GPU needed.

Uses CuPy's NVRTC bindings directly (``cnn_gpu.cuda.nvrtc_compile``): CuPy's own
``compile_using_nvrtc`` asks the driver for the current device, which fails on a
machine without a GPU. libnvrtc comes from the nvidia-cuda-nvrtc-cu12 wheel (found by
CuPy via cuda-pathfinder) or a CUDA toolkit.

Skipped only when CuPy is not installed. If CuPy imports but NVRTC cannot be used the
tests FAIL: CI installs both, and a silent skip would hide a broken kernel.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("cnn_gpu") is None:  # not installed: run from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("cupy", reason="CuPy is not installed (pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12)")

import cnn_gpu  # noqa: E402
from cnn_gpu import cuda  # noqa: E402

ARCHS = ["sm_70", "sm_80", "sm_90"]
KERNEL_FILES = sorted(cuda.kernel_sources())
# NVRTC 12.x says this for sm_70; it is not a problem with our code
_BENIGN = ("Architectures prior to", "are deprecated")


@pytest.fixture(scope="module")
def nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc as lib  # noqa: PLC0415

        version = lib.getVersion()
        archs = lib.getSupportedArchs()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(
            "CuPy is installed but NVRTC is unusable, so the kernels cannot be compile-checked: "
            f"{type(exc).__name__}: {exc}. Install libnvrtc, e.g. `pip install nvidia-cuda-nvrtc-cu12` "
            "(matching CuPy's CUDA major version), or a CUDA toolkit.",
            pytrace=False,
        )
    # CUDA 13 dropped Volta (sm_70); CI's NVRTC 12 still checks it, a CUDA 13 GPU machine checks the rest
    missing = [a for a in ARCHS if int(a[3:]) not in archs and not (a == "sm_70" and version[0] >= 13)]
    if missing:
        pytest.fail(f"NVRTC {version} cannot target {missing} (supports {archs}); CUDA >= 12 NVRTC is required", pytrace=False)
    return lib


def test_nvrtc_kernel_files_found():
    assert set(KERNEL_FILES) >= {"im2col", "pool", "epilogue", "loss", "optim"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", KERNEL_FILES)
def test_nvrtc_compiles(nvrtc, name, arch):
    if int(arch[3:]) not in nvrtc.getSupportedArchs():
        pytest.skip(f"NVRTC {nvrtc.getVersion()} (CUDA 13+) no longer targets {arch}; NVRTC 12 in CI checks it")
    try:
        binary, log = cuda.nvrtc_compile(name, arch)
    except cuda.KernelCompileError as exc:
        pytest.fail(str(exc), pytrace=False)  # the message carries NVRTC's log
    warnings = [line for line in log.splitlines() if "warning" in line.lower() and not all(b in line for b in _BENIGN)]
    assert not warnings, f"{name}.cu compiled for {arch} with warnings:\n{log}"
    assert binary, f"{name}.cu: NVRTC produced an empty CUBIN for {arch}"
    # every entry point cnn_gpu.cuda will look up is in the binary, unmangled
    for kernel in cuda.list_kernels()[name]:
        assert kernel.encode() + b"\0" in binary, f"{kernel} missing from the {arch} CUBIN of {name}.cu"


def test_nvrtc_ptx_for_the_oldest_target(nvrtc):
    """PTX (compute_70) is what a driver JIT-compiles for GPUs newer than the CUBINs."""
    oldest = "compute_70" if 70 in nvrtc.getSupportedArchs() else "compute_75"
    ptx, _ = cuda.nvrtc_compile("im2col", oldest)
    assert b".visible .entry im2col_f32" in ptx and b".visible .entry col2im_f64" in ptx


def test_nvrtc_kernels_use_no_atomics(nvrtc):
    """Gathers and fixed-order sums only (the bias and depthwise weight gradients in (row, segment)
    blocks, then a second launch over the segments' sums): no atom.* / red.* in any file's PTX."""
    import re  # noqa: PLC0415

    for name in KERNEL_FILES:
        ptx, _ = cuda.nvrtc_compile(name, "compute_80")
        found = re.findall(rb"^\s*(?:@%p\d+\s+)?((?:atom|red)\.[\w.]+)", ptx, re.M)
        assert not found, f"{name}.cu uses atomics: {sorted(set(found))}"
    ptx, _ = cuda.nvrtc_compile("epilogue", "compute_80")
    assert b".visible .entry sum_segments_f32" in ptx and b".visible .entry act_backward_bias_grad_f64" in ptx


def test_nvrtc_compile_error_is_reported_with_the_log(nvrtc, tmp_path, monkeypatch):
    (tmp_path / "common.cuh").write_text("#define X 1\n")
    (tmp_path / "broken.cu").write_text(
        '#include "common.cuh"\nextern "C" __global__ void k(float* x) { x[0] = undefined_name; }\n'
    )
    with cnn_gpu.config.override(kernels_dir=str(tmp_path)), pytest.raises(cuda.KernelCompileError) as info:
        cuda.nvrtc_compile("broken", "sm_80")
    msg = str(info.value)
    assert "broken.cu" in msg and "undefined_name" in msg and "sm_80" in msg
    # the #line markers point the error at the real file and line
    assert "broken.cu(2)" in msg
