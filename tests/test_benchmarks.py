"""The benchmark suite runs (a CI-sized smoke run: tiny batches, one repeat) and reports what it
promises: step times with cnn_gpu / torch ratios, per-layer times and peak memory, as a table
or as JSON. No timing is asserted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "suite.py"
STEP_TIME = ROOT / "benchmarks" / "step_time.py"


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _run(script: Path, *args: str) -> str:
    res = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and v > 0


@pytest.fixture(scope="module")
def suite_json():
    out = _run(SUITE, "--models", "lenet5", "vgg_small", "--batch", "2", "--repeat", "1", "--warmup", "0",
               "--block", "1", "--layers", "--memory", "--json")
    return json.loads(out)


def test_suite_json_structure(suite_json):
    r = suite_json
    for key in ("machine", "backend", "threads", "clock", "block", "repeat", "warmup", "compare", "steps", "layers",
                "memory"):
        assert key in r, key
    assert r["backend"] == "numpy"
    assert [(s["model"], s["batch"]) for s in r["steps"]] == [("lenet5", 2), ("vgg_small", 2)]
    compared = r["compare"] == "torch"
    assert compared == _torch_available()
    for s in r["steps"]:
        assert _positive(s["ours_ms"])
        if compared:
            assert _positive(s["torch_ms"]) and _positive(s["ratio"])
            assert s["ratio"] == pytest.approx(s["ours_ms"] / s["torch_ms"])


def test_suite_layers_and_memory(suite_json):
    r = suite_json
    lenet = r["layers"][0]
    assert lenet["model"] == "lenet5" and _positive(lenet["ours_step_ms"])
    names = [row["layer"] for row in lenet["layers"]]
    assert names[0] == "features.0" and names[-1] == "(rest)"
    assert [row["type"] for row in lenet["layers"][:3]] == ["Conv2d", "ReLU", "MaxPool2d"]
    for row in lenet["layers"][:-1]:
        assert row["ours_fwd_ms"] >= 0 and row["ours_bwd_ms"] >= 0
        if r["compare"] == "torch":
            assert row["torch_fwd_ms"] >= 0 and row["torch_bwd_ms"] >= 0
    assert lenet["layers"][0]["ours_fwd_ms"] > 0  # the first convolution was timed
    for m in r["memory"]:
        assert _positive(m["ours_peak_mb"]) and "RSS" in m["measures"]
        if r["compare"] == "torch":
            assert _positive(m["torch_peak_mb"]) and _positive(m["ratio"])


def test_suite_table_and_out_file(tmp_path):
    out_file = tmp_path / "result.json"
    out = _run(SUITE, "--models", "lenet5", "--batch", "2", "--repeat", "1", "--warmup", "0", "--threads", "1",
               "--clock", "cpu", "--out", str(out_file))
    assert "| model | batch | cnn_gpu ms | torch ms | ratio |" in out
    assert "| lenet5 | 2 |" in out
    saved = json.loads(out_file.read_text())
    assert saved["threads"] == 1 and saved["clock"] == "cpu" and len(saved["steps"]) == 1


def test_step_time_keeps_its_cli():
    """scripts/gpu_check.sh calls step_time.py; its flags and output stay."""
    out = _run(STEP_TIME, "--models", "lenet5", "--batch", "2", "--repeat", "1", "--warmup", "0", "--json")
    r = json.loads(out)
    assert set(r) == {"machine", "rows"}
    row = r["rows"][0]
    assert row["model"] == "lenet5" and row["batch"] == 2 and _positive(row["ours_ms"])
    if _torch_available():
        assert _positive(row["ratio"])
    table = _run(STEP_TIME, "--models", "lenet5", "--batch", "2", "--repeat", "1", "--warmup", "0", "--compare", "none")
    assert "| lenet5 | 2 | numpy |" in table


def test_step_time_profile_needs_cupy():
    res = subprocess.run([sys.executable, str(STEP_TIME), "--profile"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert res.returncode == 2 and "--profile needs --backend cupy" in res.stdout


def test_no_torch_comparison_on_the_gpu_without_cuda_torch(monkeypatch):
    """The cupy backend compares with torch only when torch has CUDA (a CPU torch cannot time the GPU)."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_time

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert step_time.torch_comparison("numpy", None) == (True, "")
    cmp, why = step_time.torch_comparison("cupy", None)
    assert not cmp and "no usable CUDA device" in why
    with pytest.raises(SystemExit, match="--compare torch: torch .* has no usable CUDA"):
        step_time.torch_comparison("cupy", "torch")
    assert step_time.torch_comparison("cupy", "none") == (False, "--compare none")


