"""The benchmark suite runs (a CI-sized smoke run: tiny batches, one repeat) and reports what it
promises: step times with cnn_gpu / torch ratios, per-layer times and peak memory, as a table
or as JSON. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    out = _run(
        SUITE,
        "--models",
        "lenet5",
        "vgg_small",
        "--batch",
        "2",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--block",
        "1",
        "--layers",
        "--memory",
        "--json",
    )
    return json.loads(out)


def test_suite_json_structure(suite_json):
    r = suite_json
    for key in ("machine", "backend", "threads", "clock", "block", "repeat", "warmup", "compare", "steps", "layers", "memory"):
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
    out = _run(
        SUITE,
        "--models",
        "lenet5",
        "--batch",
        "2",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--clock",
        "cpu",
        "--out",
        str(out_file),
    )
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
    res = subprocess.run([sys.executable, str(STEP_TIME), "--profile"], capture_output=True, text=True, timeout=60, cwd=ROOT)
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
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bn_gpu.py"), "--standin", "--batch", "8", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
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
    res = subprocess.run(
        [sys.executable, str(GPU_BUDGET), "--real", "--models", "lenet5"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert res.returncode == 2, res.stderr
    assert res.stdout == "" and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_budget.py --real needs CuPy and an NVIDIA GPU: ")
    from cnn_gpu.backend import _cupy_status  # noqa: PLC0415

    assert lines[0].endswith(_cupy_status()[1])  # why: the backend's own reason


@pytest.fixture(
    params=[
        pytest.param("standin", id="standin"),
        pytest.param(
            "cupy", id="gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(not _cupy_gpu(), reason="needs CuPy and a GPU")]
        ),
    ]
)
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
    assert r["graph"] == "on" and r["graph_said"] == [] and r["graph_warmup"] == 2  # capture + checked replay
    for p in ("", "graph_"):  # the eager step, then the same step as one CUDA graph
        for k in ("loop_gpu_ms", "loop_gpu_step_ms_median", "loop_host_ms", "loop_wall_ms"):
            assert _positive(r[p + k]), p + k
        assert r[p + "loop_wall_ms"] >= r[p + "loop_host_ms"]
        assert r[p + "bound"] in ("host", "GPU")
        if spun:
            assert _positive(r[p + "dispatch_ms"]) and _positive(r[p + "kernels_ms"])
            assert r[p + "spin_ms"] > r[p + "dispatch_ms"]
            assert r[p + "bound"] == ("host" if r[p + "dispatch_ms"] > r[p + "kernels_ms"] else "GPU")
        else:
            assert p + "kernels_ms" not in r
    line, graph_line = gb.real_line(r), gb.real_line(r, graph=True)
    assert line.startswith("lenet5 batch 4: ") and line.endswith(f"bound by the {r['bound']}")
    assert graph_line.startswith("lenet5 batch 4, CUDA graph: ")
    assert graph_line.endswith(f"bound by the {r['graph_bound']}")
    assert ("dispatch" in line) == spun and ("dispatch" in graph_line) == spun
    eager_only = gb.real_budget(cp, "lenet5", 4, steps=1, warmup=1, cuda_graph=False)
    assert not [k for k in eager_only if k.startswith("graph")]


def test_gpu_budget_real_cli_through_the_standin(standin, capsys):
    """`--real` end to end (parsing, the rows, --json) through the stand-in, which has no spin kernel
    (no RawKernel): the loop timing alone, saying why."""
    gb = _gpu_budget_module()
    argv = ["--real", "--standin", "--models", "lenet5", "--steps", "1", "--warmup", "1"]
    assert gb.main(argv + ["--batch", "2", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["device"].startswith("the CuPy stand-in") and r["spin"] is False and r["no_spin_why"]
    assert [(row["model"], row["batch"]) for row in r["rows"]] == [("lenet5", 2), ("lenet5", 3)]
    assert all(row["graph"] == "on" and _positive(row["graph_loop_gpu_ms"]) for row in r["rows"])
    assert gb.main(argv + ["--batch", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# one training step timed on the CuPy stand-in") and out[1].startswith("# no spin kernel")
    assert out[0].endswith("; eagerly, then as one CUDA graph")
    assert [ln.split(":")[0] for ln in out[2:]] == ["lenet5 batch 2", "lenet5 batch 2, CUDA graph"]
    assert gb.main(argv + ["--batch", "2", "--cuda-graph", "off"]) == 0
    assert [ln.split(":")[0] for ln in capsys.readouterr().out.splitlines()[2:]] == ["lenet5 batch 2"]


# ------------------------------------------------------------------ gpu_budget.py: the CUDA-graph step
def _counting():
    from standin import counting  # noqa: PLC0415

    return counting


def test_gpu_budget_graph_line_through_the_standin(standin):
    """The training step as one CUDA graph (training_graph, as fit builds it), counted at its third
    call: 1 graph launch with the eager step's launches inside (K > 20 for lenet5), the batch's two
    copies into the static inputs outside it, 0 host syncs, the staged scalars as the only upload
    (SGD: lr, one float64), no allocation; and far fewer Python calls into cnn_gpu than the eager step."""
    from cnn_gpu.cuda.scalars import LAYOUTS  # noqa: PLC0415

    gb = _gpu_budget_module()
    host_e, host_g = {}, {}
    c = gb.step_budget(standin, _counting(), "lenet5", 8, host=host_e)
    g = gb.graph_budget(standin, _counting(), "lenet5", 8, host=host_g)
    assert host_g["graph"] == "on" and host_g["said"] == []
    assert g.launches["graph"] == 1 and dict(g.launches) == {"graph": 1, "copy": 2}
    assert g.total_graph_kernels == c.total_launches > 20  # the eager step's launches, inside the graph
    assert g.graph_kernels == c.launches
    dtype, names = LAYOUTS["sgd_update_"]
    assert (g.uploads, g.upload_bytes) == (1, dtype.itemsize * len(names)) == (1, 8)
    assert g.total_syncs == 0 and g.allocations == 0 and g.download_bytes == 0
    assert 0 < host_g["cnn_gpu"] < host_e["cnn_gpu"] / 10, (host_g, host_e)
    assert host_g["cnn_gpu"] < host_g["python"] and host_e["cnn_gpu"] < host_e["python"]
    line = gb.graph_line("lenet5", 8, g, host_g["cnn_gpu"], host_e["cnn_gpu"], host_g["graph"])
    assert line == (
        f"lenet5 batch 8, CUDA graph: 1 graph launch ({c.total_launches} kernels inside) + 2 launches "
        f"outside it (copy 2), 0 host syncs, 8 bytes uploaded, {host_g['cnn_gpu']} host calls per "
        f"training step (eager: {host_e['cnn_gpu']})"
    )


def test_gpu_budget_host_calls_counts_calls_into_cnn_gpu():
    """host_calls: the Python calls into cnn_gpu's functions during fn() (not fn itself), and all calls."""
    gb = _gpu_budget_module()
    from cnn_gpu import functional  # noqa: PLC0415

    def helper():
        return 1

    calls = gb.host_calls(lambda: (helper(), functional.check_label_smoothing(0.0)))
    assert calls["cnn_gpu"] >= 1 and calls["python"] >= calls["cnn_gpu"] + 1  # helper is not cnn_gpu's
    assert gb.host_calls(lambda: helper()) == {"cnn_gpu": 0, "python": 1}


