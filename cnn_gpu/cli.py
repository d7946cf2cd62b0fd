"""The ``cnn-gpu`` command line: train, evaluate, predict, plot, models, export, info."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .backend import BackendUnavailableError, use_backend
from .config import BACKENDS, DEFAULT_WORKSPACE_MB
from .config import get as get_config
from .data.augment import AUGMENTATIONS
from .precision import PRECISIONS
from .runs import DATA_MODEL_RULE, DATA_RECIPE, PROGRESS_MODES, RECIPES, RUN_SETTINGS, RunStopped, TrainConfig, default_backend


def _number(convert, accept, expected: str):
    """An argparse type: ``convert`` the text, then require ``accept(value)``; errors say ``expected``."""

    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return v

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: 0 <= v < 2**63, "a non-negative integer below 2**63")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive finite number")


def _batch_size(text: str):
    """--batch-size: a positive integer, or auto (cnn_gpu.runs: the largest that fits the GPU)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None


_non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a non-negative finite number")
_fraction = _number(float, lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)")
_unit = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def _input_shape(text: str) -> tuple:
    """C,H,W (or CxHxW) -> a tuple of positive ints."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,28,28 (one input, no batch), got {text!r}")
    return shape


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``cnn-gpu train: error: argument --lr: ... (see cnn-gpu train --help)``
    instead of the usage block (subcommands' parsers are of this class too)."""

    train_parser: argparse.ArgumentParser  # the top-level parser's `train` subcommand (build_parser sets it)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _image_size(text: str) -> tuple:
    """H or HxW -> (H, W), positive ints."""
    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or any(d < 1 for d in size):
        raise argparse.ArgumentTypeError(f"expected a positive size like 32 or 32x48 (height x width), got {text!r}")
    return size * 2 if len(size) == 1 else size


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASET_NAMES
    from .data.datasets import data_dir
    from .models import MODELS
    from .optim import OPTIMIZERS, SCHEDULES

    parser = _Parser(prog="cnn-gpu", description="Train and run CNNs with hand-written backprop on NumPy or CuPy.")
    parser.add_argument("--version", action="version", version=f"cnn_gpu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    parser.train_parser = _add_train_parser(sub, DATASET_NAMES, MODELS, OPTIMIZERS, SCHEDULES, data_dir())
    _add_other_parsers(sub, DATASET_NAMES)
    return parser


def _add_train_parser(sub, DATASET_NAMES, MODELS, OPTIMIZERS, SCHEDULES, default_data_dir) -> argparse.ArgumentParser:
    # Defaults are None here so that --resume can tell which settings were given; TrainConfig
    # and the dataset's recipe (RECIPES) fill in the rest.
    t = sub.add_parser(
        "train",
        help="train a model (default: a LeNet-style CNN on the bundled digits)",
        description="Train a model. Unset options come from the dataset's recipe.",
    )

    def recipe(key: str) -> str:
        own = f", --data {DATA_RECIPE[key]}" if key in DATA_RECIPE else ""
        return "default: the dataset's recipe (" + ", ".join(f"{d} {r[key]}" for d, r in RECIPES.items()) + own + ")"

    _add_data_arguments(t, DATASET_NAMES, default_data_dir)
    t.add_argument("--model", choices=sorted(MODELS), default=None, help=recipe("model") + "; with --data: " + DATA_MODEL_RULE)
    t.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=recipe("epochs") + "; with --resume: extend a finished run to this many epochs",
    )
    t.add_argument(
        "--batch-size",
        type=_batch_size,
        default=None,
        metavar="N|auto",
        help="examples per step, or auto: the largest power of two whose training step fits the GPU "
        "(on the CPU: the recipe's); " + recipe("batch_size"),
    )
    t.add_argument("--lr", type=_positive_float, default=None, help="(peak) learning rate; " + recipe("lr"))
    t.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=None, help=recipe("optimizer"))
    t.add_argument("--schedule", choices=sorted(SCHEDULES) + ["none"], default=None, help=recipe("schedule"))
    t.add_argument(
        "--warmup",
        type=_fraction,
        default=None,
        help="fraction of the steps spent warming up (one-cycle: rising to the peak lr; cosine: linear "
        "warm-up); " + recipe("warmup"),
    )
    t.add_argument("--momentum", type=_fraction, default=None, help=f"SGD momentum (default {TrainConfig.momentum})")
    t.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="SGD with Nesterov momentum; " + recipe("nesterov"),
    )
    t.add_argument("--weight-decay", type=_non_negative_float, default=None, help=recipe("weight_decay"))
    t.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default=None,
        help="training-batch augmentation on the device: random crop (padding H/8) and/or "
        "horizontal flip (default: the recipe's, else none)",
    )
    t.add_argument(
        "--label-smoothing",
        type=_unit,
        default=None,
        metavar="EPS",
        help="label smoothing of the loss, in [0, 1] (default: the recipe's, else 0)",
    )
    _add_run_arguments(t)
    return t


