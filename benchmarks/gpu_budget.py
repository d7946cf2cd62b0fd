"""What one GPU training step costs, counted through the CuPy stand-in (tests/standin): launches by
kind, host syncs, host-to-device and device-to-host bytes, device bytes allocated, layout-only copies.

    python benchmarks/gpu_budget.py [--models lenet5 vgg_small resnet20] [--batch 128] [--epoch-steps 8] [--json]

No GPU is needed: the stand-in runs CuPy's API on the CPU (our kernels in the g++ emulation) and
counts what a GPU would be asked to do. Launches, not FLOPs, bound small CNNs on a GPU, so the
count should only ever fall. One line per model, e.g.
``lenet5 batch 128: 35 launches, 0 host syncs, 0.0 MB uploaded, 0.0 MB layout copies per training step``,
then the same for a whole ``fit`` epoch (its host reads happen once per epoch, not per step).
With a real GPU, ``--real`` counts nothing but times the same step with real CuPy (events).
"""
from __future__ import annotations

import argparse
import json
import sys
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
    """Counters of one training step (after a warm-up step that compiles and allocates)."""
    with cnn_gpu.use_backend("cupy"):
        model, opt, x, y = _setup(cp, name, batch)
        loss_fn = nn.CrossEntropyLoss(validate_range=False)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet5", "vgg_small"], choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epoch-steps", type=int, default=8, help="steps in the fit epoch that is counted")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from standin import activated, counting  # noqa: PLC0415  (test support: the CuPy stand-in)

    report = {}
    with activated() as cp:
        for name in args.models:
            c = step_budget(cp, counting, name, args.batch)
            e = epoch_budget(cp, counting, name, args.batch, args.epoch_steps)
            report[name] = {"step": c.summary(), "epoch": e.summary(), "epoch_steps": args.epoch_steps}
            if not args.json:
                print(line(name, args.batch, c, "per training step"))
                print(f"  launches by kind: {dict(sorted(c.launches.items()))}; kernels: {dict(sorted(c.kernels.items()))}")
                print(f"  device bytes allocated {c.alloc_bytes / _MB:.1f} MB in {c.allocations} arrays, "
                      f"{c.download_bytes / _MB:.3f} MB downloaded")
                print(line(name, args.batch, e, f"per fit epoch of {args.epoch_steps} steps + an evaluation"))
                print(f"  host syncs by cause: {dict(e.syncs)}")
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
