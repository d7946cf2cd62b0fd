"""Grouped and depthwise convolution, forward + backward, on the CPU: the cpu engine and the
reference engine (and torch when installed), alternating in one run; medians, reported as ratios
to the reference engine (and to torch).

    python benchmarks/grouped_conv.py [--batch 32] [--channels 64] [--size 16] [--groups 2 4 16 32 64]
                                      [--repeat 5] [--dtype float32]

The cpu engine runs groups of >= cpu.conv.GROUPED_MIN_CHANNELS channels group by group on its
dense path and narrower ones (depthwise included) on the reference; this measures that choice.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import cnn_gpu
import cnn_gpu.functional as F


def _step(x, w, b, groups, dy):
    y, cache = F.conv2d_forward(x, w, b, 1, 1, 1, groups, activation="relu")
    F.conv2d_backward(dy, cache)


def _median_ms(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--groups", type=int, nargs="+", default=[2, 4, 16, 32, 64])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args(argv)
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    C, dt = args.channels, np.dtype(args.dtype)
    x = rng.standard_normal((args.batch, C, args.size, args.size)).astype(dt)
    dy = rng.standard_normal(x.shape).astype(dt)
    print(
        f"grouped 3x3 convolution, pad 1, {C} -> {C} channels, {args.size}x{args.size}, batch {args.batch}, "
        f"{args.dtype}, forward + backward (median of {args.repeat})"
    )
    print(
        f"{'groups':>6} {'ch/group':>8} {'cpu ms':>8} {'ref ms':>8} {'cpu/ref':>8}"
        + (f" {'torch ms':>9} {'cpu/torch':>9}" if torch else "")
    )
    for G in args.groups:
        w = rng.standard_normal((C, C // G, 3, 3)).astype(dt)
        b = np.zeros(C, dt)
        with cnn_gpu.config.override(engine="cpu"):
            ours = _median_ms(lambda w=w, b=b, G=G: _step(x, w, b, G, dy), args.repeat)
        with cnn_gpu.config.override(engine="reference"):
            ref = _median_ms(lambda w=w, b=b, G=G: _step(x, w, b, G, dy), args.repeat)
        line = f"{G:>6} {C // G:>8} {ours:>8.2f} {ref:>8.2f} {ours / ref:>8.2f}"
        if torch is not None:
            tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
            tb, tdy = torch.tensor(b, requires_grad=True), torch.tensor(dy)

            def tstep(tx=tx, tw=tw, tb=tb, G=G, tdy=tdy):
                torch.relu(torch.nn.functional.conv2d(tx, tw, tb, 1, 1, 1, G)).backward(tdy)

            t = _median_ms(tstep, args.repeat)
            line += f" {t:>9.2f} {ours / t:>9.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
