"""cnn_gpu.functional: every backward against central finite differences (float64),
forward and backward against naive loop references and against PyTorch, im2col/col2im
adjointness, max-pool ties, a stable cross-entropy, and dtype preservation.

Every test runs on NumPy and, with a GPU, on CuPy (the ``xp`` fixture)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import (
    assert_close,
    avg_pool2d_backward_ref,
    avg_pool2d_ref,
    away_from_zero,
    conv2d_backward_ref,
    conv2d_ref,
    cross_entropy_ref,
    distinct_values,
    gradcheck,
    im2col_ref,
    leaky_relu_grad_ref,
    leaky_relu_ref,
    linear_backward_ref,
    linear_ref,
    log_softmax_ref,
    max_pool2d_backward_ref,
    max_pool2d_ref,
    relu_grad_ref,
    relu_ref,
    sigmoid_grad_ref,
    sigmoid_ref,
    tanh_grad_ref,
    tanh_ref,
    tol_for,
)

import cnn_gpu
import cnn_gpu.functional as F
from cnn_gpu.backend import to_numpy

GRAD_TOL = 1e-6
DTYPES = [np.float64, np.float32]

# N, C, H, W, F, (KH, KW), stride, padding, dilation, bias
CONV_CASES = [
    (1, 1, 5, 5, 1, (3, 3), 1, 0, 1, True),
    (2, 3, 7, 6, 2, (3, 2), 1, 1, 1, True),
    (2, 2, 7, 7, 3, (3, 3), 2, 1, 1, False),
    (1, 2, 9, 8, 2, (2, 3), 3, 2, 1, True),
    (2, 2, 8, 9, 2, (3, 3), 1, 2, 2, True),
    (1, 3, 9, 7, 2, (2, 2), (2, 1), (0, 1), (2, 1), False),
    (2, 1, 6, 5, 2, (1, 1), 1, 0, 1, True),
    (1, 2, 5, 7, 3, (5, 3), (1, 3), (2, 0), 1, True),
    (2, 2, 10, 11, 2, (3, 3), 3, 1, 2, True),
    (2, 2, 6, 6, 2, (2, 4), 2, 2, (1, 2), False),
]


def _id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


CONV_IDS = [
    f"n{c[0]}c{c[1]}h{c[2]}w{c[3]}f{c[4]}k{_id(c[5])}s{_id(c[6])}p{_id(c[7])}d{_id(c[8])}{'b' if c[9] else 'nob'}"
    for c in CONV_CASES
]

# N, C, H, W, kernel, stride, padding   (overlapping and not, with and without padding)
POOL_CASES = [
    (2, 2, 6, 6, 2, 2, 0),
    (1, 2, 7, 7, 3, 2, 1),
    (2, 1, 7, 6, 3, 1, 1),
    (1, 2, 8, 7, (3, 2), (2, 1), (1, 1)),
    (2, 2, 5, 5, 2, None, 1),
    (1, 1, 9, 9, 4, 3, 2),
    (1, 2, 7, 5, (2, 3), (3, 2), (1, 0)),
]
POOL_IDS = [f"n{c[0]}c{c[1]}h{c[2]}w{c[3]}k{_id(c[4])}s{_id(c[5])}p{_id(c[6])}" for c in POOL_CASES]


def arr(xp, a, dtype=np.float64):
    return xp.asarray(np.ascontiguousarray(a, dtype=dtype))


def conv_inputs(case, rng):
    N, C, H, W, Fo, (KH, KW), *_rest, bias = case
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((Fo, C, KH, KW))
    b = rng.standard_normal(Fo) if bias else None
    return x, w, b


def conv_geom(case):
    return dict(stride=case[6], padding=case[7], dilation=case[8])


# ---------------------------------------------------------------------------------------
# gradient checks: central finite differences in float64
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv2d_gradcheck(xp, rng, case):
    x, w, b = conv_inputs(case, rng)
    g = conv_geom(case)
    inputs = [arr(xp, x), arr(xp, w)] + ([arr(xp, b)] if b is not None else [])

    def fwd(*a):
        return F.conv2d_forward(a[0], a[1], a[2] if len(a) > 2 else None, **g)

    def bwd(dy, cache):
        dx, dw, db = F.conv2d_backward(dy, cache)
        assert (db is None) == (b is None)
        return (dx, dw, db) if b is not None else (dx, dw)

    gradcheck(fwd, bwd, inputs, tol=GRAD_TOL)


@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_max_pool2d_gradcheck(xp, rng, case):
    N, C, H, W, k, s, p = case
    x = arr(xp, distinct_values(rng, (N, C, H, W)))  # no ties, values 1e-2 apart >> eps
    gradcheck(lambda a: F.max_pool2d_forward(a, k, s, p), F.max_pool2d_backward, [x], tol=GRAD_TOL)


@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_avg_pool2d_gradcheck(xp, rng, case):
    N, C, H, W, k, s, p = case
    x = arr(xp, rng.standard_normal((N, C, H, W)))
    gradcheck(lambda a: F.avg_pool2d_forward(a, k, s, p), F.avg_pool2d_backward, [x], tol=GRAD_TOL)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradcheck(xp, rng, bias):
    x, w = arr(xp, rng.standard_normal((3, 5))), arr(xp, rng.standard_normal((4, 5)))
    inputs = [x, w] + ([arr(xp, rng.standard_normal(4))] if bias else [])

    def bwd(dy, cache):
        dx, dw, db = F.linear_backward(dy, cache)
        return (dx, dw, db) if bias else (dx, dw)

    gradcheck(lambda *a: F.linear_forward(*a), bwd, inputs, tol=GRAD_TOL)


ACTIVATIONS = {
    "relu": (F.relu_forward, F.relu_backward),
    "leaky_relu": (lambda x: F.leaky_relu_forward(x, 0.1), F.leaky_relu_backward),
    "sigmoid": (F.sigmoid_forward, F.sigmoid_backward),
    "tanh": (F.tanh_forward, F.tanh_backward),
    "flatten": (F.flatten_forward, F.flatten_backward),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_gradcheck(xp, rng, name):
    fwd, bwd = ACTIVATIONS[name]
    x = arr(xp, 2 * away_from_zero(rng, (2, 3, 2, 3)))  # no input within eps of a kink
    gradcheck(fwd, bwd, [x], tol=GRAD_TOL)


def test_dropout_gradcheck_fixed_mask(xp, rng):
    x = arr(xp, rng.standard_normal((4, 3, 5)))

    def fwd(a):
        return F.dropout_forward(a, 0.4, True, xp.random.default_rng(7))  # the same mask every call

    _, cache = fwd(x)
    mask = to_numpy(cache.mask)
    assert set(np.unique(mask).tolist()) == {0.0, 1.0 / (1.0 - 0.4)}, "mask holds 0 and 1/(1-p) only"
    assert 0 < (mask == 0).sum() < mask.size
    gradcheck(fwd, F.dropout_backward, [x], tol=GRAD_TOL)


@pytest.mark.parametrize("labels_kind", ["int", "onehot", "soft"])
def test_softmax_cross_entropy_gradcheck(xp, rng, labels_kind):
    N, K = 5, 4
    z = arr(xp, 3 * rng.standard_normal((N, K)))
    idx = rng.integers(0, K, N)
    if labels_kind == "int":
        labels = xp.asarray(idx)
    elif labels_kind == "onehot":
        labels = arr(xp, np.eye(K)[idx])
    else:
        t = rng.random((N, K))
        labels = arr(xp, t / t.sum(axis=1, keepdims=True))

    def fwd(a):
        loss, dz = F.softmax_cross_entropy(a, labels)
        assert loss.shape == ()
        return loss, dz

    gradcheck(fwd, lambda dloss, dz: dz * dloss, [z], tol=GRAD_TOL)


def test_gradcheck_catches_a_wrong_backward(xp, rng):
    """The checker itself must fail on a subtly wrong gradient (here: tanh's, 0.1% too large)."""
    x = arr(xp, rng.standard_normal((1, 1, 5, 5)))
    with pytest.raises(AssertionError, match="gradcheck relative error"):
        gradcheck(F.tanh_forward, lambda dy, y: dy * (1 - y * y) * 1.001, [x], tol=GRAD_TOL)


# ---------------------------------------------------------------------------------------
# forward and backward against the naive loop references
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv2d_vs_naive(xp, rng, case, dtype):
    x, w, b = conv_inputs(case, rng)
    g = conv_geom(case)
    x, w = x.astype(dtype).astype(np.float64), w.astype(dtype).astype(np.float64)  # the same values in both dtypes
    b = None if b is None else b.astype(dtype).astype(np.float64)
    y, cache = F.conv2d_forward(arr(xp, x, dtype), arr(xp, w, dtype), None if b is None else arr(xp, b, dtype), **g)
    y_ref = conv2d_ref(x, w, b, **g)
    assert y.dtype == dtype
    assert_close(y, y_ref, tol_for(dtype), "y")
    dy = rng.standard_normal(y.shape).astype(dtype).astype(np.float64)
    dx, dw, db = F.conv2d_backward(arr(xp, dy, dtype), cache)
    dx_ref, dw_ref, db_ref = conv2d_backward_ref(dy, x, w, **g)
    assert_close(dx, dx_ref, tol_for(dtype), "dx")
    assert_close(dw, dw_ref, tol_for(dtype), "dw")
    if b is not None:
        assert_close(db, db_ref, tol_for(dtype), "db")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_max_pool2d_vs_naive(xp, rng, case, dtype):
    N, C, H, W, k, s, p = case
    x = distinct_values(rng, (N, C, H, W), gap=1.0)  # exact in float32 too
    y, cache = F.max_pool2d_forward(arr(xp, x, dtype), k, s, p)
    y_ref, arg_ref = max_pool2d_ref(x, k, s, p)
    np.testing.assert_array_equal(to_numpy(y), y_ref)
    np.testing.assert_array_equal(to_numpy(cache.argmax), arg_ref)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = F.max_pool2d_backward(arr(xp, dy, dtype), cache)
    assert dx.dtype == dtype
    assert_close(dx, max_pool2d_backward_ref(dy.astype(np.float64), arg_ref, x.shape), tol_for(dtype), "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_avg_pool2d_vs_naive(xp, rng, case, dtype):
    N, C, H, W, k, s, p = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype).astype(np.float64)
    y, cache = F.avg_pool2d_forward(arr(xp, x, dtype), k, s, p)
    assert_close(y, avg_pool2d_ref(x, k, s, p), tol_for(dtype), "y")
    dy = rng.standard_normal(y.shape).astype(dtype).astype(np.float64)
    dx = F.avg_pool2d_backward(arr(xp, dy, dtype), cache)
    assert_close(dx, avg_pool2d_backward_ref(dy, x.shape, k, s, p), tol_for(dtype), "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_linear_vs_naive(xp, rng, dtype):
    x, w, b = (rng.standard_normal(s).astype(dtype).astype(np.float64) for s in ((4, 7), (3, 7), (3,)))
    y, cache = F.linear_forward(arr(xp, x, dtype), arr(xp, w, dtype), arr(xp, b, dtype))
    assert_close(y, linear_ref(x, w, b), tol_for(dtype), "y")
    dy = rng.standard_normal((4, 3)).astype(dtype).astype(np.float64)
    for got, ref, what in zip(F.linear_backward(arr(xp, dy, dtype), cache), linear_backward_ref(dy, x, w), ["dx", "dw", "db"]):
        assert_close(got, ref, tol_for(dtype), what)


ACT_REFS = {
    "relu": (F.relu_forward, F.relu_backward, relu_ref, relu_grad_ref),
    "leaky_relu": (
        lambda x: F.leaky_relu_forward(x, 0.2),
        F.leaky_relu_backward,
        lambda x: leaky_relu_ref(x, 0.2),
        lambda x: leaky_relu_grad_ref(x, 0.2),
    ),
    "sigmoid": (F.sigmoid_forward, F.sigmoid_backward, sigmoid_ref, sigmoid_grad_ref),
    "tanh": (F.tanh_forward, F.tanh_backward, tanh_ref, tanh_grad_ref),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(ACT_REFS))
def test_activation_vs_naive(xp, rng, name, dtype):
    fwd, bwd, ref, dref = ACT_REFS[name]
    x = (4 * away_from_zero(rng, (3, 4, 5))).astype(dtype).astype(np.float64)
    x[0, 0, :3] = [-40.0, 40.0, -700.0]  # saturated sigmoid/tanh must stay finite
    y, cache = fwd(arr(xp, x, dtype))
    assert y.dtype == dtype and bool(np.isfinite(to_numpy(y)).all())
    assert_close(y, ref(x), tol_for(dtype), "y")
    dy = rng.standard_normal(x.shape).astype(dtype).astype(np.float64)
    dx = bwd(arr(xp, dy, dtype), cache)
    assert_close(dx, dy * dref(x), tol_for(dtype), "dx")


def test_flatten_round_trip(xp, rng):
    x = arr(xp, rng.standard_normal((3, 2, 4, 5)))
    y, shape = F.flatten_forward(x)
    assert y.shape == (3, 40)
    np.testing.assert_array_equal(to_numpy(y)[1], to_numpy(x)[1].ravel())
    np.testing.assert_array_equal(to_numpy(F.flatten_backward(y, shape)), to_numpy(x))


def test_dropout_statistics_and_eval(xp, rng):
    x = arr(xp, np.ones((200, 50)))
    y, cache = F.dropout_forward(x, 0.25, True, xp.random.default_rng(3))
    kept = float((to_numpy(y) != 0).mean())
    assert abs(kept - 0.75) < 0.02
    assert abs(float(to_numpy(y).mean()) - 1.0) < 0.03  # inverted dropout keeps the expectation
    y_eval, cache_eval = F.dropout_forward(x, 0.25, False, None)
    assert y_eval is x and cache_eval.mask is None
    assert F.dropout_backward(x, cache_eval) is x


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("labels_kind", ["int", "onehot"])
def test_softmax_cross_entropy_vs_naive(xp, rng, dtype, labels_kind):
    z = (5 * rng.standard_normal((6, 7))).astype(dtype).astype(np.float64)
    idx = rng.integers(0, 7, 6)
    labels = xp.asarray(idx) if labels_kind == "int" else arr(xp, np.eye(7)[idx], dtype)
    loss, dz = F.softmax_cross_entropy(arr(xp, z, dtype), labels)
    loss_ref, dz_ref = cross_entropy_ref(z, idx)
    assert loss.dtype == dtype and dz.dtype == dtype
    assert abs(float(loss) - loss_ref) / abs(loss_ref) < tol_for(dtype)
    assert_close(dz, dz_ref, tol_for(dtype), "dz")
    assert_close(F.log_softmax(arr(xp, z, dtype)), log_softmax_ref(z), tol_for(dtype), "log_softmax")
    sm = to_numpy(F.softmax(arr(xp, z, dtype)))
    assert_close(sm, np.exp(log_softmax_ref(z)), tol_for(dtype), "softmax")
    np.testing.assert_allclose(sm.sum(axis=1), 1.0, rtol=1e-6 if dtype == np.float32 else 1e-14)


# ---------------------------------------------------------------------------------------
# against PyTorch (CPU), when installed
# ---------------------------------------------------------------------------------------
def _t(torch, a, dtype, grad=False):
    t = torch.tensor(np.asarray(a, dtype=dtype))
    return t.requires_grad_(grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv2d_vs_torch(xp, rng, case, dtype):
    torch = pytest.importorskip("torch")
    x, w, b = conv_inputs(case, rng)
    g = conv_geom(case)
    y, cache = F.conv2d_forward(arr(xp, x, dtype), arr(xp, w, dtype), None if b is None else arr(xp, b, dtype), **g)
    tx, tw = _t(torch, x, dtype, True), _t(torch, w, dtype, True)
    tb = None if b is None else _t(torch, b, dtype, True)
    ty = torch.nn.functional.conv2d(tx, tw, tb, stride=g["stride"], padding=g["padding"], dilation=g["dilation"])
    assert_close(y, ty.detach().numpy(), tol_for(dtype), "y")
    dy = rng.standard_normal(ty.shape).astype(dtype)
    ty.backward(torch.tensor(dy))
    dx, dw, db = F.conv2d_backward(arr(xp, dy, dtype), cache)
    assert dx.dtype == dw.dtype == dtype
    assert_close(dx, tx.grad.numpy(), tol_for(dtype), "dx")
    assert_close(dw, tw.grad.numpy(), tol_for(dtype), "dw")
    if b is not None:
        assert_close(db, tb.grad.numpy(), tol_for(dtype), "db")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_max_pool2d_vs_torch(xp, rng, case, dtype):
    torch = pytest.importorskip("torch")
    N, C, H, W, k, s, p = case
    x = rng.standard_normal((N, C, H, W))
    y, cache = F.max_pool2d_forward(arr(xp, x, dtype), k, s, p)
    tx = _t(torch, x, dtype, True)
    ty, tidx = torch.nn.functional.max_pool2d(tx, k, s if s is not None else k, p, return_indices=True)
    np.testing.assert_array_equal(to_numpy(y), ty.detach().numpy())
    np.testing.assert_array_equal(to_numpy(cache.argmax), tidx.numpy())
    dy = rng.standard_normal(ty.shape).astype(dtype)
    ty.backward(torch.tensor(dy))
    assert_close(F.max_pool2d_backward(arr(xp, dy, dtype), cache), tx.grad.numpy(), tol_for(dtype), "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_avg_pool2d_vs_torch(xp, rng, case, dtype):
    torch = pytest.importorskip("torch")
    N, C, H, W, k, s, p = case
    x = rng.standard_normal((N, C, H, W))
    y, cache = F.avg_pool2d_forward(arr(xp, x, dtype), k, s, p)
    tx = _t(torch, x, dtype, True)
    ty = torch.nn.functional.avg_pool2d(tx, k, s if s is not None else k, p, count_include_pad=True)
    assert_close(y, ty.detach().numpy(), tol_for(dtype), "y")
    dy = rng.standard_normal(ty.shape).astype(dtype)
    ty.backward(torch.tensor(dy))
    assert_close(F.avg_pool2d_backward(arr(xp, dy, dtype), cache), tx.grad.numpy(), tol_for(dtype), "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_linear_vs_torch(xp, rng, dtype):
    torch = pytest.importorskip("torch")
    x, w, b = (rng.standard_normal(s) for s in ((5, 9), (4, 9), (4,)))
    y, cache = F.linear_forward(arr(xp, x, dtype), arr(xp, w, dtype), arr(xp, b, dtype))
    tx, tw, tb = (_t(torch, a, dtype, True) for a in (x, w, b))
    ty = torch.nn.functional.linear(tx, tw, tb)
    assert_close(y, ty.detach().numpy(), tol_for(dtype), "y")
    dy = rng.standard_normal((5, 4)).astype(dtype)
    ty.backward(torch.tensor(dy))
    for got, t, what in zip(F.linear_backward(arr(xp, dy, dtype), cache), (tx, tw, tb), ["dx", "dw", "db"]):
        assert_close(got, t.grad.numpy(), tol_for(dtype), what)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["relu", "leaky_relu", "sigmoid", "tanh"])
def test_activation_vs_torch(xp, rng, name, dtype):
    torch = pytest.importorskip("torch")
    tf = {
        "relu": torch.relu,
        "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.2),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
    }[name]
    fwd, bwd = ACT_REFS[name][:2]
    x = 3 * away_from_zero(rng, (4, 5, 3))
    y, cache = fwd(arr(xp, x, dtype))
    tx = _t(torch, x, dtype, True)
    ty = tf(tx)
    assert_close(y, ty.detach().numpy(), tol_for(dtype), "y")
    dy = rng.standard_normal(x.shape).astype(dtype)
    ty.backward(torch.tensor(dy))
    assert_close(bwd(arr(xp, dy, dtype), cache), tx.grad.numpy(), tol_for(dtype), "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("labels_kind", ["int", "onehot"])
def test_cross_entropy_vs_torch(xp, rng, dtype, labels_kind):
    torch = pytest.importorskip("torch")
    z = 4 * rng.standard_normal((8, 5))
    idx = rng.integers(0, 5, 8)
    labels = xp.asarray(idx) if labels_kind == "int" else arr(xp, np.eye(5)[idx], dtype)
    loss, dz = F.softmax_cross_entropy(arr(xp, z, dtype), labels)
    tz = _t(torch, z, dtype, True)
    target = torch.tensor(idx) if labels_kind == "int" else _t(torch, np.eye(5)[idx], dtype)
    tl = torch.nn.functional.cross_entropy(tz, target)
    tl.backward()
    assert abs(float(loss) - tl.item()) / abs(tl.item()) < tol_for(dtype)
    assert_close(dz, tz.grad.numpy(), tol_for(dtype), "dz")
    assert_close(
        F.log_softmax(arr(xp, z, dtype)), torch.log_softmax(_t(torch, z, dtype), dim=1).numpy(), tol_for(dtype), "log_softmax"
    )


# ---------------------------------------------------------------------------------------
# im2col / col2im
# ---------------------------------------------------------------------------------------
# N, C, H, W, kernel, stride, padding, dilation
IM2COL_CASES = [
    (1, 1, 4, 4, 2, 1, 0, 1),
    (2, 3, 7, 6, (3, 2), 1, 1, 1),
    (2, 2, 8, 8, 3, 2, 1, 1),
    (1, 2, 9, 7, (2, 3), 3, 2, 1),
    (2, 1, 9, 9, 3, 1, 2, 2),
    (1, 3, 10, 8, (3, 3), (2, 3), (1, 2), (2, 1)),
    (2, 2, 5, 5, 5, 1, 0, 1),
    (1, 1, 6, 7, 1, 2, 0, 1),
    (2, 2, 11, 6, (4, 2), (3, 1), (0, 1), (1, 3)),
    (1, 2, 3, 3, 3, 2, 2, 2),
    (3, 1, 12, 12, 2, 2, 0, 3),
    (1, 4, 6, 9, (2, 5), 1, (2, 1), 1),
]
IM2COL_IDS = [f"n{c[0]}c{c[1]}h{c[2]}w{c[3]}k{_id(c[4])}s{_id(c[5])}p{_id(c[6])}d{_id(c[7])}" for c in IM2COL_CASES]


@pytest.mark.parametrize("case", IM2COL_CASES, ids=IM2COL_IDS)
def test_im2col_col2im_adjoint(xp, rng, case):
    N, C, H, W, k, s, p, d = case
    x = arr(xp, rng.standard_normal((N, C, H, W)))
    cols = F.im2col(x, k, s, p, d)
    c = arr(xp, rng.standard_normal(cols.shape))
    back = F.col2im(c, x.shape, k, s, p, d)
    assert back.shape == x.shape
    lhs, rhs = float((cols * c).sum()), float((x * back).sum())
    scale = float((abs(cols) * abs(c)).sum())  # the sum of |terms| on either side
    assert abs(lhs - rhs) <= 1e-12 * scale, (lhs, rhs)


@pytest.mark.parametrize("case", IM2COL_CASES, ids=IM2COL_IDS)
def test_im2col_vs_naive_and_unfold(xp, rng, case):
    N, C, H, W, k, s, p, d = case
    x = rng.standard_normal((N, C, H, W))
    cols = to_numpy(F.im2col(arr(xp, x), k, s, p, d))
    np.testing.assert_array_equal(cols, im2col_ref(x, k, s, p, d))  # a pure gather: exact
    torch = pytest.importorskip("torch")
    ref = torch.nn.functional.unfold(torch.tensor(x), k, dilation=d, padding=p, stride=s).numpy()
    np.testing.assert_array_equal(cols, ref)
    c = rng.standard_normal(cols.shape)
    folded = torch.nn.functional.fold(torch.tensor(c), (H, W), k, dilation=d, padding=p, stride=s).numpy()
    assert_close(F.col2im(arr(xp, c), x.shape, k, s, p, d), folded, 1e-12, "col2im vs fold")


# ---------------------------------------------------------------------------------------
# max-pool ties, softmax stability
# ---------------------------------------------------------------------------------------
def test_max_pool_ties_first_maximum_gets_gradient(xp):
    x = arr(xp, np.full((1, 2, 4, 6), 3.0))
    y, cache = F.max_pool2d_forward(x, 2, 2)
    dx = to_numpy(F.max_pool2d_backward(xp.ones_like(y), cache))
    expected = np.zeros((4, 6))
    expected[::2, ::2] = 1.0  # the top-left (first in row-major order) of each window
    np.testing.assert_array_equal(dx[0, 0], expected)
    np.testing.assert_array_equal(dx[0, 1], expected)
    assert dx.sum() == y.size  # exactly one input per window


@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 1), ((2, 3), (1, 2), (1, 1))])
def test_max_pool_ties_overlapping_padded(xp, rng, k, s, p):
    x = np.full((1, 1, 5, 6), -2.0)  # constant (negative: padding must never win)
    y, cache = F.max_pool2d_forward(arr(xp, x), k, s, p)
    y_ref, arg_ref = max_pool2d_ref(x, k, s, p)
    np.testing.assert_array_equal(to_numpy(y), y_ref)
    np.testing.assert_array_equal(to_numpy(cache.argmax), arg_ref)
    dy = rng.standard_normal(y.shape)
    dx = F.max_pool2d_backward(arr(xp, dy), cache)
    assert_close(dx, max_pool2d_backward_ref(dy, arg_ref, x.shape), 1e-14, "dx")
    # many ties, not all: against torch's indices too
    xt = rng.integers(0, 3, (2, 2, 6, 7)).astype(np.float64)
    _, cache = F.max_pool2d_forward(arr(xp, xt), k, s, p)
    np.testing.assert_array_equal(to_numpy(cache.argmax), max_pool2d_ref(xt, k, s, p)[1])
    torch = pytest.importorskip("torch")
    _, tidx = torch.nn.functional.max_pool2d(torch.tensor(xt), k, s, p, return_indices=True)
    np.testing.assert_array_equal(to_numpy(cache.argmax), tidx.numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_softmax_cross_entropy_stable_for_huge_logits(xp, dtype):
    z = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 1e4 - 2.0], [3e4, -3e4, 2e4]])
    labels = np.array([0, 2, 1])
    # row 0: ~0; row 1: log(1 + e^2) - (-2) ... computed exactly below; row 2: 6e4
    per_row = [
        math.log1p(math.exp(-1e4)) + math.log1p(math.exp(-2e4)),
        2.0 + math.log1p(math.exp(-2.0)),
        6e4 + math.log1p(math.exp(-1e4)),
    ]
    expected = sum(per_row) / 3
    loss, dz = F.softmax_cross_entropy(arr(xp, z, dtype), xp.asarray(labels))
    assert np.isfinite(float(loss)) and bool(np.isfinite(to_numpy(dz)).all())
    assert abs(float(loss) - expected) / expected < tol_for(dtype)
    assert_close(dz, cross_entropy_ref(z, labels)[1], tol_for(dtype), "dz")
    lp = to_numpy(F.log_softmax(arr(xp, z, dtype)))
    assert np.isfinite(lp).all() and lp[2, 1] == pytest.approx(-6e4, rel=1e-6)


