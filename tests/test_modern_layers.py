"""BatchNorm, GELU, adaptive average pooling, Residual and the CIFAR ResNets (issue 12, part A).

Each op: a float64 gradient check against finite differences, a naive-loop reference written
here from the definitions, and PyTorch CPU as an oracle when it is installed. Then the layers:
running statistics, train/eval switching, buffers through state_dict / save / load / .to() /
checkpoints (a bitwise resume), and bad input.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_close, gradcheck

import cnn_gpu
import cnn_gpu.functional as F
from cnn_gpu import checkpoint as ck
from cnn_gpu import models, nn, optim
from cnn_gpu.data import DataLoader
from cnn_gpu.train import Position, evaluate, fit


# ============================================================ naive references (loops, from the definitions)
def bn_naive(x, gamma, beta, eps, mean=None, var=None):
    """Per channel c: mean and biased variance over every other index (or the given ones), then
    gamma * (x - mean) / sqrt(var + eps) + beta. Returns (y, batch mean, batch biased var)."""
    C = x.shape[1]
    y = np.empty_like(x)
    bm, bv = np.empty(C), np.empty(C)
    for c in range(C):
        vals = [float(v) for v in np.moveaxis(x, 1, 0)[c].ravel()]
        m = sum(vals) / len(vals)
        v = sum((a - m) ** 2 for a in vals) / len(vals)
        bm[c], bv[c] = m, v
        mu, var_c = (m, v) if mean is None else (mean[c], var[c])
        y[:, c] = gamma[c] * (x[:, c] - mu) / math.sqrt(var_c + eps) + beta[c]
    return y, bm, bv


def gelu_naive(x, approximate):
    if approximate == "tanh":
        f = lambda v: 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))  # noqa: E731
    else:
        f = lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    return np.array([f(float(v)) for v in x.ravel()]).reshape(x.shape)


def adaptive_naive(x, OH, OW):
    N, C, H, W = x.shape
    y = np.zeros((N, C, OH, OW))
    for i in range(OH):
        h0, h1 = math.floor(i * H / OH), math.ceil((i + 1) * H / OH)
        for j in range(OW):
            w0, w1 = math.floor(j * W / OW), math.ceil((j + 1) * W / OW)
            for n in range(N):
                for c in range(C):
                    y[n, c, i, j] = x[n, c, h0:h1, w0:w1].sum() / ((h1 - h0) * (w1 - w0))
    return y


# ============================================================ BatchNorm: the functional pair
BN_SHAPES = [(5, 3), (4, 3, 3, 2), (2, 2, 1, 3)]


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_gradcheck_training(rng, shape, affine):
    C = shape[1]
    x = rng.standard_normal(shape) * 2 + 0.5
    gamma, beta = rng.standard_normal(C) + 1.0, rng.standard_normal(C)
    if affine:
        gradcheck(
            lambda x, g, b: F.batch_norm_forward(x, g, b, None, None, True), F.batch_norm_backward, [x, gamma, beta], tol=1e-6
        )
    else:
        gradcheck(
            lambda x: F.batch_norm_forward(x, None, None, None, None, True),
            lambda dy, c: F.batch_norm_backward(dy, c)[:1],
            [x],
            tol=1e-6,
        )


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_with_the_fused_relu(rng, training):
    """activation="relu": relu(batch_norm(x)) in one op, its gradient checked, and the same numbers as
    the two layers one by one (how nn.Sequential runs BatchNorm2d + ReLU on the fast engines)."""
    x = rng.standard_normal((4, 3, 3, 2))
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = rng.standard_normal(3), rng.random(3) + 0.5
    fwd = lambda x, g, b: F.batch_norm_forward(x, g, b, rm.copy(), rv.copy(), training, activation="relu")  # noqa: E731
    gradcheck(fwd, F.batch_norm_backward, [x, gamma, beta], tol=1e-6)
    y, cache = fwd(x, gamma, beta)
    y0, c0 = F.batch_norm_forward(x, gamma, beta, rm.copy(), rv.copy(), training)
    np.testing.assert_array_equal(y, np.maximum(y0, 0))
    dy = rng.standard_normal(x.shape)
    for got, want in zip(F.batch_norm_backward(dy, cache), F.batch_norm_backward(dy * (y0 > 0), c0)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="activation: expected one of"):
        F.batch_norm_forward(x, gamma, beta, None, None, True, activation="gelu")


@pytest.mark.parametrize("shape", BN_SHAPES[:2])
def test_batch_norm_gradcheck_eval(rng, shape):
    C = shape[1]
    x = rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(C) + 1.0, rng.standard_normal(C)
    rm, rv = rng.standard_normal(C), rng.random(C) + 0.5
    gradcheck(lambda x, g, b: F.batch_norm_forward(x, g, b, rm, rv, False), F.batch_norm_backward, [x, gamma, beta], tol=1e-6)


@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batch_norm_matches_the_naive_loops_and_updates_running_stats(rng, shape):
    C = shape[1]
    M = math.prod(shape) // C
    x = rng.standard_normal(shape) * 3 + 1
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    rm0, rv0 = rng.standard_normal(C), rng.random(C) + 0.5
    rm, rv = rm0.copy(), rv0.copy()
    y, _ = F.batch_norm_forward(x, gamma, beta, rm, rv, True, momentum=0.3, eps=1e-3)
    y_ref, bm, bv = bn_naive(x, gamma, beta, 1e-3)
    assert_close(y, y_ref, 1e-12, "y (training)")
    assert_close(rm, 0.7 * rm0 + 0.3 * bm, 1e-12, "running_mean")
    assert_close(rv, 0.7 * rv0 + 0.3 * bv * M / (M - 1), 1e-12, "running_var (unbiased)")
    y, _ = F.batch_norm_forward(x, gamma, beta, rm, rv, False, eps=1e-3)
    assert_close(y, bn_naive(x, gamma, beta, 1e-3, rm, rv)[0], 1e-12, "y (eval)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_keeps_float32_float32(rng, dtype):
    x = rng.standard_normal((4, 3, 2, 2)).astype(dtype)
    ones, zeros = np.ones(3, dtype), np.zeros(3, dtype)
    rm, rv = zeros.copy(), ones.copy()
    y, cache = F.batch_norm_forward(x, ones, zeros, rm, rv, True)
    dx, dg, db = F.batch_norm_backward(y.copy(), cache)
    assert {a.dtype for a in (y, dx, dg, db, rm, rv)} == {np.dtype(dtype)}


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_torch_oracle(rng, shape, training):
    torch = pytest.importorskip("torch")
    C = shape[1]
    x = rng.standard_normal(shape) * 2 + 1
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    rm, rv = rng.standard_normal(C), rng.random(C) + 0.5
    dy = rng.standard_normal(shape)
    tx, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    ty = torch.nn.functional.batch_norm(tx, trm, trv, tg, tb, training=training, momentum=0.2, eps=1e-4)
    ty.backward(torch.tensor(dy))
    y, cache = F.batch_norm_forward(x, gamma, beta, rm, rv, training, momentum=0.2, eps=1e-4)
    dx, dg, db = F.batch_norm_backward(dy, cache)
    for got, want, what in [
        (y, ty.detach(), "y"),
        (rm, trm, "running_mean"),
        (rv, trv, "running_var"),
        (dx, tx.grad, "dx"),
        (dg, tg.grad, "dgamma"),
        (db, tb.grad, "dbeta"),
    ]:
        assert_close(got, want.numpy(), 1e-10, what)


def test_batch_norm_of_an_empty_batch_is_empty_and_learns_nothing(rng):
    bn = nn.BatchNorm2d(3, dtype=np.float64)
    y = bn.forward(np.zeros((0, 3, 4, 4)))
    assert y.shape == (0, 3, 4, 4)
    np.testing.assert_array_equal(bn.running_mean, np.zeros(3))
    np.testing.assert_array_equal(bn.running_var, np.ones(3))
    assert bn.backward(np.zeros((0, 3, 4, 4))).shape == (0, 3, 4, 4)
    np.testing.assert_array_equal(bn.weight.grad, np.zeros(3))


def test_batch_norm_bad_input(rng):
    x = rng.standard_normal((4, 3, 2, 2))
    ones, zeros = np.ones(3), np.zeros(3)
    with pytest.raises(ValueError, match=r"gamma: expected shape \(3,\).*got float64 array of shape \(4,\)"):
        F.batch_norm_forward(x, np.ones(4), zeros, None, None, True)
    with pytest.raises(ValueError, match=r"running_var: expected shape \(3,\)"):
        F.batch_norm_forward(x, ones, zeros, zeros.copy(), np.ones(2), True)
    with pytest.raises(TypeError, match="beta: expected dtype float64"):
        F.batch_norm_forward(x, ones, zeros.astype(np.float32), None, None, True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm_forward(x[:1, :, :1, :1], ones, zeros, zeros.copy(), ones.copy(), True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm_forward(rng.standard_normal((1, 3)), ones, zeros, None, None, False)
    F.batch_norm_forward(rng.standard_normal((1, 3)), ones, zeros, zeros.copy(), ones.copy(), False)  # eval: fine
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        F.batch_norm_forward(rng.standard_normal((4, 3, 2)), ones, zeros, None, None, True)
    with pytest.raises(ValueError, match="momentum: expected a float in"):
        F.batch_norm_forward(x, ones, zeros, None, None, True, momentum=1.5)
    with pytest.raises(ValueError, match="eps: expected a positive float"):
        F.batch_norm_forward(x, ones, zeros, None, None, True, eps=0.0)
    with pytest.raises(ValueError, match="running_mean, running_var: expected both"):
        F.batch_norm_forward(x, ones, zeros, zeros.copy(), None, True)
    with pytest.raises(TypeError, match="training: expected a bool"):
        F.batch_norm_forward(x, ones, zeros, None, None, 1)
    _, cache = F.batch_norm_forward(x, ones, zeros, None, None, True)
    with pytest.raises(ValueError, match=r"dy: expected shape \(4, 3, 2, 2\)"):
        F.batch_norm_backward(np.ones((4, 3, 2, 1)), cache)
    with pytest.raises(TypeError, match="cache: expected the BatchNormCache"):
        F.batch_norm_backward(np.ones((4, 3, 2, 2)), (x,))


# ============================================================ BatchNorm layers
def test_batch_norm_layer_train_eval_and_running_stats(rng):
    bn = nn.BatchNorm2d(3, momentum=0.5, dtype=np.float64)
    x = rng.standard_normal((6, 3, 4, 4)) * 2 + 3
    assert bn.training and int(bn.num_batches_tracked) == 0
    y = bn.forward(x)
    assert_close(y, bn_naive(x, np.ones(3), np.zeros(3), 1e-5)[0], 1e-12, "training output")
    _, bm, bv = bn_naive(x, np.ones(3), np.zeros(3), 1e-5)
    assert_close(bn.running_mean, 0.5 * bm, 1e-12, "running_mean")
    assert_close(bn.running_var, 0.5 + 0.5 * bv * 96 / 95, 1e-12, "running_var")
    assert int(bn.num_batches_tracked) == 1
    before = {k: v.copy() for k, v in bn.state_dict().items()}
    bn.eval()
    y_eval = bn.forward(x)
    assert_close(y_eval, bn_naive(x, np.ones(3), np.zeros(3), 1e-5, bn.running_mean, bn.running_var)[0], 1e-12, "eval")
    for k, v in bn.state_dict().items():  # eval changes nothing
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    dx = bn.backward(np.ones_like(x))
    assert_close(dx, np.ones_like(x) / np.sqrt(bn.running_var + 1e-5).reshape(1, 3, 1, 1), 1e-12, "eval dx")
    bn.train()
    bn.forward(x)
    assert int(bn.num_batches_tracked) == 2


def test_batch_norm_layer_gradients_and_options(rng):
    x = rng.standard_normal((5, 4))
    bn = nn.BatchNorm1d(4, dtype=np.float64)
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]
    assert [n for n, _ in bn.named_buffers()] == ["running_mean", "running_var", "num_batches_tracked"]
    dy = rng.standard_normal((5, 4))
    bn.forward(x)
    dx = bn.backward(dy)
    _, cache = F.batch_norm_forward(x, np.ones(4), np.zeros(4), None, None, True)
    want = F.batch_norm_backward(dy, cache)
    assert_close(dx, want[0], 1e-12, "dx")
    assert_close(bn.weight.grad, want[1], 1e-12, "dgamma")
    assert_close(bn.bias.grad, want[2], 1e-12, "dbeta")
    plain = nn.BatchNorm1d(4, affine=False, track_running_stats=False, dtype=np.float64)
    assert plain.parameters() == [] and list(plain.state_dict()) == []
    plain.eval()  # no running statistics: the batch's, in eval mode too
    assert_close(plain.forward(x), want_y := bn_naive(x, np.ones(4), np.zeros(4), 1e-5)[0], 1e-12, "no tracking")
    assert want_y.shape == (5, 4)


def test_batch_norm_layer_bad_input(rng):
    bn = nn.BatchNorm2d(3)
    with pytest.raises(
        ValueError,
        match=r"BatchNorm2d\(3\) expected 3 channels \(axis 1\), "
        r"got float32 array of shape \(2, 4, 3, 3\)",
    ):
        bn.forward(rng.standard_normal((2, 4, 3, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="BatchNorm2d expected a 4-D"):
        bn.forward(rng.standard_normal((2, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm1d(3).forward(rng.standard_normal((1, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="num_features: expected a positive int"):
        nn.BatchNorm2d(0)
    with pytest.raises(ValueError, match="momentum"):
        nn.BatchNorm2d(3, momentum=-0.1)


def test_batch_norm_torch_layer_oracle_over_steps(rng):
    """Three training steps then eval, against torch.nn.BatchNorm2d: outputs, running statistics, grads."""
    torch = pytest.importorskip("torch")
    bn, tbn = nn.BatchNorm2d(3, dtype=np.float64), torch.nn.BatchNorm2d(3).double()
    for step in range(3):
        x, dy = rng.standard_normal((4, 3, 3, 3)) + step, rng.standard_normal((4, 3, 3, 3))
        tx = torch.tensor(x, requires_grad=True)
        ty = tbn(tx)
        ty.backward(torch.tensor(dy))
        assert_close(bn.forward(x), ty.detach().numpy(), 1e-10, f"y step {step}")
        assert_close(bn.backward(dy), tx.grad.numpy(), 1e-10, f"dx step {step}")
    sd = bn.state_dict()
    for name, t in tbn.state_dict().items():
        assert_close(np.asarray(sd[name], dtype=np.float64), t.numpy().astype(np.float64), 1e-10, name)
    assert_close(bn.weight.grad, tbn.weight.grad.numpy(), 1e-10, "accumulated dgamma")
    bn.eval(), tbn.eval()
    x = rng.standard_normal((2, 3, 3, 3))
    assert_close(bn.forward(x), tbn(torch.tensor(x)).detach().numpy(), 1e-10, "eval y")


# ============================================================ buffers
def test_buffers_travel_through_state_dict_save_load_and_to(rng, tmp_path):
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 4),
        nn.BatchNorm1d(4),
    )
    x = rng.standard_normal((5, 2, 6, 6)).astype(np.float32)
    model.forward(x)
    model.forward(x * 2)
    sd = model.state_dict()
    assert list(sd) == [
        "0.weight",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "5.weight",
        "5.bias",
        "6.weight",
        "6.bias",
        "6.running_mean",
        "6.running_var",
        "6.num_batches_tracked",
    ]
    assert sd["1.num_batches_tracked"].dtype == np.int64 and int(sd["1.num_batches_tracked"]) == 2
    opt = optim.SGD(model, 0.1)  # the optimizer sees parameters only
    assert sorted(n for g in opt.groups for n in g.names) == sorted(n for n, _ in model.named_parameters())
    assert sum(g.data.size for g in opt.groups) == model.num_parameters()
    path = tmp_path / "bn.npz"
    cnn_gpu.save(model, path)
    loaded = cnn_gpu.load(path)
    for k, v in loaded.state_dict().items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    model.eval(), loaded.eval()
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    fresh = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 4),
        nn.BatchNorm1d(4),
    )
    with pytest.raises(KeyError, match=r"missing \['1.running_mean'\]"):
        fresh.load_state_dict({k: v for k, v in sd.items() if k != "1.running_mean"})
    with pytest.raises(TypeError, match="num_batches_tracked.*expected dtype int64"):
        fresh.load_state_dict({**sd, "1.num_batches_tracked": np.zeros((), np.float32)})
    model.to(dtype=np.float64)
    assert model[1].running_var.dtype == np.float64 and model[1].num_batches_tracked.dtype == np.int64
    assert model.state_dict()["1.running_var"] is model[1].running_var


def test_buffer_registration_rules():
    m = nn.Module()
    m.register_buffer("stat", np.zeros(2))
    with pytest.raises(TypeError, match="stat: expected an array"):
        m.stat = 3
    with pytest.raises(TypeError, match="value: expected a NumPy or CuPy array"):
        m.register_buffer("other", [1, 2])
    m.stat = np.ones(2)
    assert list(m.state_dict()) == ["stat"] and m.parameters() == []


# ============================================================ GELU
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_gradcheck_naive_and_torch(rng, approximate):
    x = rng.standard_normal((3, 4, 5)) * 3
    gradcheck(lambda x: F.gelu_forward(x, approximate), F.gelu_backward, [x], tol=1e-7)
    y, _ = F.gelu_forward(x, approximate)
    assert_close(y, gelu_naive(x, approximate), 1e-13, "naive")
    y32, c32 = F.gelu_forward(x.astype(np.float32), approximate)
    assert y32.dtype == np.float32 and F.gelu_backward(np.ones_like(y32), c32).dtype == np.float32
    assert_close(y32, y, 1e-6, "float32")
    torch = pytest.importorskip("torch")
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.gelu(tx, approximate=approximate)
    dy = rng.standard_normal(x.shape)
    ty.backward(torch.tensor(dy))
    assert_close(y, ty.detach().numpy(), 1e-13, "torch y")
    assert_close(F.gelu_backward(dy, F.gelu_forward(x, approximate)[1]), tx.grad.numpy(), 1e-12, "torch dx")


def test_gelu_layer_and_bad_input(rng):
    g = nn.GELU("tanh")
    assert g.config() == {"approximate": "tanh"}
    x = rng.standard_normal((2, 3)).astype(np.float32)
    assert g.forward(x).dtype == np.float32 and g.backward(np.ones_like(x)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"approximate: expected one of \('none', 'tanh'\), got 'erf'"):
        nn.GELU("erf")
    with pytest.raises(ValueError, match="approximate"):
        F.gelu_forward(x, approximate=None)


# ============================================================ adaptive average pooling
ADAPTIVE_CASES = [
    ((2, 3, 7, 5), (3, 2)),
    ((1, 2, 4, 4), (1, 1)),
    ((2, 1, 5, 6), (5, 6)),
    ((1, 2, 3, 3), (4, 5)),
    ((2, 2, 10, 7), 3),
]


@pytest.mark.parametrize("shape,out", ADAPTIVE_CASES)
def test_adaptive_avg_pool2d(rng, shape, out):
    x = rng.standard_normal(shape)
    OH, OW = (out, out) if isinstance(out, int) else out
    gradcheck(lambda x: F.adaptive_avg_pool2d_forward(x, out), F.adaptive_avg_pool2d_backward, [x], tol=1e-7)
    y, _ = F.adaptive_avg_pool2d_forward(x, out)
    assert_close(y, adaptive_naive(x, OH, OW), 1e-13, "naive")
    torch = pytest.importorskip("torch")
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.adaptive_avg_pool2d(tx, out)
    dy = rng.standard_normal(ty.shape)
    ty.backward(torch.tensor(dy))
    assert_close(y, ty.detach().numpy(), 1e-13, "torch y")
    assert_close(F.adaptive_avg_pool2d_backward(dy, F.adaptive_avg_pool2d_forward(x, out)[1]), tx.grad.numpy(), 1e-13, "torch dx")


def test_global_pooling_and_bad_input(rng):
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    y = net.forward(x)
    assert y.shape == (3, 4) and y.dtype == np.float32
    assert_close(y, x.mean(axis=(2, 3)), 1e-6, "global average")
    with pytest.raises(ValueError, match="output_size: expected values >= 1"):
        nn.AdaptiveAvgPool2d(0)
    with pytest.raises(ValueError, match="x: expected a 4-D array"):
        F.adaptive_avg_pool2d_forward(x[0], 1)
    _, cache = F.adaptive_avg_pool2d_forward(x, (2, 3))
    with pytest.raises(ValueError, match=r"dy: expected shape \(3, 4, 2, 3\)"):
        F.adaptive_avg_pool2d_backward(np.ones((3, 4, 3, 2), np.float32), cache)


# ============================================================ Residual
def _block(shortcut=True):
    g = np.random.default_rng(3)
    body = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False, dtype=np.float64, generator=g),
        nn.BatchNorm2d(3, dtype=np.float64),
        nn.GELU(),
        nn.Conv2d(3, 3, 3, padding=1, dtype=np.float64, generator=g),
    )
    sc = nn.Sequential(nn.Conv2d(2, 3, 1, stride=2, dtype=np.float64, generator=g)) if shortcut else None
    return nn.Residual(body, sc)


def test_residual_gradcheck_and_names(rng):
    block = _block()
    assert [n for n, _ in block.named_parameters()][:3] == ["body.0.weight", "body.1.weight", "body.1.bias"]
    assert [n for n, _ in block.named_parameters()][-2:] == ["shortcut.0.weight", "shortcut.0.bias"]
    x = rng.standard_normal((3, 2, 5, 5))
    R = rng.standard_normal((3, 3, 3, 3))
    block.zero_grad()
    y = block.forward(x)
    assert_close(y, block.body.forward(x) + block.shortcut.forward(x), 1e-14, "y = body(x) + shortcut(x)")
    block.forward(x)
    dx = block.backward(R)
    params = block.parameters()

    def loss():
        return float((block.forward(x) * R).sum())

    from helpers import numerical_grad

    assert_close(dx, numerical_grad(loss, x), 1e-6, "dx")
    for name, p in block.named_parameters():
        assert_close(p.grad, numerical_grad(loss, p.data), 1e-6, name)
    assert len(params) == 7
    block.forward(x)
    assert block.backward(R, input_grad=False) is None


@pytest.mark.parametrize("activation", [None, "relu"])
def test_add_gradcheck_and_the_fused_residual_relu(rng, activation):
    """F.add_forward / add_backward (float64, finite differences; the ReLU's kink avoided); a
    Residual run with activation="relu" equals relu(Residual(x)), gradients included."""
    a, b = rng.standard_normal((3, 2, 4, 4)), rng.standard_normal((3, 2, 4, 4))
    a[np.abs(a + b) < 1e-3] += 0.1
    gradcheck(lambda u, v: F.add_forward(u, v, activation), lambda dy, c: (F.add_backward(dy, c),) * 2, [a, b], tol=1e-7)
    block = _block()
    x, R = rng.standard_normal((3, 2, 5, 5)), rng.standard_normal((3, 3, 3, 3))
    fused = block.forward(x, activation="relu")
    dx_fused = block.backward(R)
    grads_fused = [p.grad.copy() for p in block.parameters()]
    block.zero_grad()
    plain = block.forward(x)
    relu = nn.ReLU()
    assert_close(fused, relu.forward(plain), 1e-15, "relu(y)")
    assert_close(dx_fused, block.backward(relu.backward(R)), 1e-15, "dx")
    for g1, p in zip(grads_fused, block.parameters()):
        assert_close(g1, p.grad, 1e-15, "parameter gradient")


def test_identity_residual_splits_the_gradient(rng):
    body = nn.Sequential(nn.Linear(4, 4, dtype=np.float64), nn.Tanh())
    res = nn.Residual(body)
    x, dy = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    res.forward(x)
    body.forward(x)
    want = body.backward(dy) + dy
    assert_close(res.backward(dy), want, 1e-14, "dx = dbody + dy")
    with pytest.raises(ValueError, match=r"Residual: the body's output \(3, 2\) and the shortcut's \(3, 4\) differ"):
        nn.Residual(nn.Linear(4, 2)).forward(x.astype(np.float32))
    with pytest.raises(TypeError, match="body: expected a Module"):
        nn.Residual(lambda v: v)


# ============================================================ the ResNets
def test_resnet20_shape_and_parameter_count(rng):
    model = models.resnet20()
    assert model.num_parameters() == 272_474  # He et al.: 0.27 M (with 1x1 conv + BN projections)
    assert models.MODELS["resnet20"][1] == (3, 32, 32)
    convs = [m for _, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len([c for c in convs if c.kernel_size == (3, 3)]) + 1 == 20  # 19 conv3x3 + the FC: 20 weighted layers
    assert len([c for c in convs if c.kernel_size == (1, 1)]) == 2
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert model.forward(x).shape == (2, 10)
    assert models.resnet(8, num_classes=5).forward(x).shape == (2, 5)
    assert models.resnet(32).num_parameters() > model.num_parameters()
    for bad in (19, 2, 20.0, True):
        with pytest.raises(ValueError, match="depth: expected 6n \\+ 2"):
            models.resnet(bad)


def _bn_objects(seed=1):
    cnn_gpu.manual_seed(seed)
    g = np.random.default_rng(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False, generator=g),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False, generator=g), nn.BatchNorm2d(4), nn.GELU())),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 10, generator=g),
    )
    opt = optim.SGD(model, 0.05, momentum=0.9, nesterov=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    return model, opt, DataLoader(x, y, 8, shuffle=True, seed=4), (x, y)


def test_bitwise_resume_with_batch_norm(tmp_path):
    path = tmp_path / "ck.npz"
    model, opt, loader, _ = _bn_objects()
    fit(model, opt, loader, 2)
    ck.save_checkpoint(path, model, opt, position=Position(2), loader=loader)
    c = ck.load_checkpoint(path)
    assert {"model/1.running_mean", "model/1.running_var", "model/1.num_batches_tracked"} <= set(c.arrays)
    m2, o2, l2, _ = _bn_objects(seed=7)
    pos = ck.restore(c, m2, o2, loader=l2)
    assert int(m2[1].num_batches_tracked) == 10
    fit(m2, o2, l2, 4, position=pos)
    fit(model, opt, loader, 4, position=Position(2))
    assert int(model[1].num_batches_tracked) == 20
    for (name, a), b in zip(model.state_dict().items(), m2.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    built = c.build_model()
    assert isinstance(built[3], nn.Residual) and built[3].shortcut is None


def test_evaluate_runs_in_eval_mode_and_keeps_the_running_stats():
    model, opt, loader, (x, y) = _bn_objects()
    fit(model, opt, loader, 1)
    before = {k: np.array(v, copy=True) for k, v in model.state_dict().items()}
    evaluate(model, x, y, batch_size=1)  # batches of one: fine in eval mode
    assert model.training
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


# ============================================================ the CPU engine's BatchNorm on channels-last memory
@pytest.mark.parametrize("training", [True, False])
def test_cpu_batch_norm_channels_last_and_float32_accuracy(rng, training):
    """Channels-last in, channels-last out (two row blocks and a remainder: M = 2*97*89 rows of 16,
    M % 8 = 2), the values of the float64 reference to float32 accuracy even with a mean 100
    standard deviations from zero, and the same bits whatever the thread count."""
    from cnn_gpu.cpu import norm
    from cnn_gpu.cpu.layout import is_channels_last, to_channels_last

    x64 = rng.standard_normal((2, 16, 97, 89)) * 0.5 + 50.0
    assert len(norm._Rows(2 * 97 * 89, 16, np.float32).blocks) == 2
    x = to_channels_last(x64.astype(np.float32))
    gamma, beta = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    rm, rv = np.full(16, 50, np.float32), np.full(16, 0.3, np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)  # NCHW: the engine takes it into x's layout
    with cnn_gpu.config.override(engine="cpu"):
        y, cache = F.batch_norm_forward(x, gamma, beta, rm.copy(), rv.copy(), training)
        dx, dg, db = F.batch_norm_backward(dy, cache)
    assert cache.engine == "cpu" and is_channels_last(y) and is_channels_last(dx) and y.dtype == np.float32
    f64 = [a.astype(np.float64) for a in (gamma, beta, rm, rv)]
    y_ref, c_ref = F.batch_norm_forward(x64, f64[0], f64[1], f64[2], f64[3], training)
    want = F.batch_norm_backward(dy.astype(np.float64), c_ref)
    assert_close(y, y_ref, 2e-5, "y")
    for got, ref, what in zip((dx, dg, db), want, ("dx", "dgamma", "dbeta")):
        assert_close(got, ref, 2e-5, what)
    with cnn_gpu.config.override(engine="cpu", threads=1):
        y1, cache1 = F.batch_norm_forward(x, gamma, beta, rm.copy(), rv.copy(), training)
        for a, b, what in zip((y1,) + F.batch_norm_backward(dy, cache1), (y, dx, dg, db), ("y", "dx", "dg", "db")):
            np.testing.assert_array_equal(a, b, err_msg=f"{what}: 1 thread against {cnn_gpu.cpu.parallel.threads()}")


@pytest.mark.parametrize("out", [1, (2, 3)])
def test_cpu_adaptive_pool_gradient_keeps_the_input_layout(rng, out):
    from cnn_gpu.cpu.layout import is_channels_last, to_channels_last

    x = to_channels_last(rng.standard_normal((3, 5, 7, 6)))
    with cnn_gpu.config.override(engine="cpu"):
        y, cache = F.adaptive_avg_pool2d_forward(x, out)
        dy = rng.standard_normal(y.shape)
        dx = F.adaptive_avg_pool2d_backward(dy, cache)
    assert cache.engine == "cpu" and is_channels_last(dx) and not dx.flags.c_contiguous
    y_ref, c_ref = F.adaptive_avg_pool2d_forward(np.ascontiguousarray(x), out)
    assert_close(y, y_ref, 1e-14, "y")
    assert_close(dx, F.adaptive_avg_pool2d_backward(dy, c_ref), 1e-14, "dx")


def test_resnet_save_load_round_trip(rng, tmp_path):
    model = models.resnet(8, num_classes=4, generator=1)
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    model.forward(x)  # one training step's statistics in the buffers
    cnn_gpu.save(model, tmp_path / "r8.npz")
    loaded = cnn_gpu.load(tmp_path / "r8.npz")
    assert isinstance(loaded.features[3], nn.Residual) and loaded.features[3].shortcut is None
    assert isinstance(loaded.features[5].shortcut, nn.Sequential)
    assert list(loaded.state_dict()) == list(model.state_dict())
    model.eval(), loaded.eval()
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))


# ------------------------------------------------------------------ the CIFAR-10 recipe
def test_cifar10_recipe_is_resnet20_sgd_nesterov_smoothing_augmentation():
    from cnn_gpu import runs  # noqa: PLC0415

    cfg = runs.TrainConfig(dataset="cifar10", backend="numpy").resolved()
    assert (cfg.model, cfg.optimizer, cfg.nesterov, cfg.schedule) == ("resnet20", "sgd", True, "onecycle")
    assert (cfg.augment, cfg.label_smoothing, cfg.lr, cfg.weight_decay) == ("crop-flip", 0.1, 0.1, 5e-4)
    same = runs.TrainConfig(dataset="cifar10", model="resnet20", backend="numpy").resolved()
    assert same == cfg
    vgg = runs.TrainConfig(dataset="cifar10", model="vgg_small", backend="numpy").resolved()
    assert (vgg.optimizer, vgg.lr, vgg.nesterov, vgg.augment) == ("adam", 2e-3, False, "crop-flip")
    flags = runs.TrainConfig(dataset="cifar10", model="vgg_small", optimizer="sgd", lr=0.02, backend="numpy").resolved()
    assert (flags.optimizer, flags.lr) == ("sgd", 0.02)  # the flags still win over both recipes


def test_cifar10_resnet20_recipe_trains_from_the_command_line(tmp_path, monkeypatch):
    """`cnn-gpu train --dataset cifar10 --model resnet20` end to end on a small CIFAR-shaped set
    (the real files are not downloaded in the tests): the recipe's settings are recorded, the
    BatchNorm statistics are saved with the model, and the loss falls on a learnable task."""
    import json  # noqa: PLC0415

    from cnn_gpu import cli  # noqa: PLC0415
    from cnn_gpu.data import datasets  # noqa: PLC0415

    rng = np.random.default_rng(0)

    def fake(n):  # class k: a bright k-th band of rows in channel k % 3, on noise
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 90, (n, 3, 32, 32)).astype(np.uint8)
        for i, k in enumerate(y):
            x[i, k % 3, 3 * k : 3 * k + 3] = 250
        return x, y.astype(np.int64)

    train, test = fake(192), fake(64)
    monkeypatch.setattr(datasets, "load_cifar10", lambda root=None, download=True: (train, test))
    run = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--dataset",
            "cifar10",
            "--model",
            "resnet20",
            "--epochs",
            "3",
            "--batch-size",
            "32",
            "--run-dir",
            str(run),
            "--progress",
            "none",
            "--backend",
            "numpy",
        ]
    )
    assert code == 0
    saved = json.loads((run / "config.json").read_text())
    settings = saved["config"]
    for key, want in dict(
        model="resnet20", optimizer="sgd", nesterov=True, augment="crop-flip", label_smoothing=0.1, schedule="onecycle"
    ).items():
        assert settings[key] == want, key
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    model = cnn_gpu.load(run / "last.npz")
    assert int(model.state_dict()["features.1.num_batches_tracked"]) == 3 * 6
