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

import atexit
import contextlib
import dataclasses
import datetime as _dt
import errno
import json
import os
import platform
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import __version__, config, distributed, gpu_memory, optim
from .backend import _cupy_status, backend_module, current_xp, use_backend
from .callbacks import Evaluate, PrintLog, ProgressBar, StopRequest
from .checkpoint import Checkpoint, load_checkpoint, restore, save_checkpoint
from .data import channel_stats, get_dataset, open_data, split_validation
from .data.augment import AUGMENTATIONS
from .data.augment import from_name as augmentation
from .data.loader import DataLoader
from .data.prefetch import HostImages, RowSubset, place, resident
from .io import atomic_write
from .models import ANY_SIZE_FROM, MODELS, accepts_size, get_model
from .precision import PRECISIONS
from .precision import check as check_precision
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
_SGD_ONECYCLE: dict[str, Any] = dict(optimizer="sgd", lr=0.05, schedule="onecycle", warmup=0.25, nesterov=True, weight_decay=5e-4)
RECIPES: dict[str, dict[str, Any]] = {  # dataset -> TrainConfig fields
    "digits": dict(
        model="lenet_digits",
        epochs=20,
        batch_size=32,
        optimizer="adam",
        lr=3e-3,
        schedule="onecycle",
        warmup=0.3,
        nesterov=False,
        weight_decay=0.0,
    ),
    "mnist": dict(model="lenet5", epochs=3, batch_size=128, **_SGD_ONECYCLE),
    # Fashion-MNIST: the same, longer, at twice the peak rate, with horizontal flips (tuned on a
    # validation split of the real data: README, "Datasets")
    "fashion-mnist": dict(model="lenet5", epochs=30, batch_size=128, **dict(_SGD_ONECYCLE, lr=0.1), augment="flip"),
    # CIFAR-10: He et al. 2016's ResNet-20 with the standard augmentation (4-pixel padded random
    # crops, horizontal flips), SGD with Nesterov momentum under one-cycle, label smoothing 0.1
    "cifar10": dict(
        model="resnet20",
        epochs=30,
        batch_size=128,
        optimizer="sgd",
        lr=0.1,
        schedule="onecycle",
        warmup=0.15,
        nesterov=True,
        weight_decay=5e-4,
        augment="crop-flip",
        label_smoothing=0.1,
    ),
}

# Your own data (--data): the model fits the images (default_model), Adam under one-cycle, as for
# the digits; batch 64 (an image folder of a few hundred images gets several steps per epoch).
DATA_RECIPE: dict[str, Any] = dict(
    epochs=10, batch_size=64, optimizer="adam", lr=2e-3, schedule="onecycle", warmup=0.3, nesterov=False, weight_decay=0.0
)
DATA_MODEL_RULE = "lenet5 for 28x28 images, lenet_digits for 8x8, else resnet20 (global average pooling: any size from 8x8)"


def default_model(input_shape) -> str:
    """The model ``--data`` trains without ``--model``, for images of ``input_shape`` (C, H, W): see DATA_MODEL_RULE."""
    hw = tuple(int(v) for v in input_shape[1:])
    if hw == (28, 28):
        return "lenet5"
    if hw == (8, 8):
        return "lenet_digits"
    if min(hw) < ANY_SIZE_FROM["resnet20"]:
        raise ValueError(
            f"data: its images are {hw[0]}x{hw[1]}; the built-in models take 8x8, 28x28 or any size from "
            f"{ANY_SIZE_FROM['resnet20']}x{ANY_SIZE_FROM['resnet20']}: pass --image-size (e.g. 8 or 28)"
        )
    return "resnet20"


# A dataset's recipe for another model than its own, where that model trains differently (the
# settings given here replace the dataset's; the rest, e.g. the augmentation, stay).
MODEL_RECIPES: dict[tuple[str, str | None], dict[str, Any]] = {  # (dataset, model) -> TrainConfig fields
    ("cifar10", "vgg_small"): dict(
        epochs=20, optimizer="adam", lr=2e-3, warmup=0.3, nesterov=False, weight_decay=0.0
    ),  # no BatchNorm: Adam at 2e-3, not SGD at 0.1
}

# What a run uses when neither the flags nor the dataset's recipe say (a recipe may set these too,
# e.g. augment="crop-flip", label_smoothing=0.1); also what a run saved before they existed used.
RECIPE_DEFAULTS: dict[str, Any] = dict(augment="none", label_smoothing=0.0)

# Settings that shape the trained weights: fixed for a run (``--resume`` keeps them).
RUN_SETTINGS = (
    "dataset",
    "data",
    "test_fraction",
    "image_size",
    "channels",
    "model",
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "schedule",
    "warmup",
    "momentum",
    "nesterov",
    "weight_decay",
    "seed",
    "val_fraction",
    "augment",
    "label_smoothing",
    "precision",
)
PROGRESS_MODES = ("auto", "bar", "plain", "none")
CUDA_GRAPH_SETTINGS = {"auto": "auto", "on": True, "off": False}  # --cuda-graph -> fit(cuda_graph=)