def _add_data_arguments(t: argparse.ArgumentParser, DATASET_NAMES, default_data_dir) -> None:
    """cnn-gpu train's data options: a built-in dataset, or your own (--data and its settings)."""
    t.add_argument("--dataset", choices=DATASET_NAMES, default=None, help="a built-in dataset (default: digits, bundled)")
    t.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="train on your own data: a folder of class folders of images, a folder with train/ and "
        "test/ (and val/) class folders, or an .npz with x_train, y_train, x_test, y_test [, classes]",
    )
    t.add_argument(
        "--test-fraction",
        type=_fraction,
        default=None,
        metavar="F",
        help="--data without a test split: hold out this fraction of each class for testing "
        f"(default {TrainConfig.test_fraction})",
    )
    t.add_argument(
        "--image-size",
        type=_image_size,
        default=None,
        metavar="H[xW]",
        help="--data images: resize to H x W (default: the most common size in the data)",
    )
    t.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="--data images: 1 (grey) or 3 (RGB) (default: 1 if every image is grey, else 3)",
    )
    t.add_argument(
        "--data-dir",
        default=None,
        help=f"folder holding (or caching) the dataset files; with --data, the images' decode cache goes "
        f"in DIR/images (default: $CNN_GPU_DATA, else {default_data_dir})",
    )


def _add_run_arguments(t: argparse.ArgumentParser) -> None:
    """cnn-gpu train's run options: the GPU step, validation, backend, workspace, seed, folders, output."""
    t.add_argument(
        "--cuda-graph",
        choices=("auto", "on", "off"),
        default=None,
        help="on the GPU, capture the training step once as a CUDA graph and replay it each batch "
        "(auto: on with the cupy backend, its first replay checked against an eager step; "
        f"default {TrainConfig.cuda_graph})",
    )
    t.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="arithmetic on the GPU: fp32, tf32 (the GEMMs in TF32 tensor-core math) or fp16 (float16 "
        f"storage, float32 master weights, loss scaling on the device); default {TrainConfig.precision}",
    )
    t.add_argument(
        "--val-fraction",
        type=_fraction,
        default=None,
        help="hold out this fraction of the training set (stratified, fixed) for validation "
        f"(default {TrainConfig.val_fraction})",
    )
    t.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default=None,
        help=f"default: $CNN_GPU_BACKEND, else auto (the GPU when one is usable, else numpy); now {default_backend()}",
    )
    t.add_argument(
        "--workspace-mb",
        type=_positive_float,
        default=None,
        metavar="MB",
        help="cap one convolution's im2col workspace; larger batches are processed in chunks "
        f"(default: $CNN_GPU_WORKSPACE_MB, else {DEFAULT_WORKSPACE_MB:g}; now {get_config().workspace_mb:g})",
    )
    t.add_argument("--seed", type=_non_negative_int, default=None, help=f"default: {TrainConfig.seed}")
    t.add_argument("--run-dir", default=None, metavar="DIR", help="the run folder (default: runs/DATASET-MODEL-TIME)")
    t.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run saved in RUN_DIR (or given by a file in it, e.g. its checkpoint.npz) exactly where it stopped",
    )
    t.add_argument("--save", default=None, metavar="PATH", help="also write the final model here (.npz)")
    t.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default=None,
        help=f"default {TrainConfig.progress}: a progress bar on a terminal, one line per epoch otherwise",
    )
    t.add_argument("--quiet", "-q", action="store_true", default=None, help="print only the final test accuracy")


