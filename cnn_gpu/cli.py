"""The ``cnn-gpu`` command line: train, evaluate, predict, info."""
from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .backend import BackendUnavailableError, use_backend

# Per-dataset defaults: model, epochs, batch size, optimizer, peak learning rate, schedule.
RECIPES = {
    "digits": dict(model="lenet_digits", epochs=20, batch_size=32, optimizer="adam", lr=3e-3, schedule="onecycle"),
    "mnist": dict(model="lenet5", epochs=3, batch_size=128, optimizer="adam", lr=3e-3, schedule="onecycle"),
    "fashion-mnist": dict(model="lenet5", epochs=10, batch_size=128, optimizer="adam", lr=3e-3, schedule="onecycle"),
    "cifar10": dict(model="vgg_small", epochs=20, batch_size=128, optimizer="adam", lr=2e-3, schedule="onecycle"),
}


@dataclasses.dataclass
class TrainConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    model: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    schedule: str | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    backend: str = "numpy"
    seed: int = 0
    save: str | None = None

    def resolved(self) -> "TrainConfig":
        """A copy with every None filled from the dataset's recipe."""
        recipe = RECIPES[self.dataset]
        return dataclasses.replace(self, **{k: v for k, v in recipe.items() if getattr(self, k) is None})


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASET_NAMES
    from .models import MODELS
    from .optim import OPTIMIZERS, SCHEDULES

    parser = argparse.ArgumentParser(prog="cnn-gpu", description="Train and run CNNs with hand-written backprop on NumPy or CuPy.")
    parser.add_argument("--version", action="version", version=f"cnn_gpu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (default: a LeNet-style CNN on the bundled digits)")
    t.add_argument("--dataset", choices=DATASET_NAMES, default="digits")
    t.add_argument("--data-dir", default=None, help="folder holding (or caching) the dataset files")
    t.add_argument("--model", choices=sorted(MODELS), default=None, help="default: the dataset's recipe")
    t.add_argument("--epochs", type=_positive_int, default=None)
    t.add_argument("--batch-size", type=_positive_int, default=None)
    t.add_argument("--lr", type=_positive_float, default=None, help="(peak) learning rate")
    t.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=None)
    t.add_argument("--schedule", choices=sorted(SCHEDULES) + ["none"], default=None)
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--backend", choices=["numpy", "cupy", "auto"], default="numpy")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save", default=None, metavar="PATH", help="write the trained model here (.npz)")

    e = sub.add_parser("evaluate", help="evaluate a saved model on its dataset's test split")
    e.add_argument("--checkpoint", required=True, metavar="PATH")
    e.add_argument("--dataset", choices=DATASET_NAMES, default=None, help="default: the dataset it was trained on")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--backend", choices=["numpy", "cupy", "auto"], default="numpy")
    e.add_argument("--batch-size", type=_positive_int, default=512)

    p = sub.add_parser("predict", help="classify images (.png/.jpg with Pillow, or .npy arrays)")
    p.add_argument("--checkpoint", required=True, metavar="PATH")
    p.add_argument("inputs", nargs="+", metavar="FILE")
    p.add_argument("--top", type=_positive_int, default=3)
    p.add_argument("--backend", choices=["numpy", "cupy", "auto"], default="numpy")

    sub.add_parser("info", help="backends, versions, GPUs and kernels")
    return parser


def _prepare_data(ds, mean=None, std=None):
    from .data import channel_stats, normalize

    if mean is None:
        mean, std = channel_stats(ds.x_train, ds.scale)
    xtr = normalize(ds.x_train, mean, std, ds.scale)
    xte = normalize(ds.x_test, mean, std, ds.scale)
    return xtr, xte, mean, std


