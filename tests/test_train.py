"""The training loop: exact mid-epoch resume, stop requests, non-finite losses located to the
step without per-step syncs, progress refreshes, the validation split."""

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import nn, optim, train
from cnn_gpu.callbacks import Callback, Evaluate, LambdaCallback, ProgressBar, StopRequest
from cnn_gpu.data import DataLoader, split_validation
from cnn_gpu.train import NonFiniteLossError, Position, TrainingInterrupted, fit


def _setup(xp, seed=3, dropout=True, lr=0.02):
    with cnn_gpu.use_backend(xp.__name__):
        cnn_gpu.manual_seed(seed)
        rng = np.random.default_rng(0)
        x = xp.asarray(rng.standard_normal((60, 1, 6, 6)).astype(np.float32))
        y = xp.asarray(rng.integers(0, 3, 60).astype(np.int64))
        layers = [nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
        if dropout:
            layers.append(nn.Dropout(0.25))
        model = nn.Sequential(*layers, nn.Linear(36, 3))
        opt = optim.Adam(model, lr)
        loader = DataLoader(x, y, 16, shuffle=True, seed=5)  # 4 steps per epoch, the last one short
        sched = optim.OneCycleLR(opt, max_lr=lr, total_steps=4 * len(loader))
    return model, opt, sched, loader, (x, y)


def _weights(model):
    return {k: cnn_gpu.to_numpy(v).copy() for k, v in model.state_dict().items()}


def _restart(model, opt, sched, make):
    """A fresh set of objects carrying over the state of (model, opt, sched), as a checkpoint would."""
    m2, o2, s2, loader2, data2 = make()
    m2.load_state_dict({k: cnn_gpu.to_numpy(v) for k, v in model.state_dict().items()})
    for (_, a), (_, b) in zip(model.named_modules(), m2.named_modules()):
        if isinstance(a, nn.Dropout):
            b.seed, b.calls = a.seed, a.calls
    o2.load_state_dict(opt.state_dict())
    s2.load_state_dict(sched.state_dict())
    return m2, o2, s2, loader2, data2


@pytest.mark.parametrize("stop_at", [(2, 1), (2, 4), (3, 2)])
def test_interrupt_anywhere_and_resume_is_bitwise_exact(xp, stop_at):
    make = lambda: _setup(xp)  # noqa: E731
    model, opt, sched, loader, data = make()
    straight = fit(model, opt, loader, 4, scheduler=sched, callbacks=[Evaluate(data)])
    want = _weights(model)

    model, opt, sched, loader, data = make()

    def on_step(epoch, step):
        if (epoch, step) == stop_at:
            raise KeyboardInterrupt  # as a Ctrl-C handler would: stop at this consistent point

    with pytest.raises(TrainingInterrupted) as info:
        fit(model, opt, loader, 4, scheduler=sched, callbacks=[Evaluate(data), LambdaCallback(on_step=on_step)])
    pos = info.value.position
    epoch, step = stop_at
    if step == len(loader):  # stopped after the last step: the epoch is finished first
        assert (pos.epoch, pos.step) == (epoch, 0)
        assert [h.epoch for h in info.value.history] == list(range(1, epoch + 1))
    else:
        assert (pos.epoch, pos.step, pos.seen) == (epoch - 1, step, 16 * step)
        assert [h.epoch for h in info.value.history] == list(range(1, epoch))
    assert opt.step_count == (epoch - 1) * len(loader) + step

    m2, o2, s2, loader2, data2 = _restart(model, opt, sched, make)
    rest = fit(m2, o2, loader2, 4, scheduler=s2, callbacks=[Evaluate(data2)], position=Position.from_dict(pos.as_dict()))
    got = _weights(m2)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # the epoch that was split in two reports the same metrics as in the straight run
    both = info.value.history + rest
    assert [h.epoch for h in both] == [1, 2, 3, 4]
    for a, b in zip(straight, both):
        assert (a.train_loss, a.train_accuracy, a.test_loss, a.test_accuracy) == (
            b.train_loss,
            b.train_accuracy,
            b.test_loss,
            b.test_accuracy,
        )


@pytest.mark.parametrize("order", ["request-first", "request-last"])
def test_stop_request_stops_before_the_next_step(order):
    model, opt, sched, loader, data = _setup(np)
    stop = StopRequest()

    def on_step(epoch, step):
        if (epoch, step) == (1, 2):
            stop.request()

    cbs = [stop, LambdaCallback(on_step=on_step)]
    with pytest.raises(TrainingInterrupted) as info:
        fit(model, opt, loader, 3, scheduler=sched, callbacks=cbs if order == "request-first" else cbs[::-1])
    assert (info.value.position.epoch, info.value.position.step) == (0, 2)
    assert opt.step_count == 2 and sched.last_step == 2
    assert info.value.position.loss_sum > 0 and 0 <= info.value.position.correct <= 32


def _first_nonfinite_step_by_host_checks(make, blowup_at):
    """The reference: the same training, but reading every step's loss on the host."""
    model, opt, _, loader, _ = make()
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    for epoch in range(10):
        for xb, yb in loader.epoch(epoch):
            opt.lr = 0.01 if step < blowup_at else 1e30
            loss, _ = train.train_step(model, loss_fn, opt, xb, yb)
            step += 1
            if not np.isfinite(float(cnn_gpu.to_numpy(loss))):
                return epoch + 1, step
    raise AssertionError("the loss never became non-finite")


class _BlowUp(optim.LRSchedule):
    """0.01 for ``at`` steps, then an absurd rate that drives the weights to overflow."""

    def __init__(self, optimizer, at):
        self.at = at
        super().__init__(optimizer)

    def lr_at(self, step):
        return 0.01 if step < self.at else 1e30


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
def test_non_finite_loss_names_epoch_and_step(xp):
    make = lambda: _setup(xp, dropout=False)  # noqa: E731
    blowup_at = 6  # the 7th step runs with the huge rate
    want_epoch, want_global = _first_nonfinite_step_by_host_checks(make, blowup_at)
    model, opt, _, loader, data = make()
    done = []
    with pytest.raises(NonFiniteLossError) as info:
        fit(model, opt, loader, 10, scheduler=_BlowUp(opt, blowup_at), callbacks=[LambdaCallback(on_epoch_end=done.append)])
    err = info.value
    assert (err.epoch, err.global_step) == (want_epoch, want_global)
    assert err.step == want_global - (want_epoch - 1) * len(loader)
    assert f"epoch {err.epoch}, step {err.step} of {len(loader)}" in str(err)
    assert not np.isfinite(err.value)
    assert [s.epoch for s in done] == list(range(1, want_epoch))  # no epoch with a bad loss was reported


class _EveryThird(Callback):
    """Reads the running sums every third step, as a progress display would at its refreshes."""

    def __init__(self):
        self.calls, self.shown = 0, []

    def on_step(self, loop):
        self.calls += 1
        if self.calls % 3 == 0:
            loss_sum, hits = loop.read_sums()
            self.shown.append((loop.step, loss_sum / loop.meter.seen, hits / loop.meter.seen))


def test_sums_are_read_only_when_asked(monkeypatch):
    model, opt, sched, loader, data = _setup(np)
    reads = []
    real = train.read_metrics
    monkeypatch.setattr(train, "read_metrics", lambda *v: reads.append(len(v)) or real(*v))
    prog = _EveryThird()
    hist = fit(model, opt, loader, 2, scheduler=sched, callbacks=[prog])
    steps = 2 * len(loader)
    assert len(prog.shown) == steps // 3
    # one read before training (the labels' range), one per refresh and one per epoch: never one per step
    assert len(reads) == 1 + steps // 3 + 2
    done, loss, acc = prog.shown[-1]
    assert done == 2 and np.isfinite(loss) and 0 <= acc <= 1
    assert hist[-1].steps == len(loader)


class _FakeBar:
    def __init__(self, total, initial, **kw):
        self.n, self.total, self.postfix, self.closed = initial, total, [], False

    def update(self, k):
        self.n += k

    def set_postfix_str(self, text, refresh):
        self.postfix.append(text)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("refresh_s,shows", [(0.0, 8), (3600.0, 0)])
def test_progress_bar_reads_the_sums_only_at_refreshes(monkeypatch, refresh_s, shows):
    model, opt, sched, loader, data = _setup(np)
    bars = []
    reads = []
    real = train.read_metrics
    monkeypatch.setattr(train, "read_metrics", lambda *v: reads.append(len(v)) or real(*v))
    bar = ProgressBar(refresh_s=refresh_s, bar=lambda **kw: bars.append(_FakeBar(**kw)) or bars[-1])
    fit(model, opt, loader, 2, scheduler=sched, callbacks=[bar])
    assert len(bars) == 2 and all(b.closed and b.n == b.total == len(loader) for b in bars)
    assert sum(len(b.postfix) for b in bars) == shows and len(reads) == 1 + shows + 2
    if shows:
        assert "loss" in bars[-1].postfix[-1] and "img/s" in bars[-1].postfix[-1]


def test_fit_checks_its_arguments():
    model, opt, sched, loader, data = _setup(np)
    with pytest.raises(ValueError, match="epochs"):
        fit(model, opt, loader, -1)
    with pytest.raises(ValueError, match="position.step"):
        fit(model, opt, loader, 2, position=Position(0, 9))
    with pytest.raises(ValueError, match="start"):
        loader.epoch(0, start=5)


def test_dataloader_start_skips_whole_batches(xp):
    x = xp.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    y = xp.arange(10)
    loader = DataLoader(x, y, 4, shuffle=True, seed=2)
    full = [cnn_gpu.to_numpy(yb) for _, yb in loader.epoch(3)]
    tail = [cnn_gpu.to_numpy(yb) for _, yb in loader.epoch(3, start=1)]
    assert len(tail) == 2
    for a, b in zip(full[1:], tail):
        np.testing.assert_array_equal(a, b)
    assert list(loader.epoch(3, start=3)) == []


def test_split_validation_is_stratified_deterministic_and_disjoint():
    rng = np.random.default_rng(0)
    x = np.arange(200).reshape(200, 1, 1, 1)
    y = rng.integers(0, 4, 200)
    (xt, yt), (xv, yv) = split_validation(x, y, 0.25)
    (xt2, _), (xv2, _) = split_validation(x, y, 0.25)
    np.testing.assert_array_equal(xv, xv2)
    assert len(xt) + len(xv) == 200 and not set(xt.ravel()) & set(xv.ravel())
    for c in range(4):
        assert abs((yv == c).sum() - 0.25 * (y == c).sum()) <= 0.5
    np.testing.assert_array_equal(yt, y[xt.ravel()])  # labels stay with their images
    for bad in (0.0, 1.0, -0.1, "0.2"):
        with pytest.raises(ValueError, match="fraction"):
            split_validation(x, y, bad)
