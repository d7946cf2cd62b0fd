"""Shared fixtures. ``xp`` runs a test once on NumPy and once on CuPy (the latter marked
``gpu`` and skipped unless CuPy imports and sees a GPU): one suite for both backends."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("cnn_gpu") is None:  # not installed: run from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers.py

import cnn_gpu  # noqa: E402
from cnn_gpu import cuda  # noqa: E402
from cnn_gpu.backend import cupy_available  # noqa: E402

_NO_GPU = not cupy_available()


def _standin_status() -> str:
    """Why the CuPy stand-in cannot run here ("" when it can): it needs the cupy package (for its
    API surface) and g++ (for the kernels' emulation)."""
    import os  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    if importlib.util.find_spec("cupy") is None:
        return "the CuPy stand-in needs the cupy package installed (pip install cupy-cuda12x): it copies its API"
    if os.name != "posix" or shutil.which(os.environ.get("CXX", "g++")) is None:
        return "the CuPy stand-in runs kernels in the CPU emulation, which needs a POSIX system with g++"
    return ""


_NO_STANDIN_WHY = _standin_status()
_NO_STANDIN = bool(_NO_STANDIN_WHY)


@pytest.fixture(
    params=[
        pytest.param("numpy", id="numpy"),
        pytest.param("standin", id="standin", marks=pytest.mark.skipif(_NO_STANDIN, reason=_NO_STANDIN_WHY)),
        pytest.param("cupy", id="cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(_NO_GPU, reason="needs CuPy and a GPU")]),
    ]
)
def xp(request):
    """The array module under test: numpy, the CuPy stand-in (tests/standin: CuPy's API on the
    CPU, our kernels in the g++ emulation), or cupy on a machine with a GPU."""
    if request.param == "numpy":
        return np
    if request.param == "standin":
        return request.getfixturevalue("standin")
    import cupy  # noqa: PLC0415

    return cupy


@pytest.fixture
def standin():
    """Within the test, ``import cupy`` gives the CuPy stand-in and cnn_gpu sees one GPU
    (skipped, saying why, where the stand-in cannot run: no cupy package, no g++)."""
    if _NO_STANDIN:
        pytest.skip(_NO_STANDIN_WHY)
    from standin import activated  # noqa: PLC0415

    with activated() as cp:
        yield cp


@pytest.fixture(
    params=[
        pytest.param("standin", id="standin"),
        pytest.param(
            "cupy", id="gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a GPU")]
        ),
    ]
)
def gpu_cupy(request):
    """The cupy module: the stand-in (CI), or the real one on a GPU (marked gpu): the same test
    holds the stand-in to CuPy where a GPU is there to compare."""
    if request.param == "standin":
        return request.getfixturevalue("standin")
    import cupy  # noqa: PLC0415

    return cupy


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def pytest_report_header(config):
    return f"cnn_gpu GPU tests: {'enabled' if not _NO_GPU else 'skipped (no usable CuPy GPU)'}"


@pytest.fixture
def cuda_emulation():
    """Ops on NumPy arrays run on the CUDA engine (cnn_gpu.cuda.ops), its kernels compiled by g++
    and run on the CPU (tests/emulation); yields the launcher, whose ``log`` lists the launches."""
    import os  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from helpers import load_harness  # noqa: PLC0415

    if os.name != "posix" or shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("the CUDA emulation needs a POSIX system with g++")
    launcher = load_harness().EmulationLauncher(check_order=False, grid_cap=16)
    with cuda.use_launcher(launcher), cnn_gpu.config.override(engine="cuda"):
        yield launcher


def _skip_reason(report) -> str:
    """The reason a test was skipped, as -rs would print it (without its file and line)."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason[len("Skipped: ") :] if reason.startswith("Skipped: ") else reason


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The skipped tests, one line per reason with how many (pytest's -rs prints a line per test:
    hundreds). Each line starts ``SKIPPED N test(s): REASON``; .ci/run's stage 2 greps these lines
    for ``could not import`` (a package it installs must not be missing)."""
    import collections  # noqa: PLC0415

    reports = [r for r in terminalreporter.stats.get("skipped", []) if getattr(r, "longrepr", None) is not None]
    if not reports:
        return
    counts = collections.Counter(_skip_reason(r) for r in reports)
    terminalreporter.section(f"{len(reports)} skipped, for {len(counts)} reason{'s' if len(counts) != 1 else ''}", sep="-")
    for reason, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        terminalreporter.write_line(f"SKIPPED {n} test{'s' if n != 1 else ''}: {reason}")