@dataclasses.dataclass
class TrainConfig:
    """Everything ``cnn-gpu train`` takes; None means "the dataset's recipe" (see RECIPES; DATA_RECIPE
    for ``data``)."""

    dataset: str | None = None  # a built-in dataset (DATASET_NAMES); None: digits, unless ``data`` is given
    data: str | None = None  # your own data: an image folder or an .npz (cnn_gpu.data.open_data); not with dataset
    test_fraction: float = 0.1  # ``data`` without a test split: the fraction of each class held out for testing
    image_size: tuple | None = None  # ``data`` images resized to (H, W); None: their most common size
    channels: int | None = None  # ``data`` images as 1 (grey) or 3 (RGB) channels; None: grey if every image is
    data_dir: str | None = None
    model: str | None = None
    epochs: int | None = None
    batch_size: int | str | None = None  # "auto": the largest power of two that fits the GPU (_auto_batch_size)
    optimizer: str | None = None
    lr: float | None = None
    schedule: str | None = None
    warmup: float | None = None
    momentum: float = 0.9
    nesterov: bool | None = None
    weight_decay: float | None = None
    val_fraction: float = 0.1  # held out of the training split to pick best.npz (never the test set); 0: none
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
    precision: str = "fp32"  # fp32, tf32 (TF32 GEMMs) or fp16: fit's precision (cnn_gpu/precision.py); GPU only but fp32

    schedule_start: int = 0  # the epoch where the learning-rate schedule starts: 0, or where --epochs extended the run

    def __post_init__(self) -> None:
        if isinstance(self.image_size, (list, tuple)):  # from config.json: a list
            self.image_size = tuple(self.image_size)
        elif isinstance(self.image_size, int) and not isinstance(self.image_size, bool):
            self.image_size = (self.image_size, self.image_size)

    def with_defaults(self) -> TrainConfig:
        """A copy with the settings still None after the recipe taken from RECIPE_DEFAULTS."""
        return dataclasses.replace(self, **{k: v for k, v in RECIPE_DEFAULTS.items() if getattr(self, k) is None})

    def resolved(self) -> TrainConfig:
        """A copy with every None filled from the dataset's recipe, checked. With ``data`` the model
        may stay None: :func:`train_run` picks it from the images' size (default_model)."""
        if self.data is not None:
            if self.dataset is not None:
                raise ValueError(
                    f"--data and --dataset: expected one of them (your own data or a built-in dataset), "
                    f"got --data {self.data} and --dataset {self.dataset}"
                )
            recipe = DATA_RECIPE
            self = dataclasses.replace(
                self,
                data=str(Path(self.data).expanduser().resolve()),  # resumable from anywhere
                data_dir=self.data_dir and str(Path(self.data_dir).expanduser().resolve()),
            )
        else:
            if self.dataset is None:
                self = dataclasses.replace(self, dataset="digits")
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

        if self.model not in MODELS and not (self.model is None and self.data is not None):
            raise bad("model", f"one of {sorted(MODELS)}", self.model)
        if self.optimizer not in optim.OPTIMIZERS:
            raise bad("optimizer", f"one of {sorted(optim.OPTIMIZERS)}", self.optimizer)
        if self.schedule not in (*optim.SCHEDULES, "none"):
            raise bad("schedule", f"one of {sorted(optim.SCHEDULES) + ['none']}", self.schedule)
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if name == "batch_size" and v == "auto":  # the largest that fits the GPU (_auto_batch_size)
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "a positive int" + (" or 'auto'" if name == "batch_size" else ""), v)
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
        self._check_data(bad)
        if self.precision not in PRECISIONS:
            raise bad("precision", f"one of {PRECISIONS}", self.precision)

    def _check_data(self, bad) -> None:
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            raise bad("data", "a path (str)", self.data)
        if not isinstance(self.test_fraction, (int, float)) or not 0.0 < self.test_fraction < 1.0:
            raise bad("test_fraction", "a fraction in (0, 1)", self.test_fraction)
        size = self.image_size
        if size is not None and (
            len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            raise bad("image_size", "None or (height, width), positive ints", size)
        if self.channels not in (None, 1, 3):
            raise bad("channels", "None, 1 or 3", self.channels)
        if self.data is None and (size is not None or self.channels is not None):
            raise ValueError(
                "--image-size and --channels: expected with --data (your own images), got them for "
                f"the built-in dataset {self.dataset}"
            )
        if not isinstance(self.schedule_start, int) or self.epochs is None or not 0 <= self.schedule_start < self.epochs:
            raise bad("schedule_start", f"an int in [0, epochs={self.epochs})", self.schedule_start)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def default_backend() -> str:
    """The backend of a run that names none: the ``backend`` setting when the environment
    (``CNN_GPU_BACKEND``) or the code (``cnn_gpu.config.override``) sets it, else ``auto``."""
    setting = config.get().backend
    return setting if "backend" in config.given_by_environment() or setting != config.Config.backend else "auto"


class RunStopped(Exception):
    """Training stopped before the end (interrupt, non-finite loss); ``exit_code`` for the CLI."""

    collective = False  # True: raised on every rank alike (see distributed.fail_together)

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
    model_file: Path | None = None  # the model test_accuracy measured: the last epoch's (last.npz)

    def describe(self) -> str:
        """The final line: ``test accuracy: NN.NN% (the last epoch's model, RUN/last.npz)``; cnn-gpu
        evaluate on that file prints the same number."""
        return f"test accuracy: {100 * self.test_accuracy:.2f}% (the last epoch's model, {self.model_file})"


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------
_T = TypeVar("_T")


def _given(value: _T | None, name: str) -> _T:
    """Setting ``name`` of a resolved TrainConfig (TrainConfig.resolved fills every None the recipe
    has; a saved run's config.json has them all)."""
    if value is None:
        raise ValueError(f"{name}: expected a value (a TrainConfig after .resolved()), got None")
    return value


def _batch_size(cfg: TrainConfig) -> int:
    """The run's batch size, once --batch-size auto has been replaced (_auto_batch_size)."""
    if not isinstance(cfg.batch_size, int):
        raise ValueError(f"batch_size: expected an int (auto replaced by _auto_batch_size), got {cfg.batch_size!r}")
    return cfg.batch_size


def make_optimizer(cfg: TrainConfig, model):
    if cfg.optimizer == "sgd":
        return optim.SGD(model, cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    return optim.OPTIMIZERS[_given(cfg.optimizer, "optimizer")](model, cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """The learning-rate schedule of ``cfg`` (stepped once per batch), or None. It spans the epochs
    from ``cfg.schedule_start`` (0; where ``--resume --epochs`` extended the run) to ``cfg.epochs``."""
    total = (_given(cfg.epochs, "epochs") - cfg.schedule_start) * steps_per_epoch  # an extension: a new cycle
    if cfg.schedule == "onecycle":
        return optim.OneCycleLR(
            optimizer, max_lr=_given(cfg.lr, "lr"), total_steps=max(total, 2), pct_start=_given(cfg.warmup, "warmup")
        )
    if cfg.schedule == "cosine":
        warm = min(int(round(_given(cfg.warmup, "warmup") * total)), max(total - 1, 0))
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
    env = {
        "cnn_gpu": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "backend": backend,
    }
    if backend == "cupy":
        import cupy  # noqa: PLC0415

        rt = cupy.cuda.runtime
        dev = cupy.cuda.Device()
        props = rt.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        env.update(
            cupy=cupy.__version__,
            cuda_runtime=rt.runtimeGetVersion(),
            cuda_driver=rt.driverGetVersion(),
            device=f"GPU {dev.id}: {name}",
        )
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
        raise PlotUnavailable(
            "plotting needs matplotlib, which is not installed: "
            "pip install -e '.[plot]' from a checkout (or pip install matplotlib)"
        ) from None
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
LOCK_FILE = ".lock"  # a run folder's lock: {"pid", "host", "since"} of the process training in it
LOCK_GRACE_S = 60.0  # a lock file without readable contents this old is stale (its writer died creating it)
_HELD_LOCKS: set = set()  # the lock files this process holds


def _lock_holder(path: Path):
    """(pid, host, since, alive) of the lock file ``path``, None if it is gone. A process on another
    host counts as alive (its liveness cannot be checked from here)."""
    try:
        text, age = path.read_text(), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(text)
        pid, host, since = int(doc["pid"]), str(doc["host"]), str(doc.get("since", "?"))
    except (ValueError, KeyError, TypeError):  # being written just now, or its writer died writing it
        return None, None, f"{age:.0f} s ago, unreadable", age < LOCK_GRACE_S
    return pid, host, since, host != socket.gethostname() or _process_alive(pid)


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (signal 0: checked, nothing sent)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def _release_lock(path: Path) -> None:
    """Remove ``path`` if this process holds it."""
    if path in _HELD_LOCKS:
        _HELD_LOCKS.discard(path)
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def _locks_released():
    """The run folder locks taken inside the block are released when it ends, however it ends."""
    before = set(_HELD_LOCKS)
    try:
        yield
    finally:
        for path in set(_HELD_LOCKS) - before:
            _release_lock(path)


def _release_held_locks() -> None:
    for path in list(_HELD_LOCKS):
        _release_lock(path)


atexit.register(_release_held_locks)


class RunDir:
    """A run folder and the files in it (see the module docs); every write is atomic. A process
    training in it holds its lock (:meth:`lock`): a second run is refused while the first lives."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    @classmethod
    def create(cls, dataset: str, model: str, path: str | os.PathLike | None = None) -> RunDir:
        """``path`` (a new folder, or one that holds no run yet: nothing, or only the config.json of a
        run that stopped before its first epoch ended), or a fresh runs/<dataset>-<model>-<time>."""
        if path is not None:
            run = cls(path)
            if run.path.exists() and not run.path.is_dir():
                raise ValueError(f"run_dir: expected a folder, got {run}, which is a file")
            if run.path.is_dir():
                run.lock()  # first: a live run's folder is refused naming its process, whatever it holds yet
            taken = [n for n in (CHECKPOINT_FILE, METRICS_FILE) if run.file(n).exists()]
            if taken:
                run.unlock()
                raise ValueError(
                    f"run_dir: expected a new or empty folder, got {run}, which already holds a run "
                    f"({', '.join(taken)}); continue it with --resume {run} or choose another --run-dir"
                )
            run.path.mkdir(parents=True, exist_ok=True)
            run.lock()
            run.clean_orphans()
            return run
        base = Path(RUNS_ROOT) / f"{dataset}-{model}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        path.mkdir(parents=True)
        run = cls(path)
        run.lock()
        return run

    @classmethod
    def resumable(cls, path: str | os.PathLike) -> RunDir:
        """An existing run folder with a checkpoint to continue from. ``path`` may also be a file
        in it (checkpoint.npz, last.npz, best.npz, config.json, ...): its folder is the run."""
        given = Path(path)
        run = cls(given.parent if given.is_file() and (given.parent / CHECKPOINT_FILE).is_file() else given)
        if given.is_file() and run.path == given:
            raise ValueError(
                f"resume: expected a run folder (or its {CHECKPOINT_FILE}), got {given}, a file outside "
                f"any run folder; a model file can be evaluated (cnn-gpu evaluate --checkpoint {given}) "
                "but holds no training state to continue from"
            )
        if not run.path.is_dir():
            parent = given.parent if given.suffix else given
            raise FileNotFoundError(
                f"resume: expected a run folder, got {given}, which does not exist"
                + (f" (nor does {parent})" if parent != given and not parent.exists() else "")
            )
        if not run.file(CHECKPOINT_FILE).is_file():
            hint = (
                f"the run stopped before its first epoch ended; start it again with --run-dir {run}"
                if run.file(CONFIG_FILE).is_file() and not run.file(METRICS_FILE).exists()
                else "is it a run folder written by cnn-gpu train?"
            )
            raise FileNotFoundError(
                f"resume: expected {run.file(CHECKPOINT_FILE)} (a run folder with a checkpoint), which does not exist: {hint}"
            )
        if distributed.init().is_lead:  # under mpiexec rank 0 holds the run's lock for every rank
            run.lock()
            run.clean_orphans()  # (never another live process's temporary files: it holds the lock)
        return run

    # -- the lock: one live process per run folder ------------------------------------------------
    def lock(self) -> None:
        """Take the run folder's lock (LOCK_FILE: this process's id and host, created atomically
        with O_EXCL), released by :meth:`unlock`, at the end of :func:`train_run` or at exit. A
        folder locked by another live process is a ValueError naming it; a lock left by a process
        that no longer runs (same host) is taken over with a note on stderr."""
        path = self.file(LOCK_FILE)
        for _ in range(3):  # another process may take over a stale lock at the same time: look again
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(path)
                if holder is None:  # gone meanwhile
                    continue
                pid, host, since, alive = holder
                who = f"process {pid} on {host}" if pid is not None else "another process (its lock is unreadable)"
                if pid == os.getpid() and host == socket.gethostname():
                    _HELD_LOCKS.add(path)  # this process's own (a second run in one process): keep it
                    return
                if alive:
                    raise ValueError(
                        f"run_dir: {self} is in use by {who} (since {since}); wait for "
                        f"that run to end or stop it, or choose another --run-dir (if it is not running, "
                        f"delete {path})"
                    ) from None
                _stderr(f"note: {self}: taking over the lock left by {who} (since {since}), which no longer runs")
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(
                    {"pid": os.getpid(), "host": socket.gethostname(), "since": _dt.datetime.now().isoformat(timespec="seconds")},
                    f,
                )
            _HELD_LOCKS.add(path)
            return
        raise ValueError(f"run_dir: {self}: could not take its lock {path} (other processes keep taking it)")

    def unlock(self) -> None:
        """Release this process's lock of the folder (nothing if it holds none)."""
        _release_lock(self.file(LOCK_FILE))

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
        meta = dict(
            self.metadata,
            epoch=stats.epoch,
            config=self.cfg.as_dict(),
            metrics={
                k: row[k] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy")
            },
        )
        save_model(loop.model, self.run.file(LAST_FILE), metadata=meta)
        value = row[self.best["metric"]] if self.best["metric"] is not None else None  # no val split: no best.npz
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
        save_checkpoint(
            self.path,
            loop.model,
            loop.optimizer,
            loop.scheduler,
            position=position,
            loader=loop.loader,
            config=self.cfg.as_dict(),
            metadata=self.metadata,
            extra={"best": self.best, "ranks": distributed.init().size},
        )

    def on_epoch_end(self, loop, stats) -> None:
        self.save(loop, Position(stats.epoch))
        self.kept = f"the last good checkpoint (end of epoch {stats.epoch}) is kept in {self.path}"


DIVERGENCE_EPOCHS = 3  # epochs after which a run that does not learn is named
CHANCE_FACTOR = 1.5  # training accuracy under CHANCE_FACTOR / num_classes counts as chance


class WarnIfNotLearning(Callback):
    """One warning line (stderr) when a run does not learn, usually from a too-high learning rate:
    after DIVERGENCE_EPOCHS epochs, the training loss has not gone below its first epoch's, or the
    training accuracy stayed at chance (under CHANCE_FACTOR / num_classes) in each of the last
    DIVERGENCE_EPOCHS epochs. It reads the epoch's stats only (host numbers the loop has read at
    the epoch's end): no extra host sync. ``rows``: the metrics of the epochs before a resume."""

    def __init__(
        self,
        num_classes: int,
        lr: float,
        rows: list | tuple = (),
        warn: Callable[[str], None] | None = None,
        epochs: int = DIVERGENCE_EPOCHS,
    ):
        self.num_classes, self.lr, self.epochs = int(num_classes), float(lr), int(epochs)
        self.history = [(r["train_loss"], r["train_accuracy"]) for r in rows]
        self.warn, self.warned = warn or _stderr, False

    def on_epoch_end(self, loop, stats) -> None:
        self.history.append((stats.train_loss, stats.train_accuracy))
        if self.warned or len(self.history) < self.epochs:
            return
        reason = self.reason()
        if reason:
            self.warned = True
            self.warn(
                f"warning: the run does not seem to learn: {reason}; try a lower learning rate, "
                f"e.g. --lr {self.lr / 10:g} (this run's is {self.lr:g})"
            )

    def reason(self) -> str | None:
        """Why the history says the run does not learn, or None."""
        losses, accuracies = zip(*self.history)
        if not min(losses[1:]) < losses[0]:
            return (
                f"the training loss ({losses[-1]:.4g}) has not gone below its first epoch's ({losses[0]:.4g}) "
                f"in {len(losses) - 1} more epochs"
            )
        chance = 1.0 / max(self.num_classes, 1)
        if max(accuracies[-self.epochs :]) < CHANCE_FACTOR * chance:
            return (
                f"the training accuracy ({100 * accuracies[-1]:.1f}%) has stayed at chance (1 in "
                f"{self.num_classes}) for {self.epochs} epochs"
            )
        return None


@contextlib.contextmanager
def _sigint_requests_stop(stop: StopRequest, say: Callable[[str], None]):
    """While training: the first Ctrl-C (SIGINT), SIGTERM or SIGUSR1 asks fit to stop between steps
    (and save a checkpoint); ``stop.signal`` names it. A second Ctrl-C aborts; a repeated SIGTERM or
    SIGUSR1 (a scheduler's warning, then its end) changes nothing: the checkpoint is on its way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if stop.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        stop.signal = name
        stop.request()
        if signum == signal.SIGINT:
            say("\nCtrl-C: stopping after the current step and saving a checkpoint (Ctrl-C again aborts without saving)")
        else:
            say(
                f"\n{name}: stopping after the current step and saving a checkpoint; then exit code {EXIT_REQUEUE} "
                "(requeue the job and continue with --resume)"
            )

    wanted = [getattr(signal, n) for n in STOP_SIGNALS if hasattr(signal, n)]  # no SIGUSR1 on Windows
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


EXIT_INTERRUPTED = 130  # stopped by Ctrl-C (SIGINT), a checkpoint saved
EXIT_REQUEUE = 75  # stopped by SIGTERM or SIGUSR1 (a scheduler), a checkpoint saved: EX_TEMPFAIL, requeue and --resume
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")


def _stop_code(stop: StopRequest) -> tuple[str, int]:
    """(what stopped the run, its exit code): EXIT_REQUEUE where any rank got SIGTERM or SIGUSR1
    (one vote over the ranks, once, at the stop: every rank exits with the same code)."""
    name = getattr(stop, "signal", None)
    comm = distributed.init()
    requeue = name in ("SIGTERM", "SIGUSR1")
    if comm.size > 1:
        requeue = comm.any(requeue)
    if requeue:
        return f"stopped by {name or 'SIGTERM on another rank'}", EXIT_REQUEUE
    return "interrupted", EXIT_INTERRUPTED


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# the run: cnn-gpu train
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Data:
    """A run's data on the host, split and with its normalisation; ``metadata`` goes into model files."""

    train: tuple  # (x, y) on the host: x unnormalised (ndarray, np.memmap or RowSubset)
    val: tuple | None
    test: tuple
    metadata: dict
    mean: Any = None  # the train split's per-channel statistics and pixel scale
    std: Any = None
    scale: float = 1.0


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
    (only data_dir, backend, save, progress, quiet, cuda_graph and, to extend a finished run,
    epochs come from ``cfg`` then)."""
    if resume is None:
        return cfg.resolved(), None, None
    run = RunDir.resumable(resume)
    ckpt = load_checkpoint(run.file(CHECKPOINT_FILE))
    saved, ckpt = _extended(TrainConfig.from_dict(ckpt.config).with_defaults(), cfg.epochs, ckpt, run)
    cfg = dataclasses.replace(
        saved,
        data_dir=cfg.data_dir if cfg.data_dir is not None else saved.data_dir,
        backend=cfg.backend or default_backend(),
        save=cfg.save,
        progress=cfg.progress,
        quiet=cfg.quiet,
        cuda_graph=cfg.cuda_graph,
        run_dir=str(run),
    )
    cfg.check()
    return cfg, ckpt, run


def _extended(saved: TrainConfig, epochs: int | None, ckpt: Checkpoint, run: RunDir) -> tuple[TrainConfig, Checkpoint]:
    """The settings (and checkpoint) to resume with: the saved ones, or, with ``epochs`` beyond a
    finished run's, those of its extension. The schedule was sized for the old total, so the added
    epochs get one of their own (the same kind, warm-up fraction and peak, over the added steps:
    a warm restart; ``schedule_start`` records where it starts, so an extension resumes exactly
    too). With --schedule none nothing changes: the extended run is bitwise the run trained for
    ``epochs`` from the start."""
    done, saved_epochs = ckpt.position, _given(saved.epochs, "epochs")
    finished = done.epoch >= saved_epochs and done.step == 0
    if epochs is None or epochs == saved_epochs:
        return saved, ckpt  # a finished run is refused after the checks of the resume (_refuse_finished)
    if epochs < saved_epochs:
        raise ValueError(f"--epochs: expected more than the run's {saved.epochs} (it extends a finished run), got {epochs}")
    if not finished:
        raise ValueError(
            f"--epochs: {run} stopped in epoch {done.epoch + 1} of {saved.epochs}; finish it first "
            f"(cnn-gpu train --resume {run}), then extend it with --epochs {epochs}"
        )
    cfg = dataclasses.replace(saved, epochs=epochs, schedule_start=saved_epochs)
    if saved.schedule != "none" and ckpt.header.get("schedule") is not None:  # the new cycle starts at its step 0
        fresh = dict(ckpt.header["schedule"], last_step=0, base_lr=float(_given(saved.lr, "lr")))
        ckpt = dataclasses.replace(ckpt, header=dict(ckpt.header, schedule=fresh))
    return cfg, ckpt


def _refuse_finished(cfg: TrainConfig, ckpt: Checkpoint, run: RunDir) -> None:
    """A finished run has nothing to resume: say so, and how to extend it."""
    done = ckpt.position
    if done.epoch >= _given(cfg.epochs, "epochs") and done.step == 0:
        raise ValueError(
            f"resume: {run} is finished ({done.epoch} of {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}); "
            f"to train it further: cnn-gpu train --resume {run} --epochs N, with N > {cfg.epochs}"
        )


def open_run_data(path, image_size=None, channels=None, test_fraction=None, data_dir=None, say=None):
    """A ``--data`` dataset opened as ``cnn-gpu train`` opens it (_open_dataset: the same test
    split); how evaluate re-opens a run's data, at the model's image size and channels (which
    apply to image folders; an .npz is used as it is)."""
    folder = Path(path).expanduser().is_dir()
    cfg = TrainConfig(
        data=str(path),
        image_size=image_size if folder else None,
        channels=channels if folder else None,
        test_fraction=0.1 if test_fraction is None else test_fraction,
        data_dir=data_dir,
    )
    with _data_folder(cfg):
        return _open_dataset(cfg, say or (lambda msg: None))


def _data_folder(cfg: TrainConfig):
    """--data-dir with --data: the folder of the images' decode cache (<DIR>/images, as for the
    built-in datasets' files); otherwise $CNN_GPU_DATA's (cnn_gpu.config)."""
    if cfg.data is None or cfg.data_dir is None:
        return contextlib.nullcontext()
    return config.override(data_dir=str(cfg.data_dir))


def _with_model(cfg: TrainConfig, say: Callable[[str], None]) -> TrainConfig:
    """``cfg`` with its model: given, or for --data the default for the images' size (DATA_MODEL_RULE;
    the data is opened once more to see it: an image folder's second opening reads the cache)."""
    if cfg.model is not None:
        return cfg
    with _data_folder(cfg):
        ds = _open_dataset(cfg, say)
    cfg = dataclasses.replace(cfg, model=default_model(ds.input_shape))
    cfg.check()
    size = "x".join(map(str, ds.input_shape[1:]))
    say(f"model: {cfg.model}, the default for {size} images ({DATA_MODEL_RULE}); --model chooses another")
    return cfg


def _open_dataset(cfg: TrainConfig, say: Callable[[str], None]):
    """The run's Dataset: ``cfg.data`` (an image folder or .npz, cnn_gpu.data.open_data) when set,
    else the named dataset. The test split of a folder of class subfolders is drawn with seed 0
    (like the validation split), so runs with different seeds test on the same images."""
    path = getattr(cfg, "data", None)
    if path is None:
        return get_dataset(_given(cfg.dataset, "dataset"), cfg.data_dir)
    return open_data(
        path,
        getattr(cfg, "image_size", None),
        getattr(cfg, "channels", None),
        test_fraction=getattr(cfg, "test_fraction", None) or 0.1,
        seed=0,
        say=say,
    )


def _split_validation(ds, fraction: float, say: Callable[[str], None]) -> tuple[tuple, tuple | None]:
    """(train, val) pairs: the data's own val split, or ``fraction`` of train held out (a memory-
    mapped train set is split by rows, not copied)."""
    train = (ds.x_train, ds.y_train)
    if ds.x_val is not None:
        if fraction > 0:
            say(f"note: validating on the data's own val/ split ({len(ds.y_val)} images), not on a part of train/")
        return train, (ds.x_val, ds.y_val)
    if fraction <= 0:
        return train, None
    try:
        if not isinstance(ds.x_train, np.memmap):
            return split_validation(ds.x_train, ds.y_train, fraction)
        idx = np.arange(len(ds.y_train))
        (tr, ytr), (va, yva) = split_validation(idx, ds.y_train, fraction)
    except ValueError as exc:  # too few examples per class for the split: name the option
        raise ValueError(f"val_fraction (--val-fraction): {exc}; use a larger fraction, or 0 for no validation split") from None
    return (RowSubset(ds.x_train, tr), ytr), (RowSubset(ds.x_train, va), yva)


def _load_data(cfg: TrainConfig, ckpt: Checkpoint | None, say: Callable[[str], None] | None = None) -> _Data:
    """The dataset, the validation split and the normalisation statistics of the training part
    (computed in chunks: a memory-mapped train set is never loaded whole). The splits stay on the
    host as they are; _build uploads them or streams their batches (_device_resident)."""
    say = say or _stderr
    ds = _open_dataset(cfg, say)
    source, model = getattr(cfg, "data", None) or cfg.dataset, _given(cfg.model, "model")
    want = MODELS[model][1]
    if not accepts_size(model, ds.input_shape[1:]):
        size = f"at least {ANY_SIZE_FROM[model]}x{ANY_SIZE_FROM[model]}" if model in ANY_SIZE_FROM else f"{want[1]}x{want[2]}"
        raise ValueError(
            f"model: {model} expects {size} inputs, but {'data' if source != cfg.dataset else 'dataset'} "
            f"{source} has {ds.input_shape[1]}x{ds.input_shape[2]} images; choose another --model"
        )
    train, val = _split_validation(ds, cfg.val_fraction, say)
    mean, std = channel_stats(train[0], ds.scale)
    metadata = {
        "dataset": str(source),
        "mean": list(map(float, mean)),
        "std": list(map(float, std)),
        "scale": ds.scale,
        "input_shape": list(ds.input_shape),
        "num_classes": ds.num_classes,
        "model": cfg.model,
        "classes": list(ds.classes) if ds.classes is not None else [str(i) for i in range(ds.num_classes)],
    }
    if ckpt is not None and any(
        ckpt.metadata.get(k) is None or not np.allclose(ckpt.metadata[k], metadata[k]) for k in ("mean", "std")
    ):
        raise ValueError(f"{ckpt.path}: the training data differ from the run's (other normalisation statistics)")
    return _Data(train, val, (ds.x_test, ds.y_test), metadata, mean, std, ds.scale)


def _device_resident(data: _Data, xp) -> bool:
    """Whether the run's splits are uploaded once (normalised) rather than streamed batch by batch
    from the host: on NumPy unless memory-mapped; on CuPy when their raw and normalised bytes take
    under the ``device_data`` fraction of the free device memory (cnn_gpu.data.prefetch.fits_device)."""
    return resident([p[0] for p in (data.train, data.val, data.test) if p is not None], xp)


def _on_device(data: _Data, xp) -> Callable:
    """pair (host x, y) -> the pair the run trains / evaluates on: normalised on the device (the
    raw images uploaded once), or a HostImages whose batches are gathered, uploaded and normalised."""
    whole = _device_resident(data, xp)

    def placed(pair):
        return None if pair is None else place(*pair, data.mean, data.std, data.scale, xp, whole=whole)

    return placed


def _build(cfg: TrainConfig, data: _Data, ckpt: Checkpoint | None) -> _Session:
    """Put the data on the backend (_on_device) and build the model, optimizer, loader and schedule
    (from the checkpoint when resuming), on the current backend."""
    manual_seed(cfg.seed)
    xp = current_xp()
    upload = _on_device(data, xp)
    meta, comm = data.metadata, distributed.init()
    model = get_model(_given(cfg.model, "model"), in_channels=meta["input_shape"][0], num_classes=meta["num_classes"])
    opt = make_optimizer(cfg, model)
    x_train, y_train = upload(data.train)
    transform = augmentation(_given(cfg.augment, "augment"), meta["input_shape"])
    loader: DataLoader
    if comm.size > 1 and isinstance(x_train, HostImages):
        raise ValueError(
            f"data: {meta['dataset']} is larger than the device budget (config device_data / "
            "CNN_GPU_DEVICE_DATA) and data-parallel runs need it on the device; raise the budget, "
            "or train on one GPU (batches are streamed from the host there)"
        )
    if comm.size > 1:  # data-parallel: each rank its shard of every global batch, gradients averaged
        loader = distributed.ShardedLoader(
            x_train, y_train, _batch_size(cfg), comm, shuffle=True, seed=cfg.seed, transform=transform
        )
        opt = distributed.DistributedOptimizer(opt, comm, loader)
    else:
        loader = DataLoader(x_train, y_train, _batch_size(cfg), shuffle=True, seed=cfg.seed, transform=transform)
    sched = make_schedule(cfg, opt, len(loader))
    position = restore(ckpt, model, opt, sched, loader) if ckpt is not None else Position()
    if comm.size > 1:
        distributed.broadcast_parameters(model, comm)
        distributed.decorrelate_dropout(model, comm)
        position = distributed.resumed_position(position, comm)
    return _Session(model, opt, sched, loader, position, upload(data.val), upload(data.test), "numpy" if xp is np else "cupy")


def _config_doc(cfg: TrainConfig, data: _Data, s: _Session, run: RunDir, resumed: bool) -> dict:
    """config.json: the settings, data, environment and command line; a resume is appended."""
    env = environment(s.backend)
    if resumed:
        doc = run.read_config()
        entry = {
            "at": _dt.datetime.now().isoformat(timespec="seconds"),
            "epoch": s.position.epoch,
            "step": s.position.step,
            "backend": s.backend,
            "environment": env,
        }
        if "config" in doc and doc["config"].get("epochs") != cfg.epochs:  # --epochs extended the run
            entry["extended"] = {"from_epochs": doc["config"].get("epochs"), "to_epochs": cfg.epochs}
            doc["config"] = dict(doc["config"], epochs=cfg.epochs, schedule_start=cfg.schedule_start)
        doc.setdefault("resumed", []).append(entry)
        return doc
    sizes = {
        "train": len(data.train[1]),
        "val": 0 if data.val is None else len(data.val[1]),
        "test": len(data.test[1]),
        "steps_per_epoch": len(s.loader),
    }
    return {
        "config": cfg.as_dict(),
        "seed": cfg.seed,
        "environment": env,
        "data": {**sizes, **data.metadata},
        "parameters": s.model.num_parameters(),
        "command": sys.argv,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def _backend_line(asked: str, used: str) -> str:
    """The first line of a run: which backend and device compute it, and why (for ``auto``)."""
    line = f"backend: {used} on {environment(used)['device']}"
    if asked == "auto":
        line += " (auto: " + ("a GPU is usable)" if used == "cupy" else f"no usable GPU: {_cupy_status()[1]})")
    return line


def _banner(cfg: TrainConfig, data: _Data, s: _Session, run: RunDir, resumed: bool) -> str:
    if resumed and cfg.schedule_start == s.position.epoch and not s.position.step and cfg.schedule_start:
        restart = f"; the {cfg.schedule} schedule starts again over the added epochs" if cfg.schedule != "none" else ""
        return f"cnn_gpu {__version__}: extending {run} from {cfg.schedule_start} to {cfg.epochs} epochs{restart}"
    if resumed:
        at = f", step {s.position.step}/{len(s.loader)}" if s.position.step else ""
        return f"cnn_gpu {__version__}: resuming {run} at epoch {s.position.epoch + 1}{at} of {cfg.epochs}"
    n_val = 0 if data.val is None else len(data.val[1])
    sizes = f"{len(data.train[1])} train{f' / {n_val} val' if n_val else ''} / {len(data.test[1])} test"
    source = (
        cfg.dataset
        if cfg.data is None
        else (f"{cfg.data} ({data.metadata['num_classes']} classes, {'x'.join(map(str, data.metadata['input_shape']))})")
    )
    return (
        f"cnn_gpu {__version__}: training {cfg.model} ({s.model.num_parameters():,} parameters) on {source} "
        f"({sizes}) with {_describe_optimizer(cfg)}, {cfg.schedule} schedule, batch {cfg.batch_size}, "
        f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, backend {s.backend}"
        + (f", augmentation {cfg.augment}" if cfg.augment != "none" else "")
        + (f", label smoothing {cfg.label_smoothing:g}" if cfg.label_smoothing else "")
        + (f", precision {cfg.precision}" if cfg.precision != "fp32" else "")
    )


def _progress(cfg: TrainConfig, out: Callable, quiet: bool) -> list:
    """The progress display: a tqdm bar on a terminal (or with --progress bar), else epoch lines."""
    if quiet:
        return []
    if cfg.progress == "bar" or (cfg.progress == "auto" and out is print and sys.stdout.isatty()):
        with contextlib.suppress(ImportError):  # tqdm is a dependency; without it, plain lines
            return [ProgressBar(file=sys.stdout), PrintLog(out)]
    return [PrintLog(out)]


def _fit(
    s: _Session, cfg: TrainConfig, callbacks: list, saver: SaveCheckpoint, recorder: RecordMetrics, stop: StopRequest
) -> None:
    """fit, with every way it can stop turned into RunStopped (after saving what can be saved)."""
    resume_hint = f"resume with: cnn-gpu train --resume {saver.run}"
    try:
        with _sigint_requests_stop(stop, _stderr):
            fit(
                s.model,
                s.optimizer,
                s.loader,
                _given(cfg.epochs, "epochs"),
                scheduler=s.scheduler,
                callbacks=callbacks,
                position=s.position,
                label_smoothing=_given(cfg.label_smoothing, "label_smoothing"),
                cuda_graph=CUDA_GRAPH_SETTINGS[cfg.cuda_graph],
                precision=cfg.precision,
            )
    except TrainingInterrupted as exc:
        pos = distributed.global_position(exc.position, distributed.init())  # every rank stopped at this step
        if pos.step > 0:
            saver.save(s, pos)  # the session has what a loop has: model, optimizer, scheduler, loader
            where = f"during epoch {pos.epoch + 1} after step {pos.step} of {len(s.loader)}"
        else:
            where = f"at the end of epoch {pos.epoch}"
        recorder.plot()
        what, code = _stop_code(stop)
        stopped = RunStopped(f"{what} {where}; checkpoint saved to {saver.path}\n{resume_hint}", code)
        stopped.collective = True  # the same on every rank (see distributed.fail_together)
        raise stopped from None
    except NonFiniteLossError as exc:
        recorder.plot()
        raise RunStopped(f"training stopped: {exc}; {_kept(saver)}. Try a lower --lr.", 1) from None
    except KeyboardInterrupt:
        raise RunStopped(f"aborted; {_kept(saver)}" + (f"\n{resume_hint}" if saver.kept else ""), 130) from None


# ---------------------------------------------------------------------- GPU memory: --batch-size auto, OOM
def _resident_bytes(data: _Data, xp) -> int:
    """The bytes of the run's data that will live on the device (float32 images, int64 labels),
    if they fit there (cnn_gpu.data.prefetch.fits_device); 0 if they will be streamed."""
    from .data.prefetch import fits_device  # noqa: PLC0415

    parts = [p for p in (data.train, data.val, data.test) if p is not None]
    nbytes = sum(int(np.prod(x.shape)) * 4 + int(np.prod(y.shape)) * 8 for x, y in parts)
    return nbytes if fits_device(nbytes, xp) else 0


def _trial_step(cfg: TrainConfig, data: _Data, xp, reserve: int) -> Callable[[int], None]:
    """try_batch(b): two training steps of a fresh model and optimizer of ``cfg`` on a batch of b
    zeros, next to ``reserve`` bytes standing for the run's data (for gpu_memory.largest_fitting_batch)."""
    from .nn import CrossEntropyLoss  # noqa: PLC0415
    from .train import train_step  # noqa: PLC0415

    meta = data.metadata
    shape = tuple(meta["input_shape"])

    def try_batch(b: int) -> None:
        held = xp.empty(reserve, dtype=np.uint8) if reserve else None  # noqa: F841 (kept for the trial)
        model = get_model(
            _given(cfg.model, "model"), in_channels=shape[0], num_classes=meta["num_classes"], generator=np.random.default_rng(0)
        )
        opt = make_optimizer(cfg, model)
        loss_fn = CrossEntropyLoss(validate_range=False, label_smoothing=_given(cfg.label_smoothing, "label_smoothing"))
        x, y = xp.zeros((b,) + shape, dtype=np.float32), xp.zeros(b, dtype=np.int64)
        for _ in range(2):  # the second step holds the optimizer's state too
            train_step(model, loss_fn, opt, x, y)

    return try_batch


def _gpu_memory(xp) -> tuple[int, int]:
    """(free, total) bytes of the current GPU (xp: CuPy; NumPy has no device memory)."""
    memory = gpu_memory.device_memory(xp)
    if memory is None:
        raise ValueError(f"xp: expected CuPy (a GPU's memory), got {xp.__name__}")
    return memory


def _auto_batch_size(cfg: TrainConfig, data: _Data, say: Callable[[str], None]) -> TrainConfig:
    """``cfg`` with --batch-size auto replaced: on the GPU the largest power of two (up to the
    training examples and gpu_memory.AUTO_MAX_BATCH) whose training step fits next to the data;
    on the CPU the recipe's batch size (there is no device memory to fill)."""
    if cfg.batch_size != "auto":
        return cfg
    xp = current_xp()
    if xp is np:
        b = (DATA_RECIPE if cfg.data is not None else RECIPES[_given(cfg.dataset, "dataset")])["batch_size"]
        say(f"--batch-size auto: {b} (the recipe's; the search for the largest batch that fits is for GPUs)")
        return dataclasses.replace(cfg, batch_size=b)
    start = min(gpu_memory.AUTO_MAX_BATCH, len(data.train[1]))
    b = gpu_memory.largest_fitting_batch(_trial_step(cfg, data, xp, _resident_bytes(data, xp)), start, xp)
    comm = distributed.init()
    if comm.size > 1:  # every rank trains with rank 0's answer (a whole batch on one GPU: conservative)
        b = comm.broadcast_object(b)
    free, total = _gpu_memory(xp)
    if b is None:
        raise ValueError(
            f"batch_size: auto found no batch size that fits: a training step of {cfg.model} with one "
            f"image does not fit {gpu_memory.device_name(xp)} ({gpu_memory.gib(total)}, "
            f"{gpu_memory.gib(free)} free) next to the data; choose a smaller model or --backend numpy"
        )
    first = 1 << (start.bit_length() - 1)
    say(
        f"--batch-size auto: {b}, the largest power of two (tried from {first} down) whose training step fits "
        f"{gpu_memory.device_name(xp)} ({gpu_memory.gib(total)})"
    )
    return dataclasses.replace(cfg, batch_size=b)


@contextlib.contextmanager
def _out_of_memory_stops(cfg: TrainConfig, s: _Session, data: _Data, saver: SaveCheckpoint):
    """The GPU running out of memory during training: one RunStopped (exit 1) naming the model,
    the batch size, the device's memory and a batch size that fits (searched at once, next to the
    run's model and data, from half the batch down)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 (only CuPy's out-of-memory error is handled)
        if not gpu_memory.is_out_of_memory(exc):
            raise
        traceback.clear_frames(exc.__traceback__)  # the failed step's frames hold its arrays
        detail = str(exc)
    else:
        return
    xp = current_xp()
    for _, m in s.model.named_modules():  # the failed step's activations and scratch buffers
        if hasattr(m, "_cache"):
            m._cache = None
        if hasattr(getattr(m, "_ws", None), "clear"):
            m._ws.clear()
    gpu_memory.release_cached(xp)
    batch_size = _batch_size(cfg)
    fits = gpu_memory.largest_fitting_batch(_trial_step(cfg, data, xp, 0), batch_size // 2, xp) if batch_size > 1 else None
    free, total = _gpu_memory(xp)
    advice = (
        f"batch size {fits} fits: train with --batch-size {fits} (or --batch-size auto)"
        if fits
        else "not even a batch of 1 fits next to the data: choose a smaller model, or --backend numpy"
    )
    raise RunStopped(
        f"GPU out of memory training {cfg.model} ({s.model.num_parameters():,} parameters) with batch "
        f"size {cfg.batch_size} on {gpu_memory.device_name(xp)}, {gpu_memory.gib(total)} "
        f"({gpu_memory.gib(free)} free now; CuPy: {detail}); {advice}; {_kept(saver)}",
        1,
    ) from None


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def _disk_full_stops(saver: SaveCheckpoint):
    """A full disk (or quota) while a run file is written: one RunStopped (exit 1) saying which file,
    that the last good checkpoint is kept (atomic writes: the failed one left no partial file)
    and how to go on."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        go_on = (
            f"free some space, then resume with: cnn-gpu train --resume {saver.run}"
            if saver.kept
            else "free some space and start the run again"
        )
        raise RunStopped(
            f"{exc.filename or saver.run}: {what} while writing it (nothing partial was left); {_kept(saver)}; {go_on}", 1
        ) from None


def _kept(saver: SaveCheckpoint) -> str:
    return saver.kept or "no checkpoint was written (no epoch completed)"


def train_run(
    cfg: TrainConfig, out: Callable[[str], None] = print, *, resume: str | os.PathLike | None = None, callbacks: list | tuple = ()
) -> RunResult:
    """Train as ``cnn-gpu train`` does: a fresh run from ``cfg``, or continue the run in ``resume``.
    ``callbacks`` run after the run's own. Raises RunStopped on an interrupt or a non-finite loss
    (after saving what can be saved), ValueError / FileNotFoundError on bad input.

    Under mpiexec (cnn_gpu.distributed) every rank trains its shard of each batch; only rank 0
    prints and writes the run folder; an error on one rank aborts them all with its message."""
    # under several ranks: this rank's GPU is selected first, before the backend check's probe
    # kernel or any allocation touches one (with a CPU backend, no GPU is touched)
    comm = distributed.init(gpu=(cfg.backend or default_backend()) != "numpy")
    with distributed.fail_together(comm, "cnn-gpu train"), _locks_released():
        return _train_run(cfg, out, resume, list(callbacks), comm)


def _train_run(cfg: TrainConfig, out: Callable[[str], None], resume, callbacks: list, comm) -> RunResult:
    cfg, ckpt, run = _settings(cfg, resume)
    if ckpt is not None and run is not None:  # resuming (_settings gives both, or neither)
        distributed.check_resume(ckpt.extra.get("ranks"), comm, str(run))
        _refuse_finished(cfg, ckpt, run)
    backend = _given(cfg.backend, "backend")  # (resolved: the flag, $CNN_GPU_BACKEND or the default)
    if backend != "numpy":
        comm.require_device()  # this rank could not take its GPU: say so, not a probe failure on another GPU
    xp = backend_module(backend)  # an unusable backend is an error before anything is written
    check_precision(cfg.precision, xp.empty(0, np.float32))  # so is a precision its engine cannot compute in
    quiet = cfg.quiet or cfg.progress == "none" or not comm.is_lead
    say = (lambda msg: None) if quiet else out
    if cfg.data is None and cfg.dataset == "digits" and cfg.data_dir is not None and comm.is_lead:
        _stderr(
            f"note: --data-dir {cfg.data_dir} is not used: the digits are bundled (--dataset mnist, fashion-mnist "
            "or cifar10 reads that folder; --data PATH trains on your own images)"
        )
    with distributed.rank_zero_first(comm), _data_folder(cfg):  # one download (or decode) per shared folder
        cfg = _with_model(cfg, say)
        data = _load_data(cfg, ckpt, say)
    if run is None:
        name = cfg.dataset if cfg.data is None else (Path(cfg.data).resolve().stem or "data")
        path = str(RunDir.create(_given(name, "dataset"), _given(cfg.model, "model"), cfg.run_dir)) if comm.is_lead else None
        run = RunDir(comm.broadcast_object(path))  # rank 0 alone creates (and writes) the run folder
        cfg = dataclasses.replace(cfg, run_dir=str(run))
    with use_backend(backend):
        cfg = _auto_batch_size(cfg, data, say)
        s = _build(cfg, data, ckpt)
        if comm.is_lead:
            run.write_config(dict(_config_doc(cfg, data, s, run, ckpt is not None), ranks=comm.size))
        say(_backend_line(backend, s.backend))
        say(_banner(cfg, data, s, run, ckpt is not None))
        say(f"run folder: {run}")
        rows = [r for r in run.metrics() if r["epoch"] <= s.position.epoch] if ckpt is not None else []
        saved_best = ckpt.extra.get("best") if ckpt is not None else None
        best = (
            dict(saved_best)
            if saved_best
            else {"metric": "val_accuracy" if s.val is not None else None, "value": None, "epoch": None}
        )  # never the test set
        kept = None
        if ckpt is not None:
            at = f"epoch {s.position.epoch}" + (f" and step {s.position.step} of the next" if s.position.step else "")
            kept = f"the checkpoint this run resumed from ({at}) is kept in {run.file(CHECKPOINT_FILE)}"
        recorder = distributed.lead_only(RecordMetrics(run, rows, say), comm)
        saver = distributed.lead_only(SaveCheckpoint(run, cfg, data.metadata, best, kept), comm)
        models = distributed.lead_only(SaveModels(run, cfg, data.metadata, best), comm)
        stop, evals = _parallel_callbacks(s, comm)
        learning = distributed.lead_only(WarnIfNotLearning(data.metadata["num_classes"], _given(cfg.lr, "lr"), rows), comm)
        cbs = [stop, *evals, *_progress(cfg, out, quiet), recorder, models, saver, learning, *callbacks]
        t0 = time.perf_counter()
        with _disk_full_stops(saver), _out_of_memory_stops(cfg, s, data, saver):
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
    if best["metric"] is None:
        shown = f"no validation split, so no {BEST_FILE} (--val-fraction F keeps the best epoch by validation accuracy)"
    else:
        value = f"{100 * best['value']:.2f}% (epoch {best['epoch']}: {BEST_FILE})" if best["value"] is not None else "n/a"
        shown = f"best {best['metric'].replace('_', ' ')} {value}"
    say(f"trained in {seconds:.1f} s; test loss {test_loss:.4f}; {shown}")
    if cfg.save and distributed.init().is_lead:
        save_model(s.model, cfg.save, metadata=dict(metadata, epoch=cfg.epochs, config=cfg.as_dict()))
        say(f"saved model to {cfg.save}")
    return RunResult(run.path, cfg, rows, test_loss, test_acc, best, run.file(LAST_FILE))


__all__ = [
    "TrainConfig",
    "RECIPES",
    "MODEL_RECIPES",
    "DATA_RECIPE",
    "DATA_MODEL_RULE",
    "default_model",
    "open_run_data",
    "RECIPE_DEFAULTS",
    "default_backend",
    "train_run",
    "RunResult",
    "RunStopped",
    "PlotUnavailable",
    "plot_run",
    "RunDir",
    "RecordMetrics",
    "SaveModels",
    "SaveCheckpoint",
    "load_metrics",
    "make_optimizer",
    "make_schedule",
    "environment",
]