def test_gpu_budget_cli_counts_eager_and_graph(standin, capsys):
    """The counting mode end to end: the eager lines as before, then the graph's line; --json has both."""
    gb = _gpu_budget_module()
    argv = ["--models", "lenet5", "--batch", "4", "--epoch-steps", "1"]
    assert gb.main(argv + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)["lenet5"]
    assert r["graph"]["state"] == "on" and r["graph"]["step"]["launches"] == {"graph": 1, "copy": 2}
    assert r["graph"]["step"]["total_graph_kernels"] == r["step"]["total_launches"]
    assert r["graph"]["step"]["total_syncs"] == 0 and r["graph"]["step"]["upload_bytes"] == 8
    assert r["graph"]["host_calls"]["cnn_gpu"] < r["host_calls"]["cnn_gpu"]
    assert gb.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("lenet5 batch 4: ") and out[0].endswith(" per training step")
    assert out[3].startswith("  host calls: ")
    assert out[4].startswith("lenet5 batch 4, CUDA graph: 1 graph launch (")
    assert "0 host syncs, 8 bytes uploaded" in out[4]
    assert any(ln.startswith("lenet5 batch 4: ") and "per fit epoch of 1 steps" in ln for ln in out)
    assert gb.main(argv + ["--cuda-graph", "off"]) == 0
    assert "CUDA graph" not in capsys.readouterr().out


