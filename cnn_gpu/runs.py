"""Training runs: the settings, the run folder, checkpoints, resume, interrupts and plots.

A run folder (``runs/<dataset>-<model>-<time>`` by default) holds:

- ``config.json``: every setting, the seed, versions, backend and device;
- ``metrics.jsonl``: one JSON line per epoch (train / validation / test loss and accuracy,
  learning rate, images/s, seconds);
- ``curves.png``: the loss, accuracy and learning-rate curves (needs matplotlib);
- ``last.npz`` and ``best.npz``: model files (``cnn_gpu.load``) of the last epoch and of the
  best one (by validation accuracy, or test accuracy without a validation split);
- ``checkpoint.npz``: the full training state (see :mod:`cnn_gpu.checkpoint`), written after
  every epoch and when training is interrupted; ``cnn-gpu train --resume DIR`` continues from it.

Every file is written atomically (temporary file, fsync, rename). :class:`RunDir` is the folder;
the callbacks :class:`RecordMetrics`, :class:`SaveModels` and :class:`SaveCheckpoint` fill it
while :func:`cnn_gpu.train.fit` runs, and :func:`train_run` is ``cnn-gpu train``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__, config, distributed, optim
from .backend import _cupy_status, backend_module, current_xp, use_backend
from .callbacks import Evaluate, PrintLog, ProgressBar, StopRequest
from .checkpoint import Checkpoint, load_checkpoint, restore, save_checkpoint
from .data import channel_stats, get_dataset, normalize, split_validation
from .data.augment import AUGMENTATIONS, from_name as augmentation
from .data.loader import DataLoader
from .io import atomic_write
from .models import ANY_SIZE_FROM, MODELS, accepts_size, get_model
from .random import manual_seed
from .serialization import save as save_model
from .train import Callback, NonFiniteLossError, Position, TrainingInterrupted, evaluate, fit

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
CHECKPOINT_FILE = "checkpoint.npz"
LAST_FILE = "last.npz"
BEST_FILE = "best.npz"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, PLOT_FILE, CHECKPOINT_FILE, LAST_FILE, BEST_FILE)
RUNS_ROOT = "runs"
PLOT_EVERY_S = 60.0  # curves.png is redrawn at the end of a run, and at most this often during it

# Per-dataset defaults (the flags override them): model, epochs, batch size, optimizer, peak
# learning rate, schedule, the fraction of the steps spent warming up (one-cycle: rising to the
# peak), SGD momentum style, weight decay. MNIST: SGD with Nesterov momentum under a one-cycle
# schedule, the well-known fast recipe for small CNNs (see the README for the evidence).
_SGD_ONECYCLE = dict(optimizer="sgd", lr=0.05, schedule="onecycle", warmup=0.25, nesterov=True, weight_decay=5e-4)
RECIPES = {
    "digits": dict(model="lenet_digits", epochs=20, batch_size=32, optimizer="adam", lr=3e-3, schedule="onecycle",
                   warmup=0.3, nesterov=False, weight_decay=0.0),
    "mnist": dict(model="lenet5", epochs=3, batch_size=128, **_SGD_ONECYCLE),
    # Fashion-MNIST: the same, longer, at twice the peak rate, with horizontal flips (tuned on a
    # validation split of the real data: README, "Datasets")
    "fashion-mnist": dict(model="lenet5", epochs=30, batch_size=128, **dict(_SGD_ONECYCLE, lr=0.1), augment="flip"),
    # CIFAR-10: He et al. 2016's ResNet-20 with the standard augmentation (4-pixel padded random
    # crops, horizontal flips), SGD with Nesterov momentum under one-cycle, label smoothing 0.1
    "cifar10": dict(model="resnet20", epochs=30, batch_size=128, optimizer="sgd", lr=0.1, schedule="onecycle",
                    warmup=0.15, nesterov=True, weight_decay=5e-4, augment="crop-flip", label_smoothing=0.1),
}

# A dataset's recipe for another model than its own, where that model trains differently (the
# settings given here replace the dataset's; the rest, e.g. the augmentation, stay).
MODEL_RECIPES = {
    ("cifar10", "vgg_small"): dict(epochs=20, optimizer="adam", lr=2e-3, warmup=0.3, nesterov=False,
                                   weight_decay=0.0),  # no BatchNorm: Adam at 2e-3, not SGD at 0.1
}

# What a run uses when neither the flags nor the dataset's recipe say (a recipe may set these too,
# e.g. augment="crop-flip", label_smoothing=0.1); also what a run saved before they existed used.
RECIPE_DEFAULTS = dict(augment="none", label_smoothing=0.0)

# Settings that shape the trained weights: fixed for a run (``--resume`` keeps them).
RUN_SETTINGS = ("dataset", "model", "epochs", "batch_size", "optimizer", "lr", "schedule", "warmup", "momentum",
                "nesterov", "weight_decay", "seed", "val_fraction", "augment", "label_smoothing")
PROGRESS_MODES = ("auto", "bar", "plain", "none")
CUDA_GRAPH_SETTINGS = {"auto": "auto", "on": True, "off": False}  # --cuda-graph -> fit(cuda_graph=)


@dataclasses.dataclass
class TrainConfig:
    """Everything ``cnn-gpu train`` takes; None means "the dataset's recipe" (see RECIPES)."""

    dataset: str = "digits"
    data_dir: str | None = None
    model: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    schedule: str | None = None
    warmup: float | None = None
    momentum: float = 0.9
    nesterov: bool | None = None
    weight_decay: float | None = None
    val_fraction: float = 0.0
    backend: str | None = None  # None: $CNN_GPU_BACKEND (through cnn_gpu.config), else auto (default_backend)
    seed: int = 0
    save: str | None = None
    run_dir: str | None = None
    progress: str = "auto"
    quiet: bool = False
    workspace_mb: float | None = None  # cap on one convolution's im2col workspace (cnn_gpu.set_workspace_limit)
    augment: str | None = None  # training-batch augmentation, one of data.augment.AUGMENTATIONS
    label_smoothing: float | None = None  # the loss's label smoothing, in [0, 1]
    cuda_graph: str = "auto"  # the GPU training step as one CUDA graph: auto (on for CuPy), on, off (fit's cuda_graph)

    def with_defaults(self) -> "TrainConfig":
        """A copy with the settings still None after the recipe taken from RECIPE_DEFAULTS."""
        return dataclasses.replace(self, **{k: v for k, v in RECIPE_DEFAULTS.items() if getattr(self, k) is None})

    def resolved(self) -> "TrainConfig":
        """A copy with every None filled from the dataset's recipe, checked."""
        if self.dataset not in RECIPES:
            raise ValueError(f"dataset: expected one of {sorted(RECIPES)}, got {self.dataset!r}")
        recipe = dict(RECIPES[self.dataset], **MODEL_RECIPES.get((self.dataset, self.model), {}))
        cfg = dataclasses.replace(self, **{k: v for k, v in recipe.items() if getattr(self, k) is None}).with_defaults()
        cfg = dataclasses.replace(cfg, backend=cfg.backend or default_backend())
        cfg.check()
        return cfg

    def check(self) -> None:
        def bad(name, expected, got):
            return ValueError(f"{name}: expected {expected}, got {got!r}")

        if self.model not in MODELS:
            raise bad("model", f"one of {sorted(MODELS)}", self.model)
        if self.optimizer not in optim.OPTIMIZERS:
            raise bad("optimizer", f"one of {sorted(optim.OPTIMIZERS)}", self.optimizer)
        if self.schedule not in (*optim.SCHEDULES, "none"):
            raise bad("schedule", f"one of {sorted(optim.SCHEDULES) + ['none']}", self.schedule)
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "a positive int", v)
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise bad("lr", "a positive number", self.lr)
        if not isinstance(self.warmup, (int, float)) or not 0.0 <= self.warmup < 1.0:
            raise bad("warmup", "a fraction in [0, 1)", self.warmup)
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 <= self.val_fraction < 1.0:
            raise bad("val_fraction", "a fraction in [0, 1)", self.val_fraction)
        if not isinstance(self.nesterov, bool):
            raise bad("nesterov", "True or False", self.nesterov)
        if not isinstance(self.momentum, (int, float)) or not 0.0 <= self.momentum < 1.0:
            raise bad("momentum", "a float in [0, 1)", self.momentum)
        if not isinstance(self.weight_decay, (int, float)) or not self.weight_decay >= 0:
            raise bad("weight_decay", "a non-negative float", self.weight_decay)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise bad("seed", "a non-negative int", self.seed)
        if self.backend not in config.BACKENDS:
            raise bad("backend", f"one of {config.BACKENDS}", self.backend)
        if self.progress not in PROGRESS_MODES:
            raise bad("progress", f"one of {PROGRESS_MODES}", self.progress)
        if self.augment not in AUGMENTATIONS:
            raise bad("augment", f"one of {AUGMENTATIONS}", self.augment)
        ls = self.label_smoothing
        if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not 0.0 <= ls <= 1.0:
            raise bad("label_smoothing", "a number in [0, 1]", ls)
        if self.cuda_graph not in CUDA_GRAPH_SETTINGS:
            raise bad("cuda_graph", f"one of {tuple(CUDA_GRAPH_SETTINGS)}", self.cuda_graph)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def default_backend() -> str:
    """The backend of a run that names none: the ``backend`` setting when the environment
    (``CNN_GPU_BACKEND``) or the code (``cnn_gpu.config.override``) sets it, else ``auto``."""
    setting = config.get().backend
    return setting if "backend" in config.given_by_environment() or setting != config.Config.backend else "auto"


