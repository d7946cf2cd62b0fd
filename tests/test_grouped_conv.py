"""Grouped and depthwise convolution: F.conv2d_forward(..., groups) and nn.Conv2d(..., groups=).

Float64 gradient checks (reference engine and the CUDA engine under the emulation), a naive
loop reference (tests/helpers conv2d_ref on each group's channels and filters), PyTorch as an
optional oracle, the CUDA engine's depthwise kernels (kernels/depthwise.cu) driven directly with
tiny grids, the launches a grouped step makes, the layer (config, save/load) and bad input.
Every engine against the reference: tests/test_engines.py (test_grouped_conv2d).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close, conv2d_backward_ref, conv2d_ref, gradcheck, tol_for

import cnn_gpu
import cnn_gpu.functional as F
from cnn_gpu import nn
from cnn_gpu.backend import to_numpy
from cnn_gpu.cuda import ops
from cnn_gpu.functional import reference as R
from cnn_gpu.functional.geometry import conv_geometry

# x shape, F, kernel, stride, padding, dilation, groups
CASES = [
    ((2, 4, 5, 5), 6, 3, 1, 1, 1, 2),
    ((2, 3, 6, 5), 6, (3, 2), (2, 1), (1, 0), (1, 2), 3),  # depthwise with 2 filters per channel
    ((1, 4, 5, 6), 4, 3, 2, 2, 1, 4),  # depthwise, padding wider than half the kernel
    ((2, 6, 4, 4), 3, 1, 1, 0, 1, 3),  # 1x1, one filter per group of two channels
    ((2, 8, 5, 6), 6, 3, (2, 1), 1, 1, 2),  # 4 channels per group: the cpu engine's group-by-group path
]


def grouped_ref(x, w, b, stride, padding, dilation, G):
    """Each group's channels convolved with its filters by the naive loops, outputs concatenated."""
    Cg, Fg = x.shape[1] // G, w.shape[0] // G
    ys = [
        conv2d_ref(
            x[:, gi * Cg : (gi + 1) * Cg],
            w[gi * Fg : (gi + 1) * Fg],
            None if b is None else b[gi * Fg : (gi + 1) * Fg],
            stride,
            padding,
            dilation,
        )
        for gi in range(G)
    ]
    return np.concatenate(ys, axis=1)


def grouped_backward_ref(dy, x, w, stride, padding, dilation, G):
    Cg, Fg = x.shape[1] // G, w.shape[0] // G
    parts = [
        conv2d_backward_ref(
            dy[:, gi * Fg : (gi + 1) * Fg], x[:, gi * Cg : (gi + 1) * Cg], w[gi * Fg : (gi + 1) * Fg], stride, padding, dilation
        )
        for gi in range(G)
    ]
    return tuple(np.concatenate([p[i] for p in parts], axis=1 if i == 0 else 0) for i in range(3))


