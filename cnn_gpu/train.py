"""fit / evaluate: the training loop. What happens around it (evaluation, logging, progress,
checkpoints, the non-finite-loss stop) are callbacks (cnn_gpu.callbacks), one concern each.

Where the host waits for the device
-----------------------------------
Host synchronisation happens in exactly one function, :func:`read_metrics`, which copies device
scalars to Python floats. The loop reads its running sums only through :meth:`Loop.read_sums`:

- once at the end of each epoch (the epoch's loss and accuracy sums);
- when a callback asks (a progress bar refreshing, at most every ``refresh_s`` seconds);
- when training stops early (a stop request), to record the partial epoch sums;
and :func:`evaluate` reads once per evaluation. After every read the callbacks' ``on_sums``
runs (StopOnNonFinite checks the loss there; only when it is not finite does it read once more,
to locate the step).

Inside an epoch everything else stays on the device: each step adds its loss and hit count into
device sums and copies its loss into a device array of the epoch's per-step losses. Host-side
bookkeeping (step counters, ``optimizer.lr``, batch sizes, the clock) never touches the device.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .backend import get_array_module, to_numpy
from .data.loader import DataLoader
from .data.prefetch import backend_of
from .nn import CrossEntropyLoss, Module
from .optim import LRSchedule, Optimizer
from .precision import Float16Step, gemm_math
from .precision import check as check_precision


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; ``epoch`` (1-based), ``step`` (1-based within
    the epoch) and ``global_step`` (1-based over the run) name the first step where it did."""

    def __init__(self, message: str, epoch: int, step: int, global_step: int, value: float):
        super().__init__(message)
        self.epoch, self.step, self.global_step, self.value = epoch, step, global_step, value


class TrainingInterrupted(Exception):
    """Training stopped at a consistent point (between steps) because a stop was requested.
    ``position`` says where to continue (``fit(..., position=)``); ``history`` holds the epochs
    completed by this call."""

    def __init__(self, position: Position, history: list):
        super().__init__(f"training interrupted at epoch {position.epoch + 1}, after step {position.step}")
        self.position, self.history = position, history


