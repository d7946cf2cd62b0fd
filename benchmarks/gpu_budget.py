"""What one GPU training step costs, counted through the CuPy stand-in (tests/standin): launches by
kind, host syncs, host-to-device and device-to-host bytes, device bytes allocated, layout-only copies;
or, with ``--real`` on a GPU, what the same step takes, timed with CUDA events.

    python benchmarks/gpu_budget.py [--models lenet5 vgg_small resnet20] [--batch 128] [--epoch-steps 8] [--json]
    python benchmarks/gpu_budget.py --real [--models ...] [--batch 128 512] [--steps 20] [--warmup 3] [--json]

No GPU is needed for the counts: the stand-in runs CuPy's API on the CPU (our kernels in the g++
emulation) and counts what a GPU would be asked to do. Launches, not FLOPs, bound small CNNs on a
GPU, so the count should only ever fall. One line per model, e.g.
``lenet5 batch 128: 35 launches, 0 host syncs, 0.0 MB uploaded, 0.0 MB layout copies per training step``,
then the same for a whole ``fit`` epoch (its host reads happen once per epoch, not per step).

``--real`` counts nothing: with real CuPy and an NVIDIA GPU it builds the same model, optimizer and
batch as the counted step, warms up, and times it (``real_budget``), per step:

* **loop**: ``--steps`` steps in a row without a host sync, as in training, a CUDA event recorded
  after each; the GPU time from the first event to the last (the step time a training loop sees)
  and the host time of the loop (``perf_counter``: Python and launches, plus any wait once CuPy's
  launch queue is full);
* **dispatch** and **kernels**: each step alone, queued behind a spin kernel that holds the GPU until
  the host has launched the whole step: the host time of that step is its pure dispatch cost (Python
  and launches, the GPU never waited for), and the event time around it is its kernels run back to
  back (no idle gaps): medians of ``--steps``. The larger of the two bounds the step ("host": Python
  and launch overhead; "GPU": the kernels). Without the spin kernel (it needs NVRTC; or its clock
  is unusable) the bound is read from the loop: host time near the GPU time means host-bound.

Without a usable GPU ``--real`` exits with status 2 and one line saying why.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import cnn_gpu  # noqa: E402
from cnn_gpu import models, nn, optim  # noqa: E402
from cnn_gpu.callbacks import Evaluate  # noqa: E402
from cnn_gpu.data import DataLoader  # noqa: E402
from cnn_gpu.train import fit, train_step  # noqa: E402

from step_time import SHAPES  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)
_MB = 1e6


def _setup(cp, name, batch, steps=1):
    cnn_gpu.manual_seed(0)
    model = getattr(models, name)()
    opt = optim.SGD(model, 0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((batch * steps,) + SHAPES[name]).astype(np.float32))
    y = cp.asarray(rng.integers(0, 10, batch * steps))
    return model, opt, x, y


def step_budget(cp, counting, name, batch):
    """Counters of one training step (after a warm-up step that compiles and allocates). The loss is
    the default CrossEntropyLoss of a hand-written loop (README): its label check runs on the device."""
    with cnn_gpu.use_backend("cupy"):
        model, opt, x, y = _setup(cp, name, batch)
        loss_fn = nn.CrossEntropyLoss()
        train_step(model, loss_fn, opt, x, y)
        with counting() as c:
            train_step(model, loss_fn, opt, x, y)
    return c


def epoch_budget(cp, counting, name, batch, steps):
    """Counters of one fit epoch of ``steps`` steps with a test evaluation at its end."""
    with cnn_gpu.use_backend("cupy"):
        model, opt, x, y = _setup(cp, name, batch, steps)
        loader = DataLoader(x, y, batch, shuffle=True, seed=0)
        with counting() as c:
            fit(model, opt, loader, 1, callbacks=[Evaluate((x[:batch], y[:batch]))])
    return c


def line(name, batch, c, what) -> str:
    return (f"{name} batch {batch}: {c.total_launches} launches, {c.total_syncs} host syncs, "
            f"{c.upload_bytes / _MB:.1f} MB uploaded, {c.layout_copy_bytes / _MB:.1f} MB layout copies {what}")


# ------------------------------------------------------------------ --real: timed on a GPU
_SPIN_SRC = r"""
extern "C" __global__ void cnn_gpu_budget_spin(unsigned long long n, int cycles) {
    // n nanoseconds of the GPU's global timer, or (cycles != 0) n cycles of this SM's clock
    unsigned long long t0, t;
    if (cycles) {
        long long c0 = clock64();
        while (clock64() - c0 < (long long)n) {
        }
        return;
    }
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < n);
}
"""


def gpu_spinner(cp):
    """``spin(ms)``: one thread that keeps the current stream busy for about ``ms`` milliseconds, so that
    the host can queue a whole step before any of it runs. It counts the GPU's global nanosecond timer,
    or, where that does not tick as CUDA events do, SM clock cycles calibrated against events. Raises
    where it cannot be compiled or neither clock serves."""
    kernel = cp.RawKernel(_SPIN_SRC, "cnn_gpu_budget_spin")

    def held(n: int, cycles: int) -> float:
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        kernel((1,), (1,), (np.uint64(n), np.int32(cycles)))
        b.record()
        b.synchronize()
        return cp.cuda.get_elapsed_time(a, b)

    held(1000, 0)  # compile and load
    if 1.8 <= held(2_000_000, 0) <= 20.0:
        return lambda ms: kernel((1,), (1,), (np.uint64(int(ms * 1e6)), np.int32(0)))
    per_ms = 2_000_000 / max(held(2_000_000, 1), 1e-3)  # SM cycles per millisecond
    took = held(int(2 * per_ms), 1)
    if not 1.5 <= took <= 20.0:
        raise RuntimeError(f"no usable GPU clock for the spin kernel (2 ms held {took:.3f} ms)")
    return lambda ms: kernel((1,), (1,), (np.uint64(int(ms * per_ms)), np.int32(1)))


def _median(values) -> float:
    return float(statistics.median(values))


def real_budget(cp, name: str, batch: int, steps: int = 20, warmup: int = 3, spin=None) -> dict:
    """Times (ms per step) of the counted training step on a GPU with CuPy module ``cp``: see the
    module docstring. ``spin``: ``gpu_spinner(cp)``, or None to time the loop only."""
    if steps < 1:
        raise ValueError(f"steps: expected at least 1, got {steps}")
    elapsed = cp.cuda.get_elapsed_time
    with cnn_gpu.use_backend("cupy"):
        model, opt, x, y = _setup(cp, name, batch)
        loss_fn = nn.CrossEntropyLoss()

        def step():
            train_step(model, loss_fn, opt, x, y)

        for _ in range(max(1, warmup)):  # the first step compiles kernels and fills the memory pool
            step()
        cp.cuda.Device().synchronize()

        # the loop: steps in a row, no host sync, an event after each
        marks = [cp.cuda.Event() for _ in range(steps + 1)]
        t0 = time.perf_counter()
        marks[0].record()
        for ev in marks[1:]:
            step()
            ev.record()
        host_loop = time.perf_counter() - t0
        marks[-1].synchronize()
        wall = time.perf_counter() - t0
        per_step = [elapsed(a, b) for a, b in zip(marks, marks[1:])]
        row = {"model": name, "batch": batch, "steps": steps, "warmup": max(1, warmup),
               "loop_gpu_ms": elapsed(marks[0], marks[-1]) / steps,
               "loop_gpu_step_ms_median": _median(per_step),
               "loop_host_ms": 1e3 * host_loop / steps, "loop_wall_ms": 1e3 * wall / steps}

        # each step alone behind the spin kernel: dispatch time and kernel time apart
        if spin is not None:
            hold = 2.0 * row["loop_host_ms"] + 1.0
            host, gpu, retries = [], [], 0
            while len(host) < steps:
                a, b = cp.cuda.Event(), cp.cuda.Event()
                spin(hold)
                t = time.perf_counter()
                a.record()
                step()
                b.record()
                dispatch = 1e3 * (time.perf_counter() - t)
                b.synchronize()
                if dispatch > 0.8 * hold:  # the GPU may have caught up with the host: not clean
                    retries += 1
                    if retries > steps:
                        raise RuntimeError(f"dispatch ({dispatch:.2f} ms) kept outrunning the spin ({hold:.2f} ms)")
                    hold = 2.0 * dispatch + 1.0
                    continue
                host.append(dispatch)
                gpu.append(elapsed(a, b))
            row.update(dispatch_ms=_median(host), kernels_ms=_median(gpu), spin_ms=hold)
            row["bound"] = "host" if row["dispatch_ms"] > row["kernels_ms"] else "GPU"
        else:
            row["bound"] = "host" if row["loop_host_ms"] >= 0.9 * row["loop_gpu_ms"] else "GPU"
    return row


def real_line(r: dict) -> str:
    s = (f"{r['model']} batch {r['batch']}: {r['loop_gpu_ms']:.3f} ms per step in a loop of {r['steps']} "
         f"(GPU, events; host {r['loop_host_ms']:.3f} ms)")
    if "kernels_ms" in r:
        s += (f"; each step alone: dispatch {r['dispatch_ms']:.3f} ms (host: Python + launches), "
              f"kernels {r['kernels_ms']:.3f} ms (GPU, back to back)")
    return s + f"; bound by the {r['bound']}"


def _real(args) -> int:
    if args.standin:  # test support: the timing code through the stand-in (its times mean nothing)
        from standin import activated  # noqa: PLC0415

        with activated() as cp:
            return _real_with(cp, args, "the CuPy stand-in (times meaningless)")
    from cnn_gpu.backend import _cupy_status  # noqa: PLC0415

    cp, why = _cupy_status()
    if cp is None:
        print(f"gpu_budget.py --real needs CuPy and an NVIDIA GPU: {why}", file=sys.stderr)
        return 2
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return _real_with(cp, args, f"{name}, CuPy {cp.__version__}")


def _real_with(cp, args, device: str) -> int:
    try:
        spin, no_spin = gpu_spinner(cp), ""
    except Exception as exc:  # noqa: BLE001  (the loop timing still stands without it)
        spin, no_spin = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not args.json:
        print(f"# one training step timed on {device}: SGD (Nesterov, weight decay), "
              f"{args.steps} steps after {args.warmup} warm-up")
        if no_spin:
            print(f"# no spin kernel ({no_spin}): the loop timing only")
    rows = []
    for name in args.models:
        for batch in args.batch:
            r = real_budget(cp, name, batch, args.steps, args.warmup, spin)
            rows.append(r)
            if not args.json:
                print(real_line(r), flush=True)
    if args.json:
        print(json.dumps({"device": device, "spin": not no_spin, "no_spin_why": no_spin, "rows": rows},
                         indent=1, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet5", "vgg_small"], choices=list(SHAPES))
    ap.add_argument("--batch", nargs="+", type=int, default=[128], help="one or more batch sizes (default 128)")
    ap.add_argument("--epoch-steps", type=int, default=8, help="steps in the fit epoch that is counted")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--real", action="store_true",
                    help="time the step on a real GPU (CuPy + an NVIDIA GPU) instead of counting it")
    ap.add_argument("--steps", type=int, default=20, help="--real: timed steps per model and batch (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="--real: untimed steps first (default 3, at least 1)")
    ap.add_argument("--standin", action="store_true", help=argparse.SUPPRESS)  # --real through the stand-in
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.real:
        return _real(args)
    from standin import activated, counting  # noqa: PLC0415  (test support: the CuPy stand-in)

    report = {}
    with activated() as cp:
        for name in args.models:
            for batch in args.batch:
                c = step_budget(cp, counting, name, batch)
                e = epoch_budget(cp, counting, name, batch, args.epoch_steps)
                key = name if len(args.batch) == 1 else f"{name} batch {batch}"
                report[key] = {"step": c.summary(), "epoch": e.summary(), "epoch_steps": args.epoch_steps}
                if not args.json:
                    print(line(name, batch, c, "per training step"))
                    print(f"  launches by kind: {dict(sorted(c.launches.items()))}; kernels: {dict(sorted(c.kernels.items()))}")
                    print(f"  device bytes allocated {c.alloc_bytes / _MB:.1f} MB in {c.allocations} arrays, "
                          f"{c.download_bytes / _MB:.3f} MB downloaded")
                    print(line(name, batch, e, f"per fit epoch of {args.epoch_steps} steps + an evaluation"))
                    print(f"  host syncs by cause: {dict(e.syncs)}")
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
