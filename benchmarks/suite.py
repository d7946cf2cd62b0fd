"""The benchmark suite: training-step time, per-layer time and peak memory of lenet5,
vgg_small and resnet20 (the last on request: ``--models resnet20``), against torch on the same device.

    python benchmarks/suite.py [--backend numpy|cupy] [--models lenet5 vgg_small resnet20] [--batch 32 128 256]
                               [--repeat 20] [--warmup 3] [--compare torch|none] [--layers] [--memory]
                               [--json] [--out FILE]

What is measured
    step     one training step: zero_grad, forward, cross-entropy, backward (no gradient for
             the input batch, in both), SGD-momentum update (a device sync at the end on
             the GPU). cnn_gpu and torch alternate in one process (so both see the same
             machine state), in blocks of ``--block`` timed steps, each block after one
             untimed step of the same framework: a step then follows a step of its own
             framework, as in training (either framework's idle threads may spin for a
             while after its last step, slowing whatever runs next). The median of
             ``--repeat`` steps after ``--warmup`` steps of each is reported, with the ratio
             cnn_gpu / torch.
    layers   (--layers) the same step with a timer around every leaf layer's forward and
             backward (torch: module hooks), medians over the repeats; here both also
             compute the gradient of the input batch (torch times a module's backward
             only when its input requires grad), so the first layer's backward includes
             its dx on both sides, unlike in the step times. cnn_gpu's fused
             layers show up where the work happens: a ReLU run inside the convolution before
             it (the engine's epilogue) has 0 time of its own, and on the CPU a ReLU before a
             max pool runs after the pool, on the pooled array.
             "(rest)" is the step minus the layers: loss, optimizer, layout conversions.
    memory   (--memory) peak resident memory of one step, in a fresh subprocess per
             (framework, model, batch): the high-water mark of the process's RSS
             (VmHWM in /proc/self/status, Linux) after a few steps, minus its RSS before the
             model was built, so the interpreter and the imported libraries do not count; parameters,
             optimizer state, workspaces and the activations of one step do. On the GPU:
             cupy's and torch's peak device memory instead.

Speed is reported only as a ratio against a reference measured in the same run: the
absolute times depend on the machine and on whatever else it is running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _preset_threads(argv: list) -> None:
    """``--threads N`` must reach the BLAS libraries before NumPy loads them: set it in the
    environment here, before the imports below (cnn_gpu's own threads read CNN_GPU_THREADS;
    torch is set again with set_num_threads)."""
    if "--threads" in argv:
        i = argv.index("--threads")
        if i + 1 < len(argv) and argv[i + 1].isdigit():
            for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CNN_GPU_THREADS"):
                os.environ[var] = argv[i + 1]


_preset_threads(sys.argv)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from step_time import SHAPES, OursStep, TorchStep, _sync, bench_step, machine, torch_comparison  # noqa: E402

# --clock: wall time, or the CPU time of this process (all its threads; on a machine shared
# with other jobs it counts only the time we ran, though BLAS threads that spin count too)
_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _median_ms(ts) -> float:
    return 1e3 * statistics.median(ts)


def _torch_setup(backend: str, threads: int | None = None) -> None:
    import torch

    if backend == "numpy":
        torch.set_num_threads(threads or os.cpu_count() or 1)


def _threads() -> int | None:
    v = os.environ.get("OPENBLAS_NUM_THREADS")
    return int(v) if v and v.isdigit() else None


# --------------------------------------------------------------------------- step times
# --------------------------------------------------------------------------- per-layer times
_OUR_METHODS = {  # the entry points nn.Sequential calls on a leaf, by phase
    "forward": ("forward",),
    "backward": ("backward",),
}


def _leaves(model) -> list:
    return [(name, m) for name, m in model.named_modules() if not m._modules]


def _instrument_ours(step: OursStep, times: dict, clock) -> None:
    """Wrap every leaf's entry points (instance attributes shadowing the methods) with timers."""
    sync = step.backend

    def wrap(name, phase, fn):
        def timed(*args, **kwargs):
            _sync(sync)
            t0 = clock()
            out = fn(*args, **kwargs)
            _sync(sync)
            times[name][phase] += clock() - t0
            return out

        return timed

    for name, m in _leaves(step.model):
        times[name] = {"forward": 0.0, "backward": 0.0}
        for phase, methods in _OUR_METHODS.items():
            for meth in methods:
                if hasattr(m, meth):
                    object.__setattr__(m, meth, wrap(name, phase, getattr(m, meth)))


