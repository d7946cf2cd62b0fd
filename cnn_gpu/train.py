"""fit / evaluate: the training loop.

Host synchronisation happens in exactly one place, :func:`read_metrics`, called once per
epoch (or per logging interval). Inside an epoch the loss and accuracy sums stay on the
arrays' device: a training step on CuPy never waits for the GPU.
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
from .optim import LRSchedule, Optimizer


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


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

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_metrics(*device_values: Any) -> list[float]:
    """THE host synchronisation point: copy device scalars to Python floats."""
    return [float(to_numpy(v)) for v in device_values]


def _sums(xp, dtype):
    return xp.zeros((), dtype=np.float64), xp.zeros((), dtype=np.int64)


def evaluate(model: Module, x: Any, y: Any, batch_size: int = 512) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on (x, y); restores the model's training mode."""
    was_training = model.training
    model.eval()
    loss_fn = CrossEntropyLoss(validate_range=False)
    xp = get_array_module(x)
    loss_sum, correct = _sums(xp, None)
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
    model.backward(loss_fn.backward())
    optimizer.step()
    return loss, logits


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
) -> list[EpochStats]:
    """Train for epochs ``start_epoch .. epochs-1``; evaluate on ``eval_data`` after each epoch.

    Labels are range-checked once here, not per step. The scheduler (if any) steps once per batch.
    Raises NonFiniteLossError (naming the epoch) if an epoch's loss is not finite.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs: expected a non-negative int, got {epochs!r}")
    labels = train_loader.y
    if labels.dtype.kind not in "iu":
        raise TypeError(f"train_loader.y: expected integer class labels, got dtype {labels.dtype}")
    loss_fn = CrossEntropyLoss(validate_range=False)
    xp = get_array_module(train_loader.x)
    history: list[EpochStats] = []
    model.train()
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        loss_sum, correct = _sums(xp, None)
        seen = 0
        for xb, yb in train_loader.epoch(epoch):
            loss, logits = train_step(model, loss_fn, optimizer, xb, yb)
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss * xb.shape[0]
            correct += (logits.argmax(axis=1) == yb).sum()
            seen += int(xb.shape[0])
        total_loss, hits = read_metrics(loss_sum, correct)  # the one sync of the epoch
        seconds = time.perf_counter() - t0
        if not math.isfinite(total_loss):
            raise NonFiniteLossError(f"non-finite training loss ({total_loss}) in epoch {epoch + 1}")
        stats = EpochStats(epoch + 1, total_loss / max(seen, 1), hits / max(seen, 1), optimizer.lr,
                           seen / seconds if seconds > 0 else float("inf"), seconds)
        if eval_data is not None:
            stats.test_loss, stats.test_accuracy = evaluate(model, *eval_data)
        history.append(stats)
        if log is not None:
            msg = (f"epoch {stats.epoch}/{epochs}  loss {stats.train_loss:.4f}  acc {100 * stats.train_accuracy:.2f}%  "
                   f"lr {stats.lr:.3g}  {stats.images_per_s:.0f} img/s")
            if stats.test_accuracy is not None:
                msg += f"  test loss {stats.test_loss:.4f}  test acc {100 * stats.test_accuracy:.2f}%"
            log(msg)
        if on_epoch_end is not None:
            on_epoch_end(stats)
    return history
