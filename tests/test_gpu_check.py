"""scripts/gpu_check.sh, the one command run when a GPU is lent (for a few minutes, once): it keeps to
its 8-minute budget, runs its sections in order of importance (tests before timings), every command
it runs parses, its synthetic data load as the real sets do, and it leaves at most 8 files, with
plain names, under $OUT. No GPU needed: the script's dry run lists its sections, and a run with a
tiny budget shows the deadline at work."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
BUDGET = 480  # seconds: what a lent GPU leaves for the script
pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout"
)


def _decode(quoted: str) -> list[str]:
    """The arguments of a command line the script printed with printf %q (bash decodes its own quoting)."""
    res = subprocess.run(
        ["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "decode", quoted], capture_output=True, text=True, check=True
    )
    return res.stdout.split("\0")[:-1]


def _sections(tmp_path) -> list[dict]:
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(tmp_path / "out"), "PYTHON": "python3"}
    env.pop("GPU_CHECK_BUDGET", None)
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    rows = []
    for line in res.stdout.splitlines():
        tag, limit, log, fmt, title, cmd = line.split("\t")
        assert tag == "SECTION"
        rows.append({"limit": int(limit), "log": log, "format": fmt, "title": title, "argv": _decode(cmd)})
    return rows


@pytest.fixture(scope="module")
def sections(tmp_path_factory):
    return _sections(tmp_path_factory.mktemp("dry"))


def _kind(argv: list[str]) -> str:
    if argv[0] != "python3":
        return argv[0]
    if argv[1] == "-m":
        return f"{argv[2]} {argv[3]}" if argv[2] == "cnn_gpu" else argv[2]
    return "python -c" if argv[1] == "-c" else argv[1]


def test_budget_is_8_minutes_and_the_limits_fit_it(sections):
    text = SCRIPT.read_text()
    assert re.search(r'^BUDGET="\$\{GPU_CHECK_BUDGET:-(\d+)\}"', text, re.M).group(1) == str(BUDGET)
    assert all(s["limit"] > 0 for s in sections)
    assert sum(s["limit"] for s in sections) <= BUDGET, [(s["title"], s["limit"]) for s in sections]


def test_sections_in_order_of_importance(sections):
    """Correctness first (the GPU tests, then the training runs), then speed against torch, then the
    dispatch/kernel split, then the BatchNorm kernels."""
    kinds = [_kind(s["argv"]) for s in sections]
    first = {k: kinds.index(k) for k in dict.fromkeys(kinds)}
    assert (
        first["pytest"]
        < first["cnn_gpu train"]
        < first["benchmarks/step_time.py"]
        < first["benchmarks/gpu_budget.py"]
        < first["benchmarks/bn_gpu.py"]
    )
    benchmarks = [i for i, k in enumerate(kinds) if k.startswith("benchmarks/")]
    correctness = [i for i, k in enumerate(kinds) if k in ("pytest", "cnn_gpu train", "cnn_gpu info")]
    assert max(correctness) < min(benchmarks)
    tests = [s["argv"] for s in sections if _kind(s["argv"]) == "pytest"]
    assert all("-m" in a and a[a.index("-m", 2) + 1] == "gpu" for a in tests)
    # the training, stand-in and --real tests first; the rest of the suite without them (no test twice)
    first_files = [a for a in tests[0] if a.startswith("tests/")]
    assert first_files[:2] == ["tests/test_gpu_training.py", "tests/test_standin.py"]
    assert all((ROOT / f).is_file() for f in first_files)
    assert "tests" in tests[1] and {f"--ignore={f}" for f in first_files} <= set(tests[1])
    real = next(s["argv"] for s in sections if _kind(s["argv"]) == "benchmarks/gpu_budget.py")
    assert "--real" in real


def test_every_command_parses(sections):
    """Each benchmark's flags parse with that script's own argparse; `cnn-gpu train` with the CLI's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cnn_gpu import cli  # noqa: PLC0415

    checked = set()
    graph_runs = []  # (dataset, --cuda-graph) of each training run
    for s in sections:
        argv, kind = s["argv"], _kind(s["argv"])
        if kind.startswith("benchmarks/"):
            mod = importlib.import_module(Path(kind).stem)
            args = mod.build_parser().parse_args(argv[2:])
            checked.add(kind)
            if kind == "benchmarks/step_time.py":
                assert args.backend == "cupy" and args.compare != "none"
                assert args.models == ["lenet5", "vgg_small", "resnet20"] and args.batch == [128, 512]
                assert args.cuda_graph == "both"  # cnn_gpu's step as one CUDA graph and eagerly, against torch
            if kind == "benchmarks/gpu_budget.py":
                assert args.real and args.steps >= 5 and args.cuda_graph == "on"
            if kind == "benchmarks/precision_time.py":  # fp32, tf32, fp16 against torch's (docs/PRECISION.md)
                assert args.models and args.batch and args.repeat >= 5
            if kind == "benchmarks/precision_accuracy.py":  # fp16's accuracy against fp32's, on the GPU
                assert not args.standin and args.dataset == "digits" and len(args.seeds) >= 3
        elif kind == "cnn_gpu train":
            args = cli.build_parser().parse_args(argv[3:])
            assert args.backend == "cupy" and args.epochs == 1 and args.dataset in ("mnist", "cifar10")
            graph_runs.append((args.dataset, args.cuda_graph))
            checked.add(kind)
        elif kind == "cnn_gpu info":
            cli.build_parser().parse_args(argv[3:])
    assert checked == {
        "benchmarks/step_time.py",
        "benchmarks/precision_time.py",
        "benchmarks/precision_accuracy.py",
        "benchmarks/gpu_budget.py",
        "benchmarks/bn_gpu.py",
        "cnn_gpu train",
    }
    # one run with the training step as one CUDA graph and one without, on the same data
    assert ("mnist", "on") in graph_runs and ("mnist", "off") in graph_runs, graph_runs


