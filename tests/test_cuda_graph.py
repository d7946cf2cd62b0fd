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
    return [
        (cp.asarray(rng.standard_normal((size, 1, 28, 28)).astype(np.float32)), cp.asarray(rng.integers(0, 10, size)))
        for _ in range(n)
    ]


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


def _frozen_lr_plant(cp, check):
    """Eager training with a learning rate that falls per step, and the same training through a
    StepGraph whose stage() sets the lr on the host (a launch scalar: frozen at capture)."""
    batches = _batches(cp, 3)
    model_e, opt_e, step_e, _ = _trainer(cp)
    for i, (x, y) in enumerate(batches):
        opt_e.lr = 0.05 / (i + 1)
        step_e(x, y)
    model_g, opt_g, step_g, hooks = _trainer(cp)
    calls, lines = iter(range(3)), []
    graphed = StepGraph(
        step_g,
        name="train step",
        stage=lambda: setattr(opt_g, "lr", 0.05 / (next(calls) + 1)),
        check=check,
        say=lines.append,
        **hooks,
    )
    for x, y in batches:
        graphed(x, y)
    return graphed, lines, model_g, model_e


def test_standin_a_frozen_launch_scalar_is_caught_by_the_first_replays_check(standin):
    """A learning rate that changes per call but reaches the kernel as a launch scalar is frozen
    into the graph at capture: the first replay's check against an eager step sees the weights
    differ, drops the graph (one line) and keeps the eager result, so training stays right."""
    graphed, lines, model_g, model_e = _frozen_lr_plant(standin, check=True)
    assert graphed.graph is None and len(lines) == 1 and "its first replay differs from an eager step" in lines[0]
    for (name, p), (_, q) in zip(model_g.named_parameters(), model_e.named_parameters()):
        np.testing.assert_array_equal(p.data.get(), q.data.get(), err_msg=name)


def test_standin_without_the_check_a_frozen_scalar_diverges(standin):
    """The same plant with the check off: graph replays keep the capture's learning rate, so the
    weights differ from eager training (why the check exists, and why per-step values must reach
    the graph through device memory)."""
    graphed, lines, model_g, model_e = _frozen_lr_plant(standin, check=False)
    assert graphed.graph is not None and lines == []
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


# ------------------------------------------------------------------ fit(cuda_graph=...)
def _lenet5_dropout():
    """lenet5 with a Dropout before its classifier's last Linear."""
    g = dict(generator=np.random.default_rng(3))
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2, **g),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, **g),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120, **g),
        nn.ReLU(),
        nn.Dropout(0.4, **g),
        nn.Linear(120, 10, **g),
    )