# ---------------------------------------------------------------------------------------
# dtype preservation: float32 in, float32 out, for every op
# ---------------------------------------------------------------------------------------
def test_every_op_preserves_float32(xp, rng):
    f32 = np.float32

    def a(*shape):
        return arr(xp, rng.standard_normal(shape), f32)

    x, w, b = a(2, 3, 6, 6), a(4, 3, 3, 3), a(4)
    y, c = F.conv2d_forward(x, w, b, 1, 1)
    outs = {"conv y": y}
    outs.update(zip(["conv dx", "conv dw", "conv db"], F.conv2d_backward(a(*y.shape), c)))
    cols = F.im2col(x, 3, 1, 1)
    outs["im2col"], outs["col2im"] = cols, F.col2im(cols, x.shape, 3, 1, 1)
    y, c = F.max_pool2d_forward(x, 3, 2, 1)
    outs["max y"], outs["max dx"] = y, F.max_pool2d_backward(a(*y.shape), c)
    y, c = F.max_pool2d_forward(x, 2, 2)
    outs["max y nonoverlap"], outs["max dx nonoverlap"] = y, F.max_pool2d_backward(a(*y.shape), c)
    y, c = F.avg_pool2d_forward(x, 3, 2, 1)
    outs["avg y"], outs["avg dx"] = y, F.avg_pool2d_backward(a(*y.shape), c)
    xl, wl, bl = a(5, 7), a(3, 7), a(3)
    y, c = F.linear_forward(xl, wl, bl)
    outs["linear y"] = y
    outs.update(zip(["linear dx", "linear dw", "linear db"], F.linear_backward(a(5, 3), c)))
    for name, (fwd, bwd) in ACTIVATIONS.items():
        y, c = fwd(x)
        outs[name + " y"], outs[name + " dx"] = y, bwd(a(*y.shape), c)
    y, c = F.dropout_forward(x, 0.5, True, xp.random.default_rng(0))
    outs["dropout y"], outs["dropout mask"], outs["dropout dx"] = y, c.mask, F.dropout_backward(a(*x.shape), c)
    z = a(5, 4)
    loss, dz = F.softmax_cross_entropy(z, xp.asarray(np.array([0, 1, 2, 3, 0])))
    outs["ce loss"], outs["ce dz"] = loss, dz
    loss, dz = F.softmax_cross_entropy(z, arr(xp, np.eye(4)[[0, 1, 2, 3, 0]], f32))
    outs["ce onehot loss"], outs["ce onehot dz"] = loss, dz
    outs["softmax"], outs["log_softmax"] = F.softmax(z), F.log_softmax(z)
    assert len(outs) == 35
    wrong = {k: str(v.dtype) for k, v in outs.items() if v.dtype != np.float32}
    assert not wrong, f"upcast outputs: {wrong}"