def _add_other_parsers(sub, DATASET_NAMES) -> None:
    e = sub.add_parser("evaluate", help="evaluate a saved model on its dataset's test split")
    e.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="a model file, a checkpoint.npz or a run folder (its best.npz)"
    )
    e.add_argument("--dataset", choices=DATASET_NAMES, default=None, help="default: the dataset it was trained on")
    e.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="evaluate on the test split of this data (as train --data takes it; images resized and "
        "converted to the model's input; default: the data it was trained on)",
    )
    e.add_argument("--data-dir", default=None)
    e.add_argument(
        "--backend", choices=list(BACKENDS), default=None, help=f"default: $CNN_GPU_BACKEND, else auto; now {default_backend()}"
    )
    e.add_argument("--batch-size", type=_positive_int, default=512, help="default: 512")

    p = sub.add_parser(
        "predict", help="classify images (PNG, JPEG, ... with Pillow, or .npy arrays); a folder of images gives a CSV"
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="a model file, a checkpoint.npz or a run folder (its best.npz)"
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="FILE_OR_FOLDER",
        help=".npy arrays (C, H, W) or (N, C, H, W) of raw pixel values in [0, scale] (the dataset's range: "
        "16 for digits, 255 for the others), images, or folders of images (searched recursively): "
        "their predictions go to a CSV (--out)",
    )
    p.add_argument(
        "--top-k",
        "--top",
        dest="top_k",
        type=_positive_int,
        default=3,
        metavar="K",
        help="how many classes to show, most probable first (default 3)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE.csv",
        help=f"where a folder's predictions go: path, class, probability per image (default: {PREDICTIONS_CSV} "
        "in the current folder, replaced if it exists)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass (default 256)")
    p.add_argument(
        "--backend", choices=list(BACKENDS), default=None, help=f"default: $CNN_GPU_BACKEND, else auto; now {default_backend()}"
    )

    pl = sub.add_parser("plot", help="(re)draw a run's curves.png from its metrics.jsonl (needs matplotlib)")
    pl.add_argument("run_dir", metavar="RUN_DIR")
    pl.add_argument("--out", default=None, metavar="PATH", help="default: RUN_DIR/curves.png")

    m = sub.add_parser("models", help="the model zoo: parameters and per-layer output shapes")
    m.add_argument("names", nargs="*", metavar="NAME", help="only these models")

    x = sub.add_parser(
        "export",
        help="write a saved model as ONNX (needs the onnx extra: pip install -e '.[onnx]')",
        description="Write a saved model as ONNX: eval mode (no dropout), dynamic batch size.",
    )
    x.add_argument("source", metavar="RUN_DIR_OR_MODEL", help="a model file, a checkpoint.npz or a run folder (its best.npz)")
    x.add_argument("out", metavar="OUT.onnx")
    x.add_argument(
        "--input-shape",
        type=_input_shape,
        default=None,
        metavar="C,H,W",
        help="one input's shape (default: the shape recorded in the model file by cnn-gpu train)",
    )
    x.add_argument("--opset", type=_positive_int, default=None, help="ONNX opset (default: cnn_gpu.onnx.DEFAULT_OPSET)")

    sub.add_parser("info", help="backends, versions, GPUs and kernels")


def _prepare_data(ds, mean=None, std=None):
    from .data import channel_stats, normalize

    if mean is None:
        mean, std = channel_stats(ds.x_train, ds.scale)
    xtr = normalize(ds.x_train, mean, std, ds.scale)
    xte = normalize(ds.x_test, mean, std, ds.scale)
    return xtr, xte, mean, std


def cmd_train(cfg: TrainConfig, out=print, *, resume: str | None = None, callbacks=()) -> float:
    """Train (or resume) a run; the last line printed is ``test accuracy: NN.NN%``. -> the test accuracy.

    Raises RunStopped (after saving a checkpoint where possible) on Ctrl-C or a non-finite loss.
    """
    from .distributed import init
    from .runs import train_run

    result = train_run(cfg, out, resume=resume, callbacks=callbacks)
    if init().is_lead:  # under mpiexec only rank 0 prints
        out(result.describe())
    return result.test_accuracy


def _resolve_model_path(path: str) -> Path:
    from .runs import BEST_FILE, LAST_FILE

    p = Path(path)
    if p.is_dir():
        for name in (BEST_FILE, LAST_FILE):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"checkpoint: expected a model file or a run folder holding {BEST_FILE}, got {p}")
    if not p.exists():
        raise FileNotFoundError(f"checkpoint: no such file: {p}")
    return p


