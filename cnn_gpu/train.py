"""fit / evaluate: the training loop.

Where the host waits for the device
-----------------------------------
Host synchronisation happens in exactly one function, :func:`read_metrics`, which copies
device scalars to Python floats. The loop calls it only:

- once at the end of each epoch (the epoch's loss and accuracy sums);
- when a progress display is due to refresh (``progress.due()``: at most every
  ``refresh_s`` seconds of wall time, never per step), to show the running loss and accuracy;
- at the end of :func:`evaluate` (one read for the whole evaluation set);
- when training stops early (Ctrl-C / a stop request), to record the partial epoch sums;
- and, only after a sync has already found the loss non-finite, once more to locate the step.

Inside an epoch everything else stays on the device: each step adds its loss and hit count
into device sums and copies its loss into a device array of the epoch's per-step losses,
so a NaN is traced to its exact step at the next sync without reading anything per step.
Host-side bookkeeping (step counters, ``optimizer.lr``, batch sizes, the clock) never touches
the device. Writing a checkpoint copies the weights to the host; the caller does that at
epoch boundaries (and on an interrupt), not per step. On NumPy none of this costs anything.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import numpy as np

from .backend import get_array_module, to_numpy
from .data.loader import DataLoader
from .nn import CrossEntropyLoss, Module
from .nn.module import _takes_input_grad as takes_input_grad
from .optim import LRSchedule, Optimizer


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; ``epoch`` (1-based), ``step`` (1-based within
    the epoch) and ``global_step`` (1-based over the run) name the first step where it did."""

    def __init__(self, message: str, epoch: int, step: int, global_step: int, value: float):
        super().__init__(message)
        self.epoch, self.step, self.global_step, self.value = epoch, step, global_step, value


class TrainingInterrupted(Exception):
    """Training stopped at a consistent point (between steps) because a stop was requested.

    ``position`` says where to continue: :func:`fit` with ``position=`` picks up exactly there.
    ``history`` holds the epochs completed by this call.
    """

    def __init__(self, position: "Position", history: list):
        super().__init__(f"training interrupted at epoch {position.epoch + 1}, after step {position.step}")
        self.position, self.history = position, history


@dataclasses.dataclass
class Position:
    """Where a run stands: ``epoch`` epochs are complete and ``step`` batches of the next one are done.

    At an epoch boundary ``step`` is 0 and the sums are 0. Mid-epoch, the partial sums of that
    epoch (read once, when the stop was handled) let a resumed run report the same epoch metrics.
    """

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Position":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    lr: float
    images_per_s: float
    seconds: float
    test_loss: float | None = None
    test_accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    steps: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class StopFlag:
    """A stop request checked by :func:`fit` between steps (host-only; a signal handler may set it)."""

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        self.requested = True


def read_metrics(*device_values: Any) -> list[float]:
    """THE host synchronisation point: copy device scalars to Python floats."""
    return [float(to_numpy(v)) for v in device_values]


def _sums(xp, loss_sum: float = 0.0, correct: int = 0):
    return xp.full((), loss_sum, dtype=np.float64), xp.full((), correct, dtype=np.int64)


def evaluate(model: Module, x: Any, y: Any, batch_size: int = 512) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on (x, y); restores the model's training mode."""
    was_training = model.training
    model.eval()
    loss_fn = CrossEntropyLoss(validate_range=False)
    xp = get_array_module(x)
    loss_sum, correct = _sums(xp)
    try:
        for xb, yb in DataLoader(x, y, batch_size).epoch(0):
            logits = model.forward(xb)
            loss_sum += loss_fn.forward(logits, yb) * xb.shape[0]
            correct += (logits.argmax(axis=1) == yb).sum()
    finally:
        model.train(was_training)
    loss, hits = read_metrics(loss_sum, correct)
    n = int(x.shape[0])
    return loss / n, hits / n


def train_step(model: Module, loss_fn: CrossEntropyLoss, optimizer: Optimizer, xb, yb):
    """One step: forward, loss, backward, update. Returns (loss, logits), both on the device."""
    optimizer.zero_grad()
    logits = model.forward(xb)
    loss = loss_fn.forward(logits, yb)
    if takes_input_grad(type(model)):
        model.backward(loss_fn.backward(), input_grad=False)  # nobody needs d(loss)/d(batch): skip it
    else:  # a user's Module whose backward has no input_grad switch
        model.backward(loss_fn.backward())
    optimizer.step()
    return loss, logits


def _check_finite(total_loss: float, step_losses, first: int, done: int, epoch: int, steps_per_epoch: int) -> None:
    """Raise NonFiniteLossError naming the first non-finite step, if the epoch's loss sum is not finite.

    Called right after a sync read ``total_loss``; only when it is not finite does it read the
    index of the first bad step (a second, one-off sync: the run is over anyway).
    """
    if math.isfinite(total_loss):
        return
    xp = get_array_module(step_losses)
    window = step_losses[first:done]
    finite = xp.isfinite(window)
    (offset,) = read_metrics(xp.argmin(finite))  # argmin of a bool array: the first False
    step = first + int(offset) + 1
    (value,) = read_metrics(window[int(offset)])
    raise NonFiniteLossError(
        f"non-finite training loss ({value}) at epoch {epoch + 1}, step {step} of {steps_per_epoch} "
        f"(global step {epoch * steps_per_epoch + step})",
        epoch + 1, step, epoch * steps_per_epoch + step, value)