# ---------------------------------------------------------------------------------------
# max-pool NaN, and every op on channels-last arrays (the layout of nn.Sequential's fast path)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_max_pool_nan_propagates_first_nan_wins(xp, rng, k, s, p):
    x = rng.standard_normal((2, 2, 6, 6))
    x[0, 0, 1, 1] = x[0, 0, 1, 0] = np.nan  # two NaNs in one window: the first (row-major) wins
    x[1, 1, 4, 5] = np.nan
    y, cache = F.max_pool2d_forward(arr(xp, x), k, s, p)
    y_np = to_numpy(y)
    torch = pytest.importorskip("torch")
    ty, tidx = torch.nn.functional.max_pool2d(torch.tensor(x), k, s, p, return_indices=True)
    np.testing.assert_array_equal(np.isnan(y_np), np.isnan(ty.numpy()))
    np.testing.assert_array_equal(y_np[~np.isnan(y_np)], ty.numpy()[~np.isnan(y_np)])
    arg = to_numpy(cache.argmax)
    # every NaN output points at the first NaN of its window
    for n, c, oh, ow in zip(*np.nonzero(np.isnan(y_np))):
        h, w = divmod(int(arg[n, c, oh, ow]), 6)
        assert np.isnan(x[n, c, h, w])
        window = [
            (hh, ww)
            for hh in range(oh * s - p, oh * s - p + k)
            for ww in range(ow * s - p, ow * s - p + k)
            if 0 <= hh < 6 and 0 <= ww < 6 and np.isnan(x[n, c, hh, ww])
        ]
        assert (h, w) == window[0]
    np.testing.assert_array_equal(arg[~np.isnan(y_np)], tidx.numpy()[~np.isnan(y_np)])


