"""BatchNorm on the GPU: cnn_gpu's kernels (kernels/batchnorm.cu) with the launcher's segment count
against one segment per channel (one block per channel: the kernels' parallelism before
2026-12-02) and, when torch has CUDA, torch's BatchNorm2d + ReLU (cuDNN): one training forward +
backward (the ReLU fused on cnn_gpu's side) for resnet20's three BatchNorm shapes.

    python benchmarks/bn_gpu.py [--batch 128] [--repeat 50] [--standin]

Each time is the mean of ``--repeat`` calls between two device synchronisations, after a warm-up.
``--standin`` runs the same code through the CuPy stand-in (tests/standin: no GPU, the kernels in
the CPU emulation): its times mean nothing; it shows that the script runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import cnn_gpu  # noqa: E402
from cnn_gpu.cuda import ops  # noqa: E402

SHAPES = ((16, 32), (32, 16), (64, 8))  # (channels, height = width) of resnet20's three stages


def mean_ms(cp, fn, repeat: int) -> float:
    fn()
    cp.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - t) * 1e3 / repeat


def ours(cp, x, dy, segments):
    C = x.shape[1]
    gamma, beta = cp.ones(C, dtype=x.dtype), cp.zeros(C, dtype=x.dtype)
    rm, rv = cp.zeros(C, dtype=x.dtype), cp.ones(C, dtype=x.dtype)

    def step():
        _, cache = ops.batch_norm_forward(x, gamma, beta, rm, rv, True, 0.1, 1e-5, "relu", segments=segments)
        ops.batch_norm_backward(dy, cache, segments=segments)

    return step


def torch_step(x, dy):
    import torch  # noqa: PLC0415

    bn = torch.nn.BatchNorm2d(x.shape[1]).cuda()
    tx = torch.as_tensor(x, device="cuda").requires_grad_()
    tdy = torch.as_tensor(dy, device="cuda")

    def step():
        torch.relu(bn(tx)).backward(tdy)

    return step, torch.cuda.synchronize


def _torch_cuda() -> bool:
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def run(cp, batch: int, repeat: int, with_torch: bool) -> list[str]:
    rows = ["| shape | segments (auto) | auto ms | 1 segment ms | torch ms |", "|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for C, H in SHAPES:
        shape = (batch, C, H, H)
        x_np, dy_np = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
        x, dy = cp.asarray(x_np), cp.asarray(dy_np)
        auto = ops._bn_segments(C, batch * H * H, None)
        t_auto, t_one = (mean_ms(cp, ours(cp, x, dy, s), repeat) for s in (None, 1))
        t_torch = "-"
        if with_torch:
            step, sync = torch_step(x_np, dy_np)
            step()
            sync()
            t = time.perf_counter()
            for _ in range(repeat):
                step()
            sync()
            t_torch = f"{(time.perf_counter() - t) * 1e3 / repeat:.3f}"
        rows.append(f"| {'x'.join(map(str, shape))} | {auto} | {t_auto:.3f} | {t_one:.3f} | {t_torch} |")
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--standin", action="store_true", help="through the CuPy stand-in (no GPU; times meaningless)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.standin:
        from standin import activated  # noqa: PLC0415  (test support: the CuPy stand-in)

        with activated() as cp, cnn_gpu.use_backend("cupy"):
            rows = run(cp, args.batch, args.repeat, False)
    else:
        import cupy as cp  # noqa: PLC0415

        with cnn_gpu.use_backend("cupy"):
            rows = run(cp, args.batch, args.repeat, _torch_cuda())
    print(f"# BatchNorm2d + ReLU, training forward + backward, batch {args.batch}, mean of {args.repeat}")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