def _load_checkpoint(path: str):
    """(model, metadata) from a model file (cnn_gpu.save), a training checkpoint, or a run folder."""
    from .checkpoint import FORMAT as CKPT_FORMAT
    from .checkpoint import load_checkpoint, read_header
    from .serialization import load

    p = _resolve_model_path(path)
    header = read_header(p)
    if header.get("format") == CKPT_FORMAT:
        ckpt = load_checkpoint(p)
        return ckpt.build_model(), ckpt.metadata
    model = load(p)  # checks the format, with a clear error for anything else
    return model, header.get("metadata", {})


def _model_input(meta: dict, source) -> tuple:
    """The (C, H, W) a model file records (cnn-gpu train and cnn_gpu.save record it)."""
    shape = tuple(meta.get("input_shape", ()))
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(
            f"checkpoint: {source} records no input shape (C, H, W); train it with cnn-gpu train, or save "
            "it with cnn_gpu.save after a forward pass (the model records the input shape it last saw)"
        )
    return shape


def _normalisation(meta: dict, channels: int) -> tuple[list, list]:
    """The model's recorded per-channel mean and std; without them pixels are only scaled to [0, 1]."""
    if meta.get("mean") is None or meta.get("std") is None:
        return [0.0] * channels, [1.0] * channels
    return list(meta["mean"]), list(meta["std"])


def _class_names(meta: dict, k: int) -> list[str]:
    """The model's class names (recorded by cnn-gpu train or cnn_gpu.save(classes=...)), else "0".."k-1"."""
    names = meta.get("classes")
    if isinstance(names, list) and len(names) == k and all(isinstance(n, str) for n in names):
        return names
    return [str(i) for i in range(k)]


def _short(names) -> str:
    names = list(names)
    return "[" + ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "") + "]"


def _evaluation_data(args, meta: dict):
    """(Dataset, its description) for cmd_evaluate: --data PATH, --dataset NAME, else the data the
    model records; images of --data come resized and converted to the model's input shape."""
    from .data import DATASET_NAMES, get_dataset  # noqa: PLC0415

    if args.data is not None and args.dataset is not None:
        raise ValueError("--data and --dataset: expected one of them (your own data or a built-in dataset), got both")
    recorded_config = meta.get("config")
    cfg: dict = recorded_config if isinstance(recorded_config, dict) else {}
    data = args.data
    if data is None and args.dataset is None:  # the data the model was trained on: a --data run's, or a path
        recorded = meta.get("dataset")
        data = cfg.get("data") or (recorded if recorded not in (None, *DATASET_NAMES) else None)
    if data is None:
        name = args.dataset or meta.get("dataset")
        if name is None:
            raise ValueError(f"dataset: {args.checkpoint} records no dataset; pass --data PATH or --dataset NAME")
        return get_dataset(name, args.data_dir), name
    from .runs import open_run_data  # noqa: PLC0415

    shape = _model_input(meta, args.checkpoint)
    size: tuple | None = shape[1:]  # (H, W)
    channels: int | None = shape[0]
    if cfg.get("data") and Path(data).expanduser().resolve() == Path(cfg["data"]):
        # the run's own data: opened as training opened it (the same decode cache entry)
        size, channels = cfg.get("image_size"), cfg.get("channels")
    ds = open_run_data(
        data,
        image_size=size,
        channels=channels,
        test_fraction=cfg.get("test_fraction"),
        data_dir=args.data_dir or cfg.get("data_dir"),
    )  # the run's decode cache by default
    return ds, str(data)


def _check_fits(ds, source: str, meta: dict, outputs: int | None, shape: tuple, checkpoint) -> None:
    """The data must have the model's input shape and classes (by name where both have names)."""
    if tuple(ds.input_shape) != tuple(shape):
        raise ValueError(f"{source}: expected images of the model's input shape {tuple(shape)}, got {tuple(ds.input_shape)}")
    names, data_names = meta.get("classes"), list(ds.classes) if getattr(ds, "classes", None) else None
    if names and data_names and list(names) != data_names:
        raise ValueError(
            f"{source}: expected the classes the model {checkpoint} was trained on, {_short(names)}, got {_short(data_names)}"
        )
    if outputs is not None and ds.num_classes != outputs:
        raise ValueError(f"{source}: expected {outputs} classes (the model's outputs), got {ds.num_classes}")


