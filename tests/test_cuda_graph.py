"""cnn_gpu.cuda.graph.StepGraph through the CuPy stand-in, which models stream capture as CuPy 14
and CUDA do (tests/standin/graph.py: work recorded, not run; replays rewrite the same buffers;
transfers, CuPy's cuBLAS and syncs refused during capture)."""
from __future__ import annotations

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import models, nn, optim
from cnn_gpu.cuda.graph import StepGraph
from cnn_gpu.train import train_step

standin_pkg = pytest.importorskip("standin", reason="tests/standin needs the cupy package installed")
from standin import counting  # noqa: E402


def _trainer(cp, lr=0.05):
    """A lenet5 SGD (momentum, Nesterov) training step on stand-in arrays, and what it updates."""
    with cnn_gpu.use_backend("cupy"):
        cnn_gpu.manual_seed(0)
        model = models.lenet5()
        opt = optim.SGD(model, lr, momentum=0.9, nesterov=True)
        loss_fn = nn.CrossEntropyLoss(validate_range=False)

    def step(x, y):
        loss, _ = train_step(model, loss_fn, opt, x, y)
        return loss

    def state():
        return [a for g in opt.groups for a in (g.data, *g.state.values())]

    def save():
        return opt.step_count

    def restore(count):
        opt.step_count = count

    def advance():
        opt.step_count += 1

    return model, opt, step, dict(state=state, host_state=(save, restore), after_replay=advance)


def _batches(cp, n, size=8):
    rng = np.random.default_rng(1)
    return [(cp.asarray(rng.standard_normal((size, 1, 28, 28)).astype(np.float32)),
             cp.asarray(rng.integers(0, 10, size))) for _ in range(n)]


def test_standin_graph_training_equals_eager_bitwise(standin):
    """Four SGD steps: call 1 eager + capture, calls 2-4 replays (the first checked against an
    eager step); the weights and losses equal an eager run's bit for bit (the same kernels and
    GEMMs in the same order). A replayed call is two input copies and one graph launch: no host
    sync, no upload, no allocation."""
    lines = []
    batches = _batches(standin, 4)
    model_e, opt_e, step_e, _ = _trainer(standin)
    eager = [step_e(x, y).get() for x, y in batches]
    model_g, opt_g, step_g, hooks = _trainer(standin)
    graphed = StepGraph(step_g, name="train step", say=lines.append, **hooks)
    losses = [graphed(*batches[0]).get(), graphed(*batches[1]).get()]
    with counting() as c:
        out = graphed(*batches[2])
    losses += [out.get(), graphed(*batches[3]).get()]
    assert lines == [] and graphed.graph is not None and graphed.replays == 3
    np.testing.assert_array_equal(np.array(losses), np.array(eager))
    for (name, p), (_, q) in zip(model_g.named_parameters(), model_e.named_parameters()):
        np.testing.assert_array_equal(p.data.get(), q.data.get(), err_msg=name)
    assert opt_g.step_count == opt_e.step_count == 4
    assert c.launches.get("graph") == 1 and c.total_syncs == 0 and c.uploads == 0 and c.allocations == 0
    assert c.launches.get("copy", 0) == 2 and sum(c.graph_kernels.values()) > 20, (c.launches, c.graph_kernels)


def test_standin_a_step_that_reads_the_device_runs_eagerly_saying_why(standin):
    """A step with a host read in it cannot be captured: one line says why, every later call runs
    eagerly, and the results are those of eager training."""
    lines = []
    batches = _batches(standin, 3)
    _, _, step_e, _ = _trainer(standin)
    eager = [step_e(x, y).get() for x, y in batches]
    _, _, step_g, hooks = _trainer(standin)

    def syncing(x, y):
        loss = step_g(x, y)
        float(loss)  # a host read: refused during capture
        return loss

    graphed = StepGraph(syncing, name="train step", say=lines.append, **hooks)
    got = [graphed(x, y).get() for x, y in batches]
    np.testing.assert_array_equal(np.array(got), np.array(eager))
    assert graphed.graph is None and len(lines) == 1
    assert lines[0].startswith("cuda graph: train step: capture failed (RuntimeError: the current stream is capturing")
    assert lines[0].endswith("running it eagerly from now on")


def test_standin_a_frozen_launch_scalar_is_caught_by_the_first_replays_check(standin):
    """A learning rate that changes per call but reaches the kernel as a launch scalar is frozen
    into the graph at capture: the first replay's check against an eager step sees the weights
    differ, drops the graph (one line) and keeps the eager result, so training stays right."""
    lines = []
    batches = _batches(standin, 3)
    model_e, opt_e, step_e, _ = _trainer(standin)
    for i, (x, y) in enumerate(batches):
        opt_e.lr = 0.05 / (i + 1)
        step_e(x, y)
    model_g, opt_g, step_g, hooks = _trainer(standin)
    calls = iter(range(3))

    def stage():
        opt_g.lr = 0.05 / (next(calls) + 1)  # what a schedule does, on the host

    graphed = StepGraph(step_g, name="train step", stage=stage, say=lines.append, **hooks)
    for x, y in batches:
        graphed(x, y)
    assert graphed.graph is None and len(lines) == 1 and "its first replay differs from an eager step" in lines[0]
    for (name, p), (_, q) in zip(model_g.named_parameters(), model_e.named_parameters()):
        np.testing.assert_array_equal(p.data.get(), q.data.get(), err_msg=name)


def test_standin_without_the_check_a_frozen_scalar_diverges(standin):
    """The same plant with the check off: graph replays keep the capture's learning rate, so the
    weights differ from eager training (why the check exists, and why per-step values must reach
    the graph through device memory)."""
    batches = _batches(standin, 3)
    model_e, opt_e, step_e, _ = _trainer(standin)
    for i, (x, y) in enumerate(batches):
        opt_e.lr = 0.05 / (i + 1)
        step_e(x, y)
    model_g, opt_g, step_g, hooks = _trainer(standin)
    calls = iter(range(3))
    graphed = StepGraph(step_g, stage=lambda: setattr(opt_g, "lr", 0.05 / (next(calls) + 1)), check=False,
                        say=lambda line: None, **hooks)
    for x, y in batches:
        graphed(x, y)
    assert graphed.graph is not None
    w_g, w_e = model_g.parameters()[0].data.get(), model_e.parameters()[0].data.get()
    assert not np.array_equal(w_g, w_e)


def test_standin_other_shapes_run_eagerly_and_keep_the_graph(standin):
    """A last partial batch runs eagerly; the graph stays for the next full batch."""
    batches = _batches(standin, 3) + _batches(standin, 1, size=5) + _batches(standin, 1)
    _, _, step_e, _ = _trainer(standin)
    eager = [step_e(x, y).get() for x, y in batches]
    _, _, step_g, hooks = _trainer(standin)
    graphed = StepGraph(step_g, say=lambda line: None, **hooks)
    got = [graphed(x, y).get() for x, y in batches]
    np.testing.assert_array_equal(np.array(got), np.array(eager))
    assert graphed.graph is not None and graphed.replays == 3


def test_step_graph_refuses_a_non_callable():
    with pytest.raises(TypeError, match="step: expected a callable"):
        StepGraph(3)
