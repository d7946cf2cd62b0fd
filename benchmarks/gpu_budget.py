"""What one GPU training step costs, counted through the CuPy stand-in (tests/standin): launches by
kind, host syncs, host-to-device and device-to-host bytes, device bytes allocated, layout-only copies,
host calls; eager and as one CUDA graph. Or, with ``--real`` on a GPU, what the same step takes,
timed with CUDA events; or, with ``--host-time``, what our Python costs per step when launches cost
nothing.

    python benchmarks/gpu_budget.py [--models lenet5 vgg_small resnet20] [--batch 128] [--epoch-steps 8]
                                    [--cuda-graph on|off] [--json]
    python benchmarks/gpu_budget.py --real [--models ...] [--batch 128 512] [--steps 20] [--warmup 3]
                                    [--cuda-graph on|off] [--json]
    python benchmarks/gpu_budget.py --host-time [--models lenet5 vgg_small resnet20] [--batch 128]
                                    [--steps 20] [--runs 5] [--json]
    python benchmarks/gpu_budget.py --bytes [--models lenet5 vgg_small] [--batch 128] [--json]

No GPU is needed for the counts: the stand-in runs CuPy's API on the CPU (our kernels in the g++
emulation) and counts what a GPU would be asked to do. Launches, not FLOPs, bound small CNNs on a
GPU, so the count should only ever fall. Per model, e.g.
``lenet5 batch 128: 37 launches, 0 host syncs, 0.0 MB uploaded, 0.0 MB layout copies per training step``
(the eager step), then the same step as one CUDA graph (cnn_gpu.cuda.graph.training_graph, as
``fit(cuda_graph=...)`` builds it; call 1 is the eager step and the capture, call 2 the first
replay, checked once against an eager step, call 3 is counted):
``lenet5 batch 128, CUDA graph: 1 graph launch (37 kernels inside) + 2 launches outside it (copy 2),
0 host syncs, 8 bytes uploaded, 26 host calls per training step (eager: 1307)``: the batch's two
copies into the graph's static inputs, the optimizer's staged scalars (one 8-byte upload for SGD),
one graph launch. **Host calls** are the Python function calls into cnn_gpu's code during one
step (``sys.setprofile``, "call" events of functions defined under cnn_gpu/; the JSON also has
every Python call, the stand-in's included), for the eager step and the graph's alike. Then the
counts of a whole ``fit`` epoch (fit's default ``cuda_graph="auto"``; its host reads happen once
per epoch, not per step).

``--real`` counts nothing: with real CuPy and an NVIDIA GPU it builds the same model, optimizer and
batch as the counted step, warms up, and times it (``real_budget``), per step, eagerly and (unless
``--cuda-graph off``) as one CUDA graph (a second model, the graph warmed up with at least two
calls; its keys are the eager ones prefixed ``graph_``):

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

``--host-time`` (``host_time``) times ``--steps`` steps (``perf_counter``, the garbage collector
off, the median of ``--runs`` runs) eagerly and as one CUDA graph, alternating, under the stand-in's
null compute (``standin.null_compute``: every launch is issued, checked and counted but no
arithmetic runs: our kernels, the fake cuBLAS GEMMs, CuPy's elementwise and reduction ops, graph
replays). So a step's time is the host's alone: our Python plus the stand-in's per-call overhead,
which is NOT CuPy's (real CuPy's launch path is Cython and the driver's), so these are our
Python's share of a real step, not a GPU step time; ``cProfile`` splits off cnn_gpu's own part
(its functions' own time and the C functions they call) as an estimate.

``--bytes`` (``step_bytes``): the device memory one training step's kernels and GEMMs read and write,
in fp32 and in fp16 (``fit(precision="fp16")``'s step, cnn_gpu/precision.py), on the CPU emulation of
the kernels: per launch, the bytes of its distinct array arguments (what the kernel reads or writes,
each once; a GEMM's A, B and C, C twice when it adds into it). CuPy's own elementwise ops (the
gradients' zeroing, the batch's float16 cast) are not counted.
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

from step_time import SHAPES, graph_state, machine, training_graph_step  # noqa: E402  (benchmarks/ on sys.path)

import cnn_gpu  # noqa: E402
from cnn_gpu import models, nn, optim  # noqa: E402
from cnn_gpu.callbacks import Evaluate  # noqa: E402
from cnn_gpu.data import DataLoader  # noqa: E402
from cnn_gpu.train import fit, train_step  # noqa: E402

_MB = 1e6


def _setup(cp, name, batch, steps=1):
    cnn_gpu.manual_seed(0)
    model = getattr(models, name)()
    opt = optim.SGD(model, 0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((batch * steps,) + SHAPES[name]).astype(np.float32))
    y = cp.asarray(rng.integers(0, 10, batch * steps))
    return model, opt, x, y


_CNN_GPU = str(Path(cnn_gpu.__file__).resolve().parent) + "/"


def _ours(code) -> bool:
    return code.co_filename.startswith(_CNN_GPU)


def host_calls(fn) -> dict:
    """The Python function calls made while ``fn()`` runs (``sys.setprofile``, "call" events):
    ``cnn_gpu``, those of functions defined in cnn_gpu's package (our code: "host calls"), and
    ``python``, all of them (the CuPy stand-in's and the benchmark's too)."""
    counts = {"cnn_gpu": 0, "python": 0}

    def profile(frame, event, arg):
        if event == "call":
            counts["python"] += 1
            if _ours(frame.f_code):
                counts["cnn_gpu"] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    code = getattr(fn, "__code__", None)
    if code is not None:  # the call of fn itself (a lambda around the step) is not the step's
        counts["python"] -= 1
        counts["cnn_gpu"] -= _ours(code)
    return counts


def step_budget(cp, counting, name, batch, host: dict | None = None):
    """Counters of one training step (after a warm-up step that compiles and allocates). The loss is
    the default CrossEntropyLoss of a hand-written loop (README): its label check runs on the device.
    ``host``: a dict that gets the step's ``host_calls``."""
    with cnn_gpu.use_backend("cupy"):
        model, opt, x, y = _setup(cp, name, batch)
        loss_fn = nn.CrossEntropyLoss()
        train_step(model, loss_fn, opt, x, y)
        with counting() as c:
            calls = host_calls(lambda: train_step(model, loss_fn, opt, x, y))
    if host is not None:
        host.update(calls)
    return c