def _fit(cp, make, make_opt, shape, mode, epochs=2, n=24, batch=8, augment=None, schedule=False, position=None, stop_at=None):
    from cnn_gpu.data import DataLoader  # noqa: PLC0415
    from cnn_gpu.train import Callback, TrainingInterrupted, fit  # noqa: PLC0415

    rng = np.random.default_rng(5)
    x = cp.asarray(rng.standard_normal((n,) + shape).astype(np.float32))
    y = cp.asarray(rng.integers(0, 10, n))
    with cnn_gpu.use_backend("cupy"):
        model = make()
        opt = make_opt(model)
        sched = optim.OneCycleLR(opt, 0.1, epochs * -(-n // batch)) if schedule else None
        loader = DataLoader(x, y, batch, shuffle=True, seed=2, transform=augment)
        cbs = []
        if stop_at is not None:

            class Stop(Callback):
                def on_step(self, loop):
                    if (loop.epoch, loop.step) == stop_at:
                        loop.stop = True

            cbs.append(Stop())
        try:
            hist = fit(model, opt, loader, epochs, scheduler=sched, cuda_graph=mode, callbacks=cbs, position=position)
        except TrainingInterrupted as exc:
            return model, opt, sched, exc.position
    return model, opt, sched, hist


def _same_weights(a, b):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.data.get(), q.data.get(), err_msg=name)
    for (name, p), (_, q) in zip(a.named_buffers(), b.named_buffers()):
        np.testing.assert_array_equal(p.get(), q.get(), err_msg=name)


def test_standin_fit_with_a_cuda_graph_equals_eager_lenet5_dropout_onecycle_sgd(standin, capsys):
    """2 epochs of lenet5 with Dropout, OneCycleLR and SGD Nesterov: the CUDA-graph fit (auto: the
    first replay checked) gives the eager fit's weights and metrics bit for bit (the same kernels
    and GEMMs in the same order; per-step values through device memory), and says nothing."""
    sgd = lambda m: optim.SGD(m, 0.05, momentum=0.9, nesterov=True)  # noqa: E731
    me, _, _, he = _fit(standin, _lenet5_dropout, sgd, (1, 28, 28), False, schedule=True)
    with counting() as c:
        mg, og, _, hg = _fit(standin, _lenet5_dropout, sgd, (1, 28, 28), "auto", schedule=True)
    _same_weights(mg, me)
    assert [(s.train_loss, s.train_accuracy, s.lr) for s in hg] == [(s.train_loss, s.train_accuracy, s.lr) for s in he]
    assert c.launches["graph"] == 2 * 3 - 2  # 3 steps an epoch: all but the first step and the capture's
    # the metric sums are inside the graph: only the eager steps (the first, the capture's warm-up
    # and the first replay's check) launch them from the host
    assert c.kernels["epoch_sums_f32"] == 3
    assert not og.staged and "cuda graph" not in capsys.readouterr().err  # eager modes back after fit


def test_standin_fit_with_a_cuda_graph_equals_eager_resnet20_batchnorm_cropflip_adam(standin):
    """resnet20 (BatchNorm, residual blocks) with crop+flip augmentation and Adam, 2 epochs on 8x8
    images: the CUDA-graph fit equals the eager one bit for bit, running statistics included."""
    from cnn_gpu.data.augment import Compose, RandomCrop, RandomHorizontalFlip  # noqa: PLC0415

    aug = Compose([RandomCrop(8, padding=1), RandomHorizontalFlip()])
    make = lambda: models.resnet20(in_channels=1, generator=np.random.default_rng(4))  # noqa: E731
    adam = lambda m: optim.Adam(m, 1e-3)  # noqa: E731
    me, _, _, he = _fit(standin, make, adam, (1, 8, 8), False, n=12, batch=4, augment=aug)
    mg, _, _, hg = _fit(standin, make, adam, (1, 8, 8), True, n=12, batch=4, augment=aug)
    _same_weights(mg, me)
    assert [s.train_loss for s in hg] == [s.train_loss for s in he]


def test_standin_an_interrupted_and_resumed_graph_fit_equals_an_uninterrupted_one(standin):
    """Stopped at epoch 1 step 2 and resumed from that position (the same model and optimizer
    objects, as a checkpoint restores them): the weights equal an uninterrupted graph fit's."""
    sgd = lambda m: optim.SGD(m, 0.05, momentum=0.9, nesterov=True)  # noqa: E731
    full, _, _, _ = _fit(standin, _lenet5_dropout, sgd, (1, 28, 28), "auto")
    m1, o1, _, pos = _fit(standin, _lenet5_dropout, sgd, (1, 28, 28), "auto", stop_at=(1, 2))
    assert (pos.epoch, pos.step) == (1, 2)
    from cnn_gpu.data import DataLoader  # noqa: PLC0415
    from cnn_gpu.train import fit  # noqa: PLC0415

    rng = np.random.default_rng(5)
    x = standin.asarray(rng.standard_normal((24, 1, 28, 28)).astype(np.float32))
    y = standin.asarray(rng.integers(0, 10, 24))
    with cnn_gpu.use_backend("cupy"):
        fit(m1, o1, DataLoader(x, y, 8, shuffle=True, seed=2), 2, position=pos, cuda_graph="auto")
    _same_weights(m1, full)


def test_fit_cuda_graph_argument_is_checked():
    from cnn_gpu.data import DataLoader  # noqa: PLC0415
    from cnn_gpu.train import fit  # noqa: PLC0415

    model = models.lenet5()
    x, y = np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64)
    for bad, match in (
        ("on", "cuda_graph: expected one of"),
        (1, "cuda_graph: expected one of"),
        (True, "cuda_graph: CUDA graphs replay GPU work"),
    ):
        with pytest.raises(ValueError, match=match):
            fit(model, optim.SGD(model, 0.1), DataLoader(x, y, 2), 1, cuda_graph=bad)


def test_cuda_graph_setting_in_the_run_config_and_the_command_line(capsys):
    from cnn_gpu import cli, runs  # noqa: PLC0415

    assert runs.TrainConfig().cuda_graph == "auto" and runs.CUDA_GRAPH_SETTINGS == {"auto": "auto", "on": True, "off": False}
    with pytest.raises(ValueError, match="cuda_graph: expected one of"):
        runs.TrainConfig(cuda_graph="yes").resolved()
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--cuda-graph", "yes"])
    assert exc.value.code == 2 and "--cuda-graph: invalid choice: 'yes'" in capsys.readouterr().err