def _channels_last(xp, a):
    return xp.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # NCHW shape, NHWC memory


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_ops_on_channels_last_arrays(xp, rng, dtype):
    """Pools and activations keep a channels-last input channels-last and give the same numbers;
    the convolution accepts either layout (the CPU engine returns channels-last, the others NCHW)."""
    x = arr(xp, rng.standard_normal((3, 4, 8, 6)), dtype)
    xc = _channels_last(xp, x)
    assert not xc.flags.c_contiguous
    for fwd, bwd in [
        (lambda a: F.max_pool2d_forward(a, 2), F.max_pool2d_backward),
        (lambda a: F.max_pool2d_forward(a, 3, 2, 1), F.max_pool2d_backward),
        (lambda a: F.avg_pool2d_forward(a, 3, 2, 1), F.avg_pool2d_backward),
        (lambda a: F.avg_pool2d_forward(a, 2), F.avg_pool2d_backward),
        (F.relu_forward, F.relu_backward),
        (F.tanh_forward, F.tanh_backward),
    ]:
        y, cache = fwd(x)
        yc, cache_c = fwd(xc)
        np.testing.assert_array_equal(to_numpy(yc), to_numpy(y))
        if xp is np:
            assert yc.transpose(0, 2, 3, 1).flags.c_contiguous  # the layout is kept
        dy = arr(xp, rng.standard_normal(y.shape), dtype)
        np.testing.assert_array_equal(to_numpy(bwd(_channels_last(xp, dy), cache_c)), to_numpy(bwd(dy, cache)))
    w, b = arr(xp, rng.standard_normal((5, 4, 3, 3)), dtype), arr(xp, rng.standard_normal(5), dtype)
    y, cache = F.conv2d_forward(x, w, b, 1, 1)
    yc, cache_c = F.conv2d_forward(xc, w, b, 1, 1)
    assert (yc.transpose(0, 2, 3, 1) if xp is np else yc).flags.c_contiguous  # the engine's layout
    assert_close(yc, y, tol_for(dtype), "y")
    dy = arr(xp, rng.standard_normal(y.shape), dtype)
    for got, ref in zip(F.conv2d_backward(_channels_last(xp, dy), cache_c), F.conv2d_backward(dy, cache)):
        assert_close(got, ref, tol_for(dtype), "conv backward")