def graph_budget(cp, counting, name, batch, host: dict | None = None, calls: int = 3):
    """Counters of one steady-state call of the CUDA-graph training step (step_time.training_graph_step:
    cnn_gpu.cuda.graph.training_graph, as fit builds it with ``cuda_graph="auto"``), the last of
    ``calls`` (at least 3: call 1 runs the step eagerly and captures it, call 2 is the first replay,
    checked against an eager step; then the batch's copies into the static inputs, the staged
    scalars' upload, one graph launch and the host counters' advance). The same model, optimizer,
    loss and batch as step_budget's. ``host``: a dict that gets the counted call's ``host_calls``
    and ``graph`` (graph_state: "on", or why it ran eagerly) and what the graph said (``said``)."""
    if calls < 3:
        raise ValueError(f"calls: expected at least 3 (eager + capture, checked replay, counted), got {calls}")
    said: list[str] = []
    with cnn_gpu.use_backend("cupy"):
        model, opt, x, y = _setup(cp, name, batch)
        loss_fn = nn.CrossEntropyLoss()
        graphed = training_graph_step(model, loss_fn, opt, say=said.append)
        for _ in range(calls - 1):
            graphed(x, y)
        with counting() as c:
            counts = host_calls(lambda: graphed(x, y))
        state = graph_state(graphed)
        graphed.close()  # the optimizer steps eagerly again
    if host is not None:
        host.update(counts, graph=state, said=said)
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
    return (
        f"{name} batch {batch}: {c.total_launches} launches, {c.total_syncs} host syncs, "
        f"{c.upload_bytes / _MB:.1f} MB uploaded, {c.layout_copy_bytes / _MB:.1f} MB layout copies {what}"
    )


def graph_line(name, batch, c, calls: int, eager_calls: int | None = None, state: str = "on") -> str:
    """``<name> batch <b>, CUDA graph: 1 graph launch (K kernels inside) + N launches outside it
    (kind n, ...), S host syncs, U bytes uploaded, H host calls per training step (eager: E)``."""
    graphs = c.launches.get("graph", 0)
    outside = {k: v for k, v in sorted(c.launches.items()) if k != "graph"}
    s = f"{name} batch {batch}, CUDA graph"
    if state != "on":
        s += f" {state}"
    s += f": {graphs} graph launch{'es' if graphs != 1 else ''} ({c.total_graph_kernels} kernels inside)"
    if outside:
        s += f" + {sum(outside.values())} launches outside it ({', '.join(f'{k} {v}' for k, v in outside.items())})"
    s += f", {c.total_syncs} host syncs, {c.upload_bytes} bytes uploaded, {calls} host calls per training step"
    return s + (f" (eager: {eager_calls})" if eager_calls is not None else "")


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


