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

Every file is written atomically (temporary file, fsync, rename).
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

from . import __version__
from .io import atomic_write

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
CHECKPOINT_FILE = "checkpoint.npz"
LAST_FILE = "last.npz"
BEST_FILE = "best.npz"
RUNS_ROOT = "runs"
BAR_REFRESH_S = 0.5  # how often a progress bar reads and shows the running loss (one sync each)
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
    "fashion-mnist": dict(model="lenet5", epochs=10, batch_size=128, **_SGD_ONECYCLE),
    "cifar10": dict(model="vgg_small", epochs=20, batch_size=128, optimizer="adam", lr=2e-3, schedule="onecycle",
                    warmup=0.3, nesterov=False, weight_decay=0.0),
}

# Settings that shape the trained weights: fixed for a run (``--resume`` keeps them).
RUN_SETTINGS = ("dataset", "model", "epochs", "batch_size", "optimizer", "lr", "schedule", "warmup", "momentum",
                "nesterov", "weight_decay", "seed", "val_fraction")
PROGRESS_MODES = ("auto", "bar", "plain", "none")


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
    backend: str = "numpy"
    seed: int = 0
    save: str | None = None
    run_dir: str | None = None
    progress: str = "auto"
    quiet: bool = False
    workspace_mb: float | None = None  # cap on one convolution's im2col workspace (cnn_gpu.set_workspace_limit)

    def resolved(self) -> "TrainConfig":
        """A copy with every None filled from the dataset's recipe, checked."""
        if self.dataset not in RECIPES:
            raise ValueError(f"dataset: expected one of {sorted(RECIPES)}, got {self.dataset!r}")
        recipe = RECIPES[self.dataset]
        cfg = dataclasses.replace(self, **{k: v for k, v in recipe.items() if getattr(self, k) is None})
        cfg.check()
        return cfg

    def check(self) -> None:
        from .models import MODELS
        from .optim import OPTIMIZERS, SCHEDULES

        def bad(name, expected, got):
            return ValueError(f"{name}: expected {expected}, got {got!r}")

        if self.model not in MODELS:
            raise bad("model", f"one of {sorted(MODELS)}", self.model)
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"one of {sorted(OPTIMIZERS)}", self.optimizer)
        if self.schedule not in (*SCHEDULES, "none"):
            raise bad("schedule", f"one of {sorted(SCHEDULES) + ['none']}", self.schedule)
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
        if self.progress not in PROGRESS_MODES:
            raise bad("progress", f"one of {PROGRESS_MODES}", self.progress)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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
    from . import optim

    if cfg.optimizer == "sgd":
        return optim.SGD(model, cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    return optim.OPTIMIZERS[cfg.optimizer](model, cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """The learning-rate schedule of ``cfg`` (stepped once per batch), or None."""
    from . import optim

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


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Rewrite metrics.jsonl (atomically) with one line per epoch."""
    with atomic_write(Path(run_dir) / METRICS_FILE, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


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


def new_run_dir(cfg: TrainConfig) -> Path:
    """``cfg.run_dir``, or a fresh ``runs/<dataset>-<model>-<time>``; refuses a folder that holds a run."""
    if cfg.run_dir is not None:
        path = Path(cfg.run_dir)
        taken = [n for n in (CHECKPOINT_FILE, METRICS_FILE, CONFIG_FILE) if (path / n).exists()]
        if taken:
            raise ValueError(f"run_dir: expected a new or empty folder, got {path}, which already holds a run "
                             f"({', '.join(taken)}); continue it with --resume {path} or choose another --run-dir")
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(RUNS_ROOT) / f"{cfg.dataset}-{cfg.model}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------------------
# progress display
# --------------------------------------------------------------------------------------
class BarProgress:
    """A tqdm bar per epoch. The bar's step count moves every step (host only); its loss,
    accuracy and images/s are refreshed every ``refresh_s`` seconds (BAR_REFRESH_S), each refresh reading the
    running sums through train.read_metrics (on the GPU: one sync per refresh, not per step)."""

    def __init__(self, file=None, refresh_s: float | None = None):
        from tqdm.auto import tqdm  # noqa: PLC0415 (imported only when a bar is shown)

        self._tqdm, self.file = tqdm, file
        self.refresh_s = BAR_REFRESH_S if refresh_s is None else refresh_s
        self.bar, self._last = None, 0.0

    def begin(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.bar = self._tqdm(total=steps, initial=done, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False,
                              file=self.file, dynamic_ncols=True)
        self._last = time.monotonic()

    def advance(self, done: int) -> None:
        self.bar.update(done - self.bar.n)

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.refresh_s

    def show(self, loss: float, accuracy: float, images_per_s: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f}  acc {100 * accuracy:.2f}%  {images_per_s:.0f} img/s", refresh=True)
        self._last = time.monotonic()

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress_for(mode: str, out: Callable) -> BarProgress | None:
    if mode == "bar" or (mode == "auto" and out is print and sys.stdout.isatty()):
        try:
            return BarProgress(file=sys.stdout)
        except ImportError:  # tqdm is a dependency, but degrade to plain lines without it
            return None
    return None


@contextlib.contextmanager
def _sigint_requests_stop(stop, say: Callable[[str], None]):
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


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_run(cfg: TrainConfig, out: Callable[[str], None] = print, *, resume: str | os.PathLike | None = None,
              on_step: Callable[[int, int], None] | None = None) -> RunResult:
    """Train as ``cnn-gpu train`` does: a fresh run from ``cfg``, or continue the run in ``resume``.

    With ``resume``, the run's saved settings are used; only ``data_dir``, ``backend``, ``save``,
    ``progress`` and ``quiet`` are taken from ``cfg``. Raises RunStopped on an interrupt or a
    non-finite loss (after saving what can be saved), ValueError / FileNotFoundError on bad input.
    """
    from .backend import backend_module, current_xp, use_backend
    from .checkpoint import load_checkpoint, restore, save_checkpoint
    from .data import get_dataset, normalize, split_validation
    from .data import channel_stats
    from .data.loader import DataLoader
    from .models import MODELS, get_model
    from .random import manual_seed
    from .serialization import save as save_model
    from .train import NonFiniteLossError, Position, StopFlag, TrainingInterrupted, evaluate, fit

    ckpt = None
    if resume is not None:
        run_dir = Path(resume)
        ckpt_path = run_dir / CHECKPOINT_FILE
        if not run_dir.is_dir():
            raise FileNotFoundError(f"resume: expected a run folder, got {run_dir}, which does not exist")
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"resume: expected {ckpt_path} (a run folder with a checkpoint); it does not exist")
        ckpt = load_checkpoint(ckpt_path)
        saved = TrainConfig.from_dict(ckpt.config)
        cfg = dataclasses.replace(saved, data_dir=cfg.data_dir if cfg.data_dir is not None else saved.data_dir,
                                  backend=cfg.backend, save=cfg.save, progress=cfg.progress, quiet=cfg.quiet,
                                  run_dir=str(run_dir))
        cfg.check()
    else:
        cfg = cfg.resolved()
    backend_module(cfg.backend)  # an unusable backend is an error before anything is written
    quiet = cfg.quiet or cfg.progress == "none"
    say = (lambda msg: None) if quiet else out

    ds = get_dataset(cfg.dataset, cfg.data_dir)
    want = MODELS[cfg.model][1]
    if tuple(ds.input_shape[1:]) != tuple(want[1:]):
        raise ValueError(f"model: {cfg.model} expects {want[1]}x{want[2]} inputs, but dataset {cfg.dataset} has "
                         f"{ds.input_shape[1]}x{ds.input_shape[2]} images; choose another --model")
    x_train, y_train, val = ds.x_train, ds.y_train, None
    if cfg.val_fraction > 0:
        (x_train, y_train), val = split_validation(ds.x_train, ds.y_train, cfg.val_fraction)
    mean, std = channel_stats(x_train, ds.scale)
    metadata = {"dataset": cfg.dataset, "mean": list(map(float, mean)), "std": list(map(float, std)),
                "scale": ds.scale, "input_shape": list(ds.input_shape), "num_classes": ds.num_classes,
                "model": cfg.model}
    if ckpt is not None and any(not np.allclose(ckpt.metadata.get(k), metadata[k]) for k in ("mean", "std")):
        raise ValueError(f"{ckpt.path}: the training data differ from the run's (other normalisation statistics)")
    if resume is None:
        run_dir = new_run_dir(cfg)
        cfg = dataclasses.replace(cfg, run_dir=str(run_dir))

    with use_backend(cfg.backend) as xp:
        backend = "cupy" if xp is not np else "numpy"
        manual_seed(cfg.seed)
        dev = current_xp()
        xtr = dev.asarray(normalize(x_train, mean, std, ds.scale))  # uploaded once
        ytr = dev.asarray(y_train)
        test_data = (dev.asarray(normalize(ds.x_test, mean, std, ds.scale)), dev.asarray(ds.y_test))
        val_data = None
        if val is not None:
            val_data = (dev.asarray(normalize(val[0], mean, std, ds.scale)), dev.asarray(val[1]))
        model = get_model(cfg.model, in_channels=ds.input_shape[0], num_classes=ds.num_classes)
        opt = make_optimizer(cfg, model)
        loader = DataLoader(xtr, ytr, cfg.batch_size, shuffle=True, seed=cfg.seed)
        sched = make_schedule(cfg, opt, len(loader))
        rows: list[dict] = []
        best = {"metric": "val_accuracy" if val_data is not None else "test_accuracy", "value": None, "epoch": None}
        position = Position()
        env = environment(backend)
        if ckpt is not None:
            position = restore(ckpt, model, opt, sched, loader)
            rows = [r for r in load_metrics(run_dir) if r["epoch"] <= position.epoch] if (run_dir / METRICS_FILE).exists() else []
            best = ckpt.extra.get("best", best)
            config_doc = json.loads((run_dir / CONFIG_FILE).read_text()) if (run_dir / CONFIG_FILE).exists() else {}
            config_doc.setdefault("resumed", []).append(
                {"at": _dt.datetime.now().isoformat(timespec="seconds"), "epoch": position.epoch, "step": position.step,
                 "backend": backend, "environment": env})
        else:
            config_doc = {"config": cfg.as_dict(), "seed": cfg.seed, "environment": env,
                          "data": {"train": int(x_train.shape[0]), "val": int(val[0].shape[0]) if val else 0,
                                   "test": int(ds.x_test.shape[0]), "steps_per_epoch": len(loader), **metadata},
                          "parameters": model.num_parameters(), "command": sys.argv,
                          "started": _dt.datetime.now().isoformat(timespec="seconds")}
        _json_dump(run_dir / CONFIG_FILE, config_doc)

        n_train, n_val = int(x_train.shape[0]), (int(val[0].shape[0]) if val else 0)
        if ckpt is None:
            say(f"cnn_gpu {__version__}: training {cfg.model} ({model.num_parameters():,} parameters) on {cfg.dataset} "
                f"({n_train} train{f' / {n_val} val' if n_val else ''} / {ds.x_test.shape[0]} test) with {_describe_optimizer(cfg)}, "
                f"{cfg.schedule} schedule, batch {cfg.batch_size}, {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, "
                f"backend {backend}")
        else:
            say(f"cnn_gpu {__version__}: resuming {run_dir} at epoch {position.epoch + 1}"
                + (f", step {position.step}/{len(loader)}" if position.step else "") + f" of {cfg.epochs}")
        say(f"run folder: {run_dir}")

        plot_note = {"shown": False, "last": time.monotonic()}
        ckpt_path = run_dir / CHECKPOINT_FILE
        state = {"good": None}
        if ckpt is not None:
            at = f"epoch {position.epoch}" + (f" and step {position.step} of the next" if position.step else "")
            state["good"] = f"the checkpoint this run resumed from ({at}) is kept in {CHECKPOINT_FILE}"

        def checkpoint(pos: Position) -> None:
            save_checkpoint(ckpt_path, model, opt, sched, position=pos, loader=loader, config=cfg.as_dict(),
                            metadata=metadata, extra={"best": best})

        def on_epoch_end(stats) -> None:
            row = stats.as_dict()
            row["time"] = _dt.datetime.now().isoformat(timespec="seconds")
            rows.append(row)
            write_metrics(run_dir, rows)
            meta = dict(metadata, epoch=stats.epoch, config=cfg.as_dict(),
                        metrics={k: row[k] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy",
                                                     "test_loss", "test_accuracy")})
            save_model(model, run_dir / LAST_FILE, metadata=meta)
            value = row[best["metric"]]
            if value is not None and (best["value"] is None or value > best["value"]):
                best.update(value=value, epoch=stats.epoch)
                save_model(model, run_dir / BEST_FILE, metadata=meta)
            checkpoint(Position(stats.epoch))  # last: everything above is consistent with it
            state["good"] = f"the last good checkpoint (end of epoch {stats.epoch}) is kept in {CHECKPOINT_FILE}"
            if time.monotonic() - plot_note["last"] >= PLOT_EVERY_S:
                plot()

        def plot() -> None:
            """Redraw curves.png (at the end, and during long runs every PLOT_EVERY_S seconds)."""
            plot_note["last"] = time.monotonic()
            if not rows:
                return
            try:
                plot_run(run_dir)
            except PlotUnavailable as exc:
                if not plot_note["shown"]:
                    say(f"note: no {PLOT_FILE}: {exc}; training goes on")
                    plot_note["shown"] = True

        def resume_hint() -> str:
            return f"resume with: cnn-gpu train --resume {run_dir}"

        def kept() -> str:
            if state["good"] is None:
                return "no checkpoint was written (no epoch completed)"
            return state["good"].replace(CHECKPOINT_FILE, str(ckpt_path))

        progress = None if quiet else _progress_for(cfg.progress, out)
        stop = StopFlag()
        t0 = time.perf_counter()
        try:
            with _sigint_requests_stop(stop, _stderr):
                fit(model, opt, loader, cfg.epochs, scheduler=sched, eval_data=test_data, val_data=val_data,
                    on_epoch_end=on_epoch_end, log=None if quiet else say, position=position,
                    progress=progress, stop=stop, on_step=on_step)
        except TrainingInterrupted as exc:
            pos = exc.position
            if pos.step > 0:
                checkpoint(pos)
                where = f"during epoch {pos.epoch + 1} after step {pos.step} of {len(loader)}"
            else:
                where = f"at the end of epoch {pos.epoch}"
            plot()
            raise RunStopped(f"interrupted {where}; checkpoint saved to {ckpt_path}\n{resume_hint()}", 130) from None
        except NonFiniteLossError as exc:
            plot()
            raise RunStopped(f"training stopped: {exc}; {kept()}. Try a lower --lr.", 1) from None
        except KeyboardInterrupt:
            raise RunStopped(f"aborted; {kept()}" + (f"\n{resume_hint()}" if state["good"] else ""), 130) from None
        seconds = time.perf_counter() - t0
        plot()
        if rows and rows[-1]["epoch"] == cfg.epochs and rows[-1]["test_accuracy"] is not None:
            test_loss, test_acc = rows[-1]["test_loss"], rows[-1]["test_accuracy"]
        else:  # resumed a finished run
            test_loss, test_acc = evaluate(model, *test_data)
        say(f"trained in {seconds:.1f} s; test loss {test_loss:.4f}; best {best['metric'].replace('_', ' ')} "
            + (f"{100 * best['value']:.2f}% (epoch {best['epoch']})" if best["value"] is not None else "n/a"))
        if cfg.save:
            save_model(model, cfg.save, metadata=dict(metadata, epoch=cfg.epochs, config=cfg.as_dict()))
            say(f"saved model to {cfg.save}")
    return RunResult(run_dir, cfg, rows, test_loss, test_acc, best)


__all__ = ["TrainConfig", "RECIPES", "train_run", "RunResult", "RunStopped", "PlotUnavailable", "plot_run",
           "load_metrics", "write_metrics", "make_optimizer", "make_schedule", "environment", "BarProgress"]