# ------------------------------------------------------------------ the stand-in's null compute
def _lenet5_step(cp, batch=4):
    import cnn_gpu  # noqa: PLC0415
    from cnn_gpu import models, nn, optim  # noqa: PLC0415
    from cnn_gpu.train import train_step  # noqa: PLC0415

    with cnn_gpu.use_backend("cupy"):
        cnn_gpu.manual_seed(0)
        model = models.lenet5()
        opt = optim.SGD(model, 0.05, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32))
    y = cp.asarray(rng.integers(0, 10, batch))
    return model, opt, loss_fn, x, y, lambda: train_step(model, loss_fn, opt, x, y)


def test_null_compute_runs_a_step_and_counts_the_same_launches(standin):
    """Under standin.null_compute a training step runs, issues and counts exactly what it does with
    compute (launches by kind, kernels, syncs, uploads, allocations, copies), computes nothing for
    lack of a shape rule, and changes no value (the update's kernel did not run)."""
    from standin import counting, null_compute  # noqa: PLC0415

    model, opt, loss_fn, x, y, step = _lenet5_step(standin)
    step()  # warm-up: kernels built, lazy buffers made
    with counting() as real:
        step()
    weights = [p.data.get() for p in model.parameters()]
    with null_compute() as computed, counting() as null:
        loss, logits = step()
    assert null.summary() == real.summary() and null.total_launches > 20
    assert computed == {} and loss.shape == () and logits.shape == (4, 10) and logits.dtype == np.float32
    for w, p in zip(weights, model.parameters()):
        np.testing.assert_array_equal(p.data.get(), w)  # skipped: sgd_update did not run


def test_null_compute_graph_replay_counts_the_same_and_runs_nothing(standin):
    """A CUDA-graph step replayed under null compute: the same counts as a replay that computes
    (1 graph launch, its kernels inside, the copies, the staged upload), and no recorded work runs."""
    from standin import counting, null_compute  # noqa: PLC0415
    from step_time import training_graph_step  # noqa: PLC0415

    _gpu_budget_module()  # benchmarks/ on sys.path
    model, opt, loss_fn, x, y, _ = _lenet5_step(standin)
    graphed = training_graph_step(model, loss_fn, opt, say=lambda line: pytest.fail(line))
    graphed(x, y)
    graphed(x, y)
    with counting() as real:
        graphed(x, y)
    weights = [p.data.get() for p in model.parameters()]
    with null_compute() as computed, counting() as null:
        graphed(x, y)
    assert null.summary() == real.summary() and null.launches["graph"] == 1 and null.total_graph_kernels > 20
    assert computed == {}
    for w, p in zip(weights, model.parameters()):
        np.testing.assert_array_equal(p.data.get(), w)
    graphed.close()


def test_null_compute_shapes_of_cupy_ops(standin):
    """CuPy's elementwise, reduction, copy and product ops give results of the right shape and dtype,
    counted as with compute, without computing; outside the block they compute again."""
    from standin import counting, null_compute  # noqa: PLC0415

    cp = standin
    a = cp.asarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    b = cp.asarray(np.ones((3, 4), np.float64))
    i = cp.asarray(np.arange(4, dtype=np.int32))

    def ops():
        return [
            a + b,
            a * 2,
            a > 1,
            i + 1,
            cp.exp(a),
            a.sum(axis=1),
            cp.sum(a, axis=(0, 2), keepdims=True),
            a.max(),
            cp.argmax(a, axis=-1),
            a.mean(axis=0),
            a.copy(),
            a.astype(np.float16),
            cp.matmul(a, cp.asarray(np.ones((4, 5), np.float32))),
            cp.cumsum(a),
            a.reshape(6, 4),
        ]

    with counting() as real:
        expected = ops()
    with null_compute() as computed, counting() as null:
        got = ops()
    assert computed == {} and null.summary() == real.summary()
    assert [(r.shape, r.dtype) for r in got] == [(e.shape, e.dtype) for e in expected]
    np.testing.assert_array_equal((a + 1).get(), np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 1)


def test_null_compute_resnet20_step_has_a_shape_rule_for_every_op(standin):
    """resnet20 (BatchNorm, residual sums: CuPy elementwise adds in the step) under null compute: the
    same launches as with compute and nothing computed for lack of a shape rule."""
    from standin import counting, null_compute  # noqa: PLC0415

    import cnn_gpu  # noqa: PLC0415
    from cnn_gpu import models, nn, optim  # noqa: PLC0415
    from cnn_gpu.train import train_step  # noqa: PLC0415

    with cnn_gpu.use_backend("cupy"):
        model = models.resnet20(in_channels=1, generator=np.random.default_rng(0))
        opt = optim.SGD(model, 0.05, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
    x = standin.asarray(np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32))
    y = standin.asarray(np.array([1, 3]))
    with null_compute():
        train_step(model, loss_fn, opt, x, y)  # warm-up (kernels built, lazy buffers made), at no cost
    with counting() as real:
        train_step(model, loss_fn, opt, x, y)
    with null_compute() as computed, counting() as null:
        train_step(model, loss_fn, opt, x, y)
    assert null.summary() == real.summary() and real.launches["elementwise"] > 0
    assert computed == {}


