"""The built wheel ships the CUDA sources, and the loader finds them in an installed copy."""

import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _installed_setuptools_builds_wheels() -> bool:
    """Whether the installed setuptools can build this project's wheel without downloading:
    setuptools >= 64 (pyproject's build requirement) with a bdist_wheel command, which setuptools
    ships from 70.1 on and older ones get from the ``wheel`` package (a fresh Python 3.11 venv has
    setuptools 65 without ``wheel``: building there must use pip's isolated build instead)."""
    try:
        from importlib.metadata import version

        parts = tuple(int(p) for p in re.findall(r"\d+", version("setuptools"))[:2])
    except Exception:  # noqa: BLE001 - not installed, or an unreadable version
        return False
    if parts < (64,):
        return False
    return parts >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)]
    if _installed_setuptools_builds_wheels():
        cmd.insert(4, "--no-build-isolation")  # use the installed setuptools: no download
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    (path,) = out.glob("cnn_gpu-*.whl")
    return path


def test_wheel_contains_every_kernel_source_and_subpackage(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in sorted((ROOT / "kernels").glob("*.cu")) + sorted((ROOT / "kernels").glob("*.cuh")):
        assert f"cnn_gpu/kernels/{src.name}" in names, f"{src.name} missing from the wheel"
    # every subpackage of the source tree is in the explicit package list of pyproject.toml
    for init in (ROOT / "cnn_gpu").rglob("__init__.py"):
        rel = init.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} missing from the wheel: add its package to pyproject.toml"
    assert "cnn_gpu/py.typed" in names, "py.typed missing from the wheel: the package's annotations (PEP 561)"


def test_installed_wheel_finds_its_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CNN_GPU_KERNELS_DIR")}
    env["PYTHONPATH"] = str(target)
    code = "from cnn_gpu import cuda; print(cuda.kernel_dir()); print(sorted(cuda.kernel_sources()))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    kdir, names = r.stdout.splitlines()
    assert Path(kdir).resolve() == (target / "cnn_gpu" / "kernels").resolve()
    assert set(eval(names)) == {p.stem for p in (ROOT / "kernels").glob("*.cu")}


def test_gpu_extras_bring_the_cuda_libraries():
    """[cuda12]/[cuda13] install CuPy with its CUDA toolkit libraries (CuPy's ctk extra, which
    CuPy >= 14 has), so a driver-only machine can compile cnn_gpu's kernels."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cuda12"] == ["cupy-cuda12x[ctk]>=14"] and extras["cuda13"] == ["cupy-cuda13x[ctk]>=14"]
    for cuda in ("12", "13"):  # the multi-GPU install: the same CuPy, mpi4py, and the NCCL of that CUDA
        names = [r.split("[")[0].split(">")[0].split("<")[0] for r in extras[f"cuda{cuda}-mpi"]]
        assert names == [f"cupy-cuda{cuda}x", "mpi4py", f"nvidia-nccl-cu{cuda}"], names
        assert extras[f"cuda{cuda}-mpi"][0] == extras[f"cuda{cuda}"][0]