def test_bn_gpu_benchmark_runs_through_the_standin():
    pytest.importorskip("standin", reason="tests/standin needs the cupy package installed")
    """benchmarks/bn_gpu.py (run by scripts/gpu_check.sh on a GPU) runs its code through the CuPy stand-in:
    a row per resnet20 BatchNorm shape with the launcher's segment count (2 for 8x16x32x32: 8192 values
    a channel) and two times; no torch column without a GPU."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bn_gpu.py"), "--standin", "--batch", "8",
                          "--repeat", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = [ln.split("|")[1:-1] for ln in res.stdout.splitlines() if ln.startswith("| 8x")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("8x16x32x32", "2"), ("8x32x16x16", "1"), ("8x64x8x8", "1")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and r[4].strip() == "-" for r in rows)


# ------------------------------------------------------------------ gpu_budget.py --real
GPU_BUDGET = ROOT / "benchmarks" / "gpu_budget.py"


def _gpu_budget_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_budget  # noqa: PLC0415

    return gpu_budget


def _cupy_gpu() -> bool:
    from cnn_gpu.backend import cupy_available  # noqa: PLC0415

    return cupy_available()


@pytest.mark.skipif(_cupy_gpu(), reason="a GPU is usable here: --real runs")
def test_gpu_budget_real_without_a_gpu_says_why_in_one_line():
    res = subprocess.run([sys.executable, str(GPU_BUDGET), "--real", "--models", "lenet5"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    assert res.stdout == "" and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_budget.py --real needs CuPy and an NVIDIA GPU: ")
    from cnn_gpu.backend import _cupy_status  # noqa: PLC0415

    assert lines[0].endswith(_cupy_status()[1])  # why: the backend's own reason


@pytest.fixture(params=[pytest.param("standin", id="standin"),
                        pytest.param("cupy", id="gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
                            not _cupy_gpu(), reason="needs CuPy and a GPU")])])
def budget_cupy(request):
    """(cupy module, spin): the stand-in with a spin that does nothing, or real CuPy with the spin kernel."""
    gb = _gpu_budget_module()
    if request.param == "standin":
        return request.getfixturevalue("standin"), (lambda ms: None)
    import cupy  # noqa: PLC0415

    return cupy, gb.gpu_spinner(cupy)


@pytest.mark.parametrize("spun", [True, False], ids=["spin", "loop-only"])
def test_gpu_budget_real_times_the_counted_step(budget_cupy, spun):
    """The --real timing code: the loop's GPU and host times per step, and, behind the spin, each
    step's dispatch and kernel times; the bound is the larger. Through the stand-in (times
    meaningless) here, on real CuPy in scripts/gpu_check.sh."""
    gb = _gpu_budget_module()
    cp, spin = budget_cupy
    r = gb.real_budget(cp, "lenet5", 4, steps=2, warmup=1, spin=spin if spun else None)
    assert (r["model"], r["batch"], r["steps"]) == ("lenet5", 4, 2)
    for k in ("loop_gpu_ms", "loop_gpu_step_ms_median", "loop_host_ms", "loop_wall_ms"):
        assert _positive(r[k]), k
    assert r["loop_wall_ms"] >= r["loop_host_ms"]
    assert r["bound"] in ("host", "GPU")
    if spun:
        assert _positive(r["dispatch_ms"]) and _positive(r["kernels_ms"]) and r["spin_ms"] > r["dispatch_ms"]
        assert r["bound"] == ("host" if r["dispatch_ms"] > r["kernels_ms"] else "GPU")
    else:
        assert "kernels_ms" not in r
    line = gb.real_line(r)
    assert line.startswith("lenet5 batch 4: ") and line.endswith(f"bound by the {r['bound']}")
    assert ("dispatch" in line) == spun


def test_gpu_budget_real_cli_through_the_standin(standin, capsys):
    """`--real` end to end (parsing, the rows, --json) through the stand-in, which has no spin kernel
    (no RawKernel): the loop timing alone, saying why."""
    gb = _gpu_budget_module()
    argv = ["--real", "--standin", "--models", "lenet5", "--steps", "1", "--warmup", "1"]
    assert gb.main(argv + ["--batch", "2", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["device"].startswith("the CuPy stand-in") and r["spin"] is False and r["no_spin_why"]
    assert [(row["model"], row["batch"]) for row in r["rows"]] == [("lenet5", 2), ("lenet5", 3)]
    assert gb.main(argv + ["--batch", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# one training step timed on the CuPy stand-in") and out[1].startswith("# no spin kernel")
    assert [ln.split(":")[0] for ln in out[2:]] == ["lenet5 batch 2"]