@pytest.mark.parametrize("limit_mb", [1024, 1e-3], ids=["whole-batch", "chunked"])
def test_conv_backward_without_input_grad(xp, rng, limit_mb):
    """The layers' dW/db-only backward (the first layer of a training step) agrees with the full
    one, with the columns kept from forward and rebuilt per chunk (a tiny workspace limit)."""
    for C, Fo, k, p in [(1, 6, 5, 2), (3, 8, 3, 1), (8, 2, 3, 1), (4, 4, 3, 0)]:  # K-major, row-major, F < C
        x = arr(xp, rng.standard_normal((3, C, 9, 9)))
        w, b = arr(xp, rng.standard_normal((Fo, C, k, k))), arr(xp, rng.standard_normal(Fo))
        with cnn_gpu.use_workspace_limit(limit_mb):
            y, cache = F.conv2d_forward(x, w, b, 1, p)
            dy = arr(xp, rng.standard_normal(y.shape))
            dx, dw, db = F.conv2d_backward(dy, cache)
            y, cache = F.conv2d_forward(x, w, b, 1, p)
            none, dw2, db2 = F.conv2d_backward(dy, cache, input_grad=False)
        assert none is None
        assert_close(dw2, dw, 1e-12, f"dw C={C} F={Fo}")
        assert_close(db2, db, 1e-12, f"db C={C} F={Fo}")
        dx_ref, dw_ref, db_ref = conv2d_backward_ref(to_numpy(dy), to_numpy(x), to_numpy(w), 1, p)
        assert_close(dx, dx_ref, 1e-10, "dx")
        assert_close(dw, dw_ref, 1e-10, "dw")