def cmd_train(cfg: TrainConfig, out=print) -> float:
    from . import models, optim
    from .backend import current_xp
    from .data import DataLoader, get_dataset
    from .random import manual_seed
    from .serialization import save
    from .train import evaluate, fit

    cfg = cfg.resolved()
    ds = get_dataset(cfg.dataset, cfg.data_dir)
    with use_backend(cfg.backend):
        xp = current_xp()
        manual_seed(cfg.seed)
        xtr, xte, mean, std = _prepare_data(ds)
        xtr, xte = xp.asarray(xtr), xp.asarray(xte)  # uploaded once
        ytr, yte = xp.asarray(ds.y_train), xp.asarray(ds.y_test)
        model = models.get_model(cfg.model, in_channels=ds.input_shape[0], num_classes=ds.num_classes)
        if cfg.optimizer == "sgd":
            opt = optim.SGD(model, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            opt = optim.OPTIMIZERS[cfg.optimizer](model, cfg.lr, weight_decay=cfg.weight_decay)
        loader = DataLoader(xtr, ytr, cfg.batch_size, shuffle=True, seed=cfg.seed)
        total = cfg.epochs * len(loader)
        sched = None
        if cfg.schedule == "onecycle":
            sched = optim.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 2))
        elif cfg.schedule == "cosine":
            sched = optim.CosineLR(opt, total_steps=max(total, 1), warmup_steps=min(len(loader), max(total - 1, 0)))
        elif cfg.schedule == "step":
            sched = optim.StepLR(opt, step_size=max(1, total // 3))
        n_params = model.num_parameters()
        out(f"cnn_gpu {__version__}: training {cfg.model} ({n_params:,} parameters) on {cfg.dataset} "
            f"({ds.x_train.shape[0]} train / {ds.x_test.shape[0]} test) with {cfg.optimizer} lr {cfg.lr:g}, "
            f"{cfg.schedule} schedule, batch {cfg.batch_size}, backend {cfg.backend}")
        t0 = time.perf_counter()
        fit(model, opt, loader, cfg.epochs, scheduler=sched, eval_data=None, log=out)
        test_loss, test_acc = evaluate(model, xte, yte)
        out(f"trained in {time.perf_counter() - t0:.1f} s; test loss {test_loss:.4f}")
        if cfg.save:
            meta = {"dataset": cfg.dataset, "mean": list(map(float, mean)), "std": list(map(float, std)),
                    "scale": ds.scale, "input_shape": list(ds.input_shape), "model": cfg.model,
                    "config": dataclasses.asdict(cfg)}
            save(model, cfg.save, metadata=meta)
            out(f"saved model to {cfg.save}")
    out(f"test accuracy: {100 * test_acc:.2f}%")
    return test_acc


def _load_checkpoint(path: str):
    from .serialization import load, read_npz, decode_header, HEADER_KEY, FORMAT

    model = load(path)
    meta = decode_header(read_npz(path)[HEADER_KEY], path, FORMAT).get("metadata", {})
    return model, meta


def cmd_evaluate(args, out=print) -> float:
    from .backend import current_xp
    from .data import get_dataset
    from .train import evaluate

    model, meta = _load_checkpoint(args.checkpoint)
    dataset = args.dataset or meta.get("dataset")
    if dataset is None:
        raise SystemExit(f"{args.checkpoint}: no dataset recorded in the file; pass --dataset")
    ds = get_dataset(dataset, args.data_dir)
    with use_backend(args.backend):
        xp = current_xp()
        model.to(args.backend)
        _, xte, _, _ = _prepare_data(ds, meta.get("mean"), meta.get("std"))
        loss, acc = evaluate(model, xp.asarray(xte), xp.asarray(ds.y_test), args.batch_size)
    out(f"test loss: {loss:.4f}")
    out(f"test accuracy: {100 * acc:.2f}%")
    return acc


def _read_input(path: Path, input_shape: tuple) -> np.ndarray:
    C, H, W = input_shape
    if path.suffix.lower() == ".npy":
        a = np.load(path, allow_pickle=False)
        if a.ndim == 2:
            a = a[None, None]
        elif a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or tuple(a.shape[1:]) != (C, H, W):
            raise ValueError(f"{path}: expected an array of shape ({C}, {H}, {W}) or (N, {C}, {H}, {W}), got {a.shape}")
        return a
    try:
        from PIL import Image  # noqa: PLC0415 (optional)
    except ImportError:
        raise SystemExit(f"{path}: reading images needs Pillow (pip install pillow), or pass a .npy array") from None
    img = Image.open(path).convert("L" if C == 1 else "RGB").resize((W, H))
    a = np.asarray(img)
    return (a[None, None] if C == 1 else a.transpose(2, 0, 1)[None]).astype(np.float64)


def cmd_predict(args, out=print) -> list:
    from .backend import current_xp, to_numpy
    from .data import normalize
    from .functional import softmax

    model, meta = _load_checkpoint(args.checkpoint)
    shape = tuple(meta.get("input_shape", ()))
    if len(shape) != 3:
        raise SystemExit(f"{args.checkpoint}: no input shape recorded in the file")
    scale = float(meta.get("scale", 255.0))
    results = []
    with use_backend(args.backend):
        model.to(args.backend).eval()
        dtype = next(iter(model.parameters())).dtype
        for name in args.inputs:
            raw = _read_input(Path(name), shape)
            if Path(name).suffix.lower() != ".npy":
                raw = raw * (scale / 255.0)  # image pixels 0..255 -> the dataset's range
            x = normalize(current_xp().asarray(raw), meta["mean"], meta["std"], scale, dtype)
            probs = to_numpy(softmax(model.forward(x), axis=1))
            for i, row in enumerate(probs):
                top = np.argsort(-row)[: args.top]
                label = f"{name}[{i}]" if probs.shape[0] > 1 else name
                out(f"{label}: class {top[0]}  (" + ", ".join(f"{c}: {row[c]:.3f}" for c in top) + ")")
                results.append(int(top[0]))
    return results


def cmd_info(out=print) -> None:
    out(f"cnn_gpu {__version__}, Python {platform.python_version()} on {platform.machine()}")
    out(f"numpy {np.__version__}")
    from .backend import _cupy_status

    cp, why = _cupy_status()
    try:
        import cupy  # noqa: PLC0415

        out(f"cupy {cupy.__version__}")
    except Exception as exc:  # noqa: BLE001 - report any import failure
        out(f"cupy: not importable ({type(exc).__name__})")
    backends = ["numpy"] + (["cupy"] if cp is not None else [])
    out(f"backends: {', '.join(backends)}" + ("" if cp is not None else f"  (cupy: {why})"))
    if cp is not None:
        rt = cp.cuda.runtime
        out(f"CUDA runtime {rt.runtimeGetVersion()}, driver {rt.driverGetVersion()}")
        for i in range(rt.getDeviceCount()):
            props = rt.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            out(f"GPU {i}: {name}, {props['totalGlobalMem'] / 2**30:.1f} GiB, compute capability {props['major']}.{props['minor']}")
    try:
        from . import cuda  # noqa: PLC0415
    except ImportError:
        return
    if hasattr(cuda, "list_kernels"):
        for fname, names in cuda.list_kernels().items():
            out(f"kernels/{fname}: {', '.join(names)}")
        if cp is not None and hasattr(cuda, "compile_all"):
            t0 = time.perf_counter()
            cuda.compile_all()
            out(f"compiled all kernels for this GPU in {time.perf_counter() - t0:.2f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            fields = {f.name for f in dataclasses.fields(TrainConfig)}
            cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
            cmd_train(cfg)
        elif args.command == "evaluate":
            cmd_evaluate(args)
        elif args.command == "predict":
            cmd_predict(args)
        elif args.command == "info":
            cmd_info()
    except (BackendUnavailableError, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"cnn-gpu {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["main", "TrainConfig", "RECIPES", "build_parser"]