def test_output_files_at_most_8_with_plain_names(sections):
    text = SCRIPT.read_text()
    report = re.search(r'^REPORT="\$OUT/([^"]+)"', text, re.M).group(1)
    files = {report} | {s["log"] for s in sections}
    assert len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert all(s["format"] in ("all", "tail", "md") for s in sections)
    # nothing else goes under $OUT: data and run folders go to a scratch folder
    assert '--run-dir "$SCRATCH/' in text and '"$SCRATCH/data"' in text


def test_synthetic_data_load_as_the_real_sets_and_are_learnable(sections, tmp_path):
    """The training section's data: MNIST's IDX files and CIFAR-10's batches folder at full size, found
    and verified (structurally) by cnn_gpu's loaders; a nearest-mean classifier on the raw pixels already
    separates the classes, so a training run must reach ~100% test accuracy."""
    from cnn_gpu.data import get_dataset  # noqa: PLC0415

    make = next(s["argv"] for s in sections if _kind(s["argv"]) == "python -c")
    res = subprocess.run([sys.executable, "-c", make[2], str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for name, shape in (("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))):
        ds = get_dataset(name, tmp_path)
        assert ds.x_train.shape == (50000 if name == "cifar10" else 60000,) + shape and ds.x_train.dtype == np.uint8
        assert ds.x_test.shape == (10000,) + shape and set(np.unique(ds.y_train)) == set(range(10))
        xtr = ds.x_train[:5000].reshape(5000, -1).astype(np.float32)
        means = np.stack([xtr[ds.y_train[:5000] == k].mean(0) for k in range(10)])
        xte = ds.x_test[:2000].reshape(2000, -1).astype(np.float32)
        pred = ((means**2).sum(1) - 2 * xte @ means.T).argmin(1)  # the nearest mean
        assert (pred == ds.y_test[:2000]).mean() > 0.95, name


def test_train_runs_check_their_accuracy(sections):
    text = SCRIPT.read_text()
    runs = re.findall(r"^train_run (\d+) (\d+) ", text, re.M)
    assert len(runs) == sum(_kind(s["argv"]) == "cnn_gpu train" for s in sections) >= 1
    assert all(50 <= int(acc) <= 100 for _, acc in runs)


def test_the_deadline_holds_and_finished_sections_stay_on_disk(sections, tmp_path):
    """With a 20 s budget (the real one is 480 s) and a test run that hangs: the hanging section gets
    SIGINT at its limit (what is left of the budget), the sections after it are not run, the script
    ends by the deadline, every section is in the report, what ran before is on disk, and $OUT holds
    the report and logs only. Without a GPU here, nvidia-smi and the GPU sections fail: exit 1."""
    out = tmp_path / "out"
    python = tmp_path / "python"  # this interpreter, except that a pytest run hangs until SIGINT
    python.write_text(f"""#!/usr/bin/env bash
if [ "$1 $2" = "-m pytest" ]; then
    trap 'kill $!; echo "interrupted by SIGINT"; exit 130' INT
    echo "a test run that hangs"
    sleep 1000 & wait
fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    env = {**os.environ, "OUT": str(out), "PYTHON": str(python), "GPU_CHECK_BUDGET": "20"}
    env.pop("GPU_CHECK_DRY_RUN", None)
    t = time.monotonic()
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    took = time.monotonic() - t
    assert 12 < took < 20 + 5, took  # the budget, plus start-up and the scratch folder's removal
    assert res.returncode == 1
    report = (out / "gpu-results.md").read_text()
    titles = [ln[3:] for ln in report.splitlines() if ln.startswith("## ")]
    assert titles == [s["title"] for s in sections] + ["Summary"]
    assert "(exit 0 after" in report  # cnn-gpu info ran to its end
    assert re.search(r"\(TIMED OUT \(exit 124\) after \d+ s; limit \d+ s\)", report)  # (how long: the machine's pace)
    assert report.count("Not run: the 20 s budget is spent.") == len(sections) - 3
    log = (out / "pytest-gpu.log").read_text()
    assert "a test run that hangs" in log and "interrupted by SIGINT" in log
    assert "cnn_gpu" in (out / "env.log").read_text()
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
