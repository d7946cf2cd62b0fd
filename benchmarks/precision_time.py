"""Training-step time in fp32, tf32 and fp16 (cnn_gpu/precision.py), cnn_gpu against torch on the
same GPU: torch in float32, with TF32 (torch.backends.cuda.matmul.allow_tf32 and cudnn.allow_tf32)
and with autocast(float16) + GradScaler. Eager steps (no CUDA graph on either side), SGD momentum
0.9, the medians of ``--repeat`` steps after ``--warmup``, each step synchronised.

    python benchmarks/precision_time.py [--models lenet5 vgg_small] [--batch 128 512] [--repeat 21]
                                        [--warmup 5] [--json]

Needs CuPy and an NVIDIA GPU (and torch with CUDA for its columns): without them it exits with
status 2 and one line saying why. One table row per model and batch: ms per step and each
precision's speed-up over its own fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from step_time import SHAPES, OursStep, TorchStep  # noqa: E402

PRECISIONS = ("fp32", "tf32", "fp16")


def _median_ms(step, repeat: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        step()  # (synchronises at its end)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def ours_ms(name: str, batch: int, precision: str, repeat: int, warmup: int) -> float:
    """cnn_gpu's eager step in ``precision`` (fp16: fit's Float16Step; tf32: the TF32 math mode)."""
    from cnn_gpu.precision import Float16Step, gemm_math  # noqa: PLC0415

    s = OursStep(name, batch, "cupy")
    if precision == "fp16":
        half = Float16Step(s.model, s.opt, s.loss)

        def step():
            half(s.x, s.y)
            import cupy  # noqa: PLC0415

            cupy.cuda.Device().synchronize()
    else:
        step = s
    with gemm_math(precision):
        return _median_ms(step, repeat, warmup)


def torch_ms(name: str, batch: int, precision: str, repeat: int, warmup: int) -> float:
    """torch's step: float32, TF32, or autocast(float16) with a GradScaler."""
    import torch  # noqa: PLC0415

    t = TorchStep(name, batch, "cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if precision != "fp16":
        return _median_ms(t, repeat, warmup)
    scaler = torch.amp.GradScaler("cuda")

    def step():
        t.opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = t.lossf(t.net(t.x), t.y)
        scaler.scale(loss).backward()
        scaler.step(t.opt)
        scaler.update()
        torch.cuda.synchronize()

    return _median_ms(step, repeat, warmup)


def _unusable() -> str:
    try:
        from cnn_gpu.backend import _cupy_status  # noqa: PLC0415

        cp, why = _cupy_status()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return "" if cp is not None else why


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["lenet5", "vgg_small"])
    ap.add_argument("--batch", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    why = _unusable()
    if why:
        print(f"precision_time.py needs CuPy and an NVIDIA GPU: {why}")
        return 2
    try:
        import torch  # noqa: PLC0415

        with_torch = torch.cuda.is_available()
    except ImportError:
        with_torch = False
    rows = []
    if not args.json:
        cols = " | ".join(f"ours {p}" for p in PRECISIONS) + (
            " | " + " | ".join(f"torch {p}" for p in PRECISIONS) if with_torch else ""
        )
        print(f"| model | batch | {cols} |\n|---|---|" + "---|" * (len(PRECISIONS) * (2 if with_torch else 1)))
    for name in args.models:
        for batch in args.batch:
            r = {"model": name, "batch": batch}
            for p in PRECISIONS:
                r[f"ours_{p}"] = ours_ms(name, batch, p, args.repeat, args.warmup)
                if with_torch:
                    with contextlib.suppress(RuntimeError):  # (a torch without float16 kernels here)
                        r[f"torch_{p}"] = torch_ms(name, batch, p, args.repeat, args.warmup)
            rows.append(r)
            if not args.json:
                cells = []
                for who in ("ours",) + (("torch",) if with_torch else ()):
                    base = r.get(f"{who}_fp32")
                    for p in PRECISIONS:
                        v = r.get(f"{who}_{p}")
                        cells.append(
                            "n/a" if v is None else f"{v:.2f} ms" + (f" ({base / v:.2f}x)" if p != "fp32" and base else "")
                        )
                print(f"| {name} | {batch} | " + " | ".join(cells) + " |")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