def cmd_evaluate(args, out=print) -> float:
    """Loss and accuracy of a saved model on a test split; the last line is ``test accuracy: NN.NN% (...)``."""
    from .backend import current_xp
    from .data import normalize
    from .serialization import _outputs, model_dtype
    from .train import evaluate

    model, meta = _load_checkpoint(args.checkpoint)
    path = _resolve_model_path(args.checkpoint)
    ds, source = _evaluation_data(args, meta)
    _check_fits(ds, source, meta, _outputs(model), tuple(meta.get("input_shape") or ds.input_shape), args.checkpoint)
    mean, std = _normalisation(meta, ds.input_shape[0])
    backend = args.backend or default_backend()
    with use_backend(backend):
        xp = current_xp()
        model.to(backend)
        xte = normalize(ds.x_test, mean, std, ds.scale, model_dtype(model))
        loss, acc = evaluate(model, xp.asarray(xte), xp.asarray(ds.y_test), args.batch_size)
    out(f"test loss: {loss:.4f}")
    out(f"test accuracy: {100 * acc:.2f}% ({path}, {len(ds.y_test)} test images of {source})")
    return acc


def _read_npy(path: Path, input_shape: tuple, scale: float) -> np.ndarray:
    """A .npy of raw pixel values in [0, scale] (the dataset's range), checked: real numbers, finite,
    in range, of the model's input shape (C, H, W) or (N, C, H, W) with N >= 1."""
    C, H, W = input_shape
    try:
        a = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable .npy array of numbers (object arrays are refused): {exc}") from None
    if a.dtype.kind not in "uif":
        raise ValueError(f"{path}: expected integer or real pixel values (uint8, float32, ...), got dtype {a.dtype}")
    given = a.shape
    if a.ndim in (2, 3) and a.shape == (C, H, W)[3 - a.ndim :]:
        a = a.reshape((1,) * (4 - a.ndim) + a.shape)
    if a.ndim != 4 or tuple(a.shape[1:]) != (C, H, W) or a.shape[0] < 1:
        raise ValueError(f"{path}: expected an array of shape ({C}, {H}, {W}) or (N, {C}, {H}, {W}) with N >= 1, got {given}")
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{path}: expected finite pixel values, got {int((~np.isfinite(a)).sum())} NaN or infinite")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > scale:
        raise ValueError(
            f"{path}: expected raw pixel values in [0, {scale:g}] (the dataset's range, before "
            f"normalisation), got values in [{lo:g}, {hi:g}]"
        )
    return a


def _read_input(path: Path, input_shape: tuple, scale: float = 255.0) -> tuple[np.ndarray, float]:
    """(raw pixels (N, C, H, W), their full-scale value) of a .npy array or an image file. Images
    are read by cnn_gpu.data.read_image: decoded, converted and resized exactly as training read them."""
    C, H, W = input_shape
    if not path.is_file():
        raise FileNotFoundError(f"input: no such file: {path}")
    if path.suffix.lower() == ".npy":
        return _read_npy(path, input_shape, scale), scale
    from .data import read_image  # noqa: PLC0415

    return read_image(path, image_size=(H, W), channels=C)[None], 255.0


PREDICTIONS_CSV = "predictions.csv"


def _image_files(folder: Path) -> list[Path]:
    """The images below ``folder`` (any depth), sorted; hidden files and folders are skipped."""
    from .data import IMAGE_SUFFIXES  # noqa: PLC0415

    found = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not found:
        raise ValueError(f"{folder}: expected images ({', '.join(IMAGE_SUFFIXES)}) in the folder or below it, got none")
    return found


def _csv_target(args) -> Path:
    """Where predict writes a folder's predictions; its folder must exist (nothing is created)."""
    target = Path(args.out if args.out is not None else PREDICTIONS_CSV)
    if target.is_dir():
        raise ValueError(f"--out: expected a file name for the CSV, got {target}, a folder")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"--out: the folder {target.parent} does not exist (it is not created)")
    return target


def _top(row: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-row, kind="stable")[:k]


