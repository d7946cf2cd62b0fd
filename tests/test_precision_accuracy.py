"""float16 training reaches float32's accuracy (issue 24), through the CuPy stand-in: every kernel
of the fp16 path (float16 storage, float32 sums, master weights, loss scaling) runs in the g++
emulation of the CUDA code, so these are the numbers the GPU would give, up to the GEMMs' order of
summation. benchmarks/precision_accuracy.py runs `cnn-gpu train` in fp32 and in fp16 with the same
recipe, seeds and data, two runs at a time.

One run's test accuracy moves with its trajectory: a different seed, or float16's rounding, puts a
few of the digits' 359 test images on the other side of a boundary (measured: fp16 - fp32 from
-1.11 to +0.84 points over 8 single seeds, -0.24 on their mean; docs/PRECISION.md), so the verdict
is on the mean over three seeds, within the 0.5 points the issue asks. Both tests are long
(minutes): stage 2 of CI runs them (they need the stand-in's cupy), stage 1 skips them.

Every test has "standin" in its id (``pytest -k standin``)."""

from __future__ import annotations

import importlib.util
import os
import statistics
from pathlib import Path

import pytest

pytest.importorskip("standin", reason="tests/standin needs the cupy package installed")

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path(os.environ.get("CNN_GPU_REAL_DATA", "/usr/share/datasets"))
SEEDS = [0, 1, 2]


def _bench():
    spec = importlib.util.spec_from_file_location("precision_accuracy", ROOT / "benchmarks" / "precision_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check(result: dict, floor: float) -> None:
    """Every run learned (test accuracy above ``floor``), and fp16's mean is within 0.5 points."""
    table, ok = _bench().report(result, SEEDS)
    assert all(a > floor for runs in result.values() for a in runs), table
    assert abs(statistics.fmean(result["fp16"]) - statistics.fmean(result["fp32"])) <= 0.5, table
    assert ok  # (the benchmark's own verdict agrees)


@pytest.mark.slow
def test_standin_fp16_reaches_fp32_accuracy_on_the_digits(tmp_path):
    """lenet_digits on the bundled digits, their whole recipe (Adam 3e-3, one-cycle, 20 epochs, 820
    steps): fp16's test accuracy within 0.5 points of fp32's on the mean of 3 seeds."""
    result = _bench().compare(["--dataset", "digits"], SEEDS, tmp_path, standin=True)
    _check(result, floor=95.0)


@pytest.mark.slow
@pytest.mark.skipif(
    not (FASHION / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not on this machine ({FASHION}/fashion-mnist: install Debian's dataset-fashion-mnist "
    "or set CNN_GPU_REAL_DATA)",
)
def test_standin_fp16_reaches_fp32_accuracy_on_real_fashion_mnist(tmp_path):
    """lenet5 on a subset of the real Fashion-MNIST (the first 6,000 training and 2,000 test
    images), 2 epochs of the recipe for one's own data (Adam 2e-3, one-cycle, batch 64): fp16's test
    accuracy within 0.5 points of fp32's on the mean of 3 seeds."""
    bench = _bench()
    npz = bench.fashion_subset(str(FASHION), 6000, 2000, tmp_path / "fashion_subset.npz")
    result = bench.compare(["--data", str(npz), *bench.FASHION_RECIPE, "--epochs", "2"], SEEDS, tmp_path, standin=True)
    _check(result, floor=70.0)


def test_standin_precision_accuracy_report_means_and_verdict():
    """The benchmark's table: one row per seed with fp16 - fp32, the means, and the verdict on the
    mean (within 0.5 points: a -0.6 seed is fine when the mean is within; a mean 0.51 apart is not)."""
    bench = _bench()
    table, ok = bench.report({"fp32": [98.0, 97.0, 98.5], "fp16": [97.4, 97.5, 98.3]}, SEEDS)
    assert ok and "| 0 | 98.00% | 97.40% | -0.60 |" in table and "| mean | 97.83% | 97.73% | -0.10 |" in table
    assert table.splitlines()[-1] == "fp16 within 0.5 points of fp32 on the mean of 3 seed(s)"
    table, ok = bench.report({"fp32": [98.0, 98.0, 98.0], "fp16": [97.49, 97.49, 97.49]}, SEEDS)
    assert not ok and table.splitlines()[-1].startswith("fp16 NOT within 0.5 points")
    with pytest.raises(RuntimeError, match=r"^run fp32_seed0 failed \(2\): .*--epochs"):
        bench.run_one(["--epochs", "-1"], ROOT / "nonexistent" / "fp32_seed0", standin=True)