class RunStopped(Exception):
    """Training stopped before the end (interrupt, non-finite loss); ``exit_code`` for the CLI."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    config: TrainConfig
    history: list  # metrics rows (dicts), all epochs of the run
    test_loss: float
    test_accuracy: float
    best: dict


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------
def make_optimizer(cfg: TrainConfig, model):
    if cfg.optimizer == "sgd":
        return optim.SGD(model, cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    return optim.OPTIMIZERS[cfg.optimizer](model, cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """The learning-rate schedule of ``cfg`` (stepped once per batch), or None."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return optim.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(total, 2), pct_start=cfg.warmup)
    if cfg.schedule == "cosine":
        warm = min(int(round(cfg.warmup * total)), max(total - 1, 0))
        return optim.CosineLR(optimizer, total_steps=max(total, 1), warmup_steps=warm)
    if cfg.schedule == "step":
        return optim.StepLR(optimizer, step_size=max(1, total // 3))
    return None



def _describe_optimizer(cfg: TrainConfig) -> str:
    text = f"{cfg.optimizer} lr {cfg.lr:g}"
    if cfg.optimizer == "sgd":
        text += f" ({'Nesterov ' if cfg.nesterov else ''}momentum {cfg.momentum:g}"
        text += f", weight decay {cfg.weight_decay:g})" if cfg.weight_decay else ")"
    elif cfg.weight_decay:
        text += f" (weight decay {cfg.weight_decay:g})"
    return text


def environment(backend: str) -> dict:
    """Versions, backend and device, for config.json."""
    env = {"cnn_gpu": __version__, "python": platform.python_version(), "numpy": np.__version__,
           "platform": platform.platform(), "backend": backend}
    if backend == "cupy":
        import cupy  # noqa: PLC0415

        rt = cupy.cuda.runtime
        dev = cupy.cuda.Device()
        props = rt.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        env.update(cupy=cupy.__version__, cuda_runtime=rt.runtimeGetVersion(), cuda_driver=rt.driverGetVersion(),
                   device=f"GPU {dev.id}: {name}")
    else:
        env["device"] = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"
    return env


def _json_dump(path: Path, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def load_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} a run folder?)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not a JSON line ({exc})") from None
    return rows


def plot_run(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Draw loss, accuracy and learning rate per epoch from metrics.jsonl into a PNG (curves.png)."""
    rows = load_metrics(run_dir)
    if not rows:
        raise ValueError(f"{Path(run_dir) / METRICS_FILE}: no epochs to plot yet")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (optional, heavy)
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError:
        raise PlotUnavailable("plotting needs matplotlib, which is not installed: "
                              "pip install 'cnn_gpu[plot]' (or pip install matplotlib)") from None
    path = Path(path) if path is not None else Path(run_dir) / PLOT_FILE
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global state, no display needed
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    for split, style in (("train", "-o"), ("val", "-s"), ("test", "-^")):
        losses = [r.get(f"{split}_loss") for r in rows]
        accs = [r.get(f"{split}_accuracy") for r in rows]
        if any(v is not None for v in losses):
            ax_loss.plot(epochs, [np.nan if v is None else v for v in losses], style, ms=3, label=split)
        if any(v is not None for v in accs):
            ax_acc.plot(epochs, [np.nan if v is None else 100 * v for v in accs], style, ms=3, label=split)
    ax_lr.plot(epochs, [r.get("lr") for r in rows], "-o", ms=3)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy (%)"), (ax_lr, "learning rate (end of epoch)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_acc.legend()
    fig.suptitle(Path(run_dir).resolve().name)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    return path


# --------------------------------------------------------------------------------------
# the run folder
# --------------------------------------------------------------------------------------
class RunDir:
    """A run folder and the files in it (see the module docs); every write is atomic."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    @classmethod
    def create(cls, dataset: str, model: str, path: str | os.PathLike | None = None) -> "RunDir":
        """``path`` (a new folder, or one that holds no run yet: nothing, or only the config.json of a
        run that stopped before its first epoch ended), or a fresh runs/<dataset>-<model>-<time>."""
        if path is not None:
            run = cls(path)
            if run.path.exists() and not run.path.is_dir():
                raise ValueError(f"run_dir: expected a folder, got {run}, which is a file")
            taken = [n for n in (CHECKPOINT_FILE, METRICS_FILE) if run.file(n).exists()]
            if taken:
                raise ValueError(f"run_dir: expected a new or empty folder, got {run}, which already holds a run "
                                 f"({', '.join(taken)}); continue it with --resume {run} or choose another --run-dir")
            run.path.mkdir(parents=True, exist_ok=True)
            run.clean_orphans()
            return run
        base = Path(RUNS_ROOT) / f"{dataset}-{model}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        path.mkdir(parents=True)
        return cls(path)

    @classmethod
    def resumable(cls, path: str | os.PathLike) -> "RunDir":
        """An existing run folder with a checkpoint to continue from. ``path`` may also be a file
        in it (checkpoint.npz, last.npz, best.npz, config.json, ...): its folder is the run."""
        given = Path(path)
        run = cls(given.parent if given.is_file() and (given.parent / CHECKPOINT_FILE).is_file() else given)
        if given.is_file() and run.path == given:
            raise ValueError(f"resume: expected a run folder (or its {CHECKPOINT_FILE}), got {given}, a file outside "
                             f"any run folder; a model file can be evaluated (cnn-gpu evaluate --checkpoint {given}) "
                             "but holds no training state to continue from")
        if not run.path.is_dir():
            parent = given.parent if given.suffix else given
            raise FileNotFoundError(f"resume: expected a run folder, got {given}, which does not exist"
                                    + (f" (nor does {parent})" if parent != given and not parent.exists() else ""))
        if not run.file(CHECKPOINT_FILE).is_file():
            hint = (f"the run stopped before its first epoch ended; start it again with --run-dir {run}"
                    if run.file(CONFIG_FILE).is_file() and not run.file(METRICS_FILE).exists()
                    else "is it a run folder written by cnn-gpu train?")
            raise FileNotFoundError(f"resume: expected {run.file(CHECKPOINT_FILE)} (a run folder with a checkpoint), "
                                    f"which does not exist: {hint}")
        run.clean_orphans()
        return run

    def clean_orphans(self) -> list[Path]:
        """Remove the temporary files (``.NAME.*.tmp``) that a killed atomic write of one of the run's
        files left behind; -> those removed."""
        removed = []
        for name in RUN_FILES:
            for tmp in self.path.glob(f".{name}.*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                    removed.append(tmp)
        return removed

    def read_config(self) -> dict:
        path = self.file(CONFIG_FILE)
        return json.loads(path.read_text()) if path.exists() else {}

    def write_config(self, doc: dict) -> None:
        _json_dump(self.file(CONFIG_FILE), doc)

    def metrics(self) -> list[dict]:
        return load_metrics(self.path) if self.file(METRICS_FILE).exists() else []

    def write_metrics(self, rows: list[dict]) -> None:
        """Rewrite metrics.jsonl with one line per epoch."""
        with atomic_write(self.file(METRICS_FILE), "w") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")

    def plot(self) -> Path:
        return plot_run(self.path)


# --------------------------------------------------------------------------------------
# the run's callbacks
# --------------------------------------------------------------------------------------
class RecordMetrics(Callback):
    """metrics.jsonl: a row per completed epoch; curves.png at most every PLOT_EVERY_S seconds
    during the run (and at the end, by :meth:`plot`)."""

    def __init__(self, run: RunDir, rows: list[dict], say: Callable[[str], None]):
        self.run, self.rows, self.say = run, rows, say
        self.plotted, self.warned = time.monotonic(), False

    def on_epoch_end(self, loop, stats) -> None:
        row = stats.as_dict()
        row["time"] = _dt.datetime.now().isoformat(timespec="seconds")
        self.rows.append(row)
        self.run.write_metrics(self.rows)
        if time.monotonic() - self.plotted >= PLOT_EVERY_S:
            self.plot()

    def plot(self) -> None:
        self.plotted = time.monotonic()
        if not self.rows:
            return
        try:
            self.run.plot()
        except PlotUnavailable as exc:
            if not self.warned:
                self.say(f"note: no {PLOT_FILE}: {exc}; training goes on")
                self.warned = True


class SaveModels(Callback):
    """last.npz after every epoch, best.npz after every epoch that beats the best so far (by
    ``best["metric"]``, e.g. val_accuracy); ``best`` is kept up to date for the checkpoint."""

    def __init__(self, run: RunDir, cfg: TrainConfig, metadata: dict, best: dict):
        self.run, self.cfg, self.metadata, self.best = run, cfg, metadata, best

    def on_epoch_end(self, loop, stats) -> None:
        row = stats.as_dict()
        meta = dict(self.metadata, epoch=stats.epoch, config=self.cfg.as_dict(), metrics={
            k: row[k] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy")})
        save_model(loop.model, self.run.file(LAST_FILE), metadata=meta)
        value = row[self.best["metric"]]
        if value is not None and (self.best["value"] is None or value > self.best["value"]):
            self.best.update(value=value, epoch=stats.epoch)
            save_model(loop.model, self.run.file(BEST_FILE), metadata=meta)


class SaveCheckpoint(Callback):
    """checkpoint.npz after every epoch (put it last: everything before it is consistent with it),
    and :meth:`save` at any position (an interrupt). ``kept`` says which checkpoint is good."""

    def __init__(self, run: RunDir, cfg: TrainConfig, metadata: dict, best: dict, kept: str | None = None):
        self.run, self.cfg, self.metadata, self.best, self.kept = run, cfg, metadata, best, kept
        self.path = run.file(CHECKPOINT_FILE)

    def save(self, loop, position: Position) -> None:
        save_checkpoint(self.path, loop.model, loop.optimizer, loop.scheduler, position=position, loader=loop.loader,
                        config=self.cfg.as_dict(), metadata=self.metadata,
                        extra={"best": self.best, "ranks": distributed.init().size})

    def on_epoch_end(self, loop, stats) -> None:
        self.save(loop, Position(stats.epoch))
        self.kept = f"the last good checkpoint (end of epoch {stats.epoch}) is kept in {self.path}"


@contextlib.contextmanager
def _sigint_requests_stop(stop: StopRequest, say: Callable[[str], None]):
    """While training: the first Ctrl-C asks fit to stop between steps (and save); a second aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.request()
        say("\nCtrl-C: stopping after the current step and saving a checkpoint (Ctrl-C again aborts without saving)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# the run: cnn-gpu train
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Data:
    """A run's data on the host, split and with its normalisation; ``metadata`` goes into model files."""

    train: tuple
    val: tuple | None
    test: tuple
    metadata: dict


@dataclasses.dataclass
class _Session:
    """A run's objects on its backend."""

    model: Any
    optimizer: Any
    scheduler: Any
    loader: DataLoader
    position: Position
    val: tuple | None
    test: tuple
    backend: str


def _settings(cfg: TrainConfig, resume) -> tuple[TrainConfig, Checkpoint | None, RunDir | None]:
    """The run's settings: ``cfg`` with the recipe filled in, or those saved in the run to resume
    (only data_dir, backend, save, progress, quiet and cuda_graph come from ``cfg`` then)."""
    if resume is None:
        return cfg.resolved(), None, None
    run = RunDir.resumable(resume)
    ckpt = load_checkpoint(run.file(CHECKPOINT_FILE))
    saved = TrainConfig.from_dict(ckpt.config).with_defaults()
    cfg = dataclasses.replace(saved, data_dir=cfg.data_dir if cfg.data_dir is not None else saved.data_dir,
                              backend=cfg.backend or default_backend(), save=cfg.save, progress=cfg.progress, quiet=cfg.quiet,
                              cuda_graph=cfg.cuda_graph, run_dir=str(run))
    cfg.check()
    return cfg, ckpt, run


def _load_data(cfg: TrainConfig, ckpt: Checkpoint | None) -> _Data:
    """The dataset, the validation split and the normalisation of the training part."""
    ds = get_dataset(cfg.dataset, cfg.data_dir)
    want = MODELS[cfg.model][1]
    if not accepts_size(cfg.model, ds.input_shape[1:]):
        size = f"at least {ANY_SIZE_FROM[cfg.model]}x{ANY_SIZE_FROM[cfg.model]}" if cfg.model in ANY_SIZE_FROM \
            else f"{want[1]}x{want[2]}"
        raise ValueError(f"model: {cfg.model} expects {size} inputs, but dataset {cfg.dataset} has "
                         f"{ds.input_shape[1]}x{ds.input_shape[2]} images; choose another --model")
    train, val = (ds.x_train, ds.y_train), None
    if cfg.val_fraction > 0:
        train, val = split_validation(ds.x_train, ds.y_train, cfg.val_fraction)
    mean, std = channel_stats(train[0], ds.scale)
    metadata = {"dataset": cfg.dataset, "mean": list(map(float, mean)), "std": list(map(float, std)),
                "scale": ds.scale, "input_shape": list(ds.input_shape), "num_classes": ds.num_classes,
                "model": cfg.model}
    if ckpt is not None and any(not np.allclose(ckpt.metadata.get(k), metadata[k]) for k in ("mean", "std")):
        raise ValueError(f"{ckpt.path}: the training data differ from the run's (other normalisation statistics)")

    def prepared(x, y):
        return normalize(x, mean, std, ds.scale), y

    return _Data(prepared(*train), None if val is None else prepared(*val), prepared(ds.x_test, ds.y_test), metadata)


def _build(cfg: TrainConfig, data: _Data, ckpt: Checkpoint | None) -> _Session:
    """Upload the data once and build the model, optimizer, loader and schedule (from the
    checkpoint when resuming), on the current backend."""
    manual_seed(cfg.seed)
    xp = current_xp()

    def upload(pair):
        return None if pair is None else (xp.asarray(pair[0]), xp.asarray(pair[1]))

    meta, comm = data.metadata, distributed.init()
    model = get_model(cfg.model, in_channels=meta["input_shape"][0], num_classes=meta["num_classes"])
    opt = make_optimizer(cfg, model)
    x_train, y_train = upload(data.train)
    transform = augmentation(cfg.augment, meta["input_shape"])
    if comm.size > 1:  # data-parallel: each rank its shard of every global batch, gradients averaged
        loader = distributed.ShardedLoader(x_train, y_train, cfg.batch_size, comm, shuffle=True, seed=cfg.seed,
                                           transform=transform)
        opt = distributed.DistributedOptimizer(opt, comm, loader)
    else:
        loader = DataLoader(x_train, y_train, cfg.batch_size, shuffle=True, seed=cfg.seed, transform=transform)
    sched = make_schedule(cfg, opt, len(loader))
    position = restore(ckpt, model, opt, sched, loader) if ckpt is not None else Position()
    if comm.size > 1:
        distributed.broadcast_parameters(model, comm)
        distributed.decorrelate_dropout(model, comm)
        position = distributed.resumed_position(position, comm)
    return _Session(model, opt, sched, loader, position, upload(data.val), upload(data.test),
                    "numpy" if xp is np else "cupy")


def _config_doc(cfg: TrainConfig, data: _Data, s: _Session, run: RunDir, resumed: bool) -> dict:
    """config.json: the settings, data, environment and command line; a resume is appended."""
    env = environment(s.backend)
    if resumed:
        doc = run.read_config()
        doc.setdefault("resumed", []).append({"at": _dt.datetime.now().isoformat(timespec="seconds"),
                                              "epoch": s.position.epoch, "step": s.position.step,
                                              "backend": s.backend, "environment": env})
        return doc
    sizes = {"train": len(data.train[1]), "val": 0 if data.val is None else len(data.val[1]),
             "test": len(data.test[1]), "steps_per_epoch": len(s.loader)}
    return {"config": cfg.as_dict(), "seed": cfg.seed, "environment": env, "data": {**sizes, **data.metadata},
            "parameters": s.model.num_parameters(), "command": sys.argv,
            "started": _dt.datetime.now().isoformat(timespec="seconds")}


def _backend_line(asked: str, used: str) -> str:
    """The first line of a run: which backend and device compute it, and why (for ``auto``)."""
    line = f"backend: {used} on {environment(used)['device']}"
    if asked == "auto":
        line += " (auto: " + ("a GPU is usable)" if used == "cupy" else f"no usable GPU: {_cupy_status()[1]})")
    return line


def _banner(cfg: TrainConfig, data: _Data, s: _Session, run: RunDir, resumed: bool) -> str:
    if resumed:
        at = f", step {s.position.step}/{len(s.loader)}" if s.position.step else ""
        return f"cnn_gpu {__version__}: resuming {run} at epoch {s.position.epoch + 1}{at} of {cfg.epochs}"
    n_val = 0 if data.val is None else len(data.val[1])
    sizes = f"{len(data.train[1])} train{f' / {n_val} val' if n_val else ''} / {len(data.test[1])} test"
    return (f"cnn_gpu {__version__}: training {cfg.model} ({s.model.num_parameters():,} parameters) on {cfg.dataset} "
            f"({sizes}) with {_describe_optimizer(cfg)}, {cfg.schedule} schedule, batch {cfg.batch_size}, "
            f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, backend {s.backend}"
            + (f", augmentation {cfg.augment}" if cfg.augment != "none" else "")
            + (f", label smoothing {cfg.label_smoothing:g}" if cfg.label_smoothing else ""))


def _progress(cfg: TrainConfig, out: Callable, quiet: bool) -> list:
    """The progress display: a tqdm bar on a terminal (or with --progress bar), else epoch lines."""
    if quiet:
        return []
    if cfg.progress == "bar" or (cfg.progress == "auto" and out is print and sys.stdout.isatty()):
        with contextlib.suppress(ImportError):  # tqdm is a dependency; without it, plain lines
            return [ProgressBar(file=sys.stdout), PrintLog(out)]
    return [PrintLog(out)]


def _fit(s: _Session, cfg: TrainConfig, callbacks: list, saver: SaveCheckpoint, recorder: RecordMetrics,
         stop: StopRequest) -> None:
    """fit, with every way it can stop turned into RunStopped (after saving what can be saved)."""
    resume_hint = f"resume with: cnn-gpu train --resume {saver.run}"
    try:
        with _sigint_requests_stop(stop, _stderr):
            fit(s.model, s.optimizer, s.loader, cfg.epochs, scheduler=s.scheduler, callbacks=callbacks,
                position=s.position, label_smoothing=cfg.label_smoothing,
                cuda_graph=CUDA_GRAPH_SETTINGS[cfg.cuda_graph])
    except TrainingInterrupted as exc:
        pos = distributed.global_position(exc.position, distributed.init())  # every rank stopped at this step
        if pos.step > 0:
            saver.save(s, pos)  # the session has what a loop has: model, optimizer, scheduler, loader
            where = f"during epoch {pos.epoch + 1} after step {pos.step} of {len(s.loader)}"
        else:
            where = f"at the end of epoch {pos.epoch}"
        recorder.plot()
        stopped = RunStopped(f"interrupted {where}; checkpoint saved to {saver.path}\n{resume_hint}", 130)
        stopped.collective = True  # the same on every rank (see distributed.fail_together)
        raise stopped from None
    except NonFiniteLossError as exc:
        recorder.plot()
        raise RunStopped(f"training stopped: {exc}; {_kept(saver)}. Try a lower --lr.", 1) from None
    except KeyboardInterrupt:
        raise RunStopped(f"aborted; {_kept(saver)}" + (f"\n{resume_hint}" if saver.kept else ""), 130) from None


def _kept(saver: SaveCheckpoint) -> str:
    return saver.kept or "no checkpoint was written (no epoch completed)"


def train_run(cfg: TrainConfig, out: Callable[[str], None] = print, *, resume: str | os.PathLike | None = None,
              callbacks: list | tuple = ()) -> RunResult:
    """Train as ``cnn-gpu train`` does: a fresh run from ``cfg``, or continue the run in ``resume``.
    ``callbacks`` run after the run's own. Raises RunStopped on an interrupt or a non-finite loss
    (after saving what can be saved), ValueError / FileNotFoundError on bad input.

    Under mpiexec (cnn_gpu.distributed) every rank trains its shard of each batch; only rank 0
    prints and writes the run folder; an error on one rank aborts them all with its message."""
    # under several ranks: this rank's GPU is selected first, before the backend check's probe
    # kernel or any allocation touches one (with a CPU backend, no GPU is touched)
    comm = distributed.init(gpu=(cfg.backend or default_backend()) != "numpy")
    with distributed.fail_together(comm, "cnn-gpu train"):
        return _train_run(cfg, out, resume, list(callbacks), comm)


def _train_run(cfg: TrainConfig, out: Callable[[str], None], resume, callbacks: list, comm) -> RunResult:
    cfg, ckpt, run = _settings(cfg, resume)
    if ckpt is not None:
        distributed.check_resume(ckpt.extra.get("ranks"), comm, str(run))
    if cfg.backend != "numpy":
        comm.require_device()  # this rank could not take its GPU: say so, not a probe failure on another GPU
    backend_module(cfg.backend)  # an unusable backend is an error before anything is written
    quiet = cfg.quiet or cfg.progress == "none" or not comm.is_lead
    say = (lambda msg: None) if quiet else out
    with distributed.rank_zero_first(comm):  # one download into a shared data folder, not one per rank
        data = _load_data(cfg, ckpt)
    if run is None:
        path = str(RunDir.create(cfg.dataset, cfg.model, cfg.run_dir)) if comm.is_lead else None
        run = RunDir(comm.broadcast_object(path))  # rank 0 alone creates (and writes) the run folder
        cfg = dataclasses.replace(cfg, run_dir=str(run))
    with use_backend(cfg.backend):
        s = _build(cfg, data, ckpt)
        if comm.is_lead:
            run.write_config(dict(_config_doc(cfg, data, s, run, ckpt is not None), ranks=comm.size))
        say(_backend_line(cfg.backend, s.backend))
        say(_banner(cfg, data, s, run, ckpt is not None))
        say(f"run folder: {run}")
        rows = [r for r in run.metrics() if r["epoch"] <= s.position.epoch] if ckpt is not None else []
        best = dict(ckpt.extra.get("best")) if ckpt is not None and ckpt.extra.get("best") else {
            "metric": "val_accuracy" if s.val is not None else "test_accuracy", "value": None, "epoch": None}
        kept = None
        if ckpt is not None:
            at = f"epoch {s.position.epoch}" + (f" and step {s.position.step} of the next" if s.position.step else "")
            kept = f"the checkpoint this run resumed from ({at}) is kept in {run.file(CHECKPOINT_FILE)}"
        recorder = distributed.lead_only(RecordMetrics(run, rows, say), comm)
        saver = distributed.lead_only(SaveCheckpoint(run, cfg, data.metadata, best, kept), comm)
        models = distributed.lead_only(SaveModels(run, cfg, data.metadata, best), comm)
        stop, evals = _parallel_callbacks(s, comm)
        cbs = [stop, *evals, *_progress(cfg, out, quiet), recorder, models, saver, *callbacks]
        t0 = time.perf_counter()
        _fit(s, cfg, cbs, saver, recorder, stop)
        seconds = time.perf_counter() - t0
        recorder.plot()
        return _finish(cfg, s, run, rows, best, seconds, say, data.metadata)


def _parallel_callbacks(s: _Session, comm) -> tuple[StopRequest, list]:
    """The stop request and the evaluations: plain alone; agreed and sharded over several ranks."""
    if comm.size == 1:
        return StopRequest(), ([Evaluate(s.val, "val")] if s.val is not None else []) + [Evaluate(s.test, "test")]
    evals = [distributed.ShardedEvaluate(s.val, comm, "val")] if s.val is not None else []
    evals.append(distributed.ShardedEvaluate(s.test, comm, "test"))
    return distributed.CollectiveStop(comm), [distributed.GlobalMetrics(comm), *evals]


def _finish(cfg, s: _Session, run: RunDir, rows: list, best: dict, seconds: float, say, metadata: dict) -> RunResult:
    """The last lines of a run, the --save copy, and the result."""
    if rows and rows[-1]["epoch"] == cfg.epochs and rows[-1]["test_accuracy"] is not None:
        test_loss, test_acc = rows[-1]["test_loss"], rows[-1]["test_accuracy"]
    else:  # resumed a finished run
        test_loss, test_acc = evaluate(s.model, *s.test)
    shown = f"{100 * best['value']:.2f}% (epoch {best['epoch']})" if best["value"] is not None else "n/a"
    say(f"trained in {seconds:.1f} s; test loss {test_loss:.4f}; best {best['metric'].replace('_', ' ')} {shown}")
    if cfg.save and distributed.init().is_lead:
        save_model(s.model, cfg.save, metadata=dict(metadata, epoch=cfg.epochs, config=cfg.as_dict()))
        say(f"saved model to {cfg.save}")
    return RunResult(run.path, cfg, rows, test_loss, test_acc, best)


__all__ = ["TrainConfig", "RECIPES", "MODEL_RECIPES", "RECIPE_DEFAULTS", "default_backend", "train_run", "RunResult", "RunStopped",
           "PlotUnavailable", "plot_run", "RunDir",
           "RecordMetrics", "SaveModels", "SaveCheckpoint", "load_metrics", "make_optimizer", "make_schedule",
           "environment"]