def cmd_predict(args, out=print) -> list:
    """Print the top-k classes (names) with probabilities of each file; the images of folders go to
    a CSV (path, class, probability[, class_2, probability_2, ...]). -> the top class of each."""
    from .backend import current_xp, to_numpy
    from .data import normalize
    from .serialization import model_dtype
    from .train import predict_proba

    model, meta = _load_checkpoint(args.checkpoint)
    shape = _model_input(meta, args.checkpoint)
    scale = float(meta.get("scale", 255.0))
    mean, std = _normalisation(meta, shape[0])
    files, folder_files = [], []
    for name in args.inputs:
        if Path(name).is_dir():
            folder_files.extend(_image_files(Path(name)))
        else:
            files.append(Path(name))
    target = _csv_target(args) if folder_files else None
    backend = args.backend or default_backend()
    with use_backend(backend):
        model.to(backend).eval()
        dtype = model_dtype(model)

        def probabilities(raw: np.ndarray, full_scale: float) -> np.ndarray:
            x = normalize(current_xp().asarray(raw), mean, std, full_scale, dtype)
            return to_numpy(predict_proba(model, x, args.batch_size))

        names = _class_names(meta, _num_outputs(model, meta, shape, probabilities))
        k = min(args.top_k, len(names))
        results = _predict_files(files, shape, scale, probabilities, names, k, out)
        rows = []
        for first in range(0, len(folder_files), args.batch_size):  # a batch of images in memory at a time
            chunk = folder_files[first : first + args.batch_size]
            raw = np.concatenate([_read_input(p, shape, scale)[0] for p in chunk])
            for p, row in zip(chunk, probabilities(raw, 255.0)):
                top = _top(row, k)
                rows.append([str(p)] + [v for c in top for v in (names[c], f"{row[c]:.6f}")])
    if target is not None:
        _write_predictions(target, rows, k)
        counts = Counter(r[1] for r in rows)
        out(f"wrote {target}: {len(rows)} images; predicted " + ", ".join(f"{n} {c}" for n, c in counts.most_common()))
    return results + [names.index(r[1]) for r in rows]


def _num_outputs(model, meta: dict, shape: tuple, probabilities) -> int:
    """How many classes the model scores: its last Linear's outputs, else the file's num_classes,
    else what a forward pass of one blank input gives."""
    from .serialization import _outputs  # noqa: PLC0415

    known = _outputs(model) or meta.get("num_classes")
    if isinstance(known, int) and known > 0:
        return known
    return int(probabilities(np.zeros((1,) + tuple(shape)), 255.0).shape[1])


def _predict_files(files: list, shape: tuple, scale: float, probabilities, names: list, k: int, out) -> list:
    """One line per image (per row of a .npy): ``FILE: class NAME  (NAME: p, NAME2: p2, ...)``."""
    results = []
    for p in files:
        probs = probabilities(*_read_input(p, shape, scale))
        for i, row in enumerate(probs):
            top = _top(row, k)
            label = f"{p}[{i}]" if probs.shape[0] > 1 else str(p)
            out(f"{label}: class {names[top[0]]}  (" + ", ".join(f"{names[c]}: {row[c]:.3f}" for c in top) + ")")
            results.append(int(top[0]))
    return results


