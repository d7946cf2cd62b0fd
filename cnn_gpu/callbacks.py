"""Training callbacks: one concern each, in the style of Chainer's training extensions.

``fit(model, opt, loader, epochs, callbacks=[...])`` calls them in list order (see
cnn_gpu.train.Callback for the hooks). Put the Evaluate callbacks before the ones that report or
save what they measure::

    from cnn_gpu.callbacks import Evaluate, PrintLog, ProgressBar
    fit(model, opt, loader, 10, callbacks=[Evaluate(test_data), ProgressBar(), PrintLog()])

The run folder's callbacks (metrics, model files, the checkpoint) are in cnn_gpu.runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .train import Callback, EpochStats, Loop, StopOnNonFinite, evaluate, format_stats

REFRESH_S = 0.5  # how often a progress bar reads and shows the running loss (one sync each)


class Evaluate(Callback):
    """After every epoch, the loss and accuracy on ``data`` = (x, y) into the epoch's stats
    (``val_*`` or ``test_*``): one host read per evaluation."""

    def __init__(self, data: tuple, split: str = "test", batch_size: int = 512):
        if split not in ("val", "test"):
            raise ValueError(f"split: expected 'val' or 'test', got {split!r}")
        self.data, self.split, self.batch_size = data, split, batch_size

    def on_epoch_end(self, loop: Loop, stats: EpochStats) -> None:
        x, y = self.data
        loss, acc = evaluate(loop.model, x, y, batch_size=self.batch_size)
        setattr(stats, f"{self.split}_loss", loss)
        setattr(stats, f"{self.split}_accuracy", acc)


class PrintLog(Callback):
    """One line per epoch (cnn_gpu.train.format_stats) through ``log``."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log

    def on_epoch_end(self, loop: Loop, stats: EpochStats) -> None:
        self.log(format_stats(stats, loop.epochs))


class ProgressBar(Callback):
    """A tqdm bar per epoch. The step count moves every step (host only); the running loss,
    accuracy and images/s are refreshed every ``refresh_s`` seconds, each refresh one read of
    the device sums (on the GPU: one sync per refresh, not per step)."""

    def __init__(self, file: Any = None, refresh_s: float | None = None, bar: Any = None):
        if bar is None:
            from tqdm.auto import tqdm  # noqa: PLC0415  (imported only when a bar is shown)

            bar = tqdm
        self.make_bar, self.file = bar, file
        self.refresh_s = REFRESH_S if refresh_s is None else refresh_s
        self.bar: Any = None  # the epoch's bar, made in on_epoch_begin
        self.last = 0.0

    def on_epoch_begin(self, loop: Loop) -> None:
        self.bar = self.make_bar(
            total=loop.steps_per_epoch,
            initial=loop.step,
            desc=f"epoch {loop.epoch + 1}/{loop.epochs}",
            unit="step",
            leave=False,
            file=self.file,
            dynamic_ncols=True,
        )
        self.last = time.monotonic()

    def on_step(self, loop: Loop) -> None:
        self.bar.update(loop.step - self.bar.n)
        if time.monotonic() - self.last < self.refresh_s:
            return
        loss_sum, hits = loop.read_sums()
        meter = loop.meter
        assert meter is not None  # fit made it before the first step
        seen = max(meter.seen, 1)
        rate = (meter.seen - meter.seen_before) / max(time.perf_counter() - loop.started, 1e-9)
        self.bar.set_postfix_str(f"loss {loss_sum / seen:.4f}  acc {100 * hits / seen:.2f}%  {rate:.0f} img/s", refresh=True)
        self.last = time.monotonic()

    def on_steps_end(self, loop: Loop) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopRequest(Callback):
    """A stop request: ``request()`` (from a signal handler, another thread or another callback)
    makes fit stop before its next step and raise TrainingInterrupted."""

    def __init__(self) -> None:
        self.requested = False
        self.loop: Loop | None = None

    def request(self) -> None:
        self.requested = True
        if self.loop is not None:
            self.loop.stop = True

    def on_train_begin(self, loop: Loop) -> None:
        self.loop = loop
        loop.stop = loop.stop or self.requested

    def on_train_end(self, loop: Loop) -> None:
        self.loop = None


class LambdaCallback(Callback):
    """Plain functions as hooks: ``on_step(epoch, step)`` (1-based epoch, steps done in it; host
    values only) and ``on_epoch_end(stats)``."""

    def __init__(
        self, on_step: Callable[[int, int], None] | None = None, on_epoch_end: Callable[[EpochStats], None] | None = None
    ):
        self._on_step, self._on_epoch_end = on_step, on_epoch_end

    def on_step(self, loop: Loop) -> None:
        if self._on_step is not None:
            self._on_step(loop.epoch + 1, loop.step)

    def on_epoch_end(self, loop: Loop, stats: EpochStats) -> None:
        if self._on_epoch_end is not None:
            self._on_epoch_end(stats)


__all__ = ["Callback", "StopOnNonFinite", "Evaluate", "PrintLog", "ProgressBar", "StopRequest", "LambdaCallback", "REFRESH_S"]