def test_standin_cli_train_with_and_without_a_cuda_graph_gives_the_same_run(standin, tmp_path):
    """cnn-gpu train --backend cupy --cuda-graph on / off: the same test accuracy and weights, and
    the setting recorded in the run's config.json."""
    import json  # noqa: PLC0415

    from cnn_gpu import cli  # noqa: PLC0415

    out = {}
    for mode in ("on", "off"):
        run = tmp_path / mode
        lines = []
        cli.cmd_train(
            cli.TrainConfig(
                dataset="digits",
                epochs=1,
                backend="cupy",
                run_dir=str(run),
                progress="none",
                cuda_graph=mode,
                data_dir=str(tmp_path / "data"),
            ),
            out=lines.append,
        )
        out[mode] = lines[-1].split(" (")[0]  # test accuracy: NN.NN% (the last epoch's model, RUN/last.npz)
        assert json.loads((run / "config.json").read_text())["config"]["cuda_graph"] == mode
    assert out["on"] == out["off"] and out["on"].startswith("test accuracy: ")
    on, off = cnn_gpu.load(str(tmp_path / "on" / "last.npz")), cnn_gpu.load(str(tmp_path / "off" / "last.npz"))
    for (name, p), (_, q) in zip(on.named_parameters(), off.named_parameters()):
        np.testing.assert_array_equal(cnn_gpu.to_numpy(p.data), cnn_gpu.to_numpy(q.data), err_msg=name)


def test_standin_evaluate_replays_one_graph_per_full_batch_and_equals_eager(standin):
    """evaluate() on CuPy arrays: the first full batch eager + capture, the other full batches
    graph launches (the first checked), the last partial batch eager; the same loss and accuracy
    as an eager evaluation, bit for bit."""
    from cnn_gpu.train import evaluate  # noqa: PLC0415

    rng = np.random.default_rng(9)
    x = standin.asarray(rng.standard_normal((22, 1, 28, 28)).astype(np.float32))
    y = standin.asarray(rng.integers(0, 10, 22))
    with cnn_gpu.use_backend("cupy"):
        cnn_gpu.manual_seed(0)
        model = models.lenet5()
    eager = evaluate(model, x, y, batch_size=5, cuda_graph=False)
    with counting() as c:
        got = evaluate(model, x, y, batch_size=5, cuda_graph="auto")
    assert got == eager and model.training
    assert c.launches.get("graph") == 3  # batches 2, 3, 4 of 5 (4 full, 1 partial)


def test_standin_predict_proba_replays_one_graph_per_full_batch_and_equals_eager(standin):
    """predict_proba() on CuPy arrays: full batches replay one graph (the first checked), the last
    partial batch runs eagerly; the probabilities equal an eager prediction's bit for bit, each row
    sums to 1, the model's mode is restored, and NumPy gives the same numbers to float32 round-off."""
    from cnn_gpu.functional import softmax  # noqa: PLC0415
    from cnn_gpu.train import predict_proba  # noqa: PLC0415

    rng = np.random.default_rng(11)
    xh = rng.standard_normal((13, 1, 28, 28)).astype(np.float32)
    with cnn_gpu.use_backend("cupy"):
        cnn_gpu.manual_seed(0)
        model = _lenet5_dropout()
    x = standin.asarray(xh)
    eager = predict_proba(model, x, batch_size=4, cuda_graph=False)
    with counting() as c:
        got = predict_proba(model, x, batch_size=4, cuda_graph="auto")
    assert c.launches.get("graph") == 2 and c.total_syncs == 1  # batches 2 and 3 of 4; the check's one read
    np.testing.assert_array_equal(got.get(), eager.get())
    assert got.shape == (13, 10) and model.training
    np.testing.assert_allclose(got.get().sum(axis=1), 1.0, rtol=1e-5)
    model.to("numpy").eval()
    want = softmax(model.forward(xh), axis=1)
    np.testing.assert_allclose(got.get(), want, rtol=1e-5, atol=1e-6)


def test_predict_proba_arguments_are_checked():
    from cnn_gpu.train import predict_proba  # noqa: PLC0415

    model = models.lenet5()
    with pytest.raises(ValueError, match="x: expected an array of at least one example"):
        predict_proba(model, np.zeros((0, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match="batch_size: expected a positive int, got 0"):
        predict_proba(model, np.zeros((2, 1, 28, 28), np.float32), batch_size=0)
    with pytest.raises(ValueError, match="cuda_graph: CUDA graphs replay GPU work"):
        predict_proba(model, np.zeros((2, 1, 28, 28), np.float32), cuda_graph=True)