def _write_predictions(target: Path, rows: list, k: int) -> None:
    """The CSV, atomically: path, class, probability, then class_2, probability_2, ... up to k."""
    import csv  # noqa: PLC0415

    from .io import atomic_write  # noqa: PLC0415

    header = ["path", "class", "probability"] + [f"{h}_{j}" for j in range(2, k + 1) for h in ("class", "probability")]
    with atomic_write(target, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def cmd_export(args, out=print) -> Path:
    """Write the model of ``args.source`` as ONNX to ``args.out`` (batch dimension dynamic)."""
    from .onnx import export  # noqa: PLC0415

    model, meta = _load_checkpoint(args.source)
    folder = Path(args.out).parent
    if not folder.is_dir():
        raise FileNotFoundError(f"out: the folder {folder} does not exist (create it first; export does not)")
    shape = args.input_shape or tuple(meta.get("input_shape", ()))
    if not shape:
        raise ValueError(
            f"input shape: {args.source} records none (save it with cnn_gpu.save after a forward pass, "
            "or train it with cnn-gpu train); pass --input-shape C,H,W"
        )
    proto = export(model, args.out, (1,) + tuple(shape), opset=args.opset)
    outputs = [d.dim_param or str(d.dim_value) for d in proto.graph.output[0].type.tensor_type.shape.dim]
    out(
        f"wrote {args.out}: opset {proto.opset_import[0].version}, input [batch, {', '.join(map(str, shape))}], "
        f"output [{', '.join(outputs)}]"
    )
    return Path(args.out)


def cmd_plot(args, out=print) -> Path:
    from .runs import plot_run

    path = plot_run(args.run_dir, args.out)
    out(f"wrote {path}")
    return path


def _describe_layer(m) -> str:
    """A short description: Conv2d 1->6 5x5 pad 2, Linear 400->120, MaxPool2d 2x2, Dropout p=0.3."""
    kind = type(m).__name__

    def pair(v):
        return f"{v[0]}x{v[1]}" if v[0] != v[1] else f"{v[0]}"

    if kind == "Conv2d":
        text = f"Conv2d {m.in_channels}->{m.out_channels} {m.kernel_size[0]}x{m.kernel_size[1]}"
        for label, v, default in (("stride", m.stride, (1, 1)), ("pad", m.padding, (0, 0)), ("dilation", m.dilation, (1, 1))):
            if tuple(v) != default:
                text += f" {label} {pair(v)}"
        text += f" groups {m.groups}" if getattr(m, "groups", 1) != 1 else ""
        return text + ("" if m.bias is not None else " no bias")
    if kind == "Linear":
        return f"Linear {m.in_features}->{m.out_features}" + ("" if m.bias is not None else " no bias")
    if kind in ("MaxPool2d", "AvgPool2d"):
        text = f"{kind} {m.kernel_size[0]}x{m.kernel_size[1]}"
        if tuple(m.stride) != tuple(m.kernel_size):
            text += f" stride {pair(m.stride)}"
        if tuple(m.padding) != (0, 0):
            text += f" pad {pair(m.padding)}"
        return text
    if kind == "Dropout":
        return f"Dropout p={m.p:g}"
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return f"{kind} {m.num_features}" + ("" if m.affine else " no affine")
    if kind == "AdaptiveAvgPool2d":
        return f"AdaptiveAvgPool2d {m.output_size[0]}x{m.output_size[1]}"
    extra = m.extra_repr()
    return kind + (f"({extra})" if extra else "")


def summarize(model, input_shape: tuple) -> list[tuple[str, str, tuple, int]]:
    """(name, layer, output shape without the batch, parameters) for each leaf layer, in order,
    by running a zero batch of one through the model (eval mode, the reference engine, so every
    leaf runs on its own; each leaf's output is recorded, also inside a Residual's branches)."""
    from . import config  # noqa: PLC0415

    x = np.zeros((1,) + tuple(input_shape), dtype=np.float32)
    leaves = [(name, m) for name, m in model.named_modules() if not m._modules]  # containers: their leaves are listed
    shapes = {}

    def recording(name, forward):
        def run(*args, **kwargs):
            y = forward(*args, **kwargs)
            shapes[name] = tuple(y.shape[1:])
            return y

        return run

    was_training = model.training
    model.eval()
    try:
        for name, m in leaves:
            object.__setattr__(m, "forward", recording(name, m.forward))
        with config.override(engine="reference"):
            model.forward(x)
    finally:
        for _, m in leaves:
            m.__dict__.pop("forward", None)
        model.train(was_training)
    return [
        (name, _describe_layer(m), shapes[name], int(sum(int(np.prod(p.shape)) for p in m.parameters()))) for name, m in leaves
    ]


def cmd_models(args, out=print) -> None:
    from .models import ANY_SIZE_FROM, MODELS
    from .random import manual_seed

    names = args.names or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"models: expected names from {sorted(MODELS)}, got {unknown}")
    recipes: dict[str, list[str]] = {}  # model -> the datasets it has a recipe for
    for ds, r in RECIPES.items():
        recipes.setdefault(r["model"], []).append(ds)
    manual_seed(0)
    with use_backend("numpy"):
        for i, name in enumerate(names):
            factory, shape = MODELS[name]
            model = factory(in_channels=shape[0], num_classes=10)
            used = f"; the default for {', '.join(recipes[name])}" if name in recipes else ""
            if i:
                out("")
            size = f" (any size from {ANY_SIZE_FROM[name]}x{ANY_SIZE_FROM[name]})" if name in ANY_SIZE_FROM else ""
            out(f"{name}: input {'x'.join(map(str, shape))}{size}, {model.num_parameters():,} parameters (10 classes){used}")
            rows = summarize(model, shape)
            w = max(len(r[0]) for r in rows)
            lw = max(len(r[1]) for r in rows)
            out(f"  {'layer':<{w}}  {'type':<{lw}}  {'output':>10}  {'parameters':>10}")
            for lname, kind, oshape, n in rows:
                out(f"  {lname:<{w}}  {kind:<{lw}}  {'x'.join(map(str, oshape)):>10}  {n:>10,}")


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
            out(
                f"GPU {i}: {name}, {props['totalGlobalMem'] / 2**30:.1f} GiB, "
                f"compute capability {props['major']}.{props['minor']}"
            )
    try:
        from . import cuda  # noqa: PLC0415
    except ImportError:
        return
    try:
        kernels = cuda.list_kernels()
    except FileNotFoundError as exc:  # an install without the kernel sources
        out(f"kernels: not found ({exc})")
        return
    out(f"kernels in {cuda.kernel_dir()}:")
    for fname, names in kernels.items():
        out(f"  {fname}.cu: {', '.join(names)}")
    if cp is not None:
        t0 = time.perf_counter()
        cuda.compile_all()
        out(f"compiled all kernels for this GPU in {time.perf_counter() - t0:.2f} s")