def _time_loop(cp, step, steps: int, spin=None) -> dict:
    """The loop and (with ``spin``) the dispatch/kernels times of ``step`` (warmed up), ms per step:
    see the module docstring."""
    elapsed = cp.cuda.get_elapsed_time
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
    row = {
        "loop_gpu_ms": elapsed(marks[0], marks[-1]) / steps,
        "loop_gpu_step_ms_median": _median(per_step),
        "loop_host_ms": 1e3 * host_loop / steps,
        "loop_wall_ms": 1e3 * wall / steps,
    }

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


def real_budget(cp, name: str, batch: int, steps: int = 20, warmup: int = 3, spin=None, cuda_graph: bool = True) -> dict:
    """Times (ms per step) of the counted training step on a GPU with CuPy module ``cp``: see the
    module docstring. ``spin``: ``gpu_spinner(cp)``, or None to time the loop only. ``cuda_graph``:
    also time the step as one CUDA graph (a second model and optimizer, the same batch; at least two
    warm-up calls: the capture, then the first replay, checked once against an eager step), under
    the same keys prefixed ``graph_``, and ``graph``: "on", or why its calls ran eagerly."""
    if steps < 1:
        raise ValueError(f"steps: expected at least 1, got {steps}")
    with cnn_gpu.use_backend("cupy"):
        model, opt, x, y = _setup(cp, name, batch)
        loss_fn = nn.CrossEntropyLoss()

        def step():
            train_step(model, loss_fn, opt, x, y)

        for _ in range(max(1, warmup)):  # the first step compiles kernels and fills the memory pool
            step()
        cp.cuda.Device().synchronize()
        row = {"model": name, "batch": batch, "steps": steps, "warmup": max(1, warmup)}
        row.update(_time_loop(cp, step, steps, spin))
        if cuda_graph:
            model_g, opt_g, x_g, y_g = _setup(cp, name, batch)
            said: list[str] = []
            graphed = training_graph_step(model_g, nn.CrossEntropyLoss(), opt_g, say=said.append)
            for _ in range(max(2, warmup)):  # call 1: eager + capture; call 2: the checked replay
                graphed(x_g, y_g)
            cp.cuda.Device().synchronize()
            timed = _time_loop(cp, lambda: graphed(x_g, y_g), steps, spin)
            row.update({f"graph_{k}": v for k, v in timed.items()})
            row.update(graph=graph_state(graphed), graph_warmup=max(2, warmup), graph_said=said)
            graphed.close()
    return row


def real_line(r: dict, graph: bool = False) -> str:
    """The eager step's line, or (``graph``) the CUDA-graph step's, from a real_budget row."""
    p = "graph_" if graph else ""
    s = f"{r['model']} batch {r['batch']}"
    if graph:
        s += ", CUDA graph" + ("" if r["graph"] == "on" else f" {r['graph']}")
    s += f": {r[p + 'loop_gpu_ms']:.3f} ms per step in a loop of {r['steps']} (GPU, events; host {r[p + 'loop_host_ms']:.3f} ms)"
    if p + "kernels_ms" in r:
        s += (
            f"; each step alone: dispatch {r[p + 'dispatch_ms']:.3f} ms (host: Python + launches), "
            f"kernels {r[p + 'kernels_ms']:.3f} ms (GPU, back to back)"
        )
    return s + f"; bound by the {r[p + 'bound']}"


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
        print(
            f"# one training step timed on {device}: SGD (Nesterov, weight decay), "
            f"{args.steps} steps after {args.warmup} warm-up"
            + ("; eagerly, then as one CUDA graph" if args.cuda_graph == "on" else "")
        )
        if no_spin:
            print(f"# no spin kernel ({no_spin}): the loop timing only")
    rows = []
    for name in args.models:
        for batch in args.batch:
            r = real_budget(cp, name, batch, args.steps, args.warmup, spin, cuda_graph=args.cuda_graph == "on")
            rows.append(r)
            if not args.json:
                print(real_line(r), flush=True)
                if "graph" in r:
                    print(real_line(r, graph=True), flush=True)
    if args.json:
        print(json.dumps({"device": device, "spin": not no_spin, "no_spin_why": no_spin, "rows": rows}, indent=1, sort_keys=True))
    return 0