def _instrument_torch(step: TorchStep, times: dict, clock) -> list:
    torch = step.torch
    cuda = step.device == "cuda"
    handles, start = [], {}

    def now():
        if cuda:
            torch.cuda.synchronize()
        return clock()

    leaves = [(n, m) for n, m in step.net.named_modules() if not list(m.children())]  # in our leaves' order
    for key, m in leaves:
        times[key] = {"forward": 0.0, "backward": 0.0}

        def fpre(mod, inp, key=key):
            start[(key, "f")] = now()

        def fpost(mod, inp, out, key=key):
            times[key]["forward"] += now() - start[(key, "f")]

        def bpre(mod, gout, key=key):
            start[(key, "b")] = now()

        def bpost(mod, gin, gout, key=key):
            times[key]["backward"] += now() - start[(key, "b")]

        handles += [
            m.register_forward_pre_hook(fpre),
            m.register_forward_hook(fpost),
            m.register_full_backward_pre_hook(bpre),
            m.register_full_backward_hook(bpost),
        ]
    return handles


def bench_layers(
    name: str,
    batch: int,
    backend: str,
    compare: bool,
    repeat: int,
    warmup: int,
    clock=time.perf_counter,
    block: int = 1,
    input_grad: bool = True,
) -> dict:
    """Per-leaf-layer forward/backward medians for cnn_gpu and (matched by position) torch.

    With ``input_grad`` (the default) both compute the input's gradient (torch's hooks need an
    input that requires grad to time the first layer's backward), so the first layer's backward
    includes its dx on both sides; without it torch's first-layer backward reads ~0."""
    ours = OursStep(name, batch, backend, input_grad=input_grad)
    ref = TorchStep(name, batch, "cuda" if backend == "cupy" else "cpu") if compare else None
    if ref and input_grad:
        ref.x.requires_grad_(True)
    ot, tt = {}, {}
    _instrument_ours(ours, ot, clock)
    handles = _instrument_torch(ref, tt, clock) if ref else []
    per_ours = {k: {"forward": [], "backward": []} for k in ot}
    per_torch = {k: {"forward": [], "backward": []} for k in tt}
    steps_ours, steps_torch = [], []

    def timed(step, times, steps, per):
        for v in times.values():
            v["forward"] = v["backward"] = 0.0
        t0 = clock()
        step()
        steps.append(clock() - t0)
        for k, v in times.items():
            for ph in v:
                per[k][ph].append(v[ph])

    for _ in range(warmup):
        ours()
        if ref:
            ref()
    while len(steps_ours) < repeat:  # alternating in blocks, each after an untimed step (see bench_step)
        k = min(block, repeat - len(steps_ours))
        for step, times, steps, per in ((ours, ot, steps_ours, per_ours), (ref, tt, steps_torch, per_torch)):
            if step is None:
                continue
            if block > 1:
                step()
            for _ in range(k):
                timed(step, times, steps, per)
    for h in handles:
        h.remove()
    leaves = _leaves(ours.model)
    torch_keys = list(per_torch)
    rows = []
    for idx, (lname, m) in enumerate(leaves):
        row = {
            "layer": lname,
            "type": type(m).__name__,
            "ours_fwd_ms": _median_ms(per_ours[lname]["forward"]),
            "ours_bwd_ms": _median_ms(per_ours[lname]["backward"]),
        }
        if ref and idx < len(torch_keys):
            k = torch_keys[idx]
            row["torch_fwd_ms"] = _median_ms(per_torch[k]["forward"])
            row["torch_bwd_ms"] = _median_ms(per_torch[k]["backward"])
        rows.append(row)
    rest = {
        "layer": "(rest)",
        "type": "loss, optimizer, layout",
        "ours_fwd_ms": _median_ms(steps_ours) - sum(r["ours_fwd_ms"] + r["ours_bwd_ms"] for r in rows),
        "ours_bwd_ms": 0.0,
    }
    if ref:
        rest["torch_fwd_ms"] = _median_ms(steps_torch) - sum(r.get("torch_fwd_ms", 0) + r.get("torch_bwd_ms", 0) for r in rows)
        rest["torch_bwd_ms"] = 0.0
    rows.append(rest)
    out = {"model": name, "batch": batch, "backend": backend, "ours_step_ms": _median_ms(steps_ours), "layers": rows}
    if ref:
        out["torch_step_ms"] = _median_ms(steps_torch)
    return out


