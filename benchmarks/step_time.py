"""Time one training step (forward, backward, SGD-momentum update) of lenet5, vgg_small and resnet20.

    python benchmarks/step_time.py [--backend numpy|cupy] [--batch 128 ...] [--models lenet5 vgg_small]
                                   [--repeat 20] [--warmup 3] [--compare torch] [--json]

With ``--compare torch`` (the default when torch imports) the same nets run in torch on the
same device (CPU, or CUDA with cuDNN for the cupy backend), interleaved with ours, and the
ratio cnn_gpu / torch of the median step times is printed. Speed is only ever reported as
such a ratio against a reference measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cnn_gpu  # noqa: E402
from cnn_gpu import models, nn, optim  # noqa: E402

SHAPES = {"lenet5": (1, 28, 28), "vgg_small": (3, 32, 32), "resnet20": (3, 32, 32)}


def _sync(backend: str) -> None:
    if backend == "cupy":
        import cupy

        cupy.cuda.Device().synchronize()


class OursStep:
    """One training step of ours. ``input_grad=False`` (the default, as torch with data that does
    not require grad) skips the gradient of the input batch."""

    def __init__(self, name: str, batch: int, backend: str, seed: int = 0, input_grad: bool = False):
        self.backend = backend
        self.input_grad = input_grad
        with cnn_gpu.use_backend(backend) as xp:
            cnn_gpu.manual_seed(seed)
            self.model = getattr(models, name)()
            self.opt = optim.SGD(self.model, 0.01, momentum=0.9)
            rng = np.random.default_rng(seed)
            self.x = xp.asarray(rng.standard_normal((batch,) + SHAPES[name]).astype(np.float32))
            self.y = xp.asarray(rng.integers(0, 10, batch).astype(np.int64))
        self.loss = nn.CrossEntropyLoss(validate_range=False)

    def __call__(self) -> None:
        self.opt.zero_grad()
        out = self.model.forward(self.x)
        self.loss.forward(out, self.y)
        self.model.backward(self.loss.backward(), input_grad=self.input_grad)
        self.opt.step()
        _sync(self.backend)


def torch_resnet(depth: int = 20, num_classes: int = 10):
    """models.resnet(depth) in torch: the same layers in the same order (conv3x3 without bias, BN, ReLU;
    basic blocks with a 1x1 conv + BN projection where the shape changes; global average pooling; FC)."""
    from torch import nn as tnn

    class Block(tnn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.body = tnn.Sequential(tnn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), tnn.BatchNorm2d(c_out),
                                       tnn.ReLU(), tnn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), tnn.BatchNorm2d(c_out))
            self.shortcut = (tnn.Sequential(tnn.Conv2d(c_in, c_out, 1, stride, bias=False), tnn.BatchNorm2d(c_out))
                             if stride != 1 or c_in != c_out else None)
            self.relu = tnn.ReLU()

        def forward(self, x):
            return self.relu(self.body(x) + (self.shortcut(x) if self.shortcut is not None else x))

    n = (depth - 2) // 6
    layers, c_in = [tnn.Conv2d(3, 16, 3, 1, 1, bias=False), tnn.BatchNorm2d(16), tnn.ReLU()], 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(n):
            layers.append(Block(c_in, width, 2 if stage > 0 and i == 0 else 1))
            c_in = width
    return tnn.Sequential(*layers, tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(64, num_classes))


class TorchStep:
    def __init__(self, name: str, batch: int, device: str, seed: int = 0):
        import torch
        from torch import nn as tnn

        torch.manual_seed(seed)
        if name == "lenet5":
            net = tnn.Sequential(tnn.Conv2d(1, 6, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(6, 16, 5),
                                 tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(), tnn.Linear(400, 120), tnn.ReLU(),
                                 tnn.Linear(120, 84), tnn.ReLU(), tnn.Linear(84, 10))
        elif name == "resnet20":
            net = torch_resnet(20)
        else:
            net = tnn.Sequential(tnn.Conv2d(3, 32, 3, padding=1), tnn.ReLU(), tnn.Conv2d(32, 32, 3, padding=1), tnn.ReLU(),
                                 tnn.MaxPool2d(2), tnn.Conv2d(32, 64, 3, padding=1), tnn.ReLU(),
                                 tnn.Conv2d(64, 64, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
                                 tnn.Linear(4096, 256), tnn.ReLU(), tnn.Linear(256, 10))
        self.torch, self.device = torch, device
        self.net = net.to(device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn((batch,) + SHAPES[name], device=device)
        self.y = torch.randint(0, 10, (batch,), device=device)
        self.lossf = tnn.CrossEntropyLoss()

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=False)
        loss = self.lossf(self.net(self.x), self.y)
        loss.backward()
        self.opt.step()
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def torch_comparison(backend: str, requested: str | None) -> tuple[bool, str]:
    """(compare with torch?, why not): torch must import, and for the cupy backend have CUDA
    (a CPU build of torch cannot time the same device). ``requested`` "torch" that cannot be
    honoured is an error; None means "when possible"."""
    if requested == "none":
        return False, "--compare none"
    try:
        import torch
    except ImportError:
        why = "torch is not installed"
    else:
        if backend != "cupy" or torch.cuda.is_available():
            return True, ""
        why = f"torch {torch.__version__} has no usable CUDA device, so it cannot run on the GPU beside cnn_gpu"
    if requested == "torch":
        raise SystemExit(f"--compare torch: {why}")
    return False, why


def bench_step(name: str, batch: int, backend: str, compare: bool, repeat: int, warmup: int,
               clock=time.perf_counter, block: int = 1) -> dict:
    """Median step times of cnn_gpu and torch, alternating in blocks of ``block`` timed steps,
    each block after one untimed step of the same framework (so each block runs as a training
    loop does, after the same framework's step, not right after the other framework's)."""
    ours = OursStep(name, batch, backend)
    ref = TorchStep(name, batch, "cuda" if backend == "cupy" else "cpu") if compare else None
    for _ in range(warmup):
        ours()
        if ref:
            ref()
    t_ours, t_ref = [], []

    def timed(step, out, k):
        if block > 1:
            step()  # untimed: the block starts after a step of the same framework
        for _ in range(k):
            t0 = clock()
            step()
            out.append(clock() - t0)

    while len(t_ours) < repeat:  # interleaved, so both see the same machine state
        k = min(block, repeat - len(t_ours))
        timed(ours, t_ours, k)
        if ref:
            timed(ref, t_ref, k)
    row = {"model": name, "batch": batch, "backend": backend, "ours_ms": 1e3 * statistics.median(t_ours)}
    if ref:
        row["torch_ms"] = 1e3 * statistics.median(t_ref)
        row["ratio"] = row["ours_ms"] / row["torch_ms"]
    return row


def machine(backend: str = "numpy") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, numpy {np.__version__}"
    if backend == "cupy":
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            desc += f"; GPU {name}, CuPy {cupy.__version__}"
            import torch

            desc += f", torch {torch.__version__} (cuDNN {torch.backends.cudnn.version()})"
        except Exception:  # noqa: BLE001  (a description only)
            pass
    return desc


def profile(args) -> int:
    """Host time against device time of one step: a step whose GPU time is far below its CPU
    time is bound by Python and kernel-launch overhead, not by the kernels."""
    if args.backend != "cupy":
        print("--profile needs --backend cupy")
        return 2
    from cupyx.profiler import benchmark

    for name in args.models:
        for b in args.batch:
            ours = OursStep(name, b, "cupy")
            r = benchmark(ours, n_repeat=args.repeat, n_warmup=args.warmup)
            cpu, gpu = 1e3 * float(np.median(r.cpu_times)), 1e3 * float(np.median(r.gpu_times[0]))
            print(f"{name} batch {b}: host {cpu:.2f} ms per step (Python + launches, incl. waiting), "
                  f"GPU {gpu:.2f} ms per step")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    ap.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["lenet5", "vgg_small"])
    ap.add_argument("--batch", nargs="+", type=int, default=[128])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compare", choices=["torch", "none"], default=None, help="default: torch when it imports")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--profile", action="store_true",
                    help="cupy: split our step into host (Python + launch) time and GPU time with cupyx.profiler")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.profile:
        return profile(args)
    cmp, why = torch_comparison(args.backend, args.compare)
    if why:
        print(f"# no torch comparison: {why}", file=sys.stderr)  # stdout stays the table or the JSON
    if cmp and args.backend == "numpy":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    configs = [(m, b) for m in args.models for b in args.batch]
    if args.json:
        rows = [bench_step(m, b, args.backend, cmp, args.repeat, args.warmup, block=3) for m, b in configs]
        print(json.dumps({"machine": machine(args.backend), "rows": rows}, indent=2))
        return 0
    # the table row by row, each printed when measured (a run cut short keeps what it measured)
    print(f"# step time (forward + backward + SGD-momentum), median of {args.repeat} after {args.warmup} warm-up; {machine(args.backend)}")
    print("| model | batch | backend | cnn_gpu ms | torch ms | ratio |")
    print("|---|---|---|---|---|---|", flush=True)
    for m, b in configs:
        r = bench_step(m, b, args.backend, cmp, args.repeat, args.warmup, block=3)
        t = f"{r['torch_ms']:.2f}" if "torch_ms" in r else "-"
        q = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        print(f"| {r['model']} | {r['batch']} | {r['backend']} | {r['ours_ms']:.2f} | {t} | {q} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