def fit(
    model: Module,
    optimizer: Optimizer,
    train_loader: DataLoader,
    epochs: int,
    scheduler: LRSchedule | None = None,
    eval_data: tuple[Any, Any] | None = None,
    start_epoch: int = 0,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    log: Callable[[str], None] | None = print,
    *,
    val_data: tuple[Any, Any] | None = None,
    position: Position | None = None,
    progress: Any = None,
    stop: StopFlag | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[EpochStats]:
    """Train for epochs ``start_epoch .. epochs-1`` (or from ``position``, mid-epoch included).

    After each epoch the model is evaluated on ``val_data`` and ``eval_data`` (the test set),
    if given, and ``on_epoch_end(stats)`` is called (the place to write checkpoints).
    Labels are range-checked once here, not per step. The scheduler (if any) steps once per batch.

    ``progress``: an object with ``begin(epoch, epochs, steps, done)``, ``advance(steps_done)``,
    ``due() -> bool``, ``show(loss, accuracy, images_per_s)`` and ``end()``; the running
    metrics are read (a sync) only when ``due()`` says so.
    ``stop``: a :class:`StopFlag`; when set, training stops before the next step and raises
    :class:`TrainingInterrupted` with the position to resume from.
    ``on_step(epoch, step)``: called after every step with host integers only (1-based epoch,
    steps done in it); it must not read device values (that would add a per-step sync).
    A KeyboardInterrupt raised inside it counts as a stop request, handled at that consistent point.

    Raises NonFiniteLossError, naming the epoch and step, when the loss stops being finite.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs: expected a non-negative int, got {epochs!r}")
    labels = train_loader.y
    if labels.dtype.kind not in "iu":
        raise TypeError(f"train_loader.y: expected integer class labels, got dtype {labels.dtype}")
    if position is None:
        position = Position(epoch=start_epoch)
    steps_per_epoch = len(train_loader)
    if not 0 <= position.step <= steps_per_epoch:
        raise ValueError(f"position.step: expected a step in [0, {steps_per_epoch}], got {position.step}")
    loss_fn = CrossEntropyLoss(validate_range=False)
    xp = get_array_module(train_loader.x)
    history: list[EpochStats] = []
    stop = stop if stop is not None else StopFlag()
    model.train()
    for epoch in range(position.epoch, epochs):
        resuming = epoch == position.epoch
        first = position.step if resuming else 0
        loss_sum, correct = _sums(xp, position.loss_sum, position.correct) if resuming else _sums(xp)
        seen = position.seen if resuming else 0
        seconds_before = position.seconds if resuming else 0.0
        step_losses = xp.zeros(steps_per_epoch, dtype=np.float64)  # per-step losses, on the device
        if progress is not None:
            progress.begin(epoch + 1, epochs, steps_per_epoch, first)
        t0 = time.perf_counter()
        done = first
        try:
            for xb, yb in train_loader.epoch(epoch, start=first):
                if stop.requested:
                    break
                loss, logits = train_step(model, loss_fn, optimizer, xb, yb)
                if scheduler is not None:
                    scheduler.step()
                loss_sum += loss * xb.shape[0]
                correct += (logits.argmax(axis=1) == yb).sum()
                step_losses[done] = loss
                seen += int(xb.shape[0])
                done += 1
                if on_step is not None:
                    try:
                        on_step(epoch + 1, done)
                    except KeyboardInterrupt:
                        stop.request()
                if progress is not None:
                    progress.advance(done)
                    if progress.due():  # a sync, but at most every refresh interval
                        running_loss, hits = read_metrics(loss_sum, correct)
                        _check_finite(running_loss, step_losses, first, done, epoch, steps_per_epoch)
                        elapsed = time.perf_counter() - t0
                        progress.show(running_loss / seen, hits / seen, (seen - (position.seen if resuming else 0)) / max(elapsed, 1e-9))
            total_loss, hits = read_metrics(loss_sum, correct)  # the one sync of the epoch
        finally:
            if progress is not None:
                progress.end()
        seconds = seconds_before + time.perf_counter() - t0
        _check_finite(total_loss, step_losses, first, done, epoch, steps_per_epoch)
        if done < steps_per_epoch:  # stopped mid-epoch, between two steps
            raise TrainingInterrupted(Position(epoch, done, total_loss, int(hits), seen, seconds), history)
        stats = EpochStats(epoch + 1, total_loss / max(seen, 1), hits / max(seen, 1), optimizer.lr,
                           seen / seconds if seconds > 0 else float("inf"), seconds, steps=steps_per_epoch)
        if val_data is not None:
            stats.val_loss, stats.val_accuracy = evaluate(model, *val_data)
        if eval_data is not None:
            stats.test_loss, stats.test_accuracy = evaluate(model, *eval_data)
        history.append(stats)
        if log is not None:
            log(format_stats(stats, epochs))
        if on_epoch_end is not None:
            on_epoch_end(stats)
        if stop.requested and epoch + 1 < epochs:
            raise TrainingInterrupted(Position(epoch + 1), history)
    return history


def format_stats(stats: EpochStats, epochs: int) -> str:
    """The one-line summary of an epoch."""
    msg = (f"epoch {stats.epoch}/{epochs}  loss {stats.train_loss:.4f}  acc {100 * stats.train_accuracy:.2f}%  "
           f"lr {stats.lr:.3g}  {stats.images_per_s:.0f} img/s  {stats.seconds:.1f} s")
    if stats.val_accuracy is not None:
        msg += f"  val loss {stats.val_loss:.4f}  val acc {100 * stats.val_accuracy:.2f}%"
    if stats.test_accuracy is not None:
        msg += f"  test loss {stats.test_loss:.4f}  test acc {100 * stats.test_accuracy:.2f}%"
    return msg


__all__ = ["fit", "evaluate", "train_step", "read_metrics", "EpochStats", "Position", "StopFlag",
           "NonFiniteLossError", "TrainingInterrupted", "format_stats"]