# --------------------------------------------------------------------------- peak memory
def _proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: now; VmHWM: the high-water mark of this
    process image; unlike getrusage's ru_maxrss it does not carry over the parent's peak
    through fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_child(framework: str, name: str, batch: int, backend: str, steps: int) -> dict:
    """Run in a fresh process: build one model, run ``steps`` steps, report peak memory."""
    if framework == "torch":
        import torch  # noqa: F401  (imported before the baseline)

        _torch_setup(backend, _threads())
    if backend == "cupy":
        import cupy

        pool = cupy.get_default_memory_pool()
    base = _proc_status_bytes("VmRSS") if backend != "cupy" else 0
    step = (
        OursStep(name, batch, backend)
        if framework == "cnn_gpu"
        else TorchStep(name, batch, "cuda" if backend == "cupy" else "cpu")
    )
    if framework == "torch" and backend == "cupy":
        step.torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step()
    out = {"framework": framework}
    if backend == "cupy":
        if framework == "torch":
            out["peak_mb"] = step.torch.cuda.max_memory_allocated() / 2**20
        else:
            out["peak_mb"] = pool.total_bytes() / 2**20  # cupy holds its high-water mark in the pool
        out["measures"] = "peak device memory"
    else:
        out["peak_mb"] = (_proc_status_bytes("VmHWM") - base) / 2**20
        out["measures"] = "peak RSS minus RSS before the model was built"
    return out


def bench_memory(name: str, batch: int, backend: str, compare: bool, steps: int = 2) -> dict:
    row = {"model": name, "batch": batch, "backend": backend}
    for fw in ["cnn_gpu"] + (["torch"] if compare else []):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", fw, name, str(batch), backend, str(steps)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        child = json.loads(res.stdout.strip().splitlines()[-1])
        row["ours_peak_mb" if fw == "cnn_gpu" else "torch_peak_mb"] = child["peak_mb"]
        row["measures"] = child["measures"]
    if compare:
        row["ratio"] = row["ours_peak_mb"] / row["torch_peak_mb"] if row["torch_peak_mb"] > 0 else None
    return row


