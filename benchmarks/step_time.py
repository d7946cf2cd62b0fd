"""Time one training step (forward, backward, SGD-momentum update) of lenet5, vgg_small and resnet20.

    python benchmarks/step_time.py [--backend numpy|cupy] [--batch 128 ...] [--models lenet5 vgg_small]
                                   [--repeat 20] [--warmup 3] [--compare torch] [--json]
                                   [--cuda-graph off|on|both]

With ``--compare torch`` (the default when torch imports) the same nets run in torch on the
same device (CPU, or CUDA with cuDNN for the cupy backend), interleaved with ours, and the
ratio cnn_gpu / torch of the median step times is printed. Speed is only ever reported as
such a ratio against a reference measured in the same run.

``--cuda-graph`` (cupy backend): ``on`` times cnn_gpu's step captured once as a CUDA graph and
replayed (cnn_gpu.cuda.graph.training_graph, as ``fit(cuda_graph=...)`` runs it: the batch copied
into the graph's static inputs, the optimizer's scalars staged, one graph launch), ``both`` times
it beside the eager step (columns ``cnn_gpu graph ms`` and ``graph ratio``; JSON ``graph_ms``,
``graph_ratio``), ``off`` (the default) the eager step only. The graph warms up with at least two
calls (the eager step + capture, then the first replay, checked once against an eager step); if it
is dropped (a failed capture or check) its column times the eager fallback and says so.
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


def training_graph_step(model, loss_fn, optimizer, *, check: bool = True, say=print):
    """cnn_gpu's training step (cnn_gpu.train.train_step: zero_grad, forward, loss, backward
    without the input's gradient, the update) as one CUDA graph: cnn_gpu.cuda.graph.training_graph,
    as fit builds it (``check``: fit's "auto", the first replay compared once with an eager step).
    Call it with (x, y); it returns (loss, logits)."""
    from cnn_gpu.cuda.graph import training_graph  # noqa: PLC0415  (CuPy runs only)
    from cnn_gpu.train import train_step  # noqa: PLC0415

    def step(x, y):
        return train_step(model, loss_fn, optimizer, x, y)

    return training_graph(model, optimizer, step, check=check, say=say)


class OursGraphStep(OursStep):
    """Our training step as one CUDA graph (``training_graph_step``), replayed on the same batch:
    each call copies the batch into the graph's static inputs, stages the optimizer's scalars and
    launches the graph once, then waits for the GPU (as OursStep does)."""

    def __init__(self, name: str, batch: int, backend: str, seed: int = 0):
        super().__init__(name, batch, backend, seed)
        self.lines: list[str] = []  # what the graph said (a failed capture, a dropped graph)
        self.graph = training_graph_step(self.model, self.loss, self.opt, say=self.lines.append)

    def __call__(self) -> None:
        self.graph(self.x, self.y)
        _sync(self.backend)

    def state(self) -> str:
        return graph_state(self.graph)


def graph_state(graphed) -> str:
    """ "on" while a StepGraph replays, else why its calls run eagerly ("off (<why>)")."""
    if graphed.graph is not None and not graphed.disabled:
        return "on"
    return f"off ({graphed.disabled})" if graphed.disabled else "off (not captured)"


def torch_resnet(depth: int = 20, num_classes: int = 10):
    """models.resnet(depth) in torch: the same layers in the same order (conv3x3 without bias, BN, ReLU;
    basic blocks with a 1x1 conv + BN projection where the shape changes; global average pooling; FC)."""
    from torch import nn as tnn

    class Block(tnn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.body = tnn.Sequential(
                tnn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                tnn.BatchNorm2d(c_out),
                tnn.ReLU(),
                tnn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                tnn.BatchNorm2d(c_out),
            )
            self.shortcut = (
                tnn.Sequential(tnn.Conv2d(c_in, c_out, 1, stride, bias=False), tnn.BatchNorm2d(c_out))
                if stride != 1 or c_in != c_out
                else None
            )
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
            net = tnn.Sequential(
                tnn.Conv2d(1, 6, 5, padding=2),
                tnn.ReLU(),
                tnn.MaxPool2d(2),
                tnn.Conv2d(6, 16, 5),
                tnn.ReLU(),
                tnn.MaxPool2d(2),
                tnn.Flatten(),
                tnn.Linear(400, 120),
                tnn.ReLU(),
                tnn.Linear(120, 84),
                tnn.ReLU(),
                tnn.Linear(84, 10),
            )
        elif name == "resnet20":
            net = torch_resnet(20)
        else:
            net = tnn.Sequential(
                tnn.Conv2d(3, 32, 3, padding=1),
                tnn.ReLU(),
                tnn.Conv2d(32, 32, 3, padding=1),
                tnn.ReLU(),
                tnn.MaxPool2d(2),
                tnn.Conv2d(32, 64, 3, padding=1),
                tnn.ReLU(),
                tnn.Conv2d(64, 64, 3, padding=1),
                tnn.ReLU(),
                tnn.MaxPool2d(2),
                tnn.Flatten(),
                tnn.Linear(4096, 256),
                tnn.ReLU(),
                tnn.Linear(256, 10),
            )
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


GRAPH_MODES = {"off": ("eager",), "on": ("graph",), "both": ("eager", "graph")}


def bench_step(
    name: str,
    batch: int,
    backend: str,
    compare: bool,
    repeat: int,
    warmup: int,
    clock=time.perf_counter,
    block: int = 1,
    cuda_graph: str = "off",
) -> dict:
    """Median step times of cnn_gpu and torch, alternating in blocks of ``block`` timed steps,
    each block after one untimed step of the same framework (so each block runs as a training
    loop does, after the same framework's step, not right after the other framework's).
    ``cuda_graph`` (GRAPH_MODES): time cnn_gpu's eager step (``ours_ms``, ``ratio``), its CUDA-graph
    step (``graph_ms``, ``graph_ratio``, ``graph``: "on" or why it ran eagerly), or both."""
    variants = GRAPH_MODES[cuda_graph]
    if "graph" in variants and backend != "cupy":
        raise ValueError(f"cuda_graph={cuda_graph!r}: CUDA graphs need the cupy backend, got {backend!r}")
    steps = {"eager": OursStep(name, batch, backend)} if "eager" in variants else {}
    if "graph" in variants:
        steps["graph"] = OursGraphStep(name, batch, backend)
    ref = TorchStep(name, batch, "cuda" if backend == "cupy" else "cpu") if compare else None
    for _ in range(warmup):
        for step in steps.values():
            step()
        if ref:
            ref()
    if "graph" in steps:  # call 1: the eager step and the capture; call 2: the first replay (checked)
        for _ in range(max(0, 2 - warmup)):
            steps["graph"]()
    times: dict[str, list] = {k: [] for k in steps}
    t_ref: list = []

    def timed(step, out, k):
        if block > 1:
            step()  # untimed: the block starts after a step of the same framework
        for _ in range(k):
            t0 = clock()
            step()
            out.append(clock() - t0)

    done = 0
    while done < repeat:  # interleaved, so all see the same machine state
        k = min(block, repeat - done)
        for variant, step in steps.items():
            timed(step, times[variant], k)
        if ref:
            timed(ref, t_ref, k)
        done += k
    row = {"model": name, "batch": batch, "backend": backend}
    keys = {"eager": ("ours_ms", "ratio"), "graph": ("graph_ms", "graph_ratio")}
    for variant, t in times.items():
        row[keys[variant][0]] = 1e3 * statistics.median(t)
    if "graph" in steps:
        row["graph"] = steps["graph"].state()
    if ref:
        row["torch_ms"] = 1e3 * statistics.median(t_ref)
        for variant in times:
            ms, ratio = keys[variant]
            row[ratio] = row[ms] / row["torch_ms"]
    return row


def machine(backend: str = "numpy") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
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
            print(f"{name} batch {b}: host {cpu:.2f} ms per step (Python + launches, incl. waiting), GPU {gpu:.2f} ms per step")
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
    ap.add_argument(
        "--profile",
        action="store_true",
        help="cupy: split our step into host (Python + launch) time and GPU time with cupyx.profiler",
    )
    ap.add_argument(
        "--cuda-graph",
        choices=list(GRAPH_MODES),
        default="off",
        help="cupy: time cnn_gpu's step as one CUDA graph (on), beside the eager step (both), or not (off)",
    )
    return ap


def _columns(variants) -> list[tuple[str, str, str]]:
    """The table's timing columns: (header, row key, format)."""
    cols = [("cnn_gpu ms", "ours_ms", "{:.2f}")] if "eager" in variants else []
    if "graph" in variants:
        cols.append(("cnn_gpu graph ms", "graph_ms", "{:.2f}"))
    cols.append(("torch ms", "torch_ms", "{:.2f}"))
    if "eager" in variants:
        cols.append(("ratio", "ratio", "{:.2f}x"))
    if "graph" in variants:
        cols.append(("graph ratio", "graph_ratio", "{:.2f}x"))
    return cols


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.profile:
        return profile(args)
    if args.cuda_graph != "off" and args.backend != "cupy":
        print(f"--cuda-graph {args.cuda_graph} needs --backend cupy (CUDA graphs replay GPU work)")
        return 2
    cmp, why = torch_comparison(args.backend, args.compare)
    if why:
        print(f"# no torch comparison: {why}", file=sys.stderr)  # stdout stays the table or the JSON
    if cmp and args.backend == "numpy":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    configs = [(m, b) for m in args.models for b in args.batch]
    run = dict(block=3, cuda_graph=args.cuda_graph)
    if args.json:
        rows = [bench_step(m, b, args.backend, cmp, args.repeat, args.warmup, **run) for m, b in configs]
        print(json.dumps({"machine": machine(args.backend), "rows": rows}, indent=2))
        return 0
    # the table row by row, each printed when measured (a run cut short keeps what it measured)
    cols = _columns(GRAPH_MODES[args.cuda_graph])
    what = {"off": "", "on": "; cnn_gpu as one CUDA graph", "both": "; cnn_gpu eager and as one CUDA graph"}
    print(
        f"# step time (forward + backward + SGD-momentum), median of {args.repeat} after {args.warmup} warm-up"
        f"{what[args.cuda_graph]}; {machine(args.backend)}"
    )
    print("| model | batch | backend | " + " | ".join(h for h, _, _ in cols) + " |")
    print("|---|---|---|" + "---|" * len(cols), flush=True)
    notes = []
    for m, b in configs:
        r = bench_step(m, b, args.backend, cmp, args.repeat, args.warmup, **run)
        cells = [fmt.format(r[key]) if key in r else "-" for _, key, fmt in cols]
        print(f"| {r['model']} | {r['batch']} | {r['backend']} | " + " | ".join(cells) + " |", flush=True)
        if r.get("graph", "on") != "on":
            notes.append(f"{m} batch {b}: the CUDA graph is {r['graph']}, so its column timed the eager step")
    if notes:  # after the table, which stays one block of markdown
        print("\n" + "\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