# ------------------------------------------------------------------ --host-time: null-cost launches
def _per_step_ms(fn, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return 1e3 * (time.perf_counter() - t) / steps


def own_share(fn, steps: int) -> float:
    """The share of ``steps`` calls of ``fn`` that cProfile puts in cnn_gpu's code: its functions' own
    time plus the C functions they call, over all profiled time (the rest: the stand-in, the
    benchmark, C functions the stand-in calls). An estimate: cProfile's per-call cost inflates each
    side by its number of calls."""
    import cProfile  # noqa: PLC0415
    import pstats  # noqa: PLC0415

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        fn()
    prof.disable()
    ours = total = 0.0
    for func, (_, _, own, _, callers) in pstats.Stats(prof).stats.items():
        total += own
        if func[0].startswith(_CNN_GPU):
            ours += own
        elif func[0] == "~":  # a C function: its time goes to the callers that are ours
            ours += sum(v[2] for caller, v in callers.items() if caller[0].startswith(_CNN_GPU))
    return ours / total if total > 0 else 0.0


def host_time(cp, name: str, batch: int, steps: int = 20, runs: int = 5, share: bool = True) -> dict:
    """Host time per training step (ms) with null-cost launches (the stand-in's ``null_compute``):
    ``steps`` eager steps (train_step) and ``steps`` calls of the same step as one CUDA graph
    (training_graph_step; a second model; built and warmed up under null compute with the first
    replay's check off, since null compute leaves values unwritten), timed alternately ``runs``
    times with the garbage collector off; medians. Also: the host calls and launches of one step
    each, what null compute had to compute for lack of a shape rule (``computed``: should be empty),
    and (``share``) cProfile's estimate of cnn_gpu's own part of each."""
    import gc  # noqa: PLC0415

    from standin import counting, null_compute  # noqa: PLC0415

    if steps < 1 or runs < 1:
        raise ValueError(f"steps, runs: expected at least 1, got {steps}, {runs}")
    said: list[str] = []
    with cnn_gpu.use_backend("cupy"), null_compute() as computed:
        model, opt, x, y = _setup(cp, name, batch)
        loss_fn = nn.CrossEntropyLoss()
        model_g, opt_g, x_g, y_g = _setup(cp, name, batch)
        graphed = training_graph_step(model_g, nn.CrossEntropyLoss(), opt_g, check=False, say=said.append)

        def eager():
            train_step(model, loss_fn, opt, x, y)

        def graph():
            graphed(x_g, y_g)

        for _ in range(2):  # kernels compiled and lazy buffers made; the graph captured, then replayed
            eager()
            graph()
        with counting() as ce:
            calls_e = host_calls(eager)
        with counting() as cg:
            calls_g = host_calls(graph)
        computed.clear()
        t_e, t_g = [], []
        enabled = gc.isenabled()
        gc.disable()
        try:
            for _ in range(runs):
                t_e.append(_per_step_ms(eager, steps))
                t_g.append(_per_step_ms(graph, steps))
        finally:
            if enabled:
                gc.enable()
        row = {
            "model": name,
            "batch": batch,
            "steps": steps,
            "runs": runs,
            "eager_ms": _median(t_e),
            "graph_ms": _median(t_g),
            "eager_runs_ms": t_e,
            "graph_runs_ms": t_g,
            "eager_host_calls": calls_e,
            "graph_host_calls": calls_g,
            "eager_launches": ce.total_launches,
            "graph_launches": cg.total_launches,
            "graph_kernels_inside": cg.total_graph_kernels,
            "graph": graph_state(graphed),
            "graph_said": said,
            "computed": dict(computed),
        }
        if share:
            row["eager_cnn_gpu_share"] = own_share(eager, steps)
            row["graph_cnn_gpu_share"] = own_share(graph, steps)
        graphed.close()
    row["speedup"] = row["eager_ms"] / row["graph_ms"] if row["graph_ms"] > 0 else float("inf")
    return row


HOST_TIME_HEADER = (
    "| model | batch | eager ms / step | graph ms / step | eager / graph | host calls eager / graph "
    "| launches eager / graph (kernels inside) | cnn_gpu's own ms eager / graph (cProfile share) |"
)


def host_time_row(r: dict) -> str:
    own = "-"
    if "eager_cnn_gpu_share" in r:
        own = (
            f"{r['eager_ms'] * r['eager_cnn_gpu_share']:.3f} ({100 * r['eager_cnn_gpu_share']:.0f}%) / "
            f"{r['graph_ms'] * r['graph_cnn_gpu_share']:.3f} ({100 * r['graph_cnn_gpu_share']:.0f}%)"
        )
    return (
        f"| {r['model']} | {r['batch']} | {r['eager_ms']:.3f} | {r['graph_ms']:.3f} | {r['speedup']:.0f}x | "
        f"{r['eager_host_calls']['cnn_gpu']} / {r['graph_host_calls']['cnn_gpu']} | "
        f"{r['eager_launches']} / {r['graph_launches']} ({r['graph_kernels_inside']}) | {own} |"
    )


def _host_time(args) -> int:
    import platform  # noqa: PLC0415

    from standin import activated  # noqa: PLC0415  (test support: the CuPy stand-in)

    where = f"Python {platform.python_version()} on {machine()}"
    rows = []
    if not args.json:
        print(
            f"# host time per training step with null-cost launches (the CuPy stand-in's null_compute: every "
            f"launch issued, checked and counted, no arithmetic), median of {args.runs} runs of {args.steps} "
            f"steps, eager and as one CUDA graph; {where}"
        )
        print(
            "# the stand-in's per-call overhead is not CuPy's: these times are our Python's share of a step "
            "plus the stand-in's, not a GPU step time; cProfile estimates cnn_gpu's own part"
        )
        print(HOST_TIME_HEADER)
        print("|---|---|---|---|---|---|---|---|", flush=True)
    with activated() as cp:
        for name in args.models:
            for batch in args.batch:
                r = host_time(cp, name, batch, args.steps, args.runs)
                rows.append(r)
                if not args.json:
                    print(host_time_row(r), flush=True)
    notes = [f"{r['model']} batch {r['batch']}: the CUDA graph is {r['graph']}" for r in rows if r["graph"] != "on"]
    notes += [
        f"{r['model']} batch {r['batch']}: computed for lack of a shape rule: {r['computed']}" for r in rows if r["computed"]
    ]
    if args.json:
        print(json.dumps({"machine": where, "steps": args.steps, "runs": args.runs, "rows": rows}, indent=1, sort_keys=True))
    elif notes:
        print("\n" + "\n".join(notes))
    return 0


class _ByteCounter:
    """A launcher around the CPU emulation's: adds up the bytes of each launch's distinct array
    arguments and of each GEMM's operands (``bytes``, ``launches``)."""

    def __init__(self, inner):
        self.inner, self.bytes, self.launches = inner, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def launch(self, name, kernel, grid, block, args):
        arrays = {id(a): a for a in args if isinstance(a, np.ndarray)}
        self.bytes += sum(a.nbytes for a in arrays.values())
        self.launches += 1
        self.inner.launch(name, kernel, grid, block, args)

    def gemm(self, a, b, out, *, transa=False, transb=False, beta=0.0):
        self.bytes += a.nbytes + b.nbytes + out.nbytes * (2 if beta else 1)
        self.launches += 1
        self.inner.gemm(a, b, out, transa=transa, transb=transb, beta=beta)


def step_bytes(name: str, batch: int, precision: str) -> dict:
    """{"bytes", "launches"} of one training step of ``name`` at ``batch`` in ``precision`` ("fp32",
    "fp16"): the second step (the first allocates), counted on the kernels' CPU emulation."""
    from helpers import load_harness  # noqa: PLC0415  (tests/: the emulation)

    from cnn_gpu.cuda import use_launcher  # noqa: PLC0415
    from cnn_gpu.precision import Float16Step  # noqa: PLC0415

    counter = _ByteCounter(load_harness().EmulationLauncher(check_order=False, grid_cap=64))
    with use_launcher(counter), cnn_gpu.config.override(engine="cuda"):
        model, opt, x, y = _setup(np, name, batch)
        loss_fn = nn.CrossEntropyLoss(validate_range=False)
        half = Float16Step(model, opt, loss_fn) if precision == "fp16" else None
        train_step(model, loss_fn, opt, x, y)
        counter.bytes = counter.launches = 0
        train_step(model, loss_fn, opt, x, y)
        if half is not None:
            half.close()
    return {"bytes": counter.bytes, "launches": counter.launches}


def _bytes(args) -> int:
    report = {}
    for name in args.models:
        for batch in args.batch:
            r = {p: step_bytes(name, batch, p) for p in ("fp32", "fp16")}
            report[f"{name} batch {batch}"] = r
            if not args.json:
                print(
                    f"{name} batch {batch}: {r['fp32']['bytes'] / _MB:.2f} MB moved per training step in fp32, "
                    f"{r['fp16']['bytes'] / _MB:.2f} MB in fp16 ({r['fp16']['bytes'] / r['fp32']['bytes']:.2f}x; "
                    f"{r['fp32']['launches']} and {r['fp16']['launches']} launches)"
                )
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models", nargs="+", default=None, choices=list(SHAPES), help="default: lenet5 vgg_small (--host-time: and resnet20)"
    )
    ap.add_argument("--batch", nargs="+", type=int, default=[128], help="one or more batch sizes (default 128)")
    ap.add_argument("--epoch-steps", type=int, default=8, help="steps in the fit epoch that is counted")
    ap.add_argument(
        "--cuda-graph",
        choices=["on", "off"],
        default="on",
        help="count (and with --real time) the step as one CUDA graph too (default on)",
    )
    ap.add_argument("--json", action="store_true")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--real", action="store_true", help="time the step on a real GPU (CuPy + an NVIDIA GPU) instead of counting it"
    )
    mode.add_argument(
        "--host-time",
        action="store_true",
        help="time the host side of a step, eager and as a CUDA graph, with null-cost launches "
        "(the CuPy stand-in's null_compute)",
    )
    mode.add_argument(
        "--bytes",
        action="store_true",
        help="the bytes one training step's kernels and GEMMs move, fp32 against fp16 (the emulation)",
    )
    ap.add_argument("--steps", type=int, default=20, help="--real, --host-time: timed steps per model and batch (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="--real: untimed steps first (default 3, at least 1)")
    ap.add_argument("--runs", type=int, default=5, help="--host-time: timed runs of --steps steps (default 5)")
    ap.add_argument("--standin", action="store_true", help=argparse.SUPPRESS)  # --real through the stand-in
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.models is None:
        args.models = ["lenet5", "vgg_small"] + (["resnet20"] if args.host_time else [])
    if args.real:
        return _real(args)
    if args.host_time:
        return _host_time(args)
    if args.bytes:
        return _bytes(args)
    from standin import activated, counting  # noqa: PLC0415  (test support: the CuPy stand-in)

    graphs = args.cuda_graph == "on"
    report = {}
    with activated() as cp:
        for name in args.models:
            for batch in args.batch:
                host, ghost = {}, {}
                c = step_budget(cp, counting, name, batch, host=host)
                g = graph_budget(cp, counting, name, batch, host=ghost) if graphs else None
                e = epoch_budget(cp, counting, name, batch, args.epoch_steps)
                key = name if len(args.batch) == 1 else f"{name} batch {batch}"
                report[key] = {"step": c.summary(), "epoch": e.summary(), "epoch_steps": args.epoch_steps, "host_calls": host}
                if g is not None:
                    report[key]["graph"] = {
                        "step": g.summary(),
                        "state": ghost["graph"],
                        "said": ghost["said"],
                        "host_calls": {k: ghost[k] for k in ("cnn_gpu", "python")},
                    }
                if not args.json:
                    print(line(name, batch, c, "per training step"))
                    print(f"  launches by kind: {dict(sorted(c.launches.items()))}; kernels: {dict(sorted(c.kernels.items()))}")
                    print(
                        f"  device bytes allocated {c.alloc_bytes / _MB:.1f} MB in {c.allocations} arrays, "
                        f"{c.download_bytes / _MB:.3f} MB downloaded"
                    )
                    print(
                        f"  host calls: {host['cnn_gpu']} per step (Python calls into cnn_gpu; {host['python']} "
                        "with the stand-in's)"
                    )
                    if g is not None:
                        print(graph_line(name, batch, g, ghost["cnn_gpu"], host["cnn_gpu"], ghost["graph"]))
                        print(
                            f"  inside the graph: {dict(sorted(g.graph_kernels.items()))}; "
                            f"{g.uploads} uploads, {g.allocations} allocations, {ghost['python']} Python calls "
                            "with the stand-in's"
                        )
                        for said in ghost["said"]:
                            print(f"  {said}")
                    print(line(name, batch, e, f"per fit epoch of {args.epoch_steps} steps + an evaluation"))
                    print(f"  host syncs by cause: {dict(e.syncs)}")
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