# --------------------------------------------------------------------------- output
def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_tables(result: dict) -> None:
    print(
        f"# cnn_gpu benchmark suite, {result['backend']} backend, {result['threads']} threads, {result['clock']} clock; "
        f"{result['machine']}"
    )
    print(
        f"# median of {result['repeat']} steps after {result['warmup']} warm-up, cnn_gpu and torch alternating in "
        f"blocks of {result['block']}\n"
    )
    print("| model | batch | cnn_gpu ms | torch ms | ratio |")
    print("|---|---|---|---|---|")
    for r in result["steps"]:
        print(
            f"| {r['model']} | {r['batch']} | {r['ours_ms']:.2f} | {_fmt(r.get('torch_ms'))} | "
            f"{_fmt(r.get('ratio'))}{'x' if 'ratio' in r else ''} |"
        )
    for lay in result.get("layers", []):
        print(
            f"\n## per layer: {lay['model']}, batch {lay['batch']} (step: cnn_gpu {lay['ours_step_ms']:.2f} ms, "
            f"torch {_fmt(lay.get('torch_step_ms'))} ms)\n"
        )
        print("| layer | type | cnn_gpu fwd | cnn_gpu bwd | torch fwd | torch bwd |")
        print("|---|---|---|---|---|---|")
        for r in lay["layers"]:
            print(
                f"| {r['layer']} | {r['type']} | {r['ours_fwd_ms']:.2f} | {r['ours_bwd_ms']:.2f} | "
                f"{_fmt(r.get('torch_fwd_ms'))} | {_fmt(r.get('torch_bwd_ms'))} |"
            )
    if result.get("memory"):
        print(f"\n## peak memory, MiB ({result['memory'][0]['measures']})\n")
        print("| model | batch | cnn_gpu | torch | ratio |")
        print("|---|---|---|---|---|")
        for r in result["memory"]:
            print(
                f"| {r['model']} | {r['batch']} | {r['ours_peak_mb']:.1f} | {_fmt(r.get('torch_peak_mb'), '.1f')} | "
                f"{_fmt(r.get('ratio'))}{'x' if r.get('ratio') is not None else ''} |"
            )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_memory-child"]:
        fw, name, batch, backend, steps = argv[1:6]
        print(json.dumps(_memory_child(fw, name, int(batch), backend, int(steps))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    ap.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["lenet5", "vgg_small", "resnet20"])
    ap.add_argument("--batch", nargs="+", type=int, default=[32, 128, 256])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compare", choices=["torch", "none"], default=None, help="default: torch when it imports")
    ap.add_argument("--layers", action="store_true", help="also time every layer's forward and backward")
    ap.add_argument(
        "--layer-batch", nargs="+", type=int, default=None, help="batch sizes for --layers (default: the --batch sizes)"
    )
    ap.add_argument("--memory", action="store_true", help="also measure peak memory (a subprocess per config)")
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads for both (cnn_gpu's workers, BLAS, torch; default: all cores)"
    )
    ap.add_argument(
        "--block",
        type=int,
        default=3,
        help="alternate cnn_gpu and torch in blocks of this many timed steps (default 3), each "
        "after an untimed step of the same framework; 1: step by step",
    )
    ap.add_argument(
        "--clock",
        choices=sorted(_CLOCKS),
        default="wall",
        help="wall (default) or cpu: this process's CPU time, steadier on a busy machine",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0 or min(args.batch) < 1:
        ap.error("--repeat must be >= 1, --warmup >= 0 and batch sizes >= 1")
    clock = _CLOCKS[args.clock]
    cmp, why = torch_comparison(args.backend, args.compare)
    compare = "torch" if cmp else "none"
    if why and not args.json:
        print(f"# no torch comparison: {why}")
    if cmp:
        _torch_setup(args.backend, args.threads)
    result = {
        "machine": machine(),
        "backend": args.backend,
        "threads": args.threads or os.cpu_count(),
        "clock": args.clock,
        "block": args.block,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "compare": compare,
        "steps": [],
    }
    for m in args.models:
        for b in args.batch:
            result["steps"].append(bench_step(m, b, args.backend, cmp, args.repeat, args.warmup, clock, args.block))
    if args.layers:
        result["layers"] = [
            bench_layers(m, b, args.backend, cmp, args.repeat, args.warmup, clock, args.block)
            for m in args.models
            for b in (args.layer_batch or args.batch)
        ]
    if args.memory:
        result["memory"] = [bench_memory(m, b, args.backend, cmp) for m in args.models for b in args.batch]
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