def make(rng, case, dtype=np.float64):
    shape, Fo, k, s, p, d, G = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((Fo, shape[1] // G, kh, kw)).astype(dtype)
    return x, w, rng.standard_normal(Fo).astype(dtype), (s, p, d, G)


@pytest.mark.parametrize("case", CASES)
def test_grouped_conv_gradcheck(xp, rng, case):
    x, w, b, (s, p, d, G) = make(rng, case)

    def fwd(x_, w_, b_):
        return F.conv2d_forward(x_, w_, b_, s, p, d, G)

    gradcheck(fwd, F.conv2d_backward, [xp.asarray(x), xp.asarray(w), xp.asarray(b)], tol=1e-6)


def test_cpu_engine_runs_wide_groups_group_by_group(rng):
    x, w, b, (s, p, d, G) = make(rng, CASES[-1])
    with cnn_gpu.config.override(engine="cpu"):
        y, cache = F.conv2d_forward(x, w, b, s, p, d, G, activation="relu")
        assert cache.engine == "cpu" and len(cache.aux.caches) == G
        x2, w2, b2, (s2, p2, d2, G2) = make(rng, CASES[0])  # 2 channels per group: the reference
        assert F.conv2d_forward(x2, w2, b2, s2, p2, d2, G2)[1].engine == "reference"
        x3, w3, b3, (s3, p3, d3, G3) = make(rng, CASES[1])  # depthwise: the cpu engine's direct path
        y3, cache3 = F.conv2d_forward(x3, w3, b3, s3, p3, d3, G3)
        assert cache3.engine == "cpu" and type(cache3.aux).__name__ == "DepthwiseAux"
        assert_close(y3, grouped_ref(x3, w3, b3, s3, p3, d3, G3), 1e-12, "depthwise y")
    y_ref = grouped_ref(x, w, b, s, p, d, G)
    assert_close(y, np.maximum(y_ref, 0), 1e-12, "y")


@pytest.mark.parametrize("case", CASES)
def test_emul_grouped_conv_gradcheck_on_the_cuda_engine(cuda_emulation, rng, case):
    x, w, b, (s, p, d, G) = make(rng, case)

    def fwd(x_, w_, b_):
        y, cache = F.conv2d_forward(x_, w_, b_, s, p, d, G, activation="relu")
        assert cache.engine == "cuda"
        return y, cache

    gradcheck(fwd, F.conv2d_backward, [x, w, b], tol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES)
def test_grouped_conv_matches_the_naive_loops(xp, rng, case, dtype):
    x, w, b, (s, p, d, G) = make(rng, case, dtype)
    y, cache = F.conv2d_forward(xp.asarray(x), xp.asarray(w), xp.asarray(b), s, p, d, G)
    assert y.dtype == dtype
    assert_close(to_numpy(y), grouped_ref(x, w, b, s, p, d, G), tol_for(dtype), "y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    got = F.conv2d_backward(xp.asarray(dy), cache)
    for g, r, what in zip(got, grouped_backward_ref(dy, x, w, s, p, d, G), ("dx", "dw", "db")):
        assert g.dtype == dtype
        assert_close(to_numpy(g), r, tol_for(dtype), what)


@pytest.mark.parametrize("case", CASES)
def test_grouped_conv_torch_oracle(rng, case):
    torch = pytest.importorskip("torch")
    x, w, b, (s, p, d, G) = make(rng, case)
    layer = nn.Conv2d(x.shape[1], w.shape[0], w.shape[2:], s, p, d, dtype=np.float64, groups=G)
    layer.load_state_dict({"weight": w, "bias": b})
    tx = torch.tensor(x, requires_grad=True)
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, tb, s, p, d, G)
    dy = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(dy))
    y = layer.forward(x)
    dx = layer.backward(dy)
    assert_close(y, ty.detach().numpy(), 1e-12, "y vs torch")
    assert_close(dx, tx.grad.numpy(), 1e-12, "dx vs torch")
    assert_close(layer.weight.grad, tw.grad.numpy(), 1e-12, "dw vs torch")
    assert_close(layer.bias.grad, tb.grad.numpy(), 1e-12, "db vs torch")


# ------------------------------------------------------------------ the depthwise kernels, directly
@pytest.mark.parametrize("launch", [None, (1, 32), (3, 64)], ids=["default", "g1b32", "g3b64"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", [c for c in CASES if c[-1] == c[0][1]])
def test_emul_depthwise_kernels(cuda_emulation, rng, case, dtype, launch):
    x, w, b, (s, p, d, G) = make(rng, case, dtype)
    g = conv_geometry(x.shape, w.shape[0], w.shape[2:], s, p, d, G)
    kw = {} if launch is None else {"grid": launch[0], "block": launch[1]}
    y_ref, cache_ref = R.conv2d_forward(x, w, b, g, "relu")
    y = ops.depthwise_conv2d_forward(x, w, b, g, "relu", **kw)
    assert_close(y, y_ref, tol_for(dtype), "y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    cache = cache_ref._replace(engine="cuda", y=y, aux=None)
    want = R.conv2d_backward(dy, cache_ref)
    for got_, want_, what in zip(ops.depthwise_conv2d_backward(dy, cache, **kw), want, ("dx", "dw", "db")):
        assert got_.dtype == dtype
        assert_close(got_, want_, tol_for(dtype), what)
    # without bias or ReLU the kernels read dy itself
    cache = cache_ref._replace(engine="cuda", has_bias=False, activation=None, y=None, aux=None)
    dx, dw, db = ops.depthwise_conv2d_backward(dy, cache, input_grad=False, **kw)
    assert dx is None and db is None
    assert_close(dw, R.conv2d_backward(dy, cache_ref._replace(activation=None, y=None))[1], tol_for(dtype), "dw")
    # accumulate_into: the kernels add dw and db into the given arrays (Parameter.grad)
    acc = (np.ones_like(w), np.full(b.shape, 2, dtype))
    cache = cache_ref._replace(engine="cuda", y=y, aux=None)
    dx, dw, db = ops.depthwise_conv2d_backward(dy, cache, accumulate_into=acc, **kw)
    assert dw is acc[0] and db is acc[1]
    assert_close(dw, 1 + want[1], tol_for(dtype), "dw added into ones")
    assert_close(db, 2 + want[2], tol_for(dtype), "db added into twos")


def test_emul_depthwise_runs_direct_kernels_and_groups_run_gemms(cuda_emulation, rng):
    """Depthwise: the depthwise kernels and the epilogue only (no columns, no Python loop over
    channels); general groups: im2col, batched GEMMs, col2im."""

    def kernels(case):
        x, w, b, (s, p, d, G) = make(rng, case)
        start = len(cuda_emulation.log)
        y, cache = F.conv2d_forward(x, w, b, s, p, d, G, activation="relu")
        F.conv2d_backward(np.ones_like(y), cache)
        return {e[0].rsplit("_f", 1)[0] for e in cuda_emulation.log[start:]}, len(cuda_emulation.log) - start

    names, count = kernels(((2, 8, 6, 6), 8, 3, 1, 1, 1, 8))
    assert (
        names == {"depthwise_conv_forward", "act_backward_bias_grad", "depthwise_conv_weight_grad", "depthwise_conv_input_grad"}
        and count == 4
    ), names
    names, _ = kernels(CASES[0])
    assert {"im2col_cm", "col2im_cm"} <= names and not any(n.startswith("depthwise") for n in names), names


# ------------------------------------------------------------------ the layer and bad input
def test_conv2d_layer_groups_config_and_save_load(tmp_path, rng):
    layer = nn.Conv2d(6, 9, 3, padding=1, groups=3)
    assert layer.weight.shape == (9, 2, 3, 3) and layer.groups == 3 and layer.config()["groups"] == 3
    assert "groups" not in nn.Conv2d(6, 9, 3).config()  # groups=1: the config of before
    model = nn.Sequential(layer, nn.ReLU(), nn.Conv2d(9, 9, 3, groups=9), nn.Flatten())
    x = rng.standard_normal((2, 6, 5, 5)).astype(np.float32)
    path = tmp_path / "m.npz"
    cnn_gpu.save(model, path)
    loaded = cnn_gpu.load(path)
    assert loaded[2].groups == 9 and loaded[2].weight.shape == (9, 1, 3, 3)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))


def test_groups_that_do_not_divide_the_channels():
    with pytest.raises(ValueError, match=r"groups: expected a divisor of in_channels \(6\) and out_channels \(8\), got 4"):
        nn.Conv2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match="groups: expected a positive int, got 0"):
        nn.Conv2d(6, 6, 3, groups=0)
    x, w = np.zeros((1, 6, 5, 5)), np.zeros((8, 1, 3, 3))
    with pytest.raises(ValueError, match="groups: expected a divisor of the 6 input and 8 output channels, got 4"):
        F.conv2d_forward(x, w, None, groups=4)
    with pytest.raises(ValueError, match="w"):  # weights of the wrong group width
        F.conv2d_forward(x, np.zeros((6, 2, 3, 3)), None, groups=6)


def test_models_command_describes_groups():
    from cnn_gpu import cli

    assert cli._describe_layer(nn.Conv2d(8, 16, 3, padding=1, groups=8)) == "Conv2d 8->16 3x3 pad 1 groups 8"
    assert "groups" not in cli._describe_layer(nn.Conv2d(8, 16, 3))