@pytest.mark.parametrize("stride,padding", [(2, 1), (1, 1), ((1, 2), (1, 0))])
def test_max_pool_padding_never_wins_over_minus_inf_inputs(xp, stride, padding):
    """Windows whose real values are all -inf tie with the -inf padding: the argmax is the
    window's first real element (as in the CUDA kernel), never a padding position."""
    x = np.full((1, 2, 4, 5), -np.inf)
    x[0, 1, 0, 0] = 1.0  # one window with a finite maximum
    X = xp.asarray(x)
    y, cache = F.max_pool2d_forward(X, 3, stride, padding)
    arg = to_numpy(cache.argmax)
    (SH, SW), (PH, PW) = helpers_pair(stride), helpers_pair(padding)
    OH, OW = arg.shape[2:]
    for c in range(2):
        for oh in range(OH):
            for ow in range(OW):
                h0, w0 = max(oh * SH - PH, 0), max(ow * SW - PW, 0)
                if to_numpy(y)[0, c, oh, ow] == 1.0:
                    assert arg[0, c, oh, ow] == 0
                else:
                    assert arg[0, c, oh, ow] == h0 * 5 + w0, (c, oh, ow)
    dx = to_numpy(F.max_pool2d_backward(xp.ones_like(y), cache))
    assert dx.sum() == OH * OW * 2  # every gradient landed inside the input
    assert np.isfinite(dx).all()


def helpers_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)