# ------------------------------------------------------------------ gpu_budget.py --host-time
def test_gpu_budget_host_time_through_the_standin(standin):
    """host_time: eager and CUDA-graph steps timed under null compute; the graph is on, each step's
    launches are the counted ones (the graph's: 2 copies and 1 graph launch with the eager step's
    launches inside), nothing computed, the graph's host calls far fewer than the eager step's (no
    timing is asserted)."""
    gb = _gpu_budget_module()
    r = gb.host_time(standin, "lenet5", 8, steps=2, runs=2)
    assert (r["model"], r["batch"], r["steps"], r["runs"]) == ("lenet5", 8, 2, 2)
    assert r["graph"] == "on" and r["graph_said"] == [] and r["computed"] == {}
    assert _positive(r["eager_ms"]) and _positive(r["graph_ms"]) and len(r["eager_runs_ms"]) == 2
    assert r["graph_launches"] == 3 and r["graph_kernels_inside"] == r["eager_launches"] > 20
    assert r["graph_host_calls"]["cnn_gpu"] < r["eager_host_calls"]["cnn_gpu"] / 10
    assert 0 < r["eager_cnn_gpu_share"] < 1 and 0 < r["graph_cnn_gpu_share"] < 1
    assert r["speedup"] == pytest.approx(r["eager_ms"] / r["graph_ms"])
    assert gb.host_time_row(r).startswith("| lenet5 | 8 | ")


def test_gpu_budget_host_time_cli(standin, capsys):
    gb = _gpu_budget_module()
    argv = ["--host-time", "--models", "lenet5", "--batch", "4", "--steps", "1", "--runs", "1"]
    assert gb.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# host time per training step with null-cost launches") and "cores" in out[0]
    assert "not CuPy's" in out[1] and out[2] == gb.HOST_TIME_HEADER
    assert out[4].startswith("| lenet5 | 4 | ") and len(out) == 5
    assert gb.main(argv + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["steps"] == 1 and r["runs"] == 1 and [row["model"] for row in r["rows"]] == ["lenet5"]
    assert gb.build_parser().parse_args(["--host-time"]).models is None  # main: lenet5 vgg_small resnet20
    with pytest.raises(SystemExit):
        gb.build_parser().parse_args(["--host-time", "--real"])


# ------------------------------------------------------------------ step_time.py --cuda-graph
def test_step_time_cuda_graph_through_the_standin(standin, capsys):
    """step_time.py --backend cupy --cuda-graph both: the eager and the CUDA-graph step timed in one run
    (their own columns); on: the graph's only; the NumPy backend refuses it."""
    _gpu_budget_module()  # benchmarks/ on sys.path
    import step_time  # noqa: PLC0415

    r = step_time.bench_step("lenet5", 4, "cupy", False, 1, 0, cuda_graph="both")
    assert r["graph"] == "on" and _positive(r["ours_ms"]) and _positive(r["graph_ms"])
    assert "ratio" not in r and "graph_ratio" not in r  # no torch here
    argv = ["--backend", "cupy", "--models", "lenet5", "--batch", "4", "--repeat", "1", "--warmup", "0", "--compare", "none"]
    assert step_time.main(argv + ["--cuda-graph", "both"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "| model | batch | backend | cnn_gpu ms | cnn_gpu graph ms | torch ms | ratio | graph ratio |"
    assert out[3].startswith("| lenet5 | 4 | cupy | ") and out[3].endswith(" | - | - | - |")
    assert step_time.main(argv + ["--cuda-graph", "on", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["graph"] == "on" and _positive(row["graph_ms"]) and "ours_ms" not in row
    with pytest.raises(ValueError, match="CUDA graphs need the cupy backend"):
        step_time.bench_step("lenet5", 2, "numpy", False, 1, 0, cuda_graph="on")


def test_step_time_cuda_graph_needs_the_cupy_backend():
    res = subprocess.run(
        [sys.executable, str(STEP_TIME), "--cuda-graph", "both"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert res.returncode == 2 and "--cuda-graph both needs --backend cupy" in res.stdout