def _train_config(args, parser) -> tuple[TrainConfig, str | None]:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if args.resume is not None:
        clash = sorted(k for k in given if (k in RUN_SETTINGS and k != "epochs") or k == "run_dir")
        if clash:
            flags = ", ".join("--" + k.replace("_", "-") for k in clash)
            parser.train_parser.error(
                f"--resume: continues a run with its saved settings; got {flags} as well "
                "(only --epochs, to extend a finished run, --data-dir, --backend, --workspace-mb, --save, "
                "--progress, --quiet and --cuda-graph may be given)"
            )
    if args.test_fraction is not None and args.data is not None and Path(args.data).suffix.lower() == ".npz":
        print(
            f"cnn-gpu train: note: --test-fraction is not used: {args.data} has its own test split (x_test, y_test)",
            file=sys.stderr,
        )
    return TrainConfig(**given), args.resume


EXIT_OK, EXIT_TRAINING_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _run(args, parser) -> None:
    if args.command == "train":
        cfg, resume = _train_config(args, parser)
        from .workspace import use_workspace_limit  # noqa: PLC0415

        limit = use_workspace_limit(cfg.workspace_mb) if cfg.workspace_mb else contextlib.nullcontext()
        with limit:
            cmd_train(cfg, resume=resume)
    elif args.command == "evaluate":
        cmd_evaluate(args)
    elif args.command == "predict":
        cmd_predict(args)
    elif args.command == "plot":
        cmd_plot(args)
    elif args.command == "models":
        cmd_models(args)
    elif args.command == "export":
        cmd_export(args)
    elif args.command == "info":
        cmd_info()


def describe_error(exc: BaseException) -> str:
    """One line for a user error: what failed, on which file, and what to do where that is known."""
    from .data.datasets import DownloadError  # noqa: PLC0415

    if isinstance(exc, DownloadError):
        first = str(exc).splitlines()[0].rstrip(":")
        return (
            f"{first} (offline? put the dataset's files in --data-dir, or set CNN_GPU_MIRROR; "
            f"{len(str(exc).splitlines()) - 1} mirror(s) failed)"
        )
    if isinstance(exc, OSError) and exc.strerror:  # from the system: "PATH: Permission denied"
        return f"{exc.filename}: {exc.strerror}" if exc.filename is not None else str(exc.strerror)
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``cnn-gpu`` command. Exit status: 0 done, 1 training failed (a non-finite loss, the GPU
    out of memory, a full disk), 2 usage or input error (a bad argument, file or folder; one line on
    stderr, no traceback), 75 stopped by SIGTERM/SIGUSR1 with a checkpoint saved (requeue and
    --resume: runs.EXIT_REQUEUE), 130 interrupted (Ctrl-C)."""
    try:
        parser = build_parser()  # reads the settings: a bad CNN_GPU_* variable is a usage error
    except ValueError as exc:
        print(f"cnn-gpu: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)  # a usage error exits with 2 (argparse)
    try:
        _run(args, parser)
    except RunStopped as exc:
        print(f"cnn-gpu {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"cnn-gpu {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `cnn-gpu ... | head`: stop quietly, like other command-line tools
        import os  # noqa: PLC0415

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    # ImportError: an optional extra (matplotlib, Pillow) is missing; OSError: a file or folder that
    # cannot be read or written (permissions, a path below a regular file, a full disk, a failed download)
    except (ImportError, BackendUnavailableError, OSError, ValueError, TypeError) as exc:
        print(f"cnn-gpu {args.command}: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


__all__ = ["main", "describe_error", "TrainConfig", "RECIPES", "build_parser", "cmd_train", "summarize"]
