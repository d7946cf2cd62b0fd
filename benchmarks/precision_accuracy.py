"""Does float16 training reach float32's accuracy? `cnn-gpu train --precision fp32` against
`--precision fp16`, the same recipe, seeds and data, on a GPU -- or, with --standin, through the
CuPy stand-in (tests/standin: every kernel of the fp16 path runs in the g++ emulation, bit for bit
what the CUDA code computes, on the CPU).

    python benchmarks/precision_accuracy.py --standin                       # digits, 3 seeds
    python benchmarks/precision_accuracy.py --standin --dataset fashion-mnist --train 6000 --epochs 2

One run's test accuracy moves with its trajectory (a different seed, or float16's rounding, puts
another few of the digits' 359 test images on the other side of a boundary), so the verdict is
on the mean over the seeds: fp16 within 0.5 points of fp32. Each pair runs its two precisions in
two processes (--jobs). Fashion-MNIST comes from --data-dir (Debian's dataset-fashion-mnist puts
it in /usr/share/datasets); --train / --test take the first N of each class-balanced split into an
.npz that the runs read as `--data`, with the recipe for one's own data (lenet5, Adam 2e-3,
one-cycle, batch 64: it learns in 2 epochs, where Fashion-MNIST's 30-epoch SGD recipe squeezed into
2 has barely left chance).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FASHION_RECIPE = ["--model", "lenet5"]  # and --data's recipe: Adam 2e-3, one-cycle, batch 64 (cnn_gpu/runs.py)


def _child(argv: list[str], standin: bool) -> int:
    """One training run in this process: `cnn-gpu train` with ``argv`` (``standin``: through the stand-in)."""
    context = contextlib.nullcontext()
    if standin:
        sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
        from standin import activated  # noqa: PLC0415

        context = activated()
    with context:
        from cnn_gpu import cli  # noqa: PLC0415

        return cli.main(["train", "--backend", "cupy", *argv])


def fashion_subset(data_dir: str, train: int, test: int, out: Path) -> Path:
    """The first ``train`` / ``test`` images of each Fashion-MNIST split (the files are shuffled:
    the first N are near balanced over the classes) as an .npz for `--data`."""
    import numpy as np  # noqa: PLC0415

    from cnn_gpu.data import load_fashion_mnist  # noqa: PLC0415

    (x, y), (xt, yt) = load_fashion_mnist(data_dir, download=False)
    np.savez(out, x_train=x[:train], y_train=y[:train], x_test=xt[:test], y_test=yt[:test])
    return out


def run_one(argv: list[str], run_dir: Path, standin: bool) -> float:
    """Train in a child process; its last epoch's test accuracy (metrics.jsonl), in percent."""
    cmd = [sys.executable, __file__, "--child", json.dumps([*argv, "--run-dir", str(run_dir), "--quiet"])]
    if standin:
        cmd.append("--standin")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run {run_dir.name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return 100.0 * last["test_accuracy"]


def compare(base: list[str], seeds: list[int], out: Path, standin: bool, jobs: int = 2) -> dict:
    """{precision: [test accuracy % per seed]} for fp32 and fp16 on the same settings ``base``."""
    tasks = [(prec, s) for s in seeds for prec in ("fp32", "fp16")]
    argv = {t: [*base, "--precision", t[0], "--seed", str(t[1])] for t in tasks}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        accs = dict(zip(tasks, pool.map(lambda t: run_one(argv[t], out / f"{t[0]}_seed{t[1]}", standin), tasks)))
    return {prec: [accs[(prec, s)] for s in seeds] for prec in ("fp32", "fp16")}


def report(result: dict, seeds: list[int], tolerance: float = 0.5) -> tuple[str, bool]:
    """A table of the runs, the means, and whether fp16's mean is within ``tolerance`` points."""
    lines = ["| seed | fp32 test acc | fp16 test acc | fp16 - fp32 |", "|---:|---:|---:|---:|"]
    for i, s in enumerate(seeds):
        a, b = result["fp32"][i], result["fp16"][i]
        lines.append(f"| {s} | {a:.2f}% | {b:.2f}% | {b - a:+.2f} |")
    m32, m16 = statistics.fmean(result["fp32"]), statistics.fmean(result["fp16"])
    ok = abs(m16 - m32) <= tolerance
    lines.append(f"| mean | {m32:.2f}% | {m16:.2f}% | {m16 - m32:+.2f} |")
    lines.append(f"fp16 {'within' if ok else 'NOT within'} {tolerance} points of fp32 on the mean of {len(seeds)} seed(s)")
    return "\n".join(lines), ok


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits")
    ap.add_argument("--data-dir", default="/usr/share/datasets", help="where fashion-mnist/ is")
    ap.add_argument("--train", type=int, default=6000, help="fashion-mnist: training images used")
    ap.add_argument("--test", type=int, default=2000, help="fashion-mnist: test images used")
    ap.add_argument("--epochs", type=int, default=None, help="default: digits' recipe (20), fashion-mnist 2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    ap.add_argument("--standin", action="store_true", help="through the CuPy stand-in (no GPU)")
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child is not None:
        return _child(json.loads(args.child), args.standin)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.dataset == "digits":
            base = ["--dataset", "digits"] + ([] if args.epochs is None else ["--epochs", str(args.epochs)])
        else:
            npz = fashion_subset(args.data_dir, args.train, args.test, out / "fashion_subset.npz")
            base = ["--data", str(npz), *FASHION_RECIPE, "--epochs", str(args.epochs or 2)]
        result = compare(base, args.seeds, out, args.standin, args.jobs)
    table, ok = report(result, args.seeds)
    where = "the CuPy stand-in (g++ emulation of the kernels)" if args.standin else "the GPU"
    print(f"{args.dataset}: fp32 vs fp16 through {where}, {' '.join(base[2:]) or 'the recipe'}\n{table}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
