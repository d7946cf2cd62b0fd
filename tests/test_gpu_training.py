"""On a real GPU: a short training run on the cupy backend matches the NumPy run step by step.

Skipped (marked ``gpu``) where CuPy or a GPU is missing. scripts/gpu_check.sh runs it.
"""

from __future__ import annotations

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import models, nn, optim
from cnn_gpu.backend import cupy_available
from cnn_gpu.data import DataLoader
from cnn_gpu.train import evaluate, fit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a GPU")]


def _steps(backend, dtype, steps=8, make_opt=lambda m: optim.SGD(m, 0.05, momentum=0.9)):
    rng = np.random.default_rng(0)
    x_host = rng.standard_normal((32, 1, 28, 28)).astype(dtype)
    y_host = rng.integers(0, 10, 32)
    with cnn_gpu.use_backend(backend) as xp:
        cnn_gpu.manual_seed(0)
        model = models.lenet5(dtype=dtype)
        opt = make_opt(model)
        loss_fn = nn.CrossEntropyLoss(validate_range=False)
        x, y = xp.asarray(x_host), xp.asarray(y_host)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn.forward(model.forward(x), y)
            model.backward(loss_fn.backward())
            opt.step()
            losses.append(loss)  # stays on the device: no sync inside the loop
        losses = np.array([float(cnn_gpu.to_numpy(v)) for v in losses])
        weights = {k: cnn_gpu.to_numpy(v).copy() for k, v in model.state_dict().items()}
    return losses, weights


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_cupy_training_losses_match_numpy_step_by_step(dtype, tol, opt):
    make = (lambda m: optim.SGD(m, 0.05, momentum=0.9)) if opt == "sgd" else (lambda m: optim.Adam(m, 1e-3))
    ref_losses, ref_w = _steps("numpy", dtype, make_opt=make)
    gpu_losses, gpu_w = _steps("cupy", dtype, make_opt=make)
    np.testing.assert_allclose(gpu_losses, ref_losses, rtol=tol)
    wtol = tol if dtype == np.float64 else 10 * tol  # rounding differences compound over the steps
    for k in ref_w:
        assert np.abs(gpu_w[k] - ref_w[k]).max() <= wtol * (np.abs(ref_w[k]).max() + 1e-30), k


def test_cupy_fit_keeps_everything_on_the_device():
    import cupy

    with cnn_gpu.use_backend("cupy"):
        cnn_gpu.manual_seed(1)
        rng = np.random.default_rng(1)
        x = cupy.asarray(rng.standard_normal((256, 1, 28, 28)).astype(np.float32))
        y = cupy.asarray(rng.integers(0, 10, 256))
        model = models.lenet5()
        opt = optim.Adam(model, 1e-3)
        hist = fit(model, opt, DataLoader(x, y, 64, shuffle=True), 2)
        assert all(isinstance(p.data, cupy.ndarray) for p in model.parameters())
        loss, acc = evaluate(model, x, y)
    assert np.isfinite(hist[-1].train_loss) and hist[-1].train_loss < hist[0].train_loss + 1.0
    assert 0.0 <= acc <= 1.0 and np.isfinite(loss)