@dataclasses.dataclass
class Position:
    """Where a run stands: ``epoch`` epochs are complete and ``step`` batches of the next one are done.
    Mid-epoch, the partial sums of that epoch let a resumed run report the same epoch metrics."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Position:
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


def read_metrics(*device_values: Any) -> list[float]:
    """THE host synchronisation point: copy device scalars to Python floats (on the GPU in one
    transfer: the values are stacked on the device first; ints below 2**53 are exact)."""
    xp = get_array_module(*device_values)
    if xp is np or len(device_values) < 2:
        return [float(to_numpy(v)) for v in device_values]
    return [float(v) for v in to_numpy(xp.stack([v.astype(np.float64).reshape(()) for v in device_values]))]


class Meter:
    """One epoch's running sums, on the device: the loss (times the batch size), the hits, and
    every step's loss (so a non-finite one can be found later without a per-step sync), written
    at the step number ``counter`` (on the device too). The arrays keep their addresses for the
    meter's life (``reset`` starts an epoch in place), so a CUDA graph that captured ``accumulate``
    adds each replayed step into them."""

    def __init__(self, xp, steps: int, first: int = 0, loss_sum: float = 0.0, correct: int = 0, seen: int = 0):
        self.xp = xp
        self.loss_sum = xp.zeros((), dtype=np.float64)
        self.correct = xp.zeros((), dtype=np.int64)
        self.step_losses = xp.zeros(steps, dtype=np.float64)
        self.counter = xp.zeros((), dtype=np.int64)  # the next step's number
        self.reset(first, loss_sum, correct, seen)

    def reset(self, first: int = 0, loss_sum: float = 0.0, correct: int = 0, seen: int = 0) -> None:
        """Start an epoch at step ``first`` with the sums so far (a resume's), in place."""
        self.loss_sum.fill(loss_sum)
        self.correct.fill(correct)
        self.step_losses.fill(0)
        self.counter.fill(first)
        self.first, self.seen, self.seen_before = first, seen, seen  # first: the step this meter started at

    def arrays(self) -> list:
        """The device arrays ``accumulate`` writes (what a CUDA graph's first-replay check restores)."""
        return [self.loss_sum, self.correct, self.step_losses, self.counter]

    def accumulate(self, loss, logits, labels) -> None:
        """The device part of a step's metrics (no host read; capturable): one launch on CuPy."""
        if self.xp is np:
            self.loss_sum += loss * labels.shape[0]
            self.correct += (logits.argmax(axis=1) == labels).sum()
            step = int(self.counter)
            if 0 <= step < self.step_losses.shape[0]:
                self.step_losses[step] = loss
            self.counter += 1
            return
        from .cuda import ops  # noqa: PLC0415  (CuPy arrays only)

        ops.epoch_sums(loss, logits, labels, self.loss_sum, self.correct, self.step_losses, self.counter)

    def add(self, loss, logits, labels) -> None:
        """A step's metrics: the device sums and the host's count of examples seen."""
        self.accumulate(loss, logits, labels)
        self.seen += int(labels.shape[0])


@dataclasses.dataclass
class Loop:
    """What the callbacks see of a running fit (all host values but the meter's sums)."""

    model: Module
    optimizer: Optimizer
    loader: DataLoader
    epochs: int
    scheduler: LRSchedule | None
    callbacks: list
    history: list
    meter: Meter  # the running sums: one for the fit, reset in place at each epoch
    epoch: int = 0  # the current epoch, 0-based
    step: int = 0  # batches done in it
    started: float = 0.0  # perf_counter at the epoch's (or the resume's) start
    seconds_before: float = 0.0  # of this epoch, before a resume
    stop: bool = False  # set by a callback: stop before the next step
    graph: Any = None  # the training step as a CUDA graph (cuda/graph.py), once made

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def read_sums(self) -> tuple[float, float]:
        """(loss sum, hits) of the epoch so far: a host sync; then every callback's on_sums."""
        loss_sum, hits = read_metrics(self.meter.loss_sum, self.meter.correct)
        self.call("on_sums", loss_sum, hits)
        return loss_sum, hits

    def position(self, loss_sum: float, hits: float) -> Position:
        return Position(self.epoch, self.step, loss_sum, int(hits), self.meter.seen, self.elapsed())

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started


class Callback:
    """One concern of a training run (see cnn_gpu.callbacks). :func:`fit` calls the hooks in the
    order the callbacks were given: ``on_train_begin(loop)``, ``on_epoch_begin(loop)``,
    ``on_step(loop)`` after every step (host values only: reading the device here would add a
    sync per step), ``on_steps_end(loop)`` when an epoch's steps end (done, stopped or failed:
    close what on_epoch_begin opened), ``on_sums(loop, loss_sum, hits)`` after every read of the
    running sums, ``on_epoch_end(loop, stats)`` (fill in or report the epoch's EpochStats) and
    ``on_train_end(loop)``. A callback stops the loop by setting ``loop.stop``."""

    def on_train_begin(self, loop: Loop) -> None:
        pass

    def on_epoch_begin(self, loop: Loop) -> None:
        pass

    def on_step(self, loop: Loop) -> None:
        pass

    def on_steps_end(self, loop: Loop) -> None:
        pass

    def on_sums(self, loop: Loop, loss_sum: float, hits: float) -> None:
        pass

    def on_epoch_end(self, loop: Loop, stats: EpochStats) -> None:
        pass

    def on_train_end(self, loop: Loop) -> None:
        pass


class StopOnNonFinite(Callback):
    """Raise NonFiniteLossError, naming the first bad step, when a read of the sums finds the loss
    not finite. Only then is the step located: one more read, of the per-step losses (the run is
    over anyway). fit adds one unless given."""

    def on_sums(self, loop: Loop, loss_sum: float, hits: float) -> None:
        if np.isfinite(loss_sum):
            return
        m = loop.meter
        window = m.step_losses[m.first : loop.step]
        finite = get_array_module(window).isfinite(window)
        (offset,) = read_metrics(finite.argmin())  # argmin of a bool array: the first False
        (value,) = read_metrics(window[int(offset)])
        step = m.first + int(offset) + 1
        global_step = loop.epoch * loop.steps_per_epoch + step
        raise NonFiniteLossError(
            f"non-finite training loss ({value}) at epoch {loop.epoch + 1}, step {step} of "
            f"{loop.steps_per_epoch} (global step {global_step})",
            loop.epoch + 1,
            step,
            global_step,
            value,
        )


def evaluate(model: Module, x: Any, y: Any, batch_size: int = 512, *, cuda_graph: Any = "auto") -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on (x, y) in eval mode; restores the model's mode.
    ``cuda_graph`` ("auto", True, False): on CuPy arrays each full batch's forward and loss replay
    one CUDA graph (captured at the first batch; "auto": its first replay checked once); a last
    partial batch runs eagerly."""
    if int(x.shape[0]) == 0:  # the mean over no examples is undefined
        raise ValueError(f"x: expected at least one example to evaluate, got an array of shape {tuple(x.shape)}")
    xp = backend_of(x)  # a HostImages (data kept on the host) goes to its device batch by batch
    graphed = _graphs_on(cuda_graph, xp)
    was_training = model.training
    model.eval()
    loss_fn = CrossEntropyLoss(validate_range=False)
    meter = Meter(xp, 0)

    def forward(xb, yb):  # the forward, the loss and the sums: one graph
        logits = model.forward(xb)
        loss = loss_fn.forward(logits, yb)
        meter.accumulate(loss, logits, yb)
        return loss

    step = _batch_graph(forward, graphed, "evaluation batch", cuda_graph, meter.arrays)
    try:
        for xb, yb in DataLoader(x, y, batch_size).epoch(0):
            step(xb, yb)
    finally:
        if graphed:
            step.close()
        model.train(was_training)
    loss, hits = read_metrics(meter.loss_sum, meter.correct)
    n = int(x.shape[0])
    return loss / n, hits / n


def _batch_graph(forward: Callable, graphed: bool, name: str, mode: Any, state: Callable | None = None):
    """``forward`` as a StepGraph (cuda/graph.py: captured at the first batch, replayed for every
    batch of that shape; "auto": its first replay checked once), or itself when not ``graphed``."""
    if not graphed:
        return forward
    from .cuda.graph import StepGraph  # noqa: PLC0415

    return StepGraph(forward, name=name, state=state, check=mode == "auto", say=_say)


def predict_proba(model: Module, x: Any, batch_size: int = 512, *, cuda_graph: Any = "auto"):
    """Class probabilities (softmax of the logits), shape (N, K), of ``model`` on ``x`` in eval
    mode, on x's backend; restores the model's mode. ``cuda_graph`` as in :func:`evaluate`: on
    CuPy arrays each full batch replays one CUDA graph; a last partial batch runs eagerly."""
    if not hasattr(x, "shape") or len(x.shape) < 1 or int(x.shape[0]) == 0:
        raise ValueError(f"x: expected an array of at least one example, got {getattr(x, 'shape', type(x).__name__)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    from .functional import softmax  # noqa: PLC0415

    xp, n = get_array_module(x), int(x.shape[0])
    graphed = _graphs_on(cuda_graph, xp)
    was_training = model.training
    model.eval()
    step = _batch_graph(lambda xb: softmax(model.forward(xb), axis=1), graphed, "prediction batch", cuda_graph)
    probs = None
    try:
        for first in range(0, n, int(batch_size)):
            p = step(x[first : first + batch_size])  # a graph's output is rewritten by its next replay: copy it out
            if probs is None:
                probs = xp.empty((n,) + tuple(p.shape[1:]), dtype=p.dtype)
            probs[first : first + p.shape[0]] = p
    finally:
        if graphed:
            step.close()
        model.train(was_training)
    return probs


def train_step(model: Module, loss_fn: CrossEntropyLoss, optimizer: Optimizer, xb, yb, max_label: int | None = None):
    """One step: forward, loss, backward (no gradient for the batch itself), update.
    Returns (loss, logits), both on the device. ``max_label``: the largest label of the data,
    checked against the model's number of outputs before anything is updated. float16 training
    (fit's precision="fp16"): the step of the optimizer's Float16Step (cnn_gpu/precision.py)."""
    half = getattr(optimizer, "float16_step", None)
    if half is not None:
        return half(xb, yb, max_label)
    optimizer.zero_grad()
    logits = model.forward(xb)
    if max_label is not None and max_label >= logits.shape[1]:
        raise ValueError(
            f"labels: expected class indices in [0, {logits.shape[1] - 1}] for a model with "
            f"{logits.shape[1]} outputs, got labels up to {max_label}"
        )
    loss = loss_fn.forward(logits, yb)
    model.backward(loss_fn.backward(), input_grad=False)
    optimizer.step()
    return loss, logits


def _run_epoch(loop: Loop, loss_fn: CrossEntropyLoss, max_label: int | None, graph: Any = None) -> None:
    """Train one epoch from loop.step; raises TrainingInterrupted when stopped mid-epoch.
    ``max_label`` is checked at the first step (always eager). ``graph``: a callable that makes
    the CUDA-graph step (cuda/graph.py training_graph), built after that first step."""
    loop.started = time.perf_counter()
    loop.call("on_epoch_begin")
    try:
        for xb, yb in loop.loader.epoch(loop.epoch, start=loop.step):
            if loop.stop:
                break
            if max_label is not None or graph is None:
                loss, logits = train_step(loop.model, loss_fn, loop.optimizer, xb, yb, max_label)
                loop.meter.accumulate(loss, logits, yb)
            else:  # the graph's step adds into the sums itself
                loop.graph = loop.graph or graph()
                loop.graph(xb, yb)
            max_label = None
            if loop.scheduler is not None:
                loop.scheduler.step()
            loop.meter.seen += int(yb.shape[0])
            loop.step += 1
            try:
                loop.call("on_step")
            except KeyboardInterrupt:  # raised by a callback: a stop request at this consistent point
                loop.stop = True
    finally:
        loop.call("on_steps_end")
    loss_sum, hits = loop.read_sums()  # the one sync of the epoch
    if loop.step < loop.steps_per_epoch:  # stopped mid-epoch, between two steps
        raise TrainingInterrupted(loop.position(loss_sum, hits), loop.history)
    seconds, seen = loop.elapsed(), max(loop.meter.seen, 1)
    stats = EpochStats(
        loop.epoch + 1,
        loss_sum / seen,
        hits / seen,
        loop.optimizer.lr,
        loop.meter.seen / seconds if seconds > 0 else float("inf"),
        seconds,
        steps=loop.step,
    )
    loop.call("on_epoch_end", stats)
    loop.history.append(stats)


CUDA_GRAPH_MODES = ("auto", True, False)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _graphs_on(mode: Any, xp) -> bool:
    """Whether to capture CUDA graphs: ``mode`` "auto" (CuPy arrays: yes; NumPy: no), True (CuPy
    arrays only) or False; on CuPy without stream capture, no (saying why)."""
    if mode not in CUDA_GRAPH_MODES or isinstance(mode, int) and not isinstance(mode, bool):
        raise ValueError(f"cuda_graph: expected one of 'auto', True, False, got {mode!r}")
    if mode is False or (mode == "auto" and xp is np):
        return False
    if xp is np:
        raise ValueError(
            "cuda_graph: CUDA graphs replay GPU work: expected the arrays on CuPy, got NumPy arrays "
            "(use cuda_graph='auto' or False)"
        )
    from .cuda.graph import graphs_usable  # noqa: PLC0415  (CuPy runs only)

    why = graphs_usable()
    if why:
        _say(f"cuda graph: off ({why}); running eagerly")
    return not why


def _graph_maker(mode: Any, xp, model, loss_fn, optimizer, meter: Meter):
    """The maker of fit's CUDA-graph training step (cuda/graph.py training_graph), or None (eager):
    the step and its metric sums (into ``meter``'s arrays, which live as long as the fit); with
    "auto" its first replay is checked against an eager step."""
    if not _graphs_on(mode, xp):
        return None
    from .cuda.graph import training_graph  # noqa: PLC0415

    def step(x, y):
        loss, logits = train_step(model, loss_fn, optimizer, x, y)
        meter.accumulate(loss, logits, y)
        return loss, logits

    return lambda: training_graph(model, optimizer, step, check=mode == "auto", say=_say, extra_state=meter.arrays)


def fit(
    model: Module,
    optimizer: Optimizer,
    loader: DataLoader,
    epochs: int,
    *,
    scheduler: LRSchedule | None = None,
    callbacks: Sequence = (),
    position: Position | None = None,
    label_smoothing: float = 0.0,
    cuda_graph: Any = "auto",
    precision: str = "fp32",
):
    """Train from ``position`` (default: the start) to the end of epoch ``epochs``; -> the EpochStats
    of the epochs run. ``callbacks`` (cnn_gpu.callbacks) run in order at each hook; a
    StopOnNonFinite is added first unless one is given. The labels' range is checked once (one
    host read), against the model's outputs at the first step. Raises NonFiniteLossError (naming
    the epoch and step) and TrainingInterrupted (with the position to resume from) when a
    callback stops the loop. ``label_smoothing``: the loss's (nn.CrossEntropyLoss); the loader's
    ``transform`` augments the batches. ``cuda_graph`` ("auto", True, False): on CuPy arrays the
    training step is captured once as a CUDA graph and replayed each batch (cuda/graph.py; "auto":
    the first replay is checked once against an eager step); the first step of a fit and a last
    partial batch run eagerly, and a step that cannot be captured runs eagerly, saying why.
    ``precision`` ("fp32", "tf32", "fp16"; cnn_gpu/precision.py, docs/PRECISION.md): "tf32" runs the
    GEMMs in TF32 tensor-core math for the fit; "fp16" trains with float16 activations, float32
    master weights and loss scaling on the device; the cuda engine only (the CPU engine refuses
    both)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs: expected a non-negative int, got {epochs!r}")
    if len(loader) == 0:  # an epoch of no steps has no mean loss to report
        raise ValueError(f"loader: expected at least one batch, got a loader of {loader.num_examples} examples")
    precision = check_precision(precision, loader.x)
    max_label = _check_labels(loader)
    position = position or Position()
    if not 0 <= position.step <= len(loader):
        raise ValueError(f"position.step: expected a step in [0, {len(loader)}], got {position.step}")
    cbs = list(callbacks)
    if not any(isinstance(cb, StopOnNonFinite) for cb in cbs):
        cbs.insert(0, StopOnNonFinite())
    xp = backend_of(loader.x)
    loop = Loop(model, optimizer, loader, epochs, scheduler, cbs, [], Meter(xp, len(loader)))
    loss_fn = CrossEntropyLoss(validate_range=False, label_smoothing=label_smoothing)
    half = Float16Step(model, optimizer, loss_fn) if precision == "fp16" else None  # (train_step runs it)
    graph = _graph_maker(cuda_graph, xp, model, loss_fn, optimizer, loop.meter)
    model.train()
    loop.call("on_train_begin")
    try:
        with gemm_math(precision):
            _run_epochs(loop, loss_fn, max_label, graph, position)
    finally:
        if loop.graph is not None:  # the optimizer and the Dropouts step eagerly again after fit
            loop.graph.close()
        if half is not None:  # float32 steps again after fit
            half.close()
    loop.call("on_train_end")
    return loop.history


def _run_epochs(loop: Loop, loss_fn: CrossEntropyLoss, max_label: int | None, graph: Any, position: Position) -> None:
    """fit's epochs, from ``position`` to the end of epoch ``loop.epochs``."""
    epochs = loop.epochs
    for epoch in range(position.epoch, epochs):
        resuming = epoch == position.epoch
        p = position if resuming else Position(epoch)
        loop.epoch, loop.step, loop.seconds_before = epoch, p.step, p.seconds
        loop.meter.reset(p.step, p.loss_sum, p.correct, p.seen)
        _run_epoch(loop, loss_fn, max_label, graph)
        max_label = None
        if loop.stop and epoch + 1 < epochs:
            raise TrainingInterrupted(Position(epoch + 1), loop.history)


def _check_labels(loader: DataLoader) -> int | None:
    """Integer labels >= 0 (one host read, before training); -> the largest label, checked against
    the model's outputs at the first step."""
    labels = loader.y
    if labels.dtype.kind not in "iu":
        raise TypeError(f"loader.y: expected integer class labels, got dtype {labels.dtype}")
    if not labels.shape[0]:
        return None
    lo, hi = (int(v) for v in read_metrics(labels.min(), labels.max()))
    if lo < 0:
        raise ValueError(f"loader.y: expected class labels >= 0, got {lo}")
    return hi


def format_stats(stats: EpochStats, epochs: int) -> str:
    """The one-line summary of an epoch."""
    msg = (
        f"epoch {stats.epoch}/{epochs}  loss {stats.train_loss:.4f}  acc {100 * stats.train_accuracy:.2f}%  "
        f"lr {stats.lr:.3g}  {stats.images_per_s:.0f} img/s  {stats.seconds:.1f} s"
    )
    if stats.val_accuracy is not None:
        msg += f"  val loss {stats.val_loss:.4f}  val acc {100 * stats.val_accuracy:.2f}%"
    if stats.test_accuracy is not None:
        msg += f"  test loss {stats.test_loss:.4f}  test acc {100 * stats.test_accuracy:.2f}%"
    return msg


__all__ = [
    "fit",
    "evaluate",
    "train_step",
    "read_metrics",
    "EpochStats",
    "Position",
    "Loop",
    "Meter",
    "Callback",
    "StopOnNonFinite",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "format_stats",
]
