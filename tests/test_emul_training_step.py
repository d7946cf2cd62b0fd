"""Whole training steps through the CUDA kernels, emulated on the CPU, against the NumPy path.

The engine setting (cnn_gpu.config, engine="cuda") sends NumPy arrays to the CUDA engine, and
its launches go to the g++-built kernels (tests/emulation, the ``cuda_emulation`` fixture), so a
model's forward, backward and optimizer update run through exactly the code and kernels the GPU
runs -- argument order, shapes, scalar types, fusion plans and all -- and are compared with the
reference engine. Every test name contains "emul".
"""

from __future__ import annotations

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import models, nn, optim


def _data(shape, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n,) + shape).astype(dtype), rng.integers(0, 10, n).astype(np.int64)


def _run_steps(factory, shape, dtype, make_opt, steps=3, n=6):
    """Losses, final weights and grads of ``steps`` training steps from a fixed init."""
    cnn_gpu.manual_seed(0)
    model = factory(dtype=dtype)
    opt = make_opt(model)
    loss_fn = nn.CrossEntropyLoss(validate_range=False)
    x, y = _data(shape, n, dtype)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = model.forward(x)
        loss = loss_fn.forward(out, y)
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
        losses.append(float(loss))
    grads = {k: p.grad.copy() for k, p in model.named_parameters()}
    return np.array(losses), {k: v.copy() for k, v in model.state_dict().items()}, grads


OPTIMIZERS = {
    "sgd_nesterov_wd": lambda m: optim.SGD(m, 0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda m: optim.Adam(m, 1e-3, weight_decay=1e-3),
    "adamw": lambda m: optim.AdamW(m, 1e-3),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_emul_lenet5_training_steps_match_the_reference(dtype, opt_name, request):
    with cnn_gpu.config.override(engine="reference"):
        ref = _run_steps(models.lenet5, (1, 28, 28), dtype, OPTIMIZERS[opt_name])
    launcher = request.getfixturevalue("cuda_emulation")
    got = _run_steps(models.lenet5, (1, 28, 28), dtype, OPTIMIZERS[opt_name])
    used = {k for k, _, _ in launcher.log}
    # the kernels actually ran: the conv epilogues, im2col/col2im, both pools' directions, the loss, the optimizer
    assert {
        "im2col_cm",
        "col2im_cm",
        "bias_act_forward",
        "act_backward_bias_grad",
        "max_pool2d_forward",
        "max_pool2d_backward",
        "softmax_cross_entropy",
    } <= {u.rsplit("_f", 1)[0] for u in used}, sorted(used)
    assert any(u.startswith(("sgd_update", "adam_update")) for u in used), sorted(used)
    tol = 1e-10 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(got[0], ref[0], rtol=tol, err_msg="losses")
    # after several steps float32 rounding differences (reduction order) compound: 10x the op tolerance
    wtol = tol if dtype == np.float64 else 10 * tol
    for k in ref[1]:
        scale = np.abs(ref[1][k]).max() + 1e-30
        assert np.abs(got[1][k] - ref[1][k]).max() / scale < wtol, f"weights {k}"
        gscale = np.abs(ref[2][k]).max() + 1e-30
        assert np.abs(got[2][k] - ref[2][k]).max() / gscale < 10 * wtol, f"grad {k}"


def test_emul_avg_pool_dilated_strided_net_steps_match_the_reference(request):
    def net(dtype=np.float64):
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, dtype=dtype),
            nn.ReLU(),
            nn.AvgPool2d(3, 2, 1),
            nn.Conv2d(4, 5, (3, 2), stride=(2, 1), dilation=(1, 2), dtype=dtype),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
            nn.Flatten(),
            nn.Linear(5 * 1 * 2, 10, dtype=dtype),
        )

    with cnn_gpu.config.override(engine="reference"):
        ref = _run_steps(net, (3, 10, 9), np.float64, OPTIMIZERS["sgd_nesterov_wd"])
    launcher = request.getfixturevalue("cuda_emulation")
    got = _run_steps(net, (3, 10, 9), np.float64, OPTIMIZERS["sgd_nesterov_wd"])
    assert any(k.startswith("avg_pool2d_backward") for k, _, _ in launcher.log)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-10)
    for k in ref[1]:
        np.testing.assert_allclose(got[1][k], ref[1][k], rtol=1e-10, atol=1e-12, err_msg=k)
